//! `artifactfs mount` and `umount`: wiring the store, the engine's file-system view and the FUSE
//! frontend together, detaching, and unmounting cleanly on SIGINT or SIGTERM.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use artifactfs_core::vfs::{Vfs, VfsOptions};
use artifactfs_core::{Error, InitOptions, Store};
use nix::sys::signal::{SigSet, Signal};

/// How long an unmounting mount waits for commands from its control socket to finish.
const COMMAND_GRACE: Duration = Duration::from_secs(30);

/// What `mount` was asked.
pub struct MountArgs {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub seal_after: Duration,
    pub seal_marker: Option<String>,
    /// Other users may use the mount (FUSE `allow_other`).
    pub allow_other: bool,
    /// Publish the store's events to this NATS server.
    pub nats: Option<String>,
    /// Also serve the HTTP API on this address.
    pub serve: Option<String>,
    pub verbose: u8,
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\\040` for a space, …).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The source (`fsname`) of the FUSE mount at `dir`, if `dir` is a FUSE mount point now.
/// `dir` may be relative or go through links (see [`mount_table_path`]).
fn fuse_mount_source(dir: &Path) -> Option<String> {
    let dir = mount_table_path(dir);
    let dir = dir.as_path();
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let point = l.split(' ').nth(4).map(unescape);
        // After the separator: fstype, source, super options.
        let mut tail = l.split(" - ").nth(1)?.split(' ');
        let fstype = tail.next()?;
        let source = tail.next().map(unescape).unwrap_or_default();
        (point.as_deref().map(Path::new) == Some(dir) && fstype.starts_with("fuse"))
            .then_some(source)
    })
}

/// Whether `dir` is a FUSE mount point now.
pub fn is_mounted(dir: &Path) -> bool {
    fuse_mount_source(dir).is_some()
}

/// The `fsname` a mount of `store` shows: the store's absolute path, so that `mount` and
/// `umount` can tell which store is mounted where. Paths the kernel's option syntax cannot
/// carry (commas, white space, backslashes) fall back to `artifactfs`.
fn fsname_for(store: &Path) -> String {
    match store.canonicalize() {
        Ok(p) => {
            let s = p.to_string_lossy();
            if s.chars()
                .any(|c| c == ',' || c == '\\' || c.is_whitespace())
            {
                "artifactfs".into()
            } else {
                s.into_owned()
            }
        }
        Err(_) => "artifactfs".into(),
    }
}

fn canonical_mountpoint(p: &Path) -> Result<PathBuf> {
    let c = p
        .canonicalize()
        .map_err(|e| Error::io("resolve mount point", p, e))?;
    if !c.is_dir() {
        bail!(Error::invalid(
            "mount point",
            format!("{} is not a directory", c.display())
        ));
    }
    Ok(c)
}

/// Opens (or creates) the store to be mounted. A store owned by a mount, server or watcher is
/// refused with a message that says so (exit status 5); one held by a command is waited for
/// (`--lock-wait`, see [`crate::cli::open_or_reach`]).
pub fn open_for_mount(dir: &Path, verb: &str) -> Result<Store> {
    if crate::cli::is_empty_or_missing(dir) {
        drop(
            Store::init(dir, &InitOptions::default())
                .with_context(|| format!("cannot initialise store {}", dir.display()))?,
        );
    }
    match crate::cli::open_or_reach(dir) {
        Ok(crate::cli::Reached::Here(store)) => Ok(*store),
        Ok(crate::cli::Reached::Owner { locked: e, .. }) | Err(e) => {
            let holder = match e.downcast_ref::<Error>() {
                Some(Error::Locked { holder, .. }) => Some(holder.clone()),
                _ => None,
            };
            Err(match holder {
                Some(holder) => e.context(format!(
                    "cannot {verb} {}: it is already owned by {holder} (a running mount, server \
                     or watch, or another command); stop it first",
                    dir.display()
                )),
                None => e,
            })
        }
    }
}

/// Starts `mount --foreground` as a new session and returns once the mount is ready.
pub fn detach(a: &MountArgs) -> Result<()> {
    let mp = canonical_mountpoint(&a.mountpoint)?;
    // Refuse here, with the real reason, rather than after the child failed.
    drop(open_for_mount(&a.store, "mount")?);
    let log_path = a.store.join("mount.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the artifactfs executable")?;
    let mut cmd = Command::new(exe);
    // Should another command take the store between that check and the child's start, the
    // child waits for it as this process would have.
    let wait = crate::cli::lock_wait();
    cmd.arg("--store")
        .arg(&a.store)
        .arg("--lock-wait")
        .arg(humantime::format_duration(wait).to_string());
    for _ in 0..a.verbose.max(1) {
        cmd.arg("-v");
    }
    cmd.arg("mount")
        .arg(&mp)
        .arg("--foreground")
        .arg("--detached")
        .arg("--seal-after")
        .arg(humantime::format_duration(a.seal_after).to_string());
    if a.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(m) = &a.seal_marker {
        cmd.arg("--seal-marker").arg(m);
    }
    if let Some(url) = &a.nats {
        cmd.arg("--nats").arg(url);
    }
    if let Some(l) = &a.serve {
        cmd.arg("--serve").arg(l);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let mut child = cmd.spawn().context("cannot start the mount process")?;
    let deadline = Instant::now() + Duration::from_secs(60) + wait;
    loop {
        if is_mounted(&mp) {
            // The mount shows before the mount process has set its readahead: set it here too,
            // so that it is in place when this returns.
            artifactfs_fuse::raise_kernel_read_ahead(&mp);
            println!(
                "mounted {} at {} (pid {})",
                a.store.display(),
                mp.display(),
                child.id()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("wait for the mount process")? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "the mount process exited ({status}) before the mount was ready; {} says:\n{}",
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the mount at {} was not ready after {} (see {})",
                mp.display(),
                humantime::format_duration(Duration::from_secs(60) + wait),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Serves the mount until SIGINT or SIGTERM, or until it is unmounted from outside.
pub fn foreground(a: &MountArgs, detached: bool) -> Result<()> {
    if detached {
        let _ = nix::unistd::setsid();
    }
    // Block the signals before any thread starts, so that only the waiting thread sees them.
    let rx = signal_channel()?;

    let mp = canonical_mountpoint(&a.mountpoint)?;
    let owner = Owner::start(
        &a.store,
        VfsOptions {
            seal_after: a.seal_after,
            seal_marker: a.seal_marker.clone(),
            ..VfsOptions::default()
        },
        "mount",
        a.nats.as_deref(),
    )?;
    let vfs = owner.vfs.clone();
    // The HTTP API over the same view, when asked: one engine, both frontends.
    let http = match &a.serve {
        Some(listen) => Some(crate::serve::start_http(&vfs, listen)?),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let session = artifactfs_fuse::spawn_mount(
        vfs.clone(),
        &mp,
        &artifactfs_fuse::MountOptions {
            fsname: fsname_for(&a.store),
            allow_other: a.allow_other,
            ..artifactfs_fuse::MountOptions::default()
        },
        stop.clone(),
    )
    .with_context(|| format!("cannot mount at {}", mp.display()))?;
    tracing::info!(
        store = %a.store.display(), mountpoint = %mp.display(), seal_after = ?a.seal_after,
        "mounted; until unmount, other artifactfs commands on this store go through its control socket"
    );
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(sig) => {
                tracing::info!(signal = ?sig, "unmounting");
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if session.guard.is_finished() {
                    tracing::info!("unmounted from outside");
                    stop.store(true, Ordering::Relaxed);
                    if let Some(h) = http {
                        h.shutdown(COMMAND_GRACE);
                    }
                    owner.stop();
                    return session
                        .join()
                        .context("the file system ended with an error");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Err(e) = session.umount_and_join() {
        tracing::warn!("unmount failed ({e}); detaching the mount lazily");
        let _ = Command::new("fusermount3").arg("-uz").arg(&mp).status();
    }
    if let Some(h) = http {
        h.shutdown(COMMAND_GRACE);
    }
    owner.stop();
    Ok(())
}

/// What a process that owns a store runs besides its frontends: the engine's view (shared by
/// the frontends and the control socket), the control socket, and a tiered store's uploader.
/// `mount` and `serve` both start one.
pub struct Owner {
    pub vfs: Arc<Vfs>,
    control: Option<crate::control::Server>,
    uploader: Option<artifactfs_core::tier::Uploader>,
    publisher: Option<artifactfs_nats::Publisher>,
}

impl Owner {
    /// Opens (or creates) the store, takes its lock and starts the control socket, and with
    /// `nats` the event publisher. `verb` names the owner in messages.
    pub fn start(
        store_dir: &Path,
        opts: VfsOptions,
        verb: &str,
        nats: Option<&str>,
    ) -> Result<Self> {
        let store = open_for_mount(store_dir, verb)?;
        // A tiered store uploads in the background while owned; stopped in `stop`.
        let uploader = store
            .tier()
            .map(|t| t.start_uploader(Duration::from_secs(30)));
        if let Some(m) = &opts.seal_marker {
            artifactfs_core::names::validate_component("seal marker", m, true)?;
        }
        let vfs = Arc::new(Vfs::new(store, opts)?);
        let publisher = nats.map(|url| start_publisher(&vfs, url)).transpose()?;
        // Listen before the frontends are ready: whoever sees them may send commands at once.
        // A socket that cannot be bound (e.g. a store path longer than a socket address
        // allows) costs only that: the frontends work, other commands report the store in use.
        let control = match crate::control::Server::start(store_dir, vfs.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("{e:#}; other commands on this store will report it in use");
                None
            }
        };
        Ok(Self {
            vfs,
            control,
            uploader,
            publisher,
        })
    }

    /// Stops the control socket (waiting for running commands) and the uploader.
    pub fn stop(self) {
        if let Some(c) = self.control {
            c.shutdown(COMMAND_GRACE);
        }
        if let Some(u) = self.uploader {
            u.stop();
        }
        if let Some(p) = self.publisher {
            p.shutdown();
        }
    }
}

/// Starts publishing the store's events to the NATS server at `url` (ADR 0012). An
/// unreachable server is retried in the background; only invalid options fail here.
fn start_publisher(vfs: &Arc<Vfs>, url: &str) -> Result<artifactfs_nats::Publisher> {
    let store = vfs.store();
    let events = vfs.clone();
    artifactfs_nats::Publisher::spawn(
        store.root(),
        &store.config().store_id,
        move |after, limit| events.store().events(after, limit),
        artifactfs_nats::NatsOptions {
            url: url.to_owned(),
            ..artifactfs_nats::NatsOptions::default()
        },
    )
    .with_context(|| format!("cannot publish events to {url}"))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts later) and
/// returns a channel that receives the first of them, from a thread of its own.
pub fn signal_channel() -> Result<std::sync::mpsc::Receiver<Signal>> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("cannot block signals")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("afs-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = tx.send(sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(rx)
}

/// How long `umount` waits for the mount process to let go of its store.
const UMOUNT_WAIT: Duration = Duration::from_secs(90);

/// `umount`: asks fusermount3 to unmount, then waits until the mount process has released its
/// store (finished the commands it was serving and closed the index). Without the wait, a new
/// mount of the same store or mount point right after `umount` could race the old process.
pub fn umount(mp: &Path) -> Result<()> {
    let store = fuse_mount_source(mp)
        .map(PathBuf::from)
        .filter(|s| s.is_absolute() && s.join("lock").is_file());
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(mp)
        .output()
        .context("cannot run fusermount3 (install fuse3)")?;
    if !out.status.success() {
        bail!(
            "fusermount3 -u {} failed: {}",
            mp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if let Some(store) = store {
        wait_released(&store)?;
    }
    Ok(())
}

/// `mp` as the mount table shows it: absolute, with the links of its parent resolved. The
/// mount point itself is not resolved: that would ask the mount, which may be gone already.
fn mount_table_path(mp: &Path) -> PathBuf {
    let Ok(abs) = std::path::absolute(mp) else {
        return mp.to_path_buf();
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map_or_else(|_| abs.clone(), |p| p.join(name)),
        _ => abs,
    }
}

/// Waits until nobody holds `STORE/lock`.
fn wait_released(store: &Path) -> Result<()> {
    let path = store.join("lock");
    let f =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let deadline = Instant::now() + UMOUNT_WAIT;
    loop {
        match f.try_lock_shared() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "unmounted, but the mount process still holds {} after {} s",
                store.display(),
                UMOUNT_WAIT.as_secs()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
    }
}
