//! What the dispatcher, the status reporter and the admin API read and change in the journal:
//! per-route delivery state, final states, per-subject revisions, dead letters and the outbox.
//!
//! Every change goes through the writer thread ([`SqliteJournal::write`]); reads use the reader
//! connection and are blocking.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{DeliveryState, EventRecord, EventState, JournalError, SqliteJournal, read_record};

/// An event as the dispatcher needs it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub version: u64,
    pub subject: String,
    pub revision: Option<u64>,
    pub source: Option<String>,
    /// Unix milliseconds.
    pub received_at_ms: i64,
    pub state: EventState,
    /// The normalised envelope (JSON text).
    pub envelope: String,
}

/// The delivery of one event through one route.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub route: String,
    pub sink: String,
    pub state: DeliveryState,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: String,
}

/// A change of one delivery.
#[derive(Debug, Clone)]
pub struct DeliveryUpdate {
    pub seq: i64,
    pub route: String,
    pub sink: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_ms: Option<i64>,
    pub last_error: Option<String>,
    /// The attempt that led to this state, for the route's history; `None` for a change no
    /// attempt made.
    pub attempt: Option<Attempt>,
}

/// The most attempts kept per event and route: the first, and the latest
/// `KEPT_ATTEMPTS - 1`. A route retried for days (every 5 minutes, 288 attempts a day) keeps
/// how it began and how it goes now, in a bounded number of rows; the delivery's attempt count
/// still counts them all.
pub const KEPT_ATTEMPTS: u32 = 100;

/// The most bytes of an applied output the journal keeps; a longer one is cut at a character
/// boundary and marked truncated.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// One attempt at one route: the adapter's run and, when it gave an output, the sink's apply.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it started (RFC 3339, milliseconds).
    pub started_at: String,
    pub duration_ms: u64,
    /// `applied`, `filtered` or `failed` (whether a retry follows is the delivery's state).
    pub outcome: DeliveryState,
    pub error: Option<String>,
    /// With an applied attempt, the output the sink took.
    pub output: Option<AppliedOutput>,
}

/// The adapter output a sink took, as JSON text, at most [`MAX_OUTPUT_BYTES`] of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedOutput {
    pub text: String,
    /// The whole output's length in bytes.
    pub bytes: u64,
    pub truncated: bool,
}

impl AppliedOutput {
    /// `json`, cut to [`MAX_OUTPUT_BYTES`] when longer.
    pub fn new(mut json: String) -> AppliedOutput {
        let bytes = json.len() as u64;
        let truncated = json.len() > MAX_OUTPUT_BYTES;
        if truncated {
            let mut end = MAX_OUTPUT_BYTES;
            while !json.is_char_boundary(end) {
                end -= 1;
            }
            json.truncate(end);
        }
        AppliedOutput {
            text: json,
            bytes,
            truncated,
        }
    }
}

/// An attempt as the journal keeps it, for the admin API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub sink: String,
    pub started_at: String,
    pub duration_ms: u64,
    pub outcome: DeliveryState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A route's attempts, oldest first, and the output of its latest applied attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteHistory {
    pub attempts: Vec<AttemptRecord>,
    pub output: Option<AppliedOutput>,
}

/// An event reaching its final state.
#[derive(Debug, Clone)]
pub struct Finish {
    pub seq: i64,
    pub state: EventState,
    pub error: Option<String>,
    /// Raise the subject's applied revision to this (only ever raised).
    pub subject_revision: Option<(String, u64)>,
    /// A status report for the hub: (message id, JSON body).
    pub report: Option<(String, String)>,
    pub event_id: String,
}

/// The result of a replay request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Back in the backlog.
    Queued {
        seq: i64,
        subject: String,
    },
    NotFound,
    /// Not yet final: it is being applied already.
    Pending,
    /// Applied (or filtered/superseded): replaying needs `force`.
    NeedsForce {
        state: EventState,
    },
    /// The one route asked for was applied (or filtered) already: replaying it needs `force`.
    RouteNeedsForce {
        state: DeliveryState,
    },
    /// Other routes that take the event were never tried for it: a replay through one route
    /// would apply them too.
    OthersUntried {
        routes: Vec<String>,
    },
}

/// Requeues the event at `seq` (in state `current`) in the writer's transaction: the rules of
/// [`SqliteJournal::requeue`].
pub(super) fn requeue_row(
    conn: &Connection,
    seq: i64,
    subject: String,
    current: EventState,
    route: Option<&RouteReplay>,
    force: bool,
) -> Result<Requeue, rusqlite::Error> {
    if current == EventState::Accepted {
        return Ok(Requeue::Pending);
    }
    match route {
        Some(replay) => {
            let known = deliveries(conn, seq)?;
            let untried: Vec<String> = replay
                .others
                .iter()
                .filter(|r| !known.iter().any(|d| &d.route == *r))
                .cloned()
                .collect();
            if !untried.is_empty() {
                return Ok(Requeue::OthersUntried { routes: untried });
            }
            if let Some(d) = known.iter().find(|d| d.route == replay.route)
                && matches!(d.state, DeliveryState::Applied | DeliveryState::Filtered)
                && !force
            {
                return Ok(Requeue::RouteNeedsForce { state: d.state });
            }
            conn.execute(
                "DELETE FROM deliveries WHERE event_seq = ?1 AND route = ?2",
                params![seq, replay.route],
            )?;
        }
        None => {
            if !current.is_dead_letter() && !force {
                return Ok(Requeue::NeedsForce { state: current });
            }
            if force {
                conn.execute("DELETE FROM deliveries WHERE event_seq = ?1", [seq])?;
            } else {
                conn.execute(
                    "DELETE FROM deliveries WHERE event_seq = ?1 AND state NOT IN (?2, ?3)",
                    params![seq, DeliveryState::Applied, DeliveryState::Filtered],
                )?;
            }
        }
    }
    conn.execute(
        "UPDATE events SET state = ?2, error = NULL, finished_at = NULL, \
         updated_at = ?3 WHERE seq = ?1",
        params![seq, EventState::Accepted, crate::timestamp::now()],
    )?;
    Ok(Requeue::Queued { seq, subject })
}

