//! What the admin API, the CLI and the console read and change in the PostgreSQL journal: an
//! event and its detail, the listing under filters, the per-minute counts, the dead letters and
//! their drop and retry, the replay, the outbox's length and the backlog. Each function has the
//! meaning and the result of the SQLite journal's method of the same name.
//!
//! Listings are ordered by `seq` descending and continue below a cursor seq, as the SQLite
//! journal's; each filter has an index ending in `seq` (see the schema). A type glob is turned
//! into the concrete types it matches (a walk over the type index, one distinct value at a
//! time), and a few types are listed by one index walk each, merged. A time window is turned
//! into a seq range through the receive time's index, as in the SQLite journal, widened by
//! [`CLOCK_SLACK_MS`] on both sides: the events come from several agents, and each writes
//! `received_at` by its own clock, so a window finds every event in it as long as the agents'
//! clocks agree within that slack.
//!
//! Replays and drops are not fenced: any agent's admin API may make them, whoever holds the
//! event's partition. They lock the event's row (`SELECT … FOR UPDATE`) for their transaction,
//! so they and the lease holder's final state of the same event ([`super::claim::finish`],
//! whose `UPDATE` of the row waits for the lock, and whose deliveries' foreign key check takes
//! a share lock that the lock waits for) happen one after the other, each seeing the other's
//! result: a replay of an event being finished sees it final once it is, or sees it still
//! waiting and refuses. A replay puts the event back in the backlog and notifies the
//! partition's channel in the same transaction (as an append does), so the agent holding the
//! partition applies it, whichever agent took the replay.

use std::collections::BTreeMap;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row as _};

use super::append::{read_records, record_from, state_column};
use super::claim::deliveries_on;
use super::{PgDb, PgError, retry_sqlstate, sqlstate};
use crate::journal::{
    AppliedOutput, AttemptRecord, DeadLetter, DeliveryState, DropOutcome, EventDetail, EventFilter,
    EventRecord, EventState, EventSummary, PendingReport, Requeue, Requeued, RouteHistory,
    RouteReplay, SentReport,
};

/// Globs matching more types than this are not split into one index walk per type: the
/// listing walks `seq` and tests the type of each row instead (as the SQLite journal does).
const MAX_TYPE_WALKS: usize = 16;

/// How far receive times may run against the receive order, and a time window still find every
/// event in it: the window's seq range is found through the receive time's index, widened by
/// this much on both sides. Larger than the SQLite journal's minute, as the times come from
/// several agents' clocks; a wider range costs only the rows of the slack.
const CLOCK_SLACK_MS: i64 = 10 * 60_000;

/// Ends a transaction whose work returned `result`: commits it when Ok, rolls it back at once
/// otherwise (it may hold row locks). `None` after a first serialization failure or deadlock:
/// the caller runs the transaction once more.
async fn settle<T>(
    db: &PgDb,
    tx: sqlx::Transaction<'static, Postgres>,
    result: Result<T, sqlx::Error>,
    doing: &'static str,
    retried: &mut bool,
) -> Option<Result<T, PgError>> {
    match result {
        Ok(value) => Some(
            tx.commit()
                .await
                .map(|()| value)
                .map_err(|e| db.error(e, doing)),
        ),
        Err(e) => {
            let _ = tx.rollback().await;
            if !*retried && sqlstate(&e).is_some_and(|code| retry_sqlstate(&code)) {
                *retried = true;
                return None;
            }
            Some(Err(db.error(e, doing)))
        }
    }
}

/// The stored record of one event.
pub async fn get(db: &PgDb, id: &str) -> Result<Option<EventRecord>, PgError> {
    const DOING: &str = "reading an event";
    let mut conn = db.pool().acquire().await.map_err(|e| db.error(e, DOING))?;
    read_records(&mut conn, &[id])
        .await
        .map(|mut records| records.pop())
        .map_err(|e| db.error(e, DOING))
}

/// What the journal holds of an event: its record, deliveries, bodies and receipt, each
/// route's attempts and applied output, the status report still waiting to be sent and the
/// reports the hub took. Read in one snapshot.
pub async fn get_detail(db: &PgDb, id: &str) -> Result<Option<EventDetail>, PgError> {
    const DOING: &str = "reading an event's detail";
    let mut tx = db.pool().begin().await.map_err(|e| db.error(e, DOING))?;
    let result = async {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        detail_on(&mut tx, id).await
    }
    .await;
    // Nothing was written: ending it either way is the same.
    let _ = tx.rollback().await;
    result.map_err(|e| db.error(e, DOING))
}

async fn detail_on(conn: &mut PgConnection, id: &str) -> Result<Option<EventDetail>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT e.seq, e.id, e.type, e.version, e.subject, e.revision, e.source, e.time, \
         e.format, e.received_at, e.state, e.updated_at, e.error, e.finished_at, \
         b.raw_body, b.envelope, b.receipt \
         FROM events e LEFT JOIN event_bodies b ON b.seq = e.seq WHERE e.id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let seq: i64 = row.try_get(0)?;
    let record = record_from(&row, 1)?;
    let raw_body = row.try_get::<Option<Vec<u8>>, _>(14)?.unwrap_or_default();
    let envelope = row.try_get::<Option<String>, _>(15)?.unwrap_or_default();
    let receipt: Option<String> = row.try_get(16)?;
    let report = sqlx::query(
        "SELECT message_id, body, attempts, next_attempt_ms, last_error, created_at \
         FROM outbox WHERE event_id = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| {
        Ok::<_, sqlx::Error>(PendingReport {
            message_id: r.try_get(0)?,
            body: r.try_get(1)?,
            attempts: r.try_get::<i32, _>(2)?.max(0) as u32,
            next_attempt_ms: r.try_get(3)?,
            last_error: r.try_get(4)?,
            created_at: r.try_get(5)?,
        })
    })
    .transpose()?;
    let reports_sent = sqlx::query(
        "SELECT message_id, body, attempts, created_at, sent_at FROM reports_sent \
         WHERE event_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        Ok(SentReport {
            message_id: r.try_get(0)?,
            body: r.try_get(1)?,
            attempts: r.try_get::<i32, _>(2)?.max(0) as u32,
            created_at: r.try_get(3)?,
            sent_at: r.try_get(4)?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(EventDetail {
        seq,
        record,
        deliveries: deliveries_on(&mut *conn, seq).await?,
        raw_body,
        envelope,
        report,
        reports_sent,
        history: history_on(conn, seq).await?,
        receipt,
    }))
}

/// Each route's kept attempts, oldest first, with its latest applied output.
async fn history_on(
    conn: &mut PgConnection,
    seq: i64,
) -> Result<BTreeMap<String, RouteHistory>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT route, attempt, sink, started_at, duration_ms, outcome, error, output, \
         output_bytes, output_truncated FROM attempts WHERE event_seq = $1 \
         ORDER BY route, attempt",
    )
    .bind(seq)
    .fetch_all(conn)
    .await?;
    let mut routes = BTreeMap::<String, RouteHistory>::new();
    for r in &rows {
        let history = routes.entry(r.try_get(0)?).or_default();
        history.attempts.push(AttemptRecord {
            attempt: r.try_get::<i32, _>(1)?.max(0) as u32,
            sink: r.try_get(2)?,
            started_at: r.try_get(3)?,
            duration_ms: r.try_get::<i64, _>(4)?.max(0) as u64,
            outcome: state_column(r, 5)?,
            error: r.try_get(6)?,
        });
        if let Some(text) = r.try_get::<Option<String>, _>(7)? {
            history.output = Some(AppliedOutput {
                text,
                bytes: r.try_get::<Option<i64>, _>(8)?.unwrap_or(0).max(0) as u64,
                truncated: r.try_get(9)?,
            });
        }
    }
    Ok(routes)
}

