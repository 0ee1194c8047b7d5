//! `mode = "append"`: each record becomes one line of an NDJSON file whose name the template
//! renders (`events-{date}.ndjson`), written exactly once.
//!
//! # A line
//!
//! `{"id":"<event id>","route":"<route>","index":<record index>,"record":<the record>}` and a
//! newline, compact JSON. The record is the adapter's value as is; a string record is a JSON
//! string (a line cannot carry raw text, which may hold newlines).
//!
//! # Exactly once
//!
//! The event id, route and index are the record's key. The first time this process writes to a
//! file, it reads the whole file: it learns the keys already in it and cuts off what a crash
//! left at its end (see [`scan`]). A record whose key is in the file is not written again, so a
//! retry after a crash, or after a failure between writing and syncing, adds nothing. The keys
//! of open files are kept in memory (16 bytes of hash per line); beyond the [`OPEN_FILES`]
//! written most recently, files are closed and read again when written to. The open files are
//! the process's, not a sink's (see [`shared`]).
//!
//! # Durable before applied
//!
//! An event's lines for one file go out in one `write` to the file opened with `O_APPEND`,
//! under the file's lock; then the event joins the file's group `fdatasync` (see
//! [`super::group`]): concurrent events share one, and none counts as applied before an
//! `fdatasync` that started after its write has returned. A new file's directory is fsynced
//! before anything is written into it. When a write fails halfway, the file is cut back to
//! where it was. When an `fdatasync` fails, Linux may have dropped the unwritten pages and a
//! later `fdatasync` would succeed without them; so the file is cut back to its last synced
//! length, the keys of the lines cut are forgotten, and every event whose lines were cut fails
//! (retryably) and writes them again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::group::{Group, lock};
use super::{Writer, classify};
use crate::sink::template::{Template, safe_relative_path};
use crate::sink::{EventMeta, SinkError};

/// How many files stay open with their keys in memory; the least recently written beyond
/// this are closed (and read again when written to).
const OPEN_FILES: usize = 16;

/// The lines of one event, by the file they go to.
pub(super) type Planned = BTreeMap<PathBuf, Vec<Line>>;

/// One record's line.
pub(super) struct Line {
    key: u128,
    bytes: Vec<u8>,
}

#[derive(Serialize)]
struct Written<'a> {
    id: &'a str,
    route: &'a str,
    index: usize,
    record: &'a Value,
}

#[derive(Deserialize)]
struct Read_ {
    id: String,
    route: String,
    index: usize,
    #[allow(dead_code)]
    record: serde::de::IgnoredAny,
}

/// The key of a record: 128 bits of SHA-256 over the event id, route and index.
fn key(id: &str, route: &str, index: usize) -> u128 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [id.as_bytes(), route.as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.update(&(index as u64).to_be_bytes());
    let digest = ctx.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_be_bytes(bytes)
}

/// The key of a line as written, or None when it is not a line of this form.
fn key_of_line(line: &[u8]) -> Option<u128> {
    let read: Read_ = serde_json::from_slice(line).ok()?;
    Some(key(&read.id, &read.route, read.index))
}

/// Renders every record's file name and line. Pure: nothing is written.
pub(super) fn plan(
    name: &Template,
    root: &Path,
    event: &EventMeta,
    output: &Value,
) -> Result<Planned, SinkError> {
    let records: Vec<&Value> = match output {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut planned = Planned::new();
    for (index, record) in records.into_iter().enumerate() {
        let rendered = name.render(event, record, index).map_err(|e| {
            SinkError::Permanent(format!(
                "record {index}: cannot render the file name {:?}: {e}",
                name.text()
            ))
        })?;
        let components = safe_relative_path(&rendered)
            .map_err(|e| SinkError::Permanent(format!("record {index}: {e}")))?;
        let mut path = root.to_path_buf();
        path.extend(components);
        let mut bytes = serde_json::to_vec(&Written {
            id: &event.id,
            route: &event.route,
            index,
            record,
        })
        .map_err(|e| SinkError::Permanent(format!("record {index}: cannot encode as JSON: {e}")))?;
        bytes.push(b'\n');
        planned.entry(path).or_default().push(Line {
            key: key(&event.id, &event.route, index),
            bytes,
        });
    }
    Ok(planned)
}

/// What a scan found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Scan {
    /// The keys of the lines kept.
    pub keys: HashSet<u128>,
    /// The length of the file after the scan.
    pub len: u64,
    /// Bytes cut off the end.
    pub cut: u64,
    /// Complete lines kept that are not of the sink's form (someone else's, or edited).
    pub foreign: usize,
}