/// A replay through one route only: that route's delivery is forgotten and tried again, every
/// other route keeps its state (an applied route is not applied again, a failed one stays
/// failed). `others` are the other routes that take the event now: when one of them has never
/// been tried for it (a route added since), the replay is refused, since the dispatcher would
/// apply that route too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteReplay {
    pub route: String,
    pub others: Vec<String>,
}

/// The result of dropping a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropOutcome {
    Dropped,
    NotFound,
    /// Not a dead letter; carries the state.
    NotDeadLetter(EventState),
}

/// A dead letter for the listing.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub seq: i64,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u64,
    pub subject: String,
    pub state: String,
    pub error: Option<String>,
    pub received_at: String,
    pub finished_at: Option<String>,
}

/// The listing entry for a dead letter whose row cannot be decoded: its sequence number, what
/// of it can be read as text, and the decoding error.
fn unreadable_dead_letter(r: &rusqlite::Row<'_>, seq: i64, e: &rusqlite::Error) -> DeadLetter {
    let text = |i: usize| -> String {
        match r.get_ref(i) {
            Ok(rusqlite::types::ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
            Ok(rusqlite::types::ValueRef::Integer(n)) => n.to_string(),
            _ => String::new(),
        }
    };
    tracing::error!(seq, error = %e, "a dead letter's journal row cannot be read");
    DeadLetter {
        seq,
        id: text(1),
        event_type: text(2),
        version: 0,
        subject: text(4),
        state: text(5),
        error: Some(format!(
            "this journal row (seq {seq}) cannot be read: {e}; the other dead letters are unaffected"
        )),
        received_at: text(7),
        finished_at: None,
    }
}

/// What the journal holds of one event, for the admin API.
#[derive(Debug, Clone)]
pub struct EventDetail {
    pub seq: i64,
    pub record: EventRecord,
    pub deliveries: Vec<DeliveryRecord>,
    /// The exact bytes the hub sent.
    pub raw_body: Vec<u8>,
    /// The normalised envelope (JSON text).
    pub envelope: String,
    /// The event's status report while it waits in the outbox.
    pub report: Option<PendingReport>,
    /// The reports the hub took, oldest first (a replay makes another).
    pub reports_sent: Vec<SentReport>,
    /// Each route's attempts and applied output, by route name.
    pub history: std::collections::BTreeMap<String, RouteHistory>,
    /// How the request was authenticated (JSON text, see the ingress); `None` for events
    /// received before the journal kept it.
    pub receipt: Option<String>,
}

/// A status report waiting in the outbox.
#[derive(Debug, Clone, Serialize)]
pub struct PendingReport {
    pub message_id: String,
    /// The report's JSON text.
    pub body: String,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: String,
}

/// A status report the hub took.
#[derive(Debug, Clone, Serialize)]
pub struct SentReport {
    pub message_id: String,
    /// The report's JSON text.
    pub body: String,
    /// Attempts it took, the successful one included.
    pub attempts: u32,
    pub created_at: String,
    pub sent_at: String,
}

/// A pending status report.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: i64,
    pub event_id: String,
    pub message_id: String,
    pub body: String,
    pub attempts: u32,
}

/// Parses the RFC 3339 timestamps the journal writes into unix milliseconds.
pub(super) fn rfc3339_ms(text: &str) -> i64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// One event with its envelope.
pub fn load_event(conn: &Connection, seq: i64) -> Result<Option<StoredEvent>, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT e.seq, id, type, version, subject, revision, source, received_at, state, \
         b.envelope FROM events e JOIN event_bodies b ON b.seq = e.seq WHERE e.seq = ?1",
    )?
    .query_row([seq], stored_event)
    .optional()
}

/// A [`StoredEvent`] from a row of `seq, id, type, version, subject, revision, source,
/// received_at, state, envelope`.
fn stored_event(r: &rusqlite::Row<'_>) -> Result<StoredEvent, rusqlite::Error> {
    Ok(StoredEvent {
        seq: r.get(0)?,
        id: r.get(1)?,
        event_type: r.get(2)?,
        version: stored_u64(r, 3)?,
        subject: r.get(4)?,
        revision: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        source: r.get(6)?,
        received_at_ms: rfc3339_ms(&r.get::<_, String>(7)?),
        state: r.get(8)?,
        envelope: r.get(9)?,
    })
}

/// An unsigned integer column (`version`, `revision`): the writer stores it as the same 64 bits
/// in SQLite's signed integer, and this reverses that, so no stored value makes a row unreadable.
/// (Ingress refuses values above 2^63 − 1; rows an older agent stored above it read back as they
/// were sent.)
pub(crate) fn stored_u64(r: &rusqlite::Row<'_>, index: usize) -> Result<u64, rusqlite::Error> {
    Ok(r.get::<_, i64>(index)? as u64)
}

