//! The floor under the agent's CPU per accepted event: the parts every event needs, each
//! measured alone on one thread, with no HTTP and no hand-off between the parts. `accept`
//! sets their sum beside the CPU per event that the target ratio to the bare server leaves.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use ess_agent::adapter::Adapter;
use ess_agent::adapter::engine::Limits;
use ess_agent::ingress::handler;
use ess_agent::journal::{
    self, AppliedOutput, Attempt, DeliveryState, DeliveryUpdate, EventState, Finish,
    JournalOptions, NewEvent, SqliteJournal,
};
use ess_agent::protocol::auth::{WebhookSigner, WebhookVerifier};
use ess_agent::protocol::envelope;
use http::{HeaderMap, HeaderValue, header};
use serde_json::{Value, json};

use crate::{SECRET, TempDir, event_body, median, unix_now, uuid_v4};

/// Appends (and finishes) in flight at once: the load generator's default connection count,
/// so that commits group as many events as under load. Also the batch of the batched insert.
const IN_FLIGHT: usize = 32;

/// Final states per writer job in the batched measurement.
const FINISH_BATCH: usize = 64;

/// CPU per event of each part, in microseconds: medians over the rounds.
#[derive(Debug, Clone, Default)]
pub struct Floor {
    pub verify_us: f64,
    pub parse_us: f64,
    /// The journal's insert of an event (row and body) in jobs of [`IN_FLIGHT`] events: the
    /// least its SQLite work and commit cost.
    pub insert_us: f64,
    pub envelope_us: f64,
    /// The journal's record of an event's final state in jobs of [`FINISH_BATCH`] events.
    pub final_us: f64,
    /// Not in [`Floor::total_us`]: the insert as the agent does it, one writer operation per
    /// event ([`SqliteJournal::append`]).
    pub append_us: f64,
    /// Not in [`Floor::total_us`]: the final state as the agent records it, one writer
    /// operation per event ([`SqliteJournal::finish`]).
    pub finish_us: f64,
    /// Not in [`Floor::total_us`]: an event the dispatcher did not get fresh from the writer
    /// (a backlog) is read back first.
    pub read_us: f64,
    /// Not in [`Floor::total_us`]: the given adapter evaluated on each event, when one was given.
    pub adapter_us: Option<f64>,
    /// The journal's history of attempts and receipts, each beside the same work without it
    /// (in alternating quarters of the same events, so both see the journal at the same size).
    pub history: History,
}

/// The writer's CPU (and the wall time, commits included) per event with and without what the
/// journal keeps for the operator: the receipt in the append, the attempt (with the applied
/// output) in the final state.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// [`SqliteJournal::append`] with no receipt (as before the journal kept them).
    pub append_us: f64,
    /// [`SqliteJournal::append`] with a receipt as the ingress makes it.
    pub append_receipt_us: f64,
    /// [`SqliteJournal::finish_with`] with one route's delivery state and no attempt.
    pub finish_us: f64,
    /// [`SqliteJournal::finish_with`] with the delivery state and its attempt, whose output is
    /// the event's envelope (about the body's size).
    pub finish_attempt_us: f64,
    /// Wall time per event of the same four, in microseconds: commits (fsync) included.
    pub append_wall_us: f64,
    pub append_receipt_wall_us: f64,
    pub finish_wall_us: f64,
    pub finish_attempt_wall_us: f64,
}

impl Floor {
    /// Every part an accepted and dispatched event needs, at its least.
    pub fn total_us(&self) -> f64 {
        self.verify_us + self.parse_us + self.insert_us + self.envelope_us + self.final_us
    }

