//! Secrets: where each comes from (a file or an environment variable, never inline), the rule
//! that exactly one of the two is set, and the reading of one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a secret comes from: exactly one of `file` or `env`. Secrets are never written inline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file whose contents (surrounding white space trimmed) are the secret.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// An environment variable whose value is the secret.
    #[serde(default)]
    pub env: Option<String>,
}

impl SecretSource {
    /// Pure check of the "exactly one of file or env" rule: the message says what to set.
    pub fn check(&self) -> Result<(), String> {
        match (&self.file, &self.env) {
            (Some(_), Some(_)) => Err("set either file or env, not both".into()),
            (None, None) => Err("set file = \"/path/to/secret\" or env = \"VARIABLE\"".into()),
            _ => Ok(()),
        }
    }

    /// Resolves a relative secret file against `base` (the configuration file's directory).
    pub fn resolve_path(&mut self, base: &Path) {
        if let Some(file) = &mut self.file
            && file.is_relative()
        {
            *file = base.join(&*file);
        }
    }
}

/// Reads one secret from its file or environment variable.
pub fn read_secret(source: &SecretSource) -> Result<String, String> {
    let value = match (&source.file, &source.env) {
        (Some(file), None) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read secret file {}: {e}", file.display()))?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("environment variable {var} is not set (or not valid UTF-8)"))?,
        _ => return Err("set exactly one of file or env".into()),
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(value)
}
