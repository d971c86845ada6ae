//! `POST /api/webhook/email/{provider}[/{tenant}]`: check, verify over the raw bytes, append
//! the envelope durably, and only then answer 2xx. Every refusal says what to fix and writes
//! nothing; a log that cannot take the write gets 503 so the ESP retries.

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use rand::RngCore;
use tracing::Instrument;

use super::http::{self, Resp};
use super::{require, AppState};
use crate::event::RawEnvelope;
use crate::providers::{Rejection, WebhookRequest, PLANNED};

pub async fn handle(
    state: &AppState,
    provider_name: &str,
    route_tenant: Option<&str>,
    req: Request<Incoming>,
) -> Resp {
    // Label cardinality stays bounded: unknown provider names are counted together.
    let label = if state.providers.contains_key(provider_name) {
        provider_name
    } else {
        "unknown"
    };
    let mut bytes = 0usize;
    let span = tracing::info_span!(
        "webhook",
        provider = label,
        tenant = tracing::field::Empty,
        outcome = tracing::field::Empty,
        events = tracing::field::Empty,
        bytes = tracing::field::Empty,
    );
    let result = accept(state, provider_name, route_tenant, req, &mut bytes)
        .instrument(span.clone())
        .await;
    span.record("bytes", bytes);
    span.record(
        "outcome",
        match &result {
            Ok(r) if r.status().is_success() => "accepted",
            Ok(_) => "method_not_allowed",
            Err(rej) => rej.code,
        },
    );
    match result {
        Ok(r) => {
            state.metrics.request(
                label,
                if r.status().is_success() {
                    "accepted"
                } else {
                    "method_not_allowed"
                },
                bytes,
            );
            r
        }
        Err(rej) => {
            state.metrics.request(label, rej.code, bytes);
            tracing::info!(provider = provider_name, code = rej.code, status = rej.status.as_u16(), reason = %rej.message, "webhook refused");
            let r = http::error(rej.status, rej.code, rej.message);
            if rej.status == StatusCode::SERVICE_UNAVAILABLE {
                http::with_header(r, "retry-after", "5")
            } else {
                r
            }
        }
    }
}

async fn accept(
    state: &AppState,
    provider_name: &str,
    route_tenant: Option<&str>,
    req: Request<Incoming>,
    bytes: &mut usize,
) -> Result<Resp, Rejection> {
    let Some(provider) = state.providers.get(provider_name) else {
        let known: Vec<&str> = state.providers.keys().copied().collect();
        let msg = if PLANNED.contains(&provider_name) {
            format!(
                "the {provider_name} adapter is not available in this version yet (available: {})",
                known.join(", ")
            )
        } else {
            format!(
                "unknown provider '{provider_name}' (available: {})",
                known.join(", ")
            )
        };
        return Err(Rejection::new(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            msg,
        ));
    };
    if let Err(r) = require(req.method(), &Method::POST, "POST") {
        return Ok(r);
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let essence = content_type.as_deref().map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    if !essence
        .as_deref()
        .is_some_and(|e| provider.content_types().contains(&e))
    {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "{} webhooks are {}; got {}",
                provider.name(),
                provider.content_types().join(" or "),
                content_type.as_deref().unwrap_or("no Content-Type")
            ),
        ));
    }
    let too_large = || {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "body exceeds the {} byte limit (--max-body-bytes)",
                state.max_body_bytes
            ),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.max_body_bytes).collect().await {
        Ok(b) => {
            let b = b.to_bytes();
            *bytes = b.len();
            b
        }
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(too_large())
        }
        Err(e) => {
            return Err(Rejection::malformed(format!(
                "could not read the request body: {e}"
            )))
        }
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let tenants = state.tenants.snapshot();
    let wreq = WebhookRequest {
        headers: &parts.headers,
        body: &body,
        route_tenant,
        now_ms,
    };
    let verified = provider.verify(&wreq, &tenants).await?;
    let span = tracing::Span::current();
    span.record("tenant", verified.tenants.join(",").as_str());
    span.record("events", verified.items);

    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let envelope = RawEnvelope {
        trace_parent: crate::telemetry::current_traceparent(),
        id: hex::encode(id),
        provider: provider.name().to_string(),
        received_at_ms: now_ms,
        verified_tenants: verified.tenants.clone(),
        default_tenant: verified.default_tenant.clone(),
        content_type,
        body: body.to_vec(),
    };
    let started = std::time::Instant::now();
    let appended = state.envelopes.append(&envelope).await;
    state
        .metrics
        .append_seconds
        .observe(started.elapsed().as_secs_f64());
    match appended {
        Ok(offset) => Ok(http::json(StatusCode::OK, &{
            let mut answer = serde_json::json!({"status": "accepted", "id": envelope.id, "items": verified.items});
            let (partition, offset) = state.envelopes.locate(offset);
            answer["offset"] = offset.into();
            if let Some(p) = partition {
                answer["partition"] = p.into();
            }
            answer
        })),
        Err(e) => {
            tracing::error!(error = %e, provider = provider.name(), "log append failed; answering 503");
            if let Some(claim) = &verified.replay_claim {
                state.replay_guard.release(claim.scope, &claim.token).await;
            }
            Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                "the event log cannot take writes right now; nothing was accepted, retry later",
            ))
        }
    }
}
