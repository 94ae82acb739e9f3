//! Chunking closed files of open runs ahead of their seal (ADR 0015).
//!
//! When the last handle of a written file of an open run closes, the file is queued; a
//! background thread streams queued files through the chunk pipeline, in batches that each end
//! with the writer's commit (packs fsynced, chunk rows in the index), and remembers each file's size,
//! BLAKE3 and chunk list together with the file's *version*: a counter the view bumps on
//! every write and truncation. A seal then takes a remembered result instead of reading the
//! file again when the version still matches and every chunk is still in the index (gc may
//! have swept an unreferenced one since). Anything else is chunked by the seal as before, so a
//! result that is missing, stale or lost with a restart only costs time.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::id::FileHash;
use crate::ingest::ingest_stream;
use crate::manifest::ChunkRef;
use crate::store::{Progress, Store};

/// A file is chunked ahead at most this many times (a log reopened and appended to again and
/// again is left to its seal).
const MAX_TIMES: u32 = 3;
/// A batch ends after this many files or bytes: a seal waits at most for one batch.
const BATCH_FILES: usize = 512;
const BATCH_BYTES: u64 = 64 << 20;
/// … or when no file came for this long (its packs are then written and its results usable).
const IDLE: Duration = Duration::from_millis(200);
/// Files are taken in bursts: once this many are queued, or the first of them has waited
/// [`GATHER_WAIT`]. A producer closes a small file every half millisecond or so; handing each
/// on at once woke the pipeline's threads once per file, and those wake-ups cost more CPU than
/// chunking the file.
const GATHER_FILES: usize = 64;
const GATHER_WAIT: Duration = Duration::from_millis(20);

/// A staged file chunked ahead.
#[derive(Clone, Debug)]
pub(super) struct Done {
    pub version: u64,
    pub size: u64,
    pub hash: FileHash,
    pub chunks: Vec<ChunkRef>,
}

struct Job {
    run: i64,
    inode: i64,
    version: u64,
    queued: Instant,
    /// A small file's content, given at its close; else it is read from the index or the
    /// staging file.
    content: Option<Vec<u8>>,
}

