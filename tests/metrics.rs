//! Issue 11: `GET /metrics` after real traffic, through the real binary: the
//! values match what was sent, the queue depth follows a full pool, a failing
//! webhook shows, `track_async_tasks: false` hides a formation's request
//! series, and `promtool check metrics` accepts the exposition.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::receiver::{Answer, Receiver};
use common::*;
use serde_json::json;

const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys, time
req = json.load(sys.stdin)
cmd, _, arg = req["message"].partition(":")
if cmd == "sleep":
    time.sleep(float(arg))
elif cmd == "hang":
    time.sleep(300)
elif cmd == "fail":
    sys.exit(3)
print(json.dumps({"result": "done"}), flush=True)
"#;

const ALLOW: &[&str] = &["--allow-webhook-host", "127.0.0.1"];

/// `m`: measured, auto mode, 2 slots; `q`: measured, 1 slot, always async;
/// `quiet`: `observability.track_async_tasks: false`.
fn fixture() -> Fixture {
    let fx = Fixture::new();
    let agents = "agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n";
    for id in ["m", "q", "quiet"] {
        fx.script(&format!("{id}/agent.py"), AGENT);
    }
    let m = format!("overlord:\n  max_concurrent_requests: 2\nasync:\n  webhook_retries: 0\n{agents}");
    let q = format!("overlord:\n  max_concurrent_requests: 1\nasync:\n  mode: async\n{agents}");
    let quiet = format!("observability:\n  track_async_tasks: false\n{agents}");
    fx.write("m/formation.afs", &formation_yaml("m", &m));
    fx.write("q/formation.afs", &formation_yaml("q", &q));
    fx.write("quiet/formation.afs", &formation_yaml("quiet", &quiet));
    fx
}

async fn scrape(server: &Server) -> String {
    let response = server.get("/metrics").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    response.text().await.unwrap()
}

