//! New requests, written many to a statement. The writer hands each run of
//! queued inserts in its batch to [`write`], which writes them in chunks of up
//! to [`CHUNKS`]`[0]` rows, one `INSERT ... VALUES (...), (...)` per chunk: the
//! statement's fixed cost (opening cursors on the table and its indexes,
//! resetting) is paid once per chunk rather than once per row.
//!
//! A chunk is written whole only when each of its idempotency keys is held by
//! no row yet, nor by two of its rows; otherwise its rows are written one by
//! one, each with its own answer (the earlier request that holds its key, or
//! its error), so a bad request fails alone. The statements are `INSERT OR
//! FAIL`: a row that breaks a constraint stops its statement, and the rows
//! written before it stay. SQLite then needs no statement journal (a copy of
//! every page the statement changes, kept to undo it), and the rows after the
//! bad one are written one by one.

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::in_place::InPlace;
use super::rows::{col, record_from_row};
use super::writer::{settle, storage_failure, Job};
use crate::store::{Inserted, Mode, NewRequest, RequestRecord, StoreError, StoreResult};

/// The chunk sizes, largest first: a run is cut into the largest that fit, so
/// a handful of statements (each prepared once and cached) cover any run.
const CHUNKS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];

/// The values each row binds.
const COLUMNS: usize = 17;

/// A message this long or longer is kept in `request_messages`, its request's
/// row holding `''`: an update of the row then never writes it again. (A row
/// past about a page spills into overflow pages, all of which an update that
/// changes the row's size writes again.) Shorter messages stay in the row,
/// which costs an accept no second insert.
pub(super) const OUT_OF_LINE_BYTES: usize = 4096;

fn is_out_of_line(request: &NewRequest) -> bool {
    request.message.len() >= OUT_OF_LINE_BYTES
}

/// The `INSERT` of `rows` rows.
fn insert_sql(rows: usize) -> String {
    let row = format!("({}, 'pending')", vec!["?"; COLUMNS].join(", "));
    format!(
        "INSERT OR FAIL INTO requests (id, formation_id, formation_version, user_id, session_id, agent_id, message, \
         mode, answered_async, estimated_seconds, idempotency_key, fingerprint, webhook_url, \
         workflow_timeout_ms, created_at, lease_owner, lease_expires_at, status) VALUES {}",
        vec![row; rows].join(", ")
    )
}

/// A new request waiting for the writer.
pub(super) struct InsertJob {
    request: NewRequest,
    /// The runner that takes the request on at once, if any: it holds the lease.
    holder: Option<String>,
    lease_ms: i64,
    out: Option<rusqlite::Result<Found>>,
    reply: oneshot::Sender<StoreResult<Inserted>>,
}

/// What writing one new request found.
enum Found {
    /// The row is written.
    Created,
    /// The key belongs to this earlier request (and fingerprint): nothing written.
    Existing(Box<RequestRecord>, Option<String>),
}

impl InsertJob {
    /// The job, and where its answer arrives once its batch is committed.
    pub(super) fn new(
        request: NewRequest,
        holder: Option<String>,
        lease_ms: i64,
    ) -> (InsertJob, oneshot::Receiver<StoreResult<Inserted>>) {
        let (reply, answer) = oneshot::channel();
        (InsertJob { request, holder, lease_ms, out: None, reply }, answer)
    }
}

impl Job for InsertJob {
    fn run(&mut self, conn: &Connection) -> bool {
        let out = write_one(&mut Inserts::new(conn), self);
        let written = out.is_ok();
        self.out = Some(out);
        written
    }

    fn answer(self: Box<Self>, batch: Result<(), &StoreError>) {
        let InsertJob { request, out, reply, .. } = *self;
        let result = settle("insert", out, batch).map(|found| match found {
            Found::Existing(holder, fingerprint) => Inserted::key_held_by(holder, fingerprint, &request),
            Found::Created => Inserted::Created(Box::new(RequestRecord::accepted(request))),
        });
        // The caller may have gone away (its future dropped); the write stands.
        let _ = reply.send(result);
    }

