//! Reading ranges of the events topic outside any consumer group: `rebuild` replays it into a
//! fresh generation, and the generation switch catches up each partition's tail.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;

use super::wire::Wire;
use super::{unavailable, watermarks, KafkaSettings};
use crate::event::DeliveryEvent;
use crate::log::{LogError, Record};
use crate::projection::{Batch, Partition, TailReader};

/// How long a read waits for a record it knows exists before giving up.
const STALL: Duration = Duration::from_secs(30);

fn decode(
    wire: &Wire,
    topic: &str,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<Record<DeliveryEvent>, LogError> {
    let e = wire
        .decode_event(m.payload().unwrap_or_default(), m.headers())
        .map_err(|e| LogError::Corrupt {
            offset: super::position(m.partition(), m.offset()),
            message: format!(
                "{topic} partition {} offset {}: {e}",
                m.partition(),
                m.offset()
            ),
        })?;
    Ok(Record {
        offset: m.offset() + 1,
        value: e,
    })
}

/// Reads every partition of the events topic from `starts` (Kafka offsets) up to `ends`
/// (exclusive), handing batches of up to `max_batch` events to `on_batch`. Blocking: run it
/// on a blocking thread. Returns how many events were read.
pub fn read_range(
    settings: &KafkaSettings,
    wire: &Wire,
    starts: &BTreeMap<Partition, i64>,
    ends: &BTreeMap<Partition, i64>,
    max_batch: usize,
    mut on_batch: impl FnMut(Batch) -> Result<(), LogError>,
) -> Result<u64, LogError> {
    let topic = &settings.topology.topics.events.name;
    let consumer = settings.reader()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = BTreeMap::new();
    for (&p, &end) in ends {
        let start = starts.get(&p).copied().unwrap_or(0);
        if start < end {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(start))
                .map_err(unavailable)?;
            remaining.insert(p, end);
        }
    }
    if remaining.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl).map_err(unavailable)?;
    let mut parts: BTreeMap<Partition, Vec<Record<DeliveryEvent>>> = BTreeMap::new();
    let (mut pending, mut total) = (0usize, 0u64);
    let mut last_progress = std::time::Instant::now();
    while !remaining.is_empty() {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            if last_progress.elapsed() > STALL {
                return Err(unavailable(format!(
                    "{topic}: no record for {} s while partitions {:?} are not read to their end",
                    STALL.as_secs(),
                    remaining.keys().collect::<Vec<_>>()
                )));
            }
            continue;
        };
        last_progress = std::time::Instant::now();
        let m = m.map_err(unavailable)?;
        let p = m.partition();
        let Some(&end) = remaining.get(&p) else {
            continue;
        };
        if m.offset() >= end {
            remaining.remove(&p);
            continue;
        }
        if m.offset() + 1 >= end {
            remaining.remove(&p);
        }
        parts.entry(p).or_default().push(decode(wire, topic, &m)?);
        pending += 1;
        total += 1;
        if pending >= max_batch || remaining.is_empty() {
            on_batch(Batch {
                parts: std::mem::take(&mut parts).into_iter().collect(),
            })?;
            pending = 0;
        }
    }
    if pending > 0 {
        on_batch(Batch {
            parts: parts.into_iter().collect(),
        })?;
    }
    Ok(total)
}

/// The tail reader of a generation switch: `(partition, after, max)` → the events of that
/// partition after record offset `after` (= from Kafka offset `after`), up to its current end.
pub fn tail_reader(settings: KafkaSettings, wire: Wire) -> Result<TailReader, LogError> {
    let consumer = Arc::new(Mutex::new(settings.reader()?));
    Ok(Box::new(move |p, after, max| {
        let topic = &settings.topology.topics.events.name;
        let c = consumer.lock().map_err(|e| e.to_string())?;
        let ends = watermarks(&c, topic, settings.produce_timeout).map_err(|e| e.to_string())?;
        let (low, high) = ends.get(&p).copied().unwrap_or((0, 0));
        let from = after.max(low);
        if from >= high {
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(from))
            .map_err(|e| e.to_string())?;
        c.assign(&tpl).map_err(|e| e.to_string())?;
        let want = ((high - from) as usize).min(max);
        let mut out = Vec::with_capacity(want);
        let started = std::time::Instant::now();
        while out.len() < want {
            if started.elapsed() > STALL {
                return Err(format!("{topic} partition {p}: tail read stalled"));
            }
            let Some(m) = c.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m.map_err(|e| e.to_string())?;
            if m.partition() != p || m.offset() < from {
                continue;
            }
            out.push(decode(&wire, topic, &m).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }))
}

/// The partitions of the events topic with their `(low, high)` watermarks.
pub fn event_partitions(
    settings: &KafkaSettings,
) -> Result<BTreeMap<Partition, (i64, i64)>, LogError> {
    let c: BaseConsumer = settings.reader()?;
    watermarks(
        &c,
        &settings.topology.topics.events.name,
        settings.produce_timeout,
    )
}
