//! The operator console's API and CLI on a real agent: the event listing with filters and
//! paging, replay through one route, bulk retry of dead letters, adapter evaluation, the
//! cross-site check, and every answer checked against docs/openapi.json.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::hub::TestServer;
use crate::support::{self, Agent, Reply, plain, request, signed_headers, unix_now};

const PASS_THROUGH: &str = r#"{"id": id, "subject": subject, "payload": payload}"#;

/// Adapters in `dir/adapters`; a file route for each `(name, types)`, writing into
/// `dir/out-NAME`; `extra` appended.
fn file_routes(dir: &Path, routes: &[(&str, &str)], extra: &str) -> String {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join("pass.jsonata"), PASS_THROUGH).unwrap();
    let mut text = format!("adapters_dir = {:?}\n", adapters.display().to_string());
    for (name, types) in routes {
        text.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\ntypes = {types}\nadapter = \"pass.jsonata\"\nsink = \"{name}\"\n\
             [sinks.{name}]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
            dir.join(format!("out-{name}")).display().to_string()
        ));
    }
    text + extra
}

async fn post_event(agent: &Agent, id: &str, event_type: &str, subject: &str) {
    let body = serde_json::to_vec(
        &json!({"id": id, "version": 1, "type": event_type, "subject": subject, "payload": {"n": 1}}),
    )
    .unwrap();
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
}

async fn admin(agent: &Agent, method: Method, path: &str, body: Option<Value>) -> Reply {
    admin_with(agent, method, path, &[], body).await
}

async fn admin_with(
    agent: &Agent,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Value>,
) -> Reply {
    let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    request(&plain(), method, &agent.admin_url(path), headers, bytes)
        .await
        .expect("admin request")
}

