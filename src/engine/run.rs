//! One request's work in this process: wait for a slot, claim an attempt under
//! a lease, run the agent under the task and workflow timeouts, and retry
//! retryable failures with backoff (waiting without holding a slot).
//!
//! Deadlines are monotonic: the workflow deadline is computed once from the
//! stored first start (so it holds across restarts), then kept as an
//! `Instant`, so a step of the wall clock neither cuts nor extends it.
//!
//! Agent reports arrive coalesced (see `agents::events`); they are shown to
//! status polls and live followers at once and written to the store at most
//! every [`PROGRESS_WRITE_EVERY`].

use std::time::Duration;

use tokio::time::Instant;

use super::supervisor::End;
use super::{leases, Engine, LiveEvent, LiveRequest};
use crate::agents::events::{EventsReceiver, Pending};
use crate::agents::{self, AgentFailure, AgentRequest, Events};
use crate::formation::Formation;
use crate::overlord::backoff;
use crate::store::{ErrorInfo, Lease, Outcome, Progress, RequestRecord, RequestResult, Status};
use crate::time::now_ms;

/// The most often a running request's progress is written to the store.
pub const PROGRESS_WRITE_EVERY: Duration = Duration::from_millis(500);

/// How an attempt stopped.
enum Ended {
    Ran(Result<agents::AgentOutput, AgentFailure>),
    Cancelled,
    TimedOut,
    Shutdown,
    LeaseLost,
}