/// Reads a whole file and cuts off what a crash left at its end: from the first line that has
/// no newline or holds a NUL byte (a write that did not reach the disk whole; a filesystem may
/// show its unwritten blocks as zeros), and a last line that is not JSON. Everything after such
/// a line was written after it, so it was not synced either and no event counts it as applied.
/// Other complete lines that are not of the sink's form are kept and counted. The file is
/// synced before this returns, so that the lines kept are durable.
pub(super) fn scan(file: &mut File) -> io::Result<Scan> {
    let mut content = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut content)?;
    let mut scan = Scan::default();
    let mut good_end = 0usize;
    // Where the last line kept starts, when it is not JSON at all.
    let mut last_not_json = None;
    let mut start = 0usize;
    while let Some(newline) = content[start..].iter().position(|&b| b == b'\n') {
        let line = &content[start..start + newline];
        if line.contains(&0) {
            break;
        }
        last_not_json = None;
        match key_of_line(line) {
            Some(key) => {
                scan.keys.insert(key);
            }
            None => {
                scan.foreign += 1;
                if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err() {
                    last_not_json = Some(start);
                }
            }
        }
        start += newline + 1;
        good_end = start;
    }
    // A last complete line that is not JSON at all is a write that did not reach the disk
    // whole; a foreign line of JSON is someone else's and stays.
    if let Some(last_start) = last_not_json {
        scan.foreign -= 1;
        good_end = last_start;
    }
    scan.len = good_end as u64;
    scan.cut = (content.len() - good_end) as u64;
    if scan.cut > 0 {
        file.set_len(scan.len)?;
    }
    file.sync_data()?;
    Ok(scan)
}

/// An open file in append mode.
struct Open {
    file: Arc<File>,
    /// Where the next line goes: the end of the last line written.
    len: u64,
    /// How much of the file the last successful `fdatasync` covered.
    synced: u64,
    /// Bumped when the file is cut back after a failed `fdatasync`.
    epoch: u64,
    keys: HashSet<u128>,
    /// The lines written past `synced`: where each starts, and its key.
    unsynced: Vec<(u64, u128)>,
}

/// One file: its state (None until opened and scanned, or after a failure left it unknown)
/// and its group `fdatasync`.
#[derive(Default)]
struct Slot {
    open: Mutex<Option<Open>>,
    group: Group,
}

/// Epochs are unique in the process, so that an event that wrote into a file whose state was
/// since dropped and read again can never mistake the new state for the one it wrote into.
static EPOCHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn new_epoch() -> u64 {
    EPOCHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The open files of every append-mode sink in the process, by path: two sinks that name the
/// same file (a reload's new sink while the old one finishes, or two routes' sinks) share its
/// state, so neither misses the other's lines or cuts them off.
pub(super) fn shared() -> Arc<Appender> {
    static SHARED: std::sync::LazyLock<Arc<Appender>> =
        std::sync::LazyLock::new(|| Arc::new(Appender::default()));
    SHARED.clone()
}

/// Open append-mode files.
#[derive(Default)]
pub(super) struct Appender {
    files: Mutex<HashMap<PathBuf, (Arc<Slot>, u64)>>,
    clock: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender").finish_non_exhaustive()
    }
}

