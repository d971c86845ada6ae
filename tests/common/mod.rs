//! Test harness: a server on 127.0.0.1:0 over a temporary data folder, tenants with freshly
//! generated SendGrid keys, a signer, and polling helpers. Behavioural tests are written once
//! against [`Harness`] and instantiated per backend by `backend_tests!`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use serde_json::Value;
use xsender_events::app::{self, Running};
use xsender_events::config::{LogKind, ProjectionStoreKind, ServeConfig};
use xsender_events::projection::cql::{self, CqlError, CqlSettings};
use xsender_events::providers::{Provider, ProviderSettings};
use xsender_events::secret::Secret;

pub const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// A tenant's SendGrid signing identity, as SendGrid holds it.
#[derive(Clone)]
pub struct SendGridSigner {
    key: SigningKey,
}

impl SendGridSigner {
    pub fn random() -> Self {
        SendGridSigner {
            key: SigningKey::random(&mut rand::rngs::OsRng),
        }
    }

    /// The verification key as SendGrid displays it: base64 DER.
    pub fn verification_key(&self) -> String {
        B64.encode(
            self.key
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes(),
        )
    }

    pub fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        let mut msg = timestamp.as_bytes().to_vec();
        msg.extend_from_slice(body);
        let sig: Signature = self.key.sign(&msg);
        B64.encode(sig.to_der().as_bytes())
    }
}

