//! The durable store: every accepted event is committed here, and its log flushed to the disk,
//! before the hub gets a 2xx.
//!
//! The journal is one SQLite database (`journal.sqlite3` in the state directory) in WAL mode. The
//! writer commits with `synchronous=NORMAL` and the flusher thread `fdatasync`s the write-ahead
//! log before anyone whose change the commit holds is answered, so an acknowledged event
//! survives a crash or a power loss (see [`writer::run_flusher`]).
//!
//! All writes go through one writer thread ([`writer`]) that does group commit: requests that
//! arrive while a commit is in progress are gathered into the next transaction, and the
//! batches committed while a flush runs share the next flush, so many concurrent deliveries
//! share one fsync. Checkpoints (copying the log into the database file)
//! and the free-disk check run on a separate thread, off the request path, with one exception:
//! under continuous writes that thread never reaches the log's end, so once the log is longer
//! than its restart size the writer copies the last few frames itself after a commit, and the
//! log starts over instead of growing without bound. Reads (the admin API) use their own
//! connection and never wait for the writer.
//!
//! The journal stores the exact body bytes the hub sent and the normalised envelope beside them;
//! it never interprets payloads.

mod apply;
mod backend;
mod lock;
pub mod pg;
mod query;
mod schema;
mod writer;

pub use apply::{
    AppliedOutput, Attempt, AttemptRecord, DeadLetter, DeliveryRecord, DeliveryUpdate,
    Dispatchable, DropOutcome, EventDetail, Finish, KEPT_ATTEMPTS, MAX_OUTPUT_BYTES, OutboxRow,
    PendingReport, Requeue, RouteHistory, RouteReplay, SentReport, StoredEvent, deliveries,
    finish_event, history, load_event, subject_revision,
};
pub use backend::{Journal, Lease};
pub use query::{EventFilter, EventSummary, Requeued};
pub use writer::{ANNOUNCED_MAX, Announcement, Announcements, Committed, insert_event};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use tokio::sync::oneshot;

pub use lock::LOCK_FILE_NAME;
pub use schema::CURRENT_VERSION as SCHEMA_VERSION;

/// The file name of the journal inside the state directory.
pub const FILE_NAME: &str = "journal.sqlite3";

/// Why the journal could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file system is full (or the journal hit its size limit).
    #[error("the journal's disk is full: free space in the state directory")]
    Full,
    /// An I/O or database error that is not known to be corruption.
    #[error("journal I/O error: {0}")]
    Io(#[source] rusqlite::Error),
    /// The database file is damaged.
    #[error("the journal is corrupt ({0}): restore the state directory from a backup")]
    Corrupt(#[source] rusqlite::Error),
    /// The database file was found damaged when the journal was opened: SQLite refused it
    /// (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) or its quick check found damaged pages.
    #[error(
        "journal {} is damaged ({detail}), and the agent does not run on a damaged journal: \
         move it and its -wal and -shm files aside, then restore the last backup in its place \
         (\"A damaged journal\" in the operations guide)",
        .path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    /// Another process holds the state directory's lock: two agents on one journal would both
    /// apply every event.
    #[error(
        "state directory {} is in use by another process ({holder}): stop it, or give this \
         agent a state_dir of its own",
        .path.display()
    )]
    Locked { path: PathBuf, holder: String },
    /// The state directory could not be prepared.
    #[error("cannot prepare state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The journal was written by a newer version of the agent.
    #[error(
        "the journal has schema version {found} but this agent supports up to {supported}: \
         run the newer agent that wrote it, or restore a backup"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// The journal has been closed (the agent is shutting down).
    #[error("the journal is closed")]
    Closed,
    /// The PostgreSQL journal could not do what was asked.
    #[error(transparent)]
    Postgres(pg::PgError),
    /// The operation exists on the SQLite journal only.
    #[error("{0} needs the SQLite journal (journal.backend = \"sqlite\")")]
    Unsupported(&'static str),
}

impl JournalError {
    /// True when this agent lost the lease the change was made under: another agent applies
    /// the event's subject now.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, JournalError::Postgres(pg::PgError::LeaseLost { .. }))
    }
}

impl From<rusqlite::Error> for JournalError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => JournalError::Full,
            Some(ErrorCode::DatabaseCorrupt) | Some(ErrorCode::NotADatabase) => {
                JournalError::Corrupt(e)
            }
            _ => JournalError::Io(e),
        }
    }
}

/// How the event arrived on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormat {
    ChangeEvent,
    CloudeventsStructured,
    CloudeventsBinary,
}

impl WireFormat {
    fn as_str(self) -> &'static str {
        match self {
            WireFormat::ChangeEvent => "change_event",
            WireFormat::CloudeventsStructured => "cloudevents_structured",
            WireFormat::CloudeventsBinary => "cloudevents_binary",
        }
    }
}

/// An event to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub event_type: String,
    pub version: u64,
    pub subject: String,
    pub revision: Option<u64>,
    pub source: Option<String>,
    pub time: Option<String>,
    pub format: WireFormat,
    pub content_type: Option<String>,
    /// The exact request body.
    pub raw_body: Bytes,
    /// The normalised envelope, serialised as JSON.
    pub envelope: String,
    /// How the request was authenticated (JSON text the ingress makes: methods, signature ids
    /// and times, never a secret); kept beside the body.
    pub receipt: Option<String>,
}

/// The lifecycle states of an event and of its deliveries.
pub mod state;
pub use state::{DeliveryState, EventState};

/// How an event ended (its final state, and the error of a dead letter), for a hub waiting in
/// ack mode `applied`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: EventState,
    pub error: Option<String>,
}

/// What the journal knows about one event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u64,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub format: String,
    pub received_at: String,
    pub state: EventState,
    pub updated_at: String,
    /// Why it was parked or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it reached its final state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The event is new and now durably stored.
    Accepted,
    /// The id was stored before; nothing was written. Carries the stored record.
    Duplicate(Box<EventRecord>),
}

