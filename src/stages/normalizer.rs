//! Normalizer: raw envelopes → delivery events and dead letters, committed with its checkpoint.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::RawEnvelope;
use crate::log::{NormalizedBatch, NormalizerLog, Record};
use crate::providers::{dead, Normalized, Provider};
use crate::shutdown::Shutdown;

pub struct Normalizer {
    providers: HashMap<&'static str, Arc<dyn Provider>>,
}

impl Normalizer {
    pub fn new(providers: &[Arc<dyn Provider>]) -> Self {
        Normalizer {
            providers: providers.iter().map(|p| (p.name(), p.clone())).collect(),
        }
    }

    /// Pure: what a batch of envelopes becomes.
    pub fn normalize(&self, records: &[Record<RawEnvelope>]) -> NormalizedBatch {
        let mut batch = NormalizedBatch {
            upto: records.last().map(|r| r.offset).unwrap_or(0),
            ..Default::default()
        };
        for rec in records {
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
                    Normalized::Event(e) => batch.events.push((rec.offset, *e)),
                    Normalized::Dead(d) => {
                        tracing::warn!(provider = %d.provider, reason = %d.reason, detail = %d.detail, "dead letter");
                        batch.dead_letters.push((rec.offset, d))
                    }
                }
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
                log.commit_normalized(batch).await?;
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
