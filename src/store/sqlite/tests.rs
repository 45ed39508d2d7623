//! The SQLite store's own tests: group commit, restarts, query plans, the
//! column positions rows are read by, and the readers' snapshots.

use super::*;
use crate::store::contract_tests::{completed, created, delivery, request, Simple};
use std::sync::Arc;

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("data")).expect("open store");
    (dir, store)
}

async fn get(store: &SqliteStore, id: &str) -> RequestRecord {
    store.get(id).await.expect("get").expect("request exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inserts_all_land_and_are_group_committed() {
    const TASKS: usize = 50;
    const PER_TASK: usize = 10;
    let (_dir, store) = open();
    let store = Arc::new(store);
    let before = store.commits();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let inserts = (0..PER_TASK).map(|i| {
                    let store = store.clone();
                    async move {
                        let n = (t * PER_TASK + i) as i64;
                        store.put(request(&format!("req_{t}_{i}"), n)).await
                    }
                });
                for inserted in futures::future::join_all(inserts).await {
                    created(inserted.expect("insert"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let inserts = (TASKS * PER_TASK) as u64;
    let commits = store.commits() - before;
    eprintln!("{inserts} concurrent inserts in {commits} commits");
    assert!(commits < inserts, "writes were not batched: {commits} commits for {inserts} inserts");

    for t in 0..TASKS {
        for i in 0..PER_TASK {
            let id = format!("req_{t}_{i}");
            assert_eq!(get(&store, &id).await.id, id);
        }
    }
    let all = store
        .list(&ListQuery { formation_id: "f1".into(), user_id: "alice".into(), status: None, limit: 10_000 })
        .await
        .expect("list");
    assert_eq!(all.len(), TASKS * PER_TASK);
}

#[tokio::test]
async fn a_failing_write_fails_only_its_caller() {
    let (_dir, store) = open();
    store.put(request("dup", 1)).await.expect("insert");
    // Queue many writes at once so they share batches with the failing ones.
    let before = store.commits();
    let writes = (0..100).map(|i| {
        let id = if i % 10 == 0 { "dup".to_owned() } else { format!("ok_{i}") };
        store.put(request(&id, 2))
    });
    let results = futures::future::join_all(writes).await;
    let commits = store.commits() - before;
    assert!(commits < 100, "failing writes shared batches: {commits} commits");
    for (i, result) in results.into_iter().enumerate() {
        if i % 10 == 0 {
            let err = result.expect_err("duplicate id must fail");
            assert!(err.to_string().contains("insert"), "{err}");
        } else {
            created(result.expect("insert"));
            assert!(store.get(&format!("ok_{i}")).await.expect("get").is_some());
        }
    }
    assert_eq!(get(&store, "dup").await.created_at, 1, "the original is untouched");
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (done, running, waiting) = {
        let store = SqliteStore::open(dir.path()).expect("open");
        store.put(request("req_done", 1)).await.expect("insert");
        store.put(request("req_running", 2)).await.expect("insert");
        store.put(request("req_waiting", 3)).await.expect("insert");
        store.start_attempt("req_running", 5).await.expect("start");
        store.start_attempt("req_done", 5).await.expect("start");
        store.end("req_done", &completed("ok"), 9, delivery("wh_1")).await.expect("finish");
        let records =
            (get(&store, "req_done").await, get(&store, "req_running").await, get(&store, "req_waiting").await);
        store.close();
        assert!(store.put(request("late", 10)).await.is_err(), "writes fail once closed");
        records
    };
    let store = SqliteStore::open(dir.path()).expect("reopen");
    assert_eq!(get(&store, "req_done").await, done);
    let unfinished = store.unfinished().await.expect("unfinished");
    assert_eq!(unfinished, vec![running, waiting]);
    assert_eq!(store.due_deliveries(i64::MAX, 10).await.expect("due").len(), 1);
    // And it still takes writes.
    created(store.put(request("req_new", 11)).await.expect("insert"));
}

/// A long message is kept beside its request's row (which holds `''`), so
/// updates of the row never write it again; it is read back wherever a
/// message is read, and goes with its request. A request that is not written
/// (an id taken) leaves no message behind, and an idempotent replay none either.
#[tokio::test]
async fn a_long_message_is_kept_beside_its_row_and_goes_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open");
    let long = "m".repeat(900_000);
    let with = |id: &str, message: &str, key: Option<&str>| {
        let mut new = request(id, 1);
        new.message = message.to_owned();
        new.session_id = Some("s1".into());
        new.idempotency_key = key.map(str::to_owned);
        new
    };
    created(store.put(with("req_long", &long, Some("k1"))).await.expect("insert"));
    created(store.put(request("req_short", 2)).await.expect("insert"));
    let at_limit = "x".repeat(inserts::OUT_OF_LINE_BYTES);
    // An id taken by a request whose message is in its row: the long message
    // is written first, then taken back when the row cannot be.
    store.put(with("req_short", &at_limit, None)).await.expect_err("the id is taken");
    store.put(with("req_long", &at_limit, None)).await.expect_err("the id is taken");
    match store.put(with("req_again", &at_limit, Some("k1"))).await.expect("replay") {
        Inserted::Existing(record) | Inserted::KeyReused(record) => assert_eq!(record.message, long),
        Inserted::Created(record) => panic!("the key is held, yet {} was created", record.id),
    }
    let messages_beside = |raw: &Connection| -> Vec<(String, i64)> {
        let mut rows = raw.prepare("SELECT id, length(message) FROM request_messages ORDER BY id").unwrap();
        rows.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap()
    };
    let raw = Connection::open(dir.path().join(DB_FILE)).expect("raw open");
    assert_eq!(messages_beside(&raw), vec![("req_long".to_owned(), 900_000)]);
    let in_row: String = raw.query_row("SELECT message FROM requests WHERE id = 'req_long'", [], |r| r.get(0)).unwrap();
    assert_eq!(in_row, "");

    // Read back by id, in lists, in the queue, and as a session's history.
    assert_eq!(get(&store, "req_long").await.message, long);
    assert_eq!(get(&store, "req_short").await.message, "message of req_short");
    let query = ListQuery { formation_id: "f1".into(), user_id: "alice".into(), status: None, limit: 10 };
    let listed = store.list(&query).await.expect("list");
    assert!(listed.iter().any(|r| r.id == "req_long" && r.message == long));
    let unfinished = store.unfinished().await.expect("unfinished");
    assert!(unfinished.iter().any(|r| r.id == "req_long" && r.message == long));
    store.start_attempt("req_long", 5).await.expect("start");
    for step in 0..5 {
        let progress = Progress { progress: Some(f64::from(step) * 20.0), ..Default::default() };
        assert!(store.progress("req_long", &progress).await.expect("progress"));
    }
    store.end("req_long", &completed("done"), 9, None).await.expect("finish");
    let turns = store.session_turns("f1", "alice", "s1", 10).await.expect("turns");
    assert_eq!(turns, vec![(long.clone(), "done".to_owned())]);
    let history = store.session_messages("f1", "alice", "s1", None, 10).await.expect("messages");
    assert_eq!(history.first().map(|m| m.content.len()), Some(900_000));

    // Purged with its request.
    assert_eq!(store.purge_finished_before(None, i64::MAX).await.expect("purge"), 1);
    assert_eq!(messages_beside(&raw), vec![]);
}

/// A mode this build does not know (written by a newer one, or by hand) is a
/// read error that names it as a mode, not a record with a guessed mode.
#[tokio::test]
async fn an_unknown_mode_is_named_in_the_read_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open");
    store.put(request("req_odd", 1)).await.expect("insert");
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("raw open");
    conn.execute("UPDATE requests SET mode = 'turbo' WHERE id = 'req_odd'", []).expect("set mode");
    drop(conn);
    let err = store.get("req_odd").await.expect_err("an unknown mode must not be read");
    assert!(err.to_string().contains(r#"unknown mode "turbo""#), "{err}");
}

#[tokio::test]
async fn open_rejects_a_newer_schema() {
    let dir = tempfile::tempdir().expect("temp dir");
    drop(SqliteStore::open(dir.path()).expect("open"));
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("raw open");
    conn.pragma_update(None, "user_version", 99).expect("bump version");
    drop(conn);
    let err = SqliteStore::open(dir.path()).expect_err("newer schema must be refused");
    assert!(err.to_string().contains("schema version 99"), "{err}");
    // Reopening an up-to-date database applies nothing and works.
    let dir = tempfile::tempdir().expect("temp dir");
    drop(SqliteStore::open(dir.path()).expect("open"));
    SqliteStore::open(dir.path()).expect("reopen");
}

mod query_plans {
    /// The plan SQLite picks for `sql`, one line per step.
    fn plan(sql: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(dir.path()).unwrap();
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        // Parameters left unbound are NULL; the plan does not depend on them.
        let mut rows = explain.raw_query();
        let mut steps = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            steps.push(row.get::<_, String>(3).unwrap());
        }
        steps.join("\n")
    }

    /// The sweeper reads the queue each time room is made: it must cost the
    /// rows it returns, not the length of the queue.
    #[test]
    fn the_queue_is_read_by_seeks_of_its_index_not_by_scans() {
        let claimable = plan(super::CLAIMABLE_IN_FORMATION);
        assert!(claimable.contains("SEARCH r USING INDEX requests_queue (formation_id=?)"), "{claimable}");
        let formations = plan(crate::store::UNFINISHED_FORMATIONS);
        assert!(!formations.contains("SCAN requests"), "{formations}");
        assert_eq!(
            formations.matches("SEARCH requests USING COVERING INDEX requests_queue").count(),
            2,
            "{formations}"
        );
    }
}

mod column_positions {
    use crate::store::sqlite::rows::col;

    #[test]
    fn select_records_columns_are_where_record_from_row_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(dir.path()).unwrap();
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        let statement = conn.prepare(select_stored_records!("")).unwrap();
        let expected = [
            (col::ID, "id"),
            (col::FORMATION_ID, "formation_id"),
            (col::FORMATION_VERSION, "formation_version"),
            (col::USER_ID, "user_id"),
            (col::SESSION_ID, "session_id"),
            (col::AGENT_ID, "agent_id"),
            (col::MESSAGE, "message"),
            (col::MODE, "mode"),
            (col::ANSWERED_ASYNC, "answered_async"),
            (col::ESTIMATED_SECONDS, "estimated_seconds"),
            (col::IDEMPOTENCY_KEY, "idempotency_key"),
            (col::WEBHOOK_URL, "webhook_url"),
            (col::WORKFLOW_TIMEOUT_MS, "workflow_timeout_ms"),
            (col::STATUS, "status"),
            (col::PROGRESS, "progress"),
            (col::CURRENT_STEP, "current_step"),
            (col::TOTAL_STEPS, "total_steps"),
            (col::COMPLETED_STEPS, "completed_steps"),
            (col::STATUS_MESSAGE, "status_message"),
            (col::RESULT_TEXT, "result_text"),
            (col::ARTIFACTS, "artifacts"),
            (col::ERROR, "error"),
            (col::ATTEMPTS, "attempts"),
            (col::CREATED_AT, "created_at"),
            (col::STARTED_AT, "started_at"),
            (col::COMPLETED_AT, "completed_at"),
            (col::FINGERPRINT, "fingerprint"),
            (col::WEBHOOK_STATUS, "webhook_status"),
            (col::WEBHOOK_ATTEMPTS, "webhook_attempts"),
            (col::WEBHOOK_LAST_ERROR, "webhook_last_error"),
        ];
        assert_eq!(statement.column_count(), expected.len());
        for (position, name) in expected {
            assert_eq!(statement.column_name(position).unwrap(), name, "column {position}");
        }
    }
}

mod reader_snapshots {
    use super::*;
    use crate::store::contract_tests::{created, request};

    #[tokio::test]
    async fn a_read_sees_every_write_answered_before_it_and_idle_snapshots_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for i in 0..20 {
            let id = format!("req_{i}");
            // The reader's snapshot from the last round is now stale: the insert is seen.
            created(store.insert(request(&id, i), None, 1_000).await.unwrap());
            assert_eq!(store.get(&id).await.unwrap().map(|r| r.id), Some(id.clone()), "round {i}");
        }
        // An idle reader holds a snapshot; once the writer commits again, the
        // janitor ends it, so it does not hold the WAL back.
        store.get("req_0").await.unwrap();
        let holding = |store: &SqliteStore| {
            store.readers.idle.lock().unwrap().iter().filter(|r| !r.conn().is_autocommit()).count()
        };
        assert!(holding(&store) > 0, "a reader keeps its snapshot between reads");
        created(store.insert(request("req_last", 99), None, 1_000).await.unwrap());
        tokio::time::sleep(readers::JANITOR_EVERY * 3).await;
        assert_eq!(holding(&store), 0, "stale snapshots of idle readers end");
    }

    /// The rows `requests` holds in a copy of the database file alone (no
    /// WAL); 0 for a copy taken while a checkpoint was writing the file.
    fn rows_in_file_alone(dir: &Path) -> i64 {
        let copy = dir.join("copy.db");
        std::fs::copy(dir.join(DB_FILE), &copy).unwrap();
        let count = Connection::open(&copy)
            .and_then(|conn| conn.query_row("SELECT count(*) FROM requests", [], |row| row.get(0)));
        std::fs::remove_file(&copy).unwrap();
        count.unwrap_or(0)
    }

    #[tokio::test]
    async fn once_the_writer_is_idle_the_database_file_holds_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        // A reader holds a snapshot from before the writes, as a poll leaves one.
        store.get("req_none").await.unwrap();
        // 50 commits of a row each stay far below the 1,000 WAL pages at
        // which SQLite checkpoints by itself: only the idle writer copies them.
        for i in 0..50 {
            created(store.insert(request(&format!("req_{i}"), i), None, 1_000).await.unwrap());
        }
        // The janitor ends the stale snapshot; the writer then checkpoints it all.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rows_in_file_alone(dir.path()) < 50 {
            assert!(std::time::Instant::now() < deadline, "the idle writer never copied the WAL into the file");
            tokio::time::sleep(writer::IDLE_CHECKPOINT_AFTER).await;
        }
        // Readers start new snapshots (which read the file alone) and still see every write.
        assert_eq!(store.get("req_49").await.unwrap().map(|r| r.id).as_deref(), Some("req_49"));
    }
}
