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
mod error;
mod host_key;
mod known_hosts;
mod session;
#[cfg(test)]
mod tests;
mod upload;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::template::Template;
use super::{EventMeta, Sink, SinkError};
use crate::settings::RetryConfig;
use crate::settings::read_secret;
pub use config::SftpConfig;
pub(crate) use config::check_name_template;
use config::*;

use error::OpFailure;
use host_key::{HostKeyPolicy, WatchedKnownHosts};
use known_hosts::KnownHosts;
use session::{Attempts, Connection, Credentials, Target, load_private_key};

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
