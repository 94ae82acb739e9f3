//! The engine's one error type.
//!
//! Rules:
//! - Every variant says *what* failed (a path, a key, a run) so a message is actionable without a
//!   backtrace; frontends map variants to exit codes or errnos and never parse messages.
//! - Corruption of stored data is a value (`Corrupt`, `MissingObject`), never a panic and never
//!   wrong bytes handed to a caller.
//! - `Backend` says whether retrying could help, so tiering and the CLI can decide.
//! - Programming errors (broken invariants) are `Internal`; they should never reach a user.
//! - The file-system view ([`crate::vfs`]) needs POSIX-shaped refusals (`ReadOnly`, `Busy`,
//!   `NotEmpty`, …); each says which object and why, and the FUSE frontend maps each variant to
//!   exactly one errno.

use std::path::PathBuf;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A local file-system operation failed. The system's reason is part of the message and
    /// not also a `source`: printed with its causes (`{:#}`), the message would repeat it.
    #[error("{op} {path}: {err}")]
    Io {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    /// Stored bytes do not match what the index or their own framing says they are.
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// An object the index refers to is not in the object store.
    #[error("missing object {key} in {backend}")]
    MissingObject { key: String, backend: String },
    /// The object-store backend failed.
    #[error("backend {backend}: {op} {key}: {message}")]
    Backend {
        backend: String,
        op: &'static str,
        key: String,
        retryable: bool,
        message: String,
    },
    /// The SQLite index failed or is unreadable.
    #[error("index {path}: {message}")]
    Index { path: PathBuf, message: String },
    /// A name, path, option or value given by the caller is not acceptable.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The thing to create exists already (e.g. a run name that is sealed).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The store is owned by another process.
    #[error("store {path} is in use by another process ({holder})")]
    Locked { path: PathBuf, holder: String },
    /// The directory is not an artifactfs store (or not one this version understands).
    #[error("{path} is not an artifactfs store: {reason}")]
    NotAStore { path: PathBuf, reason: String },
    /// An operation is not allowed in the object's current state (e.g. writing a sealed run).
    #[error("{0}")]
    State(String),
    /// A broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
    /// The object is immutable (a sealed run, the control directory).
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// The operation is refused for this object whatever its permissions (e.g. a file in a
    /// namespace directory, an xattr change on a sealed run).
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// The object is in use (e.g. sealing a run with files still open).
    #[error("busy: {0}")]
    Busy(String),
    /// A directory that must be empty is not.
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    /// A directory was expected.
    #[error("not a directory: {0}")]
    NotDir(String),
    /// A non-directory was expected.
    #[error("is a directory: {0}")]
    IsDir(String),
    /// A name component is longer than `names::NAME_MAX` bytes.
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// An extended attribute that is not set.
    #[error("no such attribute: {0}")]
    NoAttr(String),
    /// The operation is not supported here (e.g. a `trusted.*` xattr).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A rename or link across runs.
    #[error("cross-run link or rename: {0}")]
    CrossRun(String),
    /// Whoever asked for the work went away before it was done; nothing was committed.
    #[error("cancelled: {0}")]
    Cancelled(String),
}

impl Error {
    /// An I/O error on `path` during `op`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            err: source,
        }
    }

    /// A caller-supplied value that is refused.
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Stored data that fails a check.
    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// True when the error means stored data is damaged or missing.
    pub fn is_damage(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::MissingObject { .. })
    }

    /// True when the store's disk (or a quota on it) refused a write: ENOSPC or EDQUOT, from a
    /// pack, a staging file or the index. Nothing was lost; the work can be retried once there
    /// is room.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { err, .. } if io_disk_full(err))
    }

    /// An ENOSPC error of `op` on `path`, for a full disk seen other than as a failed system
    /// call (SQLite's SQLITE_FULL, too little free space measured).
    pub(crate) fn disk_full(op: &'static str, path: impl Into<PathBuf>) -> Self {
        Error::Io {
            op,
            path: path.into(),
            err: std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        }
    }
}

/// Whether an I/O error says the disk (or a quota on it) is full: ENOSPC or EDQUOT.
pub fn io_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT)
    )
}
