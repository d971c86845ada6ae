//! Amazon SES, delivered through Amazon SNS over HTTPS.
//!
//! SES has no webhook of its own: it publishes to an SNS topic, and SNS posts each message to
//! us inside a signed JSON envelope (RSA over a canonical string, certificate fetched from
//! AWS; see [`sns`]). There is no shared secret to configure, so a tenant is identified by the
//! topics it owns: `[tenants.<id>.ses] topic_arns = [...]`. A message from any other topic is
//! refused (403) before any certificate is fetched.
//!
//! SNS first sends a `SubscriptionConfirmation`; once its signature and topic check out we
//! confirm it by GETting its `SubscribeURL` (only ever an SNS endpoint in the topic's region),
//! and record the outcome for `GET /api/admin/sns-confirmations`. An
//! `UnsubscribeConfirmation` is verified and accepted but never confirmed: GETting its URL
//! would re-subscribe a topic its owner just left.
//!
//! Notifications carry an SES record as the JSON string `Message`, in one of two shapes:
//! configuration-set event publishing (`eventType`, with `mail.tags`) and identity
//! notifications (`notificationType`, no tags). Both map to one event per recipient, taken
//! from the record's own recipient list (`bounce.bouncedRecipients`, …), never from
//! `mail.destination` alone where a narrower list exists.

pub mod sns;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{
    attribute, body_prefix, dead, event_key, malformed_body, normalize_email, str_field,
    Credentials, Normalized, Provider, ProviderSettings, Rejection, Verified, WebhookRequest,
    XsMeta,
};
use crate::event::{BounceClass, DeliveryEvent, EventKind, RawEnvelope};
use crate::tenants::TenantSet;
use sns::{
    check_cert_url, check_subscribe_url, verify_signature, CertCache, DangerousTestTrust, Envelope,
    FetchError, Field, MessageType, ReqwestSnsHttp, Scanned, SnsHttp, TopicArn,
};

/// What SES publishes once to a topic newly set as an event destination. Not JSON, not an
/// event: accepted and kept in the raw log, normalized to nothing.
pub const VALIDATION_MESSAGE: &str =
    "Successfully validated SNS topic for Amazon SES event publishing.";

/// Certificates kept at most; SNS uses a handful per region.
pub const CERT_CACHE_ENTRIES: usize = 64;
/// How long a fetched certificate is trusted before it is fetched again (AWS rotates them).
pub const CERT_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Confirmation records kept for the admin API.
pub const CONFIRMATION_LOG_LEN: usize = 100;
/// Confirmed subscription tokens remembered, so SNS's resends do not confirm again.
pub const CONFIRMED_TOKENS: usize = 256;

/// A tenant's SES section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    /// The SNS topics this tenant's SES configuration sets / identities publish to.
    topic_arns: Vec<String>,
}

/// A tenant's prepared SES credentials: the topics it owns.
#[derive(Debug)]
pub struct SesTopics {
    pub topic_arns: BTreeSet<String>,
}

/// What happened to one subscription handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmationOutcome {
    /// The SubscribeURL answered 2xx.
    Confirmed,
    /// A confirmation for this token already succeeded; not fetched again.
    AlreadyConfirmed,
    /// The SubscribeURL could not be fetched or refused; SNS was told to retry (5xx).
    Failed,
    /// An UnsubscribeConfirmation: verified, accepted, deliberately not confirmed.
    UnsubscribeNotConfirmed,
}

/// One handshake, as listed by `GET /api/admin/sns-confirmations`.
#[derive(Debug, Clone, Serialize)]
pub struct SnsConfirmation {
    pub message_type: MessageType,
    pub topic_arn: String,
    /// Tenants whose allow-list names the topic.
    pub tenants: Vec<String>,
    pub at_ms: i64,
    pub outcome: ConfirmationOutcome,
    /// The SubscriptionArn SNS answered with, or what went wrong.
    pub detail: String,
    pub message_id: String,
}

