//! The SQLite schema, versioned with `PRAGMA user_version`: [`MIGRATIONS`] are
//! applied in order, in one transaction, when the store opens.

use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use crate::store::{StoreError, StoreResult};

/// One step of the schema: SQL, or, for what SQL alone cannot say, code.
enum Migration {
    Sql(&'static str),
    Code(fn(&Transaction) -> StoreResult<()>),
}

/// Schema migrations; `PRAGMA user_version` is the number applied so far.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        r#"
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
-- Partial indexes stay small and hot: an insert touches only what it must.
CREATE INDEX requests_by_status ON requests (status, created_at)
    WHERE status IN ('pending', 'processing');
CREATE INDEX requests_by_agent ON requests (formation_id, agent_id, completed_at)
    WHERE status = 'completed';
CREATE INDEX requests_by_session ON requests (formation_id, user_id, session_id, created_at)
    WHERE status = 'completed';
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
"#,
    ),
    Migration::Sql(
        r#"
-- Leases: the runner of an attempt holds (owner, epoch, expiry); its writes are
-- fenced by the epoch. Whether the caller got a 202 is kept with the request.
ALTER TABLE requests ADD COLUMN answered_async INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN fingerprint TEXT;
ALTER TABLE requests ADD COLUMN workflow_timeout_ms INTEGER NOT NULL DEFAULT 3600000;
ALTER TABLE requests ADD COLUMN lease_owner TEXT;
ALTER TABLE requests ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN lease_expires_at INTEGER;
UPDATE requests SET answered_async = 1 WHERE mode = 'async';
-- Deliveries are claimed by one sender at a time.
ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE deliveries ADD COLUMN claim_expires_at INTEGER;
-- A re-run (admin console) is a new request with the same input, linked here.
CREATE TABLE reruns (
    request_id  TEXT PRIMARY KEY REFERENCES requests (id) ON DELETE CASCADE,
    original_id TEXT NOT NULL REFERENCES requests (id) ON DELETE CASCADE
);
CREATE INDEX reruns_by_original ON reruns (original_id);
-- Messages a session was seeded with (POST /sessions/{id}/restore).
CREATE TABLE session_messages (
    formation_id TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    role         TEXT NOT NULL,
    content      TEXT NOT NULL,
    agent_id     TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (formation_id, user_id, session_id, seq)
);
CREATE INDEX session_messages_by_user ON session_messages (formation_id, user_id, created_at);
"#,
    ),
    Migration::Sql(
        r#"
-- The formation revision each server process has loaded (see `Store::publish_copies`).
CREATE TABLE formation_copies (
    formation_id TEXT NOT NULL,
    owner        TEXT NOT NULL,
    revision     TEXT NOT NULL,
    seen_at      INTEGER NOT NULL,
    PRIMARY KEY (formation_id, owner)
);
"#,
    ),
    Migration::Sql(
        r#"
-- The queue is read per formation, oldest first (claims) and counted per
-- status (backlog): one index serves both, and covers the count.
DROP INDEX requests_by_status;
CREATE INDEX requests_queue ON requests (formation_id, created_at, status)
    WHERE status IN ('pending', 'processing');
-- Leases held, per owner (renewal, takeover). A queued request holds none, so
-- its insert does not touch this index.
CREATE INDEX requests_held ON requests (lease_owner)
    WHERE lease_owner IS NOT NULL AND status IN ('pending', 'processing');
"#,
    ),
    Migration::Code(checks_as_comparisons),
    Migration::Sql(MESSAGE_LAST),
    Migration::Sql(
        r#"
-- Long messages, kept out of their request's row (which then holds ''): every
-- update of a row whose size changes (progress, a claim, a lease, the end)
-- writes the row again whole, overflow pages and all. Keyed by the request's
-- id, which is time-ordered, so an insert appends. Messages stored before
-- stay in their rows, where they are read as before.
CREATE TABLE request_messages (
    id      TEXT PRIMARY KEY,
    message TEXT NOT NULL
) WITHOUT ROWID;
-- A request and its message go together: a purge deletes both. (A rebuild of
-- `requests` drops this trigger with the table: it must create it again.)
CREATE TRIGGER request_messages_go_with_their_request AFTER DELETE ON requests
    WHEN OLD.message = ''
    BEGIN DELETE FROM request_messages WHERE id = OLD.id; END;
"#,
    ),
];

