//! The state directory's lock: one process at a time may use a journal.
//!
//! Two agents on one state directory would both resume the backlog and apply every event twice.
//! The journal takes an exclusive `flock(2)` on `state_dir/lock` before it opens the database,
//! and holds it until the journal is dropped (in practice, the life of the process). The
//! kernel releases the lock when the process ends in any way, `kill -9` included, so a lock file
//! left behind never blocks a restart: only a living holder does. The holder writes its pid into
//! the file, so that whoever is refused can be told which process to look at.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::JournalError;

/// The lock file's name inside the state directory.
pub const LOCK_FILE_NAME: &str = "lock";

/// A held lock; dropping it releases the lock.
pub(super) struct StateLock {
    _file: Flock<File>,
}

impl StateLock {
    /// Takes the lock of `state_dir` without waiting, or says who holds it.
    pub(super) fn acquire(state_dir: &Path) -> Result<StateLock, JournalError> {
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
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => file,
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
        let e = StateLock::acquire(dir.path()).err().expect("a second lock");
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
}
