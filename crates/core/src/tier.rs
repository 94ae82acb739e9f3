//! Tiering: the local object store as a bounded cache in front of a remote one (S3 / Ceph RGW).
//!
//! [`Tier`] is an [`ObjectStore`] decorator in the manner of rustic_core's `HotColdBackend`:
//! the engine writes and reads through it exactly as through the local store, and does not
//! know whether a pack is local, remote or both. It owns the policy; the backend crates own
//! only the protocol. Core never sees an S3 type: the binary hands it an
//! `Arc<dyn ObjectStore>`.
//!
//! # What is authoritative
//!
//! A pack or manifest is durable once it is in the local store (as before tiering); it is
//! *safely remote* once it has been uploaded and checked (by default through the backend's
//! own digest check of the upload, else read back: the pack's BLAKE3 is its id; a manifest's
//! bytes equal the local ones; ADR 0014) and the index records that (`tier_packs`,
//! `tier_manifests`, see `crate::index_tier`). Only then may the local copy of a pack be
//! evicted. The index is never the only record of where bytes are: reads try the local store
//! first and the remote one on a miss, whatever the index says, so a crash between any two
//! steps below leaves every byte readable.
//!
//! # The state machine of one pack
//!
//! ```text
//! local (no tier row) --upload, read back, check--> both (tier row, local = 1)
//!     --evict: row local = 0 (durable), then delete the file--> remote (local = 0)
//! remote --ranged GET of one chunk--> remote, that range in the range cache
//! ```
//!
//! New packs are found through the index (a `packs` row with no `tier_packs` row), never by
//! hooking the writer. Uploads are idempotent (`put` of the same bytes under the same key), so
//! a crash mid-upload only repeats it. Eviction happens only for packs with a tier row; a
//! pack whose upload failed stays local however far over the cache bound that goes.
//!
//! # The local cache
//!
//! Local pack files plus cached chunk ranges are bounded by `cache_size`; least recently read
//! goes first. Reads of local packs note the time in memory; eviction saves those times to
//! the index first. A read of an evicted chunk is one ranged GET of just that chunk's bytes;
//! a reader that knows what comes next (`crate::fetch`, ADR 0014) asks for coalesced windows
//! of several chunks instead, several at once. Either is kept afterwards as a file under
//! `STORE/cache/ranges/` (written atomically, not fsynced: it is a cache and every chunk is
//! checked against its id when decoded), which then serves any range inside it. Manifests
//! are small and always stay local.
//!
//! # Lifecycle records
//!
//! Retention and holds live in the index, which reaches the bucket only in (at most hourly)
//! snapshots. So every change of them is also written to the bucket as a small JSON object per
//! sealed run, `lifecycle/<namespace>/<run>.json` (and `lifecycle/<namespace>/.namespace.json`
//! for a namespace's default), holding the whole current state and a version (the time of the
//! newest retention or hold event). The queue is the event log itself: each push looks at the
//! lifecycle events after `STORE/lifecycle-cursor` (a `seq`), writes (or, for a deleted run,
//! deletes) the record of each run or namespace they name, and moves the cursor past them only
//! when every one of those uploads succeeded. A change therefore never waits for the bucket,
//! and one made while it is down goes out with the next push that reaches it. A record is
//! never replaced by an older version. A rebuild applies them (`crate::rebuild`).
//!
//! A store without a remote tier keeps the same records in its local object store, through the
//! same queue ([`LifecycleQueue`], cursor `STORE/lifecycle-cursor.local`), run right after each
//! change (`Store::record_lifecycle`) rather than by a push, so that a local rebuild restores
//! retention and holds too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock, to_unix_ns};
use crate::error::{Error, Result};
use crate::id::{ManifestDigest, PackId};
use crate::index::{Index, SharedIndex};
use crate::index_tier::TierCounts;
use crate::manifest::manifest_key;
use crate::objstore::{LocalStore, ObjectMeta, ObjectStore};
use crate::pack::{pack_id_from_key, pack_key};
use crate::store::Store;

/// The object key under which a tiered store keeps a copy of its `config.toml` in the remote
/// tier, so that a store can be rebuilt from the bucket with the same settings.
pub const REMOTE_CONFIG_KEY: &str = "store/config.toml";

/// Where index snapshots live in the remote tier: `index-snapshots/<unix ns, 20 digits>.sqlite.zst`.
pub const SNAPSHOT_PREFIX: &str = "index-snapshots/";

/// Where lifecycle records live in the remote tier: `lifecycle/<namespace>/<run>.json`.
pub const LIFECYCLE_PREFIX: &str = "lifecycle/";

/// The record name of a namespace's default (a run name cannot start with `.`).
const NAMESPACE_RECORD: &str = ".namespace";

/// Version of the lifecycle record format.
pub const LIFECYCLE_FORMAT: u32 = 1;

/// The file (under the store root) holding the `seq` of the last lifecycle event uploaded.
pub(crate) const LIFECYCLE_CURSOR: &str = "lifecycle-cursor";

/// The same for the records an untiered store keeps in its local object store (a file of its
/// own, so that a tier added later still gets every record).
pub(crate) const LOCAL_LIFECYCLE_CURSOR: &str = "lifecycle-cursor.local";

/// Snapshots kept in the remote tier; older ones are deleted after a new one is checked.
const SNAPSHOTS_KEPT: usize = 2;

/// Uploads in flight at once during a push (each holds one pack in memory, twice while it is
/// sent).
const UPLOAD_THREADS: usize = 6;

/// How an upload is checked before the local copy may be evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// When the backend's `put` checks the bytes against a digest computed from the local
    /// copy (S3 `Content-MD5`, then the stored size and `ETag`; ADR 0014), that check;
    /// otherwise as `Reread`.
    #[default]
    Checksum,
    /// Read the whole object back and check it (BLAKE3 of a pack is its id).
    Reread,
    /// Only check the stored size (`HEAD`); the backend's own checks must be trusted.
    Size,
}

/// The `[tier]` table of `config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierConfig {
    /// `s3://BUCKET/PREFIX`; the binary turns it into an object store.
    pub backend: String,
    /// Storage class of uploads.
    #[serde(default = "default_storage_class")]
    pub storage_class: String,
    /// Bytes of local packs and cached ranges to keep; 0 evicts everything safely remote.
    #[serde(default = "default_cache_size")]
    pub cache_size: u64,
    /// How uploads are checked.
    #[serde(default)]
    pub verify: VerifyMode,
    /// Seconds between index snapshots uploaded by pushes that uploaded something; 0: never.
    #[serde(default = "default_snapshot_interval")]
    pub snapshot_interval: u64,
}

fn default_snapshot_interval() -> u64 {
    3600
}

fn default_storage_class() -> String {
    "STANDARD".into()
}

/// The default bound of the local cache: 8 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 8 << 30;

fn default_cache_size() -> u64 {
    DEFAULT_CACHE_SIZE
}

impl TierConfig {
    /// A configuration for `backend` with the defaults.
    pub fn new(backend: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            storage_class: default_storage_class(),
            cache_size: DEFAULT_CACHE_SIZE,
            verify: VerifyMode::default(),
            snapshot_interval: default_snapshot_interval(),
        }
    }
}

/// The remote tier of a store whose backend this program could not connect to: every call
/// fails, retryably, naming the backend. Local data stays readable; uploads stay pending.
pub struct Unconnected {
    backend: String,
    reason: String,
}

impl Unconnected {
    pub fn new(backend: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            reason: reason.into(),
        }
    }

    fn err(&self, op: &'static str, key: &str) -> Error {
        Error::Backend {
            backend: self.backend.clone(),
            op,
            key: key.to_owned(),
            retryable: true,
            message: self.reason.clone(),
        }
    }
}

impl ObjectStore for Unconnected {
    fn describe(&self) -> String {
        self.backend.clone()
    }
    fn put(&self, key: &str, _: &[u8]) -> Result<()> {
        Err(self.err("put", key))
    }
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        Err(self.err("get", key))
    }
    fn get_range(&self, key: &str, _: u64, _: u64) -> Result<Vec<u8>> {
        Err(self.err("get range", key))
    }
    fn head(&self, key: &str) -> Result<Option<u64>> {
        Err(self.err("head", key))
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Err(self.err("list", prefix))
    }
    fn delete(&self, key: &str) -> Result<()> {
        Err(self.err("delete", key))
    }
}

/// Chunk ranges of evicted packs, kept as files.
struct RangeCache {
    dir: PathBuf,
    inner: Mutex<RangeInner>,
}

#[derive(Default)]
struct RangeInner {
    /// File name -> (bytes, last read ns).
    files: HashMap<String, (u64, i64)>,
    /// Per object (its key as in file names): the cached ranges, offset -> length.
    spans: HashMap<String, BTreeMap<u64, u64>>,
    bytes: u64,
}

