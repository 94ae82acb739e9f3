//! The SQLite index: packs, chunks, runs, files and the event log.
//!
//! It is an index, not the source of truth: everything in it can be rebuilt from the packs'
//! chunk tables and the manifests (`artifactfs index rebuild`, later). It runs in WAL mode with a
//! busy timeout; writers use `BEGIN IMMEDIATE`; the schema version is SQLite's `user_version`
//! and migrations run in order on open. Only this module runs SQL.
//!
//! Commit order (the invariant that keeps the store consistent after a crash): a pack is durable
//! in the object store before its chunks are inserted here, and a manifest is durable before the
//! run that names it is marked sealed. So the index never refers to bytes that are not stored;
//! a crash can only leave unreferenced packs and manifests behind, which gc reclaims.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::id::{ChunkId, FileHash, ManifestDigest, PackId};
use crate::manifest::{ChunkRef, Entry, Kind, Manifest, XattrValue};
use crate::names::RunRef;
use crate::pack::PackEntry;

/// `files, raw_bytes` of a `runs` row, as a literal for `concat!`: an open run's `files` are
/// its regular files with a name so far (a sealed run's come from its manifest). Its
/// `raw_bytes` stay 0 until the seal: the sizes of files being written live in their staging
/// files, not in the index.
macro_rules! live_counts {
    () => {
        "CASE WHEN state = 'open' THEN (SELECT count(*) FROM inodes i
             WHERE i.run = runs.id AND i.kind = 'file' AND i.nlink > 0) ELSE files END,
         raw_bytes"
    };
}

pub mod journal;
mod pool;
mod retention;
pub use pool::{PooledIndex, ReadPool};
pub use retention::{DefaultRetention, ExpiredRun, HoldRow, PackUsage, RunRetention, SweepStats};

/// Schema version written by this build.
pub const SCHEMA_VERSION: i64 = 9;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    r#"
    CREATE TABLE packs (
        id          INTEGER PRIMARY KEY,
        hash        BLOB NOT NULL UNIQUE,
        size        INTEGER NOT NULL,
        chunks      INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE chunks (
        hash        BLOB PRIMARY KEY,
        pack        INTEGER NOT NULL REFERENCES packs(id),
        offset      INTEGER NOT NULL,
        stored_len  INTEGER NOT NULL,
        raw_len     INTEGER NOT NULL,
        codec       INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX chunks_pack ON chunks(pack);
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY,
        namespace   TEXT NOT NULL,
        name        TEXT NOT NULL,
        state       TEXT NOT NULL,
        manifest    BLOB,
        created_at  INTEGER NOT NULL,
        sealed_at   INTEGER,
        files       INTEGER NOT NULL DEFAULT 0,
        raw_bytes   INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX runs_name ON runs(namespace, name) WHERE state <> 'deleted';
    CREATE TABLE run_meta (
        run         INTEGER NOT NULL REFERENCES runs(id),
        key         TEXT NOT NULL,
        value       TEXT NOT NULL,
        PRIMARY KEY (run, key)
    ) WITHOUT ROWID;
    CREATE TABLE files (
        run         INTEGER NOT NULL REFERENCES runs(id),
        path        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        blake3      BLOB,
        chunks      BLOB,
        target      TEXT,
        rdev        INTEGER,
        xattrs      TEXT,
        PRIMARY KEY (run, path)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        at          INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        namespace   TEXT,
        run         TEXT,
        detail      TEXT NOT NULL DEFAULT '{}'
    );
    "#,
    // 1 -> 2: namespaces as rows, and the metadata of open runs (the mount's staging area).
    r#"
    CREATE TABLE namespaces (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );
    INSERT INTO namespaces (name, mode, uid, gid, mtime_ns, created_at)
        SELECT namespace, 493, 0, 0, min(created_at), min(created_at) FROM runs GROUP BY namespace;
    ALTER TABLE runs ADD COLUMN root_ino INTEGER;
    CREATE TABLE inodes (
        ino         INTEGER PRIMARY KEY AUTOINCREMENT,
        run         INTEGER NOT NULL REFERENCES runs(id),
        kind        TEXT NOT NULL,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        size        INTEGER NOT NULL DEFAULT 0,
        mtime_ns    INTEGER NOT NULL,
        ctime_ns    INTEGER NOT NULL,
        rdev        INTEGER NOT NULL DEFAULT 0,
        target      TEXT,
        nlink       INTEGER NOT NULL,
        xattrs      TEXT
    );
    CREATE INDEX inodes_run ON inodes(run);
    CREATE TABLE dentries (
        parent      INTEGER NOT NULL REFERENCES inodes(ino),
        name        TEXT NOT NULL,
        ino         INTEGER NOT NULL REFERENCES inodes(ino),
        PRIMARY KEY (parent, name)
    ) WITHOUT ROWID;
    CREATE INDEX dentries_ino ON dentries(ino);
    "#,
    // 2 -> 3: retention, holds, chunk reference counts and tombstones. `refs` is backfilled
    // from the sealed runs' files by `retention::backfill_refs` in the same transaction.
    r#"
    ALTER TABLE runs ADD COLUMN retain TEXT;
    ALTER TABLE runs ADD COLUMN retain_for_ns INTEGER;
    ALTER TABLE runs ADD COLUMN retain_until INTEGER;
    ALTER TABLE runs ADD COLUMN deleted_at INTEGER;
    CREATE INDEX runs_retain_until ON runs(retain_until) WHERE state = 'sealed';
    ALTER TABLE namespaces ADD COLUMN retain TEXT;
    CREATE TABLE holds (
        run         INTEGER NOT NULL REFERENCES runs(id),
        name        TEXT NOT NULL,
        reason      TEXT NOT NULL,
        placed_at   INTEGER NOT NULL,
        PRIMARY KEY (run, name)
    ) WITHOUT ROWID;
    ALTER TABLE chunks ADD COLUMN refs INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX chunks_unreferenced ON chunks(pack) WHERE refs = 0;
    "#,
    // 3 -> 4: tiering state (crate::index_tier).
    crate::index_tier::MIGRATION_TIER,
    // 4 -> 5: small files of open runs keep their content in the index instead of a staging
    // file (ADR 0015).
    r#"
    CREATE TABLE inline_data (
        ino         INTEGER PRIMARY KEY REFERENCES inodes(ino) ON DELETE CASCADE,
        data        BLOB NOT NULL
    );
    "#,
    // 5 -> 6: chunks that sealed runs reference but no readable pack holds (a rebuild found
    // them lost), with their reference counts; a pack that stores one again takes them over.
    r#"
    CREATE TABLE lost_chunks (
        hash        BLOB PRIMARY KEY,
        refs        INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 6 -> 7: files of open runs whose content is a list of stored chunks, chunked as they
    // were written (ADR 0025). Each listed chunk holds a reference, kept by the triggers
    // through every insert and delete (a deleted inode cascades to its rows).
    r#"
    CREATE TABLE chunked_files (
        ino         INTEGER PRIMARY KEY REFERENCES inodes(ino) ON DELETE CASCADE,
        size        INTEGER NOT NULL,
        blake3      BLOB NOT NULL
    );
    CREATE TABLE chunked_chunks (
        ino         INTEGER NOT NULL REFERENCES chunked_files(ino) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        hash        BLOB NOT NULL,
        len         INTEGER NOT NULL,
        PRIMARY KEY (ino, seq)
    ) WITHOUT ROWID;
    CREATE TRIGGER chunked_chunks_ref AFTER INSERT ON chunked_chunks BEGIN
        SELECT RAISE(ABORT, 'a chunked file names a chunk the store does not hold')
        WHERE NOT EXISTS (SELECT 1 FROM chunks WHERE hash = NEW.hash);
        UPDATE chunks SET refs = refs + 1 WHERE hash = NEW.hash;
    END;
    CREATE TRIGGER chunked_chunks_unref AFTER DELETE ON chunked_chunks BEGIN
        UPDATE chunks SET refs = refs - 1 WHERE hash = OLD.hash;
    END;
    "#,
    // 7 -> 8: the last step of the close journal (ADR 0031) the index holds, set by every
    // commit that holds steps: after a crash the journal's later steps are applied again.
    r#"
    CREATE TABLE journal_mark (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        journal     BLOB NOT NULL,
        seq         INTEGER NOT NULL
    );
    "#,
    // 8 -> 9: a chunk recorded as lost (a rebuild found no pack holding it, or verify found
    // it damaged) may still be named by a file of an open run; deleting that file gives its
    // reference back there too, so that the count a new copy takes over is right.
    r#"
    DROP TRIGGER chunked_chunks_unref;
    CREATE TRIGGER chunked_chunks_unref AFTER DELETE ON chunked_chunks BEGIN
        UPDATE chunks SET refs = refs - 1 WHERE hash = OLD.hash;
        UPDATE lost_chunks SET refs = refs - 1 WHERE hash = OLD.hash;
        DELETE FROM lost_chunks WHERE hash = OLD.hash AND refs <= 0;
    END;
    "#,
];

/// Columns of the rows [`file_row`] reads, as a literal for `concat!`.
macro_rules! file_cols {
    () => {
        "path, kind, mode, uid, gid, size, mtime_ns, blake3, chunks, target, rdev, xattrs"
    };
}

/// Columns of the rows [`inode_row`] reads, as a literal for `concat!`.
macro_rules! inode_cols {
    () => {
        "ino, run, kind, mode, uid, gid, size, mtime_ns, ctime_ns, rdev, target, nlink, xattrs"
    };
}

/// A run as the index knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    pub id: i64,
    pub run: RunRef,
    pub state: String,
    pub manifest: Option<ManifestDigest>,
    pub created_at_ns: i64,
    pub sealed_at_ns: Option<i64>,
    pub files: u64,
    pub raw_bytes: u64,
}

/// One event of the append-only log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EventRow {
    pub seq: i64,
    pub at_ns: i64,
    pub kind: String,
    pub namespace: Option<String>,
    pub run: Option<String>,
    pub detail: serde_json::Value,
}

