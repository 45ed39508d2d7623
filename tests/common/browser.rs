//! A real headless Chromium for tests, driven over WebDriver (W3C JSON over
//! HTTP, spoken here with reqwest): `chromedriver` is started on a port it picks
//! (and prints) with a fresh profile, and killed with the browser when the value drops.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).
//! When they are missing, [`Browser::start`] panics, unless
//! `MUXI_SKIP_BROWSER_TESTS=1` says to skip (for local runs only).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// The Enter key, for keyboard-only use of buttons and forms.
pub const ENTER: &str = "\u{E007}";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The port in chromedriver's "ChromeDriver was started successfully on port
/// N." line; the rest of its output is read and dropped, so it never blocks.
fn printed_port(stdout: std::process::ChildStdout) -> Option<u16> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                let _ = tx.send(rest.trim_end_matches('.').trim().parse::<u16>().ok());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).ok().flatten().filter(|&port| port != 0)
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; `None` only when
    /// the browser is missing and `MUXI_SKIP_BROWSER_TESTS=1`.
    pub async fn start() -> Option<Browser> {
        let chromium = find(&["chromium", "chromium-browser", "google-chrome"]);
        let driver = find(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var("MUXI_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
                eprintln!("SKIPPED: chromium or chromedriver missing and MUXI_SKIP_BROWSER_TESTS=1");
                return None;
            }
            panic!(
                "the browser test needs chromium and chromedriver (apt-get install -y chromium chromium-driver); \
                 set MUXI_SKIP_BROWSER_TESTS=1 to skip it locally"
            );
        };
        let profile = tempfile::tempdir().unwrap();
        // Port 0: chromedriver binds a free port itself and prints it, so no
        // other process can take it between our choosing it and its binding.
        let mut child = Command::new(&driver)
            .arg("--port=0")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let Some(port) = printed_port(child.stdout.take().unwrap()) else {
            let _ = child.kill();
            panic!("chromedriver printed no port it listens on within 30 s");
        };
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{base}/status")).send().await.ok();
            if let Some(response) = ready {
                let status: Value = response.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not get ready on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let mut browser = Browser { driver: child, base, session: String::new(), http, _profile: profile };
        let created = browser.call(reqwest::Method::POST, "/session", Some(capabilities)).await;
        browser.session = created["sessionId"].as_str().expect("a session id").to_string();
        Some(browser)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        } else if method == reqwest::Method::POST {
            request = request.json(&json!({}));
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("webdriver {path}: {e}"));
        let status = response.status();
        let value: Value = response.json().await.unwrap_or_default();
        assert!(status.is_success(), "webdriver {method} {path}: {status} {value}");
        value["value"].clone()
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, &self.at("/url"), Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(reqwest::Method::POST, &self.at("/execute/sync"), Some(json!({ "script": script, "args": args })))
            .await
    }

    /// The element matching `css` now, if any.
    async fn element(&self, css: &str) -> Option<String> {
        let found = self
            .call(reqwest::Method::POST, &self.at("/elements"), Some(json!({ "using": "css selector", "value": css })))
            .await;
        found.as_array()?.first()?[ELEMENT].as_str().map(str::to_string)
    }

    /// Waits for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> String {
        self.until(&format!("element {css}"), || async { self.element(css).await }).await
    }

    /// Types `text` into the element (focusing it first, as a keyboard user would).
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.wait_for(css).await;
        self.call(reqwest::Method::POST, &self.at(&format!("/element/{id}/value")), Some(json!({ "text": text })))
            .await;
    }

    /// Presses Enter on the element: activates a link or button without a mouse.
    pub async fn press_enter(&self, css: &str) {
        self.type_into(css, ENTER).await;
    }

    /// The visible text of the element matching `css` ("" when absent).
    pub async fn text(&self, css: &str) -> String {
        self.eval("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", json!([css]))
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the element's text satisfies `check`; returns it.
    pub async fn text_until(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        self.until(what, || async {
            let text = self.text(css).await;
            check(&text).then_some(text)
        })
        .await
    }

    /// Polls `check` for up to 60 s.
    pub async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > deadline {
                let page = self.text("body").await;
                panic!("timed out waiting for {what}; the page reads:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.call(reqwest::Method::POST, &self.at("/window/rect"), Some(json!({ "width": width, "height": height })))
            .await;
    }

    /// Saves a PNG of the viewport to `dir/name.png`.
    pub async fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        use base64::Engine as _;
        let data = self.call(reqwest::Method::GET, &self.at("/screenshot"), None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Everything the browser logged so far (CSP violations show up here).
    pub async fn logs(&self) -> Vec<Value> {
        let logs = self.call(reqwest::Method::POST, &self.at("/se/log"), Some(json!({ "type": "browser" }))).await;
        logs.as_array().unwrap_or_else(|| panic!("the browser log is a list: {logs}")).clone()
    }

    /// Switches `prefers-color-scheme` (Chrome DevTools, through the driver).
    pub async fn color_scheme(&self, scheme: &str) {
        let params = json!({ "features": [{ "name": "prefers-color-scheme", "value": scheme }] });
        self.call(
            reqwest::Method::POST,
            &self.at("/goog/cdp/execute"),
            Some(json!({ "cmd": "Emulation.setEmulatedMedia", "params": params })),
        )
        .await;
    }
}

impl Browser {
    /// Ends the session (Chromium quits), then stops the driver.
    pub async fn quit(mut self) {
        let session = std::mem::take(&mut self.session);
        let _ = self.http.delete(format!("{}/session/{session}", self.base)).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver leads its own process group, Chromium included: all go.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}
