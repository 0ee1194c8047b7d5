//! SQL text: named parameters in configured statements, identifiers, and the statements the sink
//! generates (upserts, deletes, the ledger).
//!
//! Values never become SQL text. A configured statement's `:name` parameters are rewritten into
//! the database's placeholders (`$1`, `?`, `?1`) and the values are bound. Identifiers that come
//! from the configuration or from output field names (table mode) must be plain identifiers
//! (`[A-Za-z_][A-Za-z0-9_]*`) and are quoted as well, so that neither a payload value nor a
//! field name can change what a statement does.

use std::fmt::Write as _;

/// The database family, which decides placeholder and quoting syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    /// The name shown in messages.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::MySql => "MariaDB/MySQL",
            Dialect::Sqlite => "SQLite",
        }
    }

    /// Quotes a plain identifier (checked by [`check_identifier`]).
    pub fn quote(self, ident: &str) -> String {
        match self {
            Dialect::MySql => format!("`{ident}`"),
            Dialect::Postgres | Dialect::Sqlite => format!("\"{ident}\""),
        }
    }

    /// The placeholder of the `n`-th (1-based) bound value.
    fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::MySql => "?".into(),
            Dialect::Sqlite => format!("?{n}"),
        }
    }
}

/// Longest identifier accepted (PostgreSQL truncates at 63 bytes, MySQL refuses more than 64).
const MAX_IDENTIFIER: usize = 63;

/// Checks that `ident` is a plain identifier: a letter or `_`, then letters, digits or `_`.
pub fn check_identifier(ident: &str) -> Result<(), String> {
    let mut chars = ident.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{ident:?} is not a plain identifier: use letters, digits and _, starting with a \
             letter or _"
        ));
    }
    if ident.len() > MAX_IDENTIFIER {
        return Err(format!(
            "{ident:?} is longer than {MAX_IDENTIFIER} characters"
        ));
    }
    Ok(())
}

