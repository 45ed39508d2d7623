//! The `muxi-rt` command line: `serve`, `validate`, `schema`, and the client
//! commands `chat`, `requests`, `trigger` (see `muxi_rt::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use muxi_rt::cli;
use muxi_rt::formation::{self, Diagnostic};
use muxi_rt::server::{serve, ServeConfig};

/// mimalloc (see `muxi_rt::allocator`).
#[global_allocator]
static ALLOCATOR: muxi_rt::allocator::Mimalloc = muxi_rt::allocator::Mimalloc;

#[derive(Parser)]
#[command(name = "muxi-rt", version, about = "Runs MUXI agent formations, with durable async execution")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every formation in DIR under /api/{formation_id}/v1/..., reloading
    /// each when its file changes.
    Serve {
        /// The formations folder: DIR/<name>/formation.afs and DIR/*.afs.
        #[arg(default_value = "formations")]
        dir: PathBuf,
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, env = "MUXI_LISTEN", default_value = "127.0.0.1:7890")]
        listen: String,
        /// Where requests and generated keys are kept (SQLite).
        #[arg(long, env = "MUXI_DATA_DIR", default_value = "./.muxi")]
        data_dir: PathBuf,
        /// A host webhook URLs may target even if it resolves to a loopback or
        /// private address (local development, tests). Repeatable.
        #[arg(long = "allow-webhook-host", env = "MUXI_ALLOW_WEBHOOK_HOSTS", value_delimiter = ',')]
        allow_webhook_hosts: Vec<String>,
        /// A Host value the MCP endpoint accepts besides the listen address's
        /// (DNS rebinding protection); `*` accepts any. Repeatable.
        #[arg(long = "mcp-allowed-host", env = "MUXI_MCP_ALLOWED_HOSTS", value_delimiter = ',')]
        mcp_allowed_hosts: Vec<String>,
        /// Do not serve the web console at /console.
        #[arg(long)]
        no_console: bool,
        /// Also serve this formation at /v1/... (default: the only formation,
        /// when exactly one is loaded).
        #[arg(long, env = "MUXI_DEFAULT_FORMATION")]
        default_formation: Option<String>,
        /// Neither record metrics nor serve GET /metrics (Prometheus text format,
        /// served by default on the main listener).
        #[arg(long, env = "MUXI_NO_METRICS")]
        no_metrics: bool,
        /// A bearer token GET /metrics requires, wherever it is served
        /// (`Authorization: Bearer TOKEN`); without one /metrics is open.
        #[arg(long, env = "MUXI_METRICS_TOKEN", hide_env_values = true)]
        metrics_token: Option<String>,
        /// Serve GET /metrics on this address (e.g. 127.0.0.1:9464) instead of
        /// the main listener (the token, if set, is asked there too).
        #[arg(long, env = "MUXI_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// A rate limit per API key across the server, as RPS[:BURST]
        /// (e.g. `20:40`: 20 requests a second, 40 at once; the burst defaults
        /// to the rate rounded up). Over it: 429 rate_limited with Retry-After.
        /// Formations add their own (server.rate_limits) and a cap on unfinished
        /// requests per user (overlord.max_pending_per_user).
        #[arg(long, env = "MUXI_RATE_LIMIT", value_parser = muxi_rt::api::rate_limit::parse_rate)]
        rate_limit: Option<muxi_rt::formation::Rate>,
        /// How log lines on stderr are written: `text` (coloured only when
        /// stderr is a terminal) or `json` (one object per line). Each request's
        /// lines carry its formation, request_id and agent. MUXI_LOG sets the
        /// filter (default: info).
        #[arg(long, env = "MUXI_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: muxi_rt::observability::logs::LogFormat,
        /// A PostgreSQL database shared by several replicas
        /// (`postgres://user@host/db`) instead of SQLite in the data folder.
        #[arg(long, env = "MUXI_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
    },
    /// Check formation files or folders; prints FILE:LINE:COL: PATH: message per
    /// problem and exits 1 on any error.
    Validate {
        /// Files or folders (default: formations).
        paths: Vec<PathBuf>,
    },
    /// Print the formation JSON Schema (for editors and yaml-language-server).
    Schema,
    /// Send a message to a formation on a running server; long work shows a
    /// progress bar until it ends.
    Chat(cli::chat::ChatArgs),
    /// Your requests on a running server: list, show, follow, cancel.
    Requests(cli::requests::RequestsArgs),
    /// Fire a trigger of a formation on a running server.
    Trigger(cli::trigger::TriggerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            dir,
            listen,
            data_dir,
            allow_webhook_hosts,
            mcp_allowed_hosts,
            no_console,
            default_formation,
            no_metrics,
            metrics_token,
            metrics_listen,
            rate_limit,
            log_format,
            database_url,
        } => {
            muxi_rt::observability::logs::init(log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let allow_webhook_hosts =
                allow_webhook_hosts.into_iter().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect();
            match runtime.block_on(serve(ServeConfig {
                dir,
                listen,
                data_dir,
                allow_webhook_hosts,
                mcp_allowed_hosts,
                console: !no_console,
                default_formation,
                metrics: !no_metrics,
                metrics_token: metrics_token.filter(|t| !t.trim().is_empty()),
                metrics_listen,
                rate_limit,
                database_url,
            })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { paths } => validate(paths),
        Command::Schema => {
            println!("{}", formation::schema::SCHEMA_JSON);
            ExitCode::SUCCESS
        }
        Command::Chat(args) => cli::run(cli::chat::run(args)),
        Command::Requests(args) => cli::run(cli::requests::run(args)),
        Command::Trigger(args) => cli::run(cli::trigger::run(args)),
    }
}

fn validate(paths: Vec<PathBuf>) -> ExitCode {
    let paths = if paths.is_empty() { vec![PathBuf::from("formations")] } else { paths };
    let secrets = |name: &str| std::env::var(name).ok();
    let mut problems: Vec<Diagnostic> = Vec::new();
    let mut valid = 0;
    for path in &paths {
        if path.is_dir() {
            let report = formation::load_dir(path, &secrets);
            valid += report.formations.len();
            problems.extend(report.problems);
            problems.extend(report.formations.into_iter().flat_map(|f| f.warnings));
            problems.extend(report.failures.into_iter().flat_map(|(_, d)| d));
        } else {
            match formation::load_file(path, &secrets) {
                Ok(f) => {
                    valid += 1;
                    problems.extend(f.warnings);
                }
                Err(diagnostics) => problems.extend(diagnostics),
            }
        }
    }
    for problem in &problems {
        println!("{problem}");
    }
    let errors = problems.iter().filter(|p| p.is_error()).count();
    if errors > 0 {
        eprintln!("{errors} error(s); {valid} formation(s) valid");
        ExitCode::FAILURE
    } else {
        eprintln!("{valid} formation(s) valid");
        ExitCode::SUCCESS
    }
}
