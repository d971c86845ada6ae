//! ESP adapters. Each provider is one file: it verifies a request over its raw bytes and
//! resolves the tenant (ingress side), and turns a stored raw envelope into normalized events
//! (normalizer side, pure). Adding an ESP = one file + one line in [`registry`] + a folder of
//! fixtures under `tests/fixtures/<name>/`.

pub mod sendgrid;
pub mod ses;

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::http::HeaderMap;
use hyper::StatusCode;
use sha2::{Digest, Sha256};

use crate::event::{DeadLetter, DeliveryEvent, RawEnvelope};
use crate::tenants::TenantSet;

/// The adapters this build serves, by URL name. One line per ESP.
pub fn registry(settings: &ProviderSettings) -> Vec<Arc<dyn Provider>> {
    vec![
        Arc::new(sendgrid::SendGrid::new(settings)),
        Arc::new(ses::Ses::new(settings)),
    ]
}

/// Providers of the published contract whose adapters have not landed yet: their routes exist
/// and answer 404 with this reason rather than a bare "not found".
pub const PLANNED: &[&str] = &["mailgun", "mailjet"];

/// Settings shared by the adapters.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// How far a signed timestamp may be from our clock, either way, before the request is
    /// rejected as a replay.
    pub timestamp_tolerance: Duration,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        ProviderSettings {
            timestamp_tolerance: Duration::from_secs(600),
        }
    }
}

/// A provider's parsed credentials for one tenant, prepared once at load (e.g. a decoded key).
pub type Credentials = Arc<dyn Any + Send + Sync>;

/// The request as ingress saw it: raw bytes, untouched.
pub struct WebhookRequest<'a> {
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// From `/api/webhook/email/{provider}/{tenant}`.
    pub route_tenant: Option<&'a str>,
    pub now_ms: i64,
}

/// Who a verified request may write for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub tenants: Vec<String>,
    pub default_tenant: Option<String>,
    /// Items in the body, for the response and metrics.
    pub items: usize,
}

/// Why a request is refused. The message is for a person and says what to fix; `code` is
/// stable for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "bad_signature", message)
    }
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed", message)
    }
    pub fn unknown_tenant(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_tenant",
            format!("unknown tenant '{id}': check the webhook URL, or add the tenant"),
        )
    }
}

/// One normalizer output item.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalized {
    Event(Box<DeliveryEvent>),
    Dead(DeadLetter),
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The URL segment: `/api/webhook/email/{name}`.
    fn name(&self) -> &'static str;

    /// Media types (without parameters) this ESP posts; anything else is 415.
    fn content_types(&self) -> &'static [&'static str];

    /// Parses this provider's section of a tenant's configuration, failing with what to fix.
    fn parse_credentials(&self, section: &serde_json::Value) -> Result<Credentials, String>;

    /// Checks the request over its raw bytes and decides which tenants it may write for.
    /// Never writes anything.
    async fn verify(
        &self,
        req: &WebhookRequest<'_>,
        tenants: &TenantSet,
    ) -> Result<Verified, Rejection>;

    /// Pure: a stored envelope → events and dead letters. Must give the same output for the
    /// same envelope, forever (replays depend on it).
    fn normalize(&self, envelope: &RawEnvelope) -> Vec<Normalized>;

    /// Amazon SNS subscription handshakes this adapter handled, for
    /// `GET /api/admin/sns-confirmations`. Only adapters fed through SNS have any.
    fn sns_confirmations(&self) -> Option<ses::SnsConfirmationReport> {
        None
    }
}

/// XSender's attribution metadata, as attached to every send.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct XsMeta {
    pub tenant: Option<String>,
    pub campaign: Option<String>,
    pub dispatch: Option<String>,
}

impl XsMeta {
    /// Reads `xs_tenant`, `xs_campaign`, `xs_dispatch` from a JSON object, accepting strings
    /// or numbers (senders differ); empty strings count as absent.
    pub fn from_object(obj: &serde_json::Map<String, serde_json::Value>) -> XsMeta {
        let get = |k: &str| obj.get(k).and_then(scalar_string).filter(|s| !s.is_empty());
        XsMeta {
            tenant: get("xs_tenant"),
            campaign: get("xs_campaign"),
            dispatch: get("xs_dispatch"),
        }
    }
}

