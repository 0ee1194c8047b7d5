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
use crate::journal::{
    Attempt, DeliveryRecord, DeliveryUpdate, EventState, Finish, KEPT_ATTEMPTS, OutboxRow,
    StoredEvent,
};

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
    let mut conn = db.pool().acquire().await.map_err(|e| db.error(e, DOING))?;
    deliveries_on(&mut conn, seq)
        .await
        .map_err(|e| db.error(e, DOING))
}

/// [`deliveries`] on `conn` (in its transaction, if any).
pub(super) async fn deliveries_on(
    conn: &mut sqlx::PgConnection,
    seq: i64,
) -> Result<Vec<DeliveryRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT route, sink, state, attempts, next_attempt_ms, last_error, updated_at \
         FROM deliveries WHERE event_seq = $1 ORDER BY route",
    )
    .bind(seq)
    .fetch_all(conn)
    .await?;
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
        .collect()
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

/// Upserts delivery states of events of the fence's partition, each with the event's type (for
/// the listing's route and type filter), and adds the attempts that led to them to their
/// routes' histories ([`write_attempt`]).
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
           last_error, updated_at, type) \
         SELECT u.seq, u.route, u.sink, u.state, u.attempts, u.next_attempt_ms, u.last_error, \
           $9, e.type \
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
    .bind(
        updates
            .iter()
            .map(|u| u.attempts as i32)
            .collect::<Vec<_>>(),
    )
    .bind(
        updates
            .iter()
            .map(|u| u.next_attempt_ms)
            .collect::<Vec<_>>(),
    )
    .bind(
        updates
            .iter()
            .map(|u| u.last_error.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(part)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    // One statement per attempt, in the order given: two attempts of one route in one call
    // are numbered one after the other.
    for update in updates {
        if let Some(attempt) = &update.attempt {
            write_attempt(&mut *conn, part, update, attempt).await?;
        }
    }
    Ok(())
}

/// Adds an attempt to its route's history, as the SQLite journal does: numbered after the
/// route's last kept attempt (or the delivery's count, for a delivery counted before its
/// history), across replays; only the latest applied attempt keeps its output; the history
/// keeps the first attempt and the latest [`KEPT_ATTEMPTS`]` - 1`. One statement: the clearing
/// and the trimming see the rows as they were before the insert, so they never touch the new
/// one, and the clearing leaves alone the rows the trimming deletes (one statement must not
/// change a row twice). Nothing is written for an event outside the fenced partition.
async fn write_attempt(
    conn: &mut sqlx::PgConnection,
    part: i32,
    update: &DeliveryUpdate,
    attempt: &Attempt,
) -> Result<(), sqlx::Error> {
    let output = attempt.output.as_ref();
    sqlx::query(
        "WITH n AS ( \
           SELECT greatest($3, 1 + coalesce((SELECT max(attempt) FROM attempts \
             WHERE event_seq = $1 AND route = $2), 0)) AS attempt \
           FROM events WHERE seq = $1 AND part = $12 \
         ), ins AS ( \
           INSERT INTO attempts (event_seq, route, attempt, sink, started_at, duration_ms, \
             outcome, error, output, output_bytes, output_truncated) \
           SELECT $1, $2, n.attempt, $4, $5, $6, $7, $8, $9, $10, $11 FROM n \
         ), cleared AS ( \
           UPDATE attempts a SET output = NULL, output_bytes = NULL, output_truncated = false \
           FROM n WHERE $9::text IS NOT NULL AND a.event_seq = $1 AND a.route = $2 \
             AND a.attempt < n.attempt AND a.output IS NOT NULL \
             AND NOT (n.attempt > $13 AND a.attempt > 1 \
               AND a.attempt <= n.attempt - ($13 - 1)) \
         ) \
         DELETE FROM attempts a USING n \
         WHERE n.attempt > $13 AND a.event_seq = $1 AND a.route = $2 \
           AND a.attempt > 1 AND a.attempt <= n.attempt - ($13 - 1)",
    )
    .bind(update.seq)
    .bind(&update.route)
    .bind(i32::try_from(update.attempts).unwrap_or(i32::MAX))
    .bind(&update.sink)
    .bind(&attempt.started_at)
    .bind(i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX))
    .bind(attempt.outcome.as_str())
    .bind(attempt.error.as_deref())
    .bind(output.map(|o| o.text.as_str()))
    .bind(output.map(|o| i64::try_from(o.bytes).unwrap_or(i64::MAX)))
    .bind(output.is_some_and(|o| o.truncated))
    .bind(part)
    .bind(KEPT_ATTEMPTS as i32)
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
/// then but the deliveries and their attempts.
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::super::append::{AppendOutcome, Appender};
    use super::super::lease::Lessee;
    use super::super::testdb::{TestSchema, eventually, new_event};
    use super::*;
    use crate::journal::DeliveryState;

    /// Appends `(id, subject)` pairs one after the other; their seqs.
    async fn append(appender: &Appender, events: &[(&str, &str)]) -> Vec<i64> {
        let mut seqs = Vec::new();
        for (id, subject) in events {
            match appender.append(new_event(id, subject)).await.unwrap() {
                AppendOutcome::Accepted { seq, .. } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        seqs
    }

    fn applied(seq: i64, id: &str, subject: &str, revision: u64) -> (Vec<DeliveryUpdate>, Finish) {
        let update = DeliveryUpdate {
            seq,
            route: "calendar".into(),
            sink: "files".into(),
            state: DeliveryState::Applied,
            attempts: 1,
            next_attempt_ms: None,
            last_error: None,
            attempt: None,
        };
        let finish = Finish {
            seq,
            state: EventState::Applied,
            error: None,
            subject_revision: Some((subject.into(), revision)),
            report: Some((format!("report-{id}"), format!("{{\"id\":\"{id}\"}}"))),
            event_id: id.into(),
        };
        (vec![update], finish)
    }

    async fn count(db: &PgDb, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backlog_is_paged_in_seq_order_and_an_event_is_finished_once_under_its_lease() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        let appender = Appender::start(db.clone(), 16, "a".into(), 64);
        let seqs = append(
            &appender,
            &[
                ("e0", "S0"),
                ("e1", "S1"),
                ("e2", "S2"),
                ("e3", "S0"),
                ("e4", "S3"),
            ],
        )
        .await;
        let a = Lessee::new(db.clone(), "a".into(), schema.options().lease, 16);
        a.round().await.unwrap();
        let parts = a.applicable();
        assert_eq!(parts.len(), 16);

        // Page by page, in seq order.
        let first = waiting(&db, &parts, 0, 3).await.unwrap();
        let rest = waiting(&db, &parts, first.last().unwrap().seq, 3)
            .await
            .unwrap();
        let read: Vec<i64> = first.iter().chain(&rest).map(|w| w.seq).collect();
        assert_eq!(read, seqs);
        assert_eq!(first[0].subject, "S0");
        assert_eq!(first[0].part, super::super::partition_of("S0", 16));
        let stored = load_event(&db, seqs[0]).await.unwrap().unwrap();
        assert_eq!(
            (stored.id.as_str(), stored.state),
            ("e0", EventState::Accepted)
        );
        assert!(stored.envelope.contains("S0") && stored.received_at_ms > 0);

        // Finished once: its deliveries, revision and report in the same transaction.
        let fence = a.fence(first[0].part).unwrap();
        let (updates, done) = applied(seqs[0], "e0", "S0", 7);
        assert!(finish(&db, &fence, &updates, &done).await.unwrap());
        assert!(!finish(&db, &fence, &updates, &done).await.unwrap());
        assert_eq!(subject_revision(&db, "S0").await.unwrap(), Some(7));
        assert_eq!(
            deliveries(&db, seqs[0]).await.unwrap()[0].state,
            DeliveryState::Applied
        );
        assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 1);
        let left: Vec<i64> = waiting(&db, &parts, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|w| w.seq)
            .collect();
        assert_eq!(left, seqs[1..]);

        // The partition of e1 moves to b: a's final state for e1 is refused, nothing written.
        let part = first[1].part;
        sqlx::query("UPDATE partitions SET expires_at = now() - interval '1 s' WHERE part = $1")
            .bind(part)
            .execute(db.pool())
            .await
            .unwrap();
        let b = Lessee::new(db.clone(), "b".into(), schema.options().lease, 16);
        b.round().await.unwrap();
        let stale = a.fence(part).expect("a has not noticed yet");
        let (updates, done) = applied(seqs[1], "e1", "S1", 1);
        let e = finish(&db, &stale, &updates, &done).await.unwrap_err();
        assert_eq!(
            e,
            PgError::LeaseLost {
                part,
                epoch: stale.epoch
            }
        );
        let e = set_deliveries(&db, &stale, &updates).await.unwrap_err();
        assert!(matches!(e, PgError::LeaseLost { .. }), "{e}");
        assert_eq!(
            load_event(&db, seqs[1]).await.unwrap().unwrap().state,
            EventState::Accepted
        );
        assert!(deliveries(&db, seqs[1]).await.unwrap().is_empty());
        assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 1);
        // b, which holds it now, finishes it.
        let fence = b.fence(part).unwrap();
        assert!(finish(&db, &fence, &updates, &done).await.unwrap());
        appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_committed_late_with_a_lower_seq_is_found_by_the_next_pass() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        let appender = Appender::start(db.clone(), 16, "a".into(), 64);
        let parts: Vec<i32> = (0..16).collect();
        // Another agent's transaction takes its seq first and commits last.
        let mut slow = db.pool().begin().await.unwrap();
        let late: i64 = sqlx::query_scalar(
            "INSERT INTO events (id, part, type, version, subject, format, received_at, \
             received_by, state, updated_at) VALUES ('late', 0, 't', 1, 'S', 'change_event', \
             '2026-01-01T00:00:00.000Z', 'b', 'accepted', '2026-01-01T00:00:00.000Z') \
             RETURNING seq",
        )
        .fetch_one(&mut *slow)
        .await
        .unwrap();
        sqlx::query("INSERT INTO event_bodies (seq, raw_body, envelope) VALUES ($1, '', '{}')")
            .bind(late)
            .execute(&mut *slow)
            .await
            .unwrap();
        let early = append(&appender, &[("early", "S")]).await[0];
        assert!(late < early);
        let pass: Vec<i64> = waiting(&db, &parts, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|w| w.seq)
            .collect();
        assert_eq!(pass, [early]);
        slow.commit().await.unwrap();
        // A cursor past the last seq seen would never see it; the next pass does.
        assert!(waiting(&db, &parts, early, 100).await.unwrap().is_empty());
        let pass: Vec<i64> = waiting(&db, &parts, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|w| w.seq)
            .collect();
        assert_eq!(pass, [late, early]);
        appender.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_status_report_is_claimed_by_one_agent() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        sqlx::query(
            "INSERT INTO outbox (event_id, message_id, body, created_at) \
             SELECT 'e' || i, 'm' || i, '{}', '2026-01-01T00:00:00.000Z' \
             FROM generate_series(1, 30) i",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let hold = Duration::from_secs(60);
        let claimers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|agent| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let rows = claim_reports(&db, agent, i64::MAX, 4, hold).await.unwrap();
                        if rows.is_empty() {
                            return mine;
                        }
                        mine.extend(rows.into_iter().map(|r| r.seq));
                    }
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        for claimer in claimers {
            for seq in claimer.await.unwrap() {
                assert!(all.insert(seq), "report {seq} claimed twice");
            }
        }
        assert_eq!(all.len(), 30);

        // Only the claimant records the outcome.
        sqlx::query(
            "INSERT INTO outbox (event_id, message_id, body, created_at) \
             VALUES ('ea', 'ma', '{}', 'x'), ('eb', 'mb', '{}', 'x')",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let a_seq = claim_reports(&db, "a", i64::MAX, 1, hold).await.unwrap()[0].seq;
        let b_seq = claim_reports(&db, "b", i64::MAX, 1, hold).await.unwrap()[0].seq;
        assert!(!report_sent(&db, "b", a_seq).await.unwrap());
        assert!(report_sent(&db, "a", a_seq).await.unwrap());
        let sent_by: String = sqlx::query_scalar("SELECT sent_by FROM reports_sent WHERE seq = $1")
            .bind(a_seq)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(sent_by, "a");
        // A failed report is due again for any agent.
        assert!(
            report_retry(&db, "b", b_seq, 1, 0, "hub said 503")
                .await
                .unwrap()
        );
        let again = claim_reports(&db, "a", i64::MAX, 10, hold).await.unwrap();
        assert_eq!(
            again
                .iter()
                .map(|r| (r.seq, r.attempts))
                .collect::<Vec<_>>(),
            [(b_seq, 1)]
        );

        // A claim whose agent went away expires, and another agent sends the report.
        sqlx::query(
            "INSERT INTO outbox (event_id, message_id, body, created_at) \
             VALUES ('x', 'mx', '{}', '2026-01-01T00:00:00.000Z')",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let claimed = claim_reports(&db, "a", i64::MAX, 10, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(
            claim_reports(&db, "b", i64::MAX, 10, hold)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            eventually(Duration::from_secs(5), || async {
                claim_reports(&db, "b", i64::MAX, 10, hold)
                    .await
                    .unwrap()
                    .len()
                    == 1
            })
            .await
        );
        assert!(!report_sent(&db, "a", claimed[0].seq).await.unwrap());
        assert!(report_sent(&db, "b", claimed[0].seq).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_agent_at_a_time_prunes_and_only_old_final_events() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        let appender = Arc::new(Appender::start(db.clone(), 16, "a".into(), 64));
        append(
            &appender,
            &[
                ("old-applied", "S"),
                ("old-dropped", "S"),
                ("old-failed", "S"),
                ("old-waiting", "S"),
                ("new-applied", "S"),
            ],
        )
        .await;
        sqlx::query(
            "UPDATE events SET received_at = '2000-01-01T00:00:00.000Z', \
             updated_at = '2000-01-01T00:00:00.000Z', \
             state = CASE id WHEN 'old-applied' THEN 'applied' WHEN 'old-dropped' THEN 'dropped' \
               WHEN 'old-failed' THEN 'failed' ELSE state END \
             WHERE id LIKE 'old-%'",
        )
        .execute(db.pool())
        .await
        .unwrap();
        sqlx::query("UPDATE events SET state = 'applied' WHERE id = 'new-applied'")
            .execute(db.pool())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO reports_sent (seq, event_id, message_id, body, attempts, created_at, \
             sent_at, sent_by) VALUES (1, 'old-applied', 'm', '{}', 1, 'x', 'x', 'a')",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let cutoff = "2001-01-01T00:00:00.000Z";

        // Another agent's round is under way.
        let mut other = db.pool().begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
            .bind(PRUNE_LOCK)
            .execute(&mut *other)
            .await
            .unwrap();
        assert_eq!(prune(&db, cutoff, 100).await.unwrap(), None);
        other.commit().await.unwrap();

        assert_eq!(prune(&db, cutoff, 100).await.unwrap(), Some(2));
        let left: Vec<String> = sqlx::query_scalar("SELECT id FROM events ORDER BY seq")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert_eq!(left, ["old-failed", "old-waiting", "new-applied"]);
        assert_eq!(count(&db, "SELECT count(*) FROM event_bodies").await, 3);
        assert_eq!(count(&db, "SELECT count(*) FROM reports_sent").await, 0);
        appender.close().await;
    }
}
