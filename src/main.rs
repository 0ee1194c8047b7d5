//! The `ess-agent` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use ess_agent::cli::{self, AdapterCommand, Cli, Command, JournalCommand, LogFormat};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Lines the daemon's log thread may hold before logging waits for it: about a second of
/// logging at full load. The queue's slots are allocated up front (32 bytes each).
const LOG_BUFFER_LINES: usize = 16 * 1024;

/// Sets up logging to stderr. The daemon (`run`) writes from a thread of its own, so that a
/// request never waits for the terminal, the pipe or journald to take its line: lines are
/// queued (up to [`LOG_BUFFER_LINES`], then logging waits rather than drops), written in
/// batches, and flushed when the returned guard is dropped. Other commands write directly.
fn init_tracing(format: LogFormat, daemon: bool) -> Option<WorkerGuard> {
    let filter =
        EnvFilter::try_from_env("ESS_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = if daemon {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(LOG_BUFFER_LINES)
            .thread_name("log-writer")
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ));
        (BoxMakeWriter::new(writer), Some(guard))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_timer(ess_agent::timestamp::LogTimer);
    // Under systemd the journal adds its own timestamps.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_systemd) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Text, false) => builder.with_ansi(colour()).init(),
    }
    guard
}

/// Whether text log lines are coloured: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let guard = init_tracing(cli.log_format, matches!(cli.command, Command::Run(_)));
    let result = match &cli.command {
        Command::Run(args) => cli::run(args),
        Command::Validate(args) => Ok(cli::validate(args)),
        Command::Journal(JournalCommand::Import(args)) => cli::journal::import(args),
        Command::Send(args) => cli::send::send(args),
        Command::Adapter(AdapterCommand::Eval(args)) => cli::adapter::eval(args),
        Command::Adapter(AdapterCommand::Test(args)) => cli::adapter::test(args),
        Command::Status { id, admin } => cli::ops::status(admin, id),
        Command::Replay {
            id,
            route,
            force,
            admin,
        } => cli::ops::replay(admin, id, route.as_deref(), *force),
        Command::Events { command, admin } => cli::ops::events(admin, command),
        Command::DeadLetters { command, admin } => cli::ops::dead_letters(admin, command),
    };
    // Every queued log line is out before the exit status (or an error) is.
    drop(guard);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
