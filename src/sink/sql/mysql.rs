//! MariaDB/MySQL: a batch in one transaction, the ledger read and then written, values bound
//! by the column types the server reports for the table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection as _, Executor as _, MySql, Row as _};

use super::Shared;
use super::batch::{Attempt, Failure, Job, close_if_poisoned};
use super::plan::{Bind, Op};
use super::statement::{self, Dialect, TableName};
use super::value::{self, MyColumn, MyParam};

impl Shared {
    pub(super) async fn acquire_my(
        &self,
        pool: &sqlx::MySqlPool,
    ) -> Result<PoolConnection<MySql>, Failure> {
        pool.acquire().await.map_err(|e| self.failure(&e))
    }

    pub(super) async fn attempt_my(&self, pool: &sqlx::MySqlPool, jobs: &[Job]) -> Attempt {
        let mut conn = match self.acquire_my(pool).await {
            Ok(conn) => conn,
            Err(f) => return Attempt::Failed(f),
        };
        let attempt = self.my_transaction(&mut conn, jobs).await;
        close_if_poisoned(&mut conn, &attempt);
        attempt
    }

    async fn my_ledger(&self, conn: &mut sqlx::MySqlConnection) -> Result<(), Failure> {
        self.ledger_ready
            .get_or_try_init(|| async {
                match self
                    .timed(conn.execute(AssertSqlSafe(self.ledger_sql.probe.clone())))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(f) if f.number == Some(1146) => {
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

    async fn my_transaction(&self, conn: &mut sqlx::MySqlConnection, jobs: &[Job]) -> Attempt {
        if let Err(f) = self.my_ledger(conn).await {
            return Attempt::Failed(f);
        }
        let mut tx = match self.timed(conn.begin()).await {
            Ok(tx) => tx,
            Err(f) => return Attempt::Failed(f),
        };
        let result = async {
            let select = statement::ledger_select(Dialect::MySql, &self.ledger, jobs.len());
            let mut query = sqlx::query(AssertSqlSafe(select));
            for job in jobs {
                query = query.bind(job.id.clone());
            }
            let rows = self
                .timed(query.fetch_all(&mut *tx))
                .await
                .map_err(|f| (None, f))?;
            let applied: HashSet<(String, String)> = rows
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect();
            // A pair seen earlier in the batch counts as found, so that it is written once.
            let mut seen = HashSet::new();
            let found: Vec<bool> = jobs
                .iter()
                .map(|j| {
                    let pair = (j.id.clone(), j.route.clone());
                    applied.contains(&pair) || !seen.insert(pair)
                })
                .collect();
            let new: Vec<&Job> = jobs
                .iter()
                .zip(&found)
                .filter(|(_, f)| !**f)
                .map(|(j, _)| j)
                .collect();
            if !new.is_empty() {
                let insert = statement::ledger_insert(Dialect::MySql, &self.ledger, new.len());
                let mut query = sqlx::query(AssertSqlSafe(insert));
                for job in &new {
                    query = query.bind(job.id.clone()).bind(job.route.clone());
                }
                self.timed(query.execute(&mut *tx)).await.map_err(|mut f| {
                    if f.number == Some(1062) {
                        f.ledger_conflict = true;
                    }
                    (None, Failure { whole: true, ..f })
                })?;
            }
            for (i, job) in jobs.iter().enumerate() {
                if found[i] {
                    continue;
                }
                for op in &job.ops {
                    self.my_op(&mut tx, op).await.map_err(|f| (Some(i), f))?;
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

    /// The column types of a table (MariaDB/MySQL), cached; read again when a column is not
    /// known (the table may have changed).
    async fn my_column_types(
        &self,
        conn: &mut sqlx::MySqlConnection,
        table: &TableName,
        wanted: &[Bind],
    ) -> Result<Arc<HashMap<String, MyColumn>>, Failure> {
        let cache_key = table.shown();
        let cached = self
            .my_columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
            .cloned();
        if let Some(columns) = cached
            && wanted
                .iter()
                .filter_map(|b| b.column.as_ref())
                .all(|c| columns.contains_key(&c.to_ascii_lowercase()))
        {
            return Ok(columns);
        }
        let rows = self
            .timed(
                sqlx::query(
                    "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR) FROM \
                     information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) \
                     AND TABLE_NAME = ?",
                )
                .bind(table.schema.clone())
                .bind(table.name.clone())
                .fetch_all(&mut *conn),
            )
            .await?;
        let columns: HashMap<String, MyColumn> = rows
            .iter()
            .filter_map(|r| {
                let name: String = r.try_get(0).ok()?;
                let data_type: String = r.try_get(1).ok()?;
                Some((
                    name.to_ascii_lowercase(),
                    MyColumn::from_data_type(&data_type),
                ))
            })
            .collect();
        let columns = Arc::new(columns);
        self.my_columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cache_key, columns.clone());
        Ok(columns)
    }

    async fn my_op(&self, conn: &mut sqlx::MySqlConnection, op: &Op) -> Result<(), Failure> {
        let columns = match &op.table {
            Some(table) => Some(self.my_column_types(conn, table, &op.binds).await?),
            None => None,
        };
        let mut query = sqlx::query(AssertSqlSafe(op.sql.clone()));
        for bind in &op.binds {
            let column = match (&columns, &bind.column) {
                (Some(columns), Some(name)) => Some(
                    columns
                        .get(&name.to_ascii_lowercase())
                        .copied()
                        .unwrap_or(MyColumn::Other),
                ),
                _ => None,
            };
            query = match value::my_param(&bind.value, column) {
                MyParam::Null => query.bind(None::<String>),
                MyParam::Bool(b) => query.bind(b),
                MyParam::Int(i) => query.bind(i),
                MyParam::UInt(u) => query.bind(u),
                MyParam::Text(s) => query.bind(s),
            };
        }
        self.timed(query.execute(&mut *conn))
            .await
            .map(|_| ())
            .map_err(|f| self.in_op(f, op))
    }
}
