//! `ess-bench journals`: one agent on its SQLite journal against one, two and three agents
//! sharing one PostgreSQL journal, driven by the same load generator in the same run.
//!
//! Each pass starts its agents (the release binary, each its own process, configuration and state
//! directory, listening on loopback port 0) on a fresh journal: a new state directory, or a new
//! schema in the PostgreSQL at `--pg-url` that is dropped once the agents have stopped. On
//! PostgreSQL the pass waits until the agents have split the partitions' leases among them,
//! then drives them with C keep-alive connections spread over the agents round robin, each
//! sending one signed Change Event at a time (closed loop): first a warm-up, after which the
//! pass waits until every accepted event is final, then the measured load. The figures are the
//! rate of 2xx answers (durable accepts: the agent answers once the event is committed) with its
//! latency, and the rate at which the events became final, from the first request of the
//! measured load until the last accepted event was final (read from the agents' metrics, added
//! up over the agents). Two kinds of pass, each for every journal setup:
//!
//! - **accept**: the route's adapter returns `undefined`, so each event is loaded, evaluated and
//!   finished (`filtered`) without sink I/O: the accept-only rate;
//! - **file**: the route reshapes each event into the file sink (`{id}.json`: temporary file,
//!   fsync, rename, directory fsync): end to end. The files are counted after the pass against
//!   the events applied: a lost or doubly applied event shows.
//!
//! Ratios are to the SQLite agent of the same run; the summary reports medians over the runs.
//! The agents' warnings and errors are counted and the first ones printed: what goes wrong under
//! load is part of the result. Traffic goes only to 127.0.0.1 (the PostgreSQL URL must name a
//! loopback host); every phase is bounded in time, and every agent is stopped and every schema
//! dropped before the benchmark exits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ess_agent::protocol::auth::WebhookSigner;
use serde_json::{Value, json};

use super::{
    Apply, DRAIN_TIMEOUT, E2E_SINKS, FILTER_SINK, Figures, INTERRUPTED, IdScheme, Load, SECRET,
    Target, TempDir, agent_config_with, count_records, cpu_seconds, db_cpu_seconds, median,
    median_figures, parent_pid, round, scrape_all, start_agent,
};

/// The PostgreSQL the shared journal lives in, unless `--pg-url` says otherwise.
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// How long the agents of a pass may take to split the partitions' leases among them.
const BALANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the agents' metrics are read while waiting for their events to be final: the
/// end-to-end time is known to this much.
const POLL: Duration = Duration::from_millis(100);
/// The revisions of the measured load start here, above every revision of the warm-up.
const PASS_REVISIONS: u64 = 1_000_000_000;

#[derive(Debug, clap::Args)]
pub struct JournalsArgs {
    /// The ess-agent binary to measure.
    #[arg(long)]
    agent: PathBuf,
    /// Concurrent keep-alive HTTP/1.1 connections, spread over the agents of a pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// Seconds each measured load lasts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    seconds: u64,
    /// Seconds of unrecorded load before each measured load.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_seconds: u64,
    /// How many times every pass runs; figures are medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    runs: u32,
    /// Size of each event body in bytes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..=1_000_000))]
    body_bytes: u32,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    client_threads: u32,
    /// The most agents sharing the PostgreSQL journal: passes run with 1, 2, … of them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    max_agents: u32,
    /// The PostgreSQL database the shared journal is created in, a schema per pass; its host
    /// must be a loopback address.
    #[arg(long, default_value = DEFAULT_PG_URL)]
    pg_url: String,
    /// Where the agents' temporary state directories are created (default: the system temp
    /// directory). It must be on the disk you mean to measure, not a tmpfs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Only the accept passes (no end-to-end passes into the file sink).
    #[arg(long)]
    accept_only: bool,
    /// Print the summary as JSON on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

/// Where the journal of a pass is, and how many agents share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// One agent, its journal in its state directory.
    Sqlite,
    /// This many agents on one PostgreSQL schema.
    Postgres(usize),
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Sqlite => "sqlite, 1 agent".into(),
            Setup::Postgres(1) => "postgres, 1 agent".into(),
            Setup::Postgres(n) => format!("postgres, {n} agents"),
        }
    }

    fn agents(self) -> usize {
        match self {
            Setup::Sqlite => 1,
            Setup::Postgres(n) => n,
        }
    }
}

