//! Leases on partitions: which agent applies which subjects' events.
//!
//! Every third of `lease` an agent runs a round, one transaction: it records that it is alive
//! (`agents.last_seen`), renews the partitions it holds, gives back the ones it marked for giving
//! back in the round before, and then, counting the live agents (seen within the lease's
//! time to live), either marks the partitions above its fair share (ceil(partitions / live
//! agents)) for giving back at the next round, or takes free and expired partitions up to it.
//! A partition marked for giving back is renewed but no longer applied, so the events being
//! applied in it have a round to finish before another agent takes it.
//!
//! Times: a lease row expires `ttl` = 0.6 × `lease` after its last renewal, on PostgreSQL's
//! clock (`now()`), so the agents' own clocks do not matter. An agent fences itself by its own
//! monotonic clock: it applies a partition only while the last round that succeeded was *sent*
//! less than `lease / 2` ago (PostgreSQL's `now()` of that round was later still, so the row
//! expires at least 0.1 × `lease` after the agent stopped). When an agent dies, its rows expire
//! within `ttl` and the next round of another agent (a third of `lease` later at most) takes
//! them: another agent continues within `lease`.
//!
//! Each taking raises the partition's `epoch`. A state change carries the [`Fence`] (partition,
//! owner, epoch) it was made under and is refused with [`PgError::LeaseLost`] once the partition
//! moved ([`check_fence`]), so a stalled agent that wakes up after losing its lease cannot
//! overwrite the new owner's work.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Row as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Fence, PgDb, PgError};

/// What this agent holds of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    epoch: i64,
    /// Above the fair share: not applied any more, given back at the next round.
    draining: bool,
}

#[derive(Debug, Default)]
struct State {
    held: BTreeMap<i32, Held>,
    /// When the last successful round was sent (this agent's monotonic clock).
    renewed: Option<Instant>,
}

/// What one round changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Partitions taken, with their new epochs.
    pub taken: Vec<(i32, i64)>,
    /// Partitions marked for giving back at the next round (not applied from now on).
    pub draining: Vec<i32>,
    /// Partitions given back.
    pub given_back: Vec<i32>,
    /// Partitions this agent thought it held but another agent had taken.
    pub lost: Vec<i32>,
    /// The live agents counted.
    pub live_agents: i64,
}

/// One agent's leases. Share it behind an `Arc`; [`Lessee::run`] renews.
#[derive(Debug)]
pub struct Lessee {
    db: PgDb,
    agent: String,
    lease: Duration,
    partitions: u32,
    state: Mutex<State>,
    /// Raised whenever the partitions that may be applied change.
    changes: watch::Sender<u64>,
}

impl Lessee {
    /// An agent `agent` (its unique id, [`super::agent_id`]) over a schema with `partitions`
    /// partitions; `lease` is the takeover bound (`journal.lease_seconds`).
    pub fn new(db: PgDb, agent: String, lease: Duration, partitions: u32) -> Lessee {
        Lessee {
            db,
            agent,
            lease,
            partitions: partitions.max(1),
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
        }
    }

    /// This agent's id.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// How long a lease row lives after its renewal.
    pub fn ttl(&self) -> Duration {
        self.lease.mul_f64(0.6)
    }

    /// How often [`Lessee::run`] runs a round.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// Notified whenever the partitions that may be applied change (taken, lost, marked for
    /// giving back). The fence's expiry by time is not announced: check [`Lessee::fence`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fence to start applying an event of `part` under, or `None` when this agent must
    /// not start one now: not held, being given back, or the last successful round was sent
    /// `lease / 2` ago or longer. An event started under a fence is carried on (each sink
    /// apply, the final state) only while [`Lessee::holds`] it.
    pub fn fence(&self, part: i32) -> Option<Fence> {
        let state = self.state();
        let held = state.held.get(&part)?;
        (self.fresh(&state) && !held.draining).then(|| Fence {
            part,
            owner: self.agent.clone(),
            epoch: held.epoch,
        })
    }

