//! The engine benchmark of issue 3: `cargo bench --bench engine`.
//!
//! It prints figures; it never fails on a missed target (timing belongs in a
//! benchmark compared with a baseline measured in the same run, not in tests).
//!
//! # Method
//!
//! * **Servers are real processes.** muxi-rt is the release binary
//!   (`CARGO_BIN_EXE_muxi-rt`) run as `serve DIR --listen 127.0.0.1:0
//!   --data-dir DIR` with `MUXI_LOG=warn`, so every accepted request goes
//!   through the durable store (SQLite WAL, synchronous=FULL, group commit)
//!   before its 202. The **baseline** is this same bench binary re-executed
//!   with `MUXI_BENCH_BASELINE=1`: a bare axum server on a default
//!   multi-thread tokio runtime (as muxi-rt uses), with the same route shapes,
//!   whose handlers only read the request and return a small JSON body. Both
//!   print `... listening on http://ADDR`, which is how the bench finds them.
//! * **The formation** (written into a temp dir) has fixed keys,
//!   `async: {mode: async}`, `max_concurrent_requests: 64`, and one agent that
//!   runs `sleep 600`. So nothing finishes during the run: "in flight" means
//!   accepted and not finished; 64 of them run (sleeping processes), the rest
//!   wait in the engine's queue. The agent carries a unique marker (in its
//!   argv and its environment) so the bench can kill exactly its own leftover
//!   agent processes once the server has been SIGKILLed.
//! * **The load generator** is tokio + one shared reqwest client (keep-alive
//!   connections): 64 tasks, each sending its share of N requests one after
//!   another and recording each latency (send to last body byte). Throughput
//!   is N / wall time; p50/p99 are over all N latencies. Each measured phase
//!   is preceded by a short warm-up against the same server. A baseline phase
//!   uses the same client, concurrency, N, method and body as its target.
//!   Target and baseline are measured in alternating rounds (B T, T B, ...;
//!   `MUXI_BENCH_ROUNDS`, default 4) so that load from other processes on a
//!   shared machine falls on both sides alike; each side's figures are over
//!   all its rounds.
//! * **Phases.** (1) accept: `POST /api/bench/v1/chat` with
//!   `{"message": ..., "async": true}` vs the baseline POST; (2) status polls:
//!   `GET /api/bench/v1/requests/{id}` cycling over the ids accepted in (1),
//!   with the client key and `X-Muxi-User-ID`, vs the baseline GET; (3) RSS:
//!   a fresh muxi-rt server, VmRSS at idle, then after accepting exactly
//!   10,000 async requests (from `/proc/<pid>/status`); (4) metrics cost: the
//!   accept phase against two fresh servers, `--no-metrics` and metrics on,
//!   in alternating rounds; (5) an MCP tool call to its execution id beside
//!   HTTP accept at 16 callers; (6) durable accept on PostgreSQL
//!   (`MUXI_BENCH_DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/test`, in a fresh schema dropped
//!   after): the same POST against one replica, then split over two replicas
//!   of one schema; skipped with a note when PostgreSQL cannot be reached.
//!
//! N defaults to 20,000 per phase; `MUXI_BENCH_REQUESTS=N` changes it (the RSS
//! phase always accepts 10,000). `MUXI_BENCH_SERVER=PATH` measures another
//! muxi-rt binary (an older build) against the same baseline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CONCURRENCY: usize = 64;
/// Concurrent callers of the MCP phase (issue 9: 16).
const MCP_CALLERS: usize = 16;
const IN_FLIGHT_TARGET: usize = 10_000;
const FORMATION: &str = "bench";
const CLIENT_KEY: &str = "client-bench-0123456789";
const USER: &str = "bench-user";
const CHAT_BODY: &str = r#"{"message": "summarise the benchmark please", "async": true}"#;

/// The issue's targets.
const ACCEPT_TARGET: f64 = 0.50;
const POLL_TARGET: f64 = 0.70;
const RSS_TARGET_BYTES: u64 = 150_000_000;

