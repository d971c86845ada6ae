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
        loop {
            if shutdown.is_shutdown() {
                return;
            }
            let step = async {
                let cp = log.normalizer_checkpoint().await?;
                let records = log.read_envelopes(cp, batch_size).await?;
                if records.is_empty() {
                    return Ok::<bool, crate::log::LogError>(false);
                }
                log.commit_normalized(self.normalize(&records)).await?;
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
