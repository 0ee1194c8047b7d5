//! Name templates (file names, remote paths, MQTT topics): `{placeholder}` over event fields and
//! output fields.
//!
//! A template is literal text with placeholders in braces, parsed once when the configuration is
//! loaded so that a typo is a configuration problem, not a dead letter:
//!
//! | placeholder | value |
//! |---|---|
//! | `{id}` `{type}` `{version}` `{subject}` `{partner}` `{route}` | the event's fields ([`EventMeta`]) |
//! | `{revision}` `{source}` | optional event fields: rendering fails when the event has none |
//! | `{index}` | the record's position when the output is an array, 0 otherwise |
//! | `{date}` `{hour}` | the UTC date (`2026-12-07`) and hour (`00`–`23`) at which the agent received the event: the same on every attempt, so a retry after midnight renders the name the first attempt rendered |
//! | `{output.a.b}` | a field of the record, by dotted path; a segment that is a number indexes an array |
//!
//! Output fields that are strings are inserted as they are; numbers and booleans as their JSON
//! text. Null, objects, arrays and missing fields fail the rendering, naming the field, because
//! a name silently rendered as `null` or `{"a":1}` would put files where nobody looks for them.
//! `{{` and `}}` stand for literal braces.
//!
//! Rendering does not sanitize values: a subject of `../x` renders as `../x`. Sinks that turn the
//! result into a path check it with [`safe_relative_path`] before touching anything.

use std::fmt;

use serde_json::Value;

use super::EventMeta;

/// One placeholder of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    Id,
    Type,
    Version,
    Subject,
    Revision,
    Source,
    Partner,
    Route,
    Index,
    Date,
    Hour,
    /// `{output.a.b}`: the path segments after `output`, never empty.
    Output(Vec<String>),
}

