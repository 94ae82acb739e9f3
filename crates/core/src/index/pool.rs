//! Read-only connections to the index, pooled (ADR 0019).
//!
//! The store's one read-write connection ([`super::SharedIndex`]) serialises every user behind
//! one mutex, and may hold a deferred write transaction of the view's open (ADR 0018). Lookups
//! that only read committed state — a frontend's run, retention and metadata queries, the
//! location of a chunk being read, a chunk writer's dedup lookups — take a connection of this
//! pool instead: in WAL mode a reader neither waits for the writer nor blocks it, and each
//! read transaction sees everything committed before it began.
//!
//! Connections are opened read-only (`SQLITE_OPEN_READ_ONLY` and `query_only`), on first use,
//! at most [`ReadPool::capacity`] of them; a caller finding all in use waits for one. They are
//! kept open, so their statement caches (`prepare_cached`) and parsed schema stay warm: a
//! connection opened per use would parse the schema each time. A connection is never migrated:
//! one that finds a schema version other than this build's is refused, and [`ReadPool::get`]
//! fails with the reason. Nothing here writes.
//!
//! Because a caller may wait for a connection, a connection is held only for the queries of
//! one call and never while waiting for anything else (another connection, a channel, a lock
//! of the store's): then whoever holds one gives it back soon, and no wait can go round in a
//! circle.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, Index, SCHEMA_VERSION, STATEMENT_CACHE, SharedIndex, sql_err};
use crate::error::{Error, Result};

/// Read-only connections to one index file.
pub struct ReadPool {
    path: PathBuf,
    capacity: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Whether [`ReadPool::read_or`] has logged that it fell back to the shared connection.
    fell_back: AtomicBool,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Index>,
    /// Connections that exist, idle or lent.
    open: usize,
    /// Connections opened over the pool's life (a figure for tests and diagnostics).
    opened_total: u64,
}

/// A pooled read-only connection; it goes back to the pool when dropped.
pub struct PooledIndex<'a> {
    pool: &'a ReadPool,
    index: Option<Index>,
}

impl std::ops::Deref for PooledIndex<'_> {
    type Target = Index;
    fn deref(&self) -> &Index {
        self.index
            .as_ref()
            .expect("a lent connection is present until dropped")
    }
}

impl Drop for PooledIndex<'_> {
    fn drop(&mut self) {
        if let Some(index) = self.index.take() {
            self.pool.give_back(index);
        }
    }
}

impl ReadPool {
    /// A pool of at most `capacity` (at least 1) read-only connections to the index at `path`.
    /// Nothing is opened until the first [`ReadPool::get`].
    pub fn new(path: &Path, capacity: usize) -> Self {
        Self {
            path: path.to_path_buf(),
            capacity: capacity.max(1),
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            fell_back: AtomicBool::new(false),
        }
    }

