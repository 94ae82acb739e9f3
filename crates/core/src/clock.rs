//! Where the engine gets the time: seal times, retention and gc all read this clock, so tests
//! can move time instead of sleeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    pub fn new(at: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
    pub fn set(&self, at: SystemTime) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A clock read from a file holding an RFC 3339 instant (the system clock while the file is
/// missing or empty). Lets end-to-end tests and retention drills move a running process's time
/// without sleeping; the binary uses it when `ARTIFACTFS_CLOCK_FILE` names such a file.
#[derive(Clone, Debug)]
pub struct FileClock(std::path::PathBuf);

impl FileClock {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self(path.into())
    }
}

impl Clock for FileClock {
    fn now(&self) -> SystemTime {
        match std::fs::read_to_string(&self.0) {
            Ok(s) if !s.trim().is_empty() => match humantime::parse_rfc3339_weak(s.trim()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(
                        "clock file {}: {e}; using the system clock",
                        self.0.display()
                    );
                    SystemTime::now()
                }
            },
            _ => SystemTime::now(),
        }
    }
}

/// Nanoseconds since the Unix epoch (negative before it).
pub fn to_unix_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

/// The inverse of [`to_unix_ns`].
pub fn from_unix_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// RFC 3339 in UTC with second precision, e.g. `2026-11-29T10:00:00Z`. Times before 1970
/// (a file's mtime may be one) are written the same way; `humantime` formats only later ones.
pub fn rfc3339(t: SystemTime) -> String {
    if t >= UNIX_EPOCH {
        return humantime::format_rfc3339_seconds(t).to_string();
    }
    // Whole seconds, rounded down (towards the past) as for times after 1970.
    let ns = to_unix_ns(t);
    let secs = ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod rfc3339_tests {
    use super::*;

    #[test]
    fn times_before_1970_are_formatted_not_a_panic() {
        let at = |ns: i64| rfc3339(from_unix_ns(ns));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(-1), "1969-12-31T23:59:59Z");
        assert_eq!(at(-1_000_000_000), "1969-12-31T23:59:59Z");
        // 1960-01-01T00:00:00.25Z
        assert_eq!(
            at(-315_619_200_000_000_000 + 250_000_000),
            "1960-01-01T00:00:00Z"
        );
        assert_eq!(at(-2_208_988_800_000_000_000), "1900-01-01T00:00:00Z");
        // 1904 was a leap year, 1900 was not.
        assert_eq!(at(-2_077_747_200_000_000_000), "1904-02-29T00:00:00Z");
        assert_eq!(at(-2_203_891_200_000_000_000), "1900-03-01T00:00:00Z");
        // The earliest time an i64 of nanoseconds holds.
        assert_eq!(at(i64::MIN), "1677-09-21T00:12:43Z");
    }
}
