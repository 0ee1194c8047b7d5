//! Test-owned Redis servers on free loopback ports that a test can kill and start again, and a
//! reader of streams (the shared server on 127.0.0.1:6379 is only ever read and written with
//! keys unique to a test).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::Value;

use super::process::free_port;

/// The server every machine running the tests has.
pub const SHARED_PORT: u16 = 6379;

/// How long a server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How to set up a server.
#[derive(Default)]
pub struct Options {
    /// `appendonly yes` with `appendfsync always`: every answered write survives a kill.
    pub durable: bool,
    /// `requirepass`: the `default` user's password.
    pub password: Option<String>,
    /// A TLS port besides the plain one, with this server certificate, that asks clients for
    /// a certificate signed by `ca` (`tls-auth-clients yes`).
    pub tls: Option<TlsFiles>,
}

/// PEM files for a server's TLS port.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running (or stopped) redis-server owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// The TLS port, when one was asked for.
    pub tls_port: Option<u16>,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

/// A key prefix no other test uses.
pub fn unique_prefix(what: &str) -> String {
    format!("ess-test:{what}:{:08x}", rand::random::<u32>())
}

impl RedisServer {
    /// Starts a server; returns once it answers.
    pub fn start(options: Options) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            &dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if options.durable {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        let tls_port = options.tls.as_ref().map(|tls| {
            let port = free_port();
            args.push("--tls-port".into());
            args.push(port.to_string());
            for (key, path) in [
                ("--tls-ca-cert-file", &tls.ca),
                ("--tls-cert-file", &tls.cert),
                ("--tls-key-file", &tls.key),
            ] {
                args.push(key.into());
                args.push(path.display().to_string());
            }
            args.extend(["--tls-auth-clients", "yes"].map(String::from));
            port
        });
        if let Some(password) = &options.password {
            args.extend(["--requirepass".to_string(), password.clone()]);
        }
        let mut server = RedisServer {
            child: None,
            port,
            tls_port,
            args,
            _dir: dir,
        };
        server.start_again();
        server
    }

    /// Starts the (stopped) server with the same settings and port; returns once it answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !answers(self.port) {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits until it has exited: only what it had put on disk
    /// survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a server on `port` answers (PONG, or an error such as NOAUTH or LOADING).
fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if n > 0 && (buf[0] == b'+' || buf[0] == b'-'))
}

/// A connection for checks (the `default` user, with `password` when given).
pub async fn connect(port: u16, password: Option<&str>) -> redis::aio::MultiplexedConnection {
    let url = match password {
        Some(p) => format!("redis://:{p}@127.0.0.1:{port}"),
        None => format!("redis://127.0.0.1:{port}"),
    };
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// One stream entry: its id and fields.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

/// Every entry of `stream`, oldest first.
pub async fn entries(
    connection: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<StreamEntry> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(connection)
        .await
        .unwrap();
    let Value::Array(items) = reply else {
        panic!("XRANGE answered {reply:?}")
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(parts) = item else {
                panic!("entry {item:?}")
            };
            let Value::Array(fields) = &parts[1] else {
                panic!("fields {parts:?}")
            };
            StreamEntry {
                id: text(&parts[0]),
                fields: fields
                    .chunks(2)
                    .map(|pair| (text(&pair[0]), text(&pair[1])))
                    .collect(),
            }
        })
        .collect()
}

/// Runs one command and returns its answer.
pub async fn command(connection: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(connection)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Deletes every key that starts with `prefix` (a test's own keys on the shared server).
pub async fn delete_prefix(connection: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(connection)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(connection).await;
    }
}
