//! Whether a store can take work now: what a frontend's readiness probe asks the engine. It
//! changes nothing stored.

use crate::error::{Error, Result};
use crate::reserve::RESERVE_BYTES;
use crate::store::Store;

/// The object key a readiness probe asks the object store about (it need not exist).
const PROBE_KEY: &str = "readiness-probe";

impl Store {
    /// Checks that the index takes a write transaction (not locked out, not read-only), that
    /// the object store answers a metadata request, and that the store's disk has room for
    /// work: at least [`RESERVE_BYTES`] free (a full disk is ENOSPC, ADR 0023).
    pub fn check_ready(&self) -> Result<()> {
        self.index().meta_write(|_| Ok(()))?;
        self.objects().head(PROBE_KEY)?;
        let space = self.disk_space()?;
        if space.free_bytes < RESERVE_BYTES {
            return Err(Error::disk_full(
                "find room (under 8 MiB free) on the disk of",
                self.root(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{InitOptions, Store};

    #[test]
    fn a_fresh_store_is_ready_and_stays_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s"), &InitOptions::default()).unwrap();
        let before = (store.stats().unwrap(), store.events(0, 1000).unwrap());
        store.check_ready().unwrap();
        store.check_ready().unwrap();
        assert_eq!(
            (store.stats().unwrap(), store.events(0, 1000).unwrap()),
            before
        );
    }
}
