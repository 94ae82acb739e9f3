//! Chunk codec: zstd compression, or the raw bytes when compression does not pay.
//!
//! A stored chunk is `(codec, bytes)`. Decoding always checks the plaintext length against the
//! index and the plaintext hash against the chunk id (in `pack`), so damage is an error, never
//! wrong bytes.

use crate::error::{Error, Result};

/// How a chunk's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    /// From the on-disk byte.
    pub fn from_u8(b: u8) -> Result<Self> {
        match b {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            other => Err(Error::corrupt(
                "chunk codec",
                format!("unknown codec {other}"),
            )),
        }
    }
}

/// Compresses chunks; holds a reusable zstd context (one per worker thread).
pub struct Encoder {
    level: i32,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    /// An encoder at `level` (0: store everything raw).
    pub fn new(level: i32) -> Result<Self> {
        let zstd = if level > 0 {
            Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Internal(format!("zstd context: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self { level, zstd })
    }

    /// The level in use.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses `data` into `out`; keeps it raw (and `out` empty) unless that saves at least
    /// 1/32 of the bytes.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Codec> {
        out.clear();
        if let Some(z) = self.zstd.as_mut()
            && data.len() >= 64
        {
            // Room for the worst case, in a buffer of its own if `out` is too small: `reserve`
            // would copy the old contents over (realloc), though they are cleared.
            let bound = zstd::zstd_safe::compress_bound(data.len());
            if out.capacity() < bound {
                *out = Vec::with_capacity(bound);
            }
            let n = z
                .compress_to_buffer(data, out)
                .map_err(|e| Error::Internal(format!("zstd compress: {e}")))?;
            if n + data.len() / 32 < data.len() {
                return Ok(Codec::Zstd);
            }
        }
        out.clear();
        Ok(Codec::Raw)
    }
}

/// One-shot [`Encoder::encode`] that always fills `out` with the stored bytes.
pub fn encode(data: &[u8], level: i32, out: &mut Vec<u8>) -> Result<Codec> {
    let codec = Encoder::new(level)?.encode(data, out)?;
    if codec == Codec::Raw {
        out.extend_from_slice(data);
    }
    Ok(codec)
}

/// Decodes stored bytes into exactly `raw_len` plaintext bytes.
pub fn decode(
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    match codec {
        Codec::Raw => {
            if stored.len() != raw_len {
                return Err(Error::corrupt(
                    what(),
                    format!("raw chunk is {} bytes, index says {raw_len}", stored.len()),
                ));
            }
            Ok(stored.to_vec())
        }
        Codec::Zstd => {
            // One decompression context per thread, reused: making one per chunk costs an
            // allocation and its initialisation on every read.
            thread_local! {
                static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            let out = DCTX
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new()?);
                    }
                    d.as_mut().expect("made above").decompress(stored, raw_len)
                })
                .map_err(|e| Error::corrupt(what(), format!("zstd: {e}")))?;
            let n = out.len();
            if n != raw_len {
                return Err(Error::corrupt(
                    what(),
                    format!("decompressed to {n} bytes, index says {raw_len}"),
                ));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000), level in 0i32..6,
                      repeat in 1usize..8) {
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let mut out = Vec::new();
            let codec = encode(&data, level, &mut out).unwrap();
            let back = decode(codec, &out, data.len(), &|| "test".into()).unwrap();
            prop_assert_eq!(back, data);
        }
    }

    #[test]
    fn compressible_is_compressed_and_random_is_raw() {
        let text = b"line of log text, again and again\n".repeat(1000);
        let mut out = Vec::new();
        assert_eq!(encode(&text, 3, &mut out).unwrap(), Codec::Zstd);
        assert!(out.len() < text.len() / 10);
        let random: Vec<u8> = blake3::Hasher::new().finalize_xof().fill_and_return(10_000);
        assert_eq!(encode(&random, 3, &mut out).unwrap(), Codec::Raw);
    }

    #[test]
    fn damaged_input_is_an_error() {
        let text = b"abcabcabc".repeat(100);
        let mut out = Vec::new();
        encode(&text, 3, &mut out).unwrap();
        assert!(
            decode(Codec::Zstd, &out[..out.len() / 2], text.len(), &|| "c"
                .into())
            .is_err()
        );
        assert!(decode(Codec::Zstd, &out, text.len() + 1, &|| "c".into()).is_err());
        assert!(decode(Codec::Raw, &text, text.len() - 1, &|| "c".into()).is_err());
    }

    trait FillExt {
        fn fill_and_return(self, n: usize) -> Vec<u8>;
    }
    impl FillExt for blake3::OutputReader {
        fn fill_and_return(mut self, n: usize) -> Vec<u8> {
            let mut v = vec![0; n];
            self.fill(&mut v);
            v
        }
    }
}
