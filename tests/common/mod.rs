//! The one test-server helper every integration test goes through: it starts the
//! real `muxi-rt` binary on 127.0.0.1:0 against temporary folders, finds its
//! port, and speaks to it over real HTTP.
#![allow(dead_code)]

pub mod browser;
pub mod postgres;
pub mod pty;
pub mod receiver;
pub mod sse;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A folder of formations and a data folder, kept for the test's life.
pub struct Fixture {
    _root: tempfile::TempDir,
    pub formations: PathBuf,
    pub data: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let root = tempfile::tempdir().expect("temp dir");
        let formations = root.path().join("formations");
        let data = root.path().join("data");
        std::fs::create_dir_all(&formations).unwrap();
        Fixture { _root: root, formations, data }
    }

    /// Writes a file below the formations folder, creating folders as needed.
    pub fn write(&self, relative: &str, content: &str) -> PathBuf {
        let path = self.formations.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Write then rename, as editors do, so the watcher never sees half a file.
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// Writes an executable Python script (agents in test formations).
    pub fn script(&self, relative: &str, body: &str) -> PathBuf {
        let path = self.write(relative, body);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    pub fn remove(&self, relative: &str) {
        std::fs::remove_file(self.formations.join(relative)).unwrap();
    }

    pub fn start(&self) -> Server {
        Server::start(self, &[], &[])
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `muxi-rt serve`.
pub struct Server {
    child: Child,
    pub base: String,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    pub http: reqwest::Client,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_muxi-rt");

impl Server {
    pub fn start(fixture: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with_data(fixture, &fixture.data, args, env)
    }

    /// [`Server::start`] with a data folder of its own (replicas of one
    /// formations folder, each with its own data folder).
    pub fn start_with_data(fixture: &Fixture, data: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg(&fixture.formations)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("MUXI_LOG", "info,muxi_rt=debug")
            .env_remove("MUXI_LISTEN")
            .env_remove("MUXI_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("muxi-rt starts");
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                if std::env::var_os("MUXI_TEST_ECHO").is_some() {
                    eprintln!("[muxi-rt] {line}");
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let printed = Arc::new(Mutex::new(String::new()));
        let sink = printed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("muxi-rt listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!("muxi-rt did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Server { child, base, stderr, stdout: printed, http }
    }

    /// The rest of the first stdout line that starts with `prefix`, waiting up
    /// to 30 s for it (the addresses of listeners bound after the main one).
    pub fn printed(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.stdout.lock().unwrap().lines().find_map(|l| l.strip_prefix(prefix).map(str::to_string));
            if let Some(rest) = found {
                return rest;
            }
            assert!(
                Instant::now() < deadline,
                "muxi-rt printed no line starting {prefix:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT`, for raw TCP clients.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// Sends `bytes` on a fresh TCP connection and reads until the server closes
    /// it (or `limit` passes: then `None`). Returns what the server sent.
    pub fn raw(&self, bytes: &[u8], limit: Duration) -> Option<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.addr()).expect("connects");
        stream.write_all(bytes).expect("sends");
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match stream.read(&mut buf) {
                Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None
                }
                // Reset by the server: closed too.
                Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything the server wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A request builder with the given key header set.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.delete(self.url(path))
    }
}

/// A caller of one formation: its client key and a user id. What most tests
/// do through the API goes through here.
pub struct Caller<'a> {
    server: &'a Server,
    formation: String,
    user: String,
}

impl Server {
    /// Calls formation `formation` (made by [`formation_yaml`]) as `user`.
    pub fn caller(&self, formation: &str, user: &str) -> Caller<'_> {
        Caller { server: self, formation: formation.to_string(), user: user.to_string() }
    }
}

impl Caller<'_> {
    /// A request to `/api/{formation}/v1{path}` with the client key and user id.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let (name, key) = client_key(&self.formation);
        self.server
            .http
            .request(method, self.server.url(&format!("/api/{}/v1{path}", self.formation)))
            .header(name, key)
            .header("X-Muxi-User-ID", &self.user)
    }

    /// `POST /chat`: status, body and headers.
    pub async fn chat(&self, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self.request(reqwest::Method::POST, "/chat").json(&body).send().await.unwrap();
        let headers = response.headers().clone();
        let (status, body) = json(response).await;
        (status, body, headers)
    }

    /// `GET /requests/{id}`: status and body.
    pub async fn status(&self, id: &str) -> (u16, Value) {
        json(self.request(reqwest::Method::GET, &format!("/requests/{id}")).send().await.unwrap()).await
    }

    /// The request's status document, which must exist.
    pub async fn data(&self, id: &str) -> Value {
        let (code, body) = self.status(id).await;
        assert_eq!(code, 200, "{body}");
        body["data"].clone()
    }

    /// `DELETE /requests/{id}`: status and body.
    pub async fn cancel(&self, id: &str) -> (u16, Value) {
        json(self.request(reqwest::Method::DELETE, &format!("/requests/{id}")).send().await.unwrap()).await
    }

    /// `GET /requests{query}`: the listed requests.
    pub async fn list(&self, query: &str) -> Vec<Value> {
        let (code, body) =
            json(self.request(reqwest::Method::GET, &format!("/requests{query}")).send().await.unwrap()).await;
        assert_eq!(code, 200, "{body}");
        body["data"]["requests"].as_array().unwrap().clone()
    }

    /// Polls a request until it has ended; returns its final status document.
    pub async fn finished(&self, id: &str) -> Value {
        eventually(Duration::from_secs(60), "request to end", || async {
            let (_, body) = self.status(id).await;
            let data = body["data"].clone();
            matches!(data["status"].as_str(), Some("completed" | "failed" | "cancelled")).then_some(data)
        })
        .await
    }
}

/// An admin of one formation: its admin key on `/api/{formation}/v1/admin/...`.
pub struct Admin<'a> {
    server: &'a Server,
    formation: String,
}

impl Server {
    /// Calls the admin routes of formation `formation` (made by [`formation_yaml`]).
    pub fn admin(&self, formation: &str) -> Admin<'_> {
        Admin { server: self, formation: formation.to_string() }
    }
}

impl Admin<'_> {
    /// A request to `/api/{formation}/v1/admin{path}` with the admin key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let (name, key) = admin_key(&self.formation);
        self.server
            .http
            .request(method, self.server.url(&format!("/api/{}/v1/admin{path}", self.formation)))
            .header(name, key)
    }

    /// `GET /admin{path}`: status and body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        json(self.request(reqwest::Method::GET, path).send().await.unwrap()).await
    }

    /// `POST /admin{path}` with no body: status and body.
    pub async fn post(&self, path: &str) -> (u16, Value) {
        json(self.request(reqwest::Method::POST, path).send().await.unwrap()).await
    }

    /// `GET /admin/requests{query}`: the listed requests' ids, which must list.
    pub async fn list(&self, query: &str) -> Vec<String> {
        let (code, body) = self.get(&format!("/requests{query}")).await;
        assert_eq!(code, 200, "{body}");
        body["data"]["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `GET /admin/requests/{id}`: the request in full, which must exist.
    pub async fn show(&self, id: &str) -> Value {
        let (code, body) = self.get(&format!("/requests/{id}")).await;
        assert_eq!(code, 200, "{body}");
        body["data"].clone()
    }

    /// Polls a request until `check` holds for its full document.
    pub async fn until(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(Duration::from_secs(60), what, || async {
            let data = self.show(id).await;
            check(&data).then_some(data)
        })
        .await
    }
}

/// The request id of an answer.
pub fn request_id(body: &Value) -> String {
    body["data"]["request_id"].as_str().unwrap_or_else(|| panic!("no request_id in {body}")).to_string()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and JSON body of a response.
pub async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// Polls `check` until it returns Some, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `muxi-rt ARGS...` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).current_dir(cwd).output().expect("muxi-rt runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether a process id is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split_whitespace().nth(2).is_none_or(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Field 22 (start time) of `/proc/<pid>/stat`, as the server records agents.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A minimal formation document with fixed keys.
pub fn formation_yaml(id: &str, extra: &str) -> String {
    format!(
        "schema: \"1.0.0\"\nid: {id}\ndescription: test formation {id}\nversion: \"1.0.0\"\nserver:\n  api_keys:\n    admin_key: admin-{id}\n    client_key: client-{id}\n{extra}"
    )
}

/// The client-key header for a formation made by [`formation_yaml`].
pub fn client_key(id: &str) -> (&'static str, String) {
    ("X-Muxi-Client-Key", format!("client-{id}"))
}

pub fn admin_key(id: &str) -> (&'static str, String) {
    ("X-Muxi-Admin-Key", format!("admin-{id}"))
}

impl Caller<'_> {
    /// `GET {path}` of the formation as this caller: status and body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        json(self.request(reqwest::Method::GET, path).send().await.unwrap()).await
    }

    /// `POST {path}` with a JSON body as this caller: status and body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        json(self.request(reqwest::Method::POST, path).json(&body).send().await.unwrap()).await
    }

    /// Opens an SSE stream at `path` as this caller, with extra headers.
    pub async fn sse(&self, path: &str, headers: &[(&str, &str)]) -> sse::SseReader {
        let mut request = self.request(reqwest::Method::GET, path).header("Accept", "text/event-stream");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        sse::SseReader::new(request.send().await.unwrap())
    }
}

impl Server {
    /// `GET /api/{formation}/v1{path}` with the admin key: status and body.
    pub async fn admin_get(&self, formation: &str, path: &str) -> (u16, Value) {
        let (name, key) = admin_key(formation);
        json(self.get(&format!("/api/{formation}/v1{path}")).header(name, key).send().await.unwrap()).await
    }
}

/// Runs a `muxi-rt` client command to completion with `env` set and every
/// other MUXI_* variable removed: (exit code, stdout, stderr).
pub async fn run_client(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).stdin(std::process::Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("MUXI_") {
            command.env_remove(k);
        }
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the client command ends")
        .expect("muxi-rt runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
