//! The tools a formation offers over MCP: one per exposed agent, plus
//! `check_execution_status`, `cancel_execution` and `list_executions`; their
//! input schemas, and the checked arguments of each call.

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde_json::{json, Map, Value};

use crate::formation::{AgentSpec, Formation};
use crate::store::Status;

pub const CHECK_STATUS: &str = "check_execution_status";
pub const CANCEL: &str = "cancel_execution";
pub const LIST: &str = "list_executions";
/// Names taken by the execution tools: an agent with one of these ids is not
/// offered as a tool (its tool could never be called).
pub const BUILT_IN: [&str; 3] = [CHECK_STATUS, CANCEL, LIST];

const DEFAULT_LIST_LIMIT: u64 = 20;
/// The longest `wait_seconds`, whatever the formation's threshold: an MCP call
/// is not the place to wait for hours.
const MAX_WAIT_SECONDS: f64 = 3600.0;
const MAX_LIST_LIMIT: u64 = 100;

/// A tool call's arguments were not acceptable: a stable code and a readable message.
#[derive(Debug, Clone, PartialEq)]
pub struct BadArguments {
    pub code: &'static str,
    pub message: String,
}

fn bad(code: &'static str, message: impl Into<String>) -> BadArguments {
    BadArguments { code, message: message.into() }
}

/// The agents of `formation` offered as tools, in formation order.
pub fn exposed_agents(formation: &Formation) -> impl Iterator<Item = &AgentSpec> {
    let allowed = crate::mcp::exposed(formation);
    formation
        .agents
        .iter()
        .filter(move |a| allowed.is_none_or(|ids| ids.iter().any(|id| id == &a.id)))
        .filter(|a| !BUILT_IN.contains(&a.id.as_str()))
}

/// Every tool of `formation`.
pub fn list(formation: &Formation) -> Vec<Tool> {
    let threshold = max_wait_seconds(formation.overlord.async_.threshold_seconds);
    let mut tools: Vec<Tool> = exposed_agents(formation).map(|agent| agent_tool(agent, threshold)).collect();
    tools.push(
        Tool::new(
            CHECK_STATUS,
            "Check an execution started by an agent tool: `running` (with progress), `completed` \
             (with the output), `failed` (with the error) or `cancelled`.",
            schema(json!({
                "type": "object",
                "properties": { "execution_id": { "type": "string", "description": "The id an agent tool returned." } },
                "required": ["execution_id"],
            })),
        )
        .with_annotations(ToolAnnotations::new().read_only(true)),
    );
    tools.push(
        Tool::new(
            CANCEL,
            "Cancel a running execution: its agent is stopped.",
            schema(json!({
                "type": "object",
                "properties": { "execution_id": { "type": "string", "description": "The id an agent tool returned." } },
                "required": ["execution_id"],
            })),
        )
        .with_annotations(ToolAnnotations::new().destructive(true).idempotent(true)),
    );
    tools.push(
        Tool::new(
            LIST,
            "List your executions on this formation, newest first.",
            schema(json!({
                "type": "object",
                "properties": {
                    "status": {
                        "type": "string",
                        "enum": ["running", "pending", "processing", "completed", "failed", "cancelled"],
                        "description": "Only executions in this state (`running` means pending or processing).",
                    },
                    "limit": { "type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": DEFAULT_LIST_LIMIT },
                },
            })),
        )
        .with_annotations(ToolAnnotations::new().read_only(true)),
    );
    tools
}

fn agent_tool(agent: &AgentSpec, threshold: f64) -> Tool {
    let description = if agent.description.trim().is_empty() {
        format!("Run agent `{}`.", agent.id)
    } else {
        let text = agent.description.trim();
        if text.ends_with(['.', '!', '?']) {
            text.to_string()
        } else {
            format!("{text}.")
        }
    };
    let description = format!(
        "{description} Starts the work and answers at once with an `execution_id`; \
         call `check_execution_status` with it to get the result."
    );
    let tool = Tool::new(
        agent.id.clone(),
        description,
        schema(json!({
            "type": "object",
            "properties": {
                "message": { "type": "string", "description": "What to ask the agent." },
                "session_id": { "type": "string", "description": "Continue a conversation: earlier turns of this session are given to the agent." },
                "webhook_url": { "type": "string", "format": "uri", "description": "Where the result is POSTed when the execution ends." },
                "wait_seconds": {
                    "type": "number", "minimum": 0, "maximum": threshold,
                    "description": "Wait up to this long for a quick answer before answering with the execution id (default 0).",
                },
            },
            "required": ["message"],
        })),
    );
    if agent.name.trim().is_empty() || agent.name == agent.id {
        tool
    } else {
        tool.with_title(agent.name.clone())
    }
}

