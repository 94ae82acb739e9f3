//! Pack files: append-only containers of stored chunks that describe themselves.
//!
//! Layout (version 1, all integers little-endian; see `docs/format.md`):
//!
//! ```text
//! header   "AFSPACK1"                                   8 bytes
//! blobs    the stored bytes of each chunk, back to back
//! table    one 49-byte entry per chunk:
//!            chunk id (BLAKE3 of plaintext)            32
//!            codec (0 raw, 1 zstd)                      1
//!            raw length                                 4
//!            stored length                              4
//!            offset of the blob from the pack start     8
//! footer   table length in bytes                        8
//!          BLAKE3 of the table                         32
//!          "AFSPEND1"                                   8
//! ```
//!
//! A pack's id is the BLAKE3 of all its bytes, so a pack names itself and any damage to it is
//! detectable. The table lets the index be rebuilt from packs alone. Packs are built in memory
//! up to a target size, then written once with [`ObjectStore::put`] (durable on return) before
//! the index may refer to any chunk in them. The builder hashes the bytes as it appends them,
//! so sealing a pack does not read it again to name it.

use crate::codec::{self, Codec};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::objstore::ObjectStore;

pub const HEADER: &[u8; 8] = b"AFSPACK1";
pub const FOOTER_MAGIC: &[u8; 8] = b"AFSPEND1";
pub const ENTRY_LEN: usize = 49;
pub const FOOTER_LEN: usize = 48;

/// Where one chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub chunk: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub stored_len: u32,
    pub offset: u64,
}

/// The object key of a pack.
pub fn pack_key(id: &PackId) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{hex}", &hex[..2])
}

/// Parses a pack id back out of its key.
pub fn pack_id_from_key(key: &str) -> Option<PackId> {
    key.strip_prefix("packs/")?.rsplit('/').next()?.parse().ok()
}

/// A pack being assembled in memory.
pub struct PackBuilder {
    /// `start` bytes of padding (see [`PackBuilder::with_aligned_buffer`]), then the pack.
    buf: Vec<u8>,
    start: usize,
    entries: Vec<PackEntry>,
    /// BLAKE3 of the pack so far: the pack id once the table and footer are in.
    hasher: blake3::Hasher,
}

/// A finished pack in the buffer it was built in: its bytes are `buf[start..]`.
pub struct FinishedPack {
    pub id: PackId,
    pub buf: Vec<u8>,
    pub start: usize,
    pub entries: Vec<PackEntry>,
}

