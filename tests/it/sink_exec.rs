//! The `exec` sink with real programs: shell scripts each test writes into its own temporary
//! directory, run by the real agent.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::kill9::{self, AfterKills};
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";

/// Passes the event's subject and payload through.
const PASS_THROUGH: &str = r#"{"subject": subject, "payload": payload}"#;

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\nset -u\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A shell word that stands for `path` as it is.
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// A TOML string literal.
fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// A route `erp` of every event through the pass-through adapter into an `exec` sink running
/// `program`, with the sink's further keys in `sink`, and `top` before the tables.
fn config(dir: &Path, top: &str, program: &Path, sink: &str) -> String {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join("pass.jsonata"), PASS_THROUGH).unwrap();
    support::config_text(
        dir,
        &format!(
            "adapters_dir = {adapters}\n{top}\n[[routes]]\nname = \"erp\"\nadapter = \
             \"pass.jsonata\"\nsink = \"erp\"\n\n[sinks.erp]\ntype = \"exec\"\nprogram = \
             {program}\n{sink}\n",
            adapters = toml_str(&adapters.display().to_string()),
            program = toml_str(&program.display().to_string()),
        ),
    )
}

fn event(id: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "version": 2, "type": "rule.updated", "subject": subject, "revision": 9,
        "payload": payload
    }))
    .unwrap()
}

async fn post(agent: &Agent, id: &str, subject: &str, payload: Value) {
    let body = event(id, subject, payload);
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{id}: {:?}", reply.body);
}

/// Waits until the agent logs that `id` is final for the `nth` time (1-based); returns that
/// log line.
fn wait_final(agent: &Agent, id: &str, nth: usize, timeout: Duration) -> Value {
    let mut seen = 0;
    agent
        .wait_for_log(timeout, |v| {
            seen += usize::from(v["message"] == "event final" && v["event_id"] == id);
            seen == nth
        })
        .unwrap_or_else(|| {
            panic!(
                "event {id} did not become final; log:\n{}",
                agent.log_text()
            )
        })
}

/// Waits until every id in `ids` is final; returns id → state.
fn wait_all_final(
    agent: &Agent,
    ids: &BTreeSet<String>,
    timeout: Duration,
) -> BTreeMap<String, String> {
    let mut finals = BTreeMap::new();
    agent.wait_for_log(timeout, |v| {
        if v["message"] == "event final"
            && let Some(id) = v["event_id"].as_str()
            && ids.contains(id)
        {
            finals.insert(
                id.to_string(),
                v["state"].as_str().unwrap_or("").to_string(),
            );
        }
        finals.len() == ids.len()
    });
    assert_eq!(
        finals.len(),
        ids.len(),
        "not every event became final; log:\n{}",
        agent.log_text()
    );
    finals
}

/// The ids a script appended to `file`, one per line, with how often each came.
fn counted(file: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in std::fs::read_to_string(file).unwrap_or_default().lines() {
        *counts.entry(id.to_string()).or_default() += 1;
    }
    counts
}

/// Posts events `{tag}-{n}` for `n` in `range` from `tasks` tasks over `subjects` subjects until
/// `stop` is set or the agent stops answering; returns the ids accepted.
fn post_many(
    agent: &Agent,
    tag: &str,
    range: std::ops::Range<usize>,
    tasks: usize,
    subjects: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    support::post_many(agent, tag, range, tasks, stop, move |id, n| {
        event(id, &format!("S{}", n % subjects), json!({"n": n}))
    })
}

