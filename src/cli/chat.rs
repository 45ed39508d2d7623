//! `muxi-rt chat FORMATION "message"`: sends a message; a quick answer is
//! printed at once, long work is followed with a progress bar to its end.
//! `--async` answers with the request id at once (`--wait` follows it anyway).

use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::Client;
use super::follow::{follow, print_final, Interrupt};
use super::progress::{spinner, Display};
use super::{CliResult, Connection, Outcome};

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The formation id.
    pub formation: String,
    /// The message.
    pub message: String,
    /// The agent to run (default: the formation's default agent).
    #[arg(long)]
    pub agent: Option<String>,
    /// Run in the background: print the request id at once.
    #[arg(long = "async")]
    pub async_: bool,
    /// With --async, follow the request to its end anyway.
    #[arg(long)]
    pub wait: bool,
    /// Continue this session (default: a new one).
    #[arg(long)]
    pub session: Option<String>,
}

pub async fn run(args: ChatArgs) -> CliResult<Outcome> {
    let conn = args.conn.clone();
    let client = Client::new(&conn, &args.formation)?;
    let mut body = json!({ "message": args.message });
    if let Some(agent) = &args.agent {
        body["agent_id"] = json!(agent);
    }
    if let Some(session) = &args.session {
        body["session_id"] = json!(session);
    }
    if args.async_ {
        body["async"] = json!(true);
    }
    let waiting = spinner(conn.json, &format!("{} is working on it", args.formation));
    let answer = client.call(Method::POST, "/chat", Some(&body)).await;
    if let Some(waiting) = waiting {
        waiting.finish_and_clear();
    }
    let answer = match answer {
        Ok(answer) => answer,
        // The request ran and failed: that is the request's outcome, not the command's.
        Err(e) if matches!(e.code.as_deref(), Some("request_failed" | "request_timeout" | "request_cancelled")) => {
            eprintln!("{e}");
            return Ok(Outcome::RequestFailed);
        }
        Err(e) => return Err(e),
    };
    if answer.status == 200 {
        return Ok(print_answer(&answer.data, conn.json));
    }
    let id = answer.data["request_id"].as_str().unwrap_or_default().to_string();
    if args.async_ && !args.wait {
        if conn.json {
            println!("{}", answer.data);
        } else {
            println!("{id}");
            eprintln!(
                "Accepted (estimated {}). Follow it with: muxi-rt requests follow {} {id}",
                answer.data["estimated_time"].as_str().unwrap_or("?"),
                args.formation
            );
        }
        return Ok(Outcome::Done);
    }
    let interrupt = Interrupt::listen()?;
    let mut display = Display::new(conn.json);
    display.note(&format!(
        "{id} is running in the background (estimated {})",
        answer.data["estimated_time"].as_str().unwrap_or("?")
    ));
    follow(&client, &id, interrupt, &mut display, conn.json).await
}

/// A synchronous answer: the reply text, or the document with `--json`.
fn print_answer(data: &Value, json: bool) -> Outcome {
    if data["status"].as_str().is_some_and(|s| s != "completed") {
        return print_final(data, json);
    }
    if json {
        println!("{data}");
    } else {
        println!("{}", data["message"]["content"].as_str().unwrap_or(""));
    }
    Outcome::Done
}
