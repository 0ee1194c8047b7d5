//! Applying events: routes, adapters, sinks, ordering, retries, dead letters, replay, dry runs,
//! ack modes and status reports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::hub::TestServer;
use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";

/// An adapter that passes the subject, revision and payload through.
const PASS_THROUGH: &str = r#"{"id": id, "subject": subject, "revision": revision, "payload": payload, "partner": $partner}"#;

fn write_adapter(dir: &Path, name: &str, source: &str) {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join(name), source).unwrap();
}

/// Config sections: adapters in `dir/adapters`, one file sink `files` writing into `dir/out`.
fn file_route_config(dir: &Path, name_template: &str, extra: &str) -> String {
    format!(
        "adapters_dir = {adapters:?}\n\
         [[routes]]\nname = \"files\"\ntypes = [\"rule.*\"]\nadapter = \"pass.jsonata\"\nsink = \"files\"\n\
         [sinks.files]\ntype = \"file\"\ndir = {out:?}\nname = {name_template:?}\n{extra}",
        adapters = dir.join("adapters").display().to_string(),
        out = dir.join("out").display().to_string(),
    )
}

fn event(
    id: &str,
    event_type: &str,
    subject: &str,
    revision: Option<u64>,
    payload: Value,
) -> Vec<u8> {
    let mut e =
        json!({"id": id, "version": 1, "type": event_type, "subject": subject, "payload": payload});
    if let Some(r) = revision {
        e["revision"] = json!(r);
    }
    serde_json::to_vec(&e).unwrap()
}

/// Asserts that `value` is a timestamp as the agent writes every one: RFC 3339, UTC, exactly
/// three digits of milliseconds (`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$`).
fn assert_timestamp(value: &Value, what: &str) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    let shape = "dddd-dd-ddTdd:dd:dd.dddZ";
    let fits = text.len() == shape.len()
        && text.chars().zip(shape.chars()).all(|(c, s)| match s {
            'd' => c.is_ascii_digit(),
            _ => c == s,
        });
    assert!(
        fits,
        "{what} {text:?} is not RFC 3339 with milliseconds in UTC"
    );
}

