//! Test support: starts the real `ess-agent` binary on port 0 with its own temporary state, and
//! talks to it over HTTP(S) the way a hub does.

#![allow(dead_code)]

pub mod browser;
pub mod hub;
pub mod kill9;
pub mod mosquitto;
pub mod nats;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod sshd;
pub mod tls;
pub mod tls_front;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ess_agent::http_client::{ClientTls, HttpClient, client};
use ess_agent::protocol::auth::WebhookSigner;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

/// The development secret every test agent is configured with.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The log filter test agents run with: info, and every request's access line.
pub const ACCESS_LOG_FILTER: &str = "info,ess_agent::access=debug";

/// How long an agent may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines captured from the agent's stderr, with a condition variable to wait on.
#[derive(Default)]
struct Logs {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A running agent process.
pub struct Agent {
    child: Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub tls: bool,
    logs: Arc<Logs>,
}

/// True for the log line that says an event reached its final state `applied`.
pub fn applied_line(v: &Value) -> bool {
    v["message"] == "event final" && v["state"] == "applied"
}

/// The delivery of `route` in an event's status (`GET /v1/events/{id}`); panics with the status
/// when there is none.
pub fn delivery<'a>(status: &'a Value, route: &str) -> &'a Value {
    status["deliveries"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["route"] == route))
        .unwrap_or_else(|| panic!("no delivery for route {route}: {status}"))
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The path of the agent binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ess-agent")
}

