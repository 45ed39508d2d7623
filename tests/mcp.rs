//! The MCP endpoint through the real binary and a real MCP client (rmcp's own
//! Streamable HTTP client), in both protocols: the `initialize` handshake
//! (2025-11-25, with a session) and the stateless 2026-07-28 one (`server/discover`).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ClientCapabilities, ClientConfig,
    GetTaskParams, Implementation, ProgressNotificationParam, ProtocolVersion, TaskPayload, TaskStatus,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ClientLifecycleMode, ClientServiceExt, RoleClient};
use serde_json::{json, Value};

use common::{alive, eventually, formation_yaml, Fixture, Server};

const F: &str = "mcpf";

/// An agent that reports progress in STEPS steps; a message `gate NAME` then
/// waits until the file `gates/NAME` exists. It writes its pid to `pids/<request id>`.
const AGENT: &str = r#"
import json, os, sys, time
req = json.load(sys.stdin)
os.makedirs("pids", exist_ok=True)
with open(os.path.join("pids", req["request_id"]), "w") as f:
    f.write(str(os.getpid()))
steps = int(os.environ.get("STEPS", "3"))
pause = float(os.environ.get("STEP_SECONDS", "0.1"))
for i in range(1, steps + 1):
    time.sleep(pause)
    print(json.dumps({"progress": int(100 * i / (steps + 1)), "step": f"Step {i} of {steps}",
                      "total_steps": steps, "completed_steps": i}), flush=True)
message = req["message"]
if message.startswith("gate "):
    gate = os.path.join("gates", message[5:])
    while not os.path.exists(gate):
        time.sleep(0.05)
print(json.dumps({"result": "worked: " + message, "artifacts": [{"name": "notes.txt", "content": "done"}]}), flush=True)
"#;

fn fixture() -> Fixture {
    let fixture = Fixture::new();
    fixture.script(&format!("{F}/agents/work.py"), AGENT);
    std::fs::create_dir_all(fixture.formations.join(F).join("gates")).unwrap();
    fixture.write(
        &format!("{F}/formation.afs"),
        &formation_yaml(
            F,
            r#"async:
  threshold_seconds: 10
overlord:
  max_concurrent_requests: 64
agents:
  - id: worker
    description: Works in a few steps
    estimated_seconds: 30
    command: ["python3", "agents/work.py"]
  - id: quick
    name: Quick one
    description: One short step.
    estimated_seconds: 1
    command: ["python3", "agents/work.py"]
    env: { STEPS: "1" }
"#,
        ),
    );
    fixture
}

fn gate(fixture: &Fixture, name: &str) -> PathBuf {
    fixture.formations.join(F).join("gates").join(name)
}

fn open_gate(fixture: &Fixture, name: &str) {
    std::fs::write(gate(fixture, name), "open").unwrap();
}

/// The test client: records progress notifications; may declare the Tasks extension.
#[derive(Clone, Default)]
struct Client {
    tasks: bool,
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        let capabilities = if self.tasks {
            ClientCapabilities::builder().enable_tasks().build()
        } else {
            ClientCapabilities::default()
        };
        ClientConfig::new(capabilities, Implementation::new("muxi-rt-tests", "0.1.0"))
    }

    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.progress.lock().unwrap().push(params);
    }
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    /// `initialize`, 2025-11-25, with `Mcp-Session-Id`.
    Handshake,
    /// `server/discover`, 2026-07-28, stateless.
    Stateless,
}

type Session = RunningService<RoleClient, Client>;

fn mcp_url(server: &Server) -> String {
    server.url(&format!("/api/{F}/v1/mcp"))
}

