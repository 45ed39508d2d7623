//! The MUXI success envelope every API answer is wrapped in.
//!
//! `{"object", "timestamp", "type", "request": {"id", "idempotency_key"},
//! "success": true, "error": null, "data": {...}}`; the SDK unwraps `data`.

use axum::Json;
use serde_json::{json, Value};

/// Wraps `data` in the envelope. `kind` is the answer's type, e.g. `chat.completed`.
pub fn ok(kind: &str, request_id: Option<&str>, idempotency_key: Option<&str>, data: Value) -> Json<Value> {
    Json(json!({
        "object": "message",
        "timestamp": crate::time::now_ms(),
        "type": kind,
        "request": { "id": request_id, "idempotency_key": idempotency_key },
        "success": true,
        "error": null,
        "data": data,
    }))
}
