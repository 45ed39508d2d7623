//! The durable request store: the source of truth for every accepted request and
//! for the webhook outbox. One trait, [`Store`]; SQLite ([`sqlite`]) is the embedded
//! default. The trait speaks only in the types below (a request's own are in
//! `records`), never in SQL, so a PostgreSQL implementation can stand beside it.

/// The record columns of `requests r LEFT JOIN deliveries d`, with `$message`
/// for the message: `r.message`, `'' AS message` where it is not read, or
/// (SQLite) an expression that finds it where it is kept.
/// Only a request that has ended can have a delivery (`finish` makes it), so
/// the join looks for one only then: its key is NULL for a request that has
/// not ended, and a NULL key is never looked up, so a poll of a queued request
/// costs no search of the deliveries. (Written as a separate `ON` term, the
/// status test ran only after the search: SQLite evaluates a left join's
/// `ON` terms on the outer table inside the inner loop.)
macro_rules! record_columns {
    ($message:expr) => {
        // The order is fixed: the SQLite store reads these by position (`sqlite::col`).
        concat!(
            "r.id, r.formation_id, r.formation_version, r.user_id, r.session_id, r.agent_id, ",
            $message,
            ", r.mode, r.answered_async, r.estimated_seconds, r.idempotency_key, r.webhook_url, \
             r.workflow_timeout_ms, r.status, r.progress, r.current_step, r.total_steps, r.completed_steps, \
             r.status_message, r.result_text, r.artifacts, r.error, r.attempts, r.created_at, r.started_at, \
             r.completed_at, r.fingerprint, d.status AS webhook_status, d.attempts AS webhook_attempts, \
             d.last_error AS webhook_last_error \
             FROM requests r LEFT JOIN deliveries d \
             ON d.request_id = CASE WHEN r.status <> 'pending' AND r.status <> 'processing' THEN r.id END "
        )
    };
}

/// `SELECT <every record column> FROM requests r LEFT JOIN deliveries d <tail>`,
/// the message read from the row: PostgreSQL's query. The SQLite store, which
/// keeps a long message beside its row, reads the same shape through
/// `select_stored_records!` (defined here, before both, to be in scope).
macro_rules! select_records {
    ($tail:literal) => {
        concat!("SELECT ", record_columns!("r.message"), $tail)
    };
}

mod ids;
pub mod postgres;
mod records;
pub mod sqlite;
mod state;

#[cfg(test)]
mod admin_tests;
#[cfg(test)]
pub(crate) mod contract_tests;
#[cfg(test)]
pub(crate) mod test_backends;

use async_trait::async_trait;
use serde::Serialize;

pub use ids::time_ordered_id;
pub use records::{
    Claim, ErrorInfo, Inserted, Lease, Mode, NewRequest, Outcome, Progress, RequestRecord, RequestResult, Status,
    WebhookState,
};
pub use state::{RequestState, ShowState};

/// Whether the store is taking writes, as last seen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreHealth {
    pub writable: bool,
    /// The last write error while writes fail.
    pub error: Option<String>,
    /// When writes started failing (ms).
    pub failing_since: Option<i64>,
}

impl StoreHealth {
    /// A store whose writes get through.
    pub fn writable() -> StoreHealth {
        StoreHealth { writable: true, error: None, failing_since: None }
    }

    /// A write got through: the store is writable again.
    pub fn note_success(&mut self) {
        if !self.writable {
            tracing::info!("store writes succeed again");
            *self = StoreHealth::writable();
        }
    }

    /// A write failed for want of storage: keep the error and since when.
    pub fn note_failure(&mut self, error: &str) {
        self.writable = false;
        self.error = Some(error.to_string());
        self.failing_since.get_or_insert_with(crate::time::now_ms);
    }
}

/// Filters for listing a user's requests.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub formation_id: String,
    pub user_id: String,
    pub status: Option<Status>,
    pub limit: usize,
}

/// A webhook delivery to write in the outbox together with a request's end.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// The `webhook-id`: stable across retries.
    pub id: String,
    pub url: String,
}

/// A row of the webhook outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: String,
    pub request_id: String,
    pub formation_id: String,
    pub url: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub status: String,
    pub last_error: Option<String>,
}

