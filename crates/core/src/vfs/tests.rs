//! Tests of the file-system view without FUSE: readahead, renameat2 flags, seals outside a
//! mount, and the staging files a crash after a seal leaves.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;

use rand::{RngCore, SeedableRng};

use super::*;
use crate::id::FileHash;
use crate::store::InitOptions;

const CTX: Ctx = Ctx { uid: 0, gid: 0 };

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn new_store(dir: &Path) -> Store {
    Store::init(&dir.join("store"), &InitOptions::default()).unwrap()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn open_run(v: &Vfs, ns: &str, run: &str) -> u64 {
    let n = match v.lookup(ROOT_INO, os(ns)) {
        Ok(a) => a.ino,
        Err(_) => v.mkdir(CTX, ROOT_INO, os(ns), 0o755).unwrap().ino,
    };
    v.mkdir(CTX, n, os(run), 0o755).unwrap().ino
}

fn write_file(v: &Vfs, dir: u64, name: &str, data: &[u8]) -> u64 {
    let (a, fh) = v.create(CTX, dir, os(name), 0o644).unwrap();
    v.write(fh, 0, data).unwrap();
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    a.ino
}

impl Vfs {
    fn inode_run(&self, ino: u64) -> i64 {
        let st = self.lock();
        match self.node(&st, ino).unwrap() {
            Node::Open(i) => self.inode(i).unwrap().run,
            other => panic!("{other:?} is not in an open run"),
        }
    }
}

/// A view of a new store in `dir` with open run `ns/r`: the view and the run's inode.
fn fresh_run(dir: &Path) -> (Vfs, u64) {
    let v = Vfs::new(new_store(dir), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    (v, run)
}

/// `v` dropped and its store opened in a new view (what a remount sees), with the attributes
/// of open run `ns/run`.
fn reopen(v: Vfs, ns: &str, run: &str) -> (Vfs, Attr) {
    let store = v.store().root().to_path_buf();
    drop(v);
    let v = Vfs::new(Store::open(&store).unwrap(), VfsOptions::default()).unwrap();
    let r = v
        .lookup(v.lookup(ROOT_INO, os(ns)).unwrap().ino, os(run))
        .unwrap();
    (v, r)
}

fn read_all(v: &Vfs, ino: u64, step: u32) -> Vec<u8> {
    let (fh, _) = v.open(ino, false).unwrap();
    let mut out = Vec::new();
    loop {
        let d = v.read(fh, out.len() as u64, step).unwrap();
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
        v.wait_readahead();
    }
    v.release(fh).unwrap();
    out
}

/// `src` ingested as the sealed run `ns/run` of a new store in `dir`: a view of it and the
/// run's inode.
fn sealed_tree(dir: &Path, src: &Path) -> (Vfs, u64) {
    let store = new_store(dir);
    store
        .ingest_dir(
            src,
            &RunRef::parse("ns/run").unwrap(),
            BTreeMap::new(),
            &NoProgress,
        )
        .unwrap();
    let v = Vfs::new(store, VfsOptions::default()).unwrap();
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap().ino;
    let run = v.lookup(ns, os("run")).unwrap().ino;
    (v, run)
}

fn sealed_file(dir: &Path, opts: VfsOptions, data: &[u8]) -> (Vfs, u64) {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), data).unwrap();
    let store = new_store(dir);
    store
        .ingest_dir(
            &src,
            &RunRef::parse("ns/run").unwrap(),
            BTreeMap::new(),
            &NoProgress,
        )
        .unwrap();
    let v = Vfs::new(store, opts).unwrap();
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap().ino;
    let run = v.lookup(ns, os("run")).unwrap().ino;
    let f = v.lookup(run, os("big")).unwrap().ino;
    (v, f)
}

#[test]
fn vfs_readahead_loads_the_next_chunks_of_a_sequential_read() {
    let data = random_bytes(6 << 20, 1);
    let tmp = tempfile::tempdir().unwrap();
    let (v, f) = sealed_file(tmp.path(), VfsOptions::default(), &data);
    // Reads smaller than the smallest chunk: the first touches the first chunk only.
    assert!(read_all(&v, f, 8 << 10) == data);
    let s = v.cache_stats();
    assert_eq!(s.misses, 1, "only the first chunk is read on demand: {s:?}");
    assert!(s.readahead >= 5, "the other chunks were read ahead: {s:?}");

    // Without readahead every chunk is a miss.
    let tmp = tempfile::tempdir().unwrap();
    let opts = VfsOptions {
        readahead_bytes: 0,
        ..VfsOptions::default()
    };
    let (v, f) = sealed_file(tmp.path(), opts, &data);
    assert!(read_all(&v, f, 128 << 10) == data);
    let s = v.cache_stats();
    assert!(s.misses >= 6, "{s:?}");
    assert_eq!(s.readahead, 0);
}

/// As `vfs_a_scan_of_small_files_reads_the_next_files_ahead`, over several readahead windows
/// (60 files: a window is queued again as the scan nears the end of the last).
#[test]
fn vfs_a_scan_of_small_files_is_served_from_files_read_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| (format!("f{i:03}"), random_bytes(1500 + i, 100 + i as u64)))
        .collect();
    for (name, data) in &files {
        fs::write(src.join(name), data).unwrap();
    }
    let (v, run) = sealed_tree(tmp.path(), &src);
    let ino = |name: &str| v.lookup(run, os(name)).unwrap().ino;
    // Files opened in order, one after another, as tar does: after the first two, each was
    // loaded ahead (in batches: a window is queued again only when the scan nears its end).
    for (name, data) in &files {
        assert!(read_all(&v, ino(name), 64 << 10) == *data, "{name}");
        v.wait_readahead();
    }
    let s = v.cache_stats();
    assert_eq!(
        s.misses, 2,
        "only the files before the scan showed were read on demand: {s:?}"
    );
    assert_eq!(s.readahead, files.len() as u64 - 2, "{s:?}");
    assert_eq!(s.hits, files.len() as u64 - 2, "{s:?}");

    // Opens out of order are no scan: nothing is read ahead.
    let v = {
        let store = v.store().root().to_path_buf();
        drop(v);
        Vfs::new(Store::open(&store).unwrap(), VfsOptions::default()).unwrap()
    };
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap().ino;
    let run = v.lookup(ns, os("run")).unwrap().ino;
    for i in [50, 3, 40, 10, 30] {
        let (name, data) = &files[i];
        let f = v.lookup(run, os(name)).unwrap().ino;
        assert!(read_all(&v, f, 64 << 10) == *data);
    }
    v.wait_readahead();
    assert_eq!(v.cache_stats().readahead, 0);
}

#[test]
fn vfs_attributes_of_a_listing_match_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let small = write_file(&v, run, "small", b"tiny");
    let big = write_file(&v, run, "big", &random_bytes(3 << 20, 7));
    let d = v.mkdir(CTX, run, os("d"), 0o750).unwrap().ino;
    v.symlink(CTX, run, os("link"), Path::new("small")).unwrap();
    // Open, written and not closed: its length and times are the view's, not the index's.
    let (a, fh) = v.create(CTX, run, os("open"), 0o600).unwrap();
    v.write(fh, 0, b"written, not closed").unwrap();
    let inos: Vec<u64> = v.readdir(run).unwrap().iter().map(|e| e.ino).collect();
    let mut asked = inos.clone();
    asked.push(a.ino + 1_000_000);
    let batch = v.getattrs(&asked);
    for (ino, got) in asked.iter().zip(&batch) {
        match (v.getattr(*ino), got) {
            (Ok(want), Ok(got)) => assert_eq!(&want, got, "inode {ino}"),
            (Err(_), Err(_)) => {}
            (want, got) => panic!("inode {ino}: {want:?} one by one, {got:?} in the listing"),
        }
    }
    let size = |ino: u64| {
        batch[asked.iter().position(|&i| i == ino).unwrap()]
            .as_ref()
            .unwrap()
            .size
    };
    assert_eq!(size(small), 4);
    assert_eq!(size(big), 3 << 20);
    assert_eq!(size(a.ino), 19);
    assert!(
        batch.last().unwrap().is_err(),
        "an unknown inode is an error"
    );
    assert!(inos.contains(&d));
    v.release(fh).unwrap();
}

