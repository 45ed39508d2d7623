//! A real webhook receiver for tests: an axum server on 127.0.0.1:0 that records
//! every call (path, headers, raw body bytes, arrival time) and answers from a
//! script set per path.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// How the receiver answers one call.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16),
    /// A status with one extra header (`Retry-After`, `Location`, ...).
    With(u16, &'static str, String),
    /// Never answers (within any sane timeout).
    Hang,
}

/// One call the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Answer>,
    default: Option<Answer>,
}

#[derive(Default)]
struct Inner {
    scripts: Mutex<HashMap<String, Script>>,
    hits: Mutex<Vec<Hit>>,
}

pub struct Receiver {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    inner: Arc<Inner>,
}

async fn receive(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_string();
    inner.hits.lock().unwrap().push(Hit { path: path.clone(), headers, body, at: Instant::now() });
    let answer = {
        let mut scripts = inner.scripts.lock().unwrap();
        match scripts.get_mut(&path) {
            Some(script) => script.queue.pop_front().or_else(|| script.default.clone()),
            None => None,
        }
    };
    match answer.unwrap_or(Answer::Status(200)) {
        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Answer::With(code, name, value) => (StatusCode::from_u16(code).unwrap(), [(name, value)]).into_response(),
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    /// Starts a receiver answering 200 on every path until told otherwise.
    pub async fn start() -> Receiver {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new().fallback(receive).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { base: format!("http://{addr}"), inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Answers the next calls to `path` from `queue`, then with `default`
    /// (200 when `None`).
    pub fn script(&self, path: &str, queue: Vec<Answer>, default: Option<Answer>) {
        let mut scripts = self.inner.scripts.lock().unwrap();
        scripts.insert(path.to_string(), Script { queue: queue.into(), default });
    }

    /// Every call so far to `path`.
    pub fn hits(&self, path: &str) -> Vec<Hit> {
        self.inner.hits.lock().unwrap().iter().filter(|h| h.path == path).cloned().collect()
    }

    pub fn all_hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().unwrap().clone()
    }

    /// Waits until `path` has had at least `n` calls; returns them all.
    pub async fn wait_for(&self, path: &str, n: usize, limit: Duration) -> Vec<Hit> {
        super::eventually(limit, &format!("{n} webhook call(s) to {path}"), || async {
            let hits = self.hits(path);
            (hits.len() >= n).then_some(hits)
        })
        .await
    }
}

/// Checks `X-Muxi-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>`
/// independently of the server's code; returns `t`.
pub fn verify_muxi_signature(hit: &Hit, secret: &str) -> i64 {
    use hmac::{Hmac, Mac};
    let header = hit.header("x-muxi-signature").expect("X-Muxi-Signature header");
    let (t, v1) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .unwrap_or_else(|| panic!("malformed X-Muxi-Signature: {header}"));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&hit.body);
    assert_eq!(v1, hex::encode(mac.finalize().into_bytes()), "X-Muxi-Signature over the raw body");
    let t: i64 = t.parse().expect("t is unix seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - t).abs() < 300, "signature timestamp {t} is within 300 s of now {now}");
    t
}

/// Checks the Standard Webhooks headers for a `whsec_<base64>` secret:
/// `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>." + raw body)>`.
pub fn verify_standard_signature(hit: &Hit, whsec: &str) {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = hit.header("webhook-id").expect("webhook-id header");
    let timestamp = hit.header("webhook-timestamp").expect("webhook-timestamp header");
    let signature = hit.header("webhook-signature").expect("webhook-signature header");
    let key = b64.decode(whsec.strip_prefix("whsec_").expect("whsec_ secret")).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&hit.body);
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    // The header may list several space-separated signatures; ours must be one.
    assert!(signature.split(' ').any(|s| s == expected), "webhook-signature {signature} != {expected}");
}