/// The events with sequence numbers `from..=to` that wait to be applied and were never tried
/// (no delivery recorded), with their envelopes, in sequence order. (The `+` keeps SQLite from
/// searching `events_by_state` by state alone, every waiting event, instead of the range.)
pub fn untried_events(
    conn: &Connection,
    from: i64,
    to: i64,
) -> Result<Vec<StoredEvent>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.seq, id, type, version, subject, revision, source, received_at, state, \
         b.envelope FROM events e JOIN event_bodies b ON b.seq = e.seq \
         WHERE e.seq BETWEEN ?1 AND ?2 AND +e.state = ?3 \
         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq) ORDER BY e.seq",
    )?;
    stmt.query_map(params![from, to, EventState::Accepted], stored_event)?
        .collect()
}

/// The highest revision applied for `subject`.
pub fn subject_revision(conn: &Connection, subject: &str) -> Result<Option<u64>, rusqlite::Error> {
    conn.prepare_cached("SELECT last_revision FROM subjects WHERE subject = ?1")?
        .query_row([subject], |r| stored_u64(r, 0))
        .optional()
}

/// The deliveries of one event, by route.
pub fn deliveries(conn: &Connection, seq: i64) -> Result<Vec<DeliveryRecord>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT route, sink, state, attempts, next_attempt_ms, last_error, updated_at \
         FROM deliveries WHERE event_seq = ?1 ORDER BY route",
    )?;
    stmt.query_map([seq], |r| {
        Ok(DeliveryRecord {
            route: r.get(0)?,
            sink: r.get(1)?,
            state: r.get(2)?,
            attempts: r.get(3)?,
            next_attempt_ms: r.get(4)?,
            last_error: r.get(5)?,
            updated_at: r.get(6)?,
        })
    })?
    .collect()
}

/// Upserts delivery states; `now` is the writer's RFC 3339 time.
pub(super) fn write_deliveries(
    conn: &Connection,
    updates: &[DeliveryUpdate],
    now: &str,
) -> Result<(), rusqlite::Error> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "INSERT INTO deliveries (event_seq, route, sink, state, attempts, next_attempt_ms, \
         last_error, updated_at, type) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, \
         (SELECT type FROM events WHERE seq = ?1)) \
         ON CONFLICT (event_seq, route) DO UPDATE SET sink = ?3, state = ?4, \
         attempts = ?5, next_attempt_ms = ?6, last_error = ?7, updated_at = ?8",
    )?;
    for update in updates {
        stmt.execute(params![
            update.seq,
            update.route,
            update.sink,
            update.state,
            update.attempts,
            update.next_attempt_ms,
            update.last_error,
            now,
        ])?;
        if let Some(attempt) = &update.attempt {
            write_attempt(conn, update, attempt)?;
        }
    }
    Ok(())
}

/// Adds an attempt to its route's history, numbered after the route's last kept attempt (or
/// the delivery's count, for a delivery tried before the history was kept), and keeps the
/// history within [`KEPT_ATTEMPTS`]. Only the latest applied attempt keeps its output.
fn write_attempt(
    conn: &Connection,
    update: &DeliveryUpdate,
    attempt: &Attempt,
) -> Result<(), rusqlite::Error> {
    let output = attempt.output.as_ref();
    let number: u32 = conn
        .prepare_cached(
            "INSERT INTO attempts (event_seq, route, attempt, sink, started_at, duration_ms, \
             outcome, error, output, output_bytes, output_truncated) \
             VALUES (?1, ?2, max(?3, 1 + coalesce((SELECT max(attempt) FROM attempts \
             WHERE event_seq = ?1 AND route = ?2), 0)), ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
             RETURNING attempt",
        )?
        .query_row(
            params![
                update.seq,
                update.route,
                update.attempts,
                update.sink,
                attempt.started_at,
                attempt.duration_ms as i64,
                attempt.outcome,
                attempt.error,
                output.map(|o| o.text.as_str()),
                output.map(|o| o.bytes as i64),
                output.is_some_and(|o| o.truncated),
            ],
            |r| r.get(0),
        )?;
    if number <= 1 {
        return Ok(());
    }
    if output.is_some() {
        conn.prepare_cached(
            "UPDATE attempts SET output = NULL, output_bytes = NULL, output_truncated = 0 \
             WHERE event_seq = ?1 AND route = ?2 AND attempt < ?3 AND output IS NOT NULL",
        )?
        .execute(params![update.seq, update.route, number])?;
    }
    if number > KEPT_ATTEMPTS {
        conn.prepare_cached(
            "DELETE FROM attempts WHERE event_seq = ?1 AND route = ?2 \
             AND attempt > 1 AND attempt <= ?3",
        )?
        .execute(params![
            update.seq,
            update.route,
            number - (KEPT_ATTEMPTS - 1)
        ])?;
    }
    Ok(())
}

