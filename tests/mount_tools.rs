//! Standard tools through a real mount: rsync -aX, tar, Python writes, mmap reads, many small
//! files with ls -lR and find, a 3 GiB sparse file, and two producers at once.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::mount::{Mount, assert_same, seal, state};
use common::{Env, sh};
use guide_board_sim::generate::{Options, generate};

fn sim_run(env: &Env, seed: u64, size: u64) -> std::path::PathBuf {
    let out = env.path(&format!("sim-{seed}"));
    generate(
        &Options {
            out: out.clone(),
            seed,
            runs: 1,
            size,
            small_files: Some(300),
            first_run: 0,
        },
        |_| {},
    )
    .unwrap();
    out.join("run-0000")
}

#[test]
fn rsync_and_tar_into_the_mount_then_seal() {
    let env = Env::new();
    let src = sim_run(&env, 11, 12 << 20);
    xattr::set(src.join("manifest.txt"), "user.origin", b"rsync-test").unwrap();
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    fs::create_dir_all(m.p("lab/by-rsync")).unwrap();
    sh(Command::new("rsync")
        .arg("-aX")
        .arg(format!("{}/", src.display()))
        .arg(m.p("lab/by-rsync")));
    fs::create_dir_all(m.p("lab/by-tar")).unwrap();
    sh(Command::new("sh").arg("-c").arg(format!(
        "tar --xattrs -C '{}' -cf - . | tar --xattrs --xattrs-include='user.*' -C '{}' -xpf -",
        src.display(),
        m.p("lab/by-tar").display()
    )));
    for run in ["lab/by-rsync", "lab/by-tar"] {
        let dir = m.p(run);
        // rsync and tar set the run directory's own mode and mtime from the source's root.
        seal(&dir);
        assert_eq!(state(&dir), "sealed");
        assert_same(&src, &dir);
    }
    m.unmount();
    for run in ["lab/by-rsync", "lab/by-tar"] {
        let dest = env.path(&format!("export-{}", run.replace('/', "-")));
        env.ok(&["export", run, dest.to_str().unwrap()]);
        common::assert_same_tree(&src, &dest);
    }
    assert!(env.ok(&["verify"]).contains("ok"));
}

#[test]
fn python_writes_and_mmap_reads() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    let run = m.p("py/run-1");
    fs::create_dir_all(&run).unwrap();
    let script = r#"
import mmap, os, sys, hashlib
run = sys.argv[1]
p = os.path.join(run, "data.bin")
with open(p, "wb") as f:
    f.write(b"A" * 1_000_000)
    f.seek(500_000)
    f.write(b"overwritten in the middle")
    f.seek(3_000_000)            # a hole, then a tail
    f.write(b"tail")
    f.truncate(2_500_000)        # cut back into the hole
with open(p, "r+b") as f:
    f.seek(10)
    f.write(b"patched")
    f.flush()
    os.fsync(f.fileno())
with open(os.path.join(run, "log.txt"), "a") as f:
    for i in range(1000):
        print(f"line {i}", file=f)
os.rename(os.path.join(run, "log.txt"), os.path.join(run, "final.log"))
print(hashlib.blake2b(open(p, "rb").read()).hexdigest())
"#;
    let before = sh(Command::new("python3").arg("-c").arg(script).arg(&run));
    // The same operations in a plain directory give the same bytes.
    let plain = env.path("plain");
    fs::create_dir_all(&plain).unwrap();
    let expected = sh(Command::new("python3").arg("-c").arg(script).arg(&plain));
    assert_eq!(before, expected);
    seal(&run);
    let mmap_read = r#"
import mmap, sys, hashlib
with open(sys.argv[1], "rb") as f:
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        print(hashlib.blake2b(mm[:]).hexdigest())
        assert mm[10:17] == b"patched"
        assert mm[500_000:500_025] == b"overwritten in the middle"
        assert len(mm) == 2_500_000
"#;
    let after = sh(Command::new("python3")
        .arg("-c")
        .arg(mmap_read)
        .arg(run.join("data.bin")));
    assert_eq!(after, expected);
    assert_eq!(
        fs::read(run.join("final.log")).unwrap(),
        fs::read(plain.join("final.log")).unwrap()
    );
}

