//! The PostgreSQL journal's tables and their migrations.
//!
//! `journal_migrations` holds one row per migration applied. All pending migrations run in one
//! transaction that first takes a transaction-scoped advisory lock (one per schema), so when
//! several agents start at once the first migrates and the others wait, then find nothing left
//! to do. DDL is transactional in PostgreSQL: a migration that fails leaves the old schema
//! intact. A schema migrated by a newer agent is refused rather than guessed at.
//!
//! The tables mirror the SQLite journal's (see `journal/schema.rs`), with three differences:
//! `events.part` (the subject's partition, [`super::partition_of`]), the tables of the leases
//! (`partitions`, `agents`), and the outbox's claim (`claimed_by`, `claim_expires_at`), since
//! several agents send reports. Timestamps that the admin API shows are the same RFC 3339 text
//! the SQLite journal writes; those that only PostgreSQL compares (leases, claims) are
//! `timestamptz` on PostgreSQL's clock.

use sqlx::Row as _;

use super::{PgDb, PgError};

/// The advisory lock class of the journal's migrations; the schema's name gives the second key.
const MIGRATION_LOCK: i32 = 0x4553_4a01;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the journal.
    r#"
    CREATE TABLE journal_meta (
        one         boolean     PRIMARY KEY DEFAULT true CHECK (one),
        partitions  integer     NOT NULL CHECK (partitions > 0),  -- fixed at creation
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE events (
        seq          bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- receive order
        id           text    NOT NULL UNIQUE,   -- the hub's idempotency key, across agents
        part         integer NOT NULL,          -- partition_of(subject)
        type         text    NOT NULL,
        version      bigint  NOT NULL,          -- u64 stored as the same 64 bits
        subject      text    NOT NULL,
        revision     bigint,
        source       text,
        time         text,
        format       text    NOT NULL,
        content_type text,
        received_at  text    NOT NULL,          -- RFC 3339, as the SQLite journal writes it
        received_by  text    NOT NULL,          -- the agent that accepted it
        state        text    NOT NULL,
        updated_at   text    NOT NULL,
        error        text,
        finished_at  text
    );
    -- The backlog, read per partition in seq order; small, as final events leave it.
    CREATE INDEX events_waiting ON events (part, seq) WHERE state = 'accepted';
    CREATE INDEX events_by_state ON events (state, seq);
    CREATE INDEX events_by_type ON events (type, seq);
    CREATE INDEX events_by_subject ON events (subject, seq);
    CREATE INDEX events_by_received ON events (received_at);
    CREATE TABLE event_bodies (
        seq      bigint PRIMARY KEY REFERENCES events (seq) ON DELETE CASCADE,
        raw_body bytea  NOT NULL,   -- the exact bytes the hub sent (and signed)
        envelope text   NOT NULL,   -- the normalised Change Event document (JSON)
        receipt  text               -- how the request was authenticated (JSON)
    );
    CREATE TABLE deliveries (
        event_seq       bigint  NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
        route           text    NOT NULL,
        sink            text    NOT NULL,
        state           text    NOT NULL,
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_ms bigint,
        last_error      text,
        updated_at      text    NOT NULL,
        type            text,               -- the event's type, for the listing's route filter
        PRIMARY KEY (event_seq, route)
    );
    CREATE INDEX deliveries_by_route ON deliveries (route, event_seq);
    CREATE INDEX deliveries_by_route_type ON deliveries (route, type, event_seq);
    CREATE INDEX events_by_state_type ON events (state, type, seq);
    -- One row per attempt per route; outlives a replay, so numbering goes on across replays.
    CREATE TABLE attempts (
        event_seq        bigint  NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
        route            text    NOT NULL,
        attempt          integer NOT NULL,  -- 1, 2, ... per (event, route), across replays
        sink             text    NOT NULL,
        started_at       text    NOT NULL,  -- RFC 3339, milliseconds
        duration_ms      bigint  NOT NULL,  -- adapter and sink together
        outcome          text    NOT NULL,  -- applied | filtered | failed
        error            text,
        output           text,              -- the applied output (JSON), at most 64 KiB of it
        output_bytes     bigint,            -- the output's whole length
        output_truncated boolean NOT NULL DEFAULT false,
        PRIMARY KEY (event_seq, route, attempt)
    );
    CREATE TABLE subjects (
        subject       text   PRIMARY KEY,
        last_revision bigint NOT NULL
    );
    CREATE TABLE outbox (
        seq              bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id         text    NOT NULL,
        message_id       text    NOT NULL,
        body             text    NOT NULL,
        attempts         integer NOT NULL DEFAULT 0,
        next_attempt_ms  bigint  NOT NULL DEFAULT 0,
        last_error       text,
        created_at       text    NOT NULL,
        claimed_by       text,               -- the agent sending it
        claim_expires_at timestamptz         -- after this another agent may send it
    );
    CREATE INDEX outbox_by_due ON outbox (next_attempt_ms, seq);
    CREATE INDEX outbox_by_event ON outbox (event_id);
    CREATE TABLE reports_sent (
        seq        bigint  PRIMARY KEY,      -- the report's outbox seq
        event_id   text    NOT NULL,
        message_id text    NOT NULL,
        body       text    NOT NULL,
        attempts   integer NOT NULL,
        created_at text    NOT NULL,
        sent_at    text    NOT NULL,
        sent_by    text    NOT NULL
    );
    CREATE INDEX reports_sent_by_event ON reports_sent (event_id, seq);
    CREATE TABLE partitions (
        part       integer     PRIMARY KEY,
        owner      text,                      -- the agent holding it; NULL when free
        epoch      bigint      NOT NULL DEFAULT 0,  -- raised at every taking
        expires_at timestamptz                -- PostgreSQL's clock
    );
    CREATE TABLE agents (
        id        text        PRIMARY KEY,
        last_seen timestamptz NOT NULL        -- PostgreSQL's clock
    );
    -- New events wake the agents (pg/wake.rs): at commit, one notification per statement
    -- naming the schema and the partitions it wrote to.
    CREATE FUNCTION journal_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM new_rows) THEN
            PERFORM pg_notify('ess_journal', current_schema() || ':' ||
                (SELECT string_agg(DISTINCT part::text, ',') FROM new_rows));
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_notify AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION journal_notify();
    "#,
];