/// Store-wide counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexStats {
    pub runs_sealed: u64,
    pub runs_open: u64,
    pub files: u64,
    pub raw_bytes: u64,
    pub chunks: u64,
    pub chunk_raw_bytes: u64,
    pub chunk_stored_bytes: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    /// Chunks sealed runs name that no readable pack holds (found by a rebuild, ADR 0024):
    /// 0 in an undamaged store.
    pub lost_chunks: u64,
}

/// A chunk's location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: PackId,
    pub entry: PackEntry,
}

/// The index connection.
pub struct Index {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    /// The store-wide default retention for new runs (config), when there is one.
    default_retention: Option<DefaultRetention>,
    /// A write transaction the view left open (`journaled_step`), committed by the next
    /// `meta_write`, by [`Index::begin`] and by [`SharedIndex::lock`].
    deferred: bool,
    /// Whether the last write transaction that SQLite rolled back on an error (deferred
    /// changes with it) failed because the disk was full.
    rolled_back_full: bool,
    /// The close journal of the deferred transaction (ADR 0031), for the store's own
    /// connection ([`Index::open_journal`]); without one, a close commits.
    journal: Option<journal::Journal>,
}

/// A close commits the journaled steps when this many closes were journaled since the last
/// commit, or the journal holds this many bytes, or (`Index::commit_journal_after`) its first
/// close is this old.
const JOURNAL_BATCH_CLOSES: usize = 512;
const JOURNAL_BATCH_BYTES: u64 = 8 << 20;
pub(crate) const JOURNAL_BATCH_AGE: Duration = Duration::from_secs(1);

impl Drop for Index {
    fn drop(&mut self) {
        self.settle();
    }
}

/// The store's index connection, shared by its threads. [`SharedIndex::lock`] commits what the
/// view deferred before handing the index over, so every other user reads and builds on
/// committed state only; the view's own calls, which may run inside that transaction, use
/// [`SharedIndex::lock_deferred`].
pub struct SharedIndex(Mutex<Index>);

impl SharedIndex {
    pub fn new(index: Index) -> Self {
        Self(Mutex::new(index))
    }

