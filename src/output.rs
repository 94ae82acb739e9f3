//! How the CLI prints: human-readable text by default, JSON with `--json` for scripts, and a
//! progress bar on standard error only when standard output is a terminal.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use artifactfs_core::clock::{from_unix_ns, rfc3339};
use artifactfs_core::id::ManifestDigest;
use artifactfs_core::index::{IndexStats, RunRow};
use artifactfs_core::ingest::IngestReport;
use artifactfs_core::manifest::{Entry, Kind, Manifest};
use artifactfs_core::verify::VerifyReport;
use artifactfs_core::{Progress, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// A byte-counting progress bar, hidden when not on a terminal; it also tells the engine when
/// the caller has gone away ([`Progress::cancelled`]).
pub struct Bar(Option<ProgressBar>, Option<Arc<AtomicBool>>);

impl Bar {
    pub fn bytes(visible: bool, what: &str) -> Self {
        if !visible {
            return Self(None, None);
        }
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_message(what.to_owned());
        Self(Some(pb), None)
    }

    /// The work stops once `flag` is set.
    pub fn cancelled_by(mut self, flag: Option<Arc<AtomicBool>>) -> Self {
        self.1 = flag;
        self
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(bytes);
        }
    }
    fn inc(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
        }
    }
    fn cancelled(&self) -> bool {
        self.1.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

fn print_json(out: &mut dyn Write, v: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "inf".into()
    }
}

pub fn ingest(out: &mut dyn Write, r: &IngestReport, json: bool) -> Result<()> {
    if json {
        return print_json(out, r);
    }
    writeln!(out, "run               {}", r.run)?;
    writeln!(out, "manifest          {}", r.manifest)?;
    writeln!(out, "files             {}", r.files)?;
    writeln!(out, "raw_bytes         {}", r.raw_bytes)?;
    writeln!(out, "new_stored_bytes  {}", r.new_stored_bytes)?;
    writeln!(out, "dedup_ratio       {}", ratio(r.dedup_ratio))?;
    writeln!(out, "reduction         {}", ratio(r.reduction))?;
    Ok(())
}

fn time(ns: Option<i64>) -> String {
    ns.map(|n| rfc3339(from_unix_ns(n)))
        .unwrap_or_else(|| "-".into())
}

pub fn runs(out: &mut dyn Write, store: &Store, runs: &[RunRow], json: bool) -> Result<()> {
    if json {
        let mut v = Vec::with_capacity(runs.len());
        for r in runs {
            let meta: serde_json::Map<String, serde_json::Value> = store
                .run_meta(r)?
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            v.push(json!({
                "namespace": r.run.namespace,
                "run": r.run.run,
                "state": r.state,
                "manifest": r.manifest.map(|d| d.to_hex()),
                "created_at": time(Some(r.created_at_ns)),
                "sealed_at": r.sealed_at_ns.map(|n| time(Some(n))),
                "files": r.files,
                "raw_bytes": r.raw_bytes,
                "metadata": meta,
            }));
        }
        return print_json(out, &v);
    }
    for r in runs {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}",
            r.run,
            r.state,
            r.files,
            r.raw_bytes,
            time(r.sealed_at_ns),
            r.manifest.map(|d| d.to_hex()).unwrap_or_else(|| "-".into())
        )?;
    }
    Ok(())
}

fn mode_string(e: &Entry) -> String {
    let t = match e.kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Fifo => 'p',
        Kind::Char => 'c',
        Kind::Block => 'b',
        Kind::Socket => 's',
        Kind::File | Kind::Hardlink => '-',
    };
    let mut s = String::from(t);
    // setuid, setgid and sticky show in the execute column, as `ls -l` shows them.
    for (shift, special, set) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (e.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, e.mode & special != 0) {
            (true, true) => set,
            (false, true) => set.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

pub fn ls(out: &mut dyn Write, entries: &[Entry], json: bool) -> Result<()> {
    if json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({
                    "path": e.path,
                    "type": e.kind.as_str(),
                    "mode": format!("{:04o}", e.mode),
                    "uid": e.uid,
                    "gid": e.gid,
                    "size": e.size,
                    "mtime": rfc3339(from_unix_ns(e.mtime_ns)),
                    "mtime_ns": e.mtime_ns,
                    "blake3": e.blake3.map(|h| h.to_hex()),
                    "target": e.target,
                })
            })
            .collect();
        return print_json(out, &v);
    }
    for e in entries {
        let name = e.path.rsplit('/').next().unwrap_or(&e.path);
        let suffix = match (&e.kind, &e.target) {
            (Kind::Symlink, Some(t)) => format!(" -> {t}"),
            (Kind::Hardlink, Some(t)) => format!(" => {t}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{} {:>5} {:>5} {:>12} {} {name}{suffix}",
            mode_string(e),
            e.uid,
            e.gid,
            e.size,
            rfc3339(from_unix_ns(e.mtime_ns)),
        )?;
    }
    Ok(())
}

