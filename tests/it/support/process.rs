//! Servers the tests start themselves (mosquitto, nats-server, sshd, redis-server): a free
//! loopback port, their stderr kept line by line, a wait until they say they are ready, and a
//! stop the way an init system does it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The line pushed when a server's stderr closes (it exited).
pub const EXITED: &str = "<exited>";

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a server wrote to stderr, over all its runs, with a condition variable to wait on.
#[derive(Default)]
pub struct ServerLog {
    lines: Mutex<Lines>,
    changed: Condvar,
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    /// Runs started, and runs whose stderr has closed.
    started: usize,
    ended: usize,
}

impl ServerLog {
    /// Spawns `command` (`name` in messages) with its stderr kept here, and returns once a line
    /// it wrote satisfies `ready`. Panics with what it wrote when it exits first or is not
    /// ready within `timeout`. With `ESS_TEST_ECHO` set, its lines are echoed too.
    pub fn spawn_until(
        self: &Arc<Self>,
        mut command: Command,
        name: &str,
        timeout: Duration,
        ready: impl Fn(&str) -> bool,
    ) -> Child {
        let deadline = Instant::now() + timeout;
        let seen = {
            // A run starts after the previous run's last line, so that its lines are its own.
            let mut lines = self.lines.lock().unwrap();
            while lines.ended < lines.started {
                let now = Instant::now();
                assert!(now < deadline, "the previous {name} did not exit");
                lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
            }
            lines.started += 1;
            lines.lines.len()
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (is it installed?): {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = self.clone();
        let echo = std::env::var_os("ESS_TEST_ECHO")
            .is_some()
            .then(|| name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(name) = &echo {
                    eprintln!("{name}: {line}");
                }
                log.push(line);
            }
            let mut lines = log.lines.lock().unwrap();
            lines.lines.push(EXITED.into());
            lines.ended += 1;
            drop(lines);
            log.changed.notify_all();
        });
        let failure = {
            let mut lines = self.lines.lock().unwrap();
            loop {
                let run = &lines.lines[seen..];
                if run.iter().any(|l| ready(l)) {
                    break None;
                }
                if run.iter().any(|l| l == EXITED) {
                    break Some(format!("{name} exited at start:\n{}", run.join("\n")));
                }
                let now = Instant::now();
                if now >= deadline {
                    break Some(format!("{name} did not start:\n{}", run.join("\n")));
                }
                lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
            }
        };
        if let Some(message) = failure {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{message}");
        }
        child
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().lines.push(line);
        self.changed.notify_all();
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().lines.join("\n")
    }

    /// Waits until a line written after the first `from` lines satisfies `found`; false when
    /// none did within `timeout`.
    pub fn wait_for(&self, from: usize, timeout: Duration, found: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if lines.lines.iter().skip(from).any(|l| found(l)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// How many lines were written so far.
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().lines.len()
    }
}

/// Stops a server the way an init system does (SIGTERM) and waits until it has exited.
pub fn terminate(child: &mut Option<Child>) {
    let Some(mut child) = child.take() else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}
