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

use std::path::Path;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use serde_json::{Value, json};

mod common;
use common::{
    Agent, agent_config_head, bench_dir, env_or, event_id, hole, median, post_events, subject,
    timestamp,
};

const BROKER: &str = "127.0.0.1:5672";

fn config(dir: &Path, broker: &str, window: usize, exchange: &str) -> String {
    let head = agent_config_head(dir, 2 * window);
    format!(
        r#"{head}
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
"#
    )
}

fn payload(n: usize) -> Value {
    json!({"rule": format!("RULE-{n}"), "deadline": "16:00", "court": "county", "note": "the case system takes this change"})
}

fn event(n: usize) -> Value {
    json!({
        "id": event_id(n), "version": 1, "type": "rule.updated", "subject": subject(n),
        "payload": payload(n),
    })
}

fn output(n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": event_id(n), "subject": subject(n), "payload": payload(n)}))
        .unwrap()
}

/// Journals `events` events in an agent whose broker is not there, then kills it.
async fn fill_backlog(dir: &Path, events: usize, window: usize, exchange: &str) {
    let (hole_port, hole) = hole().await;
    let path = dir.join("ess-agent.toml");
    std::fs::write(
        &path,
        config(dir, &format!("127.0.0.1:{hole_port}"), window, exchange),
    )
    .unwrap();
    let (agent, ready) = Agent::start(&path, &[]);
    post_events(&ready, events, event).await;
    drop(agent);
    hole.abort();
}

/// The agent applies the backlog; confirmed events per second.
fn agent_rate(dir: &Path, events: usize, window: usize, exchange: &str) -> f64 {
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, config(dir, BROKER, window, exchange)).unwrap();
    let (mut agent, _) = Agent::start(&path, &[]);
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
        let dir = bench_dir(r#"{"id": id, "subject": subject, "payload": payload}"#);
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
