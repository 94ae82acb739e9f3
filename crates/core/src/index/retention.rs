//! The index side of retention, holds, reference counts and gc (schema 3).
//!
//! - `runs.retain` is the retention value as set, `retain_for_ns` its duration when it counts
//!   from the seal, `retain_until` the instant once known (at the seal for a duration).
//! - `holds` has one row per named hold of a run.
//! - `chunks.refs` counts the references to a chunk from the files of live sealed runs (one per
//!   occurrence in a file's chunk list). Sealing adds them, in the sealing transaction, and fails
//!   if a chunk it names has no row (it was swept); expiring a run subtracts them, in the
//!   expiring transaction. Open runs hold no chunk references: their bytes are staged files.
//! - A deleted run keeps its `runs` row (name, manifest digest, times, metadata) as a tombstone
//!   with `state = 'deleted'`; its `files` rows go.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Index, RunRow, append_event, run_row, sql_err};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestDigest, PackId};
use crate::manifest::{Entry, Manifest};
use crate::names::RunRef;
use crate::pack::PackEntry;
use crate::retention::{Retention, RetentionState};

/// A default retention for new runs: a duration from the seal, or forever.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultRetention {
    pub spec: String,
    pub retention: Retention,
}

/// A named hold on a run.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HoldRow {
    pub name: String,
    pub reason: String,
    pub placed_at_ns: i64,
}

/// A run with its retention and holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRetention {
    pub run: RunRow,
    pub retention: RetentionState,
    pub holds: Vec<HoldRow>,
}

/// What expiring one run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiredRun {
    pub run: RunRow,
    pub retain_until_ns: i64,
    /// Chunk references dropped.
    pub refs_dropped: u64,
    /// Chunks whose count reached zero.
    pub chunks_unreferenced: u64,
}

/// A pack's size and what in it is still referenced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackUsage {
    pub pack: PackId,
    pub size: u64,
    pub created_at_ns: i64,
    pub chunks: u64,
    pub live_chunks: u64,
    pub live_stored_bytes: u64,
}

/// What a sweep removed (or would remove).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepStats {
    pub chunks: u64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

fn blob_refs(b: &[u8], counts: &mut HashMap<ChunkId, i64>) -> Result<()> {
    for c in Entry::chunks_from_blob(b)? {
        *counts.entry(c.0).or_default() += 1;
    }
    Ok(())
}

/// How many times the files of the sealed runs name each chunk.
fn live_ref_counts(conn: &Connection, path: &Path) -> Result<HashMap<ChunkId, i64>> {
    let err = sql_err(path);
    let mut counts: HashMap<ChunkId, i64> = HashMap::new();
    let mut s = conn
        .prepare(
            "SELECT f.chunks FROM files f JOIN runs r ON r.id = f.run
             WHERE r.state = 'sealed' AND f.chunks IS NOT NULL",
        )
        .map_err(&err)?;
    let mut rows = s.query([]).map_err(&err)?;
    while let Some(row) = rows.next().map_err(&err)? {
        let b: Vec<u8> = row.get(0).map_err(&err)?;
        blob_refs(&b, &mut counts)?;
    }
    // Files of open runs kept as chunk lists (schema 7, ADR 0025) hold references too.
    let chunked: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'chunked_chunks')",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    if chunked {
        let mut s = conn
            .prepare("SELECT hash, count(*) FROM chunked_chunks GROUP BY hash")
            .map_err(&err)?;
        let mut rows = s.query([]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let h: Vec<u8> = row.get(0).map_err(&err)?;
            let n: i64 = row.get(1).map_err(&err)?;
            *counts.entry(ChunkId::from_slice(&h)?).or_default() += n;
        }
    }
    Ok(counts)
}

/// Sets `chunks.refs` from the files of every sealed run (migration 2 → 3, and a recount).
/// With `record_lost` (schema 6 on), the counts of chunks without a row go to `lost_chunks`,
/// which is emptied first.
pub(super) fn backfill_refs(tx: &Connection, path: &Path, record_lost: bool) -> Result<()> {
    let err = sql_err(path);
    let counts = live_ref_counts(tx, path)?;
    let mut up = tx
        .prepare("UPDATE chunks SET refs = ?2 WHERE hash = ?1")
        .map_err(&err)?;
    let mut lost = if record_lost {
        tx.execute("DELETE FROM lost_chunks", []).map_err(&err)?;
        Some(
            tx.prepare("INSERT INTO lost_chunks (hash, refs) VALUES (?1, ?2)")
                .map_err(&err)?,
        )
    } else {
        None
    };
    for (id, n) in counts {
        if up.execute(params![id.as_bytes(), n]).map_err(&err)? == 0
            && let Some(lost) = lost.as_mut()
        {
            lost.execute(params![id.as_bytes(), n]).map_err(&err)?;
        }
    }
    Ok(())
}

