//! The store contract: the same tests against every backend (SQLite and
//! PostgreSQL, see [`super::test_backends`]), so the two cannot drift.

use std::sync::Arc;

use super::test_backends::{store_contract, TestStore};
use super::*;

/// The trait's calls as the store tests use them: one owner, no fences.
pub(super) trait Simple {
    async fn put(&self, request: NewRequest) -> StoreResult<Inserted>;
    async fn start_attempt(&self, id: &str, now: i64) -> StoreResult<Option<u32>>;
    async fn progress(&self, id: &str, progress: &Progress) -> StoreResult<bool>;
    async fn end(&self, id: &str, outcome: &Outcome, now: i64, delivery: Option<NewDelivery>) -> StoreResult<bool>;
    async fn unfinished(&self) -> StoreResult<Vec<RequestRecord>>;
    async fn due_deliveries(&self, now: i64, limit: usize) -> StoreResult<Vec<Delivery>>;
}

pub(super) const ME: &str = "me";
pub(super) const LEASE_MS: i64 = 30_000;

impl<S: Store + ?Sized> Simple for S {
    async fn put(&self, request: NewRequest) -> StoreResult<Inserted> {
        self.insert(request, Some(ME), LEASE_MS).await
    }
    async fn start_attempt(&self, id: &str, now: i64) -> StoreResult<Option<u32>> {
        Ok(self.claim(id, ME, now, LEASE_MS).await?.map(|c| c.attempt))
    }
    async fn progress(&self, id: &str, progress: &Progress) -> StoreResult<bool> {
        self.record_progress(id, None, progress).await
    }
    async fn end(&self, id: &str, outcome: &Outcome, now: i64, delivery: Option<NewDelivery>) -> StoreResult<bool> {
        self.finish(id, outcome, now, delivery, None).await
    }
    /// Everything unfinished, as another server would see it once every lease expired.
    async fn unfinished(&self) -> StoreResult<Vec<RequestRecord>> {
        self.claimable("another", i64::MAX, Among::ALL, usize::MAX).await
    }
    /// A claim that expires at once: a read of what is due.
    async fn due_deliveries(&self, now: i64, limit: usize) -> StoreResult<Vec<Delivery>> {
        self.claim_deliveries(ME, now, limit, 0).await
    }
}

impl TestStore {
    /// Records an attempt of a delivery as if this test's sender had claimed it.
    async fn delivery_result(&self, id: &str, update: &DeliveryUpdate) -> StoreResult<bool> {
        self.force_delivery_claim(id, ME).await;
        self.record_delivery(id, ME, update).await
    }
}

pub(crate) fn request(id: &str, created_at: i64) -> NewRequest {
    NewRequest {
        id: id.into(),
        formation_id: "f1".into(),
        formation_version: "1.0.0".into(),
        user_id: "alice".into(),
        session_id: None,
        agent_id: "researcher".into(),
        message: format!("message of {id}"),
        mode: Mode::Async,
        estimated_seconds: 42.5,
        idempotency_key: None,
        fingerprint: Some(format!("fp of {id}")),
        webhook_url: None,
        workflow_timeout_ms: 60_000,
        created_at,
    }
}

pub(super) fn created(inserted: Inserted) -> RequestRecord {
    match inserted {
        Inserted::Created(record) => *record,
        Inserted::Existing(record) | Inserted::KeyReused(record) => {
            panic!("expected a new request, got existing {}", record.id)
        }
    }
}

pub(super) fn completed(text: &str) -> Outcome {
    Outcome::Completed(RequestResult { text: text.into(), artifacts: vec![] })
}

pub(super) fn delivery(id: &str) -> Option<NewDelivery> {
    Some(NewDelivery { id: id.into(), url: "https://example.com/hook".into() })
}

async fn get(store: &TestStore, id: &str) -> RequestRecord {
    store.get(id).await.expect("get").expect("request exists")
}

