//! Events applied per second through the agent's `redis` sink, beside a bare loop of the same
//! script (`EVALSHA` of the sink's own Lua script, same keys and arguments) over the same client
//! (redis-rs, one multiplexed connection) with as many concurrent calls as the agent's dispatcher
//! runs, in one run.
//!
//! Each round:
//!
//! 1. The agent (the release binary) takes `EVENTS` events while its sink points at a listener
//!    that accepts connections and never answers, so nothing can be applied; then it is killed
//!    (SIGKILL). The events wait in its journal.
//! 2. The agent starts again, pointed at a bench-owned redis-server (no persistence), and applies
//!    the backlog: dispatch, adapter, script, journal. The rate is taken between its first and
//!    last "applied" log lines (their timestamps).
//! 3. The bare loop runs the same script for the same events, `WINDOW` calls at a time, on a
//!    fresh server; the rate is taken from its first call to its last answer.
//!
//! Run: `cargo bench --bench redis` (`ESS_BENCH_ROUNDS`, `ESS_BENCH_EVENTS` and
//! `ESS_BENCH_WINDOW` override the defaults of 3 rounds, 20000 events, window 32).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{
    Agent, Server, agent_config_head, bench_dir, env_or, event_id, free_port, hole, machine_busy,
    median, post_events, subject, timestamp,
};

/// A bench-owned redis-server on a free port, without persistence.
fn start_server(dir: &Path) -> Server {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port }
}

fn config(dir: &Path, port: u16, window: usize) -> String {
    let head = agent_config_head(dir, window);
    format!(
        r#"{head}
[[routes]]
name = "kiosks"
adapter = "pass.jsonata"
sink = "kiosks"

[sinks.kiosks]
type = "redis"
url = "redis://127.0.0.1:{port}"
stream = "bench:{{subject}}"
timeout_ms = 3600000
retry = {{ max_age_secs = 86400 }}
"#,
    )
}

fn payload(n: usize) -> Value {
    json!({"rule": format!("RULE-{n}"), "deadline": "16:00", "court": "county", "note": "the kiosk shows this change"})
}

fn event(n: usize) -> Value {
    json!({
        "id": event_id(n), "version": 1, "type": "rule.updated", "subject": subject(n),
        "payload": payload(n),
    })
}

/// Phase 1: journals `events` events in an agent that cannot apply them, then kills it.
async fn fill_backlog(dir: &Path, events: usize, window: usize) {
    // The script waits for an answer that does not come.
    let (hole_port, hole) = hole().await;
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, hole_port, window)).unwrap();
    let (mut agent, ready) = Agent::start(&path, &[]);
    post_events(&ready, events, event).await;
    agent.kill9();
    hole.abort();
}

/// A phase's figures: events applied per second, and the machine's CPU per event in
/// microseconds (agent or loop, Redis and all).
struct Phase {
    rate: f64,
    cpu_us: f64,
}

/// Phase 2: the agent applies the backlog.
fn agent_rate(dir: &Path, port: u16, events: usize, window: usize) -> Phase {
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, port, window)).unwrap();
    let (mut agent, _) = Agent::start(&path, &[]);
    let mut first = None;
    let mut last = 0.0;
    let mut applied = 0;
    let mut busy = 0.0;
    agent.wait(Duration::from_secs(600), |v| {
        if v["message"] == "event final" && v["state"] == "applied" {
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
    let machine = machine_busy() - busy;
    Phase {
        rate: (events - 1) as f64 / (last - first.unwrap()),
        cpu_us: machine / events as f64 * 1e6,
    }
}

/// Phase 3: the same script for the same events over one multiplexed redis-rs connection,
/// `window` calls at a time: what the pass-through adapter and the sink would send.
async fn bare_rate(port: u16, events: usize, window: usize) -> Phase {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let connection = redis::aio::ConnectionManager::new(client).await.unwrap();
    let script = redis::Script::new(ess_agent::sink::redis::SCRIPT);
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(ess_agent::sink::redis::SCRIPT)
        .query_async(&mut connection.clone())
        .await
        .unwrap();
    let hash: Arc<str> = script.get_hash().into();
    let calls: Arc<Vec<(Vec<String>, Vec<String>)>> = Arc::new(
        (0..events)
            .map(|n| {
                let id = event_id(n);
                let output = json!({"subject": subject(n), "payload": payload(n)});
                let keys = vec![
                    format!("ess:applied:bare:kiosks:{id}"),
                    format!("bench:{}", subject(n)),
                ];
                let args = [
                    "604800000",
                    "0",
                    "~",
                    "6",
                    "ess_event_id",
                    &id,
                    "ess_route",
                    "kiosks",
                    "ess_event_type",
                    "rule.updated",
                    "ess_event_version",
                    "1",
                    "ess_subject",
                    &subject(n),
                    "payload",
                    &output.to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                (keys, args)
            })
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let busy = machine_busy();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..window {
        let mut connection = connection.clone();
        let calls = calls.clone();
        let next = next.clone();
        let hash = hash.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((keys, args)) = calls.get(n) else {
                    return;
                };
                let reply: redis::Value = redis::cmd("EVALSHA")
                    .arg(&*hash)
                    .arg(keys.len())
                    .arg(keys)
                    .arg(args)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                assert!(matches!(reply, redis::Value::Array(_)), "{reply:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    Phase {
        rate: events as f64 / seconds,
        cpu_us: (machine_busy() - busy) / events as f64 * 1e6,
    }
}

fn main() {
    let rounds = env_or("ESS_BENCH_ROUNDS", 3);
    let events = env_or("ESS_BENCH_EVENTS", 20_000);
    let window = env_or("ESS_BENCH_WINDOW", 32);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| round | agent /s | bare script loop /s | agent ÷ bare | agent CPU per event | bare CPU per event |"
    );
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let dir = bench_dir(r#"{"subject": subject, "payload": payload}"#);
        runtime.block_on(fill_backlog(dir.path(), events, window));
        let agent = {
            let server = start_server(dir.path());
            agent_rate(dir.path(), server.port, events, window)
        };
        let bare = {
            let server = start_server(dir.path());
            runtime.block_on(bare_rate(server.port, events, window))
        };
        let ratio = agent.rate / bare.rate;
        ratios.push(ratio);
        println!(
            "| {round} | {:.0} | {:.0} | {:.2} | {:.1} µs | {:.1} µs |",
            agent.rate, bare.rate, ratio, agent.cpu_us, bare.cpu_us
        );
    }
    println!("median agent ÷ bare: {:.2}", median(&mut ratios));
}
