//! Issue 4: LLM agents and streaming, through the real binary. The model is
//! `muxi_rt::testing::FakeLlm`, a real OpenAI-compatible HTTP server running in
//! this test process; `muxi-rt` talks to it over loopback HTTP.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use common::*;
use futures::{Stream, StreamExt};
use muxi_rt::testing::{FakeLlm, Reply};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Retry quickly: our own backoff never waits more than 0.2 s, so a longer wait
/// can only come from a provider's `Retry-After`, which is honoured in full.
const RETRY: &str =
    "overlord:\n  workflow:\n    retry: {max_attempts: 3, initial_delay: 0.1, max_delay: 0.2, backoff_factor: 2.0}\n";

/// Formation `f`: LLM agents on `api_base`, plus `extra` top-level settings.
fn write_formation(fx: &Fixture, api_base: &str, extra: &str, agents: &str) {
    let llm = format!("llm:\n  settings:\n    api_base: \"{api_base}\"\n");
    fx.write("f/formation.afs", &formation_yaml("f", &format!("{llm}{extra}agents:\n{agents}")));
}

const ONE_AGENT: &str = "  - id: main\n    model: openai/fake-model\n    system_message: You are main.\n";

// Formation `f`, as `user`, through the shared helper.
async fn chat(server: &Server, user: &str, body: Value) -> (u16, Value) {
    let (code, body, _) = server.caller("f", user).chat(body).await;
    (code, body)
}

async fn status(server: &Server, user: &str, id: &str) -> Value {
    server.caller("f", user).data(id).await
}

async fn finished(server: &Server, user: &str, id: &str) -> Value {
    server.caller("f", user).finished(id).await
}

/// An async request; returns its id.
async fn submit_async(server: &Server, user: &str, mut body: Value) -> String {
    body["async"] = json!(true);
    let (code, reply) = chat(server, user, body).await;
    assert_eq!(code, 202, "{reply}");
    request_id(&reply)
}

// ---- SSE ----

/// One SSE event: its `event:` name (if any) and its `data:` lines joined.
#[derive(Debug, Clone)]
struct Frame {
    event: Option<String>,
    data: String,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("frame data is not JSON ({e}): {self:?}"))
    }

    /// The `token` of a data frame.
    fn token(&self) -> Value {
        assert!(self.event.is_none(), "expected a token frame, got {self:?}");
        let token = self.json()["token"].clone();
        assert!(token.is_object(), "no token in {self:?}");
        token
    }

    fn is_done(&self) -> bool {
        self.event.as_deref() == Some("done")
    }
}

/// Reads SSE frames as they arrive; comment frames (keep-alives) are skipped.
struct Sse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// Bytes not yet parsed (a chunk may end inside a UTF-8 character).
    buffer: Vec<u8>,
}

impl Sse {
    fn new(response: reqwest::Response) -> Sse {
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Sse { body: Box::pin(response.bytes_stream()), buffer: Vec::new() }
    }

    /// The next frame with an event or data; `None` at the end of the body.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 frames");
                let mut frame = Frame { event: None, data: String::new() };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        frame.event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if has_data {
                            frame.data.push('\n');
                        }
                        frame.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        has_data = true;
                    } else {
                        assert!(line.is_empty() || line.starts_with(':'), "unexpected SSE line {line:?}");
                    }
                }
                if frame.event.is_some() || has_data {
                    return Some(frame);
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next()).await.expect("an SSE frame in time")?;
            self.buffer.extend(chunk.expect("SSE body").iter().copied().filter(|b| *b != b'\r'));
        }
    }

    /// Every frame up to and including `event: done`; asserts the body ends there.
    async fn rest(mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            let done = frame.is_done();
            frames.push(frame);
            if done {
                assert!(self.next().await.is_none(), "the stream ends after `done`");
                return frames;
            }
        }
        panic!("the stream ended without `event: done`: {frames:?}");
    }
}