    fn storage_failure(&self) -> Option<String> {
        storage_failure("insert", &self.out)
    }

    /// One statement, or a long message's two, which [`write_one`] undoes together.
    fn is_one_statement(&self) -> bool {
        true
    }

    fn as_insert(&mut self) -> Option<&mut InsertJob> {
        Some(self)
    }
}

/// Writes a run of new requests, each job keeping its own outcome. False if
/// any failed; when a failure rolled the whole transaction back, the jobs
/// after it are left unrun.
pub(super) fn write(inserts: &mut Inserts, mut run: Vec<&mut InsertJob>) -> bool {
    let conn = inserts.conn;
    let mut all_written = true;
    let mut rest = &mut run[..];
    while !rest.is_empty() {
        // Always found: the last size is 1.
        let which = CHUNKS.iter().position(|&size| size <= rest.len()).unwrap_or(CHUNKS.len() - 1);
        let (mut chunk, tail) = rest.split_at_mut(CHUNKS[which]);
        rest = tail;
        let all_in_line = chunk.iter().all(|job| !is_out_of_line(&job.request));
        if chunk.len() > 1 && all_in_line && keys_are_free(conn, chunk).unwrap_or(false) {
            let before = conn.total_changes();
            let outcome = insert_rows(inserts, which, chunk.iter().map(|job| &**job));
            if outcome.is_err() && conn.is_autocommit() {
                return false;
            }
            // `OR FAIL`: the rows before a failed one are written, and counted
            // in the connection's changes (none if the statement never ran);
            // the rest go one by one.
            let written = match outcome {
                Ok(()) => chunk.len(),
                Err(_) => {
                    usize::try_from(conn.total_changes().saturating_sub(before)).map_or(0, |n| n.min(chunk.len()))
                }
            };
            let (done, left) = chunk.split_at_mut(written);
            done.iter_mut().for_each(|job| job.out = Some(Ok(Found::Created)));
            chunk = left;
        }
        // A key taken or a failed chunk: each row gets its own answer.
        for job in chunk.iter_mut() {
            let out = write_one(inserts, job);
            let failed = out.is_err();
            job.out = Some(out);
            if failed {
                all_written = false;
                if conn.is_autocommit() {
                    return false;
                }
            }
        }
    }
    all_written
}

/// One new request: the earlier request that holds its key, else its row
/// written (and its message beside it, if that is kept out of the row).
fn write_one(inserts: &mut Inserts, job: &InsertJob) -> rusqlite::Result<Found> {
    let conn = inserts.conn;
    let request = &job.request;
    if request.idempotency_key.is_some() {
        if let Some((record, fingerprint)) = holder_of_key(conn, request)? {
            return Ok(Found::Existing(Box::new(record), fingerprint));
        }
    }
    if !is_out_of_line(request) {
        insert_rows(inserts, CHUNKS.len() - 1, std::iter::once(job))?;
        return Ok(Found::Created);
    }
    // The message first: if it cannot be written, neither is the row.
    conn.prepare_cached("INSERT OR FAIL INTO request_messages (id, message) VALUES (?1, ?2)")?
        .execute((&request.id, &request.message))?;
    if let Err(e) = insert_rows(inserts, CHUNKS.len() - 1, std::iter::once(job)) {
        // Only the row's statement failed (the transaction goes on): take the
        // message back, so the job changes nothing, as one statement would.
        if !conn.is_autocommit() {
            let taken_back = conn
                .prepare_cached("DELETE FROM request_messages WHERE id = ?1")
                .and_then(|mut s| s.execute([&request.id]));
            if let Err(left) = taken_back {
                tracing::warn!(request = %request.id, error = %left, "a message is left without its request");
            }
        }
        return Err(e);
    }
    Ok(Found::Created)
}

