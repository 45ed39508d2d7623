//! The processes a run starts: muxi-rt (the release binary, or
//! `MUXI_BENCH_SERVER`) with its formation in a temp dir, and the baselines
//! (this binary re-executed); and what the bench reads off them (/proc).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::{CLIENT_KEY, CONCURRENCY, FORMATION};

/// A temp dir holding the bench formation and a data folder.
pub struct Fixture {
    _root: tempfile::TempDir,
    pub formations: PathBuf,
    pub data: PathBuf,
    /// In the agent's argv and environment; identifies its processes.
    pub marker: String,
}

impl Fixture {
    pub fn new() -> Fixture {
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
pub struct ServerProcess {
    child: Child,
    /// `http://ADDR`.
    pub base: String,
    pub addr: SocketAddr,
    marker: Option<String>,
}

impl ServerProcess {
    pub fn start_muxi(fixture: &Fixture) -> ServerProcess {
        ServerProcess::start_muxi_on(fixture, &fixture.data, None, &[])
    }

    pub fn start_muxi_with(fixture: &Fixture, args: &[&str]) -> ServerProcess {
        ServerProcess::start_muxi_on(fixture, &fixture.data, None, args)
    }

    /// muxi-rt with `data` as its data folder, on PostgreSQL with
    /// `database_url`, with extra `args`. `MUXI_BENCH_SERVER=path/to/muxi-rt`
    /// measures another build (an older commit, say) with the same load.
    pub fn start_muxi_on(fixture: &Fixture, data: &Path, database_url: Option<&str>, args: &[&str]) -> ServerProcess {
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

    /// A baseline server of `kind` (see `baseline.rs`) with `env` set.
    pub fn start_baseline(kind: &str, env: &[(&str, &str)]) -> ServerProcess {
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command.env("MUXI_BENCH_BASELINE", kind).envs(env.iter().copied());
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
            Ok(base) => {
                let addr = base.trim_start_matches("http://").parse().expect("a listening address");
                ServerProcess { child, base, addr, marker }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        }
    }

    pub fn pid(&self) -> u32 {
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
pub fn agent_groups(marker: &str) -> Vec<i32> {
    marked_pids(marker).into_iter().filter(|&pid| unsafe { libc::getpgid(pid) } == pid).collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// VmRSS in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server is alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS line")
        * 1024
}

/// CPU time (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / per_second))
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The kind of filesystem the data folder is on (fsync is free on tmpfs).
pub fn fs_kind(path: &Path) -> &'static str {
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
