//! `GET /v1/events` (the filtered listing), `GET /v1/events/{id}` (one event in full) and
//! `POST /v1/events/{id}/replay`.

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Admin, blocking, decode_id, journal_problem, json_body, percent_decode, unknown_event,
};
use crate::journal::{
    AppliedOutput, DeliveryState, EventDetail, EventFilter, EventState, Requeue, RouteReplay,
};
use crate::protocol::problem::{Body, Problem, json_response};

/// A page of the listing holds this many events unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 50;
/// The most events one page holds.
pub const MAX_LIMIT: u32 = 500;

/// The parameters `GET /v1/events` takes.
const PARAMETERS: &[&str] = &[
    "state", "type", "subject", "route", "since", "until", "limit", "cursor",
];

fn bad_parameter(name: &str, value: &str, what: &str) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        format!("query parameter {name}={value:?} is not {what}"),
    )
}

/// The query's parameters, decoded; an unknown or repeated parameter, or one that is not valid
/// percent-encoded UTF-8, is refused, so that a typo is never taken for "no filter".
fn parameters<'q>(query: &'q str, known: &[&str]) -> Result<BTreeMap<&'q str, String>, Problem> {
    let mut found = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
        if !known.contains(&name) {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!(
                    "unknown query parameter {:?}: the parameters are {}",
                    percent_decode(name).unwrap_or_else(|| name.to_owned()),
                    known.join(", ")
                ),
            ));
        }
        let value = percent_decode(raw)
            .ok_or_else(|| bad_parameter(name, raw, "valid percent-encoded UTF-8"))?;
        if found.insert(name, value).is_some() {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("query parameter {name} is given twice: give it once"),
            ));
        }
    }
    Ok(found)
}

/// An RFC 3339 time as the journal writes it (UTC, milliseconds).
pub(super) fn journal_time(name: &str, value: &str) -> Result<String, Problem> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(crate::timestamp::format)
        .map_err(|_| {
            bad_parameter(
                name,
                value,
                "an RFC 3339 time such as 2026-12-07T09:00:00Z (a + in an offset is sent as %2B)",
            )
        })
}

/// A non-empty text filter.
fn text(name: &str, value: &str) -> Result<String, Problem> {
    if value.is_empty() {
        return Err(bad_parameter(
            name,
            value,
            "a non-empty value: leave it out instead",
        ));
    }
    Ok(value.to_owned())
}

/// The states of a comma-separated list of state words.
fn states(value: &str) -> Result<Vec<EventState>, Problem> {
    value
        .split(',')
        .map(|word| {
            word.parse().map_err(|_| {
                bad_parameter(
                    "state",
                    value,
                    "a state or a comma-separated list of states: accepted, applied, filtered, \
                     superseded, failed, parked, dropped",
                )
            })
        })
        .collect()
}

/// The filter, cursor and limit of a listing's query.
fn listing(query: &str) -> Result<(EventFilter, Option<i64>, u32), Problem> {
    let params = parameters(query, PARAMETERS)?;
    let mut filter = EventFilter::default();
    let mut cursor = None;
    let mut limit = DEFAULT_LIMIT;
    for (name, value) in params {
        match name {
            "state" => filter.states = states(&value)?,
            "type" => filter.event_type = Some(text(name, &value)?),
            "subject" => filter.subject = Some(text(name, &value)?),
            "route" => filter.route = Some(text(name, &value)?),
            "since" => filter.since = Some(journal_time(name, &value)?),
            "until" => filter.until = Some(journal_time(name, &value)?),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_parameter(name, &value, &format!("a count from 1 to {MAX_LIMIT}"))
                    })?;
            }
            "cursor" => {
                cursor = Some(
                    value
                        .parse::<i64>()
                        .ok()
                        .filter(|c| *c > 0)
                        .ok_or_else(|| {
                            bad_parameter(
                                name,
                                &value,
                                "a cursor from next_cursor of an earlier page",
                            )
                        })?,
                );
            }
            _ => {}
        }
    }
    Ok((filter, cursor, limit))
}

