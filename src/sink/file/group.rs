//! Group commit: callers that need the same fsync share one.
//!
//! A caller that made a change (a rename into a directory, lines appended to a file) needs an
//! fsync that *starts after* its change; one that started earlier may have missed it. So a
//! caller joins the next fsync to start, never the one running: if none runs, it starts one
//! itself (it is the leader of that round); if one runs, it joins the round after it, and when
//! the running one ends one caller of that next round is woken to lead it (or a newcomer that
//! gets there first does); the others sleep until their round has ended. Every caller of a
//! round gets that round's result, error included, so a failed fsync fails every change that
//! waited on it.
//!
//! Blocking: callers are threads of the blocking pool, not tasks.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::sync::{Arc, Condvar, Mutex, Weak};

/// The outcome of one round: `Ok`, or the error's errno (or its text when it has none), kept
/// so that every caller of the round gets its own copy.
#[derive(Debug, Clone)]
enum Outcome {
    Ok,
    Errno(i32),
    Other(String),
}

impl Outcome {
    fn of(result: &io::Result<()>) -> Outcome {
        match result {
            Ok(()) => Outcome::Ok,
            Err(e) => match e.raw_os_error() {
                Some(errno) => Outcome::Errno(errno),
                None => Outcome::Other(e.to_string()),
            },
        }
    }

    fn result(&self) -> io::Result<()> {
        match self {
            Outcome::Ok => Ok(()),
            Outcome::Errno(errno) => Err(io::Error::from_raw_os_error(*errno)),
            Outcome::Other(text) => Err(io::Error::other(text.clone())),
        }
    }
}

/// One round: set once its fsync has returned.
#[derive(Debug, Default)]
struct Round {
    outcome: Mutex<Option<Outcome>>,
    /// Its callers wait here (with the group's state locked): all are woken when the round
    /// has ended, and one when the round before it has ended, to lead it. Callers of a later
    /// round are not woken by the end of an earlier one only to wait again.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The round new callers join: it has not started.
    next: Arc<Round>,
    /// True while a round's fsync runs.
    running: bool,
}

/// Group commit for one target (a directory, a file).
#[derive(Debug, Default)]
pub(super) struct Group {
    state: Mutex<State>,
}

