//! The `command` agent kind: a program run once per attempt.
//!
//! # Protocol
//!
//! The program is started with the formation's folder as working directory, the
//! agent's extra `env`, and in a process group of its own. It receives the
//! [`AgentRequest`] as one JSON document on stdin (`message`, `request_id`,
//! `formation_id`, `agent_id`, `user_id`, `session_id`, `attempt`, `history`),
//! after which stdin is closed.
//!
//! stdout is read line by line. A line holding a JSON object with one of the keys
//! below is a protocol message; one line may carry several of them:
//!
//! | Line | Effect |
//! |------|--------|
//! | `{"progress": 40, "step": "...", "total_steps": 5, "completed_steps": 2, "message": "..."}` | [`AgentEvent::Progress`] (any of the first four keys marks a progress line; `current_step` is accepted for `step`) |
//! | `{"content": "partial text"}` | [`AgentEvent::Content`], appended to the collected text |
//! | `{"result": "text", "artifacts": [...]}` | the final output; the last such line wins |
//! | `{"error": "msg", "retryable": true, "type": "tool_error", "retry_after": 5}` | an explicit failure (only `error` is required; it may also be an object with `message`, `type`, `retryable`); it wins over any result and over the exit status |
//!
//! **Every other line** (not JSON, JSON that is not an object, or an object with
//! none of those keys) is plain text: it is sent as [`AgentEvent::Content`] and
//! appended to the collected text with its newline. So a program that just prints
//! its answer works unchanged: when it exits 0 without a `result` line, the
//! result is the collected text, trimmed.
//!
//! # Outcome
//!
//! - Exit 0: the `result` line, else the collected text.
//! - Exit code N: `agent_error` "command exited with status N: <stderr tail>",
//!   retryable iff N is in `retryable_exit_codes`. The last 8 KiB of stderr are kept.
//! - Killed by a signal: `agent_error`, not retryable, naming the signal.
//! - Not startable (program not found, not executable): `agent_error`, not
//!   retryable, naming the program.
//! - A stdout line over 1 MiB, or more than 8 MiB of collected text: `agent_error`,
//!   not retryable, and the program is killed.
//!
//! # Process lifetime
//!
//! A guard owns the process group. When the returned future is dropped (cancel,
//! timeout) the guard sends SIGKILL to the whole group, so children and
//! grandchildren die with the program; the program itself is reaped by tokio
//! (`kill_on_drop`). When the program exits on its own, whatever it left running in
//! its group is killed as well; output already written to the pipes is still read.
//! Should the server die without dropping the future, [`super::lifetime`] sees to
//! the program (PDEATHSIG) and its group (a record swept at the next start).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};

use super::{AgentEvent, AgentFailure, AgentOutput, AgentRequest, Events, ProgressUpdate};
use crate::formation::{AgentKind, AgentSpec, Formation};

/// Longest stdout line accepted.
const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Most text collected from `content` and plain lines.
const MAX_TEXT_BYTES: usize = 8 * 1024 * 1024;
/// How much of the end of stderr is kept for the failure message.
const STDERR_TAIL_BYTES: usize = 8 * 1024;
/// After the program exits, how long to wait for its pipes to close. Only a
/// descendant that left the process group (`setsid`) can hold them open longer.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

const KIND: &str = "agent_error";

/// Runs one attempt of a `command` agent. See the module doc for the protocol.
pub async fn run(
    formation: &Formation,
    spec: &AgentSpec,
    request: AgentRequest,
    events: Events,
) -> Result<AgentOutput, AgentFailure> {
    let AgentKind::Command { argv, retryable_exit_codes, env } = &spec.kind else {
        return Err(failure(format!("agent `{}` is not a command agent", spec.id)));
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(failure(format!("agent `{}` has an empty command", spec.id)));
    };
    let payload = serde_json::to_vec(&request)
        .map_err(|e| failure(format!("could not encode the request for the command: {e}")))?;

    let mut child = spawn(program, args, formation, env).await?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| failure(format!("command `{program}` exited before it could be tracked")))?;
    // `process_group(0)`: the program leads its own group, so pgid == pid.
    let record = super::lifetime::Record::create(pgid, pgid);
    let mut group = ProcessGroup { pgid, armed: true, _record: record };

    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(failure("command pipes were not set up"));
    };

    let mut collected = Collected::default();
    let mut tail = StderrTail::default();
    let status = {
        // Ends when every pipe is closed, or at once when stdout breaks a limit.
        let pipes = async {
            tokio::try_join!(
                async {
                    write_stdin(stdin, &payload).await;
                    Ok(())
                },
                read_stdout(stdout, &events, &mut collected),
                async {
                    read_tail(stderr, &mut tail).await;
                    Ok(())
                },
            )
            .map(|_| ())
        };
        tokio::pin!(pipes);
        tokio::select! {
            out = &mut pipes => {
                // All output read; the program closed its pipes (usually by exiting).
                out?;
                let status = child.wait().await;
                group.kill();
                status
            }
            status = child.wait() => {
                group.kill();
                match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut pipes).await {
                    Ok(out) => out?,
                    Err(_) => tracing::warn!(
                        program = %program,
                        "command exited but its output pipes stayed open; using the output read so far"
                    ),
                }
                status
            }
        }
    };
    let status = status.map_err(|e| failure(format!("could not wait for command `{program}`: {e}")))?;
    outcome(status, collected, &tail, retryable_exit_codes)
}

