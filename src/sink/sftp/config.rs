//! The `sftp` sink's configuration: its serde type and pure checks.

use std::sync::Arc;

use crate::settings::RetryConfig;
use crate::settings::{Problem, SecretSource};
use crate::sink::template::{Template, safe_relative_path};
use crate::sink::{BuildContext, SecretOrFile, Sink, SinkSpec, push_secret};
use base64::Engine as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Configuration of an `sftp` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpConfig {
    /// Host name or IP address of the SFTP server. Required.
    pub host: String,
    /// TCP port of the server. Default: 22.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The user to log in as. Required.
    pub user: String,
    /// A private key file in OpenSSH format (`ssh-keygen -t ed25519`): ed25519 or ECDSA; RSA
    /// only in builds with the `sftp-rsa` feature. Relative paths are resolved against the
    /// configuration file's directory. Default: none (then `password` is required).
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// The passphrase of an encrypted `private_key`, `{ file = "…" }` or `{ env = "…" }`.
    /// Default: none (the key is not encrypted).
    #[serde(default)]
    pub private_key_passphrase: Option<SecretSource>,
    /// The password, `{ file = "…" }` or `{ env = "…" }`; tried after `private_key` when both
    /// are set. Default: none.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// A known_hosts file (OpenSSH format) that lists the server's host key: plain or hashed
    /// host names, `[host]:port` for ports other than 22, wildcards, `@revoked` lines. Read
    /// when the sink is built. Relative paths are resolved against the configuration file's
    /// directory. Default: none.
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Pinned fingerprints of the server's host key as `ssh-keygen -lf` prints them
    /// (`SHA256:…`); list the old and the new key while the server's key is rotated.
    /// Default: none. Either this or `known_hosts` is required.
    #[serde(default)]
    pub host_key_fingerprints: Vec<String>,
    /// Accepts any host key: anyone who can intercept the connection can then receive the
    /// files. For disposable test servers only; a warning is logged at every connect.
    /// Default: false.
    #[serde(default)]
    pub insecure_skip_host_key_verification: bool,
    /// The remote directory files are written under: absolute, or relative to the login
    /// directory (`.` for the login directory itself, e.g. in a chroot). Required.
    pub dir: String,
    /// Create `dir` and the subdirectories the name template makes when they are missing.
    /// When false, a missing directory dead-letters the event. Default: false.
    #[serde(default)]
    pub create_dirs: bool,
    /// Template of each file's name relative to `dir`, e.g. `{subject}/{id}.xml`, with the
    /// placeholders and rules of the `file` sink. Required.
    pub name: String,
    /// Permission bits of written files as an octal string, e.g. `"0640"`, set exactly.
    /// Default: none, so files get the server's default (usually `0644`).
    #[serde(default)]
    pub file_mode: Option<String>,
    /// How long connecting, the key exchange and authentication may take, in milliseconds.
    /// Default: 10000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long one apply may take once connected (opening a channel, uploading, renaming),
    /// in milliseconds; a timeout is retried. Default: 30000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Seconds of silence from the server after which a keepalive is sent; the connection is
    /// dropped after three unanswered ones. 0 turns keepalives off. Default: 15.
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    /// Most uploads at the same time, each on its own SFTP channel of the one connection.
    /// Keep it at or below the server's `MaxSessions` (OpenSSH: 10). Default: 4.
    #[serde(default = "default_max_concurrent_uploads")]
    pub max_concurrent_uploads: usize,
    /// Retry policy for retryable failures; also spaces reconnection attempts. Default: see
    /// [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

pub(super) fn default_port() -> u16 {
    22
}

pub(super) fn default_connect_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_timeout_ms() -> u64 {
    30_000
}

pub(super) fn default_keepalive_secs() -> u64 {
    15
}

pub(super) fn default_max_concurrent_uploads() -> usize {
    4
}

/// The most `max_concurrent_uploads` may be.
pub(super) const MAX_UPLOADS: usize = 64;

/// Why a sink that verifies nothing is refused.
pub(super) const UNVERIFIED: &str = "the server's host key must be verified: set known_hosts = \
                          \"/path/to/known_hosts\" or host_key_fingerprints = [\"SHA256:…\"] \
                          (ssh-keygen -lf on the server's /etc/ssh/ssh_host_ed25519_key.pub \
                          prints it)";

/// Checks a fingerprint as `ssh-keygen -lf` prints it; returns the SHA-256 digest.
pub(super) fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let example = "write it as ssh-keygen -lf prints it, like \
                   \"SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s\"";
    let Some(b64) = text.trim().strip_prefix("SHA256:") else {
        return Err(format!("{text:?} is not a SHA256 fingerprint: {example}"));
    };
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(b64.trim_end_matches('='))
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is not a valid SHA256 fingerprint: {example}"))
}

pub(super) fn check_secret(
    field: &str,
    source: &SecretSource,
    problems: &mut Vec<(String, String)>,
) {
    if let Err(message) = source.check() {
        problems.push((field.into(), message));
    }
}

