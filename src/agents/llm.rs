//! The `llm` agent kind: a language model over the OpenAI-compatible chat
//! completions API, with a tool loop.
//!
//! One attempt:
//! 1. The prompt is the agent's `system_message` (if any), the session's earlier
//!    turns (roles as given) and the request's message as the last `user` turn.
//! 2. `POST {api_base}/chat/completions` with `model` = the part of
//!    `provider/name` after the first `/`, `stream: true`, the agent's tools as
//!    OpenAI function tools, and `Authorization: Bearer <api_key>` when a key is
//!    set. The SSE answer is read as it arrives: text deltas become
//!    [`AgentEvent::Content`] events, tool call deltas are assembled by `index`.
//!    (A provider that ignores `stream` and answers with one JSON object is
//!    understood too.)
//! 3. When the model asks for tools, each call runs in turn, the assistant turn
//!    with its `tool_calls` and one `role: tool` message per call are appended,
//!    and the model is called again, at most `max_tool_rounds` times; a model
//!    that still asks for tools after that fails the attempt with
//!    `tool_rounds_exceeded` (not retryable).
//! 4. The output is the text of the final answer. Text the model writes in a
//!    round that also asks for tools is streamed as content but is not part of
//!    the output.
//!
//! Tools:
//! - HTTP tools: the call's arguments JSON is POSTed to the tool's `url` (60 s
//!   limit); the response body (at most 64 KiB) is the tool result.
//! - Agent tools run another agent of the same formation through
//!   [`crate::agents::run`] with `{"message": ...}` and no history; its text is
//!   the tool result. The inner agent's events are NOT forwarded: the outer
//!   agent's own step ("Running tool ...") describes the whole call, and the
//!   inner answer reaches the user through the outer model's answer. Calls nest
//!   at most [`MAX_AGENT_DEPTH`] deep.
//! - A failing tool (unknown name, bad arguments, unreachable, non-2xx, inner
//!   agent failure) gives an `error: ...` string as its result, so the model can
//!   recover; it does not fail the request.
//!
//! Progress: each model call and each tool call is a step. When a step starts,
//! a [`ProgressUpdate`] names it (`Calling model (round 2)`, `Running tool
//! search_web`) with `completed_steps` = steps finished, `total_steps` =
//! finished + 1 and `progress` = 100 × finished / (finished + 2), which rises
//! but stays below 100; a last update sets 100 when the answer is complete.
//!
//! Errors: 429 -> `rate_limited`, 5xx -> `model_error`, both retryable with
//! `Retry-After`; other statuses -> `model_error`, not retryable, with the
//! provider's `error.message`; no connection, timeouts -> `unreachable`,
//! retryable, naming the API host. The API key never appears in messages or
//! logs (it is also masked out of provider messages that echo it).
//!
//! Cancellation: dropping the future drops the open HTTP response, which closes
//! the connection to the provider (or tool, or inner agent).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{error_detail, host_of, read_limited, retry_after, status_failure, status_text, transport_failure};
use super::{AgentContext, AgentEvent, AgentFailure, AgentOutput, AgentRequest, Events, ProgressUpdate};
use crate::formation::{AgentKind, AgentSpec, Formation, ToolSpec};

/// The longest an HTTP tool call may take.
const HTTP_TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of a tool's response body given back to the model.
const MAX_TOOL_RESULT_BYTES: usize = 64 * 1024;
/// The longest to wait for the model API's response headers.
const RESPONSE_START_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest silence allowed inside a streamed answer.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The most of a non-streamed answer or an error body read.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// The most tool calls one answer may ask for; a streamed call `index` at or
/// above it fails the attempt (not retryable) instead of growing a buffer.
pub const MAX_TOOL_CALLS: usize = 128;
/// The most text (content, tool names and arguments together) one answer may hold.
const MAX_ANSWER_TEXT_BYTES: usize = MAX_ANSWER_BYTES;
/// The longest line, and the longest event, of a streamed answer.
const MAX_SSE_LINE_BYTES: usize = 4 * 1024 * 1024;
/// How deep agent tools may nest (an agent calling an agent calling ...).
pub const MAX_AGENT_DEPTH: u32 = 4;

tokio::task_local! {
    /// How many agent-tool calls enclose the current agent run.
    static AGENT_DEPTH: u32;
}

