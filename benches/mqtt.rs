//! Confirmed QoS 1 publishes per second through the agent's `mqtt` sink, beside a bare rumqttc
//! publisher loop with the same payloads, topics and in-flight window, in one run.
//!
//! Each round:
//!
//! 1. The agent (the release binary) takes `EVENTS` events while its sink points at a listener
//!    that accepts connections and never answers, so nothing can be applied; then it is killed
//!    (SIGKILL). The events wait in its journal.
//! 2. The agent starts again, now pointed at a bench-owned Mosquitto, and applies the backlog:
//!    dispatch, adapter, publish, PUBACK, journal. The rate is taken between its first and last
//!    "applied" log lines (their timestamps). Its `dispatch.max_parallel` is twice the window.
//! 3. A bare rumqttc client publishes the same messages to the same broker with the same
//!    in-flight window; the rate is taken between its first and last PUBACK.
//! 4. For comparison, the sink alone (the library's `MqttSink`, in this process) applies the
//!    same messages from as many concurrent applies as the window, without ingress, journal or
//!    adapter: the difference to the agent is the cost of the rest of the pipeline.
//!
//! Run: `cargo bench --bench mqtt` (`ESS_BENCH_ROUNDS`, `ESS_BENCH_EVENTS` and
//! `ESS_BENCH_WINDOW` override the defaults of 5 rounds, 20000 events, window 64).
//! `ESS_BENCH_AGENT_VARIANT` (TOML added to the agent's configuration) and
//! `ESS_BENCH_AGENT_VARIANT_ENV` (`NAME=value` pairs for its environment) add a second agent
//! phase to each round, on a backlog of its own, with that change: an A/B in one run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{
    Agent, Server, Variant, agent_config_head, bench_dir, env_or, event_id, free_port, hole,
    machine_busy, median, post_events, process_cpu, subject, timestamp,
};

/// A bench-owned mosquitto on a free port.
fn start_broker(dir: &Path) -> Server {
    let port = free_port();
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "user root\nlog_dest stderr\nlog_type error\nlog_type information\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n"
        ),
    )
    .unwrap();
    Server::start_until(
        Command::new("/usr/sbin/mosquitto").arg("-c").arg(&config),
        port,
        "mosquitto",
        |line| line.ends_with(" running"),
    )
}

/// The agent's configuration, changed by `variant`.
fn config(dir: &Path, port: u16, window: usize, client_id: &str, variant: &Variant) -> String {
    // Events being read back and evaluated hold a slot too: twice the window keeps the window
    // full, as the SQL bench gives its dispatcher twice what its batches hold.
    let head = agent_config_head(dir, 2 * window);
    format!(
        r#"{head}
[[routes]]
name = "kiosks"
adapter = "pass.jsonata"
sink = "kiosks"

[sinks.kiosks]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
protocol = "3.1.1"
client_id = "{client_id}"
topic = "bench/{{subject}}"
qos = 1
max_inflight = {window}
timeout_ms = 3600000
connect_timeout_secs = 3600
{extra}
"#,
        extra = variant.toml,
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
    // The sink waits for a CONNACK that does not come.
    let (hole_port, hole) = hole().await;
    let path = dir.join("ess-agent.toml");
    std::fs::write(
        &path,
        config(
            dir,
            hole_port,
            window,
            "ess-bench-agent",
            &Variant::default(),
        ),
    )
    .unwrap();
    let (mut agent, ready) = Agent::start(&path, &[]);
    post_events(&ready, events, event).await;
    agent.kill9();
    hole.abort();
}

/// Phase 2: the agent applies the backlog; confirmed publishes per second, the machine's CPU
/// per message, and the agent's own share of it.
fn agent_rate(
    dir: &Path,
    port: u16,
    events: usize,
    window: usize,
    client_id: &str,
    variant: &Variant,
) -> AgentPhase {
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, port, window, client_id, variant)).unwrap();
    let (mut agent, ready) = Agent::start(&path, &variant.env);
    let admin = ready["admin"].as_str().unwrap_or_default().to_owned();
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
    let metrics = scrape(&admin);
    let metric = |name: &str| metrics.get(name).copied().unwrap_or(0.0);
    let commits = metric("ess_agent_journal_commit_seconds_count");
    AgentPhase {
        rate: (events - 1) as f64 / (last - first.unwrap()),
        cpu_us: machine / events as f64 * 1e6,
        agent_cpu_us: own / events as f64 * 1e6,
        batch: metric("ess_agent_journal_batch_size_sum") / commits.max(1.0),
        commit_us: metric("ess_agent_journal_commit_seconds_sum") / commits.max(1.0) * 1e6,
    }
}

/// The agent's metrics without labels (`/metrics` on its admin address), by name.
fn scrape(admin: &str) -> std::collections::HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut text = String::new();
    if let Ok(mut stream) = std::net::TcpStream::connect(admin) {
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(request.as_bytes());
        let _ = stream.read_to_string(&mut text);
    }
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .filter_map(|(name, value)| Some((name.to_owned(), value.trim().parse().ok()?)))
        .collect()
}

