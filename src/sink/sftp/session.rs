//! Connecting: the SSH session, its host key check and login, and the SFTP channels over it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, client};
use russh_sftp::client::RawSftpSession;
use tokio::time::Instant;

use super::SftpSink;
use super::error::{ssh_failure, with_note};
use super::host_key::HostKeyPolicy;
use crate::sink::SinkError;

/// The server's identity as shown in messages and logs.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The sink's key path, e.g. `sinks.court-calendar`.
    pub(super) sink: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) user: String,
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

/// Why a connection attempt failed before an SSH session existed.
#[derive(Debug)]
pub(super) enum ConnectError {
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
pub(super) struct Client {
    pub(super) policy: Arc<HostKeyPolicy>,
    pub(super) target: Arc<Target>,
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
pub(super) struct Chan {
    pub(super) raw: RawSftpSession,
    pub(super) fsync: bool,
    pub(super) posix_rename: bool,
}

/// The SSH connection and its idle SFTP channels.
pub(super) struct Connection {
    pub(super) handle: client::Handle<Client>,
    pub(super) idle: Mutex<Vec<Chan>>,
    pub(super) broken: AtomicBool,
}

impl Connection {
    pub(super) fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && !self.handle.is_closed()
    }

    pub(super) fn take_idle(&self) -> Option<Chan> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    pub(super) fn put_back(&self, chan: Chan) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(chan);
    }
}

/// Connection attempts, for the backoff between them.
#[derive(Default)]
pub(super) struct Attempts {
    pub(super) failures: u32,
    pub(super) next_at: Option<Instant>,
    pub(super) last_error: Option<SinkError>,
}

/// How the sink logs in.
pub(super) struct Credentials {
    pub(super) key: Option<Arc<PrivateKey>>,
    pub(super) password: Option<String>,
}

impl SftpSink {
    /// The connection, opened when there is none or it failed. One attempt at a time; after a
    /// failure, no new attempt is made before the backoff has passed.
    pub(super) async fn connection(&self) -> Result<Arc<Connection>, SinkError> {
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

    pub(super) fn current_usable(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| c.usable())
            .cloned()
    }

    /// Connects, checks the host key and authenticates.
    pub(super) async fn connect(&self) -> Result<Arc<Connection>, SinkError> {
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
    pub(super) async fn channel(&self, conn: &Connection) -> Result<Chan, SinkError> {
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
}

/// Loads a private key, refusing types this build cannot sign with.
pub(super) fn load_private_key(
    path: &Path,
    passphrase: Option<&str>,
) -> Result<PrivateKey, String> {
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
