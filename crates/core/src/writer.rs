//! The chunk write pipeline: dedup, compression on a worker pool, pack assembly, durable writes.
//!
//! ```text
//! caller (chunk + hash) --submit--> [compress workers x N] --> packer thread --> put pack, index it
//! ```
//!
//! `submit` hashes a chunk on the caller's thread and returns its reference at once;
//! `submit_deferred` leaves hashing and the dedup lookup to the workers too (so that they run on
//! every core) and the ids are read after `finish_with_ids`. Either way a chunk already indexed
//! (or already submitted to this writer) is not stored again. Compressed chunks are appended to an in-memory
//! pack; a full pack is written with `ObjectStore::put` (durable on return) and only then inserted
//! into the index. `finish` flushes the last pack: after it returns `Ok`, every submitted chunk is
//! durable and indexed, so a manifest referring to them may be committed.
//!
//! Memory is bounded: channels are bounded, a pack is at most its target size plus one chunk.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::clock::{Clock, to_unix_ns};
use crate::codec::{self, Codec};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::index::Index;
use crate::manifest::ChunkRef;
use crate::objstore::ObjectStore;
use crate::pack::{PackBuilder, pack_key};

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

/// Settings for a writer.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub compression_level: i32,
    pub pack_target_size: u64,
    pub workers: usize,
}

struct Shared {
    error: Mutex<Option<Error>>,
    stats: Mutex<WriteStats>,
    /// Chunks this writer has taken on to store (never removed while it runs).
    pending: Mutex<HashSet<ChunkId>>,
    /// Ids of deferred chunks, by submission sequence number.
    ids: Mutex<Vec<ChunkId>>,
    index: Arc<Mutex<Index>>,
}

