//! Issue 5: trigger templates fired over HTTP, in both body forms and both modes.

mod common;

use std::time::Duration;

use common::receiver::{verify_muxi_signature, Receiver};
use common::*;
use serde_json::{json, Value};

const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys
req = json.load(sys.stdin)
print(json.dumps({"result": "echo: " + req["message"]}), flush=True)
"#;

/// Formation `t` with agents `worker` (default) and `triage`, and four triggers.
fn fixture(rx: &Receiver) -> Fixture {
    let fx = Fixture::new();
    fx.script("t/agent.py", AGENT);
    let agents = r#"agents:
  - id: worker
    default: true
    estimated_seconds: 0.2
    command: ["python3", "agent.py"]
  - id: triage
    estimated_seconds: 0.2
    command: ["python3", "agent.py"]
"#;
    fx.write("t/formation.afs", &formation_yaml("t", agents));
    fx.write(
        "t/triggers/github-issue.md",
        "---\nagent: triage\ndescription: New GitHub issue\n---\nTriage issue #${{ data.issue.number }}: ${{ data.issue.title }} by ${{ data.issue.user.login }}\n",
    );
    fx.write("t/triggers/ping.md", "ping ${{ data.who }}\n");
    fx.write("t/triggers/wait.md", "---\nasync: false\n---\nwait for ${{ data.who }}\n");
    fx.write(
        "t/triggers/notify.md",
        &format!("---\nwebhook_url: {}\n---\nnotify ${{{{ data.who }}}}\n", rx.url("/notify")),
    );
    fx
}

fn start(fx: &Fixture) -> Server {
    Server::start(fx, &["--allow-webhook-host", "127.0.0.1"], &[])
}

async fn get(server: &Server, path: &str) -> (u16, Value) {
    let (name, key) = client_key("t");
    json(server.get(&format!("/api/t/v1{path}")).header(name, key).send().await.unwrap()).await
}

/// POSTs `body` (JSON) to `/triggers/{path}` as user `user`.
async fn fire(server: &Server, path: &str, user: &str, body: Value) -> (u16, Value) {
    let caller = server.caller("t", user);
    json(caller.request(reqwest::Method::POST, &format!("/triggers/{path}")).json(&body).send().await.unwrap()).await
}

async fn finished(server: &Server, user: &str, id: &str) -> Value {
    server.caller("t", user).finished(id).await
}

#[tokio::test]
async fn triggers_are_listed_and_shown() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = start(&fx);

    let (code, body) = get(&server, "/triggers").await;
    assert_eq!(code, 200, "{body}");
    let names: Vec<&str> =
        body["data"]["triggers"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["github-issue", "notify", "ping", "wait"]);
    assert_eq!(body["data"]["count"], 4);

    let (code, body) = get(&server, "/triggers/github-issue").await;
    assert_eq!(code, 200, "{body}");
    let t = &body["data"];
    assert_eq!(t["name"], "github-issue");
    assert_eq!(t["description"], "New GitHub issue");
    assert_eq!(t["agent_id"], "triage");
    assert_eq!(t["use_async"], true);
    assert_eq!(t["fields"], json!(["issue.number", "issue.title", "issue.user.login"]));
    assert!(t["template"].as_str().unwrap().starts_with("Triage issue #${{ data.issue.number }}"));
    let (_, body) = get(&server, "/triggers/wait").await;
    assert_eq!(body["data"]["use_async"], false);

    let (code, body) = get(&server, "/triggers/nope").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["code"], "trigger_not_found");
    assert!(body["message"].as_str().unwrap().contains("github-issue"), "names the known triggers: {body}");

    let response = server.get("/api/t/v1/triggers").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn triggers_default_to_async_in_both_body_forms() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = start(&fx);

    // The MUXI docs' form: {"data": {...}, ...}.
    let issue = json!({"number": 42, "title": "Crash on start", "user": {"login": "ada"}});
    let (code, body) = fire(&server, "github-issue", "u1", json!({"data": {"issue": issue}, "session_id": "s1"})).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let data = finished(&server, "u1", &id).await;
    assert_eq!(data["status"], "completed");
    assert_eq!(data["result"]["text"], "echo: Triage issue #42: Crash on start by ada");
    assert_eq!(data["agent_id"], "triage", "the trigger's agent runs");
    assert_eq!(data["session_id"], "s1");
    assert_eq!(data["processing_mode"], "async");

    // The SDK's form: the data is the whole body (here a GitHub-like payload).
    let (code, body) = fire(&server, "ping", "u2", json!({"who": "bob", "action": "opened"})).await;
    assert_eq!(code, 202, "{body}");
    let data = finished(&server, "u2", &request_id(&body)).await;
    assert_eq!(data["result"]["text"], "echo: ping bob");
    assert_eq!(data["agent_id"], "worker");
    assert_eq!(data["user_id"], "u2");
}

