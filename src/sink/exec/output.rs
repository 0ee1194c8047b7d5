//! The program's stdout and stderr: split into lines, written to the agent's log (bounded in
//! line length and count), and the last lines of stderr kept for the error of a failed run.
//! Nothing of it is journaled apart from that bounded tail.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest line logged; the rest of a longer line is cut off (and said so).
pub const MAX_LINE_BYTES: usize = 2000;
/// The most lines of one stream logged per run; further lines are counted, not logged.
pub const MAX_LOG_LINES: usize = 200;
/// The most lines of stderr a failed run's error carries (its last ones).
pub const TAIL_LINES: usize = 20;
/// The most bytes of stderr a failed run's error carries.
pub const TAIL_BYTES: usize = 4096;

/// Which of the program's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Who wrote the lines, for the log.
#[derive(Debug, Clone)]
pub struct LogContext {
    pub sink: String,
    pub event_id: String,
    pub route: String,
}

/// Splits bytes into lines of at most `max` bytes: a longer line keeps its first `max` bytes
/// and is marked as cut, and the rest of it up to its newline is dropped, so that a program
/// writing megabytes without a newline holds at most `max` bytes in memory.
#[derive(Debug)]
struct LineSplitter {
    max: usize,
    current: Vec<u8>,
    cut: bool,
}

impl LineSplitter {
    fn new(max: usize) -> LineSplitter {
        LineSplitter {
            max,
            current: Vec::new(),
            cut: false,
        }
    }

    /// Feeds a chunk; `line` is called with every completed line (without its newline, a
    /// trailing `\r` removed) and whether it was cut.
    fn push(&mut self, mut chunk: &[u8], line: &mut impl FnMut(String, bool)) {
        while !chunk.is_empty() {
            let end = chunk.iter().position(|&b| b == b'\n');
            let part = &chunk[..end.unwrap_or(chunk.len())];
            let room = self.max - self.current.len();
            if part.len() > room {
                self.cut = true;
            }
            self.current
                .extend_from_slice(&part[..part.len().min(room)]);
            match end {
                Some(end) => {
                    self.emit(line);
                    chunk = &chunk[end + 1..];
                }
                None => break,
            }
        }
    }

    /// Ends the stream: a last line without a newline is emitted.
    fn finish(&mut self, line: &mut impl FnMut(String, bool)) {
        if !self.current.is_empty() || self.cut {
            self.emit(line);
        }
    }

    fn emit(&mut self, line: &mut impl FnMut(String, bool)) {
        if self.current.last() == Some(&b'\r') {
            self.current.pop();
        }
        let text = String::from_utf8_lossy(&self.current).into_owned();
        line(text, std::mem::take(&mut self.cut));
        self.current.clear();
    }
}

/// What was seen of one stream.
#[derive(Debug, Default)]
pub struct StreamSummary {
    /// Lines written, logged or not.
    pub lines: usize,
    /// The last lines (stderr only), at most [`TAIL_LINES`].
    tail: VecDeque<String>,
}

impl StreamSummary {
    /// The last lines, at most [`TAIL_LINES`] and [`TAIL_BYTES`] in all (the latest kept),
    /// joined by newlines; empty when the stream was.
    pub fn tail(&self) -> String {
        let mut kept = Vec::new();
        let mut bytes = 0;
        for line in self.tail.iter().rev() {
            let cost = line.len() + usize::from(!kept.is_empty());
            if bytes + cost > TAIL_BYTES {
                if kept.is_empty() {
                    // A single line longer than the budget: its end, where errors usually are.
                    let mut start = line.len() - TAIL_BYTES;
                    while !line.is_char_boundary(start) {
                        start += 1;
                    }
                    kept.push(&line[start..]);
                }
                break;
            }
            bytes += cost;
            kept.push(line.as_str());
        }
        kept.reverse();
        kept.join("\n")
    }
}

/// Reads `pipe` to its end, logging each line (the first [`MAX_LOG_LINES`]) and, for stderr,
/// keeping the last ones in `summary`, which stays readable when the reading is abandoned.
pub async fn drain(
    mut pipe: impl AsyncRead + Unpin,
    stream: Stream,
    context: LogContext,
    summary: Arc<Mutex<StreamSummary>>,
) {
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut buf = vec![0u8; 8192];
    let mut record = |line: String, cut: bool| {
        let mut summary = summary.lock().unwrap_or_else(|p| p.into_inner());
        summary.lines += 1;
        if summary.lines <= MAX_LOG_LINES {
            tracing::info!(
                sink = %context.sink,
                event_id = %context.event_id,
                route = %context.route,
                stream = stream.name(),
                cut,
                line = %line,
                "program output"
            );
        }
        if stream == Stream::Stderr {
            if summary.tail.len() == TAIL_LINES {
                summary.tail.pop_front();
            }
            summary.tail.push_back(line);
        }
    };
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => splitter.push(&buf[..n], &mut record),
            // The program's end of the pipe is gone in some unusual way; what was read counts.
            Err(_) => break,
        }
    }
    splitter.finish(&mut record);
    let lines = summary.lock().unwrap_or_else(|p| p.into_inner()).lines;
    if lines > MAX_LOG_LINES {
        tracing::info!(
            sink = %context.sink,
            event_id = %context.event_id,
            route = %context.route,
            stream = stream.name(),
            not_logged = lines - MAX_LOG_LINES,
            "program output: further lines not logged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(max);
        let mut line = |text, cut| out.push((text, cut));
        for chunk in chunks {
            splitter.push(chunk, &mut line);
        }
        splitter.finish(&mut line);
        out
    }

    #[test]
    fn lines_are_split_across_chunks() {
        assert_eq!(
            split(100, &[b"ab", b"c\nd\r\n", b"\nlast"]),
            [
                ("abc".to_string(), false),
                ("d".to_string(), false),
                (String::new(), false),
                ("last".to_string(), false)
            ]
        );
        assert!(split(100, &[]).is_empty());
        assert_eq!(split(100, &[b"x\n"]), [("x".to_string(), false)]);
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped() {
        let long = vec![b'a'; 10_000];
        let out = split(8, &[&long, &long, b"\nok\n"]);
        assert_eq!(
            out,
            [("aaaaaaaa".to_string(), true), ("ok".to_string(), false)]
        );
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(
            split(100, &[b"a\xffb\n"]),
            [("a\u{fffd}b".to_string(), false)]
        );
    }

    #[test]
    fn the_tail_keeps_the_last_lines_within_both_bounds() {
        let mut s = StreamSummary::default();
        for i in 0..50 {
            if s.tail.len() == TAIL_LINES {
                s.tail.pop_front();
            }
            s.tail.push_back(format!("line {i}"));
        }
        let tail = s.tail();
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(
            tail.starts_with("line 30\n") && tail.ends_with("line 49"),
            "{tail}"
        );

        let mut s = StreamSummary::default();
        for c in ['a', 'b', 'c'] {
            s.tail.push_back(c.to_string().repeat(MAX_LINE_BYTES));
        }
        let tail = s.tail();
        assert!(tail.len() <= TAIL_BYTES, "{}", tail.len());
        assert!(tail.ends_with('c') && tail.contains('b') && !tail.contains('a'));

        let mut s = StreamSummary::default();
        s.tail.push_back("é".repeat(TAIL_BYTES));
        let tail = s.tail();
        assert!(tail.len() <= TAIL_BYTES && tail.chars().all(|c| c == 'é'));
        assert_eq!(StreamSummary::default().tail(), "");
    }
}
