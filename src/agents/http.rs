//! The `http` agent kind: a remote service does the work.
//!
//! The [`AgentRequest`] is POSTed as JSON to the agent's `url`. A 2xx answer is
//! the output, read from a JSON body `{"result": "text", "artifacts": [...]}`
//! (`text` or `content` are accepted for `result`), or else from the body as
//! plain text. 429 and 5xx answers are retryable (with `Retry-After` when
//! given), other statuses are not; an unreachable service is retryable.
//!
//! The helpers at the bottom (status mapping, `Retry-After`, bounded body
//! reads, transport errors) are shared with the `llm` kind.

use std::error::Error as _;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::Value;

use super::{AgentContext, AgentEvent, AgentFailure, AgentOutput, AgentRequest, Events, ProgressUpdate};
use crate::formation::{AgentKind, AgentSpec};

/// The most of a response body an HTTP agent's answer may hold.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

pub async fn run(
    ctx: &AgentContext,
    spec: &AgentSpec,
    request: AgentRequest,
    events: Events,
) -> Result<AgentOutput, AgentFailure> {
    let AgentKind::Http { url } = &spec.kind else {
        return Err(AgentFailure::new("agent_error", format!("agent {} is not an http agent", spec.id), false));
    };
    let host = host_of(url);
    let _ = events.send(AgentEvent::Progress(ProgressUpdate {
        progress: Some(0.0),
        step: Some(format!("Calling {host}")),
        total_steps: Some(1),
        completed_steps: Some(0),
        message: None,
    }));
    tracing::debug!(agent = %spec.id, %host, "calling http agent");

    let response = ctx
        .http
        .post(url.as_str())
        .json(&request)
        .send()
        .await
        .map_err(|e| transport_failure(&e, &format!("the agent service at {host}")))?;

    let status = response.status();
    let retry_after = retry_after(response.headers());
    let (body, truncated) = read_limited(response, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| transport_failure(&e, &format!("the agent service at {host}")))?;
    if truncated && status.is_success() {
        // A cut answer is a wrong answer: refuse it rather than return part of it.
        return Err(AgentFailure::new(
            "agent_error",
            format!("the agent service at {host} answered more than {MAX_ANSWER_BYTES} bytes"),
            false,
        ));
    }

    if !status.is_success() {
        let detail = error_detail(&body);
        let message = format!("the agent service at {host} answered HTTP {}{}", status_text(status), detail);
        return Err(status_failure(status, "agent_error", message, retry_after));
    }
    Ok(parse_answer(&body))
}

/// Reads the output from a 2xx body: JSON with `result`/`text`/`content`, or plain text.
fn parse_answer(body: &str) -> AgentOutput {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(body) else {
        return AgentOutput { text: body.to_string(), artifacts: Vec::new() };
    };
    let text = ["result", "text", "content"].iter().find_map(|k| map.get(*k)).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let artifacts = match map.get("artifacts") {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    match text {
        Some(text) => AgentOutput { text, artifacts },
        None => AgentOutput { text: body.to_string(), artifacts },
    }
}

// ---- helpers shared with the `llm` kind ----

/// `host[:port]` of a URL, for messages (never the path, query or credentials).
pub(crate) fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => "(no host)".to_string(),
        },
        Err(_) => "(invalid URL)".to_string(),
    }
}

/// A failure to talk to `what` at all: connection refused, DNS, timeout, reset.
/// Retryable, kind `unreachable`. The message names the cause but never the
/// URL (reqwest's own message carries it, and a URL may carry credentials).
pub(crate) fn transport_failure(err: &reqwest::Error, what: &str) -> AgentFailure {
    let cause = if err.is_timeout() {
        "timed out".to_string()
    } else {
        // The innermost cause says most ("Connection refused (os error 111)").
        let mut innermost = None;
        let mut next = err.source();
        while let Some(cause) = next {
            innermost = Some(cause);
            next = cause.source();
        }
        match innermost {
            Some(cause) => cause.to_string(),
            None if err.is_connect() => "connection failed".to_string(),
            None if err.is_body() || err.is_decode() => "the connection broke while reading the answer".to_string(),
            None => "request failed".to_string(),
        }
    };
    AgentFailure::new("unreachable", format!("could not reach {what}: {cause}"), true)
}

/// Maps a non-2xx status to a failure: 429 -> `rate_limited`, 5xx -> `kind`,
/// both retryable with `retry_after`; any other status -> `kind`, not retryable.
pub(crate) fn status_failure(
    status: StatusCode,
    kind: &str,
    message: String,
    retry_after: Option<Duration>,
) -> AgentFailure {
    let (kind, retryable) = if status == StatusCode::TOO_MANY_REQUESTS {
        ("rate_limited", true)
    } else if status.is_server_error() {
        (kind, true)
    } else {
        (kind, false)
    };
    let mut failure = AgentFailure::new(kind, message, retryable);
    if retryable {
        failure.retry_after = retry_after;
    }
    failure
}

