//! Unit tests of the `command` agent kind: the stdout protocol, outcomes,
//! limits and the process group's lifetime.

use super::*;
use std::path::{Path, PathBuf};

fn formation(dir: &Path) -> Formation {
    Formation {
        id: "test".into(),
        version: "0.0.0".into(),
        revision: "r".into(),
        description: String::new(),
        source: dir.join("formation.afs"),
        dir: dir.to_path_buf(),
        keys: Default::default(),
        overlord: Default::default(),
        llm: Default::default(),
        agents: Vec::new(),
        mcp: Default::default(),
        observability: Default::default(),
        rate_limits: Default::default(),
        triggers: BTreeMap::new(),
        warnings: Vec::new(),
    }
}

fn spec(argv: &[&str], retryable_exit_codes: &[i32], env: &[(&str, &str)]) -> AgentSpec {
    AgentSpec {
        id: "worker".into(),
        name: "Worker".into(),
        description: String::new(),
        system_message: None,
        default: true,
        estimated_seconds: None,
        kind: AgentKind::Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            retryable_exit_codes: retryable_exit_codes.to_vec(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        },
    }
}

fn request(message: &str) -> AgentRequest {
    AgentRequest {
        request_id: "req_1".into(),
        formation_id: "test".into(),
        agent_id: "worker".into(),
        user_id: "u1".into(),
        session_id: None,
        message: message.into(),
        attempt: 1,
        history: Vec::new(),
    }
}

/// A temp folder holding `agent.sh` with `script`.
fn script_dir(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("agent.sh"), script).expect("write script");
    dir
}

/// Runs `sh agent.sh` in a temp folder; returns the outcome and every event.
async fn run_script(
    script: &str,
    retryable: &[i32],
    message: &str,
) -> (Result<AgentOutput, AgentFailure>, Vec<AgentEvent>) {
    let dir = script_dir(script);
    run_argv(dir.path(), &["sh", "agent.sh"], retryable, &[], message).await
}

async fn run_argv(
    dir: &Path,
    argv: &[&str],
    retryable: &[i32],
    env: &[(&str, &str)],
    message: &str,
) -> (Result<AgentOutput, AgentFailure>, Vec<AgentEvent>) {
    let (tx, recorded) = Events::recorder();
    let result = run(&formation(dir), &spec(argv, retryable, env), request(message), tx).await;
    let events = recorded.lock().unwrap().clone();
    (result, events)
}

