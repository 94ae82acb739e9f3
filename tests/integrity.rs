//! Damage is found and reported, never served: a flipped byte in a pack, a deleted pack, a
//! damaged manifest and a truncated index each give a clear error naming what is affected; a
//! truncated index is rebuilt from the packs, and a rebuild over a truncated pack keeps every
//! run and names what it lost.

mod common;

use std::fs;

use common::{Env, bytes, chunk_in_pack, flip_byte};

/// A store with two runs sharing nothing: `lab/a` (file `data/a.bin`) and `lab/b`.
fn setup() -> Env {
    with_two_runs(Env::new())
}

/// `lab/a` and `lab/b` of [`setup`] ingested into `env`, from `src-a` and `src-b`.
fn with_two_runs(env: Env) -> Env {
    for (run, seed) in [("a", 1u64), ("b", 2)] {
        let src = env.path(&format!("src-{run}"));
        fs::create_dir_all(src.join("data")).unwrap();
        fs::write(src.join(format!("data/{run}.bin")), bytes(3 << 20, seed)).unwrap();
        fs::write(src.join("notes.txt"), format!("run {run}\n")).unwrap();
        env.ingest(&src, &format!("lab/{run}"));
    }
    env
}

fn assert_damage_named(env: &Env, run: &str, file: &str) {
    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4), "verify must exit 4 on damage");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{run}/{file}")),
        "verify output names the file:\n{text}"
    );
    // And sums the damage up by file.
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("  {run}/{file}: ")) && l.contains("damaged object")),
        "verify sums the damage up by file:\n{text}"
    );
    assert!(text.contains(run), "{text}");
    // The undamaged run still verifies on its own.
    let other = if run == "lab/a" { "lab/b" } else { "lab/a" };
    assert!(env.run(&["verify", other]).status.success());
    // JSON says the same.
    let out = env.run(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["damage"].as_array().unwrap().is_empty());
}