/// The process ids whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_reads_the_output_on_stdin_and_the_event_from_an_environment_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "out={out}\ncat > \"$out/$ESS_EVENT_ID.stdin\"\nenv > \"$out/$ESS_EVENT_ID.env\"\n\
             pwd > \"$out/$ESS_EVENT_ID.pwd\"\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > \
             \"$out/$ESS_EVENT_ID.args\"\necho \"applied $ESS_EVENT_ID\"\n\
             echo \"a warning about $ESS_EVENT_SUBJECT\" >&2\n",
            out = sh_quote(&out),
        ),
    );
    let config = config(
        dir.path(),
        "",
        &program,
        &format!(
            "args = [\"--subject={{subject}}\", \"{{output.payload.court}}\", \"two words; $(no \
             shell)\"]\nworking_dir = {work}\nenv_allow = [\"PATH\", \"PARTNER_HINT\", \
             \"NOT_SET_ANYWHERE\"]\n",
            work = toml_str(&work.display().to_string()),
        ),
    );
    let config_path = dir.path().join("ess-agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let agent = Agent::start_config(
        &config_path,
        &[
            ("PARTNER_HINT", "visible"),
            ("HUB_TOKEN", "s3cret-token-value"),
        ],
    );
    post(
        &agent,
        "e1",
        "RULE 7",
        json!({"court": "IL-COOK", "deadline": "16:00"}),
    )
    .await;
    let line = wait_final(&agent, "e1", 1, Duration::from_secs(20));
    assert_eq!(line["state"], "applied", "{line}");

    let stdin: Value =
        serde_json::from_slice(&std::fs::read(out.join("e1.stdin")).unwrap()).unwrap();
    assert_eq!(
        stdin,
        json!({"subject": "RULE 7", "payload": {"court": "IL-COOK", "deadline": "16:00"}})
    );
    let args = std::fs::read_to_string(out.join("e1.args")).unwrap();
    assert_eq!(
        args.lines().collect::<Vec<_>>(),
        ["--subject=RULE 7", "IL-COOK", "two words; $(no shell)"]
    );
    assert_eq!(
        std::fs::read_to_string(out.join("e1.pwd")).unwrap().trim(),
        work.canonicalize().unwrap().display().to_string()
    );
    let env: BTreeMap<String, String> = std::fs::read_to_string(out.join("e1.env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (name, value) in [
        ("ESS_EVENT_ID", "e1"),
        ("ESS_EVENT_TYPE", "rule.updated"),
        ("ESS_EVENT_VERSION", "2"),
        ("ESS_EVENT_SUBJECT", "RULE 7"),
        ("ESS_EVENT_REVISION", "9"),
        ("ESS_ROUTE", "erp"),
        ("ESS_PARTNER", "test-partner"),
        ("ESS_SINK", "erp"),
        ("ESS_CONTENT_TYPE", "application/json"),
        ("PARTNER_HINT", "visible"),
    ] {
        assert_eq!(
            env.get(name).map(String::as_str),
            Some(value),
            "{name}: {env:?}"
        );
    }
    assert!(env.contains_key("PATH"), "{env:?}");
    // Nothing else of the agent's environment: not its secret, not its own ESS_ settings.
    assert!(!env.contains_key("HUB_TOKEN"), "{env:?}");
    assert!(!env.contains_key("ESS_AGENT_LOG"), "{env:?}");
    assert!(!env.contains_key("NOT_SET_ANYWHERE"), "{env:?}");
    assert!(!env.values().any(|v| v.contains("s3cret")), "{env:?}");

    // What the program wrote went to the log, line by line, with the event it ran for.
    for (stream, text) in [
        ("stdout", "applied e1"),
        ("stderr", "a warning about RULE 7"),
    ] {
        assert!(
            agent
                .wait_for_log(Duration::from_secs(5), |v| v["message"] == "program output"
                    && v["stream"] == stream
                    && v["line"] == text
                    && v["event_id"] == "e1")
                .is_some(),
            "{stream} not logged:\n{}",
            agent.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_program_is_a_dead_letter_with_its_stderr_and_a_replay_after_the_fix_applies() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    let applied = dir.path().join("applied.log");
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "cat > /dev/null\n\
             if [ \"$ESS_EVENT_SUBJECT\" = signal ]; then kill -TERM $$; fi\n\
             if [ -e {broken} ]; then\n\
               i=1; while [ $i -le 100 ]; do echo \"noise $i\" >&2; i=$((i+1)); done\n\
               echo 'rule 17 names no court: add one' >&2\n\
               exit 3\n\
             fi\n\
             echo \"$ESS_EVENT_ID\" >> {applied}\n",
            broken = sh_quote(&broken),
            applied = sh_quote(&applied),
        ),
    );
    let agent = Agent::start_with(
        dir.path(),
        &config(
            dir.path(),
            "",
            &program,
            "retry = { initial_ms = 50, max_ms = 200, max_attempts = 0 }\n",
        ),
    );
    post(&agent, "bad", "S1", json!({"n": 1})).await;
    let line = wait_final(&agent, "bad", 1, Duration::from_secs(20));
    assert_eq!(line["state"], "failed", "{line}");
    let status = admin_get(&agent, "/v1/events/bad").await;
    assert_eq!(
        status.body["deliveries"][0]["attempts"], 1,
        "{}",
        status.body
    );
    let error = status.body["error"].as_str().unwrap().to_string();
    assert!(error.contains("status 3"), "{error}");
    assert!(
        error.ends_with("rule 17 names no court: add one"),
        "{error}"
    );
    // The last lines of stderr, not all of them.
    assert!(
        error.contains("noise 100") && error.contains("noise 82"),
        "{error}"
    );
    assert!(!error.contains("noise 81\n"), "{error}");
    let letters = admin_get(&agent, "/v1/dead-letters").await;
    assert!(
        letters.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["id"] == "bad"),
        "{}",
        letters.body
    );

    // A program killed by a signal that was not the agent's is a dead letter too.
    post(&agent, "killed", "signal", json!({"n": 2})).await;
    let line = wait_final(&agent, "killed", 1, Duration::from_secs(20));
    assert_eq!(line["state"], "failed", "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("SIGTERM"),
        "{line}"
    );

    // The partner fixes the program; the operator replays the dead letter.
    std::fs::remove_file(&broken).unwrap();
    let replay = request(
        &plain(),
        Method::POST,
        &agent.admin_url("/v1/events/bad/replay"),
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert!(replay.status.is_success(), "{:?}", replay.body);
    let line = wait_final(&agent, "bad", 2, Duration::from_secs(20));
    assert_eq!(line["state"], "applied", "{line}");
    assert_eq!(counted(&applied), BTreeMap::from([("bad".to_string(), 1)]));
}

