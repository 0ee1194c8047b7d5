//! Adapters: the partner's JSONata scripts that reshape an event for the partner's system.
//!
//! [`engine`] is the seam to the JSONata implementation; [`Adapter`] is one compiled script
//! file with what an operator needs to know about it (path, checksum, load time).

pub mod engine;
pub mod fixtures;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

use engine::{EngineError, Expression, Limits};

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
        let mut bindings = Map::new();
        bindings.insert("partner".into(), Value::String(partner.to_owned()));
        self.expression.evaluate(input, &bindings, limits)
    }

    /// The script's source text.
    pub fn source(&self) -> &str {
        self.expression.source()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
