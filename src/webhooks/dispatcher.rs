//! The durable outbox runner.
//!
//! The store writes an outbox row in the same transaction that ends a request, so a
//! webhook is never lost to a crash. The [`Dispatcher`] polls the due rows every
//! [`POLL_INTERVAL`] (or at once when [`Dispatcher::notify`] is called, which the
//! engine does after finishing a request) and runs each delivery as its own task,
//! bounded by the formation's `webhook_timeout`: a receiver that hangs only ever
//! holds up its own delivery. Each poll *claims* the rows it starts (one
//! `UPDATE ... RETURNING` in the store, naming this process until the claim
//! expires), so a delivery is sent by one sender at a time, here or on another
//! server; a sender that dies loses its claims when they expire.
//!
//! Delivery is at least once: a crash between a receiver's 2xx and the store write
//! sends the event again after restart, with the same `webhook-id` for
//! de-duplication.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use rand::Rng;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::deliver::{attempt, webhook_client, AttemptResult};
use super::payload::completion_payload;
use super::target::{inspect_target, TargetError};
use crate::formation::Formation;
use crate::store::{Delivery, DeliveryUpdate, Store};

/// How often due deliveries are looked for when nobody pokes the dispatcher.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How many new deliveries one poll starts at most.
const BATCH: usize = 32;
/// How many deliveries may be running at once.
const MAX_IN_FLIGHT: usize = 256;
/// The first retry delay; doubled per attempt up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest `webhook_timeout` honoured per attempt.
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a claimed delivery stays with its sender: the longest attempt, and a margin.
const CLAIM: Duration = Duration::from_secs(MAX_ATTEMPT_TIMEOUT.as_secs() + 60);
/// On shutdown, how long running attempts may take to finish before being dropped
/// (a dropped attempt stays pending in the store and is sent again after restart).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Finds a loaded formation by id.
pub type FormationLookup = Arc<dyn Fn(&str) -> Option<Arc<Formation>> + Send + Sync>;

/// Runs the webhook outbox. See the module docs.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    lookup: FormationLookup,
    allow_hosts: Vec<String>,
    client: reqwest::Client,
    wake: Notify,
    /// This process's name in delivery claims.
    owner: String,
    shutdown_grace: Duration,
}

/// The per-formation delivery settings.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    secret: Option<String>,
    retries: u32,
    timeout: Duration,
}

impl Settings {
    fn of(formation: &Formation) -> Settings {
        let a = &formation.overlord.async_;
        let secret = a
            .webhook_secret
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| formation.keys.admin.clone().filter(|s| !s.is_empty()));
        let timeout = crate::time::seconds(a.webhook_timeout)
            .filter(|t| !t.is_zero())
            .unwrap_or(Duration::from_secs(10))
            .min(MAX_ATTEMPT_TIMEOUT);
        Settings { secret, retries: a.webhook_retries, timeout }
    }
}

impl Dispatcher {
    /// A dispatcher over `store`, claiming deliveries as `owner`; `allow_hosts`
    /// may be webhook targets even when they resolve to internal addresses.
    /// Fails only if the HTTP client cannot be built.
    pub fn new(
        store: Arc<dyn Store>,
        lookup: FormationLookup,
        allow_hosts: Vec<String>,
        owner: String,
    ) -> Result<Self, reqwest::Error> {
        let client = webhook_client(&allow_hosts)?;
        Ok(Dispatcher {
            store,
            lookup,
            allow_hosts,
            client,
            wake: Notify::new(),
            owner,
            shutdown_grace: SHUTDOWN_GRACE,
        })
    }

