//! `index rebuild`: a new index from the packs' chunk tables and the manifests alone (ADR 0004),
//! from the store's own objects, from its remote tier, or on an empty machine from a bucket.
//!
//! What comes back: every pack and its chunks (`packs`, `chunks`), every sealed run with its
//! metadata and entries (`runs`, `run_meta`, `files`, `namespaces`, one `run.opened` and one
//! `run.sealed` event each, at the manifest's `sealed_at`), and the tiering state (a pack or
//! manifest the remote tier lists with the same size is recorded as remote; a pack is local
//! when the local store has it). What does not: open runs of a mount (their metadata lived
//! only in the index), the rest of the event log, and anything a later schema adds that is not
//! in a manifest. When two manifests name the same run (a run deleted and made again), the
//! one sealed last wins and the others are reported.
//!
//! The index being replaced, when there is one and it can be read, fills in what the objects
//! do not say: a sealed run it knew whose manifest object is gone has its manifest written
//! again from its rows when they give the same digest back, and is reported lost otherwise;
//! its tombstones are taken over (ADR 0024).
//!
//! The new event log continues the numbering of the one it replaces (ADR 0012): it starts after
//! the highest `seq` of the old index, of earlier replaced ones and of the readers' cursor
//! files, with an `index.rebuilt` event, so that nobody holding a `seq` of the old log takes
//! new events for ones already seen.
//!
//! Retention and holds come back from the lifecycle records (`lifecycle/`, see `crate::tier`;
//! in the bucket of a tiered store, in the local object store of an untiered one): after the snapshot (if any) and the manifests, the record of each live
//! sealed run whose manifest it names is applied when it is newer than what the index has,
//! without the compliance rule (it restores recorded state), with one event per change at the
//! record's version time marked `"rebuilt": true`; likewise namespace defaults. A record of a
//! run that is gone, or of an earlier run of the same name, is reported and not applied.
//!
//! Rebuild trusts a remote object whose listed size matches and whose table (or digest)
//! checks; `artifactfs verify` re-reads everything afterwards.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::clock::to_unix_ns;
use crate::error::{Error, Result};
use crate::id::ManifestDigest;
use crate::index::HoldRow;
use crate::manifest::{self, Manifest, manifest_key};
use crate::names::RunRef;
use crate::objstore::{LocalStore, ObjectStore};
use crate::pack::{pack_id_from_key, read_table};
use crate::store::{Store, StoreConfig};
use crate::tier::{
    LIFECYCLE_PREFIX, LifecycleRecord, REMOTE_CONFIG_KEY, TierConfig, parse_lifecycle_key,
};

/// Where a rebuild moves local objects it cannot read, relative to the store's root.
pub const QUARANTINE: &str = "quarantine";

/// What a rebuild found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    pub packs: u64,
    pub chunks: u64,
    pub runs: u64,
    pub remote_packs: u64,
    pub remote_manifests: u64,
    /// Objects that could not be used, one line each (damaged packs, manifests of a run
    /// already restored from a newer manifest, …).
    pub skipped: Vec<String>,
    /// Runs restored whole from their manifests that name chunks no readable pack holds
    /// (`NS/RUN: N chunks lost`): `verify` names their damaged files; storing the same bytes
    /// again (any ingest of them) repairs them.
    pub damaged_runs: Vec<String>,
    /// Local packs and manifests that could not be read, moved from `objects/` to
    /// `quarantine/` so that gc does not delete them as orphans (their intact bytes may still
    /// be salvaged); a tiered store uses the bucket's copy instead when it is good.
    pub quarantined: Vec<String>,
    /// Where the previous index was moved, when there was one.
    pub old_index: Option<String>,
    /// The index snapshot the rebuild started from, when it used one.
    pub snapshot: Option<String>,
    /// Packs and runs found in the bucket but not in the snapshot, indexed from their objects.
    pub replayed_packs: u64,
    pub replayed_runs: u64,
    /// Runs and namespaces whose retention or holds were restored from lifecycle records.
    pub lifecycle_restored: u64,
    /// The highest event `seq` the replaced log gave out or a reader of it recorded; the new
    /// log is numbered after it (its first event, `index.rebuilt`, is `events_after + 1`).
    pub events_after: i64,
    /// Sealed runs of the previous index whose manifest object is gone, written again from
    /// that index's rows (checked against the digest): `NS/RUN: manifest DIGEST`.
    pub manifests_restored: Vec<String>,
    /// Sealed runs of the previous index that could not be restored: their manifest object is
    /// gone (or damaged) and the previous index's rows do not give its digest back.
    pub lost_runs: Vec<String>,
    /// Deleted runs (tombstones, `runs --deleted`) taken over from the previous index.
    pub tombstones_restored: u64,
}

/// A file at the store's root while a rebuild runs: a store that has it opens only for a
/// rebuild, so a rebuild killed midway never leaves a partial index in use (ADR 0024).
pub const REBUILDING: &str = "rebuilding";

fn mark_rebuilding(root: &Path) -> Result<()> {
    let marker = root.join(REBUILDING);
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&marker)?;
        std::io::Write::write_all(
            &mut f,
            b"an index rebuild is running or was interrupted; run `artifactfs index rebuild`\n",
        )?;
        f.sync_all()
    };
    write().map_err(|e| Error::io("write", &marker, e))?;
    crate::objstore::sync_dir(root)
}

fn unmark_rebuilding(root: &Path) -> Result<()> {
    let marker = root.join(REBUILDING);
    match fs::remove_file(&marker) {
        Ok(()) => crate::objstore::sync_dir(root),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", &marker, e)),
    }
}

