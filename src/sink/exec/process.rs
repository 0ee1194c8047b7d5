//! One run of the program: spawned without a shell in a process group of its own, fed its
//! input on stdin, its output drained into the log, and bounded by a timeout that kills the
//! whole group.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio_util::task::AbortOnDropHandle;

use super::output::{LogContext, Stream, StreamSummary, drain};

/// How long the output pipes are read after the program and its group are gone. A process
/// that left the group (with `setsid`) may still hold them open; it is not waited for.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// How long reaping a killed program may take. A process stuck in uninterruptible I/O dies
/// only when the I/O ends; tokio reaps it then.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// What to run.
pub struct Spec<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(OsString, OsString)>,
    pub working_dir: &'a Path,
    pub input: Vec<u8>,
    pub timeout: Duration,
    pub log: LogContext,
}

/// How a run ended.
#[derive(Debug)]
pub enum Ending {
    /// The program exited or was killed by a signal that was not ours.
    Exited(ExitStatus),
    /// The timeout ran out; the group was killed.
    TimedOut,
}

/// A run that ended, with what it wrote to stderr.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    pub stderr: String,
}

/// A spawned program whose process group is killed (SIGKILL) when it is dropped before the
/// run ended, e.g. when the agent gives up waiting for it at shutdown.
struct Group {
    child: Child,
    pgid: Option<Pid>,
}

impl Group {
    /// Kills every process of the group. Called while the program is not yet reaped (so its
    /// process id, which is the group's id, cannot have been reused), or right after it was
    /// reaped to end what it left behind in its group: then the group still exists when it
    /// has members, and otherwise the kill finds nothing (`ESRCH`).
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
        // `kill_on_drop` then kills the program itself if needed, and tokio reaps it.
    }
}

/// Runs the program once. Errors are those of starting it (`spawn`).
pub async fn run(spec: Spec<'_>) -> io::Result<Outcome> {
    let mut command = Command::new(spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.working_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own: the timeout kills the program's children too, and a terminal's
        // Ctrl-C meant for the agent does not reach it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut group = Group { child, pgid };

    // Reading and writing run beside the wait: a program that writes much before it reads its
    // input, or never reads it, must not block the agent.
    let input = spec.input;
    let _feed = stdin.map(|mut stdin| {
        AbortOnDropHandle::new(tokio::spawn(async move {
            // A program that exits without reading all of its input closes the pipe (EPIPE):
            // its exit status says whether that was right.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }))
    });
    let err_summary = Arc::new(Mutex::new(StreamSummary::default()));
    let mut readers = Vec::new();
    if let Some(pipe) = stdout {
        let summary = Arc::new(Mutex::new(StreamSummary::default()));
        readers.push(AbortOnDropHandle::new(tokio::spawn(drain(
            pipe,
            Stream::Stdout,
            spec.log.clone(),
            summary,
        ))));
    }
    if let Some(pipe) = stderr {
        readers.push(AbortOnDropHandle::new(tokio::spawn(drain(
            pipe,
            Stream::Stderr,
            spec.log.clone(),
            err_summary.clone(),
        ))));
    }

    let ending = match tokio::time::timeout(spec.timeout, group.child.wait()).await {
        Ok(Ok(status)) => {
            // The run is over when the program exits: what it left running in its group ends
            // with it.
            group.kill();
            Ending::Exited(status)
        }
        Ok(Err(e)) => {
            group.kill();
            return Err(e);
        }
        Err(_) => {
            group.kill();
            let _ = tokio::time::timeout(REAP_GRACE, group.child.wait()).await;
            Ending::TimedOut
        }
    };
    let _ = tokio::time::timeout(PIPE_GRACE, async {
        for reader in &mut readers {
            let _ = reader.await;
        }
    })
    .await;
    drop(readers);
    let stderr = err_summary.lock().unwrap_or_else(|p| p.into_inner()).tail();
    Ok(Outcome { ending, stderr })
}
