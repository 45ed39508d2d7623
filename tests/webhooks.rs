//! Issue 5: webhook delivery, through the real binary to a real receiver on 127.0.0.1.
//!
//! Only loopback receivers are ever contacted: targets the safety rule refuses are
//! refused before any connection, which is what the refusal tests check.

mod common;

use std::time::Duration;

use common::receiver::{verify_muxi_signature, verify_standard_signature, Answer, Receiver};
use common::*;
use serde_json::{json, Value};

const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys, time
req = json.load(sys.stdin)
msg = req["message"]
cmd, _, arg = msg.partition(":")
def emit(**kw):
    print(json.dumps(kw), flush=True)
if cmd == "sleep":
    time.sleep(float(arg))
    emit(result=f"slept {arg}")
elif cmd == "hang":
    emit(progress=5, step="hanging")
    time.sleep(300)
elif cmd == "fail":
    sys.stderr.write("boom\n")
    sys.exit(3)
else:
    emit(result=f"echo: {msg}", artifacts=[{"name": "a.txt"}])
"#;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ALLOW: &[&str] = &["--allow-webhook-host", "localhost", "--allow-webhook-host", "127.0.0.1"];

/// Formations:
/// - `f`: always async, `whsec_` secret (both signature schemes), 3 retries;
/// - `g`: auto mode (threshold 3 s), no secret (the admin key signs), a default
///   `async.webhook_url` on the receiver;
/// - `h`: 1 retry, 5 s per attempt: for receivers that misbehave.
fn fixture(rx: &Receiver) -> Fixture {
    let fx = Fixture::new();
    let agents = "agents:\n  - id: worker\n    default: true\n    estimated_seconds: 0.2\n    command: [\"python3\", \"agent.py\"]\n";
    for id in ["f", "g", "h"] {
        fx.script(&format!("{id}/agent.py"), AGENT);
    }
    let f = format!(
        "async:\n  mode: async\n  webhook_retries: 3\n  webhook_timeout: 3\n  webhook_secret: {WHSEC}\n{agents}"
    );
    let g = format!("async:\n  mode: auto\n  threshold_seconds: 3\n  webhook_url: {}\n{agents}", rx.url("/g-default"));
    let h = format!("async:\n  mode: async\n  webhook_retries: 1\n  webhook_timeout: 5\n{agents}");
    fx.write("f/formation.afs", &formation_yaml("f", &f));
    fx.write("g/formation.afs", &formation_yaml("g", &g));
    fx.write("h/formation.afs", &formation_yaml("h", &h));
    fx
}

// As user `u1` of `formation`, through the shared helper.
async fn chat(server: &Server, formation: &str, body: Value) -> (u16, Value) {
    let (code, body, _) = server.caller(formation, "u1").chat(body).await;
    (code, body)
}

async fn status(server: &Server, formation: &str, id: &str) -> Value {
    server.caller(formation, "u1").data(id).await
}

/// Sends an async chat with a webhook URL; returns the request id.
async fn submit(server: &Server, formation: &str, message: &str, webhook_url: &str) -> String {
    let (code, body) =
        chat(server, formation, json!({"message": message, "webhook_url": webhook_url, "async": true})).await;
    assert_eq!(code, 202, "{body}");
    body["data"]["request_id"].as_str().unwrap().to_string()
}

/// Waits until the request's webhook is no longer pending; returns `webhook`.
async fn webhook_settled(server: &Server, formation: &str, id: &str, limit: Duration) -> Value {
    eventually(limit, "webhook delivered or given up", || async {
        let data = status(server, formation, id).await;
        let webhook = data["webhook"].clone();
        matches!(webhook["status"].as_str(), Some("delivered" | "failed")).then_some(webhook)
    })
    .await
}

#[tokio::test]
async fn completed_request_is_delivered_signed_by_both_schemes() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);
    let id = submit(&server, "f", "hello", &rx.url("/done")).await;

    let hits = rx.wait_for("/done", 1, Duration::from_secs(30)).await;
    let hit = &hits[0];
    let t = verify_muxi_signature(hit, WHSEC);
    verify_standard_signature(hit, WHSEC);
    assert_eq!(hit.header("webhook-timestamp"), Some(t.to_string().as_str()));
    assert!(hit.header("webhook-id").unwrap().starts_with("msg_"));
    assert_eq!(hit.header("content-type"), Some("application/json"));

    let event = hit.json();
    assert_eq!(event["id"], id.as_str());
    assert_eq!(event["request_id"], id.as_str());
    assert_eq!(event["status"], "completed");
    assert_eq!(event["formation_id"], "f");
    assert_eq!(event["user_id"], "u1");
    assert_eq!(event["processing_mode"], "async");
    assert_eq!(event["webhook_url"], rx.url("/done").as_str());
    assert_eq!(event["response"], json!([{"type": "text", "text": "echo: hello"}]));
    assert_eq!(event["result"], json!({"text": "echo: hello", "artifacts": [{"name": "a.txt"}]}));
    assert_eq!(event["error"], Value::Null);
    assert!(event["processing_time"].as_f64().unwrap() >= 0.0);
    let ms = event["timestamp"].as_i64().unwrap();
    assert!((ms / 1000 - t).abs() <= 2, "timestamp is in ms: {ms}");

    let webhook = webhook_settled(&server, "f", &id, Duration::from_secs(10)).await;
    assert_eq!(webhook, json!({"status": "delivered", "attempts": 1, "last_error": null}));
    assert_eq!(rx.hits("/done").len(), 1, "delivered once");
}

