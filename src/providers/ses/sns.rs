//! Amazon SNS HTTP(S) delivery, the transport SES publishes through: the signed envelope and
//! its string to sign, the only URLs we will ever fetch, a bounded certificate cache and the
//! small HTTP seam ([`SnsHttp`]) that tests replace to count requests.
//!
//! Kept apart from the SES event mapping so that module reads as "SNS verified → SES events".
//! Everything here fails closed: an envelope that is not exactly what SNS sends is refused
//! before any network I/O, and a certificate is only ever fetched from
//! `https://sns.<region>.amazonaws.com[.cn]/….pem`.
//!
//! There is no timestamp window, unlike SendGrid: SNS redelivers a message with its original
//! `Timestamp` and signature for as long as the subscription's delivery policy allows (up to
//! days with a custom policy), so a window would refuse legitimate retries. A replayed genuine
//! message is harmless: its events have the same keys and are counted once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hyper::http::HeaderMap;
use hyper::StatusCode;
use ring::signature::{
    UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY, RSA_PKCS1_2048_8192_SHA256,
};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPublicKey;
use tokio::sync::OnceCell;
use url::{Host, Url};
use x509_cert::der::{DecodePem, Encode};

use crate::providers::Rejection;

pub const MESSAGE_TYPE_HEADER: &str = "x-amz-sns-message-type";
pub const TOPIC_ARN_HEADER: &str = "x-amz-sns-topic-arn";
pub const RAW_DELIVERY_HEADER: &str = "x-amz-sns-rawdelivery";

/// A certificate larger than this is not an SNS signing certificate (they are ~2 KiB).
pub const MAX_CERT_BYTES: usize = 64 * 1024;
/// The ConfirmSubscription answer is a few hundred bytes of XML; read at most this much.
pub const MAX_CONFIRM_BYTES: usize = 64 * 1024;

/// The three kinds of message SNS posts to an HTTP(S) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MessageType {
    SubscriptionConfirmation,
    Notification,
    UnsubscribeConfirmation,
}

impl MessageType {
    pub fn parse(s: &str) -> Option<MessageType> {
        match s {
            "SubscriptionConfirmation" => Some(MessageType::SubscriptionConfirmation),
            "Notification" => Some(MessageType::Notification),
            "UnsubscribeConfirmation" => Some(MessageType::UnsubscribeConfirmation),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::SubscriptionConfirmation => "SubscriptionConfirmation",
            MessageType::Notification => "Notification",
            MessageType::UnsubscribeConfirmation => "UnsubscribeConfirmation",
        }
    }
}

/// `SignatureVersion` 1 is RSA PKCS#1 v1.5 over SHA-1 (the default for topics), 2 over SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureVersion {
    V1,
    V2,
}

/// A parsed topic ARN: `arn:<partition>:sns:<region>:<account>:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicArn {
    pub arn: String,
    pub partition: String,
    pub region: String,
    pub account: String,
    pub name: String,
}

impl TopicArn {
    pub fn parse(arn: &str) -> Result<TopicArn, String> {
        let bad = |why: &str| {
            format!("'{arn}' is not an SNS topic ARN ({why}); expected arn:aws:sns:<region>:<12-digit account>:<topic name>")
        };
        let parts: Vec<&str> = arn.split(':').collect();
        let [prefix, partition, service, region, account, name] = parts.as_slice() else {
            return Err(bad("it needs exactly 6 ':'-separated parts"));
        };
        if *prefix != "arn" || *service != "sns" {
            return Err(bad("it must start with 'arn:' and name the 'sns' service"));
        }
        if !partition.starts_with("aws")
            || !partition
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            return Err(bad("the partition must be aws, aws-cn or aws-us-gov"));
        }
        if !is_region(region) {
            return Err(bad("the region must look like us-east-1"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the account must be 12 digits"));
        }
        if name.is_empty()
            || name.len() > 256
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(bad(
                "the topic name must be 1-256 of A-Z, a-z, 0-9, '-', '_' (and '.fifo')",
            ));
        }
        Ok(TopicArn {
            arn: arn.to_string(),
            partition: partition.to_string(),
            region: region.to_string(),
            account: account.to_string(),
            name: name.to_string(),
        })
    }
}

