//! The formation-wide feed of request lifecycle events (accepted, progress,
//! completed, failed, cancelled) behind `GET /events`: one bounded broadcast per
//! formation, created on the first subscription, that the engine publishes to.
//!
//! Every event has an id ordered by `(timestamp, rank, request id)`. Accepted and
//! ended events take their timestamp from the stored row (`created_at`,
//! `completed_at`), so the store can replay exactly the same events after a
//! disconnect ([`replay`]); progress events are live only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::store::{RequestRecord, Status};

/// Events kept per formation for slow subscribers; one that falls further
/// behind catches up from the store.
const FEED_BUFFER: usize = 256;

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Accepted,
    Progress,
    Completed,
    Failed,
    Cancelled,
}

impl Kind {
    /// The event's name on the wire (`event:` of the SSE frame).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Accepted => "request.accepted",
            Kind::Progress => "request.progress",
            Kind::Completed => "request.completed",
            Kind::Failed => "request.failed",
            Kind::Cancelled => "request.cancelled",
        }
    }

    /// Orders events of the same millisecond: accepted, progress, then the end.
    fn rank(self) -> u8 {
        match self {
            Kind::Accepted => 0,
            Kind::Progress => 1,
            Kind::Completed | Kind::Failed | Kind::Cancelled => 2,
        }
    }

    /// The end event of a final status.
    pub fn ended(status: Status) -> Option<Kind> {
        match status {
            Status::Completed => Some(Kind::Completed),
            Status::Failed => Some(Kind::Failed),
            Status::Cancelled => Some(Kind::Cancelled),
            Status::Pending | Status::Processing => None,
        }
    }
}

/// An event id: `<ms, 13 digits>-<rank>-<request id>`, ordered as text and as a tuple.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub at: i64,
    pub rank: u8,
    pub request_id: String,
}

impl EventId {
    pub fn parse(text: &str) -> Option<EventId> {
        let (at, rest) = text.trim().split_once('-')?;
        let (rank, request_id) = rest.split_once('-')?;
        let at: i64 = at.parse().ok().filter(|at| *at >= 0)?;
        let rank: u8 = rank.parse().ok().filter(|r| *r <= 2)?;
        let valid = !request_id.is_empty()
            && request_id.len() <= 128
            && request_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        valid.then(|| EventId { at, rank, request_id: request_id.to_string() })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:013}-{}-{}", self.at, self.rank, self.request_id)
    }
}

/// One lifecycle event, with the request as it was then.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub id: EventId,
    pub kind: Kind,
    pub record: RequestRecord,
}

impl Lifecycle {
    /// The event `kind` of `record` at `at` (ms).
    pub fn new(kind: Kind, record: RequestRecord, at: i64) -> Lifecycle {
        Lifecycle { id: EventId { at, rank: kind.rank(), request_id: record.id.clone() }, kind, record }
    }
}

/// The durable events of stored requests with ids after `after`, in id order:
/// each request's acceptance and, once it has ended, its end.
pub fn replay(records: &[RequestRecord], after: &EventId) -> Vec<Lifecycle> {
    let mut events: Vec<Lifecycle> = Vec::new();
    for record in records {
        events.push(Lifecycle::new(Kind::Accepted, as_accepted(record), record.created_at));
        if let (Some(kind), Some(at)) = (Kind::ended(record.status), record.completed_at) {
            events.push(Lifecycle::new(kind, record.clone(), at));
        }
    }
    events.retain(|e| &e.id > after);
    events.sort_by(|a, b| a.id.cmp(&b.id));
    events
}

/// One page of a catch-up: the stored requests accepted or ended at or after
/// `since` (oldest accepted first), `full` when the store had more than it
/// returned. Gives the events after `after` that the page holds completely, and
/// where the next page starts (`None`: this was the last).
///
/// With a full page only events before the last acceptance read are certain to
/// be complete (a request accepted at that millisecond may be on the next page);
/// when a page cannot advance (more requests in one millisecond than a page) it
/// is given whole and ends the catch-up.
pub fn replay_page(
    records: &[RequestRecord],
    after: &EventId,
    since: i64,
    full: bool,
) -> (Vec<Lifecycle>, Option<i64>) {
    let mut events = replay(records, after);
    events.retain(|e| e.id.at >= since);
    let boundary = records.last().map(|r| r.created_at).filter(|_| full);
    match boundary {
        Some(boundary) if boundary > since => {
            events.retain(|e| e.id.at < boundary);
            (events, Some(boundary))
        }
        _ => (events, None),
    }
}

/// A request as it was when accepted (what its live acceptance event showed).
fn as_accepted(record: &RequestRecord) -> RequestRecord {
    let mut accepted = record.clone();
    accepted.status = Status::Pending;
    accepted.progress = 0.0;
    accepted.current_step = None;
    accepted.total_steps = None;
    accepted.completed_steps = None;
    accepted.status_message = None;
    accepted.result = None;
    accepted.error = None;
    accepted.attempts = 0;
    accepted.started_at = None;
    accepted.completed_at = None;
    accepted.webhook = None;
    accepted
}

/// The feeds of all formations.
#[derive(Default)]
pub struct Feeds {
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<Lifecycle>>>>,
}

