//! JSON values → SQL values, per database.
//!
//! - **PostgreSQL**: every statement is described by the server first, so each parameter's type is
//!   known (a column's type, or what the expression around the parameter needs). A value is
//!   encoded in that type's binary format: JSON numbers into integers, floats or `numeric` (exact,
//!   from the number's decimal text), strings into text types, timestamps, dates, times, UUIDs and
//!   enums, anything into `json`/`jsonb`, arrays into SQL arrays. A value that does not fit the
//!   type is a permanent error naming the parameter, the value's kind and the type.
//! - **MariaDB/MySQL**: the server converts what it is sent. Integers go as integers, other numbers
//!   as their exact decimal text (so a `DECIMAL` column gets every digit), booleans as 1/0,
//!   strings as strings, objects and arrays as JSON text. In table mode the column types are
//!   known, and an RFC 3339 timestamp with an offset bound to a `DATETIME` or `TIMESTAMP` column is
//!   converted to UTC first (MariaDB refuses offsets in datetime literals).
//! - **SQLite**: integers, reals, text; booleans as 1/0, objects and arrays as JSON text.

use serde_json::Value;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgTypeKind};
use sqlx::{Postgres, TypeInfo};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// What a JSON value is, for messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value shown in a message: strings quoted, long values cut.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 60 {
        return text;
    }
    let mut end = 57;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A point in time parsed from a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// With an offset (`2026-11-22T08:00:00Z`, `2026-11-22 09:00:00+01:00`).
    Zoned(OffsetDateTime),
    /// Without one (`2026-11-22T08:00:00`, `2026-11-22 08:00`, `2026-11-22`).
    Local(PrimitiveDateTime),
}

impl Moment {
    /// Parses RFC 3339 and the common SQL forms: `T` or a space between date and time, seconds
    /// and fractions optional, the offset optional; a date alone is midnight.
    pub fn parse(text: &str) -> Option<Moment> {
        let text = text.trim();
        let normalised;
        let text = if text.len() > 10 && text.as_bytes()[10] == b' ' {
            normalised = format!("{}T{}", &text[..10], &text[11..]);
            normalised.as_str()
        } else {
            text
        };
        if let Ok(zoned) = OffsetDateTime::parse(text, &Rfc3339) {
            return Some(Moment::Zoned(zoned));
        }
        let local = format_description!(
            version = 2,
            "[year]-[month]-[day]T[hour]:[minute][optional [:[second][optional [.[subsecond]]]]]"
        );
        if let Ok(local) = PrimitiveDateTime::parse(text, local) {
            return Some(Moment::Local(local));
        }
        parse_date(text).map(|d| Moment::Local(d.midnight()))
    }

    /// The UTC time: a local time is taken to be UTC.
    pub fn utc(self) -> PrimitiveDateTime {
        match self {
            Moment::Zoned(z) => {
                let utc = z.to_offset(UtcOffset::UTC);
                PrimitiveDateTime::new(utc.date(), utc.time())
            }
            Moment::Local(l) => l,
        }
    }
}

fn parse_date(text: &str) -> Option<Date> {
    Date::parse(text.trim(), format_description!("[year]-[month]-[day]")).ok()
}

fn parse_time(text: &str) -> Option<Time> {
    let format = format_description!(
        version = 2,
        "[hour]:[minute][optional [:[second][optional [.[subsecond]]]]]"
    );
    Time::parse(text.trim(), format).ok()
}

