//! Tests of how a request's message is kept and read back, against every
//! backend: a message of any length comes back whole from every read, through
//! updates of its request, and goes with it.

use std::sync::Arc;

use super::test_backends::{store_contract, TestStore};
use super::*;

fn asking(id: &str, message: &str, created_at: i64) -> NewRequest {
    NewRequest {
        id: id.into(),
        formation_id: "f1".into(),
        formation_version: "1".into(),
        user_id: "alice".into(),
        session_id: Some("s1".into()),
        agent_id: "a".into(),
        message: message.into(),
        mode: Mode::Async,
        estimated_seconds: 1.0,
        idempotency_key: Some(format!("key of {id}")),
        fingerprint: None,
        workflow_timeout_ms: 60_000,
        webhook_url: None,
        created_at,
    }
}

async fn messages_of_every_length_are_read_back_whole(store: Arc<TestStore>) {
    // Short, just under and at the SQLite store's out-of-row length, and long.
    let messages: Vec<(String, String)> = [5, 4_095, 4_096, 900_000]
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("req_{i}"), format!("{i}").repeat(len)))
        .collect();
    for (i, (id, message)) in messages.iter().enumerate() {
        let inserted = store.insert(asking(id, message, 10 + i as i64), None, 30_000).await.unwrap();
        assert!(matches!(inserted, Inserted::Created(_)), "{id} is new");
    }
    let whole = |records: Vec<RequestRecord>| -> Vec<(String, usize)> {
        let mut seen: Vec<(String, usize)> = records.into_iter().map(|r| (r.id, r.message.len())).collect();
        seen.sort();
        seen
    };
    let expected: Vec<(String, usize)> = messages.iter().map(|(id, m)| (id.clone(), m.len())).collect();
    let mut by_id = Vec::new();
    for (id, message) in &messages {
        let record = store.get(id).await.unwrap().expect("stored");
        assert!(record.message == *message, "{id}: the message read back differs");
        by_id.push(record);
    }
    assert_eq!(whole(by_id), expected);
    let query = ListQuery { formation_id: "f1".into(), user_id: "alice".into(), status: None, limit: 10 };
    assert_eq!(whole(store.list(&query).await.unwrap()), expected);
    assert_eq!(whole(store.claimable("me", 50, Among::ALL, 10).await.unwrap()), expected);
    assert_eq!(whole(store.lifecycle_since("f1", "alice", 0, 10).await.unwrap()), expected);
    // A replay of a key answers with the request that holds it, message whole.
    let (long_id, long) = &messages[3];
    match store.insert(asking(long_id, "again", 99), None, 30_000).await.unwrap() {
        Inserted::Existing(record) | Inserted::KeyReused(record) => assert_eq!(record.message.len(), long.len()),
        Inserted::Created(record) => panic!("the key is held, yet {} was created", record.id),
    }

    // Updates of the request leave its message as it was.
    let claim = store.claim(long_id, "me", 60, 30_000).await.unwrap().expect("claimed");
    let progress = Progress { progress: Some(50.0), current_step: Some("halfway".into()), ..Default::default() };
    assert!(store.record_progress(long_id, Some(claim.lease), &progress).await.unwrap());
    let done = Outcome::Completed(RequestResult { text: "answered".into(), artifacts: vec![] });
    assert!(store.finish(long_id, &done, 70, None, Some(claim.lease)).await.unwrap());
    assert!(store.get(long_id).await.unwrap().expect("stored").message == *long);
    let turns = store.session_turns("f1", "alice", "s1", 10).await.unwrap();
    assert!(turns == vec![(long.clone(), "answered".to_owned())], "the session's one completed turn, whole");
    let history = store.session_messages("f1", "alice", "s1", None, 10).await.unwrap();
    assert_eq!(history.iter().map(|m| m.content.len()).max(), Some(long.len()));

    // Purged with its request; the others stay.
    assert_eq!(store.purge_finished_before(Some("f1"), 100).await.unwrap(), 1);
    assert!(store.get(long_id).await.unwrap().is_none());
    assert_eq!(whole(store.list(&query).await.unwrap()), expected[..3].to_vec());
}

store_contract!(messages_of_every_length_are_read_back_whole);