async fn spawn(
    program: &str,
    args: &[String],
    formation: &Formation,
    env: &BTreeMap<String, String>,
) -> Result<tokio::process::Child, AgentFailure> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(&formation.dir)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    super::lifetime::spawn(cmd).await.map_err(|e| {
        let dir = formation.dir.display();
        let message = match e.kind() {
            io::ErrorKind::NotFound => {
                format!("command `{program}` not found (working directory {dir})")
            }
            io::ErrorKind::PermissionDenied => {
                format!("command `{program}` is not executable (working directory {dir}): {e}")
            }
            _ => format!("could not start command `{program}` (working directory {dir}): {e}"),
        };
        failure(message)
    })
}

/// Kills the whole process group when dropped, unless already done.
struct ProcessGroup {
    pgid: i32,
    armed: bool,
    /// Dropped after the kill (fields drop after `Drop::drop`): the record goes
    /// once the group is gone.
    _record: Option<super::lifetime::Record>,
}

impl ProcessGroup {
    fn kill(&mut self) {
        if self.armed {
            self.armed = false;
            // SAFETY: killpg only sends a signal; `pgid` is the id of the group the
            // program was started in (`process_group(0)` makes it the program's pid).
            // ESRCH (group already gone) is the expected outcome after a clean exit.
            unsafe {
                libc::killpg(self.pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the request and closes stdin. A program that exits without reading
/// its stdin is fine, so write errors (a broken pipe) are ignored.
async fn write_stdin(mut stdin: ChildStdin, payload: &[u8]) {
    let written = async {
        stdin.write_all(payload).await?;
        stdin.write_all(b"\n").await?;
        stdin.shutdown().await
    }
    .await;
    if let Err(e) = written {
        tracing::debug!(error = %e, "command did not take its whole stdin");
    }
}

/// What stdout said.
#[derive(Default)]
struct Collected {
    /// `content` pieces and plain lines, in order.
    text: String,
    /// The last `result` line.
    result: Option<AgentOutput>,
    /// The first `error` line.
    error: Option<AgentFailure>,
}

impl Collected {
    fn push_text(&mut self, piece: &str, events: &Events) -> Result<(), AgentFailure> {
        if self.text.len() + piece.len() > MAX_TEXT_BYTES {
            return Err(failure(format!("command wrote more than {} MiB of text", MAX_TEXT_BYTES / (1024 * 1024))));
        }
        self.text.push_str(piece);
        // A closed receiver is fine: nobody is listening any more.
        let _ = events.send(AgentEvent::Content(piece.to_string()));
        Ok(())
    }

    /// Handles one stdout line (without its newline).
    fn line(&mut self, line: &str, events: &Events) -> Result<(), AgentFailure> {
        let object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) if is_protocol(&object) => object,
            _ => return self.push_text(&format!("{line}\n"), events),
        };
        if let Some(update) = progress_of(&object) {
            let _ = events.send(AgentEvent::Progress(update));
        }
        if let Some(content) = object.get("content") {
            self.push_text(&value_text(content), events)?;
        }
        if let Some(result) = object.get("result") {
            let artifacts = match object.get("artifacts") {
                Some(Value::Array(items)) => items.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(other) => vec![other.clone()],
            };
            self.result = Some(AgentOutput { text: value_text(result), artifacts });
        }
        if let Some(error) = object.get("error") {
            if self.error.is_none() {
                self.error = Some(explicit_failure(error, &object));
            }
        }
        Ok(())
    }
}

const PROGRESS_KEYS: [&str; 5] = ["progress", "step", "current_step", "total_steps", "completed_steps"];

fn is_protocol(object: &Map<String, Value>) -> bool {
    PROGRESS_KEYS.iter().chain(&["content", "result", "error"]).any(|key| object.contains_key(*key))
}

fn progress_of(object: &Map<String, Value>) -> Option<ProgressUpdate> {
    if !PROGRESS_KEYS.iter().any(|key| object.contains_key(*key)) {
        return None;
    }
    let count = |key: &str| object.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
    let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_string);
    Some(ProgressUpdate {
        progress: object.get("progress").and_then(Value::as_f64).filter(|p| p.is_finite()).map(|p| p.clamp(0.0, 100.0)),
        step: text("step").or_else(|| text("current_step")),
        total_steps: count("total_steps"),
        completed_steps: count("completed_steps"),
        message: text("message"),
    })
}

/// `{"error": "msg", "retryable": true, "type": "...", "retry_after": 5}`, or
/// `{"error": {"message": "msg", "type": "...", "retryable": true}}`.
fn explicit_failure(error: &Value, line: &Map<String, Value>) -> AgentFailure {
    let fields = match error {
        Value::Object(fields) => fields,
        _ => line,
    };
    let message = match error {
        Value::Object(fields) => fields.get("message").map(value_text),
        other => Some(value_text(other)),
    }
    .filter(|m| !m.is_empty())
    .unwrap_or_else(|| "command reported an error".to_string());
    let kind = fields.get("type").and_then(Value::as_str).unwrap_or(KIND);
    let retryable = fields.get("retryable").and_then(Value::as_bool).unwrap_or(false);
    let mut failure = AgentFailure::new(kind, message, retryable);
    failure.retry_after = fields
        .get("retry_after")
        .and_then(Value::as_f64)
        .and_then(|s| (!s.is_nan() && s >= 0.0).then(|| crate::time::seconds_clamped(s, crate::time::MAX_RETRY_AFTER)));
    failure
}

/// A JSON value as text: strings as they are, `null` as nothing, others as JSON.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

async fn read_stdout(stdout: ChildStdout, events: &Events, collected: &mut Collected) -> Result<(), AgentFailure> {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES).await {
            Ok(LineRead::Eof) => return Ok(()),
            Ok(LineRead::Line) => {
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                collected.line(&String::from_utf8_lossy(&buf), events)?;
            }
            Ok(LineRead::TooLong) => {
                return Err(failure(format!(
                    "command wrote a stdout line longer than {} MiB",
                    MAX_LINE_BYTES / (1024 * 1024)
                )))
            }
            Err(e) => return Err(failure(format!("could not read the command's stdout: {e}"))),
        }
    }
}

