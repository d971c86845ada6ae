//! Mailjet Event API: JSON, one bare event object per POST, or an array of (mixed) events when
//! "group events" is on. Mailjet does not sign webhooks; its documented protection is HTTP
//! basic auth in the callback URL (`https://user:pass@host/api/webhook/email/mailjet`), which
//! it sends as `Authorization: Basic`. So each tenant configures a username and password, we
//! compare both in constant time, and a tenant without them is refused (fail closed).
//!
//! Attribution: XSender attaches a JSON object to every send as Mailjet's `EventPayload`,
//! which comes back JSON-encoded in each event's `Payload` string:
//! `{"xs_tenant": "t1", "xs_campaign": "c", "xs_dispatch": "d", "mj_api_key": "<API key>"}`.
//! `xs_tenant` is checked against the tenants whose credentials verified (via [`attribute`]);
//! [`PAYLOAD_API_KEY`] names the Mailjet account the message went through and picks the
//! default tenant when several tenants share one set of webhook credentials.
//!
//! `MessageID` is a 64-bit integer (19 digits in practice, above 2^53), so it is only ever read
//! as an exact JSON integer or string, never through a float.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hyper::header::AUTHORIZATION;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    attribute, dead, event_key, malformed_body, recipient_field, scalar_string, str_field,
    Credentials, Normalized, Provider, ProviderSettings, Rejection, Verified, WebhookRequest,
    XsMeta,
};
use crate::event::{BounceClass, DeliveryEvent, EventKind, RawEnvelope};
use crate::secret::Secret;
use crate::tenants::TenantSet;

/// The key, inside the `Payload` object, carrying the tenant's Mailjet API key (public
/// key, not the secret key).
pub const PAYLOAD_API_KEY: &str = "mj_api_key";

/// Latest accepted event time (9999-12-31T23:59:59Z).
const MAX_TS_SECS: i64 = 253_402_300_799;

/// Shortest accepted webhook password: it is the only thing standing between the Internet and
/// the tenant's rows.
const MIN_PASSWORD_LEN: usize = 16;

pub struct Mailjet;

impl Mailjet {
    pub fn new(_settings: &ProviderSettings) -> Self {
        Mailjet
    }
}

/// A tenant's Mailjet section:
/// `[tenants.<id>.mailjet] api_key = "...", username = "...", password = "..."`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    /// The account's API key (Mailjet → Account settings → API keys), as XSender puts it in
    /// the payload under [`PAYLOAD_API_KEY`].
    api_key: String,
    /// Basic-auth credentials embedded in the callback URL set in Mailjet. Restricted to URL
    /// unreserved characters so the URL needs no percent-encoding (which clients decode
    /// inconsistently).
    username: String,
    password: Secret,
}

/// The prepared credentials.
#[derive(Debug)]
pub struct MailjetCreds {
    api_key: String,
    username: Secret,
    password: Secret,
}

fn url_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

impl MailjetCreds {
    /// Both parts are always compared (no short-circuit), each in constant time.
    fn matches(&self, user: &[u8], pass: &[u8]) -> bool {
        let u = self.username.matches(user);
        let p = self.password.matches(pass);
        u & p
    }
}

/// Mailjet requests fail authentication on credentials, not on a signature: say so in the
/// metrics code.
fn unauthorized(message: impl Into<String>) -> Rejection {
    Rejection::new(StatusCode::UNAUTHORIZED, "bad_credentials", message)
}

