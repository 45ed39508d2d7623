//! The baseline servers, run as this bench binary re-executed with
//! `MUXI_BENCH_BASELINE=KIND`. Each has muxi-rt's route shapes, runs on a
//! default multi-thread tokio runtime (as muxi-rt does), prints
//! `... listening on http://ADDR`, and runs until killed.
//!
//! * `bare`: handlers read the request and answer a small JSON body; the
//!   ceiling of any HTTP path.
//! * `floor`: the same, but the POST handler first appends its body to a rowid
//!   SQLite table (no other index) in `MUXI_BENCH_FLOOR_DATA`, WAL with
//!   `synchronous=FULL`, through one writer thread that commits whatever is
//!   queued in one transaction (group commit); it answers once its row is on
//!   disk. Nothing else: the floor of a durable accept on SQLite.
//! * `pg-floor`: the POST handler runs one autocommit
//!   `INSERT INTO floor (body) VALUES ($1) RETURNING id` on a pool of 64
//!   connections to `MUXI_BENCH_FLOOR_URL`: the floor of a durable accept on
//!   PostgreSQL, as in ../shared/docs/peers.md.

use std::sync::mpsc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::oneshot;

pub fn serve(kind: &str) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let chat = match kind {
            "bare" => post(|Path(id): Path<String>, body: bytes::Bytes| async move {
                Json(json!({"ok": true, "formation": id, "received": body.len()}))
            }),
            "floor" => {
                let data = std::env::var("MUXI_BENCH_FLOOR_DATA").expect("MUXI_BENCH_FLOOR_DATA");
                post(append_sqlite).with_state(SqliteLog::open(std::path::Path::new(&data)))
            }
            "pg-floor" => {
                let url = std::env::var("MUXI_BENCH_FLOOR_URL").expect("MUXI_BENCH_FLOOR_URL");
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(64)
                    .connect(&url)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::query("CREATE TABLE IF NOT EXISTS floor (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
                    .execute(&pool)
                    .await
                    .expect("create the floor table");
                post(append_postgres).with_state(pool)
            }
            other => panic!("unknown MUXI_BENCH_BASELINE {other}"),
        };
        let app = Router::new().route("/api/{id}/v1/chat", chat).route(
            "/api/{id}/v1/requests/{request_id}",
            get(|Path((id, request_id)): Path<(String, String)>| async move {
                Json(json!({"ok": true, "formation": id, "request_id": request_id}))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("baseline listening on http://{}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.expect("serve");
    });
}

/// A rowid table and the one thread that appends to it.
#[derive(Clone)]
struct SqliteLog {
    appends: mpsc::Sender<(bytes::Bytes, oneshot::Sender<i64>)>,
}

impl SqliteLog {
    fn open(data: &std::path::Path) -> SqliteLog {
        std::fs::create_dir_all(data).expect("floor data folder");
        let conn = rusqlite::Connection::open(data.join("floor.db")).expect("open floor.db");
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).expect("WAL");
        assert!(mode.eq_ignore_ascii_case("wal"), "floor.db is not in WAL mode");
        conn.pragma_update(None, "synchronous", "FULL").expect("synchronous=FULL");
        conn.execute_batch("CREATE TABLE IF NOT EXISTS log (body BLOB NOT NULL)").expect("create log");
        let (appends, queue) = mpsc::channel::<(bytes::Bytes, oneshot::Sender<i64>)>();
        std::thread::spawn(move || {
            // Group commit: take one append, then whatever else is queued, and
            // commit them together; answer each once the commit has returned.
            while let Ok(first) = queue.recv() {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match queue.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                conn.execute_batch("BEGIN").expect("begin");
                let rowids: Vec<i64> = {
                    let mut insert = conn.prepare_cached("INSERT INTO log (body) VALUES (?1)").expect("prepare");
                    batch
                        .iter()
                        .map(|(body, _)| {
                            insert.execute([&body[..]]).expect("append");
                            conn.last_insert_rowid()
                        })
                        .collect()
                };
                conn.execute_batch("COMMIT").expect("commit");
                for ((_, reply), rowid) in batch.into_iter().zip(rowids) {
                    let _ = reply.send(rowid);
                }
            }
        });
        SqliteLog { appends }
    }
}

async fn append_sqlite(
    State(log): State<SqliteLog>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, StatusCode> {
    let (reply, rowid) = oneshot::channel();
    log.appends.send((body, reply)).map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let rowid = rowid.await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(Json(json!({"ok": true, "formation": id, "id": rowid})))
}

async fn append_postgres(
    State(pool): State<sqlx::PgPool>,
    Path(id): Path<String>,
    body: String,
) -> Result<Json<serde_json::Value>, StatusCode> {
    let row: (i64,) = sqlx::query_as("INSERT INTO floor (body) VALUES ($1) RETURNING id")
        .bind(body)
        .fetch_one(&pool)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(Json(json!({"ok": true, "formation": id, "id": row.0})))
}
