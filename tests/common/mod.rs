//! Helpers shared by the end-to-end tests: run the real binary against a temporary store and
//! compare directory trees attribute by attribute.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

pub mod mount;
pub mod rgw;

/// Runs a tool to success (else fails the test with its stderr); its stdout.
pub fn sh(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary store and scratch space.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// The engine's clock for every command of this environment (`ARTIFACTFS_CLOCK_FILE`).
    clock: Option<PathBuf>,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("afs-test-")
                .tempdir()
                .expect("tempdir"),
            clock: None,
        }
    }

    /// An environment whose commands (mounts too) read the time from a file the test sets
    /// with [`Env::set_time`], so retention can pass without sleeping.
    pub fn with_clock(at: &str) -> Self {
        let mut e = Self::new();
        let p = e.path("clock");
        e.clock = Some(p);
        e.set_time(at);
        e
    }

    /// Moves this environment's clock to an RFC 3339 instant.
    pub fn set_time(&self, at: &str) {
        let p = self.clock.as_ref().expect("an Env::with_clock environment");
        let tmp = p.with_extension("tmp");
        fs::write(&tmp, at).unwrap();
        fs::rename(&tmp, p).unwrap();
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `artifactfs --store STORE ARGS…`, not yet run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::cargo_bin("artifactfs").expect("binary");
        c.arg("--store").arg(self.store()).args(args);
        c.env_remove("ARTIFACTFS_STORE");
        c.env_remove("ARTIFACTFS_LOCK_WAIT");
        match &self.clock {
            Some(p) => c.env("ARTIFACTFS_CLOCK_FILE", p),
            None => c.env_remove("ARTIFACTFS_CLOCK_FILE"),
        };
        c
    }

    /// The same as [`Env::cmd`] as a plain `std::process::Command`, for spawning.
    pub fn std_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("artifactfs"));
        c.arg("--store").arg(self.store()).args(args);
        c.env_remove("ARTIFACTFS_STORE");
        c.env_remove("ARTIFACTFS_LOCK_WAIT");
        match &self.clock {
            Some(p) => c.env("ARTIFACTFS_CLOCK_FILE", p),
            None => c.env_remove("ARTIFACTFS_CLOCK_FILE"),
        };
        c
    }

    /// Runs and returns the output, whatever the status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run artifactfs")
    }

    /// Runs, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "artifactfs {args:?} failed ({:?}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// `ingest --json`, parsed.
    pub fn ingest(&self, src: &Path, run: &str) -> serde_json::Value {
        let out = self.ok(&["ingest", src.to_str().unwrap(), run, "--json"]);
        serde_json::from_str(&out).expect("ingest json")
    }

    /// The `runs --json` record of `NAMESPACE/RUN`, if it is listed.
    pub fn run_info(&self, run: &str) -> Option<serde_json::Value> {
        let runs: serde_json::Value =
            serde_json::from_str(&self.ok(&["runs", "--json"])).expect("runs json");
        runs.as_array()?
            .iter()
            .find(|r| {
                format!(
                    "{}/{}",
                    r["namespace"].as_str().unwrap_or_default(),
                    r["run"].as_str().unwrap_or_default()
                ) == run
            })
            .cloned()
    }

    /// `stats --json`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["stats", "--json"])).expect("stats json")
    }
}

/// Everything about one entry that an export must reproduce.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub content: Option<blake3::Hash>,
    pub target: Option<PathBuf>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Index of the first path sharing this inode (hard links), if any.
    pub link_group: Option<String>,
}

fn kind(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "other"
    }
}

/// Hashes a file, reading it in pieces.
pub fn hash_file(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p).expect("open"))
        .expect("read");
    h.finalize()
}

