//! What goes into the streams: one entry per output record, its stream key rendered from the
//! template and its fields. Pure: nothing here talks to Redis.

use serde_json::Value;

use super::super::EventMeta;
use super::super::template::{Record, Template, records};
use super::config::{OutputAs, check_stream};

/// The fields every entry starts with, in this order; `ess_revision` only when the event has a
/// revision, `ess_record` only for the elements of an array output.
pub const EVENT_ID: &str = "ess_event_id";
pub const ROUTE: &str = "ess_route";
pub const EVENT_TYPE: &str = "ess_event_type";
pub const VERSION: &str = "ess_event_version";
pub const SUBJECT: &str = "ess_subject";
pub const REVISION: &str = "ess_revision";
pub const RECORD: &str = "ess_record";
/// The field that holds the record as JSON with `output_as = "payload"`.
pub const PAYLOAD: &str = "payload";

/// The prefix of the sink's own fields: output fields may not use it.
const RESERVED: &str = "ess_";

/// One stream entry, ready to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub stream: String,
    /// Field names and values, in order.
    pub fields: Vec<(String, String)>,
}

/// Renders every record of `output` (an array gives one entry per element, anything else one
/// entry; an empty array none). An error is permanent: the same output fails the same way.
pub fn entries(
    stream: &Template,
    output_as: OutputAs,
    event: &EventMeta,
    output: &Value,
) -> Result<Vec<Entry>, String> {
    let records = records(output);
    let mut entries = Vec::with_capacity(records.len());
    for Record {
        index,
        in_array: array,
        value: record,
        which,
    } in records
    {
        let key = stream.render(event, record, index).map_err(|e| {
            format!(
                "{which}cannot render the stream key {:?}: {e}",
                stream.text()
            )
        })?;
        check_stream(&key).map_err(|e| format!("{which}{e}"))?;
        let mut fields = vec![
            (EVENT_ID.to_string(), event.id.clone()),
            (ROUTE.to_string(), event.route.clone()),
            (EVENT_TYPE.to_string(), event.event_type.clone()),
            (VERSION.to_string(), event.version.to_string()),
            (SUBJECT.to_string(), event.subject.clone()),
        ];
        if let Some(revision) = event.revision {
            fields.push((REVISION.to_string(), revision.to_string()));
        }
        if array {
            fields.push((RECORD.to_string(), index.to_string()));
        }
        match output_as {
            OutputAs::Payload => {
                let json = serde_json::to_string(record)
                    .map_err(|e| format!("{which}cannot encode the output as JSON: {e}"))?;
                fields.push((PAYLOAD.to_string(), json));
            }
            OutputAs::Fields => {
                let Value::Object(object) = record else {
                    return Err(format!(
                        "{which}output_as = \"fields\" needs an object of scalars, and the \
                         adapter returned {}: return an object, or use output_as = \"payload\"",
                        kind(record)
                    ));
                };
                for (name, value) in object {
                    if name.starts_with(RESERVED) {
                        return Err(format!(
                            "{which}the output field {name:?} starts with {RESERVED:?}, which \
                             the sink keeps for its own fields: rename it in the adapter"
                        ));
                    }
                    let text = match value {
                        Value::Null => continue,
                        Value::String(text) => text.clone(),
                        Value::Bool(_) | Value::Number(_) => value.to_string(),
                        Value::Array(_) | Value::Object(_) => {
                            return Err(format!(
                                "{which}the output field {name:?} is {}, and output_as = \
                                 \"fields\" takes only strings, numbers and booleans: flatten \
                                 it in the adapter, or use output_as = \"payload\"",
                                kind(value)
                            ));
                        }
                    };
                    fields.push((name.clone(), text));
                }
            }
        }
        entries.push(Entry {
            stream: key,
            fields,
        });
    }
    Ok(entries)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The key of the record that the event was added on this route.
pub fn dedup_key(prefix: &str, event: &EventMeta) -> String {
    format!("{prefix}{}:{}:{}", event.partner, event.route, event.id)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(revision: Option<u64>) -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "rule.updated".into(),
            version: 2,
            subject: "court/7".into(),
            revision,
            source: None,
            route: "kiosks".into(),
            partner: "county".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn fields(entry: &Entry) -> Vec<(&str, &str)> {
        entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn one_entry_with_the_event_fields_and_the_output_as_json() {
        let t = Template::parse("rules:{type}").unwrap();
        let out = entries(
            &t,
            OutputAs::Payload,
            &event(Some(9)),
            &json!({"a": 1, "b": "x"}),
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].stream, "rules:rule.updated");
        assert_eq!(
            fields(&out[0]),
            vec![
                ("ess_event_id", "evt-1"),
                ("ess_route", "kiosks"),
                ("ess_event_type", "rule.updated"),
                ("ess_event_version", "2"),
                ("ess_subject", "court/7"),
                ("ess_revision", "9"),
                ("payload", r#"{"a":1,"b":"x"}"#),
            ]
        );
        // A string output is JSON too, so that a reader can always parse `payload`.
        let out = entries(&t, OutputAs::Payload, &event(None), &json!("text")).unwrap();
        assert_eq!(fields(&out[0]).last(), Some(&("payload", "\"text\"")));
        assert!(!fields(&out[0]).iter().any(|(k, _)| *k == "ess_revision"));
    }

    #[test]
    fn arrays_give_one_entry_per_element_with_its_index_and_its_own_stream() {
        let t = Template::parse("court:{output.court}").unwrap();
        let out = entries(
            &t,
            OutputAs::Payload,
            &event(None),
            &json!([{"court": 1}, {"court": "b"}]),
        )
        .unwrap();
        assert_eq!(
            out.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>(),
            ["court:1", "court:b"]
        );
        assert!(fields(&out[1]).contains(&("ess_record", "1")));
        assert!(
            entries(&t, OutputAs::Payload, &event(None), &json!([]))
                .unwrap()
                .is_empty()
        );
        let e = entries(
            &t,
            OutputAs::Payload,
            &event(None),
            &json!([{"court": 1}, {}]),
        )
        .unwrap_err();
        assert!(
            e.starts_with("record 1: cannot render the stream key"),
            "{e}"
        );
        let bare = Template::parse("{output.court}").unwrap();
        let e = entries(
            &bare,
            OutputAs::Payload,
            &event(None),
            &json!({"court": ""}),
        )
        .unwrap_err();
        assert!(e.contains("stream key is empty"), "{e}");
    }

    #[test]
    fn fields_mode_writes_scalars_as_fields_and_refuses_the_rest() {
        let t = Template::parse("s").unwrap();
        let out = entries(
            &t,
            OutputAs::Fields,
            &event(None),
            &json!({"rule": "R1", "days": 14, "active": true, "gone": null}),
        )
        .unwrap();
        let f = fields(&out[0]);
        assert_eq!(
            &f[5..],
            &[("rule", "R1"), ("days", "14"), ("active", "true")]
        );
        for (output, needle) in [
            (json!("text"), "adapter returned a string"),
            (json!({"a": {"b": 1}}), "field \"a\" is an object"),
            (json!({"a": [1]}), "field \"a\" is an array"),
            (json!({"ess_event_id": "x"}), "keeps for its own fields"),
        ] {
            let e = entries(&t, OutputAs::Fields, &event(None), &output).unwrap_err();
            assert!(e.contains(needle), "{output}: {e}");
        }
    }

    #[test]
    fn the_dedup_key_names_agent_route_and_event() {
        assert_eq!(
            dedup_key("ess:applied:", &event(None)),
            "ess:applied:county:kiosks:evt-1"
        );
    }
}
