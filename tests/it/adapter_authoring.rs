//! Writing adapters: `adapter test` on the shipped fixtures and on a wrong expectation, the
//! exact text a partner reads for typical mistakes, `adapter eval --watch`, the message of a
//! dead letter, and the cookbook of docs/adapters.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A time limit for `adapter test` on a debug build and a busy machine: what is checked here is
/// what the scripts produce, not how fast.
const TIME_LIMIT_MS: &str = "5000";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `ess-agent ARGS` in `dir`.
fn ess_agent(dir: &Path, args: &[&str]) -> Run {
    ess_agent_with(dir, args, &[])
}

fn ess_agent_with(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut command = Command::new(support::binary());
    command
        .args(args)
        .current_dir(dir)
        .env_remove("ESS_AGENT_CONFIG");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("run ess-agent");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The number of case files under `dir`'s `*.tests` directories.
fn case_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir() && path.to_string_lossy().ends_with(".tests"))
        .flat_map(|tests| std::fs::read_dir(tests).unwrap())
        .filter(|entry| {
            let path = entry.as_ref().unwrap().path();
            path.is_file() && path.extension().is_some_and(|ext| ext == "json")
        })
        .count()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn adapter_test_passes_on_the_shipped_adapters() {
    let adapters = Path::new(REPO).join("adapters");
    let run = ess_agent(
        Path::new(REPO),
        &[
            "adapter",
            "test",
            "--adapters-dir",
            "adapters",
            "--time-limit-ms",
            TIME_LIMIT_MS,
        ],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let cases = case_count(&adapters);
    assert!(cases > 0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), cases + 1, "{}", run.stdout);
    for line in &lines[..cases] {
        assert!(line.starts_with("PASS adapters/"), "{line}");
    }
    assert_eq!(lines[cases], format!("{cases} passed, 0 failed"));
}

#[test]
fn adapter_test_reads_the_adapters_dir_of_a_configuration_and_selects_by_name() {
    let repo = Path::new(REPO);
    let config = repo.join("config/ess-agent.toml");
    let run = ess_agent_with(
        repo,
        &[
            "adapter",
            "test",
            "court-calendar-v3-bridge",
            "--time-limit-ms",
            TIME_LIMIT_MS,
        ],
        &[("ESS_AGENT_CONFIG", &config)],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let cases = std::fs::read_dir(repo.join("adapters/court-calendar-v3-bridge.tests"))
        .unwrap()
        .count();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), cases + 1, "{}", run.stdout);
    for line in &lines[..cases] {
        // `config/../adapters` is shown as `adapters`.
        assert!(
            line.starts_with(&format!(
                "PASS {}/adapters/court-calendar-v3-bridge.tests/",
                repo.display()
            )),
            "{line}"
        );
    }
    assert_eq!(lines[cases], format!("{cases} passed, 0 failed"));

    let run = ess_agent(
        repo,
        &[
            "adapter",
            "test",
            "--config",
            "config/ess-agent.toml",
            "court-calender",
        ],
    );
    assert_eq!(run.code, 1);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.starts_with(
            "error: no adapter named court-calender in adapters; there are: case-room-booking, "
        ),
        "{}",
        run.stderr
    );

    let run = ess_agent(repo, &["adapter", "test", "--config", "no-such.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("give --adapters-dir DIR"),
        "{}",
        run.stderr
    );
}

