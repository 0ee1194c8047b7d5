//! Connection-level abuse: silent, trickling and idle connections, the connection limit, and the
//! answers hyper makes by itself for requests it cannot parse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    self, Agent, event_body, plain, raw_exchange, request, signed_headers, unix_now,
};

const EVENTS: &str = "/v1/events";

/// How long a test waits for the agent to close a connection it should close: far above the
/// configured timeouts, far below what a connection that is never closed would take.
const CLOSE_BOUND: Duration = Duration::from_secs(8);

/// The HTTP/2 connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Waits until the agent closes `stream`, reading and discarding what it sends. Returns how
/// long that took, or None if it is still open after `bound`.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Opens a connection and sends `first` (possibly nothing).
async fn open_with(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    if !first.is_empty() {
        stream.write_all(first).await.expect("write");
    }
    stream
}

/// A signed delivery; returns its status, or the transport error.
async fn deliver(agent: &Agent, id: &str) -> Result<StatusCode, String> {
    let body = event_body(id, "S", json!({"n": id}));
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url(EVENTS),
        &signed_headers(id, unix_now(), &body),
        body,
    )
    .await?;
    Ok(reply.status)
}

#[tokio::test]
async fn silent_trickling_and_idle_connections_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 0\nheader_read_timeout_ms = 500\n",
    );
    // Nothing at all, one byte (not enough to tell HTTP/1 from HTTP/2), half an HTTP/1 head,
    // and the HTTP/2 preface with no request.
    let mut silent = open_with(agent.ingress, b"").await;
    let mut one_byte = open_with(agent.ingress, b"P").await;
    let mut half_head = open_with(agent.ingress, b"POST /v1/events HTTP/1.1\r\nHost: x\r\n").await;
    let mut h2_preface = open_with(agent.ingress, H2_PREFACE).await;
    for (name, stream) in [
        ("silent", &mut silent),
        ("one byte", &mut one_byte),
        ("half a head", &mut half_head),
        ("HTTP/2 preface", &mut h2_preface),
    ] {
        assert!(
            closed_within(stream, CLOSE_BOUND).await.is_some(),
            "the agent kept a {name} connection open"
        );
    }

    // A slow-loris client: a byte of a valid head every 100 ms is cut off, though it is never
    // silent for long.
    let mut loris = TcpStream::connect(agent.ingress).await.unwrap();
    let head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let start = Instant::now();
    let mut cut_off = false;
    for byte in head
        .iter()
        .cycle()
        .take(CLOSE_BOUND.as_millis() as usize / 100)
    {
        if loris.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        let mut probe = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), loris.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            _ => {}
        }
    }
    assert!(cut_off, "a client trickling its head was never cut off");
    assert!(start.elapsed() < CLOSE_BOUND);

    // A keep-alive connection is closed once it has been idle for the timeout after its last
    // answer, for HTTP/1.1 and HTTP/2 alike.
    let body = event_body("keep-1", "S", json!({}));
    let head = support::signed_head("keep-1", &body);
    let mut keep = TcpStream::connect(agent.ingress).await.unwrap();
    keep.write_all(head.as_bytes()).await.unwrap();
    keep.write_all(&body).await.unwrap();
    let mut answer = [0u8; 12];
    keep.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 202");
    assert!(
        closed_within(&mut keep, CLOSE_BOUND).await.is_some(),
        "an idle keep-alive connection was kept open"
    );

    // The agent still serves, and stored nothing from the abusive connections.
    assert_eq!(deliver(&agent, "after").await, Ok(StatusCode::ACCEPTED));
    assert_eq!(agent.journal_ids(), ["keep-1", "after"]);
    let metrics = support::admin_get(&agent, "/metrics").await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("ess_agent_connections_closed_total{reason=\"idle\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn at_the_connection_limit_the_longest_idle_connection_makes_room_for_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    // A header timeout far longer than the test: only eviction can free a slot.
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 0\nmax_connections = 6\nheader_read_timeout_ms = 600000\n",
    );
    let mut squatters = Vec::new();
    for i in 0..8 {
        let first: &[u8] = match i % 3 {
            0 => b"",
            1 => b"P",
            _ => H2_PREFACE,
        };
        squatters.push(open_with(agent.ingress, first).await);
    }
    // Each delivery takes a slot from an idle squatter: on a fresh connection every time.
    for i in 0..4 {
        let status = tokio::time::timeout(CLOSE_BOUND, deliver(&agent, &format!("hub-{i}")))
            .await
            .expect("the hub got no answer while idle connections held every slot");
        assert_eq!(status, Ok(StatusCode::ACCEPTED));
    }
    // The oldest squatters were the ones closed.
    assert!(
        closed_within(&mut squatters[0], Duration::from_secs(2))
            .await
            .is_some(),
        "the longest idle connection was not the one closed"
    );
    assert_eq!(agent.journal_ids(), ["hub-0", "hub-1", "hub-2", "hub-3"]);
}

