use super::config::{dialect_of, sqlite_path};
use super::error::{classify_my, classify_pg};
use super::*;
use crate::settings::SecretSource;
use crate::sink::SinkSpec;
use serde_json::json;
use std::path::Path;

fn config(text: &str) -> SqlConfig {
    toml::from_str(text).unwrap()
}

fn keys(c: &SqlConfig) -> Vec<String> {
    let mut keys: Vec<String> = c.validate("sinks.db").into_iter().map(|p| p.key).collect();
    keys.sort();
    keys
}

const STATEMENT: &str = r#"
url = "postgres://ess@db.example:5432/rules"
statement = "INSERT INTO rules (court_id, deadline) VALUES (:court_id, :deadline)"
"#;

#[test]
fn config_parses_with_defaults_and_refuses_unknown_keys() {
    let c = config(STATEMENT);
    assert_eq!(c.ledger_table, "ess_applied");
    assert!(c.create_ledger);
    assert_eq!(c.max_batch, 64);
    assert_eq!(c.max_linger_ms, 5);
    assert_eq!(c.max_connections, 4);
    assert_eq!(c.connect_timeout_ms, 10_000);
    assert_eq!(c.statement_timeout_ms, 30_000);
    assert!(!c.healthcheck);
    assert_eq!(c.tls, None);
    assert!(c.validate("sinks.db").is_empty());
    let e = toml::from_str::<SqlConfig>(&format!("{STATEMENT}\nbatch = 3\n")).unwrap_err();
    assert!(e.to_string().contains("unknown field"), "{e}");
    let e = toml::from_str::<SqlConfig>(&format!("{STATEMENT}\ntls = \"always\"\n")).unwrap_err();
    assert!(e.to_string().contains("unknown variant"), "{e}");
}

#[test]
fn validate_names_every_problem_by_key() {
    let c = config(
        r#"
url = "postgres://ess:hunter2@db.example/rules"
url_secret = { env = "DB_URL" }
password = {}
statement = "INSERT INTO t VALUES (:a, 'open"
table = "rules"
key = ["a b"]
delete_when = "deleted ="
ledger_table = "x;y"
max_batch = 0
max_connections = 0
connect_timeout_ms = 0
statement_timeout_ms = 0
"#,
    );
    assert_eq!(
        keys(&c),
        [
            "sinks.db.connect_timeout_ms",
            "sinks.db.ledger_table",
            "sinks.db.max_batch",
            "sinks.db.max_connections",
            "sinks.db.password",
            "sinks.db.statement",
            "sinks.db.statement_timeout_ms",
            "sinks.db.url",
        ]
    );
    // One at a time, the checks each field has.
    let with = |extra: &str, base: &str| config(&format!("{base}\n{extra}"));
    let base = "url = \"postgres://ess@db.example/rules\"";
    assert_eq!(keys(&with("", base)), ["sinks.db.statement"]);
    assert_eq!(
        keys(&with("table = \"rules\"", base)),
        ["sinks.db.key"],
        "table needs key"
    );
    assert_eq!(
        keys(&with("table = \"rules\"\nkey = [\"id\", \"id\"]", base)),
        ["sinks.db.key"]
    );
    assert_eq!(
        keys(&with(
            "table = \"rules\"\nkey = [\"id\"]\ndelete_when = \"deleted =\"",
            base
        )),
        ["sinks.db.delete_when"]
    );
    assert_eq!(
        keys(&with(
            "statement = \"DELETE FROM t WHERE id = :id\"\nkey = [\"id\"]\ndelete_when = \"true\"",
            base
        )),
        ["sinks.db.delete_when", "sinks.db.key"]
    );
    assert_eq!(
        keys(&with("statement = \"SELECT 1\"", "url = \"oracle://db/x\"")),
        ["sinks.db.url"]
    );
    assert_eq!(
        keys(&with(
            "statement = \"SELECT 1\"\npassword = { env = \"P\" }\ntls = \"require\"",
            "url = \"sqlite:///var/lib/x.db\""
        )),
        ["sinks.db.password", "sinks.db.tls"]
    );
    assert_eq!(
        keys(&with(
            "statement = \"INSERT INTO t VALUES (?)\"",
            "url = \"mysql://root@db/x\""
        )),
        ["sinks.db.statement"]
    );
    // A password in the URL is refused without being repeated.
    let p = with(
        "statement = \"SELECT 1\"",
        "url = \"mysql://root:hunter2@db/x\"",
    )
    .validate("sinks.db");
    assert_eq!(p.len(), 1);
    assert!(
        p[0].message.contains("carries a password"),
        "{}",
        p[0].message
    );
    assert!(!p[0].message.contains("hunter2"));
    let p = with(
        "statement = \"SELECT 1\"",
        "url = \"postgres://db/x?password=hunter2\"",
    )
    .validate("sinks.db");
    assert!(!p.is_empty() && !p[0].message.contains("hunter2"));
}

