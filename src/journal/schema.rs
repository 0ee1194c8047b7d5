//! The journal's schema and its migrations.
//!
//! `PRAGMA user_version` holds the number of migrations applied. Each migration runs once, in
//! order, inside one transaction with the version bump, so a crash mid-migration leaves the old
//! schema intact. A journal written by a newer agent (a higher version than this build knows) is
//! refused rather than guessed at.

use rusqlite::Connection;

use super::JournalError;

/// Migration `i` brings the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: events, one row per accepted event id.
    r#"
    CREATE TABLE events (
        seq          INTEGER PRIMARY KEY,       -- receive order
        id           TEXT    NOT NULL UNIQUE,   -- the hub's idempotency key
        type         TEXT    NOT NULL,
        version      INTEGER NOT NULL,
        subject      TEXT    NOT NULL,
        revision     INTEGER,
        source       TEXT,
        time         TEXT,
        format       TEXT    NOT NULL,          -- change_event | cloudevents_structured | cloudevents_binary
        content_type TEXT,
        received_at  TEXT    NOT NULL,
        raw_body     BLOB    NOT NULL,          -- the exact bytes the hub sent (and signed)
        envelope     TEXT    NOT NULL,          -- the normalised Change Event document (JSON)
        state        TEXT    NOT NULL,
        updated_at   TEXT    NOT NULL
    );
    CREATE INDEX events_by_state ON events (state, seq);
    "#,
    // 2: application: per-route delivery state, per-subject revisions, the status-report outbox.
    r#"
    ALTER TABLE events ADD COLUMN error TEXT;        -- why it was parked or failed
    ALTER TABLE events ADD COLUMN finished_at TEXT;  -- when it reached its final state
    CREATE TABLE deliveries (
        event_seq       INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
        route           TEXT    NOT NULL,
        sink            TEXT    NOT NULL,
        state           TEXT    NOT NULL,  -- pending | applied | filtered | failed
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER,           -- unix ms of the next try while pending after a failure
        last_error      TEXT,
        updated_at      TEXT    NOT NULL,
        PRIMARY KEY (event_seq, route)
    );
    CREATE TABLE subjects (
        subject       TEXT    PRIMARY KEY,
        last_revision INTEGER NOT NULL     -- highest revision applied for the subject
    );
    CREATE TABLE outbox (
        seq             INTEGER PRIMARY KEY,
        event_id        TEXT    NOT NULL,
        message_id      TEXT    NOT NULL,
        body            TEXT    NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        created_at      TEXT    NOT NULL
    );
    CREATE INDEX outbox_by_due ON outbox (next_attempt_ms, seq);
    "#,
    // 3: the raw body and the envelope move to a table of their own. They are written once and
    // never changed, while an event's row changes when it is finished: with the 2–3 KiB of body
    // beside it, every finish rewrote a whole page; now about 16 events share one. Dropping the
    // columns rewrites the events table once.
    r#"
    CREATE TABLE event_bodies (
        seq      INTEGER PRIMARY KEY,   -- events.seq
        raw_body BLOB    NOT NULL,      -- the exact bytes the hub sent (and signed)
        envelope TEXT    NOT NULL       -- the normalised Change Event document (JSON)
    );
    INSERT INTO event_bodies (seq, raw_body, envelope) SELECT seq, raw_body, envelope FROM events;
    ALTER TABLE events DROP COLUMN raw_body;
    ALTER TABLE events DROP COLUMN envelope;
    "#,
    // 4: the admin API's event listing pages newest first by seq under any one filter, so each
    // filter has an index ending in seq (state has one since 1); the receive time finds the seq
    // range of a time window; a route's deliveries are found by route, an event's pending status
    // report by event id (for the event's detail).
    r#"
    CREATE INDEX events_by_type ON events (type, seq);
    CREATE INDEX events_by_subject ON events (subject, seq);
    CREATE INDEX events_by_received ON events (received_at);
    CREATE INDEX deliveries_by_route ON deliveries (route, event_seq);
    CREATE INDEX outbox_by_event ON outbox (event_id);
    "#,
    // 5: the status reports the hub took are kept with their event (the outbox holds only the
    // ones waiting), so an operator sees what was sent and when; pruned with the event.
    r#"
    CREATE TABLE reports_sent (
        seq        INTEGER PRIMARY KEY,   -- the report's outbox seq
        event_id   TEXT    NOT NULL,
        message_id TEXT    NOT NULL,
        body       TEXT    NOT NULL,
        attempts   INTEGER NOT NULL,      -- including the one the hub took
        created_at TEXT    NOT NULL,
        sent_at    TEXT    NOT NULL
    );
    CREATE INDEX reports_sent_by_event ON reports_sent (event_id, seq);
    "#,
    // 6: a listing by state and type walks the events of that state and type in seq order.
    // Through the type's index alone, each event's state is tested row by row, which reads all
    // of a type's events when few have the state (a million events: 0.3 s for a page of failed
    // events of ten types through one route).
    r#"
    CREATE INDEX events_by_state_type ON events (state, type, seq);
    "#,
    // 7: what an operator needs to follow an event: one row per attempt of each route (its
    // time, duration, outcome and error, and with an applied attempt the adapter output the
    // sink took), and the facts of the request's authentication, written with the body. The
    // attempts outlive a replay (which deletes the route's delivery row), so a replayed
    // route's attempts go on numbering where they stopped. Existing events have no attempts
    // and no receipt.
    r#"
    CREATE TABLE attempts (
        event_seq        INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
        route            TEXT    NOT NULL,
        attempt          INTEGER NOT NULL,  -- 1, 2, … per (event, route), across replays
        sink             TEXT    NOT NULL,
        started_at       TEXT    NOT NULL,  -- RFC 3339, milliseconds
        duration_ms      INTEGER NOT NULL,  -- adapter and sink together
        outcome          TEXT    NOT NULL,  -- applied | filtered | failed
        error            TEXT,
        output           TEXT,              -- the applied output (JSON), at most 64 KiB of it
        output_bytes     INTEGER,           -- the output's whole length
        output_truncated INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (event_seq, route, attempt)
    );
    ALTER TABLE event_bodies ADD COLUMN receipt TEXT;  -- how the request was authenticated (JSON)
    "#,
    // 8: the listing's route filter with a type: a delivery knows its event's type, so the
    // events of one type that went through one route are found by an index of their own
    // instead of by looking up each event of the type (all of them, when the route took none,
    // seconds at a million events). Existing deliveries get their event's type once.
    r#"
    ALTER TABLE deliveries ADD COLUMN type TEXT;
    UPDATE deliveries SET type = (SELECT type FROM events WHERE events.seq = deliveries.event_seq);
    CREATE INDEX deliveries_by_route_type ON deliveries (route, type, event_seq);
    "#,
];

/// The version whose migration rewrites the events table (3: the bodies move out).
const REWRITES_EVENTS: i64 = 3;

/// The schema version this build writes.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to [`CURRENT_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), JournalError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > CURRENT_VERSION {
        return Err(JournalError::SchemaTooNew {
            found,
            supported: CURRENT_VERSION,
        });
    }
    if found > 0 && found < REWRITES_EVENTS {
        tracing::info!(
            from = found,
            to = CURRENT_VERSION,
            "migrating the journal's schema: this rewrites the events table once and takes about \
             10 s per 100,000 events; the agent is ready when it is done"
        );
    } else if found > 0 && found < CURRENT_VERSION {
        tracing::info!(
            from = found,
            to = CURRENT_VERSION,
            "migrating the journal's schema: this adds tables or indexes and takes a few seconds \
             per million events; the agent is ready when it is done"
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
