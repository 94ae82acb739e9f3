//! End-to-end tests of generated run directories (small sizes, so they stay fast).

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use clap::Parser;

use super::*;
use guide_board_sim::generate::{self, DEEP_DIR, RunSummary, run_mtime};
use guide_board_sim::produce::{ProduceOptions, produce};

const MIB: u64 = 1 << 20;

fn opts(out: &Path, seed: u64, runs: u32, size: u64) -> Options {
    Options {
        out: out.to_path_buf(),
        seed,
        runs,
        size,
        small_files: None,
        first_run: 0,
    }
}

fn gen_ok(o: &Options) -> Vec<RunSummary> {
    generate(o, |_| {}).expect("generation succeeds")
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    dir: bool,
    mode: u32,
    mtime: SystemTime,
    content: Vec<u8>,
}

/// Everything observable about a tree, keyed by relative path ("" is the root).
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            add(root, &path, out);
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    fn add(root: &Path, path: &Path, out: &mut BTreeMap<String, Entry>) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let content = if meta.is_file() {
            std::fs::read(path).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            rel,
            Entry {
                dir: meta.is_dir(),
                mode: meta.permissions().mode() & 0o7777,
                mtime: meta.modified().unwrap(),
                content,
            },
        );
    }
    let mut out = BTreeMap::new();
    add(root, root, &mut out);
    walk(root, root, &mut out);
    out
}

fn files(tree: &BTreeMap<String, Entry>) -> impl Iterator<Item = (&String, &Entry)> {
    tree.iter().filter(|(_, e)| !e.dir)
}

/// Content-defined chunks (gear hash, ~4 KiB average) as (hash, length).
fn cdc_chunks(data: &[u8]) -> Vec<(u64, usize)> {
    let mut gear = [0u64; 256];
    let mut x = 0x1234_5678_9abc_def1_u64;
    for g in &mut gear {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *g = x;
    }
    let (min, max, mask) = (1024, 16 * 1024, (1u64 << 12) - 1);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let mut h = 0u64;
        let mut end = data.len().min(start + max);
        for i in start..end {
            h = (h << 1).wrapping_add(gear[data[i] as usize]);
            if i - start >= min && h & mask == 0 {
                end = i + 1;
                break;
            }
        }
        let mut hasher = DefaultHasher::new();
        data[start..end].hash(&mut hasher);
        chunks.push((hasher.finish(), end - start));
        start = end;
    }
    chunks
}

/// Fraction of `new`'s bytes in chunks that also occur in `old`.
fn dedup_fraction(old: &[u8], new: &[u8]) -> f64 {
    let known: HashSet<u64> = cdc_chunks(old).into_iter().map(|(h, _)| h).collect();
    let shared: usize = cdc_chunks(new)
        .into_iter()
        .filter(|(h, _)| known.contains(h))
        .map(|(_, n)| n)
        .sum();
    shared as f64 / new.len() as f64
}

#[test]
fn same_seed_same_tree_different_seed_different_tree() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let sa = gen_ok(&opts(a.path(), 7, 2, 2 * MIB));
    let sb = gen_ok(&opts(b.path(), 7, 2, 2 * MIB));
    gen_ok(&opts(c.path(), 8, 2, 2 * MIB));
    assert_eq!(sa, sb);
    let (ta, tb, tc) = (snapshot(a.path()), snapshot(b.path()), snapshot(c.path()));
    // The temp roots themselves differ in mtime; everything under them must match.
    fn under(t: &BTreeMap<String, Entry>) -> Vec<(&String, &Entry)> {
        t.iter().filter(|(k, _)| !k.is_empty()).collect()
    }
    assert!(ta.len() > 50);
    assert_eq!(under(&ta), under(&tb));
    assert_ne!(under(&ta), under(&tc));
    assert_ne!(
        ta["run-0000/bin/trace.dat"].content,
        tc["run-0000/bin/trace.dat"].content
    );
}

