//! Faults injected into a real engine: a panic in a request's work, and a
//! store whose writes fail for a while (the real SQLite store behind a switch).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::supervisor::End;
use super::*;
use crate::formation::AgentKind;
use crate::store::sqlite::SqliteStore;
use crate::store::{
    AdminQuery, Among, Backlog, Claim, Delivery, DeliveryUpdate, FormationCopy, ListQuery, Mode, NewSessionMessage,
    Owner, Reruns, SessionMessage, SessionSummary, StoreHealth, StoreResult,
};
use crate::testing::{agent, formation_with_agents};

/// The real store, whose writes fail while `failing` is set, as they do when
/// the disk is full.
struct Faulty {
    inner: SqliteStore,
    failing: AtomicBool,
}

impl Faulty {
    fn check(&self, what: &str) -> StoreResult<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError(format!("{what}: database or disk is full")));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for Faulty {
    async fn insert(&self, request: NewRequest, holder: Option<&Owner>, lease_ms: i64) -> StoreResult<Inserted> {
        self.check("insert")?;
        self.inner.insert(request, holder, lease_ms).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<RequestRecord>> {
        self.inner.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>> {
        self.inner.list(query).await
    }
    async fn claim(&self, id: &str, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Option<Claim>> {
        self.check("claim")?;
        self.inner.claim(id, owner, now, lease_ms).await
    }
    async fn renew_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>> {
        self.check("renew_leases")?;
        self.inner.renew_leases(owner, now, lease_ms).await
    }
    async fn release(&self, id: &str, lease: Lease) -> StoreResult<bool> {
        self.check("release")?;
        self.inner.release(id, lease).await
    }
    async fn clear_others_leases(&self, owner: &Owner) -> StoreResult<u64> {
        self.inner.clear_others_leases(owner).await
    }
    async fn record_progress(&self, id: &str, fence: Option<Lease>, progress: &Progress) -> StoreResult<bool> {
        self.check("record_progress")?;
        self.inner.record_progress(id, fence, progress).await
    }
    async fn mark_answered_async(&self, id: &str) -> StoreResult<()> {
        self.check("mark_answered_async")?;
        self.inner.mark_answered_async(id).await
    }
    async fn finish(
        &self,
        id: &str,
        outcome: &Outcome,
        now: i64,
        delivery: Option<NewDelivery>,
        fence: Option<Lease>,
    ) -> StoreResult<bool> {
        self.check("finish")?;
        self.inner.finish(id, outcome, now, delivery, fence).await
    }
    async fn claimable(
        &self,
        owner: &Owner,
        now: i64,
        among: Among<'_>,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        self.inner.claimable(owner, now, among, limit).await
    }
    async fn purge_finished_before(&self, formation_id: Option<&str>, cutoff: i64) -> StoreResult<u64> {
        self.inner.purge_finished_before(formation_id, cutoff).await
    }
    async fn recent_durations(&self, formation_id: &str, agent_id: &str, limit: usize) -> StoreResult<Vec<i64>> {
        self.inner.recent_durations(formation_id, agent_id, limit).await
    }
    async fn session_turns(&self, f: &str, u: &str, s: &str, limit: usize) -> StoreResult<Vec<(String, String)>> {
        self.inner.session_turns(f, u, s, limit).await
    }
    async fn claim_deliveries(&self, owner: &Owner, now: i64, limit: usize, ms: i64) -> StoreResult<Vec<Delivery>> {
        self.inner.claim_deliveries(owner, now, limit, ms).await
    }
    async fn record_delivery(&self, id: &str, owner: &Owner, update: &DeliveryUpdate) -> StoreResult<bool> {
        self.inner.record_delivery(id, owner, update).await
    }
    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
    async fn admin_list(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>> {
        self.inner.admin_list(query).await
    }
    async fn backlog(&self, formation_id: &str) -> StoreResult<Backlog> {
        self.inner.backlog(formation_id).await
    }
    async fn delivery_of(&self, request_id: &str) -> StoreResult<Option<Delivery>> {
        self.inner.delivery_of(request_id).await
    }
    async fn retry_delivery(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>> {
        self.check("retry_delivery")?;
        self.inner.retry_delivery(request_id, now).await
    }
    async fn link_rerun(&self, request_id: &str, original_id: &str) -> StoreResult<()> {
        self.check("link_rerun")?;
        self.inner.link_rerun(request_id, original_id).await
    }
    async fn reruns(&self, request_id: &str) -> StoreResult<Reruns> {
        self.inner.reruns(request_id).await
    }
    async fn outbox_stats(&self, now: i64) -> StoreResult<Option<crate::store::OutboxStats>> {
        self.inner.outbox_stats(now).await
    }
    async fn sessions(&self, f: &str, u: &str, active_only: bool, limit: usize) -> StoreResult<Vec<SessionSummary>> {
        self.inner.sessions(f, u, active_only, limit).await
    }
    async fn session(&self, f: &str, u: &str, s: &str) -> StoreResult<Option<SessionSummary>> {
        self.inner.session(f, u, s).await
    }
    async fn session_messages(
        &self,
        f: &str,
        u: &str,
        s: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<SessionMessage>> {
        self.inner.session_messages(f, u, s, before, limit).await
    }
    async fn restore_session(&self, f: &str, u: &str, s: &str, messages: Vec<NewSessionMessage>) -> StoreResult<()> {
        self.check("restore_session")?;
        self.inner.restore_session(f, u, s, messages).await
    }
    async fn lifecycle_since(&self, f: &str, u: &str, since: i64, limit: usize) -> StoreResult<Vec<RequestRecord>> {
        self.inner.lifecycle_since(f, u, since, limit).await
    }
    async fn publish_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()> {
        self.check("publish_copies")?;
        self.inner.publish_copies(owner, copies, now).await
    }
    async fn formation_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
        self.inner.formation_copies(since).await
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<Faulty>,
    engine: Arc<Engine>,
    formation: Arc<Formation>,
}

/// An engine over a faulty store, with one formation whose agent `a` runs `script`.
fn harness(script: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty {
        inner: SqliteStore::open(&dir.path().join("data")).unwrap(),
        failing: AtomicBool::new(false),
    });
    let (_, engine) = crate::testing::engine_over(store.clone(), dir.path(), CancellationToken::new());
    let kind = AgentKind::Command {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        retryable_exit_codes: vec![],
        env: Default::default(),
    };
    let mut formation = formation_with_agents(vec![agent("a", kind)]);
    formation.dir = dir.path().to_path_buf();
    Harness { _dir: dir, store, engine, formation: Arc::new(formation) }
}

fn new_request(id: &str) -> NewRequest {
    NewRequest {
        id: id.into(),
        formation_id: "test".into(),
        formation_version: "0.0.0+test".into(),
        user_id: "u".into(),
        session_id: None,
        agent_id: "a".into(),
        message: "m".into(),
        mode: Mode::Sync,
        estimated_seconds: 1.0,
        idempotency_key: None,
        fingerprint: None,
        webhook_url: None,
        workflow_timeout_ms: 60_000,
        created_at: now_ms(),
    }
}

async fn stored(h: &Harness, id: &str) -> RequestRecord {
    h.store.get(id).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_panic_in_the_work_ends_the_request_once_and_wakes_its_waiters() {
    let h = harness("true");
    let Inserted::Created(record) = h.store.insert(new_request("r1"), Some("test"), 30_000).await.unwrap() else {
        panic!("created")
    };
    let live = Arc::new(LiveRequest::new(&record));
    h.engine.running.lock().unwrap().insert(record.id.clone(), live.clone());
    let waiter = {
        let (engine, live) = (h.engine.clone(), live.clone());
        tokio::spawn(async move { engine.wait(&live, None).await })
    };
    let work = async {
        panic!("boom in the agent's task");
        #[allow(unreachable_code)]
        End::Gone
    };
    h.engine.supervise(&record, &live, work).await;

    let woken = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woken").unwrap();
    let woken = woken.expect("the waiter gets the end");
    assert_eq!(woken.status, Status::Failed);
    let error = woken.error.expect("error");
    assert_eq!(error.kind, "internal_error");
    assert!(error.message.contains("boom in the agent's task"), "{}", error.message);
    assert_eq!(stored(&h, "r1").await.status, Status::Failed, "the end is in the store");
    assert!(h.engine.live("r1").is_none(), "no longer running");
    assert!(live.has_stopped());
}

#[tokio::test]
async fn an_end_the_store_refuses_is_answered_from_memory_then_recorded() {
    let h = harness("sleep 0.5; echo '{\"result\": \"done\"}'");
    let submitted = h.engine.submit(h.formation.clone(), new_request("r1"), Start::Now).await.unwrap();
    let live = submitted.live.expect("runs here");
    // Wait for the attempt to start, then let the disk fill up.
    for _ in 0..200 {
        if stored(&h, "r1").await.status == Status::Processing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.store.failing.store(true, Ordering::SeqCst);

    let answered = tokio::time::timeout(Duration::from_secs(20), h.engine.wait(&live, None))
        .await
        .expect("the waiter is not left hanging")
        .expect("an end");
    assert_eq!(answered.status, Status::Completed);
    assert_eq!(answered.result.map(|r| r.text).as_deref(), Some("done"));
    assert_eq!(stored(&h, "r1").await.status, Status::Processing, "not recorded while writes fail");
    assert_eq!(h.engine.live("r1").expect("still owned").snapshot().status, Status::Completed);

    // Space comes back: the end is recorded, once.
    h.store.failing.store(false, Ordering::SeqCst);
    let mut record = stored(&h, "r1").await;
    for _ in 0..400 {
        if record.status.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        record = stored(&h, "r1").await;
    }
    assert_eq!(record.status, Status::Completed);
    assert_eq!(record.result.map(|r| r.text).as_deref(), Some("done"));
    assert_eq!(record.attempts, 1);
    live.stopped(Duration::from_secs(5)).await;
    assert!(live.has_stopped() && h.engine.live("r1").is_none());
}

#[tokio::test]
async fn a_flood_of_progress_costs_few_writes_and_ends_with_the_agent() {
    // 300,000 progress lines, then the result.
    let script =
        "i=0; while [ $i -lt 300000 ]; do echo '{\"progress\": 50, \"step\": \"working\"}'; i=$((i+1)); done; \
                  echo '{\"progress\": 99, \"step\": \"last\"}'; echo '{\"result\": \"done\"}'";
    let h = harness(script);
    let commits_before = h.store.inner.commits();
    let submitted = h.engine.submit(h.formation.clone(), new_request("r1"), Start::Now).await.unwrap();
    let ended = h.engine.wait(&submitted.live.unwrap(), None).await.expect("ends");
    assert_eq!(ended.status, Status::Completed);
    assert_eq!(ended.current_step.as_deref(), Some("last"), "the latest progress wins");
    let commits = h.store.inner.commits() - commits_before;
    println!("300,000 progress lines: {commits} store commits");
    assert!(commits < 1_000, "{commits} commits for 300,000 progress lines");
}

#[tokio::test]
async fn a_submit_abandoned_by_its_caller_is_still_committed_and_run() {
    let h = harness("echo '{\"result\": \"done\"}'");
    let mut submit = Box::pin(h.engine.submit(h.formation.clone(), new_request("r-gone"), Start::Now));
    // The caller starts the submit, then goes away (a client that disconnects).
    assert!(futures::poll!(submit.as_mut()).is_pending(), "the insert waits for its commit");
    drop(submit);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match h.store.get("r-gone").await.unwrap() {
                Some(record) if record.status.is_final() => break record,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the abandoned request was committed, started and finished");
    assert_eq!(ended.status, Status::Completed);
    assert_eq!(ended.result.map(|r| r.text).as_deref(), Some("done"));
}
