//! Cancels made by another server sharing the store (PostgreSQL replicas):
//! the store announces each cancelled id ([`crate::store::Store::watch_cancels`]);
//! if this process runs that request, its waiters get the final record and its
//! agent is stopped at once. Missed announcements are caught by the lease
//! renewal, which stops work whose request is no longer held (a cancelled
//! request is final, so its lease is not renewed).

use std::sync::Arc;

use futures::StreamExt;

use super::Engine;

impl Engine {
    /// Stops the work here of requests cancelled elsewhere, until shutdown.
    pub(super) fn spawn_cancel_watch(self: &Arc<Self>) {
        let engine = self.clone();
        let mut cancels = engine.store.watch_cancels();
        tokio::spawn(async move {
            loop {
                let id = tokio::select! {
                    id = cancels.next() => match id {
                        Some(id) => id,
                        None => return,
                    },
                    _ = engine.shutdown.cancelled() => return,
                };
                let Some(live) = engine.live(&id) else { continue };
                if live.is_done() {
                    continue;
                }
                match engine.store.get(&id).await {
                    Ok(Some(record)) if record.status.is_final() => {
                        tracing::info!(request = %id, "cancelled on another server: stopping the work here");
                        engine.feed.ended(&record);
                        live.finish(record);
                        live.cancel.cancel();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(request = %id, error = %e, "cannot read a request cancelled elsewhere"),
                }
            }
        });
    }
}