#[derive(Debug, PartialEq)]
enum LineRead {
    /// A line is in the buffer (a last line without a newline counts).
    Line,
    /// The stream ended with no more data.
    Eof,
    /// The line is longer than the limit; the buffer holds its first part.
    TooLong,
}

/// Reads up to and without the next `\n` into `buf`, never holding more than
/// `max` bytes of one line.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() { LineRead::Eof } else { LineRead::Line });
        }
        let (piece, consumed, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if buf.len() + piece.len() > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(piece);
        reader.consume(consumed);
        if complete {
            return Ok(LineRead::Line);
        }
    }
}

/// The end of stderr, bounded.
#[derive(Default)]
struct StderrTail {
    bytes: Vec<u8>,
    truncated: bool,
}

impl StderrTail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > STDERR_TAIL_BYTES {
            let excess = self.bytes.len() - STDERR_TAIL_BYTES;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        if self.truncated && !text.is_empty() {
            format!("...{text}")
        } else {
            text.to_string()
        }
    }
}

async fn read_tail<R: AsyncRead + Unpin>(mut reader: R, tail: &mut StderrTail) {
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => tail.push(&chunk[..n]),
            Err(e) => {
                tracing::debug!(error = %e, "could not read the command's stderr");
                return;
            }
        }
    }
}

fn outcome(
    status: ExitStatus,
    collected: Collected,
    stderr: &StderrTail,
    retryable_exit_codes: &[i32],
) -> Result<AgentOutput, AgentFailure> {
    if let Some(error) = collected.error {
        return Err(error);
    }
    if let Some(code) = status.code() {
        if code == 0 {
            return Ok(collected
                .result
                .unwrap_or_else(|| AgentOutput { text: collected.text.trim().to_string(), artifacts: Vec::new() }));
        }
        let stderr = stderr.text();
        let message = if stderr.is_empty() {
            format!("command exited with status {code}")
        } else {
            format!("command exited with status {code}: {stderr}")
        };
        return Err(AgentFailure::new(KIND, message, retryable_exit_codes.contains(&code)));
    }
    let message = match status.signal() {
        Some(signal) => format!("command was killed by signal {signal} ({})", signal_name(signal)),
        None => format!("command ended abnormally ({status})"),
    };
    Err(failure(message))
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "unknown signal",
    }
}

/// A non-retryable `agent_error`.
fn failure(message: impl Into<String>) -> AgentFailure {
    AgentFailure::new(KIND, message, false)
}

#[cfg(test)]
mod tests;
