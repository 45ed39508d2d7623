//! Every accepted request reaches exactly one end: faults caused for real
//! against the real binary (clients that vanish, a full disk, a formation that
//! does not load, a second server on the same folder).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const AGENT: &str = r#"#!/usr/bin/env python3
import json, sys, time
req = json.load(sys.stdin)
msg = req["message"]
if msg.startswith("sleep:"):
    time.sleep(float(msg[6:]))
if msg == "rate-limited" and req["attempt"] == 1:
    sys.exit(75)
print(json.dumps({"result": "done: " + msg[:40]}), flush=True)
"#;

fn fixture(extra: &str) -> Fixture {
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    let agents = "agents:\n  - id: worker\n    estimated_seconds: 0.2\n    command: [\"python3\", \"agent.py\"]\n    retryable_exit_codes: [75]\n  - id: echo\n    command: [\"echo\", \"{\\\"result\\\": \\\"ok\\\"}\"]\n";
    fx.write("f/formation.afs", &formation_yaml("f", &format!("{extra}{agents}")));
    fx
}

/// A POST written in full on a raw socket, which is then closed at once.
fn post_and_vanish(server: &Server, body: &str, idempotency_key: &str) {
    let addr = server.base.trim_start_matches("http://");
    let mut socket = TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST /api/f/v1/chat HTTP/1.1\r\nHost: {addr}\r\nX-Muxi-Client-Key: client-f\r\nX-Muxi-User-ID: u1\r\n\
         X-Muxi-Idempotency-Key: {idempotency_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).unwrap();
    drop(socket);
}

#[tokio::test]
async fn requests_of_clients_that_vanish_right_after_sending_all_run() {
    let fx = fixture("async:\n  mode: async\n");
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let n = 40;
    for i in 0..n {
        post_and_vanish(&server, &json!({ "message": format!("job {i}") }).to_string(), &format!("key-{i}"));
    }
    // A request the server read before the client left may or may not have
    // been accepted; each one that was committed runs to its end, without a
    // restart and without anyone asking again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed = caller.list("?limit=500").await;
    for request in &committed {
        let id = request["request_id"].as_str().or(request["id"].as_str()).unwrap().to_string();
        assert_eq!(caller.finished(&id).await["status"], "completed");
    }
    // A retry with the same key gets the same request (or makes it, if the
    // first never got in), and it ends.
    for i in 0..n {
        let response = caller
            .request(reqwest::Method::POST, "/chat")
            .header("X-Muxi-Idempotency-Key", format!("key-{i}"))
            .json(&json!({ "message": format!("job {i}") }))
            .send()
            .await
            .unwrap();
        let (code, body) = json(response).await;
        assert!(code == 202 || code == 200, "{code}: {body}");
        let data = caller.finished(&request_id(&body)).await;
        assert_eq!(data["status"], "completed", "{data}");
    }
    let all = caller.list("?limit=500").await;
    assert_eq!(all.len(), n, "one request per key");
}

#[tokio::test]
async fn a_replay_with_the_same_key_and_another_body_is_refused() {
    let fx = fixture("async:\n  mode: async\n");
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let send = |message: &str| {
        caller
            .request(reqwest::Method::POST, "/chat")
            .header("X-Muxi-Idempotency-Key", "k1")
            .json(&json!({ "message": message }))
            .send()
    };
    let (code, first) = json(send("first").await.unwrap()).await;
    assert_eq!(code, 202, "{first}");
    let (code, again) = json(send("first").await.unwrap()).await;
    assert_eq!(code, 202, "{again}");
    assert_eq!(request_id(&again), request_id(&first));
    let (code, other) = json(send("second").await.unwrap()).await;
    assert_eq!(code, 409, "{other}");
    assert_eq!(other["code"], "idempotency_key_reused");
    assert_eq!(other["error"]["details"]["request_id"], request_id(&first).as_str());
    assert_eq!(caller.list("").await.len(), 1, "nothing new stored");
    // What was asked is kept (as a digest) only where a key may be reused.
    let (code, body, _) = caller.chat(json!({ "message": "no key" })).await;
    assert_eq!(code, 202, "{body}");
    let db = rusqlite::Connection::open_with_flags(fx.data.join("muxi.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the store read-only");
    let fingerprint = |id: String| -> Option<String> {
        db.query_row("SELECT fingerprint FROM requests WHERE id = ?1", [id], |row| row.get(0)).expect("the row")
    };
    assert!(fingerprint(request_id(&first)).is_some_and(|f| f.len() == 32), "the keyed request's digest");
    assert_eq!(fingerprint(request_id(&body)), None, "no digest without a key");
}

#[tokio::test]
async fn unfinished_requests_wait_for_their_formation_to_load() {
    let fx = fixture("async:\n  mode: async\n");
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let (code, body, _) = caller.chat(json!({ "message": "sleep:4" })).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    eventually(Duration::from_secs(30), "the attempt to start", || async {
        (caller.data(&id).await["status"] == "processing").then_some(())
    })
    .await;
    server.kill();

    // At the next start the formation does not load (a secret is missing).
    let broken = formation_yaml(
        "f",
        "async:\n  mode: async\nllm:\n  api_keys:\n    openai: ${{ secrets.NOT_SET_YET }}\nagents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n",
    );
    fx.write("f/formation.afs", &broken);
    let server = fx.start();
    let health = || async { json(server.get("/health").send().await.unwrap()).await.1 };
    assert!(health().await["data"]["formations"].as_array().unwrap().is_empty(), "f is not served");
    // The request waits, and says why, in the store.
    let data_dir = fx.data.clone();
    let note = eventually(Duration::from_secs(30), "the waiting note", || {
        let data_dir = data_dir.clone();
        let id = id.clone();
        async move { stored_field(&data_dir, &id, "status_message").filter(|m| m.contains("waiting for formation")) }
    })
    .await;
    assert!(note.contains("`f`"), "{note}");
    assert_eq!(stored_field(&fx.data, &id, "status").as_deref(), Some("processing"));

    // The formation is fixed: the request runs again and ends.
    fx.write(
        "f/formation.afs",
        &formation_yaml(
            "f",
            "async:\n  mode: async\nagents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n",
        ),
    );
    let caller = server.caller("f", "u1");
    eventually(Duration::from_secs(30), "f served again", || async {
        (caller.status(&id).await.0 == 200).then_some(())
    })
    .await;
    let data = caller.finished(&id).await;
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["attempts"], 2, "at-least-once: the interrupted attempt counts");
}

