//! Issue 12: the command-line client (`muxi-rt chat|requests|trigger`) run as a
//! real process against a real server: plain lines and `--json` without a
//! terminal, a live progress bar and Ctrl-C handling under a real pty.

mod common;

use std::time::Duration;

use common::pty::Pty;
use common::*;
use serde_json::Value;

/// `echo` answers at once; `slow` (6) and `slower` (15) work STEPS steps of
/// 0.4 s with progress; `broken` fails.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, os, sys, time
req = json.load(sys.stdin)
kind = os.environ.get("KIND", "echo")
if kind == "broken":
    sys.stderr.write("it broke\n")
    sys.exit(3)
if kind == "slow":
    n = int(os.environ.get("STEPS", "6"))
    for i in range(n):
        print(json.dumps({"progress": int(100 * (i + 1) / (n + 1)), "step": f"Step {i + 1} of {n}"}), flush=True)
        time.sleep(0.4)
print(json.dumps({"result": "done: " + req["message"], "artifacts": [{"name": "notes.txt"}]}), flush=True)
"#;

fn fixture(keys: bool) -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let agents = r#"async:
  threshold_seconds: 1
agents:
  - id: echo
    default: true
    estimated_seconds: 0.1
    command: ["python3", "agent.py"]
  - id: slow
    estimated_seconds: 20
    command: ["python3", "agent.py"]
    env: {KIND: slow, STEPS: "6"}
  - id: slower
    estimated_seconds: 20
    command: ["python3", "agent.py"]
    env: {KIND: slow, STEPS: "15"}
  - id: broken
    estimated_seconds: 0.1
    command: ["python3", "agent.py"]
    env: {KIND: broken}
"#;
    let yaml = formation_yaml("f", agents);
    let yaml = if keys {
        yaml
    } else {
        yaml.replace("server:\n  api_keys:\n    admin_key: admin-f\n    client_key: client-f\n", "")
    };
    fx.write("f/formation.afs", &yaml);
    fx
}

/// Client options for `server` as `alice` with the formation's key.
fn env(server: &Server) -> Vec<(&'static str, String)> {
    vec![("MUXI_URL", server.base.clone()), ("MUXI_CLIENT_KEY", "client-f".into()), ("MUXI_USER_ID", "alice".into())]
}

async fn client(server: &Server, args: &[&str]) -> (i32, String, String) {
    let env = env(server);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_client(args, &env).await
}

