//! `GET /v1/dead-letters`, the bulk `POST /v1/dead-letters/retry` and
//! `DELETE /v1/dead-letters/{id}` (a single retry is a replay, in [`super::events`]).

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::events::journal_time;
use super::{Admin, blocking, decode_id, journal_problem, json_body, query_number, unknown_event};
use crate::journal::{DropOutcome, EventFilter};
use crate::protocol::problem::{Body, Problem, json_response};

/// The most dead letters one bulk retry requeues; the answer says when more are left.
pub const MAX_BULK_RETRY: u32 = 1000;
/// The most ids a bulk retry's answer lists.
pub const MAX_LISTED_IDS: usize = 100;

/// What a bulk retry selects: the filters of the event listing (every one optional, combined
/// with AND), or `all`, which must be said when no filter is given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFilter {
    route: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    subject: Option<String>,
    since: Option<String>,
    until: Option<String>,
    #[serde(default)]
    all: bool,
}

impl RetryFilter {
    fn filter(self) -> Result<EventFilter, Problem> {
        let time =
            |name: &str, value: Option<String>| value.map(|v| journal_time(name, &v)).transpose();
        let filter = EventFilter {
            states: Vec::new(),
            event_type: self.event_type,
            subject: self.subject,
            route: self.route,
            since: time("since", self.since)?,
            until: time("until", self.until)?,
        };
        if filter == EventFilter::default() && !self.all {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "no_filter",
                "the body selects no dead letters: give a filter (route, type, subject, since, \
                 until) or {\"all\": true} to retry every dead letter",
            ));
        }
        Ok(filter)
    }
}

impl Admin {
    pub(super) async fn dead_letters(&self, query: &str) -> Result<Response<Body>, Problem> {
        let after = query_number(query, "after", 0i64, "a sequence number from next_after")?;
        let limit = query_number(query, "limit", 100u32, "a count from 1 to 1000")?.clamp(1, 1000);
        let journal = self.journal.clone();
        let (items, total) = blocking(move || {
            Ok((
                journal.dead_letters(after, limit)?,
                journal.dead_letter_count()?,
            ))
        })
        .await?;
        let next = (items.len() as u32 == limit)
            .then(|| items.last().map(|d| d.seq))
            .flatten();
        Ok(json_response(
            StatusCode::OK,
            &json!({"items": items, "total": total, "next_after": next}),
        ))
    }

    /// Requeues the dead letters (failed and parked) a filter selects, newest first, at most
    /// [`MAX_BULK_RETRY`].
    pub(super) async fn retry_dead_letters(&self, body: &[u8]) -> Result<Response<Body>, Problem> {
        let filter = json_body::<RetryFilter>(body, None)?.filter()?;
        let requeued = self
            .journal
            .requeue_dead_letters(filter, MAX_BULK_RETRY)
            .await
            .map_err(journal_problem)?;
        // At the bound some may be left: the caller asks again.
        let more = requeued.len() == MAX_BULK_RETRY as usize;
        let ids: Vec<&str> = requeued
            .iter()
            .take(MAX_LISTED_IDS)
            .map(|r| r.id.as_str())
            .collect();
        tracing::info!(
            count = requeued.len(),
            "dead letters requeued by the operator"
        );
        let answer = json!({
            "requeued": requeued.len(),
            "ids": ids,
            "ids_truncated": requeued.len() > ids.len(),
            "more": more,
        });
        for event in requeued {
            self.dispatcher.submit(event.seq, event.subject);
        }
        Ok(json_response(StatusCode::ACCEPTED, &answer))
    }

    pub(super) async fn drop_dead_letter(&self, raw_id: &str) -> Result<Response<Body>, Problem> {
        let id = decode_id(raw_id)?;
        match self
            .journal
            .drop_dead_letter(&id)
            .await
            .map_err(journal_problem)?
        {
            DropOutcome::Dropped => {
                tracing::info!(event_id = %id, "dead letter dropped by the operator");
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"id": id, "status": "dropped"}),
                ))
            }
            DropOutcome::NotFound => Err(unknown_event(&id)),
            DropOutcome::NotDeadLetter(state) => Err(Problem::new(
                StatusCode::CONFLICT,
                "not_a_dead_letter",
                format!(
                    "event {id:?} is {state}, not a dead letter: only failed or parked events can be dropped"
                ),
            )),
        }
    }
}
