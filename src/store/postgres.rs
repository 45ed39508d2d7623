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
//!
//! Rows are decoded in [`rows`]; [`connection`] tells the database's failures
//! from a request's and listens for cancels. The trait's methods are here but
//! for those of [`leases`], [`deliveries`] (the webhook outbox), [`admin`],
//! [`sessions`] and [`copies`].

mod admin;
mod batch;
mod connection;
mod copies;
mod deliveries;
mod leases;
mod rows;
mod schema;
mod sessions;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::broadcast;

use connection::{listen, note_on, redact};
use rows::{decode, record_from_row, records, sql_limit, to_json};

use super::{
    AdminQuery, Among, Backlog, Claim, Delivery, DeliveryUpdate, FormationCopy, Inserted, Lease, ListQuery, Mode,
    NewDelivery, NewRequest, NewSessionMessage, Outcome, Owner, Progress, RequestRecord, Reruns, SessionMessage,
    SessionSummary, Status, Store, StoreError, StoreHealth, StoreResult,
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

    fn watch_cancels(&self) -> BoxStream<'static, String> {
        tokio_stream::wrappers::BroadcastStream::new(self.cancels.subscribe())
            .filter_map(|id| async move { id.ok() })
            .boxed()
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
        self.replace_copies(owner, copies, now).await
    }

    async fn formation_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
        self.list_copies(since).await
    }
}
