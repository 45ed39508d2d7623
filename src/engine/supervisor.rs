//! The one owner of a request's life in this process.
//!
//! [`Engine::spawn_request`] runs a request's work in its own task and makes
//! sure every exit of that work ends in exactly one of:
//! - its end recorded (completed, failed, timed out, or failed because the
//!   work panicked), retried with backoff while the store refuses the write,
//!   with waiters answered from memory in the meantime;
//! - nothing to record, because someone else ended it (a cancel) or took it
//!   over (a lost lease);
//! - handed back unfinished (shutdown), to be run again by the next start.
//!
//! Whatever happens, a guard removes it from the running set and tells the
//! waiters and streams that its work here has stopped.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use super::{Engine, LiveRequest};
use crate::formation::Formation;
use crate::store::{ErrorInfo, Lease, Outcome, RequestRecord};

/// How the work of a request in this process ended.
pub(super) enum End {
    /// Record this outcome (fenced by the lease held, if any).
    Finish(Outcome),
    /// Someone else ended it or holds it now: nothing to record.
    Gone,
    /// Not done: give it back, to be run again (shutdown).
    HandBack,
}

/// The longest wait between two tries to record an end.
const MAX_RECORD_BACKOFF: Duration = Duration::from_secs(30);

impl Engine {
    /// Runs `record`'s work in its own task under a supervisor (see the module doc).
    pub(super) fn spawn_request(
        self: &Arc<Self>,
        formation: Arc<Formation>,
        record: RequestRecord,
        live: Arc<LiveRequest>,
        taken: super::pool::TakenOn,
    ) {
        let engine = self.clone();
        let span = crate::observability::logs::request_span(&record.formation_id, &record.id, &record.agent_id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut taken = Some(taken);
                let work = engine.run(&formation, &record, &live, &mut taken);
                engine.supervise(&record, &live, work).await;
                // Its place is free: take on the next queued request.
                drop(taken);
                engine.wake_sweeper();
            },
            span,
        ));
    }

    /// Drives `work` to its end and acts on how it ended, whatever that is.
    pub(super) async fn supervise(&self, record: &RequestRecord, live: &LiveRequest, work: impl Future<Output = End>) {
        let _running = Running { engine: self, id: &record.id, live };
        let end = AssertUnwindSafe(work).catch_unwind().await.unwrap_or_else(|panic| {
            let what = panic_message(&*panic);
            tracing::error!(request = %record.id, panic = %what, "the request's work panicked");
            End::Finish(Outcome::Failed(ErrorInfo {
                kind: "internal_error".into(),
                message: format!("the request's work failed unexpectedly ({what})"),
                retryable: false,
            }))
        });
        match end {
            End::Finish(outcome) => self.record_end(record, live, outcome).await,
            End::Gone => {}
            End::HandBack => {
                if let Some(lease) = live.lease() {
                    if let Err(e) = self.store.release(&record.id, lease).await {
                        tracing::debug!(request = %record.id, error = %e, "could not release the lease");
                    }
                }
            }
        }
    }

    /// Records a request's end, retrying with backoff while the store refuses
    /// the write. Waiters are answered from memory after the first failure.
    async fn record_end(&self, record: &RequestRecord, live: &LiveRequest, outcome: Outcome) {
        let fence: Option<Lease> = live.lease();
        let mut failures = 0u32;
        loop {
            match self.complete(record, Some(live), &outcome, fence).await {
                Ok(ended) => {
                    tracing::info!(status = outcome.status().as_str(), recorded = ended, "request ended");
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(request = %record.id, error = %e, failures, "cannot record the end of a request; retrying");
                    if failures == 1 {
                        live.finish(ended_in_memory(&live.snapshot(), &outcome));
                    }
                    let delay =
                        crate::overlord::backoff::doubling(Duration::from_millis(100), failures, MAX_RECORD_BACKOFF);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Still unfinished in the store: the next start runs it again.
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// A request's end as the store would record it, for waiters while the store
/// cannot.
fn ended_in_memory(current: &RequestRecord, outcome: &Outcome) -> RequestRecord {
    let mut record = current.clone();
    record.status = outcome.status();
    record.completed_at = Some(crate::time::now_ms());
    match outcome {
        Outcome::Completed(result) => {
            record.result = Some(result.clone());
            record.progress = 100.0;
        }
        Outcome::Failed(error) => record.error = Some(error.clone()),
        Outcome::Cancelled { message } => record.status_message = Some(message.clone()),
    }
    record
}

/// What a panic said, for logs and errors.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

/// Removes a request from the running set and signals that its work here
/// stopped, however its task ends (even if the task itself is dropped).
struct Running<'a> {
    engine: &'a Engine,
    id: &'a str,
    live: &'a LiveRequest,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.engine.forget(self.id);
        self.live.mark_stopped();
    }
}
