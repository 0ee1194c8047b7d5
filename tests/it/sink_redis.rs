//! The Redis Streams sink against real servers: the shared one on 127.0.0.1:6379 (with keys
//! unique to each test), and test-owned ones for the outage and credentials.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::kill9::{self, AfterKills};
use crate::support::redis::{
    self as rs, Options, RedisServer, SHARED_PORT, StreamEntry, TlsFiles, command, delete_prefix,
    entries, unique_prefix,
};
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";

fn write_adapter(dir: &Path, name: &str, source: &str) {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join(name), source).unwrap();
}

fn adapters_dir(dir: &Path) -> String {
    format!(
        "adapters_dir = {:?}\n",
        dir.join("adapters").display().to_string()
    )
}

fn event(id: &str, subject: &str, revision: Option<u64>, payload: Value) -> Vec<u8> {
    let mut e = json!({"id": id, "version": 1, "type": "rule.updated", "subject": subject,
        "payload": payload});
    if let Some(r) = revision {
        e["revision"] = json!(r);
    }
    serde_json::to_vec(&e).unwrap()
}

async fn post(agent: &Agent, id: &str, body: Vec<u8>) {
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{id}: {}", reply.body);
}

async fn admin_post(agent: &Agent, path: &str) -> support::Reply {
    request(
        &plain(),
        Method::POST,
        &agent.admin_url(path),
        &[],
        Vec::new(),
    )
    .await
    .unwrap()
}

/// Waits for the `nth` (1-based) "event final" line of `id`; returns it.
fn wait_final(agent: &Agent, id: &str, nth: usize) -> Value {
    let mut seen = 0;
    agent
        .wait_for_log(Duration::from_secs(20), |v| {
            seen += usize::from(v["message"] == "event final" && v["event_id"] == id);
            seen == nth
        })
        .unwrap_or_else(|| panic!("{id} did not become final; log:\n{}", agent.log_text()))
}

/// The sink's table: the shared server, the test's prefix for every key it writes.
fn sink(name: &str, url: &str, prefix: &str, stream: &str, extra: &str) -> String {
    format!(
        r#"
[sinks.{name}]
type = "redis"
url = "{url}"
stream = "{prefix}:{stream}"
dedup_prefix = "{prefix}:applied:"
reconnect_initial_ms = 50
reconnect_max_ms = 500
{extra}
"#
    )
}

fn route(name: &str, adapter: &str, sink: &str) -> String {
    format!("\n[[routes]]\nname = \"{name}\"\nadapter = \"{adapter}\"\nsink = \"{sink}\"\n")
}

fn shared_url() -> String {
    format!("redis://127.0.0.1:{SHARED_PORT}")
}

