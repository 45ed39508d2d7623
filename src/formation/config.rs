//! The typed settings of a loaded formation, with every default applied.
//!
//! The loader deserialises the validated document into the `Raw*` shapes (serde
//! defaults mirror the defaults written in `schema/formation.schema.json`; a unit
//! test keeps the two in step) and builds one [`Formation`] value that the rest of
//! the runtime reads. A running request holds an `Arc<Formation>` snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Diagnostic;

/// One loaded, validated formation.
#[derive(Debug, Clone)]
pub struct Formation {
    pub id: String,
    /// The declared `version` (`0.0.0` when absent).
    pub version: String,
    /// A short hash of the file's bytes: tells two edits of one version apart.
    pub revision: String,
    pub description: String,
    /// The file it was loaded from.
    pub source: PathBuf,
    /// The folder relative paths (commands, triggers) resolve against.
    pub dir: PathBuf,
    /// Keys as written in `server.api_keys` (secrets resolved); generated keys are
    /// filled in by the registry when a key is absent.
    pub keys: ApiKeys,
    pub overlord: OverlordSettings,
    pub llm: LlmSettings,
    pub agents: Vec<AgentSpec>,
    /// The `mcp` section: the MCP endpoint and which agents are its tools.
    pub mcp: McpSettings,
    /// The `observability` section: what is measured.
    pub observability: ObservabilitySettings,
    /// `server.rate_limits`: per key and per user (none: unlimited).
    pub rate_limits: RateLimits,
    /// Trigger templates from `triggers/*.md`, by name.
    pub triggers: BTreeMap<String, crate::triggers::Trigger>,
    /// Non-fatal problems (unknown top-level sections and the like).
    pub warnings: Vec<Diagnostic>,
}

impl Formation {
    /// `version+revision`: what a request records as the formation version it
    /// ran with, and what replicas compare their copies by.
    pub fn version_label(&self) -> String {
        [&self.version, "+", &self.revision].concat()
    }

    /// The agent a request names, or the default agent when it names none.
    pub fn agent(&self, id: Option<&str>) -> Option<&AgentSpec> {
        match id {
            Some(id) => self.agents.iter().find(|a| a.id == id),
            None => self.agents.iter().find(|a| a.default).or_else(|| self.agents.first()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    pub admin: Option<String>,
    pub client: Option<String>,
}

/// How the overlord runs work: the one typed value the engine reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlordSettings {
    #[serde(rename = "async")]
    pub async_: AsyncSettings,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    pub max_concurrent_requests: usize,
    /// `overlord.max_pending_per_user`: unfinished requests one user may hold (none: unlimited).
    pub max_pending_per_user: Option<u32>,
}

impl Default for OverlordSettings {
    fn default() -> Self {
        OverlordSettings {
            async_: AsyncSettings::default(),
            retry: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            max_concurrent_requests: default_max_concurrent(),
            max_pending_per_user: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AsyncMode {
    #[default]
    Auto,
    Sync,
    Async,
}

impl AsyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AsyncMode::Auto => "auto",
            AsyncMode::Sync => "sync",
            AsyncMode::Async => "async",
        }
    }
}

/// The `mcp` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSettings {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The agents offered as tools; `None`: all.
    #[serde(default)]
    pub agents: Option<Vec<String>>,
}

impl Default for McpSettings {
    fn default() -> Self {
        McpSettings { enabled: true, agents: None }
    }
}

/// The `observability` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilitySettings {
    /// Count this formation's requests in the request metrics.
    #[serde(default = "default_true")]
    pub track_async_tasks: bool,
}

impl Default for ObservabilitySettings {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

/// `server.rate_limits`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    #[serde(default)]
    pub per_key: Option<Rate>,
    #[serde(default)]
    pub per_user: Option<Rate>,
}

