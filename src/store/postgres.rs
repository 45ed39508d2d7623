//! The PostgreSQL store: several muxi-rt replicas share one database.
//!
//! Same contract as the SQLite store ([`super::sqlite`]), over a `sqlx` pool.
//! Every write is one autocommit statement or one short transaction, committed
//! (with the server's `synchronous_commit`) before it returns; new requests
//! are group-committed, many to one statement (see [`batch`]). Concurrency
//! between replicas rests on the database: the idempotency key is a unique
//! index (`INSERT ... ON CONFLICT DO NOTHING`, then the winner is read), work
//! and deliveries are selected with `FOR UPDATE SKIP LOCKED`, each claim raises
//! the lease epoch and every runner write is fenced by it, and the retention
//! purge runs under an advisory lock so one replica purges at a time.
//!
//! A user's cancel is announced with `NOTIFY muxi_cancel, '<id>'` in the same
//! transaction; [`PgStore::watch_cancels`] hands those ids to the engine, so the
//! replica running the request stops its agent at once.
//!
//! The connection string is never logged (it may hold a password). A search
//! path can be given in it: `?options=-c%20search_path%3Dmyschema`.

mod batch;
mod schema;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::broadcast;

use super::{
    AdminQuery, Among, Backlog, Claim, Delivery, DeliveryUpdate, ErrorInfo, FormationCopy, Inserted, Lease, ListQuery,
    Mode, NewDelivery, NewRequest, NewSessionMessage, Outcome, Owner, Progress, RequestRecord, RequestResult, Reruns,
    SessionMessage, SessionSummary, Status, Store, StoreError, StoreHealth, StoreResult, WebhookState,
};

