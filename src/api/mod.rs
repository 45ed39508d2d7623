//! The HTTP API: every formation under `/api/{formation_id}/v1/...`, plus a
//! server-wide `GET /health`. Handlers live in one file per resource.

pub mod admin;
pub mod auth;
pub mod body;
pub mod chat;
pub mod config;
pub mod edge;
pub mod envelope;
pub mod events;
pub mod extract;
pub mod feed;
pub mod formations;
pub mod front;
pub mod json;
pub mod limits;
pub mod params;
pub mod rate_limit;
pub mod requests;
pub mod root;
pub mod sessions;
pub mod triggers;
pub mod views;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::error::{ApiError, Code};
use crate::registry::Registry;

/// What every handler can reach: one `Arc`, so the clone each request takes
/// is one counter increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The server-wide parts behind [`AppState`].
pub struct Shared {
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

/// All routes. Each formation route is registered under its full path (no
/// nested router), and all pass one layer, [`edge`]: every router and layer
/// costs each request something. Bodies are bounded where they are read, at
/// [`body::MAX_BODY_BYTES`] (`body::RawBody`, and the MCP service's own limit),
/// so no body-limit layer stands in front of every route.
pub fn router(state: AppState) -> Router {
    const BASE: &str = "/api/{formation_id}/v1";
    let routes: [(&str, axum::routing::MethodRouter<AppState>); 26] = [
        ("/health", get(formations::health)),
        ("/status", get(formations::status)),
        ("/async", get(formations::async_settings)),
        ("/formation", get(formations::describe)),
        ("/chat", axum::routing::post(chat::chat)),
        ("/requests", get(requests::list)),
        ("/requests/{request_id}", get(requests::get).delete(requests::cancel)),
        ("/requests/{request_id}/events", get(events::follow)),
        ("/events/{session_id}/{request_id}", get(events::follow_in_session)),
        ("/triggers", get(triggers::list)),
        ("/triggers/{name}", get(triggers::show).post(triggers::fire)),
        ("/admin/formation", get(admin::formation)),
        ("/admin/requests", get(admin::list)),
        ("/admin/requests/{request_id}", get(admin::show).delete(admin::cancel)),
        ("/admin/requests/{request_id}/events", get(admin::follow)),
        ("/admin/requests/{request_id}/rerun", axum::routing::post(admin::rerun)),
        ("/admin/deliveries/{request_id}/retry", axum::routing::post(admin::retry_delivery)),
        ("/sessions", get(sessions::list)),
        ("/sessions/{session_id}", get(sessions::show)),
        ("/sessions/{session_id}/messages", get(sessions::messages)),
        ("/sessions/{session_id}/restore", axum::routing::post(sessions::restore)),
        ("/events", get(feed::stream)),
        ("/events/{session_id}", get(feed::stream_session)),
        ("/agents", get(config::agents)),
        ("/agents/{agent_id}", get(config::agent)),
        ("/config", get(config::config)),
    ];
    let app = routes
        .into_iter()
        .fold(Router::new().route("/health", get(formations::server_health)), |app, (path, route)| {
            app.route(&format!("{BASE}{path}"), route)
        })
        .route(&format!("{BASE}/mcp"), crate::mcp::route(&state))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(edge::EdgeLayer)
        .with_state(state.clone());
    root::mount(app, state)
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(Code::MethodNotAllowed, format!("{} is not allowed on {}", method, uri.path()))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(Code::NotFound, format!("no route for {}", uri.path()))
}
