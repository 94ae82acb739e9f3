//! Ingest of a directory tree as one sealed run.
//!
//! The tree is walked first (metadata only, sorted by path), then each regular file is streamed
//! through the chunker into the write pipeline: no file is ever held whole in memory. This
//! thread only reads and cuts: each file is read into the writer's shared blocks of
//! [`FILE_PIECE`] new bytes (plus the uncut tail of the block before), chunks go to the writer's
//! workers as ranges of their block, and so does each block's piece of the file for the
//! whole-file BLAKE3, joined from the pieces' subtree hashes when the writer finishes. Special
//! files (FIFOs, devices, sockets) are recorded and never opened; a second name of an inode with
//! several links is recorded as a hard link to the first name in path order. The run becomes
//! visible only when its manifest is committed, after every chunk it names is durable; a failure
//! or a crash before that leaves no run behind (only unreferenced chunks, which gc reclaims).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chunker::Chunker;
use crate::clock::rfc3339;
use crate::error::{Error, Result};
use crate::id::{ChunkId, FileHash, ManifestDigest};
use crate::manifest::{ChunkRef, Entry, Kind, MANIFEST_FORMAT, Manifest, ROOT, XattrValue};
use crate::names::{RunRef, validate_component};
use crate::store::{NoProgress, Progress, Store};
use crate::writer::{Block, ChunkWriter, FILE_PIECE, Finished, file_hash_from_pieces};

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
    /// Where to open it: its path, or for an entry deeper than one path can name, a path
    /// through a descriptor of its directory (see [`walk`]).
    fs_path: PathBuf,
    /// Its path under the source when `fs_path` is not that, for messages.
    deep: Option<PathBuf>,
    meta: fs::Metadata,
}

