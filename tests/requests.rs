//! Issue 3: the durable request engine, through real HTTP against the real binary.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// One scripted command agent: the message says what to do.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, os, subprocess, sys, time
req = json.load(sys.stdin)
msg, attempt = req["message"], req["attempt"]
def emit(**kw):
    print(json.dumps(kw), flush=True)
cmd, _, arg = msg.partition(":")
if cmd == "sleep":
    secs, steps = float(arg), 5
    for i in range(steps):
        emit(progress=i * 20, step=f"step {i + 1}", total_steps=steps, completed_steps=i)
        time.sleep(secs / steps)
    emit(result=f"slept {secs}")
elif cmd == "hang":
    child = subprocess.Popen(["sleep", "300"])
    emit(progress=5, step="hanging", message=f"pids {os.getpid()} {child.pid}")
    time.sleep(300)
elif cmd == "flaky":
    if attempt < int(arg):
        sys.stderr.write(f"transient failure on attempt {attempt}\n")
        sys.exit(75)
    emit(result=f"succeeded on attempt {attempt}")
elif cmd == "fail":
    sys.stderr.write("boom\n")
    sys.exit(3)
else:
    emit(result=f"echo: {msg}", artifacts=[{"name": "a.txt"}])
"#;

/// A formation `f` with a quick default agent `worker` and a `slow` one.
fn fixture(settings: &str) -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let agents = r#"agents:
  - id: worker
    default: true
    estimated_seconds: 0.5
    command: ["python3", "agent.py"]
    retryable_exit_codes: [75]
  - id: slow
    estimated_seconds: 10
    command: ["python3", "agent.py"]
"#;
    fx.write("f/formation.afs", &formation_yaml("f", &format!("{settings}{agents}")));
    fx
}

const AUTO: &str = r#"async:
  mode: auto
  threshold_seconds: 4
overlord:
  max_concurrent_requests: 2
  workflow:
    retry: {max_attempts: 3, initial_delay: 0.1, max_delay: 0.5, backoff_factor: 2.0}
    timeouts: {task_timeout: 30, workflow_timeout: 60}
"#;

// Formation `f`, as `user`, through the shared helper.
async fn chat(server: &Server, user: &str, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
    server.caller("f", user).chat(body).await
}

async fn status(server: &Server, user: &str, id: &str) -> (u16, Value) {
    server.caller("f", user).status(id).await
}

async fn cancel(server: &Server, user: &str, id: &str) -> (u16, Value) {
    server.caller("f", user).cancel(id).await
}

async fn list(server: &Server, user: &str, query: &str) -> Vec<Value> {
    server.caller("f", user).list(query).await
}

async fn finished(server: &Server, user: &str, id: &str) -> Value {
    server.caller("f", user).finished(id).await
}

