//! The root mount: one formation also served at `/v1/...`, as the MUXI SDK's
//! `FormationClient(url=...)` expects of a server running one formation. It is
//! the formation named by `serve --default-formation`, else the only one loaded
//! (decided per call, so it follows reloads). A `/v1/...` call is rewritten to
//! `/api/{id}/v1/...` and answered by the same routes.

use axum::extract::Request;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;

use super::AppState;
use crate::error::{ApiError, Code};

/// `app` with `/v1` and `/v1/...` served as the default formation's routes.
pub fn mount(app: Router, state: AppState) -> Router {
    let inner = app.clone();
    let service = tower::service_fn(move |request: Request| {
        let (inner, state) = (inner.clone(), state.clone());
        async move {
            let Some(id) = default_formation(&state) else {
                return Ok::<Response, std::convert::Infallible>(no_default(&state).into_response());
            };
            match rewrite(request.uri(), &id) {
                Some(uri) => {
                    let (mut parts, body) = request.into_parts();
                    parts.uri = uri;
                    // The outer route's path parameters must not reach the inner routes.
                    parts.extensions = Default::default();
                    inner.oneshot(Request::from_parts(parts, body)).await
                }
                None => {
                    Ok(ApiError::new(Code::NotFound, format!("no route for {}", request.uri().path())).into_response())
                }
            }
        }
    });
    // Into `app` itself: a router in front of it would cost every other
    // request one more route lookup and service clone.
    app.route_service("/v1", service.clone()).route_service("/v1/{*rest}", service)
}

/// The formation served at the root, if any.
pub fn default_formation(state: &AppState) -> Option<String> {
    if let Some(id) = &state.default_formation {
        return Some(id.clone());
    }
    let live = state.registry.snapshot();
    match live.formations.len() {
        1 => live.formations.keys().next().cloned(),
        _ => None,
    }
}

fn no_default(state: &AppState) -> ApiError {
    let count = state.registry.snapshot().formations.len();
    ApiError::new(
        Code::FormationNotFound,
        format!(
            "no formation is served at /v1: {count} formations are loaded; call /api/{{formation_id}}/v1/... or \
             start the server with --default-formation ID"
        ),
    )
}

/// `/v1/x?q` -> `/api/{id}/v1/x?q`.
fn rewrite(uri: &Uri, id: &str) -> Option<Uri> {
    let path_and_query = uri.path_and_query()?.as_str();
    format!("/api/{id}{path_and_query}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_keep_the_query() {
        let uri: Uri = "/v1/requests?limit=3".parse().unwrap();
        assert_eq!(rewrite(&uri, "f").unwrap().to_string(), "/api/f/v1/requests?limit=3");
    }
}
