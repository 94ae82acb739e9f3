//! The machine's limits for ingest: the CPU cost of each stage of the write path, alone, on one
//! thread, on the bytes of a directory.
//!
//! ```text
//! cargo run --release --example stage_limits -- DIR [--json OUT] [--level 2] [--repeat 3]
//! ```
//!
//! Every regular file under DIR is read in pieces of at most 64 MiB. Each piece is timed
//! (`std::time::Instant`, one thread) through each stage on its own, `--repeat` times, keeping
//! the fastest time of each stage:
//!
//! - `read`: opening the file and reading it whole from the (warm) page cache, in reads of
//!   `FILE_PIECE` (2 MiB) into one buffer, as ingest reads into its blocks (timed per file,
//!   not per piece: reading into a 64 MiB buffer would cost memory bandwidth ingest never pays);
//! - `fastcdc`: `Chunker::push` + `finish` over the piece (each piece is its own stream);
//! - `blake3`: one BLAKE3 pass, hashing each chunk of the piece (a chunk id);
//! - `zstd`: `Encoder::encode` of each chunk at `--level` (single-threaded, as the engine does).
//!
//! Ingest hashes every byte twice (the chunk ids and the whole-file hash of the manifest), so
//! "hashing" below is `--hash-passes` (default 2) times the one-pass BLAKE3 cost. Both passes
//! run on the writer's workers (the file hash in pieces, see `writer::file_hash_from_pieces`),
//! while the ingest thread reads and cuts: the stages can overlap on every core. With C cores:
//!
//! - limit for new data        = C / (fastcdc + hashing + zstd)     [bytes per ns]
//! - limit for already-stored  = C / (fastcdc + hashing)
//!
//! (reading, the index and pack writes are not counted: the limits are what the CPU allows if
//! those were free and the work were spread perfectly over the cores).

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use artifactfs_core::chunker::{Chunker, ChunkerParams};
use artifactfs_core::codec::{Codec, Encoder};
use artifactfs_core::id::ChunkId;
use artifactfs_core::writer::FILE_PIECE;
use clap::Parser;
use serde_json::json;

const PIECE: usize = 64 << 20;

#[derive(Parser, Debug)]
#[command(about = "CPU cost per byte of each ingest stage, alone, on one thread")]
struct Args {
    /// Directory whose regular files are measured.
    dir: PathBuf,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// zstd level of the compression stage [default: a new store's level].
    #[arg(long, default_value_t = artifactfs_core::store::InitOptions::default().compression_level)]
    level: i32,
    /// Times each stage is run on each piece; the fastest counts.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Cores the limits assume [default: the available parallelism].
    #[arg(long)]
    cores: Option<usize>,
    /// BLAKE3 passes over every byte in ingest (chunk ids + file hash).
    #[arg(long, default_value_t = 2)]
    hash_passes: u32,
    /// Chunker minimum size in bytes [default: the engine's].
    #[arg(long)]
    chunk_min: Option<u32>,
    /// Chunker average size in bytes [default: the engine's].
    #[arg(long)]
    chunk_avg: Option<u32>,
    /// Chunker maximum size in bytes [default: the engine's].
    #[arg(long)]
    chunk_max: Option<u32>,
}

