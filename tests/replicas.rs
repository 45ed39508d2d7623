//! Several real `muxi-rt serve` replicas on one PostgreSQL schema (a fresh
//! schema per test, dropped after; see `common::postgres`): work accepted on
//! one runs on another when the first dies, a paused replica's late writes are
//! fenced off, a cancel on one replica kills the agent running on another, an
//! idempotency key sent to two replicas at once makes one request, and
//! webhooks go out once each, replicas whose formation files differ say so in
//! `/health`, and a request another replica ended stops counting against its
//! user's cap. Leases are shortened with `MUXI_LEASE_SECS`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::postgres::PgSchema;
use common::receiver::Receiver;
use common::*;
use serde_json::{json, Value};

/// The lease the replicas hold in these tests (renewed every second).
const LEASE_SECS: u64 = 3;
/// The sweeper looks for claimable work this often.
const SWEEP_SECS: u64 = 2;

/// Writes `pids/<pid>`, sleeps the seconds named by the message's first word
/// (`F/L`: F seconds the first time any agent runs, L after), answers with its
/// pid. Progress every 0.2 s, so a runner writes while it runs.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, os, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
req = json.load(sys.stdin)
os.makedirs("pids", exist_ok=True)
open(os.path.join("pids", str(os.getpid())), "w").close()
spec = req["message"].split(" ", 1)[0]
if "/" in spec:
    first, later = spec.split("/")
    seconds = float(later) if os.path.exists("ran-first") else float(first)
    open("ran-first", "w").close()
else:
    seconds = float(spec)
end = time.time() + seconds
while time.time() < end:
    print(json.dumps({"progress": 10, "step": "pid %d" % os.getpid()}), flush=True)
    time.sleep(0.2)
print(json.dumps({"result": "pid %d: %s" % (os.getpid(), req["message"])}), flush=True)
"#;

struct Replicas {
    fx: Fixture,
    schema: PgSchema,
    _data: tempfile::TempDir,
    data: PathBuf,
}

impl Replicas {
    async fn new() -> Replicas {
        let fx = Fixture::new();
        fx.script("f/agent.py", AGENT);
        fx.write(
            "f/formation.afs",
            &formation_yaml(
                "f",
                "async:\n  mode: async\noverlord:\n  max_concurrent_requests: 8\n\
                 agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n",
            ),
        );
        let data = tempfile::tempdir().expect("temp dir");
        Replicas { fx, schema: PgSchema::create().await, data: data.path().to_path_buf(), _data: data }
    }

    /// Starts replica `name` with its own data folder.
    fn start(&self, name: &str) -> Server {
        let url = self.schema.url();
        let lease = LEASE_SECS.to_string();
        Server::start_with_data(
            &self.fx,
            &self.data.join(name),
            &["--allow-webhook-host", "127.0.0.1"],
            &[("MUXI_DATABASE_URL", url.as_str()), ("MUXI_LEASE_SECS", lease.as_str())],
        )
    }

    fn pids(&self) -> Vec<i32> {
        agent_pids(&self.fx.formations)
    }
}

fn agent_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir.join("f/pids")) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

async fn submit(server: &Server, body: Value) -> String {
    let (code, body, _) = server.caller("f", "u1").chat(body).await;
    assert_eq!(code, 202, "{body}");
    request_id(&body)
}

