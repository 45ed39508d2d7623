//! `muxi-rt requests list|show|follow|cancel FORMATION [ID]`: the user's
//! requests, as a table for people or JSON for scripts.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use super::client::Client;
use super::follow::{follow, print_final, Interrupt};
use super::progress::Display;
use super::{CliError, CliResult, Connection, Outcome};

#[derive(Debug, Args)]
pub struct RequestsArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Your requests, newest first.
    List {
        formation: String,
        /// Only requests with this status (pending, processing, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1-500).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
    },
    /// One request's status (exit 1 when it failed or was cancelled).
    Show { formation: String, request_id: String },
    /// Follow a request to its end with a progress bar, then print its result.
    Follow { formation: String, request_id: String },
    /// Cancel a pending or running request.
    Cancel { formation: String, request_id: String },
}

pub async fn run(args: RequestsArgs) -> CliResult<Outcome> {
    let conn = args.conn.clone();
    match args.action {
        Action::List { formation, status, limit } => {
            let client = Client::new(&conn, &formation)?;
            let mut path = format!("/requests?limit={limit}");
            if let Some(status) = status {
                if !status.chars().all(|c| c.is_ascii_alphabetic()) {
                    return Err(CliError(format!("`{status}` is not a status")));
                }
                path.push_str(&format!("&status={status}"));
            }
            let data = client.get(&path).await?;
            let requests = data["requests"].as_array().cloned().unwrap_or_default();
            if conn.json {
                println!("{}", Value::Array(requests));
            } else {
                print_table(&requests);
            }
            Ok(Outcome::Done)
        }
        Action::Show { formation, request_id } => {
            let client = Client::new(&conn, &formation)?;
            let status = client.get(&format!("/requests/{}", checked(&request_id)?)).await?;
            if conn.json {
                println!("{status}");
            } else {
                print_status(&status);
            }
            Ok(match status["status"].as_str() {
                Some("failed" | "cancelled") => Outcome::RequestFailed,
                _ => Outcome::Done,
            })
        }
        Action::Follow { formation, request_id } => {
            let client = Client::new(&conn, &formation)?;
            let id = checked(&request_id)?;
            let status = client.get(&format!("/requests/{id}")).await?;
            if matches!(status["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                return Ok(print_final(&status, conn.json));
            }
            let interrupt = Interrupt::listen()?;
            let mut display = Display::new(conn.json);
            follow(&client, id, interrupt, &mut display, conn.json).await
        }
        Action::Cancel { formation, request_id } => {
            let client = Client::new(&conn, &formation)?;
            let id = checked(&request_id)?;
            let answer = client.call(Method::DELETE, &format!("/requests/{id}"), None).await?;
            if conn.json {
                println!("{}", answer.data);
            } else {
                println!("Cancelled {id}.");
            }
            Ok(Outcome::Done)
        }
    }
}

/// A request id is safe to put in a path.
fn checked(id: &str) -> CliResult<&str> {
    let ok = !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    if ok {
        Ok(id)
    } else {
        Err(CliError(format!("`{id}` is not a request id")))
    }
}

fn print_table(requests: &[Value]) {
    if requests.is_empty() {
        eprintln!("no requests");
        return;
    }
    println!("{:<40} {:<10} {:>4}  {:<12} {:<24} STEP", "REQUEST", "STATUS", "%", "AGENT", "CREATED");
    for r in requests {
        let step: String =
            r["current_step"].as_str().or(r["message"].as_str()).unwrap_or("").chars().take(40).collect();
        println!(
            "{:<40} {:<10} {:>4}  {:<12} {:<24} {}",
            r["request_id"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["progress"].as_f64().unwrap_or(0.0).round(),
            r["agent_id"].as_str().unwrap_or(""),
            r["created_at"].as_str().unwrap_or(""),
            step.replace('\n', " "),
        );
    }
}

fn print_status(s: &Value) {
    let field = |name: &str| match &s[name] {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    };
    for (label, name) in [
        ("request", "request_id"),
        ("status", "status"),
        ("progress", "progress"),
        ("step", "current_step"),
        ("agent", "agent_id"),
        ("session", "session_id"),
        ("attempts", "attempts"),
        ("created", "created_at"),
        ("completed", "completed_at"),
    ] {
        if let Some(value) = field(name) {
            println!("{label:<10} {value}");
        }
    }
    if let Some(text) = s["result"]["text"].as_str() {
        println!("result     {text}");
    }
    if let Some(message) = s["error"]["message"].as_str() {
        println!("error      {message}");
    }
}
