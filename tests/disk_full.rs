//! A full disk gets a clear error and loses nothing: the store sits on a small tmpfs that an
//! ingest or a copy into the mount fills up. What was stored before stays readable and
//! verifies, the failed work leaves no sealed run, and once there is room the same work
//! succeeds.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::mount::{Mount, errno};
use common::{Env, SmallDisk, assert_same_tree, bytes};

/// Exit status of a command that ran out of space on the store's disk.
const EXIT_DISK_FULL: i32 = 11;
const ENOSPC: i32 = 28;
const ENOENT: i32 = 2;

/// A tree of `big` MiB of incompressible bytes in four files, and some small text files.
fn tree(dir: &Path, big: usize, seed: u64) {
    fs::create_dir_all(dir.join("logs")).unwrap();
    for i in 0..4u64 {
        fs::write(
            dir.join(format!("blob-{i}.bin")),
            bytes(big << 20 >> 2, seed + i),
        )
        .unwrap();
    }
    for i in 0..40 {
        fs::write(
            dir.join(format!("logs/{i:02}.log")),
            format!("line {i} of run {seed}\n").repeat(50),
        )
        .unwrap();
    }
}

fn sealed_runs(env: &Env) -> Vec<String> {
    let runs: serde_json::Value = serde_json::from_str(&env.ok(&["runs", "--json"])).unwrap();
    runs.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "sealed")
        .map(|r| {
            format!(
                "{}/{}",
                r["namespace"].as_str().unwrap(),
                r["run"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn ingest_onto_a_full_disk_fails_clearly_and_the_store_stays_whole() {
    let env = Env::new();
    let disk = SmallDisk::mount(&env.store(), "24m");
    env.ok(&["init"]);
    let small = env.path("small");
    tree(&small, 1, 1);
    env.ingest(&small, "lab/small");

    let big = env.path("big");
    tree(&big, 48, 100);
    let out = env.run(&["ingest", big.to_str().unwrap(), "lab/big"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_DISK_FULL), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(env.store().to_str().unwrap()),
        "the error names the store's file: {err}"
    );

    // Still on a full disk: what was stored reads and verifies; the failed run is not sealed.
    assert_eq!(sealed_runs(&env), ["lab/small"]);
    env.ok(&["verify"]);
    let out_dir = env.path("out-small");
    env.ok(&["export", "lab/small", out_dir.to_str().unwrap()]);
    assert_same_tree(&small, &out_dir);

    // With room, the same ingest succeeds and exports bit-exact.
    disk.resize("160m");
    env.ingest(&big, "lab/big");
    env.ok(&["verify"]);
    let out_big = env.path("out-big");
    env.ok(&["export", "lab/big", out_big.to_str().unwrap()]);
    assert_same_tree(&big, &out_big);
    assert_eq!(sealed_runs(&env), ["lab/big", "lab/small"]);
}

/// Writes `data` to a new file, syncs and closes it; the first error, as an errno. A close
/// after a failed sync must not fail with EIO either.
fn write_synced(p: &Path, data: &[u8]) -> Result<(), i32> {
    use std::os::fd::IntoRawFd;
    let mut f = File::create(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let r = f.write_all(data).and_then(|()| f.sync_all());
    let closed = nix::unistd::close(f.into_raw_fd());
    if let Err(e) = closed {
        assert_ne!(e, nix::errno::Errno::EIO, "close of {}", p.display());
    }
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    closed.map_err(|e| e as i32)
}

#[test]
fn a_copy_into_the_mount_that_fills_the_disk_gets_enospc_and_loses_nothing() {
    let env = Env::new();
    let disk = SmallDisk::mount(&env.store(), "32m");
    env.ok(&["init"]);
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    let run = m.p("lab/run-1");
    fs::create_dir_all(&run).unwrap();
    let kept = bytes(200_000, 7);
    write_synced(&run.join("kept.bin"), &kept).unwrap();
    fs::write(run.join("note.txt"), "written before the disk filled\n").unwrap();

    // A file larger than the disk: the producer sees ENOSPC, not EIO. Written front to back,
    // it streams into packs (ADR 0025), and the failed pack's space comes back.
    let big = bytes(48 << 20, 8);
    assert_eq!(write_synced(&run.join("big.bin"), &big), Err(ENOSPC));
    // Written back to front, a file stays in its staging file, which fills the disk.
    let filler = run.join("filler.bin");
    let f = File::create(&filler).unwrap();
    let filled = (0..48u64).rev().find_map(|i| {
        f.write_all_at(&big[(i as usize) << 20..((i + 1) as usize) << 20], i << 20)
            .err()
    });
    assert_eq!(filled.and_then(|e| e.raw_os_error()), Some(ENOSPC));
    drop(f);
    // Small files while the disk is full: their content goes to the index, which cannot grow
    // either; each one succeeds whole, or fails with ENOSPC and leaves no name behind, or (its
    // creation committed before its `fsync` failed, its content journaled by the close after,
    // ADR 0031) fails and is there whole: never torn.
    let mut made = vec![
        "big.bin".to_owned(),
        "filler.bin".to_owned(),
        "kept.bin".to_owned(),
        "note.txt".to_owned(),
    ];
    let mut refused = 0;
    for i in 0..64 {
        let name = format!("s{i:02}.txt");
        let body = format!("small file {i}\n").repeat(40);
        match write_synced(&run.join(&name), body.as_bytes()) {
            Ok(()) => {
                assert_eq!(fs::read(run.join(&name)).unwrap(), body.as_bytes());
                made.push(name);
            }
            Err(e) => {
                assert_eq!(e, ENOSPC, "small file {i}:\n{}", m.log_text());
                match fs::read(run.join(&name)) {
                    Ok(got) => {
                        assert_eq!(got, body.as_bytes(), "{name} is torn");
                        made.push(name);
                    }
                    Err(e) => assert_eq!(e.raw_os_error(), Some(ENOENT), "{name}"),
                }
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the disk did not fill up");
    made.sort();
    let mut listed: Vec<String> = fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, made);

    // The mount still serves what was written, and the run can be cleaned up and sealed.
    assert_eq!(fs::read(run.join("kept.bin")).unwrap(), kept);
    // A seal needs room for the run's packs and manifest: on the full disk it fails with the
    // disk-full status, and the run stays open with its files.
    let out = env.run(&["seal", "lab/run-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_DISK_FULL), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(common::mount::state(&run), "open");
    assert_eq!(fs::read(run.join("kept.bin")).unwrap(), kept);
    // Removing a file works on the full disk (the store's reserve lets the deletion commit).
    assert!(disk.free() < 1 << 20);
    let reserve = env.store().join("reserve");
    assert!(reserve.exists());
    fs::remove_file(run.join("big.bin")).unwrap();
    assert!(!reserve.exists(), "the deletion used the reserve");
    let status = |m: &Mount| -> serde_json::Value {
        serde_json::from_slice(&fs::read(m.p(".artifactfs/status")).unwrap()).unwrap()
    };
    assert_eq!(status(&m)["reserve_held"], false);
    // An open run's large file takes its size twice until the seal: its staging file and the
    // packs it is chunked into ahead of the seal.
    fs::remove_file(&filler).unwrap();
    disk.resize("256m");
    // With room again, the mount makes its reserve again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::metadata(&reserve).map_or(0, |m| m.len()) < 8 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "no reserve after the disk grew"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let st = status(&m);
    assert_eq!(st["reserve_held"], true);
    assert!(st["disk_free_bytes"].as_u64().unwrap() > 100 << 20, "{st}");
    assert_eq!(errno(fs::metadata(run.join("big.bin"))), ENOENT);
    write_synced(&run.join("big.bin"), &big).unwrap();
    common::mount::seal(&run);
    assert_eq!(fs::read(run.join("big.bin")).unwrap(), big);
    assert_eq!(fs::read(run.join("kept.bin")).unwrap(), kept);
    m.unmount();
    env.ok(&["verify"]);
    let out = env.path("out");
    env.ok(&["export", "lab/run-1", out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("big.bin")).unwrap(), big);
    assert_eq!(fs::read(out.join("kept.bin")).unwrap(), kept);
}

/// Writes `data` to a new file and closes it, without `fsync`, returning the errno of a write
/// or of the close.
fn write_closed(p: &Path, data: &[u8]) -> Result<(), i32> {
    use std::os::fd::IntoRawFd;
    let mut f = File::create(p).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let written = f.write_all(data);
    let closed = nix::unistd::close(f.into_raw_fd());
    written.map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    closed.map_err(|e| e as i32)
}

/// A close (no `fsync`) writes the index journal instead of committing (ADR 0031). On a full
/// disk neither the journal nor the index can grow: each small file is then kept whole, and
/// outlives a kill -9 of the mount, or its close fails with ENOSPC and it leaves no name.
#[test]
fn files_closed_on_a_full_disk_are_kept_whole_or_refused_and_outlive_kill_9() {
    let env = Env::new();
    let disk = SmallDisk::mount(&env.store(), "32m");
    env.ok(&["init"]);
    let mnt = env.path("mnt");
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    let run = m.p("lab/run-1");
    fs::create_dir_all(&run).unwrap();
    // Written back to front, a file stays in its staging file, which fills the disk.
    let f = File::create(run.join("filler.bin")).unwrap();
    let mib = bytes(1 << 20, 9);
    let filled = (0..48u64)
        .rev()
        .find_map(|i| f.write_all_at(&mib, i << 20).err());
    assert_eq!(filled.and_then(|e| e.raw_os_error()), Some(ENOSPC));
    drop(f);

    let body = |i: usize| format!("closed file {i}\n").repeat(30 + i);
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    for i in 0..300 {
        let name = format!("c{i:03}.txt");
        match write_closed(&run.join(&name), body(i).as_bytes()) {
            Ok(()) => kept.push(i),
            Err(e) => {
                assert_eq!(e, ENOSPC, "file {i}:\n{}", m.log_text());
                assert_eq!(errno(fs::metadata(run.join(&name))), ENOENT, "{name}");
                refused.push(i);
            }
        }
    }
    // A refused close means that the journal could not be written (a written close holds).
    assert!(!refused.is_empty(), "the disk did not fill up");
    eprintln!("{} closes kept, {} refused", kept.len(), refused.len());
    m.kill9();

    disk.resize("256m");
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    let mut listed: Vec<String> = fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "filler.bin")
        .collect();
    listed.sort();
    let names: Vec<String> = kept.iter().map(|i| format!("c{i:03}.txt")).collect();
    assert_eq!(listed, names);
    for i in &kept {
        let p = run.join(format!("c{i:03}.txt"));
        assert_eq!(fs::read_to_string(&p).unwrap(), body(*i), "{}", p.display());
    }
    // The refused names are free, and the run seals with what was kept.
    write_closed(&run.join(format!("c{:03}.txt", refused[0])), b"again").unwrap();
    fs::remove_file(run.join("filler.bin")).unwrap();
    common::mount::seal(&run);
    m.unmount();
    env.ok(&["verify"]);
}

#[test]
fn gc_on_a_full_disk_deletes_expired_runs_and_gives_the_space_back() {
    let env = Env::with_clock("2026-11-01T00:00:00Z");
    let disk = SmallDisk::mount(&env.store(), "48m");
    env.ok(&["init"]);
    let old = env.path("old");
    tree(&old, 12, 300);
    env.ingest(&old, "lab/old");
    env.ok(&["retain", "lab/old", "1d"]);
    let kept = env.path("kept");
    tree(&kept, 1, 400);
    env.ingest(&kept, "lab/kept");

    // Something else fills the disk; the expired run's space is what gc can give back.
    let filler = disk.fill();
    assert!(disk.free() < 1 << 20);
    // Reading still works on the full disk (opening the index needs room: the reserve's).
    env.ok(&["verify"]);
    let out = env.path("out-full");
    env.ok(&["export", "lab/kept", out.to_str().unwrap()]);
    assert_same_tree(&kept, &out);
    env.set_time("2026-11-03T00:00:00Z");
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--grace", "0s", "--json"])).unwrap();
    assert_eq!(report["runs_expired"], serde_json::json!(["lab/old"]));
    assert!(disk.free() > 10 << 20, "gc gave back {} bytes", disk.free());
    assert_eq!(sealed_runs(&env), ["lab/kept"]);
    fs::remove_file(filler).unwrap();
    env.ok(&["verify"]);
    let out = env.path("out");
    env.ok(&["export", "lab/kept", out.to_str().unwrap()]);
    assert_same_tree(&kept, &out);
    // With room again, the next command makes the reserve again.
    let stats = env.stats();
    assert_eq!(stats["reserve_held"], true, "{stats}");
    assert!(
        stats["disk_free_bytes"].as_u64().unwrap() > 20 << 20,
        "{stats}"
    );
    assert!(env.store().join("reserve").exists());
}
