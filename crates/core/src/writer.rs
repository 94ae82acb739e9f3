//! The chunk write pipeline: dedup, compression on a worker pool, pack assembly, durable writes.
//!
//! ```text
//! readers x R (read, cut) --chunks, file pieces--> [workers x N: hash, dedup, compress]
//!                          --> packer (append to the reader's lane's pack, hash) --> flusher (put, index)
//! ```
//!
//! Two ways in. [`ChunkWriter::submit`] hashes a chunk on the caller's thread, copies it only if
//! it is new, and returns its reference at once (the mount's seal uses it). Directory ingest
//! uses shared read blocks instead: the reader reads a file into a [`Block`] from the writer's
//! pool, cuts chunks as ranges of it, and hands each range to the workers
//! ([`ChunkWriter::submit_many_in_block`], all of a block's chunks in one message, whether cut
//! from one large file or from the small files that share the block); no chunk is copied on its
//! way in, and a duplicate is never copied at all. Several readers may submit at once, each
//! on a lane of its own: the packer fills one pack per lane, so a reader's chunks stay together
//! in packs as one reader's would (ADR 0034). The workers also hash the file itself, in aligned
//! pieces ([`ChunkWriter::hash_piece`], [`file_hash_from_pieces`]), so that the reader only
//! reads and cuts. Ids and piece hashes of this second way are known after
//! [`ChunkWriter::finish_with_ids`], by sequence number.
//!
//! A chunk already indexed (or already taken on by this writer) is not stored again. New chunks
//! are compressed (or kept raw) and appended to an in-memory pack, which is hashed as it grows
//! (its id is the BLAKE3 of its bytes). A full pack is written with `ObjectStore::put` (durable
//! on return) and only then inserted into the index. `finish` flushes the last pack: after it
//! returns `Ok`, every submitted chunk is durable and indexed, so a manifest referring to them
//! may be committed.
//!
//! Memory is bounded: channels are bounded, the block pool holds a fixed number of blocks (the
//! reader waits for one to come back when all are in use), a pack is at most its target size
//! plus one chunk, and pack and compression buffers are recycled rather than reallocated.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use crate::clock::{Clock, to_unix_ns};
use crate::codec::{self, Codec};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::index::{ReadPool, SharedIndex};
use crate::manifest::ChunkRef;
use crate::objstore::ObjectStore;
use crate::pack::{HEADER, PackBuilder, pack_key};

/// New bytes of a file in each read block, and the size of the pieces its whole-file BLAKE3 is
/// computed in. A power-of-two multiple of BLAKE3's 1 KiB chunk: every piece but the last is
/// then a complete subtree of the file's hash tree, which a worker can hash on its own.
pub const FILE_PIECE: usize = 2 << 20;

/// The chaining value (or, for a file of one piece, the hash) of the piece of a file that
/// starts at `offset`, a multiple of [`FILE_PIECE`]; see [`file_hash_from_pieces`].
pub fn hash_file_piece(offset: u64, data: &[u8], whole_file: bool) -> [u8; 32] {
    use blake3::hazmat::HasherExt;
    if whole_file {
        debug_assert_eq!(offset, 0);
        *blake3::hash(data).as_bytes()
    } else {
        blake3::Hasher::new()
            .set_input_offset(offset)
            .update(data)
            .finalize_non_root()
    }
}

/// The BLAKE3 of a file from the chaining values of its pieces, in order: all pieces but the
/// last of the same power-of-two size (at least 1 KiB), the last of 1 byte up to that size,
/// at least two pieces (a file of one piece is hashed whole). Joins them as BLAKE3's tree does:
/// the left subtree of a node holds the largest power of two of pieces that leaves at least one
/// byte for the right.
pub fn file_hash_from_pieces(cvs: &[[u8; 32]]) -> blake3::Hash {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    fn left_len(n: usize) -> usize {
        // The largest power of two <= n - 1, for n >= 2.
        1 << (usize::BITS - 1 - (n - 1).leading_zeros())
    }
    fn subtree(cvs: &[[u8; 32]]) -> [u8; 32] {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let l = left_len(cvs.len());
        merge_subtrees_non_root(&subtree(&cvs[..l]), &subtree(&cvs[l..]), Mode::Hash)
    }
    assert!(cvs.len() >= 2, "a file of one piece is hashed whole");
    let l = left_len(cvs.len());
    merge_subtrees_root(&subtree(&cvs[..l]), &subtree(&cvs[l..]), Mode::Hash)
}

