//! Prometheus metrics: the names, their labels, and one small function per
//! thing measured, so call sites elsewhere are one line each.
//!
//! The `metrics` facade records; `metrics-exporter-prometheus` (without its own
//! HTTP listener) renders the text exposition for `GET /metrics` (see
//! [`super::endpoint`]). Until [`install`] runs (and when it never does:
//! `serve --no-metrics`, unit tests) every call here is a no-op.
//!
//! Labels stay bounded: formation and agent ids (declared by the operator),
//! mode (`sync`, `async`, `promoted`), outcome, route templates and status
//! classes. Request, user and session ids are never labels.

use foldhash::HashMap;
use std::cell::RefCell;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::formation::Formation;
use crate::store::{Mode, RequestRecord};

/// Requests accepted (stored), by formation, agent and mode.
pub const REQUESTS_ACCEPTED: &str = "muxi_requests_accepted_total";
/// Requests ended, by formation, agent, mode and outcome.
pub const REQUESTS: &str = "muxi_requests_total";
/// Run time (first start to end) of ended requests, seconds.
pub const REQUEST_DURATION: &str = "muxi_request_duration_seconds";
/// Time from acceptance to first start, seconds.
pub const REQUEST_QUEUED: &str = "muxi_request_queued_seconds";
pub const REQUEST_ATTEMPTS: &str = "muxi_request_attempts_total";
pub const REQUEST_RETRIES: &str = "muxi_request_retries_total";
/// Requests accepted and not yet started (pending in the store), per formation.
pub const QUEUE_DEPTH: &str = "muxi_queue_depth";
/// Requests holding a worker slot, per formation.
pub const RUNNING: &str = "muxi_requests_running";
/// `overlord.max_concurrent_requests`, per formation.
pub const POOL_LIMIT: &str = "muxi_pool_limit";
pub const WEBHOOK_DELIVERIES: &str = "muxi_webhook_deliveries_total";
pub const WEBHOOK_DELIVERY_DURATION: &str = "muxi_webhook_delivery_duration_seconds";
pub const WEBHOOK_OUTBOX_BACKLOG: &str = "muxi_webhook_outbox_backlog";
pub const WEBHOOK_OUTBOX_OLDEST_AGE: &str = "muxi_webhook_outbox_oldest_age_seconds";
pub const STORE_BATCH_SIZE: &str = "muxi_store_batch_size";
pub const STORE_COMMIT_DURATION: &str = "muxi_store_commit_duration_seconds";
pub const STORE_WRITE_ERRORS: &str = "muxi_store_write_errors_total";
pub const HTTP_REQUESTS: &str = "muxi_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "muxi_http_request_duration_seconds";
pub const FORMATIONS_LOADED: &str = "muxi_formations_loaded";
pub const FORMATION_RELOADS: &str = "muxi_formation_reloads_total";
pub const FORMATION_LOAD_ERRORS: &str = "muxi_formation_load_errors_total";
pub const RATE_LIMITED: &str = "muxi_rate_limited_total";

/// Buckets of durations, seconds: 5 ms to 1 hour.
const SECONDS_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];
/// Buckets of store batch sizes (writes per commit; the writer caps a batch).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same
/// handle) and describes every metric.
pub fn install() -> Result<&'static PrometheusHandle, String> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_BATCH_SIZE.into()), BATCH_BUCKETS))
        .map_err(|e| format!("cannot configure the metrics recorder: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let handle = HANDLE.get_or_init(|| handle);
    describe();
    Ok(handle)
}

/// The installed recorder's handle, if metrics are on.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS_ACCEPTED, "Requests accepted and stored, by formation, agent and mode.");
    describe_counter!(REQUESTS, "Requests ended, by formation, agent, mode (sync, async, promoted) and outcome.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Run time of ended requests, from first start to end.");
    describe_histogram!(REQUEST_QUEUED, Unit::Seconds, "Time requests waited from acceptance to their first start.");
    describe_counter!(REQUEST_ATTEMPTS, "Attempts started (a first run, a retry, a run again after a restart).");
    describe_counter!(REQUEST_RETRIES, "Retries scheduled after a retryable failure.");
    describe_gauge!(
        QUEUE_DEPTH,
        "Requests accepted and not yet started (pending in the store; the same figure on every replica)."
    );
    describe_gauge!(RUNNING, "Requests holding a worker slot.");
    describe_gauge!(POOL_LIMIT, "The worker pool's size (overlord.max_concurrent_requests).");
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook attempts, by outcome (delivered, retry, failed).");
    describe_histogram!(WEBHOOK_DELIVERY_DURATION, Unit::Seconds, "Time one webhook attempt took.");
    describe_gauge!(WEBHOOK_OUTBOX_BACKLOG, "Webhook deliveries not yet delivered nor given up (at scrape time).");
    describe_gauge!(WEBHOOK_OUTBOX_OLDEST_AGE, Unit::Seconds, "Age of the oldest undelivered webhook (0: none).");
    describe_histogram!(STORE_BATCH_SIZE, "Writes per group commit of the store.");
    describe_histogram!(STORE_COMMIT_DURATION, Unit::Seconds, "Time one group commit of the store took.");
    describe_counter!(STORE_WRITE_ERRORS, "Store batches that failed to commit.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by method, route template and status class.");
    describe_histogram!(HTTP_REQUEST_DURATION, Unit::Seconds, "HTTP request latency to the response head.");
    describe_gauge!(FORMATIONS_LOADED, "Formations being served.");
    describe_counter!(FORMATION_RELOADS, "Loads of the formations folder, by outcome (ok, error).");
    describe_counter!(FORMATION_LOAD_ERRORS, "Formation files that failed to load.");
    describe_counter!(RATE_LIMITED, "Calls answered 429 rate_limited, by formation and limit.");
}