impl Walked {
    /// The path to show a user.
    fn shown(&self) -> &Path {
        self.deep.as_deref().unwrap_or(&self.fs_path)
    }
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

/// The tree under `root`, without the directory `store` (the store's own root, when the
/// source holds it: a store does not ingest itself).
///
/// A tree may be deeper than one path can name (`PATH_MAX`). A directory whose path reaches
/// [`crate::export::LONG_PATH`] bytes is opened (its path is still short enough then: its
/// parent's was not) and its entries are named through that descriptor, as
/// `/proc/self/fd/N/NAME`; the descriptors are returned with the tree and must be kept open
/// while its files are read.
fn walk(root: &Path, store: Option<(u64, u64)>) -> Result<(Vec<Walked>, Vec<OwnedFd>)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::NotFound(format!("source directory {}", root.display()))
        }
        _ => Error::io("stat", root, e),
    })?;
    if !meta.is_dir() {
        return Err(Error::invalid(
            "source",
            format!("{} is not a directory", root.display()),
        ));
    }
    if store == Some((meta.dev(), meta.ino())) {
        return Err(Error::invalid(
            "source",
            format!("{} is the store itself", root.display()),
        ));
    }
    let mut out = vec![Walked {
        path: ROOT.into(),
        fs_path: root.to_path_buf(),
        deep: None,
        meta,
    }];
    let mut anchors: Vec<OwnedFd> = Vec::new();
    // Where to list a directory from: its path, or if the paths of its entries would be too
    // long, a handle of it (its own path is still short enough: its parent's was not long),
    // kept in `anchors`. True in the second case.
    let mut listed_from = |dir: &Path| -> Result<(PathBuf, bool)> {
        if dir.as_os_str().len() < crate::export::LONG_PATH {
            return Ok((dir.to_path_buf(), false));
        }
        let fd = crate::export::open_dir_handle(None, dir)
            .map_err(|e| Error::io("open directory", dir, std::io::Error::from(e)))?;
        let short = crate::export::handle_path(&fd);
        anchors.push(fd);
        Ok((short, true))
    };
    let (start, deep) = listed_from(root)?;
    let mut stack: Vec<(PathBuf, String, bool)> = vec![(start, String::new(), deep)];
    // `in_deep`: the directory is named through a handle (its path, or an ancestor's).
    while let Some((dir, rel, in_deep)) = stack.pop() {
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
                if store == Some((meta.dev(), meta.ino())) {
                    tracing::warn!(path = %fs_path.display(), "the store is inside the source tree: left out");
                    continue;
                }
                let (dir_path, anchored) = listed_from(&fs_path)?;
                stack.push((dir_path, path.clone(), in_deep || anchored));
            }
            let deep = in_deep.then(|| root.join(&path));
            out.push(Walked {
                path,
                fs_path,
                deep,
                meta,
            });
        }
    }
    Ok((out, anchors))
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
        // `user.artifactfs.*` are facts a mount shows (a sealed file's digest, a run's state),
        // derived and never stored: a tree copied out of a mount with its xattrs ingests to
        // the same manifest as the original.
        if name.as_encoded_bytes().starts_with(b"user.artifactfs.") {
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
                w.shown().display(),
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

/// As [`ingest_stream`], but with the hashing on the writer's workers: `src` is read into the
/// writer's blocks and only cut on this thread ([`ingest_file_in_blocks`]), and the chunk ids
/// and the whole-file BLAKE3 are computed in parallel with the cutting. Finishes `writer`: on
/// return every chunk is durable and indexed. The chunks and hashes are those of
/// [`ingest_stream`] for the same bytes.
pub fn ingest_stream_in_blocks(
    store: &Store,
    writer: ChunkWriter,
    mut src: impl FillBlock,
    src_name: &Path,
) -> Result<(u64, FileHash, Vec<ChunkRef>)> {
    let chunker = Chunker::new(store.config().chunker)?;
    let file = ingest_file_in_blocks(&chunker, &writer, 0, &mut src, &NoProgress, src_name)?;
    let done = writer.finish_with_ids()?;
    let (hash, chunks) = file.resolve(&done);
    Ok((file.size, hash, chunks))
}

/// A chunk whose id is not known yet: (the writer's sequence number, plaintext length).
type DeferredChunk = (u64, u32);

/// Where a file's whole-file BLAKE3 comes from once the writer has finished.
enum FileHashFrom {
    /// Known already (the empty file).
    Known(FileHash),
    /// The file is one chunk: the hash is that chunk's id, by sequence number.
    Chunk(u64),
    /// The file is one piece, hashed whole on a worker: its sequence number.
    Whole(u64),
    /// The chaining values of the file's pieces, by sequence number, in file order.
    Pieces(Vec<u64>),
}

impl FileHashFrom {
    fn resolve(&self, done: &Finished) -> FileHash {
        match self {
            FileHashFrom::Known(h) => *h,
            FileHashFrom::Chunk(seq) => FileHash(done.ids[*seq as usize].0),
            FileHashFrom::Whole(seq) => FileHash(done.pieces[*seq as usize]),
            FileHashFrom::Pieces(seqs) => {
                let cvs: Vec<[u8; 32]> = seqs.iter().map(|s| done.pieces[*s as usize]).collect();
                file_hash_from_pieces(&cvs).into()
            }
        }
    }
}

/// A file read in blocks, waiting for the writer's ids and hashes.
struct InBlocks {
    size: u64,
    chunks: Vec<DeferredChunk>,
    hash: FileHashFrom,
}

impl InBlocks {
    /// The file's hash and chunk list, once the writer has finished.
    fn resolve(&self, done: &Finished) -> (FileHash, Vec<ChunkRef>) {
        let chunks = self
            .chunks
            .iter()
            .map(|&(seq, len)| ChunkRef(done.ids[seq as usize], len))
            .collect();
        (self.hash.resolve(done), chunks)
    }
}

/// The bytes of a file being ingested in blocks, appended to a block as they are asked for.
pub trait FillBlock {
    /// Appends up to `want` bytes to `buf`, into its spare capacity; fewer only at the end.
    fn fill(&mut self, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()>;
}

impl FillBlock for File {
    fn fill(&mut self, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
        // A file reads straight into the spare capacity: `read_to_end` zeroes it first only
        // for readers without their own `read_buf`.
        let start = buf.len();
        loop {
            match self
                .take((start + want - buf.len()) as u64)
                .read_to_end(buf)
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends up to `want` bytes of `src` to `buf`; fewer only at the end of the file.
fn read_full(
    src: &mut impl FillBlock,
    buf: &mut Vec<u8>,
    want: usize,
    src_name: &Path,
) -> Result<usize> {
    let start = buf.len();
    src.fill(buf, want)
        .map_err(|e| Error::io("read", src_name, e))?;
    Ok(buf.len() - start)
}

/// A file read for a run must be the one listed, unchanged until its last byte was read:
/// else the run would record bytes of two versions (a file rewritten in place) under the
/// listed mtime. Busy, as a spool run still being written is: try again once it is quiet.
fn unchanged_while_read(f: &File, w: &Walked) -> Result<()> {
    fn identity(m: &fs::Metadata) -> [i64; 7] {
        let (dev, ino, len) = (m.dev() as i64, m.ino() as i64, m.len() as i64);
        [
            dev,
            ino,
            len,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ]
    }
    let now = f.metadata().map_err(|e| Error::io("stat", w.shown(), e))?;
    if identity(&w.meta) == identity(&now) {
        return Ok(());
    }
    Err(Error::Busy(format!(
        "{} changed while it was read; nothing was sealed, ingest it again once it is complete",
        w.shown().display()
    )))
}

/// As [`ingest_stream`], but for directory ingest: `src` is read into the writer's blocks and
/// cut there, and everything else (chunk ids, dedup, compression, the whole-file hash) happens
/// on the writer's workers; the ids and the hash are resolved after
/// [`ChunkWriter::finish_with_ids`].
///
/// Each block holds the uncut tail of the block before (less than a maximum chunk: a cut needs
/// `max_size` bytes ahead of it, or the end of the file) and then exactly [`FILE_PIECE`] new
/// bytes, fewer only at the end. So the new bytes of block `k` are the file's bytes from
/// `k * FILE_PIECE`, a complete subtree of its BLAKE3 tree, hashed by a worker. Whether a piece
/// is the file's only one (then it is hashed as the root) is known only when the next read
/// returns, so each piece is queued one block late.
fn ingest_file_in_blocks(
    chunker: &Chunker,
    writer: &ChunkWriter,
    lane: usize,
    src: &mut impl FillBlock,
    progress: &dyn Progress,
    src_name: &Path,
) -> Result<InBlocks> {
    let max = chunker.params().max_size as usize;
    let mut chunks = Vec::new();
    let mut pieces = Vec::new();
    let mut last_piece: Option<(Arc<Block>, Range<usize>)> = None;
    // The last block and where its uncut tail starts.
    let mut carry: Option<(Arc<Block>, usize)> = None;
    let mut size = 0u64;
    loop {
        let mut buf = writer.block_buffer(max + FILE_PIECE)?;
        if let Some((block, at)) = carry.take() {
            buf.extend_from_slice(&block[at..]);
        }
        let start = buf.len();
        let n = read_full(src, &mut buf, FILE_PIECE, src_name)?;
        let eof = n < FILE_PIECE;
        if n > 0
            && let Some((block, range)) = last_piece.take()
        {
            let offset = (pieces.len() * FILE_PIECE) as u64;
            pieces.push(writer.hash_piece(&block, range, offset, false)?);
        }
        size += n as u64;
        progress.inc(n as u64);
        if progress.cancelled() {
            return Err(Error::Cancelled(format!(
                "reading {} was stopped",
                src_name.display()
            )));
        }
        let block = writer.share(buf);
        if n > 0 {
            last_piece = Some((block.clone(), start..start + n));
        }
        // The block's chunks go to the workers in one message: a worker is woken once per
        // block, not once per chunk (which took two thirds of the context switches of an
        // ingest of mostly stored data).
        let mut pos = 0;
        let mut ranges = Vec::new();
        let from = chunks.len();
        while let Some(len) = chunker.next_cut(&block[pos..], eof) {
            ranges.push(pos..pos + len);
            chunks.push((0, len as u32));
            pos += len;
        }
        let first = writer.submit_many_in_block(lane, &block, ranges)?;
        for (seq, c) in (first..).zip(&mut chunks[from..]) {
            c.0 = seq;
        }
        if eof {
            break;
        }
        carry = Some((block, pos));
    }
    let hash = match last_piece {
        None => FileHashFrom::Known(FileHash::of(&[])),
        Some(_) if pieces.is_empty() && chunks.len() == 1 => FileHashFrom::Chunk(chunks[0].0),
        Some((block, range)) if pieces.is_empty() => {
            FileHashFrom::Whole(writer.hash_piece(&block, range, 0, true)?)
        }
        Some((block, range)) => {
            let offset = (pieces.len() * FILE_PIECE) as u64;
            pieces.push(writer.hash_piece(&block, range, offset, false)?);
            FileHashFrom::Pieces(pieces)
        }
    };
    Ok(InBlocks { size, chunks, hash })
}

/// Small files (at most a maximum chunk) read one after another into one shared block, cut
/// and handed to the writer's workers together when the block is full: one message and one
/// block from the writer's pool for hundreds of files, where each file in a block of its own
/// cost a hand-off to a worker and back.
#[derive(Default)]
struct SmallFiles {
    buf: Option<Vec<u8>>,
    /// The files in `buf`: their manifest entry's index and where their bytes are.
    files: Vec<(usize, Range<usize>)>,
}

impl SmallFiles {
    /// Reads `src` (expected to hold at most a maximum chunk) into the shared block as the
    /// content of entry `entry`; its size, or `None` if it turned out larger (it grew since
    /// it was listed), when nothing is kept and the caller reads it as a large file.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        chunker: &Chunker,
        writer: &ChunkWriter,
        lane: usize,
        deferred: &mut Vec<(usize, InBlocks)>,
        src: &mut File,
        entry: usize,
        src_name: &Path,
    ) -> Result<Option<u64>> {
        let max = chunker.params().max_size as usize;
        if self
            .buf
            .as_ref()
            .is_some_and(|b| b.capacity() - b.len() <= max)
        {
            self.flush(chunker, writer, lane, deferred)?;
        }
        let buf = match &mut self.buf {
            Some(b) => b,
            None => self.buf.insert(writer.block_buffer(max + FILE_PIECE)?),
        };
        let start = buf.len();
        let n = read_full(src, buf, max + 1, src_name)?;
        if n > max {
            buf.truncate(start);
            return Ok(None);
        }
        self.files.push((entry, start..start + n));
        Ok(Some(n as u64))
    }

    /// Cuts the files read so far and queues all their chunks at once; their chunk lists and
    /// hashes go to `deferred`.
    fn flush(
        &mut self,
        chunker: &Chunker,
        writer: &ChunkWriter,
        lane: usize,
        deferred: &mut Vec<(usize, InBlocks)>,
    ) -> Result<()> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        // Shared even when empty, so that the buffer goes back to the writer's pool.
        let block = writer.share(buf);
        let mut ranges = Vec::new();
        let mut cuts = Vec::with_capacity(self.files.len());
        for (_, r) in &self.files {
            let first = ranges.len();
            let mut pos = r.start;
            while let Some(len) = chunker.next_cut(&block[pos..r.end], true) {
                ranges.push(pos..pos + len);
                pos += len;
            }
            cuts.push(first..ranges.len());
        }
        let lens: Vec<u32> = ranges.iter().map(|r| r.len() as u32).collect();
        let first_seq = writer.submit_many_in_block(lane, &block, ranges)?;
        for ((entry, r), cut) in self.files.drain(..).zip(cuts) {
            let chunks: Vec<DeferredChunk> = cut.map(|i| (first_seq + i as u64, lens[i])).collect();
            let hash = match chunks.as_slice() {
                [] => FileHashFrom::Known(FileHash::of(&[])),
                [(seq, _)] => FileHashFrom::Chunk(*seq),
                // A few chunks, one piece: hashed whole on a worker.
                _ => FileHashFrom::Whole(writer.hash_piece(&block, r.clone(), 0, true)?),
            };
            let size = r.len() as u64;
            deferred.push((entry, InBlocks { size, chunks, hash }));
        }
        Ok(())
    }
}

/// Readers of one directory ingest at most: each reads and cuts whole files (FastCDC is
/// sequential within a file) and keeps a pack lane of its own.
const MAX_READERS: usize = 4;

/// How many readers an ingest of `total` bytes of files uses: one per core, at most
/// [`MAX_READERS`], and no more than the run has packs' worth of bytes, since each reader's
/// lane ends the ingest with a partial pack: a small run is read by one and leaves one pack.
fn auto_readers(total: u64, pack_target: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let packs = usize::try_from(total / pack_target.max(1)).unwrap_or(usize::MAX);
    cores.min(MAX_READERS).min(packs).max(1)
}

/// The regular files of a run in groups a reader takes at once, in path order: a file larger
/// than a maximum chunk alone, and consecutive smaller files together up to one read block, so
/// that they share a block (and a stretch of a pack) as one reader would have put them.
fn read_groups<'a>(files: &[(usize, &'a Walked)], small_max: u64) -> Vec<Vec<(usize, &'a Walked)>> {
    let mut groups: Vec<Vec<(usize, &Walked)>> = Vec::new();
    let mut small_bytes = 0u64;
    let mut in_small = false;
    for &(i, w) in files {
        let len = w.meta.len();
        if len > small_max {
            groups.push(vec![(i, w)]);
            in_small = false;
            continue;
        }
        if !in_small || small_bytes + len > FILE_PIECE as u64 {
            groups.push(Vec::new());
            small_bytes = 0;
            in_small = true;
        }
        small_bytes += len;
        groups
            .last_mut()
            .expect("a group was just started")
            .push((i, w));
    }
    groups
}