impl RangeInner {
    fn add(&mut self, name: &str, len: u64, at: i64) {
        if let Some((n, _)) = self.files.insert(name.to_owned(), (len, at)) {
            self.bytes -= n;
        }
        self.bytes += len;
        if let Some((k, off, l)) = parse_range_name(name) {
            self.spans.entry(k).or_default().insert(off, l);
        }
    }

    fn drop_name(&mut self, name: &str) {
        if let Some((n, _)) = self.files.remove(name) {
            self.bytes -= n;
        }
        if let Some((k, off, _)) = parse_range_name(name)
            && let Some(m) = self.spans.get_mut(&k)
        {
            m.remove(&off);
            if m.is_empty() {
                self.spans.remove(&k);
            }
        }
    }

    /// The cached range of `key` that holds `[offset, offset + len)`: (offset, length).
    fn containing(&self, key: &str, offset: u64, len: u64) -> Option<(u64, u64)> {
        let m = self.spans.get(&key.replace('/', "_"))?;
        m.range(..=offset)
            .rev()
            .find(|(o, l)| **o + **l >= offset + len)
            .map(|(o, l)| (*o, *l))
    }
}

fn range_name(key: &str, offset: u64, len: u64) -> String {
    format!("{}.{offset}.{len}", key.replace('/', "_"))
}

/// The object (as in file names), offset and length a range file name says.
fn parse_range_name(name: &str) -> Option<(String, u64, u64)> {
    let mut it = name.rsplitn(3, '.');
    let len = it.next()?.parse().ok()?;
    let off = it.next()?.parse().ok()?;
    Some((it.next()?.to_owned(), off, len))
}

impl RangeCache {
    fn open(dir: PathBuf) -> Self {
        let mut inner = RangeInner::default();
        if let Ok(rd) = fs::read_dir(&dir) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                let Ok(m) = ent.metadata() else { continue };
                if name.starts_with(".tmp") {
                    let _ = fs::remove_file(ent.path());
                    continue;
                }
                let at = m.modified().map(to_unix_ns).unwrap_or(0);
                inner.add(&name, m.len(), at);
            }
        }
        Self {
            dir,
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RangeInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a cached range holds `[offset, offset + len)` of `key`.
    fn contains(&self, key: &str, offset: u64, len: u64) -> bool {
        self.lock().containing(key, offset, len).is_some()
    }

    /// `[offset, offset + len)` of `key`, from a cached range that holds it.
    fn get(&self, key: &str, offset: u64, len: u64, now: i64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let name = {
            let mut g = self.lock();
            let (o, l) = g.containing(key, offset, len)?;
            let name = range_name(key, o, l);
            g.files.get_mut(&name)?.1 = now;
            (name, o, l)
        };
        let (name, o, l) = name;
        let read = || -> std::io::Result<Vec<u8>> {
            let f = fs::File::open(self.dir.join(&name))?;
            if f.metadata()?.len() != l {
                return Err(std::io::Error::other("cached range has the wrong size"));
            }
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset - o)?;
            Ok(buf)
        };
        match read() {
            Ok(b) => Some(b),
            Err(_) => {
                self.remove(&name);
                None
            }
        }
    }

    fn put(&self, name: &str, data: &[u8], now: i64) {
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(format!(
                ".tmp-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let res = fs::File::create(&tmp)
                .and_then(|mut f| f.write_all(data))
                .and_then(|()| fs::rename(&tmp, self.dir.join(name)));
            if res.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            res
        };
        match write() {
            Ok(()) => self.lock().add(name, data.len() as u64, now),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot cache a chunk range")
            }
        }
    }

    fn remove(&self, name: &str) {
        self.lock().drop_name(name);
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = name, error = %e, "cannot remove a cached chunk range")
            }
        }
    }

    /// Removes every range of `key`.
    fn forget_key(&self, key: &str) {
        let prefix = format!("{}.", key.replace('/', "_"));
        let names: Vec<String> = self
            .lock()
            .files
            .keys()
            .filter(|n| n.starts_with(&prefix))
            .cloned()
            .collect();
        for n in names {
            self.remove(&n);
        }
    }

    fn bytes(&self) -> (u64, u64) {
        let g = self.lock();
        (g.bytes, g.files.len() as u64)
    }

    /// (name, bytes, last read), least recently read first.
    fn lru(&self) -> Vec<(String, u64, i64)> {
        let mut v: Vec<_> = self
            .lock()
            .files
            .iter()
            .map(|(n, (b, at))| (n.clone(), *b, *at))
            .collect();
        v.sort_by_key(|(n, _, at)| (*at, n.clone()));
        v
    }
}

/// The key of the lifecycle record of run `run` of `namespace`, or with `None` of the
/// namespace's default retention.
pub fn lifecycle_key(namespace: &str, run: Option<&str>) -> String {
    format!(
        "{LIFECYCLE_PREFIX}{namespace}/{}.json",
        run.unwrap_or(NAMESPACE_RECORD)
    )
}

/// The namespace and run (`None`: the namespace's default) a lifecycle key names.
pub fn parse_lifecycle_key(key: &str) -> Option<(String, Option<String>)> {
    let rest = key.strip_prefix(LIFECYCLE_PREFIX)?.strip_suffix(".json")?;
    let (ns, run) = rest.split_once('/')?;
    if ns.is_empty() || run.is_empty() || run.contains('/') {
        return None;
    }
    let run = (run != NAMESPACE_RECORD).then(|| run.to_owned());
    Some((ns.to_owned(), run))
}

/// A hold as a lifecycle record keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleHold {
    pub name: String,
    pub reason: String,
    /// Unix ns.
    pub placed_at: i64,
}

/// The retention and holds of one sealed run, or the default retention of one namespace
/// (`run` and `manifest` absent), as kept in the remote tier; see the module documentation
/// and `docs/format.md`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    pub format: u32,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The run's manifest (hex): the record applies only to the run sealed with it, never to
    /// a later run of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The retention as set (`None`: none).
    pub retain: Option<String>,
    #[serde(default)]
    pub retain_for_ns: Option<i64>,
    /// Unix ns; `i64::MAX` for `forever`.
    #[serde(default)]
    pub retain_until: Option<i64>,
    #[serde(default)]
    pub holds: Vec<LifecycleHold>,
    /// When the state last changed (unix ns of the newest retention or hold event); a record
    /// is never replaced by one with a smaller version.
    pub version: i64,
    /// The `seq` of that store's newest lifecycle event when the record was written
    /// (informative: logs are renumbered by a rebuild).
    pub seq: i64,
}

impl LifecycleRecord {
    /// Parses a record, naming `key` in the error.
    pub fn from_bytes(bytes: &[u8], key: &str) -> Result<Self> {
        let r: Self = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("lifecycle record {key}"), e.to_string()))?;
        if r.format != LIFECYCLE_FORMAT {
            return Err(Error::corrupt(
                format!("lifecycle record {key}"),
                format!("format {} (this build reads {LIFECYCLE_FORMAT})", r.format),
            ));
        }
        Ok(r)
    }
}

/// A run or namespace named by lifecycle events after the cursor: the `seq` of its first such
/// event, the namespace, the run (`None`: the namespace's default), and whether all of its
/// events were seals.
type LifecycleTarget = (i64, String, Option<String>, bool);

/// What a push does with one run's or namespace's lifecycle record.
enum LifecycleAction {
    Put(String, LifecycleRecord),
    Delete(String),
    /// Nothing to record (an open run: its seal records it; a run without retention or holds).
    Skip,
}

/// What one push did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PushReport {
    pub packs: u64,
    pub pack_bytes: u64,
    pub manifests: u64,
    /// Lifecycle records written or deleted.
    pub lifecycle: u64,
    /// Packs, manifests and lifecycle records still pending after this push (their upload
    /// failed).
    pub still_pending: u64,
    pub evicted_packs: u64,
    pub evicted_bytes: u64,
    pub evicted_ranges: u64,
    /// The index snapshot this push uploaded, if any.
    pub snapshot: Option<String>,
    /// The first failures, one line each, naming the backend and key.
    pub errors: Vec<String>,
}

/// What one eviction pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EvictReport {
    pub packs: u64,
    pub bytes: u64,
    pub ranges: u64,
}

/// Where a tiered store's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierStatus {
    pub backend: String,
    pub storage_class: String,
    pub cache_size: u64,
    /// Bytes of local pack files and cached ranges together (what `cache_size` bounds).
    pub cache_bytes: u64,
    pub range_cache_bytes: u64,
    pub range_cache_entries: u64,
    #[serde(flatten)]
    pub counts: TierCounts,
    /// Runs and namespaces whose lifecycle record (retention, holds) is not yet in the bucket.
    pub pending_lifecycle: u64,
}