async fn try_connect(
    server: &Server,
    key: &str,
    user: &str,
    protocol: Protocol,
    client: Client,
) -> Result<Session, String> {
    let mut headers = HashMap::new();
    headers.insert(
        reqwest::header::HeaderName::from_static("x-muxi-user-id"),
        reqwest::header::HeaderValue::from_str(user).unwrap(),
    );
    let config =
        StreamableHttpClientTransportConfig::with_uri(mcp_url(server)).auth_header(key).custom_headers(headers);
    let transport = StreamableHttpClientTransport::from_config(config);
    let lifecycle = match protocol {
        Protocol::Handshake => ClientLifecycleMode::Initialize,
        Protocol::Stateless => {
            ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] }
        }
    };
    client.serve_with_lifecycle(transport, lifecycle).await.map_err(|e| e.to_string())
}

async fn connect(server: &Server, user: &str, protocol: Protocol, client: Client) -> Session {
    try_connect(server, &format!("client-{F}"), user, protocol, client).await.expect("the MCP client connects")
}

fn args(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().unwrap().clone()
}

async fn call(session: &Session, tool: &str, arguments: Value) -> CallToolResult {
    session
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("tools/call {tool} failed: {e}"))
}

fn structured(result: &CallToolResult) -> Value {
    result.structured_content.clone().unwrap_or_else(|| panic!("no structuredContent in {result:?}"))
}

