//! Crash safety: the agent is SIGKILLed at random moments while eight senders deliver events the
//! way a hub does (a delivery that failed or got no answer is sent again, with the same id), and
//! is restarted on the same state directory and ports after each kill. Every event goes through
//! three routes: a file sink, an SQL sink on SQLite and one on PostgreSQL.
//!
//! At the end every acknowledged event is in the journal, and is either applied exactly once to
//! each sink or `superseded` (its revision lower than one applied before it for its subject);
//! per subject the sinks saw the revisions in increasing order; nothing was applied that was
//! never sent; no temporary file is left in the file sink's directory.
//!
//! The run prints its seed: `ESS_CRASHLOOP_SEED` replays its random choices (the subjects and
//! revisions each sender sends, the kill moments), `ESS_CRASHLOOP_ROUNDS` sets the number of
//! kills (20). `scripts/crashloop ROUNDS` runs a long one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use notify::event::{CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::sink_sql::{Db, Kind};
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const SENDERS: usize = 8;
const SUBJECTS: usize = 5;
const DEFAULT_ROUNDS: usize = 20;
/// The longest the agent runs under load before it is killed.
const MAX_KILL_DELAY: Duration = Duration::from_millis(600);
/// One round in this many kills the agent while it starts (recovering its journal), not yet
/// taking deliveries.
const KILL_AT_START_ONE_IN: u32 = 5;
/// The longest a kill at start waits after the process was spawned.
const MAX_START_KILL_DELAY: Duration = Duration::from_millis(300);
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the senders and the last run have, after the last kill, to deliver and apply
/// everything.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// One delivery attempt; a hub gives up on an answer after a while and sends again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Each route's name is also its sink's name.
const FILE_ROUTE: &str = "files";
const SQL_ROUTES: [(&str, Kind); 2] = [("lite", Kind::Sqlite), ("pg", Kind::Postgres)];

const ADAPTER: &str = r#"{"id": id, "subject": subject, "revision": revision}"#;

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
    )
}

/// The id of the event with `revision` of subject number `subject`.
fn event_id(subject: usize, revision: u64) -> String {
    format!("s{subject}-r{revision:06}")
}

// ---------------------------------------------------------------------------------------------
// The senders

/// What the senders share with the test.
struct Deliveries {
    /// True while the agent takes deliveries: a sender whose delivery failed waits for it before
    /// sending again, as a hub's retry would come after the restart.
    up: tokio::sync::watch::Sender<bool>,
    /// False once the senders are to finish what they hold and stop.
    generating: AtomicBool,
    /// The next revision of each subject.
    next_revision: Mutex<[u64; SUBJECTS]>,
    /// Every id sent at least once → (subject, revision).
    sent: Mutex<BTreeMap<String, (usize, u64)>>,
    /// Ids answered 2xx.
    acked: Mutex<BTreeSet<String>>,
    requests: AtomicU64,
    duplicates: AtomicU64,
    /// Answers no hub should get for a valid, signed event.
    problems: Mutex<Vec<String>>,
    /// Set once the last run starts: no delivery is tried after it.
    deadline: Mutex<Option<Instant>>,
}

impl Deliveries {
    fn past_deadline(&self) -> bool {
        self.deadline
            .lock()
            .unwrap()
            .is_some_and(|d| Instant::now() >= d)
    }
}

/// Sends events of random subjects with increasing revisions until told to stop. One time in
/// ten it takes two revisions of a subject and sends the higher first: the lower one, received
/// later, must be superseded.
async fn sender(shared: Arc<Deliveries>, url: String, mut rng: StdRng) {
    let client = plain();
    while shared.generating.load(Ordering::Relaxed) && !shared.past_deadline() {
        let subject = rng.random_range(0..SUBJECTS);
        let swapped = rng.random_ratio(1, 10);
        let revisions = {
            let mut next = shared.next_revision.lock().unwrap();
            let first = next[subject];
            next[subject] += rng.random_range(1..=3);
            if swapped {
                let second = next[subject];
                next[subject] += 1;
                vec![second, first]
            } else {
                vec![first]
            }
        };
        for revision in revisions {
            deliver(&shared, &client, &url, subject, revision).await;
        }
    }
}

