//! Ingest of a directory tree as one sealed run.
//!
//! The tree is walked first (metadata only, sorted by path), then each regular file is streamed
//! through the chunker into the write pipeline: no file is ever held whole in memory. Special
//! files (FIFOs, devices, sockets) are recorded and never opened; a second name of an inode with
//! several links is recorded as a hard link to the first name in path order. The run becomes
//! visible only when its manifest is committed, after every chunk it names is durable; a failure
//! or a crash before that leaves no run behind (only unreferenced chunks, which gc reclaims).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::chunker::Chunker;
use crate::clock::rfc3339;
use crate::error::{Error, Result};
use crate::id::{ChunkId, FileHash, ManifestDigest};
use crate::manifest::{ChunkRef, Entry, Kind, MANIFEST_FORMAT, Manifest, ROOT, XattrValue};
use crate::names::{RunRef, validate_component};
use crate::store::{Progress, Store};
use crate::writer::ChunkWriter;

/// What an ingest did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct IngestReport {
    pub run: String,
    pub manifest: String,
    pub files: u64,
    /// Bytes of file content in the run.
    pub raw_bytes: u64,
    /// Plaintext bytes of chunks that were new to the store.
    pub new_raw_bytes: u64,
    /// Bytes this ingest added to the store (packs and manifest).
    pub new_stored_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// raw_bytes / new_raw_bytes: how much dedup saved.
    pub dedup_ratio: f64,
    /// raw_bytes / new_stored_bytes: dedup and compression together.
    pub reduction: f64,
}

struct Walked {
    path: String,
    fs_path: PathBuf,
    meta: fs::Metadata,
}

fn utf8_name(p: &Path, name: &std::ffi::OsStr) -> Result<String> {
    name.to_str().map(str::to_owned).ok_or_else(|| {
        Error::invalid(
            "file name",
            format!(
                "{} is not UTF-8; artifactfs stores UTF-8 names only",
                p.display()
            ),
        )
    })
}

fn walk(root: &Path) -> Result<Vec<Walked>> {
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(
            "source",
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut out = vec![Walked {
        path: ROOT.into(),
        fs_path: root.to_path_buf(),
        meta,
    }];
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("read directory", &dir, e))?;
            let fs_path = ent.path();
            let name = utf8_name(&fs_path, &ent.file_name())?;
            validate_component("file name", &name, true).map_err(|_| {
                Error::invalid(
                    "file name",
                    format!("{} contains a control character", fs_path.display()),
                )
            })?;
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta =
                fs::symlink_metadata(&fs_path).map_err(|e| Error::io("stat", &fs_path, e))?;
            if meta.is_dir() {
                stack.push((fs_path.clone(), path.clone()));
            }
            out.push(Walked {
                path,
                fs_path,
                meta,
            });
        }
    }
    Ok(out)
}

fn read_xattrs(p: &Path) -> Result<BTreeMap<String, XattrValue>> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(p) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::Unsupported => return Ok(out),
        Err(e) => return Err(Error::io("list xattrs", p, e)),
    };
    for name in names {
        // Only the user namespace is recorded: security labels, ACLs and trusted attributes
        // belong to the host, and would make the same tree hash differently on another one.
        if !name.as_encoded_bytes().starts_with(b"user.") {
            continue;
        }
        let Some(n) = name.to_str() else {
            return Err(Error::invalid(
                "xattr name",
                format!("{}: {:?} is not UTF-8", p.display(), name),
            ));
        };
        match xattr::get(p, &name) {
            Ok(Some(v)) => {
                out.insert(n.to_owned(), XattrValue::from_bytes(&v));
            }
            Ok(None) => {}
            Err(e) => return Err(Error::io("read xattr", p, e)),
        }
    }
    Ok(out)
}

/// Nanoseconds since the epoch of a (seconds, nanoseconds) time, if it fits in an i64
/// (years 1677 to 2262).
pub fn time_ns(sec: i64, nsec: i64) -> Option<i64> {
    sec.checked_mul(1_000_000_000)?.checked_add(nsec)
}

