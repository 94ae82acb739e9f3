//! Retention operations on a store, and garbage collection: the only path that deletes data.
//!
//! # The gc model (see `docs/gc.md`)
//!
//! Commit order: bytes are deleted only after the index no longer refers to them, and the index
//! refers to bytes only after they are durable. So a crash at any point leaves, at worst,
//! objects nobody refers to, which the next gc removes.
//!
//! 1. **Expire**: each eligible run (sealed, retain-until passed, no holds) becomes a tombstone
//!    in one index transaction that also drops its chunk references; then its manifest object
//!    is deleted.
//! 2. **Sweep**: chunk rows with no reference, in packs written more than `grace` ago, are
//!    deleted in one transaction that re-checks the count. This runs under the store's *seal
//!    gate* held exclusively: every seal (ingest, the mount's seal) holds the gate shared from
//!    the moment its writer starts deduplicating against the index until its run commits, so a
//!    chunk a seal is about to reference cannot be swept under it. Orphan objects (packs not
//!    in the index, manifests of no live run) are removed under the same hold.
//! 3. **Packs**: a pack with no chunk rows left is dropped from the index, then deleted. A pack
//!    whose live bytes fell below `compact_below` of its size is rewritten: its live chunks are
//!    copied (stored form, each verified) into a new pack, the new pack is made durable, the
//!    chunk rows move to it in one transaction, and only then the old pack goes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::clock::to_unix_ns;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestDigest, PackId};
use crate::index::{HoldRow, RunRetention, RunRow};
use crate::manifest;
use crate::names::RunRef;
use crate::pack::{self, PackBuilder};
use crate::retention::{
    self, Retention, check_extension, format_until, validate_hold_name, validate_hold_reason,
};
use crate::store::{Progress, Store};

// ---------------------------------------------------------------------------------------------
// The seal gate.

#[derive(Default)]
struct GateState {
    seals: usize,
    sweeper_waiting: bool,
    sweeping: bool,
}

/// Keeps sweeps and seals apart: seals share it, a sweep takes it alone (and new seals wait
/// while a sweep waits, so a busy producer cannot starve gc).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, GateState>,
    ) -> std::sync::MutexGuard<'a, GateState> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }
}

/// Held by a seal from before its first chunk is written until its run commits; see
/// [`Store::seal_guard`].
pub struct SealGuard(Arc<Gate>);

impl Drop for SealGuard {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.seals -= 1;
        drop(g);
        self.0.cv.notify_all();
    }
}

struct SweepGuard(Arc<Gate>);

impl Drop for SweepGuard {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.sweeping = false;
        drop(g);
        self.0.cv.notify_all();
    }
}

fn sweep_guard(gate: &Arc<Gate>) -> SweepGuard {
    let mut g = gate.lock();
    while g.sweeping || g.sweeper_waiting {
        g = gate.wait(g);
    }
    g.sweeper_waiting = true;
    while g.seals > 0 {
        g = gate.wait(g);
    }
    g.sweeper_waiting = false;
    g.sweeping = true;
    SweepGuard(gate.clone())
}

// ---------------------------------------------------------------------------------------------
// Retention and holds.

/// A run's retention, holds and eligibility, as the CLI and the control directory show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetentionInfo {
    pub namespace: String,
    pub run: String,
    pub state: String,
    /// The value as set (`None`: no retention; the run is kept until one is set).
    pub retain: Option<String>,
    /// RFC 3339, `forever`, or `None` while unknown (an open run retained from its seal).
    pub retain_until: Option<String>,
    #[serde(skip)]
    pub retain_until_ns: Option<i64>,
    pub holds: Vec<HoldInfo>,
    /// Whether gc would delete the run now.
    pub eligible: bool,
}

/// A hold as shown to users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HoldInfo {
    pub name: String,
    pub reason: String,
    pub placed_at: String,
}

impl HoldInfo {
    fn from_row(h: HoldRow) -> Self {
        Self {
            name: h.name,
            reason: h.reason,
            placed_at: crate::clock::rfc3339(crate::clock::from_unix_ns(h.placed_at_ns)),
        }
    }
}

