//! The documentation and the repository: what README.md and docs/ tell an operator to do works
//! from a fresh checkout, with nothing from outside the repository.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every file under `dir` (relative to the repository) whose name ends with one of `exts`
/// (every file when `exts` is empty).
fn files(dir: &str, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![Path::new(ROOT).join(dir)];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if exts.is_empty()
                || exts
                    .iter()
                    .any(|e| path.to_string_lossy().ends_with(&format!(".{e}")))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The relative link targets of a markdown text: `[text](target)`, without `#fragment`.
fn relative_links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = markdown;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or_default().trim();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            out.push(target.to_owned());
        }
    }
    out
}

#[test]
fn tests_and_docs_use_nothing_outside_the_repository() {
    let root = Path::new(ROOT).canonicalize().unwrap();
    let mut problems = Vec::new();

    // The data the tests, benchmarks and scripts read is in the repository.
    let outside = format!("../{}", "shared");
    for dir in ["tests/it", "benches", "scripts"] {
        for file in files(dir, &[]) {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if text.contains(&outside) {
                problems.push(format!("{} reads {outside}", file.display()));
            }
        }
    }

    // Every relative link of the documentation leads to a file in the repository.
    let mut docs: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    docs.extend(files("docs", &["md"]));
    docs.extend(files("adapters", &["md"]));
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for link in relative_links(&text) {
            let target = doc.parent().unwrap().join(&link);
            match target.canonicalize() {
                Ok(path) if path.starts_with(&root) => {}
                Ok(path) => problems.push(format!(
                    "{} links {link}, outside the repository ({})",
                    doc.display(),
                    path.display()
                )),
                Err(e) => problems.push(format!("{} links {link}: {e}", doc.display())),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The test data the tests read.
    for data in [
        "tests/data/standard-webhooks-vectors.json",
        "tests/data/jsonata-test-suite/groups",
        "docs/protocol.md",
    ] {
        assert!(root.join(data).exists(), "{data} is missing");
    }
}
