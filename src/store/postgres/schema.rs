//! The PostgreSQL schema and its versioned migrations, applied at start-up in
//! one transaction under a transaction-level advisory lock, so replicas that
//! start together apply each migration exactly once.

use sqlx::PgPool;

use crate::store::{StoreError, StoreResult};

/// The advisory lock key migrations run under ("muxi-mig").
const MIGRATION_LOCK: i64 = 0x6d75_7869_2d6d_6967;

/// Schema migrations, in order; `muxi_migrations` records those applied.
/// Append only: never edit a migration that has shipped. Ids are `COLLATE "C"`
/// so they order bytewise, as SQLite orders them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE requests (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    formation_id        TEXT NOT NULL,
    formation_version   TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    session_id          TEXT COLLATE "C",
    agent_id            TEXT NOT NULL,
    message             TEXT NOT NULL,
    mode                TEXT NOT NULL,
    answered_async      BOOLEAN NOT NULL DEFAULT FALSE,
    estimated_seconds   DOUBLE PRECISION NOT NULL,
    idempotency_key     TEXT,
    fingerprint         TEXT,
    webhook_url         TEXT,
    workflow_timeout_ms BIGINT NOT NULL DEFAULT 3600000,
    status              TEXT NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    progress            DOUBLE PRECISION NOT NULL DEFAULT 0,
    current_step        TEXT,
    total_steps         BIGINT,
    completed_steps     BIGINT,
    status_message      TEXT,
    result_text         TEXT,
    artifacts           TEXT,
    error               TEXT,
    attempts            BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    started_at          BIGINT,
    completed_at        BIGINT,
    lease_owner         TEXT,
    lease_epoch         BIGINT NOT NULL DEFAULT 0,
    lease_expires_at    BIGINT
);
CREATE INDEX requests_by_user ON requests (formation_id, user_id, created_at);
CREATE INDEX requests_by_status ON requests (status, created_at) WHERE status IN ('pending', 'processing');
CREATE INDEX requests_by_lease ON requests (lease_owner) WHERE status IN ('pending', 'processing');
CREATE INDEX requests_by_agent ON requests (formation_id, agent_id, completed_at) WHERE status = 'completed';
CREATE INDEX requests_by_session ON requests (formation_id, user_id, session_id, created_at);
CREATE INDEX requests_finished ON requests (completed_at) WHERE status IN ('completed', 'failed', 'cancelled');
CREATE UNIQUE INDEX requests_idempotency ON requests (formation_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE deliveries (
    id               TEXT COLLATE "C" PRIMARY KEY,
    request_id       TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES requests (id) ON DELETE CASCADE,
    formation_id     TEXT NOT NULL,
    url              TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    claimed_by       TEXT,
    claim_expires_at BIGINT
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE reruns (
    request_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES requests (id) ON DELETE CASCADE,
    original_id TEXT COLLATE "C" NOT NULL REFERENCES requests (id) ON DELETE CASCADE
);
CREATE INDEX reruns_by_original ON reruns (original_id);

CREATE TABLE session_messages (
    formation_id TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    session_id   TEXT COLLATE "C" NOT NULL,
    seq          BIGINT NOT NULL,
    role         TEXT NOT NULL,
    content      TEXT NOT NULL,
    agent_id     TEXT,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (formation_id, user_id, session_id, seq)
);
CREATE INDEX session_messages_by_user ON session_messages (formation_id, user_id, created_at);
"#,
    r#"
-- The formation revision each server process has loaded (see `Store::publish_copies`).
CREATE TABLE formation_copies (
    formation_id TEXT COLLATE "C" NOT NULL,
    owner        TEXT COLLATE "C" NOT NULL,
    revision     TEXT NOT NULL,
    seen_at      BIGINT NOT NULL,
    PRIMARY KEY (formation_id, owner)
);
"#,
    r#"
-- The queue is read per formation, oldest first (claims) and counted per
-- status (backlog): one index serves both.
DROP INDEX requests_by_status;
CREATE INDEX requests_queue ON requests (formation_id, created_at, status)
    WHERE status IN ('pending', 'processing');
"#,
];

/// Applies the migrations this database has not seen yet.
pub async fn migrate(pool: &PgPool) -> StoreResult<()> {
    let failed = |e: sqlx::Error| StoreError(format!("migrate: {e}"));
    let mut tx = pool.begin().await.map_err(failed)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await.map_err(failed)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS muxi_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await
    .map_err(failed)?;
    let version: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM muxi_migrations")
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
    let known = MIGRATIONS.len() as i64;
    if !(0..=known).contains(&version) {
        return Err(StoreError(format!("schema version {version} is not one this build knows (0..={known})")));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        sqlx::raw_sql(migration).execute(&mut *tx).await.map_err(failed)?;
        sqlx::query("INSERT INTO muxi_migrations (version) VALUES ($1)")
            .bind(i as i64 + 1)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    tx.commit().await.map_err(failed)
}
