//! Rows as the SQLite store reads them: records, deliveries and session summaries
//! decoded by column, and the few values it encodes.

use rusqlite::types::Type;
use rusqlite::{OptionalExtension, Row, Statement};
use serde::de::DeserializeOwned;

use super::in_place::Columns;

use crate::store::{
    Delivery, ErrorInfo, Mode, RequestRecord, RequestResult, RequestState, SessionSummary, ShowState, Status,
    StoreError, StoreResult, WebhookState,
};

fn conversion_error(column: usize, err: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(err))
}

/// A row the decoders below read: rusqlite's `Row`, or a status poll's row
/// read in place ([`Columns`]).
pub(super) trait Cells {
    /// The column's text, borrowed from the row, or `None` for NULL.
    fn opt_text(&self, column: usize) -> rusqlite::Result<Option<&str>>;
}

impl Cells for Row<'_> {
    fn opt_text(&self, column: usize) -> rusqlite::Result<Option<&str>> {
        self.get_ref(column)?.as_str_or_null().map_err(|e| conversion_error(column, e))
    }
}

impl Cells for Columns<'_> {
    fn opt_text(&self, column: usize) -> rusqlite::Result<Option<&str>> {
        Columns::opt_text(self, column)
    }
}

/// A NULL where a column may not hold one.
fn unexpected_null(column: usize) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(column, String::new(), Type::Null)
}

fn json_column<T: DeserializeOwned>(row: &impl Cells, column: usize) -> rusqlite::Result<Option<T>> {
    let text = row.opt_text(column)?;
    text.map(|text| serde_json::from_str(text).map_err(|e| conversion_error(column, e))).transpose()
}

