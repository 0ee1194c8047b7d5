//! The `ess-agent` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use ess_agent::cli::{self, AdapterCommand, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("ESS_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Under systemd the journal adds its own timestamps.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_systemd) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match &cli.command {
        Command::Run(args) => cli::run(args),
        Command::Validate(args) => Ok(cli::validate(args)),
        Command::Send(args) => cli::send::send(args),
        Command::Adapter(AdapterCommand::Eval(args)) => cli::adapter::eval(args),
        Command::Adapter(AdapterCommand::Test(args)) => cli::adapter::test(args),
        Command::Status { id, admin } => cli::ops::status(admin, id),
        Command::Replay { id, force, admin } => cli::ops::replay(admin, id, *force),
        Command::DeadLetters { command, admin } => cli::ops::dead_letters(admin, command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
