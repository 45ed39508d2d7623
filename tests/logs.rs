//! Issue 11: logs an operator can use, through the real binary: JSON lines
//! (`--log-format json`), no colour codes on a pipe, one request's lines
//! carrying its formation, request id and agent, and no key or secret ever
//! written to the log.

mod common;

use std::time::Duration;

use common::receiver::{Answer, Receiver};
use common::*;
use serde_json::{json, Value};

const CLIENT_KEY: &str = "fmc_LogTestClient_7d1f0a9b3c";
const ADMIN_KEY: &str = "fma_LogTestAdmin_52e6b8c4d1";
const WEBHOOK_SECRET: &str = "whsec_LogTestSecretQ2x8Zp4Lm6Nv";
const METRICS_TOKEN: &str = "mt_LogTestScrape_93kd02";
const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys
req = json.load(sys.stdin)
if req["message"] == "fail":
    sys.stderr.write("it broke\n")
    sys.exit(3)
print(json.dumps({"progress": 50, "step": "half"}), flush=True)
print(json.dumps({"result": "done"}), flush=True)
"#;

fn fixture() -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    fx.write(
        "f/formation.afs",
        &format!(
            "schema: \"1.0.0\"\nid: f\ndescription: logs\nserver:\n  api_keys:\n    admin_key: ${{{{ secrets.LOGTEST_ADMIN }}}}\n    client_key: {CLIENT_KEY}\nasync:\n  webhook_secret: ${{{{ secrets.LOGTEST_WHSEC }}}}\nagents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n"
        ),
    );
    fx
}

#[tokio::test]
async fn json_lines_follow_one_request_and_never_show_a_key() {
    let rx = Receiver::start().await;
    rx.script("/hook", vec![Answer::Status(500)], Some(Answer::Status(200)));
    let fx = fixture();
    let server = Server::start(
        &fx,
        &["--log-format", "json", "--metrics-token", METRICS_TOKEN, "--allow-webhook-host", "127.0.0.1"],
        &[("LOGTEST_ADMIN", ADMIN_KEY), ("LOGTEST_WHSEC", WEBHOOK_SECRET), ("MUXI_LOG", "debug")],
    );
    let chat = |key: &'static str, body: Value| {
        server
            .post("/api/f/v1/chat")
            .header("X-Muxi-Client-Key", key)
            .header("X-Muxi-User-ID", "alice")
            .json(&body)
            .send()
    };
    let (code, body) = json(chat(CLIENT_KEY, json!({"message": "hi"})).await.unwrap()).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = json(chat(CLIENT_KEY, json!({"message": "fail"})).await.unwrap()).await;
    assert!(code >= 400, "{body}");
    let failed = body["request"]["id"].as_str().map(str::to_string);
    let (code, body) =
        json(chat(CLIENT_KEY, json!({"message": "hi", "async": true, "webhook_url": rx.url("/hook")})).await.unwrap())
            .await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let (code, _) = json(chat("fmc_wrong_key_guess", json!({"message": "hi"})).await.unwrap()).await;
    assert_eq!(code, 403);
    let (code, _) =
        json(server.get("/api/f/v1/admin/requests").header("X-Muxi-Admin-Key", ADMIN_KEY).send().await.unwrap()).await;
    assert_eq!(code, 200);
    assert_eq!(server.get("/metrics").bearer_auth(METRICS_TOKEN).send().await.unwrap().status().as_u16(), 200);
    assert_eq!(server.get("/metrics").bearer_auth("mt_wrong").send().await.unwrap().status().as_u16(), 403);
    rx.wait_for("/hook", 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = server.stderr();

    for secret in [CLIENT_KEY, ADMIN_KEY, WEBHOOK_SECRET, METRICS_TOKEN, "fmc_wrong_key_guess"] {
        assert!(!log.contains(secret), "the log shows `{secret}`:\n{log}");
    }
    assert!(!log.contains('\u{1b}'), "no colour codes on a pipe");
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect();
    // The async request's lines carry its span: formation, request id, agent.
    let mine: Vec<&Value> = lines.iter().filter(|l| l["span"]["request_id"] == id.as_str()).collect();
    assert!(!mine.is_empty(), "no line in the request's span:\n{log}");
    for line in &mine {
        assert_eq!(line["span"]["formation"], "f", "{line}");
        assert_eq!(line["span"]["agent"], "worker", "{line}");
        assert_eq!(line["span"]["name"], "request", "{line}");
    }
    if let Some(failed) = failed {
        assert!(lines.iter().any(|l| l["span"]["request_id"] == failed.as_str()), "the failed request's lines:\n{log}");
    }
}

#[tokio::test]
async fn text_logs_carry_the_request_span_without_colour() {
    let fx = fixture();
    let server = Server::start(&fx, &[], &[("LOGTEST_ADMIN", ADMIN_KEY), ("LOGTEST_WHSEC", WEBHOOK_SECRET)]);
    let (code, body) = json(
        server
            .post("/api/f/v1/chat")
            .header("X-Muxi-Client-Key", CLIENT_KEY)
            .json(&json!({"message": "hi", "async": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let needle = format!("request{{formation=f request_id={id} agent=worker}}");
    let log = eventually(Duration::from_secs(20), "a line in the request's span", || async {
        let log = server.stderr();
        log.contains(&needle).then_some(log)
    })
    .await;
    assert!(!log.contains('\u{1b}'), "no colour codes on a pipe:\n{log}");
    assert!(!log.contains(CLIENT_KEY) && !log.contains(ADMIN_KEY) && !log.contains(WEBHOOK_SECRET));
}
