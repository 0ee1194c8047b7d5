//! The operator console in a real headless Chromium, against the real binary.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::browser::{Browser, screenshot_dir};
use crate::support::{Agent, admin_get, plain, request, signed_headers, unix_now};

/// Two routes: `good` to a file sink that works, `blocked` to one whose directory is a regular
/// file (every write fails with "not a directory" until it is replaced by a directory).
fn start(dir: &Path, top: &str) -> Agent {
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    std::fs::write(dir.join("adapters/p.jsonata"), "payload").unwrap();
    std::fs::write(dir.join("blocked"), "a file where a directory should be").unwrap();
    let extra = format!(
        "adapters_dir = {:?}\n\
         [[routes]]\nname = \"good\"\nadapter = \"p.jsonata\"\nsink = \"files\"\n\
         [[routes]]\nname = \"blocked\"\nadapter = \"p.jsonata\"\nsink = \"stuck\"\n\
         [sinks.files]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n\
         [sinks.stuck]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n\
         [dispatch]\nhealthcheck_interval_ms = 100\n{top}\n",
        dir.join("adapters").display().to_string(),
        dir.join("out").display().to_string(),
        dir.join("blocked").display().to_string(),
    );
    Agent::start(dir, &extra)
}

/// Posts a signed event with this body and expects the hub's 2xx.
async fn post(agent: &Agent, id: &str, event_type: &str, subject: &str, payload: Value) {
    let body = serde_json::to_vec(&json!({
        "id": id, "version": 1, "type": event_type, "subject": subject, "payload": payload
    }))
    .unwrap();
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &signed_headers(id, unix_now(), &body),
        body,
    )
    .await
    .unwrap();
    assert!(reply.status.is_success(), "{id}: {reply:?}");
}

