//! A byte range of a sealed file as a stream of verified chunks, for frontends that send a
//! file somewhere else as fast as it can be decoded (the HTTP server's downloads).
//!
//! [`Store::stream_file`] walks the file's chunk list from the chunk holding the range's start
//! to the one holding its end and hands each chunk's plaintext to a sink in file order, as a
//! [`Piece`]: the whole decoded chunk (shared, never copied) and the part of it inside the
//! range. Chunks are read and decoded ahead of the sink on [`StreamOptions::threads`] threads,
//! never more than [`StreamOptions::ahead`] chunks ahead of it, so memory stays bounded by
//! about `ahead` chunks (each at most the chunker's maximum size) whatever the file's size.
//! A chunk the caller already holds decoded (a frontend's chunk cache, through
//! [`StreamOptions::cached`]) is taken from there instead of being read again.
//!
//! On a store with a remote tier, a range that needs chunks of evicted packs is read through
//! [`Store::for_each_chunk`] instead, whose coalesced, parallel ranged GETs (ADR 0014) matter
//! more than parallel decoding for a cold read.
//!
//! Every chunk read is decoded and checked against its id (BLAKE3) before the sink sees it; a
//! chunk cached by the caller was checked when it was loaded. A damaged or missing chunk ends
//! the stream with an error naming the file, after the pieces before it: a sink never gets
//! wrong bytes, and a frontend that already sent some must cut its response. The design is
//! recorded in ADR 0016.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::manifest::{Entry, Kind};
use crate::store::Store;

/// Chunks decoded ahead of the sink by default (2 MiB of chunks of the default 64 KiB
/// average, ADR 0017; at most 8 MiB of chunks of the largest size).
pub const DEFAULT_AHEAD: usize = 32;

/// A decoded chunk lookup of the caller's: `Some` for a chunk it holds, already verified.
pub type CachedChunk<'a> = &'a (dyn Fn(&ChunkId) -> Option<Arc<Vec<u8>>> + Sync);

/// How [`Store::stream_file`] reads ahead.
#[derive(Clone, Copy)]
pub struct StreamOptions<'a> {
    /// Threads reading and decoding chunks (at least one).
    pub threads: usize,
    /// Chunks decoded or being decoded ahead of the sink, at most.
    pub ahead: usize,
    /// Chunks the caller holds decoded already.
    pub cached: Option<CachedChunk<'a>>,
}

impl Default for StreamOptions<'_> {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            ahead: DEFAULT_AHEAD,
            cached: None,
        }
    }
}

/// One chunk of a streamed range: its whole plaintext and the part of it in the range.
#[derive(Clone, Debug)]
pub struct Piece {
    /// The chunk's id.
    pub id: ChunkId,
    /// The chunk's plaintext, verified against its id.
    pub chunk: Arc<Vec<u8>>,
    /// The bytes of `chunk` inside the range.
    pub range: Range<usize>,
}

impl Piece {
    /// The bytes of the piece.
    pub fn bytes(&self) -> &[u8] {
        &self.chunk[self.range.clone()]
    }
}

/// Hands one verified chunk of the range to the sink.
type Hand<'a> = dyn FnMut(&Slot, Arc<Vec<u8>>) -> Result<()> + 'a;

/// A chunk of the range: its id, its length and the part of it inside the range.
struct Slot {
    id: ChunkId,
    len: u32,
    range: Range<usize>,
}

impl Store {
    /// Hands bytes `range` of the sealed file `entry` to `sink` in order, chunk by chunk,
    /// each chunk verified (see the module documentation). Returns the bytes handed over,
    /// which is `range`'s length unless the range ends past the file. An error of `sink`
    /// ends the stream and is returned as it is.
    pub fn stream_file(
        &self,
        entry: &Entry,
        range: Range<u64>,
        opts: &StreamOptions<'_>,
        sink: &mut dyn FnMut(Piece) -> Result<()>,
    ) -> Result<u64> {
        if entry.kind != Kind::File {
            return Err(Error::invalid(
                "stream",
                format!("{} is a {}, not a file", entry.path, entry.kind.as_str()),
            ));
        }
        let total: u64 = entry.chunks.iter().map(|c| u64::from(c.1)).sum();
        if total != entry.size {
            return Err(Error::corrupt(
                format!("file {}", entry.path),
                format!(
                    "its chunks hold {total} bytes, its size is {} bytes",
                    entry.size
                ),
            ));
        }
        let (start, end) = (range.start, range.end.min(entry.size));
        let mut slots = Vec::new();
        let mut pos = 0u64;
        for c in &entry.chunks {
            let (cs, ce) = (pos, pos + u64::from(c.1));
            pos = ce;
            if ce <= start || c.1 == 0 {
                continue;
            }
            if cs >= end {
                break;
            }
            slots.push(Slot {
                id: c.0,
                len: c.1,
                range: (start.max(cs) - cs) as usize..(end.min(ce) - cs) as usize,
            });
        }
        let mut sent = 0u64;
        let mut hand = |s: &Slot, chunk: Arc<Vec<u8>>| -> Result<()> {
            if chunk.len() != s.len as usize {
                return Err(Error::corrupt(
                    format!("chunk {}", s.id),
                    format!(
                        "{} bytes decoded, the file lists {} bytes",
                        chunk.len(),
                        s.len
                    ),
                ));
            }
            sent += s.range.len() as u64;
            sink(Piece {
                id: s.id,
                chunk,
                range: s.range.clone(),
            })
        };
        let cached = |id: &ChunkId| opts.cached.and_then(|f| f(id));
        let ids: Vec<ChunkId> = slots.iter().map(|s| s.id).collect();
        if self.tier.is_some() && !self.all_local(&ids)? {
            // Cold tiered read: coalesced ranged GETs; what the caller holds is not read again.
            let missing: Vec<usize> = (0..slots.len())
                .filter(|&i| cached(&slots[i].id).is_none())
                .collect();
            let want: Vec<ChunkId> = missing.iter().map(|&i| slots[i].id).collect();
            let mut next = 0usize;
            let take = |upto: usize,
                        got: Option<Vec<u8>>,
                        next: &mut usize,
                        hand: &mut Hand<'_>|
             -> Result<()> {
                while *next < upto {
                    let s = &slots[*next];
                    let c = match cached(&s.id) {
                        Some(c) => c,
                        // Evicted from the caller's cache meanwhile.
                        None => Arc::new(self.read_chunk(&s.id)?),
                    };
                    hand(s, c)?;
                    *next += 1;
                }
                if let Some(d) = got {
                    hand(&slots[*next], Arc::new(d))?;
                    *next += 1;
                }
                Ok(())
            };
            self.for_each_chunk(&want, &mut |k, d| {
                take(missing[k], Some(d), &mut next, &mut hand)
            })
            .and_then(|()| take(slots.len(), None, &mut next, &mut hand))
            .map_err(|e| crate::store::with_file(e, &entry.path))?;
            return Ok(sent);
        }
        let fetch = |i: usize| -> Result<Arc<Vec<u8>>> {
            match cached(&slots[i].id) {
                Some(c) => Ok(c),
                None => Ok(Arc::new(self.read_chunk(&slots[i].id)?)),
            }
        };
        crate::fetch::pipelined(
            slots.len(),
            opts.threads.max(1),
            opts.ahead.max(1),
            &fetch,
            &mut |i, got| hand(&slots[i], got?),
        )
        .map_err(|e| crate::store::with_file(e, &entry.path))?;
        Ok(sent)
    }
}
