//! Issue 12: sessions, agents, config, the root mount and the per-user event
//! stream, through real HTTP against the real binary.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Echoes the message; `steps:N` works N steps of 0.2 s with progress first;
/// `history?` answers with the history it was given, as JSON.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys, time
req = json.load(sys.stdin)
msg = req["message"]
if msg == "history?":
    print(json.dumps({"result": json.dumps(req.get("history", []))}), flush=True)
    sys.exit(0)
if msg.startswith("steps:"):
    n = int(msg.split(":")[1])
    for i in range(n):
        print(json.dumps({"progress": int(100 * i / n), "step": f"step {i + 1}", "total_steps": n}), flush=True)
        time.sleep(0.2)
print(json.dumps({"result": "echo: " + msg}), flush=True)
"#;

fn fixture(extra: &str) -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let agents = r#"agents:
  - id: echo
    name: Echo
    description: Echoes
    default: true
    estimated_seconds: 0.2
    command: ["python3", "agent.py"]
"#;
    fx.write("f/formation.afs", &formation_yaml("f", &format!("{extra}{agents}")));
    fx
}

async fn say(caller: &Caller<'_>, session: &str, message: &str) -> String {
    let (code, body, _) = caller.chat(json!({ "message": message, "session_id": session, "async": false })).await;
    assert_eq!(code, 200, "{body}");
    request_id(&body)
}