/// AWS region names: lower-case letters, digits and dashes (`us-east-1`, `cn-north-1`,
/// `us-gov-west-1`).
fn is_region(s: &str) -> bool {
    (3..=32).contains(&s.len())
        && s.contains('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A structurally valid SNS envelope; nothing about it is trusted until
/// [`verify_signature`] says so.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub kind: MessageType,
    pub message_id: String,
    pub topic: TopicArn,
    pub subject: Option<String>,
    pub message: String,
    pub timestamp: String,
    pub signature_version: SignatureVersion,
    pub signature: Vec<u8>,
    pub signing_cert_url: Url,
    /// Confirmations only.
    pub subscribe_url: Option<Url>,
    /// The SubscribeURL exactly as signed: `Url` normalizes on parse (it may percent-encode),
    /// so the string to sign uses the original text.
    pub subscribe_url_signed: Option<String>,
    /// Confirmations only.
    pub token: Option<String>,
}

/// One top-level value of an SNS message as the JSON had it: a string (borrowed from the body
/// when it has no escapes), `null`, or anything else (only ever reported as "not a string").
#[derive(Debug)]
pub enum Field<'a> {
    Str(Cow<'a, str>),
    Null,
    Other,
}

impl<'a> Field<'a> {
    /// The string, trimmed, if it is a non-empty one (what the normalizer reads).
    pub fn text(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s.trim()).filter(|s| !s.is_empty()),
            _ => None,
        }
    }
}

/// The top-level fields of an SNS message that verification and normalization read; every
/// other field (`MessageAttributes`, `UnsubscribeURL`, …) is skipped without being built.
///
/// Scanning into this instead of a `serde_json::Value` map saves building a map of owned keys
/// and values for every request (SES's whole request is one RSA verification and this). A key
/// given twice keeps its last value, as a `Value` map would: logs written before must
/// normalize as they did.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    pub ty: Option<Field<'a>>,
    pub message_id: Option<Field<'a>>,
    pub topic_arn: Option<Field<'a>>,
    pub subject: Option<Field<'a>>,
    pub message: Option<Field<'a>>,
    pub timestamp: Option<Field<'a>>,
    pub signature_version: Option<Field<'a>>,
    pub signature: Option<Field<'a>>,
    pub signing_cert_url: Option<Field<'a>>,
    pub subscribe_url: Option<Field<'a>>,
    pub token: Option<Field<'a>>,
    /// An `eventType` or `notificationType` key: a bare SES record, not an SNS envelope.
    pub ses_record_key: bool,
}

/// What a body is at its top level.
// Lives on the stack for one request; boxing the fields would cost the allocation saved.
#[allow(clippy::large_enum_variant)]
pub enum Scanned<'a> {
    Object(Fields<'a>),
    /// Valid JSON, but not an object.
    NotObject,
}

