//! A real local HTTP server standing in for a partner endpoint or the hub's ack endpoint: it
//! records every request and answers with a scripted sequence of status codes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<u16>>,
    default_status: Mutex<u16>,
    /// A `Retry-After` value sent with every answer that is not a 2xx.
    retry_after: Mutex<Option<String>>,
    arrived: Notify,
}

/// A running test server. Stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl TestServer {
    /// Starts on a free loopback port; answers `default_status` unless scripted otherwise.
    pub async fn start(default_status: u16) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(State::default());
        *state.default_status.lock().unwrap() = default_status;
        TestServer::serve(listener, state)
    }

    /// Starts again on the same port with the same records (after [`TestServer::stop`]).
    pub async fn restart(&self) -> TestServer {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        TestServer::serve(listener, self.state.clone())
    }

    fn serve(listener: TcpListener, state: Arc<State>) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server_state = state.clone();
        let server_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = server_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let state = server_state.clone();
                let conn_stop = server_stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let status = {
                                let scripted = state.script.lock().unwrap().pop_front();
                                scripted.unwrap_or(*state.default_status.lock().unwrap())
                            };
                            state.received.lock().unwrap().push(Received {
                                path,
                                headers,
                                body,
                                at: Instant::now(),
                            });
                            state.arrived.notify_waiters();
                            let mut response = Response::new(Full::new(Bytes::from(format!(
                                "{{\"status\": {status}, \"note\": \"scripted answer\"}}"
                            ))));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            if let Some(wait) = state.retry_after.lock().unwrap().as_deref()
                                && !response.status().is_success()
                            {
                                response
                                    .headers_mut()
                                    .insert(http::header::RETRY_AFTER, wait.parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_stop.cancelled() => {}
                    }
                });
            }
        });
        TestServer { addr, state, stop }
    }

    /// Closes the listener and every connection: the server is unreachable until restarted.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The next answers, in order; then the default again.
    pub fn script(&self, statuses: &[u16]) {
        self.state
            .script
            .lock()
            .unwrap()
            .extend(statuses.iter().copied());
    }

    /// Sends `Retry-After: <value>` with every answer that is not a 2xx (`None`: no header).
    pub fn set_retry_after(&self, value: Option<&str>) {
        *self.state.retry_after.lock().unwrap() = value.map(str::to_owned);
    }

    /// Changes the default answer.
    pub fn set_default(&self, status: u16) {
        *self.state.default_status.lock().unwrap() = status;
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the requests received, up to `timeout`.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.arrived.notified();
            if pred(&self.received()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// The base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