async fn every_field_round_trips(store: Arc<TestStore>) {
    let new = NewRequest {
        session_id: Some("s1".into()),
        idempotency_key: Some("key-1".into()),
        webhook_url: Some("https://example.com/hook".into()),
        ..request("req_1", 1_000)
    };
    let inserted = created(store.put(new.clone()).await.expect("insert"));
    assert_eq!(inserted, get(&store, "req_1").await);
    assert_eq!(inserted.status, Status::Pending);
    assert_eq!((inserted.attempts, inserted.progress), (0, 0.0));

    assert_eq!(store.start_attempt("req_1", 2_000).await.expect("start"), Some(1));
    let progress = Progress {
        progress: Some(60.0),
        current_step: Some("step 3".into()),
        total_steps: Some(5),
        completed_steps: Some(3),
        message: Some("Analyzing third source".into()),
    };
    store.progress("req_1", &progress).await.expect("progress");
    let result = RequestResult {
        text: "the report".into(),
        artifacts: vec![serde_json::json!("report.pdf"), serde_json::json!({"name": "x"})],
    };
    let finished =
        store.end("req_1", &Outcome::Completed(result.clone()), 5_000, delivery("wh_1")).await.expect("finish");
    assert!(finished);

    let expected = RequestRecord {
        id: new.id,
        formation_id: new.formation_id,
        formation_version: new.formation_version,
        user_id: new.user_id,
        session_id: new.session_id,
        agent_id: new.agent_id,
        message: new.message,
        mode: new.mode,
        answered_async: true,
        estimated_seconds: new.estimated_seconds,
        idempotency_key: new.idempotency_key,
        webhook_url: new.webhook_url,
        workflow_timeout_ms: 60_000,
        status: Status::Completed,
        progress: 100.0,
        current_step: Some("step 3".into()),
        total_steps: Some(5),
        completed_steps: Some(3),
        status_message: Some("Analyzing third source".into()),
        result: Some(result),
        error: None,
        attempts: 1,
        created_at: 1_000,
        started_at: Some(2_000),
        completed_at: Some(5_000),
        webhook: Some(WebhookState { status: "pending".into(), attempts: 0, last_error: None }),
    };
    assert_eq!(get(&store, "req_1").await, expected);
    assert_eq!(expected.duration_ms(), Some(3_000));
    // A status poll's read: every field but the message.
    let without_message = store.get_without_message("req_1").await.expect("get").expect("request exists");
    assert_eq!(*without_message, RequestRecord { message: String::new(), ..expected.clone() });
    assert_eq!(store.get_without_message("nope").await.expect("get"), None);

    // A failure keeps its error info.
    store.put(request("req_2", 1_100)).await.expect("insert");
    let error = ErrorInfo { kind: "tool_error".into(), message: "boom".into(), retryable: true };
    assert!(store.end("req_2", &Outcome::Failed(error.clone()), 6_000, None).await.expect("finish"));
    let failed = get(&store, "req_2").await;
    assert_eq!((failed.status, failed.error, failed.result), (Status::Failed, Some(error), None));
    assert_eq!(failed.progress, 0.0);
    assert_eq!(failed.webhook, None);
    assert_eq!(store.get("nope").await.expect("get"), None);
}

async fn idempotency_key_is_per_formation_and_user(store: Arc<TestStore>) {
    let keyed = |id: &str, user: &str| NewRequest {
        user_id: user.into(),
        idempotency_key: Some("same-key".into()),
        fingerprint: Some("same".into()),
        ..request(id, 1_000)
    };
    let first = created(store.put(keyed("req_a", "alice")).await.expect("insert"));
    match store.put(keyed("req_b", "alice")).await.expect("insert") {
        Inserted::Existing(existing) => assert_eq!(*existing, first),
        other => panic!("expected the existing request, got {other:?}"),
    }
    assert_eq!(store.get("req_b").await.expect("get"), None);
    created(store.put(keyed("req_c", "bob")).await.expect("insert"));
    let other_formation = NewRequest { formation_id: "f2".into(), ..keyed("req_d", "alice") };
    created(store.put(other_formation).await.expect("insert"));
    // No key: never deduplicated.
    created(store.put(request("req_e", 1_000)).await.expect("insert"));
    created(store.put(request("req_f", 1_000)).await.expect("insert"));
    // The same key for something else: told apart, nothing stored.
    let other = NewRequest { fingerprint: Some("another question".into()), ..keyed("req_g", "alice") };
    match store.put(other).await.expect("insert") {
        Inserted::KeyReused(existing) => assert_eq!(existing.id, first.id),
        other => panic!("expected the key to be refused, got {other:?}"),
    }
    assert_eq!(store.get("req_g").await.expect("get"), None);
}

