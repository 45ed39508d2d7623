//! `GET /events` (and `GET /events/{session_id}`): one Server-Sent Events stream
//! of the caller's request lifecycle across the formation: `request.accepted`,
//! `request.progress`, `request.completed`, `request.failed`,
//! `request.cancelled`. It stays open, with keep-alive comments.
//!
//! Each frame has an `id:`. A client that reconnects with `Last-Event-ID` (header,
//! or `last_event_id` in the query) first gets the events it missed, derived from
//! the stored requests (acceptances and ends; progress is live only), within the
//! retention: at least once, so events of the few seconds before that id may
//! come again (same ids). A connection that falls behind the formation's
//! bounded feed catches up the same way; its own buffer is bounded too.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::auth::{self, Role};
use super::{views, AppState};
use crate::engine::feed::{self, EventId, Lifecycle};
use crate::error::{ApiError, ApiResult, Code};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Frames queued for one connection before the pump waits for the client.
const CONNECTION_BUFFER: usize = 64;
/// Stored requests read per page of a catch-up.
const MAX_REPLAY: usize = 1000;
/// Pages one catch-up reads at most.
const MAX_REPLAY_PAGES: usize = 50;
/// How far back a catch-up looks, for events published a little out of id
/// order (an acceptance or an end is published after its commit, with the
/// timestamp taken before it).
const LAG_WINDOW_MS: i64 = 5_000;
/// Ids of events already sent that a connection remembers (to skip repeats).
const MAX_SEEN: usize = 10_000;

#[derive(Debug, Deserialize)]
pub struct Params {
    user_id: Option<String>,
    last_event_id: Option<String>,
}

/// `GET /events`: every request of the caller.
pub async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> ApiResult<Response> {
    open(state, id, None, headers, params).await
}

/// `GET /events/{session_id}`: the caller's requests in one session.
pub async fn stream_session(
    State(state): State<AppState>,
    Path((id, session_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> ApiResult<Response> {
    open(state, id, Some(session_id), headers, params).await
}

async fn open(
    state: AppState,
    formation_id: String,
    session: Option<String>,
    headers: HeaderMap,
    params: Params,
) -> ApiResult<Response> {
    auth::authorize(&state, &formation_id, &headers, Role::Client)?;
    let user = auth::user_id(&headers, params.user_id.as_deref())?;
    let last = match auth::header(&headers, "last-event-id").or(params.last_event_id.as_deref()) {
        None => None,
        Some(text) => Some(EventId::parse(text).ok_or_else(|| {
            ApiError::new(
                Code::InvalidLastEventId,
                "Last-Event-ID must be an event id this stream sent (`<ms>-<rank>-<request id>`)",
            )
        })?),
    };
    // Subscribed before reading the store: nothing falls between the two.
    let events = state.engine.feed().subscribe(&formation_id);
    let (tx, rx) = mpsc::channel::<Event>(CONNECTION_BUFFER);
    let follower = Follower { state, formation_id, user, session, seen: HashSet::new() };
    tokio::spawn(follower.run(events, last, tx));
    let stream = futures::StreamExt::map(ReceiverStream::new(rx), Ok::<Event, Infallible>);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keepalive")).into_response())
}

struct Follower {
    state: AppState,
    formation_id: String,
    user: String,
    session: Option<String>,
    /// Durable events already sent, so a catch-up never repeats one.
    seen: HashSet<EventId>,
}

impl Follower {
    async fn run(
        mut self,
        mut events: broadcast::Receiver<Arc<Lifecycle>>,
        last: Option<EventId>,
        tx: mpsc::Sender<Event>,
    ) {
        let connected = crate::time::now_ms();
        if tx.send(Event::default().retry(Duration::from_secs(2)).comment("connected")).await.is_err() {
            return;
        }
        let mut cursor = last.clone().unwrap_or(EventId { at: connected, rank: 0, request_id: String::new() });
        if let Some(after) = last {
            // The client has `after` itself. Events published just before it may
            // carry slightly smaller ids (see LAG_WINDOW_MS): those are sent again
            // rather than risk missing one; their ids tell repeats apart.
            self.seen.insert(after.clone());
            if !self.catch_up(&window_before(&after), &mut cursor, &tx).await {
                return;
            }
        }
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = tx.closed() => return,
                _ = self.state.shutdown.cancelled() => return,
            };
            match event {
                Ok(event) => {
                    if !self.wanted(&event) || self.seen.contains(&event.id) {
                        continue;
                    }
                    if !self.send(&event, &mut cursor, &tx).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, formation = %self.formation_id, "event stream fell behind; catching up");
                    if !self.catch_up(&window_before(&cursor.clone()), &mut cursor, &tx).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn wanted(&self, event: &Lifecycle) -> bool {
        event.record.user_id == self.user
            && self.session.as_ref().is_none_or(|s| event.record.session_id.as_deref() == Some(s.as_str()))
    }

    /// Sends the stored events after `after` not sent yet, page by page (at
    /// most [`MAX_REPLAY_PAGES`]); false when the client left.
    async fn catch_up(&mut self, after: &EventId, cursor: &mut EventId, tx: &mpsc::Sender<Event>) -> bool {
        let store = self.state.engine.store().clone();
        let mut since = after.at;
        for _ in 0..MAX_REPLAY_PAGES {
            let records = match store.lifecycle_since(&self.formation_id, &self.user, since, MAX_REPLAY).await {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot replay events");
                    return true;
                }
            };
            let (events, next) = feed::replay_page(&records, after, since, records.len() == MAX_REPLAY);
            for event in events {
                if !self.wanted(&event) || self.seen.contains(&event.id) {
                    continue;
                }
                if !self.send(&event, cursor, tx).await {
                    return false;
                }
            }
            match next {
                Some(next) => since = next,
                None => return true,
            }
        }
        tracing::warn!(formation = %self.formation_id, "event catch-up stopped after {MAX_REPLAY_PAGES} pages");
        true
    }

    async fn send(&mut self, event: &Lifecycle, cursor: &mut EventId, tx: &mpsc::Sender<Event>) -> bool {
        if event.kind != feed::Kind::Progress {
            if self.seen.len() >= MAX_SEEN {
                self.seen.clear();
            }
            self.seen.insert(event.id.clone());
        }
        if event.id > *cursor {
            *cursor = event.id.clone();
        }
        tx.send(frame(event)).await.is_ok()
    }
}

/// The id LAG_WINDOW_MS before `id`: where a catch-up starts.
fn window_before(id: &EventId) -> EventId {
    EventId { at: id.at.saturating_sub(LAG_WINDOW_MS), rank: 0, request_id: String::new() }
}

/// The SSE frame of an event: `id`, `event` (its kind) and the request's status
/// document with `type`, `event_id` and `timestamp` (ms) added.
fn frame(event: &Lifecycle) -> Event {
    let mut data = views::request_status(&event.record);
    if let Value::Object(map) = &mut data {
        map.insert("type".into(), json!(event.kind.as_str()));
        map.insert("event_id".into(), json!(event.id.to_string()));
        map.insert("timestamp".into(), json!(event.id.at));
    }
    Event::default().id(event.id.to_string()).event(event.kind.as_str()).data(data.to_string())
}
