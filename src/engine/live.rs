//! The in-memory side of a running request: its cancel token, the lease its
//! runner holds, the broadcast of its events to live watchers, and the signals
//! that it has ended (`done`) or that its work here has stopped (`stopped`;
//! without `done`, the request was handed back to be run again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::store::{Lease, Progress, RequestRecord};

/// Events kept for a slow watcher before it misses some (it then catches up
/// from the final state).
const EVENT_BUFFER: usize = 128;

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
    /// Cancelled to stop the work.
    pub cancel: CancellationToken,
    /// Cancelled when the lease was found taken over: the work stops and
    /// records nothing.
    pub(crate) lost: CancellationToken,
    /// The lease of the current attempt, and when (monotonic) it was claimed.
    lease: Mutex<Option<(Lease, std::time::Instant)>>,
    /// Created on the first subscription: most requests are never watched live,
    /// and a queued request should cost little memory.
    events: Mutex<Option<broadcast::Sender<LiveEvent>>>,
    done: watch::Sender<Option<RequestRecord>>,
    stopped: watch::Sender<bool>,
    /// Set when a caller that meant to wait was answered 202 instead.
    promoted: AtomicBool,
    /// The request as the store holds it: the engine applies each write here
    /// after the store has committed it, so status polls of a running request
    /// are answered from memory.
    record: Mutex<RequestRecord>,
}

impl LiveRequest {
    pub fn new(record: &RequestRecord) -> LiveRequest {
        LiveRequest {
            cancel: CancellationToken::new(),
            lost: CancellationToken::new(),
            lease: Mutex::new(None),
            events: Mutex::new(None),
            done: watch::channel(None).0,
            stopped: watch::channel(false).0,
            promoted: AtomicBool::new(false),
            record: Mutex::new(record.clone()),
        }
    }

    pub(crate) fn set_lease(&self, lease: Lease) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some((lease, std::time::Instant::now()));
    }

    /// The lease of the current attempt, if one was claimed.
    pub(crate) fn lease(&self) -> Option<Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).map(|(lease, _)| lease)
    }

    /// When the current lease was claimed.
    pub(crate) fn claimed_at(&self) -> Option<std::time::Instant> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).map(|(_, at)| at)
    }

    /// Whether the request has ended (its final record is known here).
    pub fn is_done(&self) -> bool {
        self.done.borrow().is_some()
    }

    /// The request's current state (what the store holds, or fresher: progress
    /// is shown at once and written at a limited rate).
    pub fn snapshot(&self) -> RequestRecord {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A copy of the record with its `message` left empty (for a status poll:
    /// no copy of a message of up to 1 MB).
    pub fn snapshot_without_message(&self) -> RequestRecord {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let message = std::mem::take(&mut record.message);
        let copy = record.clone();
        record.message = message;
        copy
    }

    /// Applies a write the store has committed. Once the request has ended the
    /// final record is kept as it is.
    pub(crate) fn apply(&self, change: impl FnOnce(&mut RequestRecord)) {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        if !record.status.is_final() {
            change(&mut record);
        }
    }

    /// Follows the request's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.get_or_insert_with(|| broadcast::channel(EVENT_BUFFER).0).subscribe()
    }

    pub(crate) fn publish(&self, event: LiveEvent) {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(events) = events.as_ref() {
            // No receivers left is fine: nobody is watching any more.
            let _ = events.send(event);
        }
    }

    /// Records the end and wakes everyone waiting on it.
    pub(crate) fn finish(&self, record: RequestRecord) {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = record.clone();
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
        let _ = tokio::time::timeout(limit, self.until_stopped()).await;
    }

    /// Waits until the request's task has exited.
    pub async fn until_stopped(&self) {
        let mut rx = self.stopped.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// Whether the request's task has exited.
    pub fn has_stopped(&self) -> bool {
        *self.stopped.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_without_message_leaves_the_live_record_whole() {
        let record = RequestRecord::accepted(crate::store::NewRequest {
            message: "a long message".into(),
            ..crate::testing::new_request("r")
        });
        let live = LiveRequest::new(&record);
        assert_eq!(live.snapshot_without_message(), RequestRecord { message: String::new(), ..record.clone() });
        assert_eq!(live.snapshot(), record, "the live record keeps its message");
    }
}
