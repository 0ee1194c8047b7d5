//! The event listing of the admin API (`GET /v1/events`) on a journal of a million events: the
//! time of each filter's first page and of a deep page (a cursor 900,000 events down), through
//! `Journal::list_events`, the call the endpoint makes; then the console's overview (its chart's
//! per-minute counts, the dead-letter count) and an event's page.
//!
//! The journal is made by the agent (`Journal::open`, so it has the agent's schema and
//! indexes), then filled in one SQLite transaction with `ESS_BENCH_EVENTS` events (default
//! 1,000,000): 20 types and 10,000 subjects spread independently of the states, one event every
//! 100 ms, 95 % applied, 3 % failed, 2 % parked, each applied or failed event delivered through
//! one of 3 routes, and those of type.00 also through route-t0. Each query runs
//! `ESS_BENCH_ROUNDS` times (default 5); the figures are medians, the first round included (the
//! pages are cold in SQLite's cache only at the very first query of the run).
//!
//! A second phase times what the listing's indexes cost the receive path: `ESS_BENCH_APPENDS`
//! events (default 20,000) appended by 64 concurrent tasks to a fresh journal with the indexes,
//! and to one without them (dropped after opening), 4 rounds, each starting with the other.
//!
//! Run: `cargo bench --bench console` (`ESS_BENCH_KEEP=1` keeps the filled journal and prints
//! where, for `EXPLAIN QUERY PLAN`; `ESS_BENCH_DROP_INDEXES=name,…` drops indexes after the
//! fill, for a comparison)

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ess_agent::journal::{EventFilter, EventState, Journal, JournalOptions, NewEvent, WireFormat};

mod common;
use common::env_or;

const TYPES: i64 = 20;
const SUBJECTS: i64 = 10_000;