    pub fn print(&self, events: usize, rounds: usize) {
        println!(
            "\nfloor: CPU per event of the work every accepted event needs, each part alone on \
             one thread ({events} events, median of {rounds} rounds)"
        );
        let rows = [
            ("signature check (HMAC-SHA256, 1 secret)", self.verify_us),
            ("envelope parse and validation", self.parse_us),
            (
                "journal insert, batched, and group commit (writer)",
                self.insert_us,
            ),
            (
                "dispatcher: the stored envelope read by the engine",
                self.envelope_us,
            ),
            ("journal: the final state, batched (writer)", self.final_us),
        ];
        for (what, us) in rows {
            println!("  {what:<52} {us:>6.1} µs");
        }
        println!("  {:<52} {:>6.1} µs", "sum", self.total_us());
        println!("  not in the sum:");
        let others = [
            (
                "journal insert, one writer op per event (the agent)",
                self.append_us,
            ),
            (
                "final state, one writer operation per event (the agent)",
                self.finish_us,
            ),
            ("a backlog event read back from the journal", self.read_us),
        ];
        for (what, us) in others {
            println!("  {what:<52} {us:>6.1} µs");
        }
        if let Some(us) = self.adapter_us {
            println!(
                "  {:<52} {us:>6.1} µs",
                "the given adapter (its input read)"
            );
        }
        let h = &self.history;
        println!("  the operator's history, without → with (writer CPU; wall time with commits):");
        for (what, cpu, wall) in [
            (
                "append, no receipt → with its receipt",
                [h.append_us, h.append_receipt_us],
                [h.append_wall_us, h.append_receipt_wall_us],
            ),
            (
                "final state with a delivery → with its attempt",
                [h.finish_us, h.finish_attempt_us],
                [h.finish_wall_us, h.finish_attempt_wall_us],
            ),
        ] {
            println!(
                "  {what:<52} {:>6.1} → {:>6.1} µs  ({:.1} → {:.1} µs wall)",
                cpu[0], cpu[1], wall[0], wall[1]
            );
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "verify_us": crate::round(self.verify_us, 2),
            "parse_us": crate::round(self.parse_us, 2),
            "insert_us": crate::round(self.insert_us, 2),
            "envelope_us": crate::round(self.envelope_us, 2),
            "final_us": crate::round(self.final_us, 2),
            "total_us": crate::round(self.total_us(), 2),
            "append_us": crate::round(self.append_us, 2),
            "finish_us": crate::round(self.finish_us, 2),
            "read_us": crate::round(self.read_us, 2),
            "adapter_us": self.adapter_us.map(|us| crate::round(us, 2)),
            "history": {
                "append_us": crate::round(self.history.append_us, 2),
                "append_receipt_us": crate::round(self.history.append_receipt_us, 2),
                "finish_us": crate::round(self.history.finish_us, 2),
                "finish_attempt_us": crate::round(self.history.finish_attempt_us, 2),
                "append_wall_us": crate::round(self.history.append_wall_us, 2),
                "append_receipt_wall_us": crate::round(self.history.append_receipt_wall_us, 2),
                "finish_wall_us": crate::round(self.history.finish_wall_us, 2),
                "finish_attempt_wall_us": crate::round(self.history.finish_attempt_wall_us, 2),
            },
        })
    }
}

/// CPU time the calling thread has used, in seconds. (The thread's `/proc` figures are brought
/// up to date only when it is switched out, so a short part could read as nothing there.)
fn thread_cpu() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// CPU time the journal's writer threads in this process have used, in seconds: up to date
/// once they wait for work, as they do when a part has ended.
fn writer_cpu() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "journal-writer")
        })
        .map(|t| schedstat_seconds(&t.path().join("schedstat").display().to_string()))
        .sum()
}