/// Tuning for [`SqliteJournal::open`].
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Most appends one transaction may carry.
    pub max_batch: usize,
    /// How long the writer waits for more final states before it commits a batch that holds
    /// nothing else (see [`crate::config::JournalConfig::finish_linger_ms`]).
    pub finish_linger: Duration,
    /// How far apart final states may arrive and still be taken into the same batch (see the
    /// writer).
    pub finish_gap: Duration,
    /// How often the checkpoint and free-disk check run.
    pub checkpoint_interval: Duration,
    /// Size of the write-ahead log past which the writer restarts it (see
    /// [`crate::config::JournalConfig::wal_restart_mib`]).
    pub wal_restart_bytes: u64,
    /// Free bytes the state directory's file system must keep.
    pub min_free_disk_bytes: u64,
    /// How long final events are kept (see [`crate::config::JournalConfig::retention_days`]);
    /// `None` keeps them for ever.
    pub retention: Option<Duration>,
    /// Connections for the dispatcher's quick reads ([`SqliteJournal::read_now`]): one per worker
    /// thread of the async runtime, which has one per CPU.
    pub quick_readers: usize,
    /// Announcements of committed events that may wait unread ([`Announcements`]).
    pub announced_max: usize,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            max_batch: 512,
            finish_linger: Duration::from_millis(1),
            finish_gap: Duration::from_micros(20),
            checkpoint_interval: Duration::from_millis(10),
            wal_restart_bytes: 64 << 20,
            min_free_disk_bytes: 64 * 1024 * 1024,
            retention: Some(Duration::from_secs(30 * 86_400)),
            quick_readers: quick_reader_count(),
            announced_max: ANNOUNCED_MAX,
        }
    }
}

/// State shared between the journal handle and its threads.
#[derive(Debug, Default)]
struct Shared {
    /// Events not yet in a final state.
    backlog: AtomicU64,
    /// The file system holding the journal has less free space than the configured minimum.
    low_disk: AtomicBool,
    /// Set when the journal is closing; the background thread stops.
    closing: AtomicBool,
    /// Commits completed, for progress checks.
    commits: AtomicU64,
    /// Set by the background thread when the write-ahead log has grown past its limit and has
    /// been copied into the database: the writer finishes the checkpoint after its next commit,
    /// so the next transaction starts the log over.
    restart_wal: AtomicBool,
    /// The frames the background thread had copied when it set `restart_wal`: the writer's
    /// share is what its own checkpoint copies beyond them.
    copied_before_restart: AtomicU64,
    /// The highest event seq known to be on the disk. Events after it may be committed (and
    /// visible to readers) while their flush still runs; the dispatcher reads no further.
    durable_seq: AtomicI64,
    /// Set when a flush of the write-ahead log failed: nothing is acknowledged any more.
    unflushed: AtomicBool,
    /// Held by a test to keep the flusher thread from flushing.
    #[cfg(test)]
    flush_gate: Mutex<()>,
    /// Set by a test: the flusher's next flush fails as a disk's I/O error would.
    #[cfg(test)]
    fail_next_flush: AtomicBool,
}

/// Where committed events are announced.
type Listener = Arc<Mutex<Option<writer::Announcer>>>;

/// The handle to the journal. Cheap to share behind an `Arc`.
pub struct SqliteJournal {
    path: PathBuf,
    ops: mpsc::Sender<writer::Op>,
    reader: Mutex<Connection>,
    /// The dispatcher's reads on the async threads ([`SqliteJournal::read_now`]); never wait. One
    /// per runtime worker, so that a worker seldom finds them all taken.
    quick_readers: Vec<Mutex<Connection>>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    listener: Listener,
    announced_max: usize,
    /// The database file, opened once more for the checkpoint thread's fsync (see
    /// [`checkpoint_and_restart`]). Closing a descriptor of a file drops every POSIX lock this
    /// process holds on it, SQLite's included, so it is closed only after the connections: it
    /// is declared after them and the thread drops its share after its own.
    _database: Arc<std::fs::File>,
    /// The state directory's lock, held as long as the journal is open in this process.
    _lock: lock::StateLock,
}

impl std::fmt::Debug for SqliteJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteJournal")
            .field("path", &self.path)
            .finish()
    }
}

/// The page cache of the reader connection (the admin API's listings, the dispatcher's reads
/// ahead), as SQLite's `cache_size`: negative is KiB.
const READER_CACHE_KIB: i64 = -1024;

/// The page cache of the quick read connections (an event, its deliveries, its subject's
/// revision) and of the checkpoint thread's connection.
const QUICK_CACHE_KIB: i64 = -256;

/// How many quick read connections the journal keeps by default: one per CPU, as the async
/// runtime has one worker thread per CPU.
pub fn quick_reader_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 16))
}

