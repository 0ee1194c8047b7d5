//! The `sftp` sink: drops each output record as a file on a partner's SFTP server, atomically,
//! exactly once per file name (PROTOCOL.md §3), over a connection whose host key is verified.
//!
//! # The server is who it claims to be
//!
//! Host key verification cannot be left out by accident: a sink names a `known_hosts` file, or
//! pins the server's `SHA256:` fingerprints, or (for a throw-away test server only) sets
//! `insecure_skip_host_key_verification`, which logs a warning at every connect. A key that is
//! unknown, changed or `@revoked` refuses the connection before the agent authenticates; the
//! error shows the key the server offered and how to pin it once its operator has confirmed it.
//! These errors are permanent: the event is dead-lettered, not retried for a day against what
//! may be a man in the middle.
//!
//! # How a file is written
//!
//! Every record's name is rendered from the `name` template and checked with
//! [`safe_relative_path`] before the sink connects, so a hostile value (`../../etc/passwd`, an
//! absolute path, a NUL) refuses the whole event before anything is uploaded. Then, for each
//! record, over one SFTP channel:
//!
//! 1. any leftover of an earlier attempt at the same temporary name is removed, and the hidden
//!    temporary file `.<name>.<hash>.tmp` is created exclusively next to the target (`<hash>`
//!    is derived from the event id, route and record index, so a retry of the same event
//!    replaces its own leftover, and a stale writer from a dropped connection can never write
//!    into the new file);
//! 2. the content is written, the mode set with `fsetstat` (exact: the server's umask does
//!    not apply), and the file fsynced when the server supports `fsync@openssh.com`;
//! 3. the file is closed, which is where some servers report write errors;
//!
//! and once every temporary file is complete:
//!
//! 4. each is renamed over its final name with `posix-rename@openssh.com`, which replaces an
//!    existing file atomically. Servers without that extension get a plain SFTP rename, which
//!    fails over an existing file, so the existing file is removed first: a reader may then see
//!    no file for a moment (never a partial one).
//!
//! Only then does `apply` return Ok. Names are derived from the event, so a retry writes the
//! same names: each name exists once, with the last content. SFTP offers no way to fsync a
//! directory, so whether a completed rename survives a power loss of the server depends on the
//! server's filesystem.
//!
//! # Content
//!
//! A JSON string output is written byte for byte as its text (CSV, XML, fixed-width records the
//! adapter has already formatted). Any other value is written as compact JSON followed by a
//! newline.
//!
//! # Connection
//!
//! One SSH connection per sink, opened on the first apply and reused, with keepalives. Each
//! concurrent apply uses its own SFTP channel on that connection (at most
//! `max_concurrent_uploads`; idle channels are kept for the next apply). A connection that
//! fails is dropped and opened again on demand; attempts after a failure are spaced by the
//! sink's retry backoff, and applies in between fail at once with the last connection error
//! (unless the known_hosts file has changed since: then the next apply tries at once).
//!
//! # Error classification
//!
//! By error type and SFTP status code, never by message text:
//!
//! - **Permanent** (dead-lettered with the server's message): host key unknown, changed or
//!   revoked; authentication refused; no common algorithm; the server has no `sftp` subsystem;
//!   status `SSH_FX_PERMISSION_DENIED`; `SSH_FX_NO_SUCH_FILE` when creating the file (the
//!   directory is missing and `create_dirs` is off); `SSH_FX_BAD_MESSAGE` (OpenSSH's answer to
//!   a name that is too long or invalid) and `SSH_FX_OP_UNSUPPORTED`; names refused by the
//!   template or the path check, and two records with the same name.
//! - **Retryable**: connection refused or reset, DNS failures, timeouts, a connection lost
//!   mid-upload, channel open refusals (the server's `MaxSessions`), and the generic
//!   `SSH_FX_FAILURE` (OpenSSH's answer to a full disk, an I/O error, or a name that exists),
//!   whose text from the server goes into the message. The retry policy still dead-letters
//!   them after `max_attempts` or `max_age_secs`.

mod config;

use std::borrow::Cow;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use base64::Engine as _;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, client};
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::template::{Template, file_records, temp_name};
use super::{EventMeta, Sink, SinkError};
use crate::settings::RetryConfig;
use crate::settings::read_secret;
pub use config::SftpConfig;
pub(crate) use config::check_name_template;
use config::*;

/// Bytes per SFTP write request: every server must accept 32 KiB.
const CHUNK: usize = 32 * 1024;
/// Requests of one upload in flight at a time.
const WINDOW: usize = 16;

/// `dir` joined with relative components, with one `/` between.
pub(crate) fn join(dir: &str, parts: &[&str]) -> String {
    let mut out = dir.to_string();
    for part in parts {
        if !out.ends_with('/') {
            out.push('/');
        }
        out.push_str(part);
    }
    out
}

/// One file to upload.
#[derive(Debug)]
struct Planned {
    /// The remote directory (dir plus the name's parent components).
    dir: String,
    /// The final path.
    target: String,
    /// The hidden temporary path next to it.
    temp: String,
    content: Vec<u8>,
}

/// Known host keys (OpenSSH's known_hosts format).
mod known_hosts {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Marker {
        None,
        Revoked,
    }

    #[derive(Debug, Clone)]
    struct Entry {
        line: usize,
        marker: Marker,
        hosts: String,
        key: PublicKey,
    }

    /// A parsed known_hosts file.
    #[derive(Debug, Clone)]
    pub struct KnownHosts {
        path: PathBuf,
        entries: Vec<Entry>,
    }

    /// What the file says about a key offered by a host.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Verdict {
        Known,
        /// Listed as `@revoked` on this line.
        Revoked(usize),
        /// The host has other keys of the same type: (line, fingerprint) of each.
        Changed(Vec<(usize, String)>),
        /// The host has keys of other types only, or none.
        Unknown,
    }

    impl KnownHosts {
        /// Reads and parses a known_hosts file. Lines that cannot be parsed (unsupported key
        /// types, `@cert-authority`: certificates are not used) are skipped, as OpenSSH does.
        pub fn load(path: &Path) -> Result<KnownHosts, String> {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read {}: {e}: create it with ssh-keyscan, e.g. \
                     ssh-keyscan -p PORT HOST > {}, and check the keys it lists",
                    path.display(),
                    path.display()
                )
            })?;
            Ok(KnownHosts::parse(path, &text))
        }

        pub fn parse(path: &Path, text: &str) -> KnownHosts {
            let mut entries = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut fields = line.split_whitespace();
                let mut first = fields.next();
                let marker = match first {
                    Some("@revoked") => {
                        first = fields.next();
                        Marker::Revoked
                    }
                    Some(m) if m.starts_with('@') => continue,
                    _ => Marker::None,
                };
                let (Some(hosts), Some(_key_type), Some(blob)) =
                    (first, fields.next(), fields.next())
                else {
                    continue;
                };
                let Some(key) = base64::engine::general_purpose::STANDARD
                    .decode(blob)
                    .ok()
                    .and_then(|bytes| PublicKey::from_bytes(&bytes).ok())
                else {
                    continue;
                };
                entries.push(Entry {
                    line: n + 1,
                    marker,
                    hosts: hosts.to_string(),
                    key,
                });
            }
            KnownHosts {
                path: path.to_owned(),
                entries,
            }
        }

        pub fn path(&self) -> &Path {
            &self.path
        }

        /// The key algorithms recorded for the host, so that the key exchange asks the server
        /// for a key the file can vouch for.
        pub fn algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
            let name = host_port(host, port);
            self.entries
                .iter()
                .filter(|e| e.marker == Marker::None && matches_host(&e.hosts, &name))
                .map(|e| e.key.algorithm())
                .collect()
        }

        pub fn check(&self, host: &str, port: u16, offered: &PublicKey) -> Verdict {
            let name = host_port(host, port);
            let mut same_type = Vec::new();
            let mut known = false;
            for entry in &self.entries {
                if !matches_host(&entry.hosts, &name) {
                    continue;
                }
                let same = entry.key.key_data() == offered.key_data();
                match entry.marker {
                    Marker::Revoked if same => return Verdict::Revoked(entry.line),
                    Marker::Revoked => {}
                    Marker::None if same => known = true,
                    Marker::None => {
                        if entry.key.algorithm() == offered.algorithm() {
                            same_type.push((
                                entry.line,
                                entry.key.fingerprint(HashAlg::Sha256).to_string(),
                            ));
                        }
                    }
                }
            }
            if known {
                Verdict::Known
            } else if !same_type.is_empty() {
                Verdict::Changed(same_type)
            } else {
                Verdict::Unknown
            }
        }
    }

    /// The name OpenSSH looks a host up by: `host`, or `[host]:port` for ports other than 22.
    pub fn host_port(host: &str, port: u16) -> String {
        let host = host.to_ascii_lowercase();
        if port == 22 {
            host
        } else {
            format!("[{host}]:{port}")
        }
    }

    /// A comma-separated pattern list: hashed names (`|1|salt|hash`), wildcards `*` and `?`,
    /// negations `!pattern` (a matching negation excludes the host whatever else matches).
    fn matches_host(patterns: &str, name: &str) -> bool {
        let mut matched = false;
        for pattern in patterns.split(',') {
            if let Some(hashed) = pattern.strip_prefix("|1|") {
                if hashed_matches(hashed, name) {
                    matched = true;
                }
            } else if let Some(negated) = pattern.strip_prefix('!') {
                if wildcard(negated.to_ascii_lowercase().as_bytes(), name.as_bytes()) {
                    return false;
                }
            } else if wildcard(pattern.to_ascii_lowercase().as_bytes(), name.as_bytes()) {
                matched = true;
            }
        }
        matched
    }

    /// `salt|hash`, both base64: HMAC-SHA1 of the name keyed with the salt.
    fn hashed_matches(hashed: &str, name: &str) -> bool {
        let engine = base64::engine::general_purpose::STANDARD;
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        let (Ok(salt), Ok(hash)) = (engine.decode(salt), engine.decode(hash)) else {
            return false;
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok()
    }

    /// Glob matching with `*` (any run) and `?` (any one byte).
    pub(super) fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
                p += 1;
                t += 1;
            } else if p < pattern.len() && pattern[p] == b'*' {
                star = Some((p, t));
                p += 1;
            } else if let Some((sp, st)) = star {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        pattern[p..].iter().all(|&c| c == b'*')
    }
}