#[derive(Default)]
struct State {
    /// Per staged inode: (run, version).
    gens: HashMap<i64, (i64, u64)>,
    queue: VecDeque<Job>,
    /// Runs with files in the batch being chunked.
    busy: Vec<i64>,
    /// A seal waits for the batch: end it now.
    flush: bool,
    done: HashMap<i64, Done>,
    times: HashMap<i64, u32>,
    stop: bool,
    /// Bytes read ahead so far (for tests).
    #[cfg(test)]
    read: u64,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue, the results and the thread that chunks ahead.
pub(super) struct PreSeal {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl PreSeal {
    pub fn start(store: Arc<Store>, staging: PathBuf) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("afs-preseal".into())
            .spawn(move || run(&store, &staging, &s))
            .map_err(|e| crate::Error::Internal(format!("spawn the pre-seal thread: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The content of `inode` (a staged file of `run`) changed.
    pub fn changed(&self, run: i64, inode: i64) {
        let mut st = self.shared.lock();
        st.gens.entry(inode).or_insert((run, 0)).1 += 1;
    }

    /// The last handle of `inode` closed: queue it unless its content is chunked already.
    /// `content` is the file's content when the view holds it (a small file).
    pub fn closed(&self, run: i64, inode: i64, content: Option<Vec<u8>>) {
        let mut st = self.shared.lock();
        let Some(&(_, version)) = st.gens.get(&inode) else {
            // Not written since the mount started: the seal reads it.
            return;
        };
        if st.done.get(&inode).is_some_and(|d| d.version == version)
            || st.times.get(&inode).copied().unwrap_or(0) >= MAX_TIMES
            || st
                .queue
                .iter()
                .any(|j| j.inode == inode && j.version == version)
        {
            return;
        }
        st.queue.push_back(Job {
            run,
            inode,
            version,
            queued: Instant::now(),
            content,
        });
        // The first file starts the thread's wait for a burst; a full burst ends it.
        let wake = st.queue.len() == 1 || st.queue.len() == GATHER_FILES;
        drop(st);
        if wake {
            self.shared.cv.notify_all();
        }
    }

    /// Before a seal of `run` (which has no open file): drops its queued files (the seal
    /// chunks them itself) and waits for a batch that holds some of them.
    pub fn quiesce(&self, run: i64) {
        let mut st = self.shared.lock();
        st.queue.retain(|j| j.run != run);
        if st.busy.contains(&run) {
            st.flush = true;
            self.shared.cv.notify_all();
        }
        while st.busy.contains(&run) {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The chunked content of `inode`, if it is the current one.
    pub fn result(&self, inode: i64) -> Option<Done> {
        let st = self.shared.lock();
        let (_, version) = st.gens.get(&inode)?;
        st.done
            .get(&inode)
            .filter(|d| d.version == *version)
            .cloned()
    }

    /// Forgets everything about `run` (sealed or deleted).
    pub fn forget_run(&self, run: i64) {
        let mut st = self.shared.lock();
        let inodes: Vec<i64> = st
            .gens
            .iter()
            .filter(|(_, (r, _))| *r == run)
            .map(|(i, _)| *i)
            .collect();
        for i in inodes {
            st.gens.remove(&i);
            st.done.remove(&i);
            st.times.remove(&i);
        }
        st.queue.retain(|j| j.run != run);
    }

    /// Forgets one deleted inode.
    pub fn forget(&self, inode: i64) {
        let mut st = self.shared.lock();
        st.gens.remove(&inode);
        st.done.remove(&inode);
        st.times.remove(&inode);
        st.queue.retain(|j| j.inode != inode);
    }

    /// Bytes read ahead so far (for tests).
    #[cfg(test)]
    pub fn bytes_read(&self) -> u64 {
        self.shared.lock().read
    }

    /// How many files are queued or being chunked (for tests).
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        let st = self.shared.lock();
        st.queue.len() + st.busy.len()
    }

    /// Waits until nothing is queued or being chunked (for tests).
    #[cfg(test)]
    pub fn wait_idle(&self) {
        let mut st = self.shared.lock();
        while !st.queue.is_empty() || !st.busy.is_empty() {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for PreSeal {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(store: &Store, staging: &Path, shared: &Shared) {
    loop {
        {
            let mut st = shared.lock();
            while st.queue.is_empty() && !st.stop {
                st = shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
        }
        let batch = chunk_batch(store, staging, shared);
        let mut st = shared.lock();
        for (job, r) in batch {
            *st.times.entry(job.inode).or_default() += 1;
            match r {
                Some(d) if st.gens.get(&job.inode).map(|g| g.1) == Some(job.version) => {
                    st.done.insert(job.inode, d);
                }
                _ => {}
            }
        }
        st.busy.clear();
        st.flush = false;
        drop(st);
        shared.cv.notify_all();
    }
}

/// The next job of the current batch: `None` ends the batch (full, asked to end, or nothing
/// came for [`IDLE`]). Jobs are taken in bursts ([`GATHER_FILES`]); `draining` is true while
/// one is being taken.
fn next_job(shared: &Shared, files: usize, bytes: u64, draining: &mut bool) -> Option<Job> {
    let mut st = shared.lock();
    loop {
        if st.stop || st.flush || files >= BATCH_FILES || bytes >= BATCH_BYTES {
            return None;
        }
        if let Some(front) = st.queue.front()
            && !*draining
            && st.queue.len() < GATHER_FILES
            && let Some(left) = GATHER_WAIT.checked_sub(front.queued.elapsed())
        {
            st = shared
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        *draining = !st.queue.is_empty();
        if let Some(j) = st.queue.pop_front() {
            if st.gens.get(&j.inode).map(|g| g.1) != Some(j.version) {
                continue;
            }
            if !st.busy.contains(&j.run) {
                st.busy.push(j.run);
            }
            return Some(j);
        }
        let (g, t) = shared
            .cv
            .wait_timeout(st, IDLE)
            .unwrap_or_else(|p| p.into_inner());
        st = g;
        if t.timed_out() && st.queue.is_empty() {
            return None;
        }
    }
}

/// The file being chunked ahead: its reading stops once its content has moved on (written,
/// truncated or deleted meanwhile: the result could not be used) or the mount stops, so that
/// neither a seal nor an unmount waits for a large file nobody needs any more.
struct Current<'a> {
    shared: &'a Shared,
    inode: i64,
    version: u64,
}

impl Progress for Current<'_> {
    #[cfg(test)]
    fn inc(&self, bytes: u64) {
        self.shared.lock().read += bytes;
    }

    fn cancelled(&self) -> bool {
        let st = self.shared.lock();
        st.stop || st.gens.get(&self.inode).map(|g| g.1) != Some(self.version)
    }
}

/// Chunks queued files through one writer until the batch ends; a file's result counts only
/// once the writer's commit succeeded.
fn chunk_batch(store: &Store, staging: &Path, shared: &Shared) -> Vec<(Job, Option<Done>)> {
    let guard = store.seal_guard();
    let mut writer = store.writer(&guard);
    let mut out: Vec<(Job, Option<Done>)> = Vec::new();
    let mut bytes = 0;
    let mut draining = false;
    while let Some(mut job) = next_job(shared, out.len(), bytes, &mut draining) {
        let p = staging
            .join(job.run.to_string())
            .join(job.inode.to_string());
        // A small file's content came with its close, or is in the index (see
        // `Vfs::open_content`); a larger one's is in its staging file. (Bound first: the index
        // stays locked while a temporary lives.) A closed file's content is committed; reading
        // it does not commit the creations the view has deferred (ADR 0018), which the next
        // close commits with its content.
        let inline = match job.content.take() {
            Some(d) => Ok(Some(d)),
            None => store.index_deferred().meta(|m| m.inline_data(job.inode)),
        };
        let current = Current {
            shared,
            inode: job.inode,
            version: job.version,
        };
        let r = match inline {
            Ok(Some(d)) => ingest_stream(store, &mut writer, &d[..], &current, &p),
            Ok(None) => File::open(&p)
                .map_err(|e| crate::Error::io("open", &p, e))
                .and_then(|f| ingest_stream(store, &mut writer, f, &current, &p)),
            Err(e) => Err(e),
        };
        let done = match r {
            Ok((size, hash, chunks)) => {
                bytes += size;
                Some(Done {
                    version: job.version,
                    size,
                    hash,
                    chunks,
                })
            }
            Err(e) => {
                // A file unlinked meanwhile, or a damaged staging file: the seal decides.
                tracing::debug!(path = %p.display(), "not chunked ahead: {e}");
                None
            }
        };
        out.push((job, done));
    }
    if let Err(e) = writer.finish() {
        tracing::warn!("chunking closed files ahead of their seal failed: {e}");
        for o in &mut out {
            o.1 = None;
        }
    }
    out
}
