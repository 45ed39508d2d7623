//! The PostgreSQL store's leases: a request claimed by a runner, the leases of an
//! owner renewed, one given back, and every other owner's cleared at start-up.

use sqlx::Row;

use super::rows::{decode, u32_of};
use super::PgStore;
use crate::store::{Claim, Lease, Owner, StoreResult};

impl PgStore {
    /// `Store::claim`.
    pub(super) async fn take_lease(
        &self,
        id: &str,
        owner: &Owner,
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Option<Claim>> {
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

    /// `Store::renew_leases`.
    pub(super) async fn extend_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>> {
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

    /// `Store::release`.
    pub(super) async fn give_back(&self, id: &str, lease: Lease) -> StoreResult<bool> {
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

    /// `Store::clear_others_leases`.
    pub(super) async fn clear_leases_of_others(&self, owner: &Owner) -> StoreResult<u64> {
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
}
