//! Files per second for 1 KiB outputs through the agent's sftp sink, beside OpenSSH's own
//! `sftp -b` uploading the same files over one connection, against the same sshd in the same run.
//!
//! Agent: a fresh agent (the release binary) with one route to an sftp sink; the clock runs from
//! the first POST of N events (32 at a time, each its own subject) until the agent has logged
//! every one of them final. Each file is written to a temporary name, fsynced, and renamed.
//! OpenSSH: `sftp -b` with one `put` per file, timed from start to exit (connecting included).
//!
//! Run: `cargo bench --bench sftp` (FILES and ROUNDS in the environment change the defaults of
//! 500 files and 5 rounds).

#[path = "../tests/it/support/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "../tests/it/support/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ess_agent::http_client::{ClientTls, client};
use ess_agent::protocol::auth::WebhookSigner;
use http_body_util::Full;
use sshd::Sshd;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SIZE: usize = 1024;
const CONCURRENCY: usize = 32;

mod common;
use common::env_or;

/// The 1 KiB content of file `n`.
fn content(n: usize) -> String {
    let unit = format!("{n:06};");
    let mut text = unit.repeat(SIZE / unit.len() + 1);
    text.truncate(SIZE - 1);
    text.push('\n');
    text
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// One agent run: returns files per second.
fn agent_run(sshd: &Sshd, work: &Path, files: usize, runtime: &tokio::runtime::Runtime) -> f64 {
    let dir = work.join(format!("agent-{}", rand_suffix()));
    let remote = dir.join("drop");
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    std::fs::write(dir.join("adapters/text.jsonata"), "payload.text").unwrap();
    std::fs::write(dir.join("hub-secret"), SECRET).unwrap();
    let config = format!(
        "agent_id = \"bench\"\nstate_dir = {state:?}\nadapters_dir = {adapters:?}\n\
         [ingress]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nhmac_secrets = [{{ file = {secret:?} }}]\n\
         [admin]\nenabled = false\n\
         [limits]\nmin_free_disk_bytes = 0\n\
         [[routes]]\nname = \"drop\"\nadapter = \"text.jsonata\"\nsink = \"partner\"\n\
         [sinks.partner]\ntype = \"sftp\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = {user:?}\n\
         private_key = {key:?}\nhost_key_fingerprints = [{fp:?}]\ndir = {remote:?}\n\
         name = \"{{id}}.txt\"\nmax_concurrent_uploads = 8\n",
        state = dir.join("state").display().to_string(),
        adapters = dir.join("adapters").display().to_string(),
        secret = dir.join("hub-secret").display().to_string(),
        port = sshd.port,
        user = sshd.user,
        key = sshd.client_key.display().to_string(),
        fp = sshd.host_fingerprint,
        remote = remote.display().to_string(),
    );
    let config_path = dir.join("ess-agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ess-agent"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config_path)
        .env("ESS_AGENT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ess-agent");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && (v["message"] == "ready" || v["message"] == "event final")
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent did not start");
    let url = format!("http://{}/v1/events", ready["ingress"].as_str().unwrap());

    let start = Instant::now();
    runtime.block_on(async {
        let http = client(&ClientTls::default()).unwrap();
        let signer = Arc::new(WebhookSigner::new(SECRET).unwrap());
        let mut tasks = Vec::new();
        for c in 0..CONCURRENCY {
            let (http, signer, url) = (http.clone(), signer.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                for n in (c..files).step_by(CONCURRENCY) {
                    let id = format!("f{n}");
                    let body = serde_json::to_vec(&serde_json::json!({
                        "id": id, "version": 1, "type": "rule.updated", "subject": id,
                        "payload": {"text": content(n)}
                    }))
                    .unwrap();
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64;
                    let mut request = http::Request::post(&url);
                    for (k, v) in signer.headers(&id, now, &body) {
                        request = request.header(k, v);
                    }
                    let request = request
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    let response = http.request(request).await.expect("post");
                    assert!(response.status().is_success(), "{}", response.status());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut finished = 0;
    while finished < files {
        let v = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the agent stopped applying");
        assert_eq!(v["state"], "applied", "{v}");
        finished += 1;
    }
    let elapsed = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let written = std::fs::read_dir(&remote).unwrap().count();
    assert_eq!(
        written, files,
        "every file written once, no temporary file left"
    );
    let _ = std::fs::remove_dir_all(&dir);
    files as f64 / elapsed.as_secs_f64()
}

/// One `sftp -b` run over the same files: returns files per second.
fn openssh_run(sshd: &Sshd, work: &Path, files: usize) -> f64 {
    let dir = work.join(format!("openssh-{}", rand_suffix()));
    let local = dir.join("local");
    let remote = dir.join("drop");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    let mut batch = String::new();
    for n in 0..files {
        let path = local.join(format!("f{n}.txt"));
        std::fs::write(&path, content(n)).unwrap();
        batch.push_str(&format!(
            "put {} {}\n",
            path.display(),
            remote.join(format!("f{n}.txt")).display()
        ));
    }
    let batch_path = dir.join("batch");
    std::fs::write(&batch_path, batch).unwrap();
    let known = dir.join("known_hosts");
    std::fs::write(&known, sshd.known_hosts_line()).unwrap();
    let start = Instant::now();
    let out = Command::new("sftp")
        .arg("-q")
        .arg("-b")
        .arg(&batch_path)
        .arg("-i")
        .arg(&sshd.client_key)
        .arg("-P")
        .arg(sshd.port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg(format!("{}@127.0.0.1", sshd.user))
        .stdout(Stdio::null())
        .output()
        .expect("run sftp");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "sftp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&remote).unwrap().count(), files);
    let _ = std::fs::remove_dir_all(&dir);
    files as f64 / elapsed.as_secs_f64()
}

fn rand_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn main() {
    // `cargo bench` passes --bench; a plain `cargo test --benches` passes nothing and should
    // not spend a minute here.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let files = env_or("FILES", 500);
    let rounds = env_or("ROUNDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let (mut agent, mut openssh) = (Vec::new(), Vec::new());
    // Warm the page cache and sshd once, untimed.
    openssh_run(&sshd, work.path(), 50);
    for round in 0..rounds {
        let a = agent_run(&sshd, work.path(), files, &runtime);
        let o = openssh_run(&sshd, work.path(), files);
        println!("round {round}: agent {a:.0} files/s, sftp -b {o:.0} files/s");
        agent.push(a);
        openssh.push(o);
    }
    let (a, o) = (median(&mut agent), median(&mut openssh));
    println!(
        "sftp sink, {files} files of {SIZE} B, median of {rounds}: agent {a:.0} files/s, \
         OpenSSH sftp -b {o:.0} files/s, ratio {:.2}",
        a / o
    );
}
