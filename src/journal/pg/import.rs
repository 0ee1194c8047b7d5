//! Moving an agent's SQLite journal into the PostgreSQL journal, for an operator who goes from
//! one agent on SQLite to several agents sharing PostgreSQL.
//!
//! Everything the SQLite journal holds is carried over with its sequence numbers: the backlog,
//! the dead letters, the final events (the history), their bodies, deliveries and attempts,
//! the subjects' applied revisions, the outbox of status reports and the reports sent. The
//! agent that wrote the journal must be stopped: [`import_sqlite`] takes the state directory's
//! lock for as long as it reads, so the agent cannot start meanwhile either.
//!
//! The copy is one PostgreSQL transaction, so an import that fails leaves the PostgreSQL
//! journal as it was (empty) and can simply be run again. Rows are streamed: a thread reads the
//! SQLite journal in one read transaction and hands batches of rows (bounded in number and in
//! body bytes) to the writer, which inserts each batch with one `unnest` statement per table,
//! keeping the sequence numbers (`OVERRIDING SYSTEM VALUE`); at most two batches wait between
//! them, so memory does not grow with the journal. The identity sequences are moved past the
//! highest imported numbers before the COMMIT, so the next event or report any agent inserts
//! gets a higher one.
//!
//! The events' insert trigger (see [`super::wake`]) is disabled inside the transaction, which
//! also makes concurrent appends by running agents wait for the COMMIT (they would otherwise
//! mix their events with the imported ones, and an import refuses a journal that holds
//! events). After the COMMIT, one wake-up names the partitions that got waiting events, so
//! running agents pick up the imported backlog at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::{PgDb, PgError, partition_of, schema, wake};
use crate::journal::lock::StateLock;
use crate::journal::{DeliveryState, EventState, FILE_NAME, JournalError, SCHEMA_VERSION};

/// What an import does beyond the defaults.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The number of partitions of a PostgreSQL journal the import creates (a schema that
    /// exists keeps its own count). It must be the agents' `journal.partitions`. Default 64.
    pub partitions: u32,
    /// Most rows one insert carries. Default 1000.
    pub batch_rows: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            partitions: super::PgOptions::default().partitions,
            batch_rows: 1000,
        }
    }
}

/// Most body bytes (raw bodies and envelopes) one batch of events carries, whatever its row
/// count: a journal of large events is copied in smaller batches.
const BATCH_BYTES: usize = 8 << 20;

/// Batches read ahead of the writer.
const READ_AHEAD: usize = 2;

/// What was imported, for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    /// Events (each with its body).
    pub events: u64,
    /// Events waiting to be applied (state `accepted`).
    pub backlog: u64,
    /// Dead letters waiting for the operator (states `failed` and `parked`).
    pub dead_letters: u64,
    /// Events that wait for nothing (`applied`, `filtered`, `superseded`, and dead letters the
    /// operator dropped).
    pub finished: u64,
    /// Events per state, by the state's word.
    pub by_state: BTreeMap<&'static str, u64>,
    /// Deliveries (one per event and route).
    pub deliveries: u64,
    /// Attempts kept in the routes' histories.
    pub attempts: u64,
    /// Subjects with an applied revision.
    pub subjects: u64,
    /// Status reports waiting to be sent.
    pub outbox: u64,
    /// Status reports the hub took.
    pub reports_sent: u64,
    /// The partition count of the PostgreSQL journal (the `part` of the events).
    pub partitions: u32,
    /// The partitions that got waiting events: the wake-up sent after the COMMIT names them.
    pub woken: Vec<i32>,
}

/// Why a journal could not be imported. In every case the PostgreSQL journal holds the rows it
/// held before; only its tables may have been created (by the migration any agent would run).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The state directory holds no journal.
    #[error(
        "there is no SQLite journal in {}: give the state directory of the agent whose journal \
         is to be imported (its state_dir, holding {FILE_NAME})",
        .state_dir.display()
    )]
    NoJournal { state_dir: PathBuf },
    /// The agent that uses the journal is running.
    #[error(
        "the journal in {} is in use by a running agent ({holder}): stop the agent, then \
         import; it must stay stopped, since what it would accept afterwards is not imported",
        .state_dir.display()
    )]
    Running { state_dir: PathBuf, holder: String },
    /// The state directory's lock could not be taken for another reason.
    #[error("cannot lock the journal's state directory for the import: {0}")]
    Lock(#[source] JournalError),
    /// The journal was written by an older agent and not yet migrated.
    #[error(
        "journal {} has schema version {found}, and the import reads version {current}: start \
         this version of the agent once on it (journal.backend = \"sqlite\") so that it \
         migrates the journal, stop it, then import",
        .path.display()
    )]
    OldSchema {
        path: PathBuf,
        found: i64,
        current: i64,
    },
    /// The journal was written by a newer agent.
    #[error(
        "journal {} has schema version {found} but this agent reads up to {current}: import \
         with the version of the agent that wrote it",
        .path.display()
    )]
    NewSchema {
        path: PathBuf,
        found: i64,
        current: i64,
    },
    /// The SQLite journal could not be read.
    #[error(
        "cannot read journal {} ({source}): start the agent once on it, which checks and \
         repairs what it can, or restore a backup",
        .path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The PostgreSQL journal holds a journal already.
    #[error(
        "the PostgreSQL journal at {at} (schema {schema}) already holds {holds}, and nothing \
         was imported: import into an empty database or schema (a new journal.schema), since \
         two journals' sequence numbers and revisions cannot be merged"
    )]
    NotEmpty {
        at: String,
        schema: String,
        holds: String,
    },
    /// A stored value does not fit the PostgreSQL journal's column.
    #[error(
        "journal {} holds a row of table {table} that the PostgreSQL journal cannot take \
         ({detail}): the journal was changed by hand or by a newer agent; correct or delete \
         the row, then import",
        .path.display()
    )]
    BadRow {
        path: PathBuf,
        table: &'static str,
        detail: String,
    },
    /// The thread reading the SQLite journal ended without finishing.
    #[error(
        "the import stopped: the thread reading the SQLite journal failed ({0}); nothing was \
         imported, and the import can be run again"
    )]
    Interrupted(String),
    /// PostgreSQL refused or could not be reached; the transaction was rolled back.
    #[error("{0}; nothing was imported, and the import can be run again")]
    Pg(#[from] PgError),
}

