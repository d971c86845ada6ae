//! Settings of `serve`. Every field has a default, so `xsender-events serve` runs with no
//! configuration; a TOML file (`--config`) and flags/env override them, in that order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::projection::cql::CqlSettings;
use crate::providers::MemoryReplayGuard;
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Folder of the embedded backend: `log.db` (envelopes, events, dead letters),
    /// `projections.db` and `tenants.db`. Created if missing.
    pub data_dir: PathBuf,
    /// Address the HTTP server binds (webhooks, read API, admin API, probes).
    pub listen: SocketAddr,
    /// Tenants file (TOML, see README). When unset, `./tenants.toml` is read if it exists.
    pub tenants_file: Option<PathBuf>,
    /// Bearer token of the admin API; the admin API is off without one. At least 16 chars.
    pub admin_token: Option<Secret>,
    /// Largest webhook body accepted; larger ones get 413. SendGrid batches stay well under
    /// this (up to ~1000 events); 16 MiB leaves room for big SES/SNS batches too.
    pub max_body_bytes: usize,
    /// How far a signed timestamp may be from our clock (SendGrid, Mailgun), in seconds.
    pub timestamp_tolerance_secs: u64,
    /// Mailgun tokens the embedded replay guard remembers at once (each for as long as its
    /// timestamp is acceptable): at least sustained Mailgun requests/s ×
    /// `timestamp_tolerance_secs`, or Mailgun gets 503s saying the cache is full. Reserved at
    /// the first Mailgun request, 20 to 39 bytes each (its slots are a power of two: 17 MiB for
    /// the default 700,000 as for 500,000 to 917,000). With
    /// `projection_store = "cql"` tokens live in the keyspace instead and this is unused.
    pub replay_cache_entries: usize,
    /// How long a webhook waits for its envelope to be durable before it gets 503.
    pub append_timeout_ms: u64,
    /// Read/admin API rate limit per client IP: sustained requests per second…
    pub rate_limit_per_second: u32,
    /// …and burst size.
    pub rate_limit_burst: u32,
    /// Behind a load balancer every client has its address: set this to rate limit by the
    /// left-most `X-Forwarded-For` address instead. Only when the proxy sets that header, or
    /// clients could pick their own bucket.
    pub trust_forwarded_for: bool,
    /// Envelopes the normalizer takes per step.
    pub normalizer_batch: usize,
    /// Events the projector folds per transaction.
    pub projector_batch: usize,
    /// On SIGTERM, how long in-flight requests get to finish.
    pub shutdown_grace_secs: u64,
    /// On SIGTERM, how long `/readyz` answers 503 while still serving, before the listener
    /// closes: time for load balancers (Kubernetes endpoints) to stop routing here.
    pub readiness_drain_secs: u64,
    /// Where projections (dispatch rows, suppressions, contacts) live: `"sqlite"` (embedded,
    /// `projections.db` in the data folder) or `"cql"` (ScyllaDB/Cassandra, see `cql_*`; run
    /// `xsender-events migrate` first; tenants then persist in the same keyspace, shared by
    /// every `serve`). Independent of where the log is (`log`).
    pub projection_store: ProjectionStoreKind,
    /// CQL contact points (`host:port`), with `projection_store = "cql"`.
    pub cql_nodes: Vec<String>,
    /// CQL keyspace of the projections.
    pub cql_keyspace: String,
    /// Replication map `migrate` creates the keyspace with, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}` in production.
    pub cql_replication: String,
    /// Where the logs (envelopes, events, dead letters) live: `"sqlite"` (embedded, `log.db` in
    /// the data folder) or `"kafka"` (topics of `kafka_topology` on `kafka_brokers`; run
    /// `xsender-events topology apply` first).
    pub log: LogKind,
    /// Which stages this process runs: `all` (default), or one of `ingress`, `normalizer`,
    /// `projector` to scale them apart (Kafka log and CQL projections only: the stages then
    /// share nothing but the cluster).
    pub role: Role,
    /// Kafka bootstrap brokers (`host:port`), with `log = "kafka"`.
    pub kafka_brokers: Vec<String>,
    /// Topology file (see `topology/`); the built-in `topology/topics.toml` when unset. Use
    /// `topology/local.toml` on a single broker.
    pub kafka_topology: Option<PathBuf>,
    /// Prefix of every topic and consumer group name (several environments on one cluster).
    pub kafka_namespace: String,
    /// Extra librdkafka client properties (`security.protocol`, `sasl.*`, `client.rack`, …).
    pub kafka_properties: std::collections::BTreeMap<String, String>,
    /// Confluent-compatible schema registry: when set, the schemas are registered there and
    /// records use the Confluent wire format (magic byte + schema id) besides the fingerprint
    /// header.
    pub schema_registry_url: Option<String>,
}