pub async fn run(
    ctx: &AgentContext,
    formation: &Formation,
    spec: &AgentSpec,
    request: AgentRequest,
    events: Events,
) -> Result<AgentOutput, AgentFailure> {
    let AgentKind::Llm { model, api_base, api_key, tools, max_tool_rounds } = &spec.kind else {
        return Err(AgentFailure::new("agent_error", format!("agent {} is not an llm agent", spec.id), false));
    };
    let client = ModelClient::new(ctx, api_base, model, api_key.as_deref());
    let tool_defs: Vec<Value> = tools.iter().map(tool_definition).collect();
    let mut messages = initial_messages(spec.system_message.as_deref(), &request);
    let mut steps = Steps { events: &events, completed: 0 };
    let mut rounds_used = 0u32;

    loop {
        steps.begin(format!("Calling model (round {})", rounds_used + 1));
        let answer = client.complete(&messages, &tool_defs, &events).await?;
        steps.end();

        if answer.tool_calls.is_empty() {
            steps.done();
            return Ok(AgentOutput { text: answer.content, artifacts: Vec::new() });
        }
        if rounds_used >= *max_tool_rounds {
            return Err(AgentFailure::new(
                "tool_rounds_exceeded",
                format!(
                    "agent {} gave up: the model still asked for tools after {} tool round(s), \
                     the agent's max_tool_rounds",
                    spec.id, max_tool_rounds
                ),
                false,
            ));
        }
        rounds_used += 1;

        messages.push(answer.assistant_message());
        for call in &answer.tool_calls {
            steps.begin(format!("Running tool {}", call.name));
            let result = run_tool(ctx, formation, tools, &request, call).await;
            steps.end();
            messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": result}));
        }
    }
}

/// The opening messages: system message, history, then the user's message.
fn initial_messages(system_message: Option<&str>, request: &AgentRequest) -> Vec<Value> {
    let mut messages = Vec::with_capacity(request.history.len() + 2);
    if let Some(system) = system_message.filter(|s| !s.trim().is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    for turn in &request.history {
        messages.push(json!({"role": turn.role, "content": turn.content}));
    }
    messages.push(json!({"role": "user", "content": request.message}));
    messages
}

/// An OpenAI function tool for a [`ToolSpec`].
fn tool_definition(tool: &ToolSpec) -> Value {
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

/// Progress over steps (model calls and tool calls).
struct Steps<'a> {
    events: &'a Events,
    completed: u32,
}

impl Steps<'_> {
    fn begin(&self, step: String) {
        let done = self.completed;
        let _ = self.events.send(AgentEvent::Progress(ProgressUpdate {
            progress: Some(100.0 * f64::from(done) / f64::from(done + 2)),
            step: Some(step),
            total_steps: Some(done + 1),
            completed_steps: Some(done),
            message: None,
        }));
    }

    fn end(&mut self) {
        self.completed += 1;
    }

    fn done(&self) {
        let _ = self.events.send(AgentEvent::Progress(ProgressUpdate {
            progress: Some(100.0),
            step: None,
            total_steps: Some(self.completed),
            completed_steps: Some(self.completed),
            message: None,
        }));
    }
}

// ---- the model API ----

struct ModelClient<'a> {
    ctx: &'a AgentContext,
    endpoint: String,
    host: String,
    model: &'a str,
    api_key: Option<&'a str>,
}

/// One answer of the model: its text and the tool calls it asks for.
#[derive(Debug, Default)]
struct Answer {
    content: String,
    tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Default, Clone)]
struct ToolCall {
    id: String,
    name: String,
    arguments: String,
}

impl Answer {
    /// The assistant turn to put back into the conversation.
    fn assistant_message(&self) -> Value {
        let calls: Vec<Value> = self
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        let content = if self.content.is_empty() { Value::Null } else { Value::String(self.content.clone()) };
        json!({"role": "assistant", "content": content, "tool_calls": calls})
    }
}

impl<'a> ModelClient<'a> {
    fn new(ctx: &'a AgentContext, api_base: &str, model: &'a str, api_key: Option<&'a str>) -> Self {
        ModelClient {
            ctx,
            endpoint: format!("{}/chat/completions", api_base.trim_end_matches('/')),
            host: host_of(api_base),
            model: model.split_once('/').map_or(model, |(_, name)| name),
            api_key: api_key.filter(|k| !k.is_empty()),
        }
    }

