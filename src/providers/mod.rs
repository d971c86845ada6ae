//! ESP adapters. Each provider is one file: it verifies a request over its raw bytes and
//! resolves the tenant (ingress side), and turns a stored raw envelope into normalized events
//! (normalizer side, pure). Adding an ESP = one file + one line in [`registry`] + a folder of
//! fixtures under `tests/fixtures/<name>/`. [`replay_cql`] is not an ESP: it is the cluster
//! deployment's [`ReplayGuard`].

pub mod mailgun;
pub mod mailjet;
pub mod replay_cql;
pub mod sendgrid;
pub mod ses;

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex};
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
        Arc::new(mailgun::Mailgun::new(settings)),
        Arc::new(mailjet::Mailjet::new(settings)),
        Arc::new(ses::Ses::new(settings)),
    ]
}

/// Providers of the published contract whose adapters have not landed yet: their routes exist
/// and answer 404 with this reason rather than a bare "not found".
pub const PLANNED: &[&str] = &[
    "postmark",
    "sparkpost",
    "resend",
    "brevo",
    "mandrill",
    "postal",
];

/// Settings shared by the adapters.
#[derive(Clone)]
pub struct ProviderSettings {
    /// How far a signed timestamp may be from our clock, either way, before the request is
    /// rejected as a replay.
    pub timestamp_tolerance: Duration,
    /// Remembers single-use tokens (Mailgun's `signature.token`) for as long as their
    /// timestamp is acceptable. The embedded default is [`MemoryReplayGuard`]; with
    /// `projection_store = "cql"`, `app::provider_settings` passes a
    /// [`replay_cql::CqlReplayGuard`] on the shared keyspace so the check holds across replicas.
    pub replay_guard: Arc<dyn ReplayGuard>,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        ProviderSettings {
            timestamp_tolerance: Duration::from_secs(600),
            replay_guard: Arc::new(MemoryReplayGuard::new(MemoryReplayGuard::DEFAULT_CAPACITY)),
        }
    }
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("timestamp_tolerance", &self.timestamp_tolerance)
            .finish_non_exhaustive()
    }
}

/// Why the replay guard could not answer. Ingress turns it into a 503 so the ESP retries:
/// refusing is safe, guessing "first use" is not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayGuardError {
    #[error(
        "replay cache is full ({0} tokens held): raise replay_cache_entries (about sustained \
         Mailgun requests/s × timestamp_tolerance_secs) or lower timestamp_tolerance_secs"
    )]
    Full(usize),
    #[error("replay store unavailable: {0}")]
    Unavailable(String),
}

/// Records single-use tokens so a captured, validly signed request cannot be replayed within
/// the timestamp window. Call it only after the signature verified: otherwise anyone could
/// burn a genuine token before the ESP's request arrives.
///
/// The embedded single-process default is [`MemoryReplayGuard`]. With `projection_store =
/// "cql"` it is [`replay_cql::CqlReplayGuard`]: a conditional insert on the shared keyspace
/// (`INSERT … IF NOT EXISTS USING TTL`, a lightweight transaction at SERIAL consistency, so a
/// row is written only if `(scope, token)` is absent or expired, and the answer says whether it
/// was), so two ingress replicas can never both accept the same token.
#[async_trait]
pub trait ReplayGuard: Send + Sync + 'static {
    /// `Ok(true)` when `token` was not seen in `scope` before (it is now recorded until
    /// `expires_at_ms`), `Ok(false)` when it was and has not expired at `now_ms`.
    async fn first_use(
        &self,
        scope: &str,
        token: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, ReplayGuardError>;

    /// Forgets a token recorded by `first_use` whose request was then not accepted.
    async fn release(&self, scope: &str, token: &str);
}

/// A bounded in-memory [`ReplayGuard`] for the embedded (single-process) deployment. Entries
/// are 64-bit hashes of `(scope, token)`, reusable once expired. When full of live entries it
/// refuses ([`ReplayGuardError::Full`], a 503 the ESP retries) rather than evicting a live
/// token, which would silently reopen a replay. A restart forgets everything; the timestamp
/// tolerance still bounds replays to that window.
///
/// Memory is flat: one hash table of `(id, expiry)` reserved for the whole capacity at the first
/// token (16 bytes and a control byte per slot, 2²⁰ slots: 17 MiB for the default 700,000), never
/// grown, and nothing else per token. Expired entries are not purged one
/// by one: a token found expired is reused in place, and when the table holds `capacity`
/// entries one sweep drops every expired entry before anything is refused (at most one sweep a
/// second, so a guard full of live tokens does not sweep for every refused request). (The first
/// version also kept every token in an expiry-ordered `BTreeSet`: ~80 bytes per token, growing
/// for the whole 10-minute tolerance; at the load harness's ~1,000 Mailgun requests/s that was
/// the server's RSS rising ~6 MiB a minute.)
pub struct MemoryReplayGuard {
    capacity: usize,
    state: Mutex<ReplayState>,
}

