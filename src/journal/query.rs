//! The operator's queries over the journal: events listed newest first under filters, with
//! keyset paging, and the dead letters a filter selects for a bulk retry.
//!
//! Every listing is ordered by `seq` descending and continues below a cursor seq, so a page
//! costs the same at any depth. Each filter has an index ending in `seq` (schema migration 4),
//! which lets SQLite walk one index in order and stop after a page instead of sorting.

use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};
use serde::Serialize;

use super::apply::{Requeue, requeue_row, stored_u64};
use super::{EventState, JournalError, SqliteJournal};

/// What a listing selects; every part is optional and they combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Any of these states; empty for every state.
    pub states: Vec<EventState>,
    /// The event type, a glob as in the routes' `types` (`*` any run, `?` one character).
    pub event_type: Option<String>,
    pub subject: Option<String>,
    /// Events with a delivery through this route.
    pub route: Option<String>,
    /// Received at or after, as the journal writes times ([`crate::timestamp`]).
    pub since: Option<String>,
    /// Received before.
    pub until: Option<String>,
}

/// An event in a listing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventSummary {
    pub seq: i64,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u64,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    pub state: EventState,
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Globs matching more types than this are not split into one index walk per type: the
/// listing walks `seq` and tests the type of each row instead.
const MAX_TYPE_WALKS: usize = 16;

/// How far receive times may run against the receive order (events appended in one batch, a
/// small clock step back) and a time window still find every event in it. The window's seq range
/// is found through the receive time's index, widened by this much on both sides.
const CLOCK_SLACK_MS: i64 = 60_000;

/// The concrete event types in the journal that `pattern` matches, found by stepping through the
/// type index one distinct value at a time (a few lookups per type, whatever the event count).
/// SQLite's GLOB has the routes' `*` and `?`; its `[` sets are escaped, so `[` is itself as in
/// a route's pattern.
fn matching_types(conn: &Connection, pattern: &str) -> Result<Vec<String>, rusqlite::Error> {
    if !pattern.contains(['*', '?']) {
        return Ok(vec![pattern.to_owned()]);
    }
    let glob = pattern.replace('[', "[[]");
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE t(x) AS (SELECT min(type) FROM events \
         UNION ALL SELECT (SELECT min(type) FROM events WHERE type > t.x) FROM t \
         WHERE t.x IS NOT NULL) SELECT x FROM t WHERE x GLOB ?1",
    )?;
    stmt.query_map([glob], |r| r.get::<_, String>(0))?.collect()
}

/// `text` (a journal time) moved by `ms` milliseconds, as the journal writes times.
fn shifted(text: &str, ms: i64) -> Option<String> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(crate::timestamp::format(
        at + time::Duration::milliseconds(ms),
    ))
}

/// The seq range `(above, below)` that holds every event of the filter's time window.
fn window_seqs(
    conn: &Connection,
    filter: &EventFilter,
) -> Result<(Option<i64>, Option<i64>), rusqlite::Error> {
    let mut above = None;
    let mut below = None;
    if let Some(since) = filter
        .since
        .as_deref()
        .and_then(|t| shifted(t, -CLOCK_SLACK_MS))
    {
        above = conn
            .prepare_cached(
                "SELECT seq FROM events WHERE received_at < ?1 ORDER BY received_at DESC LIMIT 1",
            )?
            .query_row([since], |r| r.get(0))
            .optional()?;
    }
    if let Some(until) = filter
        .until
        .as_deref()
        .and_then(|t| shifted(t, CLOCK_SLACK_MS))
    {
        below = conn
            .prepare_cached(
                "SELECT seq FROM events WHERE received_at >= ?1 ORDER BY received_at LIMIT 1",
            )?
            .query_row([until], |r| r.get(0))
            .optional()?;
    }
    Ok((above, below))
}

