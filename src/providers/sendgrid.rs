//! SendGrid Event Webhook: batched JSON arrays, signed with ECDSA P-256 over
//! `timestamp || raw body` (headers `X-Twilio-Email-Event-Webhook-{Signature,Timestamp}`), the
//! key shown in SendGrid's settings as base64 DER. Custom args arrive as top-level keys.

use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use serde::Deserialize;
use serde_json::Value;

use super::{
    attribute, check_timestamp, dead, event_key, malformed_body, parse_body, recipient_field,
    scalar_string, str_field, Credentials, Normalized, Provider, ProviderSettings, Rejection,
    Verified, WebhookRequest, XsMeta,
};
use crate::event::{BounceClass, DeliveryEvent, EventKind, RawEnvelope};
use crate::tenants::TenantSet;

pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";

pub struct SendGrid {
    tolerance: Duration,
}

impl SendGrid {
    pub fn new(settings: &ProviderSettings) -> Self {
        SendGrid {
            tolerance: settings.timestamp_tolerance,
        }
    }
}

/// A tenant's SendGrid section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    /// The "Verification Key" from SendGrid → Settings → Mail Settings → Signed Event Webhook:
    /// base64 of a DER SubjectPublicKeyInfo, with or without PEM armour.
    verification_key: String,
}

/// The prepared key, decoded once at load.
///
/// The key is checked with the RustCrypto `p256` parser at load (it names what is wrong with a
/// pasted key) and verified with `ring`, whose assembly P-256 verify is several times faster
/// than the portable one: one verification per request is the ingress's largest cost.
#[derive(Debug)]
pub struct SendGridKey {
    key: UnparsedPublicKey<Vec<u8>>,
    der: Vec<u8>,
}

/// Decodes a verification key as SendGrid displays it (base64 DER) or as PEM.
pub fn parse_verification_key(text: &str) -> Result<SendGridKey, String> {
    let b64: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = B64.decode(b64.as_bytes()).map_err(|e| {
        format!("verification_key is not base64 ({e}); paste the key exactly as SendGrid shows it")
    })?;
    let key = VerifyingKey::from_public_key_der(&der).map_err(|_| {
        "verification_key is not an ECDSA P-256 public key (expected base64 DER starting 'MFkw…')".to_string()
    })?;
    let point = key.to_encoded_point(false).as_bytes().to_vec();
    Ok(SendGridKey {
        key: UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point),
        der,
    })
}