/// What users see of a run's retention row and holds, at `now_ns`.
pub(crate) fn retention_info(rr: RunRetention, now_ns: i64) -> RetentionInfo {
    let until = rr.retention.until_ns;
    RetentionInfo {
        namespace: rr.run.run.namespace,
        run: rr.run.run.run,
        eligible: retention::eligible(&rr.run.state, until, rr.holds.len(), now_ns),
        state: rr.run.state,
        retain: rr.retention.spec,
        retain_until: until.map(format_until),
        retain_until_ns: until,
        holds: rr.holds.into_iter().map(HoldInfo::from_row).collect(),
    }
}

/// Checks a namespace or store default: a duration from the seal, or `forever`.
pub fn parse_default_retention(text: &str, now_ns: i64) -> Result<Retention> {
    let r = Retention::parse(text, now_ns)?;
    if matches!(r, Retention::Until(_)) {
        return Err(Error::invalid(
            "default retention",
            format!(
                "{text}: a default must be a duration such as 90d, or forever (a date would apply to every future run)"
            ),
        ));
    }
    Ok(r)
}

impl Store {
    /// A guard that keeps gc's sweep away while a seal writes and commits; see [`Gate`].
    pub fn seal_guard(&self) -> SealGuard {
        let mut g = self.gate.lock();
        while g.sweeping || g.sweeper_waiting {
            g = self.gate.wait(g);
        }
        g.seals += 1;
        SealGuard(self.gate.clone())
    }

    /// The store's clock, in nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> i64 {
        to_unix_ns(self.clock.now())
    }

    fn retention_info_of(&self, run: &RunRow) -> Result<RetentionInfo> {
        let rr = self.read(|idx| idx.run_retention(run))?;
        Ok(retention_info(rr, self.now_ns()))
    }

    /// A run's retention, holds and eligibility.
    pub fn retention_info(&self, r: &RunRef) -> Result<RetentionInfo> {
        let run = self.run(r)?;
        self.retention_info_of(&run)
    }

    /// Sets a run's retention. Without `override_reason`, the compliance rule applies: the
    /// first value is taken as given, later ones may only extend it ([`Error::NotPermitted`]
    /// otherwise). With it, any valid value is taken and the reason is recorded in the event.
    pub fn set_retention(
        &self,
        r: &RunRef,
        value: &str,
        override_reason: Option<&str>,
    ) -> Result<RetentionInfo> {
        let now = self.now_ns();
        let new = Retention::parse(value, now)?;
        let spec = value.trim().to_owned();
        let run = self.run(r)?;
        let current = self.index().run_retention(&run)?.retention;
        if let Some(reason) = override_reason
            && reason.trim().is_empty()
        {
            return Err(Error::invalid(
                "override reason",
                "is empty; say why the retention changes",
            ));
        }
        if override_reason.is_none() {
            if let Err(e) = check_extension(&current, &new, run.sealed_at_ns, now) {
                tracing::warn!(run = %r, "refused: {e}");
                return Err(e);
            }
            if current.spec.as_deref() == Some(spec.as_str())
                && current.until_ns == new.until(run.sealed_at_ns)
            {
                return self.retention_info_of(&run);
            }
        }
        let until = new.until(run.sealed_at_ns);
        let detail = serde_json::json!({
            "retain": spec,
            "retain_until": until,
            "previous": current.spec,
            "previous_until": current.until_ns,
            "override": override_reason.is_some(),
            "reason": override_reason,
        });
        self.index()
            .set_run_retention(&run, &spec, &new, now, detail)?;
        tracing::info!(run = %r, retain = %spec, override = override_reason.is_some(), "retention set");
        self.record_lifecycle();
        self.retention_info(r)
    }

    /// A namespace's default retention for new runs.
    pub fn namespace_retention(&self, namespace: &str) -> Result<Option<String>> {
        self.index().namespace_retention(namespace)
    }

    /// Sets or (with `None`) removes a namespace's default retention for runs created after.
    pub fn set_namespace_retention(&self, namespace: &str, value: Option<&str>) -> Result<()> {
        let now = self.now_ns();
        let spec = match value {
            Some(v) => {
                parse_default_retention(v, now)?;
                Some(v.trim())
            }
            None => None,
        };
        self.index().set_namespace_retention(namespace, spec, now)?;
        tracing::info!(namespace, retain = ?spec, "namespace default retention set");
        self.record_lifecycle();
        Ok(())
    }

    /// Places a named hold on a run (or changes its reason).
    pub fn place_hold(&self, r: &RunRef, name: &str, reason: &[u8]) -> Result<()> {
        validate_hold_name(name)?;
        let reason = validate_hold_reason(reason)?;
        let run = self.run(r)?;
        let now = self.now_ns();
        if self.index().place_hold(&run, name, &reason, now)? {
            tracing::info!(run = %r, hold = name, "hold placed");
            self.record_lifecycle();
        }
        Ok(())
    }

    /// Removes a named hold; [`Error::NoAttr`] if the run has none of that name.
    pub fn remove_hold(&self, r: &RunRef, name: &str) -> Result<()> {
        validate_hold_name(name)?;
        let run = self.run(r)?;
        let now = self.now_ns();
        self.index().remove_hold(&run, name, now)?;
        tracing::info!(run = %r, hold = name, "hold removed");
        self.record_lifecycle();
        Ok(())
    }

    /// The holds of a run.
    pub fn holds(&self, r: &RunRef) -> Result<Vec<HoldInfo>> {
        let run = self.run(r)?;
        Ok(self
            .read(|idx| idx.holds(run.id))?
            .into_iter()
            .map(HoldInfo::from_row)
            .collect())
    }

    /// The runs gc would delete now.
    pub fn expired_runs(&self) -> Result<Vec<RetentionInfo>> {
        let now = self.now_ns();
        let runs = self.index().eligible_runs(now)?;
        runs.iter()
            .map(|(r, _)| self.retention_info_of(r))
            .collect()
    }

    /// Deleted runs (tombstones), newest first, with their deletion times.
    pub fn tombstones(&self, namespace: Option<&str>) -> Result<Vec<(RunRow, i64)>> {
        self.index().tombstones(namespace)
    }
}

