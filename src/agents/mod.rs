//! The work itself. One function, [`run`], dispatches on the agent's kind; each
//! kind lives in its own file.
//!
//! Contract for every kind: the future returned is cancel-safe. Dropping it (the
//! engine does so on cancel and timeout) stops all the work it started: a child
//! process group is killed, an HTTP call is abandoned.

pub mod command;
pub mod events;
pub mod http;
pub mod lifetime;
pub mod llm;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::formation::{AgentKind, AgentSpec, Formation};

/// What an agent is asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRequest {
    pub request_id: String,
    pub formation_id: String,
    pub agent_id: String,
    pub user_id: String,
    pub session_id: Option<String>,
    pub message: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Earlier turns of the same session, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Turn>,
}

/// One earlier exchange of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// What an agent reports while it works.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    Progress(ProgressUpdate),
    /// A piece of the answer's text, as it is produced.
    Content(String),
}

/// A progress report. Absent fields leave the request's current value unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressUpdate {
    /// 0-100.
    pub progress: Option<f64>,
    /// What the agent is doing now (`current_step`).
    pub step: Option<String>,
    pub total_steps: Option<u32>,
    pub completed_steps: Option<u32>,
    /// A human status message.
    pub message: Option<String>,
}

/// The result of successful work.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentOutput {
    pub text: String,
    #[serde(default)]
    pub artifacts: Vec<serde_json::Value>,
}

/// Why work failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentFailure {
    /// Stable short type: `agent_error`, `model_error`, `rate_limited`,
    /// `tool_error`, `unreachable`, `tool_rounds_exceeded`, ...
    pub kind: String,
    pub message: String,
    pub retryable: bool,
    /// A delay the other side asked for (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl AgentFailure {
    pub fn new(kind: &str, message: impl Into<String>, retryable: bool) -> Self {
        AgentFailure { kind: kind.to_string(), message: message.into(), retryable, retry_after: None }
    }
}

pub use events::Events;

/// Shared resources of all agents (one HTTP client with its connection pool).
#[derive(Clone)]
pub struct AgentContext {
    pub http: reqwest::Client,
}

impl AgentContext {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .expect("HTTP client builds");
        AgentContext { http }
    }
}

impl Default for AgentContext {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one attempt of `spec` on `request`. See the module doc for the
/// cancellation contract.
pub async fn run(
    ctx: &AgentContext,
    formation: &Formation,
    spec: &AgentSpec,
    request: AgentRequest,
    events: Events,
) -> Result<AgentOutput, AgentFailure> {
    match &spec.kind {
        AgentKind::Command { .. } => command::run(formation, spec, request, events).await,
        AgentKind::Llm { .. } => llm::run(ctx, formation, spec, request, events).await,
        AgentKind::Http { .. } => http::run(ctx, spec, request, events).await,
    }
}