#[tokio::test]
async fn silent_tls_connections_are_closed_before_and_after_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::tls::generate(dir.path());
    let extra = format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.tls]\ncert = {:?}\nkey = {:?}\n[limits]\nmin_free_disk_bytes = 0\nheader_read_timeout_ms = 500\n",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
    );
    let agent = Agent::start(dir.path(), &extra);
    // No ClientHello at all.
    let mut silent = open_with(agent.ingress, b"").await;
    assert!(
        closed_within(&mut silent, CLOSE_BOUND).await.is_some(),
        "a connection that never started TLS was kept open"
    );
    // A complete handshake, then nothing.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&pki.ca).unwrap();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(agent.ingress).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(CLOSE_BOUND, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a TLS connection with no request was kept open"
    );
}

#[tokio::test]
async fn requests_hyper_cannot_parse_are_answered_with_problem_details() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "");
    let long_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let many_headers = {
        let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
        for i in 0..200 {
            head.push_str(&format!("X-H{i}: v\r\n"));
        }
        head + "\r\n"
    };
    for (name, raw, status, code) in [
        (
            "space before the colon",
            "POST /v1/events HTTP/1.1\r\nHost : x\r\n\r\n".to_owned(),
            "400",
            "malformed_request",
        ),
        (
            "control character in a header",
            "POST /v1/events HTTP/1.1\r\nHost: x\x01y\r\n\r\n".to_owned(),
            "400",
            "malformed_request",
        ),
        ("head too large", long_header, "431", "headers_too_large"),
        ("too many headers", many_headers, "431", "headers_too_large"),
    ] {
        let answer = raw_exchange(agent.ingress, &[raw.as_bytes()]).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: {answer}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{name}: {head}"
        );
        let problem: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"));
        assert_eq!(problem["code"], code, "{name}");
    }
    assert!(agent.journal_ids().is_empty());
}

#[tokio::test]
async fn the_admin_listener_closes_silent_connections_and_keeps_room_for_probes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "[limits]\nmin_free_disk_bytes = 0\nheader_read_timeout_ms = 500\n",
    );
    // Silent, one byte, half a head and the HTTP/2 preface: each is closed after the header
    // timeout, as on the ingress listener.
    let mut silent = open_with(agent.admin, b"").await;
    let mut one_byte = open_with(agent.admin, b"G").await;
    let mut half_head = open_with(agent.admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let mut h2_preface = open_with(agent.admin, H2_PREFACE).await;
    for (name, stream) in [
        ("silent", &mut silent),
        ("one byte", &mut one_byte),
        ("half a head", &mut half_head),
        ("HTTP/2 preface", &mut h2_preface),
    ] {
        assert!(
            closed_within(stream, CLOSE_BOUND).await.is_some(),
            "a {name} admin connection was left open"
        );
    }
    // More silent connections than the admin listener keeps: a health probe still gets in.
    let mut squatters = Vec::new();
    for _ in 0..ess_agent::admin::MAX_CONNECTIONS + 4 {
        squatters.push(open_with(agent.admin, b"").await);
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        support::admin_get(&agent, "/healthz"),
    )
    .await
    .expect("the health probe got no answer while silent connections held the admin listener");
    assert_eq!(reply.status, StatusCode::OK);
}
