//! Projector: folds events from the events log into the projection store; the store moves its
//! checkpoint in the same transaction as the state, so a kill at any point loses or doubles
//! nothing.

use std::sync::Arc;

use crate::event::DeliveryEvent;
use crate::log::{EventLog, Record};
use crate::projection::{Batch, ProjectionStore, StoreError};
use crate::shutdown::Shutdown;

/// One step: returns how many events were read (0 = caught up). The embedded log is a single
/// sequence: log partition 0 of the store's checkpoints.
pub async fn step(
    log: &dyn EventLog,
    store: &dyn ProjectionStore,
    batch_size: usize,
) -> anyhow::Result<usize> {
    let cp = store.checkpoint().await?;
    let events = log.read_events(cp, batch_size).await?;
    let n = events.len();
    if n > 0 {
        let spans = spans(events.iter(), n);
        let result = store.apply(Batch::single(0, events)).await;
        drop(spans);
        match result {
            // A rebuild switched generations between our read and write: read again.
            Err(StoreError::Gap { .. }) => return Ok(1),
            other => other?,
        }
    }
    Ok(n)
}

/// One span per traced request in a batch, each a child of the normalize span that produced
/// its events, covering the write that folds them (drop them when it is done).
pub(crate) fn spans<'a>(
    events: impl Iterator<Item = &'a Record<DeliveryEvent>>,
    batch: usize,
) -> Vec<tracing::Span> {
    let mut traced: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in events {
        if let Some(tp) = e.value.trace_parent.as_deref() {
            *traced.entry(tp).or_default() += 1;
        }
    }
    traced
        .into_iter()
        .map(|(tp, count)| {
            let span = tracing::info_span!("project", events = count, batch);
            crate::telemetry::set_parent(&span, Some(tp));
            span
        })
        .collect()
}

pub async fn run(
    log: Arc<dyn EventLog>,
    store: Arc<dyn ProjectionStore>,
    batch_size: usize,
    mut shutdown: Shutdown,
) {
    loop {
        if shutdown.is_shutdown() {
            return;
        }
        match step(log.as_ref(), store.as_ref(), batch_size).await {
            Ok(0) => tokio::select! {
                _ = log.events_appended() => {}
                _ = shutdown.wait() => return,
            },
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "projector step failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(super::RETRY) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
}
