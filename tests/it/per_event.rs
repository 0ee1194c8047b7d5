//! What each event costs an operator however many there are: one log line at info level (or
//! fewer, as `log.events` says), and a bounded number of events held in memory however far the
//! dispatcher falls behind.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ess_agent::journal::{self, Journal, JournalOptions};
use serde_json::Value;

use crate::support::{self, Agent, admin_get, event_body, plain, request, signed_headers};

/// A route for `rule.updated` into a file sink, and `log` as the `[log]` section.
fn file_route(dir: &Path, log: &str) -> String {
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    std::fs::write(
        dir.join("adapters/copy.jsonata"),
        "{ \"id\": id, \"n\": payload.n }",
    )
    .unwrap();
    let extra = format!(
        "adapters_dir = {adapters:?}\n\
         [ingress]\nlisten = \"127.0.0.1:0\"\nack_mode = \"applied\"\n\
         {log}\n\
         [[routes]]\nname = \"files\"\ntypes = [\"rule.updated\"]\nversions = \"1\"\n\
         adapter = \"copy.jsonata\"\nsink = \"out\"\n\
         [sinks.out]\ntype = \"file\"\ndir = {out:?}\nname = \"{{id}}.json\"\n",
        adapters = dir.join("adapters").display().to_string(),
        out = dir.join("out").display().to_string(),
    );
    support::config_text(dir, &extra)
}

/// Posts a signed event of `event_type` and returns the agent's answer (in ack mode `applied`,
/// once the event is final).
async fn post(agent: &Agent, id: &str, event_type: &str) -> support::Reply {
    let body = serde_json::to_vec(&serde_json::json!({
        "id": id, "version": 1, "type": event_type, "subject": id, "payload": {"n": 1}
    }))
    .unwrap();
    let headers = signed_headers(id, support::unix_now(), &body);
    request(
        &plain(),
        http::Method::POST,
        &agent.url("/v1/events"),
        &headers,
        Bytes::from(body),
    )
    .await
    .expect("delivery")
}

/// The agent's info (and higher) lines that name event `id`, once a later event's final line
/// is out: the log thread writes lines in order, so every line of `id` is out by then.
async fn info_lines_of(agent: &Agent, id: &str) -> Vec<Value> {
    // An event no route takes is parked: a dead letter, logged whatever `log.events` says.
    let marker = format!("{id}-marker");
    let reply = post(agent, &marker, "nobody.routes.this").await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event final" && v["event_id"] == marker.as_str()
        })
        .expect("the parked event's final line");
    agent
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event_id"] == id && v["level"] != "DEBUG" && v["level"] != "TRACE")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_event_writes_one_line_at_info() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(dir.path(), &file_route(dir.path(), ""));
    let reply = post(&agent, "evt-one-line", "rule.updated").await;
    assert_eq!(reply.body["status"], "applied", "{:?}", reply.body);
    assert!(dir.path().join("out/evt-one-line.json").exists());
    let lines = info_lines_of(&agent, "evt-one-line").await;
    assert_eq!(
        lines.len(),
        1,
        "one info line per applied event: {lines:#?}"
    );
    assert_eq!(lines[0]["message"], "event final");
    assert_eq!(lines[0]["state"], "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_events_failures_leaves_out_applied_events_and_keeps_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        dir.path(),
        &file_route(dir.path(), "[log]\nevents = \"failures\""),
    );
    let reply = post(&agent, "evt-quiet", "rule.updated").await;
    assert_eq!(reply.body["status"], "applied", "{:?}", reply.body);
    assert!(dir.path().join("out/evt-quiet.json").exists());
    assert_eq!(
        info_lines_of(&agent, "evt-quiet").await,
        Vec::<Value>::new()
    );
    // The parked marker itself was logged (`info_lines_of` waited for its line).
}

#[test]
fn an_unknown_log_events_value_is_refused_with_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ess-agent.toml");
    std::fs::write(
        &config,
        support::config_text(dir.path(), "[log]\nevents = \"some\""),
    )
    .unwrap();
    let (status, output) = support::run_expecting_exit(&config, Duration::from_secs(10));
    assert!(!status.expect("the agent exits").success(), "{output}");
    assert!(output.contains("log.events"), "{output}");
    for choice in ["all", "failures", "none"] {
        assert!(output.contains(choice), "{output}");
    }
}

