//! The crash test: a burst of async requests with webhooks, SIGKILL of the
//! server at a random moment, a restart, and then the promise checked:
//! nothing accepted is lost or stuck, every request's webhook arrives, no agent
//! process outlives the server that ran it. Duplicated deliveries (possible:
//! delivery is at-least-once across a crash) are counted and printed.
//!
//! Trials: `MUXI_CRASH_TRIALS` (default 3; CI runs the default). A hundred:
//! `MUXI_CRASH_TRIALS=100 cargo nextest run --test crash --no-capture`.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::receiver::Receiver;
use common::*;
use rand::Rng;
use serde_json::json;

/// Each run writes its pid in `pids/`, sleeps a little, answers. Every fifth
/// job sleeps for a minute while the file `hang` exists (until the crash): only
/// the server's death can end those early, which is what the test checks.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, os, random, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
req = json.load(sys.stdin)
os.makedirs("pids", exist_ok=True)
open(os.path.join("pids", str(os.getpid())), "w").close()
print(json.dumps({"progress": 10, "step": "working"}), flush=True)
job = int(req["message"].rsplit(" ", 1)[1])
time.sleep(60 if job % 5 == 0 and os.path.exists("hang") else random.uniform(0.05, 0.6))
print(json.dumps({"result": "done: " + req["message"]}), flush=True)
"#;

const BURST: usize = 40;

fn trials() -> usize {
    std::env::var("MUXI_CRASH_TRIALS").ok().and_then(|n| n.parse().ok()).unwrap_or(3)
}

fn agent_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir.join("f/pids")) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

#[tokio::test]
async fn sigkill_at_a_random_moment_loses_nothing_and_leaves_no_agent_behind() {
    let mut duplicates_total = 0;
    for trial in 1..=trials() {
        duplicates_total += one_trial(trial).await;
    }
    println!("crash test: {} trials, {duplicates_total} duplicated deliveries", trials());
}

/// One trial; returns how many deliveries arrived more than once.
async fn one_trial(trial: usize) -> usize {
    let rx = Receiver::start().await;
    let fx = Fixture::new();
    fx.script("f/agent.py", AGENT);
    fx.write(
        "f/formation.afs",
        &formation_yaml(
            "f",
            "async:\n  mode: async\n  webhook_retries: 5\noverlord:\n  max_concurrent_requests: 8\n\
             agents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n",
        ),
    );
    fx.write("f/hang", "");
    let allow = ["--allow-webhook-host", "127.0.0.1"];
    let server = Server::start(&fx, &allow, &[]);
    let hook = rx.url("/hook");

    // The burst, and SIGKILL somewhere inside or after it.
    let sends: Vec<_> = (0..BURST)
        .map(|i| {
            let request = server
                .caller("f", "u1")
                .request(reqwest::Method::POST, "/chat")
                .json(&json!({ "message": format!("t{trial} job {i}"), "webhook_url": hook }));
            tokio::spawn(async move {
                let response = request.send().await.ok()?;
                let (code, body) = (response.status().as_u16(), response.json::<serde_json::Value>().await.ok()?);
                (code == 202).then(|| request_id(&body))
            })
        })
        .collect();
    // Odd trials kill while requests are still being accepted; even ones once
    // agents run (some of them hanging), at a random moment after that.
    if trial.is_multiple_of(2) {
        eventually(Duration::from_secs(60), "agents to start", || async {
            (agent_pids(&fx.formations).len() >= 3).then_some(())
        })
        .await;
    }
    let kill_after = Duration::from_millis(rand::thread_rng().gen_range(0..400));
    tokio::time::sleep(kill_after).await;
    let pid = server.pid() as i32;
    let alive_at_kill = agent_pids(&fx.formations).into_iter().filter(|p| alive(*p)).count();
    server.kill();
    fx.remove("f/hang");
    let mut accepted = HashSet::new();
    for send in sends {
        if let Ok(Some(id)) = send.await {
            accepted.insert(id);
        }
    }
    assert!(!alive(pid));

    // No agent outlives the server that ran it.
    let started = agent_pids(&fx.formations);
    eventually(Duration::from_secs(10), "agents of the killed server to die", || async {
        started.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;

    // Restart: every accepted request ends, and so does everything else committed.
    let server = Server::start(&fx, &allow, &[]);
    let caller = server.caller("f", "u1");
    let listed = eventually(Duration::from_secs(120), "every committed request to end", || async {
        let listed = caller.list("?limit=500").await;
        listed.iter().all(|r| r["status"] == "completed").then_some(listed)
    })
    .await;
    let stored: HashSet<String> = listed.iter().map(|r| r["request_id"].as_str().unwrap().to_string()).collect();
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(lost.is_empty(), "trial {trial}: accepted but lost: {lost:?}");

    // Every one of them is delivered; duplicates are counted.
    let deliveries = eventually(Duration::from_secs(60), "a webhook per request", || async {
        let mut per_request: HashMap<String, usize> = HashMap::new();
        for hit in rx.hits("/hook") {
            *per_request.entry(hit.json()["request_id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
        stored.iter().all(|id| per_request.contains_key(id)).then_some(per_request)
    })
    .await;
    let duplicates: usize = deliveries.values().map(|n| n - 1).sum();
    println!(
        "trial {trial}: killed {kill_after:?} later with {alive_at_kill} agents running; {} accepted, {} committed, \
         {duplicates} duplicated deliveries",
        accepted.len(),
        stored.len()
    );

    // A clean stop leaves no agent either.
    let pids = agent_pids(&fx.formations);
    assert_eq!(server.terminate(), Some(0));
    eventually(Duration::from_secs(10), "no agent after a clean stop", || async {
        pids.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
    duplicates
}