async fn open_stream(server: &Server, user: &str, body: Value) -> Sse {
    let (name, key) = client_key("f");
    let response = server
        .post("/api/f/v1/chat")
        .header(name, key)
        .header("X-Muxi-User-ID", user)
        .header("Accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    Sse::new(response)
}

async fn follow(server: &Server, user: &str, path: &str) -> reqwest::Response {
    let (name, key) = client_key("f");
    server.get(path).header(name, key).header("X-Muxi-User-ID", user).send().await.unwrap()
}

/// Asserts the end of a finished stream: a `completed` token then `done`.
fn assert_completed_then_done(frames: &[Frame], text: &str) -> Value {
    let n = frames.len();
    assert!(n >= 2, "{frames:?}");
    assert!(frames[n - 1].is_done(), "{frames:?}");
    assert_eq!(frames[n - 1].json(), json!({"finished": true}));
    let completed = frames[n - 2].token();
    assert_eq!(completed["type"], "completed", "{completed}");
    assert_eq!(completed["content"], text);
    assert_eq!(completed["status"], "completed");
    assert!(completed["processing_time_ms"].as_i64().is_some_and(|ms| ms >= 0), "{completed}");
    completed
}

// ---- a tool server ----

/// A tiny HTTP tool: `POST /weather {"city": ...}` answers a sentence; bodies are recorded.
async fn weather_tool() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = Router::new().route(
        "/weather",
        post(move |Json(body): Json<Value>| {
            let record = record.clone();
            async move {
                let city = body["city"].as_str().unwrap_or("nowhere").to_string();
                record.lock().unwrap().push(body);
                format!("Sunny and 21 C in {city}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/weather"), seen)
}

fn last_message(request: &Value) -> Value {
    request["messages"].as_array().and_then(|m| m.last().cloned()).unwrap_or_else(|| panic!("no messages: {request}"))
}

// ---- 1. the tool loop ----

#[tokio::test]
async fn tool_loop_with_http_and_agent_tools_reports_progress() {
    let llm = FakeLlm::start().await;
    let (tool_url, tool_calls) = weather_tool().await;
    let fx = Fixture::new();
    let agents = format!(
        "  - id: main\n    default: true\n    model: openai/fake-model\n    max_tool_rounds: 3\n    tools:\n      \
         - type: http\n        name: weather\n        description: Weather in a city\n        url: \"{tool_url}\"\n        \
         parameters: {{type: object, properties: {{city: {{type: string}}}}, required: [city]}}\n      \
         - {{type: agent, agent_id: helper}}\n  \
         - id: helper\n    description: Writes summaries\n    model: openai/fake-model\n    system_message: You summarise.\n"
    );
    write_formation(&fx, &llm.base_url(), "", &agents);
    let server = fx.start();

    llm.push(Reply::tool_call("weather", json!({"city": "Oslo"})));
    llm.push(Reply::tool_call("helper", json!({"message": "Summarise: sunny, 21 C"})));
    llm.push(Reply::text("Nice weather."));
    // The last model call is slow, so its step can be seen while it runs.
    llm.push(Reply::text("Oslo is sunny and 21 C: nice weather.").after(Duration::from_millis(1500)));

    let id = submit_async(&server, "u1", json!({"message": "What is the weather in Oslo?"})).await;
    let during = eventually(WAIT, "the third model round to be under way", || async {
        let data = status(&server, "u1", &id).await;
        (data["current_step"] == "Calling model (round 3)").then_some(data)
    })
    .await;
    assert_eq!(during["status"], "processing", "{during}");
    assert_eq!(during["completed_steps"], 4, "two model calls and two tool calls done: {during}");
    assert_eq!(during["total_steps"], 5, "{during}");
    let progress = during["progress"].as_f64().unwrap();
    assert!(progress > 0.0 && progress < 100.0, "{during}");

    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["result"]["text"], "Oslo is sunny and 21 C: nice weather.");
    assert_eq!(data["progress"], 100.0);
    assert_eq!(data["completed_steps"], 5, "{data}");
    assert_eq!(data["attempts"], 1);

    // The HTTP tool got the model's arguments; the model got the tool's answer.
    assert_eq!(*tool_calls.lock().unwrap(), vec![json!({"city": "Oslo"})]);
    let requests = llm.requests();
    assert_eq!(requests.len(), 4, "{requests:#?}");
    let tools: Vec<&str> =
        requests[0]["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(tools, ["weather", "helper"]);
    assert_eq!(
        last_message(&requests[1]),
        json!({"role": "tool", "tool_call_id": "call_weather", "content": "Sunny and 21 C in Oslo"})
    );
    // The agent tool ran `helper` with its own prompt, and its answer went back.
    assert_eq!(
        requests[2]["messages"],
        json!([{"role": "system", "content": "You summarise."}, {"role": "user", "content": "Summarise: sunny, 21 C"}])
    );
    assert_eq!(
        last_message(&requests[3]),
        json!({"role": "tool", "tool_call_id": "call_helper", "content": "Nice weather."})
    );
    let roles: Vec<&str> =
        requests[3]["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant", "tool"]);
}

// ---- 2. streaming ----

#[tokio::test]
async fn a_streamed_chat_sends_progress_content_completed_then_done() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    let answer = "The quick brown fox jumps over the lazy dog.";
    llm.push(Reply::text(answer));

    let sse = open_stream(&server, "u1", json!({"message": "hi", "stream": true, "session_id": "s1"})).await;
    let frames = sse.rest().await;
    let completed = assert_completed_then_done(&frames, answer);

    let tokens: Vec<Value> = frames[..frames.len() - 1].iter().map(Frame::token).collect();
    let id = completed["request_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("req_"), "{completed}");
    for token in &tokens {
        assert_eq!(token["request_id"], id.as_str(), "{token}");
        assert_eq!(token["user_id"], "u1", "{token}");
        assert_eq!(token["session_id"], "s1", "{token}");
        assert!(token["timestamp"].as_f64().is_some(), "{token}");
    }
    assert_eq!(tokens[0]["type"], "progress", "the first token: {}", tokens[0]);
    let middle = &tokens[1..tokens.len() - 1];
    let kinds: Vec<&str> = middle.iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert!(kinds.iter().all(|k| *k == "progress" || *k == "content"), "{kinds:?}");
    let first_content = kinds.iter().position(|k| *k == "content").expect("content tokens");
    assert!(
        kinds[first_content..].iter().filter(|k| **k == "content").count() > 1,
        "the answer came in pieces: {kinds:?}"
    );
    let text: String =
        middle.iter().filter(|t| t["type"] == "content").map(|t| t["content"].as_str().unwrap()).collect();
    assert_eq!(text, answer);

    let data = status(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed");
    assert_eq!(data["result"]["text"], answer);
}

#[tokio::test]
async fn a_streamed_chat_that_fails_ends_with_a_failed_token_then_done() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    llm.push(Reply::error(400, "Invalid value for 'temperature'"));

    let frames = open_stream(&server, "u1", json!({"message": "hi", "stream": true})).await.rest().await;
    let n = frames.len();
    assert!(frames[n - 1].is_done(), "{frames:?}");
    assert_eq!(frames[0].token()["type"], "progress");
    let failed = frames[n - 2].token();
    assert_eq!((failed["type"].as_str(), failed["status"].as_str()), (Some("failed"), Some("failed")), "{failed}");
    assert!(failed["content"].as_str().unwrap().contains("Invalid value for 'temperature'"), "{failed}");
    assert_eq!(failed["error"]["retryable"], false, "{failed}");
    assert!(frames[..n - 1].iter().all(|f| f.token()["type"] != "content"), "{frames:?}");
}

// ---- 3. provider errors ----

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_client_errors_are_not() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), RETRY, ONE_AGENT);
    let server = fx.start();

    // 429 with Retry-After: 1, then an answer: the retry waits the second.
    llm.push(Reply::error_retry_after(429, "Rate limit reached for fake-model", "1"));
    llm.push(Reply::text("after the wait"));
    let started = Instant::now();
    let id = submit_async(&server, "u1", json!({"message": "one"})).await;
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["attempts"], 2);
    assert_eq!(data["result"]["text"], "after the wait");
    assert!(data["duration_ms"].as_i64().unwrap() >= 1000, "Retry-After was honoured: {data}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(llm.requests().len(), 2);

    // 500, then an answer.
    llm.push(Reply::error(500, "The server had an error"));
    llm.push(Reply::text("second time lucky"));
    let id = submit_async(&server, "u1", json!({"message": "two"})).await;
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["attempts"], 2);
    assert_eq!(data["result"]["text"], "second time lucky");
    assert_eq!(llm.requests().len(), 4);

    // 400: failed at once, with the provider's message.
    llm.push(Reply::error(400, "Invalid value for 'temperature'"));
    let id = submit_async(&server, "u1", json!({"message": "three"})).await;
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "failed", "{data}");
    assert_eq!(data["attempts"], 1);
    assert_eq!(data["error"]["retryable"], false);
    assert_eq!(data["error"]["type"], "model_error");
    let message = data["error"]["message"].as_str().unwrap();
    assert!(message.contains("Invalid value for 'temperature'") && message.contains("400"), "{message}");
    assert_eq!(llm.requests().len(), 5, "no retry");

    // A sync caller of the same failure gets it as an error answer.
    llm.push(Reply::error(400, "Invalid value for 'temperature'"));
    let (code, body) = chat(&server, "u1", json!({"message": "four", "async": false})).await;
    assert_eq!((code, body["code"].as_str()), (502, Some("request_failed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("Invalid value for 'temperature'"), "{body}");
}

#[tokio::test]
async fn an_unreachable_model_api_fails_after_max_attempts_naming_the_host() {
    let fx = Fixture::new();
    let (_held, closed) = muxi_rt::testing::closed_port();
    let port = closed.port();
    let retry = "overlord:\n  workflow:\n    retry: {max_attempts: 3, initial_delay: 0.1, max_delay: 0.2}\n";
    write_formation(&fx, &format!("http://127.0.0.1:{port}/v1"), retry, ONE_AGENT);
    let server = fx.start();

    let id = submit_async(&server, "u1", json!({"message": "anyone there?"})).await;
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "failed", "{data}");
    assert_eq!(data["attempts"], 3);
    assert_eq!(data["error"]["type"], "unreachable");
    assert_eq!(data["error"]["retryable"], true);
    let message = data["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("3 attempts"), "{message}");
}

/// A provider streaming a tool call with `index: 1000000000000` used to make the
/// server allocate 72 TB and abort. Now the attempt fails at once, not retried,
/// and the server goes on serving.
#[tokio::test]
async fn a_huge_tool_call_index_fails_the_request_and_the_server_stays_up() {
    let llm = FakeLlm::start().await;
    let hostile = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1000000000000,"id":"x","type":"function","function":{"name":"f","arguments":""}}]}}]}"#;
    llm.push(Reply::RawSse(vec![hostile.to_string()]));
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), RETRY, ONE_AGENT);
    let server = fx.start();

    let id = submit_async(&server, "u1", json!({"message": "call a tool"})).await;
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "failed", "{data}");
    assert_eq!(data["attempts"], 1, "not retried: {data}");
    assert_eq!(data["error"]["retryable"], false);
    let message = data["error"]["message"].as_str().unwrap();
    assert!(message.contains("tool call index 1000000000000"), "{message}");

    // Still up, and the next request is answered.
    let (code, body) = chat(&server, "u1", json!({"message": "hello", "async": false})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(llm.requests().len(), 2);
}

