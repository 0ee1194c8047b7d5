use super::book::*;
use super::publish::*;
use super::*;
use serde_json::json;
use tokio::sync::oneshot;

fn event() -> EventMeta {
    EventMeta {
        id: "evt-1".into(),
        event_type: "rule.updated".into(),
        version: 1,
        subject: "RULE-7".into(),
        revision: Some(3),
        source: None,
        route: "kiosks".into(),
        partner: "county".into(),
        received_at_ms: 1_796_601_600_000,
    }
}

fn config(text: &str) -> MqttConfig {
    toml::from_str(text).unwrap()
}

const MINIMAL: &str = "url = \"mqtt://127.0.0.1\"\nclient_id = \"ess-1\"\ntopic = \
                       \"partners/{partner}/rules/{subject}\"\n";

fn publishing(c: &MqttConfig) -> Publishing {
    MqttSink::new(c, "s").unwrap().publishing
}

#[test]
fn config_parses_with_defaults_and_refuses_unknown_keys() {
    let c = config(MINIMAL);
    assert_eq!(c.protocol, MqttVersion::V5);
    assert_eq!(c.qos, 1);
    assert!(!c.retain && !c.envelope && !c.allow_empty_levels);
    assert_eq!(c.timeout_ms, 10_000);
    assert_eq!(c.max_inflight, 64);
    assert_eq!(c.session_expiry_secs, 86_400);
    assert_eq!(c.keep_alive_secs, 30);
    assert_eq!((c.reconnect_initial_ms, c.reconnect_max_ms), (100, 10_000));
    assert!(
        c.validate("sinks.m").is_empty(),
        "{:?}",
        c.validate("sinks.m")
    );
    let v3 = config(&format!("{MINIMAL}protocol = \"3.1.1\"\nqos = 2\n"));
    assert_eq!(v3.protocol, MqttVersion::V311);
    assert!(v3.validate("sinks.m").is_empty());
    let e = toml::from_str::<MqttConfig>(&format!("{MINIMAL}qos_level = 1\n")).unwrap_err();
    assert!(e.to_string().contains("unknown field"), "{e}");
    let e = toml::from_str::<MqttConfig>(&format!("{MINIMAL}protocol = \"4\"\n")).unwrap_err();
    assert!(e.to_string().contains("unknown variant"), "{e}");
}

#[test]
fn urls_are_checked() {
    assert_eq!(
        parse_url("mqtt://broker.example").unwrap(),
        Broker {
            host: "broker.example".into(),
            port: 1883,
            tls: false
        }
    );
    assert_eq!(parse_url("mqtts://b:9999/").unwrap().port, 9999);
    assert_eq!(parse_url("mqtts://b").unwrap().port, 8883);
    for bad in [
        "tcp://b:1883",
        "b:1883",
        "mqtt://",
        "mqtt://u:pw@b",
        "mqtt://b/topic",
        "mqtt://b?x=1",
        "",
    ] {
        let e = parse_url(bad).unwrap_err();
        assert!(!e.contains("pw"), "{e}");
    }
}

#[test]
fn validate_names_every_problem() {
    let text = r#"
url = "mqtt://b"
protocol = "3.1.1"
client_id = ""
topic = "a/+/{subject}"
qos = 3
content_type = "text/csv"
message_expiry_secs = 0
session_expiry_secs = 0
password = { file = "p", env = "P" }
ca_file = "ca.pem"
client_cert = "c.pem"
timeout_ms = 0
max_inflight = 0
connect_timeout_secs = 0
keep_alive_secs = 4
reconnect_initial_ms = 0
"#;
    let mut keys: Vec<String> = config(text)
        .validate("sinks.m")
        .into_iter()
        .map(|p| p.key)
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys,
        [
            "sinks.m.ca_file",
            "sinks.m.client_cert",
            "sinks.m.client_id",
            "sinks.m.client_key",
            "sinks.m.connect_timeout_secs",
            "sinks.m.content_type",
            "sinks.m.keep_alive_secs",
            "sinks.m.max_inflight",
            "sinks.m.message_expiry_secs",
            "sinks.m.password",
            "sinks.m.qos",
            "sinks.m.reconnect_initial_ms",
            "sinks.m.session_expiry_secs",
            "sinks.m.timeout_ms",
            "sinks.m.topic",
        ]
    );
}

