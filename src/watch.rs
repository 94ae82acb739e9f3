//! `artifactfs watch SPOOL`: ingest runs that producers write into a plain directory, for hosts
//! without FUSE (ADR 0013).
//!
//! Every directory directly under the spool is a run, `NAMESPACE/<dirname>`. The watcher learns
//! about changes from inotify (`notify`): any create, write, close after writing, rename,
//! attribute change or removal under a run restarts that run's quiet period. A run is sealed
//! when a file named `--seal-marker` appears in its directory (closed or renamed into place),
//! or once it has been quiet for `--seal-after`. Sealing is the engine's ingest of the tree as
//! it is then, which gives the manifest `artifactfs ingest` gives (the mount also chunks at
//! seal time, ADR 0007). Before the manifest is committed, every entry of the tree is stat'ed
//! again: if any size, mtime, ctime or inode moved, or an entry came or went, the attempt is
//! dropped (its chunks are gc's) and the run waits for quiet again.
//!
//! The run directory's `user.retain` becomes the run's retention and its `user.hold.NAME`
//! xattrs become holds, as through the mount and as for `ingest` (which applies them: a bad
//! value fails the seal with a message, before anything is stored); its other text `user.*`
//! xattrs are the manifest's metadata. With `--remove-after-seal` the directory is then
//! removed after the seal.
//!
//! Restarts: at start the spool is scanned. A run already sealed in the store whose tree still
//! matches its manifest (paths, types, modes, sizes, mtimes) is skipped, or removed with
//! `--remove-after-seal`; one that no longer matches is left alone with an error, never
//! ingested twice. Other runs start their quiet period from their newest change (ctime), so a
//! restart does not reset a period that had nearly passed.
//!
//! Like the mount, the watcher owns the store (its lock) and answers other commands over the
//! control socket while it runs. It stops on SIGINT or SIGTERM, after the seal in progress.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use artifactfs_core::manifest::{Kind, ROOT};
use artifactfs_core::vfs::{Vfs, VfsOptions};
use artifactfs_core::{Error, NoProgress, RunRef, Store};
use nix::sys::signal::{SigSet, Signal};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};

/// How long the watcher waits for commands from its control socket to finish at exit.
const COMMAND_GRACE: Duration = Duration::from_secs(30);
/// How often due runs are looked for when nothing happens.
const TICK: Duration = Duration::from_millis(200);

/// What `watch` was asked.
pub struct WatchArgs {
    pub store: PathBuf,
    pub spool: PathBuf,
    pub namespace: Option<String>,
    pub seal_after: Duration,
    pub seal_marker: Option<String>,
    pub remove_after_seal: bool,
}

enum Msg {
    Fs(notify::Result<notify::Event>),
    Signal(Signal),
}

/// A run not sealed yet.
struct Pending {
    /// The last change seen.
    last: Instant,
    /// The marker appeared since the last failed attempt.
    marker: bool,
    /// Why the last attempt failed, if it failed for a reason that waiting cannot cure; the
    /// run is tried again after its next change.
    failed: Option<String>,
}

enum RunState {
    Pending(Pending),
    /// Sealed (now or before), or refused for good; changes are ignored.
    Done,
}

/// One entry's stat facts: what must not move between the ingest and its commit.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    mode: u32,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

struct Watch<'a> {
    args: &'a WatchArgs,
    spool: PathBuf,
    namespace: String,
    store: &'a Store,
    runs: BTreeMap<String, RunState>,
}

