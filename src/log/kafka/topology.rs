//! The Kafka topology as code (`topology/*.toml`): which topics exist, how they are configured
//! and who reads them. `xsender-events topology apply` makes a cluster match it; `serve` checks
//! it before starting and refuses a cluster that differs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use serde::Deserialize;

/// `topology/topics.toml`, built in: what `serve` expects when no file is configured.
pub const BUILT_IN: &str = include_str!("../../../topology/topics.toml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Replicas of every topic.
    pub replication_factor: i32,
    /// Replicas that must have a record before it is acknowledged (acks=all).
    pub min_insync_replicas: i32,
    /// The three topics of the pipeline.
    pub topics: Topics,
    /// The consumer groups the stages join.
    pub groups: Groups,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Verified raw webhook requests, written by ingress, read by the normalizer.
    pub envelopes: TopicSpec,
    /// Normalized delivery events, written by the normalizer, read by the projector and
    /// analytics; the source of truth that projections are rebuilt from.
    pub events: TopicSpec,
    /// Items the normalizer could not turn into events, with their reasons.
    pub dead_letters: TopicSpec,
}

/// Consumer groups of the stages (analytics use their own).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    /// Group id of the normalizer replicas (reads the envelopes topic).
    pub normalizer: String,
    /// Group id of the projector replicas (reads the events topic).
    pub projector: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Topic name (prefixed by `kafka_namespace`).
    pub name: String,
    /// Partition count: the most consumers of one group that share the topic's work.
    pub partitions: i32,
    /// What the record key is (documentation for readers of the file).
    pub key: String,
    /// What the record value is (documentation).
    pub value: String,
    /// The stage that produces to it (documentation).
    pub written_by: String,
    /// Who consumes it (documentation; the stages' group ids are in `[groups]`).
    pub read_by: Vec<String>,
    /// `cleanup.policy`.
    pub cleanup_policy: String,
    /// `retention.ms` (-1 = forever).
    pub retention_ms: i64,
    /// `max.message.bytes`.
    pub max_message_bytes: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology file {path}: {message}")]
    File { path: String, message: String },
    #[error("topology: {0}")]
    Invalid(String),
    #[error("Kafka at {brokers}: {message}")]
    Kafka { brokers: String, message: String },
}

/// One way the cluster differs from the topology.
#[derive(Debug, Clone, PartialEq)]
pub enum Drift {
    Missing {
        topic: String,
    },
    Partitions {
        topic: String,
        actual: i32,
        expected: i32,
    },
    Replication {
        topic: String,
        actual: i32,
        expected: i32,
    },
    Config {
        topic: String,
        key: String,
        actual: Option<String>,
        expected: String,
    },
}

impl Drift {
    /// Whether `topology apply` repairs it (partition counts and replication are left to an
    /// operator: changing them moves keys or data).
    pub fn repairable(&self) -> bool {
        matches!(self, Drift::Missing { .. } | Drift::Config { .. })
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing { topic } => write!(f, "topic {topic} is missing"),
            Drift::Partitions { topic, actual, expected } => write!(
                f,
                "topic {topic} has {actual} partitions, the topology says {expected} (not changed automatically: more partitions would move dispatch keys; recreate the topic or edit the topology)"
            ),
            Drift::Replication { topic, actual, expected } => write!(
                f,
                "topic {topic} has replication factor {actual}, the topology says {expected} (reassign replicas with kafka-reassign-partitions, or use the topology file for this cluster size)"
            ),
            Drift::Config { topic, key, actual, expected } => write!(
                f,
                "topic {topic}: {key} is {}, the topology says {expected}",
                actual.as_deref().unwrap_or("unset")
            ),
        }
    }
}

/// What an envelope record adds to its body: id, tenants, content type, trace parent, Avro
/// framing, key and headers (a few hundred bytes; generous so that long tenant lists fit).
const ENVELOPE_OVERHEAD: usize = 64 * 1024;