/// A pack just indexed may hold chunks recorded as lost: their rows take over the lost
/// references, so the runs that name them are whole again and gc counts them.
pub(super) fn take_over_lost_refs(tx: &Connection, path: &Path) -> Result<()> {
    let err = sql_err(path);
    let any: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM lost_chunks)")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(&err)?;
    if !any {
        return Ok(());
    }
    let found = tx
        .execute(
            "UPDATE chunks SET refs = chunks.refs + l.refs FROM lost_chunks l
             WHERE l.hash = chunks.hash",
            [],
        )
        .map_err(&err)?;
    if found > 0 {
        tx.execute(
            "DELETE FROM lost_chunks WHERE EXISTS (SELECT 1 FROM chunks c WHERE c.hash = lost_chunks.hash)",
            [],
        )
        .map_err(&err)?;
        tracing::info!(chunks = found, "chunks recorded as lost are stored again");
    }
    Ok(())
}

/// Adds one reference per chunk occurrence of a sealed run's files. A chunk without a row
/// fails it (and so the seal: the index must never refer to bytes that are not stored), unless
/// `lost_ok` (a run a rebuild found): then its references go to `lost_chunks`. Returns how
/// many distinct chunks were lost.
pub(super) fn add_refs(tx: &Connection, path: &Path, m: &Manifest, lost_ok: bool) -> Result<u64> {
    let err = sql_err(path);
    // In key order (a BTreeMap): each page of the chunks table is then read and changed once,
    // where a hash map's order visits them at random, again and again once they outnumber
    // the cache.
    let mut counts: BTreeMap<ChunkId, i64> = BTreeMap::new();
    for e in &m.entries {
        for c in &e.chunks {
            *counts.entry(c.0).or_default() += 1;
        }
    }
    let mut up = tx
        .prepare_cached("UPDATE chunks SET refs = refs + ?2 WHERE hash = ?1")
        .map_err(&err)?;
    let mut lost = 0;
    for (id, n) in counts {
        if up.execute(params![id.as_bytes(), n]).map_err(&err)? != 1 {
            if lost_ok {
                tx.prepare_cached(
                    "INSERT INTO lost_chunks (hash, refs) VALUES (?1, ?2)
                     ON CONFLICT (hash) DO UPDATE SET refs = refs + excluded.refs",
                )
                .and_then(|mut s| s.execute(params![id.as_bytes(), n]))
                .map_err(&err)?;
                lost += 1;
                continue;
            }
            return Err(Error::MissingObject {
                key: format!("chunk {id}"),
                backend: format!(
                    "index (run {}/{} names a chunk the store does not hold; seal again)",
                    m.namespace, m.run
                ),
            });
        }
    }
    Ok(lost)
}

/// Sets `retain_until` of a run that seals now from its duration, if it has one.
pub(super) fn fix_until_at_seal(
    tx: &Connection,
    path: &Path,
    run_id: i64,
    sealed_at: i64,
) -> Result<()> {
    tx.execute(
        "UPDATE runs SET retain_until = min(?2 + retain_for_ns, 9223372036854775807)
         WHERE id = ?1 AND retain_for_ns IS NOT NULL",
        params![run_id, sealed_at],
    )
    .map_err(sql_err(path))?;
    Ok(())
}

/// Gives a new run the namespace's default retention, else the store's, and records it.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_default(
    conn: &Connection,
    path: &Path,
    run_id: i64,
    namespace: &str,
    run: &str,
    sealed_at: Option<i64>,
    store_default: Option<&DefaultRetention>,
    now_ns: i64,
) -> Result<()> {
    let err = sql_err(path);
    let ns_spec: Option<String> = conn
        .query_row(
            "SELECT retain FROM namespaces WHERE name = ?1",
            params![namespace],
            |r| r.get(0),
        )
        .optional()
        .map_err(&err)?
        .flatten();
    let (spec, retention, source) = match ns_spec {
        Some(s) => {
            let r = Retention::parse(&s, now_ns)?;
            (s, r, "namespace default")
        }
        None => match store_default {
            Some(d) => (d.spec.clone(), d.retention, "store default"),
            None => return Ok(()),
        },
    };
    let until = retention.until(sealed_at);
    conn.execute(
        "UPDATE runs SET retain = ?2, retain_for_ns = ?3, retain_until = ?4 WHERE id = ?1",
        params![run_id, spec, retention.for_ns(), until],
    )
    .map_err(&err)?;
    append_event(
        conn,
        now_ns,
        "run.retention",
        Some(namespace),
        Some(run),
        &serde_json::json!({ "retain": spec, "retain_until": until, "source": source }),
    )
    .map_err(&err)?;
    Ok(())
}