/// Imports the SQLite journal of the (stopped) agent whose state directory is `state_dir`
/// into the PostgreSQL journal `db`, which must be empty (it is created when missing, with
/// [`ImportOptions::default`]'s partition count). `agent` is recorded as the agent that received
/// the events and sent the reports. See [`import_sqlite_with`].
pub async fn import_sqlite(
    state_dir: &Path,
    db: &PgDb,
    agent: &str,
) -> Result<Imported, ImportError> {
    import_sqlite_with(state_dir, db, agent, &ImportOptions::default()).await
}

/// [`import_sqlite`] with `options`: checks the SQLite journal (present, not in use, of the
/// current schema version), migrates the PostgreSQL schema, refuses a PostgreSQL journal that
/// holds anything, copies every table in one transaction and, after the COMMIT, wakes the
/// agents for the partitions that got waiting events.
pub async fn import_sqlite_with(
    state_dir: &Path,
    db: &PgDb,
    agent: &str,
    options: &ImportOptions,
) -> Result<Imported, ImportError> {
    let path = state_dir.join(FILE_NAME);
    if !path.is_file() {
        return Err(ImportError::NoJournal {
            state_dir: state_dir.to_owned(),
        });
    }
    // Held until the import is over: the agent can neither be running nor start meanwhile.
    let _lock = StateLock::acquire(state_dir).map_err(|e| match e {
        JournalError::Locked { holder, .. } => ImportError::Running {
            state_dir: state_dir.to_owned(),
            holder,
        },
        other => ImportError::Lock(other),
    })?;
    let conn = open_sqlite(&path)?;

    let migrated = schema::migrate(db, options.partitions).await?;
    let mut imported = Imported {
        partitions: migrated.partitions,
        ..Imported::default()
    };
    const DOING: &str = "importing a journal";
    let err = |e| ImportError::Pg(db.error(e, DOING));
    let mut tx = db.pool().begin().await.map_err(err)?;
    let result = copy(&mut tx, db, conn, &path, agent, options, &mut imported).await;
    if let Err(e) = result {
        // At once: the transaction holds the events table's lock.
        let _ = tx.rollback().await;
        return Err(e);
    }
    tx.commit().await.map_err(err)?;
    if !imported.woken.is_empty()
        && let Err(e) = wake::notify(db, &imported.woken).await
    {
        // The import is committed; an agent finds the backlog at its next pass over the
        // partitions it holds (when it takes them, or its listening connection comes back).
        tracing::warn!(error = %e, "the journal was imported but the agents could not be woken for its backlog");
    }
    Ok(imported)
}

/// Opens the SQLite journal read-only and checks its schema version.
fn open_sqlite(path: &Path) -> Result<Connection, ImportError> {
    let read = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(read)?;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(read)?;
    if found < SCHEMA_VERSION {
        return Err(ImportError::OldSchema {
            path: path.to_owned(),
            found,
            current: SCHEMA_VERSION,
        });
    }
    if found > SCHEMA_VERSION {
        return Err(ImportError::NewSchema {
            path: path.to_owned(),
            found,
            current: SCHEMA_VERSION,
        });
    }
    Ok(conn)
}

