//! The `sql` sink against real servers: PostgreSQL on 127.0.0.1:5432 (trust auth, database
//! `test`), MariaDB on 127.0.0.1:3306 (root, no password, database `test`) and SQLite files.
//!
//! Every test works in tables (and a ledger) of its own, named at random, so tests run in
//! parallel, and drops them at the end, also when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Executor as _, Row as _};

use crate::support::proxy::Proxy;
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MY_URL: &str = "mysql://root@127.0.0.1:3306/test";
const EVENTS: &str = "/v1/events";

// ---------------------------------------------------------------------------------------------
// Databases

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Postgres,
    MariaDb,
    Sqlite,
}

/// A test's view of one database: direct connections (never through the agent) and the tables
/// to drop at the end.
pub(crate) struct Db {
    kind: Kind,
    pg: Option<sqlx::PgPool>,
    my: Option<sqlx::MySqlPool>,
    sqlite: Option<PathBuf>,
    suffix: String,
    created: std::sync::Mutex<Vec<String>>,
}

impl Db {
    pub(crate) async fn open(kind: Kind, dir: &Path) -> Db {
        let suffix = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let mut db = Db {
            kind,
            pg: None,
            my: None,
            sqlite: None,
            suffix,
            created: Default::default(),
        };
        match kind {
            Kind::Postgres => {
                db.pg = Some(
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(2)
                        .connect(PG_URL)
                        .await
                        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)"),
                )
            }
            Kind::MariaDb => {
                db.my = Some(
                    sqlx::mysql::MySqlPoolOptions::new()
                        .max_connections(2)
                        .connect(MY_URL)
                        .await
                        .expect("MariaDB on 127.0.0.1:3306 (scripts/test starts it)"),
                )
            }
            Kind::Sqlite => {
                let path = dir.join("partner.db");
                rusqlite::Connection::open(&path).expect("create the SQLite file");
                db.sqlite = Some(path);
            }
        }
        db
    }

    /// A table name unique to this test.
    pub(crate) fn name(&self, prefix: &str) -> String {
        let name = format!("{prefix}_{}", self.suffix);
        self.created.lock().unwrap().push(name.clone());
        name
    }

    /// The URL the agent's sink uses.
    pub(crate) fn url(&self) -> String {
        match self.kind {
            Kind::Postgres => PG_URL.into(),
            Kind::MariaDb => MY_URL.into(),
            Kind::Sqlite => format!("sqlite://{}", self.sqlite.as_ref().unwrap().display()),
        }
    }

    pub(crate) async fn exec(&self, sql: &str) {
        match self.kind {
            Kind::Postgres => {
                self.pg
                    .as_ref()
                    .unwrap()
                    .execute(sqlx::AssertSqlSafe(sql.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Kind::MariaDb => {
                self.my
                    .as_ref()
                    .unwrap()
                    .execute(sqlx::AssertSqlSafe(sql.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Kind::Sqlite => {
                let conn = rusqlite::Connection::open(self.sqlite.as_ref().unwrap()).unwrap();
                conn.execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// Runs a query whose columns are all read as text (NULL as None).
    pub(crate) async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        match self.kind {
            Kind::Postgres => {
                let rows = self
                    .pg
                    .as_ref()
                    .unwrap()
                    .fetch_all(sqlx::AssertSqlSafe(sql.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<Option<String>, _>(i))
                            .collect()
                    })
                    .collect()
            }
            Kind::MariaDb => {
                let rows = self
                    .my
                    .as_ref()
                    .unwrap()
                    .fetch_all(sqlx::AssertSqlSafe(sql.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<Option<String>, _>(i))
                            .collect()
                    })
                    .collect()
            }
            Kind::Sqlite => {
                let conn = rusqlite::Connection::open(self.sqlite.as_ref().unwrap()).unwrap();
                let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let n = stmt.column_count();
                stmt.query_map([], |row| {
                    (0..n)
                        .map(|i| {
                            Ok(match row.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => None,
                                rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                                rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                                rusqlite::types::ValueRef::Text(t) => {
                                    Some(String::from_utf8_lossy(t).into_owned())
                                }
                                rusqlite::types::ValueRef::Blob(_) => Some("<blob>".into()),
                            })
                        })
                        .collect()
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
            }
        }
    }

    /// The single text value of a one-row, one-column query.
    async fn scalar(&self, sql: &str) -> Option<String> {
        self.rows(sql)
            .await
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        let sql = match self.kind {
            Kind::MariaDb => format!("SELECT CAST(COUNT(*) AS CHAR) FROM {table}"),
            _ => format!("SELECT CAST(COUNT(*) AS TEXT) FROM {table}"),
        };
        self.scalar(&sql).await.unwrap().parse().unwrap()
    }

    /// True when the table exists.
    async fn exists(&self, table: &str) -> bool {
        let sql = match self.kind {
            Kind::Postgres => format!("SELECT CAST(to_regclass('{table}') AS TEXT)"),
            Kind::MariaDb => format!(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
                 AND TABLE_NAME = '{table}'"
            ),
            Kind::Sqlite => {
                format!("SELECT name FROM sqlite_master WHERE type = 'table' AND name = '{table}'")
            }
        };
        self.scalar(&sql).await.is_some()
    }

    /// A serial primary key column.
    pub(crate) fn serial(&self) -> &'static str {
        match self.kind {
            Kind::Postgres => "seq bigserial PRIMARY KEY",
            Kind::MariaDb => "seq bigint AUTO_INCREMENT PRIMARY KEY",
            Kind::Sqlite => "seq INTEGER PRIMARY KEY AUTOINCREMENT",
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let tables = std::mem::take(&mut *self.created.lock().unwrap());
        if tables.is_empty() || self.kind == Kind::Sqlite {
            return;
        }
        let kind = self.kind;
        // Drop runs inside the test's runtime, which cannot be blocked on: clean up from a
        // thread with a runtime of its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                for table in tables {
                    let sql = format!("DROP TABLE IF EXISTS {table}");
                    let result = match kind {
                        Kind::Postgres => match sqlx::PgPool::connect(PG_URL).await {
                            Ok(pool) => pool.execute(sqlx::AssertSqlSafe(sql)).await.map(|_| ()),
                            Err(e) => Err(e),
                        },
                        _ => match sqlx::MySqlPool::connect(MY_URL).await {
                            Ok(pool) => pool.execute(sqlx::AssertSqlSafe(sql)).await.map(|_| ()),
                            Err(e) => Err(e),
                        },
                    };
                    if let Err(e) = result {
                        eprintln!("cannot drop {table}: {e}");
                    }
                }
            });
        })
        .join()
        .ok();
    }
}

// ---------------------------------------------------------------------------------------------
// Agent helpers

pub(crate) fn write_adapter(dir: &Path, name: &str, source: &str) {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join(name), source).unwrap();
}