#[test]
fn twenty_thousand_small_files_ls_and_find() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    let run = m.p("many/run");
    for d in 0..20 {
        let dir = run.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..1000 {
            fs::write(
                dir.join(format!("case-{i:04}.json")),
                format!("{{\"d\":{d},\"i\":{i}}}\n"),
            )
            .unwrap();
        }
    }
    let count = |root: &Path| -> usize {
        sh(Command::new("find").arg(root).arg("-type").arg("f"))
            .lines()
            .count()
    };
    assert_eq!(count(&run), 20_000);
    let ls_open = sh(Command::new("ls").arg("-lR").arg(&run));
    seal(&run);
    assert_eq!(count(&run), 20_000);
    let ls_sealed = sh(Command::new("ls").arg("-lR").arg(&run));
    assert_eq!(ls_open, ls_sealed, "ls -lR differs after the seal");
    let du = sh(Command::new("du")
        .arg("-s")
        .arg("--apparent-size")
        .arg("-B1")
        .arg(&run));
    assert!(
        du.split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 200_000
    );
}

/// The mount raises the kernel's readahead for its files from FUSE's 128 KiB, so a cold read
/// of a large sealed file keeps several 1 MiB requests in flight. A `--foreground` mount (as
/// here) does so a moment after it shows in the mount table, its only sign of being ready:
/// the setting is polled for up to 5 s.
#[test]
fn the_mount_reads_ahead_in_mebibytes() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    let dev = fs::metadata(m.p("")).unwrap().dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let setting = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut kb = fs::read_to_string(&setting).unwrap();
    while kb.trim() != "4096" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        kb = fs::read_to_string(&setting).unwrap();
    }
    assert_eq!(kb.trim(), "4096");

    // Sequential and random reads of a sealed file larger than the window give its bytes.
    let run = m.p("big/r");
    fs::create_dir_all(&run).unwrap();
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(run.join("big.bin"), &data).unwrap();
    seal(&run);
    assert!(fs::read(run.join("big.bin")).unwrap() == data);
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(run.join("big.bin")).unwrap();
    for off in [(17u64 << 20) + 5, 3 << 20, 23 << 20] {
        let mut buf = vec![0u8; 100_000];
        let n = f.read_at(&mut buf, off).unwrap();
        assert!(n > 0);
        assert!(buf[..n] == data[off as usize..off as usize + n], "at {off}");
    }
    drop(f);
    m.unmount();
}

/// Bytes of `path` in the kernel's page cache, by util-linux `fincore` (which maps the file and
/// asks `mincore`, reading nothing).
fn page_cached(path: &Path) -> u64 {
    let out = sh(Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path));
    out.trim().parse().unwrap()
}

