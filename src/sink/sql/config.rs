//! The `sql` sink's configuration: its serde type and pure checks, and the check of an adapter output against the statement.

use std::sync::Arc;

use super::Dialect;
use super::plan::{Mode, missing_field, not_an_object, records, table_columns};
use super::statement::{TableName, check_identifier, parse_statement};
use crate::adapter::engine::Expression;
use crate::settings::RetryConfig;
use crate::settings::{Problem, SecretSource};
use crate::sink::{BuildContext, SecretOrFile, Sink, SinkSpec, push_secret};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use crate::settings::database::TlsMode;

/// Configuration of an `sql` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// The database: `postgres://user@host:5432/db`, `mysql://user@host:3306/db` (or
    /// `mariadb://…`), or `sqlite:///absolute/path.db` / `sqlite:relative/path.db` (relative to
    /// the configuration file's directory). No password here: use `password`, or give the whole
    /// URL as a secret with `url_secret`. Exactly one of `url` and `url_secret` is required.
    #[serde(default)]
    pub url: Option<String>,
    /// The URL as a secret (`{ file = "…" }` or `{ env = "…" }`), for URLs that carry a
    /// password. Default: none.
    #[serde(default)]
    pub url_secret: Option<SecretSource>,
    /// The database password (`{ file = "…" }` or `{ env = "…" }`); overrides one in
    /// `url_secret`. Not for SQLite. Default: none.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// A statement with named parameters bound from the output object's fields, e.g.
    /// `INSERT INTO rules (court_id, deadline) VALUES (:court_id, :deadline)`. An array output
    /// runs it once per element. Exactly one of `statement` and `table` is required.
    #[serde(default)]
    pub statement: Option<String>,
    /// A table (optionally `schema.table`) to upsert the output object's fields into: each
    /// field is a column. Needs `key`. Default: none.
    #[serde(default)]
    pub table: Option<String>,
    /// With `table`: the key columns. They must carry a primary key or unique constraint (the
    /// conflict target of the upsert), and every output object must have them. Default: none.
    #[serde(default)]
    pub key: Vec<String>,
    /// With `table`: a JSONata predicate over the output object; when it is `true` the row with
    /// the object's key is deleted instead of upserted, e.g. `deleted = true`. Default: none.
    #[serde(default)]
    pub delete_when: Option<String>,
    /// The ledger table that records applied (event id, route) pairs, optionally
    /// `schema.table`. Default: `ess_applied`.
    #[serde(default = "default_ledger_table")]
    pub ledger_table: String,
    /// Create the ledger table when it does not exist. Set to false when the database user may
    /// not create tables and the table was created beforehand. Default: true.
    #[serde(default = "default_true")]
    pub create_ledger: bool,
    /// Most events one transaction carries. Default: 64.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long a worker waits for more events after the first one of a batch, in
    /// milliseconds; 0 sends each batch as soon as nothing more is waiting. Default: 5.
    #[serde(default = "default_max_linger_ms")]
    pub max_linger_ms: u64,
    /// Connections in the sink's pool, which is also how many transactions run at the same
    /// time. SQLite always uses one. Default: 4.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long getting a connection (connecting included) may take, in milliseconds; a
    /// timeout is retried. Default: 10000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long one statement may run, in milliseconds, enforced by the server where it can
    /// (PostgreSQL `statement_timeout`, MariaDB `max_statement_time`, SQLite's busy timeout and
    /// an interrupt) and by the sink; a timeout is retried. Default: 30000.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// TLS to the database: `disable`, `prefer`, `require`, `verify_ca` or `verify_full`.
    /// Default: what the URL says (`sslmode` / `ssl-mode`), else `verify_full` when `ca_file`
    /// is set, else `prefer`.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// A PEM file with the CA certificate(s) that the server's certificate must chain to.
    /// Relative paths are resolved against the configuration file's directory. Default: the
    /// bundled web PKI roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Check the database with `SELECT 1` whenever the agent checks its sinks
    /// (`dispatch.healthcheck_interval_ms`), so that readiness (`/readyz`) reports a database
    /// that cannot be reached. Off by default: events for an unreachable database are still
    /// accepted and queue until it is back, which a load balancer that follows readiness would
    /// prevent. Default: false.
    #[serde(default)]
    pub healthcheck: bool,
    /// Retry policy for retryable failures. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

