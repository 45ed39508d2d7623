//! `POST /api/{id}/v1/chat`: accept a message, decide sync or async, store the
//! request durably, and answer with the result (200) or its id (202).

use std::fmt;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::{self, Role};
use super::body::HeadersAndJson;
use super::extract::Path;
use super::json::Object;
use super::{envelope, views, AppState};
use crate::engine::{Start, Submitted};
use crate::error::{ApiError, ApiResult, Code};
use crate::formation::Formation;
use crate::overlord::decide::{decide, Plan};
use crate::overlord::estimate::{Basis, Estimate};
use crate::store::{time_ordered_id, NewRequest, RequestRecord, Status};

/// The chat body. Unknown fields (the SDK sends `files`, `request_id`) are ignored.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub message: Option<String>,
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    pub session_id: Option<String>,
    #[serde(rename = "async")]
    pub async_: Option<bool>,
    pub threshold_seconds: Option<f64>,
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub stream: bool,
}

/// A request ready to submit, with how its caller is to be answered.
pub struct Accepted {
    pub formation: Arc<Formation>,
    pub request: NewRequest,
    pub plan: Plan,
    /// What `plan` was decided on; named in a 202's `estimated_time`.
    pub estimate: Estimate,
}

/// Checks a chat-like request and prepares it; nothing is stored on error.
pub async fn accept(
    state: &AppState,
    formation: Arc<Formation>,
    headers: &HeaderMap,
    body: ChatBody,
) -> ApiResult<Accepted> {
    let message = body.message.unwrap_or_default();
    if message.trim().is_empty() {
        return Err(ApiError::new(Code::MissingMessage, "`message` is required and must not be empty"));
    }
    if let Some(t) = body.threshold_seconds {
        if !(t > 0.0 && crate::time::seconds(t).is_some()) {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("`threshold_seconds` must be a number above 0 and at most {}", crate::time::MAX_SECONDS),
            ));
        }
    }
    let user_id = auth::user_id(headers, body.user_id.as_deref())?;
    let idempotency_key = auth::idempotency_key(headers)?;
    if let Some(id) = &body.agent_id {
        auth::check_id("`agent_id`", id)?;
    }
    if let Some(session) = body.session_id.as_deref().filter(|s| !s.trim().is_empty()) {
        auth::check_id("`session_id`", session)?;
    }
    if body.webhook_url.as_ref().is_some_and(|url| url.len() > auth::MAX_URL_LEN) {
        return Err(ApiError::new(
            Code::InvalidRequest,
            format!("`webhook_url` must be at most {} characters", auth::MAX_URL_LEN),
        ));
    }
    let agent = formation.agent(body.agent_id.as_deref()).ok_or_else(|| {
        let known: Vec<&str> = formation.agents.iter().map(|a| a.id.as_str()).collect();
        match &body.agent_id {
            Some(id) => ApiError::new(
                Code::UnknownAgent,
                format!("formation `{}` has no agent `{id}` (agents: {})", formation.id, known.join(", ")),
            ),
            None => ApiError::new(Code::UnknownAgent, format!("formation `{}` has no agents", formation.id)),
        }
    })?;
    let agent_id = agent.id.clone();
    if let Some(url) = &body.webhook_url {
        crate::webhooks::target::check_target(url, &state.allow_webhook_hosts).await?;
    }
    let fingerprint = fingerprint(
        idempotency_key.as_deref(),
        &agent_id,
        &message,
        body.session_id.as_deref(),
        body.webhook_url.as_deref(),
    );
    let estimate = state.engine.estimate(&formation, &agent_id, &message).await;
    let plan = decide(&formation.overlord.async_, body.async_, body.threshold_seconds, &estimate);
    let id = time_ordered_id("req_");
    // Every request belongs to a session; one is opened when none is named,
    // under the request's own (unique) number.
    let session_id = match body.session_id.filter(|s| !s.trim().is_empty()) {
        Some(session_id) => session_id,
        None => ["sess_", id.strip_prefix("req_").unwrap_or(&id)].concat(),
    };
    let request = NewRequest {
        id,
        formation_id: formation.id.clone(),
        formation_version: formation.version_label(),
        user_id,
        session_id: Some(session_id),
        agent_id,
        message,
        mode: plan.mode(),
        estimated_seconds: estimate.seconds,
        idempotency_key,
        fingerprint,
        webhook_url: body.webhook_url,
        workflow_timeout_ms: i64::try_from(formation.overlord.timeouts.workflow().as_millis()).unwrap_or(i64::MAX),
        created_at: crate::time::now_ms(),
    };
    Ok(Accepted { formation, request, plan, estimate })
}

/// A digest of what a request asks, to tell an idempotency key reused for a
/// different request from a retry of the same one; `None` without a key, when
/// there is nothing to compare.
pub(crate) fn fingerprint(
    idempotency_key: Option<&str>,
    agent_id: &str,
    message: &str,
    session_id: Option<&str>,
    webhook_url: Option<&str>,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    idempotency_key?;
    let mut hash = Sha256::new();
    for part in [agent_id, message, session_id.unwrap_or(""), webhook_url.unwrap_or("")] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    Some(hex::encode(&hash.finalize()[..16]))
}

/// `POST .../chat`: [`answer`].
pub async fn chat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    HeadersAndJson(headers, body): HeadersAndJson<ChatBody>,
) -> ApiResult<Response> {
    answer(&state, &id, &headers, body).await
}

