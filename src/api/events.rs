//! Server-Sent Events in the MUXI format: `data: {"token": {...}}` frames typed
//! `progress`, `content`, then `completed` | `failed` | `cancelled`, then
//! `event: done`, with keep-alive comments while idle.
//!
//! A streamed chat whose caller disconnects is cancelled unless it was an async
//! request. The follow routes (`/events/{session}/{request}`,
//! `/requests/{request}/events`) start with the request's current state and never
//! cancel anything.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use super::extract::Path;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::chat::Accepted;
use super::requests::find;
use super::AppState;
use crate::engine::{LiveEvent, LiveRequest, Submitted};
use crate::error::{ApiError, ApiResult, Code};
use crate::overlord::decide::Plan;
use crate::store::{RequestRecord, Status};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a request running elsewhere (another replica) is polled.
const POLL: Duration = Duration::from_millis(500);

/// `POST /chat` with `"stream": true`.
pub async fn stream_chat(state: AppState, accepted: Accepted) -> ApiResult<Response> {
    let cancel_on_disconnect = !matches!(accepted.plan, Plan::Async);
    let Submitted { record, live, events, .. } =
        state.engine.submit(accepted.formation, accepted.request, crate::engine::Start::Follow).await?;
    Ok(sse(state, *record, live, events, cancel_on_disconnect))
}