fn progress(events: &[AgentEvent]) -> Vec<ProgressUpdate> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Progress(p) => Some(p.clone()),
            AgentEvent::Content(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn progress_events_in_order_then_result() {
    let script = r##"
cat > /dev/null
echo '{"progress": 20, "step": "Researching A", "total_steps": 3, "completed_steps": 1}'
echo '{"content": "partial "}'
echo '{"progress": 60, "current_step": "Researching B", "completed_steps": 2, "message": "halfway"}'
echo '{"result": "first"}'
echo '{"progress": 100, "completed_steps": 3}'
echo '{"result": "The report", "artifacts": [{"name": "report.md", "content": "# R"}]}'
"##;
    let (result, events) = run_script(script, &[], "hi").await;
    let output = result.expect("success");
    assert_eq!(output.text, "The report", "the last result line wins");
    assert_eq!(output.artifacts, vec![serde_json::json!({"name": "report.md", "content": "# R"})]);

    let steps = progress(&events);
    assert_eq!(steps.len(), 3);
    assert_eq!(
        steps[0],
        ProgressUpdate {
            progress: Some(20.0),
            step: Some("Researching A".into()),
            total_steps: Some(3),
            completed_steps: Some(1),
            message: None,
        }
    );
    assert_eq!(steps[1].step.as_deref(), Some("Researching B"));
    assert_eq!(steps[1].message.as_deref(), Some("halfway"));
    assert_eq!(steps[2].progress, Some(100.0));
    assert_eq!(events[1], AgentEvent::Content("partial ".into()));
}

#[tokio::test]
async fn request_arrives_on_stdin_as_json() {
    let script = r#"
python3 -c '
import json, sys
req = json.load(sys.stdin)
print(json.dumps({"result": req["message"] + "|" + req["request_id"] + "|" + str(req["attempt"]) + "|" + req["user_id"]}))
'
"#;
    let (result, _) = run_script(script, &[], "hello there").await;
    assert_eq!(result.expect("success").text, "hello there|req_1|1|u1");
}

#[tokio::test]
async fn plain_stdout_is_the_result() {
    let script = "echo 'It is 68F and sunny'\necho '{\"temperature\": 68}'\necho\n";
    let (result, events) = run_script(script, &[], "weather?").await;
    assert_eq!(result.expect("success").text, "It is 68F and sunny\n{\"temperature\": 68}");
    assert_eq!(events.first(), Some(&AgentEvent::Content("It is 68F and sunny\n".into())));
    assert!(progress(&events).is_empty());
}

#[tokio::test]
async fn content_pieces_are_the_result_without_a_result_line() {
    let script = "echo '{\"content\": \"Hello, \"}'\necho '{\"content\": \"world\"}'\n";
    let (result, _) = run_script(script, &[], "").await;
    assert_eq!(result.expect("success").text, "Hello, world");
}

#[tokio::test]
async fn non_zero_exit_carries_stderr_and_is_not_retryable_by_default() {
    let script = "echo working\necho 'boom: upstream said no' >&2\nexit 3\n";
    let (result, _) = run_script(script, &[75], "").await;
    let failure = result.expect_err("failure");
    assert_eq!(failure.kind, "agent_error");
    assert_eq!(failure.message, "command exited with status 3: boom: upstream said no");
    assert!(!failure.retryable);
}

#[tokio::test]
async fn retryable_exit_codes_make_the_failure_retryable() {
    let (result, _) = run_script("exit 75\n", &[75, 76], "").await;
    let failure = result.expect_err("failure");
    assert_eq!(failure.message, "command exited with status 75");
    assert!(failure.retryable);
}

#[tokio::test]
async fn stderr_tail_is_bounded() {
    let script = "python3 -c 'import sys; sys.stderr.write(\"x\" * 100000 + \"END\")'\nexit 1\n";
    let (result, _) = run_script(script, &[], "").await;
    let failure = result.expect_err("failure");
    assert!(failure.message.ends_with("xxxEND"), "{}", &failure.message[..80]);
    assert!(failure.message.len() < STDERR_TAIL_BYTES + 100);
}

#[tokio::test]
async fn explicit_error_line_is_the_failure() {
    let script = "echo '{\"result\": \"ignored\"}'\necho '{\"error\": \"rate limit\", \"retryable\": true, \"type\": \"tool_error\", \"retry_after\": 2}'\n";
    let (result, _) = run_script(script, &[], "").await;
    let failure = result.expect_err("failure");
    assert_eq!(failure.kind, "tool_error");
    assert_eq!(failure.message, "rate limit");
    assert!(failure.retryable);
    assert_eq!(failure.retry_after, Some(Duration::from_secs(2)));

    let (result, _) = run_script("echo '{\"error\": \"nope\"}'\n", &[], "").await;
    let failure = result.expect_err("failure");
    assert_eq!((failure.kind.as_str(), failure.retryable), ("agent_error", false));
}

#[tokio::test]
async fn killed_by_signal_is_not_retryable() {
    let (result, _) = run_script("kill -TERM $$\nsleep 5\n", &[143], "").await;
    let failure = result.expect_err("failure");
    assert_eq!(failure.message, "command was killed by signal 15 (SIGTERM)");
    assert!(!failure.retryable);
}

#[tokio::test]
async fn spawn_failure_names_the_program() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (result, _) = run_argv(dir.path(), &["no-such-program-muxi"], &[], &[], "").await;
    let failure = result.expect_err("failure");
    assert_eq!(failure.kind, "agent_error");
    assert!(failure.message.contains("`no-such-program-muxi` not found"), "{}", failure.message);
    assert!(!failure.retryable);
}