/// A configuration for a test agent in `dir`: loopback listeners on port 0, the test secret,
/// and `extra` appended (TOML sections).
pub fn config_text(dir: &Path, extra: &str) -> String {
    let secret_file = dir.join("hub-secret");
    if !secret_file.exists() {
        std::fs::write(&secret_file, SECRET).expect("write secret");
    }
    let state_dir = dir.join("state");
    // Top-level keys of `extra` (those before its first table) must precede every table.
    let split = extra
        .lines()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(extra.lines().count());
    let top: Vec<&str> = extra.lines().take(split).collect();
    let extra = extra.lines().skip(split).collect::<Vec<_>>().join("\n") + "\n";
    let mut text = format!(
        "agent_id = \"test-partner\"\nstate_dir = {state:?}\n{top}\n",
        state = state_dir.display().to_string(),
        top = top.join("\n")
    );
    if !extra.contains("[ingress]") {
        text.push_str("[ingress]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !extra.contains("[auth]") {
        text.push_str(&format!(
            "[auth]\nhmac_secrets = [{{ file = {:?} }}]\n",
            secret_file.display().to_string()
        ));
    }
    if !extra.contains("[admin]") {
        text.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !extra.contains("[limits]") {
        // Tests fill small file systems on purpose; the free-disk guard is tested on its own.
        text.push_str("[limits]\nmin_free_disk_bytes = 0\n");
    }
    text.push_str(&extra);
    text
}

impl Agent {
    /// Writes `config` to `dir/ess-agent.toml` and starts the agent with it.
    pub fn start_with(dir: &Path, config: &str) -> Agent {
        let config_path = dir.join("ess-agent.toml");
        std::fs::write(&config_path, config).expect("write config");
        Agent::start_config(&config_path, &[])
    }

    /// Starts an agent with the default test configuration plus `extra` in `dir`.
    pub fn start(dir: &Path, extra: &str) -> Agent {
        Agent::start_with(dir, &config_text(dir, extra))
    }

    /// Starts the agent on an existing config file, with extra environment variables.
    pub fn start_config(config_path: &Path, env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::spawn(config_path, env);
        if !agent.wait_ready(START_TIMEOUT) {
            panic!("agent did not become ready; log:\n{}", agent.log_text());
        }
        agent
    }

    /// Starts the agent on an existing config file without waiting for it to be ready (its
    /// addresses are known once [`Agent::wait_ready`] returns true).
    pub fn spawn(config_path: &Path, env: &[(&str, &str)]) -> Agent {
        let mut command = Command::new(binary());
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(config_path)
            // Info, and the access line of every request (an accepted delivery's is at debug
            // level), which tests wait for.
            .env("ESS_AGENT_LOG", ACCESS_LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn ess-agent");
        let logs = Arc::new(Logs::default());
        let stderr = child.stderr.take().expect("stderr");
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("ESS_TEST_ECHO").is_some() {
                        eprintln!("agent: {line}");
                    }
                    logs.lines.lock().unwrap().push(line);
                    logs.changed.notify_all();
                }
                // Wake waiters when the process ends.
                logs.lines
                    .lock()
                    .unwrap()
                    .push(String::from("{\"eof\":true}"));
                logs.changed.notify_all();
            });
        }
        let config = ess_agent::config::Config::load(config_path).expect("test config loads");
        Agent {
            child,
            ingress: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            config_path: config_path.to_owned(),
            state_dir: config.state_dir.clone(),
            tls: config.ingress.tls.is_some(),
            logs,
        }
    }

    /// Waits up to `timeout` for the agent to log that it is ready, and takes its addresses
    /// from that line; false when it did not (or exited first).
    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        let Some(ready) = self.wait_for_log(timeout, |v| v["message"] == "ready") else {
            return false;
        };
        self.ingress = ready["ingress"].as_str().unwrap().parse().unwrap();
        self.admin = ready["admin"]
            .as_str()
            .unwrap_or("0.0.0.0:0")
            .parse()
            .unwrap_or(self.admin);
        true
    }

    /// Waits until a JSON log line satisfies `pred`; returns it.
    pub fn wait_for_log(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut lines = self.logs.lines.lock().unwrap();
        loop {
            while seen < lines.len() {
                let line = &lines[seen];
                seen += 1;
                if let Ok(value) = serde_json::from_str::<Value>(line) {
                    if value.get("eof").is_some() {
                        return None;
                    }
                    if pred(&value) {
                        return Some(value);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .logs
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Every log line so far.
    pub fn log_text(&self) -> String {
        self.logs.lines.lock().unwrap().join("\n")
    }

    /// The ingress base URL.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.ingress)
    }

    /// The admin base URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Polling the child's status: there is no portable blocking wait with a timeout.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads the journal's event ids directly from the database file (the agent may be down).
    pub fn journal_ids(&self) -> Vec<String> {
        journal_ids(&self.state_dir)
    }
}

/// A tmpfs of `size` mounted at `dir` for the duration of the test: a small disk to fill.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts it; `None`, after saying why on stderr, when the tests do not run as root (the
    /// test that asked then skips its check).
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        // /proc/self belongs to the process's effective user.
        let root =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
        if !root {
            eprintln!("skipped: mounting a tmpfs to fill needs root (CAP_SYS_ADMIN)");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {}",
            dir.display()
        );
        Some(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `ess-agent run` on `config_path` as a process that is expected to refuse to start:
/// returns its exit status and its stderr once it exits, or `None` and what it logged when it is
/// still running after `timeout` (it is then killed).
pub fn run_expecting_exit(config_path: &Path, timeout: Duration) -> (Option<ExitStatus>, String) {
    let mut child = Command::new(binary())
        .args(["run", "--config"])
        .arg(config_path)
        .env("ESS_AGENT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ess-agent");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        // Polling the child's status: there is no portable blocking wait with a timeout.
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, reader.join().unwrap_or_default())
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every event id stored in the journal under `state_dir`.
pub fn journal_ids(state_dir: &Path) -> Vec<String> {
    let path = state_dir.join(ess_agent::journal::FILE_NAME);
    let conn = rusqlite::Connection::open(path).expect("open journal");
    let mut stmt = conn.prepare("SELECT id FROM events ORDER BY seq").unwrap();
    stmt.query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<Vec<String>, _>>()
        .unwrap()
}

/// A reply, with the body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Value,
}

/// An HTTP(S) client that trusts the given CA and presents an optional client certificate.
pub fn http(tls: &ClientTls<'_>) -> HttpClient {
    client(tls).expect("client")
}

/// A plain client (for http:// URLs and the admin listener).
pub fn plain() -> HttpClient {
    http(&ClientTls::default())
}

/// Sends a request; any transport error is returned as Err.
pub async fn request(
    client: &HttpClient,
    method: http::Method,
    url: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, v);
    }
    let req = builder
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let response = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Reply {
        status,
        version,
        headers,
        body,
    })
}