/// The channel cancels are announced on.
pub const CANCEL_CHANNEL: &str = "muxi_cancel";
/// The advisory lock the retention purge runs under ("muxi-pur").
const PURGE_LOCK: i64 = 0x6d75_7869_2d70_7572;
/// Connections per replica.
const MAX_CONNECTIONS: u32 = 16;
/// How long a caller waits for a connection before the store answers an error.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL implementation of [`Store`].
pub struct PgStore {
    pool: PgPool,
    health: Arc<Mutex<StoreHealth>>,
    cancels: broadcast::Sender<String>,
    /// The group-commit writer of new requests (see [`batch`]).
    inserts: batch::Inserter,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://...`), applies the migrations under an
    /// advisory lock and starts listening for cancels.
    pub async fn connect(url: &str) -> StoreResult<PgStore> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError(format!("invalid database URL: {}", redact(&e.to_string(), url))))?;
        let server = format!("{}:{}", options.get_host(), options.get_port());
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::PoolTimedOut => StoreError(format!(
                    "cannot connect to PostgreSQL at {server}: no connection within {ACQUIRE_TIMEOUT:?} \
                     (is it running and listening there?)"
                )),
                e => StoreError(format!("cannot connect to PostgreSQL at {server}: {}", redact(&e.to_string(), url))),
            })?;
        schema::migrate(&pool).await?;
        let (cancels, _) = broadcast::channel(1024);
        let listener =
            PgListener::connect_with(&pool).await.map_err(|e| StoreError(format!("cannot listen for cancels: {e}")))?;
        tokio::spawn(listen(listener, cancels.clone()));
        let health = Arc::new(Mutex::new(StoreHealth::writable()));
        let inserts = batch::Inserter::start(pool.clone(), health.clone());
        tracing::debug!("postgres store open");
        Ok(PgStore { pool, health, cancels, inserts })
    }

    /// The pool, for tests and tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Batch statements of new requests committed so far (see [`batch`]);
    /// under load far fewer than the requests inserted.
    pub fn insert_batches(&self) -> u64 {
        self.inserts.batches()
    }

    /// Notes the outcome of a write for [`Store::health`].
    fn note<T>(&self, name: &str, result: Result<T, sqlx::Error>) -> StoreResult<T> {
        note_on(&self.health, name, result)
    }

    async fn begin(&self, name: &str) -> StoreResult<Transaction<'static, Postgres>> {
        let begun = self.pool.begin().await;
        self.note(name, begun)
    }

    /// One formation's claimable requests, oldest first, in its range of the
    /// queue index. Rows another replica is claiming right now are skipped,
    /// not waited for.
    async fn claimable_in(
        &self,
        owner: &Owner,
        now: i64,
        formation: &str,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        let rows = sqlx::query(select_records!(
            "WHERE r.formation_id = $4 AND r.status IN ('pending', 'processing') \
             AND (r.lease_owner IS NULL OR (r.lease_owner != $1 AND r.lease_expires_at <= $2)) \
             ORDER BY r.created_at, r.id LIMIT $3 FOR UPDATE OF r SKIP LOCKED"
        ))
        .bind(owner)
        .bind(now)
        .bind(sql_limit(limit))
        .bind(formation)
        .fetch_all(&self.pool)
        .await;
        records("claimable", rows)
    }

    /// Inserts one request with its own statement: the path of a request whose
    /// batch failed (so a bad request fails alone) or that must run alone.
    async fn insert_alone(&self, request: NewRequest, holder: Option<&Owner>, lease_ms: i64) -> StoreResult<Inserted> {
        let inserted = sqlx::query(
            "INSERT INTO requests (id, formation_id, formation_version, user_id, session_id, \
             agent_id, message, mode, answered_async, estimated_seconds, idempotency_key, fingerprint, \
             webhook_url, workflow_timeout_ms, status, created_at, lease_owner, lease_expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'pending', $15, $16, $17) \
             ON CONFLICT (formation_id, user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        )
        .bind(&request.id)
        .bind(&request.formation_id)
        .bind(&request.formation_version)
        .bind(&request.user_id)
        .bind(&request.session_id)
        .bind(&request.agent_id)
        .bind(&request.message)
        .bind(request.mode.as_str())
        .bind(request.mode == Mode::Async)
        .bind(request.estimated_seconds)
        .bind(&request.idempotency_key)
        .bind(&request.fingerprint)
        .bind(&request.webhook_url)
        .bind(request.workflow_timeout_ms)
        .bind(request.created_at)
        .bind(holder)
        .bind(holder.map(|_| request.created_at.saturating_add(lease_ms)))
        .execute(&self.pool)
        .await;
        let inserted = self.note("insert", inserted)?;
        if inserted.rows_affected() > 0 {
            return Ok(Inserted::Created(Box::new(RequestRecord::accepted(request))));
        }
        self.existing(request).await
    }

    /// The answer to `request` whose idempotency key is taken: the request
    /// that holds it, [`Inserted::KeyReused`] if that one asked something else.
    async fn existing(&self, request: NewRequest) -> StoreResult<Inserted> {
        // The key is taken: the conflicting row is committed (ON CONFLICT waited
        // for it), so this statement's fresh snapshot sees it.
        let row =
            sqlx::query(select_records!("WHERE r.formation_id = $1 AND r.user_id = $2 AND r.idempotency_key = $3"))
                .bind(&request.formation_id)
                .bind(&request.user_id)
                .bind(&request.idempotency_key)
                .fetch_optional(&self.pool)
                .await;
        let row = decode("insert", row)?
            .ok_or_else(|| StoreError("insert: the idempotency key is taken but its request is gone".into()))?;
        let existing = decode("insert", record_from_row(&row))?;
        let fingerprint: Option<String> = decode("insert", row.try_get("fingerprint"))?;
        Ok(Inserted::key_held_by(Box::new(existing), fingerprint, &request))
    }
}

/// Notes the outcome of a write in `health`: a success, or a failure for want
/// of storage (an error of the request itself says nothing of the store).
fn note_on<T>(health: &Mutex<StoreHealth>, name: &str, result: Result<T, sqlx::Error>) -> StoreResult<T> {
    let mut health = health.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(value) => {
            health.note_success();
            Ok(value)
        }
        Err(e) => {
            let error = StoreError(format!("{name}: {e}"));
            if is_storage_failure(&e) {
                health.note_failure(&error.0);
            }
            Err(error)
        }
    }
}

/// Hides the password of `url` wherever it appears in `text`.
fn redact(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(credentials, _)| credentials.split_once(':'))
        .map(|(_, password)| password);
    match password {
        Some(password) if !password.is_empty() => text.replace(password, "***"),
        _ => text.to_owned(),
    }
}

/// Errors that come from the database being unreachable or refusing writes
/// rather than from the request.
fn is_storage_failure(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection, 53: resources (disk full), 57: operator intervention, 25006: read-only.
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57") || code == "25006"
        }
        _ => false,
    }
}