/// Reads and cuts the files of `groups` on `readers` threads (this one among them), each
/// taking the next group in path order and submitting on a pack lane of its own. Returns every
/// file's deferred chunks and hash by entry index; on a failure, the failure of the first group
/// (in path order) that failed: the readers stop taking groups once one has failed.
fn read_files(
    chunker: &Chunker,
    writer: &ChunkWriter,
    readers: usize,
    groups: &[Vec<(usize, &Walked)>],
    progress: &dyn Progress,
) -> Result<Vec<(usize, InBlocks)>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let read = |lane: usize| -> std::result::Result<Vec<(usize, InBlocks)>, (usize, Error)> {
        let mut deferred = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let g = next.fetch_add(1, Ordering::Relaxed);
            let Some(group) = groups.get(g) else { break };
            if let Err(e) = read_group(chunker, writer, lane, group, progress, &mut deferred) {
                stop.store(true, Ordering::Relaxed);
                return Err((g, e));
            }
        }
        Ok(deferred)
    };
    let results: Vec<_> = std::thread::scope(|s| {
        let others: Vec<_> = (1..readers.min(groups.len()).max(1))
            .map(|lane| {
                std::thread::Builder::new()
                    .name(format!("afs-read-{lane}"))
                    .spawn_scoped(s, move || read(lane))
            })
            .collect();
        let mut results = vec![read(0)];
        for h in others {
            results.push(match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err((
                        usize::MAX,
                        Error::Internal("an ingest reader panicked".into()),
                    ))
                }),
                Err(e) => Err((
                    usize::MAX,
                    Error::Internal(format!("spawn ingest reader: {e}")),
                )),
            });
        }
        results
    });
    let mut all = Vec::new();
    let mut first_failure: Option<(usize, Error)> = None;
    for r in results {
        match r {
            Ok(d) => all.extend(d),
            Err((g, e)) => {
                if first_failure.as_ref().is_none_or(|(f, _)| g < *f) {
                    first_failure = Some((g, e));
                }
            }
        }
    }
    match first_failure {
        Some((_, e)) => Err(e),
        None => Ok(all),
    }
}

