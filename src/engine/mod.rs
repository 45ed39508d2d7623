//! The request engine: runs accepted requests in the background.
//!
//! Each request has one owner in this process: a supervised task
//! (`supervisor.rs`) that waits for a slot in its formation's worker pool
//! (FIFO, `overlord.max_concurrent_requests`), claims an attempt under a lease
//! (`leases.rs`), runs its agent under the task and workflow timeouts, and
//! retries retryable failures with backoff (`run.rs`), until the request ends,
//! someone else ends it, or the server stops. Everything durable goes to the
//! store, fenced by the lease; live watchers (a waiting sync caller, SSE
//! streams) get the same events from a broadcast channel. Cancel and timeout
//! drop the agent's future, which stops its work (see `agents`).
//!
//! A sweeper (`sweeper.rs`) starts every unfinished request that nobody holds:
//! at start-up (after a crash or restart: at-least-once, `attempts` says so),
//! when a lease expires, and when a request's formation comes back.

pub mod feed;
mod finish_on_drop;
mod history;
mod leases;
mod live;
mod per_user;
mod pool;
mod remote_cancel;
mod run;
mod supervisor;
mod sweeper;
#[cfg(test)]
mod tests;

pub use leases::{lease, owner_id, LEASE};
pub use live::{LiveEvent, LiveRequest};

use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agents::{AgentContext, Turn};
use crate::formation::Formation;
use crate::overlord::estimate;
use crate::registry::Registry;
use crate::store::{
    Inserted, Lease, NewDelivery, NewRequest, Outcome, Progress, RequestRecord, Status, Store, StoreError, StoreResult,
};
use crate::time::now_ms;
use crate::webhooks::Dispatcher;

use finish_on_drop::FinishOnDrop;
use pool::Pool;

/// How many recent durations per agent feed the estimate.
const HISTORY: usize = 20;
/// How many earlier turns of a session an agent sees.
const SESSION_TURNS: usize = 20;

/// What `submit` did.
pub struct Submitted {
    /// Boxed, as [`Inserted`]'s records are: it is moved through several futures.
    pub record: Box<RequestRecord>,
    /// The running request, when it runs in this process.
    pub live: Option<Arc<LiveRequest>>,
    /// The live request's events, subscribed before its work could publish any
    /// (so a stream opened with the request misses nothing).
    pub events: Option<tokio::sync::broadcast::Receiver<LiveEvent>>,
}

/// How a submitted request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Queued in the store, unowned: the sweeper takes it on here (or another
    /// server does) when a slot is free. Nothing of it is kept in memory
    /// meanwhile, so a queue of any length costs only its rows.
    Queue,
    /// Taken on here at once, for a caller that waits for its end.
    Now,
    /// As `Now`, with a subscription to its events made before its work can
    /// publish any (so a stream opened with the request misses nothing).
    Follow,
}

/// Why `submit` stored nothing.
#[derive(Debug)]
pub enum SubmitError {
    Store(StoreError),
    /// The idempotency key belongs to an earlier request that asked something else.
    KeyReused(Box<RequestRecord>),
    /// The user holds `overlord.max_pending_per_user` unfinished requests already.
    TooManyPending {
        limit: u32,
    },
}

impl From<StoreError> for SubmitError {
    fn from(e: StoreError) -> Self {
        SubmitError::Store(e)
    }
}

/// Why a cancel did not happen.
#[derive(Debug)]
pub enum CancelError {
    AlreadyFinished(Status),
    Store(crate::store::StoreError),
}