#[test]
fn first_run_matches_full_sequence() {
    let full = tempfile::tempdir().unwrap();
    let single = tempfile::tempdir().unwrap();
    let s_full = gen_ok(&opts(full.path(), 3, 3, 2 * MIB));
    let s_single = gen_ok(&Options {
        first_run: 2,
        ..opts(single.path(), 3, 1, 2 * MIB)
    });
    assert_eq!(s_full.len(), 3);
    assert_eq!(s_single, vec![s_full[2].clone()]);
    assert!(!single.path().join("run-0000").exists());
    assert_eq!(
        snapshot(&full.path().join("run-0002")),
        snapshot(&single.path().join("run-0002"))
    );
}

#[test]
fn successive_runs_share_most_content() {
    let dir = tempfile::tempdir().unwrap();
    gen_ok(&opts(dir.path(), 11, 2, 8 * MIB));
    let r0 = snapshot(&dir.path().join("run-0000"));
    let r1 = snapshot(&dir.path().join("run-0001"));
    let bin = |t: &BTreeMap<String, Entry>, p: &str| t[p].content.clone();

    for path in ["bin/trace.dat", "bin/firmware-0.bin"] {
        let (a, b) = (bin(&r0, path), bin(&r1, path));
        assert_ne!(a, b, "{path} unchanged");
        let len_ratio = b.len() as f64 / a.len() as f64;
        assert!((0.95..1.05).contains(&len_ratio), "{path}: {len_ratio}");
        let dedup = dedup_fraction(&a, &b);
        assert!(dedup > 0.85, "{path}: only {dedup:.3} deduplicates");
        // Insertions and deletions shift content: the same bytes sit at other offsets.
        let same_offset = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64;
        assert!(same_offset / (a.len() as f64) < dedup);
    }

    for log in ["logs/harness.log", "logs/device-0.log", "logs/device-1.log"] {
        let (a, b) = (bin(&r0, log), bin(&r1, log));
        assert!(
            b.len() > a.len() && b.starts_with(&a),
            "{log} is not appended to"
        );
    }
    for same in [
        "config/harness.yaml",
        "config/limits.json",
        "run.sh",
        "blobs/noise-0.bin",
        "blobs/noise-1.bin",
    ] {
        assert_eq!(r0[same].content, r1[same].content, "{same} changed");
    }
    for fresh in [
        "blobs/noise-2.bin",
        "blobs/noise-3.bin",
        "metrics/metrics.csv",
        "metrics/samples.jsonl",
        "manifest.txt",
    ] {
        assert_ne!(r0[fresh].content, r1[fresh].content, "{fresh} unchanged");
    }
    let cases: Vec<_> = files(&r0)
        .filter(|(k, _)| k.starts_with("results/cases/"))
        .map(|(k, e)| e.content == r1[k].content)
        .collect();
    let identical = cases.iter().filter(|&&same| same).count();
    assert!(
        identical > 0 && identical * 2 < cases.len(),
        "{identical}/{}",
        cases.len()
    );
}

#[test]
fn size_is_roughly_respected_and_reported() {
    for size in [MIB, 4 * MIB, 24 * MIB] {
        let dir = tempfile::tempdir().unwrap();
        let summary = gen_ok(&opts(dir.path(), 5, 1, size));
        let tree = snapshot(&dir.path().join("run-0000"));
        let total: u64 = files(&tree).map(|(_, e)| e.content.len() as u64).sum();
        let ratio = total as f64 / size as f64;
        assert!((0.9..1.1).contains(&ratio), "size {size}: ratio {ratio}");
        assert_eq!(summary[0].bytes, total);
        assert_eq!(summary[0].files, files(&tree).count() as u64);
        let big: u64 = files(&tree)
            .filter(|(k, _)| k.starts_with("bin/"))
            .map(|(_, e)| e.content.len() as u64)
            .sum();
        let big_share = big as f64 / total as f64;
        assert!((0.45..0.65).contains(&big_share), "binaries {big_share}");
    }
}

