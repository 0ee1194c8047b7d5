//! The `file` sink: writes each output record to a file under a root directory, exactly once per
//! file name (PROTOCOL.md §3).
//!
//! # How a write is made durable
//!
//! The output is split into records (an array gives one record per element, anything else is
//! one record). Every record's name is rendered from the `name` template and checked with
//! [`safe_relative_path`] before anything is written, so a hostile value (`../../etc/passwd`, an
//! absolute path, a NUL) or two records with the same name refuse the whole event and leave the
//! disk untouched. Then, for each record:
//!
//! 1. missing directories are created, one level at a time;
//! 2. the content goes to a hidden temporary file in the target directory,
//!    `.<name>.<hash>.tmp` (`<hash>` is derived from the event id, route and record index, so
//!    every attempt at the same record uses the same name: what an interrupted attempt left
//!    there is removed and the file created anew), which is fsynced;
//!
//! and once every temporary file is complete:
//!
//! 3. each is renamed over its final name;
//! 4. every directory that received a new entry (a renamed file or a created subdirectory) is
//!    fsynced. Concurrent writes into one directory share its fsync (see [`group`]): each waits
//!    for one that started after its rename, and the error of a failed one is every waiter's.
//!    A write that finds a directory on its path which another write created and whose parent
//!    has not been fsynced since (see [`Created`]) fsyncs that parent too: otherwise its
//!    file could count as applied while the directory holding it could still vanish in a crash.
//!
//! Only then does `apply` return Ok. Names are derived from the event, so a retry writes the same
//! names and replaces the files: each name exists once, with the last content. A failure before
//! step 3 removes the temporary files and leaves nothing visible; a failure during step 3 may
//! leave some records renamed and others not, which the retry completes.
//!
//! A process killed between steps 2 and 3 leaves its temporary files behind. When the sink
//! starts (and before its first write), it removes every regular file under its root whose
//! name has the temporary form (see [`is_temp_name`]); nothing else is touched.
//!
//! With `mode = "append"` records are lines of NDJSON files instead; [`append`] says how.
//!
//! # Content
//!
//! A JSON string output is written byte for byte as its text, for CSV, XML or fixed-width
//! records the adapter has already formatted. Any other value is written as compact JSON
//! followed by a newline.
//!
//! # Error classification
//!
//! Classification is by `errno`, never by message text.
//!
//! - **Permanent** (dead-lettered; someone must change something): `EACCES`, `EPERM` (fix the
//!   ownership or mode of the directory, then replay), `EROFS` (the filesystem is mounted
//!   read-only), `ENOTDIR` and `EISDIR` (a path component or the target name is of the wrong
//!   kind), `ENAMETOOLONG`, `ELOOP`, `EINVAL`, `EFBIG`, `EXDEV`; plus names refused by the
//!   template or the path check, and two records with the same name. Permission errors are
//!   permanent even on network mounts that might recover on their own: retrying them for a day
//!   hides a misconfiguration that an operator should see at once.
//! - **Retryable** (backoff, then try again): `ENOSPC` and `EDQUOT` (space may be freed), `EIO`,
//!   `EAGAIN`, `EINTR`, `EBUSY`, `ESTALE`, `ETIMEDOUT`, `ENOMEM`, `EMFILE`, `ENFILE`, `ENOENT`
//!   (a mount that vanished underneath us) and every other I/O error. A missing root directory
//!   with `create_dir = false` is retryable too: it is usually a share that is not mounted yet.
//!   Unknown errors are retried because the retry policy still dead-letters them after
//!   `max_attempts` or `max_age_secs`.

mod append;
mod config;
mod group;

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use nix::errno::Errno;
use serde_json::Value;

use super::template::{Template, file_records, is_temp_name, temp_name};
use super::{EventMeta, Sink, SinkError};
pub(crate) use config::parse_mode;
pub use config::{FileConfig, WriteMode};

/// The `file` sink.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    create_dir: bool,
    name: Template,
    file_mode: Option<u32>,
    mode: WriteMode,
    /// The shared directory fsyncs.
    syncs: Arc<Syncs>,
    /// The open files of `append` mode (shared by every sink in the process).
    appender: Arc<append::Appender>,
    /// Set once the leftovers of earlier runs were swept; every write waits for it.
    swept: tokio::sync::OnceCell<()>,
}

/// How directories are fsynced: one group commit per directory (see [`group`]).
#[derive(Debug)]
struct Syncs {
    dirs: group::Groups<PathBuf>,
    /// Whether concurrent writers share a directory's fsync; false only to measure the cost of
    /// not sharing.
    shared: bool,
    /// The fsync of a directory; tests count calls through it.
    fsync_dir: fn(&Path) -> io::Result<()>,
}

/// Directories a write created (or is creating) whose parent has not been fsynced since, each
/// with the number of its creation ([`CREATING`] until `mkdir` returned). Process-wide, since two
/// sinks may write under one directory. A write that finds one of them on its path adds the
/// parent to the directories it fsyncs; the entry goes once a parent fsync that started after
/// the creation has returned.
struct Created {
    dirs: Mutex<HashMap<PathBuf, u64>>,
    next: AtomicU64,
}

static CREATED: LazyLock<Created> = LazyLock::new(|| Created {
    dirs: Mutex::new(HashMap::new()),
    next: AtomicU64::new(1),
});

/// The number of a creation whose `mkdir` has not returned: no fsync covers it yet.
const CREATING: u64 = u64::MAX;

