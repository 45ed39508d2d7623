//! Group commit of accepted requests on PostgreSQL. This module owns the one
//! background task that writes new requests: it takes one insert from its
//! channel, drains whatever else is already queued (up to [`MAX_BATCH`]) and
//! writes them all with ONE `INSERT ... SELECT FROM UNNEST(...)` statement, so
//! one transaction and one WAL flush pay for the whole batch.
//!
//! The task only says, per request, what the statement did ([`Written`]); the
//! caller finishes the answer on its own task (see `PgStore::insert`): a row
//! skipped by the idempotency key is resolved against the winner, which is
//! committed by then, and a request of a failed batch is retried alone.
//!
//! The task ends when the [`Inserter`] (held by the `PgStore`) is dropped, after
//! writing what was already queued. A caller whose request the task can no
//! longer take or answer gets a [`StoreError`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::connection::note_on;
use crate::store::{Mode, NewRequest, StoreError, StoreHealth, StoreResult};

/// The most requests one statement carries.
pub(super) const MAX_BATCH: usize = 256;
/// Requests that may wait for the writer before callers wait to queue theirs.
const QUEUE: usize = 16 * MAX_BATCH;

/// One statement for the whole batch; `ON CONFLICT DO NOTHING` also skips the
/// second of two rows of the batch that share a key, and `RETURNING` names the
/// rows written.
const INSERT_SQL: &str = "INSERT INTO requests (id, formation_id, formation_version, user_id, session_id, \
     agent_id, message, mode, answered_async, estimated_seconds, idempotency_key, fingerprint, \
     webhook_url, workflow_timeout_ms, created_at, lease_owner, lease_expires_at, status) \
     SELECT t.*, 'pending' FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::boolean[], $10::float8[], $11::text[], $12::text[], \
     $13::text[], $14::bigint[], $15::bigint[], $16::text[], $17::bigint[]) AS t \
     ON CONFLICT (formation_id, user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
     RETURNING id";

/// What the batch statement did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// The row is written and committed.
    Created,
    /// The idempotency key was taken (by a committed row): nothing written.
    Skipped,
    /// Not written: the batch failed, or the request must run alone (its id
    /// repeats one earlier in the batch). The caller retries it on its own.
    Alone,
}

/// A request waiting for the writer.
struct Queued {
    request: NewRequest,
    holder: Option<String>,
    lease_ms: i64,
    reply: oneshot::Sender<(NewRequest, Written)>,
}

/// The handle to the writer task; dropping it stops the task.
pub(super) struct Inserter {
    queue: mpsc::Sender<Queued>,
    batches: Arc<AtomicU64>,
}

impl Inserter {
    /// Starts the writer task on the current runtime.
    pub(super) fn start(pool: PgPool, health: Arc<Mutex<StoreHealth>>) -> Inserter {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(pool, receiver, health, batches.clone()));
        Inserter { queue, batches }
    }

    /// Batch statements committed so far; under load far fewer than the
    /// requests they carried.
    pub(super) fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Queues `request` for the next batch and waits for that batch's
    /// statement; hands the request back with what was done with it.
    pub(super) async fn write(
        &self,
        request: NewRequest,
        holder: Option<&str>,
        lease_ms: i64,
    ) -> StoreResult<(NewRequest, Written)> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { request, holder: holder.map(str::to_owned), lease_ms, reply };
        self.queue.send(queued).await.map_err(|_| StoreError("insert: the request writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError("insert: the request writer stopped before answering".into()))
    }
}

impl std::fmt::Debug for Inserter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inserter").field("batches", &self.batches()).finish_non_exhaustive()
    }
}