/// The local store as a cache in front of a remote one; see the module documentation.
pub struct Tier {
    local: LocalStore,
    remote: Arc<dyn ObjectStore>,
    config: TierConfig,
    clock: Arc<dyn Clock>,
    ranges: RangeCache,
    index: OnceLock<Arc<SharedIndex>>,
    /// Last reads of local packs since the last eviction pass.
    reads: Mutex<HashMap<PackId, i64>>,
    /// Local pack bytes as of the last eviction pass (the read path cannot ask the index).
    pack_bytes: AtomicU64,
    /// One push at a time.
    pushing: Mutex<()>,
    config_uploaded: AtomicBool,
    /// The local `config.toml`, copied to [`REMOTE_CONFIG_KEY`] by the first push.
    config_text: Vec<u8>,
    /// `STORE/cache`.
    cache_dir: PathBuf,
    /// When the newest remote snapshot was taken (unix ns), once known.
    last_snapshot: Mutex<Option<i64>>,
    /// `STORE/lifecycle-cursor`.
    lifecycle_cursor: PathBuf,
}

impl Tier {
    fn new(
        root: &Path,
        remote: Arc<dyn ObjectStore>,
        config: TierConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let config_path = root.join("config.toml");
        let config_text = fs::read(&config_path).map_err(|e| Error::io("read", &config_path, e))?;
        Ok(Self {
            local: LocalStore::open(root.join("objects"))?,
            remote,
            config,
            clock,
            ranges: RangeCache::open(root.join("cache").join("ranges")),
            index: OnceLock::new(),
            reads: Mutex::new(HashMap::new()),
            pack_bytes: AtomicU64::new(0),
            pushing: Mutex::new(()),
            config_uploaded: AtomicBool::new(false),
            config_text,
            cache_dir: root.join("cache"),
            last_snapshot: Mutex::new(None),
            lifecycle_cursor: root.join(LIFECYCLE_CURSOR),
        })
    }

