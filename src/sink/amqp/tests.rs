use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::AMQPError;
use lapin::types::{AMQPValue, ShortString};
use serde_json::json;

use super::*;
use crate::sink::SinkSpec;

fn event() -> EventMeta {
    EventMeta {
        id: "evt-1".into(),
        event_type: "rule.updated".into(),
        version: 2,
        subject: "RULE-7".into(),
        revision: Some(3),
        source: None,
        route: "cases".into(),
        partner: "county".into(),
        received_at_ms: 1_796_601_600_000,
    }
}

fn config(text: &str) -> AmqpConfig {
    toml::from_str(text).unwrap()
}

const MINIMAL: &str =
    "url = \"amqp://127.0.0.1\"\nexchange = \"partner.rules\"\nrouting_key = \"rules.{subject}\"\n";

fn unique(what: &str) -> String {
    format!("ess-test-{what}-{:08x}", rand::random::<u32>())
}

#[test]
fn config_parses_with_defaults_and_refuses_unknown_keys() {
    let c = config(MINIMAL);
    assert_eq!(c.vhost, "/");
    assert!(c.mandatory);
    assert_eq!(c.timeout_ms, 10_000);
    assert_eq!(c.heartbeat_secs, 30);
    assert!(c.validate("sinks.a").is_empty());
    let e = toml::from_str::<AmqpConfig>(&format!("{MINIMAL}exchnage = \"x\"\n")).unwrap_err();
    assert!(e.to_string().contains("unknown field `exchnage`"), "{e}");
}

#[test]
fn urls_are_checked() {
    let broker = parse_url("amqps://rabbit.example").unwrap();
    assert_eq!((broker.port, broker.tls), (5671, true));
    assert_eq!(parse_url("amqp://h:1234").unwrap().port, 1234);
    for (url, says) in [
        ("http://h", "must start with amqp://"),
        ("amqp://u:p@h", "credentials"),
        ("amqp://h/vhost", "vhost"),
    ] {
        let e = parse_url(url).unwrap_err();
        assert!(e.contains(says), "{url}: {e}");
    }
}

#[test]
fn validate_names_every_problem_by_key() {
    let c = config(
        "url = \"amqp://h\"\nexchange = \"bad exchange/{id}\"\nrouting_key = \"{nope}\"\n\
         vhost = \"\"\npassword = { env = \"P\" }\nca_file = \"ca.pem\"\ntimeout_ms = 0\n\
         heartbeat_secs = 1\nreconnect_initial_ms = 50\nreconnect_max_ms = 10\n\
         username = { file = \"u\", env = \"U\" }\n",
    );
    let keys: Vec<String> = c.validate("sinks.a").into_iter().map(|p| p.key).collect();
    for key in [
        "sinks.a.exchange",
        "sinks.a.routing_key",
        "sinks.a.vhost",
        "sinks.a.username",
        "sinks.a.ca_file",
        "sinks.a.timeout_ms",
        "sinks.a.heartbeat_secs",
        "sinks.a.reconnect_max_ms",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    let c = config(&format!("{MINIMAL}password = {{ env = \"P\" }}\n"));
    let problems = c.validate("sinks.a");
    assert_eq!(problems[0].key, "sinks.a.password");
    assert!(problems[0].message.contains("needs a username"));
}

#[test]
fn messages_carry_id_headers_and_persistence() {
    let sink = AmqpSink::new(&config(MINIMAL), "a").unwrap();
    let messages = sink
        .publishing
        .messages(&event(), &json!({"rule": "R7"}))
        .unwrap();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.exchange, "partner.rules");
    assert_eq!(m.routing_key, "rules.RULE-7");
    assert_eq!(m.payload, br#"{"rule":"R7"}"#);
    let p = &m.properties;
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("evt-1"));
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    let headers = p.headers().as_ref().unwrap().inner();
    let text = |name: &str| match headers.get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(text("ess-event-type"), "rule.updated");
    assert_eq!(text("ess-subject"), "RULE-7");
    assert_eq!(text("ess-route"), "cases");
    assert_eq!(
        headers.get("ess-event-version"),
        Some(&AMQPValue::LongLongInt(2))
    );
    assert_eq!(
        headers.get("ess-revision"),
        Some(&AMQPValue::LongLongInt(3))
    );
    assert!(!headers.contains_key("ess-record"));
}