fn schema(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(Map::new()),
    }
}

/// The checked arguments of an agent tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentArgs {
    pub message: String,
    pub session_id: Option<String>,
    pub webhook_url: Option<String>,
    /// Bounded by the formation's `async.threshold_seconds`.
    pub wait: Duration,
}

impl AgentArgs {
    pub fn parse(args: &JsonObject, threshold_seconds: f64) -> Result<AgentArgs, BadArguments> {
        unknown_keys(args, &["message", "session_id", "webhook_url", "wait_seconds"])?;
        let message = match args.get("message") {
            Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(bad("missing_message", "`message` is required and must not be empty"))
            }
            Some(other) => return Err(bad("invalid_arguments", format!("`message` must be a string, got {other}"))),
        };
        let wait = match args.get("wait_seconds") {
            None | Some(Value::Null) => Duration::ZERO,
            Some(value) => wait_seconds(value, threshold_seconds)?,
        };
        Ok(AgentArgs {
            message,
            session_id: optional_string(args, "session_id")?,
            webhook_url: optional_string(args, "webhook_url")?,
            wait,
        })
    }
}

/// The largest `wait_seconds` a formation accepts: its async threshold, at most an hour.
pub fn max_wait_seconds(threshold_seconds: f64) -> f64 {
    if threshold_seconds.is_finite() {
        threshold_seconds.clamp(0.0, MAX_WAIT_SECONDS)
    } else {
        0.0
    }
}

/// `wait_seconds` as a Duration: a finite number from 0 to [`max_wait_seconds`].
fn wait_seconds(value: &Value, threshold_seconds: f64) -> Result<Duration, BadArguments> {
    let max = max_wait_seconds(threshold_seconds);
    let seconds = value
        .as_f64()
        .filter(|s| s.is_finite())
        .ok_or_else(|| bad("invalid_wait_seconds", format!("`wait_seconds` must be a number, got {value}")))?;
    if !(0.0..=max).contains(&seconds) {
        return Err(bad(
            "invalid_wait_seconds",
            format!("`wait_seconds` must be between 0 and {max} (this formation's async threshold, at most an hour), got {seconds}"),
        ));
    }
    crate::time::seconds(seconds)
        .ok_or_else(|| bad("invalid_wait_seconds", format!("`wait_seconds` {seconds} is not a duration")))
}

/// The `execution_id` argument of the execution tools.
pub fn execution_id(args: &JsonObject) -> Result<String, BadArguments> {
    unknown_keys(args, &["execution_id"])?;
    match args.get("execution_id") {
        Some(Value::String(id)) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(bad("missing_execution_id", "`execution_id` is required (the id an agent tool returned)"))
        }
        Some(other) => Err(bad("invalid_arguments", format!("`execution_id` must be a string, got {other}"))),
    }
}

/// Which executions `list_executions` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ListArgs {
    /// Empty: every status.
    pub statuses: Vec<Status>,
    pub limit: usize,
}

impl ListArgs {
    pub fn parse(args: &JsonObject) -> Result<ListArgs, BadArguments> {
        unknown_keys(args, &["status", "limit"])?;
        let statuses = match args.get("status") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if s == "running" => vec![Status::Pending, Status::Processing],
            Some(Value::String(s)) if Status::parse(s).is_some() => Status::parse(s).into_iter().collect(),
            Some(other) => {
                return Err(bad(
                    "invalid_status",
                    format!(
                    "`status` must be one of running, pending, processing, completed, failed, cancelled; got {other}"
                ),
                ))
            }
        };
        let limit = match args.get("limit") {
            None | Some(Value::Null) => DEFAULT_LIST_LIMIT,
            Some(value) => value.as_u64().filter(|n| (1..=MAX_LIST_LIMIT).contains(n)).ok_or_else(|| {
                bad("invalid_limit", format!("`limit` must be an integer from 1 to {MAX_LIST_LIMIT}, got {value}"))
            })?,
        };
        Ok(ListArgs { statuses, limit: limit as usize })
    }
}

