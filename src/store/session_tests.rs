//! Tests of the store's session and event-feed methods against every backend
//! (SQLite and PostgreSQL; kept apart from `sqlite.rs` so both evolve without merge conflicts).

use std::sync::Arc;

use super::test_backends::{store_contract, TestStore};
use super::*;

fn turn(id: &str, user: &str, session: Option<&str>, created_at: i64) -> NewRequest {
    NewRequest {
        id: id.into(),
        formation_id: "f1".into(),
        formation_version: "1".into(),
        user_id: user.into(),
        session_id: session.map(str::to_string),
        agent_id: "a".into(),
        message: format!("asked {id}"),
        mode: crate::store::Mode::Sync,
        estimated_seconds: 1.0,
        idempotency_key: None,
        fingerprint: None,
        workflow_timeout_ms: 60_000,
        webhook_url: None,
        created_at,
    }
}

fn done(text: &str) -> Outcome {
    Outcome::Completed(RequestResult { text: text.into(), artifacts: vec![] })
}

fn seed(role: &str, content: &str, timestamp: i64) -> NewSessionMessage {
    NewSessionMessage { role: role.into(), content: content.into(), agent_id: None, timestamp }
}

async fn sessions_are_counted_and_ordered_by_latest_activity(store: Arc<TestStore>) {
    store.insert(turn("r1", "alice", Some("s1"), 10), Some("me"), 30_000).await.unwrap();
    store.finish("r1", &done("a1"), 50, None, None).await.unwrap();
    store.insert(turn("r2", "alice", Some("s2"), 20), Some("me"), 30_000).await.unwrap();
    store.insert(turn("r3", "alice", Some("s1"), 30), Some("me"), 30_000).await.unwrap(); // still running
    store.insert(turn("r4", "bob", Some("s1"), 40), Some("me"), 30_000).await.unwrap();
    store.insert(turn("r5", "alice", None, 60), Some("me"), 30_000).await.unwrap();
    store
        .restore_session("f1", "alice", "s3", vec![seed("user", "old", 5), seed("assistant", "older", 6)])
        .await
        .unwrap();

    let sessions = store.sessions("f1", "alice", false, 10).await.unwrap();
    let shown: Vec<(&str, i64, u64, u64)> =
        sessions.iter().map(|s| (s.session_id.as_str(), s.last_activity, s.message_count, s.request_count)).collect();
    // s1: r1 ended at 50 (2 messages) + r3 running (1 message).
    assert_eq!(shown, [("s1", 50, 3, 2), ("s2", 20, 1, 1), ("s3", 6, 2, 0)]);
    assert_eq!(sessions[0].created_at, 10);
    assert_eq!(store.sessions("f1", "alice", false, 1).await.unwrap().len(), 1);
    assert_eq!(store.sessions("f1", "bob", false, 10).await.unwrap().len(), 1);
    assert!(store.sessions("f2", "alice", false, 10).await.unwrap().is_empty());
    assert_eq!(store.session("f1", "alice", "s2").await.unwrap().map(|s| s.message_count), Some(1));
    // Active: a request still pending or processing (r2 in s2, r3 in s1).
    let active: Vec<(String, u64)> = store
        .sessions("f1", "alice", true, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.session_id, s.active_requests))
        .collect();
    assert_eq!(active, [("s1".to_string(), 1), ("s2".to_string(), 1)]);
    assert_eq!(store.session("f1", "bob", "s2").await.unwrap(), None);
}

async fn messages_come_in_order_with_seeds_and_a_restore_replaces_the_seed(store: Arc<TestStore>) {
    store
        .restore_session("f1", "alice", "s1", vec![seed("system", "be brief", 1), seed("user", "hi", 1)])
        .await
        .unwrap();
    store.insert(turn("r1", "alice", Some("s1"), 10), Some("me"), 30_000).await.unwrap();
    store.finish("r1", &done("a1"), 20, None, None).await.unwrap();
    store.insert(turn("r2", "alice", Some("s1"), 20), Some("me"), 30_000).await.unwrap();
    store
        .finish(
            "r2",
            &Outcome::Failed(ErrorInfo { kind: "x".into(), message: "no".into(), retryable: false }),
            25,
            None,
            None,
        )
        .await
        .unwrap();
    let messages = store.session_messages("f1", "alice", "s1", None, 100).await.unwrap();
    let shown: Vec<(&str, &str, Option<&str>)> =
        messages.iter().map(|m| (m.role.as_str(), m.content.as_str(), m.request_id.as_deref())).collect();
    assert_eq!(
        shown,
        [
            ("system", "be brief", None),
            ("user", "hi", None),
            ("user", "asked r1", Some("r1")),
            // r1 ended in the millisecond r2 began: its answer comes first.
            ("assistant", "a1", Some("r1")),
            ("user", "asked r2", Some("r2")),
        ]
    );
    assert_eq!(messages[4].status, Some(Status::Failed));
    // The latest `limit`, still oldest first.
    let last_two = store.session_messages("f1", "alice", "s1", None, 2).await.unwrap();
    assert_eq!(last_two.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), ["a1", "asked r2"]);
    // Before a time: only what came earlier.
    let before = store.session_messages("f1", "alice", "s1", Some(20), 100).await.unwrap();
    assert_eq!(before.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), ["be brief", "hi", "asked r1"]);
    store.restore_session("f1", "alice", "s1", vec![seed("user", "again", 2)]).await.unwrap();
    let messages = store.session_messages("f1", "alice", "s1", None, 100).await.unwrap();
    assert_eq!(messages.iter().filter(|m| m.request_id.is_none()).count(), 1);
    assert!(store.session_messages("f1", "bob", "s1", None, 100).await.unwrap().is_empty());
}

async fn lifecycle_since_finds_requests_accepted_or_ended_since(store: Arc<TestStore>) {
    store.insert(turn("old", "alice", None, 10), Some("me"), 30_000).await.unwrap();
    store.insert(turn("old_ended_late", "alice", None, 20), Some("me"), 30_000).await.unwrap();
    store.finish("old_ended_late", &done("x"), 200, None, None).await.unwrap();
    store.insert(turn("new", "alice", None, 150), Some("me"), 30_000).await.unwrap();
    store.insert(turn("bobs", "bob", None, 160), Some("me"), 30_000).await.unwrap();
    let ids: Vec<String> =
        store.lifecycle_since("f1", "alice", 100, 10).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["old_ended_late", "new"]);
    assert_eq!(store.lifecycle_since("f1", "alice", 0, 1).await.unwrap().len(), 1);
}

store_contract!(
    sessions_are_counted_and_ordered_by_latest_activity,
    messages_come_in_order_with_seeds_and_a_restore_replaces_the_seed,
    lifecycle_since_finds_requests_accepted_or_ended_since,
);