#[tokio::test]
async fn failed_and_cancelled_requests_are_delivered_too() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);

    let failed = submit(&server, "f", "fail", &rx.url("/failed")).await;
    let hit = rx.wait_for("/failed", 1, Duration::from_secs(30)).await.remove(0);
    verify_muxi_signature(&hit, WHSEC);
    let event = hit.json();
    assert_eq!((event["id"].as_str(), event["status"].as_str()), (Some(failed.as_str()), Some("failed")));
    assert!(event["error"]["code"].is_string() && event["error"]["message"].is_string(), "{event}");
    assert_eq!(event["response"], json!([]));

    let hanging = submit(&server, "f", "hang", &rx.url("/cancelled")).await;
    eventually(Duration::from_secs(20), "request running", || async {
        (status(&server, "f", &hanging).await["status"] == "processing").then_some(())
    })
    .await;
    let (name, key) = client_key("f");
    let response = server
        .delete(&format!("/api/f/v1/requests/{hanging}"))
        .header(name, key)
        .header("X-Muxi-User-ID", "u1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let event = rx.wait_for("/cancelled", 1, Duration::from_secs(30)).await[0].json();
    assert_eq!((event["id"].as_str(), event["status"].as_str()), (Some(hanging.as_str()), Some("cancelled")));
}

#[tokio::test]
async fn formation_default_url_gets_async_answers_signed_with_the_admin_key() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);

    // Answered synchronously: nobody is waiting for a webhook.
    let (code, body) = chat(&server, "g", json!({"message": "quick"})).await;
    assert_eq!(code, 200, "{body}");
    let quick = body["data"]["request_id"].as_str().unwrap().to_string();
    // Promoted to async at the 3 s threshold: delivered to the formation's URL.
    let (code, body) = chat(&server, "g", json!({"message": "sleep:5"})).await;
    assert_eq!(code, 202, "{body}");
    let promoted = body["data"]["request_id"].as_str().unwrap().to_string();

    let hit = rx.wait_for("/g-default", 1, Duration::from_secs(30)).await.remove(0);
    // No webhook_secret: the admin key signs, and it has no whsec_ form.
    verify_muxi_signature(&hit, "admin-g");
    assert!(hit.header("webhook-signature").is_none());
    assert!(hit.header("webhook-id").is_some());
    let event = hit.json();
    assert_eq!(event["id"], promoted.as_str());
    assert_eq!(event["status"], "completed");
    assert_eq!(event["webhook_url"], rx.url("/g-default").as_str());

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.hits("/g-default").len(), 1, "the sync answer is not delivered");
    assert_eq!(status(&server, "g", &quick).await["webhook"], Value::Null);
}

#[tokio::test]
async fn retries_back_off_and_honour_retry_after_until_success() {
    let rx = Receiver::start().await;
    rx.script("/flaky", vec![Answer::Status(500), Answer::With(503, "retry-after", "3".into())], None);
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);
    let id = submit(&server, "f", "hello", &rx.url("/flaky")).await;

    // Between attempts the status shows the delivery pending with its last error.
    rx.wait_for("/flaky", 1, Duration::from_secs(30)).await;
    let pending = eventually(Duration::from_secs(5), "first failure recorded", || async {
        let webhook = status(&server, "f", &id).await["webhook"].clone();
        (webhook["attempts"] == 1).then_some(webhook)
    })
    .await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["last_error"], "HTTP 500");

    let hits = rx.wait_for("/flaky", 3, Duration::from_secs(30)).await;
    assert_eq!(hits.len(), 3);
    let ids: Vec<_> = hits.iter().map(|h| h.header("webhook-id").unwrap().to_string()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "webhook-id is stable across retries: {ids:?}");
    for hit in &hits {
        verify_muxi_signature(hit, WHSEC);
        verify_standard_signature(hit, WHSEC);
        assert_eq!(hit.json()["id"], id.as_str());
    }
    // Backoff: 1 s (jitter 0.75..1.25) after the first failure; the 503 asked for 3 s.
    let first_gap = hits[1].at - hits[0].at;
    let second_gap = hits[2].at - hits[1].at;
    assert!(first_gap >= Duration::from_millis(700) && first_gap < Duration::from_secs(3), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(2900), "Retry-After honoured: {second_gap:?}");

    let webhook = webhook_settled(&server, "f", &id, Duration::from_secs(10)).await;
    assert_eq!(webhook["status"], "delivered");
    assert_eq!(webhook["attempts"], 3);
}