impl Created {
    /// Records, before its `mkdir`, that `dir` is being created: from now on a write that finds
    /// `dir` fsyncs its parent.
    fn begin(&self, dir: &Path) {
        group::lock(&self.dirs).insert(dir.to_owned(), CREATING);
    }

    /// Records that the `mkdir` of `dir` returned.
    fn done(&self, dir: &Path) {
        let number = self.next.fetch_add(1, Ordering::SeqCst);
        group::lock(&self.dirs).insert(dir.to_owned(), number);
    }

    /// Forgets `dir` after its `mkdir` failed.
    fn failed(&self, dir: &Path) {
        group::lock(&self.dirs).remove(dir);
    }

    /// Adds to `to_sync` the parent of every directory on `dir`'s path (itself included) that
    /// was created and whose parent is not yet known to be durable.
    fn pending_parents(&self, dir: &Path, to_sync: &mut BTreeSet<PathBuf>) {
        let dirs = group::lock(&self.dirs);
        if dirs.is_empty() {
            return;
        }
        for level in dir.ancestors() {
            if dirs.contains_key(level)
                && let Some(parent) = level.parent().filter(|p| !p.as_os_str().is_empty())
            {
                to_sync.insert(parent.to_owned());
            }
        }
    }

    /// The number the next creation gets: every creation numbered below it happened before.
    fn mark(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Forgets the directories under `parent` created before `mark`: an fsync of `parent` that
    /// started after `mark` was taken has returned.
    fn parent_synced(&self, parent: &Path, mark: u64) {
        let mut dirs = group::lock(&self.dirs);
        if !dirs.is_empty() {
            dirs.retain(|dir, number| *number >= mark || dir.parent() != Some(parent));
        }
    }
}

impl Syncs {
    /// Returns once `dir` was fsynced by a call that started after this one began.
    fn sync_dir(&self, dir: &Path) -> Result<(), SinkError> {
        let mark = CREATED.mark();
        let result = if self.shared {
            self.dirs
                .get(&dir.to_path_buf())
                .sync(|| (self.fsync_dir)(dir))
        } else {
            (self.fsync_dir)(dir)
        };
        result.map_err(|e| classify("cannot fsync the directory", dir, &e))?;
        CREATED.parent_synced(dir, mark);
        Ok(())
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

impl FileSink {
    /// Builds the sink. Touches no file: the directory is created (if allowed) on the first
    /// write, so that `ess-agent validate` has no side effects.
    pub fn new(config: &FileConfig) -> Result<FileSink, String> {
        let name = Template::parse(&config.name).map_err(|e| format!("name: {e}"))?;
        let file_mode = config
            .file_mode
            .as_deref()
            .map(parse_mode)
            .transpose()
            .map_err(|e| format!("file_mode: {e}"))?;
        Ok(FileSink {
            dir: config.dir.clone(),
            create_dir: config.create_dir,
            name,
            file_mode,
            mode: config.mode,
            syncs: Arc::new(Syncs {
                dirs: group::Groups::new(),
                shared: true,
                fsync_dir,
            }),
            appender: append::shared(),
            swept: tokio::sync::OnceCell::new(),
        })
    }

    /// The sink with each write fsyncing its directories on its own, as releases before
    /// shared directory fsyncs did: for the benchmark that compares the two.
    #[cfg(feature = "bench")]
    #[doc(hidden)]
    pub fn unshared_dir_syncs(mut self) -> FileSink {
        self.syncs = Arc::new(Syncs {
            dirs: group::Groups::new(),
            shared: false,
            fsync_dir,
        });
        self
    }

    /// Removes the temporary files an interrupted run left under the root, once per sink.
    /// Writes wait for it, so that it never removes a temporary file this sink is writing.
    async fn sweep_once(&self) {
        self.swept
            .get_or_init(|| async {
                let root = self.dir.clone();
                let append = (self.mode == WriteMode::Append).then(|| self.name.clone());
                let swept = tokio::task::spawn_blocking(move || {
                    let mut removed = Vec::new();
                    sweep_temps(&root, &mut removed);
                    // What a crash left at the end of append-mode files is cut off now, so
                    // that readers do not wait for the next write to a file to see it gone.
                    if let Some(name) = append {
                        append::repair_all(&root, &name);
                    }
                    removed
                })
                .await
                .unwrap_or_default();
                if !swept.is_empty() {
                    tracing::info!(
                        dir = %self.dir.display(),
                        count = swept.len(),
                        first = %swept[0].display(),
                        "removed temporary files an interrupted run left behind"
                    );
                }
            })
            .await;
    }

    fn writer(&self) -> Writer {
        Writer {
            root: self.dir.clone(),
            create_dir: self.create_dir,
            file_mode: self.file_mode,
            syncs: self.syncs.clone(),
        }
    }

    /// Renders and checks every record's name and content. Pure: nothing is written.
    fn plan(&self, event: &EventMeta, output: &Value) -> Result<Vec<Planned>, SinkError> {
        Ok(file_records(&self.name, event, output)?
            .into_iter()
            .enumerate()
            .map(|(index, record)| {
                let mut dir = self.dir.clone();
                dir.extend(&record.parents);
                Planned {
                    dir,
                    temp_name: temp_name(&record.file_name, event, index),
                    file_name: record.file_name,
                    content: record.content,
                }
            })
            .collect())
    }
}

/// One file to write.
struct Planned {
    /// The directory the file goes into (root plus the name's parent components).
    dir: PathBuf,
    /// The last component of the rendered name.
    file_name: String,
    /// The hidden temporary name next to it, the same on every attempt.
    temp_name: String,
    content: Vec<u8>,
}

#[async_trait::async_trait]
impl Sink for FileSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        if self.mode == WriteMode::Append {
            let lines = append::plan(&self.name, &self.dir, event, output)?;
            if lines.is_empty() {
                return Ok(());
            }
            self.sweep_once().await;
            let (writer, appender) = (self.writer(), self.appender.clone());
            return tokio::task::spawn_blocking(move || appender.append(&writer, lines))
                .await
                .map_err(|e| join_error(&e))?;
        }
        let planned = self.plan(event, output)?;
        if planned.is_empty() {
            return Ok(());
        }
        self.sweep_once().await;
        let writer = self.writer();
        tokio::task::spawn_blocking(move || writer.write_all(&planned))
            .await
            .map_err(|e| join_error(&e))?
    }