/// The engine. One per process, shared by all formations.
pub struct Engine {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    agents: AgentContext,
    /// This process's name in leases and claims.
    owner: String,
    /// The requests this process runs: at most one task each.
    running: Mutex<HashMap<String, Arc<LiveRequest>>>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// Recent durations (ms) per formation, then agent, newest first (two
    /// levels, so an accept looks them up by `&str`, allocating no key).
    durations: Mutex<HashMap<String, HashMap<String, Vec<i64>>>>,
    /// Woken whenever a request ends with a webhook delivery to make.
    deliveries: Arc<Dispatcher>,
    /// Wakes the sweeper (a formation was loaded, a request handed back).
    sweep: Notify,
    shutdown: CancellationToken,
    /// Lifecycle events of every formation's requests (`GET /events`).
    feed: feed::Feeds,
    /// Unfinished requests per (formation, user) run here (`max_pending_per_user`).
    per_user: per_user::PerUser,
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        deliveries: Arc<Dispatcher>,
        owner: String,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            registry,
            agents: AgentContext::new(),
            owner,
            running: Mutex::new(HashMap::default()),
            pools: Mutex::new(HashMap::default()),
            durations: Mutex::new(HashMap::default()),
            deliveries,
            sweep: Notify::new(),
            shutdown,
            feed: feed::Feeds::default(),
            per_user: per_user::PerUser::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// This process's name in leases and claims.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The lifecycle events of requests, per formation.
    pub fn feed(&self) -> &feed::Feeds {
        &self.feed
    }

    /// Estimates how long `message` will take on `agent_id` of `formation`,
    /// from the agent's recent durations (cached; loaded once from the store).
    pub async fn estimate(&self, formation: &Formation, agent_id: &str, message: &str) -> estimate::Estimate {
        let declared = formation.agent(Some(agent_id)).and_then(|a| a.estimated_seconds);
        let from = |history: &[i64]| {
            estimate::estimate(&estimate::EstimateInput {
                message,
                estimated_seconds: declared,
                history,
                enable_estimation: formation.overlord.async_.enable_estimation,
            })
        };
        {
            let durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(history) = durations.get(formation.id.as_str()).and_then(|agents| agents.get(agent_id)) {
                return from(history);
            }
        }
        let loaded = self.store.recent_durations(&formation.id, agent_id, HISTORY).await.unwrap_or_default();
        let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let agents = durations.entry(formation.id.clone()).or_default();
        from(agents.entry(agent_id.to_string()).or_insert(loaded))
    }

    fn remember_duration(&self, record: &RequestRecord) {
        let (Status::Completed, Some(ms)) = (record.status, record.duration_ms()) else { return };
        let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(history) =
            durations.get_mut(record.formation_id.as_str()).and_then(|agents| agents.get_mut(record.agent_id.as_str()))
        {
            history.insert(0, ms);
            history.truncate(HISTORY);
        }
    }

