//! The `guide-board-sim` command line; the generator itself is the library (`lib.rs`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use guide_board_sim::generate::{Options, RunSummary, generate};
use guide_board_sim::produce::{ProduceOptions, produce};

/// Smallest accepted `--size`.
const MIN_SIZE: u64 = 64 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "guide-board-sim",
    version,
    about = "Deterministic generator of realistic guide-board run directories",
    long_about = "Deterministic generator of realistic guide-board lab-harness run directories, \
                  for tests and benchmarks of chunking, dedup and compression. The same seed \
                  and flags always produce byte-identical output (contents, names, modes and \
                  mtimes)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write successive runs of one experiment as DIR/run-NNNN directories
    ///
    /// Each run holds large binaries (bin/), append-only logs (logs/), metrics (metrics/),
    /// per-case JSON results (results/cases/), incompressible blobs (blobs/), static
    /// configuration (config/), a run.sh script, a deep fixture file and a manifest.txt.
    /// Run i+1 derives from run i: the large binaries change by about 1-3% (in-place edits,
    /// insertions and deletions), logs grow by appending (about 0.3% of SIZE per run, offset by
    /// smaller metrics for the first ~25 runs), metrics and most results are new, configuration
    /// and half of the blobs stay identical. Every file and directory of run i gets the mtime
    /// 2026-01-01T00:00:00Z + i hours. Refuses to write into an existing non-empty run
    /// directory. Prints `run-NNNN <bytes> <files>` per run written.
    Generate(GenerateArgs),
    /// Write runs over time, the way a lab harness does: DIR/run-NNNN (or DIR/NS/run-NNNN)
    ///
    /// Each run directory is created, tagged (xattrs user.statehub.run_id, user.producer,
    /// user.producer.seed, user.producer.run and, with --retain, user.retain), then written in
    /// 6 rounds separated by --pace: logs and large files stay open and grow in every round,
    /// some files are written under a temporary name and renamed into place, some are drafted
    /// and rewritten, small files arrive spread over the rounds. Modes and mtimes come last,
    /// then the --marker file. The final tree of each run equals what `generate` writes for
    /// the same seed and run index (plus the xattrs and the marker). Prints `run-NNNN <bytes>
    /// <files>` as each run is complete.
    Produce(ProduceArgs),
}

#[derive(Args, Debug)]
struct ProduceArgs {
    /// Directory to write the run directories into (created if missing; may be a mount root)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Write into DIR/NS (e.g. a namespace of an artifactfs mount)
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,

    /// Seed of every random choice
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Number of runs to write (at least 1)
    #[arg(long, value_name = "K", default_value = "1", value_parser = parse_runs)]
    runs: u32,

    /// Index of the first run to write
    #[arg(long, value_name = "I", default_value_t = 0)]
    first_run: u32,

    /// Approximate total size of one run (as for generate)
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    size: u64,

    /// Number of small JSON result files per run (as for generate)
    #[arg(long, value_name = "N")]
    small_files: Option<u64>,

    /// Retention tag of each run directory (user.retain), e.g. 90d
    #[arg(long, value_name = "DURATION")]
    retain: Option<String>,

    /// user.statehub.run_id of a run is this prefix followed by the run's name
    #[arg(long, value_name = "P", default_value = "statehub:guide-board:")]
    statehub_id_prefix: String,

    /// Pause between the rounds of writes of a run, milliseconds
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pace: u64,

    /// Runs written at the same time (threads)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    producers: u64,

    /// Write an empty file of this name last in each run directory (e.g. _SUCCESS)
    #[arg(long, value_name = "NAME")]
    marker: Option<String>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Directory to write the run directories into (created if missing)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Seed of every random choice
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Number of runs to write (at least 1)
    #[arg(long, value_name = "K", default_value = "1", value_parser = parse_runs)]
    runs: u32,

    /// Approximate total size of one run: bytes, or with a binary suffix K/KiB, M/MiB, G/GiB
    /// (at least 64KiB)
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    size: u64,

    /// Number of small JSON result files per run [default: one per 16 KiB of SIZE, 20..=5000]
    #[arg(long, value_name = "N")]
    small_files: Option<u64>,

    /// Index of the first run to write; earlier runs are derived in memory, not written
    #[arg(long, value_name = "I", default_value_t = 0)]
    first_run: u32,
}

/// Parses `--size`: plain bytes, or a number with a binary suffix (K, KiB, M, MiB, G, GiB;
/// case-insensitive; an optional `B` for plain bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let bad =
        || format!("invalid size {s:?}: expected bytes or a number with K/KiB, M/MiB or G/GiB");
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let unit: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = n
        .checked_mul(unit)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes < MIN_SIZE {
        return Err(format!("size {s:?} is too small: the minimum is 64KiB"));
    }
    Ok(bytes)
}

fn parse_runs(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number of runs {s:?}"))?;
    if n == 0 {
        return Err("the number of runs must be at least 1".into());
    }
    Ok(n)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => {
            let opts = Options {
                out: a.out,
                seed: a.seed,
                runs: a.runs,
                size: a.size,
                small_files: a.small_files,
                first_run: a.first_run,
            };
            let stdout = std::io::stdout();
            let mut io_err = None;
            generate(&opts, |s| {
                let mut out = stdout.lock();
                if let Err(e) =
                    writeln!(out, "{} {} {}", s.name, s.bytes, s.files).and_then(|()| out.flush())
                {
                    io_err.get_or_insert(e);
                }
            })?;
            if let Some(e) = io_err {
                return Err(e.into());
            }
        }
        Command::Produce(a) => {
            let opts = ProduceOptions {
                out: a.out,
                namespace: a.namespace,
                seed: a.seed,
                runs: a.runs,
                first_run: a.first_run,
                size: a.size,
                small_files: a.small_files,
                retain: a.retain,
                statehub_id_prefix: a.statehub_id_prefix,
                pace: std::time::Duration::from_millis(a.pace),
                producers: a.producers as usize,
                marker: a.marker,
            };
            let io_err = std::sync::Mutex::new(None);
            produce(&opts, |s: &RunSummary| {
                let mut out = std::io::stdout().lock();
                if let Err(e) =
                    writeln!(out, "{} {} {}", s.name, s.bytes, s.files).and_then(|()| out.flush())
                {
                    io_err
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
            })?;
            if let Some(e) = io_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
