//! The AMQP sink against the shared RabbitMQ on 127.0.0.1:5672 (guest/guest). Each test declares
//! its own uniquely named exchange and queue, and reads what arrived from that queue.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::Method;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Value, json};

use crate::support::kill9::{self, AfterKills};
use crate::support::proxy::Proxy;
use crate::support::tls_front::TlsFront;
use crate::support::{self, Agent, plain, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";
const SHARED: &str = "127.0.0.1:5672";

/// Passes the event through.
const PASS_THROUGH: &str = r#"{"id": id, "subject": subject, "payload": payload}"#;

fn unique(what: &str) -> String {
    format!("ess-test-{what}-{:08x}", rand::random::<u32>())
}

fn write_adapter(dir: &Path) {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join("pass.jsonata"), PASS_THROUGH).unwrap();
}

/// A route `cases` to an amqp sink `cases` publishing to `exchange` with routing key
/// `rules.{subject}` on the broker at `addr`, plus `extra` sink keys.
fn config(dir: &Path, addr: &str, exchange: &str, extra: &str) -> String {
    support::config_text(
        dir,
        &format!(
            r#"adapters_dir = {adapters:?}

[[routes]]
name = "cases"
adapter = "pass.jsonata"
sink = "cases"

[sinks.cases]
type = "amqp"
url = "amqp://{addr}"
exchange = "{exchange}"
routing_key = "rules.{{subject}}"
{extra}
"#,
            adapters = dir.join("adapters").display().to_string(),
        ),
    )
}

fn event(id: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "version": 1, "type": "rule.updated", "revision": 4,
        "subject": subject, "payload": payload}),
    )
    .unwrap()
}

async fn post(agent: &Agent, id: &str, subject: &str, payload: Value) {
    let body = event(id, subject, payload);
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap();
    assert!(
        reply.status.is_success(),
        "{id}: {} {}",
        reply.status,
        reply.body
    );
}

/// A test's own exchange and queue on the shared broker, bound with `rules.#`; deleted on
/// [`Rabbit::delete`].
struct Rabbit {
    _conn: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
    queue: String,
}

/// One message taken from the queue.
struct Got {
    body: Value,
    properties: BasicProperties,
}

impl Got {
    fn id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .expect("every message carries a message_id")
    }

    fn header(&self, name: &str) -> Option<AMQPValue> {
        self.properties
            .headers()
            .as_ref()?
            .inner()
            .get(name)
            .cloned()
    }
}

