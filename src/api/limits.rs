//! Limits on what a client sends, answered in the JSON error envelope: request
//! headers over [`MAX_HEADER_BYTES`](crate::http_server::MAX_HEADER_BYTES) (431
//! `headers_too_large`), a body not received within the read timeout (408
//! `body_read_timeout`, see [`read_deadline`]), and a last net, [`json_errors`],
//! that puts any error answer that is not JSON yet (a rejection from axum or
//! tower) into the envelope with a stable code.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::error::{ApiError, Code};
use crate::http_server::MAX_HEADER_BYTES;

/// The error a request body stream ends with when its deadline passes.
#[derive(Debug)]
pub struct BodyReadTimeout(pub Duration);

impl std::fmt::Display for BodyReadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body was not received within {} s", self.0.as_secs())
    }
}

impl std::error::Error for BodyReadTimeout {}

/// Whether an error (or one of its causes) is a [`BodyReadTimeout`].
pub fn timed_out<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e BodyReadTimeout> {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(timeout) = err.downcast_ref::<BodyReadTimeout>() {
            return Some(timeout);
        }
        cause = err.source();
    }
    None
}

/// Refuses oversized headers, and gives a request body the read timeout to
/// arrive in full: past it, reading the body fails with [`BodyReadTimeout`].
pub async fn read_deadline(request: Request, next: Next) -> Response {
    let size: usize = request.uri().to_string().len()
        + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return ApiError::new(
            Code::HeadersTooLarge,
            format!("the request headers take {size} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        )
        .into_response();
    }
    let empty = request.headers().get(CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == b"0")
        || (request.headers().get(CONTENT_LENGTH).is_none()
            && request.headers().get(axum::http::header::TRANSFER_ENCODING).is_none());
    if empty {
        return next.run(request).await;
    }
    let timeout = crate::http_server::read_timeout();
    let (parts, body) = request.into_parts();
    let deadline = Box::pin(tokio::time::sleep(timeout));
    let stream = futures::stream::unfold((body.into_data_stream(), deadline, false), move |state| async move {
        let (mut data, mut deadline, done) = state;
        if done {
            return None;
        }
        tokio::select! {
            chunk = data.next() => {
                let chunk: Result<Bytes, axum::BoxError> = chunk?.map_err(Into::into);
                Some((chunk, (data, deadline, false)))
            }
            _ = &mut deadline => {
                let err: axum::BoxError = Box::new(BodyReadTimeout(timeout));
                Some((Err(err), (data, deadline, true)))
            }
        }
    });
    next.run(Request::from_parts(parts, Body::from_stream(stream))).await
}

/// Puts an error answer that is not JSON (nor SSE) into the JSON envelope.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if status.as_u16() < 400 || content_type.starts_with("application/json") || content_type == "text/event-stream" {
        return response;
    }
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
