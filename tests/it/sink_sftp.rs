//! The sftp sink against a real OpenSSH sshd: byte-exact atomic drops, host key verification,
//! server outages, agent crashes, and names that try to leave the directory.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::sshd::{self, Sshd};
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";

/// Passes `payload.text` through as a string when present, else the payload as JSON.
const ADAPTER: &str = r#"$exists(payload.text) ? payload.text : payload"#;

/// A fast retry policy that never gives up, for outages.
const PATIENT: &str = "{ initial_ms = 100, max_ms = 1000, max_attempts = 0, max_age_secs = 0 }";

fn write_adapter(dir: &Path) {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join("pass.jsonata"), ADAPTER).unwrap();
}

/// Config sections: one route per `(type pattern, sink name)`, and the given sink tables.
fn routes(dir: &Path, routes: &[(&str, &str)], sinks: &str) -> String {
    let mut text = format!(
        "adapters_dir = {:?}\n",
        dir.join("adapters").display().to_string()
    );
    for (i, (types, sink)) in routes.iter().enumerate() {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\ntypes = [{types:?}]\nadapter = \"pass.jsonata\"\nsink = {sink:?}\n"
        ));
    }
    text + sinks
}

/// A `[sinks.NAME]` table for `sshd`, pinned to its host key, logging in with the plain client
/// key, writing into `remote_dir`; `extra` lines are appended.
fn sink(sshd: &Sshd, name: &str, remote_dir: &Path, template: &str, extra: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"sftp\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = {user:?}\n\
         private_key = {key:?}\ndir = {dir:?}\nname = {template:?}\n{extra}\n",
        port = sshd.port,
        user = sshd.user,
        key = sshd.client_key.display().to_string(),
        dir = remote_dir.display().to_string(),
    )
}

fn pinned(sshd: &Sshd) -> String {
    format!("host_key_fingerprints = [{:?}]", sshd.host_fingerprint)
}

fn event(id: &str, event_type: &str, subject: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "version": 1, "type": event_type, "subject": subject, "payload": payload}),
    )
    .unwrap()
}

async fn post(agent: &Agent, id: &str, body: Vec<u8>) -> support::Reply {
    let headers = signed_headers(id, unix_now(), &body);
    request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap()
}

/// Waits until the agent logs that `id` is final; returns the state.
fn wait_final(agent: &Agent, id: &str, timeout: Duration) -> String {
    let line = agent
        .wait_for_log(timeout, |v| {
            v["message"] == "event final" && v["event_id"] == id
        })
        .unwrap_or_else(|| {
            panic!(
                "event {id} did not become final; log:\n{}",
                agent.log_text()
            )
        });
    line["state"].as_str().unwrap().to_string()
}

/// The error an event was dead-lettered with.
async fn error_of(agent: &Agent, id: &str) -> String {
    let status = admin_get(agent, &format!("/v1/events/{id}")).await;
    status.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{id} has no error: {}", status.body))
        .to_string()
}