    /// Stores a new request durably, then starts it as `start` says.
    ///
    /// The work is detached from the caller: once the insert is under way, the
    /// request is committed and started even if the caller goes away (an HTTP
    /// client that disconnects drops its handler's future; [`FinishOnDrop`]
    /// then runs the rest as a task of its own). An
    /// idempotent replay of a request that is not running anywhere starts it.
    pub async fn submit(
        self: &Arc<Self>,
        formation: Arc<Formation>,
        request: NewRequest,
        start: Start,
    ) -> Result<Submitted, SubmitError> {
        let id = request.id.clone();
        if let Some(cap) = formation.overlord.max_pending_per_user {
            if let Err(limit) = self.per_user.admit(&request.formation_id, &request.user_id, &id, Some(cap)) {
                crate::observability::metrics::rate_limited(&formation.id, "pending");
                return Err(SubmitError::TooManyPending { limit });
            }
        }
        let engine = self.clone();
        let accepting = FinishOnDrop::new(async move {
            let holder = (start != Start::Queue).then_some(engine.owner.as_str());
            let follow = start == Start::Follow;
            match engine.store.insert(request, holder, leases::lease_ms()).await? {
                Inserted::Created(record) => {
                    engine.feed.accepted(&record);
                    crate::observability::metrics::request_accepted(&formation, &record);
                    if start == Start::Queue {
                        // With no room the sweeper is woken when some is made
                        // (an end, a retry's backoff, a reload).
                        if engine.pool(&formation).room() > 0 {
                            engine.wake_sweeper();
                        }
                        return Ok(Submitted { record, live: None, events: None });
                    }
                    let (live, events) = engine.start(formation, (*record).clone(), follow);
                    Ok(Submitted { record, live: Some(live), events })
                }
                Inserted::Existing(record) if record.status.is_final() => {
                    Ok(Submitted { record, live: None, events: None })
                }
                Inserted::Existing(record) if start == Start::Queue => match engine.live(&record.id) {
                    Some(live) => Ok(Submitted { record: Box::new(live.snapshot()), live: Some(live), events: None }),
                    None => {
                        // Queued, or held by a server that may have stopped: the
                        // sweeper takes it on when it can.
                        engine.wake_sweeper();
                        Ok(Submitted { record, live: None, events: None })
                    }
                },
                Inserted::Existing(record) => {
                    // Running here, or started here now (the claim decides if
                    // another server holds it).
                    let (live, events) = engine.start(formation, (*record).clone(), follow);
                    Ok(Submitted { record: Box::new(live.snapshot()), live: Some(live), events })
                }
                Inserted::KeyReused(record) => Err(SubmitError::KeyReused(record)),
            }
        });
        let submitted = accepting.await.map_err(|panic| {
            let what = supervisor::panic_message(&*panic);
            SubmitError::Store(StoreError(format!("accepting the request failed: it panicked ({what})")))
        })?;
        let queued = matches!(&submitted, Ok(s) if s.record.id == id && !s.record.status.is_final());
        if !queued && !self.is_running(&id) {
            // Not taken on under this id (a replay, a refusal, or already over).
            self.per_user.release(&id);
        }
        submitted
    }