/// The event's deliveries, each with its route's `history` (the attempts kept, oldest first)
/// and the `output` its latest applied attempt gave the sink. A route replayed and not yet
/// tried again has no delivery row but keeps its history: it is listed as pending.
fn deliveries_with_history(detail: &EventDetail) -> Value {
    let mut history = detail.history.clone();
    let mut out: Vec<Value> = detail
        .deliveries
        .iter()
        .map(|d| {
            let mut entry = serde_json::to_value(d).unwrap_or_default();
            let route = history.remove(&d.route).unwrap_or_default();
            entry["history"] = json!(route.attempts);
            entry["output"] = output_value(route.output);
            entry
        })
        .collect();
    for (name, route) in history {
        let last = route.attempts.last();
        out.push(json!({
            "route": name,
            "sink": last.map(|a| a.sink.as_str()).unwrap_or_default(),
            "state": DeliveryState::Pending,
            "attempts": 0,
            "updated_at": last.map(|a| a.started_at.as_str()).unwrap_or_default(),
            "history": route.attempts,
            "output": output_value(route.output),
        }));
    }
    out.sort_by(|a, b| a["route"].as_str().cmp(&b["route"].as_str()));
    Value::Array(out)
}

/// An applied output for the API: the JSON `value` when kept whole, else the kept `text`
/// (cut, so not JSON), with the whole output's length in `bytes`.
fn output_value(output: Option<AppliedOutput>) -> Value {
    match output {
        None => Value::Null,
        Some(o) if !o.truncated => match serde_json::from_str::<Value>(&o.text) {
            Ok(value) => json!({"value": value, "bytes": o.bytes, "truncated": false}),
            Err(_) => json!({"text": o.text, "bytes": o.bytes, "truncated": false}),
        },
        Some(o) => json!({"text": o.text, "bytes": o.bytes, "truncated": true}),
    }
}

/// The optional body of a replay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// Replay through this route only.
    route: Option<String>,
}

impl Admin {
    pub(super) async fn list_events(&self, query: &str) -> Result<Response<Body>, Problem> {
        let (filter, cursor, limit) = listing(query)?;
        let journal = self.journal.clone();
        // One more than the page tells whether there is a next page.
        let mut items = blocking(move || journal.list_events(&filter, cursor, limit + 1)).await?;
        let next = (items.len() > limit as usize).then(|| {
            items.truncate(limit as usize);
            items.last().map(|e| e.seq.to_string())
        });
        Ok(json_response(
            StatusCode::OK,
            &json!({"items": items, "next_cursor": next.flatten()}),
        ))
    }

    pub(super) async fn get_event(&self, raw_id: &str) -> Result<Response<Body>, Problem> {
        let id = decode_id(raw_id)?;
        let journal = self.journal.clone();
        let lookup = id.clone();
        let Some(detail) = blocking(move || journal.get_detail(&lookup)).await? else {
            return Err(unknown_event(&id));
        };
        let mut body = serde_json::to_value(&detail.record).unwrap_or_default();
        body["seq"] = json!(detail.seq);
        body["deliveries"] = deliveries_with_history(&detail);
        body["receipt"] = detail
            .receipt
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or(Value::Null);
        body["envelope"] = serde_json::from_str(&detail.envelope).unwrap_or(Value::Null);
        body["raw_body"] = json!(String::from_utf8_lossy(&detail.raw_body));
        body["report"] = match detail.report {
            None => Value::Null,
            Some(report) => json!({
                "state": "pending",
                "message_id": report.message_id,
                "body": serde_json::from_str::<Value>(&report.body).unwrap_or(Value::Null),
                "attempts": report.attempts,
                "last_error": report.last_error,
                "created_at": report.created_at,
            }),
        };
        body["reports_sent"] = detail
            .reports_sent
            .into_iter()
            .map(|sent| {
                json!({
                    "message_id": sent.message_id,
                    "body": serde_json::from_str::<Value>(&sent.body).unwrap_or(Value::Null),
                    "attempts": sent.attempts,
                    "created_at": sent.created_at,
                    "sent_at": sent.sent_at,
                })
            })
            .collect();
        Ok(json_response(StatusCode::OK, &body))
    }

