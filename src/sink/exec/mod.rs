//! The `exec` sink: runs a partner's program once per event, without a shell, with the
//! adapter's output on stdin and the event in `ESS_` environment variables.
//!
//! # A run
//!
//! The whole output of an event goes to one run, whatever its shape: a string output as its
//! text, anything else as compact JSON and a newline (an array is one JSON array, not a run per
//! element). The arguments are templates rendered per event ([`Template`], with the whole output
//! as the record). The environment is cleared, then holds only the variables of `env_allow`
//! that the agent has and the sink's own (see [`event_env`]). The program runs in
//! `working_dir`, in a process group of its own; runs beyond `max_processes` wait for one to end.
//!
//! # Exit status
//!
//! - 0: applied.
//! - a code in `retry_exit_codes` (default 75, `EX_TEMPFAIL`): **retryable**, with the route's
//!   backoff.
//! - any other code, or death by a signal: **permanent**, a dead letter whose error carries the
//!   last lines of the program's stderr (bounded: see [`output`]).
//! - the timeout: the process group is killed with SIGKILL and reaped; **permanent**. A program
//!   that hangs usually hangs again; one that knows it met a passing problem exits 75.
//!
//! When the program exits, whatever it left running in its process group is killed: a run is
//! over when the program is.
//!
//! A program that cannot be started is a permanent failure when the cause is the program or the
//! directory (missing, not executable, not a directory, an argument list too long) and
//! retryable when it is the machine (`EAGAIN`, `ENOMEM`, `EMFILE`, `ENFILE`, `ETXTBSY` while the
//! program is being replaced).
//!
//! # Guarantee
//!
//! At least once. The journal records the event applied after the program exited 0; an agent
//! killed in between runs the program again for the same event after its restart. A program
//! killed with the agent (kill -9) is not killed by the agent: it runs to its end, and may
//! overlap with the next start's run of the same event. Programs must be idempotent on
//! `ESS_EVENT_ID`.

mod config;
pub mod output;
mod process;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{AccessFlags, access};
use serde_json::Value;
use tokio::sync::Semaphore;

pub use self::config::ExecConfig;
use self::output::LogContext;
use self::process::{Ending, Outcome, Spec};
use super::template::Template;
use super::{EventMeta, Sink, SinkError};
use crate::settings::Problem;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// The `exec` sink.
#[derive(Debug)]
pub struct ExecSink {
    /// The sink's name (its key below `sinks`), for the log and `ESS_SINK`.
    name: String,
    program: PathBuf,
    args: Vec<Template>,
    working_dir: PathBuf,
    /// The allow-listed variables the agent had when the sink was built.
    passed_env: Vec<(OsString, OsString)>,
    retry_exit_codes: Vec<i32>,
    timeout: Duration,
    /// One permit per run that may be under way.
    slots: Semaphore,
}

impl ExecSink {
    /// Builds the sink: checks that the program can be run and the working directory entered,
    /// and takes the allow-listed variables from the agent's environment. `key` is the sink's
    /// key path; a problem names the field.
    pub fn new(config: &ExecConfig, key: &str) -> Result<ExecSink, Problem> {
        let problem = |field: &str, message: String| Problem {
            key: format!("{key}.{field}"),
            message,
        };
        check_program(&config.program).map_err(|m| problem("program", m))?;
        check_working_dir(&config.working_dir).map_err(|m| problem("working_dir", m))?;
        let args = config
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| Template::parse(a).map_err(|m| problem(&format!("args[{i}]"), m)))
            .collect::<Result<_, _>>()?;
        let passed_env = config
            .env_allow
            .iter()
            .filter_map(|name| Some((OsString::from(name), std::env::var_os(name)?)))
            .collect();
        Ok(ExecSink {
            name: key.strip_prefix("sinks.").unwrap_or(key).to_string(),
            program: config.program.clone(),
            args,
            working_dir: config.working_dir.clone(),
            passed_env,
            retry_exit_codes: config.retry_exit_codes.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            slots: Semaphore::new(config.max_processes.max(1)),
        })
    }

    /// The arguments for one event. Pure.
    fn render_args(&self, event: &EventMeta, output: &Value) -> Result<Vec<String>, SinkError> {
        self.args
            .iter()
            .enumerate()
            .map(|(i, template)| {
                let arg = template.render(event, output, 0).map_err(|e| {
                    SinkError::Permanent(format!(
                        "cannot render args[{i}] {:?}: {e}",
                        template.text()
                    ))
                })?;
                if arg.contains('\0') {
                    return Err(SinkError::Permanent(format!(
                        "args[{i}] {:?} renders with a NUL character, which no argument may \
                         hold: check the values it uses",
                        template.text()
                    )));
                }
                Ok(arg)
            })
            .collect()
    }
}