    fn index(&self) -> Result<MutexGuard<'_, Index>> {
        let idx = self
            .index
            .get()
            .ok_or_else(|| Error::Internal("tier used before its index was attached".into()))?;
        Ok(idx.lock())
    }

    fn now(&self) -> i64 {
        to_unix_ns(self.clock.now())
    }

    /// The remote tier.
    pub fn remote(&self) -> &dyn ObjectStore {
        &*self.remote
    }

    /// The local store (the cache).
    pub fn local(&self) -> &dyn ObjectStore {
        &self.local
    }

    pub fn config(&self) -> &TierConfig {
        &self.config
    }

    /// Uploads every pending pack and manifest, checks each, records it, then evicts down to
    /// the cache bound. A pack that fails stays pending; the report says how many and why. An
    /// error is returned only when nothing could be uploaded and something was pending.
    pub fn push_pending(&self) -> Result<PushReport> {
        let _one = self.pushing.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = PushReport::default();
        let (packs, manifests) = {
            let idx = self.index()?;
            (idx.tier_pending_packs()?, idx.tier_pending_manifests()?)
        };
        if packs.is_empty() && manifests.is_empty() {
            let lifecycle_err = self.push_lifecycle(&mut report)?;
            let ev = self.evict()?;
            report.evicted_packs = ev.packs;
            report.evicted_bytes = ev.bytes;
            report.evicted_ranges = ev.ranges;
            if report.lifecycle == 0
                && let Some(e) = lifecycle_err
            {
                return Err(e);
            }
            return Ok(report);
        }
        let mut first_err: Option<Error> = None;
        if !self.config_uploaded.load(Ordering::Relaxed) {
            match self.remote.put(REMOTE_CONFIG_KEY, &self.config_text) {
                Ok(()) => self.config_uploaded.store(true, Ordering::Relaxed),
                Err(e) => {
                    // The gateway is down: every upload would fail the same way.
                    report.still_pending = (packs.len() + manifests.len()) as u64;
                    return Err(e);
                }
            }
        }
        // Packs, a few at a time.
        let queue = Mutex::new(packs.into_iter());
        let results: Mutex<Vec<(PackId, u64, Result<()>)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..UPLOAD_THREADS {
                s.spawn(|| {
                    loop {
                        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let Some((id, size)) = next else { break };
                        let r = self.upload_pack(&id);
                        let failed = r.is_err();
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((id, size, r));
                        if failed {
                            // Leave the rest for the next push rather than hammer a
                            // gateway that is failing.
                            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                            let rest = q.by_ref().count();
                            drop(q);
                            results.lock().unwrap_or_else(|p| p.into_inner()).extend(
                                (0..rest).map(|_| {
                                    (
                                        id,
                                        0,
                                        Err(Error::Internal("skipped after a failure".into())),
                                    )
                                }),
                            );
                            break;
                        }
                    }
                });
            }
        });
        for (id, size, r) in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
            match r {
                Ok(()) => {
                    report.packs += 1;
                    report.pack_bytes += size;
                }
                Err(e) => {
                    report.still_pending += 1;
                    if !matches!(e, Error::Internal(_)) {
                        tracing::warn!(pack = %id, error = %e, "pack upload failed; it stays pending");
                        if report.errors.len() < 5 {
                            report.errors.push(e.to_string());
                        }
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        for d in &manifests {
            if first_err.as_ref().is_some_and(is_unreachable) {
                report.still_pending += 1;
                continue;
            }
            match self.upload_manifest(d) {
                Ok(()) => report.manifests += 1,
                Err(e) => {
                    tracing::warn!(manifest = %d, error = %e, "manifest upload failed; it stays pending");
                    report.still_pending += 1;
                    if report.errors.len() < 5 {
                        report.errors.push(e.to_string());
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        if first_err.as_ref().is_some_and(is_unreachable) {
            report.still_pending += self.pending_lifecycle_count()?;
        } else if let Some(e) = self.push_lifecycle(&mut report)? {
            first_err.get_or_insert(e);
        }
        let ev = self.evict()?;
        report.evicted_packs = ev.packs;
        report.evicted_bytes = ev.bytes;
        report.evicted_ranges = ev.ranges;
        if report.packs == 0
            && report.manifests == 0
            && report.lifecycle == 0
            && let Some(e) = first_err
        {
            return Err(e);
        }
        if report.packs + report.manifests > 0 {
            // One event per push that uploaded something, so that subscribers to the event
            // log learn when data reached the remote tier.
            let detail = serde_json::json!({
                "backend": self.remote.describe(),
                "packs": report.packs,
                "pack_bytes": report.pack_bytes,
                "manifests": report.manifests,
                "still_pending": report.still_pending,
            });
            self.index()?
                .event(self.now(), "tier.uploaded", None, &detail)?;
        }
        if report.packs + report.manifests > 0 && report.still_pending == 0 {
            match self.snapshot_if_due() {
                Ok(k) => report.snapshot = k,
                Err(e) => {
                    tracing::warn!(error = %e, "index snapshot failed; the next push tries again")
                }
            }
        }
        if report.packs + report.manifests > 0 {
            tracing::info!(
                packs = report.packs, bytes = report.pack_bytes, manifests = report.manifests,
                pending = report.still_pending, backend = %self.remote.describe(), "pushed"
            );
        }
        Ok(report)
    }

    /// The lifecycle queue over the bucket (see the module documentation).
    fn lifecycle_queue<'a>(&'a self, check: &'a ReadBack<'a>) -> Result<LifecycleQueue<'a>> {
        let index = self
            .index
            .get()
            .ok_or_else(|| Error::Internal("tier used before its index was attached".into()))?;
        Ok(LifecycleQueue {
            index,
            dest: &*self.remote,
            cursor: &self.lifecycle_cursor,
            check: Some(check),
        })
    }

    fn pending_lifecycle_count(&self) -> Result<u64> {
        let check =
            |key: &str, bytes: &[u8]| self.check_remote(key, bytes.len(), |got| got == bytes);
        self.lifecycle_queue(&check)?.pending()
    }

    fn push_lifecycle(&self, report: &mut PushReport) -> Result<Option<Error>> {
        let check =
            |key: &str, bytes: &[u8]| self.check_remote(key, bytes.len(), |got| got == bytes);
        self.lifecycle_queue(&check)?.push(report)
    }

    /// Uploads an index snapshot when the newest one is older than the configured interval.
    fn snapshot_if_due(&self) -> Result<Option<String>> {
        let every = self.config.snapshot_interval;
        if every == 0 {
            return Ok(None);
        }
        let last = {
            let mut g = self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(newest_snapshot(&*self.remote)?.map_or(i64::MIN, |(_, at)| at));
            }
            g.unwrap_or(i64::MIN)
        };
        if self.now().saturating_sub(last) < (every as i64).saturating_mul(1_000_000_000) {
            return Ok(None);
        }
        self.upload_snapshot().map(Some)
    }

    /// Copies the index with SQLite's online backup, compresses it, uploads it as
    /// `index-snapshots/<unix ns>.sqlite.zst`, reads it back, then deletes all but the newest
    /// few. A rebuild from the bucket starts from the newest and replays what is newer.
    pub fn upload_snapshot(&self) -> Result<String> {
        let index_path = self.index()?.path().to_path_buf();
        fs::create_dir_all(&self.cache_dir)
            .map_err(|e| Error::io("create directory", &self.cache_dir, e))?;
        let tmp = self
            .cache_dir
            .join(format!(".tmp-snapshot-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let at = self.now();
        let res = crate::index_tier::snapshot_index(&index_path, &tmp)
            .and_then(|()| fs::read(&tmp).map_err(|e| Error::io("read", &tmp, e)));
        let _ = fs::remove_file(&tmp);
        let db = res?;
        let packed = zstd::bulk::compress(&db, 3)
            .map_err(|e| Error::Internal(format!("zstd compress snapshot: {e}")))?;
        let key = format!("{SNAPSHOT_PREFIX}{at:020}.sqlite.zst");
        self.remote.put(&key, &packed)?;
        self.check_remote(&key, packed.len(), |got| got == packed.as_slice())?;
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
        let mut all = self.remote.list(SNAPSHOT_PREFIX)?;
        all.sort_by(|a, b| b.key.cmp(&a.key));
        for old in all.iter().skip(SNAPSHOTS_KEPT) {
            self.remote.delete(&old.key)?;
        }
        tracing::info!(
            key,
            bytes = packed.len(),
            index_bytes = db.len(),
            "index snapshot uploaded"
        );
        Ok(key)
    }

    fn upload_pack(&self, id: &PackId) -> Result<()> {
        let key = pack_key(id);
        let bytes = match self.local.get(&key) {
            Ok(b) => b,
            Err(Error::MissingObject { .. }) => {
                // Not local and never recorded remote: perhaps uploaded by an earlier build
                // or a rebuild; accept it only if the remote copy checks.
                let b = self.remote.get(&key)?;
                if PackId::of(&b) != *id {
                    return Err(Error::corrupt(
                        format!("pack {key} in {}", self.remote.describe()),
                        "not local, and the remote copy does not match its id",
                    ));
                }
                self.index()?.tier_mark_pack_remote(id, false, self.now())?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if PackId::of(&bytes) != *id {
            return Err(Error::corrupt(
                format!("pack {key} in {}", self.local.describe()),
                "the local copy does not match its id; not uploading it",
            ));
        }
        self.remote.put(&key, &bytes)?;
        self.check_remote(&key, bytes.len(), |got| PackId::of(got) == *id)?;
        let indexed = self.index()?.tier_mark_pack_remote(id, true, self.now())?;
        if !indexed {
            // gc dropped the pack while it was uploading: do not leave a copy behind.
            self.remote.delete(&key)?;
        }
        tracing::debug!(pack = %id, bytes = bytes.len(), "pack uploaded and verified");
        Ok(())
    }

    fn upload_manifest(&self, d: &ManifestDigest) -> Result<()> {
        let key = manifest_key(d);
        let bytes = match self.local.get(&key) {
            Ok(b) => b,
            Err(Error::MissingObject { .. }) => {
                crate::manifest::load_manifest_bytes(&*self.remote, d)?;
                return self.index()?.tier_mark_manifest_remote(d, self.now());
            }
            Err(e) => return Err(e),
        };
        self.remote.put(&key, &bytes)?;
        self.check_remote(&key, bytes.len(), |got| got == bytes.as_slice())?;
        self.index()?.tier_mark_manifest_remote(d, self.now())
    }

    /// Checks an uploaded object: its size, and by default its content.
    fn check_remote(&self, key: &str, len: usize, ok: impl Fn(&[u8]) -> bool) -> Result<()> {
        let bad = |message: String| Error::Backend {
            backend: self.remote.describe(),
            op: "verify upload",
            key: key.to_owned(),
            retryable: true,
            message,
        };
        let mode = match self.config.verify {
            VerifyMode::Checksum if self.remote.put_is_checked() => return Ok(()),
            VerifyMode::Checksum => VerifyMode::Reread,
            m => m,
        };
        match mode {
            VerifyMode::Checksum => Ok(()),
            VerifyMode::Size => match self.remote.head(key)? {
                Some(n) if n == len as u64 => Ok(()),
                other => Err(bad(format!("stored size {other:?}, sent {len} bytes"))),
            },
            VerifyMode::Reread => {
                let got = self.remote.get(key)?;
                if got.len() == len && ok(&got) {
                    Ok(())
                } else {
                    Err(bad(format!(
                        "read back {} bytes that do not match the {len} sent",
                        got.len()
                    )))
                }
            }
        }
    }

    /// Evicts least recently read packs (only those safely remote) and cached ranges until
    /// the local cache is within its bound.
    pub fn evict(&self) -> Result<EvictReport> {
        self.evict_inner(true)
    }

    /// `warn`: say so when the bound cannot be met (not on open, where it is no news).
    fn evict_inner(&self, warn: bool) -> Result<EvictReport> {
        let mut report = EvictReport::default();
        let reads: Vec<(PackId, i64)> = self
            .reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let (mut pack_bytes, candidates) = {
            let mut idx = self.index()?;
            idx.tier_note_reads(&reads)?;
            (idx.tier_local_pack_bytes()?, idx.tier_evictable()?)
        };
        let (range_bytes, _) = self.ranges.bytes();
        let limit = self.config.cache_size;
        if pack_bytes + range_bytes > limit {
            enum Victim {
                Pack(PackId, u64),
                Range(String, u64),
            }
            let mut victims: Vec<(i64, Victim)> = candidates
                .into_iter()
                .map(|c| (c.last_read_ns, Victim::Pack(c.pack, c.size)))
                .chain(
                    self.ranges
                        .lru()
                        .into_iter()
                        .map(|(n, b, at)| (at, Victim::Range(n, b))),
                )
                .collect();
            victims.sort_by_key(|(at, _)| *at);
            let mut total = pack_bytes + range_bytes;
            for (_, v) in victims {
                if total <= limit {
                    break;
                }
                match v {
                    Victim::Pack(id, size) => {
                        // The row first (durable), then the file: a crash in between leaves
                        // a file the next pass removes, never a file-less "local" pack that
                        // is not remote.
                        if !self.index()?.tier_mark_pack_evicted(&id)? {
                            continue;
                        }
                        self.local.delete(&pack_key(&id))?;
                        total -= size;
                        pack_bytes -= size;
                        report.packs += 1;
                        report.bytes += size;
                    }
                    Victim::Range(name, size) => {
                        self.ranges.remove(&name);
                        total -= size;
                        report.ranges += 1;
                    }
                }
            }
            if report.packs > 0 || report.ranges > 0 {
                tracing::info!(
                    packs = report.packs,
                    bytes = report.bytes,
                    ranges = report.ranges,
                    cache_size = limit,
                    "evicted from the local cache"
                );
            }
            if total > limit && warn {
                tracing::warn!(
                    local = total,
                    cache_size = limit,
                    "the local cache is over its bound: the rest is not yet safely remote"
                );
            }
        }
        self.pack_bytes.store(pack_bytes, Ordering::Relaxed);
        Ok(report)
    }

    /// Deletes local files of packs the index says are evicted: a crash between the two
    /// steps of an eviction leaves one behind.
    fn sweep_evicted_files(&self) -> Result<()> {
        let local = self.local.list("packs/")?;
        let mut stray = Vec::new();
        {
            let idx = self.index()?;
            for m in local {
                if let Some(id) = pack_id_from_key(&m.key)
                    && idx.tier_pack_state(&id)? == Some(false)
                {
                    stray.push(m.key);
                }
            }
        }
        for key in stray {
            tracing::info!(key, "removing the file of a pack evicted before a crash");
            self.local.delete(&key)?;
        }
        Ok(())
    }

    /// Where bytes are.
    pub fn status(&self) -> Result<TierStatus> {
        let (counts, pack_bytes) = {
            let idx = self.index()?;
            (idx.tier_counts()?, idx.tier_local_pack_bytes()?)
        };
        let (range_bytes, range_entries) = self.ranges.bytes();
        Ok(TierStatus {
            backend: self.remote.describe(),
            storage_class: self.config.storage_class.clone(),
            cache_size: self.config.cache_size,
            cache_bytes: pack_bytes + range_bytes,
            range_cache_bytes: range_bytes,
            range_cache_entries: range_entries,
            counts,
            pending_lifecycle: self.pending_lifecycle_count()?,
        })
    }

    /// Deletes an object from the local cache, the range cache and the remote tier.
    pub fn delete_everywhere(&self, key: &str) -> Result<()> {
        self.local.delete(key)?;
        self.ranges.forget_key(key);
        self.remote.delete(key)
    }

    /// Starts a thread that pushes pending packs and manifests at once, then every `every`
    /// (sooner when [`Uploader::nudge`]d), backing off while the remote fails.
    pub fn start_uploader(self: &Arc<Self>, every: Duration) -> Uploader {
        let shared = Arc::new((Mutex::new(Signal::default()), Condvar::new()));
        let tier = self.clone();
        let sig = shared.clone();
        let thread = std::thread::Builder::new()
            .name("artifactfs-upload".into())
            .spawn(move || upload_loop(&tier, &sig, every))
            .expect("spawn the uploader thread");
        Uploader {
            shared,
            thread: Some(thread),
        }
    }

    fn note_read(&self, key: &str) {
        if let Some(id) = pack_id_from_key(key) {
            let now = self.now();
            self.reads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, now);
        }
    }

    /// A ranged read the local store could not serve: the range cache, else one ranged GET.
    fn remote_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if let Some(b) = self.ranges.get(key, offset, len, self.now()) {
            return Ok(b);
        }
        self.fetch_range(key, offset, len)
    }

    /// One ranged GET, checked for its length and kept in the range cache when the bound
    /// leaves room for it.
    fn fetch_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let data = self.get_range_checked(key, offset, len)?;
        self.keep_ranges(key, offset, &data, &[(offset, len)]);
        Ok(data)
    }

    fn get_range_checked(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let data = self.remote.get_range(key, offset, len)?;
        if data.len() as u64 != len {
            return Err(Error::Backend {
                backend: self.remote.describe(),
                op: "get range",
                key: key.to_owned(),
                retryable: true,
                message: format!(
                    "short read: {} of {len} bytes at offset {offset}",
                    data.len()
                ),
            });
        }
        Ok(data)
    }

    /// Keeps `data` (the bytes of `key` from `base`) in the range cache within what the
    /// packs leave of the bound: whole when it fits, else as many of `pieces` (the ranges
    /// the reader asked for, in its order) as fit, the last read first, so a read of an
    /// evicted chunk is cached afterwards even when its window is larger than the room.
    /// Older ranges make way.
    fn keep_ranges(&self, key: &str, base: u64, data: &[u8], pieces: &[(u64, u64)]) {
        let budget = self
            .config
            .cache_size
            .saturating_sub(self.pack_bytes.load(Ordering::Relaxed));
        let whole = [(base, data.len() as u64)];
        let pieces: &[(u64, u64)] = if data.len() as u64 <= budget {
            &whole
        } else {
            pieces
        };
        let mut kept: HashSet<String> = HashSet::new();
        let mut used = 0u64;
        // The last read first: what a least-recently-used cache would keep.
        for &(off, len) in pieces.iter().rev() {
            let start = off.saturating_sub(base) as usize;
            let end = start + len as usize;
            if off < base || end > data.len() || used + len > budget {
                continue;
            }
            let name = range_name(key, off, len);
            if kept.insert(name.clone()) {
                self.ranges.put(&name, &data[start..end], self.now());
                used += len;
            }
        }
        if kept.is_empty() {
            return;
        }
        let (mut bytes, _) = self.ranges.bytes();
        if bytes > budget {
            for (n, b, _) in self.ranges.lru() {
                if bytes <= budget {
                    break;
                }
                if !kept.contains(&n) {
                    self.ranges.remove(&n);
                    bytes -= b;
                }
            }
        }
    }

    /// Fetches one window of an evicted pack (see `crate::fetch`); `pieces` are the chunk
    /// ranges (offset, stored length) the reader needs from it.
    pub(crate) fn fetch_window(
        &self,
        w: &crate::fetch::Window,
        pieces: &[(u64, u64)],
    ) -> Result<Vec<u8>> {
        let data = self
            .get_range_checked(&w.key, w.offset, w.len)
            .map_err(|e| missing_both(e, self))?;
        self.keep_ranges(&w.key, w.offset, &data, pieces);
        Ok(data)
    }

    /// Whether the local store has the object (a pack not evicted).
    pub(crate) fn has_local(&self, key: &str) -> bool {
        matches!(self.local.head(key), Ok(Some(_)))
    }

    /// Whether the range cache holds `[offset, offset + len)` of `key`.
    pub(crate) fn range_cached(&self, key: &str, offset: u64, len: u64) -> bool {
        self.ranges.contains(key, offset, len)
    }
}

/// The newest index snapshot in `remote`: its key and when it was taken (unix ns).
pub fn newest_snapshot(remote: &dyn ObjectStore) -> Result<Option<(String, i64)>> {
    Ok(remote
        .list(SNAPSHOT_PREFIX)?
        .into_iter()
        .filter_map(|m| {
            let at = m
                .key
                .strip_prefix(SNAPSHOT_PREFIX)?
                .strip_suffix(".sqlite.zst")?
                .parse::<i64>()
                .ok()?;
            Some((m.key, at))
        })
        .max_by_key(|(_, at)| *at))
}

fn is_unreachable(e: &Error) -> bool {
    matches!(
        e,
        Error::Backend {
            retryable: true,
            ..
        }
    )
}

#[derive(Default)]
struct Signal {
    stop: bool,
    nudge: bool,
}

/// The background uploader of a tiered store; stops (and joins) when dropped.
pub struct Uploader {
    shared: Arc<(Mutex<Signal>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Uploader {
    /// Push now rather than at the next interval.
    pub fn nudge(&self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|p| p.into_inner()).nudge = true;
        cv.notify_all();
    }

    /// Stops the uploader after the push under way, if any, and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn upload_loop(tier: &Tier, sig: &(Mutex<Signal>, Condvar), every: Duration) {
    let (m, cv) = sig;
    let mut failures = 0u32;
    let mut first = true;
    loop {
        let wait = if first {
            Duration::ZERO
        } else if failures == 0 {
            every
        } else {
            (every * 2u32.saturating_pow(failures.min(8))).min(Duration::from_secs(300))
        };
        {
            let g = m.lock().unwrap_or_else(|p| p.into_inner());
            let (mut g, _) = cv
                .wait_timeout_while(g, wait, |s| !s.stop && !s.nudge)
                .unwrap_or_else(|p| p.into_inner());
            if g.stop {
                return;
            }
            g.nudge = false;
        }
        first = false;
        match tier.push_pending() {
            Ok(r) if r.still_pending == 0 => failures = 0,
            Ok(r) => {
                failures += 1;
                tracing::warn!(
                    pending = r.still_pending,
                    first = r.errors.first().map(String::as_str).unwrap_or(""),
                    "some uploads failed; retrying later"
                );
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "upload to the remote tier failed; retrying later");
            }
        }
    }
}

impl ObjectStore for Tier {
    fn describe(&self) -> String {
        format!(
            "{} in front of {}",
            self.local.describe(),
            self.remote.describe()
        )
    }

    /// Writes go to the local store only; the uploader moves them out.
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.local.put(key, data)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        match self.local.get(key) {
            Err(Error::MissingObject { .. }) => {
                self.remote.get(key).map_err(|e| missing_both(e, self))
            }
            other => other,
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        match self.local.get_range(key, offset, len) {
            Ok(b) => {
                self.note_read(key);
                Ok(b)
            }
            Err(Error::MissingObject { .. }) => self
                .remote_range(key, offset, len)
                .map_err(|e| missing_both(e, self)),
            Err(e) => Err(e),
        }
    }

    /// The local answer, else the remote one; an unreachable remote answers "absent" (so a
    /// seal with the gateway down stores its manifest locally instead of failing).
    fn head(&self, key: &str) -> Result<Option<u64>> {
        if let Some(n) = self.local.head(key)? {
            return Ok(Some(n));
        }
        match self.remote.head(key) {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::debug!(key, error = %e, "remote head failed; answering absent");
                Ok(None)
            }
        }
    }

    /// Both stores' objects, each key once.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut all = self.local.list(prefix)?;
        all.extend(self.remote.list(prefix)?);
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all.dedup_by(|a, b| a.key == b.key);
        Ok(all)
    }

    /// Deletes everywhere (see [`Store::delete_pack_everywhere`]).
    fn delete(&self, key: &str) -> Result<()> {
        self.delete_everywhere(key)
    }
}

fn missing_both(e: Error, t: &Tier) -> Error {
    match e {
        Error::MissingObject { key, .. } => Error::MissingObject {
            key,
            backend: t.describe(),
        },
        other => other,
    }
}

impl Store {
    /// The configuration of the store at `root`, read without opening it (the binary needs
    /// its `[tier]` table to build the remote tier first).
    pub fn config_at(root: &Path) -> Result<crate::store::StoreConfig> {
        crate::store::read_config(root)
    }

    /// Opens a store whose `config.toml` has a `[tier]` table, with `remote` as its remote
    /// tier (the binary builds it from the table's `backend`).
    pub fn open_tiered(root: &Path, remote: Arc<dyn ObjectStore>) -> Result<Self> {
        Self::assemble_tiered(root, remote, None, Arc::new(SystemClock))
    }

    /// [`Store::open_tiered`] with the given clock.
    pub fn open_tiered_with_clock(
        root: &Path,
        remote: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        Self::assemble_tiered(root, remote, None, clock)
    }

    /// Opens a tiered store; with `lock`, an already taken lock and a new, empty index.
    pub(crate) fn assemble_tiered(
        root: &Path,
        remote: Arc<dyn ObjectStore>,
        lock: Option<fs::File>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let config = crate::store::read_config(root)?;
        let Some(tc) = config.tier.clone() else {
            return Err(Error::invalid(
                "store",
                format!(
                    "{} has no remote tier (no [tier] in config.toml)",
                    root.display()
                ),
            ));
        };
        let tier = Arc::new(Tier::new(root, remote, tc, clock.clone())?);
        let mut store = match lock {
            None => Self::open_inner(root, tier.clone(), clock, false)?,
            Some(l) => Self::open_locked(root, l, tier.clone(), clock, true)?,
        };
        let _ = tier.index.set(store.index.clone());
        store.tier = Some(tier.clone());
        tier.sweep_evicted_files()?;
        tier.evict_inner(false)?;
        Ok(store)
    }

    /// Creates a store tiered to `remote` (`opts.tier` must say which backend it is).
    pub fn init_tiered(
        root: &Path,
        opts: &crate::InitOptions,
        remote: Arc<dyn ObjectStore>,
    ) -> Result<Self> {
        if opts.tier.is_none() {
            return Err(Error::invalid(
                "init options",
                "a tiered store needs [tier]",
            ));
        }
        drop(Self::init(root, opts)?);
        let store = Self::open_tiered(root, remote)?;
        if let Some(t) = &store.tier {
            t.remote.put(REMOTE_CONFIG_KEY, &t.config_text)?;
            t.config_uploaded.store(true, Ordering::Relaxed);
        }
        Ok(store)
    }

    /// The remote tier, when the store has one.
    pub fn tier(&self) -> Option<&Arc<Tier>> {
        self.tier.as_ref()
    }

    fn require_tier(&self) -> Result<&Arc<Tier>> {
        self.tier.as_ref().ok_or_else(|| {
            Error::State(format!(
                "store {} has no remote tier (init it with --backend s3://…)",
                self.root().display()
            ))
        })
    }

    /// Uploads what is pending and evicts down to the cache bound; see [`Tier::push_pending`].
    pub fn push_pending(&self) -> Result<PushReport> {
        self.require_tier()?.push_pending()
    }

    /// Uploads an index snapshot now; see [`Tier::upload_snapshot`].
    pub fn upload_index_snapshot(&self) -> Result<String> {
        self.require_tier()?.upload_snapshot()
    }

    /// Where the store's packs and manifests are.
    pub fn tier_status(&self) -> Result<TierStatus> {
        self.require_tier()?.status()
    }

    /// Deletes a pack from every place it is stored: the local cache (pack file and cached
    /// ranges) and the remote tier. For gc: remove the pack's index rows first (its
    /// `packs` row; its `tier_packs` row goes with it) so that nothing is directed to it, then
    /// call this. A crash in between leaves an unreferenced object, which is safe; calling it
    /// again is harmless. With no remote tier, only the local file goes.
    pub fn delete_pack_everywhere(&self, pack: &PackId) -> Result<()> {
        let key = pack_key(pack);
        match &self.tier {
            Some(t) => t.delete_everywhere(&key),
            None => self.objects.delete(&key),
        }
    }
}

impl Store {
    /// An untiered store keeps the lifecycle records in its local object store (same keys and
    /// format as in a bucket), so that `index rebuild` restores retention and holds: this
    /// writes (or, for a run gc deleted, removes) those that the lifecycle events after
    /// `STORE/lifecycle-cursor.local` call for. Called after every change of retention or
    /// holds, seal and gc, and at open. A failure is logged and the records stay due (the
    /// cursor does not move): the change itself is committed and the next call catches up.
    /// A tiered store does nothing here: its pushes write the records to the bucket.
    pub(crate) fn record_lifecycle(&self) {
        if self.tier.is_some() {
            return;
        }
        let _one = self
            .lifecycle_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let cursor = self.root().join(LOCAL_LIFECYCLE_CURSOR);
        let queue = LifecycleQueue {
            index: &self.index,
            dest: &*self.objects,
            cursor: &cursor,
            check: None,
        };
        let mut report = PushReport::default();
        match queue.push(&mut report) {
            Ok(None) => {
                if report.lifecycle > 0 {
                    tracing::debug!(
                        records = report.lifecycle,
                        "local lifecycle records written"
                    );
                }
            }
            Ok(Some(e)) | Err(e) => {
                tracing::warn!(error = %e, "cannot write the local lifecycle records; retried at the next change")
            }
        }
    }
}

/// Reads a written object back: `(key, bytes written)`.
pub(crate) type ReadBack<'a> = dyn Fn(&str, &[u8]) -> Result<()> + 'a;

/// The queue of lifecycle records: brings the records in `dest` (the bucket of a tiered store,
/// the local object store of an untiered one) up to the index, driven by the lifecycle events
/// after the cursor file (see the module documentation).
pub(crate) struct LifecycleQueue<'a> {
    pub index: &'a SharedIndex,
    pub dest: &'a dyn ObjectStore,
    pub cursor: &'a Path,
    /// Reads a written record back (the bucket); `None`: the put is trusted (local store).
    pub check: Option<&'a ReadBack<'a>>,
}

