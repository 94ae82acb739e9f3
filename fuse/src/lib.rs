//! artifactfs-fuse: the FUSE frontend. A `fuser::Filesystem` over the engine's file-system view
//! ([`artifactfs_core::vfs::Vfs`]): each callback decodes its arguments, makes one call into the
//! view, maps an error with [`errno`] and replies. It owns no storage logic, opens no SQLite and
//! reads no pack; only this crate imports `fuser`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use artifactfs_core::Error;
use artifactfs_core::manifest::Kind;
use artifactfs_core::vfs::{Attr, Ctx, DirEntry, SetAttr, Vfs};
use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

pub use fuser::BackgroundSession;

/// How long the kernel may cache attributes and names of things that can change.
const TTL_MUTABLE: Duration = Duration::from_secs(1);
/// … and of sealed runs, which cannot.
const TTL_SEALED: Duration = Duration::from_secs(60);
/// The largest read and write the kernel sends in one request, and the block size files
/// report: `cp`, `cat` and other tools size their buffers by `st_blksize`, so they write and
/// read a MiB per system call, and a MiB per request, instead of 128 KiB.
const IO_SIZE: u32 = 1 << 20;
/// How far ahead of a sequential read the kernel reads a file of the mount, in KiB. A FUSE
/// mount starts at 128: a cold read of a large sealed file is then a 128 KiB request at a time,
/// each waiting for its chunks to be decoded. At 4 MiB the kernel keeps several 1 MiB requests
/// in flight ahead of the reader: a cold `tar` of a 1.6 GB sealed run took 3.11–3.21 s and
/// 2.9–3.0 CPU s in the mount, against 3.26–3.42 s and 3.3–3.6 CPU s (ADR 0028).
const KERNEL_READ_AHEAD_KB: u64 = 4096;

/// The errno for an engine error: one arm per variant.
pub fn errno(e: &Error) -> Errno {
    match e {
        Error::Io { err, .. } => err.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
        Error::Corrupt { .. } | Error::MissingObject { .. } => Errno::EIO,
        Error::Backend { .. } | Error::Index { .. } | Error::Internal(_) => Errno::EIO,
        Error::Invalid { .. } | Error::State(_) => Errno::EINVAL,
        Error::NotFound(_) => Errno::ENOENT,
        Error::AlreadyExists(_) => Errno::EEXIST,
        Error::Locked { .. } | Error::Busy(_) => Errno::EBUSY,
        Error::NotAStore { .. } => Errno::EINVAL,
        Error::ReadOnly(_) => Errno::EROFS,
        Error::NotPermitted(_) => Errno::EPERM,
        Error::NotEmpty(_) => Errno::ENOTEMPTY,
        Error::NotDir(_) => Errno::ENOTDIR,
        Error::IsDir(_) => Errno::EISDIR,
        Error::NameTooLong(_) => Errno::ENAMETOOLONG,
        Error::NoAttr(_) => Errno::NO_XATTR,
        Error::Unsupported(_) => Errno::EOPNOTSUPP,
        Error::CrossRun(_) => Errno::EXDEV,
        Error::Cancelled(_) => Errno::EINTR,
        // `Error` is non-exhaustive; a variant added later lands here until it gets its own arm.
        other => {
            tracing::error!("no errno for this error, answering EIO: {other}");
            Errno::EIO
        }
    }
}

fn log_err(op: &'static str, ino: u64, e: &Error) -> Errno {
    let n = errno(e);
    if e.is_damage()
        || matches!(
            e,
            Error::Io { .. } | Error::Index { .. } | Error::Internal(_)
        )
    {
        tracing::error!(op, ino, "{e}");
    } else {
        tracing::debug!(op, ino, "{e}");
    }
    n
}

fn time(ns: i64) -> SystemTime {
    artifactfs_core::clock::from_unix_ns(ns)
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File | Kind::Hardlink => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.mtime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: UNIX_EPOCH,
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: IO_SIZE,
        flags: 0,
    }
}

fn ttl(a: &Attr) -> Duration {
    if a.immutable { TTL_SEALED } else { TTL_MUTABLE }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_ns(t: TimeOrNow) -> Option<i64> {
    match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(t) => Some(kernel_time_ns(artifactfs_core::clock::to_unix_ns(t))),
    }
}

