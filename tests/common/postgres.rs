//! A fresh PostgreSQL schema for one test (`muxi_test_<random>` in the
//! database of `MUXI_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped when the test ends.

use sqlx::Connection;

pub struct PgSchema {
    pub name: String,
    base: String,
}

impl PgSchema {
    pub async fn create() -> PgSchema {
        let base = std::env::var("MUXI_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let name = format!("muxi_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = connect_test_database(&base).await;
        sqlx::query(&format!("CREATE SCHEMA {name}")).execute(&mut conn).await.expect("create schema");
        let _ = conn.close().await;
        PgSchema { name, base }
    }

    /// The URL replicas are given: the database with this schema first on the search path.
    pub fn url(&self) -> String {
        let separator = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{separator}options=-c%20search_path%3D{}", self.base, self.name)
    }

    /// One query's single value, for checks straight on the database.
    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        let mut conn = sqlx::PgConnection::connect(&self.url()).await.expect("connect");
        let value = sqlx::query_scalar(sql).fetch_one(&mut conn).await.expect("query");
        let _ = conn.close().await;
        value
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, sql) = (self.base.clone(), format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
                sqlx::query(&sql).execute(&mut conn).await.ok()?;
                conn.close().await.ok()
            })
        })
        .join();
    }
}

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