    fn what(&self) -> String {
        format!("the model API at {}", self.host)
    }

    /// Masks the API key should a provider echo it back.
    fn redact(&self, text: String) -> String {
        match self.api_key {
            Some(key) if text.contains(key) => text.replace(key, "***"),
            _ => text,
        }
    }

    /// One chat completion call, streaming content deltas to `events`.
    async fn complete(&self, messages: &[Value], tools: &[Value], events: &Events) -> Result<Answer, AgentFailure> {
        let mut body = json!({"model": self.model, "messages": messages, "stream": true});
        if !tools.is_empty() {
            body["tools"] = Value::from(tools.to_vec());
        }
        let mut builder = self.ctx.http.post(&self.endpoint).json(&body);
        if let Some(key) = self.api_key {
            builder = builder.bearer_auth(key);
        }
        tracing::debug!(host = %self.host, model = %self.model, messages = messages.len(), "calling model");

        let response = match tokio::time::timeout(RESPONSE_START_TIMEOUT, builder.send()).await {
            Err(_) => {
                return Err(AgentFailure::new(
                    "unreachable",
                    format!("could not reach {}: no answer within {} s", self.what(), RESPONSE_START_TIMEOUT.as_secs()),
                    true,
                ))
            }
            Ok(Err(e)) => return Err(transport_failure(&e, &self.what())),
            Ok(Ok(response)) => response,
        };

        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let body = read_limited(response, MAX_ANSWER_BYTES).await.map(|(b, _)| b).unwrap_or_default();
            let message =
                self.redact(format!("{} answered HTTP {}{}", self.what(), status_text(status), error_detail(&body)));
            return Err(status_failure(status, "model_error", message, retry_after));
        }

