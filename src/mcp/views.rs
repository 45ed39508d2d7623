//! How an execution (a stored request) is shown to MCP callers: tool results
//! with the same facts as structured content and as text, and task states.

use rmcp::model::{CallToolResult, ContentBlock, DetailedTask, JsonObject, Task, TaskPayload};
use serde_json::{json, Value};

use crate::overlord::estimate::{Basis, Estimate};
use crate::store::{RequestRecord, Status};
use crate::time::rfc3339;

/// The MCP status of an execution: `running` for pending and processing.
pub fn status_word(status: Status) -> &'static str {
    match status {
        Status::Pending | Status::Processing => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

/// Where the same request is polled over HTTP.
pub fn status_url(record: &RequestRecord) -> String {
    format!("/api/{}/v1/requests/{}", record.formation_id, record.id)
}

fn estimated_time(record: &RequestRecord) -> String {
    Estimate { seconds: record.estimated_seconds, basis: Basis::Declared }.range().to_string()
}

/// How long a caller should wait before polling again, in seconds.
pub fn poll_after_seconds(record: &RequestRecord) -> u64 {
    (record.estimated_seconds / 10.0).clamp(1.0, 30.0).round() as u64
}

/// The structured facts of an execution.
pub fn facts(record: &RequestRecord) -> Value {
    let mut facts = json!({
        "execution_id": record.id,
        "status": status_word(record.status),
        "state": record.status.as_str(),
        "agent": record.agent_id,
        "session_id": record.session_id,
        "estimated_time": estimated_time(record),
        "status_url": status_url(record),
        "created_at": rfc3339(record.created_at),
    });
    let map = facts.as_object_mut().expect("an object");
    match record.status {
        Status::Pending | Status::Processing => {
            map.insert("progress".into(), json!(record.progress));
            map.insert("current_step".into(), json!(record.current_step));
            map.insert("completed_steps".into(), json!(record.completed_steps));
            map.insert("total_steps".into(), json!(record.total_steps));
            map.insert("message".into(), json!(record.status_message));
            map.insert("poll_after_seconds".into(), json!(poll_after_seconds(record)));
        }
        Status::Completed => {
            let result = record.result.clone().unwrap_or_default();
            map.insert("output".into(), json!(result.text));
            map.insert("artifacts".into(), json!(result.artifacts));
        }
        Status::Failed => {
            map.insert("error".into(), json!(record.error));
        }
        Status::Cancelled => {
            map.insert("message".into(), json!(record.status_message));
        }
    }
    if record.status.is_final() {
        map.insert("completed_at".into(), json!(record.completed_at.map(rfc3339)));
        map.insert("duration_ms".into(), json!(record.duration_ms()));
    }
    facts
}

/// The answer of an agent tool that started an execution.
pub fn started(record: &RequestRecord) -> CallToolResult {
    let structured = json!({
        "execution_id": record.id,
        "status": "running",
        "agent": record.agent_id,
        "session_id": record.session_id,
        "estimated_time": estimated_time(record),
        "status_url": status_url(record),
        "poll_after_seconds": poll_after_seconds(record),
    });
    let text = format!(
        "Execution {id} started on agent `{agent}` (status: running, estimated time: {eta}).\n\
         Call check_execution_status with execution_id \"{id}\" in about {poll} s to get the result \
         (over HTTP: GET {url}).",
        id = record.id,
        agent = record.agent_id,
        eta = estimated_time(record),
        poll = poll_after_seconds(record),
        url = status_url(record),
    );
    result(text, structured, false)
}

/// The answer of `check_execution_status` (and of an agent tool whose
/// execution ended within `wait_seconds`).
pub fn status(record: &RequestRecord) -> CallToolResult {
    let facts = facts(record);
    let text = match record.status {
        Status::Pending | Status::Processing => {
            let mut text = format!(
                "Execution {} on agent `{}` is running ({}: {:.0}% done",
                record.id,
                record.agent_id,
                record.status.as_str(),
                record.progress
            );
            if let (Some(done), Some(total)) = (record.completed_steps, record.total_steps) {
                text.push_str(&format!(", step {done} of {total}"));
            }
            text.push(')');
            if let Some(step) = &record.current_step {
                text.push_str(&format!("; current step: {step}"));
            }
            if let Some(message) = &record.status_message {
                text.push_str(&format!("; {message}"));
            }
            text.push_str(&format!(". Check again in about {} s.", poll_after_seconds(record)));
            text
        }
        Status::Completed => {
            let result = record.result.clone().unwrap_or_default();
            let mut text = result.text.clone();
            if !result.artifacts.is_empty() {
                text.push_str(&format!("\n\n[{} artifact(s) in the structured result]", result.artifacts.len()));
            }
            text
        }
        Status::Failed => {
            let message = record.error.as_ref().map(|e| e.message.as_str()).unwrap_or("the agent failed");
            format!("Execution {} on agent `{}` failed: {message}", record.id, record.agent_id)
        }
        Status::Cancelled => format!("Execution {} on agent `{}` was cancelled.", record.id, record.agent_id),
    };
    result(text, facts, record.status == Status::Failed)
}

/// The answer of `cancel_execution`.
pub fn cancelled(record: &RequestRecord) -> CallToolResult {
    let text = format!("Execution {} on agent `{}` is cancelled; its agent was stopped.", record.id, record.agent_id);
    result(text, facts(record), false)
}

/// The answer of `list_executions`.
pub fn list(records: &[RequestRecord]) -> CallToolResult {
    let executions: Vec<Value> = records.iter().map(facts).collect();
    let mut text = format!("{} execution(s)", records.len());
    for r in records {
        text.push_str(&format!(
            "\n- {} ({}, agent `{}`, {})",
            r.id,
            status_word(r.status),
            r.agent_id,
            rfc3339(r.created_at)
        ));
    }
    result(text, json!({ "executions": executions, "count": records.len() }), false)
}

/// A tool-level error the caller (and its model) can read: a stable code and a message.
pub fn error(code: &str, message: &str) -> CallToolResult {
    result(format!("{code}: {message}"), json!({ "error": { "code": code, "message": message } }), true)
}

fn result(text: String, structured: Value, is_error: bool) -> CallToolResult {
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    result.structured_content = Some(structured);
    result
}

/// The task handle of an execution (task id = execution id = request id).
pub fn task(record: &RequestRecord, ttl_ms: Option<u64>) -> Task {
    let updated = record.completed_at.or(record.started_at).unwrap_or(record.created_at);
    let mut task =
        Task::new(record.id.clone(), rmcp::model::TaskStatus::Working, rfc3339(record.created_at), rfc3339(updated));
    task.ttl_ms = ttl_ms;
    if !record.status.is_final() {
        task.poll_interval_ms = Some(poll_after_seconds(record) * 1000);
    }
    let message = match record.status {
        Status::Pending => Some("queued".to_string()),
        Status::Processing => Some(
            record
                .status_message
                .clone()
                .or_else(|| record.current_step.clone())
                .unwrap_or_else(|| format!("{:.0}% done", record.progress)),
        ),
        Status::Failed => record.error.as_ref().map(|e| e.message.clone()),
        Status::Cancelled => record.status_message.clone(),
        Status::Completed => None,
    };
    match message {
        Some(message) => task.with_status_message(message),
        None => task,
    }
}

/// The task state of an execution, for `tasks/get`: working, completed (the
/// tool result inline), failed (the error) or cancelled.
pub fn detailed_task(record: &RequestRecord, ttl_ms: Option<u64>) -> DetailedTask {
    let payload = match record.status {
        Status::Pending | Status::Processing => TaskPayload::Working,
        Status::Completed => TaskPayload::Completed { result: object(serde_json::to_value(status(record))) },
        Status::Failed => {
            let (kind, message) = record
                .error
                .as_ref()
                .map(|e| (e.kind.clone(), e.message.clone()))
                .unwrap_or(("agent_error".into(), "the agent failed".into()));
            TaskPayload::Failed {
                error: object(Ok(json!({
                    "code": rmcp::model::ErrorCode::INTERNAL_ERROR.0,
                    "message": format!("execution {} failed: {message}", record.id),
                    "data": { "execution_id": record.id, "type": kind },
                }))),
            }
        }
        Status::Cancelled => TaskPayload::Cancelled,
    };
    DetailedTask::new(task(record, ttl_ms), payload)
}

fn object(value: Result<Value, serde_json::Error>) -> JsonObject {
    match value {
        Ok(Value::Object(map)) => map,
        _ => JsonObject::new(),
    }
}
