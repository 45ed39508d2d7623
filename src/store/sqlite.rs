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
//! The schema and its migrations are in [`schema`], the decoding of rows in
//! [`rows`]. The trait's methods are here but for those of [`leases`],
//! [`deliveries`] (the webhook outbox), [`admin`], [`sessions`] and [`copies`].

/// A request's message (of `requests r`) where the SQLite store keeps it: in
/// its row, or, when the row holds `''` (a message of
/// [`inserts::OUT_OF_LINE_BYTES`] or more), in `request_messages` (see [`schema`]).
macro_rules! stored_message {
    () => {
        "CASE WHEN r.message <> '' THEN r.message \
         ELSE COALESCE((SELECT m.message FROM request_messages m WHERE m.id = r.id), '') END"
    };
}

/// `SELECT <every record column> FROM requests r LEFT JOIN deliveries d <tail>`,
/// the message read where it is kept.
macro_rules! select_stored_records {
    ($tail:literal) => {
        concat!("SELECT ", record_columns!(concat!(stored_message!(), " AS message")), $tail)
    };
}

mod admin;
mod copies;
mod deliveries;
mod in_place;
mod inserts;
mod leases;
mod readers;
mod rows;
mod schema;
mod sessions;
mod transaction;
mod wal_writes;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use readers::{ById, ReadPool};
use rows::{record_from_row, sql_limit, to_json};
use writer::{Counts, Job, Write};

use super::{
    AdminQuery, Among, Backlog, Claim, Delivery, DeliveryUpdate, FormationCopy, Inserted, Lease, ListQuery,
    NewDelivery, NewRequest, NewSessionMessage, Outcome, Owner, Progress, RequestRecord, Reruns, SessionMessage,
    SessionSummary, ShowState, Status, Store, StoreError, StoreHealth, StoreResult,
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
const CLAIMABLE_IN_FORMATION: &str = select_stored_records!(
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

        // `synchronous=FULL`, which the VFS that gathers its WAL writes needs.
        let mut conn = wal_writes::open(&path).map_err(opening)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(opening)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(opening)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError(format!(
                "open {}: cannot switch to WAL mode (journal_mode is {mode})",
                path.display()
            )));
        }
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

    async fn show_state(&self, id: &str, show: &mut ShowState<'_>) -> StoreResult<bool> {
        let _turn = self.readers.free.acquire().await.map_err(|_| StoreError("show_state: closed".into()))?;
        self.readers.state_by_id(id, show).map_err(|e| StoreError(format!("show_state: {e}")))
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>> {
        let query = query.clone();
        self.read("list", move |conn| {
            conn.prepare_cached(select_stored_records!(
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
        self.take_lease(id, owner, now, lease_ms).await
    }

    async fn renew_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>> {
        self.extend_leases(owner, now, lease_ms).await
    }

    async fn release(&self, id: &str, lease: Lease) -> StoreResult<bool> {
        self.give_back(id, lease).await
    }

    async fn clear_others_leases(&self, owner: &Owner) -> StoreResult<u64> {
        self.clear_leases_of_others(owner).await
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
        self.past_turns(formation_id, user_id, session_id, limit).await
    }

    async fn claim_deliveries(
        &self,
        owner: &Owner,
        now: i64,
        limit: usize,
        claim_ms: i64,
    ) -> StoreResult<Vec<Delivery>> {
        self.claim_due_deliveries(owner, now, limit, claim_ms).await
    }

    async fn record_delivery(&self, id: &str, owner: &Owner, update: &DeliveryUpdate) -> StoreResult<bool> {
        self.record_delivery_attempt(id, owner, update).await
    }

    fn health(&self) -> StoreHealth {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn admin_list(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>> {
        self.list_for_admin(query).await
    }

    async fn backlog(&self, formation_id: &str) -> StoreResult<Backlog> {
        self.count_backlog(formation_id).await
    }

    async fn outbox_stats(&self, now: i64) -> StoreResult<Option<super::OutboxStats>> {
        self.measure_outbox(now).await
    }

    async fn delivery_of(&self, request_id: &str) -> StoreResult<Option<Delivery>> {
        self.find_delivery(request_id).await
    }

    async fn retry_delivery(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>> {
        self.make_delivery_due(request_id, now).await
    }

    async fn link_rerun(&self, request_id: &str, original_id: &str) -> StoreResult<()> {
        self.save_rerun_link(request_id, original_id).await
    }

    async fn reruns(&self, request_id: &str) -> StoreResult<Reruns> {
        self.find_reruns(request_id).await
    }

    async fn sessions(
        &self,
        formation_id: &str,
        user_id: &str,
        active_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<SessionSummary>> {
        self.list_sessions(formation_id, user_id, active_only, limit).await
    }

    async fn session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<SessionSummary>> {
        self.find_session(formation_id, user_id, session_id).await
    }

    async fn session_messages(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<SessionMessage>> {
        self.list_session_messages(formation_id, user_id, session_id, before, limit).await
    }

    async fn restore_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()> {
        self.reseed_session(formation_id, user_id, session_id, messages).await
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
            conn.prepare_cached(select_stored_records!(
                "WHERE r.formation_id = ?1 AND r.user_id = ?2 AND (r.created_at >= ?3 OR r.completed_at >= ?3) \
                 ORDER BY r.created_at, r.id LIMIT ?4"
            ))?
            .query_map(params![formation_id, user_id, since, sql_limit(limit)], record_from_row)?
            .collect()
        })
        .await
    }

    async fn publish_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()> {
        self.replace_copies(owner, copies, now).await
    }

    async fn formation_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
        self.list_copies(since).await
    }
}

#[cfg(test)]
mod tests;