impl Appender {
    fn slot(&self, path: &Path) -> Arc<Slot> {
        let tick = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut files = lock(&self.files);
        let slot = files
            .entry(path.to_path_buf())
            .or_insert_with(|| (Arc::new(Slot::default()), tick));
        slot.1 = tick;
        let slot = slot.0.clone();
        if files.len() > OPEN_FILES {
            // Close the least recently written files that nobody is using.
            let mut idle: Vec<(u64, PathBuf)> = files
                .iter()
                .filter(|(_, (s, _))| Arc::strong_count(s) == 1)
                .map(|(p, (_, t))| (*t, p.clone()))
                .collect();
            idle.sort();
            let excess = files.len() - OPEN_FILES;
            for (_, p) in idle.into_iter().take(excess) {
                files.remove(&p);
            }
        }
        slot
    }

    /// Appends an event's lines (blocking); Ok once every one is durable.
    pub(super) fn append(&self, writer: &Writer, planned: Planned) -> Result<(), SinkError> {
        let mut to_sync = std::collections::BTreeSet::new();
        writer.check_root(&mut to_sync)?;
        for (path, lines) in planned {
            let dir = path.parent().unwrap_or(&writer.root).to_path_buf();
            writer.ensure_dir(&dir, &mut to_sync)?;
            // New directories are made durable before a file in them is written to.
            for dir in std::mem::take(&mut to_sync) {
                writer.syncs.sync_dir(&dir)?;
            }
            let slot = self.slot(&path);
            self.append_to(writer, &slot, &path, &dir, &lines)?;
        }
        Ok(())
    }

    fn append_to(
        &self,
        writer: &Writer,
        slot: &Slot,
        path: &Path,
        dir: &Path,
        lines: &[Line],
    ) -> Result<(), SinkError> {
        let (end, epoch) = {
            let mut guard = lock(&slot.open);
            if guard.is_none() {
                *guard = Some(open(writer, path, dir)?);
            }
            let Some(open) = guard.as_mut() else {
                unreachable!("set above")
            };
            let mut bytes = Vec::new();
            let mut new = Vec::new();
            for line in lines {
                if !open.keys.contains(&line.key) && !new.iter().any(|(_, k)| *k == line.key) {
                    new.push((open.len + bytes.len() as u64, line.key));
                    bytes.extend_from_slice(&line.bytes);
                }
            }
            if !bytes.is_empty() {
                if let Err(e) = (&*open.file).write_all(&bytes) {
                    // Cut back what part of it went out, so that no later line follows a
                    // partial one; if even that fails, read the file again before the next
                    // write.
                    if open.file.set_len(open.len).is_err() {
                        *guard = None;
                    }
                    return Err(classify("cannot append to", path, &e));
                }
                open.len += bytes.len() as u64;
                open.keys.extend(new.iter().map(|(_, k)| *k));
                open.unsynced.extend(new);
            }
            (open.len, open.epoch)
        };
        let synced = slot.group.sync(|| sync_file(slot));
        if let Err(e) = synced {
            return Err(classify("cannot fdatasync", path, &e));
        }
        let guard = lock(&slot.open);
        match guard.as_ref() {
            Some(open) if open.epoch == epoch && open.synced >= end => Ok(()),
            _ => Err(SinkError::Retryable(format!(
                "{}: a failed fdatasync cut lines of this event off; they will be written \
                 again",
                path.display()
            ))),
        }
    }
}

/// Opens (creating it if need be) and scans a file; a new file's directory is fsynced first.
fn open(writer: &Writer, path: &Path, dir: &Path) -> Result<Open, SinkError> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW);
    let (mut file, created) = match options.open(path) {
        Ok(file) => (file, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = options
                .create_new(true)
                .open(path)
                .map_err(|e| classify("cannot create", path, &e))?;
            (file, true)
        }
        Err(e) => return Err(classify("cannot open", path, &e)),
    };
    if created {
        if let Some(mode) = writer.file_mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| classify("cannot set the mode of", path, &e))?;
        }
        writer.syncs.sync_dir(dir)?;
    }
    let scan = scan(&mut file).map_err(|e| classify("cannot read", path, &e))?;
    report(path, &scan);
    Ok(Open {
        file: Arc::new(file),
        len: scan.len,
        synced: scan.len,
        epoch: new_epoch(),
        keys: scan.keys,
        unsynced: Vec::new(),
    })
}

