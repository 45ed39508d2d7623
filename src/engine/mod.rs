//! The request engine: runs accepted requests in the background.
//!
//! Each request gets one task. The task waits for a slot in its formation's
//! worker pool (FIFO, `overlord.max_concurrent_requests`), then runs attempts of
//! its agent under the task and workflow timeouts, retrying retryable failures
//! with backoff, until it ends. Everything it learns goes to the store first;
//! live watchers (a waiting sync caller, SSE streams) get the same events from a
//! broadcast channel. Cancel and timeout drop the agent's future, which stops its
//! work (see `agents`).
//!
//! Requests the store holds as unfinished at start-up are run again
//! ([`Engine::recover`]): at-least-once, and the attempt count says so.

pub mod feed;
mod history;
mod live;
mod pool;

pub use live::{LiveEvent, LiveRequest};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agents::{self, AgentContext, AgentEvent, AgentFailure, AgentRequest, Turn};
use crate::formation::Formation;
use crate::overlord::{backoff, estimate};
use crate::registry::Registry;
use crate::store::{
    ErrorInfo, Inserted, NewDelivery, NewRequest, Outcome, Progress, RequestRecord, RequestResult, Status, Store,
    StoreResult,
};
use crate::time::now_ms;
use crate::webhooks::Dispatcher;

use pool::Pool;

/// How many recent durations per agent feed the estimate.
const HISTORY: usize = 20;
/// How many earlier turns of a session an agent sees.
const SESSION_TURNS: usize = 20;