fn text(result: &CallToolResult) -> String {
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

async fn start(session: &Session, agent: &str, message: &str) -> String {
    let result = call(session, agent, json!({ "message": message })).await;
    let facts = structured(&result);
    assert_eq!(facts["status"], "running", "{facts}");
    assert_eq!(result.is_error, Some(false));
    facts["execution_id"].as_str().unwrap().to_string()
}

async fn status(session: &Session, id: &str) -> CallToolResult {
    call(session, "check_execution_status", json!({ "execution_id": id })).await
}

/// Polls `check_execution_status` until the execution has ended.
async fn finished(session: &Session, id: &str) -> CallToolResult {
    eventually(Duration::from_secs(60), "the execution to end", || async {
        let result = status(session, id).await;
        (structured(&result)["status"] != "running").then_some(result)
    })
    .await
}

/// The life of one execution, the same in both protocols: an id at once, then
/// running, then the output; the same request over HTTP.
async fn execution_round_trip(protocol: Protocol) {
    let fixture = fixture();
    let server = fixture.start();
    let session = connect(&server, "alice", protocol, Client::default()).await;

    let tools = session.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(names, ["worker", "quick", "check_execution_status", "cancel_execution", "list_executions"]);
    let worker = &tools[0];
    assert!(worker.description.as_deref().unwrap().starts_with("Works in a few steps."), "{worker:?}");
    assert_eq!(worker.input_schema["required"], json!(["message"]));
    assert_eq!(worker.input_schema["properties"]["wait_seconds"]["maximum"], json!(10.0));
    assert_eq!(tools[1].title.as_deref(), Some("Quick one"));

    // The tool answers while the work is still running: it cannot end before the gate opens.
    let result = call(&session, "worker", json!({ "message": "gate one" })).await;
    let facts = structured(&result);
    let id = facts["execution_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("req_"), "{facts}");
    assert_eq!(facts["status"], "running");
    assert_eq!(facts["agent"], "worker");
    assert_eq!(facts["status_url"], format!("/api/{F}/v1/requests/{id}"));
    assert!(facts["estimated_time"].as_str().unwrap().contains("seconds"), "{facts}");
    assert!(text(&result).contains(&id), "the text repeats the id: {}", text(&result));

    let running = status(&session, &id).await;
    assert_eq!(structured(&running)["status"], "running", "{running:?}");
    assert!(text(&running).contains("is running"), "{}", text(&running));

    // The same request over HTTP, still running.
    let alice = server.caller(F, "alice");
    let http = alice.data(&id).await;
    assert_eq!(http["request_id"], id.as_str());
    assert_eq!(http["agent_id"], "worker");
    assert!(matches!(http["status"].as_str(), Some("pending" | "processing")), "{http}");

    open_gate(&fixture, "one");
    let done = finished(&session, &id).await;
    let facts = structured(&done);
    assert_eq!(facts["status"], "completed", "{facts}");
    assert_eq!(facts["output"], "worked: gate one");
    assert_eq!(facts["artifacts"][0]["name"], "notes.txt");
    assert_eq!(done.is_error, Some(false));
    assert!(text(&done).starts_with("worked: gate one"), "{}", text(&done));
    assert_eq!(alice.data(&id).await["status"], "completed");

    // The other way round: a request made over HTTP is an execution over MCP.
    let (code, body, _) = alice.chat(json!({ "message": "from http", "agent_id": "quick", "async": true })).await;
    assert_eq!(code, 202, "{body}");
    let http_id = common::request_id(&body);
    let done = finished(&session, &http_id).await;
    assert_eq!(structured(&done)["output"], "worked: from http");

    let listed = call(&session, "list_executions", json!({ "status": "completed" })).await;
    let listed = structured(&listed);
    let ids: Vec<&str> =
        listed["executions"].as_array().unwrap().iter().filter_map(|e| e["execution_id"].as_str()).collect();
    assert_eq!(ids, [http_id.as_str(), id.as_str()], "newest first");
    session.cancel().await.unwrap();
}

#[tokio::test]
async fn handshake_protocol_runs_an_execution() {
    execution_round_trip(Protocol::Handshake).await;
}

#[tokio::test]
async fn stateless_protocol_runs_an_execution() {
    execution_round_trip(Protocol::Stateless).await;
}

#[tokio::test]
async fn both_protocols_are_negotiated() {
    let fixture = fixture();
    let server = fixture.start();
    let handshake = connect(&server, "alice", Protocol::Handshake, Client::default()).await;
    let info = handshake.peer_info().unwrap();
    assert_eq!(info.protocol_version, ProtocolVersion::V_2025_11_25);
    assert_eq!(info.server_info.as_ref().unwrap().name, "muxi-rt");
    assert!(info.capabilities.tools.is_some());
    let stateless = connect(&server, "alice", Protocol::Stateless, Client::default()).await;
    assert_eq!(stateless.peer_info().unwrap().protocol_version, ProtocolVersion::V_2026_07_28);

    // Raw HTTP: initialize opens a session, server/discover does not.
    let post = |body: Value, version: &str| {
        server
            .http
            .post(mcp_url(&server))
            .header("X-Muxi-Client-Key", format!("client-{F}"))
            .header("Accept", "application/json, text/event-stream")
            .header("MCP-Protocol-Version", version)
            .json(&body)
    };
    let init = post(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}),
        "2025-11-25",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(init.status(), 200);
    assert!(init.headers().get("mcp-session-id").is_some());
    let discover = post(
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}}}),
        "2026-07-28",
    )
    .header("Mcp-Method", "server/discover")
    .send()
    .await
    .unwrap();
    assert_eq!(discover.status(), 200);
    assert!(discover.headers().get("mcp-session-id").is_none());
    let body = discover.text().await.unwrap();
    assert!(body.contains("\"supportedVersions\""), "{body}");
    assert!(body.contains("2026-07-28") && body.contains("2025-11-25"), "{body}");

    // Open MCP sessions (and their SSE streams) do not hold up a graceful shutdown.
    assert_eq!(handshake.list_all_tools().await.unwrap().len(), 5);
    assert_eq!(server.terminate(), Some(0));
}