/// Events matching `filter` with seq below `before` (all when `None`), newest first, at most
/// `limit`.
pub fn list_events(
    conn: &Connection,
    filter: &EventFilter,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<EventSummary>, rusqlite::Error> {
    // A route nothing went through (a misspelt name) selects nothing; without this, a walk of
    // another filter's index would look up a delivery for each of its events to find none.
    if let Some(route) = &filter.route {
        let used: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM deliveries WHERE route = ?1)")?
            .query_row([route], |r| r.get(0))?;
        if !used {
            return Ok(Vec::new());
        }
    }
    let types = match &filter.event_type {
        None => None,
        Some(pattern) => {
            let mut types = matching_types(conn, pattern)?;
            // With a route, only the types that went through it (an index lookup each).
            if let Some(route) = &filter.route {
                let mut took = conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM deliveries WHERE route = ?1 AND type = ?2)",
                )?;
                let mut kept = Vec::with_capacity(types.len());
                for t in types {
                    if took.query_row(params![route, t], |r| r.get::<_, bool>(0))? {
                        kept.push(t);
                    }
                }
                types = kept;
            }
            Some(types)
        }
    };
    let (above, below) = window_seqs(conn, filter)?;
    let below = match (before, below) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let bounds = Bounds { above, below };
    match types {
        None => select(conn, filter, &TypeTest::Any, bounds, limit),
        Some(types) if types.is_empty() => Ok(Vec::new()),
        // A subject's events are few (one record's history): its index is walked once and the
        // rest tested row by row.
        Some(types) if types.len() > MAX_TYPE_WALKS || filter.subject.is_some() => {
            select(conn, filter, &TypeTest::AnyOf(&types), bounds, limit)
        }
        Some(types) => {
            // One walk of the type index per type (of the state and type index per state and
            // type when states are chosen too), merged: each stops after a page. Walking a
            // type's events and testing each one's state reads every event of the type when
            // few have the state.
            let mut merged = Vec::new();
            let single: Vec<EventFilter>;
            let filters: Vec<&EventFilter> = if filter.states.len() > 1 {
                single = filter
                    .states
                    .iter()
                    .map(|state| EventFilter {
                        states: vec![*state],
                        ..filter.clone()
                    })
                    .collect();
                single.iter().collect()
            } else {
                vec![filter]
            };
            for f in filters {
                for t in &types {
                    merged.extend(select(conn, f, &TypeTest::Exactly(t), bounds, limit)?);
                }
            }
            merged.sort_by_key(|e| std::cmp::Reverse(e.seq));
            merged.truncate(limit as usize);
            Ok(merged)
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bounds {
    above: Option<i64>,
    below: Option<i64>,
}

enum TypeTest<'a> {
    Any,
    /// Walk the type index for this type.
    Exactly(&'a str),
    /// Walk seq and test each row's type.
    AnyOf(&'a [String]),
}

fn select(
    conn: &Connection,
    filter: &EventFilter,
    types: &TypeTest<'_>,
    bounds: Bounds,
    limit: u32,
) -> Result<Vec<EventSummary>, rusqlite::Error> {
    let (sql, args) = select_sql(filter, types, bounds, limit);
    let mut stmt = conn.prepare_cached(&sql)?;
    stmt.query_map(params_from_iter(args.iter()), |r| {
        Ok(EventSummary {
            seq: r.get(0)?,
            id: r.get(1)?,
            event_type: r.get(2)?,
            version: stored_u64(r, 3)?,
            subject: r.get(4)?,
            revision: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            state: r.get(6)?,
            received_at: r.get(7)?,
            finished_at: r.get(8)?,
            error: r.get(9)?,
        })
    })?
    .collect()
}

/// The statement of one walk and its arguments.
fn select_sql(
    filter: &EventFilter,
    types: &TypeTest<'_>,
    bounds: Bounds,
    limit: u32,
) -> (String, Vec<Box<dyn ToSql>>) {
    // A route alone walks that route's deliveries (in event seq order), a route and one type
    // the route's deliveries of that type. With another filter that has an index of its own,
    // the walk is over that index and each event's delivery through the route is looked up: a
    // route's deliveries are most of the events, so they narrow the walk least.
    let by_route = filter.route.is_some() && filter.states.is_empty() && filter.subject.is_none();
    let seq = if by_route { "d.event_seq" } else { "e.seq" };
    let mut sql = String::from(
        "SELECT e.seq, e.id, e.type, e.version, e.subject, e.revision, e.state, \
         e.received_at, e.finished_at, e.error FROM ",
    );
    let mut args: Vec<Box<dyn ToSql>> = Vec::new();
    let mut conditions: Vec<String> = Vec::new();
    match &filter.route {
        Some(route) if by_route => {
            sql.push_str("deliveries d JOIN events e ON e.seq = d.event_seq");
            args.push(Box::new(route.clone()));
            conditions.push(format!("d.route = ?{}", args.len()));
        }
        Some(route) => {
            sql.push_str("events e");
            args.push(Box::new(route.clone()));
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.route = ?{})",
                args.len()
            ));
        }
        None => sql.push_str("events e"),
    }
    if !filter.states.is_empty() {
        let mut marks = Vec::new();
        for state in &filter.states {
            args.push(Box::new(*state));
            marks.push(format!("?{}", args.len()));
        }
        // With a subject, `+` keeps SQLite on the subject's index rather than a state's.
        let column = if filter.subject.is_some() {
            "+e.state"
        } else {
            "e.state"
        };
        conditions.push(format!("{column} IN ({})", marks.join(", ")));
    }
    match types {
        TypeTest::Any => {}
        TypeTest::Exactly(t) if by_route => {
            args.push(Box::new(t.to_string()));
            conditions.push(format!("d.type = ?{}", args.len()));
        }
        TypeTest::Exactly(t) => {
            args.push(Box::new(t.to_string()));
            conditions.push(format!("e.type = ?{}", args.len()));
        }
        TypeTest::AnyOf(list) => {
            let mut marks = Vec::new();
            for t in list.iter() {
                args.push(Box::new(t.clone()));
                marks.push(format!("?{}", args.len()));
            }
            // `+` keeps SQLite from reading every row of every type and sorting them.
            conditions.push(format!("+e.type IN ({})", marks.join(", ")));
        }
    }
    if let Some(subject) = &filter.subject {
        args.push(Box::new(subject.clone()));
        conditions.push(format!("e.subject = ?{}", args.len()));
    }
    if let Some(since) = &filter.since {
        args.push(Box::new(since.clone()));
        conditions.push(format!("e.received_at >= ?{}", args.len()));
    }
    if let Some(until) = &filter.until {
        args.push(Box::new(until.clone()));
        conditions.push(format!("e.received_at < ?{}", args.len()));
    }
    if let Some(above) = bounds.above {
        args.push(Box::new(above));
        conditions.push(format!("{seq} > ?{}", args.len()));
    }
    if let Some(below) = bounds.below {
        args.push(Box::new(below));
        conditions.push(format!("{seq} < ?{}", args.len()));
    }
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    args.push(Box::new(limit));
    sql.push_str(&format!(" ORDER BY {seq} DESC LIMIT ?{}", args.len()));
    (sql, args)
}

