//! A fault-injecting TCP proxy: sits between the agent and a server on 127.0.0.1 and can cut or
//! stall the connection on command, for faults a real server cannot be asked to produce.
//!
//! - [`Proxy::cut`]: every open connection is closed at once, and new connections are closed as
//!   soon as they are accepted (the server looks down).
//! - [`Proxy::stall`]: open connections stay open but nothing is forwarded any more, and new
//!   connections are accepted and never answered (the network blackholes).
//! - [`Proxy::restore`]: traffic flows again; stalled connections are closed, so that clients
//!   notice and reconnect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    Stall,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections held open without forwarding while stalled.
    held: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (a free port) forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Pass);
        let held = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = {
            let mode = mode.clone();
            let held = held.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let current = *mode.borrow();
                    match current {
                        Mode::Cut => {
                            // Reset rather than close politely, like a host that went away.
                            let _ = client.set_zero_linger();
                            drop(client);
                        }
                        Mode::Stall => held.lock().unwrap().push(client),
                        Mode::Pass => {
                            tokio::spawn(pipe(client, target, mode.subscribe(), held.clone()));
                        }
                    }
                }
            })
        };
        Proxy {
            addr,
            mode,
            held,
            accepted,
            task,
        }
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
        self.held.lock().unwrap().clear();
    }

    /// Stops forwarding without closing anything until [`Proxy::restore`].
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Forwards again; connections held while stalled are closed.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Pass);
        self.held.lock().unwrap().clear();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
        self.held.lock().unwrap().clear();
    }
}

/// Forwards one connection until either side closes it or the mode changes.
async fn pipe(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    held: Arc<Mutex<Vec<TcpStream>>>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let changed = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
        tokio::select! {
            _ = copy => None,
            changed = mode.wait_for(|m| *m != Mode::Pass) => changed.ok().map(|m| *m),
        }
    };
    match changed {
        Some(Mode::Stall) => {
            let mut held = held.lock().unwrap();
            held.push(client);
            held.push(server);
        }
        _ => {
            let _ = client.set_zero_linger();
        }
    }
}