#[derive(Default)]
struct ReplayState {
    /// Token id → when it expires (ms), expired entries included until a sweep. Empty with no
    /// memory until the first token.
    expires: HashMap<u64, i64, BuildHasherDefault<IdHasher>>,
    /// When the last sweep ran (ms), to sweep at most once per [`SWEEP_INTERVAL_MS`].
    swept_at_ms: Option<i64>,
}

impl ReplayState {
    /// Empties the table (keeping its allocation, all slots free again) and puts back the
    /// tokens live at `now_ms`. Their copy is the only memory it takes, for a moment: 16 bytes
    /// a live token. Rare: only when tombstones have filled the table's spare room (about every
    /// 3 × capacity tokens at the default load, the `a_guard_kept_full…` test).
    fn compact(&mut self, now_ms: i64) {
        let live: Vec<(u64, i64)> = self
            .expires
            .drain()
            .filter(|&(_, exp)| exp > now_ms)
            .collect();
        self.expires.extend(live);
    }
}

/// A full guard sweeps its expired entries at most this often.
const SWEEP_INTERVAL_MS: i64 = 1_000;

/// The ids are already uniform (a SHA-256 prefix), so the table uses them as their own hash.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed (`write_u64`); fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl MemoryReplayGuard {
    /// Enough for ~1,150 Mailgun requests/s sustained over the default 10-minute tolerance
    /// (`replay_cache_entries` in the config sizes it: requests/s × tolerance in seconds). Two
    /// thirds of the 2²⁰ slots that 500,000 already took (the load harness's 5-minute soak,
    /// ~1,040 Mailgun requests/s, filled 500,000 and got 503s); fuller, the table would need
    /// its tombstones cleared far more often.
    pub const DEFAULT_CAPACITY: usize = 700_000;

    pub fn new(capacity: usize) -> Self {
        MemoryReplayGuard {
            capacity: capacity.max(1),
            state: Mutex::new(ReplayState::default()),
        }
    }

    /// Entries held: live tokens, and expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.expires.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens still live at `now_ms` (expired entries awaiting a sweep are not counted).
    pub fn live(&self, now_ms: i64) -> usize {
        self.state
            .lock()
            .map(|s| s.expires.values().filter(|&&exp| exp > now_ms).count())
            .unwrap_or(0)
    }

    /// Entries the hash table holds without growing (0 before the first token).
    pub fn reserved(&self) -> usize {
        self.state.lock().map(|s| s.expires.capacity()).unwrap_or(0)
    }
}

/// The guard's key for `(scope, token)`: the first 8 bytes of [`replay_id`]. Two live tokens
/// colliding (one refused as a replay) has odds of about n²/2⁶⁵ per window: ~1.3·10⁻⁸ with
/// 700,000 live tokens.
fn memory_id(scope: &str, token: &str) -> u64 {
    let id = replay_id(scope, token);
    u64::from_le_bytes(id[..8].try_into().expect("8 of 16 bytes"))
}

/// Length-prefixed so ("ab", "c") and ("a", "bc") never collide.
pub(crate) fn replay_id(scope: &str, token: &str) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update((scope.len() as u64).to_le_bytes())
        .chain_update(scope.as_bytes())
        .chain_update(token.as_bytes())
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