/// Counters of handshakes since start (a metrics endpoint will read these).
#[derive(Debug, Default)]
pub struct SnsCounters {
    pub confirmed: AtomicU64,
    pub already_confirmed: AtomicU64,
    pub confirm_failed: AtomicU64,
    pub unsubscribe_not_confirmed: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SnsCounterSnapshot {
    pub confirmed: u64,
    pub already_confirmed: u64,
    pub confirm_failed: u64,
    pub unsubscribe_not_confirmed: u64,
}

impl SnsCounters {
    pub fn snapshot(&self) -> SnsCounterSnapshot {
        SnsCounterSnapshot {
            confirmed: self.confirmed.load(Ordering::Relaxed),
            already_confirmed: self.already_confirmed.load(Ordering::Relaxed),
            confirm_failed: self.confirm_failed.load(Ordering::Relaxed),
            unsubscribe_not_confirmed: self.unsubscribe_not_confirmed.load(Ordering::Relaxed),
        }
    }
}

/// Recent handshakes (newest first) and the counters, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct SnsConfirmationReport {
    pub items: Vec<SnsConfirmation>,
    pub counters: SnsCounterSnapshot,
}

pub struct Ses {
    http: Arc<dyn SnsHttp>,
    certs: CertCache,
    trust: Option<DangerousTestTrust>,
    confirmations: Mutex<VecDeque<SnsConfirmation>>,
    /// Confirmations by SHA-256 of (topic, token): in flight or done.
    confirmed: Mutex<HashMap<[u8; 32], TokenEntry>>,
    counters: SnsCounters,
}

type ConfirmResult = Result<String, FetchError>;

struct TokenEntry {
    cell: Arc<OnceCell<ConfirmResult>>,
    created: std::time::Instant,
}

/// Stands in when the HTTP client cannot be built (no TLS backend): every request that needs
/// the network gets a 503 saying why, instead of the process failing to start.
struct UnavailableHttp(String);

#[async_trait]
impl SnsHttp for UnavailableHttp {
    async fn fetch_certificate(&self, _: &url::Url) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::Unavailable(self.0.clone()))
    }
    async fn confirm_subscription(&self, _: &url::Url) -> Result<String, FetchError> {
        Err(FetchError::Unavailable(self.0.clone()))
    }
}

impl Ses {
    pub fn new(_settings: &ProviderSettings) -> Self {
        let http: Arc<dyn SnsHttp> = match ReqwestSnsHttp::new() {
            Ok(h) => Arc::new(h),
            Err(e) => {
                tracing::error!(error = %e, "SES: cannot build the HTTPS client; SNS messages will get 503 until fixed");
                Arc::new(UnavailableHttp(format!("HTTPS client unavailable: {e}")))
            }
        };
        Self::with_http(http)
    }

    /// With another HTTP implementation (tests count requests through it).
    pub fn with_http(http: Arc<dyn SnsHttp>) -> Self {
        Ses {
            http,
            certs: CertCache::new(CERT_CACHE_ENTRIES, CERT_CACHE_TTL),
            trust: None,
            confirmations: Mutex::new(VecDeque::new()),
            confirmed: Mutex::new(HashMap::new()),
            counters: SnsCounters::default(),
        }
    }

    /// TEST ONLY: also accept SubscribeURLs on the trust's loopback origin. The HTTP client
    /// must trust its certificate too ([`ReqwestSnsHttp::with_dangerous_test_trust`]).
    pub fn with_dangerous_test_trust(mut self, trust: DangerousTestTrust) -> Self {
        tracing::warn!(
            ?trust,
            "DANGEROUS: SES adapter accepts a local SubscribeURL origin (tests only)"
        );
        self.trust = Some(trust);
        self
    }

    pub fn counters(&self) -> SnsCounterSnapshot {
        self.counters.snapshot()
    }

