//! Issue 8: agent processes do not outlive the server, even when it is killed
//! with SIGKILL. Through the real binary.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Starts a `sleep` child that also sleeps, records `<pid> <child pid>`, then
/// waits; a second run (after a restart) answers at once.
const AGENT: &str = r#"#!/usr/bin/env python3
import json, os, subprocess, sys, time
json.load(sys.stdin)
path = os.environ["PID_FILE"]
if os.path.exists(path):
    print(json.dumps({"result": "second run"}), flush=True)
    sys.exit(0)
child = subprocess.Popen(["sleep", "300"])
with open(path + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(path + ".tmp", path)
time.sleep(300)
"#;

fn pids(path: &Path) -> Option<(i32, i32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace().map(|p| p.parse().unwrap());
    Some((it.next()?, it.next()?))
}

#[tokio::test]
async fn agents_die_with_a_killed_server_and_their_groups_are_swept_at_restart() {
    let fx = Fixture::new();
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("agent.pid");
    fx.script("f/agent.py", AGENT);
    let agents = format!(
        "async:\n  mode: async\nagents:\n  - id: worker\n    command: [\"python3\", \"agent.py\"]\n    env:\n      PID_FILE: \"{}\"\n",
        pid_file.display()
    );
    fx.write("f/formation.afs", &formation_yaml("f", &agents));
    let server = fx.start();
    let (code, body, _) = server.caller("f", "u1").chat(json!({"message": "work"})).await;
    assert_eq!(code, 202, "{body}");
    let id = request_id(&body);
    let (agent, grandchild) =
        eventually(Duration::from_secs(30), "the agent to start", || async { pids(&pid_file) }).await;
    assert!(alive(agent) && alive(grandchild));
    let records: Vec<_> = std::fs::read_dir(fx.data.join("agents")).unwrap().collect();
    assert_eq!(records.len(), 1, "the running agent is recorded");

    // SIGKILL: the server cannot clean up; the kernel kills its agent (PDEATHSIG).
    server.kill();
    eventually(Duration::from_secs(10), "the agent to die with the server", || async { (!alive(agent)).then_some(()) })
        .await;
    // What the agent started in its group is left; the next start sweeps it.
    assert!(alive(grandchild), "only the agent itself gets PDEATHSIG");
    let server = fx.start();
    eventually(Duration::from_secs(10), "the leftover group to be swept", || async {
        (!alive(grandchild)).then_some(())
    })
    .await;
    // The request runs again and ends; no record is left behind.
    assert_eq!(server.caller("f", "u1").finished(&id).await["status"], "completed");
    eventually(Duration::from_secs(10), "the record to go", || async {
        (std::fs::read_dir(fx.data.join("agents")).unwrap().count() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_sweep_kills_recorded_groups_only_while_the_record_matches() {
    let fx = Fixture::new();
    let records = fx.data.join("agents");
    std::fs::create_dir_all(&records).unwrap();
    let sleep = || std::process::Command::new("sleep").arg("300").process_group(0).spawn().unwrap();
    // Not a child of the server: a group left by an earlier one.
    let leftover = sleep();
    let pid = leftover.id() as i32;
    std::fs::write(records.join(pid.to_string()), format!("{pid} {}\n", start_time(pid).unwrap())).unwrap();
    // A record whose pid now belongs to another process (another start time).
    let mut innocent = sleep();
    let other = innocent.id() as i32;
    std::fs::write(records.join(other.to_string()), format!("{other} {}\n", start_time(other).unwrap() + 1)).unwrap();

    let _server = fx.start();
    let leftover = std::sync::Mutex::new(leftover);
    let status = eventually(Duration::from_secs(10), "the leftover group to be killed", || {
        let status = leftover.lock().unwrap().try_wait().unwrap();
        async move { status }
    })
    .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(innocent.try_wait().unwrap().is_none(), "a recycled pid is never killed");
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0, "records deleted");
    innocent.kill().unwrap();
    innocent.wait().unwrap();
}
