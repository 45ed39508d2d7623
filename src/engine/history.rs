//! What an agent is told of its session before its request: the messages a
//! restore seeded and the earlier turns (questions and their answers), oldest
//! first, from `Store::session_messages`.

use crate::agents::Turn;
use crate::store::{RequestRecord, Status, Store};

/// The latest `limit` messages of `record`'s session from before it: seeded
/// ones, and the questions and answers of its completed requests.
pub async fn session_history(store: &dyn Store, record: &RequestRecord, limit: usize) -> Vec<Turn> {
    let Some(session) = &record.session_id else { return Vec::new() };
    // Room for the questions of requests that did not complete, left out below.
    let messages = store
        .session_messages(&record.formation_id, &record.user_id, session, Some(record.created_at), 2 * limit)
        .await
        .unwrap_or_default();
    let mut turns: Vec<Turn> = messages
        .into_iter()
        // A request that did not complete has no answer: its question is left out too.
        .filter(|m| m.request_id.is_none() || m.status == Some(Status::Completed))
        .filter(|m| m.request_id.as_deref() != Some(record.id.as_str()))
        .map(|m| Turn { role: m.role, content: m.content })
        .collect();
    turns.drain(..turns.len().saturating_sub(limit));
    turns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{ErrorInfo, Inserted, NewRequest, NewSessionMessage, Outcome, RequestResult};

    fn request(id: &str, created_at: i64) -> NewRequest {
        NewRequest {
            id: id.into(),
            formation_id: "f".into(),
            formation_version: "1".into(),
            user_id: "u".into(),
            session_id: Some("s".into()),
            agent_id: "a".into(),
            message: format!("q {id}"),
            mode: crate::store::Mode::Sync,
            estimated_seconds: 1.0,
            idempotency_key: None,
            fingerprint: None,
            workflow_timeout_ms: 60_000,
            webhook_url: None,
            created_at,
        }
    }

    #[tokio::test]
    async fn seeds_and_completed_turns_before_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let seed = |role: &str, content: &str| NewSessionMessage {
            role: role.into(),
            content: content.into(),
            agent_id: None,
            timestamp: 1,
        };
        store
            .restore_session("f", "u", "s", vec![seed("user", "before"), seed("assistant", "remembered")])
            .await
            .unwrap();
        store.insert(request("r1", 10), Some("me"), 30_000).await.unwrap();
        store
            .finish("r1", &Outcome::Completed(RequestResult { text: "a r1".into(), artifacts: vec![] }), 11, None, None)
            .await
            .unwrap();
        store.insert(request("r2", 20), Some("me"), 30_000).await.unwrap();
        let failed = ErrorInfo { kind: "x".into(), message: "no".into(), retryable: false };
        store.finish("r2", &Outcome::Failed(failed), 21, None, None).await.unwrap();
        let Inserted::Created(current) = store.insert(request("r3", 30), Some("me"), 30_000).await.unwrap() else {
            panic!()
        };
        store.insert(request("r4", 40), Some("me"), 30_000).await.unwrap(); // after it: not history

        let history = session_history(&store, &current, 40).await;
        let shown: Vec<(&str, &str)> = history.iter().map(|t| (t.role.as_str(), t.content.as_str())).collect();
        assert_eq!(shown, [("user", "before"), ("assistant", "remembered"), ("user", "q r1"), ("assistant", "a r1")]);
        let latest = session_history(&store, &current, 2).await;
        assert_eq!(latest.iter().map(|t| t.content.as_str()).collect::<Vec<_>>(), ["q r1", "a r1"]);
    }
}
