//! The state directory's lock: one process at a time may use a journal.
//!
//! Two agents on one state directory would both resume the backlog and apply every event twice.
//! The journal takes an exclusive `flock(2)` on `state_dir/lock` before it opens the database,
//! and holds it until the journal is dropped (in practice, the life of the process). The
//! kernel releases the lock when the process ends in any way, `kill -9` included, so a lock file
//! left behind never blocks a restart: only a living holder does. The holder writes its pid into
//! the file, so that whoever is refused can be told which process to look at.
//!
//! The lock file is opened close-on-exec, but a process the exec sink starts shares it from its
//! fork until its `exec`: if the agent is killed in that instant, the lock outlives the agent by
//! as long as the program takes to start. So a busy lock is tried again for up to
//! [`LOCK_WAIT`] before the agent gives up, and a restart right after a crash is not refused.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::JournalError;

/// The lock file's name inside the state directory.
pub const LOCK_FILE_NAME: &str = "lock";

/// How long a busy lock is tried again before the agent is refused.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// A held lock; dropping it releases the lock.
pub(super) struct StateLock {
    _file: Flock<File>,
}

impl StateLock {
    /// Takes the lock of `state_dir`, trying again for up to [`LOCK_WAIT`] while it is busy, or
    /// says who holds it.
    pub(super) fn acquire(state_dir: &Path) -> Result<StateLock, JournalError> {
        Self::acquire_within(state_dir, LOCK_WAIT)
    }

    /// [`StateLock::acquire`], trying for up to `wait`.
    fn acquire_within(state_dir: &Path, wait: Duration) -> Result<StateLock, JournalError> {
        let deadline = Instant::now() + wait;
        let path = state_dir.join(LOCK_FILE_NAME);
        let io_err = |source: io::Error| JournalError::StateDir {
            path: path.clone(),
            source,
        };
        // Not truncated on open: until the lock is ours, the pid in it is the holder's.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        let mut file = file;
        let mut file = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((unlocked, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = unlocked;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    let holder = match std::fs::read_to_string(&path) {
                        Ok(text) if text.trim().parse::<u32>().is_ok() => {
                            format!("pid {}", text.trim())
                        }
                        _ => "its pid is not recorded yet".to_string(),
                    };
                    return Err(JournalError::Locked {
                        path: state_dir.to_owned(),
                        holder,
                    });
                }
                Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
            }
        };
        file.set_len(0).map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_directory_and_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        let pid = std::process::id().to_string();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE_NAME)).unwrap(),
            format!("{pid}\n")
        );
        let e = StateLock::acquire_within(dir.path(), Duration::ZERO)
            .err()
            .expect("a second lock");
        let message = e.to_string();
        assert!(matches!(e, JournalError::Locked { .. }), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains(&format!("pid {pid}")), "{message}");
        // The refused attempt did not erase the holder's pid.
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE_NAME)).unwrap(),
            format!("{pid}\n")
        );
        drop(held);
        StateLock::acquire(dir.path()).unwrap();
    }

    /// A lock held a moment longer than its agent (by a program started just before the agent
    /// was killed) does not refuse the restart: the agent waits for it.
    #[test]
    fn a_lock_freed_within_the_wait_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE_NAME);
        std::fs::write(&path, "1\n").unwrap();
        // util-linux flock(1) holds the lock for half a second, as such a program would.
        let mut holder = std::process::Command::new("flock")
            .arg("--exclusive")
            .arg(&path)
            .args(["sleep", "0.5"])
            .spawn()
            .expect("flock(1) from util-linux");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match StateLock::acquire_within(dir.path(), Duration::ZERO) {
                Err(JournalError::Locked { .. }) => break,
                Ok(lock) => drop(lock),
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(5));
        }
        let lock = StateLock::acquire(dir.path()).expect("the lock, once the holder let go");
        drop(lock);
        holder.wait().unwrap();
    }
}