/// What a writer stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Chunks submitted (including duplicates).
    pub chunks: u64,
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// Plaintext bytes of new chunks.
    pub new_raw_bytes: u64,
    /// Bytes of packs written.
    pub pack_bytes: u64,
    /// Packs written.
    pub packs: u64,
}

/// What a finished writer hands back.
#[derive(Debug)]
pub struct Finished {
    pub stats: WriteStats,
    /// Ids of the chunks given to [`ChunkWriter::submit_many_in_block`], by sequence number.
    pub ids: Vec<ChunkId>,
    /// Results of [`ChunkWriter::hash_piece`], by sequence number.
    pub pieces: Vec<[u8; 32]>,
}

/// Settings for a writer.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub compression_level: i32,
    pub pack_target_size: u64,
    pub workers: usize,
    /// Packs filled at once, one per reader of [`ChunkWriter::submit_many_in_block`] (its
    /// `lane`): each reader's chunks then stay together in packs of their own, as one reader's
    /// would, instead of alternating block by block with another's. At least 1.
    pub lanes: usize,
}

/// A read buffer that chunks are cut from as ranges, shared (`Arc`) by the work items that
/// refer to it. When the last one is done with it, its memory goes back to the writer's pool.
pub struct Block {
    data: Vec<u8>,
    home: Sender<Vec<u8>>,
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // The pool's channel has room for every block there is; if the writer is gone, the
        // memory is simply freed.
        let _ = self.home.try_send(std::mem::take(&mut self.data));
    }
}

/// The read buffers of one writer: at most `cap` exist, so a reader that runs ahead of the
/// workers waits for one to come back.
struct BlockPool {
    home: Sender<Vec<u8>>,
    free: Receiver<Vec<u8>>,
    made: AtomicUsize,
    cap: usize,
}

struct Shared {
    error: Mutex<Option<Error>>,
    stats: Mutex<WriteStats>,
    /// Chunks this writer has taken on to store (never removed while it runs).
    pending: Mutex<HashSet<ChunkId>>,
    /// Ids of chunks submitted in blocks, by sequence number.
    ids: Mutex<Vec<ChunkId>>,
    /// Results of file pieces, by sequence number.
    pieces: Mutex<Vec<[u8; 32]>>,
    index: Arc<SharedIndex>,
    reads: Arc<ReadPool>,
}

/// What the caller hands to the workers.
enum Work {
    /// Hashed, and known to be new: compress and store.
    New(ChunkId, Vec<u8>),
    /// Chunks in one block, not hashed yet, under the sequence numbers from `first` on: hash
    /// each, record its id under its number, dedup, maybe store. One message for all of them.
    Chunks {
        first: u64,
        lane: usize,
        block: Arc<Block>,
        ranges: Vec<Range<usize>>,
    },
    /// A piece of a file: hash it (see [`hash_file_piece`]) and record the result under `seq`.
    Piece {
        seq: u64,
        block: Arc<Block>,
        range: Range<usize>,
        offset: u64,
        whole_file: bool,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stores `value` at `seq` of a table filled out of order by the workers.
fn record<T: Copy>(table: &Mutex<Vec<T>>, seq: u64, value: T, blank: T) {
    let mut t = lock(table);
    let seq = seq as usize;
    if t.len() <= seq {
        t.resize(seq + 1, blank);
    }
    t[seq] = value;
}

impl Shared {
    /// Claims `id` for storing: false if the store or this writer already has it. The lookup
    /// takes a read-only connection of the store's pool (ADR 0019): the flusher holds the
    /// shared connection while it commits a pack, which waits for an fsync, and in WAL mode
    /// another connection reads meanwhile. If the pool cannot lend one, the shared connection
    /// answers.
    fn claim(&self, id: &ChunkId) -> Result<bool> {
        if lock(&self.pending).contains(id) {
            return Ok(false);
        }
        let indexed = self.reads.read_or(&self.index, |idx| idx.has_chunk(id))?;
        if indexed {
            return Ok(false);
        }
        Ok(lock(&self.pending).insert(*id))
    }

    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// Marks the pipeline failed if a thread of it unwinds, so that no one waits for it.
struct FailOnPanic<'a>(&'a Shared, &'static str);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(Error::Internal(format!("{} panicked", self.1)));
        }
    }
}