    /// True while `fence` is still this agent's lease by its own clock: the partition is held
    /// under the same epoch (being given back included: the events started have their round
    /// to finish) and the last successful round was sent less than `lease / 2` ago. Checked
    /// before each sink apply; the final state's transaction checks it again in PostgreSQL.
    pub fn holds(&self, fence: &Fence) -> bool {
        let state = self.state();
        fence.owner == self.agent
            && self.fresh(&state)
            && state
                .held
                .get(&fence.part)
                .is_some_and(|h| h.epoch == fence.epoch)
    }

    /// The partitions whose events this agent may start now (see [`Lessee::fence`]), in order.
    pub fn applicable(&self) -> Vec<i32> {
        let state = self.state();
        if !self.fresh(&state) {
            return Vec::new();
        }
        state
            .held
            .iter()
            .filter(|(_, h)| !h.draining)
            .map(|(&part, _)| part)
            .collect()
    }

    /// True while the last successful round was sent less than half the lease ago.
    fn fresh(&self, state: &State) -> bool {
        state
            .renewed
            .is_some_and(|at| at.elapsed() < self.lease / 2)
    }

    /// When the last successful round was sent (this agent's monotonic clock).
    pub fn renewed_at(&self) -> Option<Instant> {
        self.state().renewed
    }

    /// Every partition held, including those being given back.
    pub fn held(&self) -> Vec<i32> {
        self.state().held.keys().copied().collect()
    }