#[test]
fn topic_templates_that_can_never_be_valid_are_configuration_problems() {
    for (topic, expect) in [
        ("a/#", "wildcard '#'"),
        ("a/+/b", "wildcard '+'"),
        ("a//{id}", "empty level"),
        ("/{id}", "empty level"),
        ("{id}/", "empty level"),
        ("$SYS/{id}", "starts with $"),
        ("{nope}", "unknown placeholder"),
    ] {
        let c = config(&format!(
            "url = \"mqtt://b\"\nclient_id = \"c\"\ntopic = {topic:?}\n"
        ));
        let problems = c.validate("sinks.m");
        assert_eq!(problems.len(), 1, "{topic}: {problems:?}");
        assert_eq!(problems[0].key, "sinks.m.topic");
        assert!(
            problems[0].message.contains(expect),
            "{topic}: {problems:?}"
        );
        assert!(MqttSink::new(&c, "m").is_err());
    }
    let c = config(
        "url = \"mqtt://b\"\nclient_id = \"c\"\ntopic = \"a//{id}\"\nallow_empty_levels = true\n",
    );
    assert!(c.validate("sinks.m").is_empty());
}

#[test]
fn rendered_topics_are_checked() {
    assert!(check_topic("partners/p1/rules/R-1", false).is_ok());
    assert!(check_topic("a//b", true).is_ok());
    assert!(check_topic("é/ü", false).is_ok());
    for (topic, expect) in [
        ("", "empty"),
        ("a/+", "wildcard"),
        ("a/#", "wildcard"),
        ("a//b", "empty level"),
        ("a/", "empty level"),
        ("a\0b", "control character"),
        ("a\nb", "control character"),
        ("$share/x", "starts with $"),
    ] {
        let e = check_topic(topic, false).unwrap_err();
        assert!(e.contains(expect), "{topic:?}: {e}");
    }
    let long = "a".repeat(MAX_TOPIC + 1);
    let e = check_topic(&long, false).unwrap_err();
    assert!(e.contains("65535") && e.len() < 400, "{e}");
    assert!(check_topic(&"a".repeat(MAX_TOPIC), false).is_ok());
}

#[test]
fn messages_carry_payload_topic_and_v5_properties() {
    let p = publishing(&config(MINIMAL));
    let m = p.messages(&event(), &json!({"b": 1, "a": [2]})).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].topic, "partners/county/rules/RULE-7");
    assert_eq!(&m[0].payload[..], br#"{"b":1,"a":[2]}"#);
    let props = m[0].properties.as_ref().unwrap();
    assert_eq!(props.content_type.as_deref(), Some(JSON));
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(props.message_expiry_interval, None);
    assert_eq!(
        props.user_properties,
        [
            ("ess-event-id".to_string(), "evt-1".to_string()),
            ("ess-event-type".to_string(), "rule.updated".to_string()),
            ("ess-route".to_string(), "kiosks".to_string()),
        ]
    );
    // A string output goes out as its text.
    let m = p.messages(&event(), &json!("a;b\r\n1;Ő")).unwrap();
    assert_eq!(&m[0].payload[..], "a;b\r\n1;Ő".as_bytes());
    assert_eq!(
        m[0].properties.as_ref().unwrap().content_type.as_deref(),
        Some(TEXT)
    );
    // Overrides.
    let p = publishing(&config(&format!(
        "{MINIMAL}content_type = \"application/xml\"\nmessage_expiry_secs = 60\n"
    )));
    let m = p.messages(&event(), &json!("<a/>")).unwrap();
    let props = m[0].properties.as_ref().unwrap();
    assert_eq!(props.content_type.as_deref(), Some("application/xml"));
    assert_eq!(props.message_expiry_interval, Some(60));
}

#[test]
fn arrays_give_one_message_per_element_and_are_checked_before_anything_is_sent() {
    let p = publishing(&config(
        "url = \"mqtt://b\"\nclient_id = \"c\"\ntopic = \"zones/{output.zone}/{index}\"\n",
    ));
    let m = p
        .messages(&event(), &json!([{"zone": "n"}, {"zone": "s"}]))
        .unwrap();
    assert_eq!(
        m.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
        ["zones/n/0", "zones/s/1"]
    );
    assert_eq!(m[1].key.index, 1);
    assert!(
        m[1].properties
            .as_ref()
            .unwrap()
            .user_properties
            .contains(&("ess-record".to_string(), "1".to_string()))
    );
    assert_ne!(m[0].fingerprint, m[1].fingerprint);
    assert!(p.messages(&event(), &json!([])).unwrap().is_empty());
    // One bad record refuses the whole event.
    for (output, expect) in [
        (
            json!([{"zone": "n"}, {"zone": "a+b"}]),
            "record 1: the rendered topic",
        ),
        (json!([{"zone": "n"}, {"zone": ""}]), "empty level"),
        (json!([{"zone": "#"}]), "wildcard '#'"),
        (json!([{"zone": null}]), "is null"),
        (json!([{"other": 1}]), "no field {output.zone}"),
    ] {
        let e = p.messages(&event(), &output).unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains(expect), "{output}: {e}");
    }
}