/// The bytes of a chunk as stored: compressed into a buffer of their own, or (kept raw) the
/// caller's bytes, still in their block.
enum Stored {
    Owned(Vec<u8>),
    InBlock(Arc<Block>, Range<usize>),
}

impl Stored {
    fn bytes(&self) -> &[u8] {
        match self {
            Stored::Owned(v) => v,
            Stored::InBlock(b, r) => &b[r.clone()],
        }
    }
}

struct Compressed {
    /// The pack lane it goes to (see [`WriterConfig::lanes`]).
    lane: usize,
    id: ChunkId,
    codec: Codec,
    raw_len: usize,
    stored: Stored,
}

/// A running pipeline. Dropping it without `finish` still drains it: queued chunks are written
/// and indexed (harmless: unreferenced chunks are gc's to reclaim), and errors are dropped.
pub struct ChunkWriter {
    to_workers: Option<Sender<Work>>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    pool: BlockPool,
    lanes: usize,
    submitted: AtomicU64,
    in_blocks: AtomicU64,
    pieces: AtomicU64,
}

impl ChunkWriter {
    /// Starts the pipeline's threads.
    pub fn new(
        index: Arc<SharedIndex>,
        reads: Arc<ReadPool>,
        objects: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
        config: WriterConfig,
    ) -> Self {
        let workers_n = config.workers.max(1);
        let lanes = config.lanes.max(1);
        let (to_workers, work_rx) = bounded::<Work>(workers_n * 4);
        let (to_packer, pack_rx) = bounded::<Compressed>(workers_n * 4);
        // Compression buffers the packer is done with, back to the workers.
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(workers_n * 4);
        let shared = Arc::new(Shared {
            error: Mutex::new(None),
            stats: Mutex::new(WriteStats::default()),
            pending: Mutex::new(HashSet::new()),
            ids: Mutex::new(Vec::new()),
            pieces: Mutex::new(Vec::new()),
            index: index.clone(),
            reads,
        });
        let workers = (0..workers_n)
            .map(|i| {
                let rx = work_rx.clone();
                let tx = to_packer.clone();
                let spare = spare_rx.clone();
                let level = config.compression_level;
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("afs-compress-{i}"))
                    .spawn(move || compress_loop(rx, tx, spare, level, &shared))
                    .expect("spawn compression worker")
            })
            .collect();
        drop(to_packer);
        // One pack may wait while another is written: bounded memory, overlapping I/O. A
        // written pack's buffer goes back to the packer for the next pack; room for one per
        // lane, so that none is dropped (and a fresh one faulted in, page by page) while the
        // lanes take turns.
        let (to_flusher, flush_rx) = bounded::<SealedPack>(1);
        let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(lanes + 1);
        let packer = {
            let shared = shared.clone();
            let target = config.pack_target_size;
            std::thread::Builder::new()
                .name("afs-packer".into())
                .spawn(move || {
                    let out = PackOut {
                        to_flusher,
                        recycled: recycle_rx,
                        spare: spare_tx,
                    };
                    pack_loop(pack_rx, out, lanes, target, &shared)
                })
                .expect("spawn packer")
        };
        let flusher = {
            let index = index.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("afs-flusher".into())
                .spawn(move || {
                    flush_loop(flush_rx, recycle_tx, &*objects, &index, &*clock, &shared)
                })
                .expect("spawn flusher")
        };
        // Enough blocks for each reader to fill one while it keeps the one before (a file's
        // uncut tail), each worker hashes another and the queues hold a few more; each is
        // FILE_PIECE plus a chunk's tail.
        let cap = 2 * workers_n + 2 * lanes;
        let (home, free) = bounded::<Vec<u8>>(cap);
        Self {
            to_workers: Some(to_workers),
            workers,
            packer: Some(packer),
            flusher: Some(flusher),
            shared,
            pool: BlockPool {
                home,
                free,
                made: AtomicUsize::new(0),
                cap,
            },
            lanes,
            submitted: AtomicU64::new(0),
            in_blocks: AtomicU64::new(0),
            pieces: AtomicU64::new(0),
        }
    }

    /// Stores a chunk (unless the store has it) and returns its reference.
    pub fn submit(&self, data: &[u8]) -> Result<ChunkRef> {
        let id = ChunkId::of(data);
        self.submit_hashed(id, data)?;
        Ok(ChunkRef(id, data.len() as u32))
    }

    /// As [`ChunkWriter::submit`] with the id already computed; copies `data` only if the
    /// chunk is new.
    pub fn submit_hashed(&self, id: ChunkId, data: &[u8]) -> Result<()> {
        self.submitted.fetch_add(1, Ordering::Relaxed);
        if !self.shared.claim(&id)? {
            return Ok(());
        }
        self.send(Work::New(id, data.to_vec()))
    }

    /// An empty buffer of at least `capacity` bytes from the pool, to read into and then
    /// [`share`](ChunkWriter::share). Waits while every block of the pool is in use.
    pub fn block_buffer(&self, capacity: usize) -> Result<Vec<u8>> {
        let p = &self.pool;
        let made_one = || {
            p.made
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < p.cap).then_some(n + 1)
                })
                .is_ok()
        };
        let mut buf = match p.free.try_recv() {
            Ok(b) => b,
            Err(_) if made_one() => Vec::new(),
            Err(_) => loop {
                match p.free.recv_timeout(Duration::from_millis(100)) {
                    Ok(b) => break b,
                    Err(RecvTimeoutError::Timeout) if !self.shared.failed() => {}
                    Err(_) => return Err(self.take_error()),
                }
            },
        };
        buf.clear();
        buf.reserve(capacity);
        Ok(buf)
    }

    /// Freezes a buffer filled by the caller into a block that chunks can be cut from.
    pub fn share(&self, data: Vec<u8>) -> Arc<Block> {
        Arc::new(Block {
            data,
            home: self.pool.home.clone(),
        })
    }

    /// Queues the chunks `block[range]` of each of `ranges`, in one message to the workers,
    /// without hashing or copying them here; returns the sequence number of the first (the
    /// others follow it), whose ids [`ChunkWriter::finish_with_ids`] gives. New chunks go to
    /// the packs of `lane` (taken modulo [`WriterConfig::lanes`]): several readers may submit
    /// at once, each on a lane of its own.
    pub fn submit_many_in_block(
        &self,
        lane: usize,
        block: &Arc<Block>,
        ranges: Vec<Range<usize>>,
    ) -> Result<u64> {
        let n = ranges.len() as u64;
        let first = self.in_blocks.fetch_add(n, Ordering::Relaxed);
        if ranges.is_empty() {
            return Ok(first);
        }
        self.submitted.fetch_add(n, Ordering::Relaxed);
        self.send(Work::Chunks {
            first,
            lane: lane % self.lanes,
            block: block.clone(),
            ranges,
        })?;
        Ok(first)
    }

    /// Queues `block[range]`, the piece of a file at `offset` (a multiple of [`FILE_PIECE`]),
    /// for [`hash_file_piece`] on a worker; returns its sequence number, whose result
    /// [`ChunkWriter::finish_with_ids`] gives.
    pub fn hash_piece(
        &self,
        block: &Arc<Block>,
        range: Range<usize>,
        offset: u64,
        whole_file: bool,
    ) -> Result<u64> {
        debug_assert!(offset.is_multiple_of(FILE_PIECE as u64));
        let seq = self.pieces.fetch_add(1, Ordering::Relaxed);
        self.send(Work::Piece {
            seq,
            block: block.clone(),
            range,
            offset,
            whole_file,
        })?;
        Ok(seq)
    }

    fn send(&self, w: Work) -> Result<()> {
        if self.shared.failed() {
            return Err(self.take_error());
        }
        let tx = self
            .to_workers
            .as_ref()
            .ok_or_else(|| Error::Internal("chunk writer used after finish".into()))?;
        if tx.send(w).is_err() {
            return Err(self.take_error());
        }
        Ok(())
    }

    fn take_error(&self) -> Error {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Error::Internal("chunk pipeline stopped".into()))
    }

    /// Flushes everything; after `Ok`, all submitted chunks are durable and indexed.
    pub fn finish(self) -> Result<WriteStats> {
        self.finish_with_ids().map(|f| f.stats)
    }

    /// As [`ChunkWriter::finish`], also returning the ids of chunks submitted in blocks and
    /// the results of file pieces, by sequence number.
    pub fn finish_with_ids(mut self) -> Result<Finished> {
        self.shutdown();
        if let Some(e) = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        let mut stats = *lock(&self.shared.stats);
        stats.chunks = *self.submitted.get_mut();
        let in_blocks = *self.in_blocks.get_mut();
        let n_pieces = *self.pieces.get_mut();
        let ids = std::mem::take(&mut *lock(&self.shared.ids));
        let pieces = std::mem::take(&mut *lock(&self.shared.pieces));
        if ids.len() as u64 != in_blocks || pieces.len() as u64 != n_pieces {
            return Err(Error::Internal(format!(
                "{in_blocks} chunks in blocks but {} ids, {n_pieces} file pieces but {} results",
                ids.len(),
                pieces.len()
            )));
        }
        Ok(Finished { stats, ids, pieces })
    }

    fn shutdown(&mut self) {
        self.to_workers.take();
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                self.shared
                    .fail(Error::Internal("compression worker panicked".into()));
            }
        }
        if let Some(p) = self.packer.take()
            && p.join().is_err()
        {
            self.shared.fail(Error::Internal("packer panicked".into()));
        }
        if let Some(f) = self.flusher.take()
            && f.join().is_err()
        {
            self.shared
                .fail(Error::Internal("pack flusher panicked".into()));
        }
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn compress_loop(
    rx: Receiver<Work>,
    tx: Sender<Compressed>,
    spare: Receiver<Vec<u8>>,
    level: i32,
    shared: &Shared,
) {
    let _guard = FailOnPanic(shared, "compression worker");
    let mut out = Vec::new();
    let mut encoder = match codec::Encoder::new(level) {
        Ok(e) => e,
        Err(e) => return shared.fail(e),
    };
    // Compresses (or keeps raw) a new chunk and hands it to the packer.
    let mut store = |lane: usize, id: ChunkId, data: Stored| {
        let raw = data.bytes();
        let raw_len = raw.len();
        match encoder.encode(raw, &mut out) {
            Ok(codec) => {
                // Raw chunks travel as they came (a block range, or the caller's copy);
                // compressed ones in `out`, replaced by a buffer the packer is done with.
                let stored = if codec == Codec::Raw {
                    data
                } else {
                    let next = spare.try_recv().unwrap_or_default();
                    Stored::Owned(std::mem::replace(&mut out, next))
                };
                let msg = Compressed {
                    lane,
                    id,
                    codec,
                    raw_len,
                    stored,
                };
                if tx.send(msg).is_err() {
                    shared.fail(Error::Internal("packer stopped".into()));
                }
            }
            Err(e) => shared.fail(e),
        }
    };
    // Once the pipeline has failed, the rest is only drained (releasing its blocks).
    for work in rx {
        if shared.failed() {
            continue;
        }
        match work {
            Work::New(id, data) => {
                store(0, id, Stored::Owned(data));
            }
            Work::Chunks {
                first,
                lane,
                block,
                ranges,
            } => {
                for (seq, range) in (first..).zip(ranges) {
                    if shared.failed() {
                        break;
                    }
                    if let Some(id) = new_in_block(shared, seq, &block, range.clone()) {
                        store(lane, id, Stored::InBlock(block.clone(), range));
                    }
                }
            }
            Work::Piece {
                seq,
                block,
                range,
                offset,
                whole_file,
            } => {
                let h = hash_file_piece(offset, &block[range], whole_file);
                record(&shared.pieces, seq, h, [0; 32]);
            }
        }
    }
}

