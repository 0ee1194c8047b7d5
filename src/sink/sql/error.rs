//! Errors classified by SQLSTATE, error number or result code (never by message text), and
//! errors shown without what could be a password.

use sqlx::mysql::MySqlDatabaseError;
use sqlx::postgres::PgDatabaseError;

use super::Shared;
use super::batch::Failure;
use crate::sink::SinkError;

/// An error's text without anything that could be a password.
pub(super) fn redact_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => {
            // URL parse errors name what is wrong, never the input.
            inner.to_string()
        }
        _ => "invalid".into(),
    }
}

impl Shared {
    /// Classifies an sqlx error (by SQLSTATE / error number and error kind, never by text).
    pub(super) fn failure(&self, e: &sqlx::Error) -> Failure {
        let db = self.dialect.name();
        let at = &self.shown;
        let retry_all = |message: String| Failure::whole(SinkError::Retryable(message));
        match e {
            sqlx::Error::Database(d) => {
                let mut sqlstate = None;
                let mut number = None;
                let (retryable, whole, code) =
                    if let Some(pg) = d.try_downcast_ref::<PgDatabaseError>() {
                        sqlstate = Some(pg.code().to_string());
                        let (r, w) = classify_pg(pg.code());
                        (r, w, format!("SQLSTATE {}", pg.code()))
                    } else if let Some(my) = d.try_downcast_ref::<MySqlDatabaseError>() {
                        number = Some(my.number());
                        let (r, w) = classify_my(my.number(), my.code());
                        (r, w, format!("error {}", my.number()))
                    } else {
                        (true, true, "unknown code".into())
                    };
                let mut message = format!("{db} refused the write: {} ({code})", d.message());
                if let Some(pg) = d.try_downcast_ref::<PgDatabaseError>()
                    && let Some(detail) = pg.detail()
                {
                    message.push_str(&format!(": {detail}"));
                }
                Failure {
                    error: if retryable {
                        SinkError::Retryable(message)
                    } else {
                        SinkError::Permanent(message)
                    },
                    whole,
                    sqlstate,
                    number,
                    ..Failure::whole(SinkError::Retryable(String::new()))
                }
            }
            // A handshake that rustls refused (an untrusted or mismatched certificate) arrives
            // as an I/O error carrying the rustls error.
            sqlx::Error::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
            {
                Failure {
                    poisoned: true,
                    ..retry_all(format!(
                        "TLS with {db} at {at} failed: {io} (check tls and ca_file)"
                    ))
                }
            }
            sqlx::Error::Io(io) => Failure {
                poisoned: true,
                ..retry_all(format!("cannot reach {db} at {at}: {io}"))
            },
            sqlx::Error::Tls(t) => retry_all(format!(
                "TLS with {db} at {at} failed: {t} (check tls and ca_file)"
            )),
            sqlx::Error::PoolTimedOut => retry_all(format!(
                "no connection to {db} at {at} within {} ms (connect_timeout_ms): is the \
                 database up and reachable?",
                self.connect_timeout.as_millis()
            )),
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                retry_all(format!("the connection pool for {db} at {at} is closed"))
            }
            sqlx::Error::Protocol(p) => Failure {
                poisoned: true,
                ..retry_all(format!("{db} at {at} broke the protocol: {p}"))
            },
            sqlx::Error::Configuration(c) => Failure::whole(SinkError::Permanent(format!(
                "the connection to {db} at {at} is misconfigured: {c}"
            ))),
            sqlx::Error::Encode(_)
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::InvalidArgument(_) => Failure::event(SinkError::Permanent(format!(
                "{db} cannot take a value: {e}"
            ))),
            other => retry_all(format!("{db} at {at}: {other}")),
        }
    }

    /// Classifies a rusqlite error by its result code.
    pub(super) fn sqlite_failure(&self, e: &rusqlite::Error, doing: &str) -> Failure {
        use rusqlite::ErrorCode as C;
        let doing = if doing.is_empty() {
            String::new()
        } else {
            format!(" while {doing}")
        };
        let at = &self.shown;
        match e {
            rusqlite::Error::SqliteFailure(err, message) => {
                let text = message.clone().unwrap_or_else(|| err.to_string());
                let (retryable, whole) = match err.code {
                    C::DatabaseBusy | C::DatabaseLocked => (true, true),
                    C::OperationInterrupted => (true, false),
                    C::SystemIoFailure
                    | C::DiskFull
                    | C::CannotOpen
                    | C::OutOfMemory
                    | C::FileLockingProtocolFailed
                    | C::OperationAborted
                    | C::SchemaChanged => (true, true),
                    C::ReadOnly
                    | C::PermissionDenied
                    | C::NotADatabase
                    | C::DatabaseCorrupt
                    | C::AuthorizationForStatementDenied => (false, true),
                    _ => (false, false),
                };
                let message = format!(
                    "SQLite {at} refused the write{doing}: {text} (code {})",
                    err.extended_code
                );
                let error = if retryable {
                    SinkError::Retryable(message)
                } else {
                    SinkError::Permanent(message)
                };
                Failure {
                    whole,
                    ..Failure::whole(error)
                }
            }
            other => Failure::event(SinkError::Permanent(format!(
                "SQLite {at} cannot run the statement{doing}: {other}"
            ))),
        }
    }
}

/// PostgreSQL: (retryable, whole transaction) for a SQLSTATE.
pub(super) fn classify_pg(code: &str) -> (bool, bool) {
    match code {
        // Statement timeout and lock timeout: this statement ran into it.
        "57014" | "55P03" => (true, false),
        _ => match code.get(..2).unwrap_or("") {
            "08" | "40" | "53" | "55" | "57" | "58" | "XX" => (true, true),
            _ => (false, false),
        },
    }
}

/// MariaDB/MySQL: (retryable, whole transaction) for an error number and SQLSTATE.
pub(super) fn classify_my(number: u16, sqlstate: Option<&str>) -> (bool, bool) {
    match number {
        // Lock wait timeout (the statement is rolled back), statement time limits, interrupted.
        1205 | 1969 | 3024 | 1317 => (true, false),
        // Deadlock (the whole transaction is rolled back), too many connections, shutdown,
        // connection errors, commit/rollback failures, full disk or memory, read-only.
        1213 | 1614 | 1040 | 1203 | 1053 | 1077 | 1152 | 1153 | 1154 | 1155 | 1156 | 1157
        | 1158 | 1159 | 1160 | 1161 | 1180 | 1181 | 1927 | 4031 | 1021 | 1037 | 1038 | 1041
        | 1114 | 1135 | 1206 | 1637 | 1290 | 1836 => (true, true),
        _ => match sqlstate.and_then(|s| s.get(..2)) {
            Some("08" | "40") => (true, true),
            _ => (false, false),
        },
    }
}