/// `YYYY-MM-DD HH:MM:SS.ffffff`, the form MariaDB/MySQL take for `DATETIME(6)`.
pub fn sql_datetime(t: PrimitiveDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A value encoded in the binary format of the parameter type the server described.
#[derive(Debug, Clone)]
pub struct PgParam {
    ty: PgTypeInfo,
    bytes: Option<Vec<u8>>,
}

impl sqlx::Type<Postgres> for PgParam {
    fn type_info() -> PgTypeInfo {
        // Never used: `produces` names the described type of each value.
        PgTypeInfo::with_oid(Oid(oid::UNKNOWN))
    }
}

impl<'q> sqlx::Encode<'q, Postgres> for PgParam {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        match &self.bytes {
            Some(bytes) => {
                buf.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(self.ty.clone())
    }

    fn size_hint(&self) -> usize {
        self.bytes.as_ref().map_or(0, Vec::len)
    }
}

/// Built-in type OIDs (PostgreSQL's `pg_type.dat`; stable across versions).
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;

    /// The scalar types [`super::pg_simple`] encodes.
    pub const SCALARS: &[u32] = &[
        BOOL,
        BYTEA,
        CHAR,
        NAME,
        INT8,
        INT2,
        INT4,
        TEXT,
        OID,
        JSON,
        XML,
        FLOAT4,
        FLOAT8,
        UNKNOWN,
        BPCHAR,
        VARCHAR,
        DATE,
        TIME,
        TIMESTAMP,
        TIMESTAMPTZ,
        NUMERIC,
        UUID,
        JSONB,
    ];
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
const PG_EPOCH_MICROS: i128 = 946_684_800_000_000;
/// The Julian day of 2000-01-01.
const PG_EPOCH_JULIAN: i32 = 2_451_545;

/// Encodes `value` for a parameter the server described as `ty`. The error says what does not
/// fit, without the parameter's name (the caller adds it).
pub fn pg_param(value: &Value, ty: &PgTypeInfo) -> Result<PgParam, String> {
    if value.is_null() {
        return Ok(PgParam {
            ty: ty.clone(),
            bytes: None,
        });
    }
    let bytes = pg_bytes(value, ty)?;
    Ok(PgParam {
        ty: ty.clone(),
        bytes: Some(bytes),
    })
}

fn pg_bytes(value: &Value, ty: &PgTypeInfo) -> Result<Vec<u8>, String> {
    // Built-in scalar types are known by their OID alone.
    if let Some(o) = ty.oid()
        && oid::SCALARS.contains(&o.0)
    {
        return pg_simple(value, ty, o.0);
    }
    match ty.kind() {
        PgTypeKind::Domain(base) => pg_bytes(value, base),
        PgTypeKind::Enum(_) => match value {
            Value::String(s) => Ok(s.as_bytes().to_vec()),
            other => Err(mismatch(other, ty, "a string naming one of its values")),
        },
        PgTypeKind::Array(element) => pg_array(value, ty, element),
        PgTypeKind::Simple | PgTypeKind::Pseudo => match ty.oid().map(|o| o.0) {
            Some(oid) => pg_simple(value, ty, oid),
            None => Err(unsupported(ty)),
        },
        PgTypeKind::Composite(_) | PgTypeKind::Range(_) => Err(unsupported(ty)),
    }
}

fn unsupported(ty: &PgTypeInfo) -> String {
    format!(
        "the sink cannot bind a value of type {name}: cast the parameter in the statement, e.g. \
         CAST(:field AS text)::{name}",
        name = ty.name().to_lowercase()
    )
}

fn mismatch(value: &Value, ty: &PgTypeInfo, wanted: &str) -> String {
    format!(
        "{} is {}, but the statement needs {} here ({wanted})",
        shown(value),
        kind(value),
        ty.name().to_lowercase()
    )
}

/// The text of a scalar for text columns: strings as they are, other values as JSON.
fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An integer from a JSON number (also `5.0`) or a string of digits.
fn as_integer(value: &Value) -> Option<i128> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.3e18)
                    .map(|f| f as i128)
            }),
        Value::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    }
}