/// Replaces the index files at `root` with the ones a rebuild moved to `old`; false (and
/// logged, since the rebuild's own error is what the caller reports) if that failed.
fn put_back_index(root: &Path, old: &Path) -> bool {
    let index = root.join("index.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let new = root.join(format!("index.sqlite{ext}"));
        let kept = PathBuf::from(format!("{}{ext}", old.display()));
        let _ = fs::remove_file(&new);
        if kept.exists()
            && let Err(e) = fs::rename(&kept, &new)
        {
            tracing::error!(from = %kept.display(), to = %new.display(), error = %e, "cannot put the previous index back");
            return false;
        }
    }
    tracing::warn!(index = %index.display(), "the rebuild failed; the previous index is back in place");
    true
}

impl Store {
    /// Replaces the index of the store at `root` with one rebuilt from its objects (local,
    /// and the remote tier's when `remote` is given for a tiered store). The old index is
    /// kept beside it as `index.sqlite.old-<unix ns>`.
    pub fn rebuild_index(
        root: &Path,
        remote: Option<Arc<dyn ObjectStore>>,
    ) -> Result<(Self, RebuildReport)> {
        let config = crate::store::read_config(root)?;
        let lock = crate::store::take_lock(root)?;
        let mut report = RebuildReport::default();
        let index = root.join("index.sqlite");
        report.events_after = published_events_floor(root);
        let had_index = index.exists();
        mark_rebuilding(root)?;
        // Built under the store's lock; if anything fails, the new index goes and the old one
        // comes back, so a failed rebuild leaves the store as it was.
        let built = (|| -> Result<Self> {
            if index.exists() {
                let old = root.join(format!(
                    "index.sqlite.old-{}",
                    to_unix_ns(std::time::SystemTime::now())
                ));
                fs::rename(&index, &old).map_err(|e| Error::io("rename", &index, e))?;
                report.old_index = Some(old.display().to_string());
                for ext in ["-wal", "-shm"] {
                    let side = root.join(format!("index.sqlite{ext}"));
                    if side.exists() {
                        let to = root.join(format!("{}{ext}", old.display()));
                        fs::rename(&side, &to).map_err(|e| Error::io("rename", &side, e))?;
                    }
                }
                crate::objstore::sync_dir(root)?;
            }
            // The new log is new to the lifecycle queue: upload every lifecycle record again (a
            // record is never replaced by an older version).
            for name in [
                crate::tier::LIFECYCLE_CURSOR,
                crate::tier::LOCAL_LIFECYCLE_CURSOR,
            ] {
                let cursor = root.join(name);
                match fs::remove_file(&cursor) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove", &cursor, e)),
                }
            }
            let store = match (config.tier.is_some(), remote) {
                (true, Some(r)) => {
                    Self::assemble_tiered(root, r, Some(lock), Arc::new(crate::clock::SystemClock))?
                }
                (true, None) => {
                    let r = crate::tier::Unconnected::new(
                        config
                            .tier
                            .as_ref()
                            .map(|t| t.backend.clone())
                            .unwrap_or_default(),
                        "no client for the remote tier",
                    );
                    Self::assemble_tiered(
                        root,
                        Arc::new(r),
                        Some(lock),
                        Arc::new(crate::clock::SystemClock),
                    )?
                }
                (false, _) => Self::open_locked(
                    root,
                    lock,
                    Arc::new(LocalStore::open(root.join("objects"))?),
                    Arc::new(crate::clock::SystemClock),
                    true,
                )?,
            };
            // The new log continues the numbering of the old one, so that readers holding a
            // `seq` of it (the NATS publisher's cursor and its message ids, long-polling
            // clients) see every new event as new (ADR 0012).
            {
                let mut idx = store.index();
                idx.continue_events_after(report.events_after)?;
                idx.event(
                    to_unix_ns(store.clock.now()),
                    "index.rebuilt",
                    None,
                    &serde_json::json!({
                        "after": report.events_after,
                        "old_index": report.old_index,
                    }),
                )?;
            }
            store.reindex(&mut report)?;
            Ok(store)
        })();
        match built {
            Ok(store) => {
                unmark_rebuilding(root)?;
                Ok((store, report))
            }
            Err(e) => {
                // With the previous index back (or never moved), the store opens as before;
                // without one, it keeps refusing to open until a rebuild finishes.
                let intact = match &report.old_index {
                    Some(old) => put_back_index(root, Path::new(old)),
                    None => had_index,
                };
                if intact {
                    unmark_rebuilding(root)?;
                }
                Err(e)
            }
        }
    }

    /// Creates a store at `root` (missing or empty) from a bucket alone: its settings from the
    /// bucket's copy of `config.toml` (`tier` is used when the bucket has none), its index
    /// from the bucket's packs and manifests, and an empty local cache.
    pub fn init_from_remote(
        root: &Path,
        remote: Arc<dyn ObjectStore>,
        tier: TierConfig,
    ) -> Result<(Self, RebuildReport)> {
        let mut opts = crate::InitOptions {
            tier: Some(tier.clone()),
            ..Default::default()
        };
        match remote.get(REMOTE_CONFIG_KEY) {
            Ok(text) => {
                let text = String::from_utf8_lossy(&text);
                let c: StoreConfig = toml::from_str(&text).map_err(|e| {
                    Error::corrupt(
                        format!("{REMOTE_CONFIG_KEY} in {}", remote.describe()),
                        e.to_string(),
                    )
                })?;
                opts.chunker = c.chunker;
                opts.compression_level = c.compression_level;
                opts.pack_target_size = c.pack_target_size;
                if let Some(mut t) = c.tier {
                    // Where the bucket is now is what the caller said.
                    t.backend = tier.backend.clone();
                    opts.tier = Some(t);
                }
            }
            Err(Error::MissingObject { .. }) => {
                tracing::warn!(backend = %remote.describe(), "the bucket has no copy of config.toml; using the defaults");
            }
            Err(e) => return Err(e),
        }
        drop(Self::init(root, &opts)?);
        // Until the index is whole, nothing else opens the new store.
        mark_rebuilding(root)?;
        match crate::tier::newest_snapshot(&*remote)? {
            Some((key, _)) => match restore_snapshot(root, &*remote, &key) {
                Ok(()) => {
                    let lock = crate::store::take_lock(root)?;
                    let store = Self::assemble_tiered(
                        root,
                        remote,
                        Some(lock),
                        Arc::new(crate::clock::SystemClock),
                    )?;
                    let mut report = RebuildReport {
                        snapshot: Some(key),
                        ..Default::default()
                    };
                    store.replay_after_snapshot(&mut report)?;
                    unmark_rebuilding(root)?;
                    return Ok((store, report));
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot use the index snapshot; reading every pack instead");
                }
            },
            None => {
                tracing::info!(backend = %remote.describe(), "no index snapshot in the bucket; reading every pack")
            }
        }
        // A failed rebuild puts back the index it replaced, here the empty one of the new
        // store: that store must still not open as if it were whole.
        Self::rebuild_index(root, Some(remote)).inspect_err(|_| {
            if let Err(e) = mark_rebuilding(root) {
                tracing::error!(error = %e, "cannot mark the new store as not rebuilt");
            }
        })
    }

    /// Brings an index restored from a snapshot up to the bucket: nothing is local on this
    /// machine; packs and manifests the snapshot does not know are indexed from their objects;
    /// what the snapshot names but the bucket lacks (written after the snapshot on the old
    /// machine and never uploaded) is reported.
    fn replay_after_snapshot(&self, report: &mut RebuildReport) -> Result<()> {
        let tier = self
            .tier
            .clone()
            .ok_or_else(|| Error::Internal("replay without a tier".into()))?;
        let remote = tier.remote();
        let now = to_unix_ns(self.clock.now());
        self.index().tier_forget_local()?;
        let known = self.index().tier_pack_ids()?;
        let mut listed = std::collections::HashSet::new();
        for m in remote.list("packs/")? {
            let Some(id) = pack_id_from_key(&m.key) else {
                report.skipped.push(format!("{}: not a pack name", m.key));
                continue;
            };
            listed.insert(id);
            if !known.contains(&id) {
                match read_table(remote, &m.key) {
                    Ok(entries) => {
                        let again = self.index().insert_pack(&id, m.size, &entries, now)?;
                        self.keep_a_whole_copy(&id, &again, now, report)?;
                        report.replayed_packs += 1;
                    }
                    Err(e) => {
                        report.skipped.push(format!("{}: {e}", m.key));
                        continue;
                    }
                }
            }
            if self.index().tier_pack_state(&id)?.is_none() {
                self.index().tier_mark_pack_remote(&id, false, now)?;
            }
            report.remote_packs += 1;
        }
        for id in known.difference(&listed) {
            report.skipped.push(format!(
                "pack {id}: in the snapshot but not in the bucket (never uploaded)"
            ));
        }
        let named = self.index().tier_run_manifests()?;
        let named_set: std::collections::HashSet<ManifestDigest> =
            named.iter().map(|(d, _)| *d).collect();
        let mut listed_m = std::collections::HashSet::new();
        let mut runs = Vec::new();
        for m in remote.list("manifests/")? {
            let Some(d) = m
                .key
                .rsplit('/')
                .next()
                .and_then(|h| h.parse::<ManifestDigest>().ok())
                .filter(|d| manifest_key(d) == m.key)
            else {
                report
                    .skipped
                    .push(format!("{}: not a manifest name", m.key));
                continue;
            };
            listed_m.insert(d);
            if !named_set.contains(&d) {
                let parsed = manifest::load_manifest_bytes(remote, &d)
                    .and_then(|b| Manifest::from_bytes(&b, &format!("manifest {d}")));
                match parsed {
                    Ok(man) => {
                        let at = man.sealed_at_ns().unwrap_or(now);
                        runs.push((at, d, man));
                    }
                    Err(e) => {
                        report.skipped.push(format!("{}: {e}", m.key));
                        continue;
                    }
                }
            }
            self.index().tier_mark_manifest_remote(&d, now)?;
            report.remote_manifests += 1;
        }
        for (d, run) in &named {
            if !listed_m.contains(d) {
                // Deleted by gc after the snapshot, or never uploaded: either way it cannot be
                // served; it stays as a tombstone rather than a run whose reads fail.
                let why = format!("its manifest {d} is in the snapshot but not in the bucket");
                if let Ok(r) = RunRef::parse(run) {
                    self.index().tombstone_lost_run(&r, now, &why)?;
                }
                report.skipped.push(format!("run {run}: {why}"));
            }
        }
        // What the snapshot knows of retention and holds, before the replayed runs get their
        // defaults: a record older than that is not applied.
        let versions = self.index().tier_lifecycle_versions()?;
        let before = report.runs;
        self.insert_runs(runs, report)?;
        report.replayed_runs = report.runs - before;
        self.restore_lifecycle(remote, &versions, report)?;
        self.index().recount_refs()?;
        let stats = self.stats()?;
        report.packs = stats.packs;
        report.chunks = stats.chunks;
        report.runs = stats.runs_sealed;
        self.index().sync()?;
        tracing::info!(
            snapshot = report.snapshot.as_deref().unwrap_or(""),
            replayed_packs = report.replayed_packs,
            replayed_runs = report.replayed_runs,
            "index restored from a snapshot"
        );
        Ok(())
    }

    /// Inserts sealed runs from manifests, newest first; a name already taken is reported.
    fn insert_runs(
        &self,
        mut runs: Vec<(i64, ManifestDigest, Manifest)>,
        report: &mut RebuildReport,
    ) -> Result<()> {
        runs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.0.cmp(&b.1.0)));
        for (at, d, m) in runs {
            let mut detail = crate::store::sealed_event_detail(&m, &d);
            detail["rebuilt"] = true.into();
            match self.index().insert_rebuilt_run(&m, &d, at, detail) {
                Ok((_, lost)) => {
                    report.runs += 1;
                    if lost > 0 {
                        tracing::warn!(run = %format!("{}/{}", m.namespace, m.run), lost, "run restored with chunks no readable pack holds");
                        report
                            .damaged_runs
                            .push(format!("{}/{}: {lost} chunks lost", m.namespace, m.run));
                    }
                }
                Err(Error::AlreadyExists(what)) => report.skipped.push(format!(
                    "manifest {d}: {what} was restored from a newer manifest"
                )),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves a local object that cannot be read from `objects/KEY` to `quarantine/KEY`, where
    /// neither the index nor gc looks; a failure to move it is reported, not fatal.
    fn quarantine(&self, key: &str, report: &mut RebuildReport) {
        let from = self.root().join("objects").join(key);
        let to = self.root().join(QUARANTINE).join(key);
        let moved = to
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::rename(&from, &to));
        match moved {
            Ok(()) => {
                tracing::warn!(from = %from.display(), to = %to.display(), "damaged object moved aside");
                report.quarantined.push(format!("{QUARANTINE}/{key}"));
            }
            Err(e) => {
                tracing::error!(path = %from.display(), error = %e, "cannot move a damaged object aside");
                report
                    .skipped
                    .push(format!("{key}: cannot move it to {QUARANTINE}/: {e}"));
            }
        }
    }

    /// After the local copy of `key` failed to read with `e`: sets it aside (never left for gc
    /// to delete as an orphan) and reads the bucket's copy instead, when there is one.
    fn read_bucket_copy_instead<T>(
        &self,
        key: &str,
        e: Error,
        bucket: Option<&dyn ObjectStore>,
        read: impl FnOnce(&dyn ObjectStore) -> Result<T>,
        report: &mut RebuildReport,
    ) -> Result<T> {
        tracing::warn!(key, error = %e, "local copy cannot be read");
        self.quarantine(key, report);
        match bucket {
            Some(r) => read(r).map_err(|re| {
                Error::corrupt(key.to_owned(), format!("{e}; the bucket's copy: {re}"))
            }),
            None => Err(e),
        }
    }

    /// What the replaced index knew that the objects do not say: each of its sealed runs whose
    /// manifest the rebuild did not find (deleted, or set aside as damaged) has its manifest
    /// written again from that index's rows and metadata when they give the same digest back
    /// (the digest names the bytes, so the run is restored exactly), and is reported lost
    /// otherwise. Returns the replaced index, for its tombstones; `None` when there is none
    /// or it cannot be read (reported in `skipped`). Fails only when a manifest cannot be
    /// written.
    fn restore_from_replaced_index(
        &self,
        runs: &mut Vec<(i64, ManifestDigest, Manifest)>,
        now: i64,
        report: &mut RebuildReport,
    ) -> Result<Option<crate::index::Index>> {
        let Some(old_path) = report.old_index.clone() else {
            return Ok(None);
        };
        let read = crate::index::Index::open_replaced(Path::new(&old_path)).and_then(|old| {
            let sealed = old.runs(None)?;
            Ok((old, sealed))
        });
        let (old, sealed) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(index = %old_path, error = %e, "the previous index cannot be read");
                report.skipped.push(format!(
                    "{old_path}: the previous index cannot be read, so runs it knew whose manifests are gone cannot be named: {e}"
                ));
                return Ok(None);
            }
        };
        let found: std::collections::HashSet<ManifestDigest> =
            runs.iter().map(|(_, d, _)| *d).collect();
        for row in sealed {
            let Some(d) = row.manifest.filter(|_| row.state == "sealed") else {
                continue;
            };
            if found.contains(&d) {
                continue;
            }
            let rebuilt = (|| -> Result<Option<(Manifest, Vec<u8>)>> {
                let Some(at) = row.sealed_at_ns else {
                    return Ok(None);
                };
                let mut m = Manifest {
                    format: manifest::MANIFEST_FORMAT,
                    namespace: row.run.namespace.clone(),
                    run: row.run.run.clone(),
                    sealed_at: crate::clock::rfc3339(crate::clock::from_unix_ns(at)),
                    metadata: old.run_meta(row.id)?.into_iter().collect(),
                    entries: old.files(row.id)?,
                };
                m.canonicalize();
                let bytes = m.canonical_bytes()?;
                Ok((ManifestDigest::of(&bytes) == d).then_some((m, bytes)))
            })();
            match rebuilt {
                Ok(Some((m, bytes))) => {
                    manifest::store_manifest(&*self.objects, &bytes)?;
                    tracing::warn!(run = %row.run, manifest = %d, "manifest written again from the previous index");
                    report
                        .manifests_restored
                        .push(format!("{}: manifest {d}", row.run));
                    runs.push((m.sealed_at_ns().unwrap_or(now), d, m));
                }
                other => {
                    let why = match other {
                        Err(e) => format!("the previous index cannot give it back: {e}"),
                        _ => "the previous index's rows do not give its digest back".to_owned(),
                    };
                    tracing::error!(run = %row.run, manifest = %d, why, "run lost");
                    report
                        .lost_runs
                        .push(format!("{}: manifest {d} is gone; {why}", row.run));
                }
            }
        }
        Ok(Some(old))
    }

    /// Chunks of pack `id` that another pack holds too (`again`): a chunk found damaged and
    /// stored anew has both copies. The row keeps the copy it names when that one decodes to
    /// its id, and moves to this pack's copy when only that one does; with neither, the
    /// damage is left for `verify` to report.
    fn keep_a_whole_copy(
        &self,
        id: &crate::id::PackId,
        again: &[crate::pack::PackEntry],
        now: i64,
        report: &mut RebuildReport,
    ) -> Result<()> {
        for e in again {
            let Some(kept) = self.index().chunk(&e.chunk)? else {
                continue;
            };
            if kept.pack == *id
                || crate::pack::read_chunk(&*self.objects, &kept.pack, &kept.entry).is_ok()
            {
                continue;
            }
            if crate::pack::read_chunk(&*self.objects, id, e).is_ok() {
                self.index()
                    .move_chunks(id, 0, std::slice::from_ref(e), now)?;
                tracing::warn!(chunk = %e.chunk, damaged = %kept.pack, used = %id, "a damaged copy of a chunk passed over");
                report.skipped.push(format!(
                    "chunk {}: the copy in pack {} is damaged; the one in pack {id} is used",
                    e.chunk, kept.pack
                ));
            }
        }
        Ok(())
    }

    /// Fills the (new, empty) index from the objects.
    fn reindex(&self, report: &mut RebuildReport) -> Result<()> {
        let now = to_unix_ns(self.clock.now());
        let tier = self.tier.clone();
        let (local, remote): (&dyn ObjectStore, Option<&dyn ObjectStore>) = match &tier {
            Some(t) => (t.local(), Some(t.remote())),
            None => (&*self.objects, None),
        };
        let sizes = |store: &dyn ObjectStore, prefix: &str| -> Result<BTreeMap<String, u64>> {
            Ok(store
                .list(prefix)?
                .into_iter()
                .map(|m| (m.key, m.size))
                .collect())
        };
        let local_packs = sizes(local, "packs/")?;
        let remote_packs = match remote {
            Some(r) => sizes(r, "packs/")?,
            None => BTreeMap::new(),
        };
        let mut keys: Vec<&String> = local_packs.keys().chain(remote_packs.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let Some(id) = pack_id_from_key(key) else {
                report.skipped.push(format!("{key}: not a pack name"));
                continue;
            };
            let mut local_size = local_packs.get(key).copied();
            let remote_copy = remote.filter(|_| remote_packs.contains_key(key));
            let (src, mut size) = match (local_size, remote_copy) {
                (Some(n), _) => (local, n),
                (None, Some(r)) => (r, remote_packs[key]),
                (None, None) => continue,
            };
            let read = match read_table(src, key) {
                Err(e) if local_size.is_some() => self
                    .read_bucket_copy_instead(key, e, remote_copy, |r| read_table(r, key), report)
                    .inspect(|_| {
                        local_size = None;
                        size = remote_packs[key];
                    }),
                read => read,
            };
            let entries = match read {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(key, error = %e, "pack skipped");
                    report.skipped.push(format!("{key}: {e}"));
                    continue;
                }
            };
            let again = self.index().insert_pack(&id, size, &entries, now)?;
            self.keep_a_whole_copy(&id, &again, now, report)?;
            let mut idx = self.index();
            report.packs += 1;
            report.chunks += entries.len() as u64;
            if remote_packs.get(key) == Some(&size) {
                idx.tier_mark_pack_remote(&id, local_size.is_some(), now)?;
                report.remote_packs += 1;
            }
        }
        // Manifests: newest first, so a name made again keeps its last run.
        let local_m = sizes(local, "manifests/")?;
        let remote_m = match remote {
            Some(r) => sizes(r, "manifests/")?,
            None => BTreeMap::new(),
        };
        let mut keys: Vec<&String> = local_m.keys().chain(remote_m.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut runs: Vec<(i64, ManifestDigest, Manifest)> = Vec::new();
        for key in keys {
            let Some(d) = key
                .rsplit('/')
                .next()
                .and_then(|h| h.parse::<ManifestDigest>().ok())
            else {
                report.skipped.push(format!("{key}: not a manifest name"));
                continue;
            };
            if manifest_key(&d) != *key {
                report.skipped.push(format!("{key}: not a manifest name"));
                continue;
            }
            let bucket = remote.filter(|_| remote_m.contains_key(key));
            // Manifests are always kept locally: one read from the bucket is copied down.
            let from_bucket = |r: &dyn ObjectStore| {
                manifest::load_manifest_bytes(r, &d).and_then(|b| {
                    local.put(key, &r.get(key)?)?;
                    Ok(b)
                })
            };
            let loaded = match (local_m.contains_key(key), bucket) {
                (false, Some(r)) => from_bucket(r),
                (false, None) => continue,
                (true, bucket) => manifest::load_manifest_bytes(local, &d).or_else(|e| {
                    self.read_bucket_copy_instead(key, e, bucket, from_bucket, report)
                }),
            };
            let parsed = loaded.and_then(|b| Manifest::from_bytes(&b, &format!("manifest {d}")));
            let m = match parsed {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(key, error = %e, "manifest skipped");
                    report.skipped.push(format!("{key}: {e}"));
                    continue;
                }
            };
            if remote_m.contains_key(key) {
                self.index().tier_mark_manifest_remote(&d, now)?;
                report.remote_manifests += 1;
            }
            let at = m.sealed_at_ns().unwrap_or(now);
            runs.push((at, d, m));
        }
        let replaced = self.restore_from_replaced_index(&mut runs, now, report)?;
        self.insert_runs(runs, report)?;
        if let Some(old) = replaced {
            for (row, deleted_at) in old.tombstones(None).unwrap_or_default() {
                let meta = old.run_meta(row.id).unwrap_or_default();
                if self.index().restore_tombstone(&row, deleted_at, &meta)? {
                    report.tombstones_restored += 1;
                }
            }
        }
        // Nothing in a new index predates the records: each one is applied. A tiered store
        // keeps them in the bucket, an untiered one in its local object store.
        self.restore_lifecycle(remote.unwrap_or(local), &Default::default(), report)?;
        self.index().sync()?;
        tracing::info!(
            packs = report.packs,
            runs = report.runs,
            skipped = report.skipped.len(),
            "index rebuilt"
        );
        Ok(())
    }
}

