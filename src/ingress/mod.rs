//! Ingress: the HTTP face of the pipeline (hyper 1.x). Webhooks are verified over their raw
//! bytes and appended to the log before any 2xx; the read and admin APIs sit behind a
//! per-client rate limiter (webhook routes are exempt: ESPs burst and must never be throttled).

// Handlers return early with a ready response as their `Err`; it is built once per request,
// so its size does not matter.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod api;
pub mod http;
pub mod ratelimit;
pub mod webhook;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::log::{DeadLetterLog, EnvelopeLog, EventSearch, LagProbe};
use crate::projection::ProjectionStore;
use crate::providers::{Provider, ReplayGuard};
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use crate::tenants::TenantDirectory;
use http::Resp;

/// Everything a request handler needs.
pub struct AppState {
    pub providers: HashMap<&'static str, Arc<dyn Provider>>,
    pub tenants: Arc<TenantDirectory>,
    pub envelopes: Arc<dyn EnvelopeLog>,
    /// Lags of the stages, for `/metrics`.
    pub lag: Arc<dyn LagProbe>,
    /// `GET /api/v1/events`.
    pub events: Arc<dyn EventSearch>,
    pub dead_letters: Arc<dyn DeadLetterLog>,
    pub projections: Arc<dyn ProjectionStore>,
    /// The providers' shared replay guard, to give back tokens of requests not accepted.
    pub replay_guard: Arc<dyn ReplayGuard>,
    pub limiter: ratelimit::Limiter,
    /// Key the rate limiter on `X-Forwarded-For` (only behind a proxy that sets it).
    pub trust_forwarded_for: bool,
    pub admin_token: Option<Secret>,
    pub max_body_bytes: usize,
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// False until the stages run, and again from the moment shutdown starts.
    pub ready: AtomicBool,
    /// The stages this process runs: webhooks and the APIs are served by ingress only (the
    /// other roles answer probes and `/metrics`).
    pub role: crate::config::Role,
}

/// The client a request is rate limited as: the peer, or, behind a trusted proxy, the
/// left-most address of `X-Forwarded-For`.
fn client_ip(state: &AppState, peer: SocketAddr, req: &Request<Incoming>) -> std::net::IpAddr {
    if state.trust_forwarded_for {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        if let Some(ip) = forwarded
            .and_then(|v| v.split(',').next())
            .and_then(|s| s.trim().parse().ok())
        {
            return ip;
        }
    }
    peer.ip()
}

/// Routes one request.
pub async fn handle(state: Arc<AppState>, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let segs = http::segments(&path);
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    if !state.role.runs_ingress() && matches!(segs.first(), Some(&"api")) {
        return http::not_found(format!(
            "this process runs the {} role: webhooks and the APIs are served by the ingress role",
            state.role.as_str()
        ));
    }
    match segs.as_slice() {
        ["api", "webhook", "email", provider] => webhook::handle(&state, provider, None, req).await,
        ["api", "webhook", "email", provider, tenant] => webhook::handle(&state, provider, Some(tenant), req).await,
        ["metrics"] => metrics(&state).await,
        ["healthz"] => http::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        ["readyz"] => {
            if state.ready.load(Ordering::Relaxed) {
                http::json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            } else {
                http::error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "starting up or shutting down")
            }
        }
        ["api", "v1", rest @ ..] => match state.limiter.check(client_ip(&state, peer, &req)) {
            Err(r) => r,
            Ok(()) => api::handle(&state, rest, req).await,
        },
        ["api", "admin", rest @ ..] => match state.limiter.check(client_ip(&state, peer, &req)) {
            Err(r) => r,
            Ok(()) => admin::handle(&state, rest, req).await,
        },
        _ => http::not_found(format!(
            "no route {} {path}; webhooks are POST /api/webhook/email/{{provider}}, the read API is under /api/v1/",
            req.method()
        )),
    }
}

/// `GET /metrics`: counters as they stand, lags computed now.
async fn metrics(state: &AppState) -> Resp {
    let m = &state.metrics;
    let now = chrono::Utc::now().timestamp_millis();
    let age = |records: i64, received_at_ms: Option<i64>| {
        if records == 0 {
            return Some(0.0);
        }
        received_at_ms.map(|t| (now - t).max(0) as f64 / 1000.0)
    };
    if let Ok(l) = state.lag.normalizer().await {
        m.set_lag(
            "normalizer",
            l.records,
            age(l.records, l.oldest_received_at_ms),
        );
    }
    if let Ok(l) = state.lag.projector().await {
        m.set_lag(
            "projector",
            l.records,
            age(l.records, l.oldest_received_at_ms),
        );
    }
    if let Ok(head) = state.lag.events_written().await {
        m.events_log_head.set(head);
    }
    if let Ok(gens) = state.projections.generations().await {
        for g in gens {
            for (partition, checkpoint) in &g.checkpoints {
                let l = crate::telemetry::GenerationLabels {
                    generation: g.generation.to_string(),
                    partition: partition.to_string(),
                };
                m.generation_checkpoint.get_or_create(&l).set(*checkpoint);
            }
        }
    }
    for p in state.providers.values() {
        if let Some(r) = p.sns_confirmations() {
            let c = r.counters;
            for (outcome, n) in [
                ("confirmed", c.confirmed),
                ("already_confirmed", c.already_confirmed),
                ("failed", c.confirm_failed),
                ("unsubscribe_not_confirmed", c.unsubscribe_not_confirmed),
            ] {
                let l = crate::telemetry::OutcomeLabels {
                    outcome: outcome.to_string(),
                };
                m.sns_confirmations.get_or_create(&l).set(n as i64);
            }
        }
    }
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(m.encode())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

/// Serves until shutdown, then stops accepting, lets in-flight requests finish (bounded by
/// `drain`), and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: Shutdown,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conn_builder = http1::Builder::new();
    conn_builder.keep_alive(true).max_buf_size(1 << 20);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        spawn_connection(&conn_builder, &graceful, &state, stream, peer);
    }
    state.ready.store(false, Ordering::Relaxed);
    // Clients already queued in the kernel's backlog have connected: serve them too, or they
    // would be reset without an answer when the listener closes.
    while let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await
    {
        spawn_connection(&conn_builder, &graceful, &state, stream, peer);
    }
    drop(listener);
    // hyper treats a connection that has not sent its request yet as idle and closes it on
    // graceful shutdown; give the ones accepted a moment ago time to send theirs.
    tokio::time::sleep(LINGER.min(drain)).await;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "in-flight requests did not finish in time");
    }
}

/// How long freshly accepted connections get to send their request once shutdown starts.
const LINGER: Duration = Duration::from_millis(500);

fn spawn_connection(
    builder: &http1::Builder,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    state: &Arc<AppState>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let state = state.clone();
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, peer, req).await) }
    });
    let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// The methods a route answers, for 405s.
pub(crate) fn require(method: &Method, allowed: &Method, allow: &'static str) -> Result<(), Resp> {
    if method == allowed {
        Ok(())
    } else {
        Err(http::method_not_allowed(allow))
    }
}
