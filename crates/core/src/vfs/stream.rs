//! Files of open runs written front to back, chunked while they are written (ADR 0025).
//!
//! A file that grows past [`STREAM_AT`] by appends only is handed to a worker thread that
//! chunks, hashes and stores its bytes as they come, instead of writing them to its staging
//! file: the first [`STREAM_AT`]-ish bytes, already in the staging file, are read from there;
//! every later append goes straight to the worker. When the file is closed or fsynced, the
//! stream ends: its chunks are stored and the view commits the file's content as their list.
//! Anything but an append (a read, a write elsewhere, a truncation, a gc) ends the stream the
//! other way: the view writes the chunks back to the staging file and goes on from there.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::gc::SealGuard;
use crate::index::ChunkedContent;
use crate::ingest::{FillBlock, ingest_stream_in_blocks};
use crate::store::Store;

/// A file streams once appends take it to this size.
pub(super) const STREAM_AT: u64 = 8 << 20;
/// At most this many files stream at once; others stay in their staging files.
pub(super) const MAX_STREAMS: usize = 2;
/// Appends queued for a stream's worker (each one write request, up to 1 MiB).
const QUEUE: usize = 8;

/// A stream's chunks, stored (packs durable, chunk rows in the index).
pub(super) struct Ended {
    pub content: ChunkedContent,
    /// Keeps gc's sweep away until the caller has committed the chunk list or copied the
    /// chunks out: until then the index holds no reference to them.
    pub guard: SealGuard,
}

struct Inner {
    tx: Option<SyncSender<Vec<u8>>>,
    /// Buffers the worker is done with, to copy the next appends into: no allocation (and
    /// no fresh pages to fault in) for each write request.
    spare: Receiver<Vec<u8>>,
    /// Bytes of the file so far (the staging prefix and every append).
    len: u64,
    worker: Option<JoinHandle<Result<Ended>>>,
}

/// One file being chunked as it is written.
pub(super) struct Stream {
    inner: Mutex<Inner>,
}

impl Stream {
    /// Starts chunking a file whose first `prefix` bytes are in its staging file `path`.
    pub fn start(store: Arc<Store>, path: PathBuf, prefix: u64) -> Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let (spare_tx, spare) = sync_channel(QUEUE + 2);
        let worker = std::thread::Builder::new()
            .name("afs-stream".into())
            .spawn(move || work(&store, path, prefix, rx, spare_tx))
            .map_err(|e| Error::Internal(format!("spawn a stream worker: {e}")))?;
        Ok(Self {
            inner: Mutex::new(Inner {
                tx: Some(tx),
                spare,
                len: prefix,
                worker: Some(worker),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// Appends `data` if `offset` is the file's end (`false`: it is not, nothing was done).
    /// Waits while the worker's queue is full. A worker that failed gives its error.
    pub fn append(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let mut g = self.lock();
        if offset != g.len {
            return Ok(false);
        }
        let Some(tx) = g.tx.as_ref() else {
            return Err(Error::Internal("append to a stream that ended".into()));
        };
        let mut buf = g.spare.try_recv().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        if tx.send(buf).is_err() {
            // The worker stopped early: its error says why.
            g.tx = None;
            return Err(match g.worker.take().map(JoinHandle::join) {
                Some(Ok(Err(e))) => e,
                _ => Error::Internal("a stream worker stopped".into()),
            });
        }
        g.len += data.len() as u64;
        Ok(true)
    }

    /// Ends the stream: the last chunk is cut at the file's end and every chunk is stored.
    pub fn end(&self) -> Result<Ended> {
        let mut g = self.lock();
        g.tx = None;
        let len = g.len;
        let ended = match g.worker.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => return Err(Error::Internal("a stream worker panicked".into())),
            None => return Err(Error::Internal("a stream ended twice".into())),
        };
        if ended.content.size != len {
            return Err(Error::Internal(format!(
                "a stream chunked {} bytes of {len}",
                ended.content.size
            )));
        }
        Ok(ended)
    }
}

/// The staging prefix, then every append until the sender goes.
struct Appends {
    prefix: File,
    /// Bytes of the prefix not read yet.
    prefix_left: u64,
    rx: Receiver<Vec<u8>>,
    spare: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl FillBlock for Appends {
    fn fill(&mut self, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
        let end = buf.len() + want;
        if self.prefix_left > 0 {
            let take = want.min(usize::try_from(self.prefix_left).unwrap_or(usize::MAX));
            let before = buf.len();
            self.prefix.fill(buf, take)?;
            let n = buf.len() - before;
            if n < take {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the staging file is shorter than the stream's start",
                ));
            }
            self.prefix_left -= n as u64;
        }
        while buf.len() < end {
            if self.pos == self.cur.len() {
                let Ok(next) = self.rx.recv() else {
                    return Ok(());
                };
                let done = std::mem::replace(&mut self.cur, next);
                let _ = self.spare.try_send(done);
                self.pos = 0;
            }
            let n = (end - buf.len()).min(self.cur.len() - self.pos);
            buf.extend_from_slice(&self.cur[self.pos..self.pos + n]);
            self.pos += n;
        }
        Ok(())
    }
}

fn work(
    store: &Store,
    path: PathBuf,
    prefix: u64,
    rx: Receiver<Vec<u8>>,
    spare: SyncSender<Vec<u8>>,
) -> Result<Ended> {
    let guard = store.seal_guard();
    let writer = store.writer(&guard);
    let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let src = Appends {
        prefix: f,
        prefix_left: prefix,
        rx,
        spare,
        cur: Vec::new(),
        pos: 0,
    };
    // The chunks, hashes and dedup of a seal's pipeline; the hashing on the writer's workers,
    // so that this thread only cuts while the file is being written.
    let (size, hash, chunks) = ingest_stream_in_blocks(store, writer, src, &path)?;
    Ok(Ended {
        content: ChunkedContent { size, hash, chunks },
        guard,
    })
}
