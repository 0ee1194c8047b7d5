//! The Change Event envelope (PROTOCOL §1.1) and its CloudEvents 1.0 forms.
//!
//! [`parse`] turns the headers and raw body of a delivery into an [`Envelope`], or an
//! [`EnvelopeError`] that knows its HTTP status, its stable code and the field at fault. It is pure
//! and never panics, whatever the input.
//!
//! Three forms are accepted, chosen as the CloudEvents HTTP binding says:
//! 1. `Content-Type: application/cloudevents+json`: a CloudEvent in structured mode (any `ce-*`
//!    headers are then ignored, as the binding requires);
//! 2. otherwise, a `ce-specversion` header: a CloudEvent in binary mode, the body being its data;
//! 3. otherwise, `Content-Type: application/json`: a Change Event.
//!
//! Decisions where the contract is silent:
//! - In a Change Event, an optional field whose value is `null` counts as absent (many serialisers
//!   write absent options as `null`); `payload: null` is a present payload. CloudEvents attributes
//!   that are `null` are absent too, as the CloudEvents JSON format says.
//! - A top-level member name that appears twice is refused as invalid JSON: the `id` is the
//!   idempotency key and must not depend on which duplicate a parser keeps.
//! - Integers must be written as JSON integers: `1.0` is not a valid `version`.
//! - A CloudEvent's `data_base64` becomes the `payload` as the base64 string itself (its
//!   `datacontenttype` stays in the document so an adapter can tell what it holds).
//! - A CloudEvent must carry data: it becomes the payload, which every Change Event has.
//! - A CloudEvents extension named `version` or `payload` is refused, because those names belong
//!   to the Change Event (a CloudEvent carries them as `dataversion` and `data`).
//! - Binary-mode header values are percent-decoded (CloudEvents HTTP binding §3.1.3.2); a `%`
//!   not followed by two hex digits is kept as it is. The same `ce-*` header sent twice is refused.

use std::fmt;

use base64::Engine as _;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The longest `id` accepted, in characters (all ASCII, so also in bytes).
pub const MAX_ID_LEN: usize = 200;

/// How deeply arrays and objects may nest in an event by default, the envelope's own object
/// counting as the first level (`limits.max_json_depth`).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// The highest depth limit that can be configured: the JSON parser the agent reads events with
/// refuses a 128th level.
pub const MAX_DEPTH_LIMIT: usize = 127;

/// The `type` of a Change Event that does not name one.
pub const DEFAULT_TYPE: &str = "change";

const CE_SPECVERSION: &str = "1.0";
const CE_HEADER_PREFIX: &str = "ce-";

const ACCEPTED_TYPES: &str = "send application/json (a Change Event), application/cloudevents+json \
     (a CloudEvent in structured mode) or a CloudEvent in binary mode (ce-* headers)";
const ACCEPTED_DATA_TYPES: &str = "a binary-mode CloudEvent's data must be application/json, \
     another */*+json type, or text/* in UTF-8";

/// How the event arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A Change Event: `Content-Type: application/json`.
    ChangeEvent,
    /// A CloudEvent in structured mode: `Content-Type: application/cloudevents+json`.
    CloudEventStructured,
    /// A CloudEvent in binary mode: `ce-*` headers, the body being the data.
    CloudEventBinary,
}

impl Format {
    /// A stable name for logs and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::ChangeEvent => "change_event",
            Format::CloudEventStructured => "cloudevent_structured",
            Format::CloudEventBinary => "cloudevent_binary",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated event, whatever form it arrived in.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub version: u64,
    pub event_type: String,
    pub subject: String,
    pub revision: Option<u64>,
    pub source: Option<String>,
    /// As sent; it has been checked to be an RFC 3339 date-time.
    pub time: Option<String>,
    /// The normalised Change Event document: the fields above under their contract names (id,
    /// version, type, subject, revision, source, time — defaults applied, absent optionals
    /// omitted), `payload`, and every unknown top-level field kept.
    /// This is what adapters see and what the journal stores beside the raw body.
    pub document: Map<String, Value>,
    pub format: Format,
}

/// Why a delivery's body or headers do not make an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The `Content-Type` (or, in binary mode, the data's content type) is not one the agent reads.
    /// `found` is the media type sent, or `None` when there was none.
    #[error("{}", media_type_message(found.as_deref(), accepted))]
    UnsupportedMediaType {
        found: Option<String>,
        accepted: &'static str,
    },
    /// The body (or, in binary mode, the data) does not parse as JSON.
    #[error("{} is not valid JSON: {message} at line {line} column {column}", json_subject(*field))]
    InvalidJson {
        field: Option<&'static str>,
        message: String,
        line: usize,
        column: usize,
    },
    /// The body is JSON but not an object.
    #[error("the body must be a JSON object, not {found}")]
    NotAnObject { found: &'static str },
    #[error("missing {} `{field}`: expected {expected}", noun(field))]
    MissingField {
        field: String,
        expected: &'static str,
    },
    #[error("{} `{field}` {problem}", noun(field))]
    InvalidField { field: String, problem: String },
    /// Arrays and objects nest deeper than the limit. `depth` counts the envelope's object as
    /// the first level (in binary mode, the data becomes the payload one level down).
    #[error(
        "the event nests arrays and objects {depth} levels deep, more than the limit of {limit}; \
         send a flatter payload, or ask the operator to raise limits.max_json_depth (at most {MAX_DEPTH_LIMIT})"
    )]
    TooDeep { depth: usize, limit: usize },
}

fn media_type_message(found: Option<&str>, accepted: &str) -> String {
    match found {
        Some(found) => format!("content type `{found}` is not accepted; {accepted}"),
        None => format!("the request has no usable Content-Type header; {accepted}"),
    }
}

/// Binary-mode attributes travel in `ce-*` headers; everything else is a field of the body.
fn noun(field: &str) -> &'static str {
    if field.starts_with(CE_HEADER_PREFIX) {
        "header"
    } else {
        "field"
    }
}

fn json_subject(field: Option<&str>) -> String {
    match field {
        Some(field) => format!("`{field}` (the request body)"),
        None => "the body".to_owned(),
    }
}