impl SinkSpec for SftpConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Resolves relative local paths (`private_key`, `known_hosts`, secret files) against
    /// `base`. `dir` is a path on the server and is left as it is.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = &mut self.private_key {
            fix(p);
        }
        if let Some(p) = &mut self.known_hosts {
            fix(p);
        }
        for source in [&mut self.private_key_passphrase, &mut self.password]
            .into_iter()
            .flatten()
        {
            source.resolve_path(base);
        }
    }

    /// Pure checks; `key` is this sink's key path.
    fn validate(&self, key: &str) -> Vec<Problem> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut bad = |field: &str, message: String| problems.push((field.into(), message));
        let host = self.host.trim();
        if host.is_empty() {
            bad(
                "host",
                "must not be empty: set the server's name or address".into(),
            );
        } else if host.contains(['@', '/', ' ']) || host.chars().any(char::is_control) {
            bad(
                "host",
                format!(
                    "{:?} is not a host name: write the name or address only (the user goes in \
                     user, the port in port)",
                    self.host
                ),
            );
        }
        if self.port == 0 {
            bad("port", "must be 1 to 65535 (the default is 22)".into());
        }
        if self.user.is_empty() || self.user.chars().any(char::is_control) {
            bad(
                "user",
                "must be the user name to log in as, without control characters".into(),
            );
        }
        if self.private_key.is_none() && self.password.is_none() {
            bad(
                "private_key",
                "set private_key = \"/path/to/id_ed25519\" or password = { file = \"…\" }".into(),
            );
        }
        if self.private_key.is_none() && self.private_key_passphrase.is_some() {
            bad(
                "private_key_passphrase",
                "is set without private_key: set private_key or remove the passphrase".into(),
            );
        }
        let verifies = self.known_hosts.is_some() || !self.host_key_fingerprints.is_empty();
        if self.insecure_skip_host_key_verification && verifies {
            bad(
                "insecure_skip_host_key_verification",
                "cannot be combined with known_hosts or host_key_fingerprints: remove it".into(),
            );
        }
        if !self.insecure_skip_host_key_verification && !verifies {
            bad("known_hosts", UNVERIFIED.into());
        }
        for (i, fingerprint) in self.host_key_fingerprints.iter().enumerate() {
            if let Err(message) = parse_fingerprint(fingerprint) {
                bad(&format!("host_key_fingerprints[{i}]"), message);
            }
        }
        if self.dir.is_empty() {
            bad(
                "dir",
                "must not be empty: set the remote directory, or \".\" for the login directory"
                    .into(),
            );
        } else if self.dir.chars().any(char::is_control) {
            bad("dir", "must not contain control characters".into());
        }
        if let Err(message) = check_name_template(&self.name) {
            bad("name", message);
        }
        if let Some(mode) = &self.file_mode
            && let Err(message) = crate::sink::file::parse_mode(mode)
        {
            bad("file_mode", message);
        }
        for (field, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("timeout_ms", self.timeout_ms),
        ] {
            if value == 0 {
                bad(field, "must be at least 1".into());
            }
        }
        if self.max_concurrent_uploads == 0 || self.max_concurrent_uploads > MAX_UPLOADS {
            bad(
                "max_concurrent_uploads",
                format!("must be 1 to {MAX_UPLOADS} (the default is 4)"),
            );
        }
        if let Some(source) = &self.private_key_passphrase {
            check_secret("private_key_passphrase", source, &mut problems);
        }
        if let Some(source) = &self.password {
            check_secret("password", source, &mut problems);
        }
        problems
            .into_iter()
            .map(|(field, message)| Problem {
                key: format!("{key}.{field}"),
                message,
            })
            .collect()
    }

    fn secret_sources(&self) -> Vec<(String, SecretOrFile<'_>)> {
        let mut sources = Vec::new();
        push_secret(
            &mut sources,
            "private_key_passphrase",
            &self.private_key_passphrase,
        );
        push_secret(&mut sources, "password", &self.password);
        if let Some(path) = &self.private_key {
            sources.push(("private_key".to_string(), SecretOrFile::File(path)));
        }
        sources
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::SftpSink::new(self, context.key).map_err(|m| context.problem(m))?,
        ))
    }
}

/// Parses the name template and checks that its literal parts can render a safe name, with
/// the rules of the `file` sink.
pub(crate) fn check_name_template(text: &str) -> Result<Template, String> {
    let template = Template::parse(text)?;
    if text.starts_with('/') {
        return Err(format!(
            "{text:?} is absolute: names are relative to dir; put the fixed part of the path in dir"
        ));
    }
    // Render every placeholder as a plain word, so that only the literal parts are checked:
    // `../{id}` or `a//{id}` can never render to a safe name.
    let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
    if let Err(e) = safe_relative_path(&sample) {
        return Err(format!(
            "{text:?} can never render a safe name ({e}); write it like \"{{subject}}/{{id}}.xml\""
        ));
    }
    Ok(template)
}
