//! Data flows one way through the modules (ARCHITECTURE.md, "Invariants"): the leaf modules use
//! nothing else in the crate, the configuration layer uses no module that runs, and ingress does
//! not use the dispatcher. This reads every `crate::` path in the source files and fails, naming
//! the file and the module, when one of them breaks a rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Top-level modules that run: the configuration layer must not use them.
const RUNTIME: &[&str] = &[
    "adapter",
    "admin",
    "agent",
    "cli",
    "dispatch",
    "http_client",
    "ingress",
    "journal",
    "reload",
    "report",
    "shutdown",
    "telemetry",
];

/// The crate modules a file uses: the first segment after every `crate::`, including each
/// member of a `crate::{...}` group, and the second one as `first::second`. Comments are skipped.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // A group: its members up to the matching brace, each a path of its own.
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let mut depth = 0;
            let mut member = String::new();
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(path_head(member.trim()));
                        member.clear();
                        continue;
                    }
                    _ => {}
                }
                member.push(c);
            }
        } else {
            found.insert(path_head(rest));
        }
    }
    found.remove("");
    found
}

/// `a::b...` as `a::b`, or `a` alone.
fn path_head(path: &str) -> String {
    let segment = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let first = segment(path);
    match path[first.len()..].strip_prefix("::") {
        Some(rest) if !segment(rest).is_empty() => format!("{first}::{}", segment(rest)),
        _ => first,
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every `(file, module)` pair where `file` uses a crate module `allowed` refuses.
fn violations(files: &[PathBuf], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for path in crate_paths(&text) {
            if !allowed(&path) {
                let shown = file.strip_prefix(ROOT).unwrap_or(file);
                found.push(format!("{} uses crate::{path}", shown.display()));
            }
        }
    }
    found
}

fn top(path: &str) -> &str {
    path.split("::").next().unwrap_or(path)
}

fn src(path: &str) -> PathBuf {
    Path::new(ROOT).join("src").join(path)
}

fn assert_none(rule: &str, found: Vec<String>) {
    assert!(
        found.is_empty(),
        "{rule}, but:\n  {}\nmove the shared type into a leaf module (src/settings, \
         src/protocol) or hand it in through a trait (ARCHITECTURE.md, \"Invariants\")",
        found.join("\n  ")
    );
}

#[test]
fn the_leaf_modules_use_nothing_else_in_the_crate() {
    for leaf in ["settings", "protocol"] {
        let files = rust_files(&src(leaf));
        assert!(!files.is_empty(), "src/{leaf} has no files");
        assert_none(
            &format!("src/{leaf} may use only itself"),
            violations(&files, |path| top(path) == leaf),
        );
    }
}

#[test]
fn the_configuration_layer_uses_no_module_that_runs() {
    // The top-level schema composes the sinks' config types through the registry's enum.
    assert_none(
        "src/config.rs may use only settings, protocol and sink::SinkConfig",
        violations(&[src("config.rs")], |path| {
            matches!(top(path), "settings" | "protocol") || path == "sink::SinkConfig"
        }),
    );
    // Each sink's own config: the leaf modules and the sink layer; the SQL sink compiles its
    // `delete_when` predicate with the JSONata engine (pure) to check it.
    let sink_configs: Vec<_> = rust_files(&src("sink"))
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "config.rs"))
        .collect();
    assert!(sink_configs.len() >= 5, "{sink_configs:?}");
    assert_none(
        "a sink's config.rs may use only settings, protocol, sink and adapter::engine",
        violations(&sink_configs, |path| {
            matches!(top(path), "settings" | "protocol" | "sink") || path == "adapter::engine"
        }),
    );
    for file in ["config.rs", "settings", "protocol"] {
        let files = if file.ends_with(".rs") {
            vec![src(file)]
        } else {
            rust_files(&src(file))
        };
        assert_none(
            &format!("src/{file} uses no runtime module"),
            violations(&files, |path| !RUNTIME.contains(&top(path))),
        );
    }
}

#[test]
fn ingress_does_not_use_the_dispatcher() {
    assert_none(
        "src/ingress reaches the dispatcher only through its Applier trait",
        violations(&rust_files(&src("ingress")), |path| top(path) != "dispatch"),
    );
}

#[test]
fn outgoing_clients_and_reports_use_the_leaf_modules_not_ingress() {
    let files = [
        src("http_client.rs"),
        src("report.rs"),
        src("adapter/fixtures.rs"),
    ];
    assert_none(
        "http_client, report and the adapter fixtures do not use ingress or the sinks",
        violations(&files, |path| !matches!(top(path), "ingress" | "sink")),
    );
}

#[test]
fn only_the_journal_and_the_sqlite_sink_speak_sqlite() {
    // The journal is spoken to in its own operations, so that another store can take its
    // place; the SQL sink's SQLite backend is a partner's database, not the journal.
    let found: Vec<String> = rust_files(&src(""))
        .into_iter()
        .filter(|file| !file.starts_with(src("journal")) && !file.starts_with(src("sink/sql")))
        .filter(|file| {
            std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .any(|line| !line.trim_start().starts_with("//") && line.contains("rusqlite"))
        })
        .map(|file| {
            let shown = file
                .strip_prefix(ROOT)
                .unwrap_or(&file)
                .display()
                .to_string();
            format!("{shown} uses rusqlite")
        })
        .collect();
    assert!(
        found.is_empty(),
        "only src/journal and src/sink/sql may use SQLite, but:\n  {}\ngive the journal an \
         operation for what the caller needs",
        found.join("\n  ")
    );
}

#[test]
fn crate_paths_are_found_in_groups_and_inline() {
    let text = "use crate::settings::{Problem, read_secret};\n\
                use crate::{journal::{self, Outcome}, sink};\n\
                // crate::dispatch in a comment does not count\n\
                let x = crate::ingress::tls::TlsAcceptor::new(c);\n\
                let y = not_crate::x;\n";
    let found: Vec<_> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["ingress::tls", "journal", "settings", "sink"]);
}