// ---- 4. disconnects ----

#[tokio::test]
async fn a_sync_stream_is_cancelled_when_its_client_goes_away() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    llm.push(Reply::Hang { partial: "Let me think".into() });

    let mut sse = open_stream(&server, "u1", json!({"message": "hard question", "stream": true, "async": false})).await;
    let first = sse.next().await.expect("a first frame").token();
    assert_eq!(first["type"], "progress");
    let id = first["request_id"].as_str().unwrap().to_string();
    // Wait until the model has started answering, then hang up.
    loop {
        let token = sse.next().await.expect("frames until the content").token();
        if token["type"] == "content" {
            assert_eq!(token["content"], "Let me think");
            break;
        }
    }
    drop(sse);

    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "cancelled", "{data}");
    eventually(WAIT, "the model call to be closed", || async { (llm.abandoned_streams() == 1).then_some(()) }).await;
}

#[tokio::test]
async fn a_server_shutdown_is_not_a_client_disconnect() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    llm.push(Reply::Hang { partial: "Let me think".into() });

    let mut sse = open_stream(&server, "u1", json!({"message": "survive this", "stream": true, "async": false})).await;
    let id = sse.next().await.expect("a first frame").token()["request_id"].as_str().unwrap().to_string();
    while sse.next().await.expect("frames until the content").token()["type"] != "content" {}
    assert_eq!(server.terminate(), Some(0));
    drop(sse);

    // The accepted request was not cancelled by the shutdown: it runs again.
    let server = fx.start();
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["result"]["text"], "survive this");
    assert_eq!(data["attempts"], 2);
}

