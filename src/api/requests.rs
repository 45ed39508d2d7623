//! The caller's requests: status, list, cancel. Scoped to the caller's user id:
//! another user's request answers 404, as if it did not exist.

use super::extract::{Path, Query};
use super::params::{parse_limit, parse_status};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Role};
use super::body::Headers;
use super::{envelope, views, AppState};
use crate::engine::CancelError;
use crate::error::{ApiError, ApiResult, Code};
use crate::store::{ListQuery, RequestRecord, RequestState, Status};

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

/// The caller's request, after checking the client key, with its `message`
/// left empty (none of the status, cancel and event routes shows or uses it,
/// and a poll's cost should not grow with it): 404 when it does not exist or
/// belongs to another user.
pub async fn find(
    state: &AppState,
    formation_id: &str,
    headers: &HeaderMap,
    request_id: &str,
) -> ApiResult<Box<RequestRecord>> {
    auth::authorize(state, formation_id, headers, Role::Client)?;
    let user = auth::user_id(headers, None)?;
    // A request running here is answered from memory; others from the store.
    let record = match state.engine.live(request_id) {
        Some(live) => Some(Box::new(live.snapshot_without_message())),
        None => state.engine.store().get_without_message(request_id).await?,
    };
    record.filter(|r| r.formation_id == formation_id && r.user_id == user).ok_or_else(|| not_found(request_id))
}

fn not_found(request_id: &str) -> ApiError {
    ApiError::new(Code::RequestNotFound, format!("request `{request_id}` not found"))
}

/// `GET .../requests/{request_id}`: [`status`].
pub async fn get(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    Headers(headers): Headers,
) -> ApiResult<Response> {
    status(&state, &id, &request_id, &headers).await
}

/// The status document of the caller's request, as [`find`] finds it, written
/// from the state the store lends (a poll builds no record). Also answered by
/// the front door (`super::front`), past the router.
pub async fn status(state: &AppState, id: &str, request_id: &str, headers: &HeaderMap) -> ApiResult<Response> {
    auth::authorize(state, id, headers, Role::Client)?;
    let user = auth::user_id(headers, None)?;
    let mut answer = None;
    let mut show = |request: &RequestState<'_>| {
        if request.formation_id == id && request.user_id == user {
            let status = views::RequestStatus::of(request);
            answer = Some(envelope::ok_written("request.status", Some(request.id), None, |buf| status.write(buf)));
        }
    };
    // A request running here is answered from memory; others from the store.
    match state.engine.live(request_id) {
        Some(live) => show(&RequestState::of(&live.snapshot_without_message())),
        None => {
            state.engine.store().show_state(request_id, &mut show).await?;
        }
    }
    answer.ok_or_else(|| not_found(request_id))
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    limit: Option<String>,
    status: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    auth::authorize(&state, &id, &headers, Role::Client)?;
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let status = parse_status(params.status.as_deref())?;
    let query = ListQuery { formation_id: id, user_id: auth::user_id(&headers, None)?, status, limit };
    let records = state.engine.store().list(&query).await?;
    let requests: Vec<Value> = records.iter().map(views::request_status).collect();
    Ok(envelope::ok("request.list", None, None, json!({ "requests": requests, "count": requests.len() })))
}

pub async fn cancel(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    Headers(headers): Headers,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    cancel_and_answer(&state, &record, "Request cancelled by user").await
}

/// Cancels `record` and answers for it (the user's route and the admin's).
pub(super) async fn cancel_and_answer(state: &AppState, record: &RequestRecord, message: &str) -> ApiResult<Response> {
    match state.engine.cancel(record).await {
        Ok(cancelled) => Ok(envelope::ok(
            "request.cancelled",
            Some(&cancelled.id),
            None,
            json!({ "request_id": cancelled.id, "status": cancelled.status.as_str(), "message": message }),
        )),
        Err(CancelError::AlreadyFinished(status)) => Err(ApiError::new(
            Code::RequestAlreadyFinished,
            format!(
                "request `{}` has already {}; only pending or processing requests can be cancelled",
                record.id,
                finished_verb(status)
            ),
        )),
        Err(CancelError::Store(e)) => Err(e.into()),
    }
}

fn finished_verb(status: Status) -> &'static str {
    match status {
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "been cancelled",
        Status::Pending | Status::Processing => "ended",
    }
}
