//! The PostgreSQL store's sessions: listed and read from their requests and seeded
//! messages, reseeded by a restore, and their past turns (an agent's history).

use sqlx::Row;

use super::rows::{decode, session_from_row, sql_limit};
use super::PgStore;
use crate::store::{NewSessionMessage, SessionMessage, SessionSummary, Status, StoreResult};

/// A user's sessions (`$3` NULL: all, else the one named), from their requests
/// and seeded messages; `$5`: only those with active requests; `LIMIT $4`.
const SESSIONS_SQL: &str = "SELECT * FROM ( \
     SELECT session_id, MIN(first) AS created_at, MAX(last) AS last_activity, \
     SUM(messages)::BIGINT AS message_count, SUM(requests)::BIGINT AS request_count, \
     SUM(active)::BIGINT AS active_requests FROM ( \
       SELECT session_id, created_at AS first, GREATEST(created_at, COALESCE(completed_at, created_at)) AS last, \
              1 + (status = 'completed')::INT AS messages, 1 AS requests, \
              (status IN ('pending', 'processing'))::INT AS active FROM requests \
        WHERE formation_id = $1 AND user_id = $2 AND session_id IS NOT NULL \
          AND ($3::TEXT IS NULL OR session_id = $3) \
       UNION ALL \
       SELECT session_id, created_at, created_at, 1, 0, 0 FROM session_messages \
        WHERE formation_id = $1 AND user_id = $2 AND ($3::TEXT IS NULL OR session_id = $3) \
     ) parts GROUP BY session_id \
   ) s WHERE (NOT $5 OR active_requests > 0) ORDER BY last_activity DESC, session_id DESC LIMIT $4";

impl PgStore {
    /// `Store::sessions`.
    pub(super) async fn list_sessions(
        &self,
        formation_id: &str,
        user_id: &str,
        active_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<SessionSummary>> {
        let rows = sqlx::query(SESSIONS_SQL)
            .bind(formation_id)
            .bind(user_id)
            .bind(None::<String>)
            .bind(sql_limit(limit))
            .bind(active_only)
            .fetch_all(&self.pool)
            .await;
        decode("sessions", rows.and_then(|rows| rows.iter().map(session_from_row).collect()))
    }

    /// `Store::session`.
    pub(super) async fn find_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<SessionSummary>> {
        let row = sqlx::query(SESSIONS_SQL)
            .bind(formation_id)
            .bind(user_id)
            .bind(session_id)
            .bind(1_i64)
            .bind(false)
            .fetch_optional(&self.pool)
            .await;
        decode("session", row.and_then(|row| row.as_ref().map(session_from_row).transpose()))
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
        // Newest first, reversed below. Ties of one millisecond: seeds first,
        // then by request (ids are time-ordered), its question before its answer.
        let rows = sqlx::query(
            "SELECT role, content, request_id, agent_id, status, ts FROM ( \
               SELECT 'user' AS role, message AS content, id AS request_id, agent_id, status, \
                      created_at AS ts, 1 AS rank, id AS k FROM requests \
                WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 \
               UNION ALL \
               SELECT 'assistant', result_text, id, agent_id, status, completed_at, 2, id FROM requests \
                WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 AND status = 'completed' \
               UNION ALL \
               SELECT role, content, NULL, agent_id, NULL, created_at, 0, lpad(seq::TEXT, 20, '0') \
                 FROM session_messages WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 \
             ) m WHERE ts < $5 ORDER BY ts DESC, rank = 0, k COLLATE \"C\" DESC, rank DESC LIMIT $4",
        )
        .bind(formation_id)
        .bind(user_id)
        .bind(session_id)
        .bind(sql_limit(limit))
        .bind(before.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await;
        let messages = rows.and_then(|rows| {
            rows.iter()
                .map(|row| {
                    let status: Option<String> = row.try_get(4)?;
                    Ok(SessionMessage {
                        role: row.try_get(0)?,
                        content: row.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                        request_id: row.try_get(2)?,
                        agent_id: row.try_get(3)?,
                        status: status.as_deref().and_then(Status::parse),
                        timestamp: row.try_get(5)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        });
        let mut messages = decode("session_messages", messages)?;
        messages.reverse();
        Ok(messages)
    }

    /// `Store::restore_session`.
    pub(super) async fn reseed_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()> {
        let mut tx = self.begin("restore_session").await?;
        let done =
            sqlx::query("DELETE FROM session_messages WHERE formation_id = $1 AND user_id = $2 AND session_id = $3")
                .bind(formation_id)
                .bind(user_id)
                .bind(session_id)
                .execute(&mut *tx)
                .await;
        self.note("restore_session", done)?;
        for (seq, message) in messages.iter().enumerate() {
            let done = sqlx::query(
                "INSERT INTO session_messages (formation_id, user_id, session_id, seq, role, content, agent_id, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(formation_id)
            .bind(user_id)
            .bind(session_id)
            .bind(seq as i64)
            .bind(&message.role)
            .bind(&message.content)
            .bind(&message.agent_id)
            .bind(message.timestamp)
            .execute(&mut *tx)
            .await;
            self.note("restore_session", done)?;
        }
        let committed = tx.commit().await;
        self.note("restore_session", committed)
    }

    /// `Store::session_turns`.
    pub(super) async fn past_turns(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT message, result_text FROM requests \
             WHERE formation_id = $1 AND user_id = $2 AND session_id = $3 AND status = 'completed' \
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(formation_id)
        .bind(user_id)
        .bind(session_id)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await;
        let mut turns: Vec<(String, String)> =
            decode("session_turns", rows)?.into_iter().map(|(m, a)| (m, a.unwrap_or_default())).collect();
        turns.reverse();
        Ok(turns)
    }
}