use known_hosts::{KnownHosts, Verdict};

/// How the server's host key is checked.
#[derive(Debug)]
enum HostKeyPolicy {
    Verify {
        known_hosts: Option<WatchedKnownHosts>,
        pins: Vec<[u8; 32]>,
    },
    Insecure,
}

/// What tells that a file changed: inode, length, modification time.
type FileStamp = (u64, u64, Option<std::time::SystemTime>);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()))
}

/// A known_hosts file, read again when it has changed, so that an operator's edit (a server's
/// new host key) counts from the next connection on, without a reload or a restart. An edit
/// that cannot be read leaves the keys read before in force, with a warning.
#[derive(Debug)]
struct WatchedKnownHosts {
    current: std::sync::Mutex<(Option<FileStamp>, Arc<KnownHosts>)>,
}

impl WatchedKnownHosts {
    fn new(known: KnownHosts) -> WatchedKnownHosts {
        let stamp = file_stamp(known.path());
        WatchedKnownHosts {
            current: std::sync::Mutex::new((stamp, Arc::new(known))),
        }
    }

    /// Reads the file again when it has changed (one `stat` when it has not); true when the
    /// keys were read anew.
    fn refresh(&self) -> bool {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let path = current.1.path().to_owned();
        let now = file_stamp(&path);
        if now.is_none() || now == current.0 {
            return false;
        }
        current.0 = now;
        match KnownHosts::load(&path) {
            Ok(fresh) => {
                tracing::info!(file = %path.display(), "known_hosts changed: its keys count from the next connection on");
                current.1 = Arc::new(fresh);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "known_hosts changed but cannot be read: the keys read before still count");
                false
            }
        }
    }

    /// The file as it is now.
    fn get(&self) -> Arc<KnownHosts> {
        self.refresh();
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}

/// The server's identity as shown in messages and logs.
#[derive(Debug, Clone)]
struct Target {
    /// The sink's key path, e.g. `sinks.court-calendar`.
    sink: String,
    host: String,
    port: u16,
    user: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "sftp://{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "sftp://{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

impl HostKeyPolicy {
    /// Reads the known_hosts file again when it has changed; true when it was.
    fn refresh(&self) -> bool {
        match self {
            HostKeyPolicy::Verify {
                known_hosts: Some(watched),
                ..
            } => watched.refresh(),
            _ => false,
        }
    }

    /// Ok when the key may be trusted; else the permanent error to report.
    fn check(&self, target: &Target, key: &PublicKey) -> Result<(), String> {
        let fingerprint = key.fingerprint(HashAlg::Sha256);
        let algorithm = key.algorithm();
        let pin_hint = format!(
            "if the server's operator confirms this key (ssh-keygen -lf on the server's \
             /etc/ssh/ssh_host_{}_key.pub prints its fingerprint), pin it with \
             host_key_fingerprints = [\"{fingerprint}\"]",
            match algorithm {
                Algorithm::Ed25519 => "ed25519",
                Algorithm::Ecdsa { .. } => "ecdsa",
                Algorithm::Rsa { .. } => "rsa",
                _ => "*",
            }
        );
        let HostKeyPolicy::Verify { known_hosts, pins } = self else {
            tracing::warn!(
                sink = %target.sink,
                server = %target,
                host_key = %fingerprint,
                "host key verification is off (insecure_skip_host_key_verification = true): \
                 anyone who can intercept the connection can receive the files; pin this key \
                 with host_key_fingerprints instead"
            );
            return Ok(());
        };
        if fingerprint.sha256().is_some_and(|d| pins.contains(&d)) {
            return Ok(());
        }
        let offered =
            format!("the server at {target} offered the {algorithm} host key {fingerprint}");
        if let Some(watched) = known_hosts {
            let known = watched.get();
            let file = known.path().display();
            match known.check(&target.host, target.port, key) {
                Verdict::Known => return Ok(()),
                Verdict::Revoked(line) => {
                    return Err(format!(
                        "{offered}, which line {line} of {file} marks @revoked: refusing to \
                         connect; the server must present its new key"
                    ));
                }
                Verdict::Changed(recorded) => {
                    let recorded: Vec<String> = recorded
                        .iter()
                        .map(|(line, fp)| format!("{fp} (line {line})"))
                        .collect();
                    return Err(format!(
                        "{offered}, but {file} records {} for this host: the key changed, \
                         which may be a man-in-the-middle attack; refusing to connect; {pin_hint}, \
                         or replace the line in {file}",
                        recorded.join(", ")
                    ));
                }
                Verdict::Unknown if pins.is_empty() => {
                    return Err(format!(
                        "{offered}, which {file} does not list for {}: the host is unknown; \
                         refusing to connect; {pin_hint}, or add it to {file}",
                        known_hosts::host_port(&target.host, target.port)
                    ));
                }
                Verdict::Unknown => {}
            }
        }
        Err(format!(
            "{offered}, which matches none of host_key_fingerprints: the key is not the pinned \
             one, which may be a man-in-the-middle attack; refusing to connect; {pin_hint}"
        ))
    }