#[test]
fn small_file_count_default_and_override() {
    let dir = tempfile::tempdir().unwrap();
    gen_ok(&opts(dir.path(), 1, 1, MIB));
    let count = |root: &Path| {
        std::fs::read_dir(root.join("results/cases"))
            .unwrap()
            .count()
    };
    assert_eq!(count(&dir.path().join("run-0000")), 64);
    let dir = tempfile::tempdir().unwrap();
    gen_ok(&Options {
        small_files: Some(7),
        ..opts(dir.path(), 1, 1, MIB)
    });
    assert_eq!(count(&dir.path().join("run-0000")), 7);
    assert_eq!(generate::default_small_files(64 * 1024), 20);
    assert_eq!(generate::default_small_files(64 << 30), 5000);
}

#[test]
fn modes_mtimes_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    gen_ok(&Options {
        first_run: 4,
        ..opts(dir.path(), 2, 2, MIB)
    });
    for run in [4u64, 5] {
        let tree = snapshot(&dir.path().join(format!("run-{run:04}")));
        for (path, e) in &tree {
            assert_eq!(e.mtime, run_mtime(run), "mtime of {path:?}");
            let want = if e.dir || path == "run.sh" {
                0o755
            } else {
                0o644
            };
            assert_eq!(e.mode, want, "mode of {path:?}");
        }
        let deep = format!("{DEEP_DIR}/calibration.json");
        assert!(tree.contains_key(&deep));
        assert!(Path::new(DEEP_DIR).components().count() >= 6);
        let manifest = String::from_utf8(tree["manifest.txt"].content.clone()).unwrap();
        assert!(manifest.contains(&format!("run: {run}\nseed: 2\n")));
        assert!(manifest.contains(&deep));
        for p in ["bin/trace.dat", "logs/harness.log", "config/devices.yaml"] {
            assert!(tree.contains_key(p), "{p} missing");
        }
    }
    assert_eq!(
        run_mtime(4),
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600 + 4 * 3600)
    );
}

#[test]
fn refuses_to_overwrite_a_non_empty_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("run-0000")).unwrap();
    // An existing empty directory is fine.
    gen_ok(&opts(dir.path(), 1, 1, MIB));
    let err = generate(&opts(dir.path(), 1, 2, MIB), |_| {}).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    // Nothing was written for the other run either.
    assert!(!dir.path().join("run-0001").exists());
}