/// Reads one group of files (see [`read_groups`]) on pack lane `lane`.
fn read_group(
    chunker: &Chunker,
    writer: &ChunkWriter,
    lane: usize,
    group: &[(usize, &Walked)],
    progress: &dyn Progress,
    deferred: &mut Vec<(usize, InBlocks)>,
) -> Result<()> {
    let small_max = u64::from(chunker.params().max_size);
    let mut small = SmallFiles::default();
    for &(i, w) in group {
        if progress.cancelled() {
            return Err(Error::Cancelled(format!(
                "reading {} was stopped",
                w.shown().display()
            )));
        }
        let mut f = File::open(&w.fs_path).map_err(|e| Error::io("open", w.shown(), e))?;
        let mut read_small = None;
        if w.meta.len() <= small_max {
            read_small = small.add(chunker, writer, lane, deferred, &mut f, i, w.shown())?;
            if read_small.is_none() {
                // Grown since it was listed: read again, from the start, as large.
                f.rewind().map_err(|e| Error::io("seek", w.shown(), e))?;
            }
        }
        if let Some(n) = read_small {
            progress.inc(n);
        } else {
            // The small files before it are queued first, so that chunks reach the packs in
            // path order.
            small.flush(chunker, writer, lane, deferred)?;
            let file = ingest_file_in_blocks(chunker, writer, lane, &mut f, progress, w.shown())?;
            deferred.push((i, file));
        }
        unchanged_while_read(&f, w)?;
    }
    small.flush(chunker, writer, lane, deferred)
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
        if progress.cancelled() {
            return Err(Error::Cancelled(format!(
                "reading {} was stopped",
                src_name.display()
            )));
        }
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
        self.ingest_dir_checked(src, run, metadata, progress, &mut |_| Ok(()))
    }

    /// [`Store::ingest_dir`] with a last word for the caller: `before_commit` runs once every
    /// chunk of the run is durable and the manifest is complete, just before it is committed.
    /// If it fails, nothing is committed (the chunks written are unreferenced, for gc) and its
    /// error is returned. The spool watcher uses it to refuse a tree that changed meanwhile.
    pub fn ingest_dir_checked(
        &self,
        src: &Path,
        run: &RunRef,
        metadata: BTreeMap<String, String>,
        progress: &dyn Progress,
        before_commit: &mut dyn FnMut(&Manifest) -> Result<()>,
    ) -> Result<IngestReport> {
        self.ingest_dir_with_readers(src, run, metadata, progress, before_commit, None)
    }

    /// [`Store::ingest_dir_checked`] with `readers` threads reading and cutting files, or as
    /// many as [`auto_readers`] gives.
    pub(crate) fn ingest_dir_with_readers(
        &self,
        src: &Path,
        run: &RunRef,
        metadata: BTreeMap<String, String>,
        progress: &dyn Progress,
        before_commit: &mut dyn FnMut(&Manifest) -> Result<()>,
        readers: Option<usize>,
    ) -> Result<IngestReport> {
        if let Some(existing) = self.index().run(run)? {
            return Err(Error::AlreadyExists(format!(
                "run {run} ({})",
                existing.state
            )));
        }
        let store_dir = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(self.root()).ok().map(|m| (m.dev(), m.ino()))
        };
        let started = std::time::Instant::now();
        // `_anchors` keeps the descriptors deep entries are named through open until the end.
        let (mut walked, _anchors) = walk(src, store_dir)?;
        walked.sort_by(|a, b| {
            (a.path != ROOT, a.path.as_bytes()).cmp(&(b.path != ROOT, b.path.as_bytes()))
        });
        let total: u64 = walked
            .iter()
            .filter(|w| w.meta.is_file())
            .map(|w| w.meta.len())
            .sum();
        progress.set_total(total);
        let walked_at = started.elapsed();

        let chunker = Chunker::new(self.config().chunker)?;
        let seal = self.seal_guard();
        let readers = readers
            .unwrap_or_else(|| auto_readers(total, self.config().pack_target_size))
            .max(1);
        let writer = self.writer_with_lanes(&seal, readers);
        let mut entries = Vec::with_capacity(walked.len());
        let mut first_name: HashMap<(u64, u64), String> = HashMap::new();
        // The regular files to read, by entry index, in path order.
        let mut to_read: Vec<(usize, &Walked)> = Vec::new();
        let cancelled =
            || Error::Cancelled(format!("ingest into {run} was stopped; nothing sealed"));
        for w in &walked {
            if progress.cancelled() {
                return Err(cancelled());
            }
            let ft = w.meta.file_type();
            // Every name of a multiply linked file after its first (in path order) is a link
            // to that first name, whatever the file's type: a symlink, FIFO or device node is
            // linked as a regular file is.
            if !ft.is_dir() && w.meta.nlink() > 1 {
                let key = (w.meta.dev(), w.meta.ino());
                if let Some(first) = first_name.get(&key) {
                    let mut e = base_entry(w, Kind::Hardlink)?;
                    e.target = Some(first.clone());
                    e.xattrs.clear();
                    entries.push(e);
                    continue;
                }
                first_name.insert(key, w.path.clone());
            }
            let entry = if ft.is_dir() {
                base_entry(w, Kind::Dir)?
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&w.fs_path).map_err(|e| Error::io("read link", w.shown(), e))?;
                let target = target.into_os_string().into_string().map_err(|t| {
                    Error::invalid(
                        "symlink target",
                        format!("{}: {:?} is not UTF-8", w.shown().display(), t),
                    )
                })?;
                let mut e = base_entry(w, Kind::Symlink)?;
                e.size = target.len() as u64;
                e.target = Some(target);
                e
            } else if ft.is_file() {
                // Its size, hash and chunks once it has been read, below.
                to_read.push((entries.len(), w));
                base_entry(w, Kind::File)?
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
                    format!("{}: unknown file type", w.shown().display()),
                ));
            };
            entries.push(entry);
        }
        let groups = read_groups(&to_read, u64::from(chunker.params().max_size));
        let deferred = read_files(&chunker, &writer, readers, &groups, progress)?;
        let read_at = started.elapsed();
        let done = writer.finish_with_ids()?;
        let stored_at = started.elapsed();
        for (i, file) in deferred {
            let (hash, chunks) = file.resolve(&done);
            entries[i].size = file.size;
            entries[i].blake3 = Some(hash);
            entries[i].chunks = chunks;
        }
        let stats = done.stats;
        if progress.cancelled() {
            return Err(cancelled());
        }

        let mut metadata = metadata;
        let mut lifecycle = Lifecycle::default();
        if let Some(root) = entries.first_mut() {
            lifecycle = Lifecycle::take(&mut root.xattrs, self.now_ns())?;
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
        before_commit(&m)?;
        let (digest, manifest_bytes) = self.commit_manifest(&mut m)?;
        tracing::debug!(
            run = %run,
            walked = ?walked_at,
            read = ?read_at,
            stored = ?stored_at,
            committed = ?started.elapsed(),
            "ingest phases (time since start at the end of each)"
        );
        if let Err(e) = lifecycle.apply(self, run) {
            // The values were valid, but the retention rules refused them (e.g. shorter than
            // the namespace default the run got): the seal stands, as a refused setxattr on a
            // run directory in the mount leaves the run.
            tracing::warn!(run = %run, "the run directory's user.retain or user.hold.* was not applied: {e}");
        }
        let raw_bytes = m.raw_bytes();
        let new_stored = stats.pack_bytes + manifest_bytes;
        Ok(report(run, &digest, &m, raw_bytes, stats, new_stored))
    }
}