impl Store {
    /// Applies the bucket's lifecycle records to the restored runs and namespaces; see the
    /// module documentation.
    fn restore_lifecycle(
        &self,
        remote: &dyn ObjectStore,
        versions: &HashMap<(String, Option<String>), i64>,
        report: &mut RebuildReport,
    ) -> Result<()> {
        for m in remote.list(LIFECYCLE_PREFIX)? {
            let Some((ns, run)) = parse_lifecycle_key(&m.key) else {
                report
                    .skipped
                    .push(format!("{}: not a lifecycle record name", m.key));
                continue;
            };
            let rec = match remote
                .get(&m.key)
                .and_then(|b| LifecycleRecord::from_bytes(&b, &m.key))
            {
                Ok(r) if r.namespace == ns && r.run == run => r,
                Ok(_) => {
                    report
                        .skipped
                        .push(format!("{}: names another run than its key", m.key));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(key = %m.key, error = %e, "lifecycle record skipped");
                    report.skipped.push(format!("{}: {e}", m.key));
                    continue;
                }
            };
            let known = versions.get(&(ns.clone(), run.clone()));
            if known.is_some_and(|v| *v >= rec.version) && run.is_none() {
                continue;
            }
            let Some(run) = run else {
                if self.index().tier_restore_namespace_retention(
                    &ns,
                    rec.retain.as_deref(),
                    rec.version,
                )? {
                    report.lifecycle_restored += 1;
                }
                continue;
            };
            let row = RunRef::new(&ns, &run)
                .and_then(|r| self.index().run(&r))
                .ok()
                .flatten();
            let Some(row) = row.filter(|r| r.state == "sealed") else {
                report.skipped.push(format!(
                    "{}: no sealed run {ns}/{run} (deleted); not applied",
                    m.key
                ));
                continue;
            };
            if row.manifest.map(|d| d.to_hex()) != rec.manifest {
                report.skipped.push(format!(
                    "{}: recorded for another run named {ns}/{run}; not applied",
                    m.key
                ));
                continue;
            }
            if known.is_some_and(|v| *v >= rec.version) {
                // The snapshot already has this state or a newer one.
                continue;
            }
            let retention = crate::retention::RetentionState {
                spec: rec.retain.clone(),
                for_ns: rec.retain_for_ns,
                until_ns: rec.retain_until,
            };
            let holds: Vec<HoldRow> = rec
                .holds
                .iter()
                .map(|h| HoldRow {
                    name: h.name.clone(),
                    reason: h.reason.clone(),
                    placed_at_ns: h.placed_at,
                })
                .collect();
            if self
                .index()
                .tier_restore_lifecycle(&row, &retention, &holds, rec.version)?
            {
                report.lifecycle_restored += 1;
            }
        }
        if report.lifecycle_restored > 0 {
            tracing::info!(
                restored = report.lifecycle_restored,
                "retention and holds restored from lifecycle records"
            );
        }
        Ok(())
    }
}