/// What `submit` did.
pub struct Submitted {
    pub record: RequestRecord,
    /// The running request, when it runs in this process.
    pub live: Option<Arc<LiveRequest>>,
    /// The live request's events, subscribed before its work could publish any
    /// (so a stream opened with the request misses nothing).
    pub events: Option<tokio::sync::broadcast::Receiver<LiveEvent>>,
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
    running: Mutex<HashMap<String, Arc<LiveRequest>>>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// Recent durations (ms) per (formation, agent), newest first.
    durations: Mutex<HashMap<(String, String), Vec<i64>>>,
    /// Woken whenever a request ends with a webhook delivery to make.
    deliveries: Arc<Dispatcher>,
    shutdown: CancellationToken,
    /// Lifecycle events of every formation's requests (`GET /events`).
    feed: feed::Feeds,
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        deliveries: Arc<Dispatcher>,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            registry,
            agents: AgentContext::new(),
            running: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            durations: Mutex::new(HashMap::new()),
            deliveries,
            shutdown,
            feed: feed::Feeds::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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
        let key = (formation.id.clone(), agent_id.to_string());
        if let Some(history) = self.durations.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return from(history);
        }
        let loaded = self.store.recent_durations(&formation.id, agent_id, HISTORY).await.unwrap_or_default();
        let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        from(durations.entry(key).or_insert(loaded))
    }

    fn remember_duration(&self, record: &RequestRecord) {
        let (Status::Completed, Some(ms)) = (record.status, record.duration_ms()) else { return };
        let key = (record.formation_id.clone(), record.agent_id.clone());
        let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(history) = durations.get_mut(&key) {
            history.insert(0, ms);
            history.truncate(HISTORY);
        }
    }

    /// Stores a new request durably, then starts it in the background. With
    /// `follow`, the caller also gets a subscription to its events, made before
    /// the work can publish any.
    pub async fn submit(
        self: &Arc<Self>,
        formation: Arc<Formation>,
        request: NewRequest,
        follow: bool,
    ) -> StoreResult<Submitted> {
        match self.store.insert(request).await? {
            Inserted::Created(record) => {
                self.feed.accepted(&record);
                let (live, events) = self.start(formation, record.clone(), follow);
                Ok(Submitted { record, live: Some(live), events })
            }
            Inserted::Existing(record) => {
                let live = self.live(&record.id);
                let events = live.as_deref().filter(|_| follow).map(LiveRequest::subscribe);
                Ok(Submitted { record, live, events })
            }
        }
    }

    /// The live handle of a request running in this process.
    pub fn live(&self, id: &str) -> Option<Arc<LiveRequest>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Runs every request the store holds as unfinished (after a crash or restart).
    pub async fn recover(self: &Arc<Self>) -> StoreResult<usize> {
        let unfinished = self.store.unfinished().await?;
        let count = unfinished.len();
        for record in unfinished {
            match self.registry.get(&record.formation_id) {
                Some(formation) => {
                    self.start(formation, record, false);
                }
                None => {
                    let error = ErrorInfo {
                        kind: "formation_unavailable".into(),
                        message: format!("formation `{}` is no longer loaded", record.formation_id),
                        retryable: false,
                    };
                    self.complete(&record, None, Outcome::Failed(error)).await?;
                }
            }
        }
        if count > 0 {
            tracing::info!(count, "recovered unfinished requests");
        }
        Ok(count)
    }

    /// Starts a request's task; returns its live handle and, with `follow`, a
    /// subscription to its events made before the task runs.
    fn start(
        self: &Arc<Self>,
        formation: Arc<Formation>,
        record: RequestRecord,
        follow: bool,
    ) -> (Arc<LiveRequest>, Option<tokio::sync::broadcast::Receiver<LiveEvent>>) {
        let live = Arc::new(LiveRequest::new(&record));
        let events = follow.then(|| live.subscribe());
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(record.id.clone(), live.clone());
        let engine = self.clone();
        let task_live = live.clone();
        tokio::spawn(async move {
            let id = record.id.clone();
            engine.drive(formation, record, &task_live).await;
            engine.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            task_live.mark_stopped();
        });
        (live, events)
    }

    fn pool(&self, formation: &Formation) -> Arc<Pool> {
        let size = formation.overlord.max_concurrent_requests.max(1);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.entry(formation.id.clone()).or_insert_with(|| Arc::new(Pool::new(size)));
        pool.resize(size);
        pool.clone()
    }

    /// The whole life of one request in this process.
    async fn drive(&self, formation: Arc<Formation>, record: RequestRecord, live: &LiveRequest) {
        let pool = self.pool(&formation);
        let _permit = tokio::select! {
            permit = pool.acquire() => permit,
            _ = live.cancel.cancelled() => return,
            _ = self.shutdown.cancelled() => return,
        };
        // Boxed: a request waiting for a slot holds only this small future, not
        // the largest state of the agent's work.
        let outcome = match Box::pin(self.attempts(&formation, &record, live)).await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => return, // cancelled (already recorded) or shutting down
            Err(e) => {
                tracing::error!(request = %record.id, error = %e, "store failed while running a request");
                return;
            }
        };
        if let Err(e) = self.complete(&record, Some(live), outcome).await {
            tracing::error!(request = %record.id, error = %e, "could not record the end of a request");
        }
    }

    /// Runs attempts until success, a final failure, cancel or shutdown (`None`).
    async fn attempts(
        &self,
        formation: &Formation,
        record: &RequestRecord,
        live: &LiveRequest,
    ) -> StoreResult<Option<Outcome>> {
        let Some(spec) = formation.agent(Some(&record.agent_id)) else {
            return Ok(Some(Outcome::Failed(ErrorInfo {
                kind: "unknown_agent".into(),
                message: format!("agent `{}` is not in formation `{}`", record.agent_id, formation.id),
                retryable: false,
            })));
        };
        let timeouts = &formation.overlord.timeouts;
        let policy = &formation.overlord.retry;
        let first_start = record.started_at.unwrap_or_else(now_ms);
        let workflow_deadline_ms = first_start + (timeouts.workflow_timeout * 1000.0) as i64;
        let history = self.session_history(record).await;

        loop {
            let now = now_ms();
            let Some(attempt) = self.store.start_attempt(&record.id, now).await? else {
                return Ok(None);
            };
            live.apply(|r| {
                r.status = Status::Processing;
                r.attempts = attempt;
                r.started_at.get_or_insert(now);
            });
            let remaining = Duration::from_millis((workflow_deadline_ms - now_ms()).max(0) as u64);
            let (limit, limit_name, limit_secs) = if timeouts.task() <= remaining {
                (timeouts.task(), "task_timeout", timeouts.task_timeout)
            } else {
                (remaining, "workflow_timeout", timeouts.workflow_timeout)
            };
            let request = AgentRequest {
                request_id: record.id.clone(),
                formation_id: record.formation_id.clone(),
                agent_id: record.agent_id.clone(),
                user_id: record.user_id.clone(),
                session_id: record.session_id.clone(),
                message: record.message.clone(),
                attempt,
                history: history.clone(),
            };
            let (tx, mut rx) = mpsc::unbounded_channel();
            let work = agents::run(&self.agents, formation, spec, request, tx);
            tokio::pin!(work);
            let deadline = tokio::time::sleep(limit);
            tokio::pin!(deadline);
            let ended = loop {
                tokio::select! {
                    result = &mut work => break Ended::Ran(result),
                    Some(event) = rx.recv() => self.on_event(record, live, event).await,
                    _ = live.cancel.cancelled() => break Ended::Cancelled,
                    _ = &mut deadline => break Ended::TimedOut,
                    _ = self.shutdown.cancelled() => break Ended::Shutdown,
                }
            };
            // Events sent just before the end still count.
            while let Ok(event) = rx.try_recv() {
                self.on_event(record, live, event).await;
            }
            match ended {
                Ended::Ran(Ok(output)) => {
                    return Ok(Some(Outcome::Completed(RequestResult {
                        text: output.text,
                        artifacts: output.artifacts,
                    })));
                }
                Ended::Ran(Err(failure)) => {
                    if !failure.retryable || attempt >= policy.max_attempts {
                        return Ok(Some(Outcome::Failed(error_info(failure, attempt))));
                    }
                    // Our backoff is capped at max_delay; a delay the other side
                    // asked for (Retry-After) is honoured in full, within the
                    // workflow timeout.
                    let until_deadline = Duration::from_millis((workflow_deadline_ms - now_ms()).max(0) as u64);
                    let delay = backoff::honour_retry_after(
                        backoff::jittered(policy, attempt),
                        failure.retry_after,
                        until_deadline,
                    );
                    if delay >= until_deadline {
                        return Ok(Some(Outcome::Failed(timeout_error("workflow_timeout", timeouts.workflow_timeout))));
                    }
                    let note = format!(
                        "attempt {attempt} of {} failed ({}); retrying in {:.1}s",
                        policy.max_attempts,
                        failure.message,
                        delay.as_secs_f64()
                    );
                    tracing::warn!(request = %record.id, "{note}");
                    let progress = Progress { message: Some(note), ..Progress::default() };
                    self.store.record_progress(&record.id, &progress).await?;
                    live.apply(|r| apply_progress(r, &progress));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = live.cancel.cancelled() => return Ok(None),
                        _ = self.shutdown.cancelled() => return Ok(None),
                    }
                }
                Ended::TimedOut => return Ok(Some(Outcome::Failed(timeout_error(limit_name, limit_secs)))),
                Ended::Cancelled | Ended::Shutdown => return Ok(None),
            }
        }
    }

    /// Restored (seeded) messages and earlier turns of the request's session.
    async fn session_history(&self, record: &RequestRecord) -> Vec<Turn> {
        history::session_history(self.store.as_ref(), record, 2 * SESSION_TURNS).await
    }

    async fn on_event(&self, record: &RequestRecord, live: &LiveRequest, event: AgentEvent) {
        match event {
            AgentEvent::Progress(update) => {
                let progress = Progress {
                    progress: update.progress.map(|p| p.clamp(0.0, 100.0)),
                    current_step: update.step,
                    total_steps: update.total_steps,
                    completed_steps: update.completed_steps,
                    message: update.message,
                };
                match self.store.record_progress(&record.id, &progress).await {
                    Ok(()) => live.apply(|r| apply_progress(r, &progress)),
                    Err(e) => tracing::warn!(request = %record.id, error = %e, "could not record progress"),
                }
                live.publish(LiveEvent::Progress(progress));
                self.feed.progress(&record.formation_id, || live.snapshot());
            }
            AgentEvent::Content(text) => live.publish(LiveEvent::Content(text)),
        }
    }

    /// Ends a request (first writer wins), queues its webhook, and tells the
    /// watchers of `live`, its handle when it runs in this process. Returns
    /// whether this call ended it.
    async fn complete(
        &self,
        record: &RequestRecord,
        live: Option<&LiveRequest>,
        outcome: Outcome,
    ) -> StoreResult<bool> {
        let delivery = self
            .webhook_target(record, live)
            .map(|url| NewDelivery { id: format!("msg_{}", uuid::Uuid::new_v4().simple()), url });
        let has_delivery = delivery.is_some();
        if !self.store.finish(&record.id, &outcome, now_ms(), delivery).await? {
            return Ok(false);
        }
        if has_delivery {
            self.deliveries.notify();
        }
        if let Some(finished) = self.store.get(&record.id).await? {
            self.remember_duration(&finished);
            self.feed.ended(&finished);
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
        let answered_async = record.mode == "async" || live.is_some_and(|l| l.promoted());
        if !answered_async {
            return None;
        }
        self.registry.get(&record.formation_id)?.overlord.async_.webhook_url.clone()
    }

    /// Cancels a request: a pending one never starts; a running one is stopped
    /// (its work interrupted) before this returns, within a few seconds.
    pub async fn cancel(&self, record: &RequestRecord) -> Result<RequestRecord, CancelError> {
        if record.status.is_final() {
            return Err(CancelError::AlreadyFinished(record.status));
        }
        let live = self.live(&record.id);
        let outcome = Outcome::Cancelled { message: "Request cancelled by user".into() };
        let ended = self.complete(record, live.as_deref(), outcome).await.map_err(CancelError::Store)?;
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
    /// Returns the final record, or `None` if it is still running at the limit.
    pub async fn wait(&self, live: &LiveRequest, limit: Option<Duration>) -> Option<RequestRecord> {
        let mut done = live.done();
        let finished = async {
            loop {
                if let Some(record) = done.borrow_and_update().clone() {
                    return Some(record);
                }
                if done.changed().await.is_err() {
                    return None;
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

enum Ended {
    Ran(Result<agents::AgentOutput, AgentFailure>),
    Cancelled,
    TimedOut,
    Shutdown,
}

fn error_info(failure: AgentFailure, attempts: u32) -> ErrorInfo {
    let message = if failure.retryable && attempts > 1 {
        format!("{} (gave up after {attempts} attempts)", failure.message)
    } else {
        failure.message
    };
    ErrorInfo { kind: failure.kind, message, retryable: failure.retryable }
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

fn timeout_error(limit: &str, seconds: f64) -> ErrorInfo {
    ErrorInfo {
        kind: "timeout".into(),
        message: format!("request exceeded {limit} ({seconds}s) and was stopped"),
        retryable: false,
    }
}

#[cfg(test)]
mod tests {
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
            mode: "async".into(),
            estimated_seconds: 1.0,
            idempotency_key: None,
            webhook_url: None,
            created_at: 1,
        }
    }

    /// Status polls of running requests are answered from the engine's copy, so
    /// its progress updates must do exactly what the store's do.
    #[tokio::test]
    async fn progress_applied_in_memory_matches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let Inserted::Created(mut copy) = store.insert(request("r1")).await.unwrap() else { panic!() };
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
            store.record_progress("r1", update).await.unwrap();
            apply_progress(&mut copy, update);
            assert_eq!(store.get("r1").await.unwrap().unwrap(), copy);
        }
    }
}