/// Delivers one event until it is answered 2xx (or the deadline passes).
async fn deliver(
    shared: &Deliveries,
    client: &ess_agent::http_client::HttpClient,
    url: &str,
    subject: usize,
    revision: u64,
) {
    let id = event_id(subject, revision);
    let body = serde_json::to_vec(&json!({
        "id": id, "version": 1, "type": "rule.updated", "subject": format!("S{subject}"),
        "revision": revision, "payload": {"revision": revision},
    }))
    .unwrap();
    shared
        .sent
        .lock()
        .unwrap()
        .insert(id.clone(), (subject, revision));
    let mut up = shared.up.subscribe();
    loop {
        if shared.past_deadline() {
            return;
        }
        // While the agent is down, wait for the restart (bounded: the deadline is set once the
        // last run is up).
        if tokio::time::timeout(Duration::from_secs(1), up.wait_for(|up| *up))
            .await
            .is_err()
        {
            continue;
        }
        let headers = signed_headers(&id, unix_now(), &body);
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let reply = tokio::time::timeout(
            REQUEST_TIMEOUT,
            request(client, Method::POST, url, &headers, body.clone()),
        )
        .await;
        let retry_after = match reply {
            Ok(Ok(reply)) if reply.status.is_success() => {
                let status = reply.body["status"].as_str().unwrap_or("");
                let expected = match reply.status {
                    StatusCode::ACCEPTED => "accepted",
                    _ => "duplicate",
                };
                if reply.body["ack"] != id.as_str() || status != expected {
                    shared
                        .problems
                        .lock()
                        .unwrap()
                        .push(format!("{id}: answered {} {}", reply.status, reply.body));
                }
                if status == "duplicate" {
                    shared.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                shared.acked.lock().unwrap().insert(id);
                return;
            }
            Ok(Ok(reply))
                if reply.status == StatusCode::TOO_MANY_REQUESTS
                    || reply.status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                Duration::from_millis(50)
            }
            Ok(Ok(reply)) => {
                shared
                    .problems
                    .lock()
                    .unwrap()
                    .push(format!("{id}: answered {} {}", reply.status, reply.body));
                return;
            }
            // Killed mid-request, a connection of the killed process, or no answer in time.
            Ok(Err(_)) | Err(_) => Duration::from_millis(10),
        };
        // A hub's backoff before it sends again.
        tokio::time::sleep(retry_after).await;
    }
}

// ---------------------------------------------------------------------------------------------
// What the file sink's directory saw

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A file was renamed (or created) under this visible name.
    Written(String),
    /// The test's marker that run number n was killed and reaped.
    Killed(usize),
    /// The kernel's event queue overflowed: events were lost.
    Overflow,
}

/// Watches the file sink's directory: the renames into place, in order, and the markers the
/// test writes between runs, so each write is known to belong to one run of the agent.
struct DirWatch {
    seen: Arc<(Mutex<Vec<Seen>>, Condvar)>,
    dir: PathBuf,
    _watcher: notify::RecommendedWatcher,
}

impl DirWatch {
    fn start(dir: &Path) -> DirWatch {
        let seen: Arc<(Mutex<Vec<Seen>>, Condvar)> = Arc::default();
        let mut watcher = {
            let seen = seen.clone();
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let mut found = Vec::new();
                match res {
                    Ok(event) if event.need_rescan() => found.push(Seen::Overflow),
                    Ok(event) => {
                        let written = matches!(
                            event.kind,
                            EventKind::Modify(ModifyKind::Name(RenameMode::To))
                                | EventKind::Create(CreateKind::File)
                        );
                        for path in event.paths.iter().filter(|_| written) {
                            let name = path.file_name().unwrap().to_string_lossy().into_owned();
                            if let Some(n) = name.strip_prefix("killed-") {
                                found.push(Seen::Killed(n.parse().unwrap()));
                            } else if !name.starts_with('.') {
                                found.push(Seen::Written(name));
                            }
                        }
                    }
                    Err(_) => found.push(Seen::Overflow),
                }
                if !found.is_empty() {
                    seen.0.lock().unwrap().extend(found);
                    seen.1.notify_all();
                }
            })
            .unwrap()
        };
        watcher.watch(dir, RecursiveMode::NonRecursive).unwrap();
        DirWatch {
            seen,
            dir: dir.to_owned(),
            _watcher: watcher,
        }
    }

    /// Marks the end of run `run` (the agent is dead): waits until the watcher has passed the
    /// marker, so every write of that run is before it.
    fn mark_killed(&self, run: usize) {
        let marker = self.dir.join(format!("killed-{run}"));
        std::fs::write(&marker, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = self.seen.0.lock().unwrap();
        while !seen.contains(&Seen::Killed(run)) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("the directory watch did not see {marker:?}"));
            seen = self.seen.1.wait_timeout(seen, left).unwrap().0;
        }
        drop(seen);
        std::fs::remove_file(&marker).unwrap();
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.0.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

