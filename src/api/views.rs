//! How stored things are shown to API callers.

use serde_json::{json, Value};

use crate::store::RequestRecord;
use crate::time::rfc3339;

/// The status document of a request (`GET /requests/{id}`).
pub fn request_status(record: &RequestRecord) -> Value {
    json!({
        "request_id": record.id,
        "id": record.id,
        "formation_id": record.formation_id,
        "formation_version": record.formation_version,
        "user_id": record.user_id,
        "session_id": record.session_id,
        "agent_id": record.agent_id,
        "status": record.status.as_str(),
        "progress": record.progress,
        "current_step": record.current_step,
        "total_steps": record.total_steps,
        "completed_steps": record.completed_steps,
        "message": record.status_message,
        "result": record.result,
        "error": record.error,
        "attempts": record.attempts,
        "processing_mode": record.mode,
        "estimated_seconds": record.estimated_seconds,
        "created_at": rfc3339(record.created_at),
        "started_at": record.started_at.map(rfc3339),
        "completed_at": record.completed_at.map(rfc3339),
        "duration_ms": record.duration_ms(),
        "webhook": record.webhook,
    })
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