/// The time the kernel sent, from what `fuser` made of it. The kernel sends whole seconds and
/// nanoseconds to add (1959-12-31T23:59:59.25 is -1 s + 250,000,000 ns); for seconds before
/// 1970, `fuser` 0.18 subtracts the nanoseconds instead (giving 23:59:58.75). That mapping is
/// one to one, so it is undone here.
fn kernel_time_ns(fuser_ns: i64) -> i64 {
    const NS: i64 = 1_000_000_000;
    if fuser_ns >= 0 {
        return fuser_ns;
    }
    let back = fuser_ns.unsigned_abs();
    let (secs, nanos) = (back / NS as u64, back % NS as u64);
    -(secs as i64) * NS + nanos as i64
}

/// The FUSE file system: a view, plus the listings of open directory handles.
pub struct ArtifactFs {
    vfs: Arc<Vfs>,
    /// Per open directory handle: its listing, taken whenever the kernel reads it from offset
    /// 0 (the first read, and after a `rewinddir`), so that paging through a directory a few
    /// hundred entries per request lists it once, not once per request.
    dirs: Mutex<HashMap<u64, Option<Arc<Vec<DirEntry>>>>>,
    next_dir: AtomicU64,
}

impl ArtifactFs {
    pub fn new(vfs: Arc<Vfs>) -> Self {
        Self {
            vfs,
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
        }
    }

    /// A file opened write-only is written without the kernel's page cache: a producer's
    /// writes then cost one copy (its buffer to the request) instead of two (into the cache,
    /// then to the request), and fill no cache nobody reads. The view drops what other handles
    /// of the file cached after each write (`Vfs::writes_direct`). A write-only handle cannot
    /// be read or mapped, so nothing is lost by it. Other handles keep the page cache.
    fn write_only(&self, fh: u64, flags: OpenFlags) -> FopenFlags {
        if flags.acc_mode() != OpenAccMode::O_WRONLY {
            return FopenFlags::empty();
        }
        self.vfs.writes_direct(fh);
        FopenFlags::FOPEN_DIRECT_IO
    }

    fn dirs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Option<Arc<Vec<DirEntry>>>>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The listing of directory `ino` for a read at `offset` through handle `fh`.
    fn listing(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
    ) -> artifactfs_core::Result<Arc<Vec<DirEntry>>> {
        if offset > 0
            && let Some(Some(l)) = self.dirs().get(&fh)
        {
            return Ok(l.clone());
        }
        let l = Arc::new(self.vfs.readdir(ino)?);
        if let Some(slot) = self.dirs().get_mut(&fh) {
            *slot = Some(l.clone());
        }
        Ok(l)
    }

    fn entry(
        &self,
        r: artifactfs_core::Result<Attr>,
        op: &'static str,
        parent: u64,
        reply: ReplyEntry,
    ) {
        match r {
            Ok(a) => {
                self.vfs.remember(&a);
                reply.entry(&ttl(&a), &fattr(&a), Generation(0))
            }
            Err(e) => reply.error(log_err(op, parent, &e)),
        }
    }

    fn empty(r: artifactfs_core::Result<()>, op: &'static str, ino: u64, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_err(op, ino, &e)),
        }
    }
}

fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// Entries whose attributes `readdirplus` reads at a time: about what fits in one reply.
const PLUS_GROUP: usize = 32;