#[test]
fn envelope_wraps_the_output_with_the_event_id() {
    let p = publishing(&config(&format!(
        "{MINIMAL}protocol = \"3.1.1\"\nenvelope = true\n"
    )));
    let m = p.messages(&event(), &json!("plain")).unwrap();
    assert!(m[0].properties.is_none());
    let v: Value = serde_json::from_slice(&m[0].payload).unwrap();
    assert_eq!(
        v,
        json!({"ess_event_id": "evt-1", "ess_event_type": "rule.updated", "ess_route": "kiosks", "output": "plain"})
    );
    let m = p.messages(&event(), &json!([{"a": 1}])).unwrap();
    let v: Value = serde_json::from_slice(&m[0].payload).unwrap();
    assert_eq!(v["ess_record"], 0);
    assert_eq!(v["output"], json!({"a": 1}));
}

#[test]
fn the_fingerprint_changes_with_anything_on_the_wire() {
    let base = config(MINIMAL);
    let fp = |c: &MqttConfig, output: Value| {
        publishing(c).messages(&event(), &output).unwrap()[0].fingerprint
    };
    let a = fp(&base, json!({"a": 1}));
    assert_eq!(a, fp(&base, json!({"a": 1})));
    assert_ne!(a, fp(&base, json!({"a": 2})));
    assert_ne!(
        a,
        fp(
            &config(&format!("{MINIMAL}retain = true\n")),
            json!({"a": 1})
        )
    );
    assert_ne!(
        a,
        fp(&config(&format!("{MINIMAL}qos = 2\n")), json!({"a": 1}))
    );
}

fn key(n: usize) -> RecordKey {
    RecordKey {
        event_id: format!("e{n}"),
        route: "r".into(),
        index: 0,
    }
}

fn outcome(rx: &mut oneshot::Receiver<Outcome>) -> Option<Outcome> {
    rx.try_recv().ok()
}

#[test]
fn confirmations_complete_their_own_publish_by_packet_id() {
    let mut book = Book::default();
    let (_, mut a) = book.enqueue(key(1), [1; 32], None);
    let (_, mut b) = book.enqueue(key(2), [2; 32], None);
    let (_, mut c) = book.enqueue(key(3), [3; 32], None);
    book.written(7);
    book.written(8);
    book.written(9);
    // Out of order, and a duplicate ack that matches nothing.
    book.acked(8, Ok(()));
    assert_eq!(outcome(&mut b), Some(Ok(())));
    assert_eq!(outcome(&mut a), None);
    book.acked(8, Ok(()));
    book.acked(9, Err(SinkError::Permanent("0x87".into())));
    assert_eq!(
        outcome(&mut c),
        Some(Err(SinkError::Permanent("0x87".into())))
    );
    assert_eq!(outcome(&mut a), None);
    book.acked(7, Ok(()));
    assert_eq!(outcome(&mut a), Some(Ok(())));
    assert_eq!(book.in_flight(), 0);
}

#[test]
fn a_resend_after_reconnect_is_not_mistaken_for_a_new_publish() {
    let mut book = Book::default();
    let (_, mut a) = book.enqueue(key(1), [1; 32], None);
    book.written(1);
    let (_, mut b) = book.enqueue(key(2), [2; 32], None);
    // Reconnected with the session: 1 is resent, then 2 goes out for the first time.
    book.written(1);
    book.written(2);
    book.acked(2, Ok(()));
    assert_eq!(outcome(&mut b), Some(Ok(())));
    assert_eq!(outcome(&mut a), None);
    book.acked(1, Ok(()));
    assert_eq!(outcome(&mut a), Some(Ok(())));
}

#[test]
fn qos0_is_done_when_written_and_qos2_when_completed() {
    let mut book = Book::default();
    let (_, mut zero) = book.enqueue(key(1), [1; 32], None);
    let (_, mut two) = book.enqueue(key(2), [2; 32], None);
    book.written(0);
    assert_eq!(outcome(&mut zero), Some(Ok(())));
    book.written(5);
    book.received(5, Ok(()));
    assert_eq!(outcome(&mut two), None);
    // The client reuses id 5 for a new QoS 2 message before the PUBCOMP of the first.
    let (_, mut next) = book.enqueue(key(3), [3; 32], None);
    book.written(5);
    book.completed(5, Ok(()));
    assert_eq!(outcome(&mut two), Some(Ok(())));
    assert_eq!(outcome(&mut next), None);
    book.received(5, Ok(()));
    book.completed(5, Ok(()));
    assert_eq!(outcome(&mut next), Some(Ok(())));
    // A PUBREC with a failure reason ends the exchange.
    let (_, mut refused) = book.enqueue(key(4), [4; 32], None);
    book.written(6);
    book.received(6, Err(SinkError::Permanent("0x87".into())));
    assert!(matches!(outcome(&mut refused), Some(Err(_))));
    assert_eq!(book.in_flight(), 0);
}

