//! Mailgun webhooks, current JSON form: one event per POST,
//! `{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}`, where
//! `signature = hex(HMAC-SHA256(HTTP webhook signing key, timestamp || token))`.
//!
//! Mailgun signs only the timestamp and token, not the body, so the signature proves that the
//! pair came from Mailgun but not what it was attached to. What stops a captured request being
//! replayed (or its event swapped) is the timestamp window plus the token being single-use:
//! both are enforced here, and the token is spent only after the signature verifies, so a
//! forger cannot burn genuine tokens. Retries by Mailgun are new, freshly signed requests.
//!
//! The legacy form-encoded webhooks are answered with a 415 that says how to switch (see
//! [`LEGACY_HELP`]): the JSON webhooks carry everything the legacy ones did, and supporting two
//! wire formats (one of which spreads user variables over top-level form fields) would double
//! the parsing surface for no gain.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use hyper::header::CONTENT_TYPE;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

use super::{
    attribute, body_prefix, check_timestamp, dead, event_key, normalize_email, parse_body,
    scalar_string, str_field, Credentials, Normalized, Provider, ProviderSettings, Rejection,
    ReplayClaim, ReplayGuard, Verified, WebhookRequest, XsMeta,
};
use crate::event::{BounceClass, DeliveryEvent, EventKind, RawEnvelope};
use crate::secret::Secret;
use crate::tenants::TenantSet;

/// The replay-guard namespace for Mailgun tokens.
const REPLAY_SCOPE: &str = "mailgun";

/// Latest accepted event time (9999-12-31T23:59:59Z), so a hostile timestamp cannot overflow
/// millisecond arithmetic downstream.
const MAX_TS_SECS: f64 = 253_402_300_799.0;

/// Mailgun tokens are 50 characters; anything far longer is not from Mailgun.
const MAX_TOKEN_LEN: usize = 256;

/// What a legacy (form-encoded) webhook gets back, with its 415.
pub const LEGACY_HELP: &str = "this is a legacy form-encoded Mailgun webhook; xsender-events \
accepts only Mailgun's current JSON webhooks (same signing key, full event data). In the \
Mailgun control panel open Sending → Webhooks, pick the sending domain, remove the legacy \
webhook URL and add this URL again for each event type (webhooks added there post \
application/json), or create them with the Webhooks API (POST /v3/domains/<domain>/webhooks)";

pub struct Mailgun {
    tolerance: Duration,
    replay: Arc<dyn ReplayGuard>,
}

impl Mailgun {
    pub fn new(settings: &ProviderSettings) -> Self {
        Mailgun {
            tolerance: settings.timestamp_tolerance,
            replay: settings.replay_guard.clone(),
        }
    }
}

/// A tenant's Mailgun section: `[tenants.<id>.mailgun] signing_key = "..."`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    /// The "HTTP webhook signing key" from Mailgun → Sending → Webhooks (not the private API
    /// key, which very old accounts used for this).
    signing_key: Secret,
}

/// The prepared signing key.
#[derive(Debug)]
pub struct MailgunKey {
    key: Secret,
}

/// The HMAC Mailgun computes: over `timestamp || token`, exactly as they appear in the body.
/// `verify_slice` compares in constant time.
pub fn signature_matches(key: &[u8], timestamp: &str, token: &str, signature: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    mac.verify_slice(signature).is_ok()
}

/// The signed part of a webhook body.
struct Signed<'a> {
    timestamp: &'a str,
    ts_secs: i64,
    token: &'a str,
    signature: &'a str,
    /// Subaccount webhooks also carry the same pair signed with the primary account's key.
    parent_signature: Option<&'a str>,
}

/// Checks the shape Mailgun always sends and extracts the signed fields. Every error here is
/// a body Mailgun could never have produced (400).
fn parse_signed(root: &Value) -> Result<Signed<'_>, String> {
    let Some(root) = root.as_object() else {
        return Err(
            "Mailgun posts a JSON object with 'signature' and 'event-data'; got another JSON type"
                .into(),
        );
    };
    let sig = match root.get("signature") {
        Some(Value::Object(s)) => s,
        Some(_) => {
            return Err("'signature' must be an object {timestamp, token, signature}".into())
        }
        None => return Err("missing 'signature' object: is this a Mailgun JSON webhook?".into()),
    };
    let text = |k: &str| match sig.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
        Some(Value::String(_)) => Err(format!("signature.{k} is empty")),
        Some(_) => Err(format!("signature.{k} must be a string")),
        None => Err(format!("missing signature.{k}")),
    };
    let timestamp = text("timestamp")?;
    let token = text("token")?;
    let signature = text("signature")?;
    let ts_secs = (timestamp.len() <= 12 && timestamp.bytes().all(|b| b.is_ascii_digit()))
        .then(|| timestamp.parse::<i64>().ok())
        .flatten()
        .ok_or_else(|| {
            format!(
                "signature.timestamp must be Unix seconds as a string of digits; got {timestamp:?}"
            )
        })?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "signature.token is {} characters; Mailgun tokens are 50",
            token.len()
        ));
    }
    let event = match root.get("event-data") {
        Some(Value::Object(e)) => e,
        Some(_) => return Err("'event-data' must be an object".into()),
        None => return Err("missing 'event-data' object".into()),
    };
    match event.get("event") {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        Some(Value::String(_)) | None => return Err("missing event-data.event".into()),
        Some(_) => return Err("event-data.event must be a string".into()),
    }
    event_time(event)?;
    Ok(Signed {
        timestamp,
        ts_secs,
        token,
        signature,
        parent_signature: sig.get("parent-signature").and_then(Value::as_str),
    })
}