    /// Host key algorithms in the order to ask for them: those the known_hosts file lists for
    /// the host first, so that a server with several keys presents one that can be verified.
    fn algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
        let mut all: Vec<Algorithm> = russh::Preferred::DEFAULT
            .key
            .iter()
            .filter(|a| cfg!(feature = "sftp-rsa") || !matches!(a, Algorithm::Rsa { .. }))
            .cloned()
            .collect();
        if let HostKeyPolicy::Verify {
            known_hosts: Some(watched),
            ..
        } = self
        {
            let listed = watched.get().algorithms(host, port);
            let is_listed = |a: &Algorithm| {
                listed.iter().any(|l| match (l, a) {
                    (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
                    (l, a) => l == a,
                })
            };
            all.sort_by_key(|a| !is_listed(a));
        }
        all
    }
}

/// Why a connection attempt failed before an SSH session existed.
#[derive(Debug)]
enum ConnectError {
    /// The host key was refused; the message says why and how to pin it.
    HostKey(String),
    Ssh(russh::Error),
}

impl From<russh::Error> for ConnectError {
    fn from(e: russh::Error) -> Self {
        ConnectError::Ssh(e)
    }
}

/// The russh client handler: checks the host key.
struct Client {
    policy: Arc<HostKeyPolicy>,
    target: Arc<Target>,
}

impl client::Handler for Client {
    type Error = ConnectError;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // Certificates are not asked for; their key is checked as a plain key.
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
                PublicKey::new(cert.public_key().clone(), "")
            }
        };
        self.policy
            .check(&self.target, &key)
            .map(|()| true)
            .map_err(ConnectError::HostKey)
    }
}

/// One SFTP channel and what its server supports.
struct Chan {
    raw: RawSftpSession,
    fsync: bool,
    posix_rename: bool,
}

/// The SSH connection and its idle SFTP channels.
struct Connection {
    handle: client::Handle<Client>,
    idle: Mutex<Vec<Chan>>,
    broken: AtomicBool,
}

impl Connection {
    fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && !self.handle.is_closed()
    }

    fn take_idle(&self) -> Option<Chan> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, chan: Chan) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(chan);
    }
}

/// Connection attempts, for the backoff between them.
#[derive(Default)]
struct Attempts {
    failures: u32,
    next_at: Option<Instant>,
    last_error: Option<SinkError>,
}

/// How the sink logs in.
struct Credentials {
    key: Option<Arc<PrivateKey>>,
    password: Option<String>,
}

/// A failed SFTP request: what was done, to which path, and the error.
#[derive(Debug)]
struct OpFailure {
    action: &'static str,
    path: String,
    error: SftpError,
    /// Whether `SSH_FX_NO_SUCH_FILE` means a missing directory (permanent) rather than a file
    /// that vanished underneath us (retryable).
    missing_is_permanent: bool,
}

impl OpFailure {
    fn new(action: &'static str, path: &str, error: SftpError) -> OpFailure {
        OpFailure {
            action,
            path: path.to_string(),
            error,
            missing_is_permanent: false,
        }
    }

    /// True when the channel itself failed (not a status answer from the server).
    fn is_transport(&self) -> bool {
        !matches!(self.error, SftpError::Status(_))
    }
}

/// The `sftp` sink.
pub struct SftpSink {
    target: Arc<Target>,
    policy: Arc<HostKeyPolicy>,
    credentials: Credentials,
    ssh: Arc<client::Config>,
    dir: String,
    create_dirs: bool,
    name: Template,
    file_mode: Option<u32>,
    connect_timeout: Duration,
    timeout: Duration,
    retry: RetryConfig,
    uploads: Semaphore,
    current: Mutex<Option<Arc<Connection>>>,
    /// Held while connecting, so that one attempt is made at a time.
    connecting: tokio::sync::Mutex<Attempts>,
    /// Counts finished connection attempts.
    attempt_count: AtomicU64,
}

impl std::fmt::Debug for SftpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("SftpSink")
            .field("server", &self.target.to_string())
            .field("dir", &self.dir)
            .field("name", &self.name.text())
            .finish_non_exhaustive()
    }
}

impl SftpSink {
    /// Builds the sink: reads the key, passphrase, password and known_hosts file. Opens no
    /// connection.
    pub fn new(config: &SftpConfig, key: &str) -> Result<SftpSink, String> {
        let name = check_name_template(&config.name).map_err(|e| format!("name: {e}"))?;
        let file_mode = config
            .file_mode
            .as_deref()
            .map(super::file::parse_mode)
            .transpose()
            .map_err(|e| format!("file_mode: {e}"))?;
        let pins = config
            .host_key_fingerprints
            .iter()
            .map(|f| parse_fingerprint(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("host_key_fingerprints: {e}"))?;
        let policy = if config.insecure_skip_host_key_verification {
            HostKeyPolicy::Insecure
        } else {
            let known_hosts = config
                .known_hosts
                .as_deref()
                .map(KnownHosts::load)
                .transpose()
                .map_err(|e| format!("known_hosts: {e}"))?
                .map(WatchedKnownHosts::new);
            if known_hosts.is_none() && pins.is_empty() {
                return Err(format!("known_hosts: {UNVERIFIED}"));
            }
            HostKeyPolicy::Verify { known_hosts, pins }
        };
        let passphrase = config
            .private_key_passphrase
            .as_ref()
            .map(read_secret)
            .transpose()
            .map_err(|e| format!("private_key_passphrase: {e}"))?;
        let private_key = config
            .private_key
            .as_deref()
            .map(|path| load_private_key(path, passphrase.as_deref()))
            .transpose()
            .map_err(|e| format!("private_key: {e}"))?;
        let password = config
            .password
            .as_ref()
            .map(read_secret)
            .transpose()
            .map_err(|e| format!("password: {e}"))?;
        if private_key.is_none() && password.is_none() {
            return Err("private_key: set private_key or password".into());
        }
        if config.connect_timeout_ms == 0 || config.timeout_ms == 0 {
            return Err("timeout_ms: must be at least 1".into());
        }
        if config.max_concurrent_uploads == 0 || config.max_concurrent_uploads > MAX_UPLOADS {
            return Err(format!(
                "max_concurrent_uploads: must be 1 to {MAX_UPLOADS}"
            ));
        }
        let host = config.host.trim().to_string();
        let mut ssh = client::Config {
            keepalive_interval: (config.keepalive_secs > 0)
                .then(|| Duration::from_secs(config.keepalive_secs)),
            keepalive_max: 3,
            // Small files are a handful of request/answer round trips: no Nagle delays.
            nodelay: true,
            ..client::Config::default()
        };
        ssh.preferred.key = Cow::Owned(policy.algorithms(&host, config.port));
        Ok(SftpSink {
            target: Arc::new(Target {
                sink: key.to_string(),
                host,
                port: config.port,
                user: config.user.clone(),
            }),
            policy: Arc::new(policy),
            credentials: Credentials {
                key: private_key.map(Arc::new),
                password,
            },
            ssh: Arc::new(ssh),
            dir: config.dir.clone(),
            create_dirs: config.create_dirs,
            name,
            file_mode,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            timeout: Duration::from_millis(config.timeout_ms),
            retry: config.retry.clone(),
            uploads: Semaphore::new(config.max_concurrent_uploads),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(Attempts::default()),
            attempt_count: AtomicU64::new(0),
        })
    }

    /// Renders and checks every record's name and content. Pure: nothing is sent.
    fn plan(&self, event: &EventMeta, output: &Value) -> Result<Vec<Planned>, SinkError> {
        let records = file_records(&self.name, event, output)?;
        Ok(records
            .into_iter()
            .enumerate()
            .map(|(index, record)| {
                let parents: Vec<&str> = record.parents.iter().map(String::as_str).collect();
                let dir = join(&self.dir, &parents);
                Planned {
                    target: join(&dir, &[&record.file_name]),
                    temp: join(&dir, &[&temp_name(&record.file_name, event, index)]),
                    dir,
                    content: record.content,
                }
            })
            .collect())
    }

    /// The connection, opened when there is none or it failed. One attempt at a time; after a
    /// failure, no new attempt is made before the backoff has passed.
    async fn connection(&self) -> Result<Arc<Connection>, SinkError> {
        if let Some(conn) = self.current_usable() {
            return Ok(conn);
        }
        let seen = self.attempt_count.load(Ordering::Acquire);
        let mut attempts = self.connecting.lock().await;
        if let Some(conn) = self.current_usable() {
            return Ok(conn);
        }
        // An attempt that finished while we waited for the lock speaks for this one too.
        if self.attempt_count.load(Ordering::Acquire) != seen
            && let Some(error) = &attempts.last_error
        {
            return Err(error.clone());
        }
        // An operator who recorded a server's new key in known_hosts gets an attempt at once.
        let edited = self.policy.refresh();
        if let (Some(at), Some(error)) = (attempts.next_at, &attempts.last_error)
            && at > Instant::now()
            && !edited
        {
            return Err(with_note(
                error,
                &format!(
                    "the next connection attempt is in {} ms",
                    (at - Instant::now()).as_millis()
                ),
            ));
        }
        let result = match tokio::time::timeout(self.connect_timeout, self.connect()).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::Retryable(format!(
                "cannot connect to {}: no session within {} ms (connect_timeout_ms); the \
                 upload will be retried",
                self.target,
                self.connect_timeout.as_millis()
            ))),
        };
        self.attempt_count.fetch_add(1, Ordering::Release);
        match result {
            Ok(conn) => {
                *attempts = Attempts::default();
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
                Ok(conn)
            }
            Err(error) => {
                attempts.failures = attempts.failures.saturating_add(1);
                let delay = self.retry.delay(attempts.failures, rand::random::<f64>());
                attempts.next_at = Some(Instant::now() + delay);
                attempts.last_error = Some(error.clone());
                tracing::warn!(sink = %self.target.sink, server = %self.target, error = %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to the sftp server");
                Err(error)
            }
        }
    }

