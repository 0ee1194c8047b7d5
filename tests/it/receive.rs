//! Receiving events: authentication, validation, durability and acknowledgement.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ess_agent::http_client::ClientTls;
use http::{Method, StatusCode, Version};
use serde_json::{Value, json};

use crate::support::{
    self, Agent, SECRET, Tmpfs, admin_get, event_body, plain, post_event, request, signed_headers,
    unix_now,
};

const EVENTS: &str = "/v1/events";

#[tokio::test]
async fn signed_event_is_accepted_stored_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "");
    let client = plain();

    let reply = post_event(&client, &agent, "evt-1").await.unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert_eq!(reply.body, json!({"ack": "evt-1", "status": "accepted"}));

    // No route is configured: the event is kept as a dead letter ("parked"), never lost.
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event final" && v["event_id"] == "evt-1"
        })
        .expect("the event reached a final state");
    let stored = admin_get(&agent, "/v1/events/evt-1").await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(stored.body["id"], "evt-1");
    assert_eq!(stored.body["type"], "rule.updated");
    assert_eq!(stored.body["subject"], "S1");
    assert_eq!(stored.body["state"], "parked");
    assert!(stored.body["error"].as_str().unwrap().contains("no route"));

    let again = post_event(&client, &agent, "evt-1").await.unwrap();
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["ack"], "evt-1");
    assert_eq!(again.body["status"], "duplicate");
    assert_eq!(again.body["state"], "parked");
    assert_eq!(agent.journal_ids(), vec!["evt-1"]);

    let unknown = admin_get(&agent, "/v1/events/nope").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.body["code"], "unknown_event");

    // Ids with characters that need escaping in a path are reachable percent-encoded.
    let reply = post_event(&client, &agent, "a b/c").await.unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let stored = admin_get(&agent, "/v1/events/a%20b%2Fc").await;
    assert_eq!(stored.body["id"], "a b/c");
}

