//! The configuration of an `exec` sink: its serde type and its pure checks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use std::sync::Arc;

use crate::settings::{Problem, RetryConfig};
use crate::sink::template::Template;
use crate::sink::{BuildContext, Sink, SinkSpec};

/// Configuration of an `exec` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program to run, as an absolute path, e.g. `/usr/local/bin/apply-rule`. It is run
    /// directly, without a shell, and never looked up in `PATH`. Required.
    pub program: PathBuf,
    /// The program's arguments, each a template over the event and the output (the placeholders
    /// of the file sink's `name`, e.g. `"--subject={subject}"`). Each renders to exactly one
    /// argument, whatever it contains: no shell splits or expands it. Default: none.
    #[serde(default)]
    pub args: Vec<String>,
    /// The directory the program runs in. Relative paths are resolved against the
    /// configuration file's directory. Default: `/`.
    #[serde(default = "default_working_dir")]
    pub working_dir: PathBuf,
    /// The names of the agent's environment variables the program receives, e.g. `["PATH",
    /// "LANG"]`; the program's environment is otherwise empty apart from the `ESS_` variables
    /// the sink sets. A listed variable the agent does not have is left out. Names starting
    /// with `ESS_` cannot be listed. Default: `["PATH", "LANG", "LC_ALL", "TZ"]`.
    #[serde(default = "default_env_allow")]
    pub env_allow: Vec<String>,
    /// Exit codes that mean "try again later": the event is retried with the route's backoff.
    /// Every other non-zero exit is a dead letter. Default: `[75]` (`EX_TEMPFAIL`).
    #[serde(default = "default_retry_exit_codes")]
    pub retry_exit_codes: Vec<i32>,
    /// How long one run may take, from the start of the program until it exits, in
    /// milliseconds. When it runs out, the program and every process in its process group are
    /// killed (SIGKILL) and the event becomes a dead letter. Default: 30000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The most runs of this sink's program at once; further events wait for a run to end.
    /// Default: 4.
    #[serde(default = "default_max_processes")]
    pub max_processes: usize,
    /// Retry policy for retryable failures. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_working_dir() -> PathBuf {
    PathBuf::from("/")
}

fn default_env_allow() -> Vec<String> {
    ["PATH", "LANG", "LC_ALL", "TZ"]
        .into_iter()
        .map(str::to_string)
        .collect()
}