// ---------------------------------------------------------------------------------------------
// Garbage collection.

/// Settings of one gc.
pub struct GcOptions<'a> {
    /// Report what would go; change nothing.
    pub dry_run: bool,
    /// Unreferenced chunks are swept only from packs written at least this long ago.
    pub grace: Duration,
    /// Packs whose live bytes are below this fraction of their size are rewritten.
    pub compact_below: f64,
    /// Called at each phase boundary with its name; for crash tests (see `docs/gc.md`).
    pub fault: Option<&'a (dyn Fn(&str) + Sync)>,
}

impl Default for GcOptions<'_> {
    fn default() -> Self {
        Self {
            dry_run: false,
            grace: Duration::from_secs(3600),
            compact_below: 0.5,
            fault: None,
        }
    }
}

/// The names of gc's fault points, in the order a gc passes them.
pub const FAULT_POINTS: &[&str] = &[
    "expire:after-first-run",
    "expire:after-index",
    "expire:after-manifests",
    "sweep:after-index",
    "sweep:after-orphans",
    "compact:after-pack-written",
    "compact:after-index",
    "compact:after-old-packs",
    "packs:after-index",
    "packs:after-delete",
];

/// What a gc did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub started_at: String,
    pub grace_secs: u64,
    pub runs_expired: Vec<String>,
    pub refs_dropped: u64,
    pub manifests_deleted: u64,
    pub chunks_swept: u64,
    pub chunk_bytes_swept: u64,
    /// Unreferenced chunks kept because their pack is younger than the grace period.
    pub chunks_in_grace: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub packs_written: u64,
    pub live_bytes_copied: u64,
    pub orphan_objects_deleted: u64,
    /// Manifests no run in the index has ever had, kept (and, while there are any, packs the
    /// index does not know): see `remove_orphans`.
    pub unknown_manifests_kept: u64,
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
    pub bytes_reclaimed: u64,
}

impl Store {
    /// Runs a gc; see the module documentation for the phases and their order. On a full
    /// disk, a gc that cannot commit its deletions runs again with the store's reserve given
    /// back (`crate::reserve`).
    pub fn gc(&self, opts: &GcOptions<'_>, progress: &dyn Progress) -> Result<GcReport> {
        self.freeing("gc", || self.gc_once(opts, progress))
    }