/// Polls the event's detail until `done` holds for it; panics at the deadline.
async fn wait_event(agent: &Agent, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = admin(agent, Method::GET, &format!("/v1/events/{id}"), None).await;
        if reply.status == StatusCode::OK && done(&reply.body) {
            return reply.body;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} never became {what}: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_state(agent: &Agent, id: &str, state: &str) -> Value {
    wait_event(agent, id, state, |e| e["state"] == state).await
}

/// Runs `ess-agent` with `args` against the agent; (success, stdout, stderr).
fn cli(agent: &Agent, args: &[&str]) -> (bool, String, String) {
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
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page}"))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_newest_first_with_filters_and_pages_from_the_api_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &file_routes(dir.path(), &[("files", "[\"rule.*\"]")], ""),
    );
    let started = support::unix_now() - 1;
    for i in 0..9 {
        let (event_type, subject) = match i % 3 {
            0 => ("rule.updated", "A"),
            1 => ("rule.deleted", "B"),
            _ => ("policy.changed", "A"),
        };
        post_event(&agent, &format!("ev-{i}"), event_type, subject).await;
    }
    for i in 0..9 {
        let state = if i % 3 == 2 { "parked" } else { "applied" };
        wait_state(&agent, &format!("ev-{i}"), state).await;
    }

    let all = admin(&agent, Method::GET, "/v1/events", None).await;
    assert_eq!(all.status, StatusCode::OK);
    let expected: Vec<String> = (0..9).rev().map(|i| format!("ev-{i}")).collect();
    assert_eq!(ids(&all.body), expected);
    assert_eq!(all.body["next_cursor"], Value::Null);

    let get = |query: &'static str| admin(&agent, Method::GET, query, None);
    assert_eq!(
        ids(&get("/v1/events?state=parked").await.body),
        ["ev-8", "ev-5", "ev-2"]
    );
    assert_eq!(
        ids(&get("/v1/events?type=rule.*&subject=A").await.body),
        ["ev-6", "ev-3", "ev-0"]
    );
    assert_eq!(
        ids(&get("/v1/events?type=rule.d%3Fleted").await.body),
        ["ev-7", "ev-4", "ev-1"]
    );
    assert_eq!(
        ids(
            &get("/v1/events?route=files&state=applied,failed&subject=B")
                .await
                .body
        ),
        ["ev-7", "ev-4", "ev-1"]
    );
    assert!(ids(&get("/v1/events?until=2001-01-01T00:00:00Z").await.body).is_empty());
    let since = time::OffsetDateTime::from_unix_timestamp(started)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let recent = admin(
        &agent,
        Method::GET,
        &format!("/v1/events?since={}", since.replace('+', "%2B")),
        None,
    )
    .await;
    assert_eq!(ids(&recent.body).len(), 9, "{}", recent.body);

    // Pages of 4 by the cursor: every event once, newest first.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let path = match &cursor {
            Some(c) => format!("/v1/events?limit=4&cursor={c}"),
            None => "/v1/events?limit=4".to_owned(),
        };
        let page = admin(&agent, Method::GET, &path, None).await;
        paged.extend(ids(&page.body));
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, expected);

    // A bad parameter is refused, naming it.
    for (query, named) in [
        ("limit=501", "limit"),
        ("state=done", "state"),
        ("since=yesterday", "since"),
        ("cursor=abc", "cursor"),
        ("sate=failed", "sate"),
    ] {
        let reply = admin(&agent, Method::GET, &format!("/v1/events?{query}"), None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(reply.headers["content-type"], "application/problem+json");
        let detail = reply.body["detail"].as_str().unwrap();
        assert!(detail.contains(named), "{query}: {detail}");
    }

    // The CLI: a table with escaped text, JSON lines, and the next page's cursor.
    let (ok, out, err) = cli(
        &agent,
        &["events", "list", "--state", "parked", "--limit", "2"],
    );
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("RECEIVED") && lines[0].contains("SUBJECT"));
    assert!(lines[1].contains("parked") && lines[1].contains("policy.changed"));
    assert!(
        lines[1].ends_with("ev-8") && lines[2].ends_with("ev-5"),
        "{out}"
    );
    let cursor = err
        .split("--cursor ")
        .nth(1)
        .unwrap_or_else(|| panic!("no cursor in {err}"))
        .trim();
    let (ok, out, err) = cli(
        &agent,
        &[
            "events", "list", "--state", "parked", "--limit", "2", "--cursor", cursor, "--json",
        ],
    );
    assert!(ok, "{out}{err}");
    let rest: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["id"], "ev-2");
    assert!(err.is_empty(), "the last page names no cursor: {err}");
    let (ok, out, err) = cli(&agent, &["events", "list", "--since", "not a time"]);
    assert!(!ok && out.contains("since"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_through_one_route_applies_that_route_only() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &file_routes(
            dir.path(),
            &[
                ("a", "[\"rule.*\"]"),
                ("b", "[\"rule.*\"]"),
                ("c", "[\"other.*\"]"),
            ],
            "",
        ),
    );
    post_event(&agent, "r1", "rule.updated", "S").await;
    let before = wait_state(&agent, "r1", "applied").await;
    let out_a = dir.path().join("out-a/r1.json");
    let out_b = dir.path().join("out-b/r1.json");
    assert!(out_a.exists() && out_b.exists());
    std::fs::remove_file(&out_a).unwrap();
    std::fs::remove_file(&out_b).unwrap();

    // Route a was applied: replaying it needs force.
    let (ok, out, _) = cli(&agent, &["replay", "r1", "--route", "a"]);
    assert!(
        !ok && out.contains("already_applied") && out.contains(r#"route \"a\""#),
        "{out}"
    );
    let (ok, out, err) = cli(&agent, &["replay", "r1", "--route", "a", "--force"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("\"route\": \"a\""), "{out}");
    let after = wait_event(&agent, "r1", "applied again", |e| {
        e["state"] == "applied" && e["updated_at"] != before["updated_at"]
    })
    .await;
    assert!(out_a.exists(), "route a was applied again");
    assert!(!out_b.exists(), "route b must not be applied again");
    let delivery = |e: &Value, route: &str| {
        e["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["route"] == route)
            .cloned()
            .unwrap()
    };
    assert_eq!(delivery(&after, "b"), delivery(&before, "b"));
    assert_ne!(
        delivery(&after, "a")["updated_at"],
        delivery(&before, "a")["updated_at"]
    );

    let replay = |route: &str| {
        admin(
            &agent,
            Method::POST,
            "/v1/events/r1/replay?force=true",
            Some(json!({ "route": route })),
        )
    };
    let unknown = replay("nope").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let detail = unknown.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("\"nope\"") && detail.contains("a, b, c"),
        "{detail}"
    );
    let other = replay("c").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        other.body["detail"]
            .as_str()
            .unwrap()
            .contains("rule.updated")
    );
    let bad = admin(
        &agent,
        Method::POST,
        "/v1/events/r1/replay",
        Some(json!({"rout": "a"})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letters_of_one_route_are_retried_in_bulk_once_its_sink_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(400).await;
    let config = format!(
        "{}[[routes]]\nname = \"partner\"\ntypes = [\"rule.*\"]\nadapter = \"pass.jsonata\"\nsink = \"api\"\n\
         [sinks.api]\ntype = \"http\"\nurl = {:?}\ntimeout_ms = 2000\n",
        file_routes(dir.path(), &[("files", "[\"file.*\"]")], ""),
        server.url("/rules")
    );
    let agent = Agent::start(dir.path(), &config);
    for id in ["f1", "f2", "f3"] {
        post_event(&agent, id, "rule.updated", id).await;
    }
    post_event(&agent, "p1", "Policy", "P").await;
    for id in ["f1", "f2", "f3"] {
        wait_state(&agent, id, "failed").await;
    }
    wait_state(&agent, "p1", "parked").await;

    // No filter and no --all: refused before anything is sent.
    let (ok, out, err) = cli(&agent, &["dead-letters", "retry"]);
    assert!(!ok && err.contains("--all"), "{out}{err}");
    let refused = admin(
        &agent,
        Method::POST,
        "/v1/dead-letters/retry",
        Some(json!({})),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.body["code"], "no_filter");

    server.set_default(200);
    let (ok, out, err) = cli(&agent, &["dead-letters", "retry", "--route", "partner"]);
    assert!(ok, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["requeued"], 3);
    assert_eq!(answer["ids"], json!(["f3", "f2", "f1"]));
    assert_eq!(answer["more"], false);
    for id in ["f1", "f2", "f3"] {
        wait_state(&agent, id, "applied").await;
    }
    // The parked event has no delivery through the route: it stays a dead letter.
    let letters = admin(&agent, Method::GET, "/v1/dead-letters", None).await;
    assert_eq!(ids(&letters.body), ["p1"]);

    let (ok, out, err) = cli(&agent, &["dead-letters", "retry", "--all"]);
    assert!(ok, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["ids"], json!(["p1"]));
    // Applied events are no dead letters: a second retry of the route finds none.
    let again = admin(
        &agent,
        Method::POST,
        "/v1/dead-letters/retry",
        Some(json!({"route": "partner"})),
    )
    .await;
    assert_eq!(again.body["requeued"], 0, "{}", again.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_evaluated_with_the_agent_s_engine_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = file_routes(dir.path(), &[("files", "[\"rule.*\"]")], "").replace(
        "adapter = \"pass.jsonata\"",
        "adapter = \"pass.jsonata\"\ntime_limit_ms = 50",
    );
    let agent = Agent::start(dir.path(), &config);
    post_event(&agent, "e1", "rule.updated", "S-1").await;
    let eval = |body: Value| admin(&agent, Method::POST, "/v1/adapters/eval", Some(body));

    let out =
        eval(json!({"script": "{\"who\": $partner, \"n\": n + 1}", "input": {"n": 41}})).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(
        out.body,
        json!({"output": {"who": "test-partner", "n": 42}})
    );
    // A stored event's envelope is the input, as a route's adapter gets it, and comes back with
    // the answer.
    let out = eval(json!({"script": "subject & \"/\" & payload.n", "event": "e1"})).await;
    assert_eq!(out.body["output"], "S-1/1");
    assert_eq!(out.body["input"]["id"], "e1", "{}", out.body);
    assert_eq!(out.body["input"]["payload"], json!({"n": 1}));
    let out = eval(json!({"script": "nothing.here", "input": {}})).await;
    assert_eq!(out.body["undefined"], true);
    assert!(out.body["reason"].as_str().unwrap().contains("nothing"));

    // An error is placed at its line and column, with the agent's own text.
    let out = eval(json!({"script": "{\n  \"total\": payload.count + 1\n}", "input": {"payload": {"count": "3"}}})).await;
    assert_eq!(out.status, StatusCode::OK);
    let error = &out.body["error"];
    assert_eq!(error["code"], "T2001", "{}", out.body);
    assert_eq!(
        (error["line"].clone(), error["column"].clone()),
        (json!(2), json!(26))
    );
    let diagnostic = error["diagnostic"].as_str().unwrap();
    assert!(
        diagnostic.starts_with("script:2:26: error T2001"),
        "{diagnostic}"
    );
    let out = eval(json!({"script": "{\"a\": 1", "input": {}})).await;
    assert!(out.body["error"]["code"].as_str().unwrap().starts_with('S'));
    assert_eq!(out.body["error"]["line"], 1);

    // A runaway script is stopped by the route's time limit.
    let runaway = "($f := function($n) { $n < 0 ? $n : $f($n + 1) }; $f(0))";
    let started = Instant::now();
    let out = eval(json!({"script": runaway, "input": {}, "route": "files"})).await;
    let code = out.body["error"]["code"].as_str().unwrap_or_default();
    assert!(code == "U1001" || code == "U1002", "{}", out.body);
    assert!(started.elapsed() < Duration::from_secs(5));

    let unknown = eval(json!({"script": "1", "event": "nope"})).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let both = eval(json!({"script": "1", "event": "e1", "input": {}})).await;
    assert_eq!(both.status, StatusCode::BAD_REQUEST);
    let huge = eval(json!({"script": "1", "input": "x".repeat(2 * 1024 * 1024)})).await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing was written beside the adapters.
    let files: Vec<_> = std::fs::read_dir(dir.path().join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["pass.jsonata"]);
}

/// Two cases for `pass.jsonata` in `adapters/pass.tests`: one the pass-through script meets,
/// one that expects `payload.n` to be 2.
fn pass_fixtures(dir: &Path) {
    let tests = dir.join("adapters/pass.tests");
    std::fs::create_dir_all(&tests).unwrap();
    let event = json!({"id": "f-1", "version": 1, "type": "rule.updated", "subject": "S-F",
                       "payload": {"n": 1, "name": "<b>x</b>"}});
    let case = |description: &str, n: i64| {
        json!({"description": description, "event": event,
               "expect": {"id": "f-1", "subject": "S-F", "payload": {"n": n, "name": "<b>x</b>"}}})
        .to_string()
    };
    std::fs::write(
        tests.join("a-passes.json"),
        case("the event passes through", 1),
    )
    .unwrap();
    std::fs::write(
        tests.join("b-wants-two.json"),
        case("<i>n</i> must be 2 & more", 2),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_s_fixtures_run_on_the_script_sent_as_the_cli_runs_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = file_routes(dir.path(), &[("files", "[\"rule.*\"]")], "");
    pass_fixtures(dir.path());
    let agent = Agent::start(dir.path(), &config);
    let run = |script: &str| {
        admin(
            &agent,
            Method::POST,
            "/v1/adapters/pass/fixtures/run",
            Some(json!({ "script": script })),
        )
    };

    let out = run(PASS_THROUGH).await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    assert_eq!(
        (out.body["passed"].clone(), out.body["failed"].clone()),
        (json!(1), json!(1))
    );
    let cases = out.body["fixtures"].as_array().unwrap();
    assert_eq!(cases[0]["file"], "a-passes.json");
    assert_eq!(cases[0]["passed"], true);
    assert!(cases[0].get("diff").is_none(), "{}", cases[0]);
    assert_eq!(cases[1]["file"], "b-wants-two.json");
    assert_eq!(cases[1]["passed"], false);
    assert_eq!(cases[1]["output"]["payload"]["n"], 1);
    let diff = cases[1]["diff"].as_str().unwrap();
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| l.starts_with("- ") || l.starts_with("+ "))
        .collect();
    assert_eq!(changed, ["-     \"n\": 2,", "+     \"n\": 1,"], "{diff}");

    // The script sent is what runs, not the file: a script that adds a member fails both cases,
    // and the diff names the member.
    let edited = r#"{"id": id, "subject": subject, "payload": payload, "extra": true}"#;
    let out = run(edited).await;
    assert_eq!(out.body["failed"], 2, "{}", out.body);
    let diff = out.body["fixtures"][0]["diff"].as_str().unwrap();
    assert!(
        diff.lines()
            .any(|l| l.starts_with("+ ") && l.contains("\"extra\": true")),
        "{diff}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("adapters/pass.jsonata")).unwrap(),
        PASS_THROUGH
    );

    // The same cases through `ess-agent adapter test`, on a copy of the edited script: the
    // same verdicts and the same diff.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(copy.join("pass.tests")).unwrap();
    std::fs::write(copy.join("pass.jsonata"), PASS_THROUGH).unwrap();
    for case in ["a-passes.json", "b-wants-two.json"] {
        std::fs::copy(
            dir.path().join("adapters/pass.tests").join(case),
            copy.join("pass.tests").join(case),
        )
        .unwrap();
    }
    let cli_run = std::process::Command::new(support::binary())
        .args(["adapter", "test", "--adapters-dir"])
        .arg(&copy)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli_run.stdout);
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
    let out = run(PASS_THROUGH).await;
    for line in out.body["fixtures"][1]["diff"].as_str().unwrap().lines() {
        assert!(
            stdout.contains(&format!("    {line}")),
            "{line:?} not in\n{stdout}"
        );
    }

    // A script that does not compile fails every case with its place.
    let out = run("{\"a\": ").await;
    assert_eq!(out.body["failed"], 2);
    let failure = out.body["fixtures"][0]["failure"].as_str().unwrap();
    assert!(failure.contains("does not compile"), "{failure}");
    assert!(failure.contains("pass.jsonata:1:"), "{failure}");

    let unknown = admin(
        &agent,
        Method::POST,
        "/v1/adapters/nope/fixtures/run",
        Some(json!({"script": "1"})),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let detail = unknown.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("\"nope\"") && detail.contains("pass"),
        "{detail}"
    );
    let bad = admin(
        &agent,
        Method::POST,
        "/v1/adapters/pass/fixtures/run",
        Some(json!({"script": "1", "input": {}})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // Nothing was written beside the adapters.
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("adapters/pass.tests"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(files, ["a-passes.json", "b-wants-two.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_pointed_at_the_loopback_listener_cannot_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &file_routes(dir.path(), &[("files", "[\"rule.*\"]")], ""),
    );
    post_event(&agent, "h1", "Policy", "P").await;
    wait_state(&agent, "h1", "parked").await;
    let port = agent.admin.port();
    let get = |path: &'static str, host: String| {
        let agent = &agent;
        async move { admin_with(agent, Method::GET, path, &[("host", host)], None).await }
    };
    for path in ["/v1/events", "/v1/events/h1", "/console/events"] {
        let reply = get(path, format!("rebound.example:{port}")).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(reply.body["code"], "host_not_allowed", "{path}");
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            assert_eq!(get(path, host).await.status, StatusCode::OK, "{path}");
        }
    }
    // Probes and metrics answer whatever the host.
    assert_eq!(
        get("/healthz", format!("rebound.example:{port}"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_post_is_refused_and_a_same_origin_or_cli_post_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &file_routes(dir.path(), &[("files", "[\"rule.*\"]")], ""),
    );
    let agent = &agent;
    post_event(agent, "p1", "Policy", "P").await;
    wait_state(agent, "p1", "parked").await;
    let own = agent.admin_url("");
    let port = own.rsplit(':').next().unwrap().to_owned();
    let retry = |headers: Vec<(&'static str, String)>| async move {
        admin_with(
            agent,
            Method::POST,
            "/v1/dead-letters/p1/retry",
            &headers,
            None,
        )
        .await
    };
    for headers in [
        vec![("origin", "http://evil.example".to_owned())],
        vec![("origin", "null".to_owned())],
        // A name pointed at 127.0.0.1 is not the listener's origin.
        vec![("origin", format!("http://rebound.example:{port}"))],
        vec![("sec-fetch-site", "cross-site".to_owned())],
        vec![
            ("sec-fetch-site", "same-site".to_owned()),
            ("origin", own.clone()),
        ],
    ] {
        let reply = retry(headers.clone()).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(reply.body["code"], "cross_site_request");
    }
    // Nothing was requeued by those.
    assert_eq!(
        admin(agent, Method::GET, "/v1/events/p1", None).await.body["state"],
        "parked"
    );
    let reply = retry(vec![
        ("origin", own.clone()),
        ("sec-fetch-site", "same-origin".to_owned()),
    ])
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    wait_state(agent, "p1", "parked").await;
    let reply = retry(vec![("origin", format!("http://localhost:{port}"))]).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    wait_state(agent, "p1", "parked").await;
    let (ok, out, err) = cli(agent, &["dead-letters", "retry", "p1"]);
    assert!(ok, "{out}{err}");
    // Reading is not a state change: a cross-site GET is answered (the token guards it).
    let read = admin_with(
        agent,
        Method::GET,
        "/v1/events",
        &[("origin", "http://evil.example".to_owned())],
        None,
    )
    .await;
    assert_eq!(read.status, StatusCode::OK);
}

/// Checks JSON values against the subset of JSON Schema that docs/openapi.json uses; anything
/// else in a schema fails the check, so the description cannot outgrow what is checked.
fn schema_errors(doc: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    const KNOWN: &[&str] = &[
        "$ref",
        "oneOf",
        "type",
        "enum",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "description",
        "minimum",
        "maximum",
        "default",
    ];
    let Some(object) = schema.as_object() else {
        return vec![format!("{at}: the schema {schema} is not an object")];
    };
    let mut errors: Vec<String> = object
        .keys()
        .filter(|k| !KNOWN.contains(&k.as_str()))
        .map(|k| format!("{at}: the checker does not know the keyword {k:?}"))
        .collect();
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return vec![format!("{at}: no schema {reference}")];
        }
        return schema_errors(doc, target, value, at);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let fits = options
            .iter()
            .filter(|o| schema_errors(doc, o, value, at).is_empty())
            .count();
        if fits != 1 {
            errors.push(format!(
                "{at}: {value} fits {fits} of the oneOf options, not one"
            ));
        }
    }
    if let Some(types) = match &schema["type"] {
        Value::String(t) => Some(vec![t.as_str()]),
        Value::Array(list) => Some(list.iter().filter_map(Value::as_str).collect()),
        _ => None,
    } {
        let fits = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        });
        if !fits {
            errors.push(format!("{at}: {value} is not of type {types:?}"));
            return errors;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(fields) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            if !fields.contains_key(name.as_str().unwrap_or_default()) {
                errors.push(format!("{at}: {name} is required but missing"));
            }
        }
        for (name, field) in fields {
            let path = format!("{at}.{name}");
            match (&schema["properties"][name], &schema["additionalProperties"]) {
                (Value::Object(_), _) => errors.extend(schema_errors(
                    doc,
                    &schema["properties"][name],
                    field,
                    &path,
                )),
                (_, Value::Bool(false)) => errors.push(format!("{path} is not in the description")),
                (_, extra @ Value::Object(_)) => {
                    errors.extend(schema_errors(doc, extra, field, &path))
                }
                _ => {}
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            errors.extend(schema_errors(doc, schema, item, &format!("{at}[{i}]")));
        }
    }
    errors
}

/// The description, and the operations whose answers were checked against it.
struct Described {
    doc: Value,
    checked: BTreeSet<String>,
}

impl Described {
    /// Sends a request and checks the answer: its status must be described for the operation,
    /// with the content type and a body that fits the schema.
    async fn call(
        &mut self,
        agent: &Agent,
        method: Method,
        template: &str,
        path: &str,
        body: Option<Value>,
    ) -> Reply {
        let reply = admin(agent, method.clone(), path, body).await;
        let operation = &self.doc["paths"][template][method.as_str().to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not described"
        );
        let status = reply.status.as_u16().to_string();
        let answer = &operation["responses"][&status];
        assert!(
            answer.is_object(),
            "{method} {path} answered {status}, which the description does not list: {}",
            reply.body
        );
        let content_type = reply.headers["content-type"].to_str().unwrap();
        let media = content_type.split(';').next().unwrap().trim();
        let schema = &answer["content"][media]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} answered {status} as {content_type}, which is not described"
        );
        let errors = schema_errors(&self.doc, schema, &reply.body, "body");
        assert!(
            errors.is_empty(),
            "{method} {path} answered {status} against the description:\n{}\nbody: {}",
            errors.join("\n"),
            reply.body
        );
        self.checked
            .insert(format!("{} {template}", method.as_str().to_lowercase()));
        reply
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_as_the_openapi_description_says() {
    let dir = tempfile::tempdir().unwrap();
    pass_fixtures(dir.path());
    let agent = Agent::start(
        dir.path(),
        &file_routes(dir.path(), &[("files", "[\"rule.*\"]")], ""),
    );
    post_event(&agent, "e1", "rule.updated", "S").await;
    post_event(&agent, "p1", "Policy", "P").await;
    post_event(&agent, "p2", "Policy", "P").await;
    wait_state(&agent, "e1", "applied").await;
    wait_state(&agent, "p1", "parked").await;
    wait_state(&agent, "p2", "parked").await;
    let committed: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let mut d = Described {
        doc: committed.clone(),
        checked: BTreeSet::new(),
    };
    use Method as M;
    d.call(&agent, M::GET, "/healthz", "/healthz", None).await;
    d.call(&agent, M::GET, "/readyz", "/readyz", None).await;
    d.call(&agent, M::GET, "/metrics", "/metrics", None).await;
    let served = d
        .call(&agent, M::GET, "/v1/openapi.json", "/v1/openapi.json", None)
        .await;
    assert_eq!(
        served.body, committed,
        "the served description is the committed file"
    );

    d.call(&agent, M::GET, "/v1/events", "/v1/events?limit=2", None)
        .await;
    d.call(&agent, M::GET, "/v1/events", "/v1/events?limit=0", None)
        .await;
    let detail = d
        .call(&agent, M::GET, "/v1/events/{id}", "/v1/events/e1", None)
        .await;
    assert_eq!(detail.body["envelope"]["id"], "e1");
    assert!(detail.body["raw_body"].as_str().unwrap().contains("\"e1\""));
    assert_eq!(detail.body["deliveries"][0]["route"], "files");
    // The history, the output and the receipt were there to be checked.
    assert_eq!(
        detail.body["deliveries"][0]["history"][0]["outcome"],
        "applied"
    );
    assert!(detail.body["deliveries"][0]["output"]["value"].is_object());
    assert!(detail.body["receipt"]["webhook"].is_object());
    d.call(&agent, M::GET, "/v1/events/{id}", "/v1/events/nope", None)
        .await;

    let replay = "/v1/events/{id}/replay";
    d.call(&agent, M::POST, replay, "/v1/events/e1/replay", None)
        .await;
    d.call(
        &agent,
        M::POST,
        replay,
        "/v1/events/e1/replay",
        Some(json!({"route": "nope"})),
    )
    .await;
    d.call(
        &agent,
        M::POST,
        replay,
        "/v1/events/e1/replay?force=true",
        Some(json!({"route": "files"})),
    )
    .await;
    wait_state(&agent, "e1", "applied").await;

    d.call(&agent, M::GET, "/v1/dead-letters", "/v1/dead-letters", None)
        .await;
    d.call(
        &agent,
        M::POST,
        "/v1/dead-letters/{id}/retry",
        "/v1/dead-letters/p1/retry",
        None,
    )
    .await;
    wait_state(&agent, "p1", "parked").await;
    d.call(
        &agent,
        M::POST,
        "/v1/dead-letters/retry",
        "/v1/dead-letters/retry",
        Some(json!({})),
    )
    .await;
    d.call(
        &agent,
        M::POST,
        "/v1/dead-letters/retry",
        "/v1/dead-letters/retry",
        Some(json!({"type": "Pol*"})),
    )
    .await;
    wait_state(&agent, "p1", "parked").await;
    wait_state(&agent, "p2", "parked").await;
    d.call(
        &agent,
        M::DELETE,
        "/v1/dead-letters/{id}",
        "/v1/dead-letters/p2",
        None,
    )
    .await;
    d.call(
        &agent,
        M::DELETE,
        "/v1/dead-letters/{id}",
        "/v1/dead-letters/e1",
        None,
    )
    .await;

    d.call(&agent, M::GET, "/v1/adapters", "/v1/adapters", None)
        .await;
    let eval = "/v1/adapters/eval";
    for body in [
        json!({"script": "payload", "event": "e1"}),
        json!({"script": "nothing", "input": {}}),
        json!({"script": "1 +", "input": {}}),
        json!({"script": "1", "unknown": true}),
    ] {
        d.call(&agent, M::POST, eval, eval, Some(body)).await;
    }
    let fixtures = "/v1/adapters/{name}/fixtures/run";
    for (path, body) in [
        (
            "/v1/adapters/pass/fixtures/run",
            json!({"script": PASS_THROUGH}),
        ),
        (
            "/v1/adapters/pass/fixtures/run",
            json!({"script": "payload"}),
        ),
        ("/v1/adapters/pass/fixtures/run", json!({"script": "1 +"})),
        ("/v1/adapters/pass/fixtures/run", json!({"script": 1})),
        ("/v1/adapters/nope/fixtures/run", json!({"script": "1"})),
    ] {
        d.call(&agent, M::POST, fixtures, path, Some(body)).await;
    }

    let mut described = BTreeSet::new();
    for (path, item) in committed["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            described.insert(format!("{method} {path}"));
        }
    }
    assert_eq!(
        d.checked, described,
        "every described operation is exercised"
    );

    // The checker itself fails on a body the description does not allow.
    let event = json!({"$ref": "#/components/schemas/EventSummary"});
    let mut extra = detail.body.clone();
    extra["secret"] = json!("x");
    assert!(!schema_errors(&committed, &event, &extra, "body").is_empty());
}