/// Runs the watcher until SIGINT or SIGTERM.
pub fn watch(args: &WatchArgs) -> Result<()> {
    // Block the signals before any thread starts, so that only the waiting thread sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("cannot block signals")?;

    let spool = args
        .spool
        .canonicalize()
        .map_err(|e| Error::io("resolve spool directory", &args.spool, e))?;
    if !spool.is_dir() {
        bail!(Error::invalid(
            "spool",
            format!("{} is not a directory", spool.display())
        ));
    }
    let namespace = match &args.namespace {
        Some(ns) => ns.clone(),
        None => spool
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::invalid(
                    "spool",
                    format!(
                        "{} has no UTF-8 name to use as the namespace; give --namespace",
                        spool.display()
                    ),
                )
            })?,
    };
    artifactfs_core::names::validate_component("namespace", &namespace, false).with_context(
        || format!("namespace {namespace:?} (from --namespace or the spool directory's name)"),
    )?;
    if let Some(m) = &args.seal_marker {
        artifactfs_core::names::validate_component("seal marker", m, true)?;
    }
    let store_abs = std::path::absolute(&args.store)
        .map_err(|e| Error::io("resolve store directory", &args.store, e))?;
    let store_abs = store_abs.canonicalize().unwrap_or(store_abs);
    if store_abs.starts_with(&spool) || spool.starts_with(&store_abs) {
        bail!(Error::invalid(
            "spool",
            "the spool and the store must not contain one another"
        ));
    }

    let store = open_for_watch(&args.store)?;
    let uploader = store
        .tier()
        .map(|t| t.start_uploader(Duration::from_secs(30)));
    // The view is only what the control socket needs: other commands on this store reach
    // the watcher the way they reach a mount.
    let vfs = Arc::new(Vfs::new(store, VfsOptions::default())?);
    let control = match crate::control::Server::start(&args.store, vfs.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("{e:#}; other commands on this store will report it in use");
            None
        }
    };

    let (tx, rx) = channel();
    let fs_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = fs_tx.send(Msg::Fs(ev));
    })
    .context("cannot start watching (inotify)")?;
    watcher
        .watch(&spool, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", spool.display()))?;
    spawn_signal_thread(signals, tx)?;
    tracing::info!(
        spool = %spool.display(), namespace = %namespace, seal_after = ?args.seal_after,
        marker = ?args.seal_marker, "watching; until it stops, other artifactfs commands on this store go through its control socket"
    );

    let mut w = Watch {
        args,
        spool,
        namespace,
        store: vfs.store(),
        runs: BTreeMap::new(),
    };
    // After the watch is in place: nothing written from here on is missed.
    w.rescan();
    let res = w.serve(&rx);
    drop(watcher);
    if let Some(c) = control {
        c.shutdown(COMMAND_GRACE);
    }
    if let Some(u) = uploader {
        u.stop();
    }
    res
}

fn open_for_watch(dir: &Path) -> Result<Store> {
    crate::mount::open_for_mount(dir, "watch into")
}

