//! Small settings types shared by the configuration, the sinks and the runtime: they depend on
//! nothing else in the crate, so every other module may use them.
//!
//! - [`database`]: a database connection's TLS mode, and the rule that a URL carries no password;
//! - [`problem`]: a configuration problem with its key path;
//! - [`secret`]: where a secret comes from, the "exactly one of file, env or credential" rule, its reading;
//! - [`retry`]: a sink's retry policy (backoff with full jitter);
//! - [`tls`]: TLS settings, the reading of PEM files and the crypto provider;
//! - [`version`]: ranges of schema versions.

pub mod database;
pub mod problem;
pub mod retry;
pub mod secret;
pub mod tls;
pub mod version;

pub use problem::Problem;
pub use retry::RetryConfig;
pub use secret::{SecretSource, read_secret};
pub use tls::TlsConfig;
pub use version::VersionRange;
