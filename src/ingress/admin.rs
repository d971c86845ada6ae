//! The admin API (`/api/admin/...`), authenticated by the admin token: tenants and their
//! credentials (the counterpart of XSender → Settings → Email Settings), dead letters and
//! projection generations. Credentials go in, never out.

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::http::{self, Resp};
use super::AppState;
use crate::tenants::{Tenant, TenantConfig, TenantError};

const MAX_ADMIN_BODY: usize = 64 * 1024;

fn tenant_json(t: &Tenant) -> Value {
    json!({
        "id": t.id,
        "providers": t.provider_names().collect::<Vec<_>>(),
        "has_api_token": t.config.api_token.is_some(),
    })
}

fn authorize(state: &AppState, req: &Request<Incoming>) -> Result<(), Resp> {
    let Some(admin) = &state.admin_token else {
        return Err(http::error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is off: start the server with --admin-token or XSENDER_ADMIN_TOKEN",
        ));
    };
    match http::bearer(req.headers()) {
        Some(t) if admin.matches(t.as_bytes()) => Ok(()),
        Some(_) => Err(http::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin token is not valid",
        )),
        None => Err(http::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send 'Authorization: Bearer <admin token>'",
        )),
    }
}

fn tenant_error(e: TenantError) -> Resp {
    match e {
        TenantError::Store(m) => {
            tracing::error!(error = %m, "tenant store failed");
            http::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "tenant store unavailable; retry",
            )
        }
        other => http::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tenant",
            other.to_string(),
        ),
    }
}

pub async fn handle(state: &AppState, rest: &[&str], req: Request<Incoming>) -> Resp {
    if let Err(r) = authorize(state, &req) {
        return r;
    }
    let method = req.method().clone();
    match (rest, &method) {
        (["tenants"], &Method::GET) => {
            let snap = state.tenants.snapshot();
            let items: Vec<Value> = snap.iter().map(|t| tenant_json(t)).collect();
            http::json(StatusCode::OK, &json!({ "items": items }))
        }
        (["tenants"], _) => http::method_not_allowed("GET"),
        (["tenants", id], &Method::GET) => match state.tenants.snapshot().get(id) {
            Some(t) => http::json(StatusCode::OK, &tenant_json(t)),
            None => http::not_found(format!("no tenant '{id}'")),
        },
        (["tenants", id], &Method::PUT) => {
            let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return http::error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        "tenant body over 64 KiB",
                    )
                }
            };
            let cfg: TenantConfig = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => {
                    return http::error(
                        StatusCode::BAD_REQUEST,
                        "malformed",
                        format!("body must be a JSON object like {{\"api_token\": \"…\", \"sendgrid\": {{\"verification_key\": \"…\"}}}}: {e}"),
                    )
                }
            };
            let existed = state.tenants.snapshot().get(id).is_some();
            match state.tenants.put(id, cfg).await {
                Ok(()) => {
                    tracing::info!(tenant = %id, "tenant saved through the admin API");
                    let snap = state.tenants.snapshot();
                    let status = if existed {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    };
                    http::json(
                        status,
                        &snap.get(id).map(|t| tenant_json(t)).unwrap_or(Value::Null),
                    )
                }
                Err(e) => tenant_error(e),
            }
        }
        (["tenants", id], &Method::DELETE) => match state.tenants.delete(id).await {
            Ok(true) => http::json(StatusCode::OK, &json!({"deleted": id})),
            Ok(false) => http::not_found(format!("no tenant '{id}'")),
            Err(e) => tenant_error(e),
        },
        (["tenants", _], _) => http::method_not_allowed("GET, PUT, DELETE"),
        (["dead-letters"], &Method::GET) => {
            let q = http::query_pairs(req.uri().query());
            let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
            let after = get("after").and_then(|s| s.parse().ok()).unwrap_or(0);
            let limit = get("limit")
                .and_then(|s| s.parse().ok())
                .unwrap_or(100usize)
                .clamp(1, 1000);
            let (items, counts) = match (
                state.dead_letters.dead_letters(after, limit).await,
                state.dead_letters.dead_letter_counts().await,
            ) {
                (Ok(i), Ok(c)) => (i, c),
                (Err(e), _) | (_, Err(e)) => {
                    return http::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "log_unavailable",
                        e.to_string(),
                    )
                }
            };
            let items: Vec<Value> = items
                .iter()
                .map(|r| json!({"seq": r.offset, "provider": r.value.provider, "reason": r.value.reason, "detail": r.value.detail, "item": r.value.item, "envelope_id": r.value.envelope_id, "received_at": http::time(Some(r.value.received_at_ms))}))
                .collect();
            let counts: Vec<Value> = counts
                .iter()
                .map(|(p, r, n)| json!({"provider": p, "reason": r, "count": n}))
                .collect();
            http::json(StatusCode::OK, &json!({"items": items, "counts": counts}))
        }
        (["projections"], &Method::GET) => match state.projections.generations().await {
            Ok(g) => {
                // `checkpoint` is log partition 0's (the embedded log), kept for compatibility;
                // `checkpoints` has every partition's, keyed by partition number.
                let items: Vec<Value> = g
                    .iter()
                    .map(|g| {
                        json!({
                            "generation": g.generation,
                            "checkpoint": g.checkpoints.get(&0).copied().unwrap_or(0),
                            "checkpoints": g.checkpoints,
                            "current": g.current,
                        })
                    })
                    .collect();
                http::json(StatusCode::OK, &json!({"generations": items}))
            }
            Err(e) => http::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
        },
        (["sns-confirmations"], &Method::GET) => {
            // Newest first across the SNS-fed adapters (today: ses).
            let mut items = Vec::new();
            let mut counters = serde_json::Map::new();
            for (name, p) in &state.providers {
                if let Some(r) = p.sns_confirmations() {
                    items.extend(r.items.into_iter().map(|c| (name, c)));
                    counters.insert(name.to_string(), json!(r.counters));
                }
            }
            items.sort_by_key(|(_, c)| std::cmp::Reverse(c.at_ms));
            let items: Vec<Value> = items
                .iter()
                .map(|(p, c)| json!({"provider": p, "type": c.message_type, "topic_arn": c.topic_arn, "tenants": c.tenants, "time": http::time(Some(c.at_ms)), "outcome": c.outcome, "detail": c.detail, "message_id": c.message_id}))
                .collect();
            http::json(
                StatusCode::OK,
                &json!({"items": items, "counters": counters}),
            )
        }
        (["sns-confirmations"], _) => http::method_not_allowed("GET"),
        _ => http::not_found(
            "unknown admin route: tenants[/{id}], dead-letters, projections, sns-confirmations",
        ),
    }
}
