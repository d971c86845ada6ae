//! Avro encoding of the log records, with the schemas from `schemas/` compiled in. Records
//! use Avro single-object encoding (`C3 01` + the schema's CRC-64-AVRO fingerprint + datum), so
//! every stored record names the exact schema that wrote it.
//!
//! The two records are encoded and decoded by hand (the `binary` module): the generic
//! apache-avro serde path builds an intermediate `Value` tree and resolves it against the
//! schema for every record, which made it the top cost of the normalizer, the projector and
//! rebuilds. The schemas are still parsed by apache-avro (for the fingerprint), and tests check
//! both directions byte for byte against apache-avro, so the wire format stays the schema's.

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
    #[error("avro datum is malformed: {0}")]
    Malformed(&'static str),
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
        let mut datum = self.datum(bytes)?;
        let value = from_avro_datum(&self.schema, &mut datum, None)?;
        Ok(from_value(&value)?)
    }

    /// The single-object header followed by nothing yet.
    fn header(&self, capacity: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + capacity);
        out.extend_from_slice(&[0xC3, 0x01]);
        out.extend_from_slice(&self.fingerprint);
        out
    }

    /// The datum of a single-object record written with this schema.
    fn datum<'a>(&self, bytes: &'a [u8]) -> Result<&'a [u8], AvroError> {
        if bytes.len() < 10 || bytes[..2] != [0xC3, 0x01] {
            return Err(AvroError::NotSingleObject);
        }
        if bytes[2..10] != self.fingerprint {
            return Err(AvroError::UnknownSchema {
                found: hex::encode(&bytes[2..10]),
                expected: hex::encode(self.fingerprint),
            });
        }
        Ok(&bytes[10..])
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
    let mut out = events().header(256);
    binary::write_event(&mut out, e);
    Ok(out)
}

/// Appends the single-object record of `e` to `out` (the log reuses one buffer per batch).
pub fn encode_event_into(out: &mut Vec<u8>, e: &DeliveryEvent) {
    out.extend_from_slice(&[0xC3, 0x01]);
    out.extend_from_slice(&events().fingerprint);
    binary::write_event(out, e);
}

pub fn decode_event(b: &[u8]) -> Result<DeliveryEvent, AvroError> {
    binary::read_event(events().datum(b)?)
}

pub fn encode_envelope(e: &RawEnvelope) -> Result<Vec<u8>, AvroError> {
    let mut out = envelopes().header(e.body.len() + 128);
    binary::write_envelope(&mut out, e);
    Ok(out)
}

pub fn decode_envelope(b: &[u8]) -> Result<RawEnvelope, AvroError> {
    binary::read_envelope(envelopes().datum(b)?)
}

/// The bare Avro binary datum of `e` (no single-object header): what Kafka records carry, the
/// schema being named by a header or the Confluent framing instead.
pub fn event_datum_into(out: &mut Vec<u8>, e: &DeliveryEvent) {
    binary::write_event(out, e);
}

pub fn event_from_datum(b: &[u8]) -> Result<DeliveryEvent, AvroError> {
    binary::read_event(b)
}

pub fn envelope_datum_into(out: &mut Vec<u8>, e: &RawEnvelope) {
    binary::write_envelope(out, e);
}

pub fn envelope_from_datum(b: &[u8]) -> Result<RawEnvelope, AvroError> {
    binary::read_envelope(b)
}

/// Avro binary encoding of exactly `schemas/delivery_event.avsc` and `schemas/raw_envelope.avsc`
/// (field order, union branch order `["null", T]`, enum symbol order), per the Avro 1.11 spec:
/// `long`/`int` are zig-zag varints, `string`/`bytes` a long length then the bytes, a union its
/// branch index then the value, an array blocks of (count, items) ended by a zero count.
mod binary {
    use super::AvroError;
    use crate::event::{BounceClass, DeliveryEvent, EventKind, RawEnvelope};

    type R<T> = Result<T, AvroError>;

    fn long(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        long(out, b.len() as i64);
        out.extend_from_slice(b);
    }

