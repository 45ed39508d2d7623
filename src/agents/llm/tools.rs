//! The `llm` agent's tools: their OpenAI function definitions, and running one call
//! (an HTTP POST, or another agent whose events are not forwarded; see the `llm` module doc).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::{json, Value};

use super::{ToolCall, MAX_AGENT_DEPTH};
use crate::agents::http::{host_of, read_limited, status_text, transport_failure};
use crate::agents::{AgentContext, AgentFailure, AgentOutput, AgentRequest, Events};
use crate::formation::{AgentSpec, Formation, ToolSpec};

/// The longest an HTTP tool call may take.
const HTTP_TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of a tool's response body given back to the model.
const MAX_TOOL_RESULT_BYTES: usize = 64 * 1024;

tokio::task_local! {
    /// How many agent-tool calls enclose the current agent run.
    static AGENT_DEPTH: u32;
}

/// An OpenAI function tool for a [`ToolSpec`].
pub(super) fn tool_definition(tool: &ToolSpec) -> Value {
    let (name, description, parameters) = match tool {
        ToolSpec::Http { name, description, parameters, .. } => {
            let parameters =
                if parameters.is_object() { parameters.clone() } else { json!({"type": "object", "properties": {}}) };
            (name, description, parameters)
        }
        ToolSpec::Agent { name, description, .. } => (
            name,
            description,
            json!({
                "type": "object",
                "properties": {"message": {"type": "string", "description": "What to ask the agent"}},
                "required": ["message"]
            }),
        ),
    };
    json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}})
}

fn tool_name(tool: &ToolSpec) -> &str {
    match tool {
        ToolSpec::Http { name, .. } | ToolSpec::Agent { name, .. } => name,
    }
}
/// Runs one tool call; failures become an `error: ...` result for the model.
pub(super) async fn run_tool(
    ctx: &AgentContext,
    formation: &Formation,
    tools: &[ToolSpec],
    request: &AgentRequest,
    call: &ToolCall,
) -> String {
    let Some(tool) = tools.iter().find(|t| tool_name(t) == call.name) else {
        return format!("error: there is no tool named {:?}", call.name);
    };
    let args: Value = if call.arguments.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str(&call.arguments) {
            Ok(args) => args,
            Err(e) => return format!("error: the arguments of {} are not valid JSON: {e}", call.name),
        }
    };
    let result = match tool {
        ToolSpec::Http { name, url, .. } => http_tool(ctx, name, url, &args).await,
        ToolSpec::Agent { agent_id, .. } => agent_tool(ctx, formation, agent_id, request, &args).await,
    };
    if result.starts_with("error:") {
        tracing::debug!(tool = %call.name, "tool call failed; the model gets the error");
    }
    result
}

async fn http_tool(ctx: &AgentContext, name: &str, url: &str, args: &Value) -> String {
    let what = format!("tool {name} at {}", host_of(url));
    let call = async {
        let response = match ctx.http.post(url).json(args).send().await {
            Ok(response) => response,
            Err(e) => return format!("error: {}", transport_failure(&e, &what).message),
        };
        let status = response.status();
        match read_limited(response, MAX_TOOL_RESULT_BYTES).await {
            Err(e) => format!("error: {}", transport_failure(&e, &what).message),
            Ok((body, truncated)) => {
                let body = if truncated { format!("{body}\n[truncated]") } else { body };
                if status.is_success() {
                    body
                } else {
                    format!("error: {what} answered HTTP {}: {body}", status_text(status))
                }
            }
        }
    };
    match tokio::time::timeout(HTTP_TOOL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => format!("error: {what} did not answer within {} s", HTTP_TOOL_TIMEOUT.as_secs()),
    }
}

async fn agent_tool(
    ctx: &AgentContext,
    formation: &Formation,
    agent_id: &str,
    request: &AgentRequest,
    args: &Value,
) -> String {
    let depth = AGENT_DEPTH.try_with(|d| *d).unwrap_or(0);
    if depth >= MAX_AGENT_DEPTH {
        return format!("error: agent calls nest at most {MAX_AGENT_DEPTH} deep; {agent_id} was not called");
    }
    let Some(message) = args.get("message").and_then(Value::as_str) else {
        return "error: the arguments need a \"message\" string".to_string();
    };
    let Some(spec) = formation.agent(Some(agent_id)) else {
        return format!("error: this formation has no agent {agent_id:?}");
    };
    let inner = AgentRequest {
        request_id: request.request_id.clone(),
        formation_id: request.formation_id.clone(),
        agent_id: spec.id.clone(),
        user_id: request.user_id.clone(),
        session_id: request.session_id.clone(),
        message: message.to_string(),
        attempt: request.attempt,
        history: Vec::new(),
    };
    // The inner agent's events are dropped on purpose (see the module doc).
    let (inner_events, _) = Events::channel();
    match run_nested(ctx, formation, spec, inner, inner_events, depth + 1).await {
        Ok(output) => output.text,
        Err(failure) => format!("error: agent {agent_id} failed: {}", failure.message),
    }
}

type AgentFuture<'a> = Pin<Box<dyn Future<Output = Result<AgentOutput, AgentFailure>> + Send + 'a>>;

/// [`crate::agents::run`] one level deeper, boxed: `run` reaches itself through
/// agent tools, and a recursive async call needs a named, boxed future.
fn run_nested<'a>(
    ctx: &'a AgentContext,
    formation: &'a Formation,
    spec: &'a AgentSpec,
    request: AgentRequest,
    events: Events,
    depth: u32,
) -> AgentFuture<'a> {
    Box::pin(AGENT_DEPTH.scope(depth, crate::agents::run(ctx, formation, spec, request, events)))
}
