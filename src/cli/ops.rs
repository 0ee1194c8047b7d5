//! Operator commands that talk to a running agent's admin API: `status`, `replay` and
//! `dead-letters`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

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
    /// Apply a dead letter again (after fixing its adapter, route or sink).
    Retry { id: String },
    /// Drop a dead letter. For `journal.retention_days` the id stays known, so a redelivery is
    /// answered as a duplicate.
    Drop { id: String },
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

    /// Sends one request to the admin API, prints the JSON reply, and maps the status to an
    /// exit code.
    pub fn call(&self, method: Method, path: &str) -> anyhow::Result<ExitCode> {
        let (base, token) = self.base_and_token()?;
        let url = format!("{base}{path}");
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::new()))?;
        let client = client(&ClientTls::default())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, body) = runtime.block_on(async {
            let response = client.request(request).await.with_context(|| {
                format!("cannot reach the agent's admin API at {base}: is the agent running?")
            })?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })?;
        match serde_json::from_slice::<Value>(&body) {
            Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
            Err(_) => println!("{}", String::from_utf8_lossy(&body)),
        }
        Ok(if status.is_success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// `ess-agent status ID`.
pub fn status(admin: &AdminArgs, id: &str) -> anyhow::Result<ExitCode> {
    admin.call(Method::GET, &format!("/v1/events/{}", encode_id(id)))
}

/// `ess-agent replay ID [--force]`.
pub fn replay(admin: &AdminArgs, id: &str, force: bool) -> anyhow::Result<ExitCode> {
    let query = if force { "?force=true" } else { "" };
    admin.call(
        Method::POST,
        &format!("/v1/events/{}/replay{query}", encode_id(id)),
    )
}

/// `ess-agent dead-letters …`.
pub fn dead_letters(admin: &AdminArgs, command: &DeadLetterCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadLetterCommand::List { after, limit } => admin.call(
            Method::GET,
            &format!("/v1/dead-letters?after={after}&limit={limit}"),
        ),
        DeadLetterCommand::Retry { id } => admin.call(
            Method::POST,
            &format!("/v1/dead-letters/{}/retry", encode_id(id)),
        ),
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
