//! End-to-end tests of `artifactfs mount`: real FUSE mounts served by the real binary.
//!
//! Every mount is a child process (`mount --foreground`) owned by a [`Mount`] guard that
//! unmounts (lazily if busy) and kills it on drop, so a failing test never leaves a hung mount.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Env;
use common::mount::{Mount, assert_same, errno, seal, state, wait_sealed};
use guide_board_sim::generate::{Options, generate};

fn manifest_entries(env: &Env, run: &str) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_str(&env.ok(&["manifest", run, "--json"])).unwrap();
    m["entries"].clone()
}

#[test]
fn cp_a_then_seal_equals_source_export_and_ingest() {
    let env = Env::new();
    generate(
        &Options {
            out: env.path("gen"),
            seed: 7,
            runs: 1,
            size: 16 << 20,
            small_files: Some(200),
            first_run: 0,
        },
        |_| {},
    )
    .unwrap();
    let src = env.path("gen/run-0000");
    xattr::set(&src, "user.statehub.run_id", b"sh-42").unwrap();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("guide-board/run-0000")).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(m.p("guide-board/run-0000"))
        .status()
        .unwrap();
    assert!(st.success(), "cp -a failed:\n{}", m.log_text());
    let run = m.p("guide-board/run-0000");
    assert_eq!(state(&run), "open");
    // The open run already looks like the source.
    assert_same(&src, &run);
    seal(&run);
    assert_eq!(state(&run), "sealed");
    assert_same(&src, &run);
    let digest = xattr::get(&run, "user.artifactfs.manifest")
        .unwrap()
        .unwrap();
    let via_ctl = fs::read(m.p(".artifactfs/manifests/guide-board/run-0000.json")).unwrap();
    assert_eq!(
        blake3::hash(&via_ctl).to_hex().as_bytes(),
        digest.as_slice(),
        "the control directory serves the canonical manifest bytes"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(m.p(".artifactfs/status")).unwrap()).unwrap();
    assert_eq!(status["runs"]["sealed"], 1);
    assert_eq!(status["open_runs"], serde_json::json!([]), "{status}");
    assert!(
        status["chunk_cache"]["capacity_bytes"].as_u64() > Some(0),
        "{status}"
    );
    let events = fs::read_to_string(m.p(".artifactfs/events")).unwrap();
    assert!(events.lines().any(|l| l.contains("\"run.sealed\"")));
    m.unmount();

    env.ok(&[
        "export",
        "guide-board/run-0000",
        env.path("out").to_str().unwrap(),
    ]);
    common::assert_same_tree(&src, &env.path("out"));
    env.ok(&["verify"]);

    let other = Env::new();
    other.ingest(&src, "guide-board/run-0000");
    assert_eq!(
        manifest_entries(&env, "guide-board/run-0000"),
        manifest_entries(&other, "guide-board/run-0000"),
        "mount-sealed and ingested manifests have the same entries"
    );
    let meta: serde_json::Value = serde_json::from_str(&env.ok(&["runs", "--json"])).unwrap();
    assert_eq!(meta[0]["metadata"]["statehub.run_id"], "sh-42");
}

/// Hard links to a symlink, a FIFO and a device node copied in with `cp -a` stay links
/// through the seal: in the sealed view, in the manifest (as `ingest` records them) and in an
/// export.
#[test]
fn hard_linked_special_files_stay_linked_through_the_seal() {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("file"), b"content").unwrap();
    fs::hard_link(src.join("file"), src.join("d/file-2")).unwrap();
    std::os::unix::fs::symlink("../file", src.join("d/link")).unwrap();
    fs::hard_link(src.join("d/link"), src.join("link-2")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    fs::hard_link(src.join("fifo"), src.join("d/fifo-2")).unwrap();
    mknod(
        &src.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    fs::hard_link(src.join("null"), src.join("d/null-2")).unwrap();

    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let run = m.p("ns/links");
    fs::create_dir_all(&run).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&run)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a failed:\n{}", m.log_text());
    assert_same(&src, &run);
    seal(&run);
    assert_same(&src, &run);
    for (a, b) in [
        ("d/link", "link-2"),
        ("fifo", "d/fifo-2"),
        ("null", "d/null-2"),
    ] {
        let (ma, mb) = (
            fs::symlink_metadata(run.join(a)).unwrap(),
            fs::symlink_metadata(run.join(b)).unwrap(),
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(ma.ino(), mb.ino(), "{a} and {b} are one inode");
        assert_eq!(ma.nlink(), 2, "{a}");
    }
    m.unmount();

    let entries = manifest_entries(&env, "ns/links");
    let kind_of = |path: &str| {
        entries
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| (e["type"].clone(), e["target"].clone()))
            .unwrap_or_else(|| panic!("no entry {path}"))
    };
    assert_eq!(kind_of("link-2").0, "hardlink");
    assert_eq!(kind_of("link-2").1, "d/link");
    assert_eq!(kind_of("fifo").0, "hardlink");
    assert_eq!(kind_of("fifo").1, "d/fifo-2");
    assert_eq!(kind_of("null").1, "d/null-2");
    let other = Env::new();
    other.ingest(&src, "ns/links");
    assert_eq!(
        entries,
        manifest_entries(&other, "ns/links"),
        "mount-sealed and ingested manifests have the same entries"
    );
    env.ok(&["export", "ns/links", env.path("out").to_str().unwrap()]);
    common::assert_same_tree(&src, &env.path("out"));
}

