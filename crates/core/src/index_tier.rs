//! The index's tiering state: which packs and manifests have a verified copy in the remote
//! tier, which packs are still in the local cache, and when each was last read.
//!
//! Schema (migration 3 -> 4, see `docs/format.md`): a pack with no `tier_packs` row is local
//! only and pending upload; a row means the remote copy was uploaded *and verified*
//! (`remote_at`), and `local` says whether the local file is still cached. Only packs with a
//! row may be evicted (`local` 1 -> 0), so nothing leaves the local store before it is safely
//! remote. Manifests are never evicted; `tier_manifests` only records which are remote. The
//! rows of a pack go with its `packs` row (`ON DELETE CASCADE`), so gc need not know them.
//!
//! Only SQL lives here; the policy (what to upload, when to evict) is `crate::tier`'s.

use rusqlite::{OptionalExtension, params};

use crate::error::Result;
use crate::id::{ManifestDigest, PackId};
use crate::index::Index;

/// Migration 3 -> 4: tiering state.
pub(crate) const MIGRATION_TIER: &str = r#"
    CREATE TABLE tier_packs (
        hash        BLOB PRIMARY KEY REFERENCES packs(hash) ON DELETE CASCADE,
        remote_at   INTEGER NOT NULL,
        local       INTEGER NOT NULL,
        last_read   INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX tier_packs_lru ON tier_packs(local, last_read);
    CREATE TABLE tier_manifests (
        digest      BLOB PRIMARY KEY,
        remote_at   INTEGER NOT NULL
    ) WITHOUT ROWID;
"#;

/// Counts of packs and manifests by where they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierCounts {
    /// Packs only in the local store: pending upload.
    pub pending_packs: u64,
    pub pending_pack_bytes: u64,
    /// Packs verified remote and still cached locally.
    pub both_packs: u64,
    pub both_pack_bytes: u64,
    /// Packs verified remote and evicted from the local store.
    pub remote_only_packs: u64,
    pub remote_only_pack_bytes: u64,
    /// Manifests of runs whose manifest is not yet verified remote.
    pub pending_manifests: u64,
    /// Manifests verified remote (they are always kept locally too).
    pub remote_manifests: u64,
}

/// A pack that may be evicted: verified remote, still local.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evictable {
    pub pack: PackId,
    pub size: u64,
    pub last_read_ns: i64,
}