/// Hashes the chunk `block[range]` and records its id under `seq`; the id if the chunk is new
/// (to be stored from the block), `None` for a duplicate (never copied) or on an error (the
/// pipeline has failed then).
fn new_in_block(shared: &Shared, seq: u64, block: &Block, range: Range<usize>) -> Option<ChunkId> {
    let id = ChunkId::of(&block[range]);
    record(&shared.ids, seq, id, ChunkId([0; 32]));
    match shared.claim(&id) {
        Ok(true) => Some(id),
        Ok(false) => None,
        Err(e) => {
            shared.fail(e);
            None
        }
    }
}

/// A finished pack on its way to the object store.
type SealedPack = crate::pack::FinishedPack;

/// Where a pack starts in its buffer: a multiple of this, so that the local store's `O_DIRECT`
/// write takes it without a copy (ADR 0027).
const PACK_ALIGN: usize = 4096;

/// Where the packer's packs go, and the buffers it gets back and hands on.
struct PackOut {
    to_flusher: Sender<SealedPack>,
    /// Buffers of packs the flusher has written, for the next packs.
    recycled: Receiver<Vec<u8>>,
    /// Compression buffers the packer is done with, back to the workers.
    spare: Sender<Vec<u8>>,
}

/// Appends compressed chunks to a pack of their lane; hands each full pack to the flusher, so
/// that building the next pack overlaps with writing (and fsyncing) the last one.
fn pack_loop(rx: Receiver<Compressed>, out: PackOut, lanes: usize, target: u64, shared: &Shared) {
    let _guard = FailOnPanic(shared, "packer");
    // A pack ends with the chunk that takes it past the target, then its table: room for the
    // target and a large chunk means the buffer never grows (it would, by copies, otherwise).
    let capacity = usize::try_from(target).unwrap_or(usize::MAX / 2) + (2 << 20) + PACK_ALIGN;
    let next_buffer = || {
        out.recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(capacity))
    };
    // One pack being filled per lane, started at the lane's first chunk.
    let mut builders: Vec<Option<PackBuilder>> = (0..lanes.max(1)).map(|_| None).collect();
    let hand_off = |b: PackBuilder| -> bool {
        if b.is_empty() {
            return true;
        }
        out.to_flusher.send(b.finish_in_buffer()).is_ok()
    };
    for c in rx {
        if shared.failed() {
            continue;
        }
        let slot = &mut builders[c.lane % lanes.max(1)];
        let builder =
            slot.get_or_insert_with(|| PackBuilder::with_aligned_buffer(next_buffer(), PACK_ALIGN));
        builder.add(c.id, c.codec, c.raw_len, c.stored.bytes());
        if let Stored::Owned(buf) = c.stored {
            let _ = out.spare.try_send(buf);
        }
        if builder.len() as u64 >= target {
            let full = slot.take().expect("a builder was just filled");
            if !hand_off(full) {
                return shared.fail(Error::Internal("pack flusher stopped".into()));
            }
        }
    }
    if shared.failed() {
        return;
    }
    // The lanes' last packs are partial: those that fit together within the target become
    // one pack (each lane's chunks still in a row), so several lanes leave no more small
    // packs behind than one would.
    let mut tail: Option<PackBuilder> = None;
    for b in builders.into_iter().flatten() {
        let full = match tail.as_mut() {
            Some(t) if (t.len() + b.len() - HEADER.len()) as u64 <= target => {
                t.append(&b);
                None
            }
            _ => tail.replace(b),
        };
        if let Some(full) = full
            && !hand_off(full)
        {
            return shared.fail(Error::Internal("pack flusher stopped".into()));
        }
    }
    if let Some(t) = tail
        && !hand_off(t)
    {
        shared.fail(Error::Internal("pack flusher stopped".into()));
    }
}

