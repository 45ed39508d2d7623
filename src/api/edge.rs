//! The one layer around every route: HTTP metrics, and the limits and error
//! shapes of [`super::limits`] (except on the MCP route, whose answers are
//! JSON-RPC or SSE as rmcp makes them).
//!
//! A tower layer of its own rather than `axum::middleware::from_fn`, which
//! clones the route's service and boxes a future for every request: here the
//! route's future is held in place, and only an error answer that must be
//! reshaped (rare) takes a boxed future.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use tower::{Layer, Service};

use super::limits::{self, Asked};
use crate::observability::http::Timing;

/// Wraps each route in [`Edge`].
#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer;

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner }
    }
}

/// A route with the edge's checks before it and its metrics and error shapes after.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let timing = Timing::start(&request);
        if timing.route().ends_with("/mcp") {
            let state = State::Route { future: self.inner.call(request) };
            return EdgeFuture { timing: Some(timing), asked: None, state };
        }
        enter(timing, request, |request| self.inner.call(request))
    }
}

/// `request`, matched to a route (`timing` names it) and answered by `route`,
/// through the edge's checks, metrics and error shapes: what [`Edge`] does for
/// a route of the router, for the front door's own (`super::front`).
pub fn enter<F>(timing: Timing, request: Request, route: impl FnOnce(Request) -> F) -> EdgeFuture<F> {
    let (asked, admitted) = limits::admit(&request);
    let state = match admitted {
        Ok(()) => State::Route { future: route(request) },
        Err(refusal) => State::Reshaping { future: Box::pin(limits::reshape(refusal, asked)) },
    };
    EdgeFuture { timing: Some(timing), asked: Some(asked), state }
}

pin_project_lite::pin_project! {
    /// The answer of an [`Edge`]: the route's, reshaped if it must be, timed.
    pub struct EdgeFuture<F> {
        // Taken when the answer is recorded, once.
        timing: Option<Timing>,
        // `None` on the MCP route: its answers are left as they are.
        asked: Option<Asked>,
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<F> {
        Route { #[pin] future: F },
        Reshaping { future: Pin<Box<dyn Future<Output = Response> + Send>> },
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let response = loop {
            match this.state.as_mut().project() {
                StateProjection::Route { future } => {
                    let Ok(response) = ready!(future.poll(cx));
                    match *this.asked {
                        Some(asked) if limits::needs_reshaping(&response, asked) => {
                            let future = Box::pin(limits::reshape(response, asked));
                            this.state.set(State::Reshaping { future });
                        }
                        _ => break response,
                    }
                }
                StateProjection::Reshaping { future } => break ready!(future.as_mut().poll(cx)),
            }
        };
        if let Some(timing) = this.timing.take() {
            timing.finish(response.status().as_u16());
        }
        Poll::Ready(Ok(response))
    }
}
