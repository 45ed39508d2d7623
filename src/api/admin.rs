//! Admin routes (`/api/{id}/v1/admin/...`, the formation's admin key): what the
//! console shows and does, open to scripts too. The formation's state, its
//! requests across all users (filtered), one request in full with its webhook
//! delivery and re-run links, and the actions: cancel, re-run, retry a delivery.
//!
//! Every route is scoped to the formation in the path: a request or delivery of
//! another formation answers 404, whichever key is given.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Role};
use super::extract::{Path, Query};
use super::params::{parse_limit, parse_status};
use super::{envelope, views, AppState};
use crate::error::{ApiError, ApiResult, Code};
use crate::store::{AdminQuery, Delivery, Mode, NewRequest, RequestRecord, Status};
use crate::time::rfc3339;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
/// The longest agent or user id a filter may name.
const MAX_FILTER_CHARS: usize = 256;
/// Timestamps accepted in `since` / `until`: 1970 to the end of year 9999 (ms).
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// `GET /admin/formation`: state, settings, agents, triggers, backlog.
pub async fn formation(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    let live = state.registry.snapshot();
    // A failed edit of this formation's file: the last valid version keeps serving.
    let failure = live.failures.iter().find(|f| f.still_serving.as_deref() == Some(&id) || f.file == formation.source);
    let backlog = state.engine.store().backlog(&id).await?;
    let overlord = &formation.overlord;
    let mut settings = serde_json::to_value(&overlord.async_).unwrap_or_default();
    if let Value::Object(map) = &mut settings {
        map.insert("webhook_secret_set".into(), json!(overlord.async_.webhook_secret.is_some()));
        map.insert("retry".into(), json!(overlord.retry));
        map.insert("timeouts".into(), json!(overlord.timeouts));
        map.insert("max_concurrent_requests".into(), json!(overlord.max_concurrent_requests));
    }
    let agents: Vec<Value> = formation
        .agents
        .iter()
        .map(|a| {
            let kind = serde_json::to_value(&a.kind).ok().and_then(|k| k.get("kind").cloned());
            json!({ "id": a.id, "name": a.name, "description": a.description, "default": a.default, "kind": kind })
        })
        .collect();
    let triggers: Vec<Value> = formation
        .triggers
        .values()
        .map(|t| {
            json!({ "name": t.name, "description": t.description, "agent_id": t.agent_id,
                    "async": t.use_async, "fields": t.fields })
        })
        .collect();
    Ok(envelope::ok(
        "admin.formation",
        None,
        None,
        json!({
            "id": formation.id,
            "version": formation.version,
            "revision": formation.revision,
            "description": formation.description,
            "file": formation.source,
            "state": if failure.is_some() { "serving_previous" } else { "serving" },
            "loaded_at": live.loaded_at.get(&id).copied().map(rfc3339),
            "reloaded_at": rfc3339(live.reloaded_at),
            "errors": failure.map(|f| f.errors.clone()).unwrap_or_default(),
            "async": settings,
            "agents": agents,
            "triggers": triggers,
            "queue_depth": backlog.pending,
            "running": backlog.processing,
        }),
    ))
}

/// The query of `GET /admin/requests`; every value arrives as text and is checked here.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    agent: Option<String>,
    user: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
}

/// Checks the list filters; the first bad one is answered `invalid_request`.
pub fn admin_query(formation_id: &str, params: ListParams) -> ApiResult<AdminQuery> {
    let bad = |message: String| ApiError::new(Code::InvalidRequest, message);
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let status = parse_status(params.status.as_deref())?;
    let text_filter = |name: &str, value: Option<String>| -> ApiResult<Option<String>> {
        match value.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
            Some(v) if v.chars().count() > MAX_FILTER_CHARS => {
                Err(bad(format!("`{name}` must be at most {MAX_FILTER_CHARS} characters")))
            }
            other => Ok(other),
        }
    };
    let since = parse_time("since", params.since.as_deref())?;
    let until = parse_time("until", params.until.as_deref())?;
    if let (Some(since), Some(until)) = (since, until) {
        if since >= until {
            return Err(bad("`since` must be before `until`".into()));
        }
    }
    Ok(AdminQuery {
        formation_id: formation_id.to_string(),
        status,
        agent_id: text_filter("agent", params.agent)?,
        user_id: text_filter("user", params.user)?,
        since,
        until,
        limit,
    })
}