impl<'a> Scanned<'a> {
    /// Scans a body; `Err` is serde_json's message for JSON that does not parse.
    pub fn scan(body: &'a [u8]) -> Result<Scanned<'a>, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// A visitor's `bool` and number methods, each answering `$value`: the scans below only need
/// to know that a value is not the string or object they read.
macro_rules! visit_numbers_and_bools_as {
    ($ty:ty, $value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<$ty, E> {
            Ok($value)
        }
    };
}

impl<'de> serde::Deserialize<'de> for Field<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Owned(s)))
            }
            fn visit_unit<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Null)
            }
            visit_numbers_and_bools_as!(Field<'de>, Field::Other);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
                serde::de::IgnoredAny.visit_seq(a).map(|_| Field::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
                serde::de::IgnoredAny.visit_map(a).map(|_| Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for Scanned<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scanned<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Scanned<'de>, A::Error> {
                let mut f = Fields::default();
                // Keys as `Field`, not `Cow<str>`: serde's `Cow` always allocates.
                while let Some(key) = a.next_key::<Field<'de>>()? {
                    let Field::Str(key) = key else {
                        unreachable!("JSON object keys are strings")
                    };
                    let slot = match &*key {
                        "Type" => &mut f.ty,
                        "MessageId" => &mut f.message_id,
                        "TopicArn" => &mut f.topic_arn,
                        "Subject" => &mut f.subject,
                        "Message" => &mut f.message,
                        "Timestamp" => &mut f.timestamp,
                        "SignatureVersion" => &mut f.signature_version,
                        "Signature" => &mut f.signature,
                        "SigningCertURL" => &mut f.signing_cert_url,
                        "SubscribeURL" => &mut f.subscribe_url,
                        "Token" => &mut f.token,
                        other => {
                            if other == "eventType" || other == "notificationType" {
                                f.ses_record_key = true;
                            }
                            a.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(a.next_value::<Field<'de>>()?);
                }
                Ok(Scanned::Object(f))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Scanned<'de>, A::Error> {
                IgnoredAny.visit_seq(a).map(|_| Scanned::NotObject)
            }
            fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Scanned<'de>, E> {
                Ok(Scanned::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Scanned<'de>, E> {
                Ok(Scanned::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Scanned<'de>, E> {
                Ok(Scanned::NotObject)
            }
            visit_numbers_and_bools_as!(Scanned<'de>, Scanned::NotObject);
        }
        d.deserialize_any(V)
    }
}

fn req_str<'f>(field: &'f Option<Field<'_>>, k: &str, kind: &str) -> Result<&'f str, Rejection> {
    match field {
        Some(Field::Str(s)) if !s.is_empty() => Ok(s),
        Some(Field::Str(_)) => Err(Rejection::malformed(format!(
            "SNS {kind} field '{k}' is empty"
        ))),
        Some(_) => Err(Rejection::malformed(format!(
            "SNS {kind} field '{k}' must be a string"
        ))),
        None => Err(Rejection::malformed(format!(
            "SNS {kind} has no '{k}' field; SNS always sends it (is raw message delivery on, or \
             is this not from Amazon SNS?)"
        ))),
    }
}

fn parse_url(s: &str, field: &str) -> Result<Url, Rejection> {
    Url::parse(s).map_err(|e| Rejection::malformed(format!("'{field}' is not a URL ({e}): {s:?}")))
}

impl Envelope {
    /// Checks everything that can be checked without the network: the type header agrees with
    /// the body, every field the signature covers is present, the signature decodes.
    pub fn parse(body: &[u8], headers: &HeaderMap) -> Result<Envelope, Rejection> {
        let mut obj = match Scanned::scan(body) {
            Ok(Scanned::Object(o)) => o,
            Ok(Scanned::NotObject) => {
                return Err(Rejection::malformed(
                    "Amazon SNS posts one JSON object per message; got another JSON type",
                ))
            }
            Err(e) => return Err(Rejection::malformed(format!("body is not valid JSON: {e}"))),
        };
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        if obj.ty.is_none() && (obj.ses_record_key || header(RAW_DELIVERY_HEADER) == Some("true")) {
            return Err(Rejection::malformed(
                "this is a bare SES record without its SNS envelope: turn off 'raw message \
                 delivery' on the SNS subscription (only the envelope is signed, so raw messages \
                 cannot be verified)",
            ));
        }
        let type_body = req_str(&obj.ty, "Type", "message")?;
        let kind = MessageType::parse(type_body).ok_or_else(|| {
            Rejection::malformed(format!(
                "unknown SNS message Type '{type_body}' (expected SubscriptionConfirmation, \
                 Notification or UnsubscribeConfirmation)"
            ))
        })?;
        match header(MESSAGE_TYPE_HEADER) {
            None => {
                return Err(Rejection::malformed(format!(
                "missing the {MESSAGE_TYPE_HEADER} header that Amazon SNS sends with every message"
            )))
            }
            Some(h) if h != type_body => {
                return Err(Rejection::malformed(format!(
                    "{MESSAGE_TYPE_HEADER} header says '{h}' but the body's Type is '{type_body}'; \
                     they must agree"
                )))
            }
            Some(_) => {}
        }
        let k = kind.as_str();
        let topic_raw = req_str(&obj.topic_arn, "TopicArn", k)?;
        let topic = TopicArn::parse(topic_raw).map_err(Rejection::malformed)?;
        if let Some(h) = header(TOPIC_ARN_HEADER) {
            if h != topic.arn {
                return Err(Rejection::malformed(format!(
                    "{TOPIC_ARN_HEADER} header '{h}' differs from the body's TopicArn '{}'",
                    topic.arn
                )));
            }
        }
        let message_id = req_str(&obj.message_id, "MessageId", k)?.to_string();
        // `Message` may legitimately be empty in a Notification, but it must be there: it is
        // part of the string to sign.
        let message = match obj.message.take() {
            Some(Field::Str(s)) => s.into_owned(),
            Some(_) => {
                return Err(Rejection::malformed(format!(
                    "SNS {k} field 'Message' must be a string"
                )))
            }
            None => {
                return Err(Rejection::malformed(format!(
                    "SNS {k} has no 'Message' field"
                )))
            }
        };
        let timestamp = req_str(&obj.timestamp, "Timestamp", k)?.to_string();
        let signature_version = match req_str(&obj.signature_version, "SignatureVersion", k)? {
            "1" => SignatureVersion::V1,
            "2" => SignatureVersion::V2,
            other => {
                return Err(Rejection::malformed(format!(
                "SignatureVersion '{other}' is not supported (1 = SHA1withRSA, 2 = SHA256withRSA)"
            )))
            }
        };
        let signature = B64
            .decode(req_str(&obj.signature, "Signature", k)?.as_bytes())
            .map_err(|e| {
                Rejection::unauthorized(format!("SNS Signature is not valid base64 ({e})"))
            })?;
        let signing_cert_url = parse_url(
            req_str(&obj.signing_cert_url, "SigningCertURL", k)?,
            "SigningCertURL",
        )?;
        let subject = match (kind, obj.subject.take()) {
            (MessageType::Notification, Some(Field::Str(s))) => Some(s.into_owned()),
            (MessageType::Notification, Some(Field::Null) | None) => None,
            (MessageType::Notification, Some(_)) => {
                return Err(Rejection::malformed(
                    "SNS Notification field 'Subject' must be a string",
                ))
            }
            // Not part of a confirmation's string to sign: ignored there.
            _ => None,
        };
        let (subscribe_url, subscribe_url_signed, token) = match kind {
            MessageType::Notification => (None, None, None),
            _ => {
                let raw = req_str(&obj.subscribe_url, "SubscribeURL", k)?;
                (
                    Some(parse_url(raw, "SubscribeURL")?),
                    Some(raw.to_string()),
                    Some(req_str(&obj.token, "Token", k)?.to_string()),
                )
            }
        };
        Ok(Envelope {
            kind,
            message_id,
            topic,
            subject,
            message,
            timestamp,
            signature_version,
            signature,
            signing_cert_url,
            subscribe_url,
            subscribe_url_signed,
            token,
        })
    }

    /// The string SNS signs: `name\nvalue\n` for a fixed set of keys in byte order, values as
    /// decoded from JSON (escapes such as `\n` become the real characters). Notifications sign
    /// `Message, MessageId, [Subject], Timestamp, TopicArn, Type`; confirmations sign
    /// `Message, MessageId, SubscribeURL, Timestamp, Token, TopicArn, Type`. Other fields
    /// (`MessageAttributes`, `UnsubscribeURL`, …) are not covered, so nothing may trust them.
    pub fn string_to_sign(&self) -> String {
        let mut out = String::with_capacity(self.message.len() + 512);
        let mut push = |k: &str, v: &str| {
            out.push_str(k);
            out.push('\n');
            out.push_str(v);
            out.push('\n');
        };
        push("Message", &self.message);
        push("MessageId", &self.message_id);
        match self.kind {
            MessageType::Notification => {
                if let Some(s) = &self.subject {
                    push("Subject", s);
                }
                push("Timestamp", &self.timestamp);
            }
            _ => {
                push(
                    "SubscribeURL",
                    self.subscribe_url_signed.as_deref().unwrap_or_default(),
                );
                push("Timestamp", &self.timestamp);
                push("Token", self.token.as_deref().unwrap_or_default());
            }
        }
        push("TopicArn", &self.topic.arn);
        push("Type", self.kind.as_str());
        out
    }
}

/// A signing certificate's RSA key, as `ring` verifies with it (PKCS#1 `RSAPublicKey` DER).
///
/// `ring`'s RSA verification is several times faster than the portable `rsa` crate's, and one
/// verification is nearly all an SNS request costs; `rsa` still parses the key at load, where
/// its errors name what is wrong.
#[derive(Debug)]
pub struct SnsKey {
    pkcs1: Vec<u8>,
}

/// Verifies the envelope's RSA PKCS#1 v1.5 signature with the signing certificate's key.
pub fn verify_signature(key: &SnsKey, env: &Envelope) -> bool {
    let sts = env.string_to_sign();
    let alg = match env.signature_version {
        SignatureVersion::V1 => &RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        SignatureVersion::V2 => &RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(alg, &key.pkcs1)
        .verify(sts.as_bytes(), &env.signature)
        .is_ok()
}

/// The RSA key of a PEM signing certificate.
///
/// Validity dates and the chain are deliberately not checked here: the certificate is trusted
/// because it was fetched over TLS (verified against the web PKI roots) from a host the
/// allow-list pins to Amazon SNS, which is also how AWS's own SNS message validators work.
/// The real AWS fixtures in the tests are expired (2016, 2022), so offline tests could not
/// check dates anyway.
pub fn public_key_from_pem(pem: &[u8]) -> Result<SnsKey, String> {
    let cert = x509_cert::Certificate::from_pem(pem)
        .map_err(|e| format!("not a PEM X.509 certificate ({e})"))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let spki_der = spki
        .to_der()
        .map_err(|e| format!("certificate public key does not encode ({e})"))?;
    let key = RsaPublicKey::from_public_key_der(&spki_der)
        .map_err(|e| format!("certificate key is not an RSA key ({e})"))?;
    let bits = key.size() * 8;
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "certificate key is RSA-{bits}; Amazon SNS signs with 2048 to 8192-bit keys"
        ));
    }
    let pkcs1 = spki
        .subject_public_key
        .as_bytes()
        .ok_or("certificate public key is not a whole number of bytes")?
        .to_vec();
    Ok(SnsKey { pkcs1 })
}

/// Checks a URL names an Amazon SNS endpoint exactly — `https://sns.<region>.amazonaws.com`
/// or `https://sns.<region>.amazonaws.com.cn`, default port, no user info — and returns the
/// region. Anything else is refused before a single byte goes out (SSRF).
pub fn sns_endpoint_region(url: &Url) -> Result<String, String> {
    if url.scheme() != "https" {
        return Err(format!(
            "scheme must be https, got '{}': {url}",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("URL must not carry user info: {url}"));
    }
    if url.port().is_some() {
        return Err(format!("URL must use the default https port: {url}"));
    }
    let Some(Host::Domain(host)) = url.host() else {
        return Err(format!("host must be sns.<region>.amazonaws.com: {url}"));
    };
    let region = host
        .strip_prefix("sns.")
        .and_then(|rest| {
            rest.strip_suffix(".amazonaws.com")
                .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))
        })
        .filter(|r| is_region(r))
        .ok_or_else(|| {
            format!(
                "host '{host}' is not sns.<region>.amazonaws.com[.cn]; only Amazon SNS is trusted"
            )
        })?;
    Ok(region.to_string())
}