    /// How long running attempts may take to finish on shutdown (default 5 s).
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Asks the loop to look for due deliveries now (e.g. after a request ended).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Starts the loop; it stops when `shutdown` is cancelled, giving running
    /// attempts the shutdown grace (default [`SHUTDOWN_GRACE`]) to finish.
    pub fn spawn(self: Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            loop {
                self.poll(&mut tasks).await;
                while tasks.try_join_next().is_some() {}
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
            }
            let drained =
                tokio::time::timeout(self.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
            if drained.is_err() {
                tracing::info!(
                    running = tasks.len(),
                    "webhook dispatcher stopping: unfinished attempts will be retried after restart"
                );
                tasks.abort_all();
            }
        })
    }

    /// Claims due deliveries and starts each as its own task.
    async fn poll(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        let room = BATCH.min(MAX_IN_FLIGHT.saturating_sub(tasks.len()));
        if room == 0 {
            return;
        }
        let claim_ms = CLAIM.as_millis() as i64;
        let due = match self.store.claim_deliveries(&self.owner, crate::time::now_ms(), room, claim_ms).await {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(error = %err, "webhook dispatcher: cannot read the outbox");
                return;
            }
        };
        for delivery in due {
            let this = Arc::clone(self);
            tasks.spawn(async move {
                let (id, owner) = (delivery.id.clone(), this.owner.clone());
                // A bug in one attempt must not leave its delivery due forever:
                // it is recorded as failed, and the dispatcher goes on.
                if AssertUnwindSafe(this.run(delivery)).catch_unwind().await.is_err() {
                    tracing::error!(delivery = %id, "a webhook attempt panicked; the delivery is marked failed");
                    let update = DeliveryUpdate::Failed { error: "internal error during the attempt".into() };
                    let _ = this.store.record_delivery(&id, &owner, &update).await;
                }
            });
        }
    }

    /// One attempt of one delivery, its result recorded in the store.
    async fn run(&self, delivery: Delivery) {
        let started = std::time::Instant::now();
        let update = self.attempt(&delivery).await;
        crate::observability::metrics::webhook_attempt(
            &delivery.formation_id,
            crate::observability::metrics::delivery_outcome(&update),
            started.elapsed(),
        );
        let host =
            reqwest::Url::parse(&delivery.url).ok().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_default();
        match &update {
            DeliveryUpdate::Delivered => {
                tracing::info!(delivery = %delivery.id, request = %delivery.request_id, %host, "webhook delivered")
            }
            DeliveryUpdate::Retry { error, next_attempt_at } => tracing::info!(
                delivery = %delivery.id, request = %delivery.request_id, %host, %error,
                in_ms = next_attempt_at - crate::time::now_ms(), "webhook attempt failed, will retry"
            ),
            DeliveryUpdate::Failed { error } => tracing::warn!(
                delivery = %delivery.id, request = %delivery.request_id, %host, %error, "webhook delivery failed"
            ),
        }
        match self.store.record_delivery(&delivery.id, &self.owner, &update).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(delivery = %delivery.id, "the delivery's claim expired before its attempt was recorded")
            }
            Err(err) => tracing::warn!(delivery = %delivery.id, error = %err, "cannot record a webhook attempt"),
        }
    }

    /// Makes the attempt and decides what the store should record.
    async fn attempt(&self, delivery: &Delivery) -> DeliveryUpdate {
        let failed = |error: String| DeliveryUpdate::Failed { error };
        let record = match self.store.get(&delivery.request_id).await {
            Ok(Some(record)) => record,
            Ok(None) => return failed("request no longer exists".into()),
            Err(err) => {
                return retry_update(delivery.attempts, u32::MAX, format!("cannot read the request: {err}"), None)
            }
        };
        let Some(formation) = (self.lookup)(&delivery.formation_id) else {
            return failed("formation no longer loaded".into());
        };
        let settings = Settings::of(&formation);

        // DNS may have changed since the request was accepted.
        match inspect_target(&delivery.url, &self.allow_hosts).await {
            Ok(_) => {}
            Err(TargetError::Invalid(message)) => return failed(message),
            Err(TargetError::Refused(refused)) => return failed(format!("target refused: {refused}")),
            // Possibly a passing DNS failure: the attempt itself will tell.
            Err(TargetError::Unresolvable(_)) => {}
        }

        let mut payload = completion_payload(&record, &delivery.formation_id, crate::time::now_ms());
        // The URL actually called (the formation's default when the request gave none).
        payload["webhook_url"] = serde_json::Value::String(delivery.url.clone());
        let body = match serde_json::to_vec(&payload) {
            Ok(body) => body,
            Err(err) => return failed(format!("cannot serialise the payload: {err}")),
        };

        let result =
            attempt(&self.client, &delivery.url, &delivery.id, &body, settings.secret.as_deref(), settings.timeout)
                .await;
        match result {
            AttemptResult::Delivered => DeliveryUpdate::Delivered,
            AttemptResult::Gone { error } => failed(error),
            AttemptResult::Retry { error, retry_after } => {
                retry_update(delivery.attempts, settings.retries, error, retry_after)
            }
        }
    }
}

