//! `ess-bench backlog`: the agent's memory while it drains a long backlog.
//!
//! The events are put straight into a journal through the journal's own API (as if the agent
//! had accepted them and then stopped before applying any; much faster than HTTP), then the
//! agent is started on that journal with one route for every event and drains it, while its
//! RSS is sampled every 50 ms. Beside it, the RSS of the same agent idle on an empty journal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use ess_agent::journal::{self, JournalOptions, NewEvent, SqliteJournal};
use http::{HeaderValue, header};
use serde_json::json;

use super::{
    Apply, FILTER_SINK, SETTLE, TempDir, agent_config, event_body, mib, proc_status_kb, scrape,
    start_agent, uuid_v4,
};

/// Events per writer job while filling, and jobs in flight.
const FILL_CHUNK: usize = 1000;
const FILL_IN_FLIGHT: usize = 4;
/// How often the agent's RSS is read while it drains.
const SAMPLE: Duration = Duration::from_millis(50);

#[derive(Debug, clap::Args)]
pub struct BacklogArgs {
    /// The ess-agent binary to measure.
    #[arg(long)]
    agent: PathBuf,
    /// Events in the backlog.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    events: u64,
    /// Subjects the events are spread over (round robin).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    subjects: u64,
    /// Size of each event body in bytes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..=1_000_000))]
    body_bytes: u32,
    /// What the agent's route does with each event: `filter` (an adapter that returns
    /// `undefined`: read, evaluated, finished, no sink I/O) or `file` (the reshaping adapter
    /// into the file sink, one file per event).
    #[arg(long, value_enum, default_value_t = Apply::Filter)]
    apply: Apply,
    /// Where the journal is created (default: the system temp directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Give up when the backlog is not drained after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Print the figures as JSON on stdout instead of lines.
    #[arg(long)]
    json: bool,
}

pub fn measure(args: &BacklogArgs) -> anyhow::Result<()> {
    let agent_bin = args
        .agent
        .canonicalize()
        .with_context(|| format!("no agent binary at {}", args.agent.display()))?;
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sink = match args.apply {
        Apply::File => super::E2E_SINKS[0].1,
        Apply::Filter | Apply::Park => FILTER_SINK,
    };

    // The agent idle on an empty journal.
    let idle_rss = {
        let dir = TempDir::new(&work_dir)?;
        let config = agent_config(&dir.0, args.apply, sink)?;
        let agent = start_agent(&agent_bin, &config)?;
        std::thread::sleep(SETTLE);
        let rss = proc_status_kb(agent.pid(), "VmRSS").unwrap_or(0);
        agent.stop()?;
        rss
    };
    eprintln!(
        "backlog: agent idle on an empty journal: RSS {:.1} MiB",
        mib(idle_rss)
    );

    let dir = TempDir::new(&work_dir)?;
    let config = agent_config(&dir.0, args.apply, sink)?;
    let started = Instant::now();
    runtime.block_on(fill(
        &dir.0.join("state"),
        args.events,
        args.subjects,
        args.body_bytes as usize,
    ))?;
    let fill_secs = started.elapsed().as_secs_f64();
    let journal_bytes = std::fs::read_dir(dir.0.join("state"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum::<u64>();
    eprintln!(
        "backlog: {} events put into the journal in {fill_secs:.1} s ({:.0} MiB on disk)",
        args.events,
        mib(journal_bytes)
    );

    let agent = start_agent(&agent_bin, &config)?;
    let admin = agent.admin.context("the agent printed no admin address")?;
    let pid = agent.pid();
    let ready_rss = proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let done = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(ready_rss));
    let max_threads = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, max_rss, max_threads) = (done.clone(), max_rss.clone(), max_threads.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(rss) = proc_status_kb(pid, "VmRSS") {
                    max_rss.fetch_max(rss, Ordering::Relaxed);
                }
                if let Some(threads) = proc_status_field(pid, "Threads") {
                    max_threads.fetch_max(threads, Ordering::Relaxed);
                }
                std::thread::sleep(SAMPLE);
            }
        })
    };
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(args.timeout_secs);
    let mut next_report = drain_started + Duration::from_secs(10);
    let metrics = loop {
        let metrics = runtime.block_on(scrape(admin))?;
        let backlog = metrics.get("ess_agent_backlog").copied().unwrap_or(-1.0);
        if backlog == 0.0 {
            break metrics;
        }
        if Instant::now() >= deadline || super::INTERRUPTED.load(Ordering::Relaxed) {
            done.store(true, Ordering::Relaxed);
            anyhow::bail!(
                "the agent still had {backlog} events to apply after {:.0} s",
                drain_started.elapsed().as_secs_f64()
            );
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            eprintln!(
                "backlog: {backlog} left after {:.0} s, RSS now {:.1} MiB, max {:.1} MiB",
                drain_started.elapsed().as_secs_f64(),
                mib(proc_status_kb(pid, "VmRSS").unwrap_or(0)),
                mib(max_rss.load(Ordering::Relaxed))
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let drain_secs = drain_started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    std::thread::sleep(SETTLE);
    let after_rss = proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let peak_rss = proc_status_kb(pid, "VmHWM").unwrap_or(0);
    let queued_peak = metrics
        .get("ess_agent_dispatch_queued_peak")
        .copied()
        .unwrap_or(f64::NAN);
    agent.stop()?;
    let max_rss = max_rss.load(Ordering::Relaxed).max(peak_rss);
    let rate = args.events as f64 / drain_secs;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "benchmark": "backlog",
                "events": args.events,
                "subjects": args.subjects,
                "body_bytes": args.body_bytes,
                "apply": format!("{:?}", args.apply).to_lowercase(),
                "fill_secs": super::round(fill_secs, 1),
                "journal_mib": super::round(mib(journal_bytes), 1),
                "idle_rss_mib": super::round(mib(idle_rss), 1),
                "ready_rss_mib": super::round(mib(ready_rss), 1),
                "max_rss_mib": super::round(mib(max_rss), 1),
                "after_rss_mib": super::round(mib(after_rss), 1),
                "max_threads": max_threads.load(Ordering::Relaxed),
                "drain_secs": super::round(drain_secs, 1),
                "drained_per_sec": super::round(rate, 1),
                "dispatch_queued_peak": queued_peak,
            }))?
        );
    } else {
        println!(
            "\ness-bench backlog: {} events over {} subjects, {} B bodies, apply {:?}",
            args.events, args.subjects, args.body_bytes, args.apply
        );
        println!(
            "agent RSS idle (empty journal):     {:.1} MiB",
            mib(idle_rss)
        );
        println!(
            "agent RSS at ready (full journal):  {:.1} MiB",
            mib(ready_rss)
        );
        println!(
            "agent RSS max while draining:       {:.1} MiB ({} threads at most)",
            mib(max_rss),
            max_threads.load(Ordering::Relaxed)
        );
        println!(
            "agent RSS after draining:           {:.1} MiB",
            mib(after_rss)
        );
        println!(
            "drained in {drain_secs:.1} s ({rate:.0} events/s); the dispatcher held at most \
             {queued_peak} events queued"
        );
    }
    Ok(())
}