/// GET on the admin listener.
pub async fn admin_get(agent: &Agent, path: &str) -> Reply {
    request(
        &plain(),
        http::Method::GET,
        &agent.admin_url(path),
        &[],
        Bytes::new(),
    )
    .await
    .expect("admin request")
}

/// The raw HTTP/1.1 head of a delivery of `body` signed with the test secret now, with its
/// `Content-Length`, to be written to a socket as it is.
pub fn signed_head(msg_id: &str, body: &[u8]) -> String {
    let mut head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in signed_headers(msg_id, unix_now(), body) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head + "\r\n"
}

/// Standard Webhooks headers for `body` signed with the test secret at `timestamp`.
pub fn signed_headers(msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let signer = WebhookSigner::new(SECRET).unwrap();
    let mut headers: Vec<(&'static str, String)> = signer
        .headers(msg_id, timestamp, body)
        .into_iter()
        .collect();
    headers.push(("content-type", "application/json".into()));
    headers
}

/// A Change Event body.
pub fn event_body(id: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id, "version": 1, "type": "rule.updated", "subject": subject, "payload": payload
    }))
    .unwrap()
}

/// Posts a signed Change Event with the given id to the agent.
pub async fn post_event(client: &HttpClient, agent: &Agent, id: &str) -> Result<Reply, String> {
    let body = event_body(id, "S1", serde_json::json!({"n": 1}));
    let headers = signed_headers(id, unix_now(), &body);
    request(
        client,
        http::Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
}

/// A client that offers only HTTP/1.1 in ALPN.
pub fn http1_only(tls: &ClientTls<'_>) -> HttpClient {
    let config = ess_agent::http_client::client_config(tls).expect("tls config");
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// Sends raw bytes over a new TCP connection (writing as much as the peer takes) and returns
/// what the peer answered before closing.
pub async fn raw_exchange(addr: SocketAddr, parts: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for part in parts {
        if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Starts posting signed events `{tag}-{n}` for n in `range` from `tasks` concurrent clients,
/// each body made by `body(id, n)`, until done, `stop` is set or the agent stops answering; the
/// handle yields the ids the agent accepted. A refusal other than a dropped connection panics.
pub fn post_many(
    agent: &Agent,
    tag: &str,
    range: std::ops::Range<usize>,
    tasks: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    body: impl Fn(&str, usize) -> Vec<u8> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<Vec<String>> {
    let url = agent.url("/v1/events");
    let body = Arc::new(body);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (url, stop, tag, range) = (url.clone(), stop.clone(), tag.to_string(), range.clone());
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            let client = plain();
            let mut accepted = Vec::new();
            for n in range.filter(|n| n % tasks == t) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let id = format!("{tag}-{n}");
                let body = body(&id, n);
                let headers = signed_headers(&id, unix_now(), &body);
                match request(&client, http::Method::POST, &url, &headers, body).await {
                    Ok(r) if r.status.is_success() => accepted.push(id),
                    Ok(r) => panic!("{id}: {} {}", r.status, r.body),
                    Err(_) => break,
                }
            }
            accepted
        }));
    }
    tokio::spawn(async move {
        let mut accepted = Vec::new();
        for h in handles {
            accepted.extend(h.await.unwrap());
        }
        accepted
    })
}