        let is_sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            self.read_stream(response, events).await
        } else {
            self.read_whole(response, events).await
        }
    }

    /// Reads an SSE answer of `chat.completion.chunk` frames.
    async fn read_stream(&self, response: reqwest::Response, events: &Events) -> Result<Answer, AgentFailure> {
        let mut state = StreamState::default();
        let mut buffer: Vec<u8> = Vec::new();
        // How much of `buffer` is known to hold no `\n`: each byte is looked at once.
        let mut scanned = 0;
        let mut data = String::new();
        let mut bytes = response.bytes_stream();

        loop {
            let next = tokio::time::timeout(STREAM_IDLE_TIMEOUT, bytes.next()).await.map_err(|_| {
                AgentFailure::new(
                    "unreachable",
                    format!("{} went silent for {} s mid-answer", self.what(), STREAM_IDLE_TIMEOUT.as_secs()),
                    true,
                )
            })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| transport_failure(&e, &self.what()))?;
            buffer.extend_from_slice(&chunk);

            // Whole lines only: a UTF-8 character never contains the byte `\n`.
            while let Some(pos) = buffer[scanned..].iter().position(|&b| b == b'\n').map(|p| p + scanned) {
                scanned = 0;
                let line: Vec<u8> = buffer.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if !data.is_empty() {
                        self.on_data(&mut state, &std::mem::take(&mut data), events)?;
                    }
                } else if let Some(value) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    if data.len() > MAX_SSE_LINE_BYTES {
                        return Err(self.too_large(format!("an event of over {MAX_SSE_LINE_BYTES} bytes")));
                    }
                }
                // `event:`, `id:`, `retry:` and `:` comment lines carry nothing for us.
            }
            scanned = buffer.len();
            if buffer.len() > MAX_SSE_LINE_BYTES {
                return Err(self.too_large(format!("a line of over {MAX_SSE_LINE_BYTES} bytes")));
            }
            if state.done {
                break;
            }
        }
        if !state.done && !data.is_empty() {
            self.on_data(&mut state, &data, events)?;
        }
        if !state.done && !state.finished {
            return Err(AgentFailure::new(
                "model_error",
                format!("{} ended its answer stream before finishing", self.what()),
                true,
            ));
        }
        Ok(state.into_answer())
    }

    /// The failure for an answer beyond our bounds: not retryable (the same
    /// request would most likely get the same answer).
    fn too_large(&self, what: String) -> AgentFailure {
        AgentFailure::new("model_error", format!("{} sent {what}; the answer is refused", self.what()), false)
    }

    /// Applies one `data:` payload of the stream.
    fn on_data(&self, state: &mut StreamState, data: &str, events: &Events) -> Result<(), AgentFailure> {
        if data.trim() == "[DONE]" {
            state.done = true;
            return Ok(());
        }
        let chunk: StreamChunk = serde_json::from_str(data).map_err(|e| {
            AgentFailure::new("model_error", format!("{} sent an unreadable stream chunk: {e}", self.what()), true)
        })?;
        if let Some(error) = chunk.error {
            let detail = error_detail(&json!({ "error": error }).to_string());
            return Err(AgentFailure::new(
                "model_error",
                self.redact(format!("{} reported an error mid-answer{detail}", self.what())),
                true,
            ));
        }
        for choice in chunk.choices.unwrap_or_default() {
            if choice.finish_reason.is_some() {
                state.finished = true;
            }
            let Some(delta) = choice.delta else { continue };
            if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                state.grow(text.len()).map_err(|what| self.too_large(what))?;
                state.content.push_str(&text);
                let _ = events.send(AgentEvent::Content(text));
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let index = call.index.unwrap_or(state.calls.len());
                if index >= MAX_TOOL_CALLS {
                    return Err(self.too_large(format!(
                        "tool call index {index}; at most {MAX_TOOL_CALLS} tool calls per answer are accepted"
                    )));
                }
                if state.calls.len() <= index {
                    state.calls.resize_with(index + 1, ToolCall::default);
                }
                let id = call.id.filter(|id| !id.is_empty());
                let function = call.function.unwrap_or_default();
                let grown = id.as_ref().map_or(0, String::len)
                    + function.name.as_ref().map_or(0, String::len)
                    + function.arguments.as_ref().map_or(0, String::len);
                state.grow(grown).map_err(|what| self.too_large(what))?;
                let slot = &mut state.calls[index];
                if let Some(id) = id {
                    slot.id = id;
                }
                if let Some(name) = function.name {
                    slot.name.push_str(&name);
                }
                if let Some(arguments) = function.arguments {
                    slot.arguments.push_str(&arguments);
                }
            }
        }
        Ok(())
    }

    /// Reads a non-streamed `chat.completion` object.
    async fn read_whole(&self, response: reqwest::Response, events: &Events) -> Result<Answer, AgentFailure> {
        let (body, _) =
            read_limited(response, MAX_ANSWER_BYTES).await.map_err(|e| transport_failure(&e, &self.what()))?;
        let completion: Completion = serde_json::from_str(&body).map_err(|e| {
            AgentFailure::new("model_error", format!("{} sent an unreadable answer: {e}", self.what()), true)
        })?;
        let message = completion.choices.unwrap_or_default().into_iter().next().and_then(|c| c.message);
        let Some(message) = message else {
            return Err(AgentFailure::new(
                "model_error",
                format!("{} sent an answer without a message", self.what()),
                true,
            ));
        };
        let content = message.content.unwrap_or_default();
        if !content.is_empty() {
            let _ = events.send(AgentEvent::Content(content.clone()));
        }
        let tool_calls = message.tool_calls.unwrap_or_default();
        if tool_calls.len() > MAX_TOOL_CALLS {
            return Err(self.too_large(format!(
                "{} tool calls; at most {MAX_TOOL_CALLS} per answer are accepted",
                tool_calls.len()
            )));
        }
        let tool_calls = tool_calls
            .into_iter()
            .map(|c| {
                let function = c.function.unwrap_or_default();
                ToolCall {
                    id: c.id.unwrap_or_default(),
                    name: function.name.unwrap_or_default(),
                    arguments: function.arguments.unwrap_or_default(),
                }
            })
            .collect();
        let mut state = StreamState { content, calls: tool_calls, ..StreamState::default() };
        state.finished = true;
        Ok(state.into_answer())
    }
}

/// What a streamed answer has said so far.
#[derive(Default)]
struct StreamState {
    content: String,
    calls: Vec<ToolCall>,
    /// A choice carried a `finish_reason`.
    finished: bool,
    /// `data: [DONE]` arrived.
    done: bool,
    /// Bytes of text held so far (content, names, arguments).
    size: usize,
}

impl StreamState {
    /// Counts `more` bytes of text, refusing past [`MAX_ANSWER_TEXT_BYTES`].
    fn grow(&mut self, more: usize) -> Result<(), String> {
        self.size = self.size.saturating_add(more);
        if self.size > MAX_ANSWER_TEXT_BYTES {
            return Err(format!("over {MAX_ANSWER_TEXT_BYTES} bytes of text"));
        }
        Ok(())
    }

