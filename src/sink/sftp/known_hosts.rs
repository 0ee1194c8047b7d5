//! Known host keys (OpenSSH's known_hosts format).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use russh::keys::{Algorithm, HashAlg, PublicKey};

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
            let (Some(hosts), Some(_key_type), Some(blob)) = (first, fields.next(), fields.next())
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
