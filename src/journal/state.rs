//! The lifecycle states of an event and of its deliveries: enums the compiler checks, written
//! to the journal's TEXT columns and the JSON answers as the words [`EventState::as_str`] and
//! [`DeliveryState::as_str`] give.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::Serialize;

/// The state of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    /// Durably recorded, not yet in a final state (the backlog).
    Accepted,
    /// Applied to every route's sink (routes whose adapter filtered it count as done).
    Applied,
    /// Every matching route's adapter returned `undefined`: nothing to apply.
    Filtered,
    /// Not applied: a higher revision of its subject was applied before it.
    Superseded,
    /// A dead letter: an adapter or sink failed permanently, or retries ran out.
    Failed,
    /// A dead letter: no route matched.
    Parked,
    /// A dead letter the operator dropped. The id stays known for the retention period, so a
    /// redelivery is a duplicate.
    Dropped,
}

impl EventState {
    /// The word stored in the journal and shown in answers.
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Accepted => "accepted",
            EventState::Applied => "applied",
            EventState::Filtered => "filtered",
            EventState::Superseded => "superseded",
            EventState::Failed => "failed",
            EventState::Parked => "parked",
            EventState::Dropped => "dropped",
        }
    }

    /// True for the states an event does not leave without an operator's replay.
    pub fn is_final(self) -> bool {
        match self {
            EventState::Accepted => false,
            EventState::Applied
            | EventState::Filtered
            | EventState::Superseded
            | EventState::Failed
            | EventState::Parked
            | EventState::Dropped => true,
        }
    }

    /// True for a dead letter: failed or parked (waiting for the operator) or dropped.
    pub fn is_dead_letter(self) -> bool {
        match self {
            EventState::Failed | EventState::Parked | EventState::Dropped => true,
            EventState::Accepted
            | EventState::Applied
            | EventState::Filtered
            | EventState::Superseded => false,
        }
    }

    /// The status word the hub is told for a final state (PROTOCOL.md §2): `applied` (also
    /// for filtered), `superseded`, or `failed` (dead letters); `None` while not final.
    pub fn status_word(self) -> Option<&'static str> {
        match self {
            EventState::Applied | EventState::Filtered => Some("applied"),
            EventState::Superseded => Some("superseded"),
            EventState::Failed | EventState::Parked | EventState::Dropped => Some("failed"),
            EventState::Accepted => None,
        }
    }
}

/// The state of one event's delivery through one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its (next) attempt.
    Pending,
    /// The sink took the output.
    Applied,
    /// The route's adapter returned `undefined`: nothing to apply.
    Filtered,
    /// Failed permanently, or retries ran out.
    Failed,
}

impl DeliveryState {
    /// The word stored in the journal and shown in answers.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Applied => "applied",
            DeliveryState::Filtered => "filtered",
            DeliveryState::Failed => "failed",
        }
    }
}

/// A state word the journal does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}: the journal was written by a newer ess-agent, or is damaged")]
pub struct UnknownState(pub String);

impl FromStr for EventState {
    type Err = UnknownState;

    fn from_str(text: &str) -> Result<Self, UnknownState> {
        Ok(match text {
            "accepted" => EventState::Accepted,
            "applied" => EventState::Applied,
            "filtered" => EventState::Filtered,
            "superseded" => EventState::Superseded,
            "failed" => EventState::Failed,
            "parked" => EventState::Parked,
            "dropped" => EventState::Dropped,
            other => return Err(UnknownState(other.to_owned())),
        })
    }
}

impl FromStr for DeliveryState {
    type Err = UnknownState;

    fn from_str(text: &str) -> Result<Self, UnknownState> {
        Ok(match text {
            "pending" => DeliveryState::Pending,
            "applied" => DeliveryState::Applied,
            "filtered" => DeliveryState::Filtered,
            "failed" => DeliveryState::Failed,
            other => return Err(UnknownState(other.to_owned())),
        })
    }
}

macro_rules! text_column {
    ($state:ty) => {
        impl fmt::Display for $state {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $state {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl ToSql for $state {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $state {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e: UnknownState| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

text_column!(EventState);
text_column!(DeliveryState);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_word() {
        use EventState::*;
        for state in [
            Accepted, Applied, Filtered, Superseded, Failed, Parked, Dropped,
        ] {
            assert_eq!(state.as_str().parse::<EventState>(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        use DeliveryState as D;
        for state in [D::Pending, D::Applied, D::Filtered, D::Failed] {
            assert_eq!(state.as_str().parse::<DeliveryState>(), Ok(state));
        }
        assert!("dead".parse::<EventState>().is_err());
    }
}