/// Whether a formation's request metrics are on (`observability.track_async_tasks`).
pub fn tracked(formation: &Formation) -> bool {
    formation.observability.track_async_tasks
}

/// How the caller was answered: `sync`, `async` (202 at once), or `promoted`
/// (meant to wait, answered 202 at the threshold or at shutdown).
pub fn mode_label(mode: Mode, answered_async: bool) -> &'static str {
    match (mode, answered_async) {
        (Mode::Async, _) => "async",
        (Mode::Sync, true) => "promoted",
        (Mode::Sync, false) => "sync",
    }
}

/// Metric handles by their label values, for the series touched on every
/// request: a lookup by the values costs no allocation, where `counter!` with
/// owned labels builds a key of fresh strings and looks it up in the registry
/// on each call. Handles are cached only once the recorder is installed (before
/// that, every call is a no-op). Label values are bounded (see the module doc),
/// and so is this map.
struct Handles<H> {
    by_labels: LazyLock<Mutex<HashMap<Box<str>, H>>>,
}

thread_local! {
    /// The lookup key being built: label values joined by U+001F.
    static LOOKUP: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<H> Handles<H> {
    const fn new() -> Self {
        Handles { by_labels: LazyLock::new(Default::default) }
    }

    /// Runs `record` on the handle for `values`, made by `make` the first time.
    fn with(&self, values: &[&str], make: impl FnOnce() -> H, record: impl FnOnce(&H)) {
        if handle().is_none() {
            return;
        }
        LOOKUP.with_borrow_mut(|key| {
            key.clear();
            for value in values {
                key.push_str(value);
                key.push('\u{1f}');
            }
            let mut by_labels = self.by_labels.lock().unwrap_or_else(|e| e.into_inner());
            match by_labels.get(key.as_str()) {
                Some(handles) => record(handles),
                None => record(by_labels.entry(key.as_str().into()).or_insert_with(make)),
            }
        });
    }
}

static ACCEPTED: Handles<Counter> = Handles::new();
static HTTP: Handles<(Counter, Histogram)> = Handles::new();

/// A request was stored.
pub fn request_accepted(formation: &Formation, record: &RequestRecord) {
    if !tracked(formation) {
        return;
    }
    let (formation, agent, mode) = (&record.formation_id, &record.agent_id, record.mode.as_str());
    ACCEPTED.with(
        &[formation, agent, mode],
        || {
            let labels = [("formation", formation.clone()), ("agent", agent.clone()), ("mode", mode.to_string())];
            counter!(REQUESTS_ACCEPTED, &labels)
        },
        |accepted| accepted.increment(1),
    );
}

/// A request ended (recorded by this process).
pub fn request_ended(formation: &Formation, record: &RequestRecord, promoted: bool) {
    if !tracked(formation) {
        return;
    }
    let mode = mode_label(record.mode, record.answered_async || promoted);
    let labels = [
        ("formation", record.formation_id.clone()),
        ("agent", record.agent_id.clone()),
        ("mode", mode.to_string()),
        ("outcome", record.status.as_str().to_string()),
    ];
    counter!(REQUESTS, &labels).increment(1);
    if let Some(ms) = record.duration_ms() {
        histogram!(REQUEST_DURATION, &labels).record(ms.max(0) as f64 / 1000.0);
    }
}

/// An attempt started; `queued_ms` is the wait before the first one.
pub fn attempt_started(formation: &Formation, agent: &str, attempt: u32, queued_ms: i64) {
    if !tracked(formation) {
        return;
    }
    let labels = [("formation", formation.id.clone()), ("agent", agent.to_string())];
    counter!(REQUEST_ATTEMPTS, &labels).increment(1);
    if attempt == 1 {
        histogram!(REQUEST_QUEUED, &labels).record(queued_ms.max(0) as f64 / 1000.0);
    }
}

/// A retry was scheduled.
pub fn retry_scheduled(formation: &Formation, agent: &str) {
    if tracked(formation) {
        counter!(REQUEST_RETRIES, "formation" => formation.id.clone(), "agent" => agent.to_string()).increment(1);
    }
}

/// The worker pool's size.
pub fn pool_limit(formation: &Formation, size: usize) {
    if tracked(formation) {
        gauge!(POOL_LIMIT, "formation" => formation.id.clone()).set(size as f64);
    }
}

/// Holds one unit of a gauge (queue depth, running) until dropped.
pub struct Held(Option<Gauge>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.decrement(1.0);
        }
    }
}