/// A column of a stored request, read straight from the database file.
fn stored_field(data_dir: &Path, id: &str, column: &str) -> Option<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3,sys; c=sqlite3.connect('file:{}?mode=ro', uri=True); \
             r=c.execute('SELECT {column} FROM requests WHERE id=?', (sys.argv[1],)).fetchone(); \
             print(r[0] if r and r[0] is not None else '')",
            data_dir.join("muxi.db").display()
        ))
        .arg(id)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!text.is_empty()).then_some(text)
}

#[tokio::test]
async fn a_second_server_on_the_same_data_folder_is_refused() {
    let fx = fixture("");
    let _first = fx.start();
    let out = Command::new(BIN)
        .args(["serve", fx.formations.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&fx.data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another muxi-rt"), "{stderr}");
}

/// A tmpfs of `size` mounted on a fresh folder; unmounted on drop.
struct Tmpfs {
    _root: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("disk");
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs { _root: root, path }
    }

    /// Fills the disk; returns the filler's path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_shows_in_health_then_recovers() {
    let mut fx = fixture("async:\n  mode: async\n");
    let disk = Tmpfs::mount("16m");
    fx.data = disk.path.join("data");
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let (code, body, _) = caller.chat(json!({ "message": "before" })).await;
    assert_eq!(code, 202, "{body}");

    let filler = disk.fill();
    // A large message needs pages the database does not have yet.
    let big = "x".repeat(700 * 1024);
    let (code, body, headers) = caller.chat(json!({ "message": big })).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["code"], "storage_unavailable");
    assert!(headers.contains_key("retry-after"));
    let (_, health) = json(server.get("/health").send().await.unwrap()).await;
    assert_eq!(health["data"]["store"]["writable"], false, "{health}");
    assert_eq!(health["data"]["status"], "degraded");

    // Space comes back: writes work again and health says so.
    std::fs::remove_file(filler).unwrap();
    let (code, body, _) = caller.chat(json!({ "message": big })).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    assert_eq!(caller.finished(&id).await["status"], "completed");
    let (_, health) = json(server.get("/health").send().await.unwrap()).await;
    assert_eq!(health["data"]["store"]["writable"], true, "{health}");
    drop(server);
}