/// A JSON string or number as text, exactly as written (numbers are never rounded).
pub fn scalar_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Where an event lands: which tenant, which dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub tenant: String,
    pub dispatch_key: String,
    pub dispatch_id: Option<String>,
    pub campaign_id: Option<String>,
}

/// Decides the tenant and dispatch of one event. An event naming a tenant whose credentials
/// did not verify the request is refused (it would let one tenant write another's rows); one
/// naming none goes to the envelope's default tenant and, without a dispatch id, to the
/// message-id + recipient fallback key.
pub fn attribute(
    env: &RawEnvelope,
    meta: &XsMeta,
    message_id: Option<&str>,
    recipient: &str,
) -> Result<Attribution, (&'static str, String)> {
    let tenant = match &meta.tenant {
        Some(t) if env.verified_tenants.iter().any(|v| v == t) => t.clone(),
        Some(t) => {
            return Err((
                "tenant_not_verified",
                format!(
                    "event names xs_tenant '{t}', but the request was verified for {:?}",
                    env.verified_tenants
                ),
            ))
        }
        None => match &env.default_tenant {
            Some(t) => t.clone(),
            None => {
                return Err((
                    "unattributable",
                    format!(
                    "event names no xs_tenant and the request verified for several tenants {:?}; \
                         use the per-tenant URL /api/webhook/email/{}/{{tenant}}",
                    env.verified_tenants, env.provider
                ),
                ))
            }
        },
    };
    let dispatch_key = match &meta.dispatch {
        Some(d) => DeliveryEvent::attributed_dispatch_key(d),
        None => DeliveryEvent::fallback_dispatch_key(message_id, recipient),
    };
    Ok(Attribution {
        tenant,
        dispatch_key,
        dispatch_id: meta.dispatch.clone(),
        campaign_id: meta.campaign.clone(),
    })
}

/// A stable identity for a happening, from the fields that define it (never from an id the ESP
/// may change on retry). 128 bits of SHA-256, hex.
pub fn event_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Builds a dead letter for one item of an envelope.
pub fn dead(
    env: &RawEnvelope,
    reason: &str,
    detail: impl Into<String>,
    item: impl Into<String>,
) -> Normalized {
    let mut item: String = item.into();
    if item.len() > 4096 {
        let mut cut = 4096;
        while !item.is_char_boundary(cut) {
            cut -= 1;
        }
        item.truncate(cut);
    }
    Normalized::Dead(DeadLetter {
        envelope_id: env.id.clone(),
        provider: env.provider.clone(),
        reason: reason.to_string(),
        detail: detail.into(),
        item,
        received_at_ms: env.received_at_ms,
    })
}

/// Lower-cases and trims an address; `None` when it cannot be an address.
pub fn normalize_email(s: &str) -> Option<String> {
    let s = s.trim();
    (s.contains('@') && !s.chars().any(char::is_whitespace)).then(|| s.to_ascii_lowercase())
}

/// The distinct tenants named by `xs_tenant` across items (for resolution diagnostics).
pub fn named_tenants<'a>(metas: impl Iterator<Item = &'a XsMeta>) -> BTreeSet<String> {
    metas.filter_map(|m| m.tenant.clone()).collect()
}

/// Checks a signed timestamp (seconds) against the tolerance.
pub fn check_timestamp(ts_secs: i64, now_ms: i64, tolerance: Duration) -> Result<(), Rejection> {
    let skew = (now_ms / 1000 - ts_secs).abs();
    if skew as u64 > tolerance.as_secs() {
        return Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "stale_timestamp",
            format!(
                "signed timestamp {ts_secs} is {skew}s away from the server clock (allowed: {}s); \
                 a replayed request, or a server clock that needs NTP",
                tolerance.as_secs()
            ),
        ));
    }
    Ok(())
}