impl Rabbit {
    async fn start(bind: bool) -> Rabbit {
        let conn = lapin::Connection::connect(
            &format!("amqp://guest:guest@{SHARED}/%2f"),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("the shared RabbitMQ on 127.0.0.1:5672");
        let channel = conn.create_channel().await.unwrap();
        let rabbit = Rabbit {
            exchange: unique("ex"),
            queue: unique("q"),
            _conn: conn,
            channel,
        };
        rabbit
            .channel
            .exchange_declare(
                rabbit.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        rabbit
            .channel
            .queue_declare(
                rabbit.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if bind {
            rabbit.bind().await;
        }
        rabbit
    }

    async fn bind(&self) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "rules.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Takes messages until `done` holds for what was taken, or the deadline passes.
    async fn take_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Got]) -> bool,
    ) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) && tokio::time::Instant::now() < deadline {
            match self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(m) => got.push(Got {
                    body: serde_json::from_slice(&m.delivery.data).unwrap(),
                    properties: m.delivery.properties.clone(),
                }),
                // An empty queue: ask again shortly (a poll with a deadline, not a wait).
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        got
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

fn wait_final(agent: &Agent, id: &str, nth: usize) -> Value {
    let mut seen = 0;
    agent
        .wait_for_log(Duration::from_secs(20), |v| {
            if v["message"] == "event final" && v["event_id"] == id {
                seen += 1;
            }
            seen == nth
        })
        .unwrap_or_else(|| panic!("{id} did not become final; log:\n{}", agent.log_text()))
}

fn distinct_ids(got: &[Got]) -> BTreeSet<String> {
    got.iter().map(Got::id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_persistent_with_the_event_id_as_message_id_and_the_event_as_headers() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let rabbit = Rabbit::start(true).await;
    let agent = Agent::start_with(
        dir.path(),
        &config(dir.path(), SHARED, &rabbit.exchange, ""),
    );
    post(&agent, "a1", "RULE-1", json!({"deadline": "16:00"})).await;
    post(&agent, "a2", "RULE-2", json!({"deadline": "17:00"})).await;
    for id in ["a1", "a2"] {
        assert_eq!(wait_final(&agent, id, 1)["state"], "applied");
    }
    // Applied means confirmed: both are in the queue by now.
    let got = rabbit
        .take_until(Duration::from_secs(5), |g| g.len() == 2)
        .await;
    assert_eq!(got.len(), 2);
    let first = got.iter().find(|g| g.id() == "a1").unwrap();
    assert_eq!(
        first.body,
        json!({"id": "a1", "subject": "RULE-1", "payload": {"deadline": "16:00"}})
    );
    let p = &first.properties;
    assert_eq!(p.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    let text = |name: &str| match first.header(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(text("ess-event-type"), "rule.updated");
    assert_eq!(text("ess-subject"), "RULE-1");
    assert_eq!(text("ess-route"), "cases");
    assert_eq!(
        first.header("ess-revision"),
        Some(AMQPValue::LongLongInt(4))
    );
    assert_eq!(
        first.header("ess-event-version"),
        Some(AMQPValue::LongLongInt(1))
    );
    rabbit.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_routing_key_is_a_dead_letter_that_a_replay_applies_once_a_queue_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let rabbit = Rabbit::start(false).await;
    let agent = Agent::start_with(
        dir.path(),
        &config(dir.path(), SHARED, &rabbit.exchange, ""),
    );
    post(&agent, "d1", "RULE-9", json!({"n": 1})).await;
    let line = wait_final(&agent, "d1", 1);
    assert_eq!(line["state"], "failed", "{line}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("unroutable") && error.contains("bind a queue"),
        "{error}"
    );
    // The operator binds a queue and replays the dead letter.
    rabbit.bind().await;
    let out = std::process::Command::new(support::binary())
        .args(["replay", "d1", "--config"])
        .arg(&agent.config_path)
        .arg("--admin-url")
        .arg(agent.admin_url(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_final(&agent, "d1", 2)["state"], "applied");
    let got = rabbit
        .take_until(Duration::from_secs(5), |g| !g.is_empty())
        .await;
    assert_eq!(distinct_ids(&got), BTreeSet::from(["d1".to_string()]));
    rabbit.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_client_certificate_applies_and_an_untrusted_broker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let pki = support::tls::generate(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let wrong = support::tls::generate(&other);
    let front = TlsFront::start(
        SHARED.parse().unwrap(),
        &pki.ca,
        &pki.server_cert,
        &pki.server_key,
    )
    .await;
    let rabbit = Rabbit::start(true).await;
    let sink = |name: &str, ca: &Path| {
        format!(
            r#"
[[routes]]
name = "{name}"
adapter = "pass.jsonata"
sink = "{name}"

[sinks.{name}]
type = "amqp"
url = "amqps://127.0.0.1:{port}"
exchange = "{exchange}"
routing_key = "rules.{{subject}}"
ca_file = {ca:?}
client_cert = {cert:?}
client_key = {key:?}
connect_timeout_secs = 2
retry = {{ max_attempts = 1 }}
"#,
            port = front.addr.port(),
            exchange = rabbit.exchange,
            ca = ca.display().to_string(),
            cert = pki.client_cert.display().to_string(),
            key = pki.client_key.display().to_string(),
        )
    };
    let config = support::config_text(
        dir.path(),
        &format!(
            "adapters_dir = {:?}\n{}{}",
            dir.path().join("adapters").display().to_string(),
            sink("good", &pki.ca),
            sink("bad", &wrong.ca)
        ),
    );
    let agent = Agent::start_with(dir.path(), &config);
    post(&agent, "t1", "RULE-1", json!({"deadline": "16:00"})).await;
    let done = wait_final(&agent, "t1", 1);
    assert_eq!(done["state"], "failed", "{done}");
    let status = support::admin_get(&agent, "/v1/events/t1").await;
    let delivery = |name: &str| support::delivery(&status.body, name);
    assert_eq!(delivery("good")["state"], "applied", "{}", status.body);
    let error = delivery("bad")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("not signed by a CA the agent trusts") && error.contains("ca_file"),
        "{}",
        status.body
    );
    // Applied means confirmed by the broker, through TLS: the one message is in the queue.
    let got = rabbit
        .take_until(Duration::from_secs(5), |g| !g.is_empty())
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), "t1");
    rabbit.delete().await;
}

#[test]
fn validate_names_a_bad_exchange_and_a_url_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let text = config(dir.path(), "guest:guest@127.0.0.1:5672", "case events", "");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(support::binary())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("sinks.cases.exchange"), "{text}");
    assert!(
        text.contains("sinks.cases.url") && text.contains("credentials"),
        "{text}"
    );
}

/// Posts events `{tag}-{n}` for `n` in `range` from four tasks until `stop`; returns the ids
/// the agent accepted.
fn post_many(
    agent: &Agent,
    tag: &str,
    range: std::ops::Range<usize>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    support::post_many(agent, tag, range, 4, stop, |id, n| {
        event(id, &format!("S{}", n % 40), json!({"n": n}))
    })
}

fn applied_count(agent: &Agent) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| support::applied_line(&v)))
        .count()
}