/// Which log backend `serve` and `rebuild` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// SQLite `log.db` in the data folder (the default).
    #[default]
    Sqlite,
    /// Apache Kafka topics.
    Kafka,
}

/// The stages one `serve` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Ingress, normalizer and projector.
    #[default]
    All,
    /// Webhooks, read API and admin API: verifies and appends envelopes.
    Ingress,
    /// Envelopes → events and dead letters.
    Normalizer,
    /// Events → projections.
    Projector,
}

impl Role {
    pub fn runs_ingress(self) -> bool {
        matches!(self, Role::All | Role::Ingress)
    }
    pub fn runs_normalizer(self) -> bool {
        matches!(self, Role::All | Role::Normalizer)
    }
    pub fn runs_projector(self) -> bool {
        matches!(self, Role::All | Role::Projector)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Ingress => "ingress",
            Role::Normalizer => "normalizer",
            Role::Projector => "projector",
        }
    }
}

/// Which projection store `serve` and `rebuild` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProjectionStoreKind {
    /// Embedded SQLite file in the data folder (the default).
    #[default]
    Sqlite,
    /// ScyllaDB (or Apache Cassandra) through the `scylla` driver.
    Cql,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("data"),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tenants_file: None,
            admin_token: None,
            max_body_bytes: 16 * 1024 * 1024,
            timestamp_tolerance_secs: 600,
            replay_cache_entries: MemoryReplayGuard::DEFAULT_CAPACITY,
            append_timeout_ms: 10_000,
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            trust_forwarded_for: false,
            normalizer_batch: 256,
            projector_batch: 2000,
            shutdown_grace_secs: 20,
            readiness_drain_secs: 0,
            projection_store: ProjectionStoreKind::Sqlite,
            cql_nodes: vec!["127.0.0.1:9042".to_string()],
            cql_keyspace: "xsender".to_string(),
            cql_replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".to_string(),
            log: LogKind::Sqlite,
            role: Role::All,
            kafka_brokers: vec!["127.0.0.1:9092".to_string()],
            kafka_topology: None,
            kafka_namespace: String::new(),
            kafka_properties: Default::default(),
            schema_registry_url: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Checks values a typo could make absurd, with what to set instead.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes must be at least 1024");
        }
        if self.rate_limit_per_second == 0 || self.rate_limit_burst == 0 {
            return bad("rate_limit_per_second and rate_limit_burst must be at least 1");
        }
        if self.normalizer_batch == 0 || self.projector_batch == 0 {
            return bad("normalizer_batch and projector_batch must be at least 1");
        }
        if self.append_timeout_ms == 0 {
            return bad("append_timeout_ms must be at least 1");
        }
        // 1 to 100 million: the table is reserved whole (up to 39 bytes an entry), so a stray digit
        // would take gigabytes at the first Mailgun request.
        if !(1..=100_000_000).contains(&self.replay_cache_entries) {
            return bad(
                "replay_cache_entries must be 1 to 100000000 (about sustained Mailgun requests/s \
                 × timestamp_tolerance_secs; up to 39 bytes each)",
            );
        }
        if let Some(t) = &self.admin_token {
            if t.expose().len() < 16 {
                return bad("admin_token must be at least 16 characters");
            }
        }
        if self.role != Role::All
            && (self.log != LogKind::Kafka || self.projection_store != ProjectionStoreKind::Cql)
        {
            return bad(&format!(
                "role = \"{}\" needs log = \"kafka\" and projection_store = \"cql\" (separate processes share only the cluster); on the embedded default run role = \"all\"",
                self.role.as_str()
            ));
        }
        if self.log == LogKind::Kafka {
            if self.kafka_brokers.is_empty()
                || self.kafka_brokers.iter().any(|b| b.trim().is_empty())
            {
                return bad("kafka_brokers must list at least one host:port");
            }
            // Topic names and group ids are built from it: Kafka takes [A-Za-z0-9._-] only.
            if !self
                .kafka_namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                || self.kafka_namespace.len() > 100
            {
                return bad(&format!(
                    "kafka_namespace {:?}: use at most 100 letters, digits, '.', '_' and '-' (it prefixes topic and group names, e.g. \"staging.\")",
                    self.kafka_namespace
                ));
            }
            if let Some(url) = &self.schema_registry_url {
                if url::Url::parse(url)
                    .map(|u| !u.scheme().starts_with("http"))
                    .unwrap_or(true)
                {
                    return bad("schema_registry_url must be an http(s) URL");
                }
            }
        }
        if self.projection_store == ProjectionStoreKind::Cql {
            self.cql_settings()
                .validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    pub fn cql_settings(&self) -> CqlSettings {
        CqlSettings {
            nodes: self.cql_nodes.clone(),
            keyspace: self.cql_keyspace.clone(),
            replication: self.cql_replication.clone(),
        }
    }

    /// The Kafka topology (namespaced) and client settings, with `log = "kafka"`.
    pub fn kafka_settings(
        &self,
    ) -> Result<crate::log::kafka::KafkaSettings, crate::log::kafka::topology::TopologyError> {
        use crate::log::kafka::Topology;
        let topology = match &self.kafka_topology {
            Some(p) => Topology::load(p)?,
            None => Topology::built_in(),
        };
        Ok(crate::log::kafka::KafkaSettings {
            brokers: self.kafka_brokers.join(","),
            topology: topology.namespaced(&self.kafka_namespace),
            properties: self.kafka_properties.clone(),
            produce_timeout: std::time::Duration::from_millis(self.append_timeout_ms),
            schema_registry_url: self.schema_registry_url.clone(),
        })
    }

    /// The tenants file to read: the configured one, else `./tenants.toml` if present.
    pub fn tenants_path(&self) -> Option<PathBuf> {
        self.tenants_file.clone().or_else(|| {
            let p = PathBuf::from("tenants.toml");
            p.exists().then_some(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_store_is_chosen_in_toml() {
        let c: ServeConfig = toml::from_str(
            "projection_store = \"cql\"\ncql_nodes = [\"10.0.0.1:9042\", \"10.0.0.2:9042\"]\ncql_keyspace = \"xs\"\ncql_replication = \"{'class': 'NetworkTopologyStrategy', 'dc1': 3}\"",
        )
        .unwrap();
        assert_eq!(c.projection_store, ProjectionStoreKind::Cql);
        assert_eq!(c.cql_nodes.len(), 2);
        c.validate().unwrap();
        let d: ServeConfig = toml::from_str("").unwrap();
        assert_eq!(d.projection_store, ProjectionStoreKind::Sqlite);
        let e = toml::from_str::<ServeConfig>("projection_store = \"mongo\"").unwrap_err();
        assert!(e.to_string().contains("sqlite"), "{e}");
        assert!(toml::from_str::<ServeConfig>("cql_node = []").is_err());
    }

    #[test]
    fn replay_cache_entries_is_set_in_toml_and_bounded() {
        let c: ServeConfig = toml::from_str("replay_cache_entries = 2000000").unwrap();
        assert_eq!(c.replay_cache_entries, 2_000_000);
        c.validate().unwrap();
        for bad in [0, 1_000_000_000] {
            let c = ServeConfig {
                replay_cache_entries: bad,
                ..ServeConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("replay_cache_entries must be 1 to"), "{e}");
        }
    }

    #[test]
    fn roles_need_the_cluster_backends() {
        let mut c = ServeConfig {
            role: Role::Projector,
            ..ServeConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("log = \"kafka\"") && e.contains("projector"),
            "{e}"
        );
        c.log = LogKind::Kafka;
        c.projection_store = ProjectionStoreKind::Cql;
        c.validate().unwrap();
        c.kafka_brokers.clear();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("kafka_brokers"));
        let t: ServeConfig = toml::from_str(
            "log = \"kafka\"\nkafka_brokers = [\"k1:9092\"]\nkafka_namespace = \"stg.\"\n[kafka_properties]\n\"security.protocol\" = \"SSL\"",
        )
        .unwrap();
        let k = t.kafka_settings().unwrap();
        assert_eq!(k.brokers, "k1:9092");
        assert_eq!(
            k.topology.topics.events.name,
            "stg.xsender.delivery-events.v1"
        );
        assert_eq!(k.client_config().get("security.protocol"), Some("SSL"));
        c.kafka_brokers = vec!["k1:9092".into()];
        c.kafka_namespace = "stg/".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("kafka_namespace \"stg/\""), "{e}");
        c.kafka_namespace = "stg-2.x_y.".into();
        c.validate().unwrap();
    }
}