/// Files in the store directory in which readers of the event log keep the `seq` they got to:
/// the lifecycle queue's (`crate::tier`) and the NATS publisher's (`artifactfs-nats`).
pub const EVENT_CURSOR_FILES: &[&str] = &[
    crate::tier::LIFECYCLE_CURSOR,
    crate::tier::LOCAL_LIFECYCLE_CURSOR,
    "nats-cursor",
];

/// The highest event `seq` that anything may hold of the logs of the store at `root`: the
/// current index (before it is replaced), earlier replaced ones (`index.sqlite.old-*`), and
/// the readers' cursor files. What cannot be read is logged and left out.
fn published_events_floor(root: &Path) -> i64 {
    let mut floor = 0i64;
    let mut indexes = vec![root.join("index.sqlite")];
    if let Ok(dir) = fs::read_dir(root) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("index.sqlite.old-")
                && !name.ends_with("-wal")
                && !name.ends_with("-shm")
            {
                indexes.push(e.path());
            }
        }
    }
    for path in indexes.iter().filter(|p| p.exists()) {
        match crate::index::Index::last_event_seq_of(path) {
            Ok(n) => floor = floor.max(n),
            Err(e) => {
                tracing::warn!(index = %path.display(), error = %e, "cannot read the last event seq of an old index")
            }
        }
    }
    for name in EVENT_CURSOR_FILES {
        let path = root.join(name);
        match fs::read_to_string(&path) {
            Ok(t) => match t.trim().parse::<i64>() {
                Ok(n) => floor = floor.max(n),
                Err(_) => {
                    tracing::warn!(file = %path.display(), "unreadable event cursor; not counted")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read an event cursor")
            }
        }
    }
    floor
}