#[test]
fn vfs_a_seal_waits_a_moment_for_releases_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let v = Arc::new(v);
    let (_, fh) = v.create(CTX, run, os("f"), 0o644).unwrap();
    v.write(fh, 0, b"x").unwrap();
    v.flush(fh).unwrap();
    // The kernel's release comes after close returned: here, 100 ms after the seal asks.
    let late = {
        let v = v.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            v.release(fh).unwrap();
        })
    };
    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    late.join().unwrap();
    // A file held open past the grace: the seal fails, and goes through once it is closed.
    let run2 = open_run(&v, "ns", "r2");
    let (_, fh2) = v.create(CTX, run2, os("g"), 0o644).unwrap();
    let r2 = RunRef::parse("ns/r2").unwrap();
    assert!(matches!(v.seal(&r2), Err(Error::Busy(_))));
    v.release(fh2).unwrap();
    v.seal(&r2).unwrap();
}

#[test]
fn vfs_random_reads_do_not_read_ahead() {
    let data = random_bytes(6 << 20, 2);
    let tmp = tempfile::tempdir().unwrap();
    let (v, f) = sealed_file(tmp.path(), VfsOptions::default(), &data);
    let (fh, _) = v.open(f, false).unwrap();
    let at = 5 << 20;
    assert!(v.read(fh, at, 4096).unwrap() == data[at as usize..at as usize + 4096]);
    v.wait_readahead();
    assert_eq!(v.cache_stats().readahead, 0);
}

#[test]
fn vfs_rename_exchange_and_noreplace() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    let a = write_file(&v, run, "a", b"A");
    let d = v.mkdir(CTX, run, os("d"), 0o755).unwrap().ino;
    let inner = write_file(&v, d, "inner", b"I");

    v.rename(run, os("a"), run, os("d"), false, true).unwrap();
    assert_eq!(v.lookup(run, os("a")).unwrap().ino, d);
    assert_eq!(v.lookup(run, os("d")).unwrap().ino, a);
    assert_eq!(v.lookup(d, os("inner")).unwrap().ino, inner);

    // Across directories, and back.
    v.rename(d, os("inner"), run, os("d"), false, true).unwrap();
    assert_eq!(v.lookup(run, os("d")).unwrap().ino, inner);
    assert_eq!(v.lookup(d, os("inner")).unwrap().ino, a);

    // A directory cannot be swapped into itself.
    let sub = v.mkdir(CTX, d, os("sub"), 0o755).unwrap().ino;
    let e = v.rename(run, os("a"), sub, os("x"), false, false);
    assert!(matches!(e, Err(Error::Invalid { .. })), "{e:?}");
    write_file(&v, sub, "x", b"X");
    let e = v.rename(run, os("a"), sub, os("x"), false, true);
    assert!(matches!(e, Err(Error::Invalid { .. })), "{e:?}");

    let e = v.rename(run, os("a"), run, os("missing"), false, true);
    assert!(matches!(e, Err(Error::NotFound(_))), "{e:?}");
    let e = v.rename(run, os("a"), run, os("d"), true, true);
    assert!(matches!(e, Err(Error::Invalid { .. })), "{e:?}");
    let e = v.rename(run, os("d"), d, os("inner"), true, false);
    assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
    v.rename(run, os("d"), run, os("e"), true, false).unwrap();
    assert_eq!(v.lookup(run, os("e")).unwrap().ino, inner);

    // The sealed tree has the swapped names.
    let r = RunRef::parse("ns/r").unwrap();
    v.seal(&r).unwrap();
    let store = v.store();
    assert!(store.entry(&r, "e").unwrap().kind == Kind::File);
    assert!(store.entry(&r, "a/inner").unwrap().kind == Kind::File);
    assert!(store.entry(&r, "a/sub/x").unwrap().kind == Kind::File);
}

#[test]
fn vfs_seal_offline_seals_what_a_mount_left_open() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "left");
    write_file(&v, run, "f", b"left open");
    drop(v);

    let store = Store::open(&tmp.path().join("store")).unwrap();
    let r = RunRef::parse("ns/left").unwrap();
    let digest = seal_offline(&store, &r).unwrap();
    let row = store.run(&r).unwrap();
    assert_eq!(row.state, "sealed");
    assert_eq!(row.manifest, Some(digest));
    let mut out = Vec::new();
    store
        .read_file_to(&store.entry(&r, "f").unwrap(), &mut out)
        .unwrap();
    assert_eq!(out, b"left open");
    assert!(!store.root().join(format!("staging/{}", row.id)).exists());
    let again = seal_offline(&store, &r);
    assert!(matches!(again, Err(Error::ReadOnly(_))), "{again:?}");
    let missing = seal_offline(&store, &RunRef::parse("ns/none").unwrap());
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
}

#[test]
fn vfs_new_removes_staging_left_by_a_crash_after_a_seal() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let sealed = open_run(&v, "ns", "sealed");
    write_file(&v, sealed, "f", b"1");
    let open = open_run(&v, "ns", "open");
    // Past the inline size: the content is in a staging file.
    let big = vec![2u8; INLINE_MAX as usize + 1];
    write_file(&v, open, "g", &big);
    v.seal(&RunRef::parse("ns/sealed").unwrap()).unwrap();
    let staging = v.store().staging_dir();
    let ids: BTreeMap<String, i64> = v
        .store()
        .runs(None)
        .unwrap()
        .into_iter()
        .map(|r| (r.run.run.clone(), r.id))
        .collect();
    drop(v);
    // A crash between the seal's commit and the removal of its staging files leaves these.
    let left = staging.join(ids["sealed"].to_string());
    fs::create_dir_all(&left).unwrap();
    fs::write(left.join("7"), b"stale").unwrap();
    fs::create_dir_all(staging.join("not-a-run")).unwrap();
    let open_dir = staging.join(ids["open"].to_string());
    let open_files = fs::read_dir(&open_dir).unwrap().count();
    assert_eq!(open_files, 1);

    let v = Vfs::new(
        Store::open(&tmp.path().join("store")).unwrap(),
        VfsOptions::default(),
    )
    .unwrap();
    assert!(!left.exists(), "the sealed run's staging files are gone");
    assert_eq!(fs::read_dir(&open_dir).unwrap().count(), open_files);
    assert!(staging.join("not-a-run").exists());
    // The open run is whole.
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap().ino;
    let run = v.lookup(ns, os("open")).unwrap().ino;
    let g = v.lookup(run, os("g")).unwrap().ino;
    assert_eq!(read_all(&v, g, 4096), big);
}

#[test]
fn vfs_by_digest_serves_the_sealed_tree_under_other_inodes() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    let d = v.mkdir(CTX, run, os("d"), 0o755).unwrap().ino;
    write_file(&v, d, "f", b"by content");
    let digest = v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();

    let ctl = v.lookup(ROOT_INO, os(CONTROL_DIR)).unwrap().ino;
    let by = v.lookup(ctl, os("by-digest")).unwrap().ino;
    let names: Vec<String> = v.readdir(by).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, [".", "..", &digest.to_hex()]);
    let root = v.lookup(by, os(&digest.to_hex())).unwrap();
    assert!(root.immutable);
    let vd = v.lookup(root.ino, os("d")).unwrap();
    let vf = v.lookup(vd.ino, os("f")).unwrap();
    assert_eq!(read_all(&v, vf.ino, 4096), b"by content");
    // Not the inode numbers of NAMESPACE/RUN: a directory has one name in the kernel.
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap().ino;
    let by_name = v.lookup(ns, os("r")).unwrap();
    assert_ne!(by_name.ino, root.ino);
    assert_ne!(v.lookup(by_name.ino, os("d")).unwrap().ino, vd.ino);
    assert_eq!(
        v.getxattr(root.ino, os("user.artifactfs.manifest"))
            .unwrap(),
        digest.to_hex().into_bytes()
    );
    // Read-only, and unknown digests are not there.
    let e = v.create(CTX, vd.ino, os("new"), 0o644);
    assert!(matches!(e, Err(Error::ReadOnly(_))), "{e:?}");
    let e = v.mkdir(CTX, by, os("x"), 0o755);
    assert!(matches!(e, Err(Error::ReadOnly(_))), "{e:?}");
    let e = v.lookup(by, os(&"0".repeat(64)));
    assert!(matches!(e, Err(Error::NotFound(_))), "{e:?}");
    let e = v.lookup(by, os("not-hex"));
    assert!(matches!(e, Err(Error::NotFound(_))), "{e:?}");
}