/// A run's producer metadata: (key, value) by key.
pub type RunMeta = Vec<(String, String)>;

/// Columns of the rows [`super::run_row`] reads, as a literal for `concat!`.
macro_rules! run_cols {
    () => {
        concat!(
            "id, namespace, name, state, manifest, created_at, sealed_at, ",
            live_counts!()
        )
    };
}

impl Index {
    /// Sets the store-wide default retention that new runs get (from the store's config).
    pub fn set_default_retention(&mut self, d: Option<DefaultRetention>) {
        self.default_retention = d;
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits it.
    pub(super) fn write_tx<T>(
        &mut self,
        f: impl FnOnce(&Connection, &Path) -> Result<T>,
    ) -> Result<T> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.begin()?;
        let out = f(&tx, &path)?;
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    /// A run's retention and holds.
    pub fn run_retention(&self, run: &RunRow) -> Result<RunRetention> {
        let err = self.err();
        let (spec, for_ns, until_ns) = self
            .conn
            .prepare_cached("SELECT retain, retain_for_ns, retain_until FROM runs WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row(params![run.id], |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                })
            })
            .map_err(&err)?;
        Ok(RunRetention {
            run: run.clone(),
            retention: RetentionState {
                spec,
                for_ns,
                until_ns,
            },
            holds: self.holds(run.id)?,
        })
    }