impl Feeds {
    /// Follows a formation's events from now on.
    pub fn subscribe(&self, formation_id: &str) -> broadcast::Receiver<Arc<Lifecycle>> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.entry(formation_id.to_string()).or_insert_with(|| broadcast::channel(FEED_BUFFER).0).subscribe()
    }

    /// Publishes an event of `record` now (progress) to whoever follows its
    /// formation; `record` is only called when someone does.
    pub fn progress(&self, formation_id: &str, record: impl FnOnce() -> RequestRecord) {
        self.send(formation_id, || Lifecycle::new(Kind::Progress, record(), crate::time::now_ms()));
    }

    /// Publishes a request's acceptance (at its `created_at`).
    pub fn accepted(&self, record: &RequestRecord) {
        self.send(&record.formation_id, || Lifecycle::new(Kind::Accepted, record.clone(), record.created_at));
    }

    /// Publishes a request's end (at its `completed_at`).
    pub fn ended(&self, record: &RequestRecord) {
        let (Some(kind), Some(at)) = (Kind::ended(record.status), record.completed_at) else { return };
        self.send(&record.formation_id, || Lifecycle::new(kind, record.clone(), at));
    }

    fn send(&self, formation_id: &str, event: impl FnOnce() -> Lifecycle) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = channels.get(formation_id) else { return };
        if sender.receiver_count() == 0 {
            // Nobody follows this formation any more: drop its channel.
            channels.remove(formation_id);
            return;
        }
        let _ = sender.send(Arc::new(event()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewRequest, RequestRecord};

    fn record(id: &str, created_at: i64, status: Status, completed_at: Option<i64>) -> RequestRecord {
        let mut r = RequestRecord::accepted(NewRequest {
            id: id.into(),
            formation_id: "f".into(),
            formation_version: "1".into(),
            user_id: "u".into(),
            session_id: None,
            agent_id: "a".into(),
            message: "m".into(),
            mode: crate::store::Mode::Async,
            estimated_seconds: 1.0,
            idempotency_key: None,
            fingerprint: None,
            workflow_timeout_ms: 60_000,
            webhook_url: None,
            created_at,
        });
        r.status = status;
        r.completed_at = completed_at;
        r
    }

    #[test]
    fn ids_round_trip_and_order_by_time_then_rank() {
        let a = EventId { at: 5, rank: 0, request_id: "req_b".into() };
        let b = EventId { at: 5, rank: 2, request_id: "req_a".into() };
        let c = EventId { at: 40, rank: 0, request_id: "req_a".into() };
        assert!(a < b && b < c);
        assert!(a.to_string() < b.to_string() && b.to_string() < c.to_string());
        assert_eq!(EventId::parse(&c.to_string()), Some(c));
        for bad in ["", "x", "12", "12-9-req", "-1-0-req", "12-0-", "12-0-a b", "a-0-req"] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replay_gives_acceptances_and_ends_after_the_id_in_order() {
        let records = [
            record("req_1", 10, Status::Completed, Some(30)),
            record("req_2", 20, Status::Processing, None),
            record("req_3", 25, Status::Cancelled, Some(26)),
        ];
        let all = replay(&records, &EventId { at: 0, rank: 0, request_id: String::new() });
        let names: Vec<String> = all.iter().map(|e| format!("{}:{}", e.record.id, e.kind.as_str())).collect();
        assert_eq!(
            names,
            [
                "req_1:request.accepted",
                "req_2:request.accepted",
                "req_3:request.accepted",
                "req_3:request.cancelled",
                "req_1:request.completed"
            ]
        );
        let after = all[2].id.clone();
        let rest: Vec<String> = replay(&records, &after).iter().map(|e| e.id.to_string()).collect();
        assert_eq!(rest, [all[3].id.to_string(), all[4].id.to_string()]);
    }

    #[test]
    fn pages_give_only_the_events_they_hold_completely() {
        let start = EventId { at: 0, rank: 0, request_id: String::new() };
        // A full page ending with a request accepted at 30: events at 30 and
        // later wait for the next page, which starts at 30.
        let page = [record("req_1", 10, Status::Completed, Some(40)), record("req_2", 30, Status::Pending, None)];
        let (events, next) = replay_page(&page, &start, 0, true);
        let ids: Vec<String> = events.iter().map(|e| format!("{}@{}", e.record.id, e.id.at)).collect();
        assert_eq!((ids, next), (vec!["req_1@10".to_string()], Some(30)));
        // The next page: events from 30 on, and it was the last.
        let page = [record("req_1", 10, Status::Completed, Some(40)), record("req_2", 30, Status::Pending, None)];
        let (events, next) = replay_page(&page, &start, 30, false);
        let ids: Vec<String> = events.iter().map(|e| format!("{}@{}", e.record.id, e.id.at)).collect();
        assert_eq!((ids, next), (vec!["req_2@30".to_string(), "req_1@40".to_string()], None));
        // A full page that cannot advance is given whole and ends the catch-up.
        let page = [record("req_3", 50, Status::Pending, None), record("req_4", 50, Status::Pending, None)];
        let (events, next) = replay_page(&page, &start, 50, true);
        assert_eq!((events.len(), next), (2, None));
    }

    #[test]
    fn events_reach_subscribers_of_their_formation_only() {
        let feeds = Feeds::default();
        feeds.accepted(&record("req_0", 1, Status::Pending, None)); // nobody follows yet
        let mut f = feeds.subscribe("f");
        let mut other = feeds.subscribe("g");
        feeds.accepted(&record("req_1", 1, Status::Pending, None));
        feeds.ended(&record("req_1", 1, Status::Failed, Some(2)));
        feeds.ended(&record("req_2", 1, Status::Processing, None)); // not an end
        assert_eq!(f.try_recv().unwrap().kind, Kind::Accepted);
        assert_eq!(f.try_recv().unwrap().kind, Kind::Failed);
        assert!(f.try_recv().is_err());
        assert!(other.try_recv().is_err());
    }
}
