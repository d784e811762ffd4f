//! Which event times the conversation role takes, and how far ahead of this pod's clock it
//! believes them. Events come from edges, from this role, and from anyone who can write to
//! the topics (the ingest endpoint, foreign producers): an `occurred_at` is another clock's
//! word, and the role derives due times and waits from it.
//!
//! - A time before [`EARLIEST_MS`] or more than [`MAX_AHEAD_MS`] ahead is no clock's: a broken
//!   or forged event. The role dead-letters it (`bad_time`) and the ingest endpoint refuses it
//!   (400 `OCCURRED_AT_OUT_OF_RANGE`), by the same [`check`]: whatever was derived from it
//!   (timers, the offer wait, the transcript's times) would be wrong, or overflow.
//! - A time within the range but ahead of this clock by more than [`CLOCK_SKEW_MS`] (a clock
//!   set wrong by minutes or hours) is applied, but counts as only that far ahead where it sets
//!   a deadline or a wait ([`believable`]): a wrong clock must not postpone a timer or hold a
//!   conversation's lane until its date.

use std::fmt;

/// 2000-01-01T00:00:00Z: every event of this system is younger.
pub const EARLIEST_MS: i64 = 946_684_800_000;
/// A day: the most an event's time may be ahead of the clock that checks it.
pub const MAX_AHEAD_MS: i64 = 86_400_000;
/// How far ahead of this pod's clock another pod's time is taken at its word. Clocks of pods
/// (NTP) agree to well within it, so normal events never meet it.
pub const CLOCK_SKEW_MS: i64 = 60_000;

/// Why an event time is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfRange {
    TooEarly { at_ms: i64 },
    TooFarAhead { at_ms: i64, now_ms: i64 },
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooEarly { at_ms } => write!(
                f,
                "occurred_at {at_ms} ms is before 2000-01-01T00:00:00Z ({EARLIEST_MS} ms)"
            ),
            Self::TooFarAhead { at_ms, now_ms } => write!(
                f,
                "occurred_at {at_ms} ms is more than a day ({MAX_AHEAD_MS} ms) ahead of now ({now_ms} ms)"
            ),
        }
    }
}

/// Whether `at_ms` is a time some clock could have given at `now_ms`.
pub fn check(at_ms: i64, now_ms: i64) -> Result<(), OutOfRange> {
    if at_ms < EARLIEST_MS {
        return Err(OutOfRange::TooEarly { at_ms });
    }
    if at_ms > now_ms.saturating_add(MAX_AHEAD_MS) {
        return Err(OutOfRange::TooFarAhead { at_ms, now_ms });
    }
    Ok(())
}

/// `at_ms` for a due time or a wait: no further ahead of `now_ms` than [`CLOCK_SKEW_MS`].
/// Taken once and stored (a last activity, a deadline), it stays put; only the part of a
/// wrong clock's lead beyond the skew is dropped.
pub fn believable(at_ms: i64, now_ms: i64) -> i64 {
    at_ms.min(now_ms.saturating_add(CLOCK_SKEW_MS))
}

/// How long ago `at_ms` was at `now_ms`, if that can be told: `None` for a time ahead by more
/// than [`CLOCK_SKEW_MS`] (a wait "while the event is young" would last until its date).
/// Saturates for times far in the past.
pub fn age(at_ms: i64, now_ms: i64) -> Option<i64> {
    let age = now_ms.saturating_sub(at_ms);
    (age >= -CLOCK_SKEW_MS).then_some(age)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn the_range_takes_normal_times_and_refuses_absurd_ones() {
        for at in [EARLIEST_MS, NOW - 86_400_000, NOW, NOW + MAX_AHEAD_MS] {
            assert_eq!(check(at, NOW), Ok(()), "{at}");
        }
        for at in [i64::MIN, -1, 0, EARLIEST_MS - 1] {
            assert_eq!(check(at, NOW), Err(OutOfRange::TooEarly { at_ms: at }));
        }
        for at in [NOW + MAX_AHEAD_MS + 1, i64::MAX] {
            assert_eq!(
                check(at, NOW),
                Err(OutOfRange::TooFarAhead {
                    at_ms: at,
                    now_ms: NOW
                })
            );
        }
        // A clock at the end of time refuses nothing ahead, and does not overflow.
        assert_eq!(check(i64::MAX, i64::MAX), Ok(()));
    }

    #[test]
    fn only_the_lead_beyond_the_skew_is_dropped() {
        assert_eq!(believable(NOW - 5, NOW), NOW - 5);
        assert_eq!(believable(NOW + 5, NOW), NOW + 5);
        assert_eq!(believable(i64::MAX, NOW), NOW + CLOCK_SKEW_MS);
        assert_eq!(believable(i64::MIN, NOW), i64::MIN);
        assert_eq!(believable(i64::MAX, i64::MAX), i64::MAX);
    }

    #[test]
    fn an_age_saturates_and_is_unknown_far_ahead() {
        assert_eq!(age(NOW - 1_000, NOW), Some(1_000));
        assert_eq!(age(NOW + CLOCK_SKEW_MS, NOW), Some(-CLOCK_SKEW_MS));
        assert_eq!(age(NOW + CLOCK_SKEW_MS + 1, NOW), None);
        assert_eq!(age(i64::MAX, NOW), None);
        assert_eq!(age(i64::MIN, NOW), Some(i64::MAX));
    }
}
