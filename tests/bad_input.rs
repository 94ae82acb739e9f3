//! Bad input gets a clear error and changes nothing: unreadable files, bad run names, sealed
//! run names, bad --meta, missing stores, bad init options.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::Env;

fn runs(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["runs", "--json"])).unwrap()
}

#[test]
fn unreadable_file_names_the_path_and_seals_nothing() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), "readable").unwrap();
    fs::write(src.join("sub/secret.bin"), "root only").unwrap();
    fs::set_permissions(
        src.join("sub/secret.bin"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // The store and the tree are usable by `nobody`, except the one root-only file.
    env.ok(&["init"]);
    Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(env.store())
        .status()
        .unwrap();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let ingest_as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(assert_cmd::cargo::cargo_bin("artifactfs"))
            .arg("--store")
            .arg(env.store())
            .args(["ingest", src.to_str().unwrap(), "lab/run-1"])
            .output()
            .unwrap()
    };
    let out = ingest_as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ingest as nobody succeeded: {err}");
    assert!(
        err.contains("sub/secret.bin"),
        "error must name the path: {err}"
    );
    assert_eq!(
        err.matches("ermission denied").count(),
        1,
        "the reason, once: {err}"
    );
    // Nothing was sealed, and a readable tree ingests afterwards.
    assert_eq!(runs(&env).as_array().unwrap().len(), 0);
    fs::set_permissions(
        src.join("sub/secret.bin"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = ingest_as_nobody();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(runs(&env).as_array().unwrap().len(), 1);
}

#[test]
fn bad_run_names_are_refused_with_exit_7() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();
    env.ok(&["init"]);
    for bad in [
        "noslash",
        "ns/",
        "/run",
        "ns//run",
        "ns/run/extra",
        "../run",
        "ns/..",
        "ns/.",
        ".hidden/run",
        "ns/run\u{1}",
        "ns/ru\nn",
        "",
    ] {
        let out = env.run(&["ingest", src.to_str().unwrap(), bad]);
        assert_eq!(
            out.status.code(),
            Some(7),
            "{bad:?} was not refused as invalid"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid"), "{bad:?}: {err}");
    }
    let long = format!("ns/{}", "r".repeat(256));
    assert_eq!(
        env.run(&["ingest", src.to_str().unwrap(), &long])
            .status
            .code(),
        Some(7)
    );
    assert_eq!(runs(&env).as_array().unwrap().len(), 0);
    for bad in ["ns/run/../x", "ns/run//x"] {
        assert_eq!(env.run(&["cat", bad]).status.code(), Some(7), "{bad}");
    }
}

#[test]
fn sealed_run_names_cannot_be_reused() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "one").unwrap();
    let first = env.ingest(&src, "lab/run-1");
    fs::write(src.join("f"), "two").unwrap();
    let out = env.run(&["ingest", src.to_str().unwrap(), "lab/run-1"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // The sealed run is unchanged.
    assert_eq!(runs(&env)[0]["manifest"], first["manifest"]);
    assert_eq!(
        env.cmd(&["cat", "lab/run-1/f"]).output().unwrap().stdout,
        b"one"
    );
}

#[test]
fn other_bad_input() {
    let env = Env::new();
    // Reading a store that does not exist: a clear error, and nothing is created.
    let out = env.run(&["runs"]);
    assert_eq!(out.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an artifactfs store"));
    assert!(!env.store().exists());
    // Bad init options.
    for args in [
        &["init", "--chunk-min", "1MiB", "--chunk-avg", "64KiB"][..],
        &["init", "--compression-level", "42"],
        &["init", "--pack-size", "12"],
        &["init", "--chunk-avg", "banana"],
    ] {
        let out = env.run(args);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!env.store().join("config.toml").exists());
    }
    env.ok(&["init"]);
    assert_eq!(env.run(&["init"]).status.code(), Some(6));
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for meta in ["novalue", "=v", "a b=c"] {
        let out = env.run(&["ingest", src.to_str().unwrap(), "lab/r", "--meta", meta]);
        assert_eq!(out.status.code(), Some(7), "--meta {meta:?}");
    }
    // Not a directory, and a missing source.
    fs::write(env.path("file"), "x").unwrap();
    assert_eq!(
        env.run(&["ingest", env.path("file").to_str().unwrap(), "lab/r"])
            .status
            .code(),
        Some(7)
    );
    let out = env.run(&["ingest", env.path("nope").to_str().unwrap(), "lab/r"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("source directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown runs and paths.
    assert_eq!(env.run(&["cat", "lab/nope/f"]).status.code(), Some(3));
    assert_eq!(env.run(&["manifest", "lab/nope"]).status.code(), Some(3));
    assert_eq!(
        env.run(&["export", "lab/nope", env.path("x").to_str().unwrap()])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(runs(&env).as_array().unwrap().len(), 0);
    // Export into a non-empty directory is refused.
    fs::write(src.join("f"), "x").unwrap();
    env.ingest(&src, "lab/r");
    let out = env.run(&["export", "lab/r", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(fs::read(src.join("f")).unwrap(), b"x");
    // A store does not ingest itself: inside the source tree it is left out, and as the
    // source it is refused.
    env.ingest(env.dir.path(), "lab/all");
    let listed = env.ok(&["ls", "lab/all"]);
    assert!(
        listed.contains("src") && !listed.contains("store"),
        "{listed}"
    );
    env.ok(&["verify"]);
    let out = env.run(&["ingest", env.store().to_str().unwrap(), "lab/self"]);
    assert_eq!(out.status.code(), Some(7));
}

/// A file rewritten while `ingest` reads it is not recorded as a mix of two versions: the
/// ingest fails with the busy status (9) naming it, seals nothing, and succeeds once the file
/// is left alone.
#[test]
fn a_file_changed_while_it_is_read_fails_the_ingest_as_busy() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let big = src.join("big.bin");
    fs::write(&big, common::bytes(96 << 20, 5)).unwrap();
    fs::write(src.join("small.txt"), b"small").unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, big) = (stop.clone(), big.clone());
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&[i as u8], (i * 4099) % (96 << 20)).unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let out = env.run(&["ingest", src.to_str().unwrap(), "lab/torn"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(
        err.contains("big.bin") && err.contains("changed while it was read"),
        "{err}"
    );
    assert_eq!(runs(&env).as_array().unwrap().len(), 0);
    env.ok(&["ingest", src.to_str().unwrap(), "lab/torn"]);
    let outdir = env.path("out");
    env.ok(&["export", "lab/torn", outdir.to_str().unwrap()]);
    assert_eq!(
        fs::read(outdir.join("big.bin")).unwrap(),
        fs::read(&big).unwrap()
    );
    env.ok(&["verify"]);
}
