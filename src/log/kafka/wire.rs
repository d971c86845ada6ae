//! How records on the topics name their schema, so any consumer can decode them with only the
//! `.avsc` files of `schemas/`:
//!
//! - every Avro record carries the headers `xsender-schema` (the schema's full name) and
//!   `xsender-schema-fingerprint` (its CRC-64-AVRO fingerprint: the 8 bytes of Avro
//!   single-object encoding, little-endian, as 16 lowercase hex digits);
//! - without a schema registry the value is the bare Avro binary datum;
//! - with one (`schema_registry_url`), the schemas are registered under `<topic>-value` at
//!   start and the value is in the Confluent wire format: `0x00`, the 4-byte big-endian schema
//!   id, the datum. The header `xsender-wire` says which (`avro` or `confluent`), so a topic
//!   written before and after a registry was configured stays readable.

use std::time::Duration;

use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::avro;
use crate::event::{DeliveryEvent, RawEnvelope};

pub const SCHEMA_HEADER: &str = "xsender-schema";
pub const FINGERPRINT_HEADER: &str = "xsender-schema-fingerprint";
pub const WIRE_HEADER: &str = "xsender-wire";
/// Trace context of the request, for consumers that join traces (W3C `traceparent`).
pub const TRACEPARENT_HEADER: &str = "traceparent";

const EVENT_SCHEMA_NAME: &str = "com.xsender.events.v1.DeliveryEvent";
const ENVELOPE_SCHEMA_NAME: &str = "com.xsender.events.v1.RawEnvelope";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("schema registry {url}: {message}")]
    Registry { url: String, message: String },
    #[error("record {0}")]
    Malformed(String),
}

/// One schema as written on one topic.
#[derive(Debug, Clone)]
struct Framing {
    name: &'static str,
    fingerprint_hex: String,
    /// The registry's id for it under `<topic>-value`, when a registry is configured.
    registry_id: Option<u32>,
}

