//! Normalizer: raw envelopes → delivery events and dead letters, committed with its checkpoint.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::RawEnvelope;
use crate::log::{NormalizedBatch, NormalizerLog, Record};
use crate::providers::{dead, Normalized, Provider};
use crate::shutdown::Shutdown;
use crate::telemetry::{DeadLetterLabels, EventLabels, Metrics};

pub struct Normalizer {
    providers: HashMap<&'static str, Arc<dyn Provider>>,
    metrics: Arc<Metrics>,
}

impl Normalizer {
    pub fn new(providers: &[Arc<dyn Provider>], metrics: Arc<Metrics>) -> Self {
        Normalizer {
            providers: providers.iter().map(|p| (p.name(), p.clone())).collect(),
            metrics,
        }
    }

    /// Tallies what a batch produced; applied with [`Normalizer::count`] only after the commit,
    /// so a batch retried after a failed commit is not counted twice.
    pub(crate) fn tally(
        batch: &NormalizedBatch,
    ) -> (HashMap<EventLabels, u64>, HashMap<DeadLetterLabels, u64>) {
        let mut events = HashMap::new();
        for (_, e) in &batch.events {
            let l = EventLabels {
                provider: e.provider.clone(),
                kind: e.kind.as_str().to_string(),
            };
            *events.entry(l).or_insert(0) += 1;
        }
        let mut dead = HashMap::new();
        for (_, d) in &batch.dead_letters {
            let l = DeadLetterLabels {
                provider: d.provider.clone(),
                reason: d.reason.clone(),
            };
            *dead.entry(l).or_insert(0) += 1;
        }
        (events, dead)
    }

    pub(crate) fn count(
        &self,
        (events, dead): (HashMap<EventLabels, u64>, HashMap<DeadLetterLabels, u64>),
    ) {
        for (l, n) in events {
            self.metrics.events.get_or_create(&l).inc_by(n);
        }
        for (l, n) in dead {
            self.metrics.dead_letters.get_or_create(&l).inc_by(n);
        }
    }

    /// Pure: what a batch of envelopes becomes.
    pub fn normalize(&self, records: &[Record<RawEnvelope>]) -> NormalizedBatch {
        let mut batch = NormalizedBatch {
            upto: records.last().map(|r| r.offset).unwrap_or(0),
            ..Default::default()
        };
        for rec in records {
            // A span per traced envelope, joined to its request's trace; untraced envelopes
            // (export off) cost nothing here.
            let span = rec.value.trace_parent.as_deref().map(|tp| {
                let span = tracing::info_span!("normalize", provider = %rec.value.provider, envelope = %rec.value.id, events = tracing::field::Empty);
                crate::telemetry::set_parent(&span, Some(tp));
                span
            });
            let _entered = span.as_ref().map(|s| s.enter());
            let trace_parent = span
                .as_ref()
                .and_then(|_| crate::telemetry::current_traceparent());
            let before = batch.events.len();
            let items = match self.providers.get(rec.value.provider.as_str()) {
                Some(p) => p.normalize(&rec.value),
                None => vec![dead(
                    &rec.value,
                    "unknown_provider",
                    format!("no adapter named '{}' in this build", rec.value.provider),
                    String::new(),
                )],
            };
            for item in items {
                match item {
                    Normalized::Event(mut e) => {
                        e.trace_parent.clone_from(&trace_parent);
                        batch.events.push((rec.offset, *e))
                    }
                    Normalized::Dead(d) => {
                        // The detail can quote the item (addresses): it stays in the
                        // dead-letter log, not in the logs.
                        tracing::warn!(provider = %d.provider, reason = %d.reason, envelope = %d.envelope_id, "dead letter");
                        batch.dead_letters.push((rec.offset, d))
                    }
                }
            }
            if let Some(span) = &span {
                span.record("events", batch.events.len() - before);
            }
        }
        batch
    }

    /// Runs until shutdown: read after the checkpoint, normalize, commit, repeat.
    pub async fn run(self, log: Arc<dyn NormalizerLog>, batch_size: usize, mut shutdown: Shutdown) {
        // Envelopes per step: up to `batch_size`, fewer while envelopes are large batches, so
        // one commit stays around TARGET_EVENTS events. The log's writer also takes webhook
        // appends, which wait behind a huge normalizer commit (256 SendGrid batches of 1000 are
        // 256,000 rows), and a step holds all its parsed bodies in memory at once. The first
        // step is small, before the size of the envelopes is known.
        const TARGET_EVENTS: usize = 2048;
        let batch_size = batch_size.max(1);
        let mut take = batch_size.min(8);
        loop {
            if shutdown.is_shutdown() {
                return;
            }
            let step = async {
                let cp = log.normalizer_checkpoint().await?;
                let records = log.read_envelopes(cp, take).await?;
                if records.is_empty() {
                    return Ok::<bool, crate::log::LogError>(false);
                }
                let batch = self.normalize(&records);
                let produced = batch.events.len() + batch.dead_letters.len();
                let per_envelope = produced.div_ceil(records.len()).max(1);
                take = (TARGET_EVENTS / per_envelope).clamp(1, batch_size);
                let tally = Self::tally(&batch);
                log.commit_normalized(batch).await?;
                self.count(tally);
                Ok(true)
            };
            match step.await {
                Ok(true) => {}
                Ok(false) => tokio::select! {
                    _ = log.envelopes_appended() => {}
                    _ = shutdown.wait() => return,
                },
                Err(e) => {
                    tracing::error!(error = %e, "normalizer step failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(super::RETRY) => {}
                        _ = shutdown.wait() => return,
                    }
                }
            }
        }
    }
}
