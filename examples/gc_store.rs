//! Builds a store for the gc benchmark (`benches/gc.sh`): many runs of small chunks, half of
//! them expired by now, each sharing part of its bytes with the others.
//!
//! ```text
//! cargo run --release --example gc_store -- STORE [--runs 1000] [--run-bytes 1MiB] [--avg-chunk 1KiB]
//! ```
//!
//! Every run is one file: a quarter of it is a slice of a shared random buffer (so chunks are
//! deduplicated across runs), the rest is its own random bytes. Runs are sealed ten days ago
//! (the engine's clock is moved back), odd runs with retention `1d` (eligible for deletion
//! now), even runs with `forever`. Prints the store's counts as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use artifactfs_core::chunker::ChunkerParams;
use artifactfs_core::clock::ManualClock;
use artifactfs_core::objstore::LocalStore;
use artifactfs_core::{InitOptions, NoProgress, RunRef, Store};
use rand::{Rng, SeedableRng};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            let v = v.to_ascii_lowercase();
            let (n, mul) = if let Some(n) = v.strip_suffix("mib") {
                (n, 1 << 20)
            } else if let Some(n) = v.strip_suffix("kib") {
                (n, 1 << 10)
            } else {
                (v.as_str(), 1)
            };
            n.parse::<u64>().expect("a number") * mul
        })
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(args.get(1).ok_or("usage: gc_store STORE [--runs N] …")?);
    let runs = arg(&args, "--runs", 1000);
    let run_bytes = arg(&args, "--run-bytes", 1 << 20) as usize;
    let avg = arg(&args, "--avg-chunk", 1024) as u32;
    Store::init(
        &root,
        &InitOptions {
            chunker: ChunkerParams {
                min_size: avg / 4,
                avg_size: avg,
                max_size: avg * 4,
            },
            ..Default::default()
        },
    )?;
    let clock = ManualClock::new(SystemTime::now() - Duration::from_secs(10 * 86_400));
    let store = Store::open_with(
        &root,
        Arc::new(LocalStore::open(root.join("objects"))?),
        Arc::new(clock.clone()),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut shared = vec![0u8; 64 << 20];
    rng.fill(&mut shared[..]);
    let scratch = tempfile::tempdir()?;
    let mut data = vec![0u8; run_bytes];
    for i in 0..runs {
        let q = run_bytes / 4;
        let at = rng.random_range(0..shared.len() - q);
        data[..q].copy_from_slice(&shared[at..at + q]);
        rng.fill(&mut data[q..]);
        let dir = scratch.path().join(format!("{i}"));
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("data"), &data)?;
        let r = RunRef::parse(&format!("bench/run-{i:05}"))?;
        store.ingest_dir(&dir, &r, BTreeMap::new(), &NoProgress)?;
        std::fs::remove_dir_all(&dir)?;
        store.set_retention(&r, if i % 2 == 1 { "1d" } else { "forever" }, None)?;
        clock.advance(Duration::from_millis(10));
    }
    let s = store.stats()?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