    /// Recent confirmations, newest first.
    pub fn confirmations(&self) -> Vec<SnsConfirmation> {
        self.log().iter().cloned().collect()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, VecDeque<SnsConfirmation>> {
        // A poisoned lock only means a panic elsewhere mid-push; the list is still valid.
        self.confirmations.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, c: SnsConfirmation) {
        let counter = match c.outcome {
            ConfirmationOutcome::Confirmed => &self.counters.confirmed,
            ConfirmationOutcome::AlreadyConfirmed => &self.counters.already_confirmed,
            ConfirmationOutcome::Failed => &self.counters.confirm_failed,
            ConfirmationOutcome::UnsubscribeNotConfirmed => {
                &self.counters.unsubscribe_not_confirmed
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log();
        log.push_front(c);
        log.truncate(CONFIRMATION_LOG_LEN);
    }

    /// The confirmation of one token: one GET however many copies of the message arrive, even
    /// at once. A success stays (SNS resends a confirmation it thinks went unanswered; it must
    /// not cause a second GET), a failure is forgotten so SNS's retry tries again.
    fn confirmation_cell(&self, token_hash: [u8; 32]) -> Arc<OnceCell<ConfirmResult>> {
        let mut map = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&token_hash) {
            return c.cell.clone();
        }
        while map.len() >= CONFIRMED_TOKENS {
            let Some(oldest) = map.iter().min_by_key(|(_, c)| c.created).map(|(k, _)| *k) else {
                break;
            };
            map.remove(&oldest);
        }
        let cell = Arc::new(OnceCell::new());
        map.insert(
            token_hash,
            TokenEntry {
                cell: cell.clone(),
                created: std::time::Instant::now(),
            },
        );
        cell
    }

    /// Confirms a verified SubscriptionConfirmation of an allowed topic, and records it.
    async fn confirm(
        &self,
        env: &Envelope,
        tenants: &[String],
        now_ms: i64,
    ) -> Result<(), Rejection> {
        let Some(url) = &env.subscribe_url else {
            // Envelope::parse guarantees a SubscribeURL on confirmations.
            return Err(Rejection::malformed(
                "SubscriptionConfirmation has no SubscribeURL",
            ));
        };
        // Keyed by topic and token: the token alone is what SubscribeURL carries.
        let token_hash: [u8; 32] = Sha256::new()
            .chain_update(env.topic.arn.as_bytes())
            .chain_update([0])
            .chain_update(env.token.as_deref().unwrap_or_default().as_bytes())
            .finalize()
            .into();
        let cell = self.confirmation_cell(token_hash);
        let mut fetched_here = false;
        let result = cell
            .get_or_init(|| {
                fetched_here = true;
                self.http.confirm_subscription(url)
            })
            .await
            .clone();
        let rec = |outcome, detail: String| SnsConfirmation {
            message_type: env.kind,
            topic_arn: env.topic.arn.clone(),
            tenants: tenants.to_vec(),
            at_ms: now_ms,
            outcome,
            detail,
            message_id: env.message_id.clone(),
        };
        match result {
            Ok(_) if !fetched_here => {
                tracing::info!(topic = %env.topic.arn, ?tenants, "SNS subscription already confirmed with this token; SubscribeURL not fetched again");
                self.record(rec(
                    ConfirmationOutcome::AlreadyConfirmed,
                    "confirmed earlier with this token".into(),
                ));
                Ok(())
            }
            Ok(body) => {
                let arn = xml_text(&body, "SubscriptionArn").unwrap_or_default();
                tracing::info!(topic = %env.topic.arn, ?tenants, subscription = %arn, "SNS subscription confirmed");
                self.record(rec(ConfirmationOutcome::Confirmed, arn));
                Ok(())
            }
            Err(e) => {
                {
                    let mut map = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
                    if map
                        .get(&token_hash)
                        .is_some_and(|c| Arc::ptr_eq(&c.cell, &cell))
                    {
                        map.remove(&token_hash);
                    }
                }
                tracing::warn!(topic = %env.topic.arn, ?tenants, error = %e, "SNS subscription confirmation failed; SNS will retry");
                if fetched_here {
                    self.record(rec(ConfirmationOutcome::Failed, e.to_string()));
                }
                let (status, code) = match e {
                    FetchError::Unavailable(_) => {
                        (StatusCode::SERVICE_UNAVAILABLE, "confirm_unavailable")
                    }
                    FetchError::Refused(_) => (StatusCode::BAD_GATEWAY, "confirm_failed"),
                };
                Err(Rejection::new(
                    status,
                    code,
                    format!(
                        "signature and topic are fine, but confirming the subscription failed ({e}); \
                         answering 5xx so SNS resends the confirmation"
                    ),
                ))
            }
        }
    }
}

/// The text of the first `<tag>…</tag>` in a small XML answer (SNS's ConfirmSubscription
/// response); good enough for a log line, never trusted for anything else.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim().to_string())
}

/// A Message that starts like JSON must be JSON: SES never sends broken JSON, so such a
/// message is refused up front rather than stored. Plain text (SES's validation message, or
/// anything else someone publishes to the topic) is accepted; the normalizer dead-letters
/// what is not SES's.
fn check_message_claim(message: &str) -> Result<(), Rejection> {
    let t = message.trim_start();
    if t.starts_with('{') || t.starts_with('[') {
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(message) {
            return Err(Rejection::malformed(format!(
                "the SNS Message looks like a JSON SES event but does not parse ({e}); nothing was stored"
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl Provider for Ses {
    fn name(&self) -> &'static str {
        "ses"
    }

    /// SNS posts JSON labelled `text/plain; charset=UTF-8`; accept the honest label too.
    fn content_types(&self) -> &'static [&'static str] {
        &["text/plain", "application/json"]
    }

    fn parse_credentials(&self, section: &Value) -> Result<Credentials, String> {
        let s: Section = serde_json::from_value(section.clone()).map_err(|e| e.to_string())?;
        if s.topic_arns.is_empty() {
            return Err("topic_arns is empty: list the SNS topic ARNs your SES configuration sets publish to".into());
        }
        let mut topic_arns = BTreeSet::new();
        for arn in &s.topic_arns {
            let t = TopicArn::parse(arn.trim()).map_err(|e| format!("topic_arns: {e}"))?;
            topic_arns.insert(t.arn);
        }
        Ok(Arc::new(SesTopics { topic_arns }))
    }

    async fn verify(
        &self,
        req: &WebhookRequest<'_>,
        tenants: &TenantSet,
    ) -> Result<Verified, Rejection> {
        // Structure, then every URL rule, then the topic allow-list: all before any outbound
        // request, so nothing an unauthenticated sender writes can make us fetch anything.
        let env = Envelope::parse(req.body, req.headers)?;
        check_cert_url(&env.signing_cert_url).map_err(|m| {
            Rejection::unauthorized(format!("SigningCertURL refused, nothing was fetched: {m}"))
        })?;
        if env.kind == MessageType::SubscriptionConfirmation {
            if let Some(u) = &env.subscribe_url {
                check_subscribe_url(u, &env.topic, self.trust.as_ref()).map_err(|m| {
                    Rejection::unauthorized(format!(
                        "SubscribeURL refused, nothing was fetched: {m}"
                    ))
                })?;
            }
        }
        if env.kind == MessageType::Notification {
            check_message_claim(&env.message)?;
        }

        let candidates = tenants.candidates(self.name(), req.route_tenant)?;
        let allowed: Vec<String> = candidates
            .iter()
            .filter(|(_, c)| {
                c.downcast_ref::<SesTopics>()
                    .is_some_and(|t| t.topic_arns.contains(&env.topic.arn))
            })
            .map(|(id, _)| id.clone())
            .collect();
        if allowed.is_empty() {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "unknown_topic",
                match req.route_tenant {
                    Some(t) => format!(
                        "topic {} is not in tenant '{t}'s allow-list: add it to [tenants.{t}.ses] topic_arns",
                        env.topic.arn
                    ),
                    None => format!(
                        "topic {} is not in any tenant's allow-list: add it to [tenants.<id>.ses] topic_arns",
                        env.topic.arn
                    ),
                },
            ));
        }

        let key = self
            .certs
            .key(&env.signing_cert_url, &*self.http)
            .await
            .map_err(|e| match e {
                FetchError::Unavailable(m) => Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cert_unavailable",
                    format!("could not fetch the SNS signing certificate ({m}); retry later"),
                ),
                FetchError::Refused(m) => Rejection::unauthorized(format!(
                    "the SNS signing certificate cannot be used: {m}"
                )),
            })?;
        if !verify_signature(&key, &env) {
            return Err(Rejection::unauthorized(format!(
                "SNS signature (SignatureVersion {}) does not verify with the certificate at {}: \
                 the message was altered, or was not sent by Amazon SNS",
                match env.signature_version {
                    sns::SignatureVersion::V1 => "1, SHA1withRSA",
                    sns::SignatureVersion::V2 => "2, SHA256withRSA",
                },
                env.signing_cert_url
            )));
        }

        match env.kind {
            MessageType::Notification => {}
            MessageType::SubscriptionConfirmation => {
                self.confirm(&env, &allowed, req.now_ms).await?;
            }
            MessageType::UnsubscribeConfirmation => {
                tracing::info!(topic = %env.topic.arn, tenants = ?allowed, "SNS UnsubscribeConfirmation verified; deliberately not confirmed");
                self.record(SnsConfirmation {
                    message_type: env.kind,
                    topic_arn: env.topic.arn.clone(),
                    tenants: allowed.clone(),
                    at_ms: req.now_ms,
                    outcome: ConfirmationOutcome::UnsubscribeNotConfirmed,
                    detail: "never confirmed: its SubscribeURL would re-subscribe the endpoint"
                        .into(),
                    message_id: env.message_id.clone(),
                });
            }
        }
        let default_tenant = (allowed.len() == 1).then(|| allowed[0].clone());
        Ok(Verified {
            tenants: allowed,
            default_tenant,
            items: 1,
            ..Default::default()
        })
    }

    fn normalize(&self, env: &RawEnvelope) -> Vec<Normalized> {
        let obj = match Scanned::scan(&env.body) {
            Ok(Scanned::Object(o)) => o,
            Ok(Scanned::NotObject) => {
                return vec![malformed_body(env, "SNS envelope is not a JSON object")]
            }
            Err(e) => return vec![malformed_body(env, format!("body is not valid JSON: {e}"))],
        };
        match obj.ty.as_ref().and_then(Field::text) {
            Some("Notification") => {}
            // Handshakes stay in the raw log (and the admin API); they are not delivery events.
            Some("SubscriptionConfirmation" | "UnsubscribeConfirmation") => return vec![],
            other => {
                return vec![malformed_body(
                    env,
                    format!("unexpected SNS Type {other:?}"),
                )]
            }
        }
        let Some(Field::Str(message)) = &obj.message else {
            return vec![dead(
                env,
                "missing_field",
                "SNS Notification has no string 'Message'",
                body_prefix(&env.body),
            )];
        };
        let sns_id = obj.message_id.as_ref().and_then(Field::text);
        normalize_message(env, message, sns_id)
    }

    fn sns_confirmations(&self) -> Option<SnsConfirmationReport> {
        Some(SnsConfirmationReport {
            items: self.confirmations(),
            counters: self.counters(),
        })
    }
}

fn obj_field<'a>(obj: &'a Map<String, Value>, k: &str) -> Option<&'a Map<String, Value>> {
    obj.get(k).and_then(Value::as_object)
}

