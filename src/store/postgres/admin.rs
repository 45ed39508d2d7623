//! The PostgreSQL store's answers to the admin console: every user's requests, the
//! backlog, and the links between a request and its re-runs.

use super::rows::{decode, records, sql_limit};
use super::PgStore;
use crate::store::{AdminQuery, Backlog, RequestRecord, Reruns, Status, StoreResult};

impl PgStore {
    /// `Store::admin_list`.
    pub(super) async fn list_for_admin(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>> {
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

    /// `Store::backlog`.
    pub(super) async fn count_backlog(&self, formation_id: &str) -> StoreResult<Backlog> {
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

    /// `Store::link_rerun`.
    pub(super) async fn save_rerun_link(&self, request_id: &str, original_id: &str) -> StoreResult<()> {
        let done = sqlx::query("INSERT INTO reruns (request_id, original_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(request_id)
            .bind(original_id)
            .execute(&self.pool)
            .await;
        self.note("link_rerun", done).map(|_| ())
    }

    /// `Store::reruns`.
    pub(super) async fn find_reruns(&self, request_id: &str) -> StoreResult<Reruns> {
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
}
