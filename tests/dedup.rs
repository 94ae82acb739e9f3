//! Dedup across runs: a guide-board-sim run followed by its successor stores only a small
//! fraction of new bytes, and re-ingesting an identical tree adds no chunks at all.

mod common;

use common::Env;
use guide_board_sim::generate::{Options, generate};

#[test]
fn successive_runs_share_most_bytes_and_identical_trees_add_nothing() {
    let env = Env::new();
    let runs_dir = env.path("runs");
    generate(
        &Options {
            out: runs_dir.clone(),
            seed: 42,
            runs: 2,
            size: 48 << 20,
            small_files: Some(400),
            first_run: 0,
        },
        |_| {},
    )
    .unwrap();

    let first = env.ingest(&runs_dir.join("run-0000"), "guide-board/run-0000");
    let after_first = env.stats();
    let second = env.ingest(&runs_dir.join("run-0001"), "guide-board/run-0001");
    let after_second = env.stats();

    let raw2 = second["raw_bytes"].as_u64().unwrap();
    let stored1 = after_first["stored_bytes"].as_u64().unwrap();
    let stored2 = after_second["stored_bytes"].as_u64().unwrap();
    let added = stored2 - stored1;
    // The generator changes the big binaries by 1-3%, appends to logs, and writes fresh
    // metrics, results and half the blobs: roughly a third of a run is genuinely new.
    assert!(
        (added as f64) < 0.5 * raw2 as f64,
        "second run added {added} stored bytes for {raw2} raw bytes"
    );
    // And the first run alone is stored smaller than it is raw (compression pays).
    assert!(stored1 < first["raw_bytes"].as_u64().unwrap());
    assert_eq!(
        second["new_stored_bytes"].as_u64().unwrap(),
        added + manifest_size(&env, "guide-board/run-0001"),
        "ingest's report and stats disagree on what was added"
    );

    // The same tree again: not one new chunk, only a new manifest.
    let chunks_before = after_second["chunks"].as_u64().unwrap();
    let again = env.ingest(&runs_dir.join("run-0001"), "guide-board/run-0001-again");
    let after_again = env.stats();
    assert_eq!(again["new_chunks"].as_u64().unwrap(), 0);
    assert_eq!(after_again["chunks"].as_u64().unwrap(), chunks_before);
    assert_eq!(after_again["stored_bytes"], after_second["stored_bytes"]);
    // Same content, different run name: the manifests differ only in their metadata.
    assert_ne!(again["manifest"], second["manifest"]);
    assert!(env.ok(&["verify"]).contains("ok"));
}

/// Size of a run's stored manifest object.
fn manifest_size(env: &Env, run: &str) -> u64 {
    let info = env.run_info(run).expect("run is listed");
    let digest = info["manifest"].as_str().unwrap().to_owned();
    let path = env
        .store()
        .join("objects/manifests")
        .join(&digest[..2])
        .join(&digest);
    std::fs::metadata(path).unwrap().len()
}
