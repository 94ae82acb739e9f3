//! The file-system view of a store that frontends share (the FUSE mount today): a tree of
//! `<namespace>/<run>/…` plus the control directory `.artifactfs/`, addressed by inode numbers,
//! where each operation is one call returning [`Result`]. It knows nothing of FUSE: callers pass
//! plain values and map [`Error`] variants to errnos.
//!
//! # Design
//!
//! - **Open runs** keep their metadata (inodes, directory entries, modes, owners, times, xattrs,
//!   symlink targets, link counts) in the index (schema 2) and each regular file's bytes in a
//!   staging file `STORE/staging/<run id>/<inode>` (ADR 0007), or, up to 64 KiB, in the index
//!   itself (ADR 0015: in memory while open, written with the mtime on close). Writes are
//!   `pwrite`s into that file; its length is the file's size. A file's mtime after a write is kept in memory and
//!   written to the index on flush, fsync and release, so a closed or fsynced file survives a
//!   crash of the mount with its content and attributes.
//! - **Chunking ahead**: a closed file is chunked in the background (`preseal`), so that the
//!   seal can take its chunk list instead of reading it again (ADR 0015).
//! - **Sealing** streams every staged file through the chunk pipeline (as `ingest_dir` does),
//!   builds the same manifest entries as an ingest of the same tree, stores the manifest, and
//!   flips the run to sealed in one index transaction; only then are the staging files deleted.
//!   A crash before that commit leaves the run open and intact.
//! - **Sealed runs** are read-only views of their `files` rows, loaded once per mount; content
//!   is read chunk by chunk (each verified) through a small decompressed-chunk cache.
//! - **Inode numbers**: 1 is the root, 2..=6 the control directory; namespaces, manifest files
//!   and open-run inodes are derived from index row ids (stable across remounts); a sealed run's
//!   entries are `SEALED_BASE | run id << 24 | entry index`, unique within a mount. When a run is
//!   sealed, the numbers the kernel knows for its open inodes are redirected to the sealed ones.
//! - **Locking**: one mutex guards the in-memory state and serialises metadata operations;
//!   file data is read and written outside it. Lock order: state, then the index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::{rfc3339, to_unix_ns};
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestDigest};
use crate::index::journal::Step;
use crate::index::{ChunkedContent, InodeRow, Meta, NamespaceRow};
use crate::ingest::{ingest_stream, producer_metadata};
use crate::manifest::{self, Entry, Kind, MANIFEST_FORMAT, Manifest, ROOT, XattrValue};
use crate::names::{NAME_MAX, RunRef, validate_component};
use crate::store::{NoProgress, Store};

/// Inode of the mount's root directory.
pub const ROOT_INO: u64 = 1;
const CTL_DIR: u64 = 2;
const CTL_STATUS: u64 = 3;
const CTL_SEAL: u64 = 4;
const CTL_EVENTS: u64 = 5;
const CTL_MANIFESTS: u64 = 6;
const CTL_BY_DIGEST: u64 = 7;
const CTL_RETENTION: u64 = 8;
const CTL_EXPIRED: u64 = 9;
const CTL_GC: u64 = 10;
const NS_BASE: u64 = 1 << 40;
const MANNS_BASE: u64 = 2 << 40;
const MANRUN_BASE: u64 = 3 << 40;
const RETNS_BASE: u64 = 4 << 40;
const RETRUN_BASE: u64 = 5 << 40;
const OPEN_BASE: u64 = 1 << 48;
const SEALED_BASE: u64 = 1 << 62;
const IDX_BITS: u32 = 24;
/// Set in a sealed node's run id for the run's tree under `.artifactfs/by-digest/`: the same
/// entries under other inode numbers, so that no directory has two names in the kernel.
const VIEW_RUN: i64 = 1 << 37;

/// Name of the control directory in the mount's root.
pub const CONTROL_DIR: &str = ".artifactfs";
/// The xattr that seals an open run when set on its directory.
pub const SEAL_XATTR: &str = "user.artifactfs.seal";
const FACTS_PREFIX: &str = "user.artifactfs.";
/// First reads of a sealed run's files at most this many entries apart, in increasing order,
/// are a scan of the run: the files after them are read ahead.
const SCAN_GAP: usize = 8;
/// How long an explicit seal waits for the releases of files just closed (the kernel sends a
/// release after the close returned) before it fails with `Busy`.
const RELEASE_GRACE: Duration = Duration::from_millis(500);
/// How far a scan reads ahead: this many files, or this many bytes of their chunks.
const SCAN_AHEAD_FILES: usize = 16;
const SCAN_AHEAD_BYTES: u64 = 4 << 20;
/// Files of a scan's window up to this size are handed to the kernel's page cache whole once
/// read ahead (see [`ContentPusher`]).
const PUSH_MAX_BYTES: u64 = 1 << 20;
/// How far ahead of a sequential read of a sealed file chunks are loaded when the store has a
/// remote tier (at most half the chunk cache): evicted chunks then come in coalesced, parallel
/// ranged GETs (`crate::fetch`) instead of one request per chunk when the read gets there.
const TIERED_AHEAD_BYTES: u64 = 24 << 20;
/// The read-only facts a mount shows (after [`FACTS_PREFIX`]); writing one into an open run is
/// accepted and ignored.
const DERIVED_FACTS: [&str; 5] = ["state", "manifest", "sealed_at", "blake3", "retain_until"];

/// The xattr that carries a run's retention (or a namespace's default for new runs).
pub const RETAIN_XATTR: &str = "user.retain";
/// Prefix of the xattrs that are named holds on a run.
pub const HOLD_PREFIX: &str = "user.hold.";

/// `setxattr` flags.
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

/// Settings of a file-system view.
#[derive(Clone, Debug)]
pub struct VfsOptions {
    /// An open run with no open files and no writes for this long is sealed.
    pub seal_after: Duration,
    /// Closing a file of this name in a run's directory seals the run.
    pub seal_marker: Option<String>,
    /// Upper bound of the decompressed-chunk cache, bytes.
    pub chunk_cache_bytes: usize,
    /// Bytes of a sealed file's chunks loaded into the cache ahead of a sequential read of it
    /// (0: none); whole chunks, so at least the next one.
    pub readahead_bytes: u64,
}

impl Default for VfsOptions {
    fn default() -> Self {
        Self {
            seal_after: Duration::from_secs(60),
            seal_marker: None,
            chunk_cache_bytes: 128 << 20,
            readahead_bytes: 1 << 20,
        }
    }
}

/// Who is asking (the caller's credentials).
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
}

/// Attributes of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub rdev: u64,
    /// Never changes while mounted (sealed runs): frontends may cache it long.
    pub immutable: bool,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

/// What `setattr` changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// `Some(None)` means "now".
    pub mtime_ns: Option<Option<i64>>,
}

/// What a close does with the changes it persists: `Close` promises them (they reach the
/// close journal, and commit with its batch, ADR 0031), `Defer` leaves them to the commit that
/// comes next (a rename's, or `fsync`'s own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Close,
    Defer,
}

/// How an opened file should be cached by the frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenInfo {
    /// Content is generated on open: bypass the page cache.
    pub direct_io: bool,
    /// Content cannot change: keep the page cache across opens.
    pub keep_cache: bool,
    /// Closing the handle has nothing to do (it was opened only for reading): the frontend
    /// need not tell the view of each `close`, only of the handle's release.
    pub no_flush: bool,
}

/// File-system statistics of the store's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Root,
    CtlDir,
    CtlStatus,
    CtlSeal,
    CtlEvents,
    CtlManifests,
    CtlByDigest,
    CtlRetention,
    CtlExpired,
    CtlGc,
    Namespace(i64),
    ManNs(i64),
    ManRun(i64),
    RetNs(i64),
    RetRun(i64),
    Open(i64),
    Sealed { run: i64, idx: usize },
}

fn encode(n: Node) -> u64 {
    match n {
        Node::Root => ROOT_INO,
        Node::CtlDir => CTL_DIR,
        Node::CtlStatus => CTL_STATUS,
        Node::CtlSeal => CTL_SEAL,
        Node::CtlEvents => CTL_EVENTS,
        Node::CtlManifests => CTL_MANIFESTS,
        Node::CtlByDigest => CTL_BY_DIGEST,
        Node::CtlRetention => CTL_RETENTION,
        Node::CtlExpired => CTL_EXPIRED,
        Node::CtlGc => CTL_GC,
        Node::RetNs(id) => RETNS_BASE + id as u64,
        Node::RetRun(id) => RETRUN_BASE + id as u64,
        Node::Namespace(id) => NS_BASE + id as u64,
        Node::ManNs(id) => MANNS_BASE + id as u64,
        Node::ManRun(id) => MANRUN_BASE + id as u64,
        Node::Open(ino) => OPEN_BASE + ino as u64,
        Node::Sealed { run, idx } => SEALED_BASE | ((run as u64) << IDX_BITS) | idx as u64,
    }
}

fn decode_raw(ino: u64) -> Result<Node> {
    let n = match ino {
        ROOT_INO => Node::Root,
        CTL_DIR => Node::CtlDir,
        CTL_STATUS => Node::CtlStatus,
        CTL_SEAL => Node::CtlSeal,
        CTL_EVENTS => Node::CtlEvents,
        CTL_MANIFESTS => Node::CtlManifests,
        CTL_BY_DIGEST => Node::CtlByDigest,
        CTL_RETENTION => Node::CtlRetention,
        CTL_EXPIRED => Node::CtlExpired,
        CTL_GC => Node::CtlGc,
        i if i >= SEALED_BASE => Node::Sealed {
            run: ((i & !SEALED_BASE) >> IDX_BITS) as i64,
            idx: (i & ((1 << IDX_BITS) - 1)) as usize,
        },
        i if i >= OPEN_BASE => Node::Open((i - OPEN_BASE) as i64),
        i if i >= RETRUN_BASE => Node::RetRun((i - RETRUN_BASE) as i64),
        i if i >= RETNS_BASE => Node::RetNs((i - RETNS_BASE) as i64),
        i if i >= MANRUN_BASE => Node::ManRun((i - MANRUN_BASE) as i64),
        i if i >= MANNS_BASE => Node::ManNs((i - MANNS_BASE) as i64),
        i if i >= NS_BASE => Node::Namespace((i - NS_BASE) as i64),
        other => return Err(Error::NotFound(format!("inode {other}"))),
    };
    Ok(n)
}

/// A directory with the set-group-ID bit hands its group to what is made in it, and the bit
/// to its subdirectories (as local file systems do, for directories shared by a group).
fn inherit_setgid(row: &mut InodeRow, dir_mode: u32, dir_gid: u32) {
    if dir_mode & 0o2000 != 0 {
        row.gid = dir_gid;
        if row.kind == Kind::Dir {
            row.mode |= 0o2000;
        }
    }
}

/// Counts the kernel's reference to a file of an open run handed to it in an entry (see
/// `State::lookups`); directories are not counted (rmdir removes them at once).
fn remember(st: &mut State, a: &Attr) {
    if a.kind != Kind::Dir
        && let Ok(Node::Open(inode)) = decode_raw(a.ino)
    {
        *st.lookups.entry(inode).or_default() += 1;
    }
}

/// A sealed run's entries, loaded once per mount.
struct SealedRun {
    id: i64,
    r: RunRef,
    digest: ManifestDigest,
    sealed_at_ns: i64,
    entries: Vec<Entry>,
    by_path: HashMap<String, usize>,
    /// Per entry: the entry whose inode it is (itself, or a hard link's target).
    resolved: Vec<usize>,
    nlink: Vec<u32>,
    /// Per directory entry: (name, child index) in name order.
    children: HashMap<usize, Vec<(String, usize)>>,
}

impl SealedRun {
    fn new(
        id: i64,
        r: RunRef,
        digest: ManifestDigest,
        sealed_at_ns: i64,
        mut entries: Vec<Entry>,
    ) -> Result<Self> {
        manifest::sort_entries(&mut entries);
        if entries.first().map(|e| e.path.as_str()) != Some(ROOT) {
            return Err(Error::corrupt(format!("run {r}"), "no root entry"));
        }
        if entries.len() >= 1 << IDX_BITS {
            return Err(Error::Unsupported(format!(
                "run {r} has {} entries; the mount shows runs of fewer than {}",
                entries.len(),
                1u64 << IDX_BITS
            )));
        }
        let by_path: HashMap<String, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        let mut resolved: Vec<usize> = (0..entries.len()).collect();
        let mut nlink = vec![1u32; entries.len()];
        let mut children: HashMap<usize, Vec<(String, usize)>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if e.kind == Kind::Hardlink {
                let t = e
                    .target
                    .as_deref()
                    .and_then(|t| by_path.get(t))
                    .copied()
                    .ok_or_else(|| {
                        Error::corrupt(
                            format!("run {r}"),
                            format!("hard link {} has no target", e.path),
                        )
                    })?;
                resolved[i] = t;
                nlink[t] += 1;
            }
            if i == 0 {
                continue;
            }
            let (parent, name) = match e.path.rsplit_once('/') {
                Some((p, n)) => (by_path.get(p).copied(), n),
                None => (Some(0), e.path.as_str()),
            };
            let parent = parent.ok_or_else(|| {
                Error::corrupt(
                    format!("run {r}"),
                    format!("{} has no parent entry", e.path),
                )
            })?;
            children
                .entry(parent)
                .or_default()
                .push((name.to_owned(), i));
        }
        for v in children.values_mut() {
            v.sort();
        }
        Ok(Self {
            id,
            r,
            digest,
            sealed_at_ns,
            entries,
            by_path,
            resolved,
            nlink,
            children,
        })
    }

    fn entry(&self, idx: usize) -> Result<&Entry> {
        self.entries
            .get(idx)
            .ok_or_else(|| Error::NotFound(format!("entry {idx} of run {}", self.r)))
    }
}

/// What a retention xattr applies to.
enum RetentionTarget {
    Run(RunRef),
    Namespace(String),
}

enum Handle {
    /// A file of an open run: its staging file, or `None` while its content is inline (in
    /// [`State::inline`] and the index).
    Staged {
        run: i64,
        inode: i64,
        file: Option<Arc<File>>,
    },
    Sealed {
        run: Arc<SealedRun>,
        idx: usize,
    },
    Buffer(Arc<Vec<u8>>),
    SealCtl,
    GcCtl,
}

/// An open inline file's bytes.
#[derive(Default)]
struct Inline {
    data: Vec<u8>,
    /// Changed since it was last written to the index.
    dirty: bool,
}

/// A regular file of an open run keeps its content in the index while it is at most this
/// long, and moves to a staging file when it grows past it (ADR 0015).
const INLINE_MAX: u64 = 64 << 10;
/// The open inline files' bytes in memory are at most this many; past it, files move to
/// staging files.
const INLINE_MEM_MAX: usize = 64 << 20;

struct Activity {
    last: Instant,
    open: u32,
    seal_requested: bool,
}

#[derive(Default)]
struct State {
    redirect: HashMap<u64, u64>,
    sealed: HashMap<i64, Arc<SealedRun>>,
    manifests: HashMap<i64, Arc<Vec<u8>>>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    open_count: HashMap<i64, u32>,
    /// The references the kernel holds to files of open runs (not directories): one per entry
    /// handed to it (lookup, create, mknod, symlink, link, readdirplus) until it forgets them
    /// ([`Vfs::remember`], [`Vfs::forget`]).
    /// A file whose last name goes lives on while it has one, as on a local file system: a
    /// reader that looked up a name just before a rename replaced it opens what it found.
    lookups: HashMap<i64, u64>,
    runs: HashMap<i64, Activity>,
    dirty_mtime: HashMap<i64, i64>,
    /// chmod, chown and utimens of files that are open, kept until the next flush, fsync or
    /// release writes them to the index with the file's content: `cp -a` changes each file
    /// two or three times between its create and its close, and one index commit serves all.
    dirty_attrs: HashMap<i64, AttrPatch>,
    /// The content of open files small enough to live in the index instead of a staging file
    /// (ADR 0015), while they are open; written to the index on flush, fsync and release.
    inline: HashMap<i64, Inline>,
    /// The bytes in `inline`.
    inline_bytes: usize,
    /// Open runs being sealed: changes to them wait (see `Vfs::lock_mut`).
    sealing: HashSet<i64>,
    /// Per sealed-file handle: where the next sequential read starts (for readahead).
    read_pos: HashMap<u64, u64>,
    /// Per sealed-file handle of a tiered store: the file offset up to which chunks were
    /// queued for loading ahead.
    ahead_until: HashMap<u64, u64>,
    /// Per sealed run: the entry whose first read came last, to tell a scan of the run (tar,
    /// cp -r, rsync) from random reads, and the entry up to which the scan's files were queued
    /// ahead.
    last_read: HashMap<i64, (usize, usize)>,
    /// xattr names whose refusal was logged as a warning already (later ones log at debug:
    /// `cp -a` of a tree would otherwise log one line per file).
    warned_xattrs: HashSet<String>,
    /// Open files whose creation a failed commit rolled back, and whether that commit failed
    /// for a full disk: their handles answer ENOSPC (or ENOENT) until they are closed.
    lost: HashMap<i64, bool>,
    /// Staged files written only by appends since they left the index: the next offset.
    appending: HashMap<i64, u64>,
    /// Files being chunked as they are written (ADR 0025).
    streams: HashMap<i64, Arc<stream::Stream>>,
    /// Files written back from chunks to their staging files: they do not stream again.
    unstreamed: HashSet<i64>,
    /// Writes to staging files under way, per inode (a stream starts with none).
    writing: HashMap<i64, u32>,
    /// The content of open files kept as chunk lists (ADR 0025), while they are open.
    chunked: HashMap<i64, Arc<ChunkedContent>>,
    /// No stream starts while gc runs.
    streams_paused: bool,
    /// Files whose stream failed, with the error (and whether the disk was full): their
    /// writes, flushes and fsyncs fail until they are closed.
    broken: HashMap<i64, (String, bool)>,
    /// Handles the kernel writes through without its page cache (see `Vfs::writes_direct`).
    direct: HashSet<u64>,
}

/// Attribute changes of an open file not yet in the index (see `State::dirty_attrs`).
#[derive(Clone, Copy, Debug, Default)]
struct AttrPatch {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// An explicit mtime (utimens); a write's later mtime is `State::dirty_mtime`.
    mtime_ns: Option<i64>,
    ctime_ns: i64,
}

impl AttrPatch {
    /// `row` with these changes; the ctime never goes back (another change of the row may
    /// have been committed since).
    fn applied(&self, mut row: InodeRow) -> InodeRow {
        row.mode = self.mode.unwrap_or(row.mode);
        row.uid = self.uid.unwrap_or(row.uid);
        row.gid = self.gid.unwrap_or(row.gid);
        row.mtime_ns = self.mtime_ns.unwrap_or(row.mtime_ns);
        row.ctime_ns = row.ctime_ns.max(self.ctime_ns);
        row
    }
}

/// A bounded LRU of decompressed, verified chunks.
struct ChunkCache {
    max_bytes: usize,
    inner: Mutex<CacheInner>,
    /// Signalled when a chunk being loaded (`CacheInner::loading`) is done.
    loaded: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters of the decompressed-chunk cache, since the view was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads of a chunk that found it in the cache.
    pub hits: u64,
    /// Reads of a chunk that had to load it.
    pub misses: u64,
    /// Chunks loaded ahead of reads.
    pub readahead: u64,
}

