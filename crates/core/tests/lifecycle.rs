//! Retention, holds and gc through the engine's API, on a real local store, with a clock the
//! tests move (no sleeps).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use artifactfs_core::chunker::ChunkerParams;
use artifactfs_core::clock::ManualClock;
use artifactfs_core::gc::GcOptions;
use artifactfs_core::id::ChunkId;
use artifactfs_core::objstore::LocalStore;
use artifactfs_core::{Error, InitOptions, NoProgress, RunRef, Store};
use rand::{Rng, SeedableRng};

const DAY: Duration = Duration::from_secs(86_400);

struct T {
    dir: tempfile::TempDir,
    clock: ManualClock,
}

impl T {
    fn new() -> Self {
        Self::with_pack_target(1 << 20)
    }

    /// Small chunks, and packs closed at `bytes`.
    fn with_pack_target(bytes: u64) -> Self {
        Self::with(InitOptions {
            chunker: ChunkerParams {
                min_size: 4096,
                avg_size: 16384,
                max_size: 65536,
            },
            pack_target_size: bytes,
            ..Default::default()
        })
    }

    fn with(opts: InitOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::init(&dir.path().join("store"), &opts).unwrap());
        // 2026-11-29T00:00:00Z
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_910_400));
        Self { dir, clock }
    }

    fn open(&self) -> Store {
        let root = self.dir.path().join("store");
        Store::open_with(
            &root,
            Arc::new(LocalStore::open(root.join("objects")).unwrap()),
            Arc::new(self.clock.clone()),
        )
        .unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Writes `files` (name → bytes) into a new directory.
fn tree(root: &Path, files: &[(&str, Vec<u8>)]) -> PathBuf {
    std::fs::create_dir_all(root).unwrap();
    for (name, data) in files {
        std::fs::write(root.join(name), data).unwrap();
    }
    root.to_path_buf()
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn ingest(t: &T, s: &Store, run: &str, files: &[(&str, Vec<u8>)]) -> RunRef {
    let r = RunRef::parse(run).unwrap();
    let src = tree(&t.path(&format!("src/{run}")), files);
    s.ingest_dir(&src, &r, BTreeMap::new(), &NoProgress)
        .unwrap();
    r
}

/// gc with no grace period (and otherwise default settings, or `compact_below`).
fn gc_now(s: &Store, compact_below: f64) -> artifactfs_core::gc::GcReport {
    s.gc(
        &GcOptions {
            grace: Duration::ZERO,
            compact_below,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap()
}

fn events(s: &Store) -> Vec<(String, Option<String>, serde_json::Value)> {
    s.events(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.run, e.detail))
        .collect()
}

/// Distinct chunks the live runs reference, recounted from their manifests, and their stored
/// bytes according to the index.
fn live_chunk_bytes(s: &Store) -> (HashSet<ChunkId>, u64) {
    let mut ids = HashSet::new();
    for run in s.runs(None).unwrap() {
        if run.state != "sealed" {
            continue;
        }
        let (_, m) = s.manifest(&run.run).unwrap();
        for e in &m.entries {
            ids.extend(e.chunks.iter().map(|c| c.0));
        }
    }
    let stats = s.stats().unwrap();
    (ids, stats.chunk_stored_bytes)
}

fn assert_exports_exactly(t: &T, s: &Store, r: &RunRef, files: &[(&str, Vec<u8>)]) {
    let dest = t.path(&format!(
        "export-{}-{}",
        r.to_string().replace('/', "-"),
        rand::random::<u64>()
    ));
    s.export(r, &dest, &NoProgress).unwrap();
    for (name, data) in files {
        assert_eq!(
            std::fs::read(dest.join(name)).unwrap(),
            *data,
            "{r}/{name} exports exactly"
        );
    }
}

#[test]
fn retention_rules_holds_and_events() {
    let t = T::new();
    let s = t.open();
    let a = ingest(&t, &s, "ns/a", &[("f", random(1, 10_000))]);

    // No retention: kept, not eligible, whatever the time.
    let i = s.retention_info(&a).unwrap();
    assert_eq!((i.retain.as_deref(), i.eligible), (None, false));
    t.clock.advance(3650 * DAY);
    assert!(s.expired_runs().unwrap().is_empty());

    // The first value is taken as given, even a short one; then only extensions.
    let i = s.set_retention(&a, "1h", None).unwrap();
    assert_eq!(i.retain.as_deref(), Some("1h"));
    assert!(i.eligible, "sealed ten years ago + 1h has passed");
    s.set_retention(&a, "30d", None).unwrap();
    s.set_retention(&a, "forever", None).unwrap();
    let e = s.set_retention(&a, "100y", None).unwrap_err();
    assert!(matches!(e, Error::NotPermitted(_)), "{e}");
    assert!(e.to_string().contains("forever"), "{e}");
    assert_eq!(
        s.retention_info(&a).unwrap().retain.as_deref(),
        Some("forever")
    );

    // Bad values change nothing.
    for bad in ["banana", "-1d", "0s", "2000-01-01", "500y"] {
        let e = s.set_retention(&a, bad, None).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{bad}: {e}");
    }
    assert_eq!(
        s.retention_info(&a).unwrap().retain.as_deref(),
        Some("forever")
    );

    // The override shortens and is recorded with its reason; an empty reason is refused.
    assert!(s.set_retention(&a, "1d", Some(" ")).is_err());
    let i = s.set_retention(&a, "1d", Some("ticket 42")).unwrap();
    assert!(i.eligible);
    let ev = events(&s);
    let last = ev.iter().rev().find(|e| e.0 == "run.retention").unwrap();
    assert_eq!(last.2["override"], true);
    assert_eq!(last.2["reason"], "ticket 42");
    assert_eq!(last.2["previous"], "forever");

    // Holds: named, validated, block eligibility, and each change is an event.
    s.place_hold(&a, "legal", b"case 7").unwrap();
    assert!(!s.retention_info(&a).unwrap().eligible);
    assert!(s.expired_runs().unwrap().is_empty());
    for bad in ["", "a b", "../x", &"x".repeat(65)] {
        assert!(matches!(
            s.place_hold(&a, bad, b"r").unwrap_err(),
            Error::Invalid { .. }
        ));
    }
    assert!(s.place_hold(&a, "big", &[b'x'; 2000]).is_err());
    assert!(matches!(
        s.remove_hold(&a, "nope").unwrap_err(),
        Error::NoAttr(_)
    ));
    s.remove_hold(&a, "legal").unwrap();
    assert!(s.retention_info(&a).unwrap().eligible);
    let kinds: Vec<String> = events(&s).into_iter().map(|e| e.0).collect();
    assert!(kinds.contains(&"run.hold_placed".to_string()));
    assert!(kinds.contains(&"run.hold_removed".to_string()));
    assert_eq!(
        kinds.iter().filter(|k| *k == "run.retention").count(),
        4,
        "1h, 30d, forever, 1d (override): {kinds:?}"
    );
}

#[test]
fn namespace_and_store_defaults_apply_to_new_runs_only() {
    let t = T::with(InitOptions {
        default_retention: Some("7d".into()),
        ..Default::default()
    });
    let s = t.open();
    let old = ingest(&t, &s, "lab/old", &[("f", random(2, 1000))]);
    assert_eq!(
        s.retention_info(&old).unwrap().retain.as_deref(),
        Some("7d")
    );
    s.set_namespace_retention("lab", Some("90d")).unwrap();
    assert!(
        s.set_namespace_retention("lab", Some("2030-01-01"))
            .is_err(),
        "a default is a duration"
    );
    assert!(s.set_namespace_retention("lab", Some("soon")).is_err());
    let new = ingest(&t, &s, "lab/new", &[("f", random(3, 1000))]);
    assert_eq!(
        s.retention_info(&old).unwrap().retain.as_deref(),
        Some("7d"),
        "the namespace default does not change existing runs"
    );
    let i = s.retention_info(&new).unwrap();
    assert_eq!(i.retain.as_deref(), Some("90d"));
    assert_eq!(i.retain_until.as_deref(), Some("2027-02-27T00:00:00Z"));
    // A default is a retention like any other: it cannot be shortened.
    assert!(s.set_retention(&new, "30d", None).is_err());
    s.set_namespace_retention("lab", None).unwrap();
    let other = ingest(&t, &s, "lab/third", &[("f", random(4, 1000))]);
    assert_eq!(
        s.retention_info(&other).unwrap().retain.as_deref(),
        Some("7d")
    );
    t.clock.advance(8 * DAY);
    let expired: Vec<String> = s
        .expired_runs()
        .unwrap()
        .into_iter()
        .map(|r| r.run)
        .collect();
    assert_eq!(expired, ["old", "third"]);
}

/// Three runs: `a` shares 40% of its bytes with `keep`, `b` shares nothing. In a store whose
/// packs hold more than a run, each of `a`'s and `b`'s one file makes one pack (in whatever
/// order the writer's workers hand its chunks over, whichever reader cut it), so expiring `a`
/// and `b` leaves a pack 60% dead (rewritten) and a pack fully dead (deleted).
fn scenario(t: &T, s: &Store) -> (Vec<(&'static str, Vec<u8>)>, RunRef) {
    let shared = random(10, 600_000);
    // `keep` has the first 600 KB of `a`'s file as a file of its own: the same chunks but
    // the one that crosses into the rest.
    let a_files = vec![("all", [shared.clone(), random(11, 900_000)].concat())];
    let keep_files = vec![("shared", shared), ("mine", random(12, 300_000))];
    let a = ingest(t, s, "ns/a", &a_files);
    let b = ingest(t, s, "ns/b", &[("x", random(13, 700_000))]);
    let keep = ingest(t, s, "ns/keep", &keep_files);
    s.set_retention(&a, "1d", None).unwrap();
    s.set_retention(&b, "1d", None).unwrap();
    s.set_retention(&keep, "30d", None).unwrap();
    (keep_files, keep)
}

#[test]
fn gc_reclaims_exactly_what_no_live_run_references() {
    let t = T::with_pack_target(4 << 20);
    let s = t.open();
    let (keep_files, keep) = scenario(&t, &s);
    t.clock.advance(2 * DAY);
    let before = s.stats().unwrap();

    // A dry run reports what the real run then does, and changes nothing.
    let objects_before = LocalStore::open(t.path("store/objects"))
        .map(|o| artifactfs_core::objstore::ObjectStore::list(&o, "").unwrap())
        .unwrap();
    let dry = s
        .gc(
            &GcOptions {
                dry_run: true,
                grace: Duration::ZERO,
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(s.stats().unwrap(), before);
    let objects_after = LocalStore::open(t.path("store/objects"))
        .map(|o| artifactfs_core::objstore::ObjectStore::list(&o, "").unwrap())
        .unwrap();
    assert_eq!(objects_before, objects_after);
    assert_eq!(s.runs(None).unwrap().len(), 3);

    let real = gc_now(&s, 0.5);
    assert_eq!(real.runs_expired, ["ns/a", "ns/b"]);
    assert_eq!(dry.runs_expired, real.runs_expired);
    assert_eq!(dry.chunks_swept, real.chunks_swept);
    assert_eq!(dry.chunk_bytes_swept, real.chunk_bytes_swept);
    assert_eq!(dry.packs_deleted, real.packs_deleted);
    assert_eq!(dry.packs_rewritten, real.packs_rewritten);
    assert_eq!(dry.manifests_deleted, real.manifests_deleted);
    assert!(
        real.chunks_swept > 0 && real.packs_deleted >= 1 && real.packs_rewritten >= 1,
        "{real:?}"
    );
    assert!(real.bytes_reclaimed > 0);

    // Stored chunks are exactly those the live run references.
    let (live, stored) = live_chunk_bytes(&s);
    let after = s.stats().unwrap();
    assert_eq!(after.chunks as usize, live.len());
    assert_eq!(stored, after.chunk_stored_bytes);
    assert_eq!(after.runs_sealed, 1);
    // No pack holds dead bytes beyond the threshold, and the run is whole.
    assert!(s.verify(None, &NoProgress).unwrap().ok());
    assert_exports_exactly(&t, &s, &keep, &keep_files);

    // Tombstones keep name, digest and times; the names are free again.
    let tomb = s.tombstones(None).unwrap();
    assert_eq!(tomb.len(), 2);
    assert!(tomb.iter().all(|(r, _)| r.manifest.is_some()));
    assert!(matches!(
        s.run(&RunRef::parse("ns/a").unwrap()).unwrap_err(),
        Error::NotFound(_)
    ));
    ingest(&t, &s, "ns/a", &[("again", random(14, 1000))]);

    // A second gc finds nothing more to do.
    let again = gc_now(&s, 0.5);
    assert_eq!(
        (
            again.runs_expired.len(),
            again.chunks_swept,
            again.packs_deleted
        ),
        (0, 0, 0)
    );
    let kinds: Vec<String> = events(&s).into_iter().map(|e| e.0).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "run.expired").count(), 2);
    assert_eq!(kinds.iter().filter(|k| *k == "gc.finished").count(), 2);
}

#[test]
fn grace_period_keeps_young_chunks_and_holds_block_expiry() {
    let t = T::new();
    let s = t.open();
    let a = ingest(&t, &s, "ns/a", &[("f", random(20, 500_000))]);
    s.set_retention(&a, "1h", None).unwrap();
    s.place_hold(&a, "audit", b"").unwrap();
    t.clock.advance(2 * 3600 * Duration::from_secs(1));
    let r = gc_now(&s, 0.5);
    assert!(r.runs_expired.is_empty(), "held");
    s.remove_hold(&a, "audit").unwrap();
    // The run's packs were written two hours ago: a 3h grace keeps its chunks for now.
    let r = s
        .gc(
            &GcOptions {
                grace: Duration::from_secs(3 * 3600),
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(r.runs_expired, ["ns/a"]);
    assert_eq!(r.chunks_swept, 0);
    assert!(r.chunks_in_grace > 0);
    t.clock.advance(DAY);
    let r = s
        .gc(
            &GcOptions {
                grace: Duration::from_secs(3 * 3600),
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
    assert!(r.chunks_swept > 0);
    assert_eq!(s.stats().unwrap().chunks, 0);
    assert_eq!(s.stats().unwrap().packs, 0);
}

#[test]
fn reference_counts_are_checked_by_verify() {
    let t = T::new();
    let s = t.open();
    ingest(&t, &s, "ns/a", &[("f", random(30, 100_000))]);
    assert!(s.verify(None, &NoProgress).unwrap().ok());
    drop(s);
    let conn = rusqlite::Connection::open(t.path("store/index.sqlite")).unwrap();
    conn.execute(
        "UPDATE chunks SET refs = refs + 1 WHERE rowid IN (SELECT rowid FROM chunks LIMIT 1)",
        [],
    )
    .unwrap_or_else(|_| {
        conn.execute(
            "UPDATE chunks SET refs = refs + 1 WHERE hash = (SELECT hash FROM chunks LIMIT 1)",
            [],
        )
        .unwrap()
    });
    drop(conn);
    let s = t.open();
    let rep = s.verify(None, &NoProgress).unwrap();
    assert_eq!(rep.damage.len(), 1, "{:?}", rep.damage);
    assert!(rep.damage[0].problem.contains("reference count"));
}

/// Producers keep ingesting runs that share chunks with runs that expire, while gc runs in a
/// loop; every live run then verifies and exports exactly.
#[test]
fn gc_in_a_loop_while_producers_write() {
    let t = T::new();
    let s = Arc::new(t.open());
    let base = Arc::new(random(40, 400_000));
    ingest(&t, &s, "tmp/seed", &[("f", base.to_vec())]);
    s.set_namespace_retention("tmp", Some("1h")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let kept: Arc<std::sync::Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let mut producers = Vec::new();
    for p in 0..2u64 {
        let (s, base, stop, made, kept) = (
            s.clone(),
            base.clone(),
            stop.clone(),
            made.clone(),
            kept.clone(),
        );
        let root = t.path(&format!("prod{p}"));
        producers.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) || i < 3 {
                // Half the bytes are shared with the expiring `tmp` runs.
                let mut data = base.to_vec();
                data.extend(random(1000 + p * 1000 + i, 100_000));
                let ns = if i.is_multiple_of(2) { "keep" } else { "tmp" };
                let name = format!("{ns}/p{p}-{i}");
                let src = root.join(format!("{i}"));
                std::fs::create_dir_all(&src).unwrap();
                std::fs::write(src.join("data"), &data).unwrap();
                let r = RunRef::parse(&name).unwrap();
                s.ingest_dir(&src, &r, BTreeMap::new(), &NoProgress)
                    .unwrap();
                if ns == "keep" {
                    kept.lock().unwrap().insert(name, data);
                }
                made.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let mut expired = 0;
    for _ in 0..60 {
        t.clock.advance(Duration::from_secs(2 * 3600));
        let r = gc_now(&s, 0.9);
        expired += r.runs_expired.len();
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    assert!(expired > 0, "some tmp runs expired while producers wrote");
    assert!(made.load(Ordering::Relaxed) >= 6);
    let rep = s.verify(None, &NoProgress).unwrap();
    assert!(rep.ok(), "{:?}", rep.damage);
    for (name, data) in kept.lock().unwrap().iter() {
        let r = RunRef::parse(name).unwrap();
        assert_exports_exactly(&t, &s, &r, &[("data", data.clone())]);
    }
    // And once everything expirable is gone, only the kept runs' chunks remain.
    t.clock.advance(DAY);
    gc_now(&s, 1.0);
    let (live, stored) = live_chunk_bytes(&s);
    let st = s.stats().unwrap();
    assert_eq!(st.chunks as usize, live.len());
    assert_eq!(stored, st.chunk_stored_bytes);
    assert!(s.verify(None, &NoProgress).unwrap().ok());
}
