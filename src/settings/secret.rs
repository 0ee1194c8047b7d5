//! Secrets: where each comes from (a file, an environment variable or a systemd credential, never
//! inline), the rule that exactly one of them is set, and the reading of one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a secret comes from: exactly one of `file`, `env` or `credential` (see
/// [`SecretSource::check`]). Secrets are never written inline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file whose contents (surrounding white space trimmed) are the secret.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// An environment variable whose value is the secret.
    #[serde(default)]
    pub env: Option<String>,
    /// A systemd credential: the file of this name in `$CREDENTIALS_DIRECTORY`, which systemd
    /// fills from the unit's `LoadCredential=` or `LoadCredentialEncrypted=`.
    #[serde(default)]
    pub credential: Option<String>,
}

/// The environment variable systemd sets to the directory holding a service's credentials.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

impl SecretSource {
    /// The rule every secret follows, wherever it is configured: exactly one source, and a
    /// credential name is a plain file name.
    pub fn check(&self) -> Result<(), String> {
        let set = [
            self.file.is_some(),
            self.env.is_some(),
            self.credential.is_some(),
        ];
        match set.iter().filter(|s| **s).count() {
            0 => Err(
                "set one of file = \"/path/to/secret\", env = \"VARIABLE\" or \
                      credential = \"NAME\""
                    .into(),
            ),
            1 => match &self.credential {
                Some(name)
                    if name.is_empty() || name == "." || name == ".." || name.contains('/') =>
                {
                    Err(format!(
                        "credential {name:?} is not a credential name: give the name before \
                         the colon in LoadCredential=NAME:/path (no slashes)"
                    ))
                }
                _ => Ok(()),
            },
            _ => Err("set only one of file, env and credential".into()),
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

/// Reads one secret from its file, environment variable or systemd credential.
pub fn read_secret(source: &SecretSource) -> Result<String, String> {
    read_secret_from(source, std::env::var_os(CREDENTIALS_DIRECTORY).as_deref())
}

/// [`read_secret`] with systemd's credentials directory given.
pub(crate) fn read_secret_from(
    source: &SecretSource,
    credentials: Option<&std::ffi::OsStr>,
) -> Result<String, String> {
    source.check()?;
    let value = if let Some(file) = &source.file {
        std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read secret file {}: {e}", file.display()))?
    } else if let Some(var) = &source.env {
        std::env::var(var)
            .map_err(|_| format!("environment variable {var} is not set (or not valid UTF-8)"))?
    } else if let Some(name) = &source.credential {
        let dir = credentials.filter(|d| !d.is_empty()).ok_or_else(|| {
            format!(
                "credential {name}: {CREDENTIALS_DIRECTORY} is not set; it is only set when \
                 systemd starts the agent with LoadCredential= (or LoadCredentialEncrypted=); \
                 use file = ... outside systemd"
            )
        })?;
        let path = Path::new(dir).join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read credential {name} ({}): {e}; the unit needs \
                 LoadCredential={name}:/path/to/secret",
                path.display()
            )
        })?
    } else {
        unreachable!("check() makes sure one source is set")
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(value)
}