#[tokio::test]
async fn every_standard_webhooks_vector_authenticates_through_the_agent() {
    let vectors: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/standard-webhooks-vectors.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut extra = String::from("[auth]\ntimestamp_tolerance_secs = 4000000000\nhmac_secrets = [");
    for (i, v) in vectors["hmac_sha256_v1"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("secret{i}"));
        std::fs::write(&path, v["secret"].as_str().unwrap()).unwrap();
        extra.push_str(&format!("{{ file = {:?} }},", path.display().to_string()));
    }
    extra.push_str("]\ned25519_public_keys = [");
    for (i, v) in vectors["ed25519_v1a"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("pk{i}"));
        std::fs::write(&path, v["public_key"].as_str().unwrap()).unwrap();
        extra.push_str(&format!("{{ file = {:?} }},", path.display().to_string()));
    }
    extra.push_str("]\n");
    let agent = Agent::start(dir.path(), &extra);
    let client = plain();
    let all = vectors["hmac_sha256_v1"]
        .as_array()
        .unwrap()
        .iter()
        .chain(vectors["ed25519_v1a"].as_array().unwrap());
    for v in all {
        let headers = |signature: &str| {
            vec![
                ("webhook-id", v["id"].as_str().unwrap().to_string()),
                ("webhook-timestamp", v["timestamp"].to_string()),
                ("webhook-signature", signature.to_string()),
                ("content-type", "application/json".to_string()),
            ]
        };
        let body = v["body"].as_str().unwrap().to_string();
        let signature = v["signature"].as_str().unwrap();
        // Authentic: the vector bodies are not Change Events, so the envelope check answers.
        let reply = request(
            &client,
            Method::POST,
            &agent.url(EVENTS),
            &headers(signature),
            body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{v}: {:?}",
            reply.body
        );
        assert_eq!(reply.body["code"], "missing_field");
        // A decoy list with the real one among them still verifies.
        let decoys = format!("v1,Zm9v v9,xxx v1, {signature}");
        let reply = request(
            &client,
            Method::POST,
            &agent.url(EVENTS),
            &headers(&decoys),
            body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "decoys: {:?}",
            reply.body
        );
        // Decoys alone, or the body changed by one byte, do not.
        let reply = request(
            &client,
            Method::POST,
            &agent.url(EVENTS),
            &headers("v1,Zm9v v9,xxx v1,"),
            body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        let mut changed = body.clone().into_bytes();
        changed[2] ^= 1;
        let reply = request(
            &client,
            Method::POST,
            &agent.url(EVENTS),
            &headers(signature),
            changed,
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    assert!(agent.journal_ids().is_empty());
}

#[tokio::test]
async fn forged_or_stale_deliveries_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let extra = format!(
        "[auth]\nhmac_secrets = [{{ file = {:?} }}]\nbearer_token = {{ file = {:?} }}\n",
        dir.path().join("hub-secret").display().to_string(),
        token_file.display().to_string()
    );
    std::fs::write(dir.path().join("hub-secret"), SECRET).unwrap();
    let agent = Agent::start(dir.path(), &extra);
    let client = plain();
    let url = agent.url(EVENTS);
    let body = event_body("e1", "S", json!({}));
    let bearer = ("authorization", "Bearer s3cret-token".to_string());
    let send = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            request(&client, Method::POST, &url, &headers, body)
                .await
                .unwrap()
        }
    };

    let with = |ts: i64, extra: Option<(&'static str, String)>| {
        let mut h = signed_headers("e1", ts, &body);
        h.extend(extra);
        h
    };
    // Correct signature and token: accepted (checked last, to show the refusals are specific).
    for (name, headers, code) in [
        (
            "330 s old",
            with(unix_now() - 330, Some(bearer.clone())),
            "timestamp_out_of_tolerance",
        ),
        (
            // Well beyond the tolerance, so that a slow machine sending it a few seconds after
            // the timestamp was taken does not bring it back within (the boundary is tested
            // on its own).
            "330 s ahead",
            with(unix_now() + 330, Some(bearer.clone())),
            "timestamp_out_of_tolerance",
        ),
        ("no bearer", with(unix_now(), None), "missing_bearer_token"),
        (
            "wrong bearer",
            with(unix_now(), Some(("authorization", "Bearer wrong".into()))),
            "invalid_bearer_token",
        ),
    ] {
        let reply = send(headers, body.clone()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(reply.body["code"], code, "{name}: {:?}", reply.body);
        assert_eq!(
            reply.headers["content-type"], "application/problem+json",
            "{name}"
        );
        assert!(!reply.body["detail"].as_str().unwrap().is_empty());
    }
    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let headers: Vec<_> = with(unix_now(), Some(bearer.clone()))
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let reply = send(headers, body.clone()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "without {missing}");
    }
    let mut changed = body.clone();
    changed[5] ^= 1;
    let reply = send(with(unix_now(), Some(bearer.clone())), changed).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.body["code"], "invalid_signature");
    // The same JSON re-serialised differently is a different byte string: refused.
    let reformatted =
        serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&body).unwrap()).unwrap();
    let reply = send(with(unix_now(), Some(bearer.clone())), reformatted).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    assert!(
        agent.journal_ids().is_empty(),
        "a refused delivery was stored"
    );
    // svix-* aliases, within tolerance, with the token: accepted.
    let aliased: Vec<_> = with(unix_now() - 299, Some(bearer.clone()))
        .into_iter()
        .map(|(k, v)| match k {
            "webhook-id" => ("svix-id", v),
            "webhook-timestamp" => ("svix-timestamp", v),
            "webhook-signature" => ("svix-signature", v),
            other => (other, v),
        })
        .collect();
    let reply = send(aliased, body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert_eq!(agent.journal_ids(), vec!["e1"]);
}

#[tokio::test]
async fn malformed_requests_get_problem_details_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 0\nmax_body_bytes = 2048\n",
    );
    let client = plain();
    let url = agent.url(EVENTS);
    // (name, body, content type, expected status, expected code, field named)
    type Case<'a> = (
        &'a str,
        Vec<u8>,
        &'a str,
        StatusCode,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "not json",
            b"{\"id\": ".to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_json",
            None,
        ),
        (
            "array",
            b"[1]".to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "not_an_object",
            None,
        ),
        (
            "no id",
            br#"{"version":1,"payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "missing_field",
            Some("id"),
        ),
        (
            "empty id",
            br#"{"id":"","version":1,"payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("id"),
        ),
        (
            "numeric id",
            br#"{"id":7,"version":1,"payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("id"),
        ),
        (
            "no version",
            br#"{"id":"x","payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "missing_field",
            Some("version"),
        ),
        (
            "string version",
            br#"{"id":"x","version":"1","payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("version"),
        ),
        (
            "zero version",
            br#"{"id":"x","version":0,"payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("version"),
        ),
        (
            "no payload",
            br#"{"id":"x","version":1}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "missing_field",
            Some("payload"),
        ),
        (
            "negative revision",
            br#"{"id":"x","version":1,"revision":-1,"payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("revision"),
        ),
        (
            "bad time",
            br#"{"id":"x","version":1,"time":"yesterday","payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("time"),
        ),
        (
            "numeric type",
            br#"{"id":"x","version":1,"type":3,"payload":{}}"#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            Some("type"),
        ),
        (
            "xml",
            b"<event/>".to_vec(),
            "application/xml",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        (
            "oversize",
            event_body("big", "S", json!("x".repeat(4096))),
            "application/json",
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            None,
        ),
    ];
    for (name, body, content_type, status, code, field) in cases {
        let mut headers = signed_headers("m", unix_now(), &body);
        headers.retain(|(k, _)| *k != "content-type");
        headers.push(("content-type", content_type.to_string()));
        let reply = request(&client, Method::POST, &url, &headers, body)
            .await
            .unwrap();
        assert_eq!(reply.status, status, "{name}: {:?}", reply.body);
        assert_eq!(
            reply.headers["content-type"], "application/problem+json",
            "{name}"
        );
        assert_eq!(reply.body["code"], code, "{name}: {:?}", reply.body);
        assert_eq!(reply.body["status"], status.as_u16(), "{name}");
        let detail = reply.body["detail"].as_str().unwrap_or_default();
        if let Some(field) = field {
            assert_eq!(reply.body["field"], field, "{name}: {:?}", reply.body);
            assert!(
                detail.contains(field),
                "{name}: detail {detail:?} does not name {field}"
            );
        }
    }
    // No Content-Type at all.
    let body = event_body("x", "S", json!({}));
    let mut headers = signed_headers("m", unix_now(), &body);
    headers.retain(|(k, _)| *k != "content-type");
    let reply = request(&client, Method::POST, &url, &headers, body)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // An oversize body without Content-Length (chunked) is cut off at the limit too.
    let mut head = String::from(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n",
    );
    for (k, v) in signed_headers("m", unix_now(), b"") {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    let mut parts: Vec<&[u8]> = vec![head.as_bytes()];
    parts.extend(std::iter::repeat_n(chunk.as_bytes(), 64));
    let answer = support::raw_exchange(agent.ingress, &parts).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    assert!(agent.journal_ids().is_empty());
}

