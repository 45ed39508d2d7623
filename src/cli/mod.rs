//! The command-line client in the `muxi-rt` binary, for people at a terminal:
//! `chat`, `requests list|show|follow|cancel` and `trigger`, against a running
//! server. Output for people by default (a live progress bar when stdout is a
//! terminal, plain lines otherwise), `--json` for scripts.
//!
//! Exit status: 0 done, 1 the request failed or was cancelled, 2 the command
//! could not do its job (bad arguments, no key, server unreachable, an error answer).

pub mod chat;
pub mod client;
pub mod connect;
pub mod follow;
pub mod progress;
pub mod requests;
pub mod sse;
pub mod trigger;

use std::process::ExitCode;

pub use connect::Connection;

/// Why a command stopped early; printed as `error: ...` with exit status 2.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    /// The server's error code, when the server answered with an error.
    pub code: Option<String>,
}

#[allow(non_snake_case)]
pub fn CliError(message: impl Into<String>) -> CliError {
    CliError { message: message.into(), code: None }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The request failed or was cancelled.
    RequestFailed,
}

/// Runs a client command on a fresh runtime and maps its end to an exit status.
pub fn run<F>(command: F) -> ExitCode
where
    F: std::future::Future<Output = CliResult<Outcome>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(command) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::RequestFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
