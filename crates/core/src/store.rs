//! A store: one directory holding the config, the lock, the SQLite index and (for the local
//! backend) the objects. One process owns a store at a time: `open` takes an exclusive lock on
//! `STORE/lock` and fails with [`Error::Locked`] if another process holds it.
//!
//! ```text
//! STORE/config.toml      format version, store id, chunker and compression settings
//! STORE/lock             flock()ed by the owner; holds its pid for messages
//! STORE/index.sqlite     the index (WAL)
//! STORE/objects/         the local object store: packs/…, manifests/…
//! STORE/reserve          allocated room given back when deletions hit a full disk
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::clock::{Clock, SystemClock, to_unix_ns};
use crate::error::{Error, Result};
use crate::id::ManifestDigest;
use crate::index::{Index, IndexStats, ReadPool, RunRow, SharedIndex};
use crate::manifest::{self, Entry, Kind, Manifest};
use crate::names::RunRef;
use crate::objstore::{LocalStore, ObjectStore};
use crate::pack;
use crate::writer::{ChunkWriter, WriterConfig};

/// Version of the store layout written by this build.
pub const STORE_FORMAT: u32 = 1;

/// Settings fixed at `init`, kept in `config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format: u32,
    pub store_id: String,
    pub chunker: ChunkerParams,
    /// zstd level for chunks (0 stores everything raw).
    pub compression_level: i32,
    /// Packs are written once they reach this many bytes.
    pub pack_target_size: u64,
    /// Retention of new runs without a namespace default (a duration such as `90d`, or
    /// `forever`); without one, such runs are kept until a retention is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_retention: Option<String>,
    /// The remote tier, when the local store is a cache in front of one (`crate::tier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<crate::tier::TierConfig>,
}

/// Options for [`Store::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression_level: i32,
    pub pack_target_size: u64,
    pub default_retention: Option<String>,
    /// A remote tier to record in `config.toml` (see [`Store::init_tiered`]).
    pub tier: Option<crate::tier::TierConfig>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerParams::default(),
            // zstd 2 stores what 3 stores, at 18% less CPU on new data (ADR 0030).
            compression_level: 2,
            pack_target_size: 16 * 1024 * 1024,
            default_retention: None,
            tier: None,
        }
    }
}

/// Progress reporting hooks for long operations; frontends draw bars with them.
pub trait Progress: Sync {
    /// The total amount of work, in bytes, once known.
    fn set_total(&self, _bytes: u64) {}
    /// Work done since the last call.
    fn inc(&self, _bytes: u64) {}
    /// Whether whoever asked for the work has gone away (a forwarded command's client was
    /// killed): work that commits something (an ingest) then stops before committing, with
    /// [`Error::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Free space on a store's disk (see [`Store::disk_space`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes still free for the store's writes.
    pub free_bytes: u64,
    /// Whether `STORE/reserve` is in place; false after a deletion on a full disk used it, until
    /// there is room to make it again (ADR 0023).
    pub reserve_held: bool,
}

/// An open store.
pub struct Store {
    root: PathBuf,
    config: StoreConfig,
    /// Read-only connections for lookups of committed state (ADR 0019); dropped before the
    /// read-write connection, which then checkpoints the WAL as the last one closed.
    pub(crate) reads: Arc<ReadPool>,
    pub(crate) index: Arc<SharedIndex>,
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Keeps gc's sweep and seals apart (see `gc`).
    pub(crate) gate: Arc<crate::gc::Gate>,
    /// One gc at a time.
    pub(crate) gc_lock: Mutex<()>,
    /// One writer of an untiered store's local lifecycle records at a time.
    pub(crate) lifecycle_lock: Mutex<()>,
    pub(crate) tier: Option<Arc<crate::tier::Tier>>,
    /// Room kept so that deletions commit on a full disk (`crate::reserve`).
    pub(crate) reserve: crate::reserve::Reserve,
    _lock: File,
}

/// Opens the index. SQLite needs room on the disk to open it (its WAL index, `-shm`, is made
/// and sized at open): on a full disk the open fails, and then the store's reserve is given
/// back and the open tried once more, so that reads, exports and the deletions that make room
/// (`gc`) still work; without a reserve to give, the failure is ENOSPC (ADR 0023).
fn open_index(
    root: &Path,
    path: &Path,
    create: bool,
    reserve: &crate::reserve::Reserve,
) -> Result<Index> {
    let e = match Index::open(path, create) {
        Ok(index) => return Ok(index),
        Err(e) => e,
    };
    let full =
        crate::reserve::free_bytes(root).is_ok_and(|free| free < crate::reserve::RESERVE_BYTES);
    if !full {
        return Err(e);
    }
    if reserve.release() {
        tracing::warn!(
            "the store's disk is full ({e}): released its reserve of {} MiB to open the index; free space or remove runs (`artifactfs gc`)",
            crate::reserve::RESERVE_BYTES >> 20
        );
        return Index::open(path, create);
    }
    Err(Error::disk_full("open the index (the disk is full)", path))
}

