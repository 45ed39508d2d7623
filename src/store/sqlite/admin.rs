//! The SQLite store's answers to the admin console: every user's requests, the
//! backlog, and the links between a request and its re-runs.

use rusqlite::{params, OptionalExtension};

use super::rows::{record_from_row, sql_limit, status_column};
use super::SqliteStore;
use crate::store::{AdminQuery, Backlog, RequestRecord, Reruns, Status, StoreResult};

impl SqliteStore {
    /// `Store::admin_list`.
    pub(super) async fn list_for_admin(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>> {
        let query = query.clone();
        self.read("admin_list", move |conn| {
            conn.prepare_cached(select_stored_records!(
                "WHERE r.formation_id = ?1 AND (?2 IS NULL OR r.status = ?2) \
                 AND (?3 IS NULL OR r.agent_id = ?3) AND (?4 IS NULL OR r.user_id = ?4) \
                 AND (?5 IS NULL OR r.created_at >= ?5) AND (?6 IS NULL OR r.created_at < ?6) \
                 ORDER BY r.created_at DESC, r.id DESC LIMIT ?7"
            ))?
            .query_map(
                params![
                    query.formation_id,
                    query.status.map(Status::as_str),
                    query.agent_id,
                    query.user_id,
                    query.since,
                    query.until,
                    sql_limit(query.limit)
                ],
                record_from_row,
            )?
            .collect()
        })
        .await
    }

    /// `Store::backlog`.
    pub(super) async fn count_backlog(&self, formation_id: &str) -> StoreResult<Backlog> {
        let formation_id = formation_id.to_owned();
        self.read("backlog", move |conn| {
            let mut backlog = Backlog::default();
            let mut statement = conn.prepare_cached(
                "SELECT status, COUNT(*) FROM requests \
                 WHERE status IN ('pending', 'processing') AND formation_id = ?1 GROUP BY status",
            )?;
            let mut rows = statement.query([formation_id])?;
            while let Some(row) = rows.next()? {
                let count: i64 = row.get(1)?;
                match status_column(row, 0)? {
                    Status::Pending => backlog.pending = count as u64,
                    _ => backlog.processing = count as u64,
                }
            }
            Ok(backlog)
        })
        .await
    }

    /// `Store::link_rerun`.
    pub(super) async fn save_rerun_link(&self, request_id: &str, original_id: &str) -> StoreResult<()> {
        let (request_id, original_id) = (request_id.to_owned(), original_id.to_owned());
        self.write("link_rerun", move |conn| {
            conn.prepare_cached("INSERT OR IGNORE INTO reruns (request_id, original_id) VALUES (?1, ?2)")?
                .execute(params![request_id, original_id])?;
            Ok(())
        })
        .await
    }

    /// `Store::reruns`.
    pub(super) async fn find_reruns(&self, request_id: &str) -> StoreResult<Reruns> {
        let request_id = request_id.to_owned();
        self.read("reruns", move |conn| {
            let rerun_of = conn
                .prepare_cached("SELECT original_id FROM reruns WHERE request_id = ?1")?
                .query_row([&request_id], |row| row.get(0))
                .optional()?;
            let rerun_as = conn
                .prepare_cached("SELECT request_id FROM reruns WHERE original_id = ?1 ORDER BY request_id DESC")?
                .query_map([&request_id], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Reruns { rerun_of, rerun_as })
        })
        .await
    }
}
