//! placeholder
pub mod auth;
pub mod envelope;
