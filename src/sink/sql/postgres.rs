//! PostgreSQL: a batch in one transaction, the ledger claimed in one statement, each statement
//! described by the server so that values are encoded to the types it needs.

use std::collections::HashSet;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgArguments;
use sqlx::{
    Arguments as _, AssertSqlSafe, Connection as _, Either, Executor as _, Postgres, Row as _,
    SqlSafeStr as _, Statement as _,
};

use super::batch::{Attempt, Failure, Job, close_if_poisoned};
use super::plan::{Op, record_name};
use super::{Shared, statement, value};
use crate::sink::SinkError;

impl Shared {
    pub(super) async fn acquire_pg(
        &self,
        pool: &sqlx::PgPool,
    ) -> Result<PoolConnection<Postgres>, Failure> {
        pool.acquire().await.map_err(|e| self.failure(&e))
    }

    pub(super) async fn attempt_pg(&self, pool: &sqlx::PgPool, jobs: &[Job]) -> Attempt {
        let mut conn = match self.acquire_pg(pool).await {
            Ok(conn) => conn,
            Err(f) => return Attempt::Failed(f),
        };
        let attempt = self.pg_transaction(&mut conn, jobs).await;
        close_if_poisoned(&mut conn, &attempt);
        attempt
    }

    async fn pg_ledger(&self, conn: &mut sqlx::PgConnection) -> Result<(), Failure> {
        self.ledger_ready
            .get_or_try_init(|| async {
                match self
                    .timed(conn.execute(AssertSqlSafe(self.ledger_sql.probe.clone())))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(f) if f.sqlstate.as_deref() == Some("42P01") => {
                        if !self.create_ledger {
                            return Err(self.missing_ledger());
                        }
                        self.timed(conn.execute(AssertSqlSafe(self.ledger_sql.create.clone())))
                            .await
                            .map(|_| ())
                    }
                    Err(f) => Err(f),
                }
            })
            .await
            .map(|_| ())
    }

    async fn pg_transaction(&self, conn: &mut sqlx::PgConnection, jobs: &[Job]) -> Attempt {
        if let Err(f) = self.pg_ledger(conn).await {
            return Attempt::Failed(f);
        }
        let mut tx = match self.timed(conn.begin()).await {
            Ok(tx) => tx,
            Err(f) => return Attempt::Failed(f),
        };
        let result = async {
            let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
            let routes: Vec<&str> = jobs.iter().map(|j| j.route.as_str()).collect();
            let claim = statement::pg_ledger_claim(&self.ledger);
            let rows = self
                .timed(
                    sqlx::query(AssertSqlSafe(claim))
                        .bind(ids)
                        .bind(routes)
                        .fetch_all(&mut *tx),
                )
                .await
                .map_err(|f| (None, f))?;
            let mut claimed: HashSet<(String, String)> = rows
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect();
            let mut found = Vec::with_capacity(jobs.len());
            for (i, job) in jobs.iter().enumerate() {
                // `remove`: should a pair appear twice in one batch, only the first writes.
                let new = claimed.remove(&(job.id.clone(), job.route.clone()));
                found.push(!new);
                if !new {
                    continue;
                }
                for op in &job.ops {
                    self.pg_op(&mut tx, op).await.map_err(|f| (Some(i), f))?;
                }
            }
            Ok(found)
        }
        .await;
        match result {
            Ok(found) => match self.timed(tx.commit()).await {
                Ok(()) => Attempt::Committed(found),
                Err(f) => Attempt::Failed(Failure { whole: true, ..f }),
            },
            Err((index, f)) => {
                if !f.poisoned && self.timed(tx.rollback()).await.is_err() {
                    return Attempt::Failed(Failure {
                        poisoned: true,
                        ..f
                    });
                }
                match index {
                    Some(i) if !f.whole => Attempt::EventFailed(i, f),
                    _ => Attempt::Failed(f),
                }
            }
        }
    }

    async fn pg_op(&self, conn: &mut sqlx::PgConnection, op: &Op) -> Result<(), Failure> {
        // The server describes each parameter's type; values are encoded to match it.
        let described = self
            .timed(conn.prepare_with(AssertSqlSafe(op.sql.clone()).into_sql_str(), &[]))
            .await
            .map_err(|f| self.in_op(f, op))?;
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
        self.timed(sqlx::query_with(AssertSqlSafe(op.sql.clone()), args).execute(&mut *conn))
            .await
            .map(|_| ())
            .map_err(|f| self.in_op(f, op))
    }
}
