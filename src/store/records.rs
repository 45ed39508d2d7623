//! A request's records: as accepted ([`NewRequest`]) and as stored ([`RequestRecord`]),
//! with its status, mode, result and error, and the updates, answers and leases of its life.

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

/// How a request's caller is answered: with the result (`sync`) or at once
/// with the request id (`async`, a 202).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sync,
    Async,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "sync" => Some(Mode::Sync),
            "async" => Some(Mode::Async),
            _ => None,
        }
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
    /// How the caller is answered.
    pub mode: Mode,
    pub estimated_seconds: f64,
    pub idempotency_key: Option<String>,
    /// With an idempotency key, a digest of what was asked (agent, message,
    /// session, webhook), so the key reused for a different request is told
    /// apart. Without one there is nothing to compare, and none is kept.
    pub fingerprint: Option<String>,
    pub webhook_url: Option<String>,
    /// The formation's `workflow_timeout` when the request was accepted: how
    /// long it may wait for its formation if that is not loaded.
    pub workflow_timeout_ms: i64,
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
    pub mode: Mode,
    /// Whether the caller was answered with the id (async, or a sync caller
    /// promoted to 202 at the threshold or at shutdown): such requests get the
    /// formation's webhook.
    pub answered_async: bool,
    pub estimated_seconds: f64,
    pub idempotency_key: Option<String>,
    pub webhook_url: Option<String>,
    pub workflow_timeout_ms: i64,
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
            answered_async: request.mode == Mode::Async,
            mode: request.mode,
            estimated_seconds: request.estimated_seconds,
            idempotency_key: request.idempotency_key,
            webhook_url: request.webhook_url,
            workflow_timeout_ms: request.workflow_timeout_ms,
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
        duration_ms(self.created_at, self.started_at, self.completed_at)
    }
}

/// Time from start (or acceptance, if it never started) to the end, if it has ended.
pub(super) fn duration_ms(created_at: i64, started_at: Option<i64>, completed_at: Option<i64>) -> Option<i64> {
    completed_at.map(|end| end - started_at.unwrap_or(created_at))
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
///
/// Each record is boxed: an answer passes through many futures on its way to
/// the caller, and each move of a 512-byte record copied all of it.
pub enum Inserted {
    /// A new request was stored.
    Created(Box<RequestRecord>),
    /// The idempotency key matched an earlier request of the same formation and
    /// user: that one is returned and nothing new is stored.
    Existing(Box<RequestRecord>),
    /// The idempotency key matched an earlier request that asked something
    /// else (another fingerprint): nothing is stored.
    KeyReused(Box<RequestRecord>),
}

impl Inserted {
    /// The answer to `asked`, whose idempotency key `holder` (stored with
    /// `holder_fingerprint`) already holds: the same request again, or another
    /// one under a reused key. Rows from before fingerprints were kept match
    /// any request.
    pub(crate) fn key_held_by(
        holder: Box<RequestRecord>,
        holder_fingerprint: Option<String>,
        asked: &NewRequest,
    ) -> Inserted {
        match holder_fingerprint {
            Some(f) if asked.fingerprint.as_ref() != Some(&f) => Inserted::KeyReused(holder),
            _ => Inserted::Existing(holder),
        }
    }
}

/// A runner's hold on a request. Every write the runner makes is fenced by
/// its epoch: once another runner has taken the request over (a newer epoch),
/// the old runner's writes change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub epoch: i64,
}

/// What `claim` gives a runner: the attempt it starts and the lease it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub attempt: u32,
    pub lease: Lease,
}