/// The SES record inside one Notification → events and dead letters.
pub fn normalize_message(
    env: &RawEnvelope,
    message: &str,
    sns_id: Option<&str>,
) -> Vec<Normalized> {
    if message.trim() == VALIDATION_MESSAGE {
        return vec![];
    }
    let item = || message.to_string();
    let record = match serde_json::from_str::<Value>(message) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return vec![dead(
                env,
                "not_ses_event",
                "SNS Message is JSON but not an object, so not an SES event",
                item(),
            )]
        }
        Err(_) => {
            return vec![dead(
                env,
                "not_ses_event",
                "SNS Message is neither JSON nor SES's topic validation message; something else \
                 publishes to this topic",
                item(),
            )]
        }
    };
    let (ty, event_publishing) = match (
        str_field(&record, "eventType"),
        str_field(&record, "notificationType"),
    ) {
        (Some(t), _) => (t, true),
        (None, Some(t)) => (t, false),
        (None, None) => {
            return vec![dead(
                env,
                "not_ses_event",
                "SNS Message is JSON but has neither 'eventType' (event publishing) nor \
                 'notificationType' (identity notifications)",
                item(),
            )]
        }
    };
    // SES confirms an identity-notification topic with this; like the validation message it
    // is a handshake, not an event.
    if !event_publishing && ty == "AmazonSnsSubscriptionSucceeded" {
        return vec![];
    }
    ses_record(env, &record, ty, sns_id)
}

