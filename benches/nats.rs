//! JetStream publishes confirmed by their PubAck per second through the agent's `nats` sink,
//! beside async-nats' own bare publish loop, in one run.
//!
//! Each round:
//!
//! 1. The agent (the release binary) takes `EVENTS` events while its sink points at a listener
//!    that accepts connections and never answers; then it is killed (SIGKILL). The events wait
//!    in its journal.
//! 2. The agent starts again, now pointed at a bench-owned `nats-server -js` (file store), and
//!    applies the backlog: dispatch, adapter, publish, PubAck, journal. The rate is taken between
//!    its first and last "event final" log lines. Its `dispatch.max_parallel` is `WINDOW`.
//! 3. async-nats alone publishes the same payloads to the same subjects with a `Nats-Msg-Id`
//!    each, awaiting each PubAck: once one at a time, once from `WINDOW` concurrent publishers
//!    (as many in flight as the agent has). Rate between the first publish and the last PubAck.
//!
//! Run: `cargo bench --bench nats` (`ESS_BENCH_ROUNDS`, `ESS_BENCH_EVENTS` and
//! `ESS_BENCH_WINDOW` override the defaults of 3 rounds, 20000 events, window 64).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

mod common;
use common::{
    Agent, Server, agent_config_head, bench_dir, env_or, event_id, free_port, hole, machine_busy,
    median, post_events, process_cpu, subject, timestamp,
};

const STREAM: &str = "BENCH";

/// A bench-owned `nats-server -js` on a free port with its own store.
fn start_server(dir: &Path) -> Server {
    let port = free_port();
    Server::start_until(
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.join("nats")),
        port,
        "nats-server",
        |line| line.contains("Server is ready"),
    )
}

/// The agent's configuration.
fn config(dir: &Path, port: u16, window: usize) -> String {
    let head = agent_config_head(dir, window);
    format!(
        r#"{head}
[[routes]]
name = "clinics"
adapter = "pass.jsonata"
sink = "clinics"

[sinks.clinics]
type = "nats"
url = "nats://127.0.0.1:{port}"
subject = "bench.{{subject}}"
stream = "{STREAM}"
timeout_ms = 600000
connect_timeout_secs = 3600
"#,
    )
}

fn payload(n: usize) -> Value {
    json!({"rule": format!("RULE-{n}"), "deadline": "16:00", "court": "county", "note": "the clinic display shows this change"})
}

fn event(n: usize) -> Value {
    json!({
        "id": event_id(n), "version": 1, "type": "rule.updated", "subject": subject(n),
        "payload": payload(n),
    })
}

/// What the pass-through adapter makes of an event: the bare publisher sends the same bytes.
fn output(n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": event_id(n), "subject": subject(n), "payload": payload(n)}))
        .unwrap()
}

/// Phase 1: journals `events` events in an agent that cannot apply them, then kills it.
async fn fill_backlog(dir: &Path, events: usize, window: usize) {
    // The sink waits for the server's INFO that does not come.
    let (hole_port, hole) = hole().await;
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, hole_port, window)).unwrap();
    let (mut agent, ready) = Agent::start(&path, &[]);
    post_events(&ready, events, event).await;
    agent.kill9();
    hole.abort();
}

/// Phase 2: the agent applies the backlog; stored messages per second and the machine's CPU
/// per message.
fn agent_rate(dir: &Path, port: u16, events: usize, window: usize) -> (f64, f64, f64) {
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, port, window)).unwrap();
    let (mut agent, _ready) = Agent::start(&path, &[]);
    let pid = agent.child.id();
    let mut first = None;
    let mut last = 0.0;
    let mut applied = 0;
    let mut busy = (0.0, 0.0);
    agent.wait(Duration::from_secs(600), |v| {
        if v["message"] == "event final" && v["state"] == "applied" {
            let t = timestamp(v);
            if first.is_none() {
                first = Some(t);
                busy = (machine_busy(), process_cpu(pid));
            }
            last = t;
            applied += 1;
        }
        applied == events
    });
    let (machine, own) = (machine_busy() - busy.0, process_cpu(pid) - busy.1);
    (
        (events - 1) as f64 / (last - first.unwrap()),
        machine / events as f64 * 1e6,
        own / events as f64 * 1e6,
    )
}

/// async-nats alone: `publishers` concurrent loops, each publishing its share with a
/// `Nats-Msg-Id` and awaiting each PubAck. Stored messages per second and the machine's CPU per
/// message.
async fn bare_rate(port: u16, events: usize, publishers: usize, tag: &str) -> (f64, f64) {
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let busy = machine_busy();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let js = js.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for n in (0..events).filter(|n| n % publishers == p) {
                let publish = async_nats::jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(output(n)))
                    .message_id(format!("{tag}-{n}:clinics:0"))
                    .expected_stream(STREAM);
                let ack = js
                    .send_publish(format!("bench.{}", subject(n)), publish)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                assert!(!ack.duplicate);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        events as f64 / elapsed,
        (machine_busy() - busy) / events as f64 * 1e6,
    )
}

fn main() {
    let rounds = env_or("ESS_BENCH_ROUNDS", 3);
    let events = env_or("ESS_BENCH_EVENTS", 20_000);
    let window = env_or("ESS_BENCH_WINDOW", 64);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut rows: Vec<[f64; 6]> = Vec::new();
    println!(
        "round | agent /s | bare, {window} in flight /s | agent ÷ bare | bare, 1 at a time /s | \
         machine CPU per message: agent, bare | agent process CPU per message"
    );
    for round in 1..=rounds {
        let dir = bench_dir(ADAPTER);
        let server = start_server(dir.path());
        runtime.block_on(async {
            let client = async_nats::connect(format!("nats://127.0.0.1:{}", server.port))
                .await
                .unwrap();
            async_nats::jetstream::new(client)
                .create_stream(async_nats::jetstream::stream::Config {
                    name: STREAM.into(),
                    subjects: vec!["bench.>".into()],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .unwrap();
            fill_backlog(dir.path(), events, window).await;
        });
        let (agent, agent_cpu, agent_own) = agent_rate(dir.path(), server.port, events, window);
        let (bare, bare_cpu) = runtime.block_on(bare_rate(
            server.port,
            events,
            window,
            &format!("bare{round}"),
        ));
        let (serial, _) = runtime.block_on(bare_rate(
            server.port,
            events.min(5000),
            1,
            &format!("serial{round}"),
        ));
        println!(
            "{round} | {agent:.0} | {bare:.0} | {:.2} | {serial:.0} | {agent_cpu:.1}, {bare_cpu:.1} µs | {agent_own:.1} µs",
            agent / bare
        );
        rows.push([agent, bare, agent / bare, serial, agent_cpu, bare_cpu]);
    }
    let col = |i: usize| median(&mut rows.iter().map(|r| r[i]).collect::<Vec<_>>());
    println!(
        "median | {:.0} | {:.0} | {:.2} | {:.0} | {:.1}, {:.1} µs |",
        col(0),
        col(1),
        col(2),
        col(3),
        col(4),
        col(5)
    );
}

const ADAPTER: &str = r#"{"id": id, "subject": subject, "payload": payload}"#;