    /// The live handle of a request running in this process.
    pub fn live(&self, id: &str) -> Option<Arc<LiveRequest>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn running_snapshot(&self) -> Vec<(String, Arc<LiveRequest>)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.iter().map(|(id, live)| (id.clone(), live.clone())).collect()
    }

    fn is_running(&self, id: &str) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id)
    }

    fn forget(&self, id: &str) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.per_user.release(id);
    }

    /// Starts a request's supervised task, unless this process already runs
    /// it; returns its live handle and, with `follow`, a subscription to its
    /// events made before the task runs.
    fn start(
        self: &Arc<Self>,
        formation: Arc<Formation>,
        record: RequestRecord,
        follow: bool,
    ) -> (Arc<LiveRequest>, Option<tokio::sync::broadcast::Receiver<LiveEvent>>) {
        let live = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(live) = running.get(&record.id) {
                let events = follow.then(|| live.subscribe());
                return (live.clone(), events);
            }
            let live = Arc::new(LiveRequest::new(&record));
            running.insert(record.id.clone(), live.clone());
            // Counted against its user's cap (never refused: it is accepted already).
            if formation.overlord.max_pending_per_user.is_some() {
                let _ = self.per_user.admit(&record.formation_id, &record.user_id, &record.id, None);
            }
            live
        };
        let events = follow.then(|| live.subscribe());
        let taken = self.pool(&formation).take_on();
        self.spawn_request(formation, record, live.clone(), taken);
        (live, events)
    }

    fn pool(&self, formation: &Formation) -> Arc<Pool> {
        let size = formation.overlord.max_concurrent_requests.max(1);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        // Called on every accept and sweep: a lookup, no allocation,
        // and the gauge set only when the pool is made or resized.
        let pool = match pools.get(&formation.id) {
            Some(pool) if !pool.resize(size) => return pool.clone(),
            Some(pool) => pool.clone(),
            None => pools.entry(formation.id.clone()).or_insert_with(|| Arc::new(Pool::new(size))).clone(),
        };
        crate::observability::metrics::pool_limit(formation, size);
        pool
    }

    async fn session_history(&self, record: &RequestRecord) -> Vec<Turn> {
        history::session_history(self.store.as_ref(), record, 2 * SESSION_TURNS).await
    }

    /// Ends a request (first writer wins; with `fence`, only under that lease),
    /// queues its webhook, and tells the watchers of `live`, its handle when it
    /// runs in this process. Returns whether this call ended it.
    async fn complete(
        &self,
        record: &RequestRecord,
        live: Option<&LiveRequest>,
        outcome: &Outcome,
        fence: Option<Lease>,
    ) -> StoreResult<bool> {
        let delivery = self
            .webhook_target(record, live)
            .map(|url| NewDelivery { id: format!("msg_{}", uuid::Uuid::new_v4().simple()), url });
        let has_delivery = delivery.is_some();
        if !self.store.finish(&record.id, outcome, now_ms(), delivery, fence).await? {
            return Ok(false);
        }
        // A queued request ended (cancelled) before anything here took it on.
        if live.is_none() && !self.is_running(&record.id) {
            self.per_user.release(&record.id);
        }
        if has_delivery {
            self.deliveries.notify();
        }
        if let Some(finished) = self.store.get(&record.id).await? {
            self.remember_duration(&finished);
            self.feed.ended(&finished);
            if let Some(formation) = self.registry.get(&finished.formation_id) {
                crate::observability::metrics::request_ended(&formation, &finished, live.is_some_and(|l| l.promoted()));
            }
            if let Some(live) = live {
                live.finish(finished);
            }
        }
        Ok(true)
    }

    /// The webhook URL a request's end is delivered to: the request's own, else
    /// the formation's, for requests answered asynchronously.
    fn webhook_target(&self, record: &RequestRecord, live: Option<&LiveRequest>) -> Option<String> {
        if let Some(url) = &record.webhook_url {
            return Some(url.clone());
        }
        let answered_async = record.answered_async || live.is_some_and(|l| l.promoted());
        if !answered_async {
            return None;
        }
        self.registry.get(&record.formation_id)?.overlord.async_.webhook_url.clone()
    }

    /// Records that a caller who meant to wait was answered 202 (at the
    /// threshold, or at shutdown), so the request gets the formation's webhook
    /// even if it ends after a restart.
    pub async fn promote(&self, live: &LiveRequest) {
        live.promote();
        let id = live.snapshot().id;
        if let Err(e) = self.store.mark_answered_async(&id).await {
            tracing::warn!(request = %id, error = %e, "could not record the promotion to async");
        }
    }

    /// Cancels a request: a pending one never starts; a running one is stopped
    /// (its work interrupted) before this returns, within a few seconds.
    pub async fn cancel(&self, record: &RequestRecord) -> Result<RequestRecord, CancelError> {
        if record.status.is_final() {
            return Err(CancelError::AlreadyFinished(record.status));
        }
        let live = self.live(&record.id);
        let outcome = Outcome::Cancelled { message: "Request cancelled by user".into() };
        let ended = self.complete(record, live.as_deref(), &outcome, None).await.map_err(CancelError::Store)?;
        if !ended {
            let now = self.store.get(&record.id).await.map_err(CancelError::Store)?;
            return Err(CancelError::AlreadyFinished(now.map(|r| r.status).unwrap_or(record.status)));
        }
        if let Some(live) = live {
            live.cancel.cancel();
            live.stopped(Duration::from_secs(5)).await;
        }
        let finished = self.store.get(&record.id).await.map_err(CancelError::Store)?;
        Ok(finished.unwrap_or_else(|| record.clone()))
    }

    /// Waits for a request to end, up to `limit` (forever with `None`).
    /// Returns the final record, or `None` if it is still running at the limit
    /// or its work here stopped without an end (handed back at shutdown, or
    /// taken over by another server).
    pub async fn wait(&self, live: &LiveRequest, limit: Option<Duration>) -> Option<RequestRecord> {
        let mut done = live.done();
        let finished = async {
            loop {
                if let Some(record) = done.borrow_and_update().clone() {
                    return Some(record);
                }
                tokio::select! {
                    changed = done.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                    }
                    _ = live.until_stopped() => return done.borrow().clone(),
                }
            }
        };
        match limit {
            Some(limit) => tokio::time::timeout(limit, finished).await.ok().flatten(),
            None => finished.await,
        }
    }

    /// Purges finished requests past their formation's `async.retention_days`,
    /// at start-up and then every hour. Requests of formations no longer loaded
    /// go after the longest retention of those loaded, and never before 7 days.
    pub fn spawn_retention(self: &Arc<Self>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = engine.shutdown.cancelled() => return,
                }
                engine.purge_expired().await;
            }
        });
    }

    async fn purge_expired(&self) {
        let live = self.registry.snapshot();
        let cutoff = |days: f64| now_ms() - (days * 86_400_000.0) as i64;
        let mut longest: Option<f64> = None;
        for formation in live.formations.values() {
            let days = formation.overlord.async_.retention_days;
            longest = Some(longest.map_or(days, |l| l.max(days)));
            self.purge(Some(&formation.id), days, cutoff(days)).await;
        }
        let days = longest.unwrap_or(7.0).max(7.0);
        self.purge(None, days, cutoff(days)).await;
    }

    async fn purge(&self, formation_id: Option<&str>, days: f64, cutoff: i64) {
        match self.store.purge_finished_before(formation_id, cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                purged = n,
                formation = formation_id.unwrap_or("*"),
                retention_days = days,
                "purged finished requests"
            ),
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
    }
}