/// A run directory's `user.retain` and `user.hold.*`: the run's retention and holds, as the
/// mount treats them on a run directory, not content of the manifest.
#[derive(Default)]
struct Lifecycle {
    retain: Option<String>,
    holds: Vec<(String, Vec<u8>)>,
}

impl Lifecycle {
    /// Takes them out of the root's xattrs, checking them before anything is committed.
    fn take(xattrs: &mut BTreeMap<String, XattrValue>, now_ns: i64) -> Result<Self> {
        let mut out = Lifecycle::default();
        if let Some(v) = xattrs.remove(crate::vfs::RETAIN_XATTR) {
            let text = String::from_utf8(v.to_bytes()?)
                .map_err(|_| Error::invalid("user.retain", "the value is not UTF-8 text"))?;
            crate::retention::Retention::parse(&text, now_ns)?;
            out.retain = Some(text);
        }
        let names: Vec<String> = xattrs
            .keys()
            .filter(|k| k.starts_with(crate::vfs::HOLD_PREFIX))
            .cloned()
            .collect();
        for k in names {
            let v = match xattrs.remove(&k) {
                Some(v) => v.to_bytes()?,
                None => Vec::new(),
            };
            let name = k[crate::vfs::HOLD_PREFIX.len()..].to_owned();
            crate::retention::validate_hold_name(&name)?;
            out.holds.push((name, v));
        }
        Ok(out)
    }

