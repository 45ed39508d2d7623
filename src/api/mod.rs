//! The HTTP API: every formation under `/api/{formation_id}/v1/...`, plus a
//! server-wide `GET /health`. Handlers live in one file per resource.

pub mod auth;
pub mod body;
pub mod chat;
pub mod envelope;
pub mod events;
pub mod formations;
pub mod requests;
pub mod triggers;
pub mod views;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
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
    pub started_at: std::time::Instant,
    pub shutdown: CancellationToken,
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
        .route("/triggers/{name}", get(triggers::show).post(triggers::fire));
    Router::new()
        .route("/health", get(formations::server_health))
        .nest("/api/{formation_id}/v1", formation)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(Code::NotFound, format!("no route for {}", uri.path()))
}
