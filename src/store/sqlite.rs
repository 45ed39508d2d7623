//! The SQLite store: one file, `DATA_DIR/muxi.db`, in WAL mode with
//! `synchronous=FULL`, so a write has reached the disk when its call returns.
//!
//! # Group commit
//! Every write goes to ONE writer thread that owns the only read-write
//! connection. The thread takes one command from its channel, then drains
//! whatever else is already queued (up to [`MAX_BATCH`]), runs them all in ONE
//! transaction and commits once: one fsync pays for the whole batch. Only then
//! does it answer each caller through its oneshot. Each command runs inside its
//! own SAVEPOINT, so a command that fails is rolled back alone and fails only its
//! own caller. Under load the batches grow by themselves (while one commit
//! fsyncs, the next batch queues up); alone, a write costs one transaction as
//! usual. The single writer also makes idempotent inserts race-free.
//!
//! Reads run on tokio's blocking pool over a small pool of read-only
//! connections with cached statements; WAL lets them run beside the writer.
//!
//! Dropping the store (or [`SqliteStore::close`]) closes the channel; the writer
//! finishes everything already queued, then stops.
//!
//! The schema is versioned with `PRAGMA user_version`: [`MIGRATIONS`] are applied
//! in order, in one transaction, when the store opens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{params, Connection, DropBehavior, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{
    Delivery, DeliveryUpdate, ErrorInfo, Inserted, ListQuery, NewDelivery, NewRequest, Outcome,
    Progress, RequestRecord, RequestResult, Status, Store, StoreError, StoreResult, WebhookState,
};

/// The most commands one transaction carries.
const MAX_BATCH: usize = 512;
/// Idle read-only connections kept for reuse.
const MAX_IDLE_READERS: usize = 4;
/// How long a connection waits on a lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The database file inside the data folder.
const DB_FILE: &str = "muxi.db";

/// Schema migrations; `PRAGMA user_version` is the number applied so far.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    formation_id      TEXT NOT NULL,
    formation_version TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    session_id        TEXT,
    agent_id          TEXT NOT NULL,
    message           TEXT NOT NULL,
    mode              TEXT NOT NULL,
    estimated_seconds REAL NOT NULL,
    idempotency_key   TEXT,
    webhook_url       TEXT,
    status            TEXT NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    progress          REAL NOT NULL DEFAULT 0,
    current_step      TEXT,
    total_steps       INTEGER,
    completed_steps   INTEGER,
    status_message    TEXT,
    result_text       TEXT,            -- set iff the request completed
    artifacts         TEXT,            -- JSON array, set with result_text
    error             TEXT,            -- JSON ErrorInfo
    attempts          INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    completed_at      INTEGER
);
CREATE INDEX requests_by_user ON requests (formation_id, user_id, created_at);
CREATE INDEX requests_by_status ON requests (status, created_at);
CREATE INDEX requests_by_agent ON requests (formation_id, agent_id, completed_at);
CREATE INDEX requests_by_session ON requests (formation_id, user_id, session_id, created_at)
    WHERE session_id IS NOT NULL;
