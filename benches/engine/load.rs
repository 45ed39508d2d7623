//! The load generator: a lean HTTP/1.1 client in the manner of `wrk -t1`.
//!
//! Every load phase runs on ONE thread (a current-thread tokio runtime of its
//! own), with one keep-alive TCP connection per caller. A caller writes its
//! request's bytes, reads one answer (status line, headers, a body of
//! `Content-Length` bytes or chunked), and records the latency from the first
//! byte written to the last byte read. Requests are prepared as bytes up front,
//! so the generator spends its time on the socket, not on building requests:
//! the server under test gets the rest of the machine, as it would under wrk.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The outcome of one load phase.
pub struct Phase {
    pub n: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub wall: Duration,
    /// Sorted.
    pub latencies: Vec<Duration>,
    /// `data.request_id` of each 202 answer (accept phases only).
    pub ids: Vec<String>,
    /// CPU time (user + system) the server process spent during the phase,
    /// where measured ([`compare`]).
    pub server_cpu: Option<Duration>,
    /// Throughput of each round, in order ([`compare`]).
    pub rounds: Vec<f64>,
    /// CPU time the load thread itself spent: the client's share of the machine.
    pub client_cpu: Duration,
}

impl Phase {
    pub fn empty() -> Phase {
        Phase {
            n: 0,
            errors: 0,
            first_error: None,
            wall: Duration::ZERO,
            latencies: Vec::new(),
            ids: Vec::new(),
            server_cpu: None,
            rounds: Vec::new(),
            client_cpu: Duration::ZERO,
        }
    }

    /// Adds another round of the same phase.
    pub fn absorb(&mut self, other: Phase) {
        self.n += other.n;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.wall += other.wall;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        self.ids.extend(other.ids);
        self.rounds.extend(other.rounds);
        self.client_cpu += other.client_cpu;
        self.server_cpu = match (self.server_cpu, other.server_cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }

    /// The server's CPU time per request, microseconds: a steadier figure than
    /// throughput on a machine whose speed drifts between rounds.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        self.server_cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / self.n.max(1) as f64)
    }

    /// The load thread's CPU time per request, microseconds.
    pub fn client_us_per_request(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.n.max(1) as f64
    }

    pub fn throughput(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1e3
    }
}

/// Requests to send: `make(i)` is request `i`'s bytes and the server it goes to.
pub type Make = Arc<dyn Fn(usize) -> (SocketAddr, Arc<[u8]>) + Send + Sync>;

/// A request's bytes: `method path` with `headers`, and `body` if any.
pub fn request(method: &str, host: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Arc<[u8]> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes().into()
}

/// Measures several servers in `rounds` rounds of about `n / rounds` requests
/// each, rotating which one goes first (A B C, B C A, ...), so that a burst of
/// load from elsewhere on a shared machine hits all of them alike. Each side's
/// figures are over all its rounds: throughput = its `n` requests / the sum of
/// its rounds' wall times. `sides` are (expected status, requests, the pid of
/// the server process, whose CPU time is measured around each round).
pub async fn compare(n: usize, rounds: usize, sides: &[(u16, Make, u32)]) -> Vec<Phase> {
    let mut totals: Vec<Phase> = sides.iter().map(|_| Phase::empty()).collect();
    for round in 0..rounds {
        let offset = round * (n / rounds);
        let count = if round + 1 == rounds { n - offset } else { n / rounds };
        for turn in 0..sides.len() {
            let side = (round + turn) % sides.len();
            let (expect, make, pid) = (sides[side].0, sides[side].1.clone(), sides[side].2);
            let shifted: Make = Arc::new(move |i| make(offset + i));
            let before = super::servers::cpu_time(pid);
            let mut round = load(count, expect, shifted).await;
            round.server_cpu = before.zip(super::servers::cpu_time(pid)).map(|(a, b)| b.saturating_sub(a));
            round.rounds = vec![round.throughput()];
            totals[side].absorb(round);
        }
    }
    totals
}

/// Sends `n` requests from [`super::CONCURRENCY`] callers.
pub async fn load(n: usize, expect: u16, make: Make) -> Phase {
    load_at(super::CONCURRENCY, n, expect, make).await
}