#[tokio::test]
async fn without_a_terminal_output_is_plain_and_json_parses() {
    let fx = fixture(true);
    let server = fx.start();

    let (code, out, err) = client(&server, &["chat", "f", "hello"]).await;
    assert_eq!((code, out.as_str()), (0, "done: hello\n"), "stderr: {err}");

    // Long work: progress as plain lines on stderr, the result on stdout.
    let (code, out, err) = client(&server, &["chat", "f", "long one", "--agent", "slow"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out, "done: long one\n", "stderr: {err}");
    let percents: Vec<u64> = err
        .lines()
        .filter_map(|l| l.strip_prefix("progress"))
        .map(|l| l.trim().split('%').next().unwrap().trim().parse().unwrap())
        .collect();
    assert!(percents.len() >= 3, "progress lines: {err}");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]) && percents.last() > percents.first(), "{percents:?}");
    assert!(err.contains("Step 6 of 6"), "{err}");
    assert!(err.contains("artifacts: notes.txt"), "{err}");
    assert!(!err.contains('\u{1b}') && !out.contains('\u{1b}'), "no escape codes without a terminal: {err}");

    // --json: one document per command.
    let (code, out, _) = client(&server, &["chat", "f", "as json", "--json"]).await;
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(&out).expect("chat --json is JSON");
    assert_eq!(doc["message"]["content"], "done: as json");
    let (code, out, _) = client(&server, &["chat", "f", "background", "--agent", "slow", "--async", "--json"]).await;
    assert_eq!(code, 0);
    let accepted: Value = serde_json::from_str(&out).expect("accepted --json is JSON");
    let id = accepted["request_id"].as_str().unwrap().to_string();
    let (code, out, _) = client(&server, &["requests", "list", "f", "--json", "--limit", "10"]).await;
    assert_eq!(code, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).expect("list --json is JSON");
    assert!(listed.iter().any(|r| r["request_id"] == id.as_str()), "{out}");
    assert!(listed.iter().all(|r| r["user_id"] == "alice"), "{out}");
    let (code, out, err) = client(&server, &["requests", "follow", "f", &id, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let followed: Value = serde_json::from_str(&out).expect("follow --json is JSON");
    assert_eq!(
        (followed["status"].as_str(), followed["result"]["text"].as_str()),
        (Some("completed"), Some("done: background"))
    );

    // Human list and show.
    let (code, out, _) = client(&server, &["requests", "list", "f"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("REQUEST") && out.contains(&id), "{out}");
    let (code, out, _) = client(&server, &["requests", "show", "f", &id]).await;
    assert_eq!(code, 0);
    assert!(out.contains("completed") && out.contains("done: background"), "{out}");
}

#[tokio::test]
async fn failures_and_cancels_give_non_zero_exits_with_readable_errors() {
    let fx = fixture(true);
    let server = fx.start();
    let (code, out, err) = client(&server, &["chat", "f", "x", "--agent", "broken"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("it broke"), "{err}");

    let (code, out, _) = client(&server, &["chat", "f", "to cancel", "--agent", "slow", "--async"]).await;
    assert_eq!(code, 0);
    let id = out.trim().to_string();
    assert!(id.starts_with("req_"), "{out}");
    let (code, out, err) = client(&server, &["requests", "cancel", "f", &id]).await;
    assert_eq!((code, out.trim()), (0, format!("Cancelled {id}.").as_str()), "{err}");
    let (code, out, _) = client(&server, &["requests", "show", "f", &id]).await;
    assert_eq!(code, 1, "a cancelled request shows with exit 1: {out}");
    let (code, _, err) = client(&server, &["requests", "cancel", "f", &id]).await;
    assert_eq!(code, 2);
    assert!(err.contains("request_already_finished"), "{err}");

    // Bad input: clear errors, exit 2, never a panic.
    let cases: [(&[&str], &str); 6] = [
        (&["chat", "no-such", "hi"], "formation_not_found"),
        (&["chat", "f", "hi", "--agent", "nobody"], "unknown_agent"),
        (&["requests", "show", "f", "../etc"], "not a request id"),
        (&["requests", "show", "f", "req_missing"], "request_not_found"),
        (&["trigger", "f", "t", "--data", "[1"], "not valid JSON"),
        (&["chat", "f", "hi", "--server", "ftp://x"], "http(s) URL"),
    ];
    for (args, words) in cases {
        let (code, _, err) = client(&server, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(words) && !err.contains("panicked"), "{args:?}: {err}");
    }
    let (code, _, err) = client(&server, &["requests", "list", "f", "--limit", "100000"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_client(&["chat", "f", "hi", "--server", "https://muxi.example.com"], &[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no client key") && err.contains("MUXI_CLIENT_KEY"), "{err}");
    let (code, _, err) = run_client(&["chat", "f", "hi", "--server", "http://127.0.0.1:9", "--key", "k"], &[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach muxi-rt"), "{err}");
}

#[tokio::test]
async fn a_local_server_s_generated_key_is_found_in_its_data_folder() {
    let fx = fixture(false);
    let server = fx.start();
    let data = fx.data.to_str().unwrap();
    let (code, out, err) = run_client(&["chat", "f", "hi", "--server", &server.base, "--data-dir", data], &[]).await;
    assert_eq!((code, out.as_str()), (0, "done: hi\n"), "{err}");
    assert!(!out.contains("fmc_") && !err.contains("fmc_"), "the client never prints the key: {err}");
}

#[tokio::test]
async fn in_a_terminal_the_bar_advances_and_ctrl_c_can_leave_the_request_running() {
    let fx = fixture(true);
    let server = fx.start();
    let env = env(&server);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut pty = Pty::spawn(&["chat", "f", "under a pty", "--agent", "slower"], &env);

    // The bar is drawn and its percentage grows while the agent works.
    let first = pty.wait_for(Duration::from_secs(30), "a progress bar", |out| bar_percents(out).iter().any(|p| *p > 0));
    let start = *bar_percents(&first).iter().find(|p| **p > 0).unwrap();
    let later =
        pty.wait_for(Duration::from_secs(30), "the bar to advance", |out| bar_percents(out).iter().any(|p| *p > start));
    assert!(later.contains("Step "), "the current step is shown: {later}");
    assert!(later.contains("[00:00:0"), "the elapsed time is shown: {later}");

    // Ctrl-C asks; "l" leaves it running and says how to follow it.
    pty.type_bytes(&[3]);
    pty.wait_for(Duration::from_secs(10), "the prompt", |out| out.contains("[c]ancel the request"));
    pty.type_bytes(b"l\n");
    let out = pty.wait_for(Duration::from_secs(10), "the id", |out| out.contains("Follow it with:"));
    assert_eq!(pty.wait(Duration::from_secs(10)), Some(0), "{out}");
    let id = out
        .split("Left running in the background: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no id in {out}"))
        .to_string();
    assert!(out.contains(&format!("muxi-rt requests follow f {id}")), "{out}");
    let finished = server.caller("f", "alice").finished(&id).await;
    assert_eq!(finished["status"], "completed", "the request went on after the client left: {finished}");
    assert_eq!(finished["result"]["text"], "done: under a pty");
}

#[tokio::test]
async fn in_a_terminal_ctrl_c_can_cancel_the_request() {
    let fx = fixture(true);
    let server = fx.start();
    let env = env(&server);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_, body, _) = server
        .caller("f", "alice")
        .chat(serde_json::json!({ "message": "cancel me", "agent_id": "slower", "async": true }))
        .await;
    let id = request_id(&body);
    let mut pty = Pty::spawn(&["requests", "follow", "f", &id], &env);
    pty.wait_for(Duration::from_secs(30), "a progress bar", |out| out.contains('%'));
    pty.type_bytes(&[3]);
    pty.wait_for(Duration::from_secs(10), "the prompt", |out| out.contains("[c]ancel the request"));
    pty.type_bytes(b"c\n");
    assert_eq!(pty.wait(Duration::from_secs(10)), Some(1), "{}", pty.output());
    assert!(pty.output().contains(&format!("Cancelled {id}.")), "{}", pty.output());
    assert_eq!(server.caller("f", "alice").data(&id).await["status"], "cancelled");
}

/// The percentages the bar showed (`NN%` after the bar's closing bracket).
fn bar_percents(out: &str) -> Vec<u64> {
    out.match_indices('%')
        .filter_map(|(i, _)| {
            let digits: String =
                out[..i].chars().rev().take_while(|c| c.is_ascii_digit()).collect::<String>().chars().rev().collect();
            digits.parse().ok()
        })
        .collect()
}

#[tokio::test]
async fn triggers_fire_in_the_background_or_are_followed_with_wait() {
    let fx = fixture(true);
    fx.write("f/triggers/greet.md", "---\nagent: slow\n---\nGreet ${{ data.name }}\n");
    let server = fx.start();
    let (code, out, err) = client(&server, &["trigger", "f", "greet", "--data", r#"{"name": "Ada"}"#]).await;
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    assert!(id.starts_with("req_") && err.contains("muxi-rt requests follow f"), "{out}\n{err}");
    let (code, out, err) = client(&server, &["trigger", "f", "greet", "--data", r#"{"name": "Bob"}"#, "--wait"]).await;
    assert_eq!((code, out.trim()), (0, "done: Greet Bob"), "{err}");
    let finished = server.caller("f", "alice").finished(&id).await;
    assert_eq!(finished["result"]["text"], "done: Greet Ada");
    let (code, _, err) = client(&server, &["trigger", "f", "greet", "--data", "{}"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("missing_trigger_data"), "{err}");
}
