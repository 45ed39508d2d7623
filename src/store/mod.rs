//! The durable request store: the source of truth for every accepted request and
//! for the webhook outbox. One trait, [`Store`]; SQLite ([`sqlite`]) is the embedded
//! default. The trait speaks only in the types below, never in SQL, so a
//! PostgreSQL implementation can stand beside it.

pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The life of a request: `pending` -> `processing` -> `completed` | `failed` | `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "processing" => Status::Processing,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// Completed, failed and cancelled requests never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// A request as accepted, before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub id: String,
    pub formation_id: String,
    pub formation_version: String,
    pub user_id: String,
    pub session_id: Option<String>,
    pub agent_id: String,
    pub message: String,
    /// How the caller is answered: `sync` or `async`.
    pub mode: String,
    pub estimated_seconds: f64,
    pub idempotency_key: Option<String>,
    pub webhook_url: Option<String>,
    pub created_at: i64,
}

/// The successful result of a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestResult {
    pub text: String,
    #[serde(default)]
    pub artifacts: Vec<serde_json::Value>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub retryable: bool,
}

/// The state of a request's webhook delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookState {
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// A stored request with everything known about it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub id: String,
    pub formation_id: String,
    pub formation_version: String,
    pub user_id: String,
    pub session_id: Option<String>,
    pub agent_id: String,
    pub message: String,
    pub mode: String,
    pub estimated_seconds: f64,
    pub idempotency_key: Option<String>,
    pub webhook_url: Option<String>,
    pub status: Status,
    /// 0-100.
    pub progress: f64,
    pub current_step: Option<String>,
    pub total_steps: Option<u32>,
    pub completed_steps: Option<u32>,
    /// The human status message.
    pub status_message: Option<String>,
    pub result: Option<RequestResult>,
    pub error: Option<ErrorInfo>,
    pub attempts: u32,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub webhook: Option<WebhookState>,
}

impl RequestRecord {
    /// A request as it is stored on acceptance: pending, nothing done yet.
    pub fn accepted(request: NewRequest) -> RequestRecord {
        RequestRecord {
            id: request.id,
            formation_id: request.formation_id,
            formation_version: request.formation_version,
            user_id: request.user_id,
            session_id: request.session_id,
            agent_id: request.agent_id,
            message: request.message,
            mode: request.mode,
            estimated_seconds: request.estimated_seconds,
            idempotency_key: request.idempotency_key,
            webhook_url: request.webhook_url,
            status: Status::Pending,
            progress: 0.0,
            current_step: None,
            total_steps: None,
            completed_steps: None,
            status_message: None,
            result: None,
            error: None,
            attempts: 0,
            created_at: request.created_at,
            started_at: None,
            completed_at: None,
            webhook: None,
        }
    }

    /// Time from start (or acceptance, if it never started) to the end.
    pub fn duration_ms(&self) -> Option<i64> {
        self.completed_at.map(|end| end - self.started_at.unwrap_or(self.created_at))
    }
}

/// A progress update; `None` fields keep their stored value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub progress: Option<f64>,
    pub current_step: Option<String>,
    pub total_steps: Option<u32>,
    pub completed_steps: Option<u32>,
    pub message: Option<String>,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed(RequestResult),
    Failed(ErrorInfo),
    Cancelled { message: String },
}

impl Outcome {
    pub fn status(&self) -> Status {
        match self {
            Outcome::Completed(_) => Status::Completed,
            Outcome::Failed(_) => Status::Failed,
            Outcome::Cancelled { .. } => Status::Cancelled,
        }
    }
}

/// What `insert` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// A new request was stored.
    Created(RequestRecord),
    /// The idempotency key matched an earlier request of the same formation and
    /// user: that one is returned and nothing new is stored.
    Existing(RequestRecord),
}

/// Filters for listing a user's requests.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub formation_id: String,
    pub user_id: String,
    pub status: Option<Status>,
    pub limit: usize,
}

/// A webhook delivery to write in the outbox together with a request's end.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// The `webhook-id`: stable across retries.
    pub id: String,
    pub url: String,
}

/// A row of the webhook outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: String,
    pub request_id: String,
    pub formation_id: String,
    pub url: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub status: String,
    pub last_error: Option<String>,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryUpdate {
    Delivered,
    /// Try again at the given time (ms).
    Retry {
        error: String,
        next_attempt_at: i64,
    },
    /// Give up.
    Failed {
        error: String,
    },
}

/// One session of a user, as listed: derived from its requests and any
/// messages it was seeded with (`restore`).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    pub session_id: String,
    pub created_at: i64,
    /// The latest message or request end.
    pub last_activity: i64,
    /// User turns, agent answers and seeded messages.
    pub message_count: u64,
    pub request_count: u64,
    /// Its requests still pending or processing.
    pub active_requests: u64,
}

/// One message of a session, in order. From a request (`request_id` set: its
/// user turn, then its answer once completed) or seeded by a restore.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMessage {
    pub role: String,
    pub content: String,
    pub request_id: Option<String>,
    pub agent_id: Option<String>,
    /// The request's status, for messages from requests.
    pub status: Option<Status>,
    pub timestamp: i64,
}

/// A message a session is seeded with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSessionMessage {
    pub role: String,
    pub content: String,
    /// The agent that gave an assistant message, if known.
    pub agent_id: Option<String>,
    pub timestamp: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

pub type StoreResult<T> = Result<T, StoreError>;

/// The durable request store. Every write is committed durably before it returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Persists a new request in `pending`. When `idempotency_key` is set and an
    /// earlier request of the same formation and user has it, returns that one.
    async fn insert(&self, request: NewRequest) -> StoreResult<Inserted>;

    /// One request by id.
    async fn get(&self, id: &str) -> StoreResult<Option<RequestRecord>>;

    /// A user's requests in a formation, newest first.
    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>>;

    /// Begins an attempt: a `pending` or `processing` request becomes
    /// `processing`, `attempts` grows by one, `started_at` is set if unset.
    /// Returns the attempt number, or `None` when the request is already final.
    async fn start_attempt(&self, id: &str, now: i64) -> StoreResult<Option<u32>>;

    /// Records progress of a non-final request (ignored once final).
    async fn record_progress(&self, id: &str, progress: &Progress) -> StoreResult<()>;

    /// Ends a non-final request, writing the webhook outbox row (if any) in the
    /// same transaction. Returns `false`, changing nothing, if it was already final.
    async fn finish(&self, id: &str, outcome: &Outcome, now: i64, delivery: Option<NewDelivery>) -> StoreResult<bool>;

    /// Requests left `pending` or `processing`, oldest first (for recovery).
    async fn unfinished(&self) -> StoreResult<Vec<RequestRecord>>;

    /// Deletes requests (and their deliveries) that ended before `cutoff`: of
    /// one formation, or of all with `None`.
    async fn purge_finished_before(&self, formation_id: Option<&str>, cutoff: i64) -> StoreResult<u64>;

    /// Durations (ms) of the latest completed requests of a formation's agent,
    /// newest first.
    async fn recent_durations(&self, formation_id: &str, agent_id: &str, limit: usize) -> StoreResult<Vec<i64>>;

    /// The completed requests of a session, oldest first, as (message, answer).
    async fn session_turns(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, String)>>;

    /// Pending deliveries whose time has come, oldest first.
    async fn due_deliveries(&self, now: i64, limit: usize) -> StoreResult<Vec<Delivery>>;

    /// Records the result of a delivery attempt (attempts grows by one).
    async fn record_delivery(&self, id: &str, update: &DeliveryUpdate) -> StoreResult<()>;

    // Sessions and the event feed (issue 12). Default bodies keep other stores
    // (test doubles, a future PostgreSQL store) compiling until they add them.

    /// A user's sessions in a formation, latest activity first; with
    /// `active_only`, those with a request still pending or processing.
    async fn sessions(
        &self,
        _formation_id: &str,
        _user_id: &str,
        _active_only: bool,
        _limit: usize,
    ) -> StoreResult<Vec<SessionSummary>> {
        unsupported("sessions")
    }

    /// One session of a user, if it has any request or seeded message.
    async fn session(
        &self,
        _formation_id: &str,
        _user_id: &str,
        _session_id: &str,
    ) -> StoreResult<Option<SessionSummary>> {
        unsupported("session")
    }

    /// A session's messages in order (oldest first): seeded ones and those of
    /// its requests; at most the latest `limit` from before `before` (ms).
    async fn session_messages(
        &self,
        _formation_id: &str,
        _user_id: &str,
        _session_id: &str,
        _before: Option<i64>,
        _limit: usize,
    ) -> StoreResult<Vec<SessionMessage>> {
        unsupported("session_messages")
    }

    /// Replaces a session's seeded messages with `messages`.
    async fn restore_session(
        &self,
        _formation_id: &str,
        _user_id: &str,
        _session_id: &str,
        _messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()> {
        unsupported("restore_session")
    }

    /// A user's requests accepted or ended at or after `since` (ms), oldest
    /// accepted first, at most `limit`: the durable side of the event feed.
    async fn lifecycle_since(
        &self,
        _formation_id: &str,
        _user_id: &str,
        _since: i64,
        _limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        unsupported("lifecycle_since")
    }
}

/// The answer of a store that does not implement an optional method.
fn unsupported<T>(method: &str) -> StoreResult<T> {
    Err(StoreError(format!("{method}: not supported by this store")))
}

#[cfg(test)]
mod session_tests;
