//! The HTTP API: every formation under `/api/{formation_id}/v1/...`, plus a
//! server-wide `GET /health`. Handlers live in one file per resource.

pub mod admin;
pub mod auth;
pub mod body;
pub mod chat;
pub mod config;
pub mod envelope;
pub mod events;
pub mod extract;
pub mod feed;
pub mod formations;
pub mod limits;
pub mod params;
pub mod rate_limit;
pub mod requests;
pub mod root;
pub mod sessions;
pub mod triggers;
pub mod views;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::error::{ApiError, Code};
use crate::registry::Registry;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub engine: Arc<Engine>,
    /// Hosts webhook URLs may point at even when they resolve to private addresses.
    pub allow_webhook_hosts: Arc<Vec<String>>,
    /// `Host` values the MCP endpoint accepts (empty: any).
    pub mcp_allowed_hosts: Arc<Vec<String>>,
    pub started_at: std::time::Instant,
    pub shutdown: CancellationToken,
    /// The formation also served at `/v1/...` (`serve --default-formation`);
    /// without one, the only formation loaded, if there is exactly one.
    pub default_formation: Option<String>,
    /// Rate limits per server and per formation (see `rate_limit`).
    pub rate_limits: Arc<rate_limit::RateLimits>,
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let formation = Router::new()
        .route("/health", get(formations::health))
        .route("/status", get(formations::status))
        .route("/async", get(formations::async_settings))
        .route("/formation", get(formations::describe))
        .route("/chat", axum::routing::post(chat::chat))
        .route("/requests", get(requests::list))
        .route("/requests/{request_id}", get(requests::get).delete(requests::cancel))
        .route("/requests/{request_id}/events", get(events::follow))
        .route("/events/{session_id}/{request_id}", get(events::follow_in_session))
        .route("/triggers", get(triggers::list))
        .route("/triggers/{name}", get(triggers::show).post(triggers::fire))
        .route("/admin/formation", get(admin::formation))
        .route("/admin/requests", get(admin::list))
        .route("/admin/requests/{request_id}", get(admin::show).delete(admin::cancel))
        .route("/admin/requests/{request_id}/events", get(admin::follow))
        .route("/admin/requests/{request_id}/rerun", axum::routing::post(admin::rerun))
        .route("/admin/deliveries/{request_id}/retry", axum::routing::post(admin::retry_delivery))
        .route("/sessions", get(sessions::list))
        .route("/sessions/{session_id}", get(sessions::show))
        .route("/sessions/{session_id}/messages", get(sessions::messages))
        .route("/sessions/{session_id}/restore", axum::routing::post(sessions::restore))
        .route("/events", get(feed::stream))
        .route("/events/{session_id}", get(feed::stream_session))
        .route("/agents", get(config::agents))
        .route("/agents/{agent_id}", get(config::agent))
        .route("/config", get(config::config));
    let app = Router::new()
        .route("/health", get(formations::server_health))
        .nest("/api/{formation_id}/v1", formation)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(limits::guard))
        .layer(middleware::from_fn(sse_errors))
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        // After the layers: MCP answers are JSON-RPC or SSE as rmcp makes them.
        .route("/api/{formation_id}/v1/mcp", crate::mcp::route(&state))
        .layer(middleware::from_fn(crate::observability::http::track))
        .with_state(state.clone());
    root::mount(app, state)
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(Code::MethodNotAllowed, format!("{} is not allowed on {}", method, uri.path()))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(Code::NotFound, format!("no route for {}", uri.path()))
}

/// A caller that asked for Server-Sent Events gets its error as an SSE
/// `event: error` frame (same status), which is where SSE clients such as the
/// MUXI SDK look for it; a JSON body would read as an empty stream.
async fn sse_errors(request: Request, next: Next) -> Response {
    let wants_sse =
        request.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    let response = next.run(request).await;
    let is_json_error = response.status().as_u16() >= 400
        && response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
    if !wants_sse || !is_json_error {
        return response;
    }
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