    /// The most connections the pool opens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Connections opened so far, over the pool's life.
    pub fn opened_total(&self) -> u64 {
        self.lock().opened_total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection, a new one if fewer than the capacity exist, or else the next one
    /// given back.
    pub fn get(&self) -> Result<PooledIndex<'_>> {
        let mut st = self.lock();
        loop {
            if let Some(index) = st.idle.pop() {
                return Ok(PooledIndex {
                    pool: self,
                    index: Some(index),
                });
            }
            if st.open < self.capacity {
                st.open += 1;
                drop(st);
                return match Index::open_read_only(&self.path) {
                    Ok(index) => {
                        self.lock().opened_total += 1;
                        Ok(PooledIndex {
                            pool: self,
                            index: Some(index),
                        })
                    }
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// An idle connection, if one is idle now: never opens one, never waits.
    pub fn try_get(&self) -> Option<PooledIndex<'_>> {
        let index = self.lock().idle.pop()?;
        Some(PooledIndex {
            pool: self,
            index: Some(index),
        })
    }

    /// Runs `f` over a lent connection; if the pool cannot lend one, over `shared` (a
    /// committed-state read is right there too), logging the reason the first time.
    pub(crate) fn read_or<T>(
        &self,
        shared: &SharedIndex,
        f: impl FnOnce(&Index) -> Result<T>,
    ) -> Result<T> {
        match self.get() {
            Ok(idx) => f(&idx),
            Err(e) => {
                if !self.fell_back.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "no read-only index connection; reads share the store's one");
                }
                f(&shared.lock())
            }
        }
    }

    fn give_back(&self, index: Index) {
        let mut st = self.lock();
        // A statement left running would pin its read snapshot; a connection whose last use
        // left a transaction open is closed instead of lent again.
        if index.conn.is_autocommit() {
            st.idle.push(index);
        } else {
            tracing::warn!("a pooled index connection was given back inside a transaction; closed");
            st.open -= 1;
            drop(st);
            drop(index);
        }
        self.freed.notify_one();
    }
}

impl Index {
    /// Opens the index at `path` read-only, for a [`ReadPool`]: it must exist, be in WAL mode
    /// and have this build's schema version (a reader never migrates).
    pub(crate) fn open_read_only(path: &Path) -> Result<Self> {
        let err = sql_err(path);
        if !path.exists() {
            return Err(Error::Index {
                path: path.to_path_buf(),
                message: "index file is missing".into(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(&err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.execute_batch("PRAGMA query_only=ON").map_err(&err)?;
        let (mode, version): (String, i64) = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .and_then(|m| {
                conn.query_row("PRAGMA user_version", [], |r| r.get(0))
                    .map(|v| (m, v))
            })
            .map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Index {
                path: path.to_path_buf(),
                message: format!("a read-only connection needs WAL mode (the index is in {mode})"),
            });
        }
        if version != SCHEMA_VERSION {
            return Err(Error::Index {
                path: path.to_path_buf(),
                message: format!(
                    "a read-only connection found schema version {version}; this build reads \
                     {SCHEMA_VERSION}"
                ),
            });
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            default_retention: None,
            deferred: false,
            rolled_back_full: false,
            journal: None,
        })
    }

    /// Runs `f` in one read transaction: every query in it sees the same committed state.
    pub fn read_snapshot<T>(&self, f: impl FnOnce(&Index) -> Result<T>) -> Result<T> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let out = f(self);
        // A read transaction has nothing to keep: ending it either way frees the snapshot.
        let end = tx.commit().map_err(self.err());
        let out = out?;
        end?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::Path;

    use crate::names::RunRef;
    use crate::store::{InitOptions, Store};
    use crate::vfs::{Ctx, ROOT_INO, Vfs, VfsOptions};

    const CTX: Ctx = Ctx { uid: 0, gid: 0 };

    /// A view of a new store with the open run `ns/r`, and the run's directory.
    fn view(dir: &Path) -> (Vfs, u64) {
        let store = Store::init(&dir.join("store"), &InitOptions::default()).unwrap();
        let v = Vfs::new(store, VfsOptions::default()).unwrap();
        let ns = v.mkdir(CTX, ROOT_INO, OsStr::new("ns"), 0o755).unwrap();
        let run = v.mkdir(CTX, ns.ino, OsStr::new("r"), 0o755).unwrap();
        (v, run.ino)
    }

    fn put(v: &Vfs, dir: u64, name: &str, data: &[u8]) {
        let (_, fh) = v.create(CTX, dir, OsStr::new(name), 0o644).unwrap();
        assert_eq!(v.write(fh, 0, data).unwrap() as usize, data.len());
        v.release(fh).unwrap();
    }

    fn run_ref() -> RunRef {
        RunRef::new("ns", "r").unwrap()
    }

    #[test]
    fn a_pooled_read_sees_a_seal_committed_a_moment_before() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, run) = view(tmp.path());
        let r = run_ref();
        put(&v, run, "a.txt", b"hello");
        // The pool's connection is open (and idle) before the seal commits.
        let before = v.store().run_details(&r).unwrap();
        assert_eq!(before.row.state, "open");
        assert!(before.row.manifest.is_none());
        assert!(v.store().read_pool().opened_total() >= 1);
        let digest = v.seal(&r).unwrap();
        let after = v.store().run_details(&r).unwrap();
        assert_eq!(after.row.state, "sealed");
        assert_eq!(after.row.manifest, Some(digest));
        assert_eq!(after.row.files, 1);
        assert_eq!(after.retention.state, "sealed");
        let pool = v.store().read_pool();
        assert!(pool.opened_total() <= pool.capacity() as u64);
    }

    #[test]
    fn run_details_carry_every_hold_and_metadata_value_sorted_and_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a"), b"x").unwrap();
        let store = Store::init(&tmp.path().join("store"), &InitOptions::default()).unwrap();
        let r = run_ref();
        // Values JSON must escape, and keys out of order.
        let meta = [
            ("zeta", "quote \" and backslash \\"),
            ("alpha", "tab\tnewline\nünïcödé"),
            ("mid", ""),
        ];
        let report = store
            .ingest_dir(
                &src,
                &r,
                meta.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                &crate::store::NoProgress,
            )
            .unwrap();
        let v = Vfs::new(store, VfsOptions::default()).unwrap();
        let none = v.store().run_details(&r).unwrap();
        assert!(none.retention.holds.is_empty());
        v.store()
            .place_hold(&r, "zz-last", b"reason \"1\"")
            .unwrap();
        v.store()
            .place_hold(&r, "legal", "caf\u{e9}".as_bytes())
            .unwrap();
        let d = v.store().run_details(&r).unwrap();
        assert_eq!(d.row.manifest.map(|m| m.to_string()), Some(report.manifest));
        let mut want: Vec<(String, String)> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        assert_eq!(d.meta, want);
        let holds: Vec<(&str, &str)> = d
            .retention
            .holds
            .iter()
            .map(|h| (h.name.as_str(), h.reason.as_str()))
            .collect();
        assert_eq!(holds, [("legal", "caf\u{e9}"), ("zz-last", "reason \"1\"")]);
        assert!(d.retention.holds.iter().all(|h| !h.placed_at.is_empty()));
        assert!(matches!(
            v.store().run_details(&RunRef::new("ns", "nope").unwrap()),
            Err(crate::Error::NotFound(_))
        ));
    }