/// Who holds claims and leases: one id per running server process.
pub type Owner = str;

/// Which formations' requests [`Store::claimable`] looks at.
#[derive(Debug, Clone, Copy)]
pub enum Among<'a> {
    /// One formation's.
    Formation(&'a str),
    /// Every formation's but these.
    AllBut(&'a [String]),
}

impl Among<'_> {
    /// Every formation's.
    #[cfg(test)]
    pub const ALL: Among<'static> = Among::AllBut(&[]);
}

/// The formations that have unfinished requests, each found by one seek of
/// the queue index (`requests_queue`, a loose index scan) rather than by
/// reading the whole queue: how both SQL stores answer [`Among::AllBut`],
/// which then read the queue of each formation left in.
pub(crate) const UNFINISHED_FORMATIONS: &str = "\
    WITH RECURSIVE f(id) AS ( \
        SELECT min(formation_id) FROM requests WHERE status IN ('pending', 'processing') \
        UNION ALL \
        SELECT (SELECT min(formation_id) FROM requests \
                WHERE status IN ('pending', 'processing') AND formation_id > f.id) \
        FROM f WHERE f.id IS NOT NULL) \
    SELECT id FROM f WHERE id IS NOT NULL";

/// Claimable requests read formation by formation, as one list: oldest first,
/// at most `limit`.
fn oldest_first(mut records: Vec<RequestRecord>, limit: usize) -> Vec<RequestRecord> {
    records.sort_unstable_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    records.truncate(limit);
    records
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryUpdate {
    Delivered,
    /// Try again at the given time (ms).
    Retry {
        error: String,
        next_attempt_at: i64,
    },
    /// Give up.
    Failed {
        error: String,
    },
}

/// Filters for listing a formation's requests across all users (admin).
/// `None` filters match everything; `since` is inclusive, `until` exclusive (ms).
#[derive(Debug, Clone, Default)]
pub struct AdminQuery {
    pub formation_id: String,
    pub status: Option<Status>,
    pub agent_id: Option<String>,
    pub user_id: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: usize,
}

/// How many of a formation's requests wait for a slot and how many run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: u64,
    pub processing: u64,
}

/// The webhook outbox at one moment (for `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Deliveries neither delivered nor given up.
    pub pending: u64,
    /// Age of the oldest of them, in ms (0 when none).
    pub oldest_age_ms: u64,
}

/// The re-run links of a request: what it re-runs, and what re-ran it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reruns {
    pub rerun_of: Option<String>,
    /// Newest first.
    pub rerun_as: Vec<String>,
}

/// One session of a user, as listed: derived from its requests and any
/// messages it was seeded with (`restore`).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    pub session_id: String,
    pub created_at: i64,
    /// The latest message or request end.
    pub last_activity: i64,
    /// User turns, agent answers and seeded messages.
    pub message_count: u64,
    pub request_count: u64,
    /// Its requests still pending or processing.
    pub active_requests: u64,
}

/// One message of a session, in order. From a request (`request_id` set: its
/// user turn, then its answer once completed) or seeded by a restore.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMessage {
    pub role: String,
    pub content: String,
    pub request_id: Option<String>,
    pub agent_id: Option<String>,
    /// The request's status, for messages from requests.
    pub status: Option<Status>,
    pub timestamp: i64,
}

/// A message a session is seeded with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSessionMessage {
    pub role: String,
    pub content: String,
    /// The agent that gave an assistant message, if known.
    pub agent_id: Option<String>,
    pub timestamp: i64,
}

/// The formation revision one server process has loaded, as it last said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormationCopy {
    pub formation_id: String,
    /// The process ([`Owner`]) that loaded it.
    pub owner: String,
    /// `version+revision`, as requests record `formation_version`.
    pub revision: String,
    /// When it last said so (ms).
    pub seen_at: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

pub type StoreResult<T> = Result<T, StoreError>;

