//! The work of the partitions an agent holds: the waiting events, their state changes (fenced
//! by the lease), the status reports (claimed, so each is sent by one agent) and pruning (one
//! agent at a time).
//!
//! Reading the backlog: sequence numbers are taken at insert, but two agents' transactions can
//! commit out of sequence order, so an event can become visible after one with a higher `seq`
//! was read. The backlog is therefore found by state, never by a "seq above the last one seen"
//! cursor: [`waiting`] pages through the non-final events of the partitions held in `seq` order,
//! and a reader starts each pass over from the lowest (`after = 0`) whenever it looks for more
//! work; the `after` of a page is a position within one pass only. An event committed late is
//! found by the next pass. (Within one subject this reorders only deliveries that overlapped in
//! time: an event whose commit returned before the next one was inserted has the lower `seq`
//! and is visible first.)

use std::time::Duration;

use sqlx::Row as _;

use super::append::state_column;
use super::lease::check_fence;
use super::{Fence, PgDb, PgError};
use crate::journal::{DeliveryRecord, DeliveryUpdate, EventState, Finish, OutboxRow, StoredEvent};

/// The advisory lock class of a prune round; the schema's name gives the second key.
const PRUNE_LOCK: i32 = 0x4553_4a02;

/// A waiting (non-final) event: where it is and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub seq: i64,
    pub part: i32,
    pub subject: String,
}