/// HMAC-SHA256(key, timestamp || token), hex: Mailgun's webhook signature.
pub fn mailgun_signature(key: &str, timestamp: &str, token: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

pub struct TenantSpec {
    pub id: &'static str,
    pub api_token: String,
    pub signer: Option<SendGridSigner>,
    /// Mailgun HTTP webhook signing key.
    pub mailgun_key: Option<String>,
    /// Mailjet `(api_key, username, password)`.
    pub mailjet: Option<(String, String, String)>,
    /// SNS topics whose SES events belong to this tenant.
    pub ses_topics: Vec<String>,
}

impl TenantSpec {
    /// A tenant with credentials for every provider.
    pub fn new(id: &'static str) -> Self {
        TenantSpec {
            id,
            api_token: format!("token-{id}-0123456789abcdef"),
            signer: Some(SendGridSigner::random()),
            mailgun_key: Some(format!("mg-signing-key-{id}-{}", rand::random::<u64>())),
            ses_topics: Vec::new(),
            mailjet: Some((
                format!("mjkey-{id}"),
                format!("mj-{id}"),
                format!("mj-password-{id}-{}", rand::random::<u32>()),
            )),
        }
    }
    pub fn without_key(id: &'static str) -> Self {
        TenantSpec {
            signer: None,
            mailgun_key: None,
            mailjet: None,
            ..TenantSpec::new(id)
        }
    }
}

pub fn tenants_toml(tenants: &[TenantSpec]) -> String {
    let mut s = String::new();
    for t in tenants {
        s += &format!("[tenants.{}]\napi_token = \"{}\"\n", t.id, t.api_token);
        if let Some(sig) = &t.signer {
            s += &format!(
                "[tenants.{}.sendgrid]\nverification_key = \"{}\"\n",
                t.id,
                sig.verification_key()
            );
        }
        if let Some(k) = &t.mailgun_key {
            s += &format!("[tenants.{}.mailgun]\nsigning_key = \"{k}\"\n", t.id);
        }
        if !t.ses_topics.is_empty() {
            s += &format!("[tenants.{}.ses]\ntopic_arns = {:?}\n", t.id, t.ses_topics);
        }
        if let Some((api_key, user, pass)) = &t.mailjet {
            s += &format!(
                "[tenants.{}.mailjet]\napi_key = \"{api_key}\"\nusername = \"{user}\"\npassword = \"{pass}\"\n",
                t.id
            );
        }
    }
    s
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
    pub base: String,
    pub http: reqwest::Client,
    pub tenants: Vec<TenantSpec>,
    /// What the server was started with (to rebuild or restart with the same store).
    pub config: ServeConfig,
}

pub fn config(dir: &Path, tenants_file: Option<PathBuf>) -> ServeConfig {
    ServeConfig {
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        tenants_file,
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        shutdown_grace_secs: 5,
        // Scenarios poll the read API hard; the rate-limit scenario sets its own limits.
        rate_limit_per_second: 100_000,
        rate_limit_burst: 100_000,
        ..ServeConfig::default()
    }
}

impl Harness {
    /// The embedded default with the adapters `providers` builds (e.g. SES with a fake
    /// certificate fetcher).
    pub async fn embedded_with_providers(
        tenants: Vec<TenantSpec>,
        providers: impl FnOnce(&ProviderSettings) -> Vec<Arc<dyn Provider>>,
    ) -> Harness {
        Backend::Embedded
            .start_with_providers(tenants, providers)
            .await
    }

    /// The embedded default backend.
    pub async fn embedded(tenants: Vec<TenantSpec>) -> Harness {
        Self::embedded_with(tenants, |_| {}).await
    }

    pub async fn embedded_with(
        tenants: Vec<TenantSpec>,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        Self::start_with(tenants, |_| {}, tweak).await
    }

    /// The cluster projection store: a fresh keyspace per test on the CQL node named by
    /// `XSENDER_TEST_CQL` (default 127.0.0.1:9042), migrated like `xsender-events migrate`.
    pub async fn cql_with(
        tenants: Vec<TenantSpec>,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        Self::start_with(tenants, cql_store().await, tweak).await
    }

    /// The cluster backend: the log on Kafka (topics of `topology/local.toml` under a namespace
    /// no other test uses, on the broker named by `XSENDER_TEST_KAFKA`, default 127.0.0.1:9092)
    /// and projections in a fresh CQL keyspace.
    pub async fn kafka_with(
        tenants: Vec<TenantSpec>,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        Self::kafka_on(&kafka_broker(), tenants, tweak).await
    }

    /// [`Harness::kafka_with`] on the broker at `broker`.
    pub async fn kafka_on(
        broker: &str,
        tenants: Vec<TenantSpec>,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        Self::start_with(tenants, kafka_store(broker).await, tweak).await
    }

    async fn start_with(
        tenants: Vec<TenantSpec>,
        store: impl FnOnce(&mut ServeConfig),
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        Self::start_with_providers(tenants, store, tweak, xsender_events::providers::registry).await
    }

    async fn start_with_providers(
        tenants: Vec<TenantSpec>,
        store: impl FnOnce(&mut ServeConfig),
        tweak: impl FnOnce(&mut ServeConfig),
        providers: impl FnOnce(&ProviderSettings) -> Vec<Arc<dyn Provider>>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tenants.toml");
        std::fs::write(&file, tenants_toml(&tenants)).unwrap();
        let mut cfg = config(dir.path(), Some(file));
        store(&mut cfg);
        tweak(&mut cfg);
        let running = app::start_with(cfg.clone(), providers)
            .await
            .expect("server starts");
        let base = format!("http://{}", running.addr);
        Harness {
            dir,
            running: Some(running),
            base,
            http: reqwest::Client::new(),
            tenants,
            config: cfg,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn tenant(&self, id: &str) -> &TenantSpec {
        self.tenants
            .iter()
            .find(|t| t.id == id)
            .expect("tenant in harness")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Posts raw bytes to a webhook route with extra headers.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut rb = self
            .http
            .post(format!("{}{}", self.base, path))
            .header("content-type", content_type);
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        let r = rb.body(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Wraps Mailgun `event-data` in a fresh `signature` block signed with `tenant`'s key.
    pub fn mailgun_body(
        &self,
        tenant: &str,
        event_data: &Value,
        timestamp: i64,
        token: &str,
    ) -> Vec<u8> {
        let key = self
            .tenant(tenant)
            .mailgun_key
            .as_ref()
            .expect("tenant has a Mailgun key");
        let ts = timestamp.to_string();
        let sig = mailgun_signature(key, &ts, token);
        serde_json::to_vec(&serde_json::json!({
            "signature": {"timestamp": ts, "token": token, "signature": sig},
            "event-data": event_data,
        }))
        .unwrap()
    }

    /// The Basic auth header Mailjet sends from `https://user:pass@host/...`.
    pub fn mailjet_auth(&self, tenant: &str) -> (&'static str, String) {
        let (_, user, pass) = self
            .tenant(tenant)
            .mailjet
            .as_ref()
            .expect("tenant has Mailjet credentials");
        (
            "authorization",
            format!("Basic {}", B64.encode(format!("{user}:{pass}"))),
        )
    }

    /// Posts a SendGrid body signed by `tenant`'s key at `timestamp`.
    pub async fn post_sendgrid_signed(
        &self,
        path: &str,
        signer: &SendGridSigner,
        timestamp: i64,
        body: &[u8],
    ) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let r = signed_sendgrid(&self.http, &url, signer, timestamp, body.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_sendgrid(&self, tenant: &str, body: &[u8]) -> (u16, Value) {
        let signer = self
            .tenant(tenant)
            .signer
            .as_ref()
            .expect("tenant has a key");
        self.post_sendgrid_signed("/api/webhook/email/sendgrid", signer, now_secs(), body)
            .await
    }

    pub async fn get(&self, tenant: &str, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{}", self.base, path))
            .bearer_auth(&self.tenant(tenant).api_token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// All recipients of a campaign, following cursors.
    pub async fn recipients(&self, tenant: &str, campaign: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/campaigns/{campaign}/recipients?limit=2");
            if let Some(c) = &cursor {
                path += &format!("&cursor={c}");
            }
            let (status, body) = self.get(tenant, &path).await;
            assert_eq!(status, 200, "{body}");
            out.extend(body["items"].as_array().unwrap().iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// Envelopes in the raw log (to prove a rejection wrote nothing).
    pub fn envelope_count(&self) -> i64 {
        match self.config.log {
            LogKind::Sqlite => {
                let c = rusqlite::Connection::open(self.data_dir().join("log.db")).unwrap();
                c.query_row("SELECT COUNT(*) FROM envelopes", [], |r| r.get(0))
                    .unwrap()
            }
            LogKind::Kafka => {
                let s = self.config.kafka_settings().unwrap();
                topic_records(&s, &s.topology.topics.envelopes.name)
            }
        }
    }

    /// Waits until the normalizer and projector have caught up with the log.
    pub async fn settle(&self) {
        self.settle_within(Duration::from_secs(20)).await
    }

    /// [`Harness::settle`] with its own limit (after a burst, or a broker outage); a lag that
    /// cannot be read yet (broker coming back) counts as not settled.
    pub async fn settle_within(&self, limit: Duration) {
        let running = self.running.as_ref().expect("server running");
        wait_until(limit, || async {
            running.lag().await.map(|l| l.is_zero()).unwrap_or(false)
        })
        .await;
    }
}

/// Sets up projections in a fresh, migrated CQL keyspace.
async fn cql_store() -> impl FnOnce(&mut ServeConfig) {
    let keyspace = fresh_cql_keyspace().await;
    move |c: &mut ServeConfig| {
        c.projection_store = ProjectionStoreKind::Cql;
        c.cql_nodes = vec![cql_node()];
        c.cql_keyspace = keyspace;
    }
}

/// Sets up the cluster backend: the log on `broker` under a fresh namespace, projections in
/// a fresh CQL keyspace.
async fn kafka_store(broker: &str) -> impl FnOnce(&mut ServeConfig) {
    let cql = cql_store().await;
    let namespace = fresh_kafka_namespace(broker).await;
    let broker = broker.to_string();
    move |c: &mut ServeConfig| {
        kafka_config(c, &broker, &namespace);
        cql(c);
    }
}

/// Records in a Kafka topic (sum of its partitions' high watermarks).
pub fn topic_records(s: &xsender_events::log::kafka::KafkaSettings, topic: &str) -> i64 {
    let c = s.reader().unwrap();
    xsender_events::log::kafka::watermarks(&c, topic, Duration::from_secs(10))
        .unwrap()
        .values()
        .map(|(low, high)| high - low)
        .sum()
}

/// The Kafka broker the tests use.
pub fn kafka_broker() -> String {
    std::env::var("XSENDER_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// The single-broker topology file.
pub fn local_topology() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("topology")
        .join("local.toml")
}

/// Points `c` at `broker` with the single-broker topology under `namespace`.
pub fn kafka_config(c: &mut ServeConfig, broker: &str, namespace: &str) {
    c.log = LogKind::Kafka;
    c.kafka_brokers = vec![broker.to_string()];
    c.kafka_topology = Some(local_topology());
    c.kafka_namespace = namespace.to_string();
}

/// Creates the topics of a namespace no other test uses (as `xsender-events topology apply`
/// does). Fails, never skips, when no broker answers.
pub async fn fresh_kafka_namespace(broker: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let namespace = format!(
        "t{}-{}-{}.",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        rand::random::<u32>()
    );
    let mut c = ServeConfig::default();
    kafka_config(&mut c, broker, &namespace);
    let s = c.kafka_settings().unwrap();
    let admin = xsender_events::log::kafka::topology::Admin::connect(
        &s.client_config(),
        Duration::from_secs(20),
    )
    .unwrap();
    let report = admin.apply(&s.topology, |_| {}).await.unwrap_or_else(|e| {
        panic!(
            "Kafka at {} (start it with scripts/kafka.sh start): {e}",
            s.brokers
        )
    });
    assert_eq!(report.created.len(), 3, "{report:?}");
    namespace
}

/// A Kafka node of the test's own (`scripts/kafka.sh` on free ports and a temporary folder),
/// to stop and start again without disturbing other tests.
pub struct PrivateBroker {
    pub dir: tempfile::TempDir,
    pub addr: String,
    port: u16,
    controller_port: u16,
}

/// A port free on 127.0.0.1 right now (for servers that must be told their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateBroker {
    pub async fn start() -> PrivateBroker {
        let (port, controller_port) = (free_port(), free_port());
        let b = PrivateBroker {
            dir: tempfile::tempdir().unwrap(),
            addr: format!("127.0.0.1:{port}"),
            port,
            controller_port,
        };
        b.up().await;
        b
    }

    fn script(&self, action: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh"),
        );
        c.arg(action).arg("--dir").arg(self.dir.path().join("node"));
        c
    }

    /// Starts (or starts again, keeping its data) and waits until it answers.
    pub async fn up(&self) {
        let out = self
            .script("start")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--controller-port")
            .arg(self.controller_port.to_string())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/kafka.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the node (controlled shutdown) and returns once its process is gone.
    pub async fn down(&self) {
        let out = self.script("stop").output().await.unwrap();
        assert!(
            out.status.success(),
            "scripts/kafka.sh stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh"),
        )
        .arg("kill")
        .arg("--dir")
        .arg(self.dir.path().join("node"))
        .output();
    }
}

/// The CQL node the tests use.
pub fn cql_node() -> String {
    std::env::var("XSENDER_TEST_CQL").unwrap_or_else(|_| "127.0.0.1:9042".to_string())
}

/// Creates and migrates a keyspace no other test uses (like scylla-rust-driver's tests do).
/// Fails, never skips, when no CQL node answers.
pub async fn fresh_cql_keyspace() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let keyspace = format!(
        "xs_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        rand::random::<u32>()
    );
    let settings = CqlSettings {
        nodes: vec![cql_node()],
        keyspace: keyspace.clone(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".to_string(),
    };
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT.get_or_init(drop_keyspaces_of_finished_runs).await;
    match cql::migrate(&settings).await {
        Ok(_) => keyspace,
        Err(e @ CqlError::Connect { .. }) => panic!(
            "the CQL tests need a CQL node at {} (XSENDER_TEST_CQL): run `scripts/cassandra.sh start` first ({e})",
            cql_node()
        ),
        Err(e) => panic!("migrating test keyspace {keyspace}: {e}"),
    }
}

/// Test keyspaces are left behind when a test ends (so a failure can be inspected); once many
/// have piled up, the first test of a later run drops those whose process is gone, so a
/// long-lived development node does not fill up with tables.
async fn drop_keyspaces_of_finished_runs() {
    let Ok(session) = scylla::client::session_builder::SessionBuilder::new()
        .known_node(cql_node())
        .build()
        .await
    else {
        return; // reported by the caller's migrate
    };
    let Ok(Some(rows)) = session
        .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
        .await
        .map(|r| r.into_rows_result().ok())
    else {
        return;
    };
    let Ok(names) = rows.rows::<(String,)>() else {
        return;
    };
    let finished: Vec<String> = names
        .flatten()
        .map(|(name,)| name)
        .filter(|name| {
            name.strip_prefix("xs_test_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                })
        })
        .collect();
    // Schema changes take a second each: only sweep once there are many.
    if finished.len() < 40 {
        return;
    }
    for name in finished {
        let _ = session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {name}"), ())
            .await;
    }
}

/// Polls `cond` until it holds; panics with the elapsed time otherwise. A correctness wait,
/// not a timing assertion: the bound only keeps a broken build from hanging.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

/// Splits a SendGrid batch into its raw items (byte-exact) and joins them in another order.
pub fn reorder_batch(body: &[u8], order: impl Fn(&mut Vec<String>)) -> Vec<u8> {
    let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(body).unwrap();
    let mut items: Vec<String> = items.into_iter().map(|r| r.get().to_string()).collect();
    order(&mut items);
    format!("[{}]\r\n", items.join(",\r\n")).into_bytes()
}

pub fn by_dispatch(rows: &[Value]) -> std::collections::BTreeMap<String, Value> {
    rows.iter()
        .map(|r| (r["dispatch_key"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// Instantiates behavioural scenarios once per backend. Each scenario is an
/// `async fn(Backend)`; add a backend here and every scenario runs on it.
#[macro_export]
macro_rules! backend_tests {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::common::Backend::Embedded).await
                }
            )*
        }
        /// Projections in Cassandra/ScyllaDB: needs `scripts/cassandra.sh start`.
        mod cql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::common::Backend::Cql).await
                }
            )*
        }
        /// The cluster backend, Kafka log and CQL projections: needs `scripts/kafka.sh start`
        /// and `scripts/cassandra.sh start`.
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::common::Backend::Kafka).await
                }
            )*
        }
    };
}

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// Everything in SQLite files.
    Embedded,
    /// Projections in a CQL keyspace of their own; the log stays embedded.
    Cql,
    /// The cluster backend: log on Kafka, projections in CQL.
    Kafka,
}

