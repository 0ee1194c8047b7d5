//! The NATS JetStream sink against real servers: the shared one on 127.0.0.1:4222 (each test
//! with its own stream and subjects), and a test-owned one for the outage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::kill9::{self, AfterKills};
use crate::support::nats::{
    self, NatsServer, SHARED_URL, TlsFiles, create_stream, delete_stream, header, jetstream,
    jetstream_tls, messages,
};
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";

/// Passes the event through.
const PASS_THROUGH: &str = r#"{"id": id, "subject": subject, "payload": payload}"#;

fn write_adapter(dir: &Path, name: &str, source: &str) {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join(name), source).unwrap();
}

fn adapters_dir(dir: &Path) -> String {
    format!(
        "adapters_dir = {:?}\n",
        dir.join("adapters").display().to_string()
    )
}

fn event(id: &str, event_type: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "version": 1, "type": event_type, "subject": subject, "payload": payload}),
    )
    .unwrap()
}

async fn post(agent: &Agent, id: &str, body: Vec<u8>) {
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{id}: {}", reply.body);
}

/// Waits until the agent logs that `id` is final for the `nth` time; returns that log line.
fn wait_final(agent: &Agent, id: &str, nth: usize) -> Value {
    let mut seen = 0;
    agent
        .wait_for_log(Duration::from_secs(30), |v| {
            seen += usize::from(v["message"] == "event final" && v["event_id"] == id);
            seen == nth
        })
        .unwrap_or_else(|| {
            panic!(
                "event {id} did not become final; log:\n{}",
                agent.log_text()
            )
        })
}