impl Index {
    /// Packs with no verified remote copy, oldest first: (id, size).
    pub fn tier_pending_packs(&self) -> Result<Vec<(PackId, u64)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT p.hash, p.size FROM packs p LEFT JOIN tier_packs t ON t.hash = p.hash
                 WHERE t.hash IS NULL ORDER BY p.id",
            )
            .map_err(self.err_tier())?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err_tier())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err_tier())?;
        rows.into_iter()
            .map(|(h, n)| Ok((PackId::from_slice(&h)?, n as u64)))
            .collect()
    }

    /// Manifest digests of runs that have one, not yet verified remote.
    pub fn tier_pending_manifests(&self) -> Result<Vec<ManifestDigest>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT r.manifest FROM runs r LEFT JOIN tier_manifests t
                 ON t.digest = r.manifest WHERE r.manifest IS NOT NULL AND r.state <> 'deleted' AND t.digest IS NULL",
            )
            .map_err(self.err_tier())?;
        let rows = s
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(self.err_tier())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err_tier())?;
        rows.iter().map(|h| ManifestDigest::from_slice(h)).collect()
    }

    /// Records that a pack's remote copy is verified; `local` says whether the local file is
    /// there. Durable on return. Returns false (and records nothing) when the pack is no
    /// longer indexed (gc removed it meanwhile).
    pub fn tier_mark_pack_remote(
        &mut self,
        pack: &PackId,
        local: bool,
        now_ns: i64,
    ) -> Result<bool> {
        self.durable(|s| {
            s.conn
                .execute(
                    "INSERT INTO tier_packs (hash, remote_at, local, last_read)
                     SELECT hash, ?2, ?3, ?2 FROM packs WHERE hash = ?1
                     ON CONFLICT (hash) DO UPDATE SET remote_at = excluded.remote_at,
                                                     local = excluded.local",
                    params![pack.as_bytes(), now_ns, local as i64],
                )
                .map(|n| n > 0)
                .map_err(s.err_tier())
        })
    }

    /// Records that a manifest's remote copy is verified. Durable on return.
    pub fn tier_mark_manifest_remote(&mut self, d: &ManifestDigest, now_ns: i64) -> Result<()> {
        self.durable(|s| {
            s.conn
                .execute(
                    "INSERT OR REPLACE INTO tier_manifests (digest, remote_at) VALUES (?1, ?2)",
                    params![d.as_bytes(), now_ns],
                )
                .map(drop)
                .map_err(s.err_tier())
        })
    }

    /// Marks a remote pack as no longer in the local cache. Durable on return; call before
    /// deleting the local file. Returns false when the pack has no verified remote copy (then
    /// it must not be evicted).
    pub fn tier_mark_pack_evicted(&mut self, pack: &PackId) -> Result<bool> {
        self.durable(|s| {
            s.conn
                .execute(
                    "UPDATE tier_packs SET local = 0 WHERE hash = ?1",
                    params![pack.as_bytes()],
                )
                .map(|n| n > 0)
                .map_err(s.err_tier())
        })
    }

    /// Whether a pack has a verified remote copy, and if so whether it is cached locally.
    pub fn tier_pack_state(&self, pack: &PackId) -> Result<Option<bool>> {
        self.conn
            .prepare_cached("SELECT local FROM tier_packs WHERE hash = ?1")
            .and_then(|mut s| {
                s.query_row(params![pack.as_bytes()], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map(|o| o.map(|l| l != 0))
            .map_err(self.err_tier())
    }

    /// Saves last-read times noted in memory (one transaction; unknown packs are skipped).
    pub fn tier_note_reads(&mut self, reads: &[(PackId, i64)]) -> Result<()> {
        if reads.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let err = crate::index::sql_err(&path);
        let tx = self.begin()?;
        {
            let mut up = tx
                .prepare_cached(
                    "UPDATE tier_packs SET last_read = max(last_read, ?2) WHERE hash = ?1",
                )
                .map_err(&err)?;
            for (p, at) in reads {
                up.execute(params![p.as_bytes(), at]).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)
    }

    /// Bytes of pack files the local store holds (pending and cached).
    pub fn tier_local_pack_bytes(&self) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT coalesce(sum(p.size), 0) FROM packs p LEFT JOIN tier_packs t
                 ON t.hash = p.hash WHERE t.hash IS NULL OR t.local = 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(self.err_tier())
    }

    /// Packs that may be evicted, least recently read first.
    pub fn tier_evictable(&self) -> Result<Vec<Evictable>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT t.hash, p.size, t.last_read FROM tier_packs t JOIN packs p
                 ON p.hash = t.hash WHERE t.local = 1 ORDER BY t.last_read, p.id",
            )
            .map_err(self.err_tier())?;
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.err_tier())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err_tier())?;
        rows.into_iter()
            .map(|(h, size, at)| {
                Ok(Evictable {
                    pack: PackId::from_slice(&h)?,
                    size: size as u64,
                    last_read_ns: at,
                })
            })
            .collect()
    }

    /// Where packs and manifests are.
    pub fn tier_counts(&self) -> Result<TierCounts> {
        let pair = |sql: &str| -> Result<(u64, u64)> {
            self.conn
                .query_row(sql, [], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
                .map_err(self.err_tier())
        };
        let (pending_packs, pending_pack_bytes) = pair(
            "SELECT count(*), coalesce(sum(p.size), 0) FROM packs p LEFT JOIN tier_packs t
             ON t.hash = p.hash WHERE t.hash IS NULL",
        )?;
        let (both_packs, both_pack_bytes) = pair(
            "SELECT count(*), coalesce(sum(p.size), 0) FROM packs p JOIN tier_packs t
             ON t.hash = p.hash WHERE t.local = 1",
        )?;
        let (remote_only_packs, remote_only_pack_bytes) = pair(
            "SELECT count(*), coalesce(sum(p.size), 0) FROM packs p JOIN tier_packs t
             ON t.hash = p.hash WHERE t.local = 0",
        )?;
        let (pending_manifests, remote_manifests) = pair(
            "SELECT count(DISTINCT r.manifest) FILTER (WHERE t.digest IS NULL),
                    count(DISTINCT r.manifest) FILTER (WHERE t.digest IS NOT NULL)
             FROM runs r LEFT JOIN tier_manifests t ON t.digest = r.manifest
             WHERE r.manifest IS NOT NULL AND r.state <> 'deleted'",
        )?;
        Ok(TierCounts {
            pending_packs,
            pending_pack_bytes,
            both_packs,
            both_pack_bytes,
            remote_only_packs,
            remote_only_pack_bytes,
            pending_manifests,
            remote_manifests,
        })
    }

    fn err_tier(&self) -> impl Fn(rusqlite::Error) -> crate::error::Error + '_ {
        crate::index::sql_err(&self.path)
    }
}