pub fn manifest(out: &mut dyn Write, d: &ManifestDigest, m: &Manifest) -> Result<()> {
    writeln!(out, "run        {}/{}", m.namespace, m.run)?;
    writeln!(out, "manifest   {d}")?;
    writeln!(out, "sealed_at  {}", m.sealed_at)?;
    for (k, v) in &m.metadata {
        writeln!(out, "meta       {k}={v}")?;
    }
    writeln!(out, "entries    {}", m.entries.len())?;
    writeln!(out, "raw_bytes  {}", m.raw_bytes())?;
    for e in &m.entries {
        let h = e.blake3.map(|h| h.to_hex()).unwrap_or_else(|| "-".into());
        writeln!(out, "{} {:>12} {h} {}", mode_string(e), e.size, e.path)?;
    }
    Ok(())
}

pub fn verify(out: &mut dyn Write, r: &VerifyReport, json: bool) -> Result<()> {
    if json {
        return print_json(out, r);
    }
    writeln!(
        out,
        "verified {} runs, {} chunks in {} packs, {} bytes",
        r.runs, r.chunks, r.packs, r.bytes
    )?;
    for line in &r.repaired {
        writeln!(out, "repaired {line}")?;
    }
    if r.ok() {
        writeln!(out, "ok")?;
        return Ok(());
    }
    let mut by_file: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &r.damage {
        writeln!(out, "DAMAGED {} {}: {}", d.object, d.id, d.problem)?;
        for a in &d.affects {
            writeln!(out, "  affects {a}")?;
            *by_file.entry(a).or_default() += 1;
        }
    }
    // One line per damaged file (or run, for a manifest): what an operator restores.
    writeln!(out, "affected ({}):", by_file.len())?;
    for (a, n) in &by_file {
        writeln!(
            out,
            "  {a}: {n} damaged object{}",
            if *n == 1 { "" } else { "s" }
        )?;
    }
    let runs = artifactfs_core::verify::affected_runs(r);
    writeln!(
        out,
        "{} damaged objects; runs affected: {}",
        r.damage.len(),
        runs.join(", ")
    )?;
    if r.recorded_lost > 0 {
        writeln!(
            out,
            "{} damaged chunks recorded as lost: ingesting or writing the same bytes again stores them anew and repairs the runs",
            r.recorded_lost
        )?;
    }
    Ok(())
}

pub fn stats(out: &mut dyn Write, store: &Store, s: &IndexStats, json: bool) -> Result<()> {
    let dedup = if s.chunk_raw_bytes == 0 {
        0.0
    } else {
        s.raw_bytes as f64 / s.chunk_raw_bytes as f64
    };
    let reduction = if s.pack_bytes == 0 {
        0.0
    } else {
        s.raw_bytes as f64 / s.pack_bytes as f64
    };
    let space = store.disk_space()?;
    if json {
        return print_json(
            out,
            &json!({
                "store": store.root(),
                "disk_free_bytes": space.free_bytes,
                "reserve_held": space.reserve_held,
                "runs": s.runs_sealed + s.runs_open,
                "runs_sealed": s.runs_sealed,
                "runs_open": s.runs_open,
                "files": s.files,
                "raw_bytes": s.raw_bytes,
                "stored_bytes": s.pack_bytes,
                "chunks": s.chunks,
                "chunk_raw_bytes": s.chunk_raw_bytes,
                "chunk_stored_bytes": s.chunk_stored_bytes,
                "packs": s.packs,
                "lost_chunks": s.lost_chunks,
                "dedup_ratio": dedup,
                "reduction": reduction,
            }),
        );
    }
    writeln!(out, "store         {}", store.root().display())?;
    writeln!(
        out,
        "runs          {} sealed, {} open",
        s.runs_sealed, s.runs_open
    )?;
    writeln!(out, "files         {}", s.files)?;
    writeln!(out, "raw_bytes     {}", s.raw_bytes)?;
    writeln!(out, "stored_bytes  {}", s.pack_bytes)?;
    writeln!(out, "chunks        {}", s.chunks)?;
    writeln!(out, "packs         {}", s.packs)?;
    if s.lost_chunks > 0 {
        writeln!(
            out,
            "lost_chunks   {} (named by runs, held by no readable pack: `artifactfs verify`)",
            s.lost_chunks
        )?;
    }
    writeln!(out, "dedup_ratio   {dedup:.2}")?;
    writeln!(out, "reduction     {reduction:.2}")?;
    let reserve = if space.reserve_held {
        ""
    } else {
        " (reserve given back: the disk is or was full, ADR 0023)"
    };
    writeln!(out, "disk_free     {}{reserve}", space.free_bytes)?;
    Ok(())
}