#[tokio::test]
async fn an_async_stream_goes_on_after_its_client_goes_away() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    llm.push(Reply::text("worth the wait").after(Duration::from_millis(1500)));

    let mut sse = open_stream(&server, "u1", json!({"message": "take your time", "stream": true, "async": true})).await;
    let first = sse.next().await.expect("a first frame").token();
    assert_eq!(first["type"], "progress");
    let id = first["request_id"].as_str().unwrap().to_string();
    drop(sse);

    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["result"]["text"], "worth the wait");
    assert_eq!(llm.abandoned_streams(), 0);
}

// ---- 5. following a request ----

#[tokio::test]
async fn the_events_routes_replay_the_current_state_then_follow() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    let answer = "It was worth following.";
    llm.push(Reply::text(answer).after(Duration::from_millis(1500)));

    let id = submit_async(&server, "u1", json!({"message": "slow one", "session_id": "s9"})).await;
    eventually(WAIT, "the model call to be under way", || async {
        (status(&server, "u1", &id).await["current_step"] == "Calling model (round 1)").then_some(())
    })
    .await;

    // Mid-flight: the current state first, then the rest as it happens.
    let mut sse = Sse::new(follow(&server, "u1", &format!("/api/f/v1/requests/{id}/events")).await);
    let first = sse.next().await.unwrap().token();
    assert_eq!(first["type"], "progress", "{first}");
    assert_eq!(first["status"], "processing", "{first}");
    assert_eq!(first["content"], "Calling model (round 1)", "{first}");
    assert_eq!(first["request_id"], id.as_str());
    assert_eq!(first["session_id"], "s9");
    let frames = sse.rest().await;
    assert_completed_then_done(&frames, answer);
    let text: String = frames
        .iter()
        .filter(|f| !f.is_done())
        .map(Frame::token)
        .filter(|t| t["type"] == "content")
        .map(|t| t["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, answer, "the live content followed: {frames:?}");

    // After the end: the current state, then completed and done at once.
    for path in [format!("/api/f/v1/requests/{id}/events"), format!("/api/f/v1/events/s9/{id}")] {
        let frames = Sse::new(follow(&server, "u1", &path).await).rest().await;
        assert_eq!(frames.len(), 3, "{path}: {frames:?}");
        let first = frames[0].token();
        assert_eq!(
            (first["type"].as_str(), first["status"].as_str()),
            (Some("progress"), Some("completed")),
            "{first}"
        );
        assert_completed_then_done(&frames, answer);
    }

    // Not yours, or not in that session: not found.
    for (user, path) in [
        ("u2", format!("/api/f/v1/requests/{id}/events")),
        ("u2", format!("/api/f/v1/events/s9/{id}")),
        ("u1", format!("/api/f/v1/events/other-session/{id}")),
    ] {
        let (code, body) = json(follow(&server, user, &path).await).await;
        assert_eq!((code, body["code"].as_str()), (404, Some("request_not_found")), "{user} {path}: {body}");
    }
}

#[tokio::test]
async fn the_session_route_follows_a_running_request_too() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();
    llm.push(Reply::text("done in the end").after(Duration::from_millis(1500)));

    let id = submit_async(&server, "u1", json!({"message": "slow", "session_id": "s1"})).await;
    let mut sse = Sse::new(follow(&server, "u1", &format!("/api/f/v1/events/s1/{id}")).await);
    let first = sse.next().await.unwrap().token();
    assert_eq!(first["type"], "progress");
    assert!(matches!(first["status"].as_str(), Some("pending" | "processing")), "{first}");
    let frames = sse.rest().await;
    assert!(frames.len() >= 3, "frames came while it ran: {frames:?}");
    assert_completed_then_done(&frames, "done in the end");
}