/// `GET /api/{id}/v1/events/{session_id}/{request_id}`.
pub async fn follow_in_session(
    State(state): State<AppState>,
    Path((id, session_id, request_id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    if record.session_id.as_deref().is_some_and(|s| s != session_id) {
        return Err(ApiError::new(
            Code::RequestNotFound,
            format!("request `{request_id}` not found in session `{session_id}`"),
        ));
    }
    Ok(follow_record(state, *record))
}

/// `GET /api/{id}/v1/requests/{request_id}/events`.
pub async fn follow(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let record = find(&state, &id, &headers, &request_id).await?;
    Ok(follow_record(state, *record))
}

/// Follows a request someone already made: never cancels it.
pub(super) fn follow_record(state: AppState, record: RequestRecord) -> Response {
    let live = state.engine.live(&record.id);
    let events = live.as_deref().map(LiveRequest::subscribe);
    sse(state, record, live, events, false)
}

fn sse(
    state: AppState,
    record: RequestRecord,
    live: Option<Arc<LiveRequest>>,
    events: Option<broadcast::Receiver<LiveEvent>>,
    cancel_on_disconnect: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let finished = pump(&state, &record, live, events, &tx).await;
        // A server shutting down is not a client going away: the request stays
        // unfinished and is run again after the restart.
        if !finished && cancel_on_disconnect && !state.shutdown.is_cancelled() {
            if let Ok(Some(current)) = state.engine.store().get(&record.id).await {
                if !current.status.is_final() {
                    tracing::info!(request = %record.id, "stream closed by the client: cancelling");
                    let _ = state.engine.cancel(&current).await;
                }
            }
        }
    });
    let stream = futures::StreamExt::map(ReceiverStream::new(rx), Ok::<Event, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keepalive")).into_response()
}

/// Sends the request's frames until it ends (true) or the client leaves (false).
async fn pump(
    state: &AppState,
    record: &RequestRecord,
    live: Option<Arc<LiveRequest>>,
    events: Option<broadcast::Receiver<LiveEvent>>,
    tx: &mpsc::Sender<Event>,
) -> bool {
    let mut events = events;
    let mut done = live.as_deref().map(LiveRequest::done);
    // The work here can stop without an end (handed back at shutdown, or taken
    // over by another server): the stream then follows the store.
    let mut live = live;
    // The current state first, so a client that comes back later catches up.
    let opening = record
        .status_message
        .clone()
        .or_else(|| record.current_step.clone())
        .unwrap_or_else(|| format!("Request {} is {}", record.id, record.status.as_str()));
    let extra = json!({ "status": record.status.as_str(), "progress": record.progress });
    if !send(tx, token(record, "progress", &opening, extra)).await {
        return false;
    }
    if record.status.is_final() {
        return finish(tx, record).await;
    }
    loop {
        let ended = done.as_ref().and_then(|rx| rx.borrow().clone());
        if let Some(finished) = ended {
            // What the work sent before it ended may still be queued here (the
            // end can be seen first): it goes out before the end does.
            while let Some(event) = events.as_mut().and_then(queued) {
                if let Some(frame) = live_frame(record, &event) {
                    if !send(tx, frame).await {
                        return false;
                    }
                }
            }
            return finish(tx, &finished).await;
        }
        let next = match (&mut events, &mut done, live.as_deref()) {
            (Some(events), Some(done), Some(running)) => tokio::select! {
                event = events.recv() => Next::Event(event),
                _ = done.changed() => Next::Check,
                _ = running.until_stopped() => Next::Stopped,
                _ = tx.closed() => return false,
                _ = state.shutdown.cancelled() => return false,
            },
            _ => tokio::select! {
                _ = tokio::time::sleep(POLL) => Next::Poll,
                _ = tx.closed() => return false,
                _ = state.shutdown.cancelled() => return false,
            },
        };
        let frame = match next {
            Next::Event(Ok(LiveEvent::Finished(finished))) => return finish(tx, &finished).await,
            Next::Event(Ok(event)) => match live_frame(record, &event) {
                Some(frame) => frame,
                None => continue,
            },
            Next::Event(Err(broadcast::error::RecvError::Lagged(_))) | Next::Check => continue,
            Next::Stopped => {
                if done.as_ref().is_some_and(|rx| rx.borrow().is_some()) {
                    continue;
                }
                (events, done, live) = (None, None, None);
                continue;
            }
            Next::Event(Err(broadcast::error::RecvError::Closed)) => {
                events = None;
                done = None;
                continue;
            }
            Next::Poll => match state.engine.store().get(&record.id).await {
                Ok(Some(current)) if current.status.is_final() => return finish(tx, &current).await,
                Ok(Some(current)) => {
                    if let Some(running) = state.engine.live(&record.id) {
                        events = Some(running.subscribe());
                        done = Some(running.done());
                        live = Some(running);
                    }
                    let text = current.current_step.clone().unwrap_or_default();
                    if text.is_empty() {
                        continue;
                    }
                    token(&current, "progress", &text, json!({ "progress": current.progress }))
                }
                _ => continue,
            },
        };
        if !send(tx, frame).await {
            return false;
        }
    }
}

/// The frame of a progress or content event (an end is answered by `finish`).
fn live_frame(record: &RequestRecord, event: &LiveEvent) -> Option<Event> {
    match event {
        LiveEvent::Progress(p) => {
            let text = p.current_step.clone().or(p.message.clone()).unwrap_or_default();
            Some(token(
                record,
                "progress",
                &text,
                json!({ "progress": p.progress, "total_steps": p.total_steps, "completed_steps": p.completed_steps }),
            ))
        }
        LiveEvent::Content(text) => Some(token(record, "content", text, json!({}))),
        LiveEvent::Finished(_) => None,
    }
}

/// The next event already queued on `events`, if any (skipping past a lag).
fn queued(events: &mut broadcast::Receiver<LiveEvent>) -> Option<LiveEvent> {
    loop {
        match events.try_recv() {
            Ok(event) => return Some(event),
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return None,
        }
    }
}

enum Next {
    Event(Result<LiveEvent, broadcast::error::RecvError>),
    Check,
    Stopped,
    Poll,
}

async fn finish(tx: &mpsc::Sender<Event>, record: &RequestRecord) -> bool {
    let (kind, content) = match record.status {
        Status::Completed => ("completed", record.result.as_ref().map(|r| r.text.clone()).unwrap_or_default()),
        Status::Failed => ("failed", record.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()),
        _ => ("cancelled", "Request cancelled".to_string()),
    };
    let extra = json!({
        "status": record.status.as_str(),
        "processing_time_ms": record.duration_ms(),
        "artifacts": record.result.as_ref().map(|r| r.artifacts.clone()),
        "error": record.error,
    });
    send(tx, token(record, kind, &content, extra)).await
        && send(tx, Event::default().event("done").data(json!({ "finished": true }).to_string())).await
}

async fn send(tx: &mpsc::Sender<Event>, event: Event) -> bool {
    tx.send(event).await.is_ok()
}

fn token(record: &RequestRecord, kind: &str, content: &str, extra: Value) -> Event {
    let mut token = json!({
        "request_id": record.id,
        "user_id": record.user_id,
        "session_id": record.session_id,
        "agent_id": record.agent_id,
        "type": kind,
        "content": content,
        "timestamp": crate::time::now_ms() as f64 / 1000.0,
    });
    if let (Value::Object(token), Value::Object(extra)) = (&mut token, extra) {
        token.extend(extra);
    }
    Event::default().data(json!({ "token": token }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use tokio_util::sync::CancellationToken;

    /// A server's state over a real store, with no formation loaded.
    fn state(dir: &std::path::Path) -> AppState {
        let store = Arc::new(SqliteStore::open(&dir.join("data")).unwrap());
        let shutdown = CancellationToken::new();
        let (registry, engine) = crate::testing::engine_over(store, dir, shutdown.clone());
        AppState::new(crate::api::Shared {
            registry,
            engine,
            allow_webhook_hosts: Arc::new(vec![]),
            mcp_allowed_hosts: Arc::new(vec![]),
            started_at: std::time::Instant::now(),
            shutdown,
            default_formation: None,
            rate_limits: Arc::new(crate::api::rate_limit::RateLimits::new(None)),
        })
    }

    #[tokio::test]
    async fn the_content_sent_before_the_end_goes_out_before_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let record = RequestRecord::accepted(crate::testing::new_request("req_1"));
        let live = Arc::new(LiveRequest::new(&record));
        let events = live.subscribe();
        // The work streams its answer and ends before the stream's pump looks:
        // the end is there to be seen first.
        for piece in ["The quick ", "brown fox ", "jumps."] {
            live.publish(LiveEvent::Content(piece.into()));
        }
        live.finish(RequestRecord { status: Status::Completed, ..record.clone() });

        let (tx, mut rx) = mpsc::channel(64);
        assert!(pump(&state, &record, Some(live), Some(events), &tx).await, "the request ended");
        drop(tx);
        let mut frames = Vec::new();
        while let Some(frame) = rx.recv().await {
            frames.push(format!("{frame:?}"));
        }
        let order: Vec<usize> = ["The quick ", "brown fox ", "jumps.", "completed"]
            .iter()
            .map(|text| frames.iter().position(|f| f.contains(text)).unwrap_or_else(|| panic!("{text}: {frames:#?}")))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "in order, the end last: {frames:#?}");
    }
}