    /// A run (not deleted) with its retention, holds and producer metadata (by key), read by
    /// one statement: one consistent snapshot without a transaction of its own, for a run's
    /// details, which an API serves far more often than anything changes them.
    pub fn run_with_retention(&self, r: &crate::RunRef) -> Result<Option<(RunRetention, RunMeta)>> {
        let found = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                run_cols!(),
                ", retain, retain_for_ns, retain_until,
                   (SELECT json_group_array(json_array(name, reason, placed_at))
                      FROM holds WHERE run = runs.id),
                   (SELECT json_group_array(json_array(key, value))
                      FROM run_meta WHERE run = runs.id),
                   (SELECT xattrs FROM inodes WHERE ino = runs.root_ino AND run = runs.id)
                 FROM runs WHERE namespace = ?1 AND name = ?2 AND state <> 'deleted'"
            ))
            .and_then(|mut s| {
                s.query_row(params![r.namespace, r.run], |row| {
                    Ok((
                        super::run_row(row)?,
                        RetentionState {
                            spec: row.get(9)?,
                            for_ns: row.get(10)?,
                            until_ns: row.get(11)?,
                        },
                        row.get::<_, String>(12)?,
                        row.get::<_, String>(13)?,
                        row.get::<_, Option<String>>(14)?,
                    ))
                })
                .optional()
            })
            .map_err(self.err())?;
        let Some((run, retention, holds, meta, open_xattrs)) = found else {
            return Ok(None);
        };
        let run = run?;
        let bad = |what: &str, e: serde_json::Error| Error::Index {
            path: self.path.clone(),
            message: format!("{what} of run {r} read back as bad JSON: {e}"),
        };
        let mut holds: Vec<HoldRow> = serde_json::from_str::<Vec<(String, String, i64)>>(&holds)
            .map_err(|e| bad("holds", e))?
            .into_iter()
            .map(|(name, reason, placed_at_ns)| HoldRow {
                name,
                reason,
                placed_at_ns,
            })
            .collect();
        holds.sort_by(|a, b| a.name.cmp(&b.name));
        let mut meta: RunMeta = serde_json::from_str(&meta).map_err(|e| bad("metadata", e))?;
        // An open run's metadata is still its directory's `user.*` xattrs; the seal turns
        // them into `run_meta` rows by the same rule.
        if run.state == "open"
            && let Some(x) = open_xattrs
        {
            let xattrs: std::collections::BTreeMap<String, crate::manifest::XattrValue> =
                serde_json::from_str(&x).map_err(|e| bad("run directory xattrs", e))?;
            meta.extend(crate::ingest::producer_metadata(&xattrs));
        }
        meta.sort();
        Ok(Some((
            RunRetention {
                run,
                retention,
                holds,
            },
            meta,
        )))
    }

    /// Holds of a run, by name.
    pub fn holds(&self, run_id: i64) -> Result<Vec<HoldRow>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT name, reason, placed_at FROM holds WHERE run = ?1 ORDER BY name",
            )
            .map_err(self.err())?;
        s.query_map(params![run_id], |r| {
            Ok(HoldRow {
                name: r.get(0)?,
                reason: r.get(1)?,
                placed_at_ns: r.get(2)?,
            })
        })
        .map_err(self.err())?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(self.err())
    }

    /// Records a run's new retention and its event, in one transaction. The caller has checked
    /// the rules; `detail` describes the change.
    pub fn set_run_retention(
        &mut self,
        run: &RunRow,
        spec: &str,
        r: &Retention,
        now_ns: i64,
        detail: serde_json::Value,
    ) -> Result<()> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let n = tx
                .execute(
                    "UPDATE runs SET retain = ?2, retain_for_ns = ?3, retain_until = ?4
                     WHERE id = ?1 AND state IN ('open', 'sealed')",
                    params![run.id, spec, r.for_ns(), r.until(run.sealed_at_ns)],
                )
                .map_err(&err)?;
            if n != 1 {
                return Err(Error::NotFound(format!("run {}", run.run)));
            }
            append_event(
                tx,
                now_ns,
                "run.retention",
                Some(&run.run.namespace),
                Some(&run.run.run),
                &detail,
            )
            .map_err(&err)?;
            Ok(())
        })
    }

    /// The default retention of a namespace's new runs.
    pub fn namespace_retention(&self, namespace: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT retain FROM namespaces WHERE name = ?1",
                params![namespace],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    /// Sets (or with `None` removes) a namespace's default retention, with an event.
    pub fn set_namespace_retention(
        &mut self,
        namespace: &str,
        spec: Option<&str>,
        now_ns: i64,
    ) -> Result<()> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            if spec.is_some() {
                // A default set before the namespace's first run makes the namespace, as
                // that run would (an empty directory in the mount).
                super::ensure_namespace(tx, namespace, now_ns).map_err(&err)?;
            }
            let n = tx
                .execute(
                    "UPDATE namespaces SET retain = ?2 WHERE name = ?1",
                    params![namespace, spec],
                )
                .map_err(&err)?;
            if n != 1 {
                return Err(Error::NotFound(format!("namespace {namespace}")));
            }
            append_event(
                tx,
                now_ns,
                "namespace.retention",
                Some(namespace),
                None,
                &serde_json::json!({ "retain": spec }),
            )
            .map_err(&err)?;
            Ok(())
        })
    }

    /// Places (or updates the reason of) a named hold, with an event. Returns whether it is new.
    pub fn place_hold(
        &mut self,
        run: &RunRow,
        name: &str,
        reason: &str,
        now_ns: i64,
    ) -> Result<bool> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM runs WHERE id = ?1",
                    params![run.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            if !matches!(state.as_deref(), Some("open" | "sealed")) {
                return Err(Error::NotFound(format!("run {}", run.run)));
            }
            let old: Option<String> = tx
                .query_row(
                    "SELECT reason FROM holds WHERE run = ?1 AND name = ?2",
                    params![run.id, name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            if old.as_deref() == Some(reason) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO holds (run, name, reason, placed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (run, name) DO UPDATE SET reason = excluded.reason",
                params![run.id, name, reason, now_ns],
            )
            .map_err(&err)?;
            append_event(
                tx,
                now_ns,
                "run.hold_placed",
                Some(&run.run.namespace),
                Some(&run.run.run),
                &serde_json::json!({ "hold": name, "reason": reason, "previous_reason": old }),
            )
            .map_err(&err)?;
            Ok(old.is_none())
        })
    }

    /// Removes a named hold, with an event; [`Error::NoAttr`] if there is none of that name.
    pub fn remove_hold(&mut self, run: &RunRow, name: &str, now_ns: i64) -> Result<()> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let n = tx
                .execute(
                    "DELETE FROM holds WHERE run = ?1 AND name = ?2",
                    params![run.id, name],
                )
                .map_err(&err)?;
            if n == 0 {
                return Err(Error::NoAttr(format!(
                    "run {} has no hold {name:?}",
                    run.run
                )));
            }
            append_event(
                tx,
                now_ns,
                "run.hold_removed",
                Some(&run.run.namespace),
                Some(&run.run.run),
                &serde_json::json!({ "hold": name }),
            )
            .map_err(&err)?;
            Ok(())
        })
    }

    /// Sealed runs eligible for deletion at `now_ns` (retain-until passed, no holds), oldest
    /// retain-until first.
    pub fn eligible_runs(&self, now_ns: i64) -> Result<Vec<(RunRow, i64)>> {
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                run_cols!(),
                ", retain_until FROM runs
                 WHERE state = 'sealed' AND retain_until <= ?1
                   AND retain_until < 9223372036854775807
                   AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.run = runs.id)
                 ORDER BY retain_until, id"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![now_ns], |r| Ok((run_row(r)?, r.get::<_, i64>(9)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter().map(|(r, u)| Ok((r?, u))).collect()
    }

    /// Chunk references of a run's files, per chunk.
    pub fn run_refs(&self, run_id: i64) -> Result<HashMap<ChunkId, i64>> {
        let mut counts = HashMap::new();
        let mut s = self
            .conn
            .prepare_cached("SELECT chunks FROM files WHERE run = ?1 AND chunks IS NOT NULL")
            .map_err(self.err())?;
        let mut rows = s.query(params![run_id]).map_err(self.err())?;
        while let Some(row) = rows.next().map_err(self.err())? {
            let b: Vec<u8> = row.get(0).map_err(self.err())?;
            blob_refs(&b, &mut counts)?;
        }
        Ok(counts)
    }

    /// Expires one run in one transaction, if it is still eligible at `now_ns`: it becomes a
    /// tombstone (`deleted`, its row, metadata and manifest digest kept), its files' chunk
    /// references are dropped and `run.expired` is appended. `None` if it is no longer eligible
    /// (a hold or an extension arrived meanwhile).
    pub fn expire_run(&mut self, run_id: i64, now_ns: i64) -> Result<Option<ExpiredRun>> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let row = tx
                .query_row(
                    concat!(
                        "SELECT ",
                        run_cols!(),
                        ", retain_until FROM runs
                         WHERE id = ?1 AND state = 'sealed' AND retain_until <= ?2
                           AND retain_until < 9223372036854775807
                           AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.run = runs.id)"
                    ),
                    params![run_id, now_ns],
                    |r| Ok((run_row(r)?, r.get::<_, i64>(9)?)),
                )
                .optional()
                .map_err(&err)?;
            let Some((run, until)) = row else {
                return Ok(None);
            };
            let run = run?;
            let mut counts = HashMap::new();
            {
                let mut s = tx
                    .prepare_cached(
                        "SELECT chunks FROM files WHERE run = ?1 AND chunks IS NOT NULL",
                    )
                    .map_err(&err)?;
                let mut rows = s.query(params![run_id]).map_err(&err)?;
                while let Some(row) = rows.next().map_err(&err)? {
                    let b: Vec<u8> = row.get(0).map_err(&err)?;
                    blob_refs(&b, &mut counts)?;
                }
            }
            let mut dropped = 0u64;
            let mut zero = 0u64;
            {
                let mut dec = tx
                    .prepare_cached(
                        "UPDATE chunks SET refs = refs - ?2 WHERE hash = ?1 RETURNING refs",
                    )
                    .map_err(&err)?;
                for (id, n) in &counts {
                    let left: Option<i64> = dec
                        .query_row(params![id.as_bytes(), n], |r| r.get(0))
                        .optional()
                        .map_err(&err)?;
                    match left {
                        Some(l) if l < 0 => {
                            return Err(Error::corrupt(
                                format!("reference count of chunk {id}"),
                                "drops below zero; run `artifactfs verify`",
                            ));
                        }
                        Some(0) => zero += 1,
                        Some(_) => {}
                        None => {
                            // A chunk a rebuild found lost: its references are kept there.
                            let left: Option<i64> = tx
                                .prepare_cached(
                                    "UPDATE lost_chunks SET refs = refs - ?2 WHERE hash = ?1
                                     RETURNING refs",
                                )
                                .and_then(|mut s| {
                                    s.query_row(params![id.as_bytes(), n], |r| r.get(0))
                                        .optional()
                                })
                                .map_err(&err)?;
                            match left {
                                Some(l) if l <= 0 => {
                                    tx.execute(
                                        "DELETE FROM lost_chunks WHERE hash = ?1",
                                        params![id.as_bytes()],
                                    )
                                    .map_err(&err)?;
                                }
                                Some(_) => {}
                                None => {
                                    return Err(Error::corrupt(
                                        format!("run {}", run.run),
                                        format!("names chunk {id}, which the index does not hold"),
                                    ));
                                }
                            }
                        }
                    }
                    dropped += *n as u64;
                }
            }
            tx.execute("DELETE FROM files WHERE run = ?1", params![run_id])
                .map_err(&err)?;
            tx.execute(
                "UPDATE runs SET state = 'deleted', deleted_at = ?2 WHERE id = ?1",
                params![run_id, now_ns],
            )
            .map_err(&err)?;
            append_event(
                tx,
                now_ns,
                "run.expired",
                Some(&run.run.namespace),
                Some(&run.run.run),
                &serde_json::json!({
                    "manifest": run.manifest.map(|d| d.to_hex()),
                    "retain_until": until,
                    "files": run.files,
                    "raw_bytes": run.raw_bytes,
                }),
            )
            .map_err(&err)?;
            Ok(Some(ExpiredRun {
                run,
                retain_until_ns: until,
                refs_dropped: dropped,
                chunks_unreferenced: zero,
            }))
        })
    }

    /// Reference counts of the given chunks (absent chunks are left out).
    pub fn chunk_refs(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, i64>> {
        let mut s = self
            .conn
            .prepare_cached("SELECT refs FROM chunks WHERE hash = ?1")
            .map_err(self.err())?;
        let mut out = HashMap::with_capacity(ids.len());
        for id in ids {
            if let Some(n) = s
                .query_row(params![id.as_bytes()], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(self.err())?
            {
                out.insert(*id, n);
            }
        }
        Ok(out)
    }

    /// How many chunks have no reference.
    pub fn unreferenced_chunks(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM chunks WHERE refs = 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// Unreferenced chunks in packs written at or before `cutoff_ns`: what a sweep removes.
    pub fn sweepable(&self, cutoff_ns: i64) -> Result<Vec<(ChunkId, PackId, u64, u64)>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT c.hash, p.hash, c.stored_len, c.raw_len FROM chunks c
                 JOIN packs p ON p.id = c.pack WHERE c.refs = 0 AND p.created_at <= ?1",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map(params![cutoff_ns], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(c, p, s, r)| {
                Ok((
                    ChunkId::from_slice(&c)?,
                    PackId::from_slice(&p)?,
                    s as u64,
                    r as u64,
                ))
            })
            .collect()
    }

    /// Deletes the rows of unreferenced chunks in packs written at or before `cutoff_ns`, in
    /// one transaction that re-checks the count (a chunk referenced again meanwhile stays).
    pub fn sweep_chunks(&mut self, cutoff_ns: i64) -> Result<SweepStats> {
        self.durable(|s| {
            s.write_tx(|tx, path| {
                let err = sql_err(path);
                let (chunks, stored, raw): (i64, Option<i64>, Option<i64>) = tx
                    .query_row(
                        "SELECT count(*), sum(stored_len), sum(raw_len) FROM chunks
                         WHERE refs = 0 AND pack IN (SELECT id FROM packs WHERE created_at <= ?1)",
                        params![cutoff_ns],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .map_err(&err)?;
                tx.execute(
                    "DELETE FROM chunks
                     WHERE refs = 0 AND pack IN (SELECT id FROM packs WHERE created_at <= ?1)",
                    params![cutoff_ns],
                )
                .map_err(&err)?;
                Ok(SweepStats {
                    chunks: chunks as u64,
                    stored_bytes: stored.unwrap_or(0) as u64,
                    raw_bytes: raw.unwrap_or(0) as u64,
                })
            })
        })
    }

    /// Every pack with its size and what in it is referenced.
    pub fn pack_usage(&self) -> Result<Vec<PackUsage>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT p.hash, p.size, p.created_at, p.chunks,
                        count(c.hash), coalesce(sum(c.stored_len), 0)
                 FROM packs p LEFT JOIN chunks c ON c.pack = p.id
                 GROUP BY p.id ORDER BY p.id",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(h, size, created, chunks, live, live_bytes)| {
                Ok(PackUsage {
                    pack: PackId::from_slice(&h)?,
                    size: size as u64,
                    created_at_ns: created,
                    chunks: chunks as u64,
                    live_chunks: live as u64,
                    live_stored_bytes: live_bytes as u64,
                })
            })
            .collect()
    }

    /// The chunks of a pack that still have rows, in offset order.
    pub fn pack_chunks(&self, pack: &PackId) -> Result<Vec<PackEntry>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT c.hash, c.codec, c.raw_len, c.stored_len, c.offset FROM chunks c
                 JOIN packs p ON p.id = c.pack WHERE p.hash = ?1 ORDER BY c.offset",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map(params![pack.as_bytes()], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(h, codec, raw_len, stored_len, offset)| {
                Ok(PackEntry {
                    chunk: ChunkId::from_slice(&h)?,
                    codec: Codec::from_u8(codec)?,
                    raw_len,
                    stored_len,
                    offset: offset as u64,
                })
            })
            .collect()
    }

    /// Forgets a pack that no chunk row refers to any more (its object is deleted after this
    /// commits). Returns false, changing nothing, if chunks still live in it.
    pub fn drop_empty_pack(&mut self, pack: &PackId) -> Result<bool> {
        self.durable(|s| {
            s.write_tx(|tx, path| {
                let err = sql_err(path);
                let live: i64 = tx
                    .query_row(
                        "SELECT count(*) FROM chunks c JOIN packs p ON p.id = c.pack
                         WHERE p.hash = ?1",
                        params![pack.as_bytes()],
                        |r| r.get(0),
                    )
                    .map_err(&err)?;
                if live != 0 {
                    return Ok(false);
                }
                tx.execute(
                    "DELETE FROM packs WHERE hash = ?1",
                    params![pack.as_bytes()],
                )
                .map_err(&err)?;
                Ok(true)
            })
        })
    }

    /// Points the chunks of `moved` (now durable in the new pack `new`) at it, in one
    /// transaction with the new pack's row. Chunks that vanished meanwhile are skipped.
    pub fn move_chunks(
        &mut self,
        new: &PackId,
        size: u64,
        moved: &[PackEntry],
        now_ns: i64,
    ) -> Result<()> {
        self.durable(|s| {
            s.write_tx(|tx, path| {
                let err = sql_err(path);
                let row = super::pack_row(tx, new, size, moved.len(), now_ns).map_err(&err)?;
                let mut up = tx
                    .prepare_cached(
                        "UPDATE chunks SET pack = ?2, offset = ?3, stored_len = ?4, codec = ?5
                         WHERE hash = ?1",
                    )
                    .map_err(&err)?;
                for e in moved {
                    up.execute(params![
                        e.chunk.as_bytes(),
                        row,
                        e.offset as i64,
                        e.stored_len,
                        e.codec as u8
                    ])
                    .map_err(&err)?;
                }
                Ok(())
            })
        })
    }

    /// Digests of the manifests of runs that are not deleted.
    pub fn live_manifests(&self) -> Result<HashSet<ManifestDigest>> {
        self.manifests_of_runs(false)
    }

    /// The manifest of every run the index has recorded, deleted runs (tombstones) included.
    pub fn recorded_manifests(&self) -> Result<HashSet<ManifestDigest>> {
        self.manifests_of_runs(true)
    }

    fn manifests_of_runs(&self, with_deleted: bool) -> Result<HashSet<ManifestDigest>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT manifest FROM runs
                 WHERE (?1 OR state <> 'deleted') AND manifest IS NOT NULL",
            )
            .map_err(self.err())?;
        let rows = s
            .query_map([with_deleted], |r| r.get::<_, Vec<u8>>(0))
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.iter().map(|b| ManifestDigest::from_slice(b)).collect()
    }

    /// Chunks whose stored reference count (in `chunks`, or in `lost_chunks` for chunks a
    /// rebuild found lost) differs from a recount over the live runs' files: (chunk, stored
    /// count, counted). Empty when the counts are right.
    pub fn refcount_mismatches(&self) -> Result<Vec<(ChunkId, i64, i64)>> {
        let mut counts = live_ref_counts(&self.conn, &self.path)?;
        let mut out = Vec::new();
        for table in ["chunks", "lost_chunks"] {
            let mut s = self
                .conn
                .prepare(&format!("SELECT hash, refs FROM {table}"))
                .map_err(self.err())?;
            let mut rows = s.query([]).map_err(self.err())?;
            while let Some(row) = rows.next().map_err(self.err())? {
                let h: Vec<u8> = row.get(0).map_err(self.err())?;
                let refs: i64 = row.get(1).map_err(self.err())?;
                let id = ChunkId::from_slice(&h)?;
                let counted = counts.remove(&id).unwrap_or(0);
                if counted != refs {
                    out.push((id, refs, counted));
                }
            }
        }
        // Chunks referenced but neither stored nor recorded as lost are reported by verify's
        // chunk check.
        Ok(out)
    }

    /// Makes a run whose objects are gone a tombstone (a rebuild found its manifest missing
    /// from the bucket), with the event `run.lost`. Reference counts are not changed here:
    /// call [`Index::recount_refs`] afterwards.
    pub fn tombstone_lost_run(&mut self, r: &RunRef, now_ns: i64, why: &str) -> Result<bool> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let id: Option<i64> = tx
                .query_row(
                    "SELECT id FROM runs WHERE namespace = ?1 AND name = ?2 AND state <> 'deleted'",
                    params![r.namespace, r.run],
                    |row| row.get(0),
                )
                .optional()
                .map_err(&err)?;
            let Some(id) = id else { return Ok(false) };
            tx.execute("DELETE FROM files WHERE run = ?1", params![id])
                .map_err(&err)?;
            tx.execute("DELETE FROM holds WHERE run = ?1", params![id])
                .map_err(&err)?;
            tx.execute(
                "UPDATE runs SET state = 'deleted', deleted_at = ?2 WHERE id = ?1",
                params![id, now_ns],
            )
            .map_err(&err)?;
            append_event(
                tx,
                now_ns,
                "run.lost",
                Some(&r.namespace),
                Some(&r.run),
                &serde_json::json!({ "why": why }),
            )
            .map_err(&err)?;
            Ok(true)
        })
    }

    /// Records chunks found damaged (their stored bytes do not decode to their id, or their
    /// pack is gone) as lost: each row moves from `chunks` to `lost_chunks` with its reference
    /// count, in one transaction with a `chunks.lost` event. No read is sent to bytes known to
    /// be bad again, the writer's lookup no longer finds them, so the next store of the same
    /// bytes (any ingest or write of them) writes them anew, and the new row takes the
    /// references over ([`take_over_lost_refs`]): the damaged runs are whole again. The
    /// damaged copy becomes dead bytes of its pack, for gc. A chunk nothing references (in
    /// gc's grace period) only loses its row.
    ///
    /// Each chunk comes with the pack it was found damaged in: a row that names another pack
    /// by now (gc moved the chunk while it was checked) is left alone. Returns how many rows
    /// moved.
    pub fn mark_chunks_lost(
        &mut self,
        found: &[(ChunkId, PackId)],
        now_ns: i64,
        why: &str,
    ) -> Result<u64> {
        if found.is_empty() {
            return Ok(0);
        }
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let mut moved = Vec::new();
            {
                let mut save = tx
                    .prepare_cached(
                        "INSERT INTO lost_chunks (hash, refs)
                         SELECT hash, refs FROM chunks
                         WHERE hash = ?1 AND pack = (SELECT id FROM packs WHERE hash = ?2)
                               AND refs > 0
                         ON CONFLICT (hash) DO UPDATE SET refs = lost_chunks.refs + excluded.refs",
                    )
                    .map_err(&err)?;
                let mut del = tx
                    .prepare_cached(
                        "DELETE FROM chunks
                         WHERE hash = ?1 AND pack = (SELECT id FROM packs WHERE hash = ?2)",
                    )
                    .map_err(&err)?;
                for (id, pack) in found {
                    let at = params![id.as_bytes(), pack.as_bytes()];
                    save.execute(at).map_err(&err)?;
                    if del.execute(at).map_err(&err)? > 0 {
                        moved.push(id.to_hex());
                    }
                }
            }
            if !moved.is_empty() {
                append_event(
                    tx,
                    now_ns,
                    "chunks.lost",
                    None,
                    None,
                    &serde_json::json!({ "chunks": moved, "why": why }),
                )
                .map_err(&err)?;
            }
            Ok(moved.len() as u64)
        })
    }

    /// Which of `ids` are recorded as lost.
    pub fn lost_among(&self, ids: &[ChunkId]) -> Result<HashSet<ChunkId>> {
        let mut s = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM lost_chunks WHERE hash = ?1)")
            .map_err(self.err())?;
        let mut out = HashSet::new();
        for id in ids {
            if s.query_row(params![id.as_bytes()], |r| r.get::<_, bool>(0))
                .map_err(self.err())?
            {
                out.insert(*id);
            }
        }
        Ok(out)
    }

    /// Sets every chunk's reference count from the live runs' files (after a rebuild).
    pub fn recount_refs(&mut self) -> Result<()> {
        self.write_tx(|tx, path| {
            tx.execute("UPDATE chunks SET refs = 0", [])
                .map_err(sql_err(path))?;
            backfill_refs(tx, path, true)
        })
    }

    /// Records a tombstone a replaced index held (a rebuild finds no manifest of a deleted
    /// run): its `runs` row as it was, with its metadata. Returns false, changing nothing, when
    /// the index has a run of that name with that manifest already (live or deleted).
    pub fn restore_tombstone(
        &mut self,
        row: &RunRow,
        deleted_at_ns: i64,
        meta: &[(String, String)],
    ) -> Result<bool> {
        self.write_tx(|tx, path| {
            let err = sql_err(path);
            let manifest = row.manifest.map(|d| d.as_bytes().to_vec());
            let known: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM runs WHERE namespace = ?1 AND name = ?2
                                    AND manifest IS ?3)",
                    params![row.run.namespace, row.run.run, manifest],
                    |r| r.get(0),
                )
                .map_err(&err)?;
            if known {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO runs (namespace, name, state, manifest, created_at, sealed_at, files,
                                   raw_bytes, deleted_at)
                 VALUES (?1, ?2, 'deleted', ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    row.run.namespace,
                    row.run.run,
                    manifest,
                    row.created_at_ns,
                    row.sealed_at_ns,
                    row.files as i64,
                    row.raw_bytes as i64,
                    deleted_at_ns
                ],
            )
            .map_err(&err)?;
            let id = tx.last_insert_rowid();
            let mut ins = tx
                .prepare_cached("INSERT INTO run_meta (run, key, value) VALUES (?1, ?2, ?3)")
                .map_err(&err)?;
            for (k, v) in meta {
                ins.execute(params![id, k, v]).map_err(&err)?;
            }
            Ok(true)
        })
    }

    /// The deleted runs (tombstones), newest first.
    pub fn tombstones(&self, namespace: Option<&str>) -> Result<Vec<(RunRow, i64)>> {
        let mut s = self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                run_cols!(),
                ", deleted_at FROM runs
                 WHERE state = 'deleted' AND (?1 IS NULL OR namespace = ?1)
                 ORDER BY deleted_at DESC, id DESC"
            ))
            .map_err(self.err())?;
        let rows = s
            .query_map(params![namespace], |r| {
                Ok((run_row(r)?, r.get::<_, Option<i64>>(9)?.unwrap_or(0)))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        rows.into_iter().map(|(r, d)| Ok((r?, d))).collect()
    }
}
