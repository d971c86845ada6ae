//! The logs: raw envelopes (ingress → normalizer), normalized events (normalizer → projector
//! and analytics) and dead letters. Backends implement the traits here; the embedded one is
//! [`sqlite`].

pub mod kafka;
pub mod sqlite;
mod wal;

use async_trait::async_trait;

use crate::event::{DeadLetter, DeliveryEvent, RawEnvelope};

/// Position in a log; the first record is 1, "nothing read yet" is 0.
pub type Offset = i64;

#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    pub offset: Offset,
    pub value: T,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot take writes now (disk full, locked, broker down, timed out). Ingress maps
    /// this to 503 so the ESP retries.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// A stored record cannot be decoded: a bug or foreign data, never silently skipped.
    #[error("log record {offset} is corrupt: {message}")]
    Corrupt { offset: Offset, message: String },
}

/// What the normalizer produced for envelopes up to `upto`, committed atomically with its
/// checkpoint (so a crash never double-normalizes or skips an envelope).
#[derive(Debug, Default)]
pub struct NormalizedBatch {
    pub upto: Offset,
    pub events: Vec<(Offset, DeliveryEvent)>,
    pub dead_letters: Vec<(Offset, DeadLetter)>,
}

/// Filters of `GET /api/v1/events`.
#[derive(Debug, Default, Clone)]
pub struct EventQuery {
    pub tenant: String,
    pub recipient: Option<String>,
    pub message_id: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Return events with an offset greater than this (pagination cursor).
    pub after: Offset,
    pub limit: usize,
}

#[async_trait]
pub trait EnvelopeLog: Send + Sync {
    /// Appends and returns once the envelope is durable.
    async fn append(&self, envelope: &RawEnvelope) -> Result<Offset, LogError>;

    /// Where an appended envelope landed, as the webhook's answer shows it: the partition (on a
    /// partitioned log) and the offset in it.
    fn locate(&self, offset: Offset) -> (Option<i32>, i64) {
        (None, offset)
    }
}

#[async_trait]
pub trait NormalizerLog: Send + Sync {
    async fn normalizer_checkpoint(&self) -> Result<Offset, LogError>;
    /// Offset of the last appended envelope.
    async fn envelope_head(&self) -> Result<Offset, LogError>;
    async fn read_envelopes(
        &self,
        after: Offset,
        max: usize,
    ) -> Result<Vec<Record<RawEnvelope>>, LogError>;
    async fn commit_normalized(&self, batch: NormalizedBatch) -> Result<(), LogError>;
    /// Resolves when new envelopes may be there (or after a poll interval).
    async fn envelopes_appended(&self);
}

#[async_trait]
pub trait EventLog: Send + Sync {
    async fn read_events(
        &self,
        after: Offset,
        max: usize,
    ) -> Result<Vec<Record<DeliveryEvent>>, LogError>;
    async fn head(&self) -> Result<Offset, LogError>;
    /// The first offset at or after a time (ms), for `rebuild --from-time`.
    async fn offset_at(&self, time_ms: i64) -> Result<Offset, LogError>;
    /// Resolves when new events may be there (or after a poll interval).
    async fn events_appended(&self);
}

/// `GET /api/v1/events`: an index on the embedded log, a bounded scan on Kafka.
#[async_trait]
pub trait EventSearch: Send + Sync {
    async fn query_events(&self, q: EventQuery) -> Result<Vec<Record<DeliveryEvent>>, LogError>;
}

/// How far behind a stage is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageLag {
    /// Records written but not yet processed by the stage.
    pub records: i64,
    /// Receive time of the oldest of them, when known.
    pub oldest_received_at_ms: Option<i64>,
}

/// Lags of the normalizer and the projector, and the events log's head, for `/metrics` and
/// [`crate::app::Running::lag`].
#[async_trait]
pub trait LagProbe: Send + Sync {
    async fn normalizer(&self) -> Result<StageLag, LogError>;
    async fn projector(&self) -> Result<StageLag, LogError>;
    /// Records in the events log (all partitions).
    async fn events_written(&self) -> Result<i64, LogError>;
}

#[async_trait]
pub trait DeadLetterLog: Send + Sync {
    async fn dead_letters(
        &self,
        after: Offset,
        limit: usize,
    ) -> Result<Vec<Record<DeadLetter>>, LogError>;
    async fn dead_letter_counts(&self) -> Result<Vec<(String, String, u64)>, LogError>;
}
