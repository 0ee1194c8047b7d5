//! What the ingress listener keeps per open connection: whether a request is in progress and
//! since when it has been idle, so that a connection that sends nothing (or a request head too
//! slowly) is closed after `limits.header_read_timeout_ms`, and so that, at the connection limit,
//! the connection idle the longest makes room for a new one.
//!
//! Also the answers hyper writes by itself for a request it cannot parse (400, 414, 431): they
//! are rewritten on their way out into problem+json like every other error answer.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::problem::Problem;

/// Whether a connection is handling requests, and since when it has been idle.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Requests whose head has arrived and whose handler has not finished.
    active: usize,
    /// When the connection was accepted or its last request finished.
    idle_since: Instant,
}

/// One open connection as the registry sees it.
struct Tracked {
    activity: watch::Sender<Activity>,
    /// Cancelled to close the connection at once (to make room for a new one).
    evict: CancellationToken,
}

/// Why a connection was closed by the agent rather than by its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No complete request head within the header read timeout.
    Idle,
    /// Closed while idle to make room at the connection limit.
    Evicted,
}

impl Closed {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Idle => "idle",
            Closed::Evicted => "evicted",
        }
    }
}

/// The open connections of one listener.
#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Connections {
    /// Registers a connection just accepted; it counts as idle from now.
    pub fn open(self: &Arc<Self>) -> Connection {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (activity, _) = watch::channel(Activity {
            active: 0,
            idle_since: Instant::now(),
        });
        let tracked = Arc::new(Tracked {
            activity,
            evict: CancellationToken::new(),
        });
        self.lock().insert(id, tracked.clone());
        Connection {
            id,
            tracked,
            registry: self.clone(),
        }
    }

    /// Closes the connection that has been idle the longest, if any connection is idle.
    /// Returns whether one was chosen.
    pub fn evict_oldest_idle(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .values()
            .filter(|t| !t.evict.is_cancelled())
            .filter_map(|t| {
                let a = *t.activity.borrow();
                (a.active == 0).then_some((a.idle_since, t))
            })
            .min_by_key(|(since, _)| *since);
        match oldest {
            Some((_, tracked)) => {
                tracked.evict.cancel();
                true
            }
            None => false,
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registered connection; leaves the registry when dropped.
pub struct Connection {
    id: u64,
    tracked: Arc<Tracked>,
    registry: Arc<Connections>,
}

impl Connection {
    /// Marks a request as in progress until the returned guard is dropped.
    pub fn request(&self) -> RequestGuard {
        self.tracked.activity.send_modify(|a| a.active += 1);
        RequestGuard {
            tracked: self.tracked.clone(),
        }
    }

    /// Resolves when the agent should close this connection: it has been idle (no request in
    /// progress) for `timeout`, or it was evicted to make room.
    pub async fn closing(&self, timeout: Duration) -> Closed {
        let mut activity = self.tracked.activity.subscribe();
        loop {
            let now = *activity.borrow_and_update();
            if now.active > 0 {
                // A connection chosen for eviction just as a request began closes once that
                // request is answered.
                let _ = activity.changed().await;
                continue;
            }
            if self.tracked.evict.is_cancelled() {
                return Closed::Evicted;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(now.idle_since + timeout) => return Closed::Idle,
                _ = self.tracked.evict.cancelled() => return Closed::Evicted,
                _ = activity.changed() => {}
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Counts one request as in progress on its connection.
pub struct RequestGuard {
    tracked: Arc<Tracked>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.tracked.activity.send_modify(|a| {
            a.active = a.active.saturating_sub(1);
            if a.active == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// Wraps a connection's stream so that the bodiless answer hyper writes by itself for a request
/// it cannot parse (400, 414 or 431, the whole head in one write) goes out as problem+json.
pub struct ProblemAnswers<S> {
    inner: S,
    /// The rewritten answer still to be written.
    pending: Vec<u8>,
    written: usize,
}

impl<S> ProblemAnswers<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> ProblemAnswers<S> {
    /// Writes what is left of a rewritten answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if !self.pending.is_empty() {
            self.pending = Vec::new();
            self.written = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ProblemAnswers<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ProblemAnswers<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(answer) = rewrite_parse_error(buf) {
            this.pending = answer;
            this.written = 0;
            // The caller's bytes are taken: they are replaced by the pending answer, which
            // flush and shutdown finish writing.
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The problem+json answer for hyper's automatic answer in `head`, or `None` when `head` is
/// anything else.
///
/// hyper answers a request it cannot parse with a status line, `connection: close`,
/// `content-length: 0` and `date`, nothing more, written at once. Every answer of the agent's own has a content type, so a
/// bodiless 400, 414 or 431 head without one can only be hyper's.
pub fn rewrite_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let (code, detail) = match head.get(..12)? {
        b"HTTP/1.1 400" | b"HTTP/1.0 400" => (
            "malformed_request",
            "the request is not valid HTTP/1.1: its method, target, version or a header line \
             could not be parsed (a bare LF, a space before a colon, a control character or an \
             obsolete line folding); send a well-formed request",
        ),
        b"HTTP/1.1 414" | b"HTTP/1.0 414" => (
            "uri_too_long",
            "the request target is longer than this agent reads; deliveries go to a short path \
             such as /v1/events",
        ),
        b"HTTP/1.1 431" | b"HTTP/1.0 431" => (
            "headers_too_large",
            "the request head is larger than this agent reads (at most 100 header fields, about \
             400 KiB in all); send fewer or smaller headers",
        ),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let fields = text.strip_suffix("\r\n\r\n")?;
    let mut lines = fields.split("\r\n");
    let status_line = lines.next()?;
    let mut date = None;
    let mut bodiless = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" if value.trim() == "0" => bodiless = true,
            "date" => date = Some(value.trim()),
            // hyper closes the connection after a parse error; so does the rewritten answer.
            "connection" if value.trim().eq_ignore_ascii_case("close") => {}
            // Anything else (a content type above all) is an answer of the agent's own.
            _ => return None,
        }
    }
    if !bodiless {
        return None;
    }
    let status = http::StatusCode::from_bytes(&head[9..12]).ok()?;
    let body = serde_json::to_vec(&Problem::new(status, code, detail)).ok()?;
    let mut answer = format!(
        "{status_line}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(date) = date {
        answer.push_str(&format!("date: {date}\r\n"));
    }
    answer.push_str("\r\n");
    let mut answer = answer.into_bytes();
    answer.extend_from_slice(&body);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_automatic_answers_become_problems() {
        for (status, code) in [
            ("400 Bad Request", "malformed_request"),
            ("414 URI Too Long", "uri_too_long"),
            ("431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let head = format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 08:00:00 GMT\r\n\r\n"
            );
            let answer = rewrite_parse_error(head.as_bytes()).expect("rewritten");
            let text = String::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert!(
                head.contains("content-type: application/problem+json"),
                "{head}"
            );
            assert!(
                head.contains(&format!("content-length: {}", body.len())),
                "{head}"
            );
            assert!(
                head.contains("date: Sun, 06 Dec 2026 08:00:00 GMT"),
                "{head}"
            );
            let problem: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(problem["code"], code);
            assert_eq!(problem["status"], status[..3].parse::<u16>().unwrap());
        }
    }

    #[test]
    fn the_agents_own_answers_pass_unchanged() {
        for head in [
            // An answer of the agent's own always has a content type.
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
            // A head and its body in one write.
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx",
            "HTTP/1.1 400",
            "",
        ] {
            assert!(rewrite_parse_error(head.as_bytes()).is_none(), "{head}");
        }
    }

    #[tokio::test]
    async fn a_rewritten_answer_is_written_whole_through_flush() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A pipe with a tiny buffer, so the answer cannot go out in one write.
        let (client, server) = tokio::io::duplex(16);
        let mut io = ProblemAnswers::new(server);
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        assert_eq!(io.write(head).await.unwrap(), head.len());
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        let all = String::from_utf8(reader.await.unwrap()).unwrap();
        let (_, body) = all.split_once("\r\n\r\n").unwrap();
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["code"], "headers_too_large");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_timeout_counted_from_its_last_request() {
        let registry = Arc::new(Connections::default());
        let conn = registry.open();
        let timeout = Duration::from_secs(10);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let guard = conn.request();
        let closing = conn.closing(timeout);
        tokio::pin!(closing);
        // A request in progress keeps it open however long it takes.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), closing.as_mut())
                .await
                .is_err()
        );
        drop(guard);
        let ended = Instant::now();
        assert_eq!(closing.await, Closed::Idle);
        assert_eq!(Instant::now() - ended, timeout);
        assert!(Instant::now() - start > timeout * 6);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_picks_the_connection_idle_the_longest() {
        let registry = Arc::new(Connections::default());
        let oldest = registry.open();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy_since_before = registry.open();
        let _busy = busy_since_before.request();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let newer = registry.open();
        assert_eq!(registry.len(), 3);

        assert!(registry.evict_oldest_idle());
        let timeout = Duration::from_secs(3600);
        assert_eq!(oldest.closing(timeout).await, Closed::Evicted);
        // The next one is the newer idle connection, never the busy one.
        assert!(registry.evict_oldest_idle());
        assert_eq!(newer.closing(timeout).await, Closed::Evicted);
        assert!(!registry.evict_oldest_idle());
        drop((oldest, newer));
        assert_eq!(registry.len(), 1);
    }
}
