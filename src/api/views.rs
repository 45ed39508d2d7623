//! How stored things are shown to API callers.

use serde::Serialize;
use serde_json::{json, Value};

use crate::store::{ErrorInfo, Mode, RequestRecord, RequestResult, WebhookState};
use crate::time::rfc3339;

/// The status document of a request (`GET /requests/{id}`), serialised
/// straight from the record (a poll builds no `Value` tree).
#[derive(Serialize)]
pub struct RequestStatus<'a> {
    request_id: &'a str,
    id: &'a str,
    formation_id: &'a str,
    formation_version: &'a str,
    user_id: &'a str,
    session_id: Option<&'a str>,
    agent_id: &'a str,
    status: &'static str,
    progress: f64,
    current_step: Option<&'a str>,
    total_steps: Option<u32>,
    completed_steps: Option<u32>,
    message: Option<&'a str>,
    result: Option<&'a RequestResult>,
    error: Option<&'a ErrorInfo>,
    attempts: u32,
    processing_mode: Mode,
    estimated_seconds: f64,
    created_at: String,
    started_at: Option<String>,
    completed_at: Option<String>,
    duration_ms: Option<i64>,
    webhook: Option<&'a WebhookState>,
}

impl<'a> RequestStatus<'a> {
    pub fn of(record: &'a RequestRecord) -> RequestStatus<'a> {
        RequestStatus {
            request_id: &record.id,
            id: &record.id,
            formation_id: &record.formation_id,
            formation_version: &record.formation_version,
            user_id: &record.user_id,
            session_id: record.session_id.as_deref(),
            agent_id: &record.agent_id,
            status: record.status.as_str(),
            progress: record.progress,
            current_step: record.current_step.as_deref(),
            total_steps: record.total_steps,
            completed_steps: record.completed_steps,
            message: record.status_message.as_deref(),
            result: record.result.as_ref(),
            error: record.error.as_ref(),
            attempts: record.attempts,
            processing_mode: record.mode,
            estimated_seconds: record.estimated_seconds,
            created_at: rfc3339(record.created_at),
            started_at: record.started_at.map(rfc3339),
            completed_at: record.completed_at.map(rfc3339),
            duration_ms: record.duration_ms(),
            webhook: record.webhook.as_ref(),
        }
    }
}

/// [`RequestStatus`] as a `Value`, for callers that add to it.
pub fn request_status(record: &RequestRecord) -> Value {
    serde_json::to_value(RequestStatus::of(record)).unwrap_or(Value::Null)
}

/// The `data` of a synchronous chat answer.
pub fn chat_answer(record: &RequestRecord) -> Value {
    let (text, artifacts) = match &record.result {
        Some(result) => (result.text.as_str(), result.artifacts.clone()),
        None => ("", Vec::new()),
    };
    json!({
        "message": {
            "role": "assistant",
            "content": text,
            "artifacts": artifacts,
            "metadata": { "session_id": record.session_id, "agent_id": record.agent_id },
        },
        "request_id": record.id,
        "user_id": record.user_id,
        "session_id": record.session_id,
        "agent_id": record.agent_id,
        "status": record.status.as_str(),
        "duration_ms": record.duration_ms(),
    })
}