/// The variables the sink sets for one run. Values with a NUL character cannot be passed.
pub fn event_env(
    sink: &str,
    event: &EventMeta,
    content_type: &str,
) -> Result<Vec<(OsString, OsString)>, SinkError> {
    let mut vars = vec![
        ("ESS_EVENT_ID", event.id.clone()),
        ("ESS_EVENT_TYPE", event.event_type.clone()),
        ("ESS_EVENT_VERSION", event.version.to_string()),
        ("ESS_EVENT_SUBJECT", event.subject.clone()),
    ];
    if let Some(revision) = event.revision {
        vars.push(("ESS_EVENT_REVISION", revision.to_string()));
    }
    if let Some(source) = &event.source {
        vars.push(("ESS_EVENT_SOURCE", source.clone()));
    }
    vars.extend([
        ("ESS_ROUTE", event.route.clone()),
        ("ESS_PARTNER", event.partner.clone()),
        ("ESS_SINK", sink.to_string()),
        ("ESS_CONTENT_TYPE", content_type.to_string()),
    ]);
    vars.into_iter()
        .map(|(name, value)| {
            if value.contains('\0') {
                Err(SinkError::Permanent(format!(
                    "{name} would hold a NUL character, which no environment variable may hold"
                )))
            } else {
                Ok((OsString::from(name), OsString::from(value)))
            }
        })
        .collect()
}

/// What the program reads on stdin, and its content type.
fn input(output: &Value) -> Result<(Vec<u8>, &'static str), SinkError> {
    match output {
        Value::String(text) => Ok((text.clone().into_bytes(), TEXT)),
        other => {
            let mut bytes = serde_json::to_vec(other).map_err(|e| {
                SinkError::Permanent(format!("cannot encode the output as JSON: {e}"))
            })?;
            bytes.push(b'\n');
            Ok((bytes, JSON))
        }
    }
}

fn check_program(program: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(program).map_err(|e| {
        format!(
            "cannot use {}: {e}: install the program or correct the path",
            program.display()
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file: point program at the executable itself",
            program.display()
        ));
    }
    access(program, AccessFlags::X_OK).map_err(|e| {
        format!(
            "{} is not executable by the agent's user ({}): chmod +x it or make it readable \
             and executable for that user",
            program.display(),
            e.desc()
        )
    })
}

fn check_working_dir(dir: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        format!(
            "cannot use {}: {e}: create the directory or correct the path",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    access(dir, AccessFlags::X_OK).map_err(|e| {
        format!(
            "the agent's user cannot enter {} ({}): give it search (x) permission",
            dir.display(),
            e.desc()
        )
    })
}

/// Classifies a failure to start the program, by `errno`.
fn spawn_error(program: &Path, working_dir: &Path, e: &io::Error) -> SinkError {
    let errno = e.raw_os_error().map(Errno::from_raw);
    let message = format!(
        "cannot start {} in {}: {e}",
        program.display(),
        working_dir.display()
    );
    match errno {
        Some(
            Errno::EAGAIN
            | Errno::ENOMEM
            | Errno::EMFILE
            | Errno::ENFILE
            | Errno::ETXTBSY
            | Errno::EINTR,
        ) => SinkError::Retryable(message),
        Some(Errno::E2BIG) => SinkError::Permanent(format!(
            "{message}: the arguments and environment are too large; pass large values on stdin"
        )),
        _ => SinkError::Permanent(format!(
            "{message}: check that the program and the working directory exist and the agent's \
             user may use them, then replay"
        )),
    }
}

/// Classifies how a run ended. Pure.
fn classify(
    outcome: &Outcome,
    retry_exit_codes: &[i32],
    timeout: Duration,
) -> Result<(), SinkError> {
    use std::os::unix::process::ExitStatusExt;
    let stderr = if outcome.stderr.is_empty() {
        String::from("; it wrote nothing to stderr")
    } else {
        format!("; last lines of its stderr:\n{}", outcome.stderr)
    };
    match &outcome.ending {
        Ending::Exited(status) => match (status.code(), status.signal()) {
            (Some(0), _) => Ok(()),
            (Some(code), _) if retry_exit_codes.contains(&code) => Err(SinkError::Retryable(
                format!("the program exited with status {code}, which asks for a retry{stderr}"),
            )),
            (Some(code), _) => Err(SinkError::Permanent(format!(
                "the program exited with status {code}{stderr}"
            ))),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |s| s.as_str().to_string());
                Err(SinkError::Permanent(format!(
                    "the program was killed by signal {name}{stderr}"
                )))
            }
            (None, None) => Err(SinkError::Permanent(format!(
                "the program ended with {status}{stderr}"
            ))),
        },
        Ending::TimedOut => Err(SinkError::Permanent(format!(
            "the program did not finish within {} ms, so it and its process group were killed; \
             raise timeout_ms if it is just slow{stderr}",
            timeout.as_millis()
        ))),
    }
}

