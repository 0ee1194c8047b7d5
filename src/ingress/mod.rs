//! The hub-facing listener: TCP accept, TLS (rustls, ALPN h2 and http/1.1, optional mutual TLS),
//! HTTP/1.1 and HTTP/2 through hyper-util's auto builder, and the graceful drain.
//!
//! Ingress never touches a sink: it authenticates, validates, journals and answers.

pub mod conn;
pub mod handler;
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
use tokio::sync::{Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use conn::{Connection, Connections, ProblemAnswers};
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
///
/// Every connection, TLS or plain, HTTP/1 or HTTP/2, must deliver a complete request head within
/// `header_read_timeout` of its start or of the end of its previous request, or it is closed:
/// a client that sends nothing, trickles a head byte by byte, or keeps an HTTP/2 connection
/// open with no stream cannot hold a slot. At `max_connections`, the connection idle the longest
/// is closed to make room for the new one; only when every connection is busy with a request
/// does a new one wait in the listen queue.
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
    let connections = Arc::new(Connections::default());
    loop {
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
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => break,
            Err(TryAcquireError::NoPermits) => {
                if connections.evict_oldest_idle() {
                    tracing::debug!(peer = %peer, "connection limit reached: closing the connection idle the longest");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Arc::new(connections.open());
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let handler = handler.clone();
        let tls = tls.clone();
        let timeout = settings.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let work = async {
                match tls {
                    None => {
                        let client = Client {
                            peer,
                            subject: None,
                        };
                        serve_connection(&builder, watcher, stream, client, handler, &connection)
                            .await
                    }
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => {
                            let subject = tls::client_subject(&stream);
                            let client = Client { peer, subject };
                            serve_connection(
                                &builder,
                                watcher,
                                stream,
                                client,
                                handler,
                                &connection,
                            )
                            .await
                        }
                        Err(e) => tracing::warn!(peer = %peer, error = %e, "TLS handshake refused"),
                    },
                }
            };
            tokio::select! {
                _ = work => {}
                closed = connection.closing(timeout) => {
                    tracing::debug!(peer = %peer, reason = closed.as_str(), "connection closed by the agent");
                    metrics::counter!("ess_agent_connections_closed_total", "reason" => closed.as_str())
                        .increment(1);
                }
            }
        });
    }
    graceful
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub peer: SocketAddr,
    /// The subject of its certificate, with mutual TLS.
    pub subject: Option<Arc<str>>,
}

async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    client: Client,
    handler: Arc<Handler>,
    connection: &Arc<Connection>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = connection.clone();
    let peer = client.peer;
    let service = service_fn(move |req| {
        let handler = handler.clone();
        // The head has arrived: the connection is busy until the answer is made.
        let busy = connection.request();
        let client = client.clone();
        async move {
            let response = handler.handle(req, &client).await;
            drop(busy);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let io = TokioIo::new(ProblemAnswers::new(stream));
    let conn = builder.serve_connection(io, service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(peer = %peer, error = %e, "connection closed with an error");
    }
}
