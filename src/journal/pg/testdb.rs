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
            ..PgOptions::default()
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

/// An event to append: `id` of subject `subject`.
pub(crate) fn new_event(id: &str, subject: &str) -> crate::journal::NewEvent {
    crate::journal::NewEvent {
        id: id.into(),
        event_type: "rule.updated".into(),
        version: 1,
        subject: subject.into(),
        revision: Some(1),
        source: None,
        time: None,
        format: crate::journal::WireFormat::ChangeEvent,
        content_type: Some("application/json".into()),
        raw_body: bytes::Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        envelope: format!("{{\"id\":\"{id}\",\"subject\":\"{subject}\"}}"),
        receipt: None,
    }
}

/// A PostgreSQL server of one test's own, on a free port, in a temporary directory, so that
/// the test can stop and start it while the shared server keeps running. Its binaries are
/// PostgreSQL's (under /usr/lib/postgresql/*/bin), run as the `postgres` user when the test
/// runs as root (the server refuses root). Stopped when dropped.
pub(crate) struct OwnServer {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub(crate) port: u16,
}

impl OwnServer {
    /// Creates the cluster and starts it (blocking, a few seconds).
    pub(crate) fn start() -> OwnServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|bin| bin.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if as_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown the server's directory");
        }
        let server = OwnServer { dir, bin, port };
        server.run(
            "initdb",
            &["-D", &server.data(), "-U", "postgres", "--auth=trust", "-N"],
        );
        server.start_again();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of PostgreSQL's programs, as `postgres` when root; panics when it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The URL of its `postgres` database.
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub(crate) fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash would (no shutdown checkpoint).
    pub(crate) fn stop_immediately(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
        }));
    }
}

/// True when the test runs as root.
fn as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
