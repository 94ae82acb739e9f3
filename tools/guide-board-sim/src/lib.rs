//! `guide-board-sim`: a deterministic, seeded generator of realistic guide-board lab-harness run
//! directories, used by integration tests and benchmarks to measure chunking, dedup and
//! compression on data shaped like real run artifacts.
//!
//! This tool owns the shape of that synthetic data: the layout of a run directory, the content
//! of each kind of file, and how run `i + 1` derives from run `i` (large binaries mutated by a
//! few percent with shifting insertions and deletions, append-only logs, fresh metrics and
//! results, static configuration). The same seed and flags give byte-identical trees, names,
//! modes and mtimes, and any run can be generated on its own (`--first-run`) with the same
//! content as when generated after its predecessors.
//!
//! Modules: [`seed`] derives every random stream, [`binary`] generates and evolves the large
//! binaries, [`text`] the logs, metrics, results and static files, [`generate`] lays out and
//! writes runs, and [`produce`] writes the same runs over time, as a lab harness does.

pub mod binary;
pub mod generate;
pub mod produce;
pub mod seed;
pub mod text;