fn signal(server: &Server, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this test started and still owns.
    let rc = unsafe { libc::kill(server.pid() as i32, signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", server.pid());
}

#[tokio::test]
async fn a_killed_replicas_requests_complete_on_another_once_each() {
    let r = Replicas::new().await;
    let a = r.start("a");
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(submit(&a, json!({ "message": format!("3 job {i}") })).await);
        }
        ids
    };
    // A runs them (it accepted them and holds their leases); B starts after,
    // since queued requests go to whichever replica has room first.
    eventually(Duration::from_secs(30), "A's agents to run", || async { (r.pids().len() >= 6).then_some(()) }).await;
    let b = r.start("b");
    for id in &ids {
        assert_eq!(b.caller("f", "u1").data(id).await["status"], "processing", "B sees A's work running");
    }
    let killed_at = Instant::now();
    a.kill();
    // Every one completes on B: the lease runs out, B's sweeper claims it, the agent runs 3 s.
    let limit = Duration::from_secs(LEASE_SECS + SWEEP_SECS + 3 + 20);
    let mut last = Duration::ZERO;
    for id in &ids {
        let done = eventually(limit, "B to complete A's request", || async {
            let data = b.caller("f", "u1").data(id).await;
            (data["status"] == "completed").then_some(data)
        })
        .await;
        last = last.max(killed_at.elapsed());
        assert_eq!(done["attempts"], 2, "the takeover is a second attempt: {done}");
    }
    println!("takeover: all 6 requests of the killed replica completed on another {last:?} after SIGKILL (lease {LEASE_SECS} s, agents 3 s)");
    let completed: i64 = r.schema.scalar("SELECT COUNT(*) FROM requests WHERE status = 'completed'").await;
    assert_eq!(completed, 6, "none lost");
}

