//! Settings of a connection to a database server, shared by the SQL sink and the PostgreSQL
//! journal.

use serde::Deserialize;

/// How the agent talks to a database over TLS (the SQL sink's PostgreSQL and MariaDB/MySQL, the
/// shared journal's PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Never.
    Disable,
    /// TLS when the server offers it, without checking its certificate; plain otherwise.
    Prefer,
    /// Always TLS, without checking the certificate.
    Require,
    /// Always TLS; the certificate must chain to a trusted CA.
    VerifyCa,
    /// Always TLS; the certificate must chain to a trusted CA and name the host.
    VerifyFull,
}

/// Refuses a URL that carries a password, so that passwords never sit in the configuration.
/// The message never repeats the URL.
pub fn check_plain_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| {
        format!("is not a valid URL ({e}): write it like postgres://ess@db.example:5432/rules")
    })?;
    let password_in_query = parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"));
    if parsed.password().is_some() || password_in_query {
        return Err(
            "carries a password: move it to password = { file = \"…\" } (or give the whole URL \
             with url_secret)"
                .into(),
        );
    }
    Ok(())
}