/// Replaces the (new, empty) index of the store at `root` with the snapshot `key`.
fn restore_snapshot(root: &Path, remote: &dyn ObjectStore, key: &str) -> Result<()> {
    let packed = remote.get(key)?;
    let db = zstd::stream::decode_all(&packed[..])
        .map_err(|e| Error::corrupt(format!("index snapshot {key}"), format!("zstd: {e}")))?;
    let tmp = root.join("index.sqlite.snapshot");
    fs::write(&tmp, &db).map_err(|e| Error::io("write", &tmp, e))?;
    // Open it once: proves it is an index this build reads, and migrates it.
    if let Err(e) = crate::index::Index::open(&tmp, false) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let index = root.join("index.sqlite");
    for ext in ["-wal", "-shm"] {
        let _ = fs::remove_file(root.join(format!("index.sqlite{ext}")));
        let _ = fs::remove_file(root.join(format!("index.sqlite.snapshot{ext}")));
    }
    fs::rename(&tmp, &index).map_err(|e| Error::io("rename into place", &index, e))?;
    crate::objstore::sync_dir(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::MemoryStore;

    fn ingest(store: &Store, dir: &Path, run: &str, seed: u64) -> Vec<u8> {
        let src = dir.join(format!("src-{seed}"));
        fs::create_dir_all(&src).unwrap();
        let mut data = vec![0u8; 2 << 20];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.finalize_xof().fill(&mut data);
        fs::write(src.join("f"), &data).unwrap();
        store
            .ingest_dir(
                &src,
                &crate::RunRef::parse(run).unwrap(),
                Default::default(),
                &crate::NoProgress,
            )
            .unwrap();
        data
    }

    fn read(store: &Store, run: &str) -> Vec<u8> {
        let e = store
            .entry(&crate::RunRef::parse(run).unwrap(), "f")
            .unwrap();
        let mut out = Vec::new();
        store.read_file_to(&e, &mut out).unwrap();
        out
    }

    #[test]
    fn local_rebuild_restores_runs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(&root, &crate::InitOptions::default()).unwrap();
        let a = ingest(&store, dir.path(), "ns/a", 1);
        let b = ingest(&store, dir.path(), "ns/b", 2);
        let stats = store.stats().unwrap();
        drop(store);
        fs::remove_file(root.join("index.sqlite")).unwrap();
        let (store, report) = Store::rebuild_index(&root, None).unwrap();
        assert_eq!(report.runs, 2, "{report:?}");
        assert!(report.skipped.is_empty(), "{report:?}");
        assert_eq!(read(&store, "ns/a"), a);
        assert_eq!(read(&store, "ns/b"), b);
        assert_eq!(store.stats().unwrap().chunks, stats.chunks);
        assert!(store.verify(None, &crate::NoProgress).unwrap().ok());
    }

    /// A new store at `root` tiered to an in-memory bucket.
    fn tiered(root: &Path) -> (Store, Arc<MemoryStore>) {
        let remote: Arc<MemoryStore> = Arc::new(MemoryStore::default());
        let opts = crate::InitOptions {
            tier: Some(TierConfig::new("s3://b/p")),
            ..Default::default()
        };
        let store = Store::init_tiered(root, &opts, remote.clone()).unwrap();
        (store, remote)
    }

    #[test]
    fn a_failed_rebuild_puts_the_previous_index_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let (store, _) = tiered(&root);
        let a = ingest(&store, dir.path(), "ns/a", 1);
        drop(store);
        // A tiered store rebuilt without its remote fails when it lists the bucket, after
        // the old index was moved aside.
        assert!(Store::rebuild_index(&root, None).is_err());
        let names: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("index.sqlite"))
            .collect();
        assert!(
            names.iter().all(|n| !n.contains(".old-")),
            "the previous index is back in place: {names:?}"
        );
        let store = Store::open(&root).unwrap();
        assert_eq!(read(&store, "ns/a"), a);
        assert_eq!(store.stats().unwrap().runs_sealed, 1);
    }

    #[test]
    fn a_damaged_local_pack_and_manifest_are_set_aside_and_the_buckets_copies_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let (store, remote) = tiered(&root);
        let a = ingest(&store, dir.path(), "ns/a", 5);
        store.push_pending().unwrap();
        let key = store.objects.list("packs/").unwrap()[0].key.clone();
        let manifest = store.objects.list("manifests/").unwrap()[0].key.clone();
        drop(store);
        let local = root.join("objects").join(&key);
        let len = fs::metadata(&local).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&local)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        // The manifest too: one byte changed.
        let m = root.join("objects").join(&manifest);
        let mut b = fs::read(&m).unwrap();
        let at = b.len() / 2;
        b[at] ^= 1;
        fs::write(&m, b).unwrap();
        let (store, report) = Store::rebuild_index(&root, Some(remote)).unwrap();
        assert_eq!(
            report.quarantined,
            vec![
                format!("{QUARANTINE}/{key}"),
                format!("{QUARANTINE}/{manifest}")
            ]
        );
        assert_eq!(report.runs, 1, "{report:?}");
        assert!(report.damaged_runs.is_empty(), "{report:?}");
        assert!(!local.exists());
        assert_eq!(
            fs::metadata(root.join(QUARANTINE).join(&key))
                .unwrap()
                .len(),
            len / 2
        );
        assert_eq!(read(&store, "ns/a"), a);
        assert!(store.verify(None, &crate::NoProgress).unwrap().ok());
    }

    #[test]
    fn an_interrupted_rebuild_keeps_the_store_closed_until_one_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(&root, &crate::InitOptions::default()).unwrap();
        let a = ingest(&store, dir.path(), "ns/a", 6);
        drop(store);
        // What a rebuild killed after its start leaves: the marker (and perhaps a partial index).
        mark_rebuilding(&root).unwrap();
        let e = Store::open(&root)
            .err()
            .expect("a store mid-rebuild does not open");
        assert!(e.to_string().contains("artifactfs index rebuild"), "{e}");
        let (store, _) = Store::rebuild_index(&root, None).unwrap();
        assert!(!root.join(REBUILDING).exists());
        drop(store);
        let store = Store::open(&root).unwrap();
        assert_eq!(read(&store, "ns/a"), a);
    }

    #[test]
    fn a_rebuilt_log_continues_the_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(&root, &crate::InitOptions::default()).unwrap();
        ingest(&store, dir.path(), "ns/a", 1);
        ingest(&store, dir.path(), "ns/b", 2);
        let last = store.events(0, 100).unwrap().last().unwrap().seq;
        assert_eq!(last, 4, "two runs, opened and sealed");
        drop(store);
        let kinds = |store: &Store, after: i64| -> Vec<(i64, String)> {
            let evs = store.events(after, 100).unwrap();
            evs.into_iter().map(|e| (e.seq, e.kind)).collect()
        };
        // With the old index in place: numbered after its last event.
        let (store, report) = Store::rebuild_index(&root, None).unwrap();
        assert_eq!(report.events_after, last, "{report:?}");
        let got = kinds(&store, 0);
        assert_eq!(
            got.first().unwrap(),
            &(last + 1, "index.rebuilt".to_owned())
        );
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got.iter().all(|(seq, _)| *seq > last), "{got:?}");
        let rebuilt_last = got.last().unwrap().0;
        ingest(&store, dir.path(), "ns/c", 3);
        assert_eq!(kinds(&store, rebuilt_last)[0].0, rebuilt_last + 1);
        drop(store);
        // Index and old indexes gone: a reader's cursor ahead of everything still counts.
        for e in fs::read_dir(&root).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("index.sqlite") {
                fs::remove_file(e.path()).unwrap();
            }
        }
        fs::write(root.join("nats-cursor"), "1000\n").unwrap();
        let (store, report) = Store::rebuild_index(&root, None).unwrap();
        assert_eq!(report.events_after, 1000, "{report:?}");
        let got = kinds(&store, 0);
        assert_eq!(got[0], (1001, "index.rebuilt".to_owned()), "{got:?}");
        assert_eq!(got.len(), 7, "{got:?}");
    }

    #[test]
    fn rebuild_from_the_remote_alone() {
        let dir = tempfile::tempdir().unwrap();
        let remote: Arc<MemoryStore> = Arc::new(MemoryStore::default());
        let opts = crate::InitOptions {
            pack_target_size: 1 << 20,
            tier: Some(TierConfig::new("s3://b/p")),
            ..Default::default()
        };
        let store = Store::init_tiered(&dir.path().join("one"), &opts, remote.clone()).unwrap();
        let a = ingest(&store, dir.path(), "ns/a", 3);
        let pushed = store.push_pending().unwrap();
        assert!(
            pushed.snapshot.is_some(),
            "the first push snapshots the index"
        );
        // A run after the snapshot: the next push (within the interval) takes none.
        let b = ingest(&store, dir.path(), "ns/b", 4);
        assert_eq!(store.push_pending().unwrap().snapshot, None);
        drop(store);
        let check = |name: &str, want_snapshot: bool| {
            let (store, report) = Store::init_from_remote(
                &dir.path().join(name),
                remote.clone(),
                TierConfig::new("s3://b/p"),
            )
            .unwrap();
            assert_eq!(report.snapshot.is_some(), want_snapshot, "{report:?}");
            assert_eq!(report.runs, 2, "{report:?}");
            assert!(report.skipped.is_empty(), "{report:?}");
            assert_eq!(report.remote_packs, report.packs);
            if want_snapshot {
                assert_eq!(report.replayed_runs, 1, "{report:?}");
                assert!(report.replayed_packs > 0, "{report:?}");
            }
            assert_eq!(store.config().pack_target_size, 1 << 20);
            let s = store.tier_status().unwrap();
            assert_eq!(s.counts.remote_only_packs, report.packs);
            assert_eq!((s.counts.pending_manifests, s.counts.both_packs), (0, 0));
            assert_eq!(read(&store, "ns/a"), a);
            assert_eq!(read(&store, "ns/b"), b);
            assert!(store.verify(None, &crate::NoProgress).unwrap().ok());
        };
        check("two", true);
        // Without snapshots: from packs and manifests alone.
        for m in remote.list(crate::tier::SNAPSHOT_PREFIX).unwrap() {
            remote.delete(&m.key).unwrap();
        }
        check("three", false);
    }
}