#[tokio::test]
async fn tasks_extension_runs_and_cancels_executions() {
    let fixture = fixture();
    let server = fixture.start();
    let session = connect(&server, "alice", Protocol::Stateless, Client { tasks: true, ..Client::default() }).await;

    let call_task = |message: &'static str| {
        let session = &session;
        async move {
            let params = CallToolRequestParams::new("worker").with_arguments(args(json!({ "message": message })));
            match session.call_tool_once(params).await.unwrap() {
                CallToolResponse::Task(created) => created.task,
                other => panic!("expected a task, got {other:?}"),
            }
        }
    };
    let task = call_task("gate t1").await;
    assert!(task.task_id.starts_with("req_"));
    assert_eq!(task.status, TaskStatus::Working);
    let got = session.get_task(GetTaskParams::new(task.task_id.clone())).await.unwrap();
    assert_eq!(got.task.status(), TaskStatus::Working);
    // Task id = execution id = request id.
    assert_eq!(server.caller(F, "alice").data(&task.task_id).await["agent_id"], "worker");

    open_gate(&fixture, "t1");
    let completed = eventually(Duration::from_secs(60), "the task to complete", || async {
        let got = session.get_task(GetTaskParams::new(task.task_id.clone())).await.unwrap();
        got.task.status().is_terminal().then_some(got.task)
    })
    .await;
    match completed.payload {
        TaskPayload::Completed { result } => {
            assert_eq!(result["structuredContent"]["output"], "worked: gate t1", "{result:?}");
            assert!(result["content"][0]["text"].as_str().unwrap().starts_with("worked: gate t1"), "{result:?}");
        }
        other => panic!("expected completed, got {other:?}"),
    }

    // tasks/cancel stops the agent's process.
    let task = call_task("gate never").await;
    let pid_file = fixture.formations.join(F).join("pids").join(&task.task_id);
    let pid: i32 = eventually(Duration::from_secs(30), "the agent to start", || async {
        std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok())
    })
    .await;
    assert!(alive(pid));
    session.cancel_task(CancelTaskParams::new(task.task_id.clone())).await.unwrap();
    eventually(Duration::from_secs(10), "the agent process to be killed", || async { (!alive(pid)).then_some(()) })
        .await;
    let got = session.get_task(GetTaskParams::new(task.task_id.clone())).await.unwrap();
    assert_eq!(got.task.status(), TaskStatus::Cancelled);
    assert_eq!(server.caller(F, "alice").data(&task.task_id).await["status"], "cancelled");
    // Cancelling an ended task, or an unknown one, is a JSON-RPC error naming it.
    let again = session.cancel_task(CancelTaskParams::new(task.task_id.clone())).await.unwrap_err().to_string();
    assert!(again.contains("already ended"), "{again}");
    let unknown = session.get_task(GetTaskParams::new("req_nope")).await.unwrap_err().to_string();
    assert!(unknown.contains("req_nope"), "{unknown}");
}

#[tokio::test]
async fn cancel_execution_kills_the_agent() {
    let fixture = fixture();
    let server = fixture.start();
    let session = connect(&server, "alice", Protocol::Handshake, Client::default()).await;
    let id = start(&session, "worker", "gate never").await;
    let pid_file = fixture.formations.join(F).join("pids").join(&id);
    let pid: i32 = eventually(Duration::from_secs(30), "the agent to start", || async {
        std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok())
    })
    .await;
    let result = call(&session, "cancel_execution", json!({ "execution_id": id })).await;
    assert_eq!(structured(&result)["status"], "cancelled", "{result:?}");
    eventually(Duration::from_secs(10), "the agent process to be killed", || async { (!alive(pid)).then_some(()) })
        .await;
    assert_eq!(structured(&status(&session, &id).await)["status"], "cancelled");
    let again = call(&session, "cancel_execution", json!({ "execution_id": id })).await;
    assert_eq!(again.is_error, Some(true));
    assert_eq!(structured(&again)["error"]["code"], "execution_already_finished");
}