#[tokio::test]
async fn cloudevents_structured_and_binary_are_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "");
    let client = plain();
    let url = agent.url(EVENTS);

    let structured = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": "ce-1", "type": "PolicyUpdated", "source": "hms-gov",
        "subject": "POL-7", "time": "2026-11-22T08:00:00Z", "dataversion": 3, "revision": 4,
        "datacontenttype": "application/json", "data": {"k": "v"}
    }))
    .unwrap();
    let mut headers = signed_headers("ce-1", unix_now(), &structured);
    headers.retain(|(k, _)| *k != "content-type");
    headers.push((
        "content-type",
        "application/cloudevents+json; charset=utf-8".into(),
    ));
    let reply = request(&client, Method::POST, &url, &headers, structured)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);

    let data = br#"{"k": "binary"}"#.to_vec();
    let mut headers = signed_headers("ce-2", unix_now(), &data);
    headers.extend([
        ("ce-specversion", "1.0".to_string()),
        ("ce-id", "ce-2".to_string()),
        ("ce-type", "rule.updated".to_string()),
        ("ce-source", "hms-gov".to_string()),
        ("ce-subject", "RULE-1".to_string()),
        ("ce-dataversion", "2".to_string()),
        ("ce-revision", "9".to_string()),
    ]);
    let reply = request(&client, Method::POST, &url, &headers, data)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);

    let conn = rusqlite::Connection::open(agent.state_dir.join("journal.sqlite3")).unwrap();
    let row = |id: &str| -> (String, i64, String, i64, String, Value) {
        conn.query_row(
            "SELECT type, version, subject, revision, format, envelope FROM events \
             JOIN event_bodies USING (seq) WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    serde_json::from_str(&r.get::<_, String>(5)?).unwrap(),
                ))
            },
        )
        .unwrap()
    };
    let (ty, version, subject, revision, format, envelope) = row("ce-1");
    assert_eq!(
        (ty.as_str(), version, subject.as_str(), revision),
        ("PolicyUpdated", 3, "POL-7", 4)
    );
    assert_eq!(format, "cloudevents_structured");
    assert_eq!(envelope["payload"], json!({"k": "v"}));
    assert_eq!(envelope["source"], "hms-gov");
    assert_eq!(envelope["time"], "2026-11-22T08:00:00Z");
    let (ty, version, subject, revision, format, envelope) = row("ce-2");
    assert_eq!(
        (ty.as_str(), version, subject.as_str(), revision),
        ("rule.updated", 2, "RULE-1", 9)
    );
    assert_eq!(format, "cloudevents_binary");
    assert_eq!(envelope["payload"], json!({"k": "binary"}));
}