/// While a run seals, the rest of the mount goes on (the state lock is free), and a change to
/// the sealing run waits for the seal and then meets a sealed run.
#[test]
fn vfs_seal_runs_without_the_state_lock_and_freezes_its_run() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Arc::new(Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap());
    let a = open_run(&v, "ns", "a");
    let fa = write_file(&v, a, "f", b"a");
    let b = open_run(&v, "ns", "b");
    let late = Arc::new(Mutex::new(None));
    {
        let v2 = Arc::downgrade(&v);
        let late = late.clone();
        *v.seal_hook.lock().unwrap() = Some(Box::new(move |_run| {
            let v = v2.upgrade().unwrap();
            assert!(v.state.try_lock().is_ok(), "the state lock is free");
            let run_a = v.inode_run(fa);
            assert!(v.lock().sealing.contains(&run_a));
            // Other runs change, the sealing one is read.
            write_file(&v, b, "g", b"b");
            assert_eq!(read_all(&v, fa, 4096), b"a");
            // A change to the sealing run waits on another thread.
            let t = std::thread::spawn(move || v.create(CTX, a, os("late"), 0o644).map(drop));
            *late.lock().unwrap() = Some(t);
        }));
    }
    v.seal(&RunRef::parse("ns/a").unwrap()).unwrap();
    v.seal_hook.lock().unwrap().take();
    let t = late.lock().unwrap().take().unwrap();
    let r = t.join().unwrap();
    assert!(matches!(r, Err(Error::ReadOnly(_))), "{r:?}");
    let r = RunRef::parse("ns/a").unwrap();
    assert!(matches!(
        v.store().entry(&r, "late"),
        Err(Error::NotFound(_))
    ));
    assert_eq!(v.store().run(&r).unwrap().state, "sealed");
    let g = v.lookup(b, os("g")).unwrap().ino;
    assert_eq!(read_all(&v, g, 4096), b"b");
}

/// A namespace's link count is 2 + its runs (counted, not listed), open or sealed; one with
/// runs cannot be removed.
#[test]
fn vfs_namespace_link_counts_are_its_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let ns_nlink = |name: &str| v.lookup(ROOT_INO, os(name)).unwrap().nlink;
    for i in 0..3 {
        let run = open_run(&v, "ns", &format!("r{i}"));
        write_file(&v, run, "f", b"x");
    }
    assert_eq!(ns_nlink("ns"), 5);
    v.seal(&RunRef::new("ns", "r0").unwrap()).unwrap();
    open_run(&v, "ns", "r3");
    assert_eq!(ns_nlink("ns"), 6);
    let empty = v.mkdir(CTX, ROOT_INO, os("empty"), 0o755).unwrap();
    assert_eq!((empty.nlink, ns_nlink("empty")), (2, 2));
    assert!(matches!(
        v.rmdir(ROOT_INO, os("ns")),
        Err(Error::NotEmpty(_))
    ));
    v.rmdir(ROOT_INO, os("empty")).unwrap();
    assert_eq!(ns_nlink("ns"), 6);
}

/// `rmdir` of a run directory removes an open run that is empty, has no open file and no hold;
/// its name is free again. A sealed run stays (EPERM).
#[test]
fn vfs_rmdir_removes_an_empty_open_run() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let store = v.store();
    let ns_nlink = || v.lookup(ROOT_INO, os("ns")).unwrap().nlink;
    let run = open_run(&v, "ns", "typo");
    let f = write_file(&v, run, "f", &random_bytes(300 << 10, 1));
    v.setxattr(run, os("user.note"), b"x", 0).unwrap();
    assert_eq!(ns_nlink(), 3);

    // Not empty; then with a file open (unlinked, still open): busy.
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap().ino;
    assert!(matches!(v.rmdir(ns, os("typo")), Err(Error::NotEmpty(_))));
    let (fh, _) = v.open(f, false).unwrap();
    v.unlink(run, os("f")).unwrap();
    assert!(matches!(v.rmdir(ns, os("typo")), Err(Error::Busy(_))));
    v.release(fh).unwrap();

    // A hold keeps it.
    store
        .place_hold(&RunRef::new("ns", "typo").unwrap(), "audit", b"keep")
        .unwrap();
    assert!(matches!(
        v.rmdir(ns, os("typo")),
        Err(Error::NotPermitted(m)) if m.contains("audit")
    ));
    store
        .remove_hold(&RunRef::new("ns", "typo").unwrap(), "audit")
        .unwrap();

    v.rmdir(ns, os("typo")).unwrap();
    assert!(matches!(v.lookup(ns, os("typo")), Err(Error::NotFound(_))));
    assert_eq!(ns_nlink(), 2);
    assert!(store.run(&RunRef::new("ns", "typo").unwrap()).is_err());
    let ev = store.events(0, 1000).unwrap();
    let last = ev.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.run.as_deref()),
        ("run.removed", Some("typo"))
    );
    let open = v.meta(|m| m.open_runs()).unwrap();
    assert!(open.is_empty(), "{open:?}");
    assert!(!v.staging.join("1").exists(), "its staging directory went");
    // The name is free again; nothing references a chunk of the removed file.
    let again = open_run(&v, "ns", "typo");
    let names: Vec<String> = v
        .readdir(again)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.iter().all(|n| n == "." || n == ".."), "{names:?}");
    assert_eq!(store.index().refcount_mismatches().unwrap(), vec![]);

    // A sealed run is not removed by rmdir.
    write_file(&v, again, "g", b"g");
    v.seal(&RunRef::new("ns", "typo").unwrap()).unwrap();
    assert!(matches!(
        v.rmdir(ns, os("typo")),
        Err(Error::NotPermitted(_))
    ));
    assert!(store.verify(None, &NoProgress).unwrap().ok());
}

/// A directory's link count is 2 + its subdirectories, through every change that adds, removes
/// or moves one (the counts are remembered between `getattr`s).
#[test]
fn vfs_directory_link_counts_follow_mkdir_rmdir_and_renames() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    let nlink = |ino: u64| v.getattr(ino).unwrap().nlink;
    assert_eq!(nlink(run), 2);
    for i in 0..50 {
        write_file(&v, run, &format!("f{i}"), b"x");
    }
    assert_eq!(nlink(run), 2);
    let a = v.mkdir(CTX, run, os("a"), 0o755).unwrap().ino;
    let b = v.mkdir(CTX, run, os("b"), 0o755).unwrap().ino;
    assert_eq!((nlink(run), nlink(a), nlink(b)), (4, 2, 2));
    v.mkdir(CTX, a, os("sub"), 0o755).unwrap();
    assert_eq!((nlink(run), nlink(a)), (4, 3));
    // Moved to another directory.
    v.rename(a, os("sub"), b, os("sub"), false, false).unwrap();
    assert_eq!((nlink(a), nlink(b)), (2, 3));
    // Replacing an empty directory, and swapping a directory with a file.
    v.mkdir(CTX, a, os("empty"), 0o755).unwrap();
    assert_eq!(nlink(a), 3);
    v.rename(b, os("sub"), a, os("empty"), false, false)
        .unwrap();
    assert_eq!((nlink(a), nlink(b)), (3, 2));
    v.rename(a, os("empty"), run, os("f0"), false, true)
        .unwrap();
    assert_eq!((nlink(run), nlink(a)), (5, 2));
    // An empty directory is removed (`f0` is now the moved `sub`); a non-empty one is not.
    v.rmdir(run, os("f0")).unwrap();
    assert_eq!(nlink(run), 4);
    let e = v.rmdir(run, os("a"));
    assert!(matches!(e, Err(Error::NotEmpty(_))), "{e:?}");
    assert_eq!(nlink(run), 4);
    // A file's rename (rsync and uploads rename every file into place) keeps the directory's
    // count: a large directory is not counted again for each file.
    let raw = match v.node(&v.lock(), run).unwrap() {
        Node::Open(i) => i,
        n => panic!("{n:?}"),
    };
    v.rename(run, os("f1"), run, os("g1"), false, false)
        .unwrap();
    assert!(v.subdirs.lock().unwrap().contains_key(&raw));
    assert_eq!(nlink(run), 4);
    v.rename(run, os("a"), run, os("a2"), false, false).unwrap();
    assert!(!v.subdirs.lock().unwrap().contains_key(&raw));
    assert_eq!(nlink(run), 4);
}

