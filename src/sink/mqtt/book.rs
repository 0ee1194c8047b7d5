//! The bookkeeping that matches the broker's confirmations to the applies waiting for them.

use std::collections::{HashMap, VecDeque};

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::publish::{Fingerprint, RecordKey};
use crate::sink::SinkError;

/// What an apply is told about its message.
pub(super) type Outcome = Result<(), SinkError>;

/// One publish handed to the client and not yet confirmed (or failed).
pub(super) struct Entry {
    pub(super) key: RecordKey,
    pub(super) fingerprint: Fingerprint,
    pub(super) waiters: Vec<oneshot::Sender<Outcome>>,
    /// The place in the in-flight window; freed with the entry, not with the apply, so a publish
    /// whose apply gave up still counts until the broker confirms it.
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

/// One item of the client's resend queue (the publishes and releases it holds while
/// disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pending {
    /// A publish; packet id 0 means it never left (it was drained from the request channel).
    Publish(u16),
    /// A QoS 2 release (PUBREL) waiting for its PUBCOMP.
    Release(u16),
}

/// Answer to an apply that asks whether a record is already taken care of.
pub(super) enum Attach {
    /// The broker confirmed this very message after its apply had given up.
    Confirmed,
    /// The message is in flight; the receiver completes with its outcome.
    Waiting(oneshot::Receiver<Outcome>),
    /// Nothing known: publish it.
    Publish,
}

/// How many confirmations that nobody waited for are remembered.
pub(super) const ORPHANS: usize = 65_536;

/// The bookkeeping that matches the broker's confirmations to the applies waiting for them.
///
/// A publish goes through: `queued` (handed to the client, no packet id yet; the client takes
/// them in order, so the next new packet id the client reports belongs to the front) →
/// `awaiting_ack` by packet id (QoS 1: PUBACK; QoS 2: PUBREC) → for QoS 2 `awaiting_comp`
/// (PUBCOMP). QoS 0 publishes are done when written. A packet id can be in both maps at once:
/// the client reuses the id of a QoS 2 message once its PUBREC is in, before the PUBCOMP.
#[derive(Default)]
pub(super) struct Book {
    pub(super) next_id: u64,
    pub(super) entries: HashMap<u64, Entry>,
    pub(super) by_key: HashMap<RecordKey, u64>,
    pub(super) queued: VecDeque<u64>,
    pub(super) awaiting_ack: HashMap<u16, u64>,
    pub(super) awaiting_comp: HashMap<u16, u64>,
    /// A publish the client holds back because its packet id is still in use (it reports
    /// "await ack" for it, and "publish" with the same id once the id is free).
    pub(super) collided: Option<(u16, u64)>,
    /// Confirmed records whose applies had stopped waiting, oldest first.
    pub(super) orphans: HashMap<RecordKey, Fingerprint>,
    pub(super) orphan_order: VecDeque<RecordKey>,
}

impl Book {
    /// Looks for an earlier publish of the same record with the same content.
    pub(super) fn attach(&mut self, key: &RecordKey, fingerprint: &Fingerprint) -> Attach {
        if let Some(done) = self.orphans.get(key) {
            if done == fingerprint {
                // Used once: a later replay of the event publishes again, as it should.
                self.orphans.remove(key);
                return Attach::Confirmed;
            }
            self.orphans.remove(key);
        }
        if let Some(id) = self.by_key.get(key)
            && let Some(entry) = self.entries.get_mut(id)
            && entry.fingerprint == *fingerprint
        {
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            return Attach::Waiting(rx);
        }
        Attach::Publish
    }

    /// Records a publish about to be handed to the client. Call under the same lock as the
    /// hand-over, so that `queued` has the client's order.
    pub(super) fn enqueue(
        &mut self,
        key: RecordKey,
        fingerprint: Fingerprint,
        permit: Option<OwnedSemaphorePermit>,
    ) -> (u64, oneshot::Receiver<Outcome>) {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.by_key.insert(key.clone(), id);
        self.entries.insert(
            id,
            Entry {
                key,
                fingerprint,
                waiters: vec![tx],
                _permit: permit,
            },
        );
        self.queued.push_back(id);
        (id, rx)
    }

    /// Forgets a publish the client refused to take (it is the last one queued).
    pub(super) fn unqueue(&mut self, id: u64) {
        if self.queued.back() == Some(&id) {
            self.queued.pop_back();
        }
        if let Some(entry) = self.entries.remove(&id)
            && self.by_key.get(&entry.key) == Some(&id)
        {
            self.by_key.remove(&entry.key);
        }
    }