/// `requests` rebuilt with its large values last, per the procedure of
/// <https://sqlite.org/lang_altertable.html#otheralter> (foreign keys are off
/// while [`migrate`] runs). SQLite stores a row's columns in order, and a value
/// that spills into overflow pages pushes every later column to the end of
/// the chain, which each read of them walks: with `message` seventh, a poll of
/// a request with a 900 KB message walked 220 pages for its status.
const MESSAGE_LAST: &str = r#"
CREATE TABLE requests_rebuilt (
    id                  TEXT PRIMARY KEY,
    formation_id        TEXT NOT NULL,
    formation_version   TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    session_id          TEXT,
    agent_id            TEXT NOT NULL,
    mode                TEXT NOT NULL,
    estimated_seconds   REAL NOT NULL,
    idempotency_key     TEXT,
    webhook_url         TEXT,
    status              TEXT NOT NULL
        CHECK (status = 'pending' OR status = 'processing' OR status = 'completed' OR status = 'failed' OR status = 'cancelled'),
    progress            REAL NOT NULL DEFAULT 0,
    current_step        TEXT,
    total_steps         INTEGER,
    completed_steps     INTEGER,
    status_message      TEXT,
    error               TEXT,            -- JSON ErrorInfo
    attempts            INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    completed_at        INTEGER,
    answered_async      INTEGER NOT NULL DEFAULT 0,
    fingerprint         TEXT,
    workflow_timeout_ms INTEGER NOT NULL DEFAULT 3600000,
    lease_owner         TEXT,
    lease_epoch         INTEGER NOT NULL DEFAULT 0,
    lease_expires_at    INTEGER,
    -- The values that can be large, last: the result (read by a status poll of
    -- a completed request), then the message (read only to run the request).
    result_text         TEXT,            -- set iff the request completed
    artifacts           TEXT,            -- JSON array, set with result_text
    message             TEXT NOT NULL
);
INSERT INTO requests_rebuilt (rowid, id, formation_id, formation_version, user_id, session_id, agent_id, mode,
    estimated_seconds, idempotency_key, webhook_url, status, progress, current_step, total_steps, completed_steps,
    status_message, error, attempts, created_at, started_at, completed_at, answered_async, fingerprint,
    workflow_timeout_ms, lease_owner, lease_epoch, lease_expires_at, result_text, artifacts, message)
SELECT rowid, id, formation_id, formation_version, user_id, session_id, agent_id, mode,
    estimated_seconds, idempotency_key, webhook_url, status, progress, current_step, total_steps, completed_steps,
    status_message, error, attempts, created_at, started_at, completed_at, answered_async, fingerprint,
    workflow_timeout_ms, lease_owner, lease_epoch, lease_expires_at, result_text, artifacts, message
FROM requests;
DROP TABLE requests;
ALTER TABLE requests_rebuilt RENAME TO requests;
CREATE INDEX requests_by_user ON requests (formation_id, user_id, created_at);
CREATE INDEX requests_by_agent ON requests (formation_id, agent_id, completed_at)
    WHERE status = 'completed';
CREATE INDEX requests_by_session ON requests (formation_id, user_id, session_id, created_at)
    WHERE status = 'completed';
CREATE UNIQUE INDEX requests_idempotency ON requests (formation_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX requests_queue ON requests (formation_id, created_at, status)
    WHERE status IN ('pending', 'processing');
CREATE INDEX requests_held ON requests (lease_owner)
    WHERE lease_owner IS NOT NULL AND status IN ('pending', 'processing');
"#;

/// CHECK constraints written `status IN (a, b, c)` (three values or more) make
/// SQLite build a temporary b-tree of the values for every row it inserts, or
/// whose status it changes; written as `=` ... `OR`, they cost a few
/// comparisons. A CHECK does not shape what is on disk, so the table
/// definitions are edited in place as <https://sqlite.org/lang_altertable.html#otheralter>
/// describes, not rebuilt.
fn checks_as_comparisons(tx: &Transaction) -> StoreResult<()> {
    const EDITS: [(&str, &str, &str); 2] = [
        (
            "requests",
            "CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled'))",
            "CHECK (status = 'pending' OR status = 'processing' OR status = 'completed' \
             OR status = 'failed' OR status = 'cancelled')",
        ),
        (
            "deliveries",
            "CHECK (status IN ('pending', 'delivered', 'failed'))",
            "CHECK (status = 'pending' OR status = 'delivered' OR status = 'failed')",
        ),
    ];
    let sql = |e: rusqlite::Error| StoreError(format!("rewriting CHECK constraints: {e}"));
    let version: i64 = tx.query_row("PRAGMA schema_version", [], |row| row.get(0)).map_err(sql)?;
    tx.pragma_update(None, "writable_schema", true).map_err(sql)?;
    for (table, old, new) in EDITS {
        let edited = tx
            .execute(
                "UPDATE sqlite_schema SET sql = replace(sql, ?2, ?3) \
                 WHERE type = 'table' AND name = ?1 AND instr(sql, ?2) > 0",
                params![table, old, new],
            )
            .map_err(sql)?;
        if edited != 1 {
            // Rolled back with the whole migration: nothing is left half-edited.
            return Err(StoreError(format!("table {table}: its CHECK constraint is not the one this build wrote")));
        }
    }
    // Other connections see the new cookie and reread the schema; RESET makes
    // this one reread it too.
    tx.pragma_update(None, "schema_version", version + 1).map_err(sql)?;
    tx.execute_batch("PRAGMA writable_schema = RESET").map_err(sql)?;
    Ok(())
}

/// Applies the migrations the database has not seen yet, in one transaction,
/// with foreign keys off (a rebuilt table is dropped and replaced: with them
/// on, the drop would delete the rows that refer to it) and checked before
/// the commit.
pub(super) fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let sql = |e: rusqlite::Error| StoreError(e.to_string());
    let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |row| row.get(0)).map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", false).map_err(sql)?;
    let migrated = migrate_in_transaction(conn);
    conn.pragma_update(None, "foreign_keys", enforced).map_err(sql)?;
    if migrated? {
        // A rebuilt table went through the WAL whole; give that space back
        // (the old table's pages stay in the file, free for new rows).
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).map_err(sql)?;
    }
    Ok(())
}