fn base_entry(w: &Walked, kind: Kind) -> Result<Entry> {
    let m = &w.meta;
    let mtime_ns = time_ns(m.mtime(), m.mtime_nsec()).ok_or_else(|| {
        Error::invalid(
            "mtime",
            format!(
                "{}: {} s since the epoch is outside the years 1677..2262 that artifactfs records",
                w.fs_path.display(),
                m.mtime()
            ),
        )
    })?;
    Ok(Entry {
        path: w.path.clone(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: 0,
        mtime_ns,
        blake3: None,
        chunks: Vec::new(),
        target: None,
        rdev: None,
        xattrs: read_xattrs(&w.fs_path)?,
    })
}

/// Streams a reader through the chunker into the writer; returns (size, hash, chunks).
pub fn ingest_stream(
    store: &Store,
    writer: &mut ChunkWriter,
    src: impl Read,
    progress: &dyn Progress,
    src_name: &Path,
) -> Result<(u64, FileHash, Vec<ChunkRef>)> {
    let mut chunks = Vec::new();
    let (size, hash) = stream_chunks(store, src, progress, src_name, &mut |data| {
        let id = ChunkId::of(data);
        writer.submit_hashed(id, data)?;
        chunks.push(ChunkRef(id, data.len() as u32));
        Ok(())
    })?;
    Ok((size, hash, chunks))
}

/// A chunk whose id is not known yet: (the writer's sequence number, plaintext length).
type DeferredChunk = (u64, u32);

/// As [`ingest_stream`], but chunk hashing happens on the writer's workers: the chunks come back
/// as (sequence number, length), resolved by [`ChunkWriter::finish_with_ids`].
fn ingest_stream_deferred(
    store: &Store,
    writer: &mut ChunkWriter,
    src: impl Read,
    progress: &dyn Progress,
    src_name: &Path,
) -> Result<(u64, FileHash, Vec<DeferredChunk>)> {
    let mut chunks = Vec::new();
    let (size, hash) = stream_chunks(store, src, progress, src_name, &mut |data| {
        let seq = writer.submit_deferred(data)?;
        chunks.push((seq, data.len() as u32));
        Ok(())
    })?;
    Ok((size, hash, chunks))
}

/// Reads `src` to the end, hashing it whole and handing each content-defined chunk to `emit`.
fn stream_chunks(
    store: &Store,
    mut src: impl Read,
    progress: &dyn Progress,
    src_name: &Path,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<(u64, FileHash)> {
    // One read buffer per thread, reused across files: most files in a run are small.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut chunker = Chunker::new(store.config().chunker)?;
    let mut file_hash = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
    if buf.len() < 1 << 20 {
        buf = vec![0u8; 1 << 20];
    }
    let mut emit = |data: &[u8]| emit(data);
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", src_name, e)),
        };
        file_hash.update(&buf[..n]);
        size += n as u64;
        chunker.push(&buf[..n], &mut emit)?;
        progress.inc(n as u64);
    }
    chunker.finish(&mut emit)?;
    BUF.with(|b| *b.borrow_mut() = buf);
    Ok((size, file_hash.finalize().into()))
}