impl EnvelopeError {
    /// A stable, machine-readable code for the problem+json answer.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::UnsupportedMediaType { .. } => "unsupported_media_type",
            EnvelopeError::InvalidJson { .. } => "invalid_json",
            EnvelopeError::NotAnObject { .. } => "not_an_object",
            EnvelopeError::MissingField { .. } => "missing_field",
            EnvelopeError::InvalidField { .. } => "invalid_field",
            EnvelopeError::TooDeep { .. } => "too_deep",
        }
    }

    /// The HTTP status to answer with (PROTOCOL §1.4).
    pub fn status(&self) -> StatusCode {
        match self {
            EnvelopeError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The field at fault: a Change Event field, a CloudEvents attribute, or in binary mode the
    /// `ce-*` header.
    pub fn field(&self) -> Option<&str> {
        match self {
            EnvelopeError::MissingField { field, .. }
            | EnvelopeError::InvalidField { field, .. } => Some(field),
            EnvelopeError::InvalidJson { field, .. } => *field,
            _ => None,
        }
    }
}

fn missing(field: &str, expected: &'static str) -> EnvelopeError {
    EnvelopeError::MissingField {
        field: field.to_owned(),
        expected,
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> EnvelopeError {
    EnvelopeError::InvalidField {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

const EXPECT_ID: &str = "a string of 1 to 200 printable ASCII characters, unique per event";
const EXPECT_VERSION: &str =
    "an integer from 1 to 9223372036854775807 (2^63 - 1), the schema version of the payload";
const EXPECT_PAYLOAD: &str = "the change itself, any JSON value (null is allowed)";
const EXPECT_CE_ID: &str =
    "the CloudEvents `id` attribute, a string of 1 to 200 printable ASCII characters";
const EXPECT_CE_SOURCE: &str = "the CloudEvents `source` attribute, a non-empty URI-reference";
const EXPECT_CE_TYPE: &str = "the CloudEvents `type` attribute, a non-empty string";
const EXPECT_CE_SPECVERSION: &str = "the CloudEvents `specversion` attribute, \"1.0\"";
const EXPECT_CE_DATA: &str = "the event's data, which becomes the Change Event payload";
const EXPECT_CE_BINARY_DATA: &str = "the event's data as the request body, with its Content-Type";

/// Parses and validates one delivery, with the default depth limit.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Envelope, EnvelopeError> {
    parse_limited(headers, body, DEFAULT_MAX_DEPTH)
}

/// Parses and validates one delivery whose arrays and objects nest at most `max_depth` levels
/// (the envelope's object being the first). The depth is measured before anything is parsed,
/// so no parser recurses deeper than that, here or in the adapter and sinks that read the
/// stored event.
pub fn parse_limited(
    headers: &HeaderMap,
    body: &[u8],
    max_depth: usize,
) -> Result<Envelope, EnvelopeError> {
    let content_type = headers.get(CONTENT_TYPE);
    let media = content_type.map(MediaType::parse);
    let essence = media
        .as_ref()
        .and_then(|m| m.as_ref().ok())
        .map(|m| m.essence.as_str());

    if essence == Some("application/cloudevents+json") {
        check_depth(body, 0, max_depth)?;
        return structured(parse_object(body)?);
    }
    if headers.contains_key("ce-specversion") {
        return binary(headers, content_type, media, body, max_depth);
    }
    if essence == Some("application/json") {
        check_depth(body, 0, max_depth)?;
        return change_event(parse_object(body)?);
    }
    Err(EnvelopeError::UnsupportedMediaType {
        found: found_media(media),
        accepted: ACCEPTED_TYPES,
    })
}

// --- Change Event -----------------------------------------------------------------------------

fn change_event(object: Map<String, Value>) -> Result<Envelope, EnvelopeError> {
    let mut id = None;
    let mut version = None;
    let mut event_type = None;
    let mut subject = None;
    let mut revision = None;
    let mut source = None;
    let mut time = None;
    let mut payload = None;
    let mut extras = Map::new();
    for (name, value) in object {
        let slot = match name.as_str() {
            "id" => &mut id,
            "version" => &mut version,
            "type" => &mut event_type,
            "subject" => &mut subject,
            "revision" => &mut revision,
            "source" => &mut source,
            "time" => &mut time,
            "payload" => &mut payload,
            _ => {
                extras.insert(name, value);
                continue;
            }
        };
        *slot = Some(value);
    }

    let id = match id {
        Some(Value::String(s)) => check_id("id", s)?,
        Some(other) => {
            return Err(invalid(
                "id",
                format!("must be a string, found {}", kind(&other)),
            ));
        }
        None => return Err(missing("id", EXPECT_ID)),
    };
    let version = match version {
        Some(v) => json_integer("version", &v, 1)?,
        None => return Err(missing("version", EXPECT_VERSION)),
    };
    let event_type =
        optional_string("type", event_type)?.unwrap_or_else(|| DEFAULT_TYPE.to_owned());
    let subject = optional_string("subject", subject)?.unwrap_or_else(|| id.clone());
    let revision = match non_null(revision) {
        Some(v) => Some(json_integer("revision", &v, 0)?),
        None => None,
    };
    let source = optional_string("source", source)?;
    let time = optional_string("time", time)?
        .map(|t| check_time("time", t))
        .transpose()?;
    let payload = payload.ok_or_else(|| missing("payload", EXPECT_PAYLOAD))?;

    Ok(assemble(
        Fields {
            id,
            version,
            event_type,
            subject,
            revision,
            source,
            time,
        },
        payload,
        extras,
        Format::ChangeEvent,
    ))
}

// --- CloudEvents, structured mode -------------------------------------------------------------

fn structured(object: Map<String, Value>) -> Result<Envelope, EnvelopeError> {
    let mut specversion = None;
    let mut id = None;
    let mut source = None;
    let mut event_type = None;
    let mut subject = None;
    let mut time = None;
    let mut dataversion = None;
    let mut revision = None;
    let mut data = None;
    let mut data_base64 = None;
    let mut extras = Map::new();
    for (name, value) in object {
        // The CloudEvents JSON format treats a null attribute as absent; `data: null` is data.
        if value.is_null() && name != "data" {
            continue;
        }
        let slot = match name.as_str() {
            "id" => &mut id,
            "source" => &mut source,
            "type" => &mut event_type,
            "subject" => &mut subject,
            "time" => &mut time,
            "dataversion" => &mut dataversion,
            "revision" => &mut revision,
            "data" => &mut data,
            "data_base64" => &mut data_base64,
            "specversion" => {
                // Checked below and kept in the document.
                specversion = Some(value.clone());
                extras.insert(name, value);
                continue;
            }
            _ => {
                extras.insert(name, value);
                continue;
            }
        };
        *slot = Some(value);
    }

    match specversion {
        Some(Value::String(s)) => check_specversion("specversion", &s)?,
        Some(other) => {
            return Err(invalid(
                "specversion",
                format!("must be the string \"1.0\", found {}", kind(&other)),
            ));
        }
        None => return Err(missing("specversion", EXPECT_CE_SPECVERSION)),
    }
    let id = match id {
        Some(v) => check_id("id", ce_string("id", v)?)?,
        None => return Err(missing("id", EXPECT_CE_ID)),
    };
    let source = match source {
        Some(v) => non_empty("source", ce_string("source", v)?)?,
        None => return Err(missing("source", EXPECT_CE_SOURCE)),
    };
    let event_type = match event_type {
        Some(v) => non_empty("type", ce_string("type", v)?)?,
        None => return Err(missing("type", EXPECT_CE_TYPE)),
    };
    let subject = match subject {
        Some(v) => non_empty("subject", ce_string("subject", v)?)?,
        None => id.clone(),
    };
    let time = time
        .map(|v| ce_string("time", v).and_then(|t| check_time("time", t)))
        .transpose()?;
    let version = match dataversion {
        Some(v) => ce_integer("dataversion", &v, 1)?,
        None => 1,
    };
    let revision = revision
        .map(|v| ce_integer("revision", &v, 0))
        .transpose()?;
    let payload = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "data_base64",
                "must not be sent together with `data`; a CloudEvent carries one or the other",
            ));
        }
        (Some(data), None) => data,
        (None, Some(Value::String(b64))) => {
            if base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .is_err()
            {
                return Err(invalid("data_base64", "is not valid base64"));
            }
            Value::String(b64)
        }
        (None, Some(other)) => {
            return Err(invalid(
                "data_base64",
                format!("must be a base64 string, found {}", kind(&other)),
            ));
        }
        (None, None) => return Err(missing("data", EXPECT_CE_DATA)),
    };
    check_reserved_extensions(&extras, "")?;

    Ok(assemble(
        Fields {
            id,
            version,
            event_type,
            subject,
            revision,
            source: Some(source),
            time,
        },
        payload,
        extras,
        Format::CloudEventStructured,
    ))
}

/// A CloudEvents attribute that must be a string.
fn ce_string(field: &str, value: Value) -> Result<String, EnvelopeError> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(invalid(
            field,
            format!("must be a string, found {}", kind(&other)),
        )),
    }
}

/// An integer extension attribute: a JSON integer or, since CloudEvents attributes are often
/// carried as strings, a string of decimal digits.
fn ce_integer(field: &str, value: &Value, min: u64) -> Result<u64, EnvelopeError> {
    match value {
        Value::String(s) => digits(field, s, min),
        other => json_integer(field, other, min),
    }
}

// --- CloudEvents, binary mode -----------------------------------------------------------------

