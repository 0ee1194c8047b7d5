//! The plan: an adapter output turned into the statements to run, with the values to bind.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::config::SqlConfig;
use super::statement::{self, Statement, TableName, check_identifier, parse_statement};
use super::{Dialect, Shared, value};
use crate::adapter::engine::{Expression, Limits};
use crate::sink::SinkError;

/// What the sink writes.
#[derive(Debug)]
pub(super) enum Mode {
    Statement {
        statement: Statement,
        /// The statement's text and each bind's label (`:deadline`), made once and shared by
        /// every operation.
        sql: Arc<str>,
        labels: Vec<Arc<str>>,
    },
    Table {
        table: TableName,
        key: Vec<String>,
        delete_when: Option<Expression>,
    },
}

impl Mode {
    pub(super) fn new(config: &SqlConfig, dialect: Dialect) -> Result<Mode, String> {
        match (&config.statement, &config.table) {
            (Some(text), None) => parse_statement(text, dialect)
                .map(|statement| Mode::Statement {
                    sql: Arc::from(statement.sql.as_str()),
                    labels: statement
                        .binds
                        .iter()
                        .map(|name| Arc::from(format!(":{name}")))
                        .collect(),
                    statement,
                })
                .map_err(|e| format!("statement: {e}")),
            (None, Some(table)) => {
                let table = TableName::parse(table).map_err(|e| format!("table: {e}"))?;
                if config.key.is_empty() {
                    return Err("key: is required with table".into());
                }
                for column in &config.key {
                    check_identifier(column).map_err(|e| format!("key: {e}"))?;
                }
                let delete_when = config
                    .delete_when
                    .as_deref()
                    .map(|p| {
                        Expression::compile(p).map_err(|e| {
                            format!(
                                "delete_when: does not compile: {}",
                                e.render("delete_when", p)
                            )
                        })
                    })
                    .transpose()?;
                Ok(Mode::Table {
                    table,
                    key: config.key.clone(),
                    delete_when,
                })
            }
            _ => Err("statement: set exactly one of statement and table".into()),
        }
    }
}

/// The records of an output: each element of an array (with its index), else the output.
pub(super) fn records(output: &Value) -> Vec<(Option<usize>, &Value)> {
    match output {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (Some(i), v))
            .collect(),
        other => vec![(None, other)],
    }
}

pub(super) fn record_name(index: Option<usize>) -> String {
    match index {
        Some(i) => format!("record {i} of the output"),
        None => "the output".into(),
    }
}

pub(super) fn not_an_object(index: Option<usize>, record: &Value) -> String {
    format!(
        "{} is {}: the sql sink binds fields of an object, so the adapter must return an object \
         or an array of objects",
        record_name(index),
        value::kind(record)
    )
}

pub(super) fn missing_field(index: Option<usize>, field: &str, used_as: &str) -> String {
    format!(
        "field {field:?} (bound to {used_as}) is missing from {}: make the adapter return it, \
         or null for NULL",
        record_name(index)
    )
}

/// The columns of a table-mode record, checked: plain names, key columns present and not null.
pub(super) fn table_columns<'a>(
    index: Option<usize>,
    object: &'a Map<String, Value>,
    key: &[String],
) -> Result<Vec<&'a str>, String> {
    for column in key {
        match object.get(column) {
            None => return Err(missing_field(index, column, "key column")),
            Some(Value::Null) => {
                return Err(format!(
                    "key column {column:?} is null in {}: every key column needs a value",
                    record_name(index)
                ));
            }
            Some(_) => {}
        }
    }
    let mut columns = Vec::with_capacity(object.len());
    for name in object.keys() {
        check_identifier(name).map_err(|e| {
            format!(
                "field {e} in {}; it cannot be a column name: rename it in the adapter",
                record_name(index)
            )
        })?;
        columns.push(name.as_str());
    }
    Ok(columns)
}

/// One statement to run for an event, with the values to bind in placeholder order.
#[derive(Debug, Clone)]
pub(super) struct Op {
    pub(super) sql: Arc<str>,
    pub(super) binds: Vec<Bind>,
    /// Table mode: the table, so that MariaDB/MySQL values can follow the column types.
    pub(super) table: Option<TableName>,
    /// Which record of the output this is, for messages.
    pub(super) record: Option<usize>,
}

#[derive(Debug, Clone)]
pub(super) struct Bind {
    /// `:deadline` (statement mode) or `column deadline` (table mode), for messages.
    pub(super) label: Arc<str>,
    /// Table mode: the column.
    pub(super) column: Option<String>,
    pub(super) value: Value,
}

impl Shared {
    /// The statements for one event's output. Pure, apart from evaluating `delete_when`.
    pub(super) fn plan(&self, output: &Value) -> Result<Vec<Op>, SinkError> {
        let shared = self;
        let mut ops = Vec::new();
        for (index, record) in records(output) {
            let Some(object) = record.as_object() else {
                return Err(SinkError::Permanent(not_an_object(index, record)));
            };
            match &shared.mode {
                Mode::Statement {
                    statement,
                    sql,
                    labels,
                } => {
                    let binds = statement
                        .binds
                        .iter()
                        .zip(labels)
                        .map(|(name, label)| match object.get(name) {
                            Some(value) => Ok(Bind {
                                label: label.clone(),
                                column: None,
                                value: value.clone(),
                            }),
                            None => Err(SinkError::Permanent(missing_field(index, name, label))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    ops.push(Op {
                        sql: sql.clone(),
                        binds,
                        table: None,
                        record: index,
                    });
                }
                Mode::Table {
                    table,
                    key,
                    delete_when,
                } => {
                    let columns =
                        table_columns(index, object, key).map_err(SinkError::Permanent)?;
                    let delete = match delete_when {
                        Some(predicate) => deletes(predicate, record, index)?,
                        None => false,
                    };
                    let bind = |column: &str| Bind {
                        label: Arc::from(format!("column {column}")),
                        column: Some(column.to_string()),
                        value: object.get(column).cloned().unwrap_or(Value::Null),
                    };
                    let (sql, binds) = if delete {
                        (
                            statement::delete(shared.dialect, table, key),
                            key.iter().map(|k| bind(k)).collect(),
                        )
                    } else {
                        (
                            statement::upsert(shared.dialect, table, &columns, key),
                            columns.iter().map(|c| bind(c)).collect(),
                        )
                    };
                    ops.push(Op {
                        sql: Arc::from(sql),
                        binds,
                        table: Some(table.clone()),
                        record: index,
                    });
                }
            }
        }
        Ok(ops)
    }
}

/// True when `delete_when` holds for the record.
fn deletes(
    predicate: &Expression,
    record: &Value,
    index: Option<usize>,
) -> Result<bool, SinkError> {
    match predicate.evaluate(record, &Map::new(), &Limits::default()) {
        Ok(Some(Value::Bool(b))) => Ok(b),
        Ok(None) | Ok(Some(Value::Null)) => Ok(false),
        Ok(Some(other)) => Err(SinkError::Permanent(format!(
            "delete_when returned {} for {}: it must return true or false",
            value::kind(&other),
            record_name(index)
        ))),
        Err(e) => Err(SinkError::Permanent(format!(
            "delete_when failed on {}: {}",
            record_name(index),
            e.render("delete_when", predicate.source())
        ))),
    }
}