    fn current_usable(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| c.usable())
            .cloned()
    }

    /// Connects, checks the host key and authenticates.
    async fn connect(&self) -> Result<Arc<Connection>, SinkError> {
        let target = &self.target;
        let handler = Client {
            policy: self.policy.clone(),
            target: self.target.clone(),
        };
        let mut handle = client::connect(
            self.ssh.clone(),
            (target.host.as_str(), target.port),
            handler,
        )
        .await
        .map_err(|e| match e {
            ConnectError::HostKey(message) => SinkError::Permanent(message),
            ConnectError::Ssh(russh::Error::NoCommonAlgo { kind, theirs, .. }) => {
                SinkError::Permanent(format!(
                    "cannot connect to {target}: no {kind:?} algorithm in common with the \
                     server (it offers {}); RSA host keys need a build with the sftp-rsa \
                     feature, or an ed25519 host key on the server",
                    theirs.join(", ")
                ))
            }
            ConnectError::Ssh(e) => SinkError::Retryable(format!(
                "cannot connect to {target}: {e}; the upload will be retried"
            )),
        })?;
        let mut refused = Vec::new();
        let mut authenticated = false;
        if let Some(key) = &self.credentials.key {
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| ssh_failure(target, "authenticating", &e))?
                    .flatten()
            } else {
                None
            };
            let result = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(key.clone(), hash),
                )
                .await
                .map_err(|e| ssh_failure(target, "authenticating", &e))?;
            if result.success() {
                authenticated = true;
            } else {
                refused.push(format!(
                    "the key {}",
                    key.public_key().fingerprint(HashAlg::Sha256)
                ));
            }
        }
        if !authenticated && let Some(password) = &self.credentials.password {
            let result = handle
                .authenticate_password(target.user.clone(), password.clone())
                .await
                .map_err(|e| ssh_failure(target, "authenticating", &e))?;
            if result.success() {
                authenticated = true;
            } else {
                refused.push("the password".into());
            }
        }
        if !authenticated {
            let fix = match (&self.credentials.key, &self.credentials.password) {
                (Some(_), None) => "add the public key to the user's authorized_keys on the server",
                (None, _) => "fix the password",
                (Some(_), Some(_)) => {
                    "add the public key to the user's authorized_keys on the server, or fix the \
                     password"
                }
            };
            return Err(SinkError::Permanent(format!(
                "{target} refused {} for user {}: {fix}, then replay the event",
                refused.join(" and "),
                target.user
            )));
        }
        tracing::info!(sink = %target.sink, server = %target, "connected to the sftp server");
        Ok(Arc::new(Connection {
            handle,
            idle: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
        }))
    }

    /// An idle channel of the connection, or a new one.
    async fn channel(&self, conn: &Connection) -> Result<Chan, SinkError> {
        if let Some(chan) = conn.take_idle() {
            return Ok(chan);
        }
        let target = &self.target;
        let mut channel = conn.handle.channel_open_session().await.map_err(|e| {
            if !matches!(e, russh::Error::ChannelOpenFailure(_)) {
                conn.broken.store(true, Ordering::Relaxed);
            }
            SinkError::Retryable(format!(
                "cannot open a channel to {target}: {e}; the upload will be retried (if the \
                 server limits sessions per connection, e.g. OpenSSH's MaxSessions, keep \
                 max_concurrent_uploads below it)"
            ))
        })?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| ssh_failure(target, "requesting the sftp subsystem", &e))?;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err(SinkError::Permanent(format!(
                        "{target} refused the sftp subsystem: enable it on the server (OpenSSH: \
                         Subsystem sftp internal-sftp), then replay the event"
                    )));
                }
                Some(_) => continue,
                None => {
                    conn.broken.store(true, Ordering::Relaxed);
                    return Err(SinkError::Retryable(format!(
                        "{target} closed the channel while starting sftp; the upload will be \
                         retried"
                    )));
                }
            }
        }
        let config = russh_sftp::client::Config {
            request_timeout_secs: self.timeout.as_secs().max(1),
            ..russh_sftp::client::Config::default()
        };
        let raw = RawSftpSession::new_with_config(channel.into_stream(), config);
        let version = raw.init().await.map_err(|e| {
            conn.broken.store(true, Ordering::Relaxed);
            SinkError::Retryable(format!(
                "cannot start sftp on {target}: {e}; the upload will be retried"
            ))
        })?;
        let has = |name: &str| version.extensions.get(name).is_some_and(|v| v == "1");
        let chan = Chan {
            raw,
            fsync: has("fsync@openssh.com"),
            posix_rename: has("posix-rename@openssh.com"),
        };
        if !chan.posix_rename {
            tracing::warn!(sink = %target.sink, server = %target, "the sftp server has no posix-rename@openssh.com: a file replaced by a retry is removed before the new one is renamed into place, so a reader may briefly see no file");
        }
        if !chan.fsync {
            tracing::warn!(sink = %target.sink, server = %target, "the sftp server has no fsync@openssh.com: files are renamed into place without being flushed to its disk first");
        }
        Ok(chan)
    }

    /// Uploads every record to its temporary name, then renames them all into place.
    async fn upload(&self, chan: &Chan, planned: &[Planned]) -> Result<(), OpFailure> {
        for (i, record) in planned.iter().enumerate() {
            if let Err(e) = self.write_temp(chan, record).await {
                if !e.is_transport() {
                    discard(chan, &planned[..=i]).await;
                }
                return Err(e);
            }
        }
        for (i, record) in planned.iter().enumerate() {
            if let Err(e) = rename(chan, record).await {
                if !e.is_transport() {
                    discard(chan, &planned[i..]).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Creates, fills, fsyncs and closes one temporary file.
    async fn write_temp(&self, chan: &Chan, record: &Planned) -> Result<(), OpFailure> {
        let handle = match self.create_temp(chan, record).await {
            Err(e)
                if self.create_dirs
                    && matches!(&e.error, SftpError::Status(s) if s.status_code == StatusCode::NoSuchFile) =>
            {
                self.make_dirs(chan, &record.dir).await?;
                self.create_temp(chan, record).await?
            }
            other => other?,
        };
        let mut steps: Vec<Step<'_>> = record
            .content
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, chunk)| Step::Write((i * CHUNK) as u64, chunk))
            .collect();
        if let Some(mode) = self.file_mode {
            steps.push(Step::Mode(mode));
        }
        if chan.fsync {
            steps.push(Step::Fsync);
        }
        let mut result = Ok(());
        for window in steps.chunks(WINDOW) {
            let requests = window
                .iter()
                .map(|step| step.send(&chan.raw, &handle))
                .collect();
            let failed = in_order(requests)
                .await
                .into_iter()
                .zip(window)
                .find_map(|(r, step)| {
                    r.err()
                        .map(|e| OpFailure::new(step.action(), &record.temp, e))
                });
            if let Some(failure) = failed {
                result = Err(failure);
                break;
            }
        }
        match result {
            Ok(()) => chan
                .raw
                .close(handle)
                .await
                .map(|_| ())
                .map_err(|e| OpFailure::new("cannot close", &record.temp, e)),
            Err(failure) => {
                if !failure.is_transport() {
                    let _ = chan.raw.close(handle).await;
                }
                Err(failure)
            }
        }
    }

    /// Removes a leftover of an earlier attempt and creates the temporary file exclusively;
    /// both requests go out together.
    async fn create_temp(&self, chan: &Chan, record: &Planned) -> Result<String, OpFailure> {
        let attrs = FileAttributes {
            permissions: self.file_mode,
            ..FileAttributes::empty()
        };
        let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE;
        let raw = &chan.raw;
        let requests: Vec<Pending<'_, Option<String>>> = vec![
            Box::pin(async { raw.remove(record.temp.as_str()).await.map(|_| None) }),
            Box::pin(async move {
                raw.open(record.temp.as_str(), flags, attrs)
                    .await
                    .map(|h| Some(h.handle))
            }),
        ];
        // The removal usually finds nothing; only the creation matters.
        match in_order(requests).await.pop() {
            Some(Ok(Some(handle))) => Ok(handle),
            Some(Err(error)) => Err(OpFailure {
                missing_is_permanent: true,
                ..OpFailure::new("cannot create", &record.temp, error)
            }),
            _ => Err(OpFailure::new(
                "cannot create",
                &record.temp,
                SftpError::UnexpectedPacket,
            )),
        }
    }

    /// Creates the missing levels of `dir`, from the top.
    async fn make_dirs(&self, chan: &Chan, dir: &str) -> Result<(), OpFailure> {
        let mut prefixes = Vec::new();
        for (i, c) in dir.char_indices() {
            if c == '/' && i > 0 {
                prefixes.push(&dir[..i]);
            }
        }
        if !dir.ends_with('/') {
            prefixes.push(dir);
        }
        for prefix in prefixes.into_iter().filter(|p| *p != ".") {
            match chan.raw.stat(prefix).await {
                Ok(_) => continue,
                Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => {}
                Err(e) => return Err(OpFailure::new("cannot inspect", prefix, e)),
            }
            if let Err(e) = chan.raw.mkdir(prefix, FileAttributes::empty()).await {
                // Another writer may have created it in the meantime.
                if chan.raw.stat(prefix).await.is_err() {
                    return Err(OpFailure {
                        missing_is_permanent: true,
                        ..OpFailure::new("cannot create the directory", prefix, e)
                    });
                }
            }
        }
        Ok(())
    }

    /// The error to report for a failed request.
    fn classify(&self, failure: &OpFailure) -> SinkError {
        let target = &self.target;
        let OpFailure {
            action,
            path,
            error,
            ..
        } = failure;
        let SftpError::Status(status) = error else {
            return SinkError::Retryable(format!(
                "{action} {path} on {target}: {error}; the upload will be retried on a new \
                 connection"
            ));
        };
        let server = if status.error_message.is_empty() {
            String::new()
        } else {
            format!(" (the server said {:?})", status.error_message)
        };
        match status.status_code {
            StatusCode::PermissionDenied => SinkError::Permanent(format!(
                "{action} {path} on {target}: permission denied{server}: give user {} write \
                 access to the directory on the server, then replay the event",
                target.user
            )),
            StatusCode::NoSuchFile if failure.missing_is_permanent => {
                SinkError::Permanent(format!(
                    "{action} {path} on {target}: no such directory{server}: create it on the \
                     server or set create_dirs = true, then replay the event"
                ))
            }
            StatusCode::BadMessage => SinkError::Permanent(format!(
                "{action} {path} on {target}: the server refused the request as invalid{server} \
                 (a name too long or not valid there): change the name template, then replay \
                 the event"
            )),
            StatusCode::OpUnsupported => SinkError::Permanent(format!(
                "{action} {path} on {target}: the server does not support this{server}"
            )),
            _ => SinkError::Retryable(format!(
                "{action} {path} on {target}: {}{server}; the upload will be retried",
                status.status_code
            )),
        }
    }
}