/// The broker goes away for 10 s while events keep coming; every event arrives after.
///
/// The shared broker must not be stopped, and a second RabbitMQ node costs several seconds of
/// Erlang start-up plus its own cookie, ports and data directory per test; the fault-injecting
/// proxy between the agent and the shared broker drops every connection and refuses new ones
/// for the 10 s instead, which is what the agent sees of a broker that went down (unconfirmed
/// publishes lost with the connection, connection attempts refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_cut_for_10_s_mid_stream_every_event_arrives() {
    const TOTAL: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let rabbit = Rabbit::start(true).await;
    let proxy = Proxy::start(SHARED.parse().unwrap()).await;
    let agent = Agent::start_with(
        dir.path(),
        &config(
            dir.path(),
            &proxy.addr.to_string(),
            &rabbit.exchange,
            "timeout_ms = 3000\nconnect_timeout_secs = 2\nreconnect_initial_ms = 50\n\
             reconnect_max_ms = 500\nretry = { initial_ms = 100, max_ms = 500, max_attempts = 0 }",
        ),
    );
    let poster = post_many(&agent, "o", 0..TOTAL, Arc::new(AtomicBool::new(false)));
    let mut applied = 0;
    let seen = agent.wait_for_log(Duration::from_secs(30), |v| {
        if support::applied_line(v) {
            applied += 1;
        }
        applied >= TOTAL / 5
    });
    assert!(seen.is_some(), "nothing applied:\n{}", agent.log_text());
    proxy.cut();
    let applied_before = applied_count(&agent);
    // The outage itself: held for its length, not waited on as a condition.
    let outage = tokio::time::sleep(Duration::from_secs(10));
    let (accepted, ()) = tokio::join!(poster, outage);
    assert_eq!(accepted.unwrap().len(), TOTAL);
    let during = applied_count(&agent);
    assert!(
        applied_before < TOTAL,
        "the cut came after everything was applied"
    );
    proxy.restore();

    let mut finals = BTreeSet::new();
    let all = agent.wait_for_log(Duration::from_secs(40), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            finals.insert(v["event_id"].as_str().unwrap_or_default().to_string());
        }
        finals.len() == TOTAL
    });
    assert!(
        all.is_some(),
        "not every event was applied:\n{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(
        log.contains("cannot reach the AMQP broker")
            || log.contains("connection to the AMQP broker"),
        "the agent did not notice the outage"
    );
    // Applied means confirmed, so every message is in the queue now.
    let got = rabbit
        .take_until(Duration::from_secs(20), |g| distinct_ids(g).len() == TOTAL)
        .await;
    let ids = distinct_ids(&got);
    let missing: Vec<String> = (0..TOTAL)
        .map(|n| format!("o-{n}"))
        .filter(|id| !ids.contains(id))
        .collect();
    eprintln!(
        "amqp cut: {} of {TOTAL} ids arrived, {applied_before} applied before the cut, {} \
         during it, {} duplicate deliveries",
        ids.len(),
        during - applied_before,
        got.len() - ids.len()
    );
    assert!(
        missing.is_empty(),
        "lost: {:?}",
        &missing[..missing.len().min(20)]
    );
    rabbit.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_every_accepted_event_arrives() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let rabbit = Rabbit::start(true).await;
    let config = config(
        dir.path(),
        SHARED,
        &rabbit.exchange,
        "retry = { initial_ms = 50, max_ms = 500, max_attempts = 0 }",
    );
    let AfterKills {
        accepted,
        resumed,
        agent,
    } = kill9::kill_9_rounds(
        dir.path(),
        &config,
        2,
        |round| 50 + round * 30,
        |agent, tag, stop| post_many(agent, tag, 0..2000, stop),
    )
    .await;
    let got = rabbit
        .take_until(Duration::from_secs(40), |g| {
            let ids = distinct_ids(g);
            accepted.iter().all(|id| ids.contains(id))
        })
        .await;
    let ids = distinct_ids(&got);
    let missing: Vec<&String> = accepted.iter().filter(|id| !ids.contains(*id)).collect();
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for g in &got {
        *per_id.entry(g.id()).or_default() += 1;
    }
    eprintln!(
        "amqp kill -9: {} accepted, {} arrived, {} duplicate deliveries, {resumed} resumed",
        accepted.len(),
        ids.len(),
        got.len() - ids.len()
    );
    assert!(resumed > 0, "no kill interrupted an event");
    assert!(
        missing.is_empty(),
        "lost {} accepted events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    drop(agent);
    rabbit.delete().await;
}
