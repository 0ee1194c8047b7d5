//! Operator commands that talk to a running agent's admin API: `status`, `replay`, `events`
//! and `dead-letters`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::http_client::{ClientTls, client};
use crate::settings::read_secret;

/// How to reach the admin API.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The agent's configuration file; the admin address and token are read from it.
    /// [default: /etc/ess-agent/ess-agent.toml, or config/ess-agent.toml when run from a source
    /// checkout where the former does not exist]
    #[arg(long, global = true, env = "ESS_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The admin API's base URL, instead of the address in the configuration.
    #[arg(long, global = true)]
    pub admin_url: Option<String>,
}

/// `dead-letters` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters (failed and parked events), oldest first.
    List {
        /// Show dead letters after this sequence number (from `next_after` of an earlier page).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Apply a dead letter again (after fixing its adapter, route or sink); or, without an id,
    /// every dead letter the filters select (`--all` for every one), at most 1000 a time.
    Retry {
        /// The dead letter's event id.
        id: Option<String>,
        /// With no id: retry every dead letter (needed when no filter is given).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[command(flatten)]
        filter: RetryFilterArgs,
    },
    /// Drop a dead letter. For `journal.retention_days` the id stays known, so a redelivery is
    /// answered as a duplicate.
    Drop { id: String },
}

/// The filters of a bulk retry: each selects dead letters, and they combine.
#[derive(Debug, clap::Args)]
pub struct RetryFilterArgs {
    /// Dead letters with a delivery through this route.
    #[arg(long, conflicts_with = "id")]
    pub route: Option<String>,
    /// Dead letters of this type; a glob as in a route's `types` (`*`, `?`).
    #[arg(long = "type", conflicts_with = "id", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Dead letters of this subject.
    #[arg(long, conflicts_with = "id")]
    pub subject: Option<String>,
    /// Received at or after this RFC 3339 time.
    #[arg(long, conflicts_with = "id")]
    pub since: Option<String>,
    /// Received before this RFC 3339 time.
    #[arg(long, conflicts_with = "id")]
    pub until: Option<String>,
}

/// `events` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// List events newest first, as a table (or JSON lines with --json). Filters combine.
    List(EventsListArgs),
}

/// `events list`.
#[derive(Debug, clap::Args)]
pub struct EventsListArgs {
    /// Events in this state, or any of a comma-separated list (accepted, applied, filtered,
    /// superseded, failed, parked, dropped).
    #[arg(long)]
    pub state: Option<String>,
    /// Events of this type; a glob as in a route's `types` (`*`, `?`).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Events of this subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// Events with a delivery through this route.
    #[arg(long)]
    pub route: Option<String>,
    /// Received at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Received before this RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Events per page (1 to 500).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// The next page: the cursor printed after the previous one.
    #[arg(long)]
    pub cursor: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Percent-encodes an event id for a path segment.
pub fn encode_id(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The development configuration of a source checkout, relative to the repository root.
pub const CHECKOUT_CONFIG_PATH: &str = "config/ess-agent.toml";

/// The configuration file an operator command reads: the one given (`--config` or
/// `ESS_AGENT_CONFIG`); else `default` when it exists; else `checkout` when it exists (the
/// command runs from a source checkout, beside an agent started on its development
/// configuration); else `default`, whose absence the caller reports.
///
/// Only the operator commands fall back: they read nothing but the admin API's address and
/// token. `run` and `validate` never pick a configuration the operator did not name.
fn config_path(given: Option<&Path>, default: &Path, checkout: &Path) -> PathBuf {
    match given {
        Some(path) => path.to_owned(),
        None if !default.exists() && checkout.is_file() => checkout.to_owned(),
        None => default.to_owned(),
    }
}

impl AdminArgs {
    /// The configuration file this command reads.
    pub fn config_path(&self) -> PathBuf {
        config_path(
            self.config.as_deref(),
            Path::new(DEFAULT_CONFIG_PATH),
            Path::new(CHECKOUT_CONFIG_PATH),
        )
    }

    fn base_and_token(&self) -> anyhow::Result<(String, Option<String>)> {
        let path = self.config_path();
        let config = Config::load(&path).ok();
        let token = config
            .as_ref()
            .and_then(|c| c.admin.token.as_ref())
            .map(read_secret)
            .transpose()
            .map_err(|e| anyhow::anyhow!("admin.token: {e}"))?;
        let base = match (&self.admin_url, &config) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(config)) => {
                let mut addr = config.admin.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
            (None, None) => anyhow::bail!(
                "cannot read {}: pass --config with the agent's configuration, or --admin-url",
                path.display()
            ),
        };
        Ok((base, token))
    }

    /// Sends one request to the admin API, with `body` as JSON when given; the status and the
    /// body of the reply.
    fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let (base, token) = self.base_and_token()?;
        let url = format!("{base}{path}");
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body)?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes))?;
        let client = client(&ClientTls::default())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let response = client.request(request).await.with_context(|| {
                format!("cannot reach the agent's admin API at {base}: is the agent running?")
            })?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })
    }

    /// Sends one request to the admin API, prints the JSON reply, and maps the status to an
    /// exit code.
    pub fn call(&self, method: Method, path: &str) -> anyhow::Result<ExitCode> {
        self.call_with(method, path, None)
    }

    /// [`AdminArgs::call`] with a JSON body.
    pub fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<ExitCode> {
        let (status, body) = self.send(method, path, body)?;
        print_reply(&body)?;
        Ok(exit_code(status))
    }
}

