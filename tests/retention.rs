//! Retention, holds and gc end to end: the real binary and real mounts, with the engine's clock
//! read from a file the tests move (`ARTIFACTFS_CLOCK_FILE`), so nothing sleeps.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;

use common::Env;
use common::mount::{Mount, errno, seal, state};

const T0: &str = "2026-12-01T00:00:00Z";

fn write_tree(root: &Path, files: &[(&str, &[u8])]) {
    fs::create_dir_all(root).unwrap();
    for (name, data) in files {
        fs::write(root.join(name), data).unwrap();
    }
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Runs a command expected to fail; returns (exit code, stderr).
fn fails(env: &Env, args: &[&str]) -> (i32, String) {
    let out = env.run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn retention(env: &Env, run: &str) -> serde_json::Value {
    json(&env.ok(&["retain", run, "--json"]))
}

#[test]
fn retain_and_hold_through_the_cli() {
    let env = Env::with_clock(T0);
    write_tree(
        &env.path("src"),
        &[("a", b"alpha"), ("b", &random(1, 300_000))],
    );
    env.ingest(&env.path("src"), "lab/r1");
    let r = retention(&env, "lab/r1");
    assert_eq!(r["retain"], serde_json::Value::Null);
    assert_eq!(r["eligible"], false);

    // Invalid values: a clear error that says what is accepted, and nothing changes.
    for bad in [
        "banana",
        "-3d",
        "0s",
        "2020-01-01",
        "3000-01-01",
        "1000y",
        "12 parsecs",
    ] {
        let (code, err) = fails(&env, &["retain", "lab/r1", bad]);
        assert_eq!(code, 7, "{bad}: {err}");
        assert!(err.contains("accepted"), "{bad}: {err}");
    }
    assert_eq!(retention(&env, "lab/r1")["retain"], serde_json::Value::Null);

    // First value as given; extend allowed; shorten refused with the current retain-until.
    env.ok(&["retain", "lab/r1", "90d"]);
    let r = retention(&env, "lab/r1");
    assert_eq!(r["retain"], "90d");
    assert_eq!(r["retain_until"], "2027-03-01T00:00:00Z");
    let (code, err) = fails(&env, &["retain", "lab/r1", "30d"]);
    assert_eq!(code, 10, "{err}");
    assert!(
        err.contains("only be extended") && err.contains("2027-03-01T00:00:00Z"),
        "{err}"
    );
    env.ok(&["retain", "lab/r1", "2027-06-01"]);
    assert_eq!(
        retention(&env, "lab/r1")["retain_until"],
        "2027-06-01T00:00:00Z"
    );
    // The operator override needs a reason and is recorded with it.
    let (code, _) = fails(&env, &["retain", "lab/r1", "10d", "--override"]);
    assert_eq!(code, 7);
    env.ok(&[
        "retain",
        "lab/r1",
        "10d",
        "--override",
        "--reason",
        "ticket OPS-7",
    ]);
    assert_eq!(
        retention(&env, "lab/r1")["retain_until"],
        "2026-12-11T00:00:00Z"
    );

    // Holds.
    let (code, err) = fails(&env, &["hold", "add", "lab/r1", "bad name"]);
    assert_eq!(code, 7, "{err}");
    env.ok(&["hold", "add", "lab/r1", "legal", "--reason", "case 9"]);
    let holds = json(&env.ok(&["hold", "ls", "lab/r1", "--json"]));
    assert_eq!(holds[0]["name"], "legal");
    assert_eq!(holds[0]["reason"], "case 9");
    env.set_time("2027-01-01T00:00:00Z");
    assert_eq!(
        json(&env.ok(&["runs", "--expired", "--json"])),
        serde_json::json!([])
    );
    let (code, _) = fails(&env, &["hold", "rm", "lab/r1", "other"]);
    assert_eq!(code, 3);
    env.ok(&["hold", "rm", "lab/r1", "legal"]);
    let expired = json(&env.ok(&["runs", "--expired", "--json"]));
    assert_eq!(expired[0]["run"], "r1");

    // Namespace defaults apply to runs created after them.
    env.ok(&["retain", "lab", "7d"]);
    env.ingest(&env.path("src"), "lab/r2");
    assert_eq!(retention(&env, "lab/r2")["retain"], "7d");
    env.ok(&["retain", "lab", "--clear"]);
    env.ingest(&env.path("src"), "lab/r3");
    assert_eq!(retention(&env, "lab/r3")["retain"], serde_json::Value::Null);
    // A default set before a namespace's first run makes the namespace; clearing the default
    // of a namespace that does not exist is still an error.
    env.ok(&["retain", "fresh", "30d"]);
    assert_eq!(
        json(&env.ok(&["retain", "fresh", "--json"]))["default_retain"],
        "30d"
    );
    env.ingest(&env.path("src"), "fresh/r1");
    assert_eq!(retention(&env, "fresh/r1")["retain"], "30d");
    assert_eq!(fails(&env, &["retain", "never", "--clear"]).0, 3);
    assert_eq!(fails(&env, &["retain", ".hidden", "30d"]).0, 7);

    // gc: the dry run says what the real one does.
    let dry = json(&env.ok(&["gc", "--dry-run", "--grace", "0s", "--json"]));
    assert_eq!(dry["runs_expired"], serde_json::json!(["lab/r1"]));
    assert!(
        env.run_info("lab/r1").is_some(),
        "a dry run changes nothing"
    );
    let real = json(&env.ok(&["gc", "--grace", "0s", "--json"]));
    assert_eq!(real["runs_expired"], dry["runs_expired"]);
    assert_eq!(real["chunks_swept"], dry["chunks_swept"]);
    assert!(env.run_info("lab/r1").is_none());
    let deleted = json(&env.ok(&["runs", "--deleted", "--json"]));
    assert_eq!(deleted[0]["run"], "r1");
    assert!(deleted[0]["manifest"].is_string());
    env.ok(&["verify"]);
    // r2 shares every chunk with r1: nothing of it was lost.
    env.ok(&["export", "lab/r2", env.path("out").to_str().unwrap()]);
    assert_eq!(fs::read(env.path("out/b")).unwrap(), random(1, 300_000));
    let text = env.ok(&["gc", "--grace", "0s"]);
    assert!(text.contains("0 runs expired"), "{text}");
}

fn manifest_chunks(env: &Env, run: &str) -> BTreeSet<String> {
    let m = json(&env.ok(&["manifest", run, "--json"]));
    let mut out = BTreeSet::new();
    for e in m["entries"].as_array().unwrap() {
        for c in e["chunks"].as_array().into_iter().flatten() {
            out.insert(c[0].as_str().unwrap().to_owned());
        }
    }
    out
}

/// Runs `a` (half shared with `keep`) and `b` (nothing shared) expire; `keep` stays.
fn crash_scenario(env: &Env) -> Vec<u8> {
    let shared = random(10, 700_000);
    let mut keep_data = shared.clone();
    keep_data.extend(random(12, 200_000));
    let mut a_data = shared;
    a_data.extend(random(11, 900_000));
    write_tree(&env.path("a"), &[("data", &a_data)]);
    write_tree(&env.path("b"), &[("data", &random(13, 600_000))]);
    write_tree(&env.path("keep"), &[("data", &keep_data)]);
    env.ok(&[
        "init",
        "--chunk-min",
        "4KiB",
        "--chunk-avg",
        "16KiB",
        "--chunk-max",
        "64KiB",
    ]);
    for r in ["a", "b", "keep"] {
        env.ingest(&env.path(r), &format!("ns/{r}"));
    }
    env.ok(&["retain", "ns/a", "1d"]);
    env.ok(&["retain", "ns/b", "1d"]);
    env.ok(&["retain", "ns/keep", "1y"]);
    keep_data
}

#[test]
fn gc_killed_at_every_phase_leaves_a_store_that_verifies_and_the_next_gc_finishes() {
    for &point in artifactfs_core::gc::FAULT_POINTS {
        let env = Env::with_clock(T0);
        let keep = crash_scenario(&env);
        env.set_time("2026-12-05T00:00:00Z");
        let out = env
            .cmd(&["gc", "--grace", "0s", "--compact-below", "1.0"])
            .env("ARTIFACTFS_FAULT_POINT", point)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("fault point {point}")),
            "{point}: gc should have died there ({:?}): {err}",
            out.status
        );
        env.ok(&["verify"]);
        env.ok(&["gc", "--grace", "0s", "--compact-below", "1.0"]);
        env.ok(&["verify"]);
        let runs: Vec<String> = json(&env.ok(&["runs", "--json"]))
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["run"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(runs, ["keep"], "{point}");
        let stats = env.stats();
        assert_eq!(
            stats["chunks"].as_u64().unwrap() as usize,
            manifest_chunks(&env, "ns/keep").len(),
            "{point}: only the live run's chunks remain"
        );
        let dest = env.path("out");
        env.ok(&["export", "ns/keep", dest.to_str().unwrap()]);
        assert_eq!(fs::read(dest.join("data")).unwrap(), keep, "{point}");
        // Nothing is left behind in the object store either.
        let objects = walk(&env.store().join("objects"));
        let packs = objects.iter().filter(|p| p.contains("/packs/")).count();
        assert_eq!(
            packs as u64,
            stats["packs"].as_u64().unwrap(),
            "{point}: {objects:?}"
        );
        let manifests = objects.iter().filter(|p| p.contains("/manifests/")).count();
        assert_eq!(manifests, 1, "{point}: {objects:?}");
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// gc rewrites a pack only when that reclaims something: a small pack whose every chunk is
/// live stays as it is, run after run; once some of its chunks are dead, it is compacted.
#[test]
fn gc_leaves_a_small_pack_of_live_chunks_alone_and_compacts_it_once_some_die() {
    let env = Env::with_clock(T0);
    write_tree(&env.path("a"), &[("small", &random(31, 3_000))]);
    write_tree(
        &env.path("b"),
        &[("small", &random(31, 3_000)), ("other", &random(32, 3_000))],
    );
    env.ingest(&env.path("a"), "ns/a");
    let packs = walk(&env.store().join("objects/packs"));
    for _ in 0..2 {
        let r = json(&env.ok(&["gc", "--grace", "0s", "--json"]));
        assert_eq!(r["packs_rewritten"], 0, "{r}");
        assert_eq!(walk(&env.store().join("objects/packs")), packs);
    }
    // ns/b's pack holds `other` and nothing of ns/a (dedup); once ns/b expires, its pack is
    // dead and goes, and ns/a's stays whole.
    env.ingest(&env.path("b"), "ns/b");
    env.ok(&["retain", "ns/b", "1d"]);
    env.set_time("2026-12-10T00:00:00Z");
    let r = json(&env.ok(&["gc", "--grace", "0s", "--json"]));
    assert_eq!(r["runs_expired"], serde_json::json!(["ns/b"]), "{r}");
    assert_eq!(r["packs_rewritten"], 0, "{r}");
    assert_eq!(walk(&env.store().join("objects/packs")), packs);
    // ns/c's pack holds `keep` and `drop`; ns/d names `keep` only. Once ns/c expires, its
    // pack has a dead chunk and is compacted; ns/d reads whole.
    write_tree(
        &env.path("c"),
        &[("keep", &random(33, 3_000)), ("drop", &random(34, 3_000))],
    );
    write_tree(&env.path("d"), &[("keep", &random(33, 3_000))]);
    env.ingest(&env.path("c"), "ns/c");
    env.ingest(&env.path("d"), "ns/d");
    env.ok(&["retain", "ns/c", "1d"]);
    env.set_time("2026-12-20T00:00:00Z");
    let r = json(&env.ok(&["gc", "--grace", "0s", "--compact-below", "0.9", "--json"]));
    assert_eq!(r["runs_expired"], serde_json::json!(["ns/c"]), "{r}");
    assert_eq!(r["packs_rewritten"], 1, "{r}");
    env.ok(&["verify"]);
    assert_eq!(env.run(&["cat", "ns/d/keep"]).stdout, random(33, 3_000));
}

#[test]
fn gc_over_an_index_older_than_the_objects_deletes_none_of_them() {
    let env = Env::with_clock(T0);
    write_tree(&env.path("a"), &[("data", &random(21, 500_000))]);
    write_tree(&env.path("b"), &[("data", &random(22, 500_000))]);
    env.ingest(&env.path("a"), "ns/a");
    // A copy of the index as it is now (the WAL folded in first) ...
    drop(artifactfs_core::Store::open(&env.store()).unwrap());
    let index = env.store().join("index.sqlite");
    fs::copy(&index, env.path("index.backup")).unwrap();
    // ... restored after another run was sealed.
    env.ingest(&env.path("b"), "ns/b");
    drop(artifactfs_core::Store::open(&env.store()).unwrap());
    fs::copy(env.path("index.backup"), &index).unwrap();
    assert!(!env.ok(&["runs"]).contains("ns/b"));
    // gc must not take the objects the index does not know for garbage: ns/b's manifest and
    // packs are kept, and the report says why.
    let r = json(&env.ok(&["gc", "--json"]));
    assert_eq!(r["unknown_manifests_kept"], 1, "{r}");
    assert_eq!(r["orphan_objects_deleted"], 0, "{r}");
    let text = env.ok(&["gc"]);
    assert!(text.contains("index rebuild"), "{text}");
    // A rebuild brings ns/b back whole; the next gc has nothing unknown left.
    env.ok(&["index", "rebuild"]);
    env.ok(&["verify"]);
    env.ok(&["export", "ns/b", env.path("out").to_str().unwrap()]);
    assert_eq!(
        fs::read(env.path("out/data")).unwrap(),
        fs::read(env.path("b/data")).unwrap()
    );
    assert_eq!(
        json(&env.ok(&["gc", "--json"]))["unknown_manifests_kept"],
        0
    );
}

#[test]
fn retention_holds_and_gc_through_the_mount() {
    let env = Env::with_clock(T0);
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let ns = m.p("lab");
    fs::create_dir(&ns).unwrap();
    // A namespace default, for runs made after it.
    xattr::set(&ns, "user.retain", b"30d").unwrap();
    assert_eq!(
        errno(xattr::set(&ns, "user.retain", b"2030-01-01")),
        nix::libc::EINVAL
    );
    assert_eq!(
        errno(xattr::set(&ns, "user.hold.x", b"")),
        nix::libc::ENOTSUP
    );
    assert_eq!(
        xattr::get(&ns, "user.retain").unwrap().as_deref(),
        Some(&b"30d"[..])
    );
    let run = m.p("lab/r1");
    fs::create_dir(&run).unwrap();
    fs::File::create(run.join("out.txt"))
        .unwrap()
        .write_all(b"result")
        .unwrap();
    assert_eq!(
        xattr::get(&run, "user.retain").unwrap().as_deref(),
        Some(&b"30d"[..])
    );
    // Shorter than the default: refused; bad values: EINVAL; longer: fine.
    assert_eq!(
        errno(xattr::set(&run, "user.retain", b"10d")),
        nix::libc::EPERM
    );
    for bad in [&b"banana"[..], b"-1d", b"\xff\xfe", &[b'9'; 2000]] {
        assert_eq!(
            errno(xattr::set(&run, "user.retain", bad)),
            nix::libc::EINVAL
        );
    }
    xattr::set(&run, "user.retain", b"60d").unwrap();
    assert_eq!(errno(xattr::remove(&run, "user.retain")), nix::libc::EPERM);
    assert!(
        xattr::get(&run, "user.artifactfs.retain_until")
            .unwrap()
            .is_none(),
        "unknown until the seal"
    );
    // Open runs do not list retention (rsync -X into them must not try to remove it).
    let listed: Vec<String> = xattr::list(&run)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    assert!(!listed.iter().any(|n| n == "user.retain"), "{listed:?}");
    // On a plain file of the run they are attributes like any other: kept, listed, sealed.
    let plain = run.join("plain.txt");
    fs::write(&plain, b"x").unwrap();
    xattr::set(&plain, "user.retain", b"not a retention").unwrap();
    xattr::set(&plain, "user.hold.x", b"nor a hold").unwrap();
    let names = |p: &std::path::Path| -> Vec<String> {
        xattr::list(p)
            .unwrap()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    };
    for n in ["user.retain", "user.hold.x"] {
        assert!(
            names(&plain).iter().any(|l| l == n),
            "{n} in {:?}",
            names(&plain)
        );
    }
    seal(&run);
    for n in ["user.retain", "user.hold.x"] {
        assert!(
            names(&plain).iter().any(|l| l == n),
            "{n} in {:?}",
            names(&plain)
        );
    }
    assert_eq!(
        xattr::get(&plain, "user.retain").unwrap().as_deref(),
        Some(&b"not a retention"[..])
    );
    assert_eq!(state(&run), "sealed");
    assert_eq!(
        xattr::get(&run, "user.artifactfs.retain_until")
            .unwrap()
            .as_deref(),
        Some(&b"2027-01-30T00:00:00Z"[..])
    );
    // Holds on the sealed run.
    xattr::set(&run, "user.hold.legal", b"case 12").unwrap();
    assert_eq!(
        errno(xattr::set(&run, "user.hold.", b"x")),
        nix::libc::EINVAL
    );
    assert_eq!(
        errno(xattr::set(&run, "user.hold.a/b", b"x")),
        nix::libc::EINVAL
    );
    assert_eq!(
        errno(xattr::remove(&run, "user.hold.nope")),
        nix::libc::ENODATA
    );
    let listed: Vec<String> = xattr::list(&run)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    for n in [
        "user.retain",
        "user.hold.legal",
        "user.artifactfs.retain_until",
    ] {
        assert!(listed.iter().any(|l| l == n), "{n} in {listed:?}");
    }
    let info = json(&fs::read_to_string(m.p(".artifactfs/retention/lab/r1")).unwrap());
    assert_eq!(info["retain"], "60d");
    assert_eq!(info["holds"][0]["name"], "legal");
    assert_eq!(info["eligible"], false);

    // Time passes: held, so not expired; released, so expired.
    env.set_time("2027-03-01T00:00:00Z");
    assert_eq!(fs::read_to_string(m.p(".artifactfs/expired")).unwrap(), "");
    xattr::remove(&run, "user.hold.legal").unwrap();
    let expired = fs::read_to_string(m.p(".artifactfs/expired")).unwrap();
    assert_eq!(json(expired.lines().next().unwrap())["run"], "r1");

    // The CLI reaches the mount over its control socket for the same verbs.
    let via_socket = json(&env.ok(&["runs", "--expired", "--json"]));
    assert_eq!(via_socket[0]["run"], "r1");
    let dry = json(&env.ok(&["gc", "--dry-run", "--grace", "0s", "--json"]));
    assert_eq!(dry["runs_expired"], serde_json::json!(["lab/r1"]));
    let (code, _) = fails(&env, &["retain", "lab/r1", "1d"]);
    assert_eq!(code, 10, "shortening is refused through the socket too");

    // gc through the control file: a dry run, then a real one.
    assert_eq!(
        errno(fs::write(m.p(".artifactfs/gc"), "sweep everything")),
        nix::libc::EINVAL
    );
    fs::write(m.p(".artifactfs/gc"), "dry-run grace=0s").unwrap();
    let rep = json(&fs::read_to_string(m.p(".artifactfs/gc")).unwrap());
    assert_eq!(rep["dry_run"], true);
    assert_eq!(rep["runs_expired"], serde_json::json!(["lab/r1"]));
    assert!(run.exists());
    fs::write(m.p(".artifactfs/gc"), "run grace=0s").unwrap();
    let rep = json(&fs::read_to_string(m.p(".artifactfs/gc")).unwrap());
    assert_eq!(rep["dry_run"], false);
    assert_eq!(rep["runs_expired"], serde_json::json!(["lab/r1"]));
    let names: Vec<String> = fs::read_dir(&ns)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.is_empty(),
        "the deleted run left the mount: {names:?}"
    );
    // The kernel had the run's name cached (looked up above, kept 60 s): it was told to forget.
    assert!(!run.exists(), "the kernel still shows the deleted run");
    let events = fs::read_to_string(m.p(".artifactfs/events")).unwrap();
    let kinds: Vec<String> = events
        .lines()
        .map(|l| json(l)["kind"].as_str().unwrap().to_owned())
        .collect();
    for k in [
        "run.retention",
        "run.hold_placed",
        "run.hold_removed",
        "run.expired",
        "gc.finished",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
    m.unmount();
    env.ok(&["verify"]);
}

/// An untiered store keeps lifecycle records in its own object store (`objects/lifecycle/`),
/// so a local `index rebuild` gives back retention, holds and namespace defaults; gc's
/// deletion of a run removes its record, and the run stays deleted.
#[test]
fn retention_and_holds_of_an_untiered_store_survive_a_local_rebuild() {
    let env = Env::with_clock(T0);
    write_tree(
        &env.path("src"),
        &[("a", b"alpha"), ("b", &random(2, 70_000))],
    );
    for run in ["lab/keep", "lab/gone", "lab/plain"] {
        env.ingest(&env.path("src"), run);
    }
    env.ok(&["retain", "lab/keep", "1y"]);
    env.ok(&["hold", "add", "lab/keep", "legal", "--reason", "case 9"]);
    env.ok(&["hold", "add", "lab/keep", "tmp"]);
    env.ok(&["hold", "rm", "lab/keep", "tmp"]);
    env.ok(&["retain", "lab/gone", "1d"]);
    env.ok(&["retain", "lab", "90d"]);
    let records = env.store().join("objects/lifecycle/lab");
    let listed = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    assert_eq!(
        listed(&records),
        [".namespace.json", "gone.json", "keep.json"],
        "written as the changes are made; none for a run without retention or holds"
    );
    let state = |env: &Env| {
        (
            retention(env, "lab/keep"),
            retention(env, "lab/gone"),
            retention(env, "lab/plain"),
            json(&env.ok(&["hold", "ls", "lab/keep", "--json"])),
            json(&env.ok(&["retain", "lab", "--json"])),
        )
    };
    let before = state(&env);
    assert_eq!(before.0["retain"], "1y");
    assert_eq!(before.3.as_array().unwrap().len(), 1, "{:?}", before.3);
    assert_eq!(before.4["default_retain"], "90d");

    let remove_index = |env: &Env| {
        for e in fs::read_dir(env.store()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("index.sqlite") {
                fs::remove_file(e.path()).unwrap();
            }
        }
    };
    remove_index(&env);
    let report = json(&env.ok(&["index", "rebuild", "--json"]));
    assert_eq!(report["runs"], 3, "{report}");
    assert_eq!(report["lifecycle_restored"], 3, "{report}");
    assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
    assert_eq!(
        state(&env),
        before,
        "retention, holds and defaults as before"
    );
    // The restored retention is enforced.
    let (code, _) = fails(&env, &["retain", "lab/keep", "30d"]);
    assert_eq!(code, 10);

    // gc deletes lab/gone and its record; the next rebuild does not bring either back.
    env.set_time("2026-12-05T00:00:00Z");
    let gc = json(&env.ok(&["gc", "--grace", "0s", "--json"]));
    assert_eq!(gc["runs_expired"], serde_json::json!(["lab/gone"]), "{gc}");
    assert_eq!(listed(&records), [".namespace.json", "keep.json"]);
    remove_index(&env);
    let report = json(&env.ok(&["index", "rebuild", "--json"]));
    assert_eq!(
        (
            report["runs"].as_u64(),
            report["lifecycle_restored"].as_u64()
        ),
        (Some(2), Some(2)),
        "{report}"
    );
    assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
    assert!(env.run_info("lab/gone").is_none());
    assert_eq!(retention(&env, "lab/keep"), before.0);
    assert_eq!(
        json(&env.ok(&["hold", "ls", "lab/keep", "--json"])),
        before.3
    );
    assert_eq!(json(&env.ok(&["retain", "lab", "--json"])), before.4);
}

/// A run directory's `user.retain` that the rules refuse (shorter than the default the run
/// got) never costs its `user.hold.*`: a held run is not deleted.
#[test]
fn a_refused_retention_on_a_run_directory_keeps_its_holds() {
    let env = Env::with_clock(T0);
    env.ok(&["init", "--default-retention", "30d"]);
    let src = env.path("src");
    write_tree(&src, &[("a", b"alpha")]);
    xattr::set(&src, "user.retain", b"7d").unwrap();
    xattr::set(&src, "user.hold.legal", b"case 17").unwrap();
    env.ingest(&src, "lab/held");
    let holds = env.ok(&["hold", "ls", "lab/held"]);
    assert!(
        holds.contains("legal") && holds.contains("case 17"),
        "{holds}"
    );
    assert_eq!(retention(&env, "lab/held")["retain"], "30d");
    env.set_time("2027-01-15T00:00:00Z");
    let expired = env.ok(&["runs", "--expired"]);
    assert!(!expired.contains("lab/held"), "{expired}");
}