/// Forwards cancel notifications; the listener reconnects by itself when its
/// connection drops (cancels sent meanwhile are caught by the lease renewal).
async fn listen(mut listener: PgListener, cancels: broadcast::Sender<String>) {
    if let Err(e) = listener.listen(CANCEL_CHANNEL).await {
        tracing::warn!(error = %e, "cannot listen for cancels; other replicas' cancels stop work here at the next lease renewal");
        return;
    }
    loop {
        match listener.recv().await {
            Ok(notification) => {
                let _ = cancels.send(notification.payload().to_owned());
            }
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cancel listener failed; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Rows

fn decode<T>(name: &str, result: Result<T, sqlx::Error>) -> StoreResult<T> {
    result.map_err(|e| StoreError(format!("{name}: {e}")))
}

fn u32_of(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

fn json_column<T: DeserializeOwned>(row: &PgRow, column: &str) -> Result<Option<T>, sqlx::Error> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|text| {
        serde_json::from_str(&text).map_err(|e| sqlx::Error::ColumnDecode { index: column.into(), source: Box::new(e) })
    })
    .transpose()
}

fn bad_value(column: &str, value: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: column.into(), source: format!("unknown value {value:?}").into() }
}

fn record_from_row(row: &PgRow) -> Result<RequestRecord, sqlx::Error> {
    let result = match row.try_get::<Option<String>, _>("result_text")? {
        Some(text) => Some(RequestResult { text, artifacts: json_column(row, "artifacts")?.unwrap_or_default() }),
        None => None,
    };
    let webhook = match row.try_get::<Option<String>, _>("webhook_status")? {
        Some(status) => Some(WebhookState {
            status,
            attempts: u32_of(row.try_get("webhook_attempts")?),
            last_error: row.try_get("webhook_last_error")?,
        }),
        None => None,
    };
    let status: String = row.try_get("status")?;
    let mode: String = row.try_get("mode")?;
    Ok(RequestRecord {
        id: row.try_get("id")?,
        formation_id: row.try_get("formation_id")?,
        formation_version: row.try_get("formation_version")?,
        user_id: row.try_get("user_id")?,
        session_id: row.try_get("session_id")?,
        agent_id: row.try_get("agent_id")?,
        message: row.try_get("message")?,
        mode: Mode::parse(&mode).ok_or_else(|| bad_value("mode", mode.clone()))?,
        answered_async: row.try_get("answered_async")?,
        estimated_seconds: row.try_get("estimated_seconds")?,
        idempotency_key: row.try_get("idempotency_key")?,
        webhook_url: row.try_get("webhook_url")?,
        workflow_timeout_ms: row.try_get("workflow_timeout_ms")?,
        status: Status::parse(&status).ok_or_else(|| bad_value("status", status.clone()))?,
        progress: row.try_get("progress")?,
        current_step: row.try_get("current_step")?,
        total_steps: row.try_get::<Option<i64>, _>("total_steps")?.map(u32_of),
        completed_steps: row.try_get::<Option<i64>, _>("completed_steps")?.map(u32_of),
        status_message: row.try_get("status_message")?,
        result,
        error: json_column::<ErrorInfo>(row, "error")?,
        attempts: u32_of(row.try_get("attempts")?),
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        webhook,
    })
}

fn delivery_from_row(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: row.try_get("id")?,
        request_id: row.try_get("request_id")?,
        formation_id: row.try_get("formation_id")?,
        url: row.try_get("url")?,
        attempts: u32_of(row.try_get("attempts")?),
        next_attempt_at: row.try_get("next_attempt_at")?,
        status: row.try_get("status")?,
        last_error: row.try_get("last_error")?,
    })
}

fn session_from_row(row: &PgRow) -> Result<SessionSummary, sqlx::Error> {
    Ok(SessionSummary {
        session_id: row.try_get("session_id")?,
        created_at: row.try_get("created_at")?,
        last_activity: row.try_get("last_activity")?,
        message_count: row.try_get::<i64, _>("message_count")?.max(0) as u64,
        request_count: row.try_get::<i64, _>("request_count")?.max(0) as u64,
        active_requests: row.try_get::<i64, _>("active_requests")?.max(0) as u64,
    })
}

fn records(name: &str, rows: Result<Vec<PgRow>, sqlx::Error>) -> StoreResult<Vec<RequestRecord>> {
    decode(name, rows.and_then(|rows| rows.iter().map(record_from_row).collect()))
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn to_json(name: &str, value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("{name}: cannot encode JSON: {e}")))
}