#[test]
fn flipped_byte_in_a_pack_is_reported_and_never_served() {
    let env = setup();
    let (pack, offset) = chunk_in_pack(&env, "lab/a/data/a.bin", 0);
    // Inside the first chunk's stored bytes.
    flip_byte(&pack, offset + 92);
    assert_damage_named(&env, "lab/a", "data/a.bin");
    let out = env.run(&["cat", "lab/a/data/a.bin"]);
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt") && err.contains("data/a.bin"),
        "{err}"
    );
    // Not one byte of the damaged chunk reached stdout.
    assert!(
        out.stdout.len() < 100,
        "cat wrote {} bytes",
        out.stdout.len()
    );
    // Export refuses too and says why, and leaves no partial file under the file's name.
    let out = env.run(&["export", "lab/a", env.path("out").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(!env.path("out/data/a.bin").exists());
}

#[test]
fn a_flipped_chunk_is_recorded_lost_and_storing_its_bytes_again_repairs_the_run() {
    let env = setup();
    let (pack, offset) = chunk_in_pack(&env, "lab/a/data/a.bin", 0);
    flip_byte(&pack, offset + 92);
    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 damaged chunks recorded as lost"),
        "verify records what it found damaged:\n{text}"
    );
    assert_eq!(env.stats()["lost_chunks"], 1);
    // Found again by the next verify, as lost, still naming the file.
    let out = env.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damage = v["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 1, "{v}");
    assert!(
        damage[0]["problem"].as_str().unwrap().starts_with("lost:")
            && damage[0]["affects"][0] == "lab/a/data/a.bin",
        "{v}"
    );
    assert_eq!(v["recorded_lost"], 0, "nothing new was found: {v}");
    assert_eq!(env.run(&["cat", "lab/a/data/a.bin"]).status.code(), Some(4));
    assert!(env.run(&["verify", "lab/b"]).status.success());

    // The same bytes, ingested as another run, are stored anew instead of deduplicated
    // against the damaged copy: both runs read and verify.
    env.ingest(&env.path("src-a"), "lab/a-again");
    assert!(env.ok(&["verify"]).contains("ok"));
    assert_eq!(env.stats()["lost_chunks"], 0);
    for run in ["lab/a", "lab/a-again"] {
        assert_eq!(
            env.run(&["cat", &format!("{run}/data/a.bin")]).stdout,
            bytes(3 << 20, 1)
        );
    }
    // The damaged copy is still in its pack: a rebuild from the packs keeps the whole copy.
    assert!(pack.exists());
    let out = env.run(&["index", "rebuild"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.ok(&["verify"]).contains("ok"));
    assert_eq!(
        env.run(&["cat", "lab/a/data/a.bin"]).stdout,
        bytes(3 << 20, 1)
    );
    env.ok(&["gc"]);
    assert!(env.ok(&["verify"]).contains("ok"));
}

#[test]
fn a_damaged_chunk_read_through_the_mount_is_eio_never_wrong_bytes() {
    use std::io::Read;

    let env = setup();
    // The second chunk: a reader gets the first one, then the error.
    let (pack, offset) = chunk_in_pack(&env, "lab/a/data/a.bin", 1);
    flip_byte(&pack, offset + 92);
    let m = common::mount::Mount::start(&env, &env.path("mnt"), &[]);
    let want = bytes(3 << 20, 1);
    let mut f = fs::File::open(m.p("lab/a/data/a.bin")).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 128 << 10];
    let err = loop {
        match f.read(&mut buf) {
            Ok(0) => panic!("read the whole damaged file ({} bytes)", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(
        got.len() < want.len() && got[..] == want[..got.len()],
        "what was read before the error ({} bytes) is the file's own prefix",
        got.len()
    );
    // Every other file reads; the log says which file and chunk failed.
    assert_eq!(
        fs::read(m.p("lab/b/data/b.bin")).unwrap(),
        bytes(3 << 20, 2)
    );
    assert_eq!(fs::read(m.p("lab/a/notes.txt")).unwrap(), b"run a\n");
    assert!(env.run(&["verify", "lab/b"]).status.success());
    assert_eq!(env.run(&["verify", "lab/a"]).status.code(), Some(4));
    drop(f);
    m.unmount();
}

#[test]
fn deleted_pack_is_reported() {
    let env = setup();
    let (pack, _) = chunk_in_pack(&env, "lab/b/data/b.bin", 0);
    fs::remove_file(&pack).unwrap();
    assert_damage_named(&env, "lab/b", "data/b.bin");
    let out = env.run(&["cat", "lab/b/data/b.bin"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing") && err.contains("data/b.bin"),
        "{err}"
    );
}

#[test]
fn damaged_manifest_is_reported() {
    let env = setup();
    let mdir = env.store().join("objects/manifests");
    let mut manifests = Vec::new();
    for d in fs::read_dir(&mdir).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            manifests.push(f.unwrap().path());
        }
    }
    assert_eq!(manifests.len(), 2);
    for m in &manifests {
        let len = fs::metadata(m).unwrap().len() as usize;
        flip_byte(m, len / 2);
    }
    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4));
    let out = env.run(&["manifest", "lab/a"]);
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn truncated_index_is_a_clear_error_not_a_panic() {
    for keep in [0u64, 4096, 100] {
        let env = setup();
        let index = env.store().join("index.sqlite");
        // Fold the WAL in first so the truncation hits real pages.
        drop(artifactfs_core::Store::open(&env.store()).unwrap());
        let f = fs::OpenOptions::new().write(true).open(&index).unwrap();
        f.set_len(keep).unwrap();
        drop(f);
        let _ = fs::remove_file(env.store().join("index.sqlite-wal"));
        let _ = fs::remove_file(env.store().join("index.sqlite-shm"));
        for args in [
            &["runs"][..],
            &["verify"],
            &["stats"],
            &["cat", "lab/a/notes.txt"],
        ] {
            let out = env.run(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{args:?} succeeded on a truncated index"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(err.contains("index"), "error should name the index: {err}");
        }
        // The index is rebuilt from the packs and manifests, the damaged one kept beside it.
        let out = env.run(&["index", "rebuild"]);
        assert!(
            out.status.success(),
            "index rebuild over a truncated index (keep {keep}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let runs = env.ok(&["runs"]);
        assert!(
            runs.contains("lab/a\tsealed") && runs.contains("lab/b\tsealed"),
            "{runs}"
        );
        env.ok(&["verify"]);
        assert_eq!(env.ok(&["cat", "lab/a/notes.txt"]), "run a\n");
        assert!(
            fs::read_dir(env.store()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("index.sqlite.old-")),
            "the damaged index is kept"
        );
    }
}

#[test]
fn a_rebuild_over_a_truncated_pack_keeps_every_run_and_names_the_damage() {
    let env = with_two_runs(Env::with_clock("2026-12-01T00:00:00Z"));
    let (pack, _) = chunk_in_pack(&env, "lab/b/data/b.bin", 0);
    let len = fs::metadata(&pack).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let out = env.run(&["index", "rebuild"]);
    // Rebuilt, with damage: the status says so, as verify's does.
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains("skipped") && err.contains(name) && err.contains("lab/b"),
        "the rebuild names the pack it could not read and the run it damaged: {err}"
    );
    // The damaged pack is kept aside, where gc does not delete it as an orphan.
    assert!(!pack.exists());
    let kept = env
        .store()
        .join("quarantine")
        .join(pack.strip_prefix(env.store().join("objects")).unwrap());
    assert_eq!(fs::metadata(&kept).unwrap().len(), len / 2);
    // Both runs are back: the manifests are whole, only some chunks are gone.
    let runs = env.ok(&["runs"]);
    assert!(
        runs.contains("lab/a\tsealed") && runs.contains("lab/b\tsealed"),
        "{runs}"
    );
    assert_damage_named(&env, "lab/b", "data/b.bin");
    let lost = env.stats()["lost_chunks"].as_u64().unwrap();
    assert!(lost > 0, "stats count the lost chunks");
    let m = common::mount::Mount::start(&env, &env.path("mnt"), &[]);
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(m.p(".artifactfs/status")).unwrap()).unwrap();
    assert_eq!(status["lost_chunks"].as_u64(), Some(lost));
    m.unmount();
    let out = env.run(&["cat", "lab/b/data/b.bin"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        env.run(&["cat", "lab/a/data/a.bin"]).stdout,
        bytes(3 << 20, 1)
    );

    // The same bytes stored again (by another run) repair the damaged run; deleting that run
    // later keeps them, since the damaged run's references were kept while its chunks were lost.
    env.ingest(&env.path("src-b"), "lab/b-again");
    env.ok(&["retain", "lab/b-again", "1d"]);
    assert!(env.ok(&["verify"]).contains("ok"));
    assert_eq!(env.stats()["lost_chunks"], 0);
    assert_eq!(
        env.run(&["cat", "lab/b/data/b.bin"]).stdout,
        bytes(3 << 20, 2)
    );
    env.set_time("2026-12-03T00:00:00Z");
    env.ok(&["gc"]);
    assert!(env.run_info("lab/b-again").is_none());
    assert!(env.ok(&["verify"]).contains("ok"));
    assert_eq!(
        env.run(&["cat", "lab/b/data/b.bin"]).stdout,
        bytes(3 << 20, 2)
    );
    env.ok(&["gc"]);
    env.ok(&["verify"]);
}

/// The object path of a run's manifest.
fn manifest_file(env: &Env, run: &str) -> std::path::PathBuf {
    let info = env.run_info(run).unwrap();
    let d: artifactfs_core::id::ManifestDigest =
        info["manifest"].as_str().unwrap().parse().unwrap();
    env.store()
        .join("objects")
        .join(artifactfs_core::manifest::manifest_key(&d))
}

#[test]
fn a_rebuild_writes_a_missing_manifest_again_from_the_previous_index_or_names_the_run() {
    let env = with_two_runs(Env::with_clock("2026-12-01T00:00:00Z"));
    // A third run, expired by gc: a tombstone, whose manifest gc deleted.
    fs::create_dir_all(env.path("src-c")).unwrap();
    fs::write(env.path("src-c/c.txt"), "c\n").unwrap();
    env.ingest(&env.path("src-c"), "lab/c");
    env.ok(&["retain", "lab/c", "1d"]);
    env.set_time("2026-12-03T00:00:00Z");
    env.ok(&["gc"]);
    let tombstones = env.ok(&["runs", "--deleted", "--json"]);
    assert!(tombstones.contains("\"c\""), "{tombstones}");

    // lab/a's manifest object is deleted: the previous index's rows give it back, exactly.
    let m = manifest_file(&env, "lab/a");
    let before = fs::read(&m).unwrap();
    fs::remove_file(&m).unwrap();
    let out = env.run(&["index", "rebuild"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("lab/a: manifest") && err.contains("written again from the previous index"),
        "{err}"
    );
    assert_eq!(fs::read(&m).unwrap(), before, "the same manifest object");
    assert!(env.run_info("lab/a").is_some());
    assert!(env.ok(&["verify"]).contains("ok"));
    assert_eq!(
        env.run(&["cat", "lab/a/data/a.bin"]).stdout,
        bytes(3 << 20, 1)
    );
    // The tombstone is taken over too.
    assert_eq!(env.ok(&["runs", "--deleted", "--json"]), tombstones);

    // lab/b's manifest is deleted and the index's rows of it no longer give its digest:
    // the rebuild names the run it could not restore and exits as verify does on damage.
    fs::remove_file(manifest_file(&env, "lab/b")).unwrap();
    let db = rusqlite::Connection::open(env.store().join("index.sqlite")).unwrap();
    let changed = db
        .execute(
            "UPDATE files SET size = size + 1 WHERE path = 'notes.txt'
             AND run = (SELECT id FROM runs WHERE name = 'b' AND state = 'sealed')",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let out = env.run(&["index", "rebuild"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("lab/b: manifest") && err.contains("NOT restored"),
        "{err}"
    );
    assert!(env.run_info("lab/b").is_none());
    assert!(env.run_info("lab/a").is_some());
    assert!(env.ok(&["verify"]).contains("ok"));
}

#[test]
fn a_damaged_run_expires_and_gc_leaves_a_clean_store() {
    let env = with_two_runs(Env::with_clock("2026-12-01T00:00:00Z"));
    let (pack, _) = chunk_in_pack(&env, "lab/b/data/b.bin", 0);
    fs::remove_file(&pack).unwrap();
    assert_eq!(env.run(&["index", "rebuild"]).status.code(), Some(4));
    env.ok(&["retain", "lab/b", "1d"]);
    env.set_time("2026-12-03T00:00:00Z");
    // Expiring the damaged run drops the references its lost chunks kept.
    env.ok(&["gc"]);
    assert!(env.run_info("lab/b").is_none());
    assert!(env.ok(&["verify"]).contains("ok"));
    assert_eq!(
        env.run(&["cat", "lab/a/data/a.bin"]).stdout,
        bytes(3 << 20, 1)
    );
}

#[test]
fn a_command_waits_for_a_store_another_command_holds() {
    let env = setup();
    // Held by a process that takes no commands (as `ingest` or `gc` would).
    let held = artifactfs_core::Store::open(&env.store()).unwrap();
    // Told not to wait: refused at once, exit status 5, naming the holder.
    let out = env.run(&["runs", "--lock-wait", "0"]);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    // Waiting a little: still refused, and it says it waited.
    let out = env.run(&["runs", "--lock-wait", "300ms"]);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "in use by another process (pid {}); waiting up to 300ms",
            std::process::id()
        )),
        "{err}"
    );
    assert!(err.contains("waited 300ms (--lock-wait)"), "{err}");
    // By default it waits: the holder lets go while it waits, and the command runs.
    let child = env
        .std_cmd(&["runs"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    drop(held);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("waiting up to 2m"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("lab/"));
}