fn main() {
    if std::env::var_os("MUXI_BENCH_BASELINE").is_some() {
        baseline::serve();
        return;
    }
    // `cargo bench` passes `--bench` (and any filter); there is only one benchmark.
    let requests = std::env::var("MUXI_BENCH_REQUESTS")
        .ok()
        .map(|v| v.parse::<usize>().expect("MUXI_BENCH_REQUESTS must be a number"))
        .unwrap_or(20_000)
        .max(CONCURRENCY);
    let rounds = std::env::var("MUXI_BENCH_ROUNDS")
        .ok()
        .map(|v| v.parse::<usize>().expect("MUXI_BENCH_ROUNDS must be a number"))
        .unwrap_or(4)
        .clamp(1, requests / CONCURRENCY);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run(requests, rounds));
}

async fn run(n: usize, rounds: usize) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http client");
    let warmup = (n / 20).clamp(CONCURRENCY, 1_000);
    let load_before = loadavg();
    eprintln!("engine bench: {n} requests per phase in {rounds} rounds, {CONCURRENCY} clients, warm-up {warmup}");

    // -- Phases 1 and 2: one muxi-rt server, one baseline server. -------------
    let baseline = ServerProcess::start_baseline();
    let fixture = Fixture::new();
    let muxi = ServerProcess::start_muxi(&fixture);
    let chat_path = format!("/api/{FORMATION}/v1/chat");

    eprintln!("phase 1: accept (alternating baseline and muxi-rt)");
    let post = |base: &str| {
        let url = format!("{base}{chat_path}");
        let client = client.clone();
        move |_: usize| {
            client
                .post(&url)
                .header("content-type", "application/json")
                .header("X-Muxi-Client-Key", CLIENT_KEY)
                .header("X-Muxi-User-ID", USER)
                .body(CHAT_BODY)
        }
    };
    load(warmup, 200, post(&baseline.base)).await;
    let warm_ids = load(warmup, 202, post(&muxi.base)).await.ids;
    let (base_post, accept) = compare(n, rounds, (200, post(&baseline.base)), (202, post(&muxi.base))).await;
    let accepted_a = warm_ids.len() + accept.ids.len();

    eprintln!("phase 2: status polls (alternating baseline and muxi-rt)");
    let ids: Arc<Vec<String>> = Arc::new(accept.ids.clone());
    assert!(!ids.is_empty(), "no request was accepted; cannot poll");
    let get = |base: &str| {
        let base = base.to_string();
        let client = client.clone();
        let ids = ids.clone();
        move |i: usize| {
            client
                .get(format!("{base}/api/{FORMATION}/v1/requests/{}", ids[i % ids.len()]))
                .header("X-Muxi-Client-Key", CLIENT_KEY)
                .header("X-Muxi-User-ID", USER)
        }
    };
    load(warmup, 200, get(&baseline.base)).await;
    load(warmup, 200, get(&muxi.base)).await;
    let (base_get, polls) = compare(n, rounds, (200, get(&baseline.base)), (200, get(&muxi.base))).await;
    let rss_a = rss(muxi.pid());
    drop(muxi); // SIGKILL, then its agents
    drop(baseline);

    // -- Phase 3: RSS with 10,000 in flight, on a fresh server. ---------------
    eprintln!("phase 3: RSS with {IN_FLIGHT_TARGET} requests in flight");
    let fixture_b = Fixture::new();
    let muxi_b = ServerProcess::start_muxi(&fixture_b);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss(muxi_b.pid());
    let fill = load(IN_FLIGHT_TARGET, 202, post(&muxi_b.base)).await;
    // Let the workers start their 64 agents before measuring.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut running = agent_groups(&fixture_b.marker).len();
    while running < CONCURRENCY.min(fill.ids.len()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        running = agent_groups(&fixture_b.marker).len();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    running = agent_groups(&fixture_b.marker).len();
    let loaded = rss(muxi_b.pid());
    drop(muxi_b);

    // -- Phase 4: accept with metrics off and on, alternating. ------------------
    eprintln!("phase 4: accept with metrics off (--no-metrics) vs on");
    let (fixture_off, fixture_on) = (Fixture::new(), Fixture::new());
    let metrics_off = ServerProcess::start_muxi_with(&fixture_off, &["--no-metrics"]);
    let metrics_on = ServerProcess::start_muxi(&fixture_on);
    load(warmup, 202, post(&metrics_off.base)).await;
    load(warmup, 202, post(&metrics_on.base)).await;
    let (accept_off, accept_on) =
        compare(n, rounds, (202, post(&metrics_off.base)), (202, post(&metrics_on.base))).await;
    drop(metrics_on);
    drop(metrics_off);

    // -- Phase 5: an MCP tool call -> execution id, beside HTTP accept. -------
    eprintln!("phase 5: MCP tool call vs HTTP accept, {MCP_CALLERS} callers");
    let fixture_mcp = Fixture::new();
    let mcp_server = ServerProcess::start_muxi(&fixture_mcp);
    let mcp_n = (n / 4).max(MCP_CALLERS * 20);
    load_at(MCP_CALLERS, warmup, 202, post(&mcp_server.base)).await;
    mcp_load(&mcp_server.base, MCP_CALLERS, warmup).await;
    let http_16 = load_at(MCP_CALLERS, mcp_n, 202, post(&mcp_server.base)).await;
    let mcp_16 = mcp_load(&mcp_server.base, MCP_CALLERS, mcp_n).await;
    drop(mcp_server);

    let postgres = postgres_phase(n, warmup, &post).await;

    report(Report {
        postgres,
        n,
        rounds,
        warmup,
        load_before,
        load_after: loadavg(),
        accept,
        base_post,
        polls,
        base_get,
        accepted_a,
        rss_a,
        fill,
        running,
        idle,
        loaded,
        data_fs: fs_kind(&fixture.data),
    });
    let (off, on) = (accept_off.throughput(), accept_on.throughput());
    println!(
        "\nmetrics cost (phase 4, same run): accept {on:.0} req/s with metrics on, {off:.0} req/s off: {:.1}% of off \
         (p50 {:.2} / {:.2} ms, p99 {:.2} / {:.2} ms; errors {} / {})",
        100.0 * on / off.max(f64::MIN_POSITIVE),
        accept_on.percentile_ms(0.50),
        accept_off.percentile_ms(0.50),
        accept_on.percentile_ms(0.99),
        accept_off.percentile_ms(0.99),
        accept_on.errors,
        accept_off.errors,
    );
    println!(
        "\nMCP (phase 5, same run, {MCP_CALLERS} callers, {} calls each side): tool call -> execution id \
         {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms (errors {}); HTTP async accept {:.0} req/s, p50 {:.2} ms, \
         p99 {:.2} ms (errors {})",
        mcp_n,
        mcp_16.throughput(),
        mcp_16.percentile_ms(0.50),
        mcp_16.percentile_ms(0.99),
        mcp_16.errors,
        http_16.throughput(),
        http_16.percentile_ms(0.50),
        http_16.percentile_ms(0.99),
        http_16.errors,
    );
}

