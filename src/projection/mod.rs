//! Projection stores: the fold's results (dispatch rows, suppressions, contacts) plus the
//! projector's checkpoint, kept in the same transaction. State is organised in *generations*:
//! the live projector writes the current one; `rebuild` fills a fresh one from the log and then
//! switches readers and the projector over atomically.

pub mod cql;
pub mod sqlite;

use async_trait::async_trait;

use crate::event::DeliveryEvent;
use crate::fold::{ContactRow, DispatchRow, DispatchStatus, SuppressionRow};
use crate::log::{Offset, Record};

pub type Generation = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("projection store unavailable: {0}")]
    Unavailable(String),
    /// The batch does not continue from the checkpoint (a rebuild switched generations under
    /// the projector): re-read from the checkpoint.
    #[error("batch starts at {first} but the checkpoint is {checkpoint}")]
    Gap { first: Offset, checkpoint: Offset },
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
    pub checkpoint: Offset,
    pub current: bool,
}

/// Reads the projection side of the log while the store holds its write lock, for the final
/// catch-up of a rebuild. Synchronous on purpose: it runs inside the store's transaction.
pub type TailReader<'a> =
    &'a (dyn Fn(Offset, usize) -> Result<Vec<Record<DeliveryEvent>>, String> + Sync);

#[async_trait]
pub trait ProjectionStore: Send + Sync {
    /// Checkpoint of the current generation: the last event offset folded into it.
    async fn checkpoint(&self) -> Result<Offset, StoreError>;
    /// Folds events (ascending offsets) into the current generation and moves its checkpoint,
    /// atomically. Events at or below the checkpoint are skipped.
    async fn apply(&self, events: Vec<Record<DeliveryEvent>>) -> Result<(), StoreError>;

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
    /// Creates empty tables for a new generation whose checkpoint is `start - 1`.
    async fn create_generation(&self, start: Offset) -> Result<Generation, StoreError>;
    /// Folds events into a (non-current) generation and moves its checkpoint.
    async fn apply_to(
        &self,
        generation: Generation,
        events: Vec<Record<DeliveryEvent>>,
    ) -> Result<(), StoreError>;
    /// Under the write lock: folds what `tail` still returns into `generation`, then makes it
    /// current. Readers switch at that commit.
    async fn switch_to(
        &self,
        generation: Generation,
        tail: Box<
            dyn Fn(Offset, usize) -> Result<Vec<Record<DeliveryEvent>>, String> + Send + Sync,
        >,
    ) -> Result<(), StoreError>;
    /// Drops every generation but the current one; returns what was dropped.
    async fn drop_old(&self) -> Result<Vec<Generation>, StoreError>;
}