    /// The client wrote a publish with this packet id (0 for QoS 0).
    pub(super) fn written(&mut self, pkid: u16) {
        if pkid == 0 {
            match self.queued.pop_front() {
                Some(id) => self.resolve(id, Ok(())),
                None => {
                    tracing::warn!("mqtt: a QoS 0 publish was written that no apply handed over")
                }
            }
            return;
        }
        if let Some((held, id)) = self.collided
            && held == pkid
            && !self.awaiting_ack.contains_key(&pkid)
        {
            self.collided = None;
            self.awaiting_ack.insert(pkid, id);
            return;
        }
        if self.awaiting_ack.contains_key(&pkid) {
            // A resend after a reconnect.
            return;
        }
        match self.queued.pop_front() {
            Some(id) => {
                self.awaiting_ack.insert(pkid, id);
            }
            None => tracing::warn!(
                pkid,
                "mqtt: a publish was written that no apply handed over"
            ),
        }
    }

    /// The client holds the next publish back until `pkid` is free.
    pub(super) fn collision(&mut self, pkid: u16) {
        if let Some(id) = self.queued.pop_front() {
            self.collided = Some((pkid, id));
        }
    }

    /// PUBACK (QoS 1).
    pub(super) fn acked(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(id) = self.awaiting_ack.remove(&pkid) {
            self.resolve(id, outcome);
        }
    }

    /// PUBREC (QoS 2): on success the message is the broker's; the exchange ends with PUBCOMP.
    pub(super) fn received(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(id) = self.awaiting_ack.remove(&pkid) {
            match outcome {
                Ok(()) => {
                    self.awaiting_comp.insert(pkid, id);
                }
                Err(e) => self.resolve(id, Err(e)),
            }
        }
    }

    /// PUBCOMP (QoS 2).
    pub(super) fn completed(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(id) = self.awaiting_comp.remove(&pkid) {
            self.resolve(id, outcome);
        }
    }

    /// The broker started a new session: what the client held for resending (`pending`, as it
    /// was before the connection) is gone, and so are those publishes.
    pub(super) fn session_lost(&mut self, pending: &[Pending]) {
        let lost = || {
            SinkError::Retryable(
                "the broker did not keep the session (it restarted without persistence, or the \
                 session expired), so the message was not confirmed: publishing it again"
                    .into(),
            )
        };
        let mut never_sent = 0;
        for item in pending {
            match *item {
                Pending::Publish(0) => never_sent += 1,
                Pending::Publish(pkid) => {
                    if let Some(id) = self.awaiting_ack.remove(&pkid) {
                        self.resolve(id, Err(lost()));
                    }
                }
                Pending::Release(pkid) => {
                    if let Some(id) = self.awaiting_comp.remove(&pkid) {
                        self.resolve(id, Err(lost()));
                    }
                }
            }
        }
        // Publishes drained from the request channel are the oldest of those not yet written.
        for _ in 0..never_sent {
            if let Some(id) = self.queued.pop_front() {
                self.resolve(id, Err(lost()));
            }
        }
    }

    /// Tells every waiting apply `error`; the publishes stay in flight.
    pub(super) fn fail_waiters(&mut self, error: &SinkError) {
        for entry in self.entries.values_mut() {
            for tx in entry.waiters.drain(..) {
                let _ = tx.send(Err(error.clone()));
            }
        }
    }

    pub(super) fn resolve(&mut self, id: u64, outcome: Outcome) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if self.by_key.get(&entry.key) == Some(&id) {
            self.by_key.remove(&entry.key);
        }
        let mut heard = false;
        for tx in entry.waiters {
            heard |= tx.send(outcome.clone()).is_ok();
        }
        if !heard && outcome.is_ok() {
            self.remember(entry.key, entry.fingerprint);
        }
    }

    pub(super) fn remember(&mut self, key: RecordKey, fingerprint: Fingerprint) {
        if self.orphans.insert(key.clone(), fingerprint).is_none() {
            self.orphan_order.push_back(key);
        }
        while self.orphans.len() > ORPHANS {
            match self.orphan_order.pop_front() {
                Some(old) => {
                    self.orphans.remove(&old);
                }
                None => break,
            }
        }
        // Keys used up by `attach` leave stale places in the order; drop them now and then.
        if self.orphan_order.len() > 2 * ORPHANS {
            let orphans = &self.orphans;
            self.orphan_order.retain(|k| orphans.contains_key(k));
        }
    }

    /// Publishes handed over and not yet confirmed.
    pub(super) fn in_flight(&self) -> usize {
        self.entries.len()
    }
}
