//! Retention and holds: what a run's `user.retain` value means, and the rules for changing it.
//!
//! A retention is a duration counted from the seal (`90d`, `12h`, `2w`, `1y`, humantime syntax),
//! a point in time (RFC 3339, or a plain `YYYY-MM-DD` meaning midnight UTC), or `forever`.
//! It yields a *retain-until* instant once the run is sealed (at once for a date or `forever`).
//!
//! Rules (compliance by default, as S3 Object Lock):
//! - a run without retention is kept until one is set; the first value set is accepted as given;
//! - afterwards a new value must not retain the run for less time than the current one
//!   ([`check_extension`]); only an operator override (CLI, with a reason, recorded as an event)
//!   may shorten it;
//! - a run is eligible for deletion when it is sealed, its retain-until has passed and it has no
//!   holds ([`eligible`]).
//!
//! This module only parses and decides; the index stores and the store applies.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::clock::{from_unix_ns, rfc3339, to_unix_ns};
use crate::error::{Error, Result};

/// The longest retention accepted, as a duration or as a date from now (about 100 years).
pub const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 86_400 + 25 * 86_400);
/// The largest xattr value accepted for `user.retain` and hold reasons.
pub const MAX_VALUE_LEN: usize = 1024;
/// The longest hold name.
pub const MAX_HOLD_NAME: usize = 64;
/// `retain_until` of a run retained forever.
pub const FOREVER_NS: i64 = i64::MAX;

const ACCEPTED: &str = "a duration such as 90d, 12h, 2w or 1y; an RFC 3339 date such as \
                        2027-06-30 or 2027-06-30T12:00:00Z; or forever";

/// A parsed retention value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Kept for this long after the seal.
    For(Duration),
    /// Kept until this instant (nanoseconds since the Unix epoch).
    Until(i64),
    /// Never eligible for deletion.
    Forever,
}

impl Retention {
    /// Parses a retention value as a user writes it. `now_ns` bounds dates: a date must lie in
    /// the future and within [`MAX_RETENTION`] of now.
    pub fn parse(text: &str, now_ns: i64) -> Result<Self> {
        let bad = |why: String| Error::invalid("retention", format!("{why}; accepted: {ACCEPTED}"));
        if text.len() > MAX_VALUE_LEN {
            return Err(bad(format!("value is {} bytes long", text.len())));
        }
        let t = text.trim();
        if t.is_empty() {
            return Err(bad("value is empty".into()));
        }
        if t.eq_ignore_ascii_case("forever") {
            return Ok(Self::Forever);
        }
        if t.starts_with('-') {
            return Err(bad(format!("{t:?} is negative")));
        }
        if let Ok(d) = humantime::parse_duration(t) {
            if d.is_zero() {
                return Err(bad(format!("{t:?} is zero")));
            }
            if d > MAX_RETENTION {
                return Err(bad(format!("{t:?} is longer than 100 years")));
            }
            return Ok(Self::For(d));
        }
        let Some(at_ns) = parse_date(t) else {
            return Err(bad(format!("{t:?} is neither a duration nor a date")));
        };
        if at_ns <= now_ns {
            return Err(bad(format!("{t} is not in the future")));
        }
        if at_ns.saturating_sub(now_ns) as u128 > MAX_RETENTION.as_nanos() {
            return Err(bad(format!("{t} is more than 100 years away")));
        }
        Ok(Self::Until(at_ns))
    }

    /// The retain-until instant of a run sealed at `sealed_at_ns` (`None` while it is open and
    /// the retention counts from the seal).
    pub fn until(&self, sealed_at_ns: Option<i64>) -> Option<i64> {
        match *self {
            Self::For(d) => {
                sealed_at_ns.map(|s| s.saturating_add(d.as_nanos().min(i64::MAX as u128) as i64))
            }
            Self::Until(t) => Some(t),
            Self::Forever => Some(FOREVER_NS),
        }
    }

    /// The duration part, for storage (`retain_for_ns`).
    pub fn for_ns(&self) -> Option<i64> {
        match *self {
            Self::For(d) => Some(d.as_nanos().min(i64::MAX as u128) as i64),
            _ => None,
        }
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::For(d) => write!(f, "{}", humantime::format_duration(*d)),
            Self::Until(t) => f.write_str(&rfc3339(from_unix_ns(*t))),
            Self::Forever => f.write_str("forever"),
        }
    }
}