async fn writer(
    pool: PgPool,
    mut queue: mpsc::Receiver<Queued>,
    health: Arc<Mutex<StoreHealth>>,
    batches: Arc<AtomicU64>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    // `recv_many` waits for one request, then takes what else is queued; it
    // returns 0 once every sender is gone and the queue is empty.
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let written = write_batch(&pool, &batch).await;
        let ok = written.is_ok();
        crate::observability::metrics::store_batch(batch.len(), started.elapsed(), ok);
        // A failed batch marks the store unhealthy only for want of storage
        // (as any write does); its requests are retried alone and note theirs.
        let answers = match note_on(&health, "insert", written) {
            Ok(answers) => {
                batches.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(requests = batch.len(), "request batch committed");
                answers
            }
            Err(e) => {
                // Not a warning: one bad request (a client's) fails its batch too.
                tracing::debug!(requests = batch.len(), error = %e, "request batch failed; retrying each alone");
                vec![Written::Alone; batch.len()]
            }
        };
        for (queued, written) in batch.drain(..).zip(answers) {
            // A caller that gave up no longer listens: nothing to do.
            let _ = queued.reply.send((queued.request, written));
        }
    }
    tracing::debug!("request writer stopped");
}

/// Writes the batch with one statement and says what became of each request,
/// in the batch's order.
async fn write_batch(pool: &PgPool, batch: &[Queued]) -> Result<Vec<Written>, sqlx::Error> {
    // A repeated id would fail the whole statement (or, with a repeated key
    // too, be taken for the first): such a request runs alone afterwards.
    let mut ids = HashSet::with_capacity(batch.len());
    let in_statement: Vec<bool> = batch.iter().map(|q| ids.insert(q.request.id.as_str())).collect();
    let rows = || batch.iter().zip(&in_statement).filter(|(_, keep)| **keep).map(|(q, _)| q);
    let text = |f: fn(&Queued) -> &str| rows().map(f).collect::<Vec<&str>>();
    let optional = |f: fn(&Queued) -> Option<&str>| rows().map(f).collect::<Vec<Option<&str>>>();
    let created: Vec<String> = sqlx::query_scalar(INSERT_SQL)
        .bind(text(|q| &q.request.id))
        .bind(text(|q| &q.request.formation_id))
        .bind(text(|q| &q.request.formation_version))
        .bind(text(|q| &q.request.user_id))
        .bind(optional(|q| q.request.session_id.as_deref()))
        .bind(text(|q| &q.request.agent_id))
        .bind(text(|q| &q.request.message))
        .bind(text(|q| q.request.mode.as_str()))
        .bind(rows().map(|q| q.request.mode == Mode::Async).collect::<Vec<bool>>())
        .bind(rows().map(|q| q.request.estimated_seconds).collect::<Vec<f64>>())
        .bind(optional(|q| q.request.idempotency_key.as_deref()))
        .bind(optional(|q| q.request.fingerprint.as_deref()))
        .bind(optional(|q| q.request.webhook_url.as_deref()))
        .bind(rows().map(|q| q.request.workflow_timeout_ms).collect::<Vec<i64>>())
        .bind(rows().map(|q| q.request.created_at).collect::<Vec<i64>>())
        .bind(optional(|q| q.holder.as_deref()))
        .bind(
            rows()
                .map(|q| q.holder.as_ref().map(|_| q.request.created_at.saturating_add(q.lease_ms)))
                .collect::<Vec<Option<i64>>>(),
        )
        .fetch_all(pool)
        .await?;
    let created: HashSet<String> = created.into_iter().collect();
    Ok(batch
        .iter()
        .zip(in_statement)
        .map(|(q, in_statement)| match (in_statement, created.contains(&q.request.id)) {
            (false, _) => Written::Alone,
            (true, true) => Written::Created,
            (true, false) => Written::Skipped,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::store::contract_tests::{created, request, LEASE_MS, ME};
    use crate::store::postgres::PgStore;
    use crate::store::test_backends::{Backend, TestStore};
    use crate::store::{Inserted, NewRequest, StoreResult};

    fn pg(store: &TestStore) -> &PgStore {
        match store {
            TestStore::Postgres(store, _) => store,
            TestStore::Sqlite(..) => unreachable!("a PostgreSQL test"),
        }
    }

    /// Inserts every request at once (each in a task of its own), answers in order.
    async fn insert_all(store: &Arc<TestStore>, requests: Vec<(NewRequest, bool)>) -> Vec<StoreResult<Inserted>> {
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|(request, held)| {
                let store = store.clone();
                tokio::spawn(async move { store.insert(request, held.then_some(ME), LEASE_MS).await })
            })
            .collect();
        let mut answers = Vec::with_capacity(tasks.len());
        for task in tasks {
            answers.push(task.await.expect("task"));
        }
        answers
    }

    /// 500 callers at once: plain requests (with and without a lease holder)
    /// and 30 idempotency keys shared by 6 callers each (one of them with
    /// another fingerprint). They share batches, and each gets its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_are_batched_and_each_caller_gets_its_answer() {
        const INSERTS: usize = 500;
        const KEYS: usize = 30;
        const PER_KEY: usize = 6;
        let store = Arc::new(TestStore::open(Backend::Postgres).await);
        let before = pg(&store).insert_batches();

        // (request, with a holder)
        let new = |i: usize| -> (NewRequest, bool) {
            let plain = request(&format!("req_{i:03}"), 1_000 + i as i64);
            if i < KEYS * PER_KEY {
                let fingerprint = if i / KEYS == PER_KEY - 1 { "fp-b" } else { "fp-a" };
                let keyed = NewRequest {
                    idempotency_key: Some(format!("k{}", i % KEYS)),
                    fingerprint: Some(fingerprint.into()),
                    ..plain
                };
                (keyed, true)
            } else {
                (plain, i % 2 == 1)
            }
        };
        let answers = insert_all(&store, (0..INSERTS).map(new).collect()).await;
        let batches = pg(&store).insert_batches() - before;
        eprintln!("{INSERTS} concurrent inserts in {batches} batches");
        assert!(0 < batches && batches < INSERTS as u64, "inserts were not batched: {batches} batches");
        assert!(store.health().writable);

        // Each key: one winner; the others see it, told apart by fingerprint.
        let mut winners: HashMap<String, (String, Option<String>)> = HashMap::new();
        for (i, answer) in answers.iter().enumerate() {
            let (asked, _) = new(i);
            if let (Some(key), Ok(Inserted::Created(record))) = (&asked.idempotency_key, answer) {
                let previous = winners.insert(key.clone(), (record.id.clone(), asked.fingerprint.clone()));
                assert!(previous.is_none(), "two requests created for key {key}");
            }
        }
        assert_eq!(winners.len(), KEYS);
        for (i, answer) in answers.into_iter().enumerate() {
            let (asked, _) = new(i);
            let answer = answer.unwrap_or_else(|e| panic!("req_{i:03} failed: {e}"));
            let Some(key) = &asked.idempotency_key else {
                assert!(matches!(&answer, Inserted::Created(r) if r.id == asked.id), "req_{i:03}: {answer:?}");
                continue;
            };
            let (winner, fingerprint) = &winners[key];
            match answer {
                Inserted::Created(record) => assert_eq!(&record.id, winner),
                Inserted::Existing(record) => {
                    assert_eq!(&record.id, winner);
                    assert_eq!(&asked.fingerprint, fingerprint, "req_{i:03}: Existing for another fingerprint");
                }
                Inserted::KeyReused(record) => {
                    assert_eq!(&record.id, winner);
                    assert_ne!(&asked.fingerprint, fingerprint, "req_{i:03}: KeyReused for the same fingerprint");
                }
            }
        }

        // What the table holds: one row per key, leases as asked.
        let per_key: Vec<i64> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM requests WHERE idempotency_key IS NOT NULL GROUP BY idempotency_key",
        )
        .fetch_all(pg(&store).pool())
        .await
        .expect("count per key");
        assert_eq!(per_key, vec![1; KEYS]);
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM requests").fetch_one(pg(&store).pool()).await.expect("count");
        assert_eq!(total as usize, KEYS + (INSERTS - KEYS * PER_KEY));
        let leases: Vec<(String, i64, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT id, created_at, lease_owner, lease_expires_at FROM requests WHERE idempotency_key IS NULL",
        )
        .fetch_all(pg(&store).pool())
        .await
        .expect("leases");
        for (id, created_at, owner, expires) in leases {
            if id.trim_start_matches("req_").parse::<usize>().expect("an id") % 2 == 1 {
                assert_eq!((owner.as_deref(), expires), (Some(ME), Some(created_at + LEASE_MS)), "{id}");
            } else {
                assert_eq!((owner, expires), (None, None), "{id}");
            }
        }
    }

    /// Bad requests among good ones at once (a duplicate id and a NUL byte,
    /// which PostgreSQL rejects) fail their batch; its requests are retried
    /// alone, so only the bad ones fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_request_fails_alone() {
        const INSERTS: usize = 200;
        let store = Arc::new(TestStore::open(Backend::Postgres).await);
        created(store.insert(request("dup", 1), Some(ME), LEASE_MS).await.expect("the first dup"));
        let (duplicate, nul) = (37, 151);
        let new = |i: usize| {
            let plain = request(&format!("req_{i:03}"), 1_000 + i as i64);
            if i == duplicate {
                (request("dup", 2), true)
            } else if i == nul {
                (NewRequest { message: "a NUL \0 byte".into(), ..plain }, true)
            } else {
                let keyed = NewRequest {
                    idempotency_key: Some(format!("k{}", i % 50)),
                    fingerprint: Some("same".into()),
                    ..plain
                };
                (keyed, true)
            }
        };
        let answers = insert_all(&store, (0..INSERTS).map(new).collect()).await;
        for (i, answer) in answers.into_iter().enumerate() {
            if i == duplicate || i == nul {
                let err = answer.expect_err("a bad request fails");
                eprintln!("bad request {i}: {err}");
                assert!(err.0.starts_with("insert: "), "{err}");
            } else {
                // Every key's callers asked the same thing (same fingerprint).
                let answer = answer.unwrap_or_else(|e| panic!("req_{i:03} failed: {e}"));
                assert!(matches!(answer, Inserted::Created(_) | Inserted::Existing(_)), "req_{i:03}: {answer:?}");
            }
        }
        assert_eq!(store.get("dup").await.expect("get").expect("dup").created_at, 1, "the first dup is untouched");
        assert!(store.get(&format!("req_{nul:03}")).await.expect("get").is_none());
        let keys: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT idempotency_key) FROM requests")
            .fetch_one(pg(&store).pool())
            .await
            .expect("count");
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM requests").fetch_one(pg(&store).pool()).await.expect("count");
        assert_eq!((keys, total), (50, 51), "one request per key, and the first dup");
        assert!(store.health().writable, "a bad request says nothing of the store");
    }

    /// A batch that cannot be written at all (here: the pool is closed) fails
    /// every caller with an error, after its retry alone, and marks the store
    /// unwritable; nobody hangs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_fails_its_callers_without_hanging() {
        let store = Arc::new(TestStore::open(Backend::Postgres).await);
        pg(&store).pool().close().await;
        let inserts = (0..20).map(|i| store.insert(request(&format!("req_{i}"), i), Some(ME), LEASE_MS));
        let answers =
            tokio::time::timeout(std::time::Duration::from_secs(30), futures::future::join_all(inserts)).await;
        for answer in answers.expect("every caller is answered") {
            let err = answer.expect_err("a closed pool writes nothing");
            assert!(err.0.starts_with("insert: "), "{err}");
        }
        assert_eq!(pg(&store).insert_batches(), 0);
        assert!(!store.health().writable);
    }
}