#[tokio::test]
async fn tls_serves_http1_and_http2_and_enforces_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::tls::generate(dir.path());
    let extra = format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let agent = Agent::start(dir.path(), &extra);
    let url = agent.url(EVENTS);
    let good = ClientTls {
        ca_file: Some(&pki.ca),
        client_cert: Some((&pki.client_cert, &pki.client_key)),
    };

    // ALPN picks HTTP/2 when offered; an HTTP/1.1-only client gets HTTP/1.1.
    let client = support::http(&good);
    let body = event_body("tls-1", "S", json!({}));
    let reply = request(
        &client,
        Method::POST,
        &url,
        &signed_headers("tls-1", unix_now(), &body),
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.version, Version::HTTP_2);
    let h1 = support::http1_only(&good);
    let body = event_body("tls-2", "S", json!({}));
    let reply = request(
        &h1,
        Method::POST,
        &url,
        &signed_headers("tls-2", unix_now(), &body),
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.version, Version::HTTP_11);

    // No client certificate, or one from another CA: the handshake fails.
    for (name, tls) in [
        (
            "no client certificate",
            ClientTls {
                ca_file: Some(&pki.ca),
                client_cert: None,
            },
        ),
        (
            "wrong CA",
            ClientTls {
                ca_file: Some(&pki.ca),
                client_cert: Some((&pki.rogue_cert, &pki.rogue_key)),
            },
        ),
    ] {
        let client = support::http(&tls);
        let body = event_body("tls-x", "S", json!({}));
        let result = request(
            &client,
            Method::POST,
            &url,
            &signed_headers("tls-x", unix_now(), &body),
            body,
        )
        .await;
        assert!(
            result.is_err(),
            "{name}: expected a TLS failure, got {result:?}"
        );
    }
    assert_eq!(agent.journal_ids(), vec!["tls-1", "tls-2"]);
    // The journal keeps the client certificate's subject with how the delivery was
    // authenticated.
    let detail = support::admin_get(&agent, "/v1/events/tls-1").await.body;
    let receipt = &detail["receipt"];
    assert_eq!(
        receipt["methods"],
        json!(["standard_webhooks", "mtls"]),
        "{receipt}"
    );
    assert_eq!(
        receipt["client_certificate"]["subject"], "CN=hub.test",
        "{receipt}"
    );
    assert_eq!(receipt["webhook"]["id"], "tls-1");
}

#[tokio::test]
async fn client_name_allow_list_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::tls::generate(dir.path());
    let tls_section = |allowed: &str| {
        format!(
            "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_allowed_names = [{allowed:?}]\n",
            pki.server_cert.display().to_string(),
            pki.server_key.display().to_string(),
            pki.ca.display().to_string(),
        )
    };
    let tls = ClientTls {
        ca_file: Some(&pki.ca),
        client_cert: Some((&pki.client_cert, &pki.client_key)),
    };
    for (allowed, ok) in [("hub.test", true), ("other.test", false)] {
        let sub = tempfile::tempdir_in(dir.path()).unwrap();
        let agent = Agent::start(sub.path(), &tls_section(allowed));
        let body = event_body("n-1", "S", json!({}));
        let result = request(
            &support::http(&tls),
            Method::POST,
            &agent.url(EVENTS),
            &signed_headers("n-1", unix_now(), &body),
            body,
        )
        .await;
        assert_eq!(result.is_ok(), ok, "allowed {allowed}: {result:?}");
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 0\nheader_read_timeout_ms = 300\nbody_read_timeout_ms = 300\n",
    );
    // Half a request head, then silence: the connection is closed.
    let mut stream = tokio::net::TcpStream::connect(agent.ingress).await.unwrap();
    stream
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the agent kept a silent connection open");
    // A head, then half the body: 408.
    let body = event_body("slow", "S", json!({}));
    let mut stream = tokio::net::TcpStream::connect(agent.ingress).await.unwrap();
    let head = support::signed_head("slow", &body);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(agent.journal_ids().is_empty());
}

#[tokio::test]
async fn backpressure_refuses_with_retry_after() {
    // Backlog high-water mark of 2, and a partner endpoint that is down (so events stay in the
    // backlog): the third event is refused, never acknowledged.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/a.jsonata"), "payload").unwrap();
    let extra = format!(
        "adapters_dir = {:?}\n[[routes]]\nname = \"r\"\nadapter = \"a.jsonata\"\nsink = \"down\"\n\
         [sinks.down]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\nretry = {{ initial_ms = 60000 }}\n\
         [limits]\nmin_free_disk_bytes = 0\nbacklog_high_water = 2\nretry_after_secs = 7\n",
        dir.path().join("adapters").display().to_string()
    );
    let agent = Agent::start(dir.path(), &extra);
    let client = plain();
    for id in ["b1", "b2"] {
        assert_eq!(
            post_event(&client, &agent, id).await.unwrap().status,
            StatusCode::ACCEPTED
        );
    }
    let reply = post_event(&client, &agent, "b3").await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["code"], "backlog_full");
    assert_eq!(reply.headers["retry-after"], "7");
    drop(agent);

    // A free-disk minimum no disk can meet: refused with disk_low.
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 18446744073709551615\n",
    );
    let reply = post_event(&client, &agent, "d1").await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["code"], "disk_low");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(agent.journal_ids().is_empty());
}