#[test]
fn sealed_runs_are_immutable_and_seal_triggers_work() {
    let env = Env::new();
    let m = Mount::start(
        &env,
        &env.path("mnt"),
        &["--seal-after", "1h", "--seal-marker", "_SUCCESS"],
    );
    fs::create_dir_all(m.p("ns/a/sub")).unwrap();
    fs::write(m.p("ns/a/f"), b"data").unwrap();

    // EBUSY while a file is open, then the seal goes through.
    let open = OpenOptions::new().append(true).open(m.p("ns/a/f")).unwrap();
    let e = xattr::set(m.p("ns/a"), "user.artifactfs.seal", b"1").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_ebusy()));
    drop(open);
    seal(&m.p("ns/a"));

    let run = m.p("ns/a");
    const EROFS: i32 = 30;
    const EPERM: i32 = 1;
    assert_eq!(
        errno(OpenOptions::new().write(true).open(run.join("f"))),
        EROFS
    );
    assert_eq!(errno(File::create(run.join("new"))), EROFS);
    assert_eq!(errno(fs::remove_file(run.join("f"))), EROFS);
    assert_eq!(errno(fs::rename(run.join("f"), run.join("g"))), EROFS);
    assert_eq!(errno(fs::create_dir(run.join("d"))), EROFS);
    assert_eq!(errno(fs::remove_dir(run.join("sub"))), EROFS);
    assert_eq!(
        errno(fs::remove_dir(&run)),
        EPERM,
        "a sealed run is not removed"
    );
    assert_eq!(
        errno(fs::set_permissions(
            run.join("f"),
            fs::Permissions::from_mode(0o600)
        )),
        EROFS
    );
    assert_eq!(
        errno(nix_truncate(&run.join("f"))),
        EROFS,
        "truncate of a sealed file"
    );
    assert_eq!(errno(xattr::set(run.join("f"), "user.x", b"1")), EPERM);
    assert_eq!(errno(xattr::set(&run, "user.x", b"1")), EPERM);
    assert_eq!(fs::read(run.join("f")).unwrap(), b"data");
    assert_eq!(
        xattr::get(run.join("f"), "user.artifactfs.blake3")
            .unwrap()
            .unwrap(),
        blake3::hash(b"data").to_hex().as_bytes()
    );

    // The marker: closing _SUCCESS seals the run (the marker is part of it).
    fs::create_dir_all(m.p("ns/b")).unwrap();
    fs::write(m.p("ns/b/out.txt"), b"out").unwrap();
    fs::write(m.p("ns/b/_SUCCESS"), b"").unwrap();
    wait_sealed(&m.p("ns/b"), Duration::from_secs(10));
    assert!(m.p("ns/b/_SUCCESS").exists());

    // The control file.
    fs::create_dir_all(m.p("ns/c")).unwrap();
    fs::write(m.p("ns/c/x"), b"x").unwrap();
    fs::write(m.p(".artifactfs/seal"), b"ns/c\n").unwrap();
    assert_eq!(state(&m.p("ns/c")), "sealed");
    m.unmount();
    let runs = env.ok(&["runs"]);
    assert_eq!(
        runs.lines().filter(|l| l.contains("\tsealed\t")).count(),
        3,
        "{runs}"
    );
}

fn libc_ebusy() -> i32 {
    16
}

fn nix_truncate(p: &Path) -> std::io::Result<()> {
    // `truncate(2)` by path, as `truncate -s 0` does.
    let st = Command::new("truncate")
        .arg("-s")
        .arg("0")
        .arg(p)
        .stderr(Stdio::piped())
        .output()?;
    if st.status.success() {
        Ok(())
    } else if String::from_utf8_lossy(&st.stderr).contains("Read-only file system") {
        Err(std::io::Error::from_raw_os_error(30))
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&st.stderr).into_owned(),
        ))
    }
}

#[test]
fn quiet_runs_seal_by_themselves() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1s"]);
    fs::create_dir_all(m.p("ns/quiet")).unwrap();
    fs::write(m.p("ns/quiet/a"), b"a").unwrap();
    wait_sealed(&m.p("ns/quiet"), Duration::from_secs(15));
    assert_eq!(fs::read(m.p("ns/quiet/a")).unwrap(), b"a");
}

/// The same random writes, truncates and renames on a plain directory and in an open run give
/// the same files, before and after sealing.
#[test]
fn random_writes_match_a_plain_directory() {
    use rand::{Rng, SeedableRng};
    let env = Env::new();
    let plain = env.path("plain");
    fs::create_dir_all(&plain).unwrap();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let run = m.p("ns/diff");
    fs::create_dir_all(&run).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let names = ["a", "b", "c"];
    for root in [&plain, &run] {
        for n in names {
            File::create(root.join(n)).unwrap();
        }
    }
    for step in 0..300 {
        let n = names[rng.random_range(0..names.len())];
        let op = rng.random_range(0..10);
        let off = rng.random_range(0..3_000_000u64);
        let len = rng.random_range(0..200_000usize);
        let data = common::bytes(len, step);
        let new_len = rng.random_range(0..2_000_000u64);
        for root in [&plain, &run] {
            let p = root.join(n);
            match op {
                0..=5 => {
                    let f = OpenOptions::new().write(true).open(&p).unwrap();
                    f.write_all_at(&data, off).unwrap();
                }
                6 => {
                    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
                    f.write_all(&data).unwrap();
                }
                7 => OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(new_len)
                    .unwrap(),
                8 => {
                    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
                    f.seek(SeekFrom::End(0)).unwrap();
                    f.write_all(&data[..len.min(100)]).unwrap();
                    f.sync_all().unwrap();
                }
                _ => {
                    let tmp = root.join("tmp");
                    fs::write(&tmp, &data).unwrap();
                    fs::rename(&tmp, &p).unwrap();
                }
            }
        }
    }
    let read_all = |p: &Path| {
        let mut v = Vec::new();
        File::open(p).unwrap().read_to_end(&mut v).unwrap();
        v
    };
    for n in names {
        assert!(
            read_all(&plain.join(n)) == read_all(&run.join(n)),
            "{n} differs"
        );
    }
    assert!(!run.join("tmp").exists());
    seal(&run);
    for n in names {
        assert!(
            read_all(&plain.join(n)) == read_all(&run.join(n)),
            "{n} differs after seal"
        );
    }
}