/// What one pass measured.
#[derive(Debug, Clone, Default)]
struct Pass {
    /// The measured load: accepts, latency, CPU, the agents' metrics added up.
    figures: Figures,
    /// Events that became final per second, from the first request of the measured load until
    /// the last event it had accepted was final.
    finished_rate: f64,
    /// Seconds from the end of the measured load until its last event was final.
    drain_secs: f64,
    /// False when some accepted event was not final within [`DRAIN_TIMEOUT`].
    drained: bool,
    /// Events accepted (2xx) in the whole pass, warm-up included.
    accepted: u64,
    /// Final states counted by the agents over the whole pass, by state, added up.
    finals: BTreeMap<String, u64>,
    /// File passes: the records found in the agents' sink directories.
    records: Option<u64>,
    /// The agents' CPU and the database server's per event finished in the measured part, in
    /// microseconds.
    agent_cpu_us: f64,
    db_cpu_us: f64,
    /// Warning and error lines the agents logged after their ready lines, and the first few.
    warnings: u64,
    errors: u64,
    first_lines: Vec<String>,
    /// Seconds the agents took to split the partitions (PostgreSQL).
    balance_secs: f64,
    /// PostgreSQL: the first events that did not end in the expected state, as the journal
    /// holds them (seq, subject, revision, state, the agent that accepted it, the error).
    odd_events: Vec<String>,
}

impl Pass {
    fn finished(&self) -> u64 {
        self.finals.values().sum()
    }

    /// What went wrong, in one line, or `None`.
    fn trouble(&self) -> Option<String> {
        let mut trouble = Vec::new();
        if !self.drained {
            trouble.push(format!(
                "only {} of {} accepted events final after {DRAIN_TIMEOUT:?}",
                self.finished(),
                self.accepted
            ));
        } else if self.finished() != self.accepted {
            trouble.push(format!(
                "{} final states counted for {} events accepted",
                self.finished(),
                self.accepted
            ));
        }
        let expected = self.expected_state();
        for (state, n) in &self.finals {
            if state != expected {
                trouble.push(format!("{n} events {state}"));
            }
        }
        if let Some(records) = self.records {
            let applied = self.finals.get("applied").copied().unwrap_or(0);
            if records != applied {
                trouble.push(format!(
                    "{records} files in the sinks for {applied} events applied"
                ));
            }
        }
        if self.figures.non_2xx > 0 || self.figures.errors > 0 {
            trouble.push(format!(
                "{} non-2xx answers, {} failed requests",
                self.figures.non_2xx, self.figures.errors
            ));
        }
        if self.warnings + self.errors > 0 {
            trouble.push(format!(
                "the agents logged {} warnings and {} errors",
                self.warnings, self.errors
            ));
        }
        (!trouble.is_empty()).then(|| trouble.join("; "))
    }

    /// The final state every event of the pass should reach.
    fn expected_state(&self) -> &'static str {
        if self.records.is_some() {
            "applied"
        } else {
            "filtered"
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "load": self.figures.to_json(),
            "finished_per_sec": round(self.finished_rate, 1),
            "drain_secs": round(self.drain_secs, 2),
            "drained": self.drained,
            "accepted_with_warmup": self.accepted,
            "final_states": self.finals,
            "records_in_sinks": self.records,
            "agent_cpu_us_per_finished": round(self.agent_cpu_us, 1),
            "db_cpu_us_per_finished": round(self.db_cpu_us, 1),
            "warnings": self.warnings,
            "errors": self.errors,
            "first_warning_lines": self.first_lines,
            "balance_secs": round(self.balance_secs, 1),
            "odd_events": self.odd_events,
        })
    }
}

