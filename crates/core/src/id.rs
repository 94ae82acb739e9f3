//! Content identifiers: 32-byte BLAKE3 digests behind distinct newtypes, so a chunk id can never
//! be passed where a manifest digest or a pack id is expected.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// BLAKE3 of `data`.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }
            /// Lower-case hex, 64 characters.
            pub fn to_hex(&self) -> String {
                let mut s = String::with_capacity(64);
                for b in self.0 {
                    s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
                    s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
                }
                s
            }
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// From a 32-byte slice (e.g. a SQLite blob).
            pub fn from_slice(b: &[u8]) -> Result<Self, Error> {
                let arr: [u8; 32] = b
                    .try_into()
                    .map_err(|_| Error::corrupt($what, format!("{} bytes, expected 32", b.len())))?;
                Ok(Self(arr))
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                let s = s.strip_prefix("blake3:").unwrap_or(s);
                if s.len() != 64 {
                    return Err(Error::invalid($what, format!("{s:?} is not 64 hex digits")));
                }
                let mut out = [0u8; 32];
                for (i, pair) in s.as_bytes().chunks(2).enumerate() {
                    let hi = (pair[0] as char).to_digit(16);
                    let lo = (pair[1] as char).to_digit(16);
                    match (hi, lo) {
                        (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
                        _ => return Err(Error::invalid($what, format!("{s:?} is not hex"))),
                    }
                }
                Ok(Self(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

digest_type!(
    /// BLAKE3 of a chunk's plaintext.
    ChunkId,
    "chunk id"
);
digest_type!(
    /// BLAKE3 of a manifest's canonical bytes.
    ManifestDigest,
    "manifest digest"
);
digest_type!(
    /// BLAKE3 of a whole pack file's bytes.
    PackId,
    "pack id"
);
digest_type!(
    /// BLAKE3 of a whole file's contents.
    FileHash,
    "file hash"
);

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Hashing in pieces of any size (as ingest does, read by read) equals one-shot hashing.
        #[test]
        fn streaming_hash_equals_one_shot(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200_000),
            cuts in proptest::collection::vec(1usize..70_000, 1..8),
        ) {
            let mut h = blake3::Hasher::new();
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                h.update(&rest[..n]);
                rest = &rest[n..];
                i += 1;
            }
            proptest::prop_assert_eq!(FileHash::from(h.finalize()), FileHash::of(&data));
        }
    }

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let parsed: ChunkId = id.to_hex().parse().unwrap();
        assert_eq!(id, parsed);
        assert_eq!(id.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert!("zz".parse::<ChunkId>().is_err());
        assert!("g".repeat(64).parse::<ChunkId>().is_err());
    }
}
