//! HTTP metrics: every answer counted by method, route template (axum's
//! `MatchedPath`, never the raw path) and status class, and timed. Recorded by
//! the API's one layer (`api::edge`) around each route.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;

/// One request being answered, from the moment its route was matched.
pub struct Timing {
    started: Instant,
    method: Method,
    route: Option<MatchedPath>,
}

impl Timing {
    pub fn start(request: &Request) -> Timing {
        Timing {
            started: Instant::now(),
            method: request.method().clone(),
            route: request.extensions().get::<MatchedPath>().cloned(),
        }
    }

    /// The route template; `unmatched` for an answer of the fallback.
    pub fn route(&self) -> &str {
        self.route.as_ref().map_or("unmatched", MatchedPath::as_str)
    }

    /// Records the answer in `muxi_http_requests_total` and its latency.
    pub fn finish(self, status: u16) {
        super::metrics::http_request(self.method.as_str(), self.route(), status, self.started.elapsed());
    }
}