#[test]
fn adapter_test_fails_with_a_diff_on_a_wrong_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    copy_dir(&Path::new(REPO).join("adapters"), &adapters);
    let case = adapters.join("court-calendar.tests/deadline-moved-to-1600.json");
    let text = std::fs::read_to_string(&case).unwrap();
    assert!(text.contains(r#""cutoff_time": "16:00:00""#));
    std::fs::write(
        &case,
        text.replace(
            r#""cutoff_time": "16:00:00""#,
            r#""cutoff_time": "17:00:00""#,
        ),
    )
    .unwrap();

    let run = ess_agent(
        dir.path(),
        &[
            "adapter",
            "test",
            "--adapters-dir",
            "adapters",
            "--time-limit-ms",
            TIME_LIMIT_MS,
        ],
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let expected_failure = [
        "FAIL adapters/court-calendar.tests/deadline-moved-to-1600.json: The filing deadline of \
         a Cook County court moves to 16:00: one calendar rule record",
        "    the output differs from `expect`",
        "    --- expected",
        "    +++ actual",
        "      ...",
        r#"        "rule_key": "filing-deadline:IL-COOK-CIRCUIT","#,
        r#"        "court_id": "IL-COOK-CIRCUIT","#,
        r#"        "court_name": "Circuit Court of Cook County","#,
        r#"        "rule": "filing-deadline","#,
        r#"        "effective_from": "2026-12-01","#,
        r#"    -   "cutoff_time": "17:00:00","#,
        r#"    +   "cutoff_time": "16:00:00","#,
        r#"        "time_zone": "America/Chicago","#,
        r#"        "source_event_id": "evt-20261120-0001","#,
        r#"        "source_revision": 7,"#,
        r#"        "updated_by": "cook-county-calendar""#,
        "      }",
        "",
    ]
    .join("\n");
    let expected_failure = expected_failure.as_str();
    assert!(run.stdout.contains(expected_failure), "{}", run.stdout);
    let cases = case_count(&adapters);
    assert_eq!(
        run.stdout.lines().last(),
        Some(format!("{} passed, 1 failed", cases - 1).as_str())
    );
    assert_eq!(run.stdout.matches("\nFAIL ").count(), 1);
}

#[test]
fn adapter_test_shows_a_compile_error_once_and_fails_its_cases() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.jsonata"),
        "{\n  \"court\": payload.court_id,\n}\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("broken.tests")).unwrap();
    for name in ["a.json", "b.json"] {
        std::fs::write(
            dir.path().join("broken.tests").join(name),
            json!({"description": "any", "event": {"id": "e", "version": 1, "payload": {}},
                   "expect": {}})
            .to_string(),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("lonely.jsonata"), "$").unwrap();
    let run = ess_agent(dir.path(), &["adapter", "test", "--adapters-dir", "."]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "FAIL ./broken.jsonata: the script does not compile\n    \
         ./broken.jsonata:3:1: error S0211: \"}\" cannot start an expression here\n     \
         3 | }\n       \
         | ^\n    \
         Remove the comma before \"}\": JSONata does not allow a trailing comma.\n\
         NO CASES ./lonely.jsonata: add some to ./lonely.tests/\n\
         0 passed, 2 failed\n"
    );
}

// --- The text of five typical mistakes ------------------------------------------------------

const EVENT: &str = r#"{
  "id": "evt-1001",
  "version": 1,
  "type": "rule.updated",
  "subject": "RULE-COURT-DEADLINE",
  "payload": {
    "rule": "filing-deadline",
    "court_id": "IL-COOK-CIRCUIT",
    "courts": ["IL-COOK-CIRCUIT", "IL-DUPAGE-18TH"],
    "deadline_local": "16:00",
    "filings": "3"
  }
}"#;

/// Runs `adapter eval` on `script` and the event above, in a directory of their own, and
/// returns (exit code, stderr).
fn eval_mistake(script: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("court.jsonata"), script).unwrap();
    std::fs::write(dir.path().join("event.json"), EVENT).unwrap();
    let run = ess_agent(
        dir.path(),
        &[
            "adapter",
            "eval",
            "--expr-file",
            "court.jsonata",
            "--input-file",
            "event.json",
        ],
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    (run.code, run.stderr)
}

#[test]
fn mistake_an_unclosed_bracket() {
    let (code, text) =
        eval_mistake("{\n  \"court\": payload.court_id,\n  \"deadline\": payload.deadline_local\n");
    assert_eq!(code, 1);
    assert_eq!(
        text,
        "court.jsonata:3:37: error S0203: expected \"}\" before the end of the expression\n \
         3 |   \"deadline\": payload.deadline_local\n   \
           |                                     ^\n\
         The \"{\" at line 1, column 1 is never closed: add \"}\" where it should end.\n"
    );
}

#[test]
fn mistake_an_unknown_function() {
    let (code, text) =
        eval_mistake("{\n  \"court\": $upercase(payload.court_id),\n  \"rule\": payload.rule\n}\n");
    assert_eq!(code, 1);
    assert_eq!(
        text,
        "court.jsonata:2:12: error T1006: $upercase is not a function\n \
         2 |   \"court\": $upercase(payload.court_id),\n   \
           |            ^\n\
         The failing part is `$upercase(payload.court_id)`.\n\
         There is no function $upercase: did you mean $uppercase? Function names are \
         case-sensitive.\n"
    );
}

#[test]
fn mistake_a_wrong_argument_type() {
    let (code, text) = eval_mistake("{\n  \"state\": $substring(payload.courts, 0, 2)\n}\n");
    assert_eq!(code, 1);
    assert_eq!(
        text,
        "court.jsonata:2:12: error T0410: argument 1 of $substring must be a string\n \
         2 |   \"state\": $substring(payload.courts, 0, 2)\n   \
           |            ^\n\
         `payload.courts` is [\"IL-COOK-CIRCUIT\",\"IL-DUPAGE-18TH\"] (an array of 2 items).\n\
         It is an array here: pick one item, as in payload.courts[0], or join the items with \
         $join(payload.courts, \", \").\n"
    );
}

#[test]
fn mistake_a_path_that_yields_nothing() {
    let (code, text) = eval_mistake(
        "payload.rule = \"filing-deadline\" ? {\n  \"court\": payload.court_id,\n  \
         \"deadline\": payload.deadline_local\n}\n"
            .replace("payload.rule =", "payload.rules =")
            .as_str(),
    );
    // Not an error: the route is skipped. But the person is told why.
    assert_eq!(code, 0);
    assert_eq!(
        text,
        "court.jsonata: the result is undefined: nothing matched `payload.rules` at line 1; the \
         condition `payload.rules = \"filing-deadline\"` at line 1 was false and has no else \
         branch\n\
         The agent skips the route for an event the adapter gives no result for.\n"
    );
}

#[test]
fn mistake_a_type_error_in_arithmetic() {
    let (code, text) = eval_mistake("{\n  \"copies\": payload.filings * 2\n}\n");
    assert_eq!(code, 1);
    assert_eq!(
        text,
        "court.jsonata:2:29: error T2001: the left side of the \"*\" operator must be a number\n \
         2 |   \"copies\": payload.filings * 2\n   \
           |                             ^\n\
         `payload.filings` is \"3\" (a string).\n\
         Convert the text first with $number(...), or check that the field holds a number for \
         this event.\n"
    );
}

#[test]
fn a_fixture_expecting_a_value_says_which_path_matched_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("court.jsonata"),
        "payload.rules = \"filing-deadline\" ? {\"court\": payload.court_id}\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("court.tests")).unwrap();
    let event: serde_json::Value = serde_json::from_str(EVENT).unwrap();
    std::fs::write(
        dir.path().join("court.tests/kept.json"),
        json!({"description": "a deadline change is kept", "event": event,
               "expect": {"court": "IL-COOK-CIRCUIT"}})
        .to_string(),
    )
    .unwrap();
    let run = ess_agent(dir.path(), &["adapter", "test", "--adapters-dir", "."]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stdout,
        "FAIL ./court.tests/kept.json: a deadline change is kept\n    \
         the result is undefined (nothing matched `payload.rules` at line 1; the condition \
         `payload.rules = \"filing-deadline\"` at line 1 was false and has no else branch), so \
         the route would be skipped, but `expect` wants a value\n    \
         --- expected\n    \
         +++ actual\n    \
         - {\n    \
         -   \"court\": \"IL-COOK-CIRCUIT\"\n    \
         - }\n    \
         + undefined (nothing matched `payload.rules` at line 1; the condition \
         `payload.rules = \"filing-deadline\"` at line 1 was false and has no else branch)\n\
         0 passed, 1 failed\n"
    );
}