struct CacheInner {
    map: lru::LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    /// Chunks a thread is reading and decoding now, one at a time ([`ChunkCache::get`],
    /// [`ChunkCache::load_ahead`]): another thread that needs one waits for it rather than
    /// decoding it a second time.
    loading: HashSet<ChunkId>,
}

impl Default for CacheInner {
    fn default() -> Self {
        Self {
            // Bounded by bytes, below, not by count.
            map: lru::LruCache::unbounded(),
            bytes: 0,
            loading: HashSet::new(),
        }
    }
}

/// How long a read waits for a chunk another thread is loading before it loads the chunk
/// itself (that thread may be stuck on a slow disk or a remote tier).
const LOADING_WAIT: Duration = Duration::from_secs(2);

impl ChunkCache {
    fn inner(&self) -> MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn contains(&self, id: &ChunkId) -> bool {
        self.inner().map.contains(id)
    }

    /// The decoded bytes held now.
    fn bytes(&self) -> usize {
        self.inner().bytes
    }

    /// The chunk if it is cached, without counting a hit or making it the most recently used.
    fn peek(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.inner().map.peek(id).cloned()
    }

    /// The chunk if it is cached (then it becomes the most recently used).
    fn cached(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        let d = self.inner().map.get(id).cloned();
        if d.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        d
    }

    fn get(&self, store: &Store, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        let mut c = self.inner();
        let deadline = Instant::now() + LOADING_WAIT;
        loop {
            if let Some(d) = c.map.get(id).cloned() {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(d);
            }
            let now = Instant::now();
            if !c.loading.contains(id) || now >= deadline {
                break;
            }
            c = self
                .loaded
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mine = c.loading.insert(*id);
        drop(c);
        self.load_marked(store, id, mine)
    }

    /// Loads a chunk ahead of the reads that will need it, unless it is cached or another
    /// thread is loading it. Returns whether it loaded it.
    fn load_ahead(&self, store: &Store, id: &ChunkId) -> Result<bool> {
        {
            let mut c = self.inner();
            if c.map.contains(id) || !c.loading.insert(*id) {
                return Ok(false);
            }
        }
        self.load_marked(store, id, true).map(|_| true)
    }

    /// Reads and caches chunk `id`, which this thread marked as loading if `mine`; then
    /// unmarks it and wakes the threads waiting for it (they load it themselves on an error).
    fn load_marked(&self, store: &Store, id: &ChunkId, mine: bool) -> Result<Arc<Vec<u8>>> {
        let r = store.read_chunk(id).map(Arc::new);
        if let Ok(d) = &r {
            self.insert(id, d.clone());
        }
        if mine {
            self.inner().loading.remove(id);
            self.loaded.notify_all();
        }
        r
    }

    /// Caches a chunk; one cached already only becomes the most recently used.
    fn insert(&self, id: &ChunkId, data: Arc<Vec<u8>>) {
        let mut c = self.inner();
        if c.map.get(id).is_some() {
            return;
        }
        c.bytes += data.len();
        c.map.put(*id, data);
        while c.bytes > self.max_bytes && c.map.len() > 1 {
            match c.map.pop_lru() {
                Some((_, d)) => c.bytes -= d.len(),
                None => break,
            }
        }
    }
}

enum Ahead {
    Load(ChunkId),
    /// Chunks a scan or a sequential read will need, loaded together; then the whole files to
    /// hand to the kernel's page cache.
    Batch(Vec<ChunkId>, Vec<Push>),
    /// Answered once everything queued before it is done.
    Sync(crossbeam_channel::Sender<()>),
}

/// A small sealed file of a scan's window: once its chunks are loaded, its content goes to the
/// kernel's page cache under inode number `ino`.
struct Push {
    ino: u64,
    chunks: Vec<ChunkId>,
}

/// A thread that loads chunks into the cache ahead of sequential reads of sealed files.
struct Readahead {
    tx: Option<crossbeam_channel::Sender<Ahead>>,
    thread: Option<std::thread::JoinHandle<()>>,
    loaded: Arc<AtomicU64>,
}

impl Readahead {
    fn start(
        store: Arc<Store>,
        cache: Arc<ChunkCache>,
        pusher: Arc<Mutex<Option<Arc<ContentPusher>>>>,
    ) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Ahead>(64);
        let loaded = Arc::new(AtomicU64::new(0));
        let count = loaded.clone();
        let thread = std::thread::Builder::new()
            .name("afs-readahead".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Ahead::Load(id) => {
                            match cache.load_ahead(&store, &id) {
                                Ok(true) => {
                                    count.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(false) => {}
                                // The read that needs it will load it again and report.
                                Err(e) => tracing::debug!(chunk = %id, "readahead: {e}"),
                            }
                        }
                        Ahead::Batch(ids, pushes) => {
                            let ids: Vec<ChunkId> =
                                ids.into_iter().filter(|id| !cache.contains(id)).collect();
                            let r = store.for_each_chunk(&ids, &mut |i, d| {
                                cache.insert(&ids[i], Arc::new(d));
                                count.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            });
                            if let Err(e) = r {
                                tracing::debug!(chunks = ids.len(), "readahead: {e}");
                            }
                            if !pushes.is_empty() {
                                push_files(&cache, &pusher, &pushes);
                            }
                        }
                        Ahead::Sync(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|e| Error::io("start thread", "afs-readahead", e))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            loaded,
        })
    }
}

/// Hands each file of `pushes` whose chunks are all in the cache to the kernel. A file with a
/// chunk missing (its load failed, or it was evicted already) is left to the kernel's reads.
///
/// No lock is held while the kernel takes a file: it may wait for a read request of the same
/// file to be answered first, and the threads that answer it take these locks.
fn push_files(cache: &ChunkCache, pusher: &Mutex<Option<Arc<ContentPusher>>>, pushes: &[Push]) {
    let hook = pusher.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(push) = hook else {
        return;
    };
    let mut data = Vec::new();
    'files: for p in pushes {
        data.clear();
        for id in &p.chunks {
            let Some(c) = cache.peek(id) else {
                continue 'files;
            };
            data.extend_from_slice(&c);
        }
        push(p.ino, &data);
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
type SealHook = Box<dyn Fn(i64) + Send>;

/// The file-system view of one store.
/// Called with (parent inode, name) when a name disappears without a request of the kernel's,
/// e.g. a run deleted by gc: the kernel may otherwise keep serving it from its dentry cache.
pub type EntryInvalidator = Box<dyn Fn(u64, &str) + Send + Sync>;

/// Makes the kernel drop what it caches of a file's content: (inode number, offset, length).
pub type DataInvalidator = Box<dyn Fn(u64, i64, i64) + Send + Sync>;

/// Puts the whole content of a sealed file into the kernel's page cache: (inode number,
/// content). While a scan (`tar`, `cp -r`) reads a sealed run's files one after another, the
/// small files ahead of it are read ahead and handed over this way, so that the scan reads
/// them from the page cache as if warm, without a read request (and without the attribute
/// request each read request makes the kernel send at the next `stat`).
pub type ContentPusher = Box<dyn Fn(u64, &[u8]) + Send + Sync>;

pub struct Vfs {
    store: Arc<Store>,
    opts: VfsOptions,
    staging: PathBuf,
    state: Mutex<State>,
    /// Signalled when a run's seal ends.
    sealed_cv: Condvar,
    cache: Arc<ChunkCache>,
    readahead: Option<Readahead>,
    started_ns: i64,
    /// How many subdirectories each open-run directory has (its link count is 2 + that),
    /// remembered so that a `stat` of a directory of thousands of files does not count them
    /// again. Read and changed only while `state` is held; forgotten when a directory gains or
    /// loses a subdirectory and when a run seals.
    subdirs: Mutex<HashMap<i64, u64>>,
    /// Tells the kernel to forget a name it may have cached (set by the FUSE frontend).
    forget_entry: Mutex<Option<EntryInvalidator>>,
    forget_data: Mutex<Option<DataInvalidator>>,
    /// Hands the small files a scan reads next to the kernel (set by the FUSE frontend).
    push: Arc<Mutex<Option<Arc<ContentPusher>>>>,
    /// Chunks closed files of open runs ahead of their seal.
    preseal: preseal::PreSeal,
    /// The number of the next inode made: never one handed out before in this process, even
    /// if the commit of its creation failed and SQLite would give it again, so a handle of a
    /// file whose creation was rolled back never reaches a newer file.
    next_ino: std::sync::atomic::AtomicI64,
    /// Called by a seal after it froze the run and let go of the state lock.
    #[cfg(test)]
    seal_hook: Mutex<Option<SealHook>>,
}

/// Logs the refusal `e` of xattr `name`: a warning the first time, at debug level after
/// (`cp -a` of a tree would otherwise log one line per file). Returns `e`.
fn refused_xattr(st: &mut State, name: &str, e: Error) -> Error {
    if st.warned_xattrs.insert(name.to_owned()) {
        tracing::warn!("refused: {e} (further refusals of this name log at debug level)");
    } else {
        tracing::debug!("refused: {e}");
    }
    e
}

/// The inode named `name` in directory `dir`, with its number; `NotFound` names it.
fn named(m: &Meta<'_>, dir: i64, name: &str) -> Result<(i64, InodeRow)> {
    let ino = m
        .lookup(dir, name)?
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    let row = m
        .inode(ino)?
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    Ok((ino, row))
}

fn name_str(name: &OsStr) -> Result<&str> {
    name.to_str().ok_or_else(|| {
        Error::invalid(
            "file name",
            format!("{name:?} is not UTF-8; artifactfs stores UTF-8 names only"),
        )
    })
}

fn check_name(what: &str, name: &str, allow_dot: bool) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong(format!(
            "{what} of {} bytes (at most {NAME_MAX})",
            name.len()
        )));
    }
    validate_component(what, name, allow_dot)
}

fn kind_of_mode(mode: u32) -> Result<Kind> {
    Ok(match mode & 0o170000 {
        0o100000 | 0 => Kind::File,
        0o040000 => Kind::Dir,
        0o120000 => Kind::Symlink,
        0o010000 => Kind::Fifo,
        0o020000 => Kind::Char,
        0o060000 => Kind::Block,
        0o140000 => Kind::Socket,
        other => return Err(Error::invalid("file type", format!("mode {other:o}"))),
    })
}

impl Vfs {
    /// A view of `store`; removes what a crash left behind (names-less inodes, their files).
    pub fn new(store: Store, opts: VfsOptions) -> Result<Self> {
        let staging = store.staging_dir();
        fs::create_dir_all(&staging).map_err(|e| Error::io("create directory", &staging, e))?;
        let started_ns = to_unix_ns(store.clock().now());
        let orphans = remove_unlinked_inodes(&store, &staging)?;
        if orphans > 0 {
            tracing::info!(inodes = orphans, "removed unlinked inodes left by a crash");
        }
        let open_runs = store.index().meta(|m| m.open_runs())?;
        let next_ino = store.index().meta(|m| m.next_inode_number())?;
        let mut st = State {
            next_fh: 1,
            ..Default::default()
        };
        for id in open_runs {
            st.runs.insert(
                id,
                Activity {
                    last: Instant::now(),
                    open: 0,
                    seal_requested: false,
                },
            );
        }
        remove_sealed_staging(&store, &staging)?;
        let store = Arc::new(store);
        let cache = Arc::new(ChunkCache {
            max_bytes: opts.chunk_cache_bytes,
            inner: Mutex::new(CacheInner::default()),
            loaded: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        });
        let push = Arc::new(Mutex::new(None));
        let readahead = if opts.readahead_bytes > 0 {
            Some(Readahead::start(
                store.clone(),
                cache.clone(),
                push.clone(),
            )?)
        } else {
            None
        };
        let preseal = preseal::PreSeal::start(store.clone(), staging.clone())?;
        Ok(Self {
            store,
            opts,
            staging,
            state: Mutex::new(st),
            sealed_cv: Condvar::new(),
            cache,
            readahead,
            started_ns,
            subdirs: Mutex::new(HashMap::new()),
            forget_entry: Mutex::new(None),
            forget_data: Mutex::new(None),
            push,
            preseal,
            next_ino: std::sync::atomic::AtomicI64::new(next_ino),
            #[cfg(test)]
            seal_hook: Mutex::new(None),
        })
    }

