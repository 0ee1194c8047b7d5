//! NATS for the tests: the shared JetStream server on 127.0.0.1:4222, test-owned servers on free
//! loopback ports with their own store directory that a test can stop and start again, and a
//! JetStream client to create streams and read what they hold.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage, stream};

use super::process::{self, ServerLog, free_port};

/// The server every machine running the tests has (scripts/test starts it).
pub const SHARED_URL: &str = "nats://127.0.0.1:4222";

/// How long a server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running (or stopped) `nats-server -js` owned by one test.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// `--tlsverify` with these files: TLS only, and clients must present a certificate.
    tls: Option<TlsFiles>,
    log: Arc<ServerLog>,
    dir: tempfile::TempDir,
}

/// PEM files for a server that speaks TLS only.
pub struct TlsFiles {
    /// The CA that signed the server's certificate and the clients' certificates.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and its own store directory; returns once
    /// it is ready for clients.
    pub fn start() -> NatsServer {
        Self::start_with(None)
    }

    /// Starts a server that speaks TLS only and verifies client certificates (`--tlsverify`).
    pub fn start_tls(tls: TlsFiles) -> NatsServer {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<TlsFiles>) -> NatsServer {
        let port = free_port();
        let mut server = NatsServer {
            child: None,
            port,
            tls,
            log: Arc::new(ServerLog::default()),
            dir: tempfile::tempdir().unwrap(),
        };
        server.start_again();
        server
    }

    /// Starts the (stopped) server on the same port with the same store; returns once it is
    /// ready for clients.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let mut command = Command::new("nats-server");
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path());
        if let Some(tls) = &self.tls {
            command
                .arg("--tlsverify")
                .arg("--tlscacert")
                .arg(&tls.ca)
                .arg("--tlscert")
                .arg(&tls.cert)
                .arg("--tlskey")
                .arg(&tls.key);
        }
        self.child = Some(
            self.log
                .spawn_until(command, "nats-server", START_TIMEOUT, |l| {
                    l.contains("Server is ready")
                }),
        );
    }

    /// Stops the server the way an init system does (SIGTERM) and waits until it has exited.
    pub fn stop(&mut self) {
        process::terminate(&mut self.child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        self.log.text()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A name no other test run uses: `<prefix>` and 16 hex digits, for streams and subjects on the
/// shared server.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

/// A JetStream client of the server at `url`.
/// A JetStream client of a TLS-only server, trusting `ca` and presenting `cert` and `key`.
pub async fn jetstream_tls(url: &str, ca: &Path, cert: &Path, key: &Path) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf())
        .add_client_certificate(cert.to_path_buf(), key.to_path_buf())
        .connect(url)
        .await
        .expect("connect to nats over TLS");
    jetstream::new(client)
}

pub async fn jetstream(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to nats");
    jetstream::new(client)
}

/// Creates a file-backed stream `name` capturing `subjects`, with JetStream's default duplicate
/// window (two minutes).
pub async fn create_stream(js: &jetstream::Context, name: &str, subjects: &[String]) {
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: subjects.to_vec(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// Every message the stream holds, in order.
pub async fn messages(js: &jetstream::Context, name: &str) -> Vec<StreamMessage> {
    let stream = js.get_stream(name).await.expect("get stream");
    let state = stream.get_info().await.expect("stream info").state;
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(sequence).await {
            out.push(m);
        }
    }
    out
}

/// A header of a stored message, as text.
pub fn header<'a>(m: &'a StreamMessage, name: &str) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

/// Deletes a stream (at the end of a test on the shared server).
pub async fn delete_stream(js: &jetstream::Context, name: &str) {
    let _ = js.delete_stream(name).await;
}