fn pg_simple(value: &Value, ty: &PgTypeInfo, oid: u32) -> Result<Vec<u8>, String> {
    match oid {
        oid::BOOL => match value {
            Value::Bool(b) => Ok(vec![u8::from(*b)]),
            Value::String(s) if s == "true" || s == "false" => Ok(vec![u8::from(s == "true")]),
            other => Err(mismatch(other, ty, "true or false")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            let n = as_integer(value).ok_or_else(|| mismatch(value, ty, "an integer"))?;
            let out_of_range = || format!("{n} is out of range for {}", ty.name().to_lowercase());
            Ok(match oid {
                oid::INT2 => i16::try_from(n)
                    .map_err(|_| out_of_range())?
                    .to_be_bytes()
                    .to_vec(),
                oid::INT4 => i32::try_from(n)
                    .map_err(|_| out_of_range())?
                    .to_be_bytes()
                    .to_vec(),
                oid::OID => u32::try_from(n)
                    .map_err(|_| out_of_range())?
                    .to_be_bytes()
                    .to_vec(),
                _ => i64::try_from(n)
                    .map_err(|_| out_of_range())?
                    .to_be_bytes()
                    .to_vec(),
            })
        }
        oid::FLOAT4 | oid::FLOAT8 => {
            let f = match value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            }
            .ok_or_else(|| mismatch(value, ty, "a number"))?;
            Ok(if oid == oid::FLOAT4 {
                (f as f32).to_be_bytes().to_vec()
            } else {
                f.to_be_bytes().to_vec()
            })
        }
        oid::NUMERIC => {
            let text = match value {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.trim().to_string(),
                other => return Err(mismatch(other, ty, "a number")),
            };
            numeric(&text).ok_or_else(|| mismatch(value, ty, "a decimal number"))
        }
        oid::TEXT
        | oid::VARCHAR
        | oid::BPCHAR
        | oid::NAME
        | oid::UNKNOWN
        | oid::CHAR
        | oid::XML => Ok(as_text(value).into_bytes()),
        oid::JSON => Ok(value.to_string().into_bytes()),
        oid::JSONB => {
            let mut bytes = vec![1u8];
            bytes.extend_from_slice(value.to_string().as_bytes());
            Ok(bytes)
        }
        oid::TIMESTAMPTZ | oid::TIMESTAMP => {
            let moment = match value {
                Value::String(s) => Moment::parse(s),
                _ => None,
            }
            .ok_or_else(|| mismatch(value, ty, "an RFC 3339 timestamp"))?;
            let utc = moment.utc().assume_utc();
            let micros = utc.unix_timestamp_nanos() / 1000 - PG_EPOCH_MICROS;
            Ok((micros as i64).to_be_bytes().to_vec())
        }
        oid::DATE => {
            let date = match value {
                Value::String(s) => parse_date(s),
                _ => None,
            }
            .ok_or_else(|| mismatch(value, ty, "a date like 2026-11-22"))?;
            Ok((date.to_julian_day() - PG_EPOCH_JULIAN)
                .to_be_bytes()
                .to_vec())
        }
        oid::TIME => {
            let time = match value {
                Value::String(s) => parse_time(s),
                _ => None,
            }
            .ok_or_else(|| mismatch(value, ty, "a time like 16:00:00"))?;
            let (h, m, s, us) = time.as_hms_micro();
            let micros = ((i64::from(h) * 60 + i64::from(m)) * 60 + i64::from(s)) * 1_000_000
                + i64::from(us);
            Ok(micros.to_be_bytes().to_vec())
        }
        oid::UUID => match value {
            Value::String(s) => uuid(s).ok_or_else(|| mismatch(value, ty, "a UUID in hexadecimal")),
            other => Err(mismatch(other, ty, "a UUID in hexadecimal")),
        },
        oid::BYTEA => Err(format!(
            "the sink cannot bind a JSON value to bytea: decode it in the statement, e.g. \
             decode(:field, 'base64') (got {})",
            kind(value)
        )),
        _ if ty.name().eq_ignore_ascii_case("citext") => Ok(as_text(value).into_bytes()),
        _ => Err(unsupported(ty)),
    }
}

