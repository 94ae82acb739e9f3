//! Content-defined chunking (FastCDC, the 2020 variant) as a push-based stream.
//!
//! Bytes are pushed in pieces of any size (a `read` buffer, a FUSE `write`, an HTTP body frame)
//! and complete chunks are handed to a callback as borrowed slices. Cut points are exactly those
//! of `fastcdc::v2020::StreamCDC` with the same parameters: a cut is only searched for when
//! `max_size` bytes are buffered (or at the end), so the result does not depend on how the input
//! was split into pushes. Memory is bounded by a small multiple of `max_size`.

use fastcdc::v2020::{Normalization, cut, select_masks};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunk size parameters, fixed for a store at `init` (changing them only costs dedup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    /// Chosen by the sweeps recorded in `docs/adr/0005-chunk-size.md` and
    /// `docs/adr/0017-smaller-chunks.md`.
    fn default() -> Self {
        Self {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Checks the parameters against FastCDC's limits.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "chunker parameters",
                format!(
                    "min {min} avg {avg} max {max}: need even sizes, min {MINIMUM_MIN}..={MINIMUM_MAX}, \
                     avg {AVERAGE_MIN}..={AVERAGE_MAX}, max {MAXIMUM_MIN}..={MAXIMUM_MAX}, min <= avg <= max"
                ),
            ))
        }
    }
}

/// Push-based FastCDC chunker.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
}