/// A TOML string literal.
pub(crate) fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// One route `name` of `types` through `adapter` into an `sql` sink of the same name.
fn sql_route(name: &str, types: &str, adapter: &str, db: &Db, sink: &str) -> String {
    format!(
        "[[routes]]\nname = {name:?}\ntypes = [{types:?}]\nadapter = {adapter:?}\nsink = {name:?}\n\
         [sinks.{name}]\ntype = \"sql\"\nurl = {url}\n{sink}\n",
        url = toml_str(&db.url()),
    )
}

fn agent_config(dir: &Path, top: &str, routes: &[String]) -> String {
    format!(
        "adapters_dir = {:?}\n{top}\n{}",
        dir.join("adapters").display().to_string(),
        routes.join("\n")
    )
}

pub(crate) fn event(id: &str, event_type: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "version": 1, "type": event_type, "subject": subject, "payload": payload}),
    )
    .unwrap()
}

/// A client per thread, reused: building one reads the system's CA certificates, which is slow
/// in a debug build. Per thread rather than per process, because a client's connections belong
/// to the runtime they were opened on, and every test has its own runtime (and threads).
fn client() -> ess_agent::http_client::HttpClient {
    thread_local! {
        static CLIENT: ess_agent::http_client::HttpClient = plain();
    }
    CLIENT.with(Clone::clone)
}

pub(crate) async fn post(url: &str, id: &str, body: Vec<u8>) -> Result<support::Reply, String> {
    let headers = signed_headers(id, unix_now(), &body);
    request(&client(), Method::POST, url, &headers, body).await
}

async fn post_ok(agent: &Agent, id: &str, body: Vec<u8>) {
    let reply = post(&agent.url(EVENTS), id, body).await.unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{id}: {:?}", reply.body);
}

/// Waits until every id in `ids` is final; returns id → (state, error).
fn wait_all_final(
    agent: &Agent,
    ids: &[String],
    timeout: Duration,
) -> BTreeMap<String, (String, Option<String>)> {
    let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen = BTreeMap::new();
    agent.wait_for_log(timeout, |v| {
        if v["message"] == "event final"
            && let Some(id) = v["event_id"].as_str()
            && wanted.contains(id)
        {
            seen.insert(
                id.to_string(),
                (
                    v["state"].as_str().unwrap_or("").to_string(),
                    v["error"].as_str().map(str::to_string),
                ),
            );
        }
        seen.len() == wanted.len()
    });
    if seen.len() != wanted.len() {
        let missing: Vec<_> = wanted
            .iter()
            .filter(|id| !seen.contains_key(**id))
            .take(10)
            .collect();
        panic!(
            "events not final: {missing:?}; log tail:\n{}",
            tail(&agent.log_text(), 30)
        );
    }
    seen
}

pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls readiness until `pred(status, body)` holds. Readiness has no log line to wait on.
async fn wait_ready(agent: &Agent, timeout: Duration, pred: impl Fn(StatusCode, &Value) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = admin_get(agent, "/readyz").await;
        if pred(reply.status, &reply.body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never matched; last: {} {}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Types and upserts, both modes, three databases

async fn types_and_upserts(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(kind, dir.path()).await;
    let s = db.name("typed_stmt");
    let t = db.name("typed_table");
    let ledger = db.name("ledger");
    for table in [&s, &t] {
        let ddl = match kind {
            Kind::Postgres => format!(
                "CREATE TABLE {table} (id text PRIMARY KEY, name text, n bigint, amount \
                 numeric(14,2), flag boolean, at timestamptz, doc jsonb)"
            ),
            Kind::MariaDb => format!(
                "CREATE TABLE {table} (id varchar(64) PRIMARY KEY, name text, n bigint, amount \
                 decimal(14,2), flag boolean, at datetime(6), doc json)"
            ),
            Kind::Sqlite => format!(
                "CREATE TABLE {table} (id TEXT PRIMARY KEY, name TEXT, n INTEGER, amount NUMERIC, \
                 flag BOOLEAN, at TIMESTAMP, doc JSON)"
            ),
        };
        db.exec(&ddl).await;
    }
    let columns = "id, name, n, amount, flag, at, doc";
    let params = ":id, :name, :n, :amount, :flag, :at, :doc";
    let statement = match kind {
        Kind::Postgres | Kind::Sqlite => format!(
            "INSERT INTO {s} ({columns}) VALUES ({params}) ON CONFLICT (id) DO UPDATE SET name = \
             excluded.name, n = excluded.n, amount = excluded.amount, flag = excluded.flag, at = \
             excluded.at, doc = excluded.doc"
        ),
        Kind::MariaDb => format!(
            "INSERT INTO {s} ({columns}) VALUES ({params}) ON DUPLICATE KEY UPDATE name = \
             VALUES(name), n = VALUES(n), amount = VALUES(amount), flag = VALUES(flag), at = \
             VALUES(at), doc = VALUES(doc)"
        ),
    };
    write_adapter(dir.path(), "payload.jsonata", "payload");
    // MariaDB takes no offsets in datetime literals: in statement mode the adapter writes the
    // timestamp in UTC the way MariaDB reads it (table mode converts by the column's type).
    write_adapter(
        dir.path(),
        "maria.jsonata",
        r#"$merge([payload, {"at": payload.at ? $fromMillis($toMillis(payload.at), "[Y0001]-[M01]-[D01] [H01]:[m01]:[s01]") : null}])"#,
    );
    let statement_adapter = if kind == Kind::MariaDb {
        "maria.jsonata"
    } else {
        "payload.jsonata"
    };
    let ledger_line = format!("ledger_table = {ledger:?}\n");
    let config = agent_config(
        dir.path(),
        "",
        &[
            sql_route(
                "stmt",
                "row.upsert",
                statement_adapter,
                &db,
                &format!("statement = {}\n{ledger_line}", toml_str(&statement)),
            ),
            sql_route(
                "tbl",
                "row.*",
                "payload.jsonata",
                &db,
                &format!(
                    "table = {t:?}\nkey = [\"id\"]\ndelete_when = \"deleted = true\"\n{ledger_line}"
                ),
            ),
        ],
    );
    let agent = Agent::start(dir.path(), &config);
    let events = [
        (
            "e1",
            "row.upsert",
            "K1",
            json!({"id": "k1", "name": "first", "n": 1, "amount": 10.5, "flag": false,
                   "at": "2026-11-22T08:00:00Z", "doc": {"a": 1}}),
        ),
        (
            "e2",
            "row.upsert",
            "K1",
            json!({"id": "k1", "name": "second 'quoted' ő", "n": 9007199254740991i64,
                   "amount": 12345.67, "flag": true, "at": "2026-11-22T09:30:00+01:00",
                   "doc": {"b": [1, 2], "s": "x"}}),
        ),
        (
            "e3",
            "row.upsert",
            "K2",
            json!({"id": "k2", "name": null, "n": null, "amount": null, "flag": null,
                   "at": null, "doc": null}),
        ),
        (
            "e4",
            "row.upsert",
            "K3",
            json!({"id": "k3", "name": "to be deleted", "n": 3, "amount": 0, "flag": true,
                   "at": "2026-01-01T00:00:00Z", "doc": []}),
        ),
    ];
    let mut ids = Vec::new();
    for (id, ty, subject, payload) in &events {
        post_ok(&agent, id, event(id, ty, subject, payload.clone())).await;
        ids.push(id.to_string());
    }
    let finals = wait_all_final(&agent, &ids, Duration::from_secs(30));
    for (id, (state, error)) in &finals {
        assert_eq!(state, "applied", "{id}: {error:?}");
    }
    // A delete through the table route; the statement route does not take this type.
    post_ok(
        &agent,
        "e5",
        event(
            "e5",
            "row.delete",
            "K3",
            json!({"id": "k3", "deleted": true}),
        ),
    )
    .await;
    let finals = wait_all_final(&agent, &["e5".into()], Duration::from_secs(20));
    assert_eq!(finals["e5"].0, "applied", "{:?}", finals["e5"]);

    let at_epoch = |text: &str| {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp()
            .to_string()
    };
    let expected_at = at_epoch("2026-11-22T08:30:00Z");
    for table in [&s, &t] {
        let query = match kind {
            Kind::Postgres => format!(
                "SELECT id, name, n::text, amount::text, flag::text, \
                 extract(epoch from at)::bigint::text, doc::text FROM {table} ORDER BY id"
            ),
            Kind::MariaDb => format!(
                "SELECT id, name, CAST(n AS CHAR), CAST(amount AS CHAR), CAST(flag AS CHAR), \
                 CAST(CAST(UNIX_TIMESTAMP(at) AS SIGNED) AS CHAR), CAST(doc AS CHAR) FROM {table} ORDER BY id"
            ),
            Kind::Sqlite => {
                format!("SELECT id, name, n, amount, flag, at, doc FROM {table} ORDER BY id")
            }
        };
        let rows = db.rows(&query).await;
        let mut expected: Vec<Vec<Option<String>>> = vec![
            vec![
                Some("k1".into()),
                Some("second 'quoted' ő".into()),
                Some("9007199254740991".into()),
                Some("12345.67".into()),
                Some(
                    match kind {
                        Kind::Postgres => "true",
                        _ => "1",
                    }
                    .into(),
                ),
                Some(match kind {
                    Kind::Sqlite => "2026-11-22T09:30:00+01:00".to_string(),
                    _ => expected_at.clone(),
                }),
                None, // compared as JSON below
            ],
            vec![Some("k2".into()), None, None, None, None, None, None],
        ];
        if table == &s {
            // The statement route does not take row.delete: k3 stays there.
            expected.push(rows.get(2).cloned().unwrap_or_default());
        }
        assert_eq!(rows.len(), expected.len(), "{table}: {rows:?}");
        for (row, want) in rows.iter().zip(&expected) {
            assert_eq!(row[..6], want[..6], "{table}");
        }
        let doc: Value = serde_json::from_str(rows[0][6].as_deref().unwrap()).unwrap();
        assert_eq!(doc, json!({"b": [1, 2], "s": "x"}), "{table}");
        assert_eq!(rows[1][6], None, "{table}: JSON null is SQL NULL");
        if table == &s {
            assert_eq!(rows[2][0].as_deref(), Some("k3"));
        }
    }
    if kind == Kind::Sqlite {
        let types = db
            .rows(&format!(
                "SELECT typeof(name), typeof(n), typeof(amount), typeof(flag), typeof(at), \
                 typeof(doc) FROM {t} WHERE id = 'k1'"
            ))
            .await;
        assert_eq!(
            types[0],
            ["text", "integer", "real", "integer", "text", "text"]
                .map(|s| Some(s.to_string()))
                .to_vec()
        );
    }
    // One ledger row per event and route.
    assert_eq!(db.count(&ledger).await, 9);
}

#[tokio::test]
async fn postgres_rows_land_typed_and_upserts_update() {
    types_and_upserts(Kind::Postgres).await;
}

#[tokio::test]
async fn mariadb_rows_land_typed_and_upserts_update() {
    types_and_upserts(Kind::MariaDb).await;
}

#[tokio::test]
async fn sqlite_rows_land_typed_and_upserts_update() {
    types_and_upserts(Kind::Sqlite).await;
}

// ---------------------------------------------------------------------------------------------
// Exactly once under kill -9

const KILL_EVENTS: usize = 2000;
const KILL_SUBJECTS: usize = 40;

async fn exactly_once_under_kill_9(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(kind, dir.path()).await;
    let table = db.name("once");
    let ledger = db.name("once_ledger");
    db.exec(&format!(
        "CREATE TABLE {table} ({}, event_id varchar(200) NOT NULL, subject varchar(64) NOT \
         NULL, n bigint NOT NULL)",
        db.serial()
    ))
    .await;
    write_adapter(
        dir.path(),
        "once.jsonata",
        r#"{"id": id, "subject": subject, "n": payload.n}"#,
    );
    let statement =
        format!("INSERT INTO {table} (event_id, subject, n) VALUES (:id, :subject, :n)");
    let config = support::config_text(
        dir.path(),
        &agent_config(
            dir.path(),
            "",
            &[
                sql_route(
                    "once",
                    "*",
                    "once.jsonata",
                    &db,
                    &format!(
                        "statement = {}\nledger_table = {ledger:?}\nmax_batch = 32\n\
                         max_linger_ms = 2\nmax_connections = 4\n\
                         retry = {{ initial_ms = 20, max_ms = 200, max_attempts = 0 }}\n",
                        toml_str(&statement)
                    ),
                ),
                "[dispatch]\nmax_parallel = 64\n".into(),
            ],
        ),
    );
    let id_of = |subject: usize, n: usize| format!("s{subject:02}-n{n:02}");
    let per_subject = KILL_EVENTS / KILL_SUBJECTS;
    let all: BTreeSet<String> = (0..KILL_SUBJECTS)
        .flat_map(|s| (0..per_subject).map(move |n| (s, n)))
        .map(|(s, n)| id_of(s, n))
        .collect();
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::<String>::new()));
    // Posts every event of its subjects, in order, that is not acknowledged yet; stops at the
    // first transport error (the agent was killed).
    let poster = |url: String, subjects: Vec<usize>, stop: Arc<AtomicBool>| {
        let acked = acked.clone();
        async move {
            for n in 0..per_subject {
                for &s in &subjects {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let id = id_of(s, n);
                    if acked.lock().unwrap().contains(&id) {
                        continue;
                    }
                    let body = event(&id, "count", &format!("S{s:02}"), json!({"n": n}));
                    match post(&url, &id, body).await {
                        Ok(r) if r.status.is_success() => {
                            acked.lock().unwrap().insert(id);
                        }
                        Ok(r) => panic!("{id}: {} {:?}", r.status, r.body),
                        Err(_) => return,
                    }
                }
            }
        }
    };
    let started = Instant::now();
    let mut kills = 0;
    for round in 0..6 {
        let mut agent = Agent::start_with(dir.path(), &config);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..KILL_SUBJECTS)
            .map(|s| tokio::spawn(poster(agent.url(EVENTS), vec![s], stop.clone())))
            .collect();
        // Kill while batches are being committed.
        let target = 100 + round * 60;
        agent.wait_for_log(Duration::from_secs(30), {
            let mut n = 0;
            move |v| {
                if support::applied_line(v) {
                    n += 1;
                }
                n >= target
            }
        });
        agent.kill9();
        kills += 1;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    }
    // The hub delivers whatever was not acknowledged; the last run applies the rest.
    let agent = Agent::start_with(dir.path(), &config);
    let tasks: Vec<_> = (0..KILL_SUBJECTS)
        .map(|s| {
            tokio::spawn(poster(
                agent.url(EVENTS),
                vec![s],
                Arc::new(AtomicBool::new(false)),
            ))
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*acked.lock().unwrap(), all, "every event acknowledged");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let rows = db.count(&table).await;
        let ledgered = db.count(&ledger).await;
        if rows >= KILL_EVENTS as i64 && ledgered >= KILL_EVENTS as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {rows} rows and {ledgered} ledger rows of {KILL_EVENTS}; log tail:\n{}",
            tail(&agent.log_text(), 20)
        );
        // Waiting for the dispatcher to catch up with the backlog.
        agent.wait_for_log(Duration::from_millis(200), support::applied_line);
    }
    // And the agent sees every event applied (not failed, not pending).
    let journal = agent.state_dir.join(ess_agent::journal::FILE_NAME);
    let applied_in_journal = || {
        let conn = rusqlite::Connection::open(&journal).unwrap();
        let count = |state: &str| {
            conn.query_row(
                "SELECT count(*) FROM events WHERE state = ?1",
                [state],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
        };
        assert_eq!(
            count("failed"),
            0,
            "events failed; log tail:\n{}",
            tail(&agent.log_text(), 20)
        );
        count("applied")
    };
    while applied_in_journal() < KILL_EVENTS as i64 {
        assert!(
            Instant::now() < deadline,
            "the journal has {} of {KILL_EVENTS} events applied; log tail:\n{}",
            applied_in_journal(),
            tail(&agent.log_text(), 20)
        );
        agent.wait_for_log(Duration::from_millis(200), |v| {
            v["message"] == "event final"
        });
    }
    // Exactly one row per event, and the ledger agrees.
    let rows = db
        .rows(&format!(
            "SELECT event_id, subject, CAST(n AS CHAR(20)) FROM {table} ORDER BY seq"
        ))
        .await;
    assert_eq!(rows.len(), KILL_EVENTS, "one row per event, no duplicates");
    let in_table: BTreeSet<String> = rows.iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(in_table, all);
    let in_ledger: BTreeSet<String> = db
        .rows(&format!(
            "SELECT event_id FROM {ledger} WHERE route = 'once'"
        ))
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(
        in_ledger, all,
        "the ledger names exactly the applied events"
    );
    // Per subject, rows were written in order.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for row in &rows {
        let subject = row[1].clone().unwrap();
        let n: i64 = row[2].as_deref().unwrap().trim().parse().unwrap();
        if let Some(prev) = last.insert(subject.clone(), n) {
            assert!(n > prev, "{subject}: {n} written after {prev}");
        }
    }
    let hits = agent.log_text().matches("already applied").count();
    eprintln!(
        "{kind:?}: {KILL_EVENTS} events through {kills} kill -9s in {:?}; ledger hits in the \
         last run: {hits}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_exactly_once_through_repeated_kill_9() {
    exactly_once_under_kill_9(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_exactly_once_through_repeated_kill_9() {
    exactly_once_under_kill_9(Kind::MariaDb).await;
}

/// A ledger hit is "already applied": nothing is written again and the event is applied.
#[tokio::test]
async fn a_ledger_hit_applies_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(Kind::Postgres, dir.path()).await;
    let table = db.name("hit");
    let ledger = db.name("hit_ledger");
    db.exec(&format!("CREATE TABLE {table} (event_id text NOT NULL)"))
        .await;
    write_adapter(dir.path(), "id.jsonata", r#"{"id": id}"#);
    let config = agent_config(
        dir.path(),
        "",
        &[sql_route(
            "hits",
            "*",
            "id.jsonata",
            &db,
            &format!(
                "statement = \"INSERT INTO {table} (event_id) VALUES (:id)\"\nledger_table = \
                 {ledger:?}\n"
            ),
        )],
    );
    let agent = Agent::start(dir.path(), &config);
    post_ok(&agent, "first", event("first", "t", "A", json!({}))).await;
    wait_all_final(&agent, &["first".into()], Duration::from_secs(20));
    // As if "second" had been committed just before a crash.
    db.exec(&format!(
        "INSERT INTO {ledger} (event_id, route) VALUES ('second', 'hits')"
    ))
    .await;
    post_ok(&agent, "second", event("second", "t", "B", json!({}))).await;
    let finals = wait_all_final(&agent, &["second".into()], Duration::from_secs(20));
    assert_eq!(finals["second"].0, "applied");
    assert!(
        agent
            .wait_for_log(Duration::from_secs(5), |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("already applied"))
                    && v["event_id"] == "second"
            })
            .is_some()
    );
    let rows = db.rows(&format!("SELECT event_id FROM {table}")).await;
    assert_eq!(rows, vec![vec![Some("first".to_string())]]);
}