    /// Counters of the decompressed-chunk cache and of readahead.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            misses: self.cache.misses.load(Ordering::Relaxed),
            readahead: self
                .readahead
                .as_ref()
                .map_or(0, |r| r.loaded.load(Ordering::Relaxed)),
        }
    }

    /// Returns once the readahead asked for so far is done (for tests and benchmarks).
    pub fn wait_readahead(&self) {
        if let Some(tx) = self.readahead.as_ref().and_then(|r| r.tx.as_ref()) {
            let (done, wait) = crossbeam_channel::bounded(1);
            if tx.send(Ahead::Sync(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Forgets what the view cached of runs that changed behind it (a command run by the
    /// mount's owner through the control socket, e.g. one that deleted runs). New runs need
    /// nothing: names are looked up in the index each time.
    pub fn store_changed(&self) {
        let mut st = self.lock();
        if st.sealed.is_empty() && st.manifests.is_empty() {
            return;
        }
        let live: HashSet<i64> = match self.store.runs(None) {
            Ok(runs) => runs
                .into_iter()
                .filter(|r| r.manifest.is_some())
                .map(|r| r.id)
                .collect(),
            Err(e) => {
                tracing::warn!("cannot list runs to refresh the mount's caches: {e}");
                return;
            }
        };
        st.sealed.retain(|id, _| live.contains(&(id & !VIEW_RUN)));
        st.manifests.retain(|id, _| live.contains(id));
    }

    /// The store behind this view.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A chunk's plaintext if the decompressed-chunk cache holds it (verified when loaded),
    /// counted as a hit; nothing is loaded on a miss.
    pub fn cached_chunk(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.cache.cached(id)
    }

    /// The most bytes the view's decoded-chunk cache holds.
    pub fn chunk_cache_capacity(&self) -> u64 {
        self.cache.max_bytes as u64
    }

    /// Keeps a decoded chunk, verified against `id` by the caller, in the view's chunk cache:
    /// for frontends that read sealed files past the view (HTTP downloads), so that the next
    /// read of a warm file decodes nothing.
    pub fn keep_chunk(&self, id: &ChunkId, data: Arc<Vec<u8>>) {
        self.cache.insert(id, data);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> i64 {
        to_unix_ns(self.store.clock().now())
    }

    fn node(&self, st: &State, ino: u64) -> Result<Node> {
        decode_raw(st.redirect.get(&ino).copied().unwrap_or(ino))
    }

    fn staging_path(&self, run: i64, inode: i64) -> PathBuf {
        self.staging.join(run.to_string()).join(inode.to_string())
    }

    fn sealed_run(&self, st: &mut State, run: i64) -> Result<Arc<SealedRun>> {
        if let Some(s) = st.sealed.get(&run) {
            return Ok(s.clone());
        }
        let idx = self.store.index();
        let row = idx
            .run_by_id(run & !VIEW_RUN)?
            .filter(|r| r.state != "deleted")
            .ok_or_else(|| Error::NotFound(format!("run {run} (deleted)")))?;
        let digest = row
            .manifest
            .ok_or_else(|| Error::State(format!("run {} is {}", row.run, row.state)))?;
        let entries = idx.files(row.id)?;
        drop(idx);
        let s = Arc::new(SealedRun::new(
            run,
            row.run,
            digest,
            row.sealed_at_ns.unwrap_or(0),
            entries,
        )?);
        st.sealed.insert(run, s.clone());
        Ok(s)
    }

    /// The namespace of this name; `NotFound` names it.
    fn ns_named(&self, name: &str) -> Result<NamespaceRow> {
        self.meta(|m| m.namespace(name))?
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    /// The namespace of this row id.
    fn ns_by_id(&self, id: i64) -> Result<NamespaceRow> {
        self.meta(|m| m.namespace_by_id(id))?
            .ok_or_else(|| Error::NotFound(format!("namespace {id}")))
    }

    /// Reads the index inside the view's own deferred transaction, if one is open (ADR 0018):
    /// the view sees the files it created and has not committed yet.
    fn meta<T>(&self, f: impl FnOnce(&Meta<'_>) -> Result<T>) -> Result<T> {
        self.store.index_deferred().meta(f)
    }

    /// Writes and commits, together with whatever the view deferred.
    fn meta_write<T>(&self, f: impl FnOnce(&Meta<'_>) -> Result<T>) -> Result<T> {
        self.store.index_deferred().meta_write(f)
    }

    /// [`Vfs::meta_write`] of a deletion: on a full disk it runs again with the store's
    /// reserve given back (`Store::freeing`).
    fn meta_write_freeing<T>(&self, what: &str, f: impl Fn(&Meta<'_>) -> Result<T>) -> Result<T> {
        self.store.freeing(what, || self.meta_write(&f))
    }

    fn inode(&self, ino: i64) -> Result<InodeRow> {
        self.meta(|m| m.inode(ino))?
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    fn touch(&self, st: &mut State, run: i64) {
        st.runs
            .entry(run)
            .or_insert(Activity {
                last: Instant::now(),
                open: 0,
                seal_requested: false,
            })
            .last = Instant::now();
    }

    /// The number of subdirectories of open-run directory `dir` (the state lock is held).
    fn subdir_count(&self, dir: i64) -> Result<u64> {
        let mut known = self.subdirs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = known.get(&dir) {
            return Ok(*n);
        }
        let (_, n) = self.meta(|m| m.child_counts(dir))?;
        known.insert(dir, n);
        Ok(n)
    }

    /// Forgets the subdirectory counts of `dirs` (the state lock is held).
    fn forget_subdirs(&self, dirs: &[i64]) {
        let mut known = self.subdirs.lock().unwrap_or_else(|p| p.into_inner());
        for d in dirs {
            known.remove(d);
        }
    }

    fn open_attr(&self, st: &State, row: &InodeRow) -> Result<Attr> {
        self.open_attr_known(st, row, None)
    }

    /// [`Vfs::open_attr`] with the inline length read already (`Some(None)`: not inline).
    fn open_attr_known(
        &self,
        st: &State,
        row: &InodeRow,
        inline_len: Option<Option<u64>>,
    ) -> Result<Attr> {
        let patched;
        let row = match st.dirty_attrs.get(&row.ino) {
            Some(p) => {
                patched = p.applied(row.clone());
                &patched
            }
            None => row,
        };
        let (size, nlink) = match row.kind {
            Kind::File => (self.file_len_known(st, row, inline_len)?, row.nlink),
            Kind::Dir => (0, 2 + self.subdir_count(row.ino)? as u32),
            _ => (row.size, row.nlink.max(1)),
        };
        Ok(Attr {
            ino: encode(Node::Open(row.ino)),
            kind: row.kind,
            mode: row.mode & 0o7777,
            nlink,
            uid: row.uid,
            gid: row.gid,
            size,
            mtime_ns: st
                .dirty_mtime
                .get(&row.ino)
                .copied()
                .unwrap_or(row.mtime_ns),
            ctime_ns: row.ctime_ns,
            rdev: row.rdev,
            immutable: false,
        })
    }

    fn synthetic(&self, ino: u64, kind: Kind, mode: u32, size: u64, mtime_ns: i64) -> Attr {
        Attr {
            ino,
            kind,
            mode,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            size,
            mtime_ns,
            ctime_ns: mtime_ns,
            rdev: 0,
            immutable: false,
        }
    }

    fn ns_attr(&self, ns: &NamespaceRow) -> Result<Attr> {
        let runs = self.meta(|m| m.run_count(&ns.name))?;
        Ok(Attr {
            ino: encode(Node::Namespace(ns.id)),
            kind: Kind::Dir,
            mode: ns.mode & 0o7777,
            nlink: 2 + runs,
            uid: ns.uid,
            gid: ns.gid,
            size: 0,
            mtime_ns: ns.mtime_ns,
            ctime_ns: ns.mtime_ns,
            rdev: 0,
            immutable: false,
        })
    }

    fn sealed_attr(&self, s: &SealedRun, idx: usize) -> Result<Attr> {
        let idx = s.resolved.get(idx).copied().unwrap_or(idx);
        let e = s.entry(idx)?;
        let nlink = if e.kind == Kind::Dir {
            2 + s.children.get(&idx).map_or(0, |c| {
                c.iter()
                    .filter(|(_, i)| s.entries[*i].kind == Kind::Dir)
                    .count()
            }) as u32
        } else {
            s.nlink[idx]
        };
        Ok(Attr {
            ino: encode(Node::Sealed { run: s.id, idx }),
            kind: e.kind,
            mode: e.mode & 0o7777,
            nlink,
            uid: e.uid,
            gid: e.gid,
            size: if matches!(e.kind, Kind::File | Kind::Symlink) {
                e.size
            } else {
                0
            },
            mtime_ns: e.mtime_ns,
            ctime_ns: e.mtime_ns,
            rdev: e.rdev.unwrap_or(0),
            immutable: true,
        })
    }

    fn manifest_bytes(&self, st: &mut State, run: i64) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = st.manifests.get(&run) {
            return Ok(b.clone());
        }
        let s = self.sealed_run(st, run)?;
        let b = Arc::new(manifest::load_manifest_bytes(
            &*self.store.objects,
            &s.digest,
        )?);
        st.manifests.insert(run, b.clone());
        Ok(b)
    }

    fn attr_of(&self, st: &mut State, node: Node) -> Result<Attr> {
        let ino = encode(node);
        match node {
            Node::Root => {
                let n = self.meta(|m| m.namespaces())?.len() as u32;
                let mut a = self.synthetic(ino, Kind::Dir, 0o755, 0, self.started_ns);
                a.nlink = 3 + n;
                Ok(a)
            }
            Node::CtlDir
            | Node::CtlManifests
            | Node::CtlByDigest
            | Node::CtlRetention
            | Node::RetNs(_) => Ok(self.synthetic(ino, Kind::Dir, 0o555, 0, self.started_ns)),
            // The manifests of a namespace are as reachable as its runs: its directory's owner
            // and read and search bits.
            Node::ManNs(id) => {
                let ns = self
                    .meta(|m| m.namespace_by_id(id))?
                    .ok_or_else(|| Error::NotFound(format!("namespace {id}")))?;
                let mut a = self.synthetic(ino, Kind::Dir, ns.mode & 0o555, 0, self.started_ns);
                (a.uid, a.gid) = (ns.uid, ns.gid);
                Ok(a)
            }
            Node::CtlStatus | Node::CtlEvents | Node::CtlExpired | Node::RetRun(_) => {
                Ok(self.synthetic(ino, Kind::File, 0o444, 0, self.now()))
            }
            Node::CtlGc => Ok(self.synthetic(ino, Kind::File, 0o644, 0, self.now())),
            Node::CtlSeal => Ok(self.synthetic(ino, Kind::File, 0o200, 0, self.started_ns)),
            // A run's manifest lists what its tree holds: readable by whom may read the run's
            // directory (its owner and read bits).
            Node::ManRun(run) => {
                let b = self.manifest_bytes(st, run)?;
                let s = self.sealed_run(st, run)?;
                let root = s.entry(0)?;
                let mode = root.mode & 0o444;
                let mut a = self.synthetic(ino, Kind::File, mode, b.len() as u64, s.sealed_at_ns);
                (a.uid, a.gid) = (root.uid, root.gid);
                a.immutable = true;
                Ok(a)
            }
            Node::Namespace(id) => {
                let ns = self
                    .meta(|m| m.namespace_by_id(id))?
                    .ok_or_else(|| Error::NotFound(format!("namespace {id}")))?;
                self.ns_attr(&ns)
            }
            Node::Open(i) => {
                let row = self.inode(i)?;
                self.open_attr(st, &row)
            }
            Node::Sealed { run, idx } => {
                let s = self.sealed_run(st, run)?;
                self.sealed_attr(&s, idx)
            }
        }
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let mut st = self.lock();
        let node = self.node(&st, ino)?;
        self.attr_of(&mut st, node)
    }

    /// The kernel took a reference to `a` (an entry of `lookup`, `create`, `mknod`,
    /// `symlink`, `link` or `readdirplus` but `.` and `..`); [`Vfs::forget`] gives it back.
    /// Only the FUSE frontend calls these: other frontends hold no references. The kernel
    /// holds the directory's lock from such a request until its reply is taken, and `unlink`
    /// and `rename` need it too, so no name goes between the answer and this call.
    pub fn remember(&self, a: &Attr) {
        remember(&mut self.lock(), a);
    }

    /// The kernel forgot `n` references to `ino` (`forget`, `batch_forget`): a file of an open
    /// run that has no name left and is not open goes with the last one.
    pub fn forget(&self, ino: u64, n: u64) {
        let Ok(Node::Open(inode)) = decode_raw(ino) else {
            return;
        };
        let mut st = self.lock();
        let Some(c) = st.lookups.get_mut(&inode) else {
            return;
        };
        *c = c.saturating_sub(n);
        if *c > 0 {
            return;
        }
        st.lookups.remove(&inode);
        if st.open_count.contains_key(&inode) {
            return;
        }
        let gone = self.meta(|m| m.inode(inode)).and_then(|row| match row {
            Some(row) if row.nlink == 0 => self
                .meta_write(|m| m.delete_inode(inode))
                .map(|()| Some(row.run)),
            _ => Ok(None),
        });
        match gone {
            Ok(Some(run)) => {
                self.preseal.forget(inode);
                let _ = fs::remove_file(self.staging_path(run, inode));
            }
            Ok(None) => {}
            // Left for the next start, which removes inodes without names.
            Err(e) => tracing::warn!(inode, error = %e, "cannot remove a forgotten unlinked inode"),
        }
    }

    /// [`Vfs::getattr`] of each of `inos`, for a listing that carries attributes: the inodes
    /// of open runs among them are read with one statement instead of two each.
    pub fn getattrs(&self, inos: &[u64]) -> Vec<Result<Attr>> {
        let mut st = self.lock();
        self.getattrs_locked(&mut st, inos)
    }

    fn getattrs_locked(&self, st: &mut State, inos: &[u64]) -> Vec<Result<Attr>> {
        let nodes: Vec<Result<Node>> = inos.iter().map(|&i| self.node(st, i)).collect();
        let open: Vec<i64> = nodes
            .iter()
            .filter_map(|n| match n {
                Ok(Node::Open(i)) => Some(*i),
                _ => None,
            })
            .collect();
        let mut rows: HashMap<i64, (InodeRow, Option<u64>)> = HashMap::new();
        if open.len() > 1 {
            // On failure each falls back to its own reads below.
            if let Ok(found) = self.meta(|m| m.inodes_with_inline_len(&open)) {
                rows = found.into_iter().map(|(r, n)| (r.ino, (r, n))).collect();
            }
        }
        nodes
            .into_iter()
            .map(|n| {
                let node = n?;
                match node {
                    Node::Open(i) => match rows.get(&i) {
                        Some((row, n)) => self.open_attr_known(st, row, Some(*n)),
                        None => self.attr_of(st, node),
                    },
                    _ => self.attr_of(st, node),
                }
            })
            .collect()
    }

    fn run_node(&self, st: &mut State, ns: &str, run: &str) -> Result<Option<(i64, Node)>> {
        let Some((id, state)) = self.meta(|m| m.run_of(ns, run))? else {
            return Ok(None);
        };
        let node = if state == "open" {
            let root = self.meta(|m| m.run_root(id))?.ok_or_else(|| {
                Error::corrupt(format!("run {ns}/{run}"), "open run without a root inode")
            })?;
            Node::Open(root)
        } else {
            self.sealed_run(st, id)?;
            Node::Sealed { run: id, idx: 0 }
        };
        Ok(Some((id, node)))
    }

    fn lookup_node(&self, st: &mut State, parent: Node, name: &str) -> Result<Node> {
        let missing = || Error::NotFound(name.to_owned());
        match parent {
            Node::Root => {
                if name == CONTROL_DIR {
                    return Ok(Node::CtlDir);
                }
                let ns = self.meta(|m| m.namespace(name))?.ok_or_else(missing)?;
                Ok(Node::Namespace(ns.id))
            }
            Node::CtlDir => match name {
                "status" => Ok(Node::CtlStatus),
                "seal" => Ok(Node::CtlSeal),
                "events" => Ok(Node::CtlEvents),
                "manifests" => Ok(Node::CtlManifests),
                "by-digest" => Ok(Node::CtlByDigest),
                "retention" => Ok(Node::CtlRetention),
                "expired" => Ok(Node::CtlExpired),
                "gc" => Ok(Node::CtlGc),
                _ => Err(missing()),
            },
            Node::CtlByDigest => {
                let d: ManifestDigest = name.parse().map_err(|_| missing())?;
                let row = self
                    .store
                    .index()
                    .run_by_manifest(&d)?
                    .ok_or_else(missing)?;
                Ok(Node::Sealed {
                    run: row.id | VIEW_RUN,
                    idx: 0,
                })
            }
            Node::CtlRetention => Ok(Node::RetNs(self.ns_named(name)?.id)),
            Node::RetNs(id) => {
                let ns = self.ns_by_id(id)?;
                let found = self.meta(|m| m.run_of(&ns.name, name))?;
                Ok(Node::RetRun(found.ok_or_else(missing)?.0))
            }
            Node::CtlManifests => Ok(Node::ManNs(self.ns_named(name)?.id)),
            Node::ManNs(id) => {
                let ns = self.ns_by_id(id)?;
                let run = name.strip_suffix(".json").ok_or_else(missing)?;
                let found = self.meta(|m| m.run_of(&ns.name, run))?;
                match found {
                    Some((rid, state)) if state == "sealed" => Ok(Node::ManRun(rid)),
                    _ => Err(missing()),
                }
            }
            Node::Namespace(id) => {
                let ns = self.meta(|m| m.namespace_by_id(id))?.ok_or_else(missing)?;
                Ok(self.run_node(st, &ns.name, name)?.ok_or_else(missing)?.1)
            }
            Node::Open(dir) => {
                let ino = self.meta(|m| m.lookup(dir, name))?.ok_or_else(missing)?;
                Ok(Node::Open(ino))
            }
            Node::Sealed { run, idx } => {
                let s = self.sealed_run(st, run)?;
                let e = s.entry(idx)?;
                if e.kind != Kind::Dir {
                    return Err(Error::NotDir(e.path.clone()));
                }
                let p = if e.path == ROOT {
                    name.to_owned()
                } else {
                    format!("{}/{name}", e.path)
                };
                let i = *s.by_path.get(&p).ok_or_else(missing)?;
                Ok(Node::Sealed {
                    run,
                    idx: s.resolved[i],
                })
            }
            Node::CtlStatus
            | Node::CtlSeal
            | Node::CtlEvents
            | Node::ManRun(_)
            | Node::CtlExpired
            | Node::CtlGc
            | Node::RetRun(_) => Err(Error::NotDir(name.to_owned())),
        }
    }

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let name = name_str(name)?;
        let mut st = self.lock();
        let p = self.node(&st, parent)?;
        let n = self.lookup_node(&mut st, p, name)?;
        self.attr_of(&mut st, n)
    }

    /// All entries of a directory, `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let mut st = self.lock();
        let node = self.node(&st, ino)?;
        let me = encode(node);
        let mut out = vec![
            DirEntry {
                ino: me,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT_INO,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        let file = |ino: u64, name: &str| DirEntry {
            ino,
            kind: Kind::File,
            name: name.into(),
        };
        let dir = |ino: u64, name: &str| DirEntry {
            ino,
            kind: Kind::Dir,
            name: name.into(),
        };
        match node {
            Node::Root => {
                out.push(dir(CTL_DIR, CONTROL_DIR));
                for ns in self.meta(|m| m.namespaces())? {
                    out.push(dir(encode(Node::Namespace(ns.id)), &ns.name));
                }
            }
            Node::CtlDir => {
                out.push(file(CTL_STATUS, "status"));
                out.push(file(CTL_SEAL, "seal"));
                out.push(file(CTL_EVENTS, "events"));
                out.push(dir(CTL_MANIFESTS, "manifests"));
                out.push(dir(CTL_BY_DIGEST, "by-digest"));
                out.push(dir(CTL_RETENTION, "retention"));
                out.push(file(CTL_EXPIRED, "expired"));
                out.push(file(CTL_GC, "gc"));
            }
            Node::CtlByDigest => {
                for r in self.store.runs(None)? {
                    if let Some(d) = r.manifest {
                        let ino = encode(Node::Sealed {
                            run: r.id | VIEW_RUN,
                            idx: 0,
                        });
                        out.push(dir(ino, &d.to_hex()));
                    }
                }
            }
            Node::CtlRetention => {
                for ns in self.meta(|m| m.namespaces())? {
                    out.push(dir(encode(Node::RetNs(ns.id)), &ns.name));
                }
            }
            Node::RetNs(id) => {
                let idx = self.store.index();
                let ns = idx
                    .meta(|m| m.namespace_by_id(id))?
                    .ok_or_else(|| Error::NotFound(format!("namespace {id}")))?;
                for (rid, name, _) in idx.meta(|m| m.runs_of(&ns.name))? {
                    out.push(file(encode(Node::RetRun(rid)), &name));
                }
            }
            Node::CtlManifests => {
                for ns in self.meta(|m| m.namespaces())? {
                    out.push(dir(encode(Node::ManNs(ns.id)), &ns.name));
                }
            }
            Node::ManNs(id) | Node::Namespace(id) => {
                let idx = self.store.index();
                let ns = idx
                    .meta(|m| m.namespace_by_id(id))?
                    .ok_or_else(|| Error::NotFound(format!("namespace {id}")))?;
                let runs = idx.meta(|m| m.runs_of(&ns.name))?;
                drop(idx);
                for (rid, name, state) in runs {
                    if matches!(node, Node::ManNs(_)) {
                        if state == "sealed" {
                            out.push(file(encode(Node::ManRun(rid)), &format!("{name}.json")));
                        }
                    } else if let Some((_, n)) = self.run_node(&mut st, &ns.name, &name)? {
                        out.push(dir(encode(n), &name));
                    }
                }
            }
            Node::Open(d) => {
                let row = self.inode(d)?;
                if row.kind != Kind::Dir {
                    return Err(Error::NotDir(format!("inode {d}")));
                }
                for (name, i, kind) in self.meta(|m| m.children(d))? {
                    out.push(DirEntry {
                        ino: encode(Node::Open(i)),
                        kind,
                        name,
                    });
                }
            }
            Node::Sealed { run, idx } => {
                let s = self.sealed_run(&mut st, run)?;
                if s.entry(idx)?.kind != Kind::Dir {
                    return Err(Error::NotDir(s.entries[idx].path.clone()));
                }
                for (name, i) in s.children.get(&idx).map(Vec::as_slice).unwrap_or_default() {
                    let r = s.resolved[*i];
                    out.push(DirEntry {
                        ino: encode(Node::Sealed { run, idx: r }),
                        kind: s.entries[r].kind,
                        name: name.clone(),
                    });
                }
            }
            Node::CtlStatus
            | Node::CtlSeal
            | Node::CtlEvents
            | Node::ManRun(_)
            | Node::CtlExpired
            | Node::CtlGc
            | Node::RetRun(_) => {
                return Err(Error::NotDir(format!("inode {ino}")));
            }
        }
        Ok(out)
    }

    /// Refusal for a modification of `node`, or the open-run inode it is.
    fn writable(&self, node: Node, what: &str) -> Result<i64> {
        match node {
            Node::Open(i) => Ok(i),
            Node::Sealed { run, .. } => {
                Err(Error::ReadOnly(format!("{what}: run {run} is sealed")))
            }
            Node::Root | Node::Namespace(_) => Err(Error::NotPermitted(format!(
                "{what}: only directories can be made in the mount root (namespaces) and in a namespace (runs)"
            ))),
            _ => Err(Error::ReadOnly(format!(
                "{what}: the control directory is read-only"
            ))),
        }
    }

    fn new_inode(&self, ctx: Ctx, run: i64, kind: Kind, mode: u32, now: i64) -> InodeRow {
        InodeRow {
            ino: self.next_ino.fetch_add(1, Ordering::Relaxed),
            run,
            kind,
            mode: mode & 0o7777,
            uid: ctx.uid,
            gid: ctx.gid,
            size: 0,
            mtime_ns: now,
            ctime_ns: now,
            rdev: 0,
            target: None,
            nlink: 1,
            xattrs: BTreeMap::new(),
        }
    }

    /// Creates a node in an open-run directory; creates the staging file of a regular file.
    fn create_in(
        &self,
        st: &mut State,
        parent: Node,
        name: &str,
        mut row: InodeRow,
        what: &str,
    ) -> Result<InodeRow> {
        // `create` opens what it makes: its creation waits in the open transaction and reaches
        // the journal with the file's close (ADR 0018, 0031). Whatever else is made commits now.
        let defer = what == "create" && row.kind == Kind::File;
        let dir_ino = match self.writable(parent, what) {
            Ok(i) => i,
            Err(e @ Error::NotPermitted(_)) => {
                tracing::warn!(name, "refused: {e}");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        check_name("file name", name, true)?;
        let dir = self.inode(dir_ino)?;
        if dir.kind != Kind::Dir {
            return Err(Error::NotDir(format!("inode {dir_ino}")));
        }
        row.run = dir.run;
        inherit_setgid(&mut row, dir.mode, dir.gid);
        let mut idx = self.store.index_deferred();
        let create = move |m: &Meta<'_>| {
            if m.lookup(dir_ino, name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_owned()));
            }
            Ok(Step::Create {
                dir: dir_ino,
                name: name.to_owned(),
                row,
            })
        };
        let made = if defer {
            // Journaled: the file's close writes it to the journal (ADR 0031).
            idx.journaled_step(create)?
        } else {
            idx.meta_write(|m| {
                let mut step = create(m)?;
                step.apply(m)?;
                Ok(step)
            })?
        };
        drop(idx);
        let Step::Create { row, .. } = made else {
            unreachable!("a create step")
        };
        st.dirty_mtime.remove(&dir_ino);
        if row.kind == Kind::Dir {
            self.forget_subdirs(&[dir_ino]);
        }
        self.touch(st, dir.run);
        tracing::debug!(
            run = dir.run,
            ino = row.ino,
            name,
            kind = row.kind.as_str(),
            "created"
        );
        Ok(row)
    }

    /// `mkdir`: a namespace in the root, an open run in a namespace, a directory in a run.
    pub fn mkdir(&self, ctx: Ctx, parent: u64, name: &OsStr, mode: u32) -> Result<Attr> {
        let name = name_str(name)?;
        let (mut st, p) = self.lock_mut(parent)?;
        let now = self.now();
        match p {
            Node::Root => {
                check_name("namespace", name, false)?;
                let ns = NamespaceRow {
                    id: 0,
                    name: name.to_owned(),
                    mode: mode & 0o7777,
                    uid: ctx.uid,
                    gid: ctx.gid,
                    mtime_ns: now,
                };
                let id = self.meta_write(|m| {
                    if m.namespace(name)?.is_some() {
                        return Err(Error::AlreadyExists(format!("namespace {name}")));
                    }
                    m.insert_namespace(&ns, now)
                })?;
                tracing::info!(namespace = name, "namespace created");
                self.ns_attr(&NamespaceRow { id, ..ns })
            }
            Node::Namespace(id) => {
                let mut ns = self
                    .meta(|m| m.namespace_by_id(id))?
                    .ok_or_else(|| Error::NotFound(format!("namespace {id}")))?;
                check_name("run name", name, false)?;
                let r = RunRef::new(&ns.name, name)?;
                let mut root = self.new_inode(ctx, 0, Kind::Dir, mode, now);
                inherit_setgid(&mut root, ns.mode, ns.gid);
                ns.mtime_ns = now;
                let (run_id, root_ino) = self.meta_write(|m| {
                    let out = m.create_open_run(&r, &root, now)?;
                    m.update_namespace(&ns)?;
                    Ok(out)
                })?;
                let dir = self.staging.join(run_id.to_string());
                fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
                st.runs.insert(
                    run_id,
                    Activity {
                        last: Instant::now(),
                        open: 0,
                        seal_requested: false,
                    },
                );
                tracing::info!(run = %r, id = run_id, "run opened");
                let row = self.inode(root_ino)?;
                self.open_attr(&st, &row)
            }
            _ => {
                let row = self.new_inode(ctx, 0, Kind::Dir, mode, now);
                let row = self.create_in(&mut st, p, name, row, "mkdir")?;
                self.open_attr(&st, &row)
            }
        }
    }

    /// `mknod` (regular files, FIFOs, sockets, devices) in an open run.
    pub fn mknod(&self, ctx: Ctx, parent: u64, name: &OsStr, mode: u32, rdev: u64) -> Result<Attr> {
        let name = name_str(name)?;
        let kind = kind_of_mode(mode)?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(Error::invalid(
                "mknod",
                format!("cannot make a {} with mknod", kind.as_str()),
            ));
        }
        let (mut st, p) = self.lock_mut(parent)?;
        let mut row = self.new_inode(ctx, 0, kind, mode, self.now());
        if matches!(kind, Kind::Char | Kind::Block) {
            row.rdev = rdev;
        }
        let row = self.create_in(&mut st, p, name, row, "mknod")?;
        self.open_attr(&st, &row)
    }

    /// `symlink` in an open run.
    pub fn symlink(&self, ctx: Ctx, parent: u64, name: &OsStr, target: &Path) -> Result<Attr> {
        let name = name_str(name)?;
        let target = target
            .to_str()
            .ok_or_else(|| Error::invalid("symlink target", format!("{target:?} is not UTF-8")))?;
        let (mut st, p) = self.lock_mut(parent)?;
        let mut row = self.new_inode(ctx, 0, Kind::Symlink, 0o777, self.now());
        row.size = target.len() as u64;
        row.target = Some(target.to_owned());
        let row = self.create_in(&mut st, p, name, row, "symlink")?;
        self.open_attr(&st, &row)
    }

    /// `readlink`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let mut st = self.lock();
        let e = match self.node(&st, ino)? {
            Node::Open(i) => self.inode(i)?.target,
            Node::Sealed { run, idx } => self.sealed_run(&mut st, run)?.entry(idx)?.target.clone(),
            _ => None,
        };
        e.map(String::into_bytes)
            .ok_or_else(|| Error::invalid("readlink", format!("inode {ino} is not a symlink")))
    }

    fn new_handle(&self, st: &mut State, h: Handle) -> u64 {
        let fh = st.next_fh;
        st.next_fh += 1;
        if let Handle::Staged { run, inode, .. } = &h {
            *st.open_count.entry(*inode).or_default() += 1;
            let a = st.runs.entry(*run).or_insert(Activity {
                last: Instant::now(),
                open: 0,
                seal_requested: false,
            });
            a.open += 1;
            a.last = Instant::now();
        }
        st.handles.insert(fh, h);
        fh
    }

    /// An open-run file's length: its inline content's (`inline_len`, when the caller read it
    /// already: `Some(None)` is not inline), else its staging file's.
    fn file_len_known(
        &self,
        st: &State,
        row: &InodeRow,
        inline_len: Option<Option<u64>>,
    ) -> Result<u64> {
        if let Some(i) = st.inline.get(&row.ino) {
            return Ok(i.data.len() as u64);
        }
        if let Some(s) = st.streams.get(&row.ino) {
            return Ok(s.len());
        }
        let inline_len = match inline_len {
            Some(n) => n,
            None => self.meta(|m| m.inline_len(row.ino))?,
        };
        if let Some(n) = inline_len {
            return Ok(n);
        }
        let p = self.staging_path(row.run, row.ino);
        Ok(fs::metadata(&p)
            .map_err(|e| Error::io("stat", &p, e))?
            .len())
    }

    /// Where an open-run file's content is for a new handle: `None` when inline (then loaded
    /// into [`State::inline`]), else its staging file.
    fn open_content(&self, st: &mut State, row: &InodeRow) -> Result<Option<Arc<File>>> {
        if st.inline.contains_key(&row.ino) {
            return Ok(None);
        }
        if let Some(data) = self.meta(|m| m.inline_data(row.ino))? {
            st.inline_bytes += data.len();
            st.inline.insert(row.ino, Inline { data, dirty: false });
            return Ok(None);
        }
        if st.chunked.contains_key(&row.ino) {
            return Ok(None);
        }
        if let Some(c) = self.meta(|m| m.chunked(row.ino))? {
            st.chunked.insert(row.ino, Arc::new(c));
            return Ok(None);
        }
        self.open_staged(row).map(Some)
    }

    /// Moves an inline file's content to a staging file (it grew past [`INLINE_MAX`], or
    /// inline files use too much memory); every handle of it switches to the file.
    fn spill(&self, st: &mut State, run: i64, inode: i64) -> Result<Arc<File>> {
        let data = match st.inline.remove(&inode) {
            Some(i) => {
                st.inline_bytes -= i.data.len();
                i.data
            }
            None => self.meta(|m| m.inline_data(inode))?.unwrap_or_default(),
        };
        let (f, p) = self.new_staging_file(run, inode)?;
        f.write_all_at(&data, 0)
            .map_err(|e| Error::io("write", &p, e))?;
        // Until this commit the index's copy counts; after it, the staging file.
        self.meta_write(|m| m.drop_inline_data(inode))?;
        st.appending.insert(inode, data.len() as u64);
        let f = Arc::new(f);
        for h in st.handles.values_mut() {
            if let Handle::Staged { inode: i, file, .. } = h
                && *i == inode
            {
                *file = Some(f.clone());
            }
        }
        tracing::debug!(
            run,
            inode,
            bytes = data.len(),
            "inline file moved to staging"
        );
        Ok(f)
    }

    /// `inode`'s staging file, created empty (or emptied), with its path.
    fn new_staging_file(&self, run: i64, inode: i64) -> Result<(File, PathBuf)> {
        let dir = self.staging.join(run.to_string());
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let p = self.staging_path(run, inode);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .map_err(|e| Error::io("create", &p, e))?;
        Ok((f, p))
    }

    fn open_staged(&self, row: &InodeRow) -> Result<Arc<File>> {
        let p = self.staging_path(row.run, row.ino);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io("open", &p, e))?;
        Ok(Arc::new(f))
    }

    /// `create`: a new regular file in an open run, opened.
    pub fn create(&self, ctx: Ctx, parent: u64, name: &OsStr, mode: u32) -> Result<(Attr, u64)> {
        let name = name_str(name)?;
        let (mut st, p) = self.lock_mut(parent)?;
        let row = self.new_inode(ctx, 0, Kind::File, mode, self.now());
        let row = self.create_in(&mut st, p, name, row, "create")?;
        // New, so empty and inline: nothing to read back from the index (where a failed
        // commit elsewhere may already have rolled the creation back: its close says so).
        st.inline.insert(
            row.ino,
            Inline {
                data: Vec::new(),
                dirty: false,
            },
        );
        let fh = self.new_handle(
            &mut st,
            Handle::Staged {
                run: row.run,
                inode: row.ino,
                file: None,
            },
        );
        Ok((self.open_attr(&st, &row)?, fh))
    }

    /// `open` of a file; `write` when opened for writing.
    pub fn open(&self, ino: u64, write: bool) -> Result<(u64, OpenInfo)> {
        // Reading a run that is being sealed is fine: its files do not change.
        let (mut st, node) = if write {
            self.lock_mut(ino)?
        } else {
            let st = self.lock();
            let node = self.node(&st, ino)?;
            (st, node)
        };
        let ro = |what: &str| Error::ReadOnly(format!("{what} is read-only"));
        let (h, info) = match node {
            Node::Open(i) => {
                let row = self.inode(i)?;
                if row.kind != Kind::File {
                    return Err(Error::invalid(
                        "open",
                        format!("inode {i} is a {}", row.kind.as_str()),
                    ));
                }
                let file = self.open_content(&mut st, &row)?;
                (
                    Handle::Staged {
                        run: row.run,
                        inode: i,
                        file,
                    },
                    OpenInfo::default(),
                )
            }
            Node::Sealed { run, idx } => {
                if write {
                    return Err(Error::ReadOnly(format!("run {run} is sealed")));
                }
                let s = self.sealed_run(&mut st, run)?;
                if s.entry(idx)?.kind != Kind::File {
                    return Err(Error::invalid(
                        "open",
                        format!("{} is not a file", s.entries[idx].path),
                    ));
                }
                self.note_file_open(&mut st, &s, idx);
                (
                    Handle::Sealed { run: s, idx },
                    OpenInfo {
                        direct_io: false,
                        keep_cache: true,
                        no_flush: true,
                    },
                )
            }
            Node::CtlGc if write => (
                Handle::GcCtl,
                OpenInfo {
                    direct_io: true,
                    ..OpenInfo::default()
                },
            ),
            Node::CtlStatus
            | Node::CtlEvents
            | Node::CtlExpired
            | Node::CtlGc
            | Node::RetRun(_) => {
                if write {
                    return Err(ro("the control directory"));
                }
                let b = match node {
                    Node::CtlStatus => self.status_bytes(&st)?,
                    Node::CtlEvents => self.events_bytes()?,
                    Node::CtlExpired => self.expired_bytes()?,
                    Node::CtlGc => self.gc_report_bytes(),
                    Node::RetRun(run) => self.retention_bytes(run)?,
                    _ => unreachable!("matched above"),
                };
                (
                    Handle::Buffer(Arc::new(b)),
                    OpenInfo {
                        direct_io: true,
                        keep_cache: false,
                        no_flush: true,
                    },
                )
            }
            Node::ManRun(run) => {
                if write {
                    return Err(ro("a manifest"));
                }
                let b = self.manifest_bytes(&mut st, run)?;
                (
                    Handle::Buffer(b),
                    OpenInfo {
                        direct_io: false,
                        keep_cache: true,
                        no_flush: true,
                    },
                )
            }
            Node::CtlSeal => (
                Handle::SealCtl,
                OpenInfo {
                    direct_io: true,
                    ..OpenInfo::default()
                },
            ),
            _ => return Err(Error::IsDir(format!("inode {ino}"))),
        };
        Ok((self.new_handle(&mut st, h), info))
    }

    fn status_bytes(&self, st: &State) -> Result<Vec<u8>> {
        let s = self.store.stats()?;
        let dedup = if s.chunk_raw_bytes == 0 {
            0.0
        } else {
            s.raw_bytes as f64 / s.chunk_raw_bytes as f64
        };
        let space = self.store.disk_space()?;
        let cache = self.cache_stats();
        let v = serde_json::json!({
            "store": self.store.root(),
            "runs": { "open": s.runs_open, "sealed": s.runs_sealed },
            "raw_bytes": s.raw_bytes,
            "stored_bytes": s.pack_bytes,
            "dedup_ratio": dedup,
            "disk_free_bytes": space.free_bytes,
            "reserve_held": space.reserve_held,
            "lost_chunks": s.lost_chunks,
            "seal_after_s": self.opts.seal_after.as_secs_f64(),
            "open_runs": self.open_runs_status(st)?,
            "chunk_cache": {
                "hits": cache.hits,
                "misses": cache.misses,
                "readahead": cache.readahead,
                "bytes": self.cache.bytes(),
                "capacity_bytes": self.cache.max_bytes,
            },
        });
        let mut b = serde_json::to_vec_pretty(&v).map_err(|e| Error::Internal(e.to_string()))?;
        b.push(b'\n');
        Ok(b)
    }

    /// The open runs as `status` lists them, by name: files open, how long each has been
    /// quiet, and when it seals if it stays so (`null` while files are open or a seal is
    /// under way; 0 once due, e.g. after its marker was closed).
    fn open_runs_status(&self, st: &State) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::with_capacity(st.runs.len());
        for (&id, a) in &st.runs {
            let (open, quiet, requested) = (a.open, a.last.elapsed(), a.seal_requested);
            let sealing = st.sealing.contains(&id);
            let Some(row) = self.store.index_deferred().run_by_id(id)? else {
                continue;
            };
            if row.state != "open" {
                continue;
            }
            let seals_in = if open > 0 || sealing {
                None
            } else if requested {
                Some(0.0)
            } else {
                Some(self.opts.seal_after.saturating_sub(quiet).as_secs_f64())
            };
            out.push(serde_json::json!({
                "run": row.run.to_string(),
                "open_files": open,
                "quiet_s": quiet.as_secs_f64(),
                "seals_in_s": seals_in,
                "sealing": sealing,
            }));
        }
        out.sort_by(|a, b| a["run"].as_str().cmp(&b["run"].as_str()));
        Ok(out)
    }

    fn events_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let ev = self.store.events(after, 10_000)?;
            let Some(last) = ev.last() else { break };
            after = last.seq;
            for e in &ev {
                serde_json::to_writer(&mut out, e).map_err(|e| Error::Internal(e.to_string()))?;
                out.push(b'\n');
            }
        }
        Ok(out)
    }

    fn json_line(v: &impl serde::Serialize) -> Result<Vec<u8>> {
        let mut b = serde_json::to_vec_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
        b.push(b'\n');
        Ok(b)
    }

    fn retention_bytes(&self, run: i64) -> Result<Vec<u8>> {
        let row = self
            .store
            .index()
            .run_by_id(run)?
            .filter(|r| r.state != "deleted")
            .ok_or_else(|| Error::NotFound(format!("run {run}")))?;
        Self::json_line(&self.store.retention_info(&row.run)?)
    }

    fn expired_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for r in self.store.expired_runs()? {
            serde_json::to_writer(&mut out, &r).map_err(|e| Error::Internal(e.to_string()))?;
            out.push(b'\n');
        }
        Ok(out)
    }

    fn gc_report_bytes(&self) -> Vec<u8> {
        let v = self
            .store
            .last_gc_report()
            .unwrap_or_else(|| serde_json::json!({}));
        Self::json_line(&v).unwrap_or_default()
    }

    /// A gc asked for through `.artifactfs/gc`: `run` or `dry-run`, optionally followed by
    /// `grace=DURATION`.
    fn gc_request(&self, text: &str) -> Result<crate::gc::GcReport> {
        let bad = || {
            Error::invalid(
                "gc request",
                format!(
                    "{:?}: write `run` or `dry-run`, optionally followed by grace=DURATION (e.g. grace=1h)",
                    text.trim()
                ),
            )
        };
        let mut words = text.split_whitespace();
        let dry_run = match words.next() {
            Some("run") => false,
            Some("dry-run") => true,
            _ => return Err(bad()),
        };
        let mut opts = crate::gc::GcOptions {
            dry_run,
            ..Default::default()
        };
        for w in words {
            let d = w.strip_prefix("grace=").ok_or_else(bad)?;
            opts.grace = humantime::parse_duration(d).map_err(|_| bad())?;
        }
        self.gc(&opts, &NoProgress)
    }

    /// Runs a gc on the store and forgets what it deleted from the view's caches. Call
    /// without holding the view's lock (gc waits for running seals).
    pub fn gc(
        &self,
        opts: &crate::gc::GcOptions<'_>,
        progress: &dyn crate::store::Progress,
    ) -> Result<crate::gc::GcReport> {
        {
            // A stream holds the seal gate until its file is closed, which may be long: the
            // files being chunked as they are written go back to their staging files, and no
            // new one starts until gc is done.
            let mut st = self.lock();
            st.streams_paused = true;
            let streaming: Vec<i64> = st.streams.keys().copied().collect();
            for inode in streaming {
                if let Err(e) = self.materialize(&mut st, inode) {
                    tracing::warn!(inode, "before gc: {e}");
                }
            }
        }
        let rep = self.store.gc(opts, progress);
        self.lock().streams_paused = false;
        let rep = rep?;
        if !rep.runs_expired.is_empty() {
            self.forget_deleted_runs(&rep.runs_expired);
            let mut st = self.lock();
            let gone: Vec<i64> = st
                .sealed
                .iter()
                .filter(|(_, s)| rep.runs_expired.contains(&s.r.to_string()))
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                st.sealed.remove(&id);
                st.manifests.remove(&id);
            }
        }
        Ok(rep)
    }

    /// Sets the hook that makes the kernel forget cached content (see [`DataInvalidator`]).
    pub fn set_data_invalidator(&self, f: Option<DataInvalidator>) {
        *self.forget_data.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Sets the hook that hands the files a scan reads next to the kernel (see
    /// [`ContentPusher`]).
    pub fn set_content_pusher(&self, f: Option<ContentPusher>) {
        *self.push.lock().unwrap_or_else(|p| p.into_inner()) = f.map(Arc::new);
    }

    /// The kernel writes through handle `fh` without its page cache (the frontend opened it
    /// `FOPEN_DIRECT_IO`): pages other handles of the file cached must be dropped after each
    /// write, or they would read what was there before.
    pub fn writes_direct(&self, fh: u64) {
        let mut st = self.lock();
        if matches!(st.handles.get(&fh), Some(Handle::Staged { .. })) {
            st.direct.insert(fh);
        }
    }

    /// Sets the hook that makes the kernel forget names (see [`EntryInvalidator`]).
    pub fn set_entry_invalidator(&self, f: Option<EntryInvalidator>) {
        *self.forget_entry.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Makes the kernel forget the names of runs gc deleted (`NAMESPACE/RUN`).
    fn forget_deleted_runs(&self, runs: &[String]) {
        let hook = self.forget_entry.lock().unwrap_or_else(|p| p.into_inner());
        let Some(forget) = hook.as_ref() else {
            return;
        };
        for r in runs {
            let Some((ns, run)) = r.split_once('/') else {
                continue;
            };
            match self.meta(|m| m.namespace(ns)) {
                Ok(Some(row)) => forget(encode(Node::Namespace(row.id)), run),
                Ok(None) => {}
                Err(e) => tracing::warn!(run = %r, "cannot tell the kernel the run is gone: {e}"),
            }
        }
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        enum R {
            File(Arc<File>, PathBuf),
            Sealed(Arc<SealedRun>, usize),
            Buf(Arc<Vec<u8>>),
            Chunked(Arc<ChunkedContent>),
        }
        let mut sequential = false;
        let r = {
            let mut st = self.lock();
            match st.handles.get(&fh) {
                Some(Handle::Staged { inode, .. }) if st.streams.contains_key(inode) => {
                    // A read of a file being chunked as it is written: it goes back to its
                    // staging file (ADR 0025).
                    let inode = *inode;
                    self.materialize(&mut st, inode)?;
                    drop(st);
                    return self.read(fh, offset, size);
                }
                Some(Handle::Staged { inode, .. }) if st.chunked.contains_key(inode) => {
                    R::Chunked(st.chunked[inode].clone())
                }
                Some(Handle::Staged {
                    run,
                    inode,
                    file: Some(file),
                }) => R::File(file.clone(), self.staging_path(*run, *inode)),
                Some(Handle::Staged {
                    inode, file: None, ..
                }) => {
                    let data = &st
                        .inline
                        .get(inode)
                        .ok_or_else(|| {
                            Error::Internal(format!("inline file {inode} is open but not loaded"))
                        })?
                        .data;
                    let start = (offset as usize).min(data.len());
                    let end = start.saturating_add(size as usize).min(data.len());
                    return Ok(data[start..end].to_vec());
                }
                Some(Handle::Sealed { run, idx }) => {
                    let (run, idx) = (run.clone(), *idx);
                    let end = offset.saturating_add(u64::from(size));
                    let previous = st.read_pos.insert(fh, end);
                    sequential = previous.unwrap_or(0) == offset;
                    if previous.is_none() {
                        self.note_file_read(&mut st, &run, idx);
                    }
                    R::Sealed(run, idx)
                }
                Some(Handle::Buffer(b)) => R::Buf(b.clone()),
                Some(Handle::SealCtl) => {
                    return Err(Error::invalid("read", "the seal file is write-only"));
                }
                Some(Handle::GcCtl) => {
                    return Err(Error::invalid(
                        "read",
                        "the gc file was opened for writing; open it again to read the report",
                    ));
                }
                None => return Err(Error::invalid("file handle", format!("{fh} is not open"))),
            }
        };
        match r {
            R::File(f, p) => {
                let mut buf = vec![0u8; size as usize];
                let mut n = 0;
                while n < buf.len() {
                    match f.read_at(&mut buf[n..], offset + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io("read", &p, e)),
                    }
                }
                buf.truncate(n);
                Ok(buf)
            }
            R::Buf(b) => {
                let start = (offset as usize).min(b.len());
                let end = start.saturating_add(size as usize).min(b.len());
                Ok(b[start..end].to_vec())
            }
            R::Chunked(c) => self.read_chunks(&c.chunks, c.size, offset, size, &|| {
                format!("file handle {fh} of an open run")
            }),
            R::Sealed(s, idx) => {
                let data = self.read_sealed(&s, idx, offset, size)?;
                if sequential {
                    if self.store.tier().is_some() {
                        self.read_ahead_tiered(fh, &s, idx, offset + data.len() as u64);
                    } else {
                        self.read_ahead(&s, idx, offset + data.len() as u64);
                    }
                }
                Ok(data)
            }
        }
    }

    /// Follows the first read of each sealed-file handle: reads of a run's files in increasing
    /// order, at most [`SCAN_GAP`] entries apart, are a scan (tar, cp -r, rsync), and the files
    /// after them are read ahead. Counted at the first read rather than at the open: a file the
    /// kernel still has in its page cache is opened but never read, and reading ahead behind a
    /// warm scan would decode chunks nobody asks for, on the cores the reader needs.
    ///
    /// The files of the window that were handed to the kernel whole are read without a read
    /// request: their opens carry the scan on instead ([`Vfs::note_file_open`]).
    fn note_file_read(&self, st: &mut State, s: &SealedRun, idx: usize) {
        let (previous, queued) = st.last_read.get(&s.id).copied().unzip();
        if previous == Some(idx) {
            return;
        }
        let scan = previous
            .zip(queued)
            .is_some_and(|(p, q)| p < idx && (idx - p <= SCAN_GAP || idx <= q));
        let mut queued = if scan {
            queued.unwrap_or(idx).max(idx)
        } else {
            idx
        };
        if scan && queued < idx + SCAN_AHEAD_FILES / 2 {
            queued = self.read_ahead_files(s, idx, queued);
        }
        st.last_read.insert(s.id, (idx, queued));
    }

    /// An open of entry `idx` of a scanned run inside the window queued ahead: the scan goes on
    /// (its small files were handed to the kernel, and may never be read through the view).
    /// Outside a scan, opens count for nothing: a warm scan opens files the kernel does not
    /// ask to read, and reading ahead behind it would be wasted.
    fn note_file_open(&self, st: &mut State, s: &SealedRun, idx: usize) {
        if let Some(&(p, q)) = st.last_read.get(&s.id)
            && p < idx
            && idx <= q
        {
            self.note_file_read(st, s, idx);
        }
    }

    /// Queues the chunks of the files after entry `idx` (in manifest order, which is the order
    /// of a depth-first walk up to the sorting of names with `.` before `/`), while a scan of
    /// the run reads its files one after another: small files are a chunk each, and reading
    /// them one round trip at a time leaves the disk and the decompressor idle in between.
    /// The window is [`SCAN_AHEAD_FILES`] files or [`SCAN_AHEAD_BYTES`] past `idx`; what lies
    /// up to entry `queued` was queued before, the rest goes as one batch (located in one
    /// index read). With a [`ContentPusher`] set, the batch's files of at most
    /// [`PUSH_MAX_BYTES`] that lie wholly in the window go to the kernel once loaded. Returns
    /// the entry up to which the window is now queued.
    fn read_ahead_files(&self, s: &SealedRun, idx: usize, queued: usize) -> usize {
        let Some(tx) = self.readahead.as_ref().and_then(|r| r.tx.as_ref()) else {
            return queued;
        };
        let pushing = self
            .push
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let mut bytes = 0u64;
        let mut files = 0;
        let mut ids = Vec::new();
        let mut pushes = Vec::new();
        let mut last = idx;
        for (i, e) in s.entries.iter().enumerate().skip(idx + 1) {
            if files == SCAN_AHEAD_FILES || bytes >= SCAN_AHEAD_BYTES {
                break;
            }
            last = i;
            if e.kind != Kind::File {
                continue;
            }
            files += 1;
            let mut whole = true;
            for (n, c) in e.chunks.iter().enumerate() {
                bytes += u64::from(c.1);
                if i > queued && !self.cache.contains(&c.0) {
                    ids.push(c.0);
                }
                if bytes >= SCAN_AHEAD_BYTES {
                    whole = n + 1 == e.chunks.len();
                    break;
                }
            }
            // A hard link's entry is not an inode of its own; its target is pushed.
            if pushing
                && whole
                && i > queued
                && s.resolved[i] == i
                && (1..=PUSH_MAX_BYTES).contains(&e.size)
            {
                pushes.push(Push {
                    ino: encode(Node::Sealed { run: s.id, idx: i }),
                    chunks: e.chunks.iter().map(|c| c.0).collect(),
                });
            }
        }
        if ids.is_empty() && pushes.is_empty() {
            return last.max(queued);
        }
        match tx.try_send(Ahead::Batch(ids, pushes)) {
            Ok(()) => last.max(queued),
            // Behind already: the reads go on without it, and a later open queues again.
            Err(_) => queued,
        }
    }

    /// For a store with a remote tier: queues the chunks of the next [`TIERED_AHEAD_BYTES`]
    /// (at most half the chunk cache) after `end` of a sealed file as one batch, once half of
    /// what was queued before has been read.
    fn read_ahead_tiered(&self, fh: u64, s: &SealedRun, idx: usize, end: u64) {
        let Some(tx) = self.readahead.as_ref().and_then(|r| r.tx.as_ref()) else {
            return;
        };
        let Ok(e) = s.entry(idx) else { return };
        let ahead = TIERED_AHEAD_BYTES.min(self.opts.chunk_cache_bytes as u64 / 2);
        let from = {
            let mut st = self.lock();
            let until = st.ahead_until.get(&fh).copied().unwrap_or(0);
            if until >= e.size || until > end + ahead / 2 {
                return;
            }
            let to = (end + ahead).min(e.size);
            st.ahead_until.insert(fh, to);
            until.max(end)
        };
        let mut ids = Vec::new();
        let mut pos = 0u64;
        for c in &e.chunks {
            let cs = pos;
            pos += u64::from(c.1);
            if pos <= from {
                continue;
            }
            if cs >= end + ahead {
                break;
            }
            if !self.cache.contains(&c.0) {
                ids.push(c.0);
            }
        }
        if !ids.is_empty() && tx.try_send(Ahead::Batch(ids, Vec::new())).is_err() {
            // Behind already: forget the mark so that a later read queues them again.
            self.lock().ahead_until.remove(&fh);
        }
    }

    /// Queues the chunks that follow `end` in a sealed file for loading into the cache.
    fn read_ahead(&self, s: &SealedRun, idx: usize, end: u64) {
        let Some(tx) = self.readahead.as_ref().and_then(|r| r.tx.as_ref()) else {
            return;
        };
        let Ok(e) = s.entry(idx) else { return };
        let mut start = 0u64;
        let mut queued = 0u64;
        for c in &e.chunks {
            let cs = start;
            start += u64::from(c.1);
            // The chunk holding `end` was just read; the ones after it come next.
            if cs < end {
                continue;
            }
            if queued >= self.opts.readahead_bytes {
                break;
            }
            queued += u64::from(c.1);
            if !self.cache.contains(&c.0) && tx.try_send(Ahead::Load(c.0)).is_err() {
                // A full queue means readahead is behind already; the reads go on without it.
                break;
            }
        }
    }

    fn read_sealed(&self, s: &SealedRun, idx: usize, offset: u64, size: u32) -> Result<Vec<u8>> {
        let e = s.entry(idx)?;
        self.read_chunks(&e.chunks, e.size, offset, size, &|| {
            format!("file {}/{}", s.r, e.path)
        })
    }

    /// Bytes `offset..offset + size` of a file of `len` bytes made of `chunks`, each verified
    /// (through the decompressed-chunk cache); a damaged chunk's error names `what()`.
    fn read_chunks(
        &self,
        chunks: &[crate::manifest::ChunkRef],
        len: u64,
        offset: u64,
        size: u32,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<u8>> {
        let end = offset.saturating_add(u64::from(size)).min(len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = 0u64;
        for c in chunks {
            let len = u64::from(c.1);
            let (cs, ce) = (pos, pos + len);
            pos = ce;
            if ce <= offset {
                continue;
            }
            if cs >= end {
                break;
            }
            let data = self.cache.get(&self.store, &c.0).map_err(|err| match err {
                Error::Corrupt {
                    what: chunk,
                    reason,
                } => {
                    let file = what();
                    tracing::error!(%file, "damaged chunk: {chunk}: {reason}");
                    Error::Corrupt {
                        what: format!("{chunk} ({file})"),
                        reason,
                    }
                }
                other => other,
            })?;
            let from = offset.max(cs) - cs;
            let to = end.min(ce) - cs;
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        enum W {
            Staged(Option<Arc<File>>, i64, i64),
            Seal,
            Gc,
            Other,
            Missing,
        }
        enum Target {
            File(Arc<File>),
            Stream(Arc<stream::Stream>),
            Chunked,
        }
        let (target, run, inode, stale) = {
            let mut st = self.lock();
            let w = match st.handles.get(&fh) {
                Some(Handle::Staged { run, inode, file }) => W::Staged(file.clone(), *run, *inode),
                Some(Handle::SealCtl) => W::Seal,
                Some(Handle::GcCtl) => W::Gc,
                Some(_) => W::Other,
                None => W::Missing,
            };
            match w {
                W::Staged(_, _, inode) if st.lost.contains_key(&inode) => {
                    let full = st.lost[&inode];
                    return Err(self.lost_file(inode, full));
                }
                W::Staged(_, _, inode) if st.broken.contains_key(&inode) => {
                    return Err(self.broken_file(&st, inode));
                }
                W::Staged(file, run, inode) => {
                    // Written around the kernel's page cache while another handle may have
                    // cached pages of the file (`Vfs::writes_direct`).
                    let stale = st.direct.contains(&fh) && st.open_count.get(&inode) > Some(&1);
                    let now = self.now();
                    st.dirty_mtime.insert(inode, now);
                    self.touch(&mut st, run);
                    self.preseal.changed(run, inode);
                    if let Some(s) = st.streams.get(&inode) {
                        (Target::Stream(s.clone()), run, inode, stale)
                    } else if st.chunked.contains_key(&inode) {
                        (Target::Chunked, run, inode, stale)
                    } else {
                        let file = match file {
                            Some(f) => f,
                            None => {
                                let end = offset.saturating_add(data.len() as u64);
                                let st = &mut *st;
                                if let Some(i) = st.inline.get_mut(&inode) {
                                    let grow = (end as usize).saturating_sub(i.data.len());
                                    if end <= INLINE_MAX && st.inline_bytes + grow <= INLINE_MEM_MAX
                                    {
                                        if i.data.len() < end as usize {
                                            i.data.resize(end as usize, 0);
                                        }
                                        i.data[offset as usize..end as usize].copy_from_slice(data);
                                        i.dirty = true;
                                        st.inline_bytes += grow;
                                        return Ok(data.len() as u32);
                                    }
                                }
                                self.spill(st, run, inode)?
                            }
                        };
                        let st = &mut *st;
                        let end = offset.saturating_add(data.len() as u64);
                        let next = st.appending.remove(&inode);
                        if next == Some(offset)
                            && end >= stream::STREAM_AT
                            && self.may_stream(st, inode)
                        {
                            let s = Arc::new(stream::Stream::start(
                                self.store.clone(),
                                self.staging_path(run, inode),
                                offset,
                            )?);
                            tracing::debug!(run, inode, offset, "file streams into the chunker");
                            st.streams.insert(inode, s.clone());
                            (Target::Stream(s), run, inode, stale)
                        } else {
                            if next == Some(offset) {
                                st.appending.insert(inode, end);
                            }
                            *st.writing.entry(inode).or_default() += 1;
                            (Target::File(file), run, inode, stale)
                        }
                    }
                }
                W::Seal => {
                    drop(st);
                    let text = std::str::from_utf8(data)
                        .map_err(|_| Error::invalid("seal request", "not UTF-8 text"))?;
                    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                        let r = RunRef::parse(line)?;
                        let (id, _) = self
                            .meta(|m| m.run_of(&r.namespace, &r.run))?
                            .ok_or_else(|| Error::NotFound(format!("run {r}")))?;
                        self.seal_id(id, "control file")?;
                    }
                    return Ok(data.len() as u32);
                }
                W::Gc => {
                    // gc waits for running seals; it must not hold the state lock meanwhile.
                    drop(st);
                    let text = std::str::from_utf8(data)
                        .map_err(|_| Error::invalid("gc request", "not UTF-8 text"))?;
                    self.gc_request(text)?;
                    return Ok(data.len() as u32);
                }
                W::Other => return Err(Error::ReadOnly("file is read-only".into())),
                W::Missing => {
                    return Err(Error::invalid("file handle", format!("{fh} is not open")));
                }
            }
        };
        match target {
            Target::File(file) => {
                let p = self.staging_path(run, inode);
                let r = file.write_all_at(data, offset);
                {
                    let mut st = self.lock();
                    if let Some(n) = st.writing.get_mut(&inode) {
                        *n -= 1;
                        if *n == 0 {
                            st.writing.remove(&inode);
                        }
                    }
                }
                r.map_err(|e| Error::io("write", &p, e))?;
            }
            Target::Stream(s) => match s.append(offset, data) {
                Ok(true) => {}
                Ok(false) => {
                    // Not an append: the file goes back to its staging file first.
                    self.materialize(&mut self.lock(), inode)?;
                    return self.write(fh, offset, data);
                }
                Err(e) => {
                    let mut st = self.lock();
                    st.streams.remove(&inode);
                    return Err(self.stream_failed(&mut st, inode, e));
                }
            },
            Target::Chunked => {
                self.materialize(&mut self.lock(), inode)?;
                return self.write(fh, offset, data);
            }
        }
        if stale {
            let hook = self.forget_data.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(forget) = hook.as_ref() {
                forget(encode(Node::Open(inode)), offset as i64, data.len() as i64);
            }
        }
        Ok(data.len() as u32)
    }

    /// Keeps the file of handle `fh` in its staging file however it is written (no stream):
    /// for a writer that must leave nothing stored when it gives up (an HTTP upload, whose
    /// unfinished file is dropped with its staging file).
    pub fn keep_staged(&self, fh: u64) {
        let mut st = self.lock();
        if let Some(Handle::Staged { inode, .. }) = st.handles.get(&fh) {
            let inode = *inode;
            st.unstreamed.insert(inode);
        }
    }

    /// Whether a file being appended to may start streaming now (ADR 0025).
    fn may_stream(&self, st: &State, inode: i64) -> bool {
        !st.streams_paused
            && st.streams.len() < stream::MAX_STREAMS
            && !st.unstreamed.contains(&inode)
            && !st.writing.contains_key(&inode)
            && st.open_count.get(&inode) == Some(&1)
    }

    /// Records that `inode`'s stream failed with `e`: what it held since its staging prefix
    /// is lost, and the file's writes, flushes and fsyncs say so until it is closed.
    fn stream_failed(&self, st: &mut State, inode: i64, e: Error) -> Error {
        tracing::error!(inode, "a file being chunked as it was written failed: {e}");
        st.unstreamed.insert(inode);
        st.broken.insert(inode, (e.to_string(), e.is_disk_full()));
        e
    }

    /// The error of a handle whose file's stream failed (see `State::broken`).
    fn broken_file(&self, st: &State, inode: i64) -> Error {
        let (why, full) = st.broken.get(&inode).cloned().unwrap_or_default();
        let p = self.staging.join(format!("inode {inode}"));
        if full {
            return Error::disk_full("store the file being written (write it again) to", p);
        }
        Error::io(
            "store the file being written (write it again)",
            p,
            std::io::Error::other(why),
        )
    }

    /// Ends `inode`'s stream, if it has one, and commits the file's content as its chunk list
    /// (a close or fsync: the content becomes durable).
    fn close_stream(&self, st: &mut State, inode: i64) -> Result<()> {
        if st.broken.contains_key(&inode) {
            return Err(self.broken_file(st, inode));
        }
        let Some(s) = st.streams.remove(&inode) else {
            return Ok(());
        };
        let ended = match s.end() {
            Ok(e) => e,
            Err(e) => return Err(self.stream_failed(st, inode, e)),
        };
        if let Err(e) = self.meta_write(|m| m.set_chunked(inode, &ended.content)) {
            return Err(self.stream_failed(st, inode, e));
        }
        drop(ended.guard);
        // The chunk list is the content now; the staging file held a prefix of it.
        let run = self.inode(inode)?.run;
        let _ = fs::remove_file(self.staging_path(run, inode));
        st.chunked.insert(inode, Arc::new(ended.content));
        Ok(())
    }

    /// Writes a streaming or chunked file's content back to its staging file (something other
    /// than an append came): from then on it is a staged file like any other.
    fn materialize(&self, st: &mut State, inode: i64) -> Result<()> {
        if st.broken.contains_key(&inode) {
            return Err(self.broken_file(st, inode));
        }
        let (content, guard) = if let Some(s) = st.streams.remove(&inode) {
            match s.end() {
                Ok(e) => (e.content, Some(e.guard)),
                Err(e) => return Err(self.stream_failed(st, inode, e)),
            }
        } else if let Some(c) = st.chunked.get(&inode) {
            ((**c).clone(), None)
        } else if let Some(c) = self.meta(|m| m.chunked(inode))? {
            (c, None)
        } else {
            return Ok(());
        };
        st.unstreamed.insert(inode);
        let streamed = guard.is_some();
        let f = match self.write_back(inode, &content) {
            Ok(f) => f,
            // What a stream held is nowhere else now.
            Err(e) if streamed => return Err(self.stream_failed(st, inode, e)),
            Err(e) => return Err(e),
        };
        drop(guard);
        st.chunked.remove(&inode);
        let f = Arc::new(f);
        for h in st.handles.values_mut() {
            if let Handle::Staged { inode: i, file, .. } = h
                && *i == inode
            {
                *file = Some(f.clone());
            }
        }
        tracing::debug!(inode, bytes = content.size, "chunked file moved to staging");
        Ok(())
    }

    /// [`Vfs::materialize`]'s copy: the staging file written from the chunks, then the chunk
    /// list dropped from the index (until that commit the list is the content).
    fn write_back(&self, inode: i64, content: &ChunkedContent) -> Result<File> {
        let (f, p) = self.new_staging_file(self.inode(inode)?.run, inode)?;
        let mut pos = 0u64;
        for c in &content.chunks {
            let data = self.store.read_chunk(&c.0)?;
            f.write_all_at(&data, pos)
                .map_err(|e| Error::io("write", &p, e))?;
            pos += data.len() as u64;
        }
        f.set_len(content.size)
            .map_err(|e| Error::io("truncate", &p, e))?;
        self.meta_write(|m| m.drop_chunked(inode))?;
        Ok(f)
    }

    /// Writes what a file's writes changed to the index at a close: its mtime and, when it is
    /// inline, its content; the close journal then holds them (ADR 0031).
    fn persist_changes(&self, st: &mut State, inode: i64) -> Result<()> {
        self.persist_changes_then(st, inode, Then::Close)
    }

    /// [`Vfs::persist_changes`], committing them or leaving them to the next commit.
    fn persist_changes_then(&self, st: &mut State, inode: i64, then: Then) -> Result<()> {
        if let Some(&full) = st.lost.get(&inode) {
            return Err(self.lost_file(inode, full));
        }
        self.persist_changes_now(st, inode, then)
            .map_err(|e| self.commit_failed(st, inode, e))
    }

    /// The error of a failed write or commit of `inode`'s changes. If it (or another since the
    /// file was created) rolled back the file's creation, which no close had promised yet
    /// (ADR 0018, 0031), the file is gone, and so is what was kept of it here.
    fn commit_failed(&self, st: &mut State, inode: i64, e: Error) -> Error {
        if !matches!(self.meta(|m| m.inode(inode)), Ok(None)) {
            return e;
        }
        let full = e.is_disk_full() || self.store.index_deferred().last_rollback_was_disk_full();
        tracing::warn!(
            inode,
            "a file's creation was rolled back by a failed commit: {e}"
        );
        if let Some(i) = st.inline.remove(&inode) {
            st.inline_bytes -= i.data.len();
        }
        st.dirty_mtime.remove(&inode);
        st.dirty_attrs.remove(&inode);
        st.lost.insert(inode, full);
        self.preseal.forget(inode);
        if e.is_disk_full() {
            e
        } else {
            self.lost_file(inode, full)
        }
    }

    /// The error of a handle whose file's creation was rolled back (see `State::lost`): ENOSPC
    /// when the commit that lost it failed for a full disk.
    fn lost_file(&self, inode: i64, full: bool) -> Error {
        if full {
            Error::disk_full(
                "commit a new file's creation (rolled back) to",
                self.store.root().join("index.sqlite"),
            )
        } else {
            Error::NotFound(format!(
                "inode {inode}: the file's creation was not committed; create it again"
            ))
        }
    }

    fn persist_changes_now(&self, st: &mut State, inode: i64, then: Then) -> Result<()> {
        let data = st.inline.get(&inode).filter(|i| i.dirty).map(|i| &i.data);
        let patch = st.dirty_attrs.get(&inode).copied();
        if data.is_none() && patch.is_none() && !st.dirty_mtime.contains_key(&inode) {
            // Its creation, if that is still uncommitted, is promised all the same.
            return match then {
                Then::Close => self.store.index_deferred().journal_close(),
                Then::Defer => Ok(()),
            };
        }
        let t = st.dirty_mtime.get(&inode).copied();
        let mut idx = self.store.index_deferred();
        // One journaled step (ADR 0031); a close then writes the journal instead of
        // committing, a release before a rename leaves it to the rename's commit.
        idx.journaled_step(|m| {
            let row = match patch {
                Some(p) => m.inode(inode)?.map(|row| {
                    let mut row = p.applied(row);
                    if let Some(t) = t {
                        // A write after the patch's utimens: its time wins, as it would have.
                        row.mtime_ns = t;
                        row.ctime_ns = row.ctime_ns.max(t);
                    }
                    row
                }),
                None => None,
            };
            Ok(Step::Persist {
                ino: inode,
                times: if patch.is_none() { t } else { None },
                row,
                inline: data.cloned(),
            })
        })?;
        if then == Then::Close {
            idx.journal_close()?;
        }
        drop(idx);
        st.dirty_mtime.remove(&inode);
        st.dirty_attrs.remove(&inode);
        if let Some(i) = st.inline.get_mut(&inode) {
            i.dirty = false;
        }
        Ok(())
    }

    /// `flush` (each `close` of a descriptor): the file's attributes become durable.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let mut st = self.lock();
        if let Some(Handle::Staged { inode, .. }) = st.handles.get(&fh) {
            let inode = *inode;
            let streamed = self.close_stream(&mut st, inode);
            self.persist_changes(&mut st, inode)?;
            streamed?;
        }
        Ok(())
    }

    /// `fsync`: content and attributes durable. It commits (not only journals) the file's
    /// changes, and fails with that commit: then the file's changes stay to be written by its
    /// next close, and a creation the commit took back leaves the file lost.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        let mut st = self.lock();
        if let Some(Handle::Staged { run, inode, file }) = st.handles.get(&fh) {
            let (run, inode, file) = (*run, *inode, file.clone());
            self.close_stream(&mut st, inode)?;
            if let Some(file) = file.filter(|_| !st.chunked.contains_key(&inode)) {
                file.sync_all()
                    .map_err(|e| Error::io("fsync", self.staging_path(run, inode), e))?;
            }
            let held = (
                st.dirty_attrs.get(&inode).copied(),
                st.dirty_mtime.get(&inode).copied(),
                st.inline.get(&inode).is_some_and(|i| i.dirty),
            );
            self.persist_changes_then(&mut st, inode, Then::Defer)?;
            let committed = self.store.index_deferred().commit_deferred();
            if let Err(e) = committed {
                let (patch, t, dirty) = held;
                if let Some(p) = patch {
                    st.dirty_attrs.entry(inode).or_insert(p);
                }
                if let Some(t) = t {
                    st.dirty_mtime.entry(inode).or_insert(t);
                }
                if let Some(i) = st.inline.get_mut(&inode) {
                    i.dirty |= dirty;
                }
                return Err(self.commit_failed(&mut st, inode, e));
            }
            // The file's metadata (size, times, name) is in the index: make that durable too.
            self.store.index().sync()?;
        }
        Ok(())
    }

    /// `release`: the last close of an open file description.
    pub fn release(&self, fh: u64) -> Result<()> {
        self.release_then(fh, Then::Close)
    }

    /// [`Vfs::release`] of a file the caller renames into place next: the file's content and
    /// attributes then commit with the rename, in one index commit instead of two (ADR 0018).
    /// Until that commit, a crash loses the file as it would lose one never closed.
    pub fn release_before_rename(&self, fh: u64) -> Result<()> {
        self.release_then(fh, Then::Defer)
    }

    fn release_then(&self, fh: u64, then: Then) -> Result<()> {
        let mut st = self.lock();
        let Some(h) = st.handles.remove(&fh) else {
            return Ok(());
        };
        st.read_pos.remove(&fh);
        st.ahead_until.remove(&fh);
        st.direct.remove(&fh);
        let Handle::Staged { run, inode, .. } = h else {
            return Ok(());
        };
        let streamed = self.close_stream(&mut st, inode);
        let res = self
            .persist_changes_then(&mut st, inode, then)
            .and(streamed);
        let chunked = st.chunked.contains_key(&inode);
        let left = {
            let c = st.open_count.entry(inode).or_default();
            *c = c.saturating_sub(1);
            *c
        };
        // A small file's content, as committed (or about to be): handed to the chunking
        // ahead, which need not read it back from the index.
        let mut content = None;
        let lost = left == 0 && st.lost.remove(&inode).is_some();
        if lost {
            let _ = fs::remove_file(self.staging_path(run, inode));
        }
        if left == 0 {
            st.open_count.remove(&inode);
            st.chunked.remove(&inode);
            st.appending.remove(&inode);
            st.unstreamed.remove(&inode);
            st.broken.remove(&inode);
            if let Some(i) = st.inline.remove(&inode) {
                st.inline_bytes -= i.data.len();
                content = res.is_ok().then_some(i.data);
            }
            if res.is_err() {
                // The last close failed to commit (a full disk): the file is what the index
                // holds, and the changes kept for it here go with the error.
                st.dirty_mtime.remove(&inode);
                st.dirty_attrs.remove(&inode);
            }
        }
        if let Some(a) = st.runs.get_mut(&run) {
            a.open = a.open.saturating_sub(1);
            a.last = Instant::now();
            if a.open == 0 {
                // A seal may be waiting for this release (see `Vfs::seal_id`).
                self.sealed_cv.notify_all();
            }
        }
        if left == 0 && !lost {
            let row = self.meta(|m| m.inode(inode))?;
            match row {
                Some(row) if row.nlink == 0 && st.lookups.contains_key(&inode) => {
                    // Removed, but the kernel still knows it: it goes when forgotten.
                }
                Some(row) if row.nlink == 0 => {
                    self.meta_write(|m| m.delete_inode(inode))?;
                    self.preseal.forget(inode);
                    let _ = fs::remove_file(self.staging_path(run, inode));
                }
                Some(_) => {
                    // A file kept as a chunk list needs no chunking ahead of its seal.
                    if !chunked {
                        self.preseal.closed(run, inode, content);
                    }
                    if let Some(marker) = &self.opts.seal_marker {
                        let root = self.meta(|m| m.run_root(run))?;
                        let named = match root {
                            Some(root) => self.meta(|m| m.lookup(root, marker))?,
                            None => None,
                        };
                        if named == Some(inode) {
                            tracing::info!(run, marker = %marker, "seal marker closed; the run seals once no file is open");
                            if let Some(a) = st.runs.get_mut(&run) {
                                a.seal_requested = true;
                            }
                        }
                    }
                }
                None => {}
            }
        }
        res
    }

    /// `setattr`: chmod, chown, truncate, utimens.
    /// Before a write by a process that may not keep set-user-ID and set-group-ID bits (the
    /// kernel says so with `FUSE_WRITE_KILL_SUIDGID`): set-user-ID goes, and set-group-ID
    /// when the group may execute, as a local file system drops them.
    pub fn kill_suidgid(&self, ino: u64, fh: u64) -> Result<()> {
        let a = self.getattr(ino)?;
        let mut mode = a.mode & !0o4000;
        if a.mode & 0o010 != 0 {
            mode &= !0o2000;
        }
        if mode == a.mode {
            return Ok(());
        }
        let set = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        self.setattr(ino, set, Some(fh)).map(drop)
    }

    /// `fallocate` through handle `fh`: plain allocation (mode 0) makes the file at least
    /// `offset + len` bytes long, the new bytes reading as zeros; with `FALLOC_FL_KEEP_SIZE`
    /// it changes nothing. No space is set aside (a store of chunks has no blocks to reserve):
    /// a later write can still meet a full disk. Punching holes and zeroing ranges are not
    /// supported.
    pub fn fallocate(&self, ino: u64, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        use nix::libc::FALLOC_FL_KEEP_SIZE;
        if mode & !FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Error::Unsupported(format!(
                "fallocate mode {mode:#x}: only allocation (0, FALLOC_FL_KEEP_SIZE) is supported"
            )));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid("fallocate", "offset + length is too large"))?;
        let a = self.getattr(ino)?;
        if mode & FALLOC_FL_KEEP_SIZE == 0 && end > a.size {
            let set = SetAttr {
                size: Some(end),
                ..SetAttr::default()
            };
            self.setattr(ino, set, Some(fh))?;
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, set: SetAttr, fh: Option<u64>) -> Result<Attr> {
        let (mut st, node) = self.lock_mut(ino)?;
        let now = self.now();
        if let Node::Namespace(id) = node {
            let mut ns = self
                .meta(|m| m.namespace_by_id(id))?
                .ok_or_else(|| Error::NotFound(format!("namespace {id}")))?;
            if set.size.is_some() {
                return Err(Error::IsDir(format!("namespace {}", ns.name)));
            }
            if let Some(m) = set.mode {
                ns.mode = m & 0o7777;
            }
            ns.uid = set.uid.unwrap_or(ns.uid);
            ns.gid = set.gid.unwrap_or(ns.gid);
            if let Some(t) = set.mtime_ns {
                ns.mtime_ns = t.unwrap_or(now);
            }
            self.meta_write(|m| m.update_namespace(&ns))?;
            return self.ns_attr(&ns);
        }
        if matches!(node, Node::CtlSeal | Node::CtlGc)
            && set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
        {
            // `echo NS/RUN > seal` truncates first; the seal file has nothing to truncate.
            return self.attr_of(&mut st, node);
        }
        let i = self.writable(node, "setattr")?;
        let mut row = self.inode(i)?;
        if set.size.is_none() && row.kind == Kind::File && st.open_count.contains_key(&i) {
            // chmod, chown, utimens of an open file: written with its next flush.
            let mut p = st.dirty_attrs.get(&i).copied().unwrap_or_default();
            p.mode = set.mode.map(|m| m & 0o7777).or(p.mode);
            p.uid = set.uid.or(p.uid);
            p.gid = set.gid.or(p.gid);
            if let Some(t) = set.mtime_ns {
                p.mtime_ns = Some(t.unwrap_or(now));
                st.dirty_mtime.remove(&i);
            }
            p.ctime_ns = now;
            st.dirty_attrs.insert(i, p);
            self.touch(&mut st, row.run);
            return self.open_attr(&st, &row);
        }
        if let Some(p) = st.dirty_attrs.remove(&i) {
            // Written now, with this change on top.
            row = p.applied(row);
        }
        let mut inline_set: Option<Vec<u8>> = None;
        if let Some(m) = set.mode {
            row.mode = m & 0o7777;
        }
        row.uid = set.uid.unwrap_or(row.uid);
        row.gid = set.gid.unwrap_or(row.gid);
        if let Some(size) = set.size {
            if row.kind == Kind::Dir {
                return Err(Error::IsDir(format!("inode {i}")));
            }
            if row.kind != Kind::File {
                return Err(Error::invalid(
                    "truncate",
                    format!("inode {i} is a {}", row.kind.as_str()),
                ));
            }
            self.preseal.changed(row.run, i);
            // A file kept as chunks is truncated in its staging file.
            self.materialize(&mut st, i)?;
            // The content, when it is inline (in memory while open, else in the index).
            let inline = match st.inline.get(&i) {
                Some(x) => Some(x.data.clone()),
                None => self.meta(|m| m.inline_data(i))?,
            };
            let is_inline = inline.is_some();
            if let Some(mut data) = inline.filter(|_| size <= INLINE_MAX) {
                data.resize(size as usize, 0);
                // Written with the inode below; a copy in memory follows.
                inline_set = Some(data);
            } else {
                let file = match fh.and_then(|f| st.handles.get(&f)) {
                    Some(Handle::Staged { file: Some(f), .. }) => f.clone(),
                    _ if is_inline => self.spill(&mut st, row.run, i)?,
                    _ => self.open_staged(&row)?,
                };
                file.set_len(size)
                    .map_err(|e| Error::io("truncate", self.staging_path(row.run, i), e))?;
            }
            row.mtime_ns = now;
            st.dirty_mtime.remove(&i);
        }
        if let Some(t) = set.mtime_ns {
            row.mtime_ns = t.unwrap_or(now);
            st.dirty_mtime.remove(&i);
        } else if let Some(t) = st.dirty_mtime.remove(&i) {
            row.mtime_ns = t;
        }
        row.ctime_ns = now;
        self.meta_write(|m| {
            m.update_inode(&row)?;
            if let Some(d) = &inline_set {
                m.set_inline_data(i, d)?;
            }
            Ok(())
        })?;
        if let Some(d) = inline_set {
            let st = &mut *st;
            if let Some(x) = st.inline.get_mut(&i) {
                st.inline_bytes = st.inline_bytes - x.data.len() + d.len();
                x.data = d;
                x.dirty = false;
            }
        }
        self.touch(&mut st, row.run);
        self.open_attr(&st, &row)
    }

    /// Drops one name of `ino`; deletes the inode when no name and no open file is left.
    fn drop_name(
        &self,
        st: &State,
        m: &crate::index::Meta<'_>,
        ino: i64,
        now: i64,
    ) -> Result<Option<(i64, i64)>> {
        let Some(mut row) = m.inode(ino)? else {
            return Ok(None);
        };
        row.nlink = row.nlink.saturating_sub(1);
        row.ctime_ns = now;
        if row.nlink == 0 && !st.open_count.contains_key(&ino) && !st.lookups.contains_key(&ino) {
            m.delete_inode(ino)?;
            return Ok((row.kind == Kind::File).then_some((row.run, ino)));
        }
        m.update_inode(&row)?;
        Ok(None)
    }

    /// `unlink` of a non-directory in an open run.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let name = name_str(name)?;
        let (mut st, p) = self.lock_mut(parent)?;
        let dir = self.writable(p, "unlink")?;
        let now = self.now();
        let gone = self.meta_write_freeing("unlink", |m| {
            let (ino, row) = named(m, dir, name)?;
            if row.kind == Kind::Dir {
                return Err(Error::IsDir(name.to_owned()));
            }
            m.remove_dentry(dir, name)?;
            m.set_times(dir, now, now)?;
            self.drop_name(&st, m, ino, now)
        })?;
        if let Some((run, ino)) = gone {
            self.preseal.forget(ino);
            let _ = fs::remove_file(self.staging_path(run, ino));
        }
        let run = self.inode(dir)?.run;
        self.touch(&mut st, run);
        Ok(())
    }

    /// `rmdir`: an empty directory in an open run, or an empty namespace.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let name = name_str(name)?;
        let (mut st, p) = self.lock_mut(parent)?;
        let now = self.now();
        match p {
            Node::Root => {
                let ns = self
                    .meta(|m| m.namespace(name))?
                    .ok_or_else(|| Error::NotFound(name.to_owned()))?;
                if self.meta(|m| m.run_count(name))? > 0 {
                    return Err(Error::NotEmpty(format!("namespace {name} has runs")));
                }
                self.meta_write(|m| m.delete_namespace(ns.id))?;
                tracing::info!(namespace = name, "namespace removed");
                return Ok(());
            }
            Node::Namespace(id) => return self.remove_open_run(st, id, name, now),
            _ => {}
        }
        let dir = self.writable(p, "rmdir")?;
        let run = self.meta_write_freeing("rmdir", |m| {
            let (ino, row) = named(m, dir, name)?;
            if row.kind != Kind::Dir {
                return Err(Error::NotDir(name.to_owned()));
            }
            if m.has_children(ino)? {
                return Err(Error::NotEmpty(name.to_owned()));
            }
            m.remove_dentry(dir, name)?;
            m.delete_inode(ino)?;
            m.set_times(dir, now, now)?;
            Ok(row.run)
        })?;
        self.forget_subdirs(&[dir]);
        self.touch(&mut st, run);
        Ok(())
    }

    /// `rmdir` of a run directory: an open run that is empty, has no open file and no hold
    /// is removed, and its name is free again (a run made by mistake need not wait to be
    /// sealed and expire). A sealed run is deleted by retention and gc only (EPERM).
    fn remove_open_run(
        &self,
        mut st: MutexGuard<'_, State>,
        ns_id: i64,
        name: &str,
        now: i64,
    ) -> Result<()> {
        let ns = self
            .meta(|m| m.namespace_by_id(ns_id))?
            .ok_or_else(|| Error::NotFound(format!("namespace {ns_id}")))?;
        let r = RunRef::new(&ns.name, name)?;
        let refused = |e: Error| {
            tracing::warn!(run = %r, "rmdir refused: {e}");
            e
        };
        let (run_id, _) = self
            .meta(|m| m.run_of(&ns.name, name))?
            .ok_or_else(|| Error::NotFound(format!("run {r}")))?;
        // A seal of it that is under way ends first (then the run is sealed: EPERM).
        while st.sealing.contains(&run_id) {
            st = self.sealed_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let open = st.runs.get(&run_id).map_or(0, |a| a.open);
        if open > 0 {
            return Err(refused(Error::Busy(format!(
                "run {r} has {open} open files"
            ))));
        }
        self.meta_write_freeing("rmdir", |m| {
            m.remove_open_run(run_id, &r, now)?;
            let mut ns = ns.clone();
            ns.mtime_ns = now;
            m.update_namespace(&ns)
        })
        .map_err(refused)?;
        st.runs.remove(&run_id);
        drop(st);
        self.preseal.forget_run(run_id);
        remove_staging(&self.staging, run_id);
        tracing::info!(run = %r, id = run_id, "run removed");
        Ok(())
    }

    /// `rename` inside one open run: `noreplace` fails if the target exists (EEXIST), `exchange`
    /// swaps two existing names atomically (`renameat2` `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
        exchange: bool,
    ) -> Result<()> {
        let name = name_str(name)?;
        let newname = name_str(newname)?;
        if exchange && noreplace {
            return Err(Error::invalid(
                "rename",
                "RENAME_EXCHANGE and RENAME_NOREPLACE together",
            ));
        }
        let (mut st, p) = self.lock_mut(parent)?;
        let np = self.node(&st, newparent)?;
        let from = self.writable(p, "rename")?;
        let to = self.writable(np, "rename")?;
        check_name("file name", newname, true)?;
        let now = self.now();
        let (run_from, run_to) = (self.inode(from)?.run, self.inode(to)?.run);
        if run_from != run_to {
            return Err(Error::CrossRun(format!(
                "{name} -> {newname}: rename across runs"
            )));
        }
        if exchange {
            self.meta_write(|m| exchange_names(m, from, name, to, newname, now))?;
            // Either directory may gain or lose a subdirectory.
            self.forget_subdirs(&[from, to]);
            st.dirty_mtime.remove(&from);
            st.dirty_mtime.remove(&to);
            self.touch(&mut st, run_from);
            return Ok(());
        }
        // What a replaced file leaves to clean up, and whether a directory moved or went (then
        // the two directories' subdirectory counts change; a file's rename, as rsync and
        // uploads do for every file, keeps them).
        let (gone, dirs) = self.meta_write(|m| {
            let ino = m
                .lookup(from, name)?
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            let src = m
                .inode(ino)?
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            let mut gone = None;
            let mut dirs = src.kind == Kind::Dir;
            if let Some(old) = m.lookup(to, newname)? {
                if old == ino {
                    return Ok((None, false));
                }
                if noreplace {
                    return Err(Error::AlreadyExists(newname.to_owned()));
                }
                let dst = m
                    .inode(old)?
                    .ok_or_else(|| Error::NotFound(newname.to_owned()))?;
                match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                    (true, false) => return Err(Error::NotDir(newname.to_owned())),
                    (false, true) => return Err(Error::IsDir(newname.to_owned())),
                    (true, true) if m.has_children(old)? => {
                        return Err(Error::NotEmpty(newname.to_owned()));
                    }
                    _ => {}
                }
                m.remove_dentry(to, newname)?;
                dirs |= dst.kind == Kind::Dir;
                gone = if dst.kind == Kind::Dir {
                    m.delete_inode(old)?;
                    None
                } else {
                    self.drop_name(&st, m, old, now)?
                };
            }
            if src.kind == Kind::Dir {
                refuse_move_into_itself(m, ino, to, name)?;
            }
            m.remove_dentry(from, name)?;
            m.set_dentry(to, newname, ino)?;
            let mut src = src;
            src.ctime_ns = now;
            if let Some(t) = st.dirty_mtime.get(&ino) {
                src.mtime_ns = *t;
            }
            m.update_inode(&src)?;
            m.set_times(from, now, now)?;
            m.set_times(to, now, now)?;
            Ok((gone, dirs))
        })?;
        if dirs {
            self.forget_subdirs(&[from, to]);
        }
        if let Some((run, ino)) = gone {
            self.preseal.forget(ino);
            let _ = fs::remove_file(self.staging_path(run, ino));
        }
        st.dirty_mtime.remove(&from);
        st.dirty_mtime.remove(&to);
        self.touch(&mut st, run_from);
        Ok(())
    }

    /// `link`: another name for a regular file, in the same open run.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let newname = name_str(newname)?;
        let (mut st, n) = self.lock_mut(ino)?;
        let np = self.node(&st, newparent)?;
        let i = self.writable(n, "link")?;
        let to = self.writable(np, "link")?;
        check_name("file name", newname, true)?;
        let now = self.now();
        let mut row = self.inode(i)?;
        if row.kind == Kind::Dir {
            return Err(Error::NotPermitted("hard links to directories".into()));
        }
        if self.inode(to)?.run != row.run {
            return Err(Error::CrossRun(format!("{newname}: hard link across runs")));
        }
        row.nlink += 1;
        row.ctime_ns = now;
        if let Some(t) = st.dirty_mtime.get(&i) {
            row.mtime_ns = *t;
        }
        self.meta_write(|m| {
            if m.lookup(to, newname)?.is_some() {
                return Err(Error::AlreadyExists(newname.to_owned()));
            }
            m.set_dentry(to, newname, i)?;
            m.update_inode(&row)?;
            m.set_times(to, now, now)
        })?;
        self.touch(&mut st, row.run);
        self.open_attr(&st, &row)
    }

    /// File-system statistics (those of the store's file system).
    pub fn statfs(&self) -> Result<StatFs> {
        let root = self.store.root();
        let s = nix::sys::statvfs::statvfs(root)
            .map_err(|e| Error::io("statvfs", root, std::io::Error::from_raw_os_error(e as i32)))?;
        Ok(StatFs {
            blocks: s.blocks() as u64,
            bfree: s.blocks_free() as u64,
            bavail: s.blocks_available() as u64,
            files: s.files() as u64,
            ffree: s.files_free() as u64,
            bsize: s.fragment_size() as u32,
            namelen: NAME_MAX as u32,
        })
    }

    /// The xattrs of a node: stored ones plus the read-only `user.artifactfs.*` facts.
    fn xattrs_of(&self, st: &mut State, node: Node) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        match node {
            Node::Open(i) => {
                let row = self.inode(i)?;
                for (k, v) in &row.xattrs {
                    out.insert(k.clone(), v.to_bytes()?);
                }
                if self.meta(|m| m.run_root(row.run))? == Some(i) {
                    out.insert(format!("{FACTS_PREFIX}state"), b"open".to_vec());
                    self.retention_xattrs(row.run, &mut out)?;
                }
            }
            Node::Sealed { run, idx } => {
                let s = self.sealed_run(st, run)?;
                let e = s.entry(idx)?;
                for (k, v) in &e.xattrs {
                    out.insert(k.clone(), v.to_bytes()?);
                }
                if idx == 0 {
                    out.insert(format!("{FACTS_PREFIX}state"), b"sealed".to_vec());
                    out.insert(
                        format!("{FACTS_PREFIX}manifest"),
                        s.digest.to_hex().into_bytes(),
                    );
                    out.insert(
                        format!("{FACTS_PREFIX}sealed_at"),
                        rfc3339(crate::clock::from_unix_ns(s.sealed_at_ns)).into_bytes(),
                    );
                    self.retention_xattrs(run & !VIEW_RUN, &mut out)?;
                }
                if let Some(h) = e.blake3 {
                    out.insert(format!("{FACTS_PREFIX}blake3"), h.to_hex().into_bytes());
                }
            }
            Node::Namespace(id) => {
                let ns = self.ns_by_id(id)?;
                if let Some(r) = self.store.namespace_retention(&ns.name)? {
                    out.insert(RETAIN_XATTR.to_owned(), r.into_bytes());
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// A run's `user.retain`, `user.hold.*` and `user.artifactfs.retain_until`.
    fn retention_xattrs(&self, run: i64, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
        let Some(row) = self.store.index().run_by_id(run)? else {
            return Ok(());
        };
        let info = self.store.retention_info(&row.run)?;
        if let Some(r) = info.retain {
            out.insert(RETAIN_XATTR.to_owned(), r.into_bytes());
        }
        if let Some(u) = info.retain_until {
            out.insert(format!("{FACTS_PREFIX}retain_until"), u.into_bytes());
        }
        for h in info.holds {
            out.insert(format!("{HOLD_PREFIX}{}", h.name), h.reason.into_bytes());
        }
        Ok(())
    }

    /// `getxattr`.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        let name = name_str(name)?;
        let mut st = self.lock();
        let node = self.node(&st, ino)?;
        if !name.starts_with("user.") {
            if acl::is_acl(name) {
                // No ACL is stored (a minimal one sets the mode): the file has none.
                return Err(Error::NoAttr(name.to_owned()));
            }
            // Only user.* attributes exist in a store: ingest records no others and open runs
            // refuse them. Saying the namespace is unsupported (not that this one file lacks
            // the name) lets `ls -l` and `cp -a` stop asking for security labels on the rest
            // of the mount, one round trip per file; the kernel's security.capability probe
            // before a write takes it as "none".
            return Err(Error::Unsupported(format!(
                "xattr {name}: only user.* attributes are stored"
            )));
        }
        self.xattrs_of(&mut st, node)?
            .remove(name)
            .ok_or_else(|| Error::NoAttr(name.to_owned()))
    }

    /// `listxattr`: the names. An open run lists only what producers set: its `state` fact can
    /// still be read by name, but listing it would make `rsync -X` and `cp --preserve=all`
    /// try to remove or copy a read-only attribute. Sealed runs list their facts.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<String>> {
        let mut st = self.lock();
        let node = self.node(&st, ino)?;
        let hide_facts = matches!(node, Node::Open(_));
        // On an open run's directory `user.retain` and `user.hold.*` are the run's retention,
        // not content; on any other file they are attributes like the rest.
        let run_root = match node {
            Node::Open(i) => {
                let run = self.inode(i)?.run;
                self.meta(|m| m.run_root(run))? == Some(i)
            }
            _ => false,
        };
        let hidden = |k: &str| {
            k.starts_with(FACTS_PREFIX)
                || (run_root && (k == RETAIN_XATTR || k.starts_with(HOLD_PREFIX)))
        };
        Ok(self
            .xattrs_of(&mut st, node)?
            .into_keys()
            .filter(|k| !(hide_facts && hidden(k)))
            .collect())
    }

    /// `setxattr`; setting `user.artifactfs.seal` on an open run's directory seals it.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let name = name_str(name)?;
        let (mut st, node) = self.lock_mut(ino)?;
        if name == SEAL_XATTR
            && let Node::Open(i) = node
        {
            let run = self.inode(i)?.run;
            if self.meta(|m| m.run_root(run))? == Some(i) {
                if value != b"1" {
                    return Err(Error::invalid(name, "set it to 1 to seal the run"));
                }
                drop(st);
                return self.seal_id(run, "xattr").map(drop);
            }
        }
        self.change_xattr(&mut st, node, name, Some(value), flags)
    }

    /// `setxattr` of `system.posix_acl_access` by `ctx` (see [`acl`]): a minimal ACL sets the
    /// permission bits it states, as a `chmod` by its owner (or root) would; an ACL with named
    /// users or groups is refused (`EOPNOTSUPP`), bytes that are no ACL are invalid. Other
    /// names go to [`Vfs::setxattr`].
    pub fn set_access_acl(&self, ctx: Ctx, ino: u64, value: &[u8], flags: i32) -> Result<()> {
        let (mut st, node) = self.lock_mut(ino)?;
        let i = match self.writable(node, "setxattr") {
            Ok(i) => i,
            // Sealed runs and the control directory answer as for any xattr.
            Err(_) => return self.change_xattr(&mut st, node, acl::ACCESS, Some(value), flags),
        };
        let perms =
            acl::minimal_acl_mode(value).map_err(|e| refused_xattr(&mut st, acl::ACCESS, e))?;
        if flags & XATTR_REPLACE != 0 {
            // There is never a stored ACL to replace.
            return Err(Error::NoAttr(acl::ACCESS.to_owned()));
        }
        let mut row = self.inode(i)?;
        if let Some(p) = st.dirty_attrs.get(&i) {
            row = p.applied(row);
        }
        if ctx.uid != 0 && ctx.uid != row.uid {
            return Err(Error::NotPermitted(format!(
                "xattr {}: only the owner of inode {i} changes its permissions",
                acl::ACCESS
            )));
        }
        let mut mode = (row.mode & 0o7000) | perms;
        if ctx.uid != 0 && ctx.gid != row.gid {
            // As chmod: the set-group-ID bit stays only for members of the file's group.
            mode &= !0o2000;
        }
        // The chmod it is (deferred for an open file like any other).
        drop(st);
        let set = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        self.setattr(ino, set, None).map(drop)
    }

    /// `removexattr`.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let name = name_str(name)?;
        let (mut st, node) = self.lock_mut(ino)?;
        self.change_xattr(&mut st, node, name, None, 0)
    }

    fn change_xattr(
        &self,
        st: &mut State,
        node: Node,
        name: &str,
        value: Option<&[u8]>,
        flags: i32,
    ) -> Result<()> {
        if (name == RETAIN_XATTR || name.starts_with(HOLD_PREFIX))
            && let Some(target) = self.retention_target(node)?
        {
            let res = self.change_retention(target, name, value, flags);
            if let Err(e) = &res
                && !matches!(e, Error::NoAttr(_))
            {
                tracing::warn!("refused: xattr {name}: {e}");
            }
            return res;
        }
        let i = match node {
            Node::Open(i) => i,
            Node::Sealed { run, .. } => {
                let e = Error::NotPermitted(format!("xattr {name}: run {run} is sealed"));
                tracing::warn!("refused: {e}");
                return Err(e);
            }
            Node::Namespace(_) => {
                let e = Error::Unsupported(format!(
                    "xattr {name} on a namespace: only user.retain, the default retention of its new runs, is kept there"
                ));
                tracing::warn!("refused: {e}");
                return Err(e);
            }
            _ => {
                return Err(Error::NotPermitted(format!(
                    "xattr {name}: not on this directory"
                )));
            }
        };
        if !name.starts_with("user.") {
            if acl::is_acl(name) && value.is_none() {
                // No ACL is stored (a minimal one sets the mode): there is none to remove.
                return Err(Error::NoAttr(name.to_owned()));
            }
            let e = Error::Unsupported(format!("xattr {name}: only user.* attributes are stored"));
            return Err(refused_xattr(st, name, e));
        }
        let mut row = self.inode(i)?;
        if value.is_some()
            && name
                .strip_prefix(FACTS_PREFIX)
                .is_some_and(|f| DERIVED_FACTS.contains(&f))
        {
            // A copy of a sealed tree (`rsync -aX`, `cp --preserve=xattr`) carries the facts
            // along; they are derived, so the new run's own replace them at its seal.
            tracing::debug!(
                run = row.run,
                ino = i,
                "xattr {name}: a derived fact, not stored"
            );
            return Ok(());
        }
        if name.starts_with(FACTS_PREFIX) {
            let e = Error::invalid(
                format!("xattr {name}"),
                "user.artifactfs.* attributes are read-only facts (user.artifactfs.seal on a run directory seals it)",
            );
            tracing::warn!(run = row.run, ino = i, "refused: {e}");
            return Err(e);
        }
        let exists = row.xattrs.contains_key(name);
        match value {
            Some(v) => {
                if flags & XATTR_CREATE != 0 && exists {
                    return Err(Error::AlreadyExists(format!("xattr {name}")));
                }
                if flags & XATTR_REPLACE != 0 && !exists {
                    return Err(Error::NoAttr(name.to_owned()));
                }
                row.xattrs
                    .insert(name.to_owned(), XattrValue::from_bytes(v));
            }
            None => {
                if row.xattrs.remove(name).is_none() {
                    return Err(Error::NoAttr(name.to_owned()));
                }
            }
        }
        row.ctime_ns = self.now();
        if let Some(t) = st.dirty_mtime.get(&i) {
            row.mtime_ns = *t;
        }
        self.meta_write(|m| m.update_inode(&row))?;
        self.touch(st, row.run);
        Ok(())
    }

    /// What a `user.retain` or `user.hold.*` xattr on `node` applies to: a run (its directory)
    /// or a namespace's default. `None` for other nodes (files keep such names as plain xattrs).
    fn retention_target(&self, node: Node) -> Result<Option<RetentionTarget>> {
        Ok(match node {
            Node::Open(i) => {
                let row = self.inode(i)?;
                if self.meta(|m| m.run_root(row.run))? != Some(i) {
                    return Ok(None);
                }
                let run = self
                    .store
                    .index()
                    .run_by_id(row.run)?
                    .ok_or_else(|| Error::NotFound(format!("run {}", row.run)))?;
                Some(RetentionTarget::Run(run.run))
            }
            Node::Sealed { run, idx: 0 } if run & VIEW_RUN == 0 => {
                let run = self
                    .store
                    .index()
                    .run_by_id(run)?
                    .filter(|r| r.state != "deleted")
                    .ok_or_else(|| Error::NotFound(format!("run {run}")))?;
                Some(RetentionTarget::Run(run.run))
            }
            Node::Namespace(id) => Some(RetentionTarget::Namespace(self.ns_by_id(id)?.name)),
            _ => None,
        })
    }

    fn change_retention(
        &self,
        target: RetentionTarget,
        name: &str,
        value: Option<&[u8]>,
        flags: i32,
    ) -> Result<()> {
        let text = |v: &[u8]| {
            std::str::from_utf8(v)
                .map(str::to_owned)
                .map_err(|_| Error::invalid(name, "the value is not UTF-8 text"))
        };
        let check_flags = |exists: bool| {
            if value.is_some() && flags & XATTR_CREATE != 0 && exists {
                return Err(Error::AlreadyExists(format!("xattr {name}")));
            }
            if value.is_some() && flags & XATTR_REPLACE != 0 && !exists {
                return Err(Error::NoAttr(name.to_owned()));
            }
            Ok(())
        };
        match target {
            RetentionTarget::Namespace(ns) => {
                if name != RETAIN_XATTR {
                    return Err(Error::Unsupported(format!(
                        "xattr {name} on namespace {ns}: holds are placed on runs"
                    )));
                }
                let current = self.store.namespace_retention(&ns)?;
                check_flags(current.is_some())?;
                match value {
                    Some(v) => self.store.set_namespace_retention(&ns, Some(&text(v)?)),
                    None if current.is_none() => Err(Error::NoAttr(name.to_owned())),
                    None => self.store.set_namespace_retention(&ns, None),
                }
            }
            RetentionTarget::Run(r) => {
                if let Some(hold) = name.strip_prefix(HOLD_PREFIX) {
                    let exists = self.store.holds(&r)?.iter().any(|h| h.name == hold);
                    check_flags(exists)?;
                    return match value {
                        Some(v) => self.store.place_hold(&r, hold, v),
                        None => self.store.remove_hold(&r, hold),
                    };
                }
                let current = self.store.retention_info(&r)?;
                check_flags(current.retain.is_some())?;
                match value {
                    Some(v) => self.store.set_retention(&r, &text(v)?, None).map(drop),
                    None if current.retain.is_none() => Err(Error::NoAttr(name.to_owned())),
                    None => Err(Error::NotPermitted(format!(
                        "run {r}: retention cannot be removed, only extended (it is {})",
                        current.retain.unwrap_or_default()
                    ))),
                }
            }
        }
    }

    /// Seals run `r` now (explicit request); `Busy` if any of its files is open.
    pub fn seal(&self, r: &RunRef) -> Result<ManifestDigest> {
        let (id, _) = self
            .meta(|m| m.run_of(&r.namespace, &r.run))?
            .ok_or_else(|| Error::NotFound(format!("run {r}")))?;
        self.seal_id(id, "request")
    }

    /// Seals the open runs that are due: quiet for `seal_after`, or whose marker was closed,
    /// with no file open. Call about once a second.
    pub fn tick(&self) {
        self.store.keep_reserve();
        self.store
            .index_deferred()
            .commit_journal_after(crate::index::JOURNAL_BATCH_AGE);
        let due: Vec<(i64, &str)> = {
            let st = self.lock();
            st.runs
                .iter()
                .filter(|(id, a)| {
                    !st.sealing.contains(id)
                        && a.open == 0
                        && (a.seal_requested || a.last.elapsed() >= self.opts.seal_after)
                })
                .map(|(id, a)| (*id, if a.seal_requested { "marker" } else { "quiet" }))
                .collect()
        };
        for (id, why) in due {
            match self.seal_id(id, why) {
                Ok(_) => {}
                // Opened since it was found due (it is not quiet any more), or sealed meanwhile
                // by an explicit request.
                Err(Error::Busy(_) | Error::ReadOnly(_)) => {}
                Err(e) => {
                    tracing::warn!(
                        run = id,
                        "automatic seal failed, retrying after the quiet period: {e}"
                    );
                    if let Some(a) = self.lock().runs.get_mut(&id) {
                        a.last = Instant::now();
                        a.seal_requested = false;
                    }
                }
            }
        }
    }

    /// Locks the state for a change of `ino`. While the run `ino` belongs to is being sealed,
    /// waits for the seal to end, so that the change then meets the sealed run (EROFS) or,
    /// if the seal failed, the open run as it was.
    fn lock_mut(&self, ino: u64) -> Result<(MutexGuard<'_, State>, Node)> {
        let mut st = self.lock();
        loop {
            let node = self.node(&st, ino)?;
            let Node::Open(i) = node else {
                return Ok((st, node));
            };
            if st.sealing.is_empty() || !st.sealing.contains(&self.inode(i)?.run) {
                return Ok((st, node));
            }
            st = self.sealed_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Seals open run `run_id`. The run is frozen (changes wait in [`Vfs::lock_mut`], see
    /// there) while its files are chunked and packed without the state lock, so the rest of
    /// the mount goes on; only the index commit and the switch of inode numbers hold it.
    fn seal_id(&self, run_id: i64, why: &str) -> Result<ManifestDigest> {
        let mut st = self.lock();
        let deadline = Instant::now() + RELEASE_GRACE;
        let r = loop {
            while st.sealing.contains(&run_id) {
                st = self.sealed_cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            let row = self
                .store
                .index()
                .run_by_id(run_id)?
                .ok_or_else(|| Error::NotFound(format!("run {run_id}")))?;
            let r = row.run.clone();
            if row.state != "open" {
                st.runs.remove(&run_id);
                // An explicit request is met by a seal that came first (another request, one
                // it waited for above, or the quiet period): the run is sealed.
                if let (false, "sealed", Some(d)) = (
                    matches!(why, "quiet" | "marker"),
                    row.state.as_str(),
                    row.manifest,
                ) {
                    return Ok(d);
                }
                return Err(Error::ReadOnly(format!("run {r} is already {}", row.state)));
            }
            let open = st.runs.get(&run_id).map_or(0, |a| a.open);
            if open == 0 {
                break r;
            }
            // The kernel sends a file's release after its close has returned: a seal right
            // after the last close may come first. It waits for releases a moment.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = Error::Busy(format!(
                    "run {r} has {open} open files; close them before sealing"
                ));
                tracing::warn!(run = %r, "seal refused: {e}");
                return Err(e);
            }
            st = self
                .sealed_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        st.sealing.insert(run_id);
        drop(st);
        // Its files are closed: what is still queued to be chunked ahead, the seal chunks.
        self.preseal.quiesce(run_id);
        #[cfg(test)]
        if let Some(hook) = &*self.seal_hook.lock().unwrap_or_else(|p| p.into_inner()) {
            hook(run_id);
        }
        let started = Instant::now();
        // Whatever happens in the build, the run must not stay frozen.
        // Held until the commit: gc does not sweep a chunk this seal found stored.
        let guard = self.store.seal_guard();
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            build_seal(
                &self.store,
                &guard,
                &self.staging,
                run_id,
                &r,
                Some(&self.preseal),
            )
        }))
        .unwrap_or_else(|_| Err(Error::Internal(format!("the seal of run {r} panicked"))));
        let mut st = self.lock();
        st.sealing.remove(&run_id);
        self.sealed_cv.notify_all();
        let b = built?;
        commit_seal(&self.store, run_id, &b)?;
        // The run's directories are gone from the open-run tables.
        self.subdirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        drop(guard);
        st.runs.remove(&run_id);
        self.preseal.forget_run(run_id);
        let s = self.sealed_run(&mut st, run_id)?;
        for (path, ino) in &b.paths {
            if let Some(idx) = s.by_path.get(path) {
                st.redirect.insert(
                    encode(Node::Open(*ino)),
                    encode(Node::Sealed {
                        run: run_id,
                        idx: s.resolved[*idx],
                    }),
                );
            }
            st.dirty_mtime.remove(ino);
            st.dirty_attrs.remove(ino);
        }
        drop(st);
        remove_staging(&self.staging, run_id);
        tracing::info!(
            run = %r, manifest = %b.digest, why, entries = b.manifest.entries.len(),
            raw_bytes = b.manifest.raw_bytes(), new_bytes = b.pack_bytes,
            ms = started.elapsed().as_millis() as u64, "run sealed"
        );
        Ok(b.digest)
    }
}

