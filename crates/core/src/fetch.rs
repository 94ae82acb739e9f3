//! Reads of many chunks in order, for readers that know what they need next: a file read
//! from start to end (`cat`, `export`), the mount's readahead of a sealed file, `verify`.
//!
//! On a store without a remote tier, or for chunks whose pack is local, this is
//! [`Store::read_chunk`] one chunk after the other. The chunks of evicted packs are planned
//! into *windows* ([`plan_windows`]): the chunks that follow each other in the reading order
//! and in the same pack, at ascending offsets with gaps of at most [`MAX_GAP`] bytes, are read
//! by one ranged GET of at most [`MAX_WINDOW`] bytes (a small gap costs less than another
//! request). Up to [`FETCHES_IN_FLIGHT`] windows are fetched at once, ahead of the reader and
//! in its order, never more than [`WINDOWS_AHEAD`] windows ahead, so memory stays bounded by
//! about `WINDOWS_AHEAD * MAX_WINDOW`. A fetched window goes into the tier's range cache when
//! the cache bound leaves room for it (ADR 0009), so a later read of any chunk inside it is
//! local; when it does not, the chunks read from it are kept one by one, the last read first,
//! as many as fit.
//!
//! Every chunk is still decoded and checked against its id; a GET that fails or returns fewer
//! bytes than asked is an error naming the backend (endpoint and bucket) and the key, never
//! wrong bytes. A window whose pack vanished meanwhile (gc rewrote it) falls back to
//! [`Store::read_chunk`], which locates each chunk again. ADR 0014 records the design.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::pack::{self, pack_key};
use crate::store::Store;

/// The largest gap between two chunks of one window: reading it costs less than a request.
pub const MAX_GAP: u64 = 256 << 10;
/// The largest window, one ranged GET.
pub const MAX_WINDOW: u64 = 8 << 20;
/// Windows fetched at once.
pub const FETCHES_IN_FLIGHT: usize = 4;
/// How far ahead of the reader windows are fetched (fetched or in flight, not yet read).
pub const WINDOWS_AHEAD: usize = FETCHES_IN_FLIGHT + 2;

/// How chunks are coalesced into windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalesceLimits {
    pub max_gap: u64,
    pub max_window: u64,
}

impl Default for CoalesceLimits {
    fn default() -> Self {
        Self {
            max_gap: MAX_GAP,
            max_window: MAX_WINDOW,
        }
    }
}

/// How far ahead of a reader of local packs the disk is asked for the bytes it will need.
pub const HINT_AHEAD_BYTES: u64 = 16 << 20;

/// The byte ranges of local packs that a read of many chunks will need, coalesced as the
/// windows of a remote read are, handed to [`ObjectStore::will_need`] about
/// [`HINT_AHEAD_BYTES`] ahead of the reader. A cold read of chunks spread over many packs
/// (the last run of many, after dedup) then keeps several disk reads in flight instead of
/// waiting for one `pread` at a time.
///
/// [`ObjectStore::will_need`]: crate::objstore::ObjectStore::will_need
struct HintAhead {
    windows: Vec<Window>,
    of_chunk: Vec<Option<usize>>,
    /// Windows hinted so far (in the order of first use), and the furthest one reached.
    hinted: usize,
    reached: usize,
    /// Bytes of the windows hinted past the one reached.
    ahead: u64,
}

impl HintAhead {
    fn new(locs: &[Option<crate::index::ChunkLoc>]) -> Self {
        let keys: Vec<Option<String>> = locs
            .iter()
            .map(|l| l.as_ref().map(|l| pack_key(&l.pack)))
            .collect();
        let wanted: Vec<Option<(&str, u64, u64)>> = locs
            .iter()
            .zip(&keys)
            .map(|(l, k)| match (l, k) {
                (Some(l), Some(k)) => {
                    Some((k.as_str(), l.entry.offset, u64::from(l.entry.stored_len)))
                }
                _ => None,
            })
            .collect();
        let (windows, of_chunk) = plan_windows(&wanted, CoalesceLimits::default());
        Self {
            windows,
            of_chunk,
            hinted: 0,
            reached: 0,
            ahead: 0,
        }
    }

