//! Operations: systemd notifications, the watchdog, metrics and readiness.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use crate::support::hub::TestServer;
use crate::support::{
    self, Agent, admin_get, plain, post_event, request, signed_headers, unix_now,
};

/// A test-owned NOTIFY_SOCKET.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next message, or None after `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Waits for a message containing `needle`; returns it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(message) if message.lines().any(|l| l == needle) => return Some(message),
                Some(_) => continue,
                None => return None,
            }
        }
        None
    }

    /// Counts watchdog pings during `window`.
    fn count_pings(&self, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut pings = 0;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(message) = self.next(left)
                && message.lines().any(|l| l == "WATCHDOG=1")
            {
                pings += 1;
            }
        }
        pings
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_ready_watchdog_reload_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let config = support::config_text(dir.path(), "");
    let config_path = dir.path().join("ess-agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut agent = Agent::start_config(
        &config_path,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    // READY=1 arrives, and by then the ingress port accepts.
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(10))
        .expect("READY=1");
    assert!(ready.contains("STATUS=backlog 0"), "{ready}");
    std::net::TcpStream::connect(agent.ingress).expect("the ingress port accepts after READY=1");

    // Pings every 200 ms (half of WATCHDOG_USEC).
    let pings = notify.count_pings(Duration::from_millis(1200));
    assert!((3..=9).contains(&pings), "{pings} pings in 1.2 s");

    // Another process holds the journal's write lock: the writer cannot commit, pings stop.
    let conn = rusqlite::Connection::open(agent.state_dir.join("journal.sqlite3")).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // One ping may already be on its way.
    let _ = notify.count_pings(Duration::from_millis(300));
    let pings = notify.count_pings(Duration::from_millis(1200));
    assert_eq!(
        pings, 0,
        "pings went on while the journal writer was blocked"
    );
    conn.execute_batch("ROLLBACK").unwrap();
    let pings = notify.count_pings(Duration::from_millis(1200));
    assert!(pings >= 2, "pings did not resume: {pings}");
    assert!(agent.log_text().contains("watchdog pings stopped"));

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = notify
        .wait_for("RELOADING=1", Duration::from_secs(5))
        .expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notify
        .wait_for("READY=1", Duration::from_secs(5))
        .expect("READY=1 after the reload");

    // SIGTERM: STOPPING=1.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .expect("STOPPING=1");
    assert!(agent.wait_exit(Duration::from_secs(10)).unwrap().success());
}