fn binary(
    headers: &HeaderMap,
    content_type: Option<&HeaderValue>,
    media: Option<Result<MediaType, String>>,
    body: &[u8],
    max_depth: usize,
) -> Result<Envelope, EnvelopeError> {
    let mut specversion = None;
    let mut id = None;
    let mut source = None;
    let mut event_type = None;
    let mut subject = None;
    let mut time = None;
    let mut dataversion = None;
    let mut revision = None;
    let mut extras = Map::new();
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix(CE_HEADER_PREFIX) else {
            continue;
        };
        let header = name.as_str();
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(invalid(
                header,
                "is sent more than once; send each ce-* header once",
            ));
        };
        let value = header_string(header, value)?;
        let slot = match attribute {
            "specversion" => &mut specversion,
            "id" => &mut id,
            "source" => &mut source,
            "type" => &mut event_type,
            "subject" => &mut subject,
            "time" => &mut time,
            "dataversion" => &mut dataversion,
            "revision" => &mut revision,
            "" => continue,
            _ => {
                extras.insert(attribute.to_owned(), Value::String(value));
                continue;
            }
        };
        *slot = Some(value);
    }

    let specversion =
        specversion.ok_or_else(|| missing("ce-specversion", EXPECT_CE_SPECVERSION))?;
    check_specversion("ce-specversion", &specversion)?;
    let id = check_id("ce-id", id.ok_or_else(|| missing("ce-id", EXPECT_CE_ID))?)?;
    let source = non_empty(
        "ce-source",
        source.ok_or_else(|| missing("ce-source", EXPECT_CE_SOURCE))?,
    )?;
    let event_type = non_empty(
        "ce-type",
        event_type.ok_or_else(|| missing("ce-type", EXPECT_CE_TYPE))?,
    )?;
    let subject = match subject {
        Some(s) => non_empty("ce-subject", s)?,
        None => id.clone(),
    };
    let time = time.map(|t| check_time("ce-time", t)).transpose()?;
    let version = match dataversion {
        Some(v) => digits("ce-dataversion", &v, 1)?,
        None => 1,
    };
    let revision = revision.map(|v| digits("ce-revision", &v, 0)).transpose()?;
    check_reserved_extensions(&extras, CE_HEADER_PREFIX)?;

    let payload = binary_data(media, body, max_depth)?;

    // The specversion first, then the other attributes, then the data's content type, which
    // binary mode carries in Content-Type.
    let mut attributes = Map::new();
    attributes.insert("specversion".to_owned(), Value::String(specversion));
    attributes.extend(extras);
    if let Some(ct) = content_type.and_then(|v| v.to_str().ok()) {
        attributes
            .entry("datacontenttype")
            .or_insert_with(|| Value::String(ct.trim().to_owned()));
    }

    Ok(assemble(
        Fields {
            id,
            version,
            event_type,
            subject,
            revision,
            source: Some(source),
            time,
        },
        payload,
        attributes,
        Format::CloudEventBinary,
    ))
}

/// The data of a binary-mode CloudEvent, read according to its content type.
fn binary_data(
    media: Option<Result<MediaType, String>>,
    body: &[u8],
    max_depth: usize,
) -> Result<Value, EnvelopeError> {
    let media = match media {
        Some(Ok(media)) => media,
        None if body.is_empty() => return Err(missing("data", EXPECT_CE_BINARY_DATA)),
        other => {
            return Err(EnvelopeError::UnsupportedMediaType {
                found: found_media(other),
                accepted: ACCEPTED_DATA_TYPES,
            });
        }
    };
    if media.essence == "application/json" || media.essence.ends_with("+json") {
        // The data becomes the payload, inside the envelope's object.
        check_depth(body, 1, max_depth)?;
        return serde_json::from_slice(body).map_err(|e| json_error(Some("data"), &e));
    }
    if media.essence.starts_with("text/") {
        let utf8 = media
            .charset
            .as_deref()
            .is_none_or(|c| c == "utf-8" || c == "utf8" || c == "us-ascii");
        if !utf8 {
            return Err(EnvelopeError::UnsupportedMediaType {
                found: Some(sanitise(&format!(
                    "{}; charset={}",
                    media.essence,
                    media.charset.as_deref().unwrap_or_default()
                ))),
                accepted: ACCEPTED_DATA_TYPES,
            });
        }
        return match std::str::from_utf8(body) {
            Ok(text) => Ok(Value::String(text.to_owned())),
            Err(e) => Err(invalid(
                "data",
                format!(
                    "is not valid UTF-8 text (first bad byte at offset {})",
                    e.valid_up_to()
                ),
            )),
        };
    }
    Err(EnvelopeError::UnsupportedMediaType {
        found: Some(media.essence),
        accepted: ACCEPTED_DATA_TYPES,
    })
}

/// A `ce-*` header value, percent-decoded, as UTF-8.
fn header_string(header: &str, value: &HeaderValue) -> Result<String, EnvelopeError> {
    let decoded = percent_decode(value.as_bytes().trim_ascii());
    String::from_utf8(decoded)
        .map_err(|_| invalid(header, "is not valid UTF-8 after percent-decoding"))
}

fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut rest = input;
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%'
            && let [hi, lo, after @ ..] = tail
            && let (Some(hi), Some(lo)) = (hex(*hi), hex(*lo))
        {
            out.push(hi << 4 | lo);
            rest = after;
            continue;
        }
        out.push(b);
        rest = tail;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Extension attributes named like Change Event fields would be ambiguous in the document.
fn check_reserved_extensions(
    extras: &Map<String, Value>,
    prefix: &str,
) -> Result<(), EnvelopeError> {
    for (name, instead) in [("version", "dataversion"), ("payload", "data")] {
        if extras.contains_key(name) {
            return Err(invalid(
                &format!("{prefix}{name}"),
                format!(
                    "clashes with the Change Event field `{name}`; a CloudEvent carries it as `{instead}`"
                ),
            ));
        }
    }
    Ok(())
}

// --- shared checks ----------------------------------------------------------------------------

struct Fields {
    id: String,
    version: u64,
    event_type: String,
    subject: String,
    revision: Option<u64>,
    source: Option<String>,
    time: Option<String>,
}

/// Builds the envelope and its normalised document: contract fields in contract order, then
/// `payload`, then everything else in the order it came.
fn assemble(f: Fields, payload: Value, extras: Map<String, Value>, format: Format) -> Envelope {
    let mut document = Map::new();
    document.insert("id".to_owned(), Value::String(f.id.clone()));
    document.insert("version".to_owned(), Value::from(f.version));
    document.insert("type".to_owned(), Value::String(f.event_type.clone()));
    document.insert("subject".to_owned(), Value::String(f.subject.clone()));
    if let Some(revision) = f.revision {
        document.insert("revision".to_owned(), Value::from(revision));
    }
    if let Some(source) = &f.source {
        document.insert("source".to_owned(), Value::String(source.clone()));
    }
    if let Some(time) = &f.time {
        document.insert("time".to_owned(), Value::String(time.clone()));
    }
    document.insert("payload".to_owned(), payload);
    for (name, value) in extras {
        // Contract names were consumed or refused before; never let an extra overwrite one.
        document.entry(name).or_insert(value);
    }
    Envelope {
        id: f.id,
        version: f.version,
        event_type: f.event_type,
        subject: f.subject,
        revision: f.revision,
        source: f.source,
        time: f.time,
        document,
        format,
    }
}

fn check_id(field: &str, id: String) -> Result<String, EnvelopeError> {
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if let Some((pos, c)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(' '..='~').contains(c))
    {
        return Err(invalid(
            field,
            format!(
                "must contain only printable ASCII characters (0x20 to 0x7E); found U+{:04X} at position {}",
                u32::from(c),
                pos + 1
            ),
        ));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!(
                "is {} characters long; at most {MAX_ID_LEN} are allowed",
                id.len()
            ),
        ));
    }
    Ok(id)
}

fn check_specversion(field: &str, value: &str) -> Result<(), EnvelopeError> {
    if value == CE_SPECVERSION {
        Ok(())
    } else {
        Err(invalid(
            field,
            "must be \"1.0\"; the agent accepts CloudEvents 1.0",
        ))
    }
}

fn check_time(field: &str, time: String) -> Result<String, EnvelopeError> {
    match OffsetDateTime::parse(&time, &Rfc3339) {
        Ok(_) => Ok(time),
        Err(e) => Err(invalid(
            field,
            format!("must be an RFC 3339 date-time such as 2026-11-22T08:00:00Z ({e})"),
        )),
    }
}

fn non_empty(field: &str, value: String) -> Result<String, EnvelopeError> {
    if value.is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(value)
    }
}

fn non_null(value: Option<Value>) -> Option<Value> {
    value.filter(|v| !v.is_null())
}

/// An optional string field of a Change Event; `null` counts as absent.
fn optional_string(field: &str, value: Option<Value>) -> Result<Option<String>, EnvelopeError> {
    match non_null(value) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(
            field,
            format!("must be a string, found {}", kind(&other)),
        )),
    }
}

/// The largest `version` or `revision` accepted: 2^63 − 1, the largest integer the journal (and
/// most partner databases) store exactly. A larger one is refused with `invalid_field`.
pub const MAX_INTEGER: u64 = i64::MAX as u64;