    /// The index, with any deferred view transaction committed.
    pub fn lock(&self) -> MutexGuard<'_, Index> {
        let mut idx = self.lock_deferred();
        idx.settle();
        idx
    }

    /// The index as it is, a deferred view transaction still open: only for calls that are
    /// right inside it (the view's reads, and its writes, which commit it).
    pub(crate) fn lock_deferred(&self) -> MutexGuard<'_, Index> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| {
        // SQLite answers SQLITE_FULL when the disk (or a quota) refused a write: that is the
        // caller's ENOSPC, so a producer sees "no space", not a generic I/O error.
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            return Error::disk_full("write the index", path);
        }
        Error::Index {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// Commits made by the index connections of this process, counted after each has taken place
/// (SQLite's WAL hook runs once the commit is in the log and its write lock is released).
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// A number that changes after every commit of any store's index in this process. A value
/// read before a read transaction began and still current afterwards proves that nothing was
/// committed in between: what was read then is still true (a cache keyed by it is exact).
pub fn commit_generation() -> u64 {
    COMMITS.load(Ordering::Acquire)
}

/// WAL pages after which a commit checkpoints. SQLite's own hook does this at 1,000; the
/// index's hook ([`after_commit`]) takes its place and does it at this size (see `open`).
const AUTOCHECKPOINT_PAGES: i32 = 4096;

/// The index connection's WAL hook: counts the commit, then checkpoints as SQLite's default
/// hook would (passive: it copies what no reader still needs and never waits). An error here
/// would fail the statement of a commit that has already happened, so a failed checkpoint is
/// only logged; the next commit tries again.
fn after_commit(wal: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    COMMITS.fetch_add(1, Ordering::Release);
    if pages >= AUTOCHECKPOINT_PAGES
        && let Err(e) = wal.checkpoint()
    {
        tracing::debug!(error = %e, pages, "index checkpoint after a commit did not run");
    }
    Ok(())
}

/// How long a statement waits for another connection's lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Prepared statements a connection keeps (`prepare_cached`). rusqlite keeps 16 by default,
/// fewer than the statements one upload or one copied file goes through, so they were evicted
/// and parsed again on every use; this holds every statement of this module.
const STATEMENT_CACHE: usize = 256;

impl Index {
    /// Opens (creating if `create`) and migrates the index at `path`.
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        if !create && !path.exists() {
            return Err(Error::Index {
                path: path.to_path_buf(),
                message: "index file is missing".into(),
            });
        }
        let err = sql_err(path);
        let conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        if create {
            // Only before the first table and before the switch to WAL, or it does not take
            // (and on an existing index it changes nothing): free pages go back to the file
            // system when `reclaim_space` asks.
            conn.execute_batch("PRAGMA auto_vacuum=INCREMENTAL")
                .map_err(&err)?;
        }
        // Reading the mode also proves the file is a database (a truncated or foreign file fails).
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Index {
                path: path.to_path_buf(),
                message: format!("cannot use WAL mode (got {mode})"),
            });
        }
        // NORMAL: a commit survives a crash of this process (the WAL is written before COMMIT
        // returns) but only reaches the disk at the next checkpoint. Commits that other
        // durable state depends on (packs, seals) switch to FULL: see `durable`.
        // Checkpoints run every 4,096 pages (16 MiB) of WAL rather than SQLite's 1,000 (the
        // commit hook, `after_commit`, runs them in place of SQLite's own): a
        // mount's many small commits rewrite the same few pages, and each checkpoint writes a
        // page once and syncs twice, however often it changed. When a checkpoint lets the WAL
        // restart, it is truncated to 32 MiB, not less: a WAL cut shorter than it grows to
        // between checkpoints is extended block by block again (new page-cache pages, new
        // ext4 blocks) by every commit after the restart, 16% of the wall time of copying
        // 5,000 small files into a mount.
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA journal_size_limit=33554432;",
        )
        .map_err(&err)?;
        // After the pragmas: `wal_autocheckpoint` would replace the hook.
        conn.wal_hook(Some(after_commit));
        let mut idx = Self {
            conn,
            path: path.to_path_buf(),
            default_retention: None,
            deferred: false,
            rolled_back_full: false,
            journal: None,
        };
        idx.migrate(create)?;
        Ok(idx)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        sql_err(&self.path)
    }

    /// Starts a `BEGIN IMMEDIATE` transaction, after committing a deferred one.
    pub(crate) fn begin(&mut self) -> Result<rusqlite::Transaction<'_>> {
        self.commit_deferred()?;
        let path = self.path.clone();
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err(&path))
    }

    /// Commits the view's deferred transaction, if one is open.
    pub(crate) fn commit_deferred(&mut self) -> Result<()> {
        if !self.deferred {
            return Ok(());
        }
        // The mark of the last journaled step the transaction holds goes with it (ADR 0031):
        // every step since it began is in it (a failed step does not take a number).
        let mark = match self.journal.as_ref().filter(|j| j.unmarked) {
            Some(j) => self.meta(|m| m.set_journal_mark(&j.id, j.next_seq - 1)),
            None => Ok(()),
        };
        // A failed COMMIT may have rolled the transaction back (I/O error, full disk) or left
        // it open (busy): the connection says which.
        let r = mark.and_then(|()| {
            self.conn
                .prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]))
                .map(drop)
                .map_err(self.err())
        });
        if r.is_ok() || self.conn.is_autocommit() {
            self.deferred = false;
        }
        if let Err(e) = &r
            && self.conn.is_autocommit()
        {
            self.rolled_back_full = e.is_disk_full();
        }
        if r.is_ok() {
            if let Some(j) = self.journal.as_mut() {
                j.committed();
            }
        } else if self.conn.is_autocommit() {
            self.after_rollback();
        }
        r
    }

    /// After the view's transaction rolled back: the steps that closes promised are in the
    /// journal file, and go back into a new transaction at once (ADR 0031), so that the view
    /// never loses sight of a closed file; the steps only queued go (nothing was promised of
    /// them). If no transaction can begin now, the next write step applies them.
    fn after_rollback(&mut self) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        j.rolled_back();
        if !j.lost {
            return;
        }
        match self.conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => {
                self.deferred = true;
                self.restore_journal();
            }
            Err(e) => tracing::warn!(
                "closed files a rollback took back wait for the next change of the index: {e}"
            ),
        }
    }

    /// Whether the last transaction SQLite rolled back on an error (with what the view had
    /// deferred in it) failed because the disk was full.
    pub(crate) fn last_rollback_was_disk_full(&self) -> bool {
        self.rolled_back_full
    }

    /// [`Index::commit_deferred`], for callers that cannot return its error: it is logged. What
    /// a failed commit loses is only what the view had not promised yet (files created and not
    /// closed since); their close then fails.
    pub(crate) fn settle(&mut self) {
        if let Err(e) = self.commit_deferred() {
            tracing::error!(error = %e, "committing deferred file creations failed");
        }
    }

    fn migrate(&mut self, create: bool) -> Result<()> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&err)?;
        if version > SCHEMA_VERSION {
            return Err(Error::Index {
                path: path.clone(),
                message: format!(
                    "schema version {version} is newer than this build understands ({SCHEMA_VERSION})"
                ),
            });
        }
        if version == 0 && !create {
            return Err(Error::Index {
                path: path.clone(),
                message: "index is empty or truncated; rebuild it from the packs and manifests with `artifactfs index rebuild`".into(),
            });
        }
        if version == 0 {
            // A new file must be empty; an index that lost its header is not silently re-created.
            let tables: i64 = self
                .conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(&err)?;
            if tables != 0 {
                return Err(Error::Index {
                    path: path.clone(),
                    message: "has tables but no schema version".into(),
                });
            }
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.begin()?;
            tx.execute_batch(sql).map_err(&err)?;
            if i == 2 {
                retention::backfill_refs(&tx, &path, false)?;
            }
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(&err)?;
            tx.commit().map_err(&err)?;
        }
        Ok(())
    }

    /// Path of the index file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a chunk is already stored.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM chunks WHERE hash = ?1")
            .and_then(|mut s| s.exists(params![id.as_bytes()]))
            .map_err(self.err())
    }

    /// Where a chunk is stored.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        self.conn
            .prepare_cached(
                "SELECT p.hash, c.codec, c.raw_len, c.stored_len, c.offset
                 FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.hash = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![id.as_bytes()], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, u8>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, u32>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .optional()
            })
            .map_err(self.err())?
            .map(|(pack, codec, raw_len, stored_len, offset)| {
                Ok(ChunkLoc {
                    pack: PackId::from_slice(&pack)?,
                    entry: PackEntry {
                        chunk: *id,
                        codec: Codec::from_u8(codec)?,
                        raw_len,
                        stored_len,
                        offset: offset as u64,
                    },
                })
            })
            .transpose()
    }

    /// Where each of `ids` is stored, looked up in one read transaction (when the connection
    /// has none open already): a batch pays for the snapshot once, not per chunk.
    pub fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkLoc>>> {
        let own = self.conn.is_autocommit() && ids.len() > 1;
        let step = |sql: &str| {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([]))
                .map(drop)
                .map_err(self.err())
        };
        if own {
            step("BEGIN")?;
        }
        let out = ids.iter().map(|id| self.chunk(id)).collect();
        if own && let Err(e) = step("COMMIT") {
            // A pooled connection must not go back with a snapshot held.
            let _ = step("ROLLBACK");
            return Err(e);
        }
        out
    }

    /// Records a durable pack and its chunks (chunks already indexed elsewhere are kept there).
    /// Returns the entries of chunks that were (a rebuild decides which copy to keep).
    pub fn insert_pack(
        &mut self,
        id: &PackId,
        size: u64,
        entries: &[PackEntry],
        now_ns: i64,
    ) -> Result<Vec<PackEntry>> {
        self.durable(|s| s.insert_pack_tx(id, size, entries, now_ns))
    }

    fn insert_pack_tx(
        &mut self,
        id: &PackId,
        size: u64,
        entries: &[PackEntry],
        now_ns: i64,
    ) -> Result<Vec<PackEntry>> {
        let mut elsewhere = Vec::new();
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.begin()?;
        let pack_row = pack_row(&tx, id, size, entries.len(), now_ns).map_err(&err)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO chunks (hash, pack, offset, stored_len, raw_len, codec)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(&err)?;
            for e in entries {
                let added = ins
                    .execute(params![
                        e.chunk.as_bytes(),
                        pack_row,
                        e.offset as i64,
                        e.stored_len,
                        e.raw_len,
                        e.codec as u8
                    ])
                    .map_err(&err)?;
                if added == 0 {
                    elsewhere.push(*e);
                }
            }
        }
        retention::take_over_lost_refs(&tx, &path)?;
        tx.commit().map_err(&err)?;
        Ok(elsewhere)
    }

    /// The run with this name that is not deleted. An open run's `files` and `raw_bytes` are
    /// its regular files (with a name) so far.
    pub fn run(&self, r: &RunRef) -> Result<Option<RunRow>> {
        self.conn
            .prepare_cached(concat!(
                "SELECT id, namespace, name, state, manifest, created_at, sealed_at, ",
                live_counts!(),
                " FROM runs WHERE namespace = ?1 AND name = ?2 AND state <> 'deleted'"
            ))
            .and_then(|mut s| s.query_row(params![r.namespace, r.run], run_row).optional())
            .map_err(self.err())?
            .transpose()
    }

    /// An open run's regular files (with at least one name), each with its size when the index
    /// holds its content (inline, or chunked as it was written); `None`: in its staging file.
    pub fn open_run_file_sizes(&self, run: i64) -> Result<Vec<(i64, Option<u64>)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT i.ino, coalesce((SELECT length(d.data) FROM inline_data d WHERE d.ino = i.ino),
                                       (SELECT c.size FROM chunked_files c WHERE c.ino = i.ino))
                 FROM inodes i WHERE i.run = ?1 AND i.kind = 'file' AND i.nlink > 0",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map(params![run], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?.map(|n| n as u64),
                ))
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// Runs (not deleted), optionally of one namespace, by namespace and name; counts as
    /// [`Index::run`].
    pub fn runs(&self, namespace: Option<&str>) -> Result<Vec<RunRow>> {
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT id, namespace, name, state, manifest, created_at, sealed_at, ",
                live_counts!(),
                " FROM runs WHERE state <> 'deleted' AND (?1 IS NULL OR namespace = ?1)
                 ORDER BY namespace, name"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![namespace], run_row)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter().collect()
    }

    /// Metadata key/values of a run.
    pub fn run_meta(&self, run_id: i64) -> Result<Vec<(String, String)>> {
        let mut s = self
            .conn
            .prepare_cached("SELECT key, value FROM run_meta WHERE run = ?1 ORDER BY key")
            .map_err(self.err())?;
        s.query_map(params![run_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())
    }

    /// Records a sealed run in one transaction: run row, metadata, files and events.
    /// Fails with [`Error::AlreadyExists`] if a run of that name exists.
    pub fn insert_sealed_run(
        &mut self,
        m: &Manifest,
        digest: &ManifestDigest,
        now_ns: i64,
        event_detail: serde_json::Value,
    ) -> Result<i64> {
        self.insert_sealed_run_when(m, digest, now_ns, event_detail, || Ok(()))
    }

    /// [`Index::insert_sealed_run`], committed only once `ready` has returned `Ok` (the
    /// manifest is durable): its rows are written meanwhile, so that storing the manifest and
    /// writing the index overlap. An error from `ready` rolls the run back.
    pub fn insert_sealed_run_when(
        &mut self,
        m: &Manifest,
        digest: &ManifestDigest,
        now_ns: i64,
        event_detail: serde_json::Value,
        ready: impl FnOnce() -> Result<()>,
    ) -> Result<i64> {
        self.durable(|s| s.insert_sealed_run_tx(m, digest, now_ns, event_detail, false, ready))
            .map(|(id, _)| id)
    }

    /// [`Index::insert_sealed_run`] for a run a rebuild found: chunks that no readable pack
    /// holds do not refuse it but are recorded as lost (`lost_chunks`), so that the run is
    /// listed, `verify` names what it lost, and storing those chunks again repairs it. Returns
    /// the run's id and how many distinct chunks it names that are lost.
    pub fn insert_rebuilt_run(
        &mut self,
        m: &Manifest,
        digest: &ManifestDigest,
        now_ns: i64,
        event_detail: serde_json::Value,
    ) -> Result<(i64, u64)> {
        self.durable(|s| s.insert_sealed_run_tx(m, digest, now_ns, event_detail, true, || Ok(())))
    }

    fn insert_sealed_run_tx(
        &mut self,
        m: &Manifest,
        digest: &ManifestDigest,
        now_ns: i64,
        event_detail: serde_json::Value,
        lost_ok: bool,
        ready: impl FnOnce() -> Result<()>,
    ) -> Result<(i64, u64)> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let default_retention = self.default_retention.clone();
        let tx = self.begin()?;
        let exists: Option<String> = tx
            .query_row(
                "SELECT state FROM runs WHERE namespace = ?1 AND name = ?2 AND state <> 'deleted'",
                params![m.namespace, m.run],
                |r| r.get(0),
            )
            .optional()
            .map_err(&err)?;
        if let Some(state) = exists {
            return Err(Error::AlreadyExists(format!(
                "run {}/{} ({state})",
                m.namespace, m.run
            )));
        }
        ensure_namespace(&tx, &m.namespace, now_ns).map_err(&err)?;
        let files = m.entries.iter().filter(|e| e.kind != Kind::Dir).count();
        tx.execute(
            "INSERT INTO runs (namespace, name, state, manifest, created_at, sealed_at, files, raw_bytes)
             VALUES (?1, ?2, 'sealed', ?3, ?4, ?4, ?5, ?6)",
            params![
                m.namespace,
                m.run,
                digest.as_bytes(),
                now_ns,
                files as i64,
                m.raw_bytes() as i64
            ],
        )
        .map_err(&err)?;
        let run_id = tx.last_insert_rowid();
        insert_run_entries(&tx, run_id, m).map_err(&err)?;
        let lost = retention::add_refs(&tx, &path, m, lost_ok)?;
        let run_name = Some(m.run.as_str());
        let ns = Some(m.namespace.as_str());
        append_event(
            &tx,
            now_ns,
            "run.opened",
            ns,
            run_name,
            &serde_json::json!({}),
        )
        .map_err(&err)?;
        append_event(&tx, now_ns, "run.sealed", ns, run_name, &event_detail).map_err(&err)?;
        retention::apply_default(
            &tx,
            &path,
            run_id,
            &m.namespace,
            &m.run,
            Some(now_ns),
            default_retention.as_ref(),
            now_ns,
        )?;
        ready()?;
        tx.commit().map_err(&err)?;
        Ok((run_id, lost))
    }

    /// One entry of a run.
    pub fn file(&self, run_id: i64, path: &str) -> Result<Option<Entry>> {
        self.conn
            .prepare_cached(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE run = ?1 AND path = ?2"
            ))
            .and_then(|mut s| s.query_row(params![run_id, path], file_row).optional())
            .map_err(self.err())?
            .transpose()
    }

    /// All entries of a run, by path.
    pub fn files(&self, run_id: i64) -> Result<Vec<Entry>> {
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE run = ?1 ORDER BY path"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![run_id], file_row)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter().collect()
    }

    /// The direct children of directory `dir` ("" or "." for the run root).
    pub fn children(&self, run_id: i64, dir: &str) -> Result<Vec<Entry>> {
        let (lo, hi) = if dir.is_empty() || dir == "." {
            (String::new(), "\u{10FFFF}".to_string())
        } else {
            (format!("{dir}/"), format!("{dir}0"))
        };
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE run = ?1 AND path > ?2 AND path < ?3 ORDER BY path"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![run_id, lo, hi], file_row)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        let mut out = Vec::new();
        for e in rows {
            let e = e?;
            if e.path != "." && !e.path[lo.len()..].contains('/') {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Every distinct chunk referenced by the given sealed runs (all when `None`), with the
    /// (run, path) pairs that reference it.
    pub fn referenced_chunks(
        &self,
        runs: &[RunRow],
    ) -> Result<std::collections::HashMap<ChunkId, Vec<(RunRef, String)>>> {
        let mut out: std::collections::HashMap<ChunkId, Vec<(RunRef, String)>> =
            std::collections::HashMap::new();
        let mut s = self
            .conn
            .prepare_cached("SELECT path, chunks FROM files WHERE run = ?1 AND chunks IS NOT NULL")
            .map_err(self.err())?;
        for run in runs {
            let rows = s
                .query_map(params![run.id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(self.err())?;
            for row in rows {
                let (path, blob) = row.map_err(self.err())?;
                for c in Entry::chunks_from_blob(&blob)? {
                    let refs = out.entry(c.0).or_default();
                    if refs.last().map(|(r, p)| (r, p)) != Some((&run.run, &path)) {
                        refs.push((run.run.clone(), path.clone()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// All packs: id and size.
    pub fn packs(&self) -> Result<Vec<(PackId, u64)>> {
        let mut s = self
            .conn
            .prepare_cached("SELECT hash, size FROM packs ORDER BY id")
            .map_err(self.err())?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(h, s)| Ok((PackId::from_slice(&h)?, s as u64)))
            .collect()
    }

    /// Appends an event outside of any other change.
    pub fn event(
        &mut self,
        now_ns: i64,
        kind: &str,
        run: Option<&RunRef>,
        detail: &serde_json::Value,
    ) -> Result<i64> {
        self.commit_deferred()?;
        let path = self.path.clone();
        append_event(
            &self.conn,
            now_ns,
            kind,
            run.map(|r| r.namespace.as_str()),
            run.map(|r| r.run.as_str()),
            detail,
        )
        .map_err(sql_err(&path))
    }

    /// The highest `seq` the event log has ever given out (0: none), counting events that are
    /// no longer in the table.
    pub fn last_event_seq(&self) -> Result<i64> {
        self.conn
            .query_row(
                "SELECT max(coalesce((SELECT max(seq) FROM events), 0),
                            coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())
    }

    /// The highest `seq` the (old, possibly damaged) index at `path` gave out, read without
    /// migrating or changing it.
    pub fn last_event_seq_of(path: &Path) -> Result<i64> {
        Self::open_replaced(path)?.last_event_seq()
    }

    /// An index a rebuild replaced (possibly damaged), opened as it is, to be read only: not
    /// migrated, its schema version not checked (a query that does not fit it fails).
    pub fn open_replaced(path: &Path) -> Result<Self> {
        let err = sql_err(path);
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(&err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(&err)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            default_retention: None,
            deferred: false,
            rolled_back_full: false,
            journal: None,
        })
    }

    /// Makes the next event of this (new) log get a `seq` above `floor`, so that a rebuilt log
    /// continues the numbering of the one it replaces.
    pub fn continue_events_after(&mut self, floor: i64) -> Result<()> {
        if floor <= self.last_event_seq()? {
            return Ok(());
        }
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let n = tx
                .execute(
                    "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'events'",
                    params![floor],
                )
                .map_err(&err)?;
            if n == 0 {
                tx.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?1)",
                    params![floor],
                )
                .map_err(&err)?;
            }
            Ok(())
        })
    }

    /// Events with `seq > after`, in order, at most `limit`.
    pub fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRow>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT seq, at, kind, namespace, run, detail FROM events WHERE seq > ?1
                 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map(params![after, limit as i64], |r| {
                Ok(EventRow {
                    seq: r.get(0)?,
                    at_ns: r.get(1)?,
                    kind: r.get(2)?,
                    namespace: r.get(3)?,
                    run: r.get(4)?,
                    detail: serde_json::from_str(&r.get::<_, String>(5)?)
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Store-wide counts.
    pub fn stats(&self) -> Result<IndexStats> {
        let q = |sql: &str| -> Result<i64> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
                .map(|v| v.unwrap_or(0))
                .map_err(self.err())
        };
        Ok(IndexStats {
            runs_sealed: q("SELECT count(*) FROM runs WHERE state = 'sealed'")? as u64,
            runs_open: q("SELECT count(*) FROM runs WHERE state = 'open'")? as u64,
            files: q("SELECT sum(files) FROM runs WHERE state = 'sealed'")? as u64,
            raw_bytes: q("SELECT sum(raw_bytes) FROM runs WHERE state = 'sealed'")? as u64,
            chunks: q("SELECT count(*) FROM chunks")? as u64,
            chunk_raw_bytes: q("SELECT sum(raw_len) FROM chunks")? as u64,
            chunk_stored_bytes: q("SELECT sum(stored_len) FROM chunks")? as u64,
            packs: q("SELECT count(*) FROM packs")? as u64,
            pack_bytes: q("SELECT sum(size) FROM packs")? as u64,
            lost_chunks: q("SELECT count(*) FROM lost_chunks")? as u64,
        })
    }
}

type FileRowRaw = (
    String,
    String,
    u32,
    u32,
    u32,
    i64,
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Entry>> {
    let raw: FileRowRaw = (
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    );
    Ok(entry_from_raw(raw))
}

fn entry_from_raw(raw: FileRowRaw) -> Result<Entry> {
    let (path, kind, mode, uid, gid, size, mtime_ns, blake3, chunks, target, rdev, xattrs) = raw;
    let xattrs = match xattrs {
        None => Default::default(),
        Some(s) => serde_json::from_str::<std::collections::BTreeMap<String, XattrValue>>(&s)
            .map_err(|e| Error::corrupt(format!("xattrs of {path}"), e.to_string()))?,
    };
    let chunks: Vec<ChunkRef> = match chunks {
        None => Vec::new(),
        Some(b) => Entry::chunks_from_blob(&b)?,
    };
    Ok(Entry {
        kind: Kind::parse(&kind)?,
        mode,
        uid,
        gid,
        size: size as u64,
        mtime_ns,
        blake3: blake3.map(|b| FileHash::from_slice(&b)).transpose()?,
        chunks,
        target,
        rdev: rdev.map(|d| d as u64),
        xattrs,
        path,
    })
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RunRow>> {
    let manifest: Option<Vec<u8>> = r.get(4)?;
    let row = (
        r.get::<_, i64>(0)?,
        r.get::<_, String>(1)?,
        r.get::<_, String>(2)?,
        r.get::<_, String>(3)?,
        r.get::<_, i64>(5)?,
        r.get::<_, Option<i64>>(6)?,
        r.get::<_, i64>(7)?,
        r.get::<_, i64>(8)?,
    );
    Ok((|| {
        Ok(RunRow {
            id: row.0,
            run: RunRef {
                namespace: row.1,
                run: row.2,
            },
            state: row.3,
            manifest: manifest
                .map(|m| ManifestDigest::from_slice(&m))
                .transpose()?,
            created_at_ns: row.4,
            sealed_at_ns: row.5,
            files: row.6 as u64,
            raw_bytes: row.7 as u64,
        })
    })())
}

fn append_event(
    conn: &Connection,
    now_ns: i64,
    kind: &str,
    namespace: Option<&str>,
    run: Option<&str>,
    detail: &serde_json::Value,
) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO events (at, kind, namespace, run, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![now_ns, kind, namespace, run, detail.to_string()])?;
    Ok(conn.last_insert_rowid())
}

/// The row id of pack `id`, inserting its row if it has none.
fn pack_row(
    tx: &Connection,
    id: &PackId,
    size: u64,
    chunks: usize,
    now_ns: i64,
) -> rusqlite::Result<i64> {
    tx.execute(
        "INSERT OR IGNORE INTO packs (hash, size, chunks, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![id.as_bytes(), size as i64, chunks as i64, now_ns],
    )?;
    tx.query_row(
        "SELECT id FROM packs WHERE hash = ?1",
        params![id.as_bytes()],
        |r| r.get(0),
    )
}

/// Inserts a manifest's metadata and entries as `run_meta` and `files` rows of `run_id`.
fn insert_run_entries(tx: &Connection, run_id: i64, m: &Manifest) -> rusqlite::Result<()> {
    let mut meta =
        tx.prepare_cached("INSERT INTO run_meta (run, key, value) VALUES (?1, ?2, ?3)")?;
    for (k, v) in &m.metadata {
        meta.execute(params![run_id, k, v])?;
    }
    let mut ins = tx.prepare_cached(
        "INSERT INTO files (run, path, kind, mode, uid, gid, size, mtime_ns, blake3, chunks,
                            target, rdev, xattrs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    for e in &m.entries {
        let xattrs = if e.xattrs.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&e.xattrs)
                    .map_err(|x| rusqlite::Error::ToSqlConversionFailure(Box::new(x)))?,
            )
        };
        ins.execute(params![
            run_id,
            e.path,
            e.kind.as_str(),
            e.mode,
            e.uid,
            e.gid,
            e.size as i64,
            e.mtime_ns,
            e.blake3.map(|h| h.0.to_vec()),
            (!e.chunks.is_empty()).then(|| e.chunk_blob()),
            e.target,
            e.rdev.map(|d| d as i64),
            xattrs,
        ])?;
    }
    Ok(())
}

/// Adds the namespace row for `name` unless it exists (mode 0755, owned by root).
fn ensure_namespace(conn: &Connection, name: &str, now_ns: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO namespaces (name, mode, uid, gid, mtime_ns, created_at)
         VALUES (?1, 493, 0, 0, ?2, ?2)",
    )?
    .execute(params![name, now_ns])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Open runs: namespaces, inodes and directory entries (schema 2). The mount's file-system view
// (`crate::vfs`) composes these calls inside one [`Meta`] scope per operation.

/// A namespace directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceRow {
    pub id: i64,
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
}

/// The content of an open-run file kept as a list of stored chunks (ADR 0025).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedContent {
    pub size: u64,
    pub hash: FileHash,
    pub chunks: Vec<ChunkRef>,
}

/// One inode of an open run. A regular file's content is inline (`inline_data`), a chunk list
/// (`chunked_files`) or its staging file, whose length is then authoritative; `size` is
/// meaningful for symlinks only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRow {
    pub ino: i64,
    pub run: i64,
    pub kind: Kind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub rdev: u64,
    pub target: Option<String>,
    /// Names of this inode (regular files; directories report theirs from their children).
    pub nlink: u32,
    pub xattrs: std::collections::BTreeMap<String, XattrValue>,
}

/// A scope for reading or writing open-run metadata: a transaction when writing.
pub struct Meta<'a> {
    conn: &'a Connection,
    path: &'a Path,
    default_retention: Option<&'a DefaultRetention>,
}

fn inode_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(InodeRow, String, Option<String>)> {
    Ok((
        InodeRow {
            ino: r.get(0)?,
            run: r.get(1)?,
            kind: Kind::File,
            mode: r.get(3)?,
            uid: r.get(4)?,
            gid: r.get(5)?,
            size: r.get::<_, i64>(6)? as u64,
            mtime_ns: r.get(7)?,
            ctime_ns: r.get(8)?,
            rdev: r.get::<_, i64>(9)? as u64,
            target: r.get(10)?,
            nlink: r.get(11)?,
            xattrs: Default::default(),
        },
        r.get(2)?,
        r.get(12)?,
    ))
}

fn finish_inode(raw: (InodeRow, String, Option<String>)) -> Result<InodeRow> {
    let (mut row, kind, xattrs) = raw;
    row.kind = Kind::parse(&kind)?;
    if let Some(x) = xattrs {
        row.xattrs = serde_json::from_str(&x)
            .map_err(|e| Error::corrupt(format!("xattrs of inode {}", row.ino), e.to_string()))?;
    }
    Ok(row)
}

fn xattrs_text(x: &std::collections::BTreeMap<String, XattrValue>) -> Result<Option<String>> {
    if x.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(x)
        .map(Some)
        .map_err(|e| Error::Internal(format!("xattrs encode: {e}")))
}

impl Index {
    /// Runs `f` over the open-run metadata without a transaction (reads).
    pub fn meta<T>(&self, f: impl FnOnce(&Meta<'_>) -> Result<T>) -> Result<T> {
        f(&Meta {
            conn: &self.conn,
            path: &self.path,
            default_retention: self.default_retention.as_ref(),
        })
    }

    /// Runs `f` with `synchronous=FULL`: its commit, and every commit before it, is on disk when
    /// it returns. For commits that other durable state depends on (a seal after which staging
    /// files are deleted; packs, so the index never lags what a manifest names).
    pub(crate) fn durable<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.commit_deferred()?;
        let path = self.path.clone();
        self.conn
            .execute_batch("PRAGMA synchronous=FULL")
            .map_err(sql_err(&path))?;
        let out = f(self);
        let reset = self
            .conn
            .execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(sql_err(&path));
        let out = out?;
        reset?;
        Ok(out)
    }

    /// Makes every commit so far durable (a checkpoint syncs the WAL, then the database).
    pub fn sync(&mut self) -> Result<()> {
        self.commit_deferred()?;
        let path = self.path.clone();
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(sql_err(&path))
    }

    /// Gives back to the file system what deletions left free in the index: the free pages of
    /// an index made with `auto_vacuum=INCREMENTAL` (every index created since that setting;
    /// an older one keeps reusing its free pages), then checkpoints and truncates the WAL
    /// (waiting at most 200 ms for readers). Called after a seal (an open run's inline file
    /// contents leave the index) and after gc.
    pub fn reclaim_space(&mut self) -> Result<()> {
        self.commit_deferred()?;
        let path = self.path.clone();
        let err = sql_err(&path);
        // One step frees one page: step to the end.
        let mut stmt = self
            .conn
            .prepare("PRAGMA incremental_vacuum")
            .map_err(&err)?;
        let mut rows = stmt.query([]).map_err(&err)?;
        while rows.next().map_err(&err)?.is_some() {}
        drop(rows);
        drop(stmt);
        // Truncating waits for readers to move on; they are short, and if one is not, the
        // WAL stays as it is until the next time (a busy checkpoint is no error).
        self.conn
            .busy_timeout(Duration::from_millis(200))
            .map_err(&err)?;
        let done = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(&err);
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
        done
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction, committed only if `f` succeeds. A
    /// deferred view transaction open before it commits with it.
    pub fn meta_write<T>(&mut self, f: impl FnOnce(&Meta<'_>) -> Result<T>) -> Result<T> {
        let out = self.write_step(f);
        let committed = self.commit_deferred();
        let out = out?;
        committed?;
        Ok(out)
    }

    /// A step of the view's deferred transaction that the close journal records (ADR 0031):
    /// `f` reads what it needs and returns the step, which is applied and queued for the
    /// journal's next write ([`Index::journal_close`]). Returns the step as applied (a
    /// `Create` with its inode number).
    pub(crate) fn journaled_step(
        &mut self,
        f: impl FnOnce(&Meta<'_>) -> Result<journal::Step>,
    ) -> Result<journal::Step> {
        let step = self.write_step(|m| {
            let mut step = f(m)?;
            step.apply(m)?;
            Ok(step)
        })?;
        if let Some(j) = self.journal.as_mut() {
            let seq = j.next_seq;
            j.next_seq = seq + 1;
            // The commit that takes this step sets the mark to it (`commit_deferred`).
            j.unmarked = true;
            if let Err(e) = j.push(seq, &step) {
                // The step is in the transaction but cannot be journaled: commit it.
                tracing::warn!("cannot journal a step, committing instead: {e}");
                self.commit_deferred()?;
            }
        }
        Ok(step)
    }

    /// A close: what it promises (every step so far) must outlive a crash of this process.
    /// Writes the journal's queued steps, leaving the transaction open, and commits it once a
    /// batch is full. Without a journal, or if the journal cannot be written (a full disk),
    /// commits.
    pub(crate) fn journal_close(&mut self) -> Result<()> {
        if !self.deferred {
            return Ok(());
        }
        let Some(j) = self.journal.as_mut() else {
            return self.commit_deferred();
        };
        if let Err(e) = j.write_pending() {
            tracing::debug!("index journal not written, committing instead: {e}");
            return self.commit_deferred();
        }
        j.closes += 1;
        j.first_close.get_or_insert_with(std::time::Instant::now);
        if (j.closes >= JOURNAL_BATCH_CLOSES || j.len() >= JOURNAL_BATCH_BYTES)
            && let Err(e) = self.commit_deferred()
        {
            // The close's steps are in the journal: if they are back in the transaction, the
            // close holds (the batch commits later); else it fails.
            if !(self.deferred && self.journal.as_ref().is_some_and(|j| !j.lost)) {
                return Err(e);
            }
            tracing::warn!("a batch of closes did not commit, it is kept in the journal: {e}");
        }
        Ok(())
    }

    /// Commits the journaled closes if the first of them is at least `age` old (the view
    /// calls it about once a second).
    pub(crate) fn commit_journal_after(&mut self, age: Duration) {
        if self
            .journal
            .as_ref()
            .and_then(|j| j.first_close)
            .is_some_and(|t| t.elapsed() >= age)
        {
            self.settle();
        }
    }

    /// What a failed commit does to the view's transaction (for tests): rolled back, the
    /// journal told.
    #[cfg(test)]
    pub(crate) fn roll_back_for_test(&mut self) {
        if self.deferred {
            self.conn.execute_batch("ROLLBACK").unwrap();
            self.deferred = false;
            self.after_rollback();
        }
    }

    /// What a kill -9 leaves (for tests): the open transaction gone, the journal file as it
    /// was written, and nothing committed when the index is dropped.
    #[cfg(test)]
    pub(crate) fn crash_for_test(&mut self) {
        self.journal = None;
        self.roll_back_for_test();
    }

    /// The last journal step the index holds (ADR 0031); `([0; 16], 0)` before any.
    fn journal_mark(&self) -> Result<journal::Mark> {
        let row = self
            .conn
            .prepare_cached("SELECT journal, seq FROM journal_mark WHERE id = 1")
            .and_then(|mut s| {
                s.query_row([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
                    .optional()
            })
            .map_err(self.err())?;
        match row {
            None => Ok(([0; 16], 0)),
            Some((id, seq)) => {
                let id: [u8; 16] = id.try_into().map_err(|_| {
                    Error::corrupt("journal_mark", "the journal id is not 16 bytes")
                })?;
                Ok((id, seq as u64))
            }
        }
    }

    /// Applies `steps` in the open transaction, setting the mark to the last.
    fn apply_steps(&self, id: &[u8; 16], steps: &mut [(u64, journal::Step)]) -> Result<()> {
        self.meta(|m| {
            for (seq, step) in steps.iter_mut() {
                step.apply(m)
                    .map_err(|e| Error::Internal(format!("journal step {seq}: {e}")))?;
            }
            match steps.last() {
                Some((seq, _)) => m.set_journal_mark(id, *seq),
                None => Ok(()),
            }
        })
    }

    /// Opens the store's close journal (ADR 0031), first applying what a crash left in it:
    /// the steps past the index's mark, in one transaction, made durable before the journal
    /// is emptied. A journal that cannot be applied (written for another index, unreadable, or
    /// a step that fails) is moved aside, never deleted, and the store opens without it: the
    /// error log says where it went. With `fresh` (a new or rebuilt index), an existing journal
    /// that holds steps is moved aside unapplied.
    pub(crate) fn open_journal(&mut self, fresh: bool) -> Result<()> {
        let path = journal::path_for(&self.path);
        let contents = if fresh {
            // An old index's journal with steps in it (a rebuild after a crash), or one that
            // cannot be read: kept.
            let keep = match journal::read(&path) {
                Ok(c) => c.is_some_and(|c| !c.steps.is_empty()),
                Err(_) => true,
            };
            if keep {
                let aside = journal::set_aside(&path)?;
                tracing::warn!(journal = %aside.display(), "a new index does not take the old index's journal: moved aside");
            }
            None
        } else {
            match journal::read(&path) {
                Ok(c) => c,
                Err(e) => {
                    let aside = journal::set_aside(&path)?;
                    tracing::error!(journal = %aside.display(), "the index journal cannot be read ({e}): moved aside, the store opens without the file changes it may hold");
                    None
                }
            }
        };
        if let Some(c) = contents {
            let (id, dropped) = (c.id, c.dropped_bytes);
            match c.unapplied(self.journal_mark()?) {
                None => {
                    let aside = journal::set_aside(&path)?;
                    tracing::error!(journal = %aside.display(), "the index journal was written for another index: moved aside");
                }
                Some(mut steps) if !steps.is_empty() => {
                    let n = steps.len();
                    let applied = self.durable(|idx| {
                        let tx = idx.conn.unchecked_transaction().map_err(idx.err())?;
                        idx.apply_steps(&id, &mut steps)?;
                        tx.commit().map_err(idx.err())
                    });
                    match applied {
                        Ok(()) => tracing::info!(
                            steps = n,
                            dropped_bytes = dropped,
                            "applied the file changes a crash left in the index journal"
                        ),
                        Err(e) => {
                            let aside = journal::set_aside(&path)?;
                            tracing::error!(journal = %aside.display(), "the index journal cannot be applied ({e}): moved aside, the store opens without the file changes it holds");
                        }
                    }
                }
                Some(_) => {}
            }
        }
        self.journal = Some(journal::Journal::create(&path, self.journal_mark()?)?);
        Ok(())
    }

    /// In a transaction just begun after a rollback took journaled steps with it: applies the
    /// journal's steps past the mark again. If they cannot be, the journal is moved aside and
    /// the error logged (what it holds is not lost, but the index goes on without it).
    fn restore_journal(&mut self) {
        let Some(j) = self.journal.as_ref() else {
            return;
        };
        let id = j.id;
        let r = j.written().and_then(|c| {
            let mark = self.journal_mark()?;
            let mut steps = match c.map(|c| c.unapplied(mark)) {
                None => return Ok(()),
                Some(Some(steps)) => steps,
                Some(None) => {
                    return Err(Error::Internal(
                        "the journal does not follow the index's mark".into(),
                    ));
                }
            };
            self.conn
                .execute_batch("SAVEPOINT restore")
                .map_err(self.err())?;
            match self.apply_steps(&id, &mut steps) {
                Ok(()) => self
                    .conn
                    .execute_batch("RELEASE restore")
                    .map_err(self.err()),
                Err(e) => {
                    let _ = self
                        .conn
                        .execute_batch("ROLLBACK TO restore; RELEASE restore");
                    Err(e)
                }
            }
        });
        let mark = self.journal_mark().unwrap_or(([0; 16], 0));
        let j = self.journal.as_mut().expect("checked above");
        j.lost = false;
        if let Err(e) = r {
            match j.set_aside(mark) {
                Ok(aside) => {
                    tracing::error!(journal = %aside.display(), "closed files a failed commit rolled back cannot be restored from the index journal ({e}): moved aside")
                }
                Err(e2) => {
                    tracing::error!(journal = %j.path().display(), "closed files a failed commit rolled back cannot be restored from the index journal ({e}), nor can it be moved aside: {e2}")
                }
            }
        }
    }

    /// Runs `f` as one step of the open write transaction, starting one if none is open; a
    /// failing step leaves the steps before it in place (a savepoint).
    fn write_step<T>(&mut self, f: impl FnOnce(&Meta<'_>) -> Result<T>) -> Result<T> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let run = |conn: &Connection, sql: &str| {
            conn.prepare_cached(sql)
                .and_then(|mut s| s.execute([]))
                .map_err(&err)
        };
        let fresh = !self.deferred;
        if fresh {
            run(&self.conn, "BEGIN IMMEDIATE")?;
            self.deferred = true;
            if self.journal.as_ref().is_some_and(|j| j.lost) {
                self.restore_journal();
            }
        } else {
            run(&self.conn, "SAVEPOINT step")?;
        }
        let out = f(&Meta {
            conn: &self.conn,
            path: &path,
            default_retention: self.default_retention.as_ref(),
        });
        match (&out, fresh) {
            (Ok(_), true) => {}
            (Ok(_), false) => {
                run(&self.conn, "RELEASE step")?;
            }
            (Err(e), _) if self.conn.is_autocommit() => {
                // SQLite rolled the whole transaction back itself (a full disk while spilling
                // pages to the WAL): the deferred changes before this step are gone too.
                self.deferred = false;
                self.rolled_back_full = e.is_disk_full();
                self.after_rollback();
            }
            (Err(_), true) => {
                run(&self.conn, "ROLLBACK")?;
                self.deferred = false;
                self.after_rollback();
            }
            (Err(_), false) => {
                run(&self.conn, "ROLLBACK TO step")?;
                run(&self.conn, "RELEASE step")?;
            }
        }
        out
    }

    /// Seals an open run in one transaction: the run row becomes `sealed` with its manifest,
    /// its metadata and entries become `run_meta` and `files` rows, the event `run.sealed` is
    /// appended, and its inodes and directory entries are deleted.
    pub fn seal_open_run(
        &mut self,
        run_id: i64,
        m: &Manifest,
        digest: &ManifestDigest,
        now_ns: i64,
        event_detail: serde_json::Value,
    ) -> Result<()> {
        self.durable(|s| s.seal_open_run_tx(run_id, m, digest, now_ns, event_detail))
    }

    fn seal_open_run_tx(
        &mut self,
        run_id: i64,
        m: &Manifest,
        digest: &ManifestDigest,
        now_ns: i64,
        event_detail: serde_json::Value,
    ) -> Result<()> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.begin()?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM runs WHERE id = ?1",
                params![run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(&err)?;
        if state.as_deref() != Some("open") {
            return Err(Error::State(format!(
                "run {}/{} is {} and cannot be sealed",
                m.namespace,
                m.run,
                state.as_deref().unwrap_or("missing")
            )));
        }
        let files = m.entries.iter().filter(|e| e.kind != Kind::Dir).count();
        tx.execute(
            "UPDATE runs SET state = 'sealed', manifest = ?2, sealed_at = ?3, files = ?4,
                             raw_bytes = ?5, root_ino = NULL WHERE id = ?1",
            params![
                run_id,
                digest.as_bytes(),
                now_ns,
                files as i64,
                m.raw_bytes() as i64
            ],
        )
        .map_err(&err)?;
        insert_run_entries(&tx, run_id, m).map_err(&err)?;
        retention::add_refs(&tx, &path, m, false)?;
        retention::fix_until_at_seal(&tx, &path, run_id, now_ns)?;
        tx.execute(
            "DELETE FROM dentries WHERE ino IN (SELECT ino FROM inodes WHERE run = ?1)",
            params![run_id],
        )
        .map_err(&err)?;
        tx.execute("DELETE FROM inodes WHERE run = ?1", params![run_id])
            .map_err(&err)?;
        append_event(
            &tx,
            now_ns,
            "run.sealed",
            Some(&m.namespace),
            Some(&m.run),
            &event_detail,
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)
    }

    /// The run (sealed, not deleted) whose manifest has this digest.
    pub fn run_by_manifest(&self, d: &ManifestDigest) -> Result<Option<RunRow>> {
        self.conn
            .prepare_cached(
                "SELECT id, namespace, name, state, manifest, created_at, sealed_at, files, raw_bytes
                 FROM runs WHERE manifest = ?1 AND state <> 'deleted' LIMIT 1",
            )
            .and_then(|mut s| s.query_row(params![d.as_bytes()], run_row).optional())
            .map_err(self.err())?
            .transpose()
    }

    /// A run by row id.
    pub fn run_by_id(&self, id: i64) -> Result<Option<RunRow>> {
        self.conn
            .prepare_cached(
                "SELECT id, namespace, name, state, manifest, created_at, sealed_at, files, raw_bytes
                 FROM runs WHERE id = ?1",
            )
            .and_then(|mut s| s.query_row(params![id], run_row).optional())
            .map_err(self.err())?
            .transpose()
    }
}

impl Meta<'_> {
    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        sql_err(self.path)
    }

    /// All namespaces, by name.
    pub fn namespaces(&self) -> Result<Vec<NamespaceRow>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT id, name, mode, uid, gid, mtime_ns FROM namespaces ORDER BY name",
            )
            .map_err(self.err())?;
        s.query_map([], ns_row)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())
    }

    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Result<Option<NamespaceRow>> {
        self.conn
            .prepare_cached(
                "SELECT id, name, mode, uid, gid, mtime_ns FROM namespaces WHERE name = ?1",
            )
            .and_then(|mut s| s.query_row(params![name], ns_row).optional())
            .map_err(self.err())
    }

    /// A namespace by id.
    pub fn namespace_by_id(&self, id: i64) -> Result<Option<NamespaceRow>> {
        self.conn
            .prepare_cached(
                "SELECT id, name, mode, uid, gid, mtime_ns FROM namespaces WHERE id = ?1",
            )
            .and_then(|mut s| s.query_row(params![id], ns_row).optional())
            .map_err(self.err())
    }

    /// Creates a namespace; returns its id.
    pub fn insert_namespace(&self, ns: &NamespaceRow, now_ns: i64) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO namespaces (name, mode, uid, gid, mtime_ns, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![ns.name, ns.mode, ns.uid, ns.gid, ns.mtime_ns, now_ns],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Rewrites a namespace's attributes.
    pub fn update_namespace(&self, ns: &NamespaceRow) -> Result<()> {
        self.conn
            .execute(
                "UPDATE namespaces SET mode = ?2, uid = ?3, gid = ?4, mtime_ns = ?5 WHERE id = ?1",
                params![ns.id, ns.mode, ns.uid, ns.gid, ns.mtime_ns],
            )
            .map_err(self.err())
            .map(drop)
    }

    /// Deletes a namespace row.
    pub fn delete_namespace(&self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM namespaces WHERE id = ?1", params![id])
            .map_err(self.err())
            .map(drop)
    }

    /// Creates an open run with its root directory inode and appends `run.opened`.
    /// Returns (run id, root inode).
    pub fn create_open_run(&self, r: &RunRef, root: &InodeRow, now_ns: i64) -> Result<(i64, i64)> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT state FROM runs WHERE namespace = ?1 AND name = ?2 AND state <> 'deleted'",
                params![r.namespace, r.run],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.err())?;
        if let Some(state) = exists {
            return Err(Error::AlreadyExists(format!("run {r} ({state})")));
        }
        self.conn
            .execute(
                "INSERT INTO runs (namespace, name, state, created_at) VALUES (?1, ?2, 'open', ?3)",
                params![r.namespace, r.run, now_ns],
            )
            .map_err(self.err())?;
        let run_id = self.conn.last_insert_rowid();
        let mut root = root.clone();
        root.run = run_id;
        let ino = self.insert_inode(&root)?;
        self.conn
            .execute(
                "UPDATE runs SET root_ino = ?2 WHERE id = ?1",
                params![run_id, ino],
            )
            .map_err(self.err())?;
        append_event(
            self.conn,
            now_ns,
            "run.opened",
            Some(&r.namespace),
            Some(&r.run),
            &serde_json::json!({}),
        )
        .map_err(self.err())?;
        retention::apply_default(
            self.conn,
            self.path,
            run_id,
            &r.namespace,
            &r.run,
            None,
            self.default_retention,
            now_ns,
        )?;
        Ok((run_id, ino))
    }

    /// The root inode of an open run.
    pub fn run_root(&self, run_id: i64) -> Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT root_ino FROM runs WHERE id = ?1")
            .and_then(|mut s| s.query_row(params![run_id], |r| r.get::<_, Option<i64>>(0)))
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    /// Runs (not deleted) of a namespace: (id, name, state).
    pub fn runs_of(&self, namespace: &str) -> Result<Vec<(i64, String, String)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT id, name, state FROM runs WHERE namespace = ?1 AND state <> 'deleted'
                 ORDER BY name",
            )
            .map_err(self.err())?;
        s.query_map(params![namespace], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(self.err())?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(self.err())
    }

    /// How many runs (not deleted) a namespace has: its directory's subdirectories. Counted
    /// in the index of run names, not listed: a namespace's attributes are asked for often.
    pub fn run_count(&self, namespace: &str) -> Result<u32> {
        self.conn
            .prepare_cached("SELECT count(*) FROM runs WHERE namespace = ?1 AND state <> 'deleted'")
            .and_then(|mut s| s.query_row(params![namespace], |r| r.get(0)))
            .map_err(self.err())
    }

    /// One run (not deleted) of a namespace: (id, state).
    pub fn run_of(&self, namespace: &str, name: &str) -> Result<Option<(i64, String)>> {
        self.conn
            .prepare_cached(
                "SELECT id, state FROM runs WHERE namespace = ?1 AND name = ?2 AND state <> 'deleted'",
            )
            .and_then(|mut s| {
                s.query_row(params![namespace, name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.err())
    }

    /// Removes open run `run_id` (`rmdir` of its directory): refused unless the run is open,
    /// its root directory is empty and it has no hold. Its rows go (inodes left without a name
    /// with it), the name is free again, and `run.removed` is appended.
    pub fn remove_open_run(&self, run_id: i64, r: &RunRef, now_ns: i64) -> Result<()> {
        let (state, root): (String, Option<i64>) = self
            .conn
            .query_row(
                "SELECT state, root_ino FROM runs WHERE id = ?1",
                params![run_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| Error::NotFound(format!("run {r}")))?;
        if state != "open" {
            return Err(Error::NotPermitted(format!(
                "run {r} is {state}: a sealed run is deleted by retention and gc, not rmdir"
            )));
        }
        if let Some(root) = root
            && self.has_children(root)?
        {
            return Err(Error::NotEmpty(format!("run {r}")));
        }
        let holds: Vec<String> = self
            .conn
            .prepare("SELECT name FROM holds WHERE run = ?1 ORDER BY name")
            .and_then(|mut s| {
                s.query_map(params![run_id], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(self.err())?;
        if !holds.is_empty() {
            return Err(Error::NotPermitted(format!(
                "run {r} has holds ({}): remove them before removing the run",
                holds.join(", ")
            )));
        }
        let conn = self.conn;
        (|| -> rusqlite::Result<()> {
            conn.execute(
                "DELETE FROM dentries WHERE parent IN (SELECT ino FROM inodes WHERE run = ?1)",
                params![run_id],
            )?;
            conn.execute("DELETE FROM inodes WHERE run = ?1", params![run_id])?;
            conn.execute("DELETE FROM run_meta WHERE run = ?1", params![run_id])?;
            conn.execute("DELETE FROM runs WHERE id = ?1", params![run_id])?;
            Ok(())
        })()
        .map_err(self.err())?;
        append_event(
            self.conn,
            now_ns,
            "run.removed",
            Some(&r.namespace),
            Some(&r.run),
            &serde_json::json!({"why": "rmdir"}),
        )
        .map_err(self.err())?;
        Ok(())
    }

    /// Ids of open runs.
    pub fn open_runs(&self) -> Result<Vec<i64>> {
        let mut s = self
            .conn
            .prepare_cached("SELECT id FROM runs WHERE state = 'open' ORDER BY id")
            .map_err(self.err())?;
        s.query_map([], |r| r.get(0))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())
    }

    /// One inode.
    pub fn inode(&self, ino: i64) -> Result<Option<InodeRow>> {
        self.conn
            .prepare_cached(concat!(
                "SELECT ",
                inode_cols!(),
                " FROM inodes WHERE ino = ?1"
            ))
            .and_then(|mut s| s.query_row(params![ino], inode_row).optional())
            .map_err(self.err())?
            .map(finish_inode)
            .transpose()
    }

    /// All inodes of a run.
    pub fn run_inodes(&self, run_id: i64) -> Result<Vec<InodeRow>> {
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                inode_cols!(),
                " FROM inodes WHERE run = ?1 ORDER BY ino"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![run_id], inode_row)
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter().map(finish_inode).collect()
    }

    /// Inodes no name refers to any more (left by a crash while they were open).
    pub fn orphan_inodes(&self) -> Result<Vec<(i64, i64)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT i.run, i.ino FROM inodes i JOIN runs r ON r.id = i.run
                 WHERE i.nlink = 0 AND r.root_ino IS NOT i.ino",
            )
            .map_err(self.err())?;
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())
    }

    /// Inserts an inode under its `ino`, or under a new number when that is 0; returns the
    /// number.
    pub fn insert_inode(&self, i: &InodeRow) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO inodes (ino, run, kind, mode, uid, gid, size, mtime_ns, ctime_ns,
                                     rdev, target, nlink, xattrs)
                 VALUES (?13, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    i.run,
                    i.kind.as_str(),
                    i.mode,
                    i.uid,
                    i.gid,
                    i.size as i64,
                    i.mtime_ns,
                    i.ctime_ns,
                    i.rdev as i64,
                    i.target,
                    i.nlink,
                    xattrs_text(&i.xattrs).map_err(|e| {
                        rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::other(
                            e.to_string(),
                        )))
                    })?,
                    // The caller's number, or (0) the next after the highest ever used.
                    (i.ino != 0).then_some(i.ino),
                ])
            })
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The next inode number [`Meta::insert_inode`] would give (one past the highest ever
    /// committed, removed ones included).
    pub fn next_inode_number(&self) -> Result<i64> {
        self.conn
            .query_row(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'inodes'), 0),
                            coalesce((SELECT max(ino) FROM inodes), 0)) + 1",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())
    }

    /// Rewrites an inode's attributes.
    pub fn update_inode(&self, i: &InodeRow) -> Result<()> {
        let x = xattrs_text(&i.xattrs)?;
        self.conn
            .prepare_cached(
                "UPDATE inodes SET mode = ?2, uid = ?3, gid = ?4, size = ?5, mtime_ns = ?6,
                                   ctime_ns = ?7, rdev = ?8, target = ?9, nlink = ?10, xattrs = ?11
                 WHERE ino = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    i.ino,
                    i.mode,
                    i.uid,
                    i.gid,
                    i.size as i64,
                    i.mtime_ns,
                    i.ctime_ns,
                    i.rdev as i64,
                    i.target,
                    i.nlink,
                    x
                ])
            })
            .map_err(self.err())
            .map(drop)
    }

    /// Sets only the modification and change times of an inode.
    pub fn set_times(&self, ino: i64, mtime_ns: i64, ctime_ns: i64) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE inodes SET mtime_ns = ?2, ctime_ns = ?3 WHERE ino = ?1")
            .and_then(|mut s| s.execute(params![ino, mtime_ns, ctime_ns]))
            .map_err(self.err())
            .map(drop)
    }

    /// The content of a file kept in the index (`None`: it is in its staging file).
    pub fn inline_data(&self, ino: i64) -> Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT data FROM inline_data WHERE ino = ?1")
            .and_then(|mut s| s.query_row(params![ino], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// The length of a file whose content the index holds, inline or as a chunk list (`None`:
    /// it is in its staging file).
    pub fn inline_len(&self, ino: i64) -> Result<Option<u64>> {
        self.conn
            .prepare_cached(
                "SELECT length(data) FROM inline_data WHERE ino = ?1
                 UNION ALL SELECT size FROM chunked_files WHERE ino = ?1",
            )
            .and_then(|mut s| s.query_row(params![ino], |r| r.get::<_, i64>(0)).optional())
            .map(|n| n.map(|n| n as u64))
            .map_err(self.err())
    }

    /// The inodes of `inos` that exist, each with the length of its content if the index
    /// holds it (inline or chunked): one statement (one read lock) for a listing's worth of attributes.
    pub fn inodes_with_inline_len(&self, inos: &[i64]) -> Result<Vec<(InodeRow, Option<u64>)>> {
        let list = serde_json::to_string(inos).map_err(|e| Error::Index {
            path: self.path.to_path_buf(),
            message: format!("inode list: {e}"),
        })?;
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                inode_cols!(),
                ", coalesce((SELECT length(data) FROM inline_data d WHERE d.ino = inodes.ino),
                            (SELECT size FROM chunked_files c WHERE c.ino = inodes.ino))
                 FROM inodes WHERE ino IN (SELECT value FROM json_each(?1))"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![list], |r| {
                Ok((inode_row(r)?, r.get::<_, Option<i64>>(13)?))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(raw, n)| Ok((finish_inode(raw)?, n.map(|n| n as u64))))
            .collect()
    }

    /// Keeps a file's content in the index.
    pub fn set_inline_data(&self, ino: i64, data: &[u8]) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO inline_data (ino, data) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![ino, data]))
            .map_err(self.err())
            .map(drop)
    }

    /// Drops a file's content from the index (it moved to its staging file).
    pub fn drop_inline_data(&self, ino: i64) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM inline_data WHERE ino = ?1")
            .and_then(|mut s| s.execute(params![ino]))
            .map_err(self.err())
            .map(drop)
    }

    /// A file's content as a chunk list, if it is one (ADR 0025).
    pub fn chunked(&self, ino: i64) -> Result<Option<ChunkedContent>> {
        let head: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT size, blake3 FROM chunked_files WHERE ino = ?1")
            .and_then(|mut s| {
                s.query_row(params![ino], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.err())?;
        let Some((size, hash)) = head else {
            return Ok(None);
        };
        let mut s = self
            .conn
            .prepare_cached("SELECT hash, len FROM chunked_chunks WHERE ino = ?1 ORDER BY seq")
            .map_err(self.err())?;
        let rows = s
            .query_map(params![ino], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        let chunks = rows
            .into_iter()
            .map(|(h, n)| Ok(ChunkRef(ChunkId::from_slice(&h)?, n as u32)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(ChunkedContent {
            size: size as u64,
            hash: FileHash::from_slice(&hash)?,
            chunks,
        }))
    }

    /// Makes a file's content the chunk list `c` (replacing inline content or an earlier
    /// list); every chunk must be stored (the trigger refuses one that is not).
    pub fn set_chunked(&self, ino: i64, c: &ChunkedContent) -> Result<()> {
        self.drop_inline_data(ino)?;
        self.drop_chunked(ino)?;
        self.conn
            .prepare_cached("INSERT INTO chunked_files (ino, size, blake3) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![ino, c.size as i64, c.hash.0.as_slice()]))
            .map_err(self.err())?;
        let mut s = self
            .conn
            .prepare_cached(
                "INSERT INTO chunked_chunks (ino, seq, hash, len) VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(self.err())?;
        for (i, r) in c.chunks.iter().enumerate() {
            s.execute(params![ino, i as i64, r.0.as_bytes(), r.1])
                .map_err(self.err())?;
        }
        Ok(())
    }

    /// Drops a file's chunk list and its references (it moved to its staging file).
    pub fn drop_chunked(&self, ino: i64) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM chunked_files WHERE ino = ?1")
            .and_then(|mut s| s.execute(params![ino]))
            .map_err(self.err())
            .map(drop)
    }

    /// Deletes an inode row.
    pub fn delete_inode(&self, ino: i64) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM inodes WHERE ino = ?1")
            .and_then(|mut s| s.execute(params![ino]))
            .map_err(self.err())
            .map(drop)
    }

    /// The inode `name` in directory `parent` names.
    pub fn lookup(&self, parent: i64, name: &str) -> Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2")
            .and_then(|mut s| s.query_row(params![parent, name], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// Records `seq` of journal `id` as the last journal step in the index (ADR 0031).
    pub fn set_journal_mark(&self, id: &[u8; 16], seq: u64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO journal_mark (id, journal, seq) VALUES (1, ?1, ?2)",
            )
            .and_then(|mut s| s.execute(params![&id[..], seq as i64]))
            .map_err(self.err())
            .map(drop)
    }

    /// Adds (or repoints) the name `name` in `parent`.
    pub fn set_dentry(&self, parent: i64, name: &str, ino: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO dentries (parent, name, ino) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut s| s.execute(params![parent, name, ino]))
            .map_err(self.err())
            .map(drop)
    }

    /// Removes the name `name` from `parent`.
    pub fn remove_dentry(&self, parent: i64, name: &str) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")
            .and_then(|mut s| s.execute(params![parent, name]))
            .map_err(self.err())
            .map(drop)
    }

    /// The entries of a directory, by name: (name, ino, kind).
    pub fn children(&self, parent: i64) -> Result<Vec<(String, i64, Kind)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT d.name, d.ino, i.kind FROM dentries d JOIN inodes i ON i.ino = d.ino
                 WHERE d.parent = ?1 ORDER BY d.name",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map(params![parent], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(n, i, k)| Ok((n, i, Kind::parse(&k)?)))
            .collect()
    }

    /// Number of entries in a directory, and how many of them are directories.
    pub fn child_counts(&self, parent: i64) -> Result<(u64, u64)> {
        self.conn
            .prepare_cached(
                "SELECT count(*), coalesce(sum(i.kind = 'dir'), 0) FROM dentries d
                 JOIN inodes i ON i.ino = d.ino WHERE d.parent = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![parent], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
            })
            .map_err(self.err())
    }

    /// Whether a directory has any entry.
    pub fn has_children(&self, dir: i64) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM dentries WHERE parent = ?1)")
            .and_then(|mut s| s.query_row(params![dir], |r| r.get(0)))
            .map_err(self.err())
    }

    /// The directory holding `ino` (for a directory, its only name).
    pub fn parent_of(&self, ino: i64) -> Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1")
            .and_then(|mut s| s.query_row(params![ino], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// Every directory entry of a run: (parent, name, ino).
    pub fn run_dentries(&self, run_id: i64) -> Result<Vec<(i64, String, i64)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT d.parent, d.name, d.ino FROM dentries d JOIN inodes i ON i.ino = d.ino
                 WHERE i.run = ?1",
            )
            .map_err(self.err())?;
        s.query_map(params![run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())
    }

    /// Appends an event.
    pub fn event(
        &self,
        now_ns: i64,
        kind: &str,
        run: Option<&RunRef>,
        detail: &serde_json::Value,
    ) -> Result<i64> {
        append_event(
            self.conn,
            now_ns,
            kind,
            run.map(|r| r.namespace.as_str()),
            run.map(|r| r.run.as_str()),
            detail,
        )
        .map_err(self.err())
    }
}