/// Decodes `Authorization: Basic base64(user:pass)`.
fn basic_auth(req: &WebhookRequest<'_>) -> Result<(Vec<u8>, Vec<u8>), Rejection> {
    let help = "put the tenant's credentials in the callback URL set in Mailjet: \
                https://<username>:<password>@<host>/api/webhook/email/mailjet";
    let value = req
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| unauthorized(format!("missing Authorization header; {help}")))?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized(format!("Authorization header is not ASCII; {help}")))?;
    let (scheme, b64) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(unauthorized(format!(
            "Authorization must use the Basic scheme; {help}"
        )));
    }
    let decoded = B64
        .decode(b64.trim())
        .map_err(|_| unauthorized(format!("Authorization Basic value is not base64; {help}")))?;
    let colon = decoded.iter().position(|&b| b == b':').ok_or_else(|| {
        unauthorized(format!(
            "Authorization Basic value has no 'user:password'; {help}"
        ))
    })?;
    Ok((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// `time`: integer Unix seconds (a digit string is accepted too; old payloads quoted ids).
fn event_time(obj: &Map<String, Value>) -> Result<i64, String> {
    let t = match obj.get("time") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        None => return Err("missing 'time'".into()),
        Some(_) => None,
    };
    t.filter(|t| (0..=MAX_TS_SECS).contains(t))
        .ok_or_else(|| "'time' is not an integer Unix time in seconds".to_string())
}

/// `MessageID` exactly as sent: a JSON integer (u64 kept exact by serde_json) or a digit
/// string; the deprecated `mj_message_id` string otherwise. A number that is not an exact
/// integer (a float, or beyond 64 bits) is an error: it would be a different message's id.
fn message_id(obj: &Map<String, Value>) -> Result<Option<String>, String> {
    match obj.get("MessageID") {
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(Some(n.to_string())),
        Some(Value::Number(n)) => Err(format!("MessageID {n} is not an exact 64-bit integer")),
        Some(Value::String(s)) if s.trim().bytes().all(|b| b.is_ascii_digit()) => {
            Ok((!s.trim().is_empty()).then(|| s.trim().to_string()))
        }
        Some(Value::Null) | None => Ok(str_field(obj, "mj_message_id").map(str::to_string)),
        Some(_) => Err("MessageID must be an integer".into()),
    }
}

/// Reads XSender's metadata and the account key from `Payload` (a JSON-encoded object; empty
/// or foreign text when another application sent the message, which means "unattributed").
/// `CustomID`, when it holds a JSON object, fills whatever `Payload` did not give.
fn metadata(obj: &Map<String, Value>) -> (XsMeta, Option<String>) {
    let as_object = |v: Option<&Value>| -> Option<Map<String, Value>> {
        match v? {
            Value::Object(m) => Some(m.clone()),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            },
            _ => None,
        }
    };
    let payload = as_object(obj.get("Payload"));
    let custom = as_object(obj.get("CustomID"));
    let from =
        |m: &Option<Map<String, Value>>| m.as_ref().map(XsMeta::from_object).unwrap_or_default();
    let (p, c) = (from(&payload), from(&custom));
    let meta = XsMeta {
        tenant: p.tenant.or(c.tenant),
        campaign: p.campaign.or(c.campaign),
        dispatch: p.dispatch.or(c.dispatch),
    };
    let key = [&payload, &custom]
        .into_iter()
        .flatten()
        .find_map(|m| m.get(PAYLOAD_API_KEY).and_then(scalar_string))
        .filter(|k| !k.is_empty());
    (meta, key)
}

/// A parsed body: a bare event, or a "group events" array.
enum Body {
    Single(Value),
    Grouped(Vec<Value>),
}

impl Body {
    fn items(&self) -> &[Value] {
        match self {
            Body::Single(v) => std::slice::from_ref(v),
            Body::Grouped(a) => a,
        }
    }
}

/// Parses a body, or says why Mailjet could never have sent it (400).
fn parse_body(body: &[u8]) -> Result<Body, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(a)) if a.is_empty() => {
            Err("empty event array: Mailjet never posts one".into())
        }
        Ok(Value::Array(a)) => match a.iter().position(|v| !v.is_object()) {
            Some(i) => Err(format!("item {i} of the event array is not a JSON object")),
            None => Ok(Body::Grouped(a)),
        },
        Ok(v @ Value::Object(_)) => Ok(Body::Single(v)),
        Ok(_) => Err(
            "Mailjet posts one JSON event object, or an array of them; got another JSON type"
                .into(),
        ),
        Err(e) => Err(format!("body is not valid JSON: {e}")),
    }
}

/// A lone event must have the fields every Mailjet event has. (Items of a grouped array are
/// only required to be objects: one odd item is dead-lettered, so it cannot make Mailjet
/// resend the whole batch for 24 hours.)
fn check_single(obj: &Map<String, Value>) -> Result<(), String> {
    match obj.get("event") {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        Some(Value::String(_)) | None => return Err("missing 'event'".into()),
        Some(_) => return Err("'event' must be a string".into()),
    }
    event_time(obj)?;
    match obj.get("email") {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        Some(Value::String(_)) | None => return Err("missing 'email'".into()),
        Some(_) => return Err("'email' must be a string".into()),
    }
    message_id(obj)?;
    Ok(())
}