#[test]
fn secrets_come_from_files_and_never_show() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("url"),
        "postgres://ess:s3cret@db.example/rules\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("password"), "s3cret-too\n").unwrap();
    let mut c = config(
        "url_secret = { file = \"url\" }\npassword = { file = \"password\" }\n\
         statement = \"SELECT :a\"\n",
    );
    c.resolve_paths(dir.path());
    assert!(c.validate("sinks.db").is_empty());
    // Built outside any runtime and without a connection, as `ess-agent validate` does.
    let sink = SqlSink::new(&c).unwrap();
    let shown = format!("{sink:?}");
    assert!(shown.contains("db.example:5432/rules"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");

    c.password = Some(SecretSource {
        file: Some(dir.path().join("missing")),
        env: None,
        credential: None,
    });
    let e = SqlSink::new(&c).unwrap_err();
    assert!(e.starts_with("password: cannot read secret file"), "{e}");
    std::fs::write(
        dir.path().join("url"),
        "postgres://ess:s3cret@db.example:99999/x",
    )
    .unwrap();
    c.password = None;
    let e = SqlSink::new(&c).unwrap_err();
    assert!(e.starts_with("url_secret: "), "{e}");
    assert!(!e.contains("s3cret"), "{e}");

    let mut c =
        config("url = \"postgres://ess@db/x\"\nstatement = \"SELECT 1\"\nca_file = \"nope.pem\"");
    c.resolve_paths(dir.path());
    let e = SqlSink::new(&c).unwrap_err();
    assert!(e.starts_with("ca_file: cannot read"), "{e}");
}

#[test]
fn sqlite_paths_resolve_against_the_config_directory() {
    let mut c = config("url = \"sqlite:data/rules.db\"\nstatement = \"SELECT 1\"");
    c.resolve_paths(Path::new("/etc/ess"));
    assert_eq!(c.url.as_deref(), Some("sqlite:///etc/ess/data/rules.db"));
    assert_eq!(
        sqlite_path(c.url.as_deref().unwrap()).unwrap(),
        Path::new("/etc/ess/data/rules.db")
    );
    let mut c = config("url = \"sqlite:///var/lib/rules.db\"\nstatement = \"SELECT 1\"");
    c.resolve_paths(Path::new("/etc/ess"));
    assert_eq!(c.url.as_deref(), Some("sqlite:///var/lib/rules.db"));
    assert!(sqlite_path("sqlite:").is_err());
    assert!(sqlite_path("sqlite:x.db?mode=ro").is_err());
    assert_eq!(dialect_of("PostgreSQL://x").unwrap(), Dialect::Postgres);
    assert_eq!(dialect_of("mariadb://x").unwrap(), Dialect::MySql);
}

#[test]
fn outputs_are_checked_against_what_can_be_bound() {
    let c = config(STATEMENT);
    c.check_output(&json!({"court_id": "IL", "deadline": "16:00", "extra": 1}))
        .unwrap();
    c.check_output(&json!([{"court_id": "IL", "deadline": null}]))
        .unwrap();
    let e = c.check_output(&json!({"court_id": "IL"})).unwrap_err();
    assert!(e.contains("\"deadline\"") && e.contains(":deadline"), "{e}");
    let e = c
        .check_output(&json!([{"court_id": "IL", "deadline": "1"}, {"deadline": "2"}]))
        .unwrap_err();
    assert!(e.contains("\"court_id\"") && e.contains("record 1"), "{e}");
    let e = c.check_output(&json!("a;b")).unwrap_err();
    assert!(e.contains("is a string"), "{e}");

    let t = config("url = \"postgres://db/x\"\ntable = \"rules\"\nkey = [\"id\"]");
    t.check_output(&json!({"id": 1, "deadline": "16:00"}))
        .unwrap();
    let e = t.check_output(&json!({"deadline": "16:00"})).unwrap_err();
    assert!(e.contains("\"id\"") && e.contains("key column"), "{e}");
    let e = t.check_output(&json!({"id": null})).unwrap_err();
    assert!(e.contains("is null"), "{e}");
    let e = t
        .check_output(&json!({"id": 1, "bad name": 2}))
        .unwrap_err();
    assert!(e.contains("not a plain identifier"), "{e}");
}

#[test]
fn plans_bind_fields_and_delete_when_turns_a_change_into_a_delete() {
    let c = config(
        "url = \"postgres://db/x\"\ntable = \"rules\"\nkey = [\"id\"]\n\
         delete_when = \"status = 'withdrawn'\"",
    );
    let sink = SqlSink::new(&c).unwrap();
    let ops = sink
        .shared
        .plan(&json!([
            {"id": 1, "status": "active", "deadline": "16:00"},
            {"id": 2, "status": "withdrawn"}
        ]))
        .unwrap();
    assert_eq!(ops.len(), 2);
    assert!(
        ops[0].sql.starts_with("INSERT INTO \"rules\""),
        "{}",
        ops[0].sql
    );
    assert_eq!(
        ops[0]
            .binds
            .iter()
            .map(|b| b.value.clone())
            .collect::<Vec<_>>(),
        [json!(1), json!("active"), json!("16:00")]
    );
    assert_eq!(&*ops[1].sql, "DELETE FROM \"rules\" WHERE \"id\" = $1");
    assert_eq!(ops[1].binds.len(), 1);
    assert_eq!(ops[1].record, Some(1));

    let c = config(
        "url = \"postgres://db/x\"\ntable = \"rules\"\nkey = [\"id\"]\ndelete_when = \"status\"",
    );
    let e = SqlSink::new(&c)
        .unwrap()
        .shared
        .plan(&json!({"id": 1, "status": "x"}))
        .unwrap_err();
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("must return true or false"), "{e}");

    let sink = SqlSink::new(&config(STATEMENT)).unwrap();
    let e = sink.shared.plan(&json!({"court_id": "IL"})).unwrap_err();
    assert!(!e.is_retryable());
    assert!(
        e.to_string()
            .contains("field \"deadline\" (bound to :deadline)"),
        "{e}"
    );
    let ops = sink.shared.plan(&json!([])).unwrap();
    assert!(ops.is_empty());
}