/// A table name, optionally qualified by a schema (PostgreSQL), database (MySQL) or attached
/// database (SQLite): `rules` or `calendar.rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    /// Parses and checks `text`.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = text.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => (None, *name),
            [schema, name] => (Some(*schema), *name),
            _ => {
                return Err(format!(
                    "{text:?} is not a table name: write it like \"rules\" or \"calendar.rules\""
                ));
            }
        };
        if let Some(schema) = schema {
            check_identifier(schema)?;
        }
        check_identifier(name)?;
        Ok(TableName {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The quoted, possibly qualified, name.
    pub fn quoted(&self, dialect: Dialect) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", dialect.quote(schema), dialect.quote(&self.name)),
            None => dialect.quote(&self.name),
        }
    }

    /// The name as configured, for messages.
    pub fn shown(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// A configured statement with its named parameters rewritten into placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The statement in the database's placeholder syntax.
    pub sql: String,
    /// The parameter bound to each placeholder, in placeholder order. With `?` placeholders
    /// (MariaDB/MySQL) a parameter used twice appears twice.
    pub binds: Vec<String>,
    /// Every parameter name once, in order of first use.
    pub names: Vec<String>,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Parses a statement with `:name` parameters for `dialect`.
///
/// Parameters are recognised outside string literals, quoted identifiers and comments. `::`
/// (a PostgreSQL cast) is not a parameter, so `:deadline::timestamptz` binds `deadline` and
/// casts it. Positional placeholders are refused: every value must be bound by name.
pub fn parse_statement(text: &str, dialect: Dialect) -> Result<Statement, String> {
    let bytes = text.as_bytes();
    let mut sql = String::with_capacity(text.len() + 16);
    let mut binds = Vec::new();
    let mut names: Vec<String> = Vec::new();
    // Start of the text not yet copied to `sql`.
    let mut copied = 0;
    let mut i = 0;
    let unterminated = |what: &str, at: usize| {
        format!("the statement has an unterminated {what} starting at byte {at}")
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\'' => {
                // PostgreSQL E'...' strings and MySQL strings treat backslash as an escape.
                let backslash = dialect == Dialect::MySql
                    || (dialect == Dialect::Postgres
                        && i > 0
                        && matches!(bytes[i - 1], b'E' | b'e')
                        && (i < 2 || !is_ident_char(bytes[i - 2])));
                i = skip_quoted(bytes, i, b'\'', backslash)
                    .ok_or_else(|| unterminated("string literal", i))?;
            }
            b'"' => {
                i = skip_quoted(bytes, i, b'"', dialect == Dialect::MySql)
                    .ok_or_else(|| unterminated("quoted identifier", i))?;
            }
            b'`' if dialect != Dialect::Postgres => {
                i = skip_quoted(bytes, i, b'`', false)
                    .ok_or_else(|| unterminated("quoted identifier", i))?;
            }
            b'[' if dialect == Dialect::Sqlite => {
                i = bytes[i..]
                    .iter()
                    .position(|&b| b == b']')
                    .map(|p| i + p + 1)
                    .ok_or_else(|| unterminated("quoted identifier", i))?;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = line_end(bytes, i);
            }
            b'#' if dialect == Dialect::MySql => {
                i = line_end(bytes, i);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = skip_block_comment(bytes, i, dialect == Dialect::Postgres)
                    .ok_or_else(|| unterminated("comment", i))?;
            }
            b'$' if dialect == Dialect::Postgres => {
                if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return Err(format!(
                        "the statement uses the positional parameter at byte {i}: name every \
                         parameter after an output field, e.g. :deadline"
                    ));
                }
                match dollar_tag(bytes, i) {
                    Some(tag) => {
                        let body = i + tag.len();
                        let end = find(bytes, body, tag)
                            .ok_or_else(|| unterminated("dollar-quoted string", i))?;
                        i = end + tag.len();
                    }
                    None => i += 1,
                }
            }
            b'?' if dialect != Dialect::Postgres => {
                return Err(format!(
                    "the statement uses a positional ? placeholder at byte {i}: name every \
                     parameter after an output field, e.g. :deadline"
                ));
            }
            b':' => {
                if bytes.get(i + 1) == Some(&b':') {
                    i += 2;
                } else if bytes.get(i + 1).copied().is_some_and(is_ident_start)
                    && (i == 0 || !is_ident_char(bytes[i - 1]))
                {
                    let start = i + 1;
                    let mut end = start;
                    while end < bytes.len() && is_ident_char(bytes[end]) {
                        end += 1;
                    }
                    let name = &text[start..end];
                    sql.push_str(&text[copied..i]);
                    let position = match names.iter().position(|n| n == name) {
                        Some(p) => p,
                        None => {
                            names.push(name.to_string());
                            names.len() - 1
                        }
                    };
                    match dialect {
                        Dialect::MySql => {
                            binds.push(name.to_string());
                            sql.push_str(&dialect.placeholder(binds.len()));
                        }
                        Dialect::Postgres | Dialect::Sqlite => {
                            sql.push_str(&dialect.placeholder(position + 1));
                        }
                    }
                    copied = end;
                    i = end;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    sql.push_str(&text[copied..]);
    if sql.trim().is_empty() {
        return Err("the statement is empty".into());
    }
    if dialect != Dialect::MySql {
        binds = names.clone();
    }
    Ok(Statement { sql, binds, names })
}

/// The index just past the closing quote of the literal opening at `start`. A doubled quote
/// stands for itself; with `backslash`, a backslash escapes the next byte.
fn skip_quoted(bytes: &[u8], start: usize, quote: u8, backslash: bool) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        let c = bytes[i];
        if backslash && c == b'\\' {
            i += 2;
        } else if c == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
    None
}

fn line_end(bytes: &[u8], start: usize) -> usize {
    bytes[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |p| start + p + 1)
}

/// The index just past the end of the block comment opening at `start`; PostgreSQL nests them.
fn skip_block_comment(bytes: &[u8], start: usize, nested: bool) -> Option<usize> {
    let mut depth = 1;
    let mut i = start + 2;
    while i + 1 < bytes.len() {
        if bytes[i] == b'*' && bytes[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else if nested && bytes[i] == b'/' && bytes[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

/// The dollar-quote tag (`$$` or `$tag$`) opening at `start`, if one does.
fn dollar_tag(bytes: &[u8], start: usize) -> Option<&[u8]> {
    let mut end = start + 1;
    while end < bytes.len() && is_ident_char(bytes[end]) {
        end += 1;
    }
    (bytes.get(end) == Some(&b'$')).then(|| &bytes[start..=end])
}

fn find(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

/// `INSERT … ON CONFLICT … DO UPDATE` (PostgreSQL, SQLite) or `INSERT … ON DUPLICATE KEY
/// UPDATE` (MariaDB/MySQL) of `columns`, with `key` as the conflict target. Every name has been
/// checked with [`check_identifier`].
pub fn upsert(dialect: Dialect, table: &TableName, columns: &[&str], key: &[String]) -> String {
    let mut sql = format!("INSERT INTO {} (", table.quoted(dialect));
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&dialect.quote(column));
    }
    sql.push_str(") VALUES (");
    for i in 0..columns.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&dialect.placeholder(i + 1));
    }
    sql.push(')');
    let updated: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| !key.iter().any(|k| k == c))
        .collect();
    match dialect {
        Dialect::Postgres | Dialect::Sqlite => {
            let target: Vec<String> = key.iter().map(|k| dialect.quote(k)).collect();
            let _ = write!(sql, " ON CONFLICT ({})", target.join(", "));
            if updated.is_empty() {
                sql.push_str(" DO NOTHING");
            } else {
                let excluded = if dialect == Dialect::Postgres {
                    "EXCLUDED"
                } else {
                    "excluded"
                };
                let sets: Vec<String> = updated
                    .iter()
                    .map(|c| format!("{q} = {excluded}.{q}", q = dialect.quote(c)))
                    .collect();
                let _ = write!(sql, " DO UPDATE SET {}", sets.join(", "));
            }
        }
        Dialect::MySql => {
            // With nothing but key columns there is nothing to update; assigning a key column to
            // itself turns the duplicate into a no-op instead of an error.
            let sets: Vec<String> = if updated.is_empty() {
                let q = dialect.quote(&key[0]);
                vec![format!("{q} = {q}")]
            } else {
                updated
                    .iter()
                    .map(|c| format!("{q} = VALUES({q})", q = dialect.quote(c)))
                    .collect()
            };
            let _ = write!(sql, " ON DUPLICATE KEY UPDATE {}", sets.join(", "));
        }
    }
    sql
}

/// `DELETE FROM table WHERE k1 = … AND k2 = …`.
pub fn delete(dialect: Dialect, table: &TableName, key: &[String]) -> String {
    let conditions: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = {}", dialect.quote(k), dialect.placeholder(i + 1)))
        .collect();
    format!(
        "DELETE FROM {} WHERE {}",
        table.quoted(dialect),
        conditions.join(" AND ")
    )
}

/// The statements that keep the ledger: the record of applied (event id, route) pairs.
#[derive(Debug, Clone)]
pub struct LedgerSql {
    /// Creates the ledger when it does not exist.
    pub create: String,
    /// Reads nothing, but fails when the ledger does not exist (or cannot be read).
    pub probe: String,
}

/// Longest event id (PROTOCOL.md §1.1) and route name the ledger holds.
pub const LEDGER_ID_CHARS: usize = 200;

impl LedgerSql {
    pub fn new(dialect: Dialect, table: &TableName) -> LedgerSql {
        let t = table.quoted(dialect);
        let create = match dialect {
            Dialect::Postgres => format!(
                "CREATE TABLE IF NOT EXISTS {t} (event_id varchar({n}) NOT NULL, route \
                 varchar({n}) NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY \
                 KEY (event_id, route))",
                n = LEDGER_ID_CHARS
            ),
            // Event ids are printable ASCII; the binary collation compares them exactly.
            Dialect::MySql => format!(
                "CREATE TABLE IF NOT EXISTS {t} (event_id varchar({n}) CHARACTER SET ascii \
                 COLLATE ascii_bin NOT NULL, route varchar({n}) CHARACTER SET utf8mb4 COLLATE \
                 utf8mb4_bin NOT NULL, applied_at datetime(6) NOT NULL DEFAULT \
                 CURRENT_TIMESTAMP(6), PRIMARY KEY (event_id, route)) ENGINE=InnoDB",
                n = LEDGER_ID_CHARS
            ),
            Dialect::Sqlite => format!(
                "CREATE TABLE IF NOT EXISTS {t} (event_id TEXT NOT NULL, route TEXT NOT NULL, \
                 applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (event_id, \
                 route)) WITHOUT ROWID"
            ),
        };
        LedgerSql {
            create,
            probe: format!("SELECT event_id, route FROM {t} WHERE 1 = 0"),
        }
    }
}

/// `SELECT event_id, route FROM ledger WHERE event_id IN (…)` for `n` ids (MariaDB/MySQL).
pub fn ledger_select(dialect: Dialect, table: &TableName, n: usize) -> String {
    let list: Vec<String> = (1..=n).map(|i| dialect.placeholder(i)).collect();
    format!(
        "SELECT event_id, route FROM {} WHERE event_id IN ({})",
        table.quoted(dialect),
        list.join(", ")
    )
}

/// `INSERT INTO ledger (event_id, route) VALUES (…), (…)` for `n` rows (MariaDB/MySQL).
pub fn ledger_insert(dialect: Dialect, table: &TableName, n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "({}, {})",
                dialect.placeholder(2 * i + 1),
                dialect.placeholder(2 * i + 2)
            )
        })
        .collect();
    format!(
        "INSERT INTO {} (event_id, route) VALUES {}",
        table.quoted(dialect),
        rows.join(", ")
    )
}