#[tokio::test]
async fn a_read_only_data_folder_is_refused_at_start() {
    let mut fx = fixture("");
    let disk = Tmpfs::mount("4m");
    fx.data = disk.path.join("data");
    let data = fx.data.clone();
    fx.start().terminate();
    let status = Command::new("mount").args(["-o", "remount,ro"]).arg(&disk.path).status().unwrap();
    assert!(status.success());
    let out = Command::new(BIN)
        .args(["serve", fx.formations.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a server that cannot write must not start");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("not writable") || stderr.contains("read-only"), "{stderr}");
}

#[tokio::test]
async fn a_request_whose_attempts_all_died_with_the_server_fails_instead_of_running_again() {
    let settings = "async:\n  mode: async\noverlord:\n  workflow:\n    retry: {max_attempts: 1}\n";
    let fx = fixture(settings);
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let (_, body, _) = caller.chat(json!({ "message": "sleep:60" })).await;
    let id = request_id(&body);
    eventually(Duration::from_secs(30), "the attempt to start", || async {
        (caller.data(&id).await["status"] == "processing").then_some(())
    })
    .await;
    server.kill();

    let server = fx.start();
    let data = server.caller("f", "u1").finished(&id).await;
    assert_eq!(data["status"], "failed", "{data}");
    assert_eq!(data["error"]["type"], "interrupted", "{data}");
    assert_eq!(data["attempts"], 1, "not run a second time: {data}");
}

#[tokio::test]
async fn a_retry_waiting_out_its_backoff_gives_its_slot_to_the_next_request() {
    let settings = "async:\n  mode: async\noverlord:\n  max_concurrent_requests: 1\n  workflow:\n    \
                    retry: {max_attempts: 2, initial_delay: 30, max_delay: 30, backoff_factor: 1}\n";
    let fx = fixture(settings);
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let (_, body, _) = caller.chat(json!({ "message": "rate-limited" })).await;
    let waiting = request_id(&body);
    eventually(Duration::from_secs(30), "the first attempt to fail", || async {
        (caller.data(&waiting).await["attempts"] == 1).then_some(())
    })
    .await;
    // The only slot is free while the first request waits 15-30 s to retry.
    let (_, body, _) = caller.chat(json!({ "message": "next" })).await;
    let next = caller.finished(&request_id(&body)).await;
    assert_eq!(next["status"], "completed", "{next}");
    let first = caller.data(&waiting).await;
    assert_eq!(first["status"], "processing", "still waiting to retry: {first}");
}

#[tokio::test]
async fn each_webhook_is_delivered_once_under_load() {
    let rx = common::receiver::Receiver::start().await;
    let fx = fixture("async:\n  mode: async\noverlord:\n  max_concurrent_requests: 32\n");
    let server = Server::start(&fx, &["--allow-webhook-host", "127.0.0.1"], &[]);
    let hook = rx.url("/hook");
    let n = 300;
    let sends = (0..n).map(|i| {
        let caller = server.caller("f", "u1");
        let hook = hook.clone();
        async move {
            let body = json!({ "message": format!("job {i}"), "agent_id": "echo", "webhook_url": hook });
            let (code, body, _) = caller.chat(body).await;
            assert_eq!(code, 202, "{body}");
            request_id(&body)
        }
    });
    let ids: Vec<String> = futures::future::join_all(sends).await;
    rx.wait_for("/hook", n, Duration::from_secs(90)).await;
    // Give a second delivery of any of them time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_request = std::collections::HashMap::<String, usize>::new();
    for hit in rx.hits("/hook") {
        *per_request.entry(hit.json()["request_id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(per_request.len(), n);
    assert!(ids.iter().all(|id| per_request[id] == 1), "delivered more than once: {:?}", {
        per_request.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    });
}

/// An agent that reads its request, then reports progress six times, further
/// apart than the engine's writes of progress (each report is written).
const STEPS: &str = r#"#!/usr/bin/env python3
import json, sys, time
json.load(sys.stdin)
for i in range(1, 7):
    print(json.dumps({"progress": i * 15, "step": f"step {i} of six"}), flush=True)
    time.sleep(0.55)
print(json.dumps({"result": "done"}), flush=True)
"#;

/// Bytes the process has handed to `write` and its kin so far (`wchar`).
fn bytes_written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    let line = io.lines().find_map(|line| line.strip_prefix("wchar:")).expect("a wchar line");
    line.trim().parse().expect("a number")
}

/// Progress of a request with a long message does not write the message
/// again: it is written when accepted (to the WAL, then into the database
/// file) and handed to the agent once. Kept in the request's row, each
/// progress report wrote it again whole, overflow pages and all.
#[tokio::test]
async fn progress_of_a_request_with_a_long_message_does_not_write_the_message_again() {
    const LONG: usize = 900_000;
    let fx = Fixture::new();
    fx.script("f/steps.py", STEPS);
    let agents = "async:\n  mode: async\nagents:\n  - id: steps\n    command: [\"python3\", \"steps.py\"]\n";
    fx.write("f/formation.afs", &formation_yaml("f", agents));
    let server = fx.start();
    let caller = server.caller("f", "u1");
    let mut written = Vec::new();
    for message in ["short".to_owned(), "m".repeat(LONG)] {
        let before = bytes_written(server.pid());
        let (status, body, _) = caller.chat(json!({ "message": message })).await;
        assert_eq!(status, 202, "{body}");
        let ended = caller.finished(&request_id(&body)).await;
        assert_eq!(ended["status"], "completed", "{ended}");
        assert_eq!(ended["current_step"], "step 6 of six", "every report was recorded: {ended}");
        written.push(bytes_written(server.pid()) - before);
    }
    let extra = written[1].saturating_sub(written[0]);
    eprintln!("bytes written: {} for the short message, {} for the {LONG}-byte one", written[0], written[1]);
    assert!(
        extra < 5 * LONG as u64,
        "the long message cost {extra} bytes of writes beyond the short one's {} (limit {})",
        written[0],
        5 * LONG
    );
}