// ---------------------------------------------------------------------------------------------
// The database unreachable for 10 s

async fn database_cut(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(kind, dir.path()).await;
    let table = db.name("cut");
    let ledger = db.name("cut_ledger");
    db.exec(&format!(
        "CREATE TABLE {table} ({}, event_id varchar(200) NOT NULL, subject varchar(64) NOT \
         NULL, n bigint NOT NULL)",
        db.serial()
    ))
    .await;
    let (server, url_base) = match kind {
        Kind::Postgres => ("127.0.0.1:5432", "postgres://postgres@127.0.0.1"),
        _ => ("127.0.0.1:3306", "mysql://root@127.0.0.1"),
    };
    let proxy = Proxy::start(server.parse().unwrap()).await;
    let url = format!("{url_base}:{}/test", proxy.addr.port());
    write_adapter(
        dir.path(),
        "cut.jsonata",
        r#"{"id": id, "subject": subject, "n": payload.n}"#,
    );
    let statement =
        format!("INSERT INTO {table} (event_id, subject, n) VALUES (:id, :subject, :n)");
    let config = agent_config(
        dir.path(),
        "",
        &[format!(
            "[[routes]]\nname = \"cut\"\nadapter = \"cut.jsonata\"\nsink = \"db\"\n\
             [sinks.db]\ntype = \"sql\"\nurl = {url:?}\nstatement = {}\nledger_table = \
             {ledger:?}\nconnect_timeout_ms = 1000\nstatement_timeout_ms = 2000\nhealthcheck = \
             true\n\
             retry = {{ initial_ms = 100, max_ms = 1000, max_attempts = 0 }}\n\
             [dispatch]\nhealthcheck_interval_ms = 200\n",
            toml_str(&statement)
        )],
    );
    let agent = Agent::start(dir.path(), &config);
    let subjects = 5;
    let send = |range: std::ops::Range<usize>| {
        let url = agent.url(EVENTS);
        async move {
            let mut ids = Vec::new();
            for n in range {
                for s in 0..subjects {
                    let id = format!("c{s}-{n:03}");
                    let body = event(&id, "count", &format!("C{s}"), json!({"n": n}));
                    let reply = post(&url, &id, body).await.unwrap();
                    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
                    ids.push(id);
                }
            }
            ids
        }
    };
    let before = send(0..4).await;
    for (id, (state, error)) in wait_all_final(&agent, &before, Duration::from_secs(20)) {
        assert_eq!(state, "applied", "{id}: {error:?}");
    }
    wait_ready(&agent, Duration::from_secs(10), |s, _| s == StatusCode::OK).await;

    proxy.cut();
    let cut_at = Instant::now();
    let during = send(4..24).await;
    // Every event was accepted (queued); applying them fails and is retried.
    assert!(
        agent
            .wait_for_log(Duration::from_secs(10), |v| v["message"]
                == "apply failed; will retry")
            .is_some(),
        "no retry while the database is cut off"
    );
    wait_ready(&agent, Duration::from_secs(10), |s, body| {
        s == StatusCode::SERVICE_UNAVAILABLE && body["reasons"]["sink db"].is_string()
    })
    .await;
    // The cut lasts 10 s.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    assert_eq!(
        db.count(&table).await,
        before.len() as i64,
        "nothing applied during the cut"
    );
    proxy.restore();

    let finals = wait_all_final(&agent, &during, Duration::from_secs(40));
    for (id, (state, error)) in &finals {
        assert_eq!(state, "applied", "{id}: {error:?}");
    }
    wait_ready(&agent, Duration::from_secs(10), |s, _| s == StatusCode::OK).await;
    let rows = db
        .rows(&format!(
            "SELECT event_id, subject, CAST(n AS CHAR(20)) FROM {table} ORDER BY seq"
        ))
        .await;
    let ids: BTreeSet<String> = rows.iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(
        rows.len(),
        before.len() + during.len(),
        "nothing lost, nothing twice"
    );
    assert_eq!(ids, before.iter().chain(&during).cloned().collect());
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for row in &rows {
        let subject = row[1].clone().unwrap();
        let n: i64 = row[2].as_deref().unwrap().trim().parse().unwrap();
        if let Some(prev) = last.insert(subject.clone(), n) {
            assert!(n > prev, "{subject}: {n} written after {prev}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_for_10_s_queues_then_applies_everything_in_order() {
    database_cut(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cut_for_10_s_queues_then_applies_everything_in_order() {
    database_cut(Kind::MariaDb).await;
}

// ---------------------------------------------------------------------------------------------
// Dead letters: a constraint violation and a missing field

async fn dead_letters(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(kind, dir.path()).await;
    let table = db.name("dl");
    let ledger = db.name("dl_ledger");
    let check = format!("n_not_negative_{}", db.suffix);
    let id_type = if kind == Kind::Sqlite {
        "TEXT"
    } else {
        "varchar(64)"
    };
    db.exec(&format!(
        "CREATE TABLE {table} (id {id_type} PRIMARY KEY, n integer NOT NULL, note text NOT \
         NULL, CONSTRAINT {check} CHECK (n >= 0))"
    ))
    .await;
    write_adapter(dir.path(), "payload.jsonata", "payload");
    let config = agent_config(
        dir.path(),
        "",
        &[
            sql_route(
                "dl",
                "*",
                "payload.jsonata",
                &db,
                &format!(
                    "statement = \"INSERT INTO {table} (id, n, note) VALUES (:id, :n, :note)\"\n\
                     ledger_table = {ledger:?}\nmax_linger_ms = 200\n"
                ),
            ),
            "[dispatch]\nmax_parallel = 64\n".into(),
        ],
    );
    let agent = Agent::start(dir.path(), &config);
    // The bad events travel in one batch with good ones of other subjects.
    let mut good = Vec::new();
    let url = agent.url(EVENTS);
    let mut posts = Vec::new();
    for i in 0..10 {
        let id = format!("good-{i}");
        good.push(id.clone());
        posts.push((
            id.clone(),
            event(
                &id,
                "t",
                &format!("G{i}"),
                json!({"id": id, "n": i, "note": "ok"}),
            ),
        ));
    }
    posts.insert(
        3,
        (
            "negative".into(),
            event(
                "negative",
                "t",
                "BAD1",
                json!({"id": "negative", "n": -1, "note": "x"}),
            ),
        ),
    );
    posts.insert(
        6,
        (
            "no-note".into(),
            event("no-note", "t", "BAD2", json!({"id": "no-note", "n": 1})),
        ),
    );
    let tasks: Vec<_> = posts
        .into_iter()
        .map(|(id, body)| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, &id, body).await.unwrap().status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::ACCEPTED);
    }
    let mut all = good.clone();
    all.extend(["negative".to_string(), "no-note".to_string()]);
    let finals = wait_all_final(&agent, &all, Duration::from_secs(20));
    for id in &good {
        assert_eq!(finals[id].0, "applied", "{id}: {:?}", finals[id].1);
    }
    let (state, error) = &finals["negative"];
    assert_eq!(state, "failed");
    let error = error.as_deref().unwrap();
    assert!(error.contains(&check), "the constraint is named: {error}");
    let (state, error) = &finals["no-note"];
    assert_eq!(state, "failed");
    let error = error.as_deref().unwrap();
    assert!(
        error.contains("\"note\"") && error.contains("missing"),
        "the missing field is named: {error}"
    );
    // Both are dead letters, and later events of other subjects keep flowing.
    let letters = admin_get(&agent, "/v1/dead-letters").await;
    let dead: BTreeSet<&str> = letters.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert!(
        dead.contains("negative") && dead.contains("no-note"),
        "{}",
        letters.body
    );
    let later: Vec<String> = (0..5).map(|i| format!("later-{i}")).collect();
    for (i, id) in later.iter().enumerate() {
        post_ok(
            &agent,
            id,
            event(
                id,
                "t",
                &format!("L{i}"),
                json!({"id": id, "n": i, "note": "ok"}),
            ),
        )
        .await;
    }
    for (id, (state, error)) in wait_all_final(&agent, &later, Duration::from_secs(20)) {
        assert_eq!(state, "applied", "{id}: {error:?}");
    }
    assert_eq!(db.count(&table).await, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_constraint_violation_and_missing_field_dead_letter_alone() {
    dead_letters(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_constraint_violation_and_missing_field_dead_letter_alone() {
    dead_letters(Kind::MariaDb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_constraint_violation_and_missing_field_dead_letter_alone() {
    dead_letters(Kind::Sqlite).await;
}

// ---------------------------------------------------------------------------------------------
// Array outputs: once per element, all in one transaction

async fn array_outputs(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(kind, dir.path()).await;
    let table = db.name("lines");
    let ledger = db.name("lines_ledger");
    let id_type = if kind == Kind::Sqlite {
        "TEXT"
    } else {
        "varchar(64)"
    };
    db.exec(&format!(
        "CREATE TABLE {table} (id {id_type} PRIMARY KEY, qty integer NOT NULL CHECK (qty > 0))"
    ))
    .await;
    // One row per line of the order.
    write_adapter(
        dir.path(),
        "lines.jsonata",
        r#"($order := payload.order; [payload.lines.{"id": $order & "-" & $string(no), "qty": qty}])"#,
    );
    let config = agent_config(
        dir.path(),
        "",
        &[sql_route(
            "lines",
            "*",
            "lines.jsonata",
            &db,
            &format!(
                "statement = \"INSERT INTO {table} (id, qty) VALUES (:id, :qty)\"\n\
                 ledger_table = {ledger:?}\n"
            ),
        )],
    );
    let agent = Agent::start(dir.path(), &config);
    let order =
        |id: &str, lines: Value| event(id, "order", id, json!({"order": id, "lines": lines}));
    post_ok(
        &agent,
        "o1",
        order(
            "o1",
            json!([{"no": 1, "qty": 2}, {"no": 2, "qty": 5}, {"no": 3, "qty": 1}]),
        ),
    )
    .await;
    // The third line breaks the check: none of this order's lines may land.
    post_ok(
        &agent,
        "o2",
        order(
            "o2",
            json!([{"no": 1, "qty": 2}, {"no": 2, "qty": 5}, {"no": 3, "qty": 0}]),
        ),
    )
    .await;
    let finals = wait_all_final(&agent, &["o1".into(), "o2".into()], Duration::from_secs(20));
    assert_eq!(finals["o1"].0, "applied", "{:?}", finals["o1"]);
    assert_eq!(finals["o2"].0, "failed");
    let error = finals["o2"].1.as_deref().unwrap();
    assert!(error.contains("record 2 of the output"), "{error}");
    let rows = db
        .rows(&format!("SELECT id FROM {table} ORDER BY id"))
        .await;
    let ids: Vec<String> = rows.into_iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(ids, ["o1-1", "o1-2", "o1-3"]);
}

#[tokio::test]
async fn postgres_array_output_writes_every_element_in_one_transaction() {
    array_outputs(Kind::Postgres).await;
}

#[tokio::test]
async fn mariadb_array_output_writes_every_element_in_one_transaction() {
    array_outputs(Kind::MariaDb).await;
}

#[tokio::test]
async fn sqlite_array_output_writes_every_element_in_one_transaction() {
    array_outputs(Kind::Sqlite).await;
}

// ---------------------------------------------------------------------------------------------
// SQL injection

async fn injection(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(kind, dir.path()).await;
    let s = db.name("victim_stmt");
    let t = db.name("victim_table");
    let ledger = db.name("victim_ledger");
    let id_type = if kind == Kind::Sqlite {
        "TEXT"
    } else {
        "varchar(64)"
    };
    for table in [&s, &t] {
        db.exec(&format!(
            "CREATE TABLE {table} (id {id_type} PRIMARY KEY, name text)"
        ))
        .await;
    }
    write_adapter(dir.path(), "payload.jsonata", "payload");
    let ledger_line = format!("ledger_table = {ledger:?}\n");
    let config = agent_config(
        dir.path(),
        "",
        &[
            sql_route(
                "stmt",
                "*",
                "payload.jsonata",
                &db,
                &format!(
                    "statement = \"INSERT INTO {s} (id, name) VALUES (:id, :name)\"\n{ledger_line}"
                ),
            ),
            sql_route(
                "tbl",
                "*",
                "payload.jsonata",
                &db,
                &format!("table = {t:?}\nkey = [\"id\"]\n{ledger_line}"),
            ),
        ],
    );
    let agent = Agent::start(dir.path(), &config);
    let hostile = [
        format!("'); DROP TABLE {s}; --"),
        format!("'); DROP TABLE {t}; --"),
        format!("\"); DROP TABLE {t}; --"),
        format!("\\'); DROP TABLE {s}; -- `"),
    ];
    let mut ids = Vec::new();
    for (i, name) in hostile.iter().enumerate() {
        let id = format!("inj-{i}");
        post_ok(
            &agent,
            &id,
            event(&id, "t", &id, json!({"id": id, "name": name})),
        )
        .await;
        ids.push(id);
    }
    // A hostile field name cannot become a column name.
    let field = format!("name\" = 1; DROP TABLE {t}; --");
    post_ok(
        &agent,
        "inj-field",
        event(
            "inj-field",
            "t",
            "F",
            json!({"id": "f", "name": "x", field.clone(): 1}),
        ),
    )
    .await;
    let mut all = ids.clone();
    all.push("inj-field".into());
    let finals = wait_all_final(&agent, &all, Duration::from_secs(20));
    for id in &ids {
        assert_eq!(finals[id].0, "applied", "{id}: {:?}", finals[id].1);
    }
    let (state, error) = &finals["inj-field"];
    assert_eq!(state, "failed");
    assert!(
        error.as_deref().unwrap().contains("not a plain identifier"),
        "{error:?}"
    );
    for table in [&s, &t] {
        assert!(db.exists(table).await, "{table} survived");
        let names: BTreeSet<String> = db
            .rows(&format!("SELECT name FROM {table} WHERE id LIKE 'inj-%'"))
            .await
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect();
        assert_eq!(names, hostile.iter().cloned().collect(), "{table}");
    }
    // The hostile field's statement wrote nothing at all (the statement route did insert "f").
    assert_eq!(db.count(&t).await, hostile.len() as i64);
}

#[tokio::test]
async fn postgres_values_are_bound_so_injection_is_impossible() {
    injection(Kind::Postgres).await;
}

#[tokio::test]
async fn mariadb_values_are_bound_so_injection_is_impossible() {
    injection(Kind::MariaDb).await;
}

#[tokio::test]
async fn sqlite_values_are_bound_so_injection_is_impossible() {
    injection(Kind::Sqlite).await;
}

// ---------------------------------------------------------------------------------------------
// Timeouts, TLS, validate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_and_connect_timeouts_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(Kind::Postgres, dir.path()).await;
    let table = db.name("slow");
    let ledger = db.name("slow_ledger");
    db.exec(&format!("CREATE TABLE {table} (id text)")).await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    write_adapter(dir.path(), "payload.jsonata", "payload");
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.addr.port());
    let config = agent_config(
        dir.path(),
        "",
        &[format!(
            "[[routes]]\nname = \"slow\"\nadapter = \"payload.jsonata\"\nsink = \"db\"\n\
             [sinks.db]\ntype = \"sql\"\nurl = {url:?}\nstatement = \"INSERT INTO {table} (id) \
             SELECT :id FROM pg_sleep(:sleep)\"\nledger_table = {ledger:?}\n\
             statement_timeout_ms = 300\nconnect_timeout_ms = 500\n\
             retry = {{ initial_ms = 100, max_ms = 300, max_attempts = 0 }}\n"
        )],
    );
    let agent = Agent::start(dir.path(), &config);
    // The server cancels a statement that runs too long; the event is retried.
    post_ok(
        &agent,
        "slow",
        event("slow", "t", "A", json!({"id": "slow", "sleep": 5})),
    )
    .await;
    let retry = agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "apply failed; will retry" && v["event_id"] == "slow"
        })
        .expect("the slow statement is retried");
    assert!(
        retry["error"].as_str().unwrap().contains("57014"),
        "{retry}"
    );
    // A network that swallows everything: no connection within the connect timeout.
    proxy.stall();
    post_ok(
        &agent,
        "stalled",
        event("stalled", "t", "B", json!({"id": "stalled", "sleep": 0})),
    )
    .await;
    let retry = agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "apply failed; will retry"
                && v["event_id"] == "stalled"
                && v["error"].as_str().is_some_and(|e| e.contains("500 ms"))
        })
        .unwrap_or_else(|| panic!("no connect timeout; log:\n{}", tail(&agent.log_text(), 20)));
    assert!(
        retry["error"]
            .as_str()
            .unwrap()
            .contains("connect_timeout_ms"),
        "{retry}"
    );
    proxy.restore();
    let finals = wait_all_final(&agent, &["stalled".into()], Duration::from_secs(20));
    assert_eq!(finals["stalled"].0, "applied", "{:?}", finals["stalled"]);
    assert_eq!(
        db.rows(&format!("SELECT id FROM {table}")).await,
        vec![vec![Some("stalled".to_string())]]
    );
}

#[tokio::test]
async fn postgres_over_tls_and_an_untrusted_certificate_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(Kind::Postgres, dir.path()).await;
    let table = db.name("tls");
    let ledger = db.name("tls_ledger");
    db.exec(&format!("CREATE TABLE {table} (id text, tls boolean)"))
        .await;
    // A CA that signed nothing the server has.
    let ca = {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .pem()
    };
    std::fs::write(dir.path().join("other-ca.pem"), ca).unwrap();
    write_adapter(dir.path(), "payload.jsonata", "payload");
    let statement = format!(
        "INSERT INTO {table} (id, tls) VALUES (:id, (SELECT ssl FROM pg_stat_ssl WHERE pid = \
         pg_backend_pid()))"
    );
    let sink = |tls: &str| {
        format!(
            "statement = {}\nledger_table = {ledger:?}\n{tls}\n\
             retry = {{ initial_ms = 100, max_ms = 300, max_attempts = 0 }}\n",
            toml_str(&statement)
        )
    };
    let config = agent_config(
        dir.path(),
        "",
        &[
            sql_route(
                "tls",
                "tls",
                "payload.jsonata",
                &db,
                &sink("tls = \"require\""),
            ),
            sql_route(
                "untrusted",
                "untrusted",
                "payload.jsonata",
                &db,
                &sink("tls = \"verify_ca\"\nca_file = \"other-ca.pem\""),
            ),
        ],
    );
    let agent = Agent::start(dir.path(), &config);
    post_ok(
        &agent,
        "secure",
        event("secure", "tls", "A", json!({"id": "secure"})),
    )
    .await;
    post_ok(
        &agent,
        "untrusted",
        event("untrusted", "untrusted", "B", json!({"id": "untrusted"})),
    )
    .await;
    let finals = wait_all_final(&agent, &["secure".into()], Duration::from_secs(20));
    assert_eq!(finals["secure"].0, "applied", "{:?}", finals["secure"]);
    assert_eq!(
        db.rows(&format!("SELECT id, CAST(tls AS TEXT) FROM {table}"))
            .await,
        vec![vec![Some("secure".to_string()), Some("true".to_string())]],
        "the row was written over TLS"
    );
    let retry = agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "apply failed; will retry" && v["event_id"] == "untrusted"
        })
        .expect("an untrusted certificate is retried");
    assert!(retry["error"].as_str().unwrap().contains("TLS"), "{retry}");
}

