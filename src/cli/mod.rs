//! The command line: `run`, `validate`, `send`, `adapter eval`, `adapter test`, and the operator
//! commands `status`, `replay` and `dead-letters` that talk to a running agent.

pub mod adapter;
pub mod ops;
pub mod send;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::settings::Problem;

/// ess-agent: receives Change Events from a Sync Hub, records each durably, and applies it to the
/// partner's systems.
#[derive(Debug, Parser)]
#[command(name = "ess-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log line format: `text` for people, `json` for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the configuration file is.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, env = "ESS_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Check a configuration file (and the secrets and TLS files it names) without starting.
    /// Exits 0 when it is good, 1 with every problem listed by key path.
    Validate(ConfigArg),
    /// Sign and POST a test event to an agent, and print the reply.
    Send(Box<send::SendArgs>),
    /// Work with JSONata adapter scripts.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Show an event's state, per route, from a running agent.
    Status {
        /// The event id.
        id: String,
        #[command(flatten)]
        admin: ops::AdminArgs,
    },
    /// Apply an event again. Dead letters are retried; an applied event needs --force.
    Replay {
        /// The event id.
        id: String,
        /// Apply it again even though it was applied (every route).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: ops::AdminArgs,
    },
    /// List, retry or drop dead letters.
    DeadLetters {
        #[command(subcommand)]
        command: ops::DeadLetterCommand,
        #[command(flatten)]
        admin: ops::AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Evaluate a JSONata expression against an input document and print the result.
    Eval(adapter::EvalArgs),
    /// Run the test cases kept beside each adapter (`NAME.tests/*.json`); exit 1 if any fails.
    Test(adapter::TestArgs),
}

/// Loads the configuration or reports every problem on stderr.
fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

/// `ess-agent validate`: parse, validate, and read every secret and TLS file the config names.
pub fn validate(args: &ConfigArg) -> ExitCode {
    let mut problems = Vec::new();
    match load(&args.config) {
        Ok(config) => {
            match config.load_secrets() {
                Ok(secrets) => {
                    if let Err(e) = crate::agent::hub_auth(&config, &secrets) {
                        problems.push(e.to_string());
                    }
                }
                Err(list) => problems.extend(list.iter().map(ToString::to_string)),
            }
            if let Some(tls) = &config.ingress.tls
                && let Err(e) = crate::ingress::tls::TlsAcceptor::new(tls)
            {
                problems.push(format!("ingress.tls: {e}"));
            }
            // Compiles every adapter and builds every sink (no connection is opened).
            if let Err(list) = crate::dispatch::routes::Routing::build(&config, None) {
                problems.extend(list.iter().map(ToString::to_string));
            }
            // Outputs the adapters' fixtures expect must be ones their sinks can apply (a SQL
            // statement's parameters are fields the adapter returns).
            problems.extend(
                check_fixture_outputs(&config)
                    .iter()
                    .map(ToString::to_string),
            );
        }
        Err(e) => problems.extend(e.problems().iter().map(ToString::to_string)),
    }
    if problems.is_empty() {
        println!("{}: ok", args.config.display());
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: {} problem(s):", args.config.display(), problems.len());
        for p in &problems {
            eprintln!("  {p}");
        }
        ExitCode::FAILURE
    }
}

/// `ess-agent run`.
pub fn run(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let config = match load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let secrets = match config.load_secrets() {
        Ok(secrets) => secrets,
        Err(problems) => {
            for p in problems {
                tracing::error!("{}: {p}", args.config.display());
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ess-agent")
        .build()?;
    runtime.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        crate::shutdown::spawn_signal_handler(stop.clone())?;
        match crate::agent::run(&args.config, config, secrets, stop).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                tracing::error!("cannot start: {e}");
                Ok(ExitCode::FAILURE)
            }
        }
    })
}

/// For every route, checks with its sink (see [`crate::sink::SinkSpec::check_output`]) each
/// expected output among the fixtures of the route's adapter, e.g. that a SQL statement's
/// parameters are fields the adapter returns. For `ess-agent validate`; reads only the fixture
/// files. A fixture that cannot be read is left to the adapter tests.
fn check_fixture_outputs(config: &Config) -> Vec<Problem> {
    use crate::adapter::fixtures::{Expectation, FIXTURE_EXTENSION, Fixture, tests_dir};
    let mut problems = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let Some(sink) = config.sinks.get(&route.sink) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(tests_dir(&route.adapter)) else {
            continue;
        };
        let mut cases: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == FIXTURE_EXTENSION))
            .collect();
        cases.sort();
        for case in cases {
            let Ok(fixture) = Fixture::load(&case) else {
                continue;
            };
            if let Expectation::Value(output) = &fixture.expectation
                && let Err(message) = sink.check_output(output)
            {
                problems.push(Problem {
                    key: format!("routes[{i}]"),
                    message: format!(
                        "sink {} cannot apply the output fixture {} expects of adapter {}: \
                         {message}",
                        route.sink,
                        case.display(),
                        route.adapter.display()
                    ),
                });
            }
        }
    }
    problems
}
