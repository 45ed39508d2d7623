//! A fake OpenAI-compatible model server for tests: real HTTP on `127.0.0.1:0`.
//!
//! It serves `POST /v1/chat/completions` and answers from a queue of scripted
//! [`Reply`]s, in order, one per request. Each reply is rendered the way the
//! request asks: a `chat.completion` JSON object, or, when the request has
//! `"stream": true`, Server-Sent Events of `chat.completion.chunk` objects
//! ending with `data: [DONE]`. When the queue is empty it echoes the last user
//! message back as the answer (the text exactly, nothing added).
//!
//! Every request body is recorded ([`FakeLlm::requests`]) so tests can assert on
//! the prompt: the system message, the history turns, tool results.
//!
//! ```no_run
//! # async fn demo() {
//! use muxi_rt::testing::{FakeLlm, Reply};
//! let llm = FakeLlm::start().await;
//! llm.push(Reply::tool_call("search", serde_json::json!({"q": "rust"})));
//! llm.push(Reply::text("Found it."));
//! // point an agent's `api_base` at `llm.base_url()`, run it, then:
//! assert_eq!(llm.requests().len(), 2);
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

/// One scripted answer of the fake model.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A plain text answer (streamed in word-sized pieces when asked to stream).
    Text(String),
    /// The model asks for tool calls (streamed as deltas when asked to stream).
    ToolCalls(Vec<ScriptedToolCall>),
    /// An HTTP error with an OpenAI-style body `{"error": {"message": ...}}`.
    Error {
        status: u16,
        message: String,
        /// Sent as the `Retry-After` header, as given (e.g. `"7"`).
        retry_after: Option<String>,
    },
    /// Waits `delay`, then answers with `then`.
    Delay { delay: Duration, then: Box<Reply> },
    /// Streams `partial` as content, then holds the connection open without ever
    /// finishing (for cancellation tests). Without `stream: true` it never answers.
    Hang { partial: String },
    /// Streamed: each string as one `data:` frame exactly as given (malformed or
    /// hostile chunks), then `[DONE]`. Not streamed: a 500.
    RawSse(Vec<String>),
}

/// A tool call the fake model makes.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptedToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the JSON string the model sends.
    pub arguments: String,
}

impl Reply {
    /// A text answer.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply::Text(text.into())
    }

    /// A single tool call with a generated id (`call_<name>`).
    pub fn tool_call(name: &str, arguments: Value) -> Reply {
        Reply::ToolCalls(vec![ScriptedToolCall {
            id: format!("call_{name}"),
            name: name.to_string(),
            arguments: arguments.to_string(),
        }])
    }

    /// An HTTP error status with a provider message.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::Error { status, message: message.into(), retry_after: None }
    }

    /// An HTTP error status with a provider message and a `Retry-After` header.
    pub fn error_retry_after(status: u16, message: impl Into<String>, retry_after: &str) -> Reply {
        Reply::Error { status, message: message.into(), retry_after: Some(retry_after.to_string()) }
    }

    /// This reply, after a delay.
    pub fn after(self, delay: Duration) -> Reply {
        Reply::Delay { delay, then: Box::new(self) }
    }
}

#[derive(Default)]
struct Shared {
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Value>>,
    authorizations: Mutex<Vec<Option<String>>>,
    /// Streams whose body was dropped before it finished (the client went away).
    abandoned_streams: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not poison the fake for the others.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running fake model server. Dropping it stops the server.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeLlm {
    /// Binds `127.0.0.1:0` and serves in a background task.
    ///
    /// # Panics
    /// When the loopback socket cannot be bound (a test environment problem).
    pub async fn start() -> FakeLlm {
        let shared = Arc::new(Shared::default());
        let app = Router::new().route("/v1/chat/completions", post(chat_completions)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0 for the fake LLM");
        let addr = listener.local_addr().expect("local address of the fake LLM");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm { addr, shared, server }
    }

    /// The OpenAI-style base URL, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a reply for a later request.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.replies).push_back(reply);
    }

    /// Every request body received so far, in order.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.shared.requests).clone()
    }