/// The `SigningCertURL` rule: an SNS endpoint, a path ending in `.pem`, no query or fragment.
pub fn check_cert_url(url: &Url) -> Result<(), String> {
    sns_endpoint_region(url)?;
    if !url.path().ends_with(".pem") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "a signing certificate URL is a .pem path with no query: {url}"
        ));
    }
    Ok(())
}

/// The `SubscribeURL` rule: an SNS endpoint *in the topic's own region* (a confirmation sent
/// to another region's endpoint fails, and a mismatch means the message is not what it seems)
/// asking for `Action=ConfirmSubscription`. With [`DangerousTestTrust`], its one loopback
/// origin is also allowed.
pub fn check_subscribe_url(
    url: &Url,
    topic: &TopicArn,
    trust: Option<&DangerousTestTrust>,
) -> Result<(), String> {
    let trusted_local = trust.is_some_and(|t| t.allows(url));
    if !trusted_local {
        let region = sns_endpoint_region(url)?;
        if region != topic.region {
            return Err(format!(
                "SubscribeURL is in region '{region}' but the topic {} is in '{}'",
                topic.arn, topic.region
            ));
        }
    }
    if url.fragment().is_some()
        || !url
            .query_pairs()
            .any(|(k, v)| k == "Action" && v == "ConfirmSubscription")
    {
        return Err(format!(
            "SubscribeURL must ask for Action=ConfirmSubscription: {url}"
        ));
    }
    if let Some((_, t)) = url.query_pairs().find(|(k, _)| k == "TopicArn") {
        if t != topic.arn.as_str() {
            return Err(format!(
                "SubscribeURL confirms topic '{t}' but the message is for '{}'",
                topic.arn
            ));
        }
    }
    Ok(())
}