    async fn start(&self) {
        self.sweep_once().await;
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let dir = self.dir.clone();
        let create_dir = self.create_dir;
        tokio::task::spawn_blocking(move || match std::fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(SinkError::Permanent(format!(
                "{} is not a directory: point dir at a directory",
                dir.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create_dir => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing_root(&dir)),
            Err(e) => Err(classify("cannot inspect", &dir, &e)),
        })
        .await
        .map_err(|e| join_error(&e))?
    }
}

fn join_error(e: &tokio::task::JoinError) -> SinkError {
    if e.is_cancelled() {
        SinkError::Retryable("the write was cancelled (the agent is shutting down)".into())
    } else {
        SinkError::Permanent(format!("the file writer failed unexpectedly: {e}"))
    }
}

fn missing_root(dir: &Path) -> SinkError {
    SinkError::Retryable(format!(
        "{} does not exist: create or mount it, or set create_dir = true",
        dir.display()
    ))
}

/// The blocking half of the sink.
struct Writer {
    root: PathBuf,
    create_dir: bool,
    file_mode: Option<u32>,
    syncs: Arc<Syncs>,
}

impl Writer {
    /// Makes sure the root directory exists (creating it when allowed), adding to `to_sync`
    /// the directories that got a new entry.
    fn check_root(&self, to_sync: &mut BTreeSet<PathBuf>) -> Result<(), SinkError> {
        match std::fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(SinkError::Permanent(format!(
                "{} is not a directory: point dir at a directory",
                self.root.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !self.create_dir {
                    return Err(missing_root(&self.root));
                }
                ensure_dir(&self.root, to_sync)
            }
            Err(e) => Err(classify("cannot inspect", &self.root, &e)),
        }
    }

    /// Makes sure `dir`, the root or a directory under it, exists (see [`ensure_dir`]), once
    /// [`Writer::check_root`] has passed: the root is not looked up a second time.
    fn ensure_dir(&self, dir: &Path, to_sync: &mut BTreeSet<PathBuf>) -> Result<(), SinkError> {
        if dir == self.root {
            CREATED.pending_parents(dir, to_sync);
            return Ok(());
        }
        ensure_dir(dir, to_sync)
    }

    fn write_all(&self, planned: &[Planned]) -> Result<(), SinkError> {
        // Directories whose entries changed and must be fsynced before we report success.
        let mut to_sync = BTreeSet::new();
        self.check_root(&mut to_sync)?;
        let mut temps: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(planned.len());
        let result = self.write_temps(planned, &mut to_sync, &mut temps);
        if let Err(e) = result {
            remove_temps(&temps);
            return Err(e);
        }
        for (i, (temp, target)) in temps.iter().enumerate() {
            if let Err(e) = std::fs::rename(temp, target) {
                remove_temps(&temps[i..]);
                return Err(classify("cannot rename into", target, &e));
            }
        }
        // Concurrent writers into one directory share its fsync: each waits for one that
        // started after its rename.
        for dir in &to_sync {
            self.syncs.sync_dir(dir)?;
        }
        Ok(())
    }

    /// Creates directories and writes every record to an fsynced temporary file. Every
    /// temporary file created is pushed onto `temps`, so that the caller can remove them.
    fn write_temps(
        &self,
        planned: &[Planned],
        to_sync: &mut BTreeSet<PathBuf>,
        temps: &mut Vec<(PathBuf, PathBuf)>,
    ) -> Result<(), SinkError> {
        for record in planned {
            self.ensure_dir(&record.dir, to_sync)?;
            let target = record.dir.join(&record.file_name);
            let temp = record.dir.join(&record.temp_name);
            let mut file = create_temp(&temp)?;
            temps.push((temp.clone(), target));
            if let Some(mode) = self.file_mode {
                // fchmod is not subject to the umask, unlike the mode given to open.
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| classify("cannot set the mode of", &temp, &e))?;
            }
            file.write_all(&record.content)
                .map_err(|e| classify("cannot write", &temp, &e))?;
            file.sync_all()
                .map_err(|e| classify("cannot fsync", &temp, &e))?;
            to_sync.insert(record.dir.clone());
        }
        Ok(())
    }
}

/// Creates the temporary file `temp`, new. An interrupted attempt at this record may have left
/// the same name behind: it is removed and the file created anew rather than truncated, so that
/// a link planted under the name can never redirect the write into another file. The removal
/// is tried only when the name exists (`create_new` refuses any entry, a dangling link
/// included), so the usual write makes no `unlink` call, which would contend for the
/// directory's lock with every other write into it.
fn create_temp(temp: &Path) -> Result<File, SinkError> {
    let create = || OpenOptions::new().write(true).create_new(true).open(temp);
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            match std::fs::remove_file(temp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(classify("cannot remove the leftover", temp, &e));
                }
                _ => {}
            }
            create()
        }
        other => other,
    }
    .map_err(|e| classify("cannot create", temp, &e))
}

