//! The integration tests: each starts the real `ess-agent` binary.

mod support;

mod jsonata_conformance;
mod receive;
