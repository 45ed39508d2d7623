//! The SQLite store's read-only connections: a fixed set behind a semaphore,
//! each keeping its snapshot between reads until the writer commits again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, MMAP_BYTES};

/// Read-only connections: at most this many reads run at once; the rest wait
/// for one to be free rather than opening (and warming) a connection each.
const READERS: usize = 8;

/// The read-only connections. Each keeps its read transaction (its snapshot)
/// open between reads until the writer commits again: a read then costs no
/// `BEGIN`, no WAL read lock (two `fcntl` calls) and no `COMMIT`. A reader
/// whose snapshot is older than the last commit starts a new one before it
/// reads, so a read never misses a write whose caller has been answered (the
/// writer counts a commit before it answers). A janitor ends stale snapshots of
/// idle readers, so they do not hold the WAL back from its checkpoints.
pub(super) struct ReadPool {
    path: PathBuf,
    pub(super) idle: Mutex<Vec<Reader>>,
    /// One permit per connection that may be in use ([`READERS`]).
    pub(super) free: Arc<tokio::sync::Semaphore>,
    /// Commits made by the writer so far.
    commits: Arc<AtomicU64>,
}

pub(super) struct Reader {
    pub(super) conn: Connection,
    /// The commit count when its open read transaction began.
    seen: u64,
}

/// How often the janitor ends stale snapshots of idle readers.
pub(super) const JANITOR_EVERY: Duration = Duration::from_millis(250);

impl ReadPool {
    /// The pool for the database at `path`, whose writer counts its commits in
    /// `commits`. One reader is opened now, so a database readers cannot open
    /// fails here, not at the first read.
    pub(super) fn open(path: &Path, commits: Arc<AtomicU64>) -> rusqlite::Result<Arc<ReadPool>> {
        let pool = Arc::new(ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            free: Arc::new(tokio::sync::Semaphore::new(READERS)),
            commits,
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
        // The record query under a short name: a poll's `prepare_cached` then
        // hashes and compares a few bytes of SQL, not all of it. A TEMP view
        // lives in this connection only, so it always has this build's columns.
        // `request_states` is the same without the message (see `get_without_message`).
        conn.execute_batch(concat!(
            "CREATE TEMP VIEW request_records AS ",
            select_records!(""),
            "; CREATE TEMP VIEW request_states AS SELECT ",
            record_columns!("'' AS message"),
        ))?;
        Ok(Reader { conn, seen: 0 })
    }

    /// A reader whose snapshot holds every commit made so far.
    fn get(&self) -> rusqlite::Result<Reader> {
        let idle = self.idle.lock().expect("store reader pool poisoned").pop();
        let mut reader = match idle {
            Some(reader) => reader,
            None => self.connect()?,
        };
        let now = self.commits.load(Ordering::Acquire);
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

    /// Ends the stale snapshots of idle readers every [`JANITOR_EVERY`], until
    /// the pool is dropped.
    fn spawn_janitor(pool: &Arc<ReadPool>) {
        let pool = Arc::downgrade(pool);
        let started = std::thread::Builder::new().name("muxi-store-readers".into()).spawn(move || loop {
            std::thread::sleep(JANITOR_EVERY);
            let Some(pool) = pool.upgrade() else { return };
            let now = pool.commits.load(Ordering::Acquire);
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