/// TEST ONLY: lets the confirmation GET go to one loopback origin (a local HTTPS stand-in for
/// SNS) and makes the HTTP client trust one extra root certificate.
///
/// It can only be built in code: no configuration key, environment variable or CLI flag
/// reaches it, it is off unless a caller passes one, it refuses any origin that is not
/// `https://` on a loopback IP, and enabling it logs a warning. The certificate URL rule is
/// never relaxed by it.
#[derive(Clone)]
pub struct DangerousTestTrust {
    origin: Url,
    root_cert_der: Vec<u8>,
}

impl std::fmt::Debug for DangerousTestTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DangerousTestTrust")
            .field("origin", &self.origin.as_str())
            .finish()
    }
}

impl DangerousTestTrust {
    pub fn new(origin: &str, root_cert_der: Vec<u8>) -> Result<DangerousTestTrust, String> {
        let origin = Url::parse(origin).map_err(|e| format!("origin is not a URL: {e}"))?;
        let loopback = match origin.host() {
            Some(Host::Ipv4(ip)) => ip.is_loopback(),
            Some(Host::Ipv6(ip)) => ip.is_loopback(),
            _ => false,
        };
        if origin.scheme() != "https" || !loopback {
            return Err(format!(
                "DangerousTestTrust only allows https on a loopback IP, got {origin}"
            ));
        }
        tracing::warn!(origin = %origin, "DANGEROUS: SNS test trust enabled: SubscribeURLs on this local origin will be fetched and an extra root certificate is trusted. Never in production.");
        Ok(DangerousTestTrust {
            origin,
            root_cert_der,
        })
    }