/// A cold scan of a sealed run's small files (here: reads of its first two files, in order)
/// has the mount put the next files whole into the kernel's page cache, so that the scan
/// reads them as if warm; the files far ahead stay out until the scan nears them, and every
/// file reads back as stored. So in the mount that sealed the run (the kernel knows its files
/// by the numbers they had while open) and in a new mount.
#[test]
fn a_cold_scan_finds_the_next_small_files_in_the_page_cache() {
    let env = Env::new();
    let mnt = env.path("mnt");
    let files: Vec<Vec<u8>> = (0..40u32)
        .map(|i| {
            (0..1500 + i * 7)
                .map(|j| (j.wrapping_mul(2_654_435_761) >> (i % 7 + 9)) as u8)
                .collect()
        })
        .collect();
    let scan = |run: &Path| {
        let f = |i: usize| run.join(format!("f{i:02}"));
        assert_eq!(fs::read_dir(run).unwrap().count(), files.len());
        assert_eq!(page_cached(&f(2)), 0);
        for (i, want) in files.iter().enumerate().take(2) {
            assert!(fs::read(f(i)).unwrap() == *want, "f{i:02}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while page_cached(&f(9)) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (i, want) in files.iter().enumerate().take(10).skip(2) {
            assert_eq!(
                page_cached(&f(i)),
                (want.len() as u64).next_multiple_of(4096),
                "f{i:02} is not in the page cache"
            );
        }
        assert_eq!(page_cached(&f(39)), 0, "f39 was read ahead of the scan");
        for (i, want) in files.iter().enumerate() {
            assert!(fs::read(f(i)).unwrap() == *want, "f{i:02}");
        }
    };
    let m = Mount::start(&env, &mnt, &[]);
    let run = m.p("scan/r");
    fs::create_dir_all(&run).unwrap();
    // Written without the page cache (write-only opens, ADR 0026): nothing of it is cached.
    for (i, d) in files.iter().enumerate() {
        fs::write(run.join(format!("f{i:02}")), d).unwrap();
    }
    seal(&run);
    scan(&run);
    m.unmount();

    // A new mount: nothing of the run is in the kernel's page cache.
    let m = Mount::start(&env, &mnt, &[]);
    scan(&m.p("scan/r"));
    m.unmount();
}

#[test]
fn sparse_file_of_3_gib_through_the_mount() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    let run = m.p("disk/img");
    fs::create_dir_all(&run).unwrap();
    let f = fs::File::create(run.join("disk.img")).unwrap();
    f.set_len(3 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"boot sector", 0).unwrap();
    f.write_all_at(b"middle", 3 << 29).unwrap();
    drop(f);
    // Tools size their buffers by st_blksize: a MiB per system call and per FUSE request.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(run.join("disk.img")).unwrap().blksize(),
        1 << 20
    );
    seal(&run);
    let meta = fs::metadata(run.join("disk.img")).unwrap();
    assert_eq!(meta.len(), 3 << 30);
    assert_eq!(meta.blksize(), 1 << 20);
    let f = fs::File::open(run.join("disk.img")).unwrap();
    let mut buf = [0u8; 11];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"boot sector");
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 3 << 29).unwrap();
    assert_eq!(&buf, b"middle");
    drop(f);
    m.unmount();
    let stored = env.stats()["stored_bytes"].as_u64().unwrap();
    assert!(
        stored < 10 << 20,
        "a sparse 3 GiB file took {stored} stored bytes"
    );
}

