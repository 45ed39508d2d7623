//! Rows as the PostgreSQL store reads them: records, deliveries and session summaries
//! decoded by column name, and the few values it encodes.

use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::store::{
    Delivery, ErrorInfo, Mode, RequestRecord, RequestResult, SessionSummary, Status, StoreError, StoreResult,
    WebhookState,
};

pub(super) fn decode<T>(name: &str, result: Result<T, sqlx::Error>) -> StoreResult<T> {
    result.map_err(|e| StoreError(format!("{name}: {e}")))
}

pub(super) fn u32_of(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

fn json_column<T: DeserializeOwned>(row: &PgRow, column: &str) -> Result<Option<T>, sqlx::Error> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|text| {
        serde_json::from_str(&text).map_err(|e| sqlx::Error::ColumnDecode { index: column.into(), source: Box::new(e) })
    })
    .transpose()
}

fn bad_value(column: &str, value: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: column.into(), source: format!("unknown value {value:?}").into() }
}

pub(super) fn record_from_row(row: &PgRow) -> Result<RequestRecord, sqlx::Error> {
    let result = match row.try_get::<Option<String>, _>("result_text")? {
        Some(text) => Some(RequestResult { text, artifacts: json_column(row, "artifacts")?.unwrap_or_default() }),
        None => None,
    };
    let webhook = match row.try_get::<Option<String>, _>("webhook_status")? {
        Some(status) => Some(WebhookState {
            status,
            attempts: u32_of(row.try_get("webhook_attempts")?),
            last_error: row.try_get("webhook_last_error")?,
        }),
        None => None,
    };
    let status: String = row.try_get("status")?;
    let mode: String = row.try_get("mode")?;
    Ok(RequestRecord {
        id: row.try_get("id")?,
        formation_id: row.try_get("formation_id")?,
        formation_version: row.try_get("formation_version")?,
        user_id: row.try_get("user_id")?,
        session_id: row.try_get("session_id")?,
        agent_id: row.try_get("agent_id")?,
        message: row.try_get("message")?,
        mode: Mode::parse(&mode).ok_or_else(|| bad_value("mode", mode.clone()))?,
        answered_async: row.try_get("answered_async")?,
        estimated_seconds: row.try_get("estimated_seconds")?,
        idempotency_key: row.try_get("idempotency_key")?,
        webhook_url: row.try_get("webhook_url")?,
        workflow_timeout_ms: row.try_get("workflow_timeout_ms")?,
        status: Status::parse(&status).ok_or_else(|| bad_value("status", status.clone()))?,
        progress: row.try_get("progress")?,
        current_step: row.try_get("current_step")?,
        total_steps: row.try_get::<Option<i64>, _>("total_steps")?.map(u32_of),
        completed_steps: row.try_get::<Option<i64>, _>("completed_steps")?.map(u32_of),
        status_message: row.try_get("status_message")?,
        result,
        error: json_column::<ErrorInfo>(row, "error")?,
        attempts: u32_of(row.try_get("attempts")?),
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        webhook,
    })
}

pub(super) fn delivery_from_row(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: row.try_get("id")?,
        request_id: row.try_get("request_id")?,
        formation_id: row.try_get("formation_id")?,
        url: row.try_get("url")?,
        attempts: u32_of(row.try_get("attempts")?),
        next_attempt_at: row.try_get("next_attempt_at")?,
        status: row.try_get("status")?,
        last_error: row.try_get("last_error")?,
    })
}

pub(super) fn session_from_row(row: &PgRow) -> Result<SessionSummary, sqlx::Error> {
    Ok(SessionSummary {
        session_id: row.try_get("session_id")?,
        created_at: row.try_get("created_at")?,
        last_activity: row.try_get("last_activity")?,
        message_count: row.try_get::<i64, _>("message_count")?.max(0) as u64,
        request_count: row.try_get::<i64, _>("request_count")?.max(0) as u64,
        active_requests: row.try_get::<i64, _>("active_requests")?.max(0) as u64,
    })
}

pub(super) fn records(name: &str, rows: Result<Vec<PgRow>, sqlx::Error>) -> StoreResult<Vec<RequestRecord>> {
    decode(name, rows.and_then(|rows| rows.iter().map(record_from_row).collect()))
}

pub(super) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(super) fn to_json(name: &str, value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("{name}: cannot encode JSON: {e}")))
}