#[tokio::test]
async fn progress_notifications_arrive_while_waiting() {
    let fixture = fixture();
    let server = fixture.start();
    let client = Client::default();
    let session = connect(&server, "alice", Protocol::Handshake, client.clone()).await;
    // rmcp's client sends a `progressToken` with every request.
    let params = CallToolRequestParams::new("worker")
        .with_arguments(args(json!({ "message": "with progress", "wait_seconds": 10 })));
    let result = session.call_tool(params).await.unwrap();
    // Quick enough to end within the wait: the output comes at once.
    let facts = structured(&result);
    assert_eq!(facts["status"], "completed", "{facts}");
    assert_eq!(facts["output"], "worked: with progress");
    let progress = client.progress.lock().unwrap().clone();
    assert!(!progress.is_empty(), "no progress notification arrived");
    assert!(progress.iter().all(|p| p.progress_token == progress[0].progress_token));
    assert!(progress.iter().all(|p| p.total == Some(100.0)));
    assert!(progress.windows(2).all(|w| w[0].progress < w[1].progress), "{progress:?}");
    assert!(progress[0].message.as_deref().unwrap().starts_with("Step 1"), "{progress:?}");
}

#[tokio::test]
async fn keys_users_and_hosts_are_checked() {
    let fixture = fixture();
    let server = Server::start(&fixture, &["--mcp-allowed-host", "mcp.example.com"], &[]);

    // A wrong key, or none, is refused before any MCP message is read.
    let refused = try_connect(&server, "wrong-key", "alice", Protocol::Handshake, Client::default()).await;
    assert!(refused.is_err());
    let raw = |key: Option<&str>, host: Option<&str>| {
        let mut request = server
            .http
            .post(mcp_url(&server))
            .header("Accept", "application/json, text/event-stream")
            .header("Content-Type", "application/json")
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        if let Some(host) = host {
            request = request.header("Host", host);
        }
        request.send()
    };
    let no_key = raw(None, None).await.unwrap();
    assert_eq!(no_key.status(), 401);
    assert_eq!(common::json(no_key).await.1["code"], "missing_api_key");
    let wrong = raw(Some("wrong-key"), None).await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert_eq!(common::json(wrong).await.1["code"], "invalid_api_key");

    // DNS rebinding: a Host outside the listen address and the flag is refused.
    let key = format!("client-{F}");
    assert_eq!(raw(Some(&key), Some("evil.example.com")).await.unwrap().status(), 403);
    assert_ne!(raw(Some(&key), Some("mcp.example.com")).await.unwrap().status(), 403);
    assert_ne!(raw(Some(&key), Some("localhost:1234")).await.unwrap().status(), 403);

    // A body is bounded as on every other route (1 MiB): a ping padded past it
    // is refused with the API's code, on a client of its own (the server
    // closes the connection).
    let padded = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ping"{}}}"#, " ".repeat(1024 * 1024));
    let too_large = reqwest::Client::new()
        .post(mcp_url(&server))
        .header("Accept", "application/json, text/event-stream")
        .header("Content-Type", "application/json")
        .header("Authorization", format!("Bearer {key}"))
        .body(padded)
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(common::json(too_large).await.1["code"], "payload_too_large");

    // Executions belong to formation and user, not to the MCP session.
    let alice = connect(&server, "alice", Protocol::Stateless, Client::default()).await;
    let id = start(&alice, "worker", "gate private").await;
    let bob = connect(&server, "bob", Protocol::Handshake, Client::default()).await;
    let seen = status(&bob, &id).await;
    assert_eq!(seen.is_error, Some(true));
    assert_eq!(structured(&seen)["error"]["code"], "execution_not_found");
    assert!(text(&seen).contains(&id), "{}", text(&seen));
    let cancel = call(&bob, "cancel_execution", json!({ "execution_id": id })).await;
    assert_eq!(structured(&cancel)["error"]["code"], "execution_not_found");
    let listed = call(&bob, "list_executions", json!({})).await;
    assert_eq!(structured(&listed)["count"], 0);
    assert_eq!(server.caller(F, "bob").status(&id).await.0, 404);
    // Alice, in a new session of the other protocol, still sees it.
    let again = connect(&server, "alice", Protocol::Handshake, Client::default()).await;
    assert_eq!(structured(&status(&again, &id).await)["status"], "running");
    open_gate(&fixture, "private");
    assert_eq!(structured(&finished(&again, &id).await)["status"], "completed");
}

