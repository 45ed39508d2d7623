//! The SQLite store's formation copies: the revision of each formation every
//! server has loaded, as it last published it.

use rusqlite::params;

use super::SqliteStore;
use crate::store::{FormationCopy, Owner, StoreResult};

impl SqliteStore {
    /// `Store::publish_copies`.
    pub(super) async fn replace_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()> {
        let (owner, copies) = (owner.to_owned(), copies.to_vec());
        self.write("publish_copies", move |conn| {
            // One savepoint: the owner's rows are replaced as a whole.
            conn.prepare_cached("DELETE FROM formation_copies WHERE owner = ?1")?.execute(params![owner])?;
            let mut insert = conn.prepare_cached(
                "INSERT OR REPLACE INTO formation_copies (formation_id, owner, revision, seen_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (formation_id, revision) in &copies {
                insert.execute(params![formation_id, owner, revision, now])?;
            }
            Ok(())
        })
        .await
    }

    /// `Store::formation_copies`.
    pub(super) async fn list_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
        self.read("formation_copies", move |conn| {
            conn.prepare_cached(
                "SELECT formation_id, owner, revision, seen_at FROM formation_copies \
                 WHERE seen_at >= ?1 ORDER BY formation_id, owner",
            )?
            .query_map(params![since], |row| {
                Ok(FormationCopy {
                    formation_id: row.get(0)?,
                    owner: row.get(1)?,
                    revision: row.get(2)?,
                    seen_at: row.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }
}