#[test]
fn size_parsing() {
    assert_eq!(parse_size("65536"), Ok(65536));
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("64k"), Ok(65536));
    assert_eq!(parse_size("3M"), Ok(3 * MIB));
    assert_eq!(parse_size("256MiB"), Ok(256 * MIB));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    assert_eq!(parse_size("1gib"), Ok(1 << 30));
    for bad in ["", "MiB", "12 parsecs", "1.5G", "-3M", "99999999999G", "1K"] {
        assert!(parse_size(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn cli_parsing() {
    let cli = Cli::try_parse_from(["guide-board-sim", "generate", "--out", "/x"]).unwrap();
    let Command::Generate(a) = cli.command else {
        panic!("generate expected")
    };
    assert_eq!(
        (a.seed, a.runs, a.size, a.small_files, a.first_run),
        (1, 1, 64 * MIB, None, 0)
    );
    let cli = Cli::try_parse_from([
        "guide-board-sim",
        "generate",
        "--out",
        "/x",
        "--seed",
        "9",
        "--runs",
        "4",
        "--size",
        "8M",
        "--small-files",
        "30",
        "--first-run",
        "3",
    ])
    .unwrap();
    let Command::Generate(a) = cli.command else {
        panic!("generate expected")
    };
    assert_eq!(
        (a.seed, a.runs, a.size, a.small_files, a.first_run),
        (9, 4, 8 * MIB, Some(30), 3)
    );
    for bad in [&["--runs", "0"][..], &["--size", "lots"], &["--seed", "-1"]] {
        let mut args = vec!["guide-board-sim", "generate", "--out", "/x"];
        args.extend_from_slice(bad);
        assert!(Cli::try_parse_from(args).is_err(), "{bad:?} accepted");
    }
    assert!(Cli::try_parse_from(["guide-board-sim", "generate"]).is_err());
}

/// Asserts two snapshots are equal, naming the first path that differs.
fn assert_same_maps(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different paths"
    );
    for (k, ea) in a {
        let eb = &b[k];
        assert_eq!(
            (ea.dir, ea.mode, ea.mtime, ea.content.len()),
            (eb.dir, eb.mode, eb.mtime, eb.content.len()),
            "{k}"
        );
        assert!(ea.content == eb.content, "{k}: contents differ");
    }
}

fn assert_same(a: &Path, b: &Path) {
    assert_same_maps(&snapshot(a), &snapshot(b));
}

fn produce_opts(out: &Path, seed: u64, runs: u32, size: u64) -> ProduceOptions {
    ProduceOptions {
        out: out.to_path_buf(),
        namespace: None,
        seed,
        runs,
        first_run: 0,
        size,
        small_files: None,
        retain: Some("90d".into()),
        statehub_id_prefix: "sh-".into(),
        pace: std::time::Duration::ZERO,
        producers: 2,
        marker: None,
    }
}

/// Runs written over time by two producers at once end as the very trees `generate` writes
/// for the same seed and run indexes (contents, modes, mtimes, no temporary files left), with
/// the producer's xattrs on each run directory.
#[test]
fn produced_runs_equal_generated_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (gen_dir, prod_dir) = (dir.path().join("gen"), dir.path().join("prod"));
    gen_ok(&opts(&gen_dir, 7, 3, 512 * 1024));
    let p = produce_opts(&prod_dir, 7, 3, 512 * 1024);
    let written = produce(&p, |_| {}).unwrap();
    assert_eq!(
        written.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["run-0000", "run-0001", "run-0002"]
    );
    for s in &written {
        assert_same(&gen_dir.join(&s.name), &prod_dir.join(&s.name));
        let root = prod_dir.join(&s.name);
        let idx: u64 = s.name["run-".len()..].parse().unwrap();
        for (k, v) in guide_board_sim::produce::run_xattrs(&p, idx) {
            assert_eq!(xattr::get(&root, &k).unwrap(), Some(v.into_bytes()), "{k}");
        }
        assert_eq!(
            xattr::get(&root, "user.statehub.run_id").unwrap(),
            Some(format!("sh-{}", s.name).into_bytes())
        );
    }
}

/// With a marker and a namespace, a run is the generated tree plus an empty marker that has
/// the run's mtime, and the run directory keeps the generated mtime; a later first run works.
#[test]
fn produced_run_with_marker_is_generated_tree_plus_marker() {
    let dir = tempfile::tempdir().unwrap();
    let (gen_dir, prod_dir) = (dir.path().join("gen"), dir.path().join("prod"));
    let mut g = opts(&gen_dir, 3, 1, 256 * 1024);
    g.first_run = 4;
    gen_ok(&g);
    let mut p = produce_opts(&prod_dir, 3, 1, 256 * 1024);
    p.first_run = 4;
    p.producers = 1;
    p.namespace = Some("guide-board".into());
    p.marker = Some("_SUCCESS".into());
    p.pace = std::time::Duration::from_millis(1);
    produce(&p, |_| {}).unwrap();
    let mut produced = snapshot(&prod_dir.join("guide-board/run-0004"));
    let marker = produced.remove("_SUCCESS").expect("marker written");
    assert_eq!(marker.content, b"");
    assert_eq!(marker.mtime, run_mtime(4));
    assert_eq!(marker.mode, 0o644);
    assert_same_maps(&snapshot(&gen_dir.join("run-0004")), &produced);
    // An existing run directory is refused, not overwritten.
    let err = produce(&p, |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("exists"), "{err:#}");
}
