//! The normalizer and the projector as Kafka consumer groups.
//!
//! Both commit a partition's offset only after their downstream write (events produced and
//! acknowledged; projections written with their checkpoints), so a crash or a rebalance at any
//! point re-delivers, never skips. Re-delivery is harmless: events carry content-derived keys
//! the fold counts once, and the projection store skips offsets at or below its per-partition
//! checkpoints (kept with the state, so they are exact even when a commit to Kafka was lost).
//!
//! Rebalances are eager (every partition revoked, then assigned afresh). A batch being written
//! finishes before the consumer is polled again (the rebalance runs inside that poll), so two
//! members never work on one partition at once, with one exception: records collected for a
//! batch just before a rebalance inside the collection. The normalizer writes them anyway (at
//! worst the new owner produces the same events again: duplicates the fold counts once); the
//! projector keeps only the partitions it still owns (another projector may be writing the
//! others' rows now), and relies on the store's checkpoints for what it dropped: records are
//! never dropped on the assumption that Kafka will deliver them again — a partition that stays
//! with the same member keeps its fetch position, so they would be skipped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::event::{DeadLetter, DeliveryEvent};
use crate::log::kafka::{position, unavailable, KafkaLog, KafkaSettings};
use crate::log::{LogError, Record};
use crate::projection::{Batch, Partition, ProjectionStore, StoreError};
use crate::shutdown::Shutdown;
use crate::stages::normalizer::Normalizer;

/// Counts rebalances, so a stage knows whether the batch it collected is still its own.
#[derive(Default)]
pub struct Rebalances(AtomicU64);

impl Rebalances {
    fn epoch(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        self.0.fetch_add(1, Ordering::SeqCst);
        tracing::info!(?rebalance, "consumer group rebalance");
    }
}

type GroupConsumer = StreamConsumer<Rebalances>;

fn subscribe(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
) -> Result<GroupConsumer, LogError> {
    let consumer: GroupConsumer = settings
        .consumer_config(group)
        .create_with_context(Rebalances::default())
        .map_err(unavailable)?;
    consumer.subscribe(&[topic]).map_err(unavailable)?;
    Ok(consumer)
}

/// One record taken off a partition: what the stage needs, detached from the consumer.
struct Taken {
    partition: Partition,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Option<rdkafka::message::OwnedHeaders>,
    timestamp_ms: Option<i64>,
}

/// Records taken for one step, and whether the group rebalanced while they were collected.
struct Collected {
    taken: Vec<Taken>,
    rebalanced: bool,
}

/// Waits for the next records (up to `max`); `None` on shutdown.
async fn next_batch(
    consumer: &GroupConsumer,
    max: usize,
    shutdown: &mut Shutdown,
) -> Result<Option<Collected>, LogError> {
    let take = |m: rdkafka::message::BorrowedMessage<'_>| Taken {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| k.to_vec()),
        payload: m.payload().unwrap_or_default().to_vec(),
        headers: m.headers().map(|h| h.detach()),
        timestamp_ms: m.timestamp().to_millis(),
    };
    let epoch = consumer.context().epoch();
    let first = tokio::select! {
        m = consumer.recv() => m,
        _ = shutdown.wait() => return Ok(None),
    };
    let first = match first {
        Ok(m) => m,
        // librdkafka reports passing trouble (a broker down, a transport error) on the
        // consumer and recovers by itself: restarting the consumer would only add a rebalance.
        Err(e @ rdkafka::error::KafkaError::MessageConsumption(_)) => {
            tracing::warn!(error = %e, "consumer error; librdkafka retries");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.wait() => return Ok(None),
            }
            return Ok(Some(Collected {
                taken: Vec::new(),
                rebalanced: false,
            }));
        }
        Err(e) => return Err(unavailable(e)),
    };
    // A rebalance inside that first recv came before the record: the record is ours.
    let epoch = consumer.context().epoch().max(epoch);
    let mut out = vec![take(first)];
    // Then whatever is already fetched, without waiting for more than a moment.
    while out.len() < max {
        match tokio::time::timeout(Duration::from_millis(2), consumer.recv()).await {
            Ok(Ok(m)) => out.push(take(m)),
            // What was collected is good: process it, and let the next step meet the error
            // (a passing one is retried by librdkafka; restarting would cost a rebalance).
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consumer error while collecting a batch");
                break;
            }
            Err(_) => break,
        }
    }
    Ok(Some(Collected {
        taken: out,
        rebalanced: consumer.context().epoch() != epoch,
    }))
}