    /// Chunk `i` is about to be read: hints what the next [`HINT_AHEAD_BYTES`] will need.
    fn reading(&mut self, i: usize, objects: &dyn crate::objstore::ObjectStore) {
        // A single window is one `pread` anyway.
        if self.windows.len() < 2 {
            return;
        }
        let Some(w) = self.of_chunk.get(i).copied().flatten() else {
            return;
        };
        while self.reached < w {
            self.reached += 1;
            if self.reached < self.hinted {
                self.ahead -= self.windows[self.reached].len;
            }
        }
        while self.hinted < self.windows.len()
            && (self.hinted <= self.reached || self.ahead < HINT_AHEAD_BYTES)
        {
            let win = &self.windows[self.hinted];
            objects.will_need(&win.key, win.offset, win.len);
            if self.hinted > self.reached {
                self.ahead += win.len;
            }
            self.hinted += 1;
        }
    }
}

/// One ranged GET of a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub key: String,
    pub offset: u64,
    pub len: u64,
}

impl Window {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Windows looked back at when placing a chunk: the pack writer compresses in parallel, so
/// the chunks of a file are not always in file order within (and across) its packs.
pub const LOOK_BACK: usize = 8;

/// Plans the windows for chunks read in the given order. `chunks[i]` is `Some((key, offset,
/// stored length))` for a chunk that needs a remote read and `None` for one read otherwise
/// (its pack is local, or it is cached). A chunk joins one of the last [`LOOK_BACK`] windows
/// of its pack when the two are at most `max_gap` apart (before or after it) and together
/// within `max_window`; otherwise it starts a new window. Returns the windows, numbered in the
/// order the reader first needs them, and for each chunk the window that holds it.
pub fn plan_windows(
    chunks: &[Option<(&str, u64, u64)>],
    limits: CoalesceLimits,
) -> (Vec<Window>, Vec<Option<usize>>) {
    // Windows merged into an earlier one are `None` and point at it in `into`.
    let mut windows: Vec<Option<Window>> = Vec::new();
    let mut into: Vec<usize> = Vec::new();
    let mut of_chunk = Vec::with_capacity(chunks.len());
    let fits = |a: &Window, key: &str, offset: u64, end: u64| {
        let (lo, hi) = (a.offset.min(offset), a.end().max(end));
        let gap = offset
            .saturating_sub(a.end())
            .max(a.offset.saturating_sub(end));
        a.key == key && gap <= limits.max_gap && hi - lo <= limits.max_window
    };
    let recent = |windows: &Vec<Option<Window>>| -> Vec<usize> {
        (0..windows.len())
            .rev()
            .filter(|&i| windows[i].is_some())
            .take(LOOK_BACK)
            .collect()
    };
    for c in chunks {
        let Some((key, offset, len)) = *c else {
            of_chunk.push(None);
            continue;
        };
        let end = offset + len;
        let joined = recent(&windows).into_iter().find(|&i| {
            windows[i]
                .as_ref()
                .is_some_and(|w| fits(w, key, offset, end))
        });
        let Some(mut i) = joined else {
            windows.push(Some(Window {
                key: key.to_owned(),
                offset,
                len,
            }));
            into.push(windows.len() - 1);
            of_chunk.push(Some(windows.len() - 1));
            continue;
        };
        if let Some(w) = windows[i].as_mut() {
            let hi = w.end().max(end);
            w.offset = w.offset.min(offset);
            w.len = hi - w.offset;
        }
        // The grown window may now reach another one of the pack: one GET for both, under
        // the number of the one needed first.
        while let Some(w) = windows[i].clone() {
            let other = recent(&windows).into_iter().find(|&j| {
                j != i
                    && windows[j]
                        .as_ref()
                        .is_some_and(|o| fits(o, &w.key, w.offset, w.end()))
            });
            let Some(j) = other else { break };
            let (keep, gone) = (i.min(j), i.max(j));
            let g = windows[gone].take().expect("a live window");
            let k = windows[keep].as_mut().expect("a live window");
            let hi = k.end().max(g.end());
            k.offset = k.offset.min(g.offset);
            k.len = hi - k.offset;
            into[gone] = keep;
            i = keep;
        }
        of_chunk.push(Some(i));
    }
    // Number the live windows in order; a chunk's window is where its window went.
    let root = |mut i: usize| {
        while into[i] != i {
            i = into[i];
        }
        i
    };
    let mut number = vec![usize::MAX; windows.len()];
    let mut out = Vec::new();
    for (i, w) in windows.into_iter().enumerate() {
        if let Some(w) = w {
            number[i] = out.len();
            out.push(w);
        }
    }
    let of_chunk = of_chunk
        .into_iter()
        .map(|w| w.map(|w| number[root(w)]))
        .collect();
    (out, of_chunk)
}

/// Runs `fetch(0..n)` on up to `threads` threads, at most `ahead` items ahead of the consumer,
/// and hands the results to `consume` in order. Stops at the first error of `consume`.
pub(crate) fn pipelined<T: Send>(
    n: usize,
    threads: usize,
    ahead: usize,
    fetch: &(dyn Fn(usize) -> T + Sync),
    consume: &mut dyn FnMut(usize, T) -> Result<()>,
) -> Result<()> {
    struct State<T> {
        ready: HashMap<usize, T>,
        /// Items handed to the consumer.
        consumed: usize,
        /// Next item to claim.
        next: usize,
        stop: bool,
    }
    let shared = (
        Mutex::new(State {
            ready: HashMap::new(),
            consumed: 0,
            next: 0,
            stop: false,
        }),
        Condvar::new(),
    );
    let lock = || shared.0.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut g = lock();
                        loop {
                            if g.stop || g.next >= n {
                                return;
                            }
                            if g.next < g.consumed + ahead.max(1) {
                                g.next += 1;
                                break g.next - 1;
                            }
                            g = shared.1.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    let r = fetch(i);
                    lock().ready.insert(i, r);
                    shared.1.notify_all();
                }
            });
        }
        let mut run = || -> Result<()> {
            for i in 0..n {
                let item = {
                    let mut g = lock();
                    loop {
                        if let Some(r) = g.ready.remove(&i) {
                            g.consumed = i + 1;
                            break r;
                        }
                        g = shared.1.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                };
                shared.1.notify_all();
                consume(i, item)?;
            }
            Ok(())
        };
        let res = run();
        lock().stop = true;
        shared.1.notify_all();
        res
    })
}