/// A schema of one pass in the shared PostgreSQL, dropped (with everything in it) when this is
/// dropped; the agents using it must have stopped by then.
struct BenchSchema {
    url: String,
    name: String,
}

impl BenchSchema {
    fn create(runtime: &tokio::runtime::Runtime, url: &str) -> anyhow::Result<BenchSchema> {
        let name = format!(
            "ess_bench_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        runtime.block_on(async {
            let mut conn = connect_pg(url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
                .execute(&mut conn)
                .await
                .with_context(|| format!("cannot create the schema {name}"))?;
            anyhow::Ok(())
        })?;
        Ok(BenchSchema {
            url: url.to_owned(),
            name,
        })
    }
}

impl Drop for BenchSchema {
    fn drop(&mut self) {
        // On a thread of its own with a runtime of its own: the drop may happen anywhere,
        // inside the load generator's runtime included.
        let (url, name) = (self.url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = connect_pg(&url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .execute(&mut conn)
                .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "ess-bench: warning: the schema {} could not be dropped; drop it by hand \
                 (DROP SCHEMA {} CASCADE)",
                self.name, self.name
            );
        }
    }
}

async fn connect_pg(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    tokio::time::timeout(
        Duration::from_secs(10),
        <sqlx::PgConnection as sqlx::Connection>::connect(url),
    )
    .await
    .context("connecting to PostgreSQL timed out")?
    .with_context(|| format!("cannot connect to PostgreSQL at {url}"))
}

/// The pid of the PostgreSQL server's postmaster, when it runs on this machine where this
/// process can see it: the parent of the backend serving our connection.
fn postmaster_pid(runtime: &tokio::runtime::Runtime, url: &str) -> anyhow::Result<Option<u32>> {
    let backend: i32 = runtime.block_on(async {
        let mut conn = connect_pg(url).await?;
        anyhow::Ok(
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await?,
        )
    })?;
    Ok(parent_pid(&backend.to_string()).and_then(|p| p.parse().ok()))
}

/// Checks that the URL's host is a loopback address: the benchmark sends nothing elsewhere.
fn check_loopback(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).with_context(|| format!("--pg-url {url} is not a URL"))?;
    // A `postgres://` URL's host is opaque to the URL parser: an address comes as text.
    let loopback = match parsed.host() {
        Some(url::Host::Domain(host)) => {
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        bail!("--pg-url must name a loopback host (127.0.0.1, ::1 or localhost): {url}");
    }
    Ok(())
}

/// Waits until the `agents` agents on `schema` hold every partition between them, each at most
/// its fair share; returns how long that took. Gives up (with a warning) after
/// [`BALANCE_TIMEOUT`]: the pass then runs with the split as it is.
fn wait_balanced(
    runtime: &tokio::runtime::Runtime,
    schema: &BenchSchema,
    agents: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    runtime.block_on(async {
        let mut conn = connect_pg(&schema.url).await?;
        loop {
            let rows: Vec<(Option<String>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT CASE WHEN expires_at > now() THEN owner END, count(*) \
                 FROM {}.partitions GROUP BY 1",
                schema.name
            )))
            .fetch_all(&mut conn)
            .await?;
            let total: i64 = rows.iter().map(|r| r.1).sum();
            let share = (total as usize).div_ceil(agents.max(1)) as i64;
            let owners: Vec<i64> = rows.iter().filter(|r| r.0.is_some()).map(|r| r.1).collect();
            let free = rows
                .iter()
                .filter(|r| r.0.is_none())
                .map(|r| r.1)
                .sum::<i64>();
            if total > 0
                && free == 0
                && owners.len() == agents
                && owners.iter().all(|&n| n <= share)
            {
                return anyhow::Ok(start.elapsed().as_secs_f64());
            }
            if start.elapsed() >= BALANCE_TIMEOUT || INTERRUPTED.load(Ordering::Relaxed) {
                eprintln!(
                    "ess-bench: warning: after {BALANCE_TIMEOUT:?} the partitions are still split \
                     {owners:?} with {free} free among {agents} agents; measuring anyway"
                );
                return anyhow::Ok(start.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The final state every event of a pass with `apply` should reach.
fn expected_state(apply: Apply) -> &'static str {
    match apply {
        Apply::File => "applied",
        Apply::Filter => "filtered",
        Apply::Park => "parked",
    }
}

/// An event's seq, subject, revision, state, the agent that accepted it, and its error.
type OddEvent = (i64, String, Option<i64>, String, String, Option<String>);

/// The first events in `schema` not in state `expected`, one line each.
fn odd_events(
    runtime: &tokio::runtime::Runtime,
    schema: &BenchSchema,
    expected: &str,
) -> anyhow::Result<Vec<String>> {
    runtime.block_on(async {
        let mut conn = connect_pg(&schema.url).await?;
        let rows: Vec<OddEvent> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT seq, subject, revision, state, received_by, error FROM {}.events \
                 WHERE state <> $1 ORDER BY seq LIMIT 10",
            schema.name
        )))
        .bind(expected)
        .fetch_all(&mut conn)
        .await?;
        anyhow::Ok(
            rows.into_iter()
                .map(|(seq, subject, revision, state, by, error)| {
                    format!(
                        "seq {seq} subject {subject} revision {revision:?} {state} (received by \
                         {by}): {}",
                        error.unwrap_or_default()
                    )
                })
                .collect(),
        )
    })
}