/// Whether every key in `chunk` is held by no row yet, nor by another row of
/// the chunk: then every row of the chunk is new, and one statement writes them.
fn keys_are_free(conn: &Connection, chunk: &[&mut InsertJob]) -> rusqlite::Result<bool> {
    let same_key = |a: &NewRequest, b: &NewRequest| {
        a.idempotency_key == b.idempotency_key && a.user_id == b.user_id && a.formation_id == b.formation_id
    };
    for (i, job) in chunk.iter().enumerate() {
        let request = &job.request;
        if request.idempotency_key.is_none() {
            continue;
        }
        if chunk[..i].iter().any(|earlier| same_key(&earlier.request, request)) {
            return Ok(false);
        }
        let taken: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM requests \
                 WHERE formation_id = ?1 AND user_id = ?2 AND idempotency_key = ?3)",
            )?
            .query_row((&request.formation_id, &request.user_id, &request.idempotency_key), |row| row.get(0))?;
        if taken {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The writer's prepared `INSERT`s, one per chunk size, prepared when first
/// used and kept for the connection's life (see [`InPlace`] for why they are
/// not rusqlite's cached statements).
pub(super) struct Inserts<'conn> {
    conn: &'conn Connection,
    by_size: [Option<InPlace<'conn>>; CHUNKS.len()],
}

impl<'conn> Inserts<'conn> {
    pub(super) fn new(conn: &'conn Connection) -> Inserts<'conn> {
        Inserts { conn, by_size: Default::default() }
    }

    /// The statement for `CHUNKS[which]` rows.
    fn statement(&mut self, which: usize) -> rusqlite::Result<&mut InPlace<'conn>> {
        let slot = &mut self.by_size[which];
        if slot.is_none() {
            *slot = Some(InPlace::prepare(self.conn, &insert_sql(CHUNKS[which]))?);
        }
        Ok(slot.as_mut().expect("prepared above"))
    }
}

/// Writes `jobs`' rows (`CHUNKS[which]` of them) with one statement.
fn insert_rows<'a>(
    inserts: &mut Inserts,
    which: usize,
    jobs: impl Iterator<Item = &'a InsertJob>,
) -> rusqlite::Result<()> {
    inserts.statement(which)?.execute(|values| {
        for job in jobs {
            let request = &job.request;
            values.text(&request.id)?;
            values.text(&request.formation_id)?;
            values.text(&request.formation_version)?;
            values.text(&request.user_id)?;
            values.opt_text(request.session_id.as_deref())?;
            values.text(&request.agent_id)?;
            values.text(if is_out_of_line(request) { "" } else { &request.message })?;
            values.text(request.mode.as_str())?;
            values.int(i64::from(request.mode == Mode::Async))?;
            values.real(request.estimated_seconds)?;
            values.opt_text(request.idempotency_key.as_deref())?;
            values.opt_text(request.fingerprint.as_deref())?;
            values.opt_text(request.webhook_url.as_deref())?;
            values.int(request.workflow_timeout_ms)?;
            values.int(request.created_at)?;
            values.opt_text(job.holder.as_deref())?;
            values.opt_int(job.holder.as_ref().map(|_| request.created_at.saturating_add(job.lease_ms)))?;
        }
        Ok(())
    })
}

