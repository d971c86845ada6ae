//! Avro encoding of the log records, with the schemas from `schemas/` compiled in. Records
//! use Avro single-object encoding (`C3 01` + the schema's CRC-64-AVRO fingerprint + datum), so
//! every stored record names the exact schema that wrote it.

use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::{from_avro_datum, from_value, to_avro_datum, to_value, Schema};
use serde::{de::DeserializeOwned, Serialize};

use crate::event::{DeliveryEvent, RawEnvelope};

pub const RAW_ENVELOPE_SCHEMA: &str = include_str!("../schemas/raw_envelope.avsc");
pub const DELIVERY_EVENT_SCHEMA: &str = include_str!("../schemas/delivery_event.avsc");

#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    #[error("avro: {0}")]
    Codec(Box<apache_avro::Error>),
    #[error("record does not start with the single-object marker C3 01")]
    NotSingleObject,
    #[error("record was written with schema fingerprint {found}, expected {expected}")]
    UnknownSchema { found: String, expected: String },
}

impl From<apache_avro::Error> for AvroError {
    fn from(e: apache_avro::Error) -> Self {
        // Boxed: the driver's error is large and this sits on hot `Result` paths.
        AvroError::Codec(Box::new(e))
    }
}

pub struct Codec {
    schema: Schema,
    fingerprint: [u8; 8],
}

impl Codec {
    fn new(text: &str) -> Codec {
        let schema = Schema::parse_str(text).expect("schemas/ hold valid Avro (checked by tests)");
        let fp = schema.fingerprint::<Rabin>();
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&fp.bytes[..8]);
        Codec {
            schema,
            fingerprint,
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The CRC-64-AVRO fingerprint, as it appears in single-object records.
    pub fn fingerprint(&self) -> [u8; 8] {
        self.fingerprint
    }

    pub fn encode<T: Serialize>(&self, record: &T) -> Result<Vec<u8>, AvroError> {
        let value = to_value(record)?.resolve(&self.schema)?;
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&[0xC3, 0x01]);
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&to_avro_datum(&self.schema, value)?);
        Ok(out)
    }

    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, AvroError> {
        if bytes.len() < 10 || bytes[..2] != [0xC3, 0x01] {
            return Err(AvroError::NotSingleObject);
        }
        if bytes[2..10] != self.fingerprint {
            return Err(AvroError::UnknownSchema {
                found: hex::encode(&bytes[2..10]),
                expected: hex::encode(self.fingerprint),
            });
        }
        let mut datum = &bytes[10..];
        let value = from_avro_datum(&self.schema, &mut datum, None)?;
        Ok(from_value(&value)?)
    }
}

pub fn envelopes() -> &'static Codec {
    static C: OnceLock<Codec> = OnceLock::new();
    C.get_or_init(|| Codec::new(RAW_ENVELOPE_SCHEMA))
}

pub fn events() -> &'static Codec {
    static C: OnceLock<Codec> = OnceLock::new();
    C.get_or_init(|| Codec::new(DELIVERY_EVENT_SCHEMA))
}

pub fn encode_event(e: &DeliveryEvent) -> Result<Vec<u8>, AvroError> {
    events().encode(e)
}

pub fn decode_event(b: &[u8]) -> Result<DeliveryEvent, AvroError> {
    events().decode(b)
}

pub fn encode_envelope(e: &RawEnvelope) -> Result<Vec<u8>, AvroError> {
    envelopes().encode(e)
}

pub fn decode_envelope(b: &[u8]) -> Result<RawEnvelope, AvroError> {
    envelopes().decode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BounceClass, EventKind};

    #[test]
    fn events_round_trip_through_the_published_schema() {
        for kind in EventKind::ALL {
            let mut e = crate::fold::tests::ev("k", "d", kind, 1_700_000_000_123);
            e.bounce_class = Some(BounceClass::Soft);
            e.user_agent = Some("ua ✓".into());
            let bytes = encode_event(&e).unwrap();
            assert_eq!(&bytes[..2], &[0xC3, 0x01]);
            assert_eq!(decode_event(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn envelopes_round_trip_and_foreign_records_are_refused() {
        let env = RawEnvelope {
            trace_parent: None,
            id: "abc".into(),
            provider: "sendgrid".into(),
            received_at_ms: 5,
            verified_tenants: vec!["t1".into(), "t2".into()],
            default_tenant: None,
            content_type: Some("application/json".into()),
            body: b"[{\"x\":1}]\r\n\xff".to_vec(),
        };
        let bytes = encode_envelope(&env).unwrap();
        assert_eq!(decode_envelope(&bytes).unwrap(), env);
        assert!(matches!(
            decode_event(&bytes),
            Err(AvroError::UnknownSchema { .. })
        ));
        assert!(matches!(
            decode_event(b"{}"),
            Err(AvroError::NotSingleObject)
        ));
    }
}