/// What the caller hands to the workers.
enum Work {
    /// Hashed, and known to be new: compress and store.
    New(ChunkId, Vec<u8>),
    /// Not hashed yet: hash, record the id under the sequence number, dedup, maybe store.
    Deferred(u64, Vec<u8>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Claims `id` for storing: false if the store or this writer already has it.
    fn claim(&self, id: &ChunkId) -> Result<bool> {
        if lock(&self.pending).contains(id) {
            return Ok(false);
        }
        if lock(&self.index).has_chunk(id)? {
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

struct Compressed {
    id: ChunkId,
    codec: Codec,
    raw_len: usize,
    stored: Vec<u8>,
}

/// A running pipeline. Dropping it without `finish` still drains it: queued chunks are written
/// and indexed (harmless: unreferenced chunks are gc's to reclaim), and errors are dropped.
pub struct ChunkWriter {
    to_workers: Option<Sender<Work>>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    submitted: u64,
    deferred: u64,
}

impl ChunkWriter {
    /// Starts the pipeline's threads.
    pub fn new(
        index: Arc<Mutex<Index>>,
        objects: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
        config: WriterConfig,
    ) -> Self {
        let workers_n = config.workers.max(1);
        let (to_workers, work_rx) = bounded::<Work>(workers_n * 4);
        let (to_packer, pack_rx) = bounded::<Compressed>(workers_n * 4);
        let shared = Arc::new(Shared {
            error: Mutex::new(None),
            stats: Mutex::new(WriteStats::default()),
            pending: Mutex::new(HashSet::new()),
            ids: Mutex::new(Vec::new()),
            index: index.clone(),
        });
        let workers = (0..workers_n)
            .map(|i| {
                let rx = work_rx.clone();
                let tx = to_packer.clone();
                let level = config.compression_level;
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("afs-compress-{i}"))
                    .spawn(move || compress_loop(rx, tx, level, &shared))
                    .expect("spawn compression worker")
            })
            .collect();
        drop(to_packer);
        // One pack may wait while another is written: bounded memory, overlapping I/O.
        let (to_flusher, flush_rx) = bounded::<SealedPack>(1);
        let packer = {
            let shared = shared.clone();
            let target = config.pack_target_size;
            std::thread::Builder::new()
                .name("afs-packer".into())
                .spawn(move || pack_loop(pack_rx, to_flusher, target, &shared))
                .expect("spawn packer")
        };
        let flusher = {
            let index = index.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("afs-flusher".into())
                .spawn(move || flush_loop(flush_rx, &*objects, &index, &*clock, &shared))
                .expect("spawn flusher")
        };
        Self {
            to_workers: Some(to_workers),
            workers,
            packer: Some(packer),
            flusher: Some(flusher),
            shared,
            submitted: 0,
            deferred: 0,
        }
    }

    /// Stores a chunk (unless the store has it) and returns its reference.
    pub fn submit(&mut self, data: &[u8]) -> Result<ChunkRef> {
        let id = ChunkId::of(data);
        self.submit_hashed(id, data)?;
        Ok(ChunkRef(id, data.len() as u32))
    }

    /// As [`ChunkWriter::submit`] with the id already computed.
    pub fn submit_hashed(&mut self, id: ChunkId, data: &[u8]) -> Result<()> {
        self.submitted += 1;
        if !self.shared.claim(&id)? {
            return Ok(());
        }
        self.send(Work::New(id, data.to_vec()))
    }

    /// Queues a chunk without hashing it here; returns its sequence number, whose id
    /// [`ChunkWriter::finish_with_ids`] gives.
    pub fn submit_deferred(&mut self, data: &[u8]) -> Result<u64> {
        self.submitted += 1;
        let seq = self.deferred;
        self.deferred += 1;
        self.send(Work::Deferred(seq, data.to_vec()))?;
        Ok(seq)
    }

    fn send(&mut self, w: Work) -> Result<()> {
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
        self.finish_with_ids().map(|(stats, _)| stats)
    }

    /// As [`ChunkWriter::finish`], also returning the ids of deferred chunks by sequence number.
    pub fn finish_with_ids(mut self) -> Result<(WriteStats, Vec<ChunkId>)> {
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
        stats.chunks = self.submitted;
        let ids = std::mem::take(&mut *lock(&self.shared.ids));
        if ids.len() as u64 != self.deferred {
            return Err(Error::Internal(format!(
                "{} deferred chunks but {} ids",
                self.deferred,
                ids.len()
            )));
        }
        Ok((stats, ids))
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

fn compress_loop(rx: Receiver<Work>, tx: Sender<Compressed>, level: i32, shared: &Shared) {
    let mut out = Vec::new();
    let mut encoder = match codec::Encoder::new(level) {
        Ok(e) => e,
        Err(e) => return shared.fail(e),
    };
    for work in rx {
        if shared.failed() {
            continue;
        }
        let (id, data) = match work {
            Work::New(id, data) => (id, data),
            Work::Deferred(seq, data) => {
                let id = ChunkId::of(&data);
                {
                    let mut ids = lock(&shared.ids);
                    let seq = seq as usize;
                    if ids.len() <= seq {
                        ids.resize(seq + 1, ChunkId([0; 32]));
                    }
                    ids[seq] = id;
                }
                match shared.claim(&id) {
                    Ok(true) => (id, data),
                    Ok(false) => continue,
                    Err(e) => {
                        shared.fail(e);
                        continue;
                    }
                }
            }
        };
        let raw_len = data.len();
        match encoder.encode(&data, &mut out) {
            Ok(codec) => {
                // Raw chunks travel as the caller's buffer; compressed ones as a copy of `out`,
                // which is reused for the next chunk.
                let stored = if codec == Codec::Raw {
                    data
                } else {
                    // Hand over the compressed buffer; the next chunk gets a fresh one.
                    std::mem::replace(&mut out, Vec::with_capacity(raw_len))
                };
                let msg = Compressed {
                    id,
                    codec,
                    raw_len,
                    stored,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            Err(e) => shared.fail(e),
        }
    }
}

/// A finished pack on its way to the object store.
struct SealedPack {
    id: crate::id::PackId,
    bytes: Vec<u8>,
    entries: Vec<crate::pack::PackEntry>,
}

/// Appends compressed chunks to a pack; hands each full pack to the flusher, so that building
/// the next pack overlaps with writing (and fsyncing) the last one.
fn pack_loop(
    rx: Receiver<Compressed>,
    to_flusher: Sender<SealedPack>,
    target: u64,
    shared: &Shared,
) {
    let mut builder = PackBuilder::new();
    let hand_off = |b: PackBuilder| -> bool {
        if b.is_empty() {
            return true;
        }
        let (id, bytes, entries) = b.finish();
        to_flusher.send(SealedPack { id, bytes, entries }).is_ok()
    };
    for c in rx {
        if shared.failed() {
            continue;
        }
        builder.add(c.id, c.codec, c.raw_len, &c.stored);
        if builder.len() as u64 >= target && !hand_off(std::mem::take(&mut builder)) {
            return;
        }
    }
    if !shared.failed() {
        hand_off(builder);
    }
}

/// Writes packs durably, then indexes their chunks (never the other way round).
fn flush_loop(
    rx: Receiver<SealedPack>,
    objects: &dyn ObjectStore,
    index: &Mutex<Index>,
    clock: &dyn Clock,
    shared: &Shared,
) {
    for p in rx {
        if shared.failed() {
            continue;
        }
        let res = (|| -> Result<()> {
            objects.put(&pack_key(&p.id), &p.bytes)?;
            index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert_pack(
                    &p.id,
                    p.bytes.len() as u64,
                    &p.entries,
                    to_unix_ns(clock.now()),
                )?;
            tracing::debug!(pack = %p.id, bytes = p.bytes.len(), chunks = p.entries.len(), "pack written");
            let raw: u64 = p.entries.iter().map(|e| u64::from(e.raw_len)).sum();
            let mut s = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.packs += 1;
            s.pack_bytes += p.bytes.len() as u64;
            s.new_chunks += p.entries.len() as u64;
            s.new_raw_bytes += raw;
            Ok(())
        })();
        if let Err(e) = res {
            shared.fail(e);
        }
    }
}
