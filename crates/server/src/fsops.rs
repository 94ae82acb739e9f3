//! Path-addressed operations over the engine's file-system view, for the HTTP handlers: the
//! view is addressed by inode like a kernel would (lookup by lookup); this module walks paths
//! and keeps the open/write/release sequence in one place. Every function here blocks (engine
//! calls): handlers call them through `spawn_blocking`.
//!
//! A file written over HTTP goes to a hidden temporary name in its directory and is renamed
//! over the final name only when its body arrived whole, so a cut upload leaves nothing behind
//! and a replaced file is never half old, half new.

use std::ffi::OsStr;
use std::sync::Arc;

use artifactfs_core::manifest::{Entry, Kind};
use artifactfs_core::stream::Piece;
use artifactfs_core::vfs::{Attr, Ctx, ROOT_INO, Vfs};
use artifactfs_core::{Error, Result, RunRef};
use axum::body::Bytes;

/// Prefix of the temporary names of files being written.
pub const TEMP_PREFIX: &str = ".afs-http-";

/// Who owns what the server creates: whoever owns the store directory.
pub fn owner(vfs: &Vfs) -> Ctx {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(vfs.store().root()) {
        Ok(m) => Ctx {
            uid: m.uid(),
            gid: m.gid(),
        },
        Err(_) => Ctx { uid: 0, gid: 0 },
    }
}

/// The run's root directory.
pub fn run_root(vfs: &Vfs, r: &RunRef) -> Result<Attr> {
    let ns = vfs.lookup(ROOT_INO, OsStr::new(&r.namespace))?;
    vfs.lookup(ns.ino, OsStr::new(&r.run))
}

/// The entry at `path` (validated, `""` is the root) inside run `r`.
pub fn resolve(vfs: &Vfs, r: &RunRef, path: &str) -> Result<Attr> {
    let mut a = run_root(vfs, r)?;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        if a.kind != Kind::Dir {
            return Err(Error::NotDir(format!("{r}/{path}")));
        }
        a = vfs.lookup(a.ino, OsStr::new(comp))?;
    }
    Ok(a)
}

/// Whether run `r` exists and is open (writable).
pub fn require_open(vfs: &Vfs, r: &RunRef) -> Result<()> {
    let row = vfs.store().run(r)?;
    if row.state != "open" {
        return Err(Error::ReadOnly(format!(
            "run {r} is {}; only open runs take files",
            row.state
        )));
    }
    Ok(())
}