/// Opens a connection with the settings every journal connection needs.
fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, JournalError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// SQLite's quick check of every page of the database (`PRAGMA quick_check`: the b-trees'
/// structure, record formats, NOT NULL constraints; not whether indexes match their tables,
/// which `integrity_check` would add at a cost). It reads the whole file once: about 0.7 s for
/// 100,000 events (440 MB) whose pages are in the page cache, several seconds when they must
/// come from disk (see docs/operations.md). A damaged journal is refused at start rather than
/// found out later, when a read or write of a damaged page fails in the middle of serving.
fn check(conn: &Connection, path: &Path) -> Result<(), JournalError> {
    let started = std::time::Instant::now();
    // At most 10 findings: enough to show what is wrong, without reading them all.
    let findings: Vec<String> = conn
        .prepare("PRAGMA quick_check(10)")?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let took_ms = started.elapsed().as_millis() as u64;
    if findings.len() == 1 && findings[0] == "ok" {
        tracing::info!(path = %path.display(), took_ms, "journal quick check passed");
        return Ok(());
    }
    Err(JournalError::Damaged {
        path: path.to_owned(),
        detail: format!("quick_check: {}", findings.join("; ")),
    })
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `state_dir`, checks that its pages are sound
    /// and migrates its schema.
    pub fn open(
        state_dir: &Path,
        options: JournalOptions,
    ) -> Result<Arc<SqliteJournal>, JournalError> {
        let state_err = |source| JournalError::StateDir {
            path: state_dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(state_err)?;
        // Before anything reads the journal: nothing but this process may use it from here on.
        let lock = lock::StateLock::acquire(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        let rw = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let damaged = |e: JournalError| match e {
            JournalError::Corrupt(source) => JournalError::Damaged {
                path: path.clone(),
                detail: source.to_string(),
            },
            other => other,
        };
        let mut conn = connect(&path, rw).map_err(damaged)?;
        check(&conn, &path).map_err(damaged)?;
        // Checkpoints run on the background thread, never inside a request's commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A log restarted from its beginning keeps its size (rewriting it costs less than
        // growing it); past twice the restart size it is cut back.
        let size_limit = i64::try_from(options.wal_restart_bytes.saturating_mul(2)).unwrap_or(-1);
        conn.pragma_update(None, "journal_size_limit", size_limit)?;
        schema::migrate(&mut conn).map_err(damaged)?;
        // Make the new files' directory entries durable too.
        std::fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(state_err)?;

        let backlog: u64 = conn
            .query_row(
                "SELECT count(*) FROM events WHERE state = ?1",
                [EventState::Accepted],
                |row| row.get(0),
            )
            .map_err(|e| damaged(e.into()))?;
        // Known before the first delivery is taken, not only from the checkpoint thread's
        // first round, so that an agent started on a nearly full disk refuses from the start.
        let free = free_bytes(state_dir);
        let low_disk = free.is_some_and(|free| free < options.min_free_disk_bytes);
        if low_disk {
            tracing::warn!(
                free_bytes = free,
                min_free_disk_bytes = options.min_free_disk_bytes,
                "free disk space in the state directory is below the minimum: new events are refused with 503 until space is freed"
            );
        }
        let last_seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |row| {
                row.get(0)
            })
            .map_err(|e| damaged(e.into()))?;
        let shared = Arc::new(Shared {
            backlog: AtomicU64::new(backlog),
            low_disk: AtomicBool::new(low_disk),
            durable_seq: AtomicI64::new(last_seq),
            ..Shared::default()
        });
        // Only the writer's page cache outlives a transaction of the others: a connection
        // that starts reading after another one's commit finds its cache emptied. So the
        // readers keep small caches (the interior pages of the b-trees a read walks), which
        // keeps the process's memory from growing by SQLite's default 2 MiB per connection.
        let reader = connect(&path, rw)?;
        reader.pragma_update(None, "cache_size", READER_CACHE_KIB)?;
        let announced_max = options.announced_max;
        let quick_readers = (0..options.quick_readers.max(1))
            .map(|_| {
                let conn = connect(&path, rw)?;
                conn.busy_timeout(Duration::ZERO)?;
                conn.pragma_update(None, "cache_size", QUICK_CACHE_KIB)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>, JournalError>>()?;
        let checkpointer = connect(&path, rw)?;
        checkpointer.pragma_update(None, "cache_size", QUICK_CACHE_KIB)?;
        let database = Arc::new(std::fs::File::open(&path).map_err(state_err)?);

        let (ops, rx) = mpsc::channel();
        let listener = Listener::default();
        // The writer's commits leave the log's flush to the flusher thread (`writer::run_flusher`),
        // which flushes the log through a descriptor of its own. SQLite holds no lock on the
        // log file, so that descriptor may close in any order. Without it (the log cannot be
        // opened), each commit flushes the log itself.
        let wal_path = path.with_file_name(format!("{FILE_NAME}-wal"));
        let (flusher, flush_rx) = match std::fs::File::open(&wal_path) {
            Ok(wal) => {
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                let (tx, rx) = mpsc::sync_channel(FLUSH_QUEUE);
                (Some(tx), Some((wal, rx)))
            }
            Err(e) => {
                tracing::debug!(path = %wal_path.display(), error = %e, "the write-ahead log cannot be opened for flushing; each commit flushes it");
                (None, None)
            }
        };
        let writer = writer::Writer::new(
            conn,
            rx,
            &options,
            shared.clone(),
            listener.clone(),
            flusher,
        );
        let mut threads = Vec::new();
        if let Some((wal, rx)) = flush_rx {
            let shared = shared.clone();
            let listener = listener.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("journal-flush".into())
                    .spawn(move || writer::run_flusher(wal, rx, shared, listener))
                    .map_err(state_err)?,
            );
        }
        threads.push(
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || writer.run())
                .map_err(state_err)?,
        );
        {
            let shared = shared.clone();
            let dir = state_dir.to_owned();
            let ops = ops.clone();
            let database = database.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("journal-checkpoint".into())
                    .spawn(move || {
                        background(checkpointer, &database, ops, dir, options, shared);
                        // Closed after the thread's connection (see `SqliteJournal::_database`).
                        drop(database);
                    })
                    .map_err(state_err)?,
            );
        }
        Ok(Arc::new(SqliteJournal {
            path,
            ops,
            reader: Mutex::new(reader),
            quick_readers,
            shared,
            threads: Mutex::new(threads),
            listener,
            announced_max,
            _database: database,
            _lock: lock,
        }))
    }

    /// The journal's database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an event. Returns once the transaction holding it is on the disk (committed, and
    /// the log flushed), or reports the stored record when the id was seen before (once the
    /// flush that follows this call's transaction has returned too).
    pub async fn append(&self, event: NewEvent) -> Result<Appended, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(writer::Op::Append(Box::new(event), reply))
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Announces every event committed from now on (to the dispatcher), at most
    /// [`JournalOptions::announced_max`] waiting unread; replaces an earlier listener.
    pub fn listen(&self) -> Announcements {
        let (announcer, announcements) = writer::announcements(self.announced_max);
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(announcer);
        announcements
    }

    /// Runs `job` in the writer's next transaction (in a savepoint of its own) and returns its
    /// result once that transaction is on the disk (committed, and the log flushed).
    pub async fn write<R, F>(&self, job: F) -> Result<R, JournalError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        let (value_tx, value_rx) = oneshot::channel();
        let (reply, done) = oneshot::channel();
        let job: writer::Job = Box::new(move |conn| {
            let value = job(conn)?;
            let _ = value_tx.send(value);
            Ok(())
        });
        self.ops
            .send(writer::Op::Job(job, reply))
            .map_err(|_| JournalError::Closed)?;
        done.await.map_err(|_| JournalError::Closed)??;
        value_rx.await.map_err(|_| JournalError::Closed)
    }

    /// Returns once the writer has committed a transaction begun after this call: whether the
    /// writer thread is alive and its commits return (the watchdog's test).
    pub async fn writer_round_trip(&self) -> Result<(), JournalError> {
        self.write(|_| Ok(())).await
    }

    /// Runs a read on the reader connection. Blocking: call from a blocking context.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, rusqlite::Error>,
    ) -> Result<R, JournalError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// Runs a short read at once, on one of the quick connections, when one is free and the
    /// database does not make it wait; `None` otherwise, and the caller reads with
    /// [`SqliteJournal::read`] off the async threads. For the dispatcher, whose reads touch the pages
    /// just written (in memory) and take microseconds: less than handing them to another thread.
    /// There is a quick connection per runtime worker, and a read holds one only while it runs
    /// (it cannot wait inside), so `None` is rare: the blocking pool is not flooded with reads
    /// that would queue there for the one blocking connection.
    pub fn read_now<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, rusqlite::Error>,
    ) -> Option<Result<R, JournalError>> {
        let conn = self.quick_readers.iter().find_map(|c| c.try_lock().ok())?;
        match f(&conn) {
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => None,
            other => Some(other.map_err(JournalError::from)),
        }
    }

    /// Reads the stored record of one event. Blocking: call from a blocking context.
    pub fn get(&self, id: &str) -> Result<Option<EventRecord>, JournalError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(read_record(&conn, id)?)
    }

    /// Events not yet in a final state.
    pub fn backlog(&self) -> u64 {
        self.shared.backlog.load(Ordering::Relaxed)
    }

    /// True while free space in the state directory is below the configured minimum.
    pub fn low_disk(&self) -> bool {
        self.shared.low_disk.load(Ordering::Relaxed)
    }

    /// Number of transactions committed since open.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Finishes every write queued so far, checkpoints, and stops the journal's threads.
    /// Later appends fail with [`JournalError::Closed`].
    pub fn close(&self) {
        let (reply, done) = std::sync::mpsc::channel();
        if self.ops.send(writer::Op::Close(reply)).is_ok() {
            let _ = done.recv();
        }
        self.shared.closing.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

pub(crate) fn read_record(
    conn: &Connection,
    id: &str,
) -> Result<Option<EventRecord>, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT id, type, version, subject, revision, source, time, format, received_at, state, \
         updated_at, error, finished_at FROM events WHERE id = ?1",
    )?
    .query_row([id], |row| {
        Ok(EventRecord {
            id: row.get(0)?,
            event_type: row.get(1)?,
            version: apply::stored_u64(row, 2)?,
            subject: row.get(3)?,
            revision: row.get::<_, Option<i64>>(4)?.map(|v| v as u64),
            source: row.get(5)?,
            time: row.get(6)?,
            format: row.get(7)?,
            received_at: row.get(8)?,
            state: row.get(9)?,
            updated_at: row.get(10)?,
            error: row.get(11)?,
            finished_at: row.get(12)?,
        })
    })
    .optional()
}