/// A user's sessions (`$3` NULL: all, else the one named), from their requests
/// and seeded messages; `$5`: only those with active requests; `LIMIT $4`.
const SESSIONS_SQL: &str = "SELECT * FROM ( \
     SELECT session_id, MIN(first) AS created_at, MAX(last) AS last_activity, \
     SUM(messages)::BIGINT AS message_count, SUM(requests)::BIGINT AS request_count, \
     SUM(active)::BIGINT AS active_requests FROM ( \
       SELECT session_id, created_at AS first, GREATEST(created_at, COALESCE(completed_at, created_at)) AS last, \
              1 + (status = 'completed')::INT AS messages, 1 AS requests, \
              (status IN ('pending', 'processing'))::INT AS active FROM requests \
        WHERE formation_id = $1 AND user_id = $2 AND session_id IS NOT NULL \
          AND ($3::TEXT IS NULL OR session_id = $3) \
       UNION ALL \
       SELECT session_id, created_at, created_at, 1, 0, 0 FROM session_messages \
        WHERE formation_id = $1 AND user_id = $2 AND ($3::TEXT IS NULL OR session_id = $3) \
     ) parts GROUP BY session_id \
   ) s WHERE (NOT $5 OR active_requests > 0) ORDER BY last_activity DESC, session_id DESC LIMIT $4";

// ---------------------------------------------------------------------------
// The trait

#[async_trait]
impl Store for PgStore {
    async fn insert(&self, request: NewRequest, holder: Option<&Owner>, lease_ms: i64) -> StoreResult<Inserted> {
        // Group commit: the batch's statement is committed when this answers.
        let (request, written) = self.inserts.write(request, holder, lease_ms).await?;
        match written {
            batch::Written::Created => Ok(Inserted::Created(Box::new(RequestRecord::accepted(request)))),
            batch::Written::Skipped => self.existing(request).await,
            batch::Written::Alone => self.insert_alone(request, holder, lease_ms).await,
        }
    }

    async fn get(&self, id: &str) -> StoreResult<Option<RequestRecord>> {
        let row = sqlx::query(select_records!("WHERE r.id = $1")).bind(id).fetch_optional(&self.pool).await;
        decode("get", row.and_then(|row| row.as_ref().map(record_from_row).transpose()))
    }

    async fn get_without_message(&self, id: &str) -> StoreResult<Option<Box<RequestRecord>>> {
        let sql = concat!("SELECT ", record_columns!("'' AS message"), "WHERE r.id = $1");
        let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await;
        decode("get_without_message", row.and_then(|row| row.as_ref().map(record_from_row).transpose()))
            .map(|record| record.map(Box::new))
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>> {
        let rows = sqlx::query(select_records!(
            "WHERE r.formation_id = $1 AND r.user_id = $2 AND ($3::TEXT IS NULL OR r.status = $3) \
             ORDER BY r.created_at DESC, r.id DESC LIMIT $4"
        ))
        .bind(&query.formation_id)
        .bind(&query.user_id)
        .bind(query.status.map(Status::as_str))
        .bind(sql_limit(query.limit))
        .fetch_all(&self.pool)
        .await;
        records("list", rows)
    }

    async fn claim(&self, id: &str, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Option<Claim>> {
        let row = sqlx::query(
            "UPDATE requests SET status = 'processing', attempts = attempts + 1, \
             started_at = COALESCE(started_at, $2), lease_owner = $3, lease_epoch = lease_epoch + 1, \
             lease_expires_at = $2 + $4 \
             WHERE id = $1 AND status IN ('pending', 'processing') \
             AND (lease_owner IS NULL OR lease_owner = $3 OR lease_expires_at <= $2) \
             RETURNING attempts, lease_epoch",
        )
        .bind(id)
        .bind(now)
        .bind(owner)
        .bind(lease_ms)
        .fetch_optional(&self.pool)
        .await;
        let row = self.note("claim", row)?;
        row.map(|row| {
            let attempts: i64 = decode("claim", row.try_get(0))?;
            Ok(Claim { attempt: u32_of(attempts), lease: Lease { epoch: decode("claim", row.try_get(1))? } })
        })
        .transpose()
    }

    async fn renew_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>> {
        let ids = sqlx::query_scalar(
            "UPDATE requests SET lease_expires_at = $2 + $3 \
             WHERE lease_owner = $1 AND status IN ('pending', 'processing') RETURNING id",
        )
        .bind(owner)
        .bind(now)
        .bind(lease_ms)
        .fetch_all(&self.pool)
        .await;
        self.note("renew_leases", ids)
    }

    async fn release(&self, id: &str, lease: Lease) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE requests SET lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND status IN ('pending', 'processing')",
        )
        .bind(id)
        .bind(lease.epoch)
        .execute(&self.pool)
        .await;
        Ok(self.note("release", done)?.rows_affected() > 0)
    }

