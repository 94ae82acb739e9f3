//! Manifests: the canonical, content-addressed record of a sealed run.
//!
//! The canonical bytes are compact JSON of [`Manifest`] with fields in declaration order, maps
//! sorted by key, and entries sorted by path (byte order). The manifest digest is BLAKE3 of those
//! bytes. The same tree yields the same bytes whichever frontend sealed it (CLI ingest, the mount,
//! the spool watcher), provided the same metadata and seal time.
//!
//! Manifests are stored as objects `manifests/<2 hex>/<digest hex>`, zstd-compressed; reading one
//! checks the digest, so a damaged manifest is an error.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, FileHash, ManifestDigest};
use crate::objstore::ObjectStore;

/// Version of the manifest format written by this build.
pub const MANIFEST_FORMAT: u32 = 1;

/// Path of the run's root directory entry.
pub const ROOT: &str = ".";

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Another name for an earlier `file` entry (its path is in `target`).
    Hardlink,
    Fifo,
    Char,
    Block,
    Socket,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::Fifo => "fifo",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Socket => "socket",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "file" => Kind::File,
            "dir" => Kind::Dir,
            "symlink" => Kind::Symlink,
            "hardlink" => Kind::Hardlink,
            "fifo" => Kind::Fifo,
            "char" => Kind::Char,
            "block" => Kind::Block,
            "socket" => Kind::Socket,
            other => {
                return Err(Error::corrupt(
                    "entry kind",
                    format!("unknown kind {other:?}"),
                ));
            }
        })
    }
}

/// One chunk of a file: id and plaintext length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub ChunkId, pub u32);

/// An extended attribute's value: text when it is UTF-8, base64 otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum XattrValue {
    Text(String),
    Binary { base64: String },
}

impl XattrValue {
    pub fn from_bytes(b: &[u8]) -> Self {
        match std::str::from_utf8(b) {
            Ok(s) => XattrValue::Text(s.to_owned()),
            Err(_) => XattrValue::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(b),
            },
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match self {
            XattrValue::Text(s) => Ok(s.as_bytes().to_vec()),
            XattrValue::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|e| Error::corrupt("xattr value", e.to_string())),
        }
    }
}

/// One entry of a run's tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path, `/`-separated; the run root is `.`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of content (files; symlinks: target length; otherwise 0).
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Whole-file BLAKE3 (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<FileHash>,
    /// Content chunks in order (files only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
    /// Symlink target, or the path of the entry a hard link shares its inode with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device number (char and block devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, XattrValue>,
}

impl Entry {
    /// Encodes the chunk list compactly for the index: 36 bytes per chunk (id, LE u32 length).
    pub fn chunk_blob(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.chunks.len() * 36);
        for c in &self.chunks {
            b.extend_from_slice(c.0.as_bytes());
            b.extend_from_slice(&c.1.to_le_bytes());
        }
        b
    }

    /// Decodes [`Entry::chunk_blob`].
    pub fn chunks_from_blob(b: &[u8]) -> Result<Vec<ChunkRef>> {
        if !b.len().is_multiple_of(36) {
            return Err(Error::corrupt("chunk list", format!("{} bytes", b.len())));
        }
        b.chunks_exact(36)
            .map(|c| {
                Ok(ChunkRef(
                    ChunkId::from_slice(&c[..32])?,
                    u32::from_le_bytes([c[32], c[33], c[34], c[35]]),
                ))
            })
            .collect()
    }
}

/// A sealed run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub namespace: String,
    pub run: String,
    /// RFC 3339, from the store's clock.
    pub sealed_at: String,
    /// Producer metadata: `--meta KEY=VALUE`, and the text `user.*` xattrs of the run
    /// directory keyed without `user.` (an explicit `--meta` wins). The root entry keeps its
    /// xattrs too.
    pub metadata: BTreeMap<String, String>,
    /// Entries sorted by path.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Sorts entries into canonical order; call before [`Manifest::canonical_bytes`].
    pub fn canonicalize(&mut self) {
        sort_entries(&mut self.entries);
    }

    /// The canonical serialisation.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Internal(format!("manifest encode: {e}")))
    }

    /// Parses manifest bytes, checking that they are canonical (so that the digest names one
    /// tree in exactly one way) and that every path is a safe relative path.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(what, format!("not a manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::corrupt(
                what,
                format!(
                    "manifest format {} is not supported (this build reads {MANIFEST_FORMAT})",
                    m.format
                ),
            ));
        }
        let mut sorted = m.clone();
        sorted.canonicalize();
        if sorted.canonical_bytes()? != bytes {
            return Err(Error::corrupt(what, "bytes are not in canonical form"));
        }
        for e in &m.entries {
            let bad = |p: &str| Error::corrupt(what, format!("unsafe path {p:?}"));
            if e.path != ROOT {
                crate::names::validate_path(&e.path).map_err(|_| bad(&e.path))?;
            }
            if e.kind == Kind::Hardlink {
                let t = e.target.as_deref().unwrap_or("");
                crate::names::validate_path(t)
                    .ok()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad(t))?;
            }
        }
        Ok(m)
    }

    /// `sealed_at` in nanoseconds since the Unix epoch, if it parses. The index records this
    /// time for the seal (not a second reading of the clock), so that an index rebuilt from
    /// the manifests shows the same.
    pub fn sealed_at_ns(&self) -> Option<i64> {
        humantime::parse_rfc3339(&self.sealed_at)
            .ok()
            .map(crate::clock::to_unix_ns)
    }

    /// Raw bytes of content (files and hard links counted once).
    pub fn raw_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.size)
            .sum()
    }
}

