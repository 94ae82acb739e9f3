//! artifactfs-core: the engine of artifactfs, a content-addressed store for run artifacts.
//!
//! Bytes are split by FastCDC ([`chunker`]), named by BLAKE3 ([`id`]), compressed by zstd
//! ([`codec`]), deduplicated across all runs, appended to pack files ([`pack`]) kept in an
//! object store ([`objstore`]), and indexed in SQLite ([`index`]). A sealed run is an immutable,
//! content-addressed [`manifest`]. [`store::Store`] ties these together and is what frontends
//! (the CLI, the FUSE mount, the HTTP server) call; they never touch SQLite or packs themselves.
//!
//! This crate knows nothing of FUSE, HTTP, S3 or command lines.

pub mod chunker;
pub mod clock;
pub mod codec;
pub mod error;
pub mod export;
pub mod fetch;
pub mod gc;
pub mod id;
pub mod index;
pub mod index_tier;
pub mod ingest;
pub mod manifest;
pub mod names;
pub mod objstore;
pub mod pack;
pub mod readiness;
pub mod rebuild;
pub mod reserve;
pub mod retention;
pub mod store;
pub mod stream;
pub mod tier;
pub mod verify;
pub mod vfs;
pub mod writer;

pub use error::{Error, Result};
pub use names::RunRef;
pub use store::{InitOptions, NoProgress, Progress, RunDetails, Store};
