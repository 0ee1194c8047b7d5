//! Several agents sharing one PostgreSQL journal: any agent accepts, each subject is applied by
//! one agent at a time in order, a dead agent's subjects are taken over within the lease, and
//! PostgreSQL going away means 503s, never a 2xx for an event that was not committed.
//!
//! The journal lives in a schema of the test's own (in the shared server on 127.0.0.1:5432, or
//! in a server the test starts itself when it must stop it); the SQL sink's table and ledger
//! have names of their own, so tests run in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Row as _;

use crate::sink_sql::{Db, Kind, event, post, tail, toml_str, write_adapter};
use crate::support::postgres::{OwnServer, Schema};
use crate::support::{self, Agent};

const EVENTS: &str = "/v1/events";

/// The configuration of one agent of a group: its own state directory and listeners, the
/// shared journal, and one route writing `{id, subject, n}` rows through the ledger.
fn member_config(dir: &Path, journal: &str, db: &Db, table: &str, ledger: &str) -> String {
    write_adapter(
        dir,
        "rows.jsonata",
        r#"{"id": id, "subject": subject, "n": payload.n}"#,
    );
    let statement =
        format!("INSERT INTO {table} (event_id, subject, n) VALUES (:id, :subject, :n)");
    support::config_text(
        dir,
        &format!(
            "adapters_dir = {:?}\n{journal}\n\
             [[routes]]\nname = \"rows\"\ntypes = [\"*\"]\nadapter = \"rows.jsonata\"\nsink = \"rows\"\n\
             [sinks.rows]\ntype = \"sql\"\nurl = {}\nstatement = {}\nledger_table = {ledger:?}\n\
             max_batch = 32\nmax_linger_ms = 2\n\
             retry = {{ initial_ms = 20, max_ms = 200, max_attempts = 0 }}\n\
             [dispatch]\nmax_parallel = 32\n",
            dir.join("adapters").display().to_string(),
            toml_str(&db.url()),
            toml_str(&statement),
        ),
    )
}

/// The id of event `n` of subject `s`.
fn id_of(s: usize, n: usize) -> String {
    format!("s{s:02}-n{n:03}")
}

/// The agents' ingress URLs, as a hub's list of receivers: a delivery that fails goes to the
/// next one.
type Receivers = Arc<Mutex<Vec<String>>>;

/// Delivers every event of subject `s` in order like a hub behind a load balancer: event `n + 1`
/// only once `n` got its 2xx, each delivery to the next receiver in turn, and a delivery that
/// failed (connection refused, a 503) again to the next one after a short pause.
async fn deliver_subject(
    s: usize,
    per_subject: usize,
    receivers: Receivers,
    acked: Arc<Mutex<BTreeSet<String>>>,
    refused: Arc<Mutex<u32>>,
) {
    let mut turn = s;
    for n in 0..per_subject {
        let id = id_of(s, n);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let url = {
                let receivers = receivers.lock().unwrap();
                receivers[turn % receivers.len()].clone()
            };
            turn += 1;
            let body = event(&id, "count", &format!("S{s:02}"), json!({"n": n}));
            match post(&url, &id, body).await {
                Ok(r) if r.status.is_success() => {
                    acked.lock().unwrap().insert(id.clone());
                    break;
                }
                Ok(r) if r.status == http::StatusCode::SERVICE_UNAVAILABLE => {
                    assert!(
                        r.headers.contains_key("retry-after"),
                        "a 503 says when to come back: {:?}",
                        r.headers
                    );
                    *refused.lock().unwrap() += 1;
                }
                Ok(r) => panic!("{id}: {} {:?}", r.status, r.body),
                Err(_) => {}
            }
            assert!(Instant::now() < deadline, "{id} was never accepted");
            // A hub's pause before it delivers again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts [`deliver_subject`] for each of `subjects` subjects.
fn deliver_all(
    subjects: usize,
    per_subject: usize,
    receivers: &Receivers,
    acked: &Arc<Mutex<BTreeSet<String>>>,
    refused: &Arc<Mutex<u32>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..subjects)
        .map(|s| {
            tokio::spawn(deliver_subject(
                s,
                per_subject,
                receivers.clone(),
                acked.clone(),
                refused.clone(),
            ))
        })
        .collect()
}

/// The shared table and ledger of a group, created in the shared server.
async fn rows_table(dir: &Path) -> (Db, String, String) {
    let db = Db::open(Kind::Postgres, dir).await;
    let table = db.name("ha_rows");
    let ledger = db.name("ha_ledger");
    db.exec(&format!(
        "CREATE TABLE {table} (seq bigserial PRIMARY KEY, event_id text NOT NULL, \
         subject text NOT NULL, n bigint NOT NULL)"
    ))
    .await;
    (db, table, ledger)
}

/// Waits until `table` holds `count` rows.
async fn wait_rows(db: &Db, table: &str, count: usize, timeout: Duration, agents: &[&Agent]) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = db.count(table).await;
        if rows >= count as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {rows} of {count} rows after {timeout:?}; logs:\n{}",
            agents
                .iter()
                .map(|a| tail(&a.log_text(), 15))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every event in `all` was written exactly once (the table and the ledger agree), and each
/// subject's rows are in the order of `n`.
async fn assert_once_in_order(db: &Db, table: &str, ledger: &str, all: &BTreeSet<String>) {
    let rows = db
        .rows(&format!(
            "SELECT event_id, subject, CAST(n AS text) FROM {table} ORDER BY seq"
        ))
        .await;
    let ids: Vec<String> = rows.iter().map(|r| r[0].clone().unwrap()).collect();
    let distinct: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), distinct.len(), "an event was applied twice");
    assert_eq!(&distinct, all, "every event applied");
    let in_ledger: BTreeSet<String> = db
        .rows(&format!("SELECT event_id FROM {ledger}"))
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(
        &in_ledger, all,
        "the ledger names exactly the applied events"
    );
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for row in &rows {
        let subject = row[1].clone().unwrap();
        let n: i64 = row[2].as_deref().unwrap().parse().unwrap();
        if let Some(prev) = last.insert(subject.clone(), n) {
            assert!(prev < n, "subject {subject}: {n} applied after {prev}");
        }
    }
}

