//! Tests of the admin console's store methods (`admin_list`, `backlog`,
//! deliveries, re-run links) against every store backend (SQLite and PostgreSQL).

use std::sync::Arc;

use super::test_backends::{store_contract, TestStore};
use super::*;

fn request(id: &str, user: &str, agent: &str, created_at: i64) -> NewRequest {
    NewRequest {
        id: id.into(),
        formation_id: "f1".into(),
        formation_version: "1.0.0".into(),
        user_id: user.into(),
        session_id: None,
        agent_id: agent.into(),
        message: format!("message of {id}"),
        mode: Mode::Async,
        estimated_seconds: 1.0,
        idempotency_key: None,
        fingerprint: None,
        webhook_url: None,
        workflow_timeout_ms: 60_000,
        created_at,
    }
}

fn failed() -> Outcome {
    Outcome::Failed(ErrorInfo { kind: "agent_error".into(), message: "boom".into(), retryable: false })
}

async fn admin_list_spans_users_and_filters(store: Arc<TestStore>) {
    for (id, user, agent, at) in [("a", "alice", "x", 10), ("b", "bob", "y", 20), ("c", "alice", "y", 30)] {
        store.insert(request(id, user, agent, at), Some("me"), 30_000).await.expect("insert");
    }
    store
        .insert(NewRequest { formation_id: "f2".into(), ..request("other", "alice", "x", 40) }, Some("me"), 30_000)
        .await
        .unwrap();
    store.finish("b", &failed(), 50, None, None).await.expect("finish");

    let ids = |query: AdminQuery| {
        let store = &store;
        async move { store.admin_list(&query).await.expect("list").into_iter().map(|r| r.id).collect::<Vec<_>>() }
    };
    let all = AdminQuery { formation_id: "f1".into(), limit: 10, ..AdminQuery::default() };
    assert_eq!(ids(all.clone()).await, ["c", "b", "a"]);
    assert_eq!(ids(AdminQuery { limit: 1, ..all.clone() }).await, ["c"]);
    assert_eq!(ids(AdminQuery { user_id: Some("alice".into()), ..all.clone() }).await, ["c", "a"]);
    assert_eq!(ids(AdminQuery { agent_id: Some("y".into()), ..all.clone() }).await, ["c", "b"]);
    assert_eq!(ids(AdminQuery { status: Some(Status::Failed), ..all.clone() }).await, ["b"]);
    assert_eq!(ids(AdminQuery { since: Some(20), until: Some(30), ..all.clone() }).await, ["b"]);
    assert!(ids(AdminQuery { formation_id: "nope".into(), ..all }).await.is_empty());
}

async fn backlog_counts_pending_and_processing_of_one_formation(store: Arc<TestStore>) {
    for (id, at) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        store.insert(request(id, "u", "x", at), Some("me"), 30_000).await.expect("insert");
    }
    store
        .insert(NewRequest { formation_id: "f2".into(), ..request("e", "u", "x", 5) }, Some("me"), 30_000)
        .await
        .unwrap();
    store.claim("b", "me", 5, 30_000).await.expect("start");
    store.finish("c", &failed(), 6, None, None).await.expect("finish");
    assert_eq!(store.backlog("f1").await.expect("backlog"), Backlog { pending: 2, processing: 1 });
    assert_eq!(store.backlog("none").await.expect("backlog"), Backlog::default());
}

async fn a_failed_delivery_is_made_due_again_but_a_delivered_one_is_not(store: Arc<TestStore>) {
    store.insert(request("a", "u", "x", 1), Some("me"), 30_000).await.unwrap();
    store.insert(request("b", "u", "x", 2), Some("me"), 30_000).await.unwrap();
    store.insert(request("c", "u", "x", 3), Some("me"), 30_000).await.unwrap();
    let delivery = |id: &str| Some(NewDelivery { id: id.into(), url: "https://example.com/hook".into() });
    store.finish("a", &failed(), 10, delivery("wh_a"), None).await.unwrap();
    store.finish("b", &failed(), 10, delivery("wh_b"), None).await.unwrap();
    // Each attempt is made by the sender that claimed the delivery.
    assert_eq!(store.claim_deliveries("me", 10, 10, 1_000).await.unwrap().len(), 2);
    assert!(store.record_delivery("wh_a", "me", &DeliveryUpdate::Failed { error: "503".into() }).await.unwrap());
    assert!(store.record_delivery("wh_b", "me", &DeliveryUpdate::Delivered).await.unwrap());

    let before = store.delivery_of("a").await.unwrap().expect("delivery");
    assert_eq!((before.status.as_str(), before.attempts), ("failed", 1));
    let after = store.retry_delivery("a", 99).await.unwrap().expect("delivery");
    assert_eq!((after.status.as_str(), after.attempts, after.next_attempt_at), ("pending", 1, 99));
    assert_eq!(after.last_error.as_deref(), Some("503"));
    let due = store.claim_deliveries("me", 100, 10, 1_000).await.unwrap();
    assert_eq!(due.into_iter().map(|d| d.id).collect::<Vec<_>>(), ["wh_a"]);

    let delivered = store.retry_delivery("b", 99).await.unwrap().expect("delivery");
    assert_eq!(delivered.status, "delivered");
    assert_eq!(store.retry_delivery("c", 99).await.unwrap(), None);
    assert_eq!(store.delivery_of("c").await.unwrap(), None);
}

async fn reruns_are_linked_both_ways_and_go_with_their_requests(store: Arc<TestStore>) {
    for (id, at) in [("orig", 1), ("r1", 2), ("r2", 3)] {
        store.insert(request(id, "u", "x", at), Some("me"), 30_000).await.unwrap();
    }
    store.link_rerun("r1", "orig").await.unwrap();
    store.link_rerun("r2", "orig").await.unwrap();
    store.link_rerun("r2", "orig").await.unwrap(); // idempotent
    assert_eq!(
        store.reruns("orig").await.unwrap(),
        Reruns { rerun_of: None, rerun_as: vec!["r2".into(), "r1".into()] }
    );
    assert_eq!(store.reruns("r1").await.unwrap(), Reruns { rerun_of: Some("orig".into()), rerun_as: vec![] });
    assert!(store.link_rerun("orig", "missing").await.is_err(), "the original must exist");

    store.finish("r1", &failed(), 10, None, None).await.unwrap();
    store.purge_finished_before(None, 11).await.unwrap();
    assert_eq!(store.reruns("orig").await.unwrap().rerun_as, ["r2"]);
}

store_contract!(
    admin_list_spans_users_and_filters,
    backlog_counts_pending_and_processing_of_one_formation,
    a_failed_delivery_is_made_due_again_but_a_delivered_one_is_not,
    reruns_are_linked_both_ways_and_go_with_their_requests,
);
