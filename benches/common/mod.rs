//! What the benchmarks share: settings from the environment, CPU clocks, medians, and the
//! harness of the sink benches that time the agent on a journaled backlog (start the agent,
//! read its JSON log, post signed events, time its `event final` lines).
// Each benchmark is a crate of its own and uses only part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ess_agent::http_client::{ClientTls, client};
use ess_agent::protocol::auth::WebhookSigner;
use http_body_util::Full;
use serde_json::Value;

/// The HMAC secret the benches' hub signs with.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How many subjects the events spread over.
pub const SUBJECTS: usize = 256;

/// The number in the environment variable `name`, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Busy CPU seconds of the whole machine so far (every CPU; idle and iowait left out).
pub fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if ticks.len() < 8 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal, in units of 1/100 s.
    (ticks.iter().take(8).sum::<f64>() - ticks[3] - ticks[4]) / 100.0
}

/// A change to the agent, compared with its defaults in the same run.
#[derive(Debug, Default)]
pub struct Variant {
    /// TOML added to the agent's configuration (start it with a table header, `[journal]`).
    pub toml: String,
    /// Environment variables set for the agent.
    pub env: Vec<(String, String)>,
}

impl Variant {
    /// From `ESS_BENCH_AGENT_VARIANT` (TOML) and `ESS_BENCH_AGENT_VARIANT_ENV` (`NAME=value`
    /// pairs separated by spaces); `None` when neither is set.
    pub fn from_env() -> Option<Variant> {
        let toml = std::env::var("ESS_BENCH_AGENT_VARIANT").ok();
        let env = std::env::var("ESS_BENCH_AGENT_VARIANT_ENV").ok();
        if toml.is_none() && env.is_none() {
            return None;
        }
        let env = env
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Variant {
            toml: toml.unwrap_or_default(),
            env,
        })
    }
}

/// The median (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// CPU seconds a process has used so far (user and system), from `/proc/<pid>/stat`.
pub fn process_cpu(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14 and stime 15.
    let fields: Vec<f64> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    if fields.len() < 13 {
        return 0.0;
    }
    (fields[11] + fields[12]) / 100.0
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The id of the `n`th event.
pub fn event_id(n: usize) -> String {
    format!("bench-{n:06}")
}

/// The subject of the `n`th event.
pub fn subject(n: usize) -> String {
    format!("S{:03}", n % SUBJECTS)
}

/// A temporary directory with the hub secret (`hub-secret`) and the adapter `adapter` as
/// `adapters/pass.jsonata`.
pub fn bench_dir(adapter: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hub-secret"), SECRET).unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/pass.jsonata"), adapter).unwrap();
    dir
}

/// The agent's configuration up to its routes, for a [`bench_dir`]: ingress and admin on port
/// 0, `max_parallel` events dispatched at once, no disk-space floor. It ends in the `[limits]`
/// table, so the caller may add to it before its routes and sinks.
pub fn agent_config_head(dir: &Path, max_parallel: usize) -> String {
    format!(
        r#"agent_id = "bench"
state_dir = {state:?}
adapters_dir = {adapters:?}

[ingress]
listen = "127.0.0.1:0"

[auth]
hmac_secrets = [{{ file = {secret:?} }}]

[admin]
listen = "127.0.0.1:0"

[dispatch]
max_parallel = {max_parallel}

[limits]
min_free_disk_bytes = 0
"#,
        state = dir.join("state").display().to_string(),
        adapters = dir.join("adapters").display().to_string(),
        secret = dir.join("hub-secret").display().to_string(),
    )
}

/// A running agent (the bench build of the binary) and its JSON log lines.
pub struct Agent {
    pub child: Child,
    lines: mpsc::Receiver<Value>,
    /// Lines read while waiting for something else, not yet shown to a `wait`.
    seen: std::collections::VecDeque<Value>,
}

impl Agent {
    /// Starts the agent on `config` with `env` added to its environment; returns it with its
    /// `ready` log line (which names the ingress and admin addresses).
    pub fn start(config: &Path, env: &[(String, String)]) -> (Agent, Value) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ess-agent"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("ESS_AGENT_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ess-agent");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut agent = Agent {
            child,
            lines,
            seen: Default::default(),
        };
        // The dispatcher starts before the agent says "ready": keep what comes first.
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match agent.lines.recv_timeout(left) {
                Ok(v) if v["message"] == "ready" => break v,
                Ok(v) => agent.seen.push_back(v),
                Err(e) => panic!("agent did not become ready ({e})"),
            }
        };
        (agent, ready)
    }

    /// Reads log lines until `pred` holds for one, which it returns; panics at an `ERROR` line,
    /// at the end of the log or after `timeout`.
    pub fn wait(&mut self, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> Value {
        while let Some(v) = self.seen.pop_front() {
            if pred(&v) {
                return v;
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) if v["level"] == "ERROR" => panic!("agent error: {v}"),
                Ok(_) => {}
                Err(e) => panic!("agent log ended or timed out ({e})"),
            }
        }
    }

    /// Kills the agent as `kill -9` does and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The time of a log line, in seconds since the epoch.
pub fn timestamp(v: &Value) -> f64 {
    let text = v["timestamp"]
        .as_str()
        .expect("log lines carry a timestamp");
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() as f64 / 1e9
}

/// A listener on 127.0.0.1 that accepts connections and never answers, and its port: a sink
/// pointed at it waits for a greeting that does not come, so no apply fails and none is put
/// off by the retry policy. Abort the task to close it.
pub async fn hole() -> (u16, tokio::task::JoinHandle<()>) {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    (port, task)
}

/// Posts events `0..events` (`event(n)`, whose `id` it signs with) to the agent whose `ready`
/// line is `ready`, signed with [`SECRET`], from 8 tasks at once; each must be accepted (202).
pub async fn post_events(ready: &Value, events: usize, event: fn(usize) -> Value) {
    let url = format!("http://{}/v1/events", ready["ingress"].as_str().unwrap());
    let http = client(&ClientTls::default()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (http, url) = (http.clone(), url.clone());
        let signer = WebhookSigner::new(SECRET).unwrap();
        tasks.push(tokio::spawn(async move {
            for n in (0..events).filter(|n| n % 8 == t) {
                let event = event(n);
                let id = event["id"].as_str().expect("events carry an id").to_owned();
                let body = serde_json::to_vec(&event).unwrap();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                let mut request = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.clone())))
                    .unwrap();
                for (k, v) in signer.headers(&id, now, &body) {
                    request.headers_mut().insert(k, v.parse().unwrap());
                }
                let response = http.request(request).await.expect("post event");
                assert_eq!(response.status(), 202, "event {id} not accepted");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A bench-owned server process on `port`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    /// Spawns `command` (a server on `port`) with its stderr piped and waits until a line of
    /// it satisfies `ready`; panics naming `what` after 15 s.
    pub fn start_until(
        command: &mut Command,
        port: u16,
        what: &str,
        ready: fn(&str) -> bool,
    ) -> Server {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if ready(&line) {
                    let _ = tx.send(());
                }
            }
        });
        let server = Server { child, port };
        rx.recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("{what} did not start"));
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