/// A sealed run of `n` small files `f00`, `f01`, … of random bytes (file `i`: `size + 10 * i`
/// bytes from seed `seed + i`): their contents, the view, and the run's inode.
fn sealed_small_files(dir: &Path, n: usize, size: usize, seed: u64) -> (Vec<Vec<u8>>, Vfs, u64) {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    let files: Vec<Vec<u8>> = (0..n)
        .map(|i| random_bytes(size + i * 10, seed + i as u64))
        .collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("f{i:02}")), d).unwrap();
    }
    let (v, run) = sealed_tree(dir, &src);
    (files, v, run)
}

/// Opening a sealed run's files one after another reads the next files ahead: after the first
/// two, the rest of a directory of small files are cache hits. Opens out of order do not.
#[test]
fn vfs_a_scan_of_small_files_reads_the_next_files_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, v, run) = sealed_small_files(tmp.path(), 12, 3000, 40);
    let ino = |i: usize| v.lookup(run, os(&format!("f{i:02}"))).unwrap().ino;

    // Out of order: no readahead.
    assert!(read_all(&v, ino(9), 1 << 20) == files[9]);
    assert!(read_all(&v, ino(3), 1 << 20) == files[3]);
    assert_eq!(v.cache_stats().readahead, 0);

    // In order from f04 (one after f03, opened last): only f04 is a miss, the rest were read
    // ahead.
    for (i, want) in files.iter().enumerate().skip(4) {
        assert!(read_all(&v, ino(i), 1 << 20) == *want, "f{i:02}");
        v.wait_readahead();
    }
    let s = v.cache_stats();
    assert_eq!((s.misses, s.hits), (3, 7), "{s:?}");
    assert!(s.readahead >= 6, "{s:?}");
}

/// A scan the kernel serves from its page cache opens each file and reads none: nothing is
/// read ahead for it. The same files read in order are read ahead as before.
#[test]
fn vfs_opens_without_reads_do_not_read_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, v, run) = sealed_small_files(tmp.path(), 20, 2000, 70);
    let ino = |i: usize| v.lookup(run, os(&format!("f{i:02}"))).unwrap().ino;

    for i in 0..files.len() {
        let (fh, _) = v.open(ino(i), false).unwrap();
        v.release(fh).unwrap();
    }
    v.wait_readahead();
    assert_eq!(v.cache_stats().readahead, 0, "{:?}", v.cache_stats());

    for (i, want) in files.iter().enumerate() {
        assert!(read_all(&v, ino(i), 1 << 20) == *want, "f{i:02}");
        v.wait_readahead();
    }
    let s = v.cache_stats();
    assert_eq!(s.misses, 2, "{s:?}");
    assert_eq!(s.readahead, files.len() as u64 - 2, "{s:?}");
}

/// Files handed to the kernel's page cache, in order: (inode number, content).
type Pushed = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// What the view `v` hands to the kernel from now on.
fn record_pushes(v: &Vfs) -> Pushed {
    let pushed = Arc::new(Mutex::new(Vec::new()));
    let sink = pushed.clone();
    v.set_content_pusher(Some(Box::new(move |ino, data| {
        sink.lock().unwrap().push((ino, data.to_vec()));
    })));
    pushed
}

/// A scan of a sealed run hands the whole content of the small files it reads next to the
/// kernel, under their inode numbers, once each; a file above the size limit is only read
/// ahead into the view's cache. Nothing is handed over before the reads make a scan.
#[test]
fn vfs_a_scan_hands_the_next_small_files_to_the_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let files: Vec<Vec<u8>> = (0..12)
        .map(|i| {
            let len = if i == 5 {
                PUSH_MAX_BYTES as usize + 1
            } else {
                2000 + i * 10
            };
            random_bytes(len, 90 + i as u64)
        })
        .collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("f{i:02}")), d).unwrap();
    }
    let (v, run) = sealed_tree(tmp.path(), &src);
    let pushed = record_pushes(&v);
    let ino = |i: usize| v.lookup(run, os(&format!("f{i:02}"))).unwrap().ino;

    assert!(read_all(&v, ino(0), 1 << 20) == files[0]);
    v.wait_readahead();
    assert!(pushed.lock().unwrap().is_empty(), "one read is no scan");
    assert!(read_all(&v, ino(1), 1 << 20) == files[1]);
    v.wait_readahead();
    let got = pushed.lock().unwrap().clone();
    let want: Vec<usize> = (2..12).filter(|&i| i != 5).collect();
    assert_eq!(
        got.iter().map(|p| p.0).collect::<Vec<_>>(),
        want.iter().map(|&i| ino(i)).collect::<Vec<_>>()
    );
    for (p, &i) in got.iter().zip(&want) {
        assert!(p.1 == files[i], "content of f{i:02}");
    }
    // The large file was read ahead all the same: its read is a cache hit.
    let misses = v.cache_stats().misses;
    assert!(read_all(&v, ino(5), 1 << 20) == files[5]);
    assert_eq!(v.cache_stats().misses, misses, "{:?}", v.cache_stats());
    assert_eq!(pushed.lock().unwrap().len(), want.len(), "pushed twice");
}

/// The files handed to the kernel are read from its page cache, so the view sees their opens
/// but no reads: opens inside the window queued ahead carry the scan on, and the files after
/// the window are handed over in time, each once.
#[test]
fn vfs_opens_inside_a_scans_window_carry_it_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, v, run) = sealed_small_files(tmp.path(), 40, 1500, 120);
    let pushed = record_pushes(&v);
    let ino = |i: usize| v.lookup(run, os(&format!("f{i:02}"))).unwrap().ino;

    for (i, want) in files.iter().enumerate().take(2) {
        assert!(read_all(&v, ino(i), 1 << 20) == *want);
        v.wait_readahead();
    }
    assert_eq!(pushed.lock().unwrap().len(), SCAN_AHEAD_FILES);
    // The kernel serves the rest: opens and releases only.
    for i in 2..files.len() {
        let (fh, _) = v.open(ino(i), false).unwrap();
        v.release(fh).unwrap();
        v.wait_readahead();
    }
    let got = pushed.lock().unwrap().clone();
    assert_eq!(
        got.iter().map(|p| p.0).collect::<Vec<_>>(),
        (2..files.len()).map(ino).collect::<Vec<_>>()
    );
    for (p, i) in got.iter().zip(2..) {
        assert!(p.1 == files[i], "content of f{i:02}");
    }
}

/// A chunk another thread is loading is waited for, not read and decoded a second time: a
/// read gets what that thread caches, and readahead leaves it alone.
#[test]
fn vfs_a_chunk_being_loaded_is_waited_for_not_decoded_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, v, _) = sealed_small_files(tmp.path(), 1, 3000, 7);
    // Not in the store: a read that loaded it itself would fail.
    let id = ChunkId::of(b"loaded by another thread");
    v.cache.inner().loading.insert(id);
    let (cache, store) = (v.cache.clone(), v.store.clone());
    let reader = std::thread::spawn(move || cache.get(&store, &id));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!reader.is_finished(), "the read did not wait");
    assert!(!v.cache.load_ahead(&v.store, &id).unwrap());

    v.cache.insert(&id, Arc::new(b"decoded once".to_vec()));
    v.cache.inner().loading.remove(&id);
    v.cache.loaded.notify_all();
    let got = reader.join().unwrap().unwrap();
    assert_eq!(&got[..], b"decoded once");
    assert_eq!(v.cache_stats().misses, 0, "{:?}", v.cache_stats());
}

fn staged(v: &Vfs, ino: u64) -> bool {
    let st = v.lock();
    let Node::Open(i) = v.node(&st, ino).unwrap() else {
        panic!("{ino} is not in an open run")
    };
    let row = v.inode(i).unwrap();
    v.staging_path(row.run, i).exists()
}

fn inline_len(v: &Vfs, ino: u64) -> Option<u64> {
    let st = v.lock();
    let Node::Open(i) = v.node(&st, ino).unwrap() else {
        panic!("{ino} is not in an open run")
    };
    v.store().index().meta(|m| m.inline_len(i)).unwrap()
}