    fn allows(&self, url: &Url) -> bool {
        url.scheme() == self.origin.scheme()
            && url.host() == self.origin.host()
            && url.port_or_known_default() == self.origin.port_or_known_default()
            && url.username().is_empty()
            && url.password().is_none()
    }
}

/// Why an outbound SNS request failed: worth a retry (network, 5xx), or not (4xx, garbage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    Unavailable(String),
    Refused(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Unavailable(m) | FetchError::Refused(m) => f.write_str(m),
        }
    }
}

/// The only two requests the SES adapter ever makes. Callers pass URLs that already passed
/// [`check_cert_url`] / [`check_subscribe_url`]; implementations must not follow redirects.
#[async_trait]
pub trait SnsHttp: Send + Sync + 'static {
    /// GETs a signing certificate (PEM bytes).
    async fn fetch_certificate(&self, url: &Url) -> Result<Vec<u8>, FetchError>;
    /// GETs a SubscribeURL; returns the response body on 2xx.
    async fn confirm_subscription(&self, url: &Url) -> Result<String, FetchError>;
}

/// The production [`SnsHttp`]: rustls with the web PKI roots, short timeouts, no redirects
/// (a redirect could leave the allow-listed host), bounded response bodies.
pub struct ReqwestSnsHttp {
    client: reqwest::Client,
}

