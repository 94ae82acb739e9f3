//! Layout of a run, the evolution from run to run, and writing run directories to disk.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rand::{Rng, RngCore};

use crate::binary::{BigFile, Profile};
use crate::seed::{rng, tag};
use crate::text::{self, EPOCH_2026, LogKind, LogSpec};

const T_LAYOUT: u64 = tag("layout");
const T_NOISE: u64 = tag("noise");

/// Directory holding the deep fixture (six levels below the run directory).
pub const DEEP_DIR: &str = "fixtures/boards/gb-rev3/sensors/imu/axis-z";

/// What to generate.
#[derive(Clone, Debug)]
pub struct Options {
    pub out: PathBuf,
    pub seed: u64,
    pub runs: u32,
    pub size: u64,
    pub small_files: Option<u64>,
    pub first_run: u32,
}

/// One written run, as reported on stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub name: String,
    pub bytes: u64,
    pub files: u64,
}

/// Name of the directory of run `index`.
pub fn run_name(index: u64) -> String {
    format!("run-{index:04}")
}

/// Modification time of every file and directory of run `index`: 2026-01-01T00:00:00Z plus
/// `index` hours.
pub fn run_mtime(index: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(EPOCH_2026 as u64 + index * 3600)
}

/// Default number of small JSON results: one per 16 KiB of run size, within 20..=5000.
pub fn default_small_files(size: u64) -> u64 {
    (size / (16 * 1024)).clamp(20, 5000)
}

struct BigSpec {
    path: String,
    key: u64,
    profile: Profile,
    len: u64,
}

struct NoiseSpec {
    path: String,
    k: u64,
    len: u64,
    /// New content every run (otherwise identical in every run).
    fresh: bool,
}

/// Sizes and names of everything in a run, fixed by seed, size and small-file count.
struct Plan {
    seed: u64,
    size: u64,
    cases: u64,
    case_avg: u64,
    big: Vec<BigSpec>,
    logs: Vec<(String, LogSpec)>,
    metrics: u64,
    noise: Vec<NoiseSpec>,
}

impl Plan {
    fn new(seed: u64, size: u64, small_files: Option<u64>) -> Self {
        let cases = small_files.unwrap_or_else(|| default_small_files(size));
        let case_avg = (size / 10)
            .checked_div(cases)
            .map_or(0, |avg| avg.clamp(256, 1536));
        // Configs, script, calibration and the manifest (one line per file).
        let fixed = 6 * 1024 + (cases + 24) * 34;
        let rest = size.saturating_sub(cases * case_avg + fixed).max(size / 10);
        let mut r = rng(&[seed, T_LAYOUT, size]);
        let mut jitter = |n: u64| (n as f64 * r.random_range(0.97..1.03)) as u64;

        // 55 : 15 : 10 : 10 of what the small files leave.
        let bin = rest * 55 / 90;
        let trace = bin * 45 / 100;
        let n_fw = 1 + (seed % 2);
        let mut big: Vec<BigSpec> = (0..n_fw)
            .map(|k| BigSpec {
                path: format!("bin/firmware-{k}.bin"),
                key: tag("firmware") ^ k,
                profile: Profile::Firmware,
                len: jitter((bin - trace) / n_fw),
            })
            .collect();
        big.push(BigSpec {
            path: "bin/trace.dat".into(),
            key: tag("trace"),
            profile: Profile::Trace,
            len: jitter(trace),
        });

        let logs_total = rest * 15 / 90;
        let devices = text::device_count(seed);
        let log = |kind, initial: u64| LogSpec {
            kind,
            initial,
            append: initial / 48,
        };
        let mut logs = vec![(
            "logs/harness.log".to_string(),
            log(LogKind::Harness, jitter(logs_total * 40 / 100)),
        )];
        for n in 0..devices {
            logs.push((
                format!("logs/device-{n}.log"),
                log(
                    LogKind::Device(n),
                    jitter(logs_total * 60 / 100 / u64::from(devices)),
                ),
            ));
        }

        let noise_total = rest * 10 / 90;
        let noise = (0..4)
            .map(|k| NoiseSpec {
                path: format!("blobs/noise-{k}.bin"),
                k,
                len: jitter(noise_total / 4),
                fresh: k >= 2,
            })
            .collect();

        Plan {
            seed,
            size,
            cases,
            case_avg,
            big,
            logs,
            metrics: rest * 10 / 90,
            noise,
        }
    }

