//! A user's sessions: list (latest activity first), one, its messages in order,
//! and restore (seed a session with given messages). Scoped to the caller's user
//! like requests: another user's session answers 404.
//!
//! A session is derived from the requests that name it (each a user turn and,
//! once completed, an agent answer) plus the messages it was seeded with.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Role};
use super::body::JsonBody;
use super::params::parse_limit;
use super::{envelope, AppState};
use crate::error::{ApiError, ApiResult, Code};
use crate::store::{NewSessionMessage, SessionMessage, SessionSummary};
use crate::time::rfc3339;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;
const DEFAULT_MESSAGES: usize = 50;
const MAX_MESSAGES: usize = 1000;
/// The most messages a session is seeded with: a restore keeps the newest.
const MAX_RESTORE: usize = 1000;
/// The longest agent id a restored message may name.
const MAX_AGENT_ID: usize = 200;
/// The longest session id accepted.
const MAX_SESSION_ID: usize = 200;

fn check_session_id(session_id: &str) -> ApiResult<()> {
    if session_id.trim().is_empty() || session_id.len() > MAX_SESSION_ID || session_id.chars().any(char::is_control) {
        return Err(ApiError::new(
            Code::InvalidRequest,
            format!("a session id is 1 to {MAX_SESSION_ID} printable characters"),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    limit: Option<String>,
    user_id: Option<String>,
    active_only: Option<String>,
}

/// A boolean query parameter: `true`/`false`/`1`/`0`.
fn parse_flag(name: &str, text: Option<&str>) -> ApiResult<bool> {
    match text.map(|t| t.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => {
            Err(ApiError::new(Code::InvalidRequest, format!("`{name}` must be true or false, got `{other}`")))
        }
    }
}

/// `GET /sessions`: the caller's sessions, latest activity first
/// (`active_only=true`: those with a request still running).
pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    auth::authorize(&state, &id, &headers, Role::Client)?;
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let active_only = parse_flag("active_only", params.active_only.as_deref())?;
    let user = auth::user_id(&headers, params.user_id.as_deref())?;
    let sessions = state.engine.store().sessions(&id, &user, active_only, limit).await?;
    let sessions: Vec<Value> = sessions.iter().map(|s| session_view(&user, s)).collect();
    Ok(envelope::ok(
        "session.list",
        None,
        None,
        json!({ "sessions": sessions, "count": sessions.len(), "user_id": user }),
    ))
}

/// `GET /sessions/{session_id}`.
pub async fn show(
    State(state): State<AppState>,
    Path((id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    auth::authorize(&state, &id, &headers, Role::Client)?;
    check_session_id(&session_id)?;
    let user = auth::user_id(&headers, None)?;
    let session = state
        .engine
        .store()
        .session(&id, &user, &session_id)
        .await?
        .ok_or_else(|| ApiError::new(Code::SessionNotFound, format!("session `{session_id}` not found")))?;
    Ok(envelope::ok("session", None, None, session_view(&user, &session)))
}

#[derive(Debug, Deserialize)]
pub struct MessageParams {
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /sessions/{session_id}/messages`: oldest first, the latest `limit`
/// (of those before `before`, RFC 3339 or a Unix time); `has_more` says
/// whether earlier ones exist.
pub async fn messages(
    State(state): State<AppState>,
    Path((id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(params): Query<MessageParams>,
) -> ApiResult<Response> {
    auth::authorize(&state, &id, &headers, Role::Client)?;
    check_session_id(&session_id)?;
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_MESSAGES, MAX_MESSAGES)?;
    let before = match params.before.as_deref().map(str::trim).filter(|b| !b.is_empty()) {
        None => None,
        Some(text) => {
            let value = text.parse::<f64>().map(|n| json!(n)).unwrap_or_else(|_| json!(text));
            Some(parse_timestamp(&value).ok_or_else(|| {
                ApiError::new(Code::InvalidRequest, format!("`before` must be RFC 3339 or a Unix time; got `{text}`"))
            })?)
        }
    };
    let user = auth::user_id(&headers, None)?;
    let store = state.engine.store();
    if store.session(&id, &user, &session_id).await?.is_none() {
        return Err(ApiError::new(Code::SessionNotFound, format!("session `{session_id}` not found")));
    }
    // One more than asked tells whether earlier messages exist.
    let mut messages = store.session_messages(&id, &user, &session_id, before, limit + 1).await?;
    let has_more = messages.len() > limit;
    if has_more {
        messages.remove(0);
    }
    let messages: Vec<Value> = messages.iter().map(message_view).collect();
    Ok(envelope::ok(
        "session.messages",
        None,
        None,
        json!({
            "session_id": session_id,
            "user_id": user,
            "messages": messages,
            "count": messages.len(),
            "has_more": has_more,
        }),
    ))
}

#[derive(Debug, Deserialize)]
pub struct RestoreBody {
    messages: Option<Vec<RestoreMessage>>,
}

#[derive(Debug, Deserialize)]
pub struct RestoreMessage {
    role: String,
    content: String,
    #[serde(default)]
    agent_id: Option<String>,
    /// RFC 3339, or a Unix time in seconds (or milliseconds, when that large).
    #[serde(default, alias = "created_at")]
    timestamp: Option<Value>,
}

/// `POST /sessions/{session_id}/restore` with `{"messages": [{role, content,
/// timestamp?, agent_id?}]}`: replaces the messages the session was seeded
/// with, in timestamp order; beyond [`MAX_RESTORE`] the oldest are dropped.
pub async fn restore(
    State(state): State<AppState>,
    Path((id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RestoreBody>,
) -> ApiResult<Response> {
    auth::authorize(&state, &id, &headers, Role::Client)?;
    check_session_id(&session_id)?;
    let user = auth::user_id(&headers, None)?;
    let given = body
        .messages
        .ok_or_else(|| ApiError::new(Code::InvalidRequest, "`messages` is required: a list of {role, content}"))?;
    let now = crate::time::now_ms();
    let mut messages = Vec::with_capacity(given.len());
    for (i, m) in given.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "user" | "assistant" | "system") {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("messages[{i}].role must be user, assistant or system; got `{}`", m.role),
            ));
        }
        if m.content.trim().is_empty() {
            return Err(ApiError::new(Code::InvalidRequest, format!("messages[{i}].content must not be empty")));
        }
        if m.agent_id.as_ref().is_some_and(|a| a.len() > MAX_AGENT_ID || a.chars().any(char::is_control)) {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("messages[{i}].agent_id must be at most {MAX_AGENT_ID} printable characters"),
            ));
        }
        let timestamp = match &m.timestamp {
            None | Some(Value::Null) => now,
            Some(t) => parse_timestamp(t).ok_or_else(|| {
                ApiError::new(
                    Code::InvalidRequest,
                    format!("messages[{i}].timestamp must be RFC 3339 or a Unix time; got {t}"),
                )
            })?,
        };
        messages.push(NewSessionMessage { role: m.role, content: m.content, agent_id: m.agent_id, timestamp });
    }
    // In time order (stable: messages of one instant keep their order), newest kept.
    messages.sort_by_key(|m| m.timestamp);
    let dropped = messages.len().saturating_sub(MAX_RESTORE);
    messages.drain(..dropped);
    let loaded = messages.len();
    state.engine.store().restore_session(&id, &user, &session_id, messages).await?;
    Ok(envelope::ok(
        "session.restored",
        None,
        None,
        json!({
            "session_id": session_id,
            "user_id": user,
            "messages_loaded": loaded,
            "messages_dropped": dropped,
            "message": "Session restored successfully",
        }),
    ))
}

/// Milliseconds since the epoch from RFC 3339 or a Unix time (seconds, or
/// milliseconds when above 10^11), within years 1970..=9999.
fn parse_timestamp(value: &Value) -> Option<i64> {
    const MAX_MS: i64 = 253_402_300_799_999;
    let ms = match value {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?.timestamp_millis(),
        Value::Number(n) => {
            let n = n.as_f64()?;
            if !n.is_finite() || n < 0.0 {
                return None;
            }
            if n > 1e11 {
                n as i64
            } else {
                (n * 1000.0) as i64
            }
        }
        _ => return None,
    };
    (0..=MAX_MS).contains(&ms).then_some(ms)
}

fn session_view(user: &str, s: &SessionSummary) -> Value {
    json!({
        "session_id": s.session_id,
        "id": s.session_id,
        "user_id": user,
        "created_at": rfc3339(s.created_at),
        "last_activity": rfc3339(s.last_activity),
        "updated_at": rfc3339(s.last_activity),
        "message_count": s.message_count,
        "request_count": s.request_count,
        "active": s.active_requests > 0,
        "active_requests": s.active_requests,
    })
}

fn message_view(m: &SessionMessage) -> Value {
    json!({
        "role": m.role,
        "content": m.content,
        "request_id": m.request_id,
        "agent_id": m.agent_id,
        "status": m.status.map(|s| s.as_str()),
        "timestamp": rfc3339(m.timestamp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_seconds_millis_or_rfc3339() {
        assert_eq!(parse_timestamp(&json!(1_700_000_000)), Some(1_700_000_000_000));
        assert_eq!(parse_timestamp(&json!(1_700_000_000_123i64)), Some(1_700_000_000_123));
        assert_eq!(parse_timestamp(&json!("2023-11-14T22:13:20Z")), Some(1_700_000_000_000));
        for bad in [json!(-1), json!("yesterday"), json!(true), json!(1e300)] {
            assert_eq!(parse_timestamp(&bad), None, "{bad}");
        }
    }
}
