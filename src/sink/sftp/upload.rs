//! The apply path: each record planned, written to its temporary file and renamed into place.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use serde_json::Value;

use super::error::OpFailure;
use super::session::Chan;
use super::{SftpSink, join};
use crate::sink::template::{file_records, temp_name};
use crate::sink::{EventMeta, SinkError};

/// Bytes per SFTP write request: every server must accept 32 KiB.
pub(super) const CHUNK: usize = 32 * 1024;
/// Requests of one upload in flight at a time.
pub(super) const WINDOW: usize = 16;

/// One file to upload.
#[derive(Debug)]
pub(super) struct Planned {
    /// The remote directory (dir plus the name's parent components).
    pub(super) dir: String,
    /// The final path.
    pub(super) target: String,
    /// The hidden temporary path next to it.
    pub(super) temp: String,
    pub(super) content: Vec<u8>,
}

impl SftpSink {
    /// Renders and checks every record's name and content. Pure: nothing is sent.
    pub(super) fn plan(
        &self,
        event: &EventMeta,
        output: &Value,
    ) -> Result<Vec<Planned>, SinkError> {
        let records = file_records(&self.name, event, output)?;
        Ok(records
            .into_iter()
            .enumerate()
            .map(|(index, record)| {
                let parents: Vec<&str> = record.parents.iter().map(String::as_str).collect();
                let dir = join(&self.dir, &parents);
                Planned {
                    target: join(&dir, &[&record.file_name]),
                    temp: join(&dir, &[&temp_name(&record.file_name, event, index)]),
                    dir,
                    content: record.content,
                }
            })
            .collect())
    }

    /// Uploads every record to its temporary name, then renames them all into place.
    pub(super) async fn upload(&self, chan: &Chan, planned: &[Planned]) -> Result<(), OpFailure> {
        for (i, record) in planned.iter().enumerate() {
            if let Err(e) = self.write_temp(chan, record).await {
                if !e.is_transport() {
                    discard(chan, &planned[..=i]).await;
                }
                return Err(e);
            }
        }
        for (i, record) in planned.iter().enumerate() {
            if let Err(e) = rename(chan, record).await {
                if !e.is_transport() {
                    discard(chan, &planned[i..]).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Creates, fills, fsyncs and closes one temporary file.
    pub(super) async fn write_temp(&self, chan: &Chan, record: &Planned) -> Result<(), OpFailure> {
        let handle = match self.create_temp(chan, record).await {
            Err(e)
                if self.create_dirs
                    && matches!(&e.error, SftpError::Status(s) if s.status_code == StatusCode::NoSuchFile) =>
            {
                self.make_dirs(chan, &record.dir).await?;
                self.create_temp(chan, record).await?
            }
            other => other?,
        };
        let mut steps: Vec<Step<'_>> = record
            .content
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, chunk)| Step::Write((i * CHUNK) as u64, chunk))
            .collect();
        if let Some(mode) = self.file_mode {
            steps.push(Step::Mode(mode));
        }
        if chan.fsync {
            steps.push(Step::Fsync);
        }
        let mut result = Ok(());
        for window in steps.chunks(WINDOW) {
            let requests = window
                .iter()
                .map(|step| step.send(&chan.raw, &handle))
                .collect();
            let failed = in_order(requests)
                .await
                .into_iter()
                .zip(window)
                .find_map(|(r, step)| {
                    r.err()
                        .map(|e| OpFailure::new(step.action(), &record.temp, e))
                });
            if let Some(failure) = failed {
                result = Err(failure);
                break;
            }
        }
        match result {
            Ok(()) => chan
                .raw
                .close(handle)
                .await
                .map(|_| ())
                .map_err(|e| OpFailure::new("cannot close", &record.temp, e)),
            Err(failure) => {
                if !failure.is_transport() {
                    let _ = chan.raw.close(handle).await;
                }
                Err(failure)
            }
        }
    }

    /// Removes a leftover of an earlier attempt and creates the temporary file exclusively;
    /// both requests go out together.
    pub(super) async fn create_temp(
        &self,
        chan: &Chan,
        record: &Planned,
    ) -> Result<String, OpFailure> {
        let attrs = FileAttributes {
            permissions: self.file_mode,
            ..FileAttributes::empty()
        };
        let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE;
        let raw = &chan.raw;
        let requests: Vec<Pending<'_, Option<String>>> = vec![
            Box::pin(async { raw.remove(record.temp.as_str()).await.map(|_| None) }),
            Box::pin(async move {
                raw.open(record.temp.as_str(), flags, attrs)
                    .await
                    .map(|h| Some(h.handle))
            }),
        ];
        // The removal usually finds nothing; only the creation matters.
        match in_order(requests).await.pop() {
            Some(Ok(Some(handle))) => Ok(handle),
            Some(Err(error)) => Err(OpFailure {
                missing_is_permanent: true,
                ..OpFailure::new("cannot create", &record.temp, error)
            }),
            _ => Err(OpFailure::new(
                "cannot create",
                &record.temp,
                SftpError::UnexpectedPacket,
            )),
        }
    }

    /// Creates the missing levels of `dir`, from the top.
    pub(super) async fn make_dirs(&self, chan: &Chan, dir: &str) -> Result<(), OpFailure> {
        let mut prefixes = Vec::new();
        for (i, c) in dir.char_indices() {
            if c == '/' && i > 0 {
                prefixes.push(&dir[..i]);
            }
        }
        if !dir.ends_with('/') {
            prefixes.push(dir);
        }
        for prefix in prefixes.into_iter().filter(|p| *p != ".") {
            match chan.raw.stat(prefix).await {
                Ok(_) => continue,
                Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => {}
                Err(e) => return Err(OpFailure::new("cannot inspect", prefix, e)),
            }
            if let Err(e) = chan.raw.mkdir(prefix, FileAttributes::empty()).await {
                // Another writer may have created it in the meantime.
                if chan.raw.stat(prefix).await.is_err() {
                    return Err(OpFailure {
                        missing_is_permanent: true,
                        ..OpFailure::new("cannot create the directory", prefix, e)
                    });
                }
            }
        }
        Ok(())
    }
}

/// One request of an upload.
pub(super) enum Step<'a> {
    Write(u64, &'a [u8]),
    Mode(u32),
    Fsync,
}

impl<'a> Step<'a> {
    pub(super) fn action(&self) -> &'static str {
        match self {
            Step::Write(..) => "cannot write",
            Step::Mode(_) => "cannot set the mode of",
            Step::Fsync => "cannot fsync",
        }
    }

