//! Limits on what a client sends, answered in the JSON error envelope, in one
//! middleware ([`guard`]): request headers over
//! [`MAX_HEADER_BYTES`](crate::http_server::MAX_HEADER_BYTES) are a 431
//! `headers_too_large`, and any error answer that is not JSON yet (a rejection
//! from axum or tower) is put into the envelope with a stable code. The body
//! read timeout (408 `body_read_timeout`) is applied where bodies are read, in
//! [`super::body`].

use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Code};
use crate::http_server::MAX_HEADER_BYTES;

/// Refuses oversized headers; puts a non-JSON error answer into the envelope.
pub async fn guard(request: Request, next: Next) -> Response {
    let size = header_bytes(&request);
    if size > MAX_HEADER_BYTES {
        return ApiError::new(
            Code::HeadersTooLarge,
            format!("the request headers take {size} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        )
        .into_response();
    }
    let response = next.run(request).await;
    if response.status().as_u16() < 400 {
        return response;
    }
    let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/json") || content_type == "text/event-stream" {
        return response;
    }
    enveloped(response).await
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