/// Parses `YYYY-MM-DD` (midnight UTC) or an RFC 3339 date-time with `Z` or a `±HH:MM`
/// offset, to nanoseconds since the Unix epoch.
fn parse_date(t: &str) -> Option<i64> {
    if t.len() == 10 && t.as_bytes().get(4) == Some(&b'-') {
        return humantime::parse_rfc3339(&format!("{t}T00:00:00Z"))
            .ok()
            .map(to_unix_ns);
    }
    let b = t.as_bytes();
    if b.len() > 6 && matches!(b[b.len() - 6], b'+' | b'-') && b[b.len() - 3] == b':' {
        let (local, off) = t.split_at(t.len() - 6);
        let hh: i64 = off[1..3].parse().ok()?;
        let mm: i64 = off[4..6].parse().ok()?;
        if hh > 23 || mm > 59 {
            return None;
        }
        let secs = (hh * 3600 + mm * 60) * if off.starts_with('-') { -1 } else { 1 };
        let at = humantime::parse_rfc3339_weak(local).ok()?;
        return Some(to_unix_ns(at) - secs * 1_000_000_000);
    }
    humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
        .ok()
        .map(to_unix_ns)
}

/// A run's retention as recorded: the value as set, and what it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionState {
    /// The value as the user set it (`None`: no retention).
    pub spec: Option<String>,
    /// The duration from the seal, when the value is one.
    pub for_ns: Option<i64>,
    /// Retain-until, once known.
    pub until_ns: Option<i64>,
}

impl RetentionState {
    /// The instant the run is retained until, counting an open run as if it sealed at `now_ns`
    /// (the earliest it can seal), for comparisons.
    pub fn effective_until(&self, now_ns: i64) -> Option<i64> {
        self.until_ns
            .or_else(|| self.for_ns.map(|d| now_ns.saturating_add(d)))
    }
}

/// Formats a retain-until instant (`forever` for [`FOREVER_NS`]).
pub fn format_until(ns: i64) -> String {
    if ns == FOREVER_NS {
        "forever".into()
    } else {
        rfc3339(from_unix_ns(ns))
    }
}

/// Refuses `new` when it retains a run for less time than `current` (compliance mode).
/// `sealed_at_ns` is `None` for an open run; durations of an open run compare as durations.
pub fn check_extension(
    current: &RetentionState,
    new: &Retention,
    sealed_at_ns: Option<i64>,
    now_ns: i64,
) -> Result<()> {
    if current.spec.is_none() {
        return Ok(());
    }
    let shorter = match (sealed_at_ns, current.for_ns, new) {
        // Both count from the same (future) seal.
        (None, Some(cur), Retention::For(d)) => (d.as_nanos().min(i64::MAX as u128) as i64) < cur,
        _ => {
            let cur = current.effective_until(now_ns).unwrap_or(i64::MIN);
            let sealed = sealed_at_ns.unwrap_or(now_ns);
            new.until(Some(sealed)).unwrap_or(i64::MIN) < cur
        }
    };
    if shorter {
        let cur = match (current.until_ns, current.for_ns) {
            (Some(u), _) => format!("retained until {}", format_until(u)),
            (None, Some(d)) => format!(
                "retained for {} after its seal",
                humantime::format_duration(Duration::from_nanos(d as u64))
            ),
            _ => "retained".into(),
        };
        return Err(Error::NotPermitted(format!(
            "retention may only be extended: the run is {cur} ({}); an operator can shorten it \
             with `artifactfs retain RUN VALUE --override --reason TEXT`",
            current.spec.as_deref().unwrap_or("")
        )));
    }
    Ok(())
}

/// Validates a hold name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_hold_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOLD_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "hold name",
            format!(
                "{name:?}: use 1 to {MAX_HOLD_NAME} letters, digits, '.', '_' or '-', \
                 starting with a letter or digit"
            ),
        ))
    }
}

/// Validates a hold reason (UTF-8, at most [`MAX_VALUE_LEN`] bytes).
pub fn validate_hold_reason(reason: &[u8]) -> Result<String> {
    if reason.len() > MAX_VALUE_LEN {
        return Err(Error::invalid(
            "hold reason",
            format!(
                "{} bytes long; at most {MAX_VALUE_LEN} are accepted",
                reason.len()
            ),
        ));
    }
    String::from_utf8(reason.to_vec())
        .map_err(|_| Error::invalid("hold reason", "is not UTF-8 text"))
}

/// Whether a run may be deleted now: sealed, retain-until passed, no holds.
pub fn eligible(state: &str, until_ns: Option<i64>, holds: usize, now_ns: i64) -> bool {
    state == "sealed" && holds == 0 && until_ns.is_some_and(|u| u != FOREVER_NS && u <= now_ns)
}