fn print_reply(body: &[u8]) -> anyhow::Result<()> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
        Err(_) => println!("{}", String::from_utf8_lossy(body)),
    }
    Ok(())
}

fn exit_code(status: http::StatusCode) -> ExitCode {
    if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `ess-agent status ID`.
pub fn status(admin: &AdminArgs, id: &str) -> anyhow::Result<ExitCode> {
    admin.call(Method::GET, &format!("/v1/events/{}", encode_id(id)))
}

/// `ess-agent replay ID [--route NAME] [--force]`.
pub fn replay(
    admin: &AdminArgs,
    id: &str,
    route: Option<&str>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let query = if force { "?force=true" } else { "" };
    let body = route.map(|route| json!({ "route": route }));
    admin.call_with(
        Method::POST,
        &format!("/v1/events/{}/replay{query}", encode_id(id)),
        body.as_ref(),
    )
}

/// `ess-agent events list`: a table, or JSON lines; the next page's cursor, if any, on stderr.
pub fn events(admin: &AdminArgs, command: &EventsCommand) -> anyhow::Result<ExitCode> {
    let EventsCommand::List(args) = command;
    let mut query = vec![format!("limit={}", args.limit)];
    for (name, value) in [
        ("state", &args.state),
        ("type", &args.event_type),
        ("subject", &args.subject),
        ("route", &args.route),
        ("since", &args.since),
        ("until", &args.until),
        ("cursor", &args.cursor),
    ] {
        if let Some(value) = value {
            query.push(format!("{name}={}", encode_id(value)));
        }
    }
    let (status, body) = admin.send(
        Method::GET,
        &format!("/v1/events?{}", query.join("&")),
        None,
    )?;
    let page: Value = match serde_json::from_slice(&body) {
        Ok(page) if status.is_success() => page,
        _ => {
            print_reply(&body)?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let items = page["items"].as_array().cloned().unwrap_or_default();
    if args.json {
        for item in &items {
            println!("{item}");
        }
    } else {
        print!("{}", table(&items));
    }
    if let Some(cursor) = page["next_cursor"].as_str() {
        eprintln!("more events: add --cursor {cursor}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Events as a table with a header, one line each, columns padded to their widest cell.
fn table(items: &[Value]) -> String {
    const COLUMNS: [(&str, &str); 5] = [
        ("RECEIVED", "received_at"),
        ("STATE", "state"),
        ("TYPE", "type"),
        ("SUBJECT", "subject"),
        ("ID", "id"),
    ];
    let rows: Vec<Vec<String>> = std::iter::once(COLUMNS.map(|(h, _)| h.to_owned()).to_vec())
        .chain(items.iter().map(|item| {
            COLUMNS
                .map(|(_, key)| {
                    // Control characters from the hub's data are shown escaped, never sent to
                    // the terminal.
                    let text = item[key].as_str().unwrap_or_default();
                    text.chars()
                        .flat_map(char::escape_debug)
                        .collect::<String>()
                })
                .to_vec()
        }))
        .collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `ess-agent dead-letters …`.
pub fn dead_letters(admin: &AdminArgs, command: &DeadLetterCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadLetterCommand::List { after, limit } => admin.call(
            Method::GET,
            &format!("/v1/dead-letters?after={after}&limit={limit}"),
        ),
        DeadLetterCommand::Retry { id: Some(id), .. } => admin.call(
            Method::POST,
            &format!("/v1/dead-letters/{}/retry", encode_id(id)),
        ),
        DeadLetterCommand::Retry {
            id: None,
            all,
            filter,
        } => {
            let mut body = serde_json::Map::new();
            for (name, value) in [
                ("route", &filter.route),
                ("type", &filter.event_type),
                ("subject", &filter.subject),
                ("since", &filter.since),
                ("until", &filter.until),
            ] {
                if let Some(value) = value {
                    body.insert(name.into(), json!(value));
                }
            }
            if body.is_empty() && !all {
                anyhow::bail!(
                    "name the dead letter to retry, or select several with --route, --type, \
                     --subject, --since, --until, or --all for every one"
                );
            }
            if *all {
                body.insert("all".into(), json!(true));
            }
            admin.call_with(
                Method::POST,
                "/v1/dead-letters/retry",
                Some(&Value::Object(body)),
            )
        }
        DeadLetterCommand::Drop { id } => admin.call(
            Method::DELETE,
            &format!("/v1/dead-letters/{}", encode_id(id)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::config_path;

    #[test]
    fn operator_commands_fall_back_to_the_checkout_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("etc.toml");
        let checkout = dir.path().join("checkout.toml");
        let given = Path::new("given.toml");
        // Neither exists: the default, whose absence is then reported.
        assert_eq!(config_path(None, &default, &checkout), default);
        std::fs::write(&checkout, "").unwrap();
        assert_eq!(config_path(None, &default, &checkout), checkout);
        assert_eq!(config_path(Some(given), &default, &checkout), given);
        // An installed agent's configuration wins over a checkout's.
        std::fs::write(&default, "").unwrap();
        assert_eq!(config_path(None, &default, &checkout), default);
    }

    #[test]
    fn ids_are_encoded_for_paths() {
        assert_eq!(super::encode_id("evt-1"), "evt-1");
        assert_eq!(super::encode_id("a b/c?%"), "a%20b%2Fc%3F%25");
    }
}
