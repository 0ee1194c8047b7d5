//! `ess-bench`: the benchmark of the receive path.
//!
//! `ess-bench accept --agent target/release/ess-agent` measures, in one invocation and with the
//! same load generator, targets that run as separate processes:
//!
//! 1. a bare hyper server (this binary re-executed as the hidden `bare-server` subcommand) built
//!    with the agent's own connection builder ([`ess_agent::ingress::http_builder`]) and runtime
//!    settings, which reads each body and answers 202 with a small JSON body without doing
//!    anything else: the ceiling HTTP alone allows on this machine;
//! 2. the durable limit (`durable-server`): the same server, but each body is appended to one
//!    file and answered only once the fdatasync covering it has returned, the bodies that arrive
//!    meanwhile sharing the next one (group commit): what any receiver that acknowledges only
//!    what is on disk must at least pay on this disk;
//! 3. the real agent (`ess-agent run`) on plain HTTP on loopback, with its journal in a temporary
//!    directory on the normal disk, which authenticates, validates and journals (fsync'd) every
//!    event before it answers 202. Its dispatcher runs as always: by default one route sends
//!    every event to an adapter that returns `undefined`, so each event is also loaded, run
//!    through the adapter and finished as `filtered`, without sink I/O (`--apply`).
//!
//! Each is driven by C keep-alive HTTP/1.1 connections for T seconds, each connection sending
//! one signed Change Event with a unique id at a time (closed loop). Then, once the agent's
//! dispatcher has caught up, the agent and the durable limit are driven at half the rate the
//! agent reached, paced open-loop at a fixed rate spread over the C connections, to compare
//! their latency at half load. Last, per entry of [`E2E_SINKS`], a fresh agent whose route
//! reshapes every event and writes it into that sink takes a full-load pass, timed from its
//! first request until its last event is applied: the end-to-end rate, its CPU per applied
//! event and its peak RSS, beside the durable limit's and the bare server's rates of the same
//! run. Everything runs a fixed number of times (`--runs`), and the summary reports the median
//! of each figure, with the CPU the targets, the load generator and everything else on the
//! machine used, and what the agent's own metrics say about its journal and dispatcher.
//!
//! `ess-bench backlog` ([`backlog`]) measures the agent's RSS while it drains a backlog put
//! straight into its journal.
//!
//! `ess-bench journals` ([`journals`]) measures one agent on its SQLite journal against one,
//! two and three agents sharing a PostgreSQL journal, the load spread over the agents.
//!
//! After the runs, `accept` measures the floor (`ess-bench floor`, [`floor`]): the CPU per event
//! of the parts every accepted event needs, each alone on one thread, and sets it beside the CPU
//! per event that the target ratio to the bare server leaves the agent on this machine.
//!
//! Traffic goes only to 127.0.0.1; every phase is bounded in time and every child process is
//! stopped before the benchmark exits.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use backlog::BacklogArgs;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ess_agent::protocol::auth::WebhookSigner;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

mod backlog;
mod floor;
mod journals;

/// The HMAC secret both targets are given (a throwaway development secret).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// How long a target may take to start and print its ready line: the agent reads its whole
/// journal once before it is ready (the quick check), which for the 4 GiB of a 1,000,000-event
/// backlog on a busy disk takes more than a minute.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one request may take before it counts as an error and its connection is replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent gets to shut down gracefully before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent's dispatcher may take to finish the events of a full-load pass.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The `type` of every event sent.
const EVENT_TYPE: &str = "bench.rule.updated";
/// How long the idle agent is left alone after its ready line before its RSS is read.
const SETTLE: Duration = Duration::from_secs(1);
/// The clock ticks per second of `/proc/<pid>/stat` (USER_HZ, fixed at 100 in the Linux ABI).
const USER_HZ: f64 = 100.0;

/// The targets this benchmark checks.
const TARGET_RATIO: f64 = 0.70;
const TARGET_HALF_P99_MS: f64 = 3.0;
const TARGET_IDLE_RSS_MIB: f64 = 20.0;
const TARGET_PEAK_RSS_MIB: f64 = 80.0;
/// The agent's CPU per event applied into the file sink, in microseconds.
const TARGET_E2E_CPU_US: f64 = 150.0;
/// The agent's p99 at half load over the durable limit's at the same rate.
const TARGET_HALF_P99_TO_DURABLE: f64 = 2.0;

/// Set by SIGINT/SIGTERM: load phases stop early and the benchmark cleans up and exits.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Benchmarks of ess-agent's receive path.
#[derive(Debug, Parser)]
#[command(name = "ess-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Durable-accept throughput and latency of `ess-agent run`, against a bare hyper server.
    Accept(AcceptArgs),
    /// The floor under the agent's CPU per event alone (`accept` measures it after its runs).
    Floor(FloorArgs),
    /// RSS of `ess-agent run` while it drains a backlog put straight into its journal.
    Backlog(BacklogArgs),
    /// One agent on SQLite against one, two and three agents sharing a PostgreSQL journal:
    /// durable accept and end to end into the file sink.
    Journals(journals::JournalsArgs),
    /// The bare hyper server `accept` compares against (started by `accept` itself).
    #[command(hide = true)]
    BareServer(BareArgs),
    /// The durable-limit server `accept` compares against (started by `accept` itself).
    #[command(hide = true)]
    DurableServer(DurableArgs),
}