#[derive(Default)]
struct Totals {
    bytes: u64,
    files: u64,
    pieces: u64,
    chunks: u64,
    stored: u64,
    zstd_chunks: u64,
    read: Duration,
    fastcdc: Duration,
    blake3: Duration,
    zstd: Duration,
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read directory {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("read directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        if ft.is_dir() {
            files_under(&e.path(), out)?;
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes into `buf`; returns how many (0 at end of file).
fn read_piece(f: &mut File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
    Ok(n)
}

fn min_time(repeat: u32, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn measure_piece(
    piece: &[u8],
    params: ChunkerParams,
    enc: &mut Encoder,
    repeat: u32,
    t: &mut Totals,
) -> Result<()> {
    let mut chunker = Chunker::new(params)?;
    let mut bounds: Vec<(usize, usize)> = Vec::with_capacity(piece.len() / 65536 + 1);
    t.fastcdc += min_time(repeat, || {
        bounds.clear();
        let mut at = 0usize;
        let mut emit = |c: &[u8]| -> artifactfs_core::Result<()> {
            bounds.push((at, c.len()));
            at += c.len();
            Ok(())
        };
        chunker.push(piece, &mut emit)?;
        chunker.finish(&mut emit)?;
        Ok(())
    })?;
    t.chunks += bounds.len() as u64;

    let mut ids = Vec::with_capacity(bounds.len());
    t.blake3 += min_time(repeat, || {
        ids.clear();
        ids.extend(
            bounds
                .iter()
                .map(|&(at, n)| ChunkId::of(&piece[at..at + n])),
        );
        Ok(())
    })?;
    std::hint::black_box(&ids);

    let mut out = Vec::new();
    let (mut stored, mut zstd_chunks) = (0u64, 0u64);
    t.zstd += min_time(repeat, || {
        stored = 0;
        zstd_chunks = 0;
        for &(at, n) in &bounds {
            match enc.encode(&piece[at..at + n], &mut out)? {
                Codec::Zstd => {
                    stored += out.len() as u64;
                    zstd_chunks += 1;
                }
                Codec::Raw => stored += n as u64,
            }
        }
        Ok(())
    })?;
    t.stored += stored;
    t.zstd_chunks += zstd_chunks;
    Ok(())
}

fn ns_per_byte(d: Duration, bytes: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        d.as_nanos() as f64 / bytes as f64
    }
}

/// MB/s (10^6 bytes per second) of `cores` cores at `ns` CPU nanoseconds per byte.
fn mb_per_s(cores: usize, ns: f64) -> f64 {
    if ns > 0.0 {
        cores as f64 * 1000.0 / ns
    } else {
        f64::INFINITY
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let d = ChunkerParams::default();
    let params = ChunkerParams {
        min_size: a.chunk_min.unwrap_or(d.min_size),
        avg_size: a.chunk_avg.unwrap_or(d.avg_size),
        max_size: a.chunk_max.unwrap_or(d.max_size),
    };
    params.validate()?;
    let cores = a
        .cores
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut files = Vec::new();
    files_under(&a.dir, &mut files)?;
    if files.is_empty() {
        bail!("no regular files under {}", a.dir.display());
    }

    let mut enc = Encoder::new(a.level)?;
    let mut t = Totals::default();
    let mut buf = vec![0u8; PIECE];
    let mut block = vec![0u8; FILE_PIECE];
    for path in &files {
        let open = || File::open(path).with_context(|| format!("open {}", path.display()));
        t.read += min_time(a.repeat, || {
            let mut f = open()?;
            while read_piece(&mut f, &mut block, path)? > 0 {}
            Ok(())
        })?;
        let mut f = open()?;
        t.files += 1;
        loop {
            let n = read_piece(&mut f, &mut buf, path)?;
            if n == 0 {
                break;
            }
            t.bytes += n as u64;
            t.pieces += 1;
            measure_piece(&buf[..n], params, &mut enc, a.repeat, &mut t)?;
        }
    }

    let b = t.bytes;
    let read = ns_per_byte(t.read, b);
    let cdc = ns_per_byte(t.fastcdc, b);
    let hash1 = ns_per_byte(t.blake3, b);
    let hashing = hash1 * f64::from(a.hash_passes);
    let zstd = ns_per_byte(t.zstd, b);
    let new_cost = cdc + hashing + zstd;
    let stored_cost = cdc + hashing;
    let new_limit = mb_per_s(cores, new_cost);
    let stored_limit = mb_per_s(cores, stored_cost);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");

    println!(
        "Stage limits on {:.1} MB in {} files under {} (pieces of at most 64 MiB, one thread, \
         fastest of {} passes; MB = 10^6 bytes)",
        b as f64 / 1e6,
        t.files,
        a.dir.display(),
        a.repeat.max(1)
    );
    println!(
        "chunker min/avg/max {}/{}/{} bytes: {} chunks (mean {:.0} KiB); zstd level {}: {} of {} \
         chunks compressed, stored {:.1} MB ({:.2}x); load average {load}",
        params.min_size,
        params.avg_size,
        params.max_size,
        t.chunks,
        b as f64 / t.chunks.max(1) as f64 / 1024.0,
        a.level,
        t.zstd_chunks,
        t.chunks,
        t.stored as f64 / 1e6,
        b as f64 / t.stored.max(1) as f64,
    );
    println!();
    println!("| stage | CPU ns/byte | MB/s on 1 core |");
    println!("|---|---:|---:|");
    let row = |name: &str, ns: f64| println!("| {name} | {ns:.3} | {:.0} |", mb_per_s(1, ns));
    row("open + read from page cache (not in the limits)", read);
    row("FastCDC (Chunker::push)", cdc);
    row("BLAKE3, one pass", hash1);
    row(
        &format!(
            "hashing as ingest does it ({} BLAKE3 passes)",
            a.hash_passes
        ),
        hashing,
    );
    row(&format!("zstd level {} (Encoder::encode)", a.level), zstd);
    println!();
    println!(
        "limit for new data = {cores} cores / (FastCDC + hashing + zstd) = {cores} / {new_cost:.3} \
         ns/B = {new_limit:.0} MB/s"
    );
    println!(
        "limit for already-stored data = {cores} cores / (FastCDC + hashing) = {cores} / \
         {stored_cost:.3} ns/B = {stored_limit:.0} MB/s"
    );

    if let Some(out) = &a.json {
        let report = json!({
            "dir": a.dir,
            "bytes": b,
            "files": t.files,
            "pieces": t.pieces,
            "repeat": a.repeat.max(1),
            "chunker": { "min": params.min_size, "avg": params.avg_size, "max": params.max_size },
            "chunks": t.chunks,
            "zstd_level": a.level,
            "zstd_chunks": t.zstd_chunks,
            "stored_bytes": t.stored,
            "load_average": load,
            "cores": cores,
            "hash_passes": a.hash_passes,
            "ns_per_byte": {
                "read": read,
                "fastcdc": cdc,
                "blake3_one_pass": hash1,
                "hashing": hashing,
                "zstd": zstd,
            },
            "limit_new_mb_s": new_limit,
            "limit_stored_mb_s": stored_limit,
        });
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}