pub(super) fn default_ledger_table() -> String {
    "ess_applied".into()
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn default_max_batch() -> usize {
    64
}

pub(super) fn default_max_linger_ms() -> u64 {
    5
}

pub(super) fn default_max_connections() -> u32 {
    4
}

pub(super) fn default_connect_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_statement_timeout_ms() -> u64 {
    30_000
}

/// The database a URL names.
pub fn dialect_of(url: &str) -> Result<Dialect, String> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        "postgres" | "postgresql" => Ok(Dialect::Postgres),
        "mysql" | "mariadb" => Ok(Dialect::MySql),
        "sqlite" => Ok(Dialect::Sqlite),
        _ => Err(
            "must start with postgres://, mysql://, mariadb:// or sqlite: (e.g. \
             postgres://ess@db.example/rules)"
                .into(),
        ),
    }
}

/// The file path of a `sqlite:` URL: `sqlite:///abs/x.db` → `/abs/x.db`, `sqlite:x.db` → `x.db`.
pub(super) fn sqlite_path(url: &str) -> Result<PathBuf, String> {
    let rest = &url["sqlite:".len().min(url.len())..];
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    if rest.is_empty() {
        return Err("names no file: write it like sqlite:///var/lib/partner/rules.db".into());
    }
    if rest.contains('?') {
        return Err("takes no options: write it like sqlite:///var/lib/partner/rules.db".into());
    }
    Ok(PathBuf::from(rest))
}

pub(crate) use crate::settings::database::check_plain_url;

pub(super) fn check_secret(bad: &mut impl FnMut(&str, String), field: &str, source: &SecretSource) {
    if let Err(message) = source.check() {
        bad(field, message);
    }
}

impl SqlConfig {
    /// The dialect when the URL is in the configuration (not a secret).
    fn known_dialect(&self) -> Option<Dialect> {
        self.url.as_deref().and_then(|u| dialect_of(u).ok())
    }
}