#[test]
fn validate_checks_statement_parameters_against_the_adapter_output() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(
        dir.path(),
        "rule.jsonata",
        r#"{"court_id": payload.court, "deadline": payload.deadline}"#,
    );
    let tests = dir.path().join("adapters/rule.tests");
    std::fs::create_dir_all(&tests).unwrap();
    std::fs::write(
        tests.join("moved.json"),
        r#"{"description": "a deadline moves",
            "event": {"id": "e1", "version": 1, "type": "rule.updated",
                      "payload": {"court": "IL-COOK", "deadline": "16:00"}},
            "expect": {"court_id": "IL-COOK", "deadline": "16:00"}}"#,
    )
    .unwrap();
    let write_config = |statement: &str| {
        let text = support::config_text(
            dir.path(),
            &format!(
                "adapters_dir = {:?}\n[[routes]]\nname = \"rules\"\nadapter = \"rule.jsonata\"\n\
                 sink = \"db\"\n[sinks.db]\ntype = \"sql\"\nurl = {:?}\nstatement = {}\n",
                dir.path().join("adapters").display().to_string(),
                PG_URL,
                toml_str(statement)
            ),
        );
        let path = dir.path().join("ess-agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let validate = |path: &Path| {
        let out = std::process::Command::new(support::binary())
            .arg("validate")
            .arg("--config")
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let ok =
        write_config("INSERT INTO rules (court_id, deadline) VALUES (:court_id, :deadline::time)");
    let (success, out) = validate(&ok);
    assert!(success, "{out}");
    // A parameter the adapter never returns.
    let bad = write_config(
        "INSERT INTO rules (court_id, deadline, tz) VALUES (:court_id, :deadline, :timezone)",
    );
    let (success, out) = validate(&bad);
    assert!(!success, "{out}");
    assert!(
        out.contains("\"timezone\"") && out.contains("moved.json"),
        "{out}"
    );
    // A statement that cannot be parsed.
    let broken = write_config("INSERT INTO rules (court_id) VALUES (:court_id, 'open");
    let (success, out) = validate(&broken);
    assert!(!success, "{out}");
    assert!(
        out.contains("sinks.db.statement") && out.contains("unterminated"),
        "{out}"
    );
}