/// Whether any migration was applied.
fn migrate_in_transaction(conn: &mut Connection) -> StoreResult<bool> {
    let sql = |e: rusqlite::Error| StoreError(e.to_string());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(sql)?;
    let known = MIGRATIONS.len() as i64;
    if !(0..=known).contains(&version) {
        return Err(StoreError(format!("schema version {version} is not one this build knows (0..={known})")));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        // Some steps rebuild a table: on a large database they take a while.
        tracing::info!(version = i + 1, "applying store migration");
        match migration {
            Migration::Sql(batch) => tx.execute_batch(batch).map_err(sql)?,
            Migration::Code(step) => step(&tx)?,
        }
        tracing::info!(version = i + 1, "applied store migration");
    }
    if version < known {
        let broken: i64 =
            tx.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |row| row.get(0)).map_err(sql)?;
        if broken > 0 {
            return Err(StoreError(format!("{broken} rows refer to rows that are gone; nothing was migrated")));
        }
        tx.pragma_update(None, "user_version", known).map_err(sql)?;
    }
    tx.commit().map_err(sql)?;
    Ok(version < known)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with the first `applied` migrations, as an older build left it.
    fn at_version(applied: usize) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        for migration in &MIGRATIONS[..applied] {
            match migration {
                Migration::Sql(batch) => conn.execute_batch(batch).unwrap(),
                Migration::Code(step) => {
                    let tx = conn.transaction().unwrap();
                    step(&tx).unwrap();
                    tx.commit().unwrap();
                }
            }
        }
        conn.pragma_update(None, "user_version", applied as i64).unwrap();
        conn
    }

    /// The number of the migration `step` is (its position plus one).
    fn number_of(step: &str) -> usize {
        1 + MIGRATIONS
            .iter()
            .position(|m| match m {
                Migration::Sql(batch) => *batch == step,
                Migration::Code(_) => false,
            })
            .expect("a migration")
    }

    fn insert(conn: &Connection, id: &str, status: &str) -> rusqlite::Result<usize> {
        conn.execute(
            "INSERT INTO requests (id, formation_id, formation_version, user_id, agent_id, message, mode, \
             estimated_seconds, status, created_at) VALUES (?1, 'f', 'v', 'u', 'a', 'hi', 'async', 1.0, ?2, 1)",
            params![id, status],
        )
    }

    /// The opcodes SQLite compiles `sql` to.
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        let mut explain = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let count = explain.parameter_count();
        let nulls = vec![rusqlite::types::Null; count];
        explain
            .query_map(rusqlite::params_from_iter(nulls), |row| row.get::<_, String>(1))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn writing_a_status_builds_no_temporary_btree_and_bad_statuses_are_still_refused() {
        // Before the CHECK rewrite (the only code step).
        let checks = MIGRATIONS.iter().position(|m| matches!(m, Migration::Code(_))).unwrap();
        let before = at_version(checks);
        let statements = [
            "INSERT INTO requests (id, formation_id, formation_version, user_id, agent_id, message, mode, \
             estimated_seconds, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            "UPDATE requests SET status = ?2 WHERE id = ?1",
            "INSERT INTO deliveries (id, request_id, formation_id, url, status, next_attempt_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        ];
        // The constraints as first written cost a temporary b-tree per row...
        for sql in statements {
            assert!(opcodes(&before, sql).iter().any(|op| op == "OpenEphemeral"), "before: {sql}");
        }
        insert(&before, "req_old", "pending").unwrap();
        let mut conn = before;
        migrate(&mut conn).unwrap();
        // ...and none once rewritten.
        for sql in statements {
            assert!(!opcodes(&conn, sql).iter().any(|op| op == "OpenEphemeral"), "after: {sql}");
        }
        // The rows are as they were, and the constraints still hold.
        let status: String =
            conn.query_row("SELECT status FROM requests WHERE id = 'req_old'", [], |r| r.get(0)).unwrap();
        assert_eq!(status, "pending");
        insert(&conn, "req_new", "completed").unwrap();
        let refused = insert(&conn, "req_bad", "paused").unwrap_err();
        assert!(refused.to_string().contains("CHECK constraint failed"), "{refused}");
        let refused = conn.execute("UPDATE requests SET status = 'lost' WHERE id = 'req_old'", []).unwrap_err();
        assert!(refused.to_string().contains("CHECK constraint failed"), "{refused}");
        let refused = conn
            .execute(
                "INSERT INTO deliveries (id, request_id, formation_id, url, status, next_attempt_at, created_at) \
                 VALUES ('d1', 'req_old', 'f', 'http://x', 'sent', 0, 0)",
                [],
            )
            .unwrap_err();
        assert!(refused.to_string().contains("CHECK constraint failed"), "{refused}");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn the_rebuild_with_the_message_last_keeps_every_row_and_what_refers_to_it() {
        let mut conn = at_version(number_of(MESSAGE_LAST) - 1);
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        let big = "x".repeat(100_000);
        conn.execute(
            "INSERT INTO requests (id, formation_id, formation_version, user_id, session_id, agent_id, message, mode, \
             estimated_seconds, idempotency_key, webhook_url, status, progress, current_step, total_steps, \
             completed_steps, status_message, result_text, artifacts, error, attempts, created_at, started_at, \
             completed_at, answered_async, fingerprint, workflow_timeout_ms, lease_owner, lease_epoch, \
             lease_expires_at) VALUES ('req_1', 'f', 'v', 'u', 's', 'a', ?1, 'async', 2.5, 'k', 'http://h', \
             'completed', 100, 'step', 3, 3, 'done', 'the result', '[]', NULL, 1, 10, 11, 12, 1, 'fp', 60000, \
             NULL, 4, NULL)",
            [&big],
        )
        .unwrap();
        insert(&conn, "req_2", "pending").unwrap();
        conn.execute(
            "UPDATE requests SET lease_owner = 'me', lease_epoch = 2, lease_expires_at = 99 WHERE id = 'req_2'",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO deliveries (id, request_id, formation_id, url, status, next_attempt_at, created_at) \
             VALUES ('d1', 'req_1', 'f', 'http://h', 'pending', 0, 0)",
            [],
        )
        .unwrap();
        conn.execute("INSERT INTO reruns (request_id, original_id) VALUES ('req_2', 'req_1')", []).unwrap();
        let rows = |conn: &Connection| -> Vec<Vec<rusqlite::types::Value>> {
            let mut all = conn.prepare("SELECT rowid, * FROM requests ORDER BY id").unwrap();
            let names: Vec<String> = all.column_names().iter().map(|n| n.to_string()).collect();
            let mut by_name = names.clone();
            by_name.sort();
            all.query_map([], |row| {
                by_name.iter().map(|n| row.get(names.iter().position(|m| m == n).unwrap())).collect()
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
        };
        let indexes = |conn: &Connection| -> Vec<(String, String)> {
            conn.prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'requests' AND sql IS NOT NULL ORDER BY name")
                .unwrap()
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let (rows_before, indexes_before) = (rows(&conn), indexes(&conn));

        migrate(&mut conn).unwrap();

        assert_eq!(rows(&conn), rows_before, "every row and field, rowids included");
        assert_eq!(indexes(&conn), indexes_before, "the same indexes");
        let last: String = conn
            .query_row("SELECT name FROM pragma_table_info('requests') ORDER BY cid DESC LIMIT 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(last, "message");
        let kept: (i64, i64) = conn
            .query_row("SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM reruns)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(kept, (1, 1), "the delivery and the re-run that refer to the requests are kept");
        let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert!(enforced, "foreign keys are enforced again");
        conn.execute("DELETE FROM requests WHERE id = 'req_1'", []).unwrap();
        let cascaded: i64 = conn.query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0)).unwrap();
        assert_eq!(cascaded, 0, "the foreign keys point at the rebuilt table");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn a_fresh_database_gets_every_migration_and_a_second_open_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        insert(&conn, "req_1", "pending").unwrap();
    }
}
