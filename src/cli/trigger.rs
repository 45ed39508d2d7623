//! `muxi-rt trigger FORMATION NAME --data JSON`: fires a trigger. It runs in
//! the background by default; `--wait` follows it to its end.

use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::Client;
use super::follow::{follow, Interrupt};
use super::progress::Display;
use super::{CliError, CliResult, Connection, Outcome};

#[derive(Debug, Args)]
pub struct TriggerArgs {
    #[command(flatten)]
    pub conn: Connection,
    pub formation: String,
    /// The trigger's name (`triggers/NAME.md`).
    pub name: String,
    /// The data the template reads, as a JSON object.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// Follow the request to its end.
    #[arg(long)]
    pub wait: bool,
}

pub async fn run(args: TriggerArgs) -> CliResult<Outcome> {
    let conn = args.conn.clone();
    let data: Value =
        serde_json::from_str(&args.data).map_err(|e| CliError(format!("--data is not valid JSON: {e}")))?;
    if !data.is_object() {
        return Err(CliError("--data must be a JSON object"));
    }
    if args.name.is_empty() || !args.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(CliError(format!("`{}` is not a trigger name", args.name)));
    }
    let client = Client::new(&conn, &args.formation)?;
    let answer = client.call(Method::POST, &format!("/triggers/{}", args.name), Some(&json!({ "data": data }))).await?;
    let id = answer.data["request_id"].as_str().unwrap_or_default().to_string();
    if answer.status == 200 {
        if conn.json {
            println!("{}", answer.data);
        } else {
            println!("{}", answer.data["message"]["content"].as_str().unwrap_or(""));
        }
        return Ok(Outcome::Done);
    }
    if !args.wait {
        if conn.json {
            println!("{}", answer.data);
        } else {
            println!("{id}");
            eprintln!("Fired `{}`. Follow it with: muxi-rt requests follow {} {id}", args.name, args.formation);
        }
        return Ok(Outcome::Done);
    }
    let interrupt = Interrupt::listen()?;
    let mut display = Display::new(conn.json);
    follow(&client, &id, interrupt, &mut display, conn.json).await
}