// --- adapter eval --watch -------------------------------------------------------------------

/// Waits for a line of `lines` for which `wanted` holds, collecting what was read.
fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = wanted(&line);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(_) => panic!("the line did not come; output so far:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn eval_watch_evaluates_again_on_every_save() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("court.jsonata");
    std::fs::write(&script, "{\"court\": payload.court_id, \"n\": 1}\n").unwrap();
    std::fs::write(dir.path().join("event.json"), EVENT).unwrap();
    let mut child = Command::new(support::binary())
        .args([
            "adapter",
            "eval",
            "--watch",
            "--expr-file",
            "court.jsonata",
            "--input-file",
            "event.json",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let timeout = Duration::from_secs(20);
    let mut seen = Vec::new();
    let is_separator = |line: &str| {
        line.starts_with("-------- ")
            && line.ends_with(" UTC court.jsonata --------")
            && line.len() == "-------- 00:00:00 UTC court.jsonata --------".len()
    };
    wait_for_line(&lines, &mut seen, timeout, is_separator);
    wait_for_line(&lines, &mut seen, timeout, |l| l == "  \"n\": 1");

    // An editor's save: a new file renamed over the old one.
    let temporary = dir.path().join(".court.jsonata.swp");
    std::fs::write(&temporary, "{\"court\": payload.court_id, \"n\": 2}\n").unwrap();
    std::fs::rename(&temporary, &script).unwrap();
    wait_for_line(&lines, &mut seen, timeout, is_separator);
    wait_for_line(&lines, &mut seen, timeout, |l| l == "  \"n\": 2");

    // A save in place that breaks the script shows the error, and the watch goes on.
    std::fs::write(&script, "{\"n\": payload.filings + 1}\n").unwrap();
    wait_for_line(&lines, &mut seen, timeout, |l| {
        l.starts_with("court.jsonata:1:23: error T2001: ")
    });
    std::fs::write(dir.path().join("event.json"), EVENT.replace("\"3\"", "3")).unwrap();
    wait_for_line(&lines, &mut seen, timeout, |l| l == "  \"n\": 4");

    child.kill().unwrap();
    child.wait().unwrap();
}

// --- The message of a dead letter -----------------------------------------------------------

#[tokio::test]
async fn a_dead_letter_names_the_adapter_the_event_the_part_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir(&adapters).unwrap();
    let script = adapters.join("copies.jsonata");
    std::fs::write(&script, "{\n  \"copies\": payload.filings * 2\n}\n").unwrap();
    let extra = format!(
        "adapters_dir = {adapters:?}\n\
         [[routes]]\nname = \"copies\"\ntypes = [\"rule.updated\"]\nadapter = \"copies.jsonata\"\n\
         sink = \"files\"\n\
         [sinks.files]\ntype = \"file\"\ndir = {out:?}\nname = \"{{id}}.json\"\n",
        adapters = adapters.display().to_string(),
        out = dir.path().join("out").display().to_string(),
    );
    let agent = Agent::start(dir.path(), &extra);
    let body = EVENT.as_bytes().to_vec();
    let headers = signed_headers("evt-1001", unix_now(), &body);
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    agent
        .wait_for_log(Duration::from_secs(20), |line| {
            line["message"] == "event final" && line["event_id"] == "evt-1001"
        })
        .unwrap_or_else(|| panic!("not final:\n{}", agent.log_text()));
    let status = admin_get(&agent, "/v1/events/evt-1001").await;
    assert_eq!(status.body["state"], "failed", "{}", status.body);
    let path: PathBuf = script;
    assert_eq!(
        status.body["error"].as_str().unwrap(),
        format!(
            "route copies: adapter {} failed on event evt-1001 at line 2, column 29: error \
             T2001: the left side of the \"*\" operator must be a number\n \
             2 |   \"copies\": payload.filings * 2\n   \
               |                             ^\n\
             `payload.filings` is \"3\" (a string).\n\
             Convert the text first with $number(...), or check that the field holds a number \
             for this event.",
            path.display()
        )
    );
}

// --- The cookbook -----------------------------------------------------------------------------

#[test]
fn the_cookbook_recipes_pass_and_the_guide_quotes_them_all() {
    let repo = Path::new(REPO);
    let run = ess_agent(
        repo,
        &[
            "adapter",
            "test",
            "--adapters-dir",
            "docs/cookbook",
            "--time-limit-ms",
            TIME_LIMIT_MS,
        ],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("NO CASES"), "{}", run.stdout);

    // Every script of the guide is a tested recipe, and every recipe is in the guide.
    let guide = std::fs::read_to_string(repo.join("docs/adapters.md")).unwrap();
    let quoted: Vec<&str> = guide
        .split("```jsonata\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .collect();
    let mut recipes: Vec<String> = std::fs::read_dir(repo.join("docs/cookbook"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonata"))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect();
    recipes.sort();
    let mut blocks: Vec<String> = quoted.iter().map(|block| (*block).to_owned()).collect();
    blocks.sort();
    assert_eq!(blocks, recipes);
}
