//! PLACEHOLDER: the file sink is being written; this stub only fixes the interface.
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{EventMeta, RetryConfig, Sink, SinkError};
use crate::config::Problem;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub dir: PathBuf,
    pub name: String,
    #[serde(default)]
    pub retry: RetryConfig,
}

impl FileConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.dir.is_relative() {
            self.dir = base.join(&self.dir);
        }
    }
    pub fn validate(&self, _key: &str) -> Vec<Problem> {
        Vec::new()
    }
}

pub struct FileSink;

impl FileSink {
    pub fn new(_config: &FileConfig) -> Result<FileSink, String> {
        Ok(FileSink)
    }
}

#[async_trait::async_trait]
impl Sink for FileSink {
    async fn apply(&self, _event: &EventMeta, _output: &Value) -> Result<(), SinkError> {
        Err(SinkError::Permanent("not implemented".into()))
    }
}
