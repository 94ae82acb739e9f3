//! Wiring the remote tier: the binary is the only place that turns a store's `[tier]` table
//! (`backend = "s3://BUCKET/PREFIX"`) into an `S3Store` and hands it to the engine as an
//! `Arc<dyn ObjectStore>`. Endpoint, region and credentials come from the standard AWS sources
//! (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, profiles, …).
//!
//! Opening a tiered store makes one cheap authenticated request. Rejected credentials or a
//! missing bucket stop the command with an error naming the endpoint and bucket; an endpoint
//! that cannot be reached only warns, so that ingest and reads of local data go on while
//! uploads stay pending.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use artifactfs_core::objstore::ObjectStore;
use artifactfs_core::tier::TierConfig;
use artifactfs_core::{Error, Store};
use artifactfs_s3::{S3Config, S3Store};

/// The S3 configuration for a tier's backend URL and storage class.
fn s3_config(t: &TierConfig) -> Result<S3Config> {
    let mut c = S3Config::from_url(&t.backend)?;
    if t.storage_class != "STANDARD" {
        c.storage_class = Some(t.storage_class.clone());
    }
    Ok(c)
}

/// Connects to a tier's bucket. `strict`: any failure of the check is an error (init,
/// rebuild); otherwise an unreachable endpoint is a warning.
pub fn connect(t: &TierConfig, strict: bool) -> Result<Arc<dyn ObjectStore>> {
    let s3 = S3Store::connect(s3_config(t)?)?;
    match s3.check() {
        Ok(()) => {}
        Err(
            e @ Error::Backend {
                retryable: true, ..
            },
        ) if !strict => {
            tracing::warn!(
                error = %e,
                "the remote tier is unreachable: local data only, uploads stay pending"
            );
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot use the remote tier {} (check the endpoint, the credentials and the bucket)",
                t.backend
            )));
        }
    }
    Ok(Arc::new(s3))
}

/// Opens the store at `dir`, with its remote tier when it has one.
pub fn open_store(dir: &Path) -> Result<Store> {
    let ctx = || format!("cannot open store {}", dir.display());
    let config = Store::config_at(dir).with_context(ctx)?;
    match &config.tier {
        None => Store::open_with_clock(dir, crate::cli::clock()).with_context(ctx),
        Some(t) => {
            let remote = connect(t, false).with_context(ctx)?;
            Store::open_tiered_with_clock(dir, remote, crate::cli::clock()).with_context(ctx)
        }
    }
}

/// `init --backend`: checks the bucket, then creates the store.
pub fn init(dir: &Path, opts: &artifactfs_core::InitOptions) -> Result<Store> {
    let t = opts.tier.as_ref().context("no tier")?;
    let remote = connect(t, true)?;
    Store::init_tiered(dir, opts, remote)
        .with_context(|| format!("cannot initialise store {}", dir.display()))
}

/// `index rebuild [--from URL]`.
pub fn rebuild(
    dir: &Path,
    from: Option<&str>,
) -> Result<(Store, artifactfs_core::rebuild::RebuildReport)> {
    match from {
        Some(url) => {
            if !crate::cli::is_empty_or_missing(dir) {
                anyhow::bail!(Error::invalid(
                    "store directory",
                    format!(
                        "{} is not empty: rebuild --from makes a new store (use `index rebuild` without --from to rebuild this one)",
                        dir.display()
                    )
                ));
            }
            let t = TierConfig::new(url);
            let remote = connect(&t, true)?;
            Store::init_from_remote(dir, remote, t)
                .with_context(|| format!("cannot rebuild a store in {} from {url}", dir.display()))
        }
        None => {
            let config = Store::config_at(dir)?;
            let remote = match &config.tier {
                Some(t) => Some(connect(t, false)?),
                None => None,
            };
            Store::rebuild_index(dir, remote)
                .with_context(|| format!("cannot rebuild the index of {}", dir.display()))
        }
    }
}
