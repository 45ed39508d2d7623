//! The body of a completion webhook.
//!
//! One event describes a request that ended (completed, failed or cancelled). It
//! carries both key sets in use: the one the MUXI SDK's `muxi.webhook.parse` reads
//! (`id`, `object`, `response`, `processing_time`, ...) and the one the MUXI docs
//! show (`request_id`, `result: {text, artifacts}`).

use serde_json::{json, Value};

use crate::store::RequestRecord;

/// The completion event for `record`, stamped `timestamp_ms`.
///
/// `processing_time` is in seconds (float); `error` is `null` or
/// `{code, type, message, retryable}` where `code` and `type` are both the error's kind.
pub fn completion_payload(record: &RequestRecord, formation_id: &str, timestamp_ms: i64) -> Value {
    let processing_time = record.duration_ms().map_or(0.0, |ms| ms.max(0) as f64 / 1000.0);
    let response = match &record.result {
        Some(result) => json!([{ "type": "text", "text": result.text }]),
        None => json!([]),
    };
    let result = match &record.result {
        Some(result) => json!({ "text": result.text, "artifacts": result.artifacts }),
        None => Value::Null,
    };
    let error = match &record.error {
        Some(error) => json!({
            "code": error.kind,
            "type": error.kind,
            "message": error.message,
            "retryable": error.retryable,
        }),
        None => Value::Null,
    };
    json!({
        "id": record.id,
        "request_id": record.id,
        "object": "response",
        "status": record.status.as_str(),
        "timestamp": timestamp_ms,
        "formation_id": formation_id,
        "user_id": record.user_id,
        "session_id": record.session_id,
        "processing_time": processing_time,
        "processing_mode": record.mode,
        "webhook_url": record.webhook_url,
        "response": response,
        "result": result,
        "error": error,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{ErrorInfo, RequestResult, Status};

    pub(crate) fn record(status: Status) -> RequestRecord {
        RequestRecord {
            id: "req_1".into(),
            formation_id: "f".into(),
            formation_version: "1.0.0".into(),
            user_id: "u1".into(),
            session_id: Some("sess_1".into()),
            agent_id: "a".into(),
            message: "hi".into(),
            mode: crate::store::Mode::Async,
            answered_async: true,
            estimated_seconds: 1.0,
            idempotency_key: None,
            webhook_url: Some("https://example.com/hook".into()),
            workflow_timeout_ms: 60_000,
            status,
            progress: 100.0,
            current_step: None,
            total_steps: None,
            completed_steps: None,
            status_message: None,
            result: None,
            error: None,
            attempts: 1,
            created_at: 1_000,
            started_at: Some(2_000),
            completed_at: Some(3_500),
            webhook: None,
        }
    }

    #[test]
    fn completed_has_both_key_sets() {
        let mut r = record(Status::Completed);
        r.result = Some(RequestResult { text: "done".into(), artifacts: vec![json!("a.pdf")] });
        let p = completion_payload(&r, "f", 42);
        assert_eq!(
            p,
            json!({
                "id": "req_1", "request_id": "req_1", "object": "response",
                "status": "completed", "timestamp": 42, "formation_id": "f",
                "user_id": "u1", "session_id": "sess_1", "processing_time": 1.5,
                "processing_mode": "async", "webhook_url": "https://example.com/hook",
                "response": [{"type": "text", "text": "done"}],
                "result": {"text": "done", "artifacts": ["a.pdf"]},
                "error": null,
            })
        );
    }

    #[test]
    fn failed_carries_the_error() {
        let mut r = record(Status::Failed);
        r.error = Some(ErrorInfo { kind: "agent_error".into(), message: "boom".into(), retryable: false });
        let p = completion_payload(&r, "f", 42);
        assert_eq!(p["status"], "failed");
        assert_eq!(p["response"], json!([]));
        assert_eq!(p["result"], Value::Null);
        assert_eq!(
            p["error"],
            json!({"code": "agent_error", "type": "agent_error", "message": "boom", "retryable": false})
        );
    }

    #[test]
    fn cancelled_without_result() {
        let mut r = record(Status::Cancelled);
        r.started_at = None;
        r.session_id = None;
        let p = completion_payload(&r, "f", 42);
        assert_eq!(p["status"], "cancelled");
        assert_eq!(p["processing_time"], 2.5);
        assert_eq!(p["session_id"], Value::Null);
        assert_eq!(p["error"], Value::Null);
    }
}
