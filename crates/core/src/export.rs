//! Export of a sealed run to a plain directory, bit-exact: contents, modes, ownership (when
//! permitted), nanosecond mtimes, symlinks, hard links, empty directories, special files and
//! extended attributes. Runs of zero bytes in a file are written as holes, so sparse files stay
//! sparse. Every chunk is verified before its bytes are written; damage stops the export.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};

use crate::error::{Error, Result};
use crate::manifest::{Entry, Kind, ROOT};
use crate::names::RunRef;
use crate::store::{Progress, Store};

/// What an export wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportReport {
    pub entries: u64,
    pub bytes: u64,
    /// Attributes that could not be applied (e.g. ownership when not root), as messages.
    pub warnings: Vec<String>,
}

/// Paths at or above this many bytes are reached through a directory descriptor (see
/// [`Reach`]): the kernel refuses paths of `PATH_MAX` (4,096) bytes or more.
pub const LONG_PATH: usize = 3072;

/// Opens directory `name` (relative to `at`, or as a path) as a handle to name what it holds
/// through ([`handle_path`]): `O_PATH`, never following a symlink.
pub fn open_dir_handle(at: Option<&OwnedFd>, name: &Path) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match at {
        Some(dir) => nix::fcntl::openat(dir, name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    }
}

/// The short path the kernel resolves to directory handle `fd`: `/proc/self/fd/N`, under
/// which the directory's entries are named whatever the depth of the directory.
pub fn handle_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// How the export names its entries to the kernel. A run's tree may be deeper than `PATH_MAX`
/// allows one path to name (a producer writing through the mount works relative to open
/// directories); such an entry is named as `/proc/self/fd/N/NAME`, where N is a descriptor of
/// its parent directory, opened one component at a time (never following a symlink). The few
/// parents opened last are kept, as consecutive entries share them.
struct Reach<'a> {
    dest: &'a Path,
    /// Most recent first: (directory relative to `dest`, its descriptor).
    anchors: Vec<(String, OwnedFd)>,
}

impl<'a> Reach<'a> {
    fn new(dest: &'a Path) -> Self {
        Self {
            dest,
            anchors: Vec::new(),
        }
    }

    /// A path the kernel takes for entry `rel` (a manifest path) under the destination.
    fn path(&mut self, rel: &str) -> Result<PathBuf> {
        let full = if rel == ROOT {
            self.dest.to_path_buf()
        } else {
            self.dest.join(rel)
        };
        if full.as_os_str().len() < LONG_PATH {
            return Ok(full);
        }
        let Some((dir, name)) = rel.rsplit_once('/') else {
            return Ok(full);
        };
        Ok(handle_path(self.anchor(dir)?).join(name))
    }

    fn anchor(&mut self, dir: &str) -> Result<&OwnedFd> {
        if let Some(i) = self.anchors.iter().position(|(d, _)| d == dir) {
            let a = self.anchors.remove(i);
            self.anchors.insert(0, a);
            return Ok(&self.anchors[0].1);
        }
        let mut fd =
            open_dir_handle(None, self.dest).map_err(nix_io("open directory", self.dest))?;
        for comp in dir.split('/') {
            if comp.is_empty() || comp == "." || comp == ".." {
                return Err(Error::corrupt(
                    "manifest path",
                    format!("{dir:?} has an empty, . or .. component"),
                ));
            }
            fd = open_dir_handle(Some(&fd), Path::new(comp)).map_err(|e| {
                Error::io(
                    "open directory",
                    self.dest.join(dir),
                    std::io::Error::from(e),
                )
            })?;
        }
        self.anchors.insert(0, (dir.to_owned(), fd));
        self.anchors.truncate(4);
        Ok(&self.anchors[0].1)
    }
}

fn nix_io<'a>(op: &'static str, p: &'a Path) -> impl Fn(nix::Error) -> Error + 'a {
    move |e| Error::io(op, p, std::io::Error::from(e))
}