/// Sends `n` requests from `callers` connections on one thread; caller `c`
/// sends requests `c, c + callers, ...`. An answer whose status is not
/// `expect` counts as an error.
pub async fn load_at(callers: usize, n: usize, expect: u16, make: Make) -> Phase {
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("load runtime");
        let cpu_before = thread_cpu();
        let mut phase = runtime.block_on(run(callers, n, expect, make));
        phase.client_cpu = thread_cpu().saturating_sub(cpu_before);
        phase
    });
    tokio::task::spawn_blocking(move || thread.join().expect("load thread")).await.expect("load join")
}

async fn run(callers: usize, n: usize, expect: u16, make: Make) -> Phase {
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers.min(n))
        .map(|caller| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut out = Caller::default();
                let mut connection: Option<(SocketAddr, Connection)> = None;
                for i in (caller..n).step_by(callers) {
                    let (addr, bytes) = make(i);
                    let sent = Instant::now();
                    let answer = async {
                        if connection.as_ref().is_none_or(|(at, _)| *at != addr) {
                            connection = Some((addr, Connection::open(addr).await?));
                        }
                        connection.as_mut().expect("connected").1.exchange(&bytes).await
                    }
                    .await;
                    out.latencies.push(sent.elapsed());
                    match answer {
                        Ok((status, body)) if status == expect => {
                            if status == 202 {
                                out.ids.extend(request_id(&body));
                            }
                        }
                        Ok((status, body)) => {
                            out.errors += 1;
                            out.first_error
                                .get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
                        }
                        Err(e) => {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| e.to_string());
                            connection = None;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut phase = Phase { n, latencies: Vec::with_capacity(n), ..Phase::empty() };
    for task in tasks {
        let caller = task.await.expect("load task");
        phase.latencies.extend(caller.latencies);
        phase.ids.extend(caller.ids);
        phase.errors += caller.errors;
        phase.first_error = phase.first_error.take().or(caller.first_error);
    }
    phase.wall = start.elapsed();
    phase.latencies.sort_unstable();
    if let Some(e) = &phase.first_error {
        eprintln!("  {} of {n} requests failed; first: {e}", phase.errors);
    }
    phase
}

#[derive(Default)]
struct Caller {
    latencies: Vec<Duration>,
    ids: Vec<String>,
    errors: usize,
    first_error: Option<String>,
}

/// One keep-alive connection and its read buffer.
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, buffer: Vec::with_capacity(4096) })
    }

    /// Sends one request and reads its whole answer: (status, body).
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        let head_end = loop {
            if let Some(at) = find(&self.buffer, b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buffer[..head_end]).map_err(invalid)?;
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| invalid("status line"))?;
        let header = |name: &str| {
            head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
            })
        };
        let body = if let Some(length) = header("content-length") {
            let length: usize = length.parse().map_err(|_| invalid("content-length"))?;
            while self.buffer.len() < head_end + length {
                self.fill().await?;
            }
            let body = self.buffer[head_end..head_end + length].to_vec();
            self.buffer.drain(..head_end + length);
            body
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            self.buffer.drain(..head_end);
            self.chunked().await?
        } else {
            return Err(invalid("an answer with neither content-length nor chunked encoding"));
        };
        Ok((status, body))
    }

    async fn chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = find(&self.buffer, b"\r\n") {
                    break at;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buffer[..line_end]).map_err(invalid)?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid("chunk size"))?;
            while self.buffer.len() < line_end + 2 + size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buffer[line_end + 2..line_end + 2 + size]);
            self.buffer.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let read = self.stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(())
    }
}

/// The CPU time this thread has spent so far.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write to; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer: {what}"))
}

/// `data.request_id` of a 202, found as wrk would: a search of the bytes, not a
/// JSON tree (which cost the one load thread more than a request's round trip).
fn request_id(body: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"request_id\":\"";
    let start = find(body, KEY)? + KEY.len();
    let len = body[start..].iter().position(|&b| b == b'"')?;
    String::from_utf8(body[start..start + len].to_vec()).ok()
}