fn schedstat_seconds(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

/// Signed deliveries as the load generator sends them: headers and body.
fn deliveries(events: usize, body_bytes: usize) -> anyhow::Result<Vec<(HeaderMap, Bytes)>> {
    let signer = WebhookSigner::new(SECRET)?;
    (0..events)
        .map(|i| {
            let id = uuid_v4(rand::random());
            let subject = format!("bench-subject-{:04}", i % IN_FLIGHT);
            let body = Bytes::from(event_body(&id, &subject, i as u64, body_bytes));
            let timestamp = unix_now();
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert("webhook-id", HeaderValue::try_from(id.as_str())?);
            headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
            headers.insert(
                "webhook-signature",
                HeaderValue::try_from(signer.sign(&id, timestamp, &body))?,
            );
            Ok((headers, body))
        })
        .collect()
}

/// One round: every part over `events` fresh events, in a fresh journal under `work_dir`.
fn round(
    runtime: &tokio::runtime::Runtime,
    work_dir: &Path,
    events: usize,
    body_bytes: usize,
    adapter: Option<&Adapter>,
) -> anyhow::Result<Floor> {
    let per_event = |seconds: f64| seconds / events as f64 * 1e6;
    let input = deliveries(events, body_bytes)?;
    let verifier = WebhookVerifier::new(&[SECRET.to_owned()], &[], Duration::from_secs(300))?;

    let start = thread_cpu();
    let now = SystemTime::now();
    for (headers, body) in &input {
        verifier
            .verify(headers, body, now)
            .context("a signature did not verify")?;
    }
    let verify_us = per_event(thread_cpu() - start);

    let start = thread_cpu();
    let mut new_events: Vec<NewEvent> = Vec::with_capacity(events);
    for (headers, body) in &input {
        let parsed = envelope::parse(headers, body).context("an envelope did not parse")?;
        new_events.push(handler::new_event(
            parsed,
            Some("application/json".to_owned()),
            body.clone(),
        ));
    }
    let parse_us = per_event(thread_cpu() - start);
    drop(input);

    let dir = TempDir::new(work_dir)?;
    let options = JournalOptions {
        min_free_disk_bytes: 0,
        retention: None,
        ..JournalOptions::default()
    };
    let journal = SqliteJournal::open(&dir.0, options)?;
    let envelopes: Vec<String> = new_events.iter().map(|e| e.envelope.clone()).collect();
    // The same events again under other ids, for the history's measurement.
    let again: Vec<NewEvent> = new_events
        .iter()
        .map(|e| NewEvent {
            id: format!("{}-again", e.id),
            ..e.clone()
        })
        .collect();
    let subjects: Vec<String> = new_events.iter().map(|e| e.subject.clone()).collect();
    let ids: Vec<String> = new_events.iter().map(|e| e.id.clone()).collect();

    // Half the events are appended as the agent does, half inserted in batches.
    let batched: Vec<NewEvent> = new_events.split_off(events / 2);
    let append_us =
        writer_us_per_item(runtime, &journal, new_events, |journal, event| async move {
            journal.append(event).await.map(|_| ())
        })?;
    let insert_us = writer_us_in_batches(runtime, &journal, batched, IN_FLIGHT, |conn, batch| {
        let now = ess_agent::timestamp::now();
        for event in batch {
            journal::insert_event(conn, event, &now)?;
        }
        Ok(())
    })?;

    // The dispatcher hands the stored envelope, JSON text, to the adapter engine, which parses
    // it into its own form; the least of that is parsing it whole.
    let start = thread_cpu();
    for text in &envelopes {
        let document = jlens_core::Document::parse(text)?;
        std::hint::black_box(&document);
    }
    let envelope_us = per_event(thread_cpu() - start);

    let adapter_us = match adapter {
        Some(adapter) => {
            let limits = Limits::default();
            let start = thread_cpu();
            for text in &envelopes {
                let output = adapter
                    .evaluate_text(text, "bench", &limits)
                    .map_err(|e| anyhow::anyhow!("the adapter failed: {}", e.message))?;
                std::hint::black_box(output);
            }
            Some(per_event(thread_cpu() - start))
        }
        None => None,
    };

    // Sequence numbers follow the order of the commits, not of the list: look them up.
    let seqs = journal.read(|conn| {
        let mut stmt = conn.prepare("SELECT seq, id FROM events")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(0)?)))?;
        rows.collect::<Result<std::collections::HashMap<_, _>, _>>()
    })?;
    let start = thread_cpu();
    for seq in seqs.values() {
        let event = journal
            .read_now(|conn| journal::load_event(conn, *seq))
            .context("the quick connection was taken")??;
        std::hint::black_box(event);
    }
    let read_us = per_event(thread_cpu() - start);

    let mut finishes: Vec<Finish> = ids
        .into_iter()
        .zip(subjects)
        .enumerate()
        .map(|(i, (id, subject))| Finish {
            seq: seqs.get(&id).copied().unwrap_or_default(),
            state: EventState::Filtered,
            error: None,
            subject_revision: Some((subject, i as u64)),
            report: None,
            event_id: id,
        })
        .collect();
    // Half the events are finished as the agent does, half in batches.
    let batched: Vec<Finish> = finishes.split_off(events / 2);
    let finish_us =
        writer_us_per_item(runtime, &journal, finishes, |journal, finish| async move {
            journal.finish(finish).await
        })?;
    let final_us =
        writer_us_in_batches(runtime, &journal, batched, FINISH_BATCH, |conn, batch| {
            let now = ess_agent::timestamp::now();
            for finish in batch {
                journal::finish_event(conn, finish, &now)?;
            }
            Ok(())
        })?;
    let history = history(runtime, &journal, again)?;
    journal.close();
    Ok(Floor {
        verify_us,
        parse_us,
        insert_us,
        envelope_us,
        final_us,
        append_us,
        finish_us,
        read_us,
        adapter_us,
        history,
    })
}

/// A receipt as the ingress records it for a Standard Webhooks delivery.
const RECEIPT: &str = r#"{"methods":["standard_webhooks"],"webhook":{"id":"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W","timestamp":1796640000,"time":"2026-12-07T10:40:00.000Z","signature_versions":["v1"],"verified_by":"v1","header_names":"webhook"}}"#;

