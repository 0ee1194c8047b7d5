//! `ess-agent send`: an operator's tool that builds a Change Event, signs it the way a hub does
//! (Standard Webhooks), POSTs it and prints the reply.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value, json};

use crate::http_client::{ClientTls, client};
use crate::protocol::auth::WebhookSigner;

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The agent's events endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8787/v1/events")]
    pub url: String,
    /// File holding the hub's Standard Webhooks secret (`whsec_…`); the event is signed with it.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// File holding a bearer token to send as `Authorization: Bearer …`.
    #[arg(long)]
    pub bearer_token_file: Option<PathBuf>,
    /// The event id. Default: a new unique id.
    #[arg(long)]
    pub id: Option<String>,
    /// The event type.
    #[arg(long = "type", default_value = "change")]
    pub event_type: String,
    /// The payload schema version.
    #[arg(long, default_value_t = 1)]
    pub version: u64,
    /// The subject. Default: the event id.
    #[arg(long)]
    pub subject: Option<String>,
    /// The revision of the subject.
    #[arg(long)]
    pub revision: Option<u64>,
    /// The publishing system.
    #[arg(long)]
    pub source: Option<String>,
    /// A file with the payload as JSON (`-` reads standard input). Default: `{}`.
    #[arg(long)]
    pub payload: Option<PathBuf>,
    /// Send as a dry run (`X-HMS-Test: true`): the agent routes and transforms but applies nothing.
    #[arg(long)]
    pub test: bool,
    /// Trust this CA (PEM) instead of the system's roots.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

fn read_payload(path: &Option<PathBuf>) -> anyhow::Result<Value> {
    let text = match path {
        None => return Ok(json!({})),
        Some(p) if p.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())?,
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read payload file {}", p.display()))?,
    };
    serde_json::from_str(&text).context("the payload is not valid JSON")
}

fn read_trimmed(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?
        .trim()
        .to_string())
}

/// A fresh event id: time-ordered and unique enough for manual testing.
fn new_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("evt-{millis}-{:08x}", rand::random::<u32>())
}

/// Builds the event body for the arguments.
pub fn build_event(args: &SendArgs) -> anyhow::Result<(String, Vec<u8>)> {
    let id = args.id.clone().unwrap_or_else(new_id);
    let mut event = Map::new();
    event.insert("id".into(), json!(id));
    event.insert("version".into(), json!(args.version));
    event.insert("type".into(), json!(args.event_type));
    if let Some(subject) = &args.subject {
        event.insert("subject".into(), json!(subject));
    }
    if let Some(revision) = args.revision {
        event.insert("revision".into(), json!(revision));
    }
    if let Some(source) = &args.source {
        event.insert("source".into(), json!(source));
    }
    event.insert("payload".into(), read_payload(&args.payload)?);
    Ok((id, serde_json::to_vec(&Value::Object(event))?))
}

/// Runs `ess-agent send`. Exit status 0 for a 2xx reply, 1 otherwise.
pub fn send(args: &SendArgs) -> anyhow::Result<ExitCode> {
    let (id, body) = build_event(args)?;
    let mut request = Request::post(&args.url).header(header::CONTENT_TYPE, "application/json");
    if let Some(file) = &args.secret_file {
        let signer = WebhookSigner::new(&read_trimmed(file, "secret")?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        for (name, value) in signer.headers(&id, timestamp, &body) {
            request = request.header(name, value);
        }
    }
    if let Some(file) = &args.bearer_token_file {
        request = request.header(
            header::AUTHORIZATION,
            format!("Bearer {}", read_trimmed(file, "bearer token")?),
        );
    }
    if args.test {
        request = request.header("x-hms-test", "true");
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .context("cannot build the request (is --url a valid URL?)")?;
    let tls = ClientTls {
        ca_file: args.ca_file.as_deref(),
        client_cert: args.client_cert.as_deref().zip(args.client_key.as_deref()),
    };
    let client = client(&tls)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = runtime.block_on(async {
        let response = client
            .request(request)
            .await
            .with_context(|| format!("cannot reach {}", args.url))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })?;
    println!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    match serde_json::from_slice::<Value>(&body) {
        Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
        Err(_) => println!("{}", String::from_utf8_lossy(&body)),
    }
    if status.is_success() {
        Ok(ExitCode::SUCCESS)
    } else if status.is_client_error() || status.is_server_error() {
        Ok(ExitCode::FAILURE)
    } else {
        bail!("unexpected status {status}")
    }
}