impl Engine {
    /// The whole life of one request in this process, up to its end.
    /// `taken` is the request's place in the pool, given up while a retry
    /// waits out its backoff (see [`super::pool::Pool::take_on`]).
    pub(super) async fn run(
        &self,
        formation: &Formation,
        record: &RequestRecord,
        live: &LiveRequest,
        taken: &mut Option<super::pool::TakenOn>,
    ) -> End {
        let Some(spec) = formation.agent(Some(&record.agent_id)) else {
            return End::Finish(Outcome::Failed(ErrorInfo {
                kind: "unknown_agent".into(),
                message: format!("agent `{}` is not in formation `{}`", record.agent_id, formation.id),
                retryable: false,
            }));
        };
        let timeouts = &formation.overlord.timeouts;
        let policy = &formation.overlord.retry;
        // Attempts the store counted that never ended: each was cut short by a
        // stopped server. A request that keeps taking the server down stops here.
        if record.status == Status::Processing && record.attempts >= policy.max_attempts {
            return End::Finish(Outcome::Failed(ErrorInfo {
                kind: "interrupted".into(),
                message: format!("gave up after {} attempts: the server stopped during each of them", record.attempts),
                retryable: false,
            }));
        }
        let deadline = workflow_deadline(record.started_at, timeouts.workflow());
        // Read once, when the first attempt is about to run: a request waiting
        // in the queue costs no store read.
        let mut history: Option<Vec<crate::agents::Turn>> = None;
        let pool = self.pool(formation);

        loop {
            let _slot = tokio::select! {
                slot = pool.acquire() => (slot, crate::observability::metrics::running(formation)),
                _ = live.cancel.cancelled() => return End::Gone,
                _ = live.lost.cancelled() => return End::Gone,
                _ = self.shutdown.cancelled() => return End::HandBack,
                _ = tokio::time::sleep_until(deadline) => {
                    return End::Finish(Outcome::Failed(timeout_error("workflow_timeout", timeouts.workflow())));
                }
            };
            let now = now_ms();
            let claim = match self.store.claim(&record.id, &self.owner, now, leases::lease_ms()).await {
                Ok(Some(claim)) => claim,
                // Final (cancelled) or held by another runner.
                Ok(None) => return End::Gone,
                Err(e) => {
                    tracing::warn!(request = %record.id, error = %e, "cannot start an attempt; handing the request back");
                    return End::HandBack;
                }
            };
            live.set_lease(claim.lease);
            if history.is_none() {
                history = Some(self.session_history(record).await);
            }
            let attempt = claim.attempt;
            tracing::debug!(attempt, "attempt started");
            crate::observability::metrics::attempt_started(
                formation,
                &record.agent_id,
                attempt,
                now - record.created_at,
            );
            live.apply(|r| {
                r.status = Status::Processing;
                r.attempts = attempt;
                r.started_at.get_or_insert(now);
            });
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (limit, limit_name, limit_of) = if timeouts.task() <= remaining {
                (timeouts.task(), "task_timeout", timeouts.task())
            } else {
                (remaining, "workflow_timeout", timeouts.workflow())
            };
            let request = AgentRequest {
                request_id: record.id.clone(),
                formation_id: record.formation_id.clone(),
                agent_id: record.agent_id.clone(),
                user_id: record.user_id.clone(),
                session_id: record.session_id.clone(),
                message: record.message.clone(),
                attempt,
                history: history.clone().unwrap_or_default(),
            };
            let (events, mut reports) = Events::channel();
            let mut work = Box::pin(agents::run(&self.agents, formation, spec, request, events));
            let mut progress = ProgressWriter::new(claim.lease);
            let attempt_ends = tokio::time::sleep(limit);
            tokio::pin!(attempt_ends);
            let ended = loop {
                tokio::select! {
                    result = &mut work => break Ended::Ran(result),
                    pending = reports.recv() => {
                        if !self.on_reports(record, live, pending, &mut progress).await {
                            break Ended::LeaseLost;
                        }
                    }
                    _ = progress.due() => {
                        if !progress.flush(self, &record.id).await {
                            break Ended::LeaseLost;
                        }
                    }
                    _ = live.cancel.cancelled() => break Ended::Cancelled,
                    _ = live.lost.cancelled() => break Ended::LeaseLost,
                    _ = &mut attempt_ends => break Ended::TimedOut,
                    _ = self.shutdown.cancelled() => break Ended::Shutdown,
                }
            };
            // The agent is stopped before what it left behind is read.
            drop(work);
            self.drain(record, live, &mut reports, &mut progress).await;
            match ended {
                Ended::Ran(Ok(output)) => {
                    return End::Finish(Outcome::Completed(RequestResult {
                        text: output.text,
                        artifacts: output.artifacts,
                    }));
                }
                Ended::Ran(Err(failure)) => {
                    if !failure.retryable || attempt >= policy.max_attempts {
                        return End::Finish(Outcome::Failed(error_info(failure, attempt)));
                    }
                    // Our backoff is capped at max_delay; a delay the other side
                    // asked for (Retry-After) is honoured in full, within the
                    // workflow timeout.
                    let until_deadline = deadline.saturating_duration_since(Instant::now());
                    let delay = backoff::honour_retry_after(
                        backoff::jittered(policy, attempt),
                        failure.retry_after,
                        until_deadline,
                    );
                    if delay >= until_deadline {
                        let asked = failure.retry_after.map_or(String::new(), |after| {
                            format!("; the agent asked to retry after {}s", after.as_secs_f64())
                        });
                        return End::Finish(Outcome::Failed(ErrorInfo {
                            kind: "timeout".into(),
                            message: format!(
                                "attempt {attempt} failed ({}) and a retry would end after workflow_timeout ({}s){asked}",
                                failure.message,
                                timeouts.workflow().as_secs_f64()
                            ),
                            retryable: false,
                        }));
                    }
                    let note = format!(
                        "attempt {attempt} of {} failed ({}); retrying in {:.1}s",
                        policy.max_attempts,
                        failure.message,
                        delay.as_secs_f64()
                    );
                    tracing::warn!(request = %record.id, "{note}");
                    crate::observability::metrics::retry_scheduled(formation, &record.agent_id);
                    progress.add(Progress { message: Some(note), ..Progress::default() });
                    live.apply(|r| super::apply_progress(r, progress.latest()));
                    if !progress.flush(self, &record.id).await {
                        return End::Gone;
                    }
                    // The slot, and the place, go to the next request while this one waits.
                    drop(_slot);
                    *taken = None;
                    self.wake_sweeper();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = live.cancel.cancelled() => return End::Gone,
                        _ = live.lost.cancelled() => return End::Gone,
                        _ = self.shutdown.cancelled() => return End::HandBack,
                    }
                    *taken = Some(pool.take_on());
                }
                Ended::TimedOut => return End::Finish(Outcome::Failed(timeout_error(limit_name, limit_of))),
                Ended::Cancelled | Ended::LeaseLost => return End::Gone,
                Ended::Shutdown => return End::HandBack,
            }
        }
    }

    /// Shows reports at once; queues progress for the store. `false` when the
    /// store refused a fenced write (the lease is lost or the request ended).
    async fn on_reports(
        &self,
        record: &RequestRecord,
        live: &LiveRequest,
        pending: Pending,
        progress: &mut ProgressWriter,
    ) -> bool {
        if let Some(update) = pending.progress {
            let update = Progress {
                progress: update.progress.filter(|p| p.is_finite()).map(|p| p.clamp(0.0, 100.0)),
                current_step: update.step,
                total_steps: update.total_steps,
                completed_steps: update.completed_steps,
                message: update.message,
            };
            live.apply(|r| super::apply_progress(r, &update));
            live.publish(LiveEvent::Progress(update.clone()));
            self.feed.progress(&record.formation_id, || live.snapshot());
            progress.add(update);
        }
        for piece in pending.text {
            live.publish(LiveEvent::Content(piece));
        }
        if progress.may_write_now() {
            return progress.flush(self, &record.id).await;
        }
        true
    }

    /// Reads what a stopped agent left and writes the last progress.
    async fn drain(
        &self,
        record: &RequestRecord,
        live: &LiveRequest,
        reports: &mut EventsReceiver,
        progress: &mut ProgressWriter,
    ) {
        if let Some(pending) = reports.try_take() {
            // The result of the write is seen by the caller's next step.
            self.on_reports(record, live, pending, progress).await;
        }
        progress.flush(self, &record.id).await;
    }
}

