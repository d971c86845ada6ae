//! Metrics (Prometheus text format at `GET /metrics`). One `Metrics` per running app, so two
//! servers in one test process never share counters. Counters are incremented where the thing
//! happens; lags are computed when scraped, from the logs' heads and the stages' checkpoints.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub provider: String,
    /// `accepted`, or the rejection code (`bad_signature`, `unknown_tenant`, `malformed`,
    /// `too_large`, `log_unavailable`, …).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub provider: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub provider: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenerationLabels {
    pub generation: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_bytes: Family<RequestLabels, Counter>,
    pub events: Family<EventLabels, Counter>,
    pub dead_letters: Family<DeadLetterLabels, Counter>,
    pub sns_confirmations: Family<OutcomeLabels, Gauge>,
    pub append_seconds: Histogram,
    pub lag_records: Family<StageLabels, Gauge>,
    pub lag_seconds: Family<StageLabels, Gauge<f64, AtomicU64>>,
    /// Events folded so far into each generation (a rebuild's progress), and the log head.
    pub generation_checkpoint: Family<GenerationLabels, Gauge>,
    pub events_log_head: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("xsender");
        let m = Metrics {
            requests: Family::default(),
            request_bytes: Family::default(),
            events: Family::default(),
            dead_letters: Family::default(),
            sns_confirmations: Family::default(),
            // 0.25 ms … ~4 s
            append_seconds: Histogram::new(exponential_buckets(0.00025, 2.0, 15)),
            lag_records: Family::default(),
            lag_seconds: Family::default(),
            generation_checkpoint: Family::default(),
            events_log_head: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "webhook_requests",
            "Webhook requests by provider and outcome",
            m.requests.clone(),
        );
        registry.register(
            "webhook_request_bytes",
            "Webhook body bytes by provider and outcome",
            m.request_bytes.clone(),
        );
        registry.register(
            "events",
            "Normalized events by provider and kind",
            m.events.clone(),
        );
        registry.register(
            "dead_letters",
            "Items dead-lettered by provider and reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "sns_confirmations",
            "SNS subscription handshakes by outcome",
            m.sns_confirmations.clone(),
        );
        registry.register(
            "log_append_seconds",
            "Time to make a webhook's envelope durable",
            m.append_seconds.clone(),
        );
        registry.register(
            "stage_lag_records",
            "Records a stage has yet to process",
            m.lag_records.clone(),
        );
        registry.register(
            "stage_lag_seconds",
            "Age of the oldest record a stage has yet to process",
            m.lag_seconds.clone(),
        );
        registry.register(
            "projection_generation_checkpoint",
            "Last event folded into each projection generation (rebuild progress)",
            m.generation_checkpoint.clone(),
        );
        registry.register(
            "events_log_head",
            "Offset of the last normalized event",
            m.events_log_head.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn request(&self, provider: &str, outcome: &str, bytes: usize) {
        let l = RequestLabels {
            provider: provider.to_string(),
            outcome: outcome.to_string(),
        };
        self.requests.get_or_create(&l).inc();
        self.request_bytes.get_or_create(&l).inc_by(bytes as u64);
    }

    pub fn set_lag(&self, stage: &str, records: i64, seconds: f64) {
        let l = StageLabels {
            stage: stage.to_string(),
            partition: "0".to_string(),
        };
        self.lag_records.get_or_create(&l).set(records);
        self.lag_seconds.get_or_create(&l).set(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