async fn replay(agent: &Agent, id: &str, force: bool) {
    let path = format!(
        "/v1/events/{id}/replay{}",
        if force { "?force=true" } else { "" }
    );
    let reply = request(
        &plain(),
        Method::POST,
        &agent.admin_url(&path),
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert!(reply.status.is_success(), "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_in_the_stream_once_with_their_headers_and_a_forced_replay_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    write_adapter(dir.path(), "items.jsonata", "payload.items");
    let token = nats::unique("t");
    let stream = format!("ESS_{token}");
    let js = jetstream(SHARED_URL).await;
    create_stream(&js, &stream, &[format!("{token}.>")]).await;
    let config = format!(
        r#"{adapters}
[[routes]]
name = "rules"
types = ["rule.*"]
adapter = "pass.jsonata"
sink = "bus"

[[routes]]
name = "items"
types = ["batch.*"]
adapter = "items.jsonata"
sink = "bus"

[sinks.bus]
type = "nats"
url = "{SHARED_URL}"
subject = "{token}.{{partner}}.{{route}}.{{subject}}.{{index}}"
stream = "{stream}"
"#,
        adapters = adapters_dir(dir.path()),
    );
    let agent = Agent::start(dir.path(), &config);
    post(
        &agent,
        "e1",
        event("e1", "rule.updated", "RULE-1", json!({"deadline": "16:00"})),
    )
    .await;
    post(
        &agent,
        "b1",
        event("b1", "batch.sent", "B", json!({"items": [{"n": 1}, "two"]})),
    )
    .await;
    assert_eq!(wait_final(&agent, "e1", 1)["state"], "applied");
    assert_eq!(wait_final(&agent, "b1", 1)["state"], "applied");

    let got = messages(&js, &stream).await;
    let by_subject: BTreeMap<String, _> = got.iter().map(|m| (m.subject.to_string(), m)).collect();
    assert_eq!(got.len(), 3, "{by_subject:?}");
    let m = by_subject[&format!("{token}.test-partner.rules.RULE-1.0")];
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap(),
        json!({"id": "e1", "subject": "RULE-1", "payload": {"deadline": "16:00"}})
    );
    assert_eq!(header(m, "Nats-Msg-Id"), Some("e1:rules:0"));
    assert_eq!(header(m, "Ess-Event-Id"), Some("e1"));
    assert_eq!(header(m, "Ess-Event-Type"), Some("rule.updated"));
    assert_eq!(header(m, "Ess-Event-Version"), Some("1"));
    assert_eq!(header(m, "Ess-Subject"), Some("RULE-1"));
    assert_eq!(header(m, "Ess-Route"), Some("rules"));
    assert_eq!(header(m, "Content-Type"), Some("application/json"));
    assert_eq!(header(m, "Ess-Record"), None);
    let first = by_subject[&format!("{token}.test-partner.items.B.0")];
    assert_eq!(header(first, "Nats-Msg-Id"), Some("b1:items:0"));
    assert_eq!(header(first, "Ess-Record"), Some("0"));
    let second = by_subject[&format!("{token}.test-partner.items.B.1")];
    assert_eq!(&second.payload[..], b"two");
    assert_eq!(header(second, "Nats-Msg-Id"), Some("b1:items:1"));
    assert_eq!(
        header(second, "Content-Type"),
        Some("text/plain; charset=utf-8")
    );

    // Applying e1 again within the stream's duplicate window counts as applied and stores
    // nothing new: the server drops the copy by its Nats-Msg-Id.
    replay(&agent, "e1", true).await;
    assert_eq!(wait_final(&agent, "e1", 2)["state"], "applied");
    assert_eq!(messages(&js, &stream).await.len(), 3);
    delete_stream(&js, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_stream_captures_is_a_dead_letter_that_a_replay_applies_once_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let token = nats::unique("u");
    let missing = format!("MISSING_{token}");
    let js = jetstream(SHARED_URL).await;
    let config = format!(
        r#"{adapters}
[[routes]]
name = "rules"
types = ["rule.*"]
adapter = "pass.jsonata"
sink = "bus"

[[routes]]
name = "named"
types = ["named.*"]
adapter = "pass.jsonata"
sink = "named"

[sinks.bus]
type = "nats"
url = "{SHARED_URL}"
subject = "{token}.rules.{{subject}}"
retry = {{ initial_ms = 20, max_ms = 100 }}

[sinks.named]
type = "nats"
url = "{SHARED_URL}"
subject = "{token}.named.{{subject}}"
stream = "{missing}"
retry = {{ initial_ms = 20, max_ms = 100 }}
"#,
        adapters = adapters_dir(dir.path()),
    );
    let agent = Agent::start(dir.path(), &config);
    post(
        &agent,
        "lost",
        event("lost", "rule.updated", "R1", json!({})),
    )
    .await;
    let line = wait_final(&agent, "lost", 1);
    assert_eq!(line["state"], "failed", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "no JetStream stream captures the subject \"{token}.rules.R1\""
        )) && error.contains("create a stream"),
        "{error}"
    );
    let status = admin_get(&agent, "/v1/events/lost").await;
    assert_eq!(
        status.body["deliveries"][0]["attempts"], 1,
        "{}",
        status.body
    );

    // The configured stream does not exist: readiness names it, and so does the dead letter.
    let ready = admin_get(&agent, "/readyz").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    let reason = ready.body["reasons"]["sink named"].to_string();
    assert!(
        reason.contains(&format!("the stream {missing} does not exist")),
        "{}",
        ready.body
    );
    post(&agent, "n1", event("n1", "named.x", "N", json!({}))).await;
    let line = wait_final(&agent, "n1", 1);
    assert_eq!(line["state"], "failed", "{line}");
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains(&format!("the stream {missing} does not exist")),
        "{line}"
    );

    // The operator creates the stream and replays the dead letter: it is applied, once.
    let stream = format!("ESS_{token}");
    create_stream(&js, &stream, &[format!("{token}.rules.>")]).await;
    replay(&agent, "lost", false).await;
    assert_eq!(wait_final(&agent, "lost", 2)["state"], "applied");
    let got = messages(&js, &stream).await;
    assert_eq!(got.len(), 1);
    assert_eq!(header(&got[0], "Nats-Msg-Id"), Some("lost:rules:0"));
    delete_stream(&js, &stream).await;
}