impl Store {
    /// Exports sealed run `r` into `dest`, which must not exist or be an empty directory.
    pub fn export(&self, r: &RunRef, dest: &Path, progress: &dyn Progress) -> Result<ExportReport> {
        let (_, manifest) = self.manifest(r)?;
        if dest.exists() {
            let mut rd = fs::read_dir(dest).map_err(|e| Error::io("read directory", dest, e))?;
            if rd.next().is_some() {
                return Err(Error::invalid(
                    "destination",
                    format!("{} exists and is not empty", dest.display()),
                ));
            }
        } else {
            fs::create_dir(dest).map_err(|e| Error::io("create directory", dest, e))?;
        }
        progress.set_total(manifest.raw_bytes());
        let mut report = ExportReport::default();
        let is_root = Uid::effective().is_root();
        // Entries not created (device nodes as non-root), by path: their links are not either.
        let mut skipped: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut reach = Reach::new(dest);
        let mut reach_target = Reach::new(dest);
        // Create everything, writable by us while we work.
        for e in &manifest.entries {
            let p = reach.path(&e.path)?;
            match e.kind {
                Kind::Dir => {
                    if e.path != ROOT {
                        fs::create_dir(&p).map_err(|err| Error::io("create directory", &p, err))?;
                    }
                }
                Kind::File => {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&p)
                        .map_err(|err| Error::io("create", &p, err))?;
                    match self.write_sparse(e, &mut f, &p, progress) {
                        Ok(n) => report.bytes += n,
                        Err(err) => {
                            // Never a partial file under the entry's name.
                            drop(f);
                            let _ = fs::remove_file(&p);
                            return Err(err);
                        }
                    }
                }
                Kind::Symlink => {
                    let t = e.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(t, &p)
                        .map_err(|err| Error::io("symlink", &p, err))?;
                }
                Kind::Hardlink => {
                    let t = e.target.as_deref().ok_or_else(|| {
                        Error::corrupt(
                            format!("manifest entry {}", e.path),
                            "hard link without target",
                        )
                    })?;
                    let tp = reach_target.path(t)?;
                    if skipped.contains(t) {
                        report.warnings.push(format!(
                            "{}: not linked to {t}, which was not created",
                            p.display()
                        ));
                        continue;
                    }
                    // `linkat` without AT_SYMLINK_FOLLOW: a link to a symlink links the
                    // symlink itself.
                    fs::hard_link(&tp, &p).map_err(|err| Error::io("hard link", &p, err))?;
                }
                Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {
                    let kind = match e.kind {
                        Kind::Fifo => SFlag::S_IFIFO,
                        Kind::Char => SFlag::S_IFCHR,
                        Kind::Block => SFlag::S_IFBLK,
                        _ => SFlag::S_IFSOCK,
                    };
                    let res = mknod(
                        &p,
                        kind,
                        Mode::from_bits_truncate(0o600),
                        e.rdev.unwrap_or(0),
                    );
                    if let Err(err) = res {
                        if matches!(e.kind, Kind::Char | Kind::Block) && !is_root {
                            report.warnings.push(format!(
                                "{}: cannot create device node as non-root: {err}",
                                p.display()
                            ));
                            skipped.insert(e.path.as_str());
                            continue;
                        }
                        return Err(nix_io("mknod", &p)(err));
                    }
                }
            }
            report.entries += 1;
        }
        // Then attributes: deepest first, so a directory's mtime is set after its contents.
        for e in manifest.entries.iter().rev() {
            if e.kind == Kind::Hardlink {
                continue;
            }
            let p = reach.path(&e.path)?;
            if fs::symlink_metadata(&p).is_err() {
                continue; // skipped above with a warning
            }
            for (name, value) in &e.xattrs {
                let v = value.to_bytes()?;
                if let Err(err) = xattr::set(&p, name, &v) {
                    let msg = format!("{}: xattr {name}: {err}", p.display());
                    if name.starts_with("user.") && e.kind != Kind::Symlink {
                        // ENOSPC and E2BIG here are the file system's limit on xattrs (ext4
                        // keeps about 4 KiB of them per file), not a full disk.
                        if matches!(err.raw_os_error(), Some(c) if c == nix::libc::ENOSPC || c == nix::libc::E2BIG)
                        {
                            return Err(Error::Unsupported(format!(
                                "{}: the destination file system refuses xattr {name} of {} bytes ({err}); export to one that keeps large xattrs (XFS, tmpfs)",
                                p.display(),
                                v.len()
                            )));
                        }
                        return Err(Error::io("set xattr", &p, err));
                    }
                    report.warnings.push(msg);
                }
            }
            if is_root || Uid::effective().as_raw() == e.uid {
                let res = fchownat(
                    AT_FDCWD,
                    &p,
                    Some(Uid::from_raw(e.uid)),
                    Some(Gid::from_raw(e.gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                );
                if let Err(err) = res {
                    report
                        .warnings
                        .push(format!("{}: chown: {err}", p.display()));
                }
            }
            if e.kind != Kind::Symlink {
                fs::set_permissions(&p, fs::Permissions::from_mode(e.mode))
                    .map_err(|err| Error::io("chmod", &p, err))?;
            }
            let t = TimeSpec::new(
                e.mtime_ns.div_euclid(1_000_000_000),
                e.mtime_ns.rem_euclid(1_000_000_000),
            );
            utimensat(AT_FDCWD, &p, &t, &t, UtimensatFlags::NoFollowSymlink)
                .map_err(nix_io("set times", &p))?;
        }
        for w in &report.warnings {
            tracing::warn!(run = %r, "{w}");
        }
        Ok(report)
    }

    /// Writes a file's chunks, seeking over all-zero chunks so that holes stay holes.
    fn write_sparse(
        &self,
        e: &Entry,
        f: &mut File,
        p: &Path,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let mut pos = 0u64;
        let mut hasher = blake3::Hasher::new();
        let ids: Vec<_> = e.chunks.iter().map(|c| c.0).collect();
        self.for_each_chunk(&ids, &mut |_, data| {
            hasher.update(&data);
            if data.iter().all(|b| *b == 0) {
                f.seek(SeekFrom::Current(data.len() as i64))
                    .map_err(|err| Error::io("seek", p, err))?;
            } else {
                f.write_all(&data)
                    .map_err(|err| Error::io("write", p, err))?;
            }
            pos += data.len() as u64;
            progress.inc(data.len() as u64);
            Ok(())
        })
        .map_err(|err| match err {
            Error::Corrupt { what, reason } => Error::Corrupt {
                what: format!("{what} (file {})", e.path),
                reason,
            },
            other => other,
        })?;
        f.set_len(pos)
            .map_err(|err| Error::io("truncate", p, err))?;
        if let Some(h) = e.blake3
            && crate::id::FileHash::from(hasher.finalize()) != h
        {
            return Err(Error::corrupt(
                format!("file {}", e.path),
                "content does not match the manifest's BLAKE3",
            ));
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::id::FileHash;
    use crate::manifest::{MANIFEST_FORMAT, Manifest, XattrValue};
    use crate::store::{InitOptions, NoProgress};

    /// A run whose tree is deeper than one path may name (a producer writing through the mount
    /// can make one) exports whole: directories, a file with its xattr, a symlink and a hard
    /// link to the deep file from the top, each with its mode and time.
    #[test]
    fn a_tree_deeper_than_path_max_exports() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let content = b"at the bottom".to_vec();
        let seal = store.seal_guard();
        let writer = store.writer(&seal);
        let chunk = writer.submit(&content).unwrap();
        writer.finish().unwrap();

        let mtime_ns = 1_700_000_000_123_456_789;
        let entry = |path: &str, kind: Kind| Entry {
            path: path.to_owned(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_ns,
            blake3: None,
            chunks: Vec::new(),
            target: None,
            rdev: None,
            xattrs: BTreeMap::new(),
        };
        let mut entries = vec![entry(ROOT, Kind::Dir)];
        // 24 directories of 200-byte names: 4,824 bytes, past PATH_MAX.
        let mut deepest = String::new();
        for i in 0..24 {
            let name = format!("{i:02}{}", "d".repeat(198));
            deepest = if deepest.is_empty() {
                name
            } else {
                format!("{deepest}/{name}")
            };
            entries.push(entry(&deepest, Kind::Dir));
        }
        let file_path = format!("{deepest}/file");
        let mut f = entry(&file_path, Kind::File);
        f.mode = 0o640;
        f.size = content.len() as u64;
        f.blake3 = Some(FileHash::of(&content));
        f.chunks = vec![chunk];
        f.xattrs
            .insert("user.note".into(), XattrValue::Text("deep".into()));
        entries.push(f);
        let link_path = format!("{deepest}/link");
        let mut l = entry(&link_path, Kind::Symlink);
        l.target = Some("file".into());
        l.size = 4;
        entries.push(l);
        let mut h = entry("top-hardlink", Kind::Hardlink);
        h.target = Some(file_path.clone());
        entries.push(h);
        let mut m = Manifest {
            format: MANIFEST_FORMAT,
            namespace: "ns".into(),
            run: "deep".into(),
            sealed_at: "2026-12-02T00:00:00Z".into(),
            metadata: BTreeMap::new(),
            entries,
        };
        store.commit_manifest(&mut m).unwrap();
        drop(seal);

        let dest = dir.path().join("out");
        let run = RunRef::parse("ns/deep").unwrap();
        let report = store.export(&run, &dest, &NoProgress).unwrap();
        assert_eq!(report.entries, 28);
        assert!(
            fs::metadata(dest.join(&file_path)).is_err(),
            "the kernel takes the whole path"
        );

        let top = dest.join("top-hardlink");
        assert_eq!(fs::read(&top).unwrap(), content);
        let mut reach = Reach::new(&dest);
        let p = reach.path(&file_path).unwrap();
        assert!(p.starts_with("/proc/self/fd"), "{}", p.display());
        assert_eq!(fs::read(&p).unwrap(), content);
        let md = fs::metadata(&p).unwrap();
        assert_eq!((md.mode() & 0o7777, md.nlink()), (0o640, 2));
        assert_eq!(md.ino(), fs::metadata(&top).unwrap().ino());
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 123_456_789));
        assert_eq!(
            xattr::get(&p, "user.note").unwrap().as_deref(),
            Some(&b"deep"[..])
        );
        let link = reach.path(&link_path).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("file"));
        let d = fs::metadata(reach.path(&deepest).unwrap()).unwrap();
        assert!(d.is_dir());
        assert_eq!((d.mode() & 0o7777, d.mtime()), (0o755, 1_700_000_000));
    }
}
