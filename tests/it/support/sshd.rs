//! A real OpenSSH `sshd` for the sftp sink's tests: its own configuration, host key and
//! authorized client keys in a temporary directory, listening on a free loopback port, with
//! `internal-sftp`. It can be stopped (every process of it killed, as in a crash) and started
//! again on the same port with the same host key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::process::{ServerLog, free_port};

/// Where Debian and most distributions install the daemon.
const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) sshd.
pub struct Sshd {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The user the client keys log in as (the user running the tests).
    pub user: String,
    /// The host's public key line (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// The host key's fingerprint, `SHA256:…`.
    pub host_fingerprint: String,
    /// An unencrypted ed25519 client key that the server accepts.
    pub client_key: PathBuf,
    /// An ed25519 client key encrypted with [`Sshd::PASSPHRASE`] that the server accepts.
    pub encrypted_client_key: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    log: Arc<ServerLog>,
}

/// Runs a command and returns its stdout; panics with its stderr when it fails.
fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generates an ed25519 key pair at `path` (private) and `path.pub`.
pub fn keygen(path: &Path, passphrase: &str) {
    run(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-C",
            "ess-agent-test",
            "-N",
            passphrase,
            "-f",
        ])
        .arg(path));
}

/// The `SHA256:` fingerprint of a public key file.
pub fn fingerprint(public_key: &Path) -> String {
    let out = run(Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(public_key));
    out.split_whitespace()
        .nth(1)
        .expect("ssh-keygen -l prints a fingerprint")
        .to_string()
}

/// Every process descending from `root` (children, grandchildren, …), from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The command name is in parentheses and may contain spaces: split after it.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

impl Sshd {
    /// The passphrase of [`Sshd::encrypted_client_key`].
    pub const PASSPHRASE: &'static str = "correct horse battery staple";

    /// Generates keys and a configuration and starts sshd.
    pub fn start() -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server (scripts/test does when it can)"
        );
        // sshd refuses to start without its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::tempdir().expect("tempdir");
        let host_key_path = dir.path().join("host_ed25519");
        keygen(&host_key_path, "");
        let client_key = dir.path().join("client_ed25519");
        keygen(&client_key, "");
        let encrypted_client_key = dir.path().join("client_encrypted_ed25519");
        keygen(&encrypted_client_key, Sshd::PASSPHRASE);
        let authorized = dir.path().join("authorized_keys");
        let mut keys = String::new();
        for key in [&client_key, &encrypted_client_key] {
            keys.push_str(&std::fs::read_to_string(key.with_extension("pub")).unwrap());
        }
        std::fs::write(&authorized, keys).unwrap();
        let user = run(Command::new("id").arg("-un")).trim().to_string();
        let port = free_port();
        let config = dir.path().join("sshd_config");
        let text = format!(
            "ListenAddress 127.0.0.1:{port}\n\
             HostKey {host_key}\n\
             PidFile none\n\
             AuthorizedKeysFile {authorized}\n\
             UsePAM no\n\
             StrictModes no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowUsers {user}\n\
             MaxSessions 64\n\
             MaxStartups 100\n\
             LogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\n",
            host_key = host_key_path.display(),
            authorized = authorized.display(),
        );
        std::fs::write(&config, text).unwrap();
        let host_key = std::fs::read_to_string(host_key_path.with_extension("pub"))
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let host_fingerprint = fingerprint(&host_key_path.with_extension("pub"));
        let mut sshd = Sshd {
            dir,
            port,
            user,
            host_key,
            host_fingerprint,
            client_key,
            encrypted_client_key,
            config,
            child: None,
            log: Arc::default(),
        };
        sshd.start_again();
        sshd
    }

    /// The temporary directory holding keys and configuration (files may be put there too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A known_hosts line for this server.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}\n", self.port, self.host_key)
    }

    /// Starts sshd (again), and waits until it listens.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "sshd is already running");
        let mut command = Command::new(SSHD);
        command.arg("-D").arg("-e").arg("-f").arg(&self.config);
        let listening = format!("Server listening on 127.0.0.1 port {}", self.port);
        self.child = Some(
            self.log
                .spawn_until(command, "sshd", START_TIMEOUT, |l| l.contains(&listening)),
        );
    }

    /// Kills sshd and every session process it started, as a crash of the server would.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let master = child.id() as i32;
        // Stopped, the listener accepts no new connection while its sessions are collected.
        let _ = kill(Pid::from_raw(master), Signal::SIGSTOP);
        let sessions = descendants(master);
        let _ = kill(Pid::from_raw(master), Signal::SIGKILL);
        for pid in sessions {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = child.wait();
    }

    /// Every log line so far.
    pub fn log_text(&self) -> String {
        self.log.text()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