#[async_trait]
impl Provider for Mailjet {
    fn name(&self) -> &'static str {
        "mailjet"
    }

    fn content_types(&self) -> &'static [&'static str] {
        &["application/json"]
    }

    fn parse_credentials(&self, section: &Value) -> Result<Credentials, String> {
        let s: Section = serde_json::from_value(section.clone()).map_err(|e| e.to_string())?;
        if s.api_key.trim().is_empty() {
            return Err("api_key is empty: use the account's API key (Mailjet → Account settings → API keys)".into());
        }
        if s.username.is_empty() || !url_safe(&s.username) {
            return Err(
                "username must be non-empty and use only A-Z a-z 0-9 - . _ ~ \
                        (it goes into the callback URL unencoded)"
                    .into(),
            );
        }
        let pw = s.password.expose();
        if pw.len() < MIN_PASSWORD_LEN || !url_safe(pw) {
            return Err(format!(
                "password must be at least {MIN_PASSWORD_LEN} characters of A-Z a-z 0-9 - . _ ~ \
                 (it goes into the callback URL unencoded)"
            ));
        }
        Ok(Arc::new(MailjetCreds {
            api_key: s.api_key.trim().to_string(),
            username: Secret::new(s.username),
            password: s.password,
        }))
    }

    async fn verify(
        &self,
        req: &WebhookRequest<'_>,
        tenants: &TenantSet,
    ) -> Result<Verified, Rejection> {
        // Structure first: a body Mailjet could never have sent is a 400 whoever sent it.
        let body = parse_body(req.body).map_err(Rejection::malformed)?;
        if let Body::Single(Value::Object(obj)) = &body {
            check_single(obj).map_err(Rejection::malformed)?;
        }
        let items = body.items();

        let (user, pass) = basic_auth(req)?;
        let candidates = tenants.candidates(self.name(), req.route_tenant)?;
        if candidates.is_empty() {
            return Err(unauthorized(
                "no tenant has Mailjet webhook credentials configured, so nothing can be \
                 verified: add [tenants.<id>.mailjet] api_key, username, password",
            ));
        }
        let mut verified: Vec<(String, &MailjetCreds)> = Vec::new();
        for (tenant, creds) in &candidates {
            if let Some(c) = creds.downcast_ref::<MailjetCreds>() {
                if c.matches(&user, &pass) {
                    verified.push((tenant.clone(), c));
                }
            }
        }
        if verified.is_empty() {
            return Err(unauthorized(match req.route_tenant {
                Some(t) => format!(
                    "Basic credentials do not match tenant '{t}'s Mailjet username/password"
                ),
                None => "Basic credentials do not match any tenant's Mailjet username/password"
                    .to_string(),
            }));
        }
        // Several tenants may share one Mailjet account (and so one callback URL). Events that
        // name no xs_tenant then go to the tenant whose API key they carry, if that is unique.
        let default_tenant = if verified.len() == 1 {
            Some(verified[0].0.clone())
        } else {
            let keys: BTreeSet<String> = items
                .iter()
                .filter_map(|i| i.as_object().and_then(|o| metadata(o).1))
                .collect();
            match keys.iter().collect::<Vec<_>>().as_slice() {
                [k] => {
                    let owners: Vec<&String> = verified
                        .iter()
                        .filter(|(_, c)| &c.api_key == *k)
                        .map(|(t, _)| t)
                        .collect();
                    (owners.len() == 1).then(|| owners[0].clone())
                }
                _ => None,
            }
        };
        Ok(Verified {
            tenants: verified.into_iter().map(|(t, _)| t).collect(),
            default_tenant,
            items: items.len(),
            ..Default::default()
        })
    }

    fn normalize(&self, env: &RawEnvelope) -> Vec<Normalized> {
        match super::parse_body(env) {
            Ok(Value::Array(a)) => a.iter().map(|i| normalize_item(env, i)).collect(),
            Ok(v @ Value::Object(_)) => vec![normalize_item(env, &v)],
            Ok(_) => vec![malformed_body(env, "not a JSON object or array")],
            Err(dead) => vec![*dead],
        }
    }
}