/// A time filter: RFC 3339 (`2026-01-31T12:00:00Z`) or milliseconds since the epoch.
fn parse_time(name: &str, value: Option<&str>) -> ApiResult<Option<i64>> {
    let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else { return Ok(None) };
    let ms = match text.parse::<i64>() {
        Ok(ms) => Some(ms),
        Err(_) => chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_millis()),
    };
    match ms {
        Some(ms) if (0..=MAX_TIME_MS).contains(&ms) => Ok(Some(ms)),
        _ => Err(ApiError::new(
            Code::InvalidRequest,
            format!(
                "`{name}` must be an RFC 3339 time (2026-01-31T12:00:00Z) or milliseconds since 1970 up to year 9999; got `{text}`"
            ),
        )),
    }
}

/// `GET /admin/requests`: the formation's requests of every user, newest first.
pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    auth::authorize(&state, &id, &headers, Role::Admin)?;
    let query = admin_query(&id, params)?;
    let records = state.engine.store().admin_list(&query).await?;
    let requests: Vec<Value> = records.iter().map(views::request_status).collect();
    Ok(envelope::ok("admin.request.list", None, None, json!({ "requests": requests, "count": requests.len() })))
}

/// Any user's request of this formation, after checking the admin key.
async fn find(state: &AppState, formation_id: &str, headers: &HeaderMap, request_id: &str) -> ApiResult<RequestRecord> {
    auth::authorize(state, formation_id, headers, Role::Admin)?;
    let record = match state.engine.live(request_id) {
        Some(live) => Some(live.snapshot()),
        None => state.engine.store().get(request_id).await?,
    };
    record
        .filter(|r| r.formation_id == formation_id)
        .ok_or_else(|| ApiError::new(Code::RequestNotFound, format!("request `{request_id}` not found")))
}

/// A webhook delivery as the console shows it.
fn delivery_view(delivery: &Delivery) -> Value {
    json!({
        "id": delivery.id,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": (delivery.status == "pending").then(|| rfc3339(delivery.next_attempt_at)),
    })
}

/// `GET /admin/requests/{rid}`: the status document plus input, delivery and links.
pub async fn show(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    let store = state.engine.store();
    let delivery = store.delivery_of(&record.id).await?;
    let reruns = store.reruns(&record.id).await?;
    let mut data = views::request_status(&record);
    if let Value::Object(map) = &mut data {
        map.insert("input".into(), json!(record.message));
        map.insert("webhook_url".into(), json!(record.webhook_url));
        map.insert("delivery".into(), delivery.as_ref().map(delivery_view).unwrap_or(Value::Null));
        map.insert("rerun_of".into(), json!(reruns.rerun_of));
        map.insert("rerun_as".into(), json!(reruns.rerun_as));
    }
    Ok(envelope::ok("admin.request", Some(&record.id), None, data))
}

/// `GET /admin/requests/{rid}/events`: follow any user's request live (SSE).
pub async fn follow(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    Ok(super::events::follow_record(state, record))
}

/// `DELETE /admin/requests/{rid}`: cancel any user's request.
pub async fn cancel(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    super::requests::cancel_and_answer(&state, &record, "Request cancelled by an admin").await
}

/// `POST /admin/requests/{rid}/rerun`: a new request with the same input (user,
/// session, agent, message, webhook), run in the background and linked to the
/// original. Only failed or cancelled requests are re-run.
pub async fn rerun(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let original = find(&state, &id, &headers, &request_id).await?;
    if !matches!(original.status, Status::Failed | Status::Cancelled) {
        return Err(ApiError::new(
            Code::RequestNotRerunnable,
            format!(
                "request `{request_id}` is {}; only failed or cancelled requests can be re-run",
                original.status.as_str()
            ),
        ));
    }
    let formation = auth::formation(&state, &id)?;
    if formation.agent(Some(&original.agent_id)).is_none() {
        return Err(ApiError::new(
            Code::UnknownAgent,
            format!("formation `{id}` no longer has agent `{}`; the request cannot be re-run", original.agent_id),
        ));
    }
    if let Some(url) = &original.webhook_url {
        crate::webhooks::target::check_target(url, &state.allow_webhook_hosts).await?;
    }
    let estimate = state.engine.estimate(&formation, &original.agent_id, &original.message).await;
    let idempotency_key = auth::idempotency_key(&headers)?;
    let request = NewRequest {
        id: crate::store::time_ordered_id("req_"),
        formation_id: formation.id.clone(),
        formation_version: formation.version_label(),
        user_id: original.user_id.clone(),
        session_id: original.session_id.clone(),
        agent_id: original.agent_id.clone(),
        message: original.message.clone(),
        mode: Mode::Async,
        estimated_seconds: estimate.seconds,
        fingerprint: super::chat::fingerprint(
            idempotency_key.as_deref(),
            &original.agent_id,
            &original.message,
            original.session_id.as_deref(),
            original.webhook_url.as_deref(),
        ),
        idempotency_key,
        webhook_url: original.webhook_url.clone(),
        workflow_timeout_ms: i64::try_from(formation.overlord.timeouts.workflow().as_millis()).unwrap_or(i64::MAX),
        created_at: crate::time::now_ms(),
    };
    let new_id = request.id.clone();
    let record = state.engine.submit(formation, request, crate::engine::Start::Queue).await?.record;
    // An idempotency key may replay an earlier re-run: that one is linked already.
    if record.id == new_id {
        state.engine.store().link_rerun(&record.id, &original.id).await?;
    }
    let mut response = envelope::ok(
        "request.rerun",
        Some(&record.id),
        None,
        json!({
            "request_id": record.id,
            "rerun_of": original.id,
            "status": record.status.as_str(),
            "status_url": format!("/api/{id}/v1/admin/requests/{}", record.id),
        }),
    );
    *response.status_mut() = StatusCode::ACCEPTED;
    Ok(response)
}

