//! Limits on what a client sends, and the shape of every error answer, applied
//! around every route by [`super::edge`]: request headers over
//! [`MAX_HEADER_BYTES`](crate::http_server::MAX_HEADER_BYTES) are a 431
//! `headers_too_large`; any error answer that is not JSON yet (a rejection
//! from axum or tower) is put into the envelope with a stable code; and a
//! caller that asked for Server-Sent Events gets its error as an SSE `event:
//! error` frame. The body read timeout (408 `body_read_timeout`) is applied
//! where bodies are read, in [`super::body`].

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Code};
use crate::http_server::MAX_HEADER_BYTES;

/// What [`admit`] learnt of a request that its answer's shape depends on.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// The caller asked for Server-Sent Events: an error goes to it as a frame.
    wants_sse: bool,
}

/// Checks a request before its route runs: `Err` is the answer for one
/// refused here (headers over the limit), still to be [`reshape`]d.
pub fn admit(request: &Request) -> (Asked, Result<(), Response>) {
    let size = header_bytes(request);
    let wants_sse =
        request.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    let admitted = if size > MAX_HEADER_BYTES {
        Err(ApiError::new(
            Code::HeadersTooLarge,
            format!("the request headers take {size} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        )
        .into_response())
    } else {
        Ok(())
    };
    (Asked { wants_sse }, admitted)
}

/// Whether `response` must be reshaped (by [`reshape`]): an error that is
/// not JSON yet, or one for an SSE caller. Successes and SSE streams never are.
pub fn needs_reshaping(response: &Response, asked: Asked) -> bool {
    if response.status().as_u16() < 400 {
        return false;
    }
    match response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("") {
        "text/event-stream" => false,
        json if json.starts_with("application/json") => asked.wants_sse,
        _ => true,
    }
}

/// An error answer in the envelope, and for an SSE caller in an SSE frame.
pub async fn reshape(response: Response, asked: Asked) -> Response {
    let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let response = if content_type.starts_with("application/json") { response } else { enveloped(response).await };
    if asked.wants_sse {
        as_sse_error(response).await
    } else {
        response
    }
}

/// A JSON error answer as an SSE `event: error` frame (same status), which is
/// where SSE clients such as the MUXI SDK look for it; a JSON body would read
/// as an empty stream.
async fn as_sse_error(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1024 * 1024).await.unwrap_or_default();
    let error: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = error["code"].as_str().unwrap_or("internal_error");
    let message = error["message"].as_str().unwrap_or("request failed");
    let frame = serde_json::json!({
        "type": code,
        "code": code,
        "error": message,
        "message": message,
        "status": parts.status.as_u16(),
    });
    parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(format!("event: error\ndata: {frame}\n\n")))
}

/// About the size of the request head: target, names, values, separators.
fn header_bytes(request: &Request) -> usize {
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    target + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>()
}

/// The same status, its plain-text reason as the message, in the envelope.
async fn enveloped(response: Response) -> Response {
    let status = response.status();
    let text = axum::body::to_bytes(response.into_body(), 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        _ if status.is_server_error() => "internal server error".to_string(),
        "" => status.canonical_reason().unwrap_or("request refused").to_string(),
        text => text.to_string(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Code::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => Code::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => Code::BodyReadTimeout,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Code::HeadersTooLarge,
        s if s.is_client_error() => Code::InvalidRequest,
        _ => Code::Internal,
    };
    let mut answer = ApiError::new(code, message).into_response();
    // The status stays what it was (a 415 stays a 415).
    *answer.status_mut() = status;
    answer
}
