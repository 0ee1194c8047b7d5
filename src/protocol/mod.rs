//! The hub's wire contract (PROTOCOL.md), with nothing of the agent's runtime in it: the
//! Change Event envelope and its CloudEvents forms ([`envelope`]), Standard Webhooks signing and
//! verifying and bearer tokens ([`auth`]), and RFC 9457 problem details ([`problem`]). Ingress,
//! the status reporter, `ess-agent send` and the adapter fixtures all use it.

pub mod auth;
pub mod envelope;
pub mod problem;