/// PostgreSQL: records every (event id, route) pair not yet in the ledger, in one statement, and
/// returns the pairs it recorded. A pair that is missing from the result was applied before.
pub fn pg_ledger_claim(table: &TableName) -> String {
    format!(
        "INSERT INTO {} (event_id, route) SELECT * FROM UNNEST($1::text[], $2::text[]) ON \
         CONFLICT DO NOTHING RETURNING event_id, route",
        table.quoted(Dialect::Postgres)
    )
}

/// SQLite: records one (event id, route) pair unless it is there; a change count of 0 means it
/// was applied before.
pub fn sqlite_ledger_claim(table: &TableName) -> String {
    format!(
        "INSERT INTO {} (event_id, route) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        table.quoted(Dialect::Sqlite)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(text: &str) -> Statement {
        parse_statement(text, Dialect::Postgres).unwrap()
    }

    #[test]
    fn named_parameters_become_placeholders_per_dialect() {
        let text = "INSERT INTO rules (court_id, deadline) VALUES (:court_id, :deadline) ON \
                    CONFLICT (court_id) DO UPDATE SET deadline = :deadline";
        let s = pg(text);
        assert_eq!(
            s.sql,
            "INSERT INTO rules (court_id, deadline) VALUES ($1, $2) ON CONFLICT (court_id) DO \
             UPDATE SET deadline = $2"
        );
        assert_eq!(s.binds, ["court_id", "deadline"]);
        assert_eq!(s.names, ["court_id", "deadline"]);

        let s = parse_statement(text, Dialect::MySql).unwrap();
        assert!(s.sql.contains("VALUES (?, ?)") && s.sql.ends_with("deadline = ?"));
        assert_eq!(s.binds, ["court_id", "deadline", "deadline"]);
        assert_eq!(s.names, ["court_id", "deadline"]);

        let s = parse_statement(text, Dialect::Sqlite).unwrap();
        assert!(s.sql.contains("VALUES (?1, ?2)") && s.sql.ends_with("deadline = ?2"));
        assert_eq!(s.binds, ["court_id", "deadline"]);
    }

    #[test]
    fn literals_comments_and_casts_are_not_parameters() {
        let s = pg(
            "SELECT ':a', \":b\", E'\\':c', $$ :d $$, $t$ :e $t$ -- :f\n\
                    /* :g /* :h */ */ :x::date, 1::int, a[1:2] FROM t WHERE y = :y",
        );
        assert_eq!(s.names, ["x", "y"]);
        assert!(
            s.sql.contains("$1::date") && s.sql.ends_with("y = $2"),
            "{}",
            s.sql
        );
        assert!(s.sql.contains("':a'") && s.sql.contains("a[1:2]"));

        let s = parse_statement(
            "SELECT 'it''s :a', 'x\\' :b', `:c` # :d\n FROM t WHERE x = :x",
            Dialect::MySql,
        )
        .unwrap();
        assert_eq!(s.names, ["x"]);
        let s = parse_statement("SELECT [:a], ':b' FROM t WHERE x = :x", Dialect::Sqlite).unwrap();
        assert_eq!(s.names, ["x"]);
    }

    #[test]
    fn broken_statements_are_refused_with_the_reason() {
        let e = parse_statement("SELECT 'abc", Dialect::Postgres).unwrap_err();
        assert!(e.contains("unterminated string literal"), "{e}");
        let e = parse_statement("SELECT /* x", Dialect::Postgres).unwrap_err();
        assert!(e.contains("unterminated comment"), "{e}");
        let e = parse_statement("SELECT $$ x", Dialect::Postgres).unwrap_err();
        assert!(e.contains("dollar-quoted"), "{e}");
        let e = parse_statement("INSERT INTO t VALUES ($1)", Dialect::Postgres).unwrap_err();
        assert!(e.contains("positional"), "{e}");
        let e = parse_statement("INSERT INTO t VALUES (?)", Dialect::MySql).unwrap_err();
        assert!(e.contains("positional ?"), "{e}");
        let e = parse_statement("  ", Dialect::Sqlite).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        // PostgreSQL's ? is the jsonb key-exists operator, not a placeholder.
        assert_eq!(pg("SELECT data ? 'k' FROM t WHERE id = :id").names, ["id"]);
    }

    #[test]
    fn identifiers_are_checked_and_quoted() {
        for ok in ["rules", "_x", "Court_ID2"] {
            check_identifier(ok).unwrap();
        }
        for bad in [
            "",
            "1x",
            "a b",
            "a\"b",
            "x`; DROP TABLE t; --",
            "é",
            &"a".repeat(64),
        ] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
        let t = TableName::parse("calendar.rules").unwrap();
        assert_eq!(t.quoted(Dialect::Postgres), "\"calendar\".\"rules\"");
        assert_eq!(t.quoted(Dialect::MySql), "`calendar`.`rules`");
        assert_eq!(t.shown(), "calendar.rules");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("a;b").is_err());
    }

    #[test]
    fn upserts_and_deletes_per_dialect() {
        let t = TableName::parse("rules").unwrap();
        let key = vec!["court_id".to_string()];
        assert_eq!(
            upsert(Dialect::Postgres, &t, &["court_id", "deadline"], &key),
            "INSERT INTO \"rules\" (\"court_id\", \"deadline\") VALUES ($1, $2) ON CONFLICT \
             (\"court_id\") DO UPDATE SET \"deadline\" = EXCLUDED.\"deadline\""
        );
        assert_eq!(
            upsert(Dialect::MySql, &t, &["court_id", "deadline"], &key),
            "INSERT INTO `rules` (`court_id`, `deadline`) VALUES (?, ?) ON DUPLICATE KEY UPDATE \
             `deadline` = VALUES(`deadline`)"
        );
        assert_eq!(
            upsert(Dialect::Sqlite, &t, &["court_id", "deadline"], &key),
            "INSERT INTO \"rules\" (\"court_id\", \"deadline\") VALUES (?1, ?2) ON CONFLICT \
             (\"court_id\") DO UPDATE SET \"deadline\" = excluded.\"deadline\""
        );
        assert!(upsert(Dialect::Postgres, &t, &["court_id"], &key).ends_with("DO NOTHING"));
        assert!(
            upsert(Dialect::MySql, &t, &["court_id"], &key)
                .ends_with("UPDATE `court_id` = `court_id`")
        );
        let key2 = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            delete(Dialect::Postgres, &t, &key2),
            "DELETE FROM \"rules\" WHERE \"a\" = $1 AND \"b\" = $2"
        );
        assert_eq!(
            delete(Dialect::MySql, &t, &key2),
            "DELETE FROM `rules` WHERE `a` = ? AND `b` = ?"
        );
    }

    #[test]
    fn ledger_statements() {
        let t = TableName::parse("ess_applied").unwrap();
        assert_eq!(
            ledger_select(Dialect::MySql, &t, 2),
            "SELECT event_id, route FROM `ess_applied` WHERE event_id IN (?, ?)"
        );
        assert_eq!(
            ledger_insert(Dialect::MySql, &t, 2),
            "INSERT INTO `ess_applied` (event_id, route) VALUES (?, ?), (?, ?)"
        );
        assert!(
            LedgerSql::new(Dialect::Postgres, &t)
                .create
                .contains("PRIMARY KEY")
        );
    }
}