impl Store {
    /// Ingests the directory `src` as run `run` and seals it.
    pub fn ingest_dir(
        &self,
        src: &Path,
        run: &RunRef,
        metadata: BTreeMap<String, String>,
        progress: &dyn Progress,
    ) -> Result<IngestReport> {
        if let Some(existing) = self.index().run(run)? {
            return Err(Error::AlreadyExists(format!(
                "run {run} ({})",
                existing.state
            )));
        }
        let mut walked = walk(src)?;
        walked.sort_by(|a, b| {
            (a.path != ROOT, a.path.as_bytes()).cmp(&(b.path != ROOT, b.path.as_bytes()))
        });
        let total: u64 = walked
            .iter()
            .filter(|w| w.meta.is_file())
            .map(|w| w.meta.len())
            .sum();
        progress.set_total(total);

        let seal = self.seal_guard();
        let mut writer = self.writer(&seal);
        let mut entries = Vec::with_capacity(walked.len());
        let mut first_name: HashMap<(u64, u64), String> = HashMap::new();
        // Files' chunks as (sequence number, length), by entry index, until the ids are known.
        let mut deferred: Vec<(usize, Vec<DeferredChunk>)> = Vec::new();
        for w in &walked {
            let ft = w.meta.file_type();
            let entry = if ft.is_dir() {
                base_entry(w, Kind::Dir)?
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&w.fs_path).map_err(|e| Error::io("read link", &w.fs_path, e))?;
                let target = target.into_os_string().into_string().map_err(|t| {
                    Error::invalid(
                        "symlink target",
                        format!("{}: {:?} is not UTF-8", w.fs_path.display(), t),
                    )
                })?;
                let mut e = base_entry(w, Kind::Symlink)?;
                e.size = target.len() as u64;
                e.target = Some(target);
                e
            } else if ft.is_file() {
                let key = (w.meta.dev(), w.meta.ino());
                if w.meta.nlink() > 1
                    && let Some(first) = first_name.get(&key)
                {
                    let mut e = base_entry(w, Kind::Hardlink)?;
                    e.target = Some(first.clone());
                    e.xattrs.clear();
                    entries.push(e);
                    continue;
                }
                if w.meta.nlink() > 1 {
                    first_name.insert(key, w.path.clone());
                }
                let mut e = base_entry(w, Kind::File)?;
                let f = File::open(&w.fs_path).map_err(|e| Error::io("open", &w.fs_path, e))?;
                let (size, hash, chunks) =
                    ingest_stream_deferred(self, &mut writer, f, progress, &w.fs_path)?;
                e.size = size;
                e.blake3 = Some(hash);
                deferred.push((entries.len(), chunks));
                e
            } else if ft.is_fifo() {
                base_entry(w, Kind::Fifo)?
            } else if ft.is_socket() {
                base_entry(w, Kind::Socket)?
            } else if ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_char_device() {
                    Kind::Char
                } else {
                    Kind::Block
                };
                let mut e = base_entry(w, kind)?;
                e.rdev = Some(w.meta.rdev());
                e
            } else {
                return Err(Error::invalid(
                    "source",
                    format!("{}: unknown file type", w.fs_path.display()),
                ));
            };
            entries.push(entry);
        }
        let (stats, ids) = writer.finish_with_ids()?;
        for (i, chunks) in deferred {
            entries[i].chunks = chunks
                .into_iter()
                .map(|(seq, len)| ChunkRef(ids[seq as usize], len))
                .collect();
        }

        let mut metadata = metadata;
        if let Some(root) = entries.first() {
            for (k, v) in producer_metadata(&root.xattrs) {
                metadata.entry(k).or_insert(v);
            }
        }
        let mut m = Manifest {
            format: MANIFEST_FORMAT,
            namespace: run.namespace.clone(),
            run: run.run.clone(),
            sealed_at: rfc3339(self.clock.now()),
            metadata,
            entries,
        };
        let (digest, manifest_bytes) = self.commit_manifest(&mut m)?;
        let raw_bytes = m.raw_bytes();
        let new_stored = stats.pack_bytes + manifest_bytes;
        Ok(report(run, &digest, &m, raw_bytes, stats, new_stored))
    }
}

/// Producer metadata carried by a run directory's `user.*` xattrs (text values only), keyed
/// without the `user.` prefix: `user.statehub.run_id` becomes `statehub.run_id`. The mount's
/// seal uses the same rule, so both frontends give the same manifest for the same tree.
pub fn producer_metadata(
    xattrs: &BTreeMap<String, XattrValue>,
) -> impl Iterator<Item = (String, String)> + '_ {
    xattrs
        .iter()
        .filter_map(|(k, v)| match (k.strip_prefix("user."), v) {
            (Some(key), XattrValue::Text(text)) if !key.starts_with("artifactfs.") => {
                Some((key.to_owned(), text.clone()))
            }
            _ => None,
        })
}

fn report(
    run: &RunRef,
    digest: &ManifestDigest,
    m: &Manifest,
    raw_bytes: u64,
    stats: crate::writer::WriteStats,
    new_stored: u64,
) -> IngestReport {
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            f64::INFINITY
        } else {
            a as f64 / b as f64
        }
    };
    IngestReport {
        run: run.to_string(),
        manifest: digest.to_hex(),
        files: m.entries.iter().filter(|e| e.kind != Kind::Dir).count() as u64,
        raw_bytes,
        new_raw_bytes: stats.new_raw_bytes,
        new_stored_bytes: new_stored,
        chunks: stats.chunks,
        new_chunks: stats.new_chunks,
        dedup_ratio: ratio(raw_bytes, stats.new_raw_bytes),
        reduction: ratio(raw_bytes, new_stored),
    }
}