/// A one-dimensional array (binary format: dimensions, null flag, element type, bounds,
/// elements).
fn pg_array(value: &Value, ty: &PgTypeInfo, element: &PgTypeInfo) -> Result<Vec<u8>, String> {
    let Value::Array(items) = value else {
        return Err(mismatch(value, ty, "an array"));
    };
    let Some(element_oid) = element.oid() else {
        return Err(unsupported(ty));
    };
    let mut out = Vec::new();
    let has_null = items.iter().any(Value::is_null);
    out.extend_from_slice(&i32::from(!items.is_empty()).to_be_bytes());
    out.extend_from_slice(&i32::from(has_null).to_be_bytes());
    out.extend_from_slice(&element_oid.0.to_be_bytes());
    if items.is_empty() {
        return Ok(out);
    }
    let len = i32::try_from(items.len()).map_err(|_| "the array is too long".to_string())?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    for (i, item) in items.iter().enumerate() {
        if item.is_null() {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            continue;
        }
        if item.is_array() {
            return Err(format!(
                "element {i} is an array: only one-dimensional arrays can be bound"
            ));
        }
        let bytes = pg_bytes(item, element).map_err(|e| format!("element {i}: {e}"))?;
        let n = i32::try_from(bytes.len()).map_err(|_| "an element is too long".to_string())?;
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

fn uuid(text: &str) -> Option<Vec<u8>> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    hex.chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// PostgreSQL's binary `numeric` from a decimal text (`-12.50`, `1e3`, `NaN`): base-10000
/// digits with a weight, sign and display scale. Exact: no digit is lost or rounded here.
pub fn numeric(text: &str) -> Option<Vec<u8>> {
    const POSITIVE: u16 = 0x0000;
    const NEGATIVE: u16 = 0x4000;
    const NAN: u16 = 0xC000;
    let header = |ndigits: i16, weight: i16, sign: u16, dscale: u16| {
        let mut out = Vec::with_capacity(8);
        out.extend_from_slice(&ndigits.to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        out
    };
    if text.eq_ignore_ascii_case("nan") {
        return Some(header(0, 0, NAN, 0));
    }
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return None;
    }
    if exponent.unsigned_abs() > 10_000 {
        return None;
    }
    // value = digits × 10^-scale
    let mut digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
    let mut scale = frac_part.len() as i32 - exponent;
    if scale < 0 {
        digits.extend(std::iter::repeat_n(0, (-scale) as usize));
        scale = 0;
    }
    let scale = scale as usize;
    if digits.len() < scale {
        let pad = scale - digits.len();
        digits.splice(0..0, std::iter::repeat_n(0, pad));
    }
    let split = digits.len() - scale;
    let (int_digits, frac_digits) = digits.split_at(split);
    let int_digits: Vec<u8> = int_digits.iter().copied().skip_while(|&d| d == 0).collect();
    // Group by four from the decimal point outwards.
    let int_pad = (4 - int_digits.len() % 4) % 4;
    let frac_pad = (4 - frac_digits.len() % 4) % 4;
    let int_groups: Vec<i16> = std::iter::repeat_n(0, int_pad)
        .chain(int_digits.iter().copied())
        .collect::<Vec<u8>>()
        .chunks(4)
        .map(group)
        .collect();
    let frac_groups: Vec<i16> = frac_digits
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0, frac_pad))
        .collect::<Vec<u8>>()
        .chunks(4)
        .map(group)
        .collect();
    let mut weight = int_groups.len() as i32 - 1;
    let mut groups: Vec<i16> = int_groups.into_iter().chain(frac_groups).collect();
    let leading = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..leading);
    weight -= leading as i32;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let dscale = u16::try_from(scale).ok().filter(|&s| s <= 0x3FFF)?;
    if groups.is_empty() {
        return Some(header(0, 0, POSITIVE, dscale));
    }
    let ndigits = i16::try_from(groups.len()).ok()?;
    let weight = i16::try_from(weight).ok()?;
    let mut out = header(
        ndigits,
        weight,
        if negative { NEGATIVE } else { POSITIVE },
        dscale,
    );
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

fn group(chunk: &[u8]) -> i16 {
    chunk.iter().fold(0i16, |acc, &d| acc * 10 + i16::from(d))
}

// ---------------------------------------------------------------------------------------------
// MariaDB/MySQL

/// A value as sent to MariaDB/MySQL.
#[derive(Debug, Clone, PartialEq)]
pub enum MyParam {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Text(String),
}

/// How a MariaDB/MySQL column takes values, from its `DATA_TYPE` in `information_schema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MyColumn {
    /// `datetime`, `timestamp`: RFC 3339 timestamps with an offset are converted to UTC.
    DateTime,
    /// `json` (MySQL): every value is sent as JSON text, strings included.
    Json,
    Other,
}

impl MyColumn {
    pub fn from_data_type(data_type: &str) -> MyColumn {
        match data_type.to_ascii_lowercase().as_str() {
            "datetime" | "timestamp" => MyColumn::DateTime,
            "json" => MyColumn::Json,
            _ => MyColumn::Other,
        }
    }
}