impl Backend {
    pub async fn start(self, tenants: Vec<TenantSpec>) -> Harness {
        self.start_with(tenants, |_| {}).await
    }

    pub async fn start_with(
        self,
        tenants: Vec<TenantSpec>,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        Harness::start_with(tenants, self.store().await, tweak).await
    }

    /// What this backend sets in a server's config: nothing on the embedded default, a fresh
    /// migrated keyspace for CQL, and also a fresh topic namespace for Kafka.
    async fn store(self) -> Box<dyn FnOnce(&mut ServeConfig)> {
        match self {
            Backend::Embedded => Box::new(|_| {}),
            Backend::Cql => Box::new(cql_store().await),
            Backend::Kafka => Box::new(kafka_store(&kafka_broker()).await),
        }
    }

    /// The `serve` flags of a spawned server on 127.0.0.1:0 with the tenants file `tenants`,
    /// on this backend (fresh keyspace and topic namespace, as [`Backend::start`] makes), for
    /// process tests. Call it once per test: a restarted server must get the same flags to
    /// find its data.
    pub async fn serve_args(self, tenants: &Path) -> Vec<String> {
        let mut c = ServeConfig::default();
        self.store().await(&mut c);
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--tenants".to_string(),
            tenants.display().to_string(),
        ];
        if c.log == LogKind::Kafka {
            args.extend([
                "--kafka-brokers".to_string(),
                c.kafka_brokers.join(","),
                "--kafka-topology".to_string(),
                local_topology().display().to_string(),
                "--kafka-namespace".to_string(),
                c.kafka_namespace.clone(),
            ]);
        }
        if c.projection_store == ProjectionStoreKind::Cql {
            args.extend([
                "--projections".to_string(),
                "cql".to_string(),
                "--cql-nodes".to_string(),
                c.cql_nodes.join(","),
                "--cql-keyspace".to_string(),
                c.cql_keyspace.clone(),
            ]);
        }
        args
    }

    /// [`Backend::start`] with the adapters `providers` builds (e.g. SES with a fake
    /// certificate fetcher).
    pub async fn start_with_providers(
        self,
        tenants: Vec<TenantSpec>,
        providers: impl FnOnce(&ProviderSettings) -> Vec<Arc<dyn Provider>>,
    ) -> Harness {
        Harness::start_with_providers(tenants, self.store().await, |_| {}, providers).await
    }
}

