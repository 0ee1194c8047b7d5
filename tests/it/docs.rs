//! The documentation and the repository: what README.md and docs/ tell an operator to do works
//! from a fresh checkout, with nothing from outside the repository.

use std::path::{Path, PathBuf};

use crate::support::process::free_port;

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

/// The ```sh blocks of README.md's "Try it" section, in order.
fn readme_try_it_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let start = readme
        .find("\n## Try it\n")
        .expect("README.md has a \"Try it\" section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        rest = &rest[open + "```sh\n".len()..];
        let close = rest.find("\n```").expect("a closed code block");
        blocks.push(rest[..close].to_owned());
        rest = &rest[close + 4..];
    }
    blocks
}

/// Copies the directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A loopback port nothing listens on now.
/// Runs a README code block with `sh -e` in `dir`, as an operator in a fresh shell at the
/// repository root would; returns its stdout, or fails with what it printed.
fn run_block(dir: &Path, block: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-e", "-c", block])
        .current_dir(dir)
        .env_remove("ESS_AGENT_CONFIG")
        .env_remove("ESS_AGENT_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "this README block failed ({}):\n{block}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn readme_try_it_commands_work_as_written() {
    use std::time::{Duration, Instant};

    use crate::support::{Agent, admin_get, binary};

    assert!(
        !Path::new(ess_agent::config::DEFAULT_CONFIG_PATH).exists(),
        "{} exists: the README's commands would talk to the agent it configures; run this test \
         where no agent is installed",
        ess_agent::config::DEFAULT_CONFIG_PATH
    );
    let blocks = readme_try_it_blocks();
    assert_eq!(blocks.len(), 2, "README's Try it has two ```sh blocks");

    // A fresh copy of what the commands read from the repository, on free ports (the
    // configuration's own 8787 and 8788 may be taken on a machine running tests).
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("repo");
    copy_dir(&Path::new(ROOT).join("config"), &work.join("config"));
    copy_dir(&Path::new(ROOT).join("adapters"), &work.join("adapters"));
    let own_tmp = tmp.path().join("tmp");
    std::fs::create_dir(&own_tmp).unwrap();
    let (ingress, admin) = (free_port(), free_port());
    let config_path = work.join("config/ess-agent.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains("\"127.0.0.1:8787\"") && config.contains("\"127.0.0.1:8788\""));
    let config = config
        .replace("127.0.0.1:8787", &format!("127.0.0.1:{ingress}"))
        .replace("127.0.0.1:8788", &format!("127.0.0.1:{admin}"));
    std::fs::write(&config_path, config).unwrap();
    let agent = Agent::start_config(&config_path, &[]);

    let operator = |block: &str| {
        // The README's /tmp/ paths first: the binary's own path may well be under /tmp.
        block
            .replace("/tmp/", &format!("{}/", own_tmp.display()))
            .replace("cargo run --release --", binary())
            .replace(
                " send ",
                &format!(" send --url http://127.0.0.1:{ingress}/v1/events "),
            )
    };

    // The delivery: `send` prints the answer and the ack.
    let sent = run_block(&work, &operator(&blocks[0]));
    let (status_line, reply) = sent.split_once('\n').unwrap();
    assert_eq!(status_line, "202 Accepted", "{sent}");
    let reply: serde_json::Value = serde_json::from_str(reply).unwrap();
    let id = reply["ack"].as_str().unwrap().to_owned();

    // The records the README says appear.
    let deadline = Instant::now() + Duration::from_secs(20);
    let court = work.join("out/court-calendar/RULE-COURT-DEADLINE");
    let firm = work.join("out/law-firm-calendar");
    let count = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    loop {
        let state = admin_get(&agent, &format!("/v1/events/{id}")).await.body["state"].clone();
        if state == "applied" && count(&court) == 1 && count(&firm) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} is {state}, {} court record(s), {} law firm line(s)",
            count(&court),
            count(&firm)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // status, a dry run, dead letters and adapter eval, each as written.
    let out = run_block(&work, &operator(&blocks[1]).replace("<id>", &id));
    assert!(out.contains(&format!("\"id\": \"{id}\"")), "{out}");
    assert!(out.contains("\"state\": \"applied\""), "{out}");
    assert!(out.contains("\"status\": \"dry_run\""), "{out}");
    assert!(out.contains("\"items\": [],\n  \"total\": 0"), "{out}");
    assert!(out.contains("\"record_type\": \"COURT_RULE\""), "{out}");
    assert!(out.contains("\"updated_by\": \"dev-partner\""), "{out}");
    // The dry run applied nothing.
    assert_eq!((count(&court), count(&firm)), (1, 1));
}

/// The keys a configuration table accepts, as serde lists them when it refuses an unknown one.
fn accepted_keys(table: &str) -> Vec<String> {
    let probe = "not_a_key_of_any_table = 1\n";
    let text = match table {
        "" => format!("agent_id = \"a\"\n{probe}"),
        "routes" => format!("agent_id = \"a\"\n[[routes]]\n{probe}"),
        _ => format!("agent_id = \"a\"\n[{table}]\n{probe}"),
    };
    let error = toml::from_str::<ess_agent::config::Config>(&text)
        .expect_err("an unknown key is refused")
        .to_string();
    let list = error
        .split_once("expected one of ")
        .or_else(|| error.split_once("expected "))
        .unwrap_or_else(|| panic!("[{table}]: no list of keys in {error:?}"))
        .1;
    // "`a`", "`a` or `b`", "`a`, `b`, `c`": the names are the quoted parts of the first line.
    let list = list.lines().next().unwrap_or_default();
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_configuration_key_is_in_the_configuration_reference() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/configuration.md")).unwrap();
    // The first cells of the reference's tables: the keys each row is about.
    let rows: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix('|')?.split('|').next())
        .collect();
    let tables = [
        "", "ingress", "auth", "limits", "admin", "routes", "report", "dispatch", "journal",
        "shutdown", "log",
    ];
    let mut missing = Vec::new();
    for table in tables {
        let keys = accepted_keys(table);
        assert!(!keys.is_empty(), "[{table}] lists no keys");
        // Top-level tables have sections of their own.
        for key in keys
            .iter()
            .filter(|k| !tables.contains(&k.as_str()) && *k != "sinks")
        {
            let documented = rows.iter().any(|cell| {
                cell.contains(&format!("`{key}`")) || cell.contains(&format!("`{table}.{key}`"))
            });
            if !documented {
                missing.push(format!("[{table}] {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys without a row in docs/configuration.md: {}",
        missing.join(", ")
    );
}
