//! `artifactfs serve`: the HTTP API as the store's owner, without a mount. It owns the store
//! like a mount does (the same [`Owner`]: lock, engine view, control socket, uploader), so
//! other commands on the store keep working through the control socket while it runs, and
//! runs written over HTTP are the view's open runs, exactly as a mount would hold them.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use artifactfs_core::vfs::{Vfs, VfsOptions};
use artifactfs_server::{Handle, ServerOptions};

use crate::mount::{Owner, signal_channel};

/// How long a stopping server gives running requests.
const GRACE: Duration = Duration::from_secs(10);

/// What `serve` was asked.
pub struct ServeArgs {
    pub store: PathBuf,
    pub listen: String,
    /// Seal open runs quiet for this long (none: only on request).
    pub seal_after: Option<Duration>,
    /// Publish the store's events to this NATS server.
    pub nats: Option<String>,
    pub options: ServerOptions,
}

/// Starts the HTTP API over `vfs` (for `serve` and `mount --serve`) and says where it listens
/// on standard output.
pub fn start_http(vfs: &Arc<Vfs>, listen: &str) -> Result<Handle> {
    start_with(vfs, listen, ServerOptions::default())
}

fn start_with(vfs: &Arc<Vfs>, listen: &str, opts: ServerOptions) -> Result<Handle> {
    let h = artifactfs_server::start(vfs.clone(), listen, opts)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{}", h.addr);
    let _ = out.flush();
    Ok(h)
}

/// Serves until SIGINT or SIGTERM.
pub fn serve(a: ServeArgs) -> Result<()> {
    let rx = signal_channel()?;
    let owner = Owner::start(
        &a.store,
        VfsOptions {
            seal_after: a.seal_after.unwrap_or(Duration::MAX),
            ..VfsOptions::default()
        },
        "serve",
        a.nats.as_deref(),
    )?;
    let http = start_with(&owner.vfs, &a.listen, a.options)?;
    let stop = Arc::new(AtomicBool::new(false));
    if a.seal_after.is_some() {
        let (vfs, stop) = (owner.vfs.clone(), stop.clone());
        std::thread::Builder::new()
            .name("afs-seal-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    vfs.tick();
                }
            })
            .context("cannot start the seal ticker")?;
    }
    tracing::info!(store = %a.store.display(), addr = %http.addr, "serving");
    let sig = rx.recv().ok();
    tracing::info!(signal = ?sig, "stopping");
    stop.store(true, Ordering::Relaxed);
    http.shutdown(GRACE);
    owner.stop();
    Ok(())
}