    /// A replay (or a dead letter's retry, with no body): `force` applies again what was
    /// applied; a body `{"route": NAME}` replays through that route only.
    pub(super) async fn replay(
        &self,
        raw_id: &str,
        force: bool,
        body: &[u8],
    ) -> Result<Response<Body>, Problem> {
        let id = decode_id(raw_id)?;
        let asked: ReplayBody = json_body(body, Some(ReplayBody::default()))?;
        let route = match &asked.route {
            None => None,
            Some(name) => Some(self.route_replay(&id, name).await?),
        };
        let outcome = self
            .journal
            .requeue(&id, route, force)
            .await
            .map_err(journal_problem)?;
        let only = asked.route.as_deref();
        match outcome {
            Requeue::Queued { seq, subject } => {
                self.dispatcher.submit(seq, subject);
                tracing::info!(event_id = %id, force, route = only, "event requeued by the operator");
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({"id": id, "status": "requeued", "force": force, "route": only}),
                ))
            }
            Requeue::NotFound => Err(unknown_event(&id)),
            Requeue::Pending => Err(Problem::new(
                StatusCode::CONFLICT,
                "not_final",
                format!("event {id:?} is still being applied: wait until it is final"),
            )),
            Requeue::NeedsForce { state } => Err(Problem::new(
                StatusCode::CONFLICT,
                "already_applied",
                format!(
                    "event {id:?} is {state}: replaying it applies it again; to do that, replay with force (POST /v1/events/{{id}}/replay?force=true, or ess-agent replay --force)"
                ),
            )),
            Requeue::RouteNeedsForce { state } => Err(Problem::new(
                StatusCode::CONFLICT,
                "already_applied",
                format!(
                    "event {id:?} is {state} through route {:?}: replaying it there applies it again; to do that, replay with force (POST /v1/events/{{id}}/replay?force=true, or ess-agent replay --route NAME --force)",
                    only.unwrap_or_default()
                ),
            )),
            Requeue::OthersUntried { routes } => Err(Problem::new(
                StatusCode::CONFLICT,
                "other_routes_untried",
                format!(
                    "event {id:?} was never tried through route(s) {}, which take it now: a replay \
                     through route {:?} alone would apply them too; replay it without a route",
                    routes.join(", "),
                    only.unwrap_or_default()
                ),
            )),
        }
    }

    /// The replay through route `name` of event `id`: the route must exist and take the event.
    async fn route_replay(&self, id: &str, name: &str) -> Result<RouteReplay, Problem> {
        let journal = self.journal.clone();
        let lookup = id.to_owned();
        let record = blocking(move || journal.get(&lookup))
            .await?
            .ok_or_else(|| unknown_event(id))?;
        let routing = self.dispatcher.routing();
        if !routing.routes.iter().any(|r| r.name == name) {
            let names: Vec<&str> = routing.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!(
                    "there is no route {name:?}: the routes are {}",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        let matching = routing.matching(&record.event_type, record.version);
        if !matching.iter().any(|r| r.name == name) {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "route_does_not_take_event",
                format!(
                    "route {name:?} does not take type {:?} version {}, so it cannot apply event \
                     {id:?}: check the route's types and versions",
                    record.event_type, record.version
                ),
            ));
        }
        Ok(RouteReplay {
            route: name.to_owned(),
            others: matching
                .iter()
                .filter(|r| r.name != name)
                .map(|r| r.name.clone())
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_query_is_read_or_refused_naming_the_parameter() {
        let (filter, cursor, limit) = listing(
            "state=failed,parked&type=rule.*&subject=a%20b&since=2026-12-07T10:00:00%2B01:00&limit=7&cursor=42",
        )
        .unwrap();
        assert_eq!(filter.states, [EventState::Failed, EventState::Parked]);
        assert_eq!(filter.event_type.as_deref(), Some("rule.*"));
        assert_eq!(filter.subject.as_deref(), Some("a b"));
        assert_eq!(filter.since.as_deref(), Some("2026-12-07T09:00:00.000Z"));
        assert_eq!((cursor, limit), (Some(42), 7));
        assert_eq!(listing("").unwrap().2, DEFAULT_LIMIT);
        for (query, named) in [
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=x", "limit"),
            ("cursor=-3", "cursor"),
            ("state=done", "state"),
            ("since=yesterday", "since"),
            ("until=2026-13-01T00:00:00Z", "until"),
            ("subject=", "subject"),
            ("sate=failed", "sate"),
            ("type=a&type=b", "type"),
        ] {
            let detail = listing(query).unwrap_err().detail;
            assert!(detail.contains(named), "{query}: {detail}");
        }
    }
}