#[tokio::test]
async fn a_paused_replica_past_its_lease_changes_nothing_when_it_wakes() {
    let r = Replicas::new().await;
    let a = r.start("a");
    // A's agent answers after 1 s, B's (the takeover) after 6 s.
    let id = submit(&a, json!({ "message": "1/6 fenced" })).await;
    let first = eventually(Duration::from_secs(30), "A's agent to run", || async { r.pids().first().copied() }).await;
    signal(&a, libc::SIGSTOP);
    // B starts once A sleeps (a queued request goes to whichever replica has room first).
    let b = r.start("b");
    // A's agent ends while A sleeps (its answer waits in the pipe); A's lease
    // expires and B takes the request over.
    eventually(Duration::from_secs(30), "B to take the request over", || async {
        let data = b.caller("f", "u1").data(&id).await;
        (data["attempts"] == 2 && r.pids().len() == 2).then_some(())
    })
    .await;
    // A wakes while B runs the request: its agent's answer, written under the
    // old epoch, is refused.
    signal(&a, libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let meanwhile = a.caller("f", "u1").data(&id).await;
    assert_eq!(meanwhile["status"], "processing", "A's late answer did not end the request: {meanwhile}");
    let done = eventually(Duration::from_secs(30), "B to complete the request", || async {
        let data = b.caller("f", "u1").data(&id).await;
        (data["status"] == "completed").then_some(data)
    })
    .await;
    let text = done["result"].as_str().map(str::to_owned).unwrap_or_else(|| done["result"]["text"].to_string());
    assert!(!text.contains(&format!("pid {first}:")), "B's agent answered, not A's: {done}");
    assert!(text.contains("pid "), "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    let rows: i64 = r.schema.scalar("SELECT COUNT(*) FROM requests").await;
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_request_ended_on_another_replica_stops_counting_against_its_users_cap() {
    let r = Replicas::new().await;
    r.fx.write(
        "f/formation.afs",
        &formation_yaml(
            "f",
            "async:\n  mode: async\noverlord:\n  max_concurrent_requests: 1\n  max_pending_per_user: 1\n\
             agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n",
        ),
    );
    let a = r.start("a");
    // Another user's long request fills A's one slot...
    let (code, body, _) = a.caller("f", "u0").chat(json!({ "message": "120 long" })).await;
    assert_eq!(code, 202, "{body}");
    eventually(Duration::from_secs(30), "A's agent to run", || async { (r.pids().len() == 1).then_some(()) }).await;
    // ...so u1's request waits in the queue, counted against u1's cap on A.
    let queued = submit(&a, json!({ "message": "0.2 quick" })).await;
    let (code, body, _) = a.caller("f", "u1").chat(json!({ "message": "0.2 again" })).await;
    assert_eq!(code, 429, "u1 is at the cap of 1: {body}");
    // B has room: it takes the queued request on and ends it.
    let b = r.start("b");
    eventually(Duration::from_secs(30), "B to complete u1's request", || async {
        (b.caller("f", "u1").data(&queued).await["status"] == "completed").then_some(())
    })
    .await;
    let ended = Instant::now();
    // A never saw that end; its sweeper finds it in the store and u1 may send again.
    eventually(Duration::from_secs(30), "A to accept u1's next request", || async {
        let (code, _, _) = a.caller("f", "u1").chat(json!({ "message": "0.2 again" })).await;
        (code == 202).then_some(())
    })
    .await;
    println!("A released u1's count {:?} after B ended the request", ended.elapsed());
}

#[tokio::test]
async fn a_cancel_on_one_replica_kills_the_agent_running_on_another() {
    let r = Replicas::new().await;
    let a = r.start("a");
    let id = submit(&a, json!({ "message": "120 long" })).await;
    let pid = eventually(Duration::from_secs(30), "A's agent to run", || async { r.pids().first().copied() }).await;
    assert!(alive(pid));
    // B starts once A runs it (a queued request goes to whichever replica has room first).
    let b = r.start("b");
    let cancelled_at = Instant::now();
    let (code, body) = b.caller("f", "u1").cancel(&id).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["status"], "cancelled", "{body}");
    eventually(Duration::from_secs(10), "the agent on A to die", || async { (!alive(pid)).then_some(()) }).await;
    println!("cancel on B stopped the agent on A {:?} after the cancel was sent", cancelled_at.elapsed());
    let on_a = a.caller("f", "u1").data(&id).await;
    assert_eq!(on_a["status"], "cancelled", "{on_a}");
    // Told at once by the store's announcement; or, if one of these came first,
    // by the lease renewal (each second here) or by the store refusing the
    // agent's progress (written every 0.5 s). Either way the agent died above.
    let log = a.stderr();
    assert!(
        ["cancelled on another server", "lease lost to another runner", "progress refused"]
            .iter()
            .any(|why| log.contains(why)),
        "A stopped the work because of the cancel: {log}"
    );
}

#[tokio::test]
async fn an_idempotency_key_sent_to_two_replicas_at_once_makes_one_request() {
    let r = Replicas::new().await;
    let a = r.start("a");
    let b = r.start("b");
    for round in 0..10 {
        let send = |server: &Server| {
            server
                .caller("f", "u1")
                .request(reqwest::Method::POST, "/chat")
                .header("X-Muxi-Idempotency-Key", format!("key-{round}"))
                .json(&json!({ "message": format!("0.1 round {round}") }))
                .send()
        };
        let (from_a, from_b) = tokio::join!(send(&a), send(&b));
        let (_, body_a) = json(from_a.expect("A answers")).await;
        let (_, body_b) = json(from_b.expect("B answers")).await;
        assert_eq!(request_id(&body_a), request_id(&body_b), "round {round}: {body_a} / {body_b}");
    }
    let rows: i64 = r.schema.scalar("SELECT COUNT(*) FROM requests").await;
    assert_eq!(rows, 10);
}

#[tokio::test]
async fn webhooks_are_delivered_once_each_across_replicas() {
    let rx = Receiver::start().await;
    let r = Replicas::new().await;
    let servers = [r.start("a"), r.start("b"), r.start("c")];
    let hook = rx.url("/hook");
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(submit(&servers[i % 3], json!({ "message": format!("0.2 hook {i}"), "webhook_url": hook })).await);
    }
    rx.wait_for("/hook", ids.len(), Duration::from_secs(60)).await;
    // Time for any duplicate to show up: each replica's dispatcher polls the outbox.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut per_request: HashMap<String, usize> = HashMap::new();
    for hit in rx.hits("/hook") {
        *per_request.entry(hit.json()["request_id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(per_request.get(id), Some(&1), "{id} delivered once: {per_request:?}");
    }
    let delivered: i64 = r.schema.scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'delivered'").await;
    assert_eq!(delivered, ids.len() as i64);
}

#[tokio::test]
async fn a_follower_on_another_replica_sees_progress_and_the_end() {
    let r = Replicas::new().await;
    let a = r.start("a");
    let id = submit(&a, json!({ "message": "4 followed" })).await;
    eventually(Duration::from_secs(30), "A's agent to run", || async { r.pids().first().copied() }).await;
    let b = r.start("b");
    let response = b
        .caller("f", "u1")
        .request(reqwest::Method::GET, &format!("/requests/{id}/events"))
        .send()
        .await
        .expect("B answers");
    let mut reader = common::sse::SseReader::new(response);
    let frames = reader
        .until(Duration::from_secs(30), |frame| {
            frame.event.is_none() && frame.json()["token"]["type"].as_str() == Some("completed")
        })
        .await;
    let seen_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let end = frames.last().expect("frames").json();
    assert_eq!(end["token"]["type"], "completed", "{frames:?}");
    assert!(
        frames
            .iter()
            .any(|f| f.event.is_none() && f.json()["token"]["content"].as_str().is_some_and(|c| c.starts_with("pid "))),
        "the agent's progress on A reached B: {frames:?}"
    );
    let completed_at: i64 = r.schema.scalar("SELECT completed_at FROM requests").await;
    println!(
        "follower on B saw the end {} ms after A committed it (B polls the store every 500 ms)",
        seen_at - completed_at
    );
}

#[tokio::test]
async fn a_replica_whose_formation_copy_differs_says_so_in_health() {
    let r = Replicas::new().await;
    // B loads its own folder: formation `f` with another description.
    let other = Fixture::new();
    let write_b = |description: &str| {
        let yaml = std::fs::read_to_string(r.fx.formations.join("f/formation.afs")).expect("A's formation");
        other.write("f/formation.afs", &yaml.replace("description: test formation f", description));
    };
    write_b("description: B's copy");
    let a = r.start("a");
    let lease = LEASE_SECS.to_string();
    let b = Server::start_with_data(
        &other,
        &r.data.join("b"),
        &[],
        &[("MUXI_DATABASE_URL", r.schema.url().as_str()), ("MUXI_LEASE_SECS", lease.as_str())],
    );
    let revision = |server: &Server| {
        let server = server.get("/health");
        async move {
            let (_, body) = json(server.send().await.unwrap()).await;
            let f = &body["data"]["formations"][0];
            format!("{}+{}", f["version"].as_str().unwrap_or_default(), f["revision"].as_str().unwrap_or_default())
        }
    };
    let (rev_a, rev_b) = (revision(&a).await, revision(&b).await);
    assert_ne!(rev_a, rev_b, "the two copies differ");

    let health = |with_admin: bool| {
        let mut request = a.get("/health");
        if with_admin {
            let (header, key) = admin_key("f");
            request = request.header(header, key);
        }
        async move { json(request.send().await.unwrap()).await.1["data"].clone() }
    };
    let seen = eventually(Duration::from_secs(30), "A to see B's differing copy", || async {
        let data = health(true).await;
        (data["copies"].as_array().is_some_and(|c| !c.is_empty())).then_some(data)
    })
    .await;
    assert_eq!(seen["status"], "degraded", "{seen}");
    let copy = &seen["copies"][0];
    assert_eq!(copy["formation"], "f", "{seen}");
    assert_eq!(copy["this_replica"], rev_a.as_str(), "{seen}");
    assert_eq!(copy["other_revision"], rev_b.as_str(), "{seen}");
    assert!(copy["other_replica"].as_str().is_some_and(|o| !o.is_empty()), "the admin sees the owner: {seen}");
    let anonymous = health(false).await;
    assert_eq!(anonymous["copies"][0]["other_revision"], rev_b.as_str(), "{anonymous}");
    assert!(anonymous["copies"][0].get("other_replica").is_none(), "no owner names without the key: {anonymous}");

    // B's file made equal to A's: B reloads it, publishes, and A is healthy again.
    write_b("description: test formation f");
    let healed = eventually(Duration::from_secs(30), "the copies to agree", || async {
        let data = health(true).await;
        (data["copies"].as_array().is_some_and(|c| c.is_empty())).then_some(data)
    })
    .await;
    assert_eq!(healed["status"], "healthy", "{healed}");
    assert_eq!(revision(&b).await, rev_a);
}