/// Parses Prometheus text format; panics on a malformed line. Returns sample → value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "bad comment line: {line}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = name.strip_prefix(metric) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels: {line}"
            );
        }
        samples.insert(name.to_string(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_count_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/p.jsonata"), "payload").unwrap();
    let extra = format!(
        "adapters_dir = {:?}\n[[routes]]\nname = \"r1\"\nadapter = \"p.jsonata\"\nsink = \"files\"\n\
         [sinks.files]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
        dir.path().join("adapters").display().to_string(),
        dir.path().join("out").display().to_string()
    );
    let agent = Agent::start(dir.path(), &extra);
    let client = plain();
    for id in ["m1", "m2", "m3"] {
        assert_eq!(
            post_event(&client, &agent, id).await.unwrap().status,
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(
        post_event(&client, &agent, "m1").await.unwrap().status,
        StatusCode::OK
    );
    let bad = b"{".to_vec();
    let reply = request(
        &client,
        Method::POST,
        &agent.url("/v1/events"),
        &signed_headers("x", unix_now(), &bad),
        bad,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    for id in ["m1", "m2", "m3"] {
        agent
            .wait_for_log(Duration::from_secs(10), |v| {
                v["message"] == "event final" && v["event_id"] == id
            })
            .expect("final");
    }
    let reply = admin_get(&agent, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = reply.body.as_str().unwrap();
    let samples = parse_prometheus(text);
    let get = |k: &str| {
        samples
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("{k} missing in\n{text}"))
    };
    assert_eq!(get("ess_agent_requests_total{status=\"202\"}"), 3.0);
    assert_eq!(get("ess_agent_requests_total{status=\"200\"}"), 1.0);
    assert_eq!(get("ess_agent_requests_total{status=\"400\"}"), 1.0);
    // Every answer is timed, the refused one too.
    assert_eq!(get("ess_agent_request_seconds_count"), 5.0);
    assert_eq!(
        get("ess_agent_events_received_total{result=\"accepted\"}"),
        3.0
    );
    assert_eq!(
        get("ess_agent_events_received_total{result=\"duplicate\"}"),
        1.0
    );
    assert_eq!(get("ess_agent_events_final_total{state=\"applied\"}"), 3.0);
    assert_eq!(
        get("ess_agent_deliveries_total{route=\"r1\",sink=\"files\",result=\"applied\"}"),
        3.0
    );
    assert_eq!(get("ess_agent_backlog"), 0.0);
    assert_eq!(get("ess_agent_dead_letters"), 0.0);
    assert!(get("ess_agent_journal_commit_seconds_count") >= 3.0);
    assert!(get("ess_agent_adapter_eval_seconds_count{route=\"r1\"}") >= 3.0);
    assert!(get("ess_agent_sink_apply_seconds_count{sink=\"files\"}") >= 3.0);
    let _ = json!(null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reflects_a_sink_whose_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/p.jsonata"), "payload").unwrap();
    let server = TestServer::start(200).await;
    let extra = format!(
        "adapters_dir = {:?}\n[[routes]]\nname = \"r\"\nadapter = \"p.jsonata\"\nsink = \"partner\"\n\
         [sinks.partner]\ntype = \"http\"\nurl = {:?}\ntimeout_ms = 500\n\
         [dispatch]\nhealthcheck_interval_ms = 100\n",
        dir.path().join("adapters").display().to_string(),
        server.url("/x")
    );
    let agent = Agent::start(dir.path(), &extra);
    let wait_ready = |want: StatusCode| {
        let admin = agent.admin_url("/readyz");
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let reply = request(&plain(), Method::GET, &admin, &[], Vec::new())
                    .await
                    .unwrap();
                if reply.status == want {
                    return reply;
                }
                assert!(
                    Instant::now() < deadline,
                    "readyz stayed {}: {:?}",
                    reply.status,
                    reply.body
                );
                // Readiness changes on the healthcheck's own schedule; poll it.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_ready(StatusCode::OK).await;
    server.stop();
    let reply = wait_ready(StatusCode::SERVICE_UNAVAILABLE).await;
    let reason = reply.body["reasons"]["sink partner"].as_str().unwrap();
    assert!(reason.contains("cannot connect"), "{reason}");
    let _server = server.restart().await;
    wait_ready(StatusCode::OK).await;
}

#[tokio::test]
async fn admin_answers_head_like_get_and_a_wrong_method_with_405() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "");
    let client = plain();
    for path in ["/healthz", "/readyz", "/metrics", "/v1/dead-letters"] {
        let get = admin_get(&agent, path).await;
        let head = request(
            &client,
            Method::HEAD,
            &agent.admin_url(path),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(head.status, get.status, "HEAD {path}");
        assert_eq!(head.body, json!(""), "HEAD {path} has no body");
        assert_eq!(
            head.headers.get("content-type"),
            get.headers.get("content-type"),
            "HEAD {path}"
        );
        if path != "/metrics" {
            // The length of the body GET sends (the metrics text changes between requests).
            assert_eq!(
                head.headers.get("content-length"),
                get.headers.get("content-length"),
                "HEAD {path}"
            );
            assert!(head.headers.contains_key("content-length"), "HEAD {path}");
        }
    }

    for (method, path, allow) in [
        (Method::POST, "/healthz", "GET, HEAD"),
        (Method::DELETE, "/readyz", "GET, HEAD"),
        (Method::GET, "/v1/events/e1/replay", "POST"),
        (Method::POST, "/v1/dead-letters/e1", "DELETE"),
    ] {
        let reply = request(
            &client,
            method.clone(),
            &agent.admin_url(path),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {:?}",
            reply.body
        );
        assert_eq!(
            reply.headers.get("allow").unwrap(),
            allow,
            "{method} {path}"
        );
        assert_eq!(
            reply.headers.get("content-type").unwrap(),
            "application/problem+json"
        );
        assert_eq!(reply.body["code"], "method_not_allowed");
        let detail = reply.body["detail"].as_str().unwrap();
        assert!(detail.contains(allow), "{detail}");
    }

    // An unknown path is still 404.
    let reply = request(
        &client,
        Method::POST,
        &agent.admin_url("/nope"),
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_refuses_to_start_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/p.jsonata"), "payload").unwrap();
    // A partner that fails every delivery: the events stay in the backlog, where a second
    // agent would resume and apply them as well.
    let server = TestServer::start(503).await;
    let extra = format!(
        "adapters_dir = {:?}\n[[routes]]\nname = \"r\"\nadapter = \"p.jsonata\"\nsink = \"partner\"\n\
         [sinks.partner]\ntype = \"http\"\nurl = {:?}\nretry = {{ initial_ms = 50, max_ms = 100 }}\n",
        dir.path().join("adapters").display().to_string(),
        server.url("/x")
    );
    let mut first = Agent::start(dir.path(), &extra);
    let client = plain();
    for id in ["L1", "L2"] {
        assert_eq!(
            post_event(&client, &first, id).await.unwrap().status,
            StatusCode::ACCEPTED
        );
    }

    // The same configuration from another file: other ports (0), the same state_dir.
    let second_config = dir.path().join("second.toml");
    std::fs::copy(&first.config_path, &second_config).unwrap();
    let (status, log) = support::run_expecting_exit(&second_config, Duration::from_secs(20));
    let status = status.unwrap_or_else(|| panic!("a second agent kept running; log:\n{log}"));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&first.state_dir.display().to_string()),
        "the message does not name the directory: {log}"
    );
    assert!(
        log.contains(&format!("pid {}", first.pid())),
        "the message does not name the holder's pid: {log}"
    );
    assert!(log.contains("in use"), "{log}");

    // The lock dies with its holder, however it ends.
    let first_pid = first.pid();
    first.kill9();
    let third = Agent::start_config(&second_config, &[]);
    let lock = std::fs::read_to_string(third.state_dir.join("lock")).unwrap();
    assert_eq!(lock.trim(), third.pid().to_string());
    assert_ne!(third.pid(), first_pid);
    let status = admin_get(&third, "/v1/events/L2").await;
    assert_eq!(status.body["state"], "accepted", "{:?}", status.body);
}

/// Overwrites `len` bytes of `path` at `offset` with a pattern no SQLite page holds.
fn damage(path: &std::path::Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let garbage: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(37) ^ 0xa5)
        .collect();
    file.write_all_at(&garbage, offset).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_is_refused_at_start_naming_the_file_and_the_way_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), "");
    let client = plain();
    // Enough events for a journal of many pages.
    let payload = "x".repeat(2000);
    for n in 0..300 {
        let id = format!("D{n}");
        let body = support::event_body(&id, "S1", json!({"n": n, "pad": payload}));
        let headers = signed_headers(&id, unix_now(), &body);
        let reply = request(
            &client,
            Method::POST,
            &agent.url("/v1/events"),
            &headers,
            body,
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).unwrap().success());
    let journal = agent.state_dir.join("journal.sqlite3");
    assert!(
        !agent.state_dir.join("journal.sqlite3-wal").exists(),
        "a clean stop leaves every page in the database file"
    );
    let size = std::fs::metadata(&journal).unwrap().len();
    assert!(size > 400_000, "{size}");

    // Pages in the middle of the file, then the header, each in a copy of its own.
    for (what, offset, len) in [("pages", size / 2, 16_384), ("header", 0, 100)] {
        let copy = tempfile::tempdir().unwrap();
        let config = support::config_text(copy.path(), "");
        let config_path = copy.path().join("ess-agent.toml");
        std::fs::write(&config_path, config).unwrap();
        let state = copy.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let damaged = state.join("journal.sqlite3");
        std::fs::copy(&journal, &damaged).unwrap();
        damage(&damaged, offset, len);
        let before = std::fs::read(&damaged).unwrap();

        let (status, log) = support::run_expecting_exit(&config_path, Duration::from_secs(20));
        let status =
            status.unwrap_or_else(|| panic!("{what}: the agent served a damaged journal:\n{log}"));
        assert!(!status.success(), "{what}: {log}");
        assert!(
            log.contains(&damaged.display().to_string()),
            "{what}: the message does not name the file: {log}"
        );
        assert!(
            log.contains("is damaged") && log.contains("backup") && log.contains("aside"),
            "{what}: the message does not say how to recover: {log}"
        );
        assert!(!log.contains("ready"), "{what}: {log}");
        assert_eq!(
            std::fs::read(&damaged).unwrap(),
            before,
            "{what}: the refused start changed the damaged file"
        );
    }
}

/// A partner endpoint that takes a request and answers 200 only when told to: in-flight work
/// for as long as a test needs. Returns its URL, a notice of the request's arrival, and the
/// release.
async fn held_partner() -> (
    String,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/apply", listener.local_addr().unwrap());
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        // Connections that send no request (the sink's healthcheck) are let go.
        let mut stream = loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break stream;
            }
        };
        let _ = arrived_tx.send(());
        let _ = released.await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        let _ = stream.shutdown().await;
    });
    (url, arrived, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_the_admin_api_says_shutting_down_and_new_deliveries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let (partner, arrived, release) = held_partner().await;
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/pass.jsonata"), "payload").unwrap();
    let extra = format!(
        "adapters_dir = {adapters:?}\n\
         [[routes]]\nname = \"partner\"\nadapter = \"pass.jsonata\"\nsink = \"partner-api\"\n\
         [sinks.partner-api]\ntype = \"http\"\nurl = {partner:?}\ntimeout_ms = 30000\n\
         [shutdown]\ngrace_period_secs = 30\n",
        adapters = dir.path().join("adapters").display().to_string(),
    );
    let config_path = dir.path().join("ess-agent.toml");
    std::fs::write(&config_path, support::config_text(dir.path(), &extra)).unwrap();
    // A short watchdog interval: the drain below lasts many of them.
    let mut agent = Agent::start_config(
        &config_path,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "100000"),
        ],
    );
    let reply = post_event(&plain(), &agent, "slow-1").await.unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the partner got the event")
        .unwrap();

    // SIGTERM while the partner holds the event.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .expect("STOPPING=1");

    // The admin API is still there and says why the agent is not ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = request(
            &plain(),
            Method::GET,
            &agent.admin_url("/readyz"),
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("/readyz during the drain: {e}"));
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(ready.body["ready"], false);
            assert_eq!(ready.body["reasons"]["shutdown"], "shutting down");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz answered {ready:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = request(
        &plain(),
        Method::GET,
        &agent.admin_url("/metrics"),
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("/metrics during the drain: {e}"));
    assert_eq!(metrics.status, StatusCode::OK);

    // A new delivery is refused at connect time (a load balancer tries another agent).
    let refused = tokio::net::TcpStream::connect(agent.ingress).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // The journal writer keeps committing during the drain: the watchdog keeps pinging.
    for _ in 0..3 {
        notify
            .wait_for("WATCHDOG=1", Duration::from_secs(5))
            .expect("watchdog pings go on during the drain");
    }

    // The partner answers; the drain ends with the event applied and a clean log.
    release.send(()).unwrap();
    let status = agent.wait_exit(Duration::from_secs(30)).expect("exited");
    assert!(status.success(), "{status:?}");
    let log = agent.log_text();
    assert!(
        agent
            .wait_for_log(Duration::ZERO, |v| v["message"] == "event final"
                && v["event_id"] == "slow-1"
                && v["state"] == "applied")
            .is_some(),
        "{log}"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(
        errors.is_empty(),
        "a clean drain logged errors: {errors:#?}"
    );
}

#[test]
fn text_logs_into_a_pipe_have_no_colour_codes() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("ess-agent.toml");
    std::fs::write(&config_path, support::config_text(dir.path(), "")).unwrap();
    let mut child = std::process::Command::new(support::binary())
        .args(["--log-format", "text", "run", "--config"])
        .arg(&config_path)
        .env("ESS_AGENT_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read until the ready line, stop the agent, then read the rest.
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).contains(" ready ") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the agent exited: {}",
            String::from_utf8_lossy(&text)
        );
        text.extend_from_slice(&buf[..n]);
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    stderr.read_to_end(&mut text).unwrap();
    assert!(child.wait().unwrap().success());
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("INFO"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a pipe: {text:?}");
}