/// The agent's phase: its rate, the machine's CPU per message and the agent process's own.
struct AgentPhase {
    rate: f64,
    cpu_us: f64,
    agent_cpu_us: f64,
    /// Mean operations per journal commit, and mean commit time, over the agent's run.
    batch: f64,
    commit_us: f64,
}

/// A phase's figures: confirmed publishes per second, and the machine's CPU per message in
/// microseconds (publisher, broker and all).
struct Phase {
    rate: f64,
    cpu_us: f64,
}

/// The bare publisher: confirmed publishes per second, and the machine's CPU per message.
async fn bare_rate(port: u16, events: usize, window: usize, round: usize) -> Phase {
    let mut options =
        rumqttc::MqttOptions::new(format!("ess-bench-bare-{round}"), "127.0.0.1", port);
    options
        .set_inflight(window as u16)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, window);
    let messages: Vec<(String, Vec<u8>)> = (0..events)
        .map(|n| (format!("bench/{}", subject(n)), output(n)))
        .collect();
    let busy = machine_busy();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut first = None;
    let mut acked = 0;
    while acked < events {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
            eventloop.poll().await.expect("bare publisher connection")
        {
            first.get_or_insert_with(Instant::now);
            acked += 1;
        }
    }
    let elapsed = first.unwrap().elapsed().as_secs_f64();
    let cpu_us = (machine_busy() - busy) / events as f64 * 1e6;
    let _client = publisher.await.unwrap();
    Phase {
        rate: (events - 1) as f64 / elapsed,
        cpu_us,
    }
}