impl ReqwestSnsHttp {
    pub fn new() -> Result<ReqwestSnsHttp, String> {
        Self::build(None)
    }

    /// Also trusts the test root certificate of `trust`; see [`DangerousTestTrust`].
    pub fn with_dangerous_test_trust(trust: &DangerousTestTrust) -> Result<ReqwestSnsHttp, String> {
        Self::build(Some(trust))
    }

    fn build(trust: Option<&DangerousTestTrust>) -> Result<ReqwestSnsHttp, String> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .user_agent(concat!("xsender-events/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = trust {
            let cert = reqwest::Certificate::from_der(&t.root_cert_der)
                .map_err(|e| format!("test root certificate: {e}"))?;
            b = b.add_root_certificate(cert);
        }
        let client = b.build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(ReqwestSnsHttp { client })
    }

    async fn get(&self, url: &Url, limit: usize) -> Result<Vec<u8>, FetchError> {
        let mut resp = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| FetchError::Unavailable(format!("GET {url}: {e}")))?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(FetchError::Unavailable(format!("GET {url}: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(FetchError::Refused(format!("GET {url}: HTTP {status}")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| FetchError::Unavailable(format!("GET {url}: reading body: {e}")))?
        {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::Refused(format!(
                    "GET {url}: response larger than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

#[async_trait]
impl SnsHttp for ReqwestSnsHttp {
    async fn fetch_certificate(&self, url: &Url) -> Result<Vec<u8>, FetchError> {
        self.get(url, MAX_CERT_BYTES).await
    }

    async fn confirm_subscription(&self, url: &Url) -> Result<String, FetchError> {
        let body = self.get(url, MAX_CONFIRM_BYTES).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// What a certificate lookup ends in, shared by every request that waited for it.
type KeyResult = Result<Arc<SnsKey>, FetchError>;

struct CacheEntry {
    cell: Arc<OnceCell<KeyResult>>,
    created: Instant,
}

/// Signing keys by certificate URL, bounded and expiring. Concurrent requests for the same
/// uncached certificate share one fetch (one `OnceCell` per URL); a failed fetch is shared by
/// those waiting for it, then forgotten so the next request tries again.
pub struct CertCache {
    entries: Mutex<HashMap<String, CacheEntry>>,
    capacity: usize,
    ttl: Duration,
}

impl CertCache {
    pub fn new(capacity: usize, ttl: Duration) -> CertCache {
        CertCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            ttl,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A poisoned lock only means another thread panicked mid-update of a plain map; the
    /// map is still usable, so carry on rather than propagate the panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CacheEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cell_for(&self, url: &str) -> Arc<OnceCell<KeyResult>> {
        let now = Instant::now();
        let mut map = self.lock();
        if let Some(e) = map.get(url) {
            if now.duration_since(e.created) < self.ttl {
                return e.cell.clone();
            }
        }
        map.retain(|_, e| now.duration_since(e.created) < self.ttl);
        while map.len() >= self.capacity {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        let cell = Arc::new(OnceCell::new());
        map.insert(
            url.to_string(),
            CacheEntry {
                cell: cell.clone(),
                created: now,
            },
        );
        cell
    }

    /// The key of the certificate at `url` (which must have passed [`check_cert_url`]).
    pub async fn key(&self, url: &Url, http: &dyn SnsHttp) -> KeyResult {
        let cell = self.cell_for(url.as_str());
        let result = cell
            .get_or_init(|| async {
                let pem = http.fetch_certificate(url).await?;
                public_key_from_pem(&pem)
                    .map(Arc::new)
                    .map_err(|e| FetchError::Refused(format!("certificate at {url}: {e}")))
            })
            .await
            .clone();
        if result.is_err() {
            let mut map = self.lock();
            if map
                .get(url.as_str())
                .is_some_and(|e| Arc::ptr_eq(&e.cell, &cell))
            {
                map.remove(url.as_str());
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn topic_arns_parse_strictly() {
        let t = TopicArn::parse("arn:aws:sns:us-east-2:295079676684:publish-and-verify").unwrap();
        assert_eq!(t.region, "us-east-2");
        assert_eq!(t.account, "295079676684");
        assert!(TopicArn::parse("arn:aws-cn:sns:cn-north-1:123456789012:t.fifo").is_ok());
        for bad in [
            "",
            "arn:aws:sqs:us-east-1:123456789012:q",
            "arn:aws:sns:us-east-1:1234:t",
            "arn:aws:sns:US-EAST-1:123456789012:t",
            "arn:aws:sns:us-east-1:123456789012:",
            "arn:aws:sns:us-east-1:123456789012:t:extra",
            "arn:evil:sns:us-east-1:123456789012:t",
        ] {
            assert!(TopicArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_sns_endpoints_are_trusted_for_certificates() {
        for ok in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
            "https://sns.us-gov-west-1.amazonaws.com/a.pem",
            "https://SNS.US-EAST-1.AMAZONAWS.COM:443/a.pem",
        ] {
            assert!(check_cert_url(&u(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "http://sns.us-east-1.amazonaws.com/a.pem",
            "https://sns.us-east-1.amazonaws.com.evil.com/a.pem",
            "https://evil.com/sns.us-east-1.amazonaws.com/a.pem",
            "https://sns.us-east-1.amazonaws.com@evil.com/a.pem",
            "https://user:pw@sns.us-east-1.amazonaws.com/a.pem",
            "https://sns.us-east-1.amazonaws.com:8443/a.pem",
            "https://sns.us-east-1.amazonaws.com/a.txt",
            "https://sns.us-east-1.amazonaws.com/a.pem?x=1",
            "https://s3.us-east-1.amazonaws.com/a.pem",
            "https://sns.amazonaws.com/a.pem",
            "https://sns..amazonaws.com/a.pem",
            "https://sns.us-east-1.amazonaws.com./a.pem",
            "https://127.0.0.1/a.pem",
            "https://sns.evil.com/a.pem",
        ] {
            assert!(check_cert_url(&u(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn subscribe_urls_must_be_in_the_topics_region() {
        let topic = TopicArn::parse("arn:aws:sns:us-east-1:123456789012:t").unwrap();
        let ok = u("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:t&Token=abc");
        assert!(check_subscribe_url(&ok, &topic, None).is_ok());
        let other_region =
            u("https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=abc");
        assert!(check_subscribe_url(&other_region, &topic, None)
            .unwrap_err()
            .contains("region"));
        let other_topic = u("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:x");
        assert!(check_subscribe_url(&other_topic, &topic, None).is_err());
        let not_confirm = u("https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe");
        assert!(check_subscribe_url(&not_confirm, &topic, None).is_err());
        let local = u("https://127.0.0.1:4443/?Action=ConfirmSubscription&Token=abc");
        assert!(check_subscribe_url(&local, &topic, None).is_err());
    }

    #[test]
    fn dangerous_test_trust_allows_one_loopback_origin_only() {
        assert!(DangerousTestTrust::new("https://example.com", vec![]).is_err());
        assert!(DangerousTestTrust::new("http://127.0.0.1:1", vec![]).is_err());
        assert!(DangerousTestTrust::new("https://10.0.0.1:1", vec![]).is_err());
        let t = DangerousTestTrust::new("https://127.0.0.1:4443", vec![]).unwrap();
        let topic = TopicArn::parse("arn:aws:sns:us-east-1:123456789012:t").unwrap();
        let ok = u("https://127.0.0.1:4443/?Action=ConfirmSubscription&Token=abc");
        assert!(check_subscribe_url(&ok, &topic, Some(&t)).is_ok());
        let other_port = u("https://127.0.0.1:4444/?Action=ConfirmSubscription&Token=abc");
        assert!(check_subscribe_url(&other_port, &topic, Some(&t)).is_err());
        // Certificates are never fetched from the test origin.
        assert!(check_cert_url(&u("https://127.0.0.1:4443/a.pem")).is_err());
    }
}
