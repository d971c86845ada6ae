//! Lag of the Kafka stages: records on a topic beyond what the stage has done. The normalizer's
//! position is its group's committed offsets; the projector's is the projection store's own
//! per-partition checkpoints (the exact truth, kept with the state).

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use super::{unavailable, watermarks, KafkaSettings};
use crate::log::{LagProbe, LogError, StageLag};
use crate::projection::ProjectionStore;

pub struct KafkaLag {
    settings: KafkaSettings,
    /// A member of no group that reads the normalizer group's committed offsets.
    normalizer_offsets: Arc<BaseConsumer>,
    store: Arc<dyn ProjectionStore>,
}

impl KafkaLag {
    pub fn new(
        settings: KafkaSettings,
        store: Arc<dyn ProjectionStore>,
    ) -> Result<KafkaLag, LogError> {
        let mut c = settings.client_config();
        c.set("group.id", &settings.topology.groups.normalizer)
            .set("enable.auto.commit", "false");
        Ok(KafkaLag {
            normalizer_offsets: Arc::new(c.create().map_err(unavailable)?),
            settings,
            store,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BaseConsumer, &KafkaSettings) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let (c, s) = (self.normalizer_offsets.clone(), self.settings.clone());
        tokio::task::spawn_blocking(move || f(&c, &s))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait]
impl LagProbe for KafkaLag {
    async fn normalizer(&self) -> Result<StageLag, LogError> {
        self.blocking(|c, s| {
            let topic = &s.topology.topics.envelopes.name;
            let ends = watermarks(c, topic, s.produce_timeout)?;
            let mut tpl = TopicPartitionList::new();
            for p in ends.keys() {
                tpl.add_partition(topic, *p);
            }
            let committed = c
                .committed_offsets(tpl, s.produce_timeout)
                .map_err(unavailable)?;
            let mut records = 0;
            for e in committed.elements() {
                let (low, high) = ends[&e.partition()];
                let done = match e.offset() {
                    rdkafka::Offset::Offset(o) => o.max(low),
                    _ => low,
                };
                records += (high - done).max(0);
            }
            Ok(StageLag {
                records,
                oldest_received_at_ms: None,
            })
        })
        .await
    }

    async fn projector(&self) -> Result<StageLag, LogError> {
        let cps = self
            .store
            .checkpoints()
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        self.blocking(move |c, s| {
            let ends = watermarks(c, &s.topology.topics.events.name, s.produce_timeout)?;
            // A checkpoint is the last record offset folded = the next Kafka offset to read.
            let records = ends
                .iter()
                .map(|(p, (low, high))| (high - cps.get(p).copied().unwrap_or(0).max(*low)).max(0))
                .sum();
            Ok(StageLag {
                records,
                oldest_received_at_ms: None,
            })
        })
        .await
    }

    async fn events_written(&self) -> Result<i64, LogError> {
        self.blocking(|c, s| {
            Ok(
                watermarks(c, &s.topology.topics.events.name, s.produce_timeout)?
                    .values()
                    .map(|(_, high)| high)
                    .sum(),
            )
        })
        .await
    }
}
