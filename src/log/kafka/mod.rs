//! The cluster log on Apache Kafka: envelopes, events and dead letters are topics (see
//! `topology/`), the normalizer and the projector are consumer groups (see
//! [`crate::stages::kafka`]).
//!
//! Positions: a Kafka record at `offset` in `partition` is handed on as [`Offset`] `offset + 1`
//! (the logs' convention: the first record is 1, 0 is "nothing yet"), with its partition beside
//! it. Where one number has to name a record across partitions (the webhook's answer, the
//! events API cursor) it is [`position`]: the partition in the high bits.

pub mod lag;
pub mod replay;
pub mod topology;
pub mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, TopicPartitionList};

use crate::event::{DeadLetter, DeliveryEvent, RawEnvelope};
use crate::log::{DeadLetterLog, EnvelopeLog, EventQuery, EventSearch, LogError, Offset, Record};
use crate::projection::Partition;
pub use topology::Topology;
use wire::Wire;

/// Everything needed to talk to the cluster.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topology, already namespaced.
    pub topology: Topology,
    /// Extra librdkafka properties for every client (security, SASL, client.rack, …).
    pub properties: BTreeMap<String, String>,
    /// How long a produce may take before the webhook gets 503.
    pub produce_timeout: Duration,
    pub schema_registry_url: Option<String>,
}

/// A record position across partitions: partition in the high bits, `offset + 1` below.
pub fn position(partition: Partition, kafka_offset: i64) -> Offset {
    ((partition as i64) << 40) | (kafka_offset + 1)
}

/// The inverse of [`position`]: `(partition, kafka offset)`.
pub fn split_position(p: Offset) -> (Partition, i64) {
    ((p >> 40) as Partition, (p & ((1 << 40) - 1)) - 1)
}

/// Scans for the read and admin APIs read at most this many records per request: the topics
/// are logs, not indexes; narrow the window (`since`/`until`) to look further back.
pub const MAX_SCAN: usize = 1_000_000;

impl KafkaSettings {
    /// The common client properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "xsender-events")
            // librdkafka logs through our subscriber only at warnings and above.
            .set("log_level", "4");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A consumer of `group` that commits only what the caller says (after its downstream
    /// write), starting from the beginning when the group has no offsets yet.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.client_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Eager rebalancing: a rebalance revokes every partition, so a stage drops its
            // half-read batch and resumes from committed positions.
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // Prefetched records per consumer: 16 MiB keeps a stage busy between fetches
            // (librdkafka's 64 MiB default per consumer made most of the process's memory).
            .set("queued.max.messages.kbytes", "16384");
        c
    }

    /// A consumer that belongs to no group: reads by explicit assignment (scans, rebuild).
    pub fn reader(&self) -> Result<BaseConsumer, LogError> {
        let mut c = self.client_config();
        c.set("group.id", "xsender-events-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        c.create().map_err(unavailable)
    }

    /// The idempotent producer: acks from all in-sync replicas, ordered retries without
    /// duplicates, batched and compressed; a record not delivered within the produce timeout
    /// fails (the webhook then answers 503).
    pub fn producer(&self) -> Result<FutureProducer, LogError> {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "zstd")
            .set("linger.ms", "5")
            .set("batch.size", "1048576")
            .set("batch.num.messages", "10000")
            .set(
                "message.timeout.ms",
                self.produce_timeout.as_millis().max(1).to_string(),
            )
            // Webhook bodies up to 16 MiB (the envelopes topic allows 20 MiB).
            .set("message.max.bytes", "20971520")
            // Records waiting for the broker: a full queue makes a send wait (then 503 past the
            // produce timeout) instead of growing memory without bound.
            .set("queue.buffering.max.kbytes", "65536");
        c.create().map_err(unavailable)
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("Kafka: {e}"))
}

/// The ingress side of the log, and the scans behind the read and admin APIs.
pub struct KafkaLog {
    settings: KafkaSettings,
    producer: FutureProducer,
    wire: Wire,
}

