//! Projection stores: the fold's results (dispatch rows, suppressions, contacts) plus the
//! projector's checkpoints, kept in the same transaction. State is organised in *generations*:
//! the live projector writes the current one; `rebuild` fills a fresh one from the log and then
//! switches readers and the projector over atomically.
//!
//! # Checkpoints per log partition
//!
//! The events log may be partitioned (Kafka) or a single sequence (the embedded SQLite log,
//! which is partition 0). A generation keeps one checkpoint per log partition: the last offset
//! of that partition folded into it, with offsets counted from 1 in every partition (a Kafka
//! record is handed over with `offset = kafka_offset + 1`), so 0, or no entry, means nothing
//! of that partition was folded. A [`Batch`] carries runs of one or more partitions; each run
//! is checked and skipped against its own partition's checkpoint.
//!
//! Partitions have no order between them, and the fold is order-insensitive, so a batch that
//! interleaves them gives the same rows as any other. The one exception is an event key reused
//! on two *different* dispatches (counted once, on the dispatch folded first): the log must key
//! its records so that all copies of an event key land in the same partition, as the embedded
//! log trivially does.

pub mod cql;
pub mod sqlite;

use async_trait::async_trait;

use crate::event::DeliveryEvent;
use crate::fold::{ContactRow, DispatchRow, DispatchStatus, SuppressionRow};
use crate::log::{Offset, Record};

pub type Generation = i64;
pub type Partition = i32;
/// Checkpoint per log partition: the last offset folded (absent = 0 = nothing folded).
pub type Positions = std::collections::BTreeMap<Partition, Offset>;

/// A projector batch: events of one or more log partitions, each run in ascending offsets.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub parts: Vec<(Partition, Vec<Record<DeliveryEvent>>)>,
}

impl Batch {
    /// A batch of one partition's run (the embedded log is partition 0).
    pub fn single(partition: Partition, events: Vec<Record<DeliveryEvent>>) -> Batch {
        Batch {
            parts: vec![(partition, events)],
        }
    }

    /// True when no run has an event.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(|(_, evs)| evs.is_empty())
    }

    /// Events in the batch, over all partitions.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(_, evs)| evs.len()).sum()
    }
}

/// What a batch does to a generation whose checkpoints are `checkpoints`: the events to fold
/// (above their partition's checkpoint, runs in batch order) and the new checkpoint of every
/// partition that moves. A run that starts beyond its partition's checkpoint + 1 is a
/// [`StoreError::Gap`], found before anything is written. A partition may appear in several
/// runs; each continues from where the previous one left it.
pub(crate) struct Plan<'a> {
    pub fresh: Vec<&'a Record<DeliveryEvent>>,
    pub moved: Positions,
}

pub(crate) fn plan<'a>(checkpoints: &Positions, batch: &'a Batch) -> Result<Plan<'a>, StoreError> {
    let mut running = checkpoints.clone();
    let mut plan = Plan {
        fresh: Vec::with_capacity(batch.len()),
        moved: Positions::new(),
    };
    for (partition, events) in &batch.parts {
        let checkpoint = running.get(partition).copied().unwrap_or(0);
        if let Some(first) = events
            .first()
            .map(|r| r.offset)
            .filter(|f| *f > checkpoint + 1)
        {
            return Err(StoreError::Gap {
                partition: *partition,
                first,
                checkpoint,
            });
        }
        let before = plan.fresh.len();
        plan.fresh
            .extend(events.iter().filter(|r| r.offset > checkpoint));
        if let Some(last) = plan.fresh[before..].last().map(|r| r.offset) {
            running.insert(*partition, last);
            plan.moved.insert(*partition, last);
        }
    }
    Ok(plan)
}

/// The checkpoints a new generation starts from: `start - 1` (at least 0) per listed partition.
pub(crate) fn start_checkpoints(start: &Positions) -> Positions {
    start.iter().map(|(p, s)| (*p, (s - 1).max(0))).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("projection store unavailable: {0}")]
    Unavailable(String),
    /// A run of the batch does not continue from its partition's checkpoint (a rebuild
    /// switched generations under the projector): re-read from the checkpoints.
    #[error("batch starts at {first} in partition {partition} but its checkpoint is {checkpoint}")]
    Gap {
        partition: Partition,
        first: Offset,
        checkpoint: Offset,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct RecipientsQuery {
    pub tenant: String,
    pub campaign_id: String,
    pub status: Option<DispatchStatus>,
    /// Return rows with a dispatch key greater than this (pagination cursor).
    pub after: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationInfo {
    pub generation: Generation,
    pub checkpoints: Positions,
    pub current: bool,
}

/// Reads the log for the final catch-up of a rebuild: `tail(partition, after, max)` returns up
/// to `max` events of `partition` with offsets above `after`. Synchronous on purpose: the
/// embedded store calls it inside its write transaction.
pub type TailReader = Box<
    dyn Fn(Partition, Offset, usize) -> Result<Vec<Record<DeliveryEvent>>, String> + Send + Sync,
>;

#[async_trait]
pub trait ProjectionStore: Send + Sync {
    /// Checkpoints of the current generation.
    async fn checkpoints(&self) -> Result<Positions, StoreError>;
    /// Convenience kept for the embedded log: checkpoint of partition 0 of the current
    /// generation.
    async fn checkpoint(&self) -> Result<Offset, StoreError> {
        Ok(self.checkpoints().await?.get(&0).copied().unwrap_or(0))
    }
    /// Folds the batch into the current generation and moves each partition's checkpoint.
    /// Per partition, events at or below its checkpoint are skipped, and a run whose first
    /// offset is above checkpoint + 1 is [`StoreError::Gap`], found before anything is written
    /// (the embedded store applies nothing of the batch; it folds the whole batch in one
    /// transaction).
    async fn apply(&self, batch: Batch) -> Result<(), StoreError>;

    async fn recipients(&self, q: RecipientsQuery) -> Result<Vec<DispatchRow>, StoreError>;
    /// By XSender dispatch id, or by dispatch key (`m:<message id>:<recipient>`).
    async fn dispatch(
        &self,
        tenant: &str,
        id_or_key: &str,
    ) -> Result<Option<DispatchRow>, StoreError>;
    async fn suppressions_of(
        &self,
        tenant: &str,
        email: &str,
    ) -> Result<Vec<SuppressionRow>, StoreError>;
    /// Paginated by `(email, reason)`.
    async fn suppressions(
        &self,
        tenant: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<SuppressionRow>, StoreError>;
    async fn contact(&self, tenant: &str, email: &str) -> Result<Option<ContactRow>, StoreError>;

    async fn generations(&self) -> Result<Vec<GenerationInfo>, StoreError>;
    /// Creates empty tables for a new generation whose checkpoint of each listed partition is
    /// `start - 1` (at least 0); unlisted partitions start at 0.
    async fn create_generation(&self, start: &Positions) -> Result<Generation, StoreError>;
    /// Folds a batch into a (non-current) generation and moves its checkpoints, as
    /// [`ProjectionStore::apply`] does for the current one.
    async fn apply_to(&self, generation: Generation, batch: Batch) -> Result<(), StoreError>;
    /// Catches each of `partitions` of `generation` up with `tail` (from its checkpoint, until
    /// `tail` returns nothing), then makes it current; the embedded store does all of it under
    /// its write lock. Readers switch at that commit.
    async fn switch_to(
        &self,
        generation: Generation,
        partitions: Vec<Partition>,
        tail: TailReader,
    ) -> Result<(), StoreError>;
    /// Drops every generation but the current one; returns what was dropped.
    async fn drop_old(&self) -> Result<Vec<Generation>, StoreError>;
}
