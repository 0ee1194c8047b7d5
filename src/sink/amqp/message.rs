//! What the `amqp` sink publishes for one event: the rendered exchange and routing key, the
//! payload and the message properties of each record. Pure: nothing here talks to the broker.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;

use super::config::{check_exchange, check_routing_key};
use crate::sink::template::{Record, Template, records};
use crate::sink::{EventMeta, SinkError};

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// AMQP's persistent delivery mode: the broker writes the message to disk in a durable queue.
const PERSISTENT: u8 = 2;

/// One message, ready to publish.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) payload: Vec<u8>,
    pub(super) properties: BasicProperties,
}

/// How records become messages.
#[derive(Debug)]
pub(super) struct Publishing {
    pub(super) exchange: Template,
    pub(super) routing_key: Template,
    pub(super) mandatory: bool,
    pub(super) content_type: Option<String>,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

impl Publishing {
    /// Renders, checks and encodes every record: an array output is one message per element,
    /// anything else one message. Fails, permanently, before anything is published.
    pub(super) fn messages(
        &self,
        event: &EventMeta,
        output: &Value,
    ) -> Result<Vec<Message>, SinkError> {
        let records = records(output);
        let mut messages = Vec::with_capacity(records.len());
        for Record {
            index,
            in_array: array,
            value: record,
            which,
        } in records
        {
            let render = |template: &Template, what: &str| {
                template.render(event, record, index).map_err(|e| {
                    SinkError::Permanent(format!(
                        "{which}cannot render the {what} {:?}: {e}",
                        template.text()
                    ))
                })
            };
            let exchange = render(&self.exchange, "exchange")?;
            check_exchange(&exchange).map_err(|e| SinkError::Permanent(format!("{which}{e}")))?;
            let routing_key = render(&self.routing_key, "routing key")?;
            check_routing_key(&routing_key)
                .map_err(|e| SinkError::Permanent(format!("{which}{e}")))?;
            let (payload, default_type) = match record {
                Value::String(text) => (text.clone().into_bytes(), TEXT),
                other => (
                    serde_json::to_vec(other).map_err(|e| {
                        SinkError::Permanent(format!(
                            "{which}cannot encode the output as JSON: {e}"
                        ))
                    })?,
                    JSON,
                ),
            };
            let mut headers = FieldTable::default();
            headers.insert("ess-event-type".into(), text(&event.event_type));
            headers.insert(
                "ess-event-version".into(),
                AMQPValue::LongLongInt(i64::try_from(event.version).unwrap_or(i64::MAX)),
            );
            headers.insert("ess-subject".into(), text(&event.subject));
            if let Some(revision) = event.revision {
                headers.insert(
                    "ess-revision".into(),
                    AMQPValue::LongLongInt(i64::try_from(revision).unwrap_or(i64::MAX)),
                );
            }
            headers.insert("ess-route".into(), text(&event.route));
            if array {
                headers.insert(
                    "ess-record".into(),
                    AMQPValue::LongLongInt(i64::try_from(index).unwrap_or(i64::MAX)),
                );
            }
            let content_type = self.content_type.as_deref().unwrap_or(default_type);
            let properties = BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_content_type(ShortString::from(content_type))
                .with_message_id(ShortString::from(event.id.as_str()))
                .with_type(ShortString::from(short(&event.event_type)))
                .with_app_id("ess-agent".into())
                .with_headers(headers);
            messages.push(Message {
                exchange,
                routing_key,
                payload,
                properties,
            });
        }
        Ok(messages)
    }
}

/// A value cut to AMQP's short-string limit of 255 bytes, at a character boundary.
fn short(value: &str) -> &str {
    let mut end = value.len().min(255);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}
