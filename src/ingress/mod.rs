//! The hub-facing listener: TCP accept, TLS (rustls, ALPN h2 and http/1.1, optional mutual TLS),
//! HTTP/1.1 and HTTP/2 through hyper-util's auto builder, and the graceful drain.
//!
//! Ingress never touches a sink: it authenticates, validates, journals and answers.

pub mod auth;
pub mod envelope;
pub mod handler;
pub mod problem;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use handler::Handler;
use tls::TlsAcceptor;

/// The requests being handled right now, so that a shutdown that runs out of time can say which.
#[derive(Clone, Default)]
pub struct InFlight {
    next: Arc<AtomicU64>,
    requests: Arc<Mutex<HashMap<u64, String>>>,
}

/// Removes its request from [`InFlight`] when dropped.
pub struct InFlightGuard {
    id: u64,
    requests: Arc<Mutex<HashMap<u64, String>>>,
}

impl InFlight {
    /// Registers a request until the guard is dropped.
    pub fn enter(&self, peer: SocketAddr, path: &str) -> InFlightGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, format!("{peer} {path}"));
        InFlightGuard {
            id,
            requests: self.requests.clone(),
        }
    }

    /// A description of each request still running.
    pub fn describe(&self) -> Vec<String> {
        let mut list: Vec<_> = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort();
        list
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Builds the hyper connection builder shared by the ingress and admin listeners.
pub fn http_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    builder
}

/// Accepts connections until `stop` is cancelled, then stops accepting and asks every open
/// connection to finish its current requests. Returns the graceful-shutdown handle; awaiting
/// its `shutdown()` waits for those connections to close.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<Handler>,
    settings: ServerSettings,
    stop: CancellationToken,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = http_builder(settings.header_read_timeout);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE or a connection reset before accept: pause briefly so a
                    // persistent error does not spin, then go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let handler = handler.clone();
        let tls = tls.clone();
        let handshake_timeout = settings.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(&builder, watcher, stream, peer, handler).await,
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(&builder, watcher, stream, peer, handler).await
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %peer, error = %e, "TLS handshake refused")
                        }
                        Err(_) => {
                            tracing::warn!(peer = %peer, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    graceful
}

async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    peer: SocketAddr,
    handler: Arc<Handler>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, std::convert::Infallible>(handler.handle(req, peer).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(peer = %peer, error = %e, "connection closed with an error");
    }
}