fn spawn_signal_thread(signals: SigSet, tx: Sender<Msg>) -> Result<()> {
    std::thread::Builder::new()
        .name("afs-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = tx.send(Msg::Signal(sig));
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

impl Watch<'_> {
    fn serve(&mut self, rx: &Receiver<Msg>) -> Result<()> {
        loop {
            match rx.recv_timeout(TICK) {
                Ok(msg) => {
                    if self.handle(msg) {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("the file watcher stopped"),
            }
            if self.seal_due(rx) {
                return Ok(());
            }
        }
    }

    /// Takes one message into account; true if it asks to stop.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Signal(sig) => {
                tracing::info!(signal = ?sig, "stopping");
                return true;
            }
            Msg::Fs(Ok(ev)) => self.on_event(&ev),
            Msg::Fs(Err(e)) => {
                tracing::warn!("inotify: {e}; rescanning the spool");
                self.rescan();
            }
        }
        false
    }

    /// Takes every message already queued into account, so that no run looks quiet only
    /// because its changes wait in the queue (e.g. behind a long seal); true if asked to stop.
    fn drain(&mut self, rx: &Receiver<Msg>) -> bool {
        while let Ok(msg) = rx.try_recv() {
            if self.handle(msg) {
                return true;
            }
        }
        false
    }

    /// The run a path belongs to, and the rest of the path below the run directory.
    fn run_of<'p>(&self, path: &'p Path) -> Option<(String, Vec<&'p std::ffi::OsStr>)> {
        let rel = path.strip_prefix(&self.spool).ok()?;
        let mut parts = rel.components().filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        });
        let run = parts.next()?.to_str()?.to_owned();
        Some((run, parts.collect()))
    }

    fn on_event(&mut self, ev: &notify::Event) {
        if ev.need_rescan() {
            tracing::warn!("inotify lost events; rescanning the spool");
            self.rescan();
            return;
        }
        // Opens (ours too: ingest reads every file) change nothing.
        let closed_written = matches!(
            ev.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        if matches!(ev.kind, EventKind::Access(_)) && !closed_written {
            return;
        }
        let placed = closed_written
            || matches!(
                ev.kind,
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
            );
        for path in &ev.paths {
            let Some((run, below)) = self.run_of(path) else {
                continue;
            };
            let is_marker = placed
                && below.len() == 1
                && self.args.seal_marker.as_deref() == below[0].to_str()
                && path.exists();
            if below.is_empty() && matches!(ev.kind, EventKind::Remove(_)) && !path.exists() {
                // The run directory went (e.g. --remove-after-seal): forget it.
                self.runs.remove(&run);
                continue;
            }
            match self.runs.get_mut(&run) {
                Some(RunState::Done) => {}
                Some(RunState::Pending(p)) => {
                    p.last = Instant::now();
                    p.failed = None;
                    p.marker |= is_marker;
                }
                None => {
                    let is_dir =
                        std::fs::symlink_metadata(self.spool.join(&run)).is_ok_and(|m| m.is_dir());
                    if is_dir {
                        self.discover(&run, Instant::now());
                        if let Some(RunState::Pending(p)) = self.runs.get_mut(&run) {
                            p.marker |= is_marker;
                        }
                    }
                }
            }
        }
    }

    /// Looks at every directory in the spool: new ones become pending runs; runs already
    /// known have their quiet period restarted (something may have been missed).
    fn rescan(&mut self) {
        let entries = match std::fs::read_dir(&self.spool) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::error!(spool = %self.spool.display(), "cannot read the spool: {e}");
                return;
            }
        };
        for ent in entries.flatten() {
            let Ok(name) = ent.file_name().into_string() else {
                tracing::warn!(entry = ?ent.file_name(), "not a UTF-8 name; ignored");
                continue;
            };
            if !ent.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match self.runs.get_mut(&name) {
                Some(RunState::Pending(p)) => p.last = Instant::now(),
                Some(RunState::Done) => {}
                None => {
                    let last = quiet_since(&self.spool.join(&name));
                    self.discover(&name, last);
                }
            }
        }
    }

    /// A run directory seen for the first time: already sealed (skip, or remove), or pending.
    fn discover(&mut self, name: &str, last: Instant) {
        let r = match RunRef::parse(&format!("{}/{name}", self.namespace)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = name, "not a valid run name; ignored: {e}");
                self.runs.insert(name.to_owned(), RunState::Done);
                return;
            }
        };
        let state = match self.store.run(&r) {
            Err(Error::NotFound(_)) => {
                let marker = self
                    .args
                    .seal_marker
                    .as_ref()
                    .is_some_and(|m| self.spool.join(name).join(m).exists());
                RunState::Pending(Pending {
                    last,
                    marker,
                    failed: None,
                })
            }
            Err(e) => {
                tracing::error!(run = %r, "cannot look the run up: {e}");
                RunState::Pending(Pending {
                    last,
                    marker: false,
                    failed: Some(e.to_string()),
                })
            }
            Ok(row) if row.state == "sealed" => {
                match self.same_as_sealed(&r) {
                    Ok(None) => {
                        tracing::info!(run = %r, "already sealed with the same content; not ingested again");
                        self.after_seal(&r);
                    }
                    Ok(Some(diff)) => tracing::error!(
                        run = %r, dir = %self.spool.join(name).display(),
                        "the run is sealed already and this directory differs from it ({diff}); not ingested again, left in place"
                    ),
                    Err(e) => {
                        tracing::error!(run = %r, "cannot compare with the sealed run: {e:#}")
                    }
                }
                RunState::Done
            }
            Ok(row) => {
                tracing::error!(
                    run = %r, state = %row.state,
                    "a run of this name exists and is not sealed by this spool; ignored"
                );
                RunState::Done
            }
        };
        self.runs.insert(name.to_owned(), state);
    }

    /// `None` if the tree matches the sealed manifest entry by entry, or the first difference.
    fn same_as_sealed(&self, r: &RunRef) -> Result<Option<String>> {
        let (_, m) = self.store.manifest(r)?;
        let dir = self.spool.join(&r.run);
        let tree = stat_tree(&dir)?;
        let mut paths: Vec<&str> = tree.keys().map(String::as_str).collect();
        paths.sort_unstable();
        let mut manifest_paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        manifest_paths.sort_unstable();
        if paths != manifest_paths {
            return Ok(Some("different entries".into()));
        }
        for e in &m.entries {
            let s = &tree[&e.path];
            let size = match e.kind {
                Kind::Dir => s.size,
                Kind::Hardlink => s.size,
                _ => e.size,
            };
            if s.mode & 0o7777 != e.mode || s.size != size || s.mtime_ns != e.mtime_ns {
                return Ok(Some(format!("{} changed", e.path)));
            }
        }
        Ok(None)
    }

    fn is_due(&self, name: &str) -> bool {
        matches!(
            self.runs.get(name),
            Some(RunState::Pending(p))
                if p.failed.is_none() && (p.marker || p.last.elapsed() >= self.args.seal_after)
        )
    }

    /// Seals the runs that are due, each after the queued changes are counted; true if asked
    /// to stop meanwhile.
    fn seal_due(&mut self, rx: &Receiver<Msg>) -> bool {
        if self.drain(rx) {
            return true;
        }
        let due: Vec<String> = self
            .runs
            .keys()
            .filter(|name| self.is_due(name))
            .cloned()
            .collect();
        for name in due {
            if self.drain(rx) {
                return true;
            }
            if self.is_due(&name) {
                self.seal(&name);
            }
        }
        false
    }

    fn seal(&mut self, name: &str) {
        let r = match RunRef::parse(&format!("{}/{name}", self.namespace)) {
            Ok(r) => r,
            Err(_) => return,
        };
        let dir = self.spool.join(name);
        let why = match self.runs.get(name) {
            Some(RunState::Pending(p)) if p.marker => "marker",
            _ => "quiet",
        };
        // inotify can miss changes (a directory deeper than PATH_MAX, which it cannot watch by
        // path; a watch limit reached; a queue overflow): a run sealed for being quiet must
        // also look quiet on disk, by its entries' change times.
        let listed = stat_tree(&dir);
        if why == "quiet"
            && let Ok(before) = &listed
        {
            let changed = last_change(before);
            if changed.elapsed() < self.args.seal_after {
                tracing::warn!(
                    run = %r, dir = %dir.display(),
                    "changed {:.1?} ago without an inotify event; waiting for it to be quiet",
                    changed.elapsed()
                );
                if let Some(RunState::Pending(p)) = self.runs.get_mut(name) {
                    p.last = changed;
                }
                return;
            }
        }
        tracing::info!(run = %r, reason = why, "sealing");
        let outcome =
            listed.and_then(|before| {
                self.store
                    .ingest_dir_checked(&dir, &r, BTreeMap::new(), &NoProgress, &mut |_| {
                        match stat_tree(&dir) {
                            Ok(after) => match first_difference(&before, &after) {
                                None => Ok(()),
                                Some(d) => {
                                    Err(Error::Busy(format!("{d} while it was being sealed")))
                                }
                            },
                            Err(e) => Err(Error::Busy(format!("{e:#}"))),
                        }
                    })
                    .map_err(anyhow::Error::from)
            });
        let state = match outcome {
            Ok(report) => {
                tracing::info!(run = %r, manifest = %report.manifest, files = report.files, bytes = report.raw_bytes, "sealed");
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "sealed {r} {}", report.manifest).and_then(|()| out.flush());
                self.after_seal(&r);
                RunState::Done
            }
            Err(e) => match e.downcast_ref::<Error>() {
                Some(Error::Busy(why)) => {
                    tracing::warn!(run = %r, "not sealed: {why}; waiting for it to be quiet again");
                    RunState::Pending(Pending {
                        last: Instant::now(),
                        marker: false,
                        failed: None,
                    })
                }
                Some(Error::AlreadyExists(_)) => {
                    tracing::error!(run = %r, "a run of this name exists already; this directory is not ingested");
                    RunState::Done
                }
                // Waiting can cure a full disk (gc, an operator freeing space): tried again
                // after each quiet period, not only after the run's next change.
                Some(err) if err.is_disk_full() => {
                    tracing::error!(run = %r, "seal failed, the store's disk is full: {e:#}; tried again after the quiet period");
                    RunState::Pending(Pending {
                        last: Instant::now(),
                        marker: false,
                        failed: None,
                    })
                }
                _ if !dir.exists() => {
                    tracing::warn!(run = %r, "the run directory went away before its seal");
                    self.runs.remove(name);
                    return;
                }
                _ => {
                    tracing::error!(run = %r, "seal failed: {e:#}; tried again after its next change");
                    RunState::Pending(Pending {
                        last: Instant::now(),
                        marker: false,
                        failed: Some(format!("{e:#}")),
                    })
                }
            },
        };
        self.runs.insert(name.to_owned(), state);
    }

    /// The removal, if asked (the run directory's retention and holds were applied by the
    /// ingest itself).
    fn after_seal(&self, r: &RunRef) {
        let dir = self.spool.join(&r.run);
        if self.args.remove_after_seal {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(run = %r, "removed from the spool"),
                Err(e) => tracing::error!(run = %r, dir = %dir.display(), "cannot remove: {e}"),
            }
        }
    }
}