#[tokio::test]
async fn bad_arguments_get_clear_errors() {
    let fixture = fixture();
    let server = fixture.start();
    let session = connect(&server, "alice", Protocol::Stateless, Client::default()).await;
    let cases = [
        ("worker", json!({}), "missing_message"),
        ("worker", json!({ "message": "x", "wait_seconds": 11 }), "invalid_wait_seconds"),
        ("worker", json!({ "message": "x", "wait_seconds": -1 }), "invalid_wait_seconds"),
        ("worker", json!({ "message": "x", "wait_seconds": "soon" }), "invalid_wait_seconds"),
        ("worker", json!({ "message": "x", "colour": "red" }), "invalid_arguments"),
        ("worker", json!({ "message": "x", "webhook_url": "not a url" }), "invalid_webhook_url"),
        ("check_execution_status", json!({}), "missing_execution_id"),
        ("check_execution_status", json!({ "execution_id": "req_missing" }), "execution_not_found"),
        ("list_executions", json!({ "limit": 0 }), "invalid_limit"),
        ("list_executions", json!({ "status": "sleeping" }), "invalid_status"),
    ];
    for (tool, arguments, code) in cases {
        let result = call(&session, tool, arguments.clone()).await;
        assert_eq!(result.is_error, Some(true), "{tool} {arguments}");
        let error = &structured(&result)["error"];
        assert_eq!(error["code"], code, "{tool} {arguments}: {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    let unknown = session
        .call_tool(CallToolRequestParams::new("nobody").with_arguments(args(json!({ "message": "x" }))))
        .await
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("unknown tool `nobody`"), "{unknown}");
    assert!(server.caller(F, "alice").list("").await.is_empty(), "nothing was stored");
}

#[tokio::test]
async fn many_executions_run_in_parallel() {
    let fixture = fixture();
    let server = fixture.start();
    let session = Arc::new(connect(&server, "alice", Protocol::Handshake, Client::default()).await);
    const N: usize = 32;
    let started = std::time::Instant::now();
    let calls = (0..N).map(|i| {
        let session = session.clone();
        tokio::spawn(async move { start(&session, "worker", &format!("gate all {i}")).await })
    });
    let mut ids = Vec::new();
    for call in calls {
        ids.push(call.await.unwrap());
    }
    let accepted = started.elapsed();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), N);
    // All are running at once: none can end before the gate opens.
    for id in &ids {
        assert_eq!(structured(&status(&session, id).await)["status"], "running");
    }
    let running = call(&session, "list_executions", json!({ "status": "running", "limit": 100 })).await;
    assert_eq!(structured(&running)["count"], N);
    // `gate all {i}` waits for `gates/all {i}`: open each.
    for i in 0..N {
        open_gate(&fixture, &format!("all {i}"));
    }
    for (i, id) in ids.iter().enumerate() {
        let done = finished(&session, id).await;
        assert_eq!(structured(&done)["output"], format!("worked: gate all {i}"));
    }
    eprintln!("{N} MCP executions accepted in {accepted:?}, all ended in {:?}", started.elapsed());
}

#[tokio::test]
async fn executions_survive_a_kill_and_restart() {
    let fixture = fixture();
    let server = fixture.start();
    let session = connect(&server, "alice", Protocol::Stateless, Client::default()).await;
    let id = start(&session, "worker", "gate restart").await;
    eventually(Duration::from_secs(30), "the agent to start", || async {
        fixture.formations.join(F).join("pids").join(&id).exists().then_some(())
    })
    .await;
    drop(session);
    server.kill();

    open_gate(&fixture, "restart");
    let server = fixture.start();
    let session = connect(&server, "alice", Protocol::Handshake, Client::default()).await;
    let done = finished(&session, &id).await;
    let facts = structured(&done);
    assert_eq!(facts["status"], "completed", "{facts}");
    assert_eq!(facts["output"], "worked: gate restart");
    assert_eq!(server.caller(F, "alice").data(&id).await["attempts"], 2);
}