/// Small files keep their content in the index (no staging file), survive a new view of the
/// store, take random writes and truncation, and move to a staging file when they grow; the
/// seal gives what an ingest of the same tree gives.
#[test]
fn vfs_small_files_live_in_the_index_until_they_grow() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    let small = write_file(&v, run, "small", b"hello world");
    assert!(!staged(&v, small));
    assert_eq!(inline_len(&v, small), Some(11));
    assert_eq!(v.getattr(small).unwrap().size, 11);

    // Random writes past the end leave a hole of zeros; truncation shortens.
    let (fh, _) = v.open(small, true).unwrap();
    v.write(fh, 20, b"!").unwrap();
    v.write(fh, 0, b"J").unwrap();
    assert_eq!(
        v.read(fh, 0, 100).unwrap(),
        b"Jello world\0\0\0\0\0\0\0\0\0!"
    );
    v.release(fh).unwrap();
    let set = SetAttr {
        size: Some(5),
        ..Default::default()
    };
    v.setattr(small, set, None).unwrap();
    assert_eq!(read_all(&v, small, 3), b"Jello");

    // Growing past the inline size moves it to a staging file, open handles included.
    let (fh, _) = v.open(small, true).unwrap();
    let (reader, _) = v.open(small, false).unwrap();
    let tail = random_bytes(INLINE_MAX as usize, 1);
    v.write(fh, 5, &tail).unwrap();
    assert!(staged(&v, small));
    assert_eq!(inline_len(&v, small), None);
    let mut want = b"Jello".to_vec();
    want.extend_from_slice(&tail);
    assert_eq!(
        v.read(reader, 0, 8).unwrap(),
        b"Jello"
            .iter()
            .chain(&tail[..3])
            .copied()
            .collect::<Vec<u8>>()
    );
    v.release(fh).unwrap();
    v.release(reader).unwrap();
    assert_eq!(read_all(&v, small, 4096), want);

    // Unflushed writes of an open handle are in memory only; a closed file is in the index.
    let other = write_file(&v, run, "other", b"kept");
    let empty = write_file(&v, run, "empty", b"");
    drop(v);
    let v = Vfs::new(
        Store::open(&tmp.path().join("store")).unwrap(),
        VfsOptions::default(),
    )
    .unwrap();
    assert_eq!(read_all(&v, other, 7), b"kept");
    assert_eq!(read_all(&v, small, 4096), want);
    assert_eq!(v.getattr(empty).unwrap().size, 0);

    // The seal equals an ingest of the same tree.
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for (name, data) in [("small", &want[..]), ("other", b"kept"), ("empty", b"")] {
        fs::write(src.join(name), data).unwrap();
    }
    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    let store = v.store();
    let ing = RunRef::parse("ns/ingested").unwrap();
    store
        .ingest_dir(&src, &ing, BTreeMap::new(), &NoProgress)
        .unwrap();
    let (_, sealed) = store.manifest(&RunRef::parse("ns/r").unwrap()).unwrap();
    let (_, ingested) = store.manifest(&ing).unwrap();
    let files = |m: &Manifest| -> Vec<(
        String,
        u64,
        Option<crate::id::FileHash>,
        Vec<crate::manifest::ChunkRef>,
    )> {
        m.entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| (e.path.clone(), e.size, e.blake3, e.chunks.clone()))
            .collect()
    };
    assert_eq!(files(&sealed), files(&ingested));
}

/// Closed files are chunked ahead of the seal, which then writes nothing new; a file changed
/// after that is chunked again by the seal; chunks gc swept meanwhile are written again.
#[test]
fn vfs_closed_files_are_chunked_ahead_of_the_seal() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    let a = random_bytes(3 << 20, 2);
    let b = random_bytes(100, 3);
    write_file(&v, run, "a", &a);
    let bi = write_file(&v, run, "b", &b);
    v.preseal.wait_idle();
    let chunks_before = v.store().stats().unwrap().chunks;
    assert!(chunks_before > 1, "chunked ahead: {chunks_before} chunks");
    // `b` changes after it was chunked: the seal must not take the old chunks.
    let (fh, _) = v.open(bi, true).unwrap();
    v.write(fh, 0, b"changed").unwrap();
    v.release(fh).unwrap();
    v.preseal.wait_idle();
    let mut b2 = b.clone();
    b2[..7].copy_from_slice(b"changed");

    // gc with no grace sweeps the unreferenced chunks of the first `b`, and of `a` too: the
    // seal finds them gone and chunks `a` again.
    let opts = crate::gc::GcOptions {
        grace: Duration::ZERO,
        ..Default::default()
    };
    let rep = v.store().gc(&opts, &NoProgress).unwrap();
    assert!(rep.chunks_swept >= 1, "{rep:?}");
    let digest = v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    let store = v.store();
    let r = RunRef::parse("ns/r").unwrap();
    assert_eq!(store.run(&r).unwrap().manifest, Some(digest));
    for (name, want) in [("a", &a), ("b", &b2)] {
        let mut out = Vec::new();
        store
            .read_file_to(&store.entry(&r, name).unwrap(), &mut out)
            .unwrap();
        assert_eq!(&out, want, "{name}");
    }
    assert!(store.verify(None, &NoProgress).unwrap().ok());

    // Without gc in between, the seal writes no chunk of its own.
    let run2 = open_run(&v, "ns", "r2");
    let c = random_bytes(2 << 20, 4);
    write_file(&v, run2, "c", &c);
    v.preseal.wait_idle();
    let before = v.store().stats().unwrap();
    v.seal(&RunRef::parse("ns/r2").unwrap()).unwrap();
    let after = v.store().stats().unwrap();
    assert_eq!(after.chunks, before.chunks);
    assert_eq!(after.packs, before.packs);
    assert_eq!(v.preseal.pending(), 0);
}

