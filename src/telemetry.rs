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
    /// Log partition (the embedded log is 0).
    pub partition: String,
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
    /// Last event folded so far into each generation per log partition (a rebuild's progress),
    /// and the log head.
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
            "Last event folded into each projection generation, per log partition (rebuild progress)",
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

    /// `seconds` is the age of the oldest record not yet processed, when the log can tell
    /// cheaply (the embedded one can; on Kafka only the record count is reported).
    pub fn set_lag(&self, stage: &str, records: i64, seconds: Option<f64>) {
        let l = StageLabels {
            stage: stage.to_string(),
            partition: "0".to_string(),
        };
        self.lag_records.get_or_create(&l).set(records);
        if let Some(s) = seconds {
            self.lag_seconds.get_or_create(&l).set(s);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Tracing: `tracing` spans, exported over OTLP when the standard `OTEL_*` variables ask for it.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("flushing traces failed: {e}");
            }
        }
    }
}

/// OTLP export is on when an endpoint is configured the standard way, unless the SDK is
/// disabled or the traces exporter set to `none`.
fn otlp_requested() -> bool {
    let set = |k: &str| {
        std::env::var(k)
            .map(|v| !v.trim().is_empty())
            .unwrap_or(false)
    };
    let is = |k: &str, v: &str| {
        std::env::var(k)
            .map(|x| x.trim().eq_ignore_ascii_case(v))
            .unwrap_or(false)
    };
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// Installs logging (text or JSON lines on stderr, `RUST_LOG` filter, default `info`) and, when
/// requested by `OTEL_*`, OTLP/HTTP trace export (endpoint, headers, timeout, sampler and
/// `OTEL_SERVICE_NAME` are read by the OpenTelemetry SDK from the same variables).
pub fn init_tracing(json: bool) -> TracingGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let provider = if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                    resource = resource.with_service_name("xsender-events");
                }
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.build())
                        .build(),
                )
            }
            Err(e) => {
                eprintln!("OTLP trace export requested but not available: {e}");
                None
            }
        }
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("xsender-events")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    TracingGuard { provider }
}

/// The W3C `traceparent` of the current span, when it is being exported.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span a stored `traceparent` names.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
    }
}