/// Every entry under `root` (`.` for the root itself) with its stat facts. A directory deeper
/// than one path can name is listed through a descriptor of it (`/proc/self/fd/N`), as
/// `ingest` does.
fn stat_tree(root: &Path) -> Result<BTreeMap<String, Stamp>> {
    use artifactfs_core::export::{LONG_PATH, handle_path, open_dir_handle};
    let mut out = BTreeMap::new();
    let mut anchors = Vec::new();
    let mut stack = vec![(root.to_path_buf(), ROOT.to_string())];
    while let Some((p, rel)) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        if m.is_dir() {
            // Its entries' paths would be too long for the kernel: go through a descriptor.
            let listed = if p.as_os_str().len() >= LONG_PATH {
                let fd =
                    open_dir_handle(None, &p).with_context(|| format!("open {}", p.display()))?;
                let short = handle_path(&fd);
                anchors.push(fd);
                short
            } else {
                p.clone()
            };
            for e in std::fs::read_dir(&listed).with_context(|| format!("read {}", p.display()))? {
                let e = e.with_context(|| format!("read {}", p.display()))?;
                let name = e.file_name().to_string_lossy().into_owned();
                let child = if rel == ROOT {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((e.path(), child));
            }
        }
        out.insert(
            rel,
            Stamp {
                mode: m.mode(),
                size: if m.is_dir() { 0 } else { m.size() },
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
                ino: m.ino(),
            },
        );
    }
    Ok(out)
}