impl KafkaLog {
    pub async fn open(settings: KafkaSettings) -> Result<KafkaLog, LogError> {
        let wire = match &settings.schema_registry_url {
            Some(url) => Wire::with_registry(
                url,
                &settings.topology.topics.envelopes.name,
                &settings.topology.topics.events.name,
            )
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?,
            None => Wire::plain(),
        };
        Ok(KafkaLog {
            producer: settings.producer()?,
            settings,
            wire,
        })
    }

    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Sends one record and waits for its delivery report.
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<(Partition, i64), LogError> {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .headers(headers);
        let timeout = self.settings.produce_timeout;
        // message.timeout.ms bounds the delivery; the outer timeout also bounds a full local
        // queue, so a request never waits longer than the produce timeout.
        match tokio::time::timeout(timeout, self.producer.send(record, Timeout::After(timeout)))
            .await
        {
            Ok(Ok(d)) => Ok((d.partition, d.offset)),
            Ok(Err((e, _))) => Err(unavailable(format!("{topic} did not take the record: {e}"))),
            Err(_) => Err(unavailable(format!(
                "{topic} did not acknowledge the record within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Reads `topic` on a blocking thread: every partition from `start(partition)` up to the
    /// high watermark seen when the scan starts, at most [`MAX_SCAN`] records.
    async fn scan<T: Send + 'static>(
        &self,
        topic: String,
        start: impl Fn(&BaseConsumer, Partition) -> Result<i64, LogError> + Send + 'static,
        mut visit: impl FnMut(Partition, &BorrowedMessage<'_>) -> Option<T> + Send + 'static,
    ) -> Result<Vec<T>, LogError> {
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = settings.reader()?;
            let ends = watermarks(&consumer, &topic, settings.produce_timeout)?;
            let mut tpl = TopicPartitionList::new();
            let mut remaining = BTreeMap::new();
            for (&p, &(_, high)) in &ends {
                let from = start(&consumer, p)?.max(ends[&p].0);
                if from < high {
                    tpl.add_partition_offset(&topic, p, rdkafka::Offset::Offset(from))
                        .map_err(unavailable)?;
                    remaining.insert(p, high);
                }
            }
            let mut out = Vec::new();
            if remaining.is_empty() {
                return Ok(out);
            }
            consumer.assign(&tpl).map_err(unavailable)?;
            let mut scanned = 0usize;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !remaining.is_empty() {
                if std::time::Instant::now() > deadline {
                    return Err(unavailable(format!(
                        "reading {topic} took longer than 30 s"
                    )));
                }
                let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let m = m.map_err(unavailable)?;
                let p = m.partition();
                let Some(&high) = remaining.get(&p) else {
                    continue;
                };
                if m.offset() >= high - 1 {
                    remaining.remove(&p);
                }
                if m.offset() >= high {
                    continue;
                }
                scanned += 1;
                if scanned > MAX_SCAN {
                    return Err(LogError::Unavailable(format!(
                        "more than {MAX_SCAN} records of {topic} in this window: narrow it with since/until"
                    )));
                }
                if let Some(t) = visit(p, &m) {
                    out.push(t);
                }
            }
            Ok(out)
        })
        .await
        .map_err(unavailable)?
    }
}

/// `partition → (low, high)` watermarks of every partition of `topic`.
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<Partition, (i64, i64)>, LogError> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(unavailable)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .ok_or_else(|| unavailable(format!("topic {topic} does not exist")))?;
    let mut out = BTreeMap::new();
    for p in t.partitions() {
        let w = consumer
            .fetch_watermarks(topic, p.id(), timeout)
            .map_err(unavailable)?;
        out.insert(p.id(), w);
    }
    Ok(out)
}

/// The first offset of each partition at or after `time_ms` (the high watermark where none).
pub fn offsets_for_time(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: impl IntoIterator<Item = Partition>,
    time_ms: i64,
    timeout: Duration,
) -> Result<BTreeMap<Partition, i64>, LogError> {
    // Kafka reads a time of -1 as "latest" and -2 as "earliest": a time before 1970 (a typo,
    // a negative `since`) means "from the beginning", which 0 says without the sentinels.
    let time_ms = time_ms.max(0);
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(time_ms))
            .map_err(unavailable)?;
    }
    let found = consumer
        .offsets_for_times(tpl, timeout)
        .map_err(unavailable)?;
    let ends = watermarks(consumer, topic, timeout)?;
    let mut out = BTreeMap::new();
    for e in found.elements() {
        let o = match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => ends.get(&e.partition()).map(|w| w.1).unwrap_or(0),
        };
        out.insert(e.partition(), o);
    }
    Ok(out)
}

#[async_trait]
impl EnvelopeLog for KafkaLog {
    async fn append(&self, envelope: &RawEnvelope) -> Result<Offset, LogError> {
        let (value, headers) = self.wire.encode_envelope(envelope);
        let (p, o) = self
            .send(
                &self.settings.topology.topics.envelopes.name,
                envelope.id.as_bytes(),
                &value,
                headers,
            )
            .await?;
        Ok(position(p, o))
    }