/// A permanent or retryable error from an SSH request after the session exists.
fn ssh_failure(target: &Target, doing: &str, e: &russh::Error) -> SinkError {
    SinkError::Retryable(format!(
        "{doing} on {target} failed: {e}; the upload will be retried"
    ))
}

/// The same error with a note appended.
fn with_note(error: &SinkError, note: &str) -> SinkError {
    match error {
        SinkError::Retryable(m) => SinkError::Retryable(format!("{m} ({note})")),
        SinkError::RetryAfter(m, after) => SinkError::RetryAfter(format!("{m} ({note})"), *after),
        SinkError::Permanent(m) => SinkError::Permanent(m.clone()),
    }
}

/// One request of an upload.
enum Step<'a> {
    Write(u64, &'a [u8]),
    Mode(u32),
    Fsync,
}

impl<'a> Step<'a> {
    fn action(&self) -> &'static str {
        match self {
            Step::Write(..) => "cannot write",
            Step::Mode(_) => "cannot set the mode of",
            Step::Fsync => "cannot fsync",
        }
    }

    fn send<'s>(&'s self, raw: &'s RawSftpSession, handle: &'s str) -> Pending<'s, ()> {
        match *self {
            Step::Write(offset, data) => {
                Box::pin(async move { raw.write(handle, offset, data.to_vec()).await.map(|_| ()) })
            }
            Step::Mode(mode) => Box::pin(async move {
                let attrs = FileAttributes {
                    permissions: Some(mode),
                    ..FileAttributes::empty()
                };
                raw.fsetstat(handle, attrs).await.map(|_| ())
            }),
            Step::Fsync => Box::pin(async move { raw.fsync(handle).await.map(|_| ()) }),
        }
    }
}

/// Renames a temporary file over its target.
async fn rename(chan: &Chan, record: &Planned) -> Result<(), OpFailure> {
    let raw = &chan.raw;
    if chan.posix_rename {
        let mut data = Vec::with_capacity(8 + record.temp.len() + record.target.len());
        for path in [&record.temp, &record.target] {
            data.extend_from_slice(&(path.len() as u32).to_be_bytes());
            data.extend_from_slice(path.as_bytes());
        }
        let answer = raw.extended("posix-rename@openssh.com", data).await;
        return status_of(answer)
            .map_err(|e| OpFailure::new("cannot rename into", &record.target, e));
    }
    // A plain SFTP rename refuses to replace a file: remove the old one first (not atomic).
    let requests: Vec<Pending<'_, ()>> = vec![
        Box::pin(async { raw.remove(record.target.as_str()).await.map(|_| ()) }),
        Box::pin(async {
            raw.rename(record.temp.as_str(), record.target.as_str())
                .await
                .map(|_| ())
        }),
    ];
    match in_order(requests).await.pop() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(OpFailure::new("cannot rename into", &record.target, e)),
        None => Err(OpFailure::new(
            "cannot rename into",
            &record.target,
            SftpError::UnexpectedPacket,
        )),
    }
}

/// An extended request's answer as a status.
fn status_of(answer: Result<Packet, SftpError>) -> Result<(), SftpError> {
    match answer? {
        Packet::Status(s) if s.status_code == StatusCode::Ok => Ok(()),
        Packet::Status(s) => Err(SftpError::Status(s)),
        _ => Err(SftpError::UnexpectedPacket),
    }
}

/// Removes the temporary files of records, best effort: a leftover is also replaced by the
/// next attempt at the same event.
async fn discard(chan: &Chan, records: &[Planned]) {
    let raw = &chan.raw;
    let requests: Vec<Pending<'_, ()>> = records
        .iter()
        .map(|r| -> Pending<'_, ()> {
            Box::pin(async move { raw.remove(r.temp.as_str()).await.map(|_| ()) })
        })
        .collect();
    let _ = in_order(requests).await;
}