/// A token bucket: `requests_per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// The `async` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncSettings {
    #[serde(default)]
    pub mode: AsyncMode,
    #[serde(default = "default_threshold")]
    pub threshold_seconds: f64,
    #[serde(default = "default_true")]
    pub enable_estimation: bool,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default = "default_webhook_retries")]
    pub webhook_retries: u32,
    #[serde(default = "default_webhook_timeout")]
    pub webhook_timeout: f64,
    /// Never serialised: secrets stay out of API answers and logs.
    #[serde(default, skip_serializing)]
    pub webhook_secret: Option<String>,
    #[serde(default = "default_retention_days")]
    pub retention_days: f64,
}

impl Default for AsyncSettings {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

/// `overlord.workflow.retry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_delay")]
    pub initial_delay: f64,
    #[serde(default = "default_max_delay")]
    pub max_delay: f64,
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

/// `overlord.workflow.timeouts`, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_task_timeout")]
    pub task_timeout: f64,
    #[serde(default = "default_workflow_timeout")]
    pub workflow_timeout: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

impl Timeouts {
    /// `task_timeout` as a `Duration` (the schema bounds it; out-of-range reads as the bound).
    pub fn task(&self) -> Duration {
        crate::time::seconds_clamped(self.task_timeout, Duration::MAX)
    }
    /// `workflow_timeout` as a `Duration`, bounded like [`Timeouts::task`].
    pub fn workflow(&self) -> Duration {
        crate::time::seconds_clamped(self.workflow_timeout, Duration::MAX)
    }
}

/// The `llm` section: provider keys, model settings and base URLs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LlmSettings {
    /// Provider name (`openai`, `ollama`, ...) -> API key. Never serialised.
    #[serde(default, skip_serializing)]
    pub api_keys: BTreeMap<String, String>,
    /// Extra model settings; `api_base` gives the OpenAI-compatible base URL.
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// The `models` list as written (AFS allows several shapes).
    #[serde(default)]
    pub models: Vec<serde_json::Value>,
}

/// One agent of a formation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentSpec {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_message: Option<String>,
    /// Marked `default: true` (else the first agent is the default).
    pub default: bool,
    /// The agent's own estimate of how long its work takes, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_seconds: Option<f64>,
    pub kind: AgentKind,
}

/// What does an agent's work.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AgentKind {
    /// A program run per request (`command: [program, args...]`). `argv[0]` is
    /// already resolved against the formation's folder when it is a relative path.
    Command {
        argv: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        retryable_exit_codes: Vec<i32>,
        #[serde(skip)]
        env: BTreeMap<String, String>,
    },
    /// A language model over the OpenAI-compatible chat completions API.
    Llm {
        /// As written in AFS: `provider/model`, e.g. `openai/gpt-4o-mini`.
        model: String,
        #[serde(skip)]
        api_base: String,
        #[serde(skip)]
        api_key: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tools: Vec<ToolSpec>,
        max_tool_rounds: u32,
    },
    /// A remote service that receives the request as JSON and returns the result.
    Http { url: String },
}

/// A tool an LLM agent may call.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ToolSpec {
    /// An HTTP endpoint: the tool's arguments are POSTed as JSON, the response body
    /// goes back to the model.
    Http {
        name: String,
        description: String,
        url: String,
        /// JSON Schema of the arguments.
        parameters: serde_json::Value,
    },
    /// Another agent of the formation, called with `{"message": "..."}`.
    Agent { name: String, description: String, agent_id: String },
}

fn default_true() -> bool {
    true
}
fn default_threshold() -> f64 {
    30.0
}
fn default_webhook_retries() -> u32 {
    3
}
fn default_webhook_timeout() -> f64 {
    10.0
}
fn default_retention_days() -> f64 {
    7.0
}
fn default_max_attempts() -> u32 {
    3
}
fn default_initial_delay() -> f64 {
    1.0
}
fn default_max_delay() -> f64 {
    60.0
}
fn default_backoff_factor() -> f64 {
    2.0
}
fn default_task_timeout() -> f64 {
    300.0
}
fn default_workflow_timeout() -> f64 {
    3600.0
}
pub(crate) fn default_max_concurrent() -> usize {
    16
}