impl Topology {
    pub fn built_in() -> Topology {
        Topology::parse(BUILT_IN, "topology/topics.toml (built in)").expect("built-in topology")
    }

    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Topology::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let t: Topology = toml::from_str(text).map_err(|e| TopologyError::File {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        t.validate()?;
        Ok(t)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Invalid(m));
        if self.replication_factor < 1 {
            return bad("replication_factor must be at least 1".into());
        }
        if !(1..=self.replication_factor).contains(&self.min_insync_replicas) {
            return bad(format!(
                "min_insync_replicas must be between 1 and replication_factor ({})",
                self.replication_factor
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for t in self.all() {
            if t.partitions < 1 {
                return bad(format!("topic {}: partitions must be at least 1", t.name));
            }
            if !["delete", "compact", "compact,delete"].contains(&t.cleanup_policy.as_str()) {
                return bad(format!(
                    "topic {}: cleanup_policy must be delete, compact or \"compact,delete\"",
                    t.name
                ));
            }
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return bad(format!(
                    "topic name {:?}: use letters, digits, '.', '_' and '-'",
                    t.name
                ));
            }
            if !names.insert(t.name.clone()) {
                return bad(format!("topic {} is declared twice", t.name));
            }
        }
        Ok(())
    }

    /// Prefixes every topic and group name with `namespace` (several environments or test
    /// runs on one cluster).
    pub fn namespaced(mut self, namespace: &str) -> Topology {
        for t in [
            &mut self.topics.envelopes,
            &mut self.topics.events,
            &mut self.topics.dead_letters,
        ] {
            t.name = format!("{namespace}{}", t.name);
        }
        self.groups.normalizer = format!("{namespace}{}", self.groups.normalizer);
        self.groups.projector = format!("{namespace}{}", self.groups.projector);
        self
    }

    /// Checks that the envelopes topic takes a record for the largest body ingress accepts
    /// (`max_body_bytes`); otherwise such a webhook would get 503 on every retry.
    pub fn check_body_limit(&self, max_body_bytes: usize) -> Result<(), TopologyError> {
        let limit = self.topics.envelopes.max_message_bytes;
        if (max_body_bytes + ENVELOPE_OVERHEAD) as i64 > limit {
            return Err(TopologyError::Invalid(format!(
                "max_body_bytes ({max_body_bytes}) plus {ENVELOPE_OVERHEAD} bytes of envelope is more \
                 than topic {} takes (max_message_bytes {limit}): lower max_body_bytes or raise \
                 max_message_bytes in the topology and run `xsender-events topology apply`",
                self.topics.envelopes.name
            )));
        }
        Ok(())
    }

    pub fn all(&self) -> [&TopicSpec; 3] {
        [
            &self.topics.envelopes,
            &self.topics.events,
            &self.topics.dead_letters,
        ]
    }

    /// The topic configs the topology pins, per topic.
    fn configs(&self, t: &TopicSpec) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("cleanup.policy", t.cleanup_policy.clone()),
            ("retention.ms", t.retention_ms.to_string()),
            ("max.message.bytes", t.max_message_bytes.to_string()),
            ("min.insync.replicas", self.min_insync_replicas.to_string()),
            // An out-of-sync replica must never become leader: it would lack records that
            // were acknowledged (and so answered 2xx). Kafka's default, pinned against a
            // cluster-wide override.
            ("unclean.leader.election.enable", "false".to_string()),
        ])
    }
}

/// An admin connection to a cluster.
pub struct Admin {
    client: AdminClient<DefaultClientContext>,
    metadata_consumer: rdkafka::consumer::BaseConsumer,
    brokers: String,
    timeout: Duration,
}

impl Admin {
    pub fn connect(
        client_config: &rdkafka::ClientConfig,
        timeout: Duration,
    ) -> Result<Admin, TopologyError> {
        let brokers = client_config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        let err = |e: rdkafka::error::KafkaError| TopologyError::Kafka {
            brokers: brokers.clone(),
            message: e.to_string(),
        };
        Ok(Admin {
            client: client_config.create().map_err(err)?,
            metadata_consumer: client_config.create().map_err(err)?,
            brokers: brokers.clone(),
            timeout,
        })
    }

    fn err(&self, message: impl std::fmt::Display) -> TopologyError {
        TopologyError::Kafka {
            brokers: self.brokers.clone(),
            message: message.to_string(),
        }
    }