/// The schema version this build writes.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// What [`migrate`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Migrations this call applied (0 when another agent had done it).
    pub applied: usize,
    /// The partition count stored in the schema.
    pub partitions: u32,
}

/// Brings the schema up to [`CURRENT_VERSION`], creating the tables and the `partitions` rows
/// on first use (with `partitions` partitions; an existing schema keeps its own count).
pub async fn migrate(db: &PgDb, partitions: u32) -> Result<Migrated, PgError> {
    let mut tx = db
        .pool()
        .begin()
        .await
        .map_err(|e| db.error(e, MIGRATING))?;
    match migrate_in(db, &mut tx, partitions).await {
        Ok(migrated) => {
            tx.commit().await.map_err(|e| db.error(e, MIGRATING))?;
            if migrated.partitions != partitions {
                tracing::warn!(
                    stored = migrated.partitions,
                    configured = partitions,
                    "the journal's schema was created with another partition count, which it \
                     keeps: the configured count is not used"
                );
            }
            Ok(migrated)
        }
        Err(e) => {
            // At once, rather than when the connection is next used: the transaction holds
            // the migration lock.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

const MIGRATING: &str = "migrating the journal's schema";

/// [`migrate`]'s work inside its transaction.
async fn migrate_in(
    db: &PgDb,
    tx: &mut sqlx::PgConnection,
    partitions: u32,
) -> Result<Migrated, PgError> {
    let err = |e| db.error(e, MIGRATING);
    // Without an existing schema in the search path, current_schema() is NULL, and the lock
    // below (a strict function) would silently not be taken.
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
    if schema.is_none() {
        return Err(PgError::NoSchema {
            at: db.at().to_owned(),
            schema: db.schema.clone().unwrap_or_else(|| "public".into()),
        });
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    // Without the notice "relation already exists, skipping" at every start.
    sqlx::raw_sql(
        "SET LOCAL client_min_messages = warning; \
         CREATE TABLE IF NOT EXISTS journal_migrations (\
         version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    let found: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0)::bigint FROM journal_migrations")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
    if found > CURRENT_VERSION {
        return Err(PgError::SchemaTooNew {
            found,
            supported: CURRENT_VERSION,
        });
    }
    let mut applied = 0;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("INSERT INTO journal_migrations (version) VALUES ($1)")
            .bind(index as i32 + 1)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        applied += 1;
    }
    if applied > 0 {
        tracing::info!(
            schema = schema.as_deref().unwrap_or(""),
            from = found,
            to = CURRENT_VERSION,
            "migrated the journal's PostgreSQL schema"
        );
    }
    sqlx::query("INSERT INTO journal_meta (partitions) VALUES ($1) ON CONFLICT (one) DO NOTHING")
        .bind(i32::try_from(partitions.max(1)).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let stored: i32 = sqlx::query("SELECT partitions FROM journal_meta")
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(err)?;
    sqlx::query(
        "INSERT INTO partitions (part) SELECT generate_series(0, $1 - 1) \
         ON CONFLICT (part) DO NOTHING",
    )
    .bind(stored)
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    Ok(Migrated {
        applied,
        partitions: stored as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::super::PgDb;
    use super::super::testdb::TestSchema;
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_migrators_migrate_once_and_all_succeed() {
        let schema = TestSchema::create().await;
        let agents: Vec<PgDb> = (0..6)
            .map(|_| PgDb::new(&schema.options()).unwrap())
            .collect();
        let tasks: Vec<_> = agents
            .iter()
            .map(|db| {
                let db = db.clone();
                tokio::spawn(async move { migrate(&db, 16).await })
            })
            .collect();
        let mut applied = 0;
        for task in tasks {
            let migrated = task.await.unwrap().expect("every migrator succeeds");
            assert_eq!(migrated.partitions, 16);
            applied += migrated.applied;
        }
        assert_eq!(applied, MIGRATIONS.len(), "each migration is applied once");
        let versions: Vec<i32> =
            sqlx::query_scalar("SELECT version FROM journal_migrations ORDER BY version")
                .fetch_all(agents[0].pool())
                .await
                .unwrap();
        assert_eq!(versions, (1..=CURRENT_VERSION as i32).collect::<Vec<_>>());
        let parts: i64 = sqlx::query_scalar("SELECT count(*) FROM partitions")
            .fetch_one(agents[0].pool())
            .await
            .unwrap();
        assert_eq!(parts, 16);

        // A later start with another count keeps the stored one.
        let again = migrate(&agents[0], 99).await.unwrap();
        assert_eq!((again.applied, again.partitions), (0, 16));
    }

    #[tokio::test]
    async fn a_missing_schema_or_a_newer_one_is_refused() {
        let schema = TestSchema::create().await;
        let db = PgDb::new(&super::super::PgOptions {
            schema: Some(format!("{}_missing", schema.name)),
            ..schema.options()
        })
        .unwrap();
        let e = migrate(&db, 16).await.unwrap_err();
        assert!(matches!(e, PgError::NoSchema { .. }), "{e}");
        assert!(e.to_string().contains("CREATE SCHEMA"), "{e}");

        let db = schema.db().await;
        sqlx::query("INSERT INTO journal_migrations (version) VALUES (99)")
            .execute(db.pool())
            .await
            .unwrap();
        let e = migrate(&db, 16).await.unwrap_err();
        assert_eq!(
            e,
            PgError::SchemaTooNew {
                found: 99,
                supported: CURRENT_VERSION
            }
        );
    }
}