fn report(path: &Path, scan: &Scan) {
    if scan.cut > 0 {
        tracing::warn!(path = %path.display(), bytes = scan.cut, "cut off a partial line an interrupted run left at the end of the file");
    }
    if scan.foreign > 0 {
        tracing::warn!(path = %path.display(), lines = scan.foreign, "the file holds lines the sink did not write; they are kept");
    }
}

/// The leader's part of a group `fdatasync`: syncs what was written when it starts; on failure,
/// cuts the file back to what the last successful one covered.
fn sync_file(slot: &Slot) -> io::Result<()> {
    let (file, target) = match lock(&slot.open).as_ref() {
        Some(open) => (open.file.clone(), open.len),
        None => return Ok(()),
    };
    let result = file.sync_data();
    let mut guard = lock(&slot.open);
    let Some(open) = guard.as_mut() else {
        return result;
    };
    if !Arc::ptr_eq(&open.file, &file) {
        return result;
    }
    match &result {
        Ok(()) => {
            open.synced = open.synced.max(target);
            let synced = open.synced;
            open.unsynced.retain(|(start, _)| *start >= synced);
        }
        Err(_) => {
            let keep = open.synced;
            for (_, key) in open.unsynced.drain(..) {
                open.keys.remove(&key);
            }
            open.epoch = new_epoch();
            open.len = keep;
            if open.file.set_len(keep).is_err() {
                *guard = None;
            }
        }
    }
    result
}

/// At start: cuts what a crash left at the end of every file under `root` that `name` could
/// have rendered, reading a file whole only when its last 64 KiB show a sign of one (no
/// newline at the end, a NUL byte). Returns the files cut and by how many bytes.
pub(super) fn repair_all(root: &Path, name: &Template) -> Vec<(PathBuf, u64)> {
    let pattern: Vec<String> = name
        .render_with(|_| Ok("\u{1}".into()))
        .unwrap_or_default()
        .split('/')
        .map(str::to_string)
        .collect();
    let mut repaired = Vec::new();
    walk(root, &pattern, &mut repaired);
    repaired
}

fn walk(dir: &Path, pattern: &[String], repaired: &mut Vec<(PathBuf, u64)>) {
    let Some((first, rest)) = pattern.split_first() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !matches(first, &name) {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !rest.is_empty() && kind.is_dir() {
            walk(&entry.path(), rest, repaired);
        } else if rest.is_empty() && kind.is_file() {
            let path = entry.path();
            match repair(&path) {
                Ok(0) => {}
                Ok(cut) => repaired.push((path, cut)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot check the end of an append-mode file");
                }
            }
        }
    }
}

/// Whether `name` fits `pattern`, where `\u{1}` stands for any text.
fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('\u{1}').collect();
    let (first, rest) = parts.split_first().expect("split gives one part at least");
    let Some(mut left) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return left.is_empty();
    };
    for part in middle {
        match left.find(part) {
            Some(i) => left = &left[i + part.len()..],
            None => return false,
        }
    }
    left.ends_with(last)
}

