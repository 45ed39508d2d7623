//! Tests of `Store::show_state`, a status poll's read, against every backend:
//! the state it lends is the record's (without its message) at every step of
//! a request's life, and an unknown id shows nothing.

use std::sync::Arc;

use super::test_backends::{store_contract, TestStore};
use super::*;

/// What `show_state` shows for `id`, as a record's state would be built: the
/// fields copied out (the state itself is only lent), or `None`.
async fn shown(store: &TestStore, id: &str) -> Option<String> {
    let mut seen = Vec::new();
    let found = store.show_state(id, &mut |state| seen.push(format!("{state:?}"))).await.unwrap();
    assert_eq!(found, !seen.is_empty(), "{id}: `found` says what was shown");
    assert!(seen.len() <= 1, "{id}: shown {} times", seen.len());
    seen.pop()
}

/// The state `get_without_message` gives, in the same form.
async fn expected(store: &TestStore, id: &str) -> String {
    let record = store.get_without_message(id).await.unwrap().expect("stored");
    format!("{:?}", RequestState::of(&record))
}

async fn the_state_shown_is_the_records_through_a_requests_life(store: Arc<TestStore>) {
    assert_eq!(shown(&store, "req_none").await, None);

    let mut asked = crate::testing::new_request("req_s");
    asked.session_id = Some("s1".into());
    asked.message = "x".repeat(5_000); // kept beside its row by SQLite
    store.insert(asked, None, 30_000).await.unwrap();
    let queued = shown(&store, "req_s").await.expect("queued");
    assert!(queued.contains("status: Pending"), "{queued}");
    assert_eq!(queued, expected(&store, "req_s").await);

    let claim = store.claim("req_s", "me", 60, 30_000).await.unwrap().expect("claimed");
    let step = Progress {
        progress: Some(40.0),
        current_step: Some("step \"two\"\n".into()),
        total_steps: Some(3),
        completed_steps: Some(1),
        message: Some("almost ✓".into()),
    };
    assert!(store.record_progress("req_s", Some(claim.lease), &step).await.unwrap());
    let running = shown(&store, "req_s").await.expect("running");
    assert!(running.contains("step \\\"two\\\"") && running.contains("almost ✓"), "{running}");
    assert_eq!(running, expected(&store, "req_s").await);

    let answer = RequestResult { text: "answered".into(), artifacts: vec![serde_json::json!({"a": [1, null]})] };
    let hook = NewDelivery { id: "wh_1".into(), url: "http://127.0.0.1:9/hook".into() };
    assert!(store.finish("req_s", &Outcome::Completed(answer), 90, Some(hook), Some(claim.lease)).await.unwrap());
    let ended = shown(&store, "req_s").await.expect("ended");
    assert!(ended.contains("answered") && ended.contains("webhook: Some"), "{ended}");
    assert_eq!(ended, expected(&store, "req_s").await);

    store.insert(crate::testing::new_request("req_f"), None, 30_000).await.unwrap();
    let error = ErrorInfo { kind: "timeout".into(), message: "slow\tagent".into(), retryable: true };
    assert!(store.finish("req_f", &Outcome::Failed(error), 95, None, None).await.unwrap());
    let failed = shown(&store, "req_f").await.expect("failed");
    assert!(failed.contains("slow\\tagent") && failed.contains("webhook: None"), "{failed}");
    assert_eq!(failed, expected(&store, "req_f").await);
}

store_contract!(the_state_shown_is_the_records_through_a_requests_life);
