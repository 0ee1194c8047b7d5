//! How a failed request is classified and worded.

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::StatusCode;

use super::SftpSink;
use super::session::Target;
use crate::sink::SinkError;

/// A failed SFTP request: what was done, to which path, and the error.
#[derive(Debug)]
pub(super) struct OpFailure {
    pub(super) action: &'static str,
    pub(super) path: String,
    pub(super) error: SftpError,
    /// Whether `SSH_FX_NO_SUCH_FILE` means a missing directory (permanent) rather than a file
    /// that vanished underneath us (retryable).
    pub(super) missing_is_permanent: bool,
}

impl OpFailure {
    pub(super) fn new(action: &'static str, path: &str, error: SftpError) -> OpFailure {
        OpFailure {
            action,
            path: path.to_string(),
            error,
            missing_is_permanent: false,
        }
    }

    /// True when the channel itself failed (not a status answer from the server).
    pub(super) fn is_transport(&self) -> bool {
        !matches!(self.error, SftpError::Status(_))
    }
}

impl SftpSink {
    /// The error to report for a failed request.
    pub(super) fn classify(&self, failure: &OpFailure) -> SinkError {
        let target = &self.target;
        let OpFailure {
            action,
            path,
            error,
            ..
        } = failure;
        let SftpError::Status(status) = error else {
            return SinkError::Retryable(format!(
                "{action} {path} on {target}: {error}; the upload will be retried on a new \
                 connection"
            ));
        };
        let server = if status.error_message.is_empty() {
            String::new()
        } else {
            format!(" (the server said {:?})", status.error_message)
        };
        match status.status_code {
            StatusCode::PermissionDenied => SinkError::Permanent(format!(
                "{action} {path} on {target}: permission denied{server}: give user {} write \
                 access to the directory on the server, then replay the event",
                target.user
            )),
            StatusCode::NoSuchFile if failure.missing_is_permanent => {
                SinkError::Permanent(format!(
                    "{action} {path} on {target}: no such directory{server}: create it on the \
                     server or set create_dirs = true, then replay the event"
                ))
            }
            StatusCode::BadMessage => SinkError::Permanent(format!(
                "{action} {path} on {target}: the server refused the request as invalid{server} \
                 (a name too long or not valid there): change the name template, then replay \
                 the event"
            )),
            StatusCode::OpUnsupported => SinkError::Permanent(format!(
                "{action} {path} on {target}: the server does not support this{server}"
            )),
            _ => SinkError::Retryable(format!(
                "{action} {path} on {target}: {}{server}; the upload will be retried",
                status.status_code
            )),
        }
    }
}

/// A permanent or retryable error from an SSH request after the session exists.
pub(super) fn ssh_failure(target: &Target, doing: &str, e: &russh::Error) -> SinkError {
    SinkError::Retryable(format!(
        "{doing} on {target} failed: {e}; the upload will be retried"
    ))
}

/// The same error with a note appended.
pub(super) fn with_note(error: &SinkError, note: &str) -> SinkError {
    match error {
        SinkError::Retryable(m) => SinkError::Retryable(format!("{m} ({note})")),
        SinkError::RetryAfter(m, after) => SinkError::RetryAfter(format!("{m} ({note})"), *after),
        SinkError::Permanent(m) => SinkError::Permanent(m.clone()),
    }
}