/// Counts the entries of each event id.
fn count_ids(entries: &[StreamEntry]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in entries {
        *counts.entry(e.fields["ess_event_id"].clone()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_carry_the_event_fields_and_a_forced_replay_adds_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("happy");
    write_adapter(
        dir.path(),
        "rule.jsonata",
        r#"{"rule": payload.rule, "days": payload.days}"#,
    );
    write_adapter(
        dir.path(),
        "courts.jsonata",
        r#"payload.courts.{"court": $, "rule": $$.payload.rule, "days": $$.payload.days}"#,
    );
    let url = shared_url();
    let config = format!(
        "{}{}{}{}{}",
        adapters_dir(dir.path()),
        route("kiosks", "rule.jsonata", "kiosks"),
        route("courts", "courts.jsonata", "courts"),
        sink("kiosks", &url, &prefix, "rules:{type}", ""),
        sink(
            "courts",
            &url,
            &prefix,
            "court:{output.court}",
            "output_as = \"fields\"\nmaxlen = 2\nmaxlen_approximate = false",
        ),
    );
    let agent = Agent::start(dir.path(), &config);
    let mut redis = rs::connect(SHARED_PORT, None).await;
    for (n, id) in ["h-1", "h-2", "h-3"].iter().enumerate() {
        let courts = if n == 0 {
            json!(["N", "S"])
        } else {
            json!(["N"])
        };
        post(
            &agent,
            id,
            event(
                id,
                &format!("rule/{n}"),
                Some(3 + n as u64),
                json!({"rule": format!("R{n}"), "days": 14, "courts": courts}),
            ),
        )
        .await;
        assert_eq!(wait_final(&agent, id, 1)["state"], "applied");
    }

    // One entry per event, with the event's fields and the output as JSON.
    let rules = entries(&mut redis, &format!("{prefix}:rules:rule.updated")).await;
    assert_eq!(rules.len(), 3, "{rules:?}");
    let first = &rules[0].fields;
    let expected: BTreeMap<String, String> = [
        ("ess_event_id", "h-1"),
        ("ess_route", "kiosks"),
        ("ess_event_type", "rule.updated"),
        ("ess_event_version", "1"),
        ("ess_subject", "rule/0"),
        ("ess_revision", "3"),
        ("payload", r#"{"rule":"R0","days":14}"#),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(first, &expected);

    // An array output gives one entry per element, each in the stream its template names,
    // with the output's fields as fields; exact trimming keeps the last two.
    let north = entries(&mut redis, &format!("{prefix}:court:N")).await;
    let south = entries(&mut redis, &format!("{prefix}:court:S")).await;
    assert_eq!(
        north
            .iter()
            .map(|e| e.fields["ess_event_id"].as_str())
            .collect::<Vec<_>>(),
        ["h-2", "h-3"],
        "trimmed to maxlen"
    );
    assert_eq!(south.len(), 1);
    let s = &south[0].fields;
    assert_eq!(
        (
            s["court"].as_str(),
            s["rule"].as_str(),
            s["days"].as_str(),
            s["ess_record"].as_str()
        ),
        ("S", "R0", "14", "1")
    );
    assert!(!s.contains_key("payload"));

    // The record that h-1 was added names its entries; a forced replay finds it and adds
    // nothing.
    let record = command(
        &mut redis,
        &["GET", &format!("{prefix}:applied:test-partner:kiosks:h-1")],
    )
    .await;
    assert_eq!(
        record,
        redis::Value::BulkString(rules[0].id.clone().into_bytes())
    );
    let replay = admin_post(&agent, "/v1/events/h-1/replay?force=true").await;
    assert!(replay.status.is_success(), "{}", replay.body);
    assert_eq!(wait_final(&agent, "h-1", 2)["state"], "applied");
    assert!(
        agent
            .wait_for_log(Duration::from_secs(5), |v| v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("already applied"))
                && v["event_id"] == "h-1")
            .is_some(),
        "{}",
        agent.log_text()
    );
    let rules_after = entries(&mut redis, &format!("{prefix}:rules:rule.updated")).await;
    assert_eq!(rules_after.len(), 3, "the replay added an entry");
    assert_eq!(
        entries(&mut redis, &format!("{prefix}:court:S"))
            .await
            .len(),
        1
    );
    delete_prefix(&mut redis, &prefix).await;
}

/// Starts posting events `{tag}-{n}` for n in `range` from `tasks` concurrent clients until done
/// or `stop` is set; the handle yields the ids the agent accepted.
fn post_many(
    agent: &Agent,
    tag: &str,
    range: std::ops::Range<usize>,
    tasks: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    support::post_many(agent, tag, range, tasks, stop, |id, n| {
        event(id, &format!("S{}", n % 32), None, json!({"n": n}))
    })
}

const PASS_THROUGH: &str = r#"{"subject": subject, "payload": payload}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_for_10_s_mid_stream_every_event_is_added_exactly_once() {
    const TOTAL: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    // Every answered write is on disk, so the entries added before the kill are still there.
    let mut server = RedisServer::start(Options {
        durable: true,
        ..Options::default()
    });
    let prefix = unique_prefix("cut");
    let config = format!(
        "{}\n[dispatch]\nmax_parallel = 32\n{}{}",
        adapters_dir(dir.path()),
        route("kiosks", "pass.jsonata", "kiosks"),
        sink(
            "kiosks",
            &server.url(),
            &prefix,
            "rules",
            "timeout_ms = 2000\nconnect_timeout_ms = 500\n\
             retry = { initial_ms = 100, max_ms = 500, max_attempts = 0 }",
        ),
    );
    let agent = Agent::start(dir.path(), &config);
    let poster = post_many(&agent, "o", 0..TOTAL, 4, Arc::new(AtomicBool::new(false)));
    let mut applied = 0;
    let seen = agent.wait_for_log(Duration::from_secs(30), |v| {
        applied += usize::from(support::applied_line(v));
        applied >= TOTAL / 5
    });
    assert!(seen.is_some(), "nothing applied:\n{}", agent.log_text());
    server.kill();
    // The outage itself: held, not waited on.
    let (accepted, ()) = tokio::join!(poster, tokio::time::sleep(Duration::from_secs(10)));
    assert_eq!(accepted.unwrap().len(), TOTAL);
    assert!(
        agent.log_text().contains("redis connection failed"),
        "the agent did not notice the outage"
    );
    server.start_again();
    let mut finals = BTreeSet::new();
    let all = agent.wait_for_log(Duration::from_secs(45), |v| {
        if v["message"] == "event final" {
            assert_eq!(v["state"], "applied", "{v}");
            finals.insert(v["event_id"].as_str().unwrap_or_default().to_string());
        }
        finals.len() == TOTAL
    });
    assert!(all.is_some(), "only {} applied", finals.len());
    let mut redis = rs::connect(server.port, None).await;
    let counts = count_ids(&entries(&mut redis, &format!("{prefix}:rules")).await);
    let missing: Vec<String> = (0..TOTAL)
        .map(|n| format!("o-{n}"))
        .filter(|id| !counts.contains_key(id))
        .collect();
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "redis cut: {} of {TOTAL} ids in the stream, {} added twice, {} missing",
        counts.len(),
        twice.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert!(twice.is_empty(), "added twice: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_mid_stream_loses_nothing_and_adds_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let prefix = unique_prefix("kill9");
    let config = support::config_text(
        dir.path(),
        &format!(
            "{}\n[dispatch]\nmax_parallel = 32\n{}{}",
            adapters_dir(dir.path()),
            route("kiosks", "pass.jsonata", "kiosks"),
            sink(
                "kiosks",
                &shared_url(),
                &prefix,
                "rules",
                "retry = { initial_ms = 50, max_ms = 500, max_attempts = 0, max_age_secs = 3600 }",
            ),
        ),
    );
    let AfterKills {
        accepted,
        resumed,
        agent,
    } = kill9::kill_9_rounds(
        dir.path(),
        &config,
        2,
        |round| 100 + round * 50,
        |agent, tag, stop| post_many(agent, tag, 0..2000, 4, stop),
    )
    .await;
    let mut redis = rs::connect(SHARED_PORT, None).await;
    let stream = format!("{prefix}:rules");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut counts = count_ids(&entries(&mut redis, &stream).await);
    while !accepted.iter().all(|id| counts.contains_key(id))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        counts = count_ids(&entries(&mut redis, &stream).await);
    }
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "kill -9: {} accepted, {} in the stream, {} added twice, {resumed} resumed after a kill",
        accepted.len(),
        counts.len(),
        twice.len()
    );
    assert!(resumed > 0, "no kill interrupted an event");
    assert!(
        missing.is_empty(),
        "lost {} accepted events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(twice.is_empty(), "added twice: {twice:?}");
    drop(agent);
    delete_prefix(&mut redis, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_a_dead_letter_that_a_retry_applies_once_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let prefix = unique_prefix("wrongtype");
    let mut redis = rs::connect(SHARED_PORT, None).await;
    let stream = format!("{prefix}:rules:S1");
    command(&mut redis, &["SET", &stream, "not a stream"]).await;
    let config = format!(
        "{}{}{}",
        adapters_dir(dir.path()),
        route("kiosks", "pass.jsonata", "kiosks"),
        sink("kiosks", &shared_url(), &prefix, "rules:{subject}", ""),
    );
    let agent = Agent::start(dir.path(), &config);
    post(&agent, "w-1", event("w-1", "S1", None, json!({"n": 1}))).await;
    let first = wait_final(&agent, "w-1", 1);
    assert_eq!(first["state"], "failed", "{first}");
    let error = first["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("holds a string, not a stream") && error.contains("remove the key"),
        "{error}"
    );
    let letters = admin_get(&agent, "/v1/dead-letters").await;
    assert!(letters.body.to_string().contains("w-1"), "{}", letters.body);
    // Nothing was written: not the entry, not the record.
    assert_eq!(
        command(
            &mut redis,
            &[
                "EXISTS",
                &format!("{prefix}:applied:test-partner:kiosks:w-1")
            ]
        )
        .await,
        redis::Value::Int(0)
    );

    // The operator removes the key in the way and retries the dead letter.
    command(&mut redis, &["DEL", &stream]).await;
    let retry = admin_post(&agent, "/v1/dead-letters/w-1/retry").await;
    assert!(retry.status.is_success(), "{}", retry.body);
    assert_eq!(wait_final(&agent, "w-1", 2)["state"], "applied");
    let added = entries(&mut redis, &stream).await;
    assert_eq!(added.len(), 1);
    assert_eq!(
        added[0].fields["payload"],
        r#"{"subject":"S1","payload":{"n":1}}"#
    );
    delete_prefix(&mut redis, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_a_file_and_a_wrong_one_is_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let server = RedisServer::start(Options {
        password: Some("s3cret-pw".into()),
        ..Options::default()
    });
    std::fs::write(dir.path().join("good-pw"), "s3cret-pw\n").unwrap();
    std::fs::write(dir.path().join("bad-pw"), "guess\n").unwrap();
    let prefix = unique_prefix("auth");
    let pw = |file: &str| {
        format!(
            "password = {{ file = {:?} }}",
            dir.path().join(file).display().to_string()
        )
    };
    let config = format!(
        "{}{}{}{}{}",
        adapters_dir(dir.path()),
        route("good", "pass.jsonata", "good"),
        route("bad", "pass.jsonata", "bad"),
        sink("good", &server.url(), &prefix, "good", &pw("good-pw")),
        sink("bad", &server.url(), &prefix, "bad", &pw("bad-pw")),
    );
    let agent = Agent::start(dir.path(), &config);
    post(&agent, "a-1", event("a-1", "S1", None, json!({"n": 1}))).await;
    let done = wait_final(&agent, "a-1", 1);
    assert_eq!(done["state"], "failed", "{done}");
    let status = admin_get(&agent, "/v1/events/a-1").await;
    let text = status.body.to_string();
    assert!(
        text.contains("refused the credentials") && text.contains("check username and password"),
        "{text}"
    );
    assert!(!text.contains("guess"), "the password was shown: {text}");
    let mut redis = rs::connect(server.port, Some("s3cret-pw")).await;
    assert_eq!(
        entries(&mut redis, &format!("{prefix}:good")).await.len(),
        1
    );
    assert!(
        entries(&mut redis, &format!("{prefix}:bad"))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_client_certificate_applies_and_an_untrusted_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let pki = support::tls::generate(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let wrong = support::tls::generate(&other);
    let server = RedisServer::start(Options {
        tls: Some(TlsFiles {
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }),
        ..Options::default()
    });
    let url = format!("rediss://127.0.0.1:{}", server.tls_port.unwrap());
    let prefix = unique_prefix("tls");
    let files = |ca: &Path| {
        format!(
            "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\nretry = {{ max_attempts = 1 }}",
            ca.display().to_string(),
            pki.client_cert.display().to_string(),
            pki.client_key.display().to_string(),
        )
    };
    let config = format!(
        "{}{}{}{}{}",
        adapters_dir(dir.path()),
        route("good", "pass.jsonata", "good"),
        route("bad", "pass.jsonata", "bad"),
        sink("good", &url, &prefix, "good", &files(&pki.ca)),
        sink("bad", &url, &prefix, "bad", &files(&wrong.ca)),
    );
    let agent = Agent::start(dir.path(), &config);
    post(&agent, "t-1", event("t-1", "S1", None, json!({"n": 1}))).await;
    let done = wait_final(&agent, "t-1", 1);
    assert_eq!(done["state"], "failed", "{done}");
    let status = admin_get(&agent, "/v1/events/t-1").await;
    let route = |name: &str| support::delivery(&status.body, name);
    assert_eq!(route("good")["state"], "applied", "{}", status.body);
    let error = route("bad")["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not signed by a CA the agent trusts: set ca_file"),
        "{}",
        status.body
    );
    // Read back over the plain port: the entry went through the TLS connection.
    let mut redis = rs::connect(server.port, None).await;
    let good = entries(&mut redis, &format!("{prefix}:good")).await;
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].fields["ess_event_id"], "t-1");
    assert!(
        entries(&mut redis, &format!("{prefix}:bad"))
            .await
            .is_empty()
    );
}

#[test]
fn validate_names_the_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let config = support::config_text(
        dir.path(),
        &format!(
            "{}{}{}",
            adapters_dir(dir.path()),
            route("kiosks", "pass.jsonata", "kiosks"),
            "\n[sinks.kiosks]\ntype = \"redis\"\nurl = \"redis://user:pw@127.0.0.1\"\n\
             stream = \"rules:{nope}\"\nmaxlen = 0\n",
        ),
    );
    let path = dir.path().join("bad.toml");
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
    for needle in [
        "sinks.kiosks.url",
        "carries credentials",
        "sinks.kiosks.stream",
        "nope",
        "sinks.kiosks.maxlen",
    ] {
        assert!(text.contains(needle), "{needle} missing in: {text}");
    }
}
