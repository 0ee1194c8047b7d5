//! The `file` sink in `append` mode with the real agent, killed with `kill -9` while events
//! are being posted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{self, Agent};

/// Two records per event, so that the record index is part of what must land once.
const TWO_RECORDS: &str = r#"[{"n": payload.n, "half": "a"}, {"n": payload.n, "half": "b"}]"#;

fn config(dir: &Path) -> String {
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    std::fs::write(adapters.join("two.jsonata"), TWO_RECORDS).unwrap();
    support::config_text(
        dir,
        &format!(
            "adapters_dir = {adapters:?}\n[[routes]]\nname = \"log\"\nadapter = \
             \"two.jsonata\"\nsink = \"log\"\n\n[sinks.log]\ntype = \"file\"\nmode = \
             \"append\"\ndir = {out:?}\nname = \"events-{{date}}.ndjson\"\n\
             retry = {{ initial_ms = 50, max_ms = 500, max_attempts = 0 }}\n",
            adapters = adapters.display().to_string(),
            out = dir.join("out").display().to_string(),
        ),
    )
}

/// Every line of every file in `out`: (event id, record index) → how often. Panics on a line
/// that does not parse or a file that does not end in a newline.
fn lines(out: &Path) -> BTreeMap<(String, u64), usize> {
    let mut counts = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return counts;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in a torn line: {:?}",
            path.display(),
            &text[text.len().saturating_sub(80)..]
        );
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{}: a line does not parse ({e}): {line:?}", path.display())
            });
            assert_eq!(v["route"], "log", "{line}");
            let half = if v["index"] == 0 { "a" } else { "b" };
            assert_eq!(v["record"]["half"], half, "{line}");
            let key = (
                v["id"].as_str().unwrap().to_string(),
                v["index"].as_u64().unwrap(),
            );
            *counts.entry(key).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_mode_kill_9_mid_stream_every_accepted_record_lands_once_and_whole() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let text = config(dir.path());
    let mut accepted = BTreeSet::new();
    let (mut cut, mut resumed) = (0, 0);
    let resumed_by = |agent: &Agent| {
        agent
            .wait_for_log(Duration::ZERO, |v| {
                v["message"] == "resuming events left unfinished"
            })
            .map_or(0, |v| v["events"].as_u64().unwrap_or(0))
    };
    for round in 0..3usize {
        let mut agent = Agent::start_with(dir.path(), &text);
        resumed += resumed_by(&agent);
        let stop = Arc::new(AtomicBool::new(false));
        let poster = support::post_many(
            &agent,
            &format!("r{round}"),
            0..3000,
            8,
            stop.clone(),
            |id, n| support::event_body(id, &format!("S{}", n % 32), json!({"n": n})),
        );
        let mut n = 0;
        let seen = agent.wait_for_log(Duration::from_secs(30), |v| {
            n += usize::from(support::applied_line(v));
            n >= 50 + round * 30
        });
        assert!(seen.is_some(), "round {round}: nothing applied");
        agent.kill9();
        cut += agent.log_text().matches("cut off a partial line").count();
        stop.store(true, Ordering::Relaxed);
        accepted.extend(poster.await.unwrap());
    }
    // A last run applies what was left.
    let agent = Agent::start_with(dir.path(), &text);
    resumed += resumed_by(&agent);
    let deadline = Instant::now() + Duration::from_secs(40);
    let counts = loop {
        let counts = lines(&out);
        let done = accepted
            .iter()
            .all(|id| (0..2).all(|i| counts.contains_key(&(id.clone(), i))));
        if done || Instant::now() >= deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| (0..2).any(|i| !counts.contains_key(&((*id).clone(), i))))
        .collect();
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    cut += agent.log_text().matches("cut off a partial line").count();
    eprintln!(
        "append, kill -9: {} accepted events, {} lines, {resumed} events resumed after a kill, \
         {cut} torn lines cut at a start",
        accepted.len(),
        counts.len()
    );
    assert!(
        missing.is_empty(),
        "accepted events without their lines: {missing:?}"
    );
    assert!(
        twice.is_empty(),
        "records written more than once: {twice:?}"
    );
    drop(agent);
}