    fn locate(&self, offset: Offset) -> (Option<Partition>, i64) {
        let (p, o) = split_position(offset);
        (Some(p), o)
    }
}

#[async_trait]
impl EventSearch for KafkaLog {
    /// A scan of the events topic from the first record at or after `since` (every record
    /// without it), filtered here; results in position order so the cursor pages them.
    async fn query_events(&self, q: EventQuery) -> Result<Vec<Record<DeliveryEvent>>, LogError> {
        let topic = self.settings.topology.topics.events.name.clone();
        let timeout = self.settings.produce_timeout;
        let wire = self.wire.clone();
        let (after_p, after_o) = if q.after > 0 {
            split_position(q.after)
        } else {
            (-1, -1)
        };
        let since = q.since_ms;
        let topic2 = topic.clone();
        let start = move |c: &BaseConsumer, p: Partition| -> Result<i64, LogError> {
            // Partitions before the cursor's are done; its own resumes after it.
            let from_cursor = match p.cmp(&after_p) {
                std::cmp::Ordering::Less => i64::MAX,
                std::cmp::Ordering::Equal => after_o + 1,
                std::cmp::Ordering::Greater => 0,
            };
            // The broker's timestamp is the append time, at or after the event's: a lower
            // bound for where events that happened since `since` can be.
            let from_time = match since {
                Some(t) => offsets_for_time(c, &topic2, [p], t, timeout)?
                    .get(&p)
                    .copied()
                    .unwrap_or(0),
                None => 0,
            };
            Ok(from_cursor.max(from_time))
        };
        let visit = move |p: Partition, m: &BorrowedMessage<'_>| {
            let e = match wire.decode_event(m.payload()?, m.headers()) {
                Ok(e) => e,
                Err(err) => {
                    // The projector stops on such a record (see stages::kafka); a search
                    // just leaves it out, loudly.
                    tracing::warn!(partition = p, offset = m.offset(), error = %err, "undecodable event left out of a search");
                    return None;
                }
            };
            let keep = e.tenant == q.tenant
                && q.recipient.as_ref().is_none_or(|r| *r == e.recipient)
                && q.message_id
                    .as_ref()
                    .is_none_or(|id| Some(id) == e.message_id.as_ref())
                && q.since_ms.is_none_or(|t| e.occurred_at_ms >= t)
                && q.until_ms.is_none_or(|t| e.occurred_at_ms < t);
            keep.then(|| Record {
                offset: position(p, m.offset()),
                value: e,
            })
        };
        let mut rows = self.scan(topic, start, visit).await?;
        rows.sort_by_key(|r| r.offset);
        rows.truncate(q.limit);
        Ok(rows)
    }
}

#[async_trait]
impl DeadLetterLog for KafkaLog {
    async fn dead_letters(
        &self,
        after: Offset,
        limit: usize,
    ) -> Result<Vec<Record<DeadLetter>>, LogError> {
        let topic = self.settings.topology.topics.dead_letters.name.clone();
        let mut rows = self
            .scan(
                topic,
                move |_, p| {
                    let (ap, ao) = if after > 0 {
                        split_position(after)
                    } else {
                        (-1, -1)
                    };
                    Ok(if p < ap {
                        i64::MAX
                    } else if p == ap {
                        ao + 1
                    } else {
                        0
                    })
                },
                |p, m| {
                    let d: DeadLetter = serde_json::from_slice(m.payload()?).ok()?;
                    Some(Record {
                        offset: position(p, m.offset()),
                        value: d,
                    })
                },
            )
            .await?;
        rows.sort_by_key(|r| r.offset);
        rows.truncate(limit);
        Ok(rows)
    }

    async fn dead_letter_counts(&self) -> Result<Vec<(String, String, u64)>, LogError> {
        let topic = self.settings.topology.topics.dead_letters.name.clone();
        let rows = self
            .scan(
                topic,
                |_, _| Ok(0),
                |_, m| {
                    let d: DeadLetter = serde_json::from_slice(m.payload()?).ok()?;
                    Some((d.provider, d.reason))
                },
            )
            .await?;
        let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
        for k in rows {
            *counts.entry(k).or_default() += 1;
        }
        Ok(counts.into_iter().map(|((p, r), n)| (p, r, n)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        for (p, o) in [(0, 0), (0, 41), (11, 0), (11, (1 << 39) - 2), (255, 7)] {
            let pos = position(p, o);
            assert!(pos > 0);
            assert_eq!(split_position(pos), (p, o));
        }
        assert!(position(0, 5) < position(1, 0), "partition-major order");
    }
}
