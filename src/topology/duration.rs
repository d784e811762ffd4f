//! Humane durations for the topology YAML: `7d`, `24h`, `30m`, `1d12h`, `forever`.
//!
//! Written here rather than pulled in as a crate: the grammar is five units and the formatter
//! must print back exactly what an operator would write, so plans read like the YAML.

use std::time::Duration;

use thiserror::Error;

/// The word for "keep records without limit".
pub const FOREVER: &str = "forever";

/// A duration string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("duration `{value}`: {message} (write e.g. `7d`, `24h`, `30m`, `1d12h` or `forever`)")]
pub struct DurationError {
    pub value: String,
    pub message: String,
}

const UNITS: [(&str, u64); 6] = [
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parses a humane duration; `forever` is `None`. Zero is refused: a topic keeping nothing is
/// a typo, not a wish.
pub fn parse_duration(value: &str) -> Result<Option<Duration>, DurationError> {
    let err = |message: &str| DurationError {
        value: value.to_owned(),
        message: message.to_owned(),
    };
    let s = value.trim();
    if s.eq_ignore_ascii_case(FOREVER) {
        return Ok(None);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, ms)| *ms)
            .ok_or_else(|| {
                if unit.is_empty() {
                    err("missing unit (w, d, h, m, s or ms)")
                } else {
                    err(&format!("unknown unit `{unit}` (w, d, h, m, s or ms)"))
                }
            })?;
        total_ms = number
            .checked_mul(factor)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| err("too large"))?;
    }
    if total_ms == 0 {
        return Err(err("must be more than zero"));
    }
    // JetStream keeps a stream's age limit in signed nanoseconds (about 292 years); a longer
    // one would wrap there and never read back as written. Longer means `forever`.
    if u128::from(total_ms) * 1_000_000 > i64::MAX as u128 {
        return Err(err("too large (at most about 292 years; write `forever`)"));
    }
    Ok(Some(Duration::from_millis(total_ms)))
}

/// Formats a duration the way the YAML writes it: days, hours, minutes, seconds, milliseconds.
/// Weeks are shown as days and anything under two days in hours (`24h`, `36h`), which is how
/// retention is usually spoken of.
pub fn format_duration(duration: Option<Duration>) -> String {
    let Some(duration) = duration else {
        return FOREVER.to_owned();
    };
    let mut ms = duration.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let two_days = 2 * 86_400_000;
    for (name, factor) in UNITS.iter().skip(1) {
        if *name == "d" && ms < two_days {
            continue;
        }
        let factor = u128::from(*factor);
        if ms >= factor {
            out.push_str(&format!("{}{name}", ms / factor));
            ms %= factor;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        let h = |n: u64| Some(Duration::from_secs(n * 3600));
        assert_eq!(parse_duration("7d").unwrap(), h(7 * 24));
        assert_eq!(parse_duration("24h").unwrap(), h(24));
        assert_eq!(parse_duration("1w").unwrap(), h(7 * 24));
        assert_eq!(parse_duration("1d12h").unwrap(), h(36));
        assert_eq!(
            parse_duration("30m").unwrap(),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            parse_duration("250ms").unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("forever").unwrap(), None);
    }

    #[test]
    fn refuses_what_a_broker_cannot_keep() {
        assert!(parse_duration("0h").is_err());
        assert!(parse_duration("100000d").is_ok());
        let e = parse_duration("200000d").unwrap_err();
        assert!(e.message.contains("forever"), "{e}");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "7",
            "d",
            "7x",
            "0d",
            "-1d",
            "7 d",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should not parse");
        }
        let e = parse_duration("7x").unwrap_err();
        assert!(e.to_string().contains("unknown unit `x`"), "{e}");
    }

    #[test]
    fn formats_back() {
        for s in [
            "7d", "2d12h", "24h", "36h", "30m", "1h30m15s", "250ms", "forever",
        ] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(parse_duration("1w").unwrap()), "7d");
        assert_eq!(format_duration(parse_duration("1d").unwrap()), "24h");
    }
}
