//! `produce`: writes runs the way a lab harness does, over time, so that frontends which watch
//! a directory or serve a mount see realistic traffic.
//!
//! For each run: `mkdir` the run directory, tag it with `user.*` xattrs (Statehub id, producer,
//! retention), then write its files in [`ROUNDS`] rounds separated by `--pace`: the logs stay
//! open for the whole run and grow in every round; the large files stay open across rounds and
//! get a piece per round, some of them under a temporary name renamed into place at the end,
//! one of them first drafted with wrong bytes and too long, then patched and truncated; the
//! small files are spread over the rounds, each in two writes, some rewritten from scratch,
//! some renamed into place. Last come `manifest.txt`, the modes and mtimes (files when they are
//! closed, directories deepest first), and the optional marker file. The final tree equals what
//! `generate` writes for the same seed and run index (the content comes from
//! [`render_runs`]), plus the run directory's xattrs and the marker.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::generate::{FileContent, RunContent, RunSummary, render_runs, run_name};

/// Number of rounds a run is written in; `--pace` separates them.
pub const ROUNDS: usize = 6;

/// What to produce.
#[derive(Clone, Debug)]
pub struct ProduceOptions {
    /// Where run directories go (`OUT/<run>`, or `OUT/NAMESPACE/<run>`).
    pub out: PathBuf,
    pub namespace: Option<String>,
    pub seed: u64,
    pub runs: u32,
    pub first_run: u32,
    pub size: u64,
    pub small_files: Option<u64>,
    /// `user.retain` of each run directory.
    pub retain: Option<String>,
    /// `user.statehub.run_id` is this prefix followed by the run's name.
    pub statehub_id_prefix: String,
    /// Pause between rounds.
    pub pace: Duration,
    /// Runs written at the same time (one thread each).
    pub producers: usize,
    /// A file of this name is written last in each run directory (e.g. `_SUCCESS`).
    pub marker: Option<String>,
}

impl ProduceOptions {
    /// The directory that holds the run directories.
    pub fn runs_dir(&self) -> PathBuf {
        match &self.namespace {
            Some(ns) => self.out.join(ns),
            None => self.out.clone(),
        }
    }
}

/// The `user.*` xattrs `produce` puts on run `index`'s directory, in the order it sets them.
pub fn run_xattrs(opts: &ProduceOptions, index: u64) -> Vec<(String, String)> {
    let mut out = vec![
        (
            "user.statehub.run_id".to_string(),
            format!("{}{}", opts.statehub_id_prefix, run_name(index)),
        ),
        (
            "user.producer".to_string(),
            concat!("guide-board-sim ", env!("CARGO_PKG_VERSION")).to_string(),
        ),
        ("user.producer.seed".to_string(), opts.seed.to_string()),
        ("user.producer.run".to_string(), index.to_string()),
    ];
    if let Some(r) = &opts.retain {
        out.push(("user.retain".to_string(), r.clone()));
    }
    out
}

/// Writes the runs; calls `report` as each one is complete (from the producer threads, in
/// completion order).
pub fn produce(
    opts: &ProduceOptions,
    report: impl Fn(&RunSummary) + Sync,
) -> Result<Vec<RunSummary>> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if opts.producers == 0 {
        bail!("--producers must be at least 1");
    }
    if let Some(m) = &opts.marker
        && (m.is_empty() || m.contains('/') || m == "." || m == "..")
    {
        bail!("invalid marker name {m:?}");
    }
    let dir = opts.runs_dir();
    for i in opts.first_run..opts.first_run + opts.runs {
        let run = dir.join(run_name(u64::from(i)));
        if fs::symlink_metadata(&run).is_ok() {
            bail!("refusing to write run {}: it exists", run.display());
        }
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // Rendering is sequential (each run derives from the one before); writing is not. The
    // channel holds one run ahead, which bounds memory to about `producers + 2` runs.
    let (tx, rx): (SyncSender<RunContent>, Receiver<RunContent>) = sync_channel(1);
    let rx = Arc::new(Mutex::new(rx));
    let done = Mutex::new(Vec::new());
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..opts.producers)
            .map(|_| {
                let rx = rx.clone();
                let done = &done;
                let report = &report;
                let dir = &dir;
                s.spawn(move || -> Result<()> {
                    loop {
                        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(run) = next else { return Ok(()) };
                        let summary = write_run_over_time(opts, dir, &run)
                            .with_context(|| format!("producing {}", run.name))?;
                        report(&summary);
                        done.lock().unwrap_or_else(|p| p.into_inner()).push(summary);
                    }
                })
            })
            .collect();
        let rendered = render_runs(
            opts.seed,
            opts.size,
            opts.small_files,
            opts.first_run,
            opts.runs,
            |run| {
                tx.send(run)
                    .map_err(|_| anyhow::anyhow!("every producer thread stopped"))
            },
        );
        drop(tx);
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        // A writer's error explains a failed send better than the send does.
        match first_err {
            Some(e) => Err(e),
            None => rendered,
        }
    })?;
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(done)
}

