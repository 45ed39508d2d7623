//! The sweeper: the one path by which unfinished work nobody runs is started.
//!
//! It looks for requests that are unfinished and claimable by this process
//! (queued ones, with no lease, and those whose lease expired) at start-up,
//! every [`SWEEP_EVERY`], and whenever it is woken: a request was queued, one
//! taken on here ended, a formation was loaded. For each loaded formation it
//! takes on the oldest, only as many as its pool has room for, so the queue
//! stays in the store (oldest first, shared by every server on the store) and
//! memory holds only what runs or is about to. A request whose formation is
//! not loaded waits, with a note in its status, until the formation comes back
//! or its workflow timeout (counted from acceptance) passes, when it fails with
//! `formation_unavailable`.

use std::sync::Arc;
use std::time::Duration;

use super::Engine;
use crate::store::{Among, ErrorInfo, Outcome, Progress, RequestRecord};
use crate::time::now_ms;

/// How often unowned work is looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// The most requests of formations not loaded one sweep looks at.
const SWEEP_BATCH: usize = 1000;
/// Requests counted against a user's cap for this long are in the store.
const SETTLED: Duration = Duration::from_secs(10);
/// At most this many of them are checked per full sweep.
const SETTLED_BATCH: usize = 500;

impl Engine {
    /// At start-up: takes over the work of servers that died, then starts the
    /// leases' renewal and the sweeper. With `exclusive` (the data folder's
    /// lock proves no other server uses the store), every lease of another
    /// owner is cleared at once instead of waiting for it to expire.
    pub async fn recover(self: &Arc<Self>, exclusive: bool) -> crate::store::StoreResult<usize> {
        if exclusive {
            let cleared = self.store.clear_others_leases(&self.owner).await?;
            if cleared > 0 {
                tracing::info!(count = cleared, "took over requests left by a stopped server");
            }
        }
        let started = self.sweep(true).await?;
        if started > 0 {
            tracing::info!(count = started, "recovered unfinished requests");
        }
        self.spawn_lease_renewal();
        self.spawn_cancel_watch();
        self.spawn_sweeper();
        Ok(started)
    }

    /// Asks the sweeper to look now (a formation was loaded).
    pub fn wake_sweeper(&self) {
        self.sweep.notify_one();
    }

    fn spawn_sweeper(self: &Arc<Self>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let full = tokio::select! {
                    _ = tick.tick() => true,
                    _ = engine.sweep.notified() => false,
                    _ = engine.shutdown.cancelled() => return,
                };
                if let Err(e) = engine.sweep(full).await {
                    tracing::warn!(error = %e, "cannot look for unfinished requests");
                }
            }
        });
    }

    /// One pass: takes on what each loaded formation has room for; with
    /// `full`, also looks at the requests of formations not loaded. Returns
    /// how many requests it took on.
    async fn sweep(self: &Arc<Self>, full: bool) -> crate::store::StoreResult<usize> {
        if self.shutdown.is_cancelled() {
            return Ok(0);
        }
        let now = now_ms();
        let loaded = self.registry.snapshot();
        let mut started = 0;
        for formation in loaded.formations.values() {
            let room = self.pool(formation).room();
            if room == 0 {
                continue;
            }
            for record in self.store.claimable(&self.owner, now, Among::Formation(&formation.id), room).await? {
                if !self.is_running(&record.id) {
                    self.start(formation.clone(), record, false);
                    started += 1;
                }
            }
        }
        if full {
            self.release_ended_elsewhere().await;
            let ids: Vec<String> = loaded.formations.keys().cloned().collect();
            for record in self.store.claimable(&self.owner, now, Among::AllBut(&ids), SWEEP_BATCH).await? {
                self.wait_for_formation(record, now).await;
            }
        }
        Ok(started)
    }

    /// Stops counting, against their users' caps, requests accepted here that
    /// another replica took on and ended (nothing here saw their end). Those
    /// counted for a moment only are left alone: their insert may not be in
    /// the store yet.
    async fn release_ended_elsewhere(&self) {
        for id in self.per_user.settled(SETTLED, SETTLED_BATCH) {
            if self.is_running(&id) {
                continue;
            }
            match self.store.get(&id).await {
                Ok(Some(record)) if !record.status.is_final() => {}
                // Ended, or gone (removed by retention).
                Ok(_) => self.per_user.release(&id),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check requests counted against their users' caps");
                    return;
                }
            }
        }
    }

    async fn wait_for_formation(&self, record: RequestRecord, now: i64) {
        let gives_up_at = record.created_at.saturating_add(record.workflow_timeout_ms.max(0));
        if now >= gives_up_at {
            let error = ErrorInfo {
                kind: "formation_unavailable".into(),
                message: format!(
                    "formation `{}` was not loaded again within the workflow timeout ({}s)",
                    record.formation_id,
                    record.workflow_timeout_ms / 1000
                ),
                retryable: false,
            };
            if let Err(e) = self.complete(&record, None, &Outcome::Failed(error), None).await {
                tracing::warn!(request = %record.id, error = %e, "cannot fail a request whose formation is gone");
            }
            return;
        }
        let note = format!("waiting for formation `{}` to be loaded", record.formation_id);
        if record.status_message.as_deref() != Some(note.as_str()) {
            tracing::warn!(request = %record.id, formation = %record.formation_id, "formation not loaded: the request waits");
            let progress = Progress { message: Some(note), ..Progress::default() };
            if let Err(e) = self.store.record_progress(&record.id, None, &progress).await {
                tracing::warn!(request = %record.id, error = %e, "cannot note the wait for the formation");
            }
        }
    }
}