impl Group {
    /// Returns once an fsync that started after this call began has returned, with its result.
    /// `fsync` is what the leader of a round runs; every caller of one group must pass the same
    /// operation.
    pub(super) fn sync(&self, fsync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut state = lock(&self.state);
        let mine = state.next.clone();
        loop {
            if let Some(outcome) = lock(&mine.outcome).as_ref() {
                return outcome.result();
            }
            if !state.running && Arc::ptr_eq(&state.next, &mine) {
                // Lead this round: from now on, newcomers join the one after it.
                state.running = true;
                state.next = Arc::new(Round::default());
                drop(state);
                let result = fsync();
                *lock(&mine.outcome) = Some(Outcome::of(&result));
                state = lock(&self.state);
                state.running = false;
                mine.changed.notify_all();
                state.next.changed.notify_one();
                drop(state);
                return result;
            }
            state = mine
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// Groups by key (a directory's path), created on first use and forgotten once nobody uses
/// them, so that a name template with a directory per subject does not keep one per subject
/// forever.
#[derive(Debug)]
pub(super) struct Groups<K> {
    groups: Mutex<HashMap<K, Weak<Group>>>,
}

impl<K: Eq + Hash + Clone> Groups<K> {
    pub(super) fn new() -> Groups<K> {
        Groups {
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The group of `key`, shared with every caller that holds it now.
    pub(super) fn get(&self, key: &K) -> Arc<Group> {
        let mut groups = lock(&self.groups);
        if let Some(group) = groups.get(key).and_then(Weak::upgrade) {
            return group;
        }
        // Forget the groups nobody holds any more, now and then: each sweep at least halves.
        if groups.len() >= 64 {
            groups.retain(|_, group| group.strong_count() > 0);
        }
        let group = Arc::new(Group::default());
        groups.insert(key.clone(), Arc::downgrade(&group));
        group
    }
}

/// Locks a mutex, taking the data even if a thread panicked while holding it: the state it
/// guards is consistent between statements.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Step {
        Changed(usize),
        SyncStarted(usize),
        SyncEnded(usize),
        Returned(usize),
    }

    /// Threads each make a change, then ask for a sync; the log records the order of it all.
    fn run(threads: usize, fail_round: Option<usize>) -> (Vec<Step>, Vec<io::Result<()>>) {
        let group = Arc::new(Group::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(Mutex::new(0usize));
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (group, log, rounds, barrier) =
                    (group.clone(), log.clone(), rounds.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    lock(&log).push(Step::Changed(i));
                    let result = group.sync(|| {
                        let round = {
                            let mut r = lock(&rounds);
                            *r += 1;
                            *r
                        };
                        lock(&log).push(Step::SyncStarted(round));
                        // A disk's fsync takes time; this is its stand-in, not synchronisation.
                        std::thread::sleep(Duration::from_millis(5));
                        lock(&log).push(Step::SyncEnded(round));
                        if fail_round == Some(round) {
                            Err(io::Error::from_raw_os_error(nix::libc::EIO))
                        } else {
                            Ok(())
                        }
                    });
                    lock(&log).push(Step::Returned(i));
                    result
                })
            })
            .collect();
        let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let log = lock(&log).clone();
        (log, results)
    }

    /// The round that covers caller `i`: the first to start after its change; checks that it
    /// ended before the caller returned.
    fn covering_round(log: &[Step], i: usize) -> usize {
        let pos = |step: Step| log.iter().position(|s| *s == step).unwrap();
        let changed = pos(Step::Changed(i));
        let returned = pos(Step::Returned(i));
        let round = log[changed..]
            .iter()
            .find_map(|s| match s {
                Step::SyncStarted(r) => Some(*r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no sync started after caller {i} changed: {log:?}"));
        assert!(
            pos(Step::SyncEnded(round)) < returned,
            "caller {i} returned before the sync that covers it ended: {log:?}"
        );
        round
    }

    #[test]
    fn concurrent_callers_share_syncs_and_none_returns_before_one_that_started_after_it() {
        let threads = 32;
        let (log, results) = run(threads, None);
        assert!(results.iter().all(Result::is_ok));
        let syncs = log
            .iter()
            .filter(|s| matches!(s, Step::SyncStarted(_)))
            .count();
        assert!(syncs < threads, "{syncs} syncs for {threads} callers");
        for i in 0..threads {
            covering_round(&log, i);
        }
    }

    #[test]
    fn a_failed_sync_fails_every_caller_it_covered_and_only_those() {
        let threads = 16;
        let (log, results) = run(threads, Some(1));
        let mut failed = 0;
        for (i, result) in results.iter().enumerate() {
            match result {
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(nix::libc::EIO));
                    failed += 1;
                }
                // A caller may succeed only if a later, successful sync started after its
                // change and ended before it returned.
                Ok(()) => {
                    covering_round(&log, i);
                    let pos = |step: Step| log.iter().position(|s| *s == step);
                    let (changed, returned) = (
                        pos(Step::Changed(i)).unwrap(),
                        pos(Step::Returned(i)).unwrap(),
                    );
                    let covered = (2..=threads).any(|r| {
                        pos(Step::SyncStarted(r)).is_some_and(|p| p > changed)
                            && pos(Step::SyncEnded(r)).is_some_and(|p| p < returned)
                    });
                    assert!(covered, "caller {i}: {log:?}");
                }
            }
        }
        assert!(failed >= 1, "{log:?}");
    }

    #[test]
    fn a_lone_caller_syncs_every_time() {
        let group = Group::default();
        let mut count = 0;
        for _ in 0..3 {
            group
                .sync(|| {
                    count += 1;
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(count, 3);
    }

    #[test]
    fn groups_are_shared_by_key_and_forgotten_when_unused() {
        let groups: Groups<u32> = Groups::new();
        let a = groups.get(&1);
        assert!(Arc::ptr_eq(&a, &groups.get(&1)));
        assert!(!Arc::ptr_eq(&a, &groups.get(&2)));
        for k in 100..300 {
            drop(groups.get(&k));
        }
        assert!(lock(&groups.groups).len() < 100);
        assert!(Arc::ptr_eq(&a, &groups.get(&1)));
    }
}