/// `tier push`.
pub fn tier_push(
    out: &mut dyn Write,
    err: &mut dyn Write,
    r: &artifactfs_core::tier::PushReport,
    json: bool,
) -> Result<()> {
    if json {
        return print_json(out, r);
    }
    writeln!(
        out,
        "pushed {} packs ({} bytes) and {} manifests; evicted {} packs ({} bytes); {} still pending",
        r.packs, r.pack_bytes, r.manifests, r.evicted_packs, r.evicted_bytes, r.still_pending
    )?;
    for e in &r.errors {
        writeln!(err, "artifactfs: upload failed: {e}")?;
    }
    Ok(())
}

/// `tier status`.
pub fn tier_status(
    out: &mut dyn Write,
    s: &artifactfs_core::tier::TierStatus,
    json: bool,
) -> Result<()> {
    if json {
        return print_json(out, s);
    }
    let c = &s.counts;
    writeln!(out, "backend        {} ({})", s.backend, s.storage_class)?;
    writeln!(
        out,
        "cache          {} of {} bytes ({} cached ranges, {} bytes)",
        s.cache_bytes, s.cache_size, s.range_cache_entries, s.range_cache_bytes
    )?;
    writeln!(
        out,
        "packs          {} local only (pending, {} bytes), {} both ({} bytes), {} remote only ({} bytes)",
        c.pending_packs,
        c.pending_pack_bytes,
        c.both_packs,
        c.both_pack_bytes,
        c.remote_only_packs,
        c.remote_only_pack_bytes
    )?;
    writeln!(
        out,
        "manifests      {} pending, {} remote",
        c.pending_manifests, c.remote_manifests
    )?;
    writeln!(
        out,
        "lifecycle      {} pending (runs and namespaces whose retention or holds changed)",
        s.pending_lifecycle
    )?;
    Ok(())
}

/// `index rebuild`.
pub fn rebuild(
    out: &mut dyn Write,
    store: &Store,
    r: &artifactfs_core::rebuild::RebuildReport,
    json: bool,
) -> Result<()> {
    if json {
        return print_json(out, r);
    }
    writeln!(
        out,
        "rebuilt the index of {}: {} packs ({} chunks, {} remote), {} runs",
        store.root().display(),
        r.packs,
        r.chunks,
        r.remote_packs,
        r.runs
    )?;
    if let Some(snap) = &r.snapshot {
        writeln!(
            out,
            "started from the index snapshot {snap}; replayed {} packs and {} runs newer than it",
            r.replayed_packs, r.replayed_runs
        )?;
    }
    if let Some(old) = &r.old_index {
        writeln!(out, "previous index kept as {old}")?;
    }
    for s in &r.skipped {
        eprintln!("artifactfs: skipped {s}");
    }
    for q in &r.quarantined {
        eprintln!("artifactfs: an object that cannot be read was moved to {q}");
    }
    for d in &r.damaged_runs {
        eprintln!(
            "artifactfs: run {d}: restored, but some of its files cannot be read (`artifactfs verify` names them; ingesting the same bytes again repairs them)"
        );
    }
    for m in &r.manifests_restored {
        eprintln!(
            "artifactfs: run {m}: its manifest object was gone; written again from the previous index"
        );
    }
    if r.tombstones_restored > 0 {
        writeln!(
            out,
            "{} deleted runs (tombstones) taken over from the previous index",
            r.tombstones_restored
        )?;
    }
    for l in &r.lost_runs {
        eprintln!("artifactfs: run {l}: NOT restored");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings_show_setuid_setgid_and_sticky_as_ls_does() {
        let e = |kind, mode| Entry {
            path: "x".into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_ns: 0,
            blake3: None,
            chunks: Vec::new(),
            target: None,
            rdev: None,
            xattrs: Default::default(),
        };
        assert_eq!(mode_string(&e(Kind::File, 0o644)), "-rw-r--r--");
        assert_eq!(mode_string(&e(Kind::File, 0o4755)), "-rwsr-xr-x");
        assert_eq!(mode_string(&e(Kind::File, 0o2644)), "-rw-r-Sr--");
        assert_eq!(mode_string(&e(Kind::Dir, 0o1777)), "drwxrwxrwt");
        assert_eq!(mode_string(&e(Kind::Dir, 0o3770)), "drwxrws--T");
    }
}