/// Sorts entries into canonical order: the root first, then paths in byte order.
pub fn sort_entries(entries: &mut [Entry]) {
    entries.sort_by(|a, b| sort_key(&a.path).cmp(&sort_key(&b.path)));
}

/// Sort key: the root first, then paths in byte order.
fn sort_key(p: &str) -> (bool, &[u8]) {
    (p != ROOT, p.as_bytes())
}

/// The object key of a manifest.
pub fn manifest_key(d: &ManifestDigest) -> String {
    let hex = d.to_hex();
    format!("manifests/{}/{hex}", &hex[..2])
}

/// Stores canonical manifest bytes; returns their digest and the stored size.
pub fn store_manifest(objects: &dyn ObjectStore, bytes: &[u8]) -> Result<(ManifestDigest, u64)> {
    let digest = ManifestDigest::of(bytes);
    let key = manifest_key(&digest);
    let compressed = zstd::bulk::compress(bytes, 3)
        .map_err(|e| Error::Internal(format!("zstd compress manifest: {e}")))?;
    if objects.head(&key)? != Some(compressed.len() as u64) {
        objects.put(&key, &compressed)?;
    }
    Ok((digest, compressed.len() as u64))
}

/// Loads a manifest's canonical bytes, checking the digest.
pub fn load_manifest_bytes(objects: &dyn ObjectStore, d: &ManifestDigest) -> Result<Vec<u8>> {
    let key = manifest_key(d);
    let stored = objects.get(&key)?;
    let what = || format!("manifest {d}");
    let bytes = zstd::stream::decode_all(&stored[..])
        .map_err(|e| Error::corrupt(what(), format!("zstd: {e}")))?;
    if ManifestDigest::of(&bytes) != *d {
        return Err(Error::corrupt(what(), "content does not match its digest"));
    }
    Ok(bytes)
}

/// Loads and parses a manifest.
pub fn load_manifest(objects: &dyn ObjectStore, d: &ManifestDigest) -> Result<Manifest> {
    let bytes = load_manifest_bytes(objects, d)?;
    Manifest::from_bytes(&bytes, &format!("manifest {d}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::MemoryStore;

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            mtime_ns: 1,
            blake3: Some(FileHash::of(b"x")),
            chunks: vec![ChunkRef(ChunkId::of(b"x"), 1)],
            target: None,
            rdev: None,
            xattrs: BTreeMap::from([("user.a".into(), XattrValue::from_bytes(&[0xff, 0]))]),
        }
    }

    #[test]
    fn canonical_and_round_trip() {
        let mut m = Manifest {
            format: MANIFEST_FORMAT,
            namespace: "ns".into(),
            run: "r".into(),
            sealed_at: "2026-01-01T00:00:00Z".into(),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            entries: vec![entry("b"), entry(ROOT), entry("a/c"), entry("a")],
        };
        m.canonicalize();
        let order: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(order, [".", "a", "a/c", "b"]);
        let bytes = m.canonical_bytes().unwrap();
        let store = MemoryStore::default();
        let (d, _) = store_manifest(&store, &bytes).unwrap();
        assert_eq!(d, ManifestDigest::of(&bytes));
        let back = load_manifest(&store, &d).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.canonical_bytes().unwrap(), bytes);
        assert_eq!(
            back.entries[0].xattrs["user.a"].to_bytes().unwrap(),
            vec![0xff, 0]
        );
        let blob = m.entries[1].chunk_blob();
        assert_eq!(Entry::chunks_from_blob(&blob).unwrap(), m.entries[1].chunks);
    }

    #[test]
    fn non_canonical_or_unsafe_manifests_are_refused() {
        let good =
            r#"{"format":1,"namespace":"n","run":"r","sealed_at":"x","metadata":{},"entries":[]}"#;
        assert!(Manifest::from_bytes(good.as_bytes(), "m").is_ok());
        let spaced = good.replace(",", ", ");
        assert!(
            Manifest::from_bytes(spaced.as_bytes(), "m")
                .unwrap_err()
                .is_damage()
        );
        let evil = good.replace(
            "[]",
            r#"[{"path":"../etc/passwd","type":"file","mode":420,"uid":0,"gid":0,"size":0,"mtime_ns":0}]"#,
        );
        assert!(
            Manifest::from_bytes(evil.as_bytes(), "m")
                .unwrap_err()
                .is_damage()
        );
    }

    #[test]
    fn damaged_manifest_is_refused() {
        let store = MemoryStore::default();
        let (d, _) = store_manifest(&store, b"{\"format\":1}").unwrap();
        let key = manifest_key(&d);
        let mut stored = store.get(&key).unwrap();
        let n = stored.len();
        stored[n / 2] ^= 0x10;
        store.put(&key, &stored).unwrap();
        assert!(load_manifest_bytes(&store, &d).unwrap_err().is_damage());
    }
}
