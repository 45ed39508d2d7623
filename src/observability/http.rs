//! The HTTP metrics middleware: counts every answer by method, route template
//! (axum's `MatchedPath`, never the raw path) and status class, and times it.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Records one request in `muxi_http_requests_total` and its latency.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    let response = next.run(request).await;
    super::metrics::http_request(method.as_str(), route, response.status().as_u16(), started.elapsed());
    response
}