/// How one file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// Opened once, written in pieces, closed.
    Direct,
    /// Written under `.NAME.tmp`, renamed into place after closing.
    Renamed,
    /// Drafted with wrong bytes (and too long), then patched in place and truncated.
    Patched,
    /// Written once with wrong bytes, closed, then rewritten from scratch (O_TRUNC).
    Rewritten,
}

fn is_large(f: &FileContent) -> bool {
    f.path.starts_with("bin/") || f.path.starts_with("blobs/") || f.path.starts_with("metrics/")
}

fn is_log(f: &FileContent) -> bool {
    f.path.starts_with("logs/")
}

/// A deterministic choice per file: the same run is always written the same way.
fn style(i: usize, f: &FileContent) -> Style {
    if is_log(f) {
        return Style::Direct;
    }
    if is_large(f) {
        return match i % 3 {
            0 => Style::Patched,
            1 => Style::Renamed,
            _ => Style::Direct,
        };
    }
    match i % 7 {
        2 => Style::Renamed,
        5 => Style::Rewritten,
        _ => Style::Direct,
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Sets mode and mtime through an open handle: the last changes before it is closed.
fn finish(file: &File, path: &Path, mode: u32, mtime: SystemTime) -> Result<()> {
    file.set_permissions(Permissions::from_mode(mode))
        .and_then(|()| file.set_modified(mtime))
        .with_context(|| format!("setting mode and mtime of {}", path.display()))
}

fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// The bytes of `data` that round `r` of `ROUNDS` writes.
fn piece(data: &[u8], r: usize) -> &[u8] {
    let n = data.len();
    &data[n * r / ROUNDS..n * (r + 1) / ROUNDS]
}

/// Wrong bytes of the same length as `data` (what a draft holds before it is fixed).
fn draft(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| !b).collect()
}

/// A large file or log, open across rounds.
struct Open<'a> {
    f: &'a FileContent,
    style: Style,
    /// Where it is written (a temporary name for `Renamed`).
    at: PathBuf,
    final_path: PathBuf,
    file: File,
}