#[test]
fn remount_and_kill_9_keep_closed_files() {
    let env = Env::new();
    let mnt = env.path("mnt");
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/open/d")).unwrap();
    fs::write(m.p("ns/open/d/kept"), common::bytes(300_000, 1)).unwrap();
    common::set_mtime(&m.p("ns/open/d/kept"), 1_700_000_000, 123_456_789);
    xattr::set(m.p("ns/open/d/kept"), "user.k", b"v").unwrap();
    fs::create_dir_all(m.p("ns/sealed")).unwrap();
    fs::write(m.p("ns/sealed/s"), b"sealed bytes").unwrap();
    seal(&m.p("ns/sealed"));
    m.unmount();
    // Other commands work once the mount is gone.
    assert!(env.ok(&["runs"]).contains("ns/open\topen"));

    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    assert_eq!(state(&m.p("ns/open")), "open");
    assert_eq!(
        fs::read(m.p("ns/open/d/kept")).unwrap(),
        common::bytes(300_000, 1)
    );
    let md = fs::metadata(m.p("ns/open/d/kept")).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::mtime(&md),
            std::os::unix::fs::MetadataExt::mtime_nsec(&md)
        ),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(
        xattr::get(m.p("ns/open/d/kept"), "user.k")
            .unwrap()
            .unwrap(),
        b"v"
    );
    assert_eq!(fs::read(m.p("ns/sealed/s")).unwrap(), b"sealed bytes");
    // The store is owned by the mount; commands go through it.
    assert!(env.ok(&["runs"]).contains("ns/open\topen"));

    // kill -9 after a closed and an fsynced file, and small closed files that may be in the
    // close journal only (ADR 0031: a close writes the journal, a batch commits later).
    fs::write(m.p("ns/open/closed"), common::bytes(2_000_000, 2)).unwrap();
    let mut f = File::create(m.p("ns/open/synced")).unwrap();
    f.write_all(&common::bytes(100_000, 3)).unwrap();
    f.sync_all().unwrap();
    fs::create_dir(m.p("ns/open/small")).unwrap();
    for i in 0..200u64 {
        let p = m.p(&format!("ns/open/small/{i}.json"));
        let mut f = File::create(&p).unwrap();
        f.write_all(&common::bytes(100 + i as usize * 7, 10 + i))
            .unwrap();
        // fchmod: held with the open file, persisted by its close.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    let journal = env.store().join("index.journal");
    let journaled = fs::metadata(&journal).unwrap().len() > 48;
    m.kill9();

    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    // Whether the last closes were still in the journal depends on when the mount's batch
    // committed; either way every one of them is there.
    eprintln!("closes in the journal at kill -9: {journaled}");
    if journaled {
        assert!(
            m.log_text()
                .contains("applied the file changes a crash left in the index journal"),
            "{}",
            m.log_text()
        );
    }
    for i in 0..200u64 {
        let p = m.p(&format!("ns/open/small/{i}.json"));
        assert_eq!(
            fs::read(&p).unwrap(),
            common::bytes(100 + i as usize * 7, 10 + i)
        );
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o600
        );
    }
    assert_eq!(
        fs::read(m.p("ns/open/closed")).unwrap(),
        common::bytes(2_000_000, 2)
    );
    assert_eq!(
        fs::read(m.p("ns/open/synced")).unwrap(),
        common::bytes(100_000, 3)
    );
    drop(f);
    seal(&m.p("ns/open"));
    m.unmount();
    env.ok(&["verify"]);
    let out = env.run(&["cat", "ns/open/synced"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, common::bytes(100_000, 3));
}

#[test]
fn bad_input_is_refused_with_the_right_errno() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    const EPERM: i32 = 1;
    const EINVAL: i32 = 22;
    const ENAMETOOLONG: i32 = 36;
    const EOPNOTSUPP: i32 = 95;
    const ENOTEMPTY: i32 = 39;
    assert_eq!(errno(File::create(m.p("file-in-root"))), EPERM);
    fs::create_dir(m.p("ns")).unwrap();
    assert_eq!(errno(File::create(m.p("ns/file-in-namespace"))), EPERM);
    assert_eq!(errno(fs::create_dir(m.p(".hidden-ns"))), EINVAL);
    assert_eq!(errno(fs::create_dir(m.p("ns/bad\u{7}name"))), EINVAL);
    assert_eq!(errno(fs::create_dir(m.p(&"x".repeat(256)))), ENAMETOOLONG);
    fs::create_dir(m.p("ns/r")).unwrap();
    assert_eq!(
        errno(xattr::set(m.p("ns/r"), "user.artifactfs.retain", b"1")),
        EINVAL
    );
    // ENODATA, which the xattr crate reports as "no value".
    assert_eq!(
        xattr::get(m.p("ns/r"), "user.artifactfs.nope").unwrap(),
        None
    );
    assert_eq!(
        errno(xattr::set(m.p("ns/r"), "trusted.x", b"1")),
        EOPNOTSUPP
    );
    fs::create_dir(m.p("ns/r/d")).unwrap();
    fs::write(m.p("ns/r/d/f"), b"1").unwrap();
    assert_eq!(errno(fs::remove_dir(m.p("ns/r/d"))), ENOTEMPTY);
    assert_eq!(errno(fs::remove_dir(m.p("ns"))), ENOTEMPTY);
    assert!(
        m.log_text().contains("only directories can be made"),
        "EPERM is logged"
    );
}

/// `rm -rf` of an open run removes it and frees its name; not while a file of it is open,
/// nor while it has a hold.
#[test]
fn rm_rf_removes_an_open_run() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let run = m.p("ns/typo");
    fs::create_dir_all(run.join("d/e")).unwrap();
    fs::write(run.join("d/e/big"), vec![7u8; 3 << 20]).unwrap();
    fs::write(run.join("small"), b"x").unwrap();
    std::os::unix::fs::symlink("small", run.join("link")).unwrap();

    let open = File::open(run.join("small")).unwrap();
    let rm = || Command::new("rm").arg("-rf").arg(&run).output().unwrap();
    let out = rm();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(open);
    env.ok(&["hold", "add", "ns/typo", "keep", "--reason", "audit"]);
    assert_eq!(errno(fs::remove_dir(&run)), 1, "EPERM with a hold");
    env.ok(&["hold", "rm", "ns/typo", "keep"]);
    let out = rm();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!run.exists());
    assert!(!env.ok(&["runs"]).contains("ns/typo"));
    assert!(m.log_text().contains("run removed"), "{}", m.log_text());

    // The name is free again, and the store is whole.
    fs::create_dir(&run).unwrap();
    fs::write(run.join("f"), b"second").unwrap();
    seal(&run);
    assert_eq!(env.ok(&["cat", "ns/typo/f"]), "second");
    env.ok(&["verify"]);
}