#[derive(Debug, clap::Args)]
struct AcceptArgs {
    /// The ess-agent binary to measure.
    #[arg(long)]
    agent: PathBuf,
    /// Concurrent keep-alive HTTP/1.1 connections.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// Seconds each measured phase lasts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    seconds: u64,
    /// Size of each event body in bytes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..=1_000_000))]
    body_bytes: u32,
    /// Seconds of unrecorded load before each full-load phase.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_seconds: u64,
    /// How many times the whole bare/agent/half-load sequence runs; figures are medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    runs: u32,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    client_threads: u32,
    /// Where the agent's temporary state directory is created (default: the system temp
    /// directory). It must be on the disk you mean to measure, not a tmpfs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How event ids are made: `uuid` (random UUIDv4 text, each insert lands on a random page of
    /// the id index) or `ordered` (increasing, each insert appends to the index).
    #[arg(long, value_enum, default_value_t = IdScheme::Uuid)]
    ids: IdScheme,
    /// What the agent does with the events after journaling them (it always dispatches them).
    #[arg(long, value_enum, default_value_t = Apply::Filter)]
    apply: Apply,
    /// Repeat a run (at most `--runs` times in all) when other processes used more than this
    /// many CPUs during any of its phases. On a shared machine their load distorts the figures.
    #[arg(long)]
    max_other_cpu: Option<f64>,
    /// Events per round of the floor measurement (the parts of the work every event needs,
    /// each alone on one thread; three rounds after the runs); 0 skips it.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    floor_events: u32,
    /// Another ess-agent binary (an earlier build) whose end-to-end passes run right after each
    /// of `--agent`'s, in the same run, so that the two compare under the same machine state.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// Run the load generator's threads at real-time priority (SCHED_FIFO, with `chrt`; needs
    /// root), so that on a machine with few CPUs its own scheduling delays do not count as the
    /// target's latency. The targets keep the normal policy.
    #[arg(long)]
    generator_fifo: bool,
    /// Print the summary as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the agent's dispatcher does with each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Apply {
    /// A route whose adapter returns `undefined`: each event is loaded, run through the adapter
    /// and finished as `filtered`, with no sink I/O. The cheapest apply a routed event gets.
    Filter,
    /// No routes: each event is parked as a dead letter (with a warning log line each).
    Park,
    /// A route whose adapter reshapes the event and a file sink that writes it as
    /// `<out>/<id>.json` (temporary file, fsync, rename, directory fsync). The end-to-end phase
    /// always uses this one.
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IdScheme {
    Uuid,
    Ordered,
}

#[derive(Debug, clap::Args)]
struct FloorArgs {
    /// Events per round.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
    events: u32,
    /// Rounds; each part's figure is the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=15))]
    rounds: u32,
    /// Size of each event body in bytes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..=1_000_000))]
    body_bytes: u32,
    /// Where the journals are created (default: the system temp directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also measure evaluating this adapter script on each event's envelope.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Print the figures as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct BareArgs {
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
}

#[derive(Debug, clap::Args)]
struct DurableArgs {
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
    /// The file every request body is appended to.
    #[arg(long)]
    file: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Accept(args) => accept(&args),
        Cmd::Floor(args) => floor::measure(
            &args.work_dir.unwrap_or_else(std::env::temp_dir),
            args.events as usize,
            args.body_bytes as usize,
            args.rounds as usize,
            args.adapter.as_deref(),
        )
        .map(|f| {
            if args.json {
                println!("{}", f.to_json());
            } else {
                f.print(args.events as usize, args.rounds as usize);
            }
        }),
        Cmd::Backlog(args) => backlog::measure(&args),
        Cmd::Journals(args) => journals::measure(&args),
        Cmd::BareServer(args) => serve(args.max_seconds, None),
        Cmd::DurableServer(args) => durable_server(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ess-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bare server.

/// A request body for the durable server's sync thread, and where to say whether it is on disk.
type Durable = std::sync::mpsc::Sender<(Bytes, tokio::sync::oneshot::Sender<bool>)>;

/// The durable limit: appends each request body (and a newline) to one file and answers 202
/// only once an fdatasync that covers it has returned; the bodies that arrive while one
/// fdatasync runs share the next (group commit). What any receiver that keeps its promise of
/// "no 2xx before the event is on disk" must at least pay, on this disk.
fn durable_server(args: &DurableArgs) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let (tx, rx) = std::sync::mpsc::channel::<(Bytes, tokio::sync::oneshot::Sender<bool>)>();
    std::thread::Builder::new()
        .name("group-sync".into())
        .spawn(move || group_sync(file, rx))?;
    serve(args.max_seconds, Some(tx))
}

/// Writes every body waiting, then one fdatasync for all of them, then answers them all.
fn group_sync(
    mut file: std::fs::File,
    rx: std::sync::mpsc::Receiver<(Bytes, tokio::sync::oneshot::Sender<bool>)>,
) {
    let mut waiting = Vec::new();
    let mut batch = Vec::with_capacity(1 << 20);
    while let Ok(first) = rx.recv() {
        waiting.push(first);
        waiting.extend(rx.try_iter());
        batch.clear();
        for (body, _) in &waiting {
            batch.extend_from_slice(body);
            batch.push(b'\n');
        }
        let ok = file
            .write_all(&batch)
            .and_then(|()| file.sync_data())
            .is_ok();
        for (_, reply) in waiting.drain(..) {
            let _ = reply.send(ok);
        }
    }
}

/// Serves every request on 127.0.0.1:0 with the agent's connection builder and runtime
/// settings: reads the body and answers 202 with a small JSON body, at once (the bare server)
/// or once `durable`'s sync thread has the body on disk. Prints a ready line like the agent's,
/// and exits when its stdin closes (the benchmark ended) or after `max_seconds`.
fn serve(max_seconds: u64, durable: Option<Durable>) -> anyhow::Result<()> {
    let max = Duration::from_secs(max_seconds);
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        // Blocks until the parent closes our stdin or dies.
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    std::thread::spawn(move || {
        std::thread::sleep(max);
        std::process::exit(0);
    });
    // The same runtime the agent builds in `ess-agent run`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bare-server")
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        eprintln!(
            "{}",
            json!({"message": "ready", "ingress": addr.to_string()})
        );
        // The agent's default header read timeout.
        let builder = ess_agent::ingress::http_builder(Duration::from_secs(10));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            let durable = durable.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let durable = durable.clone();
                    async move {
                        // Read the body as the agent must (bounded like the agent's default limit).
                        let body = Limited::new(req.into_body(), 1024 * 1024)
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let synced = match durable {
                            None => true,
                            Some(durable) => {
                                let (reply, done) = tokio::sync::oneshot::channel();
                                durable.send((body, reply)).is_ok() && done.await.unwrap_or(false)
                            }
                        };
                        let mut response = Response::new(Full::new(Bytes::from_static(
                            br#"{"ack":"bare","status":"accepted"}"#,
                        )));
                        *response.status_mut() = if synced {
                            StatusCode::ACCEPTED
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        response.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A target process: killed (and reaped) when dropped.
struct Target {
    child: Child,
    addr: SocketAddr,
    /// The agent's admin listener, from its ready line.
    admin: Option<SocketAddr>,
    /// The warnings and errors it logged after its ready line.
    log: Arc<std::sync::Mutex<LogTally>>,
}

/// How many of a target's log lines after its ready line were warnings and errors, and the
/// first of them: what went wrong under load, in the target's own words.
#[derive(Debug, Default, Clone)]
struct LogTally {
    warnings: u64,
    errors: u64,
    /// The first [`LogTally::KEEP`] warning and error lines, as logged.
    first: Vec<String>,
}

impl LogTally {
    const KEEP: usize = 10;

    /// Counts one log line (the agent's JSON format; other lines count as neither).
    fn count(&mut self, line: &str) {
        let warning = line.contains(r#""level":"WARN""#);
        let error = line.contains(r#""level":"ERROR""#);
        if warning {
            self.warnings += 1;
        }
        if error {
            self.errors += 1;
        }
        if (warning || error) && self.first.len() < Self::KEEP {
            self.first.push(line.trim_end().to_owned());
        }
    }
}

impl Target {
    /// Starts `command` with stderr piped, waits for its JSON ready line, and keeps draining its
    /// stderr (to nowhere) afterwards so it never blocks on a full pipe.
    fn start(mut command: Command, what: &str) -> anyhow::Result<Target> {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start the {what}"))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        type Ready = Result<(SocketAddr, Option<SocketAddr>), String>;
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let log = Arc::new(std::sync::Mutex::new(LogTally::default()));
        let tally = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            let mut seen = Vec::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = ready_tx.send(Err(seen.join("")));
                        return;
                    }
                    Ok(_) => {}
                }
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if value["message"] == "ready" {
                    let addr = value["ingress"].as_str().and_then(|a| a.parse().ok());
                    let admin = value["admin"].as_str().and_then(|a| a.parse().ok());
                    let _ = ready_tx.send(addr.map(|a| (a, admin)).ok_or_else(|| line.clone()));
                    break;
                }
                if seen.len() < 50 {
                    seen.push(line.clone());
                }
            }
            // Drain the rest (one access log line per request), keeping only the warnings and
            // errors.
            // Bytes, not text: a line that is not UTF-8 must not stop the draining, or the
            // target would block on a full pipe.
            let mut bytes = Vec::new();
            loop {
                bytes.clear();
                match reader.read_until(b'\n', &mut bytes) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => tally
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .count(&String::from_utf8_lossy(&bytes)),
                }
            }
        });
        let (addr, admin) = match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(log)) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {what} exited or printed a bad ready line; its output:\n{log}");
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {what} did not become ready within {START_TIMEOUT:?}");
            }
        };
        Ok(Target {
            child,
            addr,
            admin,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The warnings and errors it logged so far after its ready line.
    fn log(&self) -> LogTally {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// SIGTERM, then waits for a graceful exit (killing it after [`STOP_TIMEOUT`]).
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() && !INTERRUPTED.load(Ordering::Relaxed) {
                    eprintln!("ess-bench: note: the target exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the target did not stop within {STOP_TIMEOUT:?}; it was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("ess-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`, in bytes.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The bytes a process has written so far: through write calls (`wchar` of
/// `/proc/<pid>/io`) and to the storage layer (`write_bytes`).
fn written_bytes(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("wchar")?, field("write_bytes")?))
}

/// User plus system CPU time a process has used so far, in seconds (all its threads).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are the 12th and 13th after ')'.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Busy CPU time of the whole machine so far (all CPUs, everything but idle and iowait), in
/// seconds.
fn machine_busy_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy / USER_HZ)
}

/// The file system type and device of the mount holding `path`.
fn mount_of(path: &Path) -> (String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let mut parts = line.split_whitespace();
        let (Some(device), Some(mount_point), Some(fs_type)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mount_point = mount_point.replace("\\040", " ");
        if path.starts_with(&mount_point) && best.as_ref().is_none_or(|b| mount_point.len() >= b.0)
        {
            best = Some((mount_point.len(), fs_type.to_owned(), device.to_owned()));
        }
    }
    best.map(|(_, t, d)| (t, d))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

/// Times `fdatasync` after 4 KiB writes in `dir`: the floor under every durable commit.
/// Returns the median and the 99th percentile in microseconds.
fn fsync_probe(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        file.write_all(&block)?;
        let start = Instant::now();
        file.sync_data()?;
        times.push(start.elapsed().as_micros() as u64);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort_unstable();
    Ok((percentile(&times, 0.50), percentile(&times, 0.99)))
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// What one load phase does.
struct Load {
    /// The targets: connection `c` goes to `addrs[c % addrs.len()]` (round robin).
    addrs: Vec<SocketAddr>,
    connections: usize,
    duration: Duration,
    /// `None`: closed loop, each connection sends its next request as soon as the previous one
    /// is answered. `Some(rate)`: open loop at `rate` requests per second over all connections.
    rate: Option<f64>,
    body_bytes: usize,
    /// Added to every event's revision (each connection's requests count up from it): a phase
    /// that follows another on the same subjects starts above the revisions the first one
    /// applied, so that its events are applied rather than superseded.
    revision_base: u64,
    ids: IdScheme,
    /// Makes ordered event ids unique across phases.
    tag: String,
    /// The next ordered id.
    counter: AtomicU64,
    signer: WebhookSigner,
}

/// What one phase measured.
#[derive(Debug, Default)]
struct PhaseResult {
    /// 2xx answers.
    ok: u64,
    /// Answers with any other status, by status.
    other: BTreeMap<u16, u64>,
    /// Requests that failed without an answer (connection errors, timeouts).
    errors: u64,
    first_error: Option<String>,
    /// Paced phases: requests that could not start on time because their connection was still
    /// waiting for the previous answer.
    late: u64,
    elapsed: Duration,
    /// Latency of each 2xx answer in microseconds, sorted.
    latencies_us: Vec<u64>,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn non_2xx(&self) -> u64 {
        self.other.values().sum()
    }
    fn ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// The nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One connection's part of a phase.
#[derive(Default)]
struct ConnResult {
    ok: u64,
    other: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    late: u64,
    latencies_us: Vec<u64>,
}

/// Builds a Change Event body of exactly `size` bytes (when `size` allows) with a fixed-width id.
fn event_body(id: &str, subject: &str, seq: u64, size: usize) -> String {
    let mut body = String::with_capacity(size + 64);
    let _ = write!(
        body,
        r#"{{"id":"{id}","version":1,"type":"{EVENT_TYPE}","subject":"{subject}","revision":{seq},"payload":{{"rule":{{"name":"bench rule {seq:010}","enabled":true,"priority":5,"tags":["bench","accept","durable"],"limits":{{"rate":100,"burst":20}}}},"note":""#
    );
    let tail = r#""}}"#;
    let pad = size.saturating_sub(body.len() + tail.len());
    body.extend(
        b"abcdefghijklmnopqrstuvwxyz0123456789"
            .iter()
            .cycle()
            .take(pad)
            .map(|&b| b as char),
    );
    body.push_str(tail);
    body
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A version 4 (random) UUID in its text form, from 128 random bits.
fn uuid_v4(random: u128) -> String {
    let v = random & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Builds the next signed request of connection `conn`.
fn signed_request(load: &Load, host: &HeaderValue, conn: usize, seq: u64) -> Request<Full<Bytes>> {
    let id = match load.ids {
        IdScheme::Uuid => uuid_v4(rand::random()),
        IdScheme::Ordered => format!(
            "{}-{:012}",
            load.tag,
            load.counter.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let subject = format!("bench-subject-{conn:04}");
    let body = event_body(&id, &subject, load.revision_base + seq, load.body_bytes);
    let timestamp = unix_now();
    let signature = load.signer.sign(&id, timestamp, body.as_bytes());
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static("/v1/events");
    let headers = request.headers_mut();
    headers.insert(header::HOST, host.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let value = |s: String| HeaderValue::try_from(s).expect("ASCII header value");
    headers.insert("webhook-id", value(id));
    headers.insert("webhook-timestamp", value(timestamp.to_string()));
    headers.insert("webhook-signature", value(signature));
    request
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Reads the agent's Prometheus metrics: each sample's name with its labels, and its value.
async fn scrape(admin: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut sender = connect(admin).await?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = http::Uri::from_static("/metrics");
    request
        .headers_mut()
        .insert(header::HOST, HeaderValue::try_from(admin.to_string())?);
    let response = tokio::time::timeout(REQUEST_TIMEOUT, async {
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        anyhow::Ok(response.into_body().collect().await?.to_bytes())
    })
    .await
    .context("the metrics request timed out")??;
    let text = String::from_utf8_lossy(&response);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// What the agent's own metrics say about a phase.
#[derive(Debug, Clone, Default)]
struct Internals {
    /// Journal commits (fsyncs) per second.
    commits_per_sec: f64,
    /// Writer operations (appends and the dispatcher's state changes) per commit.
    ops_per_commit: f64,
    /// Mean time of one commit, from BEGIN to COMMIT's return (on SQLite the log's flush is
    /// the flusher thread's, below).
    commit_ms: f64,
    /// Flushes of the SQLite journal's log per second, their mean time, and those that took
    /// longer than 2.5 ms.
    flushes_per_sec: f64,
    flush_ms: f64,
    slow_flushes: f64,
    /// Events that reached a final state per second (the dispatcher's pace).
    finished_per_sec: f64,
    /// Events received and not yet final at the end of the phase.
    backlog_end: f64,
    /// Commits that took longer than 2.5 ms.
    slow_commits: f64,
    /// Share of requests the agent took longer than 2.5 ms and 5 ms to answer, by its own
    /// clock (the load generator's figures include its own scheduling).
    slow_requests: (f64, f64),
    /// Times the writer finished a checkpoint so that the write-ahead log started over.
    wal_restarts: f64,
    /// Mean time of one such checkpoint.
    wal_restart_ms: f64,
    /// Mean log frames (pages) one such checkpoint copied.
    wal_restart_frames: f64,
    /// The 99th percentile of the agent's request times by its own histogram: the upper bound
    /// of the bucket it falls in, in milliseconds.
    p99_ms: f64,
}

impl Internals {
    fn between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, secs: f64) -> Self {
        let delta = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
        let finished: f64 = after
            .keys()
            .filter(|k| k.starts_with("ess_agent_events_final_total"))
            .map(|k| delta(k))
            .sum();
        let commits = delta("ess_agent_journal_batch_size_count");
        let flushes = delta("ess_agent_journal_flush_seconds_count");
        let wal_restarts = delta("ess_agent_journal_wal_restart_seconds_count");
        let requests = delta("ess_agent_request_seconds_count").max(1.0);
        let over = |le: &str| {
            1.0 - delta(&format!("ess_agent_request_seconds_bucket{{le=\"{le}\"}}")) / requests
        };
        Internals {
            commits_per_sec: commits / secs,
            ops_per_commit: delta("ess_agent_journal_batch_size_sum") / commits.max(1.0),
            commit_ms: delta("ess_agent_journal_commit_seconds_sum") * 1000.0 / commits.max(1.0),
            flushes_per_sec: flushes / secs,
            flush_ms: delta("ess_agent_journal_flush_seconds_sum") * 1000.0 / flushes.max(1.0),
            slow_flushes: flushes - delta("ess_agent_journal_flush_seconds_bucket{le=\"0.0025\"}"),
            finished_per_sec: finished / secs,
            backlog_end: after.get("ess_agent_backlog").copied().unwrap_or(0.0),
            slow_commits: delta("ess_agent_journal_commit_seconds_count")
                - delta("ess_agent_journal_commit_seconds_bucket{le=\"0.0025\"}"),
            slow_requests: (over("0.0025"), over("0.005")),
            wal_restarts,
            wal_restart_ms: delta("ess_agent_journal_wal_restart_seconds_sum") * 1000.0
                / wal_restarts.max(1.0),
            wal_restart_frames: delta("ess_agent_journal_wal_restart_frames_total")
                / wal_restarts.max(1.0),
            p99_ms: histogram_quantile(before, after, "ess_agent_request_seconds", 0.99) * 1000.0,
        }
    }

    /// The progress-line suffix.
    fn brief(&self) -> String {
        format!(
            "\n        agent: {:.0} commits/s, {:.1} ops/commit, {:.3} ms/commit, {:.0} events \
             finished/s, {:.0} left to apply\n        journal: {:.0} commits over 2.5 ms; {:.0} flushes/s of \
             {:.3} ms, {:.0} over 2.5 ms; {:.0} log \
             restarts of {:.1} ms and {:.0} frames on average; requests over 2.5 ms {:.2} %, over 5 \
             ms {:.2} %, p99 <= {:.1} ms (agent's clock)",
            self.commits_per_sec,
            self.ops_per_commit,
            self.commit_ms,
            self.finished_per_sec,
            self.backlog_end,
            self.slow_commits,
            self.flushes_per_sec,
            self.flush_ms,
            self.slow_flushes,
            self.wal_restarts,
            self.wal_restart_ms,
            self.wal_restart_frames,
            self.slow_requests.0 * 100.0,
            self.slow_requests.1 * 100.0,
            self.p99_ms
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "commits_per_sec": round(self.commits_per_sec, 1),
            "ops_per_commit": round(self.ops_per_commit, 2),
            "commit_ms": round(self.commit_ms, 3),
            "finished_per_sec": round(self.finished_per_sec, 1),
            "backlog_end": self.backlog_end,
            "slow_commits": self.slow_commits,
            "flushes_per_sec": round(self.flushes_per_sec, 1),
            "flush_ms": round(self.flush_ms, 3),
            "slow_flushes": self.slow_flushes,
            "wal_restarts": self.wal_restarts,
            "wal_restart_ms": round(self.wal_restart_ms, 2),
            "wal_restart_frames": round(self.wal_restart_frames, 1),
            "requests_over_2_5_ms": round(self.slow_requests.0, 4),
            "requests_over_5_ms": round(self.slow_requests.1, 4),
            "p99_ms_own_histogram": self.p99_ms,
        })
    }
}

/// The upper bound of the bucket that holds quantile `q` of histogram `name`'s observations
/// between two scrapes (infinite when it is past the last bucket, 0 without observations).
fn histogram_quantile(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    name: &str,
    q: f64,
) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(key, value)| {
            let le = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value - before.get(key).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return 0.0;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::INFINITY, |b| b.0)
}

/// Sends one request and reads the whole answer.
async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<StatusCode> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}

async fn run_connection(load: Arc<Load>, conn: usize, start: Instant, end: Instant) -> ConnResult {
    let mut result = ConnResult::default();
    let Some(&addr) = load.addrs.get(conn % load.addrs.len().max(1)) else {
        return result;
    };
    let host = HeaderValue::try_from(addr.to_string()).expect("address is ASCII");
    // Paced: connection `conn` sends at start + (conn + k * connections) / rate.
    let interval = load
        .rate
        .map(|rate| Duration::from_secs_f64(load.connections as f64 / rate));
    let mut next_slot = load
        .rate
        .map(|rate| start + Duration::from_secs_f64(conn as f64 / rate));
    let mut sender: Option<Sender> = None;
    let mut seq = 0u64;
    while !INTERRUPTED.load(Ordering::Relaxed) {
        if let Some(slot) = next_slot
            && slot >= end
        {
            break;
        }
        if next_slot.is_none() && Instant::now() >= end {
            break;
        }
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    result.errors += 1;
                    result.first_error.get_or_insert_with(|| format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let request = signed_request(&load, &host, conn, seq);
        seq += 1;
        let sent_at = match (next_slot.as_mut(), interval) {
            (Some(slot), Some(interval)) => {
                let scheduled = *slot;
                *slot += interval;
                if Instant::now() < scheduled {
                    // The connection was free at its slot: timer lateness (tokio's timer has a
                    // 1 ms resolution) is the generator's, so latency counts from the real send.
                    tokio::time::sleep_until(scheduled.into()).await;
                    Instant::now()
                } else {
                    // Still busy with the previous answer at the slot: the wait is queueing the
                    // target caused, so it counts (no coordinated omission).
                    result.late += 1;
                    scheduled
                }
            }
            _ => Instant::now(),
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut s, request)).await {
            Ok(Ok(status)) => {
                if status.is_success() {
                    result.ok += 1;
                    result
                        .latencies_us
                        .push(sent_at.elapsed().as_micros() as u64);
                } else {
                    *result.other.entry(status.as_u16()).or_default() += 1;
                }
                sender = Some(s);
            }
            Ok(Err(e)) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                result.errors += 1;
                result
                    .first_error
                    .get_or_insert_with(|| "request timed out".into());
            }
        }
    }
    result
}

/// Runs one phase on the load generator's runtime.
async fn run_load(load: Load) -> PhaseResult {
    let load = Arc::new(load);
    let start = Instant::now();
    let end = start + load.duration;
    let tasks: Vec<_> = (0..load.connections)
        .map(|conn| tokio::spawn(run_connection(load.clone(), conn, start, end)))
        .collect();
    let mut phase = PhaseResult::default();
    for task in tasks {
        let Ok(conn) = task.await else {
            phase.errors += 1;
            continue;
        };
        phase.ok += conn.ok;
        for (status, n) in conn.other {
            *phase.other.entry(status).or_default() += n;
        }
        phase.errors += conn.errors;
        if phase.first_error.is_none() {
            phase.first_error = conn.first_error;
        }
        phase.late += conn.late;
        phase.latencies_us.extend(conn.latencies_us);
    }
    phase.elapsed = start.elapsed();
    phase.latencies_us.sort_unstable();
    phase
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

/// The figures of one target in one run.
#[derive(Debug, Clone, Default)]
struct Figures {
    rate: f64,
    /// 2xx answers in the phase.
    ok: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    non_2xx: u64,
    errors: u64,
    /// CPU the target used during the phase, in cores (1.0 = one core busy all the time).
    server_cpu: f64,
    /// CPU this benchmark process (the load generator) used during the phase, in cores.
    client_cpu: f64,
    /// CPU the database server used during the phase, in cores (phases with a PostgreSQL
    /// journal; 0 otherwise).
    db_cpu: f64,
    /// CPU everything else on the machine used during the phase, in cores: noise.
    other_cpu: f64,
    /// What the targets wrote per 2xx answer, in bytes: through write calls of any kind
    /// (`wchar`: journal, log, database pages and the answers on the sockets alike), and to
    /// the storage layer (`write_bytes`: page-granular, counted as pages are dirtied).
    written_per_ok: f64,
    disk_per_ok: f64,
    late_fraction: f64,
    /// The agent's own view of the phase (not for the bare server).
    internals: Option<Internals>,
}

impl Figures {
    /// One progress line.
    fn brief(&self) -> String {
        format!(
            "{:>8.0} 2xx/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  CPU server {:.2} \
             generator {:.2} other {:.2}  written {:.1} KiB/2xx (disk {:.1})",
            self.rate,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.server_cpu,
            self.client_cpu,
            self.other_cpu,
            self.written_per_ok / 1024.0,
            self.disk_per_ok / 1024.0
        ) + &(if self.db_cpu > 0.0 {
            format!(" PostgreSQL {:.2}", self.db_cpu)
        } else {
            String::new()
        }) + &self
            .internals
            .as_ref()
            .map_or(String::new(), Internals::brief)
    }

    fn to_json(&self) -> Value {
        json!({
            "accepted_per_sec": round(self.rate, 1),
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
            "non_2xx": self.non_2xx, "errors": self.errors,
            "server_cpu_cores": round(self.server_cpu, 2),
            "client_cpu_cores": round(self.client_cpu, 2),
            "db_cpu_cores": round(self.db_cpu, 2),
            "other_cpu_cores": round(self.other_cpu, 2),
            "written_bytes_per_2xx": round(self.written_per_ok, 0),
            "disk_bytes_per_2xx": round(self.disk_per_ok, 0),
            "late_fraction": round(self.late_fraction, 4),
            "agent_metrics": self.internals.as_ref().map(Internals::to_json),
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Default)]
struct Run {
    bare: Figures,
    bare_idle_rss: u64,
    bare_peak_rss: u64,
    /// The durable-limit server at full load, and at `half_rate`.
    durable: Figures,
    durable_idle_rss: u64,
    durable_peak_rss: u64,
    durable_half: Figures,
    agent: Figures,
    agent_idle_rss: u64,
    agent_peak_rss: u64,
    half_rate: f64,
    half: Figures,
    /// Seconds the agent's dispatcher took after the full-load pass to finish every event.
    drain_secs: f64,
    /// End to end: a fresh agent per entry of [`E2E_SINKS`], applying every event into that
    /// sink at full load.
    e2e: Vec<E2e>,
    /// The file floor ([`file_floor`]): CPU per file, in microseconds.
    file_floor_us: f64,
}

/// One end-to-end pass.
#[derive(Debug, Clone, Default)]
struct E2e {
    figures: Figures,
    /// Events applied per second, from the start of the pass until the last of its events was
    /// applied.
    applied_rate: f64,
    /// Events the pass applied.
    applied: u64,
    /// Events that agent applied in all (warm-up included), and the records found in the
    /// sink's directory after: a file each, or a line each of an `.ndjson` file (append mode).
    /// The two agree unless an event was lost or written twice.
    applied_all: u64,
    files: u64,
    /// The agent's CPU per event applied, from the first request of the pass until its last
    /// event was applied, in microseconds.
    cpu_us: f64,
    /// The agent's peak RSS.
    peak_rss: u64,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.agent.rate / self.bare.rate.max(1e-9)
    }

    /// The accept-only rate as a fraction of the durable limit's.
    fn durable_ratio(&self) -> f64 {
        self.agent.rate / self.durable.rate.max(1e-9)
    }
}

impl E2e {
    /// Applied per second as a fraction of `rate` (the bare server's, the durable limit's, the
    /// accept-only rate).
    fn of(&self, rate: f64) -> f64 {
        self.applied_rate / rate.max(1e-9)
    }

    fn to_json(&self, run_or_median: (f64, f64, f64)) -> Value {
        let (bare, durable, accept) = run_or_median;
        json!({
            "load": self.figures.to_json(),
            "applied_per_sec": round(self.applied_rate, 1),
            "applied": self.applied,
            "applied_with_warmup": self.applied_all,
            "files": self.files,
            "cpu_us_per_applied": round(self.cpu_us, 1),
            "peak_rss_mib": round(mib(self.peak_rss), 1),
            "of_bare": round(self.of(bare), 3),
            "of_durable": round(self.of(durable), 3),
            "of_accept_only": round(self.of(accept), 3),
        })
    }
}

/// The end-to-end phases: a name, the sink's TOML (`{out}` stands for the sink's directory,
/// quoted) and the target for its applied rate as a fraction of the durable limit's. Each gets a
/// fresh agent whose route reshapes every event into that sink. Another sink mode is one more
/// line.
const E2E_SINKS: &[(&str, &str, f64)] = &[
    (
        "file {id}.json",
        "type = \"file\"\ndir = {out}\nname = \"{id}.json\"",
        0.3,
    ),
    (
        "file append",
        "type = \"file\"\ndir = {out}\nname = \"events-{date}.ndjson\"\nmode = \"append\"",
        0.5,
    ),
];

/// Events that ended `applied`, from the agent's metrics.
fn applied_total(metrics: &BTreeMap<String, f64>) -> f64 {
    metrics
        .get("ess_agent_events_final_total{state=\"applied\"}")
        .copied()
        .unwrap_or(0.0)
}

/// Starts `ess-agent run` on `config`, logging JSON at level info.
fn start_agent(agent_bin: &Path, config: &Path) -> anyhow::Result<Target> {
    let mut command = Command::new(agent_bin);
    command
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("ESS_AGENT_LOG", "info")
        .stdin(Stdio::null());
    Target::start(command, "agent")
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs a phase against `target`, measuring its CPU use and ours, and the agent's own metrics
/// when it has an admin listener.
fn measure(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    load: Load,
) -> anyhow::Result<Figures> {
    measure_on(runtime, &[target], None, load)
}

/// The agents' metrics added up, one map: counters and histograms are summed, and the gauges
/// every agent of a shared journal reports alike (the backlog) or that are peaks take the
/// largest value.
fn scrape_all(
    runtime: &tokio::runtime::Runtime,
    targets: &[&Target],
) -> anyhow::Result<Option<BTreeMap<String, f64>>> {
    let mut all: Option<BTreeMap<String, f64>> = None;
    for admin in targets.iter().filter_map(|t| t.admin) {
        let metrics = runtime
            .block_on(scrape(admin))
            .with_context(|| format!("cannot read the metrics of the agent at {admin}"))?;
        let sum = all.get_or_insert_with(BTreeMap::new);
        for (name, value) in metrics {
            let name = without_agent_label(&name);
            let entry = sum.entry(name.clone()).or_insert(0.0);
            if name == "ess_agent_backlog" || name.ends_with("_peak") {
                *entry = entry.max(value);
            } else {
                *entry += value;
            }
        }
    }
    Ok(all)
}

/// A sample's name without its `agent` label: on a shared PostgreSQL journal every agent labels
/// its samples with its own id, and the samples of several agents add up under one name.
fn without_agent_label(name: &str) -> String {
    let Some((metric, labels)) = name.strip_suffix('}').and_then(|rest| rest.split_once('{'))
    else {
        return name.to_owned();
    };
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|label| !label.starts_with("agent="))
        .collect();
    if kept.is_empty() {
        metric.to_owned()
    } else {
        format!("{metric}{{{}}}", kept.join(","))
    }
}

/// CPU time used so far by the PostgreSQL server whose postmaster is `postmaster` and by its
/// processes (backends, WAL writer, checkpointer), in seconds.
fn db_cpu_seconds(postmaster: u32) -> f64 {
    let parent = postmaster.to_string();
    let children: f64 = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
                .filter(|pid| parent_pid(pid).as_deref() == Some(parent.as_str()))
                .filter_map(|pid| cpu_seconds(&pid))
                .sum()
        })
        .unwrap_or(0.0);
    children + cpu_seconds(&parent).unwrap_or(0.0)
}

/// The parent process id of `pid`, from `/proc/<pid>/stat`.
fn parent_pid(pid: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    // After ')': the state, then the parent's pid.
    rest.split_whitespace().nth(1).map(str::to_owned)
}

/// Runs a phase against `targets` (the load spreads its connections over `load.addrs`),
/// measuring their CPU use (added up), ours, the database server's when `db` names its
/// postmaster, and the agents' own metrics (added up) when they have admin listeners.
fn measure_on(
    runtime: &tokio::runtime::Runtime,
    targets: &[&Target],
    db: Option<u32>,
    load: Load,
) -> anyhow::Result<Figures> {
    let pids: Vec<String> = targets.iter().map(|t| t.pid().to_string()).collect();
    let servers_cpu = || -> f64 { pids.iter().filter_map(|p| cpu_seconds(p)).sum() };
    let servers_written = || -> (u64, u64) {
        pids.iter()
            .filter_map(|p| written_bytes(p))
            .fold((0, 0), |(w, d), (pw, pd)| (w + pw, d + pd))
    };
    let metrics_before = scrape_all(runtime, targets)?;
    let written_before = servers_written();
    let server_before = servers_cpu();
    let db_before = db.map_or(0.0, db_cpu_seconds);
    let client_before = cpu_seconds("self").unwrap_or(0.0);
    let machine_before = machine_busy_seconds().unwrap_or(0.0);
    let limit = load.duration + REQUEST_TIMEOUT + Duration::from_secs(10);
    let phase = runtime
        .block_on(async { tokio::time::timeout(limit, run_load(load)).await })
        .context("a load phase overran its time limit")?;
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let secs = phase.elapsed.as_secs_f64();
    let server_cpu = (servers_cpu() - server_before) / secs;
    let written_after = servers_written();
    let db_cpu = (db.map_or(0.0, db_cpu_seconds) - db_before).max(0.0) / secs;
    let client_cpu = (cpu_seconds("self").unwrap_or(0.0) - client_before) / secs;
    let machine = (machine_busy_seconds().unwrap_or(0.0) - machine_before) / secs;
    let other_cpu = (machine - server_cpu - client_cpu - db_cpu).max(0.0);
    if other_cpu > 0.25 {
        eprintln!(
            "ess-bench: warning: other processes used {other_cpu:.2} CPUs during this phase; \
             its figures are disturbed"
        );
    }
    if phase.ok == 0 {
        bail!(
            "no request succeeded (other answers: {:?}, errors: {}, first error: {})",
            phase.other,
            phase.errors,
            phase.first_error.as_deref().unwrap_or("none")
        );
    }
    if phase.non_2xx() > 0 || phase.errors > 0 {
        eprintln!(
            "ess-bench: warning: {} non-2xx answers {:?}, {} errors (first: {})",
            phase.non_2xx(),
            phase.other,
            phase.errors,
            phase.first_error.as_deref().unwrap_or("none")
        );
    }
    let sent = phase.ok + phase.non_2xx() + phase.errors;
    let internals = match (metrics_before, scrape_all(runtime, targets)?) {
        (Some(before), Some(after)) => Some(Internals::between(&before, &after, secs)),
        _ => None,
    };
    Ok(Figures {
        rate: phase.rate(),
        ok: phase.ok,
        p50_ms: phase.ms(0.50),
        p99_ms: phase.ms(0.99),
        p999_ms: phase.ms(0.999),
        max_ms: phase.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
        non_2xx: phase.non_2xx(),
        errors: phase.errors,
        server_cpu,
        client_cpu,
        db_cpu,
        other_cpu,
        written_per_ok: written_after.0.saturating_sub(written_before.0) as f64
            / phase.ok.max(1) as f64,
        disk_per_ok: written_after.1.saturating_sub(written_before.1) as f64
            / phase.ok.max(1) as f64,
        late_fraction: phase.late as f64 / sent.max(1) as f64,
        internals,
    })
}

/// Waits (at most [`DRAIN_TIMEOUT`]) until the agent has no event left to apply; returns how
/// long that took.
fn wait_for_empty_backlog(
    runtime: &tokio::runtime::Runtime,
    agent: &Target,
) -> anyhow::Result<f64> {
    let Some(admin) = agent.admin else {
        return Ok(0.0);
    };
    let start = Instant::now();
    loop {
        let metrics = runtime.block_on(scrape(admin))?;
        if metrics.get("ess_agent_backlog").copied().unwrap_or(0.0) == 0.0 {
            return Ok(start.elapsed().as_secs_f64());
        }
        if start.elapsed() >= DRAIN_TIMEOUT || INTERRUPTED.load(Ordering::Relaxed) {
            eprintln!(
                "ess-bench: warning: the agent still had {} events to apply after {DRAIN_TIMEOUT:?}",
                metrics.get("ess_agent_backlog").copied().unwrap_or(0.0)
            );
            return Ok(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The adapter of the `filter` apply mode: it returns `undefined` for every event.
const FILTER_ADAPTER: &str = "/* ess-bench: nothing to apply */\npayload.nothing\n";

/// The adapter of the `file` apply mode: a typical reshaping of the event.
const FILE_ADAPTER: &str = "/* ess-bench: what a partner's rule file might hold */\n\
    {\n  \"rule_id\": id,\n  \"subject\": subject,\n  \"revision\": revision,\n  \
    \"name\": payload.rule.name,\n  \"active\": payload.rule.enabled,\n  \
    \"priority\": payload.rule.priority,\n  \"limits\": payload.rule.limits,\n  \
    \"partner\": $partner\n}\n";

/// The sink of the `filter` apply mode, which never receives anything.
const FILTER_SINK: &str = "type = \"file\"\ndir = {out}\nname = \"{id}.json\"";

/// Writes the agent's configuration into `dir`: a route for every event through the adapter
/// `apply` names into the sink `sink` (TOML, with `{out}` for its directory), none for `park`.
/// The agent's configuration for a pass. TOML in the environment variable
/// `ESS_BENCH_AGENT_TOML` is appended to it (a `[journal]` section, say), so that a setting can
/// be tried without a rebuild.
fn agent_config(dir: &Path, apply: Apply, sink: &str) -> anyhow::Result<PathBuf> {
    let more = std::env::var("ESS_BENCH_AGENT_TOML").unwrap_or_default();
    agent_config_with(dir, apply, sink, &more)
}

/// [`agent_config`] with more TOML at the end (a `[journal]` section).
fn agent_config_with(dir: &Path, apply: Apply, sink: &str, more: &str) -> anyhow::Result<PathBuf> {
    let secret = dir.join("hub-secret");
    std::fs::write(&secret, SECRET)?;
    // The high-water mark is raised so that a dispatcher that falls behind during a pass does not
    // make the agent refuse deliveries with 503. Everything else is the default.
    let mut text = format!(
        "agent_id = \"bench\"\n\
         state_dir = {state:?}\n\
         adapters_dir = {adapters:?}\n\
         [ingress]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nhmac_secrets = [{{ file = {secret:?} }}]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nbacklog_high_water = 1000000000\n",
        state = dir.join("state").display().to_string(),
        adapters = dir.join("adapters").display().to_string(),
        secret = secret.display().to_string(),
    );
    std::fs::create_dir_all(dir.join("adapters"))?;
    let adapter = match apply {
        Apply::Filter => Some(("bench-filter.jsonata", FILTER_ADAPTER)),
        Apply::File => Some(("bench-file.jsonata", FILE_ADAPTER)),
        Apply::Park => None,
    };
    if let Some((name, source)) = adapter {
        std::fs::write(dir.join("adapters").join(name), source)?;
        let out = format!("{:?}", dir.join("out").display().to_string());
        text.push_str(&format!(
            "[[routes]]\nname = \"bench\"\ntypes = [\"{EVENT_TYPE}\"]\nversions = \"1\"\n\
             adapter = \"{name}\"\nsink = \"bench-out\"\n\
             [sinks.bench-out]\n{}\n",
            sink.replace("{out}", &out),
        ));
    }
    text.push_str(more);
    let path = dir.join("ess-agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Threads and files per thread of [`file_floor`].
const FLOOR_THREADS: usize = 2;
const FLOOR_FILES: usize = 500;

/// The file floor: the CPU per file that the kernel's part of the `{id}.json` file sink's work
/// takes on this machine, with no agent: [`FLOOR_THREADS`] threads (one per CPU of the test
/// machine: more only spin on the directory's lock) each create a new temporary file, write a
/// 256-byte record,
/// fsync it and rename it to its final name, [`FLOOR_FILES`] times, in one fresh directory that
/// is fsynced once at the end. It is this process's CPU (user and system) per file, in
/// microseconds; the agent cannot apply an event into that sink with less. The directory goes
/// into `keep`, to be deleted at the end of the run (see [`end_to_end`]).
fn file_floor(work_dir: &Path, keep: &mut Vec<TempDir>) -> anyhow::Result<f64> {
    let dir = TempDir::new(work_dir)?;
    let out = dir.0.join("out");
    std::fs::create_dir(&out)?;
    let record = [b'x'; 256];
    let pid = std::process::id().to_string();
    let before = cpu_seconds(&pid).unwrap_or(0.0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..FLOOR_THREADS)
            .map(|t| {
                let out = &out;
                scope.spawn(move || -> std::io::Result<()> {
                    for i in 0..FLOOR_FILES {
                        let temp = out.join(format!(".f-{t}-{i}.tmp"));
                        let mut file = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&temp)?;
                        file.write_all(&record)?;
                        file.sync_all()?;
                        std::fs::rename(&temp, out.join(format!("f-{t}-{i}.json")))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("a file floor thread panicked"))?
                .context("the file floor could not write its files")
        })
    })?;
    std::fs::File::open(&out)?.sync_all()?;
    let cpu = cpu_seconds(&pid).unwrap_or(0.0) - before;
    keep.push(dir);
    Ok(cpu / (FLOOR_THREADS * FLOOR_FILES) as f64 * 1e6)
}

/// One end-to-end pass: a fresh agent whose route reshapes every event into `sink`, warmed up,
/// then driven at full load and timed until its last event is applied. Its directory goes into
/// `keep`, to be deleted once the run's passes are over: on ext4 without a journal, creating a
/// file skips every inode freed in the last 30 s one by one, so the files of one pass deleted
/// right before the next would make the next one's files dearer.
fn end_to_end(
    runtime: &tokio::runtime::Runtime,
    agent_bin: &Path,
    work_dir: &Path,
    sink: &str,
    load: impl Fn(SocketAddr, &str, Duration) -> Load,
    (warmup, duration): (Duration, Duration),
    keep: &mut Vec<TempDir>,
) -> anyhow::Result<E2e> {
    let dir = TempDir::new(work_dir)?;
    let config = agent_config(&dir.0, Apply::File, sink)?;
    let agent = start_agent(agent_bin, &config)?;
    let admin = agent.admin.context("the agent printed no admin address")?;
    if !warmup.is_zero() {
        measure(runtime, &agent, load(agent.addr, "e2e-warm", warmup))?;
        wait_for_empty_backlog(runtime, &agent)?;
    }
    let pid = agent.pid().to_string();
    let before = applied_total(&runtime.block_on(scrape(admin))?);
    let cpu_before = cpu_seconds(&pid).unwrap_or(0.0);
    let started = Instant::now();
    let figures = measure(runtime, &agent, load(agent.addr, "e2e", duration))?;
    wait_for_empty_backlog(runtime, &agent)?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pid).unwrap_or(0.0) - cpu_before;
    let applied_all = applied_total(&runtime.block_on(scrape(admin))?);
    let applied = applied_all - before;
    let peak_rss = proc_status_kb(agent.pid(), "VmHWM").unwrap_or(0);
    agent.stop()?;
    let files = count_records(&dir.0.join("out"));
    keep.push(dir);
    Ok(E2e {
        figures,
        applied_rate: applied / secs,
        applied: applied as u64,
        applied_all: applied_all as u64,
        files,
        cpu_us: cpu / applied.max(1.0) * 1e6,
        peak_rss,
    })
}

/// The records a file sink left in `out`: a file each, or a line each of an `.ndjson` file
/// (append mode); temporary files (names starting with `.`) do not count.
fn count_records(out: &Path) -> u64 {
    std::fs::read_dir(out)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| {
                    if e.file_name().to_string_lossy().ends_with(".ndjson") {
                        std::fs::read(e.path())
                            .map_or(0, |b| b.iter().filter(|c| **c == b'\n').count() as u64)
                    } else {
                        1
                    }
                })
                .sum::<u64>()
        })
        .unwrap_or(0)
}

/// Sets [`INTERRUPTED`] on SIGINT or SIGTERM, so that load phases stop early and the benchmark
/// stops its targets and exits.
fn watch_signals(runtime: &tokio::runtime::Runtime) {
    runtime.spawn(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        INTERRUPTED.store(true, Ordering::Relaxed);
    });
}

fn accept(args: &AcceptArgs) -> anyhow::Result<()> {
    let agent_bin = args
        .agent
        .canonicalize()
        .with_context(|| format!("no agent binary at {}", args.agent.display()))?;
    let baseline_bin = args
        .baseline_agent
        .as_ref()
        .map(|b| {
            b.canonicalize()
                .with_context(|| format!("no baseline agent binary at {}", b.display()))
        })
        .transpose()?;
    let self_bin = std::env::current_exe().context("cannot find this binary")?;
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let (fs_type, device) = mount_of(&work_dir);
    if matches!(fs_type.as_str(), "tmpfs" | "ramfs") {
        eprintln!(
            "ess-bench: warning: {} is on {fs_type}: fsync costs nothing there, so the agent's \
             figures will not reflect a real disk (use --work-dir)",
            work_dir.display()
        );
    }
    let (fsync_p50, fsync_p99) = {
        let probe = TempDir::new(&work_dir)?;
        fsync_probe(&probe.0)?
    };
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let connections = args.connections as usize;
    let duration = Duration::from_secs(args.seconds);
    let warmup = Duration::from_secs(args.warmup_seconds);
    let body_bytes = args.body_bytes as usize;
    let signer = WebhookSigner::new(SECRET).map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(args.client_threads as usize)
        .thread_name("load")
        .enable_all();
    if args.generator_fifo {
        builder.on_thread_start(|| {
            let tid = nix::unistd::gettid().to_string();
            let fifo = Command::new("chrt")
                .args(["--fifo", "--pid", "10", &tid])
                .status();
            if !fifo.is_ok_and(|s| s.success()) {
                eprintln!("ess-bench: warning: `chrt --fifo --pid 10 {tid}` failed: the load generator keeps the normal policy");
            }
        });
    }
    let runtime = builder.build()?;
    watch_signals(&runtime);

    eprintln!(
        "ess-bench accept: {connections} connections, {}s per phase ({}s warm-up), {body_bytes}-byte \
         events, {:?} ids, {} run(s); {nproc} CPUs; state on {fs_type} ({device}), fdatasync p50 \
         {fsync_p50} us",
        args.seconds, args.warmup_seconds, args.ids, args.runs
    );
    let load = |addr, tag: String, secs: Duration, rate| Load {
        addrs: vec![addr],
        connections,
        duration: secs,
        rate,
        body_bytes,
        revision_base: 0,
        ids: args.ids,
        tag,
        counter: AtomicU64::new(0),
        signer: signer.clone(),
    };

    let mut runs = Vec::new();
    let mut discarded = 0u32;
    let mut attempt = 0u32;
    while runs.len() < args.runs as usize {
        attempt += 1;
        let run_no = attempt;
        let mut run = Run::default();

        // 1. The bare server, and the durable limit (kept running for its half-load pass).
        let mut command = Command::new(&self_bin);
        command.arg("bare-server").stdin(Stdio::piped());
        let bare = Target::start(command, "bare server")?;
        std::thread::sleep(SETTLE);
        run.bare_idle_rss = proc_status_kb(bare.pid(), "VmRSS").unwrap_or(0);
        if !warmup.is_zero() {
            measure(
                &runtime,
                &bare,
                load(bare.addr, format!("r{run_no}-bare-warm"), warmup, None),
            )?;
        }
        run.bare = measure(
            &runtime,
            &bare,
            load(bare.addr, format!("r{run_no}-bare"), duration, None),
        )?;
        run.bare_peak_rss = proc_status_kb(bare.pid(), "VmHWM").unwrap_or(0);
        drop(bare);
        eprintln!("run {run_no}: bare:    {}", run.bare.brief());

        let durable_dir = TempDir::new(&work_dir)?;
        let mut command = Command::new(&self_bin);
        command
            .arg("durable-server")
            .arg("--file")
            .arg(durable_dir.0.join("bodies"))
            .stdin(Stdio::piped());
        let durable = Target::start(command, "durable-limit server")?;
        std::thread::sleep(SETTLE);
        run.durable_idle_rss = proc_status_kb(durable.pid(), "VmRSS").unwrap_or(0);
        if !warmup.is_zero() {
            measure(
                &runtime,
                &durable,
                load(durable.addr, format!("r{run_no}-dur-warm"), warmup, None),
            )?;
        }
        run.durable = measure(
            &runtime,
            &durable,
            load(durable.addr, format!("r{run_no}-durable"), duration, None),
        )?;
        run.durable_peak_rss = proc_status_kb(durable.pid(), "VmHWM").unwrap_or(0);
        eprintln!("run {run_no}: durable: {}", run.durable.brief());

        // 2. The agent at full load, then 3. at half the rate it reached, and the durable limit
        // at that same rate.
        let dir = TempDir::new(&work_dir)?;
        let sink = match args.apply {
            Apply::File => E2E_SINKS[0].1,
            Apply::Filter | Apply::Park => FILTER_SINK,
        };
        let config = agent_config(&dir.0, args.apply, sink)?;
        let agent = start_agent(&agent_bin, &config)?;
        std::thread::sleep(SETTLE);
        run.agent_idle_rss = proc_status_kb(agent.pid(), "VmRSS").unwrap_or(0);
        if !warmup.is_zero() {
            measure(
                &runtime,
                &agent,
                load(agent.addr, format!("r{run_no}-agent-warm"), warmup, None),
            )?;
        }
        run.agent = measure(
            &runtime,
            &agent,
            load(agent.addr, format!("r{run_no}-agent"), duration, None),
        )?;
        run.agent_peak_rss = proc_status_kb(agent.pid(), "VmHWM").unwrap_or(0);
        eprintln!(
            "run {run_no}: agent:   {}  ratio to bare {:.3}, to the durable limit {:.3}",
            run.agent.brief(),
            run.ratio(),
            run.durable_ratio()
        );
        // The dispatcher may still be working through what the full load left: the half-load
        // pass starts once it has caught up, so it measures a steady state.
        run.drain_secs = wait_for_empty_backlog(&runtime, &agent)?;
        run.half_rate = run.agent.rate / 2.0;
        run.half = measure(
            &runtime,
            &agent,
            load(
                agent.addr,
                format!("r{run_no}-agent-half"),
                duration,
                Some(run.half_rate),
            ),
        )?;
        eprintln!(
            "run {run_no}: half:    {}  (paced at {:.0}/s, {:.1}% late)",
            run.half.brief(),
            run.half_rate,
            run.half.late_fraction * 100.0
        );
        agent.stop()?;
        drop(dir);
        run.durable_half = measure(
            &runtime,
            &durable,
            load(
                durable.addr,
                format!("r{run_no}-durable-half"),
                duration,
                Some(run.half_rate),
            ),
        )?;
        eprintln!(
            "run {run_no}: durable paced at {:.0}/s: {}",
            run.half_rate,
            run.durable_half.brief()
        );
        drop(durable);
        drop(durable_dir);

        // 4. The file floor, before the end-to-end passes: the files they leave are deleted
        // when each ends, and a directory of files just deleted makes creating files dearer.
        let mut keep = Vec::new();
        run.file_floor_us = file_floor(&work_dir, &mut keep)?;
        eprintln!(
            "run {run_no}: file floor: {:.1} µs of CPU per file created, written, fsynced and \
             renamed by {FLOOR_THREADS} threads with no agent",
            run.file_floor_us
        );

        // 5. End to end: per sink mode, a fresh agent whose route reshapes every event into
        // that sink, at full load, timed until its last event is applied (and the baseline
        // agent's pass right after it).
        for (name, sink, _) in E2E_SINKS {
            if let Some(baseline) = &baseline_bin {
                let e2e = end_to_end(
                    &runtime,
                    baseline,
                    &work_dir,
                    sink,
                    |addr, what, secs| load(addr, format!("r{run_no}-base-{what}"), secs, None),
                    (warmup, duration),
                    &mut keep,
                )?;
                eprintln!(
                    "run {run_no}: baseline e2e {name}: {}\n        applied: {:.0}/s ({} events; \
                     {} records found for {} events applied with the warm-up), {:.1} µs of agent \
                     CPU per event applied, peak RSS {:.1} MiB; {:.3} of the durable limit",
                    e2e.figures.brief(),
                    e2e.applied_rate,
                    e2e.applied,
                    e2e.files,
                    e2e.applied_all,
                    e2e.cpu_us,
                    mib(e2e.peak_rss),
                    e2e.of(run.durable.rate),
                );
            }
            let e2e = end_to_end(
                &runtime,
                &agent_bin,
                &work_dir,
                sink,
                |addr, what, secs| load(addr, format!("r{run_no}-{what}"), secs, None),
                (warmup, duration),
                &mut keep,
            )?;
            eprintln!(
                "run {run_no}: e2e {name}: {}\n        applied: {:.0}/s ({} events; {} records found for {} \
                 events applied with the warm-up), {:.1} µs of agent CPU per event applied, peak \
                 RSS {:.1} MiB; {:.3} of the durable limit, {:.3} of bare",
                e2e.figures.brief(),
                e2e.applied_rate,
                e2e.applied,
                e2e.files,
                e2e.applied_all,
                e2e.cpu_us,
                mib(e2e.peak_rss),
                e2e.of(run.durable.rate),
                e2e.of(run.bare.rate),
            );
            run.e2e.push(e2e);
        }
        drop(keep);
        let other = [
            &run.bare,
            &run.durable,
            &run.agent,
            &run.half,
            &run.durable_half,
        ]
        .into_iter()
        .chain(run.e2e.iter().map(|e| &e.figures))
        .map(|f| f.other_cpu)
        .fold(0.0, f64::max);
        match args.max_other_cpu {
            Some(max) if other > max && discarded < args.runs => {
                discarded += 1;
                eprintln!(
                    "run {run_no}: discarded: other processes used up to {other:.2} CPUs \
                     (--max-other-cpu {max}); running it again"
                );
            }
            _ => runs.push(run),
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));

    let floor = match args.floor_events {
        0 => None,
        events => {
            eprintln!("floor: {events} events, 3 rounds");
            Some(floor::measure(
                &work_dir,
                events as usize,
                body_bytes,
                3,
                None,
            )?)
        }
    };
    let mut summary = Summary::new(&runs);
    summary.discarded = discarded;
    let budget = Budget::new(&summary.bare, nproc);
    if args.json {
        let out = json!({
            "benchmark": "accept",
            "connections": connections,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "body_bytes": body_bytes,
            "ids": format!("{:?}", args.ids).to_lowercase(),
            "client_threads": args.client_threads,
            "generator_fifo": args.generator_fifo,
            "machine": {
                "nproc": nproc,
                "state_fs": fs_type,
                "state_device": device,
                "fdatasync_p50_us": fsync_p50,
                "fdatasync_p99_us": fsync_p99,
            },
            "runs": runs.iter().map(|r| json!({
                "bare": r.bare.to_json(),
                "bare_idle_rss_bytes": r.bare_idle_rss,
                "bare_peak_rss_bytes": r.bare_peak_rss,
                "agent": r.agent.to_json(),
                "agent_idle_rss_bytes": r.agent_idle_rss,
                "agent_peak_rss_bytes": r.agent_peak_rss,
                "ratio": round(r.ratio(), 3),
                "half_rate": round(r.half_rate, 1),
                "half": r.half.to_json(),
                "durable": r.durable.to_json(),
                "durable_idle_rss_bytes": r.durable_idle_rss,
                "durable_peak_rss_bytes": r.durable_peak_rss,
                "durable_half": r.durable_half.to_json(),
                "ratio_to_durable": round(r.durable_ratio(), 3),
                "drain_secs": round(r.drain_secs, 2),
                "file_floor_us_per_file": round(r.file_floor_us, 1),
                "e2e": E2E_SINKS.iter().zip(&r.e2e).map(|((name, _, _), e)| {
                    (name.to_string(), e.to_json((r.bare.rate, r.durable.rate, r.agent.rate)))
                }).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
            "median": summary.to_json(),
            "budget": budget.to_json(),
            "floor": floor.as_ref().map(floor::Floor::to_json),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        summary.print(args, &fs_type, &device, nproc, fsync_p50);
        budget.print(floor.as_ref(), args.floor_events as usize);
    }
    Ok(())
}

/// The CPU per event the target ratio leaves the agent, from the bare phase: at
/// `TARGET_RATIO` × the bare rate the machine's CPUs give each event `machine_us`; the load
/// generator's share and the HTTP exchange's (the bare server's, which the agent cannot do with
/// less) come off it.
struct Budget {
    machine_us: f64,
    generator_us: f64,
    http_us: f64,
}

impl Budget {
    fn new(bare: &Figures, nproc: usize) -> Budget {
        let rate = bare.rate.max(1e-9);
        Budget {
            machine_us: nproc as f64 / (TARGET_RATIO * rate) * 1e6,
            generator_us: bare.client_cpu / rate * 1e6,
            http_us: bare.server_cpu / rate * 1e6,
        }
    }

    /// What is left for the agent's own work per event.
    fn left_us(&self) -> f64 {
        self.machine_us - self.generator_us - self.http_us
    }

    fn to_json(&self) -> Value {
        json!({
            "machine_us": round(self.machine_us, 2),
            "generator_us": round(self.generator_us, 2),
            "http_us": round(self.http_us, 2),
            "left_us": round(self.left_us(), 2),
        })
    }

    fn print(&self, floor: Option<&floor::Floor>, floor_events: usize) {
        println!(
            "\nbudget at {TARGET_RATIO} × bare: {:.1} µs of CPU per event on the machine, less \
             {:.1} µs for the load generator and {:.1} µs for the HTTP exchange (the bare \
             server's): {:.1} µs left for the agent's own work",
            self.machine_us,
            self.generator_us,
            self.http_us,
            self.left_us()
        );
        if let Some(floor) = floor {
            floor.print(floor_events, 3);
            println!(
                "floor {:.1} µs against {:.1} µs left: {}",
                floor.total_us(),
                self.left_us(),
                if floor.total_us() > self.left_us() {
                    "the target ratio is below the floor on this machine"
                } else {
                    "the target ratio is above the floor"
                }
            );
        }
    }
}

/// The median of each figure over the runs.
struct Summary {
    bare: Figures,
    durable: Figures,
    durable_half: Figures,
    agent: Figures,
    half: Figures,
    half_rate: f64,
    ratio: f64,
    durable_ratio: f64,
    bare_idle_rss: f64,
    bare_peak_rss: f64,
    durable_idle_rss: f64,
    durable_peak_rss: f64,
    agent_idle_rss: f64,
    agent_peak_rss: f64,
    drain_secs: f64,
    file_floor_us: f64,
    /// Per entry of [`E2E_SINKS`]: the medians, and the medians of the per-run fractions of the
    /// durable limit's and the bare server's rates.
    e2e: Vec<(E2e, f64, f64)>,
    runs: usize,
    /// Runs repeated because other processes disturbed them.
    discarded: u32,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn median_figures(all: &[&Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(all.iter().map(|x| f(x)).collect());
    Figures {
        rate: m(|f| f.rate),
        ok: median(all.iter().map(|f| f.ok as f64).collect()) as u64,
        p50_ms: m(|f| f.p50_ms),
        p99_ms: m(|f| f.p99_ms),
        p999_ms: m(|f| f.p999_ms),
        max_ms: m(|f| f.max_ms),
        non_2xx: all.iter().map(|f| f.non_2xx).sum(),
        errors: all.iter().map(|f| f.errors).sum(),
        server_cpu: m(|f| f.server_cpu),
        client_cpu: m(|f| f.client_cpu),
        db_cpu: m(|f| f.db_cpu),
        other_cpu: m(|f| f.other_cpu),
        written_per_ok: m(|f| f.written_per_ok),
        disk_per_ok: m(|f| f.disk_per_ok),
        late_fraction: m(|f| f.late_fraction),
        internals: median_internals(all),
    }
}

fn median_internals(all: &[&Figures]) -> Option<Internals> {
    let list: Vec<&Internals> = all.iter().filter_map(|f| f.internals.as_ref()).collect();
    if list.is_empty() {
        return None;
    }
    let m = |f: fn(&Internals) -> f64| median(list.iter().map(|x| f(x)).collect());
    Some(Internals {
        commits_per_sec: m(|i| i.commits_per_sec),
        ops_per_commit: m(|i| i.ops_per_commit),
        commit_ms: m(|i| i.commit_ms),
        flushes_per_sec: m(|i| i.flushes_per_sec),
        flush_ms: m(|i| i.flush_ms),
        slow_flushes: m(|i| i.slow_flushes),
        finished_per_sec: m(|i| i.finished_per_sec),
        backlog_end: m(|i| i.backlog_end),
        slow_commits: m(|i| i.slow_commits),
        wal_restarts: m(|i| i.wal_restarts),
        wal_restart_ms: m(|i| i.wal_restart_ms),
        wal_restart_frames: m(|i| i.wal_restart_frames),
        slow_requests: (m(|i| i.slow_requests.0), m(|i| i.slow_requests.1)),
        p99_ms: m(|i| i.p99_ms),
    })
}

impl Summary {
    fn new(runs: &[Run]) -> Summary {
        let figures =
            |f: fn(&Run) -> &Figures| median_figures(&runs.iter().map(f).collect::<Vec<_>>());
        let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let e2e = (0..E2E_SINKS.len())
            .map(|i| {
                let all: Vec<&E2e> = runs.iter().filter_map(|r| r.e2e.get(i)).collect();
                let me = |f: fn(&E2e) -> f64| median(all.iter().map(|e| f(e)).collect());
                let median_e2e = E2e {
                    figures: median_figures(&all.iter().map(|e| &e.figures).collect::<Vec<_>>()),
                    applied_rate: me(|e| e.applied_rate),
                    applied: me(|e| e.applied as f64) as u64,
                    applied_all: me(|e| e.applied_all as f64) as u64,
                    files: me(|e| e.files as f64) as u64,
                    cpu_us: me(|e| e.cpu_us),
                    peak_rss: me(|e| e.peak_rss as f64) as u64,
                };
                let of = |rate: fn(&Run) -> f64| {
                    median(
                        runs.iter()
                            .filter_map(|r| r.e2e.get(i).map(|e| e.of(rate(r))))
                            .collect(),
                    )
                };
                (median_e2e, of(|r| r.durable.rate), of(|r| r.bare.rate))
            })
            .collect();
        Summary {
            bare: figures(|r| &r.bare),
            durable: figures(|r| &r.durable),
            durable_half: figures(|r| &r.durable_half),
            agent: figures(|r| &r.agent),
            half: figures(|r| &r.half),
            half_rate: m(&|r| r.half_rate),
            ratio: m(&Run::ratio),
            durable_ratio: m(&Run::durable_ratio),
            bare_idle_rss: m(&|r| mib(r.bare_idle_rss)),
            bare_peak_rss: m(&|r| mib(r.bare_peak_rss)),
            durable_idle_rss: m(&|r| mib(r.durable_idle_rss)),
            durable_peak_rss: m(&|r| mib(r.durable_peak_rss)),
            agent_idle_rss: m(&|r| mib(r.agent_idle_rss)),
            agent_peak_rss: m(&|r| mib(r.agent_peak_rss)),
            drain_secs: m(&|r| r.drain_secs),
            file_floor_us: m(&|r| r.file_floor_us),
            e2e,
            runs: runs.len(),
            discarded: 0,
        }
    }

    /// The agent's p99 at half load over the durable limit's at the same rate.
    fn half_p99_ratio(&self) -> f64 {
        self.half.p99_ms / self.durable_half.p99_ms.max(1e-9)
    }

    fn to_json(&self) -> Value {
        json!({
            "bare": self.bare.to_json(),
            "bare_idle_rss_mib": round(self.bare_idle_rss, 1),
            "bare_peak_rss_mib": round(self.bare_peak_rss, 1),
            "durable": self.durable.to_json(),
            "durable_idle_rss_mib": round(self.durable_idle_rss, 1),
            "durable_peak_rss_mib": round(self.durable_peak_rss, 1),
            "durable_half": self.durable_half.to_json(),
            "agent": self.agent.to_json(),
            "agent_idle_rss_mib": round(self.agent_idle_rss, 1),
            "agent_peak_rss_mib": round(self.agent_peak_rss, 1),
            "ratio": round(self.ratio, 3),
            "ratio_to_durable": round(self.durable_ratio, 3),
            "half_rate": round(self.half_rate, 1),
            "half": self.half.to_json(),
            "half_p99_to_durable": round(self.half_p99_ratio(), 2),
            "drain_secs": round(self.drain_secs, 2),
            "file_floor_us_per_file": round(self.file_floor_us, 1),
            "e2e": E2E_SINKS.iter().zip(&self.e2e).map(|((name, _, _), (e, _, _))| {
                (name.to_string(), e.to_json((self.bare.rate, self.durable.rate, self.agent.rate)))
            }).collect::<serde_json::Map<_, _>>(),
            "discarded_runs": self.discarded,
            "targets": {
                "ratio_min": TARGET_RATIO, "ratio_holds": self.ratio >= TARGET_RATIO,
                "half_p99_ms_max": TARGET_HALF_P99_MS,
                "half_p99_holds": self.half.p99_ms <= TARGET_HALF_P99_MS,
                "half_p99_to_durable_max": TARGET_HALF_P99_TO_DURABLE,
                "half_p99_to_durable_holds": self.half_p99_ratio() <= TARGET_HALF_P99_TO_DURABLE,
                "e2e_of_durable_min": E2E_SINKS.iter().map(|(name, _, target)| (name.to_string(), json!(target))).collect::<serde_json::Map<_, _>>(),
                "e2e_cpu_us_max": TARGET_E2E_CPU_US,
                "idle_rss_mib_max": TARGET_IDLE_RSS_MIB,
                "idle_rss_holds": self.agent_idle_rss <= TARGET_IDLE_RSS_MIB,
                "peak_rss_mib_max": TARGET_PEAK_RSS_MIB,
                "peak_rss_holds": self.agent_peak_rss <= TARGET_PEAK_RSS_MIB,
            },
        })
    }

    fn print(&self, args: &AcceptArgs, fs_type: &str, device: &str, nproc: usize, fsync: u64) {
        let verdict = |ok: bool| if ok { "holds" } else { "MISSED" };
        println!();
        println!(
            "ess-bench accept: C={} T={}s body={} B ids={:?}, median of {} run(s); {nproc} CPUs, \
             state on {fs_type} ({device}), fdatasync p50 {fsync} us",
            args.connections, args.seconds, args.body_bytes, args.ids, self.runs
        );
        if self.discarded > 0 {
            println!(
                "({} disturbed run(s) discarded and repeated)",
                self.discarded
            );
        }
        println!(
            "{:<30} {:>10} {:>8} {:>8} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9}",
            "target",
            "2xx/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "non-2xx",
            "errors",
            "srv CPU",
            "gen CPU",
            "oth CPU",
            "idle RSS",
            "peak RSS"
        );
        let row = |name: &str, f: &Figures, idle: Option<f64>, peak: Option<f64>| {
            let rss = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} MiB"));
            println!(
                "{:<30} {:>10.0} {:>8.3} {:>8.3} {:>9.3} {:>8} {:>7} {:>7.2} {:>7.2} {:>7.2} {:>9} {:>9}",
                name,
                f.rate,
                f.p50_ms,
                f.p99_ms,
                f.p999_ms,
                f.non_2xx,
                f.errors,
                f.server_cpu,
                f.client_cpu,
                f.other_cpu,
                rss(idle),
                rss(peak)
            );
        };
        row(
            "bare hyper (full load)",
            &self.bare,
            Some(self.bare_idle_rss),
            Some(self.bare_peak_rss),
        );
        row(
            "durable limit (full load)",
            &self.durable,
            Some(self.durable_idle_rss),
            Some(self.durable_peak_rss),
        );
        row(
            "agent (full load)",
            &self.agent,
            Some(self.agent_idle_rss),
            Some(self.agent_peak_rss),
        );
        row(
            &format!("agent (paced {:.0}/s)", self.half_rate),
            &self.half,
            None,
            None,
        );
        row(
            &format!("durable limit (paced {:.0}/s)", self.half_rate),
            &self.durable_half,
            None,
            None,
        );
        for ((name, _, _), (e, _, _)) in E2E_SINKS.iter().zip(&self.e2e) {
            row(
                &format!("agent, {name} (full)"),
                &e.figures,
                None,
                Some(mib(e.peak_rss)),
            );
        }
        for (name, f) in [("full load", &self.agent), ("half load", &self.half)]
            .into_iter()
            .chain(
                E2E_SINKS
                    .iter()
                    .zip(&self.e2e)
                    .map(|((name, _, _), (e, _, _))| (*name, &e.figures)),
            )
        {
            if let Some(i) = &f.internals {
                println!(
                    "agent at {name}: {:.0} commits/s, {:.1} writer ops per commit, {:.3} ms per \
                     commit, {:.0} events finished/s by the dispatcher, {:.0} left at the end; \
                     p99 by its own histogram <= {:.1} ms",
                    i.commits_per_sec,
                    i.ops_per_commit,
                    i.commit_ms,
                    i.finished_per_sec,
                    i.backlog_end,
                    i.p99_ms
                );
            }
        }
        println!(
            "the dispatcher finished the full-load backlog {:.1} s after the pass",
            self.drain_secs
        );
        println!();
        println!(
            "accept only: {:.3} of bare (target >= {TARGET_RATIO}: {}), {:.3} of the durable limit",
            self.ratio,
            verdict(self.ratio >= TARGET_RATIO),
            self.durable_ratio
        );
        for ((name, _, target), (e, of_durable, of_bare)) in E2E_SINKS.iter().zip(&self.e2e) {
            println!(
                "end to end, {name}: {:.0} applied/s = {of_durable:.3} of the durable limit \
                 (target >= {target}: {}), {of_bare:.3} of bare, {:.3} of the \
                 accept-only rate; {:.1} µs of agent CPU per applied event (target <= \
                 {TARGET_E2E_CPU_US}: {}); p50 {:.3} ms, p99 {:.3} ms; peak RSS {:.1} MiB",
                e.applied_rate,
                verdict(*of_durable >= *target),
                e.of(self.agent.rate),
                e.cpu_us,
                verdict(e.cpu_us <= TARGET_E2E_CPU_US),
                e.figures.p50_ms,
                e.figures.p99_ms,
                mib(e.peak_rss)
            );
        }
        println!(
            "file floor (no agent; {FLOOR_THREADS} threads create, write, fsync and rename \
             {} files): {:.1} µs of CPU per file",
            FLOOR_THREADS * FLOOR_FILES,
            self.file_floor_us
        );
        // What the machine's CPUs allow a durable receiver that writes a file per event: the
        // file floor plus the durable limit's own CPU per request, nothing of the agent's.
        let limit_us = self.durable.server_cpu / self.durable.rate.max(1e-9) * 1e6;
        let ceiling = nproc as f64 / ((self.file_floor_us + limit_us) / 1e6);
        println!(
            "file-per-event ceiling from the floors: {nproc} CPUs ÷ ({:.1} µs file floor + {:.1} µs \
             of the durable limit's CPU per request) = {:.0}/s = {:.3} of the durable limit",
            self.file_floor_us,
            limit_us,
            ceiling,
            ceiling / self.durable.rate.max(1e-9)
        );
        println!(
            "p99 at half load ({:.0}/s): agent {:.3} ms (its own histogram <= {:.1} ms), durable \
             limit {:.3} ms at the same rate: {:.2} × (target <= {TARGET_HALF_P99_TO_DURABLE} ×: \
             {}; <= {TARGET_HALF_P99_MS} ms: {})",
            self.half_rate,
            self.half.p99_ms,
            self.half.internals.as_ref().map_or(0.0, |i| i.p99_ms),
            self.durable_half.p99_ms,
            self.half_p99_ratio(),
            verdict(self.half_p99_ratio() <= TARGET_HALF_P99_TO_DURABLE),
            verdict(self.half.p99_ms <= TARGET_HALF_P99_MS)
        );
        println!(
            "agent RSS idle:   {:.1} MiB  (target <= {TARGET_IDLE_RSS_MIB} MiB: {})",
            self.agent_idle_rss,
            verdict(self.agent_idle_rss <= TARGET_IDLE_RSS_MIB)
        );
        println!(
            "agent RSS peak:   {:.1} MiB  (target <= {TARGET_PEAK_RSS_MIB} MiB: {})",
            self.agent_peak_rss,
            verdict(self.agent_peak_rss <= TARGET_PEAK_RSS_MIB)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_what_the_target_ratio_leaves_after_the_generator_and_http() {
        let bare = Figures {
            rate: 70_000.0,
            server_cpu: 0.9,
            client_cpu: 1.0,
            ..Figures::default()
        };
        let budget = Budget::new(&bare, 2);
        // 2 CPUs ÷ (0.7 × 70,000/s) = 40.8 µs; the generator 1.0 ÷ 70,000 = 14.3 µs; the
        // bare server 0.9 ÷ 70,000 = 12.9 µs.
        assert!(
            (budget.machine_us - 40.816).abs() < 0.01,
            "{}",
            budget.machine_us
        );
        assert!((budget.generator_us - 14.286).abs() < 0.01);
        assert!((budget.http_us - 12.857).abs() < 0.01);
        assert!((budget.left_us() - 13.673).abs() < 0.01);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.50), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn histogram_quantile_is_the_bucket_bound_of_the_delta() {
        let key = |le: &str| format!("ess_agent_request_seconds_bucket{{le=\"{le}\"}}");
        let before: BTreeMap<String, f64> = [
            (key("0.001"), 10.0),
            (key("0.005"), 10.0),
            (key("+Inf"), 10.0),
        ]
        .into();
        let after: BTreeMap<String, f64> = [
            (key("0.001"), 108.0),
            (key("0.005"), 109.0),
            (key("+Inf"), 110.0),
        ]
        .into();
        // 100 new observations: 98 within 1 ms, 99 within 5 ms, the last beyond.
        let q = |q| histogram_quantile(&before, &after, "ess_agent_request_seconds", q);
        assert_eq!(q(0.98), 0.001);
        assert_eq!(q(0.99), 0.005);
        assert_eq!(q(1.0), f64::INFINITY);
        assert_eq!(
            histogram_quantile(&after, &after, "ess_agent_request_seconds", 0.5),
            0.0
        );
    }

    #[test]
    fn the_agent_label_is_dropped_so_that_agents_add_up() {
        assert_eq!(
            without_agent_label("ess_agent_backlog{agent=\"vm-1-2c39db7e\"}"),
            "ess_agent_backlog"
        );
        assert_eq!(
            without_agent_label(
                "ess_agent_events_final_total{agent=\"vm-1-2c39db7e\",state=\"applied\"}"
            ),
            "ess_agent_events_final_total{state=\"applied\"}"
        );
        assert_eq!(
            without_agent_label("ess_agent_request_seconds_bucket{le=\"0.005\"}"),
            "ess_agent_request_seconds_bucket{le=\"0.005\"}"
        );
        assert_eq!(
            without_agent_label("ess_agent_backlog"),
            "ess_agent_backlog"
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn event_body_has_the_requested_size_and_is_a_change_event() {
        let id = uuid_v4(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let body = event_body(&id, "bench-subject-0001", 42, 1024);
        assert_eq!(body.len(), 1024);
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["id"], id.as_str());
        assert_eq!(value["type"], EVENT_TYPE);
        assert_eq!(value["version"], 1);
        assert_eq!(value["revision"], 42);
        assert!(value["payload"].is_object());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let envelope = ess_agent::protocol::envelope::parse(&headers, body.as_bytes()).unwrap();
        assert_eq!(envelope.id, id);
    }

    #[test]
    fn uuid_v4_sets_version_and_variant() {
        let id = uuid_v4(u128::MAX);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(&id[19..20], "b");
        assert_eq!(uuid_v4(0), "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn internals_come_from_metric_deltas() {
        let before: BTreeMap<String, f64> = [
            ("ess_agent_journal_batch_size_count", 10.0),
            ("ess_agent_journal_batch_size_sum", 100.0),
            ("ess_agent_journal_commit_seconds_sum", 0.01),
            ("ess_agent_journal_commit_seconds_count", 10.0),
            (
                "ess_agent_journal_commit_seconds_bucket{le=\"0.0025\"}",
                9.0,
            ),
            ("ess_agent_events_final_total{state=\"filtered\"}", 50.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let after: BTreeMap<String, f64> = [
            ("ess_agent_journal_batch_size_count", 30.0),
            ("ess_agent_journal_batch_size_sum", 500.0),
            ("ess_agent_journal_commit_seconds_sum", 0.05),
            ("ess_agent_journal_commit_seconds_count", 30.0),
            (
                "ess_agent_journal_commit_seconds_bucket{le=\"0.0025\"}",
                25.0,
            ),
            ("ess_agent_journal_wal_restart_seconds_count", 2.0),
            ("ess_agent_journal_wal_restart_seconds_sum", 0.03),
            ("ess_agent_events_final_total{state=\"filtered\"}", 250.0),
            ("ess_agent_events_final_total{state=\"parked\"}", 20.0),
            ("ess_agent_backlog", 7.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let i = Internals::between(&before, &after, 2.0);
        assert_eq!(i.commits_per_sec, 10.0);
        assert_eq!(i.ops_per_commit, 20.0);
        assert!((i.commit_ms - 2.0).abs() < 1e-9);
        assert_eq!(i.finished_per_sec, 110.0);
        assert_eq!(i.backlog_end, 7.0);
        assert_eq!(i.slow_commits, 4.0);
        assert_eq!(i.wal_restarts, 2.0);
        assert!((i.wal_restart_ms - 15.0).abs() < 1e-9);
    }
}