    /// Metrics budget of `run`: shrinks by what the logs have grown since run 0 (each run appends
    /// about 0.3% of the run size), so runs stay near the requested size for about 25 runs and
    /// grow slowly after that; never below a quarter of the initial budget.
    fn metrics_for(&self, run: u64) -> u64 {
        let growth: u64 = self.logs.iter().map(|(_, l)| l.append).sum::<u64>() * run;
        self.metrics.saturating_sub(growth).max(self.metrics / 4)
    }
}

/// How to produce one file of a run.
enum Content<'a> {
    Big(&'a BigFile),
    Log(&'a LogSpec),
    MetricsCsv(u64),
    SamplesJsonl(u64),
    Noise { k: u64, len: u64, fresh: bool },
    Case(u64),
    Text(String),
}

struct Job<'a> {
    path: String,
    mode: u32,
    estimate: u64,
    content: Content<'a>,
}

struct RunCtx<'a> {
    plan: &'a Plan,
    run: u64,
    root: PathBuf,
    mtime: SystemTime,
}

impl Job<'_> {
    /// Writes the file's bytes to `w`; returns how many.
    fn render<W: Write>(&self, ctx: &RunCtx<'_>, w: &mut W) -> std::io::Result<u64> {
        let seed = ctx.plan.seed;
        let run = ctx.run;
        match &self.content {
            Content::Big(f) => f.write_to(seed, w),
            Content::Log(l) => l.write_to(seed, run, w),
            Content::MetricsCsv(n) => text::write_metrics_csv(seed, run, *n, w),
            Content::SamplesJsonl(n) => text::write_samples_jsonl(seed, run, *n, w),
            Content::Noise { k, len, fresh } => {
                let which = if *fresh { run } else { u64::MAX };
                write_noise(seed, *k, which, *len, w)
            }
            Content::Case(id) => {
                let data = text::case_json(seed, run, *id, ctx.plan.case_avg);
                w.write_all(&data).map(|()| data.len() as u64)
            }
            Content::Text(s) => w.write_all(s.as_bytes()).map(|()| s.len() as u64),
        }
    }

    fn write(&self, ctx: &RunCtx<'_>) -> Result<u64> {
        let path = ctx.root.join(&self.path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let capacity = if self.estimate >= 4 << 20 {
            4 << 20
        } else {
            64 << 10
        };
        let mut w = BufWriter::with_capacity(capacity, file);
        let written = self
            .render(ctx, &mut w)
            .with_context(|| format!("writing {}", path.display()))?;
        let file = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", path.display()))?;
        finish(&file, &path, self.mode, ctx.mtime)?;
        Ok(written)
    }
}

/// Sets the mode and then the modification time (nothing writes to the file afterwards).
fn finish(file: &File, path: &Path, mode: u32, mtime: SystemTime) -> Result<()> {
    file.set_permissions(Permissions::from_mode(mode))
        .and_then(|()| file.set_modified(mtime))
        .with_context(|| format!("setting mode and mtime of {}", path.display()))
}