/// Commits, per partition, the offset after the last record of `taken`.
fn commit(consumer: &GroupConsumer, topic: &str, taken: &[Taken]) -> Result<(), LogError> {
    let mut next: BTreeMap<Partition, i64> = BTreeMap::new();
    for t in taken {
        let n = next.entry(t.partition).or_default();
        *n = (*n).max(t.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(o))
            .map_err(unavailable)?;
    }
    // Async: a lost commit only means re-delivery, which the downstream write absorbs.
    consumer
        .commit(&tpl, CommitMode::Async)
        .map_err(unavailable)
}

/// Runs `session` until shutdown, starting a fresh one (a new consumer: it rejoins the group
/// and resumes from committed offsets) after a failure.
async fn supervise<F, Fut>(stage: &'static str, mut shutdown: Shutdown, mut session: F)
where
    F: FnMut(Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), LogError>>,
{
    loop {
        match session(shutdown.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(stage, error = %e, "stage failed; restarting its consumer");
                tokio::select! {
                    _ = tokio::time::sleep(super::RETRY) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
}

/// The normalizer group: envelopes in, events and dead letters out (acknowledged), then commit.
pub async fn run_normalizer(
    log: Arc<KafkaLog>,
    normalizer: Normalizer,
    batch_size: usize,
    shutdown: Shutdown,
) {
    let normalizer = Arc::new(normalizer);
    supervise("normalizer", shutdown, |mut shutdown| {
        let (log, normalizer) = (log.clone(), normalizer.clone());
        async move {
            let t = &log.settings().topology;
            let (in_topic, group) = (t.topics.envelopes.name.clone(), t.groups.normalizer.clone());
            let consumer = subscribe(log.settings(), &group, &in_topic)?;
            tracing::info!(topic = %in_topic, %group, "normalizer consuming");
            while let Some(Collected { taken, .. }) =
                next_batch(&consumer, batch_size, &mut shutdown).await?
            {
                if taken.is_empty() {
                    continue;
                }
                normalize_batch(&log, &normalizer, &taken).await?;
                commit(&consumer, &in_topic, &taken)?;
            }
            Ok(())
        }
    })
    .await
}

async fn normalize_batch(
    log: &KafkaLog,
    normalizer: &Normalizer,
    taken: &[Taken],
) -> Result<(), LogError> {
    let topics = &log.settings().topology.topics;
    let mut records = Vec::with_capacity(taken.len());
    let mut undecodable = Vec::new();
    for t in taken {
        match log.wire().decode_envelope(&t.payload, t.headers.as_ref()) {
            Ok(env) => records.push(Record {
                offset: position(t.partition, t.offset),
                value: env,
            }),
            // Foreign or corrupt data on the topic: kept as a dead letter, never skipped.
            Err(e) => undecodable.push(DeadLetter {
                envelope_id: t
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                provider: "unknown".into(),
                reason: "undecodable_envelope".into(),
                detail: format!(
                    "{} partition {} offset {}: {e}",
                    topics.envelopes.name, t.partition, t.offset
                ),
                item: crate::providers::body_prefix(&t.payload),
                received_at_ms: t.timestamp_ms.unwrap_or_default(),
            }),
        }
    }
    let mut batch = normalizer.normalize(&records);
    batch
        .dead_letters
        .extend(undecodable.into_iter().map(|d| (0, d)));
    let mut sends = Vec::with_capacity(batch.events.len() + batch.dead_letters.len());
    let mut too_large = Vec::new();
    for (o, e) in std::mem::take(&mut batch.events) {
        let (value, headers) = log.wire().encode_event(&e);
        let key = event_key(&e);
        // The broker would refuse it on every retry and stall the partition behind it for
        // good: kept as a dead letter (the whole event, on a topic that takes whole bodies).
        if !fits(topics.events.max_message_bytes, &key, &value) {
            too_large.push((o, oversized_event(&e, value.len(), &topics.events)));
            continue;
        }
        sends.push((topics.events.name.as_str(), key, value, headers));
        batch.events.push((o, e));
    }
    batch.dead_letters.extend(too_large);
    let tally = Normalizer::tally(&batch);
    for (_, d) in &batch.dead_letters {
        tracing::warn!(provider = %d.provider, reason = %d.reason, envelope = %d.envelope_id, "dead letter");
        let value = serde_json::to_vec(d).map_err(unavailable)?;
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "content-type",
            value: Some("application/json"),
        });
        sends.push((
            topics.dead_letters.name.as_str(),
            d.envelope_id.as_bytes().to_vec(),
            value,
            headers,
        ));
    }
    // All in flight at once (the producer batches them); every one acknowledged before the
    // envelopes' offsets are committed.
    futures::future::try_join_all(
        sends
            .iter()
            .map(|(topic, key, value, headers)| log.send(topic, key, value, headers.clone())),
    )
    .await?;
    normalizer.count(tally);
    Ok(())
}

/// Room for a record's headers and framing beside its key and value (the fingerprint headers
/// take ~100 bytes).
const RECORD_OVERHEAD: usize = 1024;

/// Whether a record of `key` and `value` is within a topic's `max.message.bytes`.
fn fits(max_message_bytes: i64, key: &[u8], value: &[u8]) -> bool {
    (key.len() + value.len() + RECORD_OVERHEAD) as i64 <= max_message_bytes
}

/// The dead letter of an event too large for the events topic.
fn oversized_event(
    e: &DeliveryEvent,
    encoded: usize,
    topic: &crate::log::kafka::topology::TopicSpec,
) -> DeadLetter {
    DeadLetter {
        envelope_id: e.envelope_id.clone(),
        provider: e.provider.clone(),
        reason: "event_too_large".into(),
        detail: format!(
            "the {} event for {} encodes to {encoded} bytes, over the {} bytes {} takes \
             (max_message_bytes in the topology); raise it there and run `xsender-events topology apply`",
            e.kind.as_str(),
            e.dispatch_key,
            topic.max_message_bytes,
            topic.name,
        ),
        item: serde_json::to_string(e).unwrap_or_default(),
        received_at_ms: e.received_at_ms,
    }
}

/// The events topic's key: tenant and dispatch key, so one partition owns each dispatch row.
pub fn event_key(e: &DeliveryEvent) -> Vec<u8> {
    let mut k = Vec::with_capacity(e.tenant.len() + 1 + e.dispatch_key.len());
    k.extend_from_slice(e.tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(e.dispatch_key.as_bytes());
    k
}

/// The projector group: events in, folded with per-partition checkpoints, then commit.
pub async fn run_projector(
    settings: KafkaSettings,
    wire: crate::log::kafka::wire::Wire,
    store: Arc<dyn ProjectionStore>,
    batch_size: usize,
    shutdown: Shutdown,
) {
    supervise("projector", shutdown, |mut shutdown| {
        let (settings, wire, store) = (settings.clone(), wire.clone(), store.clone());
        async move {
            let t = &settings.topology;
            let (topic, group) = (t.topics.events.name.clone(), t.groups.projector.clone());
            let consumer = subscribe(&settings, &group, &topic)?;
            tracing::info!(%topic, %group, "projector consuming");
            while let Some(Collected {
                mut taken,
                rebalanced,
            }) = next_batch(&consumer, batch_size, &mut shutdown).await?
            {
                if rebalanced {
                    let owned = consumer.assignment().map_err(unavailable)?;
                    taken.retain(|t| owned.find_partition(&topic, t.partition).is_some());
                }
                if taken.is_empty() {
                    continue;
                }
                let batch = decode_events(&wire, &topic, &taken)?;
                let spans =
                    super::projector::spans(batch.parts.iter().flat_map(|(_, r)| r), taken.len());
                let applied = store.apply(batch.clone()).await;
                drop(spans);
                match applied {
                    Ok(()) => commit(&consumer, &topic, &taken)?,
                    // The generation's checkpoints are behind what we read (a rebuild switched
                    // generations): read those partitions again from there.
                    Err(StoreError::Gap { .. }) => {
                        let cps = store.checkpoints().await.map_err(unavailable)?;
                        for (p, records) in &batch.parts {
                            let first = records.first().map(|r| r.offset - 1).unwrap_or(0);
                            let from = first.min(cps.get(p).copied().unwrap_or(0));
                            consumer
                                .seek(
                                    &topic,
                                    *p,
                                    rdkafka::Offset::Offset(from),
                                    Duration::from_secs(10),
                                )
                                .map_err(unavailable)?;
                        }
                    }
                    Err(e) => return Err(LogError::Unavailable(e.to_string())),
                }
            }
            Ok(())
        }
    })
    .await
}

/// The batch per partition, in offset order. A record that does not decode stops the
/// projector (with its position in the error, retried): it was written by a normalizer with a
/// schema this build does not know, and skipping it would lose an event for good; upgrading
/// the projector lets it through.
fn decode_events(
    wire: &crate::log::kafka::wire::Wire,
    topic: &str,
    taken: &[Taken],
) -> Result<Batch, LogError> {
    let mut parts: BTreeMap<Partition, Vec<Record<DeliveryEvent>>> = BTreeMap::new();
    for t in taken {
        let e = wire
            .decode_event(&t.payload, t.headers.as_ref())
            .map_err(|e| LogError::Corrupt {
                offset: position(t.partition, t.offset),
                message: format!("{topic} partition {} offset {}: {e}", t.partition, t.offset),
            })?;
        parts.entry(t.partition).or_default().push(Record {
            offset: t.offset + 1,
            value: e,
        });
    }
    Ok(Batch {
        parts: parts.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::kafka::Topology;

    #[test]
    fn a_record_fits_up_to_the_topic_limit_with_room_for_headers() {
        let limit = 1_048_576;
        let key = b"acme\0d:1".to_vec();
        let just = vec![0u8; limit as usize - key.len() - RECORD_OVERHEAD];
        assert!(fits(limit, &key, &just));
        assert!(!fits(limit, &key, &[just.as_slice(), b"x"].concat()));
    }

    #[test]
    fn an_oversized_event_becomes_a_dead_letter_naming_the_limit_and_the_fix() {
        let topics = Topology::built_in().topics;
        let e = DeliveryEvent {
            event_key: "k".into(),
            tenant: "acme".into(),
            provider: "sendgrid".into(),
            kind: crate::event::EventKind::Clicked,
            dispatch_key: "d:big".into(),
            dispatch_id: Some("big".into()),
            campaign_id: None,
            message_id: None,
            recipient: "a@example.com".into(),
            occurred_at_ms: 1,
            received_at_ms: 2,
            envelope_id: "env-9".into(),
            provider_event: "click".into(),
            provider_event_id: None,
            bounce_class: None,
            reason: None,
            smtp_status: None,
            url: Some("https://example.com/".into()),
            user_agent: None,
            ip: None,
            machine: false,
            group_id: None,
            trace_parent: None,
        };
        let d = oversized_event(&e, 30_000_000, &topics.events);
        assert_eq!(
            (
                d.reason.as_str(),
                d.envelope_id.as_str(),
                d.provider.as_str()
            ),
            ("event_too_large", "env-9", "sendgrid")
        );
        assert!(
            d.detail.contains("30000000")
                && d.detail
                    .contains(&topics.events.max_message_bytes.to_string())
                && d.detail.contains("topology apply"),
            "{}",
            d.detail
        );
        let back: DeliveryEvent = serde_json::from_str(&d.item).unwrap();
        assert_eq!(back, e, "the whole event is kept");
    }
}