/// The durable request store. Every write is committed durably before it returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Persists a new request in `pending`. With a `holder`, that server (the
    /// one that accepted it and runs it at once) holds its lease until
    /// `created_at + lease_ms` unless renewed; without, it is queued: unowned,
    /// for whichever server has room to claim it. When `idempotency_key` is set
    /// and an earlier request of the same formation and user has it, returns
    /// that one.
    async fn insert(&self, request: NewRequest, holder: Option<&Owner>, lease_ms: i64) -> StoreResult<Inserted>;

    /// One request by id.
    async fn get(&self, id: &str) -> StoreResult<Option<RequestRecord>>;

    /// One request by id, with its `message` left empty: what a status poll
    /// shows, at a cost that does not grow with the message (up to 1 MB).
    /// Boxed, as [`Inserted`]'s records are.
    async fn get_without_message(&self, id: &str) -> StoreResult<Option<Box<RequestRecord>>> {
        let mut record = self.get(id).await?.map(Box::new);
        if let Some(record) = &mut record {
            record.message = String::new();
        }
        Ok(record)
    }

    /// Shows `show` the state of request `id` (all of it but its message) and
    /// says whether there is such a request: a status poll's read. The state is
    /// lent, not returned, so a store that can lend it from the row it reads
    /// builds no record for it.
    async fn show_state(&self, id: &str, show: &mut ShowState<'_>) -> StoreResult<bool> {
        let record = self.get_without_message(id).await?;
        if let Some(record) = &record {
            show(&RequestState::of(record));
        }
        Ok(record.is_some())
    }

    /// A user's requests in a formation, newest first.
    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<RequestRecord>>;

    /// Begins an attempt under a lease for `owner`: a `pending` or
    /// `processing` request that no other owner holds (or whose lease expired
    /// before `now`) becomes `processing`, `attempts` grows by one,
    /// `started_at` is set if unset, the lease epoch grows by one and the lease
    /// runs until `now + lease_ms`. `None` when the request is final or held.
    async fn claim(&self, id: &str, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Option<Claim>>;

    /// Extends every lease `owner` holds to `now + lease_ms`; returns the ids
    /// of the requests it still holds (a request missing was taken over or ended).
    async fn renew_leases(&self, owner: &Owner, now: i64, lease_ms: i64) -> StoreResult<Vec<String>>;

    /// Gives a request back unfinished (shutdown, or its formation went away):
    /// anyone may claim it again at once. Fenced by `lease`.
    async fn release(&self, id: &str, lease: Lease) -> StoreResult<bool>;

    /// Clears every lease and delivery claim not held by `owner`. Only for a
    /// store one server has to itself (the data folder's lock proves the
    /// others dead), at start-up.
    async fn clear_others_leases(&self, owner: &Owner) -> StoreResult<u64>;

    /// Records progress of a non-final request; with `fence`, only while that
    /// lease is current. Returns `false` (changing nothing) when the request is
    /// final or the lease lost.
    async fn record_progress(&self, id: &str, fence: Option<Lease>, progress: &Progress) -> StoreResult<bool>;

    /// Records that the caller was answered with the id (promotion to 202).
    async fn mark_answered_async(&self, id: &str) -> StoreResult<()>;

    /// Ends a non-final request, writing the webhook outbox row (if any) in the
    /// same transaction. With `fence`, only while that lease is current (a
    /// runner's end); without (a user's cancel), whoever comes first. Returns
    /// `false`, changing nothing, if it was already final or the fence failed.
    async fn finish(
        &self,
        id: &str,
        outcome: &Outcome,
        now: i64,
        delivery: Option<NewDelivery>,
        fence: Option<Lease>,
    ) -> StoreResult<bool>;

    /// Requests left `pending` or `processing` that nobody holds (queued ones,
    /// with no lease, or another owner's that expired before `now`), `among`
    /// some formations. Oldest first, at most `limit`.
    async fn claimable(
        &self,
        owner: &Owner,
        now: i64,
        among: Among<'_>,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>>;

    /// Deletes requests (and their deliveries) that ended before `cutoff`: of
    /// one formation, or of all with `None`.
    async fn purge_finished_before(&self, formation_id: Option<&str>, cutoff: i64) -> StoreResult<u64>;

    /// Durations (ms) of the latest completed requests of a formation's agent,
    /// newest first.
    async fn recent_durations(&self, formation_id: &str, agent_id: &str, limit: usize) -> StoreResult<Vec<i64>>;

    /// The completed requests of a session, oldest first, as (message, answer).
    async fn session_turns(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, String)>>;

    /// Claims pending deliveries whose time has come and that nobody holds
    /// (or whose claim expired), oldest first, for `owner` until
    /// `now + claim_ms`: each is returned to one claimer only.
    async fn claim_deliveries(
        &self,
        owner: &Owner,
        now: i64,
        limit: usize,
        claim_ms: i64,
    ) -> StoreResult<Vec<Delivery>>;

    /// Records the result of an attempt of a delivery `owner` claimed
    /// (attempts grows by one, the claim is released). `false` if the claim
    /// was lost or the delivery is no longer pending.
    async fn record_delivery(&self, id: &str, owner: &Owner, update: &DeliveryUpdate) -> StoreResult<bool>;

    /// Whether writes are getting through, as last seen.
    fn health(&self) -> StoreHealth;

    /// The webhook outbox now (`now`: ms since the epoch), for metrics.
    async fn outbox_stats(&self, now: i64) -> StoreResult<Option<OutboxStats>>;

    /// Ids of requests cancelled by any server sharing this store, as they are
    /// cancelled (best effort: the lease renewal catches any missed). A store
    /// only one server uses never yields.
    fn watch_cancels(&self) -> futures::stream::BoxStream<'static, String> {
        Box::pin(futures::stream::pending())
    }

    // The admin console's reads and actions.

    /// A formation's requests of every user, filtered, newest first.
    async fn admin_list(&self, query: &AdminQuery) -> StoreResult<Vec<RequestRecord>>;

    /// How many of a formation's requests are pending and processing.
    async fn backlog(&self, formation_id: &str) -> StoreResult<Backlog>;

    /// The webhook delivery of a request, if it has one.
    async fn delivery_of(&self, request_id: &str) -> StoreResult<Option<Delivery>>;

    /// Makes a request's pending or failed delivery due at `now` (a delivered one
    /// is left alone). Returns the delivery as it now is, or `None` if there is none.
    async fn retry_delivery(&self, request_id: &str, now: i64) -> StoreResult<Option<Delivery>>;

    /// Records that `request_id` re-runs `original_id`.
    async fn link_rerun(&self, request_id: &str, original_id: &str) -> StoreResult<()>;

    /// The re-run links of a request.
    async fn reruns(&self, request_id: &str) -> StoreResult<Reruns>;

    // Sessions and the event feed.

    /// A user's sessions in a formation, latest activity first; with
    /// `active_only`, those with a request still pending or processing.
    async fn sessions(
        &self,
        formation_id: &str,
        user_id: &str,
        active_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<SessionSummary>>;

    /// One session of a user, if it has any request or seeded message.
    async fn session(&self, formation_id: &str, user_id: &str, session_id: &str)
        -> StoreResult<Option<SessionSummary>>;

    /// A session's messages in order (oldest first): seeded ones and those of
    /// its requests; at most the latest `limit` from before `before` (ms).
    async fn session_messages(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<SessionMessage>>;

    /// Replaces a session's seeded messages with `messages`.
    async fn restore_session(
        &self,
        formation_id: &str,
        user_id: &str,
        session_id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> StoreResult<()>;

    /// A user's requests accepted or ended at or after `since` (ms), oldest
    /// accepted first, at most `limit`: the durable side of the event feed.
    async fn lifecycle_since(
        &self,
        formation_id: &str,
        user_id: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>>;

    // Formation copies: which revision each replica loaded.

    /// Records that `owner` has loaded `copies` (formation id, revision) at
    /// `now`, and forgets its copies of formations not among them.
    async fn publish_copies(&self, owner: &Owner, copies: &[(String, String)], now: i64) -> StoreResult<()>;

    /// Every owner's copies last published at or after `since` (ms), by
    /// formation and owner.
    async fn formation_copies(&self, since: i64) -> StoreResult<Vec<FormationCopy>>;
}

#[cfg(test)]
mod message_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod state_tests;