#[tokio::test]
async fn full_disk_answers_503_never_2xx_and_the_agent_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(&dir.path().join("state"), "600k") else {
        return;
    };
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 0\nmax_body_bytes = 1048576\n",
    );
    let client = plain();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..400 {
        let id = format!("full-{i}");
        let body = event_body(&id, "S", json!("x".repeat(8 * 1024)));
        let reply = request(
            &client,
            Method::POST,
            &agent.url(EVENTS),
            &signed_headers(&id, unix_now(), &body),
            body,
        )
        .await
        .unwrap();
        match reply.status {
            StatusCode::ACCEPTED => accepted.push(id),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.body["code"], "journal_full", "{:?}", reply.body);
                assert!(reply.headers.contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    assert!(refused > 0, "the disk never filled up");
    assert!(!accepted.is_empty());
    // Still alive and answering.
    assert_eq!(admin_get(&agent, "/healthz").await.status, StatusCode::OK);
    // Every acknowledged event is stored, and nothing else.
    let stored: BTreeSet<_> = agent.journal_ids().into_iter().collect();
    let acked: BTreeSet<_> = accepted.into_iter().collect();
    assert_eq!(stored, acked);
}

/// Posts one 8 KiB event; returns the status and the problem code of a refusal.
async fn post_8k(agent: &Agent, id: &str) -> (StatusCode, Value, Option<String>) {
    let body = event_body(id, "S", json!("x".repeat(8 * 1024)));
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url(EVENTS),
        &signed_headers(id, unix_now(), &body),
        body,
    )
    .await
    .unwrap();
    let content_type = reply
        .headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (reply.status, reply.body, content_type)
}

#[tokio::test]
async fn a_journal_disk_that_fills_and_frees_refuses_with_503_then_accepts_again_by_itself() {
    // Without the free-disk guard the commit itself fails (ENOSPC: journal_full); with it the
    // agent refuses before the disk is full (disk_low).
    for (min_free, code) in [(0, "journal_full"), (400 * 1024, "disk_low")] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let Some(_fs) = Tmpfs::mount(&state, "2m") else {
            return;
        };
        // What the operator deletes once the disk is full.
        let ballast = state.join("ballast");
        std::fs::write(&ballast, vec![0u8; 1024 * 1024]).unwrap();
        let agent = Agent::start(
            dir.path(),
            &format!(
                "[limits]\nmin_free_disk_bytes = {min_free}\nmax_body_bytes = 1048576\n\
                 [journal]\ncheckpoint_interval_ms = 50\n"
            ),
        );
        let mut acked = BTreeSet::new();
        let mut refused = 0;
        for i in 0..400 {
            let id = format!("fill-{i}");
            let (status, body, content_type) = post_8k(&agent, &id).await;
            match status {
                StatusCode::ACCEPTED => {
                    acked.insert(id);
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_eq!(body["code"], code, "{body:?}");
                    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
                    refused += 1;
                    if refused == 5 {
                        break;
                    }
                }
                other => panic!("{code}: unexpected {other}: {body:?}"),
            }
        }
        assert_eq!(refused, 5, "{code}: the disk never filled up");

        // Space is freed: the agent accepts again on its own, with no restart.
        std::fs::remove_file(&ballast).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        loop {
            let id = format!("after-{n}");
            n += 1;
            let (status, body, _) = post_8k(&agent, &id).await;
            if status == StatusCode::ACCEPTED {
                acked.insert(id);
                break;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
            assert!(
                std::time::Instant::now() < deadline,
                "{code}: still refused after space was freed: {body:?}"
            );
            // Polling, as the hub retries after Retry-After: the agent notices the space at its
            // next commit or free-space check.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 0..20 {
            let id = format!("resumed-{i}");
            let (status, body, _) = post_8k(&agent, &id).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{code}: {body:?}");
            acked.insert(id);
        }
        assert_eq!(admin_get(&agent, "/healthz").await.status, StatusCode::OK);
        // Every acknowledged event is stored, and nothing that was refused.
        let stored: BTreeSet<_> = agent.journal_ids().into_iter().collect();
        assert_eq!(stored, acked, "{code}");
    }
}