/// A request on its way.
type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, SftpError>> + Send + 'a>>;

/// Sends requests in the given order without waiting for each answer, then waits for all.
///
/// A request future sends its packet the first time it is polled, and the SFTP server handles
/// the requests of one channel in the order they arrive; polling every future once, in order,
/// before waiting pipelines them.
async fn in_order<T>(mut requests: Vec<Pending<'_, T>>) -> Vec<Result<T, SftpError>> {
    let mut results: Vec<Option<Result<T, SftpError>>> = requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (request, slot) in requests.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match request.as_mut().poll(cx) {
                    Poll::Ready(result) => *slot = Some(result),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// Loads a private key, refusing types this build cannot sign with.
fn load_private_key(path: &Path, passphrase: Option<&str>) -> Result<PrivateKey, String> {
    let key = russh::keys::load_secret_key(path, passphrase).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => format!(
            "{} is encrypted: set private_key_passphrase = {{ file = \"…\" }} or {{ env = \"…\" }}",
            path.display()
        ),
        russh::keys::Error::IO(e) => format!("cannot read {}: {e}", path.display()),
        e => format!(
            "cannot load {} ({e}): it must be an OpenSSH private key (ssh-keygen -t ed25519), \
             and the passphrase, if any, must be right",
            path.display()
        ),
    })?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => Ok(key),
        Algorithm::Rsa { .. } if cfg!(feature = "sftp-rsa") => Ok(key),
        Algorithm::Rsa { .. } => Err(format!(
            "{} is an RSA key, which this build does not support (the RSA implementation has \
             an unfixed advisory): use an ed25519 key (ssh-keygen -t ed25519), or build with \
             --features sftp-rsa",
            path.display()
        )),
        other => Err(format!(
            "{} is a {other} key: use an ed25519 or ECDSA key (ssh-keygen -t ed25519)",
            path.display()
        )),
    }
}