/// Every file under `dir` (relative paths), sorted; hidden ones included.
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(
                    path.strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The content of event `n` in the streaming tests: `size` bytes that say whose they are, so
/// that a partial or misplaced file shows.
fn content(n: usize, size: usize) -> String {
    let unit = format!("{n:06};");
    let mut text = unit.repeat(size / unit.len() + 1);
    text.truncate(size - 4);
    text.push_str("END\n");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_lands_with_the_adapters_bytes_under_its_templated_name_and_mode() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    let agent = Agent::start(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "partner")],
            &sink(
                &sshd,
                "partner",
                &remote,
                "{subject}/{id}.csv",
                &format!(
                    "{}\ncreate_dirs = true\nfile_mode = \"0640\"",
                    pinned(&sshd)
                ),
            ),
        ),
    );
    // CRLF, non-ASCII, no newline at the end: the bytes must arrive exactly.
    let text = "id;név;határidő\r\n1;Ödön;2026-12-01\r\n2;\"x\";\tno newline at end";
    let reply = post(
        &agent,
        "e1",
        event("e1", "rule.updated", "COURT-7", json!({"text": text})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "e1", Duration::from_secs(20)), "applied");
    let path = remote.join("COURT-7/e1.csv");
    assert_eq!(std::fs::read(&path).unwrap(), text.as_bytes());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "mode {mode:o}");

    // Other values are written as compact JSON with a newline, and a retry of the same event
    // replaces its file: one file per event, no temporary file left behind.
    let reply = post(
        &agent,
        "e2",
        event(
            "e2",
            "rule.updated",
            "COURT-7",
            json!({"b": 1, "a": [true, null]}),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "e2", Duration::from_secs(20)), "applied");
    assert_eq!(
        std::fs::read_to_string(remote.join("COURT-7/e2.csv")).unwrap(),
        "{\"b\":1,\"a\":[true,null]}\n"
    );
    assert_eq!(files(&remote), ["COURT-7/e1.csv", "COURT-7/e2.csv"]);
    // The connection is reused: one login for both events.
    let logins = sshd.log_text().matches("Accepted publickey").count();
    assert_eq!(logins, 1, "{}", sshd.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_polling_during_500_uploads_never_sees_a_partial_file() {
    const EVENTS_N: usize = 500;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    let agent = Agent::start(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "partner")],
            &(sink(
                &sshd,
                "partner",
                &remote,
                "{id}.txt",
                &format!("{}\nmax_concurrent_uploads = 8", pinned(&sshd)),
            ) + "[dispatch]\nhealthcheck_interval_ms = 3600000\n"),
        ),
    );
    // Mostly 1 KiB files; every tenth spans several SFTP write requests.
    let size = |n: usize| {
        if n.is_multiple_of(10) {
            100 * 1024
        } else {
            1024
        }
    };

    // The reader: lists the directory and reads every visible file, over and over, until all
    // are there. A visible file must be complete.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let remote = remote.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut passes = 0usize;
            let mut reads = 0usize;
            let mut violations = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                passes += 1;
                for entry in std::fs::read_dir(&remote).unwrap().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue;
                    }
                    let n: usize = name
                        .trim_start_matches('e')
                        .trim_end_matches(".txt")
                        .parse()
                        .unwrap();
                    match std::fs::read(entry.path()) {
                        Ok(bytes) => {
                            reads += 1;
                            if bytes != content(n, size(n)).as_bytes() {
                                violations.push(format!("{name}: {} bytes", bytes.len()));
                            }
                        }
                        // Renamed over between listing and reading: fine.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => violations.push(format!("{name}: {e}")),
                    }
                }
            }
            (passes, reads, violations)
        })
    };

    let mut tasks = Vec::new();
    for c in 0..8 {
        let url = agent.url(EVENTS);
        tasks.push(tokio::spawn(async move {
            let client = plain();
            for n in (c..EVENTS_N).step_by(8) {
                let id = format!("e{n}");
                let body = event(
                    &id,
                    "rule.updated",
                    &format!("S{n}"),
                    json!({"text": content(n, size(n))}),
                );
                let headers = signed_headers(&id, unix_now(), &body);
                let reply = request(&client, Method::POST, &url, &headers, body)
                    .await
                    .unwrap();
                assert_eq!(reply.status, StatusCode::ACCEPTED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut applied = 0;
    let all = agent.wait_for_log(Duration::from_secs(90), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            applied += 1;
        }
        applied == EVENTS_N
    });
    done.store(true, Ordering::Relaxed);
    let (passes, reads, violations) = reader.join().unwrap();
    assert!(
        all.is_some(),
        "not every event was applied; log:\n{}",
        agent.log_text()
    );
    assert!(
        violations.is_empty(),
        "{} partial files seen, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    assert!(
        passes > 10 && reads > 100,
        "the reader did not overlap the uploads: {passes} passes, {reads} reads"
    );
    let expected: Vec<String> = {
        let mut v: Vec<String> = (0..EVENTS_N).map(|n| format!("e{n}.txt")).collect();
        v.sort();
        v
    };
    assert_eq!(
        files(&remote),
        expected,
        "exactly the final files, no temporary ones"
    );
    // One connection for all of them, and at most max_concurrent_uploads SFTP channels on it
    // (plus one for the sink's healthcheck, which runs once here).
    let log = sshd.log_text();
    assert_eq!(log.matches("Accepted publickey").count(), 1, "{log}");
    let channels = log.matches("subsystem 'sftp'").count();
    assert!(
        (1..=9).contains(&channels),
        "{channels} sftp channels:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_changed_or_unpinned_host_keys_are_refused_and_dead_lettered() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    // Another key, standing in for the key an impostor (or the old server) has.
    let other = sshd.dir().join("other_host_key");
    sshd::keygen(&other, "");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let other_key: String = other_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let other_fingerprint = sshd::fingerprint(&other.with_extension("pub"));
    let changed = dir.path().join("known_hosts_changed");
    std::fs::write(
        &changed,
        format!(
            "# the key this host had before\n[127.0.0.1]:{} {other_key}\n",
            sshd.port
        ),
    )
    .unwrap();
    let unknown = dir.path().join("known_hosts_unknown");
    std::fs::write(&unknown, format!("partner.example {other_key}\n")).unwrap();
    let revoked = dir.path().join("known_hosts_revoked");
    std::fs::write(
        &revoked,
        format!("{}@revoked * {}\n", sshd.known_hosts_line(), sshd.host_key),
    )
    .unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, sshd.known_hosts_line()).unwrap();
    let stranger = dir.path().join("stranger_ed25519");
    sshd::keygen(&stranger, "");

    let sinks = [
        sink(
            &sshd,
            "pinned-wrong",
            &remote,
            "pin-{id}",
            &format!("host_key_fingerprints = [{other_fingerprint:?}]"),
        ),
        sink(
            &sshd,
            "changed",
            &remote,
            "changed-{id}",
            &format!("known_hosts = {:?}", changed.display().to_string()),
        ),
        sink(
            &sshd,
            "unknown",
            &remote,
            "unknown-{id}",
            &format!("known_hosts = {:?}", unknown.display().to_string()),
        ),
        sink(
            &sshd,
            "revoked",
            &remote,
            "revoked-{id}",
            &format!("known_hosts = {:?}", revoked.display().to_string()),
        ),
        sink(
            &sshd,
            "known",
            &remote,
            "known-{id}",
            &format!("known_hosts = {:?}", known.display().to_string()),
        ),
        // The right host, but a client key the server does not accept.
        sink(&sshd, "stranger", &remote, "stranger-{id}", &pinned(&sshd)).replace(
            &format!("{:?}", sshd.client_key.display().to_string()),
            &format!("{:?}", stranger.display().to_string()),
        ),
    ]
    .concat();
    let agent = Agent::start(
        dir.path(),
        &routes(
            dir.path(),
            &[
                ("pin", "pinned-wrong"),
                ("changed", "changed"),
                ("unknown", "unknown"),
                ("revoked", "revoked"),
                ("known", "known"),
                ("stranger", "stranger"),
            ],
            &sinks,
        ),
    );
    for kind in ["pin", "changed", "unknown", "revoked", "known", "stranger"] {
        let reply = post(&agent, kind, event(kind, kind, kind, json!({"text": "x"}))).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    // Refusals are permanent: dead letters at the first attempt, with the offered key.
    let fp = &sshd.host_fingerprint;
    for (kind, expect) in [
        (
            "pin",
            vec![
                fp.as_str(),
                "host_key_fingerprints = [",
                "man-in-the-middle",
            ],
        ),
        (
            "changed",
            vec![
                fp.as_str(),
                other_fingerprint.as_str(),
                "line 2",
                "man-in-the-middle",
            ],
        ),
        (
            "unknown",
            vec![fp.as_str(), "unknown", "host_key_fingerprints = ["],
        ),
        ("revoked", vec![fp.as_str(), "@revoked"]),
        ("stranger", vec!["refused the key", "authorized_keys"]),
    ] {
        assert_eq!(
            wait_final(&agent, kind, Duration::from_secs(20)),
            "failed",
            "{kind}"
        );
        let error = error_of(&agent, kind).await;
        for part in expect {
            assert!(
                error.contains(part),
                "{kind}: {part:?} missing from {error}"
            );
        }
        let status = admin_get(&agent, &format!("/v1/events/{kind}")).await;
        assert_eq!(
            status.body["deliveries"][0]["attempts"], 1,
            "{kind}: {}",
            status.body
        );
    }
    assert_eq!(
        wait_final(&agent, "known", Duration::from_secs(20)),
        "applied"
    );
    assert_eq!(files(&remote), ["known-known"]);
    // Only the known host and the right key were let in; the refused ones never authenticated.
    let logins = sshd.log_text().matches("Accepted publickey").count();
    assert_eq!(logins, 1, "{}", sshd.log_text());

    // The key change was legitimate: the operator records the server's key in the sink's
    // known_hosts file and replays the dead letter. The edit counts without a reload.
    std::fs::write(&changed, sshd.known_hosts_line()).unwrap();
    let replay = request(
        &plain(),
        Method::POST,
        &agent.admin_url("/v1/events/changed/replay"),
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert!(replay.status.is_success(), "{:?}", replay.body);
    let mut finals = 0;
    let again = agent.wait_for_log(Duration::from_secs(20), |v| {
        finals += usize::from(v["message"] == "event final" && v["event_id"] == "changed");
        finals == 2
    });
    assert_eq!(
        again.expect("final again after the edit")["state"],
        "applied",
        "{}",
        error_of(&agent, "changed").await
    );
    assert_eq!(files(&remote), ["changed-changed", "known-known"]);

    // Without any way to verify the host key, the configuration is refused outright.
    let config = support::config_text(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "open")],
            &sink(&sshd, "open", &remote, "{id}", ""),
        ),
    );
    let path = dir.path().join("unverified.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(support::binary())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("sinks.open")
            && text.contains("host key must be verified")
            && text.contains("host_key_fingerprints"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_says_so_at_every_connect() {
    let mut sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    let agent = Agent::start(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "lab")],
            &sink(
                &sshd,
                "lab",
                &remote,
                "{id}",
                &format!("insecure_skip_host_key_verification = true\nretry = {PATIENT}"),
            ),
        ),
    );
    let fingerprint = sshd.host_fingerprint.clone();
    let warned = |agent: &Agent| {
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("host key verification is off") && l.contains(&fingerprint))
            .count()
    };
    post(&agent, "a", event("a", "rule.updated", "A", json!(1))).await;
    assert_eq!(wait_final(&agent, "a", Duration::from_secs(20)), "applied");
    assert_eq!(warned(&agent), 1);
    // A new connection (the server restarted) warns again.
    sshd.stop();
    sshd.start_again();
    post(&agent, "b", event("b", "rule.updated", "B", json!(2))).await;
    assert_eq!(wait_final(&agent, "b", Duration::from_secs(30)), "applied");
    assert_eq!(warned(&agent), 2, "{}", agent.log_text());
    assert_eq!(files(&remote), ["a", "b"]);
}

/// Posts events `prefix{n}` every `pace` until `stop`, each with its own subject among 16;
/// returns the ids the agent accepted.
fn stream(
    agent: &Agent,
    prefix: &'static str,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(String, usize)>> {
    let url = agent.url(EVENTS);
    tokio::spawn(async move {
        let client = plain();
        let mut accepted = Vec::new();
        let mut tick = tokio::time::interval(pace);
        for n in 0.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            tick.tick().await;
            let id = format!("{prefix}{n}");
            let body = event(
                &id,
                "rule.updated",
                &format!("S{}", n % 16),
                json!({"text": content(n, 1024)}),
            );
            let headers = signed_headers(&id, unix_now(), &body);
            match request(&client, Method::POST, &url, &headers, body).await {
                Ok(r) if r.status.is_success() => accepted.push((id, n)),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        accepted
    })
}

/// Waits until `agent` has logged `count` more "applied" lines.
fn wait_applied(agent: &Agent, count: usize, timeout: Duration) -> bool {
    let mut n = 0;
    agent
        .wait_for_log(timeout, |v| {
            if support::applied_line(v) {
                n += 1;
            }
            n >= count
        })
        .is_some()
}

/// Checks that `remote` holds exactly one complete file per event and nothing else.
fn assert_exactly_once(remote: &Path, events: &BTreeMap<String, usize>) {
    let expected: BTreeSet<String> = events.keys().cloned().collect();
    let found: BTreeSet<String> = files(remote).into_iter().collect();
    let missing: Vec<_> = expected.difference(&found).take(10).collect();
    let extra: Vec<_> = found.difference(&expected).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    for (id, n) in events {
        assert_eq!(
            std::fs::read(remote.join(id)).unwrap(),
            content(*n, 1024).as_bytes(),
            "{id} is not complete"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_down_for_10_s_mid_stream_leaves_every_file_exactly_once() {
    let mut sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    let agent = Agent::start(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "partner")],
            &sink(
                &sshd,
                "partner",
                &remote,
                "{id}",
                &format!(
                    "{}\nconnect_timeout_ms = 2000\ntimeout_ms = 5000\nretry = {PATIENT}",
                    pinned(&sshd)
                ),
            ),
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let poster = stream(&agent, "o", Duration::from_millis(25), stop.clone());
    assert!(
        wait_applied(&agent, 40, Duration::from_secs(30)),
        "nothing applied"
    );

    // The server goes away mid-stream (every sshd process killed), for 10 s.
    sshd.stop();
    let down = Instant::now();
    assert!(
        agent
            .wait_for_log(Duration::from_secs(10), |v| v["message"]
                == "apply failed; will retry")
            .is_some(),
        "the outage was not noticed"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    sshd.start_again();
    assert!(
        wait_applied(&agent, 40, Duration::from_secs(30)),
        "nothing applied after the restart"
    );
    stop.store(true, Ordering::Relaxed);
    let accepted: BTreeMap<String, usize> = poster.await.unwrap().into_iter().collect();
    assert!(accepted.len() > 100, "only {} events", accepted.len());
    for id in accepted.keys() {
        assert_eq!(
            wait_final(&agent, id, Duration::from_secs(60)),
            "applied",
            "{id}"
        );
    }
    assert_exactly_once(&remote, &accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_mid_stream_leaves_one_complete_file_per_event() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    let config = support::config_text(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "partner")],
            &sink(
                &sshd,
                "partner",
                &remote,
                "{id}",
                &format!("{}\nretry = {PATIENT}", pinned(&sshd)),
            ),
        ),
    );
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..3 {
        let mut agent = Agent::start_with(dir.path(), &config);
        let stop = Arc::new(AtomicBool::new(false));
        let prefix: &'static str = ["a", "b", "c"][round];
        let poster = stream(&agent, prefix, Duration::from_millis(2), stop.clone());
        assert!(
            wait_applied(&agent, 30 + round * 20, Duration::from_secs(30)),
            "round {round}: nothing applied"
        );
        agent.kill9();
        stop.store(true, Ordering::Relaxed);
        accepted.extend(poster.await.unwrap());
    }
    // A last run applies what was left: every journaled event, accepted or not.
    let agent = Agent::start_with(dir.path(), &config);
    let journaled: BTreeMap<String, usize> = agent
        .journal_ids()
        .into_iter()
        .map(|id| {
            let n = id[1..].parse().unwrap();
            (id, n)
        })
        .collect();
    for id in accepted.keys() {
        assert!(
            journaled.contains_key(id),
            "{id} was accepted but is not in the journal"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: BTreeSet<String> = files(&remote).into_iter().collect();
        if journaled.keys().all(|id| found.contains(id))
            && !found.iter().any(|f| f.starts_with('.'))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {:?}",
            journaled
                .keys()
                .filter(|id| !found.contains(*id))
                .take(10)
                .collect::<Vec<_>>()
        );
        // Waiting for the dispatcher to catch up with the backlog after the restart.
        agent.wait_for_log(Duration::from_millis(200), support::applied_line);
    }
    assert_exactly_once(&remote, &journaled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_leave_the_directory_are_refused_before_any_upload() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    let missing = dir.path().join("not-there");
    let sinks = [
        sink(
            &sshd,
            "partner",
            &remote,
            "{output.name}",
            &format!("{}\ncreate_dirs = true", pinned(&sshd)),
        ),
        sink(&sshd, "nodir", &missing, "{id}", &pinned(&sshd)),
    ]
    .concat();
    let agent = Agent::start(
        dir.path(),
        &routes(
            dir.path(),
            &[("rule.*", "partner"), ("nodir", "nodir")],
            &sinks,
        ),
    );
    for (i, bad) in ["../../etc/passwd", "/etc/passwd", "a/../../b"]
        .iter()
        .enumerate()
    {
        // A good record first: the bad one must stop the whole event before anything is sent.
        let id = format!("t{i}");
        post(
            &agent,
            &id,
            event(
                &id,
                "rule.updated",
                &id,
                json!([{"name": "fine"}, {"name": bad}]),
            ),
        )
        .await;
        assert_eq!(wait_final(&agent, &id, Duration::from_secs(20)), "failed");
        let error = error_of(&agent, &id).await;
        assert!(
            error.contains(&format!("{bad:?}")) && error.contains("record 1"),
            "{error}"
        );
    }
    assert!(files(dir.path().join("drop").as_path()).is_empty());
    assert!(!dir.path().join("etc").exists() && !Path::new("/etc/passwd.tmp").exists());
    // (The sinks' periodic healthchecks do connect; what matters is that nothing was written.)

    // A missing directory with create_dirs off is a dead letter with the server's message.
    post(
        &agent,
        "nd",
        event("nd", "nodir", "nd", json!({"text": "x"})),
    )
    .await;
    assert_eq!(wait_final(&agent, "nd", Duration::from_secs(20)), "failed");
    let error = error_of(&agent, "nd").await;
    assert!(
        error.contains("no such directory")
            && error.contains("No such file")
            && error.contains("create_dirs"),
        "{error}"
    );
    assert!(!missing.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_key_is_opened_with_its_passphrase_from_the_environment() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let remote = dir.path().join("drop");
    std::fs::create_dir(&remote).unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, sshd.known_hosts_line()).unwrap();
    let table = sink(
        &sshd,
        "partner",
        &remote,
        "{id}.json",
        &format!(
            "known_hosts = {:?}\nprivate_key_passphrase = {{ env = \"TEST_SFTP_PASSPHRASE\" }}",
            known.display().to_string()
        ),
    )
    .replace(
        &format!("{:?}", sshd.client_key.display().to_string()),
        &format!("{:?}", sshd.encrypted_client_key.display().to_string()),
    );
    let config_path: PathBuf = dir.path().join("ess-agent.toml");
    std::fs::write(
        &config_path,
        support::config_text(
            dir.path(),
            &routes(dir.path(), &[("rule.*", "partner")], &table),
        ),
    )
    .unwrap();
    let agent = Agent::start_config(&config_path, &[("TEST_SFTP_PASSPHRASE", Sshd::PASSPHRASE)]);
    post(
        &agent,
        "k1",
        event("k1", "rule.updated", "K", json!({"v": 1})),
    )
    .await;
    assert_eq!(wait_final(&agent, "k1", Duration::from_secs(20)), "applied");
    assert_eq!(
        std::fs::read_to_string(remote.join("k1.json")).unwrap(),
        "{\"v\":1}\n"
    );
}

#[test]
fn rsa_keys_need_the_opt_in_feature() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    let key = dir.path().join("id_rsa");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = format!(
        "[sinks.legacy]\ntype = \"sftp\"\nhost = \"127.0.0.1\"\nuser = \"u\"\nprivate_key = {:?}\n\
         host_key_fingerprints = [\"SHA256:3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI\"]\n\
         dir = \"/upload\"\nname = \"{{id}}\"\n",
        key.display().to_string()
    );
    let path = dir.path().join("ess-agent.toml");
    std::fs::write(
        &path,
        support::config_text(
            dir.path(),
            &routes(dir.path(), &[("rule.*", "legacy")], &table),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(support::binary())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "sftp-rsa") {
        assert!(out.status.success(), "{text}");
    } else {
        assert!(!out.status.success());
        assert!(
            text.contains("sinks.legacy")
                && text.contains("is an RSA key")
                && text.contains("sftp-rsa"),
            "{text}"
        );
    }
}