/// Final states the agents have counted, by state, added up.
fn final_states(metrics: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    metrics
        .iter()
        .filter_map(|(name, value)| {
            let state = name
                .strip_prefix("ess_agent_events_final_total{state=\"")?
                .strip_suffix("\"}")?;
            Some((state.to_owned(), *value as u64))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits (at most [`DRAIN_TIMEOUT`]) until the agents have counted `accepted` final states in
/// all; returns the final states, and whether they got there.
fn wait_final(
    runtime: &tokio::runtime::Runtime,
    agents: &[&Target],
    accepted: u64,
) -> anyhow::Result<(BTreeMap<String, u64>, bool)> {
    let start = Instant::now();
    loop {
        let metrics = scrape_all(runtime, agents)?.unwrap_or_default();
        let finals = final_states(&metrics);
        if finals.values().sum::<u64>() >= accepted {
            return Ok((finals, true));
        }
        if start.elapsed() >= DRAIN_TIMEOUT || INTERRUPTED.load(Ordering::Relaxed) {
            eprintln!(
                "ess-bench: warning: {} of {accepted} accepted events final after \
                 {DRAIN_TIMEOUT:?}; the journal's backlog says {}",
                finals.values().sum::<u64>(),
                metrics
                    .get("ess_agent_backlog")
                    .copied()
                    .unwrap_or(f64::NAN)
            );
            return Ok((finals, false));
        }
        std::thread::sleep(POLL);
    }
}

/// What every pass of a run shares.
struct Bench<'a> {
    args: &'a JournalsArgs,
    runtime: tokio::runtime::Runtime,
    agent_bin: PathBuf,
    work_dir: PathBuf,
    signer: WebhookSigner,
    postmaster: Option<u32>,
}

impl Bench<'_> {
    fn load(&self, addrs: &[SocketAddr], tag: String, secs: Duration, revisions: u64) -> Load {
        Load {
            addrs: addrs.to_vec(),
            connections: self.args.connections as usize,
            duration: secs,
            rate: None,
            body_bytes: self.args.body_bytes as usize,
            revision_base: revisions,
            ids: IdScheme::Uuid,
            tag,
            counter: AtomicU64::new(0),
            signer: self.signer.clone(),
        }
    }

    /// One pass: fresh agents on a fresh journal, warmed up, driven, waited for, stopped. Their
    /// directories go into `keep`, deleted after the run (see [`super::end_to_end`]).
    fn pass(
        &self,
        setup: Setup,
        apply: Apply,
        tag: &str,
        keep: &mut Vec<TempDir>,
    ) -> anyhow::Result<Pass> {
        let schema = match setup {
            Setup::Sqlite => None,
            Setup::Postgres(_) => Some(BenchSchema::create(&self.runtime, &self.args.pg_url)?),
        };
        let journal = schema.as_ref().map_or(String::new(), |s| {
            format!(
                "[journal]\nbackend = \"postgres\"\nurl = {:?}\nschema = {:?}\n",
                self.args.pg_url, s.name
            )
        });
        let sink = match apply {
            Apply::File => E2E_SINKS[0].1,
            Apply::Filter | Apply::Park => FILTER_SINK,
        };
        let dir = TempDir::new(&self.work_dir)?;
        let mut agents = Vec::new();
        for i in 0..setup.agents() {
            let own = dir.0.join(format!("agent-{i}"));
            std::fs::create_dir_all(&own)?;
            let config = agent_config_with(&own, apply, sink, &journal)?;
            agents.push(start_agent(&self.agent_bin, &config)?);
        }
        let targets: Vec<&Target> = agents.iter().collect();
        let addrs: Vec<SocketAddr> = agents.iter().map(|a| a.addr).collect();
        let db = schema.as_ref().and(self.postmaster);
        let mut pass = Pass {
            balance_secs: match &schema {
                Some(schema) => wait_balanced(&self.runtime, schema, agents.len())?,
                None => 0.0,
            },
            ..Pass::default()
        };

        let warmup = Duration::from_secs(self.args.warmup_seconds);
        if !warmup.is_zero() {
            let warm = super::measure_on(
                &self.runtime,
                &targets,
                db,
                self.load(&addrs, format!("{tag}-warm"), warmup, 0),
            )?;
            pass.accepted += warm.ok;
            wait_final(&self.runtime, &targets, pass.accepted)?;
        }
        let before = final_states(&scrape_all(&self.runtime, &targets)?.unwrap_or_default());
        let cpu = || -> f64 {
            agents
                .iter()
                .filter_map(|a| cpu_seconds(&a.pid().to_string()))
                .sum()
        };
        let cpu_before = cpu();
        let db_before = db.map_or(0.0, db_cpu_seconds);
        let started = Instant::now();
        pass.figures = super::measure_on(
            &self.runtime,
            &targets,
            db,
            self.load(
                &addrs,
                tag.to_owned(),
                Duration::from_secs(self.args.seconds),
                PASS_REVISIONS,
            ),
        )?;
        let load_end = Instant::now();
        pass.accepted += pass.figures.ok;
        let (finals, drained) = wait_final(&self.runtime, &targets, pass.accepted)?;
        let secs = started.elapsed().as_secs_f64();
        pass.drain_secs = load_end.elapsed().as_secs_f64();
        pass.drained = drained;
        let finished = finals.values().sum::<u64>() - before.values().sum::<u64>();
        pass.finished_rate = finished as f64 / secs;
        pass.agent_cpu_us = (cpu() - cpu_before) / (finished.max(1) as f64) * 1e6;
        pass.db_cpu_us =
            (db.map_or(0.0, db_cpu_seconds) - db_before) / (finished.max(1) as f64) * 1e6;
        pass.finals = finals;
        for agent in &agents {
            let log = agent.log();
            pass.warnings += log.warnings;
            pass.errors += log.errors;
            pass.first_lines.extend(
                log.first.into_iter().take(
                    super::LogTally::KEEP - pass.first_lines.len().min(super::LogTally::KEEP),
                ),
            );
        }
        drop(targets);
        let mut stop_failed = None;
        for agent in agents {
            if let Err(e) = agent.stop() {
                stop_failed.get_or_insert(e);
            }
        }
        if let Some(schema) = &schema
            && pass
                .finals
                .keys()
                .any(|state| state != expected_state(apply))
        {
            pass.odd_events = odd_events(&self.runtime, schema, expected_state(apply))
                .unwrap_or_else(|e| vec![format!("cannot read them: {e:#}")]);
        }
        if apply == Apply::File {
            pass.records = Some(
                (0..setup.agents())
                    .map(|i| count_records(&dir.0.join(format!("agent-{i}")).join("out")))
                    .sum(),
            );
        }
        drop(schema);
        keep.push(dir);
        if let Some(e) = stop_failed {
            eprintln!("ess-bench: warning: {e:#}");
        }
        Ok(pass)
    }
}

/// One run: every setup's accept pass, then every setup's file pass.
#[derive(Debug, Default)]
struct Run {
    accept: Vec<Pass>,
    file: Vec<Pass>,
}

/// The setups in the order they run: SQLite first, the baseline of the ratios.
fn setups(max_agents: u32) -> Vec<Setup> {
    std::iter::once(Setup::Sqlite)
        .chain((1..=max_agents as usize).map(Setup::Postgres))
        .collect()
}

pub fn measure(args: &JournalsArgs) -> anyhow::Result<()> {
    check_loopback(&args.pg_url)?;
    let agent_bin = args
        .agent
        .canonicalize()
        .with_context(|| format!("no agent binary at {}", args.agent.display()))?;
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads as usize)
        .thread_name("load")
        .enable_all()
        .build()?;
    super::watch_signals(&runtime);
    let postmaster = postmaster_pid(&runtime, &args.pg_url)?;
    let bench = Bench {
        args,
        runtime,
        agent_bin,
        work_dir,
        signer: WebhookSigner::new(SECRET).map_err(|e| anyhow::anyhow!("{e}"))?,
        postmaster,
    };
    let setups = setups(args.max_agents);
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "ess-bench journals: {} connections, {}s per pass ({}s warm-up), {} B events, {} run(s); \
         {nproc} CPUs, load average {}; PostgreSQL {} (server pid {})",
        args.connections,
        args.seconds,
        args.warmup_seconds,
        args.body_bytes,
        args.runs,
        load_avg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.pg_url,
        postmaster.map_or("not visible".into(), |p| p.to_string()),
    );
    let mut runs = Vec::new();
    for run_no in 1..=args.runs {
        let mut run = Run::default();
        let mut keep = Vec::new();
        let kinds: &[Apply] = if args.accept_only {
            &[Apply::Filter]
        } else {
            &[Apply::Filter, Apply::File]
        };
        for &apply in kinds {
            for &setup in &setups {
                let what = if apply == Apply::File {
                    "file"
                } else {
                    "accept"
                };
                let pass = bench.pass(
                    setup,
                    apply,
                    &format!("r{run_no}-{what}-{}", setup.agents()),
                    &mut keep,
                )?;
                eprintln!(
                    "run {run_no}: {what:<6} {:<20} {}\n        {:.0} events final/s (drained \
                     {:.1} s after the load), {:.1} µs agent CPU and {:.1} µs PostgreSQL CPU per \
                     event; partitions split in {:.1} s",
                    setup.name(),
                    pass.figures.brief(),
                    pass.finished_rate,
                    pass.drain_secs,
                    pass.agent_cpu_us,
                    pass.db_cpu_us,
                    pass.balance_secs,
                );
                if let Some(trouble) = pass.trouble() {
                    eprintln!("        TROUBLE: {trouble}");
                    for line in &pass.first_lines {
                        eprintln!("        | {line}");
                    }
                    for event in &pass.odd_events {
                        eprintln!("        journal: {event}");
                    }
                }
                match apply {
                    Apply::File => run.file.push(pass),
                    _ => run.accept.push(pass),
                }
            }
        }
        drop(keep);
        runs.push(run);
    }
    bench.runtime.shutdown_timeout(Duration::from_secs(1));

    let summary = Summary::new(&runs, &setups);
    if args.json {
        let out = json!({
            "benchmark": "journals",
            "connections": args.connections,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "body_bytes": args.body_bytes,
            "nproc": nproc,
            "load_average_at_start": load_avg.trim(),
            "setups": setups.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "runs": runs.iter().map(|r| json!({
                "accept": r.accept.iter().map(Pass::to_json).collect::<Vec<_>>(),
                "file": r.file.iter().map(Pass::to_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "median": summary.to_json(&setups),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        summary.print(args, &setups, nproc, &load_avg);
    }
    Ok(())
}

/// Medians per setup and kind of pass.
struct Summary {
    /// Per setup: the median figures, finished rate, ratio to SQLite's accept rate, and of the
    /// finished rate; the passes with trouble.
    accept: Vec<Median>,
    file: Vec<Median>,
    runs: usize,
}

#[derive(Debug, Default)]
struct Median {
    figures: Figures,
    finished_rate: f64,
    accept_ratio: f64,
    finished_ratio: f64,
    agent_cpu_us: f64,
    db_cpu_us: f64,
    drain_secs: f64,
    /// Passes (of all runs) in which something went wrong, and what.
    trouble: Vec<String>,
}

impl Median {
    fn of(runs: &[Run], pick: fn(&Run) -> &Vec<Pass>, i: usize) -> Median {
        let passes: Vec<(&Pass, Option<&Pass>)> = runs
            .iter()
            .filter_map(|r| pick(r).get(i).map(|p| (p, pick(r).first())))
            .collect();
        let m = |f: &dyn Fn(&Pass) -> f64| median(passes.iter().map(|(p, _)| f(p)).collect());
        let ratio = |f: &dyn Fn(&Pass) -> f64| {
            median(
                passes
                    .iter()
                    .filter_map(|(p, base)| base.map(|b| f(p) / f(b).max(1e-9)))
                    .collect(),
            )
        };
        Median {
            figures: median_figures(&passes.iter().map(|(p, _)| &p.figures).collect::<Vec<_>>()),
            finished_rate: m(&|p| p.finished_rate),
            accept_ratio: ratio(&|p| p.figures.rate),
            finished_ratio: ratio(&|p| p.finished_rate),
            agent_cpu_us: m(&|p| p.agent_cpu_us),
            db_cpu_us: m(&|p| p.db_cpu_us),
            drain_secs: m(&|p| p.drain_secs),
            trouble: passes
                .iter()
                .enumerate()
                .filter_map(|(run, (p, _))| p.trouble().map(|t| format!("run {}: {t}", run + 1)))
                .collect(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "load": self.figures.to_json(),
            "finished_per_sec": round(self.finished_rate, 1),
            "accept_ratio_to_sqlite": round(self.accept_ratio, 3),
            "finished_ratio_to_sqlite": round(self.finished_ratio, 3),
            "agent_cpu_us_per_finished": round(self.agent_cpu_us, 1),
            "db_cpu_us_per_finished": round(self.db_cpu_us, 1),
            "drain_secs": round(self.drain_secs, 2),
            "trouble": self.trouble,
        })
    }
}

impl Summary {
    fn new(runs: &[Run], setups: &[Setup]) -> Summary {
        Summary {
            accept: (0..setups.len())
                .map(|i| Median::of(runs, |r| &r.accept, i))
                .collect(),
            file: (0..setups.len())
                .map(|i| Median::of(runs, |r| &r.file, i))
                .filter(|m| m.figures.ok > 0 || m.finished_rate > 0.0)
                .collect(),
            runs: runs.len(),
        }
    }

    fn to_json(&self, setups: &[Setup]) -> Value {
        let by_setup = |all: &[Median]| {
            setups
                .iter()
                .zip(all)
                .map(|(s, m)| (s.name(), m.to_json()))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "runs": self.runs,
            "accept": by_setup(&self.accept),
            "file": by_setup(&self.file),
        })
    }

    fn print(&self, args: &JournalsArgs, setups: &[Setup], nproc: usize, load_avg: &str) {
        println!();
        println!(
            "ess-bench journals: C={} T={}s body={} B, median of {} run(s); {nproc} CPUs, load \
             average at the start {}",
            args.connections,
            args.seconds,
            args.body_bytes,
            self.runs,
            load_avg
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (title, all) in [
            ("durable accept (adapter returns undefined)", &self.accept),
            ("end to end into the file sink ({id}.json)", &self.file),
        ] {
            if all.is_empty() {
                continue;
            }
            println!("\n{title}:");
            println!(
                "{:<20} {:>8} {:>6} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>6} {:>6} {:>6} {:>9} {:>6} {:>7} {:>7}",
                "journal",
                "2xx/s",
                "×sqlt",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "final/s",
                "×sqlt",
                "drain s",
                "agCPU",
                "pgCPU",
                "genCPU",
                "othCPU",
                "ag µs/ev",
                "pg µs/ev",
                "errors"
            );
            for (setup, m) in setups.iter().zip(all.iter()) {
                println!(
                    "{:<20} {:>8.0} {:>6.3} {:>7.3} {:>7.3} {:>8.3} {:>8.0} {:>6.3} {:>7.1} {:>6.2} {:>6.2} {:>6.2} {:>9.2} {:>6.1} {:>7.1} {:>7}",
                    setup.name(),
                    m.figures.rate,
                    m.accept_ratio,
                    m.figures.p50_ms,
                    m.figures.p99_ms,
                    m.figures.p999_ms,
                    m.finished_rate,
                    m.finished_ratio,
                    m.drain_secs,
                    m.figures.server_cpu,
                    m.figures.db_cpu,
                    m.figures.client_cpu,
                    m.figures.other_cpu,
                    m.agent_cpu_us,
                    m.db_cpu_us,
                    m.figures.non_2xx + m.figures.errors,
                );
            }
            for (setup, m) in setups.iter().zip(all.iter()) {
                for trouble in &m.trouble {
                    println!("TROUBLE {}: {trouble}", setup.name());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_databases_are_accepted() {
        assert!(check_loopback("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(check_loopback("postgres://postgres@localhost/test").is_ok());
        assert!(check_loopback("postgres://postgres@[::1]:5432/test").is_ok());
        assert!(check_loopback("postgres://postgres@db.example:5432/test").is_err());
        assert!(check_loopback("postgres://postgres@10.0.0.5/test").is_err());
        assert!(check_loopback("not a url").is_err());
    }

    #[test]
    fn final_states_are_read_from_the_metrics_and_added_up() {
        let metrics: BTreeMap<String, f64> = [
            ("ess_agent_events_final_total{state=\"applied\"}", 40.0),
            ("ess_agent_events_final_total{state=\"parked\"}", 0.0),
            ("ess_agent_events_final_total{state=\"superseded\"}", 2.0),
            ("ess_agent_backlog", 7.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let finals = final_states(&metrics);
        assert_eq!(finals.len(), 2);
        assert_eq!(finals["applied"], 40);
        assert_eq!(finals["superseded"], 2);
    }

    #[test]
    fn a_pass_that_lost_or_doubled_events_says_so() {
        let clean = Pass {
            drained: true,
            accepted: 10,
            finals: [("applied".to_owned(), 10)].into(),
            records: Some(10),
            ..Pass::default()
        };
        assert_eq!(clean.trouble(), None);
        let lost = Pass {
            records: Some(9),
            ..clean.clone()
        };
        assert!(
            lost.trouble()
                .unwrap()
                .contains("9 files in the sinks for 10")
        );
        let stuck = Pass {
            drained: false,
            finals: [("applied".to_owned(), 6)].into(),
            ..clean.clone()
        };
        assert!(stuck.trouble().unwrap().contains("only 6 of 10"));
        let superseded = Pass {
            finals: [("applied".to_owned(), 8), ("superseded".to_owned(), 2)].into(),
            ..clean
        };
        assert!(
            superseded
                .trouble()
                .unwrap()
                .contains("2 events superseded")
        );
    }

    #[test]
    fn sqlite_comes_first_as_the_baseline() {
        assert_eq!(
            setups(3),
            vec![
                Setup::Sqlite,
                Setup::Postgres(1),
                Setup::Postgres(2),
                Setup::Postgres(3)
            ]
        );
        assert_eq!(Setup::Postgres(2).name(), "postgres, 2 agents");
    }
}