/// A large file being chunked ahead that is deleted, or changed, meanwhile stops being read:
/// the seal (which waits for the batch holding it) and the unmount do not wait for a file
/// nobody needs any more.
#[test]
fn a_file_changed_or_deleted_while_chunked_ahead_stops_being_read() {
    const BIG: u64 = 16 << 30;
    let tmp = tempfile::tempdir().unwrap();
    let v = Vfs::new(new_store(tmp.path()), VfsOptions::default()).unwrap();
    let run = open_run(&v, "ns", "r");
    let truncate = |ino: u64, size: u64| {
        let set = SetAttr {
            size: Some(size),
            ..Default::default()
        };
        v.setattr(ino, set, None).unwrap();
    };
    let started = |before: u64| {
        while v.preseal.bytes_read() == before {
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    // Deleted: a 16 GiB sparse file, closed (queued), unlinked and forgotten while read.
    let big = write_file(&v, run, "big", b"x");
    v.remember(&v.getattr(big).unwrap());
    let (fh, _) = v.open(big, true).unwrap();
    truncate(big, BIG);
    v.release(fh).unwrap();
    started(0);
    v.unlink(run, os("big")).unwrap();
    v.forget(big, 1);
    v.preseal.wait_idle();
    let read = v.preseal.bytes_read();
    assert!(read < BIG, "read all {read} bytes of a deleted file");

    // Changed: truncated to a few bytes while read; the new content is what the seal takes.
    let other = write_file(&v, run, "other", b"y");
    let (fh, _) = v.open(other, true).unwrap();
    truncate(other, BIG);
    v.release(fh).unwrap();
    started(read);
    truncate(other, 3);
    v.preseal.wait_idle();
    assert!(v.preseal.bytes_read() - read < BIG);
    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    let store = v.store();
    let r = RunRef::parse("ns/r").unwrap();
    let mut out = Vec::new();
    store
        .read_file_to(&store.entry(&r, "other").unwrap(), &mut out)
        .unwrap();
    assert_eq!(out, b"y\0\0");
    assert!(store.entry(&r, "big").is_err());
}

#[test]
fn a_minimal_acl_is_a_chmod_by_the_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let f = write_file(&v, run, "f", b"x");
    let user = Ctx {
        uid: 1000,
        gid: 1000,
    };
    let mine = write_file(&v, run, "mine", b"y");
    v.setattr(
        mine,
        SetAttr {
            uid: Some(1000),
            gid: Some(50),
            mode: Some(0o2640),
            ..SetAttr::default()
        },
        None,
    )
    .unwrap();
    let acl = |u: u16, g: u16, o: u16| {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in [(1u16, u), (4, g), (0x20, o)] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        v
    };
    // Not the owner: refused, nothing changes.
    assert!(matches!(
        v.set_access_acl(user, f, &acl(7, 7, 7), 0),
        Err(Error::NotPermitted(_))
    ));
    assert_eq!(v.getattr(f).unwrap().mode, 0o644);
    // The owner, not in the file's group: the bits, and set-group-ID cleared as by chmod.
    v.set_access_acl(user, mine, &acl(6, 4, 4), 0).unwrap();
    assert_eq!(v.getattr(mine).unwrap().mode, 0o644);
    // Root, for any file; the change is in the index (a new view sees it).
    v.set_access_acl(CTX, f, &acl(6, 0, 0), 0).unwrap();
    assert_eq!(v.getattr(f).unwrap().mode, 0o600);
    assert!(matches!(
        v.set_access_acl(CTX, f, &acl(6, 0, 0), XATTR_REPLACE),
        Err(Error::NoAttr(_))
    ));
    let (v, run) = reopen(v, "ns", "r");
    assert_eq!(v.lookup(run.ino, os("f")).unwrap().mode, 0o600);
}

#[test]
fn attribute_changes_of_an_open_file_are_kept_with_its_next_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let (a, fh) = v.create(CTX, run, os("f"), 0o644).unwrap();
    v.write(fh, 0, b"data").unwrap();
    // cp -a: chown, utimens, chmod while the file is open; a hard link made meanwhile.
    let set = |s: SetAttr| v.setattr(a.ino, s, Some(fh)).unwrap();
    set(SetAttr {
        uid: Some(1000),
        gid: Some(1000),
        ..SetAttr::default()
    });
    v.link(a.ino, run, os("g")).unwrap();
    let got = set(SetAttr {
        mtime_ns: Some(Some(1_000_000_123)),
        ..SetAttr::default()
    });
    assert_eq!(got.mtime_ns, 1_000_000_123);
    let got = set(SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    });
    assert_eq!((got.mode, got.uid, got.gid), (0o600, 1000, 1000));
    assert_eq!((got.nlink, got.mtime_ns), (2, 1_000_000_123));
    assert_eq!(v.getattr(a.ino).unwrap(), got);
    // A file opened again sees the same; its write moves mtime past the utimens.
    let (fh2, _) = v.open(a.ino, true).unwrap();
    v.write(fh2, 4, b"more").unwrap();
    let written = v.getattr(a.ino).unwrap();
    assert!(written.mtime_ns > 1_000_000_123);
    v.release(fh2).unwrap();
    // A utimens after the write wins again.
    set(SetAttr {
        mtime_ns: Some(Some(2_000_000_456)),
        ..SetAttr::default()
    });
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    let (v, run) = reopen(v, "ns", "r");
    let f = v.lookup(run.ino, os("f")).unwrap();
    assert_eq!(
        (f.mode, f.uid, f.gid, f.nlink, f.mtime_ns, f.size),
        (0o600, 1000, 1000, 2, 2_000_000_456, 8)
    );
    assert_eq!(v.lookup(run.ino, os("g")).unwrap().ino, f.ino);
}

#[test]
fn a_seal_gives_the_index_space_of_inline_files_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    for i in 0..200u64 {
        write_file(&v, run, &format!("f{i}"), &random_bytes(32 << 10, i));
    }
    let index = v.store().root().join("index.sqlite");
    v.store().index().sync().unwrap();
    let before = fs::metadata(&index).unwrap().len();
    assert!(
        before > 6 << 20,
        "the files are inline in the index: {before}"
    );
    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    let after = fs::metadata(&index).unwrap().len();
    assert!(
        after < before - (5 << 20),
        "free pages went back: {before} -> {after}"
    );
}

/// Whether the close journal of `v`'s store holds the creation of a file named `name`.
fn journaled(v: &Vfs, name: &str) -> bool {
    let path = crate::index::journal::path_for(&v.store().root().join("index.sqlite"));
    crate::index::journal::read(&path)
        .unwrap()
        .is_some_and(|c| {
            c.steps.iter().any(
                |(_, s)| matches!(s, crate::index::journal::Step::Create { name: n, .. } if n == name),
            )
        })
}

/// Whether a connection of its own (another process, or what a crash leaves) finds a directory
/// entry named `name` in the index of `v`.
fn committed(v: &Vfs, name: &str) -> bool {
    let conn = rusqlite::Connection::open(v.store().root().join("index.sqlite")).unwrap();
    conn.query_row(
        "SELECT count(*) FROM dentries WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

#[test]
fn a_new_file_commits_with_its_close_and_before_anyone_else_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    // Created and written: the view sees it, the index file not yet.
    let (a, fh) = v.create(CTX, run, os("a"), 0o644).unwrap();
    v.write(fh, 0, b"first").unwrap();
    assert_eq!(v.lookup(run, os("a")).unwrap().ino, a.ino);
    assert!(!committed(&v, "a"));
    // A step that fails inside the open transaction undoes only itself.
    assert!(matches!(
        v.create(CTX, run, os("a"), 0o644),
        Err(Error::AlreadyExists(_))
    ));
    // The close writes the creation and the content to the journal (ADR 0031); they commit
    // with the journal's batch.
    v.flush(fh).unwrap();
    assert!(journaled(&v, "a"));
    assert!(!committed(&v, "a"));
    v.release(fh).unwrap();
    // A file closed without a write or an attribute change is journaled all the same.
    let (_, fh) = v.create(CTX, run, os("empty"), 0o644).unwrap();
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    assert!(journaled(&v, "empty"));
    // The batch commits once its first close is a second old (the mount's tick).
    std::thread::sleep(crate::index::JOURNAL_BATCH_AGE);
    v.tick();
    assert!(committed(&v, "a") && committed(&v, "empty"));
    assert!(!journaled(&v, "a"), "a commit empties the journal");
    // Any other user of the store reads committed state: taking the index commits first.
    // (The files closed above are chunked ahead in the background, which takes it too.)
    v.preseal.wait_idle();
    let (_, fh) = v.create(CTX, run, os("b"), 0o644).unwrap();
    assert!(!committed(&v, "b"));
    v.store().stats().unwrap();
    assert!(committed(&v, "b"));
    v.write(fh, 0, b"second").unwrap();
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    // So does a directory, which no close follows.
    v.mkdir(CTX, run, os("d"), 0o755).unwrap();
    assert!(committed(&v, "d"));
    let (v, run) = reopen(v, "ns", "r");
    for (name, size) in [("a", 5), ("empty", 0), ("b", 6)] {
        assert_eq!(v.lookup(run.ino, os(name)).unwrap().size, size, "{name}");
    }
}

#[test]
fn a_file_released_before_its_rename_commits_with_the_rename() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let (_, fh) = v.create(CTX, run, os(".upload"), 0o644).unwrap();
    v.write(fh, 0, b"uploaded bytes").unwrap();
    v.release_before_rename(fh).unwrap();
    v.rename(run, os(".upload"), run, os("final"), false, false)
        .unwrap();
    // The rename's commit carries the file's creation, content and new name.
    assert!(committed(&v, "final"));
    assert!(!committed(&v, ".upload"));
    let (v, run) = reopen(v, "ns", "r");
    let a = v.lookup(run.ino, os("final")).unwrap();
    assert_eq!(a.size, 14);
    let (fh, _) = v.open(a.ino, false).unwrap();
    assert_eq!(&v.read(fh, 0, 100).unwrap()[..], b"uploaded bytes");
    v.release(fh).unwrap();
}

fn open_inode(v: &Vfs, ino: u64) -> i64 {
    let st = v.lock();
    match v.node(&st, ino).unwrap() {
        Node::Open(i) => i,
        other => panic!("{other:?} is not in an open run"),
    }
}

fn streaming(v: &Vfs, ino: u64) -> bool {
    let i = open_inode(v, ino);
    v.lock().streams.contains_key(&i)
}

fn chunked_row(v: &Vfs, ino: u64) -> Option<ChunkedContent> {
    let i = open_inode(v, ino);
    v.store().index().meta(|m| m.chunked(i)).unwrap()
}

/// Writes `data` to a new file `name` in 1 MiB appends; returns the inode and the open handle.
fn append_file(v: &Vfs, dir: u64, name: &str, data: &[u8]) -> (u64, u64) {
    let (a, fh) = v.create(CTX, dir, os(name), 0o644).unwrap();
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        v.write(fh, (i << 20) as u64, piece).unwrap();
    }
    (a.ino, fh)
}