async fn leases_fence_the_writes_of_a_runner_taken_over(store: Arc<TestStore>) {
    store.put(request("req_1", 1_000)).await.expect("insert");
    // "me" accepted it and holds it: nobody else may claim it.
    assert_eq!(store.claim("req_1", "other", 2_000, LEASE_MS).await.expect("claim"), None);
    assert!(store.claimable("other", 2_000, Among::ALL, 10).await.expect("claimable").is_empty());
    let mine = store.claim("req_1", ME, 2_000, LEASE_MS).await.expect("claim").expect("mine");
    assert_eq!(mine.attempt, 1);
    // Renewal keeps it; time passes without renewal and it expires.
    assert_eq!(store.renew_leases(ME, 3_000, LEASE_MS).await.expect("renew"), vec!["req_1".to_string()]);
    let later = 3_000 + LEASE_MS;
    assert_eq!(store.claimable("other", later, Among::ALL, 10).await.expect("claimable").len(), 1);
    let theirs = store.claim("req_1", "other", later, LEASE_MS).await.expect("claim").expect("taken over");
    assert_eq!(theirs.attempt, 2, "at-least-once: the takeover is another attempt");
    assert!(theirs.lease.epoch > mine.lease.epoch);
    // The old runner wakes up: its writes change nothing, and it learns it lost.
    let progress = Progress { progress: Some(50.0), ..Progress::default() };
    assert!(!store.record_progress("req_1", Some(mine.lease), &progress).await.expect("progress"));
    assert!(!store.finish("req_1", &completed("stale"), later, None, Some(mine.lease)).await.expect("finish"));
    assert!(store.renew_leases(ME, later, LEASE_MS).await.expect("renew").is_empty());
    // The new runner's writes land.
    assert!(store.record_progress("req_1", Some(theirs.lease), &progress).await.expect("progress"));
    assert!(store.finish("req_1", &completed("fresh"), later, None, Some(theirs.lease)).await.expect("finish"));
    let record = get(&store, "req_1").await;
    assert_eq!(record.result.map(|r| r.text).as_deref(), Some("fresh"));
}

async fn a_queued_request_is_anyones_to_claim_oldest_first_per_formation(store: Arc<TestStore>) {
    let queue = |id: &str, formation: &str, at: i64| NewRequest { formation_id: formation.into(), ..request(id, at) };
    for (id, formation, at) in [("req_3", "f1", 30), ("req_1", "f1", 10), ("req_2", "f2", 20), ("req_4", "f3", 40)] {
        created(store.insert(queue(id, formation, at), None, LEASE_MS).await.expect("insert"));
    }
    let ids = |records: Vec<RequestRecord>| records.into_iter().map(|r| r.id).collect::<Vec<_>>();
    // Unowned from the start: any server may take them, oldest first.
    assert_eq!(
        ids(store.claimable("other", 50, Among::ALL, 10).await.expect("claimable")),
        ["req_1", "req_2", "req_3", "req_4"]
    );
    assert_eq!(ids(store.claimable(ME, 50, Among::Formation("f1"), 1).await.expect("claimable")), ["req_1"]);
    let loaded = ["f1".to_string(), "f2".to_string()];
    assert_eq!(ids(store.claimable(ME, 50, Among::AllBut(&loaded), 10).await.expect("claimable")), ["req_4"]);
    // Nobody renews a lease nobody holds.
    assert!(store.renew_leases(ME, 60, LEASE_MS).await.expect("renew").is_empty());
    assert_eq!(store.backlog("f1").await.expect("backlog").pending, 2);
    // The first claim wins and holds it; the queue moves on.
    let claim = store.claim("req_1", "other", 60, LEASE_MS).await.expect("claim").expect("claimed");
    assert_eq!(claim.attempt, 1);
    assert_eq!(store.claim("req_1", ME, 61, LEASE_MS).await.expect("claim"), None);
    assert_eq!(ids(store.claimable(ME, 62, Among::Formation("f1"), 10).await.expect("claimable")), ["req_3"]);
    assert_eq!(store.backlog("f1").await.expect("backlog"), Backlog { pending: 1, processing: 1 });
}