// ---- 6. session history ----

#[tokio::test]
async fn later_turns_of_a_session_carry_the_earlier_ones() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    write_formation(&fx, &llm.base_url(), "", ONE_AGENT);
    let server = fx.start();

    llm.push(Reply::text("Nice to meet you, Ada."));
    let (code, body) =
        chat(&server, "u1", json!({"message": "My name is Ada.", "session_id": "s1", "async": false})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "Nice to meet you, Ada.");

    llm.push(Reply::text("Your name is Ada."));
    let (code, body) =
        chat(&server, "u1", json!({"message": "What is my name?", "session_id": "s1", "async": false})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "Your name is Ada.");

    // Another session, and another user's same-named session, start afresh.
    chat(&server, "u1", json!({"message": "Who am I?", "session_id": "s2", "async": false})).await;
    chat(&server, "u2", json!({"message": "Who am I?", "session_id": "s1", "async": false})).await;

    let requests = llm.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(
        requests[1]["messages"],
        json!([
            {"role": "system", "content": "You are main."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada."},
            {"role": "user", "content": "What is my name?"},
        ])
    );
    for fresh in &requests[2..] {
        assert_eq!(fresh["messages"].as_array().unwrap().len(), 2, "no history: {fresh}");
    }
}

// ---- 7. routing ----