    #[test]
    fn an_open_runs_details_carry_its_directory_metadata_as_the_seal_will() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, run) = view(tmp.path());
        let set = |name: &str, value: &[u8]| v.setxattr(run, OsStr::new(name), value, 0).unwrap();
        set("user.statehub.run_id", b"sh-42");
        set("user.owner", b"lab");
        // Not producer metadata: a binary value.
        set("user.blob", &[0xff, 0xfe]);
        let open = v.store().run_details(&run_ref()).unwrap();
        assert_eq!(open.row.state, "open");
        let want = vec![
            ("owner".to_string(), "lab".to_string()),
            ("statehub.run_id".to_string(), "sh-42".to_string()),
        ];
        assert_eq!(open.meta, want);
        put(&v, run, "f", b"x");
        v.seal(&run_ref()).unwrap();
        let sealed = v.store().run_details(&run_ref()).unwrap();
        assert_eq!(sealed.row.state, "sealed");
        assert_eq!(sealed.meta, want);
    }

    #[test]
    fn a_pooled_reader_never_blocks_a_seal_and_keeps_its_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, run) = view(tmp.path());
        let r = run_ref();
        put(&v, run, "a.txt", b"hello");
        let reader = v.store().read_pool().get().unwrap();
        let digest = reader
            .read_snapshot(|idx| {
                assert_eq!(idx.run(&r)?.unwrap().state, "open");
                // The seal commits through the store's connection while this read
                // transaction holds its snapshot: a reader does not hold the writer up.
                let d = v.seal(&r)?;
                assert_eq!(idx.run(&r)?.unwrap().state, "open", "the snapshot is kept");
                Ok(d)
            })
            .unwrap();
        // A new read transaction of the same connection sees the seal.
        let row = reader.run(&r).unwrap().unwrap();
        assert_eq!((row.state.as_str(), row.manifest), ("sealed", Some(digest)));
        drop(reader);
        assert_eq!(v.store().run(&r).unwrap().state, "sealed");
    }

    #[test]
    fn pooled_reads_see_committed_state_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, run) = view(tmp.path());
        let run_id = v.store().run(&run_ref()).unwrap().id;
        let committed = |name: &str| {
            let idx = v.store().read_pool().get().unwrap();
            idx.meta(|m| {
                let root = m.run_root(run_id)?.expect("the run has a root");
                m.lookup(root, name)
            })
            .unwrap()
        };
        // Created and not closed: the creation waits in the view's open transaction (ADR
        // 0018), which a pooled reader neither sees nor waits for.
        let (_, fh) = v.create(CTX, run, OsStr::new("new.txt"), 0o644).unwrap();
        assert!(v.lookup(run, OsStr::new("new.txt")).is_ok());
        assert_eq!(committed("new.txt"), None);
        // Closed: journaled (ADR 0031), still not committed until the batch is, which any
        // other user of the index makes it.
        v.release(fh).unwrap();
        assert_eq!(committed("new.txt"), None);
        v.store().stats().unwrap();
        assert!(committed("new.txt").is_some());
    }

    #[test]
    fn a_pooled_connection_refuses_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, _) = view(tmp.path());
        let ns = v
            .store()
            .read(|idx| idx.meta(|m| m.namespace("ns")))
            .unwrap();
        let ns = ns.expect("namespace ns exists");
        let idx = v.store().read_pool().get().unwrap();
        let e = idx.meta(|m| m.delete_namespace(ns.id)).unwrap_err();
        assert!(e.to_string().contains("readonly"), "{e}");
        drop(idx);
        assert!(
            v.lookup(ROOT_INO, OsStr::new("ns")).is_ok(),
            "nothing was written"
        );
    }

    #[test]
    fn the_pool_opens_at_most_its_capacity_and_reuses_connections() {
        let tmp = tempfile::tempdir().unwrap();
        let (v, _) = view(tmp.path());
        let pool = v.store().read_pool();
        let cap = pool.capacity();
        let before = pool.opened_total();
        let held: Vec<_> = (0..cap).map(|_| pool.get().unwrap()).collect();
        assert_eq!(
            pool.opened_total() - before,
            (cap as u64).saturating_sub(before)
        );
        drop(held);
        for _ in 0..10 {
            v.store().run(&run_ref()).unwrap();
        }
        assert_eq!(pool.opened_total(), cap as u64);
    }
}
