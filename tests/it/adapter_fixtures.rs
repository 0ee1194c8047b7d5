//! Every adapter shipped in `adapters/` passes every one of its fixtures, and has at least one.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use ess_agent::adapter::engine::Limits;
use ess_agent::adapter::fixtures::{discover, run_adapter_fixtures};

const ADAPTERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/adapters");

#[test]
fn every_shipped_adapter_passes_its_fixtures() {
    let adapters = discover(Path::new(ADAPTERS)).unwrap_or_else(|err| panic!("{err}"));
    assert!(!adapters.is_empty(), "no adapter scripts in {ADAPTERS}");
    // The agent's limits, with more time: a debug build on a busy test machine is slow, and what
    // is checked here is what the scripts produce, not how fast.
    let limits = Limits {
        time: Duration::from_secs(2),
        ..Limits::default()
    };

    let mut problems = String::new();
    let (mut passed, mut failed) = (0, 0);
    for (script, fixtures) in &adapters {
        if fixtures.is_empty() {
            writeln!(
                problems,
                "NO FIXTURES {}: add at least one case to its `.tests` directory\n",
                script.display()
            )
            .unwrap();
        }
        for result in run_adapter_fixtures(script, fixtures, &limits) {
            if result.passed {
                passed += 1;
            } else {
                failed += 1;
                writeln!(problems, "{result}\n").unwrap();
            }
        }
    }
    assert!(
        problems.is_empty(),
        "adapter fixtures: {passed} passed, {failed} failed\n\n{problems}"
    );
}
