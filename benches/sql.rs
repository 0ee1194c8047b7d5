//! Events applied into PostgreSQL through the agent, beside a baseline that inserts the same rows
//! with the same batch size and the same number of connections directly through sqlx, in one
//! run.
//!
//! - **agent**: the release `ess-agent` binary with one route into an `sql` sink (statement mode,
//!   `max_batch` = `BATCH`, `max_connections` = `CONNECTIONS`, the ledger on). `ESS_BENCH_EVENTS` signed
//!   events (`SUBJECTS` subjects) are posted by `POSTERS` concurrent HTTP/1.1 clients; the figure
//!   is events / (first post → last row committed), so it includes ingress, the fsync'd journal,
//!   the adapter, the sink with its ledger, and the journal's record of each apply.
//! - **baseline**: `CONNECTIONS` sqlx connections each take the next `BATCH` rows and insert
//!   them one statement per row in one transaction (`BEGIN`, `BATCH` × `INSERT`, `COMMIT`), the
//!   statement prepared once per connection.
//!
//! Each side runs `ESS_BENCH_ROUNDS` times (default 3), alternating; the figures are medians.
//! Each phase also prints the CPU it cost per event: the whole machine's, and the agent
//! process's (or this process's for the in-process phases); the rest is mostly PostgreSQL.
//! The agent phases end when the agent has logged the last event final (`applied`), and the
//! table is counted once after that: counting it while it fills would cost PostgreSQL a scan
//! of the table every poll.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`). Run:
//! `cargo bench --bench sql` (`ESS_BENCH_EVENTS` overrides the default of 50,000 events)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ess_agent::http_client::{ClientTls, HttpClient, client};
use ess_agent::protocol::auth::WebhookSigner;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sqlx::{Executor as _, Row as _};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
mod common;
use common::{Variant, env_or, machine_busy};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SUBJECTS: usize = 1_000;
const BATCH: usize = 64;
const CONNECTIONS: usize = 4;
const POSTERS: usize = 64;

/// Events per phase.
fn events() -> usize {
    static EVENTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *EVENTS.get_or_init(|| env_or("ESS_BENCH_EVENTS", 50_000).max(SUBJECTS))
}