impl Chunker {
    /// A chunker with validated parameters.
    pub fn new(params: ChunkerParams) -> Result<Self> {
        params.validate()?;
        let (mask_s, mask_l) = select_masks(params.avg_size as usize, Normalization::Level1);
        Ok(Self {
            params,
            mask_s,
            mask_l,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    fn cut_len(&self, data: &[u8]) -> usize {
        let p = &self.params;
        let (_, n) = cut(
            data,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n
    }

    /// The length of the next chunk at the start of `data`, for a caller that keeps the bytes
    /// itself (no copy into the chunker): `None` while `data` holds less than `max_size` bytes
    /// and more may follow (`eof` false), since the cut may depend on them. Cutting a stream by
    /// repeated calls gives the same chunks as [`Chunker::push`] and [`Chunker::finish`].
    pub fn next_cut(&self, data: &[u8], eof: bool) -> Option<usize> {
        let max = self.params.max_size as usize;
        if data.len() >= max {
            Some(self.cut_len(&data[..max]))
        } else if eof && !data.is_empty() {
            Some(self.cut_len(data))
        } else {
            None
        }
    }

    /// Adds bytes; calls `emit` for each chunk completed by them.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        emit: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let max = self.params.max_size as usize;
        while !data.is_empty() {
            let avail = self.buf.len() - self.pos;
            if avail == 0 && data.len() >= max {
                // Fast path: cut straight from the caller's buffer, no copy.
                let n = self.cut_len(&data[..max]);
                emit(&data[..n])?;
                data = &data[n..];
                continue;
            }
            let take = (max - avail).min(data.len());
            if self.pos > 0 && self.buf.len() + take > self.buf.capacity() {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            while self.buf.len() - self.pos >= max {
                let n = self.cut_len(&self.buf[self.pos..self.pos + max]);
                emit(&self.buf[self.pos..self.pos + n])?;
                self.pos += n;
            }
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            }
        }
        Ok(())
    }

    /// Flushes the remaining bytes as the last chunk(s) and resets the chunker for a new stream.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        while self.pos < self.buf.len() {
            let n = self.cut_len(&self.buf[self.pos..]);
            emit(&self.buf[self.pos..self.pos + n])?;
            self.pos += n;
        }
        self.buf.clear();
        self.pos = 0;
        Ok(())
    }

    /// Chunk boundaries (lengths) of an in-memory buffer; for tests and tools.
    pub fn chunk_lengths(params: ChunkerParams, data: &[u8]) -> Result<Vec<usize>> {
        let mut c = Chunker::new(params)?;
        let mut out = Vec::new();
        let mut f = |chunk: &[u8]| -> Result<(), Error> {
            out.push(chunk.len());
            Ok(())
        };
        c.push(data, &mut f)?;
        c.finish(&mut f)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> ChunkerParams {
        ChunkerParams {
            min_size: 256,
            avg_size: 1024,
            max_size: 4096,
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn chunks_by_pushes(params: ChunkerParams, data: &[u8], split: &[usize]) -> Vec<Vec<u8>> {
        let mut c = Chunker::new(params).unwrap();
        let mut out = Vec::new();
        let mut f = |ch: &[u8]| -> Result<(), Error> {
            out.push(ch.to_vec());
            Ok(())
        };
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = split[i % split.len()].max(1).min(rest.len());
            c.push(&rest[..n], &mut f).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        c.finish(&mut f).unwrap();
        out
    }

    #[test]
    fn matches_fastcdc_streamcdc() {
        let data = pseudo_random(300_000, 7);
        let p = small();
        let reference: Vec<usize> = fastcdc::v2020::StreamCDC::new(
            &data[..],
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
        )
        .map(|c| c.unwrap().length)
        .collect();
        let ours: Vec<usize> = chunks_by_pushes(p, &data, &[1000, 7, 65536])
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(reference, ours);
    }

    /// Cuts `data` the way ingest does with `next_cut`: read into blocks of at most `block`
    /// new bytes, the uncut tail of each carried to the start of the next.
    fn chunks_by_next_cut(params: ChunkerParams, data: &[u8], block: usize) -> Vec<usize> {
        let c = Chunker::new(params).unwrap();
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut rest = data;
        loop {
            let n = block.min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let eof = n < block;
            let mut pos = 0;
            while let Some(len) = c.next_cut(&buf[pos..], eof) {
                out.push(len);
                pos += len;
            }
            buf.drain(..pos);
            if eof {
                assert!(buf.is_empty());
                return out;
            }
        }
    }

    #[test]
    fn empty_input_gives_no_chunks() {
        assert!(Chunker::chunk_lengths(small(), &[]).unwrap().is_empty());
    }

    #[test]
    fn bad_params_refused() {
        let p = ChunkerParams {
            min_size: 4096,
            avg_size: 1024,
            max_size: 8192,
        };
        assert!(Chunker::new(p).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Chunks concatenate back to the input, whatever the push sizes; sizes obey the bounds.
        #[test]
        fn chunks_concatenate(len in 0usize..40_000, seed in any::<u64>(),
                              split in proptest::collection::vec(1usize..9000, 1..5)) {
            let data = pseudo_random(len, seed);
            let p = small();
            let chunks = chunks_by_pushes(p, &data, &split);
            let joined: Vec<u8> = chunks.concat();
            prop_assert_eq!(&joined, &data);
            for (i, c) in chunks.iter().enumerate() {
                prop_assert!(c.len() <= p.max_size as usize);
                if i + 1 < chunks.len() {
                    prop_assert!(c.len() >= p.min_size as usize);
                }
            }
            let one_push = chunks_by_pushes(p, &data, &[usize::MAX]);
            prop_assert_eq!(&one_push, &chunks);
        }

        /// Cutting from the caller's buffer (`next_cut`) gives the chunks of `push`, whatever
        /// the block size, including blocks smaller than `max_size` and inputs that end exactly
        /// at a block's end.
        #[test]
        fn next_cut_matches_push(blocks in 1usize..12, extra in 0usize..3, seed in any::<u64>(),
                                 block in prop_oneof![Just(4096usize), Just(4097), Just(9000), 1usize..20_000]) {
            let len = (blocks * block).saturating_sub(extra);
            let data = pseudo_random(len, seed);
            let p = small();
            let pushed: Vec<usize> = chunks_by_pushes(p, &data, &[block]).iter().map(Vec::len).collect();
            prop_assert_eq!(chunks_by_next_cut(p, &data, block), pushed);
        }

        /// After an insertion, boundaries resynchronise shortly after it: from some cut within
        /// a few maximum chunk lengths past the insertion, every cut equals the original's.
        #[test]
        fn boundaries_resynchronise(seed in any::<u64>(), at in 0usize..100_000,
                                    ins in proptest::collection::vec(any::<u8>(), 1..300)) {
            let data = pseudo_random(200_000, seed);
            let mut edited = data.clone();
            edited.splice(at..at, ins.iter().copied());
            let p = small();
            let cuts = |d: &[u8]| -> Vec<usize> {
                let mut pos = 0;
                Chunker::chunk_lengths(p, d).unwrap().iter().map(|n| { pos += n; pos }).collect()
            };
            let original: std::collections::BTreeSet<usize> = cuts(&data).into_iter().collect();
            let after: Vec<usize> = cuts(&edited)
                .into_iter()
                .filter(|c| *c >= at + ins.len())
                .map(|c| c - ins.len())
                .collect();
            let first = after.iter().position(|c| original.contains(c));
            let Some(first) = first else {
                return Err(TestCaseError::fail("cut points never resynchronised"));
            };
            prop_assert!(after[first] - at <= 8 * p.max_size as usize,
                "resynchronised only {} bytes after the insertion", after[first] - at);
            let rest: Vec<usize> = original.range(after[first]..).copied().collect();
            prop_assert_eq!(&after[first..], &rest[..]);
        }
    }
}
