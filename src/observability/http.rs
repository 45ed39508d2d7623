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
    route: Route,
}

/// The route template a request was matched to.
enum Route {
    /// By axum's router.
    Matched(MatchedPath),
    /// By the API's front door, which matches its routes itself.
    Named(&'static str),
    /// By neither: an answer of the fallback.
    Unmatched,
}

impl Timing {
    /// Timing of a request matched by axum's router (or by none).
    pub fn start(request: &Request) -> Timing {
        let route = request.extensions().get::<MatchedPath>().cloned().map_or(Route::Unmatched, Route::Matched);
        Timing { started: Instant::now(), method: request.method().clone(), route }
    }

    /// Timing of a request matched to `route` (its template) without the router.
    pub fn start_named(request: &Request, route: &'static str) -> Timing {
        Timing { started: Instant::now(), method: request.method().clone(), route: Route::Named(route) }
    }

    /// The route template; `unmatched` for an answer of the fallback.
    pub fn route(&self) -> &str {
        match &self.route {
            Route::Matched(path) => path.as_str(),
            Route::Named(route) => route,
            Route::Unmatched => "unmatched",
        }
    }

    /// Records the answer in `muxi_http_requests_total` and its latency.
    pub fn finish(self, status: u16) {
        super::metrics::http_request(self.method.as_str(), self.route(), status, self.started.elapsed());
    }
}