/// Each route's kept attempts, oldest first, with its latest applied output.
pub fn history(
    conn: &Connection,
    seq: i64,
) -> Result<std::collections::BTreeMap<String, RouteHistory>, rusqlite::Error> {
    let mut routes = std::collections::BTreeMap::<String, RouteHistory>::new();
    let mut stmt = conn.prepare_cached(
        "SELECT route, attempt, sink, started_at, duration_ms, outcome, error, output, \
         output_bytes, output_truncated FROM attempts WHERE event_seq = ?1 \
         ORDER BY route, attempt",
    )?;
    let mut rows = stmt.query([seq])?;
    while let Some(r) = rows.next()? {
        let route: String = r.get(0)?;
        let history = routes.entry(route).or_default();
        history.attempts.push(AttemptRecord {
            attempt: r.get(1)?,
            sink: r.get(2)?,
            started_at: r.get(3)?,
            duration_ms: r.get::<_, i64>(4)?.max(0) as u64,
            outcome: r.get(5)?,
            error: r.get(6)?,
        });
        if let Some(text) = r.get::<_, Option<String>>(7)? {
            history.output = Some(AppliedOutput {
                text,
                bytes: r.get::<_, Option<i64>>(8)?.unwrap_or(0).max(0) as u64,
                truncated: r.get(9)?,
            });
        }
    }
    Ok(routes)
}

/// Moves an event from the backlog to its final state, in the writer's transaction (see
/// [`SqliteJournal::finish`]); false when it was not in the backlog. `now` is the writer's RFC 3339
/// time.
pub fn finish_event(
    conn: &Connection,
    finish: &Finish,
    now: &str,
) -> Result<bool, rusqlite::Error> {
    let changed = conn
        .prepare_cached(
            "UPDATE events SET state = ?2, error = ?3, finished_at = ?4, \
             updated_at = ?4 WHERE seq = ?1 AND state = ?5",
        )?
        .execute(params![
            finish.seq,
            finish.state,
            finish.error,
            now,
            EventState::Accepted
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    if let Some((subject, revision)) = &finish.subject_revision {
        conn.prepare_cached(
            "INSERT INTO subjects (subject, last_revision) VALUES (?1, ?2) \
             ON CONFLICT (subject) DO UPDATE SET \
             last_revision = max(last_revision, excluded.last_revision)",
        )?
        .execute(params![subject, *revision as i64])?;
    }
    if let Some((message_id, body)) = &finish.report {
        conn.prepare_cached(
            "INSERT INTO outbox (event_id, message_id, body, created_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![finish.event_id, message_id, body, now])?;
    }
    Ok(true)
}

/// The states an event can be pruned in: final, and not a dead letter waiting for the operator.
const PRUNABLE: [EventState; 4] = [
    EventState::Applied,
    EventState::Filtered,
    EventState::Superseded,
    EventState::Dropped,
];

/// The highest seq of an event received before `cutoff` (RFC 3339, UTC), found by bisecting
/// seq (receive order is seq order) with point lookups rather than scanning.
///
/// Timestamps are compared as text. The journal writes them with exactly three digits of
/// milliseconds ([`crate::timestamp`]), so text order is time order. Rows written by earlier
/// versions dropped trailing zeros (`07.49Z`, `07Z`); such a string still agrees with a new one
/// up to the seconds and only its fraction can compare wrongly (`Z` sorts after the digits),
/// so an old row is at most a second off. Retention is counted in days: that second decides
/// nothing, and the rows are left as they are.
fn last_seq_received_before(conn: &Connection, cutoff: &str) -> Result<i64, rusqlite::Error> {
    let (Some(mut lo), Some(mut hi)) =
        conn.query_row("SELECT min(seq), max(seq) FROM events", [], |r| {
            Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?))
        })?
    else {
        return Ok(0);
    };
    let mut first_at_or_after = conn.prepare_cached(
        "SELECT seq, received_at FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1",
    )?;
    let mut first = |from: i64| -> Result<Option<(i64, bool)>, rusqlite::Error> {
        first_at_or_after
            .query_row([from], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?.as_str() < cutoff,
                ))
            })
            .optional()
    };
    if !first(lo)?.is_some_and(|(_, before)| before) {
        return Ok(0);
    }
    // Invariant: the event at or after `lo` was received before the cutoff; none after `hi` is.
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match first(mid)? {
            Some((seq, true)) => lo = seq,
            _ => hi = mid - 1,
        }
    }
    Ok(lo)
}

