//! The retention verbs: `retain`, `hold`, `gc`, and what `runs --expired` / `--deleted` show.
//! Each one validates its arguments and makes engine calls; the rules live in the engine.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use artifactfs_core::clock::{from_unix_ns, rfc3339};
use artifactfs_core::gc::{GcOptions, GcReport, RetentionInfo};
use artifactfs_core::names::validate_component;
use artifactfs_core::{Error, RunRef, Store};
use clap::Subcommand;

use indicatif::HumanBytes;

use crate::cli::{Engine, Io};
use crate::output::Bar;

/// `artifactfs hold …`
#[derive(Subcommand, Debug, serde::Serialize, serde::Deserialize)]
pub enum HoldCommand {
    /// Place a named hold on a run (or change its reason): the run is never deleted while held.
    Add {
        /// NAMESPACE/RUN
        run: String,
        /// The hold's name: letters, digits, '.', '_' or '-'.
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a named hold.
    Rm {
        /// NAMESPACE/RUN
        run: String,
        name: String,
    },
    /// List a run's holds.
    Ls {
        /// NAMESPACE/RUN
        run: String,
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `artifactfs retain`.
pub struct RetainArgs {
    pub target: String,
    pub value: Option<String>,
    pub override_: bool,
    pub reason: Option<String>,
    pub clear: bool,
    pub json: bool,
}

fn print_json(out: &mut dyn Write, v: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn print_retention(out: &mut dyn Write, i: &RetentionInfo) -> Result<()> {
    writeln!(out, "run           {}/{}", i.namespace, i.run)?;
    writeln!(out, "state         {}", i.state)?;
    writeln!(
        out,
        "retain        {}",
        i.retain
            .as_deref()
            .unwrap_or("(none: kept until one is set)")
    )?;
    let until = match (&i.retain_until, &i.retain) {
        (Some(u), _) => u.clone(),
        (None, Some(r)) => format!("{r} after the seal"),
        (None, None) => "-".into(),
    };
    writeln!(out, "retain-until  {until}")?;
    if i.holds.is_empty() {
        writeln!(out, "holds         -")?;
    }
    for (n, h) in i.holds.iter().enumerate() {
        let label = if n == 0 { "holds" } else { "" };
        writeln!(
            out,
            "{label:<13} {} (since {}){}",
            h.name,
            h.placed_at,
            if h.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", h.reason)
            }
        )?;
    }
    writeln!(
        out,
        "eligible      {}",
        if i.eligible {
            "yes: the next gc deletes it"
        } else {
            "no"
        }
    )?;
    Ok(())
}

/// `artifactfs retain NAMESPACE/RUN [VALUE] [--override --reason TEXT]`, or on a namespace,
/// `artifactfs retain NAMESPACE [VALUE | --clear]` for the default of its new runs.
pub fn retain(store: &Store, out: &mut dyn Write, a: RetainArgs) -> Result<()> {
    if !a.target.contains('/') {
        let ns = &a.target;
        validate_component("namespace", ns, false)?;
        if a.override_ || a.reason.is_some() {
            bail!(Error::invalid(
                "--override",
                "applies to runs; a namespace default can be changed freely"
            ));
        }
        if a.clear {
            store.set_namespace_retention(ns, None)?;
        } else if let Some(v) = &a.value {
            store.set_namespace_retention(ns, Some(v))?;
        }
        let cur = store.namespace_retention(ns)?;
        if a.json {
            print_json(
                out,
                &serde_json::json!({ "namespace": ns, "default_retain": cur }),
            )?;
        } else {
            writeln!(
                out,
                "namespace {ns}: new runs get {}",
                cur.as_deref()
                    .map_or("no default retention".into(), |r| format!("retention {r}"))
            )?;
        }
        return Ok(());
    }
    let run = RunRef::parse(&a.target)?;
    if a.clear {
        bail!(Error::NotPermitted(format!(
            "run {run}: a run's retention cannot be removed, only extended"
        )));
    }
    if a.override_ && a.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        bail!(Error::invalid(
            "--override",
            "needs --reason TEXT: the override is recorded with it"
        ));
    }
    if a.reason.is_some() && !a.override_ {
        bail!(Error::invalid("--reason", "is given with --override"));
    }
    let info = match &a.value {
        Some(v) => store
            .set_retention(
                &run,
                v,
                a.override_.then_some(a.reason.as_deref().unwrap_or("")),
            )
            .with_context(|| format!("cannot set the retention of {run} to {v:?}"))?,
        None => store.retention_info(&run)?,
    };
    if a.json {
        print_json(out, &info)
    } else {
        print_retention(out, &info)
    }
}

/// `artifactfs hold add|rm|ls`.
pub fn hold(store: &Store, out: &mut dyn Write, cmd: HoldCommand) -> Result<()> {
    match cmd {
        HoldCommand::Add { run, name, reason } => {
            let run = RunRef::parse(&run)?;
            store.place_hold(&run, &name, reason.as_bytes())?;
            writeln!(out, "hold {name} placed on {run}")?;
        }
        HoldCommand::Rm { run, name } => {
            let run = RunRef::parse(&run)?;
            store.remove_hold(&run, &name)?;
            writeln!(out, "hold {name} removed from {run}")?;
        }
        HoldCommand::Ls { run, json } => {
            let run = RunRef::parse(&run)?;
            let holds = store.holds(&run)?;
            if json {
                print_json(out, &holds)?;
            } else {
                for h in holds {
                    writeln!(out, "{}\t{}\t{}", h.name, h.placed_at, h.reason)?;
                }
            }
        }
    }
    Ok(())
}

/// `artifactfs runs --expired`: the runs the next gc deletes.
pub fn expired(
    store: &Store,
    out: &mut dyn Write,
    namespace: Option<&str>,
    json: bool,
) -> Result<()> {
    let runs: Vec<RetentionInfo> = store
        .expired_runs()?
        .into_iter()
        .filter(|r| namespace.is_none_or(|n| n == r.namespace))
        .collect();
    if json {
        return print_json(out, &runs);
    }
    for r in runs {
        writeln!(
            out,
            "{}/{}\tretain {}\tuntil {}",
            r.namespace,
            r.run,
            r.retain.unwrap_or_default(),
            r.retain_until.unwrap_or_default()
        )?;
    }
    Ok(())
}

/// `artifactfs runs --deleted`: tombstones of deleted runs.
pub fn deleted(
    store: &Store,
    out: &mut dyn Write,
    namespace: Option<&str>,
    json: bool,
) -> Result<()> {
    let rows = store.tombstones(namespace)?;
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|(r, at)| {
            serde_json::json!({
                "namespace": r.run.namespace,
                "run": r.run.run,
                "manifest": r.manifest.map(|d| d.to_hex()),
                "created_at": rfc3339(from_unix_ns(r.created_at_ns)),
                "sealed_at": r.sealed_at_ns.map(|t| rfc3339(from_unix_ns(t))),
                "deleted_at": rfc3339(from_unix_ns(*at)),
            })
        })
        .collect();
    if json {
        return print_json(out, &list);
    }
    for (r, at) in rows {
        writeln!(
            out,
            "{}\tdeleted {}\tmanifest {}",
            r.run,
            rfc3339(from_unix_ns(at)),
            r.manifest.map(|d| d.to_hex()).unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Arguments of `artifactfs gc`.
pub struct GcArgs {
    pub dry_run: bool,
    pub grace: Duration,
    pub compact_below: f64,
    pub json: bool,
}

/// `ARTIFACTFS_FAULT_POINT=NAME` makes gc abort the process at that point, as a crash would;
/// for crash tests. The names are `artifactfs_core::gc::FAULT_POINTS`.
fn fault_point() -> Result<Option<String>> {
    match std::env::var("ARTIFACTFS_FAULT_POINT") {
        Ok(p) if artifactfs_core::gc::FAULT_POINTS.contains(&p.as_str()) => Ok(Some(p)),
        Ok(p) => bail!(Error::invalid(
            "ARTIFACTFS_FAULT_POINT",
            format!(
                "{p:?} is none of {}",
                artifactfs_core::gc::FAULT_POINTS.join(", ")
            )
        )),
        Err(_) => Ok(None),
    }
}

/// `artifactfs gc [--dry-run] [--grace DURATION] [--json]`.
pub fn gc(eng: &Engine, io: &mut Io, a: GcArgs) -> Result<()> {
    let point = fault_point()?;
    let abort_at = |p: &str| {
        if point.as_deref() == Some(p) {
            eprintln!("artifactfs: fault point {p}: aborting");
            std::process::abort();
        }
    };
    let opts = GcOptions {
        dry_run: a.dry_run,
        grace: a.grace,
        compact_below: a.compact_below,
        fault: point
            .is_some()
            .then_some(&abort_at as &(dyn Fn(&str) + Sync)),
    };
    let bar = Bar::bytes(io.progress && !a.json, "gc");
    // In a mount, through its view, so that deleted runs leave the mount's caches.
    let rep = match eng.vfs {
        Some(v) => v.gc(&opts, &bar)?,
        None => eng.store.gc(&opts, &bar)?,
    };
    bar.finish();
    if a.json {
        return print_json(io.out, &rep);
    }
    print_gc(io.out, &rep)
}

fn print_gc(out: &mut dyn Write, r: &GcReport) -> Result<()> {
    let would = if r.dry_run { "would be " } else { "" };
    writeln!(
        out,
        "gc{}: {} runs {would}expired, {} chunks {would}swept ({}), {} packs {would}deleted, \
         {} packs {would}rewritten, {} orphan objects {would}deleted",
        if r.dry_run { " (dry run)" } else { "" },
        r.runs_expired.len(),
        r.chunks_swept,
        HumanBytes(r.chunk_bytes_swept),
        r.packs_deleted,
        r.packs_rewritten,
        r.orphan_objects_deleted,
    )?;
    if r.unknown_manifests_kept > 0 {
        writeln!(
            out,
            "kept {} manifests no run in the index has had, and the packs it does not know: an \
             interrupted seal's, or the index is older than the objects (`artifactfs index \
             rebuild` restores their runs)",
            r.unknown_manifests_kept
        )?;
    }
    const SHOWN: usize = 20;
    for run in r.runs_expired.iter().take(SHOWN) {
        writeln!(out, "  {would}expired {run}")?;
    }
    if r.runs_expired.len() > SHOWN {
        writeln!(
            out,
            "  … and {} more (--json lists them all)",
            r.runs_expired.len() - SHOWN
        )?;
    }
    writeln!(
        out,
        "pack bytes {} -> {} ({} {}reclaimed); {} unreferenced chunks kept for the {}s grace period",
        HumanBytes(r.pack_bytes_before),
        HumanBytes(r.pack_bytes_after),
        HumanBytes(r.bytes_reclaimed),
        if r.dry_run { "would be " } else { "" },
        r.chunks_in_grace,
        r.grace_secs,
    )?;
    Ok(())
}