/// `callers` MCP clients (rmcp, the handshake protocol, one session each) each
/// calling the agent tool in turn; a call's latency is until its answer with
/// the execution id.
async fn mcp_load(base: &str, callers: usize, n: usize) -> Phase {
    use rmcp::model::CallToolRequestParams;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::{ClientLifecycleMode, ClientServiceExt};

    let url = format!("{base}/api/{FORMATION}/v1/mcp");
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|task| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut headers = std::collections::HashMap::new();
                headers.insert(
                    reqwest::header::HeaderName::from_static("x-muxi-user-id"),
                    reqwest::header::HeaderValue::from_static(USER),
                );
                let config =
                    StreamableHttpClientTransportConfig::with_uri(url).auth_header(CLIENT_KEY).custom_headers(headers);
                let transport = StreamableHttpClientTransport::from_config(config);
                let session =
                    ().serve_with_lifecycle(transport, ClientLifecycleMode::Initialize).await.expect("MCP session");
                let mut latencies = Vec::new();
                let (mut errors, mut first_error) = (0, None);
                for _ in (task..n).step_by(callers) {
                    let arguments = json!({ "message": "summarise the benchmark please" });
                    let params =
                        CallToolRequestParams::new("sleeper").with_arguments(arguments.as_object().unwrap().clone());
                    let sent = Instant::now();
                    let result = session.call_tool(params).await;
                    latencies.push(sent.elapsed());
                    match result {
                        Ok(result)
                            if result.structured_content.as_ref().is_some_and(|v| v["execution_id"].is_string()) => {}
                        Ok(result) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{result:?}"));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                let _ = session.cancel().await;
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut phase = Phase { n, latencies: Vec::with_capacity(n), ..Phase::empty() };
    for task in tasks {
        let (latencies, errors, first_error) = task.await.expect("MCP task");
        phase.latencies.extend(latencies);
        phase.errors += errors;
        phase.first_error = phase.first_error.take().or(first_error);
    }
    phase.wall = start.elapsed();
    phase.latencies.sort_unstable();
    if let Some(e) = &phase.first_error {
        eprintln!("  {} of {n} MCP calls failed; first: {e}", phase.errors);
    }
    phase
}

// ---------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------

/// The outcome of one load phase.
struct Phase {
    n: usize,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    /// `data.request_id` of each 202 answer (accept phases only).
    ids: Vec<String>,
}

impl Phase {
    fn empty() -> Phase {
        Phase { n: 0, errors: 0, first_error: None, wall: Duration::ZERO, latencies: Vec::new(), ids: Vec::new() }
    }

    /// Adds another round of the same phase.
    fn absorb(&mut self, other: Phase) {
        self.n += other.n;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.wall += other.wall;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        self.ids.extend(other.ids);
    }

    fn throughput(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1e3
    }
}

/// Measures a target against its baseline in `rounds` alternating rounds
/// (baseline then target, target then baseline, ...) of about `n / rounds`
/// requests each, so that a burst of load from elsewhere on a shared machine
/// hits both sides alike. Each side's figures are over all its rounds:
/// throughput = its `n` requests / the sum of its rounds' wall times.
async fn compare<B, T>(n: usize, rounds: usize, baseline: (u16, B), target: (u16, T)) -> (Phase, Phase)
where
    B: Fn(usize) -> reqwest::RequestBuilder + Clone + Send + Sync + 'static,
    T: Fn(usize) -> reqwest::RequestBuilder + Clone + Send + Sync + 'static,
{
    let (mut base_total, mut target_total) = (Phase::empty(), Phase::empty());
    for round in 0..rounds {
        let offset = round * (n / rounds);
        let count = if round + 1 == rounds { n - offset } else { n / rounds };
        let (b, t) = (baseline.1.clone(), target.1.clone());
        let run_base = || load(count, baseline.0, move |i| b(offset + i));
        let run_target = || load(count, target.0, move |i| t(offset + i));
        if round % 2 == 0 {
            base_total.absorb(run_base().await);
            target_total.absorb(run_target().await);
        } else {
            target_total.absorb(run_target().await);
            base_total.absorb(run_base().await);
        }
    }
    (base_total, target_total)
}

/// Sends `n` requests from [`CONCURRENCY`] tasks; request `i` is built by
/// `make(i)`. A response whose status is not `expect` counts as an error.
async fn load<F>(n: usize, expect: u16, make: F) -> Phase
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    load_at(CONCURRENCY, n, expect, make).await
}

/// [`load`] with `concurrency` clients.
async fn load_at<F>(concurrency: usize, n: usize, expect: u16, make: F) -> Phase
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(n / concurrency + 1);
                let mut ids = Vec::new();
                let mut errors = 0;
                let mut first_error = None;
                for i in (task..n).step_by(concurrency) {
                    let sent = Instant::now();
                    let outcome = match make(i).send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            response.bytes().await.map(|body| (status, body))
                        }
                        Err(e) => Err(e),
                    };
                    latencies.push(sent.elapsed());
                    match outcome {
                        Ok((status, body)) if status == expect => {
                            if status == 202 {
                                if let Some(id) = request_id(&body) {
                                    ids.push(id);
                                }
                            }
                        }
                        Ok((status, body)) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (latencies, ids, errors, first_error)
            })
        })
        .collect();
    let mut phase = Phase { n, latencies: Vec::with_capacity(n), ..Phase::empty() };
    for task in tasks {
        let (latencies, ids, errors, first_error) = task.await.expect("load task");
        phase.latencies.extend(latencies);
        phase.ids.extend(ids);
        phase.errors += errors;
        if phase.first_error.is_none() {
            phase.first_error = first_error;
        }
    }
    phase.wall = start.elapsed();
    phase.latencies.sort_unstable();
    if let Some(e) = &phase.first_error {
        eprintln!("  {} of {n} requests failed; first: {e}", phase.errors);
    }
    phase
}