fn first_difference(a: &BTreeMap<String, Stamp>, b: &BTreeMap<String, Stamp>) -> Option<String> {
    for (k, sa) in a {
        match b.get(k) {
            None => return Some(format!("{k} was removed")),
            Some(sb) if sa != sb => return Some(format!("{k} changed")),
            _ => {}
        }
    }
    b.keys()
        .find(|k| !a.contains_key(*k))
        .map(|k| format!("{k} appeared"))
}

/// When the run in `dir` last changed, as an instant: its newest ctime, so that a restarted
/// watcher continues the quiet period instead of starting it again.
fn quiet_since(dir: &Path) -> Instant {
    stat_tree(dir).map_or_else(|_| Instant::now(), |t| last_change(&t))
}

/// When the newest entry of a listed tree last changed (its ctime), as an `Instant`: now for
/// an empty tree or a time in the future.
fn last_change(tree: &BTreeMap<String, Stamp>) -> Instant {
    let now = Instant::now();
    let Some(ns) = tree.values().map(|s| s.ctime_ns).max() else {
        return now;
    };
    let changed = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    match SystemTime::now().duration_since(changed) {
        Ok(ago) => now.checked_sub(ago).unwrap_or(now),
        Err(_) => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run deeper than one path can name is listed whole, and a change at its bottom seen.
    #[test]
    fn stat_tree_lists_a_tree_deeper_than_path_max() {
        let dir = tempfile::tempdir().unwrap();
        let mut short = dir.path().to_path_buf();
        let mut keep = Vec::new();
        let mut rel = Vec::new();
        for i in 0..24 {
            let name = format!("{i:02}{}", "d".repeat(198));
            std::fs::create_dir(short.join(&name)).unwrap();
            let fd = nix::fcntl::open(
                &short.join(&name),
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            use std::os::fd::AsRawFd;
            short = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            keep.push(fd);
            rel.push(name);
        }
        std::fs::write(short.join("log"), b"1").unwrap();
        let deep = format!("{}/log", rel.join("/"));
        let before = stat_tree(dir.path()).unwrap();
        assert_eq!(before.len(), 26, "the root, 24 directories and the file");
        assert_eq!(before[&deep].size, 1);
        std::fs::write(short.join("log"), b"12").unwrap();
        let after = stat_tree(dir.path()).unwrap();
        assert_eq!(
            first_difference(&before, &after),
            Some(format!("{deep} changed"))
        );
    }

    /// The pre-commit comparison sees every kind of change a producer can make.
    #[test]
    fn stat_comparison_sees_writes_renames_modes_and_xattrs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/log"), b"line 1\n").unwrap();
        let base = stat_tree(root).unwrap();
        assert_eq!(first_difference(&base, &stat_tree(root).unwrap()), None);

        let changes: [(&str, &dyn Fn()); 4] = [
            ("sub/log changed", &|| {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(root.join("sub/log"))
                    .unwrap();
                f.write_all(b"line 2\n").unwrap();
            }),
            ("sub/new appeared", &|| {
                std::fs::write(root.join("sub/.new.tmp"), b"x").unwrap();
                std::fs::rename(root.join("sub/.new.tmp"), root.join("sub/new")).unwrap();
            }),
            ("sub/log changed", &|| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    root.join("sub/log"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .unwrap();
            }),
            ("sub/log changed", &|| {
                xattr::set(root.join("sub/log"), "user.k", b"v").unwrap();
            }),
        ];
        for (want, change) in changes {
            let before = stat_tree(root).unwrap();
            // ctime has nanosecond resolution but a coarse clock: let it tick.
            std::thread::sleep(Duration::from_millis(20));
            change();
            let diff = first_difference(&before, &stat_tree(root).unwrap());
            assert!(
                diff.as_deref()
                    .is_some_and(|d| d.contains(want) || d.contains("sub changed")),
                "{want}: {diff:?}"
            );
        }
    }
}