    /// One round (see the module's text), in one transaction.
    pub async fn round(&self) -> Result<Round, PgError> {
        const DOING: &str = "renewing the journal's partition leases";
        let sent = Instant::now();
        let draining: Vec<i32> = self
            .state()
            .held
            .iter()
            .filter(|(_, h)| h.draining)
            .map(|(&p, _)| p)
            .collect();
        let ttl = self.ttl().as_secs_f64();
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| self.db.error(e, DOING))?;
        let result = async {
            sqlx::query(
                "INSERT INTO agents (id, last_seen) VALUES ($1, now()) \
                 ON CONFLICT (id) DO UPDATE SET last_seen = now()",
            )
            .bind(&self.agent)
            .execute(&mut *tx)
            .await?;
            // Agents gone for long are forgotten (they no longer count as live anyway).
            sqlx::query(
                "DELETE FROM agents WHERE last_seen < now() - make_interval(secs => $1 * 100)",
            )
            .bind(ttl)
            .execute(&mut *tx)
            .await?;
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM agents WHERE last_seen > now() - make_interval(secs => $1)",
            )
            .bind(ttl)
            .fetch_one(&mut *tx)
            .await?;
            let renewed = sqlx::query(
                "UPDATE partitions SET expires_at = now() + make_interval(secs => $2) \
                 WHERE owner = $1 RETURNING part, epoch",
            )
            .bind(&self.agent)
            .bind(ttl)
            .fetch_all(&mut *tx)
            .await?;
            let mut held: BTreeMap<i32, i64> = BTreeMap::new();
            for row in renewed {
                held.insert(row.try_get(0)?, row.try_get(1)?);
            }
            let given_back: Vec<i32> = draining
                .iter()
                .copied()
                .filter(|p| held.contains_key(p))
                .collect();
            if !given_back.is_empty() {
                sqlx::query(
                    "UPDATE partitions SET owner = NULL, expires_at = NULL \
                     WHERE owner = $1 AND part = ANY($2)",
                )
                .bind(&self.agent)
                .bind(&given_back)
                .execute(&mut *tx)
                .await?;
                for part in &given_back {
                    held.remove(part);
                }
            }
            let share = self.partitions.div_ceil(live.max(1) as u32) as usize;
            let mut taken = Vec::new();
            if held.len() < share {
                let rows = sqlx::query(
                    "UPDATE partitions p SET owner = $1, epoch = p.epoch + 1, \
                     expires_at = now() + make_interval(secs => $2) \
                     FROM (SELECT part FROM partitions \
                           WHERE owner IS NULL OR expires_at IS NULL OR expires_at < now() \
                           ORDER BY part LIMIT $3 FOR UPDATE SKIP LOCKED) free \
                     WHERE p.part = free.part RETURNING p.part, p.epoch",
                )
                .bind(&self.agent)
                .bind(ttl)
                .bind((share - held.len()) as i64)
                .fetch_all(&mut *tx)
                .await?;
                for row in rows {
                    taken.push((row.try_get::<i32, _>(0)?, row.try_get::<i64, _>(1)?));
                }
            }
            Ok::<_, sqlx::Error>((live, held, given_back, taken, share))
        }
        .await;
        let (live, mut held, given_back, taken, share) = match result {
            Ok(found) => found,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(self.db.error(e, DOING));
            }
        };
        tx.commit().await.map_err(|e| self.db.error(e, DOING))?;

        held.extend(taken.iter().copied());
        // Above the share: the highest partitions are given back at the next round.
        let excess = held.len().saturating_sub(share);
        let newly_draining: Vec<i32> = held.keys().rev().take(excess).copied().collect();
        let mut state = self.state();
        let lost: Vec<i32> = state
            .held
            .keys()
            .copied()
            .filter(|p| !held.contains_key(p) && !given_back.contains(p))
            .collect();
        let before: Vec<i32> = state
            .held
            .iter()
            .filter(|(_, h)| !h.draining)
            .map(|(&p, _)| p)
            .collect();
        state.held = held
            .into_iter()
            .map(|(part, epoch)| {
                let draining = newly_draining.contains(&part);
                (part, Held { epoch, draining })
            })
            .collect();
        state.renewed = Some(sent);
        let after: Vec<i32> = state
            .held
            .iter()
            .filter(|(_, h)| !h.draining)
            .map(|(&p, _)| p)
            .collect();
        drop(state);
        if !lost.is_empty() {
            tracing::warn!(partitions = ?lost, "journal partitions were taken over by another agent: their events are no longer applied here");
        }
        if before != after {
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(Round {
            taken,
            draining: newly_draining,
            given_back,
            lost,
            live_agents: live,
        })
    }

    /// Runs a round every [`Lessee::renew_every`] until `stop`, then gives every partition
    /// back (so that the others take them at their next round rather than after the expiry):
    /// cancel `stop` once the events being applied are finished.
    pub async fn run(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            match self.round().await {
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("journal partition leases renewed again");
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot renew the journal's partition leases: this agent stops applying events half a lease after the last renewal");
                    }
                }
            }
        }
        if let Err(e) = self.leave().await {
            tracing::warn!(error = %e, "could not give back the journal's partitions: other agents take them when the leases expire");
        }
    }

    /// Gives every partition back and leaves the live agents (clean shutdown, after the
    /// events being applied are finished).
    pub async fn leave(&self) -> Result<(), PgError> {
        const DOING: &str = "giving back the journal's partitions";
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| self.db.error(e, DOING))?;
        let result = async {
            sqlx::query("UPDATE partitions SET owner = NULL, expires_at = NULL WHERE owner = $1")
                .bind(&self.agent)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM agents WHERE id = $1")
                .bind(&self.agent)
                .execute(&mut *tx)
                .await
        }
        .await;
        if let Err(e) = result {
            let _ = tx.rollback().await;
            return Err(self.db.error(e, DOING));
        }
        tx.commit().await.map_err(|e| self.db.error(e, DOING))?;
        let mut state = self.state();
        state.held.clear();
        state.renewed = None;
        drop(state);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// Checks in a state change's transaction that `fence` is still the partition's lease, and
