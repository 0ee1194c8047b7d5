//! What the sinks that are clients of a broker or server (mqtt, redis, amqp, nats) say alike
//! about their settings: PEM files and secret files resolve against the configuration file's
//! directory, a client certificate and its key go together, TLS files need a TLS URL, and the
//! reconnect backoff starts at 1 ms or more and never shrinks. Each `check_*` reports through
//! `bad(field, message)`, the sink's own way of naming a problem's key.
//!
//! And what their connections share: the broker URL's form ([`parse_url`]), the backoff
//! between connection attempts ([`Backoff`]) and the advice for a failed TLS handshake
//! ([`tls_advice`]).

mod backoff;
mod tls;
mod url;

use std::path::{Path, PathBuf};

pub use backoff::Backoff;
pub use tls::{BROKER_KEYS, TlsKeys, rustls_error, tls_advice};
pub use url::{Address, UrlForm, parse_url};

use crate::settings::SecretSource;

/// Shortens a value for a message: quoted, and cut after 120 bytes with its length.
pub fn shown(text: &str) -> String {
    const MAX: usize = 120;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &text[..end], text.len())
}

/// Resolves each set path that is relative against `base`.
pub fn resolve_files<'a>(base: &Path, paths: impl IntoIterator<Item = &'a mut Option<PathBuf>>) {
    for path in paths.into_iter().flatten() {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    }
}

/// Resolves the file of each set secret source against `base`.
pub fn resolve_secrets<'a>(
    base: &Path,
    sources: impl IntoIterator<Item = &'a mut Option<SecretSource>>,
) {
    for source in sources.into_iter().flatten() {
        source.resolve_path(base);
    }
}

/// Checks each set secret source (`{ file = "…" }` or `{ env = "…" }`, one of them).
pub fn check_secrets<'a>(
    bad: &mut impl FnMut(&str, String),
    sources: impl IntoIterator<Item = (&'a str, &'a Option<SecretSource>)>,
) {
    for (field, source) in sources {
        if let Some(source) = source
            && let Err(message) = source.check()
        {
            bad(field, message);
        }
    }
}

/// Checks that two settings are set both or neither, naming the one missing; the message
/// names them by the last part of their keys (`tls.cert` as `cert`).
pub fn check_together(bad: &mut impl FnMut(&str, String), one: (&str, bool), other: (&str, bool)) {
    if one.1 == other.1 {
        return;
    }
    let name = |field: &str| field.rsplit('.').next().unwrap_or(field).to_string();
    let missing = if one.1 { other.0 } else { one.0 };
    bad(
        missing,
        format!(
            "{} and {} go together: set both or neither",
            name(one.0),
            name(other.0)
        ),
    );
}

/// Checks a sink's client TLS files `ca_file`, `client_cert` and `client_key`: with a valid
/// URL that does not ask for TLS none may be set (`plain_url` is then the URL to use instead,
/// like `"an mqtts://"`), and the certificate and key go together.
pub fn check_tls_files(
    bad: &mut impl FnMut(&str, String),
    plain_url: Option<&str>,
    ca_file: &Option<PathBuf>,
    client_cert: &Option<PathBuf>,
    client_key: &Option<PathBuf>,
) {
    if let Some(url) = plain_url {
        for (field, set) in [
            ("ca_file", ca_file.is_some()),
            ("client_cert", client_cert.is_some()),
            ("client_key", client_key.is_some()),
        ] {
            if set {
                bad(
                    field,
                    format!("applies to TLS only: use {url} URL, or remove it"),
                );
            }
        }
    }
    check_together(
        bad,
        ("client_cert", client_cert.is_some()),
        ("client_key", client_key.is_some()),
    );
}

/// Checks settings that must be at least 1, each with its default for the message.
pub fn check_at_least_one<'a>(
    bad: &mut impl FnMut(&str, String),
    fields: impl IntoIterator<Item = (&'a str, u64, u64)>,
) {
    for (field, value, default) in fields {
        if value == 0 {
            bad(
                field,
                format!("must be at least 1 (the default is {default})"),
            );
        }
    }
}

/// Checks the reconnect backoff: `reconnect_initial_ms` at least 1 (`default_initial` for the
/// message), `reconnect_max_ms` not below it.
pub fn check_reconnect(
    bad: &mut impl FnMut(&str, String),
    initial_ms: u64,
    max_ms: u64,
    default_initial: u64,
) {
    check_at_least_one(bad, [("reconnect_initial_ms", initial_ms, default_initial)]);
    if max_ms < initial_ms {
        bad(
            "reconnect_max_ms",
            "must not be below reconnect_initial_ms".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems a check reports, as (field, message).
    fn problems(check: impl FnOnce(&mut dyn FnMut(&str, String))) -> Vec<(String, String)> {
        let mut found = Vec::new();
        check(&mut |field: &str, message: String| found.push((field.to_string(), message)));
        found
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(f, m)| (f.to_string(), m.to_string()))
            .collect()
    }

    #[test]
    fn tls_files_need_a_tls_url_and_a_certificate_its_key() {
        let some = Some(PathBuf::from("x.pem"));
        let found =
            problems(|mut bad| check_tls_files(&mut bad, Some("an mqtts://"), &some, &some, &None));
        let tls_only = "applies to TLS only: use an mqtts:// URL, or remove it";
        assert_eq!(
            found,
            pairs(&[
                ("ca_file", tls_only),
                ("client_cert", tls_only),
                (
                    "client_key",
                    "client_cert and client_key go together: set both or neither"
                ),
            ])
        );
        let found = problems(|mut bad| check_tls_files(&mut bad, None, &some, &None, &some));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "client_cert");
        let found = problems(|mut bad| check_tls_files(&mut bad, None, &some, &some, &some));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn settings_that_go_together_are_named_by_the_last_part_of_their_keys() {
        let found =
            problems(|mut bad| check_together(&mut bad, ("tls.cert", true), ("tls.key", false)));
        assert_eq!(
            found,
            pairs(&[("tls.key", "cert and key go together: set both or neither")])
        );
    }

    #[test]
    fn the_reconnect_backoff_starts_above_zero_and_never_shrinks() {
        let found = problems(|mut bad| check_reconnect(&mut bad, 0, 0, 100));
        assert_eq!(
            found,
            pairs(&[(
                "reconnect_initial_ms",
                "must be at least 1 (the default is 100)"
            )])
        );
        let found = problems(|mut bad| check_reconnect(&mut bad, 500, 100, 100));
        assert_eq!(
            found,
            pairs(&[("reconnect_max_ms", "must not be below reconnect_initial_ms")])
        );
        assert!(problems(|mut bad| check_reconnect(&mut bad, 100, 100, 100)).is_empty());
    }

    #[test]
    fn relative_files_resolve_against_the_base_and_absolute_ones_stay() {
        let mut ca = Some(PathBuf::from("ca.pem"));
        let mut cert = Some(PathBuf::from("/abs/c.pem"));
        let mut key = None;
        resolve_files(Path::new("/etc/ess"), [&mut ca, &mut cert, &mut key]);
        assert_eq!(ca.unwrap(), Path::new("/etc/ess/ca.pem"));
        assert_eq!(cert.unwrap(), Path::new("/abs/c.pem"));
        assert!(key.is_none());
    }
}