impl FinishedPack {
    /// The pack's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        Self::with_buffer(Vec::with_capacity(1 << 20))
    }

    /// A builder that appends to `buf` (cleared first): a buffer of the pack's expected size
    /// avoids growing it by copies, and a written pack's buffer can be reused for the next one.
    pub fn with_buffer(buf: Vec<u8>) -> Self {
        Self::in_buffer(buf, 0)
    }

    /// [`PackBuilder::with_buffer`], with the pack starting at an address of `buf` that is a
    /// multiple of `align` (a few padding bytes first): as long as the buffer does not grow,
    /// the finished pack can be written with `O_DIRECT` straight from it, without a copy.
    pub fn with_aligned_buffer(buf: Vec<u8>, align: usize) -> Self {
        Self::in_buffer(buf, align)
    }

    fn in_buffer(mut buf: Vec<u8>, align: usize) -> Self {
        buf.clear();
        let start = match buf.as_ptr().align_offset(align.max(1)) {
            // Padding only where it fits without moving the buffer.
            pad if pad < align && pad + HEADER.len() <= buf.capacity() => pad,
            _ => 0,
        };
        buf.resize(start, 0);
        buf.extend_from_slice(HEADER);
        let mut hasher = blake3::Hasher::new();
        hasher.update(HEADER);
        Self {
            buf,
            start,
            entries: Vec::new(),
            hasher,
        }
    }

    /// Bytes so far (header and blobs).
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// Appends one stored chunk.
    pub fn add(&mut self, chunk: ChunkId, codec: Codec, raw_len: usize, stored: &[u8]) {
        let offset = self.len() as u64;
        self.buf.extend_from_slice(stored);
        self.hasher.update(stored);
        self.entries.push(PackEntry {
            chunk,
            codec,
            raw_len: raw_len as u32,
            stored_len: stored.len() as u32,
            offset,
        });
    }

    /// Appends every chunk of `other`, in its order, after this pack's.
    pub fn append(&mut self, other: &PackBuilder) {
        for e in &other.entries {
            let at = other.start + e.offset as usize;
            let stored = &other.buf[at..at + e.stored_len as usize];
            self.add(e.chunk, e.codec, e.raw_len as usize, stored);
        }
    }

    /// Seals the pack: appends table and footer, returns its id, bytes and entries.
    pub fn finish(self) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        let mut p = self.finish_in_buffer();
        if p.start > 0 {
            p.buf.drain(..p.start);
        }
        (p.id, p.buf, p.entries)
    }

    /// Seals the pack, leaving it where it was built (after the padding of
    /// [`PackBuilder::with_aligned_buffer`]).
    pub fn finish_in_buffer(mut self) -> FinishedPack {
        let at = self.buf.len();
        let table = encode_table(&self.entries);
        self.buf.extend_from_slice(&table);
        self.buf
            .extend_from_slice(&(table.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(blake3::hash(&table).as_bytes());
        self.buf.extend_from_slice(FOOTER_MAGIC);
        self.hasher.update(&self.buf[at..]);
        FinishedPack {
            id: PackId::from(self.hasher.finalize()),
            buf: self.buf,
            start: self.start,
            entries: self.entries,
        }
    }
}

fn encode_table(entries: &[PackEntry]) -> Vec<u8> {
    let mut t = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        t.extend_from_slice(e.chunk.as_bytes());
        t.push(e.codec as u8);
        t.extend_from_slice(&e.raw_len.to_le_bytes());
        t.extend_from_slice(&e.stored_len.to_le_bytes());
        t.extend_from_slice(&e.offset.to_le_bytes());
    }
    t
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parses and checks a pack's chunk table, reading only its tail from the store.
pub fn read_table(store: &dyn ObjectStore, key: &str) -> Result<Vec<PackEntry>> {
    let size = store.head(key)?.ok_or_else(|| Error::MissingObject {
        key: key.to_owned(),
        backend: store.describe(),
    })?;
    table_of(key, size, &|offset, len| store.get_range(key, offset, len))
}

/// Parses and checks the chunk table of a pack read whole.
pub fn parse_table(key: &str, bytes: &[u8]) -> Result<Vec<PackEntry>> {
    table_of(key, bytes.len() as u64, &|offset, len| {
        let end = offset.saturating_add(len).min(bytes.len() as u64);
        Ok(bytes[offset.min(end) as usize..end as usize].to_vec())
    })
}

/// The chunk table of a pack of `size` bytes, whose ranges `range(offset, len)` reads.
fn table_of(
    key: &str,
    size: u64,
    range: &dyn Fn(u64, u64) -> Result<Vec<u8>>,
) -> Result<Vec<PackEntry>> {
    let what = || format!("pack {key}");
    if size < (HEADER.len() + FOOTER_LEN) as u64 {
        return Err(Error::corrupt(what(), format!("only {size} bytes")));
    }
    let header = range(0, HEADER.len() as u64)?;
    if header != HEADER {
        return Err(Error::corrupt(
            what(),
            "no pack header (not a pack, or an unknown version)",
        ));
    }
    let footer = range(size - FOOTER_LEN as u64, FOOTER_LEN as u64)?;
    if &footer[40..48] != FOOTER_MAGIC {
        return Err(Error::corrupt(what(), "no pack footer (truncated?)"));
    }
    let table_len = le_u64(&footer[0..8]);
    let blobs_end = size - FOOTER_LEN as u64;
    if !table_len.is_multiple_of(ENTRY_LEN as u64) || table_len > blobs_end - HEADER.len() as u64 {
        return Err(Error::corrupt(
            what(),
            format!("bad table length {table_len}"),
        ));
    }
    let table_start = blobs_end - table_len;
    let table = range(table_start, table_len)?;
    if blake3::hash(&table).as_bytes() != &footer[8..40] {
        return Err(Error::corrupt(what(), "chunk table checksum mismatch"));
    }
    let mut out = Vec::with_capacity(table.len() / ENTRY_LEN);
    for e in table.chunks_exact(ENTRY_LEN) {
        let entry = PackEntry {
            chunk: ChunkId::from_slice(&e[0..32])?,
            codec: Codec::from_u8(e[32])?,
            raw_len: le_u32(&e[33..37]),
            stored_len: le_u32(&e[37..41]),
            offset: le_u64(&e[41..49]),
        };
        let end = entry.offset.checked_add(u64::from(entry.stored_len));
        if entry.offset < HEADER.len() as u64 || end.is_none_or(|end| end > table_start) {
            return Err(Error::corrupt(
                what(),
                format!("entry for chunk {} points outside the pack", entry.chunk),
            ));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Reads one chunk's plaintext, checking its length and hash.
pub fn read_chunk(store: &dyn ObjectStore, pack: &PackId, e: &PackEntry) -> Result<Vec<u8>> {
    let key = pack_key(pack);
    let stored = store.get_range(&key, e.offset, u64::from(e.stored_len))?;
    if e.codec == Codec::Raw && stored.len() == e.raw_len as usize {
        // The stored bytes are the plaintext: checked in place, not copied.
        if ChunkId::of(&stored) != e.chunk {
            return Err(Error::corrupt(
                format!("chunk {} in {key}", e.chunk),
                "content does not match its BLAKE3 id",
            ));
        }
        return Ok(stored);
    }
    decode_chunk(&key, e, &stored)
}

/// Decodes stored bytes of a chunk, checking its length and hash.
pub fn decode_chunk(key: &str, e: &PackEntry, stored: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("chunk {} in {key}", e.chunk);
    let data = codec::decode(e.codec, stored, e.raw_len as usize, &what)?;
    if ChunkId::of(&data) != e.chunk {
        return Err(Error::corrupt(
            what(),
            "content does not match its BLAKE3 id",
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::MemoryStore;

    fn build(chunks: &[&[u8]]) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        let mut b = PackBuilder::new();
        let mut out = Vec::new();
        for c in chunks {
            let codec = codec::encode(c, 3, &mut out).unwrap();
            b.add(ChunkId::of(c), codec, c.len(), &out);
        }
        b.finish()
    }

    #[test]
    fn round_trip_through_store() {
        let text = b"hello hello hello hello hello hello hello hello hello hello".repeat(50);
        let chunks: [&[u8]; 3] = [b"a", &text, b""];
        let (id, bytes, entries) = build(&chunks);
        assert_eq!(id, PackId::of(&bytes));
        let store = MemoryStore::default();
        store.put(&pack_key(&id), &bytes).unwrap();
        assert_eq!(pack_id_from_key(&pack_key(&id)), Some(id));
        let table = read_table(&store, &pack_key(&id)).unwrap();
        assert_eq!(table, entries);
        for (c, e) in chunks.iter().zip(&table) {
            assert_eq!(&read_chunk(&store, &id, e).unwrap()[..], *c);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// The id hashed while appending equals the one-shot BLAKE3 of the finished pack, and a
        /// reused buffer (with old bytes in it) builds the same pack.
        #[test]
        fn incremental_id_is_the_hash_of_the_bytes(
            lens in proptest::collection::vec(0usize..5000, 0..12), seed in 0u8..255,
        ) {
            let chunks: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|j| (j * 7 + i * 13) as u8 ^ seed).collect())
                .collect();
            let mut fresh = PackBuilder::new();
            let mut reused = PackBuilder::with_buffer(vec![0xAA; 3000]);
            let mut aligned = PackBuilder::with_aligned_buffer(Vec::with_capacity(1 << 20), 4096);
            let mut padded = PackBuilder::with_aligned_buffer(Vec::with_capacity(1 << 20), 4096);
            for c in &chunks {
                fresh.add(ChunkId::of(c), Codec::Raw, c.len(), c);
                reused.add(ChunkId::of(c), Codec::Raw, c.len(), c);
                aligned.add(ChunkId::of(c), Codec::Raw, c.len(), c);
                padded.add(ChunkId::of(c), Codec::Raw, c.len(), c);
            }
            let (id, bytes, entries) = fresh.finish();
            proptest::prop_assert_eq!(id, PackId::of(&bytes));
            // Built at an aligned address, the same pack, left in place or taken out.
            let in_place = aligned.finish_in_buffer();
            proptest::prop_assert_eq!(in_place.bytes().as_ptr().align_offset(4096), 0);
            proptest::prop_assert_eq!(in_place.bytes(), &bytes[..]);
            proptest::prop_assert_eq!(in_place.id, id);
            proptest::prop_assert_eq!(&in_place.entries, &entries);
            proptest::prop_assert_eq!(padded.finish(), (id, bytes.clone(), entries.clone()));
            proptest::prop_assert_eq!(reused.finish(), (id, bytes, entries));
        }
    }

    #[test]
    fn damage_is_detected() {
        let text = b"0123456789abcdef".repeat(100);
        let (id, bytes, entries) = build(&[&text]);
        let store = MemoryStore::default();
        let key = pack_key(&id);
        // A flipped byte inside the blob.
        let mut bad = bytes.clone();
        bad[HEADER.len() + 3] ^= 0x40;
        store.put(&key, &bad).unwrap();
        assert!(
            read_chunk(&store, &id, &entries[0])
                .unwrap_err()
                .is_damage()
        );
        // A truncated pack.
        store.put(&key, &bytes[..bytes.len() - 10]).unwrap();
        assert!(read_table(&store, &key).unwrap_err().is_damage());
        // A flipped byte in the table.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - FOOTER_LEN - 5] ^= 1;
        store.put(&key, &bad).unwrap();
        assert!(read_table(&store, &key).unwrap_err().is_damage());
        // Missing.
        store.delete(&key).unwrap();
        assert!(
            read_chunk(&store, &id, &entries[0])
                .unwrap_err()
                .is_damage()
        );
    }
}