#[test]
fn arrays_give_one_message_per_element_and_bad_names_fail_before_publishing() {
    let c =
        config("url = \"amqp://h\"\nexchange = \"ex.{output.kind}\"\nrouting_key = \"{index}\"\n");
    let sink = AmqpSink::new(&c, "a").unwrap();
    let messages = sink
        .publishing
        .messages(&event(), &json!([{"kind": "a"}, "plain text"]))
        .unwrap_err();
    // The second element has no `kind`: nothing of the event is published.
    assert!(!messages.is_retryable());
    assert!(
        messages
            .to_string()
            .starts_with("record 1: cannot render the exchange")
    );
    let ok = sink
        .publishing
        .messages(&event(), &json!([{"kind": "a"}, {"kind": "b"}]))
        .unwrap();
    assert_eq!(ok[1].exchange, "ex.b");
    assert_eq!(ok[1].routing_key, "1");
    let headers = ok[1].properties.headers().as_ref().unwrap().inner();
    assert_eq!(headers.get("ess-record"), Some(&AMQPValue::LongLongInt(1)));
    let e = sink
        .publishing
        .messages(&event(), &json!({"kind": "a b"}))
        .unwrap_err();
    assert!(
        !e.is_retryable() && e.to_string().contains("exchange names"),
        "{e}"
    );
    // A string output is sent as text.
    let c = config(MINIMAL);
    let text = AmqpSink::new(&c, "a")
        .unwrap()
        .publishing
        .messages(&event(), &json!("a;b"))
        .unwrap();
    assert_eq!(text[0].payload, b"a;b");
    assert_eq!(
        text[0]
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("text/plain; charset=utf-8")
    );
}

#[test]
fn errors_are_classified_by_reply_code_and_stage() {
    let broker = parse_url("amqp://h").unwrap();
    let protocol = |kind, text: &str| -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, ShortString::from(text))).into()
    };
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPErrorKind as K, AMQPHardError as H, AMQPSoftError as S};
    let not_found = protocol(K::Soft(S::NOTFOUND), "NOT_FOUND - no exchange 'x'");
    let e = classify(&not_found, Stage::CheckExchange, &broker, "/", Some("x"));
    assert!(
        !e.is_retryable() && e.to_string().contains("\"x\" does not exist"),
        "{e}"
    );
    // On the shared channel the culprit is unknown: retried, and checked again.
    assert!(classify(&not_found, Stage::Publish, &broker, "/", Some("x")).is_retryable());
    let login = protocol(
        K::Soft(S::ACCESSREFUSED),
        "ACCESS_REFUSED - Login was refused",
    );
    let e = classify(&login, Stage::Connect, &broker, "/", None);
    assert!(
        !e.is_retryable() && e.to_string().contains("username and password"),
        "{e}"
    );
    let vhost = protocol(K::Hard(H::NOTALLOWED), "NOT_ALLOWED - vhost v not found");
    assert!(!classify(&vhost, Stage::Connect, &broker, "v", None).is_retryable());
    let forced = protocol(K::Hard(H::CONNECTIONFORCED), "CONNECTION_FORCED - shutdown");
    assert!(classify(&forced, Stage::Publish, &broker, "/", None).is_retryable());
    let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
    let e = classify(&io, Stage::Connect, &broker, "/", None);
    assert!(
        e.is_retryable() && e.to_string().contains("is the broker running"),
        "{e}"
    );
}