/// The import inside its transaction: lock, check, copy, move the identities on.
async fn copy(
    tx: &mut sqlx::PgConnection,
    db: &PgDb,
    conn: Connection,
    path: &Path,
    agent: &str,
    options: &ImportOptions,
    imported: &mut Imported,
) -> Result<(), ImportError> {
    const DOING: &str = "importing a journal";
    let err = |e| ImportError::Pg(db.error(e, DOING));
    // Takes the events table's SHARE ROW EXCLUSIVE lock: appends of running agents wait for
    // the COMMIT, so the check below stays true, and the imported events wake nobody before
    // the one wake-up that follows the COMMIT.
    sqlx::raw_sql("ALTER TABLE events DISABLE TRIGGER events_notify")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    refuse_non_empty(tx, db).await?;

    let (batches, mut rx) = mpsc::channel(READ_AHEAD);
    let reader = {
        let path = path.to_owned();
        let rows = options.batch_rows.max(1);
        tokio::task::spawn_blocking(move || read_journal(conn, &path, rows, &batches))
    };
    let mut parts = BTreeSet::new();
    let mut max_outbox_seq = 0i64;
    let mut max_event_seq = 0i64;
    let written = async {
        while let Some(batch) = rx.recv().await {
            write_batch(
                tx,
                batch,
                agent,
                imported,
                &mut parts,
                &mut max_event_seq,
                &mut max_outbox_seq,
            )
            .await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    // The reader stops at its next batch once the receiver is gone.
    drop(rx);
    let read = reader
        .await
        .unwrap_or_else(|e| Err(ImportError::Interrupted(e.to_string())));
    // The reader's error first: a write fails after it only because the reader stopped.
    read?;
    written.map_err(err)?;

    // The next seq any agent takes is above the imported ones. setval is not undone by a
    // rollback, which leaves at worst a gap in the numbers of an empty journal.
    for (table, max) in [("events", max_event_seq), ("outbox", max_outbox_seq)] {
        if max > 0 {
            sqlx::query("SELECT setval(pg_get_serial_sequence($1, 'seq'), $2)")
                .bind(table)
                .bind(max)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
    }
    sqlx::raw_sql("ALTER TABLE events ENABLE TRIGGER events_notify")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    imported.woken = parts.into_iter().collect();
    Ok(())
}

/// Refuses a PostgreSQL journal that holds events, subjects' revisions or status reports.
async fn refuse_non_empty(tx: &mut sqlx::PgConnection, db: &PgDb) -> Result<(), ImportError> {
    const DOING: &str = "checking that the PostgreSQL journal is empty";
    let err = |e| ImportError::Pg(db.error(e, DOING));
    let (schema, events, subjects, outbox, sent): (Option<String>, i64, bool, bool, bool) =
        sqlx::query_as(
            "SELECT current_schema(), (SELECT count(*) FROM events), \
             EXISTS (SELECT 1 FROM subjects), EXISTS (SELECT 1 FROM outbox), \
             EXISTS (SELECT 1 FROM reports_sent)",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
    let holds = if events > 0 {
        format!("{events} events")
    } else if subjects {
        "subjects' applied revisions".to_owned()
    } else if outbox || sent {
        "status reports".to_owned()
    } else {
        return Ok(());
    };
    Err(ImportError::NotEmpty {
        at: db.at().to_owned(),
        schema: schema.unwrap_or_default(),
        holds,
    })
}

/// One table's rows, as read from SQLite.
enum Batch {
    Events(Vec<EventRow>),
    Deliveries(Vec<DeliveryRow>),
    Attempts(Vec<AttemptRow>),
    Subjects(Vec<(String, i64)>),
    Outbox(Vec<OutboxRow>),
    Sent(Vec<SentRow>),
}

struct EventRow {
    seq: i64,
    id: String,
    event_type: String,
    version: i64,
    subject: String,
    revision: Option<i64>,
    source: Option<String>,
    time: Option<String>,
    format: String,
    content_type: Option<String>,
    received_at: String,
    state: EventState,
    updated_at: String,
    error: Option<String>,
    finished_at: Option<String>,
    /// `None` for an event whose body row is missing.
    body: Option<Body>,
}

/// An event's body row.
struct Body {
    raw: Vec<u8>,
    envelope: String,
    receipt: Option<String>,
}

struct DeliveryRow {
    event_seq: i64,
    route: String,
    sink: String,
    state: DeliveryState,
    attempts: i32,
    next_attempt_ms: Option<i64>,
    last_error: Option<String>,
    updated_at: String,
    event_type: Option<String>,
}

struct AttemptRow {
    event_seq: i64,
    route: String,
    attempt: i32,
    sink: String,
    started_at: String,
    duration_ms: i64,
    outcome: DeliveryState,
    error: Option<String>,
    output: Option<String>,
    output_bytes: Option<i64>,
    output_truncated: bool,
}

struct OutboxRow {
    seq: i64,
    event_id: String,
    message_id: String,
    body: String,
    attempts: i32,
    next_attempt_ms: i64,
    last_error: Option<String>,
    created_at: String,
}

struct SentRow {
    seq: i64,
    event_id: String,
    message_id: String,
    body: String,
    attempts: i32,
    created_at: String,
    sent_at: String,
}

/// Reads every table in one read transaction and sends it in batches; stops early, without an
/// error, when the writer has gone (it failed, and says why).
fn read_journal(
    mut conn: Connection,
    path: &Path,
    rows: usize,
    out: &mpsc::Sender<Batch>,
) -> Result<(), ImportError> {
    let read = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let tx = conn.transaction().map_err(read)?;
    let r = Reader {
        conn: &tx,
        path,
        rows,
        out,
    };
    if !r.stream(
        "events",
        "SELECT e.seq, e.id, e.type, e.version, e.subject, e.revision, e.source, e.time, \
         e.format, e.content_type, e.received_at, e.state, e.updated_at, e.error, \
         e.finished_at, b.seq IS NOT NULL, b.raw_body, b.envelope, b.receipt \
         FROM events e LEFT JOIN event_bodies b ON b.seq = e.seq ORDER BY e.seq",
        |row| {
            let body = if row.get::<_, bool>(15)? {
                Some(Body {
                    raw: row.get(16)?,
                    envelope: row.get(17)?,
                    receipt: row.get(18)?,
                })
            } else {
                None
            };
            Ok(EventRow {
                seq: row.get(0)?,
                id: row.get(1)?,
                event_type: row.get(2)?,
                version: row.get(3)?,
                subject: row.get(4)?,
                revision: row.get(5)?,
                source: row.get(6)?,
                time: row.get(7)?,
                format: row.get(8)?,
                content_type: row.get(9)?,
                received_at: row.get(10)?,
                state: row.get(11)?,
                updated_at: row.get(12)?,
                error: row.get(13)?,
                finished_at: row.get(14)?,
                body,
            })
        },
        |e| {
            e.body
                .as_ref()
                .map_or(0, |b| b.raw.len() + b.envelope.len())
        },
        Batch::Events,
    )? {
        return Ok(());
    }
    if !r.stream(
        "deliveries",
        "SELECT event_seq, route, sink, state, attempts, next_attempt_ms, last_error, \
         updated_at, type FROM deliveries ORDER BY event_seq, route",
        |row| {
            Ok(DeliveryRow {
                event_seq: row.get(0)?,
                route: row.get(1)?,
                sink: row.get(2)?,
                state: row.get(3)?,
                attempts: row.get(4)?,
                next_attempt_ms: row.get(5)?,
                last_error: row.get(6)?,
                updated_at: row.get(7)?,
                event_type: row.get(8)?,
            })
        },
        |_| 0,
        Batch::Deliveries,
    )? {
        return Ok(());
    }
    if !r.stream(
        "attempts",
        "SELECT event_seq, route, attempt, sink, started_at, duration_ms, outcome, error, \
         output, output_bytes, output_truncated FROM attempts \
         ORDER BY event_seq, route, attempt",
        |row| {
            Ok(AttemptRow {
                event_seq: row.get(0)?,
                route: row.get(1)?,
                attempt: row.get(2)?,
                sink: row.get(3)?,
                started_at: row.get(4)?,
                duration_ms: row.get(5)?,
                outcome: row.get(6)?,
                error: row.get(7)?,
                output: row.get(8)?,
                output_bytes: row.get(9)?,
                output_truncated: row.get(10)?,
            })
        },
        |a| a.output.as_ref().map_or(0, String::len),
        Batch::Attempts,
    )? {
        return Ok(());
    }
    if !r.stream(
        "subjects",
        "SELECT subject, last_revision FROM subjects ORDER BY subject",
        |row| Ok((row.get(0)?, row.get(1)?)),
        |_| 0,
        Batch::Subjects,
    )? {
        return Ok(());
    }
    if !r.stream(
        "outbox",
        "SELECT seq, event_id, message_id, body, attempts, next_attempt_ms, last_error, \
         created_at FROM outbox ORDER BY seq",
        |row| {
            Ok(OutboxRow {
                seq: row.get(0)?,
                event_id: row.get(1)?,
                message_id: row.get(2)?,
                body: row.get(3)?,
                attempts: row.get(4)?,
                next_attempt_ms: row.get(5)?,
                last_error: row.get(6)?,
                created_at: row.get(7)?,
            })
        },
        |o| o.body.len(),
        Batch::Outbox,
    )? {
        return Ok(());
    }
    if !r.stream(
        "reports_sent",
        "SELECT seq, event_id, message_id, body, attempts, created_at, sent_at \
         FROM reports_sent ORDER BY seq",
        |row| {
            Ok(SentRow {
                seq: row.get(0)?,
                event_id: row.get(1)?,
                message_id: row.get(2)?,
                body: row.get(3)?,
                attempts: row.get(4)?,
                created_at: row.get(5)?,
                sent_at: row.get(6)?,
            })
        },
        |s| s.body.len(),
        Batch::Sent,
    )? {
        return Ok(());
    }
    Ok(())
}

/// The reading side's connection and where its batches go.
struct Reader<'a> {
    conn: &'a Connection,
    path: &'a Path,
    rows: usize,
    out: &'a mpsc::Sender<Batch>,
}

impl Reader<'_> {
    /// Sends the rows of `sql` in batches of at most `self.rows` rows and [`BATCH_BYTES`]
    /// (as `bytes` counts them). False when the writer has gone.
    fn stream<T>(
        &self,
        table: &'static str,
        sql: &str,
        map: impl Fn(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error>,
        bytes: impl Fn(&T) -> usize,
        batch: impl Fn(Vec<T>) -> Batch,
    ) -> Result<bool, ImportError> {
        let read = |source| ImportError::Read {
            path: self.path.to_owned(),
            source,
        };
        let mut stmt = self.conn.prepare(sql).map_err(read)?;
        let mut rows = stmt.query([]).map_err(read)?;
        let mut pending = Vec::with_capacity(self.rows);
        let mut pending_bytes = 0;
        while let Some(row) = rows.next().map_err(read)? {
            let value = map(row).map_err(|e| match e {
                // A value of the wrong type or out of range: the file is sound, the row is not.
                rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::FromSqlConversionFailure(..) => ImportError::BadRow {
                    path: self.path.to_owned(),
                    table,
                    detail: e.to_string(),
                },
                other => read(other),
            })?;
            pending_bytes += bytes(&value);
            pending.push(value);
            if pending.len() >= self.rows || pending_bytes >= BATCH_BYTES {
                pending_bytes = 0;
                let full = std::mem::replace(&mut pending, Vec::with_capacity(self.rows));
                if self.out.blocking_send(batch(full)).is_err() {
                    return Ok(false);
                }
            }
        }
        if !pending.is_empty() && self.out.blocking_send(batch(pending)).is_err() {
            return Ok(false);
        }
        Ok(true)
    }
}

/// Inserts one batch and counts it.
async fn write_batch(
    tx: &mut sqlx::PgConnection,
    batch: Batch,
    agent: &str,
    imported: &mut Imported,
    parts: &mut BTreeSet<i32>,
    max_event_seq: &mut i64,
    max_outbox_seq: &mut i64,
) -> Result<(), sqlx::Error> {
    match batch {
        Batch::Events(rows) => {
            let part: Vec<i32> = rows
                .iter()
                .map(|e| partition_of(&e.subject, imported.partitions))
                .collect();
            for (e, &p) in rows.iter().zip(&part) {
                imported.events += 1;
                *imported.by_state.entry(e.state.as_str()).or_default() += 1;
                match e.state {
                    EventState::Accepted => {
                        imported.backlog += 1;
                        parts.insert(p);
                    }
                    EventState::Failed | EventState::Parked => imported.dead_letters += 1,
                    EventState::Applied
                    | EventState::Filtered
                    | EventState::Superseded
                    | EventState::Dropped => imported.finished += 1,
                }
                *max_event_seq = (*max_event_seq).max(e.seq);
            }
            sqlx::query(
                "INSERT INTO events (seq, id, part, type, version, subject, revision, source, \
                   time, format, content_type, received_at, received_by, state, updated_at, \
                   error, finished_at) OVERRIDING SYSTEM VALUE \
                 SELECT seq, id, part, type, version, subject, revision, source, time, format, \
                   content_type, received_at, $17, state, updated_at, error, finished_at \
                 FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::bigint[], \
                   $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], \
                   $12::text[], $13::text[], $14::text[], $15::text[], $16::text[]) \
                 AS t(seq, id, part, type, version, subject, revision, source, time, format, \
                   content_type, received_at, state, updated_at, error, finished_at)",
            )
            .bind(rows.iter().map(|e| e.seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
            .bind(&part)
            .bind(
                rows.iter()
                    .map(|e| e.event_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|e| e.version).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.revision).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.source.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.time.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.format.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|e| e.content_type.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|e| e.received_at.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|e| e.state.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|e| e.updated_at.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|e| e.error.as_deref()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|e| e.finished_at.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(agent)
            .execute(&mut *tx)
            .await?;
            let bodies: Vec<(i64, &Body)> = rows
                .iter()
                .filter_map(|e| e.body.as_ref().map(|b| (e.seq, b)))
                .collect();
            sqlx::query(
                "INSERT INTO event_bodies (seq, raw_body, envelope, receipt) \
                 SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::text[])",
            )
            .bind(bodies.iter().map(|(seq, _)| *seq).collect::<Vec<_>>())
            .bind(
                bodies
                    .iter()
                    .map(|(_, b)| b.raw.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(
                bodies
                    .iter()
                    .map(|(_, b)| b.envelope.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                bodies
                    .iter()
                    .map(|(_, b)| b.receipt.as_deref())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        Batch::Deliveries(rows) => {
            imported.deliveries += rows.len() as u64;
            sqlx::query(
                "INSERT INTO deliveries (event_seq, route, sink, state, attempts, \
                   next_attempt_ms, last_error, updated_at, type) \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], \
                   $5::int[], $6::bigint[], $7::text[], $8::text[], $9::text[])",
            )
            .bind(rows.iter().map(|d| d.event_seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.route.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.sink.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.state.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.attempts).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.next_attempt_ms).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|d| d.last_error.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|d| d.updated_at.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|d| d.event_type.as_deref())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        Batch::Attempts(rows) => {
            imported.attempts += rows.len() as u64;
            sqlx::query(
                "INSERT INTO attempts (event_seq, route, attempt, sink, started_at, duration_ms, \
                   outcome, error, output, output_bytes, output_truncated) \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], \
                   $5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[], $10::bigint[], \
                   $11::boolean[])",
            )
            .bind(rows.iter().map(|a| a.event_seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.route.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.attempt).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.sink.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|a| a.started_at.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|a| a.duration_ms).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.error.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.output.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.output_bytes).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.output_truncated).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        Batch::Subjects(rows) => {
            imported.subjects += rows.len() as u64;
            sqlx::query(
                "INSERT INTO subjects (subject, last_revision) \
                 SELECT * FROM unnest($1::text[], $2::bigint[])",
            )
            .bind(rows.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| *r).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        Batch::Outbox(rows) => {
            imported.outbox += rows.len() as u64;
            for o in &rows {
                *max_outbox_seq = (*max_outbox_seq).max(o.seq);
            }
            sqlx::query(
                "INSERT INTO outbox (seq, event_id, message_id, body, attempts, \
                   next_attempt_ms, last_error, created_at) OVERRIDING SYSTEM VALUE \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], \
                   $5::int[], $6::bigint[], $7::text[], $8::text[])",
            )
            .bind(rows.iter().map(|o| o.seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|o| o.event_id.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|o| o.message_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|o| o.body.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|o| o.attempts).collect::<Vec<_>>())
            .bind(rows.iter().map(|o| o.next_attempt_ms).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|o| o.last_error.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|o| o.created_at.as_str())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        Batch::Sent(rows) => {
            imported.reports_sent += rows.len() as u64;
            // A sent report keeps its outbox seq, so new reports must number above it too:
            // a report recorded as sent under a seq that is taken is not recorded.
            for s in &rows {
                *max_outbox_seq = (*max_outbox_seq).max(s.seq);
            }
            sqlx::query(
                "INSERT INTO reports_sent (seq, event_id, message_id, body, attempts, \
                   created_at, sent_at, sent_by) \
                 SELECT seq, event_id, message_id, body, attempts, created_at, sent_at, $8 \
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[], \
                   $6::text[], $7::text[]) \
                 AS t(seq, event_id, message_id, body, attempts, created_at, sent_at)",
            )
            .bind(rows.iter().map(|s| s.seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|s| s.event_id.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|s| s.message_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|s| s.body.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|s| s.attempts).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|s| s.created_at.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|s| s.sent_at.as_str()).collect::<Vec<_>>())
            .bind(agent)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use sqlx::Row as _;

    use super::super::append::{AppendOutcome, Appender};
    use super::super::claim;
    use super::super::testdb::{TestSchema, new_event};
    use super::super::wake::{Wakeup, Wakeups};
    use super::*;
    use crate::journal::{
        AppliedOutput, Attempt, DeliveryUpdate, Finish, JournalOptions, NewEvent, SqliteJournal,
    };

    const AGENT: &str = "importer";

    fn options(batch_rows: usize) -> ImportOptions {
        ImportOptions {
            partitions: 16,
            batch_rows,
        }
    }

    fn open(dir: &Path) -> Arc<SqliteJournal> {
        let options = JournalOptions {
            retention: None,
            ..JournalOptions::default()
        };
        SqliteJournal::open(dir, options).unwrap()
    }

    /// Event `n` of a small journal: subjects S0..S12, some with a source, a time and a receipt.
    fn event(n: usize) -> NewEvent {
        let mut e = new_event(&format!("evt-{n}"), &format!("S{}", n % 13));
        e.revision = Some(n as u64 + 1);
        if n.is_multiple_of(2) {
            e.source = Some("hub".into());
            e.time = Some("2026-12-07T10:00:00.000Z".into());
            e.receipt = Some(format!("{{\"methods\":[\"hmac\"],\"n\":{n}}}"));
        }
        // Bytes that are not text survive as they are.
        e.raw_body = bytes::Bytes::from(vec![0, 159, 146, 150, n as u8]);
        e
    }

    fn update(seq: i64, route: &str, state: DeliveryState, attempts: u32) -> DeliveryUpdate {
        let failed = state == DeliveryState::Failed || state == DeliveryState::Pending;
        DeliveryUpdate {
            seq,
            route: route.into(),
            sink: format!("{route}-sink"),
            state,
            attempts,
            next_attempt_ms: (state == DeliveryState::Pending).then_some(1_900_000_000_000),
            last_error: failed.then(|| format!("refused {seq}")),
            attempt: Some(Attempt {
                started_at: crate::timestamp::now(),
                duration_ms: seq as u64 * 3,
                outcome: if failed { DeliveryState::Failed } else { state },
                error: failed.then(|| format!("refused {seq}")),
                output: (state == DeliveryState::Applied)
                    .then(|| AppliedOutput::new(format!("{{\"seq\":{seq}}}"))),
            }),
        }
    }

    /// A journal of `count` events in every state the importer distinguishes: applied (with
    /// deliveries, attempts, a subject revision and a report, some sent), failed and parked
    /// (with reports waiting, one retried), dropped, filtered, tried and waiting, untried.
    async fn build(dir: &Path, count: usize) {
        let journal = open(dir);
        for n in 0..count {
            journal.append(event(n)).await.unwrap();
        }
        for n in 0..count {
            let seq = n as i64 + 1;
            let finish = |state: EventState, error: Option<&str>| Finish {
                seq,
                state,
                error: error.map(str::to_owned),
                subject_revision: (state == EventState::Applied)
                    .then(|| (format!("S{}", n % 13), n as u64 + 1)),
                report: Some((format!("msg-{n}"), format!("{{\"status\":\"{state}\"}}"))),
                event_id: format!("evt-{n}"),
            };
            match n % 7 {
                0 | 1 => journal
                    .finish_with(
                        vec![
                            update(seq, "r1", DeliveryState::Applied, 1),
                            update(seq, "r2", DeliveryState::Filtered, 0),
                        ],
                        finish(EventState::Applied, None),
                    )
                    .await
                    .unwrap(),
                2 => journal
                    .finish_with(
                        vec![update(seq, "r1", DeliveryState::Failed, 5)],
                        finish(EventState::Failed, Some("the sink refused it")),
                    )
                    .await
                    .unwrap(),
                3 => journal
                    .finish(finish(EventState::Parked, Some("no route")))
                    .await
                    .unwrap(),
                4 => journal
                    .set_deliveries(vec![
                        update(seq, "r1", DeliveryState::Pending, 2),
                        update(seq, "r2", DeliveryState::Applied, 1),
                    ])
                    .await
                    .unwrap(),
                5 => journal
                    .finish(finish(EventState::Filtered, None))
                    .await
                    .unwrap(),
                _ => {}
            }
        }
        // One failed event dropped, some reports sent, one retried.
        journal.drop_dead_letter("evt-2").await.unwrap();
        let due = journal.outbox_due(i64::MAX, 1000).unwrap();
        assert!(due.len() > 10, "{}", due.len());
        for row in due.iter().step_by(3) {
            journal.outbox_done(row.seq).await.unwrap();
        }
        journal
            .outbox_retry(due[1].seq, 3, 1_900_000_000_000, "hub said 503".into())
            .await
            .unwrap();
        journal.close();
    }

    /// Every row of a table, each column as text, from SQLite (`sqlite` columns) and from
    /// PostgreSQL (`pg` columns).
    struct Table {
        name: &'static str,
        order: &'static str,
        sqlite: Vec<String>,
        pg: Vec<String>,
    }

    fn table(name: &'static str, order: &'static str, columns: &[&str]) -> Table {
        let mut t = Table {
            name,
            order,
            sqlite: Vec::new(),
            pg: Vec::new(),
        };
        // Aliased, so that ORDER BY names the table's columns, not the text made of them.
        for (i, &c) in columns.iter().enumerate() {
            let (s, p): (String, String) = match c {
                "raw_body" => (
                    "lower(hex(raw_body))".into(),
                    "encode(raw_body, 'hex')".into(),
                ),
                "output_truncated" => (
                    "CAST(output_truncated AS TEXT)".into(),
                    "output_truncated::int::text".into(),
                ),
                _ => (format!("CAST({c} AS TEXT)"), format!("({c})::text")),
            };
            t.sqlite.push(format!("{s} AS c{i}"));
            t.pg.push(format!("{p} AS c{i}"));
        }
        t
    }

    /// The tables the import copies, with every column the SQLite journal has.
    fn tables() -> Vec<Table> {
        vec![
            table(
                "events",
                "seq",
                &[
                    "seq",
                    "id",
                    "type",
                    "version",
                    "subject",
                    "revision",
                    "source",
                    "time",
                    "format",
                    "content_type",
                    "received_at",
                    "state",
                    "updated_at",
                    "error",
                    "finished_at",
                ],
            ),
            table(
                "event_bodies",
                "seq",
                &["seq", "raw_body", "envelope", "receipt"],
            ),
            table(
                "deliveries",
                "event_seq, route",
                &[
                    "event_seq",
                    "route",
                    "sink",
                    "state",
                    "attempts",
                    "next_attempt_ms",
                    "last_error",
                    "updated_at",
                    "type",
                ],
            ),
            table(
                "attempts",
                "event_seq, route, attempt",
                &[
                    "event_seq",
                    "route",
                    "attempt",
                    "sink",
                    "started_at",
                    "duration_ms",
                    "outcome",
                    "error",
                    "output",
                    "output_bytes",
                    "output_truncated",
                ],
            ),
            table("subjects", "subject", &["subject", "last_revision"]),
            table(
                "outbox",
                "seq",
                &[
                    "seq",
                    "event_id",
                    "message_id",
                    "body",
                    "attempts",
                    "next_attempt_ms",
                    "last_error",
                    "created_at",
                ],
            ),
            table(
                "reports_sent",
                "seq",
                &[
                    "seq",
                    "event_id",
                    "message_id",
                    "body",
                    "attempts",
                    "created_at",
                    "sent_at",
                ],
            ),
        ]
    }

    type Rows = Vec<Vec<Option<String>>>;

    fn sqlite_rows(conn: &Connection, t: &Table) -> Rows {
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {}",
            t.sqlite.join(", "),
            t.name,
            t.order
        );
        let mut stmt = conn.prepare(&sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    async fn pg_rows(db: &PgDb, t: &Table) -> Rows {
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {}",
            t.pg.join(", "),
            t.name,
            t.order
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (0..r.len()).map(|i| r.try_get(i).unwrap()).collect())
            .collect()
    }

    /// Every table's rows in PostgreSQL, for "nothing changed".
    async fn pg_snapshot(db: &PgDb) -> Vec<Rows> {
        let mut all = Vec::new();
        for t in tables() {
            all.push(pg_rows(db, &t).await);
        }
        all
    }

    fn read_only(dir: &Path) -> Connection {
        Connection::open_with_flags(dir.join(FILE_NAME), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
    }

    fn count(conn: &Connection, sql: &str) -> u64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_row_arrives_with_its_values_and_the_backlog_is_woken() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), 300).await;
        let schema = TestSchema::create().await;
        let db = PgDb::new(&schema.options()).unwrap();
        let mut wakeups = Wakeups::listen(&db).await.unwrap();

        // Batches of 64 rows: every table of more than 64 rows takes several.
        let imported = import_sqlite_with(dir.path(), &db, AGENT, &options(64))
            .await
            .unwrap();

        let sqlite = read_only(dir.path());
        for t in tables() {
            let expected = sqlite_rows(&sqlite, &t);
            assert!(!expected.is_empty(), "the journal has {}", t.name);
            assert_eq!(pg_rows(&db, &t).await, expected, "table {}", t.name);
        }
        let states = |sql: &str| count(&sqlite, sql);
        assert_eq!(
            imported,
            Imported {
                events: 300,
                backlog: states("SELECT count(*) FROM events WHERE state = 'accepted'"),
                dead_letters: states(
                    "SELECT count(*) FROM events WHERE state IN ('failed', 'parked')"
                ),
                finished: states(
                    "SELECT count(*) FROM events WHERE state IN \
                     ('applied', 'filtered', 'superseded', 'dropped')"
                ),
                by_state: [
                    (
                        "accepted",
                        states("SELECT count(*) FROM events WHERE state = 'accepted'")
                    ),
                    (
                        "applied",
                        states("SELECT count(*) FROM events WHERE state = 'applied'")
                    ),
                    ("dropped", 1),
                    (
                        "failed",
                        states("SELECT count(*) FROM events WHERE state = 'failed'")
                    ),
                    (
                        "filtered",
                        states("SELECT count(*) FROM events WHERE state = 'filtered'")
                    ),
                    (
                        "parked",
                        states("SELECT count(*) FROM events WHERE state = 'parked'")
                    ),
                ]
                .into_iter()
                .collect(),
                deliveries: states("SELECT count(*) FROM deliveries"),
                attempts: states("SELECT count(*) FROM attempts"),
                subjects: 13,
                outbox: states("SELECT count(*) FROM outbox"),
                reports_sent: states("SELECT count(*) FROM reports_sent"),
                partitions: 16,
                woken: imported.woken.clone(),
            }
        );
        assert_eq!(imported.backlog, 300 / 7 * 2 + 1);

        // What PostgreSQL adds: the partition of each subject, and who received and sent.
        let rows = sqlx::query("SELECT subject, part, received_by FROM events")
            .fetch_all(db.pool())
            .await
            .unwrap();
        for r in &rows {
            let subject: String = r.get(0);
            assert_eq!(r.get::<i32, _>(1), partition_of(&subject, 16), "{subject}");
            assert_eq!(r.get::<String, _>(2), AGENT);
        }
        let senders: Vec<String> = sqlx::query_scalar("SELECT DISTINCT sent_by FROM reports_sent")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert_eq!(senders, [AGENT]);

        // The backlog as an agent reads it: every waiting event, with its envelope and its
        // deliveries, and the agents woken for exactly its partitions.
        let all: Vec<i32> = (0..16).collect();
        let waiting = claim::waiting(&db, &all, 0, 10_000).await.unwrap();
        let mut stmt = sqlite
            .prepare("SELECT seq, subject FROM events WHERE state = 'accepted' ORDER BY seq")
            .unwrap();
        let expected: Vec<claim::Waiting> = stmt
            .query_map([], |r| {
                let subject: String = r.get(1)?;
                Ok(claim::Waiting {
                    seq: r.get(0)?,
                    part: partition_of(&subject, 16),
                    subject,
                })
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(waiting, expected);
        let mut parts: Vec<i32> = expected.iter().map(|w| w.part).collect();
        parts.sort_unstable();
        parts.dedup();
        assert_eq!(imported.woken, parts);
        for w in &waiting {
            let pg = claim::load_event(&db, w.seq).await.unwrap().unwrap();
            let lite = crate::journal::load_event(&sqlite, w.seq).unwrap().unwrap();
            assert_eq!(format!("{pg:?}"), format!("{lite:?}"));
            assert_eq!(
                claim::deliveries(&db, w.seq).await.unwrap(),
                crate::journal::deliveries(&sqlite, w.seq).unwrap()
            );
        }
        assert!(
            waiting
                .iter()
                .any(|w| !crate::journal::deliveries(&sqlite, w.seq)
                    .unwrap()
                    .is_empty()),
            "some waiting events were tried"
        );
        for subject in ["S0", "S5", "S12"] {
            assert_eq!(
                claim::subject_revision(&db, subject).await.unwrap(),
                crate::journal::subject_revision(&sqlite, subject).unwrap()
            );
        }
        let woke = tokio::time::timeout(Duration::from_secs(10), wakeups.next())
            .await
            .expect("woken within 10 s")
            .unwrap();
        assert_eq!(woke, Wakeup::Parts(parts));

        // New events and reports are numbered after the imported ones.
        let max_seq = count(&sqlite, "SELECT max(seq) FROM events") as i64;
        let appender = Appender::start(db.clone(), 16, "b".into(), 8);
        match appender.append(new_event("after", "S1")).await.unwrap() {
            AppendOutcome::Accepted { seq, .. } => assert_eq!(seq, max_seq + 1),
            other => panic!("{other:?}"),
        }
        appender.close().await;
        let max_report = count(
            &sqlite,
            "SELECT max((SELECT max(seq) FROM outbox), (SELECT max(seq) FROM reports_sent))",
        ) as i64;
        let next: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (event_id, message_id, body, created_at) \
             VALUES ('after', 'm', '{}', 'now') RETURNING seq",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(next, max_report + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_import_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), 40).await;
        let schema = TestSchema::create().await;
        let db = PgDb::new(&schema.options()).unwrap();
        import_sqlite_with(dir.path(), &db, AGENT, &options(16))
            .await
            .unwrap();
        let before = pg_snapshot(&db).await;
        let e = import_sqlite_with(dir.path(), &db, AGENT, &options(16))
            .await
            .unwrap_err();
        let message = e.to_string();
        assert!(matches!(e, ImportError::NotEmpty { .. }), "{message}");
        assert!(message.contains("40 events"), "{message}");
        assert!(message.contains("empty database or schema"), "{message}");
        assert!(message.contains(&schema.name), "{message}");
        assert_eq!(pg_snapshot(&db).await, before);

        // A journal with no events left but a subject's revision is not empty either.
        let other = TestSchema::create().await;
        let db = PgDb::new(&other.options()).unwrap();
        schema::migrate(&db, 16).await.unwrap();
        sqlx::query("INSERT INTO subjects (subject, last_revision) VALUES ('S', 1)")
            .execute(db.pool())
            .await
            .unwrap();
        let e = import_sqlite_with(dir.path(), &db, AGENT, &options(16))
            .await
            .unwrap_err();
        assert!(matches!(e, ImportError::NotEmpty { .. }), "{e}");
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(events, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_whose_agent_is_running_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = open(dir.path());
        journal.append(event(1)).await.unwrap();
        let schema = TestSchema::create().await;
        let db = PgDb::new(&schema.options()).unwrap();
        let e = import_sqlite(dir.path(), &db, AGENT).await.unwrap_err();
        let message = e.to_string();
        assert!(matches!(e, ImportError::Running { .. }), "{message}");
        assert!(message.contains("stop the agent"), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        // Refused before PostgreSQL was touched.
        let created: Option<String> = sqlx::query_scalar("SELECT to_regclass('events')::text")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(created, None);
        journal.close();
        drop(journal);
        // Once the agent is stopped, the import goes ahead.
        let imported = import_sqlite(dir.path(), &db, AGENT).await.unwrap();
        assert_eq!((imported.events, imported.backlog), (1, 1));
        assert_eq!(imported.partitions, ImportOptions::default().partitions);
    }

    #[tokio::test]
    async fn a_missing_or_unmigrated_journal_is_refused_saying_what_to_do() {
        let schema = TestSchema::create().await;
        let db = PgDb::new(&schema.options()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = import_sqlite(dir.path(), &db, AGENT).await.unwrap_err();
        assert!(matches!(e, ImportError::NoJournal { .. }), "{e}");
        assert!(e.to_string().contains("state directory"), "{e}");
        assert!(
            !dir.path().join(crate::journal::LOCK_FILE_NAME).exists(),
            "a wrong directory is left as it was"
        );

        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION - 1)
            .unwrap();
        drop(conn);
        let e = import_sqlite(dir.path(), &db, AGENT).await.unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, ImportError::OldSchema { found, .. } if found == SCHEMA_VERSION - 1),
            "{message}"
        );
        assert!(
            message.contains("start this version of the agent once"),
            "{message}"
        );
    }

    /// Twenty thousand events, half of them applied with a delivery each, copied in batches of
    /// a thousand rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_journal_is_copied_in_batches() {
        const COUNT: i64 = 20_000;
        let dir = tempfile::tempdir().unwrap();
        let journal = open(dir.path());
        journal
            .write(|conn| {
                let now = crate::timestamp::now();
                for n in 0..COUNT {
                    let seq = crate::journal::insert_event(conn, &event(n as usize), &now)?
                        .expect("a new id");
                    if n % 2 == 0 {
                        crate::journal::finish_event(
                            conn,
                            &Finish {
                                seq,
                                state: EventState::Applied,
                                error: None,
                                subject_revision: None,
                                report: None,
                                event_id: format!("evt-{n}"),
                            },
                            &now,
                        )?;
                        conn.execute(
                            "INSERT INTO deliveries (event_seq, route, sink, state, attempts, \
                             updated_at, type) VALUES (?1, 'r', 's', 'applied', 1, ?2, 't')",
                            rusqlite::params![seq, now],
                        )?;
                    }
                }
                Ok(())
            })
            .await
            .unwrap();
        journal.close();
        drop(journal);

        let schema = TestSchema::create().await;
        let db = PgDb::new(&schema.options()).unwrap();
        let imported = import_sqlite_with(dir.path(), &db, AGENT, &options(1000))
            .await
            .unwrap();
        assert_eq!(
            (
                imported.events,
                imported.backlog,
                imported.finished,
                imported.deliveries
            ),
            (
                COUNT as u64,
                COUNT as u64 / 2,
                COUNT as u64 / 2,
                COUNT as u64 / 2
            )
        );
        let sqlite = read_only(dir.path());
        for t in tables()
            .iter()
            .filter(|t| ["events", "event_bodies", "deliveries"].contains(&t.name))
        {
            assert_eq!(
                pg_rows(&db, t).await,
                sqlite_rows(&sqlite, t),
                "table {}",
                t.name
            );
        }
    }
}