/// A JSON integer from `min` to [`MAX_INTEGER`]. Floats, even `1.0`, and strings are refused.
fn json_integer(field: &str, value: &Value, min: u64) -> Result<u64, EnvelopeError> {
    let problem = || {
        format!(
            "must be an integer from {min} to {MAX_INTEGER}, found {}",
            kind(value)
        )
    };
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(v) if (min..=MAX_INTEGER).contains(&v) => Ok(v),
            Some(_) => Err(invalid(field, format!("{}; it is too large", problem()))),
            None => Err(invalid(field, problem())),
        },
        Value::String(s) if is_digits(s) => Err(invalid(
            field,
            format!("{}; write the number without quotes", problem()),
        )),
        _ => Err(invalid(field, problem())),
    }
}

/// A string of decimal digits (as CloudEvents attributes travel) from `min` to [`MAX_INTEGER`].
fn digits(field: &str, value: &str, min: u64) -> Result<u64, EnvelopeError> {
    let problem =
        || format!("must be a whole number from {min} to {MAX_INTEGER} written in decimal digits");
    if !is_digits(value) {
        return Err(invalid(field, problem()));
    }
    match value.parse::<u64>() {
        Ok(v) if (min..=MAX_INTEGER).contains(&v) => Ok(v),
        Ok(v) if v < min => Err(invalid(field, problem())),
        _ => Err(invalid(field, format!("{}; it is too large", problem()))),
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Describes a JSON value for an error message without echoing strings the sender chose.
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(_) => "a boolean".to_owned(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

// --- JSON and media types ---------------------------------------------------------------------

/// Refuses JSON text whose arrays and objects, `above` levels down in the event, nest deeper
/// than `max_depth`.
fn check_depth(json: &[u8], above: usize, max_depth: usize) -> Result<(), EnvelopeError> {
    let depth = nesting_depth(json).saturating_add(above);
    if depth > max_depth {
        return Err(EnvelopeError::TooDeep {
            depth,
            limit: max_depth,
        });
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in JSON text, read without parsing it (brackets in
/// strings do not count), in one pass and without recursion, whatever the input.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Parses the body as one JSON object whose member names are unique.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, EnvelopeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopLevel::deserialize(&mut de).map_err(|e| json_error(None, &e))?;
    de.end().map_err(|e| json_error(None, &e))?;
    top.0.map_err(|found| EnvelopeError::NotAnObject { found })
}

fn json_error(field: Option<&'static str>, e: &serde_json::Error) -> EnvelopeError {
    let (line, column) = (e.line(), e.column());
    // serde_json appends the position to its message; it is reported in fields of its own.
    let text = e.to_string();
    let message = text
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&text)
        .to_owned();
    EnvelopeError::InvalidJson {
        field,
        message,
        line,
        column,
    }
}

/// The top-level JSON value: an object with unique member names, or the kind of value it was.
struct TopLevel(Result<Map<String, Value>, &'static str>);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<TopLevel, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                return Err(de::Error::custom(format!(
                    "duplicate top-level member `{}`",
                    sanitise(&name)
                )));
            }
            let value: Value = access.next_value()?;
            map.insert(name, value);
        }
        Ok(TopLevel(Ok(map)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<TopLevel, A::Error> {
        while access.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TopLevel(Err("an array")))
    }

    fn visit_bool<E>(self, _: bool) -> Result<TopLevel, E> {
        Ok(TopLevel(Err("a boolean")))
    }

    fn visit_i64<E>(self, _: i64) -> Result<TopLevel, E> {
        Ok(TopLevel(Err("a number")))
    }

    fn visit_u64<E>(self, _: u64) -> Result<TopLevel, E> {
        Ok(TopLevel(Err("a number")))
    }

    fn visit_f64<E>(self, _: f64) -> Result<TopLevel, E> {
        Ok(TopLevel(Err("a number")))
    }

    fn visit_str<E>(self, _: &str) -> Result<TopLevel, E> {
        Ok(TopLevel(Err("a string")))
    }

    fn visit_unit<E>(self) -> Result<TopLevel, E> {
        Ok(TopLevel(Err("null")))
    }
}

/// A `Content-Type`: the lower-cased `type/subtype` and the charset parameter, if any.
struct MediaType {
    essence: String,
    charset: Option<String>,
}

impl MediaType {
    /// On failure, the (sanitised) header value, for the error message.
    fn parse(value: &HeaderValue) -> Result<MediaType, String> {
        let text = value
            .to_str()
            .map_err(|_| sanitise(&String::from_utf8_lossy(value.as_bytes())))?;
        let mut parts = text.split(';');
        let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let well_formed = essence
            .split_once('/')
            .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && !s.contains('/'));
        if !well_formed {
            return Err(sanitise(text));
        }
        let charset = parts.find_map(|p| {
            let (name, value) = p.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("charset")
                .then(|| value.trim().trim_matches('"').to_ascii_lowercase())
        });
        Ok(MediaType { essence, charset })
    }
}

fn found_media(media: Option<Result<MediaType, String>>) -> Option<String> {
    match media? {
        Ok(m) => Some(sanitise(&m.essence)),
        Err(raw) => Some(raw),
    }
}