/// `event-data.timestamp`: float seconds (`1534108637.153125`) → milliseconds.
fn event_time(event: &Map<String, Value>) -> Result<i64, String> {
    match event.get("timestamp") {
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if (0.0..=MAX_TS_SECS).contains(&t) => Ok((t * 1000.0).round() as i64),
            _ => Err(format!(
                "event-data.timestamp {n} is not a Unix time in seconds"
            )),
        },
        Some(_) => Err("event-data.timestamp must be a number (Unix seconds)".into()),
        None => Err("missing event-data.timestamp".into()),
    }
}

fn content_type_essence(req: &WebhookRequest<'_>) -> Option<String> {
    let ct = req.headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(ct.split(';').next()?.trim().to_ascii_lowercase())
}

#[async_trait]
impl Provider for Mailgun {
    fn name(&self) -> &'static str {
        "mailgun"
    }

    /// The form types are listed so that legacy webhooks reach [`Provider::verify`] and get
    /// [`LEGACY_HELP`] instead of a bare 415.
    fn content_types(&self) -> &'static [&'static str] {
        &[
            "application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ]
    }

    fn parse_credentials(&self, section: &Value) -> Result<Credentials, String> {
        let s: Section = serde_json::from_value(section.clone()).map_err(|e| e.to_string())?;
        if s.signing_key.expose().trim().is_empty() {
            return Err(
                "signing_key is empty: copy the HTTP webhook signing key from Mailgun → \
                        Sending → Webhooks"
                    .into(),
            );
        }
        if s.signing_key.expose().trim() != s.signing_key.expose() {
            return Err("signing_key has leading or trailing whitespace".into());
        }
        Ok(Arc::new(MailgunKey { key: s.signing_key }))
    }

    async fn verify(
        &self,
        req: &WebhookRequest<'_>,
        tenants: &TenantSet,
    ) -> Result<Verified, Rejection> {
        if content_type_essence(req).is_some_and(|e| e != "application/json") {
            return Err(Rejection::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "legacy_webhook",
                LEGACY_HELP,
            ));
        }
        // Structure first: a body Mailgun could never have sent is a 400 whatever its
        // signature, and says exactly what is wrong.
        let root: Value = serde_json::from_slice(req.body)
            .map_err(|e| Rejection::malformed(format!("body is not valid JSON: {e}")))?;
        let signed = parse_signed(&root).map_err(Rejection::malformed)?;
        let sig = hex::decode(signed.signature)
            .ok()
            .filter(|s| s.len() == 32)
            .ok_or_else(|| {
                Rejection::unauthorized(
                    "signature.signature is not a hex HMAC-SHA256 (64 hex characters)",
                )
            })?;
        let parent_sig = signed
            .parent_signature
            .and_then(|p| hex::decode(p).ok())
            .filter(|s| s.len() == 32);
        check_timestamp(signed.ts_secs, req.now_ms, self.tolerance)?;

        let candidates = tenants.candidates(self.name(), req.route_tenant)?;
        if candidates.is_empty() {
            return Err(Rejection::unauthorized(
                "no tenant has a Mailgun signing key configured, so nothing can be verified: \
                 add [tenants.<id>.mailgun] signing_key",
            ));
        }
        // Tenants sharing one Mailgun account share its key: check each distinct key once.
        let mut verified = Vec::new();
        let mut checked: Vec<(&Secret, bool)> = Vec::new();
        for (tenant, creds) in &candidates {
            let Some(key) = creds.downcast_ref::<MailgunKey>() else {
                continue;
            };
            let ok = match checked.iter().find(|(k, _)| **k == key.key) {
                Some((_, ok)) => *ok,
                None => {
                    let k = key.key.expose().as_bytes();
                    let ok = signature_matches(k, signed.timestamp, signed.token, &sig)
                        || parent_sig.as_deref().is_some_and(|p| {
                            signature_matches(k, signed.timestamp, signed.token, p)
                        });
                    checked.push((&key.key, ok));
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
                    "signature does not verify with tenant '{t}'s Mailgun signing key \
                     (use the HTTP webhook signing key, not the API key)"
                ),
                None => "signature does not verify with any tenant's Mailgun signing key \
                         (use the HTTP webhook signing key, not the API key)"
                    .to_string(),
            }));
        }

        // Only now, with the signature verified, spend the token. It must be remembered for
        // as long as `check_timestamp` would still accept its timestamp: until
        // ts + tolerance, inclusive, at second resolution.
        let expires_at_ms = signed
            .ts_secs
            .saturating_add(self.tolerance.as_secs().min(i64::MAX as u64) as i64)
            .saturating_add(1)
            .saturating_mul(1000);
        match self
            .replay
            .first_use(REPLAY_SCOPE, signed.token, req.now_ms, expires_at_ms)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return Err(Rejection::new(
                    StatusCode::UNAUTHORIZED,
                    "replayed_token",
                    "signature.token was already used: a replayed request (Mailgun signs every \
                     attempt with a fresh token)",
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "Mailgun replay guard failed; answering 503");
                return Err(Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "replay_guard_unavailable",
                    format!("cannot check the token for replay right now ({e}); nothing was accepted, retry later"),
                ));
            }
        }
        let default_tenant = (verified.len() == 1).then(|| verified[0].clone());
        Ok(Verified {
            tenants: verified,
            default_tenant,
            items: 1,
            replay_claim: Some(ReplayClaim {
                scope: REPLAY_SCOPE,
                token: signed.token.to_string(),
            }),
        })
    }

    fn normalize(&self, env: &RawEnvelope) -> Vec<Normalized> {
        let root = match parse_body(env) {
            Ok(v) => v,
            Err(dead) => return vec![*dead],
        };
        match root.get("event-data") {
            Some(item) => vec![normalize_event(env, item)],
            None => vec![dead(
                env,
                "missing_field",
                "body has no 'event-data' object",
                body_prefix(&env.body),
            )],
        }
    }
}