#[async_trait::async_trait]
impl Sink for SftpSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        let planned = self.plan(event, output)?;
        if planned.is_empty() {
            return Ok(());
        }
        let Ok(_permit) = self.uploads.acquire().await else {
            return Err(SinkError::Retryable("the sink is shutting down".into()));
        };
        let conn = self.connection().await?;
        let work = async {
            let chan = self.channel(&conn).await?;
            match self.upload(&chan, &planned).await {
                Ok(()) => {
                    conn.put_back(chan);
                    Ok(())
                }
                Err(failure) => {
                    if failure.is_transport() {
                        conn.broken.store(true, Ordering::Relaxed);
                    } else {
                        conn.put_back(chan);
                    }
                    Err(self.classify(&failure))
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                // The server stopped answering: do not reuse this connection.
                conn.broken.store(true, Ordering::Relaxed);
                Err(SinkError::Retryable(format!(
                    "the upload to {} did not finish within {} ms (timeout_ms); it will be \
                     retried on a new connection",
                    self.target,
                    self.timeout.as_millis()
                )))
            }
        }
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let conn = self.connection().await?;
        let work = async {
            let chan = self.channel(&conn).await?;
            match chan.raw.stat(self.dir.as_str()).await {
                Ok(_) => {
                    conn.put_back(chan);
                    Ok(())
                }
                Err(SftpError::Status(s))
                    if s.status_code == StatusCode::NoSuchFile && self.create_dirs =>
                {
                    conn.put_back(chan);
                    Ok(())
                }
                Err(error) => {
                    let failure = OpFailure {
                        missing_is_permanent: true,
                        ..OpFailure::new("cannot inspect", &self.dir, error)
                    };
                    if failure.is_transport() {
                        conn.broken.store(true, Ordering::Relaxed);
                    } else {
                        conn.put_back(chan);
                    }
                    Err(self.classify(&failure))
                }
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                conn.broken.store(true, Ordering::Relaxed);
                Err(SinkError::Retryable(format!(
                    "{} did not answer within {} ms",
                    self.target,
                    self.timeout.as_millis()
                )))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::SecretSource;
    use crate::sink::SinkSpec;
    use russh_sftp::protocol::Status;
    use serde_json::json;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGSITcg/5/KJSvy+tqhuE/Dj0QgPKbkO8/CD+wQQIHz+";
    const FP_A: &str = "SHA256:3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdINLD58dIqCDHhHCNCGRFx6WvIn6iH4YLestJ+2L5P";
    const FP_B: &str = "SHA256:ty/hJTgVUdHGTxbiQK4s6XN4MR+YJWcjzZC7SaIVrpc";
    const KEY_C: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEZHsP48yyftr4N7X+nkrEcQk8J4wvr4Xzf1OelclvPV9tHBHLcw430KaLmQVRIvCbwum2pob1Xy4WfwAEPtWEQ=";

    fn key(line: &str) -> PublicKey {
        PublicKey::from_openssh(line).unwrap()
    }

    fn event() -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "case.updated".into(),
            version: 1,
            subject: "case-42".into(),
            revision: Some(3),
            source: None,
            route: "courts".into(),
            partner: "p1".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn config() -> SftpConfig {
        SftpConfig {
            host: "sftp.partner.example".into(),
            port: 22,
            user: "ess".into(),
            private_key: Some("/etc/ess-agent/id_ed25519".into()),
            private_key_passphrase: None,
            password: None,
            known_hosts: None,
            host_key_fingerprints: vec![FP_A.into()],
            insecure_skip_host_key_verification: false,
            dir: "/upload".into(),
            create_dirs: false,
            name: "{subject}/{id}.xml".into(),
            file_mode: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            timeout_ms: default_timeout_ms(),
            keepalive_secs: default_keepalive_secs(),
            max_concurrent_uploads: default_max_concurrent_uploads(),
            retry: RetryConfig::default(),
        }
    }

    fn problems(c: &SftpConfig) -> Vec<String> {
        c.validate("sinks.s")
            .into_iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect()
    }

    /// A sink that logs in with a password from a file (no key file needed).
    fn sink(dir: &Path, c: SftpConfig) -> SftpSink {
        let secret = dir.join("password");
        std::fs::write(&secret, "pw").unwrap();
        let c = SftpConfig {
            private_key: None,
            password: Some(SecretSource {
                file: Some(secret),
                env: None,
                credential: None,
            }),
            ..c
        };
        SftpSink::new(&c, "sinks.s").unwrap()
    }

    #[test]
    fn a_complete_configuration_is_valid_and_parses_from_toml() {
        assert_eq!(problems(&config()), Vec::<String>::new());
        let parsed: SftpConfig = toml::from_str(
            r#"
            host = "sftp.partner.example"
            user = "ess"
            private_key = "/etc/ess-agent/id_ed25519"
            host_key_fingerprints = ["SHA256:3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI"]
            dir = "/upload"
            name = "{subject}/{id}.xml"
            "#,
        )
        .unwrap();
        assert_eq!(parsed, config());
        let unknown = toml::from_str::<SftpConfig>(
            "host = \"h\"\nuser = \"u\"\ndir = \"d\"\nname = \"n\"\nstrict = false\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn host_key_verification_cannot_be_left_out() {
        let mut c = config();
        c.host_key_fingerprints.clear();
        let p = problems(&c);
        assert!(
            p.iter()
                .any(|p| p
                    .starts_with("sinks.s.known_hosts: the server's host key must be verified")),
            "{p:?}"
        );
        c.insecure_skip_host_key_verification = true;
        assert_eq!(problems(&c), Vec::<String>::new());
        c.known_hosts = Some("/etc/ess-agent/known_hosts".into());
        let p = problems(&c);
        assert!(
            p.iter()
                .any(|p| p.contains("insecure_skip_host_key_verification: cannot be combined")),
            "{p:?}"
        );
        // Building refuses it too, whatever validation was run.
        let tmp = tempfile::tempdir().unwrap();
        let mut c = config();
        c.host_key_fingerprints.clear();
        c.private_key = None;
        c.password = Some(SecretSource {
            file: None,
            env: Some("PATH".into()),
            credential: None,
        });
        let e = SftpSink::new(&c, "sinks.s").unwrap_err();
        assert!(e.contains("host key must be verified"), "{e}");
        drop(tmp);
    }

    #[test]
    fn fingerprints_are_checked_as_ssh_keygen_prints_them() {
        assert!(parse_fingerprint(FP_A).is_ok());
        assert_eq!(
            parse_fingerprint(&format!("{FP_A}=")),
            parse_fingerprint(FP_A)
        );
        for bad in [
            "3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI",
            "MD5:aa:bb",
            "SHA256:short",
            "SHA256:!!!",
        ] {
            let e = parse_fingerprint(bad).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("ssh-keygen -lf"),
                "{e}"
            );
        }
        let mut c = config();
        c.host_key_fingerprints.push("SHA1:x".into());
        assert!(
            problems(&c)
                .iter()
                .any(|p| p.starts_with("sinks.s.host_key_fingerprints[1]"))
        );
    }

    #[test]
    fn every_field_is_checked() {
        let mut c = config();
        c.host = "ess@sftp.example".into();
        c.port = 0;
        c.user = String::new();
        c.private_key = None;
        c.private_key_passphrase = Some(SecretSource {
            file: Some("a".into()),
            env: Some("B".into()),
            credential: None,
        });
        c.dir = String::new();
        c.name = "../{id}".into();
        c.file_mode = Some("0999".into());
        c.timeout_ms = 0;
        c.connect_timeout_ms = 0;
        c.max_concurrent_uploads = 0;
        let keys: Vec<String> = problems(&c)
            .iter()
            .map(|p| p.split(':').next().unwrap().to_string())
            .collect();
        for key in [
            "sinks.s.host",
            "sinks.s.port",
            "sinks.s.user",
            "sinks.s.private_key",
            "sinks.s.private_key_passphrase",
            "sinks.s.dir",
            "sinks.s.name",
            "sinks.s.file_mode",
            "sinks.s.timeout_ms",
            "sinks.s.connect_timeout_ms",
            "sinks.s.max_concurrent_uploads",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
        }
        let mut c = config();
        c.name = "/abs/{id}".into();
        assert!(problems(&c).iter().any(|p| p.contains("is absolute")));
        c.max_concurrent_uploads = MAX_UPLOADS + 1;
        assert!(
            problems(&c)
                .iter()
                .any(|p| p.starts_with("sinks.s.max_concurrent_uploads"))
        );
    }

    #[test]
    fn known_hosts_matches_plain_bracketed_hashed_and_wildcard_names() {
        // The hashed form of "[10.0.0.5]:2222", as ssh-keygen -H writes it.
        let salt = b"0123456789abcdefghij";
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt),
            b"[10.0.0.5]:2222",
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let hashed = format!("|1|{}|{}", b64.encode(salt), b64.encode(tag.as_ref()));
        let text = format!(
            "# comment\n\
             \n\
             sftp.partner.example,192.0.2.7 {KEY_A} comment here\n\
             [sftp.partner.example]:2222\t{KEY_B}\n\
             {hashed} {KEY_A}\n\
             *.courts.example,!evil.courts.example {KEY_B}\n\
             @cert-authority * {KEY_C}\n\
             garbage line\n\
             bad.example ssh-ed25519 !!!notbase64\n"
        );
        let known = KnownHosts::parse(Path::new("kh"), &text);
        let (a, b, c) = (key(KEY_A), key(KEY_B), key(KEY_C));
        assert_eq!(known.check("sftp.partner.example", 22, &a), Verdict::Known);
        assert_eq!(known.check("SFTP.Partner.Example", 22, &a), Verdict::Known);
        assert_eq!(known.check("192.0.2.7", 22, &a), Verdict::Known);
        // Port 22 entries do not vouch for other ports, and vice versa.
        assert_eq!(
            known.check("sftp.partner.example", 2222, &b),
            Verdict::Known
        );
        assert_eq!(
            known.check("sftp.partner.example", 2222, &a),
            Verdict::Changed(vec![(4, FP_B.into())])
        );
        assert_eq!(known.check("10.0.0.5", 2222, &a), Verdict::Known);
        assert_eq!(known.check("10.0.0.5", 22, &a), Verdict::Unknown);
        assert_eq!(known.check("north.courts.example", 22, &b), Verdict::Known);
        assert_eq!(
            known.check("evil.courts.example", 22, &b),
            Verdict::Unknown,
            "a negated pattern excludes the host"
        );
        // A key of another type than those recorded is unknown, not changed; CA lines are
        // not host keys.
        assert_eq!(
            known.check("sftp.partner.example", 22, &c),
            Verdict::Unknown
        );
        assert_eq!(known.check("anything.example", 22, &c), Verdict::Unknown);
        assert_eq!(
            known.check("sftp.partner.example", 22, &b),
            Verdict::Changed(vec![(3, FP_A.into())])
        );
        assert_eq!(
            known.algorithms("sftp.partner.example", 22),
            [Algorithm::Ed25519]
        );
    }

    #[test]
    fn revoked_keys_are_refused_even_when_listed() {
        let text = format!("h.example {KEY_A}\n@revoked * {KEY_A}\n");
        let known = KnownHosts::parse(Path::new("kh"), &text);
        assert_eq!(
            known.check("h.example", 22, &key(KEY_A)),
            Verdict::Revoked(2)
        );
        assert_eq!(
            known.check("h.example", 22, &key(KEY_B)),
            Verdict::Changed(vec![(1, FP_A.into())])
        );
    }

    #[test]
    fn wildcards_match_like_openssh() {
        use known_hosts::wildcard;
        assert!(wildcard(b"*", b"anything"));
        assert!(wildcard(b"*.example", b"a.b.example"));
        assert!(!wildcard(b"*.example", b"example"));
        assert!(wildcard(b"host?", b"host1"));
        assert!(!wildcard(b"host?", b"host12"));
        assert!(wildcard(b"a*b*c", b"aXXbYYc"));
        assert!(!wildcard(b"a*b*c", b"aXXbYY"));
        assert!(wildcard(b"[h]:*", b"[h]:2222"));
    }

    fn target() -> Target {
        Target {
            sink: "sinks.s".into(),
            host: "h.example".into(),
            port: 2222,
            user: "ess".into(),
        }
    }

    #[test]
    fn the_policy_accepts_pinned_or_known_keys_and_says_how_to_pin_others() {
        let pins = HostKeyPolicy::Verify {
            known_hosts: None,
            pins: vec![parse_fingerprint(FP_A).unwrap()],
        };
        assert!(pins.check(&target(), &key(KEY_A)).is_ok());
        let e = pins.check(&target(), &key(KEY_B)).unwrap_err();
        assert!(
            e.contains(FP_B) && e.contains(&format!("host_key_fingerprints = [\"{FP_B}\"]")),
            "{e}"
        );
        assert!(e.contains("sftp://ess@h.example:2222"), "{e}");

        let known = KnownHosts::parse(Path::new("/etc/kh"), &format!("[h.example]:2222 {KEY_A}\n"));
        let both = HostKeyPolicy::Verify {
            known_hosts: Some(WatchedKnownHosts::new(known.clone())),
            pins: vec![parse_fingerprint(FP_B).unwrap()],
        };
        assert!(both.check(&target(), &key(KEY_A)).is_ok(), "known");
        assert!(both.check(&target(), &key(KEY_B)).is_ok(), "pinned");
        let only_file = HostKeyPolicy::Verify {
            known_hosts: Some(WatchedKnownHosts::new(known)),
            pins: vec![],
        };
        let e = only_file.check(&target(), &key(KEY_B)).unwrap_err();
        assert!(
            e.contains(FP_B) && e.contains(FP_A) && e.contains("man-in-the-middle"),
            "{e}"
        );
        let e = only_file.check(&target(), &key(KEY_C)).unwrap_err();
        assert!(
            e.contains("unknown") && e.contains("[h.example]:2222"),
            "{e}"
        );
        assert!(
            HostKeyPolicy::Insecure
                .check(&target(), &key(KEY_C))
                .is_ok()
        );
    }

    #[test]
    fn an_edited_known_hosts_file_counts_from_the_next_check_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, format!("[h.example]:2222 {KEY_A}\n")).unwrap();
        let policy = HostKeyPolicy::Verify {
            known_hosts: Some(WatchedKnownHosts::new(KnownHosts::load(&path).unwrap())),
            pins: vec![],
        };
        assert!(policy.check(&target(), &key(KEY_A)).is_ok());
        assert!(policy.check(&target(), &key(KEY_B)).is_err());
        // The server's key changed and the operator recorded the new one.
        std::fs::write(&path, format!("# rotated\n[h.example]:2222 {KEY_B}\n")).unwrap();
        assert!(policy.check(&target(), &key(KEY_B)).is_ok());
        let e = policy.check(&target(), &key(KEY_A)).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        // An unreadable edit keeps the keys read before.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(policy.check(&target(), &key(KEY_B)).is_ok());
    }

    #[test]
    fn known_key_types_are_asked_for_first() {
        let known = KnownHosts::parse(Path::new("kh"), &format!("h.example {KEY_C}\n"));
        let policy = HostKeyPolicy::Verify {
            known_hosts: Some(WatchedKnownHosts::new(known)),
            pins: vec![],
        };
        let algorithms = policy.algorithms("h.example", 22);
        assert_eq!(
            algorithms[0],
            Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP256
            }
        );
        assert!(algorithms.contains(&Algorithm::Ed25519));
        assert_eq!(
            algorithms
                .iter()
                .any(|a| matches!(a, Algorithm::Rsa { .. })),
            cfg!(feature = "sftp-rsa")
        );
    }

    #[test]
    fn temporary_names_are_hidden_stable_per_event_and_distinct_between_events() {
        let e = event();
        let t = temp_name("a.xml", &e, 0);
        assert!(t.starts_with(".a.xml.") && t.ends_with(".tmp"), "{t}");
        assert_eq!(t, temp_name("a.xml", &e, 0), "a retry reuses the name");
        assert_ne!(t, temp_name("a.xml", &e, 1));
        let mut other = event();
        other.id = "evt-2".into();
        assert_ne!(t, temp_name("a.xml", &other, 0));
        let mut other = event();
        other.route = "other".into();
        assert_ne!(t, temp_name("a.xml", &other, 0));
        // Long names are cut on a character boundary so that the whole fits 255 bytes.
        let long = "é".repeat(127);
        let t = temp_name(&long, &e, 0);
        assert!(t.len() <= 222 && t.is_char_boundary(1), "{}", t.len());
    }

    #[test]
    fn planning_renders_names_and_content_and_refuses_escapes_before_anything_is_sent() {
        let tmp = tempfile::tempdir().unwrap();
        let s = sink(
            tmp.path(),
            SftpConfig {
                name: "{subject}/{output.n}.out".into(),
                ..config()
            },
        );
        let out = json!([{"n": "a", "v": 1}, "plain\r\ntext"]);
        let e = s.plan(&event(), &out).unwrap_err();
        assert!(e.to_string().contains("{output.n}"), "{e}");
        let s = sink(
            tmp.path(),
            SftpConfig {
                name: "{subject}/{index}.out".into(),
                ..config()
            },
        );
        let planned = s.plan(&event(), &out).unwrap();
        assert_eq!(planned[0].target, "/upload/case-42/0.out");
        assert_eq!(planned[0].dir, "/upload/case-42");
        assert!(planned[0].temp.starts_with("/upload/case-42/.0.out."));
        assert_eq!(planned[0].content, b"{\"n\":\"a\",\"v\":1}\n");
        assert_eq!(planned[1].content, b"plain\r\ntext");

        let s = sink(
            tmp.path(),
            SftpConfig {
                name: "{output.name}".into(),
                dir: "out/".into(),
                ..config()
            },
        );
        assert_eq!(
            s.plan(&event(), &json!({"name": "x"})).unwrap()[0].target,
            "out/x"
        );
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a\0b",
            "a\\b",
            "x/./y",
        ] {
            let e = s
                .plan(&event(), &json!([{"name": "fine"}, {"name": bad}]))
                .unwrap_err();
            assert!(!e.is_retryable(), "{bad:?}");
            assert!(
                e.to_string().contains(&format!("{bad:?}")) && e.to_string().contains("record 1"),
                "{e}"
            );
        }
        let e = s
            .plan(&event(), &json!([{"name": "a"}, {"name": "a"}]))
            .unwrap_err();
        assert!(e.to_string().contains("records 0 and 1"), "{e}");
    }

    fn status(code: StatusCode, message: &str) -> SftpError {
        SftpError::Status(Status {
            id: 1,
            status_code: code,
            error_message: message.into(),
            language_tag: "en-US".into(),
        })
    }

    #[test]
    fn errors_are_classified_by_status_code_and_carry_the_servers_message() {
        let tmp = tempfile::tempdir().unwrap();
        let s = sink(tmp.path(), config());
        let classify = |error: SftpError, missing_is_permanent: bool| {
            s.classify(&OpFailure {
                missing_is_permanent,
                ..OpFailure::new("cannot create", "/upload/.x.tmp", error)
            })
        };
        let e = classify(
            status(StatusCode::PermissionDenied, "Permission denied"),
            false,
        );
        assert!(!e.is_retryable());
        assert!(
            e.to_string().contains("\"Permission denied\"")
                && e.to_string().contains("/upload/.x.tmp"),
            "{e}"
        );
        let e = classify(status(StatusCode::NoSuchFile, "No such file"), true);
        assert!(
            !e.is_retryable() && e.to_string().contains("create_dirs"),
            "{e}"
        );
        assert!(classify(status(StatusCode::NoSuchFile, "No such file"), false).is_retryable());
        assert!(!classify(status(StatusCode::BadMessage, "Bad message"), false).is_retryable());
        assert!(!classify(status(StatusCode::OpUnsupported, ""), false).is_retryable());
        let e = classify(status(StatusCode::Failure, "Failure"), false);
        assert!(
            e.is_retryable() && e.to_string().contains("\"Failure\""),
            "{e}"
        );
        assert!(classify(SftpError::Timeout, false).is_retryable());
        assert!(classify(SftpError::IO("reset".into()), true).is_retryable());
        assert!(OpFailure::new("x", "y", SftpError::Timeout).is_transport());
        assert!(!OpFailure::new("x", "y", status(StatusCode::Failure, "")).is_transport());
    }

    #[test]
    fn the_debug_output_holds_no_secret() {
        let tmp = tempfile::tempdir().unwrap();
        let s = sink(tmp.path(), config());
        let text = format!("{s:?}");
        assert!(
            text.contains("sftp://ess@sftp.partner.example:22") && !text.contains("pw"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn in_order_sends_every_request_before_waiting_and_keeps_the_order() {
        use std::sync::Mutex as StdMutex;
        let sent = Arc::new(StdMutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let requests: Vec<Pending<'_, usize>> = (0..5usize)
            .map(|i| {
                let sent = sent.clone();
                let rx = rx.clone();
                Box::pin(async move {
                    sent.lock().unwrap().push(i);
                    // The first request's answer only comes once every request is out.
                    if i == 0
                        && let Some(rx) = rx.lock().await.take()
                    {
                        let _ = rx.await;
                    }
                    Ok(i)
                }) as Pending<'_, usize>
            })
            .collect();
        let all_sent = {
            let sent = sent.clone();
            async move {
                while sent.lock().unwrap().len() < 5 {
                    tokio::task::yield_now().await;
                }
                let _ = tx.send(());
            }
        };
        let (results, ()) = tokio::join!(in_order(requests), all_sent);
        assert_eq!(*sent.lock().unwrap(), [0, 1, 2, 3, 4]);
        let results: Vec<usize> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(results, [0, 1, 2, 3, 4]);
    }
}