/// `hard_bounce` as Mailjet sends it (a bool), or as a string or 0/1 if a proxy re-typed it.
fn flag(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

fn normalize_item(env: &RawEnvelope, item: &Value) -> Normalized {
    let text = || item.to_string();
    let Some(obj) = item.as_object() else {
        return dead(env, "malformed_item", "event is not a JSON object", text());
    };
    let Some(event) = str_field(obj, "event") else {
        return dead(env, "missing_field", "event has no 'event' field", text());
    };
    let time = match event_time(obj) {
        Ok(t) => t,
        Err(e) => return dead(env, "invalid_field", e, text()),
    };
    let recipient = match recipient_field(env, obj, "email", event, text) {
        Ok(r) => r,
        Err(dead) => return *dead,
    };
    let msg_id = match message_id(obj) {
        Ok(m) => m,
        Err(e) => return dead(env, "invalid_field", e, text()),
    };
    let hard = flag(obj.get("hard_bounce"));
    let (kind, bounce_class) = match event {
        // Mailjet "sent" = accepted by the recipient's server: a delivery.
        "sent" => (EventKind::Delivered, None),
        "open" => (EventKind::Opened, None),
        "click" => (EventKind::Clicked, None),
        // A bounce is hard only when Mailjet says so; anything else must not suppress.
        "bounce" => (
            EventKind::Bounced,
            Some(if hard == Some(true) {
                BounceClass::Hard
            } else {
                BounceClass::Soft
            }),
        ),
        "blocked" => (EventKind::Dropped, None),
        "spam" => (EventKind::Complained, None),
        "unsub" => (EventKind::Unsubscribed, None),
        // A future Mailjet event type: kept for analytics, no projection effect.
        _ => (EventKind::Other, None),
    };
    let (meta, _) = metadata(obj);
    let attribution = match attribute(env, &meta, msg_id.as_deref(), &recipient) {
        Ok(a) => a,
        Err((reason, detail)) => return dead(env, reason, detail, text()),
    };
    let reason = match kind {
        // "recipient: user unknown (Host or domain name not found…)"
        EventKind::Bounced | EventKind::Dropped => {
            let what = match (str_field(obj, "error_related_to"), str_field(obj, "error")) {
                (Some(r), Some(e)) => Some(format!("{r}: {e}")),
                (None, Some(e)) => Some(e.to_string()),
                (Some(r), None) => Some(r.to_string()),
                (None, None) => None,
            };
            match (what, str_field(obj, "comment")) {
                (Some(w), Some(c)) => Some(format!("{w} ({c})")),
                (w, c) => w.or_else(|| c.map(str::to_string)),
            }
        }
        EventKind::Complained => str_field(obj, "source").map(str::to_string),
        _ => None,
    };
    let url = str_field(obj, "url")
        .filter(|_| kind == EventKind::Clicked)
        .map(str::to_string);
    let ip = str_field(obj, "ip");
    let agent = str_field(obj, "agent");
    // Mailjet has no event id: the event is what happened, to which message and recipient,
    // when (to the second), and from where for opens and clicks.
    let key = event_key(&[
        "mailjet",
        event,
        &recipient,
        msg_id.as_deref().unwrap_or(""),
        &time.to_string(),
        url.as_deref().unwrap_or(""),
        ip.unwrap_or(""),
        agent.unwrap_or(""),
        bounce_class.map(BounceClass::as_str).unwrap_or(""),
    ]);
    Normalized::Event(Box::new(DeliveryEvent {
        trace_parent: None,
        event_key: key,
        tenant: attribution.tenant,
        provider: "mailjet".into(),
        kind,
        dispatch_key: attribution.dispatch_key,
        dispatch_id: attribution.dispatch_id,
        campaign_id: attribution.campaign_id,
        message_id: msg_id,
        recipient,
        occurred_at_ms: time.saturating_mul(1000),
        received_at_ms: env.received_at_ms,
        envelope_id: env.id.clone(),
        provider_event: event.to_string(),
        provider_event_id: None,
        bounce_class,
        reason,
        smtp_status: None,
        url,
        user_agent: agent.map(str::to_string),
        ip: ip.map(str::to_string),
        machine: false,
        group_id: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::{Tenant, TenantConfig};
    use hyper::http::{HeaderMap, HeaderValue};
    use serde_json::json;

    const USER: &str = "xsender-t1";
    const PASS: &str = "s3cret-pass-for-t1-0123";

    /// `(api_key, username, password)`.
    type Creds<'a> = (&'a str, &'a str, &'a str);

    fn mailjet() -> Arc<dyn Provider> {
        Arc::new(Mailjet::new(&ProviderSettings::default()))
    }

    /// `(id, Some((api_key, user, pass)))`; `None` = no Mailjet section.
    fn tenants(p: &Arc<dyn Provider>, list: &[(&str, Option<Creds>)]) -> TenantSet {
        let prepared = list
            .iter()
            .map(|(id, creds)| {
                let mut cfg = TenantConfig::default();
                if let Some((k, u, pw)) = creds {
                    cfg.providers.insert(
                        "mailjet".into(),
                        json!({"api_key": k, "username": u, "password": pw}),
                    );
                }
                Tenant::prepare(id, cfg, std::slice::from_ref(p)).unwrap()
            })
            .collect();
        TenantSet::new(prepared).unwrap()
    }

    fn basic(user: &str, pass: &str) -> String {
        format!("Basic {}", B64.encode(format!("{user}:{pass}")))
    }

    async fn verify(
        p: &Arc<dyn Provider>,
        set: &TenantSet,
        body: &[u8],
        auth: Option<&str>,
        route: Option<&str>,
    ) -> Result<Verified, Rejection> {
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(a) = auth {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        let req = WebhookRequest {
            headers: &headers,
            body,
            route_tenant: route,
            now_ms: 1_433_333_949_000,
        };
        p.verify(&req, set).await
    }

    fn fixture(name: &str) -> &'static str {
        match name {
            "sent" => include_str!("../../tests/fixtures/mailjet/sent.json"),
            "open" => include_str!("../../tests/fixtures/mailjet/open.json"),
            "click" => include_str!("../../tests/fixtures/mailjet/click.json"),
            "bounce" => include_str!("../../tests/fixtures/mailjet/bounce.json"),
            "bounce_soft" => include_str!("../../tests/fixtures/mailjet/bounce_soft.json"),
            "blocked" => include_str!("../../tests/fixtures/mailjet/blocked.json"),
            "spam" => include_str!("../../tests/fixtures/mailjet/spam.json"),
            "unsub" => include_str!("../../tests/fixtures/mailjet/unsub.json"),
            "grouped" => include_str!("../../tests/fixtures/mailjet/grouped.json"),
            other => panic!("no fixture {other}"),
        }
    }

    fn env(body: impl Into<Vec<u8>>, verified: &[&str]) -> RawEnvelope {
        RawEnvelope::verified("mailjet", body, verified)
    }

    fn events(out: Vec<Normalized>) -> Vec<DeliveryEvent> {
        out.into_iter()
            .map(|n| match n {
                Normalized::Event(e) => *e,
                Normalized::Dead(d) => panic!("unexpected dead letter {d:?}"),
            })
            .collect()
    }

    fn one_event(out: Vec<Normalized>) -> DeliveryEvent {
        let mut v = events(out);
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn one_dead(out: Vec<Normalized>) -> crate::event::DeadLetter {
        match out.as_slice() {
            [Normalized::Dead(d)] => d.clone(),
            other => panic!("expected one dead letter, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn valid_basic_credentials_verify() {
        let p = mailjet();
        let set = tenants(&p, &[("t1", Some(("mjkey-t1", USER, PASS))), ("t2", None)]);
        let ok = verify(
            &p,
            &set,
            fixture("sent").as_bytes(),
            Some(&basic(USER, PASS)),
            None,
        )
        .await
        .unwrap();
        assert_eq!(ok.tenants, vec!["t1".to_string()]);
        assert_eq!(ok.default_tenant.as_deref(), Some("t1"));
        assert_eq!(ok.items, 1);
        // Through the per-tenant URL too.
        assert!(verify(
            &p,
            &set,
            fixture("sent").as_bytes(),
            Some(&basic(USER, PASS)),
            Some("t1")
        )
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn without_valid_credentials_the_request_is_refused() {
        let p = mailjet();
        let set = tenants(&p, &[("t1", Some(("mjkey-t1", USER, PASS))), ("t2", None)]);
        let body = fixture("sent").as_bytes();
        let wrong_user = basic("xsender-t2", PASS);
        let wrong_pass = basic(USER, "s3cret-pass-for-t1-0124");
        let no_colon = format!("Basic {}", B64.encode(format!("{USER}{PASS}")));
        let bearer = format!("Bearer {PASS}");
        let cases: Vec<(&str, Option<&str>, Option<&str>, &str)> = vec![
            ("no Authorization", None, None, "missing Authorization"),
            ("wrong scheme", Some(&bearer), None, "Basic scheme"),
            ("not base64", Some("Basic !!!"), None, "not base64"),
            ("no colon", Some(&no_colon), None, "user:password"),
            (
                "wrong user",
                Some(&wrong_user),
                None,
                "do not match any tenant",
            ),
            (
                "wrong password",
                Some(&wrong_pass),
                None,
                "do not match any tenant",
            ),
            (
                "empty credentials",
                Some("Basic Og=="),
                None,
                "do not match",
            ),
            (
                "right creds, other tenant's URL",
                Some(&wrong_pass),
                Some("t1"),
                "tenant 't1'",
            ),
            // Fail closed: a tenant without credentials accepts nothing.
            (
                "tenant without credentials",
                Some(&wrong_pass),
                Some("t2"),
                "no mailjet credentials",
            ),
        ];
        for (name, auth, route, needle) in cases {
            let err = verify(&p, &set, body, auth, route).await.expect_err(name);
            assert_eq!(err.status, StatusCode::UNAUTHORIZED, "{name}: {err:?}");
            assert!(err.message.contains(needle), "{name}: {}", err.message);
            let code = if route == Some("t2") {
                "no_credentials"
            } else {
                "bad_credentials"
            };
            assert_eq!(err.code, code, "{name}");
        }
        // No tenant has Mailjet credentials at all.
        let none = tenants(&p, &[("t2", None)]);
        let err = verify(&p, &none, body, Some(&basic(USER, PASS)), None)
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert!(
            err.message.contains("[tenants.<id>.mailjet]"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn malformed_bodies_are_400() {
        let p = mailjet();
        let set = tenants(&p, &[("t1", Some(("mjkey-t1", USER, PASS)))]);
        let auth = basic(USER, PASS);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let mut invalid_utf8 = fixture("sent").as_bytes().to_vec();
        let at = invalid_utf8.windows(3).position(|w| w == b"api").unwrap();
        invalid_utf8[at] = 0xc3;
        invalid_utf8[at + 1] = 0x28;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty body", vec![]),
            ("not JSON", b"event=sent".to_vec()),
            ("invalid UTF-8", invalid_utf8),
            ("JSON number", b"42".to_vec()),
            ("empty array", b"[]".to_vec()),
            ("array of non-objects", b"[1, 2]".to_vec()),
            ("array with one non-object", format!("[{}, \"x\"]", fixture("sent").trim()).into_bytes()),
            ("10000 nested arrays", deep.into_bytes()),
            ("missing event", json!({"time": 1, "email": "a@b.c"}).to_string().into_bytes()),
            ("event is a number", json!({"event": 1, "time": 1, "email": "a@b.c"}).to_string().into_bytes()),
            ("missing time", json!({"event": "sent", "email": "a@b.c"}).to_string().into_bytes()),
            ("time is a float", json!({"event": "sent", "time": 1.5, "email": "a@b.c"}).to_string().into_bytes()),
            ("time negative", json!({"event": "sent", "time": -1, "email": "a@b.c"}).to_string().into_bytes()),
            ("time beyond u64", br#"{"event":"sent","time":123456789012345678901234567890,"email":"a@b.c"}"#.to_vec()),
            ("time out of range", br#"{"event":"sent","time":1e400,"email":"a@b.c"}"#.to_vec()),
            ("missing email", json!({"event": "sent", "time": 1}).to_string().into_bytes()),
            ("email is an object", json!({"event": "sent", "time": 1, "email": {}}).to_string().into_bytes()),
            ("MessageID beyond 64 bits", br#"{"event":"sent","time":1,"email":"a@b.c","MessageID":123456789012345678901234}"#.to_vec()),
            ("MessageID is a float", br#"{"event":"sent","time":1,"email":"a@b.c","MessageID":1.5}"#.to_vec()),
            ("MessageID is an array", br#"{"event":"sent","time":1,"email":"a@b.c","MessageID":[1]}"#.to_vec()),
        ];
        for (name, body) in cases {
            // Even with valid credentials, and before looking at them.
            for a in [Some(auth.as_str()), None] {
                let err = verify(&p, &set, &body, a, None).await.expect_err(name);
                assert_eq!(err.status, StatusCode::BAD_REQUEST, "{name}: {err:?}");
                assert_eq!(err.code, "malformed", "{name}");
            }
        }
        // In a grouped array (even of one) an odd item is stored and dead-lettered later, so it
        // cannot make Mailjet resend the good events of its batch.
        let odd = json!([{"event": "sent", "time": 1}]).to_string();
        let ok = verify(&p, &set, odd.as_bytes(), Some(&auth), None)
            .await
            .unwrap();
        assert_eq!(ok.items, 1);
    }

    #[test]
    fn documented_events_normalize_to_the_right_kinds() {
        let p = mailjet();
        let cases: &[(&str, EventKind, Option<BounceClass>)] = &[
            ("sent", EventKind::Delivered, None),
            ("open", EventKind::Opened, None),
            ("click", EventKind::Clicked, None),
            ("bounce", EventKind::Bounced, Some(BounceClass::Hard)),
            ("bounce_soft", EventKind::Bounced, Some(BounceClass::Soft)),
            ("blocked", EventKind::Dropped, None),
            ("spam", EventKind::Complained, None),
            ("unsub", EventKind::Unsubscribed, None),
        ];
        for (name, kind, class) in cases {
            let e = one_event(p.normalize(&env(fixture(name), &["t1"])));
            assert_eq!((e.kind, e.bounce_class), (*kind, *class), "{name}");
            assert_eq!(e.tenant, "t1");
            assert!(!e.machine);
            // `Payload` is empty and CustomID is free text: unattributed, message-id fallback.
            assert_eq!(e.dispatch_id, None, "{name}");
            assert_eq!(
                e.dispatch_key,
                DeliveryEvent::fallback_dispatch_key(e.message_id.as_deref(), &e.recipient)
            );
        }
        let sent = one_event(p.normalize(&env(fixture("sent"), &["t1"])));
        assert_eq!(sent.message_id.as_deref(), Some("19421777835146490"));
        assert_eq!(sent.occurred_at_ms, 1_433_333_949_000);
        assert_eq!(sent.recipient, "api@mailjet.com");
        let bounce = one_event(p.normalize(&env(fixture("bounce"), &["t1"])));
        assert_eq!(
            bounce.reason.as_deref(),
            Some("recipient: user unknown (Host or domain name not found. Name service error for name=lbjsnrftlsiuvbsren.com type=A: Host not found)")
        );
        let click = one_event(p.normalize(&env(fixture("click"), &["t1"])));
        assert_eq!(click.url.as_deref(), Some("https://mailjet.com"));
        assert_eq!(click.ip.as_deref(), Some("127.0.0.1"));
        let spam = one_event(p.normalize(&env(fixture("spam"), &["t1"])));
        assert_eq!(spam.reason.as_deref(), Some("JMRPP"));
        let blocked = one_event(p.normalize(&env(fixture("blocked"), &["t1"])));
        assert_eq!(blocked.reason.as_deref(), Some("recipient: user unknown"));
    }

    #[tokio::test]
    async fn grouped_array_of_mixed_events_normalizes() {
        let p = mailjet();
        let set = tenants(&p, &[("t1", Some(("mjkey-t1", USER, PASS)))]);
        let body = fixture("grouped");
        let ok = verify(&p, &set, body.as_bytes(), Some(&basic(USER, PASS)), None)
            .await
            .unwrap();
        assert_eq!(ok.items, 4);
        let ev = events(p.normalize(&env(body, &["t1"])));
        let got: Vec<_> = ev
            .iter()
            .map(|e| {
                (
                    e.kind,
                    e.bounce_class,
                    e.dispatch_key.as_str(),
                    e.recipient.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (EventKind::Delivered, None, "d:d1", "api@mailjet.com"),
                (EventKind::Opened, None, "d:d1", "api@mailjet.com"),
                (
                    EventKind::Bounced,
                    Some(BounceClass::Hard),
                    "d:d2",
                    "bounce@mailjet.com"
                ),
                // Sent by another application on the same account: kept, unattributed.
                (
                    EventKind::Clicked,
                    None,
                    "m:19421777836302491:other@mailjet.com",
                    "other@mailjet.com"
                ),
            ]
        );
        assert!(ev[..3]
            .iter()
            .all(|e| e.campaign_id.as_deref() == Some("c1")));
        let keys: BTreeSet<_> = ev.iter().map(|e| e.event_key.clone()).collect();
        assert_eq!(keys.len(), 4, "distinct happenings get distinct keys");
        // Normalizing again (a replay) gives exactly the same output.
        assert_eq!(ev, events(p.normalize(&env(body, &["t1"]))));
    }

    #[test]
    fn big_message_ids_survive_exactly() {
        let p = mailjet();
        // 19421777835146491 (17 digits) becomes ...492 through f64;
        // 1152921521845838572 (19 digits) becomes ...8560.
        for id in [
            "19421777835146491",
            "1152921521845838572",
            "9223372036854775807",
            "18446744073709551615",
        ] {
            assert_ne!(
                (id.parse::<f64>().unwrap() as u128).to_string(),
                id,
                "{id} must be one f64 cannot hold"
            );
            for raw in [id.to_string(), format!("\"{id}\"")] {
                let body = format!(
                    r#"{{"event":"open","time":1433103519,"MessageID":{raw},"email":"a@example.com","Payload":""}}"#
                );
                let e = one_event(p.normalize(&env(body, &["t1"])));
                assert_eq!(e.message_id.as_deref(), Some(id));
                assert_eq!(e.dispatch_key, format!("m:{id}:a@example.com"));
            }
        }
        // Inside a grouped array as well.
        let ev = events(p.normalize(&env(fixture("grouped"), &["t1"])));
        assert_eq!(ev[0].message_id.as_deref(), Some("1152921521845838572"));
        assert_eq!(ev[2].message_id.as_deref(), Some("1152921531826433107"));
        assert_eq!(ev[3].message_id.as_deref(), Some("19421777836302491"));
    }

    #[test]
    fn payload_shapes_and_attribution() {
        let p = mailjet();
        let base = json!({"event": "open", "time": 1433103519, "MessageID": 1152921521845838572u64,
                          "email": "a@example.com"});
        let xs = json!({"xs_tenant": "t1", "xs_campaign": "c", "xs_dispatch": "d", "mj_api_key": "mjkey-t1"});
        let cases = [
            (json!({"Payload": xs.to_string()}), "d:d"),
            (json!({"Payload": xs.clone()}), "d:d"),
            (json!({"Payload": "", "CustomID": xs.to_string()}), "d:d"),
            (
                json!({"Payload": "", "CustomID": "helloworld"}),
                "m:1152921521845838572:a@example.com",
            ),
            (
                json!({"Payload": "not json {"}),
                "m:1152921521845838572:a@example.com",
            ),
            (
                json!({"Payload": "[1,2]"}),
                "m:1152921521845838572:a@example.com",
            ),
            (
                json!({"Payload": null}),
                "m:1152921521845838572:a@example.com",
            ),
            (json!({}), "m:1152921521845838572:a@example.com"),
        ];
        for (extra, key) in cases {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = one_event(p.normalize(&env(v.to_string(), &["t1"])));
            assert_eq!(e.dispatch_key, key, "{extra}");
        }
        // A payload naming a tenant whose credentials did not verify: dead-lettered.
        let mut v = base.clone();
        v["Payload"] = json!(json!({"xs_tenant": "t2", "xs_dispatch": "d"}).to_string());
        let d = one_dead(p.normalize(&env(v.to_string(), &["t1"])));
        assert_eq!(d.reason, "tenant_not_verified");
        assert!(d.detail.contains("'t2'"), "{}", d.detail);
    }

    #[tokio::test]
    async fn shared_credentials_pick_the_default_tenant_by_api_key() {
        let p = mailjet();
        let set = tenants(
            &p,
            &[
                ("t1", Some(("mjkey-t1", USER, PASS))),
                ("t2", Some(("mjkey-t2", USER, PASS))),
            ],
        );
        let one = |key: &str| {
            json!({"event": "open", "time": 1433103519, "MessageID": 1, "email": "a@example.com",
                   "Payload": json!({"mj_api_key": key}).to_string()})
        };
        let auth = basic(USER, PASS);
        let v = verify(
            &p,
            &set,
            one("mjkey-t2").to_string().as_bytes(),
            Some(&auth),
            None,
        )
        .await
        .unwrap();
        assert_eq!(v.tenants, vec!["t1".to_string(), "t2".to_string()]);
        assert_eq!(v.default_tenant.as_deref(), Some("t2"));
        // Mixed or unknown keys: no default; events must name xs_tenant (or use /mailjet/{tenant}).
        let mixed = json!([one("mjkey-t1"), one("mjkey-t2")]).to_string();
        let v = verify(&p, &set, mixed.as_bytes(), Some(&auth), None)
            .await
            .unwrap();
        assert_eq!(v.default_tenant, None);
        let v = verify(
            &p,
            &set,
            one("mjkey-zz").to_string().as_bytes(),
            Some(&auth),
            None,
        )
        .await
        .unwrap();
        assert_eq!(v.default_tenant, None);
    }

    #[test]
    fn grouped_items_that_cannot_be_read_are_dead_lettered_alone() {
        let p = mailjet();
        let body = json!([
            {"event": "sent", "time": 1, "email": "a@example.com", "MessageID": 5},
            {"event": "sent", "time": "soon", "email": "a@example.com"},
            {"event": "sent", "time": 1},
            {"event": "sent", "time": 1, "email": "nobody"},
            {"time": 1, "email": "a@example.com"},
            {"event": "sent", "time": 1, "email": "a@example.com", "MessageID": 1.5},
            7
        ])
        .to_string();
        let out = p.normalize(&env(body, &["t1"]));
        let reasons: Vec<&str> = out
            .iter()
            .map(|n| match n {
                Normalized::Event(_) => "event",
                Normalized::Dead(d) => d.reason.as_str(),
            })
            .collect();
        assert_eq!(
            reasons,
            [
                "event",
                "invalid_field",
                "missing_field",
                "invalid_field",
                "missing_field",
                "invalid_field",
                "malformed_item"
            ]
        );
        for garbage in [&b"\xff"[..], b"{", b"\"x\""] {
            assert_eq!(
                one_dead(p.normalize(&env(garbage, &["t1"]))).reason,
                "malformed_body"
            );
        }
    }

    #[test]
    fn credentials_section_is_strict() {
        let p = mailjet();
        let ok = json!({"api_key": "k", "username": USER, "password": PASS});
        assert!(p.parse_credentials(&ok).is_ok());
        let mut extra = ok.clone();
        extra["secret_key"] = json!("x");
        assert!(p
            .parse_credentials(&extra)
            .unwrap_err()
            .contains("unknown field"));
        let mut short = ok.clone();
        short["password"] = json!("short");
        assert!(p
            .parse_credentials(&short)
            .unwrap_err()
            .contains("at least 16"));
        let mut colon = ok.clone();
        colon["username"] = json!("a:b");
        assert!(p
            .parse_credentials(&colon)
            .unwrap_err()
            .contains("username"));
        let mut no_key = ok.clone();
        no_key["api_key"] = json!(" ");
        assert!(p
            .parse_credentials(&no_key)
            .unwrap_err()
            .contains("api_key"));
        assert!(p
            .parse_credentials(&json!({"api_key": "k"}))
            .unwrap_err()
            .contains("username"));
    }
}