/// `429 Too Many Requests`.
pub(crate) fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// `: <message>` from an error body (`error.message`, `error`, `message`, `detail`,
/// or the text itself, shortened), or nothing for an empty body.
pub(crate) fn error_detail(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let candidates = [v.pointer("/error/message"), v.get("error"), v.get("message"), v.get("detail")];
        candidates.into_iter().flatten().find_map(|c| c.as_str().map(str::to_string))
    });
    let text = from_json.unwrap_or_else(|| body.trim().to_string());
    if text.is_empty() {
        String::new()
    } else {
        format!(": {}", truncate_utf8(&text, 500))
    }
}

/// The `Retry-After` delay of a response (see [`crate::time::retry_after`]).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    crate::time::retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?, crate::time::now_ms())
}

/// Reads at most `limit` bytes of a body as (lossy) UTF-8; `true` when cut short.
pub(crate) async fn read_limited(response: reqwest::Response, limit: usize) -> Result<(String, bool), reqwest::Error> {
    let mut body = Vec::new();
    let mut truncated = false;
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if truncated {
        // A cut may split the last character: drop the replacement it became.
        while text.ends_with('\u{FFFD}') {
            text.pop();
        }
    }
    Ok((text, truncated))
}

/// At most `max` bytes of `s`, cut on a character boundary, with `…` when cut.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{formation_with_agents, http_agent};
    use axum::http::HeaderValue;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::{Json, Router};

    fn request(message: &str) -> AgentRequest {
        AgentRequest {
            request_id: "req_1".into(),
            formation_id: "test".into(),
            agent_id: "remote".into(),
            user_id: "u".into(),
            session_id: None,
            message: message.into(),
            attempt: 1,
            history: Vec::new(),
        }
    }

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/work")
    }

    async fn call(url: &str, message: &str) -> (Result<AgentOutput, AgentFailure>, Vec<AgentEvent>) {
        let spec = http_agent("remote", url);
        let formation = formation_with_agents(vec![spec.clone()]);
        let (tx, recorded) = Events::recorder();
        let out = super::super::run(&AgentContext::new(), &formation, &spec, request(message), tx).await;
        let events = recorded.lock().unwrap().clone();
        (out, events)
    }

    #[tokio::test]
    async fn success_returns_result_and_artifacts() {
        let app = Router::new().route(
            "/work",
            post(|Json(body): Json<Value>| async move {
                let msg = body["message"].as_str().unwrap_or_default().to_uppercase();
                Json(serde_json::json!({"result": msg, "artifacts": [{"name": "a.txt"}]}))
            }),
        );
        let url = serve(app).await;
        let (out, events) = call(&url, "hello").await;
        let out = out.expect("success");
        assert_eq!(out.text, "HELLO");
        assert_eq!(out.artifacts, vec![serde_json::json!({"name": "a.txt"})]);
        match &events[0] {
            AgentEvent::Progress(p) => assert!(p.step.as_deref().unwrap_or("").starts_with("Calling 127.0.0.1:")),
            other => panic!("expected progress, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn plain_text_and_text_key_bodies() {
        let app = Router::new()
            .route("/work", post(|| async { "just text" }))
            .route("/text", post(|| async { Json(serde_json::json!({"text": "from text"})) }));
        let url = serve(app).await;
        assert_eq!(call(&url, "x").await.0.expect("ok").text, "just text");
        let url = url.replace("/work", "/text");
        assert_eq!(call(&url, "x").await.0.expect("ok").text, "from text");
    }

    #[tokio::test]
    async fn service_unavailable_is_retryable_with_retry_after() {
        let app = Router::new().route(
            "/work",
            post(|| async {
                let mut r = (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
                r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("3"));
                r
            }),
        );
        let url = serve(app).await;
        let err = call(&url, "x").await.0.expect_err("503 fails");
        assert_eq!(err.kind, "agent_error");
        assert!(err.retryable);
        assert_eq!(err.retry_after, Some(Duration::from_secs(3)));
        assert!(err.message.contains("503"), "{}", err.message);
        assert!(err.message.contains("busy"), "{}", err.message);
    }

    #[tokio::test]
    async fn not_found_is_not_retryable() {
        let url = serve(Router::new()).await;
        let err = call(&url, "x").await.0.expect_err("404 fails");
        assert!(!err.retryable);
        assert_eq!(err.kind, "agent_error");
        assert!(err.message.contains("404"), "{}", err.message);
    }

    #[tokio::test]
    async fn unreachable_is_retryable() {
        let (_held, addr) = crate::testing::closed_port();
        let err = call(&format!("http://{addr}/work"), "x").await.0.expect_err("refused");
        assert_eq!(err.kind, "unreachable");
        assert!(err.retryable);
        assert!(err.message.contains(&addr.to_string()), "{}", err.message);
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        // More seconds than a Duration holds: capped, never a panic.
        h.insert(RETRY_AFTER, HeaderValue::from_static("1e20"));
        assert_eq!(retry_after(&h), Some(crate::time::MAX_RETRY_AFTER));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h…");
        assert_eq!(truncate_utf8("abc", 5), "abc");
    }
}
