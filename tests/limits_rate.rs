//! Issue 11: rate limits through the real binary: a formation's per-key and
//! per-user buckets, the server-wide `--rate-limit`, and the cap on unfinished
//! requests per user under concurrent submits. Over a limit: 429
//! `rate_limited` with a `Retry-After` after which the next call passes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys, time
req = json.load(sys.stdin)
cmd, _, arg = req["message"].partition(":")
if cmd == "hang":
    time.sleep(300)
print(json.dumps({"result": "done"}), flush=True)
"#;

fn fixture(extra: &str) -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let body = format!("{extra}agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n");
    fx.write("f/formation.afs", &formation_yaml("f", &body));
    fx
}

async fn health(caller: &Caller<'_>) -> (u16, Value, Option<u64>) {
    let response = caller.request(reqwest::Method::GET, "/requests").send().await.unwrap();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let (code, body) = json(response).await;
    (code, body, retry_after)
}

/// Sends calls until one is refused; returns how many passed and the refusal.
async fn until_refused(caller: &Caller<'_>, most: usize) -> (usize, Value, u64) {
    for passed in 0..most {
        let (code, body, retry_after) = health(caller).await;
        if code == 429 {
            assert_eq!(body["code"], "rate_limited", "{body}");
            return (passed, body, retry_after.expect("a Retry-After"));
        }
        assert_eq!(code, 200, "{body}");
    }
    panic!("no call was refused in {most}");
}

#[tokio::test]
async fn a_user_past_the_formation_limit_waits_retry_after_then_passes() {
    // 1 request every 5 s, 3 at once, per user; per key: plenty.
    let fx = fixture(
        "  rate_limits:\n    per_user: { requests_per_second: 0.2, burst: 3 }\n    per_key: { requests_per_second: 1000 }\n",
    );
    // (`server:` is opened by formation_yaml; the lines above continue it.)
    let server = Server::start(&fx, &[], &[]);
    let alice = server.caller("f", "alice");
    let (passed, body, retry_after) = until_refused(&alice, 10).await;
    assert_eq!(passed, 3, "the burst passes, then the limit holds");
    assert!((1..=5).contains(&retry_after), "the real wait, rounded up: {retry_after} ({body})");
    // Another user has their own bucket.
    let (code, body, _) = health(&server.caller("f", "bob")).await;
    assert_eq!(code, 200, "{body}");
    // After the wait given, the next call passes.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (code, body, _) = health(&alice).await;
    assert_eq!(code, 200, "{body}");

    let metrics = server.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("muxi_rate_limited_total{formation=\"f\",limit=\"user\"} 1"), "{metrics}");
}

#[tokio::test]
async fn the_server_limit_is_per_key() {
    let fx = fixture("");
    let server = Server::start(&fx, &["--rate-limit", "0.25:2"], &[]);
    let alice = server.caller("f", "alice");
    let (passed, _, retry_after) = until_refused(&alice, 10).await;
    assert_eq!(passed, 2);
    assert!((1..=4).contains(&retry_after), "{retry_after}");
    // The same key for another user is the same bucket.
    let (code, _, _) = health(&server.caller("f", "bob")).await;
    assert_eq!(code, 429);
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (code, body, _) = health(&alice).await;
    assert_eq!(code, 200, "{body}");
    // The admin key is another bucket.
    let (status, body) = server.admin("f").get("/requests").await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_bad_rate_limit_is_refused_clearly() {
    let fx = fixture("");
    let (code, _, stderr) = run_cli(
        &["serve", fx.formations.to_str().unwrap(), "--listen", "127.0.0.1:0", "--rate-limit", "0:5"],
        fx.data.parent().unwrap(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--rate-limit") && stderr.contains("above 0"), "{stderr}");
}

#[tokio::test]
async fn the_pending_cap_per_user_holds_under_concurrency() {
    let fx = fixture("overlord:\n  max_pending_per_user: 3\nasync:\n  mode: async\n");
    let server = Server::start(&fx, &[], &[]);
    let alice = server.caller("f", "alice");
    let sends = (0..12).map(|_| alice.chat(json!({"message": "hang"})));
    let answers = futures::future::join_all(sends).await;
    let accepted: Vec<String> = answers.iter().filter(|(c, _, _)| *c == 202).map(|(_, b, _)| request_id(b)).collect();
    let refused: Vec<_> = answers.iter().filter(|(c, _, _)| *c == 429).collect();
    assert_eq!(accepted.len(), 3, "{answers:?}");
    assert_eq!(refused.len(), 9, "{answers:?}");
    for (_, body, headers) in &refused {
        assert_eq!(body["code"], "rate_limited", "{body}");
        assert!(headers.get("retry-after").is_some());
    }
    let listed = alice.list("").await;
    assert_eq!(listed.len(), 3, "only the accepted ones were stored: {listed:?}");
    assert!(listed.iter().all(|r| matches!(r["status"].as_str(), Some("pending" | "processing"))), "{listed:?}");
    // Another user is not held back.
    let (code, body, _) = server.caller("f", "bob").chat(json!({"message": "quick"})).await;
    assert_eq!(code, 202, "{body}");
    // One ends: one more fits.
    let (code, body) = alice.cancel(&accepted[0]).await;
    assert_eq!(code, 200, "{body}");
    let id = eventually(Duration::from_secs(10), "a slot for alice", || async {
        let (code, body, _) = alice.chat(json!({"message": "quick"})).await;
        (code == 202).then(|| request_id(&body))
    })
    .await;
    assert_eq!(alice.finished(&id).await["status"], "completed");
    let (code, _, _) = alice.chat(json!({"message": "hang"})).await;
    assert_eq!(code, 202, "the quick one ended, so its place is free again");
    let (code, body, _) = alice.chat(json!({"message": "hang"})).await;
    assert_eq!(code, 429, "{body}");
}