/// Progress waiting to be written, merged, at a limited rate.
struct ProgressWriter {
    lease: Lease,
    pending: Option<Progress>,
    last_write: Option<Instant>,
}

impl ProgressWriter {
    fn new(lease: Lease) -> Self {
        ProgressWriter { lease, pending: None, last_write: None }
    }

    fn add(&mut self, update: Progress) {
        match &mut self.pending {
            Some(pending) => super::apply_fields(pending, update),
            None => self.pending = Some(update),
        }
    }

    /// The merged progress waiting (empty when none).
    fn latest(&self) -> &Progress {
        static NONE: Progress =
            Progress { progress: None, current_step: None, total_steps: None, completed_steps: None, message: None };
        self.pending.as_ref().unwrap_or(&NONE)
    }

    fn next_write_at(&self) -> Instant {
        self.last_write.map_or_else(Instant::now, |at| at + PROGRESS_WRITE_EVERY)
    }

    fn may_write_now(&self) -> bool {
        self.pending.is_some() && self.next_write_at() <= Instant::now()
    }

    /// Resolves when pending progress may be written (never while none is pending).
    async fn due(&self) {
        if self.pending.is_none() {
            return std::future::pending().await;
        }
        tokio::time::sleep_until(self.next_write_at()).await
    }

    /// Writes what is pending; `false` if the store refused it (lease lost or
    /// request final). A failing store is logged and the progress kept for later.
    async fn flush(&mut self, engine: &Engine, id: &str) -> bool {
        let Some(progress) = self.pending.take() else { return true };
        self.last_write = Some(Instant::now());
        match engine.store.record_progress(id, Some(self.lease), &progress).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(request = %id, "progress refused: the request ended or moved elsewhere; stopping the work here");
                false
            }
            Err(e) => {
                tracing::warn!(request = %id, error = %e, "could not record progress");
                self.add(progress);
                true
            }
        }
    }
}

/// The workflow deadline: `workflow` after the first start (as stored, so it
/// holds across restarts), as a monotonic instant.
fn workflow_deadline(started_at: Option<i64>, workflow: Duration) -> Instant {
    let elapsed = started_at.map_or(0, |start| (now_ms() - start).max(0));
    let left = workflow.saturating_sub(Duration::from_millis(elapsed as u64));
    // Far-future deadlines are capped where `Instant` arithmetic stays safe.
    Instant::now() + left.min(Duration::from_secs(100 * 365 * 86_400))
}

fn error_info(failure: AgentFailure, attempts: u32) -> ErrorInfo {
    let message = if failure.retryable && attempts > 1 {
        format!("{} (gave up after {attempts} attempts)", failure.message)
    } else {
        failure.message
    };
    ErrorInfo { kind: failure.kind, message, retryable: failure.retryable }
}

fn timeout_error(limit: &str, after: Duration) -> ErrorInfo {
    ErrorInfo {
        kind: "timeout".into(),
        message: format!("request exceeded {limit} ({}s) and was stopped", after.as_secs_f64()),
        retryable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline runs on the monotonic clock: tokio's paused clock moves
    /// it, and nothing else does.
    #[tokio::test(start_paused = true)]
    async fn the_workflow_deadline_is_monotonic() {
        let deadline = workflow_deadline(Some(now_ms()), Duration::from_secs(60));
        assert!(deadline > Instant::now() + Duration::from_secs(59));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(deadline <= Instant::now(), "61 s of monotonic time passed the 60 s deadline");
    }

    #[test]
    fn a_restart_counts_the_time_already_spent() {
        let started = now_ms() - 50_000;
        let deadline = workflow_deadline(Some(started), Duration::from_secs(60));
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_secs(10) && left > Duration::from_secs(8), "{left:?}");
    }
}
