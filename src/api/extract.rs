//! `Path` and `Query` extractors whose every rejection is an [`ApiError`] with a
//! stable code (axum's own answer plain text): a path segment that is not
//! UTF-8, a duplicate or malformed query field.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, Code};

/// Like `axum::extract::Path`, rejecting with `invalid_request`.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::new(Code::InvalidRequest, format!("bad path: {}", rejection.body_text()))),
        }
    }
}

/// Like `axum::extract::Query`, rejecting with `invalid_request`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => {
                Err(ApiError::new(Code::InvalidRequest, format!("bad query string: {}", rejection.body_text())))
            }
        }
    }
}
