//! Reads and admin operations of the PostgreSQL journal (being ported).

use super::{PgDb, PgError};
use crate::journal::{
    DeadLetter, DropOutcome, EventDetail, EventFilter, EventRecord, EventState, EventSummary,
    Requeue, Requeued, RouteReplay,
};

fn unported(what: &'static str) -> PgError {
    PgError::Config(format!("{what} is not available on PostgreSQL yet"))
}

pub async fn get(_db: &PgDb, _id: &str) -> Result<Option<EventRecord>, PgError> {
    Err(unported("reading an event"))
}
pub async fn get_detail(_db: &PgDb, _id: &str) -> Result<Option<EventDetail>, PgError> {
    Err(unported("reading an event"))
}
pub async fn requeue(
    _db: &PgDb,
    _id: &str,
    _route: Option<&RouteReplay>,
    _force: bool,
) -> Result<Requeue, PgError> {
    Err(unported("replay"))
}
pub async fn drop_dead_letter(_db: &PgDb, _id: &str) -> Result<DropOutcome, PgError> {
    Err(unported("drop"))
}
pub async fn dead_letters(_db: &PgDb, _after: i64, _limit: u32) -> Result<Vec<DeadLetter>, PgError> {
    Err(unported("dead letters"))
}
pub async fn dead_letter_count(_db: &PgDb) -> Result<u64, PgError> {
    Err(unported("dead letters"))
}
pub async fn outbox_next_due(_db: &PgDb) -> Result<Option<i64>, PgError> {
    Err(unported("outbox"))
}
pub async fn outbox_len(_db: &PgDb) -> Result<u64, PgError> {
    Err(unported("outbox"))
}
pub async fn list_events(
    _db: &PgDb,
    _filter: &EventFilter,
    _before: Option<i64>,
    _limit: u32,
) -> Result<Vec<EventSummary>, PgError> {
    Err(unported("listing"))
}
pub async fn received_per_minute(
    _db: &PgDb,
    _since: &str,
) -> Result<Vec<(String, EventState, u64)>, PgError> {
    Err(unported("listing"))
}
pub async fn requeue_dead_letters(
    _db: &PgDb,
    _filter: EventFilter,
    _max: u32,
) -> Result<Vec<Requeued>, PgError> {
    Err(unported("retry"))
}