/// Writes packs durably, then indexes their chunks (never the other way round).
fn flush_loop(
    rx: Receiver<SealedPack>,
    recycle: Sender<Vec<u8>>,
    objects: &dyn ObjectStore,
    index: &SharedIndex,
    clock: &dyn Clock,
    shared: &Shared,
) {
    let _guard = FailOnPanic(shared, "pack flusher");
    for p in rx {
        if shared.failed() {
            continue;
        }
        let res = (|| -> Result<()> {
            let bytes = p.bytes();
            objects.put(&pack_key(&p.id), bytes)?;
            index.lock().insert_pack(
                &p.id,
                bytes.len() as u64,
                &p.entries,
                to_unix_ns(clock.now()),
            )?;
            tracing::debug!(pack = %p.id, bytes = bytes.len(), chunks = p.entries.len(), "pack written");
            let raw: u64 = p.entries.iter().map(|e| u64::from(e.raw_len)).sum();
            let mut s = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.packs += 1;
            s.pack_bytes += bytes.len() as u64;
            s.new_chunks += p.entries.len() as u64;
            s.new_raw_bytes += raw;
            Ok(())
        })();
        if let Err(e) = res {
            shared.fail(e);
        }
        let _ = recycle.try_send(p.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
            .collect()
    }

    /// `n` incompressible bytes.
    fn noise(n: usize, seed: u8) -> Vec<u8> {
        let mut d = vec![0; n];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut d);
        d
    }

    /// Hashes `d` in pieces of `piece` bytes the way ingest does.
    fn by_pieces(d: &[u8], piece: usize) -> blake3::Hash {
        if d.len() <= piece {
            return hash_file_piece(0, d, true).into();
        }
        let cvs: Vec<[u8; 32]> = d
            .chunks(piece)
            .enumerate()
            .map(|(i, p)| {
                use blake3::hazmat::HasherExt;
                // Any power-of-two piece size gives complete subtrees; FILE_PIECE is one.
                blake3::Hasher::new()
                    .set_input_offset((i * piece) as u64)
                    .update(p)
                    .finalize_non_root()
            })
            .collect();
        file_hash_from_pieces(&cvs)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The whole-file hash joined from pieces equals the one-shot BLAKE3, for lengths at
        /// and one or two bytes either side of multiples of the piece size.
        #[test]
        fn pieces_join_to_the_one_shot_hash_near_multiples(
            shift in 0u32..4, pieces in 0usize..20, delta in -2i64..3, seed in any::<u8>(),
        ) {
            let piece = 1024usize << shift;
            let len = ((pieces * piece) as i64 + delta).max(0) as usize;
            let d = data(len, seed);
            prop_assert_eq!(by_pieces(&d, piece), blake3::hash(&d));
        }

        /// ... and for any length.
        #[test]
        fn pieces_join_to_the_one_shot_hash(
            shift in 0u32..4, len in 0usize..40_000, seed in any::<u8>(),
        ) {
            let d = data(len, seed);
            prop_assert_eq!(by_pieces(&d, 1024 << shift), blake3::hash(&d));
        }
    }

    /// A new store whose packs target 1 MiB, in a temporary directory kept with it.
    fn store_of_1mib_packs() -> (tempfile::TempDir, crate::store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::store::InitOptions {
            pack_target_size: 1 << 20,
            ..Default::default()
        };
        let store = crate::store::Store::init(&dir.path().join("store"), &opts).unwrap();
        (dir, store)
    }

    /// Two readers submitting at once on lanes of their own: every full pack holds the chunks
    /// of one lane only (the lanes' partial last packs may end up together, each lane's chunks
    /// in a row), and every chunk is stored once and recorded under its sequence number.
    #[test]
    fn each_lane_fills_packs_of_its_own() {
        let (_dir, store) = store_of_1mib_packs();
        let seal = store.seal_guard();
        let writer = store.writer_with_lanes(&seal, 2);
        const CHUNK: usize = 32 << 10;
        // Lane 0 submits the chunks of seeds 0..8, lane 1 those of 100..108, from two threads
        // at once, one block (a seed) at a time; lane 1 also resubmits lane 0's first seed.
        let blocks = |lane: usize| -> Vec<u8> {
            if lane == 0 {
                (0..8u8).collect()
            } else {
                (100..108u8).chain([0]).collect()
            }
        };
        let submitted: Vec<Vec<(u64, ChunkId)>> = std::thread::scope(|s| {
            let w = &writer;
            let hs: Vec<_> = (0..2)
                .map(|lane| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for seed in blocks(lane) {
                            let mut buf = w.block_buffer(4 * CHUNK).unwrap();
                            buf.extend_from_slice(&noise(4 * CHUNK, seed));
                            let block = w.share(buf);
                            let ranges: Vec<_> =
                                (0..4).map(|i| i * CHUNK..(i + 1) * CHUNK).collect();
                            let first = w
                                .submit_many_in_block(lane, &block, ranges.clone())
                                .unwrap();
                            for (seq, r) in (first..).zip(ranges) {
                                out.push((seq, ChunkId::of(&block[r])));
                            }
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let done = writer.finish_with_ids().unwrap();
        for (seq, id) in submitted.iter().flatten() {
            assert_eq!(
                done.ids[*seq as usize], *id,
                "id recorded under sequence {seq}"
            );
        }
        assert_eq!(done.stats.chunks, 68);
        assert_eq!(
            done.stats.new_chunks, 64,
            "lane 1's copy of seed 0 is stored once"
        );

        let lane_of: HashMap<ChunkId, usize> = submitted
            .iter()
            .enumerate()
            .flat_map(|(lane, ids)| ids.iter().map(move |(_, id)| (*id, lane)))
            .collect();
        // Seed 0's chunks were submitted on both lanes: either may have taken them on.
        let seed0: HashSet<ChunkId> = submitted[0][..4].iter().map(|(_, id)| *id).collect();
        let mut packed = 0;
        let mut mixed = 0;
        let packs = store.objects().list("packs/").unwrap();
        assert!(packs.len() >= 2, "{} packs", packs.len());
        for meta in packs {
            let mut table = crate::pack::read_table(store.objects(), &meta.key).unwrap();
            table.sort_by_key(|e| e.offset);
            let mut lanes: Vec<usize> = table
                .iter()
                .filter(|e| !seed0.contains(&e.chunk))
                .map(|e| lane_of[&e.chunk])
                .collect();
            lanes.dedup();
            let distinct: HashSet<usize> = lanes.iter().copied().collect();
            assert_eq!(
                lanes.len(),
                distinct.len(),
                "{}: lanes interleave",
                meta.key
            );
            if distinct.len() > 1 {
                mixed += 1;
                assert!(
                    meta.size < 1 << 20,
                    "{} mixes lanes {lanes:?} and is full",
                    meta.key
                );
            }
            packed += table.len();
        }
        assert!(mixed <= 1, "{mixed} packs mix lanes");
        assert_eq!(packed, 64);
    }

    /// Lanes that each end with a partial pack leave one pack between them when their tails
    /// fit in one, and their chunks read back from it.
    #[test]
    fn the_lanes_partial_last_packs_become_one() {
        let (_dir, store) = store_of_1mib_packs();
        let seal = store.seal_guard();
        let submit = |w: &ChunkWriter, lane: usize, d: &[u8]| {
            let mut buf = w.block_buffer(d.len()).unwrap();
            buf.extend_from_slice(d);
            let block = w.share(buf);
            let whole: Range<usize> = 0..d.len();
            w.submit_many_in_block(lane, &block, Vec::from([whole]))
                .unwrap();
        };
        let writer = store.writer_with_lanes(&seal, 3);
        // Three lanes of 200 KiB each (incompressible): 600 KiB, under one pack's target.
        let mut want = Vec::new();
        for lane in 0..3 {
            let d = noise(200 << 10, lane as u8 + 40);
            submit(&writer, lane, &d);
            want.push((ChunkId::of(&d), d));
        }
        let stats = writer.finish().unwrap();
        assert_eq!(stats.new_chunks, 3);
        assert_eq!(stats.packs, 1, "{stats:?}");
        assert_eq!(store.objects().list("packs/").unwrap().len(), 1);
        for (id, d) in want {
            assert_eq!(store.read_chunk(&id).unwrap(), d);
        }

        // Tails that do not fit together in one pack stay apart: 3 × 400 KiB is two packs.
        let writer = store.writer_with_lanes(&seal, 3);
        for lane in 0..3 {
            submit(&writer, lane, &noise(400 << 10, lane as u8 + 50));
        }
        assert_eq!(writer.finish().unwrap().packs, 2);
    }

    #[test]
    fn file_pieces_of_the_real_size_join_to_the_one_shot_hash() {
        for len in [
            FILE_PIECE + 1,
            2 * FILE_PIECE,
            3 * FILE_PIECE - 1,
            5 * FILE_PIECE + 7,
        ] {
            let d = data(len, 3);
            let cvs: Vec<[u8; 32]> = d
                .chunks(FILE_PIECE)
                .enumerate()
                .map(|(i, p)| hash_file_piece((i * FILE_PIECE) as u64, p, false))
                .collect();
            assert_eq!(file_hash_from_pieces(&cvs), blake3::hash(&d), "{len} bytes");
        }
        let d = data(FILE_PIECE, 1);
        assert_eq!(hash_file_piece(0, &d, true), *blake3::hash(&d).as_bytes());
    }
}