/// The program asks for retries (exit 75) for 10 s, as a partner system that is down would
/// make it: every event is applied once it answers again, and events before the outage were
/// applied at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_asking_for_retries_cut_for_10_s_then_every_event_is_applied() {
    const TOTAL: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let down = dir.path().join("partner-down");
    let applied = dir.path().join("applied.log");
    let attempts = dir.path().join("attempts.log");
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "cat > /dev/null\necho \"$ESS_EVENT_ID\" >> {attempts}\n\
             if [ -e {down} ]; then echo 'erp is down' >&2; exit 75; fi\n\
             echo \"$ESS_EVENT_ID\" >> {applied}\n",
            down = sh_quote(&down),
            applied = sh_quote(&applied),
            attempts = sh_quote(&attempts),
        ),
    );
    let agent = Agent::start_with(
        dir.path(),
        &config(
            dir.path(),
            "[dispatch]\nmax_parallel = 16\n",
            &program,
            "max_processes = 8\nretry = { initial_ms = 100, max_ms = 500, max_attempts = 0 }\n",
        ),
    );
    let poster = post_many(
        &agent,
        "o",
        0..TOTAL,
        4,
        20,
        Arc::new(AtomicBool::new(false)),
    );
    let mut seen = 0;
    let some = agent.wait_for_log(Duration::from_secs(30), |v| {
        seen += usize::from(support::applied_line(v));
        seen >= TOTAL / 5
    });
    assert!(some.is_some(), "nothing applied:\n{}", agent.log_text());
    std::fs::write(&down, "").unwrap();
    // The outage: held, not waited on.
    let (accepted, ()) = tokio::join!(poster, tokio::time::sleep(Duration::from_secs(10)));
    let accepted: BTreeSet<String> = accepted.unwrap().into_iter().collect();
    assert_eq!(accepted.len(), TOTAL);
    let during = counted(&applied).len();
    assert!(
        during < TOTAL,
        "the outage came after everything was applied"
    );
    let retried = agent
        .wait_for_log(Duration::ZERO, |v| {
            v["message"] == "apply failed; will retry"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("erp is down"))
        })
        .is_some();
    assert!(retried, "no retry during the outage:\n{}", agent.log_text());
    std::fs::remove_file(&down).unwrap();

    let finals = wait_all_final(&agent, &accepted, Duration::from_secs(40));
    assert!(finals.values().all(|s| s == "applied"), "{finals:?}");
    let counts = counted(&applied);
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "never applied: {missing:?}");
    // Exit 75 is not success: no event was recorded applied by a run that asked for a retry.
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let runs: usize = counted(&attempts).values().sum();
    eprintln!(
        "exit 75 for 10 s: {TOTAL} events, {during} applied before the program recovered, {runs} \
         runs in all"
    );
    assert!(runs > TOTAL, "no event was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_kills_the_whole_process_group_and_a_finished_run_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // A unique sleep duration marks this test's processes in /proc.
    let marker = format!("1000.{:09}", rand::random::<u32>() % 1_000_000_000);
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "cat > /dev/null\nsleep {marker} &\necho $! > {pids}/\"$ESS_EVENT_ID\"\n\
             echo 'waiting for the erp' >&2\n\
             if [ \"$ESS_EVENT_SUBJECT\" = hang ]; then wait; fi\n",
            pids = sh_quote(&pids),
        ),
    );
    let agent = Agent::start_with(
        dir.path(),
        &config(dir.path(), "", &program, "timeout_ms = 1500\n"),
    );
    post(&agent, "hangs", "hang", json!({})).await;
    let line = wait_final(&agent, "hangs", 1, Duration::from_secs(20));
    assert_eq!(line["state"], "failed", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains("did not finish within 1500 ms") && error.contains("waiting for the erp"),
        "{error}"
    );
    // The background sleep was started, and the kill of the group took it too.
    assert!(
        pids.join("hangs").exists(),
        "the program never started its child"
    );
    // A run that exits leaves nothing running behind it either.
    post(&agent, "quick", "quick", json!({})).await;
    let line = wait_final(&agent, "quick", 1, Duration::from_secs(20));
    assert_eq!(line["state"], "applied", "{line}");
    assert!(
        pids.join("quick").exists(),
        "the program never started its child"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_with(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {:?}",
            processes_with(&marker)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stopping agent lets a running program finish within its grace period, kills the process
/// group of one still running when the period ends, and runs that event again at its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_kills_the_programs_still_running_and_runs_their_events_again() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("1000.{:09}", rand::random::<u32>() % 1_000_000_000);
    let hang = dir.path().join("hang");
    std::fs::write(&hang, "").unwrap();
    let started = dir.path().join("started");
    let applied = dir.path().join("applied.log");
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "cat > /dev/null\nif [ -e {hang} ]; then sleep {marker} & touch {started}; wait; fi\n\
             echo \"$ESS_EVENT_ID\" >> {applied}\n",
            hang = sh_quote(&hang),
            started = sh_quote(&started),
            applied = sh_quote(&applied),
        ),
    );
    let text = config(
        dir.path(),
        "[shutdown]\ngrace_period_secs = 1\n",
        &program,
        "timeout_ms = 60000\n",
    );
    let mut agent = Agent::start_with(dir.path(), &text);
    post(&agent, "held", "S1", json!({})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the program never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !processes_with(&marker).is_empty(),
        "the program's child is not running"
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        agent
            .wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "the agent did not stop cleanly:\n{}",
        agent.log_text()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_with(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the program's group outlived the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not a failure: the event was not finished, and the next start runs it again.
    assert!(
        agent
            .wait_for_log(Duration::ZERO, |v| v["message"] == "event final")
            .is_none(),
        "{}",
        agent.log_text()
    );
    std::fs::remove_file(&hang).unwrap();
    let agent = Agent::start_with(dir.path(), &text);
    let line = wait_final(&agent, "held", 1, Duration::from_secs(20));
    assert_eq!(line["state"], "applied", "{line}");
    assert_eq!(counted(&applied), BTreeMap::from([("held".to_string(), 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_programs_run_at_once_than_max_processes() {
    const TOTAL: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let running = dir.path().join("running");
    std::fs::create_dir_all(&running).unwrap();
    let seen = dir.path().join("seen.log");
    // Each run marks itself running, counts the runs marked, and stays a while.
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "cat > /dev/null\nrunning={running}\ntouch \"$running/$ESS_EVENT_ID\"\n\
             ls \"$running\" | wc -l >> {seen}\nsleep 0.5\nrm \"$running/$ESS_EVENT_ID\"\n",
            running = sh_quote(&running),
            seen = sh_quote(&seen),
        ),
    );
    let agent = Agent::start_with(
        dir.path(),
        &config(
            dir.path(),
            "[dispatch]\nmax_parallel = 32\n",
            &program,
            "max_processes = 3\n",
        ),
    );
    let ids: BTreeSet<String> = (0..TOTAL).map(|n| format!("c-{n}")).collect();
    // Every event its own subject, so that the dispatcher would run them all at once.
    let posts: Vec<_> = ids
        .iter()
        .map(|id| {
            let (url, id) = (agent.url(EVENTS), id.clone());
            tokio::spawn(async move {
                let body = event(&id, &id, json!({}));
                let headers = signed_headers(&id, unix_now(), &body);
                request(&plain(), Method::POST, &url, &headers, body)
                    .await
                    .unwrap()
                    .status
            })
        })
        .collect();
    for p in posts {
        assert_eq!(p.await.unwrap(), StatusCode::ACCEPTED);
    }
    let finals = wait_all_final(&agent, &ids, Duration::from_secs(30));
    assert!(finals.values().all(|s| s == "applied"), "{finals:?}");
    let counts: Vec<usize> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), TOTAL);
    let most = counts.iter().max().copied().unwrap_or(0);
    assert_eq!(most, 3, "runs at once: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_every_accepted_event_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let applied = dir.path().join("applied.log");
    let program = script(
        dir.path(),
        "apply-rule",
        &format!(
            "cat > /dev/null\necho \"$ESS_EVENT_ID\" >> {applied}\n",
            applied = sh_quote(&applied),
        ),
    );
    let text = config(
        dir.path(),
        "",
        &program,
        "max_processes = 8\nretry = { initial_ms = 50, max_ms = 500, max_attempts = 0 }\n",
    );
    let AfterKills {
        accepted,
        resumed,
        agent,
    } = kill9::kill_9_rounds(
        dir.path(),
        &text,
        2,
        |round| 40 + round * 20,
        |agent, tag, stop| post_many(agent, tag, 0..1000, 4, 16, stop),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let missing = loop {
        let counts = counted(&applied);
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .collect();
        if missing.is_empty() || std::time::Instant::now() >= deadline {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let counts = counted(&applied);
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "kill -9: {} accepted events, {} applied, {duplicates} run more than once, {resumed} \
         resumed after a kill",
        accepted.len(),
        counts.len()
    );
    assert!(resumed > 0, "no kill interrupted an event");
    assert_eq!(missing, 0, "accepted events never applied");
    drop(agent);
}

#[test]
fn validate_names_a_relative_or_missing_program() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |program: &str| {
        let text = config(dir.path(), "", Path::new(program), "");
        let path = dir.path().join("ess-agent.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(support::binary())
            .args(["validate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = validate("apply-rule");
    assert!(!ok, "{out}");
    assert!(
        out.contains("sinks.erp.program") && out.contains("relative"),
        "{out}"
    );
    let missing = dir.path().join("no-such-program");
    let (ok, out) = validate(&missing.display().to_string());
    assert!(!ok, "{out}");
    assert!(
        out.contains("sinks.erp.program") && out.contains("no-such-program"),
        "{out}"
    );
    let program = script(dir.path(), "apply-rule", "exit 0\n");
    let (ok, out) = validate(&program.display().to_string());
    assert!(ok, "{out}");
}
