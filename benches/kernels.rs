//! Micro-benchmarks of the engine's kernels, one group per stage of the write and read paths:
//!
//! - `chunker`: FastCDC (`Chunker::push`) over 64 MiB of mixed random and structured data;
//! - `blake3`: hashing 1 MiB chunks (what a chunk id costs);
//! - `codec`: zstd level 3 encode of compressible and incompressible 1 MiB chunks, and decode;
//! - `pack`: `PackBuilder` add + finish of 16 MiB of stored chunks;
//! - `index`: SQLite `insert_pack` of 10,000 entries, `has_chunk` and `chunk` lookups.
//!
//! Run with `cargo bench --bench kernels` (a few minutes); `cargo bench --bench kernels -- codec`
//! runs one group. Throughputs are per thread: ingest runs hashing and chunking on the caller's
//! thread and compression on a pool, see `benches/ingest.sh` for the end-to-end numbers.

use std::hint::black_box;
use std::time::{Duration, Instant};

use artifactfs_core::chunker::{Chunker, ChunkerParams};
use artifactfs_core::codec::{self, Codec, Encoder};
use artifactfs_core::id::{ChunkId, PackId};
use artifactfs_core::index::Index;
use artifactfs_core::pack::{PackBuilder, PackEntry};
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};

const MIB: usize = 1 << 20;

/// xorshift64*: fast, deterministic filler.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, out: &mut Vec<u8>, n: usize) {
        let end = out.len() + n;
        while out.len() < end {
            let v = self.next().to_le_bytes();
            let k = (end - out.len()).min(8);
            out.extend_from_slice(&v[..k]);
        }
    }
}

/// Incompressible bytes.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    Rng::new(seed).fill(&mut v, n);
    v
}

/// Log-like text: timestamped lines with varying fields (compresses about 4-8x with zstd -3).
fn text_bytes(n: usize, seed: u64) -> Vec<u8> {
    const LEVELS: [&str; 4] = ["DEBUG", "INFO", "WARN", "ERROR"];
    const WORDS: [&str; 12] = [
        "axis",
        "servo",
        "encoder",
        "calibrate",
        "setpoint",
        "drift",
        "homing",
        "rail",
        "motor",
        "sensor",
        "retry",
        "ok",
    ];
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(n + 256);
    let mut t = 1_767_225_600_000u64;
    while out.len() < n {
        t += r.next() % 5000;
        let v = r.next();
        let line = format!(
            "{t} {:5} guide-board[{}] {} {} step={} value={:.4} err={:#x}\n",
            LEVELS[(v % 4) as usize],
            v % 97,
            WORDS[((v >> 8) % 12) as usize],
            WORDS[((v >> 16) % 12) as usize],
            (v >> 24) % 100_000,
            ((v >> 32) % 1_000_000) as f64 / 997.0,
            (v >> 40) % 4096,
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(n);
    out
}

/// Binary-like structured data: records with small counters and floats, some zero runs.
fn structured_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(n + 64);
    let mut i = 0u32;
    while out.len() < n {
        let v = r.next();
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&((v % 1000) as f32 / 10.0).to_le_bytes());
        out.extend_from_slice(&(v as u16 & 0x0fff).to_le_bytes());
        if v.is_multiple_of(64) {
            out.extend(std::iter::repeat_n(0u8, (v >> 8) as usize % 512));
        }
        i = i.wrapping_add(1);
    }
    out.truncate(n);
    out
}

/// 64 MiB alternating, in 1-4 MiB runs, between random, text and structured data.
fn mixed_bytes(n: usize) -> Vec<u8> {
    let mut r = Rng::new(42);
    let mut out = Vec::with_capacity(n);
    let mut seed = 1;
    while out.len() < n {
        let len = ((1 + r.next() % 4) as usize * MIB).min(n - out.len());
        let part = match r.next() % 3 {
            0 => random_bytes(len, seed),
            1 => text_bytes(len, seed),
            _ => structured_bytes(len, seed),
        };
        out.extend_from_slice(&part);
        seed += 1;
    }
    out
}

fn short<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