#[test]
fn building_reads_credentials_and_tls_files_but_connects_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("user"), "cases\n").unwrap();
    std::fs::write(dir.path().join("pass"), "s3cret\n").unwrap();
    let mut c = config(&format!(
        "{MINIMAL}username = {{ file = \"user\" }}\npassword = {{ file = \"pass\" }}\n"
    ));
    c.resolve_paths(dir.path());
    let sink = AmqpSink::new(&c, "a").unwrap();
    assert!(!format!("{sink:?}").contains("s3cret"));
    assert_eq!(sink.uri.authority.userinfo.username, "cases");
    c.password.as_mut().unwrap().file = Some(dir.path().join("missing"));
    let e = AmqpSink::new(&c, "a").unwrap_err();
    assert!(e.starts_with("password: cannot read secret file"), "{e}");
    let mut c = config(&MINIMAL.replace("amqp://", "amqps://"));
    c.ca_file = Some("nope.pem".into());
    c.resolve_paths(dir.path());
    let e = AmqpSink::new(&c, "a").unwrap_err();
    assert!(e.starts_with("TLS: cannot read"), "{e}");
}

#[tokio::test]
async fn nothing_listening_is_retryable_and_backs_off() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = config(&format!(
        "url = \"amqp://127.0.0.1:{port}\"\nexchange = \"\"\nrouting_key = \"q\"\n\
         reconnect_initial_ms = 60000\nreconnect_max_ms = 60000\n"
    ));
    let sink = AmqpSink::new(&c, "a").unwrap();
    let e = sink.apply(&event(), &json!({})).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("is the broker running"), "{e}");
    // Within the backoff the last error comes back without a new attempt.
    let started = std::time::Instant::now();
    let again = sink.healthcheck().await.unwrap_err();
    assert_eq!(again, e);
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// The shared RabbitMQ on 127.0.0.1:5672: what the broker itself answers.
async fn shared_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("the shared RabbitMQ on 127.0.0.1:5672");
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

#[tokio::test]
async fn the_broker_confirms_refuses_and_returns_as_classified() {
    let (_conn, admin) = shared_channel().await;
    let exchange = unique("ex");
    let queue = unique("q");
    admin
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    admin
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "bound".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let sink_for = |exchange: &str, key: &str| {
        AmqpSink::new(
            &config(&format!(
                "url = \"amqp://127.0.0.1:5672\"\nexchange = \"{exchange}\"\nrouting_key = \
                 \"{key}\"\n"
            )),
            "a",
        )
        .unwrap()
    };

    let sink = sink_for(&exchange, "bound");
    sink.healthcheck().await.unwrap();
    sink.apply(&event(), &json!({"n": 1})).await.unwrap();
    let got = admin
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the confirmed message is in the queue");
    assert_eq!(got.delivery.data, br#"{"n":1}"#);
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("evt-1")
    );

    // Unroutable with the mandatory flag: a permanent failure that says to bind a queue.
    let e = sink_for(&exchange, "nobody")
        .apply(&event(), &json!({}))
        .await
        .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("bind a queue"), "{e}");

    // A missing exchange: permanent, named; and the sink's other publishes go on.
    let missing = unique("missing");
    let sink = sink_for("{output.ex}", "bound");
    let e = sink
        .apply(&event(), &json!({"ex": missing}))
        .await
        .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
    sink.apply(&event(), &json!({"ex": exchange}))
        .await
        .unwrap();

    // A wrong password: permanent, says what to check.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p"), "wrong").unwrap();
    let mut c = config(&format!(
        "url = \"amqp://127.0.0.1:5672\"\nexchange = \"{exchange}\"\nrouting_key = \"bound\"\n\
         username = {{ env = \"USER_THAT_IS_NOT_SET_{queue}\" }}\n"
    ));
    c.username = Some(crate::settings::SecretSource {
        file: Some(dir.path().join("p")),
        env: None,
        credential: None,
    });
    c.password = c.username.clone();
    let e = AmqpSink::new(&c, "a")
        .unwrap()
        .healthcheck()
        .await
        .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("username and password"), "{e}");

    admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = admin
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}
