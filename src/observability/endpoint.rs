//! `GET /metrics`: the Prometheus text exposition, on the main listener behind
//! an optional bearer token (`serve --metrics-token`), or on its own listener
//! (`serve --metrics-listen`). Store-derived gauges (the webhook outbox, each
//! formation's queue) are read at scrape time.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::{ApiError, Code};
use crate::store::Store;

/// What the endpoint needs.
#[derive(Clone)]
pub struct MetricsState {
    pub store: Arc<dyn Store>,
    /// The formations whose queues are shown.
    pub registry: Arc<crate::registry::Registry>,
    /// The bearer token scrapers must send (`None`: open).
    pub token: Option<Arc<str>>,
}

/// A router serving `GET /metrics`.
pub fn router(state: MetricsState) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(state)
}

async fn scrape(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    if let Some(want) = &state.token {
        let given = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::new(Code::MissingApiKey, "/metrics needs `Authorization: Bearer <metrics token>`")
                    .into_response()
            }
            Some(token) if !crate::keys::matches(want, token.trim()) => {
                return ApiError::new(Code::InvalidApiKey, "the metrics token given is not valid").into_response()
            }
            Some(_) => {}
        }
    }
    let Some(handle) = super::metrics::handle() else {
        return ApiError::new(Code::NotFound, "metrics are off on this server (serve --no-metrics)").into_response();
    };
    match state.store.outbox_stats(crate::time::now_ms()).await {
        Ok(Some(stats)) => super::metrics::outbox(stats.pending, Duration::from_millis(stats.oldest_age_ms)),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the webhook outbox for /metrics"),
    }
    for formation in state.registry.snapshot().formations.values() {
        match state.store.backlog(&formation.id).await {
            Ok(backlog) => super::metrics::queue_depth(formation, backlog.pending),
            Err(e) => tracing::warn!(error = %e, formation = %formation.id, "cannot read the queue for /metrics"),
        }
    }
    let mut response = handle.render().into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// Drains the histograms' recent samples now and then (the exporter's upkeep),
/// until `shutdown`.
pub fn spawn_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let Some(handle) = super::metrics::handle() else { return };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => handle.run_upkeep(),
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
