//! The in-memory side of a running request: its cancel token, the broadcast of
//! its events to live watchers, and the signal that it has ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::store::{Progress, RequestRecord};

/// What live watchers of a request see.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    Progress(Progress),
    /// Text of the answer as it is produced.
    Content(String),
    /// The request ended; the final record.
    Finished(Box<RequestRecord>),
}

/// A request running in this process.
pub struct LiveRequest {
    pub id: String,
    /// Cancelled to stop the work.
    pub cancel: CancellationToken,
    events: broadcast::Sender<LiveEvent>,
    done: watch::Sender<Option<RequestRecord>>,
    stopped: watch::Sender<bool>,
    /// Set when a caller that meant to wait was answered 202 instead.
    promoted: AtomicBool,
}

impl LiveRequest {
    pub fn new(record: &RequestRecord) -> LiveRequest {
        LiveRequest {
            id: record.id.clone(),
            cancel: CancellationToken::new(),
            events: broadcast::channel(256).0,
            done: watch::channel(None).0,
            stopped: watch::channel(false).0,
            promoted: AtomicBool::new(false),
        }
    }

    /// Follows the request's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.events.subscribe()
    }

    pub(crate) fn publish(&self, event: LiveEvent) {
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    /// Records the end and wakes everyone waiting on it.
    pub(crate) fn finish(&self, record: RequestRecord) {
        self.publish(LiveEvent::Finished(Box::new(record.clone())));
        self.done.send_replace(Some(record));
    }

    /// A receiver that holds the final record once the request has ended.
    pub fn done(&self) -> watch::Receiver<Option<RequestRecord>> {
        self.done.subscribe()
    }

    pub fn promote(&self) {
        self.promoted.store(true, Ordering::Relaxed);
    }

    pub fn promoted(&self) -> bool {
        self.promoted.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_stopped(&self) {
        self.stopped.send_replace(true);
    }

    /// Waits (up to `limit`) until the request's task has exited, so its work has stopped.
    pub async fn stopped(&self, limit: Duration) {
        let mut rx = self.stopped.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|stopped| *stopped)).await;
    }
}
