//! The PostgreSQL store's webhook outbox: deliveries claimed, their attempts recorded,
//! one looked up or made due again, and the outbox measured.

use super::rows::{decode, delivery_from_row, sql_limit};
use super::PgStore;
use crate::store::{Delivery, DeliveryUpdate, OutboxStats, Owner, Store, StoreResult};

impl PgStore {
    /// `Store::claim_deliveries`.
    pub(super) async fn claim_due_deliveries(
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

    /// `Store::record_delivery`.
    pub(super) async fn record_delivery_attempt(
        &self,
        id: &str,
        owner: &Owner,
        update: &DeliveryUpdate,
    ) -> StoreResult<bool> {
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

    /// `Store::outbox_stats`.
    pub(super) async fn measure_outbox(&self, now: i64) -> StoreResult<Option<OutboxStats>> {
        let row = sqlx::query_as::<_, (i64, Option<i64>)>(
            "SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await;
        let (pending, oldest) = decode("outbox_stats", row)?;
        let oldest_age_ms = oldest.map_or(0, |at| now.saturating_sub(at).max(0) as u64);
        Ok(Some(OutboxStats { pending: pending.max(0) as u64, oldest_age_ms }))
    }

    /// `Store::delivery_of`.
    pub(super) async fn find_delivery(&self, request_id: &str) -> StoreResult<Option<Delivery>> {
        let row = sqlx::query("SELECT * FROM deliveries WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await;
        decode("delivery_of", row.and_then(|row| row.as_ref().map(delivery_from_row).transpose()))
    }

    /// `Store::retry_delivery`.
    pub(super) async fn make_delivery_due(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>> {
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
}