/// Fills the journal in `dir` (made by the agent) with `n` events.
fn fill(dir: &std::path::Path, n: i64) {
    let journal = Journal::open(dir, JournalOptions::default()).expect("open journal");
    journal.close();
    let mut conn = rusqlite::Connection::open(dir.join(ess_agent::journal::FILE_NAME)).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let tx = conn.transaction().unwrap();
    // Times from 2026-01-01T00:00:00Z, 100 ms apart, written as the journal writes them.
    tx.execute_batch(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})
         INSERT INTO events (seq, id, type, version, subject, revision, source, time, format,
             content_type, received_at, state, updated_at)
         SELECT i, 'evt-' || i, printf('type.%02d', (i * 2654435761 / 256) % {TYPES}), 1,
             printf('subject-%05d', (i * 7919) % {SUBJECTS}), NULL, NULL, NULL, 'change_event',
             'application/json',
             strftime('%Y-%m-%dT%H:%M:%fZ', 1767225600 + i / 10.0, 'unixepoch'),
             CASE WHEN i % 100 < 3 THEN 'failed' WHEN i % 100 < 5 THEN 'parked'
                  ELSE 'applied' END,
             strftime('%Y-%m-%dT%H:%M:%fZ', 1767225600 + i / 10.0, 'unixepoch')
         FROM n;
         INSERT INTO event_bodies (seq, raw_body, envelope)
             SELECT seq, CAST('{{}}' AS BLOB), '{{}}' FROM events;
         INSERT INTO deliveries (event_seq, route, sink, state, attempts, updated_at, type)
             SELECT seq, 'route-' || (seq % 3), 'sink', CASE state WHEN 'failed' THEN 'failed'
                 ELSE 'applied' END, 1, updated_at, type FROM events WHERE state != 'parked';
         INSERT INTO deliveries (event_seq, route, sink, state, attempts, updated_at, type)
             SELECT seq, 'route-t0', 'sink', CASE state WHEN 'failed' THEN 'failed'
                 ELSE 'applied' END, 1, updated_at, type FROM events
             WHERE type = 'type.00' AND state != 'parked';"
    ))
    .unwrap();
    tx.commit().unwrap();
    // `ESS_BENCH_DROP_INDEXES=a,b`: the journal without these indexes, to compare a listing with
    // and without one.
    if let Ok(names) = std::env::var("ESS_BENCH_DROP_INDEXES") {
        for name in names.split(',').filter(|n| !n.is_empty()) {
            conn.execute_batch(&format!("DROP INDEX {name}")).unwrap();
            println!("dropped the index {name}");
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn filter(f: impl FnOnce(&mut EventFilter)) -> EventFilter {
    let mut filter = EventFilter::default();
    f(&mut filter);
    filter
}

fn listing(n: i64, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    fill(dir.path(), n);
    if std::env::var_os("ESS_BENCH_KEEP").is_some() {
        let kept = dir.keep();
        println!("the journal is kept in {}", kept.display());
        return listing_in(&kept, n, rounds, started);
    }
    listing_in(dir.path(), n, rounds, started);
}

fn listing_in(dir: &std::path::Path, n: i64, rounds: usize, started: Instant) {
    let size = std::fs::metadata(dir.join(ess_agent::journal::FILE_NAME))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "filled {n} events in {:.1} s ({} MiB)",
        started.elapsed().as_secs_f64(),
        size >> 20
    );
    let journal = Journal::open(dir, JournalOptions::default()).unwrap();
    let deep = Some(n / 10);
    let cases: Vec<(&str, EventFilter)> = vec![
        ("no filter", EventFilter::default()),
        (
            "state=failed",
            filter(|f| f.states = vec![EventState::Failed]),
        ),
        (
            "state=failed,parked",
            filter(|f| f.states = vec![EventState::Failed, EventState::Parked]),
        ),
        (
            "type=type.07",
            filter(|f| f.event_type = Some("type.07".into())),
        ),
        (
            "type=type.1* (10 types)",
            filter(|f| f.event_type = Some("type.1*".into())),
        ),
        (
            "type=type.* (20 types)",
            filter(|f| f.event_type = Some("type.*".into())),
        ),
        (
            "subject=subject-04242",
            filter(|f| f.subject = Some("subject-04242".into())),
        ),
        (
            "route=route-1",
            filter(|f| f.route = Some("route-1".into())),
        ),
        (
            "since..until (1 h, mid-journal)",
            filter(|f| {
                f.since = Some("2026-01-01T12:00:00.000Z".into());
                f.until = Some("2026-01-01T13:00:00.000Z".into());
            }),
        ),
        (
            "state=failed&type=type.07",
            filter(|f| {
                f.states = vec![EventState::Failed];
                f.event_type = Some("type.07".into());
            }),
        ),
        (
            "route=route-2&state=failed&type=type.0*",
            filter(|f| {
                f.route = Some("route-2".into());
                f.states = vec![EventState::Failed];
                f.event_type = Some("type.0*".into());
            }),
        ),
        // Filters that select nothing, so that every walk runs to its end: parked events have
        // no deliveries, and no event went through route-9.
        (
            "route=route-2&state=parked&type=type.0* (none)",
            filter(|f| {
                f.route = Some("route-2".into());
                f.states = vec![EventState::Parked];
                f.event_type = Some("type.0*".into());
            }),
        ),
        (
            "route=route-1&type=type.07",
            filter(|f| {
                f.route = Some("route-1".into());
                f.event_type = Some("type.07".into());
            }),
        ),
        (
            "route=route-t0&type=type.00",
            filter(|f| {
                f.route = Some("route-t0".into());
                f.event_type = Some("type.00".into());
            }),
        ),
        // A route that took only type.00, with types it never took.
        (
            "route=route-t0&type=type.1* (none)",
            filter(|f| {
                f.route = Some("route-t0".into());
                f.event_type = Some("type.1*".into());
            }),
        ),
        (
            "route=route-t0&state=failed&type=type.0*",
            filter(|f| {
                f.route = Some("route-t0".into());
                f.states = vec![EventState::Failed];
                f.event_type = Some("type.0*".into());
            }),
        ),
        (
            "route=route-9&type=type.07 (none)",
            filter(|f| {
                f.route = Some("route-9".into());
                f.event_type = Some("type.07".into());
            }),
        ),
    ];
    println!("\n| filter | first page ms | deep page ms | events on the first page |");
    println!("|---|---:|---:|---:|");
    for (name, f) in &cases {
        let mut first = Vec::new();
        let mut deeper = Vec::new();
        let mut count = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            count = journal.list_events(f, None, 51).unwrap().len();
            first.push(t.elapsed());
            let t = Instant::now();
            journal.list_events(f, deep, 51).unwrap();
            deeper.push(t.elapsed());
        }
        println!(
            "| {name} | {} | {} | {} |",
            ms(median(first)),
            ms(median(deeper)),
            count.min(50)
        );
    }

    // The console's other pages: the overview's chart (the last hour's events per minute and
    // state; here the journal's last hour, 36,000 events) and dead-letter count, and an event's
    // page (its record, deliveries, bodies and pending report), mid-journal.
    let last = journal
        .list_events(&EventFilter::default(), None, 1)
        .unwrap()[0]
        .clone();
    let since = {
        let at = time::OffsetDateTime::parse(
            &last.received_at,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        ess_agent::timestamp::format(at - time::Duration::minutes(59))
    };
    let middle = format!("evt-{}", n / 2);
    println!("\n| page, query | ms |");
    println!("|---|---:|");
    let mut chart = Vec::new();
    let mut dead = Vec::new();
    let mut event = Vec::new();
    let mut minutes = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        minutes = journal.received_per_minute(&since).unwrap().len();
        chart.push(t.elapsed());
        let t = Instant::now();
        journal.dead_letter_count().unwrap();
        dead.push(t.elapsed());
        let t = Instant::now();
        assert!(journal.get_detail(&middle).unwrap().is_some());
        event.push(t.elapsed());
    }
    assert!(
        minutes >= 60,
        "the chart's query found {minutes} minute and state rows"
    );
    println!(
        "| overview: events per minute and state, last hour | {} |",
        ms(median(chart))
    );
    println!("| overview: dead letters | {} |", ms(median(dead)));
    println!(
        "| an event's page: get_detail({middle}) | {} |",
        ms(median(event))
    );
    journal.close();
}