/// Removes every regular file under `dir` (recursively, not following symbolic links) whose
/// name has the temporary form, pushing each removed path onto `removed`. Problems (a missing
/// root, an unreadable directory) are logged and skipped: a leftover that stays costs only
/// space, and the next start tries again.
fn sweep_temps(dir: &Path, removed: &mut Vec<PathBuf>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot look for leftover temporary files");
            return;
        }
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            sweep_temps(&path, removed);
        } else if kind.is_file() && entry.file_name().to_str().is_some_and(is_temp_name) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temporary file");
                }
            }
        }
    }
}

fn remove_temps(temps: &[(PathBuf, PathBuf)]) {
    for (temp, _) in temps {
        if let Err(e) = std::fs::remove_file(temp)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %temp.display(), error = %e, "cannot remove a temporary file");
        }
    }
}

/// Makes sure `dir` exists, creating missing levels one at a time. The parent of every level
/// created is added to `to_sync`, because a new directory entry is durable only once its parent
/// is fsynced; so is the parent of every level another write created and nobody has made
/// durable yet.
fn ensure_dir(dir: &Path, to_sync: &mut BTreeSet<PathBuf>) -> Result<(), SinkError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            CREATED.pending_parents(dir, to_sync);
            return Ok(());
        }
        Ok(_) => {
            return Err(SinkError::Permanent(format!(
                "{} exists and is not a directory: remove it or change the name template",
                dir.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(classify("cannot inspect", dir, &e)),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        ensure_dir(parent, to_sync)?;
    }
    CREATED.begin(dir);
    match std::fs::create_dir(dir) {
        Ok(()) => CREATED.done(dir),
        // Another writer created it in the meantime.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {
            CREATED.done(dir);
            CREATED.pending_parents(dir, to_sync);
            return Ok(());
        }
        Err(e) => {
            CREATED.failed(dir);
            return Err(classify("cannot create the directory", dir, &e));
        }
    }
    if let Some(parent) = parent {
        to_sync.insert(parent.to_owned());
    }
    Ok(())
}

/// Classifies an I/O error by errno (see the module documentation).
fn classify(action: &str, path: &Path, e: &io::Error) -> SinkError {
    let errno = e.raw_os_error().map(Errno::from_raw);
    let path = path.display();
    match errno {
        Some(Errno::EACCES | Errno::EPERM) => SinkError::Permanent(format!(
            "{action} {path}: {e}: give the agent's user write access to the directory, then \
             replay the event"
        )),
        Some(Errno::EROFS) => SinkError::Permanent(format!(
            "{action} {path}: {e}: the filesystem is mounted read-only; remount it read-write, \
             then replay the event"
        )),
        Some(Errno::ENAMETOOLONG) => SinkError::Permanent(format!(
            "{action} {path}: {e}: shorten the name template or the values it uses"
        )),
        Some(
            Errno::ENOTDIR
            | Errno::EISDIR
            | Errno::ELOOP
            | Errno::EINVAL
            | Errno::EFBIG
            | Errno::EXDEV,
        ) => SinkError::Permanent(format!(
            "{action} {path}: {e}: fix the directory layout or the name template, then replay \
             the event"
        )),
        Some(Errno::ENOSPC | Errno::EDQUOT) => SinkError::Retryable(format!(
            "{action} {path}: {e}: free space on the filesystem; the write will be retried"
        )),
        _ => SinkError::Retryable(format!("{action} {path}: {e}; the write will be retried")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::RetryConfig;
    use crate::sink::SinkSpec;
    use serde_json::json;

    fn event() -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "case.updated".into(),
            version: 1,
            subject: "case-42".into(),
            revision: Some(3),
            source: None,
            route: "courts".into(),
            partner: "p1".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn config(dir: &Path, name: &str) -> FileConfig {
        FileConfig {
            dir: dir.to_owned(),
            create_dir: true,
            name: name.into(),
            mode: WriteMode::File,
            file_mode: None,
            retry: RetryConfig::default(),
        }
    }

    fn sink(dir: &Path, name: &str) -> FileSink {
        FileSink::new(&config(dir, name)).unwrap()
    }

    /// Every file under `dir`, as relative paths, sorted.
    fn files(dir: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else {
                    let rel = path.strip_prefix(base).unwrap();
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        if dir.exists() {
            walk(dir, dir, &mut out);
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn string_output_is_written_byte_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let text = "id;name\r\n1;Ödön\r\nno newline at end";
        sink(tmp.path(), "{id}.csv")
            .apply(&event(), &json!(text))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("evt-1.csv")).unwrap(),
            text.as_bytes()
        );
        assert_eq!(files(tmp.path()), ["evt-1.csv"]);
    }

    #[tokio::test]
    async fn other_output_is_compact_json_with_newline() {
        let tmp = tempfile::tempdir().unwrap();
        let out = json!({"b": 1, "a": [true, null], "c": "x"});
        sink(tmp.path(), "{id}.json")
            .apply(&event(), &out)
            .await
            .unwrap();
        let written = std::fs::read_to_string(tmp.path().join("evt-1.json")).unwrap();
        assert_eq!(written, "{\"b\":1,\"a\":[true,null],\"c\":\"x\"}\n");
    }

    #[tokio::test]
    async fn array_output_writes_one_file_per_record() {
        let tmp = tempfile::tempdir().unwrap();
        let out = json!([{"k": "a", "v": 1}, {"k": "b", "v": 2}, "plain text"]);
        sink(tmp.path(), "{id}-{index}.out")
            .apply(&event(), &out)
            .await
            .unwrap();
        assert_eq!(
            files(tmp.path()),
            ["evt-1-0.out", "evt-1-1.out", "evt-1-2.out"]
        );
        let read = |n: &str| std::fs::read_to_string(tmp.path().join(n)).unwrap();
        assert_eq!(read("evt-1-0.out"), "{\"k\":\"a\",\"v\":1}\n");
        assert_eq!(read("evt-1-1.out"), "{\"k\":\"b\",\"v\":2}\n");
        assert_eq!(read("evt-1-2.out"), "plain text");
    }

    #[tokio::test]
    async fn empty_array_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        sink(&root, "{id}")
            .apply(&event(), &json!([]))
            .await
            .unwrap();
        assert!(!root.exists());
    }

    #[tokio::test]
    async fn subdirectories_and_root_are_created() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b");
        let out = json!([{"court": "north", "n": 1}, {"court": "south", "n": 2}]);
        sink(&root, "{subject}/{output.court}/{revision}-{output.n}.json")
            .apply(&event(), &out)
            .await
            .unwrap();
        assert_eq!(
            files(&root),
            ["case-42/north/3-1.json", "case-42/south/3-2.json"]
        );
    }

    #[tokio::test]
    async fn missing_root_without_create_dir_is_retryable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("share");
        let mut c = config(&root, "{id}");
        c.create_dir = false;
        let s = FileSink::new(&c).unwrap();
        let e = s.apply(&event(), &json!(1)).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("create_dir"), "{e}");
        assert!(s.healthcheck().await.unwrap_err().is_retryable());
        assert!(!root.exists());
        std::fs::create_dir(&root).unwrap();
        s.apply(&event(), &json!(1)).await.unwrap();
        s.healthcheck().await.unwrap();
        assert_eq!(files(&root), ["evt-1"]);
    }

    #[tokio::test]
    async fn traversal_is_refused_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let s = sink(&root, "{output.name}");
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a\0b",
            "x/./y",
            "a\\b",
        ] {
            // A good record first: the bad one must stop the whole event before any write.
            let out = json!([{"name": "fine"}, {"name": bad}]);
            let e = s.apply(&event(), &out).await.unwrap_err();
            assert!(!e.is_retryable(), "{bad:?}: {e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad:?}: {e}");
            assert!(e.to_string().contains("record 1"), "{e}");
        }
        assert_eq!(files(tmp.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn traversal_through_event_fields_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut e = event();
        e.subject = "../../escape".into();
        let err = sink(tmp.path(), "{subject}/{id}.json")
            .apply(&e, &json!({}))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("../../escape"), "{err}");
        assert_eq!(files(tmp.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn render_failure_is_permanent_and_names_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let e = sink(tmp.path(), "{output.missing}.json")
            .apply(&event(), &json!({"a": 1}))
            .await
            .unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("{output.missing}"), "{e}");
    }

    #[tokio::test]
    async fn two_records_with_the_same_name_are_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = json!([{"k": "a"}, {"k": "b"}, {"k": "a"}]);
        let e = sink(tmp.path(), "{output.k}.json")
            .apply(&event(), &out)
            .await
            .unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("records 0 and 2"), "{e}");
        assert!(e.to_string().contains("\"a.json\""), "{e}");
        assert_eq!(files(tmp.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn retry_overwrites_so_each_name_exists_once() {
        let tmp = tempfile::tempdir().unwrap();
        let s = sink(tmp.path(), "{subject}/{id}.json");
        s.apply(&event(), &json!({"v": 1})).await.unwrap();
        s.apply(&event(), &json!({"v": 2})).await.unwrap();
        assert_eq!(files(tmp.path()), ["case-42/evt-1.json"]);
        let written = std::fs::read_to_string(tmp.path().join("case-42/evt-1.json")).unwrap();
        assert_eq!(written, "{\"v\":2}\n");
    }

    #[tokio::test]
    async fn file_mode_is_applied_regardless_of_umask() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in ["0640", "0777", "600"] {
            let mut c = config(tmp.path(), "{id}");
            c.file_mode = Some(mode.into());
            FileSink::new(&c)
                .unwrap()
                .apply(&event(), &json!(1))
                .await
                .unwrap();
            let got = std::fs::metadata(tmp.path().join("evt-1"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777;
            assert_eq!(got, u32::from_str_radix(mode, 8).unwrap(), "{mode}");
        }
    }

    #[tokio::test]
    async fn no_temporary_file_is_left_behind_on_failure() {
        let tmp = tempfile::tempdir().unwrap();
        // The second record's name is taken by a directory, so its rename fails with EISDIR
        // after both temporary files were written.
        std::fs::create_dir_all(tmp.path().join("b.json/inner")).unwrap();
        let out = json!([{"k": "a"}, {"k": "b"}]);
        let s = sink(tmp.path(), "{output.k}.json");
        let e = s.apply(&event(), &out).await.unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("cannot rename"), "{e}");
        let leftovers: Vec<_> = files(tmp.path())
            .into_iter()
            .filter(|f| f.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn leftover_temporary_files_are_swept_at_start_and_look_alikes_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("case-9/deeper")).unwrap();
        let leftovers = [
            ".evt-7.json.0123456789abcdef.tmp",
            "case-9/deeper/.report.csv.fedcba9876543210.tmp",
            // The form of earlier releases, random per attempt.
            "case-9/.evt-8.json.tmp-00000000deadbeef",
        ];
        let look_alikes = [
            "case-9/kept.json",
            ".evt-7.json.tmp",
            ".evt-7.json.0123456789ABCDEF.tmp",
            ".evt-7.json.0123456789abcde.tmp",
            "evt-7.json.0123456789abcdef.tmp",
            ".evt-7.json.0123456789abcdef.tmp.bak",
            "..0123456789abcdef.tmp",
            ".notes.tmp-draft",
        ];
        for name in leftovers.iter().chain(&look_alikes) {
            std::fs::write(root.join(name), "x").unwrap();
        }
        // A directory with the form is not a leftover of the sink's.
        std::fs::create_dir(root.join(".dir.0123456789abcdef.tmp")).unwrap();
        std::fs::write(root.join(".dir.0123456789abcdef.tmp/inside"), "x").unwrap();
        let mut expected: Vec<String> = look_alikes.iter().map(|n| n.to_string()).collect();
        expected.push(".dir.0123456789abcdef.tmp/inside".into());
        expected.sort();

        sink(root, "{subject}/{id}.json").start().await;
        assert_eq!(files(root), expected);

        // A sink that is never started sweeps before its first write.
        for name in leftovers {
            std::fs::write(root.join(name), "x").unwrap();
        }
        sink(root, "{subject}/{id}.json")
            .apply(&event(), &json!({}))
            .await
            .unwrap();
        expected.push("case-42/evt-1.json".into());
        expected.sort();
        assert_eq!(files(root), expected);
    }

    #[tokio::test]
    async fn an_interrupted_attempts_temporary_file_is_replaced_by_the_retry() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let s = sink(root, "{id}-{index}.json");
        s.start().await;
        // What an attempt killed after writing its temporary files leaves: the same names the
        // retry uses, one with more bytes than the retry writes.
        let temps: Vec<PathBuf> = (0..2)
            .map(|i| root.join(temp_name(&format!("evt-1-{i}.json"), &event(), i)))
            .collect();
        std::fs::write(
            &temps[0],
            "a partial record that is longer than the real one",
        )
        .unwrap();
        std::fs::write(&temps[1], "").unwrap();
        s.apply(&event(), &json!([{"n": 0}, {"n": 1}]))
            .await
            .unwrap();
        assert_eq!(files(root), ["evt-1-0.json", "evt-1-1.json"]);
        let read = |n: &str| std::fs::read_to_string(root.join(n)).unwrap();
        assert_eq!(read("evt-1-0.json"), "{\"n\":0}\n");
        assert_eq!(read("evt-1-1.json"), "{\"n\":1}\n");
    }

    #[tokio::test]
    async fn a_link_under_the_temporary_name_is_replaced_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        std::fs::create_dir(&root).unwrap();
        let outside = tmp.path().join("precious");
        std::fs::write(&outside, "keep me").unwrap();
        let s = sink(&root, "{id}.json");
        s.start().await;
        let temp = root.join(temp_name("evt-1.json", &event(), 0));
        std::os::unix::fs::symlink(&outside, &temp).unwrap();
        s.apply(&event(), &json!({})).await.unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        assert_eq!(files(&root), ["evt-1.json"]);
        std::fs::hard_link(&outside, &temp).unwrap();
        s.apply(&event(), &json!({})).await.unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        assert_eq!(files(&root), ["evt-1.json"]);
    }

    #[tokio::test]
    async fn a_failure_before_renaming_leaves_nothing_visible() {
        let tmp = tempfile::tempdir().unwrap();
        // The first record's temporary file is complete when the second record's directory
        // turns out to be a plain file.
        std::fs::write(tmp.path().join("blocked"), "x").unwrap();
        let out = json!([{"d": "fine"}, {"d": "blocked"}]);
        let e = sink(tmp.path(), "{output.d}/{id}.json")
            .apply(&event(), &out)
            .await
            .unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert_eq!(files(tmp.path()), ["blocked"]);
    }

    #[tokio::test]
    async fn a_file_where_a_directory_is_needed_is_permanent() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("case-42"), "x").unwrap();
        let e = sink(tmp.path(), "{subject}/{id}.json")
            .apply(&event(), &json!({}))
            .await
            .unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert_eq!(files(tmp.path()), ["case-42"]);
    }

    #[tokio::test]
    async fn unwritable_directory_is_permanent_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("locked");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores permission bits; there the write simply succeeds.
        if std::fs::write(root.join("probe"), "").is_ok() {
            return;
        }
        let e = sink(&root, "{id}")
            .apply(&event(), &json!({}))
            .await
            .unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("write access"), "{e}");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(files(&root), Vec::<String>::new());
    }

    /// Directory fsyncs counted by [`counting_fsync_dir`]; only the test below uses it.
    static DIR_FSYNCS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counting_fsync_dir(dir: &Path) -> io::Result<()> {
        DIR_FSYNCS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // A disk's fsync takes time; this is its stand-in, not synchronisation.
        std::thread::sleep(std::time::Duration::from_millis(5));
        fsync_dir(dir)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_into_one_directory_share_its_fsyncs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("out")).unwrap();
        let mut s = sink(&tmp.path().join("out"), "{id}.json");
        s.syncs = Arc::new(Syncs {
            dirs: group::Groups::new(),
            shared: true,
            fsync_dir: counting_fsync_dir,
        });
        let s = Arc::new(s);
        s.start().await;
        let events = 64;
        let tasks: Vec<_> = (0..events)
            .map(|n| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut e = event();
                    e.id = format!("evt-{n}");
                    s.apply(&e, &json!({"n": n})).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let fsyncs = DIR_FSYNCS.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(files(&tmp.path().join("out")).len(), events);
        assert!(fsyncs >= 1, "the directory was never fsynced");
        assert!(
            fsyncs < events,
            "{fsyncs} directory fsyncs for {events} events"
        );
    }

    /// The directories [`logging_fsync_dir`] was asked to fsync, and one it fails for.
    static SYNCED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static FAILING_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

    fn logging_fsync_dir(dir: &Path) -> io::Result<()> {
        group::lock(&SYNCED_DIRS).push(dir.to_owned());
        if group::lock(&FAILING_DIR).as_deref() == Some(dir) {
            return Err(io::Error::from_raw_os_error(nix::libc::EIO));
        }
        fsync_dir(dir)
    }

    /// The directories fsynced by `apply`.
    async fn synced_by(s: &FileSink, e: &EventMeta) -> (Result<(), SinkError>, Vec<PathBuf>) {
        group::lock(&SYNCED_DIRS).clear();
        let result = s.apply(e, &json!({"n": 1})).await;
        (result, group::lock(&SYNCED_DIRS).clone())
    }

    #[tokio::test]
    async fn a_write_into_a_directory_another_write_created_waits_until_that_directory_is_durable()
    {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        std::fs::create_dir(&root).unwrap();
        let mut s = sink(&root, "{subject}/{id}.json");
        s.syncs = Arc::new(Syncs {
            dirs: group::Groups::new(),
            shared: true,
            fsync_dir: logging_fsync_dir,
        });
        s.start().await;
        let sub = root.join("case-42");
        let with_id = |id: &str| EventMeta {
            id: id.into(),
            ..event()
        };

        // The first write creates the subject's directory, but the fsync of the root that
        // would make it durable fails.
        *group::lock(&FAILING_DIR) = Some(root.clone());
        let (first, _) = synced_by(&s, &with_id("evt-a")).await;
        assert!(
            first.is_err(),
            "the root's fsync failed, yet the write succeeded"
        );
        assert!(sub.is_dir());
        *group::lock(&FAILING_DIR) = None;

        // The next write into that directory creates nothing, yet must fsync the root too.
        let (second, synced) = synced_by(&s, &with_id("evt-b")).await;
        second.unwrap();
        assert!(synced.contains(&sub), "{synced:?}");
        assert!(
            synced.contains(&root),
            "applied while the directory holding it was not yet durable: fsynced only {synced:?}"
        );

        // Once the root was fsynced, later writes fsync only their own directory.
        let (third, synced) = synced_by(&s, &with_id("evt-c")).await;
        third.unwrap();
        assert_eq!(synced, [sub]);
    }

    fn append_sink(dir: &Path, name: &str) -> FileSink {
        let mut c = config(dir, name);
        c.mode = WriteMode::Append;
        FileSink::new(&c).unwrap()
    }

    fn lines(path: &Path) -> Vec<Value> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn append_writes_one_line_per_record_with_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let s = append_sink(tmp.path(), "{route}/events-{date}.ndjson");
        s.apply(&event(), &json!([{"n": 1}, "text\nwith a newline"]))
            .await
            .unwrap();
        s.apply(&event(), &json!([])).await.unwrap();
        let path = tmp.path().join("courts/events-2026-12-07.ndjson");
        assert_eq!(files(tmp.path()), ["courts/events-2026-12-07.ndjson"]);
        assert_eq!(
            lines(&path),
            [
                json!({"id": "evt-1", "route": "courts", "index": 0, "record": {"n": 1}}),
                json!({"id": "evt-1", "route": "courts", "index": 1, "record": "text\nwith a newline"}),
            ]
        );
    }

    #[tokio::test]
    async fn append_rotates_by_the_time_of_receipt() {
        let tmp = tempfile::tempdir().unwrap();
        let s = append_sink(tmp.path(), "events-{date}-{hour}.ndjson");
        let mut e = event();
        for (id, at) in [
            ("a", 1_796_687_999_999),
            ("b", 1_796_688_000_000),
            ("c", 1_796_688_000_001),
        ] {
            e.id = id.into();
            e.received_at_ms = at;
            s.apply(&e, &json!({})).await.unwrap();
        }
        assert_eq!(
            files(tmp.path()),
            ["events-2026-12-07-23.ndjson", "events-2026-12-08-00.ndjson"]
        );
        assert_eq!(
            lines(&tmp.path().join("events-2026-12-08-00.ndjson")).len(),
            2
        );
    }

    #[tokio::test]
    async fn append_never_writes_a_record_twice_in_this_run_or_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.ndjson");
        let s = append_sink(tmp.path(), "events.ndjson");
        s.apply(&event(), &json!([1, 2])).await.unwrap();
        s.apply(&event(), &json!([1, 2])).await.unwrap();
        assert_eq!(lines(&path).len(), 2);
        // A new sink in a new process (a restarted agent) reads the file before its first
        // write: the records already there are skipped, one that is not is added.
        let mut s = append_sink(tmp.path(), "events.ndjson");
        s.appender = Arc::new(append::Appender::default());
        s.apply(&event(), &json!([1, 2, 3])).await.unwrap();
        let got: Vec<Value> = lines(&path)
            .into_iter()
            .map(|l| l["index"].clone())
            .collect();
        assert_eq!(got, [json!(0), json!(1), json!(2)]);
        // The same index from another route or event is another record.
        let mut e = event();
        e.route = "other".into();
        s.apply(&e, &json!(1)).await.unwrap();
        e.id = "evt-2".into();
        s.apply(&e, &json!(1)).await.unwrap();
        assert_eq!(lines(&path).len(), 5);
    }

    #[tokio::test]
    async fn append_cuts_a_torn_line_at_start_and_skips_what_is_already_there() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.ndjson");
        let s = append_sink(tmp.path(), "events.ndjson");
        s.apply(&event(), &json!({"n": 1})).await.unwrap();
        let whole = std::fs::read(&path).unwrap();
        // What a crash in the middle of the next write leaves.
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"id\":\"evt-2\",\"route\":\"cou");
        std::fs::write(&path, &torn).unwrap();
        // Another file the template cannot render is not touched.
        std::fs::write(tmp.path().join("notes.txt"), "no newline").unwrap();
        let mut s = append_sink(tmp.path(), "events.ndjson");
        s.appender = Arc::new(append::Appender::default());
        s.start().await;
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        assert_eq!(
            std::fs::read(tmp.path().join("notes.txt")).unwrap(),
            b"no newline"
        );
        let mut e = event();
        s.apply(&e, &json!({"n": 1})).await.unwrap();
        e.id = "evt-2".into();
        s.apply(&e, &json!({"n": 2})).await.unwrap();
        let ids: Vec<Value> = lines(&path).into_iter().map(|l| l["id"].clone()).collect();
        assert_eq!(ids, [json!("evt-1"), json!("evt-2")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_to_one_file_each_land_once_as_a_whole_line() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Arc::new(append_sink(tmp.path(), "events.ndjson"));
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut e = event();
                    e.id = format!("evt-{n}");
                    // Every third event is applied twice, as a retry would.
                    for _ in 0..(1 + usize::from(n % 3 == 0)) {
                        s.apply(&e, &json!([{"n": n, "pad": "x".repeat(n * 7)}, n]))
                            .await?;
                    }
                    Ok::<_, SinkError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let mut keys: Vec<(String, u64)> = lines(&tmp.path().join("events.ndjson"))
            .into_iter()
            .map(|l| {
                (
                    l["id"].as_str().unwrap().to_string(),
                    l["index"].as_u64().unwrap(),
                )
            })
            .collect();
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count, "a record was written twice");
        assert_eq!(count, 400);
    }

    #[test]
    fn the_mode_is_file_or_append() {
        let c: FileConfig =
            toml::from_str("dir = \"out\"\nname = \"e-{date}.ndjson\"\nmode = \"append\"\n")
                .unwrap();
        assert_eq!(c.mode, WriteMode::Append);
        let e = toml::from_str::<FileConfig>("dir = \"out\"\nname = \"x\"\nmode = \"0640\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("go in file_mode"), "{e}");
        let e = toml::from_str::<FileConfig>("dir = \"out\"\nname = \"x\"\nmode = \"files\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown mode `files`"), "{e}");
    }

    #[test]
    fn classification_is_by_errno() {
        let p = Path::new("/x");
        let of = |errno: Errno| {
            classify(
                "cannot write",
                p,
                &io::Error::from_raw_os_error(errno as i32),
            )
        };
        for errno in [
            Errno::EACCES,
            Errno::EPERM,
            Errno::EROFS,
            Errno::ENOTDIR,
            Errno::EISDIR,
            Errno::ENAMETOOLONG,
        ] {
            assert!(!of(errno).is_retryable(), "{errno}");
        }
        for errno in [
            Errno::ENOSPC,
            Errno::EDQUOT,
            Errno::EIO,
            Errno::EAGAIN,
            Errno::ESTALE,
            Errno::ENOENT,
        ] {
            assert!(of(errno).is_retryable(), "{errno}");
        }
        assert!(
            classify("x", p, &io::Error::other("no errno")).is_retryable(),
            "errors without errno are retried"
        );
        assert!(of(Errno::ENOSPC).to_string().contains("free space"));
    }

    #[test]
    fn validate_reports_bad_templates_modes_and_absolute_names() {
        let dir = Path::new("/data");
        assert!(
            config(dir, "{subject}/{id}.json")
                .validate("sinks.f")
                .is_empty()
        );
        let problems = |name: &str, mode: Option<&str>| {
            let mut c = config(dir, name);
            c.file_mode = mode.map(str::to_string);
            c.validate("sinks.f")
        };
        let p = problems("{nope}.json", None);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "sinks.f.name");
        assert!(p[0].message.contains("{nope}"), "{}", p[0].message);
        for name in ["/abs/{id}", "../{id}", "a//{id}", "{id}/", "./{id}", ""] {
            let p = problems(name, None);
            assert_eq!(p.len(), 1, "{name:?}: {p:?}");
            assert_eq!(p[0].key, "sinks.f.name");
        }
        for mode in ["0640", "640", "0o600", "0"] {
            assert!(problems("{id}", Some(mode)).is_empty(), "{mode}");
        }
        for mode in ["rw-r-----", "0999", "4755", "", "01234567"] {
            let p = problems("{id}", Some(mode));
            assert_eq!(p.len(), 1, "{mode:?}");
            assert_eq!(p[0].key, "sinks.f.file_mode");
        }
    }

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c: FileConfig = toml::from_str("dir = \"out\"\nname = \"{id}.json\"\n").unwrap();
        assert!(c.create_dir);
        assert_eq!(c.file_mode, None);
        assert_eq!(c.retry, RetryConfig::default());
        assert_eq!(c.mode, WriteMode::File);
        let e = toml::from_str::<FileConfig>("dir = \"out\"\nname = \"x\"\nperms = \"0640\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let mut c = c;
        c.resolve_paths(Path::new("/etc/ess"));
        assert_eq!(c.dir, Path::new("/etc/ess/out"));
    }
}