/// Snapshot of a tree: relative path -> node. The root's own attributes are included as ".".
pub fn snapshot(root: &Path, with_times_of_root: bool) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), ".".to_string())];
    while let Some((p, rel)) = stack.pop() {
        let m = fs::symlink_metadata(&p).expect("lstat");
        let ft = m.file_type();
        let mut xattrs = BTreeMap::new();
        for name in xattr::list(&p).expect("listxattr") {
            let n = name.to_string_lossy().into_owned();
            if n.starts_with("security.") {
                continue;
            }
            xattrs.insert(
                n,
                xattr::get(&p, &name).expect("getxattr").unwrap_or_default(),
            );
        }
        let link_group = if !ft.is_dir() && m.nlink() > 1 {
            Some(
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_insert_with(|| rel.clone())
                    .clone(),
            )
        } else {
            None
        };
        let node = Node {
            kind: kind(&ft).into(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: if rel == "." && !with_times_of_root {
                0
            } else {
                m.mtime() * 1_000_000_000 + m.mtime_nsec()
            },
            size: if ft.is_dir() { 0 } else { m.len() },
            content: ft.is_file().then(|| hash_file(&p)),
            target: ft
                .is_symlink()
                .then(|| fs::read_link(&p).expect("readlink")),
            rdev: if ft.is_char_device() || ft.is_block_device() {
                m.rdev()
            } else {
                0
            },
            xattrs,
            link_group,
        };
        if ft.is_dir() {
            for e in fs::read_dir(&p).expect("readdir") {
                let e = e.expect("dirent");
                let name = e.file_name().into_string().expect("utf-8 name");
                let child = if rel == "." {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((e.path(), child));
            }
        }
        out.insert(rel, node);
    }
    // Hard-link groups are named by the first path in sorted order on both sides.
    let mut groups: BTreeMap<String, String> = BTreeMap::new();
    for (path, node) in &out {
        if let Some(g) = &node.link_group {
            groups.entry(g.clone()).or_insert_with(|| path.clone());
        }
    }
    for node in out.values_mut() {
        if let Some(g) = node.link_group.take() {
            node.link_group = groups.get(&g).cloned();
        }
    }
    out
}

/// Asserts two trees are equal in every attribute, with a readable first difference.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let sa = snapshot(a, true);
    let sb = snapshot(b, true);
    let ka: Vec<&String> = sa.keys().collect();
    let kb: Vec<&String> = sb.keys().collect();
    assert_eq!(
        ka,
        kb,
        "trees {} and {} have different paths",
        a.display(),
        b.display()
    );
    for (path, na) in &sa {
        let nb = &sb[path];
        assert_eq!(
            na,
            nb,
            "entry {path:?} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Sets a file's mtime to an exact nanosecond value (symlinks too).
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(sec, nsec);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// Stops a child process as an operator or a service manager would (SIGTERM) and waits for
/// it to exit; returns how it exited.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    child.wait().expect("wait for the child")
}

/// A tmpfs of a fixed size mounted over a directory (the tests run as root): a disk that
/// fills up. Unmounted (lazily, if something still holds it) on drop.
pub struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `24m`) at `dir`, made if missing.
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs on {}: {st}", dir.display());
        SmallDisk {
            dir: dir.to_path_buf(),
        }
    }

    /// Gives the disk a new size, keeping what is on it.
    pub fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "remount {} to {size}: {st}",
            self.dir.display()
        );
    }

    /// Bytes in use on the disk.
    pub fn used(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.dir).expect("statvfs");
        (s.blocks() - s.blocks_free()) * s.fragment_size()
    }

    /// Fills what is left of the disk with one file of zeros, `filler` in its top directory;
    /// returns its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.dir.join("filler");
        let mut f = fs::File::create(&p).unwrap();
        let mb = vec![0u8; 1 << 20];
        while f.write_all(&mb).is_ok() {}
        let _ = f.sync_all();
        p
    }

    /// Bytes still free on the disk.
    pub fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.dir).expect("statvfs");
        s.blocks_available() * s.fragment_size()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The store's local pack files, sorted.
pub fn packs(env: &Env) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in fs::read_dir(env.store().join("objects/packs")).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

/// The pack holding chunk number `n` of a sealed file (`NS/RUN/PATH`) and where that chunk's
/// stored bytes start in it, found through the packs' own chunk tables (chunks reach a pack in
/// the order the writer's workers finish them, not necessarily the file's order). The store
/// must not be in use.
pub fn chunk_in_pack(env: &Env, path_in_store: &str, n: usize) -> (PathBuf, usize) {
    let store = artifactfs_core::Store::open(&env.store()).unwrap();
    let (r, p) = artifactfs_core::RunRef::parse_with_path(path_in_store).unwrap();
    let entry = store.entry(&r, &p).unwrap();
    let chunk = entry.chunks[n].0;
    drop(store);
    let objects = artifactfs_core::objstore::LocalStore::open(env.store().join("objects")).unwrap();
    for p in packs(env) {
        let key = p
            .strip_prefix(env.store().join("objects"))
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let table = artifactfs_core::pack::read_table(&objects, &key).unwrap();
        if let Some(e) = table.iter().find(|e| e.chunk == chunk) {
            return (p, e.offset as usize);
        }
    }
    panic!("no pack holds chunk {n} of {path_in_store}");
}

/// Flips the lowest bit of the byte at `at` of a file.
pub fn flip_byte(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    b[at] ^= 0x01;
    fs::write(p, b).unwrap();
}
