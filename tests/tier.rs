//! Tiering end to end against the real Ceph RGW on 127.0.0.1:7480 (`tools/ceph-rgw/start.sh`,
//! idempotent): `init --backend`, `tier push`, eviction, reads of evicted chunks through ranged
//! GETs (`cat`, `export`), the cache bound, `tier status`, `index rebuild --from` into an
//! empty store, an unreachable endpoint (a dead port), the gateway killed mid-upload (a private
//! radosgw on the same cluster, so the shared gateway is never stopped)
//! and rejected credentials. Each test makes its own bucket and empties it at the end.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{SystemTime, UNIX_EPOCH};

use artifactfs_core::objstore::ObjectStore;
use common::rgw::{Bucket, PrivateGateway, gateway_env};
use common::{Env, assert_same_tree, bytes};

const MIB: usize = 1 << 20;
/// A port nothing listens on.
const DEAD_ENDPOINT: &str = "http://127.0.0.1:9";

/// `artifactfs` with the gateway's AWS_* variables (and `overrides` on top).
fn cmd(store: &Path, args: &[&str], overrides: &[(&str, &str)]) -> std::process::Output {
    let mut c = StdCommand::new(assert_cmd::cargo::cargo_bin("artifactfs"));
    c.env_remove("ARTIFACTFS_STORE");
    c.args(["--store", store.to_str().unwrap()]);
    for (k, v) in gateway_env() {
        c.env(k, v);
    }
    for (k, v) in overrides {
        c.env(k, v);
    }
    c.args(args).output().expect("run artifactfs")
}

fn ok(store: &Path, args: &[&str], overrides: &[(&str, &str)]) -> String {
    let out = cmd(store, args, overrides);
    assert!(
        out.status.success(),
        "artifactfs {args:?} failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(store: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(store, args, &[])).expect("json")
}

/// A source tree of a few files, ~`mib` MiB of incompressible bytes.
fn source(env: &Env, name: &str, seed: u64, mib: usize) -> PathBuf {
    let src = env.path(name);
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("big.bin"), bytes(mib * MIB, seed)).unwrap();
    fs::write(src.join("sub/small.txt"), format!("run {seed}\n")).unwrap();
    fs::write(src.join("sub/tail.bin"), bytes(300_000, seed + 1000)).unwrap();
    src
}

fn init_tiered(store: &Path, b: &Bucket, cache: &str) {
    ok(
        store,
        &[
            "init",
            "--pack-size",
            "1MiB",
            "--backend",
            &b.url(),
            "--cache-size",
            cache,
        ],
        &[],
    );
}

fn ingest(store: &Path, src: &Path, run: &str) {
    ok(store, &["ingest", src.to_str().unwrap(), run], &[]);
}

fn local_packs(store: &Path) -> usize {
    let dir = store.join("objects/packs");
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|d| fs::read_dir(d.path()).map_or(0, |r| r.count()))
        .sum()
}

fn export_matches(env: &Env, store: &Path, run: &str, src: &Path) {
    let dest = env.path(&format!(
        "export-{}-{}",
        run.replace('/', "-"),
        rand_suffix()
    ));
    ok(store, &["export", run, dest.to_str().unwrap()], &[]);
    assert_same_tree(src, &dest);
}