    /// How the cluster differs from `topology` (empty = matches).
    pub async fn drift(&self, topology: &Topology) -> Result<Vec<Drift>, TopologyError> {
        use rdkafka::consumer::Consumer;
        let consumer = &self.metadata_consumer;
        let timeout = self.timeout;
        // Metadata calls block: run them off the async threads.
        let md = tokio::task::block_in_place(|| consumer.fetch_metadata(None, timeout))
            .map_err(|e| self.err(format!("cannot read cluster metadata: {e}")))?;
        let mut drift = Vec::new();
        let mut present = Vec::new();
        for spec in topology.all() {
            let Some(t) = md
                .topics()
                .iter()
                .find(|t| t.name() == spec.name && t.error().is_none())
            else {
                drift.push(Drift::Missing {
                    topic: spec.name.clone(),
                });
                continue;
            };
            present.push(spec);
            let partitions = t.partitions().len() as i32;
            if partitions != spec.partitions {
                drift.push(Drift::Partitions {
                    topic: spec.name.clone(),
                    actual: partitions,
                    expected: spec.partitions,
                });
            }
            let replicas = t
                .partitions()
                .iter()
                .map(|p| p.replicas().len() as i32)
                .min()
                .unwrap_or(0);
            if replicas != topology.replication_factor {
                drift.push(Drift::Replication {
                    topic: spec.name.clone(),
                    actual: replicas,
                    expected: topology.replication_factor,
                });
            }
        }
        if !present.is_empty() {
            let specifiers: Vec<ResourceSpecifier> = present
                .iter()
                .map(|s| ResourceSpecifier::Topic(&s.name))
                .collect();
            let results = self
                .client
                .describe_configs(&specifiers, &self.options())
                .await
                .map_err(|e| self.err(format!("cannot describe topic configs: {e}")))?;
            for (spec, result) in present.iter().zip(results) {
                let resource = result.map_err(|e| {
                    self.err(format!("cannot describe the configs of {}: {e}", spec.name))
                })?;
                for (key, expected) in topology.configs(spec) {
                    let actual = resource.get(key).and_then(|e| e.value.clone());
                    if actual.as_deref() != Some(expected.as_str()) {
                        drift.push(Drift::Config {
                            topic: spec.name.clone(),
                            key: key.to_string(),
                            actual,
                            expected,
                        });
                    }
                }
            }
        }
        Ok(drift)
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    /// Creates missing topics and resets drifted topic configs; returns what it did and what
    /// is left for an operator (partition counts, replication).
    pub async fn apply(
        &self,
        topology: &Topology,
        mut progress: impl FnMut(&str),
    ) -> Result<ApplyReport, TopologyError> {
        let before = self.drift(topology).await?;
        let mut report = ApplyReport::default();
        let configs: BTreeMap<&str, BTreeMap<&'static str, String>> = topology
            .all()
            .iter()
            .map(|t| (t.name.as_str(), topology.configs(t)))
            .collect();
        let missing: Vec<&TopicSpec> = topology
            .all()
            .into_iter()
            .filter(|t| {
                before.contains(&Drift::Missing {
                    topic: t.name.clone(),
                })
            })
            .collect();
        if !missing.is_empty() {
            let new: Vec<NewTopic> = missing
                .iter()
                .map(|t| {
                    let mut n = NewTopic::new(
                        &t.name,
                        t.partitions,
                        TopicReplication::Fixed(topology.replication_factor),
                    );
                    for (k, v) in &configs[t.name.as_str()] {
                        n = n.set(k, v);
                    }
                    n
                })
                .collect();
            for r in self
                .client
                .create_topics(&new, &self.options())
                .await
                .map_err(|e| self.err(format!("cannot create topics: {e}")))?
            {
                match r {
                    Ok(name) => {
                        progress(&format!("created topic {name}"));
                        report.created.push(name);
                    }
                    // Another `apply` (or a second replica starting) got there first.
                    Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                        progress(&format!("topic {name} already exists"));
                    }
                    Err((name, code)) => {
                        return Err(self.err(format!("cannot create topic {name}: {code}")))
                    }
                }
            }
        }
        let drifted: std::collections::BTreeSet<&str> = before
            .iter()
            .filter_map(|d| match d {
                Drift::Config { topic, .. } => Some(topic.as_str()),
                _ => None,
            })
            .collect();
        if !drifted.is_empty() {
            // AlterConfigs replaces a topic's whole dynamic config: the set the topology pins
            // is the whole set, so an override made by hand outside it is reset too (and
            // reported here, so nobody is surprised).
            let alters: Vec<AlterConfig> = drifted
                .iter()
                .map(|name| {
                    let mut a = AlterConfig::new(ResourceSpecifier::Topic(name));
                    for (k, v) in &configs[name] {
                        a = a.set(k, v);
                    }
                    a
                })
                .collect();
            for r in self
                .client
                .alter_configs(&alters, &self.options())
                .await
                .map_err(|e| self.err(format!("cannot alter topic configs: {e}")))?
            {
                let spec = r.map_err(|(s, code)| {
                    self.err(format!("cannot alter the configs of {s:?}: {code}"))
                })?;
                let name = match spec {
                    rdkafka::admin::OwnedResourceSpecifier::Topic(n) => n,
                    other => format!("{other:?}"),
                };
                progress(&format!(
                    "reset the configs of topic {name} to the topology's"
                ));
                report.reconfigured.push(name);
            }
        }
        report.left = before.into_iter().filter(|d| !d.repairable()).collect();
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub created: Vec<String>,
    pub reconfigured: Vec<String>,
    /// Drift `apply` does not repair.
    pub left: Vec<Drift>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_and_local_topologies_differ_only_in_replication() {
        let cluster = Topology::built_in();
        let local = Topology::parse(
            include_str!("../../../topology/local.toml"),
            "topology/local.toml",
        )
        .unwrap();
        assert_eq!(
            (cluster.replication_factor, cluster.min_insync_replicas),
            (3, 2)
        );
        assert_eq!(
            (local.replication_factor, local.min_insync_replicas),
            (1, 1)
        );
        assert_eq!(
            Topology {
                replication_factor: 3,
                min_insync_replicas: 2,
                ..local
            },
            cluster
        );
    }

    #[test]
    fn mistakes_are_named() {
        let t = BUILT_IN.replace("partitions = 1\n", "partitions = 0\n");
        let e = Topology::parse(&t, "x").unwrap_err().to_string();
        assert!(
            e.contains("dead-letters") && e.contains("partitions"),
            "{e}"
        );
        let t = BUILT_IN.replace("min_insync_replicas = 2", "min_insync_replicas = 4");
        let e = Topology::parse(&t, "x").unwrap_err().to_string();
        assert!(e.contains("min_insync_replicas"), "{e}");
        let t = BUILT_IN.replace(
            "cleanup_policy = \"delete\"",
            "cleanup_policy = \"compacted\"",
        );
        assert!(Topology::parse(&t, "x").is_err());
        let t = BUILT_IN.replace("retention_ms = -1", "retention_ms = -1\nretention = 5");
        let e = Topology::parse(&t, "x").unwrap_err().to_string();
        assert!(e.contains("retention"), "{e}");
        let t = BUILT_IN.replace(
            "name = \"xsender.dead-letters.v1\"",
            "name = \"xsender.delivery-events.v1\"",
        );
        let e = Topology::parse(&t, "x").unwrap_err().to_string();
        assert!(e.contains("declared twice"), "{e}");
    }

    #[test]
    fn the_envelopes_topic_must_take_the_largest_body() {
        let mut t = Topology::built_in();
        t.check_body_limit(16 * 1024 * 1024).unwrap();
        let e = t
            .check_body_limit(20 * 1024 * 1024)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_body_bytes (20971520)") && e.contains("webhook-envelopes"),
            "{e}"
        );
        t.topics.envelopes.max_message_bytes = 1_048_576;
        assert!(t.check_body_limit(16 * 1024 * 1024).is_err());
        t.check_body_limit(512 * 1024).unwrap();
    }

    #[test]
    fn namespace_prefixes_topics_and_groups() {
        let t = Topology::built_in().namespaced("staging.");
        assert_eq!(t.topics.events.name, "staging.xsender.delivery-events.v1");
        assert_eq!(t.groups.projector, "staging.xsender-projector");
    }
}