#[test]
fn a_collided_publish_takes_its_id_once_the_id_is_free() {
    let mut book = Book::default();
    let (_, mut a) = book.enqueue(key(1), [1; 32], None);
    book.written(1);
    let (_, mut b) = book.enqueue(key(2), [2; 32], None);
    book.collision(1);
    let (_, mut c) = book.enqueue(key(3), [3; 32], None);
    // The ack for 1 frees the id; the held publish goes out with it.
    book.acked(1, Ok(()));
    book.written(1);
    book.written(2);
    assert_eq!(outcome(&mut a), Some(Ok(())));
    book.acked(1, Ok(()));
    assert_eq!(outcome(&mut b), Some(Ok(())));
    book.acked(2, Ok(()));
    assert_eq!(outcome(&mut c), Some(Ok(())));
}

#[test]
fn a_lost_session_fails_exactly_the_publishes_it_held() {
    let mut book = Book::default();
    let (_, mut sent) = book.enqueue(key(1), [1; 32], None);
    book.written(1);
    let (_, mut releasing) = book.enqueue(key(2), [2; 32], None);
    book.written(2);
    book.received(2, Ok(()));
    let (_, mut drained) = book.enqueue(key(3), [3; 32], None);
    // Handed over after the client drained its channel: still in the channel.
    let (_, mut later) = book.enqueue(key(4), [4; 32], None);
    book.session_lost(&[
        Pending::Publish(1),
        Pending::Release(2),
        Pending::Publish(0),
    ]);
    for rx in [&mut sent, &mut releasing, &mut drained] {
        let got = outcome(rx).unwrap().unwrap_err();
        assert!(
            got.is_retryable() && got.to_string().contains("session"),
            "{got}"
        );
    }
    assert_eq!(outcome(&mut later), None);
    // The publish still in the channel goes out and is matched correctly.
    book.written(1);
    book.acked(1, Ok(()));
    assert_eq!(outcome(&mut later), Some(Ok(())));
    assert_eq!(book.in_flight(), 0);
}

#[test]
fn a_retry_waits_for_the_publish_in_flight_or_takes_its_late_confirmation() {
    let mut book = Book::default();
    let (_, first) = book.enqueue(key(1), [1; 32], None);
    book.written(1);
    // The apply gave up (timed out); its retry comes with the same message.
    drop(first);
    let Attach::Waiting(mut retry) = book.attach(&key(1), &[1; 32]) else {
        panic!("expected to wait for the publish in flight")
    };
    // A different content is a different message.
    assert!(matches!(book.attach(&key(1), &[9; 32]), Attach::Publish));
    book.acked(1, Ok(()));
    assert_eq!(outcome(&mut retry), Some(Ok(())));

    // Confirmed after every apply stopped waiting: the retry succeeds at once, once.
    let (_, gone) = book.enqueue(key(2), [2; 32], None);
    book.written(2);
    book.fail_waiters(&SinkError::Retryable("connection refused".into()));
    drop(gone);
    book.acked(2, Ok(()));
    assert!(matches!(book.attach(&key(2), &[2; 32]), Attach::Confirmed));
    assert!(matches!(book.attach(&key(2), &[2; 32]), Attach::Publish));
    // A late confirmation of other content does not count.
    let (_, gone) = book.enqueue(key(3), [3; 32], None);
    drop(gone);
    book.written(3);
    book.acked(3, Ok(()));
    assert!(matches!(book.attach(&key(3), &[4; 32]), Attach::Publish));
}

#[test]
fn failing_waiters_keeps_the_publishes_and_their_window_places() {
    let window = Arc::new(Semaphore::new(2));
    let mut book = Book::default();
    let permit = window.clone().try_acquire_owned().unwrap();
    let (_, mut a) = book.enqueue(key(1), [1; 32], Some(permit));
    book.fail_waiters(&SinkError::Permanent("CONNACK return code 4".into()));
    assert_eq!(
        outcome(&mut a),
        Some(Err(SinkError::Permanent("CONNACK return code 4".into())))
    );
    assert_eq!(window.available_permits(), 1);
    assert_eq!(book.in_flight(), 1);
    book.written(1);
    book.acked(1, Ok(()));
    assert_eq!(window.available_permits(), 2);
}