fn new_event(i: usize) -> NewEvent {
    NewEvent {
        id: format!("append-{i}"),
        event_type: format!("type.{:02}", i % 20),
        version: 1,
        subject: format!("subject-{:05}", (i * 7919) % 10_000),
        revision: None,
        source: None,
        time: None,
        format: WireFormat::ChangeEvent,
        content_type: Some("application/json".into()),
        raw_body: Bytes::from(vec![b' '; 1024]),
        envelope: "{}".into(),
        receipt: None,
    }
}

/// Events appended per second by 64 concurrent tasks to a fresh journal, with or without the
/// listing's indexes.
async fn append_rate(n: usize, indexes: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    if !indexes {
        let journal = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        journal.close();
        let conn =
            rusqlite::Connection::open(dir.path().join(ess_agent::journal::FILE_NAME)).unwrap();
        conn.execute_batch(
            "DROP INDEX events_by_type; DROP INDEX events_by_subject; \
             DROP INDEX events_by_received; DROP INDEX deliveries_by_route; \
             DROP INDEX outbox_by_event; DROP INDEX events_by_state_type;",
        )
        .unwrap();
    }
    let journal: Arc<Journal> = Journal::open(dir.path(), JournalOptions::default()).unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let journal = journal.clone();
            tokio::spawn(async move {
                for i in (t..n).step_by(64) {
                    journal.append(new_event(i)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    journal.close();
    rate
}

fn main() {
    let n = env_or("ESS_BENCH_EVENTS", 1_000_000) as i64;
    let rounds = env_or("ESS_BENCH_ROUNDS", 5);
    listing(n, rounds);

    let appends = env_or("ESS_BENCH_APPENDS", 20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("\n| round | appends/s with the listing's indexes | without | ratio |");
    println!("|---|---:|---:|---:|");
    for round in 1..=4 {
        let (with, without) = if round % 2 == 1 {
            let with = runtime.block_on(append_rate(appends, true));
            (with, runtime.block_on(append_rate(appends, false)))
        } else {
            let without = runtime.block_on(append_rate(appends, false));
            (runtime.block_on(append_rate(appends, true)), without)
        };
        println!(
            "| {round} | {with:.0} | {without:.0} | {:.2} |",
            with / without
        );
    }
}