impl SinkSpec for SqlConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Resolves relative paths (a `sqlite:` file, `ca_file`, secret files) against `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(url) = &mut self.url
            && dialect_of(url) == Ok(Dialect::Sqlite)
            && let Ok(path) = sqlite_path(url)
            && path.is_relative()
        {
            *url = format!("sqlite://{}", base.join(path).display());
        }
        if let Some(ca) = &mut self.ca_file {
            fix(ca);
        }
        for source in [&mut self.url_secret, &mut self.password]
            .into_iter()
            .flatten()
        {
            source.resolve_path(base);
        }
    }

    /// Pure checks; `key` is this sink's key path.
    fn validate(&self, key: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| {
            problems.push(Problem {
                key: format!("{key}.{field}"),
                message,
            })
        };
        match (&self.url, &self.url_secret) {
            (Some(_), Some(_)) => bad("url", "set either url or url_secret, not both".into()),
            (None, None) => bad(
                "url",
                "is required: set url = \"postgres://user@host/db\" (or url_secret for a URL \
                 with a password)"
                    .into(),
            ),
            (Some(url), None) => match dialect_of(url) {
                Err(message) => bad("url", message),
                Ok(Dialect::Sqlite) => {
                    if let Err(message) = sqlite_path(url) {
                        bad("url", message);
                    }
                }
                Ok(_) => {
                    if let Err(message) = check_plain_url(url) {
                        bad("url", message);
                    }
                }
            },
            (None, Some(source)) => check_secret(&mut bad, "url_secret", source),
        }
        if let Some(source) = &self.password {
            check_secret(&mut bad, "password", source);
        }
        let dialect = self.known_dialect();
        if dialect == Some(Dialect::Sqlite) {
            if self.password.is_some() {
                bad("password", "SQLite has no passwords: remove it".into());
            }
            if self.tls.is_some() || self.ca_file.is_some() {
                bad(
                    "tls",
                    "SQLite is a local file: remove tls and ca_file".into(),
                );
            }
        }
        match (&self.statement, &self.table) {
            (Some(_), Some(_)) => bad(
                "statement",
                "set either statement or table, not both".into(),
            ),
            (None, None) => bad(
                "statement",
                "is required: set statement = \"INSERT …\" with :field parameters, or table and \
                 key for generated upserts"
                    .into(),
            ),
            (Some(text), None) => {
                if let Err(message) = parse_statement(text, dialect.unwrap_or(Dialect::Postgres)) {
                    bad("statement", message);
                }
                if !self.key.is_empty() {
                    bad("key", "goes with table, not statement: remove it".into());
                }
                if self.delete_when.is_some() {
                    bad(
                        "delete_when",
                        "goes with table, not statement: write the delete into the statement"
                            .into(),
                    );
                }
            }
            (None, Some(table)) => {
                if let Err(message) = TableName::parse(table) {
                    bad("table", message);
                }
                if self.key.is_empty() {
                    bad(
                        "key",
                        "is required with table: name the key column(s), e.g. key = [\"court_id\"]"
                            .into(),
                    );
                }
                let mut seen = HashSet::new();
                for column in &self.key {
                    if let Err(message) = check_identifier(column) {
                        bad("key", message);
                    } else if !seen.insert(column.as_str()) {
                        bad("key", format!("{column:?} is listed twice"));
                    }
                }
                if let Some(predicate) = &self.delete_when
                    && let Err(e) = Expression::compile(predicate)
                {
                    bad(
                        "delete_when",
                        format!("does not compile: {}", e.render("delete_when", predicate)),
                    );
                }
            }
        }
        if let Err(message) = TableName::parse(&self.ledger_table) {
            bad("ledger_table", message);
        }
        if self.max_batch == 0 {
            bad("max_batch", "must be at least 1 (the default is 64)".into());
        }
        if self.max_connections == 0 {
            bad(
                "max_connections",
                "must be at least 1 (the default is 4)".into(),
            );
        }
        if self.connect_timeout_ms == 0 {
            bad(
                "connect_timeout_ms",
                "must be at least 1 (the default is 10000)".into(),
            );
        }
        if self.statement_timeout_ms == 0 {
            bad(
                "statement_timeout_ms",
                "must be at least 1 (the default is 30000)".into(),
            );
        }
        problems
    }

    /// Checks that an output the route's adapter produces (e.g. a fixture's expected output)
    /// can be bound: objects with every parameter of the statement, or with the key columns and
    /// plain field names for a table. Pure.
    fn check_output(&self, output: &Value) -> Result<(), String> {
        let mode = Mode::new(self, self.known_dialect().unwrap_or(Dialect::Postgres))?;
        for (index, record) in records(output) {
            let Some(object) = record.as_object() else {
                return Err(not_an_object(index, record));
            };
            match &mode {
                Mode::Statement { statement, .. } => {
                    for name in &statement.names {
                        if !object.contains_key(name) {
                            return Err(missing_field(index, name, &format!(":{name}")));
                        }
                    }
                }
                Mode::Table { key, .. } => {
                    table_columns(index, object, key)?;
                }
            }
        }
        Ok(())
    }

    fn secret_sources(&self) -> Vec<(String, SecretOrFile<'_>)> {
        let mut sources = Vec::new();
        push_secret(&mut sources, "url_secret", &self.url_secret);
        push_secret(&mut sources, "password", &self.password);
        sources
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::SqlSink::new(self).map_err(|m| context.problem(m))?,
        ))
    }
}