#[tokio::test]
async fn a_trigger_waits_for_the_result_when_asked() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = start(&fx);

    let (code, body) = fire(&server, "ping", "u1", json!({"data": {"who": "ada"}, "use_async": false})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "echo: ping ada");
    assert!(body["data"]["request_id"].is_string());

    // The SDK: data as the body, ?async=false.
    let (code, body) = fire(&server, "ping?async=false", "u1", json!({"who": "bob"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "echo: ping bob");
    let (code, _) = fire(&server, "ping?async=true", "u1", json!({"who": "bob"})).await;
    assert_eq!(code, 202);

    // Front matter `async: false` waits by default; the call can still say async.
    let (code, body) = fire(&server, "wait", "u1", json!({"who": "cy"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "echo: wait for cy");
    let (code, _) = fire(&server, "wait?async=true", "u1", json!({"who": "cy"})).await;
    assert_eq!(code, 202);
    // The body's setting wins over the query's.
    let (code, _) = fire(&server, "wait?async=false", "u1", json!({"data": {"who": "cy"}, "use_async": true})).await;
    assert_eq!(code, 202);
}

#[tokio::test]
async fn bad_trigger_calls_are_refused_and_nothing_is_stored() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = start(&fx);

    let (code, body) = fire(&server, "nope", "u1", json!({"who": "ada"})).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["code"], "trigger_not_found");

    let (code, body) = fire(&server, "github-issue", "u1", json!({"data": {"issue": {"number": 1}}})).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["code"], "missing_trigger_data");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("issue.title") && message.contains("issue.user.login"), "{message}");
    assert_eq!(body["error"]["details"]["missing"], json!(["issue.title", "issue.user.login"]));
    // The SDK form without the field.
    let (code, body) = fire(&server, "ping?async=false", "u1", json!({"whom": "ada"})).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["details"]["missing"], json!(["who"]));

    for (url, code_name) in [
        ("http://10.0.0.1/x", "webhook_target_refused"),
        ("http://169.254.169.254/latest/meta-data", "webhook_target_refused"),
        ("ftp://x", "invalid_webhook_url"),
    ] {
        let (code, body) = fire(&server, "ping", "u1", json!({"data": {"who": "a"}, "webhook_url": url})).await;
        assert_eq!(code, 422, "{url}: {body}");
        assert_eq!(body["code"], code_name, "{url}: {body}");
    }

    let (code, body) = fire(&server, "ping?async=maybe", "u1", json!({"who": "a"})).await;
    assert_eq!(body["code"], "invalid_request", "{code} {body}");
    let (code, body) = fire(&server, "ping", "u1", json!({"data": {"who": "a"}, "use_async": "no"})).await;
    assert_eq!(body["code"], "invalid_request", "{code} {body}");

    let (name, key) = client_key("t");
    let response = server.post("/api/t/v1/triggers/ping").header(name, key).body("{not json").send().await.unwrap();
    let (_, body) = json(response).await;
    assert_eq!(body["code"], "invalid_json", "{body}");

    let (name, key) = client_key("t");
    let response =
        server.get("/api/t/v1/requests").header(name, key).header("X-Muxi-User-ID", "u1").send().await.unwrap();
    let (_, body) = json(response).await;
    assert_eq!(body["data"]["count"], 0, "no request was stored: {body}");
}

#[tokio::test]
async fn trigger_webhooks_come_from_front_matter_unless_the_call_gives_one() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = start(&fx);

    let (code, body) = fire(&server, "notify", "u1", json!({"who": "ada"})).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let hit = rx.wait_for("/notify", 1, Duration::from_secs(30)).await.remove(0);
    verify_muxi_signature(&hit, "admin-t");
    let event = hit.json();
    assert_eq!(event["id"], id.as_str());
    assert_eq!(event["response"][0]["text"], "echo: notify ada");

    let (code, body) =
        fire(&server, "notify", "u1", json!({"data": {"who": "bob"}, "webhook_url": rx.url("/override")})).await;
    assert_eq!(code, 202, "{body}");
    let hit = rx.wait_for("/override", 1, Duration::from_secs(30)).await.remove(0);
    assert_eq!(hit.json()["id"], request_id(&body).as_str());
    assert_eq!(rx.hits("/notify").len(), 1);
}

#[tokio::test]
async fn triggers_reload_with_the_formation() {
    let rx = Receiver::start().await;
    let fx = fixture(&rx);
    let server = start(&fx);

    fx.write("t/triggers/fresh.md", "fresh ${{ data.x }}\n");
    fx.remove("t/triggers/ping.md");
    eventually(Duration::from_secs(10), "trigger folder reloaded", || async {
        let (_, body) = get(&server, "/triggers").await;
        let names: Vec<String> = body["data"]["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        (names.contains(&"fresh".to_string()) && !names.contains(&"ping".to_string())).then_some(())
    })
    .await;
    let (code, body) = fire(&server, "fresh?async=false", "u1", json!({"x": 1})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["message"]["content"], "echo: fresh 1");
    let (code, _) = fire(&server, "ping", "u1", json!({"who": "a"})).await;
    assert_eq!(code, 404);
}