fn request_id(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value["data"]["request_id"].as_str().map(str::to_string)
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// A temp dir holding the bench formation and a data folder.
struct Fixture {
    _root: tempfile::TempDir,
    formations: PathBuf,
    data: PathBuf,
    /// In the agent's argv and environment; identifies its processes.
    marker: String,
}

impl Fixture {
    fn new() -> Fixture {
        let root = tempfile::Builder::new().prefix("muxi-bench-").tempdir().expect("temp dir");
        let formations = root.path().join("formations");
        let data = root.path().join("data");
        let marker = format!("muxi-bench-{}", uuid::Uuid::new_v4().simple());
        std::fs::create_dir_all(formations.join(FORMATION)).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let formation = format!(
            r#"schema: "1.0.0"
id: {FORMATION}
description: muxi-rt engine benchmark
version: "1.0.0"
server:
  api_keys:
    admin_key: admin-bench-0123456789
    client_key: {CLIENT_KEY}
async:
  mode: async
overlord:
  max_concurrent_requests: {CONCURRENCY}
  workflow:
    timeouts: {{task_timeout: 3600, workflow_timeout: 7200}}
agents:
  - id: sleeper
    default: true
    estimated_seconds: 600
    command: ["sh", "-c", "sleep 600", "{marker}"]
    env:
      MUXI_BENCH_MARKER: "{marker}"
"#
        );
        std::fs::write(formations.join(FORMATION).join("formation.afs"), formation).unwrap();
        Fixture { _root: root, formations, data, marker }
    }
}

/// A server child process; SIGKILLed on drop, then its agents (if any) too.
struct ServerProcess {
    child: Child,
    base: String,
    marker: Option<String>,
}

impl ServerProcess {
    fn start_muxi(fixture: &Fixture) -> ServerProcess {
        ServerProcess::start_muxi_on(fixture, &fixture.data, None, &[])
    }

    fn start_muxi_with(fixture: &Fixture, args: &[&str]) -> ServerProcess {
        ServerProcess::start_muxi_on(fixture, &fixture.data, None, args)
    }

    /// muxi-rt with `data` as its data folder, on PostgreSQL with
    /// `database_url`, with extra `args`. `MUXI_BENCH_SERVER=path/to/muxi-rt`
    /// measures another build (an older commit, say) with the same load.
    fn start_muxi_on(fixture: &Fixture, data: &Path, database_url: Option<&str>, args: &[&str]) -> ServerProcess {
        let binary = std::env::var_os("MUXI_BENCH_SERVER").unwrap_or_else(|| env!("CARGO_BIN_EXE_muxi-rt").into());
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg(&fixture.formations)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("MUXI_LOG", "warn")
            .env_remove("MUXI_LISTEN")
            .env_remove("MUXI_DATA_DIR")
            .env_remove("MUXI_DATABASE_URL");
        if let Some(url) = database_url {
            command.env("MUXI_DATABASE_URL", url);
        }
        ServerProcess::start(command, Some(fixture.marker.clone()))
    }

    fn start_baseline() -> ServerProcess {
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command.env("MUXI_BENCH_BASELINE", "1");
        ServerProcess::start(command, None)
    }

    fn start(mut command: Command, marker: Option<String>) -> ServerProcess {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("server starts");
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                eprintln!("  [server] {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keeps draining stdout after the address line.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, url)) = line.split_once(" listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => ServerProcess { child, base, marker },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(marker) = &self.marker {
            // The server is gone, so no new agent can start; kill every process
            // that carries this run's marker (agents run in their own groups).
            for _ in 0..3 {
                let pids = marked_pids(marker);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    // SAFETY: kill only sends a signal, to a process of ours that carries our marker.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Pids of live processes whose command line or environment holds `marker`.
fn marked_pids(marker: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let needle = marker.as_bytes();
    let contains = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid as u32 != std::process::id())
        .filter(|pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
            contains(&cmdline) || contains(&environ)
        })
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

/// Running agents: marked processes that lead their own process group (each
/// agent is started in a group of its own; `sh` may fork `sleep` into it).
fn agent_groups(marker: &str) -> Vec<i32> {
    marked_pids(marker).into_iter().filter(|&pid| unsafe { libc::getpgid(pid) } == pid).collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// VmRSS in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server is alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS line")
        * 1024
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The kind of filesystem the data folder is on (fsync is free on tmpfs).
fn fs_kind(path: &Path) -> &'static str {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "unknown";
    }
    match s.f_type as i64 {
        0xEF53 => "ext4",
        0x0102_1994 => "tmpfs (fsync is free: durable figures are flattered)",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlayfs",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Report {
    n: usize,
    rounds: usize,
    warmup: usize,
    load_before: String,
    load_after: String,
    accept: Phase,
    base_post: Phase,
    polls: Phase,
    base_get: Phase,
    accepted_a: usize,
    rss_a: u64,
    fill: Phase,
    running: usize,
    idle: u64,
    loaded: u64,
    data_fs: &'static str,
    /// Phase 4: (one replica, two replicas), if PostgreSQL was reachable.
    postgres: Option<(Phase, Phase)>,
}

/// Phase 4: accept on PostgreSQL, one replica, then two sharing the schema.
async fn postgres_phase<P, F>(n: usize, warmup: usize, post: &P) -> Option<(Phase, Phase)>
where
    P: Fn(&str) -> F,
    F: Fn(usize) -> reqwest::RequestBuilder + Clone + Send + Sync + 'static,
{
    use sqlx::Connection;
    let base = std::env::var("MUXI_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let mut admin = match sqlx::PgConnection::connect(&base).await {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("phase 4 skipped: cannot reach PostgreSQL ({e}); set MUXI_BENCH_DATABASE_URL");
            return None;
        }
    };
    let schema = format!("muxi_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut admin).await.expect("create the bench schema");
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let fixture = Fixture::new();

    eprintln!("phase 4: accept on PostgreSQL, one replica");
    let one = ServerProcess::start_muxi_on(&fixture, &fixture.data.join("r1"), Some(&url), &[]);
    load(warmup, 202, post(&one.base)).await;
    let single = load(n, 202, post(&one.base)).await;
    eprintln!("phase 4: accept on PostgreSQL, two replicas");
    let two = ServerProcess::start_muxi_on(&fixture, &fixture.data.join("r2"), Some(&url), &[]);
    load(warmup, 202, post(&two.base)).await;
    let (to_one, to_two) = (post(&one.base), post(&two.base));
    let both = load(n, 202, move |i: usize| if i % 2 == 0 { to_one(i) } else { to_two(i) }).await;
    drop(two);
    drop(one);
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut admin).await;
    Some((single, both))
}

fn report(r: Report) {
    let mb = |b: u64| b as f64 / 1e6;
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!();
    println!("muxi-rt engine benchmark");
    println!(
        "  {CONCURRENCY} concurrent clients (keep-alive); N = {} requests per phase, in {} rounds alternating with the baseline,",
        r.n, r.rounds
    );
    println!("  after {} warm-up; {cpus} CPUs; load average {} -> {}", r.warmup, r.load_before, r.load_after);
    println!("  data folder on {}; SQLite WAL, synchronous=FULL, group commit (the real server)", r.data_fs);
    println!();
    println!("  {:<44} {:>10} {:>9} {:>9} {:>7}", "phase", "req/s", "p50 ms", "p99 ms", "errors");
    let row = |name: &str, p: &Phase| {
        println!(
            "  {:<44} {:>10.0} {:>9.2} {:>9.2} {:>7}",
            name,
            p.throughput(),
            p.percentile_ms(0.50),
            p.percentile_ms(0.99),
            p.errors
        );
    };
    row("POST /api/{id}/v1/chat async=true (muxi-rt)", &r.accept);
    row("POST baseline (bare axum, small JSON)", &r.base_post);
    row("GET /api/{id}/v1/requests/{rid} (muxi-rt)", &r.polls);
    row("GET baseline (bare axum, small JSON)", &r.base_get);
    match &r.postgres {
        Some((one, two)) => {
            row("POST chat async on PostgreSQL, 1 replica", one);
            row("POST chat async on PostgreSQL, 2 replicas", two);
        }
        None => println!("  (PostgreSQL accept not measured: PostgreSQL unreachable)"),
    }
    println!();

    let accept_ratio = r.accept.throughput() / r.base_post.throughput();
    let poll_ratio = r.polls.throughput() / r.base_get.throughput();
    let per_request = r.loaded.saturating_sub(r.idle) as f64 / r.fill.ids.len().max(1) as f64;
    println!("  {:<44} {:>16} {:>12}", "target (issue 3)", "measured", "target");
    println!(
        "  {:<44} {:>15.1}% {:>12}  {}",
        "accept throughput / baseline",
        accept_ratio * 100.0,
        ">= 50%",
        verdict(accept_ratio >= ACCEPT_TARGET)
    );
    println!(
        "  {:<44} {:>15.1}% {:>12}  {}",
        "status poll throughput / baseline",
        poll_ratio * 100.0,
        ">= 70%",
        verdict(poll_ratio >= POLL_TARGET)
    );
    println!(
        "  {:<44} {:>13.1} MB {:>12}  {}",
        format!("RSS with {} in flight", r.fill.ids.len()),
        mb(r.loaded),
        "< 150 MB",
        verdict(r.loaded < RSS_TARGET_BYTES && r.fill.ids.len() >= IN_FLIGHT_TARGET)
    );
    println!();
    println!(
        "  RSS (fresh server): idle {:.1} MB; after accepting {} async requests {:.1} MB",
        mb(r.idle),
        r.fill.ids.len(),
        mb(r.loaded)
    );
    println!(
        "    = {:.1} KB per request in flight; {} agents running (sleep 600), {} pending in the queue, none finished",
        per_request / 1e3,
        r.running,
        r.fill.ids.len().saturating_sub(r.running)
    );
    println!("    (filled at {:.0} req/s; {} errors)", r.fill.throughput(), r.fill.errors);
    println!("  RSS of the phase 1-2 server at its end: {:.1} MB with {} in flight", mb(r.rss_a), r.accepted_a);
    println!("  MB = 10^6 bytes. In flight = accepted and not finished: the only agent runs `sleep 600`,");
    println!("  so {CONCURRENCY} requests run (max_concurrent_requests) and the rest wait in the queue.");
    println!("  Targets are informative: a MISS never fails the bench.");
}

// ---------------------------------------------------------------------------
// Baseline server
// ---------------------------------------------------------------------------

mod baseline {
    use super::*;
    use axum::extract::Path;
    use axum::routing::{get, post};
    use axum::{Json, Router};

    /// A bare axum server with muxi-rt's route shapes; handlers read the request
    /// and answer a small JSON body. Runs until killed.
    pub fn serve() {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        runtime.block_on(async {
            let app = Router::new()
                .route(
                    "/api/{id}/v1/chat",
                    post(|Path(id): Path<String>, body: bytes::Bytes| async move {
                        Json(json!({"ok": true, "formation": id, "received": body.len()}))
                    }),
                )
                .route(
                    "/api/{id}/v1/requests/{request_id}",
                    get(|Path((id, request_id)): Path<(String, String)>| async move {
                        Json(json!({"ok": true, "formation": id, "request_id": request_id}))
                    }),
                );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            println!("baseline listening on http://{}", listener.local_addr().unwrap());
            axum::serve(listener, app).await.expect("serve");
        });
    }
}
