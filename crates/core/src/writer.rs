//! The chunk write pipeline: dedup, compression on a worker pool, pack assembly, durable writes.
//!
//! ```text
//! caller (chunk + hash) --submit--> [compress workers x N] --> packer thread --> put pack, index it
//! ```
//!
//! `submit` hashes a chunk and returns its reference at once; a chunk already indexed (or already
//! submitted to this writer) is not stored again. Compressed chunks are appended to an in-memory
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
}

impl Shared {
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
    index: Arc<Mutex<Index>>,
    to_workers: Option<Sender<(ChunkId, Vec<u8>)>>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<()>>,
    pending: HashSet<ChunkId>,
    shared: Arc<Shared>,
    submitted: u64,
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
        let (to_workers, work_rx) = bounded::<(ChunkId, Vec<u8>)>(workers_n * 2);
        let (to_packer, pack_rx) = bounded::<Compressed>(workers_n * 2);
        let shared = Arc::new(Shared {
            error: Mutex::new(None),
            stats: Mutex::new(WriteStats::default()),
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
        let packer = {
            let index = index.clone();
            let shared = shared.clone();
            let target = config.pack_target_size;
            std::thread::Builder::new()
                .name("afs-packer".into())
                .spawn(move || pack_loop(pack_rx, &*objects, &index, &*clock, target, &shared))
                .expect("spawn packer")
        };
        Self {
            index,
            to_workers: Some(to_workers),
            workers,
            packer: Some(packer),
            pending: HashSet::new(),
            shared,
            submitted: 0,
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
        if self.pending.contains(&id) {
            return Ok(());
        }
        let known = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_chunk(&id)?;
        if known {
            return Ok(());
        }
        if self.shared.failed() {
            return Err(self.take_error());
        }
        self.pending.insert(id);
        let tx = self
            .to_workers
            .as_ref()
            .ok_or_else(|| Error::Internal("chunk writer used after finish".into()))?;
        if tx.send((id, data.to_vec())).is_err() {
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
    pub fn finish(mut self) -> Result<WriteStats> {
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
        let mut stats = *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.chunks = self.submitted;
        Ok(stats)
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
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn compress_loop(
    rx: Receiver<(ChunkId, Vec<u8>)>,
    tx: Sender<Compressed>,
    level: i32,
    shared: &Shared,
) {
    let mut out = Vec::new();
    let mut encoder = match codec::Encoder::new(level) {
        Ok(e) => e,
        Err(e) => return shared.fail(e),
    };
    for (id, data) in rx {
        if shared.failed() {
            continue;
        }
        let raw_len = data.len();
        match encoder.encode(&data, &mut out) {
            Ok(codec) => {
                // Raw chunks travel as the caller's buffer; compressed ones as a copy of `out`,
                // which is reused for the next chunk.
                let stored = if codec == Codec::Raw {
                    data
                } else {
                    out.clone()
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

fn pack_loop(
    rx: Receiver<Compressed>,
    objects: &dyn ObjectStore,
    index: &Mutex<Index>,
    clock: &dyn Clock,
    target: u64,
    shared: &Shared,
) {
    let mut builder = PackBuilder::new();
    let flush = |b: PackBuilder| -> Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        let raw: u64 = b.entries().iter().map(|e| u64::from(e.raw_len)).sum();
        let (id, bytes, entries) = b.finish();
        objects.put(&pack_key(&id), &bytes)?;
        index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert_pack(&id, bytes.len() as u64, &entries, to_unix_ns(clock.now()))?;
        tracing::debug!(pack = %id, bytes = bytes.len(), chunks = entries.len(), "pack written");
        let mut s = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.packs += 1;
        s.pack_bytes += bytes.len() as u64;
        s.new_chunks += entries.len() as u64;
        s.new_raw_bytes += raw;
        Ok(())
    };
    for c in rx {
        if shared.failed() {
            continue;
        }
        builder.add(c.id, c.codec, c.raw_len, &c.stored);
        if builder.len() as u64 >= target
            && let Err(e) = flush(std::mem::take(&mut builder))
        {
            shared.fail(e);
        }
    }
    if !shared.failed()
        && let Err(e) = flush(builder)
    {
        shared.fail(e);
    }
}