/// The current time of a clock in nanoseconds.
pub fn now_ns(t: SystemTime) -> i64 {
    to_unix_ns(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400 * 1_000_000_000;
    // 2026-11-29T00:00:00Z
    const NOW: i64 = 1_795_910_400 * 1_000_000_000;

    #[test]
    fn valid_values() {
        let cases: &[(&str, Retention)] = &[
            ("90d", Retention::For(Duration::from_secs(90 * 86_400))),
            ("12h", Retention::For(Duration::from_secs(12 * 3600))),
            ("2w", Retention::For(Duration::from_secs(14 * 86_400))),
            ("1y", Retention::For(Duration::from_secs(31_557_600))),
            (" 30d ", Retention::For(Duration::from_secs(30 * 86_400))),
            (
                "1y 6months",
                Retention::For(Duration::from_secs(31_557_600 + 6 * 2_630_016)),
            ),
            ("forever", Retention::Forever),
            ("FOREVER", Retention::Forever),
            ("2027-06-30", Retention::Until(NOW + 213 * DAY)),
            ("2027-06-30T00:00:00Z", Retention::Until(NOW + 213 * DAY)),
            (
                "2027-06-30T02:00:00+02:00",
                Retention::Until(NOW + 213 * DAY),
            ),
            (
                "2027-06-29T19:00:00-05:00",
                Retention::Until(NOW + 213 * DAY),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Retention::parse(text, NOW).unwrap(), *want, "{text}");
        }
    }

    #[test]
    fn invalid_values() {
        for text in [
            "banana",
            "",
            "   ",
            "-5d",
            "0d",
            "0s",
            "101y",
            "99999999999999d",
            "2020-01-01",
            "2026-11-29",
            "2200-01-01",
            "90 days please",
            "2027-13-01",
            &"9".repeat(2000),
        ] {
            let e = Retention::parse(text, NOW).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{text}: {e}");
            assert!(e.to_string().contains("accepted"), "{e}");
        }
    }

    #[test]
    fn until_counts_from_the_seal() {
        let r = Retention::parse("10d", NOW).unwrap();
        assert_eq!(r.until(None), None);
        assert_eq!(r.until(Some(NOW)), Some(NOW + 10 * DAY));
        assert_eq!(Retention::Forever.until(None), Some(FOREVER_NS));
    }

    fn state(spec: &str, sealed: Option<i64>) -> RetentionState {
        let r = Retention::parse(spec, NOW).unwrap();
        RetentionState {
            spec: Some(spec.into()),
            for_ns: r.for_ns(),
            until_ns: r.until(sealed),
        }
    }

    #[test]
    fn extend_allowed_shorten_refused() {
        let none = RetentionState {
            spec: None,
            for_ns: None,
            until_ns: None,
        };
        let p = |s| Retention::parse(s, NOW).unwrap();
        // The first value is accepted as given.
        check_extension(&none, &p("1h"), Some(NOW), NOW).unwrap();
        // Sealed run, 90 days from a seal 10 days ago.
        let sealed = NOW - 10 * DAY;
        let cur = state("90d", Some(sealed));
        check_extension(&cur, &p("90d"), Some(sealed), NOW).unwrap();
        check_extension(&cur, &p("1y"), Some(sealed), NOW).unwrap();
        check_extension(&cur, &p("forever"), Some(sealed), NOW).unwrap();
        check_extension(&cur, &p("2027-06-30"), Some(sealed), NOW).unwrap();
        let e = check_extension(&cur, &p("30d"), Some(sealed), NOW).unwrap_err();
        assert!(matches!(e, Error::NotPermitted(_)), "{e}");
        assert!(e.to_string().contains("retained until"), "{e}");
        check_extension(&cur, &p("2027-01-01"), Some(sealed), NOW).unwrap_err();
        // Forever cannot be shortened.
        let cur = state("forever", Some(sealed));
        check_extension(&cur, &p("100y"), Some(sealed), NOW).unwrap_err();
        // Open run: durations compare as durations.
        let cur = state("30d", None);
        check_extension(&cur, &p("31d"), None, NOW).unwrap();
        check_extension(&cur, &p("29d"), None, NOW).unwrap_err();
        check_extension(&cur, &p("2026-12-01"), None, NOW).unwrap_err();
    }

    #[test]
    fn hold_names() {
        for ok in ["legal", "case-123", "a", "A.b_c-9", &"x".repeat(64)] {
            validate_hold_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "ä", &"x".repeat(65), "a\0"] {
            assert!(validate_hold_name(bad).is_err(), "{bad:?}");
        }
        validate_hold_reason(b"court order 17").unwrap();
        assert!(validate_hold_reason(&[0xff, 0xfe]).is_err());
        assert!(validate_hold_reason(&[b'a'; 1025]).is_err());
    }

    #[test]
    fn eligibility() {
        assert!(eligible("sealed", Some(NOW - 1), 0, NOW));
        assert!(eligible("sealed", Some(NOW), 0, NOW));
        assert!(!eligible("sealed", Some(NOW + 1), 0, NOW));
        assert!(!eligible("sealed", Some(NOW - 1), 1, NOW));
        assert!(!eligible("open", Some(NOW - 1), 0, NOW));
        assert!(!eligible("sealed", None, 0, NOW));
        assert!(!eligible("sealed", Some(FOREVER_NS), 0, i64::MAX));
    }
}