/// One recipient of a record, with what the record says about it.
struct Recipient {
    raw: String,
    status: Option<String>,
    diagnostic: Option<String>,
}

/// `jane@example.com`, or the address inside `Jane <jane@example.com>`.
fn bare_address(s: &str) -> &str {
    let s = s.trim();
    match (s.rfind('<'), s.ends_with('>')) {
        (Some(i), true) => &s[i + 1..s.len() - 1],
        _ => s,
    }
}

/// A list of `{emailAddress, status?, diagnosticCode?}` objects (bounce, complaint, delay).
fn recipient_objects(list: Option<&Value>) -> Result<Vec<Recipient>, String> {
    let Some(Value::Array(items)) = list else {
        return Err("recipient list is missing or not an array".into());
    };
    items
        .iter()
        .map(|r| {
            let o = r
                .as_object()
                .ok_or_else(|| format!("recipient entry is not an object: {r}"))?;
            Ok(Recipient {
                raw: str_field(o, "emailAddress")
                    .ok_or_else(|| format!("recipient entry has no 'emailAddress': {r}"))?
                    .to_string(),
                status: str_field(o, "status").map(str::to_string),
                diagnostic: str_field(o, "diagnosticCode").map(str::to_string),
            })
        })
        .collect()
}

/// A list of address strings (`delivery.recipients`, `mail.destination`).
fn recipient_strings(list: Option<&Value>) -> Result<Vec<Recipient>, String> {
    let Some(Value::Array(items)) = list else {
        return Err("recipient list is missing or not an array".into());
    };
    items
        .iter()
        .map(|r| {
            Ok(Recipient {
                raw: r
                    .as_str()
                    .ok_or_else(|| format!("recipient is not a string: {r}"))?
                    .to_string(),
                status: None,
                diagnostic: None,
            })
        })
        .collect()
}

