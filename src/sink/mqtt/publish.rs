//! What is published: each record rendered, checked and encoded into a message, before
//! anything is sent.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use serde_json::{Value, json};

use super::config::{MAX_PACKET, check_topic};
use crate::sink::template::{Record, Template, records};
use crate::sink::{EventMeta, SinkError};

pub(super) const JSON: &str = "application/json";
pub(super) const TEXT: &str = "text/plain; charset=utf-8";

/// Identifies one record of one event on one route: a retry of the same record may wait for
/// the publish already in flight instead of sending a second copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct RecordKey {
    pub(super) event_id: String,
    pub(super) route: String,
    pub(super) index: usize,
}

/// A digest of everything that goes on the wire for a record (topic, flags, payload,
/// properties): a publish is reused for a retry only when it is the same message.
pub(super) type Fingerprint = [u8; 32];

/// One message, ready to publish.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub(super) key: RecordKey,
    pub(super) fingerprint: Fingerprint,
    pub(super) topic: String,
    pub(super) payload: Bytes,
    /// MQTT 5 properties; `None` for MQTT 3.1.1.
    pub(super) properties: Option<v5b::PublishProperties>,
    /// Bytes on the wire, without the fixed header.
    pub(super) size: usize,
}

/// What the sink needs to render and publish messages.
pub(super) struct Publishing {
    pub(super) topic: Template,
    pub(super) allow_empty_levels: bool,
    pub(super) qos: u8,
    pub(super) retain: bool,
    pub(super) envelope: bool,
    pub(super) v5: bool,
    pub(super) content_type: Option<String>,
    pub(super) message_expiry: Option<u32>,
}

impl Publishing {
    /// Renders, checks and encodes every record. Pure: nothing is published.
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
            let topic = self.topic.render(event, record, index).map_err(|e| {
                SinkError::Permanent(format!(
                    "{which}cannot render the topic {:?}: {e}",
                    self.topic.text()
                ))
            })?;
            check_topic(&topic, self.allow_empty_levels)
                .map_err(|e| SinkError::Permanent(format!("{which}{e}")))?;
            let (payload, default_type) = if self.envelope {
                let mut wrapped = json!({
                    "ess_event_id": event.id,
                    "ess_event_type": event.event_type,
                    "ess_route": event.route,
                });
                if array {
                    wrapped["ess_record"] = json!(index);
                }
                wrapped["output"] = record.clone();
                (serde_json::to_vec(&wrapped), JSON)
            } else {
                match record {
                    Value::String(text) => (Ok(text.clone().into_bytes()), TEXT),
                    other => (serde_json::to_vec(other), JSON),
                }
            };
            let payload = Bytes::from(payload.map_err(|e| {
                SinkError::Permanent(format!("{which}cannot encode the output as JSON: {e}"))
            })?);
            let properties = self.v5.then(|| {
                let mut user_properties = vec![
                    ("ess-event-id".to_string(), event.id.clone()),
                    ("ess-event-type".to_string(), event.event_type.clone()),
                    ("ess-route".to_string(), event.route.clone()),
                ];
                if array {
                    user_properties.push(("ess-record".to_string(), index.to_string()));
                }
                v5b::PublishProperties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: self.message_expiry,
                    content_type: Some(
                        self.content_type
                            .clone()
                            .unwrap_or_else(|| default_type.to_string()),
                    ),
                    user_properties,
                    ..Default::default()
                }
            });
            let properties_size = properties.as_ref().map_or(0, |p| {
                // Property length (up to 4) + payload format (2) + expiry (5) + content type
                // (3 + len) + each user property (5 + key + value).
                4 + 2
                    + 5
                    + 3
                    + p.content_type.as_ref().map_or(0, String::len)
                    + p.user_properties
                        .iter()
                        .map(|(k, v)| 5 + k.len() + v.len())
                        .sum::<usize>()
            });
            let size = 2 + topic.len() + 2 + properties_size + payload.len();
            if size > MAX_PACKET {
                return Err(SinkError::Permanent(format!(
                    "{which}the message would be {size} bytes, more than MQTT's limit of \
                     {MAX_PACKET}: make the adapter produce less"
                )));
            }
            let fingerprint = {
                let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                digest.update(&(topic.len() as u64).to_be_bytes());
                digest.update(topic.as_bytes());
                digest.update(&[self.qos, u8::from(self.retain)]);
                if let Some(p) = &properties {
                    for (k, v) in &p.user_properties {
                        digest.update(&(k.len() as u64).to_be_bytes());
                        digest.update(k.as_bytes());
                        digest.update(&(v.len() as u64).to_be_bytes());
                        digest.update(v.as_bytes());
                    }
                    if let Some(ct) = &p.content_type {
                        digest.update(ct.as_bytes());
                    }
                    digest.update(&p.message_expiry_interval.unwrap_or(0).to_be_bytes());
                }
                digest.update(&payload);
                let mut out = [0u8; 32];
                out.copy_from_slice(digest.finish().as_ref());
                out
            };
            messages.push(Message {
                key: RecordKey {
                    event_id: event.id.clone(),
                    route: event.route.clone(),
                    index,
                },
                fingerprint,
                topic,
                payload,
                properties,
                size,
            });
        }
        Ok(messages)
    }
}