/// keeps it so until the transaction ends: the row is locked `FOR SHARE`, so an agent taking
/// the partition meanwhile waits for this transaction, then sees its outcome. Refused with
/// [`PgError::LeaseLost`] when the partition moved (another owner or a later epoch).
pub(super) async fn check_fence(
    db: &PgDb,
    conn: &mut sqlx::PgConnection,
    fence: &Fence,
    doing: &'static str,
) -> Result<(), PgError> {
    let held: Option<i32> = sqlx::query_scalar(
        "SELECT part FROM partitions WHERE part = $1 AND owner = $2 AND epoch = $3 FOR SHARE",
    )
    .bind(fence.part)
    .bind(&fence.owner)
    .bind(fence.epoch)
    .fetch_optional(conn)
    .await
    .map_err(|e| db.error(e, doing))?;
    match held {
        Some(_) => Ok(()),
        None => Err(PgError::LeaseLost {
            part: fence.part,
            epoch: fence.epoch,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::super::testdb::{TestSchema, eventually};
    use super::*;

    /// `n` agents on the test's schema, each renewing in a task of its own until its token is
    /// cancelled.
    async fn agents(
        schema: &TestSchema,
        n: usize,
        lease: Duration,
    ) -> Vec<(Arc<Lessee>, CancellationToken)> {
        let mut agents = Vec::new();
        for i in 0..n {
            let db = schema.db().await;
            let lessee = Arc::new(Lessee::new(db, format!("agent-{i}"), lease, 16));
            let stop = CancellationToken::new();
            agents.push((lessee, stop));
        }
        agents
    }

    fn spawn(lessee: &Arc<Lessee>, stop: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let (lessee, stop) = (lessee.clone(), stop.clone());
        tokio::spawn(async move { lessee.run(stop).await })
    }

    /// True when every partition is applicable by exactly one of `agents`, none holds more than
    /// its share of 16 and every one holds at least one.
    fn split_fairly(agents: &[&Arc<Lessee>]) -> bool {
        let share = 16usize.div_ceil(agents.len());
        let mut all = BTreeSet::new();
        for lessee in agents {
            let parts = lessee.applicable();
            if parts.is_empty() || parts.len() > share || lessee.held().len() > share {
                return false;
            }
            for part in parts {
                if !all.insert(part) {
                    return false;
                }
            }
        }
        all.len() == 16
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_and_three_lessees_split_the_partitions_fairly() {
        let schema = TestSchema::create().await;
        let lease = schema.options().lease;
        let agents = agents(&schema, 3, lease).await;
        let first = spawn(&agents[0].0, &agents[0].1);
        assert!(
            eventually(lease, || async { agents[0].0.applicable().len() == 16 }).await,
            "one agent takes every partition"
        );
        let second = spawn(&agents[1].0, &agents[1].1);
        assert!(
            eventually(lease * 3, || async {
                split_fairly(&[&agents[0].0, &agents[1].0])
            })
            .await,
            "two agents hold 8 each: {:?} {:?}",
            agents[0].0.held(),
            agents[1].0.held()
        );
        let third = spawn(&agents[2].0, &agents[2].1);
        assert!(
            eventually(lease * 3, || async {
                split_fairly(&[&agents[0].0, &agents[1].0, &agents[2].0])
            })
            .await,
            "three agents hold at most 6 each: {:?} {:?} {:?}",
            agents[0].0.held(),
            agents[1].0.held(),
            agents[2].0.held()
        );
        // The database agrees: every partition has an owner among them, with a live lease.
        let owners: Vec<String> = sqlx::query_scalar(
            "SELECT owner FROM partitions WHERE expires_at > now() ORDER BY part",
        )
        .fetch_all(agents[0].0.db.pool())
        .await
        .unwrap();
        assert_eq!(owners.len(), 16);
        for (lessee, stop) in &agents {
            stop.cancel();
            let _ = lessee;
        }
        for task in [first, second, third] {
            task.await.unwrap();
        }
        // Leaving gave everything back.
        let held: i64 =
            sqlx::query_scalar("SELECT count(*) FROM partitions WHERE owner IS NOT NULL")
                .fetch_one(agents[0].0.db.pool())
                .await
                .unwrap();
        assert_eq!(held, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_partitions_of_an_agent_that_stops_renewing_are_taken_within_the_lease() {
        let schema = TestSchema::create().await;
        // Long enough for the bound to be checked without slack: rounds every 2 s, a lease row
        // lives 3.6 s, so the takeover comes 3.6 to 5.6 s after the last renewal.
        let lease = Duration::from_secs(6);
        let agents = agents(&schema, 3, lease).await;
        let mut tasks: Vec<_> = agents[..2].iter().map(|(l, s)| spawn(l, s)).collect();
        // The third renews until it dies between two rounds, giving nothing back.
        let dying = {
            let (lessee, stop) = agents[2].clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(lessee.renew_every());
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop.cancelled() => return,
                    }
                    let _ = lessee.round().await;
                }
            })
        };
        assert!(
            eventually(lease * 4, || async {
                split_fairly(&[&agents[0].0, &agents[1].0, &agents[2].0])
            })
            .await,
            "three agents split the partitions"
        );
        let dead = &agents[2].0;
        let its_parts = dead.applicable();
        agents[2].1.cancel();
        dying.await.unwrap();
        let died = dead.renewed_at().unwrap();
        let taken = eventually(lease * 2, || async {
            let survivors = [&agents[0].0, &agents[1].0];
            let mut all: BTreeSet<i32> = BTreeSet::new();
            for s in survivors {
                all.extend(s.applicable());
            }
            all.len() == 16
        })
        .await;
        let took = died.elapsed();
        assert!(taken, "the two others hold every partition");
        eprintln!("taken over {took:?} after the dead agent's last renewal");
        // Within the lease of its last renewal.
        assert!(took <= lease, "taken over after {took:?}, lease {lease:?}");
        // By its own clock, the dead agent stopped applying before anyone took over.
        assert!(dead.applicable().is_empty());
        for part in its_parts {
            assert_eq!(dead.fence(part), None);
        }
        for (_, stop) in &agents {
            stop.cancel();
        }
        for task in tasks.drain(..) {
            task.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_change_under_a_stale_epoch_is_refused() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        let a = Lessee::new(db.clone(), "a".into(), schema.options().lease, 16);
        a.round().await.unwrap();
        let fence = a.fence(3).expect("a holds partition 3");
        let fences: Vec<Fence> = (0..16).map(|p| a.fence(p).unwrap()).collect();
        let mut conn = db.pool().acquire().await.unwrap();
        check_fence(&db, &mut conn, &fence, "testing")
            .await
            .unwrap();
        // Another agent takes partition 3 after a's lease expired.
        sqlx::query("UPDATE partitions SET expires_at = now() - interval '1 s' WHERE part = 3")
            .execute(db.pool())
            .await
            .unwrap();
        let b = Lessee::new(db.clone(), "b".into(), schema.options().lease, 16);
        let round = b.round().await.unwrap();
        assert!(
            round
                .taken
                .iter()
                .any(|&(p, e)| p == 3 && e == fence.epoch + 1),
            "{round:?}"
        );
        let e = check_fence(&db, &mut conn, &fence, "testing")
            .await
            .unwrap_err();
        assert_eq!(
            e,
            PgError::LeaseLost {
                part: 3,
                epoch: fence.epoch
            }
        );
        // a's next round finds it lost and stops applying it.
        assert!(a.holds(&fence), "not noticed before the round");
        let round = a.round().await.unwrap();
        assert!(round.lost.contains(&3), "{round:?}");
        assert_eq!(a.fence(3), None);
        assert!(!a.holds(&fence));
        // With two live agents a's share is 8: of the 15 it holds, 7 are being given back.
        // Their events already started are carried on; none is started.
        assert_eq!(round.draining.len(), 7, "{round:?}");
        for part in &round.draining {
            assert_eq!(a.fence(*part), None);
            assert!(a.holds(&fences[*part as usize]));
        }
        let round = a.round().await.unwrap();
        assert_eq!(round.given_back.len(), 7, "{round:?}");
        assert!(!a.holds(&fences[round.given_back[0] as usize]));
        assert_eq!(a.applicable().len(), 8);
    }
}
