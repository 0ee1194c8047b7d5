//! Confirmed publishes per second through the agent's `amqp` sink, beside lapin's own bare
//! publish loop with publisher confirms and the same payloads, routing keys and window, in one
//! run, against the shared RabbitMQ on 127.0.0.1:5672 (a bench-owned exchange and queue).
//!
//! Each round:
//!
//! 1. The agent (the bench build of the binary) takes `EVENTS` events while its sink points at a
//!    listener that accepts connections and never answers, so nothing can be applied; then it is
//!    killed. The events wait
//!    in its journal.
//! 2. The agent starts again, pointed at RabbitMQ, and applies the backlog: dispatch, adapter,
//!    publish, confirm, journal. The rate is taken between its first and last `event final`
//!    log lines (their timestamps).
//! 3. A bare lapin publisher on one confirm-mode channel sends the same messages (persistent,
//!    mandatory, `message_id`) with at most `WINDOW` unconfirmed at once; the rate is taken
//!    between its first publish and its last confirmation.
//!
//! Run: `cargo bench --bench amqp` (`ESS_BENCH_ROUNDS`, `ESS_BENCH_EVENTS`, `ESS_BENCH_WINDOW`
//! override the defaults of 3 rounds, 10000 events, window 64).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ess_agent::http_client::{ClientTls, client};
use ess_agent::protocol::auth::WebhookSigner;
use http_body_util::Full;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use serde_json::{Value, json};

mod common;
use common::env_or;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SUBJECTS: usize = 256;
const BROKER: &str = "127.0.0.1:5672";

struct Agent {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Agent {
    fn start(config: &Path) -> (Agent, Value) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ess-agent"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("ESS_AGENT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ess-agent");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut agent = Agent { child, lines };
        let ready = agent.wait(Duration::from_secs(30), |v| v["message"] == "ready");
        (agent, ready)
    }

    fn wait(&mut self, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(e) => panic!("agent log ended or timed out ({e})"),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, broker: &str, window: usize, exchange: &str) -> String {
    format!(
        r#"agent_id = "bench"
state_dir = {state:?}
adapters_dir = {adapters:?}

[ingress]
listen = "127.0.0.1:0"

[auth]
hmac_secrets = [{{ file = {secret:?} }}]

[admin]
listen = "127.0.0.1:0"

[limits]
min_free_disk_bytes = 0

[dispatch]
max_parallel = {parallel}

[[routes]]
name = "cases"
adapter = "pass.jsonata"
sink = "cases"

[sinks.cases]
type = "amqp"
url = "amqp://{broker}"
exchange = "{exchange}"
routing_key = "rules.{{subject}}"
timeout_ms = 3600000
connect_timeout_secs = 3600
"#,
        state = dir.join("state").display().to_string(),
        adapters = dir.join("adapters").display().to_string(),
        secret = dir.join("hub-secret").display().to_string(),
        parallel = 2 * window,
    )
}

fn event_id(n: usize) -> String {
    format!("bench-{n:06}")
}

fn subject(n: usize) -> String {
    format!("S{:03}", n % SUBJECTS)
}

fn payload(n: usize) -> Value {
    json!({"rule": format!("RULE-{n}"), "deadline": "16:00", "court": "county", "note": "the case system takes this change"})
}

fn output(n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": event_id(n), "subject": subject(n), "payload": payload(n)}))
        .unwrap()
}

/// Journals `events` events in an agent whose broker is not there, then kills it.
async fn fill_backlog(dir: &Path, events: usize, window: usize, exchange: &str) {
    // Accepts connections and never answers: the sink waits for the broker's greeting, so no
    // apply fails and none is put off by the retry policy.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    let path = dir.join("ess-agent.toml");
    std::fs::write(
        &path,
        config(dir, &format!("127.0.0.1:{hole_port}"), window, exchange),
    )
    .unwrap();
    let (agent, ready) = Agent::start(&path);
    let url = format!("http://{}/v1/events", ready["ingress"].as_str().unwrap());
    let http = client(&ClientTls::default()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (http, url) = (http.clone(), url.clone());
        let signer = WebhookSigner::new(SECRET).unwrap();
        tasks.push(tokio::spawn(async move {
            for n in (0..events).filter(|n| n % 8 == t) {
                let id = event_id(n);
                let body = serde_json::to_vec(&json!({
                    "id": id, "version": 1, "type": "rule.updated", "subject": subject(n),
                    "payload": payload(n),
                }))
                .unwrap();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                let mut request = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.clone())))
                    .unwrap();
                for (k, v) in signer.headers(&id, now, &body) {
                    request.headers_mut().insert(k, v.parse().unwrap());
                }
                let response = http.request(request).await.expect("post event");
                assert_eq!(response.status(), 202, "event {id} not accepted");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(agent);
    hole.abort();
}

fn timestamp(v: &Value) -> f64 {
    let text = v["timestamp"]
        .as_str()
        .expect("log lines carry a timestamp");
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() as f64 / 1e9
}

/// The agent applies the backlog; confirmed events per second.
fn agent_rate(dir: &Path, events: usize, window: usize, exchange: &str) -> f64 {
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, BROKER, window, exchange)).unwrap();
    let (mut agent, _) = Agent::start(&path);
    let (mut first, mut last, mut count) = (None, 0.0, 0);
    agent.wait(Duration::from_secs(600), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            let t = timestamp(v);
            first.get_or_insert(t);
            last = t;
            count += 1;
        }
        count == events
    });
    (events - 1) as f64 / (last - first.unwrap())
}

