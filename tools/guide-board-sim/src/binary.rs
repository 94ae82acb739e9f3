//! Large binary files (`bin/firmware-<k>.bin`, `bin/trace.dat`) and how they evolve between runs.
//!
//! A file is never held in memory. Its content is a *piece table*: a list of ranges of
//! *sources*, where each source is an endless, randomly addressable byte stream generated in
//! 64 KiB blocks from its own seed. Source 0 is the file's original content; every mutation of
//! every run introduces a new source for the bytes it writes. Run `i + 1` is run `i` with that
//! run's mutations applied to the piece table, so deriving a later run only costs piece-table
//! edits, and writing any run streams block by block.
//!
//! Each block is a sequence of regions of a few hundred bytes to 8 KiB, each of one kind:
//! random bytes, zero/0xFF fill, instruction-like halfwords, NUL-separated strings, fixed-size
//! records with counters, or a copy of an earlier region of the same block. The mix differs by
//! [`Profile`], and makes zstd compress the files by a moderate amount.

use std::io::{self, Write};

use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;

use crate::seed::{rng, tag};

/// Size of one independently generated block of a source.
pub const BLOCK: usize = 64 * 1024;

const BASE_SRC: u64 = 0;
const T_BLOCK: u64 = tag("binary-block");
const T_MUTATE: u64 = tag("binary-mutate");
/// Bytes at the start of a firmware image rewritten by every build (build id, timestamp).
const FIRMWARE_HEADER: u64 = 64;

/// The region mix of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Code-heavy image with strings, padding and tables.
    Firmware,
    /// Record-heavy capture with some raw payloads.
    Trace,
}

#[derive(Clone, Copy)]
enum Region {
    Random,
    Fill,
    Code,
    Strings,
    Records,
    Repeat,
}

impl Profile {
    fn region(self, roll: u32) -> Region {
        use Region::*;
        let table: &[(u32, Region)] = match self {
            Profile::Firmware => &[
                (24, Random),
                (34, Code),
                (8, Strings),
                (9, Fill),
                (10, Records),
                (15, Repeat),
            ],
            Profile::Trace => &[
                (22, Random),
                (5, Code),
                (8, Strings),
                (8, Fill),
                (45, Records),
                (12, Repeat),
            ],
        };
        let mut acc = 0;
        for &(weight, region) in table {
            acc += weight;
            if roll < acc {
                return region;
            }
        }
        Random
    }

    fn magic(self) -> u16 {
        match self {
            Profile::Firmware => 0x4247,
            Profile::Trace => 0x5254,
        }
    }
}

/// High bytes of common Thumb-2 instructions; the low byte stays random.
const OPCODE_HI: [u8; 16] = [
    0x46, 0x68, 0x60, 0xb5, 0xbd, 0xf0, 0xf7, 0xe7, 0xd1, 0xd0, 0x28, 0x2b, 0x20, 0x21, 0x4b, 0x48,
];

const VOCAB: &[&str] = &[
    "gb_uart_init",
    "gb_uart_rx_irq",
    "HAL_GPIO_WritePin",
    "HAL_I2C_Master_Transmit",
    "assert failed: %s:%d",
    "i2c timeout on bus %d",
    "guide-board fw v%d.%d.%d",
    "calib_load",
    "watchdog_kick",
    "sensor_read_raw",
    "dma_start_xfer",
    "spi_flash_erase_sector",
    "ERR_BAD_CRC",
    "boot: jumping to app at 0x%08x",
    "motor_ctrl_step",
    "adc_sample_channel",
    "rail VCC_3V3 undervoltage",
    "pid_update",
    "encoder overflow",
    "can_bus_tx_mailbox",
];

/// One contiguous range of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    src: u64,
    off: u64,
    len: u64,
}

/// One mutation: replace `old_len` bytes at `off` by `new_len` fresh bytes. Covers in-place
/// overwrites (`old_len == new_len`), insertions (`old_len == 0`) and deletions (`new_len == 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Op {
    off: u64,
    old_len: u64,
    new_len: u64,
}

/// A large binary file at some run, as a piece table.
#[derive(Clone, Debug)]
pub struct BigFile {
    key: u64,
    profile: Profile,
    pieces: Vec<Piece>,
    len: u64,
}