/// The journal's agent id, from the agent's `ready` line.
fn journal_agent(agent: &Agent) -> String {
    let ready = agent
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "ready")
        .expect("a ready line");
    let journal = ready["journal"].as_str().unwrap_or_default();
    journal
        .rsplit_once("(agent ")
        .map(|(_, id)| id.trim_end_matches(')').to_owned())
        .unwrap_or_else(|| panic!("no agent id in {journal:?}"))
}

/// The owner of every leased partition.
async fn owners(schema: &Schema) -> BTreeMap<i32, Option<String>> {
    let pool = schema.pool().await;
    let rows = sqlx::query("SELECT part, owner FROM partitions ORDER BY part")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter()
        .map(|r| (r.get::<i32, _>(0), r.get::<Option<String>, _>(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_share_one_journal_and_apply_every_event_once_in_subject_order() {
    const SUBJECTS: usize = 24;
    const PER_SUBJECT: usize = 12;
    let schema = Schema::create().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (db, table, ledger) = rows_table(dirs[0].path()).await;
    let agents: Vec<Agent> = dirs
        .iter()
        .map(|d| {
            let config =
                member_config(d.path(), &schema.journal_section(4.0), &db, &table, &ledger);
            Agent::start_with(d.path(), &config)
        })
        .collect();
    let receivers: Receivers = Arc::new(Mutex::new(agents.iter().map(|a| a.url(EVENTS)).collect()));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0));
    let posters = deliver_all(SUBJECTS, PER_SUBJECT, &receivers, &acked, &refused);
    for p in posters {
        p.await.unwrap();
    }
    let all: BTreeSet<String> = (0..SUBJECTS)
        .flat_map(|s| (0..PER_SUBJECT).map(move |n| id_of(s, n)))
        .collect();
    assert_eq!(*acked.lock().unwrap(), all);
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_rows(&db, &table, all.len(), Duration::from_secs(60), &refs).await;
    assert_once_in_order(&db, &table, &ledger, &all).await;

    // Every agent accepted events, and the partitions are spread over the three.
    let pool = schema.pool().await;
    let by_agent: Vec<(String, i64)> =
        sqlx::query("SELECT received_by, count(*) FROM events GROUP BY received_by")
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(by_agent.len(), 3, "each agent accepted some: {by_agent:?}");
    let not_applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE state <> 'applied'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(not_applied, 0, "the journal has every event applied");
    pool.close().await;
    let holders: BTreeSet<String> = owners(&schema).await.into_values().flatten().collect();
    assert_eq!(
        holders.len(),
        3,
        "the partitions are spread over the three agents"
    );
    // A redelivery to another agent is a duplicate.
    let again = post(
        &agents[2].url(EVENTS),
        &id_of(0, 0),
        event(&id_of(0, 0), "count", "S00", json!({"n": 0})),
    )
    .await
    .unwrap();
    assert_eq!(again.status, http::StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body["status"], "duplicate", "{:?}", again.body);
    drop(agents);
    schema.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_agent_mid_stream_loses_nothing_and_the_others_take_over_within_the_lease() {
    const SUBJECTS: usize = 24;
    const PER_SUBJECT: usize = 30;
    const LEASE_SECONDS: f64 = 4.0;
    let schema = Schema::create().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (db, table, ledger) = rows_table(dirs[0].path()).await;
    let configs: Vec<String> = dirs
        .iter()
        .map(|d| {
            member_config(
                d.path(),
                &schema.journal_section(LEASE_SECONDS),
                &db,
                &table,
                &ledger,
            )
        })
        .collect();
    let mut agents: Vec<Agent> = dirs
        .iter()
        .zip(&configs)
        .map(|(d, c)| Agent::start_with(d.path(), c))
        .collect();
    let receivers: Receivers = Arc::new(Mutex::new(agents.iter().map(|a| a.url(EVENTS)).collect()));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0));
    let posters = deliver_all(SUBJECTS, PER_SUBJECT, &receivers, &acked, &refused);
    let total = SUBJECTS * PER_SUBJECT;
    // Three rounds, each killing another agent at another point of the stream.
    for round in 0..3 {
        let kill_at = (round + 1) * total / 5;
        let refs: Vec<&Agent> = agents.iter().collect();
        wait_rows(&db, &table, kill_at, Duration::from_secs(90), &refs).await;
        let victim = round % agents.len();
        let id = journal_agent(&agents[victim]);
        agents[victim].kill9();
        let killed = Instant::now();
        // Its partitions go to the survivors within the lease.
        loop {
            let held = owners(&schema).await;
            if !held.values().any(|o| o.as_deref() == Some(id.as_str())) {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs_f64(LEASE_SECONDS + 4.0),
                "the dead agent's partitions were not taken over within the lease: {held:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // It comes back (as a restarted service would) on its own state directory.
        agents[victim] = Agent::start_with(dirs[victim].path(), &configs[victim]);
        receivers.lock().unwrap()[victim] = agents[victim].url(EVENTS);
    }
    for p in posters {
        p.await.unwrap();
    }
    let all: BTreeSet<String> = (0..SUBJECTS)
        .flat_map(|s| (0..PER_SUBJECT).map(move |n| id_of(s, n)))
        .collect();
    assert_eq!(*acked.lock().unwrap(), all, "every event acknowledged");
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_rows(&db, &table, total, Duration::from_secs(60), &refs).await;
    assert_once_in_order(&db, &table, &ledger, &all).await;
    drop(agents);
    schema.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_stopped_for_10_s_means_503s_then_every_acknowledged_event_is_applied() {
    const SUBJECTS: usize = 8;
    const PER_SUBJECT: usize = 40;
    let server = tokio::task::spawn_blocking(OwnServer::start).await.unwrap();
    let schema = Schema::create_at(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "copy.jsonata", r#"{"id": id, "n": payload.n}"#);
    let out = dir.path().join("out");
    let config = support::config_text(
        dir.path(),
        &format!(
            "adapters_dir = {:?}\n{}\
             [[routes]]\nname = \"files\"\ntypes = [\"*\"]\nadapter = \"copy.jsonata\"\nsink = \"files\"\n\
             [sinks.files]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
            dir.path().join("adapters").display().to_string(),
            schema.journal_section(4.0),
            out.display().to_string(),
        ),
    );
    let agent = Agent::start_with(dir.path(), &config);
    let receivers: Receivers = Arc::new(Mutex::new(vec![agent.url(EVENTS)]));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0));
    let posters = deliver_all(SUBJECTS, PER_SUBJECT, &receivers, &acked, &refused);
    // Mid-stream, PostgreSQL crashes and stays down for 10 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < SUBJECTS * PER_SUBJECT / 4 {
        assert!(Instant::now() < deadline, "events were not accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = {
        let server = &server;
        tokio::task::block_in_place(|| server.stop_immediately());
        Instant::now()
    };
    let acked_at_stop = acked.lock().unwrap().len();
    // Readiness says why events are refused, so that a load balancer knows.
    let readyz = wait_readyz(&agent, http::StatusCode::SERVICE_UNAVAILABLE).await;
    let reason = readyz.body["reasons"]["journal"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("PostgreSQL"), "{:?}", readyz.body);
    // Waiting out the rest of the outage is the test: deliveries meanwhile must be refused.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    let acked_during = acked.lock().unwrap().len() - acked_at_stop;
    let refused_during = *refused.lock().unwrap();
    tokio::task::block_in_place(|| server.start_again());
    let down_for = stopped.elapsed();
    wait_readyz(&agent, http::StatusCode::OK).await;
    for p in posters {
        p.await.unwrap();
    }
    // Requests in flight when it stopped may have committed just before; nothing after.
    assert!(
        acked_during <= SUBJECTS,
        "{acked_during} events were acknowledged while PostgreSQL was down for {down_for:?}"
    );
    assert!(
        refused_during > 0,
        "no delivery was refused with 503 while PostgreSQL was down"
    );
    // Every acknowledged event is in the journal (its COMMIT had returned) and is applied.
    let all: BTreeSet<String> = (0..SUBJECTS)
        .flat_map(|s| (0..PER_SUBJECT).map(move |n| id_of(s, n)))
        .collect();
    assert_eq!(*acked.lock().unwrap(), all);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<&String> = all
            .iter()
            .filter(|id| !out.join(format!("{id}.json")).exists())
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events were never applied (e.g. {:?}); log:\n{}",
            missing.len(),
            missing.first(),
            tail(&agent.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agent);
    schema.drop_now().await;
}

/// Polls the agent's `/readyz` until it answers `want` (readiness follows the journal's own
/// check, once a second).
async fn wait_readyz(agent: &Agent, want: http::StatusCode) -> support::Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = support::admin_get(agent, "/readyz").await;
        if reply.status == want {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed {}: {:?}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_ack_mode_applied_an_agent_answers_with_the_outcome_another_agent_applied() {
    const EVENTS_SENT: usize = 12;
    let schema = Schema::create().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents: Vec<Agent> = dirs
        .iter()
        .map(|d| {
            write_adapter(d.path(), "copy.jsonata", r#"{"id": id}"#);
            let config = support::config_text(
                d.path(),
                &format!(
                    "adapters_dir = {:?}
{}                     [ingress]
listen = \"127.0.0.1:0\"
ack_mode = \"applied\"
ack_timeout_ms = 10000
                     [[routes]]
name = \"files\"
types = [\"*\"]
adapter = \"copy.jsonata\"
sink = \"files\"
                     [sinks.files]
type = \"file\"
dir = {:?}
name = \"{{id}}.json\"
",
                    d.path().join("adapters").display().to_string(),
                    schema.journal_section(4.0),
                    d.path().join("out").display().to_string(),
                ),
            );
            Agent::start_with(d.path(), &config)
        })
        .collect();
    // The agents share the partitions out (the first took them all; it gives back its surplus
    // over two lease rounds).
    let deadline = Instant::now() + Duration::from_secs(20);
    while owners(&schema)
        .await
        .into_values()
        .flatten()
        .collect::<BTreeSet<_>>()
        .len()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the partitions were not shared out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every event goes to the first agent; the subjects are spread over both agents'
    // partitions, so the second applies some of them.
    for n in 0..EVENTS_SENT {
        let id = format!("e-{n}");
        let reply = post(
            &agents[0].url(EVENTS),
            &id,
            event(&id, "count", &format!("S{n}"), json!({})),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, http::StatusCode::OK, "{id}: {:?}", reply.body);
        assert_eq!(reply.body["status"], "applied", "{id}: {:?}", reply.body);
    }
    let applied_by_second = std::fs::read_dir(dirs[1].path().join("out"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        applied_by_second > 0,
        "the second agent applied none of the events: the test shows nothing"
    );
    drop(agents);
    schema.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_started_at_once_on_an_empty_database_migrate_it_once_and_label_their_metrics() {
    let schema = Schema::create().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents: Vec<Agent> = dirs
        .iter()
        .map(|d| {
            let config = support::config_text(d.path(), &schema.journal_section(4.0));
            let path = d.path().join("ess-agent.toml");
            std::fs::write(&path, config).unwrap();
            Agent::spawn(&path, &[])
        })
        .collect();
    for agent in &mut agents {
        assert!(
            agent.wait_ready(Duration::from_secs(30)),
            "both agents start; log:\n{}",
            agent.log_text()
        );
    }
    let migrated: Vec<bool> = agents
        .iter()
        .map(|a| {
            a.log_text()
                .contains("migrated the journal's PostgreSQL schema")
        })
        .collect();
    assert_eq!(
        migrated.iter().filter(|m| **m).count(),
        1,
        "exactly one agent migrated: {migrated:?}"
    );
    // Each agent's metrics carry its journal agent id, so that the agents are told apart.
    for agent in &agents {
        let id = journal_agent(agent);
        let metrics = support::admin_get(agent, "/metrics").await;
        let text = metrics.body.as_str().unwrap_or_default();
        let backlog = text
            .lines()
            .find(|l| l.starts_with("ess_agent_backlog"))
            .unwrap_or_else(|| panic!("no backlog gauge in:\n{text}"));
        assert!(
            backlog.contains(&format!("agent=\"{id}\"")),
            "{backlog} does not name agent {id}"
        );
    }
    let pool = schema.pool().await;
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version::bigint FROM journal_migrations")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(versions, vec![1], "each migration applied once");
    pool.close().await;
    drop(agents);
    schema.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_journal_moved_into_postgresql_keeps_its_dead_letters_and_its_backlog_is_applied()
{
    const WAITING: usize = 12;
    const PARKED: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "copy.jsonata", r#"{"id": id, "n": payload.n}"#);
    let adapters = dir.path().join("adapters").display().to_string();
    let route = |sink: &str| {
        format!(
            "adapters_dir = {adapters:?}\n\
             [[routes]]\nname = \"partner\"\ntypes = [\"count\"]\nadapter = \"copy.jsonata\"\nsink = \"partner\"\n\
             [sinks.partner]\n{sink}\n"
        )
    };
    // On SQLite, the partner's API is down (nothing listens): the events wait for a retry,
    // and events of a type no route takes are parked.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/rules", closed.local_addr().unwrap());
    drop(closed);
    let on_sqlite = support::config_text(
        dir.path(),
        &route(&format!(
            "type = \"http\"\nurl = {closed_url:?}\ntimeout_ms = 500\n\
             retry = {{ initial_ms = 2000, max_ms = 2000, max_attempts = 0 }}"
        )),
    );
    let agent = Agent::start_with(dir.path(), &on_sqlite);
    let receivers: Receivers = Arc::new(Mutex::new(vec![agent.url(EVENTS)]));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0));
    for s in 0..WAITING / 4 {
        deliver_subject(s, 4, receivers.clone(), acked.clone(), refused.clone()).await;
    }
    for p in 0..PARKED {
        let id = format!("unrouted-{p}");
        let reply = post(&agent.url(EVENTS), &id, event(&id, "other", "X", json!({})))
            .await
            .unwrap();
        assert!(reply.status.is_success(), "{:?}", reply.body);
    }
    // Every event has been tried (and waits for a retry) before the agent stops.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tried = support::admin_get(&agent, "/v1/events?state=accepted&limit=100").await;
        let parked = support::admin_get(&agent, "/v1/dead-letters").await;
        let waiting = tried.body["items"].as_array().map_or(0, Vec::len);
        if waiting == WAITING && parked.body["total"] == PARKED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} waiting, dead letters {}",
            parked.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agent);

    // The same configuration with the journal in PostgreSQL and the partner's API back (a file
    // drop stands in for it).
    let schema = Schema::create().await;
    let out = dir.path().join("out");
    let on_postgres = support::config_text(
        dir.path(),
        &format!(
            "{}{}",
            route(&format!(
                "type = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"",
                out.display().to_string()
            )),
            schema.journal_section(4.0)
        ),
    );
    let config_path = dir.path().join("postgres.toml");
    std::fs::write(&config_path, &on_postgres).unwrap();
    let import = std::process::Command::new(support::binary())
        .args(["journal", "import", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&import.stdout).into_owned();
    assert!(
        import.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&import.stderr)
    );
    assert!(
        said.contains(&format!("imported {} events", WAITING + PARKED))
            && said.contains(&format!(
                "{WAITING} waiting to be applied, {PARKED} dead letters"
            )),
        "{said}"
    );
    // A second import into the same journal is refused.
    let again = std::process::Command::new(support::binary())
        .args(["journal", "import", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!again.status.success(), "a second import is refused");

    let agent = Agent::start_config(&config_path, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let backlog: Vec<String> = acked.lock().unwrap().iter().cloned().collect();
    for id in &backlog {
        while !out.join(format!("{id}.json")).exists() {
            assert!(
                Instant::now() < deadline,
                "{id} of the imported backlog was not applied; log:\n{}",
                tail(&agent.log_text(), 20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let dead = support::admin_get(&agent, "/v1/dead-letters").await;
    assert_eq!(dead.body["total"], PARKED, "{}", dead.body);
    let first = support::admin_get(&agent, "/v1/events/unrouted-0").await;
    assert_eq!(first.body["state"], "parked", "{}", first.body);
    drop(agent);
    schema.drop_now().await;
}