const USER_HZ: f64 = 100.0;

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu(path: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let Some(at) = text.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<f64> = text[at + 1..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / USER_HZ
}

/// CPU used by the machine and by one process from `start` on, per event.
struct CpuMeter {
    stat: String,
    machine: f64,
    process: f64,
}

impl CpuMeter {
    fn start(pid: Option<u32>) -> CpuMeter {
        let stat = match pid {
            Some(pid) => format!("/proc/{pid}/stat"),
            None => "/proc/self/stat".into(),
        };
        CpuMeter {
            process: stat_cpu(&stat),
            machine: machine_busy(),
            stat,
        }
    }

    /// "machine N µs/event, <who> M µs/event".
    fn per_event(&self, who: &str) -> String {
        let per = |seconds: f64| seconds / events() as f64 * 1e6;
        format!(
            "CPU per event: machine {:.1} µs, {who} {:.1} µs",
            per(machine_busy() - self.machine),
            per(stat_cpu(&self.stat) - self.process)
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The i-th row: what the adapter outputs for event i, and what the baseline inserts.
fn row(i: usize) -> Value {
    json!({
        "id": format!("ev-{i:06}"),
        "subject": format!("S{:04}", i % SUBJECTS),
        "n": i,
        "amount": format!("{}.{:02}", i % 10_000, i % 100),
        "at": "2026-11-22T08:00:00Z",
        "doc": {"rule": "filing-deadline", "court": "IL-COOK-CIRCUIT", "deadline": "16:00"},
    })
}

fn table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (event_id text NOT NULL, subject text NOT NULL, n bigint NOT NULL, \
         amount numeric(12,2) NOT NULL, at timestamptz NOT NULL, doc jsonb NOT NULL)"
    )
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    pool.fetch_one(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .await
        .unwrap()
        .get(0)
}

async fn baseline(pool: &sqlx::PgPool, table: &str, connections: usize) -> f64 {
    let rows: Arc<Vec<Value>> = Arc::new((0..events()).map(row).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let insert: Arc<str> = Arc::from(format!(
        "INSERT INTO {table} (event_id, subject, n, amount, at, doc) VALUES ($1, $2, $3, \
         CAST($4 AS numeric), CAST($5 AS timestamptz), CAST($6 AS jsonb))"
    ));
    let cpu = CpuMeter::start(None);
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (pool, rows, next, insert) =
                (pool.clone(), rows.clone(), next.clone(), insert.clone());
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                loop {
                    let from = next.fetch_add(BATCH, Ordering::Relaxed);
                    if from >= events() {
                        return;
                    }
                    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
                    for r in &rows[from..(from + BATCH).min(events())] {
                        sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                            .bind(r["id"].as_str().unwrap().to_string())
                            .bind(r["subject"].as_str().unwrap().to_string())
                            .bind(r["n"].as_i64().unwrap())
                            .bind(r["amount"].as_str().unwrap().to_string())
                            .bind(r["at"].as_str().unwrap().to_string())
                            .bind(r["doc"].to_string())
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                    }
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!(
        "  baseline, {connections} connections: {}",
        cpu.per_event("this process")
    );
    assert_eq!(count(pool, table).await, events() as i64);
    events() as f64 / elapsed
}

/// A running agent; killed when dropped.
struct Agent {
    child: Child,
    ingress: String,
    /// Events the agent has logged final in state `applied`.
    applied: Arc<AtomicUsize>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's configuration is the bench's, changed by `variant`.
fn start_agent(dir: &Path, table: &str, ledger: &str, variant: &Variant) -> Agent {
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    std::fs::write(
        dir.join("adapters/bench.jsonata"),
        r#"{"id": id, "subject": subject, "n": payload.n, "amount": payload.amount, "at": payload.at, "doc": payload.doc}"#,
    )
    .unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let statement = format!(
        "INSERT INTO {table} (event_id, subject, n, amount, at, doc) VALUES (:id, :subject, :n, \
         :amount, :at, :doc)"
    );
    let config = format!(
        "agent_id = \"bench\"\nstate_dir = {state:?}\nadapters_dir = {adapters:?}\n\
         [ingress]\nlisten = \"127.0.0.1:0\"\n[auth]\nhmac_secrets = [{{ file = {secret:?} }}]\n\
         [admin]\nenabled = false\n[limits]\nmin_free_disk_bytes = 0\n\
         [dispatch]\nmax_parallel = {parallel}\n\
         [[routes]]\nname = \"bench\"\nadapter = \"bench.jsonata\"\nsink = \"pg\"\n\
         [sinks.pg]\ntype = \"sql\"\nurl = {PG_URL:?}\nstatement = {statement:?}\n\
         ledger_table = {ledger:?}\nmax_batch = {BATCH}\nmax_connections = {CONNECTIONS}\n\
         statement_timeout_ms = 300000\n{extra}\n",
        extra = variant.toml,
        state = dir.join("state").display().to_string(),
        adapters = dir.join("adapters").display().to_string(),
        secret = dir.join("secret").display().to_string(),
        parallel = BATCH * CONNECTIONS * 2,
    );
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ess-agent"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env(
            "ESS_AGENT_LOG",
            std::env::var("ESS_BENCH_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(variant.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ess-agent");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let applied = Arc::new(AtomicUsize::new(0));
    let counter = applied.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("event final")
                && let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "event final"
                && v["state"] == "applied"
            {
                counter.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !sent
                && let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "ready"
            {
                let _ = tx.send(v["ingress"].as_str().unwrap_or_default().to_string());
                sent = true;
            }
            if std::env::var_os("ESS_BENCH_ECHO").is_some() && line.contains("sql batch done") {
                eprintln!("{line}");
            }
            // Keep reading so that the agent never blocks on a full pipe.
        }
    });
    let ingress = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent became ready");
    Agent {
        child,
        ingress,
        applied,
    }
}

/// Posts every event; returns when all are accepted.
async fn post_all(ingress: &str) {
    let url = format!("http://{ingress}/v1/events");
    let http: HttpClient = client(&ClientTls::default()).unwrap();
    let signer = Arc::new(WebhookSigner::new(SECRET).unwrap());
    let next = Arc::new(AtomicUsize::new(0));
    let posters: Vec<_> = (0..POSTERS)
        .map(|_| {
            let (http, signer, next, url) =
                (http.clone(), signer.clone(), next.clone(), url.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= events() {
                        return;
                    }
                    let r = row(i);
                    let id = r["id"].as_str().unwrap().to_string();
                    let body = serde_json::to_vec(&json!({
                        "id": id, "version": 1, "type": "rule.updated",
                        "subject": r["subject"], "payload": r,
                    }))
                    .unwrap();
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64;
                    let mut request =
                        Request::post(&url).header("content-type", "application/json");
                    for (k, v) in signer.headers(&id, now, &body) {
                        request = request.header(k, v);
                    }
                    let response = http
                        .request(request.body(Full::new(Bytes::from(body))).unwrap())
                        .await
                        .expect("post");
                    let status = response.status();
                    let _ = response.into_body().collect().await;
                    assert!(status.is_success(), "{id}: {status}");
                }
            })
        })
        .collect();
    for p in posters {
        p.await.unwrap();
    }
}

/// Waits until the agent has logged every event applied, then checks the table holds one row
/// per event.
async fn wait_applied(agent: &Agent, pool: &sqlx::PgPool, table: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while agent.applied.load(Ordering::Relaxed) < events() {
        assert!(
            Instant::now() < deadline,
            "the agent did not apply everything"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(count(pool, table).await, events() as i64);
}

/// The sink alone, in this process: `SqlSink::apply` called as the dispatcher calls it (one
/// event per subject at a time, up to `BATCH * CONNECTIONS * 2` at once), without ingress,
/// journal or adapter.
async fn sink_alone(pool: &sqlx::PgPool, table: &str, ledger: &str) -> f64 {
    use ess_agent::sink::Sink as _;
    let config: ess_agent::sink::sql::SqlConfig = toml::from_str(&format!(
        "url = {PG_URL:?}\nstatement = \"INSERT INTO {table} (event_id, subject, n, amount, at, \
         doc) VALUES (:id, :subject, :n, :amount, :at, :doc)\"\nledger_table = {ledger:?}\n\
         max_batch = {BATCH}\nmax_connections = {CONNECTIONS}\n"
    ))
    .unwrap();
    let sink = Arc::new(ess_agent::sink::sql::SqlSink::new(&config).unwrap());
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCH * CONNECTIONS * 2));
    let cpu = CpuMeter::start(None);
    let start = Instant::now();
    let subjects: Vec<_> = (0..SUBJECTS)
        .map(|subject| {
            let (sink, permits) = (sink.clone(), permits.clone());
            tokio::spawn(async move {
                for i in (subject..events()).step_by(SUBJECTS) {
                    let output = row(i);
                    let event = ess_agent::sink::EventMeta {
                        id: output["id"].as_str().unwrap().to_string(),
                        event_type: "rule.updated".into(),
                        version: 1,
                        subject: output["subject"].as_str().unwrap().to_string(),
                        revision: None,
                        source: None,
                        route: "bench".into(),
                        partner: "bench".into(),
                        received_at_ms: 1_796_601_600_000,
                    };
                    let _permit = permits.acquire().await.unwrap();
                    sink.apply(&event, &output).await.unwrap();
                }
            })
        })
        .collect();
    for s in subjects {
        s.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("  sink alone: {}", cpu.per_event("this process"));
    assert_eq!(count(pool, table).await, events() as i64);
    events() as f64 / elapsed
}

/// End to end: events/s from the first post to the last row, and the rate of acceptance.
async fn through_agent(pool: &sqlx::PgPool, table: &str, ledger: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), table, ledger, &Variant::default());
    let cpu = CpuMeter::start(Some(agent.child.id()));
    let start = Instant::now();
    post_all(&agent.ingress).await;
    let ingress = start.elapsed().as_secs_f64();
    wait_applied(&agent, pool, table).await;
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("  agent, end to end: {}", cpu.per_event("agent"));
    drop(agent);
    (events() as f64 / elapsed, events() as f64 / ingress)
}

/// The apply path alone: the events are accepted while the table is locked, so that they wait
/// in the journal; the figure is events/s from the lock's release to the last row.
async fn backlog_through_agent(
    pool: &sqlx::PgPool,
    table: &str,
    ledger: &str,
    variant: &Variant,
    label: &str,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), table, ledger, variant);
    let mut lock = pool.begin().await.unwrap();
    lock.execute(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
    )))
    .await
    .unwrap();
    post_all(&agent.ingress).await;
    eprintln!("draining the backlog (agent pid {})", agent.child.id());
    let cpu = CpuMeter::start(Some(agent.child.id()));
    let start = Instant::now();
    lock.commit().await.unwrap();
    wait_applied(&agent, pool, table).await;
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("  {label}: {}", cpu.per_event("agent"));
    drop(agent);
    events() as f64 / elapsed
}