/// Copies the index at `index` into a new database file at `dst` with SQLite's online backup,
/// through a connection of its own (WAL lets it read while the store writes).
pub(crate) fn snapshot_index(index: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    let err = crate::index::sql_err(index);
    let src = rusqlite::Connection::open_with_flags(
        index,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    src.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(&err)?;
    let mut out = rusqlite::Connection::open(dst).map_err(crate::index::sql_err(dst))?;
    let backup = rusqlite::backup::Backup::new(&src, &mut out).map_err(&err)?;
    loop {
        match backup.step(-1).map_err(&err)? {
            rusqlite::backup::StepResult::Done => break,
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    drop(backup);
    out.execute_batch("PRAGMA journal_mode=DELETE")
        .map_err(crate::index::sql_err(dst))?;
    Ok(())
}

impl Index {
    /// After an index was restored from a snapshot on a machine with an empty cache: no pack
    /// is local any more.
    pub fn tier_forget_local(&mut self) -> Result<()> {
        self.conn
            .execute("UPDATE tier_packs SET local = 0", [])
            .map(drop)
            .map_err(self.err_tier())
    }

    /// Every indexed pack id.
    pub fn tier_pack_ids(&self) -> Result<std::collections::HashSet<PackId>> {
        Ok(self.packs()?.into_iter().map(|(p, _)| p).collect())
    }

    /// Every manifest digest runs name, and the runs (namespace/name) naming each.
    pub fn tier_run_manifests(&self) -> Result<Vec<(ManifestDigest, String)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT manifest, namespace || '/' || name FROM runs WHERE manifest IS NOT NULL AND state <> 'deleted'",
            )
            .map_err(self.err_tier())?;
        let rows = s
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(self.err_tier())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err_tier())?;
        rows.into_iter()
            .map(|(d, n)| Ok((ManifestDigest::from_slice(&d)?, n)))
            .collect()
    }
}

/// Event kinds that change what a run's or a namespace's lifecycle record in the remote tier
/// says: retention, holds, a seal (a retention set while the run was open becomes recordable),
/// a deletion (the record goes), and namespace defaults.
pub(crate) const LIFECYCLE_KINDS: &[&str] = &[
    "run.retention",
    "run.hold_placed",
    "run.hold_removed",
    "run.sealed",
    "run.expired",
    "run.lost",
    "namespace.retention",
];

/// One event that may change a lifecycle record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub seq: i64,
    pub kind: String,
    pub namespace: String,
    /// `None` for a namespace's default.
    pub run: Option<String>,
}

impl Index {
    /// The newest event's `seq` (0 when the log is empty).
    pub fn tier_last_event_seq(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(self.err_tier())
    }

    /// Events of [`LIFECYCLE_KINDS`] with `after < seq <= upto`, in order.
    pub fn tier_lifecycle_events(&self, after: i64, upto: i64) -> Result<Vec<LifecycleEvent>> {
        let kinds = LIFECYCLE_KINDS
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = self
            .conn
            .prepare_cached(&format!(
                "SELECT seq, kind, namespace, run FROM events
                 WHERE seq > ?1 AND seq <= ?2 AND namespace IS NOT NULL AND kind IN ({kinds})
                 ORDER BY seq"
            ))
            .map_err(self.err_tier())?;
        s.query_map(params![after, upto], |r| {
            Ok(LifecycleEvent {
                seq: r.get(0)?,
                kind: r.get(1)?,
                namespace: r.get(2)?,
                run: r.get(3)?,
            })
        })
        .map_err(self.err_tier())?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(self.err_tier())
    }

    /// When the lifecycle of a run (`Some(run)`) or of a namespace's default (`None`) last
    /// changed: the time of its newest retention or hold event (unix ns), if any. This is the
    /// version of its lifecycle record.
    pub fn tier_lifecycle_version(
        &self,
        namespace: &str,
        run: Option<&str>,
    ) -> Result<Option<i64>> {
        let one = |r: &rusqlite::Row<'_>| r.get::<_, Option<i64>>(0);
        match run {
            Some(run) => self.conn.query_row(
                "SELECT max(at) FROM events WHERE namespace = ?1 AND run = ?2
                 AND kind IN ('run.retention', 'run.hold_placed', 'run.hold_removed')",
                params![namespace, run],
                one,
            ),
            None => self.conn.query_row(
                "SELECT max(at) FROM events WHERE namespace = ?1 AND run IS NULL
                 AND kind = 'namespace.retention'",
                params![namespace],
                one,
            ),
        }
        .map_err(self.err_tier())
    }