/// Converts a value for MariaDB/MySQL; `column` is known in table mode.
pub fn my_param(value: &Value, column: Option<MyColumn>) -> MyParam {
    match (value, column) {
        (Value::Null, _) => MyParam::Null,
        (other, Some(MyColumn::Json)) => MyParam::Text(other.to_string()),
        (Value::String(s), Some(MyColumn::DateTime)) => match Moment::parse(s) {
            Some(moment @ Moment::Zoned(_)) => MyParam::Text(sql_datetime(moment.utc())),
            _ => MyParam::Text(s.clone()),
        },
        (Value::Bool(b), _) => MyParam::Bool(*b),
        (Value::Number(n), _) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => MyParam::Int(i),
            (None, Some(u)) => MyParam::UInt(u),
            // The exact decimal text: the server converts it to the column's type, and a
            // DECIMAL column keeps every digit.
            _ => MyParam::Text(n.to_string()),
        },
        (Value::String(s), _) => MyParam::Text(s.clone()),
        (other, _) => MyParam::Text(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// Converts a value for SQLite.
pub fn sqlite_value(value: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match value {
        Value::Null => V::Null,
        Value::Bool(b) => V::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => V::Integer(i),
            None => V::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => V::Text(s.clone()),
        other => V::Text(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn be16(v: &[i16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    #[test]
    fn numeric_is_exact_base_10000() {
        // 12345.67 = 1·10000^1 + 2345·10000^0 + 6700·10000^-1
        assert_eq!(
            numeric("12345.67").unwrap(),
            [be16(&[3, 1]), vec![0, 0, 0, 2], be16(&[1, 2345, 6700])].concat()
        );
        assert_eq!(
            numeric("-0.0001").unwrap(),
            [be16(&[1, -1]), vec![0x40, 0, 0, 4], be16(&[1])].concat()
        );
        assert_eq!(
            numeric("1e8").unwrap(),
            [be16(&[1, 2]), vec![0, 0, 0, 0], be16(&[1])].concat()
        );
        assert_eq!(
            numeric("0.00").unwrap(),
            [be16(&[0, 0]), vec![0, 0, 0, 2]].concat()
        );
        assert_eq!(
            numeric("1.5E-3").unwrap(),
            [be16(&[1, -1]), vec![0, 0, 0, 4], be16(&[15])].concat()
        );
        assert_eq!(
            numeric("123456789012345678901234567890").unwrap()[..8],
            [be16(&[8, 7]), vec![0, 0, 0, 0]].concat()
        );
        assert_eq!(numeric("NaN").unwrap(), [0, 0, 0, 0, 0xC0, 0, 0, 0]);
        for bad in ["", "-", ".", "1.2.3", "abc", "1e", "1e99999", "1,5", " 1"] {
            assert!(numeric(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn timestamps_in_rfc_3339_and_sql_forms() {
        let z = Moment::parse("2026-11-22T08:00:00Z").unwrap();
        assert!(matches!(z, Moment::Zoned(_)));
        assert_eq!(sql_datetime(z.utc()), "2026-11-22 08:00:00.000000");
        let z = Moment::parse("2026-11-22 09:30:00.25+01:00").unwrap();
        assert_eq!(sql_datetime(z.utc()), "2026-11-22 08:30:00.250000");
        let l = Moment::parse("2026-11-22T08:00").unwrap();
        assert!(matches!(l, Moment::Local(_)));
        assert_eq!(sql_datetime(l.utc()), "2026-11-22 08:00:00.000000");
        assert_eq!(
            sql_datetime(Moment::parse("2026-11-22").unwrap().utc()),
            "2026-11-22 00:00:00.000000"
        );
        assert!(Moment::parse("next tuesday").is_none());
        assert!(Moment::parse("2026-13-01").is_none());
    }

    fn pg(value: Value, oid: u32) -> Result<Vec<u8>, String> {
        pg_param(&value, &PgTypeInfo::with_oid(Oid(oid))).map(|p| p.bytes.unwrap_or_default())
    }

    #[test]
    fn postgres_scalars_follow_the_described_type() {
        assert_eq!(pg(json!(true), oid::BOOL).unwrap(), [1]);
        assert_eq!(pg(json!(7), oid::INT2).unwrap(), 7i16.to_be_bytes());
        assert_eq!(pg(json!(7.0), oid::INT4).unwrap(), 7i32.to_be_bytes());
        assert_eq!(pg(json!("7"), oid::INT8).unwrap(), 7i64.to_be_bytes());
        assert_eq!(pg(json!(1.5), oid::FLOAT8).unwrap(), 1.5f64.to_be_bytes());
        assert_eq!(pg(json!("x"), oid::TEXT).unwrap(), b"x");
        assert_eq!(pg(json!(42), oid::VARCHAR).unwrap(), b"42");
        assert_eq!(pg(json!({"a": 1}), oid::JSON).unwrap(), br#"{"a":1}"#);
        assert_eq!(pg(json!("s"), oid::JSONB).unwrap(), b"\x01\"s\"");
        assert_eq!(
            pg(json!("2000-01-01T00:00:01Z"), oid::TIMESTAMPTZ).unwrap(),
            1_000_000i64.to_be_bytes()
        );
        assert_eq!(
            pg(json!("2000-01-02T01:00:00+01:00"), oid::TIMESTAMP).unwrap(),
            86_400_000_000i64.to_be_bytes()
        );
        assert_eq!(
            pg(json!("1999-12-31"), oid::DATE).unwrap(),
            (-1i32).to_be_bytes()
        );
        assert_eq!(
            pg(json!("00:00:01.5"), oid::TIME).unwrap(),
            1_500_000i64.to_be_bytes()
        );
        assert_eq!(
            pg(json!("00000000-0000-0000-0000-0000000000ff"), oid::UUID).unwrap()[15],
            0xff
        );
        let text_array = <Vec<String> as sqlx::Type<Postgres>>::type_info();
        let mut expected = vec![0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 25, 0, 0, 0, 2, 0, 0, 0, 1];
        expected.extend_from_slice(&[0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            pg_param(&json!(["a", null]), &text_array)
                .unwrap()
                .bytes
                .unwrap(),
            expected
        );
        assert_eq!(
            pg_param(&json!([]), &text_array).unwrap().bytes.unwrap(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25]
        );
        let e = pg_param(&json!([[1]]), &text_array).unwrap_err();
        assert!(e.contains("one-dimensional"), "{e}");
        let e = pg_param(&json!("a"), &text_array).unwrap_err();
        assert!(e.contains("an array"), "{e}");
        assert!(
            pg_param(&Value::Null, &PgTypeInfo::with_oid(Oid(oid::INT4)))
                .unwrap()
                .bytes
                .is_none()
        );

        let int4 = <i32 as sqlx::Type<Postgres>>::type_info();
        let e = pg_param(&json!("abc"), &int4).unwrap_err();
        assert!(
            e.contains("\"abc\" is a string") && e.contains("int4"),
            "{e}"
        );
        let e = pg(json!(70000), oid::INT2).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = pg(json!(1.5), oid::INT8).unwrap_err();
        assert!(e.contains("an integer"), "{e}");
        let e = pg(json!(1), oid::TIMESTAMPTZ).unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
        let e = pg(json!("x"), oid::BYTEA).unwrap_err();
        assert!(e.contains("decode("), "{e}");
    }

    #[test]
    fn mysql_values_keep_decimals_exact_and_convert_zoned_datetimes() {
        assert_eq!(
            my_param(&json!(12345.67), None),
            MyParam::Text("12345.67".into())
        );
        assert_eq!(my_param(&json!(-3), None), MyParam::Int(-3));
        assert_eq!(my_param(&json!(u64::MAX), None), MyParam::UInt(u64::MAX));
        assert_eq!(my_param(&json!(true), None), MyParam::Bool(true));
        assert_eq!(my_param(&json!([1]), None), MyParam::Text("[1]".into()));
        assert_eq!(
            my_param(
                &json!("2026-11-22T09:00:00+01:00"),
                Some(MyColumn::DateTime)
            ),
            MyParam::Text("2026-11-22 08:00:00.000000".into())
        );
        // Statement mode does not know the column: strings stay as they are.
        assert_eq!(
            my_param(&json!("2026-11-22T09:00:00+01:00"), None),
            MyParam::Text("2026-11-22T09:00:00+01:00".into())
        );
        assert_eq!(
            my_param(&json!("s"), Some(MyColumn::Json)),
            MyParam::Text("\"s\"".into())
        );
    }

    #[test]
    fn sqlite_values() {
        use rusqlite::types::Value as V;
        assert_eq!(sqlite_value(&json!(true)), V::Integer(1));
        assert_eq!(sqlite_value(&json!(2.5)), V::Real(2.5));
        assert_eq!(
            sqlite_value(&json!({"a": [1]})),
            V::Text("{\"a\":[1]}".into())
        );
    }
}