impl Placeholder {
    fn parse(name: &str) -> Option<Placeholder> {
        Some(match name {
            "id" => Placeholder::Id,
            "type" => Placeholder::Type,
            "version" => Placeholder::Version,
            "subject" => Placeholder::Subject,
            "revision" => Placeholder::Revision,
            "source" => Placeholder::Source,
            "partner" => Placeholder::Partner,
            "route" => Placeholder::Route,
            "index" => Placeholder::Index,
            "date" => Placeholder::Date,
            "hour" => Placeholder::Hour,
            _ => {
                let path = name.strip_prefix("output.")?;
                let segments: Vec<String> = path.split('.').map(str::to_string).collect();
                if segments.iter().any(String::is_empty) {
                    return None;
                }
                Placeholder::Output(segments)
            }
        })
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Placeholder::Id => "id",
            Placeholder::Type => "type",
            Placeholder::Version => "version",
            Placeholder::Subject => "subject",
            Placeholder::Revision => "revision",
            Placeholder::Source => "source",
            Placeholder::Partner => "partner",
            Placeholder::Route => "route",
            Placeholder::Index => "index",
            Placeholder::Date => "date",
            Placeholder::Hour => "hour",
            Placeholder::Output(path) => return write!(f, "{{output.{}}}", path.join(".")),
        };
        write!(f, "{{{name}}}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(Placeholder),
}

/// A parsed name template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

const KNOWN: &str = "{id}, {type}, {version}, {subject}, {revision}, {source}, {partner}, \
                     {route}, {index}, {date}, {hour} or {output.<field>}";

impl Template {
    /// Parses a template. Errors name the offending placeholder or the byte offset of a stray
    /// brace.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|&(_, n)| n == '{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().is_some_and(|&(_, n)| n == '}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "stray }} at byte {at} of {text:?}: write }}}} for a literal brace"
                    ));
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let Some(end) = rest
                        .find(['{', '}'])
                        .filter(|&i| rest[i..].starts_with('}'))
                    else {
                        return Err(format!(
                            "unclosed {{ at byte {at} of {text:?}: close the placeholder with }} \
                             or write {{{{ for a literal brace"
                        ));
                    };
                    let name = &rest[..end];
                    let placeholder = Placeholder::parse(name).ok_or_else(|| {
                        if name.is_empty() {
                            format!("empty placeholder {{}} in {text:?}: use one of {KNOWN}")
                        } else {
                            format!(
                                "unknown placeholder {{{name}}} in {text:?}: use one of {KNOWN}"
                            )
                        }
                    })?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(placeholder));
                    // Skip the name and the closing brace; both are ASCII-delimited.
                    while chars.next_if(|&(i, _)| i <= at + 1 + end).is_some() {}
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            text: text.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The placeholders, in order of appearance.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(p) => Some(p),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template for one record of an event's output. `index` is the record's
    /// position in the output array (0 when the output is not an array).
    pub fn render(
        &self,
        event: &EventMeta,
        record: &Value,
        index: usize,
    ) -> Result<String, String> {
        self.render_with(|placeholder| value_of(placeholder, event, record, index))
    }

    /// Renders the template with values from `value`, e.g. a stand-in for every placeholder to
    /// check the literal parts at configuration time.
    pub fn render_with(
        &self,
        mut value: impl FnMut(&Placeholder) -> Result<String, String>,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(self.text.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p) => out.push_str(&value(p)?),
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn value_of(
    placeholder: &Placeholder,
    event: &EventMeta,
    record: &Value,
    index: usize,
) -> Result<String, String> {
    Ok(match placeholder {
        Placeholder::Id => event.id.clone(),
        Placeholder::Type => event.event_type.clone(),
        Placeholder::Version => event.version.to_string(),
        Placeholder::Subject => event.subject.clone(),
        Placeholder::Revision => match event.revision {
            Some(r) => r.to_string(),
            None => {
                return Err(
                    "the event has no revision, which {revision} needs: remove it from the \
                     template or have the hub send revisions"
                        .into(),
                );
            }
        },
        Placeholder::Source => match &event.source {
            Some(s) => s.clone(),
            None => {
                return Err(
                    "the event has no source, which {source} needs: remove it from the template \
                     or have the hub send sources"
                        .into(),
                );
            }
        },
        Placeholder::Partner => event.partner.clone(),
        Placeholder::Route => event.route.clone(),
        Placeholder::Index => index.to_string(),
        Placeholder::Date => {
            let (y, m, d, _) = utc_parts(event.received_at_ms);
            format!("{y:04}-{m:02}-{d:02}")
        }
        Placeholder::Hour => format!("{:02}", utc_parts(event.received_at_ms).3),
        Placeholder::Output(path) => output_field(placeholder, path, record)?,
    })
}

/// The UTC year, month, day and hour of a time in milliseconds since the epoch. A time outside
/// what a date can show (never the case for a journaled event) counts as the epoch.
fn utc_parts(ms: i64) -> (i32, u8, u8, u8) {
    let at = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (at.year(), u8::from(at.month()), at.day(), at.hour())
}

fn output_field(
    placeholder: &Placeholder,
    path: &[String],
    record: &Value,
) -> Result<String, String> {
    let mut value = record;
    for segment in path {
        let next = match value {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        value = next.ok_or_else(|| {
            format!(
                "the output has no field {placeholder}: make the adapter produce it or change \
                 the template"
            )
        })?;
    }
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Err(format!(
            "the output field {placeholder} is null: make the adapter produce a string or number"
        )),
        Value::Object(_) | Value::Array(_) => Err(format!(
            "the output field {placeholder} is {}, not a string or number: point the template \
             at a field inside it",
            if value.is_object() {
                "an object"
            } else {
                "an array"
            }
        )),
    }
}

/// The hidden temporary name of a record that a file-dropping sink writes next to its target:
/// `.<name>.<hash>.tmp`, the target's name (cut to 200 bytes so that the whole fits the usual
/// 255-byte limit) and 16 hex digits of a hash of the event id, route and record index. The same
/// event writes the same temporary name on every attempt, so a retry replaces its own leftover;
/// different events never share one.
pub fn temp_name(file_name: &str, event: &EventMeta, index: usize) -> String {
    let mut end = file_name.len().min(200);
    while !file_name.is_char_boundary(end) {
        end -= 1;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [event.id.as_bytes(), event.route.as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.update(&(index as u64).to_be_bytes());
    let digest = ctx.finish();
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(".{}.{hash}.tmp", &file_name[..end])
}

/// True when `name` has the form [`temp_name`] gives (`.<name>.<16 hex digits>.tmp`), or the
/// form earlier releases of the file sink gave (`.<name>.tmp-<16 hex digits>`), and nothing
/// else: a sink that sweeps its leftovers removes only these.
pub fn is_temp_name(name: &str) -> bool {
    fn hex16(s: &str) -> bool {
        s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    if let Some(stem) = rest.strip_suffix(".tmp")
        && let Some((target, hash)) = stem.rsplit_once('.')
        && !target.is_empty()
        && hex16(hash)
    {
        return true;
    }
    rest.rsplit_once(".tmp-")
        .is_some_and(|(target, hash)| !target.is_empty() && hex16(hash))
}

/// One record of an output, as a sink that drops files writes it.
pub struct FileRecord {
    /// The rendered name's directories, below the sink's root.
    pub parents: Vec<String>,
    pub file_name: String,
    /// A string record as is; anything else as JSON and a newline.
    pub content: Vec<u8>,
}

/// One record of an output, for the sinks that send a message or entry per record.
pub struct Record<'a> {
    /// Its place in an array output (0 for a lone record).
    pub index: usize,
    /// Whether the output was an array (so that the index means something to a reader).
    pub in_array: bool,
    pub value: &'a Value,
    /// How messages name it: `record N: ` for an array's element, nothing for a lone record.
    pub which: String,
}

/// An output's records: an array gives one per element (none when empty), anything else one.
pub fn records(output: &Value) -> Vec<Record<'_>> {
    match output {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, value)| Record {
                index,
                in_array: true,
                value,
                which: format!("record {index}: "),
            })
            .collect(),
        other => vec![Record {
            index: 0,
            in_array: false,
            value: other,
            which: String::new(),
        }],
    }
}