/// A file written front to back streams into the chunker once it passes `STREAM_AT`; its
/// close stores it as a chunk list (no staging file left), it reads back through a new handle
/// and after a remount, and the seal gives what `ingest` of the same bytes gives.
#[test]
fn a_file_written_front_to_back_is_chunked_as_it_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let data = random_bytes(20 << 20, 7);
    let (ino, fh) = append_file(&v, run, "big", &data);
    assert!(
        streaming(&v, ino),
        "streams past {} bytes",
        stream::STREAM_AT
    );
    assert_eq!(v.getattr(ino).unwrap().size, data.len() as u64);
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    assert!(!streaming(&v, ino));
    assert!(!staged(&v, ino), "the staging prefix is gone");
    let c = chunked_row(&v, ino).expect("kept as a chunk list");
    assert_eq!(c.size, data.len() as u64);
    assert_eq!(c.hash, FileHash::of(&data));
    assert_eq!(read_all(&v, ino, 1 << 20), data);
    assert_eq!(v.store().index().refcount_mismatches().unwrap(), vec![]);

    let (v, r) = reopen(v, "ns", "r");
    let ino = v.lookup(r.ino, os("big")).unwrap().ino;
    assert_eq!(v.getattr(ino).unwrap().size, data.len() as u64);
    assert_eq!(read_all(&v, ino, 300_000), data);
    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();

    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), &data).unwrap();
    let rr = RunRef::parse("ns/ingested").unwrap();
    v.store()
        .ingest_dir(&src, &rr, BTreeMap::new(), &NoProgress)
        .unwrap();
    let sealed = v
        .store()
        .entry(&RunRef::parse("ns/r").unwrap(), "big")
        .unwrap();
    let ingested = v.store().entry(&rr, "big").unwrap();
    assert_eq!(sealed.blake3, ingested.blake3);
    assert_eq!(sealed.chunks, ingested.chunks);
    assert_eq!(v.store().index().refcount_mismatches().unwrap(), vec![]);
    assert!(v.store().verify(None, &NoProgress).unwrap().ok());
}

/// Anything but an append sends a streaming or chunked file back to its staging file, with
/// every byte: a write in the middle, a read, a truncation, a reopen and append.
#[test]
fn a_stream_goes_back_to_its_staging_file_for_anything_but_an_append() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let mut want = random_bytes(12 << 20, 8);

    // A write in the middle while streaming.
    let (ino, fh) = append_file(&v, run, "mid", &want);
    assert!(streaming(&v, ino));
    v.write(fh, 5 << 20, b"patched").unwrap();
    want[5 << 20..(5 << 20) + 7].copy_from_slice(b"patched");
    assert!(!streaming(&v, ino));
    assert!(staged(&v, ino));
    // More appends stay in the staging file.
    v.write(fh, want.len() as u64, b"tail").unwrap();
    want.extend_from_slice(b"tail");
    assert!(!streaming(&v, ino));
    v.release(fh).unwrap();
    assert_eq!(chunked_row(&v, ino), None);
    assert_eq!(read_all(&v, ino, 1 << 20), want);

    // A read while streaming, through a second handle.
    let other = random_bytes(10 << 20, 9);
    let (ino2, fh2) = append_file(&v, run, "read", &other);
    let (rfh, _) = v.open(ino2, false).unwrap();
    assert_eq!(
        v.read(rfh, 3 << 20, 4096).unwrap(),
        other[3 << 20..(3 << 20) + 4096]
    );
    assert!(!streaming(&v, ino2));
    v.release(rfh).unwrap();
    v.release(fh2).unwrap();
    assert_eq!(read_all(&v, ino2, 1 << 20), other);

    // A closed chunked file: truncated, then reopened and appended to.
    let third = random_bytes(9 << 20, 10);
    let (ino3, fh3) = append_file(&v, run, "trunc", &third);
    v.release(fh3).unwrap();
    assert!(chunked_row(&v, ino3).is_some());
    let set = SetAttr {
        size: Some(1 << 20),
        ..Default::default()
    };
    v.setattr(ino3, set, None).unwrap();
    assert_eq!(chunked_row(&v, ino3), None);
    assert_eq!(read_all(&v, ino3, 1 << 20), third[..1 << 20]);
    let fourth = random_bytes(9 << 20, 11);
    let (ino4, fh4) = append_file(&v, run, "append", &fourth);
    v.release(fh4).unwrap();
    let (fh4, _) = v.open(ino4, true).unwrap();
    v.write(fh4, fourth.len() as u64, b"more").unwrap();
    v.release(fh4).unwrap();
    let mut want4 = fourth.clone();
    want4.extend_from_slice(b"more");
    assert_eq!(read_all(&v, ino4, 1 << 20), want4);
    assert_eq!(v.store().index().refcount_mismatches().unwrap(), vec![]);

    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    let r = RunRef::parse("ns/r").unwrap();
    for (name, want) in [
        ("mid", &want),
        ("read", &other),
        ("trunc", &third[..1 << 20].to_vec()),
        ("append", &want4),
    ] {
        let mut out = Vec::new();
        v.store()
            .read_file_to(&v.store().entry(&r, name).unwrap(), &mut out)
            .unwrap();
        assert_eq!(&out, want, "{name}");
    }
    assert!(v.store().verify(None, &NoProgress).unwrap().ok());
}

/// A chunked file's chunks are referenced: gc with no grace keeps them, an unlink gives
/// them back, and a gc while a file streams sends it to its staging file first.
#[test]
fn chunked_files_hold_their_chunks_against_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let data = random_bytes(10 << 20, 12);
    let (ino, fh) = append_file(&v, run, "kept", &data);
    v.release(fh).unwrap();
    let opts = crate::gc::GcOptions {
        grace: Duration::ZERO,
        ..Default::default()
    };
    let rep = v.gc(&opts, &NoProgress).unwrap();
    assert_eq!(rep.chunks_swept, 0, "{rep:?}");
    assert_eq!(read_all(&v, ino, 1 << 20), data);

    // gc while a file streams: the file goes to its staging file and keeps every byte.
    let more = random_bytes(10 << 20, 13);
    let (ino2, fh2) = append_file(&v, run, "busy", &more);
    assert!(streaming(&v, ino2));
    v.gc(&opts, &NoProgress).unwrap();
    assert!(!streaming(&v, ino2));
    v.write(fh2, more.len() as u64, b"end").unwrap();
    v.release(fh2).unwrap();
    let mut want = more.clone();
    want.extend_from_slice(b"end");
    assert_eq!(read_all(&v, ino2, 1 << 20), want);

    // An unlinked chunked file gives its references back once the kernel forgets it (until
    // then it lives on, as on a local file system); gc then sweeps its chunks.
    v.remember(&v.getattr(ino).unwrap()); // as the kernel does after a lookup
    v.unlink(run, os("kept")).unwrap();
    assert_eq!(v.getattr(ino).unwrap().nlink, 0);
    assert_eq!(read_all(&v, ino, 1 << 20), data);
    v.forget(ino, 1);
    assert!(matches!(v.getattr(ino), Err(Error::NotFound(_))));
    assert_eq!(v.store().index().refcount_mismatches().unwrap(), vec![]);
    let rep = v.gc(&opts, &NoProgress).unwrap();
    assert!(rep.chunks_swept > 100, "{rep:?}");
    assert_eq!(v.store().index().refcount_mismatches().unwrap(), vec![]);
    v.seal(&RunRef::parse("ns/r").unwrap()).unwrap();
    assert!(v.store().verify(None, &NoProgress).unwrap().ok());
}

/// `.artifactfs/status`, parsed.
fn status(v: &Vfs) -> serde_json::Value {
    let ctl = v.lookup(ROOT_INO, os(CONTROL_DIR)).unwrap().ino;
    let ino = v.lookup(ctl, os("status")).unwrap().ino;
    serde_json::from_slice(&read_all(v, ino, 1 << 16)).unwrap()
}

