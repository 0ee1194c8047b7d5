//! The dispatcher: takes journaled events to their routes' adapters and sinks.
//!
//! - Events of one subject are applied strictly one after another, in the order they were
//!   received: an event waits until every earlier event of its subject is final. Different
//!   subjects proceed in parallel, at most `dispatch.max_parallel` events at a time.
//! - An event whose revision is lower than the highest revision applied for its subject is not
//!   applied: it becomes `superseded`.
//! - A route's adapter runs within its limits; `undefined` skips the route (`filtered`). A sink
//!   failure that may pass is retried with exponential backoff and full jitter (the subject
//!   waits); a permanent failure, or retries running out, makes the event a dead letter.
//! - Every state change is journaled, so a restart resumes where the agent stopped: routes that
//!   were applied stay applied, the others are tried again. Sinks write idempotently (same file
//!   name, same key), so an apply interrupted by a crash is not duplicated.
//! - On the SQLite journal the dispatcher is told of each event the journal commits. On the
//!   PostgreSQL journal, several agents share the events: this agent applies only the subjects
//!   of the partitions it holds a lease on, finds their events by passes over the backlog
//!   (woken by the journal's notifications), and stops applying a subject the moment its lease
//!   is gone; the agent that takes the partition over goes on from the journal's state.

pub mod routes;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EventLog;
use crate::journal::pg::PgJournal;
use crate::journal::{
    Announcement, Announcements, AppliedOutput, Attempt, Committed, DeliveryState, DeliveryUpdate,
    EventState, Finish, Journal, JournalError, Lease, Outcome, SqliteJournal, StoredEvent,
};
use crate::sink::{EventMeta, MAX_RETRY_AFTER, SinkError};
use routes::{Route, Routing};

/// Clears the intake flag when the intake task ends, however it ends.
struct IntakeGuard<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for IntakeGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One route's result in a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunOutput {
    pub route: String,
    pub sink: String,
    /// The adapter output; absent when the adapter returned `undefined` or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// True when the adapter returned `undefined` (the route would be skipped).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub filtered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// An event waiting in its subject's queue.
struct Queued {
    seq: i64,
    /// The event as the writer stored it, when it came straight from a commit, or as read ahead:
    /// its first pass then reads nothing back from the journal.
    fresh: Option<Box<StoredEvent>>,
    /// Queued without a fresh copy that the read-ahead may fill in: from the backlog found at
    /// start, or committed while the fresh copies held had no room (or others waited to be
    /// read ahead). Each event has at most one such entry.
    spilled: bool,
}

/// At most this many bytes of envelopes are held in the queues; events beyond that are read
/// ahead from the journal as room frees up (or, when the read-ahead cannot take them, read back
/// when their turn comes), so a long backlog costs disk reads, not memory.
const FRESH_BYTES_MAX: usize = 4 << 20;

/// Events queued without a fresh copy are read ahead this many at a time, in one read of the
/// journal, while the fresh copies held take less than half of the limit.
const READ_AHEAD_CHUNK: usize = 256;

/// A read-ahead chunk spans at most this many sequence numbers, so that a chunk with a gap of
/// events kept fresh in it does not read those again.
const READ_AHEAD_SPAN: i64 = 4 * READ_AHEAD_CHUNK as i64;

/// At most this many events wait in the subjects' queues. When the dispatcher falls further
/// behind, newly committed events are left in the journal and read from it in pages, in receive
/// order, as the queues drain: however long the backlog, the dispatcher holds a bounded number
/// of entries (and of tasks, one per subject queued), so its memory stays flat.
pub const QUEUED_MAX: usize = 4096;

/// The queues are topped up from the journal once they fall to this many events.
const QUEUED_LOW: usize = QUEUED_MAX / 2;

/// What one processing pass of an event came to.
enum Step {
    /// Final (or gone): take the next event of the subject.
    Done,
    /// Some route waits for a retry: try again at this instant of the monotonic clock.
    RetryAt(tokio::time::Instant),
    /// This agent does not hold the subject's lease (any more): the agent that does applies
    /// it, and this one drops the subject's queue.
    NotOurs,
}

/// Events read per page of a pass over the PostgreSQL backlog.
const PG_PAGE: usize = 512;

/// The dispatcher makes a pass over the PostgreSQL backlog at least this often, whether or not
/// it was told of new events (a notification is a hint).
const PG_PASS_EVERY: Duration = Duration::from_secs(1);

/// Passes over the PostgreSQL backlog are at least this far apart: under load every commit
/// wakes the dispatcher, and a pass per commit would read the waiting events again and again;
/// the events committed meanwhile are taken by the next pass together.
const PG_PASS_GAP: Duration = Duration::from_millis(20);

/// The dispatcher. Shared behind an `Arc`.
pub struct Dispatcher {
    journal: Arc<Journal>,
    partner: String,
    routing: RwLock<Arc<Routing>>,
    /// Subject → events waiting, head first. A subject has a worker task exactly while it has
    /// an entry here.
    queues: Mutex<HashMap<String, VecDeque<Queued>>>,
    /// Bytes of envelopes held by [`Queued::fresh`].
    fresh_bytes: AtomicUsize,
    /// The most bytes of fresh copies held ([`FRESH_BYTES_MAX`]).
    fresh_max: usize,
    /// Woken when the fresh copies held fall below half of `fresh_max`.
    fresh_room: Notify,
    /// Events in the subjects' queues (at most about [`QUEUED_MAX`]), and the most there were.
    queued: AtomicUsize,
    queued_peak: AtomicUsize,
    /// Woken when `queued` falls to [`QUEUED_LOW`].
    queue_room: Notify,
    /// Sequence numbers of spilled entries ([`Queued::spilled`]) not yet read ahead, in order.
    spills: Mutex<VecDeque<i64>>,
    /// Woken when `spills` gets entries.
    spill_wake: Notify,
    parallel: Arc<Semaphore>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Outcome>>>>,
    /// Set when status reports are configured; woken when one is queued.
    report_wake: Option<Arc<Notify>>,
    stop: CancellationToken,
    tracker: TaskTracker,
    /// Set while the task that takes newly committed events runs.
    intake_running: std::sync::atomic::AtomicBool,
    /// When each delivery waiting for a retry (event sequence number, route) is due, on the
    /// monotonic clock, so that a step of the wall clock neither delays nor hurries a retry.
    /// The journal's wall-clock due time is only read for a wait an earlier run began.
    retry_due: Mutex<HashMap<(i64, String), tokio::time::Instant>>,
    /// Which events get their `event final` info line (`log.events`), as [`EventLog`] `as u8`.
    event_log: AtomicU8,
    /// PostgreSQL: the sequence numbers in the queues, so that a pass over the backlog does not
    /// queue an event twice.
    known: Mutex<HashSet<i64>>,
}

/// Where the spilled entry of event `seq` waits in `subject`'s queue, if it is there, behind the
/// head, without a fresh copy.
fn waiting_entry(
    queues: &HashMap<String, VecDeque<Queued>>,
    subject: &str,
    seq: i64,
) -> Option<usize> {
    let queue = queues.get(subject)?;
    // A queue is in sequence order, but for a replayed event queued behind later ones; a
    // search that misses because of one leaves the event to be read when its turn comes.
    let index = queue.partition_point(|q| q.seq < seq);
    let entry = queue.get(index)?;
    (index > 0 && entry.spilled && entry.seq == seq && entry.fresh.is_none()).then_some(index)
}

