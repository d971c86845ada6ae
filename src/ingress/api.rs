//! The per-tenant read API (`/api/v1/...`), authenticated by the tenant's bearer token. A
//! tenant can only ever see its own rows: every query is scoped by the tenant the token names.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::http::{self, Resp};
use super::{require, AppState};
use crate::event::DeliveryEvent;
use crate::fold::{ContactRow, DispatchRow, DispatchStatus, SuppressionRow};
use crate::log::EventQuery;
use crate::providers::normalize_email;
use crate::tenants::Tenant;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn tenant_of(state: &AppState, req: &Request<Incoming>) -> Result<Arc<Tenant>, Resp> {
    let token = http::bearer(req.headers()).ok_or_else(|| {
        http::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the tenant's API token as 'Authorization: Bearer <token>'",
        )
    })?;
    state
        .tenants
        .snapshot()
        .by_api_token(token)
        .cloned()
        .ok_or_else(|| {
            http::error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "API token is not valid for any tenant",
            )
        })
}

fn bad(message: impl Into<String>) -> Resp {
    http::error(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn internal(e: impl std::fmt::Display) -> Resp {
    tracing::error!(error = %e, "read failed");
    http::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the projection store is unavailable; retry shortly",
    )
}

struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    fn limit(&self) -> Result<usize, Resp> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(bad(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))),
            },
        }
    }
    fn cursor(&self) -> Result<Option<String>, Resp> {
        self.get("cursor")
            .map(http::decode_cursor)
            .transpose()
            .map_err(bad)
    }
}

pub fn dispatch_json(r: &DispatchRow) -> Value {
    json!({
        "dispatch_id": r.dispatch_id,
        "dispatch_key": r.dispatch_key,
        "campaign_id": r.campaign_id,
        "message_id": r.message_id,
        "email": r.email,
        "status": r.status.as_str(),
        "delivered_at": http::time(r.delivered_at_ms),
        "opened_at": http::time(r.opened_at_ms),
        "clicked_at": http::time(r.clicked_at_ms),
        "opens": r.opens,
        "machine_opens": r.machine_opens,
        "first_machine_open_at": http::time(r.first_machine_open_at_ms),
        "clicks": r.clicks,
        "bot_clicks": r.bot_clicks,
        "last_click_url": r.last_click.as_ref().map(|(_, u)| u),
        "last_click_at": http::time(r.last_click.as_ref().map(|(t, _)| *t)),
        "bounce": r.bounce.as_ref().map(|b| json!({
            "class": b.class.as_str(), "reason": b.reason, "smtp_status": b.smtp_status, "at": http::time(Some(b.at_ms)),
        })),
        "bounce_reason": r.bounce.as_ref().and_then(|b| b.reason.clone()),
        "complained_at": http::time(r.complaint.as_ref().map(|c| c.at_ms)),
        "complaint_reason": r.complaint.as_ref().and_then(|c| c.value.clone()),
        "drop_reason": r.drop.as_ref().and_then(|d| d.value.clone()),
        "events": r.events,
    })
}

fn suppression_json(s: &SuppressionRow) -> Value {
    json!({"email": s.email, "reason": s.reason.as_str(), "since": http::time(Some(s.since_ms)), "dispatch_key": s.dispatch_key, "provider": s.provider})
}

fn contact_json(email: &str, c: Option<&ContactRow>) -> Value {
    let groups: Vec<Value> = c
        .map(|c| {
            c.groups
                .iter()
                .map(|(g, (at, unsub))| json!({"group_id": g, "unsubscribed": unsub, "changed_at": http::time(Some(*at))}))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "email": email,
        "unsubscribed": c.is_some_and(|c| c.unsubscribed_at_ms.is_some()),
        "unsubscribed_at": http::time(c.and_then(|c| c.unsubscribed_at_ms)),
        "groups": groups,
    })
}

pub fn event_json(offset: i64, e: &DeliveryEvent) -> Value {
    json!({
        "offset": offset,
        "event_key": e.event_key,
        "provider": e.provider,
        "kind": e.kind.as_str(),
        "provider_event": e.provider_event,
        "provider_event_id": e.provider_event_id,
        "dispatch_key": e.dispatch_key,
        "dispatch_id": e.dispatch_id,
        "campaign_id": e.campaign_id,
        "message_id": e.message_id,
        "recipient": e.recipient,
        "occurred_at": http::time(Some(e.occurred_at_ms)),
        "received_at": http::time(Some(e.received_at_ms)),
        "bounce_class": e.bounce_class.map(|b| b.as_str()),
        "reason": e.reason,
        "smtp_status": e.smtp_status,
        "url": e.url,
        "user_agent": e.user_agent,
        "ip": e.ip,
        "machine": e.machine,
        "group_id": e.group_id,
    })
}

