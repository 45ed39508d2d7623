//! The SQLite store's read-only connections: a fixed set behind a semaphore,
//! each keeping its snapshot between reads until the writer moves on,
//! and its by-id record queries prepared.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Statement};

use super::in_place::InPlace;
use super::rows::{record_from_row, state_from_row, DELIVERY_STATE_BY_ID, STATE_BY_ID};
use super::{BUSY_TIMEOUT, MMAP_BYTES};
use crate::store::{RequestRecord, ShowState};

/// Read-only connections: at most this many reads run at once; the rest wait
/// for one to be free rather than opening (and warming) a connection each.
const READERS: usize = 8;

/// The read-only connections. Each keeps its read transaction (its snapshot)
/// open between reads until the writer moves on: a read then costs no
/// `BEGIN`, no WAL read lock (two `fcntl` calls) and no `COMMIT`. A reader
/// whose snapshot is of an older generation than the writer's starts a new one
/// before it reads, so a read never misses a write whose caller has been
/// answered (the writer counts a commit before it answers). A janitor ends
/// stale snapshots of idle readers, so they do not hold the WAL back from its
/// checkpoints.
///
/// The writer also moves the generation on when an idle checkpoint has copied
/// the whole WAL into the database file: a snapshot begun after that reads
/// the file alone, where one begun before looks each page up in the WAL's
/// index first (the longer the WAL, the dearer).
pub(super) struct ReadPool {
    path: PathBuf,
    pub(super) idle: Mutex<Vec<Reader>>,
    /// One permit per connection that may be in use ([`READERS`]).
    pub(super) free: Arc<tokio::sync::Semaphore>,
    /// The writer's generation: one more at each commit and at each idle
    /// checkpoint that emptied the WAL.
    generation: Arc<AtomicU64>,
}

pub(super) struct Reader {
    /// The queries of [`ById`], prepared once on `conn` (a poll then pays no
    /// statement cache: hashing its text, taking it out and putting it back).
    /// Declared before `conn`, so they are dropped (finalized) before it.
    by_id: [Statement<'static>; 2],
    /// [`STATE_BY_ID`], read in place (its id bound and its text read where
    /// they lie), and [`DELIVERY_STATE_BY_ID`]: what a status poll reads.
    state: InPlace<'static>,
    delivery_state: Statement<'static>,
    /// Boxed: the statements above point at it, so it must never move. Private
    /// to this module, which never moves it out nor replaces it.
    conn: Box<Connection>,
    /// The writer's generation when its open read transaction began.
    seen: u64,
}

impl Reader {
    /// The reader's connection.
    #[cfg(test)]
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }
}

// SAFETY: a `Statement` (and an `InPlace`, which holds raw pointers) is not
// `Send` only because it borrows its connection, which is not `Sync`. A
// reader's statements borrow its own connection and nothing else, and all of
// them move together: the pool hands a reader to one thread at a time, so the
// connection is never used from two threads at once (SQLite's multi-thread
// mode, `SQLITE_OPEN_NO_MUTEX`, asks no more).
unsafe impl Send for Reader {}

/// A request's record, read by id.
#[derive(Clone, Copy)]
pub(super) enum ById {
    /// The whole record.
    Record = 0,
    /// The record without its message (`''`): what a status poll reads.
    State = 1,
}

impl ById {
    const SQL: [&'static str; 2] =
        ["SELECT * FROM request_records WHERE id = ?1", "SELECT * FROM request_states WHERE id = ?1"];
}

/// How often the janitor ends stale snapshots of idle readers.
pub(super) const JANITOR_EVERY: Duration = Duration::from_millis(250);

impl ReadPool {
    /// The pool for the database at `path`, whose writer counts its
    /// generations in `generation`. One reader is opened now, so a database
    /// readers cannot open fails here, not at the first read.
    pub(super) fn open(path: &Path, generation: Arc<AtomicU64>) -> rusqlite::Result<Arc<ReadPool>> {
        let pool = Arc::new(ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            free: Arc::new(tokio::sync::Semaphore::new(READERS)),
            generation,
        });
        let first = pool.connect()?;
        pool.put(first);
        ReadPool::spawn_janitor(&pool);
        Ok(pool)
    }