fn chunker(c: &mut Criterion) {
    let data = mixed_bytes(64 * MIB);
    let params = ChunkerParams::default();
    let mut g = c.benchmark_group("chunker");
    short(&mut g);
    g.throughput(Throughput::Bytes(data.len() as u64));
    // As ingest feeds it: 1 MiB reads.
    g.bench_function("fastcdc_push_1MiB_pieces_64MiB", |b| {
        let mut ch = Chunker::new(params).unwrap();
        b.iter(|| {
            let mut n = 0usize;
            let mut emit = |chunk: &[u8]| -> Result<(), ()> {
                n += chunk.len();
                Ok(())
            };
            for piece in data.chunks(MIB) {
                ch.push(black_box(piece), &mut emit).unwrap();
            }
            ch.finish(&mut emit).unwrap();
            black_box(n)
        });
    });
    // One push of the whole buffer: the no-copy fast path.
    g.bench_function("fastcdc_push_whole_64MiB", |b| {
        let mut ch = Chunker::new(params).unwrap();
        b.iter(|| {
            let mut chunks = 0usize;
            let mut emit = |_: &[u8]| -> Result<(), ()> {
                chunks += 1;
                Ok(())
            };
            ch.push(black_box(&data), &mut emit).unwrap();
            ch.finish(&mut emit).unwrap();
            black_box(chunks)
        });
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = mixed_bytes(16 * MIB);
    let mut g = c.benchmark_group("blake3");
    short(&mut g);
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("chunk_id_1MiB", |b| {
        let mut chunks = data.chunks(MIB).cycle();
        b.iter(|| ChunkId::of(black_box(chunks.next().unwrap())));
    });
    // The file hash of ingest: an incremental hasher fed 1 MiB reads.
    g.bench_function("hasher_update_1MiB", |b| {
        let mut h = blake3::Hasher::new();
        let mut chunks = data.chunks(MIB).cycle();
        b.iter(|| {
            h.update(black_box(chunks.next().unwrap()));
        });
        black_box(h.finalize());
    });
    g.finish();
}

fn codec_bench(c: &mut Criterion) {
    let text = text_bytes(MIB, 7);
    let structured = structured_bytes(MIB, 8);
    let random = random_bytes(MIB, 9);
    let mut g = c.benchmark_group("codec");
    short(&mut g);
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, data) in [
        ("text", &text),
        ("structured", &structured),
        ("random", &random),
    ] {
        let mut enc = Encoder::new(3).unwrap();
        let mut out = Vec::new();
        let codec = enc.encode(data, &mut out).unwrap();
        eprintln!(
            "codec/{name}: zstd -3 stores 1 MiB as {:?}, {} bytes",
            codec,
            if codec == Codec::Raw {
                data.len()
            } else {
                out.len()
            }
        );
        g.bench_function(format!("encode_zstd3_{name}_1MiB"), |b| {
            b.iter(|| enc.encode(black_box(data), &mut out).unwrap());
        });
        let mut stored = Vec::new();
        let codec = codec::encode(data, 3, &mut stored).unwrap();
        g.bench_function(format!("decode_{name}_1MiB"), |b| {
            b.iter(|| {
                codec::decode(codec, black_box(&stored), data.len(), &|| "bench".into()).unwrap()
            });
        });
    }
    g.finish();
}

fn pack(c: &mut Criterion) {
    // 16 MiB of stored chunks of 256 KiB .. 1.75 MiB, as the packer receives them.
    let data = mixed_bytes(16 * MIB);
    let mut r = Rng::new(3);
    let mut chunks: Vec<(ChunkId, &[u8])> = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let n = ((256 * 1024) * (1 + (r.next() % 7) as usize)).min(rest.len());
        chunks.push((ChunkId::of(&rest[..n]), &rest[..n]));
        rest = &rest[n..];
    }
    let mut g = c.benchmark_group("pack");
    short(&mut g);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("builder_add_finish_16MiB", |b| {
        b.iter(|| {
            let mut pb = PackBuilder::new();
            for (id, bytes) in &chunks {
                pb.add(*id, Codec::Raw, bytes.len(), bytes);
            }
            let (id, bytes, entries) = pb.finish();
            black_box((id, bytes.len(), entries.len()))
        });
    });
    g.finish();
}

fn entries_for(pack: u64, n: usize) -> Vec<PackEntry> {
    (0..n as u64)
        .map(|i| {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&pack.to_le_bytes());
            key[8..].copy_from_slice(&i.to_le_bytes());
            PackEntry {
                chunk: ChunkId::of(&key),
                codec: Codec::Zstd,
                raw_len: 1 << 20,
                stored_len: 300_000,
                offset: 8 + i * 300_000,
            }
        })
        .collect()
}

fn index(c: &mut Criterion) {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("index");
    short(&mut g);

    // insert_pack of 10,000 fresh entries per iteration into a growing index (one transaction,
    // synchronous=FULL as in the store). Entries are built outside the timed region.
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("insert_pack_10000", |b| {
        let mut idx = Index::open(&dir.path().join("insert.sqlite"), true).unwrap();
        let mut pack = 0u64;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                pack += 1;
                let entries = entries_for(pack, N);
                let id = PackId::of(&pack.to_le_bytes());
                let t = Instant::now();
                idx.insert_pack(&id, 1 << 30, &entries, 0).unwrap();
                total += t.elapsed();
            }
            total
        });
    });

    // Lookups against an index of 100,000 chunks (about 100 GiB of 1 MiB chunks).
    let mut idx = Index::open(&dir.path().join("lookup.sqlite"), true).unwrap();
    let mut known = Vec::new();
    for pack in 0..10u64 {
        let entries = entries_for(pack, N);
        idx.insert_pack(&PackId::of(&pack.to_le_bytes()), 1 << 30, &entries, 0)
            .unwrap();
        known.extend(entries.iter().step_by(10).map(|e| e.chunk));
    }
    let unknown: Vec<ChunkId> = (0..known.len() as u64)
        .map(|i| ChunkId::of(&(u64::MAX - i).to_le_bytes()))
        .collect();
    g.throughput(Throughput::Elements(known.len() as u64));
    g.bench_function("has_chunk_hit_x10000", |b| {
        b.iter(|| {
            for id in &known {
                assert!(idx.has_chunk(black_box(id)).unwrap());
            }
        });
    });
    g.bench_function("has_chunk_miss_x10000", |b| {
        b.iter(|| {
            for id in &unknown {
                assert!(!idx.has_chunk(black_box(id)).unwrap());
            }
        });
    });
    g.bench_function("chunk_location_x10000", |b| {
        b.iter(|| {
            for id in &known {
                black_box(idx.chunk(black_box(id)).unwrap().unwrap());
            }
        });
    });
    g.finish();
}

criterion_group!(benches, chunker, hashing, codec_bench, pack, index);
criterion_main!(benches);
