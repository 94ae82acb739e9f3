//! The control socket (ADR 0010): while a mount owns a store, other `artifactfs` commands on
//! that store reach it over `STORE/control.sock` instead of opening SQLite themselves.
//!
//! A client that finds the store locked connects, reads the owner's hello, sends one request
//! (the parsed [`Command`], its working directory, whether its standard output is a terminal)
//! and then copies what comes back (standard output bytes, standard error bytes) until the
//! exit status arrives. The owner runs the request with the same [`cli::execute`] a local
//! command uses, against its shared engine, one thread per connection.
//!
//! A client sends nothing after its request: the connection turning readable while the
//! command runs means the client went away (killed, interrupted), and the command is told to
//! stop ([`HangupWatch`]): an `ingest` then seals nothing (exit status 12, in the mount's log).
//!
//! Everything on the wire is a frame: one tag byte, a big-endian `u32` length, the payload.
//!
//! | tag | from | payload |
//! |---|---|---|
//! | `H` | owner | hello, JSON `{"proto":1,"version":…,"pid":…}` |
//! | `R` | client | request, JSON `{"command":…,"cwd":…,"tty":…}` |
//! | `O` | owner | bytes for the client's standard output |
//! | `E` | owner | bytes for the client's standard error |
//! | `X` | owner | exit status, one byte; the last frame |
//!
//! Liveness comes from the store's lock, not from the socket: a client only connects when the
//! lock is held, a dead owner's socket refuses connections at once, and a new owner replaces
//! a stale socket file when it starts. The socket file is mode 0600, and the owner also checks
//! the peer's uid (`SO_PEERCRED`): root or the owner's own uid.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use artifactfs_core::vfs::Vfs;
use serde::{Deserialize, Serialize};

use crate::cli::{self, Command, Engine, Io};

/// The socket's name inside the store directory.
pub const SOCKET: &str = "control.sock";
/// Version of the frame protocol and of the request's shape.
const PROTO: u32 = 1;
/// Largest frame accepted.
const MAX_FRAME: usize = 16 << 20;
/// A frame of standard output is sent once this much is buffered.
const OUT_FRAME: usize = 256 << 10;
/// How long a client waits for the owner's hello before calling it hung.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Hello {
    proto: u32,
    version: String,
    pid: u32,
}

#[derive(Serialize, Deserialize)]
struct Request {
    command: Command,
    cwd: PathBuf,
    tty: bool,
}

fn write_frame(mut w: impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::other("frame too large"))?
        .to_be_bytes();
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len);
    w.write_all(&head)?;
    w.write_all(payload)
}

/// The next frame, or `None` at a clean end of stream.
fn read_frame(mut r: impl Read) -> Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context("read from the control socket"),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        bail!("control socket: frame of {len} bytes (at most {MAX_FRAME})");
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .context("read from the control socket")?;
    Ok(Some((head[0], payload)))
}

/// A `Write` that sends what it is given as frames of one tag, buffering up to `cap` bytes.
struct FrameWriter<'a> {
    stream: &'a UnixStream,
    tag: u8,
    cap: usize,
    buf: Vec<u8>,
}