/// Creates run `r` as an open run (and its namespace if needed), with producer metadata set
/// as `user.KEY` xattrs of its directory, as a producer writing through the mount would.
pub fn create_run(vfs: &Vfs, r: &RunRef, meta: &[(String, String)]) -> Result<()> {
    if vfs.store().run(r).is_ok() {
        return Err(Error::AlreadyExists(format!("run {r}")));
    }
    let ctx = owner(vfs);
    let ns = match vfs.lookup(ROOT_INO, OsStr::new(&r.namespace)) {
        Ok(a) => a,
        Err(Error::NotFound(_)) => {
            match vfs.mkdir(ctx, ROOT_INO, OsStr::new(&r.namespace), 0o755) {
                Ok(a) => a,
                // Created by a concurrent request meanwhile.
                Err(Error::AlreadyExists(_)) => vfs.lookup(ROOT_INO, OsStr::new(&r.namespace))?,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let root = vfs.mkdir(ctx, ns.ino, OsStr::new(&r.run), 0o755)?;
    for (k, v) in meta {
        let name = format!("user.{k}");
        if let Err(e) = vfs.setxattr(root.ino, OsStr::new(&name), v.as_bytes(), 0) {
            // Leave nothing half made: the run was empty and is removed again.
            if let Err(e2) = vfs.rmdir(ns.ino, OsStr::new(&r.run)) {
                tracing::warn!(run = %r, "cannot remove a run whose metadata was refused: {e2}");
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Makes every directory of `dir` (a validated path inside the run) and returns the last; the
/// run must exist and be open.
fn mkdir_p(vfs: &Vfs, r: &RunRef, dir: &str) -> Result<Attr> {
    let ctx = owner(vfs);
    // The run's directory tells whether it is open (its attributes are immutable once
    // sealed): no separate read of the run's row.
    let mut a = run_root(vfs, r).map_err(|e| match e {
        Error::NotFound(_) => Error::NotFound(format!("run {r}")),
        e => e,
    })?;
    if a.immutable {
        return Err(Error::ReadOnly(format!(
            "run {r} is sealed; only open runs take files"
        )));
    }
    for comp in dir.split('/').filter(|c| !c.is_empty()) {
        a = match vfs.lookup(a.ino, OsStr::new(comp)) {
            Ok(c) if c.kind == Kind::Dir => c,
            Ok(_) => {
                return Err(Error::NotDir(format!(
                    "{r}/{dir}: {comp} is not a directory"
                )));
            }
            Err(Error::NotFound(_)) => match vfs.mkdir(ctx, a.ino, OsStr::new(comp), 0o755) {
                Ok(c) => c,
                Err(Error::AlreadyExists(_)) => vfs.lookup(a.ino, OsStr::new(comp))?,
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
    }
    Ok(a)
}

/// A file being written into an open run: bytes go to a temporary name until [`Put::commit`].
/// Dropped without a commit, the temporary file is removed.
pub struct Put {
    vfs: Arc<Vfs>,
    parent: u64,
    name: String,
    temp: String,
    fh: Option<u64>,
    pub written: u64,
    what: String,
}

impl Put {
    /// Starts writing `path` in open run `r`, making its parent directories.
    pub fn begin(vfs: Arc<Vfs>, r: &RunRef, path: &str) -> Result<Put> {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", path),
        };
        if name.starts_with(TEMP_PREFIX) {
            return Err(Error::invalid(
                "path",
                format!("{name:?}: names starting with {TEMP_PREFIX} are reserved"),
            ));
        }
        let parent = mkdir_p(&vfs, r, dir)?;
        if let Ok(existing) = vfs.lookup(parent.ino, OsStr::new(name))
            && existing.kind == Kind::Dir
        {
            return Err(Error::IsDir(format!("{r}/{path}")));
        }
        let temp = format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>());
        let (_, fh) = vfs.create(owner(&vfs), parent.ino, OsStr::new(&temp), 0o644)?;
        // An upload that fails or is cut must leave nothing stored: its file stays in its
        // staging file, which goes with it, instead of streaming into packs (ADR 0025).
        vfs.keep_staged(fh);
        Ok(Put {
            vfs,
            parent: parent.ino,
            name: name.to_owned(),
            temp,
            fh: Some(fh),
            written: 0,
            what: format!("{r}/{path}"),
        })
    }

    /// Appends `data`.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        let fh = self
            .fh
            .ok_or_else(|| Error::Internal("write after commit".into()))?;
        while !data.is_empty() {
            let n = self.vfs.write(fh, self.written, data)? as usize;
            if n == 0 {
                return Err(Error::Internal(format!(
                    "{}: a write took no bytes",
                    self.what
                )));
            }
            self.written += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes the file and gives it its final name (replacing a file there).
    pub fn commit(mut self) -> Result<u64> {
        // Released like a file closed in the mount (ADR 0007: its content and attributes are
        // in the index and the staging file), but committed with its rename: one index commit
        // per uploaded file (ADR 0018). The seal makes the run durable as a whole.
        if let Some(fh) = self.fh.take() {
            self.vfs.release_before_rename(fh)?;
        }
        self.vfs.rename(
            self.parent,
            OsStr::new(&self.temp),
            self.parent,
            OsStr::new(&self.name),
            false,
            false,
        )?;
        self.temp.clear();
        tracing::debug!(file = %self.what, bytes = self.written, "file written");
        Ok(self.written)
    }
}

impl Drop for Put {
    fn drop(&mut self) {
        // Unlinked before its release, so the unfinished file is dropped at the release instead
        // of being chunked ahead of the seal like a closed file (packs nothing refers to).
        if !self.temp.is_empty()
            && let Err(e) = self.vfs.unlink(self.parent, OsStr::new(&self.temp))
        {
            tracing::warn!(file = %self.what, "cannot remove an unfinished upload's file: {e}");
        }
        if let Some(fh) = self.fh.take() {
            let _ = self.vfs.release(fh);
        }
    }
}

/// A file opened for reading; released on drop.
pub struct Reader {
    vfs: Arc<Vfs>,
    fh: u64,
}

impl Reader {
    pub fn open(vfs: Arc<Vfs>, ino: u64) -> Result<Reader> {
        let (fh, _) = vfs.open(ino, false)?;
        Ok(Reader { vfs, fh })
    }

    pub fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.vfs.read(self.fh, offset, size)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.vfs.release(self.fh);
    }
}

/// One entry of a directory listing.
#[derive(serde::Serialize)]
pub struct ListEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
}

/// The entries of the directory `dir` (without `.` and `..`, nor files being written).
pub fn list(vfs: &Vfs, dir: &Attr) -> Result<Vec<ListEntry>> {
    let mut out = Vec::new();
    for e in vfs.readdir(dir.ino)? {
        if e.name == "." || e.name == ".." || e.name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let a = vfs.lookup(dir.ino, OsStr::new(&e.name))?;
        out.push(ListEntry {
            name: e.name,
            kind: a.kind.as_str(),
            size: a.size,
            mode: a.mode,
            mtime_ns: a.mtime_ns,
        });
    }
    Ok(out)
}

/// A sealed run's file as its manifest entry (a hard link's target entry); `None` for an open
/// run's file, whose content may still change.
pub fn sealed_entry(vfs: &Vfs, r: &RunRef, path: &str) -> Result<Option<Entry>> {
    let store = vfs.store();
    if store.run(r)?.state != "sealed" {
        return Ok(None);
    }
    let mut e = store.entry(r, path)?;
    if e.kind == Kind::Hardlink {
        e = store.entry(r, e.target.as_deref().unwrap_or_default())?;
    }
    Ok(Some(e))
}

/// Bytes of a decoded chunk, shared with the engine (the body holds the chunk, not a copy).
struct ChunkBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ChunkBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A piece of a streamed file as body bytes, without copying.
pub fn piece_bytes(p: Piece) -> Bytes {
    Bytes::from_owner(ChunkBytes(p.chunk)).slice(p.range)
}