/// An SQL route, its database, and the table and ledger it writes.
struct SqlTarget {
    route: &'static str,
    db: Db,
    table: String,
    ledger: String,
}

fn config(dir: &Path, targets: &[SqlTarget], ingress: &str, admin: &str) -> String {
    let retry = "retry = { initial_ms = 20, max_ms = 200, max_attempts = 0 }";
    let mut extra = format!(
        "adapters_dir = {adapters:?}\n\
         [ingress]\nlisten = {ingress:?}\n[admin]\nlisten = {admin:?}\n\
         [[routes]]\nname = {FILE_ROUTE:?}\ntypes = [\"rule.*\"]\nadapter = \"crash.jsonata\"\n\
         sink = {FILE_ROUTE:?}\n\
         [sinks.{FILE_ROUTE}]\ntype = \"file\"\ndir = {out:?}\nname = \"{{id}}.json\"\n{retry}\n",
        adapters = dir.join("adapters").display().to_string(),
        out = dir.join("out").display().to_string(),
    );
    for SqlTarget {
        route,
        db,
        table,
        ledger,
    } in targets
    {
        extra.push_str(&format!(
            "[[routes]]\nname = {route:?}\ntypes = [\"rule.*\"]\nadapter = \"crash.jsonata\"\n\
             sink = {route:?}\n\
             [sinks.{route}]\ntype = \"sql\"\nurl = {url:?}\nstatement = {statement:?}\n\
             ledger_table = {ledger:?}\n{retry}\n",
            url = db.url(),
            statement = format!(
                "INSERT INTO {table} (event_id, subject, revision) VALUES (:id, :subject, :revision)"
            ),
        ));
    }
    support::config_text(dir, &extra)
}

