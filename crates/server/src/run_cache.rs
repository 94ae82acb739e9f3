//! Answers of `GET /v1/runs/NS/RUN`, kept while nothing has been committed since (ADR 0022).
//!
//! A run's details change only by a commit of the index, or by the clock when a sealed run's
//! retention runs out. So an answer is kept with the commit generation
//! ([`artifactfs_core::index::commit_generation`]) read before its read transaction began, and
//! with the moment the clock would change it; it is served again only while the generation is
//! the same and that moment has not come. A commit made after the generation was read makes
//! the answer stale, but it also moves the generation, so the stale answer is never served: no
//! answer is older than the last commit that had returned when its request came in.

use std::collections::HashMap;
use std::sync::Mutex;

use artifactfs_core::RunRef;
use axum::body::Bytes;

/// Answers kept at most; the whole table is dropped when it is full (every commit drops it
/// anyway, so it only fills with many runs read between two commits).
const CAPACITY: usize = 4096;

struct Answer {
    /// The store's time the answer was made at.
    at_ns: i64,
    /// When the clock alone makes it wrong.
    until_ns: Option<i64>,
    body: Bytes,
}

#[derive(Default)]
struct Table {
    generation: u64,
    answers: HashMap<RunRef, Answer>,
}

/// The kept answers, by run.
#[derive(Default)]
pub(crate) struct RunInfoCache(Mutex<Table>);

impl RunInfoCache {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `run` if one made at `generation` is kept and still true at `now_ns`.
    pub fn get(&self, run: &RunRef, generation: u64, now_ns: i64) -> Option<Bytes> {
        let mut t = self.table();
        if t.generation != generation {
            if generation > t.generation {
                t.answers.clear();
                t.generation = generation;
            }
            return None;
        }
        let a = t.answers.get(run)?;
        let current = now_ns >= a.at_ns && a.until_ns.is_none_or(|u| now_ns < u);
        current.then(|| a.body.clone())
    }

    /// Keeps `body`, the answer for `run` read after `generation` was current, made at `at_ns`
    /// and true until `until_ns` by the clock. An answer of an older generation than the
    /// table's is not kept.
    pub fn put(
        &self,
        run: RunRef,
        generation: u64,
        at_ns: i64,
        until_ns: Option<i64>,
        body: Bytes,
    ) {
        let mut t = self.table();
        if generation < t.generation {
            return;
        }
        if generation > t.generation {
            t.answers.clear();
            t.generation = generation;
        }
        if t.answers.len() >= CAPACITY {
            t.answers.clear();
        }
        t.answers.insert(
            run,
            Answer {
                at_ns,
                until_ns,
                body,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str) -> RunRef {
        RunRef::new("ns", name).unwrap()
    }

    #[test]
    fn an_answer_is_served_only_in_its_generation() {
        let c = RunInfoCache::default();
        assert_eq!(c.get(&run("a"), 5, 100), None);
        c.put(run("a"), 5, 100, None, Bytes::from_static(b"A5"));
        assert_eq!(c.get(&run("a"), 5, 200).as_deref(), Some(&b"A5"[..]));
        assert_eq!(c.get(&run("b"), 5, 200), None);
        // A commit: the generation moves, the answer is gone for good.
        assert_eq!(c.get(&run("a"), 6, 200), None);
        assert_eq!(c.get(&run("a"), 5, 200), None);
        // An answer read before that commit comes too late to be kept.
        c.put(run("a"), 5, 100, None, Bytes::from_static(b"A5"));
        assert_eq!(c.get(&run("a"), 6, 200), None);
        c.put(run("a"), 6, 200, None, Bytes::from_static(b"A6"));
        assert_eq!(c.get(&run("a"), 6, 300).as_deref(), Some(&b"A6"[..]));
        // A request that read an older generation is answered afresh and drops nothing.
        assert_eq!(c.get(&run("a"), 5, 300), None);
        assert_eq!(c.get(&run("a"), 6, 300).as_deref(), Some(&b"A6"[..]));
    }

    #[test]
    fn an_answer_expires_when_the_clock_changes_it() {
        let c = RunInfoCache::default();
        c.put(
            run("a"),
            1,
            1_000,
            Some(2_000),
            Bytes::from_static(b"not yet eligible"),
        );
        assert!(c.get(&run("a"), 1, 1_999).is_some());
        assert_eq!(c.get(&run("a"), 1, 2_000), None);
        // A clock set back before the answer was made does not get it either.
        assert_eq!(c.get(&run("a"), 1, 999), None);
    }

    #[test]
    fn a_full_table_starts_again() {
        let c = RunInfoCache::default();
        for i in 0..CAPACITY {
            c.put(run(&format!("r{i}")), 1, 0, None, Bytes::from_static(b"x"));
        }
        assert!(c.get(&run("r0"), 1, 0).is_some());
        c.put(run("last"), 1, 0, None, Bytes::from_static(b"y"));
        assert_eq!(c.get(&run("r0"), 1, 0), None);
        assert!(c.get(&run("last"), 1, 0).is_some());
    }
}
