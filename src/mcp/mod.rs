//! Every formation is an MCP server: a Streamable HTTP endpoint at
//! `/api/{formation_id}/v1/mcp`, served by the official Rust SDK (`rmcp`).
//!
//! Both protocols are served: the handshake one (`initialize`, 2025-11-25 and
//! earlier, with `Mcp-Session-Id`) and the stateless 2026-07-28 one
//! (`server/discover`, no session). An MCP execution IS a muxi-rt request (same
//! id, store, progress, cancel, webhooks), scoped to formation and user, never
//! to the MCP session. This module authorizes the HTTP request (client key in
//! `X-Muxi-Client-Key` or `Authorization: Bearer`), names its caller, and hands
//! it to rmcp's tower service; `Host` values outside the allowed list are
//! refused (DNS rebinding).

pub mod server;
pub mod tools;
pub mod views;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, MethodRouter};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tower::ServiceExt;

use crate::api::auth::{self, Role};
use crate::api::body;
use crate::api::AppState;
use crate::error::{ApiError, Code};
use crate::formation::Formation;

use server::FormationServer;

/// Who an MCP HTTP request was authorized for; rmcp hands it to the handler
/// inside the request's parts.
#[derive(Debug, Clone)]
pub struct Caller {
    pub formation_id: String,
    pub user: String,
}

/// The `Host` values the endpoint accepts: the listen address's host (the
/// loopback names when it is a loopback or unspecified address) plus `extra`
/// (`--mcp-allowed-host`). A `*` in `extra` accepts any Host (behind a proxy
/// that checks it). Ports are not compared.
pub fn allowed_hosts(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    if extra.iter().any(|h| h.trim() == "*") {
        return Vec::new();
    }
    let ip = listen.ip();
    let mut hosts: Vec<String> = Vec::new();
    if ip.is_loopback() || ip.is_unspecified() {
        hosts.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    }
    if !ip.is_unspecified() {
        hosts.push(ip.to_string());
    }
    for host in extra.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
        hosts.push(host.to_string());
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Which agents a formation exposes as tools (`mcp.agents`): `None` for all.
pub fn exposed(formation: &Formation) -> Option<&[String]> {
    formation.mcp.agents.as_deref()
}

/// The `/api/{formation_id}/v1/mcp` route (any method: POST, GET for the SSE
/// stream, DELETE to end a session).
pub fn route(state: &AppState) -> MethodRouter<AppState> {
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(state.mcp_allowed_hosts.iter().cloned())
        .with_cancellation_token(state.shutdown.child_token())
        .with_max_request_body_bytes(body::MAX_BODY_BYTES);
    let config = if state.mcp_allowed_hosts.is_empty() { config.disable_allowed_hosts() } else { config };
    let handler_state = state.clone();
    let service: StreamableHttpService<FormationServer, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(FormationServer { state: handler_state.clone() }),
        Default::default(),
        config,
    );
    any(move |state: State<AppState>, path: Path<String>, request: Request| {
        endpoint(state, path, request, service.clone())
    })
}

async fn endpoint(
    State(state): State<AppState>,
    Path(formation_id): Path<String>,
    mut request: Request,
    service: StreamableHttpService<FormationServer, LocalSessionManager>,
) -> Response {
    // A body declared past the limit gets the API's own 413; one sent without
    // a length is cut by the MCP service at the same size (a plain-text 413).
    if body::declared_too_large(request.body()) {
        return body::too_large().into_response();
    }
    let headers = request.headers_mut();
    // `Authorization: Bearer <key>` is the client key, as MCP clients send it.
    if auth::header(headers, auth::CLIENT_KEY).is_none() {
        let bearer = auth::header(headers, header::AUTHORIZATION.as_str())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .and_then(|key| HeaderValue::from_str(key.trim()).ok());
        if let Some(key) = bearer {
            headers.insert(auth::CLIENT_KEY, key);
        }
    }
    match auth::authorize(&state, &formation_id, request.headers(), Role::Client) {
        Err(e) => return e.into_response(),
        Ok(formation) if !formation.mcp.enabled => {
            let message = format!("formation `{formation_id}` does not serve MCP (`mcp.enabled` is false)");
            return ApiError::new(Code::NotFound, message).into_response();
        }
        Ok(_) => {}
    }
    let user = match auth::user_id(request.headers(), None) {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    request.extensions_mut().insert(Caller { formation_id, user });
    match service.oneshot(request).await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_follow_the_listen_address() {
        let loopback = allowed_hosts("127.0.0.1:7890".parse().unwrap(), &[]);
        assert_eq!(loopback, vec!["127.0.0.1", "::1", "localhost"]);
        let any = allowed_hosts("0.0.0.0:80".parse().unwrap(), &["mcp.example.com".into()]);
        assert_eq!(any, vec!["127.0.0.1", "::1", "localhost", "mcp.example.com"]);
        let public = allowed_hosts("10.1.2.3:80".parse().unwrap(), &[" api.example.com ".into()]);
        assert_eq!(public, vec!["10.1.2.3", "api.example.com"]);
        assert!(allowed_hosts("127.0.0.1:1".parse().unwrap(), &["*".into()]).is_empty());
    }
}
