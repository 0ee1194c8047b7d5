//! Runs per second of `/bin/true` through the agent's `exec` sink, beside a bare spawn loop, in
//! one run.
//!
//! Each round:
//!
//! 1. The agent (this build's binary) takes `EVENTS` events while its sink runs a program that
//!    never ends, one run at a time, so nothing is applied; then the agent is killed (SIGKILL)
//!    and so is that program. The events wait in its journal.
//! 2. The agent starts again with the sink running `/bin/true` and applies the backlog:
//!    dispatch, adapter, spawn with the output on stdin, exit, journal. The rate is taken
//!    between its first and last "event final" log lines (their timestamps).
//! 3. A bare loop spawns `/bin/true` as many times with tokio, the same number at once
//!    (`max_processes`), each with the same bytes on stdin and its stdout and stderr read to
//!    their end, as the sink does.
//! 4. For comparison, the sink alone (the library's `ExecSink`, in this process) applies the
//!    same outputs from 64 concurrent applies, without ingress, journal or adapter.
//!
//! Run: `cargo bench --bench exec` (`ESS_BENCH_ROUNDS`, `ESS_BENCH_EVENTS` and
//! `ESS_BENCH_PROCESSES` override the defaults of 3 rounds, 5000 events, 4 processes at once).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ess_agent::sink::exec::{ExecConfig, ExecSink};
use ess_agent::sink::{EventMeta, Sink};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{
    Agent, SUBJECTS, agent_config_head, bench_dir, env_or, machine_busy, median, post_events,
    timestamp,
};

const ADAPTER: &str = r#"{"id": id, "subject": subject, "payload": payload}"#;

fn config(dir: &Path, program: &str, args: &[&str], processes: usize) -> String {
    let head = agent_config_head(dir, 64);
    format!(
        r#"{head}backlog_high_water = 10000000
[[routes]]
name = "bench"
adapter = "pass.jsonata"
sink = "run"
[sinks.run]
type = "exec"
program = {program:?}
args = {args:?}
max_processes = {processes}
timeout_ms = 600000
"#
    )
}

fn subject(n: usize) -> String {
    format!("S{}", n % SUBJECTS)
}

fn payload(n: usize) -> Value {
    json!({"rule": format!("R-{n}"), "deadline": "16:00", "court": "IL-COOK"})
}

fn event(n: usize) -> Value {
    json!({
        "id": format!("e-{n}"), "version": 1, "type": "rule.updated", "subject": subject(n),
        "payload": payload(n),
    })
}

/// Phase 1: the events wait in the journal behind a program that never ends.
async fn fill_backlog(dir: &Path, events: usize) {
    let marker = format!("600.{:09}", rand::random::<u32>() % 1_000_000_000);
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, "/bin/sleep", &[&marker], 1)).unwrap();
    let (agent, ready) = Agent::start(&path, &[]);
    post_events(&ready, events, event).await;
    drop(agent);
    // The program the killed agent left running.
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Phase 2: runs per second through the agent, and the machine's CPU per run.
fn agent_rate(dir: &Path, events: usize, processes: usize) -> (f64, f64) {
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, "/bin/true", &[], processes)).unwrap();
    let (mut agent, _) = Agent::start(&path, &[]);
    let (mut first, mut last, mut applied, mut busy) = (None, 0.0, 0, 0.0);
    agent.wait(Duration::from_secs(600), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            let t = timestamp(v);
            if first.is_none() {
                first = Some(t);
                busy = machine_busy();
            }
            last = t;
            applied += 1;
        }
        applied == events
    });
    let cpu = machine_busy() - busy;
    (
        (events - 1) as f64 / (last - first.unwrap()),
        cpu / events as f64 * 1e6,
    )
}

/// Phase 3: a bare tokio spawn loop, `processes` runs at once.
async fn bare_rate(events: usize, processes: usize) -> (f64, f64) {
    let input = Arc::new(serde_json::to_vec(&payload(0)).unwrap());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (started, busy) = (Instant::now(), machine_busy());
    let workers: Vec<_> = (0..processes)
        .map(|_| {
            let (input, next) = (input.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < events {
                    let mut child = tokio::process::Command::new("/bin/true")
                        .env_clear()
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .process_group(0)
                        .kill_on_drop(true)
                        .spawn()
                        .unwrap();
                    let mut stdin = child.stdin.take().unwrap();
                    let (mut out, mut err) =
                        (child.stdout.take().unwrap(), child.stderr.take().unwrap());
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    let (_, _, _, status) = tokio::join!(
                        async {
                            let _ = stdin.write_all(&input).await;
                            drop(stdin);
                        },
                        out.read_to_end(&mut a),
                        err.read_to_end(&mut b),
                        child.wait()
                    );
                    assert!(status.unwrap().success());
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        events as f64 / elapsed,
        (machine_busy() - busy) / events as f64 * 1e6,
    )
}

/// Phase 4: the library's sink alone, 64 applies at once.
async fn sink_rate(events: usize, processes: usize) -> (f64, f64) {
    let config: ExecConfig = toml::from_str(&format!(
        "program = \"/bin/true\"\nmax_processes = {processes}"
    ))
    .unwrap();
    let sink = Arc::new(ExecSink::new(&config, "sinks.run").unwrap());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (started, busy) = (Instant::now(), machine_busy());
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (sink, next) = (sink.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= events {
                        return;
                    }
                    let meta = EventMeta {
                        id: format!("e-{n}"),
                        event_type: "rule.updated".into(),
                        version: 1,
                        subject: subject(n),
                        revision: None,
                        source: None,
                        route: "bench".into(),
                        partner: "bench".into(),
                        received_at_ms: 1_796_601_600_000,
                    };
                    sink.apply(&meta, &payload(n)).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        events as f64 / elapsed,
        (machine_busy() - busy) / events as f64 * 1e6,
    )
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run one small round.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick {
        1
    } else {
        env_or("ESS_BENCH_ROUNDS", 3)
    };
    let events = if quick {
        100
    } else {
        env_or("ESS_BENCH_EVENTS", 5000)
    };
    let processes = env_or("ESS_BENCH_PROCESSES", 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut agent, mut bare, mut alone) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let dir = bench_dir(ADAPTER);
        runtime.block_on(fill_backlog(dir.path(), events));
        let (a, a_cpu) = agent_rate(dir.path(), events, processes);
        let (b, b_cpu) = runtime.block_on(bare_rate(events, processes));
        let (s, s_cpu) = runtime.block_on(sink_rate(events, processes));
        println!(
            "round {}: agent {a:.0} runs/s ({a_cpu:.0} µs CPU per run), bare spawn loop {b:.0}/s \
             ({b_cpu:.0} µs), sink alone {s:.0}/s ({s_cpu:.0} µs); agent ÷ bare {:.2}, sink \
             alone ÷ bare {:.2}",
            round + 1,
            a / b,
            s / b
        );
        agent.push(a);
        bare.push(b);
        alone.push(s);
    }
    let (a, b, s) = (median(&mut agent), median(&mut bare), median(&mut alone));
    println!(
        "median of {rounds} rounds of {events} runs, {processes} at once: agent {a:.0}/s, bare \
         {b:.0}/s, sink alone {s:.0}/s; agent ÷ bare {:.2}",
        a / b
    );
}
