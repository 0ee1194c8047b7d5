//! The kill -9 rounds every sink's crash test runs: start the agent, post events from several
//! clients, SIGKILL it while events are being applied, and again; then start it once more to
//! apply what was left.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Agent, applied_line};

/// What the rounds leave: the ids that got a 2xx, the events the restarts found unfinished in
/// the journal (the part kill -9 put at risk), and the agent of the last start, still running.
pub struct AfterKills {
    pub accepted: BTreeSet<String>,
    pub resumed: u64,
    pub agent: Agent,
}

/// How many events a started agent said it found unfinished.
fn resumed_by(agent: &Agent) -> u64 {
    agent
        .wait_for_log(Duration::ZERO, |v| {
            v["message"] == "resuming events left unfinished"
        })
        .map_or(0, |v| v["events"].as_u64().unwrap_or(0))
}

/// Runs `rounds` rounds on the state in `dir` with `config`: each starts the agent, posts events
/// with `post` (given the agent, the round's tag `r<round>` and the flag that stops the posting
/// clients), waits until `applied_before_kill(round)` events were applied since that start, and
/// kills the agent with SIGKILL. Then starts the agent once more and returns it with what was
/// accepted. Panics when a round sees nothing applied within 30 s.
pub async fn kill_9_rounds(
    dir: &Path,
    config: &str,
    rounds: usize,
    applied_before_kill: impl Fn(usize) -> usize,
    post: impl Fn(&Agent, &str, Arc<AtomicBool>) -> JoinHandle<Vec<String>>,
) -> AfterKills {
    let mut accepted = BTreeSet::new();
    let mut resumed = 0;
    for round in 0..rounds {
        let mut agent = Agent::start_with(dir, config);
        resumed += resumed_by(&agent);
        let stop = Arc::new(AtomicBool::new(false));
        let poster = post(&agent, &format!("r{round}"), stop.clone());
        let wanted = applied_before_kill(round);
        let mut applied = 0;
        let seen = agent.wait_for_log(Duration::from_secs(30), |v| {
            applied += usize::from(applied_line(v));
            applied >= wanted
        });
        assert!(seen.is_some(), "round {round}: nothing applied");
        agent.kill9();
        stop.store(true, Ordering::Relaxed);
        accepted.extend(poster.await.unwrap());
    }
    let agent = Agent::start_with(dir, config);
    resumed += resumed_by(&agent);
    AfterKills {
        accepted,
        resumed,
        agent,
    }
}
