//! MariaDB/MySQL: the ledger read and then written for the whole batch, and values bound by
//! the column types the server reports for the table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlSslMode};
use sqlx::{AssertSqlSafe, Executor as _, MySql, MySqlPool, Row as _, SqlStr};

use super::Shared;
use super::batch::{Failure, Job};
use super::cache_capacity;
use super::config::TlsMode;
use super::plan::{Bind, Op};
use super::server::{Server, ServerOptions};
use super::statement::{self, Dialect, TableName};
use super::value::{self, MyColumn, MyParam};

impl Server for MySql {
    fn no_such_table(failure: &Failure) -> bool {
        failure.number == Some(1146)
    }

    async fn execute(conn: &mut MySqlConnection, sql: SqlStr) -> Result<(), sqlx::Error> {
        conn.execute(sql).await.map(|_| ())
    }

    async fn claim(
        shared: &Shared,
        conn: &mut MySqlConnection,
        jobs: &[Job],
    ) -> Result<Vec<bool>, Failure> {
        let select = statement::ledger_select(Dialect::MySql, &shared.ledger, jobs.len());
        let mut query = sqlx::query(AssertSqlSafe(select));
        for job in jobs {
            query = query.bind(job.id.clone());
        }
        let rows = shared.timed(query.fetch_all(&mut *conn)).await?;
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
            let insert = statement::ledger_insert(Dialect::MySql, &shared.ledger, new.len());
            let mut query = sqlx::query(AssertSqlSafe(insert));
            for job in &new {
                query = query.bind(job.id.clone()).bind(job.route.clone());
            }
            shared
                .timed(query.execute(&mut *conn))
                .await
                .map_err(|mut f| {
                    // A duplicate key: another transaction recorded one of these events
                    // meanwhile.
                    if f.number == Some(1062) {
                        f.ledger_conflict = true;
                    }
                    Failure { whole: true, ..f }
                })?;
        }
        Ok(found)
    }

    async fn op(shared: &Shared, conn: &mut MySqlConnection, op: &Op) -> Result<(), Failure> {
        let columns = match &op.table {
            Some(table) => Some(shared.my_column_types(conn, table, &op.binds).await?),
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
        shared
            .timed(query.execute(&mut *conn))
            .await
            .map(|_| ())
            .map_err(|f| shared.in_op(f, op))
    }
}

impl ServerOptions for MySqlConnectOptions {
    const DIALECT: Dialect = Dialect::MySql;
    const EXAMPLE: &'static str = "mysql://ess@db.example:3306/rules";

    fn with_password(self, password: &str) -> Self {
        self.password(password)
    }

    fn with_tls(self, mode: TlsMode) -> Self {
        self.ssl_mode(match mode {
            TlsMode::Disable => MySqlSslMode::Disabled,
            TlsMode::Prefer => MySqlSslMode::Preferred,
            TlsMode::Require => MySqlSslMode::Required,
            TlsMode::VerifyCa => MySqlSslMode::VerifyCa,
            TlsMode::VerifyFull => MySqlSslMode::VerifyIdentity,
        })
    }

    fn with_ca(self, pem: Vec<u8>) -> Self {
        self.ssl_ca_from_pem(pem)
    }

    fn tuned(self, max_batch: usize, _statement_timeout: Duration) -> Self {
        // The server's own SQL mode: a partner's statements mean what they mean in their
        // other clients (`||` stays OR unless the server says otherwise).
        self.pipes_as_concat(false)
            .statement_cache_capacity(cache_capacity(max_batch))
    }

    fn at(&self) -> (&str, u16, Option<&str>) {
        (self.get_host(), self.get_port(), self.get_database())
    }
}

impl Shared {
    /// The pool, whose connections set MariaDB's server-side statement limit when they open.
    pub(super) fn my_pool(&self, options: &MySqlConnectOptions) -> MySqlPool {
        let limit = self.statement_timeout.as_secs_f64();
        self.pool_options::<MySql>()
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    // MariaDB's server-side statement limit; MySQL has no such variable (1193)
                    // and relies on the sink's own timeout.
                    let set = format!("SET SESSION max_statement_time = {limit}");
                    match conn.execute(AssertSqlSafe(set)).await {
                        Err(sqlx::Error::Database(e))
                            if e.try_downcast_ref::<MySqlDatabaseError>()
                                .is_some_and(|e| e.number() == 1193) =>
                        {
                            Ok(())
                        }
                        other => other.map(|_| ()),
                    }
                })
            })
            .connect_lazy_with(options.clone())
    }

    /// The column types of a table (MariaDB/MySQL), cached; read again when a column is not
    /// known (the table may have changed).
    async fn my_column_types(
        &self,
        conn: &mut MySqlConnection,
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
}
