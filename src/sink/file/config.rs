//! The `file` sink's configuration: its serde type and pure checks.

use std::sync::Arc;

use crate::settings::Problem;
use crate::settings::RetryConfig;
use crate::sink::template::{Template, safe_relative_path};
use crate::sink::{BuildContext, Sink, SinkSpec};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Configuration of a `file` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The root directory files are written under. Relative paths are resolved against the
    /// configuration file's directory. Required.
    pub dir: PathBuf,
    /// Create `dir` (and its missing parents) on the first write when it does not exist. When
    /// false, a missing `dir` is treated as a share that is not mounted yet and the write is
    /// retried. Default: true.
    #[serde(default = "default_true")]
    pub create_dir: bool,
    /// Template of each file's name relative to `dir`, e.g. `{subject}/{id}.json`; `/` makes
    /// subdirectories, which are created as needed. Placeholders: `{id}` `{type}` `{version}`
    /// `{subject}` `{revision}` `{source}` `{partner}` `{route}` `{index}` `{date}` `{hour}`
    /// `{output.<field>}`; `{{` and `}}` are literal braces. Required.
    pub name: String,
    /// How records are written: `"file"`, each record its own file (replaced whole on a
    /// retry); or `"append"`, each record one line of an NDJSON file that `name` names, e.g.
    /// `"events-{date}.ndjson"` (see docs/sinks/file.md). Default: `"file"`.
    #[serde(default)]
    pub mode: WriteMode,
    /// Permission bits of written files as an octal string, e.g. `"0640"`. Default: none, so
    /// files get `0666` minus the process umask.
    #[serde(default)]
    pub file_mode: Option<String>,
    /// Retry policy for retryable failures. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

/// How a `file` sink writes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum WriteMode {
    /// One file per record, written to a temporary name and renamed into place.
    #[default]
    File,
    /// One line per record, appended to the file the name renders.
    Append,
}

impl TryFrom<String> for WriteMode {
    type Error = String;

    fn try_from(text: String) -> Result<WriteMode, String> {
        match text.as_str() {
            "file" => Ok(WriteMode::File),
            "append" => Ok(WriteMode::Append),
            other if parse_mode(other).is_ok() => Err(format!(
                "mode is how records are written, `file` or `append`; permission bits such as \
                 `{other}` go in file_mode"
            )),
            other => Err(format!(
                "unknown mode `{other}`: write `file` (a file per record) or `append` (a line \
                 per record)"
            )),
        }
    }
}

pub(super) fn default_true() -> bool {
    true
}

/// Parses an octal permission string such as `"0640"` or `"640"`.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let mode = (!digits.is_empty() && digits.len() <= 4)
        .then(|| u32::from_str_radix(digits, 8).ok())
        .flatten()
        .ok_or_else(|| {
            format!("{text:?} is not an octal permission string: write it like \"0640\"")
        })?;
    if mode > 0o777 {
        return Err(format!(
            "{text:?} sets setuid, setgid or sticky bits: use permission bits only, like \"0640\""
        ));
    }
    Ok(mode)
}

impl SinkSpec for FileConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Resolves a relative `dir` against `base`.
    fn resolve_paths(&mut self, base: &Path) {
        if self.dir.is_relative() {
            self.dir = base.join(&self.dir);
        }
    }

    /// Pure checks; `key` is this sink's key path.
    fn validate(&self, key: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| {
            problems.push(Problem {
                key: format!("{key}.{field}"),
                message,
            })
        };
        if self.dir.as_os_str().is_empty() {
            bad(
                "dir",
                "must not be empty: set the directory to write into".into(),
            );
        }
        match Template::parse(&self.name) {
            Err(message) => bad("name", message),
            Ok(_) if self.name.starts_with('/') => bad(
                "name",
                format!(
                    "{:?} is absolute: names are relative to dir; put the fixed part of the path \
                     in dir",
                    self.name
                ),
            ),
            Ok(template) => {
                // Render every placeholder as a plain word, so that only the literal parts are
                // checked: `../{id}` or `a//{id}` can never render to a safe name.
                let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
                if let Err(e) = safe_relative_path(&sample) {
                    bad(
                        "name",
                        format!(
                            "{:?} can never render a safe name ({e}); write it like \
                             \"{{subject}}/{{id}}.json\"",
                            self.name
                        ),
                    );
                }
            }
        }
        if let Some(mode) = &self.file_mode
            && let Err(message) = parse_mode(mode)
        {
            bad("file_mode", message);
        }
        problems
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::FileSink::new(self).map_err(|m| context.problem(m))?,
        ))
    }
}
