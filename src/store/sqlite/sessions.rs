//! The SQLite store's sessions: listed and read from their requests and seeded
//! messages, reseeded by a restore, and their past turns (an agent's history).

use rusqlite::{params, OptionalExtension};

use super::rows::{session_from_row, sql_limit};
use super::SqliteStore;
use crate::store::{NewSessionMessage, SessionMessage, SessionSummary, Status, StoreResult};

/// A user's sessions (`?3` NULL: all, else the one named), as `session_from_row` reads
/// them: from their requests and seeded messages. Callers add `HAVING` (on `?5`)
/// and `LIMIT ?4`.
const SESSIONS_SQL: &str = "SELECT session_id, MIN(first) AS created_at, MAX(last) AS last_activity, \
     SUM(messages) AS message_count, SUM(requests) AS request_count, SUM(active) AS active_requests FROM ( \
       SELECT session_id, created_at AS first, MAX(created_at, COALESCE(completed_at, created_at)) AS last, \
              1 + (status = 'completed') AS messages, 1 AS requests, \
              status IN ('pending', 'processing') AS active FROM requests \
        WHERE formation_id = ?1 AND user_id = ?2 AND session_id IS NOT NULL \
          AND (?3 IS NULL OR session_id = ?3) \
       UNION ALL \
       SELECT session_id, created_at, created_at, 1, 0, 0 FROM session_messages \
        WHERE formation_id = ?1 AND user_id = ?2 AND (?3 IS NULL OR session_id = ?3) \
     ) GROUP BY session_id";

impl SqliteStore {
    /// `Store::sessions`.
    pub(super) async fn list_sessions(
        &self,
        formation_id: &str,
        user_id: &str,
        active_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<SessionSummary>> {
        let (formation_id, user_id) = (formation_id.to_owned(), user_id.to_owned());
        self.read("sessions", move |conn| {
            conn.prepare_cached(&format!(
                "{SESSIONS_SQL} HAVING NOT ?5 OR active_requests > 0 \
                 ORDER BY last_activity DESC, session_id DESC LIMIT ?4"
            ))?
            .query_map(params![formation_id, user_id, None::<String>, sql_limit(limit), active_only], session_from_row)?
            .collect()
        })
        .await
    }

    /// `Store::session`.
    pub(super) async fn find_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<SessionSummary>> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        self.read("session", move |conn| {
            conn.prepare_cached(&format!("{SESSIONS_SQL} HAVING NOT ?5 LIMIT ?4"))?
                .query_row(params![formation_id, user_id, session_id, 1, false], session_from_row)
                .optional()
        })
        .await
    }

    /// `Store::session_messages`.
    pub(super) async fn list_session_messages(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<SessionMessage>> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        let before = before.unwrap_or(i64::MAX);
        self.read("session_messages", move |conn| {
            // Newest first, reversed below. Ties of one millisecond: seeds first,
            // then by request (ids are time-ordered), its question before its answer.
            let mut messages = conn
                .prepare_cached(concat!(
                    "SELECT role, content, request_id, agent_id, status, ts FROM ( \
                       SELECT 'user' AS role, ",
                    stored_message!(),
                    " AS content, id AS request_id, agent_id, status, \
                              created_at AS ts, 1 AS rank, id AS k FROM requests r \
                        WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 \
                       UNION ALL \
                       SELECT 'assistant', result_text, id, agent_id, status, completed_at, 2, id FROM requests \
                        WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 AND status = 'completed' \
                       UNION ALL \
                       SELECT role, content, NULL, agent_id, NULL, created_at, 0, printf('%020d', seq) \
                         FROM session_messages WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 \
                     ) WHERE ts < ?5 ORDER BY ts DESC, rank = 0, k DESC, rank DESC LIMIT ?4"
                ))?
                .query_map(params![formation_id, user_id, session_id, sql_limit(limit), before], |row| {
                    let status: Option<String> = row.get(4)?;
                    Ok(SessionMessage {
                        role: row.get(0)?,
                        content: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        request_id: row.get(2)?,
                        agent_id: row.get(3)?,
                        status: status.as_deref().and_then(Status::parse),
                        timestamp: row.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<SessionMessage>>>()?;
            messages.reverse();
            Ok(messages)
        })
        .await
    }

    /// `Store::restore_session`.
    pub(super) async fn reseed_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        self.write("restore_session", move |conn| {
            conn.prepare_cached(
                "DELETE FROM session_messages WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3",
            )?
            .execute(params![formation_id, user_id, session_id])?;
            let mut insert = conn.prepare_cached(
                "INSERT INTO session_messages (formation_id, user_id, session_id, seq, role, content, agent_id, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (seq, message) in messages.iter().enumerate() {
                insert.execute(params![
                    formation_id,
                    user_id,
                    session_id,
                    seq as i64,
                    message.role,
                    message.content,
                    message.agent_id,
                    message.timestamp
                ])?;
            }
            Ok(())
        })
        .await
    }

    /// `Store::session_turns`.
    pub(super) async fn past_turns(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, String)>> {
        let (formation_id, user_id, session_id) = (formation_id.to_owned(), user_id.to_owned(), session_id.to_owned());
        self.read("session_turns", move |conn| {
            // The latest `limit` turns, newest first; reversed below.
            let mut turns = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    stored_message!(),
                    " AS message, result_text FROM requests r \
                     WHERE formation_id = ?1 AND user_id = ?2 AND session_id = ?3 \
                     AND status = 'completed' \
                     ORDER BY created_at DESC, id DESC LIMIT ?4"
                ))?
                .query_map(params![formation_id, user_id, session_id, sql_limit(limit)], |row| {
                    Ok((row.get(0)?, row.get::<_, Option<String>>(1)?.unwrap_or_default()))
                })?
                .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
            turns.reverse();
            Ok(turns)
        })
        .await
    }
}