fn optional_string(args: &JsonObject, key: &str) -> Result<Option<String>, BadArguments> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(bad("invalid_arguments", format!("`{key}` must be a string, got {other}"))),
    }
}

fn unknown_keys(args: &JsonObject, known: &[&str]) -> Result<(), BadArguments> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => {
            Err(bad("invalid_arguments", format!("unknown argument `{key}` (expected: {})", known.join(", "))))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(value: Value) -> JsonObject {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn agent_args_need_a_message() {
        assert_eq!(AgentArgs::parse(&args(json!({})), 10.0).unwrap_err().code, "missing_message");
        assert_eq!(AgentArgs::parse(&args(json!({"message": "  "})), 10.0).unwrap_err().code, "missing_message");
        assert_eq!(AgentArgs::parse(&args(json!({"message": 3})), 10.0).unwrap_err().code, "invalid_arguments");
        let ok = AgentArgs::parse(&args(json!({"message": "hi", "session_id": "s1"})), 10.0).unwrap();
        assert_eq!(ok.message, "hi");
        assert_eq!(ok.session_id.as_deref(), Some("s1"));
        assert_eq!(ok.wait, Duration::ZERO);
    }

    #[test]
    fn wait_seconds_is_bounded_by_the_threshold() {
        let parse = |v: Value| AgentArgs::parse(&args(json!({"message": "hi", "wait_seconds": v})), 10.0);
        assert_eq!(parse(json!(2.5)).unwrap().wait, Duration::from_millis(2500));
        assert_eq!(parse(json!(10)).unwrap().wait, Duration::from_secs(10));
        for bad in [json!(10.5), json!(-1), json!(1e300), json!("5"), json!(true)] {
            let err = parse(bad.clone()).unwrap_err();
            assert_eq!(err.code, "invalid_wait_seconds", "{bad}");
        }
        assert!(parse(json!(1e300)).unwrap_err().message.contains("between 0 and 10"));
        // A huge threshold still bounds the wait to an hour: never a Duration overflow.
        let huge = |v: Value| AgentArgs::parse(&args(json!({"message": "hi", "wait_seconds": v})), 1e300);
        assert_eq!(huge(json!(3600)).unwrap().wait, Duration::from_secs(3600));
        assert_eq!(huge(json!(1e200)).unwrap_err().code, "invalid_wait_seconds");
        let nan = AgentArgs::parse(&args(json!({"message": "hi", "wait_seconds": 1})), f64::NAN);
        assert_eq!(nan.unwrap_err().code, "invalid_wait_seconds");
    }

    #[test]
    fn unknown_arguments_are_named() {
        let err = AgentArgs::parse(&args(json!({"message": "hi", "wait": 3})), 10.0).unwrap_err();
        assert!(err.message.contains("`wait`"), "{}", err.message);
    }

    #[test]
    fn list_args() {
        assert_eq!(ListArgs::parse(&args(json!({}))).unwrap(), ListArgs { statuses: vec![], limit: 20 });
        let running = ListArgs::parse(&args(json!({"status": "running", "limit": 5}))).unwrap();
        assert_eq!(running.statuses, vec![Status::Pending, Status::Processing]);
        assert_eq!(running.limit, 5);
        assert_eq!(ListArgs::parse(&args(json!({"status": "done"}))).unwrap_err().code, "invalid_status");
        for limit in [json!(0), json!(101), json!(-3), json!(2.5)] {
            assert_eq!(ListArgs::parse(&args(json!({ "limit": limit }))).unwrap_err().code, "invalid_limit");
        }
    }

    #[test]
    fn execution_id_is_required() {
        assert_eq!(execution_id(&args(json!({}))).unwrap_err().code, "missing_execution_id");
        assert_eq!(execution_id(&args(json!({"execution_id": " req_1 "}))).unwrap(), "req_1");
    }
}