/// The sink alone, in this process: the same messages applied by `window` concurrent applies
/// (one per subject at a time, as the dispatcher does), without ingress, journal or adapter.
/// Shows how much of the agent's time is the sink's.
async fn sink_rate(port: u16, events: usize, window: usize, round: usize) -> Phase {
    use ess_agent::sink::Sink;
    let config: ess_agent::sink::mqtt::MqttConfig = toml::from_str(&format!(
        "url = \"mqtt://127.0.0.1:{port}\"\nprotocol = \"3.1.1\"\n\
         client_id = \"ess-bench-sink-{round}\"\ntopic = \"bench/{{subject}}\"\n\
         max_inflight = {window}\n"
    ))
    .unwrap();
    let sink = std::sync::Arc::new(ess_agent::sink::mqtt::MqttSink::new(&config, "bench").unwrap());
    let meta = |n: usize| ess_agent::sink::EventMeta {
        id: event_id(n),
        event_type: "rule.updated".into(),
        version: 1,
        subject: subject(n),
        revision: None,
        source: None,
        route: "kiosks".into(),
        partner: "bench".into(),
        received_at_ms: 1_796_601_600_000,
    };
    // Connected before the clock starts, as the agent is by its first "applied".
    sink.apply(&meta(events), &json!({})).await.unwrap();
    // Inputs are made before the clock starts: only the sink is timed.
    let mut inputs: Vec<Vec<(ess_agent::sink::EventMeta, Value)>> = vec![Vec::new(); window];
    for n in 0..events {
        let output: Value = serde_json::from_slice(&output(n)).unwrap();
        inputs[n % window].push((meta(n), output));
    }
    let busy = machine_busy();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for input in inputs {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            for (meta, output) in input {
                sink.apply(&meta, &output).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Phase {
        rate: events as f64 / started.elapsed().as_secs_f64(),
        cpu_us: (machine_busy() - busy) / events as f64 * 1e6,
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run one small round.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick {
        1
    } else {
        env_or("ESS_BENCH_ROUNDS", 5)
    };
    let events = if quick {
        200
    } else {
        env_or("ESS_BENCH_EVENTS", 20_000)
    };
    let window = env_or("ESS_BENCH_WINDOW", 64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = start_broker(broker_dir.path());
    let mut agent_rates = Vec::new();
    let mut bare_rates = Vec::new();
    let mut sink_rates = Vec::new();
    let (mut bare_cpu, mut sink_cpu) = (Vec::new(), Vec::new());
    let (mut agent_cpu, mut agent_own_cpu) = (Vec::new(), Vec::new());
    let variant = Variant::from_env();
    let mut variant_ratios = Vec::new();
    for round in 0..rounds {
        let backlog = || {
            let dir = bench_dir(ADAPTER);
            runtime.block_on(fill_backlog(dir.path(), events, window));
            dir
        };
        let dir = backlog();
        let agent = agent_rate(
            dir.path(),
            broker.port,
            events,
            window,
            &format!("ess-bench-agent-{round}"),
            &Variant::default(),
        );
        if let Some(variant) = &variant {
            let dir = backlog();
            let changed = agent_rate(
                dir.path(),
                broker.port,
                events,
                window,
                &format!("ess-bench-agent-{round}-variant"),
                variant,
            );
            eprintln!(
                "round {}: agent with {variant:?} {:.0}/s, {:.2} × the agent's {:.0}/s (machine \
                 CPU {:.1} µs per message, the agent's own {:.1} µs; {:.1} final states per \
                 journal commit, {:.0} µs each)",
                round + 1,
                changed.rate,
                changed.rate / agent.rate,
                agent.rate,
                changed.cpu_us,
                changed.agent_cpu_us,
                changed.batch,
                changed.commit_us
            );
            variant_ratios.push(changed.rate / agent.rate);
        }
        let bare = runtime.block_on(bare_rate(broker.port, events, window, round));
        let sink = runtime.block_on(sink_rate(broker.port, events, window, round));
        eprintln!(
            "round {}: agent {:.0}/s (machine CPU {:.1} µs per message, the agent's own {:.1} \
             µs; {:.1} final states per journal commit, {:.0} µs each), bare rumqttc {:.0}/s (ratio {:.2}, machine CPU {:.1} µs per message); sink \
             alone {:.0}/s (ratio {:.2}, {:.1} µs)",
            round + 1,
            agent.rate,
            agent.cpu_us,
            agent.agent_cpu_us,
            agent.batch,
            agent.commit_us,
            bare.rate,
            agent.rate / bare.rate,
            bare.cpu_us,
            sink.rate,
            sink.rate / bare.rate,
            sink.cpu_us
        );
        agent_rates.push(agent.rate);
        agent_cpu.push(agent.cpu_us);
        agent_own_cpu.push(agent.agent_cpu_us);
        bare_rates.push(bare.rate);
        sink_rates.push(sink.rate);
        bare_cpu.push(bare.cpu_us);
        sink_cpu.push(sink.cpu_us);
    }
    let agent = median(&mut agent_rates);
    let bare = median(&mut bare_rates);
    let sink = median(&mut sink_rates);
    let (bare_cpu, sink_cpu) = (median(&mut bare_cpu), median(&mut sink_cpu));
    let (agent_cpu, agent_own_cpu) = (median(&mut agent_cpu), median(&mut agent_own_cpu));
    // At 0.7 × the bare rate the machine's CPUs give each message this much; the bare loop and
    // the broker use `bare_cpu` of it; the rest is what the agent may add per event.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let budget = cpus / (0.7 * bare) * 1e6;
    println!(
        "mqtt sink, QoS 1, MQTT 3.1.1, window {window}, {events} events x {rounds} rounds \
         (medians, confirmed publishes/s): agent {agent:.0}, bare rumqttc {bare:.0}, ratio \
         {:.2}; sink alone in-process {sink:.0}, ratio {:.2}",
        agent / bare,
        sink / bare
    );
    println!(
        "machine CPU per message: agent {agent_cpu:.1} µs (the agent process's own \
         {agent_own_cpu:.1} µs), bare {bare_cpu:.1} µs, sink alone {sink_cpu:.1} µs; at 0.7 × \
         bare the {cpus} CPUs give {budget:.1} µs per message, which leaves {:.1} µs for what \
         the agent adds to the bare loop (the sink alone adds {:.1} µs)",
        budget - bare_cpu,
        sink_cpu - bare_cpu
    );
    if let Some(variant) = &variant {
        println!(
            "agent with {variant:?}: {:.2} × the agent's rate (median of the rounds' ratios)",
            median(&mut variant_ratios)
        );
    }
    if !quick {
        apply_floor(budget - bare_cpu);
    }
}

/// The adapter every round's agent runs.
const ADAPTER: &str = r#"{"id": id, "subject": subject, "payload": payload}"#;

/// Measures with `ess-bench floor` what applying one backlog event needs besides the sink:
/// reading it back, parsing its envelope, evaluating the adapter, writing its final state; and
/// sets it beside what is left.
fn apply_floor(left_us: f64) {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("pass.jsonata");
    std::fs::write(&adapter, ADAPTER).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ess-bench"))
        .args(["floor", "--json", "--adapter"])
        .arg(&adapter)
        .stderr(Stdio::inherit())
        .output()
        .expect("run ess-bench floor");
    assert!(out.status.success(), "ess-bench floor failed");
    let floor: Value = serde_json::from_slice(&out.stdout).expect("ess-bench floor's JSON");
    let part = |key: &str| floor[key].as_f64().unwrap_or(0.0);
    // The adapter reads the envelope's text itself: its figure includes parsing it.
    let total = part("read_us") + part("adapter_us") + part("final_us");
    println!(
        "apply floor (ess-bench floor, this run): read back {:.1} µs + adapter, its input read \
         from the envelope's text {:.1} µs + final state written (batched) {:.1} µs = {total:.1} \
         µs per event, before the sink's own work, against {left_us:.1} µs left: {}",
        part("read_us"),
        part("adapter_us"),
        part("final_us"),
        if total > left_us {
            "the target ratio is below the floor on this machine"
        } else {
            "the target ratio is above the floor"
        }
    );
}