impl LifecycleQueue<'_> {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock()
    }

    /// The `seq` of the last lifecycle event whose record is in the bucket (0: none yet).
    fn cursor(&self) -> i64 {
        match fs::read_to_string(self.cursor) {
            Ok(t) => t.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(file = %self.cursor.display(), "unreadable lifecycle cursor; writing every lifecycle record again");
                0
            }),
            Err(_) => 0,
        }
    }

    fn save_cursor(&self, seq: i64) -> Result<()> {
        let tmp = self.cursor.with_extension("tmp");
        fs::write(&tmp, format!("{seq}\n"))
            .and_then(|()| fs::rename(&tmp, self.cursor))
            .map_err(|e| Error::io("write", self.cursor, e))
    }

    /// The runs and namespaces named by lifecycle events after the cursor, each once with the
    /// `seq` of its first such event and whether all of them were seals, oldest first; and
    /// the newest `seq` looked at.
    fn targets(&self) -> Result<(Vec<LifecycleTarget>, i64)> {
        let after = self.cursor();
        let idx = self.index();
        let upto = idx.tier_last_event_seq()?;
        let mut targets: Vec<LifecycleTarget> = Vec::new();
        let mut at: HashMap<(String, Option<String>), usize> = HashMap::new();
        for e in idx.tier_lifecycle_events(after, upto)? {
            let seal = e.kind == "run.sealed";
            let key = (e.namespace.clone(), e.run.clone());
            match at.get(&key) {
                Some(&i) => targets[i].3 &= seal,
                None => {
                    at.insert(key, targets.len());
                    targets.push((e.seq, e.namespace, e.run, seal));
                }
            }
        }
        Ok((targets, upto))
    }

    /// What to do with the lifecycle record of run `run` (or the default of) `namespace`.
    fn action(
        &self,
        namespace: &str,
        run: Option<&str>,
        only_seals: bool,
        seq: i64,
    ) -> Result<LifecycleAction> {
        let idx = self.index();
        let key = lifecycle_key(namespace, run);
        let Some(run) = run else {
            return Ok(LifecycleAction::Put(
                key,
                LifecycleRecord {
                    format: LIFECYCLE_FORMAT,
                    namespace: namespace.to_owned(),
                    run: None,
                    manifest: None,
                    retain: idx.namespace_retention(namespace)?,
                    retain_for_ns: None,
                    retain_until: None,
                    holds: Vec::new(),
                    version: idx.tier_lifecycle_version(namespace, None)?.unwrap_or(0),
                    seq,
                },
            ));
        };
        let Ok(r) = crate::names::RunRef::new(namespace, run) else {
            return Ok(LifecycleAction::Skip);
        };
        let row = match idx.run(&r)? {
            None => return Ok(LifecycleAction::Delete(key)),
            Some(row) if row.state != "sealed" => return Ok(LifecycleAction::Skip),
            Some(row) => row,
        };
        let rr = idx.run_retention(&row)?;
        if only_seals && rr.retention.spec.is_none() && rr.holds.is_empty() {
            return Ok(LifecycleAction::Skip);
        }
        let version = idx
            .tier_lifecycle_version(namespace, Some(run))?
            .or(row.sealed_at_ns)
            .unwrap_or(row.created_at_ns);
        Ok(LifecycleAction::Put(
            key,
            LifecycleRecord {
                format: LIFECYCLE_FORMAT,
                namespace: namespace.to_owned(),
                run: Some(run.to_owned()),
                manifest: row.manifest.map(|d| d.to_hex()),
                retain: rr.retention.spec,
                retain_for_ns: rr.retention.for_ns,
                retain_until: rr.retention.until_ns,
                holds: rr
                    .holds
                    .into_iter()
                    .map(|h| LifecycleHold {
                        name: h.name,
                        reason: h.reason,
                        placed_at: h.placed_at_ns,
                    })
                    .collect(),
                version,
                seq,
            },
        ))
    }

    /// Runs and namespaces whose lifecycle record is not yet in the bucket.
    fn pending(&self) -> Result<u64> {
        let (targets, upto) = self.targets()?;
        let mut n = 0;
        for (_, ns, run, seals) in targets {
            if !matches!(
                self.action(&ns, run.as_deref(), seals, upto)?,
                LifecycleAction::Skip
            ) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes one lifecycle record, unless the bucket holds a newer version of it.
    fn put(&self, key: &str, rec: &LifecycleRecord) -> Result<bool> {
        match self.dest.get(key) {
            Ok(b) => match LifecycleRecord::from_bytes(&b, key) {
                Ok(old) if old.version > rec.version => {
                    tracing::info!(
                        key,
                        version = rec.version,
                        bucket_version = old.version,
                        "the object store holds a newer lifecycle record; kept"
                    );
                    return Ok(false);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "replacing an unreadable lifecycle record")
                }
            },
            Err(Error::MissingObject { .. }) => {}
            Err(e) => return Err(e),
        }
        let bytes = serde_json::to_vec(rec)
            .map_err(|e| Error::Internal(format!("encode lifecycle record: {e}")))?;
        self.dest.put(key, &bytes)?;
        if let Some(check) = self.check {
            check(key, &bytes)?;
        }
        Ok(true)
    }

    /// Brings the bucket's lifecycle records up to the index (see the module documentation).
    /// Returns the first failure; the cursor then stays before the event that failed.
    fn push(&self, report: &mut PushReport) -> Result<Option<Error>> {
        let (targets, upto) = self.targets()?;
        if targets.is_empty() {
            if upto != self.cursor() && upto > 0 {
                self.save_cursor(upto)?;
            }
            return Ok(None);
        }
        let mut cursor = upto;
        let mut failure = None;
        let total = targets.len();
        for (i, (first, ns, run, seals)) in targets.into_iter().enumerate() {
            let done = match self.action(&ns, run.as_deref(), seals, upto)? {
                LifecycleAction::Skip => continue,
                LifecycleAction::Put(key, rec) => self.put(&key, &rec).map(|_| key),
                LifecycleAction::Delete(key) => self.dest.delete(&key).map(|()| key),
            };
            match done {
                Ok(key) => {
                    tracing::debug!(key, "lifecycle record written");
                    report.lifecycle += 1;
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, run = run.as_deref().unwrap_or(""), error = %e,
                        "lifecycle record upload failed; it stays pending");
                    if report.errors.len() < 5 {
                        report.errors.push(e.to_string());
                    }
                    report.still_pending += (total - i) as u64;
                    cursor = first - 1;
                    failure = Some(e);
                    break;
                }
            }
        }
        if cursor != self.cursor() {
            self.save_cursor(cursor)?;
        }
        Ok(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InitOptions;
    use crate::objstore::MemoryStore;

    /// A remote that can be switched off.
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
        range_gets: AtomicU64,
        /// Ranged GETs return one byte less than asked.
        short: AtomicBool,
    }

    impl Flaky {
        fn new() -> Self {
            Self {
                inner: MemoryStore::default(),
                down: AtomicBool::new(false),
                range_gets: AtomicU64::new(0),
                short: AtomicBool::new(false),
            }
        }
        fn check(&self) -> Result<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(Error::Backend {
                    backend: "flaky".into(),
                    op: "any",
                    key: String::new(),
                    retryable: true,
                    message: "down".into(),
                })
            } else {
                Ok(())
            }
        }
    }

    impl ObjectStore for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn put(&self, key: &str, data: &[u8]) -> Result<()> {
            self.check()?;
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>> {
            self.check()?;
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            self.check()?;
            self.range_gets.fetch_add(1, Ordering::SeqCst);
            let mut b = self.inner.get_range(key, offset, len)?;
            if self.short.load(Ordering::SeqCst) {
                b.pop();
            }
            Ok(b)
        }
        fn head(&self, key: &str) -> Result<Option<u64>> {
            self.check()?;
            self.inner.head(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
            self.check()?;
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.check()?;
            self.inner.delete(key)
        }
    }

    fn tiered(dir: &Path, remote: Arc<Flaky>, cache_size: u64) -> Store {
        let opts = InitOptions {
            pack_target_size: 1 << 20,
            tier: Some(TierConfig {
                cache_size,
                ..TierConfig::new("s3://test/x")
            }),
            ..InitOptions::default()
        };
        Store::init_tiered(&dir.join("store"), &opts, remote).unwrap()
    }

    fn ingest(store: &Store, dir: &Path, run: &str, seed: u64, n: usize) -> Vec<u8> {
        let src = dir.join(format!("src-{seed}"));
        fs::create_dir_all(&src).unwrap();
        let mut data = vec![0u8; n];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.finalize_xof().fill(&mut data);
        fs::write(src.join("f"), &data).unwrap();
        store
            .ingest_dir(
                &src,
                &crate::RunRef::parse(run).unwrap(),
                Default::default(),
                &crate::NoProgress,
            )
            .unwrap();
        data
    }

    fn read(store: &Store, run: &str) -> Vec<u8> {
        let e = store
            .entry(&crate::RunRef::parse(run).unwrap(), "f")
            .unwrap();
        let mut out = Vec::new();
        store.read_file_to(&e, &mut out).unwrap();
        out
    }

    #[test]
    fn push_evict_and_read_back_through_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 0);
        let data = ingest(&store, dir.path(), "ns/a", 1, 3 << 20);
        let s = store.tier_status().unwrap();
        assert!(s.counts.pending_packs >= 2, "{s:?}");
        assert_eq!(s.counts.pending_manifests, 1);
        let r = store.push_pending().unwrap();
        assert_eq!(r.packs, s.counts.pending_packs);
        assert_eq!(r.manifests, 1);
        assert_eq!(
            r.evicted_packs, r.packs,
            "cache size 0 evicts everything remote"
        );
        let s = store.tier_status().unwrap();
        assert_eq!(s.counts.remote_only_packs, r.packs);
        assert_eq!((s.counts.pending_packs, s.counts.both_packs), (0, 0));
        assert_eq!(s.cache_bytes, 0);
        assert!(store.objects.list("packs/").unwrap().len() as u64 == r.packs);
        assert!(
            store
                .tier()
                .unwrap()
                .local()
                .list("packs/")
                .unwrap()
                .is_empty(),
            "evicted"
        );
        assert_eq!(read(&store, "ns/a"), data);
        assert!(remote.range_gets.load(Ordering::SeqCst) > 0);
        // Down: evicted data fails with the backend named; nothing pending is lost.
        remote.down.store(true, Ordering::SeqCst);
        let e = store
            .entry(&crate::RunRef::parse("ns/a").unwrap(), "f")
            .unwrap();
        let err = store.read_file_to(&e, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("flaky"), "{err}");
    }

    #[test]
    fn a_cold_file_read_is_one_coalesced_get_per_pack_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 0);
        let data = ingest(&store, dir.path(), "ns/a", 8, 5 << 20);
        store.push_pending().unwrap();
        let e = store
            .entry(&crate::RunRef::parse("ns/a").unwrap(), "f")
            .unwrap();
        let packs_of = |store: &Store| {
            let mut packs: Vec<PackId> = Vec::new();
            for c in &e.chunks {
                let p = store.index().chunk(&c.0).unwrap().unwrap().pack;
                if !packs.contains(&p) {
                    packs.push(p);
                }
            }
            packs
        };
        let packs = packs_of(&store);
        assert!(
            e.chunks.len() > 2 * packs.len(),
            "{} chunks",
            e.chunks.len()
        );
        assert_eq!(read(&store, "ns/a"), data);
        assert_eq!(
            remote.range_gets.load(Ordering::SeqCst),
            packs.len() as u64,
            "one window per pack, not one GET per chunk"
        );
        // A short answer is an error naming the backend and key, never wrong bytes.
        remote.short.store(true, Ordering::SeqCst);
        let err = store.read_file_to(&e, &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("flaky") && err.to_string().contains("short read"),
            "{err}"
        );
        remote.short.store(false, Ordering::SeqCst);
        // With room in the cache, the windows are kept: a second read makes no request.
        let dir2 = tempfile::tempdir().unwrap();
        let remote2 = Arc::new(Flaky::new());
        let store2 = tiered(dir2.path(), remote2.clone(), 0);
        ingest(&store2, dir2.path(), "ns/a", 8, 5 << 20);
        store2.push_pending().unwrap();
        drop(store2);
        let mut cfg = fs::read_to_string(dir2.path().join("store/config.toml")).unwrap();
        cfg = cfg.replace("cache_size = 0", "cache_size = 104857600");
        fs::write(dir2.path().join("store/config.toml"), cfg).unwrap();
        let store2 = Store::open_tiered(&dir2.path().join("store"), remote2.clone()).unwrap();
        assert_eq!(read(&store2, "ns/a"), data);
        let after_first = remote2.range_gets.load(Ordering::SeqCst);
        assert_eq!(after_first, packs_of(&store2).len() as u64);
        assert_eq!(read(&store2, "ns/a"), data);
        assert_eq!(remote2.range_gets.load(Ordering::SeqCst), after_first);
        // Single-chunk reads (the mount's path) are served from inside the cached windows.
        for c in &e.chunks {
            store2.read_chunk(&c.0).unwrap();
        }
        assert_eq!(remote2.range_gets.load(Ordering::SeqCst), after_first);
    }

    #[test]
    fn nothing_unsafe_is_evicted_while_the_remote_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 0);
        remote.down.store(true, Ordering::SeqCst);
        let data = ingest(&store, dir.path(), "ns/a", 2, 2 << 20);
        assert!(store.push_pending().is_err());
        let s = store.tier_status().unwrap();
        assert!(s.counts.pending_packs > 0);
        assert_eq!(s.counts.remote_only_packs + s.counts.both_packs, 0);
        assert_eq!(read(&store, "ns/a"), data);
        remote.down.store(false, Ordering::SeqCst);
        let r = store.push_pending().unwrap();
        assert_eq!((r.still_pending, r.manifests), (0, 1));
        assert_eq!(store.tier_status().unwrap().counts.pending_packs, 0);
        assert_eq!(read(&store, "ns/a"), data);
    }

    #[test]
    fn a_push_that_uploads_records_one_event() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 1 << 30);
        let uploaded = |s: &Store| -> Vec<serde_json::Value> {
            s.events(0, 1000)
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "tier.uploaded")
                .map(|e| {
                    assert_eq!((e.namespace.as_deref(), e.run.as_deref()), (None, None));
                    e.detail
                })
                .collect()
        };
        ingest(&store, dir.path(), "ns/a", 6, 2 << 20);
        // A failed push uploads nothing and records nothing.
        remote.down.store(true, Ordering::SeqCst);
        assert!(store.push_pending().is_err());
        assert!(uploaded(&store).is_empty());
        remote.down.store(false, Ordering::SeqCst);
        let r = store.push_pending().unwrap();
        let ev = uploaded(&store);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["packs"], r.packs);
        assert_eq!(ev[0]["pack_bytes"], r.pack_bytes);
        assert_eq!(ev[0]["manifests"], 1);
        assert_eq!(ev[0]["still_pending"], 0);
        assert_eq!(ev[0]["backend"], "flaky");
        // Nothing pending: no upload, no event.
        store.push_pending().unwrap();
        assert_eq!(uploaded(&store).len(), 1);
    }

    #[test]
    fn chunks_of_a_window_larger_than_the_room_are_cached_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        // 2 MiB of random bytes in packs of a 1 MiB target: the first pack closes at 1 to
        // 1.25 MiB (chunks are at most 256 KiB), so the second holds at least 0.75 MiB.
        // Neither fits a 512 KiB bound: both are evicted, and a whole-pack window never fits,
        // but its chunks do.
        let bound = 512 << 10;
        let store = tiered(dir.path(), remote.clone(), bound);
        let data = ingest(&store, dir.path(), "ns/a", 7, 2 << 20);
        store.push_pending().unwrap();
        let s = store.tier_status().unwrap();
        assert_eq!((s.counts.both_packs, s.cache_bytes), (0, 0), "{s:?}");
        assert_eq!(s.counts.remote_only_packs, 2, "{s:?}");
        assert_eq!(read(&store, "ns/a"), data);
        let s = store.tier_status().unwrap();
        assert!(s.range_cache_entries > 0, "{s:?}");
        assert!(s.cache_bytes <= bound && s.cache_bytes > 0, "{s:?}");
        // A chunk kept in the range cache reads again without a GET.
        let e = store
            .entry(&crate::RunRef::parse("ns/a").unwrap(), "f")
            .unwrap();
        let tier = store.tier().unwrap();
        let kept = e
            .chunks
            .iter()
            .map(|c| c.0)
            .find(|id| {
                let l = store.index().chunk(id).unwrap().unwrap();
                tier.range_cached(
                    &pack_key(&l.pack),
                    l.entry.offset,
                    u64::from(l.entry.stored_len),
                )
            })
            .expect("some chunk of the file is cached");
        let gets = remote.range_gets.load(Ordering::SeqCst);
        assert!(!store.read_chunk(&kept).unwrap().is_empty());
        assert_eq!(remote.range_gets.load(Ordering::SeqCst), gets);
    }

    #[test]
    fn cache_bound_keeps_recently_read_packs() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 3 << 20);
        ingest(&store, dir.path(), "ns/a", 3, 4 << 20);
        ingest(&store, dir.path(), "ns/b", 4, 4 << 20);
        store.push_pending().unwrap();
        let s = store.tier_status().unwrap();
        assert!(s.cache_bytes <= 3 << 20, "{s:?}");
        assert!(
            s.counts.remote_only_packs > 0 && s.counts.both_packs > 0,
            "{s:?}"
        );
        // The uploader API: start, nudge, stop.
        let up = store
            .tier()
            .unwrap()
            .start_uploader(Duration::from_secs(3600));
        up.nudge();
        up.stop();
    }

    #[test]
    fn delete_everywhere_removes_local_and_remote() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 1 << 30);
        ingest(&store, dir.path(), "ns/a", 5, 1 << 20);
        store.push_pending().unwrap();
        let (id, _) = store.index().packs().unwrap()[0];
        assert!(remote.head(&pack_key(&id)).unwrap().is_some());
        store.delete_pack_everywhere(&id).unwrap();
        assert!(remote.head(&pack_key(&id)).unwrap().is_none());
        assert!(
            store
                .tier()
                .unwrap()
                .local()
                .head(&pack_key(&id))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn lifecycle_changes_queue_while_down_and_survive_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(Flaky::new());
        let store = tiered(dir.path(), remote.clone(), 1 << 30);
        ingest(&store, dir.path(), "ns/a", 7, 1 << 20);
        let a = crate::RunRef::parse("ns/a").unwrap();
        store.push_pending().unwrap();
        assert!(store.upload_index_snapshot().is_ok());
        let key = lifecycle_key("ns", Some("a"));
        assert!(
            remote.inner.head(&key).unwrap().is_none(),
            "no retention, no record"
        );
        // Changes while the bucket is down are made at once and stay pending.
        remote.down.store(true, Ordering::SeqCst);
        store.set_retention(&a, "30d", None).unwrap();
        store.place_hold(&a, "legal", b"case 17").unwrap();
        store.set_namespace_retention("ns", Some("90d")).unwrap();
        assert_eq!(store.tier_status().unwrap().pending_lifecycle, 2);
        assert!(store.push_pending().is_err());
        assert_eq!(store.tier_status().unwrap().pending_lifecycle, 2);
        remote.down.store(false, Ordering::SeqCst);
        let r = store.push_pending().unwrap();
        assert_eq!((r.lifecycle, r.still_pending), (2, 0), "{r:?}");
        assert_eq!(store.tier_status().unwrap().pending_lifecycle, 0);
        let rec = LifecycleRecord::from_bytes(&remote.inner.get(&key).unwrap(), &key).unwrap();
        assert_eq!(rec.retain.as_deref(), Some("30d"));
        assert_eq!(rec.holds.len(), 1);
        assert_eq!(rec.holds[0].reason, "case 17");
        // A newer change rewrites it with a larger version.
        store.set_retention(&a, "60d", None).unwrap();
        store.push_pending().unwrap();
        let rec2 = LifecycleRecord::from_bytes(&remote.inner.get(&key).unwrap(), &key).unwrap();
        assert_eq!(rec2.retain.as_deref(), Some("60d"));
        assert!(rec2.version > rec.version);
        let want = store.retention_info(&a).unwrap();
        drop(store);
        // The snapshot predates every change: the records bring them back.
        let (new, report) = Store::init_from_remote(
            &dir.path().join("new"),
            remote.clone(),
            TierConfig::new("s3://test/x"),
        )
        .unwrap();
        assert!(report.snapshot.is_some(), "{report:?}");
        assert_eq!(report.lifecycle_restored, 2, "{report:?}");
        let got = new.retention_info(&a).unwrap();
        assert_eq!(got.retain, want.retain);
        assert_eq!(got.retain_until, want.retain_until);
        assert_eq!(got.holds, want.holds);
        assert_eq!(
            new.namespace_retention("ns").unwrap().as_deref(),
            Some("90d")
        );
        let mut kinds: Vec<_> = new
            .events(0, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| {
                e.detail["rebuilt"] == true && e.kind != "run.opened" && e.kind != "run.sealed"
            })
            .map(|e| e.kind)
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            ["namespace.retention", "run.hold_placed", "run.retention"]
        );
    }
}
