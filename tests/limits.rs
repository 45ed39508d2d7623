//! Issue 8: what a hostile or broken client sends is refused in the JSON error
//! envelope with a stable code, and slow clients cannot hold connections open.
//! Through the real binary, with raw TCP where reqwest would not misbehave.

mod common;

use std::time::Duration;

use common::receiver::{Answer, Receiver};
use common::*;
use serde_json::Value;

/// Answers "ok", after `sleep:N` seconds when asked.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys, time
msg = json.load(sys.stdin)["message"]
if msg.startswith("sleep:"):
    time.sleep(float(msg[6:]))
print(json.dumps({"result": "ok"}))
"#;

fn fixture() -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    fx.write(
        "f/formation.afs",
        &formation_yaml("f", "agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n"),
    );
    fx
}

/// Status and JSON body of a raw HTTP/1.1 answer (`Content-Length` framed).
fn parse(answer: &str) -> (u16, Value) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"));
    (status, body)
}

#[tokio::test]
async fn rejections_are_json_with_a_stable_code() {
    let fx = fixture();
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let get = |path: &str| caller.request(reqwest::Method::GET, path).send();

    // A path segment that is not UTF-8, in a request id and in a formation id.
    let (code, body) = json(get("/requests/%FF%FE").await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("invalid_request")), "{body}");
    let (code, body) = json(server.get("/api/%FF/v1/health").send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("invalid_request")), "{body}");

    // A duplicate query field, and a malformed one.
    let (code, body) = json(get("/requests?limit=1&limit=2").await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("invalid_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("duplicate"), "{body}");
    let (code, body) = json(get("/requests?limit=abc").await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("invalid_request")), "{body}");

    // Headers too large: a JSON 431.
    let answer = server
        .raw(
            format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(40_000))
                .as_bytes(),
            Duration::from_secs(30),
        )
        .expect("answered and closed");
    let (code, body) = parse(&answer);
    assert_eq!((code, body["code"].as_str()), (431, Some("headers_too_large")), "{body}");

    // Still serving.
    assert_eq!(server.get("/health").send().await.unwrap().status(), 200);
}

/// `MUXI_READ_TIMEOUT_SECS=1` only makes the test quick; the default is 30 s.
#[tokio::test]
async fn slow_clients_are_cut_off() {
    let fx = fixture();
    let server = Server::start(&fx, &[], &[("MUXI_READ_TIMEOUT_SECS", "1")]);

    // Half a request head, never finished: the connection is closed, unanswered.
    let answer = server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow:", Duration::from_secs(20));
    let answer = answer.expect("the server closed a connection whose headers never ended");
    assert!(!answer.contains("200 OK"), "{answer}");

    // A body that stops arriving: a JSON 408, and the connection closed.
    let (name, key) = client_key("f");
    let head = format!(
        "POST /api/f/v1/chat HTTP/1.1\r\nHost: x\r\n{name}: {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"message\": "
    );
    let answer = server.raw(head.as_bytes(), Duration::from_secs(20)).expect("answered and closed");
    let (code, body) = parse(&answer);
    assert_eq!((code, body["code"].as_str()), (408, Some("body_read_timeout")), "{body}");
    assert!(server.caller("f", "default").list("").await.is_empty(), "nothing was stored");

    // Still serving.
    assert_eq!(server.get("/health").send().await.unwrap().status(), 200);
}

/// The read timeout bounds reading a request, never the answer: a sync request
/// and a followed stream outlast it.
#[tokio::test]
async fn long_answers_outlast_the_read_timeout() {
    let fx = fixture();
    let server = Server::start(&fx, &[], &[("MUXI_READ_TIMEOUT_SECS", "1")]);
    let caller = server.caller("f", "u1");
    let (code, body, _) = caller.chat(serde_json::json!({"message": "sleep:2.5", "async": false})).await;
    assert_eq!(code, 200, "{body}");

    let (code, body, _) = caller.chat(serde_json::json!({"message": "sleep:2.5", "async": true})).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let response = caller.request(reqwest::Method::GET, &format!("/requests/{id}/events")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("completed"), "the stream ran to the end: {text}");
}

/// An HTTP agent answering `Retry-After: 1e20` (more seconds than a Duration
/// holds) used to panic the request's task and leave it processing. The wait is
/// capped at an hour, which is past the workflow timeout: the request fails now.
#[tokio::test]
async fn an_http_agent_asking_to_retry_after_1e20_fails_the_request_cleanly() {
    let rx = Receiver::start().await;
    rx.script("/agent", vec![], Some(Answer::With(503, "retry-after", "1e20".to_string())));
    let fx = Fixture::new();
    let settings = format!(
        "overlord:\n  workflow:\n    timeouts: {{task_timeout: 30, workflow_timeout: 60}}\nagents:\n  - id: remote\n    url: \"{}\"\n",
        rx.url("/agent")
    );
    fx.write("r/formation.afs", &formation_yaml("r", &settings));
    let server = fx.start();
    let caller = server.caller("r", "u1");
    let (code, body, _) = caller.chat(serde_json::json!({"message": "hi", "async": true})).await;
    assert_eq!(code, 202, "{body}");
    let data = caller.finished(&request_id(&body)).await;
    assert_eq!(data["status"], "failed", "{data}");
    assert_eq!(data["attempts"], 1, "{data}");
    let message = data["error"]["message"].as_str().unwrap();
    assert!(message.contains("asked to retry after 3600s"), "the error says why: {message}");
    assert_eq!(rx.hits("/agent").len(), 1);
    assert_eq!(server.get("/health").send().await.unwrap().status(), 200);
}