/// Waits until event `id` is in `state` (through the JSON API).
async fn wait_state(agent: &Agent, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = admin_get(agent, &format!("/v1/events/{id}")).await;
        if reply.body["state"] == state {
            return reply.body;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} did not become {state}: {:?}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Screenshots go to docs/console/ only when asked (ESS_CONSOLE_SCREENSHOTS=1), so that a test
/// run leaves the work tree as it was.
async fn maybe_screenshot(browser: &Browser, name: &str) {
    if std::env::var_os("ESS_CONSOLE_SCREENSHOTS").is_some() {
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        browser.screenshot(&dir.join(format!("{name}.png"))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_queues_sinks_and_the_chart_under_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "");
    post(&agent, "ov-1", "rule.updated", "S1", json!({"n": 1})).await;
    wait_state(&agent, "ov-1", "failed").await;

    // Every console answer, asset and error included, carries the headers.
    for path in [
        "/console",
        "/console/assets/console.css",
        "/console/events/nope",
    ] {
        let reply = admin_get(&agent, path).await;
        let h = |name: &str| {
            reply
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            h("content-security-policy").as_deref(),
            Some(ess_agent::admin::console::CSP),
            "{path}"
        );
        assert_eq!(
            h("x-content-type-options").as_deref(),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(
            h("referrer-policy").as_deref(),
            Some("no-referrer"),
            "{path}"
        );
    }

    let head = request(
        &plain(),
        Method::HEAD,
        &agent.admin_url("/console/events"),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(head.status, StatusCode::OK);

    let browser = Browser::start().await;
    browser.goto(&agent.admin_url("/console")).await;
    assert_eq!(browser.text_of("h1").await, "Overview");
    assert_eq!(browser.text_of("#dead-letters").await, "1");
    assert_eq!(browser.text_of("#backlog").await, "0");
    let sinks = browser.text_of("#sinks").await;
    let stuck = sinks
        .lines()
        .find(|l| l.starts_with("stuck"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        stuck.contains("failing") && stuck.contains("not a directory"),
        "{sinks}"
    );
    let files = sinks
        .lines()
        .find(|l| l.starts_with("files"))
        .unwrap_or_default()
        .to_owned();
    assert!(files.contains("healthy"), "{sinks}");
    assert!(browser.text_of(".legend").await.contains("received 1"));
    let polylines = browser.find_all("#chart polyline").await;
    assert_eq!(polylines.len(), 3, "one line per series");
    let config = browser.text_of(".facts code").await;
    assert!(config.ends_with("ess-agent.toml"), "{config}");
    // The stylesheet applied: no policy violation kept it out.
    let colour = browser
        .execute(
            "return getComputedStyle(document.querySelector('header')).backgroundColor",
            json!([]),
        )
        .await;
    assert_eq!(colour, "rgb(34, 49, 63)");
    maybe_screenshot(&browser, "overview").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_open_replay_to_one_route_and_bulk_retry_after_fixing_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "");
    for id in ["ev-1", "ev-2", "ev-3"] {
        post(&agent, id, "rule.updated", id, json!({"n": id})).await;
    }
    for id in ["ev-1", "ev-2", "ev-3"] {
        wait_state(&agent, id, "failed").await;
    }
    let browser = Browser::start().await;
    browser.goto(&agent.admin_url("/console/events")).await;
    assert_eq!(browser.find_all("#events tbody tr[data-id]").await.len(), 3);
    browser.select("#f-state", "applied").await;
    browser.click(&browser.find("#f-apply").await).await;
    browser
        .wait_for("the filter to apply", || async {
            browser.url().await.contains("state=applied").then_some(())
        })
        .await;
    assert!(
        browser
            .find_all("#events tbody tr[data-id]")
            .await
            .is_empty()
    );
    browser.select("#f-state", "failed").await;
    browser.click(&browser.find("#f-apply").await).await;
    browser
        .wait_for("three failed events", || async {
            (browser.find_all("#events tbody tr[data-id]").await.len() == 3).then_some(())
        })
        .await;
    maybe_screenshot(&browser, "events").await;

    // Open ev-2: both routes are listed, good applied and blocked failed.
    let link = browser.find("tr[data-id=\"ev-2\"] a.event-link").await;
    browser.click(&link).await;
    assert_eq!(browser.text_of("#event-id").await, "ev-2");
    let good = browser.text_of("#deliveries tr[data-route=\"good\"]").await;
    assert!(good.contains("applied"), "{good}");
    let good_changed = browser
        .text_of("#deliveries tr[data-route=\"good\"] .updated")
        .await;
    let blocked = browser
        .text_of("#deliveries tr[data-route=\"blocked\"]")
        .await;
    assert!(
        blocked.contains("failed") && blocked.contains("not a directory"),
        "{blocked}"
    );

    // Replay through route good only: it was applied there, so the confirmation asks for force.
    browser.select("#replay-route", "good").await;
    browser.click(&browser.find("#replay").await).await;
    assert!(
        browser
            .text_of("#question")
            .await
            .contains("through route good only")
    );
    browser.click(&browser.find("#force").await).await;
    browser.click(&browser.find("#confirm").await).await;
    let result = browser.text_of("#result").await;
    assert!(result.contains("requeued through route good"), "{result}");
    let out = dir.path().join("out/ev-2.json");
    browser.click(&browser.find("#back").await).await;
    let second = ".route-history[data-route=\"good\"] tr.attempt[data-attempt=\"2\"]";
    browser
        .wait_for("a new attempt through route good", || async {
            browser.goto(&browser.url().await).await;
            let changed = browser
                .text_of("#deliveries tr[data-route=\"good\"] .updated")
                .await;
            let state = browser.text_of("#deliveries tr[data-route=\"good\"]").await;
            let listed = !browser.find_all(second).await.is_empty();
            (changed != good_changed && state.contains("applied") && listed).then_some(())
        })
        .await;
    assert!(out.exists());
    // The route's history lists the first attempt and the replay's, each with its time.
    let good_attempts = browser
        .find_all(".route-history[data-route=\"good\"] tr.attempt")
        .await;
    assert_eq!(good_attempts.len(), 2);
    let started = browser.text_of(&format!("{second} .started")).await;
    assert!(
        started.len() == 24 && started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "{started:?}"
    );
    let outcome = browser.text_of(second).await;
    assert!(outcome.contains("applied"), "{outcome}");
    let output = browser
        .text_of(".route-history[data-route=\"good\"] pre.output")
        .await;
    assert!(output.contains("\"n\": \"ev-2\""), "{output}");
    // The picture shows the receipt and the routes' attempts.
    browser
        .execute(
            "document.querySelector('#receipt-methods').scrollIntoView()",
            json!([]),
        )
        .await;
    maybe_screenshot(&browser, "event").await;
    // The other route was not tried again.
    let blocked_after = browser
        .text_of("#deliveries tr[data-route=\"blocked\"]")
        .await;
    assert!(blocked_after.contains("failed"), "{blocked_after}");

    // Fix the sink, then retry the dead letters of route blocked in bulk.
    std::fs::remove_file(dir.path().join("blocked")).unwrap();
    std::fs::create_dir(dir.path().join("blocked")).unwrap();
    browser
        .goto(&agent.admin_url("/console/events?state=failed&route=blocked"))
        .await;
    browser.click(&browser.find("#bulk-retry").await).await;
    assert!(browser.text_of("#question").await.contains("route blocked"));
    browser.click(&browser.find("#confirm").await).await;
    let result = browser.text_of("#result").await;
    assert!(result.starts_with("3 dead letter(s) requeued"), "{result}");
    for id in ["ev-1", "ev-2", "ev-3"] {
        wait_state(&agent, id, "applied").await;
        assert!(dir.path().join(format!("blocked/{id}.json")).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_events_page_shows_its_message_id_and_time_and_never_the_secret_or_signature() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "");
    let body = serde_json::to_vec(&json!({
        "id": "sig-1", "version": 1, "type": "rule.updated", "subject": "s", "payload": {"n": 1}
    }))
    .unwrap();
    let signed_at = unix_now();
    // A message id with markup in it: shown as text.
    let headers = signed_headers("msg_<b>1</b>", signed_at, &body);
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
    .unwrap();
    assert!(reply.status.is_success(), "{reply:?}");
    // Route good applies it; route blocked fails it.
    wait_state(&agent, "sig-1", "failed").await;
    let page = admin_get(&agent, "/console/events/sig-1").await;
    assert_eq!(page.status, StatusCode::OK);
    let html = page.body.as_str().unwrap();
    assert!(
        html.contains("<code id=\"webhook-id\">msg_&lt;b&gt;1&lt;/b&gt;</code>"),
        "{html}"
    );
    assert!(
        html.contains(&format!(
            "<span id=\"webhook-timestamp\">{signed_at}</span>"
        )),
        "{html}"
    );
    assert!(
        html.contains("<span id=\"signature-versions\">v1</span>, verified by v1"),
        "{html}"
    );
    assert!(
        html.contains("<span id=\"receipt-methods\">Standard Webhooks signature</span>"),
        "{html}"
    );
    // The applied output, pretty-printed and escaped.
    assert!(
        html.contains("<pre class=\"output\">{\n  &quot;n&quot;: 1\n}</pre>"),
        "{html}"
    );
    let signature = headers
        .iter()
        .find(|(k, _)| *k == "webhook-signature")
        .map(|(_, v)| v.split_once(',').unwrap().1.to_owned())
        .unwrap();
    assert!(!html.contains(&signature), "the signature is on the page");
    let key = crate::support::SECRET.trim_start_matches("whsec_");
    assert!(!html.contains(key), "the secret is on the page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_shows_output_as_typed_and_marks_an_error_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "");
    post(
        &agent,
        "pg-1",
        "rule.updated",
        "S-PG",
        json!({"deadline": 30}),
    )
    .await;
    let browser = Browser::start().await;
    browser
        .goto(&agent.admin_url("/console/playground?event=pg-1"))
        .await;
    let script = browser.find("#script").await;
    browser.clear(&script).await;
    browser
        .send_keys(
            &script,
            "{\n  \"days\": payload.deadline,\n  \"who\": subject\n}",
        )
        .await;
    browser
        .wait_for("the output of the typed script", || async {
            let out = browser.text_of("#output").await;
            serde_json::from_str::<Value>(&out)
                .ok()
                .filter(|v| *v == json!({"days": 30, "who": "S-PG"}))
        })
        .await;
    // The download link carries the edited script.
    let href = browser
        .attribute(&browser.find("#download-script").await, "href")
        .await
        .unwrap_or_default();
    assert!(href.starts_with("blob:"), "{href}");

    browser.clear(&script).await;
    browser
        .send_keys(&script, "{\n  \"a\": 1,\n  \"b\": payload.(\n}")
        .await;
    let place = browser
        .wait_for("the error to be marked", || async {
            let where_ = browser.find_all("#error-where").await;
            let e = where_.first()?;
            let line = browser.attribute(e, "data-line").await?;
            (!line.is_empty()).then_some((line, browser.text(e).await))
        })
        .await;
    let marked = browser
        .attribute(&browser.find("#lines li.error").await, "data-line")
        .await
        .unwrap();
    assert_eq!(marked, place.0, "{}", place.1);
    assert!(
        ["3", "4"].contains(&marked.as_str()),
        "marked line {marked}: {}",
        place.1
    );
    assert!(!browser.text_of("#diagnostic").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_runs_the_adapter_s_fixtures_on_the_edited_script_with_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let tests = dir.path().join("adapters/p.tests");
    std::fs::create_dir_all(&tests).unwrap();
    let case = |description: &str, payload: Value| {
        json!({"description": description,
               "event": {"id": "fx", "version": 1, "type": "rule.updated", "subject": "S",
                         "payload": payload},
               "expect": payload})
        .to_string()
    };
    let markup = "<script>alert(1)</script>";
    std::fs::write(
        tests.join("a-deadline.json"),
        case(
            "the deadline is kept",
            json!({"deadline": 30, "note": markup}),
        ),
    )
    .unwrap();
    std::fs::write(
        tests.join("b-other.json"),
        case(
            "<img src=x onerror=alert(1)> is shown as text",
            json!({"deadline": 5}),
        ),
    )
    .unwrap();
    let agent = start(dir.path(), "");
    post(
        &agent,
        "pg-2",
        "rule.updated",
        "S-PG",
        json!({"deadline": 7}),
    )
    .await;
    let browser = Browser::start().await;
    browser
        .goto(&agent.admin_url("/console/playground?adapter=p&event=pg-2"))
        .await;
    // The adapter's script in force is in the editor, and both its cases pass.
    let script = browser.find("#script").await;
    let text = browser
        .execute("return document.getElementById('script').value", json!([]))
        .await;
    assert_eq!(text, "payload");
    browser
        .wait_for("the fixtures to pass", || async {
            let status = browser.text_of("#fixtures-status").await;
            status.starts_with("2 passed, 0 failed").then_some(())
        })
        .await;

    // An edit that changes one case's output fails that case, with the diff.
    browser.clear(&script).await;
    browser
        .send_keys(
            &script,
            "payload.deadline = 30\n  ? {\"deadline\": 31, \"note\": payload.note}\n  : payload",
        )
        .await;
    browser
        .wait_for("one fixture to fail", || async {
            let status = browser.text_of("#fixtures-status").await;
            status.starts_with("1 passed, 1 failed").then_some(())
        })
        .await;
    let failed = browser.find("#fixtures li.fail").await;
    assert_eq!(
        browser.attribute(&failed, "data-file").await.as_deref(),
        Some("a-deadline.json")
    );
    let diff = browser.text_of("#fixtures li.fail pre.diff").await;
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| l.starts_with("- ") || l.starts_with("+ "))
        .collect();
    assert_eq!(
        changed,
        ["-   \"deadline\": 30,", "+   \"deadline\": 31,"],
        "{diff}"
    );
    assert_eq!(
        browser.text_of("#fixtures li.fail pre.diff span.del").await,
        "-   \"deadline\": 30,"
    );
    // Fixture text is text: the markup in a case shows as written and makes no element.
    assert!(diff.contains(markup), "{diff}");
    let passed = browser.text_of("#fixtures li.pass").await;
    assert!(
        passed.contains("<img src=x onerror=alert(1)> is shown as text"),
        "{passed}"
    );
    let elements = browser
        .execute(
            "return document.querySelectorAll('#fixtures img, #fixtures script').length",
            json!([]),
        )
        .await;
    assert_eq!(elements, 0);

    // The fixture offered for download (and shown) is a case in the adapter's format: the
    // chosen event and the output the edited script gives it.
    let output = browser
        .wait_for("the output of the stored event", || async {
            let out = browser.text_of("#output").await;
            serde_json::from_str::<Value>(&out)
                .ok()
                .filter(|v| *v == json!({"deadline": 7}))
        })
        .await;
    let href = browser
        .attribute(&browser.find("#download-fixture").await, "href")
        .await
        .unwrap_or_default();
    assert!(href.starts_with("blob:"), "{href}");
    let text = browser
        .execute(
            "return document.getElementById('fixture').textContent",
            json!([]),
        )
        .await;
    let fixture = ess_agent::adapter::fixtures::Fixture::parse(
        Path::new("fixture.json"),
        text.as_str().unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(
        fixture.expectation,
        ess_agent::adapter::fixtures::Expectation::Value(output)
    );
    assert_eq!(fixture.input["id"], "pg-2");
    assert_eq!(fixture.input["payload"], json!({"deadline": 7}));
    maybe_screenshot(&browser, "playground").await;
    // Nothing was written to the adapters directory.
    let mut files: Vec<_> = std::fs::read_dir(&tests)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(files, ["a-deadline.json", "b-other.json"]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("adapters/p.jsonata")).unwrap(),
        "payload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_post_and_a_post_without_the_csrf_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "");
    post(&agent, "cs-1", "rule.updated", "S1", json!({})).await;
    wait_state(&agent, "cs-1", "failed").await;
    // A page on another origin whose form posts a replay to the console, as an attacker's
    // page would.
    let evil = dir.path().join("evil.html");
    std::fs::write(
        &evil,
        format!(
            "<!DOCTYPE html><form id=f method=post action=\"{}\">\
             <input name=route value=good><input name=force value=on></form>",
            agent.admin_url("/console/events/cs-1/replay")
        ),
    )
    .unwrap();
    let browser = Browser::start().await;
    browser.goto(&format!("file://{}", evil.display())).await;
    browser
        .execute("document.getElementById('f').submit()", json!([]))
        .await;
    let text = browser
        .wait_for("the agent's refusal", || async {
            let text = browser.body_text().await;
            text.contains("cross_site_request").then_some(text)
        })
        .await;
    assert!(text.contains("only from its own pages"), "{text}");
    // Without a browser's Origin (the CLI's way), the form still needs the CSRF token.
    let reply = request(
        &plain(),
        Method::POST,
        &agent.admin_url("/console/events/cs-1/replay"),
        &[("content-type", "application/x-www-form-urlencoded".into())],
        Bytes::from_static(b"route=good&force=on"),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply
            .body
            .as_str()
            .unwrap_or_default()
            .contains("CSRF token")
    );
    let event = wait_state(&agent, "cs-1", "failed").await;
    let good = event["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["route"] == "good")
        .unwrap()
        .clone();
    assert_eq!(good["attempts"], 1, "nothing was replayed: {event}");

    // From the console's own page the same kind of action goes through: drop the dead letter.
    browser.goto(&agent.admin_url("/console/events/cs-1")).await;
    browser.click(&browser.find("#drop").await).await;
    browser.click(&browser.find("#confirm").await).await;
    let result = browser.text_of("#result").await;
    assert_eq!(result, "Dead letter cs-1 was dropped.");
    wait_state(&agent, "cs-1", "dropped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_in_an_events_payload_type_or_subject_is_shown_as_text_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "");
    let attack = "<script>window.pwned=1;alert(1)</script><img src=x onerror=\"window.pwned=2\">";
    post(
        &agent,
        "xss-1",
        &format!("rule.{attack}"),
        &format!("S{attack}"),
        json!({"html": attack}),
    )
    .await;
    wait_state(&agent, "xss-1", "failed").await;
    let browser = Browser::start().await;
    for path in [
        "/console/events",
        "/console/events/xss-1",
        "/console/events?subject=S%3Cscript%3E",
    ] {
        browser.goto(&agent.admin_url(path)).await;
        browser.find("h1").await;
        assert_eq!(browser.open_dialog().await, None, "{path}: a dialog opened");
        let flag = browser
            .execute("return window.pwned === undefined", json!([]))
            .await;
        assert_eq!(flag, true, "{path}: the payload ran");
        assert!(
            browser.find_all("main script, main img").await.is_empty(),
            "{path}: the payload became markup"
        );
    }
    browser
        .goto(&agent.admin_url("/console/events/xss-1"))
        .await;
    assert_eq!(
        browser.text_of("#event-subject").await,
        format!("S{attack}")
    );
    assert_eq!(
        browser.text_of("#event-type").await,
        format!("rule.{attack}")
    );
    // The raw body is the JSON text the hub sent: the markup is there as characters.
    let raw = browser.text_of("#raw-body").await;
    assert!(
        raw.contains("<script>window.pwned=1;alert(1)</script>"),
        "{raw}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_the_console_asks_for_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = "console-test-token-0123456789";
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, token).unwrap();
    let agent = start(
        dir.path(),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = {{ file = {:?} }}",
            token_file.display().to_string()
        ),
    );
    let browser = Browser::start().await;
    browser.goto(&agent.admin_url("/console/events")).await;
    assert!(browser.url().await.ends_with("/console/login"));
    let field = browser.find("#token").await;
    browser.send_keys(&field, "wrong-token").await;
    browser
        .click(&browser.find("button[type=submit]").await)
        .await;
    assert!(
        browser
            .text_of("#problem")
            .await
            .contains("not the admin token")
    );
    let field = browser.find("#token").await;
    browser.send_keys(&field, token).await;
    browser
        .click(&browser.find("button[type=submit]").await)
        .await;
    assert_eq!(browser.text_of("h1").await, "Overview");
    browser.goto(&agent.admin_url("/console/events")).await;
    assert_eq!(browser.text_of("h1").await, "Events");
    // Without the cookie the pages stay closed.
    let reply = admin_get(&agent, "/console/events").await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
}
