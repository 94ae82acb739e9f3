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

/// RFC 3339 in UTC with second precision, e.g. `2026-11-29T10:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
