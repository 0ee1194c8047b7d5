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

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn spec(script: &str, input: Vec<u8>, timeout: Duration) -> Spec<'static> {
        Spec {
            program: Path::new("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: Path::new("/"),
            input,
            timeout,
            log: LogContext {
                sink: "test".into(),
                event_id: "e1".into(),
                route: "r".into(),
            },
        }
    }

    fn running(marker: &str) -> bool {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
            })
    }

    async fn gone(marker: &str) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while running(marker) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    #[tokio::test]
    async fn a_run_that_is_dropped_kills_its_process_group() {
        let marker = format!("1000.{:09}", rand::random::<u32>() % 1_000_000_000);
        let script = format!("sleep {marker} & echo started; wait");
        let run = run(spec(&script, Vec::new(), Duration::from_secs(60)));
        // Dropped mid-run, as the agent drops what is still running when its grace period
        // ends.
        let dropped = tokio::time::timeout(Duration::from_millis(500), run).await;
        assert!(dropped.is_err(), "the run ended by itself: {dropped:?}");
        assert!(gone(&marker).await, "a process of the group survived");
    }

    #[tokio::test]
    async fn large_input_unread_and_large_output_unasked_do_not_block() {
        // The program exits without reading its input.
        let outcome = run(spec("exit 0", vec![b'x'; 4 << 20], Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(matches!(outcome.ending, Ending::Exited(s) if s.success()));
        // The program writes more than a pipe holds before it reads its input.
        let outcome = run(spec(
            "head -c 3000000 /dev/zero | tr '\\0' 'a'; head -c 3000000 /dev/zero >&2; echo >&2; \
             wc -c; echo last >&2; exit 4",
            vec![b'x'; 4 << 20],
            Duration::from_secs(20),
        ))
        .await
        .unwrap();
        assert!(
            matches!(outcome.ending, Ending::Exited(s) if s.code() == Some(4)),
            "{outcome:?}"
        );
        assert!(
            outcome.stderr.ends_with("last"),
            "{:?}",
            outcome.stderr.len()
        );
        assert!(outcome.stderr.len() <= super::super::output::TAIL_BYTES);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_group_and_keeps_what_was_written() {
        let marker = format!("1000.{:09}", rand::random::<u32>() % 1_000_000_000);
        let script = format!("echo before >&2; sleep {marker} & wait");
        let outcome = run(spec(&script, Vec::new(), Duration::from_millis(300)))
            .await
            .unwrap();
        assert!(matches!(outcome.ending, Ending::TimedOut), "{outcome:?}");
        assert_eq!(outcome.stderr, "before");
        assert!(gone(&marker).await, "a process of the group survived");
        // A signal sent by someone else is reported as the program's ending.
        let outcome = run(spec("kill -KILL $$", Vec::new(), Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(
            matches!(outcome.ending, Ending::Exited(s) if s.signal() == Some(9)),
            "{outcome:?}"
        );
    }
}
