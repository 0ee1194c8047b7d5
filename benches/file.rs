//! Records per second through the file sink alone (no agent, no journal), 1 KiB records from
//! 32 concurrent applies, in one run on one disk:
//!
//! - `{id}.json`, each apply fsyncing the directory on its own (releases before shared
//!   directory fsyncs), and with the directory fsync shared by concurrent applies (now);
//! - `mode = "append"` into `events-{date}.ndjson`;
//! - bare baselines in the same run: one loop that writes and fsyncs a file per record, and one
//!   that appends a line per record to one file and fdatasyncs it.
//!
//! Run: `cargo bench --features bench --bench file` (RECORDS and ROUNDS in the environment
//! change the defaults of 2000 records and 5 rounds). The files go to a temporary directory
//! under `target/`, on the disk the agent's spool would use.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ess_agent::sink::file::{FileConfig, FileSink};
use ess_agent::sink::{EventMeta, Sink};
use serde_json::{Value, json};

mod common;
use common::{env_or, median};

const CONCURRENCY: usize = 32;
const SIZE: usize = 1024;

fn record(n: usize) -> Value {
    let unit = format!("{n:06};");
    let mut text = unit.repeat(SIZE / unit.len() + 1);
    text.truncate(SIZE - 16);
    json!({ "n": n, "text": text })
}

fn event(n: usize) -> EventMeta {
    EventMeta {
        id: format!("evt-{n:07}"),
        event_type: "rule.updated".into(),
        version: 1,
        subject: format!("S{}", n % 256),
        revision: Some(1),
        source: None,
        route: "bench".into(),
        partner: "bench".into(),
        received_at_ms: 1_796_601_600_000,
    }
}

fn sink(dir: &Path, text: &str) -> FileSink {
    let mut config: FileConfig = toml::from_str(text).unwrap();
    config.dir = dir.to_owned();
    FileSink::new(&config).unwrap()
}

/// Applies `records` events, `CONCURRENCY` at a time; returns records per second.
fn through_sink(runtime: &tokio::runtime::Runtime, sink: FileSink, records: usize) -> f64 {
    let sink = Arc::new(sink);
    let outputs: Arc<Vec<Value>> = Arc::new((0..records).map(record).collect());
    runtime.block_on(async {
        sink.start().await;
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (sink, outputs, next) = (sink.clone(), outputs.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n >= outputs.len() {
                            break;
                        }
                        sink.apply(&event(n), &outputs[n]).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        records as f64 / started.elapsed().as_secs_f64()
    })
}

/// One loop: a file per record, written and fsynced.
fn bare_files(dir: &Path, records: usize) -> f64 {
    let started = Instant::now();
    for n in 0..records {
        let mut bytes = serde_json::to_vec(&record(n)).unwrap();
        bytes.push(b'\n');
        let mut file = std::fs::File::create(dir.join(format!("{n}.json"))).unwrap();
        file.write_all(&bytes).unwrap();
        file.sync_all().unwrap();
    }
    records as f64 / started.elapsed().as_secs_f64()
}

/// One loop: a line per record appended to one file, fdatasynced.
fn bare_append(dir: &Path, records: usize) -> f64 {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("bare.ndjson"))
        .unwrap();
    let started = Instant::now();
    for n in 0..records {
        let mut bytes = serde_json::to_vec(&record(n)).unwrap();
        bytes.push(b'\n');
        file.write_all(&bytes).unwrap();
        file.sync_data().unwrap();
    }
    records as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let records = env_or("RECORDS", 2000);
    let rounds = env_or("ROUNDS", 5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let names = [
        "file {id}.json, per-event directory fsync (before)",
        "file {id}.json, shared directory fsync (now)",
        "append events-{date}.ndjson",
        "bare: write + fsync a file per record, one loop",
        "bare: append + fdatasync a line per record, one loop",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        // Interleaved, so that the load of the machine weighs on every variant alike.
        for (i, result) in results.iter_mut().enumerate() {
            let dir = tempfile::tempdir_in(&root).unwrap();
            let per_file = "dir = \"x\"\nname = \"{id}.json\"\n";
            let rate = match i {
                0 => through_sink(
                    &runtime,
                    sink(dir.path(), per_file).unshared_dir_syncs(),
                    records,
                ),
                1 => through_sink(&runtime, sink(dir.path(), per_file), records),
                2 => through_sink(
                    &runtime,
                    sink(
                        dir.path(),
                        "dir = \"x\"\nname = \"events-{date}.ndjson\"\nmode = \"append\"\n",
                    ),
                    records,
                ),
                3 => bare_files(dir.path(), records),
                _ => bare_append(dir.path(), records),
            };
            eprintln!("round {round}: {}: {rate:.0} records/s", names[i]);
            result.push(rate);
        }
    }
    println!(
        "\n{records} records of 1 KiB, {CONCURRENCY} applies at a time, median of {rounds} rounds:"
    );
    println!("| variant | records/s |\n|---|---:|");
    for (name, rates) in names.iter().zip(&mut results) {
        println!("| {name} | {:.0} |", median(rates));
    }
}
