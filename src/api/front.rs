//! The front door: the two routes clients call most, a status poll (`GET
//! /api/{formation_id}/v1/requests/{request_id}`) and a chat (`POST
//! /api/{formation_id}/v1/chat`), matched by hand in front of axum's router.
//!
//! For such a request the router's work was about a tenth of a poll: its
//! match, a percent-decoded shared copy of each path parameter and of the
//! matched path, the extensions that carry them, and the boxed services of
//! the route. Here the parameters are slices of the path. Every other request,
//! and any of these whose path the router would decode or refuse (a `%`
//! escape, an empty segment), goes to the router, which answers as it always
//! has. Both kinds pass the same edge ([`super::edge`]): limits, metrics
//! under the same route template, error shapes.

use std::convert::Infallible;
use std::ops::Range;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::{BoxError, Router};
use futures::future::{BoxFuture, Either};
use tower::Service;

use super::edge::{self, EdgeFuture};
use super::{body, chat, requests, AppState};
use crate::observability::http::Timing;

/// The router, with the two routes clients call most answered in front of it.
#[derive(Clone)]
pub struct Front {
    state: AppState,
    router: Router,
}

impl Front {
    pub fn new(state: AppState, router: Router) -> Front {
        Front { state, router }
    }
}

/// A route the front door answers itself, with where its parameters lie in
/// the request's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hot {
    /// `GET /api/{formation_id}/v1/requests/{request_id}`
    Status { formation_id: Range<usize>, request_id: Range<usize> },
    /// `POST /api/{formation_id}/v1/chat`
    Chat { formation_id: Range<usize> },
}

impl Hot {
    /// The route `method` and `path` take past the router, if any.
    fn of(method: &Method, path: &str) -> Option<Hot> {
        const PREFIX: &str = "/api/";
        let rest = path.strip_prefix(PREFIX)?;
        let end = PREFIX.len() + rest.find('/')?;
        let formation_id = PREFIX.len()..end;
        let route = path[end..].strip_prefix("/v1/")?;
        if !is_plain(&path[formation_id.clone()]) {
            return None;
        }
        if method == Method::POST && route == "chat" {
            return Some(Hot::Chat { formation_id });
        }
        let request_id = route.strip_prefix("requests/").filter(|id| is_plain(id) && !id.contains('/'))?;
        (method == Method::GET)
            .then(|| Hot::Status { formation_id, request_id: path.len() - request_id.len()..path.len() })
    }

    /// The route's template, as the router names it (in metrics).
    fn template(&self) -> &'static str {
        match self {
            Hot::Status { .. } => "/api/{formation_id}/v1/requests/{request_id}",
            Hot::Chat { .. } => "/api/{formation_id}/v1/chat",
        }
    }
}

/// Whether the router would take `segment` as a parameter and decode it to
/// itself: not empty, and no `%` escape.
fn is_plain(segment: &str) -> bool {
    !segment.is_empty() && !segment.contains('%')
}

impl<B> Service<axum::http::Request<B>> for Front
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<EdgeFuture<BoxFuture<'static, Result<Response, Infallible>>>, RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let request = request.map(Body::new);
        match Hot::of(request.method(), request.uri().path()) {
            Some(hot) => {
                let timing = Timing::start_named(&request, hot.template());
                let state = self.state.clone();
                Either::Left(edge::enter(timing, request, |request| -> BoxFuture<'static, _> {
                    Box::pin(answer(state, hot, request))
                }))
            }
            None => Either::Right(self.router.call(request)),
        }
    }
}

/// The answer of a hot route, as its handler behind the router gives it.
async fn answer(state: AppState, hot: Hot, request: Request) -> Result<Response, Infallible> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let answer = async {
        match hot {
            Hot::Status { formation_id, request_id } => {
                requests::status(&state, &path[formation_id], &path[request_id], &parts.headers).await
            }
            Hot::Chat { formation_id } => {
                let chat = body::read_json(body).await?;
                chat::answer(&state, &path[formation_id], &parts.headers, chat).await
            }
        }
    };
    Ok(answer.await.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(method: Method, path: &str) -> Option<(Hot, Vec<&str>)> {
        let hot = Hot::of(&method, path)?;
        let parameters = match &hot {
            Hot::Status { formation_id, request_id } => vec![&path[formation_id.clone()], &path[request_id.clone()]],
            Hot::Chat { formation_id } => vec![&path[formation_id.clone()]],
        };
        Some((hot, parameters))
    }

    #[test]
    fn the_two_routes_are_matched_with_their_parameters() {
        let (hot, parameters) = of(Method::GET, "/api/support/v1/requests/req_01abc").unwrap();
        assert!(matches!(hot, Hot::Status { .. }));
        assert_eq!(parameters, ["support", "req_01abc"]);
        let (hot, parameters) = of(Method::POST, "/api/a-b_c/v1/chat").unwrap();
        assert!(matches!(hot, Hot::Chat { .. }));
        assert_eq!(parameters, ["a-b_c"]);
        assert_eq!(hot.template(), "/api/{formation_id}/v1/chat");
    }

    /// Anything else is the router's: other methods, routes and shapes, and
    /// parameters it would decode or refuse.
    #[test]
    fn everything_else_goes_to_the_router() {
        for (method, path) in [
            (Method::POST, "/api/support/v1/requests/req_1"),
            (Method::DELETE, "/api/support/v1/requests/req_1"),
            (Method::HEAD, "/api/support/v1/requests/req_1"),
            (Method::GET, "/api/support/v1/chat"),
            (Method::GET, "/api/support/v1/requests"),
            (Method::GET, "/api/support/v1/requests/"),
            (Method::GET, "/api/support/v1/requests/req_1/events"),
            (Method::GET, "/api/support/v1/requests/req%5F1"),
            (Method::POST, "/api/sup%70ort/v1/chat"),
            (Method::POST, "/api//v1/chat"),
            (Method::POST, "/api/support/v1/chat/"),
            (Method::POST, "/api/support/v2/chat"),
            (Method::POST, "/api/support"),
            (Method::POST, "/v1/chat"),
            (Method::GET, "/api/support/v1/admin/requests/req_1"),
        ] {
            assert_eq!(Hot::of(&method, path), None, "{method} {path}");
        }
    }
}