fn main() {
    // Only `cargo bench` (which passes --bench) runs it: a test runner listing or running every
    // target (`cargo nextest run --all-targets`, `cargo test --benches`) gets no tests.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(CONNECTIONS as u32 + 1)
            .connect(PG_URL)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432, database test");
        let suffix = format!("{:08x}", rand::random::<u32>());
        let (mut end_to_end, mut accepted, mut backlog, mut base, mut base_one, mut alone) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let drop_tables = |tables: Vec<String>| {
            let pool = pool.clone();
            async move {
                for t in tables {
                    pool.execute(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                        .await
                        .unwrap();
                }
            }
        };
        let rounds = env_or("ESS_BENCH_ROUNDS", 3).max(1);
        // A change to compare with the defaults in the same run, in a second backlog phase.
        let variant = Variant::from_env();
        let mut backlog_variant = Vec::new();
        for round in 0..rounds {
            let table = format!("bench_sql_{suffix}_{round}");
            let ledger = format!("bench_sql_ledger_{suffix}_{round}");

            pool.execute(sqlx::AssertSqlSafe(table_ddl(&table)))
                .await
                .unwrap();
            let rate = baseline(&pool, &table, CONNECTIONS).await;
            drop_tables(vec![table.clone()]).await;
            eprintln!("round {round}: baseline, {CONNECTIONS} connections: {rate:.0} rows/s");
            base.push(rate);

            pool.execute(sqlx::AssertSqlSafe(table_ddl(&table)))
                .await
                .unwrap();
            let rate = baseline(&pool, &table, 1).await;
            drop_tables(vec![table.clone()]).await;
            eprintln!("round {round}: baseline, 1 connection: {rate:.0} rows/s");
            base_one.push(rate);

            pool.execute(sqlx::AssertSqlSafe(table_ddl(&table)))
                .await
                .unwrap();
            let rate = sink_alone(&pool, &table, &ledger).await;
            drop_tables(vec![table.clone(), ledger.clone()]).await;
            eprintln!("round {round}: sink alone {rate:.0} events/s applied");
            alone.push(rate);

            pool.execute(sqlx::AssertSqlSafe(table_ddl(&table)))
                .await
                .unwrap();
            let rate = backlog_through_agent(
                &pool,
                &table,
                &ledger,
                &Variant::default(),
                "agent, backlog",
            )
            .await;
            drop_tables(vec![table.clone(), ledger.clone()]).await;
            eprintln!("round {round}: agent, backlog {rate:.0} events/s applied");
            backlog.push(rate);

            if let Some(variant) = &variant {
                pool.execute(sqlx::AssertSqlSafe(table_ddl(&table)))
                    .await
                    .unwrap();
                let label = "agent, backlog, variant";
                let rate = backlog_through_agent(&pool, &table, &ledger, variant, label).await;
                drop_tables(vec![table.clone(), ledger.clone()]).await;
                eprintln!("round {round}: {label} {rate:.0} events/s applied");
                backlog_variant.push(rate);
            }

            pool.execute(sqlx::AssertSqlSafe(table_ddl(&table)))
                .await
                .unwrap();
            let (rate, ingress) = through_agent(&pool, &table, &ledger).await;
            drop_tables(vec![table.clone(), ledger.clone()]).await;
            eprintln!(
                "round {round}: agent, end to end {rate:.0} events/s applied (accepted \
                 {ingress:.0}/s)"
            );
            end_to_end.push(rate);
            accepted.push(ingress);
        }
        let (end_to_end, accepted, backlog) =
            (median(end_to_end), median(accepted), median(backlog));
        let (base, base_one, alone) = (median(base), median(base_one), median(alone));
        println!(
            "{} events, {SUBJECTS} subjects, batch {BATCH}, agent pool {CONNECTIONS} \
             connections, {rounds} rounds (medians)",
            events()
        );
        println!(
            "baseline, sqlx, same rows and batches, {CONNECTIONS} connections: {base:.0} rows/s"
        );
        println!("baseline, sqlx, same rows and batches, 1 connection: {base_one:.0} rows/s");
        println!(
            "sink alone (SqlSink::apply in process): {alone:.0} events/s applied; ratio {:.2} \
             ({CONNECTIONS} connections), {:.2} (1 connection)",
            alone / base,
            alone / base_one
        );
        println!(
            "agent, journaled backlog → adapter → sql sink: {backlog:.0} events/s applied; \
             ratio {:.2} ({CONNECTIONS} connections), {:.2} (1 connection); target ≥ 0.5",
            backlog / base,
            backlog / base_one
        );
        if let Some(variant) = &variant {
            let rate = median(backlog_variant);
            println!(
                "agent, journaled backlog, with {variant:?}: {rate:.0} events/s applied; ratio \
                 {:.2} ({CONNECTIONS} connections), {:.2} of the backlog phase with the defaults",
                rate / base,
                rate / backlog
            );
        }
        println!(
            "agent, end to end (HTTP → journal → adapter → sql sink): {end_to_end:.0} events/s \
             applied; ratio {:.2} ({CONNECTIONS} connections), {:.2} (1 connection); accepted \
             at {accepted:.0}/s",
            end_to_end / base,
            end_to_end / base_one
        );
    });
}