#[tokio::test]
async fn gone_stops_and_exhausted_retries_fail() {
    let rx = Receiver::start().await;
    rx.script("/gone", vec![], Some(Answer::Status(410)));
    rx.script("/broken", vec![], Some(Answer::Status(500)));
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);

    let gone = submit(&server, "f", "hello", &rx.url("/gone")).await;
    let broken = submit(&server, "h", "hello", &rx.url("/broken")).await;

    let webhook = webhook_settled(&server, "f", &gone, Duration::from_secs(20)).await;
    assert_eq!(webhook["status"], "failed");
    assert_eq!(webhook["attempts"], 1);
    assert!(webhook["last_error"].as_str().unwrap().contains("410"), "{webhook}");

    // `h` allows 1 retry: two attempts, then failed.
    let webhook = webhook_settled(&server, "h", &broken, Duration::from_secs(20)).await;
    assert_eq!(webhook["status"], "failed");
    assert_eq!(webhook["attempts"], 2);
    assert!(webhook["last_error"].as_str().unwrap().contains("HTTP 500"), "{webhook}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rx.hits("/gone").len(), 1, "410 is not retried");
    assert_eq!(rx.hits("/broken").len(), 2);
}

#[tokio::test]
async fn misbehaving_receivers_never_block_other_deliveries() {
    let rx = Receiver::start().await;
    rx.script("/hang", vec![], Some(Answer::Hang));
    rx.script("/redirect", vec![], Some(Answer::With(302, "location", "http://169.254.169.254/latest".into())));
    rx.script("/error", vec![], Some(Answer::Status(500)));
    // A port nobody listens on: connection refused.
    let (_held, closed) = muxi_rt::testing::closed_port();
    let closed = format!("http://{closed}/refused");
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);

    let hang = submit(&server, "h", "hello", &rx.url("/hang")).await;
    let redirect = submit(&server, "h", "hello", &rx.url("/redirect")).await;
    let error = submit(&server, "h", "hello", &rx.url("/error")).await;
    let refused = submit(&server, "h", "hello", &closed).await;
    rx.wait_for("/hang", 1, Duration::from_secs(30)).await;
    let good = submit(&server, "h", "hello", &rx.url("/good")).await;

    let hit = rx.wait_for("/good", 1, Duration::from_secs(30)).await.remove(0);
    assert_eq!(hit.json()["id"], good.as_str());
    // Delivered while the first attempt at the hanging receiver is still waiting.
    let webhook = status(&server, "h", &hang).await["webhook"].clone();
    assert_eq!((webhook["status"].as_str(), webhook["attempts"].as_u64()), (Some("pending"), Some(0)), "{webhook}");

    let webhook = webhook_settled(&server, "h", &redirect, Duration::from_secs(20)).await;
    assert_eq!((webhook["status"].as_str(), webhook["attempts"].as_u64()), (Some("failed"), Some(2)));
    assert!(webhook["last_error"].as_str().unwrap().contains("redirect not followed"), "{webhook}");
    let webhook = webhook_settled(&server, "h", &error, Duration::from_secs(20)).await;
    assert_eq!(webhook["status"], "failed");
    let webhook = webhook_settled(&server, "h", &refused, Duration::from_secs(20)).await;
    assert_eq!(webhook["status"], "failed");
    assert!(webhook["last_error"].as_str().unwrap().contains("connection failed"), "{webhook}");
    let webhook = webhook_settled(&server, "h", &hang, Duration::from_secs(30)).await;
    assert_eq!(webhook["status"], "failed");
    assert!(webhook["last_error"].as_str().unwrap().contains("timed out"), "{webhook}");
    assert_eq!(rx.hits("/redirect").len(), 2);
    assert_eq!(rx.hits("/good").len(), 1);
}