fn rand_suffix() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn push_evicts_and_reads_come_back_through_ranged_gets() {
    let env = Env::new();
    let b = Bucket::new("tier-push");
    let store = env.store();
    init_tiered(&store, &b, "0");
    let src = source(&env, "src", 1, 3);
    ingest(&store, &src, "ns/a");
    let s = json(&store, &["tier", "status", "--json"]);
    let pending = s["pending_packs"].as_u64().unwrap();
    assert!(pending >= 3, "{s}");
    assert_eq!(s["pending_manifests"], 1, "{s}");
    assert_eq!(local_packs(&store) as u64, pending);

    let r = json(&store, &["tier", "push", "--json"]);
    assert_eq!(r["packs"].as_u64(), Some(pending), "{r}");
    assert_eq!(r["manifests"], 1, "{r}");
    assert_eq!(
        r["evicted_packs"].as_u64(),
        Some(pending),
        "cache size 0: {r}"
    );
    assert_eq!(b.keys("packs/").len() as u64, pending);
    assert_eq!(b.keys("manifests/").len(), 1);
    assert_eq!(b.keys("store/config.toml").len(), 1);
    assert_eq!(local_packs(&store), 0, "every pack evicted");

    let s = json(&store, &["tier", "status", "--json"]);
    assert_eq!(s["remote_only_packs"].as_u64(), Some(pending), "{s}");
    assert_eq!(
        (s["pending_packs"].as_u64(), s["both_packs"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(s["cache_bytes"], 0);
    assert_eq!(s["remote_manifests"], 1);

    // Reads of evicted chunks: cat, export, verify, all bit-exact.
    let out = cmd(&store, &["cat", "ns/a/big.bin"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, fs::read(src.join("big.bin")).unwrap());
    export_matches(&env, &store, "ns/a", &src);
    assert!(ok(&store, &["verify"], &[]).contains("ok"));
    // Snapshots on demand; the bucket keeps the newest two.
    assert_eq!(
        b.keys("index-snapshots/").len(),
        1,
        "the first push made one"
    );
    for _ in 0..2 {
        assert!(ok(&store, &["tier", "snapshot"], &[]).contains("index-snapshots/"));
    }
    assert_eq!(b.keys("index-snapshots/").len(), 2);
    // A second push has nothing to do.
    let r = json(&store, &["tier", "push", "--json"]);
    assert_eq!(
        (r["packs"].as_u64(), r["manifests"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn the_cache_bound_holds_and_evicted_chunks_are_cached_after_a_read() {
    let env = Env::new();
    let b = Bucket::new("tier-bound");
    let store = env.store();
    let bound = 3 * MIB as u64;
    init_tiered(&store, &b, "3MiB");
    let mut srcs = Vec::new();
    for i in 0..3u64 {
        let src = source(&env, &format!("src{i}"), 10 + i, 2);
        ingest(&store, &src, &format!("ns/r{i}"));
        srcs.push(src);
    }
    json(&store, &["tier", "push", "--json"]);
    let s = json(&store, &["tier", "status", "--json"]);
    let total =
        s["both_pack_bytes"].as_u64().unwrap() + s["remote_only_pack_bytes"].as_u64().unwrap();
    assert!(total > 6 * MIB as u64, "{s}");
    assert!(s["cache_bytes"].as_u64().unwrap() <= bound, "{s}");
    assert!(s["remote_only_packs"].as_u64().unwrap() > 0, "{s}");
    assert!(s["both_packs"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["pending_packs"], 0);
    assert_eq!(
        local_packs(&store) as u64,
        s["both_packs"].as_u64().unwrap(),
        "local files are exactly the cached packs"
    );
    // The oldest run was evicted first; reading it fetches ranges and caches some.
    export_matches(&env, &store, "ns/r0", &srcs[0]);
    let s = json(&store, &["tier", "status", "--json"]);
    assert!(s["range_cache_entries"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cache_bytes"].as_u64().unwrap() <= bound, "{s}");
    for (i, src) in srcs.iter().enumerate() {
        export_matches(&env, &store, &format!("ns/r{i}"), src);
    }
    let s = json(&store, &["tier", "status", "--json"]);
    assert!(s["cache_bytes"].as_u64().unwrap() <= bound, "{s}");
}

#[test]
fn a_new_store_is_rebuilt_from_the_bucket_alone() {
    let env = Env::new();
    let b = Bucket::new("tier-rebuild");
    let store = env.store();
    init_tiered(&store, &b, "1MiB");
    let mut srcs = Vec::new();
    for i in 0..3u64 {
        let src = source(&env, &format!("src{i}"), 20 + i, 1);
        ingest(&store, &src, &format!("ns/r{i}"));
        srcs.push(src);
    }
    let r = json(&store, &["tier", "push", "--json"]);
    assert!(
        r["snapshot"].is_string(),
        "the first push snapshots the index: {r}"
    );
    // A run after the snapshot (the next push, within the hour, takes none), which dedups
    // against the others.
    ingest(&store, &srcs[0], "other/copy");
    let r = json(&store, &["tier", "push", "--json"]);
    assert_eq!(r["still_pending"], 0, "{r}");
    assert!(r["snapshot"].is_null(), "{r}");
    assert_eq!(b.keys("index-snapshots/").len(), 1);
    let before = json(&store, &["stats", "--json"]);

    // From the snapshot plus what is newer, then (snapshots deleted) from packs and manifests.
    for (name, from_snapshot) in [("fresh", true), ("fresh2", false)] {
        if !from_snapshot {
            for k in b.keys("index-snapshots/") {
                b.store.delete(&k).unwrap();
            }
        }
        let fresh = env.path(name);
        let out = ok(
            &fresh,
            &["index", "rebuild", "--from", &b.url(), "--json"],
            &[],
        );
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["runs"], 4, "{report}");
        assert_eq!(report["snapshot"].is_string(), from_snapshot, "{report}");
        if from_snapshot {
            assert_eq!(report["replayed_runs"], 1, "{report}");
        }
        assert_eq!(
            report["skipped"].as_array().map(Vec::len),
            Some(0),
            "{report}"
        );
        assert_eq!(report["packs"], report["remote_packs"]);
        let after = json(&fresh, &["stats", "--json"]);
        for k in [
            "runs",
            "files",
            "raw_bytes",
            "chunks",
            "packs",
            "stored_bytes",
        ] {
            assert_eq!(after[k], before[k], "{k}");
        }
        assert_eq!(local_packs(&fresh), 0, "the new cache starts empty");
        let cfg = fs::read_to_string(fresh.join("config.toml")).unwrap();
        assert!(cfg.contains("pack_target_size = 1048576"), "{cfg}");
        assert!(ok(&fresh, &["verify"], &[]).contains("ok"));
        for (i, src) in srcs.iter().enumerate() {
            export_matches(&env, &fresh, &format!("ns/r{i}"), src);
        }
        export_matches(&env, &fresh, "other/copy", &srcs[0]);
        let s = json(&fresh, &["tier", "status", "--json"]);
        assert_eq!(
            (s["pending_packs"].as_u64(), s["pending_manifests"].as_u64()),
            (Some(0), Some(0))
        );
    }
    // Rebuild into a store that is not empty is refused.
    let out = cmd(&store, &["index", "rebuild", "--from", &b.url()], &[]);
    assert!(!out.status.success());
    // A local rebuild of the original keeps everything readable.
    ok(&store, &["index", "rebuild"], &[]);
    assert!(ok(&store, &["verify"], &[]).contains("ok"));
}

#[test]
fn an_unreachable_endpoint_keeps_uploads_pending_and_evicts_nothing() {
    let env = Env::new();
    let b = Bucket::new("tier-down");
    let store = env.store();
    init_tiered(&store, &b, "0");
    let dead = [
        ("AWS_ENDPOINT_URL", DEAD_ENDPOINT),
        ("AWS_MAX_ATTEMPTS", "2"),
    ];
    let src = source(&env, "src", 30, 2);
    // Ingest and local reads go on.
    let out = cmd(&store, &["ingest", src.to_str().unwrap(), "ns/a"], &dead);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cmd(&store, &["cat", "ns/a/big.bin"], &dead);
    assert!(out.status.success());
    assert_eq!(out.stdout, fs::read(src.join("big.bin")).unwrap());
    // The push fails, naming the endpoint and the bucket; nothing is evicted.
    let out = cmd(&store, &["tier", "push"], &dead);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:9") && err.contains(&b.name),
        "{err}"
    );
    let packs = local_packs(&store);
    assert!(packs > 0);
    let s: serde_json::Value =
        serde_json::from_str(&ok(&store, &["tier", "status", "--json"], &dead)).unwrap();
    assert_eq!(s["pending_packs"].as_u64(), Some(packs as u64), "{s}");
    assert_eq!(s["remote_only_packs"], 0);
    assert!(b.keys("packs/").is_empty());
    // An index rebuild cannot list the bucket: it fails naming it, and the store keeps the
    // index it had.
    let before = ok(&store, &["runs"], &dead);
    let out = cmd(&store, &["index", "rebuild"], &dead);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:9") && err.contains(&b.name),
        "{err}"
    );
    assert_eq!(ok(&store, &["runs"], &dead), before);
    let out = cmd(&store, &["cat", "ns/a/big.bin"], &dead);
    assert_eq!(out.stdout, fs::read(src.join("big.bin")).unwrap());
    // The gateway is back: the queue drains, then eviction.
    let r = json(&store, &["tier", "push", "--json"]);
    assert_eq!(r["packs"].as_u64(), Some(packs as u64), "{r}");
    assert_eq!(r["still_pending"], 0);
    assert_eq!(local_packs(&store), 0);
    export_matches(&env, &store, "ns/a", &src);
}

#[test]
fn rejected_credentials_fail_at_start_with_a_clear_error() {
    let env = Env::new();
    let b = Bucket::new("tier-creds");
    let store = env.store();
    let wrong = [("AWS_SECRET_ACCESS_KEY", "not-the-secret")];
    let out = cmd(&store, &["init", "--backend", &b.url()], &wrong);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("access denied") && err.contains(&b.name) && err.contains("127.0.0.1"),
        "{err}"
    );
    assert!(!store.join("config.toml").exists(), "nothing was created");
    // An existing tiered store opened with wrong keys: refused before doing anything.
    init_tiered(&store, &b, "0");
    let src = source(&env, "src", 40, 1);
    let out = cmd(&store, &["ingest", src.to_str().unwrap(), "ns/a"], &wrong);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("access denied"), "{err}");
    // A bucket that does not exist.
    let out = cmd(
        &env.path("other"),
        &["init", "--backend", "s3://afs-no-such-bucket-here/x"],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn a_push_killed_midway_resumes_and_evicts_only_what_was_checked() {
    let env = Env::new();
    let b = Bucket::new("tier-kill");
    let store = env.store();
    init_tiered(&store, &b, "0");
    let src = source(&env, "src", 50, 24);
    ingest(&store, &src, "ns/a");
    let total = local_packs(&store) as u64;
    assert!(total >= 16, "{total} packs");
    let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin("artifactfs"));
    child.args(["--store", store.to_str().unwrap(), "tier", "push"]);
    for (k, v) in gateway_env() {
        child.env(k, v);
    }
    let mut child = child
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let s = json(&store, &["tier", "status", "--json"]);
    let (pending, both, remote) = (
        s["pending_packs"].as_u64().unwrap(),
        s["both_packs"].as_u64().unwrap(),
        s["remote_only_packs"].as_u64().unwrap(),
    );
    eprintln!("after kill -9: {pending} pending, {both} both, {remote} remote only");
    assert_eq!(pending + both + remote, total, "{s}");
    assert_eq!(
        local_packs(&store) as u64,
        pending + both,
        "every pack not checked remote is still local: {s}"
    );
    let r = json(&store, &["tier", "push", "--json"]);
    assert_eq!(r["still_pending"], 0, "{r}");
    let s = json(&store, &["tier", "status", "--json"]);
    assert_eq!(s["remote_only_packs"].as_u64(), Some(total), "{s}");
    assert_eq!(b.keys("packs/").len() as u64, total);
    export_matches(&env, &store, "ns/a", &src);
}

#[test]
fn the_gateway_killed_mid_upload_loses_nothing_and_the_queue_drains_after_restart() {
    let env = Env::new();
    let b = Bucket::new("tier-gwkill");
    let mut gw = PrivateGateway::start();
    let genv = gw.env();
    let at: Vec<(&str, &str)> = genv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let store = env.store();
    let mut init = vec![
        "init",
        "--pack-size",
        "1MiB",
        "--cache-size",
        "0",
        "--backend",
    ];
    let url = b.url();
    init.push(&url);
    ok(&store, &init, &at);
    let src = source(&env, "src", 70, 24);
    ok(&store, &["ingest", src.to_str().unwrap(), "ns/a"], &at);
    let src2 = source(&env, "src2", 71, 1);
    ok(&store, &["ingest", src2.to_str().unwrap(), "ns/b"], &at);
    let total = local_packs(&store) as u64;
    assert!(total >= 20, "{total} packs");

    // Push through the private gateway; kill it once some packs are in the bucket.
    let mut push = StdCommand::new(assert_cmd::cargo::cargo_bin("artifactfs"));
    push.env_remove("ARTIFACTFS_STORE")
        .args(["--store", store.to_str().unwrap(), "tier", "push"]);
    for (k, v) in &genv {
        push.env(k, v);
    }
    let mut push = push
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = 0;
    while seen < 3 && push.try_wait().unwrap().is_none() {
        seen = b.keys("packs/").len();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    gw.kill(); // SIGKILL of radosgw, uploads in flight
    let out = push.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let in_bucket = b.keys("packs/").len() as u64;
    eprintln!("gateway killed with {seen} packs in the bucket; {in_bucket} after the push");
    assert!(
        in_bucket < total,
        "the push finished before the gateway was killed; nothing was tested"
    );
    assert!(!out.status.success(), "the push must fail: {err}");
    assert!(
        err.contains(&format!("127.0.0.1:{}", gw.port)) && err.contains(&b.name),
        "the error names the endpoint and the bucket: {err}"
    );

    // Nothing unsafe was evicted: what is not checked remote is still local.
    let s: serde_json::Value =
        serde_json::from_str(&ok(&store, &["tier", "status", "--json"], &at)).unwrap();
    let (pending, both, remote) = (
        s["pending_packs"].as_u64().unwrap(),
        s["both_packs"].as_u64().unwrap(),
        s["remote_only_packs"].as_u64().unwrap(),
    );
    eprintln!("after the kill: {pending} pending, {both} both, {remote} remote only");
    assert!(pending > 0, "{s}");
    assert_eq!(pending + both + remote, total, "{s}");
    assert_eq!(
        local_packs(&store) as u64,
        pending + both,
        "every pack not checked remote is still local: {s}"
    );
    // Ingest goes on while the gateway is down.
    let src3 = source(&env, "src3", 72, 1);
    ok(&store, &["ingest", src3.to_str().unwrap(), "ns/c"], &at);
    // Every byte is still readable: local packs here, the evicted ones through the shared
    // gateway of the same cluster.
    assert!(ok(&store, &["verify"], &[]).contains("ok"));
    export_matches(&env, &store, "ns/a", &src);
    export_matches(&env, &store, "ns/b", &src2);
    export_matches(&env, &store, "ns/c", &src3);

    // The gateway is back on the same port: the queue drains.
    gw.restart();
    let r: serde_json::Value =
        serde_json::from_str(&ok(&store, &["tier", "push", "--json"], &at)).unwrap();
    assert_eq!(r["still_pending"], 0, "{r}");
    let s: serde_json::Value =
        serde_json::from_str(&ok(&store, &["tier", "status", "--json"], &at)).unwrap();
    assert_eq!(
        (
            s["pending_packs"].as_u64(),
            s["pending_manifests"].as_u64(),
            s["pending_lifecycle"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(local_packs(&store), 0, "cache size 0: everything evicted");
    assert!(ok(&store, &["verify"], &at).contains("ok"));
    // The bucket alone holds everything: a new store rebuilt from it verifies and exports.
    let fresh = env.path("fresh");
    ok(&fresh, &["index", "rebuild", "--from", &url], &at);
    assert!(ok(&fresh, &["verify"], &at).contains("ok"));
    for (run, src) in [("ns/a", &src), ("ns/b", &src2), ("ns/c", &src3)] {
        export_matches(&env, &fresh, run, src);
    }
}

#[test]
fn a_mount_reads_evicted_chunks_and_uploads_what_is_pending() {
    use common::mount::is_mounted;
    let env = Env::new();
    let b = Bucket::new("tier-mount");
    let store = env.store();
    init_tiered(&store, &b, "0");
    let src = source(&env, "src", 60, 3);
    ingest(&store, &src, "ns/a");
    json(&store, &["tier", "push", "--json"]);
    assert_eq!(local_packs(&store), 0);
    // Pending when the mount starts: its uploader pushes at once.
    let src_b = source(&env, "srcb", 61, 1);
    ingest(&store, &src_b, "ns/b");
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let log = env.path("mount.log");
    let mut c = StdCommand::new(assert_cmd::cargo::cargo_bin("artifactfs"));
    c.args(["--store", store.to_str().unwrap(), "-v", "mount"])
        .arg(&mnt)
        .arg("--foreground");
    for (k, v) in gateway_env() {
        c.env(k, v);
    }
    let mut child = c
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !is_mounted(&mnt) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "mount exited:\n{}",
            log_text()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "mount not ready:\n{}",
            log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let read = fs::read(mnt.join("ns/a/big.bin"));
    let read_small = fs::read(mnt.join("ns/a/sub/tail.bin"));
    // The uploader drains ns/b within a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while b.keys("manifests/").len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let manifests = b.keys("manifests/").len();
    let st = StdCommand::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .status()
        .unwrap();
    let exit = child.wait().unwrap();
    assert!(st.success() && exit.success(), "unmount:\n{}", log_text());
    assert_eq!(read.unwrap(), fs::read(src.join("big.bin")).unwrap());
    assert_eq!(
        read_small.unwrap(),
        fs::read(src.join("sub/tail.bin")).unwrap()
    );
    assert_eq!(
        manifests,
        2,
        "the mount's uploader pushed ns/b:\n{}",
        log_text()
    );
    let s = json(&store, &["tier", "status", "--json"]);
    assert_eq!(s["pending_packs"], 0, "{s}");
}

/// Ingests `ns/gone` (retained 1d) and `ns/keep` (forever) and pushes: every pack is then only
/// in the bucket (cache size 0).
fn ingest_gone_and_keep(store: &Path, gone: &Path, keep: &Path, at: &[(&str, &str)]) {
    ok(store, &["ingest", gone.to_str().unwrap(), "ns/gone"], at);
    ok(store, &["ingest", keep.to_str().unwrap(), "ns/keep"], at);
    ok(store, &["retain", "ns/gone", "1d"], at);
    ok(store, &["retain", "ns/keep", "forever"], at);
    ok(store, &["tier", "push"], at);
    assert_eq!(local_packs(store), 0, "every pack is only in the bucket");
}

/// gc on a tiered store deletes an expired run's packs and manifest in the bucket too, so a
/// store rebuilt from the bucket afterwards holds only the live run.
#[test]
fn gc_deletes_dead_packs_and_manifests_in_the_bucket() {
    let env = Env::new();
    let b = Bucket::new("tier-gc");
    let store = env.store();
    let clock = env.path("clock");
    fs::write(&clock, "2026-12-01T00:00:00Z").unwrap();
    let at = [("ARTIFACTFS_CLOCK_FILE", clock.to_str().unwrap())];
    init_tiered(&store, &b, "0");
    let gone = source(&env, "gone", 7, 2);
    let keep = source(&env, "keep", 8, 2);
    ingest_gone_and_keep(&store, &gone, &keep, &at);
    let packs_before = b.keys("packs/").len();
    assert_eq!(b.keys("manifests/").len(), 2);

    fs::write(&clock, "2026-12-03T00:00:00Z").unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&ok(&store, &["gc", "--grace", "0s", "--json"], &at)).unwrap();
    assert_eq!(r["runs_expired"], serde_json::json!(["ns/gone"]), "{r}");
    assert!(r["packs_deleted"].as_u64().unwrap() >= 1, "{r}");
    let stats = json(&store, &["stats", "--json"]);
    let packs_after = b.keys("packs/").len();
    assert!(
        packs_after < packs_before,
        "{packs_before} -> {packs_after}"
    );
    assert_eq!(packs_after as u64, stats["packs"].as_u64().unwrap());
    assert_eq!(
        b.keys("manifests/").len(),
        1,
        "the expired run's manifest left the bucket"
    );
    assert!(ok(&store, &["verify"], &at).contains("ok"));
    export_matches(&env, &store, "ns/keep", &keep);

    // A store rebuilt from the bucket has the live run only, whole.
    let new = env.path("rebuilt");
    ok(&new, &["index", "rebuild", "--from", &b.url()], &[]);
    let runs = json(&new, &["runs", "--json"]);
    let names: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keep"]);
    export_matches(&env, &new, "ns/keep", &keep);
}

/// Compaction on a tiered store whose packs are all evicted: the live chunks of packs that an
/// expired run left sparse are fetched from the bucket, written into a new pack that is pushed,
/// and the old packs leave the bucket; the live run stays whole, in the store and in a store
/// rebuilt from the bucket.
#[test]
fn compaction_rewrites_evicted_packs_through_the_bucket() {
    let env = Env::new();
    let b = Bucket::new("tier-compact");
    let store = env.store();
    let clock = env.path("clock");
    fs::write(&clock, "2026-12-01T00:00:00Z").unwrap();
    let at = [("ARTIFACTFS_CLOCK_FILE", clock.to_str().unwrap())];
    init_tiered(&store, &b, "0");
    // `gone` holds `keep`'s bytes and more of its own, chunked into the same packs.
    let keep = env.path("keep");
    fs::create_dir_all(&keep).unwrap();
    for i in 0..6u64 {
        fs::write(keep.join(format!("k{i}.bin")), bytes(300_000, 500 + i)).unwrap();
    }
    let gone = env.path("gone");
    fs::create_dir_all(&gone).unwrap();
    for i in 0..6u64 {
        fs::write(gone.join(format!("g{i}.bin")), bytes(300_000, 600 + i)).unwrap();
        fs::copy(
            keep.join(format!("k{i}.bin")),
            gone.join(format!("k{i}.bin")),
        )
        .unwrap();
    }
    ingest_gone_and_keep(&store, &gone, &keep, &at);
    let before: std::collections::BTreeSet<String> = b.keys("packs/").into_iter().collect();

    fs::write(&clock, "2026-12-03T00:00:00Z").unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &["gc", "--grace", "0s", "--compact-below", "1.0", "--json"],
        &at,
    ))
    .unwrap();
    assert_eq!(r["runs_expired"], serde_json::json!(["ns/gone"]), "{r}");
    assert!(r["packs_rewritten"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["packs_written"].as_u64().unwrap() >= 1, "{r}");
    // The rewritten packs are gone from the bucket; the new ones go up with the next push.
    let mid: std::collections::BTreeSet<String> = b.keys("packs/").into_iter().collect();
    assert!(
        mid.is_subset(&before),
        "nothing new in the bucket before a push"
    );
    assert!(
        mid.len() < before.len(),
        "{} -> {}",
        before.len(),
        mid.len()
    );
    let p: serde_json::Value =
        serde_json::from_str(&ok(&store, &["tier", "push", "--json"], &at)).unwrap();
    assert_eq!(p["still_pending"], 0, "{p}");
    let after: std::collections::BTreeSet<String> = b.keys("packs/").into_iter().collect();
    let stats = json(&store, &["stats", "--json"]);
    assert_eq!(after.len() as u64, stats["packs"].as_u64().unwrap());
    assert!(
        after.difference(&before).count() >= 1,
        "a new pack was pushed"
    );
    assert!(ok(&store, &["verify"], &at).contains("ok"));
    export_matches(&env, &store, "ns/keep", &keep);
    let new = env.path("rebuilt");
    ok(&new, &["index", "rebuild", "--from", &b.url()], &[]);
    assert!(ok(&new, &["verify"], &[]).contains("ok"));
    export_matches(&env, &new, "ns/keep", &keep);
}

/// `retain NS/RUN --json` without the fields that depend on when it is asked.
fn lifecycle_of(store: &Path, run: &str, at: &[(&str, &str)]) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&ok(store, &["retain", run, "--json"], at)).unwrap();
    serde_json::json!({
        "retain": v["retain"],
        "retain_until": v["retain_until"],
        "holds": v["holds"],
        "state": v["state"],
    })
}

/// Retention and holds changed after the newest index snapshot reach the bucket as lifecycle
/// records and come back in a rebuild, from the snapshot and (snapshots deleted) from packs
/// and manifests alone; the restored state is enforced (a shortening is still refused).
#[test]
fn retention_and_holds_survive_a_rebuild_from_the_bucket() {
    let env = Env::new();
    let b = Bucket::new("tier-life");
    let store = env.store();
    init_tiered(&store, &b, "1MiB");
    let a = source(&env, "a", 41, 1);
    let c = source(&env, "c", 42, 1);
    ingest(&store, &a, "ns/a");
    ingest(&store, &c, "ns/c");
    ok(&store, &["retain", "ns/a", "30d"], &[]);
    let r = json(&store, &["tier", "push", "--json"]);
    assert!(r["snapshot"].is_string(), "{r}");
    assert_eq!(r["lifecycle"], 1, "{r}");
    assert_eq!(b.keys("lifecycle/"), ["site/lifecycle/ns/a.json"]);

    // After the snapshot: an extension, holds (one placed then removed), a namespace default.
    ok(&store, &["retain", "ns/a", "1y"], &[]);
    ok(
        &store,
        &["hold", "add", "ns/a", "legal", "--reason", "case 17"],
        &[],
    );
    ok(&store, &["hold", "add", "ns/c", "audit"], &[]);
    ok(&store, &["hold", "add", "ns/c", "tmp"], &[]);
    ok(&store, &["hold", "rm", "ns/c", "tmp"], &[]);
    ok(&store, &["retain", "ns", "90d"], &[]);
    let s = json(&store, &["tier", "status", "--json"]);
    assert_eq!(s["pending_lifecycle"], 3, "{s}");
    assert_eq!(s["pending_manifests"], 0, "existing fields stay: {s}");
    let r = json(&store, &["tier", "push", "--json"]);
    assert_eq!(
        (r["lifecycle"].as_u64(), r["still_pending"].as_u64()),
        (Some(3), Some(0)),
        "{r}"
    );
    assert!(
        r["snapshot"].is_null(),
        "no new snapshot within the hour: {r}"
    );
    assert_eq!(
        json(&store, &["tier", "status", "--json"])["pending_lifecycle"],
        0
    );
    assert_eq!(b.keys("index-snapshots/").len(), 1);
    let want_a = lifecycle_of(&store, "ns/a", &[]);
    let want_c = lifecycle_of(&store, "ns/c", &[]);
    assert_eq!(want_a["retain"], "1y");
    assert_eq!(want_a["holds"][0]["reason"], "case 17");
    assert_eq!(want_c["holds"].as_array().unwrap().len(), 1);

    for (name, from_snapshot) in [("fresh", true), ("fresh2", false)] {
        if !from_snapshot {
            for k in b.keys("index-snapshots/") {
                b.store.delete(&k).unwrap();
            }
        }
        let fresh = env.path(name);
        let report: serde_json::Value = serde_json::from_str(&ok(
            &fresh,
            &["index", "rebuild", "--from", &b.url(), "--json"],
            &[],
        ))
        .unwrap();
        assert_eq!(report["snapshot"].is_string(), from_snapshot, "{report}");
        assert_eq!(report["runs"], 2, "{report}");
        assert_eq!(report["lifecycle_restored"], 3, "{report}");
        assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
        assert_eq!(lifecycle_of(&fresh, "ns/a", &[]), want_a, "{name}");
        assert_eq!(lifecycle_of(&fresh, "ns/c", &[]), want_c, "{name}");
        let d = json(&fresh, &["retain", "ns", "--json"]);
        assert_eq!(d["default_retain"], "90d", "{name}: {d}");
        // The restored retention is enforced: shortening it is refused.
        let out = cmd(&fresh, &["retain", "ns/a", "30d"], &[]);
        assert!(!out.status.success(), "{name}");
    }
}

/// gc deletes an expired run's lifecycle record with its manifest, so a rebuilt store does not
/// give it back; a record still in the bucket (gc ran, no push yet) is not applied either.
#[test]
fn a_run_deleted_by_gc_does_not_get_its_lifecycle_back() {
    let env = Env::new();
    let b = Bucket::new("tier-lifegc");
    let store = env.store();
    let clock = env.path("clock");
    fs::write(&clock, "2026-12-01T00:00:00Z").unwrap();
    let at = [("ARTIFACTFS_CLOCK_FILE", clock.to_str().unwrap())];
    init_tiered(&store, &b, "0");
    let gone = source(&env, "gone", 51, 1);
    let keep = source(&env, "keep", 52, 1);
    ok(&store, &["ingest", gone.to_str().unwrap(), "ns/gone"], &at);
    ok(&store, &["ingest", keep.to_str().unwrap(), "ns/keep"], &at);
    ok(&store, &["retain", "ns/gone", "1d"], &at);
    ok(&store, &["retain", "ns/keep", "forever"], &at);
    ok(&store, &["hold", "add", "ns/keep", "legal"], &at);
    ok(&store, &["tier", "push"], &at);
    assert_eq!(
        b.keys("lifecycle/"),
        ["site/lifecycle/ns/gone.json", "site/lifecycle/ns/keep.json"]
    );
    fs::write(&clock, "2026-12-03T00:00:00Z").unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&ok(&store, &["gc", "--grace", "0s", "--json"], &at)).unwrap();
    assert_eq!(r["runs_expired"], serde_json::json!(["ns/gone"]), "{r}");
    let names = |s: &Path| -> Vec<String> {
        json(s, &["runs", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["run"].as_str().unwrap().to_owned())
            .collect()
    };
    // Before the next push the record is still in the bucket: it names a run that is gone.
    let early = env.path("early");
    let report: serde_json::Value = serde_json::from_str(&ok(
        &early,
        &["index", "rebuild", "--from", &b.url(), "--json"],
        &[],
    ))
    .unwrap();
    assert!(
        report["skipped"]
            .to_string()
            .contains("lifecycle/ns/gone.json"),
        "{report}"
    );
    assert_eq!(names(&early), ["keep"]);
    let want_keep = lifecycle_of(&store, "ns/keep", &at);
    assert_eq!(lifecycle_of(&early, "ns/keep", &at), want_keep);
    // The push deletes it.
    let s = json(&store, &["tier", "status", "--json"]);
    assert_eq!(s["pending_lifecycle"], 1, "{s}");
    let r: serde_json::Value =
        serde_json::from_str(&ok(&store, &["tier", "push", "--json"], &at)).unwrap();
    assert_eq!(r["lifecycle"], 1, "{r}");
    assert_eq!(b.keys("lifecycle/"), ["site/lifecycle/ns/keep.json"]);
    // A new run of the same name gets no retention from the old one.
    let again = source(&env, "again", 53, 1);
    ok(&store, &["ingest", again.to_str().unwrap(), "ns/gone"], &at);
    ok(&store, &["tier", "push"], &at);
    let new = env.path("rebuilt");
    let report: serde_json::Value = serde_json::from_str(&ok(
        &new,
        &["index", "rebuild", "--from", &b.url(), "--json"],
        &[],
    ))
    .unwrap();
    assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
    assert_eq!(names(&new), ["gone", "keep"]);
    let g = lifecycle_of(&new, "ns/gone", &at);
    assert!(
        g["retain"].is_null() && g["holds"] == serde_json::json!([]),
        "{g}"
    );
    let k = lifecycle_of(&new, "ns/keep", &at);
    assert_eq!(k, want_keep);
    assert_eq!(k["retain"], "forever");
    assert_eq!(k["holds"][0]["name"], "legal");
    export_matches(&env, &new, "ns/gone", &again);
}

#[test]
fn http_downloads_of_evicted_files_are_bit_exact() {
    let env = Env::new();
    let b = Bucket::new("tier-http");
    let store = env.store();
    init_tiered(&store, &b, "0");
    let src = source(&env, "src", 70, 3);
    ingest(&store, &src, "ns/a");
    json(&store, &["tier", "push", "--json"]);
    assert_eq!(local_packs(&store), 0, "every pack evicted");
    let log = env.path("serve.log");
    let mut c = StdCommand::new(assert_cmd::cargo::cargo_bin("artifactfs"));
    c.args([
        "--store",
        store.to_str().unwrap(),
        "-v",
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    for (k, v) in gateway_env() {
        c.env(k, v);
    }
    let mut child = c
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let base = line.trim().strip_prefix("listening on ").map(str::to_owned);
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap();
    let get = |range: Option<String>| {
        let mut r = client.get(format!(
            "{}/v1/runs/ns/a/files/big.bin",
            base.as_deref().unwrap_or_default()
        ));
        if let Some(h) = range {
            r = r.header("range", h);
        }
        let r = r.send().unwrap();
        (r.status().as_u16(), r.bytes().map(|b| b.to_vec()))
    };
    let want = fs::read(src.join("big.bin")).unwrap();
    let whole = base.as_ref().map(|_| get(None));
    let mid = base
        .as_ref()
        .map(|_| get(Some(format!("bytes={}-{}", MIB - 5, 2 * MIB + 5))));
    let _ = child.kill();
    let _ = child.wait();
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        base.is_some(),
        "serve did not start ({line:?}):\n{log_text}"
    );
    let (status, body) = whole.unwrap();
    assert_eq!(status, 200, "{log_text}");
    assert!(body.unwrap() == want, "whole download differs:\n{log_text}");
    let (status, body) = mid.unwrap();
    assert_eq!(status, 206, "{log_text}");
    assert!(body.unwrap() == want[MIB - 5..2 * MIB + 6], "range differs");
    assert_eq!(local_packs(&store), 0, "reads did not bring packs back");
}