#[tokio::test]
async fn sessions_are_listed_read_and_restored_per_user() {
    let fx = fixture("");
    let server = fx.start();
    let alice = server.caller("f", "alice");
    let r1 = say(&alice, "sess_a", "one").await;
    let r2 = say(&alice, "sess_a", "two").await;
    let r3 = say(&alice, "sess_b", "three").await;

    let (code, body) = alice.get("/sessions").await;
    assert_eq!(code, 200, "{body}");
    let sessions = body["data"]["sessions"].as_array().unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sess_b", "sess_a"], "latest activity first: {body}");
    assert_eq!(sessions[1]["message_count"], 4);
    assert_eq!(sessions[1]["request_count"], 2);
    assert_eq!(body["data"]["count"], 2);
    let (_, limited) = alice.get("/sessions?limit=1").await;
    assert_eq!(limited["data"]["sessions"].as_array().unwrap().len(), 1);

    let (code, one) = alice.get("/sessions/sess_a").await;
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["data"]["session_id"], "sess_a");
    assert_eq!(one["data"]["message_count"], 4);

    let (code, body) = alice.get("/sessions/sess_a/messages").await;
    assert_eq!(code, 200, "{body}");
    let messages = body["data"]["messages"].as_array().unwrap();
    let shown: Vec<(String, String, String)> = messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
                m["request_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = |role: &str, content: &str, id: &str| (role.to_string(), content.to_string(), id.to_string());
    assert_eq!(
        shown,
        [
            expect("user", "one", &r1),
            expect("assistant", "echo: one", &r1),
            expect("user", "two", &r2),
            expect("assistant", "echo: two", &r2),
        ]
    );
    let (_, b) = alice.get("/sessions/sess_b/messages").await;
    assert_eq!(b["data"]["messages"][0]["request_id"], r3.as_str());

    // Another user sees none of it.
    let bob = server.caller("f", "bob");
    let (_, theirs) = bob.get("/sessions").await;
    assert_eq!(theirs["data"]["sessions"], json!([]));
    let (code, missing) = bob.get("/sessions/sess_a").await;
    assert_eq!((code, missing["code"].as_str()), (404, Some("session_not_found")), "{missing}");
    let (code, missing) = bob.get("/sessions/sess_a/messages").await;
    assert_eq!((code, missing["code"].as_str()), (404, Some("session_not_found")), "{missing}");

    // Restore seeds a session; a second restore replaces the seed.
    let seed = json!({ "messages": [
        { "role": "user", "content": "earlier question", "timestamp": "2025-01-01T00:00:00Z" },
        { "role": "assistant", "content": "earlier answer", "timestamp": 1735689601 },
    ]});
    let (code, body) = bob.post("/sessions/sess_old/restore", seed.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (body["data"]["messages_loaded"].as_u64(), body["data"]["messages_dropped"].as_u64()),
        (Some(2), Some(0))
    );
    bob.post("/sessions/sess_old/restore", seed).await;
    let (_, body) = bob.get("/sessions/sess_old/messages").await;
    let contents: Vec<&str> =
        body["data"]["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(contents, ["earlier question", "earlier answer"]);
    assert_eq!(body["data"]["messages"][1]["timestamp"], "2025-01-01T00:00:01.000Z");
    let (code, _) = alice.get("/sessions/sess_old").await;
    assert_eq!(code, 404, "a restored session belongs to its user");

    // Paging back through the messages.
    let (_, page) = alice.get("/sessions/sess_a/messages?limit=3").await;
    let contents: Vec<&str> =
        page["data"]["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!((contents, page["data"]["has_more"].as_bool()), (vec!["echo: one", "two", "echo: two"], Some(true)));
    let first = page["data"]["messages"][0]["timestamp"].as_str().unwrap();
    let (code, earlier) = alice.get(&format!("/sessions/sess_a/messages?before={first}")).await;
    assert_eq!(code, 200, "{earlier}");
    assert_eq!(earlier["data"]["messages"][0]["content"], "one");
    assert_eq!(earlier["data"]["has_more"], false);

    // A session with work in flight is active.
    let (code, body, _) = alice.chat(json!({ "message": "steps:10", "session_id": "sess_busy", "async": true })).await;
    assert_eq!(code, 202, "{body}");
    let (_, active) = alice.get("/sessions?active_only=true").await;
    let ids: Vec<&str> =
        active["data"]["sessions"].as_array().unwrap().iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sess_busy"], "{active}");
    assert_eq!(active["data"]["sessions"][0]["active"], true);
    alice.cancel(&request_id(&body)).await;
}

#[tokio::test]
async fn session_routes_reject_bad_input_with_codes() {
    let fx = fixture("");
    let server = fx.start();
    let alice = server.caller("f", "alice");
    for query in ["?limit=0", "?limit=-3", "?limit=many", "?limit=99999999999999999999999999"] {
        let (code, body) = alice.get(&format!("/sessions{query}")).await;
        assert_eq!((code, body["code"].as_str()), (400, Some("invalid_request")), "{query}: {body}");
    }
    let cases = [
        (json!({}), "`messages` is required"),
        (json!({ "messages": [{ "role": "wizard", "content": "x" }] }), "role"),
        (json!({ "messages": [{ "role": "user" }] }), "content"),
        (json!({ "messages": [{ "role": "user", "content": "x", "timestamp": "soon" }] }), "timestamp"),
        (json!({ "messages": "nope" }), "messages"),
        (json!({ "messages": [{ "role": "user", "content": "  " }] }), "must not be empty"),
    ];
    for (body, words) in cases {
        let (code, answer) = alice.post("/sessions/s1/restore", body.clone()).await;
        assert_eq!((code, answer["code"].as_str()), (400, Some("invalid_request")), "{body}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(words), "{body}: {answer}");
    }
    // Beyond 1000 messages the oldest are dropped, and counted.
    let many: Vec<Value> =
        (0..1001).map(|i| json!({ "role": "user", "content": i.to_string(), "timestamp": i })).collect();
    let (code, answer) = alice.post("/sessions/s1/restore", json!({ "messages": many })).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        (answer["data"]["messages_loaded"].as_u64(), answer["data"]["messages_dropped"].as_u64()),
        (Some(1000), Some(1))
    );
    let (_, kept) = alice.get("/sessions/s1/messages?limit=1000").await;
    assert_eq!(kept["data"]["messages"][0]["content"], "1", "the oldest was dropped");
    for query in ["?before=yesterday", "?limit=0"] {
        let (code, answer) = alice.get(&format!("/sessions/s1/messages{query}")).await;
        assert_eq!((code, answer["code"].as_str()), (400, Some("invalid_request")), "{query}: {answer}");
    }
    let (code, answer) = alice.get("/sessions?active_only=maybe").await;
    assert_eq!((code, answer["code"].as_str()), (400, Some("invalid_request")), "{answer}");
    let long = "s".repeat(300);
    let (code, answer) = alice.get(&format!("/sessions/{long}")).await;
    assert_eq!((code, answer["code"].as_str()), (400, Some("invalid_request")), "{answer}");
    // Without a key.
    let response = server.get("/api/f/v1/sessions").send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn agents_and_config_need_the_admin_key_and_never_show_secrets() {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let yaml = r#"schema: "1.0.0"
id: f
description: secrets test
server:
  api_keys:
    admin_key: admin-f
    client_key: ${{ secrets.SESSIONS_TEST_CLIENT }}
llm:
  api_keys:
    openai: ${{ secrets.SESSIONS_TEST_LLM }}
async:
  webhook_secret: ${{ secrets.SESSIONS_TEST_HOOK }}
agents:
  - id: echo
    name: Echo
    description: Echoes
    command: ["python3", "agent.py", "--token=${{ secrets.SESSIONS_TEST_ARG }}"]
  - id: remote
    url: https://example.com/run?key=${{ secrets.SESSIONS_TEST_ARG }}
"#;
    fx.write("f/formation.afs", yaml);
    let secrets = [
        ("SESSIONS_TEST_CLIENT", "client-secret-value-1"),
        ("SESSIONS_TEST_LLM", "sk-llm-secret-value-2"),
        ("SESSIONS_TEST_HOOK", "hook-secret-value-3"),
        ("SESSIONS_TEST_ARG", "arg-secret-value-4"),
    ];
    let server = Server::start(&fx, &[], &secrets);
    let client = reqwest::Client::new();
    let as_client = |path: &str| {
        client.get(server.url(&format!("/api/f/v1{path}"))).header("X-Muxi-Client-Key", "client-secret-value-1")
    };
    for path in ["/agents", "/agents/echo", "/config"] {
        let (code, body) = json(as_client(path).send().await.unwrap()).await;
        assert_eq!((code, body["code"].as_str()), (401, Some("missing_api_key")), "{path}: {body}");
    }

    let (code, agents) = server.admin_get("f", "/agents").await;
    assert_eq!(code, 200, "{agents}");
    let ids: Vec<&str> =
        agents["data"]["agents"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["echo", "remote"]);
    assert_eq!(agents["data"]["agents"][0]["type"], "command");
    let (code, echo) = server.admin_get("f", "/agents/echo").await;
    assert_eq!((code, echo["data"]["name"].as_str()), (200, Some("Echo")), "{echo}");
    // A value taken from a secret is shown as its placeholder, as the runtime does.
    let argv = echo["data"]["settings"]["argv"].as_array().unwrap();
    assert_eq!(argv.last().unwrap(), "--token=${{ secrets.SESSIONS_TEST_ARG }}", "{echo}");
    let (code, missing) = server.admin_get("f", "/agents/nobody").await;
    assert_eq!((code, missing["code"].as_str()), (404, Some("agent_not_found")), "{missing}");
    assert!(missing["message"].as_str().unwrap().contains("echo, remote"), "{missing}");

    let (code, config) = server.admin_get("f", "/config").await;
    assert_eq!(code, 200, "{config}");
    let data = &config["data"];
    // Defaults filled in.
    assert_eq!(data["async"]["threshold_seconds"], 30.0);
    assert_eq!(data["overlord"]["workflow"]["retry"]["max_attempts"], 3);
    assert_eq!(data["overlord"]["workflow"]["timeouts"]["task_timeout"], 300.0);
    assert_eq!(data["server"]["api_keys"]["client_key"], "***");
    assert_eq!(data["async"]["webhook_secret"], "***");
    assert_eq!(data["llm"]["api_keys"]["openai"], "***");
    let text = format!("{agents}{echo}{config}");
    for (_, secret) in secrets {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    assert!(!text.contains("admin-f"), "admin key shown: {text}");
    assert!(!server.stderr().contains("secret-value"), "a secret was logged");
}

#[tokio::test]
async fn the_only_formation_is_also_served_at_the_root() {
    let fx = fixture("");
    let server = fx.start();
    let (code, health) = json(server.get("/v1/health").send().await.unwrap()).await;
    assert_eq!((code, health["data"]["formation_id"].as_str()), (200, Some("f")), "{health}");
    let (name, key) = client_key("f");
    let response = server
        .post("/v1/chat")
        .header(name, &key)
        .header("X-Muxi-User-ID", "alice")
        .json(&json!({ "message": "at the root", "async": false }))
        .send()
        .await
        .unwrap();
    let (code, body) = json(response).await;
    assert_eq!(code, 200, "{body}");
    let id = request_id(&body);
    let listed = server.caller("f", "alice").list("").await;
    assert!(listed.iter().any(|r| r["request_id"] == id.as_str()), "{listed:?}");
    let (code, body) = json(
        server.get("/v1/requests?limit=1").header(name, &key).header("X-Muxi-User-ID", "alice").send().await.unwrap(),
    )
    .await;
    assert_eq!((code, body["data"]["count"].as_u64()), (200, Some(1)), "{body}");
    let (code, body) = json(server.get("/v1/nothing-here").send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("not_found")), "{body}");
}

#[tokio::test]
async fn with_several_formations_the_root_needs_a_default() {
    let fx = fixture("");
    fx.write("g/formation.afs", &formation_yaml("g", ""));
    let server = fx.start();
    let (code, body) = json(server.get("/v1/health").send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("formation_not_found")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("--default-formation"), "{body}");
    drop(server);

    let server = Server::start(&fx, &["--default-formation", "g"], &[]);
    let (code, body) = json(server.get("/v1/health").send().await.unwrap()).await;
    assert_eq!((code, body["data"]["formation_id"].as_str()), (200, Some("g")), "{body}");
}

#[tokio::test]
async fn events_stream_a_users_lifecycle_and_resume_after_last_event_id() {
    let fx = fixture("");
    let server = fx.start();
    let alice = server.caller("f", "alice");
    let bob = server.caller("f", "bob");
    let mut events = alice.sse("/events", &[]).await;
    // Bob's work must not show up in Alice's stream.
    let (code, body, _) = bob.chat(json!({ "message": "steps:2", "async": true })).await;
    assert_eq!(code, 202, "{body}");
    let bobs = request_id(&body);
    let (code, body, _) = alice.chat(json!({ "message": "steps:3", "async": true })).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);

    let frames = events
        .until(Duration::from_secs(30), |f| {
            f.event.as_deref() == Some("request.completed") && f.json()["request_id"] == id.as_str()
        })
        .await;
    assert!(frames.iter().all(|f| f.json()["request_id"] != bobs.as_str()), "{frames:#?}");
    assert!(frames.iter().all(|f| f.json()["user_id"] == "alice"), "{frames:#?}");
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_deref().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"request.accepted"), "{kinds:?}");
    assert!(kinds.contains(&"request.progress"), "{kinds:?}");
    let last = frames.last().unwrap().json();
    assert_eq!(last["result"]["text"], "echo: steps:3");
    assert_eq!(last["status"], "completed");
    for frame in &frames {
        let data = frame.json();
        assert_eq!(frame.id.as_deref(), data["event_id"].as_str(), "{frame:?}");
    }
    let accepted = frames[0].id.clone().unwrap();
    let completed = frames.last().unwrap().id.clone().unwrap();
    drop(events);

    // Meanwhile (nobody listening) another request of Alice's ends.
    let (_, body, _) = alice.chat(json!({ "message": "while away", "async": false })).await;
    let away = request_id(&body);

    // Reconnect after the acceptance: the end of the first request and both
    // events of the second are replayed, in order, nothing earlier.
    let mut resumed = alice.sse("/events", &[("Last-Event-ID", &accepted)]).await;
    let frames = resumed
        .until(Duration::from_secs(30), |f| {
            f.event.as_deref() == Some("request.completed") && f.json()["request_id"] == away.as_str()
        })
        .await;
    let seen: Vec<(String, String)> = frames
        .iter()
        .map(|f| (f.event.clone().unwrap(), f.json()["request_id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        seen,
        [
            ("request.completed".to_string(), id.clone()),
            ("request.accepted".to_string(), away.clone()),
            ("request.completed".to_string(), away.clone()),
        ]
    );
    assert_eq!(frames[0].id.as_deref(), Some(completed.as_str()), "replayed ids equal the live ones");
    assert_eq!(frames[1].json()["status"], "pending", "an acceptance shows the request as accepted");

    // The query parameter works too; a malformed id is refused with a code.
    // Events of the seconds before the id come again (at least once), never the
    // id itself.
    let mut by_query = alice.sse(&format!("/events?last_event_id={completed}"), &[]).await;
    let frames = by_query
        .until(Duration::from_secs(10), |f| {
            f.event.as_deref() == Some("request.completed") && f.json()["request_id"] == away.as_str()
        })
        .await;
    let ids: Vec<&str> = frames.iter().map(|f| f.id.as_deref().unwrap()).collect();
    assert!(!ids.contains(&completed.as_str()), "{ids:?}");
    assert_eq!(ids.first(), Some(&accepted.as_str()), "the acceptance of a moment before comes again: {ids:?}");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "replayed in id order");
    let (code, body) =
        json(alice.request(reqwest::Method::GET, "/events").header("Last-Event-ID", "yesterday").send().await.unwrap())
            .await;
    assert_eq!((code, body["code"].as_str()), (400, Some("invalid_last_event_id")), "{body}");
}

#[tokio::test]
async fn a_session_s_event_stream_shows_only_that_session() {
    let fx = fixture("");
    let server = fx.start();
    let alice = server.caller("f", "alice");
    let mut events = alice.sse("/events/sess_watched", &[]).await;
    let (_, other, _) = alice.chat(json!({ "message": "elsewhere", "session_id": "sess_other", "async": true })).await;
    let (_, body, _) = alice.chat(json!({ "message": "here", "session_id": "sess_watched", "async": true })).await;
    let (other, id) = (request_id(&other), request_id(&body));
    let frames = events
        .until(Duration::from_secs(30), |f| {
            f.event.as_deref() == Some("request.completed") && f.json()["request_id"] == id.as_str()
        })
        .await;
    assert!(frames.iter().all(|f| f.json()["session_id"] == "sess_watched"), "{frames:#?}");
    assert!(frames.iter().all(|f| f.json()["request_id"] != other.as_str()), "{frames:#?}");
}

#[tokio::test]
async fn agents_see_a_restored_session_s_messages_as_history() {
    let fx = fixture("");
    let server = fx.start();
    let alice = server.caller("f", "alice");
    let seed = json!({ "messages": [
        { "role": "user", "content": "my name is Ada" },
        { "role": "assistant", "content": "hello Ada" },
    ]});
    let (code, body) = alice.post("/sessions/sess_back/restore", seed).await;
    assert_eq!(code, 200, "{body}");
    say(&alice, "sess_back", "and now?").await;
    let (code, body, _) = alice.chat(json!({ "message": "history?", "session_id": "sess_back", "async": false })).await;
    assert_eq!(code, 200, "{body}");
    let history: Value = serde_json::from_str(body["data"]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        history,
        json!([
            { "role": "user", "content": "my name is Ada" },
            { "role": "assistant", "content": "hello Ada" },
            { "role": "user", "content": "and now?" },
            { "role": "assistant", "content": "echo: and now?" },
        ])
    );
    // Another user's session of the same name lends nothing.
    let (_, body, _) = server
        .caller("f", "bob")
        .chat(json!({ "message": "history?", "session_id": "sess_back", "async": false }))
        .await;
    assert_eq!(body["data"]["message"]["content"], "[]", "{body}");
}