#[test]
fn remembered_confirmations_are_bounded() {
    let mut book = Book::default();
    for n in 0..ORPHANS + 10 {
        book.remember(key(n), [0; 32]);
    }
    assert_eq!(book.orphans.len(), ORPHANS);
    assert!(!book.orphans.contains_key(&key(0)));
    assert!(book.orphans.contains_key(&key(ORPHANS + 9)));
}

#[test]
fn reason_codes_are_classified() {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C5, PubAckReason as P};
    assert!(v5::puback(P::Success, None, "PUBACK").is_ok());
    assert!(v5::puback(P::NoMatchingSubscribers, None, "PUBACK").is_ok());
    let e = v5::puback(P::NotAuthorized, Some("acl".into()), "PUBACK").unwrap_err();
    assert!(!e.is_retryable());
    assert!(
        e.to_string()
            .contains("PUBACK reason code 0x87 (not authorized)"),
        "{e}"
    );
    assert!(e.to_string().contains("acl"), "{e}");
    assert!(
        v5::puback(P::QuotaExceeded, None, "PUBACK")
            .unwrap_err()
            .is_retryable()
    );
    assert!(
        !v5::puback(P::TopicNameInvalid, None, "PUBACK")
            .unwrap_err()
            .is_retryable()
    );
    assert_eq!(v5::refusal(C5::BadUserNamePassword).0, 0x86);
    assert!(v5::refusal(C5::BadUserNamePassword).2);
    assert!(v5::refusal(C5::NotAuthorized).2);
    assert!(!v5::refusal(C5::ServerUnavailable).2);
    assert!(!v5::refusal(C5::ServerBusy).2);
    use rumqttc::ConnectReturnCode as C4;
    assert_eq!(v311::refusal(C4::BadUserNamePassword).0, 4);
    assert!(v311::refusal(C4::BadUserNamePassword).2);
    assert!(v311::refusal(C4::NotAuthorized).2);
    assert!(!v311::refusal(C4::ServiceUnavailable).2);
}

#[test]
fn building_reads_credentials_and_tls_files_but_connects_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("user"), "kiosk\n").unwrap();
    std::fs::write(dir.path().join("pass"), "s3cret\n").unwrap();
    let mut c = config(&format!(
        "{MINIMAL}username = {{ file = \"user\" }}\npassword = {{ file = \"pass\" }}\n"
    ));
    c.resolve_paths(dir.path());
    assert!(c.validate("sinks.m").is_empty());
    let sink = MqttSink::new(&c, "m").unwrap();
    assert!(!format!("{sink:?}").contains("s3cret"));
    c.password.as_mut().unwrap().file = Some(dir.path().join("missing"));
    let e = MqttSink::new(&c, "m").unwrap_err();
    assert!(e.starts_with("password: cannot read secret file"), "{e}");

    let mut c =
        config("url = \"mqtts://b\"\nclient_id = \"c\"\ntopic = \"t\"\nca_file = \"nope.pem\"\n");
    c.resolve_paths(dir.path());
    let e = MqttSink::new(&c, "m").unwrap_err();
    assert!(e.starts_with("TLS: cannot read"), "{e}");
}

#[tokio::test]
async fn nothing_listening_is_retryable_with_the_reason() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for protocol in ["3.1.1", "5"] {
        let c = config(&format!(
            "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"c\"\ntopic = \"t/{{id}}\"\n\
             protocol = \"{protocol}\"\ntimeout_ms = 5000\n"
        ));
        let sink = MqttSink::new(&c, "m").unwrap();
        let started = std::time::Instant::now();
        let e = sink.apply(&event(), &json!({})).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(
            e.to_string().contains("cannot reach the MQTT broker"),
            "{e}"
        );
        assert!(e.to_string().contains("is the broker running"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(4), "failed fast");
        assert!(sink.healthcheck().await.is_err());
        // A bad topic is refused before anything is tried.
        let mut bad = event();
        bad.subject = "a/#".into();
        let c = config(&format!(
            "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"c\"\ntopic = \"t/{{subject}}\"\n"
        ));
        let e = MqttSink::new(&c, "m")
            .unwrap()
            .apply(&bad, &json!({}))
            .await
            .unwrap_err();
        assert!(
            !e.is_retryable() && e.to_string().contains("wildcard"),
            "{e}"
        );
    }
}
