//! The MQTT sink against real Mosquitto brokers: the shared one on 127.0.0.1:1883, and
//! test-owned ones for outages, TLS and credentials.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::kill9::{self, AfterKills};
use crate::support::mosquitto::{
    self, Mosquitto, Options, Received, SHARED_PORT, Subscriber, Subscription, TlsListener,
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

fn client_id(what: &str) -> String {
    format!("ess-test-{what}-{:08x}", rand::random::<u32>())
}

fn event(id: &str, event_type: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "version": 1, "type": event_type, "subject": subject, "payload": payload}),
    )
    .unwrap()
}

async fn post(agent: &Agent, id: &str, body: Vec<u8>) -> support::Reply {
    let headers = signed_headers(id, unix_now(), &body);
    request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap()
}

/// Waits until the agent logs that `id` is final; returns that log line.
fn wait_final(agent: &Agent, id: &str, timeout: Duration) -> Value {
    agent
        .wait_for_log(timeout, |v| {
            v["message"] == "event final" && v["event_id"] == id
        })
        .unwrap_or_else(|| {
            panic!(
                "event {id} did not become final; log:\n{}",
                agent.log_text()
            )
        })
}

fn by_topic(messages: Vec<Received>) -> BTreeMap<String, Received> {
    messages.into_iter().map(|m| (m.topic.clone(), m)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_subscriber_on_their_topic_with_qos_retain_and_properties() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    write_adapter(dir.path(), "text.jsonata", "payload.text");
    let prefix = mosquitto::unique_prefix();
    let mut sub = Subscriber::start(Subscription {
        port: SHARED_PORT,
        filter: &format!("{prefix}/#"),
        persistent: false,
        credentials: None,
    })
    .await;
    let config = format!(
        r#"{adapters}
[[routes]]
name = "kiosk-v5"
types = ["rule.*"]
adapter = "pass.jsonata"
sink = "v5"

[[routes]]
name = "clinic-v3"
types = ["rule.*"]
adapter = "pass.jsonata"
sink = "v3"

[[routes]]
name = "alerts"
types = ["alert.*"]
adapter = "text.jsonata"
sink = "alerts"

[sinks.v5]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"
client_id = "{v5_id}"
topic = "{prefix}/v5/partners/{{partner}}/rules/{{subject}}"
retain = true
message_expiry_secs = 3600

[sinks.v3]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"
protocol = "3.1.1"
client_id = "{v3_id}"
topic = "{prefix}/v3/{{subject}}"
qos = 2
envelope = true

[sinks.alerts]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"
client_id = "{alerts_id}"
topic = "{prefix}/alerts/{{subject}}"
qos = 0
"#,
        adapters = adapters_dir(dir.path()),
        v5_id = client_id("v5"),
        v3_id = client_id("v3"),
        alerts_id = client_id("alerts"),
    );
    let agent = Agent::start(dir.path(), &config);

    let reply = post(
        &agent,
        "e1",
        event("e1", "rule.updated", "RULE-1", json!({"deadline": "16:00"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let reply = post(
        &agent,
        "a1",
        event("a1", "alert.fire", "zone-3", json!({"text": "evacuate ő"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        wait_final(&agent, "e1", Duration::from_secs(20))["state"],
        "applied"
    );
    assert_eq!(
        wait_final(&agent, "a1", Duration::from_secs(20))["state"],
        "applied"
    );

    let got = by_topic(
        sub.collect_until(Duration::from_secs(10), |got| got.len() >= 3)
            .await,
    );
    let expected_output =
        json!({"id": "e1", "subject": "RULE-1", "payload": {"deadline": "16:00"}});

    let v5_topic = format!("{prefix}/v5/partners/test-partner/rules/RULE-1");
    let m = got
        .get(&v5_topic)
        .unwrap_or_else(|| panic!("nothing on {v5_topic}: {got:?}"));
    assert_eq!(m.qos, 1);
    assert!(m.retain);
    assert_eq!(m.json(), expected_output);
    assert_eq!(m.property("ess-event-id"), Some("e1"));
    assert_eq!(m.property("ess-event-type"), Some("rule.updated"));
    assert_eq!(m.property("ess-route"), Some("kiosk-v5"));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert!(matches!(m.message_expiry, Some(1..=3600)), "{m:?}");

    let v3_topic = format!("{prefix}/v3/RULE-1");
    let m = got
        .get(&v3_topic)
        .unwrap_or_else(|| panic!("nothing on {v3_topic}: {got:?}"));
    assert_eq!(m.qos, 2);
    assert!(!m.retain);
    assert!(m.user_properties.is_empty(), "MQTT 3.1.1 has no properties");
    assert_eq!(
        m.json(),
        json!({"ess_event_id": "e1", "ess_event_type": "rule.updated", "ess_route": "clinic-v3", "output": expected_output})
    );

    let alert_topic = format!("{prefix}/alerts/zone-3");
    let m = got
        .get(&alert_topic)
        .unwrap_or_else(|| panic!("nothing on {alert_topic}: {got:?}"));
    assert_eq!(m.qos, 0);
    assert_eq!(&m.payload[..], "evacuate ő".as_bytes());
    assert_eq!(m.content_type.as_deref(), Some("text/plain; charset=utf-8"));
    assert_eq!(m.property("ess-event-id"), Some("a1"));
    assert_eq!(got.len(), 3, "{got:?}");

    // The retained message greets a subscriber that comes later.
    let mut late = Subscriber::start(Subscription {
        port: SHARED_PORT,
        filter: &format!("{prefix}/v5/#"),
        persistent: false,
        credentials: None,
    })
    .await;
    let m = late
        .next(Duration::from_secs(10))
        .await
        .expect("the retained message");
    assert_eq!(m.topic, v5_topic);
    assert!(m.retain);
    assert_eq!(m.property("ess-event-id"), Some("e1"));
    late.stop().await;
    sub.stop().await;
    mosquitto::clear_retained(SHARED_PORT, &[v5_topic]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_that_would_hold_a_wildcard_or_an_empty_level_are_dead_letters_before_publishing() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    write_adapter(dir.path(), "zone.jsonata", r#"{"zone": payload.zone}"#);
    let prefix = mosquitto::unique_prefix();
    let mut sub = Subscriber::start(Subscription {
        port: SHARED_PORT,
        filter: &format!("{prefix}/#"),
        persistent: false,
        credentials: None,
    })
    .await;
    let config = format!(
        r#"{adapters}
[[routes]]
name = "zones"
adapter = "zone.jsonata"
sink = "kiosks"

[sinks.kiosks]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"
client_id = "{id}"
topic = "{prefix}/rules/{{subject}}/{{output.zone}}"
retry = {{ initial_ms = 20, max_ms = 100 }}
"#,
        adapters = adapters_dir(dir.path()),
        id = client_id("topics"),
    );
    let agent = Agent::start(dir.path(), &config);
    for (id, subject, zone, expect) in [
        ("plus", "a+b", "n", "wildcard '+'"),
        ("hash", "x", "#", "wildcard '#'"),
        ("empty-zone", "x", "", "empty level"),
        ("slashes", "a//b", "n", "empty level"),
    ] {
        let reply = post(
            &agent,
            id,
            event(id, "rule.updated", subject, json!({"zone": zone})),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        let line = wait_final(&agent, id, Duration::from_secs(20));
        assert_eq!(line["state"], "failed", "{id}: {line}");
        let error = line["error"].as_str().unwrap();
        assert!(error.contains(expect), "{id}: {error}");
        // Permanent: one attempt, no retries.
        assert!(
            !agent.log_text().contains(&format!(
                "\"event_id\":\"{id}\",\"route\":\"zones\",\"sink\":\"kiosks\",\"attempts\":1,\"retry_in_ms\""
            )),
            "{id} was retried"
        );
    }
    // A good event still goes through, and it is the only message the broker ever saw.
    let reply = post(
        &agent,
        "good",
        event("good", "rule.updated", "R-1", json!({"zone": "north"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        wait_final(&agent, "good", Duration::from_secs(20))["state"],
        "applied"
    );
    let m = sub
        .next(Duration::from_secs(10))
        .await
        .expect("the good event");
    assert_eq!(m.topic, format!("{prefix}/rules/R-1/north"));
    assert_eq!(m.property("ess-event-id"), Some("good"));
    assert!(sub.drain().is_empty());
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_applied_before_the_broker_confirms_and_a_late_confirmation_is_not_resent() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let broker = Mosquitto::start(Options::default());
    let mut sub = Subscriber::start(Subscription {
        port: broker.port,
        filter: "held/#",
        persistent: false,
        credentials: None,
    })
    .await;
    let sink = |qos: u8| {
        format!(
            r#"
[[routes]]
name = "qos{qos}"
types = ["rule.qos{qos}"]
adapter = "pass.jsonata"
sink = "qos{qos}"

[sinks.qos{qos}]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "{id}"
topic = "held/{qos}/{{subject}}"
qos = {qos}
timeout_ms = 700
retry = {{ initial_ms = 50, max_ms = 200, max_attempts = 0 }}
"#,
            port = broker.port,
            id = client_id(&format!("held{qos}")),
        )
    };
    let config = format!("{}{}{}", adapters_dir(dir.path()), sink(1), sink(2));
    let agent = Agent::start(dir.path(), &config);
    for qos in [1u8, 2] {
        // Connected and working.
        let warm = format!("warm{qos}");
        post(
            &agent,
            &warm,
            event(&warm, &format!("rule.qos{qos}"), "w", json!({})),
        )
        .await;
        assert_eq!(
            wait_final(&agent, &warm, Duration::from_secs(20))["state"],
            "applied"
        );
        assert_eq!(sub.next(Duration::from_secs(10)).await.unwrap().qos, qos);

        // The broker stops answering: the publish is written, but without its confirmation the
        // event is not applied; the apply times out and is retried.
        broker.freeze();
        let id = format!("held{qos}");
        post(
            &agent,
            &id,
            event(&id, &format!("rule.qos{qos}"), "h", json!({})),
        )
        .await;
        let expect = if qos == 1 { "no PUBACK" } else { "no PUBCOMP" };
        let mut timeouts = 0;
        let seen = agent.wait_for_log(Duration::from_secs(20), |v| {
            assert!(
                !(support::applied_line(v) && v["event_id"] == id.as_str()),
                "{id} applied without a confirmation"
            );
            if v["message"] == "apply failed; will retry"
                && v["event_id"] == id.as_str()
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(expect) && e.contains("timeout_ms"))
            {
                timeouts += 1;
            }
            timeouts >= 2
        });
        assert!(
            seen.is_some(),
            "{id}: no timeouts; log:\n{}",
            agent.log_text()
        );
        broker.thaw();
        assert_eq!(
            wait_final(&agent, &id, Duration::from_secs(20))["state"],
            "applied"
        );
        // The retries waited for the publish in flight instead of sending copies.
        let m = sub
            .next(Duration::from_secs(10))
            .await
            .expect("the held message");
        assert_eq!(m.property("ess-event-id"), Some(id.as_str()));
        assert_eq!(m.qos, qos);
        let again = format!("after{qos}");
        post(
            &agent,
            &again,
            event(&again, &format!("rule.qos{qos}"), "a", json!({})),
        )
        .await;
        assert_eq!(
            wait_final(&agent, &again, Duration::from_secs(20))["state"],
            "applied"
        );
        let next = sub.next(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            next.property("ess-event-id"),
            Some(again.as_str()),
            "{id} arrived twice"
        );
    }
    sub.stop().await;
}

/// Starts posting events `{tag}-{n}` for n in `range` from `tasks` concurrent clients, spread
/// over `subjects` subjects, until done or `stop` is set; the handle yields the ids the agent
/// accepted.
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

/// Counts each event id among the messages (from the MQTT 5 user property, or the envelope).
fn count_ids(messages: &[Received], counts: &mut BTreeMap<String, usize>) {
    for m in messages {
        let id = match m.property("ess-event-id") {
            Some(id) => id.to_string(),
            None => m.json()["ess_event_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no event id in {m:?}"))
                .to_string(),
        };
        *counts.entry(id).or_default() += 1;
    }
}

/// A broker outage of 10 s in the middle of 1,000 events: every event arrives; duplicates are
/// counted and reported.
async fn outage(protocol: &str) {
    const EVENTS_TOTAL: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let mut broker = Mosquitto::start(Options {
        persistence: true,
        ..Options::default()
    });
    let mut sub = Subscriber::start(Subscription {
        port: broker.port,
        filter: "county/#",
        persistent: true,
        credentials: None,
    })
    .await;
    let config = format!(
        r#"{adapters}
[dispatch]
max_parallel = 32

[[routes]]
name = "kiosks"
adapter = "pass.jsonata"
sink = "kiosks"

[sinks.kiosks]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
protocol = "{protocol}"
envelope = true
client_id = "{id}"
topic = "county/rules/{{subject}}"
timeout_ms = 3000
connect_timeout_secs = 2
reconnect_initial_ms = 50
reconnect_max_ms = 500
retry = {{ initial_ms = 100, max_ms = 500, max_attempts = 0 }}
"#,
        adapters = adapters_dir(dir.path()),
        port = broker.port,
        id = client_id("outage"),
    );
    let agent = Agent::start(dir.path(), &config);
    let applied_before = {
        let poster = post_many(
            &agent,
            "o",
            0..EVENTS_TOTAL,
            4,
            50,
            Arc::new(AtomicBool::new(false)),
        );
        // Stop the broker once a fifth of the events are through, while events keep coming.
        let mut applied = 0;
        let seen = agent.wait_for_log(Duration::from_secs(30), |v| {
            if support::applied_line(v) {
                applied += 1;
            }
            applied >= EVENTS_TOTAL / 5
        });
        assert!(seen.is_some(), "nothing applied:\n{}", agent.log_text());
        broker.stop();
        let applied_before = agent
            .log_text()
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| support::applied_line(&v)))
            .count();
        // The outage the issue asks for: held, not waited on.
        let outage = tokio::time::sleep(Duration::from_secs(10));
        let (accepted, ()) = tokio::join!(poster, outage);
        assert_eq!(accepted.unwrap().len(), EVENTS_TOTAL);
        applied_before
    };
    assert!(
        applied_before < EVENTS_TOTAL,
        "the outage came after everything was applied"
    );
    assert!(
        agent.log_text().contains("mqtt connection lost")
            || agent.log_text().contains("mqtt connection attempt failed"),
        "the agent did not notice the outage"
    );
    broker.start_again();
    sub.broker_back();

    let mut counts = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while counts.len() < EVENTS_TOTAL && tokio::time::Instant::now() < deadline {
        if let Some(m) = sub.next(Duration::from_millis(500)).await {
            count_ids(&[m], &mut counts);
        }
    }
    // Let the agent finish recording; then take what else arrived (late duplicates).
    let mut applied = BTreeSet::new();
    let all_applied = agent.wait_for_log(Duration::from_secs(30), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            applied.insert(v["event_id"].as_str().unwrap_or_default().to_string());
        }
        applied.len() == EVENTS_TOTAL
    });
    assert!(all_applied.is_some(), "not every event was applied");
    count_ids(&sub.drain(), &mut counts);
    // The resends came from the persistent session the broker kept across its restart.
    assert!(
        agent
            .wait_for_log(Duration::from_secs(1), |v| v["message"] == "mqtt connected"
                && v["session_present"] == true)
            .is_some(),
        "the agent did not resume its session"
    );
    let missing: Vec<String> = (0..EVENTS_TOTAL)
        .map(|n| format!("o-{n}"))
        .filter(|id| !counts.contains_key(id))
        .collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "outage ({protocol}): {} of {EVENTS_TOTAL} ids arrived, {} applied before the broker \
         stopped, {duplicates} duplicate deliveries, {} missing",
        counts.len(),
        applied_before,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost: {:?}; broker log:\n{}",
        &missing[..missing.len().min(20)],
        broker.log_text()
    );
    assert_eq!(counts.len(), EVENTS_TOTAL);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_broker_outage_loses_nothing_mqtt5() {
    outage("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_broker_outage_loses_nothing_mqtt311() {
    outage("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_repeated_every_accepted_event_reaches_the_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let prefix = mosquitto::unique_prefix();
    let mut sub = Subscriber::start(Subscription {
        port: SHARED_PORT,
        filter: &format!("{prefix}/#"),
        persistent: false,
        credentials: None,
    })
    .await;
    let config = support::config_text(
        dir.path(),
        &format!(
            r#"{adapters}
[[routes]]
name = "kiosks"
adapter = "pass.jsonata"
sink = "kiosks"

[sinks.kiosks]
type = "mqtt"
url = "mqtt://127.0.0.1:{SHARED_PORT}"
protocol = "3.1.1"
envelope = true
client_id = "{id}"
topic = "{prefix}/rules/{{subject}}"
retry = {{ initial_ms = 50, max_ms = 500, max_attempts = 0 }}
"#,
            adapters = adapters_dir(dir.path()),
            id = client_id("kill9"),
        ),
    );
    let AfterKills {
        accepted,
        resumed,
        agent,
    } = kill9::kill_9_rounds(
        dir.path(),
        &config,
        3,
        |round| 50 + round * 30,
        |agent, tag, stop| post_many(agent, tag, 0..2000, 4, 16, stop),
    )
    .await;
    let mut counts = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !accepted.iter().all(|id| counts.contains_key(id))
        && tokio::time::Instant::now() < deadline
    {
        if let Some(m) = sub.next(Duration::from_millis(500)).await {
            count_ids(&[m], &mut counts);
        }
    }
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "kill -9: {} accepted events, {} arrived, {duplicates} duplicate deliveries, {resumed} \
         resumed after a kill",
        accepted.len(),
        counts.len()
    );
    assert!(resumed > 0, "no kill interrupted an event");
    assert!(
        missing.is_empty(),
        "lost {} accepted events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    drop(agent);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_test_ca_works_and_a_wrong_ca_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let pki = support::tls::generate(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let wrong = support::tls::generate(&other);
    let broker = Mosquitto::start(Options {
        tls: Some(TlsListener {
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            require_certificate: true,
        }),
        ..Options::default()
    });
    let tls_port = broker.tls_port.unwrap();
    let mut sub = Subscriber::start(Subscription {
        port: broker.port,
        filter: "secure/#",
        persistent: false,
        credentials: None,
    })
    .await;
    let config = format!(
        r#"{adapters}
[[routes]]
name = "good"
types = ["rule.good"]
adapter = "pass.jsonata"
sink = "trusted"

[[routes]]
name = "bad"
types = ["rule.bad"]
adapter = "pass.jsonata"
sink = "wrong-ca"

[sinks.trusted]
type = "mqtt"
url = "mqtts://127.0.0.1:{tls_port}"
client_id = "{good_id}"
topic = "secure/{{subject}}"
ca_file = {ca:?}
client_cert = {cert:?}
client_key = {key:?}

[sinks.wrong-ca]
type = "mqtt"
url = "mqtts://localhost:{tls_port}"
client_id = "{bad_id}"
topic = "secure/{{subject}}"
ca_file = {wrong_ca:?}
client_cert = {cert:?}
client_key = {key:?}
retry = {{ initial_ms = 1000, max_ms = 1000 }}
"#,
        adapters = adapters_dir(dir.path()),
        good_id = client_id("tls"),
        bad_id = client_id("tls-bad"),
        ca = pki.ca.display().to_string(),
        cert = pki.client_cert.display().to_string(),
        key = pki.client_key.display().to_string(),
        wrong_ca = wrong.ca.display().to_string(),
    );
    let agent = Agent::start(dir.path(), &config);
    // The healthcheck connects before any event: the untrusted broker makes the agent not ready,
    // with the reason.
    let line = agent
        .wait_for_log(Duration::from_secs(20), |v| {
            v["message"] == "sink healthcheck failed: not ready" && v["sink"] == "wrong-ca"
        })
        .unwrap_or_else(|| panic!("no failed healthcheck; log:\n{}", agent.log_text()));
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("not signed by a CA the agent trusts"),
        "{line}"
    );
    let ready = admin_get(&agent, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.body["reasons"].get("sink wrong-ca").is_some(),
        "{}",
        ready.body
    );
    assert!(
        ready.body["reasons"].get("sink trusted").is_none(),
        "{}",
        ready.body
    );

    let reply = post(
        &agent,
        "t1",
        event("t1", "rule.good", "over-tls", json!({"a": 1})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        wait_final(&agent, "t1", Duration::from_secs(20))["state"],
        "applied"
    );
    let m = sub.next(Duration::from_secs(10)).await.expect("t1 arrives");
    assert_eq!(m.topic, "secure/over-tls");
    assert_eq!(m.property("ess-event-id"), Some("t1"));

    let reply = post(
        &agent,
        "t2",
        event("t2", "rule.bad", "not-trusted", json!({"a": 2})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let line = agent
        .wait_for_log(Duration::from_secs(20), |v| {
            v["message"] == "apply failed; will retry" && v["event_id"] == "t2"
        })
        .unwrap_or_else(|| panic!("no retry for t2; log:\n{}", agent.log_text()));
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains("TLS handshake with mqtts://localhost")
            && error.contains("not signed by a CA the agent trusts")
            && error.contains("set ca_file"),
        "{error}"
    );
    assert!(sub.drain().is_empty(), "nothing reached the broker");
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_and_refused_messages_are_dead_letters_with_the_reason_code() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let broker = Mosquitto::start(Options {
        users: vec![
            ("kiosk".into(), "right-password".into()),
            ("watcher".into(), "watch".into()),
        ],
        acl: Some("user kiosk\ntopic write county/#\n\nuser watcher\ntopic read #\n".into()),
        ..Options::default()
    });
    std::fs::write(dir.path().join("user"), "kiosk\n").unwrap();
    std::fs::write(dir.path().join("right"), "right-password\n").unwrap();
    std::fs::write(dir.path().join("wrong"), "wrong-password\n").unwrap();
    let mut sub = Subscriber::start(Subscription {
        port: broker.port,
        filter: "#",
        persistent: false,
        credentials: Some(("watcher", "watch")),
    })
    .await;
    let sink = |name: &str, protocol: &str, password: &str, topic: &str| {
        format!(
            r#"
[[routes]]
name = "{name}"
types = ["{name}"]
adapter = "pass.jsonata"
sink = "{name}"

[sinks.{name}]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
protocol = "{protocol}"
client_id = "{id}"
topic = "{topic}"
username = {{ file = "user" }}
password = {{ file = "{password}" }}
retry = {{ initial_ms = 20, max_ms = 100 }}
"#,
            port = broker.port,
            id = client_id(name),
        )
    };
    let config = format!(
        "{}{}{}{}{}",
        adapters_dir(dir.path()),
        sink("wrong-v5", "5", "wrong", "county/{subject}"),
        sink("wrong-v3", "3.1.1", "wrong", "county/{subject}"),
        sink("denied-v5", "5", "right", "elsewhere/{subject}"),
        sink("allowed-v5", "5", "right", "county/{subject}"),
    );
    let agent = Agent::start(dir.path(), &config);
    // Mosquitto answers a wrong password with "not authorized" (some brokers say "bad user
    // name or password"); either way the dead letter names the broker's code.
    for (id, expect) in [
        (
            "wrong-v5",
            &[
                "refused the connection: CONNACK reason code 0x87 (not authorized)",
                "refused the connection: CONNACK reason code 0x86 (bad user name or password)",
            ][..],
        ),
        (
            "wrong-v3",
            &[
                "refused the connection: CONNACK return code 5 (not authorized)",
                "refused the connection: CONNACK return code 4 (bad user name or password)",
            ],
        ),
        (
            "denied-v5",
            &["refused the message: PUBACK reason code 0x87 (not authorized)"],
        ),
    ] {
        let reply = post(&agent, id, event(id, id, "s", json!({}))).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        let line = wait_final(&agent, id, Duration::from_secs(20));
        assert_eq!(line["state"], "failed", "{id}: {line}");
        let error = line["error"].as_str().unwrap();
        assert!(expect.iter().any(|e| error.contains(e)), "{id}: {error}");
        assert!(!error.contains("wrong-password"), "{error}");
    }
    // Once refused, the next event fails at once with the same reason.
    let reply = post(
        &agent,
        "wrong-v5-again",
        event("wrong-v5-again", "wrong-v5", "s", json!({})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let line = wait_final(&agent, "wrong-v5-again", Duration::from_secs(20));
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains("refused the connection: CONNACK reason code 0x8"),
        "{line}"
    );

    let reply = post(
        &agent,
        "allowed-v5",
        event("allowed-v5", "allowed-v5", "ok", json!({})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        wait_final(&agent, "allowed-v5", Duration::from_secs(20))["state"],
        "applied"
    );
    let m = sub.next(Duration::from_secs(10)).await.expect("allowed-v5");
    assert_eq!(m.topic, "county/ok");
    assert!(sub.drain().is_empty(), "the refused messages never arrived");
    sub.stop().await;
}