/// How often the background thread looks at an idle journal (the free-disk check), when its
/// checkpoint interval is shorter.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Most events one pruning transaction deletes, so that it never holds the writer for long.
const PRUNE_BATCH: u32 = 256;

/// The background thread: periodic passive checkpoints, the free-disk check and pruning.
fn background(
    conn: Connection,
    database: &std::fs::File,
    ops: mpsc::Sender<writer::Op>,
    dir: PathBuf,
    options: JournalOptions,
    shared: Arc<Shared>,
) {
    let page_size: u64 = conn
        .pragma_query_value(None, "page_size", |row| row.get(0))
        .unwrap_or(4096);
    // The commits counted when the last checkpoint found the log copied to its end: while no
    // commit follows, there is nothing to copy, and an idle agent does not run one per tick.
    let mut copied_at: Option<u64> = None;
    // Prune a tenth of the retention period apart, at most a minute.
    let prune_every = options
        .retention
        .map(|keep| (keep / 10).clamp(options.checkpoint_interval, Duration::from_secs(60)));
    let mut next_prune = std::time::Instant::now();
    let mut round: Option<PruneRound> = None;
    loop {
        if round.is_none()
            && let (Some(keep), Some(every)) = (options.retention, prune_every)
            && next_prune <= std::time::Instant::now()
        {
            round = PruneRound::new(keep);
            next_prune = std::time::Instant::now() + every;
        }
        // A long round (a large backlog of old events) goes on at the next tick, after the
        // checkpoint: the log must not grow while it runs.
        let pruning = round
            .as_mut()
            .is_some_and(|r| r.go_on(&ops, &shared, options.checkpoint_interval));
        if !pruning {
            round = None;
        }
        let free = free_bytes(&dir);
        let low = free.is_some_and(|free| free < options.min_free_disk_bytes);
        if low != shared.low_disk.swap(low, Ordering::Relaxed) {
            if low {
                tracing::warn!(
                    free_bytes = free,
                    min_free_disk_bytes = options.min_free_disk_bytes,
                    "free disk space in the state directory is below the minimum: new events are refused with 503 until space is freed"
                );
            } else {
                tracing::info!(
                    free_bytes = free,
                    "free disk space is back above the minimum"
                );
            }
        }
        let commits = shared.commits.load(Ordering::Relaxed);
        let idle = copied_at == Some(commits);
        if !idle {
            copied_at = match checkpoint_and_restart(
                &conn,
                database,
                page_size,
                options.wal_restart_bytes,
                &shared,
            ) {
                Ok(true) => Some(commits),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "journal checkpoint failed; it is retried");
                    None
                }
            };
        }
        if !pruning {
            std::thread::park_timeout(if idle {
                options.checkpoint_interval.max(IDLE_TICK)
            } else {
                options.checkpoint_interval
            });
        }
        if shared.closing.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// One round of deleting the final events past the retention period, in small transactions.
struct PruneRound {
    /// Events received and last changed before this (RFC 3339) are deleted.
    cutoff: String,
    pruned: u64,
}

impl PruneRound {
    /// A round for events older than `keep`; `None` when that reaches before the calendar.
    fn new(keep: Duration) -> Option<PruneRound> {
        let cutoff = time::Duration::try_from(keep)
            .ok()
            .and_then(|keep| time::OffsetDateTime::now_utc().checked_sub(keep))
            .map(crate::timestamp::format)?;
        Some(PruneRound { cutoff, pruned: 0 })
    }