fn hold(formation: &Formation, name: &'static str) -> Held {
    if !tracked(formation) {
        return Held(None);
    }
    let gauge = gauge!(name, "formation" => formation.id.clone());
    gauge.increment(1.0);
    Held(Some(gauge))
}

/// Requests of `formation` waiting in the store, read at scrape time.
pub fn queue_depth(formation: &Formation, pending: u64) {
    if tracked(formation) {
        gauge!(QUEUE_DEPTH, "formation" => formation.id.clone()).set(pending as f64);
    }
}

/// A request holds a worker slot while the result is held.
pub fn running(formation: &Formation) -> Held {
    hold(formation, RUNNING)
}

/// One webhook attempt: `delivered`, `retry` or `failed`.
pub fn webhook_attempt(formation: &str, outcome: &'static str, took: Duration) {
    counter!(WEBHOOK_DELIVERIES, "formation" => formation.to_string(), "outcome" => outcome).increment(1);
    histogram!(WEBHOOK_DELIVERY_DURATION, "formation" => formation.to_string(), "outcome" => outcome)
        .record(took.as_secs_f64());
}

/// The outbox at scrape time.
pub fn outbox(pending: u64, oldest_age: Duration) {
    gauge!(WEBHOOK_OUTBOX_BACKLOG).set(pending as f64);
    gauge!(WEBHOOK_OUTBOX_OLDEST_AGE).set(oldest_age.as_secs_f64());
}

/// One group commit of the store (`ok: false`: it failed and rolled back).
pub fn store_batch(writes: usize, took: Duration, ok: bool) {
    histogram!(STORE_BATCH_SIZE).record(writes as f64);
    histogram!(STORE_COMMIT_DURATION).record(took.as_secs_f64());
    if !ok {
        counter!(STORE_WRITE_ERRORS).increment(1);
    }
}

/// One HTTP request answered; `route` is its template.
pub fn http_request(method: &str, route: &str, status: u16, took: Duration) {
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let method = match method {
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => method,
        _ => "other",
    };
    HTTP.with(
        &[method, route, class],
        || {
            let labels = [("method", method.to_string()), ("route", route.to_string()), ("status", class.to_string())];
            (counter!(HTTP_REQUESTS, &labels), histogram!(HTTP_REQUEST_DURATION, &labels))
        },
        |(requests, duration)| {
            requests.increment(1);
            duration.record(took.as_secs_f64());
        },
    );
}

/// The formations folder was (re)loaded.
pub fn formations_loaded(loaded: usize, failed_files: usize) {
    gauge!(FORMATIONS_LOADED).set(loaded as f64);
    let outcome = if failed_files == 0 { "ok" } else { "error" };
    counter!(FORMATION_RELOADS, "outcome" => outcome).increment(1);
    if failed_files > 0 {
        counter!(FORMATION_LOAD_ERRORS).increment(failed_files as u64);
    }
}

/// A call was refused by a rate limit (`limit`: `key`, `user`, `server`, `pending`).
pub fn rate_limited(formation: &str, limit: &'static str) {
    counter!(RATE_LIMITED, "formation" => formation.to_string(), "limit" => limit).increment(1);
}

/// The outcome label of a webhook attempt.
pub fn delivery_outcome(update: &crate::store::DeliveryUpdate) -> &'static str {
    match update {
        crate::store::DeliveryUpdate::Delivered => "delivered",
        crate::store::DeliveryUpdate::Retry { .. } => "retry",
        crate::store::DeliveryUpdate::Failed { .. } => "failed",
    }
}