/// A chat to formation `id`, answered per its plan (or as a stream). Also
/// answered by the front door (`super::front`), past the router.
pub async fn answer(state: &AppState, id: &str, headers: &HeaderMap, body: ChatBody) -> ApiResult<Response> {
    let formation = auth::authorize(state, id, headers, Role::Client)?;
    let stream = body.stream;
    let accepted = accept(state, formation, headers, body).await?;
    if stream {
        return super::events::stream_chat(state.clone(), accepted).await;
    }
    run_and_answer(state, accepted).await
}

/// Submits an accepted request and answers per its plan (shared with triggers).
pub async fn run_and_answer(state: &AppState, accepted: Accepted) -> ApiResult<Response> {
    let Accepted { formation, request, plan, estimate } = accepted;
    let request_id = request.id.clone();
    let idempotency_key = request.idempotency_key.clone();
    // A caller answered at once leaves its request queued; one that waits for
    // the end has it taken on here now.
    let start = match plan {
        Plan::Async => Start::Queue,
        Plan::Wait { .. } => Start::Now,
    };
    let Submitted { record, live, .. } = state.engine.submit(formation.clone(), request, start).await?;
    let key = idempotency_key.as_deref();
    if record.status.is_final() {
        return answer_final(&record, key);
    }
    // Only a request running in this process can be waited for; a replay of one
    // running elsewhere (or not yet recovered) is answered with its id.
    if let (Plan::Wait { limit }, Some(live)) = (plan, &live) {
        let waited = tokio::select! {
            finished = state.engine.wait(live, limit) => finished,
            _ = state.shutdown.cancelled() => None,
        };
        if let Some(finished) = waited {
            return answer_final(&finished, key);
        }
        // Still running at the threshold (or shutting down): answer with the id,
        // and remember that it was (the request now gets the formation's webhook).
        state.engine.promote(live).await;
    }
    // A replay answers for an earlier request, whose estimate was made then.
    let estimate = (record.id == request_id).then_some(estimate);
    Ok(accepted_response(&formation.id, &record, key, estimate.as_ref()))
}

/// 202 with the request id, where to poll, and when. `estimate` is what the
/// request's estimate rests on when known (not for a replay).
pub fn accepted_response(
    formation_id: &str,
    record: &RequestRecord,
    idempotency_key: Option<&str>,
    estimate: Option<&Estimate>,
) -> Response {
    let status_url = ["/api/", formation_id, "/v1/requests/", &record.id].concat();
    let poll_after = (record.estimated_seconds / 10.0).clamp(1.0, 30.0).round() as u64;
    let estimated_time = EstimatedTime { estimate, seconds: record.estimated_seconds };
    let mut response = envelope::ok_written("chat.accepted", Some(&record.id), idempotency_key, |buf| {
        let mut data = Object::new(buf);
        data.str("request_id", &record.id)
            .raw("status", r#""processing""#)
            .display("estimated_time", &estimated_time)
            .value("estimated_seconds", &record.estimated_seconds)
            .str("status_url", &status_url)
            .str_joined("events_url", [&status_url, "/events"])
            .str("user_id", &record.user_id)
            .opt_str("session_id", record.session_id.as_deref());
        data.end();
    });
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    // The URL's own bytes become the header's: no copy.
    if let Ok(location) = HeaderValue::from_maybe_shared(bytes::Bytes::from(status_url)) {
        headers.insert(header::LOCATION, location);
    }
    let retry_after = RETRY_SECONDS
        .get(poll_after as usize)
        .map_or_else(|| HeaderValue::from(poll_after), |s| HeaderValue::from_static(s));
    headers.insert(header::RETRY_AFTER, retry_after);
    response
}

/// `Retry-After` values of 0 to 30 seconds (the range a 202 answers with),
/// so that an answer formats none.
const RETRY_SECONDS: [&str; 31] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20",
    "21", "22", "23", "24", "25", "26", "27", "28", "29", "30",
];

/// A 202's `estimated_time`: the estimate made now, or for a replay the one
/// its request was accepted with.
struct EstimatedTime<'a> {
    estimate: Option<&'a Estimate>,
    seconds: f64,
}

impl fmt::Display for EstimatedTime<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.estimate {
            Some(estimate) => estimate.fmt(f),
            None => {
                let range = Estimate { seconds: self.seconds, basis: Basis::Declared }.range();
                write!(f, "{range} (estimated when first accepted)")
            }
        }
    }
}

/// The answer for a request that has ended.
pub fn answer_final(record: &RequestRecord, idempotency_key: Option<&str>) -> ApiResult<Response> {
    let details = || json!({ "request_id": record.id, "status": record.status.as_str(), "error": record.error });
    match record.status {
        Status::Completed => {
            Ok(envelope::ok("chat.completed", Some(&record.id), idempotency_key, views::chat_answer(record))
                .into_response())
        }
        Status::Failed => {
            let (kind, message) = record
                .error
                .as_ref()
                .map(|e| (e.kind.as_str(), e.message.as_str()))
                .unwrap_or(("agent_error", "the request failed"));
            let code = if kind == "timeout" { Code::RequestTimeout } else { Code::RequestFailed };
            Err(ApiError::new(code, format!("request {} failed: {message}", record.id)).with_details(details()))
        }
        Status::Cancelled => Err(ApiError::new(Code::RequestCancelled, format!("request {} was cancelled", record.id))
            .with_details(details())),
        Status::Pending | Status::Processing => Err(ApiError::internal("answer_final called on a running request")),
    }
}