    /// Deletes batch after batch for up to `budget`; false once the round is over (nothing
    /// left, an error, or the journal closing), and then logs what it deleted.
    fn go_on(&mut self, ops: &mpsc::Sender<writer::Op>, shared: &Shared, budget: Duration) -> bool {
        let until = std::time::Instant::now() + budget;
        let more = loop {
            if shared.closing.load(Ordering::Relaxed) {
                break false;
            }
            let (value_tx, value_rx) = oneshot::channel();
            let (reply, done) = oneshot::channel();
            let cutoff = self.cutoff.clone();
            let job: writer::Job = Box::new(move |conn| {
                let _ = value_tx.send(apply::prune(conn, &cutoff, PRUNE_BATCH)?);
                Ok(())
            });
            if ops.send(writer::Op::Job(job, reply)).is_err() {
                break false;
            }
            match done.blocking_recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "pruning old events from the journal failed; it is retried");
                    break false;
                }
                Err(_) => break false, // the writer has stopped
            }
            let pruned = value_rx.blocking_recv().unwrap_or(0);
            metrics::counter!("ess_agent_journal_pruned_total").increment(u64::from(pruned));
            self.pruned += u64::from(pruned);
            if pruned < PRUNE_BATCH {
                break false;
            }
            if std::time::Instant::now() >= until {
                break true;
            }
        };
        if !more && self.pruned > 0 {
            tracing::info!(events = self.pruned, before = %self.cutoff, "pruned final events past the journal's retention");
        }
        more
    }
}

/// Committed batches that may wait for the flusher thread before the writer waits too.
const FLUSH_QUEUE: usize = 4;

/// Frames the writer may be left to copy when it restarts the log (1 MiB of 4 KiB pages): its
/// commits wait meanwhile.
const WRITER_COPY_FRAMES: u64 = 256;

/// Checkpoint passes the background thread makes to catch up with a log past its restart size
/// before it hands the rest to the writer anyway (when events arrive faster than it copies).
const CATCH_UP_PASSES: u32 = 20;

/// A background checkpoint, and the log's restart once it is longer than `restart_bytes`.
///
/// PASSIVE never blocks the writer, and with writes going on it never finishes: the log's end
/// moves on while it copies. So once the log is long, this copies pass after pass, each one
/// shorter, until a pass finds little new, and then asks the writer (which nothing can
/// overtake) to copy the last few frames after its next commit; the transaction after that
/// starts the log over. The writer's share, and so the stall of the commits behind it, stays
/// small.
///
/// SQLite flushes the database file only at the end of a checkpoint that reaches the log's end:
/// the writer's. Every page the passes copied since the last restart would wait in the page
/// cache for that flush, and the commits behind the writer with it (a quarter of a second
/// measured). So each catch-up pass is followed by this thread's own flush of the database
/// file, `database` (the same file, another descriptor), and the writer's flush finds only
/// the pages of its own few frames.
///
/// True when the log was copied to its end.
fn checkpoint_and_restart(
    conn: &Connection,
    database: &std::fs::File,
    page_size: u64,
    restart_bytes: u64,
    shared: &Shared,
) -> Result<bool, rusqlite::Error> {
    let (frames, mut copied) = checkpoint(conn)?;
    if frames.saturating_mul(page_size) <= restart_bytes {
        return Ok(copied >= frames);
    }
    for _ in 0..CATCH_UP_PASSES {
        if shared.closing.load(Ordering::Relaxed) {
            return Ok(false);
        }
        flush(database);
        let (_, now_copied) = checkpoint(conn)?;
        let fresh = now_copied.saturating_sub(copied);
        copied = now_copied;
        if fresh <= WRITER_COPY_FRAMES {
            break;
        }
    }
    flush(database);
    shared
        .copied_before_restart
        .store(copied, Ordering::Relaxed);
    shared.restart_wal.store(true, Ordering::Release);
    Ok(false)
}

/// Writes the database file's pages out to the disk ahead of the writer's flush. A failure
/// only leaves them to that flush, which reports its own.
fn flush(database: &std::fs::File) {
    let started = std::time::Instant::now();
    match database.sync_data() {
        Ok(()) => metrics::histogram!("ess_agent_journal_checkpoint_flush_seconds")
            .record(started.elapsed().as_secs_f64()),
        Err(e) => tracing::debug!(error = %e, "flushing the journal's database file failed"),
    }
}

/// Runs a PASSIVE checkpoint: copies what it can of the write-ahead log into the database
/// without waiting for anyone. Returns the frames in the log and how many of them the database
/// now holds; the two are equal when the next write transaction may start the log over.
pub(super) fn checkpoint(conn: &Connection) -> Result<(u64, u64), rusqlite::Error> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        let frames: i64 = row.get(1)?;
        let copied: i64 = row.get(2)?;
        Ok((frames.max(0) as u64, copied.max(0) as u64))
    })
}