/// The update after a retryable failure, `attempts_before` attempts having been made
/// before this one and `retries` more allowed after the first.
fn retry_update(attempts_before: u32, retries: u32, error: String, retry_after: Option<Duration>) -> DeliveryUpdate {
    let made = attempts_before.saturating_add(1);
    if made > retries {
        return DeliveryUpdate::Failed { error: format!("gave up after {made} attempts: {error}") };
    }
    let jitter = rand::thread_rng().gen_range(0.75..1.25);
    // Bounded (Retry-After is capped at an hour); the conversion saturates anyway:
    // an `as` cast of a huge delay would wrap to a time in the past, re-sending at once.
    let delay = backoff(made, retry_after.map(|d| d.min(crate::time::MAX_RETRY_AFTER)), jitter);
    let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    DeliveryUpdate::Retry { error, next_attempt_at: crate::time::now_ms().saturating_add(delay_ms) }
}

/// The wait after the `made`-th failed attempt: 1 s doubled per attempt, scaled by
/// `jitter`, capped at five minutes, and never shorter than `retry_after`.
fn backoff(made: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exponent = made.saturating_sub(1).min(16) as i32;
    let base = INITIAL_BACKOFF.as_secs_f64() * 2f64.powi(exponent) * jitter;
    let delay = crate::time::seconds_clamped(base, MAX_BACKOFF);
    delay.max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    use axum::http::StatusCode as AxStatus;

    use crate::store::sqlite::SqliteStore;
    use crate::store::{Mode, NewDelivery, NewRequest, Outcome, RequestResult, WebhookState};

    #[test]
    fn backoff_doubles_with_cap_and_honours_retry_after() {
        assert_eq!(backoff(1, None, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, None, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(4, None, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(30, None, 1.25), MAX_BACKOFF);
        assert_eq!(backoff(1, None, 0.75), Duration::from_millis(750));
        assert_eq!(backoff(1, Some(Duration::from_secs(60)), 1.0), Duration::from_secs(60));
        assert_eq!(backoff(3, Some(Duration::from_secs(1)), 1.0), Duration::from_secs(4));
        // A huge Retry-After waits the cap, in the future, and still counts the attempt.
        let now = crate::time::now_ms();
        match retry_update(0, 3, "HTTP 503".into(), Some(Duration::MAX)) {
            DeliveryUpdate::Retry { next_attempt_at, .. } => {
                let wait = next_attempt_at - now;
                assert!((3_599_000..=3_601_000).contains(&wait), "{wait}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(retry_update(3, 3, "x".into(), Some(Duration::MAX)), DeliveryUpdate::Failed { .. }));
    }

    #[test]
    fn retries_are_counted_after_the_first_attempt() {
        // webhook_retries 3: attempts 1..=3 retry, the 4th failure gives up.
        for before in 0..3 {
            assert!(matches!(retry_update(before, 3, "HTTP 500".into(), None), DeliveryUpdate::Retry { .. }));
        }
        assert_eq!(
            retry_update(3, 3, "HTTP 500".into(), None),
            DeliveryUpdate::Failed { error: "gave up after 4 attempts: HTTP 500".into() }
        );
        assert!(matches!(retry_update(0, 0, "x".into(), None), DeliveryUpdate::Failed { .. }));
    }

    #[test]
    fn settings_fall_back_to_the_admin_key() {
        let mut f = formation("f");
        f.keys.admin = Some("fma_admin".into());
        assert_eq!(Settings::of(&f).secret.as_deref(), Some("fma_admin"));
        f.overlord.async_.webhook_secret = Some("whsec_abc".into());
        f.overlord.async_.webhook_timeout = -1.0;
        let s = Settings::of(&f);
        assert_eq!(s.secret.as_deref(), Some("whsec_abc"));
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.retries, 3);
    }

    fn formation(id: &str) -> Formation {
        Formation {
            id: id.into(),
            version: "1.0.0".into(),
            revision: "r".into(),
            description: String::new(),
            source: "f.afs".into(),
            dir: ".".into(),
            keys: Default::default(),
            overlord: Default::default(),
            llm: Default::default(),
            agents: vec![],
            mcp: Default::default(),
            observability: Default::default(),
            rate_limits: Default::default(),
            triggers: Default::default(),
            warnings: vec![],
        }
    }

    /// A real store in a temporary folder, with requests ended with a delivery.
    struct Outbox {
        _dir: tempfile::TempDir,
        store: Arc<SqliteStore>,
    }

    impl Outbox {
        fn new() -> Outbox {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Arc::new(SqliteStore::open(dir.path()).expect("store"));
            Outbox { _dir: dir, store }
        }

        /// A completed request of `formation_id` whose webhook goes to `url`.
        async fn add(&self, request_id: &str, formation_id: &str, url: &str) {
            let request = NewRequest {
                id: request_id.into(),
                formation_id: formation_id.into(),
                formation_version: "1".into(),
                user_id: "u".into(),
                session_id: None,
                agent_id: "a".into(),
                message: "m".into(),
                mode: Mode::Async,
                estimated_seconds: 1.0,
                idempotency_key: None,
                fingerprint: None,
                webhook_url: Some(url.into()),
                workflow_timeout_ms: 60_000,
                created_at: 1,
            };
            self.store.insert(request, Some("test"), 1).await.expect("insert");
            let outcome = Outcome::Completed(RequestResult { text: format!("answer {request_id}"), artifacts: vec![] });
            let delivery = NewDelivery { id: format!("wh_{request_id}"), url: url.into() };
            assert!(self.store.finish(request_id, &outcome, 2, Some(delivery), None).await.expect("finish"));
        }

        async fn webhook(&self, request_id: &str) -> WebhookState {
            self.store.get(request_id).await.expect("get").expect("request").webhook.expect("delivery")
        }

        fn next_attempt_at(&self, request_id: &str) -> i64 {
            let conn = rusqlite::Connection::open(self.store.path()).expect("open");
            conn.query_row("SELECT next_attempt_at FROM deliveries WHERE request_id = ?1", [request_id], |r| r.get(0))
                .expect("row")
        }
    }

    /// A receiver on 127.0.0.1: `/slow` never answers in time, `/ok` records bodies.
    async fn receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let flaky = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(
                "/ok",
                axum::routing::post(move |body: axum::Json<serde_json::Value>| async move {
                    sink.lock().expect("lock").push(body.0);
                    AxStatus::NO_CONTENT
                }),
            )
            .route(
                "/flaky",
                axum::routing::post(move || async move {
                    // 500 on the first call, 200 after.
                    if flaky.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        AxStatus::INTERNAL_SERVER_ERROR
                    } else {
                        AxStatus::OK
                    }
                }),
            )
            .route(
                "/slow",
                axum::routing::post(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    AxStatus::OK
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), seen)
    }

    async fn wait_until<F: std::future::Future<Output = bool>>(mut done: impl FnMut() -> F) {
        for _ in 0..100 {
            if done().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("condition not reached in 5 s");
    }

    #[tokio::test]
    async fn delivers_without_waiting_for_a_hanging_receiver() {
        let (base, seen) = receiver().await;
        let outbox = Outbox::new();
        outbox.add("req_slow", "f", &format!("{base}/slow")).await;
        outbox.add("req_ok", "f", &format!("{base}/ok")).await;
        outbox.add("req_orphan", "gone", &format!("{base}/ok")).await;
        let mut f = formation("f");
        f.overlord.async_.webhook_timeout = 30.0;
        let f = Arc::new(f);
        let lookup: FormationLookup = Arc::new(move |id: &str| (id == "f").then(|| f.clone()));
        let dispatcher =
            Dispatcher::new(outbox.store.clone(), lookup, vec!["127.0.0.1".into()], "me".into()).expect("dispatcher");
        let dispatcher = Arc::new(dispatcher.with_shutdown_grace(Duration::from_millis(100)));
        let shutdown = CancellationToken::new();
        let handle = dispatcher.clone().spawn(shutdown.clone());
        dispatcher.notify();

        wait_until(|| async { outbox.webhook("req_ok").await.status == "delivered" }).await;
        let bodies = seen.lock().expect("lock").clone();
        assert_eq!(bodies.len(), 1, "delivered exactly once");
        assert_eq!(bodies[0]["request_id"], "req_ok");
        assert_eq!(bodies[0]["response"][0]["text"], "answer req_ok");
        assert_eq!(bodies[0]["webhook_url"], format!("{base}/ok"));

        wait_until(|| async { outbox.webhook("req_orphan").await.status == "failed" }).await;
        assert_eq!(outbox.webhook("req_orphan").await.last_error.as_deref(), Some("formation no longer loaded"));

        // The hanging one is still running, started once, not recorded yet,
        // and claimed: no other sender may take it.
        let slow = outbox.webhook("req_slow").await;
        assert_eq!((slow.status.as_str(), slow.attempts), ("pending", 0));
        let others = outbox.store.claim_deliveries("another", crate::time::now_ms(), 10, 1000).await.expect("claim");
        assert!(others.is_empty(), "a claimed delivery went to a second sender: {others:?}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), handle).await.expect("stops").expect("joins");
    }

    #[tokio::test]
    async fn retries_after_a_server_error() {
        let (base, _seen) = receiver().await;
        let outbox = Outbox::new();
        outbox.add("req_1", "f", &format!("{base}/flaky")).await;
        let f = Arc::new(formation("f"));
        let lookup: FormationLookup = Arc::new(move |_: &str| Some(f.clone()));
        let dispatcher = Arc::new(
            Dispatcher::new(outbox.store.clone(), lookup, vec!["127.0.0.1".into()], "me".into()).expect("dispatcher"),
        );
        let shutdown = CancellationToken::new();
        let handle = dispatcher.clone().spawn(shutdown.clone());

        wait_until(|| async { outbox.webhook("req_1").await.attempts == 1 }).await;
        let first = outbox.webhook("req_1").await;
        assert_eq!((first.status.as_str(), first.last_error.as_deref()), ("pending", Some("HTTP 500")));
        // Backoff after the first failure: 1 s +/- 25 %.
        let wait = outbox.next_attempt_at("req_1") - crate::time::now_ms();
        assert!(wait <= 1250, "{wait}");

        wait_until(|| async { outbox.webhook("req_1").await.status == "delivered" }).await;
        assert_eq!(outbox.webhook("req_1").await.attempts, 2);
        shutdown.cancel();
        let _ = handle.await;
    }

    #[tokio::test]
    async fn refused_targets_fail_at_send_time() {
        let outbox = Outbox::new();
        outbox.add("req_1", "f", "http://169.254.169.254/latest/meta-data").await;
        let f = Arc::new(formation("f"));
        let lookup: FormationLookup = Arc::new(move |_: &str| Some(f.clone()));
        let dispatcher =
            Arc::new(Dispatcher::new(outbox.store.clone(), lookup, vec![], "me".into()).expect("dispatcher"));
        let shutdown = CancellationToken::new();
        let handle = dispatcher.clone().spawn(shutdown.clone());
        wait_until(|| async { outbox.webhook("req_1").await.status == "failed" }).await;
        let error = outbox.webhook("req_1").await.last_error.unwrap_or_default();
        assert!(error.contains("cloud metadata"), "{error}");
        shutdown.cancel();
        let _ = handle.await;
    }
}