/// The sum of every sample of `name` whose labels include all of `labels`
/// (`None` when there is no such sample).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, sample)) = line.rsplit_once(' ') else { continue };
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            continue;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            *sum.get_or_insert(0.0) += sample.parse::<f64>().unwrap();
        }
    }
    sum
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (Debian package `prometheus`; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn counts_match_the_traffic_and_the_exposition_is_valid() {
    let rx = Receiver::start().await;
    rx.script("/gone", vec![], Some(Answer::Status(410)));
    rx.script("/ok", vec![], Some(Answer::Status(200)));
    let fx = fixture();
    let server = Server::start(&fx, ALLOW, &[]);
    let m = server.caller("m", "u1");

    for _ in 0..3 {
        let (code, body, _) = m.chat(json!({"message": "hello"})).await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, body, _) = m.chat(json!({"message": "fail"})).await;
    assert!(code >= 400, "{body}");
    // Two async requests: one webhook refused for good (410), one delivered.
    let mut ids = Vec::new();
    for url in ["/gone", "/ok"] {
        let (code, body, _) = m.chat(json!({"message": "hello", "async": true, "webhook_url": rx.url(url)})).await;
        assert_eq!(code, 202, "{body}");
        ids.push(request_id(&body));
    }
    for id in &ids {
        m.finished(id).await;
    }
    let quiet = server.caller("quiet", "u1");
    for _ in 0..2 {
        let (code, body, _) = quiet.chat(json!({"message": "hello"})).await;
        assert_eq!(code, 200, "{body}");
    }

    let text = eventually(Duration::from_secs(20), "both webhooks settled in the metrics", || async {
        let text = scrape(&server).await;
        let settled = value(&text, "muxi_webhook_deliveries_total", &[("formation", "m")]);
        (settled == Some(2.0)).then_some(text)
    })
    .await;
    let f = ("formation", "m");
    assert_eq!(value(&text, "muxi_requests_accepted_total", &[f]), Some(6.0));
    assert_eq!(value(&text, "muxi_requests_accepted_total", &[f, ("mode", "sync")]), Some(4.0));
    assert_eq!(value(&text, "muxi_requests_accepted_total", &[f, ("mode", "async")]), Some(2.0));
    assert_eq!(value(&text, "muxi_requests_total", &[f, ("outcome", "completed")]), Some(5.0));
    assert_eq!(value(&text, "muxi_requests_total", &[f, ("outcome", "failed"), ("mode", "sync")]), Some(1.0));
    assert_eq!(value(&text, "muxi_requests_total", &[f, ("agent", "worker"), ("mode", "async")]), Some(2.0));
    assert_eq!(value(&text, "muxi_request_duration_seconds_count", &[f]), Some(6.0));
    assert_eq!(value(&text, "muxi_request_queued_seconds_count", &[f]), Some(6.0));
    assert_eq!(value(&text, "muxi_request_attempts_total", &[f]), Some(6.0));
    assert_eq!(value(&text, "muxi_pool_limit", &[f]), Some(2.0));
    assert_eq!(value(&text, "muxi_queue_depth", &[f]), Some(0.0));
    assert_eq!(value(&text, "muxi_requests_running", &[f]), Some(0.0));
    // The webhooks: one delivered, one refused for good.
    assert_eq!(value(&text, "muxi_webhook_deliveries_total", &[f, ("outcome", "delivered")]), Some(1.0));
    assert_eq!(value(&text, "muxi_webhook_deliveries_total", &[f, ("outcome", "failed")]), Some(1.0));
    assert_eq!(value(&text, "muxi_webhook_delivery_duration_seconds_count", &[f]), Some(2.0));
    assert_eq!(value(&text, "muxi_webhook_outbox_backlog", &[]), Some(0.0));
    // HTTP, by route template: 6 chats to `m`, 2 to `quiet`.
    let chat = ("route", "/api/{formation_id}/v1/chat");
    assert_eq!(value(&text, "muxi_http_requests_total", &[chat, ("method", "POST")]), Some(8.0));
    assert_eq!(value(&text, "muxi_http_requests_total", &[chat, ("status", "2xx")]), Some(7.0));
    assert!(!text.contains("route=\"/api/m/"), "raw paths are never labels");
    // The store and the formations.
    assert!(value(&text, "muxi_store_batch_size_count", &[]).unwrap() >= 1.0);
    assert!(value(&text, "muxi_store_commit_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert_eq!(value(&text, "muxi_formations_loaded", &[]), Some(3.0));
    assert_eq!(value(&text, "muxi_formation_load_errors_total", &[]), None);
    // `quiet` has no request series at all; ids never appear.
    for line in text.lines().filter(|l| l.contains("formation=\"quiet\"")) {
        assert!(!line.starts_with("muxi_request") && !line.starts_with("muxi_queue"), "{line}");
    }
    assert!(!text.contains("req_") && !text.contains("u1") && !text.contains("sess_"), "no ids in labels");

    promtool_check(&text);
}

#[tokio::test]
async fn queue_depth_rises_while_the_pool_is_full_and_falls_after() {
    let fx = fixture();
    let server = Server::start(&fx, &[], &[]);
    let q = server.caller("q", "u1");
    let (_, body, _) = q.chat(json!({"message": "hang"})).await;
    let holder = request_id(&body);
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (code, body, _) = q.chat(json!({"message": "sleep:0.1"})).await;
        assert_eq!(code, 202, "{body}");
        waiting.push(request_id(&body));
    }
    eventually(Duration::from_secs(20), "2 queued behind 1 running", || async {
        let text = scrape(&server).await;
        let queued = value(&text, "muxi_queue_depth", &[("formation", "q")]);
        let running = value(&text, "muxi_requests_running", &[("formation", "q")]);
        (queued == Some(2.0) && running == Some(1.0)).then_some(())
    })
    .await;
    let (code, body) = q.cancel(&holder).await;
    assert_eq!(code, 200, "{body}");
    for id in &waiting {
        assert_eq!(q.finished(id).await["status"], "completed");
    }
    let text = eventually(Duration::from_secs(20), "the queue drained", || async {
        let text = scrape(&server).await;
        let queued = value(&text, "muxi_queue_depth", &[("formation", "q")]);
        let running = value(&text, "muxi_requests_running", &[("formation", "q")]);
        (queued == Some(0.0) && running == Some(0.0)).then_some(text)
    })
    .await;
    let q = ("formation", "q");
    assert_eq!(value(&text, "muxi_requests_total", &[q, ("outcome", "cancelled")]), Some(1.0));
    assert_eq!(value(&text, "muxi_requests_total", &[q, ("outcome", "completed"), ("mode", "async")]), Some(2.0));
    assert_eq!(value(&text, "muxi_pool_limit", &[q]), Some(1.0));
    promtool_check(&text);
}

#[tokio::test]
async fn the_token_guards_metrics_and_a_separate_listener_serves_them() {
    let fx = fixture();
    let server = Server::start(&fx, &["--metrics-token", "s3cret-scrape"], &[]);
    let response = server.get("/metrics").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = server.get("/metrics").bearer_auth("wrong").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let response = server.get("/metrics").bearer_auth("s3cret-scrape").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.text().await.unwrap().contains("muxi_formations_loaded 3"));
    drop(server);

    // Port 0: the system picks a free port and the server prints it.
    let server = Server::start(&fx, &["--metrics-listen", "127.0.0.1:0"], &[]);
    let metrics = server.printed("muxi-rt metrics on ");
    assert!(metrics.starts_with("http://127.0.0.1:") && metrics.ends_with("/metrics"), "{metrics}");
    let response = server.get("/metrics").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404, "not on the main listener");
    let text = server.http.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("muxi_formations_loaded 3"), "{text}");

    drop(server);
    let server = Server::start(&fx, &["--no-metrics"], &[]);
    assert_eq!(server.get("/metrics").send().await.unwrap().status().as_u16(), 404);
}