fn write_run_over_time(opts: &ProduceOptions, dir: &Path, run: &RunContent) -> Result<RunSummary> {
    let root = dir.join(&run.name);
    let dir_mode = Permissions::from_mode(0o755);
    fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    fs::set_permissions(&root, dir_mode.clone())
        .with_context(|| format!("setting mode of {}", root.display()))?;
    for (k, v) in run_xattrs(opts, run.index) {
        xattr::set(&root, &k, v.as_bytes())
            .with_context(|| format!("setting {k} on {}", root.display()))?;
    }
    for d in &run.dirs {
        let p = root.join(d);
        fs::create_dir(&p)
            .and_then(|()| fs::set_permissions(&p, dir_mode.clone()))
            .with_context(|| format!("creating {}", p.display()))?;
    }
    let pause = || {
        if !opts.pace.is_zero() {
            std::thread::sleep(opts.pace);
        }
    };

    let (manifest, files) = run.files.split_last().context("a run without files")?;
    let mut open = Vec::new();
    let mut small = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let st = style(i, f);
        if is_log(f) || is_large(f) {
            let final_path = root.join(&f.path);
            let at = if st == Style::Renamed {
                tmp_name(&final_path)
            } else {
                final_path.clone()
            };
            let file = create(&at)?;
            open.push(Open {
                f,
                style: st,
                at,
                final_path,
                file,
            });
        } else {
            small.push((i, f, st));
        }
    }
    pause();

    for r in 0..ROUNDS {
        for o in &mut open {
            let mut bytes = piece(&o.f.data, r).to_vec();
            if o.style == Style::Patched {
                bytes = draft(&bytes);
            }
            // Logs grow line by line rather than in one block.
            let (a, b) = bytes.split_at(bytes.len() / 2);
            for part in [a, b] {
                o.file
                    .write_all(part)
                    .with_context(|| format!("writing {}", o.at.display()))?;
            }
            if o.style == Style::Patched && r == ROUNDS - 1 {
                // A draft trailer that the final truncate cuts off again.
                o.file
                    .write_all(b"draft trailer: not part of the result\n")
                    .with_context(|| format!("writing {}", o.at.display()))?;
            }
        }
        for &(_, f, st) in small.iter().filter(|(i, _, _)| i % ROUNDS == r) {
            write_small(&root, f, st, run.mtime)?;
        }
        pause();
    }

    for o in open {
        let file = o.file;
        if o.style == Style::Patched {
            file.write_all_at(&o.f.data, 0)
                .and_then(|()| file.set_len(o.f.data.len() as u64))
                .with_context(|| format!("patching {}", o.at.display()))?;
        }
        finish(&file, &o.at, o.f.mode, run.mtime)?;
        drop(file);
        if o.at != o.final_path {
            fs::rename(&o.at, &o.final_path)
                .with_context(|| format!("renaming {}", o.at.display()))?;
        }
    }
    write_small(&root, manifest, Style::Direct, run.mtime)?;

    // Directory mtimes last, deepest first: nothing changes them afterwards.
    let mut dirs: Vec<&String> = run.dirs.iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(Path::new(d).components().count()));
    for d in dirs {
        set_dir_mtime(&root.join(d), run.mtime)?;
    }
    match &opts.marker {
        None => set_dir_mtime(&root, run.mtime)?,
        Some(name) => {
            // Created (which changes the run directory's mtime), then the mtimes are set,
            // then closed: closing the marker is what a mount or a watcher seals on.
            let p = root.join(name);
            let marker = create(&p)?;
            finish(&marker, &p, 0o644, run.mtime)?;
            set_dir_mtime(&root, run.mtime)?;
            drop(marker);
        }
    }
    Ok(RunSummary {
        name: run.name.clone(),
        bytes: run.bytes(),
        files: run.files.len() as u64 + u64::from(opts.marker.is_some()),
    })
}

fn write_small(root: &Path, f: &FileContent, st: Style, mtime: SystemTime) -> Result<()> {
    let path = root.join(&f.path);
    let (a, b) = f.data.split_at(f.data.len() / 2);
    match st {
        Style::Direct | Style::Patched => {
            let mut file = create(&path)?;
            file.write_all(a)
                .and_then(|()| file.write_all(b))
                .with_context(|| format!("writing {}", path.display()))?;
            finish(&file, &path, f.mode, mtime)
        }
        Style::Renamed => {
            let tmp = tmp_name(&path);
            let mut file = create(&tmp)?;
            file.write_all(a)
                .and_then(|()| file.write_all(b))
                .with_context(|| format!("writing {}", tmp.display()))?;
            finish(&file, &tmp, f.mode, mtime)?;
            drop(file);
            fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))
        }
        Style::Rewritten => {
            let mut file = create(&path)?;
            file.write_all(&draft(&f.data))
                .and_then(|()| file.write_all(b"draft"))
                .with_context(|| format!("writing {}", path.display()))?;
            drop(file);
            let mut file = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .with_context(|| format!("reopening {}", path.display()))?;
            file.write_all(a)
                .and_then(|()| file.write_all(b))
                .with_context(|| format!("rewriting {}", path.display()))?;
            finish(&file, &path, f.mode, mtime)
        }
    }
}

fn set_dir_mtime(dir: &Path, mtime: SystemTime) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.set_modified(mtime))
        .with_context(|| format!("setting mtime of {}", dir.display()))
}
