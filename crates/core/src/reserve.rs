//! Room kept for deletions on a full disk (ADR 0023).
//!
//! Removing a file, a directory or a run commits a small index transaction, and SQLite needs
//! new pages in its WAL to commit anything: on a disk that is full, the very deletions that
//! would free space fail. The store therefore keeps `STORE/reserve`, [`RESERVE_BYTES`] of
//! allocated space. A deletion whose commit fails for lack of space releases it and tries once
//! more ([`crate::Store::freeing`]); the reserve is made again once the disk has room for it
//! three times over (at open, and on the mount's and server's periodic tick).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The size of `STORE/reserve`.
pub const RESERVE_BYTES: u64 = 8 << 20;

pub(crate) struct Reserve {
    path: PathBuf,
    /// Whether the reserve file is in place (whole).
    held: AtomicBool,
    /// One maker or releaser at a time.
    busy: Mutex<()>,
}

impl Reserve {
    pub(crate) fn new(root: &Path) -> Reserve {
        let path = root.join("reserve");
        let held = fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES);
        Reserve {
            path,
            held: AtomicBool::new(held),
            busy: Mutex::new(()),
        }
    }

    /// Makes the reserve if it is missing and the disk has room for it three times over.
    /// Never fails: a disk without that room is left alone (and logged at debug level).
    pub(crate) fn ensure(&self) {
        if self.held.load(Ordering::Acquire) {
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if self.held.load(Ordering::Acquire) {
            return;
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let free = match free_bytes(dir) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(dir = %dir.display(), "cannot read free space: {e}");
                return;
            }
        };
        if free < 3 * RESERVE_BYTES {
            tracing::debug!(free, "no room for the store's reserve yet");
            return;
        }
        match self.make() {
            Ok(()) => {
                self.held.store(true, Ordering::Release);
                tracing::debug!(path = %self.path.display(), "reserve in place");
            }
            Err(e) => {
                let _ = fs::remove_file(&self.path);
                tracing::warn!(path = %self.path.display(), "cannot make the store's reserve: {e}");
            }
        }
    }

    fn make(&self) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)?;
        // Allocated, not sparse: a sparse file would give nothing back when removed.
        let len = RESERVE_BYTES as nix::libc::off_t;
        if nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len).is_err() {
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..RESERVE_BYTES >> 20 {
                f.write_all(&zeros)?;
            }
        }
        f.sync_all()
    }

    /// Removes the reserve; true when there was one to give back.
    pub(crate) fn release(&self) -> bool {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !self.held.swap(false, Ordering::AcqRel) {
            return false;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot remove the store's reserve: {e}");
                false
            }
        }
    }

    /// Whether the reserve is in place (not given back).
    pub(crate) fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

/// The bytes an unprivileged writer may still use on the file system of `dir`.
pub(crate) fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() * s.fragment_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_made_given_back_once_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reserve::new(dir.path());
        assert!(!r.held());
        r.ensure();
        assert!(r.held());
        let path = dir.path().join("reserve");
        assert_eq!(fs::metadata(&path).unwrap().len(), RESERVE_BYTES);
        // A file of that size found at open counts as the reserve.
        assert!(Reserve::new(dir.path()).held());
        assert!(r.release());
        assert!(!path.exists());
        assert!(!r.release(), "given back once");
        r.ensure();
        assert!(r.held() && path.exists());
    }
}