/// The request that holds `request`'s idempotency key, with its fingerprint.
fn holder_of_key(conn: &Connection, request: &NewRequest) -> rusqlite::Result<Option<(RequestRecord, Option<String>)>> {
    conn.prepare_cached(select_stored_records!(
        "WHERE r.formation_id = ?1 AND r.user_id = ?2 AND r.idempotency_key = ?3"
    ))?
    .query_row((&request.formation_id, &request.user_id, &request.idempotency_key), |row| {
        Ok((record_from_row(row)?, row.get::<_, Option<String>>(col::FINGERPRINT)?))
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract_tests::request;

    fn database() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        conn
    }

    fn keyed(id: &str, key: &str, fingerprint: &str) -> NewRequest {
        NewRequest { idempotency_key: Some(key.into()), fingerprint: Some(fingerprint.into()), ..request(id, 1) }
    }

    /// Writes `requests` as one run (as the writer would a batch's) and commits;
    /// each request's answer, in order.
    fn write_run(conn: &mut Connection, requests: Vec<NewRequest>) -> Vec<StoreResult<Inserted>> {
        let tx = conn.transaction().unwrap();
        let (mut jobs, mut answers): (Vec<_>, Vec<_>) =
            requests.into_iter().map(|r| InsertJob::new(r, None, 1_000)).unzip();
        write(&mut Inserts::new(&tx), jobs.iter_mut().collect());
        tx.commit().unwrap();
        jobs.into_iter().for_each(|job| Box::new(job).answer(Ok(())));
        answers.iter_mut().map(|answer| answer.try_recv().expect("answered")).collect()
    }

    fn ids(conn: &Connection) -> Vec<String> {
        let mut statement = conn.prepare("SELECT id FROM requests ORDER BY id").unwrap();
        statement.query_map([], |row| row.get(0)).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn a_run_of_any_length_is_written_whole() {
        let mut conn = database();
        let requests: Vec<_> = (0..45).map(|i| request(&format!("req_{i:02}"), i)).collect();
        let expected: Vec<String> = requests.iter().map(|r| r.id.clone()).collect();
        for (answer, id) in write_run(&mut conn, requests).into_iter().zip(&expected) {
            assert!(matches!(answer, Ok(Inserted::Created(r)) if &r.id == id));
        }
        assert_eq!(ids(&conn), expected);
    }

    #[test]
    fn keys_taken_before_or_within_the_run_answer_with_their_holder() {
        let mut conn = database();
        write_run(&mut conn, vec![keyed("req_old", "old", "x")]);
        let answers = write_run(
            &mut conn,
            vec![
                request("req_a", 1),
                keyed("req_b", "new", "x"),
                keyed("req_c", "new", "x"),
                keyed("req_d", "new", "y"),
                keyed("req_e", "old", "x"),
                keyed("req_f", "old", "y"),
                request("req_g", 1),
                keyed("req_h", "other", "x"),
            ],
        );
        let answers: Vec<_> = answers
            .into_iter()
            .map(|answer| match answer.expect("answered") {
                Inserted::Created(r) => format!("created {}", r.id),
                Inserted::Existing(r) => format!("existing {}", r.id),
                Inserted::KeyReused(r) => format!("reused {}", r.id),
            })
            .collect();
        assert_eq!(
            answers,
            [
                "created req_a",
                "created req_b",
                "existing req_b",
                "reused req_b",
                "existing req_old",
                "reused req_old",
                "created req_g",
                "created req_h"
            ]
        );
        assert_eq!(ids(&conn), ["req_a", "req_b", "req_g", "req_h", "req_old"]);
    }

    #[test]
    fn a_bad_row_fails_alone_and_its_chunk_is_written() {
        // The bad row first, inside and last: the rows before it are written
        // by the chunk's statement (`OR FAIL`), the rest one by one.
        for bad in [0, 3, 7] {
            let mut conn = database();
            write_run(&mut conn, vec![request(&format!("req_{bad}"), 1)]);
            let requests: Vec<_> = (0..8).map(|i| request(&format!("req_{i}"), 2)).collect();
            for (i, answer) in write_run(&mut conn, requests).into_iter().enumerate() {
                match answer {
                    Err(e) => assert!(i == bad && e.to_string().contains("UNIQUE constraint failed"), "req_{i}: {e}"),
                    Ok(inserted) => assert!(i != bad && matches!(inserted, Inserted::Created(_)), "req_{i}"),
                }
            }
            assert_eq!(ids(&conn), (0..8).map(|i| format!("req_{i}")).collect::<Vec<_>>());
            let created_at: Vec<i64> = conn
                .prepare("SELECT created_at FROM requests ORDER BY id")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let expected: Vec<i64> = (0..8).map(|i| if i == bad { 1 } else { 2 }).collect();
            assert_eq!(created_at, expected, "the row already there is untouched, the others written once");
        }
    }
}