/// Events matching `filter` with seq below `before` (all when `None`), newest first, at most
/// `limit`.
pub async fn list_events(
    db: &PgDb,
    filter: &EventFilter,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<EventSummary>, PgError> {
    const DOING: &str = "listing events";
    let mut conn = db.pool().acquire().await.map_err(|e| db.error(e, DOING))?;
    list_on(&mut conn, filter, before, limit)
        .await
        .map_err(|e| db.error(e, DOING))
}

/// `pattern`, a glob as in the routes' `types` (`*` any run, `?` one character, everything
/// else itself), as a `LIKE` pattern with `\` as its escape.
fn glob_to_like(pattern: &str) -> String {
    let mut like = String::with_capacity(pattern.len() + 4);
    for c in pattern.chars() {
        match c {
            '*' => like.push('%'),
            '?' => like.push('_'),
            '%' | '_' | '\\' => {
                like.push('\\');
                like.push(c);
            }
            c => like.push(c),
        }
    }
    like
}

/// The concrete event types in the journal that `pattern` matches, found by stepping through
/// the type index one distinct value at a time (a lookup per type, whatever the event count).
async fn matching_types(
    conn: &mut PgConnection,
    pattern: &str,
) -> Result<Vec<String>, sqlx::Error> {
    if !pattern.contains(['*', '?']) {
        return Ok(vec![pattern.to_owned()]);
    }
    sqlx::query_scalar(
        "WITH RECURSIVE t(x) AS ( \
           (SELECT type FROM events ORDER BY type LIMIT 1) \
           UNION ALL \
           SELECT (SELECT type FROM events WHERE type > t.x ORDER BY type LIMIT 1) \
           FROM t WHERE t.x IS NOT NULL \
         ) SELECT x FROM t WHERE x LIKE $1 ESCAPE '\\'",
    )
    .bind(glob_to_like(pattern))
    .fetch_all(conn)
    .await
}

/// `text` (a journal time) moved by `ms` milliseconds, as the journal writes times.
fn shifted(text: &str, ms: i64) -> Option<String> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(crate::timestamp::format(
        at + time::Duration::milliseconds(ms),
    ))
}

/// The seq range `(above, below)`, both exclusive, that holds every event of the filter's time
/// window (see [`CLOCK_SLACK_MS`]). Among events received at the same time, the bound that
/// excludes fewer is taken.
async fn window_seqs(
    conn: &mut PgConnection,
    filter: &EventFilter,
) -> Result<(Option<i64>, Option<i64>), sqlx::Error> {
    let mut above = None;
    let mut below = None;
    if let Some(since) = filter
        .since
        .as_deref()
        .and_then(|t| shifted(t, -CLOCK_SLACK_MS))
    {
        above = sqlx::query_scalar(
            "SELECT seq FROM events WHERE received_at < $1 \
             ORDER BY received_at DESC, seq LIMIT 1",
        )
        .bind(since)
        .fetch_optional(&mut *conn)
        .await?;
    }
    if let Some(until) = filter
        .until
        .as_deref()
        .and_then(|t| shifted(t, CLOCK_SLACK_MS))
    {
        below = sqlx::query_scalar(
            "SELECT seq FROM events WHERE received_at >= $1 \
             ORDER BY received_at, seq DESC LIMIT 1",
        )
        .bind(until)
        .fetch_optional(&mut *conn)
        .await?;
    }
    Ok((above, below))
}

/// [`list_events`] on `conn` (in its transaction, if any).
async fn list_on(
    conn: &mut PgConnection,
    filter: &EventFilter,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<EventSummary>, sqlx::Error> {
    // A route nothing went through (a misspelt name) selects nothing; without this, a walk of
    // another filter's index would look up a delivery for each of its events to find none.
    if let Some(route) = &filter.route {
        let used: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM deliveries WHERE route = $1)")
                .bind(route)
                .fetch_one(&mut *conn)
                .await?;
        if !used {
            return Ok(Vec::new());
        }
    }
    let types = match &filter.event_type {
        None => None,
        Some(pattern) => {
            let mut types = matching_types(&mut *conn, pattern).await?;
            // With a route, only the types that went through it (an index lookup each).
            if let Some(route) = &filter.route {
                types = sqlx::query_scalar(
                    "SELECT t FROM unnest($2::text[]) WITH ORDINALITY AS u(t, n) \
                     WHERE EXISTS (SELECT 1 FROM deliveries WHERE route = $1 AND type = u.t) \
                     ORDER BY n",
                )
                .bind(route)
                .bind(&types)
                .fetch_all(&mut *conn)
                .await?;
            }
            Some(types)
        }
    };
    let walk = match &types {
        None => Walk::Seq(None),
        Some(types) if types.is_empty() => return Ok(Vec::new()),
        // A subject's events are few (one record's history): its index is walked once and the
        // rest tested row by row.
        Some(types) if types.len() > MAX_TYPE_WALKS || filter.subject.is_some() => {
            Walk::Seq(Some(types))
        }
        Some(types) => Walk::PerType(types),
    };
    let (above, below) = window_seqs(&mut *conn, filter).await?;
    let below = match (before, below) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut query = select(filter, walk, above, below, limit);
    let rows = query.build().fetch_all(conn).await?;
    rows.iter().map(summary).collect()
}

/// How a listing finds its events.
#[derive(Clone, Copy)]
enum Walk<'a> {
    /// Down one index (`seq`, a state's, a subject's, a route's deliveries), testing each row's
    /// type when types are given.
    Seq(Option<&'a [String]>),
    /// One walk of the type index per type (of the state and type index per state and type
    /// when states are chosen, of the route's deliveries of the type when a route alone is),
    /// each stopping after a page, merged newest first: walking one index and testing each
    /// row's type and state reads every event of the type when few have the state.
    PerType(&'a [String]),
}

/// The columns of an [`EventSummary`], of events `e`.
const SUMMARY: &str = "e.seq, e.id, e.type, e.version, e.subject, e.revision, e.state, \
                       e.received_at, e.finished_at, e.error";

fn summary(r: &PgRow) -> Result<EventSummary, sqlx::Error> {
    Ok(EventSummary {
        seq: r.try_get(0)?,
        id: r.try_get(1)?,
        event_type: r.try_get(2)?,
        version: r.try_get::<i64, _>(3)? as u64,
        subject: r.try_get(4)?,
        revision: r.try_get::<Option<i64>, _>(5)?.map(|v| v as u64),
        state: state_column(r, 6)?,
        received_at: r.try_get(7)?,
        finished_at: r.try_get(8)?,
        error: r.try_get(9)?,
    })
}

/// The statement of a listing: seq between `above` and `below` (both exclusive).
fn select<'a>(
    filter: &'a EventFilter,
    walk: Walk<'a>,
    above: Option<i64>,
    below: Option<i64>,
    limit: u32,
) -> QueryBuilder<Postgres> {
    // A route alone walks that route's deliveries (in event seq order), with one type the
    // route's deliveries of that type. With another filter that has an index of its own, the
    // walk is over that index and each event's delivery through the route is looked up: a
    // route's deliveries are most of the events, so they narrow the walk least.
    let by_route = filter.route.is_some() && filter.states.is_empty() && filter.subject.is_none();
    let seq = if by_route { "d.event_seq" } else { "e.seq" };
    let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
    let mut q = QueryBuilder::<Postgres>::new("");
    if let Walk::PerType(types) = walk {
        // One (state, type) pair per walk; the state is NULL when states are not chosen.
        let (walk_states, walk_types): (Vec<Option<&str>>, Vec<&str>) = if states.is_empty() {
            types.iter().map(|t| (None, t.as_str())).unzip()
        } else {
            states
                .iter()
                .flat_map(|s| types.iter().map(move |t| (Some(*s), t.as_str())))
                .unzip()
        };
        q.push("SELECT w.* FROM unnest(");
        q.push_bind(walk_states);
        q.push("::text[], ");
        q.push_bind(walk_types);
        q.push("::text[]) AS k(state, type) CROSS JOIN LATERAL (");
    }
    q.push(format_args!("SELECT {SUMMARY} FROM "));
    match &filter.route {
        Some(route) if by_route => {
            q.push("deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.route = ");
            q.push_bind(route.clone());
        }
        Some(route) => {
            q.push(
                "events e WHERE EXISTS (SELECT 1 FROM deliveries d \
                 WHERE d.event_seq = e.seq AND d.route = ",
            );
            q.push_bind(route.clone());
            q.push(")");
        }
        None => {
            q.push("events e WHERE true");
        }
    }
    match walk {
        Walk::PerType(_) => {
            if !states.is_empty() {
                q.push(" AND e.state = k.state");
            }
            q.push(if by_route {
                " AND d.type = k.type"
            } else {
                " AND e.type = k.type"
            });
        }
        Walk::Seq(types) => {
            if !states.is_empty() {
                q.push(" AND e.state = ANY(");
                q.push_bind(states.iter().map(|s| s.to_string()).collect::<Vec<_>>());
                q.push("::text[])");
            }
            if let Some(types) = types {
                q.push(" AND e.type = ANY(");
                q.push_bind(types.to_vec());
                q.push("::text[])");
            }
        }
    }
    if let Some(subject) = &filter.subject {
        q.push(" AND e.subject = ");
        q.push_bind(subject.clone());
    }
    if let Some(since) = &filter.since {
        q.push(" AND e.received_at >= ");
        q.push_bind(since.clone());
    }
    if let Some(until) = &filter.until {
        q.push(" AND e.received_at < ");
        q.push_bind(until.clone());
    }
    if let Some(above) = above {
        q.push(format_args!(" AND {seq} > "));
        q.push_bind(above);
    }
    if let Some(below) = below {
        q.push(format_args!(" AND {seq} < "));
        q.push_bind(below);
    }
    q.push(format_args!(" ORDER BY {seq} DESC LIMIT "));
    q.push_bind(i64::from(limit));
    if matches!(walk, Walk::PerType(_)) {
        q.push(") w ORDER BY w.seq DESC LIMIT ");
        q.push_bind(i64::from(limit));
    }
    q
}