impl BigFile {
    /// The file as of run 0. `key` distinguishes files of the same run.
    pub fn new(key: u64, profile: Profile, len: u64) -> Self {
        let pieces = if len == 0 {
            Vec::new()
        } else {
            vec![Piece {
                src: BASE_SRC,
                off: 0,
                len,
            }]
        };
        Self {
            key,
            profile,
            pieces,
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Applies the mutations of `run` (which must be the next run) to get that run's content.
    pub fn advance(&mut self, seed: u64, run: u64) {
        let ops = plan_ops(seed, self.key, self.profile, run, self.len);
        self.pieces = apply(&self.pieces, &ops, run);
        self.len = self.pieces.iter().map(|p| p.len).sum();
    }

    /// Streams the content; returns the number of bytes written.
    pub fn write_to<W: Write>(&self, seed: u64, w: &mut W) -> io::Result<u64> {
        let mut base = BlockCache::default();
        let mut patch = BlockCache::default();
        for p in &self.pieces {
            let cache = if p.src == BASE_SRC {
                &mut base
            } else {
                &mut patch
            };
            let mut off = p.off;
            let end = p.off + p.len;
            while off < end {
                let block = off / BLOCK as u64;
                let within = (off % BLOCK as u64) as usize;
                let n = (end - off).min((BLOCK - within) as u64) as usize;
                let data = cache.get(seed, self.key, self.profile, p.src, block, within + n);
                w.write_all(&data[within..within + n])?;
                off += n as u64;
            }
        }
        Ok(self.len)
    }

    #[cfg(test)]
    fn to_vec(&self, seed: u64) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(seed, &mut v).unwrap();
        v
    }
}

/// The last block generated for one kind of source (possibly only a prefix of it).
#[derive(Default)]
struct BlockCache {
    id: Option<(u64, u64)>,
    data: Vec<u8>,
}

impl BlockCache {
    fn get(
        &mut self,
        seed: u64,
        key: u64,
        profile: Profile,
        src: u64,
        block: u64,
        need: usize,
    ) -> &[u8] {
        let same = self.id == Some((src, block));
        if !same || self.data.len() < need {
            // A second, longer request for the same block generates all of it.
            let upto = if same { BLOCK } else { need };
            gen_block(&mut self.data, seed, key, profile, src, block, upto);
            self.id = Some((src, block));
        }
        &self.data
    }
}

/// Generates block `block` of source `src` into `out`, stopping at the first region boundary at
/// or after `upto` bytes. Generation is sequential, so any prefix is the same however much of
/// the block is generated.
fn gen_block(
    out: &mut Vec<u8>,
    seed: u64,
    key: u64,
    profile: Profile,
    src: u64,
    block: u64,
    upto: usize,
) {
    out.clear();
    let upto = upto.min(BLOCK);
    let mut r = rng(&[seed, T_BLOCK, key, src, block]);
    let base = block * BLOCK as u64;
    while out.len() < upto {
        let start = out.len();
        let len = r.random_range(256..=8192usize).min(BLOCK - start);
        let end = start + len;
        match profile.region(r.random_range(0..100)) {
            Region::Random => {
                out.resize(end, 0);
                r.fill_bytes(&mut out[start..]);
            }
            Region::Fill => {
                let v = if r.random_bool(0.6) { 0 } else { 0xff };
                out.resize(end, v);
            }
            Region::Code => {
                out.resize(end, 0);
                r.fill_bytes(&mut out[start..]);
                for pair in out[start..].chunks_exact_mut(2) {
                    pair[1] = OPCODE_HI[(pair[1] & 0x0f) as usize];
                }
            }
            Region::Strings => {
                while out.len() < end {
                    let word = VOCAB[r.random_range(0..VOCAB.len())];
                    out.extend_from_slice(word.as_bytes());
                    out.push(0);
                }
                out.truncate(end);
            }
            Region::Records => records(out, &mut r, profile, base, end),
            Region::Repeat => {
                if start >= len {
                    let from = r.random_range(0..=start - len);
                    out.extend_from_within(from..from + len);
                } else {
                    out.resize(end, 0);
                    r.fill_bytes(&mut out[start..]);
                }
            }
        }
    }
}

/// Fixed-size records: magic, type, flags, a sequence number derived from the position, a
/// timestamp, a partly random value, and (for longer records) a checksum and zero padding.
fn records(out: &mut Vec<u8>, r: &mut ChaCha8Rng, profile: Profile, base: u64, end: usize) {
    let size = [16usize, 32, 48][r.random_range(0..3)];
    let kind = r.random_range(0..8u8);
    let period = r.random_range(100..5000u32);
    let mut rec = [0u8; 48];
    rec[0..2].copy_from_slice(&profile.magic().to_le_bytes());
    while out.len() < end {
        let seq = ((base + out.len() as u64) / size as u64) as u32;
        let bits = r.next_u64();
        rec[2] = kind + (bits % 3) as u8;
        rec[3] = if bits & 0xf0 == 0 { 0x80 } else { 0 };
        rec[4..8].copy_from_slice(&seq.to_le_bytes());
        let ts = seq
            .wrapping_mul(period)
            .wrapping_add(((bits >> 8) & 0xf) as u32);
        rec[8..12].copy_from_slice(&ts.to_le_bytes());
        let value = ((bits >> 16) as u32) & 0x00ff_0fff;
        rec[12..16].copy_from_slice(&value.to_le_bytes());
        if size > 16 {
            let aux = ((bits >> 48) as u16).to_le_bytes();
            rec[16..18].copy_from_slice(&aux);
            let sum = seq ^ ts ^ value ^ 0x5a5a_5a5a;
            rec[size - 4..size].copy_from_slice(&sum.to_le_bytes());
        }
        let n = size.min(end - out.len());
        out.extend_from_slice(&rec[..n]);
    }
}

/// The mutations turning run `run - 1` into run `run`, sorted and non-overlapping.
///
/// About 1–3% of the file's bytes change, mostly inside 2–4 "hot areas" (a rebuilt module, a
/// re-captured section) where overwrites, insertions and deletions alternate with untouched
/// gaps, plus a few isolated small edits elsewhere and, for firmware, the build header.
fn plan_ops(seed: u64, key: u64, profile: Profile, run: u64, len: u64) -> Vec<Op> {
    let mut r = rng(&[seed, T_MUTATE, key, run]);
    let mut ops = Vec::new();
    if len < 4096 {
        return ops;
    }
    let min_off = if profile == Profile::Firmware {
        ops.push(Op {
            off: 0,
            old_len: FIRMWARE_HEADER,
            new_len: FIRMWARE_HEADER,
        });
        FIRMWARE_HEADER
    } else {
        0
    };
    let usable = len - min_off;
    let budget = ((len as f64 * r.random_range(0.01..0.03)) as u64).max(512);

    let areas = r.random_range(2..=4u64);
    let per_area = budget / areas;
    for _ in 0..areas {
        let span = (per_area * 2).min(usable);
        let mut cursor = min_off + r.random_range(0..=usable - span);
        let mut spent = 0;
        while spent < per_area && cursor < len {
            cursor += r.random_range(0..=4096);
            let (old_len, new_len) = match r.random_range(0..4) {
                0 | 1 => {
                    let n = r.random_range(16..=8192);
                    (n, n)
                }
                2 => (0, r.random_range(256..=4096)),
                _ => (r.random_range(256..=4096), 0),
            };
            if cursor + old_len > len {
                break;
            }
            ops.push(Op {
                off: cursor,
                old_len,
                new_len,
            });
            cursor += old_len;
            spent += old_len.max(new_len);
        }
    }

    for _ in 0..r.random_range(2..=4) {
        let (old_len, new_len) = match r.random_range(0..3) {
            0 => {
                let n = r.random_range(8..=256);
                (n, n)
            }
            1 => (0, r.random_range(256..=2048)),
            _ => (r.random_range(256..=2048).min(usable / 4), 0),
        };
        let off = min_off + r.random_range(0..=usable - old_len);
        ops.push(Op {
            off,
            old_len,
            new_len,
        });
    }

    // Areas may overlap each other and the isolated edits: keep the first of overlapping ops.
    ops.sort_by_key(|op| op.off);
    let mut kept: Vec<Op> = Vec::with_capacity(ops.len());
    let mut end = 0;
    for op in ops {
        if op.off >= end && (op.old_len > 0 || op.new_len > 0) {
            end = op.off + op.old_len;
            kept.push(op);
        }
    }
    kept
}

/// Source id of the bytes written by mutation `idx` of `run`.
fn patch_src(run: u64, idx: usize) -> u64 {
    1 + (run << 24) + idx as u64
}

/// Walks a piece table from the start, copying or dropping byte ranges.
struct Walker<'a> {
    pieces: &'a [Piece],
    idx: usize,
    inner: u64,
}

