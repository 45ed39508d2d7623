//! The one error type of the HTTP API: a stable machine-readable [`Code`] plus a
//! readable message, mapped to an HTTP status and the MUXI error body in one place.
//!
//! The MUXI SDK reads `code`, then `error`, then `message` at the top level of an
//! error body, so all three are top-level strings here; `error` also carries the
//! same data nested as an object for clients that look there.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Stable error codes. Their string form is part of the public API: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    FormationNotFound,
    MissingApiKey,
    InvalidApiKey,
    RequestNotFound,
    RequestAlreadyFinished,
    InvalidJson,
    InvalidRequest,
    InvalidUserId,
    MissingMessage,
    UnknownAgent,
    PayloadTooLarge,
    HeadersTooLarge,
    BodyReadTimeout,
    TriggerNotFound,
    MissingTriggerData,
    InvalidWebhookUrl,
    WebhookTargetRefused,
    RequestFailed,
    RequestTimeout,
    RequestCancelled,
    NotFound,
    MethodNotAllowed,
    ShuttingDown,
    IdempotencyKeyReused,
    StorageUnavailable,
    Internal,
    DeliveryNotFound,
    DeliveryAlreadyDelivered,
    RequestNotRerunnable,
    SessionNotFound,
    AgentNotFound,
    InvalidLastEventId,
    RateLimited,
}

impl Code {
    /// The wire name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::FormationNotFound => "formation_not_found",
            Code::MissingApiKey => "missing_api_key",
            Code::InvalidApiKey => "invalid_api_key",
            Code::RequestNotFound => "request_not_found",
            Code::RequestAlreadyFinished => "request_already_finished",
            Code::InvalidJson => "invalid_json",
            Code::InvalidRequest => "invalid_request",
            Code::InvalidUserId => "invalid_user_id",
            Code::MissingMessage => "missing_message",
            Code::UnknownAgent => "unknown_agent",
            Code::PayloadTooLarge => "payload_too_large",
            Code::HeadersTooLarge => "headers_too_large",
            Code::BodyReadTimeout => "body_read_timeout",
            Code::TriggerNotFound => "trigger_not_found",
            Code::MissingTriggerData => "missing_trigger_data",
            Code::InvalidWebhookUrl => "invalid_webhook_url",
            Code::WebhookTargetRefused => "webhook_target_refused",
            Code::RequestFailed => "request_failed",
            Code::RequestTimeout => "request_timeout",
            Code::RequestCancelled => "request_cancelled",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::ShuttingDown => "shutting_down",
            Code::IdempotencyKeyReused => "idempotency_key_reused",
            Code::StorageUnavailable => "storage_unavailable",
            Code::Internal => "internal_error",
            Code::DeliveryNotFound => "delivery_not_found",
            Code::DeliveryAlreadyDelivered => "delivery_already_delivered",
            Code::RequestNotRerunnable => "request_not_rerunnable",
            Code::SessionNotFound => "session_not_found",
            Code::AgentNotFound => "agent_not_found",
            Code::InvalidLastEventId => "invalid_last_event_id",
            Code::RateLimited => "rate_limited",
        }
    }

    /// The HTTP status the code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::FormationNotFound | Code::RequestNotFound | Code::TriggerNotFound | Code::NotFound => {
                StatusCode::NOT_FOUND
            }
            Code::MissingApiKey => StatusCode::UNAUTHORIZED,
            Code::InvalidApiKey => StatusCode::FORBIDDEN,
            Code::RequestAlreadyFinished | Code::RequestCancelled | Code::IdempotencyKeyReused => StatusCode::CONFLICT,
            Code::RequestFailed => StatusCode::BAD_GATEWAY,
            Code::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::InvalidJson | Code::InvalidRequest | Code::InvalidUserId | Code::MissingMessage => {
                StatusCode::BAD_REQUEST
            }
            Code::UnknownAgent | Code::MissingTriggerData | Code::InvalidWebhookUrl | Code::WebhookTargetRefused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::BodyReadTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::ShuttingDown | Code::StorageUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::DeliveryNotFound => StatusCode::NOT_FOUND,
            Code::DeliveryAlreadyDelivered | Code::RequestNotRerunnable => StatusCode::CONFLICT,
            Code::SessionNotFound | Code::AgentNotFound => StatusCode::NOT_FOUND,
            Code::InvalidLastEventId => StatusCode::BAD_REQUEST,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// An error answered to an API caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Optional structured detail (for example the fields a trigger misses).
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), details: None }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// An unexpected failure: logged in full, answered without internals.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        ApiError::new(Code::Internal, "internal server error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

/// The store could not be read or written (disk full, I/O error, read-only
/// folder): the caller may try again later; nothing half-done was kept.
impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        tracing::error!(error = %err, "storage failure");
        ApiError::new(Code::StorageUnavailable, "storage is unavailable right now; try again shortly")
    }
}

impl From<crate::engine::SubmitError> for ApiError {
    fn from(err: crate::engine::SubmitError) -> Self {
        match err {
            crate::engine::SubmitError::Store(e) => e.into(),
            crate::engine::SubmitError::KeyReused(earlier) => ApiError::new(
                Code::IdempotencyKeyReused,
                format!(
                    "this idempotency key was used for request `{}`, which asked something else; \
                     use a new key for a new request",
                    earlier.id
                ),
            )
            .with_details(json!({ "request_id": earlier.id })),
            crate::engine::SubmitError::TooManyPending { limit } => crate::api::rate_limit::limited(
                std::time::Duration::from_secs(1),
                &format!("this user already holds {limit} unfinished requests in this formation (overlord.max_pending_per_user)"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let retry_after = self.details.as_ref().and_then(|d| d["retry_after_seconds"].as_u64());
        let body = json!({
            "object": "error",
            "success": false,
            "code": self.code.as_str(),
            "message": self.message,
            "error": {
                "code": self.code.as_str(),
                "message": self.message,
                "details": self.details,
            },
            "timestamp": crate::time::now_ms(),
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert("retry-after", HeaderValue::from_static("5"));
        }
        if let (Code::RateLimited, Some(seconds)) = (self.code, retry_after) {
            response.headers_mut().insert("retry-after", HeaderValue::from(seconds));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body is still on the wire: do not reuse the connection.
            response.headers_mut().insert("connection", HeaderValue::from_static("close"));
        }
        response
    }
}

/// Result alias for API handlers.
pub type ApiResult<T> = Result<T, ApiError>;