    fn into_answer(self) -> Answer {
        let tool_calls = self
            .calls
            .into_iter()
            .enumerate()
            .filter(|(_, c)| !(c.name.is_empty() && c.arguments.is_empty() && c.id.is_empty()))
            .map(|(i, mut c)| {
                if c.id.is_empty() {
                    c.id = format!("call_{i}");
                }
                c
            })
            .collect();
        Answer { content: self.content, tool_calls }
    }
}

#[derive(Deserialize)]
struct StreamChunk {
    choices: Option<Vec<StreamChoice>>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    index: Option<usize>,
    id: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Deserialize, Default)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct Completion {
    choices: Option<Vec<CompletionChoice>>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    message: Option<CompletionMessage>,
}

#[derive(Deserialize)]
struct CompletionMessage {
    content: Option<String>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

// ---- tools ----

/// Runs one tool call; failures become an `error: ...` result for the model.
async fn run_tool(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::Turn;
    use crate::testing::{formation_with_agents, llm_agent, FakeLlm, Reply};
    use axum::routing::post;
    use axum::{Json, Router};

    fn request(message: &str) -> AgentRequest {
        AgentRequest {
            request_id: "req_1".into(),
            formation_id: "test".into(),
            agent_id: "main".into(),
            user_id: "u".into(),
            session_id: Some("sess_1".into()),
            message: message.into(),
            attempt: 1,
            history: Vec::new(),
        }
    }

    fn with_tools(mut spec: AgentSpec, new_tools: Vec<ToolSpec>, rounds: u32) -> AgentSpec {
        if let AgentKind::Llm { tools, max_tool_rounds, .. } = &mut spec.kind {
            *tools = new_tools;
            *max_tool_rounds = rounds;
        }
        spec
    }

    fn with_key(mut spec: AgentSpec, key: &str) -> AgentSpec {
        if let AgentKind::Llm { api_key, .. } = &mut spec.kind {
            *api_key = Some(key.to_string());
        }
        spec
    }

    /// Runs the first agent of `formation` and collects its events.
    async fn run_first(
        formation: &Formation,
        request: AgentRequest,
    ) -> (Result<AgentOutput, AgentFailure>, Vec<AgentEvent>) {
        let (tx, recorded) = Events::recorder();
        let out = crate::agents::run(&AgentContext::new(), formation, &formation.agents[0], request, tx).await;
        let events = recorded.lock().unwrap().clone();
        (out, events)
    }

    fn contents(events: &[AgentEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Content(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn progress(events: &[AgentEvent]) -> Vec<ProgressUpdate> {
        events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Progress(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// A tool server answering `POST /search` with `result for <q>`.
    async fn tool_server() -> String {
        let app = Router::new().route(
            "/search",
            post(|Json(args): Json<Value>| async move { format!("result for {}", args["q"].as_str().unwrap_or("?")) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/search")
    }

    /// A URL nothing answers at, and the socket that keeps it so.
    fn closed_port_url() -> (tokio::net::TcpSocket, String) {
        let (held, addr) = crate::testing::closed_port();
        (held, format!("http://{addr}/v1"))
    }

    #[test]
    fn agent_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let ctx = AgentContext::new();
        let formation = formation_with_agents(vec![llm_agent("main", "http://127.0.0.1:1/v1")]);
        let (tx, _) = Events::channel();
        let fut = crate::agents::run(&ctx, &formation, &formation.agents[0], request("x"), tx);
        assert_send(&fut);
    }

    #[tokio::test]
    async fn plain_answer_streams_content_in_order() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::text("Hello there, dear world"));
        let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
        let (out, events) = run_first(&formation, request("hi")).await;
        let out = out.expect("answer");
        assert_eq!(out.text, "Hello there, dear world");
        assert!(out.artifacts.is_empty());
        let pieces = contents(&events);
        assert_eq!(pieces, vec!["Hello ", "there, ", "dear ", "world"]);
        let body = &llm.requests()[0];
        assert_eq!(body["model"], "fake-model");
        assert_eq!(body["stream"], true);
        assert!(body.get("tools").is_none());
        assert_eq!(llm.authorizations(), vec![None]);
        let steps = progress(&events);
        assert_eq!(steps.first().and_then(|p| p.step.clone()).as_deref(), Some("Calling model (round 1)"));
        assert_eq!(steps.last().and_then(|p| p.progress), Some(100.0));
    }

    #[tokio::test]
    async fn prompt_has_system_message_history_and_message() {
        let llm = FakeLlm::start().await;
        let mut spec = with_key(llm_agent("main", &llm.base_url()), "sk-test-secret");
        spec.system_message = Some("You are terse.".into());
        let formation = formation_with_agents(vec![spec]);
        let mut req = request("and now?");
        req.history = vec![
            Turn { role: "user".into(), content: "first question".into() },
            Turn { role: "assistant".into(), content: "first answer".into() },
        ];
        let (out, _) = run_first(&formation, req).await;
        assert_eq!(out.expect("echo").text, "and now?");
        assert_eq!(
            llm.requests()[0]["messages"],
            json!([
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "and now?"},
            ])
        );
        assert_eq!(llm.authorizations(), vec![Some("Bearer sk-test-secret".to_string())]);
    }

    #[tokio::test]
    async fn http_tool_loop() {
        let llm = FakeLlm::start().await;
        let tool_url = tool_server().await;
        llm.push(Reply::tool_call("search", json!({"q": "rust async"})));
        llm.push(Reply::text("Rust async is great."));
        let tool = ToolSpec::Http {
            name: "search".into(),
            description: "Search the web".into(),
            url: tool_url,
            parameters: json!({"type": "object", "properties": {"q": {"type": "string"}}}),
        };
        let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 3)]);
        let (out, events) = run_first(&formation, request("tell me about rust async")).await;
        assert_eq!(out.expect("answer").text, "Rust async is great.");

        let requests = llm.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0]["tools"][0]["function"]["name"], "search");
        assert_eq!(requests[0]["tools"][0]["type"], "function");
        let messages = requests[1]["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 3);
        let call = &messages[1]["tool_calls"][0];
        assert_eq!(messages[1]["role"], "assistant");
        assert_eq!(call["id"], "call_search");
        assert_eq!(call["function"]["name"], "search");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("args")).expect("json");
        assert_eq!(args, json!({"q": "rust async"}));
        assert_eq!(
            messages[2],
            json!({"role": "tool", "tool_call_id": "call_search", "content": "result for rust async"})
        );

        let steps = progress(&events);
        let names: Vec<_> = steps.iter().filter_map(|p| p.step.clone()).collect();
        assert_eq!(names, vec!["Calling model (round 1)", "Running tool search", "Calling model (round 2)"]);
        let completed: Vec<_> = steps.iter().filter_map(|p| p.completed_steps).collect();
        assert_eq!(completed, vec![0, 1, 2, 3]);
        let pct: Vec<f64> = steps.iter().filter_map(|p| p.progress).collect();
        assert!(pct.windows(2).all(|w| w[0] < w[1]), "{pct:?}");
        assert!(pct[..pct.len() - 1].iter().all(|p| *p < 100.0));
        assert_eq!(steps[1].total_steps, Some(2));
    }

