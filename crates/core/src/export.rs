//! Export of a sealed run to a plain directory, bit-exact: contents, modes, ownership (when
//! permitted), nanosecond mtimes, symlinks, hard links, empty directories, special files and
//! extended attributes. Runs of zero bytes in a file are written as holes, so sparse files stay
//! sparse. Every chunk is verified before its bytes are written; damage stops the export.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags};
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

fn dest_path(dest: &Path, e: &Entry) -> PathBuf {
    if e.path == ROOT {
        dest.to_path_buf()
    } else {
        dest.join(&e.path)
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
        // Create everything, writable by us while we work.
        for e in &manifest.entries {
            let p = dest_path(dest, e);
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
                    let tp = dest.join(t);
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
            let p = dest_path(dest, e);
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