fn header<'a>(req: &'a WebhookRequest<'_>, name: &str) -> Option<&'a str> {
    req.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Verifies a DER signature over the signed message (see [`signed_message`]). SendGrid's
/// signer does not normalize `s`, so a high-`s` signature is as valid as its low-`s` twin
/// (plain ECDSA verification, as `ring` does it, accepts both).
pub fn verify_signature(key: &SendGridKey, message: &[u8], sig_der: &[u8]) -> bool {
    key.key.verify(message, sig_der).is_ok()
}

/// The bytes SendGrid signs: the timestamp header's value followed by the raw body.
pub fn signed_message(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(timestamp.len() + body.len());
    m.extend_from_slice(timestamp.as_bytes());
    m.extend_from_slice(body);
    m
}

#[async_trait]
impl Provider for SendGrid {
    fn name(&self) -> &'static str {
        "sendgrid"
    }

    fn content_types(&self) -> &'static [&'static str] {
        &["application/json"]
    }

    fn parse_credentials(&self, section: &Value) -> Result<Credentials, String> {
        let s: Section = serde_json::from_value(section.clone()).map_err(|e| e.to_string())?;
        Ok(std::sync::Arc::new(parse_verification_key(
            &s.verification_key,
        )?))
    }

    async fn verify(
        &self,
        req: &WebhookRequest<'_>,
        tenants: &TenantSet,
    ) -> Result<Verified, Rejection> {
        // Structure first: a body that SendGrid could never have sent is a 400 whatever its
        // signature, and tells the sender exactly that.
        let items = count_items(req.body)?;

        let sig_b64 = header(req, SIGNATURE_HEADER).ok_or_else(|| {
            Rejection::unauthorized(
                "missing X-Twilio-Email-Event-Webhook-Signature: turn on Signed Event Webhook in SendGrid \
                 and store its verification key for this tenant",
            )
        })?;
        let ts = header(req, TIMESTAMP_HEADER).ok_or_else(|| {
            Rejection::unauthorized("missing X-Twilio-Email-Event-Webhook-Timestamp header")
        })?;
        let ts_secs: i64 = ts.parse().map_err(|_| {
            Rejection::unauthorized(
                "X-Twilio-Email-Event-Webhook-Timestamp is not a Unix time in seconds",
            )
        })?;
        // Parsed here only to name a malformed signature; `ring` verifies the same DER bytes.
        let sig = B64
            .decode(sig_b64)
            .ok()
            .filter(|der| Signature::from_der(der).is_ok())
            .ok_or_else(|| {
                Rejection::unauthorized(
                    "X-Twilio-Email-Event-Webhook-Signature is not a base64 DER ECDSA signature",
                )
            })?;
        check_timestamp(ts_secs, req.now_ms, self.tolerance)?;

        let message = signed_message(ts, req.body);
        let candidates = tenants.candidates(self.name(), req.route_tenant)?;
        if candidates.is_empty() {
            return Err(Rejection::unauthorized(
                "no tenant has a SendGrid verification key configured, so nothing can be verified: \
                 add [tenants.<id>.sendgrid] verification_key",
            ));
        }
        // Tenants sharing one SendGrid account share its key: check each distinct key once.
        let mut verified = Vec::new();
        let mut checked: Vec<(&[u8], bool)> = Vec::new();
        for (tenant, creds) in &candidates {
            let Some(key) = creds.downcast_ref::<SendGridKey>() else {
                continue;
            };
            let ok = match checked.iter().find(|(der, _)| *der == key.der.as_slice()) {
                Some((_, ok)) => *ok,
                None => {
                    let ok = verify_signature(key, &message, &sig);
                    checked.push((key.der.as_slice(), ok));
                    ok
                }
            };
            if ok {
                verified.push(tenant.clone());
            }
        }
        if verified.is_empty() {
            return Err(Rejection::unauthorized(match req.route_tenant {
                Some(t) => format!(
                    "signature does not verify with tenant '{t}'s SendGrid verification key"
                ),
                None => "signature does not verify with any tenant's SendGrid verification key"
                    .to_string(),
            }));
        }
        let default_tenant = (verified.len() == 1).then(|| verified[0].clone());
        Ok(Verified {
            tenants: verified,
            default_tenant,
            items,
            ..Default::default()
        })
    }

    fn normalize(&self, env: &RawEnvelope) -> Vec<Normalized> {
        let items = match parse_body(env) {
            Ok(Value::Array(a)) => a,
            Ok(v @ Value::Object(_)) => vec![v],
            Ok(_) => return vec![malformed_body(env, "not a JSON array")],
            Err(dead) => return vec![*dead],
        };
        items.iter().map(|item| normalize_item(env, item)).collect()
    }
}

/// Checks that the body is JSON of SendGrid's shape (an array of events, or one event object)
/// and counts its items, without building a `Value` tree: ingress only needs the count, and the
/// normalizer parses the envelope for real later.
fn count_items(body: &[u8]) -> Result<usize, Rejection> {
    use serde::de::IgnoredAny;
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let parsed = match first {
        Some(b'[') => serde_json::from_slice::<Vec<IgnoredAny>>(body).map(|a| Some(a.len())),
        Some(b'{') => serde_json::from_slice::<IgnoredAny>(body).map(|_| Some(1)),
        _ => serde_json::from_slice::<IgnoredAny>(body).map(|_| None),
    };
    match parsed {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(Rejection::malformed(
            "SendGrid posts a JSON array of event objects; got another JSON type",
        )),
        Err(e) => Err(Rejection::malformed(format!("body is not valid JSON: {e}"))),
    }
}

/// `sg_message_id` is `<X-Message-Id>.filter…`; async bounces carry only `smtp-id`
/// (`<X-Message-Id@host>`). Either way the X-Message-Id is the message id every event shares.
fn message_id(obj: &serde_json::Map<String, Value>) -> Option<String> {
    if let Some(sg) = str_field(obj, "sg_message_id") {
        return Some(sg.split(".filter").next().unwrap_or(sg).to_string());
    }
    let smtp = str_field(obj, "smtp-id")?;
    let inner = smtp.trim_start_matches('<').trim_end_matches('>');
    Some(inner.split('@').next().unwrap_or(inner).to_string())
}

