//! The writer's transaction and its savepoints, begun and ended with
//! statements prepared once and kept in the connection's statement cache.
//!
//! rusqlite's `Transaction` and `Savepoint` run `BEGIN IMMEDIATE`, `COMMIT`,
//! `SAVEPOINT` and the rest through `execute_batch`, which parses the text
//! again every time: about 4,000 instructions for each, twice per batch, where
//! a batch of new requests costs about 1,500 a request in all. Here each is
//! parsed once per connection. The guard keeps rusqlite's drop behaviour: a
//! transaction not committed (an error, a panic in a job) is rolled back when
//! it is dropped; a job that fails is undone alone, back to its savepoint.

use rusqlite::Connection;

/// Runs one transaction-control statement, prepared once per connection.
fn run(conn: &Connection, sql: &'static str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// A write transaction (`BEGIN IMMEDIATE`) on the writer's connection; rolled
/// back on drop unless [`Batch::commit`] succeeded.
pub(super) struct Batch<'c> {
    conn: &'c Connection,
}

impl<'c> Batch<'c> {
    pub fn begin(conn: &'c Connection) -> rusqlite::Result<Batch<'c>> {
        run(conn, "BEGIN IMMEDIATE")?;
        Ok(Batch { conn })
    }

    /// Whether SQLite has already ended the transaction itself: an I/O error
    /// or a full disk rolls the whole of it back.
    pub fn was_rolled_back(&self) -> bool {
        self.conn.is_autocommit()
    }

    /// Runs `job` inside a savepoint of its own: undone alone if it fails
    /// (returns false), kept otherwise.
    pub fn savepoint(&self, job: impl FnOnce(&Connection) -> bool) -> rusqlite::Result<bool> {
        run(self.conn, "SAVEPOINT job")?;
        let ok = job(self.conn);
        if !ok {
            run(self.conn, "ROLLBACK TO job")?;
        }
        run(self.conn, "RELEASE job")?;
        Ok(ok)
    }

    /// Commits; on failure the transaction is rolled back when `self` drops.
    pub fn commit(self) -> rusqlite::Result<()> {
        run(self.conn, "COMMIT")
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = run(self.conn, "ROLLBACK") {
                tracing::error!(error = %e, "cannot roll back the writer's transaction");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER PRIMARY KEY)").unwrap();
        (dir, conn)
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        let mut statement = conn.prepare("SELECT a FROM t ORDER BY a").unwrap();
        statement.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    }

    fn insert(conn: &Connection, a: i64) -> bool {
        conn.execute("INSERT INTO t (a) VALUES (?1)", [a]).is_ok()
    }

    /// What is committed stays; a failed savepoint is undone alone; the same
    /// prepared statements serve every batch.
    #[test]
    fn a_committed_batch_keeps_what_its_savepoints_kept() {
        let (_dir, conn) = table();
        for round in 0..3 {
            let batch = Batch::begin(&conn).unwrap();
            assert!(!batch.was_rolled_back());
            let base = round * 10;
            assert!(batch.savepoint(|c| insert(c, base + 1) && insert(c, base + 2)).unwrap());
            // Its first insert succeeds and its second fails: both are undone.
            assert!(!batch.savepoint(|c| insert(c, base + 3) && insert(c, base + 1)).unwrap());
            assert!(insert(&conn, base + 4));
            batch.commit().unwrap();
            assert!(conn.is_autocommit());
        }
        assert_eq!(rows(&conn), [1, 2, 4, 11, 12, 14, 21, 22, 24]);
    }

    /// A batch dropped uncommitted (an error, a panic) leaves nothing behind,
    /// and the connection can begin the next one.
    #[test]
    fn a_batch_dropped_uncommitted_is_rolled_back() {
        let (_dir, conn) = table();
        {
            let batch = Batch::begin(&conn).unwrap();
            assert!(batch.savepoint(|c| insert(c, 1)).unwrap());
            assert!(insert(&conn, 2));
        }
        assert!(conn.is_autocommit());
        assert!(rows(&conn).is_empty());
        let batch = Batch::begin(&conn).unwrap();
        assert!(insert(&conn, 3));
        batch.commit().unwrap();
        assert_eq!(rows(&conn), [3]);
    }

    /// A batch begun while another connection writes waits for it (IMMEDIATE
    /// takes the write lock at once), and fails when the lock is not freed.
    #[test]
    fn a_batch_takes_the_write_lock_when_it_begins() {
        let (dir, conn) = table();
        conn.busy_timeout(std::time::Duration::from_millis(50)).unwrap();
        let other = Connection::open(dir.path().join("t.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let refused = Batch::begin(&conn).err().and_then(|e| e.sqlite_error_code());
        assert_eq!(refused, Some(rusqlite::ErrorCode::DatabaseBusy));
        other.execute_batch("COMMIT").unwrap();
        Batch::begin(&conn).unwrap().commit().unwrap();
    }
}