CREATE UNIQUE INDEX requests_idempotency ON requests (formation_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL UNIQUE REFERENCES requests (id) ON DELETE CASCADE,
    formation_id    TEXT NOT NULL,
    url             TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
"#];

/// `SELECT <every record column> FROM requests r LEFT JOIN deliveries d <tail>`.
macro_rules! select_records {
    ($tail:literal) => {
        concat!(
            "SELECT r.*, d.status AS webhook_status, d.attempts AS webhook_attempts, \
             d.last_error AS webhook_last_error \
             FROM requests r LEFT JOIN deliveries d ON d.request_id = r.id ",
            $tail
        )
    };
}

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    /// `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
    commits: Arc<AtomicU64>,
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/muxi.db`, migrates its schema and
    /// starts the writer thread.
    pub fn open(data_dir: &Path) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError(format!("cannot create data folder {}: {e}", data_dir.display()))
        })?;
        let path = data_dir.join(DB_FILE);
        let opening = |e: rusqlite::Error| StoreError(format!("open {}: {e}", path.display()));

        let mut conn = Connection::open(&path).map_err(opening)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(opening)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(opening)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError(format!(
                "open {}: cannot switch to WAL mode (journal_mode is {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(opening)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(opening)?;
        migrate(&mut conn).map_err(|e| StoreError(format!("migrate {}: {}", path.display(), e.0)))?;

        let readers = Arc::new(ReadPool { path: path.clone(), idle: Mutex::new(Vec::new()) });
        // Open one reader now so a database readers cannot open fails here, not later.
        let first = readers.connect().map_err(opening)?;
        readers.put(first);

        let commits = Arc::new(AtomicU64::new(0));
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("muxi-store-writer".into())
            .spawn({
                let commits = commits.clone();
                move || writer_loop(conn, receiver, commits)
            })
            .map_err(|e| StoreError(format!("cannot start the writer thread: {e}")))?;

        tracing::debug!(path = %path.display(), "sqlite store open");
        Ok(SqliteStore {
            path,
            writer: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            readers,
            commits,
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
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Write { name, op: Some(op), out: None, reply });
        {
            let writer = self.writer.lock().expect("store writer mutex poisoned");
            let sender = writer
                .as_ref()
                .ok_or_else(|| StoreError(format!("{name}: the store is closed")))?;
            sender
                .send(job)
                .map_err(|_| StoreError(format!("{name}: the store writer has stopped")))?;
        }
        answer
            .await
            .map_err(|_| StoreError(format!("{name}: the store writer stopped before answering")))?
    }

    /// Runs `op` on a read-only connection on tokio's blocking pool.
    async fn read<T, F>(&self, name: &'static str, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.get()?;
            let out = op(&conn);
            readers.put(conn);
            out
        })
        .await
        .map_err(|e| StoreError(format!("{name}: read task failed: {e}")))?
        .map_err(|e| StoreError(format!("{name}: {e}")))
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

/// Applies the migrations the database has not seen yet, in one transaction.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let sql = |e: rusqlite::Error| StoreError(e.to_string());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(sql)?;
    let known = MIGRATIONS.len() as i64;
    if !(0..=known).contains(&version) {
        return Err(StoreError(format!(
            "schema version {version} is not one this build knows (0..={known})"
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration).map_err(sql)?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    if version < known {
        tx.pragma_update(None, "user_version", known).map_err(sql)?;
    }
    tx.commit().map_err(sql)
}

// ---------------------------------------------------------------------------
// The writer

/// A queued write, type-erased so one channel carries them all.
trait Job: Send {
    /// Runs inside the batch transaction and keeps its own result; true if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the fate of the batch is known.
    fn answer(self: Box<Self>, batch: Result<(), &StoreError>);
}

struct Write<T, F> {
    name: &'static str,
    op: Option<F>,
    out: Option<rusqlite::Result<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> Job for Write<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let out = match self.op.take() {
            Some(op) => op(conn),
            None => return false,
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, batch: Result<(), &StoreError>) {
        let name = self.name;
        let result = match (self.out, batch) {
            (Some(Err(e)), _) => Err(StoreError(format!("{name}: {e}"))),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(e)) => Err(StoreError(format!("{name}: transaction failed: {}", e.0))),
            (None, Ok(())) => Err(StoreError(format!("{name}: was not run"))),
        };
        // The caller may have gone away (its future dropped); the write stands.
        let _ = self.reply.send(result);
    }
}

fn writer_loop(mut conn: Connection, queue: mpsc::Receiver<Box<dyn Job>>, commits: Arc<AtomicU64>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    // `recv` fails only once every sender is gone and the queue is empty.
    while let Ok(first) = queue.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = run_batch(&mut conn, &mut batch);
        match &outcome {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(writes = batch.len(), "store batch committed");
            }
            Err(e) => tracing::error!(writes = batch.len(), error = %e, "store batch failed"),
        }
        for job in batch.drain(..) {
            job.answer(outcome.as_ref().map(|_| ()));
        }
    }
    tracing::debug!("store writer stopped");
}

/// One transaction for the whole batch, one savepoint per job.
fn run_batch(conn: &mut Connection, batch: &mut [Box<dyn Job>]) -> StoreResult<()> {
    let failed = |e: rusqlite::Error| StoreError(e.to_string());
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(failed)?;
    for job in batch.iter_mut() {
        let mut savepoint = tx.savepoint().map_err(failed)?;
        if job.run(&savepoint) {
            savepoint.commit().map_err(failed)?;
        } else {
            // Roll back to the savepoint and release it: only this job is undone.
            savepoint.set_drop_behavior(DropBehavior::Rollback);
            savepoint.finish().map_err(failed)?;
        }
    }
    // On any error above, dropping `tx` rolls the whole batch back.
    tx.commit().map_err(failed)
}

// ---------------------------------------------------------------------------
// The readers

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }

    fn get(&self) -> rusqlite::Result<Connection> {
        let idle = self.idle.lock().expect("store reader pool poisoned").pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self.connect(),
        }
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().expect("store reader pool poisoned");
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

// ---------------------------------------------------------------------------
// Rows

fn conversion_error(row: &Row, column: &str, err: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    let index = row.as_ref().column_index(column).unwrap_or(0);
    rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(err))
}

fn json_column<T: DeserializeOwned>(row: &Row, column: &str) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(column)?;
    text.map(|text| serde_json::from_str(&text).map_err(|e| conversion_error(row, column, e)))
        .transpose()
}

#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
struct UnknownStatus(String);

fn status_column(row: &Row, column: &str) -> rusqlite::Result<Status> {
    let text: String = row.get(column)?;
    Status::parse(&text).ok_or_else(|| conversion_error(row, column, UnknownStatus(text)))
}

/// A row of [`select_records!`].
fn record_from_row(row: &Row) -> rusqlite::Result<RequestRecord> {
    let result = match row.get::<_, Option<String>>("result_text")? {
        Some(text) => Some(RequestResult {
            text,
            artifacts: json_column(row, "artifacts")?.unwrap_or_default(),
        }),
        None => None,
    };
    let webhook = match row.get::<_, Option<String>>("webhook_status")? {
        Some(status) => Some(WebhookState {
            status,
            attempts: row.get("webhook_attempts")?,
            last_error: row.get("webhook_last_error")?,
        }),
        None => None,
    };
    Ok(RequestRecord {
        id: row.get("id")?,
        formation_id: row.get("formation_id")?,
        formation_version: row.get("formation_version")?,
        user_id: row.get("user_id")?,
        session_id: row.get("session_id")?,
        agent_id: row.get("agent_id")?,
        message: row.get("message")?,
        mode: row.get("mode")?,
        estimated_seconds: row.get("estimated_seconds")?,
        idempotency_key: row.get("idempotency_key")?,
        webhook_url: row.get("webhook_url")?,
        status: status_column(row, "status")?,
        progress: row.get("progress")?,
        current_step: row.get("current_step")?,
        total_steps: row.get("total_steps")?,
        completed_steps: row.get("completed_steps")?,
        status_message: row.get("status_message")?,
        result,
        error: json_column::<ErrorInfo>(row, "error")?,
        attempts: row.get("attempts")?,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        completed_at: row.get("completed_at")?,
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

/// What a freshly inserted request looks like.
fn new_record(request: NewRequest) -> RequestRecord {
    RequestRecord {
        id: request.id,
        formation_id: request.formation_id,
        formation_version: request.formation_version,
        user_id: request.user_id,
        session_id: request.session_id,
        agent_id: request.agent_id,
        message: request.message,
        mode: request.mode,
        estimated_seconds: request.estimated_seconds,
        idempotency_key: request.idempotency_key,
        webhook_url: request.webhook_url,
        status: Status::Pending,
        progress: 0.0,
        current_step: None,
        total_steps: None,
        completed_steps: None,
        status_message: None,
        result: None,
        error: None,
        attempts: 0,
        created_at: request.created_at,
        started_at: None,
        completed_at: None,
        webhook: None,
    }
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
    async fn insert(&self, request: NewRequest) -> StoreResult<Inserted> {
        self.write("insert", move |conn| {
            if let Some(key) = &request.idempotency_key {
                let existing = conn
                    .prepare_cached(select_records!(
                        "WHERE r.formation_id = ?1 AND r.user_id = ?2 AND r.idempotency_key = ?3"
                    ))?
                    .query_row(params![request.formation_id, request.user_id, key], record_from_row)
                    .optional()?;
                if let Some(existing) = existing {
                    return Ok(Inserted::Existing(existing));
                }
            }
            conn.prepare_cached(
                "INSERT INTO requests (id, formation_id, formation_version, user_id, session_id, \
                 agent_id, message, mode, estimated_seconds, idempotency_key, webhook_url, status, \
                 created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending', ?12)",
            )?
            .execute(params![
                request.id,
                request.formation_id,
                request.formation_version,
                request.user_id,
                request.session_id,
                request.agent_id,
                request.message,
                request.mode,
                request.estimated_seconds,
                request.idempotency_key,
                request.webhook_url,
                request.created_at,
            ])?;
            Ok(Inserted::Created(new_record(request)))
        })
        .await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<RequestRecord>> {
        let id = id.to_owned();
        self.read("get", move |conn| {
            conn.prepare_cached(select_records!("WHERE r.id = ?1"))?
                .query_row([id], record_from_row)
                .optional()
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>> {
        let query = query.clone();
        self.read("list", move |conn| {
            conn.prepare_cached(select_records!(
                "WHERE r.formation_id = ?1 AND r.user_id = ?2 AND (?3 IS NULL OR r.status = ?3) \
                 ORDER BY r.created_at DESC, r.id DESC LIMIT ?4"
            ))?
            .query_map(
                params![
                    query.formation_id,
                    query.user_id,
                    query.status.map(Status::as_str),
                    sql_limit(query.limit)
                ],
                record_from_row,
            )?
            .collect()
        })
        .await
    }

    async fn start_attempt(&self, id: &str, now: i64) -> StoreResult<Option<u32>> {
        let id = id.to_owned();
        self.write("start_attempt", move |conn| {
            conn.prepare_cached(
                "UPDATE requests SET status = 'processing', attempts = attempts + 1, \
                 started_at = COALESCE(started_at, ?2) \
                 WHERE id = ?1 AND status IN ('pending', 'processing') RETURNING attempts",
            )?
            .query_row(params![id, now], |row| row.get(0))
            .optional()
        })
        .await
    }

    async fn record_progress(&self, id: &str, progress: &Progress) -> StoreResult<()> {
        let id = id.to_owned();
        let progress = progress.clone();
        self.write("record_progress", move |conn| {
            conn.prepare_cached(
                "UPDATE requests SET progress = COALESCE(?2, progress), \
                 current_step = COALESCE(?3, current_step), \
                 total_steps = COALESCE(?4, total_steps), \
                 completed_steps = COALESCE(?5, completed_steps), \
                 status_message = COALESCE(?6, status_message) \
                 WHERE id = ?1 AND status IN ('pending', 'processing')",
            )?
            .execute(params![
                id,
                progress.progress,
                progress.current_step,
                progress.total_steps,
                progress.completed_steps,
                progress.message,
            ])?;
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
    ) -> StoreResult<bool> {
        let id = id.to_owned();
        let status = outcome.status().as_str();
        let (result_text, artifacts, error, message) = match outcome {
            Outcome::Completed(result) => (
                Some(result.text.clone()),
                Some(to_json("finish", &result.artifacts)?),
                None,
                None,
            ),
            Outcome::Failed(error) => (None, None, Some(to_json("finish", error)?), None),
            Outcome::Cancelled { message } => (None, None, None, Some(message.clone())),
        };
        self.write("finish", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE requests SET status = ?2, result_text = ?3, artifacts = ?4, error = ?5, \
                     status_message = COALESCE(?6, status_message), completed_at = ?7, \
                     progress = CASE WHEN ?2 = 'completed' THEN 100 ELSE progress END \
                     WHERE id = ?1 AND status IN ('pending', 'processing')",
                )?
                .execute(params![id, status, result_text, artifacts, error, message, now])?;
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

    async fn unfinished(&self) -> StoreResult<Vec<RequestRecord>> {
        self.read("unfinished", |conn| {
            conn.prepare_cached(select_records!(
                "WHERE r.status IN ('pending', 'processing') ORDER BY r.created_at, r.id"
            ))?
            .query_map([], record_from_row)?
            .collect()
        })
        .await
    }

    async fn purge_finished_before(&self, cutoff: i64) -> StoreResult<u64> {
        self.write("purge_finished_before", move |conn| {
            const FINISHED: &str =
                "status IN ('completed', 'failed', 'cancelled') AND completed_at < ?1";
            conn.prepare_cached(&format!(
                "DELETE FROM deliveries WHERE request_id IN (SELECT id FROM requests WHERE {FINISHED})"
            ))?
            .execute([cutoff])?;
            let deleted = conn
                .prepare_cached(&format!("DELETE FROM requests WHERE {FINISHED}"))?
                .execute([cutoff])?;
            Ok(deleted as u64)
        })
        .await
    }

    async fn recent_durations(
        &self,
        formation_id: &str,
        agent_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<i64>> {
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
        let (formation_id, user_id, session_id) =
            (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
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

    async fn due_deliveries(&self, now: i64, limit: usize) -> StoreResult<Vec<Delivery>> {
        self.read("due_deliveries", move |conn| {
            conn.prepare_cached(
                "SELECT * FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?1 \
                 ORDER BY created_at, id LIMIT ?2",
            )?
            .query_map(params![now, sql_limit(limit)], delivery_from_row)?
            .collect()
        })
        .await
    }

    async fn record_delivery(&self, id: &str, update: &DeliveryUpdate) -> StoreResult<()> {
        let id = id.to_owned();
        let (status, error, next_attempt_at) = match update.clone() {
            DeliveryUpdate::Delivered => ("delivered", None, None),
            DeliveryUpdate::Retry { error, next_attempt_at } => {
                ("pending", Some(error), Some(next_attempt_at))
            }
            DeliveryUpdate::Failed { error } => ("failed", Some(error), None),
        };
        self.write("record_delivery", move |conn| {
            // Only a pending delivery moves: delivered and failed are final.
            conn.prepare_cached(
                "UPDATE deliveries SET attempts = attempts + 1, status = ?2, last_error = ?3, \
                 next_attempt_at = COALESCE(?4, next_attempt_at) \
                 WHERE id = ?1 AND status = 'pending'",
            )?
            .execute(params![id, status, error, next_attempt_at])?;
            Ok(())
        })
        .await
    }
}