/// Posts events `<tag>-<n>` for `n` in `range` from `tasks` concurrent clients, over `subjects`
/// subjects, until `stop`; returns the accepted ids.
fn post_many(
    agent: &Agent,
    tag: &str,
    range: std::ops::Range<usize>,
    tasks: usize,
    subjects: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    support::post_many(agent, tag, range, tasks, stop, move |id, n| {
        event(
            id,
            "rule.updated",
            &format!("S{}", n % subjects),
            json!({"n": n}),
        )
    })
}

/// How many times each message id is in the stream.
async fn count_ids(js: &async_nats::jetstream::Context, stream: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in messages(js, stream).await {
        let id = header(&m, "Nats-Msg-Id").expect("Nats-Msg-Id").to_string();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

fn sink_config(dir: &Path, url: &str, stream: &str, subject_root: &str) -> String {
    format!(
        r#"{adapters}
[dispatch]
max_parallel = 32

[[routes]]
name = "rules"
adapter = "pass.jsonata"
sink = "bus"

[sinks.bus]
type = "nats"
url = "{url}"
subject = "{subject_root}.rules.{{subject}}"
stream = "{stream}"
timeout_ms = 2000
connect_timeout_secs = 2
reconnect_initial_ms = 50
reconnect_max_ms = 500
retry = {{ initial_ms = 100, max_ms = 500, max_attempts = 0 }}
"#,
        adapters = adapters_dir(dir),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_cut_for_10_s_mid_stream_stores_every_event_exactly_once() {
    const TOTAL: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let mut server = NatsServer::start();
    let js = jetstream(&server.url()).await;
    create_stream(&js, "RULES", &["county.>".to_string()]).await;
    drop(js);
    let agent = Agent::start(
        dir.path(),
        &sink_config(dir.path(), &server.url(), "RULES", "county"),
    );
    let poster = post_many(
        &agent,
        "o",
        0..TOTAL,
        4,
        50,
        Arc::new(AtomicBool::new(false)),
    );
    let mut applied = 0;
    let seen = agent.wait_for_log(Duration::from_secs(30), |v| {
        applied += usize::from(support::applied_line(v));
        applied >= TOTAL / 5
    });
    assert!(seen.is_some(), "nothing applied:\n{}", agent.log_text());
    server.stop();
    // The outage itself: held for 10 s, not waited on.
    let outage = tokio::time::sleep(Duration::from_secs(10));
    let (accepted, ()) = tokio::join!(poster, outage);
    assert_eq!(accepted.unwrap().len(), TOTAL);
    let applied_before = agent
        .log_text()
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| support::applied_line(&v)))
        .count();
    assert!(applied_before < TOTAL, "the outage came after everything");
    assert!(
        agent.log_text().contains("nats connection lost"),
        "the agent did not notice the outage"
    );
    server.start_again();

    let mut finals = BTreeSet::new();
    let all = agent.wait_for_log(Duration::from_secs(40), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            finals.insert(v["event_id"].as_str().unwrap_or_default().to_string());
        }
        finals.len() == TOTAL
    });
    assert!(all.is_some(), "not every event was applied");
    let js = jetstream(&server.url()).await;
    let counts = count_ids(&js, "RULES").await;
    let missing: Vec<String> = (0..TOTAL)
        .map(|n| format!("o-{n}:rules:0"))
        .filter(|id| !counts.contains_key(id))
        .collect();
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "nats outage: {} of {TOTAL} in the stream, {applied_before} applied before the cut, {} \
         stored twice",
        counts.len(),
        twice.len()
    );
    assert!(
        missing.is_empty(),
        "lost: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert_eq!(counts.len(), TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_every_accepted_event_is_in_the_stream_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let token = nats::unique("k");
    let stream = format!("ESS_{token}");
    let js = jetstream(SHARED_URL).await;
    create_stream(&js, &stream, &[format!("{token}.>")]).await;
    let config = support::config_text(
        dir.path(),
        &sink_config(dir.path(), SHARED_URL, &stream, &token),
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
        |agent, tag, stop| post_many(agent, tag, 0..2000, 4, 16, stop),
    )
    .await;
    // Every accepted event ends up in the stream, each once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let counts = loop {
        let counts = count_ids(&js, &stream).await;
        let done = accepted
            .iter()
            .all(|id| counts.contains_key(&format!("{id}:rules:0")));
        if done || tokio::time::Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !counts.contains_key(&format!("{id}:rules:0")))
        .collect();
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "nats kill -9: {} accepted, {} in the stream, {resumed} resumed after a kill, {} stored \
         twice",
        accepted.len(),
        counts.len(),
        twice.len()
    );
    assert!(resumed > 0, "no kill interrupted an event");
    assert!(
        missing.is_empty(),
        "lost {} accepted events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    drop(agent);
    delete_stream(&js, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_applies_and_an_untrusted_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let pki = support::tls::generate(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let wrong = support::tls::generate(&other);
    let server = NatsServer::start_tls(TlsFiles {
        ca: pki.ca.clone(),
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
    });
    let url = format!("tls://127.0.0.1:{}", server.port);
    let js = jetstream_tls(&url, &pki.ca, &pki.client_cert, &pki.client_key).await;
    create_stream(&js, "SECURE", &["secure.>".to_string()]).await;
    let sink = |name: &str, ca: &Path| {
        format!(
            r#"
[[routes]]
name = "{name}"
adapter = "pass.jsonata"
sink = "{name}"

[sinks.{name}]
type = "nats"
url = "{url}"
subject = "secure.{name}.{{subject}}"
stream = "SECURE"
connect_timeout_secs = 2
tls = {{ ca_file = {ca:?}, cert = {cert:?}, key = {key:?} }}
retry = {{ max_attempts = 1 }}
"#,
            ca = ca.display().to_string(),
            cert = pki.client_cert.display().to_string(),
            key = pki.client_key.display().to_string(),
        )
    };
    let config = format!(
        "{}{}{}",
        adapters_dir(dir.path()),
        sink("good", &pki.ca),
        sink("bad", &wrong.ca)
    );
    let agent = Agent::start(dir.path(), &config);
    post(
        &agent,
        "t-1",
        event("t-1", "rule.updated", "S1", json!({"n": 1})),
    )
    .await;
    let done = wait_final(&agent, "t-1", 1);
    assert_eq!(done["state"], "failed", "{done}");
    let status = admin_get(&agent, "/v1/events/t-1").await;
    let delivery = |name: &str| support::delivery(&status.body, name);
    assert_eq!(delivery("good")["state"], "applied", "{}", status.body);
    let error = delivery("bad")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("ca_file") || error.contains("CA"),
        "{}",
        status.body
    );
    let got = messages(&js, "SECURE").await;
    assert_eq!(got.len(), 1, "only the trusted route's message is stored");
    assert_eq!(got[0].subject.as_str(), "secure.good.S1");
    assert_eq!(header(&got[0], "Nats-Msg-Id"), Some("t-1:good:0"));
}

#[test]
fn validate_names_the_bad_nats_keys() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let config = support::config_text(
        dir.path(),
        &format!(
            r#"{adapters}
[[routes]]
name = "rules"
adapter = "pass.jsonata"
sink = "bus"

[sinks.bus]
type = "nats"
url = "http://127.0.0.1:4222"
subject = "partners.>.{{subject}}"
stream = "rules.v1"
token = {{ env = "NATS_TOKEN" }}
user = {{ file = "user" }}
password = {{ file = "password" }}
"#,
            adapters = adapters_dir(dir.path()),
        ),
    );
    let path = dir.path().join("ess-agent.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(support::binary())
        .arg("validate")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for key in [
        "sinks.bus.url",
        "sinks.bus.subject",
        "sinks.bus.stream",
        "sinks.bus.user",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert!(text.contains("nats:// or tls://"), "{text}");
    assert!(text.contains("wildcard"), "{text}");
}