/// An event a bulk retry put back in the backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    pub seq: i64,
    pub id: String,
    pub subject: String,
}

impl SqliteJournal {
    /// Events matching `filter` below seq `before`, newest first, at most `limit`. Blocking.
    pub fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<EventSummary>, JournalError> {
        self.read(|conn| list_events(conn, filter, before, limit))
    }

    /// The events received at or after `since` (a journal time), counted by minute
    /// (`YYYY-MM-DDTHH:MM`) and state, for the console's chart, in receive-time order.
    /// Blocking.
    ///
    /// The rows are counted here as they come through the receive time's index rather than
    /// grouped by SQLite, whose grouping by minute sorted every row of the hour in a temporary
    /// B-tree: at 10 events a second that was most of 50 ms.
    pub fn received_per_minute(
        &self,
        since: &str,
    ) -> Result<Vec<(String, EventState, u64)>, JournalError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT received_at, state FROM events WHERE received_at >= ?1 \
                 ORDER BY received_at",
            )?;
            let mut rows = stmt.query([since])?;
            let mut counts: Vec<(String, EventState, u64)> = Vec::new();
            // The counts of the minute being read, by state.
            let mut minute: Vec<(EventState, u64)> = Vec::new();
            let mut key = String::new();
            while let Some(row) = rows.next()? {
                let at = row.get_ref(0)?.as_str()?;
                let state: EventState = row.get(1)?;
                let this = at.get(..16).unwrap_or(at);
                if this != key {
                    counts.extend(minute.drain(..).map(|(s, n)| (key.clone(), s, n)));
                    key = this.to_owned();
                }
                match minute.iter_mut().find(|(s, _)| *s == state) {
                    Some((_, n)) => *n += 1,
                    None => minute.push((state, 1)),
                }
            }
            counts.extend(minute.drain(..).map(|(s, n)| (key.clone(), s, n)));
            Ok(counts)
        })
    }

    /// Puts back in the backlog the dead letters (failed and parked events, not dropped ones)
    /// that `filter` selects, newest first, at most `max`, in one transaction: as a retry of
    /// each, routes already applied stay applied.
    pub async fn requeue_dead_letters(
        &self,
        mut filter: EventFilter,
        max: u32,
    ) -> Result<Vec<Requeued>, JournalError> {
        filter.states = vec![EventState::Failed, EventState::Parked];
        let requeued = self
            .write(move |conn| {
                let selected = list_events(conn, &filter, None, max)?;
                let mut requeued = Vec::with_capacity(selected.len());
                for event in selected {
                    if let Requeue::Queued { seq, subject } =
                        requeue_row(conn, event.seq, event.subject, event.state, None, false)?
                    {
                        requeued.push(Requeued {
                            seq,
                            id: event.id,
                            subject,
                        });
                    }
                }
                Ok(requeued)
            })
            .await?;
        self.shared
            .backlog
            .fetch_add(requeued.len() as u64, Ordering::Relaxed);
        Ok(requeued)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::{DeliveryState, DeliveryUpdate, JournalOptions, NewEvent, WireFormat};
    use super::*;

    fn event(id: &str, event_type: &str, subject: &str) -> NewEvent {
        NewEvent {
            id: id.into(),
            event_type: event_type.into(),
            version: 1,
            subject: subject.into(),
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

    /// SQLite's plan for the walk of `filter` with `types`, step by step.
    fn query_plan(
        journal: &SqliteJournal,
        filter: &EventFilter,
        types: &TypeTest<'_>,
    ) -> Vec<String> {
        let bounds = Bounds {
            above: None,
            below: None,
        };
        let (sql, args) = select_sql(filter, types, bounds, 50);
        journal
            .read(|conn| {
                let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                stmt.query_map(params_from_iter(args.iter()), |r| r.get::<_, String>(3))?
                    .collect()
            })
            .unwrap()
    }

    fn ids(events: &[EventSummary]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    /// Twelve events: e0..e11, types cycling rule.a, rule.b, other[1]; subjects S0/S1; e3 and
    /// e7 failed, delivered through route r1; e{i} received at minute i of the hour.
    async fn journal() -> (tempfile::TempDir, Arc<SqliteJournal>) {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(dir.path(), JournalOptions::default()).unwrap();
        let types = ["rule.a", "rule.b", "other[1]"];
        for i in 0..12 {
            journal
                .append(event(
                    &format!("e{i}"),
                    types[i % 3],
                    &format!("S{}", i % 2),
                ))
                .await
                .unwrap();
        }
        journal
            .write(|conn| {
                conn.execute(
                    "UPDATE events SET state = 'failed' WHERE id IN ('e3', 'e7')",
                    [],
                )?;
                conn.execute(
                    "UPDATE events SET received_at = printf('2026-12-07T09:%02d:00.000Z', seq - 1)",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let seq = |id: &str| {
            journal
                .read(|c| c.query_row("SELECT seq FROM events WHERE id = ?1", [id], |r| r.get(0)))
                .unwrap()
        };
        let delivery = |seq: i64| DeliveryUpdate {
            seq,
            route: "r1".into(),
            sink: "s".into(),
            state: DeliveryState::Failed,
            attempts: 1,
            next_attempt_ms: None,
            last_error: Some("refused".into()),
            attempt: None,
        };
        journal
            .set_deliveries(vec![delivery(seq("e3")), delivery(seq("e7"))])
            .await
            .unwrap();
        (dir, journal)
    }

    #[tokio::test]
    async fn filters_combine_and_pages_follow_each_other_newest_first() {
        let (_dir, journal) = journal().await;
        let list = |filter: EventFilter, before: Option<i64>, limit: u32| {
            journal.list_events(&filter, before, limit).unwrap()
        };
        let all = list(EventFilter::default(), None, 100);
        assert_eq!(all.len(), 12);
        assert_eq!(all[0].id, "e11");
        assert!(all.windows(2).all(|w| w[0].seq > w[1].seq));

        // Pages of 5 below the last seq of the page before: every event once, in order.
        let mut paged = Vec::new();
        let mut cursor = None;
        loop {
            let page = list(EventFilter::default(), cursor, 5);
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
            ids(&list(of_type("rule.a"), None, 100)),
            ["e9", "e6", "e3", "e0"]
        );
        // A glob over several types is merged newest first, and paged like any listing.
        let rules = list(of_type("rule.*"), None, 100);
        assert_eq!(
            ids(&rules),
            ["e10", "e9", "e7", "e6", "e4", "e3", "e1", "e0"]
        );
        let below = rules[2].seq;
        assert_eq!(ids(&list(of_type("rule.*"), Some(below), 2)), ["e6", "e4"]);
        // `[` is itself, as in a route's pattern; `?` is one character.
        assert_eq!(list(of_type("other[?]"), None, 100).len(), 4);
        assert_eq!(list(of_type("other[1]"), None, 100).len(), 4);
        assert!(list(of_type("nothing.*"), None, 100).is_empty());

        let failed = EventFilter {
            states: vec![EventState::Failed],
            ..EventFilter::default()
        };
        assert_eq!(ids(&list(failed.clone(), None, 100)), ["e7", "e3"]);
        let failed_rule_b = EventFilter {
            event_type: Some("rule.b".into()),
            ..failed
        };
        assert_eq!(ids(&list(failed_rule_b, None, 100)), ["e7"]);
        // Several states and a glob: one walk per state and type, merged newest first.
        let settled_rules = EventFilter {
            states: vec![EventState::Failed, EventState::Accepted],
            event_type: Some("rule.*".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            ids(&list(settled_rules.clone(), None, 100)),
            ["e10", "e9", "e7", "e6", "e4", "e3", "e1", "e0"]
        );
        assert_eq!(
            ids(&list(settled_rules.clone(), None, 3)),
            ["e10", "e9", "e7"]
        );
        let below = Some(list(settled_rules.clone(), None, 3)[2].seq);
        assert_eq!(ids(&list(settled_rules, below, 3)), ["e6", "e4", "e3"]);
        let subject = EventFilter {
            subject: Some("S1".into()),
            route: Some("r1".into()),
            ..EventFilter::default()
        };
        assert_eq!(ids(&list(subject, None, 100)), ["e7", "e3"]);
        let no_route = EventFilter {
            route: Some("r2".into()),
            event_type: Some("rule.*".into()),
            ..EventFilter::default()
        };
        assert!(list(no_route, None, 100).is_empty());

        // since is inclusive, until exclusive.
        let window = EventFilter {
            since: Some("2026-12-07T09:04:00.000Z".into()),
            until: Some("2026-12-07T09:07:00.000Z".into()),
            ..EventFilter::default()
        };
        assert_eq!(ids(&list(window, None, 100)), ["e6", "e5", "e4"]);
        journal.close();
    }

    /// A listing by state and type walks the index of both, so a page costs the same however
    /// few of a type's events have the state (through the type's index alone it read every
    /// event of the type when few or none had it); with a subject, the subject's index.
    #[tokio::test]
    async fn a_state_and_type_listing_walks_the_state_and_type_index_and_a_subject_its_own() {
        let (_dir, journal) = journal().await;
        let filter = EventFilter {
            states: vec![EventState::Failed],
            route: Some("r1".into()),
            ..EventFilter::default()
        };
        let plan = query_plan(&journal, &filter, &TypeTest::Exactly("rule.b"));
        assert!(
            plan[0].contains("events_by_state_type (state=? AND type=?)"),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{plan:?}"
        );

        // With a subject, its index: one record's history, whatever the state and type.
        let filter = EventFilter {
            states: vec![EventState::Failed],
            subject: Some("S1".into()),
            ..EventFilter::default()
        };
        let types = ["rule.a".to_owned(), "rule.b".to_owned()];
        let plan = query_plan(&journal, &filter, &TypeTest::AnyOf(&types));
        assert_eq!(
            plan,
            ["SEARCH e USING INDEX events_by_subject (subject=?)"],
            "{plan:?}"
        );
        // And the listing through it finds what it should.
        let failed_rules_of_s1 = EventFilter {
            event_type: Some("rule.*".into()),
            ..filter
        };
        assert_eq!(
            ids(&journal.list_events(&failed_rules_of_s1, None, 10).unwrap()),
            ["e7", "e3"]
        );
        journal.close();
    }

    #[tokio::test]
    async fn a_route_and_a_type_walk_the_route_s_deliveries_of_that_type() {
        let (_dir, journal) = journal().await;
        let through_r1 = |event_type: &str| EventFilter {
            route: Some("r1".into()),
            event_type: Some(event_type.into()),
            ..EventFilter::default()
        };
        let plan = query_plan(
            &journal,
            &through_r1("rule.a"),
            &TypeTest::Exactly("rule.a"),
        );
        assert!(
            plan[0].contains("deliveries_by_route_type (route=? AND type=?)"),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{plan:?}"
        );
        let list = |filter| -> Vec<String> {
            let events = journal.list_events(&filter, None, 10).unwrap();
            ids(&events).into_iter().map(String::from).collect()
        };
        assert_eq!(list(through_r1("rule.a")), ["e3"]);
        assert_eq!(list(through_r1("rule.*")), ["e7", "e3"]);
        // No event of these types went through r1: nothing, without walking them.
        assert!(list(through_r1("other*")).is_empty());
        journal.close();
    }

    #[tokio::test]
    async fn events_are_counted_by_minute_and_state_from_a_time_on() {
        let (_dir, journal) = journal().await;
        let counts = journal
            .received_per_minute("2026-12-07T09:06:00.000Z")
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
        journal
            .write(|conn| {
                conn.execute(
                    "UPDATE events SET received_at = '2026-12-07T09:11:30.000Z' WHERE id = 'e3'",
                    [],
                )
            })
            .await
            .unwrap();
        let last = journal
            .received_per_minute("2026-12-07T09:11:00.000Z")
            .unwrap();
        assert_eq!(
            last,
            [
                ("2026-12-07T09:11".to_owned(), EventState::Accepted, 1),
                ("2026-12-07T09:11".to_owned(), EventState::Failed, 1)
            ]
        );
        journal.close();
    }

    #[tokio::test]
    async fn a_bulk_retry_requeues_only_the_dead_letters_selected() {
        let (_dir, journal) = journal().await;
        let backlog = journal.backlog();
        let filter = EventFilter {
            event_type: Some("rule.b".into()),
            ..EventFilter::default()
        };
        let requeued = journal.requeue_dead_letters(filter, 10).await.unwrap();
        let requeued: Vec<&str> = requeued.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(requeued, ["e7"]);
        assert_eq!(journal.backlog(), backlog + 1);
        assert_eq!(
            journal.get("e7").unwrap().unwrap().state,
            EventState::Accepted
        );
        assert_eq!(
            journal.get("e3").unwrap().unwrap().state,
            EventState::Failed
        );
        // The failed delivery is forgotten, to be tried again.
        assert!(journal.deliveries(8).unwrap().is_empty());
        journal.close();
    }
}
