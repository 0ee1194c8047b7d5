//! The command line: `run`, `validate`, `send`, `adapter eval`, `adapter test`, and the operator
//! commands `status`, `replay`, `events` and `dead-letters` that talk to a running agent, and
//! `journal import`, which moves a SQLite journal into PostgreSQL.

pub mod adapter;
pub mod journal;
pub mod ops;
pub mod send;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, DEFAULT_CONFIG_PATH, Secrets};
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
        /// Through this route only; the other routes keep their state.
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
        /// Apply it again even though it was applied (every route, or the one --route names).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: ops::AdminArgs,
    },
    /// List events, newest first, with filters.
    Events {
        #[command(subcommand)]
        command: ops::EventsCommand,
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
    /// Work with the journal itself.
    #[command(subcommand)]
    Journal(JournalCommand),
}

#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// Copy the SQLite journal in the configuration's state_dir into the PostgreSQL journal the
    /// configuration names (journal.backend = "postgres"): events waiting, dead letters, the
    /// history, status reports. Stop the agent first; the PostgreSQL journal must be empty.
    Import(ConfigArg),
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Evaluate a JSONata expression against an input document and print the result.
    Eval(adapter::EvalArgs),
    /// Run the test cases kept beside each adapter (`NAME.tests/*.json`); exit 1 if any fails.
    Test(adapter::TestArgs),
}

/// Every check `validate` makes, and `run` before it starts: the configuration part by part,
/// its rules, the secrets, the TLS files, the adapters and sinks (built, but no connection is
/// opened), and the outputs the adapters' fixtures expect. The configuration and its secrets
/// when all is well, else every problem found, each with its key path.
pub fn check(path: &Path) -> Result<(Config, Secrets), Vec<Problem>> {
    let mut parsed = match Config::check_file(path) {
        Ok(parsed) => parsed,
        Err(e) => return Err(e.problems()),
    };
    let config = &parsed.config;
    let mut problems = Vec::new();
    let secrets = match config.load_secrets() {
        Ok(secrets) => {
            if let Err(e) = crate::agent::hub_auth(config, &secrets) {
                problems.push(Problem {
                    key: "auth".into(),
                    message: e.to_string(),
                });
            }
            Some(secrets)
        }
        Err(mut list) => {
            problems.append(&mut list);
            None
        }
    };
    if let Some(tls) = &config.ingress.tls
        && let Err(e) = crate::ingress::tls::TlsAcceptor::new(tls)
    {
        problems.push(Problem {
            key: "ingress.tls".into(),
            message: e.to_string(),
        });
    }
    // Compiles every adapter and builds every sink (no connection is opened).
    if let Err(mut list) = crate::dispatch::routes::Routing::build(config, None) {
        problems.append(&mut list);
    }
    // Outputs the adapters' fixtures expect must be ones their sinks can apply (a SQL
    // statement's parameters are fields the adapter returns).
    problems.extend(check_fixture_outputs(config));
    parsed.add(problems);
    match secrets {
        Some(secrets) if parsed.problems.is_empty() => Ok((parsed.config, secrets)),
        _ => Err(parsed.problems),
    }
}

/// `ess-agent validate`: [`check`], printing every problem.
pub fn validate(args: &ConfigArg) -> ExitCode {
    match check(&args.config) {
        Ok(_) => {
            println!("{}: ok", args.config.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{}: {} problem(s):", args.config.display(), problems.len());
            for p in &problems {
                eprintln!("  {p}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `ess-agent run`: refuses to start, naming every problem [`check`] finds, unless there is none.
pub fn run(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let (config, secrets) = match check(&args.config) {
        Ok(checked) => checked,
        Err(problems) => {
            for p in &problems {
                tracing::error!("{}: {p}", args.config.display());
            }
            tracing::error!(
                "cannot start: {} problem(s) in {}; `ess-agent validate --config {}` lists them",
                problems.len(),
                args.config.display(),
                args.config.display()
            );
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