    fn gc_once(&self, opts: &GcOptions<'_>, progress: &dyn Progress) -> Result<GcReport> {
        let _one = self.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
        let fault = |p: &str| {
            if let Some(f) = opts.fault {
                f(p)
            }
        };
        if !(0.0..=1.0).contains(&opts.compact_below) {
            return Err(Error::invalid(
                "compaction threshold",
                format!("{} (0.0 ..= 1.0)", opts.compact_below),
            ));
        }
        let now = self.now_ns();
        let cutoff = now.saturating_sub(opts.grace.as_nanos().min(i64::MAX as u128) as i64);
        let mut rep = GcReport {
            dry_run: opts.dry_run,
            started_at: crate::clock::rfc3339(self.clock.now()),
            grace_secs: opts.grace.as_secs(),
            ..Default::default()
        };
        let usage_before = self.index().pack_usage()?;
        rep.pack_bytes_before = usage_before.iter().map(|p| p.size).sum();

        // 1. Expire.
        let eligible = self.index().eligible_runs(now)?;
        let mut dec: HashMap<ChunkId, i64> = HashMap::new();
        let mut dead_manifests: Vec<ManifestDigest> = Vec::new();
        for (i, (run, _)) in eligible.iter().enumerate() {
            if opts.dry_run {
                for (c, n) in self.index().run_refs(run.id)? {
                    *dec.entry(c).or_default() += n;
                    rep.refs_dropped += n as u64;
                }
                rep.runs_expired.push(run.run.to_string());
                dead_manifests.extend(run.manifest);
                continue;
            }
            let Some(done) = self.index().expire_run(run.id, now)? else {
                continue;
            };
            tracing::info!(run = %done.run.run, retain_until = %format_until(done.retain_until_ns), "run expired");
            rep.refs_dropped += done.refs_dropped;
            rep.runs_expired.push(done.run.run.to_string());
            dead_manifests.extend(done.run.manifest);
            if i == 0 {
                fault("expire:after-first-run");
            }
        }
        fault("expire:after-index");
        let mut live_manifests = self.index().live_manifests()?;
        if opts.dry_run {
            // The runs that would expire are still live in a dry run.
            for d in &dead_manifests {
                live_manifests.remove(d);
            }
        }
        for d in &dead_manifests {
            if live_manifests.contains(d) {
                continue;
            }
            rep.manifests_deleted += 1;
            if !opts.dry_run {
                self.objects.delete(&manifest::manifest_key(d))?;
            }
        }
        fault("expire:after-manifests");

        // 2. Sweep.
        let swept: Vec<(ChunkId, PackId, u64, u64)>;
        {
            let _sweep = (!opts.dry_run).then(|| sweep_guard(&self.gate));
            let mut candidates = self.index().sweepable(cutoff)?;
            if opts.dry_run {
                let ids: Vec<ChunkId> = dec.keys().copied().collect();
                let refs = self.index().chunk_refs(&ids)?;
                let sweepable_packs: HashSet<PackId> = usage_before
                    .iter()
                    .filter(|p| p.created_at_ns <= cutoff)
                    .map(|p| p.pack)
                    .collect();
                for (id, n) in &dec {
                    if refs.get(id) == Some(n)
                        && let Some(loc) = self.index().chunk(id)?
                        && sweepable_packs.contains(&loc.pack)
                    {
                        candidates.push((
                            *id,
                            loc.pack,
                            loc.entry.stored_len as u64,
                            loc.entry.raw_len as u64,
                        ));
                    }
                }
            } else {
                let s = self.index().sweep_chunks(cutoff)?;
                debug_assert_eq!(s.chunks as usize, candidates.len());
            }
            rep.chunks_swept = candidates.len() as u64;
            rep.chunk_bytes_swept = candidates.iter().map(|c| c.2).sum();
            swept = candidates;
            fault("sweep:after-index");
            // Under the gate no seal is between storing its manifest and committing its run,
            // so the live set read now is complete.
            let live_now = self.index().live_manifests()?;
            (rep.orphan_objects_deleted, rep.unknown_manifests_kept) =
                self.remove_orphans(opts.dry_run, &live_now)?;
            fault("sweep:after-orphans");
        }
        rep.chunks_in_grace = if opts.dry_run {
            let ids: Vec<ChunkId> = dec.keys().copied().collect();
            let refs = self.index().chunk_refs(&ids)?;
            let newly = dec.iter().filter(|(id, n)| refs.get(id) == Some(n)).count() as u64;
            (self.index().unreferenced_chunks()? + newly).saturating_sub(swept.len() as u64)
        } else {
            self.index().unreferenced_chunks()?
        };

        // 3. Packs: what each holds after the sweep.
        let mut gone: HashMap<PackId, (u64, u64)> = HashMap::new();
        for (_, p, stored, _) in &swept {
            let e = gone.entry(*p).or_default();
            e.0 += 1;
            e.1 += stored;
        }
        let usage = if opts.dry_run {
            usage_before
                .iter()
                .map(|u| {
                    let mut u = u.clone();
                    if let Some((n, b)) = gone.get(&u.pack) {
                        u.live_chunks -= n;
                        u.live_stored_bytes -= b;
                    }
                    u
                })
                .collect()
        } else {
            self.index().pack_usage()?
        };
        let mut dead = Vec::new();
        let mut sparse = Vec::new();
        for u in usage {
            if u.live_chunks == 0 {
                dead.push(u);
            } else if u.live_chunks < u.chunks
                && (u.live_stored_bytes as f64) < opts.compact_below * u.size as f64
            {
                // Only a pack with dead chunks: one whose every chunk is live (a small pack
                // mostly header and table) would be rewritten into the same bytes.
                sparse.push(u);
            }
        }
        progress.set_total(sparse.iter().map(|u| u.live_stored_bytes).sum());
        for u in &dead {
            rep.packs_deleted += 1;
            rep.bytes_reclaimed += u.size;
            if opts.dry_run {
                continue;
            }
            if self.index().drop_empty_pack(&u.pack)? {
                fault("packs:after-index");
                self.objects.delete(&pack::pack_key(&u.pack))?;
                fault("packs:after-delete");
            }
        }
        self.compact(&sparse, opts, &mut rep, progress, &fault)?;
        rep.pack_bytes_after = if opts.dry_run {
            rep.pack_bytes_before.saturating_sub(rep.bytes_reclaimed)
        } else {
            self.index().pack_usage()?.iter().map(|p| p.size).sum()
        };
        rep.bytes_reclaimed = rep.pack_bytes_before.saturating_sub(rep.pack_bytes_after);
        if !opts.dry_run {
            let detail = serde_json::to_value(&rep)
                .map_err(|e| Error::Internal(format!("gc report encode: {e}")))?;
            self.index().event(now, "gc.finished", None, &detail)?;
            self.record_lifecycle();
            if let Err(e) = self.index().reclaim_space() {
                tracing::warn!("gc finished; the index keeps its free pages: {e}");
            }
        }
        if !opts.dry_run
            && let Some(t) = &self.tier
            && (!rep.runs_expired.is_empty() || rep.packs_deleted > 0 || rep.packs_rewritten > 0)
        {
            // A rebuild from the bucket must not start from a snapshot that still lists what
            // this gc deleted.
            match t.upload_snapshot() {
                Ok(key) => tracing::info!(key, "index snapshot uploaded after gc"),
                Err(e) => tracing::warn!(
                    "gc finished, but the index snapshot after it failed ({e}); a rebuild from the bucket turns the deleted runs into tombstones"
                ),
            }
        }
        self.save_gc_report(&rep);
        tracing::info!(
            dry_run = rep.dry_run,
            runs = rep.runs_expired.len(),
            chunks = rep.chunks_swept,
            packs_deleted = rep.packs_deleted,
            packs_rewritten = rep.packs_rewritten,
            bytes = rep.bytes_reclaimed,
            "gc finished"
        );
        Ok(rep)
    }