#[tokio::test]
async fn requests_go_to_the_default_agent_unless_they_name_one() {
    let llm = FakeLlm::start().await;
    let fx = Fixture::new();
    let agents = "  - id: first\n    model: openai/fake-model\n    system_message: You are first.\n  \
                  - id: main\n    default: true\n    model: openai/fake-model\n    system_message: You are main.\n  \
                  - id: other\n    model: openai/fake-model\n    system_message: You are other.\n";
    write_formation(&fx, &llm.base_url(), "", agents);
    let server = fx.start();

    let (code, body) = chat(&server, "u1", json!({"message": "hello", "async": false})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["agent_id"], "main");
    assert_eq!(body["data"]["message"]["content"], "hello", "echoed by the fake");
    let (code, body) = chat(&server, "u1", json!({"message": "hello", "agent_id": "other", "async": false})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["agent_id"], "other");
    assert_eq!(status(&server, "u1", &request_id(&body)).await["agent_id"], "other");

    let systems: Vec<Value> = llm.requests().iter().map(|r| r["messages"][0]["content"].clone()).collect();
    assert_eq!(systems, [json!("You are main."), json!("You are other.")]);
}

// ---- 8. bad configuration ----

#[tokio::test]
async fn an_openai_agent_without_a_key_does_not_load() {
    let fx = Fixture::new();
    let path =
        fx.write("f/formation.afs", &formation_yaml("f", "agents:\n  - id: writer\n    model: openai/gpt-4o-mini\n"));
    let (code, stdout, stderr) = run_cli(&["validate", path.to_str().unwrap()], &fx.formations);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("`writer`") && stdout.contains("llm.api_keys.openai"), "{stdout}");

    // The server starts without it, and says so.
    let server = fx.start();
    let (code, body) = json(server.get("/api/f/v1/health").send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("formation_not_found")), "{body}");
    assert!(server.stderr().contains("llm.api_keys.openai"), "{}", server.stderr());
}