async fn a_delivery_is_claimed_by_one_sender_at_a_time(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    store.end("req_1", &completed("a"), 10, delivery("wh_1")).await.expect("finish");
    let first = store.claim_deliveries("a", 100, 10, 1_000).await.expect("claim");
    assert_eq!(first.len(), 1);
    assert!(store.claim_deliveries("b", 100, 10, 1_000).await.expect("claim").is_empty(), "claimed once");
    // Only the claimer records the attempt; then it is free again.
    let retry = DeliveryUpdate::Retry { error: "HTTP 500".into(), next_attempt_at: 200 };
    assert!(!store.record_delivery("wh_1", "b", &retry).await.expect("record"));
    assert!(store.record_delivery("wh_1", "a", &retry).await.expect("record"));
    assert_eq!(store.claim_deliveries("b", 200, 10, 1_000).await.expect("claim").len(), 1);
    // A claimer that died loses its claim when it expires.
    assert!(store.claim_deliveries("a", 1_100, 10, 1_000).await.expect("claim").is_empty());
    assert_eq!(store.claim_deliveries("a", 1_200, 10, 1_000).await.expect("claim").len(), 1);
}

async fn concurrent_same_key_inserts_create_exactly_one(store: Arc<TestStore>) {
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let new = NewRequest {
                    idempotency_key: Some("k".into()),
                    fingerprint: Some("same".into()),
                    ..request(&format!("req_{i}"), 1_000)
                };
                store.put(new).await.expect("insert")
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut created_count = 0;
    for task in tasks {
        match task.await.expect("task") {
            Inserted::Created(r) => {
                created_count += 1;
                ids.insert(r.id);
            }
            Inserted::Existing(r) => {
                ids.insert(r.id);
            }
            Inserted::KeyReused(r) => panic!("same request, same fingerprint: {}", r.id),
        }
    }
    assert_eq!(created_count, 1);
    assert_eq!(ids.len(), 1, "every caller sees the same request");
}

/// Callers racing on one key with two fingerprints: one request is created;
/// every other caller gets it, as `Existing` if it asked the same, else
/// `KeyReused`. The store also holds one request for the key.
async fn concurrent_same_key_inserts_tell_fingerprints_apart(store: Arc<TestStore>) {
    let fingerprint = |i: usize| if i.is_multiple_of(3) { "other" } else { "same" };
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let new = NewRequest {
                    idempotency_key: Some("k".into()),
                    fingerprint: Some(fingerprint(i).into()),
                    ..request(&format!("req_{i}"), 1_000)
                };
                store.put(new).await.expect("insert")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let winners: Vec<&RequestRecord> =
        answers.iter().filter_map(|a| if let Inserted::Created(r) = a { Some(&**r) } else { None }).collect();
    assert_eq!(winners.len(), 1, "exactly one is created");
    let winner = winners[0].clone();
    let winning = fingerprint(winner.id.trim_start_matches("req_").parse().expect("an id"));
    for (i, answer) in answers.into_iter().enumerate() {
        match answer {
            Inserted::Created(r) => assert_eq!(r.id, winner.id),
            Inserted::Existing(r) => assert_eq!((r.id.as_str(), fingerprint(i)), (winner.id.as_str(), winning)),
            Inserted::KeyReused(r) => {
                assert_eq!(r.id, winner.id);
                assert_ne!(fingerprint(i), winning, "req_{i}: same fingerprint, yet KeyReused");
            }
        }
    }
    let all = store
        .list(&ListQuery { formation_id: "f1".into(), user_id: "alice".into(), status: None, limit: 100 })
        .await
        .expect("list");
    assert_eq!(all.len(), 1);
}

/// The same request (same id, key and fingerprint) sent many times at once,
/// as a client retrying: it is created once, and every retry gets it back.
async fn concurrent_retries_of_one_request_create_it_once(store: Arc<TestStore>) {
    let new = NewRequest { idempotency_key: Some("k".into()), ..request("twin", 1_000) };
    let answers = futures::future::join_all((0..20).map(|_| store.put(new.clone()))).await;
    let mut created_count = 0;
    for answer in answers {
        match answer.expect("insert") {
            Inserted::Created(r) => {
                created_count += 1;
                assert_eq!(r.id, "twin");
            }
            Inserted::Existing(r) => assert_eq!(r.id, "twin"),
            Inserted::KeyReused(r) => panic!("same request, yet KeyReused: {}", r.id),
        }
    }
    assert_eq!(created_count, 1);
}

/// An insert without a holder queues the request unowned: any server may claim
/// it at once.
async fn an_unowned_insert_is_claimable_at_once(store: Arc<TestStore>) {
    created(store.insert(request("free", 1_000), None, LEASE_MS).await.expect("insert"));
    created(store.put(request("held", 1_000)).await.expect("insert"));
    let claimable: Vec<String> =
        store.claimable("another", 1_001, Among::ALL, 10).await.expect("claimable").into_iter().map(|r| r.id).collect();
    assert_eq!(claimable, vec!["free".to_string()]);
}