/// Events put straight into a journal in `state_dir` (as if the agent had accepted them and
/// stopped before applying any): `count` events over `subjects` subjects.
async fn fill_backlog(state_dir: &Path, count: usize, subjects: usize) {
    let options = JournalOptions {
        min_free_disk_bytes: 0,
        retention: None,
        ..JournalOptions::default()
    };
    let journal = Journal::open(state_dir, options).expect("open the journal");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let events: Vec<journal::NewEvent> = (0..count)
        .map(|n| {
            let id = format!("backlog-{n:06}");
            let body = event_body(
                &id,
                &format!("S{}", n % subjects),
                serde_json::json!({"n": n}),
            );
            let envelope = ess_agent::protocol::envelope::parse(&headers, &body).unwrap();
            ess_agent::ingress::handler::new_event(
                envelope,
                Some("application/json".into()),
                Bytes::from(body),
            )
        })
        .collect();
    for chunk in events.chunks(1000) {
        let chunk = chunk.to_vec();
        journal
            .sqlite()
            .expect("a SQLite journal")
            .write(move |conn| {
                let now = ess_agent::timestamp::now();
                for event in &chunk {
                    journal::insert_event(conn, event, &now)?;
                }
                Ok(())
            })
            .await
            .expect("insert");
    }
    journal.close();
}

/// A metric's value from the agent's `/metrics`.
async fn metric(agent: &Agent, name: &str) -> f64 {
    let reply = admin_get(agent, "/metrics").await;
    reply
        .body
        .as_str()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_drains_with_a_bounded_number_of_events_held() {
    const BACKLOG: usize = 20_000;
    const POSTED: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    fill_backlog(&dir.path().join("state"), BACKLOG, 500).await;
    // An adapter that returns nothing: each event is read, evaluated and finished, quickly.
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/none.jsonata"), "payload.nothing").unwrap();
    let extra = format!(
        "adapters_dir = {:?}\n\
         [[routes]]\nname = \"none\"\ntypes = [\"rule.updated\"]\nversions = \"1\"\n\
         adapter = \"none.jsonata\"\nsink = \"out\"\n\
         [sinks.out]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
        dir.path().join("adapters").display().to_string(),
        dir.path().join("out").display().to_string(),
    );
    let agent = Agent::start(dir.path(), &extra);
    // Events delivered while the dispatcher is behind are taken from the journal in their turn.
    for n in 0..POSTED {
        let id = format!("posted-{n:04}");
        let body = event_body(&id, &format!("S{}", n % 7), serde_json::json!({"n": n}));
        let headers = signed_headers(&id, support::unix_now(), &body);
        let reply = request(
            &plain(),
            http::Method::POST,
            &agent.url("/v1/events"),
            &headers,
            Bytes::from(body),
        )
        .await
        .expect("delivery");
        assert!(reply.status.is_success(), "{:?}", reply.body);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let total = (BACKLOG + POSTED) as f64;
    loop {
        let filtered = metric(&agent, "ess_agent_events_final_total{state=\"filtered\"}").await;
        if filtered >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {filtered} of {total} events final after two minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&agent, "ess_agent_backlog").await, 0.0);
    let peak = metric(&agent, "ess_agent_dispatch_queued_peak").await;
    assert!(peak > 0.0, "the gauge is exposed");
    assert!(
        peak <= ess_agent::dispatch::QUEUED_MAX as f64,
        "the dispatcher held {peak} events at once (at most {} expected)",
        ess_agent::dispatch::QUEUED_MAX
    );
    assert_eq!(metric(&agent, "ess_agent_dispatch_queued").await, 0.0);
    // Every event final exactly once: nothing lost, nothing counted twice.
    assert_eq!(
        metric(&agent, "ess_agent_events_final_total{state=\"filtered\"}").await,
        total
    );
}