/// Sends signed events from `clients` concurrent connections until `stop`; returns the ids that
/// got a 2xx.
async fn load(
    agent_url: String,
    clients: usize,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = agent_url.clone();
        let stop = stop.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let client = plain();
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 5000 {
                let id = format!("{prefix}-{c}-{n}");
                n += 1;
                let body = event_body(&id, &format!("S{c}"), json!({"n": n}));
                let headers = signed_headers(&id, unix_now(), &body);
                match request(&client, Method::POST, &url, &headers, body).await {
                    Ok(reply) if reply.status.is_success() => acked.push(id),
                    Ok(_) => {}
                    // The agent is gone: stop this client.
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::config_text(dir.path(), "");
    let mut total_acked = BTreeSet::new();
    // Several kill points: after a few, a few dozen and a few hundred commits.
    for (round, kill_after) in [5u64, 40, 200].into_iter().enumerate() {
        let mut agent = Agent::start_with(dir.path(), &config);
        let stop = Arc::new(AtomicBool::new(false));
        let loader = tokio::spawn(load(
            agent.url(EVENTS),
            8,
            format!("r{round}"),
            stop.clone(),
        ));
        // Kill once the agent has acknowledged enough (read from its access log).
        let acked_enough = agent.wait_for_log(Duration::from_secs(30), {
            let mut seen = 0u64;
            move |v| {
                if v["status"] == 202 {
                    seen += 1;
                }
                seen >= kill_after
            }
        });
        assert!(
            acked_enough.is_some(),
            "round {round}: too few events acknowledged"
        );
        agent.kill9();
        stop.store(true, Ordering::Relaxed);
        let acked = loader.await.unwrap();
        assert!(
            acked.len() as u64 >= kill_after / 2,
            "round {round}: {} acked",
            acked.len()
        );
        total_acked.extend(acked);
        drop(agent);
        // After restart every acknowledged id is in the journal.
        let agent = Agent::start_with(dir.path(), &config);
        let stored: BTreeSet<_> = agent.journal_ids().into_iter().collect();
        let missing: Vec<_> = total_acked.difference(&stored).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but lost: {missing:?}"
        );
        assert_eq!(
            admin_get(&agent, "/readyz").await.status,
            StatusCode::OK,
            "round {round}: not ready after restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), "[shutdown]\ngrace_period_secs = 10\n");
    let stop = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(load(agent.url(EVENTS), 8, "t".into(), stop.clone()));
    assert!(
        agent
            .wait_for_log(Duration::from_secs(30), {
                let mut seen = 0;
                move |v| {
                    if v["status"] == 202 {
                        seen += 1;
                    }
                    seen >= 50
                }
            })
            .is_some()
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .expect("did not exit within the grace period");
    assert!(status.success(), "exit status {status:?}");
    stop.store(true, Ordering::Relaxed);
    let acked: BTreeSet<_> = loader.await.unwrap().into_iter().collect();
    let stored: BTreeSet<_> = agent.journal_ids().into_iter().collect();
    let missing: Vec<_> = acked.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert!(agent.log_text().contains("the journal is closed"));
}

#[test]
fn validate_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(support::binary())
            .args(["validate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = support::config_text(dir.path(), "");
    assert_eq!(run(&base).0, Some(0), "{}", run(&base).1);

    let (code, err) = run(&format!("{base}\n[journal]\nmax_btch = 5\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains("journal") && err.contains("max_btch"), "{err}");

    let (code, err) = run(&base.replace("hub-secret", "no-such-secret"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("auth.hmac_secrets[0]") && err.contains("no-such-secret"),
        "{err}"
    );

    let public = "agent_id = \"p\"\nstate_dir = \"s\"\n[ingress]\nlisten = \"0.0.0.0:8787\"\n";
    let (code, err) = run(public);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("auth:") && err.contains("ingress.tls:"),
        "{err}"
    );

    // Every problem is listed, not only the first.
    let two = "agent_id = \"\"\nstate_dir = \"s\"\n[limits]\nmax_body_bytes = 0\n";
    let (code, err) = run(two);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("agent_id") && err.contains("limits.max_body_bytes"),
        "{err}"
    );
}

#[test]
fn validate_and_run_name_every_problem_in_one_go() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.jsonata"), "$").unwrap();
    let extra = format!(
        "adapters_dir = {:?}\n\
         [journal]\nmax_btch = 5\n\
         [[routes]]\nname = \"r\"\nadapter = \"a.jsonata\"\nsink = \"files\"\nversions = \"3-1\"\n\
         [sinks.files]\ntype = \"file\"\ndir = 3\nname = \"{{id}}.json\"\n",
        dir.path().display().to_string()
    );
    let text = support::config_text(dir.path(), &extra).replace("hub-secret", "no-such-secret");
    let path = dir.path().join("ess-agent.toml");
    std::fs::write(&path, text).unwrap();
    let expected = [
        ("sinks.files", "invalid type: integer `3`"),
        ("journal.max_btch", "unknown field `max_btch`"),
        ("routes[0].versions", "3-1"),
        ("auth.hmac_secrets[0]", "no-such-secret"),
    ];
    for command in ["validate", "run"] {
        let out = std::process::Command::new(support::binary())
            .args([command, "--config"])
            .arg(&path)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        for (key, words) in expected {
            assert!(
                err.lines()
                    .any(|l| l.contains(&format!("{key}: ")) && l.contains(words)),
                "{command} does not name {key} ({words}):\n{err}"
            );
        }
        // A route whose sink did not parse is not also told that the sink does not exist.
        assert!(!err.contains("routes[0].sink"), "{command}: {err}");
    }
    assert!(!dir.path().join("state").exists(), "run started anyway");
}

#[tokio::test]
async fn an_hmac_secret_given_as_a_systemd_credential_authenticates_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    // systemd writes credentials read-only; the content is the hub's secret, with a newline.
    std::fs::write(credentials.join("hub-hmac"), format!("{SECRET}\n")).unwrap();
    let config = support::config_text(
        dir.path(),
        "[auth]\nhmac_secrets = [{ credential = \"hub-hmac\" }]\n",
    );
    let path = dir.path().join("ess-agent.toml");
    std::fs::write(&path, config).unwrap();

    // Outside systemd there is no credentials directory: the agent refuses to start, saying so.
    let out = std::process::Command::new(support::binary())
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("auth.hmac_secrets[0]: credential hub-hmac: CREDENTIALS_DIRECTORY is not set"),
        "{err}"
    );

    let agent = Agent::start_config(
        &path,
        &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())],
    );
    let client = plain();
    let reply = post_event(&client, &agent, "cred-1").await.unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    // The credential is the secret in force: a delivery signed with another is refused.
    let body = event_body("cred-2", "S", json!({}));
    let mut headers = signed_headers("cred-2", unix_now(), &body);
    for (name, value) in &mut headers {
        if *name == "webhook-signature" {
            *value = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
        }
    }
    let reply = request(&client, Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{:?}", reply.body);
    assert_eq!(agent.journal_ids(), vec!["cred-1"]);
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = ess_agent::config::Config::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(config.validate().is_empty());
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

#[tokio::test]
async fn the_embedded_default_runs_and_send_delivers() {
    // The shipped configuration, laid out as in the repository (config/, adapters/), with only
    // the listeners moved to free ports so that tests can run side by side.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(config_dir.join("dev")).unwrap();
    std::fs::copy(
        root.join("config/dev/hub-secret"),
        config_dir.join("dev/hub-secret"),
    )
    .unwrap();
    std::os::unix::fs::symlink(root.join("adapters"), dir.path().join("adapters")).unwrap();
    let shipped = std::fs::read_to_string(root.join("config/ess-agent.toml")).unwrap();
    let text = shipped
        .replace("127.0.0.1:8787", "127.0.0.1:0")
        .replace("127.0.0.1:8788", "127.0.0.1:0");
    let config_path = config_dir.join("ess-agent.toml");
    std::fs::write(&config_path, text).unwrap();
    let agent = Agent::start_config(&config_path, &[]);

    // The court deadline fixture, sent with `ess-agent send` as an operator would.
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root.join("adapters/court-calendar.tests/deadline-moved-to-1600.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let event = &fixture["event"];
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, event["payload"].to_string()).unwrap();
    let secret = config_dir.join("dev/hub-secret");
    let out = std::process::Command::new(support::binary())
        .args(["send", "--url", &agent.url(EVENTS), "--secret-file"])
        .arg(&secret)
        .args([
            "--id",
            event["id"].as_str().unwrap(),
            "--type",
            "rule.updated",
        ])
        .args([
            "--subject",
            "RULE-COURT-DEADLINE",
            "--revision",
            "7",
            "--source",
            "courts-gov",
        ])
        .arg("--payload")
        .arg(&payload)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("202"), "{stdout}");
    assert!(stdout.contains("\"accepted\""), "{stdout}");
    let id = event["id"].as_str().unwrap();
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event final" && v["event_id"] == id
        })
        .expect("the event was applied");
    let stored = admin_get(&agent, &format!("/v1/events/{id}")).await;
    assert_eq!(stored.body["state"], "applied", "{:?}", stored.body);

    // It lands as the fixture's expected record (written for another partner id).
    let file = dir.path().join(format!(
        "out/court-calendar/RULE-COURT-DEADLINE/{id}-0.json"
    ));
    let written: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut expected = fixture["expect"].clone();
    expected["updated_by"] = json!("dev-partner");
    assert_eq!(written, expected);
    // And the law firm's calendar gets its CSV line.
    let csv = std::fs::read_to_string(dir.path().join(format!("out/law-firm-calendar/{id}.csv")))
        .unwrap();
    assert!(
        csv.contains("IL-COOK-CIRCUIT") && csv.contains("dev-partner"),
        "{csv}"
    );

    // --test is a dry run: answered with the outputs, not stored, nothing written.
    let out = std::process::Command::new(support::binary())
        .args(["send", "--url", &agent.url(EVENTS), "--secret-file"])
        .arg(&secret)
        .args([
            "--id",
            "dry-1",
            "--type",
            "rule.updated",
            "--test",
            "--payload",
        ])
        .arg(&payload)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("dry_run") && stdout.contains("court-calendar-v1"),
        "{stdout}"
    );
    assert_eq!(agent.journal_ids(), vec![id.to_string()]);
}

