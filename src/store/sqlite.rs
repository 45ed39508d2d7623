//! The SQLite store: one file, `DATA_DIR/muxi.db`, in WAL mode with
//! `synchronous=FULL`, so a write has reached the disk when its call returns.
//!
//! # Group commit
//! Every write goes to ONE writer thread ([`writer`]) that owns the only
//! read-write connection. The thread takes one command from its channel, then
//! drains whatever else is already queued (up to [`writer::MAX_BATCH`]), runs
//! them all in ONE transaction and commits once: one fsync pays for the whole
//! batch. Only then does it answer each caller through its oneshot. Each
//! command runs inside its own SAVEPOINT, so a command that fails is rolled
//! back alone and fails only its own caller; new requests queued side by side
//! are written many to a statement ([`inserts`]), and a failed one still fails
//! alone. Under load the batches grow by themselves (while one commit fsyncs,
//! the next batch queues up); alone, a write costs one transaction as usual.
//! The single writer also makes idempotent inserts race-free.
//!
//! Reads run over a small pool of read-only connections ([`readers`]); WAL
//! lets them run beside the writer. A read of one record by id runs on the
//! calling task with the reader's own prepared statement, the others on
//! tokio's blocking pool with cached statements.
//!
//! Dropping the store (or [`SqliteStore::close`]) closes the channel; the writer
//! finishes everything already queued, then stops.
//!
//! The schema and its migrations are in [`schema`].

mod in_place;
mod inserts;
mod readers;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use readers::{ById, ReadPool};
use writer::{Counts, Job, Write};

use super::{
    AdminQuery, Among, Backlog, Claim, Delivery, DeliveryUpdate, ErrorInfo, FormationCopy, Inserted, Lease, ListQuery,
    Mode, NewDelivery, NewRequest, NewSessionMessage, Outcome, Owner, Progress, RequestRecord, RequestResult, Reruns,
    SessionMessage, SessionSummary, Status, Store, StoreError, StoreHealth, StoreResult, WebhookState,
};

/// The statements the writer connection keeps prepared.
const WRITER_STATEMENTS: usize = 64;
/// How long a connection waits on a lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The database file inside the data folder.
const DB_FILE: &str = "muxi.db";

/// How much of the database file is read through a memory map.
const MMAP_BYTES: i64 = 256 * 1024 * 1024;

