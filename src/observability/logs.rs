//! Logging set-up for `muxi-rt serve`: human text or JSON lines on stderr
//! (`--log-format`, `MUXI_LOG_FORMAT`), filtered by `MUXI_LOG`, with ANSI
//! colour only when stderr is a terminal.
//!
//! Each request's supervised task runs inside a `request` span carrying
//! `formation`, `request_id` and `agent` (see `engine::supervisor`), so every
//! line logged for one request carries its id: one grep follows its life.
//! Keys and secrets are never logged (tests/logs.rs greps for them).

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields under `span`.
    Json,
}

/// The default filter when `MUXI_LOG` is unset.
const DEFAULT_FILTER: &str = "info,rmcp=warn";

/// Installs the global subscriber (once, at start-up).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MUXI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// The span a request's work runs in.
pub fn request_span(formation: &str, request_id: &str, agent: &str) -> tracing::Span {
    tracing::info_span!("request", formation = %formation, request_id = %request_id, agent = %agent)
}
