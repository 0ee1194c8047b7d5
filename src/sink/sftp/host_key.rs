//! How the server's host key is checked: pinned fingerprints or a known_hosts file that is
//! read again when it changes.

use std::path::Path;
use std::sync::Arc;

use russh::keys::{Algorithm, HashAlg, PublicKey};

use super::known_hosts;
use super::session::Target;

use known_hosts::{KnownHosts, Verdict};

/// How the server's host key is checked.
#[derive(Debug)]
pub(super) enum HostKeyPolicy {
    Verify {
        known_hosts: Option<WatchedKnownHosts>,
        pins: Vec<[u8; 32]>,
    },
    Insecure,
}

/// What tells that a file changed: inode, length, modification time.
pub(super) type FileStamp = (u64, u64, Option<std::time::SystemTime>);

pub(super) fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()))
}

/// A known_hosts file, read again when it has changed, so that an operator's edit (a server's
/// new host key) counts from the next connection on, without a reload or a restart. An edit
/// that cannot be read leaves the keys read before in force, with a warning.
#[derive(Debug)]
pub(super) struct WatchedKnownHosts {
    pub(super) current: std::sync::Mutex<(Option<FileStamp>, Arc<KnownHosts>)>,
}

impl WatchedKnownHosts {
    pub(super) fn new(known: KnownHosts) -> WatchedKnownHosts {
        let stamp = file_stamp(known.path());
        WatchedKnownHosts {
            current: std::sync::Mutex::new((stamp, Arc::new(known))),
        }
    }

    /// Reads the file again when it has changed (one `stat` when it has not); true when the
    /// keys were read anew.
    pub(super) fn refresh(&self) -> bool {
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
    pub(super) fn get(&self) -> Arc<KnownHosts> {
        self.refresh();
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}

impl HostKeyPolicy {
    /// Reads the known_hosts file again when it has changed; true when it was.
    pub(super) fn refresh(&self) -> bool {
        match self {
            HostKeyPolicy::Verify {
                known_hosts: Some(watched),
                ..
            } => watched.refresh(),
            _ => false,
        }
    }

    /// Ok when the key may be trusted; else the permanent error to report.
    pub(super) fn check(&self, target: &Target, key: &PublicKey) -> Result<(), String> {
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
    pub(super) fn algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
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
