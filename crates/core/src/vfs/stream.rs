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
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::gc::SealGuard;
use crate::index::ChunkedContent;
use crate::ingest::ingest_stream_in_blocks;
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
        let worker = std::thread::Builder::new()
            .name("afs-stream".into())
            .spawn(move || work(&store, path, prefix, rx))
            .map_err(|e| Error::Internal(format!("spawn a stream worker: {e}")))?;
        Ok(Self {
            inner: Mutex::new(Inner {
                tx: Some(tx),
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
        if tx.send(data.to_vec()).is_err() {
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
    prefix: std::io::Take<File>,
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for Appends {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.prefix.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn work(store: &Store, path: PathBuf, prefix: u64, rx: Receiver<Vec<u8>>) -> Result<Ended> {
    let guard = store.seal_guard();
    let writer = store.writer(&guard);
    let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let src = Appends {
        prefix: f.take(prefix),
        rx,
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
