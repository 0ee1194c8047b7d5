//! `ess-agent journal import`: moves the SQLite journal of a stopped agent into the PostgreSQL
//! journal that several agents share (docs/high-availability.md).

use std::process::ExitCode;

use crate::config::JournalBackend;
use crate::journal::pg::PgDb;
use crate::journal::pg::import::{ImportOptions, import_sqlite_with};

use super::ConfigArg;

/// Copies the SQLite journal in the configuration's `state_dir` into the PostgreSQL journal
/// that the same configuration names, and prints what it copied.
pub fn import(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let (config, secrets) = match super::check(&args.config) {
        Ok(checked) => checked,
        Err(problems) => {
            eprintln!("{}: {} problem(s):", args.config.display(), problems.len());
            for p in &problems {
                eprintln!("  {p}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    if config.journal.backend != JournalBackend::Postgres {
        eprintln!(
            "{}: journal.backend is \"sqlite\": set journal.backend = \"postgres\" and \
             journal.url to the database to import into, then run this again",
            args.config.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let options = crate::agent::postgres_options(&config, &secrets)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let db = PgDb::new(&options.pg)?;
        let import = ImportOptions {
            partitions: options.pg.partitions,
            ..ImportOptions::default()
        };
        let agent = format!("import-{}", options.agent);
        let result = import_sqlite_with(&config.state_dir, &db, &agent, &import).await;
        db.close().await;
        match result {
            Ok(imported) => {
                println!(
                    "imported {} events from {} into PostgreSQL at {}: {} waiting to be \
                     applied, {} dead letters, {} final; {} deliveries, {} attempts, {} \
                     subjects, {} status reports to send, {} sent",
                    imported.events,
                    config.state_dir.display(),
                    db.at(),
                    imported.backlog,
                    imported.dead_letters,
                    imported.finished,
                    imported.deliveries,
                    imported.attempts,
                    imported.subjects,
                    imported.outbox,
                    imported.reports_sent,
                );
                println!(
                    "start the agents with this configuration; the events waiting are applied \
                     by the agents that hold their partitions"
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("cannot import the journal: {e}");
                Ok(ExitCode::FAILURE)
            }
        }
    })
}