fn email_param(raw: &str) -> Result<String, Resp> {
    normalize_email(raw).ok_or_else(|| bad(format!("'{raw}' is not an email address")))
}

pub async fn handle(state: &AppState, rest: &[&str], req: Request<Incoming>) -> Resp {
    if let Err(r) = require(req.method(), &Method::GET, "GET") {
        return r;
    }
    let tenant = match tenant_of(state, &req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let params = Params(http::query_pairs(req.uri().query()));
    match route(state, &tenant.id, rest, &params).await {
        Ok(r) | Err(r) => r,
    }
}

async fn route(state: &AppState, tenant: &str, rest: &[&str], p: &Params) -> Result<Resp, Resp> {
    let store = &state.projections;
    match rest {
        ["campaigns", campaign, "recipients"] => {
            let status = p
                .get("status")
                .map(|s| {
                    DispatchStatus::parse(s).ok_or_else(|| {
                        let all: Vec<_> = DispatchStatus::ALL.iter().map(|s| s.as_str()).collect();
                        bad(format!("unknown status '{s}' (one of {})", all.join(", ")))
                    })
                })
                .transpose()?;
            let limit = p.limit()?;
            let rows = store
                .recipients(crate::projection::RecipientsQuery {
                    tenant: tenant.to_string(),
                    campaign_id: campaign.to_string(),
                    status,
                    after: p.cursor()?,
                    limit,
                })
                .await
                .map_err(internal)?;
            let next = (rows.len() == limit).then(|| rows.last().map(|r| http::encode_cursor(&r.dispatch_key))).flatten();
            let items: Vec<Value> = rows.iter().map(dispatch_json).collect();
            Ok(http::json(StatusCode::OK, &json!({"items": items, "next_cursor": next})))
        }
        ["dispatches", id] => match store.dispatch(tenant, id).await.map_err(internal)? {
            Some(r) => Ok(http::json(StatusCode::OK, &dispatch_json(&r))),
            None => Err(http::not_found(format!("no dispatch '{id}' for this tenant (yet)"))),
        },
        ["suppressions"] => {
            let limit = p.limit()?;
            let after = p
                .cursor()?
                .map(|c| c.split_once('\n').map(|(e, r)| (e.to_string(), r.to_string())).ok_or_else(|| bad("cursor is not one this API returned")))
                .transpose()?;
            let rows = store.suppressions(tenant, after, limit).await.map_err(internal)?;
            let next = (rows.len() == limit)
                .then(|| rows.last().map(|r| http::encode_cursor(&format!("{}\n{}", r.email, r.reason.as_str()))))
                .flatten();
            let items: Vec<Value> = rows.iter().map(suppression_json).collect();
            Ok(http::json(StatusCode::OK, &json!({"items": items, "next_cursor": next})))
        }
        ["suppressions", email] => {
            let email = email_param(email)?;
            let rows = store.suppressions_of(tenant, &email).await.map_err(internal)?;
            if rows.is_empty() {
                return Err(http::not_found(format!("{email} is not suppressed")));
            }
            let reasons: Vec<Value> = rows.iter().map(suppression_json).collect();
            Ok(http::json(StatusCode::OK, &json!({"email": email, "suppressed": true, "reasons": reasons})))
        }
        ["contacts", email] => {
            let email = email_param(email)?;
            let c = store.contact(tenant, &email).await.map_err(internal)?;
            Ok(http::json(StatusCode::OK, &contact_json(&email, c.as_ref())))
        }
        ["events"] => {
            let limit = p.limit()?;
            let after = match p.cursor()? {
                Some(c) => c.parse::<i64>().map_err(|_| bad("cursor is not one this API returned"))?,
                None => 0,
            };
            let time = |k: &str| p.get(k).map(http::parse_time).transpose().map_err(bad);
            let q = EventQuery {
                tenant: tenant.to_string(),
                recipient: p.get("recipient").map(email_param).transpose()?,
                message_id: p.get("message_id").map(str::to_string),
                since_ms: time("since")?,
                until_ms: time("until")?,
                after,
                limit,
            };
            let rows = state.events.query_events(q).await.map_err(internal)?;
            let next = (rows.len() == limit).then(|| rows.last().map(|r| http::encode_cursor(&r.offset.to_string()))).flatten();
            let items: Vec<Value> = rows.iter().map(|r| event_json(r.offset, &r.value)).collect();
            Ok(http::json(StatusCode::OK, &json!({"items": items, "next_cursor": next})))
        }
        _ => Err(http::not_found(
            "unknown read API route; see README: campaigns/{id}/recipients, dispatches/{id}, suppressions[/{email}], contacts/{email}, events",
        )),
    }
}