impl<'a> FrameWriter<'a> {
    fn new(stream: &'a UnixStream, tag: u8, cap: usize) -> Self {
        Self {
            stream,
            tag,
            cap,
            buf: Vec::new(),
        }
    }
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.cap {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        for piece in self.buf.chunks(MAX_FRAME) {
            write_frame(self.stream, self.tag, piece)?;
        }
        self.buf.clear();
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Client

/// Connects to the store owner's control socket; `Ok(None)` when nobody listens on it (no
/// socket file, or a dead owner's), as when the store is held by a command such as `ingest`.
pub fn connect(store_dir: &Path) -> std::io::Result<Option<UnixStream>> {
    match UnixStream::connect(socket_path(store_dir)) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The path of the store's control socket, for messages.
pub fn socket_path(store_dir: &Path) -> PathBuf {
    store_dir.join(SOCKET)
}

/// Runs `cmd` in the process that owns the store, over `stream` (from [`connect`]), copying
/// its output here; returns its exit status. `locked` is the error that said the store is
/// owned: it is what the caller gets (exit status 5) when the owner does not answer.
pub fn forward(
    store_dir: &Path,
    stream: UnixStream,
    cmd: &Command,
    locked: anyhow::Error,
) -> Result<u8> {
    let path = socket_path(store_dir);
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .context("set a timeout on the control socket")?;
    let hello = match read_frame(&stream) {
        Ok(Some((b'H', p))) => serde_json::from_slice::<Hello>(&p)
            .context("the owner's hello on the control socket is not understood")?,
        Ok(Some((b'E', p))) => bail!(
            "the store's owner refused the command: {}",
            String::from_utf8_lossy(&p).trim()
        ),
        Ok(_) => bail!("the store's owner closed {} at once", path.display()),
        Err(e) => {
            return Err(locked.context(format!(
                "the owner did not answer on {} within {} s: {e:#}",
                path.display(),
                HELLO_TIMEOUT.as_secs()
            )));
        }
    };
    if hello.proto != PROTO {
        bail!(
            "the mount (pid {}, artifactfs {}) speaks control protocol {}, this command {PROTO}: \
             use the artifactfs binary the mount runs",
            hello.pid,
            hello.version,
            hello.proto
        );
    }
    stream
        .set_read_timeout(None)
        .context("clear the control socket's timeout")?;
    tracing::debug!(pid = hello.pid, "forwarding to the store's owner");
    let req = serde_json::json!({
        "command": cmd,
        "cwd": std::env::current_dir().context("cannot find the current directory")?,
        "tty": std::io::IsTerminal::is_terminal(&std::io::stdout()),
    });
    write_frame(&stream, b'R', &serde_json::to_vec(&req)?)
        .context("send the command to the mount")?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut err = std::io::stderr();
    loop {
        match read_frame(&stream)? {
            Some((b'O', p)) => out
                .write_all(&p)
                .and_then(|()| out.flush())
                .context("write to standard output")?,
            Some((b'E', p)) => {
                let _ = err.write_all(&p);
            }
            Some((b'X', p)) if p.len() == 1 => return Ok(p[0]),
            Some((tag, _)) => bail!("control socket: unexpected frame {:?}", tag as char),
            None => bail!(
                "the mount (pid {}) ended before the command finished (see {})",
                hello.pid,
                store_dir.join("mount.log").display()
            ),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Server

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The listening side, in the process that owns the store.
pub struct Server {
    path: PathBuf,
    /// The socket file's (device, inode), to remove only our own at shutdown.
    file_id: Option<(u64, u64)>,
    active: Arc<(Mutex<usize>, Condvar)>,
}

impl Server {
    /// Binds `STORE/control.sock` (replacing a stale one: the caller owns the store's lock)
    /// and answers commands against `vfs` from background threads.
    pub fn start(store_dir: &Path, vfs: Arc<Vfs>) -> Result<Self> {
        let path = socket_path(store_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(socket = %path.display(), "removed a stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
        let file_id = file_id(&path);
        let active = Arc::new((Mutex::new(0usize), Condvar::new()));
        let counter = active.clone();
        let seq = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("afs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let stream = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("control socket: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let vfs = vfs.clone();
                    let counter = counter.clone();
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    *counter.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    let spawned = std::thread::Builder::new()
                        .name(format!("afs-control-{n}"))
                        .spawn(move || {
                            if let Err(e) = handle(&stream, &vfs) {
                                tracing::warn!("control socket: {e:#}");
                            }
                            let (lock, cv) = &*counter;
                            *lock.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                            cv.notify_all();
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("control socket: cannot start a thread: {e}");
                    }
                }
            })
            .context("cannot start the control socket thread")?;
        tracing::info!(socket = %path.display(), "control socket listening");
        Ok(Self {
            path,
            file_id,
            active,
        })
    }

    /// Stops taking commands (the socket file goes) and waits up to `grace` for running ones.
    pub fn shutdown(self, grace: Duration) {
        // A store deleted and made again under a lazily unmounted mount has a new owner by
        // now, with a socket of its own at the same path: that one stays.
        if self.file_id.is_some() && file_id(&self.path) == self.file_id {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), "cannot remove the control socket: {e}");
            }
        } else {
            tracing::info!(socket = %self.path.display(), "the control socket is no longer ours; left in place");
        }
        let deadline = Instant::now() + grace;
        let (lock, cv) = &*self.active;
        let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    commands = *n,
                    "commands from the control socket still running at exit"
                );
                return;
            }
            n = cv
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Whether a peer of this uid may use the socket: root, or whoever runs the owner.
fn peer_allowed(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn handle(stream: &UnixStream, vfs: &Vfs) -> Result<()> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| anyhow!("cannot read the peer's credentials: {e}"))?;
    if !peer_allowed(cred.uid()) {
        let msg = format!(
            "uid {} may not use this store's control socket (only root and uid {})\n",
            cred.uid(),
            nix::unistd::geteuid()
        );
        // Logged before the answer, so the log says it by the time the client has heard it.
        tracing::warn!(
            "refused a command from uid {} (pid {})",
            cred.uid(),
            cred.pid()
        );
        write_frame(stream, b'E', msg.as_bytes())?;
        return Ok(());
    }
    let hello = Hello {
        proto: PROTO,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    };
    write_frame(stream, b'H', &serde_json::to_vec(&hello)?)?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let req = match read_frame(stream)? {
        Some((b'R', p)) => serde_json::from_slice::<Request>(&p),
        Some((tag, _)) => bail!("expected a request, got frame {:?}", tag as char),
        None => return Ok(()),
    };
    let mut out = FrameWriter::new(stream, b'O', OUT_FRAME);
    let mut err = FrameWriter::new(stream, b'E', 0);
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            writeln!(
                err,
                "artifactfs: error: the mount (artifactfs {}) does not understand this command \
                 ({e}); use the binary the mount runs",
                env!("CARGO_PKG_VERSION")
            )?;
            write_frame(stream, b'X', &[cli::exit_code(&anyhow!("protocol"))])?;
            return Ok(());
        }
    };
    let verb = format!("{:?}", req.command);
    tracing::info!(pid = cred.pid(), uid = cred.uid(), command = %verb, "command from the control socket");
    let started = Instant::now();
    let gone = HangupWatch::start(stream)?;
    let code = {
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            cwd: req.cwd,
            tty: req.tty,
            progress: false,
            cancel: Some(gone.flag.clone()),
        };
        let engine = Engine {
            store: vfs.store(),
            vfs: Some(vfs),
        };
        match cli::execute(req.command, &engine, &mut io) {
            Ok(code) => code,
            Err(e) => {
                let _ = writeln!(io.err, "artifactfs: error: {e:#}");
                cli::exit_code(&e)
            }
        }
    };
    let client_gone = gone.flag.load(Ordering::Relaxed);
    drop(gone);
    // What the command changed must be visible in the mount before the caller goes on.
    vfs.store_changed();
    let ms = started.elapsed().as_millis() as u64;
    if client_gone {
        tracing::warn!(command = %verb, code, ms, "command done; its client had gone away");
        return Ok(());
    }
    tracing::info!(command = %verb, code, ms, "command done");
    out.flush()?;
    err.flush()?;
    write_frame(stream, b'X', &[code])?;
    Ok(())
}

/// Watches a connection while its command runs: a client sends nothing after its request, so
/// the socket turning readable means it closed (the client was killed or interrupted). The
/// flag then tells the engine to stop work that would commit ([`Progress::cancelled`]).
///
/// [`Progress::cancelled`]: artifactfs_core::Progress::cancelled
struct HangupWatch {
    flag: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HangupWatch {
    /// How often the watcher looks whether its command has finished.
    const TICK: Duration = Duration::from_millis(100);

    fn start(stream: &UnixStream) -> Result<Self> {
        use std::os::fd::AsFd;
        let watched = stream
            .try_clone()
            .context("clone the control connection to watch it")?;
        let flag = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (f, d) = (flag.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("control-hangup".into())
            .spawn(move || {
                use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
                let tick = PollTimeout::from(Self::TICK.as_millis() as u16);
                while !d.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(watched.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, tick) {
                        Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                        Ok(_) => {
                            tracing::warn!(
                                "the client closed the control connection: stopping its command"
                            );
                            f.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("cannot watch the control connection: {e}");
                            return;
                        }
                    }
                }
            })
            .context("start the control connection's watcher")?;
        Ok(Self {
            flag,
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for HangupWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