/// A stored status or mode this build does not know (the column names which).
#[derive(Debug, thiserror::Error)]
#[error("unknown {0} {1:?}")]
struct UnknownValue(&'static str, String);

/// The column's text, borrowed from the row (a status or a mode is parsed,
/// not kept, so it need not be copied into a `String` first).
fn text_column(row: &impl Cells, column: usize) -> rusqlite::Result<&str> {
    row.opt_text(column)?.ok_or_else(|| unexpected_null(column))
}

pub(super) fn status_column(row: &impl Cells, column: usize) -> rusqlite::Result<Status> {
    let text = text_column(row, column)?;
    Status::parse(text).ok_or_else(|| conversion_error(column, UnknownValue("status", text.to_owned())))
}

fn mode_column(row: &impl Cells, column: usize) -> rusqlite::Result<Mode> {
    let text = text_column(row, column)?;
    Mode::parse(text).ok_or_else(|| conversion_error(column, UnknownValue("mode", text.to_owned())))
}

/// The positions of [`select_stored_records!`]'s columns: read by position, a row
/// costs no name lookups (each is a scan of the column names).
pub(super) mod col {
    pub const ID: usize = 0;
    pub const FORMATION_ID: usize = 1;
    pub const FORMATION_VERSION: usize = 2;
    pub const USER_ID: usize = 3;
    pub const SESSION_ID: usize = 4;
    pub const AGENT_ID: usize = 5;
    pub const MESSAGE: usize = 6;
    pub const MODE: usize = 7;
    pub const ANSWERED_ASYNC: usize = 8;
    pub const ESTIMATED_SECONDS: usize = 9;
    pub const IDEMPOTENCY_KEY: usize = 10;
    pub const WEBHOOK_URL: usize = 11;
    pub const WORKFLOW_TIMEOUT_MS: usize = 12;
    pub const STATUS: usize = 13;
    pub const PROGRESS: usize = 14;
    pub const CURRENT_STEP: usize = 15;
    pub const TOTAL_STEPS: usize = 16;
    pub const COMPLETED_STEPS: usize = 17;
    pub const STATUS_MESSAGE: usize = 18;
    pub const RESULT_TEXT: usize = 19;
    pub const ARTIFACTS: usize = 20;
    pub const ERROR: usize = 21;
    pub const ATTEMPTS: usize = 22;
    pub const CREATED_AT: usize = 23;
    pub const STARTED_AT: usize = 24;
    pub const COMPLETED_AT: usize = 25;
    pub const FINGERPRINT: usize = 26;
    pub const WEBHOOK_STATUS: usize = 27;
    pub const WEBHOOK_ATTEMPTS: usize = 28;
    pub const WEBHOOK_LAST_ERROR: usize = 29;
}

/// A request's result, from its text and artifacts columns (none while the text is NULL).
fn result_columns(row: &impl Cells, text: usize, artifacts: usize) -> rusqlite::Result<Option<RequestResult>> {
    match row.opt_text(text)? {
        Some(text) => Ok(Some(RequestResult {
            text: text.to_owned(),
            artifacts: json_column(row, artifacts)?.unwrap_or_default(),
        })),
        None => Ok(None),
    }
}

/// A row of [`select_stored_records!`].
pub(super) fn record_from_row(row: &Row) -> rusqlite::Result<RequestRecord> {
    let result = result_columns(row, col::RESULT_TEXT, col::ARTIFACTS)?;
    let webhook = match row.get::<_, Option<String>>(col::WEBHOOK_STATUS)? {
        Some(status) => Some(WebhookState {
            status,
            attempts: row.get(col::WEBHOOK_ATTEMPTS)?,
            last_error: row.get(col::WEBHOOK_LAST_ERROR)?,
        }),
        None => None,
    };
    Ok(RequestRecord {
        id: row.get(col::ID)?,
        formation_id: row.get(col::FORMATION_ID)?,
        formation_version: row.get(col::FORMATION_VERSION)?,
        user_id: row.get(col::USER_ID)?,
        session_id: row.get(col::SESSION_ID)?,
        agent_id: row.get(col::AGENT_ID)?,
        message: row.get(col::MESSAGE)?,
        mode: mode_column(row, col::MODE)?,
        answered_async: row.get(col::ANSWERED_ASYNC)?,
        estimated_seconds: row.get(col::ESTIMATED_SECONDS)?,
        idempotency_key: row.get(col::IDEMPOTENCY_KEY)?,
        webhook_url: row.get(col::WEBHOOK_URL)?,
        workflow_timeout_ms: row.get(col::WORKFLOW_TIMEOUT_MS)?,
        status: status_column(row, col::STATUS)?,
        progress: row.get(col::PROGRESS)?,
        current_step: row.get(col::CURRENT_STEP)?,
        total_steps: row.get(col::TOTAL_STEPS)?,
        completed_steps: row.get(col::COMPLETED_STEPS)?,
        status_message: row.get(col::STATUS_MESSAGE)?,
        result,
        error: json_column::<ErrorInfo>(row, col::ERROR)?,
        attempts: row.get(col::ATTEMPTS)?,
        created_at: row.get(col::CREATED_AT)?,
        started_at: row.get(col::STARTED_AT)?,
        completed_at: row.get(col::COMPLETED_AT)?,
        webhook,
    })
}

/// A request's state by id, for [`state_from_row`]: only the columns a status
/// poll shows (no id, which the caller has; no message), in the order of
/// [`state_col`]. Its delivery is read only for an ended request, with
/// [`DELIVERY_STATE_BY_ID`]: a poll of a queued request opens no cursor on
/// the deliveries.
pub(super) const STATE_BY_ID: &str = "SELECT formation_id, formation_version, user_id, session_id, agent_id, \
     mode, estimated_seconds, status, progress, current_step, total_steps, completed_steps, status_message, \
     result_text, artifacts, error, attempts, created_at, started_at, completed_at \
     FROM requests WHERE id = ?1";

/// The state of an ended request's webhook delivery, if it has one.
pub(super) const DELIVERY_STATE_BY_ID: &str =
    "SELECT status, attempts, last_error FROM deliveries WHERE request_id = ?1";

/// The positions of [`STATE_BY_ID`]'s columns.
mod state_col {
    pub const FORMATION_ID: usize = 0;
    pub const FORMATION_VERSION: usize = 1;
    pub const USER_ID: usize = 2;
    pub const SESSION_ID: usize = 3;
    pub const AGENT_ID: usize = 4;
    pub const MODE: usize = 5;
    pub const ESTIMATED_SECONDS: usize = 6;
    pub const STATUS: usize = 7;
    pub const PROGRESS: usize = 8;
    pub const CURRENT_STEP: usize = 9;
    pub const TOTAL_STEPS: usize = 10;
    pub const COMPLETED_STEPS: usize = 11;
    pub const STATUS_MESSAGE: usize = 12;
    pub const RESULT_TEXT: usize = 13;
    pub const ARTIFACTS: usize = 14;
    pub const ERROR: usize = 15;
    pub const ATTEMPTS: usize = 16;
    pub const CREATED_AT: usize = 17;
    pub const STARTED_AT: usize = 18;
    pub const COMPLETED_AT: usize = 19;
}

/// Shows `show` the state of request `id` in a row of [`STATE_BY_ID`], its text
/// borrowed from the row. Only an ended request's result, error and delivery
/// (read with `delivery`, [`DELIVERY_STATE_BY_ID`]) are decoded into values of
/// their own.
pub(super) fn state_from_row(
    row: &Columns,
    id: &str,
    delivery: &mut Statement,
    show: &mut ShowState<'_>,
) -> rusqlite::Result<()> {
    use state_col as c;
    let status = status_column(row, c::STATUS)?;
    let result = result_columns(row, c::RESULT_TEXT, c::ARTIFACTS)?;
    let error = json_column::<ErrorInfo>(row, c::ERROR)?;
    // Only `finish` makes a delivery, in the transaction that ends the request.
    let webhook = if status.is_final() {
        delivery
            .query_row([id], |row| {
                Ok(WebhookState { status: row.get(0)?, attempts: row.get(1)?, last_error: row.get(2)? })
            })
            .optional()?
    } else {
        None
    };
    let int = |column| row.opt_int(column)?.ok_or_else(|| unexpected_null(column));
    let real = |column| row.opt_real(column)?.ok_or_else(|| unexpected_null(column));
    let count =
        |column, value: i64| u32::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(column, value));
    let opt_count = |column| row.opt_int(column)?.map(|value| count(column, value)).transpose();
    show(&RequestState {
        id,
        formation_id: text_column(row, c::FORMATION_ID)?,
        formation_version: text_column(row, c::FORMATION_VERSION)?,
        user_id: text_column(row, c::USER_ID)?,
        session_id: row.opt_text(c::SESSION_ID)?,
        agent_id: text_column(row, c::AGENT_ID)?,
        mode: mode_column(row, c::MODE)?,
        estimated_seconds: real(c::ESTIMATED_SECONDS)?,
        status,
        progress: real(c::PROGRESS)?,
        current_step: row.opt_text(c::CURRENT_STEP)?,
        total_steps: opt_count(c::TOTAL_STEPS)?,
        completed_steps: opt_count(c::COMPLETED_STEPS)?,
        status_message: row.opt_text(c::STATUS_MESSAGE)?,
        result: result.as_ref(),
        error: error.as_ref(),
        attempts: count(c::ATTEMPTS, int(c::ATTEMPTS)?)?,
        created_at: int(c::CREATED_AT)?,
        started_at: row.opt_int(c::STARTED_AT)?,
        completed_at: row.opt_int(c::COMPLETED_AT)?,
        webhook: webhook.as_ref(),
    });
    Ok(())
}

pub(super) fn delivery_from_row(row: &Row) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: row.get("id")?,
        request_id: row.get("request_id")?,
        formation_id: row.get("formation_id")?,
        url: row.get("url")?,
        attempts: row.get("attempts")?,
        next_attempt_at: row.get("next_attempt_at")?,
        status: row.get("status")?,
        last_error: row.get("last_error")?,
    })
}

pub(super) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(super) fn to_json(name: &str, value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("{name}: cannot encode JSON: {e}")))
}

pub(super) fn session_from_row(row: &Row) -> rusqlite::Result<SessionSummary> {
    Ok(SessionSummary {
        session_id: row.get("session_id")?,
        created_at: row.get("created_at")?,
        last_activity: row.get("last_activity")?,
        message_count: row.get::<_, i64>("message_count")?.max(0) as u64,
        request_count: row.get::<_, i64>("request_count")?.max(0) as u64,
        active_requests: row.get::<_, i64>("active_requests")?.max(0) as u64,
    })
}