/// The [`History`] of `events` (not yet in the journal): each measurement alternates quarters
/// without and with, and sums each side.
fn history(
    runtime: &tokio::runtime::Runtime,
    journal: &Arc<SqliteJournal>,
    events: Vec<NewEvent>,
) -> anyhow::Result<History> {
    let quarter = events.len().div_ceil(4).max(1);
    let mut quarters: Vec<Vec<NewEvent>> = events.chunks(quarter).map(<[_]>::to_vec).collect();
    let mut h = History::default();
    // (CPU µs, wall µs, events) on each side.
    let mut sides = [(0.0, 0.0, 0usize); 2];
    for (i, quarter) in quarters.iter_mut().enumerate() {
        let with = i % 2;
        for e in quarter.iter_mut() {
            e.receipt = (with == 1).then(|| RECEIPT.to_owned());
        }
        let n = quarter.len();
        let started = std::time::Instant::now();
        let cpu = writer_us_per_item(
            runtime,
            journal,
            quarter.clone(),
            |journal, event| async move { journal.append(event).await.map(|_| ()) },
        )?;
        let side = &mut sides[with];
        side.0 += cpu * n as f64;
        side.1 += started.elapsed().as_secs_f64() * 1e6;
        side.2 += n;
    }
    let per =
        |side: (f64, f64, usize)| (side.0 / side.2.max(1) as f64, side.1 / side.2.max(1) as f64);
    (h.append_us, h.append_wall_us) = per(sides[0]);
    (h.append_receipt_us, h.append_receipt_wall_us) = per(sides[1]);

    let seqs = journal.read(|conn| {
        let mut stmt = conn.prepare("SELECT seq, id FROM events WHERE id LIKE '%-again'")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(0)?)))?;
        rows.collect::<Result<std::collections::HashMap<_, _>, _>>()
    })?;
    let mut sides = [(0.0, 0.0, 0usize); 2];
    for (i, quarter) in quarters.into_iter().enumerate() {
        let with = i % 2;
        let n = quarter.len();
        let finishes: Vec<(Vec<DeliveryUpdate>, Finish)> = quarter
            .into_iter()
            .map(|e| {
                let seq = seqs.get(&e.id).copied().unwrap_or_default();
                let attempt = (with == 1).then(|| Attempt {
                    started_at: ess_agent::timestamp::now(),
                    duration_ms: 1,
                    outcome: DeliveryState::Applied,
                    error: None,
                    output: Some(AppliedOutput::new(e.envelope.clone())),
                });
                let update = DeliveryUpdate {
                    seq,
                    route: "files".into(),
                    sink: "files".into(),
                    state: DeliveryState::Applied,
                    attempts: 1,
                    next_attempt_ms: None,
                    last_error: None,
                    attempt,
                };
                let finish = Finish {
                    seq,
                    state: EventState::Applied,
                    error: None,
                    subject_revision: None,
                    report: None,
                    event_id: e.id,
                };
                (vec![update], finish)
            })
            .collect();
        let started = std::time::Instant::now();
        let cpu = writer_us_per_item(
            runtime,
            journal,
            finishes,
            |journal, (updates, finish)| async move { journal.finish_with(updates, finish).await },
        )?;
        let side = &mut sides[with];
        side.0 += cpu * n as f64;
        side.1 += started.elapsed().as_secs_f64() * 1e6;
        side.2 += n;
    }
    (h.finish_us, h.finish_wall_us) = per(sides[0]);
    (h.finish_attempt_us, h.finish_attempt_wall_us) = per(sides[1]);
    Ok(h)
}

/// The journal writer's CPU per item, in microseconds, while `op` runs over `items` with
/// [`IN_FLIGHT`] at once.
fn writer_us_per_item<T, F, Fut>(
    runtime: &tokio::runtime::Runtime,
    journal: &Arc<SqliteJournal>,
    items: Vec<T>,
    op: F,
) -> anyhow::Result<f64>
where
    T: Send + 'static,
    F: Fn(Arc<SqliteJournal>, T) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = Result<(), journal::JournalError>> + Send,
{
    let count = items.len().max(1) as f64;
    let start = writer_cpu();
    runtime.block_on(in_flight(journal, items, op))?;
    Ok((writer_cpu() - start) / count * 1e6)
}

