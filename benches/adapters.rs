//! Adapter evaluation: µs per event through the agent's engine seam, beside jsonata-js (the
//! reference implementation) on the same events in the same run.
//!
//! Every shipped adapter fixture with an expected value is one case. Per event, both sides parse
//! the input JSON text, evaluate the compiled script with `$partner` bound, and serialise the
//! result: the work the agent does per event and route. Each case runs `ROUNDS` rounds of `ITERS`
//! events; the figure is the median round.
//!
//! Run: `npm --prefix bench/jsonata-js ci && cargo bench --bench adapters`

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ess_agent::adapter::engine::{Expression, Limits};
use ess_agent::adapter::fixtures::{Expectation, Fixture, discover};
use serde_json::{Map, Value, json};

const ROUNDS: usize = 7;
const ITERS: usize = 400;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cases = Vec::new();
    for (script, fixtures) in discover(&root.join("adapters")).expect("adapters") {
        let source = std::fs::read_to_string(&script).unwrap();
        for path in fixtures {
            let fixture = Fixture::load(&path).unwrap();
            if !matches!(fixture.expectation, Expectation::Value(_)) {
                continue;
            }
            let mut bindings = Map::new();
            for (k, v) in &fixture.bindings {
                bindings.insert(k.clone(), v.clone());
            }
            bindings
                .entry("partner".to_string())
                .or_insert(json!("test-partner"));
            let name = format!(
                "{}/{}",
                script.file_stem().unwrap().to_string_lossy(),
                path.file_stem().unwrap().to_string_lossy()
            );
            cases.push(json!({
                "name": name,
                "source": source,
                "input_text": fixture.input.to_string(),
                "bindings": Value::Object(bindings),
            }));
        }
    }
    let limits = Limits::default();
    let mut ours = Vec::new();
    for case in &cases {
        let expr = Expression::compile(case["source"].as_str().unwrap()).unwrap();
        let text = case["input_text"].as_str().unwrap();
        let bindings = case["bindings"].as_object().unwrap();
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..ITERS {
                let input: Value = serde_json::from_str(text).unwrap();
                let out = expr.evaluate(&input, bindings, &limits).unwrap();
                std::hint::black_box(serde_json::to_string(&out).unwrap());
            }
            rounds.push(start.elapsed().as_secs_f64() * 1e6 / ITERS as f64);
        }
        ours.push(median(rounds));
    }

    let cases_file =
        std::env::temp_dir().join(format!("ess-adapter-bench-{}.json", std::process::id()));
    std::fs::write(&cases_file, serde_json::to_vec(&cases).unwrap()).unwrap();
    let output = Command::new("node")
        .arg(root.join("bench/jsonata-js/bench.mjs"))
        .arg(&cases_file)
        .arg(ROUNDS.to_string())
        .arg(ITERS.to_string())
        .output();
    let _ = std::fs::remove_file(&cases_file);
    let js: Vec<f64> = match output {
        Ok(out) if out.status.success() => {
            let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            results
                .iter()
                .map(|r| {
                    median(
                        r["micros_per_event"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_f64().unwrap())
                            .collect(),
                    )
                })
                .collect()
        }
        Ok(out) => {
            eprintln!(
                "jsonata-js failed (run `npm --prefix bench/jsonata-js ci` first): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("cannot run node: {e}");
            Vec::new()
        }
    };

    println!("| case | ess-agent µs/event | jsonata-js µs/event | speed-up |");
    println!("|---|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        match js.get(i) {
            Some(j) => {
                ratios.push(j / ours[i]);
                println!(
                    "| {name} | {:.1} | {:.1} | {:.1}× |",
                    ours[i],
                    j,
                    j / ours[i]
                );
            }
            None => println!("| {name} | {:.1} | – | – |", ours[i]),
        }
    }
    if !ratios.is_empty() {
        let total_ours: f64 = ours.iter().sum();
        let total_js: f64 = js.iter().sum();
        println!(
            "\nmedian speed-up {:.1}× (min {:.1}×); all cases together {:.1}× ({} cases, {ROUNDS} rounds of {ITERS} events, median round)",
            median(ratios.clone()),
            ratios.iter().cloned().fold(f64::INFINITY, f64::min),
            total_js / total_ours,
            ratios.len()
        );
    }
}
