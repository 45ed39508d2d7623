//! The SQLite store's writer thread: the only read-write connection. It takes
//! the queued writes ([`Job`]s) in batches of up to [`MAX_BATCH`], runs each
//! batch in one transaction and commits it once (group commit), then answers
//! every job; with nothing to write for [`IDLE_CHECKPOINT_AFTER`] it copies the
//! WAL into the database file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::transaction::Batch;
use crate::store::{StoreError, StoreHealth, StoreResult};

/// How long the writer waits with nothing to write before it copies the WAL
/// into the database file (SQLite's own checkpoints run only as the WAL grows).
pub(super) const IDLE_CHECKPOINT_AFTER: Duration = Duration::from_millis(400);
/// The most commands one transaction carries.
pub(super) const MAX_BATCH: usize = 512;

/// A queued write, type-erased so one channel carries them all.
pub(super) trait Job: Send {
    /// Runs inside the batch transaction and keeps its own result; true if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the fate of the batch is known.
    fn answer(self: Box<Self>, batch: Result<(), &StoreError>);
    /// The job's error when it says the storage itself failed (disk full, I/O, read-only).
    fn storage_failure(&self) -> Option<String>;
    /// Whether the job changes the database by one statement at most: SQLite
    /// undoes a failed statement by itself, so such a job needs no savepoint.
    fn is_one_statement(&self) -> bool;
    /// The job as a new request, which the writer writes together with the
    /// new requests queued beside it (see [`super::inserts`]).
    fn as_insert(&mut self) -> Option<&mut super::inserts::InsertJob> {
        None
    }
}

/// A job's answer: its own error if it failed, else the batch's.
pub(super) fn settle<T>(
    name: &str,
    out: Option<rusqlite::Result<T>>,
    batch: Result<(), &StoreError>,
) -> StoreResult<T> {
    match (out, batch) {
        (Some(Err(e)), _) => Err(StoreError(format!("{name}: {e}"))),
        (Some(Ok(value)), Ok(())) => Ok(value),
        (_, Err(e)) => Err(StoreError(format!("{name}: transaction failed: {}", e.0))),
        (None, Ok(())) => Err(StoreError(format!("{name}: was not run"))),
    }
}

/// A job's error when it says the storage itself failed (see [`Job::storage_failure`]).
pub(super) fn storage_failure<T>(name: &str, out: &Option<rusqlite::Result<T>>) -> Option<String> {
    match out {
        Some(Err(e)) if is_storage_failure(e) => Some(format!("{name}: {e}")),
        _ => None,
    }
}

pub(super) struct Write<T, F> {
    name: &'static str,
    /// See [`Job::is_one_statement`].
    one_statement: bool,
    op: Option<F>,
    out: Option<rusqlite::Result<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> Write<T, F> {
    /// `op`, run as the job `name` (see [`Job::is_one_statement`]), answered through `reply`.
    pub(super) fn new(name: &'static str, one_statement: bool, op: F, reply: oneshot::Sender<StoreResult<T>>) -> Self {
        Write { name, one_statement, op: Some(op), out: None, reply }
    }
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
        // The caller may have gone away (its future dropped); the write stands.
        let _ = self.reply.send(settle(self.name, self.out, batch));
    }

    fn storage_failure(&self) -> Option<String> {
        storage_failure(self.name, &self.out)
    }

    fn is_one_statement(&self) -> bool {
        self.one_statement
    }
}

/// Errors that come from the storage rather than from the request.
fn is_storage_failure(err: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        err.sqlite_error_code(),
        Some(DiskFull | SystemIoFailure | ReadOnly | CannotOpen | DatabaseCorrupt | NotADatabase | DatabaseBusy)
    )
}

/// Notes the outcome of a batch: a failed commit marks the store unwritable
/// until a later commit succeeds.
fn note_health(health: &Mutex<StoreHealth>, outcome: &StoreResult<()>) {
    let mut health = health.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Ok(()) => health.note_success(),
        Err(e) => health.note_failure(&e.0),
    }
}

/// What the writer counts for others.
pub(super) struct Counts {
    /// Commits (see [`super::SqliteStore::commits`]).
    pub(super) commits: Arc<AtomicU64>,
    /// The readers' generation (see [`super::readers::ReadPool`]).
    pub(super) generation: Arc<AtomicU64>,
}

pub(super) fn writer_loop(
    conn: Connection,
    queue: mpsc::Receiver<Box<dyn Job>>,
    counts: Counts,
    health: Arc<Mutex<StoreHealth>>,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    let mut inserts = super::inserts::Inserts::new(&conn);
    // Whether commits may be left in the WAL that no checkpoint has copied.
    let mut unsaved = false;
    loop {
        let first = if unsaved {
            match queue.recv_timeout(IDLE_CHECKPOINT_AFTER) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    unsaved = !idle_checkpoint(&conn, &counts.generation);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            // `recv` fails only once every sender is gone and the queue is empty.
            match queue.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let outcome = run_batch(&conn, &mut inserts, &mut batch);
        crate::observability::metrics::store_batch(batch.len(), started.elapsed(), outcome.is_ok());
        if let (Ok(()), Some(failure)) = (&outcome, batch.iter().find_map(|job| job.storage_failure())) {
            // The batch committed, but a write in it failed for want of storage.
            note_health(&health, &Err(StoreError(failure)));
        } else {
            note_health(&health, &outcome);
        }

        match &outcome {
            Ok(()) => {
                counts.commits.fetch_add(1, Ordering::Relaxed);
                counts.generation.fetch_add(1, Ordering::Release);
                unsaved = true;
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

/// Copies what the WAL holds into the database file, without waiting on any
/// reader (`PASSIVE`). When it all went, the readers' generation moves on, so
/// their next snapshots read the file alone. True when nothing is left.
fn idle_checkpoint(conn: &Connection, generation: &AtomicU64) -> bool {
    // (busy, frames in the WAL, frames copied); -1s when not in WAL mode.
    let checkpoint =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)));
    match checkpoint {
        Ok((frames, copied)) if copied >= frames => {
            generation.fetch_add(1, Ordering::Release);
            true
        }
        // A reader's snapshot still needs the WAL: tried again after the next idle wait.
        Ok(_) => false,
        Err(e) => {
            tracing::debug!(error = %e, "idle checkpoint failed");
            false
        }
    }
}

/// One transaction for the whole batch, one savepoint per job (but runs of new
/// requests, written many to a statement: see [`inserts`]).
fn run_batch(conn: &Connection, inserts: &mut super::inserts::Inserts, batch: &mut [Box<dyn Job>]) -> StoreResult<()> {
    let failed = |e: rusqlite::Error| StoreError(e.to_string());
    let rolled_back = || StoreError("the transaction was rolled back by a failed write".into());
    let tx = Batch::begin(conn).map_err(failed)?;
    let mut next = 0;
    while next < batch.len() {
        let run: Vec<_> = batch[next..].iter_mut().map_while(|job| job.as_insert()).collect();
        if !run.is_empty() {
            next += run.len();
            if !super::inserts::write(inserts, run) && tx.was_rolled_back() {
                return Err(rolled_back());
            }
            continue;
        }
        let job = &mut batch[next];
        next += 1;
        if job.is_one_statement() {
            if !job.run(conn) && tx.was_rolled_back() {
                // An I/O error or a full disk rolled the whole transaction back.
                return Err(rolled_back());
            }
            continue;
        }
        // Only this job is undone if it fails.
        tx.savepoint(|conn| job.run(conn)).map_err(failed)?;
    }
    // On any error above, dropping `tx` rolls the whole batch back.
    tx.commit().map_err(failed)
}