    /// Rewrites sparse packs: live chunks (verified) into new packs, then the old ones go.
    fn compact(
        &self,
        sparse: &[crate::index::PackUsage],
        opts: &GcOptions<'_>,
        rep: &mut GcReport,
        progress: &dyn Progress,
        fault: &dyn Fn(&str),
    ) -> Result<()> {
        let target = self.config().pack_target_size;
        let mut builder = PackBuilder::new();
        let mut batch: Vec<PackId> = Vec::new();
        let mut batch_bytes = 0u64;
        for u in sparse {
            rep.packs_rewritten += 1;
            rep.live_bytes_copied += u.live_stored_bytes;
            if opts.dry_run {
                rep.bytes_reclaimed += u.size - u.live_stored_bytes;
                continue;
            }
            if batch_bytes > 0 && batch_bytes + u.live_stored_bytes > target {
                self.flush_compacted(
                    std::mem::take(&mut builder),
                    &std::mem::take(&mut batch),
                    rep,
                    fault,
                )?;
                batch_bytes = 0;
            }
            let key = pack::pack_key(&u.pack);
            for e in self.index().pack_chunks(&u.pack)? {
                let stored = self
                    .objects
                    .get_range(&key, e.offset, e.stored_len as u64)?;
                // Verify before copying: compaction must not spread a damaged chunk.
                pack::decode_chunk(&key, &e, &stored)?;
                builder.add(e.chunk, e.codec, e.raw_len as usize, &stored);
                progress.inc(e.stored_len as u64);
            }
            batch.push(u.pack);
            batch_bytes += u.live_stored_bytes;
        }
        if !batch.is_empty() {
            self.flush_compacted(builder, &batch, rep, fault)?;
        }
        Ok(())
    }