    async fn clear_others_leases(&self, owner: &Owner) -> StoreResult<u64> {
        let mut tx = self.begin("clear_others_leases").await?;
        let requests = sqlx::query(
            "UPDATE requests SET lease_owner = NULL, lease_expires_at = NULL \
             WHERE lease_owner IS NOT NULL AND lease_owner != $1 AND status IN ('pending', 'processing')",
        )
        .bind(owner)
        .execute(&mut *tx)
        .await;
        let requests = self.note("clear_others_leases", requests)?.rows_affected();
        let deliveries = sqlx::query(
            "UPDATE deliveries SET claimed_by = NULL, claim_expires_at = NULL \
             WHERE claimed_by IS NOT NULL AND claimed_by != $1 AND status = 'pending'",
        )
        .bind(owner)
        .execute(&mut *tx)
        .await;
        self.note("clear_others_leases", deliveries)?;
        let committed = tx.commit().await;
        self.note("clear_others_leases", committed)?;
        Ok(requests)
    }

    async fn record_progress(&self, id: &str, fence: Option<Lease>, progress: &Progress) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE requests SET progress = COALESCE($2, progress), \
             current_step = COALESCE($3, current_step), \
             total_steps = COALESCE($4, total_steps), \
             completed_steps = COALESCE($5, completed_steps), \
             status_message = COALESCE($6, status_message) \
             WHERE id = $1 AND status IN ('pending', 'processing') AND ($7::BIGINT IS NULL OR lease_epoch = $7)",
        )
        .bind(id)
        .bind(progress.progress)
        .bind(&progress.current_step)
        .bind(progress.total_steps.map(i64::from))
        .bind(progress.completed_steps.map(i64::from))
        .bind(&progress.message)
        .bind(fence.map(|l| l.epoch))
        .execute(&self.pool)
        .await;
        Ok(self.note("record_progress", done)?.rows_affected() > 0)
    }

    async fn mark_answered_async(&self, id: &str) -> StoreResult<()> {
        let done =
            sqlx::query("UPDATE requests SET answered_async = TRUE WHERE id = $1").bind(id).execute(&self.pool).await;
        self.note("mark_answered_async", done).map(|_| ())
    }

    async fn finish(
        &self,
        id: &str,
        outcome: &Outcome,
        now: i64,
        delivery: Option<NewDelivery>,
        fence: Option<Lease>,
    ) -> StoreResult<bool> {
        let status = outcome.status().as_str();
        let (result_text, artifacts, error, message) = match outcome {
            Outcome::Completed(result) => {
                (Some(result.text.clone()), Some(to_json("finish", &result.artifacts)?), None, None)
            }
            Outcome::Failed(error) => (None, None, Some(to_json("finish", error)?), None),
            Outcome::Cancelled { message } => (None, None, None, Some(message.clone())),
        };
        let mut tx = self.begin("finish").await?;
        let done = sqlx::query(
            "UPDATE requests SET status = $2, result_text = $3, artifacts = $4, error = $5, \
             status_message = COALESCE($6, status_message), completed_at = $7, \
             progress = CASE WHEN $2 = 'completed' THEN 100 ELSE progress END, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND status IN ('pending', 'processing') \
             AND ($8::BIGINT IS NULL OR lease_epoch = $8)",
        )
        .bind(id)
        .bind(status)
        .bind(result_text)
        .bind(artifacts)
        .bind(error)
        .bind(message)
        .bind(now)
        .bind(fence.map(|l| l.epoch))
        .execute(&mut *tx)
        .await;
        if self.note("finish", done)?.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(delivery) = delivery {
            let done = sqlx::query(
                "INSERT INTO deliveries (id, request_id, formation_id, url, status, attempts, \
                 next_attempt_at, created_at) \
                 SELECT $1, id, formation_id, $2, 'pending', 0, $3, $3 FROM requests WHERE id = $4",
            )
            .bind(&delivery.id)
            .bind(&delivery.url)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await;
            self.note("finish", done)?;
        }
        if matches!(outcome, Outcome::Cancelled { .. }) {
            // Delivered at commit to every replica; the one running it stops.
            let done = sqlx::query("SELECT pg_notify($1, $2)").bind(CANCEL_CHANNEL).bind(id).execute(&mut *tx).await;
            self.note("finish", done)?;
        }
        let committed = tx.commit().await;
        self.note("finish", committed)?;
        Ok(true)
    }

    async fn claimable(
        &self,
        owner: &Owner,
        now: i64,
        among: Among<'_>,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        match among {
            Among::Formation(formation) => self.claimable_in(owner, now, formation, limit).await,
            Among::AllBut(loaded) => {
                let formations =
                    sqlx::query_scalar::<_, String>(super::UNFINISHED_FORMATIONS).fetch_all(&self.pool).await;
                let mut records = Vec::new();
                for formation in self.note("claimable", formations)?.iter().filter(|f| !loaded.contains(f)) {
                    records.extend(self.claimable_in(owner, now, formation, limit).await?);
                }
                Ok(super::oldest_first(records, limit))
            }
        }
    }

    async fn purge_finished_before(&self, formation_id: Option<&str>, cutoff: i64) -> StoreResult<u64> {
        let mut tx = self.begin("purge_finished_before").await?;
        let locked = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PURGE_LOCK)
            .fetch_one(&mut *tx)
            .await;
        if !self.note("purge_finished_before", locked)? {
            // Another replica is purging right now; the next round catches up.
            return Ok(0);
        }
        // Deliveries go with their requests (ON DELETE CASCADE).
        let deleted = sqlx::query(
            "DELETE FROM requests WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at < $1 \
             AND ($2::TEXT IS NULL OR formation_id = $2)",
        )
        .bind(cutoff)
        .bind(formation_id)
        .execute(&mut *tx)
        .await;
        let deleted = self.note("purge_finished_before", deleted)?.rows_affected();
        let committed = tx.commit().await;
        self.note("purge_finished_before", committed)?;
        Ok(deleted)
    }

    async fn recent_durations(&self, formation_id: &str, agent_id: &str, limit: usize) -> StoreResult<Vec<i64>> {
        let rows = sqlx::query_scalar(
            "SELECT completed_at - COALESCE(started_at, created_at) FROM requests \
             WHERE formation_id = $1 AND agent_id = $2 AND status = 'completed' \
             ORDER BY completed_at DESC, id DESC LIMIT $3",
        )
        .bind(formation_id)
        .bind(agent_id)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await;
        decode("recent_durations", rows)
    }

    async fn session_turns(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT message, result_text FROM requests \
             WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 AND status = 'completed' \
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(formation_id)
        .bind(user_id)
        .bind(session_id)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await;
        let mut turns: Vec<(String, String)> =
            decode("session_turns", rows)?.into_iter().map(|(m, a)| (m, a.unwrap_or_default())).collect();
        turns.reverse();
        Ok(turns)
    }

    async fn claim_deliveries(
        &self,
        owner: &Owner,
        now: i64,
        limit: usize,
        claim_ms: i64,
    ) -> StoreResult<Vec<Delivery>> {
        let rows = sqlx::query(
            "UPDATE deliveries SET claimed_by = $1, claim_expires_at = $2 + $4 \
             WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= $2 \
             AND (claimed_by IS NULL OR claim_expires_at <= $2) ORDER BY created_at, id LIMIT $3 \
             FOR UPDATE SKIP LOCKED) RETURNING *",
        )
        .bind(owner)
        .bind(now)
        .bind(sql_limit(limit))
        .bind(claim_ms)
        .fetch_all(&self.pool)
        .await;
        let rows = self.note("claim_deliveries", rows)?;
        let mut claimed =
            decode("claim_deliveries", rows.iter().map(delivery_from_row).collect::<Result<Vec<_>, _>>())?;
        claimed.sort_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
        Ok(claimed)
    }

    async fn record_delivery(&self, id: &str, owner: &Owner, update: &DeliveryUpdate) -> StoreResult<bool> {
        let (status, error, next_attempt_at) = match update.clone() {
            DeliveryUpdate::Delivered => ("delivered", None, None),
            DeliveryUpdate::Retry { error, next_attempt_at } => ("pending", Some(error), Some(next_attempt_at)),
            DeliveryUpdate::Failed { error } => ("failed", Some(error), None),
        };
        let done = sqlx::query(
            "UPDATE deliveries SET attempts = attempts + 1, status = $2, last_error = $3, \
             next_attempt_at = COALESCE($4, next_attempt_at), claimed_by = NULL, claim_expires_at = NULL \
             WHERE id = $1 AND status = 'pending' AND claimed_by = $5",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .bind(next_attempt_at)
        .bind(owner)
        .execute(&self.pool)
        .await;
        Ok(self.note("record_delivery", done)?.rows_affected() > 0)
    }

    fn health(&self) -> StoreHealth {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn watch_cancels(&self) -> BoxStream<'static, String> {
        tokio_stream::wrappers::BroadcastStream::new(self.cancels.subscribe())
            .filter_map(|id| async move { id.ok() })
            .boxed()
    }

    async fn admin_list(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>> {
        let rows = sqlx::query(select_records!(
            "WHERE r.formation_id = $1 AND ($2::TEXT IS NULL OR r.status = $2) \
             AND ($3::TEXT IS NULL OR r.agent_id = $3) AND ($4::TEXT IS NULL OR r.user_id = $4) \
             AND ($5::BIGINT IS NULL OR r.created_at >= $5) AND ($6::BIGINT IS NULL OR r.created_at < $6) \
             ORDER BY r.created_at DESC, r.id DESC LIMIT $7"
        ))
        .bind(&query.formation_id)
        .bind(query.status.map(Status::as_str))
        .bind(&query.agent_id)
        .bind(&query.user_id)
        .bind(query.since)
        .bind(query.until)
        .bind(sql_limit(query.limit))
        .fetch_all(&self.pool)
        .await;
        records("admin_list", rows)
    }

    async fn backlog(&self, formation_id: &str) -> StoreResult<Backlog> {
        let rows = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, COUNT(*) FROM requests \
             WHERE status IN ('pending', 'processing') AND formation_id = $1 GROUP BY status",
        )
        .bind(formation_id)
        .fetch_all(&self.pool)
        .await;
        let mut backlog = Backlog::default();
        for (status, count) in decode("backlog", rows)? {
            match status.as_str() {
                "pending" => backlog.pending = count.max(0) as u64,
                _ => backlog.processing = count.max(0) as u64,
            }
        }
        Ok(backlog)
    }

    async fn outbox_stats(&self, now: i64) -> StoreResult<Option<super::OutboxStats>> {
        let row = sqlx::query_as::<_, (i64, Option<i64>)>(
            "SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await;
        let (pending, oldest) = decode("outbox_stats", row)?;
        let oldest_age_ms = oldest.map_or(0, |at| now.saturating_sub(at).max(0) as u64);
        Ok(Some(super::OutboxStats { pending: pending.max(0) as u64, oldest_age_ms }))
    }

    async fn delivery_of(&self, request_id: &str) -> StoreResult<Option<Delivery>> {
        let row = sqlx::query("SELECT * FROM deliveries WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await;
        decode("delivery_of", row.and_then(|row| row.as_ref().map(delivery_from_row).transpose()))
    }

    async fn retry_delivery(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>> {
        let done = sqlx::query(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = $2 \
             WHERE request_id = $1 AND status IN ('pending', 'failed')",
        )
        .bind(request_id)
        .bind(now)
        .execute(&self.pool)
        .await;
        self.note("retry_delivery", done)?;
        self.delivery_of(request_id).await
    }

    async fn link_rerun(&self, request_id: &str, original_id: &str) -> StoreResult<()> {
        let done = sqlx::query("INSERT INTO reruns (request_id, original_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(request_id)
            .bind(original_id)
            .execute(&self.pool)
            .await;
        self.note("link_rerun", done).map(|_| ())
    }

    async fn reruns(&self, request_id: &str) -> StoreResult<Reruns> {
        let rerun_of = sqlx::query_scalar("SELECT original_id FROM reruns WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await;
        let rerun_as =
            sqlx::query_scalar("SELECT request_id FROM reruns WHERE original_id = $1 ORDER BY request_id DESC")
                .bind(request_id)
                .fetch_all(&self.pool)
                .await;
        Ok(Reruns { rerun_of: decode("reruns", rerun_of)?, rerun_as: decode("reruns", rerun_as)? })
    }

    async fn sessions(
        &self,
        formation_id: &str,
        user_id: &str,
        active_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<SessionSummary>> {
        let rows = sqlx::query(SESSIONS_SQL)
            .bind(formation_id)
            .bind(user_id)
            .bind(None::<String>)
            .bind(sql_limit(limit))
            .bind(active_only)
            .fetch_all(&self.pool)
            .await;
        decode("sessions", rows.and_then(|rows| rows.iter().map(session_from_row).collect()))
    }

    async fn session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<SessionSummary>> {
        let row = sqlx::query(SESSIONS_SQL)
            .bind(formation_id)
            .bind(user_id)
            .bind(session_id)
            .bind(1_i64)
            .bind(false)
            .fetch_optional(&self.pool)
            .await;
        decode("session", row.and_then(|row| row.as_ref().map(session_from_row).transpose()))
    }

    async fn session_messages(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<SessionMessage>> {
        // Newest first, reversed below. Ties of one millisecond: seeds first,
        // then by request (ids are time-ordered), its question before its answer.
        let rows = sqlx::query(
            "SELECT role, content, request_id, agent_id, status, ts FROM ( \
               SELECT 'user' AS role, message AS content, id AS request_id, agent_id, status, \
                      created_at AS ts, 1 AS rank, id AS k FROM requests \
                WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 \
               UNION ALL \
               SELECT 'assistant', result_text, id, agent_id, status, completed_at, 2, id FROM requests \
                WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 AND status = 'completed' \
               UNION ALL \
               SELECT role, content, NULL, agent_id, NULL, created_at, 0, lpad(seq::TEXT, 20, '0') \
                 FROM session_messages WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 \
             ) m WHERE ts < $5 ORDER BY ts DESC, rank = 0, k COLLATE \"C\" DESC, rank DESC LIMIT $4",
        )
        .bind(formation_id)
        .bind(user_id)
        .bind(session_id)
        .bind(sql_limit(limit))
        .bind(before.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await;
        let messages = rows.and_then(|rows| {
            rows.iter()
                .map(|row| {
                    let status: Option<String> = row.try_get(4)?;
                    Ok(SessionMessage {
                        role: row.try_get(0)?,
                        content: row.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                        request_id: row.try_get(2)?,
                        agent_id: row.try_get(3)?,
                        status: status.as_deref().and_then(Status::parse),
                        timestamp: row.try_get(5)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        });
        let mut messages = decode("session_messages", messages)?;
        messages.reverse();
        Ok(messages)
    }

    async fn restore_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()> {
        let mut tx = self.begin("restore_session").await?;
        let done =
            sqlx::query("DELETE FROM session_messages WHERE formation_id = $1 AND user_id = $2 AND session_id = $3")
                .bind(formation_id)
                .bind(user_id)
                .bind(session_id)
                .execute(&mut *tx)
                .await;
        self.note("restore_session", done)?;
        for (seq, message) in messages.iter().enumerate() {
            let done = sqlx::query(
                "INSERT INTO session_messages (formation_id, user_id, session_id, seq, role, content, agent_id, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(formation_id)
            .bind(user_id)
            .bind(session_id)
            .bind(seq as i64)
            .bind(&message.role)
            .bind(&message.content)
            .bind(&message.agent_id)
            .bind(message.timestamp)
            .execute(&mut *tx)
            .await;
            self.note("restore_session", done)?;
        }
        let committed = tx.commit().await;
        self.note("restore_session", committed)
    }

    async fn lifecycle_since(
        &self,
        formation_id: &str,
        user_id: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        let rows = sqlx::query(select_records!(
            "WHERE r.formation_id = $1 AND r.user_id = $2 AND (r.created_at >= $3 OR r.completed_at >= $3) \
             ORDER BY r.created_at, r.id LIMIT $4"
        ))
        .bind(formation_id)
        .bind(user_id)
        .bind(since)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await;
        records("lifecycle_since", rows)
    }

    async fn publish_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()> {
        let (ids, revisions): (Vec<&str>, Vec<&str>) =
            copies.iter().map(|(id, rev)| (id.as_str(), rev.as_str())).unzip();
        // One transaction: the owner's rows are replaced as a whole.
        let mut tx = self.begin("publish_copies").await?;
        let done = sqlx::query("DELETE FROM formation_copies WHERE owner = $1").bind(owner).execute(&mut *tx).await;
        self.note("publish_copies", done)?;
        let done = sqlx::query(
            "INSERT INTO formation_copies (formation_id, owner, revision, seen_at) \
             SELECT id, $1, revision, $4 FROM UNNEST($2::text[], $3::text[]) AS c (id, revision) \
             ON CONFLICT (formation_id, owner) DO UPDATE SET revision = excluded.revision, seen_at = excluded.seen_at",
        )
        .bind(owner)
        .bind(&ids)
        .bind(&revisions)
        .bind(now)
        .execute(&mut *tx)
        .await;
        self.note("publish_copies", done)?;
        let committed = tx.commit().await;
        self.note("publish_copies", committed)
    }

    async fn formation_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
        let rows = sqlx::query(
            "SELECT formation_id, owner, revision, seen_at FROM formation_copies \
             WHERE seen_at >= $1 ORDER BY formation_id, owner",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await;
        let rows = decode("formation_copies", rows)?;
        let copy = |row: &PgRow| -> Result<FormationCopy, sqlx::Error> {
            Ok(FormationCopy {
                formation_id: row.try_get("formation_id")?,
                owner: row.try_get("owner")?,
                revision: row.try_get("revision")?,
                seen_at: row.try_get("seen_at")?,
            })
        };
        decode("formation_copies", rows.iter().map(copy).collect())
    }
}