fn normalize_item(env: &RawEnvelope, item: &Value) -> Normalized {
    let text = || item.to_string();
    let Some(obj) = item.as_object() else {
        return dead(env, "malformed_item", "event is not a JSON object", text());
    };
    let Some(event) = str_field(obj, "event") else {
        return dead(env, "missing_field", "event has no 'event' field", text());
    };
    let Some(ts) = obj
        .get("timestamp")
        .and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok()))
    else {
        return dead(
            env,
            "missing_field",
            "event has no integer 'timestamp'",
            text(),
        );
    };
    if event == "account_status_change" {
        // Account-level (compliance suspension etc.): no recipient to project, but an operator
        // must see it, so it is kept as a dead letter with its own reason.
        return dead(
            env,
            "account_event",
            "SendGrid account status change; no recipient to project",
            text(),
        );
    }
    let recipient = match recipient_field(env, obj, "email", event, text) {
        Ok(r) => r,
        Err(dead) => return *dead,
    };
    let kind = match event {
        "processed" => EventKind::Sent,
        "dropped" => EventKind::Dropped,
        "deferred" => EventKind::Deferred,
        "delivered" => EventKind::Delivered,
        "bounce" => EventKind::Bounced,
        "open" => EventKind::Opened,
        "click" => EventKind::Clicked,
        "spamreport" => EventKind::Complained,
        "unsubscribe" => EventKind::Unsubscribed,
        "group_unsubscribe" => EventKind::GroupUnsubscribed,
        "group_resubscribe" => EventKind::GroupResubscribed,
        // Kept for analytics; a future SendGrid event type must not be lost.
        _ => EventKind::Other,
    };
    let meta = XsMeta::from_object(obj);
    let msg_id = message_id(obj);
    let attribution = match attribute(env, &meta, msg_id.as_deref(), &recipient) {
        Ok(a) => a,
        Err((reason, detail)) => return dead(env, reason, detail, text()),
    };
    let bounce_type = str_field(obj, "type");
    let bounce_class = (kind == EventKind::Bounced).then_some(match bounce_type {
        // "blocked": the receiving server refused for now (reputation, content); retryable.
        Some("blocked") => BounceClass::Soft,
        _ => BounceClass::Hard,
    });
    let machine = kind == EventKind::Opened
        && obj.get("sg_machine_open").and_then(Value::as_bool) == Some(true);
    let url = str_field(obj, "url")
        .filter(|_| kind == EventKind::Clicked)
        .map(str::to_string);
    let group_id = obj.get("asm_group_id").and_then(scalar_string);
    let reason = match kind {
        EventKind::Bounced | EventKind::Dropped => str_field(obj, "reason"),
        EventKind::Deferred => str_field(obj, "response").or_else(|| str_field(obj, "reason")),
        _ => None,
    }
    .map(str::to_string);
    let ts_s = ts.to_string();
    let key = event_key(&[
        "sendgrid",
        event,
        &recipient,
        msg_id.as_deref().unwrap_or(""),
        &ts_s,
        url.as_deref().unwrap_or(""),
        bounce_type.unwrap_or(""),
        group_id.as_deref().unwrap_or(""),
        if machine { "m" } else { "" },
        // Deferrals repeat for one message; the attempt number tells them apart.
        &obj.get("attempt")
            .and_then(scalar_string)
            .unwrap_or_default(),
    ]);
    Normalized::Event(Box::new(DeliveryEvent {
        trace_parent: None,
        event_key: key,
        tenant: attribution.tenant,
        provider: "sendgrid".into(),
        kind,
        dispatch_key: attribution.dispatch_key,
        dispatch_id: attribution.dispatch_id,
        campaign_id: attribution.campaign_id,
        message_id: msg_id,
        recipient,
        occurred_at_ms: ts.saturating_mul(1000),
        received_at_ms: env.received_at_ms,
        envelope_id: env.id.clone(),
        provider_event: event.to_string(),
        provider_event_id: str_field(obj, "sg_event_id").map(str::to_string),
        bounce_class,
        reason,
        smtp_status: str_field(obj, "status").map(str::to_string),
        url,
        user_agent: str_field(obj, "useragent").map(str::to_string),
        ip: str_field(obj, "ip").map(str::to_string),
        machine,
        group_id: group_id.filter(|_| {
            matches!(
                kind,
                EventKind::GroupUnsubscribed | EventKind::GroupResubscribed
            )
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SendGrid's published test vector (sendgrid-nodejs eventwebhook spec and the other
    /// official SDKs): a real `dropped` event, ending in CRLF as SendGrid sends it.
    const PUBLIC_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==";
    const SIGNATURE: &str = "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=";
    const TIMESTAMP: &str = "1600112502";
    const PAYLOAD: &str = "[{\"email\":\"hello@world.com\",\"event\":\"dropped\",\"reason\":\"Bounced Address\",\"sg_event_id\":\"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA\",\"sg_message_id\":\"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0\",\"smtp-id\":\"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>\",\"timestamp\":1600112492}]\r\n";
    /// The wrong key the SDK tests use.
    const WRONG_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8REntlo7aNDthvj+y7GjUuFDb/R1NGe1OPzpA==";

    fn sig() -> Vec<u8> {
        B64.decode(SIGNATURE).unwrap()
    }

    #[test]
    fn sendgrid_published_vector_verifies() {
        let key = parse_verification_key(PUBLIC_KEY).unwrap();
        assert!(verify_signature(
            &key,
            &signed_message(TIMESTAMP, PAYLOAD.as_bytes()),
            &sig()
        ));
    }

    #[test]
    fn any_change_breaks_the_vector() {
        let key = parse_verification_key(PUBLIC_KEY).unwrap();
        // Re-serialised JSON (CRLF dropped) must fail: we verify raw bytes only.
        let trimmed = PAYLOAD.trim_end();
        assert!(!verify_signature(
            &key,
            &signed_message(TIMESTAMP, trimmed.as_bytes()),
            &sig()
        ));
        assert!(!verify_signature(
            &key,
            &signed_message("1600112503", PAYLOAD.as_bytes()),
            &sig()
        ));
        let wrong = parse_verification_key(WRONG_KEY).unwrap();
        assert!(!verify_signature(
            &wrong,
            &signed_message(TIMESTAMP, PAYLOAD.as_bytes()),
            &sig()
        ));
    }

    #[test]
    fn a_high_s_signature_verifies_like_its_low_s_twin() {
        use p256::ecdsa::signature::Signer;
        use p256::ecdsa::SigningKey;
        use p256::pkcs8::EncodePublicKey;
        let signing = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let der = signing.verifying_key().to_public_key_der().unwrap();
        let key = parse_verification_key(&B64.encode(der.as_bytes())).unwrap();
        let message = signed_message(TIMESTAMP, PAYLOAD.as_bytes());
        let low: Signature = signing.sign(&message);
        let (r, s) = low.split_scalars();
        let high = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        assert!(high.normalize_s().is_some(), "the twin is the high-s form");
        assert!(verify_signature(&key, &message, low.to_der().as_bytes()));
        assert!(verify_signature(&key, &message, high.to_der().as_bytes()));
        let other = signed_message("1600112503", PAYLOAD.as_bytes());
        assert!(!verify_signature(&key, &other, high.to_der().as_bytes()));
    }

    #[test]
    fn keys_are_accepted_as_shown_or_as_pem_and_rejected_with_a_reason() {
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n",
            &PUBLIC_KEY[..64],
            &PUBLIC_KEY[64..]
        );
        assert!(parse_verification_key(&pem).is_ok());
        assert!(parse_verification_key("not base64!")
            .unwrap_err()
            .contains("base64"));
        assert!(parse_verification_key("aGVsbG8=")
            .unwrap_err()
            .contains("P-256"));
    }

    #[test]
    fn message_id_is_shared_by_sg_message_id_and_smtp_id() {
        let a = serde_json::json!({"sg_message_id": " 14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"});
        let b = serde_json::json!({"smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>"});
        assert_eq!(
            message_id(a.as_object().unwrap()).as_deref(),
            Some("14c5d75ce93.dfd.64b469")
        );
        assert_eq!(
            message_id(b.as_object().unwrap()).as_deref(),
            Some("14c5d75ce93.dfd.64b469")
        );
    }
}