    fn opt_str(out: &mut Vec<u8>, s: &Option<String>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(2); // branch 1, zig-zag encoded
                bytes(out, s.as_bytes());
            }
        }
    }

    /// Index of the symbol in the schema's `EventKind` enum: `EventKind` declares its variants
    /// in the schema's symbol order (`EventKind::ALL`; the apache-avro property tests hold the
    /// two together).
    fn kind_index(k: EventKind) -> i64 {
        k as i64
    }

    pub(super) fn write_event(out: &mut Vec<u8>, e: &DeliveryEvent) {
        bytes(out, e.event_key.as_bytes());
        bytes(out, e.tenant.as_bytes());
        bytes(out, e.provider.as_bytes());
        long(out, kind_index(e.kind));
        bytes(out, e.dispatch_key.as_bytes());
        opt_str(out, &e.dispatch_id);
        opt_str(out, &e.campaign_id);
        opt_str(out, &e.message_id);
        bytes(out, e.recipient.as_bytes());
        long(out, e.occurred_at_ms);
        long(out, e.received_at_ms);
        bytes(out, e.envelope_id.as_bytes());
        bytes(out, e.provider_event.as_bytes());
        opt_str(out, &e.provider_event_id);
        match e.bounce_class {
            None => out.push(0),
            Some(c) => {
                out.push(2);
                long(
                    out,
                    match c {
                        BounceClass::Hard => 0,
                        BounceClass::Soft => 1,
                    },
                );
            }
        }
        opt_str(out, &e.reason);
        opt_str(out, &e.smtp_status);
        opt_str(out, &e.url);
        opt_str(out, &e.user_agent);
        opt_str(out, &e.ip);
        out.push(e.machine as u8);
        opt_str(out, &e.group_id);
        opt_str(out, &e.trace_parent);
    }

    pub(super) fn write_envelope(out: &mut Vec<u8>, e: &RawEnvelope) {
        bytes(out, e.id.as_bytes());
        bytes(out, e.provider.as_bytes());
        long(out, e.received_at_ms);
        if !e.verified_tenants.is_empty() {
            long(out, e.verified_tenants.len() as i64);
            for t in &e.verified_tenants {
                bytes(out, t.as_bytes());
            }
        }
        out.push(0); // end of the array
        opt_str(out, &e.default_tenant);
        opt_str(out, &e.content_type);
        bytes(out, &e.body);
        opt_str(out, &e.trace_parent);
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn long(&mut self) -> R<i64> {
            let mut z: u64 = 0;
            for i in 0..10 {
                let (&b, rest) = self
                    .0
                    .split_first()
                    .ok_or(AvroError::Malformed("truncated long"))?;
                self.0 = rest;
                z |= u64::from(b & 0x7F) << (7 * i);
                if b & 0x80 == 0 {
                    if i == 9 && b > 1 {
                        break;
                    }
                    return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
                }
            }
            Err(AvroError::Malformed("long longer than 64 bits"))
        }

        fn bytes(&mut self) -> R<&'a [u8]> {
            let n = self.long()?;
            let n = usize::try_from(n).map_err(|_| AvroError::Malformed("negative length"))?;
            if n > self.0.len() {
                return Err(AvroError::Malformed("truncated string or bytes"));
            }
            let (b, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(b)
        }

        fn string(&mut self) -> R<String> {
            let b = self.bytes()?;
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| AvroError::Malformed("string is not UTF-8"))
        }

        /// The branch of a `["null", T]` union: false for null.
        fn present(&mut self) -> R<bool> {
            match self.long()? {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(AvroError::Malformed("union branch out of range")),
            }
        }

        fn opt_string(&mut self) -> R<Option<String>> {
            if self.present()? {
                self.string().map(Some)
            } else {
                Ok(None)
            }
        }

        fn boolean(&mut self) -> R<bool> {
            let (&b, rest) = self
                .0
                .split_first()
                .ok_or(AvroError::Malformed("truncated boolean"))?;
            self.0 = rest;
            match b {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(AvroError::Malformed("boolean is neither 0 nor 1")),
            }
        }

        fn end(&self) -> R<()> {
            if self.0.is_empty() {
                Ok(())
            } else {
                Err(AvroError::Malformed("trailing bytes after the record"))
            }
        }
    }

    pub(super) fn read_event(datum: &[u8]) -> R<DeliveryEvent> {
        let mut r = Reader(datum);
        let e = DeliveryEvent {
            event_key: r.string()?,
            tenant: r.string()?,
            provider: r.string()?,
            kind: {
                let i = r.long()?;
                *usize::try_from(i)
                    .ok()
                    .and_then(|i| EventKind::ALL.get(i))
                    .ok_or(AvroError::Malformed("EventKind index out of range"))?
            },
            dispatch_key: r.string()?,
            dispatch_id: r.opt_string()?,
            campaign_id: r.opt_string()?,
            message_id: r.opt_string()?,
            recipient: r.string()?,
            occurred_at_ms: r.long()?,
            received_at_ms: r.long()?,
            envelope_id: r.string()?,
            provider_event: r.string()?,
            provider_event_id: r.opt_string()?,
            bounce_class: if r.present()? {
                Some(match r.long()? {
                    0 => BounceClass::Hard,
                    1 => BounceClass::Soft,
                    _ => return Err(AvroError::Malformed("BounceClass index out of range")),
                })
            } else {
                None
            },
            reason: r.opt_string()?,
            smtp_status: r.opt_string()?,
            url: r.opt_string()?,
            user_agent: r.opt_string()?,
            ip: r.opt_string()?,
            machine: r.boolean()?,
            group_id: r.opt_string()?,
            trace_parent: r.opt_string()?,
        };
        r.end()?;
        Ok(e)
    }

    pub(super) fn read_envelope(datum: &[u8]) -> R<RawEnvelope> {
        let mut r = Reader(datum);
        let id = r.string()?;
        let provider = r.string()?;
        let received_at_ms = r.long()?;
        let mut verified_tenants = Vec::new();
        loop {
            let mut count = r.long()?;
            if count == 0 {
                break;
            }
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                count = count
                    .checked_neg()
                    .ok_or(AvroError::Malformed("array block count out of range"))?;
                r.long()?;
            }
            for _ in 0..count {
                verified_tenants.push(r.string()?);
            }
        }
        let e = RawEnvelope {
            id,
            provider,
            received_at_ms,
            verified_tenants,
            default_tenant: r.opt_string()?,
            content_type: r.opt_string()?,
            body: r.bytes()?.to_vec(),
            trace_parent: r.opt_string()?,
        };
        r.end()?;
        Ok(e)
    }
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

    fn arb_opt() -> impl proptest::strategy::Strategy<Value = Option<String>> {
        proptest::option::of(".{0,40}")
    }

    fn arb_event() -> impl proptest::strategy::Strategy<Value = DeliveryEvent> {
        use proptest::prelude::*;
        (
            (".{0,80}", ".{0,20}", "[a-z]{0,10}", 0usize..12, ".{0,60}"),
            (
                arb_opt(),
                arb_opt(),
                arb_opt(),
                ".{0,60}",
                any::<i64>(),
                any::<i64>(),
            ),
            (
                ".{0,32}",
                ".{0,20}",
                arb_opt(),
                proptest::option::of(any::<bool>()),
            ),
            (
                arb_opt(),
                arb_opt(),
                arb_opt(),
                arb_opt(),
                arb_opt(),
                any::<bool>(),
                arb_opt(),
            ),
        )
            .prop_map(|(a, b, c, d)| DeliveryEvent {
                event_key: a.0,
                tenant: a.1,
                provider: a.2,
                kind: EventKind::ALL[a.3],
                dispatch_key: a.4,
                dispatch_id: b.0,
                campaign_id: b.1,
                message_id: b.2,
                recipient: b.3,
                occurred_at_ms: b.4,
                received_at_ms: b.5,
                envelope_id: c.0,
                provider_event: c.1,
                provider_event_id: c.2,
                bounce_class: c.3.map(|h| {
                    if h {
                        BounceClass::Hard
                    } else {
                        BounceClass::Soft
                    }
                }),
                reason: d.0,
                smtp_status: d.1,
                url: d.2,
                user_agent: d.3,
                ip: d.4,
                machine: d.5,
                // Exercises the last field too (any string round-trips).
                trace_parent: d.6.as_ref().map(|g| format!("00-{g}-01")),
                group_id: d.6,
            })
    }

    fn arb_envelope() -> impl proptest::strategy::Strategy<Value = RawEnvelope> {
        use proptest::prelude::*;
        (
            ".{0,32}",
            "[a-z]{0,10}",
            any::<i64>(),
            proptest::collection::vec(".{0,12}", 0..4),
            arb_opt(),
            arb_opt(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(
                |(
                    id,
                    provider,
                    received_at_ms,
                    verified_tenants,
                    default_tenant,
                    content_type,
                    body,
                )| {
                    RawEnvelope {
                        id,
                        provider,
                        received_at_ms,
                        verified_tenants,
                        default_tenant,
                        trace_parent: content_type.clone(),
                        content_type,
                        body,
                    }
                },
            )
    }

    proptest::proptest! {
        /// The hand-written codec writes exactly what apache-avro writes from the schema, and
        /// reads apache-avro's bytes back to the same record.
        #[test]
        fn event_codec_matches_apache_avro(e in arb_event()) {
            let ours = encode_event(&e).unwrap();
            let reference = events().encode(&e).unwrap();
            proptest::prop_assert_eq!(&ours, &reference);
            proptest::prop_assert_eq!(&decode_event(&reference).unwrap(), &e);
            proptest::prop_assert_eq!(&events().decode::<DeliveryEvent>(&ours).unwrap(), &e);
        }

        #[test]
        fn envelope_codec_matches_apache_avro(e in arb_envelope()) {
            let ours = encode_envelope(&e).unwrap();
            let reference = envelopes().encode(&e).unwrap();
            proptest::prop_assert_eq!(&ours, &reference);
            proptest::prop_assert_eq!(&decode_envelope(&reference).unwrap(), &e);
            proptest::prop_assert_eq!(&envelopes().decode::<RawEnvelope>(&ours).unwrap(), &e);
        }

        /// Damaged records are errors, never panics.
        #[test]
        fn truncated_or_damaged_records_never_panic(e in arb_event(), cut in 0usize..400, flip in 0usize..400) {
            let mut b = encode_event(&e).unwrap();
            if flip < b.len() && flip >= 10 {
                b[flip] ^= 0xA5;
            }
            let _ = decode_event(&b);
            b.truncate(cut.max(10));
            let _ = decode_event(&b);
        }
    }

    #[test]
    fn array_blocks_with_negative_counts_are_read() {
        // Writers may emit a block as (-count, byte size, items): Avro spec, "Arrays".
        let env = RawEnvelope {
            id: "i".into(),
            provider: "p".into(),
            received_at_ms: 1,
            verified_tenants: vec!["ab".into(), "c".into()],
            default_tenant: None,
            content_type: None,
            body: vec![7],
            trace_parent: None,
        };
        let mut datum = vec![2, b'i', 2, b'p', 2];
        datum.extend_from_slice(&[3, 10, 4, b'a', b'b', 2, b'c', 0]); // count -2, size 5
        datum.extend_from_slice(&[0, 0, 2, 7, 0]);
        let mut rec = vec![0xC3, 0x01];
        rec.extend_from_slice(&envelopes().fingerprint());
        rec.extend_from_slice(&datum);
        assert_eq!(decode_envelope(&rec).unwrap(), env);
        assert_eq!(envelopes().decode::<RawEnvelope>(&rec).unwrap(), env);
    }
}

#[cfg(test)]
mod kind_order {
    use crate::event::EventKind;

    #[test]
    fn event_kinds_are_declared_in_the_schema_symbol_order() {
        let schema: serde_json::Value = serde_json::from_str(super::DELIVERY_EVENT_SCHEMA).unwrap();
        let kind = schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "kind")
            .unwrap();
        let symbols: Vec<String> = kind["type"]["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let declared: Vec<String> = EventKind::ALL.iter().map(|k| format!("{k:?}")).collect();
        assert_eq!(symbols, declared);
        for (i, k) in EventKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