impl Filesystem for ArtifactFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(IO_SIZE) {
            let _ = config.set_max_write(max);
        }
        // Sequential reads of sealed files: the kernel reads ahead up to this much.
        if let Err(max) = config.set_max_readahead(IO_SIZE) {
            let _ = config.set_max_readahead(max);
        }
        // Listings carry each entry's attributes (`readdirplus`), when the kernel finds that
        // they are used (`ls -l`, `find`, `tar`): one request per few hundred names instead of
        // a `lookup` per name. A kernel without either flag just keeps using `readdir`.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.add_capabilities(InitFlags::FUSE_POSIX_ACL);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(self.vfs.lookup(parent.0, name), "lookup", parent.0, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.vfs.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &fattr(&a)),
            Err(e) => reply.error(log_err("getattr", ino.0, &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.vfs.fallocate(ino.0, fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_err("fallocate", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime_ns: mtime.map(time_ns),
        };
        match self.vfs.setattr(ino.0, set, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&ttl(&a), &fattr(&a)),
            Err(e) => reply.error(log_err("setattr", ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.vfs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(log_err("readlink", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .vfs
            .mknod(ctx(req), parent.0, name, mode & !umask, u64::from(rdev));
        self.entry(r, "mknod", parent.0, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.vfs.mkdir(ctx(req), parent.0, name, mode & !umask);
        self.entry(r, "mkdir", parent.0, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.vfs.unlink(parent.0, name), "unlink", parent.0, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.vfs.rmdir(parent.0, name), "rmdir", parent.0, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.vfs.symlink(ctx(req), parent.0, link_name, target);
        self.entry(r, "symlink", parent.0, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.vfs.rename(
            parent.0,
            name,
            newparent.0,
            newname,
            flags.contains(RenameFlags::RENAME_NOREPLACE),
            flags.contains(RenameFlags::RENAME_EXCHANGE),
        );
        Self::empty(r, "rename", parent.0, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.vfs.link(ino.0, newparent.0, newname),
            "link",
            ino.0,
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.vfs.open(ino.0, write) {
            Ok((fh, info)) => {
                let mut f = FopenFlags::empty();
                if info.direct_io {
                    f |= FopenFlags::FOPEN_DIRECT_IO;
                } else {
                    f |= self.write_only(fh, flags);
                }
                if info.keep_cache {
                    f |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                if info.no_flush {
                    f |= FopenFlags::FOPEN_NOFLUSH;
                }
                reply.opened(FileHandle(fh), f);
            }
            Err(e) => reply.error(log_err("open", ino.0, &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.vfs.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(log_err("read", ino.0, &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            && let Err(e) = self.vfs.kill_suidgid(ino.0, fh.0)
        {
            return reply.error(log_err("write", ino.0, &e));
        }
        match self.vfs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(log_err("write", ino.0, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.vfs.flush(fh.0), "flush", ino.0, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.vfs.release(fh.0), "release", ino.0, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.vfs.fsync(fh.0), "fsync", ino.0, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let attr = match self.vfs.getattr(ino.0) {
            Ok(a) if a.kind == Kind::Dir => a,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(log_err("opendir", ino.0, &e)),
        };
        // Listed at the first read, from offset 0.
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs().insert(fh, None);
        // A sealed directory never changes: the kernel may keep its listing across opens.
        let f = if attr.immutable {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), f);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs().remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.listing(ino.0, fh.0, offset) {
            Ok(list) => {
                for (i, e) in list.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(e.ino), (i + 1) as u64, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(log_err("readdir", ino.0, &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let list = match self.listing(ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(log_err("readdirplus", ino.0, &e)),
        };
        // Attributes in groups about the size of a reply (a page of entries): the rest of a
        // group past a full reply is read for nothing, a few entries at most.
        let start = (offset as usize).min(list.len());
        for (g, group) in list[start..].chunks(PLUS_GROUP).enumerate() {
            let inos: Vec<u64> = group.iter().map(|e| e.ino).collect();
            let attrs = self.vfs.getattrs(&inos);
            for (k, (e, a)) in group.iter().zip(attrs).enumerate() {
                // An entry removed since the listing was taken is skipped, as a fresh listing
                // would not have it.
                let a = match a {
                    Ok(a) => a,
                    Err(Error::NotFound(_)) => continue,
                    Err(err) => return reply.error(log_err("readdirplus", e.ino, &err)),
                };
                let i = start + g * PLUS_GROUP + k;
                if reply.add(
                    INodeNo(e.ino),
                    (i + 1) as u64,
                    &e.name,
                    &ttl(&a),
                    &fattr(&a),
                    Generation(0),
                ) {
                    return reply.ok();
                }
                // The kernel takes a reference to each entry sent but `.` and `..`.
                if e.name != "." && e.name != ".." {
                    self.vfs.remember(&a);
                }
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is committed to the index as each operation completes.
        reply.ok();
    }

    /// No ioctl is implemented: ENOTTY, as a local file system answers one it does not know
    /// (Python's `open` asks every file for `TCGETS`), and no log line for each.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        tracing::trace!(ino = ino.0, cmd, "ioctl: not supported");
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.vfs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(log_err("statfs", ino.0, &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        // The kernel passes ACL xattrs through unchecked (no FUSE_POSIX_ACL): who sets one
        // matters, since a minimal ACL is a chmod.
        let res = if name == "system.posix_acl_access" {
            self.vfs.set_access_acl(ctx(req), ino.0, value, flags)
        } else {
            self.vfs.setxattr(ino.0, name, value, flags)
        };
        Self::empty(res, "setxattr", ino.0, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.vfs.getxattr(ino.0, name) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(log_err("getxattr", ino.0, &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.vfs.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                xattr_reply(&buf, size, reply);
            }
            Err(e) => reply.error(log_err("listxattr", ino.0, &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(
            self.vfs.removexattr(ino.0, name),
            "removexattr",
            ino.0,
            reply,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.vfs.create(ctx(req), parent.0, name, mode & !umask) {
            Ok((a, fh)) => {
                self.vfs.remember(&a);
                let f = self.write_only(fh, OpenFlags(flags));
                reply.created(&ttl(&a), &fattr(&a), Generation(0), FileHandle(fh), f)
            }
            Err(e) => reply.error(log_err("create", parent.0, &e)),
        }
    }
}

/// Options of a mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Threads answering the kernel.
    pub threads: usize,
    /// The mount's source as `mount` and /proc/self/mountinfo show it (`fsname=`).
    pub fsname: String,
    /// Let users other than the one who mounted use the mount (`allow_other`); the kernel
    /// then checks every access against the modes and owners (`default_permissions`).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            threads: 2,
            fsname: "artifactfs".into(),
            allow_other: false,
        }
    }
}

/// Mounts `vfs` at `mountpoint` and serves it from background threads until the returned
/// session is unmounted (or dropped). Also starts the seal ticker (once a second), which stops
/// when `stop` is set.
pub fn spawn_mount(
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    opts: &MountOptions,
    stop: Arc<AtomicBool>,
) -> std::io::Result<BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(opts.fsname.clone()),
        fuser::MountOption::Subtype("artifactfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    let session = fuser::spawn_mount(ArtifactFs::new(vfs.clone()), mountpoint, &config)?;
    raise_kernel_read_ahead(mountpoint);
    let notifier = session.notifier();
    let data_notifier = session.notifier();
    vfs.set_data_invalidator(Some(Box::new(move |ino, offset, len| {
        if let Err(e) = data_notifier.inval_inode(INodeNo(ino), offset, len) {
            tracing::debug!(ino, offset, len, "kernel page cache invalidation: {e}");
        }
    })));
    let store_notifier = session.notifier();
    vfs.set_content_pusher(Some(Box::new(move |ino, data| {
        if let Err(e) = store_notifier.store(INodeNo(ino), 0, data) {
            tracing::debug!(ino, len = data.len(), "kernel page cache store: {e}");
        }
    })));
    vfs.set_entry_invalidator(Some(Box::new(move |parent, name| {
        if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::new(name)) {
            tracing::debug!(parent, name, "kernel entry invalidation: {e}");
        }
    })));
    std::thread::Builder::new()
        .name("afs-seal-ticker".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                vfs.tick();
            }
        })?;
    Ok(session)
}

/// Raises the kernel's readahead for the files of the mount at `mountpoint` to
/// [`KERNEL_READ_AHEAD_KB`], through the sysfs file of the mount's backing device. Only root
/// may write it: otherwise the mount keeps the kernel's default, and says so in the log.
/// [`spawn_mount`] calls it; so does a caller that learns the mount is ready by seeing it
/// mounted, which happens before `spawn_mount` returns. A second call changes nothing.
pub fn raise_kernel_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::debug!(
                "kernel readahead: cannot stat {}: {e}",
                mountpoint.display()
            );
            return;
        }
    };
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let file = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let now = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if now.is_some_and(|kb| kb >= KERNEL_READ_AHEAD_KB) {
        return;
    }
    match std::fs::write(&file, KERNEL_READ_AHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!(file, kb = KERNEL_READ_AHEAD_KB, "kernel readahead raised"),
        Err(e) => tracing::info!(
            file,
            "kernel readahead stays at {} (sequential reads of large files are slower): {e}",
            now.map_or_else(
                || "the kernel's default".to_owned(),
                |kb| format!("{kb} KiB")
            )
        ),
    }
}

#[cfg(test)]
mod time_tests {
    use super::kernel_time_ns;
    use std::time::{Duration, UNIX_EPOCH};

    /// What `fuser` 0.18 makes of the kernel's (seconds, nanoseconds) before 1970.
    fn as_fuser(secs: i64, nanos: u32) -> i64 {
        let t = if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, nanos)
        } else {
            UNIX_EPOCH - Duration::new(secs.unsigned_abs(), nanos)
        };
        artifactfs_core::clock::to_unix_ns(t)
    }

    #[test]
    fn kernel_times_before_1970_are_restored() {
        for (secs, nanos) in [
            (0, 0),
            (1, 5),
            (-1, 0),
            (-1, 999_999_995),
            (-315_619_200, 250_000_000),
        ] {
            let want = secs * 1_000_000_000 + i64::from(nanos);
            assert_eq!(
                kernel_time_ns(as_fuser(secs, nanos)),
                want,
                "{secs} s {nanos} ns"
            );
        }
    }
}