/// XSender's metadata from `mail.tags`, where every tag is an array of strings (SES's shape);
/// the first value counts. Identity notifications carry no tags: everything falls back.
fn xs_meta(mail: &Map<String, Value>) -> XsMeta {
    let mut flat = Map::new();
    if let Some(tags) = obj_field(mail, "tags") {
        for k in ["xs_tenant", "xs_campaign", "xs_dispatch"] {
            let v = match tags.get(k) {
                Some(Value::Array(a)) => a.first().cloned(),
                Some(v) => Some(v.clone()),
                None => None,
            };
            if let Some(v) = v {
                flat.insert(k.to_string(), v);
            }
        }
    }
    XsMeta::from_object(&flat)
}

fn parse_time_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Whether a Subscription record opts the contact out: `unsubscribeAll`, or any topic now
/// `OptOut`, in the new preferences.
fn subscription_opts_out(sub: Option<&Map<String, Value>>) -> bool {
    let Some(new) = sub.and_then(|s| obj_field(s, "newTopicPreferences")) else {
        return false;
    };
    new.get("unsubscribeAll").and_then(Value::as_bool) == Some(true)
        || new
            .get("topicSubscriptionStatus")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|t| t.get("subscriptionStatus").and_then(Value::as_str) == Some("OptOut"))
            })
}