#[tokio::test]
async fn env_and_working_directory_are_applied() {
    let dir = script_dir("echo \"$GREETING from $(basename \"$PWD\")\"\n");
    let (result, _) = run_argv(dir.path(), &["sh", "agent.sh"], &[], &[("GREETING", "hola")], "").await;
    let name = dir.path().file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    assert_eq!(result.expect("success").text, format!("hola from {name}"));
}

#[tokio::test]
async fn over_long_line_fails_at_once() {
    // The program would go on for minutes: the limit ends it.
    let script = "python3 -c 'print(\"y\" * (2 * 1024 * 1024), flush=True)'\nsleep 300\n";
    let started = std::time::Instant::now();
    let (result, _) = run_script(script, &[], "").await;
    assert!(result.expect_err("failure").message.contains("longer than 1 MiB"));
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test]
async fn background_leftovers_do_not_hold_the_answer() {
    // The program exits at once but leaves a child holding stdout open.
    let script = "sleep 300 &\necho '{\"result\": \"done\"}'\n";
    let started = std::time::Instant::now();
    let (result, _) = run_script(script, &[], "").await;
    assert_eq!(result.expect("success").text, "done");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test]
async fn bounded_line_reader_splits_and_limits() {
    let data: &[u8] = b"one\r\ntwo\nlast";
    let mut reader = BufReader::with_capacity(2, data);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    while read_line_bounded(&mut reader, &mut buf, 16).await.expect("read") == LineRead::Line {
        lines.push(String::from_utf8_lossy(&buf).into_owned());
        buf.clear();
    }
    assert_eq!(lines, ["one\r", "two", "last"]);

    let mut reader = BufReader::new(&b"0123456789\n"[..]);
    buf.clear();
    assert_eq!(read_line_bounded(&mut reader, &mut buf, 5).await.expect("read"), LineRead::TooLong);
}

/// True while `pid` is a live (not zombie) process.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the `(comm)` field.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn exists(pid: i32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn dropping_the_future_kills_the_process_group() {
    let script = r#"
sleep 300 &
echo "{\"progress\": 10, \"message\": \"$$ $!\"}"
sleep 300
echo '{"result": "should never get here"}'
"#;
    let dir = script_dir(script);
    let (tx, mut rx) = Events::channel();
    let formation = formation(dir.path());
    let spec = spec(&["sh", "agent.sh"], &[], &[]);
    let mut fut = Box::pin(run(&formation, &spec, request(""), tx));

    let event = tokio::select! {
        outcome = &mut fut => panic!("finished early: {outcome:?}"),
        event = rx.recv() => event.progress,
    };
    let Some(ProgressUpdate { message: Some(pids), .. }) = event else {
        panic!("expected progress with pids, got {event:?}");
    };
    let pids: Vec<i32> = pids.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    let [child, grandchild] = pids[..] else { panic!("two pids expected: {pids:?}") };
    assert!(running(child) && running(grandchild));

    drop(fut);

    // Give the kill a moment to land and tokio a moment to reap the child.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (exists(child) || running(grandchild)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!exists(child), "the child {child} is still there");
    // The grandchild is reaped by whoever adopted it (init); dead is enough.
    assert!(!running(grandchild), "the grandchild {grandchild} is still running");
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("formations/assistant")
}

#[tokio::test]
async fn example_quick_agent_echoes() {
    let (result, _) = run_argv(&example_dir(), &["python3", "agents/quick.py"], &[], &[], "ping").await;
    assert_eq!(result.expect("success").text, "You said: ping");
}

#[tokio::test]
async fn example_research_agent_reports_five_steps() {
    let (result, events) = run_argv(
        &example_dir(),
        &["python3", "agents/research.py"],
        &[],
        &[("MUXI_EXAMPLE_STEP_SECONDS", "0")],
        "AI trends",
    )
    .await;
    let output = result.expect("success");
    let done: Vec<Option<u32>> = progress(&events).iter().map(|p| p.completed_steps).collect();
    assert_eq!(done, [Some(1), Some(2), Some(3), Some(4), Some(5)]);
    assert!(output.text.contains("AI trends"));
    assert_eq!(output.artifacts[0]["name"], "report.md");
}