/// A formation's claimable requests (`?4`), oldest first: its range of the
/// queue index, whose size is what the formation's queue holds.
const CLAIMABLE_IN_FORMATION: &str = select_records!(
    "WHERE r.formation_id = ?4 AND r.status IN ('pending', 'processing') \
     AND (r.lease_owner IS NULL OR (r.lease_owner != ?1 AND r.lease_expires_at <= ?2)) \
     ORDER BY r.created_at, r.id LIMIT ?3"
);

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    /// `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
    commits: Arc<AtomicU64>,
    health: Arc<Mutex<StoreHealth>>,
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/muxi.db`, migrates its schema and
    /// starts the writer thread.
    pub fn open(data_dir: &Path) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError(format!("cannot create data folder {}: {e}", data_dir.display())))?;
        let path = data_dir.join(DB_FILE);
        let opening = |e: rusqlite::Error| StoreError(format!("open {}: {e}", path.display()));

        let mut conn = Connection::open(&path).map_err(opening)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(opening)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(opening)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError(format!(
                "open {}: cannot switch to WAL mode (journal_mode is {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(opening)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(opening)?;
        // Pages are read through a memory map rather than copied by read(2).
        conn.pragma_update(None, "mmap_size", MMAP_BYTES).map_err(opening)?;
        schema::migrate(&mut conn).map_err(|e| StoreError(format!("migrate {}: {}", path.display(), e.0)))?;
        // Room for every statement the writer runs (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
        // A data folder we cannot write to is found now, not at the first request.
        probe_write(&conn).map_err(|e| StoreError(format!("{} is not writable: {e}", path.display())))?;

        let commits = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let readers = ReadPool::open(&path, generation.clone()).map_err(opening)?;

        let health = Arc::new(Mutex::new(StoreHealth::writable()));
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("muxi-store-writer".into())
            .spawn({
                let counts = Counts { commits: commits.clone(), generation };
                let health = health.clone();
                move || writer::writer_loop(conn, receiver, counts, health)
            })
            .map_err(|e| StoreError(format!("cannot start the writer thread: {e}")))?;

        tracing::debug!(path = %path.display(), "sqlite store open");
        Ok(SqliteStore {
            path,
            writer: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            readers,
            commits,
            health,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Transactions committed by the writer so far. With group commit this is
    /// usually far fewer than the writes made.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stops taking writes, lets the writer finish everything already queued,
    /// and waits for it. Writes after this fail; reads still work. Idempotent.
    pub fn close(&self) {
        drop(self.writer.lock().expect("store writer mutex poisoned").take());
        let thread = self.thread.lock().expect("store thread mutex poisoned").take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
        }
    }

    /// Runs `op` in the writer's next batch and waits for that batch's commit.
    async fn write<T, F>(&self, name: &'static str, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.send(name, false, op).await
    }

    /// [`Self::write`] for an `op` that changes the database by one statement
    /// at most (any number of reads before it): it runs without a savepoint.
    async fn write_one<T, F>(&self, name: &'static str, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.send(name, true, op).await
    }

    async fn send<T, F>(&self, name: &'static str, one_statement: bool, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.queue(name, Box::new(Write::new(name, one_statement, op, reply)), answer).await
    }

    /// Queues `job` for the writer's next batch and waits for its `answer`.
    async fn queue<T>(
        &self,
        name: &str,
        job: Box<dyn Job>,
        answer: oneshot::Receiver<StoreResult<T>>,
    ) -> StoreResult<T> {
        {
            let writer = self.writer.lock().expect("store writer mutex poisoned");
            let sender = writer.as_ref().ok_or_else(|| StoreError(format!("{name}: the store is closed")))?;
            sender.send(job).map_err(|_| StoreError(format!("{name}: the store writer has stopped")))?;
        }
        answer.await.map_err(|_| StoreError(format!("{name}: the store writer stopped before answering")))?
    }

    /// Runs `op` on a read-only connection on tokio's blocking pool.
    async fn read<T, F>(&self, name: &'static str, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        let turn = readers.free.clone().acquire_owned().await.map_err(|_| StoreError(format!("{name}: closed")))?;
        tokio::task::spawn_blocking(move || {
            let out = readers.with(op);
            drop(turn);
            out
        })
        .await
        .map_err(|e| StoreError(format!("{name}: read task failed: {e}")))?
        .map_err(|e| StoreError(format!("{name}: {e}")))
    }

    /// The one record `query` finds by `id`. A point read (one row by key, a
    /// few pages of the memory map) runs on this thread: cheaper than a
    /// hand-off to the blocking pool, and short enough not to hold up the tasks
    /// behind it.
    async fn record_by_id(&self, name: &'static str, query: ById, id: &str) -> StoreResult<Option<Box<RequestRecord>>> {
        let _turn = self.readers.free.acquire().await.map_err(|_| StoreError(format!("{name}: closed")))?;
        self.readers.record_by_id(query, id).map_err(|e| StoreError(format!("{name}: {e}")))
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Writes one row and syncs it: proves the folder and the file take writes.
fn probe_write(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); \
         INSERT INTO meta (key, value) VALUES ('opened_at', strftime('%s','now')) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
    )
}

// ---------------------------------------------------------------------------
// Rows

fn conversion_error(column: usize, err: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(err))
}

fn json_column<T: DeserializeOwned>(row: &Row, column: usize) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(column)?;
    text.map(|text| serde_json::from_str(&text).map_err(|e| conversion_error(column, e))).transpose()
}

#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
struct UnknownStatus(String);

/// The column's text, borrowed from the row (a status or a mode is parsed,
/// not kept, so it need not be copied into a `String` first).
fn text_column<'row>(row: &'row Row, column: usize) -> rusqlite::Result<&'row str> {
    row.get_ref(column)?.as_str().map_err(|e| conversion_error(column, e))
}

fn status_column(row: &Row, column: usize) -> rusqlite::Result<Status> {
    let text = text_column(row, column)?;
    Status::parse(text).ok_or_else(|| conversion_error(column, UnknownStatus(text.to_owned())))
}

fn mode_column(row: &Row, column: usize) -> rusqlite::Result<Mode> {
    let text = text_column(row, column)?;
    Mode::parse(text).ok_or_else(|| conversion_error(column, UnknownStatus(text.to_owned())))
}

/// The positions of [`select_records!`]'s columns: read by position, a row
/// costs no name lookups (each is a scan of the column names).
mod col {
    pub const ID: usize = 0;
    pub const FORMATION_ID: usize = 1;
    pub const FORMATION_VERSION: usize = 2;
    pub const USER_ID: usize = 3;
    pub const SESSION_ID: usize = 4;
    pub const AGENT_ID: usize = 5;
    pub const MESSAGE: usize = 6;
    pub const MODE: usize = 7;
    pub const ANSWERED_ASYNC: usize = 8;
    pub const ESTIMATED_SECONDS: usize = 9;
    pub const IDEMPOTENCY_KEY: usize = 10;
    pub const WEBHOOK_URL: usize = 11;
    pub const WORKFLOW_TIMEOUT_MS: usize = 12;
    pub const STATUS: usize = 13;
    pub const PROGRESS: usize = 14;
    pub const CURRENT_STEP: usize = 15;
    pub const TOTAL_STEPS: usize = 16;
    pub const COMPLETED_STEPS: usize = 17;
    pub const STATUS_MESSAGE: usize = 18;
    pub const RESULT_TEXT: usize = 19;
    pub const ARTIFACTS: usize = 20;
    pub const ERROR: usize = 21;
    pub const ATTEMPTS: usize = 22;
    pub const CREATED_AT: usize = 23;
    pub const STARTED_AT: usize = 24;
    pub const COMPLETED_AT: usize = 25;
    pub const FINGERPRINT: usize = 26;
    pub const WEBHOOK_STATUS: usize = 27;
    pub const WEBHOOK_ATTEMPTS: usize = 28;
    pub const WEBHOOK_LAST_ERROR: usize = 29;
}

/// A row of [`select_records!`].
fn record_from_row(row: &Row) -> rusqlite::Result<RequestRecord> {
    let result = match row.get::<_, Option<String>>(col::RESULT_TEXT)? {
        Some(text) => Some(RequestResult { text, artifacts: json_column(row, col::ARTIFACTS)?.unwrap_or_default() }),
        None => None,
    };
    let webhook = match row.get::<_, Option<String>>(col::WEBHOOK_STATUS)? {
        Some(status) => Some(WebhookState {
            status,
            attempts: row.get(col::WEBHOOK_ATTEMPTS)?,
            last_error: row.get(col::WEBHOOK_LAST_ERROR)?,
        }),
        None => None,
    };
    Ok(RequestRecord {
        id: row.get(col::ID)?,
        formation_id: row.get(col::FORMATION_ID)?,
        formation_version: row.get(col::FORMATION_VERSION)?,
        user_id: row.get(col::USER_ID)?,
        session_id: row.get(col::SESSION_ID)?,
        agent_id: row.get(col::AGENT_ID)?,
        message: row.get(col::MESSAGE)?,
        mode: mode_column(row, col::MODE)?,
        answered_async: row.get(col::ANSWERED_ASYNC)?,
        estimated_seconds: row.get(col::ESTIMATED_SECONDS)?,
        idempotency_key: row.get(col::IDEMPOTENCY_KEY)?,
        webhook_url: row.get(col::WEBHOOK_URL)?,
        workflow_timeout_ms: row.get(col::WORKFLOW_TIMEOUT_MS)?,
        status: status_column(row, col::STATUS)?,
        progress: row.get(col::PROGRESS)?,
        current_step: row.get(col::CURRENT_STEP)?,
        total_steps: row.get(col::TOTAL_STEPS)?,
        completed_steps: row.get(col::COMPLETED_STEPS)?,
        status_message: row.get(col::STATUS_MESSAGE)?,
        result,
        error: json_column::<ErrorInfo>(row, col::ERROR)?,
        attempts: row.get(col::ATTEMPTS)?,
        created_at: row.get(col::CREATED_AT)?,
        started_at: row.get(col::STARTED_AT)?,
        completed_at: row.get(col::COMPLETED_AT)?,
        webhook,
    })
}

fn delivery_from_row(row: &Row) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: row.get("id")?,
        request_id: row.get("request_id")?,
        formation_id: row.get("formation_id")?,
        url: row.get("url")?,
        attempts: row.get("attempts")?,
        next_attempt_at: row.get("next_attempt_at")?,
        status: row.get("status")?,
        last_error: row.get("last_error")?,
    })
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn to_json(name: &str, value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("{name}: cannot encode JSON: {e}")))
}

// ---------------------------------------------------------------------------
// The trait

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, request: NewRequest, holder: Option<&Owner>, lease_ms: i64) -> StoreResult<Inserted> {
        let (job, answer) = inserts::InsertJob::new(request, holder.map(str::to_owned), lease_ms);
        self.queue("insert", Box::new(job), answer).await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<RequestRecord>> {
        Ok(self.record_by_id("get", ById::Record, id).await?.map(|record| *record))
    }

    async fn get_without_message(&self, id: &str) -> StoreResult<Option<Box<RequestRecord>>> {
        self.record_by_id("get_without_message", ById::State, id).await
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>> {
        let query = query.clone();
        self.read("list", move |conn| {
            conn.prepare_cached(select_records!(
                "WHERE r.formation_id = ?1 AND r.user_id = ?2 AND (?3 IS NULL OR r.status = ?3) \
                 ORDER BY r.created_at DESC, r.id DESC LIMIT ?4"
            ))?
            .query_map(
                params![query.formation_id, query.user_id, query.status.map(Status::as_str), sql_limit(query.limit)],
                record_from_row,
            )?
            .collect()
        })
        .await
    }

    async fn claim(&self, id: &str, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Option<Claim>> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.write_one("claim", move |conn| {
            conn.prepare_cached(
                "UPDATE requests SET status = 'processing', attempts = attempts + 1, \
                 started_at = COALESCE(started_at, ?2), lease_owner = ?3, lease_epoch = lease_epoch + 1, \
                 lease_expires_at = ?2 + ?4 \
                 WHERE id = ?1 AND status IN ('pending', 'processing') \
                 AND (lease_owner IS NULL OR lease_owner = ?3 OR lease_expires_at <= ?2) \
                 RETURNING attempts, lease_epoch",
            )?
            .query_row(params![id, now, owner, lease_ms], |row| {
                Ok(Claim { attempt: row.get(0)?, lease: Lease { epoch: row.get(1)? } })
            })
            .optional()
        })
        .await
    }

    async fn renew_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>> {
        let owner = owner.to_owned();
        self.write("renew_leases", move |conn| {
            conn.prepare_cached(
                "UPDATE requests SET lease_expires_at = ?2 + ?3 \
                 WHERE lease_owner = ?1 AND status IN ('pending', 'processing') RETURNING id",
            )?
            .query_map(params![owner, now, lease_ms], |row| row.get(0))?
            .collect()
        })
        .await
    }

    async fn release(&self, id: &str, lease: Lease) -> StoreResult<bool> {
        let id = id.to_owned();
        self.write("release", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE requests SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ?1 AND lease_epoch = ?2 AND status IN ('pending', 'processing')",
                )?
                .execute(params![id, lease.epoch])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn clear_others_leases(&self, owner: &Owner) -> StoreResult<u64> {
        let owner = owner.to_owned();
        self.write("clear_others_leases", move |conn| {
            let requests = conn
                .prepare_cached(
                    "UPDATE requests SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE lease_owner IS NOT NULL AND lease_owner != ?1 AND status IN ('pending', 'processing')",
                )?
                .execute([&owner])?;
            conn.prepare_cached(
                "UPDATE deliveries SET claimed_by = NULL, claim_expires_at = NULL \
                 WHERE claimed_by IS NOT NULL AND claimed_by != ?1 AND status = 'pending'",
            )?
            .execute([&owner])?;
            Ok(requests as u64)
        })
        .await
    }

    async fn record_progress(&self, id: &str, fence: Option<Lease>, progress: &Progress) -> StoreResult<bool> {
        let id = id.to_owned();
        let progress = progress.clone();
        self.write("record_progress", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE requests SET progress = COALESCE(?2, progress), \
                     current_step = COALESCE(?3, current_step), \
                     total_steps = COALESCE(?4, total_steps), \
                     completed_steps = COALESCE(?5, completed_steps), \
                     status_message = COALESCE(?6, status_message) \
                     WHERE id = ?1 AND status IN ('pending', 'processing') AND (?7 IS NULL OR lease_epoch = ?7)",
                )?
                .execute(params![
                    id,
                    progress.progress,
                    progress.current_step,
                    progress.total_steps,
                    progress.completed_steps,
                    progress.message,
                    fence.map(|l| l.epoch),
                ])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn mark_answered_async(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        self.write("mark_answered_async", move |conn| {
            conn.prepare_cached("UPDATE requests SET answered_async = 1 WHERE id = ?1")?.execute([id])?;
            Ok(())
        })
        .await
    }

    async fn finish(
        &self,
        id: &str,
        outcome: &Outcome,
        now: i64,
        delivery: Option<NewDelivery>,
        fence: Option<Lease>,
    ) -> StoreResult<bool> {
        let id = id.to_owned();
        let status = outcome.status().as_str();
        let (result_text, artifacts, error, message) = match outcome {
            Outcome::Completed(result) => {
                (Some(result.text.clone()), Some(to_json("finish", &result.artifacts)?), None, None)
            }
            Outcome::Failed(error) => (None, None, Some(to_json("finish", error)?), None),
            Outcome::Cancelled { message } => (None, None, None, Some(message.clone())),
        };
        self.write("finish", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE requests SET status = ?2, result_text = ?3, artifacts = ?4, error = ?5, \
                     status_message = COALESCE(?6, status_message), completed_at = ?7, \
                     progress = CASE WHEN ?2 = 'completed' THEN 100 ELSE progress END, \
                     lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ?1 AND status IN ('pending', 'processing') \
                     AND (?8 IS NULL OR lease_epoch = ?8)",
                )?
                .execute(params![id, status, result_text, artifacts, error, message, now, fence.map(|l| l.epoch)])?;
            if changed == 0 {
                return Ok(false);
            }
            if let Some(delivery) = delivery {
                conn.prepare_cached(
                    "INSERT INTO deliveries (id, request_id, formation_id, url, status, attempts, \
                     next_attempt_at, created_at) \
                     SELECT ?1, id, formation_id, ?2, 'pending', 0, ?3, ?3 FROM requests WHERE id = ?4",
                )?
                .execute(params![delivery.id, delivery.url, now, id])?;
            }
            Ok(true)
        })
        .await
    }

    async fn claimable(
        &self,
        owner: &Owner,
        now: i64,
        among: Among<'_>,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        let owner = owner.to_owned();
        let (formation, loaded) = match among {
            Among::Formation(id) => (Some(id.to_owned()), Vec::new()),
            Among::AllBut(ids) => (None, ids.to_vec()),
        };
        self.read("claimable", move |conn| {
            // Each formation's queue in its own index range, oldest first.
            let mut queue = conn.prepare_cached(CLAIMABLE_IN_FORMATION)?;
            let mut read = |formation: &str| -> rusqlite::Result<Vec<RequestRecord>> {
                queue.query_map(params![owner, now, sql_limit(limit), formation], record_from_row)?.collect()
            };
            if let Some(formation) = formation {
                return read(&formation);
            }
            let formations: Vec<String> = conn
                .prepare_cached(super::UNFINISHED_FORMATIONS)?
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut records = Vec::new();
            for formation in formations.iter().filter(|f| !loaded.contains(f)) {
                records.extend(read(formation)?);
            }
            Ok(super::oldest_first(records, limit))
        })
        .await
    }

    async fn purge_finished_before(&self, formation_id: Option<&str>, cutoff: i64) -> StoreResult<u64> {
        let formation_id = formation_id.map(str::to_owned);
        self.write("purge_finished_before", move |conn| {
            const FINISHED: &str = "status IN ('completed', 'failed', 'cancelled') AND completed_at < ?1 \
                                    AND (?2 IS NULL OR formation_id = ?2)";
            conn.prepare_cached(&format!(
                "DELETE FROM deliveries WHERE request_id IN (SELECT id FROM requests WHERE {FINISHED})"
            ))?
            .execute(params![cutoff, formation_id])?;
            let deleted = conn
                .prepare_cached(&format!("DELETE FROM requests WHERE {FINISHED}"))?
                .execute(params![cutoff, formation_id])?;
            Ok(deleted as u64)
        })
        .await
    }

    async fn recent_durations(&self, formation_id: &str, agent_id: &str, limit: usize) -> StoreResult<Vec<i64>> {
        let (formation_id, agent_id) = (formation_id.to_owned(), agent_id.to_owned());
        self.read("recent_durations", move |conn| {
            conn.prepare_cached(
                "SELECT completed_at - COALESCE(started_at, created_at) FROM requests \
                 WHERE formation_id = ?1 AND agent_id = ?2 AND status = 'completed' \
                 ORDER BY completed_at DESC, id DESC LIMIT ?3",
            )?
            .query_map(params![formation_id, agent_id, sql_limit(limit)], |row| row.get(0))?
            .collect()
        })
        .await
    }

    async fn session_turns(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, String)>> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        self.read("session_turns", move |conn| {
            // The latest `limit` turns, newest first; reversed below.
            let mut turns = conn
                .prepare_cached(
                    "SELECT message, result_text FROM requests \
                     WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 \
                     AND status = 'completed' \
                     ORDER BY created_at DESC, id DESC LIMIT ?4",
                )?
                .query_map(params![formation_id, user_id, session_id, sql_limit(limit)], |row| {
                    Ok((row.get(0)?, row.get::<_, Option<String>>(1)?.unwrap_or_default()))
                })?
                .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
            turns.reverse();
            Ok(turns)
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        owner: &Owner,
        now: i64,
        limit: usize,
        claim_ms: i64,
    ) -> StoreResult<Vec<Delivery>> {
        // Most polls find nothing due: a read answers them without a write.
        let any_due = self
            .read("claim_deliveries", move |conn| {
                conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?1 \
                     AND (claimed_by IS NULL OR claim_expires_at <= ?1))",
                )?
                .query_row([now], |row| row.get::<_, bool>(0))
            })
            .await?;
        if !any_due {
            return Ok(Vec::new());
        }
        let owner = owner.to_owned();
        self.write("claim_deliveries", move |conn| {
            let mut claimed: Vec<Delivery> = conn
                .prepare_cached(
                    "UPDATE deliveries SET claimed_by = ?1, claim_expires_at = ?2 + ?4 \
                     WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?2 \
                     AND (claimed_by IS NULL OR claim_expires_at <= ?2) ORDER BY created_at, id LIMIT ?3) \
                     RETURNING *",
                )?
                .query_map(params![owner, now, sql_limit(limit), claim_ms], delivery_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            claimed.sort_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
            Ok(claimed)
        })
        .await
    }

    async fn record_delivery(&self, id: &str, owner: &Owner, update: &DeliveryUpdate) -> StoreResult<bool> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        let (status, error, next_attempt_at) = match update.clone() {
            DeliveryUpdate::Delivered => ("delivered", None, None),
            DeliveryUpdate::Retry { error, next_attempt_at } => ("pending", Some(error), Some(next_attempt_at)),
            DeliveryUpdate::Failed { error } => ("failed", Some(error), None),
        };
        self.write("record_delivery", move |conn| {
            // Only a pending delivery this owner holds moves: delivered and failed are final.
            let changed = conn
                .prepare_cached(
                    "UPDATE deliveries SET attempts = attempts + 1, status = ?2, last_error = ?3, \
                     next_attempt_at = COALESCE(?4, next_attempt_at), claimed_by = NULL, claim_expires_at = NULL \
                     WHERE id = ?1 AND status = 'pending' AND claimed_by = ?5",
                )?
                .execute(params![id, status, error, next_attempt_at, owner])?;
            Ok(changed > 0)
        })
        .await
    }

    fn health(&self) -> StoreHealth {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn admin_list(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>> {
        let query = query.clone();
        self.read("admin_list", move |conn| {
            conn.prepare_cached(select_records!(
                "WHERE r.formation_id = ?1 AND (?2 IS NULL OR r.status = ?2) \
                 AND (?3 IS NULL OR r.agent_id = ?3) AND (?4 IS NULL OR r.user_id = ?4) \
                 AND (?5 IS NULL OR r.created_at >= ?5) AND (?6 IS NULL OR r.created_at < ?6) \
                 ORDER BY r.created_at DESC, r.id DESC LIMIT ?7"
            ))?
            .query_map(
                params![
                    query.formation_id,
                    query.status.map(Status::as_str),
                    query.agent_id,
                    query.user_id,
                    query.since,
                    query.until,
                    sql_limit(query.limit)
                ],
                record_from_row,
            )?
            .collect()
        })
        .await
    }

    async fn backlog(&self, formation_id: &str) -> StoreResult<Backlog> {
        let formation_id = formation_id.to_owned();
        self.read("backlog", move |conn| {
            let mut backlog = Backlog::default();
            let mut statement = conn.prepare_cached(
                "SELECT status, COUNT(*) FROM requests \
                 WHERE status IN ('pending', 'processing') AND formation_id = ?1 GROUP BY status",
            )?;
            let mut rows = statement.query([formation_id])?;
            while let Some(row) = rows.next()? {
                let count: i64 = row.get(1)?;
                match status_column(row, 0)? {
                    Status::Pending => backlog.pending = count as u64,
                    _ => backlog.processing = count as u64,
                }
            }
            Ok(backlog)
        })
        .await
    }

    async fn outbox_stats(&self, now: i64) -> StoreResult<Option<super::OutboxStats>> {
        self.read("outbox_stats", move |conn| {
            let (pending, oldest): (i64, Option<i64>) = conn
                .prepare_cached("SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status = 'pending'")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let oldest_age_ms = oldest.map_or(0, |at| now.saturating_sub(at).max(0) as u64);
            Ok(Some(super::OutboxStats { pending: pending.max(0) as u64, oldest_age_ms }))
        })
        .await
    }

    async fn delivery_of(&self, request_id: &str) -> StoreResult<Option<Delivery>> {
        let request_id = request_id.to_owned();
        self.read("delivery_of", move |conn| {
            conn.prepare_cached("SELECT * FROM deliveries WHERE request_id = ?1")?
                .query_row([request_id], delivery_from_row)
                .optional()
        })
        .await
    }

    async fn retry_delivery(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>> {
        let request_id = request_id.to_owned();
        self.write("retry_delivery", move |conn| {
            conn.prepare_cached(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = ?2 \
                 WHERE request_id = ?1 AND status IN ('pending', 'failed')",
            )?
            .execute(params![request_id, now])?;
            conn.prepare_cached("SELECT * FROM deliveries WHERE request_id = ?1")?
                .query_row([request_id], delivery_from_row)
                .optional()
        })
        .await
    }

    async fn link_rerun(&self, request_id: &str, original_id: &str) -> StoreResult<()> {
        let (request_id, original_id) = (request_id.to_owned(), original_id.to_owned());
        self.write("link_rerun", move |conn| {
            conn.prepare_cached("INSERT OR IGNORE INTO reruns (request_id, original_id) VALUES (?1, ?2)")?
                .execute(params![request_id, original_id])?;
            Ok(())
        })
        .await
    }

    async fn reruns(&self, request_id: &str) -> StoreResult<Reruns> {
        let request_id = request_id.to_owned();
        self.read("reruns", move |conn| {
            let rerun_of = conn
                .prepare_cached("SELECT original_id FROM reruns WHERE request_id = ?1")?
                .query_row([&request_id], |row| row.get(0))
                .optional()?;
            let rerun_as = conn
                .prepare_cached("SELECT request_id FROM reruns WHERE original_id = ?1 ORDER BY request_id DESC")?
                .query_map([&request_id], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Reruns { rerun_of, rerun_as })
        })
        .await
    }
    async fn sessions(
        &self,
        formation_id: &str,
        user_id: &str,
        active_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<SessionSummary>> {
        let (formation_id, user_id) = (formation_id.to_owned(), user_id.to_owned());
        self.read("sessions", move |conn| {
            conn.prepare_cached(&format!(
                "{SESSIONS_SQL} HAVING NOT ?5 OR active_requests > 0 \
                 ORDER BY last_activity DESC, session_id DESC LIMIT ?4"
            ))?
            .query_map(params![formation_id, user_id, None::<String>, sql_limit(limit), active_only], session_from_row)?
            .collect()
        })
        .await
    }

    async fn session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<SessionSummary>> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        self.read("session", move |conn| {
            conn.prepare_cached(&format!("{SESSIONS_SQL} HAVING NOT ?5 LIMIT ?4"))?
                .query_row(params![formation_id, user_id, session_id, 1, false], session_from_row)
                .optional()
        })
        .await
    }

    async fn session_messages(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<SessionMessage>> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        let before = before.unwrap_or(i64::MAX);
        self.read("session_messages", move |conn| {
            // Newest first, reversed below. Ties of one millisecond: seeds first,
            // then by request (ids are time-ordered), its question before its answer.
            let mut messages = conn
                .prepare_cached(
                    "SELECT role, content, request_id, agent_id, status, ts FROM ( \
                       SELECT 'user' AS role, message AS content, id AS request_id, agent_id, status, \
                              created_at AS ts, 1 AS rank, id AS k FROM requests \
                        WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 \
                       UNION ALL \
                       SELECT 'assistant', result_text, id, agent_id, status, completed_at, 2, id FROM requests \
                        WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 AND status = 'completed' \
                       UNION ALL \
                       SELECT role, content, NULL, agent_id, NULL, created_at, 0, printf('%020d', seq) \
                         FROM session_messages WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 \
                     ) WHERE ts < ?5 ORDER BY ts DESC, rank = 0, k DESC, rank DESC LIMIT ?4",
                )?
                .query_map(params![formation_id, user_id, session_id, sql_limit(limit), before], |row| {
                    let status: Option<String> = row.get(4)?;
                    Ok(SessionMessage {
                        role: row.get(0)?,
                        content: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        request_id: row.get(2)?,
                        agent_id: row.get(3)?,
                        status: status.as_deref().and_then(Status::parse),
                        timestamp: row.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<SessionMessage>>>()?;
            messages.reverse();
            Ok(messages)
        })
        .await
    }

    async fn restore_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        self.write("restore_session", move |conn| {
            conn.prepare_cached(
                "DELETE FROM session_messages WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3",
            )?
            .execute(params![formation_id, user_id, session_id])?;
            let mut insert = conn.prepare_cached(
                "INSERT INTO session_messages (formation_id, user_id, session_id, seq, role, content, agent_id, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (seq, message) in messages.iter().enumerate() {
                insert.execute(params![
                    formation_id,
                    user_id,
                    session_id,
                    seq as i64,
                    message.role,
                    message.content,
                    message.agent_id,
                    message.timestamp
                ])?;
            }
            Ok(())
        })
        .await
    }

    async fn lifecycle_since(
        &self,
        formation_id: &str,
        user_id: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        let (formation_id, user_id) = (formation_id.to_owned(), user_id.to_owned());
        self.read("lifecycle_since", move |conn| {
            conn.prepare_cached(select_records!(
                "WHERE r.formation_id = ?1 AND r.user_id = ?2 AND (r.created_at >= ?3 OR r.completed_at >= ?3) \
                 ORDER BY r.created_at, r.id LIMIT ?4"
            ))?
            .query_map(params![formation_id, user_id, since, sql_limit(limit)], record_from_row)?
            .collect()
        })
        .await
    }

    async fn publish_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()> {
        let (owner, copies) = (owner.to_owned(), copies.to_vec());
        self.write("publish_copies", move |conn| {
            // One savepoint: the owner's rows are replaced as a whole.
            conn.prepare_cached("DELETE FROM formation_copies WHERE owner = ?1")?.execute(params![owner])?;
            let mut insert = conn.prepare_cached(
                "INSERT OR REPLACE INTO formation_copies (formation_id, owner, revision, seen_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (formation_id, revision) in &copies {
                insert.execute(params![formation_id, owner, revision, now])?;
            }
            Ok(())
        })
        .await
    }

    async fn formation_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
        self.read("formation_copies", move |conn| {
            conn.prepare_cached(
                "SELECT formation_id, owner, revision, seen_at FROM formation_copies \
                 WHERE seen_at >= ?1 ORDER BY formation_id, owner",
            )?
            .query_map(params![since], |row| {
                Ok(FormationCopy {
                    formation_id: row.get(0)?,
                    owner: row.get(1)?,
                    revision: row.get(2)?,
                    seen_at: row.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }
}

/// A user's sessions (`?3` NULL: all, else the one named), as `session_from_row` reads
/// them: from their requests and seeded messages. Callers add `HAVING` (on `?5`)
/// and `LIMIT ?4`.
const SESSIONS_SQL: &str = "SELECT session_id, MIN(first) AS created_at, MAX(last) AS last_activity, \
     SUM(messages) AS message_count, SUM(requests) AS request_count, SUM(active) AS active_requests FROM ( \
       SELECT session_id, created_at AS first, MAX(created_at, COALESCE(completed_at, created_at)) AS last, \
              1 + (status = 'completed') AS messages, 1 AS requests, \
              status IN ('pending', 'processing') AS active FROM requests \
        WHERE formation_id = ?1 AND user_id = ?2 AND session_id IS NOT NULL \
          AND (?3 IS NULL OR session_id = ?3) \
       UNION ALL \
       SELECT session_id, created_at, created_at, 1, 0, 0 FROM session_messages \
        WHERE formation_id = ?1 AND user_id = ?2 AND (?3 IS NULL OR session_id = ?3) \
     ) GROUP BY session_id";

fn session_from_row(row: &Row) -> rusqlite::Result<SessionSummary> {
    Ok(SessionSummary {
        session_id: row.get("session_id")?,
        created_at: row.get("created_at")?,
        last_activity: row.get("last_activity")?,
        message_count: row.get::<_, i64>("message_count")?.max(0) as u64,
        request_count: row.get::<_, i64>("request_count")?.max(0) as u64,
        active_requests: row.get::<_, i64>("active_requests")?.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
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
}

#[cfg(test)]
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

#[cfg(test)]
mod column_positions {
    use super::col;

    #[test]
    fn select_records_columns_are_where_record_from_row_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(dir.path()).unwrap();
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        let statement = conn.prepare(select_records!("")).unwrap();
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

#[cfg(test)]
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