    /// Places the holds, then sets the retention: a retention the rules refuse never costs a
    /// hold (a held run is never deleted, whatever its retention).
    fn apply(&self, store: &Store, run: &RunRef) -> Result<()> {
        for (name, reason) in &self.holds {
            store.place_hold(run, name, reason)?;
        }
        if let Some(v) = &self.retain {
            store.set_retention(run, v, None)?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::chunker::ChunkerParams;
    use crate::store::{InitOptions, NoProgress};

    fn content(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 11) as u8
            })
            .collect()
    }

    /// `DIR/src` holding one file `a` of `len` bytes of `content(len, seed)`.
    fn one_file_src(dir: &Path, len: usize, seed: u32) -> PathBuf {
        let src = dir.join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a"), content(len, seed)).unwrap();
        src
    }

    impl Store {
        /// [`Store::ingest_dir_with_readers`] without metadata or a last word.
        fn ingest_with_readers(
            &self,
            src: &Path,
            run: &RunRef,
            progress: &dyn Progress,
            readers: usize,
        ) -> Result<IngestReport> {
            self.ingest_dir_with_readers(
                src,
                run,
                BTreeMap::new(),
                progress,
                &mut |_| Ok(()),
                Some(readers),
            )
        }
    }

    /// A clock that moves 700 ms on by every reading.
    struct Ticking(Mutex<std::time::SystemTime>);

    impl crate::clock::Clock for Ticking {
        fn now(&self) -> std::time::SystemTime {
            let mut t = self.0.lock().unwrap();
            *t += std::time::Duration::from_millis(700);
            *t
        }
    }

    /// The index records a seal at its manifest's `sealed_at`, not at a later reading of the
    /// clock: an index rebuilt from the manifests then lists the same times.
    #[test]
    fn the_index_records_the_seal_at_the_manifests_time() {
        let dir = tempfile::tempdir().unwrap();
        let src = one_file_src(dir.path(), 10_000, 3);
        let root = dir.path().join("store");
        Store::init(&root, &InitOptions::default()).unwrap();
        let start = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_300);
        let store = Store::open_with_clock(&root, Arc::new(Ticking(Mutex::new(start)))).unwrap();
        for i in 0..4 {
            let run = RunRef::parse(&format!("t/r{i}")).unwrap();
            store
                .ingest_dir(&src, &run, BTreeMap::new(), &NoProgress)
                .unwrap();
            let (_, m) = store.manifest(&run).unwrap();
            assert_eq!(
                store.run(&run).unwrap().sealed_at_ns,
                m.sealed_at_ns(),
                "{}",
                m.sealed_at
            );
        }
    }

    /// A `before_commit` refusal commits nothing: the run does not exist afterwards and the
    /// same name can be ingested; the hook saw the complete manifest.
    #[test]
    fn a_refused_commit_leaves_no_run() {
        let dir = tempfile::tempdir().unwrap();
        let src = one_file_src(dir.path(), 100_000, 7);
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let run = RunRef::parse("t/refused").unwrap();
        let mut seen = Vec::new();
        let err = store
            .ingest_dir_checked(&src, &run, BTreeMap::new(), &NoProgress, &mut |m| {
                seen = m.entries.iter().map(|e| e.path.clone()).collect();
                Err(Error::Busy("changed".into()))
            })
            .unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err:?}");
        assert_eq!(seen, [ROOT, "a"]);
        assert!(matches!(store.run(&run), Err(Error::NotFound(_))));
        store
            .ingest_dir(&src, &run, BTreeMap::new(), &NoProgress)
            .unwrap();
        assert_eq!(store.run(&run).unwrap().state, "sealed");
    }

    /// Ingests `src` as `run` and checks each of `files` (name, content) in its manifest: size,
    /// hash, the one-shot chunking of the store's chunker, and its bytes read back.
    fn ingest_and_check(
        store: &Store,
        src: &Path,
        run: &str,
        files: &[(String, Vec<u8>)],
    ) -> (IngestReport, Manifest) {
        let run = RunRef::parse(run).unwrap();
        let report = store
            .ingest_dir(src, &run, BTreeMap::new(), &NoProgress)
            .unwrap();
        let (_, m) = store.manifest(&run).unwrap();
        let params = store.config().chunker;
        for (name, data) in files {
            let e = m.entries.iter().find(|e| &e.path == name).unwrap();
            assert_eq!(e.size, data.len() as u64, "{name}");
            assert_eq!(e.blake3, Some(FileHash::of(data)), "{name}");
            let lens: Vec<usize> = e.chunks.iter().map(|c| c.1 as usize).collect();
            assert_eq!(
                lens,
                Chunker::chunk_lengths(params, data).unwrap(),
                "{name}"
            );
            let mut back = Vec::new();
            store.read_file_to(e, &mut back).unwrap();
            assert!(back == *data, "{name} reads back");
        }
        (report, m)
    }

    /// Files read in blocks get the one-shot BLAKE3 of their bytes as the whole-file hash and
    /// chunks that concatenate to them: empty, one chunk, one piece of several chunks, and
    /// lengths at and around multiples of the piece size (hashed in pieces, the last piece
    /// queued after a read that returns nothing). Identical files share their chunks.
    #[test]
    fn files_in_blocks_hash_and_chunk_like_the_one_shot() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let small = ChunkerParams {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        };
        let sizes = [
            0,
            1,
            1000,
            3 * small.max_size as usize,
            FILE_PIECE - 1,
            FILE_PIECE,
            FILE_PIECE + 1,
            2 * FILE_PIECE,
            3 * FILE_PIECE + 12_345,
        ];
        let mut files = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let data = content(*n, i as u32 + 1);
            fs::write(src.join(format!("f{i:02}")), &data).unwrap();
            files.push((format!("f{i:02}"), data));
        }
        // A copy of the largest: every chunk a duplicate within the run.
        fs::write(src.join("g-copy"), &files.last().unwrap().1).unwrap();
        files.push(("g-copy".into(), files.last().unwrap().1.clone()));

        let opts = InitOptions {
            chunker: small,
            ..InitOptions::default()
        };
        let store = Store::init(&dir.path().join("store"), &opts).unwrap();
        let (report, m) = ingest_and_check(&store, &src, "t/blocks", &files);
        let copy = &m
            .entries
            .iter()
            .find(|e| e.path == "g-copy")
            .unwrap()
            .chunks;
        assert!(
            report.chunks - report.new_chunks >= copy.len() as u64,
            "the copy's chunks are all duplicates"
        );
    }

    /// Small files share blocks (several blocks' worth here, so some are queued when full and
    /// the rest at the end, around large files): each has the one-shot chunks and hash, reads
    /// back, and the chunks of identical small files are stored once.
    #[test]
    fn small_files_in_shared_blocks_chunk_like_the_one_shot() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let max = store.config().chunker.max_size as usize;
        let mut sizes = vec![0, 1, 4096, 40_000, 100_000, max - 1, max, max + 1, 0];
        sizes.extend((0..40).map(|i| 150_000 + i * 997));
        sizes.push(3 * FILE_PIECE);
        sizes.extend((0..30).map(|i| 2_000 + i * 31));
        let mut files = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let data = content(*n, i as u32 + 100);
            fs::write(src.join(format!("f{i:03}")), &data).unwrap();
            files.push((format!("f{i:03}"), data));
        }
        let dup = files[5].1.clone();
        fs::write(src.join("g-dup"), &dup).unwrap();
        files.push(("g-dup".into(), dup));

        let (report, m) = ingest_and_check(&store, &src, "t/small", &files);
        let dup_chunks = m.entries.iter().find(|e| e.path == "g-dup").unwrap();
        assert!(report.chunks - report.new_chunks >= dup_chunks.chunks.len() as u64);
        assert!(store.verify(None, &NoProgress).unwrap().ok());
    }

    /// The manifest is stored while the index writes the run, but a manifest that cannot be
    /// stored leaves no run behind: the index commits only after the manifest is durable.
    #[test]
    fn a_manifest_that_cannot_be_stored_seals_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(&root, &InitOptions::default()).unwrap();
        let src = one_file_src(dir.path(), 100_000, 3);
        let run = RunRef::parse("ns/r").unwrap();
        // A file where the manifests' directory would be: every manifest put fails.
        let manifests = root.join("objects/manifests");
        let _ = fs::remove_dir_all(&manifests);
        fs::write(&manifests, b"").unwrap();
        let err = store
            .ingest_dir(&src, &run, BTreeMap::new(), &NoProgress)
            .unwrap_err();
        assert!(!matches!(err, Error::AlreadyExists(_)), "{err}");
        assert!(store.runs(None).unwrap().is_empty(), "no run after {err}");
        assert!(store.index().run(&run).unwrap().is_none());

        fs::remove_file(&manifests).unwrap();
        store
            .ingest_dir(&src, &run, BTreeMap::new(), &NoProgress)
            .unwrap();
        assert_eq!(store.runs(None).unwrap().len(), 1);
        let (_, m) = store.manifest(&run).unwrap();
        assert_eq!(m.entries.len(), 2);
    }

    /// A run smaller than a pack is read by one reader and leaves one pack, not a partial
    /// pack per core; a large one gets a reader per core, up to the limit.
    #[test]
    fn a_run_smaller_than_a_pack_leaves_one_pack() {
        let target = InitOptions::default().pack_target_size;
        assert_eq!(auto_readers(0, target), 1);
        assert_eq!(auto_readers(target - 1, target), 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(auto_readers(100 * target, target), cores.min(MAX_READERS));

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        // 6 MB in 300 files: three read blocks' worth, which readers would share out.
        for i in 0..300u32 {
            fs::write(src.join(format!("f{i:03}")), content(20_000, i)).unwrap();
        }
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let run = RunRef::parse("ns/r").unwrap();
        store
            .ingest_dir(&src, &run, BTreeMap::new(), &NoProgress)
            .unwrap();
        assert_eq!(store.stats().unwrap().packs, 1);
    }

    /// A source tree deeper than one path can name (`PATH_MAX`) ingests, and exports back
    /// whole: a file with its xattr and a symlink 4.8 KB down.
    #[test]
    fn a_tree_deeper_than_path_max_ingests_and_exports() {
        use nix::fcntl::{OFlag, open, openat};
        use nix::sys::stat::Mode;
        use std::os::fd::AsRawFd;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        // The directory `names` lead to under `top`, as a descriptor.
        let descend = |top: &Path, names: &[String]| {
            let mut fd = open(top, flags, Mode::empty()).unwrap();
            for n in names {
                fd = openat(&fd, n.as_str(), flags, Mode::empty()).unwrap();
            }
            fd
        };
        let via = |fd: &OwnedFd, name: &str| format!("/proc/self/fd/{}/{name}", fd.as_raw_fd());

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        let names: Vec<String> = (0..24)
            .map(|i| format!("{i:02}{}", "d".repeat(198)))
            .collect();
        for i in 0..names.len() {
            let parent = descend(&src, &names[..i]);
            fs::create_dir(via(&parent, &names[i])).unwrap();
        }
        let bottom = descend(&src, &names);
        let content = content(300_000, 77);
        fs::write(via(&bottom, "file"), &content).unwrap();
        xattr::set(via(&bottom, "file"), "user.note", b"deep").unwrap();
        std::os::unix::fs::symlink("file", via(&bottom, "link")).unwrap();
        drop(bottom);
        let deep = names.join("/");
        assert!(src.join(&deep).as_os_str().len() > 4096);

        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let run = RunRef::parse("ns/deep").unwrap();
        store
            .ingest_dir(&src, &run, BTreeMap::new(), &NoProgress)
            .unwrap();
        let (_, m) = store.manifest(&run).unwrap();
        let file = m
            .entries
            .iter()
            .find(|e| e.path == format!("{deep}/file"))
            .unwrap();
        assert_eq!(file.blake3, Some(FileHash::of(&content)));
        assert_eq!(
            file.xattrs.get("user.note"),
            Some(&XattrValue::Text("deep".into()))
        );
        let link = m
            .entries
            .iter()
            .find(|e| e.path == format!("{deep}/link"))
            .unwrap();
        assert_eq!(link.target.as_deref(), Some("file"));

        let out = dir.path().join("out");
        store.export(&run, &out, &NoProgress).unwrap();
        let bottom = descend(&out, &names);
        assert_eq!(fs::read(via(&bottom, "file")).unwrap(), content);
        assert_eq!(
            xattr::get(via(&bottom, "file"), "user.note")
                .unwrap()
                .as_deref(),
            Some(&b"deep"[..])
        );
        assert_eq!(
            fs::read_link(via(&bottom, "link")).unwrap(),
            Path::new("file")
        );
    }

    /// A failure on one reader stops the others and seals nothing: the ingest's client goes
    /// away (the progress says cancelled) while three readers are cutting a tree; the same
    /// tree then ingests under the same name, with every chunk the readers stored reused.
    #[test]
    fn a_failure_on_one_reader_stops_them_all_and_seals_nothing() {
        use std::sync::atomic::{AtomicU64, Ordering};
        struct GoneAfter(u64, AtomicU64);
        impl Progress for GoneAfter {
            fn inc(&self, bytes: u64) {
                self.1.fetch_add(bytes, Ordering::Relaxed);
            }
            fn cancelled(&self) -> bool {
                self.1.load(Ordering::Relaxed) >= self.0
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        for i in 0..6u32 {
            fs::write(src.join(format!("big-{i}")), content(3 * FILE_PIECE, i)).unwrap();
        }
        for i in 0..200u32 {
            fs::write(src.join(format!("small-{i:03}")), content(9_000, 100 + i)).unwrap();
        }
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let run = RunRef::parse("ns/r").unwrap();
        let gone = GoneAfter(5 * FILE_PIECE as u64, AtomicU64::new(0));
        let err = store.ingest_with_readers(&src, &run, &gone, 3).unwrap_err();
        assert!(matches!(err, Error::Cancelled(_)), "{err}");
        let read = gone.1.load(Ordering::Relaxed);
        assert!(
            read < 12 * FILE_PIECE as u64,
            "the readers stopped: {read} bytes read"
        );
        assert!(store.runs(None).unwrap().is_empty());

        let report = store
            .ingest_with_readers(&src, &run, &NoProgress, 3)
            .unwrap();
        assert!(report.new_chunks < report.chunks, "{report:?}");
        assert!(store.verify(None, &NoProgress).unwrap().damage.is_empty());
        let (_, m) = store.manifest(&run).unwrap();
        assert_eq!(m.entries.len(), 207);
    }

    /// However many readers cut a tree's files, the run's manifest is the same: files of every
    /// size, in groups of small ones and alone, empty, linked and duplicated.
    #[test]
    fn the_manifest_does_not_depend_on_the_number_of_readers() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for d in ["a", "a/deep", "b", "c"] {
            fs::create_dir_all(src.join(d)).unwrap();
        }
        let max = ChunkerParams::default().max_size as usize;
        let sizes = [
            0,
            1,
            max - 1,
            max,
            max + 1,
            3 * FILE_PIECE + 5,
            2 * FILE_PIECE,
        ];
        for (i, len) in sizes.iter().enumerate() {
            fs::write(src.join(format!("a/big-{i}")), content(*len, i as u32)).unwrap();
        }
        for i in 0..400u32 {
            let dir = ["a/deep", "b", "c"][i as usize % 3];
            fs::write(
                src.join(format!("{dir}/s-{i:03}")),
                content(100 + 97 * i as usize, i),
            )
            .unwrap();
        }
        fs::write(src.join("c/copy-of-big-5"), content(sizes[5], 5)).unwrap();
        fs::hard_link(src.join("a/big-4"), src.join("c/link")).unwrap();
        std::os::unix::fs::symlink("../a/big-4", src.join("b/sym")).unwrap();

        let manifest_with = |readers: usize| {
            let root = dir.path().join(format!("store-{readers}"));
            let store = Store::init(&root, &InitOptions::default()).unwrap();
            let run = RunRef::parse("ns/run").unwrap();
            let report = store
                .ingest_with_readers(&src, &run, &NoProgress, readers)
                .unwrap();
            assert!(store.verify(None, &NoProgress).unwrap().damage.is_empty());
            let (_, m) = store.manifest(&run).unwrap();
            (m.entries, report.new_chunks)
        };
        let (one, chunks_one) = manifest_with(1);
        for readers in [2, 3, 8] {
            let (many, chunks_many) = manifest_with(readers);
            assert_eq!(many, one, "{readers} readers");
            assert_eq!(
                chunks_many, chunks_one,
                "{readers} readers store each chunk once"
            );
        }
        let big5 = one.iter().find(|e| e.path == "a/big-5").unwrap();
        assert_eq!(big5.blake3, Some(FileHash::of(&content(sizes[5], 5))));
    }

    /// A file listed as small that has grown past a maximum chunk by the time it is read
    /// leaves nothing in the shared block: it is read again as a large file.
    #[test]
    fn a_small_file_that_grew_leaves_the_shared_block_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let chunker = Chunker::new(store.config().chunker).unwrap();
        let max = chunker.params().max_size as usize;
        let (grown, small) = (dir.path().join("grown"), dir.path().join("small"));
        fs::write(&grown, content(max + 1, 7)).unwrap();
        fs::write(&small, b"abc").unwrap();

        let seal = store.seal_guard();
        let writer = store.writer(&seal);
        let mut batch = SmallFiles::default();
        let mut deferred = Vec::new();
        let mut add = |batch: &mut SmallFiles, writer: &ChunkWriter, p: &Path, i| {
            let mut f = File::open(p).unwrap();
            batch
                .add(&chunker, writer, 0, &mut deferred, &mut f, i, p)
                .unwrap()
        };
        assert_eq!(add(&mut batch, &writer, &small, 0), Some(3));
        assert_eq!(add(&mut batch, &writer, &grown, 1), None);
        assert_eq!(add(&mut batch, &writer, &small, 2), Some(3));
        assert_eq!(batch.files, vec![(0, 0..3), (2, 3..6)]);
        assert_eq!(batch.buf.as_deref(), Some(&b"abcabc"[..]));
        batch.flush(&chunker, &writer, 0, &mut deferred).unwrap();
        let done = writer.finish_with_ids().unwrap();
        assert_eq!(deferred.len(), 2);
        for (_, f) in &deferred {
            assert_eq!(f.hash.resolve(&done), FileHash::of(b"abc"));
        }
    }
}
