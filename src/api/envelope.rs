//! The MUXI success envelope every API answer is wrapped in.
//!
//! `{"object", "timestamp", "type", "request": {"id", "idempotency_key"},
//! "success": true, "error": null, "data": {...}}`; the SDK unwraps `data`.
//! Written field by field ([`super::json`]): no intermediate JSON tree.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::json::Object;
use crate::error::{ApiError, Code};

/// Wraps `data` in the envelope. `kind` is the answer's type, e.g. `chat.completed`.
pub fn ok<'a, T: Serialize>(
    kind: &'a str,
    request_id: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    data: T,
) -> Response {
    let mut failed = None;
    let body = written(kind, request_id, idempotency_key, |buf| {
        if let Err(e) = serde_json::to_writer(buf, &data) {
            failed = Some(e);
        }
    });
    match failed {
        None => json(body),
        Some(e) => ApiError::new(Code::Internal, format!("cannot serialise the answer: {e}")).into_response(),
    }
}

/// Wraps the `data` that `write` writes (a JSON value, by [`super::json`]).
pub fn ok_written(
    kind: &str,
    request_id: Option<&str>,
    idempotency_key: Option<&str>,
    write: impl FnOnce(&mut Vec<u8>),
) -> Response {
    json(written(kind, request_id, idempotency_key, write))
}

fn written(
    kind: &str,
    request_id: Option<&str>,
    idempotency_key: Option<&str>,
    data: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    // Sized for a typical answer (a 202 is about 600 bytes, a status document 800).
    let mut body = Vec::with_capacity(1024);
    let mut envelope = Object::new(&mut body);
    envelope
        .str("object", "message")
        .value("timestamp", &crate::time::now_ms())
        .str("type", kind)
        .object("request", |request| {
            request.opt_str("id", request_id).opt_str("idempotency_key", idempotency_key);
        })
        .raw("success", "true")
        .raw("error", "null")
        .written("data", data);
    envelope.end();
    body
}

/// A JSON answer. Built directly: as a `(headers, Vec<u8>)` answer, axum
/// first gives the body a `Content-Type` of its own, then replaces it.
fn json(body: Vec<u8>) -> Response {
    let mut response = Response::new(axum::body::Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