/// Free bytes available to unprivileged users on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> NewEvent {
        NewEvent {
            id: id.into(),
            event_type: "change".into(),
            version: 1,
            subject: id.into(),
            revision: None,
            source: None,
            time: None,
            format: WireFormat::ChangeEvent,
            content_type: Some("application/json".into()),
            raw_body: Bytes::from_static(b"{}"),
            envelope: "{}".into(),
            receipt: None,
        }
    }

    /// A journal in `dir` whose background thread prunes nothing.
    fn open_unpruned(dir: &Path) -> Arc<SqliteJournal> {
        let options = JournalOptions {
            retention: None,
            ..JournalOptions::default()
        };
        SqliteJournal::open(dir, options).unwrap()
    }

    /// Appends `count` events with 2 KiB bodies from 32 concurrent writers, so the writer never
    /// waits, and returns the largest size the write-ahead log file reached meanwhile.
    async fn largest_log_under_continuous_writes(restart_bytes: u64, count: usize) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            checkpoint_interval: Duration::from_millis(5),
            wal_restart_bytes: restart_bytes,
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        let wal = dir.path().join(format!("{FILE_NAME}-wal"));
        let body = Bytes::from(vec![b'x'; 2048]);
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..32 {
            let journal = journal.clone();
            let body = body.clone();
            tasks.spawn(async move {
                for n in (writer..count).step_by(32) {
                    let mut e = event(&format!("evt-{n:06}"));
                    e.raw_body = body.clone();
                    journal.append(e).await.unwrap();
                }
            });
        }
        let mut largest = 0;
        while !tasks.is_empty() {
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            if let Ok(Some(done)) =
                tokio::time::timeout(Duration::from_millis(2), tasks.join_next()).await
            {
                done.unwrap();
            }
        }
        journal.close();
        largest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_starts_over_under_continuous_writes() {
        // 24,000 events of 2 KiB write about 140 MiB of log frames. The writer does not wait
        // for the disk's flush, so between two restarts it can write a lot while the
        // background thread's copy and flush wait for the disk (40 MiB seen once on a busy
        // machine); the bound leaves room for that.
        let largest = largest_log_under_continuous_writes(512 << 10, 24_000).await;
        assert!(
            largest < 56 << 20,
            "the write-ahead log grew to {largest} bytes with a 512 KiB restart size"
        );
    }

    /// The writer commits without flushing the log; an append is answered only once the
    /// flusher thread's flush that followed its commit has returned, and the dispatcher's read
    /// of the backlog stops before it until then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // the lock holds up the flusher thread, on purpose
    async fn an_append_is_answered_only_after_the_log_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        journal.append(event("before")).await.unwrap();
        let gate = journal.shared.flush_gate.lock().unwrap();
        let appending = tokio::spawn({
            let journal = journal.clone();
            async move { journal.append(event("held")).await }
        });
        // Committed: a reader sees the row while its flush is held.
        let committed = loop {
            if let Some(record) = journal.get("held").unwrap() {
                break record;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_eq!(committed.id, "held");
        assert!(
            !appending.is_finished(),
            "answered before the log was flushed"
        );
        let pending: Vec<String> = journal
            .pending_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, subject)| subject)
            .collect();
        assert_eq!(
            pending,
            ["before"],
            "the backlog read reached an unflushed event"
        );
        drop(gate);
        assert!(matches!(
            appending.await.unwrap().unwrap(),
            Appended::Accepted
        ));
        assert_eq!(journal.pending_after(0, 10).unwrap().len(), 2);
        journal.close();
    }

    /// A flush of the log that fails (an I/O error of the disk) answers its batch with an
    /// error that says to restart, and so does every change after it, even once flushes would
    /// succeed again: the kernel may have dropped what it could not write.
    #[tokio::test]
    async fn a_failed_flush_fails_its_batch_and_every_change_after_it() {
        let dir = tempfile::tempdir().unwrap();
        // No pruning: its batches would take the failing flush in the appends' place.
        let journal = open_unpruned(dir.path());
        journal.append(event("before")).await.unwrap();
        journal
            .shared
            .fail_next_flush
            .store(true, Ordering::Release);
        let failed = journal.append(event("lost")).await.unwrap_err();
        assert!(
            failed
                .to_string()
                .contains("could not be flushed to disk: restart the agent"),
            "{failed}"
        );
        let later = journal.append(event("later")).await.unwrap_err();
        assert!(later.to_string().contains("restart the agent"), "{later}");
        assert!(
            journal.writer_round_trip().await.is_err(),
            "the watchdog's test still passes"
        );
        assert_eq!(
            journal.backlog(),
            1,
            "a refused event counted in the backlog"
        );
        journal.close();
        drop(journal);
        // A restart recovers from what is on the disk. Here the failed flush's commit did reach
        // it, so the hub's redelivery of that event is a duplicate; the event refused after it
        // was never written, and its redelivery is accepted.
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        assert!(matches!(
            journal.append(event("lost")).await.unwrap(),
            Appended::Duplicate(_)
        ));
        assert!(matches!(
            journal.append(event("later")).await.unwrap(),
            Appended::Accepted
        ));
        journal.close();
    }

    /// The journal keeps a descriptor of its database file of its own (the checkpoint thread's
    /// flush); a closed and dropped journal holds none, so that its disk space is given back and
    /// a later open in the same process starts clean.
    #[tokio::test]
    async fn a_closed_journal_holds_no_descriptor_of_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let open_in_dir = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
                .filter(|target| target.starts_with(dir.path()))
                .count()
        };
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        journal.append(event("a")).await.unwrap();
        assert!(open_in_dir() > 0, "the open journal's files are open");
        journal.close();
        drop(journal);
        assert_eq!(open_in_dir(), 0, "a descriptor outlived the journal");
    }

    #[test]
    fn a_nearly_full_disk_is_known_as_soon_as_the_journal_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            min_free_disk_bytes: u64::MAX,
            // The checkpoint thread's first round must not be what finds it out.
            checkpoint_interval: Duration::from_secs(3600),
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        assert!(journal.low_disk());
        journal.close();
        drop(journal);
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        assert!(!journal.low_disk());
        journal.close();
    }

    #[tokio::test]
    async fn announcements_beyond_the_room_are_dropped_and_reported_missed() {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            announced_max: 2,
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        let mut announced = journal.listen();
        for id in ["a", "b", "c", "d"] {
            journal.append(event(id)).await.unwrap();
        }
        // The writer answers a batch before it announces it: once it has gone round once more,
        // every announcement of the four is made (or dropped).
        journal.writer_round_trip().await.unwrap();
        // Two fitted; the listener hears that it missed some before it takes either.
        assert!(matches!(announced.recv().await, Some(Announcement::Missed)));
        match announced.recv().await {
            Some(Announcement::Event(e)) => assert_eq!(e.id, "b"),
            other => panic!("expected the second event, got {other:?}"),
        }
        // With room again, the next commit is announced as usual.
        journal.append(event("e")).await.unwrap();
        match announced.recv().await {
            Some(Announcement::Event(e)) => assert_eq!(e.id, "e"),
            other => panic!("expected the fifth event, got {other:?}"),
        }
        // Nothing was lost from the journal: every event waits there.
        assert_eq!(journal.pending_after(0, 10).unwrap().len(), 5);
        journal.close();
    }

    #[tokio::test]
    async fn append_then_duplicate_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        assert_eq!(
            journal.append(event("a")).await.unwrap(),
            Appended::Accepted
        );
        match journal.append(event("a")).await.unwrap() {
            Appended::Duplicate(record) => assert_eq!(record.state, EventState::Accepted),
            other => panic!("expected duplicate, got {other:?}"),
        }
        assert_eq!(journal.backlog(), 1);
        journal.close();
        assert!(matches!(
            journal.append(event("b")).await,
            Err(JournalError::Closed)
        ));
        drop(journal);
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        assert_eq!(journal.backlog(), 1);
        assert!(journal.get("a").unwrap().is_some());
        assert!(journal.get("b").unwrap().is_none());
        journal.close();
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                journal.append(event(&format!("e{i}"))).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Appended::Accepted);
        }
        assert_eq!(journal.backlog(), 200);
        assert!(journal.commits() <= 200);
        journal.close();
    }

    fn finish(seq: i64, id: &str, final_state: EventState) -> Finish {
        Finish {
            seq,
            state: final_state,
            error: None,
            subject_revision: None,
            report: None,
            event_id: id.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pruning_deletes_old_final_events_and_keeps_dead_letters_and_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let journal = open_unpruned(dir.path());
        let states = [
            ("applied", Some(EventState::Applied)),
            ("filtered", Some(EventState::Filtered)),
            ("superseded", Some(EventState::Superseded)),
            ("failed", Some(EventState::Failed)),
            ("parked", Some(EventState::Parked)),
            ("pending", None),
        ];
        for (seq, (id, final_state)) in (1..).zip(states) {
            assert_eq!(journal.append(event(id)).await.unwrap(), Appended::Accepted);
            // Every event was tried once, so that each has an attempt to prune.
            journal
                .set_deliveries(vec![DeliveryUpdate {
                    seq,
                    route: "r".into(),
                    sink: "s".into(),
                    state: DeliveryState::Pending,
                    attempts: 1,
                    next_attempt_ms: None,
                    last_error: Some("refused".into()),
                    attempt: Some(Attempt {
                        started_at: crate::timestamp::now(),
                        duration_ms: 3,
                        outcome: DeliveryState::Failed,
                        error: Some("refused".into()),
                        output: None,
                    }),
                }])
                .await
                .unwrap();
            if let Some(final_state) = final_state {
                journal.finish(finish(seq, id, final_state)).await.unwrap();
            }
        }
        // Reports the hub took go with their event.
        journal
            .write(|conn| {
                for (seq, id) in [(1, "applied"), (2, "failed")] {
                    conn.execute(
                        "INSERT INTO reports_sent VALUES (?1, ?2, 'm', '{}', 1, 't', 't')",
                        rusqlite::params![seq, id],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let cutoff = |offset: time::Duration| {
            crate::timestamp::format(time::OffsetDateTime::now_utc() + offset)
        };
        let prune_at =
            |cutoff: String, limit| journal.write(move |conn| apply::prune(conn, &cutoff, limit));
        // Nothing is older than an hour ago.
        assert_eq!(
            prune_at(cutoff(-time::Duration::HOUR), 100).await.unwrap(),
            0
        );
        // With the cutoff in the future every final event is old enough: two per transaction.
        assert_eq!(prune_at(cutoff(time::Duration::HOUR), 2).await.unwrap(), 2);
        assert_eq!(prune_at(cutoff(time::Duration::HOUR), 2).await.unwrap(), 1);
        assert_eq!(prune_at(cutoff(time::Duration::HOUR), 2).await.unwrap(), 0);
        for (id, kept) in [
            ("applied", false),
            ("filtered", false),
            ("superseded", false),
            ("failed", true),
            ("parked", true),
            ("pending", true),
        ] {
            assert_eq!(journal.get(id).unwrap().is_some(), kept, "{id}");
        }
        let bodies: i64 = journal
            .read(|c| c.query_row("SELECT count(*) FROM event_bodies", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(bodies, 3);
        let reports: Vec<String> = journal
            .read(|c| {
                c.prepare("SELECT event_id FROM reports_sent")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .unwrap();
        assert_eq!(reports, ["failed"]);
        let attempts: i64 = journal
            .read(|c| c.query_row("SELECT count(*) FROM attempts", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(attempts, 3, "the pruned events' attempts go with them");
        assert_eq!(journal.backlog(), 1);
        // A forgotten id is new again.
        assert_eq!(
            journal.append(event("applied")).await.unwrap(),
            Appended::Accepted
        );
        journal.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_pruning_round_gives_way_between_batches_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            retention: None,
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        let count = PRUNE_BATCH as usize * 2 + 88;
        for n in 0..count {
            let id = format!("e{n}");
            journal.append(event(&id)).await.unwrap();
            journal
                .finish(finish(n as i64 + 1, &id, EventState::Applied))
                .await
                .unwrap();
        }
        let future =
            crate::timestamp::format(time::OffsetDateTime::now_utc() + time::Duration::HOUR);
        let mut round = PruneRound {
            cutoff: future,
            pruned: 0,
        };
        let journal2 = journal.clone();
        let steps = tokio::task::spawn_blocking(move || {
            // No time budget: one batch per call, then the caller checkpoints and calls again.
            let mut steps = Vec::new();
            while round.go_on(&journal2.ops, &journal2.shared, Duration::ZERO) {
                steps.push(round.pruned);
            }
            steps.push(round.pruned);
            steps
        })
        .await
        .unwrap();
        let batch = u64::from(PRUNE_BATCH);
        assert_eq!(steps, [batch, 2 * batch, count as u64]);
        assert!(journal.get("e0").unwrap().is_none());
        assert!(journal.get(&format!("e{}", count - 1)).unwrap().is_none());
        journal.close();
    }

    #[tokio::test]
    async fn a_failing_job_rolls_back_alone_and_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        let insert = |subject: &'static str, fail: bool| {
            journal.write(move |conn| {
                conn.execute(
                    "INSERT INTO subjects (subject, last_revision) VALUES (?1, 1)",
                    [subject],
                )?;
                if fail {
                    conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                }
                Ok(())
            })
        };
        // Queued together, so that they usually share one transaction.
        let (a, b, c, d) = tokio::join!(
            insert("a", false),
            insert("b", true),
            insert("c", false),
            insert("b", false)
        );
        assert!(a.is_ok() && b.is_err() && c.is_ok() && d.is_ok());
        let mut subjects: Vec<String> = journal
            .read(|c| {
                c.prepare("SELECT subject FROM subjects ORDER BY subject")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .unwrap();
        subjects.sort();
        assert_eq!(subjects, ["a", "b", "c"]);
        journal.close();
    }

    fn state_of(journal: &SqliteJournal, id: &str) -> EventState {
        journal.get(id).unwrap().unwrap().state
    }

    #[tokio::test]
    async fn a_final_state_that_cannot_be_written_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        // A long linger, so that the three final states share one batch.
        let options = JournalOptions {
            finish_linger: Duration::from_secs(60),
            finish_gap: Duration::from_secs(60),
            max_batch: 3,
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        for id in ["a", "b", "c"] {
            assert_eq!(journal.append(event(id)).await.unwrap(), Appended::Accepted);
        }
        // A delivery of an event that does not exist breaks the foreign key.
        let broken = DeliveryUpdate {
            seq: 999,
            route: "r".into(),
            sink: "s".into(),
            state: DeliveryState::Applied,
            attempts: 1,
            next_attempt_ms: None,
            last_error: None,
            attempt: None,
        };
        let (a, b, c) = tokio::join!(
            journal.finish(finish(1, "a", EventState::Applied)),
            journal.finish_with(vec![broken], finish(2, "b", EventState::Applied)),
            journal.finish(finish(3, "c", EventState::Failed)),
        );
        assert!(a.is_ok() && b.is_err() && c.is_ok(), "{a:?} {b:?} {c:?}");
        assert_eq!(state_of(&journal, "a"), EventState::Applied);
        assert_eq!(state_of(&journal, "b"), EventState::Accepted);
        assert_eq!(state_of(&journal, "c"), EventState::Failed);
        assert_eq!(journal.backlog(), 1);
        journal.close();
    }

    #[tokio::test]
    async fn a_final_state_with_no_company_coming_is_not_kept_waiting() {
        let dir = tempfile::tempdir().unwrap();
        // The linger is a minute, but the gap is the default's.
        let options = JournalOptions {
            finish_linger: Duration::from_secs(60),
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        assert_eq!(
            journal.append(event("a")).await.unwrap(),
            Appended::Accepted
        );
        let finishing = journal.finish(finish(1, "a", EventState::Applied));
        tokio::time::timeout(Duration::from_secs(10), finishing)
            .await
            .expect("a lone final state is committed within a gap, not a linger")
            .unwrap();
        assert_eq!(state_of(&journal, "a"), EventState::Applied);
        journal.close();
    }

    #[tokio::test]
    async fn final_states_wait_for_company_and_a_new_event_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        // No retention: its pruning, a job, would end the wait.
        let options = JournalOptions {
            finish_linger: Duration::from_secs(60),
            finish_gap: Duration::from_secs(60),
            retention: None,
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        assert_eq!(
            journal.append(event("a")).await.unwrap(),
            Appended::Accepted
        );
        let commits = journal.commits();
        let mut finishing = tokio::spawn({
            let journal = journal.clone();
            async move { journal.finish(finish(1, "a", EventState::Applied)).await }
        });
        // Alone, the final state waits for more (the linger is a minute).
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut finishing)
                .await
                .is_err()
        );
        assert_eq!(state_of(&journal, "a"), EventState::Accepted);
        // A new event is not kept waiting, and takes the final state with it.
        let appended = tokio::time::timeout(Duration::from_secs(10), journal.append(event("b")));
        assert_eq!(appended.await.unwrap().unwrap(), Appended::Accepted);
        finishing.await.unwrap().unwrap();
        assert_eq!(state_of(&journal, "a"), EventState::Applied);
        assert_eq!(journal.commits(), commits + 1);
        journal.close();
    }

    #[tokio::test]
    async fn a_read_now_runs_at_once_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            quick_readers: 2,
            ..JournalOptions::default()
        };
        let journal = SqliteJournal::open(dir.path(), options).unwrap();
        journal.append(event("a")).await.unwrap();
        let outer = journal
            .read_now(|conn| {
                let ids: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
                // A second read at the same time gets the other quick connection...
                let second = journal.read_now(|conn| {
                    conn.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))?;
                    // ...and a third, with both taken, is refused rather than waited for.
                    Ok(journal.read_now(|_| Ok(())).is_none())
                });
                Ok((ids, second.map(|r| r.unwrap())))
            })
            .expect("the connection was free")
            .unwrap();
        assert_eq!(outer, (1, Some(true)));
        journal.close();
    }

    #[test]
    fn a_version_2_journal_keeps_its_bodies_when_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
            conn.execute_batch(schema::MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO events (id, type, version, subject, format, received_at, raw_body, \
                 envelope, state, updated_at) VALUES ('old', 't', 1, 's', 'change_event', \
                 '2026-01-01T00:00:00Z', x'7b2261223a317d', '{\"id\":\"old\"}', 'accepted', \
                 '2026-01-01T00:00:00Z')",
                [],
            )
            .unwrap();
        }
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        assert_eq!(journal.backlog(), 1);
        let event = journal.load_event(1).unwrap().unwrap();
        assert_eq!(event.envelope, r#"{"id":"old"}"#);
        let raw: Vec<u8> = journal
            .read(|c| {
                c.query_row("SELECT raw_body FROM event_bodies WHERE seq = 1", [], |r| {
                    r.get(0)
                })
            })
            .unwrap();
        assert_eq!(raw, br#"{"a":1}"#);
        journal.close();
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_damaged_page_or_header_is_refused_naming_the_file_and_changing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        journal.close();
        drop(journal);
        let path = dir.path().join(FILE_NAME);
        {
            let conn = Connection::open(&path).unwrap();
            for n in 1..=200 {
                conn.execute(
                    "INSERT INTO events (id, type, version, subject, format, received_at, state, \
                     updated_at) VALUES (?1, 't', 1, 's', 'change_event', 'now', 'accepted', 'now')",
                    [format!("evt-{n}")],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO event_bodies (seq, raw_body, envelope) VALUES (?1, ?2, '{}')",
                    rusqlite::params![n, vec![b'x'; 600 + n * 10]],
                )
                .unwrap();
            }
            // Every page into the database file, so that a copy of it alone is the journal.
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .unwrap();
        }
        let good = std::fs::read(&path).unwrap();
        let page = 4096;
        assert!(good.len() > 40 * page, "{}", good.len());
        // Every page overwritten with garbage, one at a time, and the header alone.
        let garbage = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(37) ^ 0xa5)
                .collect()
        };
        let mut cases: Vec<(usize, usize)> =
            (1..good.len() / page).map(|p| (p * page, page)).collect();
        cases.push((0, 100));
        for (offset, len) in cases {
            let copy = tempfile::tempdir().unwrap();
            let mut bytes = good.clone();
            bytes[offset..offset + len].copy_from_slice(&garbage(len));
            let damaged = copy.path().join(FILE_NAME);
            std::fs::write(&damaged, &bytes).unwrap();
            let e = SqliteJournal::open(copy.path(), JournalOptions::default())
                .err()
                .unwrap_or_else(|| panic!("damage at {offset} was not found"));
            let message = e.to_string();
            assert!(
                matches!(e, JournalError::Damaged { .. }),
                "{offset}: {message}"
            );
            assert!(
                message.contains(&damaged.display().to_string()),
                "{message}"
            );
            assert!(
                std::fs::read(&damaged).unwrap() == bytes,
                "{offset}: the refused open changed the file"
            );
        }
        // The undamaged journal opens, with its backlog.
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        assert_eq!(journal.backlog(), 200);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap_err();
        assert!(matches!(err, JournalError::SchemaTooNew { found: 99, .. }));
    }
}
