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

mod tools;

use std::time::Duration;

use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use serde_json::{json, Value};

use tools::{run_tool, tool_definition};

use super::http::{error_detail, host_of, read_limited, retry_after, status_failure, status_text, transport_failure};
use super::{AgentContext, AgentEvent, AgentFailure, AgentOutput, AgentRequest, Events, ProgressUpdate};
use crate::formation::{AgentKind, AgentSpec, Formation};

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

#[cfg(test)]
mod tests;
