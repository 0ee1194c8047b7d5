//! Adapters: the partner's JSONata scripts that reshape an event for the partner's system.
//!
//! [`engine`] is the seam to the JSONata implementation; [`Adapter`] is one compiled script
//! file with what an operator needs to know about it (path, checksum, load time);
//! [`diagnostics`] words errors for the people who write the scripts; [`fixtures`] runs the
//! example events kept beside each script as tests.

pub mod diagnostics;
pub mod engine;
pub mod fixtures;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

use engine::{EngineError, Expression, Limits};

/// The variables every adapter gets: `$partner`, the agent id.
fn partner_binding(partner: &str) -> Map<String, Value> {
    let mut bindings = Map::new();
    bindings.insert("partner".into(), Value::String(partner.to_owned()));
    bindings
}

/// A compiled adapter script.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The script file.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex.
    pub checksum: String,
    /// When it was compiled.
    pub loaded_at: SystemTime,
    expression: Expression,
}

/// Why an adapter could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot read adapter {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The script does not compile. `rendered` quotes the line with a caret under the column.
    #[error("{rendered}")]
    Compile {
        path: PathBuf,
        error: EngineError,
        rendered: String,
    },
}

impl Adapter {
    /// Reads and compiles the script at `path`.
    pub fn load(path: &Path) -> Result<Adapter, AdapterError> {
        let bytes = std::fs::read(path).map_err(|e| AdapterError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let source = String::from_utf8(bytes.clone()).map_err(|_| AdapterError::Read {
            path: path.to_owned(),
            reason: "the file is not valid UTF-8".into(),
        })?;
        let expression = Expression::compile(&source).map_err(|error| AdapterError::Compile {
            rendered: error.render(&path.display().to_string(), &source),
            path: path.to_owned(),
            error,
        })?;
        Ok(Adapter {
            path: path.to_owned(),
            checksum: hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()),
            loaded_at: SystemTime::now(),
            expression,
        })
    }

    /// Runs the script on `input` with `$partner` bound. `None` is JSONata's `undefined`.
    pub fn evaluate(
        &self,
        input: &Value,
        partner: &str,
        limits: &Limits,
    ) -> Result<Option<Value>, EngineError> {
        self.expression
            .evaluate(input, &partner_binding(partner), limits)
    }

    /// [`Adapter::evaluate`] on an input given as JSON text (see
    /// [`Expression::evaluate_text`]).
    pub fn evaluate_text(
        &self,
        input: &str,
        partner: &str,
        limits: &Limits,
    ) -> Result<Option<Value>, EngineError> {
        self.expression
            .evaluate_text(input, &partner_binding(partner), limits)
    }

    /// [`Adapter::evaluate_text`] with the time limit cut to `budget` (see
    /// [`Expression::evaluate_text_brief`]).
    pub fn evaluate_text_brief(
        &self,
        input: &str,
        partner: &str,
        limits: &Limits,
        budget: std::time::Duration,
    ) -> Result<Option<Value>, EngineError> {
        self.expression
            .evaluate_text_brief(input, &partner_binding(partner), limits, budget)
    }

    /// The script's source text.
    pub fn source(&self) -> &str {
        self.expression.source()
    }

    /// The message for an event that `err` stopped in this adapter, as kept with the dead
    /// letter: it names the script, the event, the line and column, the failing part of the
    /// script and the value it got, and says what to do (see [`diagnostics`]).
    pub fn describe_failure(&self, err: &EngineError, event_id: &str) -> String {
        diagnostics::describe_failure(
            err,
            &self.path.display().to_string(),
            self.source(),
            event_id,
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failure_names_the_adapter_the_event_and_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fees.jsonata");
        std::fs::write(&path, "{\n  'total': payload.count + 1\n}").unwrap();
        let adapter = Adapter::load(&path).unwrap();
        let input = json!({"id": "evt-7", "payload": {"count": "3"}});
        let err = adapter
            .evaluate(&input, "acme", &Limits::default())
            .unwrap_err();
        assert_eq!(
            adapter.describe_failure(&err, "evt-7"),
            format!(
                "adapter {} failed on event evt-7 at line 2, column 26: error T2001: the left \
                 side of the \"+\" operator must be a number\n 2 |   'total': payload.count + \
                 1\n   |                          ^\n`payload.count` is \"3\" (a string).\nTo \
                 join text, use & instead of +; to add, convert the text first with \
                 $number(...).",
                path.display()
            )
        );
        // A limit has no place in the script.
        let err = EngineError {
            message: "the time limit of 100 ms was exceeded".into(),
            ..EngineError::internal(String::new())
        };
        let err = EngineError {
            code: engine::CODE_TIMEOUT.into(),
            ..err
        };
        assert!(
            adapter
                .describe_failure(&err, "evt-7")
                .starts_with(&format!(
                    "adapter {} failed on event evt-7: error U1001: the time limit of 100 ms \
                     was exceeded\nLook for a loop",
                    path.display()
                ))
        );
    }

    #[test]
    fn a_compile_error_quotes_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonata");
        std::fs::write(&path, "{\n  'a': [1, 2\n}").unwrap();
        let err = Adapter::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:3:1: error S0202: expected \"]\" but found \"}}\"\n 3 | }}\n   | ^\nThe \"[\" \
                 at line 2, column 8 must be closed with \"]\" before this \"}}\".",
                path.display()
            )
        );
    }
}