async fn post(
    agent: &Agent,
    id: &str,
    body: Vec<u8>,
    extra: &[(&'static str, String)],
) -> support::Reply {
    let mut headers = signed_headers(id, unix_now(), &body);
    headers.extend(extra.iter().cloned());
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

/// Runs `ess-agent` with arguments against the agent's config; returns (success, stdout).
fn cli(agent: &Agent, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(support::binary())
        .args(args)
        .arg("--config")
        .arg(&agent.config_path)
        .arg("--admin-url")
        .arg(agent.admin_url(""))
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
}

#[tokio::test]
async fn an_event_is_applied_to_a_file_and_its_state_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let agent = Agent::start(
        dir.path(),
        &file_route_config(dir.path(), "{subject}/{id}.json", ""),
    );
    let reply = post(
        &agent,
        "e1",
        event(
            "e1",
            "rule.updated",
            "RULE-1",
            Some(3),
            json!({"deadline": "16:00"}),
        ),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "e1", Duration::from_secs(10)), "applied");
    let written: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/RULE-1/e1.json")).unwrap())
            .unwrap();
    assert_eq!(
        written,
        json!({"id": "e1", "subject": "RULE-1", "revision": 3, "payload": {"deadline": "16:00"}, "partner": "test-partner"})
    );
    let status = admin_get(&agent, "/v1/events/e1").await;
    assert_eq!(status.body["state"], "applied");
    assert_eq!(status.body["deliveries"][0]["route"], "files");
    assert_eq!(status.body["deliveries"][0]["state"], "applied");
    assert_eq!(status.body["deliveries"][0]["attempts"], 1);
    for field in ["received_at", "updated_at", "finished_at"] {
        assert_timestamp(&status.body[field], field);
    }
    assert_timestamp(
        &status.body["deliveries"][0]["updated_at"],
        "deliveries[0].updated_at",
    );
    let (ok, out) = cli(&agent, &["status", "e1"]);
    assert!(ok && out.contains("\"applied\""), "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_timestamp(&shown["received_at"], "status received_at");
    // Log lines carry the same timestamps.
    let line = agent
        .wait_for_log(Duration::from_secs(1), |v| v["message"] == "event final")
        .unwrap();
    assert_timestamp(&line["timestamp"], "the log line's timestamp");
    // Replaying an applied event needs force; with force it is applied again, to the same file.
    let (ok, out) = cli(&agent, &["replay", "e1"]);
    assert!(!ok && out.contains("already_applied"), "{out}");
    let (ok, out) = cli(&agent, &["replay", "e1", "--force"]);
    assert!(ok, "{out}");
    assert!(
        agent
            .wait_for_log(Duration::from_secs(10), {
                let mut seen = 0;
                move |v| {
                    if v["message"] == "event final" && v["event_id"] == "e1" {
                        seen += 1;
                    }
                    seen == 2
                }
            })
            .is_some()
    );
    let files: Vec<_> = std::fs::read_dir(dir.path().join("out/RULE-1"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_subject_are_applied_in_order_and_lower_revisions_are_superseded() {
    use notify::{EventKind, RecursiveMode, Watcher};
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    // Watch the sink directory: the order of renames into place is the apply order.
    let order = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut watcher = {
        let order = order.clone();
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res
                && matches!(
                    event.kind,
                    EventKind::Modify(notify::event::ModifyKind::Name(_)) | EventKind::Create(_)
                )
            {
                for path in event.paths {
                    let name = path.file_name().unwrap().to_string_lossy().into_owned();
                    if !name.starts_with('.') {
                        order.lock().unwrap().push(name);
                    }
                }
            }
        })
        .unwrap()
    };
    watcher
        .watch(&dir.path().join("out"), RecursiveMode::NonRecursive)
        .unwrap();
    let agent = Agent::start(
        dir.path(),
        &file_route_config(
            dir.path(),
            "{subject}_{revision}.json",
            "[dispatch]\nmax_parallel = 8\n",
        ),
    );

    const SUBJECTS: usize = 50;
    const PER_SUBJECT: u64 = 20;
    let mut tasks = Vec::new();
    for s in 0..SUBJECTS {
        let url = agent.url(EVENTS);
        tasks.push(tokio::spawn(async move {
            let client = plain();
            for n in 0..PER_SUBJECT {
                let id = format!("s{s}-n{n}");
                let body = event(
                    &id,
                    "rule.updated",
                    &format!("S{s:02}"),
                    Some(n),
                    json!({"n": n}),
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
    let last = format!("s{}-n{}", SUBJECTS - 1, PER_SUBJECT - 1);
    let _ = wait_final(&agent, &last, Duration::from_secs(60));
    // Wait for every event: the access log and the final-state log lines are counted.
    assert!(
        agent
            .wait_for_log(Duration::from_secs(60), {
                let mut finals = 0;
                move |v| {
                    if v["message"] == "event final" {
                        finals += 1;
                    }
                    finals == SUBJECTS * PER_SUBJECT as usize
                }
            })
            .is_some(),
        "not every event became final"
    );
    // A lower revision after a higher one: superseded, not applied.
    let reply = post(
        &agent,
        "late",
        event("late", "rule.updated", "S00", Some(5), json!({"n": "late"})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        wait_final(&agent, "late", Duration::from_secs(10)),
        "superseded"
    );
    let status = admin_get(&agent, "/v1/events/late").await;
    assert!(
        status.body["error"]
            .as_str()
            .unwrap()
            .contains("revision 5 is lower than revision 19")
    );
    drop(watcher);

    let order = order.lock().unwrap().clone();
    let mut per_subject: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for name in &order {
        let stem = name.trim_end_matches(".json");
        let (subject, revision) = stem.split_once('_').unwrap();
        let list = per_subject.entry(subject.to_string()).or_default();
        let revision: u64 = revision.parse().unwrap();
        if list.last() != Some(&revision) {
            list.push(revision);
        }
    }
    assert_eq!(per_subject.len(), SUBJECTS);
    for (subject, revisions) in per_subject {
        assert_eq!(
            revisions,
            (0..PER_SUBJECT).collect::<Vec<_>>(),
            "subject {subject} applied out of order"
        );
    }
    // The superseded event wrote nothing: S00's revision-5 file holds the original payload.
    let five: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/S00_5.json")).unwrap()).unwrap();
    assert_eq!(five["payload"]["n"], 5);
}

fn http_route_config(dir: &Path, url: &str) -> String {
    http_route_config_with(
        dir,
        url,
        "{ initial_ms = 20, max_ms = 100, max_attempts = 20 }",
    )
}

fn http_route_config_with(dir: &Path, url: &str, retry: &str) -> String {
    format!(
        "adapters_dir = {adapters:?}\n\
         [[routes]]\nname = \"partner\"\nadapter = \"pass.jsonata\"\nsink = \"partner-api\"\n\
         [sinks.partner-api]\ntype = \"http\"\nurl = {url:?}\ntimeout_ms = 2000\n\
         retry = {retry}\n",
        adapters = dir.join("adapters").display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_failed_twice_then_applied_shows_each_attempt_the_output_and_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    // The partner refuses twice (a real 503 each time), then takes the output.
    let server = TestServer::start(200).await;
    server.script(&[503, 503]);
    let agent = Agent::start(
        dir.path(),
        &http_route_config(dir.path(), &server.url("/in")),
    );
    let body = event("h3", "rule.updated", "S", None, json!({"n": 3}));
    let signed_at = unix_now();
    let headers = signed_headers("msg-h3", signed_at, &body);
    let reply = request(&plain(), Method::POST, &agent.url(EVENTS), &headers, body)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let detail = loop {
        let detail = admin_get(&agent, "/v1/events/h3").await.body;
        if detail["state"] == "applied" {
            break detail;
        }
        assert!(std::time::Instant::now() < deadline, "{detail}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delivery = support::delivery(&detail, "partner");
    let history = delivery["history"].as_array().unwrap();
    let numbers: Vec<u64> = history
        .iter()
        .map(|a| a["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3], "{delivery}");
    let outcomes: Vec<&str> = history
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "applied"], "{delivery}");
    for failed in &history[..2] {
        let error = failed["error"].as_str().unwrap();
        assert!(error.contains("503"), "{error}");
    }
    assert!(history[2].get("error").is_none(), "{delivery}");
    for attempt in history {
        assert_timestamp(&attempt["started_at"], "started_at");
        assert!(attempt["duration_ms"].is_u64(), "{attempt}");
        assert_eq!(attempt["sink"], "partner-api");
    }
    assert!(history[0]["started_at"].as_str() <= history[2]["started_at"].as_str());
    // The output shown is the one the partner received.
    let received = server.received();
    assert_eq!(received.len(), 3);
    let taken: Value = serde_json::from_slice(&received[2].body).unwrap();
    assert_eq!(delivery["output"]["value"], taken, "{delivery}");
    assert_eq!(delivery["output"]["truncated"], false);
    assert_eq!(
        delivery["output"]["bytes"],
        serde_json::to_string(&taken).unwrap().len()
    );
    // How the delivery was authenticated, and none of the secret or the signature.
    let receipt = &detail["receipt"];
    assert_eq!(
        receipt["methods"],
        json!(["standard_webhooks"]),
        "{receipt}"
    );
    assert_eq!(receipt["webhook"]["id"], "msg-h3");
    assert_eq!(receipt["webhook"]["timestamp"], signed_at);
    assert_eq!(receipt["webhook"]["signature_versions"], json!(["v1"]));
    assert_eq!(receipt["webhook"]["verified_by"], "v1");
    let signature = headers
        .iter()
        .find(|(k, _)| *k == "webhook-signature")
        .map(|(_, v)| v.split_once(',').unwrap().1.to_owned())
        .unwrap();
    let text = detail.to_string();
    assert!(!text.contains(&signature), "{text}");
    let key = support::SECRET.trim_start_matches("whsec_");
    assert!(!text.contains(key), "{text}");
    // `ess-agent status` shows the same history.
    let (ok, out) = cli(&agent, &["status", "h3"]);
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        support::delivery(&shown, "partner")["history"],
        json!(history)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_asks_to_wait_with_retry_after_is_not_asked_again_sooner() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let server = TestServer::start(200).await;
    server.script(&[429, 503]);
    server.set_retry_after(Some("2"));
    // The route's own backoff alone would retry within 100 ms.
    let agent = Agent::start(
        dir.path(),
        &http_route_config(dir.path(), &server.url("/rules")),
    );
    let reply = post(
        &agent,
        "w1",
        event("w1", "rule.updated", "A", None, json!({"k": 1})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "w1", Duration::from_secs(20)), "applied");
    let received = server.received();
    assert_eq!(received.len(), 3, "429, 503, then 200");
    for pair in received.windows(2) {
        let waited = pair[1].at - pair[0].at;
        assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    }
    let retry = agent
        .wait_for_log(Duration::from_secs(1), |v| {
            v["message"] == "apply failed; will retry" && v["event_id"] == "w1"
        })
        .unwrap();
    assert!(retry["retry_in_ms"].as_u64().unwrap() >= 2000, "{retry}");
    assert!(
        retry["error"].as_str().unwrap().contains("Retry-After"),
        "{retry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_partner_endpoint_is_retried_and_a_refusal_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let server = TestServer::start(200).await;
    server.script(&[500, 503, 502, 500, 503]);
    let agent = Agent::start(
        dir.path(),
        &http_route_config(dir.path(), &server.url("/rules")),
    );

    let reply = post(
        &agent,
        "h1",
        event("h1", "rule.updated", "A", None, json!({"k": 1})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "h1", Duration::from_secs(20)), "applied");
    let received = server.received();
    assert_eq!(received.len(), 6, "5 failures and one success");
    assert!(received.iter().all(|r| r.headers["ess-event-id"] == "h1"));
    let status = admin_get(&agent, "/v1/events/h1").await;
    assert_eq!(status.body["deliveries"][0]["attempts"], 6);

    // A 400 is permanent: dead letter with the reason.
    server.script(&[400]);
    let reply = post(
        &agent,
        "h2",
        event("h2", "rule.updated", "B", None, json!({"k": 2})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "h2", Duration::from_secs(20)), "failed");
    let status = admin_get(&agent, "/v1/events/h2").await;
    let error = status.body["error"].as_str().unwrap();
    assert!(error.contains("400"), "{error}");
    let (ok, out) = cli(&agent, &["dead-letters", "list"]);
    assert!(ok && out.contains("\"h2\"") && out.contains("400"), "{out}");
    assert_eq!(server.received().len(), 7);

    // The partner fixes their side; the operator retries from the CLI: applied, once.
    let (ok, out) = cli(&agent, &["dead-letters", "retry", "h2"]);
    assert!(ok, "{out}");
    assert!(
        agent
            .wait_for_log(Duration::from_secs(20), |v| v["message"] == "event final"
                && v["event_id"] == "h2"
                && v["state"] == "applied")
            .is_some()
    );
    assert_eq!(server.received().len(), 8);
    let (ok, out) = cli(&agent, &["dead-letters", "list"]);
    assert!(ok && !out.contains("\"h2\""), "{out}");
}

#[tokio::test]
async fn an_unrouted_event_is_parked_and_applied_once_a_route_exists() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let config = file_route_config(dir.path(), "{id}.json", "");
    let mut agent = Agent::start(dir.path(), &config);
    let reply = post(
        &agent,
        "p1",
        event("p1", "PolicyUpdated", "P", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "p1", Duration::from_secs(10)), "parked");
    let letters = admin_get(&agent, "/v1/dead-letters").await;
    assert_eq!(letters.body["items"][0]["id"], "p1");
    assert!(
        letters.body["items"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no route")
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).unwrap().success());

    // The operator adds a route for the type and restarts; then replays the parked event.
    let config = config.replace(
        "types = [\"rule.*\"]",
        "types = [\"rule.*\", \"PolicyUpdated\"]",
    );
    let agent = Agent::start(dir.path(), &config);
    let (ok, out) = cli(&agent, &["replay", "p1"]);
    assert!(ok, "{out}");
    assert_eq!(wait_final(&agent, "p1", Duration::from_secs(10)), "applied");
    assert!(dir.path().join("out/p1.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_events_are_pruned_after_the_retention_and_dead_letters_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    // About 2.6 s of retention.
    let config = file_route_config(
        dir.path(),
        "{id}.json",
        "[journal]\nretention_days = 0.00003\n",
    );
    let agent = Agent::start(dir.path(), &config);
    let applied = event("r1", "rule.updated", "R", None, json!({}));
    assert_eq!(
        post(&agent, "r1", applied.clone(), &[]).await.status,
        StatusCode::ACCEPTED
    );
    let parked = event("r2", "PolicyUpdated", "P", None, json!({}));
    assert_eq!(
        post(&agent, "r2", parked, &[]).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(wait_final(&agent, "r1", Duration::from_secs(10)), "applied");
    assert_eq!(wait_final(&agent, "r2", Duration::from_secs(10)), "parked");

    let pruned = agent
        .wait_for_log(Duration::from_secs(30), |v| {
            v["message"] == "pruned final events past the journal's retention"
        })
        .unwrap_or_else(|| panic!("nothing was pruned; log:\n{}", agent.log_text()));
    assert_eq!(pruned["events"], 1, "{pruned}");
    assert_eq!(
        admin_get(&agent, "/v1/events/r1").await.status,
        StatusCode::NOT_FOUND
    );
    let letter = admin_get(&agent, "/v1/events/r2").await;
    assert_eq!(letter.status, StatusCode::OK);
    assert_eq!(letter.body["state"], "parked");
    assert_eq!(support::journal_ids(&agent.state_dir), ["r2"]);

    // Past the retention the id is forgotten: a redelivery is a new event and applied again.
    std::fs::remove_file(dir.path().join("out/r1.json")).unwrap();
    let again = post(&agent, "r1", applied, &[]).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{:?}", again.body);
    assert_eq!(again.body["status"], "accepted");
    let mut finals = 0;
    let second = agent.wait_for_log(Duration::from_secs(10), |v| {
        finals += usize::from(v["message"] == "event final" && v["event_id"] == "r1");
        finals == 2
    });
    assert_eq!(second.expect("applied again")["state"], "applied");
    assert!(dir.path().join("out/r1.json").exists());
}

#[tokio::test]
async fn runaway_adapters_become_dead_letters_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(
        dir.path(),
        "loop.jsonata",
        "( $f := function($x){ $f($x) }; $f(1) )",
    );
    write_adapter(
        dir.path(),
        "deep.jsonata",
        "( $f := function($n){ $n = 0 ? 0 : 1 + $f($n - 1) }; $f(100000) )",
    );
    write_adapter(
        dir.path(),
        "huge.jsonata",
        // 100 strings of 1 MB: a 100 MB output.
        "( $s := $pad(\"x\", 1000000, \"x\"); [1..100].($s) )",
    );
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let mut extra = format!(
        "adapters_dir = {:?}\n",
        dir.path().join("adapters").display().to_string()
    );
    for name in ["loop", "deep", "huge", "pass"] {
        extra.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\ntypes = [\"{name}\"]\nadapter = \"{name}.jsonata\"\nsink = \"files\"\ntime_limit_ms = 500\n"
        ));
    }
    extra.push_str(&format!(
        "[sinks.files]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
        dir.path().join("out").display().to_string()
    ));
    let agent = Agent::start(dir.path(), &extra);
    for name in ["loop", "deep", "huge"] {
        let started = std::time::Instant::now();
        let reply = post(&agent, name, event(name, name, name, None, json!({})), &[]).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        assert_eq!(
            wait_final(&agent, name, Duration::from_secs(20)),
            "failed",
            "{name}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            started.elapsed()
        );
        let status = admin_get(&agent, &format!("/v1/events/{name}")).await;
        let error = status.body["error"].as_str().unwrap();
        assert!(error.contains(&format!("{name}.jsonata")), "{error}");
        let code = match name {
            "huge" => "U1003",
            _ => "U100",
        };
        assert!(error.contains(code), "{name}: {error}");
        assert!(!dir.path().join(format!("out/{name}.json")).exists());
    }
    let reply = post(
        &agent,
        "ok",
        event("ok", "pass", "ok", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "ok", Duration::from_secs(10)), "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_dispatch_applies_every_event_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let config = support::config_text(
        dir.path(),
        &file_route_config(dir.path(), "{subject}-{id}.json", ""),
    );
    let mut acked = BTreeSet::new();
    for round in 0..3 {
        let mut agent = Agent::start_with(dir.path(), &config);
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..4 {
            let url = agent.url(EVENTS);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let client = plain();
                let mut acked = Vec::new();
                for n in 0..400 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("r{round}c{c}n{n}");
                    let body = event(&id, "rule.updated", &format!("S{c}"), None, json!({"n": n}));
                    let headers = signed_headers(&id, unix_now(), &body);
                    match request(&client, Method::POST, &url, &headers, body).await {
                        Ok(r) if r.status.is_success() => acked.push(id),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                acked
            }));
        }
        // Kill while events are being applied.
        let applied = agent.wait_for_log(Duration::from_secs(30), {
            let mut n = 0;
            move |v| {
                if support::applied_line(v) {
                    n += 1;
                }
                n >= 30 + round * 20
            }
        });
        assert!(applied.is_some(), "round {round}: nothing applied");
        agent.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
    }
    // A final run applies what was left.
    let agent = Agent::start_with(dir.path(), &config);
    let expected: BTreeSet<String> = acked
        .iter()
        .map(|id| format!("S{}-{id}.json", &id[3..4]))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let files: BTreeSet<String> = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // Temporary files of the killed runs are swept at start; those of events still being
        // written (stored but never answered) go once they are applied.
        let stray: Vec<_> = files.iter().filter(|f| f.starts_with('.')).collect();
        if files.is_superset(&expected) && stray.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing: {:?}; temporary files left: {stray:?}",
            expected.difference(&files).take(10).collect::<Vec<_>>()
        );
        // Waiting for the dispatcher to catch up with the backlog after the restart.
        agent.wait_for_log(Duration::from_millis(200), support::applied_line);
    }
    // Every file holds its own event.
    for id in &acked {
        let name = format!("S{}-{id}.json", &id[3..4]);
        let written: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("out").join(&name)).unwrap())
                .unwrap();
        assert_eq!(written["id"], id.as_str());
    }
    // And each accepted event is applied exactly once in the journal's view too.
    for id in acked.iter().take(50) {
        let status = admin_get(&agent, &format!("/v1/events/{id}")).await;
        assert_eq!(status.body["state"], "applied", "{id}");
    }
}

#[tokio::test]
async fn the_file_sink_removes_temporary_files_a_killed_run_left_when_the_agent_starts() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("RULE-1")).unwrap();
    let leftover = out.join("RULE-1/.e1.json.0123456789abcdef.tmp");
    let look_alike = out.join("RULE-1/.e1.json.tmp");
    let partner_file = out.join("RULE-1/notes.0123456789abcdef.tmp");
    for path in [&leftover, &look_alike, &partner_file] {
        std::fs::write(path, "{\"partial").unwrap();
    }
    let agent = Agent::start(
        dir.path(),
        &file_route_config(dir.path(), "{subject}/{id}.json", ""),
    );
    // No event arrives: the sweep is the sink's start, not its first write.
    let swept = agent.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "removed temporary files an interrupted run left behind"
    });
    assert!(swept.is_some(), "no sweep; log:\n{}", agent.log_text());
    assert_eq!(swept.unwrap()["count"], 1);
    assert!(!leftover.exists());
    assert!(look_alike.exists() && partner_file.exists());
}

#[tokio::test]
async fn a_file_sink_whose_disk_fills_retries_shows_nothing_partial_and_applies_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let out = dir.path().join("out");
    let Some(_fs) = support::Tmpfs::mount(&out, "2m") else {
        return;
    };
    // Leaves about 200 KiB: less than the record, more than nothing, so the write starts and
    // fails part-way.
    let ballast = out.join("ballast");
    std::fs::write(&ballast, vec![0u8; 1848 * 1024]).unwrap();
    let agent = Agent::start(
        dir.path(),
        &format!(
            "{}[limits]\nmax_body_bytes = 1048576\nmin_free_disk_bytes = 0\n",
            file_route_config(
                dir.path(),
                "{subject}/{id}.json",
                "retry = { initial_ms = 20, max_ms = 100, max_attempts = 0 }\n"
            )
        ),
    );
    let big = "y".repeat(400 * 1024);
    let reply = post(
        &agent,
        "big",
        event("big", "rule.updated", "RULE-9", None, json!({"text": big})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    // Retried, with the cause in the error, several times.
    let retried = agent.wait_for_log(Duration::from_secs(20), {
        let mut n = 0;
        move |v| {
            if v["message"] == "apply failed; will retry" && v["event_id"] == "big" {
                assert!(v["error"].as_str().unwrap().contains("free space"), "{v}");
                n += 1;
            }
            n >= 3
        }
    });
    assert!(retried.is_some(), "no retries; log:\n{}", agent.log_text());
    let status = admin_get(&agent, "/v1/events/big").await;
    assert_eq!(status.body["state"], "accepted", "{:?}", status.body);
    // Nothing under the final name, and no temporary file holding on to the space.
    let target = out.join("RULE-9/big.json");
    assert!(!target.exists());
    let entries = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(entries(&out.join("RULE-9")), Vec::<String>::new());

    // Space is freed: the next attempt applies it, whole.
    std::fs::remove_file(&ballast).unwrap();
    assert_eq!(
        wait_final(&agent, "big", Duration::from_secs(20)),
        "applied"
    );
    let written: Value = serde_json::from_slice(&std::fs::read(&target).unwrap()).unwrap();
    assert_eq!(
        written["payload"]["text"].as_str().unwrap().len(),
        big.len()
    );
    assert_eq!(entries(&out.join("RULE-9")), ["big.json"]);
}

#[tokio::test]
async fn dry_run_shows_outputs_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let agent = Agent::start(dir.path(), &file_route_config(dir.path(), "{id}.json", ""));
    let reply = post(
        &agent,
        "dry",
        event("dry", "rule.updated", "D", Some(1), json!({"x": 1})),
        &[("x-hms-test", "true".into())],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["status"], "dry_run");
    assert_eq!(reply.body["outputs"][0]["route"], "files");
    assert_eq!(
        reply.body["outputs"][0]["output"]["payload"],
        json!({"x": 1})
    );
    assert!(agent.journal_ids().is_empty());
    assert!(!dir.path().join("out/dry.json").exists());
    // An unrouted dry run says so.
    let reply = post(
        &agent,
        "dry2",
        event("dry2", "other", "D", None, json!({})),
        &[("x-hms-test", "true".into())],
    )
    .await;
    assert_eq!(reply.body["outputs"], json!([]));
    assert!(reply.body["note"].as_str().unwrap().contains("no route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_applied_answers_applied_failed_or_accepted_on_timeout() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let server = TestServer::start(200).await;
    let config = format!(
        "{}[ingress]\nlisten = \"127.0.0.1:0\"\nack_mode = \"applied\"\nack_timeout_ms = 1500\n",
        http_route_config_with(
            dir.path(),
            &server.url("/rules"),
            "{ initial_ms = 500, max_ms = 1000, max_attempts = 100 }"
        )
    );
    let agent = Agent::start(dir.path(), &config);
    let reply = post(
        &agent,
        "a1",
        event("a1", "rule.updated", "A", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body, json!({"ack": "a1", "status": "applied"}));

    server.script(&[422]);
    let reply = post(
        &agent,
        "a2",
        event("a2", "rule.updated", "B", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["status"], "failed");
    assert!(reply.body["error"].as_str().unwrap().contains("422"));

    // The endpoint keeps failing (retryable): the hub gets 202 accepted when the wait runs out.
    server.set_default(503);
    let started = std::time::Instant::now();
    let reply = post(
        &agent,
        "a3",
        event("a3", "rule.updated", "C", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.body, json!({"ack": "a3", "status": "accepted"}));
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert!(agent.journal_ids().contains(&"a3".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_reach_the_hub_signed_are_retried_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let agent_secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    std::fs::write(dir.path().join("agent-secret"), agent_secret).unwrap();
    let hub = TestServer::start(200).await;
    let config = support::config_text(
        dir.path(),
        &format!(
            "{}[report]\nurl = {:?}\nsecret = {{ file = {:?} }}\nretry_initial_ms = 20\nretry_max_ms = 200\n",
            file_route_config(dir.path(), "{id}.json", ""),
            hub.url("/acks"),
            dir.path().join("agent-secret").display().to_string()
        ),
    );
    let mut agent = Agent::start_with(dir.path(), &config);
    let reply = post(
        &agent,
        "r1",
        event("r1", "rule.updated", "R", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert!(
        hub.wait_until(Duration::from_secs(10), |r| !r.is_empty())
            .await
    );
    let first = &hub.received()[0];
    let report: Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(report["ack"], "r1");
    assert_eq!(report["partner"], "test-partner");
    assert_eq!(report["status"], "applied");
    assert_eq!(report["attempts"], 1);
    assert_timestamp(&report["at"], "the report's at");
    // The signature verifies with the agent's secret.
    let verifier = ess_agent::protocol::auth::WebhookVerifier::new(
        &[agent_secret.to_string()],
        &[],
        Duration::from_secs(300),
    )
    .unwrap();
    verifier
        .verify(&first.headers, &first.body, std::time::SystemTime::now())
        .unwrap();
    // The event keeps the report the hub took, with when it took it.
    let sent = reports_sent(&agent, "r1").await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["body"], report);
    assert_eq!(sent[0]["attempts"], 1);
    assert_timestamp(&sent[0]["sent_at"], "the report's sent_at");

    // The hub is down: reports wait, are retried, and survive a restart of the agent.
    hub.stop();
    let reply = post(
        &agent,
        "r2",
        event("r2", "rule.updated", "R", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert!(
        agent
            .wait_for_log(Duration::from_secs(10), |v| v["message"]
                == "status report not accepted by the hub; will retry"
                && v["event_id"] == "r2")
            .is_some()
    );
    agent.kill9();
    drop(agent);
    let hub = hub.restart().await;
    let agent = Agent::start_with(dir.path(), &config);
    assert!(
        hub.wait_until(Duration::from_secs(10), |r| r
            .iter()
            .any(|r| r.body.windows(4).any(|w| w == b"\"r2\"")))
            .await,
        "the queued report was not delivered after the restart"
    );
    // The kill may come before the failed attempt was recorded, so the count can be 1 or more.
    let sent = reports_sent(&agent, "r2").await;
    assert_eq!(sent[0]["body"]["ack"], "r2");
    assert_timestamp(&sent[0]["sent_at"], "the queued report's sent_at");
}

/// The status reports the agent says the hub took for event `id`, once there is one.
async fn reports_sent(agent: &Agent, id: &str) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = admin_get(agent, &format!("/v1/events/{id}")).await;
        if let Some(sent) = status.body["reports_sent"].as_array()
            && !sent.is_empty()
        {
            return sent.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no status report of {id} is recorded as taken by the hub: {}",
            status.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_keeps_failing_gives_a_final_error_that_promises_no_retry() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "pass.jsonata", PASS_THROUGH);
    let server = TestServer::start(503).await;
    let config = http_route_config_with(
        dir.path(),
        &server.url("/apply"),
        "{ initial_ms = 10, max_ms = 20, max_attempts = 2 }",
    );
    let agent = Agent::start(dir.path(), &config);
    let reply = post(
        &agent,
        "g1",
        event("g1", "rule.updated", "G", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "g1", Duration::from_secs(10)), "failed");
    let status = admin_get(&agent, "/v1/events/g1").await;
    let error = status.body["deliveries"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.starts_with("gave up after 2 attempts; last error: "),
        "{error}"
    );
    assert!(error.contains("answered 503"), "{error}");
    assert!(!error.contains("will be retried"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_adapter_run_counts_as_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(
        dir.path(),
        "pass.jsonata",
        r#"$error("this payload cannot be stored")"#,
    );
    let agent_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    std::fs::write(dir.path().join("agent-secret"), agent_secret).unwrap();
    let hub = TestServer::start(200).await;
    let config = format!(
        "{}[report]\nurl = {:?}\nsecret = {{ file = {:?} }}\n",
        file_route_config(dir.path(), "{id}.json", ""),
        hub.url("/acks"),
        dir.path().join("agent-secret").display().to_string()
    );
    let agent = Agent::start(dir.path(), &config);
    let reply = post(
        &agent,
        "a1",
        event("a1", "rule.updated", "A", None, json!({})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(wait_final(&agent, "a1", Duration::from_secs(10)), "failed");
    let status = admin_get(&agent, "/v1/events/a1").await;
    let delivery = &status.body["deliveries"][0];
    assert_eq!(delivery["attempts"], 1, "{}", status.body);
    assert!(
        delivery["last_error"]
            .as_str()
            .unwrap()
            .contains("this payload cannot be stored"),
        "{}",
        status.body
    );
    // The hub is told the same.
    assert!(
        hub.wait_until(Duration::from_secs(10), |r| !r.is_empty())
            .await
    );
    let report: Value = serde_json::from_slice(&hub.received()[0].body).unwrap();
    assert_eq!(report["ack"], "a1");
    assert_eq!(report["status"], "failed");
    assert_eq!(report["attempts"], 1, "{report}");
}
