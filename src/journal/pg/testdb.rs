//! Tests' own schemas in the PostgreSQL at 127.0.0.1:5432 (trust auth, database `test`): each
//! test creates a schema with a unique name, its pools use it, and it is dropped at the end,
//! also when the test fails, so tests run in parallel.

use std::time::Duration;

use super::{PgDb, PgOptions};

/// The shared test server.
pub(crate) const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of one test's own, dropped when this is dropped.
pub(crate) struct TestSchema {
    pub(crate) name: String,
    url: String,
}

impl TestSchema {
    /// Creates a schema with a unique name in the shared test server.
    pub(crate) async fn create() -> TestSchema {
        Self::create_at(URL).await
    }

    /// Creates a schema with a unique name in the server at `url`.
    pub(crate) async fn create_at(url: &str) -> TestSchema {
        let name = format!("ess_test_{:016x}", rand::random::<u64>());
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432, database test (scripts/test starts it)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test's schema");
        TestSchema {
            name,
            url: url.to_owned(),
        }
    }

    /// Options for a pool in this schema, with short timeouts and a small lease.
    pub(crate) fn options(&self) -> PgOptions {
        PgOptions {
            url: self.url.clone(),
            schema: Some(self.name.clone()),
            max_connections: 4,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(20),
            partitions: 16,
            lease: Duration::from_secs(3),
            max_batch: 512,
        }
    }

    /// A pool in this schema (an "agent"), migrated.
    pub(crate) async fn db(&self) -> PgDb {
        self.db_with(self.options()).await
    }

    /// A pool with `options`, migrated.
    pub(crate) async fn db_with(&self, options: PgOptions) -> PgDb {
        let db = PgDb::new(&options).unwrap();
        super::schema::migrate(&db, options.partitions)
            .await
            .expect("migrate the test's schema");
        db
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // A pool of the test may still hold a lock in the schema (a transaction whose
        // rollback waits for a runtime that is blocked here): after a while, its sessions are
        // ended.
        let sql = format!(
            "SET lock_timeout = '5s'; \
             DO $$ BEGIN \
               DROP SCHEMA IF EXISTS {name} CASCADE; \
             EXCEPTION WHEN lock_not_available THEN \
               PERFORM pg_terminate_backend(l.pid) FROM pg_locks l \
                 JOIN pg_class c ON c.oid = l.relation \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = '{name}' AND l.pid <> pg_backend_pid(); \
             END $$; \
             SET lock_timeout = 0; \
             DROP SCHEMA IF EXISTS {name} CASCADE",
            name = self.name
        );
        let url = self.url.clone();
        // Drop may run inside a runtime (the test's) or during a panic: a thread of its own
        // with a runtime of its own works in both.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

/// Polls `check` every 20 ms until it returns true or `deadline` passes.
pub(crate) async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