/// A Change Event whose object and payload nest `depth` levels of arrays and objects in all.
fn nested_event(id: &str, depth: usize) -> Vec<u8> {
    let inner = depth - 1;
    format!(
        "{{\"id\":\"{id}\",\"version\":1,\"type\":\"deep\",\"payload\":{}{}}}",
        "[".repeat(inner),
        "]".repeat(inner)
    )
    .into_bytes()
}

#[tokio::test]
async fn deep_nesting_is_applied_up_to_the_limit_and_refused_as_too_deep_beyond() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/all.jsonata"), "$").unwrap();
    let extra = format!(
        "adapters_dir = {:?}\n[[routes]]\nname = \"all\"\nadapter = \"all.jsonata\"\nsink = \"files\"\n\
         [sinks.files]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
        dir.path().join("adapters").display().to_string(),
        dir.path().join("out").display().to_string()
    );
    let agent = Agent::start(dir.path(), &extra);
    let client = plain();
    let send = |id: &'static str, depth: usize| {
        let client = client.clone();
        let url = agent.url(EVENTS);
        async move {
            let body = nested_event(id, depth);
            let headers = signed_headers(id, unix_now(), &body);
            request(&client, Method::POST, &url, &headers, body)
                .await
                .unwrap()
        }
    };

    // At the default limit: received, run through the adapter and written by the sink.
    let reply = send("at-limit", 64).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            support::applied_line(v) && v["event_id"] == "at-limit"
        })
        .unwrap_or_else(|| panic!("not applied; log:\n{}", agent.log_text()));
    let written: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/at-limit.json")).unwrap())
            .unwrap();
    let mut level = &written["payload"];
    let mut depth = 1;
    while let Some(inner) = level.as_array().and_then(|a| a.first()) {
        level = inner;
        depth += 1;
    }
    assert_eq!(depth, 63, "the payload's nesting arrived whole");

    // One level more, and valid JSON far deeper than the JSON parser's own limit: too deep,
    // with the depth, the limit and the setting in the answer; nothing stored.
    for (id, depth) in [("one-more", 65), ("far-deeper", 10_000)] {
        let reply = send(id, depth).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{id}");
        assert_eq!(reply.body["code"], "too_deep", "{id}: {:?}", reply.body);
        let detail = reply.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("{depth} levels deep"))
                && detail.contains("limit of 64")
                && detail.contains("limits.max_json_depth"),
            "{detail}"
        );
    }
    assert_eq!(agent.journal_ids(), vec!["at-limit"]);
    assert_eq!(admin_get(&agent, "/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn timestamp_tolerance_is_enforced_both_ways_at_the_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[auth]\nhmac_secrets = [{{ file = {:?} }}]\ntimestamp_tolerance_secs = 60\n",
        dir.path().join("hub-secret").display().to_string()
    );
    std::fs::write(dir.path().join("hub-secret"), SECRET).unwrap();
    let agent = Agent::start(dir.path(), &extra);
    let client = plain();
    let mut n = 0;
    // (offset of the timestamp from the clock, accepted)
    for (offset, accepted) in [(-61, false), (61, false), (-60, true), (60, true)] {
        // The agent compares whole seconds: a probe counts only when the clock's second did not
        // change while it was sent, so that the agent saw the same second as the test.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let reply = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no probe within a second"
            );
            n += 1;
            let id = format!("t{n}");
            let body = event_body(&id, "S", json!({}));
            let before = unix_now();
            let headers = signed_headers(&id, before + offset, &body);
            let reply = request(&client, Method::POST, &agent.url(EVENTS), &headers, body)
                .await
                .unwrap();
            if unix_now() == before {
                break reply;
            }
        };
        if accepted {
            assert_eq!(
                reply.status,
                StatusCode::ACCEPTED,
                "{offset}: {:?}",
                reply.body
            );
        } else {
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{offset}");
            assert_eq!(reply.body["code"], "timestamp_out_of_tolerance", "{offset}");
            let direction = if offset < 0 {
                "in the past"
            } else {
                "in the future"
            };
            let detail = reply.body["detail"].as_str().unwrap();
            assert!(
                detail.contains(&format!("61 s {direction}")) && detail.contains("60 s tolerance"),
                "{detail}"
            );
        }
    }
}