/// Text from the request for an error message: printable ASCII only, and short.
fn sanitise(text: &str) -> String {
    const MAX: usize = 100;
    let mut out: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX)
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn json_headers() -> HeaderMap {
        h(&[("content-type", "application/json")])
    }

    fn ce_headers() -> HeaderMap {
        h(&[("content-type", "application/cloudevents+json")])
    }

    fn parse_json(body: &Value) -> Result<Envelope, EnvelopeError> {
        parse(&json_headers(), body.to_string().as_bytes())
    }

    fn minimal() -> Value {
        json!({"id": "evt-1", "version": 1, "payload": {"a": 1}})
    }

    fn with(mut base: Value, key: &str, value: Value) -> Value {
        base.as_object_mut().unwrap().insert(key.to_owned(), value);
        base
    }

    fn without(mut base: Value, key: &str) -> Value {
        base.as_object_mut().unwrap().shift_remove(key);
        base
    }

    #[track_caller]
    fn assert_invalid(result: Result<Envelope, EnvelopeError>, field: &str, fragment: &str) {
        let err = result.unwrap_err();
        assert_eq!(err.code(), "invalid_field", "{err}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.field(), Some(field), "{err}");
        let text = err.to_string();
        assert!(text.contains(field), "{text}");
        assert!(text.contains(fragment), "{text:?} lacks {fragment:?}");
    }

    #[track_caller]
    fn assert_missing(result: Result<Envelope, EnvelopeError>, field: &str) {
        let err = result.unwrap_err();
        assert_eq!(err.code(), "missing_field", "{err}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }

    // --- Change Event: happy paths ---------------------------------------------------------

    #[test]
    fn minimal_change_event_gets_defaults() {
        let env = parse_json(&minimal()).unwrap();
        assert_eq!(env.format, Format::ChangeEvent);
        assert_eq!(env.id, "evt-1");
        assert_eq!(env.version, 1);
        assert_eq!(env.event_type, "change");
        assert_eq!(env.subject, "evt-1");
        assert_eq!(env.revision, None);
        assert_eq!(env.source, None);
        assert_eq!(env.time, None);
        assert_eq!(
            Value::Object(env.document),
            json!({"id": "evt-1", "version": 1, "type": "change", "subject": "evt-1", "payload": {"a": 1}})
        );
    }

    #[test]
    fn full_change_event_keeps_unknown_fields_in_order() {
        let body = br#"{"zeta": 1, "payload": [1, 2], "time": "2026-11-22T08:00:00+01:00",
            "source": "hms-gov", "revision": 0, "subject": "RULE-COURT-DEADLINE",
            "type": "rule.updated", "version": 3, "id": "evt-2", "alpha": {"nested": true}}"#;
        let env = parse(&json_headers(), body).unwrap();
        assert_eq!(env.id, "evt-2");
        assert_eq!(env.version, 3);
        assert_eq!(env.event_type, "rule.updated");
        assert_eq!(env.subject, "RULE-COURT-DEADLINE");
        assert_eq!(env.revision, Some(0));
        assert_eq!(env.source.as_deref(), Some("hms-gov"));
        assert_eq!(env.time.as_deref(), Some("2026-11-22T08:00:00+01:00"));
        let keys: Vec<&str> = env.document.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id", "version", "type", "subject", "revision", "source", "time", "payload",
                "zeta", "alpha"
            ]
        );
        assert_eq!(env.document["alpha"], json!({"nested": true}));
        assert_eq!(env.document["payload"], json!([1, 2]));
    }

    #[test]
    fn null_payload_is_present() {
        let env = parse_json(&with(minimal(), "payload", Value::Null)).unwrap();
        assert_eq!(env.document["payload"], Value::Null);
    }

    #[test]
    fn null_optionals_count_as_absent() {
        let mut body = minimal();
        for key in ["type", "subject", "revision", "source", "time"] {
            body = with(body, key, Value::Null);
        }
        let env = parse_json(&body).unwrap();
        assert_eq!(env.event_type, "change");
        assert_eq!(env.subject, "evt-1");
        assert_eq!((env.revision, env.source, env.time), (None, None, None));
        assert!(!env.document.contains_key("revision"));
        assert!(!env.document.contains_key("source"));
        assert!(!env.document.contains_key("time"));
    }

    #[test]
    fn content_type_parameters_and_case() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            " application/json ; foo=bar",
        ] {
            let env = parse(
                &h(&[("content-type", ct)]),
                minimal().to_string().as_bytes(),
            );
            assert!(env.is_ok(), "{ct}: {env:?}");
        }
    }

    #[test]
    fn id_boundaries() {
        let max = "x".repeat(200);
        assert_eq!(
            parse_json(&with(minimal(), "id", json!(max))).unwrap().id,
            max
        );
        let printable: String = (0x20u8..=0x7e).map(char::from).collect();
        assert_eq!(
            parse_json(&with(minimal(), "id", json!(printable)))
                .unwrap()
                .id,
            printable
        );
        assert_eq!(
            parse_json(&with(minimal(), "id", json!("a"))).unwrap().id,
            "a"
        );
    }

    #[test]
    fn integer_boundaries() {
        let env = parse_json(&with(
            with(minimal(), "version", json!(MAX_INTEGER)),
            "revision",
            json!(MAX_INTEGER),
        ))
        .unwrap();
        assert_eq!(
            (env.version, env.revision),
            (MAX_INTEGER, Some(MAX_INTEGER))
        );
    }

    #[test]
    fn integers_beyond_the_journal_range_are_refused() {
        for field in ["version", "revision"] {
            for too_large in [json!(MAX_INTEGER + 1), json!(u64::MAX)] {
                assert_invalid(
                    parse_json(&with(minimal(), field, too_large)),
                    field,
                    "it is too large",
                );
            }
        }
        let body =
            br#"{"id":"b1","version":1,"subject":"S","revision":9223372036854775808,"payload":{}}"#;
        assert_invalid(parse(&json_headers(), body), "revision", "too large");
    }

    // --- Change Event: every rule -----------------------------------------------------------

    #[test]
    fn missing_required_fields() {
        assert_missing(parse_json(&without(minimal(), "id")), "id");
        assert_missing(parse_json(&without(minimal(), "version")), "version");
        assert_missing(parse_json(&without(minimal(), "payload")), "payload");
        let err = parse(&json_headers(), b"{}").unwrap_err();
        assert_eq!(err.field(), Some("id"));
        assert!(
            err.to_string()
                .starts_with("missing field `id`: expected a string of 1 to 200"),
            "{err}"
        );
    }

    #[test]
    fn id_must_be_a_printable_ascii_string_of_1_to_200() {
        for bad in [
            json!(5),
            json!(null),
            json!(true),
            json!(["a"]),
            json!({"a": 1}),
        ] {
            assert_invalid(
                parse_json(&with(minimal(), "id", bad)),
                "id",
                "must be a string",
            );
        }
        assert_invalid(
            parse_json(&with(minimal(), "id", json!(""))),
            "id",
            "must not be empty",
        );
        assert_invalid(
            parse_json(&with(minimal(), "id", json!("x".repeat(201)))),
            "id",
            "201 characters",
        );
        assert_invalid(
            parse_json(&with(minimal(), "id", json!("caf\u{e9}"))),
            "id",
            "U+00E9 at position 4",
        );
        assert_invalid(
            parse_json(&with(minimal(), "id", json!("a\tb"))),
            "id",
            "U+0009",
        );
        assert_invalid(
            parse_json(&with(minimal(), "id", json!("a\u{7f}"))),
            "id",
            "printable ASCII",
        );
        // A long non-ASCII id names the character, not the length.
        assert_invalid(
            parse_json(&with(minimal(), "id", json!("\u{e9}".repeat(150)))),
            "id",
            "printable ASCII",
        );
    }

    #[test]
    fn version_must_be_an_integer_of_at_least_1() {
        for (bad, found) in [
            (json!(1.5), "the number 1.5"),
            (json!(1.0), "the number 1.0"),
            (json!("1"), "without quotes"),
            (json!("one"), "a string"),
            (json!(0), "the number 0"),
            (json!(-1), "the number -1"),
            (json!(null), "null"),
            (json!(true), "a boolean"),
            (json!([1]), "an array"),
        ] {
            assert_invalid(
                parse_json(&with(minimal(), "version", bad)),
                "version",
                found,
            );
        }
        // Beyond u64: serde_json reads it as a float.
        let body = br#"{"id":"e","version":18446744073709551616,"payload":1}"#;
        assert_invalid(
            parse(&json_headers(), body),
            "version",
            "must be an integer from 1 to",
        );
        let body = br#"{"id":"e","version":1e0,"payload":1}"#;
        assert_invalid(
            parse(&json_headers(), body),
            "version",
            "must be an integer from 1 to",
        );
    }

    #[test]
    fn revision_must_be_an_integer_of_at_least_0() {
        for bad in [json!(-1), json!(0.5), json!("3"), json!(false), json!({})] {
            assert_invalid(
                parse_json(&with(minimal(), "revision", bad)),
                "revision",
                "must be an integer from 0 to",
            );
        }
    }

    #[test]
    fn optional_strings_must_be_strings() {
        for field in ["type", "subject", "source", "time"] {
            for bad in [json!(1), json!(true), json!([]), json!({})] {
                assert_invalid(
                    parse_json(&with(minimal(), field, bad)),
                    field,
                    "must be a string",
                );
            }
        }
    }

    #[test]
    fn time_must_be_rfc3339() {
        for good in [
            "2026-11-22T08:00:00Z",
            "2026-11-22T08:00:00.123456+05:30",
            "2026-11-22t08:00:00z",
        ] {
            assert!(
                parse_json(&with(minimal(), "time", json!(good))).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "2026-11-22",
            "2026-11-22 08:00:00",
            "2026-11-22T08:00:00",
            "22/11/2026",
            "2026-13-22T08:00:00Z",
            "",
            "1763798400",
        ] {
            assert_invalid(
                parse_json(&with(minimal(), "time", json!(bad))),
                "time",
                "RFC 3339",
            );
        }
    }

    #[test]
    fn explicit_type_and_subject() {
        let env = parse_json(&with(
            with(minimal(), "type", json!("PolicyUpdated")),
            "subject",
            json!("S"),
        ))
        .unwrap();
        assert_eq!(env.event_type, "PolicyUpdated");
        assert_eq!(env.subject, "S");
        assert_eq!(env.document["type"], "PolicyUpdated");
        assert_eq!(env.document["subject"], "S");
    }

    #[test]
    fn body_must_be_a_json_object() {
        for (body, found) in [
            ("[1,2]", "an array"),
            ("\"text\"", "a string"),
            ("42", "a number"),
            ("-1.5", "a number"),
            ("true", "a boolean"),
            ("null", "null"),
            (" [ {\"id\": 1} ] ", "an array"),
        ] {
            let err = parse(&json_headers(), body.as_bytes()).unwrap_err();
            assert_eq!(err, EnvelopeError::NotAnObject { found }, "{body}");
            assert_eq!(err.code(), "not_an_object");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
            assert!(err.to_string().contains("JSON object"));
        }
    }

    #[test]
    fn invalid_json_reports_line_and_column() {
        let err = parse(
            &json_headers(),
            b"{\n  \"id\": \"e\",\n  \"version\": 1,,\n}",
        )
        .unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let EnvelopeError::InvalidJson {
            line,
            column,
            ref message,
            field,
        } = err
        else {
            panic!("{err:?}");
        };
        assert_eq!((line, column), (3, 16));
        assert_eq!(field, None);
        assert!(!message.contains("at line"), "{message}");
        let text = err.to_string();
        assert!(text.contains("line 3 column 16"), "{text}");
        assert!(text.starts_with("the body is not valid JSON"), "{text}");
    }

    #[test]
    fn duplicate_top_level_members_are_refused() {
        let body = br#"{"id":"a","version":1,"payload":1,"id":"b"}"#;
        let err = parse(&json_headers(), body).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(
            err.to_string().contains("duplicate top-level member `id`"),
            "{err}"
        );
        // Nested duplicates are the payload's business.
        let body = br#"{"id":"a","version":1,"payload":{"x":1,"x":2}}"#;
        assert!(parse(&json_headers(), body).is_ok());
    }

    #[test]
    fn trailing_content_is_invalid_json() {
        let body = format!("{} {{}}", minimal());
        let err = parse(&json_headers(), body.as_bytes()).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        // Trailing whitespace is fine.
        let body = format!("{}\r\n\t ", minimal());
        assert!(parse(&json_headers(), body.as_bytes()).is_ok());
    }

    #[test]
    fn unsupported_content_types() {
        let body = minimal().to_string();
        for (headers, found) in [
            (HeaderMap::new(), None),
            (h(&[("content-type", "text/plain")]), Some("text/plain")),
            (
                h(&[("content-type", "application/xml; charset=utf-8")]),
                Some("application/xml"),
            ),
            (
                h(&[("content-type", "application/jsonx")]),
                Some("application/jsonx"),
            ),
            (
                h(&[("content-type", "application/cloudevents-batch+json")]),
                Some("application/cloudevents-batch+json"),
            ),
            (h(&[("content-type", "json")]), Some("json")),
            (h(&[("content-type", "")]), Some("")),
        ] {
            let err = parse(&headers, body.as_bytes()).unwrap_err();
            assert_eq!(err.code(), "unsupported_media_type", "{found:?}");
            assert_eq!(err.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert_eq!(err.field(), None);
            let text = err.to_string();
            assert!(text.contains("application/json"), "{text}");
            assert!(text.contains("application/cloudevents+json"), "{text}");
            if let Some(found) = found {
                assert!(text.contains(&format!("`{found}`")), "{text}");
            } else {
                assert!(text.contains("no usable Content-Type"), "{text}");
            }
        }
        let mut odd = HeaderMap::new();
        odd.insert(
            CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/j\xffson").unwrap(),
        );
        let err = parse(&odd, body.as_bytes()).unwrap_err();
        assert_eq!(err.code(), "unsupported_media_type");
        assert!(err.to_string().contains("application/j?son"), "{err}");
    }

    // --- CloudEvents, structured mode --------------------------------------------------------

    fn ce_minimal() -> Value {
        json!({"specversion": "1.0", "id": "ce-1", "source": "hms-gov", "type": "rule.updated", "data": {"x": 1}})
    }

    fn parse_ce(body: &Value) -> Result<Envelope, EnvelopeError> {
        parse(&ce_headers(), body.to_string().as_bytes())
    }

    #[test]
    fn structured_minimal_is_mapped() {
        let env = parse_ce(&ce_minimal()).unwrap();
        assert_eq!(env.format, Format::CloudEventStructured);
        assert_eq!(env.id, "ce-1");
        assert_eq!(env.version, 1);
        assert_eq!(env.event_type, "rule.updated");
        assert_eq!(env.subject, "ce-1");
        assert_eq!(env.source.as_deref(), Some("hms-gov"));
        assert_eq!(env.revision, None);
        assert_eq!(
            Value::Object(env.document),
            json!({"id": "ce-1", "version": 1, "type": "rule.updated", "subject": "ce-1",
                   "source": "hms-gov", "payload": {"x": 1}, "specversion": "1.0"})
        );
    }

    #[test]
    fn structured_full_is_mapped_and_keeps_other_attributes() {
        let body = json!({
            "specversion": "1.0", "id": "ce-2", "source": "/hub/a", "type": "PolicyUpdated",
            "subject": "POL-7", "time": "2026-11-22T08:00:00Z", "datacontenttype": "application/json",
            "dataschema": "https://example.org/s", "dataversion": 3, "revision": "12",
            "traceparent": "00-abc", "partitionkey": 5, "data": null
        });
        let env = parse(
            &h(&[(
                "content-type",
                "application/cloudevents+json; charset=UTF-8",
            )]),
            body.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(env.version, 3);
        assert_eq!(env.revision, Some(12));
        assert_eq!(env.subject, "POL-7");
        assert_eq!(env.time.as_deref(), Some("2026-11-22T08:00:00Z"));
        let keys: Vec<&str> = env.document.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id",
                "version",
                "type",
                "subject",
                "revision",
                "source",
                "time",
                "payload",
                "specversion",
                "datacontenttype",
                "dataschema",
                "traceparent",
                "partitionkey"
            ]
        );
        assert_eq!(env.document["payload"], Value::Null);
        assert_eq!(env.document["partitionkey"], json!(5));
        assert!(!env.document.contains_key("dataversion"));
        assert!(!env.document.contains_key("data"));
    }

    #[test]
    fn structured_dataversion_as_integer_or_digit_string() {
        for (v, expected) in [(json!(2), 2), (json!("7"), 7), (json!(null), 1)] {
            let env = parse_ce(&with(ce_minimal(), "dataversion", v)).unwrap();
            assert_eq!(env.version, expected);
            assert_eq!(env.document["version"], json!(expected));
        }
        for bad in [
            json!(0),
            json!("0"),
            json!(1.5),
            json!("1.5"),
            json!("-1"),
            json!(""),
            json!(true),
            json!("x"),
        ] {
            assert_invalid(
                parse_ce(&with(ce_minimal(), "dataversion", bad)),
                "dataversion",
                "from 1 to",
            );
        }
        assert_invalid(
            parse_ce(&with(
                ce_minimal(),
                "dataversion",
                json!("99999999999999999999999"),
            )),
            "dataversion",
            "too large",
        );
        for too_large in [json!(9223372036854775808u64), json!("9223372036854775808")] {
            assert_invalid(
                parse_ce(&with(ce_minimal(), "dataversion", too_large.clone())),
                "dataversion",
                "too large",
            );
            assert_invalid(
                parse_ce(&with(ce_minimal(), "revision", too_large)),
                "revision",
                "too large",
            );
        }
    }

    #[test]
    fn structured_revision_as_integer_or_digit_string() {
        assert_eq!(
            parse_ce(&with(ce_minimal(), "revision", json!(0)))
                .unwrap()
                .revision,
            Some(0)
        );
        assert_eq!(
            parse_ce(&with(ce_minimal(), "revision", json!("4")))
                .unwrap()
                .revision,
            Some(4)
        );
        for bad in [json!(-1), json!("-1"), json!(2.5), json!([])] {
            assert_invalid(
                parse_ce(&with(ce_minimal(), "revision", bad)),
                "revision",
                "from 0 to",
            );
        }
    }

    #[test]
    fn structured_missing_required_attributes() {
        for field in ["specversion", "id", "source", "type"] {
            assert_missing(parse_ce(&without(ce_minimal(), field)), field);
            // Null is absent in the CloudEvents JSON format.
            assert_missing(parse_ce(&with(ce_minimal(), field, Value::Null)), field);
        }
        assert_missing(parse_ce(&without(ce_minimal(), "data")), "data");
    }

    #[test]
    fn structured_mistyped_attributes() {
        for field in ["id", "source", "type", "subject", "time"] {
            assert_invalid(
                parse_ce(&with(ce_minimal(), field, json!(1))),
                field,
                "must be a string",
            );
        }
        for field in ["id", "source", "type", "subject"] {
            assert_invalid(
                parse_ce(&with(ce_minimal(), field, json!(""))),
                field,
                "must not be empty",
            );
        }
        assert_invalid(
            parse_ce(&with(ce_minimal(), "specversion", json!("0.3"))),
            "specversion",
            "\"1.0\"",
        );
        assert_invalid(
            parse_ce(&with(ce_minimal(), "specversion", json!(1.0))),
            "specversion",
            "\"1.0\"",
        );
        assert_invalid(
            parse_ce(&with(ce_minimal(), "time", json!("yesterday"))),
            "time",
            "RFC 3339",
        );
        assert_invalid(
            parse_ce(&with(ce_minimal(), "id", json!("x".repeat(201)))),
            "id",
            "at most 200",
        );
    }

    #[test]
    fn structured_data_base64_becomes_the_payload_string() {
        let body = with(
            without(ce_minimal(), "data"),
            "data_base64",
            json!("aGVsbG8="),
        );
        let body = with(body, "datacontenttype", json!("application/octet-stream"));
        let env = parse_ce(&body).unwrap();
        assert_eq!(env.document["payload"], json!("aGVsbG8="));
        assert_eq!(
            env.document["datacontenttype"],
            json!("application/octet-stream")
        );
        assert!(!env.document.contains_key("data_base64"));

        assert_invalid(
            parse_ce(&with(ce_minimal(), "data_base64", json!("aGVsbG8="))),
            "data_base64",
            "together",
        );
        let bad = with(
            without(ce_minimal(), "data"),
            "data_base64",
            json!("not base64!"),
        );
        assert_invalid(parse_ce(&bad), "data_base64", "not valid base64");
        let bad = with(without(ce_minimal(), "data"), "data_base64", json!(12));
        assert_invalid(parse_ce(&bad), "data_base64", "base64 string");
    }

    #[test]
    fn structured_reserved_extension_names() {
        assert_invalid(
            parse_ce(&with(ce_minimal(), "version", json!(2))),
            "version",
            "dataversion",
        );
        assert_invalid(
            parse_ce(&with(ce_minimal(), "payload", json!(2))),
            "payload",
            "`data`",
        );
    }

    #[test]
    fn structured_ignores_ce_headers() {
        let mut headers = ce_headers();
        headers.insert("ce-specversion", HeaderValue::from_static("1.0"));
        headers.insert("ce-id", HeaderValue::from_static("from-header"));
        let env = parse(&headers, ce_minimal().to_string().as_bytes()).unwrap();
        assert_eq!(env.format, Format::CloudEventStructured);
        assert_eq!(env.id, "ce-1");
    }

    #[test]
    fn structured_body_must_be_an_object() {
        let err = parse(&ce_headers(), b"[]").unwrap_err();
        assert_eq!(err.code(), "not_an_object");
        let err = parse(&ce_headers(), b"{\"id\":").unwrap_err();
        assert_eq!(err.code(), "invalid_json");
    }

    // --- CloudEvents, binary mode ------------------------------------------------------------

    fn binary_headers(extra: &[(&str, &str)]) -> HeaderMap {
        let mut headers = h(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "bin-1"),
            ("ce-source", "hms-gov"),
            ("ce-type", "rule.updated"),
        ]);
        for (name, value) in extra {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn binary_json(extra: &[(&str, &str)]) -> HeaderMap {
        let mut headers = binary_headers(extra);
        headers
            .entry(CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
        headers
    }

    #[test]
    fn binary_minimal_is_mapped() {
        let env = parse(&binary_json(&[]), br#"{"x": 1}"#).unwrap();
        assert_eq!(env.format, Format::CloudEventBinary);
        assert_eq!(env.id, "bin-1");
        assert_eq!(env.version, 1);
        assert_eq!(env.event_type, "rule.updated");
        assert_eq!(env.subject, "bin-1");
        assert_eq!(env.source.as_deref(), Some("hms-gov"));
        assert_eq!(
            Value::Object(env.document),
            json!({"id": "bin-1", "version": 1, "type": "rule.updated", "subject": "bin-1",
                   "source": "hms-gov", "payload": {"x": 1}, "specversion": "1.0",
                   "datacontenttype": "application/json"})
        );
    }

    #[test]
    fn binary_full_is_mapped_and_keeps_extensions() {
        let headers = binary_json(&[
            ("ce-subject", "RULE%20COURT"),
            ("ce-time", "2026-11-22T08:00:00Z"),
            ("ce-dataversion", "2"),
            ("ce-revision", "0"),
            ("ce-traceparent", "00-abc"),
            ("ce-note", "caf%C3%A9 100%"),
            ("x-other", "not an attribute"),
            (
                "content-type",
                "application/vnd.hms.rule+json; charset=utf-8",
            ),
        ]);
        let env = parse(&headers, b"[1, 2]").unwrap();
        assert_eq!(env.version, 2);
        assert_eq!(env.revision, Some(0));
        assert_eq!(env.subject, "RULE COURT");
        assert_eq!(env.time.as_deref(), Some("2026-11-22T08:00:00Z"));
        assert_eq!(env.document["payload"], json!([1, 2]));
        assert_eq!(env.document["traceparent"], json!("00-abc"));
        assert_eq!(env.document["note"], json!("caf\u{e9} 100%"));
        assert_eq!(
            env.document["datacontenttype"],
            json!("application/vnd.hms.rule+json; charset=utf-8")
        );
        assert!(!env.document.contains_key("x-other"));
        assert!(!env.document.contains_key("dataversion"));
        assert_eq!(env.document["revision"], json!(0));
        let keys: Vec<&str> = env.document.keys().take(9).map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id",
                "version",
                "type",
                "subject",
                "revision",
                "source",
                "time",
                "payload",
                "specversion"
            ]
        );
    }

    #[test]
    fn binary_mode_is_chosen_by_ce_specversion_whatever_the_content_type() {
        let env = parse(&binary_headers(&[("content-type", "text/plain")]), b"hello").unwrap();
        assert_eq!(env.format, Format::CloudEventBinary);
        assert_eq!(env.document["payload"], json!("hello"));
        let env = parse(
            &binary_headers(&[("content-type", "text/csv; charset=UTF-8")]),
            b"a,b",
        )
        .unwrap();
        assert_eq!(env.document["payload"], json!("a,b"));
    }

    #[test]
    fn binary_data_content_types() {
        let err = parse(
            &binary_headers(&[("content-type", "application/octet-stream")]),
            b"\x00\x01",
        )
        .unwrap_err();
        assert_eq!(err.code(), "unsupported_media_type");
        assert_eq!(err.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(
            err.to_string().contains("`application/octet-stream`"),
            "{err}"
        );
        assert!(err.to_string().contains("text/*"), "{err}");

        let err = parse(&binary_headers(&[]), b"{}").unwrap_err();
        assert_eq!(err.code(), "unsupported_media_type");

        let err = parse(
            &binary_headers(&[("content-type", "text/plain; charset=iso-8859-1")]),
            b"x",
        )
        .unwrap_err();
        assert_eq!(err.code(), "unsupported_media_type");
        assert!(err.to_string().contains("iso-8859-1"), "{err}");

        assert_invalid(
            parse(
                &binary_headers(&[("content-type", "text/plain")]),
                b"ab\xffcd",
            ),
            "data",
            "offset 2",
        );

        let err = parse(&binary_json(&[]), b"{\"x\":").unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert_eq!(err.field(), Some("data"));
        assert!(err.to_string().contains("`data`"), "{err}");

        // No body and no content type: the event has no data.
        assert_missing(parse(&binary_headers(&[]), b""), "data");
        // JSON data may be any value, not only an object.
        assert_eq!(
            parse(&binary_json(&[]), b"null").unwrap().document["payload"],
            Value::Null
        );
        assert_eq!(
            parse(&binary_json(&[]), b" \"s\" ").unwrap().document["payload"],
            json!("s")
        );
    }

    #[test]
    fn binary_missing_required_headers() {
        for name in ["ce-id", "ce-source", "ce-type"] {
            let mut headers = binary_json(&[]);
            headers.remove(name);
            assert_missing(parse(&headers, b"{}"), name);
        }
        let mut headers = binary_json(&[]);
        headers.remove("ce-source");
        let err = parse(&headers, b"{}").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "missing header `ce-source`: expected the CloudEvents `source` attribute"
            ),
            "{err}"
        );
        let err = parse(&binary_json(&[("ce-time", "now")]), b"{}").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("header `ce-time` must be an RFC 3339"),
            "{err}"
        );
    }

    #[test]
    fn binary_invalid_headers() {
        for (name, value, fragment) in [
            ("ce-specversion", "0.3", "\"1.0\""),
            ("ce-id", "", "must not be empty"),
            ("ce-id", "caf%C3%A9", "U+00E9"),
            ("ce-source", "", "must not be empty"),
            ("ce-type", "", "must not be empty"),
            ("ce-subject", "", "must not be empty"),
            ("ce-time", "now", "RFC 3339"),
            ("ce-dataversion", "0", "from 1 to"),
            ("ce-dataversion", "1.5", "from 1 to"),
            ("ce-dataversion", "-2", "from 1 to"),
            ("ce-dataversion", "9223372036854775808", "too large"),
            ("ce-revision", "x", "from 0 to"),
            ("ce-revision", "9223372036854775808", "too large"),
            ("ce-revision", "99999999999999999999", "too large"),
            ("ce-version", "2", "dataversion"),
            ("ce-payload", "2", "`data`"),
            ("ce-note", "%FF", "UTF-8"),
        ] {
            assert_invalid(parse(&binary_json(&[(name, value)]), b"{}"), name, fragment);
        }
        let long = "y".repeat(201);
        assert_invalid(
            parse(&binary_json(&[("ce-id", &long)]), b"{}"),
            "ce-id",
            "at most 200",
        );
    }

    #[test]
    fn binary_repeated_header_is_refused() {
        let mut headers = binary_json(&[]);
        headers.append("ce-id", HeaderValue::from_static("bin-2"));
        assert_invalid(parse(&headers, b"{}"), "ce-id", "more than once");
    }

    #[test]
    fn binary_non_ascii_header_bytes() {
        let mut headers = binary_json(&[]);
        headers.insert(
            "ce-note",
            HeaderValue::from_bytes("\u{e9}t\u{e9}".as_bytes()).unwrap(),
        );
        let env = parse(&headers, b"{}").unwrap();
        assert_eq!(env.document["note"], json!("\u{e9}t\u{e9}"));
        headers.insert("ce-note", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_invalid(parse(&headers, b"{}"), "ce-note", "UTF-8");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"a%20b"), b"a b");
        assert_eq!(percent_decode(b"%"), b"%");
        assert_eq!(percent_decode(b"%2"), b"%2");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%e2%82%AC"), "\u{20ac}".as_bytes());
    }

    #[test]
    fn format_names() {
        assert_eq!(Format::ChangeEvent.as_str(), "change_event");
        assert_eq!(
            Format::CloudEventStructured.to_string(),
            "cloudevent_structured"
        );
        assert_eq!(Format::CloudEventBinary.as_str(), "cloudevent_binary");
    }

    // --- robustness ------------------------------------------------------------------------

    fn all_content_types() -> Vec<HeaderMap> {
        vec![
            json_headers(),
            ce_headers(),
            binary_json(&[]),
            binary_headers(&[("content-type", "text/plain")]),
            HeaderMap::new(),
        ]
    }

    #[test]
    fn every_prefix_of_valid_bodies_is_handled() {
        let bodies = [
            json!({"id": "evt-\u{e9}", "version": 2, "type": "t", "subject": "s", "revision": 3,
                   "source": "src", "time": "2026-11-22T08:00:00Z", "payload": {"deep": [1, {"a": null}]}})
            .to_string(),
            ce_minimal().to_string(),
            "{\"a\":\"\\ud800\"}".to_owned(),
        ];
        for headers in all_content_types() {
            for body in &bodies {
                let bytes = body.as_bytes();
                for end in 0..=bytes.len() {
                    let prefix = bytes.get(..end).unwrap();
                    let _ = parse(&headers, prefix);
                    if end < bytes.len() && headers == json_headers() {
                        assert!(parse(&headers, prefix).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn odd_bodies_do_not_panic() {
        let deep_array = "[".repeat(100_000);
        let deep_object = "{\"a\":".repeat(100_000);
        let odd: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\xef\xbb\xbf{}".to_vec(),
            b"\xff\xfe\x00".to_vec(),
            b"{\"id\":\"\x00\"}".to_vec(),
            b"{\"id\":\"a\\u0000\",\"version\":1,\"payload\":1}".to_vec(),
            b"{\"\":1,\"version\":1e400}".to_vec(),
            b"{\"version\":-0,\"id\":\"x\",\"payload\":1}".to_vec(),
            b"{\"version\":123456789012345678901234567890,\"id\":\"x\",\"payload\":1}".to_vec(),
            deep_array.into_bytes(),
            deep_object.into_bytes(),
            vec![b'{'; 10_000],
            (0u8..=255).collect(),
        ];
        for headers in all_content_types() {
            for body in &odd {
                let result = parse(&headers, body);
                if let Err(e) = result {
                    // Every error renders and classifies.
                    assert!(!e.to_string().is_empty());
                    assert!(!e.code().is_empty());
                    let _ = (e.status(), e.field());
                }
            }
        }
        let err = parse(&json_headers(), "[".repeat(100_000).as_bytes()).unwrap_err();
        assert_eq!(err.code(), "too_deep");
    }

    /// A Change Event whose object and payload nest `depth` levels in all.
    fn nested_event(depth: usize) -> String {
        let inner = depth - 1;
        format!(
            "{{\"id\":\"deep\",\"version\":1,\"payload\":{}{}}}",
            "[".repeat(inner),
            "]".repeat(inner)
        )
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted_and_deeper_is_refused_as_too_deep() {
        let at_limit = parse(&json_headers(), nested_event(DEFAULT_MAX_DEPTH).as_bytes()).unwrap();
        assert_eq!(at_limit.id, "deep");
        let err = parse(
            &json_headers(),
            nested_event(DEFAULT_MAX_DEPTH + 1).as_bytes(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::TooDeep {
                depth: DEFAULT_MAX_DEPTH + 1,
                limit: DEFAULT_MAX_DEPTH
            }
        );
        assert_eq!(err.code(), "too_deep");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let message = err.to_string();
        assert!(message.contains("65 levels deep"), "{message}");
        assert!(message.contains("limit of 64"), "{message}");
        assert!(message.contains("limits.max_json_depth"), "{message}");
    }

    #[test]
    fn valid_json_deeper_than_the_parser_allows_is_too_deep_not_invalid() {
        // 200 levels is valid JSON; it used to be refused as "not valid JSON".
        for limit in [DEFAULT_MAX_DEPTH, MAX_DEPTH_LIMIT] {
            let err =
                parse_limited(&json_headers(), nested_event(200).as_bytes(), limit).unwrap_err();
            assert_eq!(err, EnvelopeError::TooDeep { depth: 200, limit });
        }
        // The highest limit that can be configured is parsed in full.
        let deepest = parse_limited(
            &json_headers(),
            nested_event(MAX_DEPTH_LIMIT).as_bytes(),
            MAX_DEPTH_LIMIT,
        )
        .unwrap();
        assert_eq!(deepest.id, "deep");
    }

    #[test]
    fn brackets_in_strings_do_not_count_towards_the_depth() {
        let body = format!(
            "{{\"id\":\"s\",\"version\":1,\"payload\":\"{}\\\"{}\"}}",
            "[{".repeat(500),
            "{[".repeat(500)
        );
        let parsed = parse_limited(&json_headers(), body.as_bytes(), 2).unwrap();
        assert_eq!(parsed.id, "s");
    }

    #[test]
    fn binary_mode_data_counts_one_level_below_the_envelope() {
        let headers = binary_json(&[]);
        // Data two levels deep is the payload at levels 2 and 3.
        assert!(parse_limited(&headers, b"{\"a\":[1]}", 3).is_ok());
        assert_eq!(
            parse_limited(&headers, b"{\"a\":[1]}", 2).unwrap_err(),
            EnvelopeError::TooDeep { depth: 3, limit: 2 }
        );
        // Structured mode: the body is the envelope.
        let ce = br#"{"specversion":"1.0","id":"c","source":"s","type":"t","data":{"a":[1]}}"#;
        assert!(parse_limited(&ce_headers(), ce, 3).is_ok());
        assert!(matches!(
            parse_limited(&ce_headers(), ce, 2),
            Err(EnvelopeError::TooDeep { depth: 3, limit: 2 })
        ));
    }

    #[test]
    fn error_messages_do_not_echo_long_input() {
        let key = "k".repeat(10_000);
        let body = format!("{{\"{key}\":1,\"{key}\":2}}");
        let err = parse(&json_headers(), body.as_bytes()).unwrap_err();
        assert!(err.to_string().len() < 400, "{}", err.to_string().len());
        let ct = format!("application/{}", "x".repeat(10_000));
        let err = parse(&h(&[("content-type", &ct)]), b"{}").unwrap_err();
        assert!(err.to_string().len() < 400);
    }
}
