//! Follows one request to its end over its event stream
//! (`GET /requests/{id}/events`), showing progress, then prints its result.
//! Ctrl-C stops following: in a terminal it asks whether to cancel the
//! request or leave it running (and says how to follow it again).

use std::io::{BufRead, IsTerminal};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::client::Client;
use super::progress::Display;
use super::sse::Reader;
use super::{CliError, CliResult, Outcome};

/// How many times a stream that ended early is opened again.
const MAX_REOPENS: u32 = 30;

/// Ctrl-C, caught from the moment this is made: make it before anything is
/// drawn, so an early Ctrl-C asks instead of killing the client.
pub struct Interrupt(tokio::signal::unix::Signal);

impl Interrupt {
    pub fn listen() -> CliResult<Interrupt> {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map(Interrupt)
            .map_err(|e| CliError(format!("cannot handle Ctrl-C: {e}")))
    }
}

/// Follows request `id` until it ends (or the user stops following).
pub async fn follow(
    client: &Client,
    id: &str,
    mut interrupt: Interrupt,
    display: &mut Display,
    json: bool,
) -> CliResult<Outcome> {
    let path = format!("/requests/{id}/events");
    let mut percent = 0.0;
    let mut reopens = 0;
    'streams: loop {
        let stream = tokio::select! {
            stream = client.stream(&path) => stream?,
            _ = interrupt.0.recv() => return interrupted(client, id, &mut interrupt, display).await,
        };
        let mut reader = Reader::new(stream);
        loop {
            let frame = tokio::select! {
                frame = reader.next() => frame,
                _ = interrupt.0.recv() => return interrupted(client, id, &mut interrupt, display).await,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                // Ended early (a server restart): see where it stands, then go on.
                Ok(None) | Err(_) => break,
            };
            if frame.event == "done" {
                break 'streams;
            }
            if frame.event == "error" {
                let doc: Value = serde_json::from_str(&frame.data).unwrap_or_default();
                return Err(CliError(doc["message"].as_str().unwrap_or(&frame.data).to_string()));
            }
            let Ok(doc) = serde_json::from_str::<Value>(&frame.data) else { continue };
            let token = &doc["token"];
            match token["type"].as_str() {
                Some("progress") => {
                    if let Some(p) = token["progress"].as_f64() {
                        percent = p;
                    }
                    display.update(percent, token["content"].as_str().unwrap_or(""));
                }
                Some("completed" | "failed" | "cancelled") => break 'streams,
                _ => {}
            }
        }
        let status = client.get(&format!("/requests/{id}")).await?;
        if is_final(&status) {
            break;
        }
        reopens += 1;
        if reopens > MAX_REOPENS {
            return Err(CliError(format!("the event stream of {id} keeps ending; try again later")));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let status = client.get(&format!("/requests/{id}")).await?;
    display.finish();
    Ok(print_final(&status, json))
}

fn is_final(status: &Value) -> bool {
    matches!(status["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

/// Prints an ended request: its result on stdout (or the whole document with
/// `--json`), failures on stderr.
pub fn print_final(status: &Value, json: bool) -> Outcome {
    let id = status["request_id"].as_str().unwrap_or("?");
    let outcome = if status["status"] == "completed" { Outcome::Done } else { Outcome::RequestFailed };
    if json {
        println!("{status}");
        return outcome;
    }
    let took = status["duration_ms"].as_f64().map(|ms| format!(" in {:.1}s", ms / 1000.0)).unwrap_or_default();
    match status["status"].as_str() {
        Some("completed") => {
            println!("{}", status["result"]["text"].as_str().unwrap_or(""));
            let artifacts: Vec<&str> = status["result"]["artifacts"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
                .unwrap_or_default();
            if !artifacts.is_empty() {
                eprintln!("artifacts: {}", artifacts.join(", "));
            }
            eprintln!("{id} completed{took}");
        }
        Some("failed") => {
            let message = status["error"]["message"].as_str().unwrap_or("no reason given");
            eprintln!("{id} failed{took}: {message}");
        }
        Some(other) => eprintln!("{id} {other}{took}"),
        None => eprintln!("{id}: unknown status"),
    }
    outcome
}

/// Ctrl-C while following: cancel the request, or leave it running.
async fn interrupted(
    client: &Client,
    id: &str,
    interrupt: &mut Interrupt,
    display: &mut Display,
) -> CliResult<Outcome> {
    display.finish();
    let cancel = if std::io::stdin().is_terminal() {
        eprint!("\nStop following {id}: [c]ancel the request, or [l]eave it running in the background? [l] ");
        let answer = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map(|_| line)
        });
        tokio::select! {
            answer = answer => answer.ok().and_then(Result::ok).is_some_and(|a| a.trim().to_lowercase().starts_with('c')),
            _ = interrupt.0.recv() => false,
        }
    } else {
        false
    };
    if cancel {
        client.call(Method::DELETE, &format!("/requests/{id}"), None).await?;
        eprintln!("Cancelled {id}.");
        return Ok(Outcome::RequestFailed);
    }
    println!("Left running in the background: {id}");
    println!("Follow it with: muxi-rt requests follow {} {id}", client.formation);
    Ok(Outcome::Done)
}