async fn finish_happens_exactly_once(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    store.start_attempt("req_1", 2).await.expect("start");
    assert!(store.end("req_1", &completed("first"), 3, delivery("wh_1")).await.expect("finish"));
    let after_first = get(&store, "req_1").await;

    let cancel = Outcome::Cancelled { message: "too late".into() };
    assert!(!store.end("req_1", &cancel, 4, delivery("wh_2")).await.expect("finish"));
    assert!(!store.end("req_1", &completed("second"), 5, None).await.expect("finish"));
    assert_eq!(store.start_attempt("req_1", 6).await.expect("start"), None);
    store.progress("req_1", &Progress { progress: Some(5.0), ..Progress::default() }).await.expect("progress");
    assert_eq!(get(&store, "req_1").await, after_first);
    let due = store.due_deliveries(i64::MAX, 10).await.expect("due");
    assert_eq!(due.len(), 1, "only the first finish wrote an outbox row");
    assert_eq!(due[0].id, "wh_1");
    // Unknown requests are not finished either.
    assert!(!store.end("nope", &completed("x"), 7, delivery("wh_3")).await.expect("finish"));
}

async fn cancel_before_start(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    let cancel = Outcome::Cancelled { message: "Request cancelled by user".into() };
    assert!(store.end("req_1", &cancel, 2, None).await.expect("finish"));
    assert_eq!(store.start_attempt("req_1", 3).await.expect("start"), None);
    let record = get(&store, "req_1").await;
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(record.status_message.as_deref(), Some("Request cancelled by user"));
    assert_eq!((record.attempts, record.started_at, record.completed_at), (0, None, Some(2)));
    assert_eq!(record.duration_ms(), Some(1));
}

/// A user's cancel of running work (from any server) ends the lease: the
/// runner's next renewal no longer lists it, which stops the work there even if
/// the cancel's announcement was missed; the runner's late writes are refused.
async fn a_cancel_ends_the_runners_lease(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    store.put(request("req_2", 1)).await.expect("insert");
    let runner = store.claim("req_1", ME, 2, LEASE_MS).await.expect("claim").expect("claimed");
    store.claim("req_2", ME, 2, LEASE_MS).await.expect("claim").expect("claimed");
    let cancel = Outcome::Cancelled { message: "Request cancelled by user".into() };
    assert!(store.finish("req_1", &cancel, 3, None, None).await.expect("cancel"));
    assert_eq!(store.renew_leases(ME, 4, LEASE_MS).await.expect("renew"), vec!["req_2".to_string()]);
    assert!(!store.finish("req_1", &completed("late"), 5, None, Some(runner.lease)).await.expect("finish"));
    assert_eq!(get(&store, "req_1").await.status, Status::Cancelled);
}

async fn attempts_count_and_started_at_sticks(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    assert_eq!(store.start_attempt("req_1", 10).await.expect("start"), Some(1));
    assert_eq!(store.start_attempt("req_1", 20).await.expect("start"), Some(2));
    let record = get(&store, "req_1").await;
    assert_eq!((record.status, record.attempts, record.started_at), (Status::Processing, 2, Some(10)));
    assert_eq!(store.start_attempt("nope", 10).await.expect("start"), None);
}

async fn progress_keeps_fields_it_does_not_name(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    let full = Progress {
        progress: Some(20.0),
        current_step: Some("one".into()),
        total_steps: Some(4),
        completed_steps: Some(1),
        message: Some("started".into()),
    };
    store.progress("req_1", &full).await.expect("progress");
    let partial = Progress { progress: Some(45.0), completed_steps: Some(2), ..Progress::default() };
    store.progress("req_1", &partial).await.expect("progress");
    store.progress("req_1", &Progress::default()).await.expect("progress");
    let record = get(&store, "req_1").await;
    assert_eq!(record.progress, 45.0);
    assert_eq!(record.current_step.as_deref(), Some("one"));
    assert_eq!(record.total_steps, Some(4));
    assert_eq!(record.completed_steps, Some(2));
    assert_eq!(record.status_message.as_deref(), Some("started"));
    // Progress on an unknown request is ignored.
    store.progress("nope", &full).await.expect("progress");
}