/// What of a read-ahead chunk (ascending sequence numbers) waits for the next round when the
/// event `failed` found no room: it and the events after it, but not `failed` itself when
/// nothing of the chunk was `filled` (it does not fit into the room a round starts with).
fn unfilled_rest(chunk: &[i64], failed: i64, filled: bool) -> impl DoubleEndedIterator<Item = i64> {
    let from = chunk.partition_point(|seq| *seq < failed);
    chunk[from..]
        .iter()
        .copied()
        .filter(move |seq| filled || *seq != failed)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs a blocking journal read off the async threads.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, JournalError> + Send + 'static,
) -> Result<R, JournalError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(JournalError::Closed))
}

impl Dispatcher {
    /// A dispatcher over `journal` with the given routing.
    pub fn new(
        journal: Arc<Journal>,
        partner: String,
        routing: Routing,
        max_parallel: usize,
        report_wake: Option<Arc<Notify>>,
    ) -> Arc<Dispatcher> {
        Self::with_fresh_max(
            journal,
            partner,
            routing,
            max_parallel,
            report_wake,
            FRESH_BYTES_MAX,
        )
    }

    fn with_fresh_max(
        journal: Arc<Journal>,
        partner: String,
        routing: Routing,
        max_parallel: usize,
        report_wake: Option<Arc<Notify>>,
        fresh_max: usize,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            journal,
            partner,
            routing: RwLock::new(Arc::new(routing)),
            queues: Mutex::new(HashMap::new()),
            fresh_bytes: AtomicUsize::new(0),
            fresh_max,
            fresh_room: Notify::new(),
            queued: AtomicUsize::new(0),
            queued_peak: AtomicUsize::new(0),
            queue_room: Notify::new(),
            spills: Mutex::new(VecDeque::new()),
            spill_wake: Notify::new(),
            parallel: Arc::new(Semaphore::new(max_parallel.max(1))),
            waiters: Mutex::new(HashMap::new()),
            report_wake,
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            intake_running: std::sync::atomic::AtomicBool::new(false),
            retry_due: Mutex::new(HashMap::new()),
            event_log: AtomicU8::new(EventLog::All as u8),
            known: Mutex::new(HashSet::new()),
        })
    }

    /// Starts applying: first every event left unfinished by an earlier run, then each event the
    /// journal commits from now on.
    pub async fn start(self: &Arc<Self>) -> Result<(), JournalError> {
        let backlog = self.journal.backlog();
        if backlog > 0 {
            tracing::info!(events = backlog, "resuming events left unfinished");
        }
        self.intake_running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let this = self.clone();
        if let Some(pg) = self.journal.postgres().cloned() {
            self.tracker.spawn(async move {
                let _running = IntakeGuard(&this.intake_running);
                this.intake_pg(pg).await;
            });
            return Ok(());
        }
        let Some(sqlite) = self.journal.sqlite().cloned() else {
            return Ok(());
        };
        // Listen before reading the backlog, so no event falls between the two: the intake
        // reads the journal first (it starts behind) and drops the announcements of what it read.
        let rx = sqlite.listen();
        self.tracker.spawn(self.clone().read_ahead(sqlite.clone()));
        self.tracker.spawn(async move {
            let _running = IntakeGuard(&this.intake_running);
            this.intake(sqlite, rx).await;
        });
        Ok(())
    }

    /// Takes the events of the partitions this agent holds on the PostgreSQL journal into the
    /// queues: a pass over their backlog each time the journal says there may be new work (an
    /// event committed by any agent in one of them, a partition taken, notifications missed),
    /// at least once a second, and when the queues have room again after a pass that filled
    /// them. An event already queued is not queued again.
    ///
    /// Every pass starts from the backlog's lowest event. Agents' transactions commit out of
    /// sequence order, so an event can become visible after one with a higher sequence number
    /// was read; a pass that started after the highest number seen could then queue a
    /// subject's later event before its earlier one. A pass from the start sees, for each
    /// subject, every waiting event whose successor it sees (the hub sends a subject's next
    /// event only once the previous one was acknowledged, i.e. committed).
    async fn intake_pg(self: &Arc<Self>, pg: Arc<PgJournal>) {
        let work = pg.work().clone();
        loop {
            let parts = pg.lessee().applicable();
            let mut full = false;
            if !parts.is_empty() {
                let mut after = 0i64;
                loop {
                    let queued = self.queued.load(Ordering::Relaxed);
                    if queued >= QUEUED_MAX {
                        full = true;
                        break;
                    }
                    let room = (QUEUED_MAX - queued).min(PG_PAGE);
                    let page = match crate::journal::pg::claim::waiting(
                        pg.db(),
                        &parts,
                        after,
                        room as u32,
                    )
                    .await
                    {
                        Ok(page) => page,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read waiting events from the journal; trying again shortly");
                            break;
                        }
                    };
                    let complete = page.len() < room;
                    for waiting in page {
                        after = waiting.seq;
                        let new = self
                            .known
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(waiting.seq);
                        if new {
                            let queued = Queued {
                                seq: waiting.seq,
                                fresh: None,
                                spilled: false,
                            };
                            self.enqueue(queued, waiting.subject);
                        }
                    }
                    if complete {
                        break;
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = work.notified() => {}
                _ = self.queue_room.notified(), if full => {}
                _ = tokio::time::sleep(PG_PASS_EVERY) => {}
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(PG_PASS_GAP) => {}
            }
        }
    }

    /// Takes newly committed events into the queues while they have room ([`QUEUED_MAX`]).
    /// Once they are full the dispatcher is *behind*: announcements are dropped, the events stay
    /// in the journal only, and they are read from it in receive order, a page at a time, each
    /// time the queues fall to [`QUEUED_LOW`], until a page finds no more. `cursor` is the
    /// highest sequence number queued or read: an announcement at or below it was read from the
    /// journal already. The journal announces an event only after its commit, in commit order,
    /// so an event committed after the last page was read is announced afterwards and queued.
    async fn intake(self: &Arc<Self>, sqlite: Arc<SqliteJournal>, mut rx: Announcements) {
        let mut cursor = 0i64;
        let mut behind = true;
        loop {
            while behind && self.queued.load(Ordering::Relaxed) <= QUEUED_LOW {
                let room = QUEUED_MAX - self.queued.load(Ordering::Relaxed);
                let journal = sqlite.clone();
                let page = match blocking(move || journal.pending_after(cursor, room)).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read waiting events from the journal; trying again shortly");
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                };
                let complete = page.len() < room;
                if let Some((last, _)) = page.last() {
                    cursor = *last;
                }
                let seqs: Vec<i64> = page.iter().map(|(seq, _)| *seq).collect();
                for (seq, subject) in page {
                    let queued = Queued {
                        seq,
                        fresh: None,
                        spilled: true,
                    };
                    self.enqueue(queued, subject);
                }
                // Offered for reading ahead only once queued: the reader fills only the queue
                // entries it finds, and would pass over one not yet there for good.
                if !seqs.is_empty() {
                    self.spills
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(seqs);
                    self.spill_wake.notify_one();
                }
                if complete {
                    behind = false;
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.queue_room.notified(), if behind => {}
                event = rx.recv() => match event {
                    None => return,
                    // Events the journal could not announce (this task fell far behind them)
                    // are read from it like those beyond a full queue.
                    Some(Announcement::Missed) => behind = true,
                    Some(Announcement::Event(event)) if event.seq <= cursor || behind => {}
                    Some(Announcement::Event(_)) if self.queued.load(Ordering::Relaxed) >= QUEUED_MAX => behind = true,
                    Some(Announcement::Event(event)) => {
                        cursor = event.seq;
                        self.submit_committed(event);
                    }
                },
            }
        }
    }

    /// Events in the subjects' queues now, and the most there have been since the start.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.queued.load(Ordering::Relaxed),
            self.queued_peak.load(Ordering::Relaxed),
        )
    }

    /// True while the dispatcher takes newly committed events.
    pub fn is_running(&self) -> bool {
        self.intake_running
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets which events get their `event final` info line (`log.events`); a reload may change it.
    pub fn set_event_log(&self, events: EventLog) {
        self.event_log.store(events as u8, Ordering::Relaxed);
    }

    /// Whether an event that ended in `state` gets its info line.
    fn logs_final(&self, state: EventState) -> bool {
        let events = self.event_log.load(Ordering::Relaxed);
        if events == EventLog::All as u8 {
            true
        } else if events == EventLog::Failures as u8 {
            matches!(state, EventState::Failed | EventState::Parked)
        } else {
            false
        }
    }

    /// The routing in force.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the routing. Events being applied finish with the routing they started with.
    pub fn replace_routing(&self, routing: Routing) {
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
    }

    /// Queues an event behind the earlier events of its subject. On the PostgreSQL journal the
    /// next pass over the backlog finds it instead, if this agent holds its subject.
    pub fn submit(self: &Arc<Self>, seq: i64, subject: String) {
        if let Some(pg) = self.journal.postgres() {
            pg.work().notify_one();
            return;
        }
        let queued = Queued {
            seq,
            fresh: None,
            spilled: false,
        };
        self.enqueue(queued, subject);
    }

    /// Queues an event the journal has just committed, keeping its stored form while memory
    /// allows and no event waits to be read ahead (so that the copies held are those of the
    /// events whose turn comes first); else the read-ahead reads it later.
    fn submit_committed(self: &Arc<Self>, event: Committed) {
        let kept = self
            .spills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
            && self.reserve(event.event.envelope.len());
        let seq = event.seq;
        let queued = Queued {
            seq,
            fresh: kept.then_some(event.event),
            spilled: !kept,
        };
        self.enqueue(queued, event.subject);
        if !kept {
            // After the entry is queued, so that the read-ahead finds it.
            let mut spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
            if spills.is_empty() {
                self.spill_wake.notify_one();
            }
            spills.push_back(seq);
        }
    }

    fn enqueue(self: &Arc<Self>, queued: Queued, subject: String) {
        if self.stop.is_cancelled() {
            if let Some(fresh) = &queued.fresh {
                self.release(fresh);
            }
            return;
        }
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queued_now = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        self.queued_peak.fetch_max(queued_now, Ordering::Relaxed);
        match queues.get_mut(&subject) {
            Some(queue) => queue.push_back(queued),
            None => {
                queues.insert(subject.clone(), VecDeque::from([queued]));
                self.tracker.spawn(self.clone().run_subject(subject));
            }
        }
    }

    /// Stops counting a fresh copy taken out of the queues.
    fn release(&self, fresh: &StoredEvent) {
        let size = fresh.envelope.len();
        let held = self.fresh_bytes.fetch_sub(size, Ordering::Relaxed);
        let half = self.fresh_max / 2;
        if held >= half && held - size < half {
            self.fresh_room.notify_one();
        }
    }

    /// Counts `size` more bytes of fresh copies, if they fit.
    fn reserve(&self, size: usize) -> bool {
        self.fresh_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + size <= self.fresh_max).then_some(held + size)
            })
            .is_ok()
    }

    /// Reads spilled entries ([`Queued::spilled`]) ahead of their turn, [`READ_AHEAD_CHUNK`]
    /// events per read of the journal, into their fresh copies while those take less than half
    /// of the limit: one read for many events instead of one (with the page lookups it repeats)
    /// per event. Only events not yet tried (no delivery recorded) are read ahead; an entry at
    /// the head of its queue is left alone, since its pass may be under way and reads the
    /// journal itself. Runs until the dispatcher stops.
    async fn read_ahead(self: Arc<Self>, sqlite: Arc<SqliteJournal>) {
        loop {
            while self.fresh_bytes.load(Ordering::Relaxed) >= self.fresh_max / 2 {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = self.fresh_room.notified() => {}
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            let chunk: Vec<i64> = {
                let mut spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
                let first = spills.front().copied().unwrap_or_default();
                let n = spills
                    .iter()
                    .take(READ_AHEAD_CHUNK)
                    .take_while(|seq| **seq < first + READ_AHEAD_SPAN)
                    .count();
                spills.drain(..n).collect()
            };
            let (Some(&from), Some(&to)) = (chunk.first(), chunk.last()) else {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = self.spill_wake.notified() => {}
                }
                continue;
            };
            let journal = sqlite.clone();
            let events = match blocking(move || journal.untried_events(from, to)).await {
                Ok(events) => events,
                Err(e) => {
                    // Each event of the chunk is read when its turn comes instead.
                    tracing::debug!(error = %e, "reading events ahead failed");
                    continue;
                }
            };
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let mut filled = false;
            for event in events {
                // Gone already, under way, or not spilled: read when its turn comes.
                let Some(index) = waiting_entry(&queues, &event.subject, event.seq) else {
                    continue;
                };
                if !self.reserve(event.envelope.len()) {
                    // No room left: the rest of the chunk waits for the next round. An event
                    // that does not fit even into the room a round starts with is read when its
                    // turn comes, so that the next round does not stop at it again.
                    let mut spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
                    for seq in unfilled_rest(&chunk, event.seq, filled).rev() {
                        spills.push_front(seq);
                    }
                    break;
                }
                filled = true;
                if let Some(entry) = queues
                    .get_mut(&event.subject)
                    .and_then(|q| q.get_mut(index))
                {
                    entry.fresh = Some(Box::new(event));
                }
            }
        }
    }

    /// Registers interest in an event's final state (ack mode `applied`). Call before the event
    /// is appended, and [`Dispatcher::forget`] when no longer waiting.
    pub fn wait_for(&self, id: &str) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        rx
    }

    /// Drops waiters for `id` that nobody listens to any more.
    pub fn forget(&self, id: &str) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(id);
            }
        }
    }

    /// Routes an event and runs its adapters without applying anything (a dry run).
    pub async fn dry_run(
        &self,
        document: Value,
        event_type: &str,
        version: u64,
    ) -> Vec<DryRunOutput> {
        let routing = self.routing();
        let partner = self.partner.clone();
        let event_type = event_type.to_owned();
        tokio::task::spawn_blocking(move || {
            routing
                .matching(&event_type, version)
                .into_iter()
                .map(|route| {
                    let mut out = DryRunOutput {
                        route: route.name.clone(),
                        sink: route.sink_name.clone(),
                        output: None,
                        filtered: false,
                        error: None,
                    };
                    match route.adapter.evaluate(&document, &partner, &route.limits) {
                        Ok(Some(value)) => out.output = Some(value),
                        Ok(None) => out.filtered = true,
                        Err(e) => {
                            out.error = Some(json!({
                                "code": e.code,
                                "message": e.message,
                                "position": e.position,
                                "detail": e.render(&route.adapter.path.display().to_string(), route.adapter.source()),
                            }))
                        }
                    }
                    out
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Stops taking new events, lets events being applied finish within `grace`, and names the
    /// subjects still busy when it runs out.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            let busy: Vec<String> = self
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .take(20)
                .cloned()
                .collect();
            tracing::warn!(subjects = ?busy, "grace period over while events were being applied; they are resumed at the next start");
        }
    }

    async fn run_subject(self: Arc<Self>, subject: String) {
        loop {
            // The head's fresh copy is taken at once: a later pass of the same event (a retry)
            // reads the journal.
            let Some((seq, fresh)) = self
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&subject)
                .and_then(|q| q.front_mut())
                .map(|head| (head.seq, head.fresh.take()))
            else {
                return;
            };
            if let Some(event) = &fresh {
                self.release(event);
            }
            let step = {
                let permit = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    permit = self.parallel.clone().acquire_owned() => permit,
                };
                let Ok(permit) = permit else { return };
                if self.stop.is_cancelled() {
                    return;
                }
                // Boxed: a subject waiting for its turn (up to one task per subject queued)
                // holds only its place in the loop, not room for a whole pass.
                match Box::pin(self.process(seq, fresh, permit)).await {
                    Ok(step) => step,
                    Err(e) if e.is_lease_lost() => {
                        tracing::info!(seq, subject = %subject, error = %e, "this agent no longer holds the subject; the agent that does applies it");
                        Step::NotOurs
                    }
                    Err(e) => {
                        // The journal could not record progress (disk full, shutting down):
                        // nothing is lost, the event is tried again.
                        tracing::warn!(seq, error = %e, "could not record the progress of an event; trying again shortly");
                        Step::RetryAt(tokio::time::Instant::now() + Duration::from_secs(1))
                    }
                }
            };
            match step {
                Step::NotOurs => {
                    self.drop_queue(&subject);
                    return;
                }
                Step::Done => {
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(queue) = queues.get_mut(&subject) {
                        if let Some(head) = queue.pop_front() {
                            self.forget_known(&[head.seq]);
                            if self.queued.fetch_sub(1, Ordering::Relaxed) == QUEUED_LOW + 1 {
                                self.queue_room.notify_one();
                            }
                        }
                        if queue.is_empty() {
                            queues.remove(&subject);
                            return;
                        }
                    }
                }
                Step::RetryAt(at) => {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }

    /// Drops a subject's queue (its lease is another agent's now).
    fn drop_queue(&self, subject: &str) {
        let queue = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(subject);
        let Some(queue) = queue else { return };
        let seqs: Vec<i64> = queue.iter().map(|q| q.seq).collect();
        for entry in &queue {
            if let Some(fresh) = &entry.fresh {
                self.release(fresh);
            }
        }
        self.forget_known(&seqs);
        let before = self.queued.fetch_sub(queue.len(), Ordering::Relaxed);
        if before > QUEUED_LOW && before - queue.len() <= QUEUED_LOW {
            self.queue_room.notify_one();
        }
    }

    /// Forgets events that left the queues, so that a later pass may queue them again.
    fn forget_known(&self, seqs: &[i64]) {
        if self.journal.postgres().is_none() {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for seq in seqs {
            known.remove(seq);
        }
    }

    /// One pass over an event: applies every route that is due, then finishes the event when
    /// every route is final. `fresh` is the event as just committed, when this is its first pass.
    ///
    /// `permit`, one of `dispatch.max_parallel`, is given back once the routes are done, before
    /// their states are journaled: the commit (an fsync) takes longer than most applies, and
    /// another subject's event can be applied meanwhile. This event's subject still waits for
    /// the commit.
    async fn process(
        &self,
        seq: i64,
        fresh: Option<Box<StoredEvent>>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Step, JournalError> {
        let loaded = match fresh {
            // Just committed: nothing to read back but the subject's revision, if it has one.
            Some(event) => match event.revision {
                None => Some((*event, Vec::new(), None)),
                Some(_) => {
                    let revision = self.journal.applied_revision(event.subject.clone()).await?;
                    Some((*event, Vec::new(), revision))
                }
            },
            None => self.journal.dispatchable(seq).await?,
        };
        let Some((event, deliveries, applied_revision)) = loaded else {
            return Ok(Step::Done);
        };
        if event.state.is_final() {
            return Ok(Step::Done);
        }
        let Some(lease) = self.journal.lease(&event.subject) else {
            return Ok(Step::NotOurs);
        };
        let routing = self.routing();
        if let Some(revision) = event.revision
            && let Some(applied) = applied_revision
            && revision < applied
        {
            let reason = format!(
                "revision {revision} is lower than revision {applied} already applied for subject {:?}",
                event.subject
            );
            drop(permit);
            return self
                .finish(
                    &lease,
                    &event,
                    EventState::Superseded,
                    Some(reason),
                    0,
                    Vec::new(),
                )
                .await;
        }

        let routes = routing.matching(&event.event_type, event.version);
        if routes.is_empty() {
            let reason = format!(
                "no route matches type {:?} version {}: add a route for it, then replay the event",
                event.event_type, event.version
            );
            tracing::warn!(event_id = %event.id, "{reason}");
            drop(permit);
            return self
                .finish(
                    &lease,
                    &event,
                    EventState::Parked,
                    Some(reason),
                    0,
                    Vec::new(),
                )
                .await;
        }
        // Delivery states are written with the event's final state in one transaction, or on
        // their own when a route waits for a retry. A crash before that write applies the
        // routes again, which the sinks make idempotent.
        let mut updates: Vec<DeliveryUpdate> = Vec::with_capacity(routes.len());
        let mut retry_at: Option<tokio::time::Instant> = None;
        for route in &routes {
            let existing = deliveries.iter().find(|d| d.route == route.name);
            if let Some(d) = existing {
                if d.state != DeliveryState::Pending {
                    continue;
                }
                if let Some(due) = self.retry_pending(event.seq, route, d.next_attempt_ms) {
                    retry_at = Some(retry_at.map_or(due, |r| r.min(due)));
                    continue;
                }
            }
            // The lease by this agent's own clock, before each apply: an agent that could not
            // renew it stops before another agent may take the subject over.
            if !self.journal.holds(&lease) {
                return Ok(Step::NotOurs);
            }
            let attempts = existing.map_or(0, |d| d.attempts);
            let update = self.apply_route(&event, route, attempts).await;
            if update.next_attempt_ms.is_some() {
                // A retry whose backoff has already run out (a short backoff on a busy machine)
                // is due now: the event must wait for it, never go on to its final state.
                let due = self
                    .retry_pending(event.seq, route, update.next_attempt_ms)
                    .unwrap_or_else(tokio::time::Instant::now);
                retry_at = Some(retry_at.map_or(due, |r| r.min(due)));
            }
            let metrics = route.metrics();
            match update.state {
                DeliveryState::Applied => &metrics.applied,
                DeliveryState::Filtered => &metrics.filtered,
                DeliveryState::Pending => &metrics.retry,
                DeliveryState::Failed => &metrics.failed,
            }
            .increment(1);
            updates.push(update);
        }
        drop(permit);
        if let Some(at) = retry_at {
            self.journal.set_deliveries(&lease, updates).await?;
            return Ok(Step::RetryAt(at));
        }
        // Each matching route's state: this pass's, else what the journal holds.
        let current: Vec<(&str, DeliveryState, u32, Option<&str>)> = routes
            .iter()
            .filter_map(|route| {
                let name = route.name.as_str();
                updates
                    .iter()
                    .find(|u| u.route == name)
                    .map(|u| (name, u.state, u.attempts, u.last_error.as_deref()))
                    .or_else(|| {
                        deliveries
                            .iter()
                            .find(|d| d.route == name)
                            .map(|d| (name, d.state, d.attempts, d.last_error.as_deref()))
                    })
            })
            .collect();
        let failed: Vec<String> = current
            .iter()
            .filter(|(_, state, ..)| *state == DeliveryState::Failed)
            .map(|(route, _, _, error)| format!("route {route}: {}", error.unwrap_or("failed")))
            .collect();
        let (final_state, error) = if !failed.is_empty() {
            (EventState::Failed, Some(failed.join("; ")))
        } else if current
            .iter()
            .all(|(_, state, ..)| *state == DeliveryState::Filtered)
        {
            (EventState::Filtered, None)
        } else {
            (EventState::Applied, None)
        };
        let attempts = current.iter().map(|(_, _, a, _)| *a).max().unwrap_or(0);
        drop(current);
        self.finish(&lease, &event, final_state, error, attempts, updates)
            .await
    }

    /// When the retry of `route` for event `seq` is due, if it is not yet: by the monotonic
    /// clock when this run set the wait; else by `stored_ms`, the journal's wall-clock due time,
    /// waiting no longer than the longest wait the route can ask for (a due time further away
    /// means the wall clock was set back since). A delivery that is due is forgotten here.
    fn retry_pending(
        &self,
        seq: i64,
        route: &Route,
        stored_ms: Option<i64>,
    ) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let key = (seq, route.name.clone());
        let mut due_times = self.retry_due.lock().unwrap_or_else(|p| p.into_inner());
        let due = match due_times.get(&key) {
            Some(due) => *due,
            None => {
                let longest = Duration::from_millis(route.retry.max_ms).max(MAX_RETRY_AFTER);
                let remaining = u64::try_from(stored_ms? - now_ms()).unwrap_or(0);
                now + Duration::from_millis(remaining).min(longest)
            }
        };
        if due > now {
            due_times.insert(key, due);
            Some(due)
        } else {
            due_times.remove(&key);
            None
        }
    }

    /// Runs one route's adapter and sink; returns the delivery's new state with the attempt
    /// for the route's history (its time, duration, outcome, and the output a sink took).
    async fn apply_route(
        &self,
        event: &StoredEvent,
        route: &Route,
        attempts: u32,
    ) -> DeliveryUpdate {
        let started_at = crate::timestamp::now();
        let started = std::time::Instant::now();
        let (mut update, output) = self.run_route(event, route, attempts).await;
        let outcome = match update.state {
            DeliveryState::Pending | DeliveryState::Failed => DeliveryState::Failed,
            other => other,
        };
        update.attempt = Some(Attempt {
            started_at,
            duration_ms: started.elapsed().as_millis() as u64,
            outcome,
            error: update.last_error.clone(),
            output,
        });
        update
    }

    /// One attempt of [`Dispatcher::apply_route`]: the delivery's new state, and the output
    /// the sink took when it was applied.
    async fn run_route(
        &self,
        event: &StoredEvent,
        route: &Route,
        attempts: u32,
    ) -> (DeliveryUpdate, Option<AppliedOutput>) {
        let mut update = DeliveryUpdate {
            seq: event.seq,
            route: route.name.clone(),
            sink: route.sink_name.clone(),
            state: DeliveryState::Failed,
            attempts,
            next_attempt_ms: None,
            last_error: None,
            attempt: None,
        };
        let started = std::time::Instant::now();
        // The adapter reads the envelope as stored, JSON text, parsed straight into the
        // engine's form.
        let result = route.evaluate(&event.envelope, &self.partner).await;
        route
            .metrics()
            .adapter_eval_seconds
            .record(started.elapsed().as_secs_f64());
        let output = match result {
            Ok(Some(output)) => output,
            Ok(None) => {
                update.state = DeliveryState::Filtered;
                tracing::debug!(event_id = %event.id, route = %route.name, "adapter returned undefined: route skipped");
                return (update, None);
            }
            Err(e) => {
                let message = route.adapter.describe_failure(&e, &event.id);
                tracing::warn!(event_id = %event.id, route = %route.name, code = %e.code, "{message}");
                // The adapter's run was this delivery's attempt.
                update.attempts = attempts.saturating_add(1);
                update.last_error = Some(message);
                return (update, None);
            }
        };
        let meta = EventMeta {
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            version: event.version,
            subject: event.subject.clone(),
            revision: event.revision,
            source: event.source.clone(),
            route: route.name.clone(),
            partner: self.partner.clone(),
            received_at_ms: event.received_at_ms,
        };
        update.attempts = attempts.saturating_add(1);
        let started = std::time::Instant::now();
        let applied = route.sink.apply(&meta, &output).await;
        route
            .metrics()
            .sink_apply_seconds
            .record(started.elapsed().as_secs_f64());
        match applied {
            Ok(()) => {
                update.state = DeliveryState::Applied;
                // The event's own "event final" line says it at level info.
                tracing::debug!(event_id = %event.id, route = %route.name, sink = %route.sink_name, attempts = update.attempts, "applied");
                let text = serde_json::to_string(&output).unwrap_or_default();
                return (update, Some(AppliedOutput::new(text)));
            }
            Err(SinkError::Permanent(message)) => {
                tracing::warn!(event_id = %event.id, route = %route.name, sink = %route.sink_name, error = %message, "sink refused the output permanently: dead letter");
                update.last_error = Some(message);
            }
            Err(retryable) => {
                let (message, asked_wait) = retryable.into_message_and_wait();
                let retry = &route.retry;
                let age_secs = (now_ms() - event.received_at_ms).max(0) as u64 / 1000;
                let out_of_attempts =
                    retry.max_attempts != 0 && update.attempts >= retry.max_attempts;
                let too_old = retry.max_age_secs != 0 && age_secs >= retry.max_age_secs;
                if out_of_attempts || too_old {
                    let why = if out_of_attempts {
                        format!("gave up after {} attempts", update.attempts)
                    } else {
                        format!("gave up after {age_secs} s")
                    };
                    tracing::warn!(event_id = %event.id, route = %route.name, sink = %route.sink_name, error = %message, "{why}: dead letter");
                    update.last_error = Some(format!(
                        "{why}; last error: {}",
                        without_retry_promise(&message)
                    ));
                } else {
                    // A destination that said when to come back is not asked again before.
                    let delay = retry
                        .delay(update.attempts, rand::random::<f64>())
                        .max(asked_wait);
                    update.state = DeliveryState::Pending;
                    // The journal keeps the wall-clock time for a later run; this run waits on
                    // the monotonic clock.
                    update.next_attempt_ms = Some(now_ms() + delay.as_millis() as i64);
                    self.retry_due
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            (event.seq, route.name.clone()),
                            tokio::time::Instant::now() + delay,
                        );
                    tracing::info!(event_id = %event.id, route = %route.name, sink = %route.sink_name, attempts = update.attempts, retry_in_ms = delay.as_millis() as u64, error = %message, "apply failed; will retry");
                    update.last_error = Some(message);
                }
            }
        }
        (update, None)
    }

    /// Journals the final state, queues the status report, and answers waiting hubs.
    async fn finish(
        &self,
        lease: &Lease,
        event: &StoredEvent,
        final_state: EventState,
        error: Option<String>,
        attempts: u32,
        updates: Vec<DeliveryUpdate>,
    ) -> Result<Step, JournalError> {
        let subject_revision = match (final_state, event.revision) {
            (EventState::Applied | EventState::Filtered, Some(revision)) => {
                Some((event.subject.clone(), revision))
            }
            _ => None,
        };
        let report = self.report_wake.as_ref().map(|_| {
            let status = final_state.status_word().unwrap_or("failed");
            let at = crate::timestamp::now();
            let body = json!({
                "ack": event.id,
                "partner": self.partner,
                "status": status,
                "at": at,
                "attempts": attempts,
                "error": if status == "failed" { error.clone() } else { None },
            });
            (
                format!("{}:{status}:{}", event.id, now_ms()),
                body.to_string(),
            )
        });
        let has_report = report.is_some();
        {
            let mut due_times = self.retry_due.lock().unwrap_or_else(|p| p.into_inner());
            if !due_times.is_empty() {
                due_times.retain(|(seq, _), _| *seq != event.seq);
            }
        }
        self.journal
            .finish_with(
                lease,
                updates,
                Finish {
                    seq: event.seq,
                    state: final_state,
                    error: error.clone(),
                    subject_revision,
                    report,
                    event_id: event.id.clone(),
                },
            )
            .await?;
        metrics::counter!("ess_agent_events_final_total", "state" => final_state.as_str())
            .increment(1);
        // The one info line an event gets (unless `log.events` leaves it out): the rest of what
        // happened to it is at debug level, so that the log grows by one line per event.
        if self.logs_final(final_state) {
            tracing::info!(event_id = %event.id, state = final_state.as_str(), error = error.as_deref(), "event final");
        } else {
            tracing::debug!(event_id = %event.id, state = final_state.as_str(), error = error.as_deref(), "event final");
        }
        if has_report && let Some(wake) = &self.report_wake {
            wake.notify_one();
        }
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&event.id);
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(Outcome {
                state: final_state.to_owned(),
                error: error.clone(),
            });
        }
        Ok(Step::Done)
    }
}

/// A sink's message for a failure it expects to be retried, for when no retry follows: each
/// "; the request (upload, write…) will be retried" clause is cut, up to the next `;`.
fn without_retry_promise(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("; the ") {
        let clause_end = rest[at + 2..].find(';').map_or(rest.len(), |e| at + 2 + e);
        out.push_str(&rest[..at]);
        if !rest[at..clause_end].contains(" will be retried") {
            out.push_str(&rest[at..clause_end]);
        }
        rest = &rest[clause_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Adapter;
    use crate::journal::{Appended, JournalOptions, NewEvent, WireFormat};
    use crate::sink::Sink;

    #[test]
    fn a_final_failure_does_not_promise_a_retry() {
        assert_eq!(
            without_retry_promise(
                "https://p.example/x answered 503 Service Unavailable: busy; the request will be \
                 retried"
            ),
            "https://p.example/x answered 503 Service Unavailable: busy"
        );
        assert_eq!(
            without_retry_promise(
                "https://p.example/x did not answer within 2000 ms; the request will be retried \
                 (raise timeout_ms if the endpoint is just slow)"
            ),
            "https://p.example/x did not answer within 2000 ms"
        );
        assert_eq!(
            without_retry_promise("cannot connect; the upload will be retried; the host said no"),
            "cannot connect; the host said no"
        );
        assert_eq!(without_retry_promise("disk full"), "disk full");
    }

    /// Records what `field` takes from each event it is given.
    struct Recording {
        tx: tokio::sync::mpsc::UnboundedSender<String>,
        field: fn(&EventMeta) -> &str,
    }

    impl Recording {
        fn subjects(tx: tokio::sync::mpsc::UnboundedSender<String>) -> Arc<Recording> {
            Arc::new(Recording {
                tx,
                field: |e| &e.subject,
            })
        }

        fn ids(tx: tokio::sync::mpsc::UnboundedSender<String>) -> Arc<Recording> {
            Arc::new(Recording {
                tx,
                field: |e| &e.id,
            })
        }
    }

    #[async_trait::async_trait]
    impl Sink for Recording {
        async fn apply(&self, event: &EventMeta, _: &Value) -> Result<(), SinkError> {
            let _ = self.tx.send((self.field)(event).to_owned());
            Ok(())
        }
    }

    /// Waits until every event in the journal is final.
    async fn backlog_applied(journal: &Journal) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while journal.backlog() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the backlog is applied"
            );
            tokio::task::yield_now().await;
        }
    }

    fn new_event(id: &str, subject: &str) -> NewEvent {
        let envelope = json!({"id": id, "type": "rule.updated", "version": 1, "subject": subject});
        NewEvent {
            id: id.into(),
            event_type: "rule.updated".into(),
            version: 1,
            subject: subject.into(),
            revision: None,
            source: None,
            time: None,
            format: WireFormat::ChangeEvent,
            content_type: Some("application/json".into()),
            raw_body: bytes::Bytes::from(envelope.to_string()),
            envelope: envelope.to_string(),
            receipt: None,
        }
    }

    /// A drain with many subjects keeps one task per subject queued; each must hold little while
    /// it waits for its turn, not room for a whole pass (the journal's PostgreSQL calls alone
    /// took kilobytes), so that the memory of a drain does not grow with the subjects waiting.
    #[tokio::test]
    async fn a_subject_waiting_for_its_turn_holds_a_few_hundred_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        let routing = Routing {
            routes: Vec::new(),
            sinks: Default::default(),
        };
        let dispatcher = Dispatcher::new(journal.clone(), "acme".into(), routing, 1, None);
        let task = dispatcher.clone().run_subject("s".into());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 512, "a waiting subject's task takes {size} bytes");
        drop(task);
        journal.close();
    }

    /// Asks to be tried again in two seconds the first time, then takes the event.
    #[derive(Default)]
    struct BusyOnce {
        calls: AtomicUsize,
    }

    const BUSY_WAIT: Duration = Duration::from_secs(2);

    #[async_trait::async_trait]
    impl Sink for BusyOnce {
        async fn apply(&self, _: &EventMeta, _: &Value) -> Result<(), SinkError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(SinkError::RetryAfter("busy".into(), BUSY_WAIT))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_is_due_by_the_monotonic_clock_whatever_the_wall_clock_says() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        std::fs::write(dir.path().join("pass.jsonata"), "subject").unwrap();
        let adapter = Adapter::load(&dir.path().join("pass.jsonata")).unwrap();
        let sink = Arc::new(BusyOnce::default());
        let routing = Routing {
            routes: vec![Route::for_tests("r", adapter, sink.clone())],
            sinks: Default::default(),
        };
        let appended = journal.append(new_event("e-1", "s")).await.unwrap();
        assert_eq!(appended, Appended::Accepted);
        let started = std::time::Instant::now();
        let dispatcher = Dispatcher::new(journal.clone(), "acme".into(), routing, 1, None);
        dispatcher.start().await.unwrap();

        // Once the wait is recorded, the wall clock is "set back" an hour: the recorded due
        // time becomes an hour and two seconds away by the wall clock.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let recorded = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no retry was recorded"
            );
            let waiting = journal.deliveries(1).unwrap();
            if let Some(d) = waiting
                .into_iter()
                .find(|d| d.state == DeliveryState::Pending)
            {
                break d;
            }
            tokio::task::yield_now().await;
        };
        assert!(
            started.elapsed() < BUSY_WAIT,
            "the wall clock is moved before the retry is due"
        );
        let set_back = recorded.next_attempt_ms.unwrap() + 3_600_000;
        journal
            .set_deliveries(
                &Lease::default(),
                vec![DeliveryUpdate {
                    seq: 1,
                    route: "r".into(),
                    sink: "r".into(),
                    state: DeliveryState::Pending,
                    attempts: recorded.attempts,
                    next_attempt_ms: Some(set_back),
                    last_error: recorded.last_error,
                    attempt: None,
                }],
            )
            .await
            .unwrap();

        // The retry comes after the two seconds asked for, not an hour later.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.calls.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the retry waited for the wall clock"
            );
            tokio::task::yield_now().await;
        }
        assert!(started.elapsed() >= BUSY_WAIT, "the retry came early");
        backlog_applied(&journal).await;
        dispatcher.shutdown(Duration::from_secs(1)).await;
        journal.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_waiting_for_its_final_state_to_be_committed_lets_another_subject_apply() {
        let dir = tempfile::tempdir().unwrap();
        // Final states wait for company as long as the test runs: an event applied stays
        // uncommitted until something else is written.
        let options = JournalOptions {
            finish_linger: Duration::from_secs(600),
            finish_gap: Duration::from_secs(600),
            retention: None,
            ..JournalOptions::default()
        };
        let journal = Journal::open(dir.path(), options).unwrap();
        std::fs::write(dir.path().join("pass.jsonata"), "subject").unwrap();
        let adapter = Adapter::load(&dir.path().join("pass.jsonata")).unwrap();
        let (applied, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let route = Route::for_tests("r", adapter, Recording::subjects(applied));
        let routing = Routing {
            routes: vec![route],
            sinks: Default::default(),
        };
        for (id, subject) in [("a-1", "a"), ("b-1", "b")] {
            let appended = journal.append(new_event(id, subject)).await.unwrap();
            assert_eq!(appended, Appended::Accepted);
        }
        // One event applied at a time; both are in the backlog when it starts, and nothing
        // is written after, so the first event's final state stays uncommitted.
        let dispatcher = Dispatcher::new(journal.clone(), "acme".into(), routing, 1, None);
        dispatcher.start().await.unwrap();
        let mut subjects = Vec::new();
        for _ in 0..2 {
            let next = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
            subjects.push(next.expect("the other subject's event is applied").unwrap());
        }
        subjects.sort();
        assert_eq!(subjects, ["a", "b"]);
        assert_eq!(journal.backlog(), 2, "neither final state is committed yet");
        dispatcher.shutdown(Duration::from_secs(1)).await;
        journal.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backlog_is_read_ahead_except_events_already_tried_which_keep_their_applied_routes()
    {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        std::fs::write(dir.path().join("pass.jsonata"), "subject").unwrap();
        let adapter = || Adapter::load(&dir.path().join("pass.jsonata")).unwrap();
        let (first_tx, mut first) = tokio::sync::mpsc::unbounded_channel();
        let (second_tx, mut second) = tokio::sync::mpsc::unbounded_channel();
        let routing = Routing {
            routes: vec![
                Route::for_tests("first", adapter(), Recording::ids(first_tx)),
                Route::for_tests("second", adapter(), Recording::ids(second_tx)),
            ],
            sinks: Default::default(),
        };
        // Sequence numbers 1 to 5, in this order.
        let ids = [
            ("a-1", "a"),
            ("b-1", "b"),
            ("a-2", "a"),
            ("b-2", "b"),
            ("a-3", "a"),
        ];
        for (id, subject) in ids {
            let appended = journal.append(new_event(id, subject)).await.unwrap();
            assert_eq!(appended, Appended::Accepted);
        }
        // a-2 was tried by an earlier run: its first route was applied, its second waits.
        let tried = |route: &str, state: DeliveryState| DeliveryUpdate {
            seq: 3,
            route: route.into(),
            sink: route.into(),
            state,
            attempts: 1,
            next_attempt_ms: Some(0),
            last_error: None,
            attempt: None,
        };
        journal
            .set_deliveries(
                &Lease::default(),
                vec![
                    tried("first", DeliveryState::Applied),
                    tried("second", DeliveryState::Pending),
                ],
            )
            .await
            .unwrap();

        // Nothing is applied while the test holds the one parallel slot.
        let dispatcher = Dispatcher::new(journal.clone(), "acme".into(), routing, 1, None);
        let slot = dispatcher.parallel.clone().acquire_owned().await.unwrap();
        dispatcher.start().await.unwrap();
        let fresh = |dispatcher: &Dispatcher| -> Vec<(i64, bool)> {
            let queues = dispatcher.queues.lock().unwrap();
            let mut entries: Vec<(i64, bool)> = queues
                .values()
                .flat_map(|q| q.iter().map(|e| (e.seq, e.fresh.is_some())))
                .collect();
            entries.sort();
            entries
        };
        // The heads (a-1, b-1) may be under way and read themselves; a-2 was tried.
        let expected = vec![(1, false), (2, false), (3, false), (4, true), (5, true)];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fresh(&dispatcher) != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "the backlog is read ahead: {:?}",
                fresh(&dispatcher)
            );
            tokio::task::yield_now().await;
        }

        drop(slot);
        let received = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, n: usize| {
            let mut ids = Vec::new();
            for _ in 0..n {
                ids.push(rx.try_recv().ok());
            }
            ids
        };
        backlog_applied(&journal).await;
        let mut first_ids: Vec<String> = received(&mut first, 5).into_iter().flatten().collect();
        let mut second_ids: Vec<String> = received(&mut second, 6).into_iter().flatten().collect();
        // Each subject's events in order.
        let order = |ids: &[String], subject: &str| -> Vec<String> {
            ids.iter()
                .filter(|id| id.starts_with(subject))
                .cloned()
                .collect()
        };
        assert_eq!(
            order(&first_ids, "a"),
            ["a-1", "a-3"],
            "a-2's applied route is not applied again"
        );
        assert_eq!(order(&second_ids, "a"), ["a-1", "a-2", "a-3"]);
        assert_eq!(order(&second_ids, "b"), ["b-1", "b-2"]);
        first_ids.sort();
        second_ids.sort();
        assert_eq!(first_ids, ["a-1", "a-3", "b-1", "b-2"]);
        assert_eq!(second_ids, ["a-1", "a-2", "a-3", "b-1", "b-2"]);
        dispatcher.shutdown(Duration::from_secs(1)).await;
        journal.close();
    }

    #[test]
    fn a_chunk_s_unfilled_rest_waits_but_an_event_too_large_for_a_fresh_round_does_not() {
        let chunk = [3, 5, 8, 13];
        let rest = |failed, filled| unfilled_rest(&chunk, failed, filled).collect::<Vec<_>>();
        assert_eq!(rest(8, true), [8, 13]);
        assert_eq!(rest(3, true), [3, 5, 8, 13]);
        // Nothing filled: the event that failed would fail the next round the same way.
        assert_eq!(rest(3, false), [5, 8, 13]);
        assert_eq!(rest(13, false), Vec::<i64>::new());
    }

    /// Applies an event only when the test lets it: one permit of `gate` per apply.
    struct Gated {
        gate: Arc<Semaphore>,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
    }

    #[async_trait::async_trait]
    impl Sink for Gated {
        async fn apply(&self, event: &EventMeta, _: &Value) -> Result<(), SinkError> {
            self.gate.acquire().await.unwrap().forget();
            let _ = self.tx.send(event.id.clone());
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_committed_while_the_fresh_copies_are_full_are_read_ahead_as_room_frees() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        std::fs::write(dir.path().join("pass.jsonata"), "subject").unwrap();
        let adapter = Adapter::load(&dir.path().join("pass.jsonata")).unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let (tx, mut applied) = tokio::sync::mpsc::unbounded_channel();
        let sink = Arc::new(Gated {
            gate: gate.clone(),
            tx,
        });
        let routing = Routing {
            routes: vec![Route::for_tests("r", adapter, sink)],
            sinks: Default::default(),
        };
        // Room for the fresh copies of four events; one event applied at a time.
        let size = new_event("e-01", "a").envelope.len();
        let dispatcher =
            Dispatcher::with_fresh_max(journal.clone(), "acme".into(), routing, 1, None, 4 * size);
        dispatcher.start().await.unwrap();
        // (seq, at the head of its queue, has a fresh copy) of every queued entry.
        type Entry = (i64, bool, bool);
        let entries = |dispatcher: &Dispatcher| -> Vec<Entry> {
            let queues = dispatcher.queues.lock().unwrap();
            let mut entries: Vec<Entry> = queues
                .values()
                .flat_map(|q| {
                    q.iter()
                        .enumerate()
                        .map(|(i, e)| (e.seq, i == 0, e.fresh.is_some()))
                })
                .collect();
            entries.sort();
            entries
        };
        let wait_until = async |what: &str, done: &dyn Fn(&[Entry]) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done(&entries(&dispatcher)) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: {:?}",
                    entries(&dispatcher)
                );
                tokio::task::yield_now().await;
            }
        };
        // Twelve events of three subjects. The first of each subject takes its copy at once (it
        // is the head of its queue); the next four are kept; the rest find no room.
        let subjects = ["a", "b", "c"];
        for n in 1..=12 {
            let id = format!("e-{n:02}");
            let event = new_event(&id, subjects[(n - 1) % 3]);
            assert_eq!(journal.append(event).await.unwrap(), Appended::Accepted);
            let seq = n as i64;
            wait_until("the event is queued", &|e| {
                e.iter()
                    .any(|&(s, head, fresh)| s == seq && (!head || !fresh))
            })
            .await;
        }
        let kept: Vec<i64> = entries(&dispatcher)
            .iter()
            .filter(|(_, head, fresh)| !head && *fresh)
            .map(|(seq, ..)| *seq)
            .collect();
        assert_eq!(kept, [4, 5, 6, 7], "copies are kept while there is room");

        // Once the first three are applied, the next of each subject (4, 5, 6) is the head of
        // its queue and has taken its copy: one is left (7), under half the room, so the events
        // that found none are read ahead, while they wait behind their heads, until the room is
        // full again (8, 9, 10); the rest (11, 12) wait for more room.
        gate.add_permits(3);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(applied.recv().await.unwrap());
        }
        assert_eq!(ids, ["e-01", "e-02", "e-03"]);
        wait_until("events are read ahead as room frees up", &|e| {
            let fresh: Vec<i64> = e
                .iter()
                .filter(|(_, head, fresh)| !head && *fresh)
                .map(|(seq, ..)| *seq)
                .collect();
            fresh == [7, 8, 9, 10]
        })
        .await;

        // Every event is applied once, each subject's in order, and no copy is left counted.
        gate.add_permits(100);
        backlog_applied(&journal).await;
        while let Ok(id) = applied.try_recv() {
            ids.push(id);
        }
        assert_eq!(dispatcher.fresh_bytes.load(Ordering::Relaxed), 0);
        dispatcher.shutdown(Duration::from_secs(1)).await;
        journal.close();
        for (i, subject) in subjects.iter().enumerate() {
            let expected: Vec<String> = (1..=12usize)
                .filter(|n| (n - 1) % 3 == i)
                .map(|n| format!("e-{n:02}"))
                .collect();
            let got: Vec<&String> = ids.iter().filter(|id| expected.contains(id)).collect();
            assert_eq!(
                got,
                expected.iter().collect::<Vec<_>>(),
                "subject {subject}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_the_journal_could_not_announce_are_read_from_it_and_applied_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Room for one unread announcement: a commit of many events overflows it.
        let options = JournalOptions {
            announced_max: 1,
            ..JournalOptions::default()
        };
        let journal = Journal::open(dir.path(), options).unwrap();
        std::fs::write(dir.path().join("pass.jsonata"), "subject").unwrap();
        let adapter = Adapter::load(&dir.path().join("pass.jsonata")).unwrap();
        let (tx, mut applied) = tokio::sync::mpsc::unbounded_channel();
        let routing = Routing {
            routes: vec![Route::for_tests("r", adapter, Recording::ids(tx))],
            sinks: Default::default(),
        };
        let dispatcher = Dispatcher::new(journal.clone(), "acme".into(), routing, 4, None);
        dispatcher.start().await.unwrap();
        // Bursts of concurrent appends share commits, announced back to back.
        let subjects = ["a", "b", "c", "d"];
        for burst in 0..5 {
            let appends: Vec<_> = (0..64)
                .map(|n| {
                    let journal = journal.clone();
                    let id = format!("e-{:04}", burst * 64 + n);
                    let subject = subjects[n % 4];
                    tokio::spawn(async move { journal.append(new_event(&id, subject)).await })
                })
                .collect();
            for append in appends {
                assert_eq!(append.await.unwrap().unwrap(), Appended::Accepted);
            }
        }
        backlog_applied(&journal).await;
        dispatcher.shutdown(Duration::from_secs(1)).await;
        let mut ids = Vec::new();
        while let Ok(id) = applied.try_recv() {
            ids.push(id);
        }
        assert_eq!(ids.len(), 320, "every event applied once");
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), 320, "no event applied twice");
        // Within a subject, events apply in the order they were committed.
        for subject in 0..4 {
            let seqs: Vec<i64> = ids
                .iter()
                .filter(|id| id[2..].parse::<usize>().unwrap() % 4 == subject)
                .map(|id| journal.get_detail(id).unwrap().unwrap().seq)
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "subject {subject} applied out of order: {seqs:?}"
            );
        }
        journal.close();
    }

    /// Fails its first `failures` calls with a retryable error, then takes the event.
    struct FailsFirst {
        failures: usize,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Sink for FailsFirst {
        async fn apply(&self, _: &EventMeta, _: &Value) -> Result<(), SinkError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                Err(SinkError::Retryable("down".into()))
            } else {
                Ok(())
            }
        }
    }

    /// With no backoff, every retry is due the moment its failure is recorded: the event must
    /// still wait for each retry, and become applied only once the sink took it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_due_at_once_is_made_before_the_event_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        std::fs::write(dir.path().join("pass.jsonata"), "subject").unwrap();
        let adapter = Adapter::load(&dir.path().join("pass.jsonata")).unwrap();
        let sink = Arc::new(FailsFirst {
            failures: 3,
            calls: AtomicUsize::new(0),
        });
        let mut route = Route::for_tests("r", adapter, sink.clone());
        route.retry = crate::settings::RetryConfig {
            initial_ms: 0,
            max_ms: 0,
            max_attempts: 0,
            max_age_secs: 0,
        };
        let routing = Routing {
            routes: vec![route],
            sinks: Default::default(),
        };
        let appended = journal.append(new_event("e-1", "s")).await.unwrap();
        assert_eq!(appended, Appended::Accepted);
        let dispatcher = Dispatcher::new(journal.clone(), "acme".into(), routing, 1, None);
        dispatcher.start().await.unwrap();
        backlog_applied(&journal).await;
        dispatcher.shutdown(Duration::from_secs(1)).await;
        let event = journal.get("e-1").unwrap().expect("the event is stored");
        assert_eq!(event.state, EventState::Applied);
        assert_eq!(
            sink.calls.load(Ordering::SeqCst),
            4,
            "three failures, then the apply"
        );
        let deliveries = journal.deliveries(1).unwrap();
        assert_eq!(deliveries.len(), 1);
        assert_eq!(deliveries[0].state, DeliveryState::Applied);
        assert_eq!(deliveries[0].attempts, 4);
        journal.close();
    }
}
