//! The MUXI success envelope every API answer is wrapped in.
//!
//! `{"object", "timestamp", "type", "request": {"id", "idempotency_key"},
//! "success": true, "error": null, "data": {...}}`; the SDK unwraps `data`.
//! Serialised straight from these structs: no intermediate JSON tree.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{ApiError, Code};

/// The envelope around an answer's `data`.
#[derive(Debug, Serialize)]
pub struct Envelope<'a, T> {
    object: &'static str,
    timestamp: i64,
    #[serde(rename = "type")]
    kind: &'a str,
    request: RequestRef<'a>,
    success: bool,
    error: Option<()>,
    data: T,
}

#[derive(Debug, Serialize)]
struct RequestRef<'a> {
    id: Option<&'a str>,
    idempotency_key: Option<&'a str>,
}

/// Wraps `data` in the envelope. `kind` is the answer's type, e.g. `chat.completed`.
pub fn ok<'a, T: Serialize>(
    kind: &'a str,
    request_id: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    data: T,
) -> Response {
    let envelope = Envelope {
        object: "message",
        timestamp: crate::time::now_ms(),
        kind,
        request: RequestRef { id: request_id, idempotency_key },
        success: true,
        error: None,
        data,
    };
    // Sized for a typical answer (a 202 is about 600 bytes): `Json` starts at
    // 128 bytes and grows three times on the way.
    let mut body = Vec::with_capacity(1024);
    match serde_json::to_writer(&mut body, &envelope) {
        Ok(()) => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response(),
        Err(e) => ApiError::new(Code::Internal, format!("cannot serialise the answer: {e}")).into_response(),
    }
}