impl Framing {
    fn headers(&self, traceparent: Option<&str>) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: SCHEMA_HEADER,
                value: Some(self.name),
            })
            .insert(Header {
                key: FINGERPRINT_HEADER,
                value: Some(&self.fingerprint_hex),
            })
            .insert(Header {
                key: WIRE_HEADER,
                value: Some(if self.registry_id.is_some() {
                    "confluent"
                } else {
                    "avro"
                }),
            });
        if let Some(tp) = traceparent {
            h = h.insert(Header {
                key: TRACEPARENT_HEADER,
                value: Some(tp),
            });
        }
        h
    }

    fn prefix(&self, out: &mut Vec<u8>) {
        if let Some(id) = self.registry_id {
            out.push(0);
            out.extend_from_slice(&id.to_be_bytes());
        }
    }

    /// The datum of a record written with this schema, checking what its headers claim.
    fn datum<'a, H: Headers>(
        &self,
        value: &'a [u8],
        headers: Option<&H>,
    ) -> Result<&'a [u8], WireError> {
        let header = |key: &str| {
            headers.and_then(|h| {
                h.iter()
                    .find(|x| x.key == key)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        match header(FINGERPRINT_HEADER) {
            Some(fp) if fp == self.fingerprint_hex => {}
            Some(fp) => {
                return Err(WireError::Malformed(format!(
                    "was written with schema fingerprint {fp}, this build reads {} ({})",
                    self.fingerprint_hex, self.name
                )))
            }
            None => {
                return Err(WireError::Malformed(format!(
                    "has no {FINGERPRINT_HEADER} header: not written by xsender-events"
                )))
            }
        }
        match header(WIRE_HEADER).as_deref() {
            Some("confluent") => {
                if value.len() < 5 || value[0] != 0 {
                    return Err(WireError::Malformed(
                        "says Confluent framing but does not start with 0x00 + schema id".into(),
                    ));
                }
                Ok(&value[5..])
            }
            Some("avro") | None => Ok(value),
            Some(other) => Err(WireError::Malformed(format!(
                "has an unknown {WIRE_HEADER} {other:?}"
            ))),
        }
    }
}

/// Encoders and decoders of the three topics' records.
#[derive(Debug, Clone)]
pub struct Wire {
    events: Framing,
    envelopes: Framing,
}

impl Wire {
    /// Without a registry: header-named bare datums.
    pub fn plain() -> Wire {
        Wire {
            events: Framing {
                name: EVENT_SCHEMA_NAME,
                fingerprint_hex: hex::encode(avro::events().fingerprint()),
                registry_id: None,
            },
            envelopes: Framing {
                name: ENVELOPE_SCHEMA_NAME,
                fingerprint_hex: hex::encode(avro::envelopes().fingerprint()),
                registry_id: None,
            },
        }
    }

    /// Registers both schemas (idempotent in a Confluent-compatible registry) and frames
    /// records with the ids it returns.
    pub async fn with_registry(
        url: &str,
        envelopes_topic: &str,
        events_topic: &str,
    ) -> Result<Wire, WireError> {
        let mut w = Wire::plain();
        w.envelopes.registry_id =
            Some(register(url, envelopes_topic, avro::RAW_ENVELOPE_SCHEMA).await?);
        w.events.registry_id =
            Some(register(url, events_topic, avro::DELIVERY_EVENT_SCHEMA).await?);
        Ok(w)
    }

    pub fn encode_event(&self, e: &DeliveryEvent) -> (Vec<u8>, OwnedHeaders) {
        let mut out = Vec::with_capacity(256);
        self.events.prefix(&mut out);
        avro::event_datum_into(&mut out, e);
        (out, self.events.headers(e.trace_parent.as_deref()))
    }

    pub fn decode_event<H: Headers>(
        &self,
        value: &[u8],
        headers: Option<&H>,
    ) -> Result<DeliveryEvent, WireError> {
        avro::event_from_datum(self.events.datum(value, headers)?)
            .map_err(|e| WireError::Malformed(e.to_string()))
    }

    pub fn encode_envelope(&self, e: &RawEnvelope) -> (Vec<u8>, OwnedHeaders) {
        let mut out = Vec::with_capacity(e.body.len() + 256);
        self.envelopes.prefix(&mut out);
        avro::envelope_datum_into(&mut out, e);
        (out, self.envelopes.headers(e.trace_parent.as_deref()))
    }

    pub fn decode_envelope<H: Headers>(
        &self,
        value: &[u8],
        headers: Option<&H>,
    ) -> Result<RawEnvelope, WireError> {
        avro::envelope_from_datum(self.envelopes.datum(value, headers)?)
            .map_err(|e| WireError::Malformed(e.to_string()))
    }
}

/// `POST {url}/subjects/{topic}-value/versions`: the id of the schema (registering it if new).
async fn register(url: &str, topic: &str, schema: &str) -> Result<u32, WireError> {
    let err = |message: String| WireError::Registry {
        url: url.to_string(),
        message,
    };
    let endpoint = format!(
        "{}/subjects/{}-value/versions",
        url.trim_end_matches('/'),
        topic
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
    let resp = client
        .post(&endpoint)
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| err(format!("cannot register the schema of {topic}: {e}")))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| err(format!("reading its answer: {e}")))?;
    if !status.is_success() {
        return Err(err(format!(
            "registering the schema of {topic} answered {status}: {text}"
        )));
    }
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_u64()))
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| err(format!("answer without a schema id: {text}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, RawEnvelope};

    fn event(kind: EventKind) -> DeliveryEvent {
        DeliveryEvent {
            event_key: "k1".into(),
            tenant: "acme".into(),
            provider: "sendgrid".into(),
            kind,
            dispatch_key: "d:a-1".into(),
            dispatch_id: Some("a-1".into()),
            campaign_id: Some("camp-1".into()),
            message_id: Some("m1".into()),
            recipient: "a@example.com".into(),
            occurred_at_ms: 1_700_000_000_000,
            received_at_ms: 1_700_000_000_500,
            envelope_id: "env1".into(),
            provider_event: "open".into(),
            provider_event_id: None,
            bounce_class: None,
            reason: None,
            smtp_status: None,
            url: None,
            user_agent: Some("Mozilla/5.0".into()),
            ip: None,
            machine: false,
            group_id: None,
            trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn records_round_trip_and_name_their_schema() {
        let w = Wire::plain();
        let env = RawEnvelope::verified("sendgrid", b"[{\"event\":\"open\"}]".to_vec(), &["acme"]);
        let (value, headers) = w.encode_envelope(&env);
        let back = w.decode_envelope(&value, Some(&headers)).unwrap();
        assert_eq!(back, env);
        let fp = headers
            .iter()
            .find(|h| h.key == FINGERPRINT_HEADER)
            .and_then(|h| h.value)
            .unwrap();
        assert_eq!(fp, hex::encode(avro::envelopes().fingerprint()).as_bytes());
        // A value with another schema's fingerprint is refused, naming both.
        let (ev_value, ev_headers) = w.encode_event(&event(EventKind::Opened));
        let e = w
            .decode_envelope(&ev_value, Some(&ev_headers))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fingerprint") && e.contains("RawEnvelope"),
            "{e}"
        );
        assert!(w
            .decode_event(&ev_value, None::<&OwnedHeaders>)
            .unwrap_err()
            .to_string()
            .contains("no xsender-schema-fingerprint"));
    }

    #[test]
    fn confluent_framing_is_magic_byte_and_id() {
        let mut w = Wire::plain();
        w.events.registry_id = Some(0x01020304);
        let e = event(EventKind::Delivered);
        let (value, headers) = w.encode_event(&e);
        assert_eq!(&value[..5], &[0, 1, 2, 3, 4]);
        let mut datum = Vec::new();
        avro::event_datum_into(&mut datum, &e);
        assert_eq!(&value[5..], &datum[..]);
        assert_eq!(w.decode_event(&value, Some(&headers)).unwrap(), e);
    }
}