/// Sends raw bytes on a fresh connection and returns what comes back (for requests an HTTP
/// client would refuse to send, or that the server answers before reading them whole).
pub async fn raw_http(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts the real binary, `xsender-events serve <args>`, in `cwd`; returns the child and its
/// base URL (read from the "listening on" line).
pub async fn spawn_server(cwd: &Path, args: &[&str]) -> (tokio::process::Child, String) {
    spawn_server_with_env(cwd, args, &[]).await
}

/// [`spawn_server`] with extra environment variables.
pub async fn spawn_server_with_env(
    cwd: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_xsender-events"))
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .env_remove("XSENDER_LISTEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("listening on ") {
                return addr.trim().to_string();
            }
        }
        panic!("server exited before listening");
    })
    .await
    .expect("server starts");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, base)
}

/// POSTs `body` to `{base}/api/webhook/email/sendgrid`, signed now by `signer`, as SendGrid
/// would (for tests that drive a spawned server with their own client).
pub async fn send_sendgrid(
    http: &reqwest::Client,
    base: &str,
    signer: &SendGridSigner,
    body: impl Into<Vec<u8>>,
) -> reqwest::Result<reqwest::Response> {
    signed_sendgrid(
        http,
        &format!("{base}/api/webhook/email/sendgrid"),
        signer,
        now_secs(),
        body.into(),
    )
    .send()
    .await
}

/// A POST of `body` to `url` with SendGrid's signature headers for `timestamp`.
pub fn signed_sendgrid(
    http: &reqwest::Client,
    url: &str,
    signer: &SendGridSigner,
    timestamp: i64,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let ts = timestamp.to_string();
    http.post(url)
        .header("content-type", "application/json")
        .header("x-twilio-email-event-webhook-timestamp", &ts)
        .header(
            "x-twilio-email-event-webhook-signature",
            signer.sign(&ts, &body),
        )
        .body(body)
}