#[test]
fn vfs_status_tells_when_each_open_run_seals_and_how_the_chunk_cache_does() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = VfsOptions {
        seal_after: Duration::from_secs(600),
        seal_marker: Some("_SUCCESS".into()),
        ..VfsOptions::default()
    };
    let v = Vfs::new(new_store(tmp.path()), opts).unwrap();
    open_run(&v, "lab", "a");
    let b = open_run(&v, "lab", "b");
    let (_, fh) = v.create(CTX, b, os("log"), 0o644).unwrap();
    v.write(fh, 0, b"running").unwrap();

    let s = status(&v);
    assert_eq!(s["seal_after_s"], 600.0);
    let runs = s["open_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{s}");
    let (ra, rb) = (&runs[0], &runs[1]);
    assert_eq!(
        (ra["run"].as_str(), rb["run"].as_str()),
        (Some("lab/a"), Some("lab/b"))
    );
    assert_eq!(ra["open_files"], 0);
    let left = ra["seals_in_s"].as_f64().unwrap();
    assert!((590.0..=600.0).contains(&left), "{ra}");
    assert_eq!(rb["open_files"], 1);
    assert!(
        rb["seals_in_s"].is_null(),
        "a run with a file open does not seal: {rb}"
    );
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    assert!(status(&v)["open_runs"][1]["seals_in_s"].as_f64().unwrap() > 590.0);

    // The marker makes `b` due now (the ticker seals it); a sealed run is no longer listed.
    write_file(&v, b, "_SUCCESS", b"");
    assert_eq!(status(&v)["open_runs"][1]["seals_in_s"], 0.0);
    v.seal(&RunRef::parse("lab/a").unwrap()).unwrap();
    v.tick();
    let s = status(&v);
    assert_eq!(s["open_runs"], serde_json::json!([]), "{s}");
    assert_eq!(s["runs"]["sealed"], 2);

    // Reading a sealed file twice: misses, then hits, and the cache holds its chunks.
    let data = random_bytes(300 << 10, 3);
    write_file(&v, open_run(&v, "lab", "c"), "big", &data);
    v.seal(&RunRef::parse("lab/c").unwrap()).unwrap();
    let c = v
        .lookup(v.lookup(ROOT_INO, os("lab")).unwrap().ino, os("c"))
        .unwrap()
        .ino;
    let f = v.lookup(c, os("big")).unwrap().ino;
    let before = status(&v)["chunk_cache"].clone();
    assert!(read_all(&v, f, 64 << 10) == data);
    let mid = status(&v)["chunk_cache"].clone();
    assert!(read_all(&v, f, 64 << 10) == data);
    let after = status(&v)["chunk_cache"].clone();
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert!(
        n(&mid, "misses") + n(&mid, "readahead") > n(&before, "misses"),
        "{mid}"
    );
    assert!(n(&after, "hits") > n(&mid, "hits"), "{after}");
    assert_eq!(
        n(&after, "misses"),
        n(&mid, "misses"),
        "the second read decodes nothing"
    );
    assert!(n(&after, "bytes") >= data.len() as u64, "{after}");
    assert_eq!(n(&after, "capacity_bytes"), 128 << 20);
}

#[test]
fn closed_files_wait_in_the_journal_and_neither_a_rollback_nor_a_crash_loses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    // Closed (flushed) and still open, so that nothing else takes the index meanwhile.
    let write = |names: &[String]| {
        for (i, name) in names.iter().enumerate() {
            let (a, fh) = v.create(CTX, run, os(name), 0o644).unwrap();
            v.write(fh, 0, name.repeat(i + 1).as_bytes()).unwrap();
            let set = SetAttr {
                mode: Some(0o600),
                mtime_ns: Some(Some(1_600_000_000_000_000_000 + i as i64)),
                ..SetAttr::default()
            };
            v.setattr(a.ino, set, Some(fh)).unwrap();
            v.flush(fh).unwrap();
        }
    };
    let first: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    write(&first);
    assert!(first.iter().all(|n| journaled(&v, n) && !committed(&v, n)));

    // A failed commit rolls the transaction back: the journal's steps go back into a new
    // one at once (the files never vanish from the view), and commit with the next change.
    let path = crate::index::journal::path_for(&v.store().root().join("index.sqlite"));
    let last = crate::index::journal::read(&path)
        .unwrap()
        .unwrap()
        .steps
        .last()
        .unwrap()
        .0;
    v.store().index_deferred().roll_back_for_test();
    let f3 = v.lookup(run, os("f3")).unwrap();
    assert_eq!(read_all(&v, f3.ino, 4096), "f3".repeat(4).as_bytes());
    assert!(first.iter().all(|n| !committed(&v, n)));
    v.mkdir(CTX, run, os("d"), 0o755).unwrap();
    assert!(first.iter().all(|n| committed(&v, n)));
    assert!(committed(&v, "d"));
    // The commit recorded the last step it holds as the index's mark.
    let conn = rusqlite::Connection::open(v.store().root().join("index.sqlite")).unwrap();
    let mark: i64 = conn
        .query_row("SELECT seq FROM journal_mark", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mark as u64, last);

    // A crash with closes in the journal only: the next open of the store applies them.
    let second: Vec<String> = (0..30).map(|i| format!("g{i}")).collect();
    write(&second);
    assert!(second.iter().all(|n| journaled(&v, n) && !committed(&v, n)));
    v.store().index_deferred().crash_for_test();
    let (v, r) = reopen(v, "ns", "r");
    for names in [&first, &second] {
        for (i, name) in names.iter().enumerate() {
            let a = v.lookup(r.ino, os(name)).unwrap();
            assert_eq!(
                read_all(&v, a.ino, 4096),
                name.repeat(i + 1).as_bytes(),
                "{name}"
            );
            assert_eq!(a.mode & 0o7777, 0o600, "{name}");
            assert_eq!(a.mtime_ns, 1_600_000_000_000_000_000 + i as i64, "{name}");
        }
    }
    assert!(second.iter().all(|n| committed(&v, n)));
    let path = crate::index::journal::path_for(&v.store().root().join("index.sqlite"));
    assert!(
        crate::index::journal::read(&path)
            .unwrap()
            .unwrap()
            .steps
            .is_empty()
    );
    // Applied once: a second reopen finds nothing more to apply and the same files.
    let (v, r) = reopen(v, "ns", "r");
    assert_eq!(
        v.readdir(r.ino).unwrap().len(),
        2 + 1 + first.len() + second.len()
    );
    let r = RunRef::parse("ns/r").unwrap();
    let digest = v.seal(&r).unwrap();
    let (d, m) = v.store().manifest(&r).unwrap();
    assert_eq!(d, digest);
    assert_eq!(m.entries.len(), 2 + first.len() + second.len());
}

#[test]
fn a_journal_written_for_another_index_is_moved_aside_not_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    let (_, fh) = v.create(CTX, run, os("kept"), 0o644).unwrap();
    v.flush(fh).unwrap();
    v.store().index_deferred().crash_for_test();
    let root = v.store().root().to_path_buf();
    drop(v);
    // Another store's index in this one's place: the journal does not follow its mark.
    let other = tmp.path().join("other");
    let (o, orun) = fresh_run(&other);
    let (_, fh) = o.create(CTX, orun, os("x"), 0o644).unwrap();
    o.flush(fh).unwrap();
    o.release(fh).unwrap();
    drop(o);
    for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = std::fs::remove_file(root.join(f));
        let from = other.join("store").join(f);
        if from.exists() {
            std::fs::copy(from, root.join(f)).unwrap();
        }
    }
    let v = Vfs::new(Store::open(&root).unwrap(), VfsOptions::default()).unwrap();
    let ns = v.lookup(ROOT_INO, os("ns")).unwrap();
    let r = v.lookup(ns.ino, os("r")).unwrap();
    assert!(v.lookup(r.ino, os("kept")).is_err(), "not applied");
    assert!(v.lookup(r.ino, os("x")).is_ok());
    let aside = root.join("index.journal.unapplied-1");
    let c = crate::index::journal::read(&aside).unwrap().unwrap();
    assert!(c.steps.iter().any(
        |(_, s)| matches!(s, crate::index::journal::Step::Create { name, .. } if name == "kept")
    ));
}

/// Two explicit seals of one run at once both succeed with the same digest: the one that
/// waits for the other finds the run sealed, which is what it asked for.
#[test]
fn concurrent_seal_requests_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, run) = fresh_run(tmp.path());
    for i in 0..4 {
        let (_, fh) = append_file(&v, run, &format!("f{i}"), &random_bytes(4 << 20, 40 + i));
        v.release(fh).unwrap();
    }
    let r = RunRef::parse("ns/r").unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| v.seal(&r));
        let b = s.spawn(|| v.seal(&r));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    assert_eq!(v.seal(&r).unwrap(), a, "and so does a request after it");
}