fn write_noise<W: Write>(
    seed: u64,
    k: u64,
    which: u64,
    len: u64,
    w: &mut W,
) -> std::io::Result<u64> {
    let mut r = rng(&[seed, T_NOISE, k, which]);
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        r.fill_bytes(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(len)
}

fn jobs_for<'a>(plan: &'a Plan, run: u64, big: &'a [BigFile]) -> Vec<Job<'a>> {
    let job = |path: String, mode, estimate, content| Job {
        path,
        mode,
        estimate,
        content,
    };
    let mut jobs = Vec::new();
    for (spec, file) in plan.big.iter().zip(big) {
        jobs.push(job(
            spec.path.clone(),
            0o644,
            file.len(),
            Content::Big(file),
        ));
    }
    for (path, spec) in &plan.logs {
        let estimate = spec.initial + spec.append * run;
        jobs.push(job(path.clone(), 0o644, estimate, Content::Log(spec)));
    }
    let metrics = plan.metrics_for(run);
    let csv = metrics * 6 / 10;
    jobs.push(job(
        "metrics/metrics.csv".into(),
        0o644,
        csv,
        Content::MetricsCsv(csv),
    ));
    jobs.push(job(
        "metrics/samples.jsonl".into(),
        0o644,
        metrics - csv,
        Content::SamplesJsonl(metrics - csv),
    ));
    for n in &plan.noise {
        jobs.push(job(
            n.path.clone(),
            0o644,
            n.len,
            Content::Noise {
                k: n.k,
                len: n.len,
                fresh: n.fresh,
            },
        ));
    }
    for id in 0..plan.cases {
        jobs.push(job(
            format!("results/cases/case-{id:05}.json"),
            0o644,
            plan.case_avg,
            Content::Case(id),
        ));
    }
    for (path, content) in text::config_files(plan.seed) {
        jobs.push(job(
            path,
            0o644,
            content.len() as u64,
            Content::Text(content),
        ));
    }
    let script = text::run_script();
    jobs.push(job(
        "run.sh".into(),
        0o755,
        script.len() as u64,
        Content::Text(script),
    ));
    let calibration = text::calibration_json(plan.seed);
    jobs.push(job(
        format!("{DEEP_DIR}/calibration.json"),
        0o644,
        calibration.len() as u64,
        Content::Text(calibration),
    ));
    // Largest first, for balance between threads.
    jobs.sort_by(|a, b| b.estimate.cmp(&a.estimate).then(a.path.cmp(&b.path)));
    jobs
}

/// Runs the jobs on a few threads; returns the bytes written per job, in job order.
fn run_jobs(jobs: &[Job<'_>], ctx: &RunCtx<'_>) -> Result<Vec<u64>> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        .min(jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let mut sizes = vec![0; jobs.len()];
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Vec<(usize, u64)>> {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else {
                            return Ok(done);
                        };
                        match job.write(ctx) {
                            Ok(n) => done.push((i, n)),
                            Err(e) => {
                                // Stop the other threads early.
                                next.store(jobs.len(), Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(done)) => {
                    for (i, n) in done {
                        sizes[i] = n;
                    }
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    Ok(sizes)
}

/// Fails if a run directory exists and is not an empty directory.
fn check_target(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", dir.display())),
        Ok(meta) if !meta.is_dir() => {
            bail!("{} exists and is not a directory", dir.display())
        }
        Ok(_) => {
            let mut entries =
                fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
            if entries.next().is_some() {
                bail!(
                    "refusing to overwrite non-empty run directory {}",
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

fn write_run(plan: &Plan, run: u64, big: &[BigFile], root: PathBuf) -> Result<RunSummary> {
    let ctx = RunCtx {
        plan,
        run,
        mtime: run_mtime(run),
        root,
    };
    let jobs = jobs_for(plan, run, big);

    let dir_mode = Permissions::from_mode(0o755);
    fs::create_dir_all(&ctx.root).with_context(|| format!("creating {}", ctx.root.display()))?;
    fs::set_permissions(&ctx.root, dir_mode.clone())
        .with_context(|| format!("setting mode of {}", ctx.root.display()))?;
    let dirs = parent_dirs(jobs.iter().map(|j| j.path.as_str()));
    for d in &dirs {
        let path = ctx.root.join(d);
        fs::create_dir(&path)
            .and_then(|()| fs::set_permissions(&path, dir_mode.clone()))
            .with_context(|| format!("creating {}", path.display()))?;
    }

    let sizes = run_jobs(&jobs, &ctx)?;

    let mut listing: Vec<(&str, u64)> = jobs
        .iter()
        .zip(&sizes)
        .map(|(j, &n)| (j.path.as_str(), n))
        .collect();
    listing.sort();
    let manifest = manifest(plan, run, &listing);
    let manifest_job = Job {
        path: "manifest.txt".into(),
        mode: 0o644,
        estimate: manifest.len() as u64,
        content: Content::Text(manifest),
    };
    let manifest_len = manifest_job.write(&ctx)?;

    // Directory mtimes last, deepest first, so creating entries no longer touches them.
    let mut ordered: Vec<&PathBuf> = dirs.iter().collect();
    ordered.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in ordered
        .into_iter()
        .map(|d| ctx.root.join(d))
        .chain([ctx.root.clone()])
    {
        File::open(&d)
            .and_then(|f| f.set_modified(ctx.mtime))
            .with_context(|| format!("setting mtime of {}", d.display()))?;
    }

    Ok(RunSummary {
        name: run_name(run),
        bytes: sizes.iter().sum::<u64>() + manifest_len,
        files: jobs.len() as u64 + 1,
    })
}

/// Every directory above the given relative paths; parents sort before their children.
fn parent_dirs<'a>(paths: impl Iterator<Item = &'a str>) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for path in paths {
        let mut p = Path::new(path);
        while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_path_buf());
            p = parent;
        }
    }
    dirs
}

fn manifest(plan: &Plan, run: u64, listing: &[(&str, u64)]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64 * (listing.len() + 8));
    let _ = write!(
        s,
        "guide-board run manifest\nrun: {run}\nseed: {}\nsize: {}\nsmall_files: {}\nstarted: ",
        plan.seed, plan.size, plan.cases
    );
    text::push_ts(&mut s, text::run_start_ms(run));
    let _ = writeln!(s, "\nfiles: {}", listing.len());
    for (path, len) in listing {
        let _ = writeln!(s, "{len:>12}  {path}");
    }
    s
}

/// Generates the requested runs, calling `report` after each one is complete on disk.
pub fn generate(opts: &Options, mut report: impl FnMut(&RunSummary)) -> Result<Vec<RunSummary>> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let first = u64::from(opts.first_run);
    let end = first + u64::from(opts.runs);
    if opts.out.exists() && !opts.out.is_dir() {
        bail!("{} exists and is not a directory", opts.out.display());
    }
    for run in first..end {
        check_target(&opts.out.join(run_name(run)))?;
    }

    let plan = Plan::new(opts.seed, opts.size, opts.small_files);
    let mut big: Vec<BigFile> = plan
        .big
        .iter()
        .map(|s| BigFile::new(s.key, s.profile, s.len))
        .collect();
    let mut summaries = Vec::new();
    for run in 0..end {
        if run > 0 {
            for f in &mut big {
                f.advance(opts.seed, run);
            }
        }
        if run >= first {
            let summary = write_run(&plan, run, &big, opts.out.join(run_name(run)))?;
            report(&summary);
            summaries.push(summary);
        }
    }
    Ok(summaries)
}

/// One file of a run, held in memory.
#[derive(Clone, Debug)]
pub struct FileContent {
    /// Path relative to the run directory.
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// A whole run held in memory: exactly what [`generate`] writes for the same seed, size,
/// small-file count and run index, for writers that produce a run over time (`produce`).
#[derive(Clone, Debug)]
pub struct RunContent {
    pub index: u64,
    pub name: String,
    /// Modification time of every file and directory ([`run_mtime`]).
    pub mtime: SystemTime,
    /// Directories below the run directory, parents first.
    pub dirs: Vec<String>,
    /// Files in path order, `manifest.txt` included.
    pub files: Vec<FileContent>,
}

impl RunContent {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.data.len() as u64).sum()
    }
}

/// Renders runs `first .. first + count` in memory, in order, handing each to `each` (which
/// may stop the sequence with an error). Content, names and modes are those of [`generate`].
pub fn render_runs(
    seed: u64,
    size: u64,
    small_files: Option<u64>,
    first: u32,
    count: u32,
    mut each: impl FnMut(RunContent) -> Result<()>,
) -> Result<()> {
    let plan = Plan::new(seed, size, small_files);
    let mut big: Vec<BigFile> = plan
        .big
        .iter()
        .map(|s| BigFile::new(s.key, s.profile, s.len))
        .collect();
    let end = u64::from(first) + u64::from(count);
    for run in 0..end {
        if run > 0 {
            for f in &mut big {
                f.advance(seed, run);
            }
        }
        if run < u64::from(first) {
            continue;
        }
        let ctx = RunCtx {
            plan: &plan,
            run,
            mtime: run_mtime(run),
            root: PathBuf::new(),
        };
        let jobs = jobs_for(&plan, run, &big);
        let mut files = Vec::with_capacity(jobs.len() + 1);
        for job in &jobs {
            let mut data = Vec::with_capacity(job.estimate as usize);
            job.render(&ctx, &mut data)
                .with_context(|| format!("rendering {}", job.path))?;
            files.push(FileContent {
                path: job.path.clone(),
                mode: job.mode,
                data,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let listing: Vec<(&str, u64)> = files
            .iter()
            .map(|f| (f.path.as_str(), f.data.len() as u64))
            .collect();
        let manifest = manifest(&plan, run, &listing);
        files.push(FileContent {
            path: "manifest.txt".into(),
            mode: 0o644,
            data: manifest.into_bytes(),
        });
        let dirs = parent_dirs(files.iter().map(|f| f.path.as_str()))
            .into_iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        each(RunContent {
            index: run,
            name: run_name(run),
            mtime: ctx.mtime,
            dirs,
            files,
        })?;
    }
    Ok(())
}
