//! The SQLite store's leases: a request claimed by a runner, the leases of an
//! owner renewed, one given back, and every other owner's cleared at start-up.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::store::{Claim, Lease, Owner, StoreResult};

impl SqliteStore {
    /// `Store::claim`.
    pub(super) async fn take_lease(
        &self,
        id: &str,
        owner: &Owner,
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Option<Claim>> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.write_one("claim", move |conn| {
            conn.prepare_cached(
                "UPDATE requests SET status = 'processing', attempts = attempts + 1, \
                 started_at = COALESCE(started_at, ?2), lease_owner = ?3, lease_epoch = lease_epoch + 1, \
                 lease_expires_at = ?2 + ?4 \
                 WHERE id = ?1 AND status IN ('pending', 'processing') \
                 AND (lease_owner IS NULL OR lease_owner = ?3 OR lease_expires_at <= ?2) \
                 RETURNING attempts, lease_epoch",
            )?
            .query_row(params![id, now, owner, lease_ms], |row| {
                Ok(Claim { attempt: row.get(0)?, lease: Lease { epoch: row.get(1)? } })
            })
            .optional()
        })
        .await
    }

    /// `Store::renew_leases`.
    pub(super) async fn extend_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>> {
        let owner = owner.to_owned();
        self.write("renew_leases", move |conn| {
            conn.prepare_cached(
                "UPDATE requests SET lease_expires_at = ?2 + ?3 \
                 WHERE lease_owner = ?1 AND status IN ('pending', 'processing') RETURNING id",
            )?
            .query_map(params![owner, now, lease_ms], |row| row.get(0))?
            .collect()
        })
        .await
    }

    /// `Store::release`.
    pub(super) async fn give_back(&self, id: &str, lease: Lease) -> StoreResult<bool> {
        let id = id.to_owned();
        self.write("release", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE requests SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ?1 AND lease_epoch = ?2 AND status IN ('pending', 'processing')",
                )?
                .execute(params![id, lease.epoch])?;
            Ok(changed > 0)
        })
        .await
    }

    /// `Store::clear_others_leases`.
    pub(super) async fn clear_leases_of_others(&self, owner: &Owner) -> StoreResult<u64> {
        let owner = owner.to_owned();
        self.write("clear_others_leases", move |conn| {
            let requests = conn
                .prepare_cached(
                    "UPDATE requests SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE lease_owner IS NOT NULL AND lease_owner != ?1 AND status IN ('pending', 'processing')",
                )?
                .execute([&owner])?;
            conn.prepare_cached(
                "UPDATE deliveries SET claimed_by = NULL, claim_expires_at = NULL \
                 WHERE claimed_by IS NOT NULL AND claimed_by != ?1 AND status = 'pending'",
            )?
            .execute([&owner])?;
            Ok(requests as u64)
        })
        .await
    }
}
