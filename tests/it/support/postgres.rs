//! PostgreSQL for the tests of the shared journal: a schema of a test's own in the shared server
//! (127.0.0.1:5432, database `test`), and a server of a test's own that it can stop and start.

use sqlx::Executor as _;

/// The shared test server.
pub const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of one test's own in the shared server; [`Schema::drop_now`] removes it.
pub struct Schema {
    pub name: String,
    pub url: String,
}

impl Schema {
    /// Creates a schema with a unique name in the server at `url`.
    pub async fn create_at(url: &str) -> Schema {
        let name = format!("ess_ha_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let pool = Self::pool_at(url).await;
        pool.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .await
            .expect("create the test's schema");
        pool.close().await;
        Schema {
            name,
            url: url.to_owned(),
        }
    }

    /// Creates a schema with a unique name in the shared server.
    pub async fn create() -> Schema {
        Self::create_at(URL).await
    }

    async fn pool_at(url: &str) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .expect("PostgreSQL (scripts/test starts the shared one on 127.0.0.1:5432)")
    }

    /// A pool whose connections use this schema.
    pub async fn pool(&self) -> sqlx::PgPool {
        let options: sqlx::postgres::PgConnectOptions = self.url.parse().unwrap();
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options.options([("search_path", self.name.as_str())]))
            .await
            .expect("connect to the test's schema")
    }

    /// The `[journal]` section of an agent that keeps its journal in this schema.
    pub fn journal_section(&self, lease_seconds: f64) -> String {
        format!(
            "[journal]\nbackend = \"postgres\"\nurl = {:?}\nschema = {:?}\nlease_seconds = {lease_seconds}\npartitions = 16\n",
            self.url, self.name
        )
    }

    /// Drops the schema with everything in it.
    pub async fn drop_now(&self) {
        let pool = Self::pool_at(&self.url).await;
        let _ = pool
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA {} CASCADE",
                self.name
            )))
            .await;
        pool.close().await;
    }
}

/// A PostgreSQL server of one test's own, on a free port, in a temporary directory, so that
/// the test can stop and start it while the shared server keeps running. Its binaries are
/// PostgreSQL's (under /usr/lib/postgresql/*/bin), run as the `postgres` user when the test
/// runs as root (the server refuses root). Stopped when dropped.
pub struct OwnServer {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
}

impl OwnServer {
    /// Creates the cluster and starts it (blocking, a few seconds).
    pub fn start() -> OwnServer {
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
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
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
    pub fn stop_immediately(&self) {
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