fn repair(path: &Path) -> io::Result<u64> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let tail_len = len.min(64 * 1024);
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, len - tail_len)?;
    if tail.last() == Some(&b'\n') && !tail.contains(&0) {
        return Ok(0);
    }
    let scan = scan(&mut file)?;
    report(path, &scan);
    Ok(scan.cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, index: usize, record: Value) -> String {
        let mut text = serde_json::to_string(&Written {
            id,
            route: "r",
            index,
            record: &record,
        })
        .unwrap();
        text.push('\n');
        text
    }

    fn scanned(content: &[u8]) -> (Scan, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f.ndjson");
        std::fs::write(&path, content).unwrap();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let scan = scan(&mut file).unwrap();
        (scan, std::fs::read(&path).unwrap())
    }

    #[test]
    fn complete_lines_are_kept_with_their_keys() {
        let text = line("a", 0, serde_json::json!({"n": 1})) + &line("a", 1, "x".into());
        let (scan, after) = scanned(text.as_bytes());
        assert_eq!(after, text.as_bytes());
        assert_eq!(scan.cut, 0);
        assert_eq!(scan.len, text.len() as u64);
        assert_eq!(
            scan.keys,
            HashSet::from([key("a", "r", 0), key("a", "r", 1)])
        );
        assert_eq!(scan.foreign, 0);
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let whole = line("a", 0, serde_json::json!({"n": 1}));
        let torn = line("b", 0, serde_json::json!({"n": 2}));
        for cut in 1..torn.len() {
            let text = whole.clone() + &torn[..cut];
            let (scan, after) = scanned(text.as_bytes());
            assert_eq!(after, whole.as_bytes(), "cut at {cut}");
            assert_eq!(scan.cut, cut as u64);
            assert_eq!(scan.keys, HashSet::from([key("a", "r", 0)]));
        }
    }

    #[test]
    fn unwritten_blocks_and_everything_after_them_are_cut_off() {
        let whole = line("a", 0, 1.into());
        // Zeros where a write did not reach the disk, then a later line that did.
        let text = format!("{whole}\0\0\0\0{}", line("c", 0, 3.into()));
        let (scan, after) = scanned(text.as_bytes());
        assert_eq!(after, whole.as_bytes());
        assert_eq!(scan.keys, HashSet::from([key("a", "r", 0)]));
    }

    #[test]
    fn a_last_line_that_is_not_json_is_cut_but_foreign_json_lines_are_kept() {
        let a = line("a", 0, 1.into());
        let text = format!("{a}{{\"id\":\"b\",\"ro\n");
        let (scan, after) = scanned(text.as_bytes());
        assert_eq!(after, a.as_bytes());
        assert_eq!(scan.foreign, 0);
        let text = format!("{a}{{\"note\":\"someone else's\"}}\n{a}");
        let (scan, after) = scanned(text.as_bytes());
        assert_eq!(after, text.as_bytes());
        assert_eq!(scan.foreign, 1);
        let text = "{\"note\":1}\n".to_string();
        let (scan, after) = scanned(text.as_bytes());
        assert_eq!(after, text.as_bytes());
        assert_eq!(scan.foreign, 1);
    }

    #[test]
    fn the_same_key_is_the_same_record_and_nothing_else_is() {
        assert_eq!(key("a", "r", 0), key("a", "r", 0));
        assert_ne!(key("a", "r", 0), key("a", "r", 1));
        assert_ne!(key("a", "r", 0), key("a", "s", 0));
        // Lengths are part of the key: moving a byte between fields changes it.
        assert_ne!(key("ab", "c", 0), key("a", "bc", 0));
    }

    #[test]
    fn patterns_match_what_the_template_can_render() {
        for (pattern, name, expect) in [
            ("events-\u{1}.ndjson", "events-2026-12-07.ndjson", true),
            ("events-\u{1}.ndjson", "events-.ndjson", true),
            ("events-\u{1}.ndjson", "other-2026.ndjson", false),
            ("events-\u{1}.ndjson", "events-2026.ndjson.bak", false),
            ("\u{1}-\u{1}.log", "a-b.log", true),
            ("\u{1}-\u{1}.log", "ab.log", false),
            ("fixed.ndjson", "fixed.ndjson", true),
            ("fixed.ndjson", "fixed.ndjsonx", false),
        ] {
            assert_eq!(matches(pattern, name), expect, "{pattern:?} {name:?}");
        }
    }
}