/// `fallocate` in an open run: plain allocation extends the file with zeros, KEEP_SIZE
/// changes nothing, hole punching is refused; the seal records what a reader saw.
#[test]
fn fallocate_extends_open_files_and_refuses_hole_punching() {
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::os::fd::AsFd;
    const EOPNOTSUPP: i32 = 95;
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let run = m.p("ns/alloc");
    fs::create_dir_all(&run).unwrap();
    let mut want = Vec::new();
    for (name, head, end) in [("small", 10usize, 4096i64), ("large", 100_000, 12 << 20)] {
        let p = run.join(name);
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&p)
            .unwrap();
        let data = common::bytes(head, 9);
        f.write_all(&data).unwrap();
        fallocate(f.as_fd(), FallocateFlags::empty(), 0, end).unwrap();
        assert_eq!(f.metadata().unwrap().len(), end as u64, "{name}");
        // Within the size, or with KEEP_SIZE past it: nothing changes.
        fallocate(f.as_fd(), FallocateFlags::empty(), 5, 5).unwrap();
        fallocate(f.as_fd(), FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 2 * end).unwrap();
        assert_eq!(f.metadata().unwrap().len(), end as u64, "{name}");
        let punched = fallocate(
            f.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            4,
        );
        assert_eq!(punched.map_err(|e| e as i32), Err(EOPNOTSUPP), "{name}");
        drop(f);
        let mut expect = data.clone();
        expect.resize(end as usize, 0);
        assert_eq!(fs::read(&p).unwrap(), expect, "{name}");
        want.push((p, expect));
    }
    seal(&run);
    for (p, expect) in &want {
        assert_eq!(&fs::read(p).unwrap(), expect, "{}", p.display());
    }
    m.unmount();
    env.ok(&["verify"]);
}

#[test]
fn by_digest_serves_sealed_trees_read_only() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), common::bytes(500_000, 9)).unwrap();
    std::os::unix::fs::symlink("d/f", src.join("link")).unwrap();
    let ingested = env.ingest(&src, "ns/ingested")["manifest"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/written")).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(m.p("ns/written"))
        .status()
        .unwrap();
    assert!(st.success());
    seal(&m.p("ns/written"));
    let written = String::from_utf8(
        xattr::get(m.p("ns/written"), "user.artifactfs.manifest")
            .unwrap()
            .unwrap(),
    )
    .unwrap();

    let by = m.p(".artifactfs/by-digest");
    let mut listed: Vec<String> = fs::read_dir(&by)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want = vec![ingested.clone(), written.clone()];
    want.sort();
    assert_eq!(listed, want);
    assert_same(&src, &by.join(&written));
    assert_same(&src, &by.join(&ingested));
    // Its own inodes: the directory is not an alias of NAMESPACE/RUN.
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        fs::metadata(by.join(&written)).unwrap().ino(),
        fs::metadata(m.p("ns/written")).unwrap().ino()
    );
    const EROFS: i32 = 30;
    const ENOENT: i32 = 2;
    let t = by.join(&written);
    assert_eq!(errno(File::create(t.join("new"))), EROFS);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(t.join("d/f"))),
        EROFS
    );
    assert_eq!(errno(fs::remove_file(t.join("link"))), EROFS);
    assert_eq!(errno(fs::create_dir(by.join("x"))), EROFS);
    assert_eq!(errno(fs::metadata(by.join("0".repeat(64)))), ENOENT);
    assert_eq!(errno(fs::metadata(by.join("not-a-digest"))), ENOENT);
    // An open run has no digest yet.
    fs::create_dir_all(m.p("ns/still-open")).unwrap();
    assert_eq!(fs::read_dir(&by).unwrap().count(), 2);
}

#[test]
fn renameat2_flags_in_an_open_run() {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let run = m.p("ns/r");
    fs::create_dir_all(run.join("dir")).unwrap();
    fs::write(run.join("a"), b"A").unwrap();
    fs::write(run.join("dir/inner"), b"I").unwrap();
    let ren = |from: &str, to: &str, flags: RenameFlags| {
        renameat2(AT_FDCWD, &run.join(from), AT_FDCWD, &run.join(to), flags)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
    };
    const ENOENT: i32 = 2;
    const EEXIST: i32 = 17;
    const EXDEV: i32 = 18;
    const EINVAL: i32 = 22;
    const EROFS: i32 = 30;

    // NOREPLACE: refused over an existing name, a plain rename otherwise.
    assert_eq!(
        errno(ren("a", "dir", RenameFlags::RENAME_NOREPLACE)),
        EEXIST
    );
    ren("a", "b", RenameFlags::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(run.join("b")).unwrap(), b"A");
    assert!(!run.join("a").exists());

    // EXCHANGE: a file and a directory swap names, atomically.
    ren("b", "dir", RenameFlags::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(run.join("dir")).unwrap(), b"A");
    assert_eq!(fs::read(run.join("b/inner")).unwrap(), b"I");
    ren("dir", "b/inner", RenameFlags::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(run.join("dir")).unwrap(), b"I");
    assert_eq!(fs::read(run.join("b/inner")).unwrap(), b"A");
    assert_eq!(
        errno(ren("dir", "nope", RenameFlags::RENAME_EXCHANGE)),
        ENOENT
    );
    assert_eq!(
        errno(ren(
            "dir",
            "b",
            RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_NOREPLACE
        )),
        EINVAL
    );
    assert_eq!(
        errno(ren("b", "b/sub", RenameFlags::RENAME_NOREPLACE)),
        EINVAL
    );

    // Across runs, and in a sealed run.
    fs::create_dir_all(m.p("ns/other")).unwrap();
    fs::write(m.p("ns/other/o"), b"O").unwrap();
    assert_eq!(
        errno(ren("dir", "../other/o", RenameFlags::RENAME_EXCHANGE)),
        EXDEV
    );
    seal(&m.p("ns/other"));
    let o = m.p("ns/other");
    assert_eq!(
        errno(
            renameat2(
                AT_FDCWD,
                &o.join("o"),
                AT_FDCWD,
                &o.join("p"),
                RenameFlags::RENAME_NOREPLACE
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        ),
        EROFS
    );
    seal(&run);
    let sealed = m.p("ns/r");
    assert_eq!(fs::read(sealed.join("dir")).unwrap(), b"I");
    assert_eq!(fs::read(sealed.join("b/inner")).unwrap(), b"A");
}

/// A POSIX access ACL in the xattr encoding: version 2, then (tag, perm, id) entries.
fn posix_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// `cp -a`, `rsync -A` and `setfacl` write access ACLs; one that only restates the mode sets
/// the mode, as on ext4, and nothing else is kept. ACLs with named entries are refused (that
/// only the owner may set one is checked in the engine's tests: the mount serves its owner).
#[test]
fn minimal_acls_set_the_mode_and_others_are_refused() {
    const ACL: &str = "system.posix_acl_access";
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const EINVAL: i32 = 22;
    const ENODATA: i32 = 61;
    const EOPNOTSUPP: i32 = 95;
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r")).unwrap();
    let f = m.p("ns/r/f");
    fs::write(&f, b"x").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4600)).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let minimal = |u, g, o| posix_acl(&[(USER_OBJ, u, !0), (GROUP_OBJ, g, !0), (OTHER, o, !0)]);
    xattr::set(&f, ACL, &minimal(7, 5, 4)).unwrap();
    assert_eq!(mode(&f), 0o4754, "the ACL's bits, the set-user-ID bit kept");
    assert_eq!(xattr::get(&f, ACL).unwrap(), None, "no ACL is kept");
    assert_eq!(errno(xattr::remove(&f, ACL)), ENODATA);
    let named = posix_acl(&[
        (USER_OBJ, 6, !0),
        (USER, 6, 1000),
        (GROUP_OBJ, 4, !0),
        (MASK, 6, !0),
        (OTHER, 0, !0),
    ]);
    assert_eq!(errno(xattr::set(&f, ACL, &named)), EOPNOTSUPP);
    assert_eq!(errno(xattr::set(&f, ACL, b"\x02\0\0\0garbage!")), EINVAL);
    assert_eq!(mode(&f), 0o4754, "refused ACLs change nothing");
    assert_eq!(mode(&f), 0o4754);

    // `cp -a` of a tree keeps its modes, with no refusal logged.
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    for (name, m) in [("a", 0o640), ("b", 0o755), ("d/c", 0o600)] {
        fs::write(src.join(name), name).unwrap();
        fs::set_permissions(src.join(name), fs::Permissions::from_mode(m)).unwrap();
    }
    fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o750)).unwrap();
    let logged = m.log_text().len();
    let st = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(m.p("ns/r/copy"))
        .status()
        .unwrap();
    assert!(st.success());
    for (name, want) in [("a", 0o640), ("b", 0o755), ("d/c", 0o600), ("d", 0o750)] {
        assert_eq!(mode(&m.p(&format!("ns/r/copy/{name}"))), want, "{name}");
    }
    let log = m.log_text();
    assert!(!log[logged..].contains("refused"), "{log}");
}