/// Merges progress reports: `update`'s fields replace those of `into`.
fn apply_fields(into: &mut Progress, update: Progress) {
    into.progress = update.progress.or(into.progress);
    into.current_step = update.current_step.or(into.current_step.take());
    into.total_steps = update.total_steps.or(into.total_steps);
    into.completed_steps = update.completed_steps.or(into.completed_steps);
    into.message = update.message.or(into.message.take());
}

/// What `Store::record_progress` does to a record: given fields replace the
/// stored ones, absent fields keep them.
fn apply_progress(record: &mut RequestRecord, progress: &Progress) {
    if let Some(p) = progress.progress {
        record.progress = p;
    }
    if let Some(step) = &progress.current_step {
        record.current_step = Some(step.clone());
    }
    if let Some(total) = progress.total_steps {
        record.total_steps = Some(total);
    }
    if let Some(done) = progress.completed_steps {
        record.completed_steps = Some(done);
    }
    if let Some(message) = &progress.message {
        record.status_message = Some(message.clone());
    }
}

#[cfg(test)]
mod progress_tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn request(id: &str) -> NewRequest {
        NewRequest {
            id: id.into(),
            formation_id: "f".into(),
            formation_version: "1+abc".into(),
            user_id: "u".into(),
            session_id: Some("s".into()),
            agent_id: "a".into(),
            message: "m".into(),
            mode: crate::store::Mode::Async,
            estimated_seconds: 1.0,
            idempotency_key: None,
            fingerprint: None,
            webhook_url: None,
            workflow_timeout_ms: 60_000,
            created_at: 1,
        }
    }

    /// Status polls of running requests are answered from the engine's copy, so
    /// its progress updates must do exactly what the store's do.
    #[tokio::test]
    async fn progress_applied_in_memory_matches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let Inserted::Created(mut copy) = store.insert(request("r1"), Some("me"), 30_000).await.unwrap() else {
            panic!()
        };
        let updates = [
            Progress {
                progress: Some(20.0),
                current_step: Some("one".into()),
                total_steps: Some(5),
                ..Progress::default()
            },
            Progress { message: Some("half way".into()), completed_steps: Some(2), ..Progress::default() },
            Progress { progress: Some(60.0), ..Progress::default() },
            Progress::default(),
        ];
        for update in &updates {
            store.record_progress("r1", None, update).await.unwrap();
            apply_progress(&mut copy, update);
            assert_eq!(store.get("r1").await.unwrap().unwrap(), *copy);
        }
    }
}
