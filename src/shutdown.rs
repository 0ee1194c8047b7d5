//! Signals and the graceful drain.
//!
//! The first SIGTERM or SIGINT cancels the shared token: the ingress listener closes (a new
//! connection is refused, a request on an open one gets 503 `shutting_down`), open connections
//! finish their current requests within the grace period, the journal finishes its queued writes
//! and closes. The admin listener stays up until then, for `/readyz` and `/metrics`. A second signal exits at once (the journal is crash-safe, so nothing
//! acknowledged is lost even then).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM/SIGINT; exits the process on the second.
pub fn spawn_signal_handler(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutting down: no new events are accepted, in-flight requests may finish"
        );
        token.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        };
        tracing::warn!("second signal: exiting now without waiting for in-flight requests");
        std::process::exit(1);
    });
    Ok(())
}