async fn outbox_row_comes_only_with_finish(store: Arc<TestStore>) {
    store.put(request("req_1", 1)).await.expect("insert");
    store.put(request("req_2", 2)).await.expect("insert");
    assert!(store.due_deliveries(i64::MAX, 10).await.expect("due").is_empty());
    assert_eq!(get(&store, "req_1").await.webhook, None);

    store.end("req_1", &completed("a"), 100, delivery("wh_1")).await.expect("finish");
    store.end("req_2", &completed("b"), 50, delivery("wh_2")).await.expect("finish");
    assert!(store.due_deliveries(49, 10).await.expect("due").is_empty());
    let due = store.due_deliveries(100, 10).await.expect("due");
    assert_eq!(
        due,
        vec![
            Delivery {
                id: "wh_2".into(),
                request_id: "req_2".into(),
                formation_id: "f1".into(),
                url: "https://example.com/hook".into(),
                attempts: 0,
                next_attempt_at: 50,
                status: "pending".into(),
                last_error: None,
            },
            Delivery {
                id: "wh_1".into(),
                request_id: "req_1".into(),
                formation_id: "f1".into(),
                url: "https://example.com/hook".into(),
                attempts: 0,
                next_attempt_at: 100,
                status: "pending".into(),
                last_error: None,
            },
        ]
    );
    assert_eq!(store.due_deliveries(100, 1).await.expect("due").len(), 1);
    assert_eq!(
        get(&store, "req_1").await.webhook,
        Some(WebhookState { status: "pending".into(), attempts: 0, last_error: None })
    );
}

async fn delivery_updates(store: Arc<TestStore>) {
    for id in ["req_1", "req_2"] {
        store.put(request(id, 1)).await.expect("insert");
    }
    store.end("req_1", &completed("a"), 10, delivery("wh_1")).await.expect("finish");
    store.end("req_2", &completed("b"), 10, delivery("wh_2")).await.expect("finish");

    let retry = DeliveryUpdate::Retry { error: "HTTP 503".into(), next_attempt_at: 1_000 };
    store.delivery_result("wh_1", &retry).await.expect("record");
    let due: Vec<String> = store.due_deliveries(999, 10).await.expect("due").into_iter().map(|d| d.id).collect();
    assert_eq!(due, ["wh_2"]);
    let due = store.due_deliveries(1_000, 10).await.expect("due");
    assert_eq!(due.len(), 2);
    let wh_1 = due.iter().find(|d| d.id == "wh_1").expect("wh_1 due");
    assert_eq!((wh_1.attempts, wh_1.last_error.as_deref()), (1, Some("HTTP 503")));
    assert_eq!(
        get(&store, "req_1").await.webhook,
        Some(WebhookState { status: "pending".into(), attempts: 1, last_error: Some("HTTP 503".into()) })
    );

    store.delivery_result("wh_1", &DeliveryUpdate::Delivered).await.expect("record");
    assert_eq!(
        get(&store, "req_1").await.webhook,
        Some(WebhookState { status: "delivered".into(), attempts: 2, last_error: None })
    );

    store.delivery_result("wh_2", &DeliveryUpdate::Failed { error: "gone".into() }).await.expect("record");
    assert_eq!(
        get(&store, "req_2").await.webhook,
        Some(WebhookState { status: "failed".into(), attempts: 1, last_error: Some("gone".into()) })
    );
    assert!(store.due_deliveries(i64::MAX, 10).await.expect("due").is_empty());

    // Delivered and failed are final.
    store.delivery_result("wh_2", &DeliveryUpdate::Delivered).await.expect("record");
    assert_eq!(get(&store, "req_2").await.webhook.expect("webhook").status, "failed");
}

async fn purge_removes_old_finished_requests_and_their_deliveries(store: Arc<TestStore>) {
    for (id, created_at) in [("old", 1), ("recent", 2), ("running", 3), ("waiting", 4)] {
        store.put(request(id, created_at)).await.expect("insert");
    }
    store.end("old", &completed("a"), 100, delivery("wh_old")).await.expect("finish");
    store.end("recent", &completed("b"), 200, delivery("wh_recent")).await.expect("finish");
    store.start_attempt("running", 10).await.expect("start");

    // Another formation's purge leaves these alone.
    assert_eq!(store.purge_finished_before(Some("another-formation"), i64::MAX).await.expect("purge"), 0);
    assert_eq!(store.purge_finished_before(None, 200).await.expect("purge"), 1);
    assert_eq!(store.get("old").await.expect("get"), None);
    for id in ["recent", "running", "waiting"] {
        assert!(store.get(id).await.expect("get").is_some(), "{id} kept");
    }
    let due: Vec<String> = store.due_deliveries(i64::MAX, 10).await.expect("due").into_iter().map(|d| d.id).collect();
    assert_eq!(due, ["wh_recent"]);
    assert_eq!(store.purge_finished_before(None, i64::MAX).await.expect("purge"), 1);
    assert_eq!(store.unfinished().await.expect("unfinished").len(), 2);
}