fn config_path(root: &Path) -> PathBuf {
    root.join("config.toml")
}

impl Store {
    /// Creates a new store in `root` (which may exist but must be empty) and opens it.
    pub fn init(root: &Path, opts: &InitOptions) -> Result<Self> {
        opts.chunker.validate()?;
        if !(0..=19).contains(&opts.compression_level) {
            return Err(Error::invalid(
                "compression level",
                format!("{} (0..=19)", opts.compression_level),
            ));
        }
        if !(1 << 20..=1 << 30).contains(&opts.pack_target_size) {
            return Err(Error::invalid(
                "pack target size",
                format!("{} (1 MiB ..= 1 GiB)", opts.pack_target_size),
            ));
        }
        if let Some(d) = &opts.default_retention {
            crate::gc::parse_default_retention(d, to_unix_ns(std::time::SystemTime::now()))?;
        }
        if root.exists() {
            let mut rd = fs::read_dir(root).map_err(|e| Error::io("read directory", root, e))?;
            if rd.next().is_some() {
                if config_path(root).exists() {
                    return Err(Error::AlreadyExists(format!(
                        "store {} (already initialised)",
                        root.display()
                    )));
                }
                return Err(Error::invalid(
                    "store directory",
                    format!("{} exists and is not empty", root.display()),
                ));
            }
        }
        fs::create_dir_all(root).map_err(|e| Error::io("create directory", root, e))?;
        let config = StoreConfig {
            format: STORE_FORMAT,
            store_id: format!("{:032x}", rand::random::<u128>()),
            chunker: opts.chunker,
            compression_level: opts.compression_level,
            pack_target_size: opts.pack_target_size,
            default_retention: opts.default_retention.as_ref().map(|d| d.trim().to_owned()),
            tier: opts.tier.clone(),
        };
        let text = toml::to_string_pretty(&config)
            .map_err(|e| Error::Internal(format!("config encode: {e}")))?;
        let tmp = root.join("config.toml.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(b"# artifactfs store configuration; written by `artifactfs init`.\n")?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|e| Error::io("write", &tmp, e))?;
        fs::rename(&tmp, config_path(root))
            .map_err(|e| Error::io("rename into place", config_path(root), e))?;
        crate::objstore::sync_dir(root)?;
        tracing::info!(store = %root.display(), id = %config.store_id, "store initialised");
        let objects = Arc::new(LocalStore::open(root.join("objects"))?);
        Self::open_inner(root, objects, Arc::new(SystemClock), true)
    }

    /// Opens an existing store with the local object store and the system clock.
    pub fn open(root: &Path) -> Result<Self> {
        if let Some(t) = read_config(root)?.tier {
            // This caller has no client for the remote tier: local data stays readable.
            let remote = crate::tier::Unconnected::new(t.backend, "no client for the remote tier");
            return Self::open_tiered(root, Arc::new(remote));
        }
        let objects = Arc::new(LocalStore::open(root.join("objects"))?);
        Self::open_with(root, objects, Arc::new(SystemClock))
    }

    /// Opens an existing store with the local object store and the given clock.
    pub fn open_with_clock(root: &Path, clock: Arc<dyn Clock>) -> Result<Self> {
        if let Some(t) = read_config(root)?.tier {
            let remote = crate::tier::Unconnected::new(t.backend, "no client for the remote tier");
            return Self::open_tiered_with_clock(root, Arc::new(remote), clock);
        }
        let objects = Arc::new(LocalStore::open(root.join("objects"))?);
        Self::open_with(root, objects, clock)
    }

    /// Opens an existing store with the given object store and clock.
    pub fn open_with(
        root: &Path,
        objects: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let store = Self::open_inner(root, objects, clock, false)?;
        // Records a crash kept from being written.
        store.record_lifecycle();
        Ok(store)
    }

    pub(crate) fn open_inner(
        root: &Path,
        objects: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
        new_index: bool,
    ) -> Result<Self> {
        read_config(root)?;
        let lock = take_lock(root)?;
        Self::open_locked(root, lock, objects, clock, new_index)
    }

    /// [`Store::open_inner`] with the lock already taken.
    pub(crate) fn open_locked(
        root: &Path,
        lock: File,
        objects: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
        new_index: bool,
    ) -> Result<Self> {
        let config = read_config(root)?;
        let index_path = root.join("index.sqlite");
        if !new_index && root.join(crate::rebuild::REBUILDING).exists() {
            return Err(Error::Index {
                path: index_path,
                message: "an index rebuild was interrupted and the index may be partial; run `artifactfs index rebuild`".into(),
            });
        }
        let reserve = crate::reserve::Reserve::new(root);
        let mut index = open_index(root, &index_path, new_index, &reserve)?;
        if let Some(spec) = &config.default_retention {
            let retention = crate::gc::parse_default_retention(spec, to_unix_ns(clock.now()))
                .map_err(|e| Error::invalid("default_retention in config.toml", e.to_string()))?;
            index.set_default_retention(Some(crate::index::DefaultRetention {
                spec: spec.clone(),
                retention,
            }));
        }
        // A crash of the mount may have left closed files in the journal only (ADR 0031).
        index.open_journal(new_index)?;
        crate::objstore::remove_stale_temp_files(&root.join("objects"));
        reserve.ensure();
        Ok(Self {
            root: root.to_path_buf(),
            config,
            reads: Arc::new(ReadPool::new(&index_path, read_connections())),
            index: Arc::new(SharedIndex::new(index)),
            objects,
            clock,
            gate: Arc::default(),
            gc_lock: Mutex::new(()),
            lifecycle_lock: Mutex::new(()),
            tier: None,
            reserve,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs `f`, a change that frees space (a deletion); if it fails because the disk is full,
    /// gives back the store's reserve and runs it once more (`crate::reserve`).
    pub fn freeing<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        match f() {
            Err(e) if e.is_disk_full() && self.reserve.release() => {
                tracing::warn!(
                    "the store's disk is full ({e}): released its reserve of {} MiB so that {what} can go on; free space or remove runs (`artifactfs gc`)",
                    crate::reserve::RESERVE_BYTES >> 20
                );
                f()
            }
            r => r,
        }
    }

    /// Makes the store's reserve again once the disk has room for it (call now and then).
    pub fn keep_reserve(&self) {
        self.reserve.ensure();
    }

    /// Free space on the store's disk, and whether its reserve is in place.
    pub fn disk_space(&self) -> Result<DiskSpace> {
        let free_bytes = crate::reserve::free_bytes(&self.root)
            .map_err(|e| Error::io("read the free space of", &self.root, e))?;
        Ok(DiskSpace {
            free_bytes,
            reserve_held: self.reserve.held(),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn objects(&self) -> &dyn ObjectStore {
        &*self.objects
    }

    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    pub(crate) fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock()
    }

    /// Runs `f` over a read-only connection of the pool (ADR 0019): it sees committed state
    /// only, never waits for the writer, and is not serialised with other readers. If the pool
    /// cannot lend a connection, `f` runs over the shared one (the reason is logged once).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Index) -> Result<T>) -> Result<T> {
        self.reads.read_or(&self.index, f)
    }

    /// The pool of read-only index connections (ADR 0019).
    pub fn read_pool(&self) -> &ReadPool {
        &self.reads
    }

    /// The index without committing the view's deferred transaction: for the view's reads and
    /// writes, which belong inside it (see [`SharedIndex`]).
    pub(crate) fn index_deferred(&self) -> MutexGuard<'_, Index> {
        self.index.lock_deferred()
    }

    /// A write pipeline for new chunks. The caller holds a [`crate::gc::SealGuard`] from now
    /// until the run that references the chunks commits, so gc cannot sweep a chunk the writer
    /// found already stored.
    pub fn writer(&self, seal: &crate::gc::SealGuard) -> ChunkWriter {
        self.writer_with_lanes(seal, 1)
    }

    /// As [`Store::writer`], for `lanes` readers submitting at once (see
    /// [`WriterConfig::lanes`]).
    pub fn writer_with_lanes(&self, _seal: &crate::gc::SealGuard, lanes: usize) -> ChunkWriter {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        ChunkWriter::new(
            self.index.clone(),
            self.reads.clone(),
            self.objects.clone(),
            self.clock.clone(),
            WriterConfig {
                compression_level: self.config.compression_level,
                pack_target_size: self.config.pack_target_size,
                workers,
                lanes,
            },
        )
    }

    /// Records a sealed run: stores the manifest, then commits the run to the index.
    /// All chunks it names must already be durable (a finished [`ChunkWriter`]).
    pub fn commit_manifest(&self, m: &mut Manifest) -> Result<(ManifestDigest, u64)> {
        m.canonicalize();
        let bytes = m.canonical_bytes()?;
        let digest = ManifestDigest::of(&bytes);
        let (at, detail) = self.seal_record(m, &digest);
        // The manifest is compressed and stored (durably) while the index writes the run's
        // rows; the index commits only after the manifest is durable, as if one followed the
        // other.
        let stored = std::thread::scope(|s| -> Result<u64> {
            let objects = &*self.objects;
            let put = std::thread::Builder::new()
                .name("afs-manifest".into())
                .spawn_scoped(s, || manifest::store_manifest(objects, &bytes))
                .map_err(|e| Error::Internal(format!("spawn manifest writer: {e}")))?;
            let mut stored = 0;
            let ready = || -> Result<()> {
                let (put_digest, n) = put
                    .join()
                    .map_err(|_| Error::Internal("manifest writer panicked".into()))??;
                debug_assert_eq!(put_digest, digest);
                stored = n;
                Ok(())
            };
            self.index()
                .insert_sealed_run_when(m, &digest, at, detail, ready)?;
            Ok(stored)
        })?;
        tracing::info!(run = %format!("{}/{}", m.namespace, m.run), manifest = %digest, "run sealed");
        self.record_lifecycle();
        Ok((digest, stored))
    }

    /// What the index records of the seal of `m`: the time (the manifest's `sealed_at`, so that
    /// an index rebuilt from the manifests shows the same) and the `run.sealed` event's detail.
    pub(crate) fn seal_record(
        &self,
        m: &Manifest,
        digest: &ManifestDigest,
    ) -> (i64, serde_json::Value) {
        let at = m
            .sealed_at_ns()
            .unwrap_or_else(|| to_unix_ns(self.clock.now()));
        (at, sealed_event_detail(m, digest))
    }

    /// A run (not deleted) by name, as committed.
    pub fn run(&self, r: &RunRef) -> Result<RunRow> {
        self.read(|idx| idx.run(r))?
            .ok_or_else(|| Error::NotFound(format!("run {r}")))
    }

    /// Where open runs' files that are not kept in the index live:
    /// `STORE/staging/<run id>/<inode>`.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Runs, optionally of one namespace; an open run's `raw_bytes` is what its files hold
    /// now ([`Store::open_run_bytes`]).
    pub fn runs(&self, namespace: Option<&str>) -> Result<Vec<RunRow>> {
        let mut runs = self.read(|idx| idx.runs(namespace))?;
        for r in runs.iter_mut().filter(|r| r.state == "open") {
            r.raw_bytes = self.open_run_bytes(r.id)?;
        }
        Ok(runs)
    }

    /// The bytes an open run's regular files hold (each inode once): kept in the index (small
    /// files, files chunked as they were written) or in their staging files, as of their last
    /// close for files being written through a mount. A seal records the same sum as the
    /// run's `raw_bytes`.
    pub fn open_run_bytes(&self, run_id: i64) -> Result<u64> {
        let files = self.read(|idx| idx.open_run_file_sizes(run_id))?;
        let dir = self.staging_dir().join(run_id.to_string());
        let mut total = 0u64;
        for (ino, known) in files {
            total += match known {
                Some(n) => n,
                // Not there: a file removed meanwhile, or a run the view has not staged.
                None => fs::metadata(dir.join(ino.to_string())).map_or(0, |m| m.len()),
            };
        }
        Ok(total)
    }

    /// Producer metadata of a run.
    pub fn run_meta(&self, run: &RunRow) -> Result<Vec<(String, String)>> {
        self.read(|idx| idx.run_meta(run.id))
    }

    /// A run with its retention, holds and producer metadata, read in one snapshot of the
    /// index over a pooled read-only connection: what a frontend shows for one run.
    pub fn run_details(&self, r: &RunRef) -> Result<RunDetails> {
        let now = self.now_ns();
        let mut d = self.read(|idx| run_details_of(idx, r, now))?;
        if d.row.state == "open" {
            d.row.raw_bytes = self.open_run_bytes(d.row.id)?;
        }
        Ok(d)
    }

    /// [`Store::run_details`] if a pooled read connection is idle right now, else `None`
    /// without waiting for one: for callers that must not block (an async server's worker,
    /// ADR 0020), which otherwise hand the call to a thread that may.
    pub fn run_details_now(&self, r: &RunRef) -> Option<Result<RunDetails>> {
        let idx = self.reads.try_get()?;
        match run_details_of(&idx, r, self.now_ns()) {
            // Its size takes a look at each of its staging files: not here.
            Ok(d) if d.row.state == "open" => None,
            other => Some(other),
        }
    }

    /// A sealed run's manifest digest and canonical bytes (checked against the digest).
    pub fn manifest_bytes(&self, r: &RunRef) -> Result<(ManifestDigest, Vec<u8>)> {
        let run = self.run(r)?;
        let digest = run
            .manifest
            .ok_or_else(|| Error::State(format!("run {r} is {} and has no manifest", run.state)))?;
        Ok((
            digest,
            manifest::load_manifest_bytes(&*self.objects, &digest)?,
        ))
    }

    /// A sealed run's manifest.
    pub fn manifest(&self, r: &RunRef) -> Result<(ManifestDigest, Manifest)> {
        let (d, bytes) = self.manifest_bytes(r)?;
        Ok((d, Manifest::from_bytes(&bytes, &format!("manifest {d}"))?))
    }

    /// One entry of a sealed run ("" for the root).
    pub fn entry(&self, r: &RunRef, path: &str) -> Result<Entry> {
        let run = self.run(r)?;
        let p = if path.is_empty() {
            manifest::ROOT
        } else {
            path
        };
        self.read(|idx| idx.file(run.id, p))?
            .ok_or_else(|| Error::NotFound(format!("{r}/{path}")))
    }

    /// Direct children of a directory in a sealed run.
    pub fn list_dir(&self, r: &RunRef, dir: &str) -> Result<Vec<Entry>> {
        let run = self.run(r)?;
        self.read(|idx| idx.children(run.id, dir))
    }

    /// Reads one chunk's plaintext, verified against its id. If its pack vanished under the
    /// read (gc rewrote it meanwhile), the chunk's new location is read once more.
    pub fn read_chunk(&self, id: &crate::id::ChunkId) -> Result<Vec<u8>> {
        let locate = || match self.read(|idx| idx.chunk(id))? {
            Some(loc) => Ok(loc),
            None if !self.read(|idx| idx.lost_among(&[*id]))?.is_empty() => Err(Error::corrupt(
                format!("chunk {id}"),
                "lost (found damaged or missing); storing the same bytes again repairs it",
            )),
            None => Err(Error::MissingObject {
                key: format!("chunk {id}"),
                backend: "index".into(),
            }),
        };
        let loc = locate()?;
        match pack::read_chunk(&*self.objects, &loc.pack, &loc.entry) {
            Err(Error::MissingObject { .. }) if locate().is_ok_and(|l| l != loc) => {
                let loc = locate()?;
                pack::read_chunk(&*self.objects, &loc.pack, &loc.entry)
            }
            other => other,
        }
    }

    /// Streams a file's content to `out`, chunk by chunk, each verified before it is written;
    /// at the end the whole-file BLAKE3 is checked against the entry too.
    pub fn read_file_to(&self, entry: &Entry, out: &mut dyn Write) -> Result<u64> {
        let mut n = 0u64;
        let mut hasher = blake3::Hasher::new();
        let mut take = |data: &[u8]| -> Result<()> {
            hasher.update(data);
            out.write_all(data)
                .map_err(|e| Error::io("write", "output", e))?;
            n += data.len() as u64;
            Ok(())
        };
        if entry.chunks.len() >= PARALLEL_READ_CHUNKS {
            // Decoded ahead on every core (`crate::stream`); a cold tiered read still goes
            // through the coalesced GETs.
            let opts = crate::stream::StreamOptions::default();
            self.stream_file(entry, 0..entry.size, &opts, &mut |p| take(p.bytes()))?;
        } else {
            let ids: Vec<_> = entry.chunks.iter().map(|c| c.0).collect();
            self.for_each_chunk(&ids, &mut |_, data| take(&data))
                .map_err(|e| with_file(e, &entry.path))?;
        }
        if let Some(h) = entry.blake3
            && crate::id::FileHash::from(hasher.finalize()) != h
        {
            return Err(Error::corrupt(
                format!("file {}", entry.path),
                "content does not match the file's BLAKE3",
            ));
        }
        Ok(n)
    }

    /// Store-wide counts.
    pub fn stats(&self) -> Result<IndexStats> {
        // Through the shared connection: counts include what the view deferred (ADR 0018).
        self.index().stats()
    }

    /// Events after `after`, as committed.
    pub fn events(&self, after: i64, limit: usize) -> Result<Vec<crate::index::EventRow>> {
        self.read(|idx| idx.events(after, limit))
    }
}

/// A run, its retention and its producer metadata ([`Store::run_details`]).
#[derive(Clone, Debug)]
pub struct RunDetails {
    pub row: RunRow,
    pub retention: crate::gc::RetentionInfo,
    pub meta: Vec<(String, String)>,
    /// The store's time the retention was judged at (`retention.eligible`).
    pub as_of_ns: i64,
}

impl RunDetails {
    /// Until when these details stay true if nothing is committed: a sealed run without holds
    /// becomes eligible for gc when its retention runs out, by the clock alone. `None`: only a
    /// commit can change them.
    pub fn valid_until_ns(&self) -> Option<i64> {
        let r = &self.retention;
        let waits = !r.eligible && r.state == "sealed" && r.holds.is_empty();
        r.retain_until_ns
            .filter(|&u| waits && u != crate::retention::FOREVER_NS)
    }
}

/// A run's row, retention (as of `now`) and metadata, in one snapshot of the index.
fn run_details_of(idx: &Index, r: &RunRef, now: i64) -> Result<RunDetails> {
    let (rr, meta) = idx
        .run_with_retention(r)?
        .ok_or_else(|| Error::NotFound(format!("run {r}")))?;
    let row = rr.run.clone();
    let retention = crate::gc::retention_info(rr, now);
    Ok(RunDetails {
        row,
        retention,
        meta,
        as_of_ns: now,
    })
}

/// Read-only index connections a store keeps: two per core, at least four.
fn read_connections() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (2 * n.get()).max(4))
}

/// Files of at least this many chunks are read with their chunks decoded ahead in parallel;
/// for fewer, starting the threads costs more than it gains.
const PARALLEL_READ_CHUNKS: usize = 4;

/// `e` with the file it happened in, for damage and missing objects.
pub(crate) fn with_file(e: Error, path: &str) -> Error {
    match e {
        Error::Corrupt { what, reason } => Error::Corrupt {
            what: format!("{what} (file {path})"),
            reason,
        },
        Error::MissingObject { key, backend } => Error::MissingObject {
            key: format!("{key} (file {path})"),
            backend,
        },
        other => other,
    }
}

/// Reads and checks `config.toml`; a directory without one is not a store.
pub(crate) fn read_config(root: &Path) -> Result<StoreConfig> {
    let cfg_path = config_path(root);
    let mut text = String::new();
    match File::open(&cfg_path) {
        Ok(mut f) => {
            f.read_to_string(&mut text)
                .map_err(|e| Error::io("read", &cfg_path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotAStore {
                path: root.to_path_buf(),
                reason: "no config.toml (run `artifactfs init` first)".into(),
            });
        }
        Err(e) => return Err(Error::io("open", cfg_path, e)),
    }
    let config: StoreConfig = toml::from_str(&text).map_err(|e| Error::NotAStore {
        path: root.to_path_buf(),
        reason: format!("config.toml: {e}"),
    })?;
    if config.format != STORE_FORMAT {
        return Err(Error::NotAStore {
            path: root.to_path_buf(),
            reason: format!(
                "store format {} is not supported by this build ({STORE_FORMAT})",
                config.format
            ),
        });
    }
    config.chunker.validate()?;
    Ok(config)
}

pub(crate) fn take_lock(root: &Path) -> Result<File> {
    let path = root.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::Locked {
                path: root.to_path_buf(),
                holder: if holder.is_empty() {
                    "unknown pid".into()
                } else {
                    format!("pid {holder}")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
    }
    f.set_len(0).map_err(|e| Error::io("write", &path, e))?;
    f.write_all(std::process::id().to_string().as_bytes())
        .map_err(|e| Error::io("write", &path, e))?;
    Ok(f)
}

/// The detail of a `run.sealed` event: the manifest digest, the files (entries that are not
/// directories) and the raw bytes.
pub(crate) fn sealed_event_detail(m: &Manifest, digest: &ManifestDigest) -> serde_json::Value {
    serde_json::json!({
        "manifest": digest.to_hex(),
        "files": m.entries.iter().filter(|e| e.kind != Kind::Dir).count(),
        "raw_bytes": m.raw_bytes(),
    })
}