#[tokio::test]
async fn the_formation_chooses_its_tools_or_no_endpoint() {
    let fixture = fixture();
    fixture.script("narrow/agents/work.py", AGENT);
    fixture.write(
        "narrow/formation.afs",
        &formation_yaml(
            "narrow",
            "mcp:\n  agents: [quick]\nagents:\n  - id: worker\n    command: [\"python3\", \"agents/work.py\"]\n  - id: quick\n    command: [\"python3\", \"agents/work.py\"]\n",
        ),
    );
    fixture.write(
        "closed.afs",
        &formation_yaml("closed", "mcp:\n  enabled: false\nagents:\n  - id: a\n    command: [\"true\"]\n"),
    );
    let server = fixture.start();

    let mut headers = HashMap::new();
    headers.insert(
        reqwest::header::HeaderName::from_static("x-muxi-client-key"),
        reqwest::header::HeaderValue::from_static("client-narrow"),
    );
    let config =
        StreamableHttpClientTransportConfig::with_uri(server.url("/api/narrow/v1/mcp")).custom_headers(headers);
    let session = Client::default()
        .serve_with_lifecycle(StreamableHttpClientTransport::from_config(config), ClientLifecycleMode::Initialize)
        .await
        .unwrap();
    let tools = session.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(names, ["quick", "check_execution_status", "cancel_execution", "list_executions"]);
    let hidden = session
        .call_tool(CallToolRequestParams::new("worker").with_arguments(args(json!({ "message": "x" }))))
        .await
        .unwrap_err()
        .to_string();
    assert!(hidden.contains("unknown tool `worker`"), "{hidden}");

    let closed = server
        .http
        .post(server.url("/api/closed/v1/mcp"))
        .header("X-Muxi-Client-Key", "client-closed")
        .header("Accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 404);
    let (_, body) = common::json(closed).await;
    assert!(body["message"].as_str().unwrap().contains("mcp.enabled"), "{body}");

    // Naming an agent that does not exist is an error at load time.
    let bad = fixture.write(
        "typo.afs",
        &formation_yaml("typo", "mcp:\n  agents: [nobody]\nagents:\n  - id: a\n    command: [\"true\"]\n"),
    );
    let (code, out, _) = common::run_cli(&["validate", bad.to_str().unwrap()], &fixture.formations);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("mcp.agents[0]: no agent `nobody`"), "{out}");
}

#[tokio::test]
async fn an_execution_delivers_its_result_to_its_webhook() {
    let rx = common::receiver::Receiver::start().await;
    let fixture = fixture();
    let server = Server::start(&fixture, &["--allow-webhook-host", "127.0.0.1"], &[]);
    let session = connect(&server, "alice", Protocol::Stateless, Client::default()).await;
    let result = call(&session, "quick", json!({ "message": "hooked", "webhook_url": rx.url("/mcp-done") })).await;
    let id = structured(&result)["execution_id"].as_str().unwrap().to_string();
    let hits = rx.wait_for("/mcp-done", 1, Duration::from_secs(30)).await;
    let event = hits[0].json();
    assert_eq!(event["id"], id.as_str(), "{event}");
    assert_eq!(event["status"], "completed");
    // The payload carries the result in both the MUXI SDK's and the docs' shapes.
    assert!(event.to_string().contains("worked: hooked"), "{event}");
    let alice = server.caller(F, "alice");
    eventually(Duration::from_secs(30), "the delivery to be recorded", || async {
        (alice.data(&id).await["webhook"]["status"] == "delivered").then_some(())
    })
    .await;
}