/// Up to `limit` non-final events of the partitions `parts` with `seq` above `after`, in `seq`
/// order: one page of a pass over the backlog (see the module's text for why a pass starts
/// at 0).
pub async fn waiting(
    db: &PgDb,
    parts: &[i32],
    after: i64,
    limit: u32,
) -> Result<Vec<Waiting>, PgError> {
    let rows = sqlx::query(
        "SELECT seq, part, subject FROM events \
         WHERE state = 'accepted' AND part = ANY($1) AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(parts)
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(|e| db.error(e, "reading the backlog"))?;
    rows.iter()
        .map(|r| {
            Ok(Waiting {
                seq: r.try_get(0)?,
                part: r.try_get(1)?,
                subject: r.try_get(2)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| db.error(e, "reading the backlog"))
}

/// One event with its envelope.
pub async fn load_event(db: &PgDb, seq: i64) -> Result<Option<StoredEvent>, PgError> {
    const DOING: &str = "reading an event";
    let row = sqlx::query(
        "SELECT e.seq, id, type, version, subject, revision, source, received_at, state, \
         b.envelope FROM events e JOIN event_bodies b ON b.seq = e.seq WHERE e.seq = $1",
    )
    .bind(seq)
    .fetch_optional(db.pool())
    .await
    .map_err(|e| db.error(e, DOING))?;
    let Some(r) = row else { return Ok(None) };
    let event = (|| {
        Ok::<_, sqlx::Error>(StoredEvent {
            seq: r.try_get(0)?,
            id: r.try_get(1)?,
            event_type: r.try_get(2)?,
            version: r.try_get::<i64, _>(3)? as u64,
            subject: r.try_get(4)?,
            revision: r.try_get::<Option<i64>, _>(5)?.map(|v| v as u64),
            source: r.try_get(6)?,
            received_at_ms: rfc3339_ms(&r.try_get::<String, _>(7)?),
            state: state_column(&r, 8)?,
            envelope: r.try_get(9)?,
        })
    })()
    .map_err(|e| db.error(e, DOING))?;
    Ok(Some(event))
}

/// Unix milliseconds of the RFC 3339 text the journal writes (0 when it does not parse).
fn rfc3339_ms(text: &str) -> i64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// The deliveries of one event, by route.
pub async fn deliveries(db: &PgDb, seq: i64) -> Result<Vec<DeliveryRecord>, PgError> {
    const DOING: &str = "reading an event's deliveries";
    let rows = sqlx::query(
        "SELECT route, sink, state, attempts, next_attempt_ms, last_error, updated_at \
         FROM deliveries WHERE event_seq = $1 ORDER BY route",
    )
    .bind(seq)
    .fetch_all(db.pool())
    .await
    .map_err(|e| db.error(e, DOING))?;
    rows.iter()
        .map(|r| {
            Ok(DeliveryRecord {
                route: r.try_get(0)?,
                sink: r.try_get(1)?,
                state: state_column(r, 2)?,
                attempts: r.try_get::<i32, _>(3)? as u32,
                next_attempt_ms: r.try_get(4)?,
                last_error: r.try_get(5)?,
                updated_at: r.try_get(6)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| db.error(e, DOING))
}

/// The highest revision applied for `subject`.
pub async fn subject_revision(db: &PgDb, subject: &str) -> Result<Option<u64>, PgError> {
    sqlx::query_scalar::<_, i64>("SELECT last_revision FROM subjects WHERE subject = $1")
        .bind(subject)
        .fetch_optional(db.pool())
        .await
        .map(|r| r.map(|v| v as u64))
        .map_err(|e| db.error(e, "reading a subject's revision"))
}

/// Begins a transaction that holds `fence` (see [`check_fence`]) until it ends.
async fn begin_fenced(
    db: &PgDb,
    fence: &Fence,
    doing: &'static str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, PgError> {
    let mut tx = db.pool().begin().await.map_err(|e| db.error(e, doing))?;
    if let Err(e) = check_fence(db, &mut tx, fence, doing).await {
        let _ = tx.rollback().await;
        return Err(e);
    }
    Ok(tx)
}

/// Commits `tx` when `result` is Ok, rolls it back at once otherwise (rather than when its
/// connection is next used: it holds the fence's lock).
async fn end<T>(
    db: &PgDb,
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    result: Result<T, sqlx::Error>,
    doing: &'static str,
) -> Result<T, PgError> {
    match result {
        Ok(value) => {
            tx.commit().await.map_err(|e| db.error(e, doing))?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(db.error(e, doing))
        }
    }
}

/// Upserts delivery states of events of the fence's partition.
async fn write_deliveries(
    conn: &mut sqlx::PgConnection,
    part: i32,
    updates: &[DeliveryUpdate],
    now: &str,
) -> Result<(), sqlx::Error> {
    if updates.is_empty() {
        return Ok(());
    }
    // Only events of the fenced partition: a delivery of another partition's event is not
    // this lease's to write.
    sqlx::query(
        "INSERT INTO deliveries (event_seq, route, sink, state, attempts, next_attempt_ms, \
           last_error, updated_at) \
         SELECT u.seq, u.route, u.sink, u.state, u.attempts, u.next_attempt_ms, u.last_error, $9 \
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[], \
           $7::text[]) AS u(seq, route, sink, state, attempts, next_attempt_ms, last_error) \
         JOIN events e ON e.seq = u.seq AND e.part = $8 \
         ON CONFLICT (event_seq, route) DO UPDATE SET sink = excluded.sink, \
           state = excluded.state, attempts = excluded.attempts, \
           next_attempt_ms = excluded.next_attempt_ms, last_error = excluded.last_error, \
           updated_at = excluded.updated_at",
    )
    .bind(updates.iter().map(|u| u.seq).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.route.as_str()).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.sink.as_str()).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.state.as_str()).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.attempts as i32).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.next_attempt_ms).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.last_error.as_deref()).collect::<Vec<_>>())
    .bind(part)
    .bind(now)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Records delivery states, under the lease of their events' partition.
pub async fn set_deliveries(
    db: &PgDb,
    fence: &Fence,
    updates: &[DeliveryUpdate],
) -> Result<(), PgError> {
    const DOING: &str = "recording delivery states";
    let now = crate::timestamp::now();
    let mut tx = begin_fenced(db, fence, DOING).await?;
    let result = write_deliveries(&mut tx, fence.part, updates, &now).await;
    end(db, tx, result, DOING).await
}

/// Puts an event in its final state with its deliveries' last states, raises its subject's
/// revision and queues its status report, in one transaction under the lease of its partition.
/// False when the event was not waiting (or not of the fence's partition); nothing is written
/// then but the deliveries.
pub async fn finish(
    db: &PgDb,
    fence: &Fence,
    updates: &[DeliveryUpdate],
    finish: &Finish,
) -> Result<bool, PgError> {
    const DOING: &str = "recording an event's final state";
    let now = crate::timestamp::now();
    let mut tx = begin_fenced(db, fence, DOING).await?;
    let result = write_final(&mut tx, fence.part, updates, finish, &now).await;
    end(db, tx, result, DOING).await
}

/// [`finish`]'s writes, in its transaction.
async fn write_final(
    conn: &mut sqlx::PgConnection,
    part: i32,
    updates: &[DeliveryUpdate],
    finish: &Finish,
    now: &str,
) -> Result<bool, sqlx::Error> {
    {
        write_deliveries(&mut *conn, part, updates, now).await?;
        let changed = sqlx::query(
            "UPDATE events SET state = $3, error = $4, finished_at = $5, updated_at = $5 \
             WHERE seq = $1 AND part = $2 AND state = 'accepted'",
        )
        .bind(finish.seq)
        .bind(part)
        .bind(finish.state.as_str())
        .bind(finish.error.as_deref())
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        if let Some((subject, revision)) = &finish.subject_revision {
            sqlx::query(
                "INSERT INTO subjects (subject, last_revision) VALUES ($1, $2) \
                 ON CONFLICT (subject) DO UPDATE SET \
                 last_revision = greatest(subjects.last_revision, excluded.last_revision)",
            )
            .bind(subject)
            .bind(*revision as i64)
            .execute(&mut *conn)
            .await?;
        }
        if let Some((message_id, body)) = &finish.report {
            sqlx::query(
                "INSERT INTO outbox (event_id, message_id, body, created_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&finish.event_id)
            .bind(message_id)
            .bind(body)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
        Ok(true)
    }
}

/// Claims up to `limit` status reports due at `now_ms` for `agent`, oldest first, for `hold`:
/// no other agent gets them until the claim expires (on PostgreSQL's clock) or is given back
/// by [`report_retry`]. Rows another agent is claiming at the same moment are skipped, not
/// waited for.
pub async fn claim_reports(
    db: &PgDb,
    agent: &str,
    now_ms: i64,
    limit: u32,
    hold: Duration,
) -> Result<Vec<OutboxRow>, PgError> {
    const DOING: &str = "claiming status reports";
    let rows = sqlx::query(
        "UPDATE outbox o SET claimed_by = $1, \
           claim_expires_at = now() + make_interval(secs => $4) \
         FROM (SELECT seq FROM outbox \
               WHERE next_attempt_ms <= $2 \
                 AND (claim_expires_at IS NULL OR claim_expires_at < now()) \
               ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) due \
         WHERE o.seq = due.seq \
         RETURNING o.seq, o.event_id, o.message_id, o.body, o.attempts",
    )
    .bind(agent)
    .bind(now_ms)
    .bind(i64::from(limit))
    .bind(hold.as_secs_f64())
    .fetch_all(db.pool())
    .await
    .map_err(|e| db.error(e, DOING))?;
    let mut claimed = rows
        .iter()
        .map(|r| {
            Ok(OutboxRow {
                seq: r.try_get(0)?,
                event_id: r.try_get(1)?,
                message_id: r.try_get(2)?,
                body: r.try_get(3)?,
                attempts: r.try_get::<i32, _>(4)? as u32,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(|e| db.error(e, DOING))?;
    claimed.sort_by_key(|r| r.seq);
    Ok(claimed)
}

/// The hub took the report `seq` that `agent` claimed: it leaves the outbox for the event's
/// sent reports. False when the claim was not (any more) this agent's.
pub async fn report_sent(db: &PgDb, agent: &str, seq: i64) -> Result<bool, PgError> {
    sqlx::query(
        "WITH done AS (DELETE FROM outbox WHERE seq = $1 AND claimed_by = $2 RETURNING *) \
         INSERT INTO reports_sent (seq, event_id, message_id, body, attempts, created_at, \
           sent_at, sent_by) \
         SELECT seq, event_id, message_id, body, attempts + 1, created_at, $3, $2 FROM done \
         ON CONFLICT (seq) DO NOTHING",
    )
    .bind(seq)
    .bind(agent)
    .bind(crate::timestamp::now())
    .execute(db.pool())
    .await
    .map(|r| r.rows_affected() > 0)
    .map_err(|e| db.error(e, "recording a sent status report"))
}

/// The report `seq` that `agent` claimed failed: it is due again at `next_attempt_ms`, for any
/// agent. False when the claim was not (any more) this agent's.
pub async fn report_retry(
    db: &PgDb,
    agent: &str,
    seq: i64,
    attempts: u32,
    next_attempt_ms: i64,
    error: &str,
) -> Result<bool, PgError> {
    sqlx::query(
        "UPDATE outbox SET attempts = $3, next_attempt_ms = $4, last_error = $5, \
           claimed_by = NULL, claim_expires_at = NULL \
         WHERE seq = $1 AND claimed_by = $2",
    )
    .bind(seq)
    .bind(agent)
    .bind(attempts as i32)
    .bind(next_attempt_ms)
    .bind(error)
    .execute(db.pool())
    .await
    .map(|r| r.rows_affected() > 0)
    .map_err(|e| db.error(e, "recording a failed status report"))
}

/// One prune round: deletes up to `limit` final events (applied, filtered, superseded,
/// dropped; never dead letters or the backlog) received and last changed before `cutoff`
/// (RFC 3339, UTC), with their bodies, deliveries and sent reports. `None` when another agent
/// is pruning now (one round at a time across the agents: a transaction-scoped advisory lock
/// taken without waiting).
pub async fn prune(db: &PgDb, cutoff: &str, limit: u32) -> Result<Option<u64>, PgError> {
    const DOING: &str = "pruning old events";
    let mut tx = db.pool().begin().await.map_err(|e| db.error(e, DOING))?;
    let result = async {
        let ours: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(PRUNE_LOCK)
                .fetch_one(&mut *tx)
                .await?;
        if !ours {
            return Ok(None);
        }
        sqlx::query(
            "WITH doomed AS ( \
               SELECT seq, id FROM events \
               WHERE state IN ($1, $2, $3, $4) AND received_at < $5 AND updated_at < $5 \
               ORDER BY seq LIMIT $6 FOR UPDATE SKIP LOCKED \
             ), sent AS ( \
               DELETE FROM reports_sent r USING doomed WHERE r.event_id = doomed.id \
             ) \
             DELETE FROM events e USING doomed WHERE e.seq = doomed.seq",
        )
        .bind(EventState::Applied.as_str())
        .bind(EventState::Filtered.as_str())
        .bind(EventState::Superseded.as_str())
        .bind(EventState::Dropped.as_str())
        .bind(cutoff)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await
        .map(|r| Some(r.rows_affected()))
    }
    .await;
    match result {
        Ok(pruned) => {
            tx.commit().await.map_err(|e| db.error(e, DOING))?;
            Ok(pruned)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(db.error(e, DOING))
        }
    }
}