impl Walker<'_> {
    /// Moves `n` bytes forward (or to the end), appending them to `out` if `keep`.
    fn advance(&mut self, mut n: u64, keep: bool, out: &mut Vec<Piece>) {
        while n > 0 && self.idx < self.pieces.len() {
            let p = self.pieces[self.idx];
            let take = (p.len - self.inner).min(n);
            if keep {
                push_piece(
                    out,
                    Piece {
                        src: p.src,
                        off: p.off + self.inner,
                        len: take,
                    },
                );
            }
            n -= take;
            self.inner += take;
            if self.inner == p.len {
                self.idx += 1;
                self.inner = 0;
            }
        }
    }
}

fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if p.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.src == p.src
        && last.off + last.len == p.off
    {
        last.len += p.len;
        return;
    }
    out.push(p);
}

fn apply(pieces: &[Piece], ops: &[Op], run: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len() + 2 * ops.len() + 1);
    let mut walker = Walker {
        pieces,
        idx: 0,
        inner: 0,
    };
    let mut pos = 0;
    for (idx, op) in ops.iter().enumerate() {
        walker.advance(op.off - pos, true, &mut out);
        walker.advance(op.old_len, false, &mut out);
        push_piece(
            &mut out,
            Piece {
                src: patch_src(run, idx),
                off: 0,
                len: op.new_len,
            },
        );
        pos = op.off + op.old_len;
    }
    walker.advance(u64::MAX, true, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_bytes(seed: u64, key: u64, profile: Profile, src: u64, len: u64) -> Vec<u8> {
        let f = BigFile {
            key,
            profile,
            pieces: vec![Piece { src, off: 0, len }],
            len,
        };
        f.to_vec(seed)
    }

    #[test]
    fn block_prefixes_are_stable() {
        let mut full = Vec::new();
        gen_block(&mut full, 7, 1, Profile::Firmware, 0, 3, BLOCK);
        assert_eq!(full.len(), BLOCK);
        for upto in [1, 100, 5000, 40000] {
            let mut part = Vec::new();
            gen_block(&mut part, 7, 1, Profile::Firmware, 0, 3, upto);
            assert!(part.len() >= upto);
            assert_eq!(part[..], full[..part.len()]);
        }
    }

    #[test]
    fn piece_table_matches_naive_application() {
        for profile in [Profile::Firmware, Profile::Trace] {
            let seed = 42;
            let key = 9;
            let mut file = BigFile::new(key, profile, 700_000);
            let mut naive = file.to_vec(seed);
            for run in 1..=4 {
                let ops = plan_ops(seed, key, profile, run, naive.len() as u64);
                assert!(!ops.is_empty());
                // Apply back to front so earlier offsets stay valid.
                for (idx, op) in ops.iter().enumerate().rev() {
                    let fresh = source_bytes(seed, key, profile, patch_src(run, idx), op.new_len);
                    let at = op.off as usize;
                    naive.splice(at..at + op.old_len as usize, fresh);
                }
                file.advance(seed, run);
                assert_eq!(file.len(), naive.len() as u64);
                assert!(file.to_vec(seed) == naive, "run {run} differs");
            }
        }
    }

    #[test]
    fn ops_change_a_small_fraction() {
        let len = 32 << 20;
        for run in 1..20 {
            let ops = plan_ops(1, 2, Profile::Trace, run, len);
            let changed: u64 = ops.iter().map(|o| o.old_len.max(o.new_len)).sum();
            let frac = changed as f64 / len as f64;
            assert!((0.005..0.04).contains(&frac), "run {run}: {frac}");
            assert!(ops.iter().any(|o| o.old_len == 0), "no insertion");
            assert!(ops.iter().any(|o| o.new_len == 0), "no deletion");
            assert!(ops.iter().any(|o| o.old_len == o.new_len), "no overwrite");
            assert!(ops.windows(2).all(|w| w[0].off + w[0].old_len <= w[1].off));
        }
    }
}