fn ns_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NamespaceRow> {
    Ok(NamespaceRow {
        id: r.get(0)?,
        name: r.get(1)?,
        mode: r.get(2)?,
        uid: r.get(3)?,
        gid: r.get(4)?,
        mtime_ns: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_moves_the_generation_once_it_has_taken_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = Index::open(&dir.path().join("index.sqlite"), true).unwrap();
        idx.conn
            .execute_batch("CREATE TABLE scratch (v INTEGER)")
            .unwrap();
        let before = commit_generation();
        let tx = idx.begin().unwrap();
        tx.execute("INSERT INTO scratch VALUES (1)", []).unwrap();
        tx.commit().unwrap();
        assert!(commit_generation() > before);
    }

    #[test]
    fn the_commit_hook_still_checkpoints_the_wal() {
        // The hook takes the place of SQLite's automatic checkpoints: without them the WAL
        // would grow by every page written, here to about 55 MB.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut idx = Index::open(&path, true).unwrap();
        idx.conn
            .execute_batch("CREATE TABLE scratch (b BLOB)")
            .unwrap();
        for _ in 0..130 {
            let tx = idx.begin().unwrap();
            tx.execute("INSERT INTO scratch VALUES (randomblob(400000))", [])
                .unwrap();
            tx.commit().unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("index.sqlite-wal"))
            .unwrap()
            .len();
        let page = 4096 + 24;
        assert!(
            wal <= (AUTOCHECKPOINT_PAGES as u64 + 200) * page,
            "WAL of {wal} bytes: no checkpoint ran"
        );
    }
}
