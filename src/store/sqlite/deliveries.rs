//! The SQLite store's webhook outbox: deliveries claimed, their attempts recorded,
//! one looked up or made due again, and the outbox measured.

use rusqlite::{params, OptionalExtension};

use super::rows::{delivery_from_row, sql_limit};
use super::SqliteStore;
use crate::store::{Delivery, DeliveryUpdate, OutboxStats, Owner, StoreResult};

impl SqliteStore {
    /// `Store::claim_deliveries`.
    pub(super) async fn claim_due_deliveries(
        &self,
        owner: &Owner,
        now: i64,
        limit: usize,
        claim_ms: i64,
    ) -> StoreResult<Vec<Delivery>> {
        // Most polls find nothing due: a read answers them without a write.
        let any_due = self
            .read("claim_deliveries", move |conn| {
                conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?1 \
                     AND (claimed_by IS NULL OR claim_expires_at <= ?1))",
                )?
                .query_row([now], |row| row.get::<_, bool>(0))
            })
            .await?;
        if !any_due {
            return Ok(Vec::new());
        }
        let owner = owner.to_owned();
        self.write("claim_deliveries", move |conn| {
            let mut claimed: Vec<Delivery> = conn
                .prepare_cached(
                    "UPDATE deliveries SET claimed_by = ?1, claim_expires_at = ?2 + ?4 \
                     WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?2 \
                     AND (claimed_by IS NULL OR claim_expires_at <= ?2) ORDER BY created_at, id LIMIT ?3) \
                     RETURNING *",
                )?
                .query_map(params![owner, now, sql_limit(limit), claim_ms], delivery_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            claimed.sort_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
            Ok(claimed)
        })
        .await
    }

    /// `Store::record_delivery`.
    pub(super) async fn record_delivery_attempt(
        &self,
        id: &str,
        owner: &Owner,
        update: &DeliveryUpdate,
    ) -> StoreResult<bool> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        let (status, error, next_attempt_at) = match update.clone() {
            DeliveryUpdate::Delivered => ("delivered", None, None),
            DeliveryUpdate::Retry { error, next_attempt_at } => ("pending", Some(error), Some(next_attempt_at)),
            DeliveryUpdate::Failed { error } => ("failed", Some(error), None),
        };
        self.write("record_delivery", move |conn| {
            // Only a pending delivery this owner holds moves: delivered and failed are final.
            let changed = conn
                .prepare_cached(
                    "UPDATE deliveries SET attempts = attempts + 1, status = ?2, last_error = ?3, \
                     next_attempt_at = COALESCE(?4, next_attempt_at), claimed_by = NULL, claim_expires_at = NULL \
                     WHERE id = ?1 AND status = 'pending' AND claimed_by = ?5",
                )?
                .execute(params![id, status, error, next_attempt_at, owner])?;
            Ok(changed > 0)
        })
        .await
    }

    /// `Store::outbox_stats`.
    pub(super) async fn measure_outbox(&self, now: i64) -> StoreResult<Option<OutboxStats>> {
        self.read("outbox_stats", move |conn| {
            let (pending, oldest): (i64, Option<i64>) = conn
                .prepare_cached("SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status = 'pending'")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let oldest_age_ms = oldest.map_or(0, |at| now.saturating_sub(at).max(0) as u64);
            Ok(Some(OutboxStats { pending: pending.max(0) as u64, oldest_age_ms }))
        })
        .await
    }

    /// `Store::delivery_of`.
    pub(super) async fn find_delivery(&self, request_id: &str) -> StoreResult<Option<Delivery>> {
        let request_id = request_id.to_owned();
        self.read("delivery_of", move |conn| {
            conn.prepare_cached("SELECT * FROM deliveries WHERE request_id = ?1")?
                .query_row([request_id], delivery_from_row)
                .optional()
        })
        .await
    }

    /// `Store::retry_delivery`.
    pub(super) async fn make_delivery_due(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>> {
        let request_id = request_id.to_owned();
        self.write("retry_delivery", move |conn| {
            conn.prepare_cached(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = ?2 \
                 WHERE request_id = ?1 AND status IN ('pending', 'failed')",
            )?
            .execute(params![request_id, now])?;
            conn.prepare_cached("SELECT * FROM deliveries WHERE request_id = ?1")?
                .query_row([request_id], delivery_from_row)
                .optional()
        })
        .await
    }
}