#[tokio::test]
async fn a_delivery_pending_at_sigkill_arrives_after_restart() {
    let rx = Receiver::start().await;
    rx.script("/later", vec![], Some(Answer::Status(503)));
    let fx = fixture(&rx);
    let server = Server::start(&fx, ALLOW, &[]);
    let id = submit(&server, "f", "hello", &rx.url("/later")).await;
    let first = rx.wait_for("/later", 1, Duration::from_secs(30)).await.remove(0);
    let webhook_id = first.header("webhook-id").unwrap().to_string();
    eventually(Duration::from_secs(5), "first failure recorded", || async {
        (status(&server, "f", &id).await["webhook"]["attempts"] == 1).then_some(())
    })
    .await;
    server.kill();

    // The receiver recovers while the server is down; the allow-list now comes
    // from the environment.
    rx.script("/later", vec![], None);
    let before = rx.hits("/later").len();
    let server = Server::start(&fx, &[], &[("MUXI_ALLOW_WEBHOOK_HOSTS", "localhost,127.0.0.1")]);
    let hits = rx.wait_for("/later", before + 1, Duration::from_secs(30)).await;
    let last = hits.last().unwrap();
    assert_eq!(last.header("webhook-id"), Some(webhook_id.as_str()), "same delivery, same webhook-id");
    verify_muxi_signature(last, WHSEC);
    verify_standard_signature(last, WHSEC);
    assert_eq!(last.json()["id"], id.as_str());
    let webhook = webhook_settled(&server, "f", &id, Duration::from_secs(10)).await;
    assert_eq!(webhook["status"], "delivered");
    assert!(webhook["attempts"].as_u64().unwrap() >= 2, "{webhook}");
}

#[tokio::test]
async fn unsafe_or_malformed_targets_are_refused_at_request_time() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    // No --allow-webhook-host: loopback is refused like any internal address.
    let server = Server::start(&fx, &[], &[]);
    let refused = [
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.1.10:8080/hook",
        "http://[::1]/hook",
        &rx.url("/loopback"),
    ];
    for url in refused {
        let (code, body) = chat(&server, "f", json!({"message": "hello", "webhook_url": url})).await;
        assert_eq!(code, 422, "{url}: {body}");
        assert_eq!(body["code"], "webhook_target_refused", "{url}: {body}");
        assert!(body["message"].as_str().unwrap().contains("address"), "{body}");
    }
    for url in ["ftp://x", "not a url", "file:///etc/passwd", "/relative"] {
        let (code, body) = chat(&server, "f", json!({"message": "hello", "webhook_url": url})).await;
        assert_eq!(code, 422, "{url}: {body}");
        assert_eq!(body["code"], "invalid_webhook_url", "{url}: {body}");
    }
    // Nothing was stored, nothing was sent.
    let (name, key) = client_key("f");
    let response =
        server.get("/api/f/v1/requests").header(name, key).header("X-Muxi-User-ID", "u1").send().await.unwrap();
    let (code, body) = json(response).await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["count"], 0, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.all_hits().is_empty());
}

/// A receiver answering `Retry-After: 1e20` (more seconds than any Duration
/// holds) neither crashes the delivery nor gets it re-sent in a loop: the
/// attempt is counted, the wait is capped (one hour), `webhook_retries` holds.
#[tokio::test]
async fn an_absurd_retry_after_is_capped_and_retries_still_count() {
    let rx = Receiver::start().await;
    let absurd = Answer::With(503, "retry-after", "1e20".to_string());
    rx.script("/absurd", vec![], Some(absurd.clone()));
    rx.script("/absurd-once", vec![], Some(absurd));
    let fx = fixture(&rx);
    let none = "async:\n  mode: async\n  webhook_retries: 0\nagents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n";
    fx.script("r/agent.py", AGENT);
    fx.write("r/formation.afs", &formation_yaml("r", none));
    let server = Server::start(&fx, ALLOW, &[]);

    // No retries allowed: one attempt, then failed.
    let once = submit(&server, "r", "hello", &rx.url("/absurd-once")).await;
    let webhook = webhook_settled(&server, "r", &once, Duration::from_secs(20)).await;
    assert_eq!(webhook["status"], "failed", "{webhook}");
    assert_eq!(webhook["attempts"], 1, "{webhook}");

    // Retries allowed: the first attempt is recorded and the next one waits.
    let id = submit(&server, "f", "hello", &rx.url("/absurd")).await;
    let webhook = eventually(Duration::from_secs(20), "first attempt recorded", || async {
        let webhook = status(&server, "f", &id).await["webhook"].clone();
        (webhook["attempts"] == 1).then_some(webhook)
    })
    .await;
    assert_eq!(webhook["status"], "pending", "{webhook}");
    assert!(webhook["last_error"].as_str().unwrap().contains("HTTP 503"), "{webhook}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.hits("/absurd").len(), 1, "not re-sent before its Retry-After");
    assert_eq!(rx.hits("/absurd-once").len(), 1, "not re-sent after failing");
    assert_eq!(status(&server, "f", &id).await["webhook"]["attempts"], 1);
}