fn ses_record(
    env: &RawEnvelope,
    record: &Map<String, Value>,
    ty: &str,
    sns_id: Option<&str>,
) -> Vec<Normalized> {
    let item = || Value::Object(record.clone()).to_string();
    let Some(mail) = obj_field(record, "mail") else {
        return vec![dead(
            env,
            "missing_field",
            format!("SES '{ty}' record has no 'mail' object"),
            item(),
        )];
    };
    // The event-specific object, named after the type in both shapes.
    let detail_key = match ty {
        "Bounce" => "bounce",
        "Complaint" => "complaint",
        "Delivery" => "delivery",
        "Send" => "send",
        "Reject" => "reject",
        "Open" => "open",
        "Click" => "click",
        "DeliveryDelay" => "deliveryDelay",
        "Rendering Failure" => "failure",
        "Subscription" => "subscription",
        _ => "",
    };
    let detail = obj_field(record, detail_key);
    let needs_detail = matches!(ty, "Bounce" | "Complaint" | "Delivery" | "DeliveryDelay");
    if needs_detail && detail.is_none() {
        return vec![dead(
            env,
            "missing_field",
            format!("SES '{ty}' record has no '{detail_key}' object"),
            item(),
        )];
    }
    let d = |k: &str| detail.and_then(|o| str_field(o, k));

    let kind = match ty {
        "Send" => EventKind::Sent,
        "Delivery" => EventKind::Delivered,
        "Bounce" => EventKind::Bounced,
        "Complaint" => EventKind::Complained,
        "Open" => EventKind::Opened,
        "Click" => EventKind::Clicked,
        "Reject" => EventKind::Dropped,
        "DeliveryDelay" => EventKind::Deferred,
        "Subscription" if subscription_opts_out(detail) => EventKind::Unsubscribed,
        // Rendering Failure, a Subscription that opts nothing out, and any future type: kept
        // for analytics, no effect on projections.
        _ => EventKind::Other,
    };
    let recipients = match ty {
        "Bounce" => recipient_objects(detail.and_then(|o| o.get("bouncedRecipients"))),
        "Complaint" => recipient_objects(detail.and_then(|o| o.get("complainedRecipients"))),
        "DeliveryDelay" => recipient_objects(detail.and_then(|o| o.get("delayedRecipients"))),
        "Delivery" => recipient_strings(detail.and_then(|o| o.get("recipients"))),
        _ => recipient_strings(mail.get("destination")),
    };
    let recipients = match recipients {
        Ok(r) if r.is_empty() => {
            return vec![dead(
                env,
                "missing_field",
                format!("SES '{ty}' record names no recipients"),
                item(),
            )]
        }
        Ok(r) => r,
        Err(e) => {
            return vec![dead(
                env,
                "invalid_field",
                format!("SES '{ty}': {e}"),
                item(),
            )]
        }
    };
    // The happening's own time where the record has one; Send, Reject and Rendering Failure
    // only have the send time.
    let ts_text = d("timestamp").or_else(|| str_field(mail, "timestamp"));
    let Some((ts_text, occurred_at_ms)) = ts_text.and_then(|t| Some((t, parse_time_ms(t)?))) else {
        return vec![dead(
            env,
            "missing_field",
            format!("SES '{ty}' record has no RFC 3339 timestamp"),
            item(),
        )];
    };
    let message_id = str_field(mail, "messageId").map(str::to_string);
    let meta = xs_meta(mail);

    // Permanent bounces are hard; Transient and Undetermined are soft whatever the SMTP code
    // says (SES sends 5.x.x with Transient, e.g. mailbox full).
    let bounce_type = d("bounceType");
    let bounce_sub = d("bounceSubType");
    let bounce_class = (kind == EventKind::Bounced).then_some(match bounce_type {
        Some("Permanent") => BounceClass::Hard,
        _ => BounceClass::Soft,
    });
    let feedback_id = d("feedbackId");
    let url = d("link").filter(|_| kind == EventKind::Clicked);
    let (user_agent, ip) = match kind {
        EventKind::Opened | EventKind::Clicked => (d("userAgent"), d("ipAddress")),
        _ => (None, None),
    };

    recipients
        .into_iter()
        .map(|r| {
            let addr = bare_address(&r.raw);
            let Some(recipient) = normalize_email(addr) else {
                return dead(
                    env,
                    "invalid_field",
                    format!("SES '{ty}' recipient is not an address: {:?}", r.raw),
                    item(),
                );
            };
            let attribution = match attribute(env, &meta, message_id.as_deref(), &recipient) {
                Ok(a) => a,
                Err((reason, detail)) => return dead(env, reason, detail, item()),
            };
            let reason = match ty {
                "Bounce" => Some(format!(
                    "{}/{}{}",
                    bounce_type.unwrap_or("?"),
                    bounce_sub.unwrap_or("?"),
                    r.diagnostic
                        .as_deref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                )),
                "Complaint" => d("complaintFeedbackType")
                    .or_else(|| d("complaintSubType"))
                    .map(str::to_string),
                "Reject" => d("reason").map(str::to_string),
                "DeliveryDelay" => Some(format!(
                    "{}{}",
                    d("delayType").unwrap_or("delayed"),
                    r.diagnostic
                        .as_deref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                )),
                "Rendering Failure" => d("errorMessage").map(str::to_string),
                "Subscription" => d("source").map(str::to_string),
                _ => None,
            };
            // No shape in the key: the same bounce published both as an identity notification
            // and through a configuration set is one happening, and dedupes.
            let key = event_key(&[
                "ses",
                ty,
                &recipient,
                message_id.as_deref().unwrap_or(""),
                ts_text,
                url.unwrap_or(""),
                bounce_type.unwrap_or(""),
                bounce_sub.unwrap_or(""),
                feedback_id.unwrap_or(""),
            ]);
            Normalized::Event(Box::new(DeliveryEvent {
                trace_parent: None,
                event_key: key,
                tenant: attribution.tenant,
                provider: "ses".into(),
                kind,
                dispatch_key: attribution.dispatch_key,
                dispatch_id: attribution.dispatch_id,
                campaign_id: attribution.campaign_id,
                message_id: message_id.clone(),
                recipient,
                occurred_at_ms,
                received_at_ms: env.received_at_ms,
                envelope_id: env.id.clone(),
                provider_event: ty.to_string(),
                // The SNS notification id: shared by the recipients of one record, stable
                // across SNS retries.
                provider_event_id: sns_id.map(str::to_string),
                bounce_class,
                reason,
                smtp_status: r.status.clone(),
                url: url.map(str::to_string),
                user_agent: user_agent.map(str::to_string),
                ip: ip.map(str::to_string),
                machine: false,
                group_id: None,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests;
