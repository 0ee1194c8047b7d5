//! PostgreSQL: the ledger claimed in one statement for the whole batch, and each statement
//! described by the server so that values are encoded to the types it needs.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{
    Arguments as _, AssertSqlSafe, Either, Executor as _, Postgres, Row as _, SqlSafeStr as _,
    SqlStr, Statement as _,
};

use super::Shared;
use super::batch::{Failure, Job};
use super::cache_capacity;
use super::config::TlsMode;
use super::plan::{Op, record_name};
use super::server::{Server, ServerOptions};
use super::statement::Dialect;
use super::{statement, value};
use crate::sink::SinkError;

impl Server for Postgres {
    fn no_such_table(failure: &Failure) -> bool {
        failure.sqlstate.as_deref() == Some("42P01")
    }

    async fn execute(conn: &mut PgConnection, sql: SqlStr) -> Result<(), sqlx::Error> {
        conn.execute(sql).await.map(|_| ())
    }

    async fn claim(
        shared: &Shared,
        conn: &mut PgConnection,
        jobs: &[Job],
    ) -> Result<Vec<bool>, Failure> {
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let routes: Vec<&str> = jobs.iter().map(|j| j.route.as_str()).collect();
        let claim = statement::pg_ledger_claim(&shared.ledger);
        let rows = shared
            .timed(
                sqlx::query(AssertSqlSafe(claim))
                    .bind(ids)
                    .bind(routes)
                    .fetch_all(&mut *conn),
            )
            .await?;
        let mut claimed: HashSet<(String, String)> = rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
            .collect();
        // `remove`: should a pair appear twice in one batch, only the first writes.
        Ok(jobs
            .iter()
            .map(|job| !claimed.remove(&(job.id.clone(), job.route.clone())))
            .collect())
    }

    async fn op(shared: &Shared, conn: &mut PgConnection, op: &Op) -> Result<(), Failure> {
        // The server describes each parameter's type; values are encoded to match it.
        let described = shared
            .timed(conn.prepare_with(AssertSqlSafe(op.sql.clone()).into_sql_str(), &[]))
            .await
            .map_err(|f| shared.in_op(f, op))?;
        let types = match described.parameters() {
            Some(Either::Left(types)) => types.to_vec(),
            _ => Vec::new(),
        };
        if types.len() != op.binds.len() {
            return Err(Failure::event(SinkError::Permanent(format!(
                "the statement has {} parameters but {} values were bound",
                types.len(),
                op.binds.len()
            ))));
        }
        let mut args = PgArguments::default();
        for (bind, ty) in op.binds.iter().zip(&types) {
            let param = value::pg_param(&bind.value, ty).map_err(|e| {
                Failure::event(SinkError::Permanent(format!(
                    "{} of {}: {e}",
                    bind.label,
                    record_name(op.record)
                )))
            })?;
            args.add(param).map_err(|e| {
                Failure::event(SinkError::Permanent(format!(
                    "{}: cannot encode: {e}",
                    bind.label
                )))
            })?;
        }
        shared
            .timed(sqlx::query_with(AssertSqlSafe(op.sql.clone()), args).execute(&mut *conn))
            .await
            .map(|_| ())
            .map_err(|f| shared.in_op(f, op))
    }
}

impl ServerOptions for PgConnectOptions {
    const DIALECT: Dialect = Dialect::Postgres;
    const EXAMPLE: &'static str = "postgres://ess@db.example:5432/rules";

    fn with_password(self, password: &str) -> Self {
        self.password(password)
    }

    fn with_tls(self, mode: TlsMode) -> Self {
        self.ssl_mode(match mode {
            TlsMode::Disable => PgSslMode::Disable,
            TlsMode::Prefer => PgSslMode::Prefer,
            TlsMode::Require => PgSslMode::Require,
            TlsMode::VerifyCa => PgSslMode::VerifyCa,
            TlsMode::VerifyFull => PgSslMode::VerifyFull,
        })
    }

    fn with_ca(self, pem: Vec<u8>) -> Self {
        self.ssl_root_cert_from_pem(pem)
    }

    fn tuned(self, max_batch: usize, statement_timeout: Duration) -> Self {
        self.application_name("ess-agent")
            .statement_cache_capacity(cache_capacity(max_batch))
            .options([(
                "statement_timeout",
                format!("{}", statement_timeout.as_millis()),
            )])
    }

    fn at(&self) -> (&str, u16, Option<&str>) {
        (self.get_host(), self.get_port(), self.get_database())
    }
}