/// `POST /admin/deliveries/{request_id}/retry`: try a request's pending or failed
/// webhook delivery again now (one more attempt, then the usual back-off).
pub async fn retry_delivery(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    let store = state.engine.store();
    let none = || ApiError::new(Code::DeliveryNotFound, format!("request `{request_id}` has no webhook delivery"));
    let current = store.delivery_of(&record.id).await?.ok_or_else(none)?;
    if current.status == "delivered" {
        return Err(ApiError::new(
            Code::DeliveryAlreadyDelivered,
            format!("the webhook of request `{request_id}` was already delivered"),
        ));
    }
    let delivery = store.retry_delivery(&record.id, crate::time::now_ms()).await?.ok_or_else(none)?;
    let mut response = envelope::ok(
        "delivery.retry",
        Some(&record.id),
        None,
        json!({ "request_id": record.id, "delivery": delivery_view(&delivery) }),
    );
    *response.status_mut() = StatusCode::ACCEPTED;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> ListParams {
        let mut p = ListParams::default();
        for (k, v) in pairs {
            let v = Some(v.to_string());
            match *k {
                "status" => p.status = v,
                "agent" => p.agent = v,
                "user" => p.user = v,
                "since" => p.since = v,
                "until" => p.until = v,
                "limit" => p.limit = v,
                _ => unreachable!(),
            }
        }
        p
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        let err = admin_query("f", params(pairs)).expect_err("must be refused");
        assert_eq!(err.code, Code::InvalidRequest);
        err.message
    }

    #[test]
    fn filters_are_read_and_bounded() {
        let q = admin_query("f", params(&[])).unwrap();
        assert_eq!((q.limit, q.status, q.since, q.until), (DEFAULT_LIMIT, None, None, None));
        let q = admin_query(
            "f",
            params(&[
                ("status", "failed"),
                ("agent", " slow "),
                ("user", "alice"),
                ("since", "2026-01-31T12:00:00Z"),
                ("until", "1769864400001"),
                ("limit", "100000"),
            ]),
        )
        .unwrap();
        assert_eq!(q.status, Some(Status::Failed));
        assert_eq!((q.agent_id.as_deref(), q.user_id.as_deref()), (Some("slow"), Some("alice")));
        assert_eq!((q.since, q.until, q.limit), (Some(1_769_860_800_000), Some(1_769_864_400_001), MAX_LIMIT));
        assert_eq!(admin_query("f", params(&[("status", ""), ("agent", "  ")])).unwrap().agent_id, None);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        assert!(error(&[("limit", "0")]).contains("`limit`"));
        assert!(error(&[("limit", "-3")]).contains("`limit`"));
        assert!(error(&[("status", "done")]).contains("`status`"));
        assert!(error(&[("since", "yesterday")]).contains("`since`"));
        assert!(error(&[("until", "-1")]).contains("`until`"));
        assert!(error(&[("until", "99999999999999999")]).contains("`until`"));
        assert!(error(&[("since", "20"), ("until", "10")]).contains("before"));
        assert!(error(&[("user", &"u".repeat(MAX_FILTER_CHARS + 1))]).contains("`user`"));
    }
}