/// The events received at or after `since` (a journal time), counted by minute
/// (`YYYY-MM-DDTHH:MM`) and state, for the console's chart, in receive-time order (within a
/// minute, the states in the order of their first event).
pub async fn received_per_minute(
    db: &PgDb,
    since: &str,
) -> Result<Vec<(String, EventState, u64)>, PgError> {
    const DOING: &str = "counting events by minute";
    let rows = sqlx::query(
        "SELECT left(received_at, 16), state, count(*) FROM events WHERE received_at >= $1 \
         GROUP BY 1, 2 ORDER BY 1, min(received_at), min(seq)",
    )
    .bind(since)
    .fetch_all(db.pool())
    .await
    .map_err(|e| db.error(e, DOING))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                state_column(r, 1)?,
                r.try_get::<i64, _>(2)?.max(0) as u64,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| db.error(e, DOING))
}

/// Dead letters (failed and parked events) after `after_seq`, oldest first. A row that cannot
/// be read is listed as such (with its seq, and the reason as its error), so one bad row does
/// not hide every other dead letter.
pub async fn dead_letters(
    db: &PgDb,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<DeadLetter>, PgError> {
    const DOING: &str = "listing dead letters";
    let rows = sqlx::query(
        "SELECT seq, id, type, version, subject, state, error, received_at, finished_at \
         FROM events WHERE state IN ($1, $2) AND seq > $3 ORDER BY seq LIMIT $4",
    )
    .bind(EventState::Failed.as_str())
    .bind(EventState::Parked.as_str())
    .bind(after_seq)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(|e| db.error(e, DOING))?;
    rows.iter()
        .map(|r| {
            let seq: i64 = r.try_get(0)?;
            let row = || -> Result<DeadLetter, sqlx::Error> {
                Ok(DeadLetter {
                    seq,
                    id: r.try_get(1)?,
                    event_type: r.try_get(2)?,
                    version: r.try_get::<i64, _>(3)? as u64,
                    subject: r.try_get(4)?,
                    state: r.try_get(5)?,
                    error: r.try_get(6)?,
                    received_at: r.try_get(7)?,
                    finished_at: r.try_get(8)?,
                })
            };
            Ok(row().unwrap_or_else(|e| unreadable_dead_letter(r, seq, &e)))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| db.error(e, DOING))
}

/// The listing entry for a dead letter whose row cannot be decoded: its seq, what of it reads
/// as text, and the decoding error.
fn unreadable_dead_letter(r: &PgRow, seq: i64, e: &sqlx::Error) -> DeadLetter {
    let text = |i: usize| r.try_get::<String, _>(i).unwrap_or_default();
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

/// Number of dead letters (failed and parked events).
pub async fn dead_letter_count(db: &PgDb) -> Result<u64, PgError> {
    count(
        db,
        sqlx::query_scalar("SELECT count(*) FROM events WHERE state IN ($1, $2)")
            .bind(EventState::Failed.as_str())
            .bind(EventState::Parked.as_str()),
        "counting dead letters",
    )
    .await
}

/// Pending status reports (claimed or not).
pub async fn outbox_len(db: &PgDb) -> Result<u64, PgError> {
    count(
        db,
        sqlx::query_scalar("SELECT count(*) FROM outbox"),
        "counting pending status reports",
    )
    .await
}

/// Events not yet in a final state, in every partition.
pub async fn backlog(db: &PgDb) -> Result<u64, PgError> {
    count(
        db,
        sqlx::query_scalar("SELECT count(*) FROM events WHERE state = $1")
            .bind(EventState::Accepted.as_str()),
        "counting the backlog",
    )
    .await
}

async fn count<'q>(
    db: &PgDb,
    query: sqlx::query::QueryScalar<'q, Postgres, i64, sqlx::postgres::PgArguments>,
    doing: &'static str,
) -> Result<u64, PgError> {
    query
        .fetch_one(db.pool())
        .await
        .map(|n| n.max(0) as u64)
        .map_err(|e| db.error(e, doing))
}

/// The earliest time a pending report is due, unix ms. A report another agent (or this one)
/// holds under a live claim is due no earlier than its claim's expiry (on PostgreSQL's clock),
/// as no agent can claim it before: otherwise the report loop would wake at once, again and
/// again, for reports that are being sent elsewhere.
pub async fn outbox_next_due(db: &PgDb) -> Result<Option<i64>, PgError> {
    sqlx::query_scalar(
        "SELECT min(CASE WHEN claim_expires_at > now() \
           THEN greatest(next_attempt_ms, \
             (extract(epoch FROM claim_expires_at) * 1000)::bigint) \
           ELSE next_attempt_ms END) FROM outbox",
    )
    .fetch_one(db.pool())
    .await
    .map_err(|e| db.error(e, "reading when the next status report is due"))
}

/// Marks a dead letter dropped. The event stays known (a redelivery is a duplicate) until it
/// ages out with the other final events. The row is locked first, so a drop and a replay of the
/// same event happen one after the other.
pub async fn drop_dead_letter(db: &PgDb, id: &str) -> Result<DropOutcome, PgError> {
    const DOING: &str = "dropping a dead letter";
    let mut retried = false;
    loop {
        let mut tx = db.pool().begin().await.map_err(|e| db.error(e, DOING))?;
        let result = drop_in(&mut tx, id).await;
        if let Some(outcome) = settle(db, tx, result, DOING, &mut retried).await {
            return outcome;
        }
    }
}

/// [`drop_dead_letter`] in its transaction.
async fn drop_in(conn: &mut PgConnection, id: &str) -> Result<DropOutcome, sqlx::Error> {
    let row = sqlx::query("SELECT state FROM events WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(DropOutcome::NotFound);
    };
    match state_column::<EventState>(&row, 0)? {
        EventState::Failed | EventState::Parked => {
            sqlx::query("UPDATE events SET state = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(EventState::Dropped.as_str())
                .bind(crate::timestamp::now())
                .execute(&mut *conn)
                .await?;
            Ok(DropOutcome::Dropped)
        }
        other @ (EventState::Accepted
        | EventState::Applied
        | EventState::Filtered
        | EventState::Superseded
        | EventState::Dropped) => Ok(DropOutcome::NotDeadLetter(other)),
    }
}

/// Puts a final event back into the backlog, with the rules of the SQLite journal's
/// `requeue`: without `force` only dead letters (failed, parked, dropped) are requeued, and
/// routes already applied stay applied; with `force` every route is applied again. With a
/// [`RouteReplay`] only that route is tried again (see there). The event's row is locked for
/// the transaction (see the module's text), and the agent holding its partition is notified.
pub async fn requeue(
    db: &PgDb,
    id: &str,
    route: Option<&RouteReplay>,
    force: bool,
) -> Result<Requeue, PgError> {
    const DOING: &str = "requeuing an event";
    let mut retried = false;
    loop {
        let mut tx = db.pool().begin().await.map_err(|e| db.error(e, DOING))?;
        let result = requeue_in(&mut tx, id, route, force).await;
        if let Some(outcome) = settle(db, tx, result, DOING, &mut retried).await {
            return outcome;
        }
    }
}

/// [`requeue`] in its transaction.
async fn requeue_in(
    conn: &mut PgConnection,
    id: &str,
    route: Option<&RouteReplay>,
    force: bool,
) -> Result<Requeue, sqlx::Error> {
    let row = sqlx::query("SELECT seq, subject, state FROM events WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(Requeue::NotFound);
    };
    let locked = Locked {
        seq: row.try_get(0)?,
        subject: row.try_get(1)?,
        state: state_column(&row, 2)?,
    };
    requeue_locked(conn, locked, route, force).await
}

/// An event whose row this transaction has locked.
struct Locked {
    seq: i64,
    subject: String,
    state: EventState,
}

/// [`requeue`]'s rules, for an event locked in this transaction.
async fn requeue_locked(
    conn: &mut PgConnection,
    event: Locked,
    route: Option<&RouteReplay>,
    force: bool,
) -> Result<Requeue, sqlx::Error> {
    if event.state == EventState::Accepted {
        return Ok(Requeue::Pending);
    }
    match route {
        Some(replay) => {
            let known = deliveries_on(&mut *conn, event.seq).await?;
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
            sqlx::query("DELETE FROM deliveries WHERE event_seq = $1 AND route = $2")
                .bind(event.seq)
                .bind(&replay.route)
                .execute(&mut *conn)
                .await?;
        }
        None => {
            if !event.state.is_dead_letter() && !force {
                return Ok(Requeue::NeedsForce { state: event.state });
            }
            if force {
                sqlx::query("DELETE FROM deliveries WHERE event_seq = $1")
                    .bind(event.seq)
                    .execute(&mut *conn)
                    .await?;
            } else {
                forget_unapplied(&mut *conn, &[event.seq]).await?;
            }
        }
    }
    back_to_backlog(conn, &[event.seq]).await?;
    Ok(Requeue::Queued {
        seq: event.seq,
        subject: event.subject,
    })
}

/// Forgets the deliveries of `seqs` that were not applied (or filtered), to be tried again.
async fn forget_unapplied(conn: &mut PgConnection, seqs: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM deliveries WHERE event_seq = ANY($1) AND state NOT IN ($2, $3)")
        .bind(seqs)
        .bind(DeliveryState::Applied.as_str())
        .bind(DeliveryState::Filtered.as_str())
        .execute(conn)
        .await
        .map(|_| ())
}

/// Puts the (locked) events `seqs` back in the backlog and, at commit, wakes the agents holding
/// their partitions (the payload [`super::wake`] parses: the schema and the partitions).
async fn back_to_backlog(conn: &mut PgConnection, seqs: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH requeued AS ( \
           UPDATE events SET state = $2, error = NULL, finished_at = NULL, updated_at = $3 \
           WHERE seq = ANY($1) RETURNING part \
         ) \
         SELECT pg_notify('ess_journal', current_schema() || ':' || \
           (SELECT string_agg(DISTINCT part::text, ',') FROM requeued)) \
         WHERE EXISTS (SELECT 1 FROM requeued)",
    )
    .bind(seqs)
    .bind(EventState::Accepted.as_str())
    .bind(crate::timestamp::now())
    .execute(conn)
    .await
    .map(|_| ())
}

/// Puts back in the backlog the dead letters (failed and parked events, not dropped ones) that
/// `filter` selects (its states are ignored), newest first, at most `max`, in one transaction:
/// as a retry of each, routes already applied stay applied. The selected rows are locked in
/// seq order (two bulk retries at once wait for each other rather than deadlock), and only
/// those still failed or parked once locked are requeued.
pub async fn requeue_dead_letters(
    db: &PgDb,
    filter: &EventFilter,
    max: u32,
) -> Result<Vec<Requeued>, PgError> {
    let filter = EventFilter {
        states: vec![EventState::Failed, EventState::Parked],
        ..filter.clone()
    };
    const DOING: &str = "requeuing dead letters";
    let mut retried = false;
    loop {
        let mut tx = db.pool().begin().await.map_err(|e| db.error(e, DOING))?;
        let result = requeue_dead_letters_in(&mut tx, &filter, max).await;
        if let Some(outcome) = settle(db, tx, result, DOING, &mut retried).await {
            return outcome;
        }
    }
}

/// [`requeue_dead_letters`] in its transaction.
async fn requeue_dead_letters_in(
    conn: &mut PgConnection,
    filter: &EventFilter,
    max: u32,
) -> Result<Vec<Requeued>, sqlx::Error> {
    let selected = list_on(&mut *conn, filter, None, max).await?;
    if selected.is_empty() {
        return Ok(Vec::new());
    }
    let seqs: Vec<i64> = selected.iter().map(|e| e.seq).collect();
    let still: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM events WHERE seq = ANY($1) AND state IN ($2, $3) \
         ORDER BY seq FOR UPDATE",
    )
    .bind(&seqs)
    .bind(EventState::Failed.as_str())
    .bind(EventState::Parked.as_str())
    .fetch_all(&mut *conn)
    .await?;
    if still.is_empty() {
        return Ok(Vec::new());
    }
    forget_unapplied(&mut *conn, &still).await?;
    back_to_backlog(&mut *conn, &still).await?;
    let still: std::collections::BTreeSet<i64> = still.into_iter().collect();
    Ok(selected
        .into_iter()
        .filter(|e| still.contains(&e.seq))
        .map(|e| Requeued {
            seq: e.seq,
            id: e.id,
            subject: e.subject,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::append::{AppendOutcome, Appender};
    use super::super::claim::{claim_reports, deliveries, finish, report_sent, set_deliveries};
    use super::super::lease::Lessee;
    use super::super::testdb::{TestSchema, eventually, new_event};
    use super::super::wake::{Wakeup, Wakeups};
    use super::super::{Fence, partition_of};
    use super::*;
    use crate::journal::{Attempt, DeliveryUpdate, Finish, KEPT_ATTEMPTS, MAX_OUTPUT_BYTES};

    /// A journal in a schema of the test's own, an appender, and an agent holding every
    /// partition.
    struct Journal {
        _schema: TestSchema,
        db: PgDb,
        appender: Appender,
        lessee: Lessee,
    }

    impl Journal {
        async fn new() -> Journal {
            let schema = TestSchema::create().await;
            let db = schema.db().await;
            let appender = Appender::start(db.clone(), 16, "a".into(), 64);
            let lessee = Lessee::new(db.clone(), "a".into(), schema.options().lease, 16);
            lessee.round().await.unwrap();
            Journal {
                _schema: schema,
                db,
                appender,
                lessee,
            }
        }

        /// Appends `event`; its seq.
        async fn append(&self, event: crate::journal::NewEvent) -> i64 {
            match self.appender.append(event).await.unwrap() {
                AppendOutcome::Accepted { seq, .. } => seq,
                other => panic!("{other:?}"),
            }
        }

        /// The fence of `subject`'s partition (held by this journal's agent).
        fn fence(&self, subject: &str) -> Fence {
            self.lessee
                .fence(partition_of(subject, 16))
                .expect("the agent holds every partition")
        }

        async fn seq(&self, id: &str) -> i64 {
            sqlx::query_scalar("SELECT seq FROM events WHERE id = $1")
                .bind(id)
                .fetch_one(self.db.pool())
                .await
                .unwrap()
        }

        async fn state(&self, id: &str) -> EventState {
            get(&self.db, id).await.unwrap().unwrap().state
        }

        async fn execute(&self, sql: &'static str) {
            sqlx::query(sql).execute(self.db.pool()).await.unwrap();
        }
    }

    /// A delivery update for route `route` of event `seq` with its attempt.
    fn tried(
        seq: i64,
        route: &str,
        attempts: u32,
        outcome: DeliveryState,
        duration_ms: u64,
        output: Option<&str>,
    ) -> DeliveryUpdate {
        let error = (outcome == DeliveryState::Failed).then(|| format!("refused {attempts}"));
        DeliveryUpdate {
            seq,
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

    fn finished(seq: i64, id: &str, state: EventState) -> Finish {
        Finish {
            seq,
            state,
            error: (state == EventState::Failed).then(|| "it failed".to_owned()),
            subject_revision: None,
            report: Some((format!("report-{id}"), format!("{{\"id\":\"{id}\"}}"))),
            event_id: id.into(),
        }
    }

    fn numbers(history: &RouteHistory) -> Vec<u32> {
        history.attempts.iter().map(|a| a.attempt).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_s_detail_has_its_receipt_attempts_output_and_reports() {
        let j = Journal::new().await;
        let mut event = new_event("e", "S");
        event.receipt = Some(r#"{"methods":["hmac"],"signature":"v1"}"#.into());
        let seq = j.append(event).await;
        let fence = j.fence("S");
        let set = |update| {
            let (db, fence) = (j.db.clone(), fence.clone());
            async move { set_deliveries(&db, &fence, &[update]).await.unwrap() }
        };
        set(tried(seq, "a", 1, DeliveryState::Failed, 11, None)).await;
        set(tried(seq, "a", 2, DeliveryState::Failed, 22, None)).await;
        let last = vec![
            tried(seq, "a", 3, DeliveryState::Applied, 33, Some(r#"{"n":3}"#)),
            tried(seq, "b", 0, DeliveryState::Filtered, 4, None),
        ];
        let done = finished(seq, "e", EventState::Applied);
        assert!(finish(&j.db, &fence, &last, &done).await.unwrap());

        let detail = get_detail(&j.db, "e").await.unwrap().unwrap();
        assert_eq!(detail.seq, seq);
        assert_eq!(detail.record.state, EventState::Applied);
        assert!(detail.record.finished_at.is_some());
        assert_eq!(
            detail.receipt.as_deref(),
            Some(r#"{"methods":["hmac"],"signature":"v1"}"#)
        );
        assert_eq!(detail.raw_body, br#"{"id":"e"}"#);
        assert_eq!(detail.envelope, r#"{"id":"e","subject":"S"}"#);
        let routes: Vec<(&str, DeliveryState)> = detail
            .deliveries
            .iter()
            .map(|d| (d.route.as_str(), d.state))
            .collect();
        assert_eq!(
            routes,
            [
                ("a", DeliveryState::Applied),
                ("b", DeliveryState::Filtered)
            ]
        );
        let a = &detail.history["a"];
        assert_eq!(numbers(a), [1, 2, 3]);
        let durations: Vec<u64> = a.attempts.iter().map(|x| x.duration_ms).collect();
        assert_eq!(durations, [11, 22, 33]);
        use DeliveryState::{Applied, Failed, Filtered};
        let outcomes: Vec<DeliveryState> = a.attempts.iter().map(|x| x.outcome).collect();
        assert_eq!(outcomes, [Failed, Failed, Applied]);
        assert_eq!(a.attempts[0].error.as_deref(), Some("refused 1"));
        assert_eq!(a.attempts[2].error, None);
        let output = a.output.as_ref().unwrap();
        assert_eq!((output.text.as_str(), output.bytes), (r#"{"n":3}"#, 7));
        assert!(!output.truncated);
        // A filtered route's attempt is numbered 1 although its delivery counts none.
        assert_eq!(numbers(&detail.history["b"]), [1]);
        assert_eq!(detail.history["b"].attempts[0].outcome, Filtered);
        assert_eq!(detail.history["b"].output, None);
        // The deliveries carry the event's type, for the listing's route and type filter.
        let types: Vec<Option<String>> = sqlx::query_scalar("SELECT type FROM deliveries")
            .fetch_all(j.db.pool())
            .await
            .unwrap();
        assert_eq!(
            types,
            [Some("rule.updated".into()), Some("rule.updated".into())]
        );
        // The status report waits in the outbox; once sent, it is among the sent ones.
        let pending = detail.report.expect("a report waits");
        assert_eq!(pending.message_id, "report-e");
        assert!(detail.reports_sent.is_empty());
        let claimed = claim_reports(&j.db, "a", i64::MAX, 10, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(report_sent(&j.db, "a", claimed[0].seq).await.unwrap());
        let detail = get_detail(&j.db, "e").await.unwrap().unwrap();
        assert!(detail.report.is_none());
        assert_eq!(detail.reports_sent.len(), 1);
        assert_eq!(
            (
                detail.reports_sent[0].message_id.as_str(),
                detail.reports_sent[0].attempts
            ),
            ("report-e", 1)
        );

        // A forced replay forgets the deliveries; the history goes on numbering, and only the
        // latest applied attempt keeps an output.
        let replayed = requeue(&j.db, "e", None, true).await.unwrap();
        assert_eq!(
            replayed,
            Requeue::Queued {
                seq,
                subject: "S".into()
            }
        );
        assert!(deliveries(&j.db, seq).await.unwrap().is_empty());
        set(tried(seq, "a", 1, Applied, 5, Some("[4]"))).await;
        let detail = get_detail(&j.db, "e").await.unwrap().unwrap();
        let a = &detail.history["a"];
        assert_eq!(numbers(a), [1, 2, 3, 4]);
        assert_eq!(a.output.as_ref().unwrap().text, "[4]");
        let outputs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM attempts WHERE output IS NOT NULL")
                .fetch_one(j.db.pool())
                .await
                .unwrap();
        assert_eq!(outputs, 1);

        // An output longer than the cap is kept cut, marked truncated, with its whole length.
        let long = format!("\"{}\"", "x".repeat(MAX_OUTPUT_BYTES));
        set(tried(seq, "a", 2, Applied, 5, Some(&long))).await;
        let detail = get_detail(&j.db, "e").await.unwrap().unwrap();
        let output = detail.history["a"].output.clone().unwrap();
        assert!(output.truncated);
        assert_eq!(output.bytes, long.len() as u64);
        assert_eq!(output.text.len(), MAX_OUTPUT_BYTES);

        assert!(get_detail(&j.db, "nope").await.unwrap().is_none());
        assert!(get(&j.db, "nope").await.unwrap().is_none());
        j.appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_route_retried_past_the_cap_keeps_its_first_and_latest_attempts() {
        let j = Journal::new().await;
        let seq = j.append(new_event("e", "S")).await;
        let fence = j.fence("S");
        let total = KEPT_ATTEMPTS + 30;
        for n in 1..=total {
            let update = tried(seq, "a", n, DeliveryState::Failed, 1, None);
            set_deliveries(&j.db, &fence, &[update]).await.unwrap();
        }
        // Applied at last, through finish: the cap holds there too.
        let update = tried(seq, "a", total + 1, DeliveryState::Applied, 1, Some("{}"));
        let done = finished(seq, "e", EventState::Applied);
        assert!(finish(&j.db, &fence, &[update], &done).await.unwrap());
        let history = &get_detail(&j.db, "e").await.unwrap().unwrap().history["a"];
        let kept = numbers(history);
        assert_eq!(kept.len(), KEPT_ATTEMPTS as usize);
        assert_eq!(kept[0], 1);
        assert_eq!(kept[1], total + 1 - KEPT_ATTEMPTS + 2);
        assert_eq!(*kept.last().unwrap(), total + 1);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(history.output.as_ref().unwrap().text, "{}");
        // The delivery still counts every attempt.
        assert_eq!(deliveries(&j.db, seq).await.unwrap()[0].attempts, total + 1);
        j.appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempts_of_an_event_outside_the_fenced_partition_are_not_written() {
        let j = Journal::new().await;
        let seq = j.append(new_event("e", "S")).await;
        let other = (0..100)
            .map(|i| format!("T{i}"))
            .find(|s| partition_of(s, 16) != partition_of("S", 16))
            .unwrap();
        let update = tried(seq, "a", 1, DeliveryState::Failed, 1, None);
        set_deliveries(&j.db, &j.fence(&other), &[update])
            .await
            .unwrap();
        let detail = get_detail(&j.db, "e").await.unwrap().unwrap();
        assert!(detail.deliveries.is_empty() && detail.history.is_empty());
        j.appender.close().await;
    }

    fn ids(events: &[EventSummary]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    /// Twelve events: e0..e11, types cycling rule.a, rule.b, other[1]; subjects S0/S1; e3 and
    /// e7 failed, delivered through route r1; e{i} received at minute i of the hour.
    async fn twelve() -> Journal {
        let j = Journal::new().await;
        let types = ["rule.a", "rule.b", "other[1]"];
        for i in 0..12 {
            let mut event = new_event(&format!("e{i}"), &format!("S{}", i % 2));
            event.event_type = types[i % 3].into();
            j.append(event).await;
        }
        for id in ["e3", "e7"] {
            let seq = j.seq(id).await;
            let update = DeliveryUpdate {
                seq,
                route: "r1".into(),
                sink: "s".into(),
                state: DeliveryState::Failed,
                attempts: 1,
                next_attempt_ms: None,
                last_error: Some("refused".into()),
                attempt: None,
            };
            let done = finished(seq, id, EventState::Failed);
            assert!(
                finish(&j.db, &j.fence("S1"), &[update], &done)
                    .await
                    .unwrap()
            );
        }
        j.execute(
            "UPDATE events SET received_at = \
             format('2026-12-07T09:%s:00.000Z', lpad(substr(id, 2), 2, '0'))",
        )
        .await;
        j
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn filters_combine_and_pages_follow_each_other_newest_first() {
        let j = twelve().await;
        let list = async |filter: EventFilter, before: Option<i64>, limit: u32| {
            list_events(&j.db, &filter, before, limit).await.unwrap()
        };
        let all = list(EventFilter::default(), None, 100).await;
        assert_eq!(all.len(), 12);
        assert_eq!(all[0].id, "e11");
        assert!(all.windows(2).all(|w| w[0].seq > w[1].seq));
        assert_eq!(all[4].state, EventState::Failed);
        assert_eq!(all[4].error.as_deref(), Some("it failed"));

        // Pages of 5 below the last seq of the page before: every event once, in order.
        let mut paged = Vec::new();
        let mut cursor = None;
        loop {
            let page = list(EventFilter::default(), cursor, 5).await;
            if page.is_empty() {
                break;
            }
            cursor = page.last().map(|e| e.seq);
            paged.extend(page);
        }
        assert_eq!(ids(&paged), ids(&all));

        let of_type = |t: &str| EventFilter {
            event_type: Some(t.into()),
            ..EventFilter::default()
        };
        assert_eq!(
            ids(&list(of_type("rule.a"), None, 100).await),
            ["e9", "e6", "e3", "e0"]
        );
        // A glob over several types is merged newest first, and paged like any listing.
        let rules = list(of_type("rule.*"), None, 100).await;
        assert_eq!(
            ids(&rules),
            ["e10", "e9", "e7", "e6", "e4", "e3", "e1", "e0"]
        );
        let below = rules[2].seq;
        assert_eq!(
            ids(&list(of_type("rule.*"), Some(below), 2).await),
            ["e6", "e4"]
        );
        // `[` is itself, as in a route's pattern; `?` is one character; `_` and `%` are
        // themselves, not LIKE's.
        assert_eq!(list(of_type("other[?]"), None, 100).await.len(), 4);
        assert_eq!(list(of_type("other[1]"), None, 100).await.len(), 4);
        assert!(list(of_type("nothing.*"), None, 100).await.is_empty());
        assert!(list(of_type("rule_*"), None, 100).await.is_empty());
        assert!(list(of_type("rule%"), None, 100).await.is_empty());
        assert!(list(of_type("rule.?"), None, 100).await.len() == 8);

        let failed = EventFilter {
            states: vec![EventState::Failed],
            ..EventFilter::default()
        };
        assert_eq!(ids(&list(failed.clone(), None, 100).await), ["e7", "e3"]);
        let failed_rule_b = EventFilter {
            event_type: Some("rule.b".into()),
            ..failed
        };
        assert_eq!(ids(&list(failed_rule_b, None, 100).await), ["e7"]);
        // Several states and a glob: one walk per state and type, merged newest first.
        let settled_rules = EventFilter {
            states: vec![EventState::Failed, EventState::Accepted],
            event_type: Some("rule.*".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            ids(&list(settled_rules.clone(), None, 100).await),
            ["e10", "e9", "e7", "e6", "e4", "e3", "e1", "e0"]
        );
        assert_eq!(
            ids(&list(settled_rules.clone(), None, 3).await),
            ["e10", "e9", "e7"]
        );
        let below = Some(list(settled_rules.clone(), None, 3).await[2].seq);
        assert_eq!(
            ids(&list(settled_rules, below, 3).await),
            ["e6", "e4", "e3"]
        );
        // A subject and a route; a subject, states and a glob (tested row by row).
        let subject = EventFilter {
            subject: Some("S1".into()),
            route: Some("r1".into()),
            ..EventFilter::default()
        };
        assert_eq!(ids(&list(subject, None, 100).await), ["e7", "e3"]);
        let failed_rules_of_s1 = EventFilter {
            states: vec![EventState::Failed],
            subject: Some("S1".into()),
            event_type: Some("rule.*".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            ids(&list(failed_rules_of_s1, None, 100).await),
            ["e7", "e3"]
        );
        // A route alone, a route with types, a route nothing went through.
        let through_r1 = |t: Option<&str>| EventFilter {
            route: Some("r1".into()),
            event_type: t.map(String::from),
            ..EventFilter::default()
        };
        assert_eq!(ids(&list(through_r1(None), None, 100).await), ["e7", "e3"]);
        assert_eq!(ids(&list(through_r1(None), None, 1).await), ["e7"]);
        assert_eq!(
            ids(&list(through_r1(Some("rule.a")), None, 100).await),
            ["e3"]
        );
        assert_eq!(
            ids(&list(through_r1(Some("rule.*")), None, 100).await),
            ["e7", "e3"]
        );
        assert!(list(through_r1(Some("other*")), None, 100).await.is_empty());
        let no_route = EventFilter {
            route: Some("r2".into()),
            event_type: Some("rule.*".into()),
            ..EventFilter::default()
        };
        assert!(list(no_route, None, 100).await.is_empty());

        // since is inclusive, until exclusive.
        let window = EventFilter {
            since: Some("2026-12-07T09:04:00.000Z".into()),
            until: Some("2026-12-07T09:07:00.000Z".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            ids(&list(window.clone(), None, 100).await),
            ["e6", "e5", "e4"]
        );
        // An event received by an agent whose clock is minutes behind is in the window its
        // time says, although its seq is far from the window's.
        j.execute("UPDATE events SET received_at = '2026-12-07T09:05:30.000Z' WHERE id = 'e11'")
            .await;
        j.execute("UPDATE events SET received_at = '2026-12-07T09:15:00.000Z' WHERE id = 'e1'")
            .await;
        assert_eq!(
            ids(&list(window.clone(), None, 100).await),
            ["e11", "e6", "e5", "e4"]
        );
        let since = EventFilter {
            until: None,
            ..window
        };
        assert_eq!(
            ids(&list(since, None, 100).await),
            ["e11", "e10", "e9", "e8", "e7", "e6", "e5", "e4", "e1"]
        );
        j.appender.close().await;
    }

    /// A window is turned into a seq range, widened by the clock slack: an event received by
    /// an agent whose clock is a few minutes behind is found, although an event after it in
    /// seq order was received after the window's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_time_window_finds_the_events_of_clocks_within_the_slack() {
        let j = twelve().await;
        // e{i} received at hour i.
        j.execute(
            "UPDATE events SET received_at = \
             format('2026-12-07T%s:00:00.000Z', lpad(substr(id, 2), 2, '0'))",
        )
        .await;
        let window = EventFilter {
            since: Some("2026-12-07T04:00:00.000Z".into()),
            until: Some("2026-12-07T07:00:00.000Z".into()),
            ..EventFilter::default()
        };
        let list = async |filter: &EventFilter, before: Option<i64>, limit: u32| {
            let events = list_events(&j.db, filter, before, limit).await.unwrap();
            ids(&events)
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(list(&window, None, 100).await, ["e6", "e5", "e4"]);
        let (above, below) = {
            let mut conn = j.db.pool().acquire().await.unwrap();
            window_seqs(&mut conn, &window).await.unwrap()
        };
        assert_eq!(
            (above, below),
            (Some(j.seq("e3").await), Some(j.seq("e8").await)),
            "the window's seq range is found through the receive times"
        );
        // e8's agent is 5 minutes past the window's end when e9's, 3 minutes behind, accepts
        // an event inside it.
        j.execute("UPDATE events SET received_at = '2026-12-07T07:05:00.000Z' WHERE id = 'e8'")
            .await;
        j.execute("UPDATE events SET received_at = '2026-12-07T06:57:00.000Z' WHERE id = 'e9'")
            .await;
        assert_eq!(list(&window, None, 100).await, ["e9", "e6", "e5", "e4"]);
        assert_eq!(list(&window, None, 2).await, ["e9", "e6"]);
        let below = Some(j.seq("e6").await);
        assert_eq!(list(&window, below, 2).await, ["e5", "e4"]);
        let since = EventFilter {
            until: None,
            ..window
        };
        assert_eq!(
            list(&since, None, 100).await,
            ["e11", "e10", "e9", "e8", "e7", "e6", "e5", "e4"]
        );
        j.appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_counted_by_minute_and_state_from_a_time_on() {
        let j = twelve().await;
        let counts = received_per_minute(&j.db, "2026-12-07T09:06:00.000Z")
            .await
            .unwrap();
        let expected: Vec<(String, EventState, u64)> = (6..12)
            .map(|m| {
                let state = if m == 7 {
                    EventState::Failed
                } else {
                    EventState::Accepted
                };
                (format!("2026-12-07T09:{m:02}"), state, 1)
            })
            .collect();
        assert_eq!(counts, expected);
        j.execute("UPDATE events SET received_at = '2026-12-07T09:11:30.000Z' WHERE id = 'e3'")
            .await;
        j.execute("UPDATE events SET received_at = '2026-12-07T09:11:40.000Z' WHERE id = 'e5'")
            .await;
        let last = received_per_minute(&j.db, "2026-12-07T09:11:00.000Z")
            .await
            .unwrap();
        assert_eq!(
            last,
            [
                ("2026-12-07T09:11".to_owned(), EventState::Accepted, 2),
                ("2026-12-07T09:11".to_owned(), EventState::Failed, 1)
            ]
        );
        j.appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letters_are_listed_counted_and_dropped() {
        let j = twelve().await;
        let listed = dead_letters(&j.db, 0, 100).await.unwrap();
        let listed_ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(listed_ids, ["e3", "e7"]);
        assert_eq!(
            (listed[0].state.as_str(), listed[0].error.as_deref()),
            ("failed", Some("it failed"))
        );
        let after = dead_letters(&j.db, listed[0].seq, 100).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].id, "e7");
        assert_eq!(dead_letters(&j.db, 0, 1).await.unwrap().len(), 1);
        assert_eq!(dead_letter_count(&j.db).await.unwrap(), 2);
        assert_eq!(backlog(&j.db).await.unwrap(), 10);
        assert_eq!(outbox_len(&j.db).await.unwrap(), 2);
        assert_eq!(outbox_next_due(&j.db).await.unwrap(), Some(0));
        // Reports claimed (here by this agent) are due again when their claim expires.
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let claimed = claim_reports(&j.db, "a", i64::MAX, 10, Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2);
        let due = outbox_next_due(&j.db).await.unwrap().unwrap();
        assert!(
            due > now_ms + 500_000 && due < now_ms + 700_000,
            "{due} vs {now_ms}"
        );
        assert_eq!(outbox_len(&j.db).await.unwrap(), 2);

        assert_eq!(
            drop_dead_letter(&j.db, "e3").await.unwrap(),
            DropOutcome::Dropped
        );
        assert_eq!(j.state("e3").await, EventState::Dropped);
        assert_eq!(
            drop_dead_letter(&j.db, "e3").await.unwrap(),
            DropOutcome::NotDeadLetter(EventState::Dropped)
        );
        assert_eq!(
            drop_dead_letter(&j.db, "e0").await.unwrap(),
            DropOutcome::NotDeadLetter(EventState::Accepted)
        );
        assert_eq!(
            drop_dead_letter(&j.db, "nope").await.unwrap(),
            DropOutcome::NotFound
        );
        assert_eq!(dead_letter_count(&j.db).await.unwrap(), 1);
        let listed = dead_letters(&j.db, 0, 100).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, "e7");
        j.appender.close().await;
    }

    /// Waits for the next wake-up of `wakeups`, for at most 10 s.
    async fn woken(wakeups: &mut Wakeups) -> Wakeup {
        tokio::time::timeout(Duration::from_secs(10), wakeups.next())
            .await
            .expect("woken within 10 s")
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_event_is_requeued_keeping_its_applied_routes_and_wakes_its_partition() {
        let j = Journal::new().await;
        let seq = j.append(new_event("e", "S")).await;
        let applied = j.append(new_event("done", "S")).await;
        let fence = j.fence("S");
        let updates = [
            tried(seq, "a", 1, DeliveryState::Applied, 1, Some("{}")),
            tried(seq, "b", 3, DeliveryState::Failed, 1, None),
        ];
        let done = finished(seq, "e", EventState::Failed);
        assert!(finish(&j.db, &fence, &updates, &done).await.unwrap());
        let done = finished(applied, "done", EventState::Applied);
        assert!(finish(&j.db, &fence, &[], &done).await.unwrap());
        let mut wakeups = Wakeups::listen(&j.db).await.unwrap();

        assert_eq!(
            requeue(&j.db, "nope", None, false).await.unwrap(),
            Requeue::NotFound
        );
        assert_eq!(
            requeue(&j.db, "done", None, false).await.unwrap(),
            Requeue::NeedsForce {
                state: EventState::Applied
            }
        );
        let queued = requeue(&j.db, "e", None, false).await.unwrap();
        assert_eq!(
            queued,
            Requeue::Queued {
                seq,
                subject: "S".into()
            }
        );
        let record = get(&j.db, "e").await.unwrap().unwrap();
        assert_eq!(record.state, EventState::Accepted);
        assert_eq!((record.error, record.finished_at), (None, None));
        // The applied route stays applied; the failed one is forgotten, to be tried again.
        let kept: Vec<String> = deliveries(&j.db, seq)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.route)
            .collect();
        assert_eq!(kept, ["a"]);
        // The history outlives the replay.
        let detail = get_detail(&j.db, "e").await.unwrap().unwrap();
        assert_eq!(numbers(&detail.history["b"]), [3]);
        assert_eq!(
            woken(&mut wakeups).await,
            Wakeup::Parts(vec![partition_of("S", 16)])
        );
        assert_eq!(backlog(&j.db).await.unwrap(), 1);
        // Being in the backlog, it is not requeued again.
        assert_eq!(
            requeue(&j.db, "e", None, true).await.unwrap(),
            Requeue::Pending
        );
        j.appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_through_one_route_forgets_only_that_route() {
        let j = Journal::new().await;
        let seq = j.append(new_event("e", "S")).await;
        let fence = j.fence("S");
        let updates = [
            tried(seq, "a", 1, DeliveryState::Applied, 1, Some("{}")),
            tried(seq, "b", 1, DeliveryState::Failed, 1, None),
        ];
        let done = finished(seq, "e", EventState::Failed);
        assert!(finish(&j.db, &fence, &updates, &done).await.unwrap());
        let replay = |route: &str, others: &[&str]| RouteReplay {
            route: route.into(),
            others: others.iter().map(|o| o.to_string()).collect(),
        };
        // A route added since would be applied too: refused.
        assert_eq!(
            requeue(&j.db, "e", Some(&replay("b", &["a", "c"])), false)
                .await
                .unwrap(),
            Requeue::OthersUntried {
                routes: vec!["c".into()]
            }
        );
        // An applied route is replayed only with force.
        assert_eq!(
            requeue(&j.db, "e", Some(&replay("a", &["b"])), false)
                .await
                .unwrap(),
            Requeue::RouteNeedsForce {
                state: DeliveryState::Applied
            }
        );
        assert_eq!(j.state("e").await, EventState::Failed);
        assert!(matches!(
            requeue(&j.db, "e", Some(&replay("b", &["a"])), false)
                .await
                .unwrap(),
            Requeue::Queued { .. }
        ));
        let kept: Vec<(String, DeliveryState)> = deliveries(&j.db, seq)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.route, d.state))
            .collect();
        assert_eq!(kept, [("a".to_owned(), DeliveryState::Applied)]);
        assert_eq!(j.state("e").await, EventState::Accepted);

        // Applied at last; a forced replay through the applied route forgets it alone.
        let done = finished(seq, "e", EventState::Applied);
        let update = tried(seq, "b", 2, DeliveryState::Applied, 1, Some("{}"));
        assert!(finish(&j.db, &fence, &[update], &done).await.unwrap());
        assert!(matches!(
            requeue(&j.db, "e", Some(&replay("a", &["b"])), true)
                .await
                .unwrap(),
            Requeue::Queued { .. }
        ));
        let kept: Vec<String> = deliveries(&j.db, seq)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.route)
            .collect();
        assert_eq!(kept, ["b"]);
        j.appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bulk_retry_requeues_only_the_dead_letters_selected() {
        let j = twelve().await;
        let mut wakeups = Wakeups::listen(&j.db).await.unwrap();
        let filter = EventFilter {
            event_type: Some("rule.b".into()),
            // Ignored: only dead letters are retried.
            states: vec![EventState::Accepted],
            ..EventFilter::default()
        };
        let requeued = requeue_dead_letters(&j.db, &filter, 10).await.unwrap();
        let e7 = j.seq("e7").await;
        assert_eq!(
            requeued,
            [Requeued {
                seq: e7,
                id: "e7".into(),
                subject: "S1".into()
            }]
        );
        assert_eq!(j.state("e7").await, EventState::Accepted);
        assert_eq!(j.state("e3").await, EventState::Failed);
        // The failed delivery is forgotten, to be tried again.
        assert!(deliveries(&j.db, e7).await.unwrap().is_empty());
        assert_eq!(
            woken(&mut wakeups).await,
            Wakeup::Parts(vec![partition_of("S1", 16)])
        );
        // A dropped dead letter is not retried; `max` bounds the rest.
        drop_dead_letter(&j.db, "e3").await.unwrap();
        assert!(
            requeue_dead_letters(&j.db, &EventFilter::default(), 10)
                .await
                .unwrap()
                .is_empty()
        );
        j.execute("UPDATE events SET state = 'parked' WHERE id IN ('e0', 'e1', 'e2')")
            .await;
        let requeued = requeue_dead_letters(&j.db, &EventFilter::default(), 2)
            .await
            .unwrap();
        let requeued: Vec<&str> = requeued.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(requeued, ["e2", "e1"]);
        j.appender.close().await;
    }

    /// A replay waits for a final state being written to the same event, and then sees it: the
    /// two are serialised by the event's row lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_waits_for_a_final_state_under_way_and_then_requeues_it() {
        let j = Journal::new().await;
        let seq = j.append(new_event("e", "S")).await;
        // The lease holder's final state, under way: its transaction has written and not yet
        // committed.
        let mut finishing = j.db.pool().begin().await.unwrap();
        let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *finishing)
            .await
            .unwrap();
        sqlx::query("UPDATE events SET state = 'failed', finished_at = 'x' WHERE seq = $1")
            .bind(seq)
            .execute(&mut *finishing)
            .await
            .unwrap();
        let replay = tokio::spawn({
            let db = j.db.clone();
            async move { requeue(&db, "e", None, false).await }
        });
        let blocked = eventually(Duration::from_secs(10), || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(holder)
            .fetch_one(j.db.pool())
            .await
            .unwrap();
            waiting > 0
        })
        .await;
        assert!(
            blocked,
            "the replay waits for the final state's transaction"
        );
        assert!(!replay.is_finished());
        finishing.commit().await.unwrap();
        let outcome = replay.await.unwrap().unwrap();
        assert_eq!(
            outcome,
            Requeue::Queued {
                seq,
                subject: "S".into()
            }
        );
        assert_eq!(j.state("e").await, EventState::Accepted);
        j.appender.close().await;
    }

    /// The admin API runs these on the runtime's worker threads, from tasks that move between
    /// them: each future must be `Send`. (Checked when compiled; nothing is run.)
    #[tokio::test]
    async fn every_operation_s_future_is_send() {
        fn send<T: Send>(_: T) {}
        let db = PgDb::new(&super::super::PgOptions::default()).unwrap();
        let filter = EventFilter::default();
        let replay = RouteReplay {
            route: "r".into(),
            others: Vec::new(),
        };
        send(get(&db, "e"));
        send(get_detail(&db, "e"));
        send(list_events(&db, &filter, None, 10));
        send(received_per_minute(&db, "2026-01-01T00:00:00.000Z"));
        send(dead_letters(&db, 0, 10));
        send(dead_letter_count(&db));
        send(drop_dead_letter(&db, "e"));
        send(requeue(&db, "e", Some(&replay), false));
        send(requeue_dead_letters(&db, &filter, 10));
        send(outbox_len(&db));
        send(outbox_next_due(&db));
        send(backlog(&db));
        // And the lease holder's writes of deliveries and their attempts.
        let fence = Fence {
            part: 0,
            owner: "a".into(),
            epoch: 1,
        };
        send(set_deliveries(&db, &fence, &[]));
        send(finish(
            &db,
            &fence,
            &[],
            &finished(1, "e", EventState::Applied),
        ));
    }

    #[test]
    fn a_glob_becomes_a_like_pattern_with_like_s_own_characters_escaped() {
        assert_eq!(glob_to_like("rule.*"), "rule.%");
        assert_eq!(glob_to_like("a?b"), "a_b");
        assert_eq!(glob_to_like("50%_off\\*"), "50\\%\\_off\\\\%");
        assert_eq!(glob_to_like("other[1]"), "other[1]");
    }
}