/// Runs the agent with its stderr on a pseudo-terminal until it is ready, stops it, and returns
/// everything it wrote there.
fn text_log_on_a_terminal(no_color: Option<&str>) -> String {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("ess-agent.toml");
    std::fs::write(&config_path, support::config_text(dir.path(), "")).unwrap();
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut command = std::process::Command::new(support::binary());
    command
        .args(["--log-format", "text", "run", "--config"])
        .arg(&config_path)
        .env("ESS_AGENT_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(pty.slave));
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    // The command holds the only copy of the terminal's other end: once the agent exits,
    // reading gives EIO.
    let mut child = command.spawn().unwrap();
    drop(command);
    let mut terminal = std::fs::File::from(pty.master);
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).contains(" ready ") {
        let n = terminal.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "the agent exited: {}",
            String::from_utf8_lossy(&text)
        );
        text.extend_from_slice(&buf[..n]);
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    loop {
        match terminal.read(&mut buf) {
            Ok(n) if n > 0 => text.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert!(child.wait().unwrap().success());
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn text_logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let coloured = text_log_on_a_terminal(None);
    assert!(
        coloured.contains("\u{1b}["),
        "no colour on a terminal: {coloured:?}"
    );
    // An empty NO_COLOR does not count (no-color.org).
    assert!(text_log_on_a_terminal(Some("")).contains("\u{1b}["));
    let plain = text_log_on_a_terminal(Some("1"));
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "colour codes with NO_COLOR=1: {plain:?}"
    );
}