impl Store {
    /// Whether every chunk of `ids` can be read without a remote read: its pack is local, or
    /// the part of it holding the chunk is in the tier's range cache (always, without a tier).
    /// A chunk the index does not know counts as local: reading it reports it missing.
    pub(crate) fn all_local(&self, ids: &[ChunkId]) -> Result<bool> {
        let Some(tier) = self.tier.as_ref() else {
            return Ok(true);
        };
        let locs = {
            let idx = self.index();
            ids.iter()
                .map(|id| idx.chunk(id))
                .collect::<Result<Vec<_>>>()?
        };
        let mut local: HashMap<String, bool> = HashMap::new();
        for l in locs.iter().flatten() {
            let k = pack_key(&l.pack);
            let is_local = match local.get(&k) {
                Some(b) => *b,
                None => {
                    let b = tier.has_local(&k);
                    local.insert(k.clone(), b);
                    b
                }
            };
            if !is_local && !tier.range_cached(&k, l.entry.offset, u64::from(l.entry.stored_len)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads `ids` in order, each verified against its id, handing each chunk's plaintext to
    /// `f` with its position in `ids`; evicted chunks come in coalesced, parallel ranged GETs
    /// (see the module documentation).
    pub fn for_each_chunk(
        &self,
        ids: &[ChunkId],
        f: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let Some(tier) = self.tier.as_ref() else {
            // Located together; a chunk whose pack went away since (gc rewrote it) or that
            // the index lacks takes the single read, which locates it again or says why.
            let locs = self.read(|idx| idx.chunks(ids))?;
            let mut ahead = HintAhead::new(&locs);
            for (i, (id, loc)) in ids.iter().zip(locs.iter()).enumerate() {
                ahead.reading(i, &*self.objects);
                let data = match loc {
                    Some(loc) => match pack::read_chunk(&*self.objects, &loc.pack, &loc.entry) {
                        Err(Error::MissingObject { .. }) => self.read_chunk(id),
                        other => other,
                    },
                    None => self.read_chunk(id),
                }?;
                f(i, data)?;
            }
            return Ok(());
        };
        let locs = {
            let idx = self.index();
            ids.iter()
                .map(|id| idx.chunk(id))
                .collect::<Result<Vec<_>>>()?
        };
        let keys: Vec<Option<String>> = locs
            .iter()
            .map(|l| l.as_ref().map(|l| pack_key(&l.pack)))
            .collect();
        let mut local: HashMap<&str, bool> = HashMap::new();
        let mut wanted = Vec::with_capacity(ids.len());
        for (l, k) in locs.iter().zip(&keys) {
            let (Some(l), Some(k)) = (l, k) else {
                wanted.push(None);
                continue;
            };
            let (off, len) = (l.entry.offset, u64::from(l.entry.stored_len));
            let is_local = match local.get(k.as_str()) {
                Some(b) => *b,
                None => {
                    let b = tier.has_local(k);
                    local.insert(k, b);
                    b
                }
            };
            if is_local || tier.range_cached(k, off, len) {
                wanted.push(None);
            } else {
                wanted.push(Some((k.as_str(), off, len)));
            }
        }
        let (windows, of_chunk) = plan_windows(&wanted, CoalesceLimits::default());
        if windows.is_empty() {
            for (i, id) in ids.iter().enumerate() {
                f(i, self.read_chunk(id)?)?;
            }
            return Ok(());
        }
        tracing::debug!(
            chunks = ids.len(),
            windows = windows.len(),
            "reading evicted chunks in windows"
        );
        // The last chunk that needs each window: it is dropped after that.
        let mut last_use = vec![0usize; windows.len()];
        for (i, w) in of_chunk.iter().enumerate() {
            if let Some(w) = w {
                last_use[*w] = i;
            }
        }
        // Windows arrive in the order of their first use; after each, every chunk whose
        // window has arrived (and the local ones between) is handed over.
        let mut held: HashMap<usize, Option<Vec<u8>>> = HashMap::new();
        let mut next = 0usize;
        let mut hand_over = |upto: usize,
                             held: &mut HashMap<usize, Option<Vec<u8>>>,
                             next: &mut usize|
         -> Result<()> {
            while *next < ids.len() {
                let i = *next;
                let plain = match of_chunk[i] {
                    None => self.read_chunk(&ids[i])?,
                    Some(w) if w > upto => break,
                    Some(w) => {
                        let plain = match (held.get(&w), &locs[i]) {
                            (Some(Some(d)), Some(l)) => {
                                let win = &windows[w];
                                let start = (l.entry.offset - win.offset) as usize;
                                let end = start + l.entry.stored_len as usize;
                                pack::decode_chunk(&win.key, &l.entry, &d[start..end])?
                            }
                            // The pack went away under the read (gc): locate it again.
                            _ => self.read_chunk(&ids[i])?,
                        };
                        if last_use[w] == i {
                            held.remove(&w);
                        }
                        plain
                    }
                };
                f(i, plain)?;
                *next += 1;
            }
            Ok(())
        };
        // The chunk ranges each window holds, in reading order (kept chunk by chunk when a
        // whole window does not fit the cache).
        let mut pieces: Vec<Vec<(u64, u64)>> = vec![Vec::new(); windows.len()];
        for (c, w) in wanted.iter().zip(&of_chunk) {
            if let (Some((_, off, len)), Some(w)) = (c, w) {
                pieces[*w].push((*off, *len));
            }
        }
        let fetch = |w: usize| tier.fetch_window(&windows[w], &pieces[w]);
        pipelined(
            windows.len(),
            FETCHES_IN_FLIGHT,
            WINDOWS_AHEAD,
            &fetch,
            &mut |w, got| {
                let data = match got {
                    Ok(d) => Some(d),
                    Err(Error::MissingObject { .. }) => None,
                    Err(e) => return Err(e),
                };
                held.insert(w, data);
                hand_over(w, &mut held, &mut next)
            },
        )?;
        hand_over(usize::MAX, &mut held, &mut next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the hints it is given; nothing else is used.
    #[derive(Default)]
    struct Hints(
        std::sync::Mutex<Vec<(String, u64, u64)>>,
        crate::objstore::MemoryStore,
    );

    impl crate::objstore::ObjectStore for Hints {
        fn describe(&self) -> String {
            self.1.describe()
        }
        fn put(&self, key: &str, data: &[u8]) -> Result<()> {
            self.1.put(key, data)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>> {
            self.1.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            self.1.get_range(key, offset, len)
        }
        fn head(&self, key: &str) -> Result<Option<u64>> {
            self.1.head(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<crate::objstore::ObjectMeta>> {
            self.1.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.1.delete(key)
        }
        fn will_need(&self, key: &str, offset: u64, len: u64) {
            self.0.lock().unwrap().push((key.to_owned(), offset, len));
        }
    }

    /// A read of chunks spread over two packs hints each range once, in reading order, always
    /// before its chunk is read and never much more than `HINT_AHEAD_BYTES` ahead of it; a
    /// chunk of no pack (not located) is skipped.
    #[test]
    fn local_reads_hint_their_ranges_ahead_in_order() {
        let mib = 1u64 << 20;
        let packs = [crate::id::PackId([1; 32]), crate::id::PackId([2; 32])];
        let locs: Vec<Option<crate::index::ChunkLoc>> = (0..40u64)
            .map(|i| {
                (i != 7).then(|| crate::index::ChunkLoc {
                    pack: packs[(i % 2) as usize],
                    entry: pack::PackEntry {
                        chunk: ChunkId([i as u8; 32]),
                        codec: crate::codec::Codec::Raw,
                        raw_len: mib as u32,
                        stored_len: mib as u32,
                        // 1 MiB apart: every chunk is a window of its own.
                        offset: (i / 2) * 2 * mib,
                    },
                })
            })
            .collect();
        let store = Hints::default();
        let mut ahead = HintAhead::new(&locs);
        assert_eq!(ahead.windows.len(), 39);
        for (i, loc) in locs.iter().enumerate() {
            ahead.reading(i, &store);
            let hints = store.0.lock().unwrap().clone();
            if let Some(l) = loc {
                let at = hints
                    .iter()
                    .position(|h| *h == (pack_key(&l.pack), l.entry.offset, mib))
                    .unwrap_or_else(|| panic!("chunk {i} was read before its hint"));
                let past = (hints.len() - at - 1) as u64 * mib;
                assert!(
                    past <= HINT_AHEAD_BYTES + mib,
                    "{past} bytes hinted past chunk {i}"
                );
            }
        }
        let hints = store.0.into_inner().unwrap();
        let want: Vec<_> = locs
            .iter()
            .flatten()
            .map(|l| (pack_key(&l.pack), l.entry.offset, mib))
            .collect();
        assert_eq!(hints, want);
    }

    fn lim(gap: u64, max: u64) -> CoalesceLimits {
        CoalesceLimits {
            max_gap: gap,
            max_window: max,
        }
    }

    #[test]
    fn contiguous_chunks_of_one_pack_are_one_window() {
        let c = [
            Some(("p/a", 10, 100)),
            Some(("p/a", 110, 100)),
            Some(("p/a", 210, 50)),
        ];
        let (w, of) = plan_windows(&c, lim(0, 1 << 20));
        assert_eq!(
            w,
            [Window {
                key: "p/a".into(),
                offset: 10,
                len: 250
            }]
        );
        assert_eq!(of, [Some(0), Some(0), Some(0)]);
    }

    #[test]
    fn gaps_sizes_packs_and_order_split_windows() {
        let c = [
            Some(("p/a", 0, 100)),
            Some(("p/a", 150, 100)), // gap 50: coalesced
            Some(("p/a", 500, 100)), // gap 250 > 100: new window
            Some(("p/b", 600, 100)), // other pack
            None,                    // local: no window, does not split
            Some(("p/b", 700, 100)),
            Some(("p/b", 800, 300)), // window would exceed 400: new
            Some(("p/b", 0, 100)),   // far backwards: new
            Some(("p/b", 0, 100)),   // the same chunk again: same window
        ];
        let (w, of) = plan_windows(&c, lim(100, 400));
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.key.as_str(), w.offset, w.len))
            .collect();
        assert_eq!(
            got,
            [
                ("p/a", 0, 250),
                ("p/a", 500, 100),
                ("p/b", 600, 200),
                ("p/b", 800, 300),
                ("p/b", 0, 100),
            ]
        );
        assert_eq!(
            of,
            [
                Some(0),
                Some(0),
                Some(1),
                Some(2),
                None,
                Some(2),
                Some(3),
                Some(4),
                Some(4)
            ]
        );
    }

    #[test]
    fn chunks_out_of_order_in_their_packs_still_coalesce() {
        // As the parallel pack writer leaves them: a chunk of pack a late in its pack, the
        // next ones of pack b, then the rest of pack a before it.
        let c = [
            Some(("p/a", 600, 100)),
            Some(("p/b", 0, 300)),
            Some(("p/a", 0, 300)),
            Some(("p/a", 300, 300)),
        ];
        let (w, of) = plan_windows(&c, lim(300, 1 << 20));
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.key.as_str(), w.offset, w.len))
            .collect();
        assert_eq!(got, [("p/a", 0, 700), ("p/b", 0, 300)]);
        assert_eq!(of, [Some(0), Some(1), Some(0), Some(0)]);
    }

    #[test]
    fn windows_that_grow_into_each_other_merge() {
        // Pack a's chunk 3 came first in the pack's order; chunks 1 and 2 are far from it
        // until chunk 2 closes the gap.
        let c = [
            Some(("p/a", 1000, 100)),
            Some(("p/b", 0, 300)),
            Some(("p/a", 0, 500)),
            Some(("p/a", 500, 500)),
            Some(("p/b", 300, 100)),
        ];
        let (w, of) = plan_windows(&c, lim(0, 1 << 20));
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.key.as_str(), w.offset, w.len))
            .collect();
        assert_eq!(got, [("p/a", 0, 1100), ("p/b", 0, 400)]);
        assert_eq!(of, [Some(0), Some(1), Some(0), Some(0), Some(1)]);
    }

    #[test]
    fn pipelined_hands_results_over_in_order_and_stops_on_error() {
        let fetched = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |i: usize| {
            fetched.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis((7 * i as u64) % 5));
            i * 2
        };
        let mut seen = Vec::new();
        pipelined(20, 4, 6, &fetch, &mut |i, v| {
            seen.push((i, v));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (0..20).map(|i| (i, i * 2)).collect::<Vec<_>>());
        fetched.store(0, std::sync::atomic::Ordering::SeqCst);
        let err = pipelined(100, 4, 6, &fetch, &mut |i, _| {
            if i == 3 {
                Err(Error::Internal("stop".into()))
            } else {
                Ok(())
            }
        });
        assert!(err.is_err());
        // Never more than `ahead` past what was consumed.
        assert!(fetched.load(std::sync::atomic::Ordering::SeqCst) <= 4 + 6);
    }
}