/// Only `user.*` attributes exist in a store: other namespaces are unsupported on every node,
/// which `ls -l` and `cp -a` take as "stop asking on this mount" (one round trip per file
/// otherwise), while a missing `user.*` name or ACL is ENODATA as on ext4.
#[test]
fn only_user_xattrs_exist_and_other_namespaces_are_unsupported() {
    const ENODATA: i32 = 61;
    const EOPNOTSUPP: i32 = 95;
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r/d")).unwrap();
    let f = m.p("ns/r/d/f");
    fs::write(&f, b"one").unwrap();
    xattr::set(&f, "user.k", b"v").unwrap();
    let check = |p: &Path, state: &str| {
        for name in ["security.selinux", "security.capability", "trusted.x"] {
            assert_eq!(
                errno(xattr::get(p, name)),
                EOPNOTSUPP,
                "{state} {p:?} {name}"
            );
        }
        assert_eq!(
            xattr::get(p, "user.missing").unwrap(),
            None,
            "{state} {p:?}"
        );
        assert_eq!(
            xattr::get(p, "system.posix_acl_access").unwrap(),
            None,
            "{state} {p:?}"
        );
    };
    for p in [&f, &m.p("ns/r/d"), &m.p("ns/r")] {
        check(p, "open");
    }
    assert_eq!(errno(xattr::set(&f, "security.x", b"1")), EOPNOTSUPP);
    assert_eq!(errno(xattr::remove(&f, "user.missing")), ENODATA);
    // The kernel's security.capability probe before a write takes the answer as "none".
    OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b" two")
        .unwrap();
    let ls = Command::new("ls")
        .arg("-lR")
        .arg(m.p("ns"))
        .output()
        .unwrap();
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(String::from_utf8_lossy(&ls.stdout).contains(" f\n"));
    seal(&m.p("ns/r"));
    for p in [&f, &m.p("ns/r/d"), &m.p("ns/r")] {
        check(p, "sealed");
    }
    assert_eq!(fs::read(&f).unwrap(), b"one two");
    assert_eq!(
        xattr::get(&f, "user.k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert!(xattr::get(&f, "user.artifactfs.blake3").unwrap().is_some());
}

/// Runs `sh -c SCRIPT` as `nobody` (uid and gid 65534, no groups): its status and stderr.
fn sh_as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", script])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn other_users_need_allow_other_and_then_meet_modes_and_owners() {
    let env = Env::new();
    // `nobody` must be able to reach the mountpoint.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = env.path("mnt");
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("lab/shared")).unwrap();
    fs::write(m.p("lab/shared/public.txt"), b"for all").unwrap();
    let q = |p: &str| format!("'{}'", m.p(p).display());
    // Without allow_other the kernel turns every other user away.
    let (ok, err) = sh_as_nobody(&format!("cat {}", q("lab/shared/public.txt")));
    assert!(!ok && err.contains("ermission denied"), "{err}");
    m.unmount();

    let m = Mount::start(&env, &mnt, &["--seal-after", "1h", "--allow-other"]);
    let q = |p: &str| format!("'{}'", m.p(p).display());
    let (ok, err) = sh_as_nobody(&format!("cat {} >/dev/null", q("lab/shared/public.txt")));
    assert!(ok, "a 0644 file is readable by others: {err}");
    fs::write(m.p("lab/shared/secret.txt"), b"root only").unwrap();
    fs::set_permissions(
        m.p("lab/shared/secret.txt"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let (ok, err) = sh_as_nobody(&format!("cat {}", q("lab/shared/secret.txt")));
    assert!(!ok && err.contains("ermission denied"), "{err}");
    // root's 0755 run directory: no new files from others, and nothing is stored.
    let (ok, err) = sh_as_nobody(&format!("echo x > {}", q("lab/shared/theirs.txt")));
    assert!(!ok && err.contains("ermission denied"), "{err}");
    assert!(!m.p("lab/shared/theirs.txt").exists());
    // A run directory opened to others: their files are theirs.
    fs::set_permissions(m.p("lab/shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    let (ok, err) = sh_as_nobody(&format!("echo x > {}", q("lab/shared/theirs.txt")));
    assert!(ok, "{err}");
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(m.p("lab/shared/theirs.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // The sticky bit: others cannot remove root's file.
    let (ok, err) = sh_as_nobody(&format!("rm -f {}", q("lab/shared/public.txt")));
    assert!(!ok, "{err}");
    assert!(m.p("lab/shared/public.txt").exists());
    // Sealed, the run stays readable by others and refuses them as it refuses root.
    seal(&m.p("lab/shared"));
    let (ok, err) = sh_as_nobody(&format!("cat {} >/dev/null", q("lab/shared/theirs.txt")));
    assert!(ok, "{err}");
    let (ok, err) = sh_as_nobody(&format!("echo y >> {}", q("lab/shared/theirs.txt")));
    assert!(!ok && err.contains("Read-only file system"), "{err}");
    // Its manifest is as readable as the run's directory; a private run's is not readable
    // by others, nor is anything in a private namespace.
    let (ok, err) = sh_as_nobody(&format!(
        "cat {} >/dev/null",
        q(".artifactfs/manifests/lab/shared.json")
    ));
    assert!(ok, "{err}");
    fs::create_dir_all(m.p("lab/private")).unwrap();
    fs::set_permissions(m.p("lab/private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.p("lab/private/plan.txt"), b"root only").unwrap();
    seal(&m.p("lab/private"));
    let (ok, err) = sh_as_nobody(&format!(
        "cat {}",
        q(".artifactfs/manifests/lab/private.json")
    ));
    assert!(!ok && err.contains("ermission denied"), "{err}");
    let manifest = fs::read(m.p(".artifactfs/manifests/lab/private.json")).unwrap();
    assert!(String::from_utf8_lossy(&manifest).contains("plan.txt"));
    fs::create_dir_all(m.p("closed/run")).unwrap();
    seal(&m.p("closed/run"));
    fs::set_permissions(m.p("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, err) = sh_as_nobody(&format!(
        "cat {}",
        q(".artifactfs/manifests/closed/run.json")
    ));
    assert!(!ok && err.contains("ermission denied"), "{err}");
}

/// Listings: a directory of many entries reads whole through many requests, with each
/// entry's attributes equal to its own `stat` (the kernel takes them from `readdirplus`), a
/// rewound listing shows entries created since it was opened, and a sealed directory lists the
/// same from its kernel cache as at first.
#[test]
fn listings_page_rewind_and_carry_attributes() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    let run = m.p("ns/list");
    fs::create_dir_all(&run).unwrap();
    for i in 0..1500 {
        fs::write(
            run.join(format!("file-{i:05}-with-a-longer-name")),
            vec![b'x'; i % 97],
        )
        .unwrap();
    }
    // `ls -l` lists and stats every entry; its sizes must be the files' own.
    let ls = Command::new("ls").arg("-ln").arg(&run).output().unwrap();
    assert!(ls.status.success());
    let listed: Vec<(String, u64)> = String::from_utf8(ls.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[8].to_owned(), f[4].parse().unwrap())
        })
        .collect();
    assert_eq!(listed.len(), 1500);
    for (name, size) in &listed {
        let i: usize = name[5..10].parse().unwrap();
        assert_eq!(*size, (i % 97) as u64, "{name}");
    }
    // rewinddir re-reads the directory: a file created while it is open shows up.
    let script = r#"
        opendir(my $d, $ARGV[0]) or die "opendir: $!";
        my $before = () = readdir($d);
        open(my $f, '>', "$ARGV[0]/late") or die "create: $!";
        close($f);
        rewinddir($d);
        my $after = () = readdir($d);
        print "$before $after\n";
    "#;
    let out = common::sh(Command::new("perl").args(["-e", script]).arg(&run));
    // 1500 files, `.` and `..`; then one more.
    assert_eq!(out.trim(), "1502 1503");
    seal(&run);
    let names = |p: &Path| {
        let mut v: Vec<String> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let first = names(&run);
    assert_eq!(first.len(), 1501);
    assert!(first.contains(&"late".to_owned()));
    assert_eq!(names(&run), first);
    for e in fs::read_dir(&run).unwrap().take(50) {
        let e = e.unwrap();
        let i: usize = match e.file_name().to_str().unwrap().get(5..10) {
            Some(n) => n.parse().unwrap(),
            None => continue,
        };
        assert_eq!(e.metadata().unwrap().len(), (i % 97) as u64);
    }
}

/// Large files written front to back are chunked as they are written (ADR 0025): a closed one
/// and an fsynced one survive kill -9, one read while it is written reads right and takes
/// later appends, one rewritten in the middle keeps every byte, and the seal gives the
/// manifest `ingest` gives for the same tree.
#[test]
fn large_files_written_front_to_back_survive_kill_9_and_seal_like_ingest() {
    let env = Env::new();
    let mnt = env.path("mnt");
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let closed = common::bytes(24 << 20, 21);
    let synced = common::bytes(12 << 20, 22);
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/big")).unwrap();
    fs::write(m.p("ns/big/closed"), &closed).unwrap();
    let mut f = File::create(m.p("ns/big/synced")).unwrap();
    for piece in synced.chunks(1 << 20) {
        f.write_all(piece).unwrap();
    }
    f.sync_all().unwrap();
    // Not closed and not fsynced: may be lost, must not break anything.
    let mut open = File::create(m.p("ns/big/unclosed")).unwrap();
    open.write_all(&common::bytes(10 << 20, 23)).unwrap();
    m.kill9();
    drop((f, open));

    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    assert_eq!(fs::read(m.p("ns/big/closed")).unwrap(), closed);
    assert_eq!(fs::read(m.p("ns/big/synced")).unwrap(), synced);
    fs::remove_file(m.p("ns/big/unclosed")).unwrap();
    fs::write(src.join("closed"), &closed).unwrap();
    fs::write(src.join("synced"), &synced).unwrap();

    // Read while it is written, through another descriptor; then more appends.
    let mut want = common::bytes(16 << 20, 24);
    let mut w = File::create(m.p("ns/big/read")).unwrap();
    w.write_all(&want[..12 << 20]).unwrap();
    let mut buf = vec![0u8; 4096];
    File::open(m.p("ns/big/read"))
        .unwrap()
        .read_exact_at(&mut buf, 9 << 20)
        .unwrap();
    assert_eq!(buf, want[9 << 20..(9 << 20) + 4096]);
    w.write_all(&want[12 << 20..]).unwrap();
    // A rewrite in the middle, then an append.
    w.write_all_at(b"rewritten", 1 << 20).unwrap();
    want[1 << 20..(1 << 20) + 9].copy_from_slice(b"rewritten");
    w.seek(SeekFrom::End(0)).unwrap();
    w.write_all(b"end").unwrap();
    want.extend_from_slice(b"end");
    drop(w);
    assert_eq!(fs::read(m.p("ns/big/read")).unwrap(), want);
    fs::write(src.join("read"), &want).unwrap();
    // Reopened and appended to after its close.
    let mut again = OpenOptions::new()
        .append(true)
        .open(m.p("ns/big/closed"))
        .unwrap();
    again.write_all(b"appended").unwrap();
    drop(again);
    let mut closed2 = closed.clone();
    closed2.extend_from_slice(b"appended");
    assert_eq!(fs::read(m.p("ns/big/closed")).unwrap(), closed2);
    fs::write(src.join("closed"), &closed2).unwrap();

    for name in ["closed", "synced", "read"] {
        let s = fs::metadata(src.join(name)).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(m.p(&format!("ns/big/{name}")))
            .unwrap()
            .set_modified(s)
            .unwrap();
    }
    seal(&m.p("ns/big"));
    m.unmount();
    env.ok(&["ingest", src.to_str().unwrap(), "ns/ingested"]);
    let (a, b) = (
        manifest_entries(&env, "ns/big"),
        manifest_entries(&env, "ns/ingested"),
    );
    // Past the root directory, whose times differ.
    assert_eq!(a.as_array().unwrap()[1..], b.as_array().unwrap()[1..]);
    env.ok(&["verify"]);
}

/// Write-only handles write without the kernel's page cache; a handle that read the file
/// before still reads what they wrote, not its cached pages, and so does a mapping of it.
#[test]
fn a_write_only_handle_and_a_reading_handle_agree() {
    let env = Env::new();
    let mnt = env.path("mnt");
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r")).unwrap();
    let p = m.p("ns/r/f");
    let first = common::bytes(256 << 10, 31);
    fs::write(&p, &first).unwrap();
    let script = r#"
import mmap, os, sys
p = sys.argv[1]
reader = os.open(p, os.O_RDWR)
before = os.pread(reader, 8192, 4096)
view = mmap.mmap(reader, 0, mmap.MAP_SHARED, mmap.PROT_READ)
was = view[100000]
writer = os.open(p, os.O_WRONLY)
os.pwrite(writer, b"\xab" * 8192, 4096)
os.pwrite(writer, b"\xcd" * 16, 100000)
assert os.pread(reader, 8192, 4096) == b"\xab" * 8192, "a cached page outlived the write"
assert view[100000] == 0xCD, "a mapping kept a stale page (was %d)" % was
print(len(before))
"#;
    common::sh(Command::new("python3").arg("-c").arg(script).arg(&p));
    let mut want = first.clone();
    want[4096..4096 + 8192].fill(0xAB);
    want[100_000..100_016].fill(0xCD);
    assert_eq!(fs::read(&p).unwrap(), want);
}

/// Times before 1970 with a fraction of a second keep it, through the mount, its seal, the
/// manifest and `ls`: the same as `ingest` records for the same tree.
#[test]
fn times_before_1970_keep_their_fraction_of_a_second() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let run = m.p("ns/old");
    fs::create_dir_all(&run).unwrap();
    let times = [(-315_619_200, 250_000_000), (-1, 999_999_995), (-86_400, 1)];
    for (i, (sec, nsec)) in times.iter().enumerate() {
        let p = run.join(format!("f{i}"));
        fs::write(&p, format!("file {i}")).unwrap();
        common::set_mtime(&p, *sec, *nsec);
        let md = fs::metadata(&p).unwrap();
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (*sec, *nsec),
            "{}",
            p.display()
        );
    }
    seal(&run);
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for (i, (sec, nsec)) in times.iter().enumerate() {
        let p = run.join(format!("f{i}"));
        let md = fs::metadata(&p).unwrap();
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (*sec, *nsec),
            "sealed {}",
            p.display()
        );
        fs::write(src.join(format!("f{i}")), format!("file {i}")).unwrap();
        common::set_mtime(&src.join(format!("f{i}")), *sec, *nsec);
    }
    // `ls` of files from before 1970 lists them (it formatted their times with a panic).
    let listed = env.ok(&["ls", "ns/old"]);
    assert!(listed.contains("1960-01-01T00:00:00Z"), "{listed}");
    env.ok(&["ingest", src.to_str().unwrap(), "ns/ingested"]);
    let entries = |run: &str| -> Vec<serde_json::Value> {
        let m: serde_json::Value =
            serde_json::from_str(&env.ok(&["manifest", run, "--json"])).unwrap();
        m["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["path"] != ".")
            .map(|e| serde_json::json!([e["path"], e["mtime_ns"]]))
            .collect()
    };
    assert_eq!(entries("ns/old"), entries("ns/ingested"));
    m.unmount();
}

/// An ioctl the mount does not implement is ENOTTY, as on a local file system, and leaves no
/// log line: Python's `open` asks every file it opens for `TCGETS`.
#[test]
fn unknown_ioctls_are_enotty_without_a_log_line_each() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r")).unwrap();
    let p = m.p("ns/r/f");
    fs::write(&p, b"x").unwrap();
    let before = m.log_text().len();
    let script = "import errno, fcntl, sys, termios\n\
                  for _ in range(20):\n\
                  \x20   with open(sys.argv[1], 'rb') as f:\n\
                  \x20       try:\n\
                  \x20           fcntl.ioctl(f, termios.TCGETS, bytes(64))\n\
                  \x20           sys.exit('TCGETS answered')\n\
                  \x20       except OSError as e:\n\
                  \x20           assert e.errno == errno.ENOTTY, e\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = m.log_text();
    assert!(!log[before..].contains("ioctl"), "{}", &log[before..]);
    m.unmount();
}

/// Replacing a file with `rename(2)` is atomic for readers: a reader opening the name while a
/// producer keeps writing a temporary file and renaming it over the name always opens a whole
/// version (never ENOENT), as on a local file system. A removed file the kernel still knows
/// (an `O_PATH` descriptor) keeps its attributes and can be opened again through
/// `/proc/self/fd`; it goes once the kernel forgets it, and the run seals without it.
#[test]
fn a_file_replaced_by_rename_never_vanishes_for_readers() {
    let env = Env::new();
    let mnt = env.path("mnt");
    let m = Mount::start(&env, &mnt, &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r")).unwrap();
    let script = r#"
import os, sys
d = sys.argv[1]
target = os.path.join(d, "current.json")
stop = os.path.join(d, ".stop")
def body(i):
    return (("v%06d " % i) * 200).encode()
with open(target, "wb") as f:
    f.write(body(0))
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    opens = missing = torn = 0
    while not os.path.exists(stop) or opens < 200:
        try:
            with open(target, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            missing += 1
            continue
        opens += 1
        if len(data) != 1600 or data != data[:8] * 200:
            torn += 1
    os.write(w, ("%d %d %d" % (opens, missing, torn)).encode())
    os._exit(0)
os.close(w)
last = 2000
for i in range(1, last + 1):
    tmp = os.path.join(d, ".current.json.tmp")
    with open(tmp, "wb") as f:
        f.write(body(i))
    os.rename(tmp, target)
open(stop, "w").close()
os.waitpid(pid, 0)
opens, missing, torn = map(int, os.read(r, 100).split())
assert missing == 0 and torn == 0, "opens %d, ENOENT %d, torn %d" % (opens, missing, torn)
# A removed file that an O_PATH descriptor still names.
held = os.path.join(d, "held.txt")
with open(held, "wb") as f:
    f.write(b"still here\n")
fd = os.open(held, os.O_PATH)
os.unlink(held)
st = os.fstat(fd)
assert st.st_nlink == 0 and st.st_size == 11, st
again = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY)
assert os.read(again, 100) == b"still here\n"
os.close(again)
os.close(fd)
os.unlink(stop)
print(opens)
"#;
    let out = common::sh(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(m.p("ns/r")),
    );
    let opens: u64 = out.trim().parse().unwrap();
    assert!(opens >= 200, "{out}");
    // Forgotten by the kernel (its caches dropped), the removed files leave the index.
    let unlinked = || {
        let db = rusqlite::Connection::open_with_flags(
            env.store().join("index.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.query_row("SELECT count(*) FROM inodes WHERE nlink = 0", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
    };
    let mut left = unlinked();
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        left = unlinked();
    }
    assert_eq!(
        left, 0,
        "files without a name stay in the index after the kernel forgot them"
    );
    seal(&m.p("ns/r"));
    let entries = manifest_entries(&env, "ns/r");
    let paths: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, [".", "current.json"]);
    assert_eq!(
        fs::read(m.p("ns/r/current.json")).unwrap(),
        "v002000 ".repeat(200).as_bytes()
    );
    m.unmount();
    assert!(env.ok(&["verify"]).contains("ok"));
}

/// A set-group-ID directory hands its group down (and the bit to subdirectories), and a write
/// by another user through a write-only handle drops set-user-ID and set-group-ID (the latter
/// only where the group may execute), as on a local file system.
#[test]
fn setgid_directories_and_writes_by_others_follow_local_rules() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = Mount::start(
        &env,
        &env.path("mnt"),
        &["--seal-after", "1h", "--allow-other"],
    );
    fs::create_dir_all(m.p("lab/grp")).unwrap();
    std::os::unix::fs::chown(m.p("lab/grp"), Some(0), Some(100)).unwrap();
    fs::set_permissions(m.p("lab/grp"), fs::Permissions::from_mode(0o2777)).unwrap();
    fs::write(m.p("lab/grp/f"), b"x").unwrap();
    fs::create_dir(m.p("lab/grp/sub")).unwrap();
    let f = fs::metadata(m.p("lab/grp/f")).unwrap();
    let sub = fs::metadata(m.p("lab/grp/sub")).unwrap();
    assert_eq!((f.gid(), sub.gid()), (100, 100));
    assert_eq!(sub.mode() & 0o2000, 0o2000, "subdirectories keep the bit");
    assert_eq!(f.mode() & 0o2000, 0);
    fs::create_dir(m.p("lab/grp/sub/deeper")).unwrap();
    let deeper = fs::metadata(m.p("lab/grp/sub/deeper")).unwrap();
    assert_eq!((deeper.gid(), deeper.mode() & 0o2000), (100, 0o2000));

    for (name, mode, after) in [("tool", 0o6777, 0o0777), ("locked", 0o2767, 0o2767)] {
        let p = m.p(&format!("lab/grp/{name}"));
        fs::write(&p, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, mode);
        let (ok, err) = sh_as_nobody(&format!("printf 'exit 0\\n' >> '{}'", p.display()));
        assert!(ok, "{err}");
        assert_eq!(
            fs::metadata(&p).unwrap().mode() & 0o7777,
            after,
            "{name}: after another user's write"
        );
    }
    // root (CAP_FSETID) keeps them.
    let p = m.p("lab/grp/rootstool");
    fs::write(&p, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o6755)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"exit 0\n")
        .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o6755);
    seal(&m.p("lab/grp"));
    let entries = manifest_entries(&env, "lab/grp");
    let sub = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "sub")
        .unwrap();
    assert_eq!(
        (sub["gid"].as_u64(), sub["mode"].as_u64().unwrap() & 0o2000),
        (Some(100), 0o2000)
    );
}

/// A `user.*` xattr larger than ext4 keeps (about 4 KiB per file) is stored; exporting it to
/// ext4 fails naming the xattr and the file system's limit (not "disk full"), and exporting to
/// a file system that keeps it (tmpfs) gives it back whole.
#[test]
fn a_large_xattr_exports_where_the_destination_keeps_it_and_fails_clearly_elsewhere() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r")).unwrap();
    fs::write(m.p("ns/r/f"), b"x").unwrap();
    let big = common::bytes(16 << 10, 5);
    xattr::set(m.p("ns/r/f"), "user.big", &big).unwrap();
    seal(&m.p("ns/r"));
    m.unmount();
    let out = env.run(&["export", "ns/r", env.path("ext4").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refuses xattr user.big of 16384 bytes") && !err.contains("disk full"),
        "{err}"
    );
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let dest = shm.path().join("out");
    env.ok(&["export", "ns/r", dest.to_str().unwrap()]);
    assert_eq!(xattr::get(dest.join("f"), "user.big").unwrap(), Some(big));
}