#[test]
fn errors_are_classified_by_code() {
    // (retryable, whole transaction)
    assert_eq!(classify_pg("23505"), (false, false)); // unique violation
    assert_eq!(classify_pg("23514"), (false, false)); // check violation
    assert_eq!(classify_pg("22P02"), (false, false)); // invalid text representation
    assert_eq!(classify_pg("42601"), (false, false)); // syntax error
    assert_eq!(classify_pg("42501"), (false, false)); // insufficient privilege
    assert_eq!(classify_pg("28P01"), (false, false)); // invalid password
    assert_eq!(classify_pg("40001"), (true, true)); // serialization failure
    assert_eq!(classify_pg("40P01"), (true, true)); // deadlock
    assert_eq!(classify_pg("08006"), (true, true)); // connection failure
    assert_eq!(classify_pg("57P01"), (true, true)); // admin shutdown
    assert_eq!(classify_pg("53300"), (true, true)); // too many connections
    assert_eq!(classify_pg("57014"), (true, false)); // statement timeout
    assert_eq!(classify_pg("55P03"), (true, false)); // lock not available
    assert_eq!(classify_my(1062, Some("23000")), (false, false)); // duplicate key
    assert_eq!(classify_my(4025, Some("23000")), (false, false)); // check constraint
    assert_eq!(classify_my(1064, Some("42000")), (false, false)); // syntax
    assert_eq!(classify_my(1146, Some("42S02")), (false, false)); // no such table
    assert_eq!(classify_my(1142, Some("42000")), (false, false)); // command denied
    assert_eq!(classify_my(1292, Some("22007")), (false, false)); // bad datetime
    assert_eq!(classify_my(1364, Some("HY000")), (false, false)); // no default
    assert_eq!(classify_my(1213, Some("40001")), (true, true)); // deadlock
    assert_eq!(classify_my(1205, Some("HY000")), (true, false)); // lock wait timeout
    assert_eq!(classify_my(1969, Some("70100")), (true, false)); // statement time
    assert_eq!(classify_my(1040, Some("08004")), (true, true)); // too many connections
    assert_eq!(classify_my(9999, Some("08S01")), (true, true)); // communication
}