    pub(super) fn send<'s>(&'s self, raw: &'s RawSftpSession, handle: &'s str) -> Pending<'s, ()> {
        match *self {
            Step::Write(offset, data) => {
                Box::pin(async move { raw.write(handle, offset, data.to_vec()).await.map(|_| ()) })
            }
            Step::Mode(mode) => Box::pin(async move {
                let attrs = FileAttributes {
                    permissions: Some(mode),
                    ..FileAttributes::empty()
                };
                raw.fsetstat(handle, attrs).await.map(|_| ())
            }),
            Step::Fsync => Box::pin(async move { raw.fsync(handle).await.map(|_| ()) }),
        }
    }
}

/// Renames a temporary file over its target.
pub(super) async fn rename(chan: &Chan, record: &Planned) -> Result<(), OpFailure> {
    let raw = &chan.raw;
    if chan.posix_rename {
        let mut data = Vec::with_capacity(8 + record.temp.len() + record.target.len());
        for path in [&record.temp, &record.target] {
            data.extend_from_slice(&(path.len() as u32).to_be_bytes());
            data.extend_from_slice(path.as_bytes());
        }
        let answer = raw.extended("posix-rename@openssh.com", data).await;
        return status_of(answer)
            .map_err(|e| OpFailure::new("cannot rename into", &record.target, e));
    }
    // A plain SFTP rename refuses to replace a file: remove the old one first (not atomic).
    let requests: Vec<Pending<'_, ()>> = vec![
        Box::pin(async { raw.remove(record.target.as_str()).await.map(|_| ()) }),
        Box::pin(async {
            raw.rename(record.temp.as_str(), record.target.as_str())
                .await
                .map(|_| ())
        }),
    ];
    match in_order(requests).await.pop() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(OpFailure::new("cannot rename into", &record.target, e)),
        None => Err(OpFailure::new(
            "cannot rename into",
            &record.target,
            SftpError::UnexpectedPacket,
        )),
    }
}

/// An extended request's answer as a status.
pub(super) fn status_of(answer: Result<Packet, SftpError>) -> Result<(), SftpError> {
    match answer? {
        Packet::Status(s) if s.status_code == StatusCode::Ok => Ok(()),
        Packet::Status(s) => Err(SftpError::Status(s)),
        _ => Err(SftpError::UnexpectedPacket),
    }
}

/// Removes the temporary files of records, best effort: a leftover is also replaced by the
/// next attempt at the same event.
pub(super) async fn discard(chan: &Chan, records: &[Planned]) {
    let raw = &chan.raw;
    let requests: Vec<Pending<'_, ()>> = records
        .iter()
        .map(|r| -> Pending<'_, ()> {
            Box::pin(async move { raw.remove(r.temp.as_str()).await.map(|_| ()) })
        })
        .collect();
    let _ = in_order(requests).await;
}

/// A request on its way.
pub(super) type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, SftpError>> + Send + 'a>>;

/// Sends requests in the given order without waiting for each answer, then waits for all.
///
/// A request future sends its packet the first time it is polled, and the SFTP server handles
/// the requests of one channel in the order they arrive; polling every future once, in order,
/// before waiting pipelines them.
pub(super) async fn in_order<T>(mut requests: Vec<Pending<'_, T>>) -> Vec<Result<T, SftpError>> {
    let mut results: Vec<Option<Result<T, SftpError>>> = requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (request, slot) in requests.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match request.as_mut().poll(cx) {
                    Poll::Ready(result) => *slot = Some(result),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}
