//! The object-store trait and its local implementations.
//!
//! Keys are `/`-separated relative names (`packs/ab/ab12…`, `manifests/cd/cd34…`). `put` is atomic
//! and durable when it returns: readers see the whole object or none of it, and a crash after
//! `put` returns does not lose it. Objects are immutable once written; a second `put` of the same
//! key with the same bytes is a no-op in effect.
//!
//! Implementations here: [`LocalStore`] (a directory; the embedded default) and [`MemoryStore`]
//! (for unit tests). The S3 / Ceph RGW implementation lives in its own crate.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

/// Storage for immutable, whole objects.
pub trait ObjectStore: Send + Sync {
    /// A short description for messages (`local:/path`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// Stores `data` under `key`, atomically and durably.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object. A missing object is [`Error::MissingObject`].
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`. Reading past the end is [`Error::Corrupt`].
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// The object's size, or `None` if it does not exist.
    fn head(&self, key: &str) -> Result<Option<u64>>;
    /// All objects whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Whether a successful `put` means that the backend itself checked the bytes it stored
    /// against a digest computed here from `data` (S3's `Content-MD5`) and their size, so
    /// that reading an upload back proves nothing more (`verify = "checksum"` of a tier).
    fn put_is_checked(&self) -> bool {
        false
    }
    /// A hint that `len` bytes of `key` at `offset` will be read soon: a local store has the
    /// kernel start reading them from the disk, so that reads of several places overlap.
    /// Nothing else is promised; a failing hint is ignored.
    fn will_need(&self, _key: &str, _offset: u64, _len: u64) {}
}

fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".tmp"));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("object key", format!("{key:?}")))
    }
}

/// Objects as files under a root directory.
pub struct LocalStore {
    root: PathBuf,
    /// Recently read objects' open files, most recent last: ranged reads of the same pack
    /// (export, the mount) do not reopen it for every chunk.
    handles: Mutex<Vec<(String, Arc<File>)>>,
}

/// Open files kept by a [`LocalStore`] for ranged reads.
const HANDLES: usize = 64;

impl LocalStore {
    /// A store rooted at `root`, created if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        create_dir_durable(&root)?;
        Ok(Self {
            root,
            handles: Mutex::new(Vec::new()),
        })
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<File>)>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An open file for ranged reads of `key`, from the cache when possible.
    fn handle(&self, key: &str) -> Result<Arc<File>> {
        {
            let mut h = self.handles();
            if let Some(i) = h.iter().position(|(k, _)| k == key) {
                let entry = h.remove(i);
                let f = entry.1.clone();
                h.push(entry);
                return Ok(f);
            }
        }
        let (f, _) = self.open_read(key)?;
        let f = Arc::new(f);
        let mut h = self.handles();
        if h.len() >= HANDLES {
            h.remove(0);
        }
        h.push((key.to_owned(), f.clone()));
        Ok(f)
    }

    fn forget_handle(&self, key: &str) {
        self.handles().retain(|(k, _)| k != key);
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingObject {
            key: key.to_owned(),
            backend: self.describe(),
        }
    }

    fn open_read(&self, key: &str) -> Result<(File, PathBuf)> {
        let path = self.path(key)?;
        match File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(self.missing(key)),
            Err(e) => Err(Error::io("open", path, e)),
        }
    }
}

/// Creates a directory and any missing parents, fsyncing each parent that gained an entry.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Error::io("create directory", dir, e)),
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

/// Removes `.tmp-*` files that a crashed writer left under `root` (two levels deep, where
/// [`LocalStore::put`] writes them). Only the store's owner may call this.
pub fn remove_stale_temp_files(root: &Path) {
    let mut dirs = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for ent in rd.flatten() {
            let p = ent.path();
            if ent.file_name().to_string_lossy().starts_with(".tmp-") {
                match fs::remove_file(&p) {
                    Ok(()) => {
                        tracing::info!(path = %p.display(), "removed a temporary file left by a crash")
                    }
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot remove temporary file")
                    }
                }
            } else if depth < 2 && ent.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push((p, depth + 1));
            }
        }
    }
}

/// Objects at least this large are written past the page cache (`O_DIRECT`), where the file
/// system allows it (ADR 0027).
const DIRECT_MIN: usize = 1 << 20;
/// What `O_DIRECT` asks of offsets, lengths and buffer addresses: a multiple of the logical
/// block size, which is at most this on the devices Linux supports in practice.
const DIRECT_ALIGN: usize = 4096;
/// The aligned buffer a direct write copies the object through, a piece at a time.
const DIRECT_PIECE: usize = 4 << 20;

/// Writes `data` to the new file `path` and fsyncs it. A large object (a pack) is written with
/// `O_DIRECT`: it is read rarely and not soon, so it should not grow the page cache, and copying
/// it into fresh page-cache pages is what its write costs (ADR 0027). Where the file system
/// refuses `O_DIRECT` (`EINVAL` at the open or a write: tmpfs before Linux 6.6, some FUSE and
/// network file systems), it is written through the page cache.
fn write_new_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if data.len() >= DIRECT_MIN {
        match write_direct(path, data) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::debug!(path = %path.display(), "O_DIRECT refused; writing through the page cache");
                let _ = fs::remove_file(path);
            }
            done => return done,
        }
    }
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// [`write_new_file`] with `O_DIRECT`: `data` is written in whole blocks, the last one padded
/// with zeros, and the file is then cut to its length. Data at an aligned address (a pack the
/// writer built so, see `PackBuilder::with_aligned_buffer`) is written from where it is, but
/// for its last partial block; other data goes through an aligned buffer.
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    let (direct, data) = if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        let whole = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        f.write_all_at(&data[..whole], 0)?;
        (whole, &data[whole..])
    } else {
        (0, data)
    };
    // One buffer per thread (a writer's flusher), kept: fresh memory is what this avoids.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < DIRECT_PIECE + DIRECT_ALIGN {
            *b = vec![0u8; DIRECT_PIECE + DIRECT_ALIGN];
        }
        let at = b.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut b[at..at + DIRECT_PIECE];
        let mut offset = direct;
        for piece in data.chunks(DIRECT_PIECE) {
            let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
            buf[..piece.len()].copy_from_slice(piece);
            buf[piece.len()..padded].fill(0);
            f.write_all_at(&buf[..padded], offset as u64)?;
            offset += piece.len();
        }
        Ok::<_, std::io::Error>(())
    })?;
    f.set_len((direct + data.len()) as u64)?;
    f.sync_all()
}

/// fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.is_dir() {
            create_dir_durable(&dir)?;
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        if let Err(e) = write_new_file(&tmp, data) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", &tmp, e));
        }
        self.forget_handle(key);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("rename into place", &path, e));
        }
        sync_dir(&dir)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let (mut f, path) = self.open_read(key)?;
        let mut out = Vec::new();
        f.read_to_end(&mut out)
            .map_err(|e| Error::io("read", &path, e))?;
        Ok(out)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = self.handle(key)?;
        let mut out = vec![0u8; len as usize];
        match f.read_exact_at(&mut out, offset) {
            Ok(()) => Ok(out),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(Error::corrupt(
                format!("object {key}"),
                format!("truncated: cannot read {len} bytes at offset {offset}"),
            )),
            Err(e) => Err(Error::io("read", self.root.join(key), e)),
        }
    }

    fn will_need(&self, key: &str, offset: u64, len: u64) {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        let r = self.handle(key).and_then(|f| {
            posix_fadvise(&*f, off, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
                .map_err(|e| Error::io("fadvise", self.root.join(key), e.into()))
        });
        if let Err(e) = r {
            tracing::debug!("readahead hint: {e}");
        }
    }

    fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("list", dir, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("list", &dir, e))?;
                let path = ent.path();
                let name = ent.file_name();
                if name.to_string_lossy().starts_with(".tmp") {
                    continue;
                }
                let ft = ent.file_type().map_err(|e| Error::io("stat", &path, e))?;
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if ft.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push(path);
                    }
                } else if ft.is_file() && key.starts_with(prefix) {
                    let size = ent
                        .metadata()
                        .map_err(|e| Error::io("stat", &path, e))?
                        .len();
                    out.push(ObjectMeta { key, size });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.forget_handle(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("delete", path, e)),
        }
    }
}

/// Objects in memory; for unit tests of the engine.
#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ObjectStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(key)?;
        self.lock().insert(key.to_owned(), data.to_vec());
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::MissingObject {
                key: key.to_owned(),
                backend: self.describe(),
            })
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let all = self.get(key)?;
        let end = offset.checked_add(len).filter(|e| *e <= all.len() as u64);
        match end {
            Some(end) => Ok(all[offset as usize..end as usize].to_vec()),
            None => Err(Error::corrupt(
                format!("object {key}"),
                format!("truncated: cannot read {len} bytes at offset {offset}"),
            )),
        }
    }
    fn head(&self, key: &str) -> Result<Option<u64>> {
        Ok(self.lock().get(key).map(|v| v.len() as u64))
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .lock()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
        Ok(())
    }
}

/// The conformance suite every [`ObjectStore`] must pass; backends' tests call it.
pub fn conformance(store: &dyn ObjectStore) -> Result<()> {
    let fail = |what: &str| Err(Error::Internal(format!("conformance: {what}")));
    let k1 = "conformance/a/one";
    let k2 = "conformance/a/two";
    let k3 = "conformance/b/three";
    for k in [k1, k2, k3] {
        store.delete(k)?;
    }
    if store.head(k1)?.is_some() {
        return fail("head of a missing object is Some");
    }
    match store.get(k1) {
        Err(Error::MissingObject { .. }) => {}
        _ => return fail("get of a missing object is not MissingObject"),
    }
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    store.put(k1, &data)?;
    store.put(k2, b"")?;
    store.put(k3, b"three")?;
    if store.get(k1)? != data {
        return fail("get returned other bytes");
    }
    if store.head(k1)? != Some(data.len() as u64) || store.head(k2)? != Some(0) {
        return fail("head size");
    }
    if store.get_range(k1, 1000, 10)? != data[1000..1010] {
        return fail("get_range returned other bytes");
    }
    if store.get_range(k1, data.len() as u64 - 5, 10).is_ok() {
        return fail("get_range past the end succeeded");
    }
    let listed: Vec<String> = store
        .list("conformance/a/")?
        .into_iter()
        .map(|m| m.key)
        .collect();
    if listed != [k1, k2] {
        return fail(&format!("list returned {listed:?}"));
    }
    let all = store.list("conformance/")?;
    if all.len() != 3 || all.iter().find(|m| m.key == k3).map(|m| m.size) != Some(5) {
        return fail("list of the whole prefix");
    }
    store.put(k3, b"three")?;
    store.delete(k1)?;
    store.delete(k1)?;
    if store.head(k1)?.is_some() {
        return fail("deleted object still there");
    }
    for bad in ["", "/abs", "a/../b", "a//b"] {
        if store.put(bad, b"x").is_ok() {
            return fail(&format!("bad key {bad:?} accepted"));
        }
    }
    store.delete(k2)?;
    store.delete(k3)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_conformance() {
        conformance(&MemoryStore::default()).unwrap();
    }

    #[test]
    fn local_conformance() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&LocalStore::open(dir.path()).unwrap()).unwrap();
    }

    /// Bytes of `path` in the page cache, by util-linux `fincore`.
    fn resident(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .arg(path)
            .output()
            .expect("run fincore (util-linux)");
        assert!(out.status.success(), "fincore: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// A temporary directory on a disk file system: the usual one, unless that is tmpfs.
    fn disk_tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let fs = nix::sys::statfs::statfs(dir.path()).unwrap();
        if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
            return tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        }
        dir
    }

    /// Whether the file system of `dir` takes `O_DIRECT` opens.
    fn takes_direct(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let probe = dir.join("probe");
        let ok = OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&probe)
            .is_ok();
        let _ = fs::remove_file(probe);
        ok
    }

    /// Large objects (packs) are written past the page cache where the file system allows it,
    /// through the page cache where it does not (tmpfs), and read back the same either way,
    /// whatever their length's alignment and their address's (an aligned one is written
    /// without a copy).
    #[test]
    fn large_objects_are_written_past_the_page_cache_where_possible() {
        let ext = disk_tempdir();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        // tmpfs (Linux 6.6 on) takes O_DIRECT, and keeps everything in memory all the same.
        let direct = takes_direct(ext.path());
        assert!(direct, "the temporary directory does not take O_DIRECT");
        for (dir, direct) in [(ext.path(), direct), (shm.path(), false)] {
            let store = LocalStore::open(dir).unwrap();
            for (i, len) in [
                DIRECT_MIN - 1,
                DIRECT_MIN,
                DIRECT_MIN + 1,
                DIRECT_PIECE,
                2 * DIRECT_PIECE + 4097,
                9 * DIRECT_ALIGN * 256 + 7,
            ]
            .into_iter()
            .flat_map(|len| [(len, false), (len, true)])
            .enumerate()
            {
                let (len, aligned) = len;
                let mut buf: Vec<u8> = Vec::with_capacity(len + 2 * DIRECT_ALIGN);
                // Placed at an aligned address, or one byte past it.
                let at = buf.as_ptr().align_offset(DIRECT_ALIGN) + usize::from(!aligned);
                buf.resize(at, 0);
                buf.extend((0..len).map(|j| (j * 7 + i) as u8));
                let data = &buf[at..];
                assert_eq!(data.as_ptr().align_offset(DIRECT_ALIGN) == 0, aligned);
                let key = format!("packs/{i:02}/object");
                store.put(&key, data).unwrap();
                // Before any read brings it in.
                let cached = resident(&dir.join(&key));
                if direct && len >= DIRECT_MIN {
                    assert!(
                        cached < (len / 2) as u64,
                        "{cached} of {len} bytes cached in {dir:?}"
                    );
                } else if direct {
                    assert_eq!(cached, len.next_multiple_of(4096) as u64, "{dir:?}");
                }
                assert_eq!(store.head(&key).unwrap(), Some(len as u64));
                assert!(store.get(&key).unwrap() == data, "{len} bytes in {dir:?}");
                assert_eq!(
                    store.get_range(&key, len as u64 - 3, 3).unwrap(),
                    data[len - 3..]
                );
            }
            let leftovers: Vec<_> = walk_files(dir);
            assert_eq!(
                leftovers.len(),
                12,
                "only the objects remain: {leftovers:?}"
            );
        }
    }

    /// `will_need` has the kernel read the hinted range of a local object into the page cache
    /// ahead of the reads (asynchronously: polled for up to 5 s); the rest stays on disk, and
    /// a hint for a missing object is no error. Readahead is best effort (the kernel may skip
    /// a page it cannot allocate at once), so most of the range, not all of it, must arrive.
    #[test]
    fn will_need_reads_the_range_ahead() {
        let ext = disk_tempdir();
        assert!(takes_direct(ext.path()));
        let store = LocalStore::open(ext.path()).unwrap();
        let len = 16 << 20;
        let data: Vec<u8> = (0..len).map(|j| (j * 13 + j / 4096) as u8).collect();
        store.put("packs/aa/hinted", &data).unwrap();
        let path = ext.path().join("packs/aa/hinted");
        let before = resident(&path);
        assert!(before < 4 << 20, "{before} bytes cached after the write");

        store.will_need("packs/aa/hinted", 8 << 20, 4 << 20);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut cached = resident(&path);
        let most = before + (3 << 20);
        while cached < most && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            cached = resident(&path);
        }
        assert!(
            cached >= most,
            "{cached} bytes cached after the hint ({before} before)"
        );
        assert!(
            cached < 12 << 20,
            "{cached} bytes cached: more than the hint"
        );
        assert!(
            store
                .get_range("packs/aa/hinted", 8 << 20, 4 << 20)
                .unwrap()
                == data[8 << 20..12 << 20]
        );
        store.will_need("packs/aa/missing", 0, 4096);
    }

    fn walk_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk_files(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