#[async_trait::async_trait]
impl Sink for ExecSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        let args = self.render_args(event, output)?;
        let (input, content_type) = input(output)?;
        let mut env = self.passed_env.clone();
        env.extend(event_env(&self.name, event, content_type)?);
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| SinkError::Retryable("the sink is shutting down".into()))?;
        let started = std::time::Instant::now();
        let outcome = process::run(Spec {
            program: &self.program,
            args,
            env,
            working_dir: &self.working_dir,
            input,
            timeout: self.timeout,
            log: LogContext {
                sink: self.name.clone(),
                event_id: event.id.clone(),
                route: event.route.clone(),
            },
        })
        .await
        .map_err(|e| spawn_error(&self.program, &self.working_dir, &e))?;
        tracing::debug!(sink = %self.name, event_id = %event.id, route = %event.route, ending = ?outcome.ending, elapsed_ms = started.elapsed().as_millis() as u64, "program ended");
        classify(&outcome, &self.retry_exit_codes, self.timeout)
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let (program, dir) = (self.program.clone(), self.working_dir.clone());
        tokio::task::spawn_blocking(move || {
            check_program(&program).and_then(|()| check_working_dir(&dir))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the check failed unexpectedly: {e}")))
        .map_err(SinkError::Permanent)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use serde_json::json;

    use super::*;

    fn event() -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "rule.updated".into(),
            version: 3,
            subject: "case-42".into(),
            revision: Some(7),
            source: None,
            route: "erp".into(),
            partner: "p1".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn exited(raw: i32, stderr: &str) -> Outcome {
        Outcome {
            ending: Ending::Exited(ExitStatus::from_raw(raw)),
            stderr: stderr.into(),
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn exit_statuses_are_classified() {
        assert_eq!(classify(&exited(0, "noise"), &[75], T), Ok(()));
        // Exit codes sit in the second byte of a wait status.
        let e = classify(&exited(75 << 8, "busy"), &[75], T).unwrap_err();
        assert!(
            e.is_retryable() && e.to_string().contains("status 75"),
            "{e}"
        );
        let e = classify(&exited(3 << 8, "bad rule\nline two"), &[75], T).unwrap_err();
        assert!(matches!(e, SinkError::Permanent(_)), "{e}");
        assert!(
            e.to_string().contains("status 3") && e.to_string().ends_with("bad rule\nline two"),
            "{e}"
        );
        let e = classify(&exited(75 << 8, ""), &[], T).unwrap_err();
        assert!(matches!(e, SinkError::Permanent(_)), "{e}");
        assert!(e.to_string().contains("nothing to stderr"), "{e}");
        let e = classify(&exited(4 << 8, ""), &[4, 75], T).unwrap_err();
        assert!(e.is_retryable());
        // Killed by SIGSEGV (11), not by us.
        let e = classify(&exited(11, ""), &[75], T).unwrap_err();
        assert!(
            matches!(e, SinkError::Permanent(_)) && e.to_string().contains("SIGSEGV"),
            "{e}"
        );
        let timed_out = Outcome {
            ending: Ending::TimedOut,
            stderr: "waiting".into(),
        };
        let e = classify(&timed_out, &[75], T).unwrap_err();
        assert!(matches!(e, SinkError::Permanent(_)), "{e}");
        assert!(
            e.to_string().contains("5000 ms") && e.to_string().contains("waiting"),
            "{e}"
        );
    }

    #[test]
    fn spawn_errors_are_classified_by_errno() {
        let p = Path::new("/opt/x");
        let d = Path::new("/");
        for (errno, retryable) in [
            (Errno::ENOENT, false),
            (Errno::EACCES, false),
            (Errno::ENOEXEC, false),
            (Errno::E2BIG, false),
            (Errno::EAGAIN, true),
            (Errno::ENOMEM, true),
            (Errno::ETXTBSY, true),
            (Errno::EMFILE, true),
        ] {
            let e = spawn_error(p, d, &io::Error::from_raw_os_error(errno as i32));
            assert_eq!(e.is_retryable(), retryable, "{errno}: {e}");
            assert!(e.to_string().contains("/opt/x"), "{e}");
        }
    }

    #[test]
    fn the_event_is_in_the_environment_and_absent_fields_are_left_out() {
        let env = event_env("erp", &event(), JSON).unwrap();
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ESS_EVENT_ID"), Some("evt-1"));
        assert_eq!(get("ESS_EVENT_TYPE"), Some("rule.updated"));
        assert_eq!(get("ESS_EVENT_VERSION"), Some("3"));
        assert_eq!(get("ESS_EVENT_SUBJECT"), Some("case-42"));
        assert_eq!(get("ESS_EVENT_REVISION"), Some("7"));
        assert_eq!(get("ESS_EVENT_SOURCE"), None);
        assert_eq!(get("ESS_ROUTE"), Some("erp"));
        assert_eq!(get("ESS_PARTNER"), Some("p1"));
        assert_eq!(get("ESS_SINK"), Some("erp"));
        assert_eq!(get("ESS_CONTENT_TYPE"), Some(JSON));
        let mut bad = event();
        bad.subject = "a\0b".into();
        let e = event_env("erp", &bad, JSON).unwrap_err();
        assert!(e.to_string().contains("ESS_EVENT_SUBJECT"), "{e}");
    }

    #[test]
    fn input_is_the_text_of_a_string_and_json_otherwise() {
        assert_eq!(input(&json!("a,b\n")).unwrap(), (b"a,b\n".to_vec(), TEXT));
        assert_eq!(
            input(&json!([{"a": 1}, 2])).unwrap(),
            (b"[{\"a\":1},2]\n".to_vec(), JSON)
        );
    }

    #[test]
    fn arguments_are_rendered_per_event_and_a_missing_field_is_permanent() {
        let config: ExecConfig = toml::from_str(
            r#"program = "/bin/true"
args = ["--id={id}", "{subject} with spaces; $(no shell)", "{output.court}"]"#,
        )
        .unwrap();
        let sink = ExecSink::new(&config, "sinks.erp").unwrap();
        let args = sink
            .render_args(&event(), &json!({"court": "IL-COOK"}))
            .unwrap();
        assert_eq!(
            args,
            ["--id=evt-1", "case-42 with spaces; $(no shell)", "IL-COOK"]
        );
        let e = sink.render_args(&event(), &json!({})).unwrap_err();
        assert!(
            matches!(&e, SinkError::Permanent(m) if m.contains("args[2]") && m.contains("{output.court}")),
            "{e}"
        );
    }

    #[test]
    fn building_checks_the_program_and_the_directory_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let build = |program: &Path, working_dir: &Path| {
            let config: ExecConfig = toml::from_str(&format!(
                "program = {:?}\nworking_dir = {:?}",
                program.display().to_string(),
                working_dir.display().to_string()
            ))
            .unwrap();
            ExecSink::new(&config, "sinks.erp").map(|_| ())
        };
        let missing = dir.path().join("missing");
        let e = build(&missing, dir.path()).unwrap_err();
        assert_eq!(e.key, "sinks.erp.program");
        assert!(e.message.contains("install the program"), "{}", e.message);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let e = build(&plain, dir.path()).unwrap_err();
        // Root may execute a file without x bits only when some x bit is set.
        assert_eq!(e.key, "sinks.erp.program");
        assert!(e.message.contains("not executable"), "{}", e.message);
        let e = build(dir.path(), dir.path()).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{}", e.message);
        let e = build(Path::new("/bin/true"), &missing).unwrap_err();
        assert_eq!(e.key, "sinks.erp.working_dir");
        build(Path::new("/bin/true"), dir.path()).unwrap();
    }
}
