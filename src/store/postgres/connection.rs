//! The PostgreSQL store's connection: which of its errors mean the database failed
//! (noted in the store's health), the password hidden from messages, and the cancels' listener.

use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

use super::CANCEL_CHANNEL;
use crate::store::{StoreError, StoreHealth, StoreResult};

/// Notes the outcome of a write in `health`: a success, or a failure for want
/// of storage (an error of the request itself says nothing of the store).
pub(super) fn note_on<T>(health: &Mutex<StoreHealth>, name: &str, result: Result<T, sqlx::Error>) -> StoreResult<T> {
    let mut health = health.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(value) => {
            health.note_success();
            Ok(value)
        }
        Err(e) => {
            let error = StoreError(format!("{name}: {e}"));
            if is_storage_failure(&e) {
                health.note_failure(&error.0);
            }
            Err(error)
        }
    }
}

/// Hides the password of `url` wherever it appears in `text`.
pub(super) fn redact(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(credentials, _)| credentials.split_once(':'))
        .map(|(_, password)| password);
    match password {
        Some(password) if !password.is_empty() => text.replace(password, "***"),
        _ => text.to_owned(),
    }
}

/// Errors that come from the database being unreachable or refusing writes
/// rather than from the request.
fn is_storage_failure(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection, 53: resources (disk full), 57: operator intervention, 25006: read-only.
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57") || code == "25006"
        }
        _ => false,
    }
}

/// Forwards cancel notifications; the listener reconnects by itself when its
/// connection drops (cancels sent meanwhile are caught by the lease renewal).
pub(super) async fn listen(mut listener: PgListener, cancels: broadcast::Sender<String>) {
    if let Err(e) = listener.listen(CANCEL_CHANNEL).await {
        tracing::warn!(error = %e, "cannot listen for cancels; other replicas' cancels stop work here at the next lease renewal");
        return;
    }
    loop {
        match listener.recv().await {
            Ok(notification) => {
                let _ = cancels.send(notification.payload().to_owned());
            }
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cancel listener failed; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