    fn connect(&self) -> rusqlite::Result<Reader> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
        // The record query under a short name. A TEMP view lives in this
        // connection only, so it always has this build's columns.
        // `request_states` is the same without the message (see `get_without_message`).
        conn.execute_batch(concat!(
            "CREATE TEMP VIEW request_records AS ",
            select_stored_records!(""),
            "; CREATE TEMP VIEW request_states AS SELECT ",
            record_columns!("'' AS message"),
        ))?;
        let conn = Box::new(conn);
        let prepare = |sql| -> rusqlite::Result<Statement<'static>> {
            let statement = conn.prepare(sql)?;
            // SAFETY: the statement borrows the boxed connection, which stays at
            // its address for the reader's life (the box is never moved out nor
            // replaced), and `Reader` drops its statements before its connection
            // (field order). No `'static` borrow of the connection escapes: a
            // `Statement` does not hand out the connection it holds.
            Ok(unsafe { std::mem::transmute::<Statement<'_>, Statement<'static>>(statement) })
        };
        let by_id = [prepare(ById::SQL[0])?, prepare(ById::SQL[1])?];
        // SAFETY: as for `prepare` above: it borrows the boxed connection,
        // which outlives it (field order).
        let state =
            unsafe { std::mem::transmute::<InPlace<'_>, InPlace<'static>>(InPlace::prepare(&conn, STATE_BY_ID)?) };
        let delivery_state = prepare(DELIVERY_STATE_BY_ID)?;
        Ok(Reader { by_id, state, delivery_state, conn, seen: 0 })
    }

    /// A reader whose snapshot holds every commit made so far.
    fn get(&self) -> rusqlite::Result<Reader> {
        let idle = self.idle.lock().expect("store reader pool poisoned").pop();
        let mut reader = match idle {
            Some(reader) => reader,
            None => self.connect()?,
        };
        let now = self.generation.load(Ordering::Acquire);
        if !reader.conn.is_autocommit() && reader.seen != now {
            reader.conn.execute_batch("COMMIT")?;
        }
        if reader.conn.is_autocommit() {
            // The snapshot is taken at the first read, after `now` was counted.
            reader.conn.execute_batch("BEGIN")?;
            reader.seen = now;
        }
        Ok(reader)
    }

    fn put(&self, reader: Reader) {
        let mut idle = self.idle.lock().expect("store reader pool poisoned");
        if idle.len() < READERS {
            idle.push(reader);
        }
    }

    /// Runs `op` on a reader (see [`ReadPool::get`]), then keeps the reader.
    /// The caller holds a `free` permit.
    pub(super) fn with<T>(&self, op: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let reader = self.get()?;
        let out = op(&reader.conn);
        self.put(reader);
        out
    }

    /// The record `query` finds by `id`, read with the reader's own statement.
    /// The caller holds a `free` permit.
    pub(super) fn record_by_id(&self, query: ById, id: &str) -> rusqlite::Result<Option<Box<RequestRecord>>> {
        let mut reader = self.get()?;
        let out = reader.by_id[query as usize].query_row([id], |row| record_from_row(row).map(Box::new)).optional();
        self.put(reader);
        out
    }

    /// Shows `show` the state of request `id`, read with the reader's own
    /// statement; false when there is no such request. The caller holds a
    /// `free` permit.
    pub(super) fn state_by_id(&self, id: &str, show: &mut ShowState<'_>) -> rusqlite::Result<bool> {
        let mut reader = self.get()?;
        let Reader { state, delivery_state, .. } = &mut reader;
        let out = state.query_row(|values| values.text(id), |row| state_from_row(row, id, delivery_state, show));
        self.put(reader);
        out.map(|found| found.is_some())
    }

    /// Ends the stale snapshots of idle readers every [`JANITOR_EVERY`], until
    /// the pool is dropped.
    fn spawn_janitor(pool: &Arc<ReadPool>) {
        let pool = Arc::downgrade(pool);
        let started = std::thread::Builder::new().name("muxi-store-readers".into()).spawn(move || loop {
            std::thread::sleep(JANITOR_EVERY);
            let Some(pool) = pool.upgrade() else { return };
            let now = pool.generation.load(Ordering::Acquire);
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            for reader in idle.iter_mut().filter(|r| !r.conn.is_autocommit() && r.seen != now) {
                if let Err(e) = reader.conn.execute_batch("COMMIT") {
                    tracing::debug!(error = %e, "cannot end a reader's snapshot");
                }
            }
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the readers' janitor; snapshots end at the next read");
        }
    }
}