    /// The `Authorization` header of every request so far, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        lock(&self.shared.authorizations).clone()
    }

    /// How many streamed answers were abandoned by the client before they ended.
    pub fn abandoned_streams(&self) -> usize {
        self.shared.abandoned_streams.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn chat_completions(State(shared): State<Arc<Shared>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    lock(&shared.authorizations).push(auth);
    lock(&shared.requests).push(body.clone());

    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("fake").to_string();
    let mut reply = lock(&shared.replies).pop_front().unwrap_or_else(|| Reply::Text(last_user_message(&body)));

    while let Reply::Delay { delay, then } = reply {
        tokio::time::sleep(delay).await;
        reply = *then;
    }

    match reply {
        Reply::Error { status, message, retry_after } => error_response(status, &message, retry_after),
        Reply::Text(text) if stream => sse(&shared, text_chunks(&model, &text), false),
        Reply::Text(text) => {
            Json(completion(&model, json!({"role": "assistant", "content": text}), "stop")).into_response()
        }
        Reply::ToolCalls(calls) if stream => sse(&shared, tool_call_chunks(&model, &calls), false),
        Reply::ToolCalls(calls) => {
            let message = json!({"role": "assistant", "content": null, "tool_calls": tool_calls_json(&calls)});
            Json(completion(&model, message, "tool_calls")).into_response()
        }
        Reply::Hang { partial } if stream => {
            let first = chunk(&model, json!({"role": "assistant", "content": partial}), None);
            sse(&shared, vec![first], true)
        }
        Reply::Hang { .. } => {
            std::future::pending::<()>().await;
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Reply::RawSse(frames) if stream => sse_frames(&shared, frames.into_iter().map(Bytes::from).collect(), false),
        Reply::RawSse(_) | Reply::Delay { .. } => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn last_user_message(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|msgs| msgs.iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user")))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string()
}

fn error_response(status: u16, message: &str, retry_after: Option<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"error": {"message": message, "type": "fake_error", "code": status.as_u16()}});
    let mut response = (status, Json(body)).into_response();
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn completion(model: &str, message: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    })
}

fn chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    })
}

/// The text in word-sized pieces (each keeps its trailing space).
fn text_chunks(model: &str, text: &str) -> Vec<Value> {
    let mut chunks = vec![chunk(model, json!({"role": "assistant", "content": ""}), None)];
    for piece in text.split_inclusive(' ') {
        chunks.push(chunk(model, json!({"content": piece}), None));
    }
    chunks.push(chunk(model, json!({}), Some("stop")));
    chunks
}

/// Each call as a head delta (id, name) then its arguments in two fragments.
fn tool_call_chunks(model: &str, calls: &[ScriptedToolCall]) -> Vec<Value> {
    let mut chunks = vec![chunk(model, json!({"role": "assistant", "content": null}), None)];
    for (index, call) in calls.iter().enumerate() {
        let head = json!({"index": index, "id": call.id, "type": "function",
                          "function": {"name": call.name, "arguments": ""}});
        chunks.push(chunk(model, json!({"tool_calls": [head]}), None));
        let mut split = call.arguments.len() / 2;
        while !call.arguments.is_char_boundary(split) {
            split -= 1;
        }
        for fragment in [&call.arguments[..split], &call.arguments[split..]] {
            let delta = json!({"index": index, "function": {"arguments": fragment}});
            chunks.push(chunk(model, json!({"tool_calls": [delta]}), None));
        }
    }
    chunks.push(chunk(model, json!({}), Some("tool_calls")));
    chunks
}

fn tool_calls_json(calls: &[ScriptedToolCall]) -> Value {
    calls
        .iter()
        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

/// Counts the stream as abandoned when its body is dropped before the end.
struct AbandonGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.abandoned_streams.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// An SSE body of `chunks`, then `[DONE]`, or, when `hang`, no end at all.
fn sse(shared: &Arc<Shared>, chunks: Vec<Value>, hang: bool) -> Response {
    sse_frames(shared, chunks.iter().map(|c| Bytes::from(c.to_string())).collect(), hang)
}

/// An SSE body of one `data:` frame per payload, then `[DONE]` or, when `hang`, no end.
fn sse_frames(shared: &Arc<Shared>, payloads: Vec<Bytes>, hang: bool) -> Response {
    let frames: Vec<Bytes> =
        payloads.into_iter().map(|p| Bytes::from([&b"data: "[..], &p, &b"\n\n"[..]].concat())).collect();
    let mut guard = AbandonGuard { shared: shared.clone(), finished: false };
    let head = stream::iter(frames);
    let body: std::pin::Pin<Box<dyn Stream<Item = Bytes> + Send>> = if hang {
        Box::pin(head.chain(stream::once(async move {
            let _guard = guard;
            std::future::pending::<Bytes>().await
        })))
    } else {
        let tail = stream::once(async move {
            guard.finished = true;
            drop(guard);
            Bytes::from_static(b"data: [DONE]\n\n")
        });
        Box::pin(head.chain(tail))
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body.map(Ok::<_, Infallible>)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(llm: &FakeLlm, body: Value) -> (u16, Option<String>, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/chat/completions", llm.base_url()))
            .json(&body)
            .send()
            .await
            .expect("fake answers");
        let status = response.status().as_u16();
        let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        (status, retry, response.json().await.expect("json"))
    }

    #[tokio::test]
    async fn non_streamed_replies_and_echo() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::tool_call("f", json!({"a": 1})));
        llm.push(Reply::error_retry_after(429, "slow", "2").after(Duration::from_millis(10)));
        let msgs = json!({"messages": [{"role": "user", "content": "ping"}]});

        let (status, _, body) = post(&llm, msgs.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], r#"{"a":1}"#);

        let (status, retry, body) = post(&llm, msgs.clone()).await;
        assert_eq!((status, retry.as_deref()), (429, Some("2")));
        assert_eq!(body["error"]["message"], "slow");

        let (_, _, body) = post(&llm, msgs.clone()).await;
        assert_eq!(body["choices"][0]["message"]["content"], "ping");
        assert_eq!(llm.requests().len(), 3);
    }
}