/// Deletes up to `limit` final events (applied, filtered, superseded, dropped; never dead
/// letters or the backlog) received and last changed before `cutoff` (RFC 3339, UTC), with their
/// bodies, deliveries and attempts. Returns how many were deleted.
pub(super) fn prune(conn: &Connection, cutoff: &str, limit: u32) -> Result<u32, rusqlite::Error> {
    let last = last_seq_received_before(conn, cutoff)?;
    if last == 0 {
        return Ok(0);
    }
    let mut doomed = Vec::new();
    let mut candidates = conn.prepare_cached(
        "SELECT seq FROM events WHERE state = ?1 AND seq <= ?2 AND updated_at < ?3 \
         ORDER BY seq LIMIT ?4",
    )?;
    for state in PRUNABLE {
        let room = limit.saturating_sub(doomed.len() as u32);
        if room == 0 {
            break;
        }
        let seqs = candidates
            .query_map(params![state, last, cutoff, room], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        doomed.extend(seqs);
    }
    let mut deliveries = conn.prepare_cached("DELETE FROM deliveries WHERE event_seq = ?1")?;
    let mut attempts = conn.prepare_cached("DELETE FROM attempts WHERE event_seq = ?1")?;
    let mut bodies = conn.prepare_cached("DELETE FROM event_bodies WHERE seq = ?1")?;
    let mut reports = conn.prepare_cached(
        "DELETE FROM reports_sent WHERE event_id = (SELECT id FROM events WHERE seq = ?1)",
    )?;
    let mut events = conn.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
    for seq in &doomed {
        deliveries.execute([seq])?;
        reports.execute([seq])?;
        attempts.execute([seq])?;
        bodies.execute([seq])?;
        events.execute([seq])?;
    }
    Ok(doomed.len() as u32)
}

/// An event with what its dispatch needs: its deliveries and its subject's applied revision
/// (neither is read for a final event).
pub type Dispatchable = (StoredEvent, Vec<DeliveryRecord>, Option<u64>);

impl SqliteJournal {
    /// Runs a short read at once on a quick connection ([`SqliteJournal::read_now`]), else on the
    /// blocking pool.
    async fn read_soon<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    ) -> Result<R, JournalError> {
        if let Some(result) = self.read_now(&f) {
            return result;
        }
        let journal = self.clone();
        tokio::task::spawn_blocking(move || journal.read(f))
            .await
            .unwrap_or(Err(JournalError::Closed))
    }

    /// An event, its deliveries and its subject's applied revision, for its dispatch; `None`
    /// when the event is gone.
    pub async fn dispatchable(
        self: &Arc<Self>,
        seq: i64,
    ) -> Result<Option<Dispatchable>, JournalError> {
        self.read_soon(move |conn| {
            let Some(event) = load_event(conn, seq)? else {
                return Ok(None);
            };
            if event.state.is_final() {
                return Ok(Some((event, Vec::new(), None)));
            }
            let deliveries = deliveries(conn, seq)?;
            let revision = match event.revision {
                Some(_) => subject_revision(conn, &event.subject)?,
                None => None,
            };
            Ok(Some((event, deliveries, revision)))
        })
        .await
    }

    /// The highest revision applied for `subject`, read as [`SqliteJournal::dispatchable`] reads.
    pub async fn applied_revision(
        self: &Arc<Self>,
        subject: String,
    ) -> Result<Option<u64>, JournalError> {
        self.read_soon(move |conn| subject_revision(conn, &subject))
            .await
    }

    /// Up to `limit` events not yet final received after event `after`, in receive order:
    /// (seq, subject); only events whose commit has been flushed. Blocking.
    pub fn pending_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, JournalError> {
        // Only events on the disk: a later one may be committed with its flush still running,
        // and is announced once that is done.
        let durable = self
            .shared
            .durable_seq
            .load(std::sync::atomic::Ordering::Acquire);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, subject FROM events WHERE state = ?1 AND seq > ?2 AND seq <= ?4 \
                 ORDER BY seq LIMIT ?3",
            )?;
            stmt.query_map(
                rusqlite::params![EventState::Accepted, after, limit as i64, durable],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect()
        })
    }

    /// One event with its envelope. Blocking.
    pub fn load_event(&self, seq: i64) -> Result<Option<StoredEvent>, JournalError> {
        self.read(|conn| load_event(conn, seq))
    }

    /// The events `from..=to` that wait and were never tried ([`untried_events`]). Blocking.
    pub fn untried_events(&self, from: i64, to: i64) -> Result<Vec<StoredEvent>, JournalError> {
        self.read(|conn| untried_events(conn, from, to))
    }

    /// The deliveries of one event. Blocking.
    pub fn deliveries(&self, seq: i64) -> Result<Vec<DeliveryRecord>, JournalError> {
        self.read(|conn| deliveries(conn, seq))
    }

    /// The highest revision applied for `subject`. Blocking.
    pub fn subject_revision(&self, subject: &str) -> Result<Option<u64>, JournalError> {
        self.read(|conn| subject_revision(conn, subject))
    }

    /// What the journal holds of an event: its record, deliveries, bodies and any status
    /// report still waiting to be sent. Blocking.
    pub fn get_detail(&self, id: &str) -> Result<Option<EventDetail>, JournalError> {
        self.read(|conn| {
            let Some(record) = read_record(conn, id)? else {
                return Ok(None);
            };
            let seq: i64 =
                conn.query_row("SELECT seq FROM events WHERE id = ?1", [id], |r| r.get(0))?;
            let (raw_body, envelope, receipt) = conn
                .query_row(
                    "SELECT raw_body, envelope, receipt FROM event_bodies WHERE seq = ?1",
                    [seq],
                    |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<String>>(2)?,
                        ))
                    },
                )
                .optional()?
                .unwrap_or_default();
            let report = conn
                .prepare_cached(
                    "SELECT message_id, body, attempts, next_attempt_ms, last_error, created_at \
                     FROM outbox WHERE event_id = ?1 ORDER BY seq DESC LIMIT 1",
                )?
                .query_row([id], |r| {
                    Ok(PendingReport {
                        message_id: r.get(0)?,
                        body: r.get(1)?,
                        attempts: r.get(2)?,
                        next_attempt_ms: r.get(3)?,
                        last_error: r.get(4)?,
                        created_at: r.get(5)?,
                    })
                })
                .optional()?;
            let reports_sent = conn
                .prepare_cached(
                    "SELECT message_id, body, attempts, created_at, sent_at FROM reports_sent \
                     WHERE event_id = ?1 ORDER BY seq",
                )?
                .query_map([id], |r| {
                    Ok(SentReport {
                        message_id: r.get(0)?,
                        body: r.get(1)?,
                        attempts: r.get(2)?,
                        created_at: r.get(3)?,
                        sent_at: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(EventDetail {
                seq,
                record,
                deliveries: deliveries(conn, seq)?,
                raw_body,
                envelope,
                report,
                reports_sent,
                history: history(conn, seq)?,
                receipt,
            }))
        })
    }

    /// Records the state of one delivery.
    pub async fn set_delivery(&self, update: DeliveryUpdate) -> Result<(), JournalError> {
        self.set_deliveries(vec![update]).await
    }

    /// Records the state of several deliveries in one transaction.
    pub async fn set_deliveries(&self, updates: Vec<DeliveryUpdate>) -> Result<(), JournalError> {
        self.write(move |conn| write_deliveries(conn, &updates, &crate::timestamp::now()))
            .await
    }

    /// Puts an event in its final state, raises the subject's revision and queues the status
    /// report, all in one transaction.
    pub async fn finish(&self, finish: Finish) -> Result<(), JournalError> {
        self.finish_with(Vec::new(), finish).await
    }

    /// As [`SqliteJournal::finish`], recording the deliveries' last states in the same transaction.
    /// The writer writes the final states queued together in one go (see the writer's text).
    pub async fn finish_with(
        &self,
        updates: Vec<DeliveryUpdate>,
        finish: Finish,
    ) -> Result<(), JournalError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.ops
            .send(super::writer::Op::Finish(
                Box::new(super::writer::Finishing { updates, finish }),
                reply,
            ))
            .map_err(|_| JournalError::Closed)?;
        let changed = done.await.map_err(|_| JournalError::Closed)??;
        if changed {
            let _ = self
                .shared
                .backlog
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(1))
                });
        }
        Ok(())
    }

    /// Puts a final event back into the backlog. Without `force` only dead letters (failed,
    /// parked, dropped) are requeued, and routes already applied stay applied; with `force`
    /// every route is applied again. With a [`RouteReplay`] only that route is tried again (see
    /// there).
    pub async fn requeue(
        &self,
        id: &str,
        route: Option<RouteReplay>,
        force: bool,
    ) -> Result<Requeue, JournalError> {
        let id = id.to_owned();
        let outcome = self
            .write(move |conn| {
                let row: Option<(i64, String, EventState)> = conn
                    .query_row(
                        "SELECT seq, subject, state FROM events WHERE id = ?1",
                        [&id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let Some((seq, subject, current)) = row else {
                    return Ok(Requeue::NotFound);
                };
                requeue_row(conn, seq, subject, current, route.as_ref(), force)
            })
            .await?;
        if matches!(outcome, Requeue::Queued { .. }) {
            self.shared.backlog.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Marks a dead letter dropped. The event stays known (a redelivery is a duplicate) until it
    /// ages out with the other final events.
    pub async fn drop_dead_letter(&self, id: &str) -> Result<DropOutcome, JournalError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let current: Option<EventState> = conn
                .query_row("SELECT state FROM events WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()?;
            match current {
                None => Ok(DropOutcome::NotFound),
                Some(EventState::Failed | EventState::Parked) => {
                    conn.execute(
                        "UPDATE events SET state = ?2, updated_at = ?3 WHERE id = ?1",
                        params![id, EventState::Dropped, crate::timestamp::now()],
                    )?;
                    Ok(DropOutcome::Dropped)
                }
                Some(
                    other @ (EventState::Accepted
                    | EventState::Applied
                    | EventState::Filtered
                    | EventState::Superseded
                    | EventState::Dropped),
                ) => Ok(DropOutcome::NotDeadLetter(other)),
            }
        })
        .await
    }

    /// Dead letters (failed and parked events) after `after_seq`, oldest first. Blocking.
    pub fn dead_letters(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, id, type, version, subject, state, error, received_at, finished_at \
                 FROM events WHERE state IN (?1, ?2) AND seq > ?3 ORDER BY seq LIMIT ?4",
            )?;
            stmt.query_map(
                params![EventState::Failed, EventState::Parked, after_seq, limit],
                |r| {
                    let seq: i64 = r.get(0)?;
                    let row = || -> Result<DeadLetter, rusqlite::Error> {
                        Ok(DeadLetter {
                            seq,
                            id: r.get(1)?,
                            event_type: r.get(2)?,
                            version: stored_u64(r, 3)?,
                            subject: r.get(4)?,
                            state: r.get(5)?,
                            error: r.get(6)?,
                            received_at: r.get(7)?,
                            finished_at: r.get(8)?,
                        })
                    };
                    // A row that cannot be read is listed as such, so one bad row does not
                    // hide every other dead letter.
                    Ok(row().unwrap_or_else(|e| unreadable_dead_letter(r, seq, &e)))
                },
            )?
            .collect()
        })
    }

    /// Number of dead letters. Blocking.
    pub fn dead_letter_count(&self) -> Result<u64, JournalError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT count(*) FROM events WHERE state IN (?1, ?2)",
                params![EventState::Failed, EventState::Parked],
                |r| r.get(0),
            )
        })
    }

    /// Status reports due at `now_ms`, oldest first. Blocking.
    pub fn outbox_due(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxRow>, JournalError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, event_id, message_id, body, attempts FROM outbox \
                 WHERE next_attempt_ms <= ?1 ORDER BY seq LIMIT ?2",
            )?;
            stmt.query_map(params![now_ms, limit], |r| {
                Ok(OutboxRow {
                    seq: r.get(0)?,
                    event_id: r.get(1)?,
                    message_id: r.get(2)?,
                    body: r.get(3)?,
                    attempts: r.get(4)?,
                })
            })?
            .collect()
        })
    }

    /// The earliest time a pending report is due, unix ms. Blocking.
    pub fn outbox_next_due(&self) -> Result<Option<i64>, JournalError> {
        self.read(|conn| {
            conn.query_row("SELECT min(next_attempt_ms) FROM outbox", [], |r| r.get(0))
        })
    }

    /// Pending status reports. Blocking.
    pub fn outbox_len(&self) -> Result<u64, JournalError> {
        self.read(|conn| conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0)))
    }

    /// A report was delivered: it leaves the outbox for the event's sent reports.
    pub async fn outbox_done(&self, seq: i64) -> Result<(), JournalError> {
        let now = crate::timestamp::now();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO reports_sent \
                 (seq, event_id, message_id, body, attempts, created_at, sent_at) \
                 SELECT seq, event_id, message_id, body, attempts + 1, created_at, ?2 \
                 FROM outbox WHERE seq = ?1",
            )?
            .execute(params![seq, now])?;
            conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
                .execute([seq])
                .map(|_| ())
        })
        .await
    }

    /// A report failed; try again at `next_attempt_ms`.
    pub async fn outbox_retry(
        &self,
        seq: i64,
        attempts: u32,
        next_attempt_ms: i64,
        error: String,
    ) -> Result<(), JournalError> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE outbox SET attempts = ?2, next_attempt_ms = ?3, last_error = ?4 WHERE seq = ?1",
                params![seq, attempts, next_attempt_ms, error],
            )
            .map(|_| ())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::{JournalOptions, NewEvent, WireFormat};
    use super::*;

    fn event(id: &str, version: u64, revision: Option<u64>) -> NewEvent {
        NewEvent {
            id: id.into(),
            event_type: "change".into(),
            version,
            subject: "S".into(),
            revision,
            source: None,
            time: None,
            format: WireFormat::ChangeEvent,
            content_type: Some("application/json".into()),
            raw_body: Bytes::from_static(b"{}"),
            envelope: "{}".into(),
            receipt: None,
        }
    }

    /// A delivery update for route `route` of event 1 with its attempt.
    fn tried(
        route: &str,
        attempts: u32,
        outcome: DeliveryState,
        duration_ms: u64,
        output: Option<&str>,
    ) -> DeliveryUpdate {
        let error = (outcome == DeliveryState::Failed).then(|| format!("refused {attempts}"));
        DeliveryUpdate {
            seq: 1,
            route: route.into(),
            sink: "files".into(),
            state: if outcome == DeliveryState::Failed {
                DeliveryState::Pending
            } else {
                outcome
            },
            attempts,
            next_attempt_ms: None,
            last_error: error.clone(),
            attempt: Some(Attempt {
                started_at: crate::timestamp::now(),
                duration_ms,
                outcome,
                error,
                output: output.map(|o| AppliedOutput::new(o.to_owned())),
            }),
        }
    }

    fn numbers(history: &RouteHistory) -> Vec<u32> {
        history.attempts.iter().map(|a| a.attempt).collect()
    }

    #[tokio::test]
    async fn attempts_are_kept_in_order_with_their_durations_and_the_applied_output() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        journal.append(event("e", 1, None)).await.unwrap();
        journal
            .set_delivery(tried("a", 1, DeliveryState::Failed, 11, None))
            .await
            .unwrap();
        journal
            .set_delivery(tried("a", 2, DeliveryState::Failed, 22, None))
            .await
            .unwrap();
        journal
            .finish_with(
                vec![
                    tried("a", 3, DeliveryState::Applied, 33, Some(r#"{"n":3}"#)),
                    tried("b", 0, DeliveryState::Filtered, 4, None),
                ],
                Finish {
                    seq: 1,
                    state: EventState::Applied,
                    error: None,
                    subject_revision: None,
                    report: None,
                    event_id: "e".into(),
                },
            )
            .await
            .unwrap();
        let detail = journal.get_detail("e").unwrap().unwrap();
        let a = &detail.history["a"];
        assert_eq!(numbers(a), [1, 2, 3]);
        let durations: Vec<u64> = a.attempts.iter().map(|x| x.duration_ms).collect();
        assert_eq!(durations, [11, 22, 33]);
        let outcomes: Vec<DeliveryState> = a.attempts.iter().map(|x| x.outcome).collect();
        use DeliveryState::{Applied, Failed, Filtered};
        assert_eq!(outcomes, [Failed, Failed, Applied]);
        assert_eq!(a.attempts[0].error.as_deref(), Some("refused 1"));
        assert_eq!(a.attempts[2].error, None);
        assert!(a.attempts[0].started_at <= a.attempts[2].started_at);
        let output = a.output.as_ref().unwrap();
        assert_eq!((output.text.as_str(), output.bytes), (r#"{"n":3}"#, 7));
        assert!(!output.truncated);
        // A filtered route's attempt is numbered 1 although its delivery counts none.
        assert_eq!(numbers(&detail.history["b"]), [1]);
        assert_eq!(detail.history["b"].attempts[0].outcome, Filtered);
        assert_eq!(detail.history["b"].output, None);

        // A forced replay forgets the deliveries; the history goes on numbering, and only the
        // latest applied attempt keeps an output.
        let replayed = journal.requeue("e", None, true).await.unwrap();
        assert!(matches!(replayed, Requeue::Queued { .. }), "{replayed:?}");
        assert!(journal.deliveries(1).unwrap().is_empty());
        journal
            .set_delivery(tried("a", 1, DeliveryState::Applied, 5, Some("[4]")))
            .await
            .unwrap();
        let detail = journal.get_detail("e").unwrap().unwrap();
        let a = &detail.history["a"];
        assert_eq!(numbers(a), [1, 2, 3, 4]);
        assert_eq!(a.output.as_ref().unwrap().text, "[4]");
        let outputs: i64 = journal
            .read(|c| {
                c.query_row(
                    "SELECT count(*) FROM attempts WHERE output IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(outputs, 1);
        journal.close();
    }

    #[tokio::test]
    async fn a_route_retried_past_the_cap_keeps_its_first_and_latest_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        journal.append(event("e", 1, None)).await.unwrap();
        let total = KEPT_ATTEMPTS + 30;
        for n in 1..=total {
            journal
                .set_delivery(tried("a", n, DeliveryState::Failed, 1, None))
                .await
                .unwrap();
        }
        let history = &journal.get_detail("e").unwrap().unwrap().history["a"];
        let kept = numbers(history);
        assert_eq!(kept.len(), KEPT_ATTEMPTS as usize);
        assert_eq!(kept[0], 1);
        assert_eq!(kept[1], total - KEPT_ATTEMPTS + 2);
        assert_eq!(*kept.last().unwrap(), total);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        // The delivery still counts every attempt.
        assert_eq!(journal.deliveries(1).unwrap()[0].attempts, total);
        journal.close();
    }

    #[test]
    fn an_output_longer_than_the_cap_is_cut_at_a_character_boundary() {
        let long = format!("\"{}\"", "é".repeat(MAX_OUTPUT_BYTES));
        let output = AppliedOutput::new(long.clone());
        assert!(output.truncated);
        assert_eq!(output.bytes, long.len() as u64);
        assert!(output.text.len() <= MAX_OUTPUT_BYTES && output.text.len() > MAX_OUTPUT_BYTES - 4);
        assert!(long.starts_with(&output.text));
        let short = AppliedOutput::new("{}".into());
        assert!(!short.truncated && short.text == "{}" && short.bytes == 2);
    }

    #[tokio::test]
    async fn a_version_4_journal_with_events_and_deliveries_migrates_and_goes_on_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::super::FILE_NAME);
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &super::super::schema::MIGRATIONS[..4] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 4).unwrap();
            tx.execute_batch(
                "INSERT INTO events (seq, id, type, version, subject, format, received_at, \
                 state, updated_at) VALUES (1, 'old', 't', 1, 's', 'change_event', \
                 '2026-01-01T00:00:00.000Z', 'accepted', '2026-01-01T00:00:00.000Z'); \
                 INSERT INTO event_bodies (seq, raw_body, envelope) VALUES (1, x'7b7d', '{}'); \
                 INSERT INTO deliveries (event_seq, route, sink, state, attempts, last_error, \
                 updated_at) VALUES (1, 'a', 'files', 'pending', 3, 'refused', \
                 '2026-01-01T00:00:00.000Z');",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        // The delivery learnt its event's type (for the listing's route and type filter).
        let delivery_type: Option<String> = journal
            .read(|c| c.query_row("SELECT type FROM deliveries", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(delivery_type.as_deref(), Some("t"));
        let detail = journal.get_detail("old").unwrap().unwrap();
        assert_eq!(detail.receipt, None);
        assert!(detail.history.is_empty());
        assert_eq!(detail.deliveries[0].attempts, 3);
        // The next attempt is the fourth, as the delivery counted three before the history.
        journal
            .set_delivery(tried("a", 4, DeliveryState::Applied, 2, Some("{}")))
            .await
            .unwrap();
        let detail = journal.get_detail("old").unwrap().unwrap();
        assert_eq!(numbers(&detail.history["a"]), [4]);
        journal.close();
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, super::super::SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn no_stored_row_makes_reads_of_other_rows_fail() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        // As an agent that took integers up to 2^64 - 1 stored them.
        let huge = 1u64 << 63;
        for e in [
            event("huge", huge, Some(u64::MAX)),
            event("plain", 1, Some(2)),
            event("mangled", 1, None),
        ] {
            journal.append(e).await.unwrap();
        }
        journal
            .write(|conn| {
                conn.execute("UPDATE events SET state = ?1", [EventState::Failed])?;
                // A value no agent writes, which no read can decode as an integer.
                conn.execute(
                    "UPDATE events SET version = 'not a number' WHERE id = 'mangled'",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();

        let record = journal.get("huge").unwrap().unwrap();
        assert_eq!((record.version, record.revision), (huge, Some(u64::MAX)));
        let seq = journal
            .read(|c| c.query_row("SELECT seq FROM events WHERE id = 'huge'", [], |r| r.get(0)))
            .unwrap();
        let stored = journal.read(|c| load_event(c, seq)).unwrap().unwrap();
        assert_eq!((stored.version, stored.revision), (huge, Some(u64::MAX)));

        let listed = journal.dead_letters(0, 100).unwrap();
        let ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["huge", "plain", "mangled"]);
        assert_eq!(listed[0].version, huge);
        let mangled = listed[2].error.as_deref().unwrap();
        assert!(mangled.contains("cannot be read"), "{mangled}");
        journal.close();
    }
}