#[test]
fn two_producers_write_two_runs_at_once() {
    let env = Env::new();
    let a = sim_run(&env, 21, 8 << 20);
    let b = sim_run(&env, 22, 8 << 20);
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-marker", "_SUCCESS"]);
    let producers: Vec<_> = [(a.clone(), m.p("lab/a")), (b.clone(), m.p("lab/b"))]
        .into_iter()
        .map(|(src, dst)| {
            std::thread::spawn(move || {
                fs::create_dir_all(&dst).unwrap();
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(format!("{}/.", src.display()))
                    .arg(&dst)
                    .status()
                    .unwrap();
                assert!(st.success());
                fs::write(dst.join("_SUCCESS"), b"").unwrap();
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    for run in ["lab/a", "lab/b"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while state(&m.p(run)) != "sealed" {
            assert!(std::time::Instant::now() < deadline, "{run} never sealed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    m.unmount();
    for (src, run) in [(&a, "lab/a"), (&b, "lab/b")] {
        let dest = env.path(&format!("export-{}", run.replace('/', "-")));
        env.ok(&["export", run, dest.to_str().unwrap()]);
        fs::remove_file(dest.join("_SUCCESS")).unwrap();
        let out = Command::new("diff")
            .arg("-r")
            .arg(src)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(env.ok(&["verify"]).contains("ok"));
}

/// `tools/mount.artifactfs`, as mount(8) runs it for `mount -t artifactfs` and /etc/fstab.
#[test]
fn the_mount_helper_takes_fstab_options() {
    let env = Env::new();
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/mount.artifactfs");
    let bin = assert_cmd::cargo::cargo_bin("artifactfs");
    let run = |opts: &str| {
        Command::new(&helper)
            .arg(env.store())
            .arg(&mnt)
            .arg("-o")
            .arg(opts)
            .env("ARTIFACTFS", &bin)
            .output()
            .unwrap()
    };
    let out = run("seal_after=1h,bogus");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option 'bogus'"));
    assert_eq!(run("ro").status.code(), Some(1));
    assert!(!common::mount::is_mounted(&mnt.canonicalize().unwrap()));

    let out = run("defaults,noauto,_netdev,seal_after=1h,seal_marker=_SUCCESS,allow_other");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnt = mnt.canonicalize().unwrap();
    assert!(common::mount::is_mounted(&mnt));
    let guard = UnmountOnDrop(mnt.clone());
    // allow_other reaches the kernel through the detaching mount.
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mnt.to_str().unwrap()))
        .unwrap();
    assert!(line.contains("allow_other"), "{line}");
    fs::create_dir_all(mnt.join("ns/r")).unwrap();
    fs::write(mnt.join("ns/r/out"), b"x").unwrap();
    fs::write(mnt.join("ns/r/_SUCCESS"), b"").unwrap();
    common::mount::wait_sealed(&mnt.join("ns/r"), Duration::from_secs(30));
    // A second mount of the store is refused: mount(8) reports a mount failure.
    let mnt2 = env.path("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    let out = Command::new(&helper)
        .arg(env.store())
        .arg(&mnt2)
        .env("ARTIFACTFS", &bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(32));
    drop(guard);
    assert!(!common::mount::is_mounted(&mnt));
}

struct UnmountOnDrop(std::path::PathBuf);

impl Drop for UnmountOnDrop {
    /// A safety net for a test that failed half-way: when the test got through, nothing is
    /// mounted any more and fusermount3's complaint about that is not worth printing.
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            Command::new("fusermount3")
                .args(args)
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(&["-u"]) {
            quiet(&["-uz"]);
        }
    }
}

/// The `mount` source is the store, and `artifactfs umount` returns only once the mount process
/// has let go of the store (the mount point named absolute or relative): a remount of the same
/// store at the same place right after it works and stays mounted, and the first process is
/// gone.
#[test]
fn umount_waits_for_the_mount_process_so_a_remount_follows_at_once() {
    let env = Env::new();
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let mount = |expect_pid: bool| -> u32 {
        let out = sh(env
            .std_cmd(&["mount", mnt.to_str().unwrap(), "--seal-after", "1h"])
            .stdin(std::process::Stdio::null()));
        let pid = out
            .split("(pid ")
            .nth(1)
            .and_then(|t| t.split(')').next())
            .and_then(|p| p.parse().ok());
        assert!(!expect_pid || pid.is_some(), "no pid in {out:?}");
        pid.unwrap_or(0)
    };
    let alive = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .and_then(|t| t.split_whitespace().next())
                != Some("Z")
        })
    };
    let guard = UnmountOnDrop(mnt.clone());
    let first = mount(true);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let store = env.store().canonicalize().unwrap();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.contains(&format!(" {} ", mnt.display()))
                && l.split(" - ").nth(1).is_some_and(
                    |t| t.starts_with("fuse") && t.split(' ').nth(1) == store.to_str()
                )),
        "the mount's source is not the store:\n{mountinfo}"
    );
    fs::create_dir_all(mnt.join("ns/r")).unwrap();
    fs::write(mnt.join("ns/r/out"), b"kept open").unwrap();
    sh(&mut env.std_cmd(&["umount", mnt.to_str().unwrap()]));
    assert!(
        !alive(first),
        "mount process {first} still runs after umount"
    );
    let second = mount(true);
    assert_ne!(first, second);
    // The open run is there in the second mount, which serves it.
    assert_eq!(fs::read(mnt.join("ns/r/out")).unwrap(), b"kept open");
    // Named relative to the working directory, the mount point is found the same way.
    sh(env
        .std_cmd(&["umount", "mnt"])
        .current_dir(mnt.parent().unwrap()));
    assert!(
        !alive(second),
        "mount process {second} still runs after umount"
    );
    assert!(!common::mount::is_mounted(&mnt));
    drop(guard);
}

/// A sealed run copied out of the mount with its xattrs (`cp -a` takes the read-only
/// `user.artifactfs.*` facts along) ingests to the same entries as the original: facts are not
/// content. A run directory's `user.retain` and `user.hold.*` become the ingested run's
/// retention and holds, as they do on a run directory in the mount, not manifest metadata.
#[test]
fn a_run_copied_out_of_the_mount_ingests_to_the_same_entries() {
    let env = Env::new();
    let src = sim_run(&env, 21, 2 << 20);
    let m = Mount::start(&env, &env.path("mnt"), &[]);
    fs::create_dir_all(m.p("lab/orig")).unwrap();
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(m.p("lab/orig")));
    seal(&m.p("lab/orig"));
    let copy = env.path("copy");
    sh(Command::new("cp").arg("-a").arg(m.p("lab/orig")).arg(&copy));
    let facts = sh(Command::new("getfattr")
        .arg("-R")
        .arg("-d")
        .arg("-m")
        .arg("user.artifactfs")
        .arg(&copy));
    assert!(
        facts.contains("user.artifactfs.blake3"),
        "cp -a did not copy the facts:\n{facts}"
    );
    xattr::set(&copy, "user.retain", b"30d").unwrap();
    xattr::set(&copy, "user.hold.audit", b"ticket 7").unwrap();
    xattr::set(&copy, "user.statehub.run_id", b"sh-21").unwrap();
    let entries = |run: &str| -> serde_json::Value {
        let m: serde_json::Value =
            serde_json::from_str(&env.ok(&["manifest", run, "--json"])).unwrap();
        m["entries"].clone()
    };
    env.ok(&["ingest", copy.to_str().unwrap(), "lab/copy"]);
    let (orig, copied) = (entries("lab/orig"), entries("lab/copy"));
    let text = copied.to_string();
    assert!(!text.contains("user.artifactfs."), "facts stored: {text}");
    assert!(
        !text.contains("user.retain") && !text.contains("user.hold."),
        "{text}"
    );
    let (orig, mut copied) = (orig.as_array().unwrap(), copied.as_array().unwrap().clone());
    // The one xattr the copy's root has on top: the Statehub id set above.
    let root_xattrs = copied[0].as_object_mut().unwrap().remove("xattrs");
    assert_eq!(
        root_xattrs,
        Some(serde_json::json!({"user.statehub.run_id": "sh-21"}))
    );
    assert_eq!(orig.len(), copied.len());
    for (a, b) in orig.iter().zip(&copied) {
        assert_eq!(a, b);
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&env.ok(&["manifest", "lab/copy", "--json"])).unwrap();
    assert_eq!(manifest["metadata"]["statehub.run_id"], "sh-21");
    assert!(manifest["metadata"].get("retain").is_none(), "{manifest}");
    let retain = env.ok(&["retain", "lab/copy", "--json"]);
    assert!(retain.contains("\"30d\""), "{retain}");
    let holds = env.ok(&["hold", "ls", "lab/copy"]);
    assert!(holds.contains("audit"), "{holds}");
    // A bad value is refused before anything is stored.
    xattr::set(&copy, "user.retain", b"soon").unwrap();
    let out = env.run(&["ingest", copy.to_str().unwrap(), "lab/bad"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(env.run_info("lab/bad").is_none());
    // Inside the mount too: rsync -aX of the sealed run into a new one takes the facts along,
    // which the open run accepts and drops; other user.artifactfs.* names stay refused.
    sh(Command::new("rsync")
        .arg("-aX")
        .arg(format!("{}/", m.p("lab/orig").display()))
        .arg(format!("{}/", m.p("lab/again").display())));
    let e = xattr::set(m.p("lab/again/manifest.txt"), "user.artifactfs.other", b"x");
    assert_eq!(e.unwrap_err().raw_os_error(), Some(libc_einval()));
    seal(&m.p("lab/again"));
    assert_eq!(entries("lab/again"), entries("lab/orig"));
    m.unmount();
}

fn libc_einval() -> i32 {
    nix::errno::Errno::EINVAL as i32
}
