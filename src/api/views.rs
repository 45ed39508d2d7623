//! How stored things are shown to API callers.

use serde::Serialize;
use serde_json::{json, Value};

use super::json::Object;
use crate::store::{ErrorInfo, Mode, RequestRecord, RequestResult, RequestState, WebhookState};
use crate::time::Rfc3339;

/// The status document of a request (`GET /requests/{id}`), serialised
/// straight from its state (a poll builds no `Value` tree, nor a record).
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
    created_at: Rfc3339,
    started_at: Option<Rfc3339>,
    completed_at: Option<Rfc3339>,
    duration_ms: Option<i64>,
    webhook: Option<&'a WebhookState>,
}

impl<'a> RequestStatus<'a> {
    pub fn of(state: &RequestState<'a>) -> RequestStatus<'a> {
        RequestStatus {
            request_id: state.id,
            id: state.id,
            formation_id: state.formation_id,
            formation_version: state.formation_version,
            user_id: state.user_id,
            session_id: state.session_id,
            agent_id: state.agent_id,
            status: state.status.as_str(),
            progress: state.progress,
            current_step: state.current_step,
            total_steps: state.total_steps,
            completed_steps: state.completed_steps,
            message: state.status_message,
            result: state.result,
            error: state.error,
            attempts: state.attempts,
            processing_mode: state.mode,
            estimated_seconds: state.estimated_seconds,
            created_at: Rfc3339::new(state.created_at),
            started_at: state.started_at.map(Rfc3339::new),
            completed_at: state.completed_at.map(Rfc3339::new),
            duration_ms: state.duration_ms(),
            webhook: state.webhook,
        }
    }
}

impl RequestStatus<'_> {
    /// Writes the document as its `Serialize` would, field by field (a poll
    /// sends one; see [`super::json`]).
    pub fn write(&self, buf: &mut Vec<u8>) {
        let mut object = Object::new(buf);
        object
            .str("request_id", self.request_id)
            .str("id", self.id)
            .str("formation_id", self.formation_id)
            .str("formation_version", self.formation_version)
            .str("user_id", self.user_id)
            .opt_str("session_id", self.session_id)
            .str("agent_id", self.agent_id)
            .str("status", self.status)
            .value("progress", &self.progress)
            .opt_str("current_step", self.current_step)
            .value("total_steps", &self.total_steps)
            .value("completed_steps", &self.completed_steps)
            .opt_str("message", self.message)
            .value("result", &self.result)
            .value("error", &self.error)
            .value("attempts", &self.attempts)
            .str("processing_mode", self.processing_mode.as_str())
            .value("estimated_seconds", &self.estimated_seconds)
            .str("created_at", self.created_at.as_str())
            .opt_str("started_at", self.started_at.as_ref().map(Rfc3339::as_str))
            .opt_str("completed_at", self.completed_at.as_ref().map(Rfc3339::as_str))
            .value("duration_ms", &self.duration_ms)
            .value("webhook", &self.webhook);
        object.end();
    }
}

/// [`RequestStatus`] as a `Value`, for callers that add to it.
pub fn request_status(record: &RequestRecord) -> Value {
    serde_json::to_value(RequestStatus::of(&RequestState::of(record))).unwrap_or(Value::Null)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract_tests::request;
    use crate::store::Status;

    /// The hand-written status document is the serialised one, byte for byte,
    /// for a request just accepted and for one with every optional part set.
    #[test]
    fn a_written_status_document_is_the_serialised_one() {
        let queued = RequestRecord::accepted(request("req_1", 1_000));
        let mut ended = queued.clone();
        ended.session_id = None;
        ended.status = Status::Failed;
        ended.progress = 37.5;
        ended.current_step = Some("step \"two\"\n".into());
        ended.total_steps = Some(3);
        ended.completed_steps = Some(2);
        ended.status_message = Some("almost ✓".into());
        ended.result = Some(RequestResult { text: "partial".into(), artifacts: vec![json!({"a": [1, null]})] });
        ended.error = Some(ErrorInfo { kind: "timeout".into(), message: "slow\tagent".into(), retryable: true });
        ended.attempts = 2;
        ended.started_at = Some(1_500);
        ended.completed_at = Some(2_750);
        ended.webhook =
            Some(WebhookState { status: "failed".into(), attempts: 5, last_error: Some("HTTP 500".into()) });
        for record in [queued, ended] {
            let status = RequestStatus::of(&RequestState::of(&record));
            let mut written = Vec::new();
            status.write(&mut written);
            assert_eq!(String::from_utf8(written).unwrap(), serde_json::to_string(&status).unwrap());
        }
    }
}