#[tokio::test]
async fn sync_mode_answers_with_the_result() {
    let fx = fixture("async:\n  mode: sync\n");
    let server = fx.start();
    let (code, body, _) = chat(&server, "u1", json!({"message": "hello", "session_id": "s1"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "echo: hello");
    assert_eq!(body["data"]["message"]["artifacts"][0]["name"], "a.txt");
    assert_eq!(body["data"]["session_id"], "s1");
    let id = request_id(&body);
    assert_eq!(body["request"]["id"], id.as_str());

    let (code, body) = status(&server, "u1", &id).await;
    assert_eq!(code, 200);
    let data = &body["data"];
    assert_eq!(data["status"], "completed");
    assert_eq!(data["progress"], 100.0);
    assert_eq!(data["attempts"], 1);
    assert_eq!(data["user_id"], "u1");
    assert_eq!(data["agent_id"], "worker");
    assert_eq!(data["result"]["text"], "echo: hello");
    assert!(data["formation_version"].as_str().unwrap().starts_with("1.0.0+"));
    assert!(data["duration_ms"].as_i64().unwrap() >= 0);
    assert!(data["started_at"].is_string() && data["completed_at"].is_string());
}

#[tokio::test]
async fn async_mode_answers_202_at_once_then_completes_in_the_background() {
    let fx = fixture("async:\n  mode: async\n");
    let server = fx.start();
    let (code, body, headers) = chat(&server, "u1", json!({"message": "sleep:1"})).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    assert_eq!(body["data"]["status"], "processing");
    assert!(
        body["data"]["session_id"].as_str().unwrap().starts_with("sess_"),
        "a session is opened when none is named"
    );
    let estimated_time = body["data"]["estimated_time"].as_str().unwrap();
    assert_eq!(estimated_time, "about 1 second (declared)", "{body}");
    assert_eq!(headers["location"], format!("/api/f/v1/requests/{id}").as_str());
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed");
    assert_eq!(data["result"]["text"], "slept 1.0");
}

#[tokio::test]
async fn auto_mode_uses_the_estimate_and_the_request_can_override_it() {
    let fx = fixture(AUTO);
    let server = fx.start();
    // Quick agent: answered at once.
    let (code, body, _) = chat(&server, "u1", json!({"message": "hi"})).await;
    assert_eq!(code, 200, "{body}");
    // Slow agent (declared 10 s >= threshold 4 s): 202.
    let (code, body, _) = chat(&server, "u1", json!({"message": "hi", "agent_id": "slow"})).await;
    assert_eq!(code, 202, "{body}");
    // Overrides both ways.
    let (code, _, _) = chat(&server, "u1", json!({"message": "hi", "async": true})).await;
    assert_eq!(code, 202);
    let (code, body, _) = chat(&server, "u1", json!({"message": "hi", "agent_id": "slow", "async": false})).await;
    assert_eq!(code, 200, "{body}");
    // A per-request threshold below the estimate sends the quick agent async.
    let (code, _, _) = chat(&server, "u1", json!({"message": "hi", "threshold_seconds": 0.1})).await;
    assert_eq!(code, 202);
}

#[tokio::test]
async fn auto_mode_promotes_a_quick_looking_request_at_the_threshold() {
    let fx = fixture(AUTO);
    let server = fx.start();
    // Judged quick (declared 0.5 s) but takes 7 s: answered 202 at the 4 s threshold.
    let (code, body, _) = chat(&server, "u1", json!({"message": "sleep:7"})).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let (_, now) = status(&server, "u1", &id).await;
    assert_eq!(now["data"]["status"], "processing");
    assert_eq!(finished(&server, "u1", &id).await["status"], "completed");
}

/// An agent with no history and no declared estimate: auto mode does not send
/// its work async on a guess from the message; it waits up to the threshold.
#[tokio::test]
async fn auto_mode_waits_when_the_estimate_rests_on_nothing() {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let agents = "agents:\n  - id: guess\n    command: [\"python3\", \"agent.py\"]\n";
    fx.write(
        "f/formation.afs",
        &formation_yaml("f", &format!("async:\n  mode: auto\n  threshold_seconds: 2\n{agents}")),
    );
    let server = fx.start();
    // The message alone is guessed at 2 s (the threshold): still answered with the result.
    let (code, body, _) = chat(&server, "u1", json!({"message": "sleep:0.2"})).await;
    assert_eq!(code, 200, "{body}");
    // Work that outlasts the threshold is promoted, saying the estimate was a guess.
    let (code, body, _) = chat(&server, "u1", json!({"message": "sleep:4"})).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["data"]["estimated_time"], "unknown (no history)", "{body}");
    assert_eq!(finished(&server, "u1", &request_id(&body)).await["status"], "completed");
}

#[tokio::test]
async fn status_follows_progress_reported_by_the_agent() {
    let fx = fixture(AUTO);
    let server = fx.start();
    let (_, body, _) = chat(&server, "u1", json!({"message": "sleep:3", "agent_id": "slow"})).await;
    let id = request_id(&body);
    let mut seen = Vec::new();
    let last = loop {
        let (_, body) = status(&server, "u1", &id).await;
        let data = body["data"].clone();
        if data["status"] == "processing" && data["current_step"].is_string() {
            seen.push((data["progress"].as_f64().unwrap(), data["current_step"].as_str().unwrap().to_string()));
            assert_eq!(data["total_steps"], 5);
        }
        if data["status"] == "completed" {
            break data;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(seen.len() >= 3, "saw progress move: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress never goes back: {seen:?}");
    assert!(seen.iter().any(|(p, _)| *p > 0.0 && *p < 100.0));
    assert_eq!(last["progress"], 100.0);
}

fn pids(data: &Value) -> Option<(i32, i32)> {
    let message = data["message"].as_str()?;
    let mut parts = message.strip_prefix("pids ")?.split(' ');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[tokio::test]
async fn cancel_stops_running_work_and_keeps_pending_work_from_starting() {
    let fx = fixture(AUTO); // two workers
    let server = fx.start();
    let mut running = Vec::new();
    for _ in 0..2 {
        let (code, body, _) = chat(&server, "u1", json!({"message": "hang", "async": true})).await;
        assert_eq!(code, 202);
        running.push(request_id(&body));
    }
    let (_, body, _) = chat(&server, "u1", json!({"message": "echo:queued", "async": true})).await;
    let queued = request_id(&body);
    let (_, body) = status(&server, "u1", &queued).await;
    assert_eq!(body["data"]["status"], "pending", "both workers are busy");

    let (code, body) = cancel(&server, "u1", &queued).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["status"], "cancelled");

    // Running: the agent and its own child process are killed.
    let first = &running[0];
    let (agent_pid, child_pid) = eventually(Duration::from_secs(20), "agent pids", || async {
        let (_, body) = status(&server, "u1", first).await;
        pids(&body["data"])
    })
    .await;
    assert!(alive(agent_pid) && alive(child_pid));
    let (code, body) = cancel(&server, "u1", first).await;
    assert_eq!(code, 200, "{body}");
    eventually(Duration::from_secs(5), "agent processes gone", || async {
        (!alive(agent_pid) && !alive(child_pid)).then_some(())
    })
    .await;
    let data = finished(&server, "u1", first).await;
    assert_eq!(data["status"], "cancelled");

    // The pending one never ran.
    let data = finished(&server, "u1", &queued).await;
    assert_eq!(data["status"], "cancelled");
    assert_eq!(data["attempts"], 0);
    assert!(data["started_at"].is_null());

    // A finished request cannot be cancelled.
    let (code, body) = cancel(&server, "u1", first).await;
    assert_eq!(code, 409);
    assert_eq!(body["code"], "request_already_finished");
    cancel(&server, "u1", &running[1]).await;
}

#[tokio::test]
async fn task_and_workflow_timeouts_stop_the_work_and_fail_the_request() {
    let fx = fixture(
        "async:\n  mode: async\noverlord:\n  workflow:\n    timeouts: {task_timeout: 1, workflow_timeout: 60}\n",
    );
    let server = fx.start();
    let (_, body, _) = chat(&server, "u1", json!({"message": "sleep:10"})).await;
    let data = finished(&server, "u1", &request_id(&body)).await;
    assert_eq!(data["status"], "failed");
    assert_eq!(data["error"]["type"], "timeout");
    assert!(data["error"]["message"].as_str().unwrap().contains("task_timeout (1s)"), "{data}");

    let fx = fixture(
        "async:\n  mode: async\noverlord:\n  workflow:\n    timeouts: {task_timeout: 30, workflow_timeout: 1.5}\n",
    );
    let server = fx.start();
    let (_, body, _) = chat(&server, "u1", json!({"message": "sleep:10"})).await;
    let data = finished(&server, "u1", &request_id(&body)).await;
    assert_eq!(data["error"]["type"], "timeout");
    assert!(data["error"]["message"].as_str().unwrap().contains("workflow_timeout (1.5s)"), "{data}");
}

#[tokio::test]
async fn retryable_failures_are_retried_with_backoff_until_they_succeed_or_run_out() {
    let fx = fixture(AUTO);
    let server = fx.start();
    let (_, body, _) = chat(&server, "u1", json!({"message": "flaky:3", "async": true})).await;
    let data = finished(&server, "u1", &request_id(&body)).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["attempts"], 3);
    assert_eq!(data["result"]["text"], "succeeded on attempt 3");

    let (_, body, _) = chat(&server, "u1", json!({"message": "flaky:9", "async": true})).await;
    let data = finished(&server, "u1", &request_id(&body)).await;
    assert_eq!(data["status"], "failed");
    assert_eq!(data["attempts"], 3);
    assert_eq!(data["error"]["retryable"], true);
    assert!(data["error"]["message"].as_str().unwrap().contains("transient failure on attempt 3"), "{data}");

    // Not retryable: one attempt, stderr in the message; the server lives on.
    let (_, body, _) = chat(&server, "u1", json!({"message": "fail:", "async": true})).await;
    let data = finished(&server, "u1", &request_id(&body)).await;
    assert_eq!(data["attempts"], 1);
    assert_eq!(data["error"]["retryable"], false);
    assert!(data["error"]["message"].as_str().unwrap().contains("boom"));
    assert_eq!(server.get("/api/f/v1/health").send().await.unwrap().status(), 200);

    // A sync caller of a failing request gets a clear error.
    let (code, body, _) = chat(&server, "u1", json!({"message": "fail:", "async": false})).await;
    assert_eq!(code, 502);
    assert_eq!(body["code"], "request_failed");
    assert!(body["message"].as_str().unwrap().contains("boom"));
}

#[tokio::test]
async fn a_server_killed_mid_flight_finishes_every_accepted_request_after_restart() {
    let fx = fixture("async:\n  mode: async\noverlord:\n  max_concurrent_requests: 3\n");
    let server = fx.start();
    let mut ids = Vec::new();
    for i in 0..6 {
        let (code, body, _) = chat(&server, "u1", json!({"message": format!("sleep:{}", 2 + i % 2)})).await;
        assert_eq!(code, 202);
        ids.push(request_id(&body));
    }
    eventually(Duration::from_secs(20), "work under way", || async {
        let (_, body) = status(&server, "u1", &ids[0]).await;
        (body["data"]["status"] == "processing").then_some(())
    })
    .await;
    server.kill();

    let server = fx.start();
    for id in &ids {
        let data = finished(&server, "u1", id).await;
        assert_eq!(data["status"], "completed", "{data}");
        assert!(data["attempts"].as_u64().unwrap() >= 1);
    }
    let (_, body) = status(&server, "u1", &ids[0]).await;
    assert!(body["data"]["attempts"].as_u64().unwrap() >= 2, "the interrupted attempt counts: {body}");
}

#[tokio::test]
async fn an_idempotency_key_replays_the_same_request_even_after_restart() {
    let fx = fixture("async:\n  mode: async\n");
    let server = fx.start();
    let send = |server: &Server, user: &str, key: &str| {
        let (name, client) = client_key("f");
        server
            .post("/api/f/v1/chat")
            .header(name, client)
            .header("X-Muxi-User-ID", user)
            .header("X-Muxi-Idempotency-Key", key)
            .json(&json!({"message": "echo:once"}))
            .send()
    };
    let (_, first) = json(send(&server, "u1", "key-1").await.unwrap()).await;
    let (_, again) = json(send(&server, "u1", "key-1").await.unwrap()).await;
    assert_eq!(request_id(&first), request_id(&again));
    let (_, other_user) = json(send(&server, "u2", "key-1").await.unwrap()).await;
    assert_ne!(request_id(&first), request_id(&other_user));
    finished(&server, "u1", &request_id(&first)).await;
    assert_eq!(list(&server, "u1", "").await.len(), 1);
    server.terminate();

    let server = fx.start();
    let (code, replay) = json(send(&server, "u1", "key-1").await.unwrap()).await;
    assert_eq!(request_id(&replay), request_id(&first));
    assert!(code == 200 || code == 202);
    assert_eq!(list(&server, "u1", "").await.len(), 1);
}

#[tokio::test]
async fn requests_are_scoped_to_their_user_and_listed_newest_first() {
    let fx = fixture("async:\n  mode: sync\n");
    let server = fx.start();
    let mut mine = Vec::new();
    for i in 0..3 {
        let (_, body, _) = chat(&server, "alice", json!({"message": format!("n{i}")})).await;
        mine.push(request_id(&body));
    }
    let (_, body, _) = chat(&server, "alice", json!({"message": "fail:"})).await;
    assert_eq!(body["code"], "request_failed");

    let (code, body) = status(&server, "bob", &mine[0]).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("request_not_found")));
    assert_eq!(cancel(&server, "bob", &mine[0]).await.0, 404);
    assert!(list(&server, "bob", "").await.is_empty());

    let listed = list(&server, "alice", "").await;
    assert_eq!(listed.len(), 4);
    let ids: Vec<&str> = listed.iter().skip(1).map(|r| r["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [mine[2].as_str(), mine[1].as_str(), mine[0].as_str()]);
    assert_eq!(list(&server, "alice", "?limit=2").await.len(), 2);
    let failed = list(&server, "alice", "?status=failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["status"], "failed");
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_code_and_nothing_is_stored() {
    let fx = fixture(AUTO);
    let server = fx.start();
    let (name, key) = client_key("f");
    let raw = |body: Vec<u8>| {
        server
            .post("/api/f/v1/chat")
            .header(name, key.clone())
            .header("X-Muxi-User-ID", "u1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{}".to_vec(), 400, "missing_message"),
        (br#"{"message": "   "}"#.to_vec(), 400, "missing_message"),
        (br#"{"message": "hi""#.to_vec(), 400, "invalid_json"),
        (br#"{"message": 5}"#.to_vec(), 400, "invalid_request"),
        (br#"{"message": "hi", "async": "yes"}"#.to_vec(), 400, "invalid_request"),
        (br#"{"message": "hi", "agent_id": "ghost"}"#.to_vec(), 422, "unknown_agent"),
        (br#"{"message": "hi", "threshold_seconds": -1}"#.to_vec(), 400, "invalid_request"),
        // Beyond any Duration: a clear 400, not a panic and an empty reply.
        (br#"{"message": "hi", "threshold_seconds": 1e20}"#.to_vec(), 400, "invalid_request"),
    ];
    for (body, want_status, want_code) in cases {
        let (status, reply) = json(raw(body).await.unwrap()).await;
        assert_eq!((status, reply["code"].as_str()), (want_status, Some(want_code)), "{reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    let (_, reply) = json(raw(br#"{"message": 5}"#.to_vec()).await.unwrap()).await;
    assert!(reply["message"].as_str().unwrap().contains("message"), "names the field: {reply}");

    // Over the size limit. The server closes the connection after answering, so
    // this goes on a client of its own.
    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(2 * 1024 * 1024));
    let response = reqwest::Client::new()
        .post(server.url("/api/f/v1/chat"))
        .header(name, key.clone())
        .header("X-Muxi-User-ID", "u1")
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!((status, reply["code"].as_str()), (413, Some("payload_too_large")), "{reply}");
    assert!(list(&server, "u1", "").await.is_empty(), "nothing was stored");
}

/// A user id that is not visible ASCII is refused, never read as another user
/// (it used to become `default`); ids and keys are bounded.
#[tokio::test]
async fn user_ids_and_identifiers_are_checked() {
    let fx = fixture("async:\n  mode: sync\n");
    let server = fx.start();
    let (name, key) = client_key("f");
    let (_, body, _) = chat(&server, "default", json!({"message": "mine"})).await;
    let id = request_id(&body);
    let as_user = |user: &[u8], method: reqwest::Method, path: &str| {
        server
            .http
            .request(method, server.url(&format!("/api/f/v1{path}")))
            .header(name, key.clone())
            .header("X-Muxi-User-ID", reqwest::header::HeaderValue::from_bytes(user).unwrap())
    };
    for user in ["alic\u{e9}".as_bytes(), b"al ice", &[b'u'; 257]] {
        let (code, reply) =
            json(as_user(user, reqwest::Method::GET, &format!("/requests/{id}")).send().await.unwrap()).await;
        assert_eq!((code, reply["code"].as_str()), (400, Some("invalid_user_id")), "{reply}");
        assert!(reply["message"].as_str().unwrap().contains("X-Muxi-User-ID"), "{reply}");
        let (code, reply) =
            json(as_user(user, reqwest::Method::POST, "/chat").json(&json!({"message": "hi"})).send().await.unwrap())
                .await;
        assert_eq!((code, reply["code"].as_str()), (400, Some("invalid_user_id")), "{reply}");
    }
    let long = "x".repeat(257);
    let cases = [
        (json!({"message": "hi", "user_id": "b\u{f6}b"}), "invalid_user_id"),
        (json!({"message": "hi", "session_id": long}), "invalid_request"),
        (json!({"message": "hi", "agent_id": long}), "invalid_request"),
        (
            json!({"message": "hi", "webhook_url": format!("https://example.com/{}", "x".repeat(3000))}),
            "invalid_request",
        ),
    ];
    for (body, want) in cases {
        let (code, reply, _) = chat(&server, "u1", body).await;
        assert_eq!((code, reply["code"].as_str()), (400, Some(want)), "{reply}");
    }
    let (code, reply) = json(
        as_user(b"u1", reqwest::Method::POST, "/chat")
            .header("X-Muxi-Idempotency-Key", long.as_str())
            .json(&json!({"message": "hi"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, reply["code"].as_str()), (400, Some("invalid_request")), "{reply}");
    assert!(list(&server, "u1", "").await.is_empty(), "nothing was stored");
    assert_eq!(list(&server, "default", "").await.len(), 1);
}

#[tokio::test]
async fn errors_on_streams_arrive_as_sse_error_frames() {
    let fx = fixture(AUTO);
    let server = fx.start();
    let response = server
        .post("/api/f/v1/chat")
        .header("X-Muxi-Client-Key", "wrong")
        .header("Accept", "text/event-stream")
        .json(&json!({"message": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = response.text().await.unwrap();
    let data = body.strip_prefix("event: error\ndata: ").unwrap_or_else(|| panic!("{body}"));
    let frame: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(frame["code"], "invalid_api_key");
    assert_eq!(frame["type"], "invalid_api_key");
    assert!(frame["message"].as_str().unwrap().contains("not valid"));

    // Without Accept: text/event-stream the same error is plain JSON.
    let (code, body, _) = chat(&server, "u1", json!({"message": "", "stream": true})).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("missing_message")));
}

#[tokio::test]
async fn a_running_request_keeps_the_formation_it_started_with() {
    // The first attempt fails; the retry waits 2-4 s, and the formation is
    // replaced meanwhile. The retry must still run the version it started with.
    let fx = fixture(
        "async:\n  mode: async\noverlord:\n  workflow:\n    retry: {max_attempts: 2, initial_delay: 4, max_delay: 4}\n",
    );
    let server = fx.start();
    let (_, body, _) = chat(&server, "u1", json!({"message": "flaky:2"})).await;
    let running = request_id(&body);
    eventually(Duration::from_secs(20), "first attempt failed, retry scheduled", || async {
        let (_, body) = status(&server, "u1", &running).await;
        body["data"]["message"].as_str().is_some_and(|m| m.contains("retrying")).then_some(())
    })
    .await;

    // Version 2 replaces the default agent's program.
    fx.script("f/agent2.py", "#!/usr/bin/env python3\nimport json, sys\njson.load(sys.stdin)\nprint(json.dumps({\"result\": \"version two\"}))\n");
    let v2 = formation_yaml(
        "f",
        "async:\n  mode: async\nagents:\n  - id: worker\n    command: [\"python3\", \"agent2.py\"]\n",
    )
    .replace("version: \"1.0.0\"", "version: \"2.0.0\"");
    fx.write("f/formation.afs", &v2);
    let (admin, key) = admin_key("f");
    eventually(Duration::from_secs(15), "version 2 served", || async {
        let (_, body) = json(server.get("/api/f/v1/formation").header(admin, &key).send().await.unwrap()).await;
        (body["data"]["version"] == "2.0.0").then_some(())
    })
    .await;
    let (_, body) = status(&server, "u1", &running).await;
    assert_eq!(body["data"]["attempts"], 1, "the reload came before the retry: {body}");

    let old = finished(&server, "u1", &running).await;
    assert_eq!(old["result"]["text"], "succeeded on attempt 2", "the retry ran the old program: {old}");
    assert!(old["formation_version"].as_str().unwrap().starts_with("1.0.0+"));

    let (_, body, _) = chat(&server, "u1", json!({"message": "anything"})).await;
    let new = finished(&server, "u1", &request_id(&body)).await;
    assert_eq!(new["result"]["text"], "version two");
    assert!(new["formation_version"].as_str().unwrap().starts_with("2.0.0+"));
}

#[tokio::test]
async fn requests_beyond_the_pool_wait_pending_and_start_in_order() {
    let fx = fixture("async:\n  mode: async\noverlord:\n  max_concurrent_requests: 1\n");
    let server = fx.start();
    let mut ids = Vec::new();
    for message in ["sleep:1", "echo:b", "echo:c", "echo:d", "echo:e"] {
        let (_, body, _) = chat(&server, "u1", json!({ "message": message })).await;
        ids.push(request_id(&body));
    }
    let (_, body) = status(&server, "u1", &ids[4]).await;
    assert_eq!(body["data"]["status"], "pending");
    let mut starts = Vec::new();
    for id in &ids {
        let data = finished(&server, "u1", id).await;
        assert_eq!(data["status"], "completed");
        starts.push((
            data["started_at"].as_str().unwrap().to_string(),
            data["completed_at"].as_str().unwrap().to_string(),
        ));
    }
    for pair in starts.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "one at a time, in the order they came: {starts:?}");
    }
}

#[tokio::test]
async fn finished_requests_are_purged_after_their_formations_retention() {
    let fx = Fixture::new();
    let agents = "agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n";
    for (id, settings) in
        [("short", "async:\n  mode: sync\n  retention_days: 0.00001\n"), ("long", "async:\n  mode: sync\n")]
    {
        fx.script(&format!("{id}/agent.py"), AGENT);
        fx.write(&format!("{id}/formation.afs"), &formation_yaml(id, &format!("{settings}{agents}")));
    }
    let server = fx.start();
    let mut ids = Vec::new();
    for id in ["short", "long"] {
        let (code, body, _) = server.caller(id, "u1").chat(json!({"message": "keep me?"})).await;
        assert_eq!(code, 200, "{body}");
        ids.push(request_id(&body));
    }
    // 0.00001 days is under a second; the purge runs at start-up and hourly.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.terminate();
    let server = fx.start();
    eventually(Duration::from_secs(15), "the short-lived request purged", || async {
        (server.caller("short", "u1").status(&ids[0]).await.0 == 404).then_some(())
    })
    .await;
    let kept = server.caller("long", "u1").data(&ids[1]).await;
    assert_eq!(kept["status"], "completed", "the default retention (7 days) keeps it");
}

#[tokio::test]
async fn a_long_queue_waits_in_the_store_and_runs_oldest_first() {
    let fx = fixture("async:\n  mode: async\noverlord:\n  max_concurrent_requests: 2\n");
    let server = fx.start();
    let mut ids = Vec::new();
    for i in 0..40 {
        let (code, body, _) = chat(&server, "u1", json!({ "message": format!("echo:{i}") })).await;
        assert_eq!(code, 202, "{body}");
        ids.push(request_id(&body));
    }
    // While the queue drains, at most the pool's size of requests is held by
    // a server (taken on); the rest wait in the store, unowned.
    let db = rusqlite::Connection::open_with_flags(fx.data.join("muxi.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the store read-only");
    let (mut saw_queue, mut most_held) = (false, 0);
    for _ in 0..200 {
        let (held, queued): (i64, i64) = db
            .query_row(
                "SELECT COUNT(lease_owner), COUNT(*) - COUNT(lease_owner) FROM requests \
                 WHERE status IN ('pending', 'processing')",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("count");
        most_held = most_held.max(held);
        saw_queue |= queued > 0;
        if held + queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_queue, "requests beyond the pool wait unowned in the store");
    assert!(most_held <= 2, "at most max_concurrent_requests taken on at once, saw {most_held}");
    let mut starts = Vec::new();
    for id in &ids {
        let data = finished(&server, "u1", id).await;
        assert_eq!(data["status"], "completed", "{data}");
        starts.push(data["started_at"].as_str().unwrap().to_string());
    }
    for (i, later) in starts.iter().enumerate().skip(2) {
        assert!(starts[i - 2] <= *later, "taken on oldest first: {starts:?}");
    }
}