/// `user-variables` is an object when set, `[]` when not (current payloads), and a string
/// when Mailgun could not load them ("truncated or invalid JSON"): read what can be read,
/// never fail.
fn user_variables(v: Option<&Value>) -> XsMeta {
    match v {
        Some(Value::Object(m)) => XsMeta::from_object(m),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => XsMeta::from_object(&m),
            _ => XsMeta::default(),
        },
        _ => XsMeta::default(),
    }
}

/// `message.headers.message-id`, without the angle brackets older payloads had.
fn message_id(headers: Option<&Map<String, Value>>) -> Option<String> {
    let id = str_field(headers?, "message-id")?;
    let id = id.trim_start_matches('<').trim_end_matches('>').trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// The address in a `To:` header value naming exactly one mailbox (`Name <a@b>` or `a@b`).
fn single_address(to: &str) -> Option<String> {
    if to.matches('@').count() != 1 {
        return None;
    }
    let addr = match (to.rfind('<'), to.rfind('>')) {
        (Some(l), Some(r)) if l < r => &to[l + 1..r],
        _ => to,
    };
    normalize_email(addr)
}

/// `client-info.bot` is `null` for people; Mailgun fills it (a string naming the bot, in
/// practice) for machine opens and scanner clicks. Anything non-empty counts.
fn is_bot(obj: &Map<String, Value>) -> bool {
    match obj.get("client-info").and_then(|c| c.get("bot")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => {
            let s = s.trim();
            !s.is_empty() && !s.eq_ignore_ascii_case("false") && s != "0"
        }
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

fn normalize_event(env: &RawEnvelope, item: &Value) -> Normalized {
    let text = || item.to_string();
    let Some(obj) = item.as_object() else {
        return dead(
            env,
            "malformed_item",
            "event-data is not a JSON object",
            text(),
        );
    };
    let Some(event) = str_field(obj, "event") else {
        return dead(env, "missing_field", "event-data has no 'event'", text());
    };
    let occurred_at_ms = match event_time(obj) {
        Ok(t) => t,
        Err(e) => return dead(env, "invalid_field", e, text()),
    };
    let headers = obj
        .get("message")
        .and_then(|m| m.get("headers"))
        .and_then(Value::as_object);
    let msg_id = message_id(headers);
    // `rejected` events carry no `recipient`: fall back to a single-mailbox To header.
    let recipient = match str_field(obj, "recipient") {
        Some(r) => {
            normalize_email(r).ok_or_else(|| format!("'recipient' is not an address: {r:?}"))
        }
        None => headers
            .and_then(|h| str_field(h, "to"))
            .and_then(single_address)
            .ok_or_else(|| {
                format!("'{event}' event has no 'recipient' and no single-address To header")
            }),
    };
    let recipient = match recipient {
        Ok(r) => r,
        Err(detail) => return dead(env, "missing_field", detail, text()),
    };
    let severity = str_field(obj, "severity");
    let (kind, bounce_class) = match event {
        "accepted" => (EventKind::Sent, None),
        "delivered" => (EventKind::Delivered, None),
        "opened" => (EventKind::Opened, None),
        "clicked" => (EventKind::Clicked, None),
        "unsubscribed" => (EventKind::Unsubscribed, None),
        "complained" => (EventKind::Complained, None),
        // Only a permanent failure is a hard bounce. Temporary ones (Mailgun keeps retrying)
        // and any severity we do not know must never suppress a contact.
        "failed" => match severity {
            Some("permanent") => (EventKind::Bounced, Some(BounceClass::Hard)),
            _ => (EventKind::Deferred, None),
        },
        "rejected" => (EventKind::Dropped, None),
        // `stored` and any future event type: kept for analytics, no projection effect.
        _ => (EventKind::Other, None),
    };
    let meta = user_variables(obj.get("user-variables"));
    let attribution = match attribute(env, &meta, msg_id.as_deref(), &recipient) {
        Ok(a) => a,
        Err((reason, detail)) => return dead(env, reason, detail, text()),
    };
    let status = obj.get("delivery-status").and_then(Value::as_object);
    let reason = match kind {
        EventKind::Bounced | EventKind::Deferred => status
            .and_then(|s| str_field(s, "description").or_else(|| str_field(s, "message")))
            .or_else(|| str_field(obj, "reason")),
        EventKind::Dropped => obj
            .get("reject")
            .and_then(Value::as_object)
            .and_then(|r| str_field(r, "reason")),
        _ => None,
    }
    .map(str::to_string);
    let smtp_status = status.and_then(|s| {
        str_field(s, "enhanced-code")
            .map(str::to_string)
            .or_else(|| s.get("code").and_then(scalar_string))
    });
    let machine = matches!(kind, EventKind::Opened | EventKind::Clicked) && is_bot(obj);
    let url = str_field(obj, "url")
        .filter(|_| kind == EventKind::Clicked)
        .map(str::to_string);
    let event_id = str_field(obj, "id");
    let attempt = status
        .and_then(|s| s.get("attempt-no"))
        .and_then(scalar_string)
        .unwrap_or_default();
    // Mailgun's `id` is unique only within a day, so the key also binds the exact time, the
    // message, the recipient and the event: a later event reusing an id stays distinct, while
    // a retried POST (same event-data, new token) maps to the same key.
    let key = event_key(&[
        "mailgun",
        event,
        &recipient,
        msg_id.as_deref().unwrap_or(""),
        &occurred_at_ms.to_string(),
        event_id.unwrap_or(""),
        url.as_deref().unwrap_or(""),
        severity.unwrap_or(""),
        &attempt,
    ]);
    let client = obj.get("client-info").and_then(Value::as_object);
    Normalized::Event(Box::new(DeliveryEvent {
        trace_parent: None,
        event_key: key,
        tenant: attribution.tenant,
        provider: "mailgun".into(),
        kind,
        dispatch_key: attribution.dispatch_key,
        dispatch_id: attribution.dispatch_id,
        campaign_id: attribution.campaign_id,
        message_id: msg_id,
        recipient,
        occurred_at_ms,
        received_at_ms: env.received_at_ms,
        envelope_id: env.id.clone(),
        provider_event: event.to_string(),
        provider_event_id: event_id.map(str::to_string),
        bounce_class,
        reason,
        smtp_status,
        url,
        user_agent: client
            .and_then(|c| str_field(c, "user-agent"))
            .map(str::to_string),
        ip: str_field(obj, "ip").map(str::to_string),
        machine,
        group_id: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::MemoryReplayGuard;
    use crate::tenants::{Tenant, TenantConfig};
    use hyper::http::{HeaderMap, HeaderValue};
    use serde_json::json;

    /// mailgun-php `tests/Api/WebhookTest.php`: the published vector.
    const PHP_KEY: &str = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0";
    const PHP_TS: &str = "1403645220";
    const PHP_TOKEN: &str = "5egbgr1vjgqxtrnp65xfznchgdccwh5d6i09vijqi3whgowmn6";
    const PHP_SIG: &str = "9cfc5c41582e51246e73c88d34db3af0a3a2692a76fbab81492842f000256d33";
    /// The key the fixtures are signed with (see tests/fixtures/mailgun/README.md).
    const FIXTURE_KEY: &str = "TEST_WEBHOOK_SIGNING_KEY";

    fn mailgun() -> (Arc<dyn Provider>, Arc<MemoryReplayGuard>) {
        let guard = Arc::new(MemoryReplayGuard::new(1000));
        let settings = ProviderSettings {
            timestamp_tolerance: Duration::from_secs(600),
            replay_guard: guard.clone(),
        };
        (Arc::new(Mailgun::new(&settings)), guard)
    }

    fn tenants(p: &Arc<dyn Provider>, list: &[(&str, Option<&str>)]) -> TenantSet {
        let prepared = list
            .iter()
            .map(|(id, key)| {
                let mut cfg = TenantConfig::default();
                if let Some(k) = key {
                    cfg.providers
                        .insert("mailgun".into(), json!({ "signing_key": k }));
                }
                Tenant::prepare(id, cfg, std::slice::from_ref(p)).unwrap()
            })
            .collect();
        TenantSet::new(prepared).unwrap()
    }

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h
    }

    async fn verify(
        p: &Arc<dyn Provider>,
        set: &TenantSet,
        body: &[u8],
        now_secs: i64,
        route: Option<&str>,
    ) -> Result<Verified, Rejection> {
        let headers = json_headers();
        let req = WebhookRequest {
            headers: &headers,
            body,
            route_tenant: route,
            now_ms: now_secs * 1000,
        };
        p.verify(&req, set).await
    }

    fn php_body() -> Vec<u8> {
        json!({
            "signature": {"timestamp": PHP_TS, "token": PHP_TOKEN, "signature": PHP_SIG},
            "event-data": {"event": "delivered", "timestamp": 1403645220.5,
                           "recipient": "a@example.com"}
        })
        .to_string()
        .into_bytes()
    }

    fn fixture(name: &str) -> &'static str {
        match name {
            "accepted" => include_str!("../../tests/fixtures/mailgun/accepted.json"),
            "delivered" => include_str!("../../tests/fixtures/mailgun/delivered.json"),
            "opened" => include_str!("../../tests/fixtures/mailgun/opened.json"),
            "clicked" => include_str!("../../tests/fixtures/mailgun/clicked.json"),
            "unsubscribed" => include_str!("../../tests/fixtures/mailgun/unsubscribed.json"),
            "complained" => include_str!("../../tests/fixtures/mailgun/complained.json"),
            "failed_permanent" => {
                include_str!("../../tests/fixtures/mailgun/failed_permanent.json")
            }
            "failed_temporary" => {
                include_str!("../../tests/fixtures/mailgun/failed_temporary.json")
            }
            "rejected" => include_str!("../../tests/fixtures/mailgun/rejected.json"),
            "stored" => include_str!("../../tests/fixtures/mailgun/stored.json"),
            other => panic!("no fixture {other}"),
        }
    }

    fn env(body: impl Into<Vec<u8>>, verified: &[&str]) -> RawEnvelope {
        RawEnvelope::verified("mailgun", body, verified)
    }

    fn one_event(out: Vec<Normalized>) -> DeliveryEvent {
        match out.as_slice() {
            [Normalized::Event(e)] => (**e).clone(),
            other => panic!("expected one event, got {other:?}"),
        }
    }

    fn one_dead(out: Vec<Normalized>) -> crate::event::DeadLetter {
        match out.as_slice() {
            [Normalized::Dead(d)] => d.clone(),
            other => panic!("expected one dead letter, got {other:?}"),
        }
    }

    /// Wraps event-data into a body signed with the fixture key.
    fn signed(event_data: Value, ts: &str, token: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(FIXTURE_KEY.as_bytes()).unwrap();
        mac.update(ts.as_bytes());
        mac.update(token.as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        json!({"signature": {"timestamp": ts, "token": token, "signature": sig},
               "event-data": event_data})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn mailgun_php_published_vector_verifies() {
        let sig = hex::decode(PHP_SIG).unwrap();
        assert!(signature_matches(
            PHP_KEY.as_bytes(),
            PHP_TS,
            PHP_TOKEN,
            &sig
        ));
        // The SDK's negative case: another token, same everything else.
        assert!(!signature_matches(
            PHP_KEY.as_bytes(),
            PHP_TS,
            "owyldpe6nxhmrn78epljl6bj0orrki1u3d2v5e6cnlmmuox8jr",
            &sig
        ));
        assert!(!signature_matches(b"key-other", PHP_TS, PHP_TOKEN, &sig));
        assert!(!signature_matches(
            PHP_KEY.as_bytes(),
            "1403645221",
            PHP_TOKEN,
            &sig
        ));
        // The anymail-shaped delivered fixture's signature (computed independently).
        let v: Value = serde_json::from_str(fixture("delivered")).unwrap();
        let s = &v["signature"];
        assert!(signature_matches(
            FIXTURE_KEY.as_bytes(),
            s["timestamp"].as_str().unwrap(),
            s["token"].as_str().unwrap(),
            &hex::decode(s["signature"].as_str().unwrap()).unwrap()
        ));
    }

    #[tokio::test]
    async fn published_vector_verifies_through_verify_and_its_token_is_then_spent() {
        let (p, guard) = mailgun();
        let set = tenants(&p, &[("t1", Some(PHP_KEY)), ("t2", Some("key-other"))]);
        let ok = verify(&p, &set, &php_body(), 1403645220, None)
            .await
            .unwrap();
        assert_eq!(ok.tenants, vec!["t1".to_string()]);
        assert_eq!(ok.default_tenant.as_deref(), Some("t1"));
        assert_eq!(ok.items, 1);
        assert_eq!(guard.len(), 1);

        // Same request again, still inside the window: a replay.
        let err = verify(&p, &set, &php_body(), 1403645230, None)
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert_eq!(err.code, "replayed_token");
        assert!(err.message.contains("already used"), "{}", err.message);
    }

    #[tokio::test]
    async fn stale_timestamp_is_401_either_way_and_spends_nothing() {
        let (p, guard) = mailgun();
        let set = tenants(&p, &[("t1", Some(PHP_KEY))]);
        for now in [1403645220 + 601, 1403645220 - 601] {
            let err = verify(&p, &set, &php_body(), now, None).await.unwrap_err();
            assert_eq!(err.status, StatusCode::UNAUTHORIZED);
            assert_eq!(err.code, "stale_timestamp");
            assert!(err.message.contains("601s away"), "{}", err.message);
        }
        // The edge of the window is still accepted.
        assert!(verify(&p, &set, &php_body(), 1403645220 + 600, None)
            .await
            .is_ok());
        assert_eq!(guard.len(), 1);
    }

    #[tokio::test]
    async fn wrong_key_is_401_and_does_not_burn_the_token() {
        let (p, guard) = mailgun();
        let wrong = tenants(&p, &[("t1", Some("key-not-the-right-one"))]);
        let err = verify(&p, &wrong, &php_body(), 1403645220, Some("t1"))
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert_eq!(err.code, "bad_signature");
        assert!(err.message.contains("tenant 't1'"), "{}", err.message);
        // A forged request must not spend the genuine token: Mailgun's own request still
        // goes through afterwards.
        assert!(guard.is_empty());
        let right = tenants(&p, &[("t1", Some(PHP_KEY))]);
        assert!(verify(&p, &right, &php_body(), 1403645220, Some("t1"))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn tenants_without_a_key_fail_closed() {
        let (p, _) = mailgun();
        let set = tenants(&p, &[("t1", None)]);
        let err = verify(&p, &set, &php_body(), 1403645220, Some("t1"))
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::UNAUTHORIZED, "no_credentials")
        );
        let err = verify(&p, &set, &php_body(), 1403645220, None)
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert!(err.message.contains("signing_key"), "{}", err.message);
    }

    #[tokio::test]
    async fn subaccount_parent_signature_verifies_with_the_primary_key() {
        let (p, _) = mailgun();
        let set = tenants(&p, &[("t1", Some(PHP_KEY))]);
        let body = json!({
            "signature": {"timestamp": PHP_TS, "token": PHP_TOKEN,
                          "signature": "00".repeat(32), "parent-signature": PHP_SIG},
            "event-data": {"event": "delivered", "timestamp": 1403645220.5}
        })
        .to_string();
        assert!(verify(&p, &set, body.as_bytes(), 1403645220, None)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn legacy_form_webhooks_get_415_with_instructions() {
        let (p, guard) = mailgun();
        let set = tenants(&p, &[("t1", Some(PHP_KEY))]);
        for ct in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            let body = b"event=delivered&recipient=a%40example.com&timestamp=1403645220&token=x&signature=y";
            let req = WebhookRequest {
                headers: &headers,
                body,
                route_tenant: None,
                now_ms: 1_403_645_220_000,
            };
            let err = p.verify(&req, &set).await.unwrap_err();
            assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert_eq!(err.code, "legacy_webhook");
            assert!(
                err.message.contains("Sending → Webhooks"),
                "{}",
                err.message
            );
        }
        assert!(guard.is_empty());
    }

    #[tokio::test]
    async fn malformed_bodies_are_400_and_write_nothing() {
        let (p, guard) = mailgun();
        let set = tenants(&p, &[("t1", Some(PHP_KEY))]);
        let sig = json!({"timestamp": PHP_TS, "token": PHP_TOKEN, "signature": PHP_SIG});
        let ed = json!({"event": "delivered", "timestamp": 1403645220.5});
        let with = |s: Value, e: Value| json!({"signature": s, "event-data": e}).to_string();
        let mut sig_ts_num = sig.clone();
        sig_ts_num["timestamp"] = json!(1403645220);
        let mut sig_ts_alpha = sig.clone();
        sig_ts_alpha["timestamp"] = json!("14036452x0");
        let mut sig_ts_huge = sig.clone();
        sig_ts_huge["timestamp"] = json!("99999999999999999999");
        let mut sig_no_token = sig.clone();
        sig_no_token.as_object_mut().unwrap().remove("token");
        let mut sig_empty_token = sig.clone();
        sig_empty_token["token"] = json!("");
        let mut sig_long_token = sig.clone();
        sig_long_token["token"] = json!("x".repeat(300));
        let mut sig_sig_num = sig.clone();
        sig_sig_num["signature"] = json!(12);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_body = format!(
            r#"{{"signature":{},"event-data":{{"event":"delivered","timestamp":1,"x":{deep}}}}}"#,
            sig
        );
        let mut invalid_utf8 = with(
            sig.clone(),
            json!({"event": "delivered", "timestamp": 1,
                                                         "recipient": "PLACEHOLDER"}),
        )
        .into_bytes();
        let at = invalid_utf8
            .windows(11)
            .position(|w| w == b"PLACEHOLDER")
            .unwrap();
        invalid_utf8[at] = 0xff;
        invalid_utf8[at + 1] = 0xfe;

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty body", vec![]),
            ("not JSON", b"signature=abc".to_vec()),
            ("invalid UTF-8", invalid_utf8),
            ("truncated JSON", br#"{"signature":{"timestamp":"1""#.to_vec()),
            ("JSON array", b"[]".to_vec()),
            ("JSON string", br#""hello""#.to_vec()),
            ("missing signature", json!({"event-data": ed}).to_string().into_bytes()),
            ("signature is a string", with(json!("abc"), ed.clone()).into_bytes()),
            ("timestamp is a number", with(sig_ts_num, ed.clone()).into_bytes()),
            ("timestamp has letters", with(sig_ts_alpha, ed.clone()).into_bytes()),
            ("timestamp is huge", with(sig_ts_huge, ed.clone()).into_bytes()),
            ("missing token", with(sig_no_token, ed.clone()).into_bytes()),
            ("empty token", with(sig_empty_token, ed.clone()).into_bytes()),
            ("token far too long", with(sig_long_token, ed.clone()).into_bytes()),
            ("signature is a number", with(sig_sig_num, ed.clone()).into_bytes()),
            ("missing event-data", json!({"signature": sig}).to_string().into_bytes()),
            ("event-data is an array", with(sig.clone(), json!([ed])).into_bytes()),
            ("missing event", with(sig.clone(), json!({"timestamp": 1.5})).into_bytes()),
            ("event is a number", with(sig.clone(), json!({"event": 7, "timestamp": 1.5})).into_bytes()),
            ("missing event timestamp", with(sig.clone(), json!({"event": "delivered"})).into_bytes()),
            ("event timestamp is a string", with(sig.clone(), json!({"event": "delivered", "timestamp": "1.5"})).into_bytes()),
            ("event timestamp negative", with(sig.clone(), json!({"event": "delivered", "timestamp": -5})).into_bytes()),
            ("event timestamp 1e300", with(sig.clone(), json!({"event": "delivered", "timestamp": 1e300})).into_bytes()),
            ("event timestamp beyond u64",
             format!(r#"{{"signature":{sig},"event-data":{{"event":"delivered","timestamp":123456789012345678901234567890}}}}"#).into_bytes()),
            ("number out of range", format!(r#"{{"signature":{sig},"event-data":{{"event":"delivered","timestamp":1e400}}}}"#).into_bytes()),
            ("10000 nested arrays", deep_body.into_bytes()),
        ];
        for (name, body) in cases {
            let err = verify(&p, &set, &body, 1403645220, None)
                .await
                .expect_err(name);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{name}: {err:?}");
            assert_eq!(err.code, "malformed", "{name}");
            assert!(!err.message.is_empty(), "{name}");
        }
        assert!(
            guard.is_empty(),
            "no token may be recorded for a refused body"
        );
        // A signature that is not 64 hex characters is an authentication failure.
        let mut bad_hex = sig.clone();
        bad_hex["signature"] = json!("zz");
        let err = verify(&p, &set, with(bad_hex, ed).as_bytes(), 1403645220, None)
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn every_fixture_verifies_with_its_key() {
        for name in [
            "accepted",
            "delivered",
            "opened",
            "clicked",
            "unsubscribed",
            "complained",
            "failed_permanent",
            "failed_temporary",
            "rejected",
            "stored",
        ] {
            let (p, _) = mailgun();
            let set = tenants(&p, &[("t1", Some(FIXTURE_KEY))]);
            let v: Value = serde_json::from_str(fixture(name)).unwrap();
            let ts: i64 = v["signature"]["timestamp"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let ok = verify(&p, &set, fixture(name).as_bytes(), ts, None).await;
            assert!(ok.is_ok(), "{name}: {ok:?}");
        }
    }

    #[test]
    fn documented_payloads_normalize_to_the_right_events() {
        let (p, _) = mailgun();
        let cases: &[(&str, EventKind, Option<BounceClass>, &str)] = &[
            (
                "accepted",
                EventKind::Sent,
                None,
                "recipient@sample.mailgun.com",
            ),
            (
                "delivered",
                EventKind::Delivered,
                None,
                "recipient@example.com",
            ),
            (
                "opened",
                EventKind::Opened,
                None,
                "recipient@sample.mailgun.com",
            ),
            (
                "clicked",
                EventKind::Clicked,
                None,
                "recipient@sample.mailgun.com",
            ),
            (
                "unsubscribed",
                EventKind::Unsubscribed,
                None,
                "recipient@sample.mailgun.com",
            ),
            (
                "complained",
                EventKind::Complained,
                None,
                "recipient@sample.mailgun.com",
            ),
            (
                "failed_permanent",
                EventKind::Bounced,
                Some(BounceClass::Hard),
                "badrecipient@sample.mailgun.com",
            ),
            (
                "failed_temporary",
                EventKind::Deferred,
                None,
                "tempfailrecipient@sample.mailgun.com",
            ),
            (
                "rejected",
                EventKind::Dropped,
                None,
                "recipient@example.org",
            ),
            ("stored", EventKind::Other, None, "satshabad@mailgun.com"),
        ];
        for (name, kind, class, recipient) in cases {
            let e = one_event(p.normalize(&env(fixture(name), &["t1"])));
            assert_eq!(e.kind, *kind, "{name}");
            assert_eq!(e.bounce_class, *class, "{name}");
            assert_eq!(e.recipient, *recipient, "{name}");
            assert!(!e.machine, "{name}: documented samples are human");
            assert_eq!(e.tenant, "t1");
            assert!(e.message_id.is_some(), "{name}");
            // No user variables in the samples: the message id + recipient fallback.
            assert_eq!(
                e.dispatch_key,
                DeliveryEvent::fallback_dispatch_key(e.message_id.as_deref(), recipient),
                "{name}"
            );
        }
        let d = one_event(p.normalize(&env(fixture("delivered"), &["t1"])));
        assert_eq!(d.occurred_at_ms, 1534108637153);
        assert_eq!(
            d.message_id.as_deref(),
            Some("20180812211713.1.DF5966851B4BAA99@example.org")
        );
        assert_eq!(d.smtp_status.as_deref(), Some("250"));
        let b = one_event(p.normalize(&env(fixture("failed_permanent"), &["t1"])));
        assert_eq!(b.smtp_status.as_deref(), Some("5.5.0"));
        assert!(b
            .reason
            .unwrap()
            .starts_with("5.5.0 Requested action not taken"));
        let t = one_event(p.normalize(&env(fixture("failed_temporary"), &["t1"])));
        assert!(t.reason.unwrap().contains("temporary blacklisted"));
        assert_eq!(t.smtp_status.as_deref(), Some("421"));
        let c = one_event(p.normalize(&env(fixture("clicked"), &["t1"])));
        assert_eq!(c.url.as_deref(), Some("https://sample.mailgun.com"));
        assert_eq!(c.ip.as_deref(), Some("9.169.124.21"));
        assert_eq!(
            c.provider_event_id.as_deref(),
            Some("A9dLUrCXQjK92TlnW3zkIA")
        );
        let r = one_event(p.normalize(&env(fixture("rejected"), &["t1"])));
        assert_eq!(
            r.reason.as_deref(),
            Some("Sandbox subdomains are for test purposes only.")
        );
    }

    #[test]
    fn bot_flag_marks_machine_opens_and_clicks_only() {
        let (p, _) = mailgun();
        for (name, kind) in [
            ("opened", EventKind::Opened),
            ("clicked", EventKind::Clicked),
            ("delivered", EventKind::Delivered),
        ] {
            for (bot, machine) in [
                (json!("apple"), true),
                (json!(true), true),
                (json!("gmail-image-proxy"), true),
                (json!(null), false),
                (json!(""), false),
                (json!(false), false),
                (json!("false"), false),
            ] {
                let mut v: Value = serde_json::from_str(fixture(name)).unwrap();
                v["event-data"]["client-info"] = json!({"bot": bot});
                let e = one_event(p.normalize(&env(v.to_string(), &["t1"])));
                assert_eq!(e.kind, kind);
                let expect = machine && kind != EventKind::Delivered;
                assert_eq!(e.machine, expect, "{name} bot={bot}");
            }
        }
    }

    #[test]
    fn user_variables_in_every_shape_never_panic() {
        let (p, _) = mailgun();
        let xs = json!({"xs_tenant": "t1", "xs_campaign": "c9", "xs_dispatch": "d9"});
        let cases = [
            (xs.clone(), Some("d:d9")),
            (json!(xs.to_string()), Some("d:d9")),
            (json!([]), None),
            (json!({}), None),
            (json!(null), None),
            (json!(42), None),
            (
                json!("Could not load user-variables. They were either truncated or invalid JSON"),
                None,
            ),
            (
                json!({"xs_tenant": ["nested"], "xs_dispatch": {"a": 1}}),
                None,
            ),
            (json!([["xs_dispatch", "d9"]]), None),
        ];
        for (uv, dispatch) in cases {
            let mut v: Value = serde_json::from_str(fixture("delivered")).unwrap();
            v["event-data"]["user-variables"] = uv.clone();
            let e = one_event(p.normalize(&env(v.to_string(), &["t1"])));
            match dispatch {
                Some(d) => {
                    assert_eq!(e.dispatch_key, d, "{uv}");
                    assert_eq!(e.campaign_id.as_deref(), Some("c9"));
                }
                None => assert_eq!(
                    e.dispatch_key,
                    "m:20180812211713.1.DF5966851B4BAA99@example.org:recipient@example.com",
                    "{uv}"
                ),
            }
        }
    }

    #[test]
    fn event_naming_an_unverified_tenant_is_dead_lettered() {
        let (p, _) = mailgun();
        let mut v: Value = serde_json::from_str(fixture("delivered")).unwrap();
        v["event-data"]["user-variables"] = json!({"xs_tenant": "t2", "xs_dispatch": "d1"});
        let d = one_dead(p.normalize(&env(v.to_string(), &["t1"])));
        assert_eq!(d.reason, "tenant_not_verified");
        assert!(d.detail.contains("t2"));
    }

    #[test]
    fn event_key_is_stable_across_retries_and_distinct_across_days() {
        let (p, _) = mailgun();
        let ed: Value =
            serde_json::from_str::<Value>(fixture("delivered")).unwrap()["event-data"].clone();
        let a = one_event(p.normalize(&env(signed(ed.clone(), "1534108637", "tok-a"), &["t1"])));
        // Mailgun's retry: the same event-data under a fresh token.
        let b = one_event(p.normalize(&env(signed(ed.clone(), "1534108937", "tok-b"), &["t1"])));
        assert_eq!(a.event_key, b.event_key);
        // The same Mailgun `id` a day later (ids are unique only within a day).
        let mut later = ed.clone();
        later["timestamp"] = json!(1534108637.153125 + 86_400.0);
        let c = one_event(p.normalize(&env(signed(later, "1534195037", "tok-c"), &["t1"])));
        assert_eq!(c.provider_event_id, a.provider_event_id);
        assert_ne!(c.event_key, a.event_key);
        // Another recipient or another event with the same id: distinct too.
        let mut other = ed.clone();
        other["recipient"] = json!("someone.else@example.com");
        let d = one_event(p.normalize(&env(signed(other, "1534108637", "tok-d"), &["t1"])));
        assert_ne!(d.event_key, a.event_key);
    }

    #[test]
    fn normalize_dead_letters_what_it_cannot_read_and_never_panics() {
        let (p, _) = mailgun();
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\xff\xfe".to_vec(), "malformed_body"),
            (deep.into_bytes(), "malformed_body"),
            (b"{}".to_vec(), "missing_field"),
            (br#"{"event-data": 5}"#.to_vec(), "malformed_item"),
            (br#"{"event-data": {"timestamp": 1}}"#.to_vec(), "missing_field"),
            (br#"{"event-data": {"event": "delivered", "timestamp": "x", "recipient": "a@b.c"}}"#.to_vec(), "invalid_field"),
            (br#"{"event-data": {"event": "delivered", "timestamp": 1}}"#.to_vec(), "missing_field"),
            (br#"{"event-data": {"event": "delivered", "timestamp": 1, "recipient": "not an address"}}"#.to_vec(), "missing_field"),
            (br#"{"event-data": {"event": "rejected", "timestamp": 1, "message": {"headers": {"to": "a@b.c, d@e.f"}}}}"#.to_vec(), "missing_field"),
        ];
        for (body, reason) in cases {
            let d = one_dead(p.normalize(&env(body.clone(), &["t1"])));
            assert_eq!(d.reason, reason, "{}", String::from_utf8_lossy(&body));
            assert!(!d.detail.is_empty());
        }
        // An unknown severity never suppresses.
        let mut v: Value = serde_json::from_str(fixture("failed_permanent")).unwrap();
        v["event-data"]["severity"] = json!("catastrophic");
        let e = one_event(p.normalize(&env(v.to_string(), &["t1"])));
        assert_eq!((e.kind, e.bounce_class), (EventKind::Deferred, None));
    }

    #[test]
    fn signing_key_section_is_strict() {
        let (p, _) = mailgun();
        assert!(p.parse_credentials(&json!({"signing_key": "abc"})).is_ok());
        assert!(p
            .parse_credentials(&json!({"signing_key": ""}))
            .unwrap_err()
            .contains("empty"));
        assert!(p
            .parse_credentials(&json!({"signing_key": "abc", "api_key": "x"}))
            .unwrap_err()
            .contains("unknown field"));
        assert!(p
            .parse_credentials(&json!({}))
            .unwrap_err()
            .contains("signing_key"));
    }
}