/// The agent's backlog (events not yet final), from its metrics.
async fn backlog(agent: &Agent) -> Option<u64> {
    let reply = admin_get(agent, "/metrics").await;
    reply
        .body
        .as_str()?
        .lines()
        .find_map(|l| l.strip_prefix("ess_agent_backlog "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Checks

/// Checks that, per subject, `ids` (in the order a sink took them) have increasing revisions;
/// the same id twice in a row is one apply repeated after a kill, counted elsewhere.
fn check_order(
    sink: &str,
    ids: &[String],
    sent: &BTreeMap<String, (usize, u64)>,
    problems: &mut Vec<String>,
) {
    let mut last: BTreeMap<usize, (String, u64)> = BTreeMap::new();
    for id in ids {
        let Some(&(subject, revision)) = sent.get(id) else {
            continue;
        };
        if let Some((prev_id, prev)) = last.get(&subject)
            && prev_id != id
            && *prev >= revision
        {
            problems.push(format!(
                "{sink}: {id} (revision {revision}) applied after {prev_id} (revision {prev})"
            ));
        }
        last.insert(subject, (id.clone(), revision));
    }
}

/// Checks one sink's applied ids against the events the journal says were applied.
fn check_applied(
    sink: &str,
    ids: &[String],
    applied: &BTreeSet<String>,
    sent: &BTreeMap<String, (usize, u64)>,
    problems: &mut Vec<String>,
) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        *counts.entry(id).or_default() += 1;
    }
    for (id, n) in &counts {
        if !sent.contains_key(*id) {
            problems.push(format!("{sink}: {id} applied but never sent"));
        } else if !applied.contains(*id) {
            problems.push(format!(
                "{sink}: {id} applied but not applied in the journal"
            ));
        } else if *n > 1 {
            problems.push(format!("{sink}: {id} applied {n} times"));
        }
    }
    for id in applied {
        if !counts.contains_key(id.as_str()) {
            problems.push(format!(
                "{sink}: {id} is applied in the journal but not here"
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_or_applied_twice_through_random_kill_9s() {
    let seed: u64 = env_number("ESS_CRASHLOOP_SEED").unwrap_or_else(rand::random);
    let rounds: usize = env_number("ESS_CRASHLOOP_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    eprintln!("crashloop: seed {seed}, {rounds} kills (ESS_CRASHLOOP_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join("crash.jsonata"), ADAPTER).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let watch = DirWatch::start(&out);
    let mut targets = Vec::new();
    for (route, kind) in SQL_ROUTES {
        let db = Db::open(kind, dir.path()).await;
        let table = db.name("crash");
        let ledger = db.name("crash_ledger");
        // No unique key: an event written twice shows as two rows.
        db.exec(&format!(
            "CREATE TABLE {table} ({}, event_id varchar(200) NOT NULL, subject varchar(64) NOT \
             NULL, revision bigint NOT NULL)",
            db.serial()
        ))
        .await;
        targets.push(SqlTarget {
            route,
            db,
            table,
            ledger,
        });
    }

    // The first run picks its ports; every later one listens on the same.
    let mut agent = Agent::start_with(
        dir.path(),
        &config(dir.path(), &targets, "127.0.0.1:0", "127.0.0.1:0"),
    );
    let ingress = agent.ingress.to_string();
    std::fs::write(
        &agent.config_path,
        config(dir.path(), &targets, &ingress, &agent.admin.to_string()),
    )
    .unwrap();
    let config_path = agent.config_path.clone();

    let shared = Arc::new(Deliveries {
        up: tokio::sync::watch::Sender::new(true),
        generating: AtomicBool::new(true),
        next_revision: Mutex::new([0; SUBJECTS]),
        sent: Mutex::default(),
        acked: Mutex::default(),
        requests: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        problems: Mutex::default(),
        deadline: Mutex::new(None),
    });
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let rng = StdRng::seed_from_u64(rng.random());
            tokio::spawn(sender(shared.clone(), agent.url("/v1/events"), rng))
        })
        .collect();

    let mut kills_at_start = 0;
    for round in 0..rounds {
        if round > 0 {
            if rng.random_ratio(1, KILL_AT_START_ONE_IN) {
                agent = Agent::spawn(&config_path, &[]);
                let delay = rng.random_range(Duration::ZERO..=MAX_START_KILL_DELAY);
                // The random moment of the kill.
                tokio::time::sleep(delay).await;
                kills_at_start += 1;
                agent.kill9();
                watch.mark_killed(round);
                continue;
            }
            agent = Agent::spawn(&config_path, &[]);
            assert!(
                agent.wait_ready(START_TIMEOUT),
                "run {round} did not start (seed {seed}); log:\n{}",
                tail(&agent.log_text(), 40)
            );
            assert_eq!(agent.ingress.to_string(), ingress);
            shared.up.send_replace(true);
        }
        let delay = rng.random_range(Duration::ZERO..=MAX_KILL_DELAY);
        // The random moment of the kill.
        tokio::time::sleep(delay).await;
        shared.up.send_replace(false);
        agent.kill9();
        watch.mark_killed(round);
    }

    // The last run: the senders finish what they hold, then the agent applies the backlog.
    shared.generating.store(false, Ordering::Relaxed);
    let mut agent = Agent::start_config(&config_path, &[]);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    *shared.deadline.lock().unwrap() = Some(deadline);
    shared.up.send_replace(true);
    for s in senders {
        s.await.unwrap();
    }
    loop {
        if backlog(&agent).await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog was not applied in {DRAIN_TIMEOUT:?} (seed {seed}); log tail:\n{}",
            tail(&agent.log_text(), 40)
        );
        // The backlog has no log line to wait on; poll it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        agent
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "the last run did not stop cleanly; log tail:\n{}",
        tail(&agent.log_text(), 40)
    );

    let sent = shared.sent.lock().unwrap().clone();
    let acked = shared.acked.lock().unwrap().clone();
    let mut problems = shared.problems.lock().unwrap().clone();
    for id in sent.keys().filter(|id| !acked.contains(*id)) {
        problems.push(format!("{id}: never acknowledged"));
    }

    // The journal: every acknowledged event is there, final; walking each subject in receive
    // order, an event is superseded exactly when a higher revision was applied before it.
    let journal = rusqlite::Connection::open(agent.state_dir.join(ess_agent::journal::FILE_NAME))
        .expect("open the journal");
    let events: Vec<(String, String, i64, String)> = journal
        .prepare("SELECT id, subject, revision, state FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let in_journal: BTreeSet<&str> = events.iter().map(|e| e.0.as_str()).collect();
    for id in acked.iter().filter(|id| !in_journal.contains(id.as_str())) {
        problems.push(format!("{id}: acknowledged but not in the journal"));
    }
    let mut applied = BTreeSet::new();
    let mut superseded = BTreeSet::new();
    let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, subject, revision, state) in &events {
        if !sent.contains_key(id) {
            problems.push(format!("{id}: in the journal but never sent"));
        }
        let stale = highest.get(subject.as_str()).is_some_and(|h| revision < h);
        let expected = if stale { "superseded" } else { "applied" };
        if state != expected {
            problems.push(format!(
                "{id}: {state}, expected {expected} (subject {subject}, revision {revision}, \
                 highest applied before it {:?})",
                highest.get(subject.as_str())
            ));
        }
        match state.as_str() {
            "applied" => {
                applied.insert(id.clone());
                let h = highest.entry(subject.as_str()).or_insert(*revision);
                *h = (*h).max(*revision);
            }
            "superseded" => {
                superseded.insert(id.clone());
            }
            _ => {}
        }
    }

    // The SQL sinks: one row per applied event, in revision order per subject, and the ledger
    // names the same events.
    for SqlTarget {
        route,
        db,
        table,
        ledger,
    } in &targets
    {
        let ids: Vec<String> = db
            .rows(&format!("SELECT event_id FROM {table} ORDER BY seq"))
            .await
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect();
        check_applied(route, &ids, &applied, &sent, &mut problems);
        check_order(route, &ids, &sent, &mut problems);
        let ledgered: Vec<String> = db
            .rows(&format!(
                "SELECT event_id FROM {ledger} WHERE route = '{route}'"
            ))
            .await
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect();
        check_applied(
            &format!("{route} ledger"),
            &ledgered,
            &applied,
            &sent,
            &mut problems,
        );
    }

    // The file sink: one file per applied event, with its content; each written at most once
    // per run of the agent (a run killed before it journaled the write writes it again); in
    // revision order per subject.
    let seen = watch.seen();
    if seen.contains(&Seen::Overflow) {
        problems.push(
            "the directory watch lost events (raise fs.inotify.max_queued_events)".to_string(),
        );
    }
    let mut run = 0;
    let mut in_run = BTreeSet::new();
    let mut written = Vec::new();
    for s in &seen {
        match s {
            Seen::Killed(n) => {
                run = n + 1;
                in_run.clear();
            }
            Seen::Written(name) => {
                let id = name.strip_suffix(".json").unwrap_or(name).to_string();
                if !in_run.insert(id.clone()) {
                    problems.push(format!("{FILE_ROUTE}: {id} written twice in run {run}"));
                }
                written.push(id);
            }
            Seen::Overflow => {}
        }
    }
    check_order(FILE_ROUTE, &written, &sent, &mut problems);
    let mut files = Vec::new();
    let mut temporary = Vec::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp") {
            temporary.push(name);
            continue;
        }
        let Some(id) = name.strip_suffix(".json") else {
            problems.push(format!("{FILE_ROUTE}: unexpected file {name}"));
            continue;
        };
        let content: Value =
            serde_json::from_slice(&std::fs::read(out.join(&name)).unwrap()).unwrap_or_default();
        if let Some(&(subject, revision)) = sent.get(id)
            && content != json!({"id": id, "subject": format!("S{subject}"), "revision": revision})
        {
            problems.push(format!("{FILE_ROUTE}: {name} holds {content}"));
        }
        files.push(id.to_string());
    }
    check_applied(FILE_ROUTE, &files, &applied, &sent, &mut problems);

    eprintln!(
        "crashloop: seed {seed}; {rounds} kills ({kills_at_start} while starting); {} events \
         sent in {} requests, {} acknowledged ({} of them as duplicates); {} applied to each of \
         {} sinks, {} superseded; {:.1} s",
        sent.len(),
        shared.requests.load(Ordering::Relaxed),
        acked.len(),
        shared.duplicates.load(Ordering::Relaxed),
        applied.len(),
        1 + targets.len(),
        superseded.len(),
        started.elapsed().as_secs_f64(),
    );
    assert!(
        problems.is_empty(),
        "{} problems (seed {seed}):\n{}",
        problems.len(),
        problems
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !superseded.is_empty() && !applied.is_empty(),
        "the run applied {} and superseded {} events: too few to say anything (seed {seed})",
        applied.len(),
        superseded.len()
    );
    temporary.sort();
    assert!(
        temporary.is_empty(),
        "temporary files left in the file sink's directory (seed {seed}): {temporary:?}"
    );
}
