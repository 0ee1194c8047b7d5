//! PLACEHOLDER: the HTTP sink is being written; this stub only fixes the interface.
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{EventMeta, RetryConfig, Sink, SinkError};
use crate::config::Problem;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub url: String,
    #[serde(default)]
    pub retry: RetryConfig,
}

impl HttpConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        let _ = base;
    }
    pub fn validate(&self, _key: &str) -> Vec<Problem> {
        Vec::new()
    }
}

pub struct HttpSink;

impl HttpSink {
    pub fn new(_config: &HttpConfig) -> Result<HttpSink, String> {
        Ok(HttpSink)
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    async fn apply(&self, _event: &EventMeta, _output: &Value) -> Result<(), SinkError> {
        Err(SinkError::Permanent("not implemented".into()))
    }
}