#[async_trait]
impl ReplayGuard for MemoryReplayGuard {
    async fn first_use(
        &self,
        scope: &str,
        token: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, ReplayGuardError> {
        let id = memory_id(scope, token);
        let mut st = self
            .state
            .lock()
            .map_err(|_| ReplayGuardError::Unavailable("replay cache lock poisoned".into()))?;
        if let Some(exp) = st.expires.get_mut(&id) {
            if *exp > now_ms {
                return Ok(false);
            }
            // Seen before, but expired: this is a first use again, in the same slot.
            *exp = expires_at_ms;
            return Ok(true);
        }
        if st.expires.len() >= self.capacity {
            let due = st
                .swept_at_ms
                .is_none_or(|at| now_ms.saturating_sub(at) >= SWEEP_INTERVAL_MS);
            if due {
                st.swept_at_ms = Some(now_ms);
                st.expires.retain(|_, exp| *exp > now_ms);
            }
            if st.expires.len() >= self.capacity {
                return Err(ReplayGuardError::Full(st.expires.len()));
            }
        }
        if st.expires.capacity() == 0 {
            st.expires.reserve(self.capacity);
        } else if st.expires.len() >= st.expires.capacity() {
            // Erased entries (sweeps, released tokens) can leave tombstones, which use up the
            // table's room without holding anything; with no room left the next insert would
            // double the table. Rebuild it in the same allocation instead, live tokens only.
            st.compact(now_ms);
        }
        st.expires.insert(id, expires_at_ms);
        Ok(true)
    }

    async fn release(&self, scope: &str, token: &str) {
        let id = memory_id(scope, token);
        if let Ok(mut st) = self.state.lock() {
            st.expires.remove(&id);
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub tenants: Vec<String>,
    pub default_tenant: Option<String>,
    /// Items in the body, for the response and metrics.
    pub items: usize,
    /// A single-use token this request spent; ingress gives it back if the request is not
    /// accepted after all (log unavailable), so the ESP's retry of the same request is not
    /// mistaken for a replay.
    pub replay_claim: Option<ReplayClaim>,
}

/// A `(scope, token)` recorded by a [`ReplayGuard`] during verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayClaim {
    pub scope: &'static str,
    pub token: String,
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
/// may change on retry), the event's time among them: `DeliveryEvent::event_key` must bind
/// `occurred_at_ms`. 128 bits of SHA-256, hex.
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

/// The first 4 KiB of a body as text, for dead letters of bodies that did not parse.
pub fn body_prefix(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned()
}

/// The dead letter for a stored body the adapter cannot read at all.
pub fn malformed_body(env: &RawEnvelope, detail: impl Into<String>) -> Normalized {
    dead(env, "malformed_body", detail, body_prefix(&env.body))
}

/// Parses a stored body as JSON, or returns its `malformed_body` dead letter.
pub fn parse_body(env: &RawEnvelope) -> Result<serde_json::Value, Box<Normalized>> {
    serde_json::from_slice(&env.body)
        .map_err(|e| Box::new(malformed_body(env, format!("body is not valid JSON: {e}"))))
}

/// A non-empty string field, trimmed.
pub fn str_field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    k: &str,
) -> Option<&'a str> {
    obj.get(k)
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The recipient in field `key` of an event object, lower-cased, or the dead letter saying why
/// there is none. `item` renders the offending item for the dead letter.
pub fn recipient_field(
    env: &RawEnvelope,
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    event: &str,
    item: impl Fn() -> String,
) -> Result<String, Box<Normalized>> {
    // Boxed: the dead letter is the cold path and much larger than the address.
    let dead_letter = |reason: &str, detail: String| Box::new(dead(env, reason, detail, item()));
    let Some(raw) = str_field(obj, key) else {
        return Err(dead_letter(
            "missing_field",
            format!("'{event}' event has no '{key}'"),
        ));
    };
    normalize_email(raw).ok_or_else(|| {
        dead_letter(
            "invalid_field",
            format!("'{key}' is not an address: {raw:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_replay_guard_remembers_until_expiry_and_is_bounded() {
        let g = MemoryReplayGuard::new(2);
        assert_eq!(g.first_use("mailgun", "a", 0, 1_000).await, Ok(true));
        assert_eq!(g.first_use("mailgun", "a", 999, 1_000).await, Ok(false));
        // Scopes are separate namespaces.
        assert_eq!(g.first_use("other", "a", 999, 1_000).await, Ok(true));
        // Full of live tokens: refuse rather than evict a live one.
        assert_eq!(
            g.first_use("mailgun", "b", 999, 5_000).await,
            Err(ReplayGuardError::Full(2))
        );
        // Once expired, the token is usable again and the other no longer counts.
        assert_eq!(g.first_use("mailgun", "a", 1_000, 9_000).await, Ok(true));
        assert_eq!(g.live(1_000), 1);
        assert_eq!(g.first_use("mailgun", "a", 8_999, 9_000).await, Ok(false));
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;

    #[tokio::test]
    async fn a_released_token_can_be_used_again_and_others_cannot() {
        let g = MemoryReplayGuard::new(10);
        assert!(g.first_use("mailgun", "t1", 0, 1000).await.unwrap());
        assert!(
            !g.first_use("mailgun", "t1", 0, 1000).await.unwrap(),
            "a replay"
        );
        assert!(
            g.first_use("other", "t1", 0, 1000).await.unwrap(),
            "scopes are apart"
        );
        g.release("mailgun", "t1").await;
        assert!(
            g.first_use("mailgun", "t1", 0, 1000).await.unwrap(),
            "given back after a 503"
        );
        assert!(g.first_use("mailgun", "t2", 2000, 3000).await.unwrap());
        assert_eq!(g.live(2000), 1, "expired entries do not count");
    }

    #[tokio::test]
    async fn the_table_is_reserved_once_at_the_first_token_and_never_grows() {
        let g = MemoryReplayGuard::new(5_000);
        assert_eq!(g.reserved(), 0, "no memory before the first token");
        assert!(g.first_use("mailgun", "t0", 0, 1_000).await.unwrap());
        let reserved = g.reserved();
        assert!(reserved >= 5_000, "reserved {reserved} slots");
        for i in 1..5_000 {
            assert!(g
                .first_use("mailgun", &format!("t{i}"), 0, 1_000)
                .await
                .unwrap());
        }
        assert_eq!(g.live(0), 5_000);
        assert_eq!(g.reserved(), reserved, "full, and never rehashed");
        assert!(matches!(
            g.first_use("mailgun", "one more", 0, 1_000).await,
            Err(ReplayGuardError::Full(5_000))
        ));
        // Expired, every token is taken again in its own slot; the table is not grown (its
        // reported capacity may dip while erased slots are marked deleted, never rise).
        assert!(g.first_use("mailgun", "t0", 1_000, 2_000).await.unwrap());
        assert_eq!(g.live(1_000), 1);
        for i in 1..5_000 {
            assert!(g
                .first_use("mailgun", &format!("t{i}"), 1_000, 2_000)
                .await
                .unwrap());
        }
        assert!(g.reserved() <= reserved, "{} > {reserved}", g.reserved());
    }

    /// The default capacity fills about two thirds of the table's slots (700,000 of 2²⁰): at
    /// that load a stream of tokens that keeps the guard full, swept once a second, never makes
    /// the table grow (a fuller table collects enough tombstones to force a rehash that
    /// doubles it). The same load on a smaller table, 8,192 slots.
    #[tokio::test]
    async fn a_guard_kept_full_at_the_default_load_never_grows() {
        let slots = 8_192;
        // The table's slots for a capacity: a power of two, at most 7/8 full.
        let buckets_of_default = (MemoryReplayGuard::DEFAULT_CAPACITY * 8 / 7).next_power_of_two();
        let capacity = slots * MemoryReplayGuard::DEFAULT_CAPACITY / buckets_of_default;
        let g = MemoryReplayGuard::new(capacity);
        assert!(g.first_use("mailgun", "first", 0, 1).await.unwrap());
        let reserved = g.reserved();
        // One token a ms, each live for 70 % of the capacity in ms: the table holds that many
        // live tokens and expired ones up to the capacity, and a sweep a second makes room for
        // the next second's 1,000.
        let (lifetime, mut now) = (capacity as i64 * 7 / 10, 0);
        for i in 0..200_000 {
            now += 1;
            let token = format!("t{i}");
            assert_eq!(
                g.first_use("mailgun", &token, now, now + lifetime).await,
                Ok(true),
                "token {i} at {now} ms, {} entries",
                g.len()
            );
            assert!(
                g.reserved() <= reserved,
                "grew at token {i}: {} > {reserved}",
                g.reserved()
            );
        }
        // The rebuilds kept every live token: the last `lifetime` ones are still replays.
        for i in 200_000 - lifetime + 1..200_000 {
            let token = format!("t{i}");
            assert_eq!(
                g.first_use("mailgun", &token, now, now + 1).await,
                Ok(false),
                "t{i}"
            );
        }
    }

    #[tokio::test]
    async fn a_full_guard_sweeps_its_expired_tokens_at_most_once_a_second() {
        let g = MemoryReplayGuard::new(3);
        for t in ["a", "b"] {
            assert!(g.first_use("mailgun", t, 0, 100).await.unwrap());
        }
        assert!(g.first_use("mailgun", "c", 0, 5_000).await.unwrap());
        // Full of live tokens: the sweep at 50 frees nothing.
        assert_eq!(
            g.first_use("mailgun", "d", 50, 5_000).await,
            Err(ReplayGuardError::Full(3))
        );
        // a and b have expired, but the last sweep was under a second ago: still refused.
        assert_eq!(
            g.first_use("mailgun", "d", 500, 5_000).await,
            Err(ReplayGuardError::Full(3))
        );
        // A second later the sweep drops both; c, still live, stays a replay.
        assert!(g.first_use("mailgun", "d", 1_050, 5_000).await.unwrap());
        assert!(g.first_use("mailgun", "e", 1_050, 5_000).await.unwrap());
        assert!(!g.first_use("mailgun", "c", 1_050, 5_000).await.unwrap());
        assert_eq!(g.live(1_050), 3);
    }
}