async fn list_is_newest_first_filtered_and_limited(store: Arc<TestStore>) {
    for (id, created_at) in [("a", 1), ("b", 3), ("c", 2), ("d", 3)] {
        store.put(request(id, created_at)).await.expect("insert");
    }
    store.put(NewRequest { user_id: "bob".into(), ..request("bob_1", 5) }).await.expect("insert");
    store.put(NewRequest { formation_id: "f2".into(), ..request("f2_1", 5) }).await.expect("insert");
    store.end("c", &completed("x"), 10, None).await.expect("finish");

    let list = |status: Option<Status>, limit: usize| {
        let store = &store;
        async move {
            let query = ListQuery { formation_id: "f1".into(), user_id: "alice".into(), status, limit };
            store.list(&query).await.expect("list").into_iter().map(|r| r.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(list(None, 10).await, ["d", "b", "c", "a"]);
    assert_eq!(list(None, 2).await, ["d", "b"]);
    assert_eq!(list(Some(Status::Pending), 10).await, ["d", "b", "a"]);
    assert_eq!(list(Some(Status::Completed), 10).await, ["c"]);
    assert!(list(Some(Status::Failed), 10).await.is_empty());
    assert!(list(None, 0).await.is_empty());
}

async fn recent_durations_are_newest_first_for_one_agent(store: Arc<TestStore>) {
    // (id, agent, started, completed)
    let runs = [
        ("r1", "researcher", 10, 110),
        ("r2", "researcher", 20, 320),
        ("r3", "writer", 0, 5),
        ("r4", "researcher", 30, 60),
    ];
    for (id, agent, started, done) in runs {
        store.put(NewRequest { agent_id: agent.into(), ..request(id, 1) }).await.expect("insert");
        store.start_attempt(id, started).await.expect("start");
        store.end(id, &completed("ok"), done, None).await.expect("finish");
    }
    // Failed and unfinished requests do not count.
    store.put(request("failed", 1)).await.expect("insert");
    store.start_attempt("failed", 1).await.expect("start");
    let error = ErrorInfo { kind: "x".into(), message: "y".into(), retryable: false };
    store.end("failed", &Outcome::Failed(error), 1_000, None).await.expect("finish");
    store.put(request("running", 1)).await.expect("insert");
    store.start_attempt("running", 1).await.expect("start");

    assert_eq!(store.recent_durations("f1", "researcher", 10).await.expect("durations"), [300, 100, 30]);
    assert_eq!(store.recent_durations("f1", "researcher", 2).await.expect("durations"), [300, 100]);
    assert_eq!(store.recent_durations("f1", "writer", 10).await.expect("durations"), [5]);
    assert!(store.recent_durations("f2", "researcher", 10).await.expect("durations").is_empty());
}

async fn session_turns_are_the_latest_completed_oldest_first(store: Arc<TestStore>) {
    let turn = |id: &str, created_at: i64, session: &str| NewRequest {
        session_id: Some(session.into()),
        ..request(id, created_at)
    };
    for (id, created_at) in [("t1", 1), ("t2", 2), ("t3", 3), ("t4", 4)] {
        store.put(turn(id, created_at, "s1")).await.expect("insert");
        store.end(id, &completed(&format!("answer {id}")), 10, None).await.expect("finish");
    }
    store.put(turn("pending", 5, "s1")).await.expect("insert");
    store.put(turn("other", 6, "s2")).await.expect("insert");
    store.end("other", &completed("other"), 10, None).await.expect("finish");
    store.put(NewRequest { user_id: "bob".into(), ..turn("bob", 7, "s1") }).await.expect("insert");
    store.end("bob", &completed("bob"), 10, None).await.expect("finish");

    let turns = store.session_turns("f1", "alice", "s1", 3).await.expect("turns");
    let expected: Vec<(String, String)> =
        ["t2", "t3", "t4"].iter().map(|id| (format!("message of {id}"), format!("answer {id}"))).collect();
    assert_eq!(turns, expected);
    assert_eq!(store.session_turns("f1", "alice", "s1", 10).await.expect("turns").len(), 4);
    assert!(store.session_turns("f1", "alice", "none", 10).await.expect("turns").is_empty());
}

async fn formation_copies_are_replaced_per_owner(store: Arc<TestStore>) {
    let copies = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs.iter().map(|(f, r)| (f.to_string(), r.to_string())).collect()
    };
    store.publish_copies("a", &copies(&[("f1", "1.0.0+aaa"), ("f2", "2.0.0+bbb")]), 10).await.expect("publish a");
    store.publish_copies("b", &copies(&[("f1", "1.0.0+ccc")]), 20).await.expect("publish b");
    let seen = |all: Vec<FormationCopy>| -> Vec<(String, String, String, i64)> {
        all.into_iter().map(|c| (c.formation_id, c.owner, c.revision, c.seen_at)).collect()
    };
    let all = seen(store.formation_copies(0).await.expect("copies"));
    let row = |f: &str, o: &str, r: &str, at: i64| (f.to_string(), o.to_string(), r.to_string(), at);
    assert_eq!(
        all,
        vec![row("f1", "a", "1.0.0+aaa", 10), row("f1", "b", "1.0.0+ccc", 20), row("f2", "a", "2.0.0+bbb", 10)]
    );
    // `since` is inclusive.
    assert_eq!(seen(store.formation_copies(20).await.expect("copies")), vec![row("f1", "b", "1.0.0+ccc", 20)]);

    // A new revision replaces the old one; a formation no longer loaded is forgotten.
    store.publish_copies("a", &copies(&[("f1", "1.0.0+ddd")]), 30).await.expect("publish a again");
    let all = seen(store.formation_copies(0).await.expect("copies"));
    assert_eq!(all, vec![row("f1", "a", "1.0.0+ddd", 30), row("f1", "b", "1.0.0+ccc", 20)]);
    store.publish_copies("a", &[], 40).await.expect("publish nothing");
    assert_eq!(seen(store.formation_copies(0).await.expect("copies")), vec![row("f1", "b", "1.0.0+ccc", 20)]);
}

store_contract!(
    formation_copies_are_replaced_per_owner,
    every_field_round_trips,
    idempotency_key_is_per_formation_and_user,
    leases_fence_the_writes_of_a_runner_taken_over,
    a_queued_request_is_anyones_to_claim_oldest_first_per_formation,
    a_delivery_is_claimed_by_one_sender_at_a_time,
    concurrent_same_key_inserts_create_exactly_one,
    concurrent_same_key_inserts_tell_fingerprints_apart,
    an_unowned_insert_is_claimable_at_once,
    concurrent_retries_of_one_request_create_it_once,
    finish_happens_exactly_once,
    cancel_before_start,
    a_cancel_ends_the_runners_lease,
    attempts_count_and_started_at_sticks,
    progress_keeps_fields_it_does_not_name,
    outbox_row_comes_only_with_finish,
    delivery_updates,
    purge_removes_old_finished_requests_and_their_deliveries,
    list_is_newest_first_filtered_and_limited,
    recent_durations_are_newest_first_for_one_agent,
    session_turns_are_the_latest_completed_oldest_first,
);

/// PostgreSQL only: replicas starting together migrate the schema once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_starting_together_migrate_once() {
    use super::postgres::PgStore;
    use super::test_backends::{connect_test_database, drop_schema, test_database_url, with_search_path};
    let schema = format!("muxi_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = connect_test_database(&test_database_url()).await;
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut admin).await.expect("create schema");
    struct Dropped(String);
    impl Drop for Dropped {
        fn drop(&mut self) {
            drop_schema(&self.0);
        }
    }
    let _dropped = Dropped(schema.clone());
    let url = with_search_path(&test_database_url(), &schema);
    let opened = futures::future::join_all((0..4).map(|_| PgStore::connect(&url))).await;
    let stores: Vec<PgStore> = opened.into_iter().map(|s| s.expect("every replica opens")).collect();
    let applied: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {schema}.muxi_migrations"))
        .fetch_one(&mut admin)
        .await
        .expect("count");
    assert_eq!(applied, 3);
    // And they share one store.
    assert_eq!(created(stores[0].insert(request("req_1", 1), Some(ME), LEASE_MS).await.expect("insert")).id, "req_1");
    assert!(stores[3].get("req_1").await.expect("get").is_some());
}
