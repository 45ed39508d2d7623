//! A request's state as a status poll shows it: everything but its message,
//! borrowed from where it is kept (a record, or the row a store reads), so a
//! poll need not build a record to answer.

use super::{ErrorInfo, Mode, RequestRecord, RequestResult, Status, WebhookState};

/// What [`super::Store::show_state`] shows a request's state to.
pub type ShowState<'f> = dyn for<'r, 's> FnMut(&'r RequestState<'s>) + Send + 'f;

/// What [`super::Store::show_state`] lends: a request without its message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestState<'a> {
    pub id: &'a str,
    pub formation_id: &'a str,
    pub formation_version: &'a str,
    pub user_id: &'a str,
    pub session_id: Option<&'a str>,
    pub agent_id: &'a str,
    pub mode: Mode,
    pub estimated_seconds: f64,
    pub status: Status,
    pub progress: f64,
    pub current_step: Option<&'a str>,
    pub total_steps: Option<u32>,
    pub completed_steps: Option<u32>,
    pub status_message: Option<&'a str>,
    pub result: Option<&'a RequestResult>,
    pub error: Option<&'a ErrorInfo>,
    pub attempts: u32,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub webhook: Option<&'a WebhookState>,
}

impl<'a> RequestState<'a> {
    /// The state of `record`.
    pub fn of(record: &'a RequestRecord) -> RequestState<'a> {
        RequestState {
            id: &record.id,
            formation_id: &record.formation_id,
            formation_version: &record.formation_version,
            user_id: &record.user_id,
            session_id: record.session_id.as_deref(),
            agent_id: &record.agent_id,
            mode: record.mode,
            estimated_seconds: record.estimated_seconds,
            status: record.status,
            progress: record.progress,
            current_step: record.current_step.as_deref(),
            total_steps: record.total_steps,
            completed_steps: record.completed_steps,
            status_message: record.status_message.as_deref(),
            result: record.result.as_ref(),
            error: record.error.as_ref(),
            attempts: record.attempts,
            created_at: record.created_at,
            started_at: record.started_at,
            completed_at: record.completed_at,
            webhook: record.webhook.as_ref(),
        }
    }

    /// Time from start (or acceptance, if it never started) to the end.
    pub fn duration_ms(&self) -> Option<i64> {
        super::records::duration_ms(self.created_at, self.started_at, self.completed_at)
    }
}
