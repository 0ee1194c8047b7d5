//! The one way the agent writes a point in time: RFC 3339 in UTC with exactly three digits of
//! milliseconds, e.g. `2026-12-07T05:20:07.490Z` (never `07.49Z` or a bare `07Z`). The journal,
//! the admin API, status reports to the hub and log lines all use it. A fixed width is easier to
//! read in a column and makes the text order the time order.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::FormatItem;
use time::macros::format_description;

const FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// `at` in UTC, milliseconds truncated.
pub fn format(at: OffsetDateTime) -> String {
    // The format cannot fail for a UTC time within years 0..=9999, the only ones the clock and
    // the journal give; anything else is written by time's own RFC 3339 rather than lost.
    let at = at.to_offset(time::UtcOffset::UTC);
    at.format(FORMAT)
        .or_else(|_| at.format(&time::format_description::well_known::Rfc3339))
        .unwrap_or_default()
}

/// [`format`] of a [`SystemTime`].
pub fn format_system(at: SystemTime) -> String {
    format(OffsetDateTime::from(at))
}

/// [`format`] of the current time.
pub fn now() -> String {
    format(OffsetDateTime::now_utc())
}

/// The timestamp of log lines, text and JSON: [`now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LogTimer;

impl tracing_subscriber::fmt::time::FormatTime for LogTimer {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        w.write_str(&now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_always_have_three_digits() {
        let at = |ms: u16| {
            time::macros::datetime!(2026-12-07 05:20:07 UTC)
                .replace_millisecond(ms)
                .unwrap()
        };
        assert_eq!(format(at(0)), "2026-12-07T05:20:07.000Z");
        assert_eq!(format(at(490)), "2026-12-07T05:20:07.490Z");
        assert_eq!(format(at(999)), "2026-12-07T05:20:07.999Z");
        // Sub-millisecond digits are cut, not rounded up into the next second.
        let late = at(999).replace_nanosecond(999_999_999).unwrap();
        assert_eq!(format(late), "2026-12-07T05:20:07.999Z");
        // Another offset is written as the same instant in UTC.
        let east = at(490).to_offset(time::macros::offset!(+02:00));
        assert_eq!(format(east), "2026-12-07T05:20:07.490Z");
        assert_eq!(
            format_system(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        // Fixed width: the text order is the time order.
        assert!(format(at(0)) < format(at(490)) && format(at(490)) < format(at(999)));
    }
}
