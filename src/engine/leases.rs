//! Leases: how one runner owns a request's attempt, and how a dead one is noticed.
//!
//! The server that accepts a request holds it from the insert on: the store
//! row names this process (its [`owner_id`]) and an expiry. A background task
//! renews every lease this process holds in one write every [`renew_every`];
//! a request whose lease expired (its server died or stalled) may be claimed
//! by anyone, and each claim raises the lease epoch, so writes of the old
//! runner (fenced by its epoch) change nothing. A request that this process
//! still runs but no longer holds is stopped here without recording anything.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;
use crate::time::now_ms;

/// How long a lease lasts without renewal (unless `MUXI_LEASE_SECS` says otherwise).
pub const LEASE: Duration = Duration::from_secs(30);
/// The bounds of `MUXI_LEASE_SECS`.
const LEASE_SECS_RANGE: std::ops::RangeInclusive<u64> = 3..=300;

/// The lease time of this process: [`LEASE`], or `MUXI_LEASE_SECS` (3-300;
/// tests shorten it to see takeovers sooner). Read once.
pub fn lease() -> Duration {
    static LEASE_TIME: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LEASE_TIME.get_or_init(|| {
        let Ok(text) = std::env::var("MUXI_LEASE_SECS") else { return LEASE };
        match text.trim().parse::<u64>() {
            Ok(secs) if LEASE_SECS_RANGE.contains(&secs) => Duration::from_secs(secs),
            _ => {
                tracing::warn!(value = %text, "MUXI_LEASE_SECS must be a whole number of seconds in 3-300; using {LEASE:?}");
                LEASE
            }
        }
    })
}

/// How often this process renews its leases: a third of [`lease`].
pub fn renew_every() -> Duration {
    lease() / 3
}

/// [`lease`] in the store's milliseconds.
pub fn lease_ms() -> i64 {
    lease().as_millis() as i64
}

/// A name for this server process, unique across restarts and hosts.
pub fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = if host.is_empty() { "host" } else { host };
    format!("{host}:{}:{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

impl Engine {
    /// Renews this process's leases until shutdown, stopping the work of any
    /// request whose lease was taken over, and publishes the formations it
    /// has loaded (the first tick is at once, so at start-up too).
    pub(super) fn spawn_lease_renewal(self: &Arc<Self>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(renew_every());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = engine.shutdown.cancelled() => return,
                }
                engine.renew_leases().await;
                engine.publish_copies().await;
            }
        });
    }

    /// Tells the store which revision of each formation this process has
    /// loaded, so replicas whose copies differ can say so in `/health`.
    async fn publish_copies(&self) {
        let live = self.registry.snapshot();
        let copies: Vec<(String, String)> =
            live.formations.values().map(|f| (f.id.clone(), f.version_label())).collect();
        if let Err(e) = self.store.publish_copies(&self.owner, &copies, now_ms()).await {
            tracing::warn!(error = %e, "cannot publish this replica's formation copies");
        }
    }

    async fn renew_leases(&self) {
        let started = Instant::now();
        let held = match self.store.renew_leases(&self.owner, now_ms(), lease_ms()).await {
            Ok(held) => held.into_iter().collect::<HashSet<String>>(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew leases; they expire in {:?} unless a renewal gets through", lease());
                return;
            }
        };
        for (id, live) in self.running_snapshot() {
            // A lease claimed after the renewal began is not in its answer.
            let claimed_before = live.claimed_at().is_some_and(|at| at < started);
            if claimed_before && !held.contains(&id) && !live.is_done() {
                tracing::warn!(request = %id, "lease lost to another runner: stopping the work here");
                live.lost.cancel();
            }
        }
    }
}
