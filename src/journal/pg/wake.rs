//! Wake-ups for new events, whichever agent accepted them: every insert into `events` notifies
//! channel `ess_journal` at commit (a statement trigger, see the schema) with the schema's name
//! and the partitions written to, so an agent learns of work in the partitions it holds without
//! polling. A notification is a hint, never the record: a reader then makes a pass over the
//! backlog ([`super::claim::waiting`]), and when the listening connection was lost (and
//! notifications with it) it is told so, and makes a pass over every partition it holds.

use sqlx::postgres::PgListener;

use super::{PgDb, PgError};

/// The notification channel.
const CHANNEL: &str = "ess_journal";

/// What woke the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// New events were committed in these partitions.
    Parts(Vec<i32>),
    /// The connection was lost and is being made again: notifications may have been missed.
    Lost,
}

/// A listening connection of its own, taken from the pool (it counts against `journal.pool_size`).
pub struct Wakeups {
    listener: PgListener,
    db: PgDb,
    /// `schema:`, the prefix of this journal's notifications.
    prefix: String,
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Wakeups {
    /// Starts listening.
    pub async fn listen(db: &PgDb) -> Result<Wakeups, PgError> {
        const DOING: &str = "listening for new events";
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(db.pool())
            .await
            .map_err(|e| db.error(e, DOING))?;
        let mut listener = PgListener::connect_with(db.pool())
            .await
            .map_err(|e| db.error(e, DOING))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| db.error(e, DOING))?;
        Ok(Wakeups {
            listener,
            db: db.clone(),
            prefix: format!("{}:", schema.unwrap_or_default()),
        })
    }

    /// Waits for the next wake-up of this journal (other schemas' notifications are skipped).
    /// An error means the connection cannot be made again now; calling again retries.
    pub async fn next(&mut self) -> Result<Wakeup, PgError> {
        loop {
            let notification = self
                .listener
                .try_recv()
                .await
                .map_err(|e| self.db.error(e, "listening for new events"))?;
            let Some(notification) = notification else {
                return Ok(Wakeup::Lost);
            };
            if let Some(parts) = notification.payload().strip_prefix(&self.prefix) {
                return Ok(Wakeup::Parts(
                    parts.split(',').filter_map(|p| p.parse().ok()).collect(),
                ));
            }
        }
    }
}

/// Most bytes of a notification's payload: PostgreSQL refuses 8000 and above.
const MAX_PAYLOAD: usize = 7900;

/// Wakes the agents for new events in `parts`, as the insert trigger does, for a writer that
/// inserted events with the trigger disabled (an import): one notification per few hundred
/// partitions, each under PostgreSQL's payload limit. Sent at once (outside a transaction), so
/// call it after the COMMIT that made the events visible.
pub async fn notify(db: &PgDb, parts: &[i32]) -> Result<(), PgError> {
    const DOING: &str = "waking the agents for new events";
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(db.pool())
        .await
        .map_err(|e| db.error(e, DOING))?;
    let prefix = format!("{}:", schema.unwrap_or_default());
    let mut payloads = Vec::new();
    let mut payload = prefix.clone();
    for part in parts {
        let item = part.to_string();
        if payload.len() > prefix.len() && payload.len() + 1 + item.len() > MAX_PAYLOAD {
            payloads.push(std::mem::replace(&mut payload, prefix.clone()));
        }
        if payload.len() > prefix.len() {
            payload.push(',');
        }
        payload.push_str(&item);
    }
    if payload.len() > prefix.len() {
        payloads.push(payload);
    }
    for payload in payloads {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(db.pool())
            .await
            .map_err(|e| db.error(e, DOING))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::append::Appender;
    use super::super::partition_of;
    use super::super::testdb::{TestSchema, new_event};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_accepted_by_another_agent_wakes_the_listener() {
        let schema = TestSchema::create().await;
        let elsewhere = TestSchema::create().await;
        let mut wakeups = Wakeups::listen(&schema.db().await).await.unwrap();
        // Another journal's events are not this one's wake-ups.
        let other = Appender::start(elsewhere.db().await, 16, "x".into(), 8);
        other.append(new_event("x1", "S1")).await.unwrap();
        let b = Appender::start(schema.db().await, 16, "b".into(), 8);
        b.append(new_event("e1", "S1")).await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(10), wakeups.next())
            .await
            .expect("woken within 10 s")
            .unwrap();
        assert_eq!(woke, Wakeup::Parts(vec![partition_of("S1", 16)]));
        // A duplicate writes nothing and wakes nobody; the next new event does.
        b.append(new_event("e1", "S1")).await.unwrap();
        b.append(new_event("e2", "S2")).await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(10), wakeups.next())
            .await
            .expect("woken within 10 s")
            .unwrap();
        assert_eq!(woke, Wakeup::Parts(vec![partition_of("S2", 16)]));
        b.close().await;
        other.close().await;
    }
}
