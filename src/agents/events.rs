//! The channel from an agent to the engine, bounded by construction.
//!
//! An agent may report far faster than anyone needs: a command agent printing
//! 300,000 progress lines must cost neither 300,000 durable writes nor memory
//! that grows with them. So nothing is queued: progress is coalesced (each
//! field's latest value wins) and pieces of answer text are kept, in order, up
//! to [`MAX_PENDING_TEXT`] bytes (live followers see the text; the final
//! result does not depend on it). The engine takes whatever is pending at once.
//! Sending never blocks and never fails the agent.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::{AgentEvent, ProgressUpdate};

/// The most answer text held for live followers between two reads by the engine.
pub const MAX_PENDING_TEXT: usize = 256 * 1024;

/// The agent's end: where it reports.
#[derive(Clone)]
pub struct Events {
    shared: Arc<Shared>,
}

/// The engine's end.
pub struct EventsReceiver {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Notify,
    /// Tests of a single agent keep every event as sent.
    #[cfg(test)]
    record: Option<Arc<Mutex<Vec<AgentEvent>>>>,
}

/// What the agent reported since the engine last looked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pending {
    /// The merged progress reports, if any came.
    pub progress: Option<ProgressUpdate>,
    /// Pieces of answer text, in order.
    pub text: Vec<String>,
    /// Their total length in bytes.
    text_bytes: usize,
    /// Bytes of text dropped because followers were not keeping up.
    pub dropped_text: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.progress.is_none() && self.text.is_empty() && self.dropped_text == 0
    }
}

impl Events {
    /// A connected pair.
    pub fn channel() -> (Events, EventsReceiver) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            #[cfg(test)]
            record: None,
        });
        (Events { shared: shared.clone() }, EventsReceiver { shared })
    }

    /// A sender that keeps every event (for tests of one agent), and the list.
    #[cfg(test)]
    pub fn recorder() -> (Events, Arc<Mutex<Vec<AgentEvent>>>) {
        let list = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            record: Some(list.clone()),
        });
        (Events { shared }, list)
    }

    /// Reports an event. Never blocks; the `Result` is for the callers that
    /// ignore it the way they would a closed channel's.
    pub fn send(&self, event: AgentEvent) -> Result<(), std::convert::Infallible> {
        #[cfg(test)]
        if let Some(list) = &self.shared.record {
            list.lock().unwrap_or_else(|e| e.into_inner()).push(event);
            return Ok(());
        }
        let mut pending = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            AgentEvent::Progress(update) => merge(pending.progress.get_or_insert_with(Default::default), update),
            AgentEvent::Content(text) => {
                if text.len() <= MAX_PENDING_TEXT.saturating_sub(pending.text_bytes) {
                    pending.text_bytes += text.len();
                    pending.text.push(text);
                } else {
                    pending.dropped_text += text.len();
                }
            }
        }
        drop(pending);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl EventsReceiver {
    /// Waits until something is pending, then takes all of it.
    pub async fn recv(&mut self) -> Pending {
        loop {
            if let Some(pending) = self.try_take() {
                return pending;
            }
            self.shared.ready.notified().await;
        }
    }

    /// Takes whatever is pending now.
    pub fn try_take(&mut self) -> Option<Pending> {
        let mut pending = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        (!pending.is_empty()).then(|| std::mem::take(&mut *pending))
    }
}

/// Fields given in `update` replace those in `into`; absent ones stay.
fn merge(into: &mut ProgressUpdate, update: ProgressUpdate) {
    if update.progress.is_some() {
        into.progress = update.progress;
    }
    if update.step.is_some() {
        into.step = update.step;
    }
    if update.total_steps.is_some() {
        into.total_steps = update.total_steps;
    }
    if update.completed_steps.is_some() {
        into.completed_steps = update.completed_steps;
    }
    if update.message.is_some() {
        into.message = update.message;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(p: f64, step: Option<&str>) -> AgentEvent {
        AgentEvent::Progress(ProgressUpdate {
            progress: Some(p),
            step: step.map(str::to_string),
            ..ProgressUpdate::default()
        })
    }

    #[tokio::test]
    async fn a_flood_of_progress_is_one_merged_report() {
        let (events, mut rx) = Events::channel();
        events.send(progress(1.0, Some("first"))).unwrap();
        for i in 2..=300_000 {
            events.send(progress(i as f64 / 3000.0, None)).unwrap();
        }
        let pending = rx.recv().await;
        let merged = pending.progress.expect("progress");
        assert_eq!(merged.progress, Some(100.0));
        assert_eq!(merged.step.as_deref(), Some("first"), "a field not named again keeps its value");
        assert!(rx.try_take().is_none(), "everything was taken at once");
    }

    #[tokio::test]
    async fn text_is_kept_in_order_up_to_the_cap() {
        let (events, mut rx) = Events::channel();
        events.send(AgentEvent::Content("a".into())).unwrap();
        events.send(AgentEvent::Content("b".into())).unwrap();
        let big = "x".repeat(MAX_PENDING_TEXT);
        events.send(AgentEvent::Content(big.clone())).unwrap();
        let pending = rx.recv().await;
        assert_eq!(pending.text, ["a", "b"]);
        assert_eq!(pending.dropped_text, big.len());
    }
}