    #[tokio::test]
    async fn agent_tool_calls_another_agent() {
        let llm = FakeLlm::start().await;
        let tool = ToolSpec::Agent {
            name: "ask_helper".into(),
            description: "Ask the helper".into(),
            agent_id: "helper".into(),
        };
        let mut helper = llm_agent("helper", &llm.base_url());
        helper.system_message = Some("You help.".into());
        let formation =
            formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 2), helper]);
        llm.push(Reply::tool_call("ask_helper", json!({"message": "what is 2+2?"})));
        llm.push(Reply::text("four"));
        llm.push(Reply::text("The helper says four."));
        let (out, events) = run_first(&formation, request("ask the helper")).await;
        assert_eq!(out.expect("answer").text, "The helper says four.");

        let requests = llm.requests();
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0]["tools"][0]["function"]["parameters"]["required"], json!(["message"]));
        assert_eq!(
            requests[1]["messages"],
            json!([{"role": "system", "content": "You help."}, {"role": "user", "content": "what is 2+2?"}])
        );
        let last = requests[2]["messages"].as_array().and_then(|m| m.last().cloned()).expect("tool message");
        assert_eq!(last, json!({"role": "tool", "tool_call_id": "call_ask_helper", "content": "four"}));
        // The helper's own content is not forwarded to the outer stream.
        assert_eq!(contents(&events).concat(), "The helper says four.");
        let names: Vec<_> = progress(&events).iter().filter_map(|p| p.step.clone()).collect();
        assert_eq!(names, vec!["Calling model (round 1)", "Running tool ask_helper", "Calling model (round 2)"]);
    }

    #[tokio::test]
    async fn agent_tools_stop_at_max_depth() {
        let llm = FakeLlm::start().await;
        let tool = ToolSpec::Agent { name: "me".into(), description: "Myself".into(), agent_id: "main".into() };
        let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 1)]);
        for _ in 0..=MAX_AGENT_DEPTH {
            llm.push(Reply::tool_call("me", json!({"message": "deeper"})));
        }
        let (out, _) = run_first(&formation, request("recurse")).await;
        // The innermost call got an error result and answered with the default echo.
        assert!(out.is_ok(), "{out:?}");
        let requests = llm.requests();
        let innermost = &requests[MAX_AGENT_DEPTH as usize + 1]["messages"];
        let result = innermost.as_array().and_then(|m| m.last()).expect("tool message");
        assert!(result["content"].as_str().unwrap_or("").starts_with("error: agent calls nest"), "{result}");
    }

    #[tokio::test]
    async fn too_many_tool_rounds_fails_and_tool_errors_go_to_the_model() {
        let llm = FakeLlm::start().await;
        let (_held, url) = closed_port_url();
        let tool = ToolSpec::Http { name: "search".into(), description: "Search".into(), url, parameters: Value::Null };
        let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 1)]);
        llm.push(Reply::tool_call("search", json!({"q": "a"})));
        llm.push(Reply::tool_call("search", json!({"q": "b"})));
        let (out, _) = run_first(&formation, request("loop")).await;
        let err = out.expect_err("too many rounds");
        assert_eq!(err.kind, "tool_rounds_exceeded");
        assert!(!err.retryable);
        assert!(err.message.contains("max_tool_rounds"), "{}", err.message);

        let requests = llm.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0]["tools"][0]["function"]["parameters"], json!({"type": "object", "properties": {}}));
        let tool_result = &requests[1]["messages"][2]["content"];
        assert!(tool_result.as_str().unwrap_or("").starts_with("error: could not reach tool search"), "{tool_result}");
    }

    #[tokio::test]
    async fn rate_limit_is_retryable_with_retry_after() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::error_retry_after(429, "Slow down", "7"));
        let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
        let err = run_first(&formation, request("x")).await.0.expect_err("429");
        assert_eq!(err.kind, "rate_limited");
        assert!(err.retryable);
        assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
        assert!(err.message.contains("Slow down"), "{}", err.message);
    }

    #[tokio::test]
    async fn server_error_is_retryable() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::error(500, "internal oops"));
        let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
        let err = run_first(&formation, request("x")).await.0.expect_err("500");
        assert_eq!(err.kind, "model_error");
        assert!(err.retryable);
        assert_eq!(err.retry_after, None);
        assert!(err.message.contains("500"), "{}", err.message);
    }

    #[tokio::test]
    async fn client_error_is_final_with_provider_message_and_no_key() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::error(400, "Invalid model 'fake-model' for key sk-test-secret"));
        let formation = formation_with_agents(vec![with_key(llm_agent("main", &llm.base_url()), "sk-test-secret")]);
        let err = run_first(&formation, request("x")).await.0.expect_err("400");
        assert_eq!(err.kind, "model_error");
        assert!(!err.retryable);
        assert!(err.message.contains("400"), "{}", err.message);
        assert!(err.message.contains("Invalid model 'fake-model'"), "{}", err.message);
        assert!(!err.message.contains("sk-test-secret"), "{}", err.message);
    }

    #[tokio::test]
    async fn unreachable_api_is_retryable_and_names_the_host() {
        let (_held, base) = closed_port_url();
        let formation = formation_with_agents(vec![with_key(llm_agent("main", &base), "sk-test-secret")]);
        let err = run_first(&formation, request("x")).await.0.expect_err("refused");
        assert_eq!(err.kind, "unreachable");
        assert!(err.retryable);
        assert!(err.message.contains(&host_of(&base)), "{}", err.message);
        assert!(!err.message.contains("sk-test-secret"));
    }

    #[tokio::test]
    async fn dropping_the_future_mid_stream_closes_the_call() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::Hang { partial: "Thinking".into() });
        let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
        let ctx = AgentContext::new();
        let (tx, mut rx) = Events::channel();
        {
            let work = crate::agents::run(&ctx, &formation, &formation.agents[0], request("x"), tx);
            tokio::pin!(work);
            // Run the work until the first content arrives, then drop it.
            let first = tokio::select! {
                _ = &mut work => panic!("a hanging stream cannot finish"),
                content = async {
                    loop {
                        let pending = rx.recv().await;
                        if !pending.text.is_empty() {
                            return Some(pending.text.concat());
                        }
                    }
                } => content,
            };
            assert_eq!(first.as_deref(), Some("Thinking"));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while llm.abandoned_streams() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the fake never saw the connection close");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn non_streamed_answer_is_understood() {
        // A provider that ignores `stream: true` and answers with one JSON object.
        let app = Router::new().route(
            "/v1/chat/completions",
            post(|| async {
                Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"},
                                         "finish_reason": "stop"}]}))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let formation = formation_with_agents(vec![llm_agent("main", &format!("http://{addr}/v1/"))]);
        let (out, events) = run_first(&formation, request("x")).await;
        assert_eq!(out.expect("answer").text, "whole");
        assert_eq!(contents(&events), vec!["whole"]);
    }

    #[test]
    fn streamed_tool_call_deltas_are_assembled() {
        let ctx = AgentContext::new();
        let client = ModelClient::new(&ctx, "http://127.0.0.1:1/v1", "openai/x", None);
        let (tx, _) = Events::channel();
        let mut state = StreamState::default();
        let frames = [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{\"x\""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"g","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ];
        for frame in frames {
            client.on_data(&mut state, frame, &tx).expect("frame");
        }
        let answer = state.into_answer();
        let calls: Vec<_> =
            answer.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect();
        assert_eq!(calls, vec![("a", "f", r#"{"x":1}"#), ("b", "g", "{}")]);
    }

    #[test]
    fn a_huge_tool_call_index_fails_without_allocating() {
        let ctx = AgentContext::new();
        let client = ModelClient::new(&ctx, "http://127.0.0.1:1/v1", "openai/x", None);
        let (tx, _) = Events::channel();
        let mut state = StreamState::default();
        for index in [MAX_TOOL_CALLS, 1_000_000_000_000] {
            let frame = format!(r#"{{"choices":[{{"delta":{{"tool_calls":[{{"index":{index},"id":"a"}}]}}}}]}}"#);
            let failure = client.on_data(&mut state, &frame, &tx).expect_err("refused");
            assert!(!failure.retryable);
            assert!(failure.message.contains("tool call index"), "{}", failure.message);
        }
        assert!(state.calls.is_empty());
        let last = MAX_TOOL_CALLS - 1;
        let frame = format!(r#"{{"choices":[{{"delta":{{"tool_calls":[{{"index":{last},"id":"a"}}]}}}}]}}"#);
        client.on_data(&mut state, &frame, &tx).expect("the last allowed index");
    }

    #[test]
    fn streamed_text_is_bounded() {
        let ctx = AgentContext::new();
        let client = ModelClient::new(&ctx, "http://127.0.0.1:1/v1", "openai/x", None);
        let (tx, _rx) = Events::channel();
        let mut state = StreamState { size: MAX_ANSWER_TEXT_BYTES - 2, ..StreamState::default() };
        let args = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"abc"}}]}}]}"#;
        assert!(!client.on_data(&mut state, args, &tx).expect_err("refused").retryable);
        let mut state = StreamState { size: MAX_ANSWER_TEXT_BYTES - 2, ..StreamState::default() };
        let text = r#"{"choices":[{"delta":{"content":"abc"}}]}"#;
        assert!(!client.on_data(&mut state, text, &tx).expect_err("refused").retryable);
    }

    #[tokio::test]
    async fn an_endless_stream_line_is_refused() {
        let llm = FakeLlm::start().await;
        llm.push(Reply::RawSse(vec!["x".repeat(MAX_SSE_LINE_BYTES + 1)]));
        let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
        let (out, _) = run_first(&formation, request("x")).await;
        let failure = out.expect_err("refused");
        assert!(!failure.retryable);
        assert!(
            failure.message.contains("a line of over") || failure.message.contains("an event of over"),
            "{}",
            failure.message
        );
    }
}