    /// Every run's and namespace's lifecycle version at once (see
    /// [`Index::tier_lifecycle_version`]), keyed by (namespace, run).
    pub fn tier_lifecycle_versions(
        &self,
    ) -> Result<std::collections::HashMap<(String, Option<String>), i64>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT namespace, run, max(at) FROM events WHERE namespace IS NOT NULL
                 AND kind IN ('run.retention', 'run.hold_placed', 'run.hold_removed',
                              'namespace.retention')
                 GROUP BY namespace, run",
            )
            .map_err(self.err_tier())?;
        s.query_map([], |r| {
            Ok(((r.get::<_, String>(0)?, r.get(1)?), r.get::<_, i64>(2)?))
        })
        .map_err(self.err_tier())?
        .collect::<rusqlite::Result<_>>()
        .map_err(self.err_tier())
    }

    /// Restores a sealed run's retention and holds as a lifecycle record states them, without
    /// the compliance rule (it restores recorded state), in one transaction with one event per
    /// change, each at `at_ns` and marked `"rebuilt": true` (as a rebuild records seals).
    /// Returns whether anything changed.
    pub fn tier_restore_lifecycle(
        &mut self,
        run: &crate::index::RunRow,
        retention: &crate::retention::RetentionState,
        holds: &[crate::index::HoldRow],
        at_ns: i64,
    ) -> Result<bool> {
        let current = self.run_retention(run)?;
        let path = self.path.clone();
        let err = crate::index::sql_err(&path);
        let tx = self.begin()?;
        let event =
            |kind: &str, detail: serde_json::Value| {
                tx.execute(
                "INSERT INTO events (at, kind, namespace, run, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![at_ns, kind, run.run.namespace, run.run.run, detail.to_string()],
            )
            };
        let mut changed = false;
        if current.retention != *retention {
            tx.execute(
                "UPDATE runs SET retain = ?2, retain_for_ns = ?3, retain_until = ?4 WHERE id = ?1",
                params![run.id, retention.spec, retention.for_ns, retention.until_ns],
            )
            .map_err(&err)?;
            event(
                "run.retention",
                serde_json::json!({
                    "retain": retention.spec,
                    "retain_until": retention.until_ns,
                    "previous": current.retention.spec,
                    "previous_until": current.retention.until_ns,
                    "override": false,
                    "reason": null,
                    "rebuilt": true,
                }),
            )
            .map_err(&err)?;
            changed = true;
        }
        for old in &current.holds {
            if !holds.iter().any(|h| h.name == old.name) {
                tx.execute(
                    "DELETE FROM holds WHERE run = ?1 AND name = ?2",
                    params![run.id, old.name],
                )
                .map_err(&err)?;
                event(
                    "run.hold_removed",
                    serde_json::json!({ "hold": old.name, "rebuilt": true }),
                )
                .map_err(&err)?;
                changed = true;
            }
        }
        for h in holds {
            let old = current.holds.iter().find(|o| o.name == h.name);
            if old == Some(h) {
                continue;
            }
            tx.execute(
                "INSERT INTO holds (run, name, reason, placed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (run, name) DO UPDATE SET reason = excluded.reason,
                                                      placed_at = excluded.placed_at",
                params![run.id, h.name, h.reason, h.placed_at_ns],
            )
            .map_err(&err)?;
            event(
                "run.hold_placed",
                serde_json::json!({
                    "hold": h.name,
                    "reason": h.reason,
                    "previous_reason": old.map(|o| o.reason.clone()),
                    "rebuilt": true,
                }),
            )
            .map_err(&err)?;
            changed = true;
        }
        tx.commit().map_err(&err)?;
        Ok(changed)
    }

    /// Restores a namespace's default retention from its lifecycle record, with a
    /// `namespace.retention` event at `at_ns` marked `"rebuilt": true`. Returns false when the
    /// namespace is not indexed or already has that default.
    pub fn tier_restore_namespace_retention(
        &mut self,
        namespace: &str,
        spec: Option<&str>,
        at_ns: i64,
    ) -> Result<bool> {
        let current: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT retain FROM namespaces WHERE name = ?1",
                params![namespace],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err_tier())?;
        match current {
            None => return Ok(false),
            Some(c) if c.as_deref() == spec => return Ok(false),
            Some(_) => {}
        }
        let path = self.path.clone();
        let err = crate::index::sql_err(&path);
        let tx = self.begin()?;
        tx.execute(
            "UPDATE namespaces SET retain = ?2 WHERE name = ?1",
            params![namespace, spec],
        )
        .map_err(&err)?;
        tx.execute(
            "INSERT INTO events (at, kind, namespace, run, detail) VALUES (?1, 'namespace.retention', ?2, NULL, ?3)",
            params![
                at_ns,
                namespace,
                serde_json::json!({ "retain": spec, "rebuilt": true }).to_string()
            ],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(true)
    }
}