    fn flush_compacted(
        &self,
        builder: PackBuilder,
        old: &[PackId],
        rep: &mut GcReport,
        fault: &dyn Fn(&str),
    ) -> Result<()> {
        if !builder.is_empty() {
            let (id, bytes, entries) = builder.finish();
            self.objects.put(&pack::pack_key(&id), &bytes)?;
            fault("compact:after-pack-written");
            self.index()
                .move_chunks(&id, bytes.len() as u64, &entries, self.now_ns())?;
            rep.packs_written += 1;
            fault("compact:after-index");
        }
        for p in old {
            if self.index().drop_empty_pack(p)? {
                self.objects.delete(&pack::pack_key(p))?;
            }
        }
        fault("compact:after-old-packs");
        Ok(())
    }

    /// Deletes objects the index does not refer to: manifests of deleted runs (a crash kept
    /// their deletion from finishing) and packs left by a crash between a pack's write and its
    /// index commit. Caller holds the sweep gate, so no seal is between storing its manifest
    /// and committing its run. A manifest no run in the index has ever had is kept: it is an
    /// interrupted seal's, or the index is older than the objects (restored from an older
    /// copy), whose runs `index rebuild` would recover; while there is one, packs the index
    /// does not know are kept too. Returns (objects deleted, unknown manifests kept).
    fn remove_orphans(&self, dry_run: bool, live: &HashSet<ManifestDigest>) -> Result<(u64, u64)> {
        let recorded = self.index().recorded_manifests()?;
        let mut n = 0;
        let mut unknown = 0;
        for o in self.objects.list("manifests/")? {
            let d = o
                .key
                .rsplit('/')
                .next()
                .and_then(|h| h.parse::<ManifestDigest>().ok());
            match d {
                Some(d) if live.contains(&d) => {}
                Some(d) if recorded.contains(&d) => {
                    n += 1;
                    if !dry_run {
                        tracing::info!(key = %o.key, "deleting the manifest of a deleted run");
                        self.objects.delete(&o.key)?;
                    }
                }
                Some(_) => {
                    unknown += 1;
                    tracing::warn!(
                        key = %o.key,
                        "kept a manifest no run in the index has had: an interrupted seal's, or the index is older than the objects (`artifactfs index rebuild` restores its run)"
                    );
                }
                None => tracing::warn!(key = %o.key, "unexpected object under manifests/; kept"),
            }
        }
        if unknown > 0 {
            tracing::warn!(
                unknown,
                "packs the index does not know are kept while there are manifests it never recorded"
            );
            return Ok((n, unknown));
        }
        let packs: HashSet<PackId> = self.index().packs()?.into_iter().map(|p| p.0).collect();
        for o in self.objects.list("packs/")? {
            match pack::pack_id_from_key(&o.key) {
                Some(id) if packs.contains(&id) => {}
                Some(_) => {
                    n += 1;
                    if !dry_run {
                        tracing::info!(key = %o.key, "deleting an orphan pack");
                        self.objects.delete(&o.key)?;
                    }
                }
                None => tracing::warn!(key = %o.key, "unexpected object under packs/; kept"),
            }
        }
        Ok((n, 0))
    }

    fn save_gc_report(&self, rep: &GcReport) {
        let path = self.root().join("gc-report.json");
        let tmp = self.root().join("gc-report.json.tmp");
        let res = serde_json::to_vec_pretty(rep)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            tracing::warn!("cannot save the gc report to {}: {e}", path.display());
        }
    }

    /// The report of the last gc (or dry run), if any.
    pub fn last_gc_report(&self) -> Option<serde_json::Value> {
        let b = std::fs::read(self.root().join("gc-report.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }
}