/// What sealing an open run prepared before its commit.
struct BuiltSeal {
    manifest: Manifest,
    digest: ManifestDigest,
    /// Every path of the run with its open-run inode.
    paths: Vec<(String, i64)>,
    pack_bytes: u64,
}

/// Seals an open run of a store that no mount serves (one a mount left open): the same
/// manifest and commit as a seal in the mount.
pub fn seal_offline(store: &Store, r: &RunRef) -> Result<ManifestDigest> {
    let (id, state) = store
        .index()
        .meta(|m| m.run_of(&r.namespace, &r.run))?
        .ok_or_else(|| Error::NotFound(format!("run {r}")))?;
    if state != "open" {
        return Err(Error::ReadOnly(format!("run {r} is already {state}")));
    }
    let staging = store.staging_dir();
    let guard = store.seal_guard();
    let b = build_seal(store, &guard, &staging, id, r, None)?;
    commit_seal(store, id, &b)?;
    drop(guard);
    remove_staging(&staging, id);
    tracing::info!(run = %r, manifest = %b.digest, entries = b.manifest.entries.len(), "run sealed");
    Ok(b.digest)
}

/// Reads an open run's tree from the index, streams its staged files through the chunk
/// pipeline, and stores its manifest: everything of a seal but the index commit. The run must
/// not change meanwhile.
fn build_seal(
    store: &Store,
    guard: &crate::gc::SealGuard,
    staging: &Path,
    run_id: i64,
    r: &RunRef,
    pre: Option<&preseal::PreSeal>,
) -> Result<BuiltSeal> {
    let (inodes, dentries, root) = store.index().meta(|m| {
        Ok((
            m.run_inodes(run_id)?,
            m.run_dentries(run_id)?,
            m.run_root(run_id)?,
        ))
    })?;
    let root =
        root.ok_or_else(|| Error::corrupt(format!("run {r}"), "open run without a root inode"))?;
    let rows: HashMap<i64, InodeRow> = inodes.into_iter().map(|i| (i.ino, i)).collect();
    let mut kids: HashMap<i64, Vec<(String, i64)>> = HashMap::new();
    let mut names: HashMap<i64, u32> = HashMap::new();
    for (p, n, i) in dentries {
        kids.entry(p).or_default().push((n, i));
        *names.entry(i).or_default() += 1;
    }
    let mut paths: Vec<(String, i64)> = vec![(ROOT.to_owned(), root)];
    let mut stack = vec![(root, String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for (n, i) in kids.remove(&dir).unwrap_or_default() {
            let p = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            if rows.get(&i).is_some_and(|r| r.kind == Kind::Dir) {
                stack.push((i, p.clone()));
            }
            paths.push((p, i));
        }
    }
    paths.sort_by(|a, b| (a.0 != ROOT, a.0.as_bytes()).cmp(&(b.0 != ROOT, b.0.as_bytes())));

    let run_staging = staging.join(run_id.to_string());
    let mut writer = store.writer(guard);
    let mut entries = Vec::with_capacity(paths.len());
    let mut first_name: HashMap<i64, String> = HashMap::new();
    for (path, ino) in &paths {
        let i = rows.get(ino).ok_or_else(|| {
            Error::corrupt(
                format!("run {r}"),
                format!("{path} names missing inode {ino}"),
            )
        })?;
        let mut e = Entry {
            path: path.clone(),
            kind: i.kind,
            mode: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            size: 0,
            mtime_ns: i.mtime_ns,
            blake3: None,
            chunks: Vec::new(),
            target: None,
            rdev: None,
            xattrs: i
                .xattrs
                .iter()
                .filter(|(k, _)| k.starts_with("user."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        // Every name of an inode after its first (in path order) is a link to that first
        // name, whatever the inode's type.
        if i.kind != Kind::Dir && names.get(ino).copied().unwrap_or(1) > 1 {
            if let Some(first) = first_name.get(ino) {
                e.kind = Kind::Hardlink;
                e.target = Some(first.clone());
                e.xattrs.clear();
                entries.push(e);
                continue;
            }
            first_name.insert(*ino, path.clone());
        }
        match i.kind {
            Kind::File => {
                // Kept as a chunk list (ADR 0025), whose rows hold its chunks' references; else
                // chunked ahead (ADR 0015) and still stored; else chunked now.
                let chunked = store.index().meta(|m| m.chunked(*ino))?;
                let ahead = match pre.and_then(|p| p.result(*ino)) {
                    Some(d) if chunked.is_none() && chunks_present(store, &d.chunks)? => Some(d),
                    _ => None,
                };
                let (size, hash, chunks) = match (chunked, ahead) {
                    (Some(c), _) => (c.size, c.hash, c.chunks),
                    (None, Some(d)) => (d.size, d.hash, d.chunks),
                    (None, None) => {
                        let sp = run_staging.join(ino.to_string());
                        let inline = store.index().meta(|m| m.inline_data(*ino))?;
                        match inline {
                            Some(d) => ingest_stream(store, &mut writer, &d[..], &NoProgress, &sp)?,
                            None => {
                                let f =
                                    File::open(&sp).map_err(|err| Error::io("open", &sp, err))?;
                                ingest_stream(store, &mut writer, f, &NoProgress, &sp)?
                            }
                        }
                    }
                };
                e.size = size;
                e.blake3 = Some(hash);
                e.chunks = chunks;
            }
            Kind::Symlink => {
                let t = i.target.clone().unwrap_or_default();
                e.size = t.len() as u64;
                e.target = Some(t);
            }
            Kind::Char | Kind::Block => e.rdev = Some(i.rdev),
            _ => {}
        }
        entries.push(e);
    }
    let stats = writer.finish()?;
    let mut metadata = BTreeMap::new();
    if let Some(root) = entries.first() {
        for (k, v) in producer_metadata(&root.xattrs) {
            metadata.entry(k).or_insert(v);
        }
    }
    let mut m = Manifest {
        format: MANIFEST_FORMAT,
        namespace: r.namespace.clone(),
        run: r.run.clone(),
        sealed_at: rfc3339(store.clock().now()),
        metadata,
        entries,
    };
    m.canonicalize();
    let bytes = m.canonical_bytes()?;
    let (digest, _) = manifest::store_manifest(&*store.objects, &bytes)?;
    Ok(BuiltSeal {
        manifest: m,
        digest,
        paths,
        pack_bytes: stats.pack_bytes,
    })
}

/// Whether every chunk of a file chunked ahead of its seal is still in the index (gc sweeps
/// unreferenced chunks). Called under the seal guard, so none goes before the commit.
fn chunks_present(store: &Store, chunks: &[crate::manifest::ChunkRef]) -> Result<bool> {
    let index = store.index();
    for c in chunks {
        if !index.has_chunk(&c.0)? {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Drop for Vfs {
    /// Files still being chunked as they are written (open when the mount went away) keep
    /// what was written to them, as their staging files would have. Files without a name
    /// that the kernel still knew (it forgets nothing at unmount) go.
    fn drop(&mut self) {
        let mut st = self.lock();
        let streaming: Vec<i64> = st.streams.keys().copied().collect();
        for inode in streaming {
            if let Err(e) = self.close_stream(&mut st, inode) {
                tracing::error!(
                    inode,
                    "at unmount, a file being written was not stored: {e}"
                );
            }
        }
        if let Err(e) = remove_unlinked_inodes(&self.store, &self.staging) {
            tracing::warn!("at unmount, unlinked files stay for the next start to remove: {e}");
        }
    }
}

/// Removes the inodes of open runs that have no name left (unlinked while open or known to
/// the kernel), with their staging files; returns how many. Only when no handle is open: at
/// the start of a mount, and at its end.
fn remove_unlinked_inodes(store: &Store, staging: &Path) -> Result<usize> {
    let orphans = store.index().meta(|m| m.orphan_inodes())?;
    if orphans.is_empty() {
        return Ok(0);
    }
    store.freeing("removing unlinked inodes", || {
        store.index().meta_write(|m| {
            for (_, ino) in &orphans {
                m.delete_inode(*ino)?;
            }
            Ok(())
        })
    })?;
    for (run, ino) in &orphans {
        let _ = fs::remove_file(staging.join(run.to_string()).join(ino.to_string()));
    }
    Ok(orphans.len())
}

/// Commits a built seal: one index transaction.
fn commit_seal(store: &Store, run_id: i64, b: &BuiltSeal) -> Result<()> {
    let m = &b.manifest;
    let (at, detail) = store.seal_record(m, &b.digest);
    store
        .index()
        .seal_open_run(run_id, m, &b.digest, at, detail)?;
    store.record_lifecycle();
    // The run's inline file contents left the index: give the space back.
    if let Err(e) = store.index().reclaim_space() {
        tracing::warn!(run = run_id, "sealed; the index keeps its free pages: {e}");
    }
    Ok(())
}

/// Removes a sealed run's staging files (after its commit: a crash before this leaves a
/// directory that the next [`Vfs::new`] removes).
fn remove_staging(staging: &Path, run_id: i64) {
    let dir = staging.join(run_id.to_string());
    if let Err(e) = fs::remove_dir_all(&dir) {
        tracing::warn!(
            run = run_id,
            "its staging directory {} stays (a sealed run's is removed at the next mount): {e}",
            dir.display()
        );
    }
}

/// Removes the staging directories of runs that are sealed (or deleted): what a crash between
/// a seal's commit and the removal of its staging files leaves. Directories of open runs stay,
/// and so does anything that is not a run's directory (with a warning).
fn remove_sealed_staging(store: &Store, staging: &Path) -> Result<()> {
    let rd = fs::read_dir(staging).map_err(|e| Error::io("read directory", staging, e))?;
    let mut removed = 0;
    for d in rd {
        let d = d.map_err(|e| Error::io("read directory", staging, e))?;
        let name = d.file_name();
        let Some(id) = name.to_str().and_then(|n| n.parse::<i64>().ok()) else {
            tracing::warn!(path = %d.path().display(), "not a run's staging directory; left alone");
            continue;
        };
        match store.index().run_by_id(id)? {
            Some(row) if row.state != "open" => {
                let p = d.path();
                fs::remove_dir_all(&p).map_err(|e| Error::io("remove", &p, e))?;
                tracing::info!(run = %row.run, "removed the staging files of a sealed run");
                removed += 1;
            }
            Some(_) => {}
            None => {
                tracing::warn!(path = %d.path().display(), "staging directory of an unknown run; left alone");
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            runs = removed,
            "removed staging files left by a crash after a seal"
        );
    }
    Ok(())
}

/// Swaps the entries `from/name` and `to/newname` (both must exist) in one transaction.
/// Refuses to move directory `dir` under `parent` when `parent` is `dir` or inside it.
fn refuse_move_into_itself(
    m: &crate::index::Meta<'_>,
    dir: i64,
    parent: i64,
    what: &str,
) -> Result<()> {
    let mut cur = Some(parent);
    while let Some(c) = cur {
        if c == dir {
            return Err(Error::invalid(
                "rename",
                format!("{what} would move into itself"),
            ));
        }
        cur = m.parent_of(c)?;
    }
    Ok(())
}

fn exchange_names(
    m: &crate::index::Meta<'_>,
    from: i64,
    name: &str,
    to: i64,
    newname: &str,
    now: i64,
) -> Result<()> {
    let a = m
        .lookup(from, name)?
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    let b = m
        .lookup(to, newname)?
        .ok_or_else(|| Error::NotFound(newname.to_owned()))?;
    if a == b {
        return Ok(());
    }
    // A directory must not end up inside itself: `a` moves under `to`, `b` under `from`.
    for (dir, parent, what) in [(a, to, name), (b, from, newname)] {
        refuse_move_into_itself(m, dir, parent, what)?;
    }
    m.set_dentry(from, name, b)?;
    m.set_dentry(to, newname, a)?;
    for ino in [a, b] {
        let mut row = m
            .inode(ino)?
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
        row.ctime_ns = now;
        m.update_inode(&row)?;
    }
    m.set_times(from, now, now)?;
    m.set_times(to, now, now)
}

mod acl;
mod preseal;
mod stream;
#[cfg(test)]
mod tests;
