//! Body extractors whose every failure is an [`ApiError`] with a stable code:
//! malformed JSON, a wrong-typed field (named), a body over the limit, a body
//! not received within the read timeout (408 `body_read_timeout`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, Code};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// The request's headers and its JSON body. The headers are moved out of the
/// request, where axum's `HeaderMap` extractor copies them.
pub struct HeadersAndJson<T>(pub HeaderMap, pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for HeadersAndJson<T> {
    type Rejection = ApiError;

    async fn from_request(mut req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = std::mem::take(req.headers_mut());
        let JsonBody(body) = JsonBody::from_request(req, state).await?;
        Ok(HeadersAndJson(headers, body))
    }
}

/// The request's headers, moved out of the request (for handlers with no body,
/// where axum's `HeaderMap` extractor would copy them).
pub struct Headers(pub HeaderMap);

impl<S: Send + Sync> FromRequest<S> for Headers {
    type Rejection = ApiError;

    async fn from_request(mut req: Request, _state: &S) -> Result<Self, ApiError> {
        Ok(Headers(std::mem::take(req.headers_mut())))
    }
}

/// The body's bytes, read in full within the read timeout.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let timeout = crate::http_server::read_timeout();
        match tokio::time::timeout(timeout, Bytes::from_request(req, state)).await {
            Ok(read) => read.map(RawBody).map_err(unreadable),
            Err(_) => Err(ApiError::new(
                Code::BodyReadTimeout,
                format!("the request body was not received within {} s", timeout.as_secs()),
            )),
        }
    }
}

/// The error for a body that could not be read (too large, broken connection).
pub fn unreadable(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(Code::PayloadTooLarge, format!("the request body is larger than {MAX_BODY_BYTES} bytes"))
    } else {
        ApiError::new(Code::InvalidRequest, format!("cannot read the request body: {rejection}"))
    }
}

/// Parses a JSON body into `T`, naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(Code::InvalidJson, "the request body is empty; send a JSON object"));
    }
    // The path to a bad field is tracked only once the body is known to be bad.
    if let Ok(parsed) = serde_json::from_slice(bytes) {
        return Ok(parsed);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(Code::InvalidJson, format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::new(Code::InvalidRequest, format!("the request body must be a JSON object: {inner}"))
        } else {
            ApiError::new(Code::InvalidRequest, format!("field `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        message: String,
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(parse::<Body>(b"").unwrap_err().code, Code::InvalidJson);
        assert_eq!(parse::<Body>(b"{\"message\": ").unwrap_err().code, Code::InvalidJson);
        let wrong = parse::<Body>(b"{\"message\": 5}").unwrap_err();
        assert_eq!(wrong.code, Code::InvalidRequest);
        assert!(wrong.message.contains("`message`"), "{}", wrong.message);
        assert_eq!(parse::<Body>(b"[1]").unwrap_err().code, Code::InvalidRequest);
    }
}