/// Splits an output into its records (an array: one per element) and renders each one's name
/// with `name`, which must give a safe relative path, unique within the output. Pure: the
/// permanent error names the record.
pub fn file_records(
    name: &Template,
    event: &EventMeta,
    output: &Value,
) -> Result<Vec<FileRecord>, super::SinkError> {
    use super::SinkError::Permanent;
    let records: Vec<&Value> = match output {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut planned = Vec::with_capacity(records.len());
    for (index, record) in records.into_iter().enumerate() {
        let rendered = name.render(event, record, index).map_err(|e| {
            Permanent(format!(
                "record {index}: cannot render the file name {:?}: {e}",
                name.text()
            ))
        })?;
        let components =
            safe_relative_path(&rendered).map_err(|e| Permanent(format!("record {index}: {e}")))?;
        let Some((file_name, parents)) = components.split_last() else {
            return Err(Permanent("the rendered name is empty".into()));
        };
        let (file_name, parents) = (
            file_name.to_string(),
            parents.iter().map(|p| p.to_string()).collect(),
        );
        if let Some(first) = seen.insert(rendered.clone(), index) {
            return Err(Permanent(format!(
                "records {first} and {index} both render the name {rendered:?}: make the name \
                 template unique per record, e.g. add {{index}} or an output field"
            )));
        }
        let content = match record {
            Value::String(text) => text.clone().into_bytes(),
            other => {
                let mut bytes = serde_json::to_vec(other).map_err(|e| {
                    Permanent(format!("record {index}: cannot encode as JSON: {e}"))
                })?;
                bytes.push(b'\n');
                bytes
            }
        };
        planned.push(FileRecord {
            parents,
            file_name,
            content,
        });
    }
    Ok(planned)
}

/// Checks a rendered relative path: refuses empty, absolute, any `..` or `.` component, empty
/// components, NUL, backslash; returns the components.
///
/// Other control characters (newline, tab, escape, ...) are refused too: they are legal in
/// POSIX names but no partner system expects them, and they make names that logs and shells
/// misrepresent.
pub fn safe_relative_path(rendered: &str) -> Result<Vec<&str>, String> {
    if rendered.is_empty() {
        return Err("the rendered name is empty: check the values the template uses".into());
    }
    if rendered.starts_with('/') {
        return Err(format!(
            "the rendered name {rendered:?} is absolute: names must stay inside the directory"
        ));
    }
    if rendered.contains('\0') {
        return Err(format!(
            "the rendered name {rendered:?} contains a NUL character, which no file name may hold"
        ));
    }
    if rendered.contains('\\') {
        return Err(format!(
            "the rendered name {rendered:?} contains a backslash: use / to make subdirectories"
        ));
    }
    if rendered.chars().any(char::is_control) {
        return Err(format!(
            "the rendered name {rendered:?} contains a control character: check the values the \
             template uses"
        ));
    }
    let components: Vec<&str> = rendered.split('/').collect();
    for component in &components {
        match *component {
            "" => {
                return Err(format!(
                    "the rendered name {rendered:?} has an empty component (// or a / at the \
                     end): check the values the template uses"
                ));
            }
            "." | ".." => {
                return Err(format!(
                    "the rendered name {rendered:?} has a {component:?} component: names must \
                     stay inside the directory"
                ));
            }
            _ => {}
        }
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "case.updated".into(),
            version: 3,
            subject: "case-42".into(),
            revision: Some(7),
            source: Some("court".into()),
            route: "courts".into(),
            partner: "p1".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn render(text: &str, record: &Value) -> Result<String, String> {
        Template::parse(text)?.render(&event(), record, 2)
    }

    #[test]
    fn renders_every_event_field() {
        let out = render(
            "{id}|{type}|{version}|{subject}|{revision}|{source}|{partner}|{route}|{index}|{date}|\
             {hour}",
            &json!({}),
        )
        .unwrap();
        assert_eq!(
            out,
            "evt-1|case.updated|3|case-42|7|court|p1|courts|2|2026-12-07|00"
        );
    }

    #[test]
    fn date_and_hour_are_the_utc_time_of_receipt() {
        let t = Template::parse("{date}T{hour}").unwrap();
        let at = |ms: i64| {
            let mut e = event();
            e.received_at_ms = ms;
            t.render(&e, &json!({}), 0).unwrap()
        };
        // 2026-12-07 23:59:59.999 UTC, and one millisecond later.
        assert_eq!(at(1_796_687_999_999), "2026-12-07T23");
        assert_eq!(at(1_796_688_000_000), "2026-12-08T00");
        assert_eq!(at(951_782_400_000), "2000-02-29T00");
        assert_eq!(at(0), "1970-01-01T00");
    }

    #[test]
    fn renders_output_fields() {
        let record = json!({"a": {"b": "x/y", "n": 12, "f": 1.5, "t": true}, "list": ["p", "q"]});
        assert_eq!(render("{output.a.b}", &record).unwrap(), "x/y");
        assert_eq!(
            render("{output.a.n}-{output.a.f}-{output.a.t}", &record).unwrap(),
            "12-1.5-true"
        );
        assert_eq!(render("{output.list.1}", &record).unwrap(), "q");
    }

    #[test]
    fn output_fields_that_are_not_scalars_are_errors_naming_the_field() {
        let record = json!({"a": {"b": null, "o": {}, "l": []}, "s": "x"});
        for (text, expect) in [
            ("{output.a.b}", "{output.a.b} is null"),
            ("{output.a.o}", "{output.a.o} is an object"),
            ("{output.a.l}", "{output.a.l} is an array"),
            ("{output.missing}", "no field {output.missing}"),
            ("{output.s.deeper}", "no field {output.s.deeper}"),
            ("{output.a.l.0}", "no field {output.a.l.0}"),
        ] {
            let e = render(text, &record).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
        // A record that is not an object has no fields.
        let e = render("{output.a}", &json!("text")).unwrap_err();
        assert!(e.contains("{output.a}"), "{e}");
    }

    #[test]
    fn absent_revision_and_source_are_errors_naming_them() {
        let t = Template::parse("{revision}").unwrap();
        let mut e = event();
        e.revision = None;
        let err = t.render(&e, &json!({}), 0).unwrap_err();
        assert!(err.contains("{revision}"), "{err}");
        let t = Template::parse("{source}").unwrap();
        e.source = None;
        let err = t.render(&e, &json!({}), 0).unwrap_err();
        assert!(err.contains("{source}"), "{err}");
    }

    #[test]
    fn doubled_braces_are_literal() {
        assert_eq!(render("{{{id}}}", &json!({})).unwrap(), "{evt-1}");
        assert_eq!(render("a{{b}}c", &json!({})).unwrap(), "a{b}c");
        let t = Template::parse("{{id}}").unwrap();
        assert_eq!(t.placeholders().count(), 0);
    }

    #[test]
    fn parse_errors_name_the_problem() {
        for (text, expect) in [
            ("{nope}", "unknown placeholder {nope}"),
            ("{output}", "unknown placeholder {output}"),
            ("{output.}", "unknown placeholder {output.}"),
            ("{output.a..b}", "unknown placeholder {output.a..b}"),
            ("{ id }", "unknown placeholder { id }"),
            ("{}", "empty placeholder"),
            ("abc{id", "unclosed { at byte 3"),
            ("{a{id}", "unclosed { at byte 0"),
            ("x}", "stray } at byte 1"),
        ] {
            let e = Template::parse(text).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }

    #[test]
    fn placeholders_are_listed_in_order() {
        let t = Template::parse("{subject}/{output.a.b}-{index}.json").unwrap();
        let got: Vec<String> = t.placeholders().map(|p| p.to_string()).collect();
        assert_eq!(got, ["{subject}", "{output.a.b}", "{index}"]);
        assert_eq!(t.text(), "{subject}/{output.a.b}-{index}.json");
    }

    #[test]
    fn non_ascii_text_survives() {
        assert_eq!(render("é-{id}-ü", &json!({})).unwrap(), "é-evt-1-ü");
        assert_eq!(render("{output.név}", &json!({"név": "Ő"})).unwrap(), "Ő");
    }

    #[test]
    fn temporary_names_are_recognised_and_nothing_else() {
        let t = temp_name("a.xml", &event(), 0);
        assert!(is_temp_name(&t), "{t}");
        assert!(is_temp_name(".a.tmp-0123456789abcdef"));
        for name in [
            "a.xml",
            ".a.xml",
            ".a.xml.tmp",
            ".a.0123456789ABCDEF.tmp",
            ".a.0123456789abcdef0.tmp",
            "a.0123456789abcdef.tmp",
            "..0123456789abcdef.tmp",
            ".a.0123456789abcdef.tmpx",
            ".a.tmp-0123456789abcdeg",
            ".tmp-0123456789abcdef",
        ] {
            assert!(!is_temp_name(name), "{name}");
        }
    }

    #[test]
    fn safe_paths_are_split_into_components() {
        assert_eq!(safe_relative_path("a.json").unwrap(), ["a.json"]);
        assert_eq!(
            safe_relative_path("a/b/c.json").unwrap(),
            ["a", "b", "c.json"]
        );
        assert_eq!(safe_relative_path("..a/b..").unwrap(), ["..a", "b.."]);
        assert_eq!(safe_relative_path(".hidden").unwrap(), [".hidden"]);
    }

    #[test]
    fn unsafe_paths_are_refused_naming_the_value() {
        for bad in [
            "",
            "/etc/passwd",
            "../../etc/passwd",
            "a/../b",
            "a/./b",
            ".",
            "..",
            "a//b",
            "a/",
            "a\0b",
            "a\\b",
            "a\nb",
        ] {
            let e = safe_relative_path(bad).unwrap_err();
            if !bad.is_empty() {
                assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
            }
        }
    }
}
