//! The PostgreSQL store's formation copies: the revision of each formation every
//! replica has loaded, as it last published it.

use sqlx::postgres::PgRow;
use sqlx::Row;

use super::rows::decode;
use super::PgStore;
use crate::store::{FormationCopy, Owner, StoreResult};

impl PgStore {
    /// `Store::publish_copies`.
    pub(super) async fn replace_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()> {
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

    /// `Store::formation_copies`.
    pub(super) async fn list_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>> {
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