/// The journal writer's CPU per item, in microseconds, while `write` runs on `items` in writer
/// jobs of `size`, [`IN_FLIGHT`] jobs at once.
fn writer_us_in_batches<T>(
    runtime: &tokio::runtime::Runtime,
    journal: &Arc<SqliteJournal>,
    items: Vec<T>,
    size: usize,
    write: fn(&rusqlite::Connection, &[T]) -> Result<(), rusqlite::Error>,
) -> anyhow::Result<f64>
where
    T: Clone + Send + 'static,
{
    let count = items.len().max(1) as f64;
    let batches: Vec<Vec<T>> = items.chunks(size).map(<[T]>::to_vec).collect();
    let start = writer_cpu();
    runtime.block_on(in_flight(
        journal,
        batches,
        move |journal, batch| async move { journal.write(move |conn| write(conn, &batch)).await },
    ))?;
    Ok((writer_cpu() - start) / count * 1e6)
}

/// Runs `op` over `items` with [`IN_FLIGHT`] at once.
async fn in_flight<T, F, Fut>(
    journal: &Arc<SqliteJournal>,
    items: Vec<T>,
    op: F,
) -> anyhow::Result<()>
where
    T: Send + 'static,
    F: Fn(Arc<SqliteJournal>, T) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = Result<(), journal::JournalError>> + Send,
{
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (journal, queue) = (journal.clone(), queue.clone());
        tasks.spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some(item) = next else {
                    return Ok::<_, journal::JournalError>(());
                };
                op(journal.clone(), item).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Measures the floor: `rounds` rounds of `events` events, medians per part; with `adapter`,
/// also the cost of evaluating that script on each event's envelope.
pub fn measure(
    work_dir: &Path,
    events: usize,
    body_bytes: usize,
    rounds: usize,
    adapter: Option<&Path>,
) -> anyhow::Result<Floor> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let adapter = adapter
        .map(|path| Adapter::load(path).map_err(|e| anyhow::anyhow!("{e}")))
        .transpose()?;
    let mut all = Vec::new();
    for _ in 0..rounds.max(1) {
        all.push(round(
            &runtime,
            work_dir,
            events,
            body_bytes,
            adapter.as_ref(),
        )?);
    }
    let pick = |f: fn(&Floor) -> f64| median(all.iter().map(f).collect());
    Ok(Floor {
        verify_us: pick(|f| f.verify_us),
        parse_us: pick(|f| f.parse_us),
        insert_us: pick(|f| f.insert_us),
        envelope_us: pick(|f| f.envelope_us),
        final_us: pick(|f| f.final_us),
        append_us: pick(|f| f.append_us),
        finish_us: pick(|f| f.finish_us),
        read_us: pick(|f| f.read_us),
        adapter_us: adapter
            .is_some()
            .then(|| pick(|f| f.adapter_us.unwrap_or_default())),
        history: History {
            append_us: pick(|f| f.history.append_us),
            append_receipt_us: pick(|f| f.history.append_receipt_us),
            finish_us: pick(|f| f.history.finish_us),
            finish_attempt_us: pick(|f| f.history.finish_attempt_us),
            append_wall_us: pick(|f| f.history.append_wall_us),
            append_receipt_wall_us: pick(|f| f.history.append_receipt_wall_us),
            finish_wall_us: pick(|f| f.history.finish_wall_us),
            finish_attempt_wall_us: pick(|f| f.history.finish_attempt_wall_us),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_measured_on_the_agents_own_code() {
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("pass.jsonata");
        std::fs::write(&adapter, r#"{"id": id, "subject": subject}"#).unwrap();
        let floor = measure(dir.path(), 300, 1024, 1, Some(&adapter)).unwrap();
        // Zero would mean a part was not measured (e.g. the writer thread not found by name).
        for (part, us) in [
            ("verify", floor.verify_us),
            ("parse", floor.parse_us),
            ("insert", floor.insert_us),
            ("append", floor.append_us),
            ("envelope", floor.envelope_us),
            ("final", floor.final_us),
            ("finish", floor.finish_us),
            ("read", floor.read_us),
            ("adapter", floor.adapter_us.unwrap_or_default()),
            ("history append", floor.history.append_us),
            (
                "history append with receipt",
                floor.history.append_receipt_us,
            ),
            ("history finish", floor.history.finish_us),
            (
                "history finish with attempt",
                floor.history.finish_attempt_us,
            ),
        ] {
            assert!(us > 0.0, "{part}: {us} µs");
        }
        let sum =
            floor.verify_us + floor.parse_us + floor.insert_us + floor.envelope_us + floor.final_us;
        assert!((floor.total_us() - sum).abs() < 1e-9);
        assert_eq!(
            measure(dir.path(), 100, 1024, 1, None).unwrap().adapter_us,
            None
        );
    }
}