/// lapin's own loop: publish with confirms, at most `window` unconfirmed.
async fn bare_rate(channel: &lapin::Channel, events: usize, window: usize, exchange: &str) -> f64 {
    let bodies: Vec<Vec<u8>> = (0..events).map(output).collect();
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for (n, body) in bodies.iter().enumerate() {
        if pending.len() == window {
            let confirm: lapin::PublisherConfirm = pending.pop_front().unwrap();
            assert!(matches!(confirm.await.unwrap(), Confirmation::Ack(None)));
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                format!("rules.{}", subject(n)).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(event_id(n).into()),
            )
            .await
            .unwrap();
        pending.push_back(confirm);
    }
    for confirm in pending {
        assert!(matches!(confirm.await.unwrap(), Confirmation::Ack(None)));
    }
    events as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env_or("ESS_BENCH_ROUNDS", 3);
    let events = env_or("ESS_BENCH_EVENTS", 10_000);
    let window = env_or("ESS_BENCH_WINDOW", 64);
    let conn = lapin::Connection::connect(
        &format!("amqp://guest:guest@{BROKER}/%2f"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("RabbitMQ on 127.0.0.1:5672");
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let tag = format!("{:08x}", rand::random::<u32>());
    let (exchange, queue) = (format!("ess-bench-{tag}"), format!("ess-bench-{tag}"));
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "rules.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    println!("round | agent /s | bare lapin /s | agent ÷ bare");
    let (mut agents, mut bares) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hub-secret"), SECRET).unwrap();
        std::fs::create_dir(dir.path().join("adapters")).unwrap();
        std::fs::write(
            dir.path().join("adapters/pass.jsonata"),
            r#"{"id": id, "subject": subject, "payload": payload}"#,
        )
        .unwrap();
        fill_backlog(dir.path(), events, window, &exchange).await;
        let agent = {
            let (dir, exchange) = (dir.path().to_owned(), exchange.clone());
            tokio::task::spawn_blocking(move || agent_rate(&dir, events, window, &exchange))
                .await
                .unwrap()
        };
        let bare = bare_rate(&channel, events, window, &exchange).await;
        channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        println!("{round} | {agent:.0} | {bare:.0} | {:.2}", agent / bare);
        agents.push(agent);
        bares.push(bare);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (agent, bare) = (median(&mut agents), median(&mut bares));
    println!(
        "median | {agent:.0} | {bare:.0} | {:.2} ({rounds} rounds of {events} events, window {window})",
        agent / bare
    );
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}
