//! The store backends the contract tests run against: SQLite in a temporary
//! folder, and PostgreSQL at `MUXI_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) in a fresh schema
//! `muxi_test_<random>`, dropped when the store is dropped (even after a
//! failed assertion). [`store_contract!`] instantiates each test per backend.

use std::ops::Deref;

use sqlx::Connection;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::Store;

/// The PostgreSQL the tests use unless `MUXI_TEST_DATABASE_URL` names another.
pub const DEFAULT_TEST_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn test_database_url() -> String {
    std::env::var("MUXI_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_DATABASE.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A store under test, cleaned up on drop.
pub enum TestStore {
    /// The folder is kept until the store is dropped.
    Sqlite(SqliteStore, #[allow(dead_code)] tempfile::TempDir),
    Postgres(PgStore, String),
}

impl Deref for TestStore {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        match self {
            TestStore::Sqlite(store, _) => store,
            TestStore::Postgres(store, _) => store,
        }
    }
}

impl TestStore {
    pub async fn open(backend: Backend) -> TestStore {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = SqliteStore::open(&dir.path().join("data")).expect("open store");
                TestStore::Sqlite(store, dir)
            }
            Backend::Postgres => {
                let schema = format!("muxi_test_{}", uuid::Uuid::new_v4().simple());
                let base = test_database_url();
                let mut admin = connect_test_database(&base).await;
                sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut admin).await.expect("create schema");
                let _ = admin.close().await;
                let store =
                    PgStore::connect(&with_search_path(&base, &schema)).await.expect("open the PostgreSQL store");
                TestStore::Postgres(store, schema)
            }
        }
    }

    /// Makes `owner` the claimer of a delivery, as a sender's claim would.
    pub async fn force_delivery_claim(&self, delivery_id: &str, owner: &str) {
        match self {
            TestStore::Sqlite(store, _) => {
                let conn = rusqlite::Connection::open(store.path()).expect("open");
                conn.execute(
                    "UPDATE deliveries SET claimed_by = ?1 WHERE id = ?2",
                    rusqlite::params![owner, delivery_id],
                )
                .expect("claim");
            }
            TestStore::Postgres(store, _) => {
                sqlx::query("UPDATE deliveries SET claimed_by = $1 WHERE id = $2")
                    .bind(owner)
                    .bind(delivery_id)
                    .execute(store.pool())
                    .await
                    .expect("claim");
            }
        }
    }
}

/// `url` with its connections' `search_path` set to `schema`.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

/// Drops a test schema (on a thread of its own: this runs in `Drop`, inside
/// or outside a runtime).
pub fn drop_schema(schema: &str) {
    let (url, sql) = (test_database_url(), format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        runtime.block_on(async {
            let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
            sqlx::query(&sql).execute(&mut conn).await.ok()?;
            conn.close().await.ok()
        })
    })
    .join();
    if !matches!(dropped, Ok(Some(()))) {
        eprintln!("could not drop the test schema {schema}");
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let TestStore::Postgres(_, schema) = self {
            drop_schema(schema);
        }
    }
}

/// Instantiates `async fn name(store: Arc<TestStore>)` tests once per backend,
/// in modules `sqlite` and `postgres`.
macro_rules! store_contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = crate::store::test_backends::TestStore::open(
                        crate::store::test_backends::Backend::Sqlite).await;
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = crate::store::test_backends::TestStore::open(
                        crate::store::test_backends::Backend::Postgres).await;
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}
pub(crate) use store_contract;

/// A connection to the test database, creating the database first if the
/// server has no such database yet (a fresh CI machine).
pub async fn connect_test_database(url: &str) -> sqlx::PgConnection {
    use sqlx::postgres::PgConnectOptions;
    let options: PgConnectOptions = url.parse().expect("a valid test database URL");
    match sqlx::PgConnection::connect_with(&options).await {
        Ok(conn) => conn,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let name = options.get_database().unwrap_or("test").to_string();
            let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
                .await
                .expect("connect to the test PostgreSQL");
            // Another test may create it at the same moment (42P04): fine.
            let _ = sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await;
            let _ = admin.close().await;
            sqlx::PgConnection::connect_with(&options).await.expect("connect to the test database")
        }
        Err(e) => panic!("cannot connect to the test PostgreSQL ({e}); set MUXI_TEST_DATABASE_URL"),
    }
}