fn default_retry_exit_codes() -> Vec<i32> {
    vec![75]
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_max_processes() -> usize {
    4
}

/// The prefix of the variables the sink sets itself; none of them can come from the agent.
pub const RESERVED_ENV_PREFIX: &str = "ESS_";

/// The most runs one sink may allow at once.
const MAX_PROCESSES_LIMIT: usize = 1024;

/// True for a portable environment variable name: a letter or `_`, then letters, digits, `_`.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl SinkSpec for ExecConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Builds the sink; checks that the program can be run and the working directory entered,
    /// naming the key at fault.
    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(super::ExecSink::new(self, context.key)?))
    }

    /// Resolves a relative `working_dir` against `base`. `program` is left as written: a
    /// relative program is refused by `validate`.
    fn resolve_paths(&mut self, base: &Path) {
        if self.working_dir.is_relative() && !self.working_dir.as_os_str().is_empty() {
            self.working_dir = base.join(&self.working_dir);
        }
    }

    /// Pure checks; `key` is this sink's key path. Whether the program exists is checked when
    /// the sink is built.
    fn validate(&self, key: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut bad = |field: String, message: String| {
            problems.push(Problem {
                key: format!("{key}.{field}"),
                message,
            })
        };
        let program = self.program.as_os_str();
        if program.is_empty() {
            bad(
                "program".into(),
                "must not be empty: set the absolute path of the program to run".into(),
            );
        } else if self.program.is_relative() {
            bad(
                "program".into(),
                format!(
                    "{} is a relative path: write the absolute path, e.g. \
                     /usr/local/bin/apply-rule (the agent runs the program without a shell \
                     and never searches PATH)",
                    self.program.display()
                ),
            );
        }
        if program.as_encoded_bytes().contains(&0) {
            bad(
                "program".into(),
                "contains a NUL character, which no path may hold".into(),
            );
        }
        for (i, arg) in self.args.iter().enumerate() {
            if let Err(message) = Template::parse(arg) {
                bad(format!("args[{i}]"), message);
            } else if arg.contains('\0') {
                bad(
                    format!("args[{i}]"),
                    "contains a NUL character, which no argument may hold".into(),
                );
            }
        }
        if self.working_dir.as_os_str().is_empty() {
            bad(
                "working_dir".into(),
                "must not be empty: leave it out to run the program in /".into(),
            );
        }
        for (i, name) in self.env_allow.iter().enumerate() {
            if !is_env_name(name) {
                bad(
                    format!("env_allow[{i}]"),
                    format!(
                        "{name:?} is not an environment variable name: use letters, digits and \
                         _, not starting with a digit"
                    ),
                );
            } else if name.starts_with(RESERVED_ENV_PREFIX) {
                bad(
                    format!("env_allow[{i}]"),
                    format!(
                        "{name} cannot be passed on: names starting with {RESERVED_ENV_PREFIX} \
                         are set by the sink itself or belong to the agent (which may keep \
                         secrets in them); remove it"
                    ),
                );
            } else if self.env_allow[..i].contains(name) {
                bad(
                    format!("env_allow[{i}]"),
                    format!("{name} is listed twice; remove one"),
                );
            }
        }
        for (i, code) in self.retry_exit_codes.iter().enumerate() {
            if !(1..=255).contains(code) {
                bad(
                    format!("retry_exit_codes[{i}]"),
                    format!(
                        "{code} is not an exit code that means failure: use 1 to 255 (0 always \
                         means applied)"
                    ),
                );
            }
        }
        if self.timeout_ms == 0 {
            bad(
                "timeout_ms".into(),
                "must be at least 1: set how long one run may take, in milliseconds".into(),
            );
        }
        if !(1..=MAX_PROCESSES_LIMIT).contains(&self.max_processes) {
            bad(
                "max_processes".into(),
                format!(
                    "{} is out of range: allow 1 to {MAX_PROCESSES_LIMIT} runs at once",
                    self.max_processes
                ),
            );
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ExecConfig {
        toml::from_str(text).unwrap()
    }

    fn keys(config: &ExecConfig) -> Vec<String> {
        config
            .validate("sinks.erp")
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    #[test]
    fn defaults() {
        let c = parse("program = \"/usr/local/bin/apply-rule\"");
        assert!(c.args.is_empty());
        assert_eq!(c.working_dir, Path::new("/"));
        assert_eq!(c.env_allow, ["PATH", "LANG", "LC_ALL", "TZ"]);
        assert_eq!(c.retry_exit_codes, [75]);
        assert_eq!(c.timeout_ms, 30_000);
        assert_eq!(c.max_processes, 4);
        assert!(c.validate("sinks.erp").is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<ExecConfig>("program = \"/bin/true\"\nshell = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shell"), "{e}");
    }

    #[test]
    fn a_relative_or_empty_program_is_refused_naming_the_key() {
        for program in ["apply-rule", "./apply-rule", "bin/apply-rule", ""] {
            let c = parse(&format!("program = {program:?}"));
            let problems = c.validate("sinks.erp");
            assert_eq!(keys(&c), ["sinks.erp.program"], "{program:?}");
            assert!(
                problems[0].message.contains("absolute") || problems[0].message.contains("empty"),
                "{}",
                problems[0].message
            );
        }
    }

    #[test]
    fn bad_values_are_named_by_their_key_path() {
        let c = parse(
            r#"
program = "/bin/true"
args = ["--id={id}", "{nope}", "{output.a}"]
working_dir = ""
env_allow = ["PATH", "ESS_AGENT_HUB_TOKEN", "1X", "A-B", "PATH"]
retry_exit_codes = [75, 0, 256, -1]
timeout_ms = 0
max_processes = 0
"#,
        );
        assert_eq!(
            keys(&c),
            [
                "sinks.erp.args[1]",
                "sinks.erp.working_dir",
                "sinks.erp.env_allow[1]",
                "sinks.erp.env_allow[2]",
                "sinks.erp.env_allow[3]",
                "sinks.erp.env_allow[4]",
                "sinks.erp.retry_exit_codes[1]",
                "sinks.erp.retry_exit_codes[2]",
                "sinks.erp.retry_exit_codes[3]",
                "sinks.erp.timeout_ms",
                "sinks.erp.max_processes",
            ]
        );
    }

    #[test]
    fn a_relative_working_dir_is_resolved_and_the_program_is_not() {
        let mut c = parse("program = \"apply\"\nworking_dir = \"spool\"");
        c.resolve_paths(Path::new("/etc/ess-agent"));
        assert_eq!(c.working_dir, Path::new("/etc/ess-agent/spool"));
        assert_eq!(c.program, Path::new("apply"));
    }
}