/// A numeric field of `/proc/<pid>/status` without unit (`Threads`).
fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Puts `events` signed-shape Change Events into a new journal in `state_dir`, in writer jobs
/// of [`FILL_CHUNK`] events, [`FILL_IN_FLIGHT`] at a time; each chunk is built only when its
/// turn comes, so filling takes little memory however many events there are.
async fn fill(
    state_dir: &Path,
    events: u64,
    subjects: u64,
    body_bytes: usize,
) -> anyhow::Result<()> {
    let options = JournalOptions {
        min_free_disk_bytes: 0,
        retention: None,
        ..JournalOptions::default()
    };
    let journal = SqliteJournal::open(state_dir, options)?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let chunk = move |from: u64| -> anyhow::Result<Vec<NewEvent>> {
        (from..(from + FILL_CHUNK as u64).min(events))
            .map(|n| {
                // Bits the UUID version and variant overwrite are left alone, so every id is unique.
                let id = uuid_v4(u128::from(n) | 0x5eed << 100);
                let subject = format!("backlog-subject-{:06}", n % subjects);
                let body = event_body(&id, &subject, n, body_bytes);
                let envelope = ess_agent::protocol::envelope::parse(&headers, body.as_bytes())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(ess_agent::ingress::handler::new_event(
                    envelope,
                    Some("application/json".to_owned()),
                    Bytes::from(body),
                ))
            })
            .collect()
    };
    let mut in_flight = tokio::task::JoinSet::new();
    let mut from = 0;
    while from < events || !in_flight.is_empty() {
        while from < events && in_flight.len() < FILL_IN_FLIGHT {
            let batch = chunk(from)?;
            from += FILL_CHUNK as u64;
            let journal = journal.clone();
            in_flight.spawn(async move {
                journal
                    .write(move |conn| {
                        let now = ess_agent::timestamp::now();
                        for event in &batch {
                            journal::insert_event(conn, event, &now)?;
                        }
                        Ok(())
                    })
                    .await
            });
        }
        if let Some(done) = in_flight.join_next().await {
            done??;
        }
    }
    journal.close();
    Ok(())
}
