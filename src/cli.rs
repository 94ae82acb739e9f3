//! Command-line verbs. Each verb validates its arguments and makes one engine call; printing
//! lives in `output`.
//!
//! Verbs that work on an existing store ("engine verbs") are functions of an [`Engine`] (the
//! store, and the mount's file-system view when a mount runs them) and an [`Io`] (where output
//! goes, the caller's working directory, whether its standard output is a terminal), and they
//! are all reached through one dispatch point, [`execute`]. The same `execute` runs them in this
//! process when the store is free, and in the mount process when a mount owns the store: the
//! command is then forwarded over the store's control socket (`control`). A new verb is a new
//! [`Command`] variant, an arm in `execute` and its body; forwarding needs nothing more.
//! The few verbs that never reach a store through its owner (`init`, `mount`, `umount`,
//! `serve`) are
//! handled in [`run`] before that.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use artifactfs_core::chunker::ChunkerParams;
use artifactfs_core::vfs::{self, Vfs};
use artifactfs_core::{Error, InitOptions, RunRef, Store};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::output::{self, Bar};

/// Exit status of a run that found damaged or missing data (`verify`).
pub const EXIT_DAMAGE: u8 = 4;
/// Exit status when the store is owned by another process that cannot take the command.
pub const EXIT_LOCKED: u8 = 5;
/// Exit status of a refusal because something is in use (`seal` with files still open).
pub const EXIT_BUSY: u8 = 9;
/// Exit status of a change the retention rules refuse (shortening a retention).
pub const EXIT_REFUSED: u8 = 10;
/// Exit status when the store's disk is full: nothing stored was lost, retry with room.
pub const EXIT_DISK_FULL: u8 = 11;
/// Exit status of work stopped because its caller went away: nothing was committed.
pub const EXIT_CANCELLED: u8 = 12;

#[derive(Parser, Debug)]
#[command(
    name = "artifactfs",
    version,
    about = "A content-addressed store for run artifacts"
)]
struct Cli {
    /// The store directory [default: $XDG_DATA_HOME/artifactfs or ~/.local/share/artifactfs]
    #[arg(long, global = true, env = "ARTIFACTFS_STORE", value_name = "DIR")]
    store: Option<PathBuf>,

    /// More log output (-v info, -vv debug); ARTIFACTFS_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// How long to wait for a store another command (ingest, gc, …) holds before giving up
    /// with exit status 5; 0 gives up at once. A running mount, server or watch is not waited
    /// for: commands reach it over its control socket.
    #[arg(
        long,
        global = true,
        env = "ARTIFACTFS_LOCK_WAIT",
        value_name = "DURATION",
        default_value = "2m",
        value_parser = humantime::parse_duration
    )]
    lock_wait: Duration,

    #[command(subcommand)]
    command: Command,
}

/// A verb and its arguments, as parsed. It is also what travels over the control socket, so
/// everything here must (de)serialise; paths stay as given and are resolved with [`Io::path`].
#[derive(Subcommand, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Create a new, empty store.
    Init {
        /// Smallest chunk, bytes (suffixes KiB, MiB accepted).
        #[arg(long, value_parser = parse_size)]
        chunk_min: Option<u64>,
        /// Average chunk size.
        #[arg(long, value_parser = parse_size)]
        chunk_avg: Option<u64>,
        /// Largest chunk.
        #[arg(long, value_parser = parse_size)]
        chunk_max: Option<u64>,
        /// zstd level for chunks (0 = no compression) [default: 2].
        #[arg(long)]
        compression_level: Option<i32>,
        /// Target size of pack files.
        #[arg(long, value_parser = parse_size)]
        pack_size: Option<u64>,
        /// Retention of new runs that get none from their namespace (e.g. 90d, forever).
        #[arg(long, value_name = "DURATION")]
        default_retention: Option<String>,
        /// Tier packs and manifests out to this bucket (s3://BUCKET[/PREFIX]); the local
        /// store becomes a cache. Endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …
        #[arg(long, value_name = "URL")]
        backend: Option<String>,
        /// Storage class of uploads (with --backend).
        #[arg(long, default_value = "STANDARD", requires = "backend")]
        storage_class: String,
        /// Bound of the local cache of a tiered store (with --backend).
        #[arg(long, value_parser = parse_size, requires = "backend")]
        cache_size: Option<u64>,
    },
    /// The remote tier: upload what is pending, show where bytes are.
    Tier {
        #[command(subcommand)]
        command: TierCommand,
    },
    /// The SQLite index.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Ingest a directory as one run and seal it.
    Ingest {
        /// The directory to ingest.
        src: PathBuf,
        /// NAMESPACE/RUN
        run: String,
        /// Producer metadata carried in the manifest (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List runs.
    Runs {
        namespace: Option<String>,
        /// Only the runs the next gc deletes (sealed, retain-until passed, no holds).
        #[arg(long, conflicts_with = "deleted")]
        expired: bool,
        /// Only deleted runs (the tombstones gc leaves for audit).
        #[arg(long)]
        deleted: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show or set a run's retention, or a namespace's default for its new runs.
    ///
    /// VALUE is a duration from the seal (90d, 12h, 2w, 1y), an RFC 3339 date, or forever.
    /// A run's retention may only be extended; --override --reason shortens it, recorded.
    Retain {
        /// NAMESPACE/RUN, or NAMESPACE for the namespace default
        target: String,
        #[arg(allow_hyphen_values = true)]
        value: Option<String>,
        /// Accept a shorter retention (operator override; needs --reason).
        #[arg(long = "override")]
        override_: bool,
        #[arg(long, requires = "override_")]
        reason: Option<String>,
        /// Remove a namespace's default retention.
        #[arg(long, conflicts_with = "value")]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
    /// Place, remove or list named holds on a run.
    Hold {
        #[command(subcommand)]
        cmd: crate::lifecycle::HoldCommand,
    },
    /// Delete expired runs and reclaim the space nothing references any more.
    Gc {
        /// Report what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced chunks written less than this long ago.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Rewrite packs whose live bytes are below this fraction of their size.
        #[arg(long, default_value_t = 0.5)]
        compact_below: f64,
        #[arg(long)]
        json: bool,
    },
    /// List a sealed run's directory, or show one entry.
    Ls {
        /// NAMESPACE/RUN[/PATH]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a file of a sealed run to standard output.
    Cat {
        /// NAMESPACE/RUN/PATH
        path: String,
    },
    /// Recreate a sealed run in a directory, bit-exact.
    Export {
        /// NAMESPACE/RUN
        run: String,
        /// Destination directory (must not exist, or be empty).
        dest: PathBuf,
    },
    /// Show a sealed run's manifest (--json prints its canonical bytes).
    Manifest {
        /// NAMESPACE/RUN
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Seal an open run now (one written through a mount); prints its manifest digest.
    ///
    /// Through a running mount this is the same as `setfattr -n user.artifactfs.seal -v 1`;
    /// it fails with status 9 while files of the run are open. Without a mount it seals a run
    /// that an earlier mount left open.
    Seal {
        /// NAMESPACE/RUN
        run: String,
    },
    /// Re-read and re-hash everything a run (or every run) depends on.
    Verify {
        /// NAMESPACE/RUN (default: all runs)
        run: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Store-wide counts and sizes.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Serve the store as a file system at MOUNTPOINT (NAMESPACE/RUN/… directories).
    ///
    /// The mount owns the store; other commands on it are forwarded to the mount over
    /// STORE/control.sock until it is unmounted.
    Mount {
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// Stay in the foreground (otherwise detach once the mount is ready).
        #[arg(long)]
        foreground: bool,
        /// Seal an open run once it has had no open file and no write for this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        seal_after: std::time::Duration,
        /// Closing a file of this name in a run's directory seals the run (e.g. _SUCCESS).
        #[arg(long, value_name = "NAME")]
        seal_marker: Option<String>,
        /// Let other users use the mount (FUSE allow_other), with access checked against the
        /// files' modes and owners. A mount by a user other than root needs user_allow_other
        /// in /etc/fuse.conf for this.
        #[arg(long)]
        allow_other: bool,
        /// Publish the store's events to this NATS server (JetStream stream ARTIFACTFS_EVENTS,
        /// subjects artifactfs.events.NS.KIND; docs/events.md).
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
        /// Also serve the HTTP API on ADDR (HOST:PORT), over the same engine as the mount.
        #[arg(long, value_name = "ADDR")]
        serve: Option<String>,
        /// Set by a detaching `mount` for the process it starts: begin a new session.
        #[arg(long, hide = true)]
        detached: bool,
    },
    /// Unmount a mount (fusermount3 -u).
    Umount { mountpoint: PathBuf },
    /// Ingest runs written into a plain directory (no FUSE): each directory is a run.
    ///
    /// Owns the store like a mount (other commands go through STORE/control.sock). Stops on
    /// SIGINT or SIGTERM. See docs/pilot.md and ADR 0013.
    Watch {
        /// The spool directory; each directory in it is NAMESPACE/<dirname>.
        spool: PathBuf,
        /// The runs' namespace [default: the spool directory's name].
        #[arg(long)]
        namespace: Option<String>,
        /// Seal a run once nothing in it has changed for this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        seal_after: std::time::Duration,
        /// A file of this name in a run's directory seals the run (e.g. _SUCCESS).
        #[arg(long, value_name = "NAME")]
        seal_marker: Option<String>,
        /// Remove a run's directory from the spool once it is sealed.
        #[arg(long)]
        remove_after_seal: bool,
    },
    /// Serve the HTTP API (docs/api.md) on ADDR, owning the store as a mount does.
    ///
    /// Other commands on the store are forwarded to the server over STORE/control.sock while
    /// it runs. Logs are JSON lines on standard error.
    Serve {
        /// HOST:PORT to listen on (port 0 picks a free one; the address is printed).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Seal an open run once it has had no open file and no write for this long
        /// (default: only when asked, POST /v1/runs/NS/RUN/seal).
        #[arg(long, value_parser = humantime::parse_duration)]
        seal_after: Option<std::time::Duration>,
        /// Largest JSON request body.
        #[arg(long, value_parser = parse_size, default_value = "1MiB")]
        max_json_body: u64,
        /// Largest request head (request line and headers).
        #[arg(long, value_parser = parse_size, default_value = "64KiB")]
        max_header_size: u64,
        /// Remove resumable uploads untouched this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        upload_expiry: std::time::Duration,
        /// Publish the store's events to this NATS server (docs/events.md).
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
    },
}

#[derive(Subcommand, Debug, Serialize, Deserialize)]
pub enum TierCommand {
    /// Upload pending packs and manifests, check each, then evict down to the cache size.
    Push {
        #[arg(long)]
        json: bool,
    },
    /// What is local, remote, both, and pending.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Upload a snapshot of the index now (pushes make one at most hourly).
    Snapshot,
}

#[derive(Subcommand, Debug, Serialize, Deserialize)]
pub enum IndexCommand {
    /// Rebuild the index from the packs and manifests (the old one is kept beside it).
    Rebuild {
        /// Make a new store in --store (missing or empty) from this bucket alone.
        #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
        from: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Whether the verb may create the store when the directory is empty or missing.
    fn creates_store(&self) -> bool {
        matches!(self, Command::Ingest { .. })
    }
}

/// What an engine verb works on: the store, and the mount's view of it when the mount runs the
/// verb (then the view's caches and open runs must see what the verb changes).
pub struct Engine<'a> {
    pub store: &'a Store,
    pub vfs: Option<&'a Vfs>,
}

/// Where an engine verb's output goes and what it knows about its caller.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    /// The caller's working directory: relative paths in arguments are relative to it.
    pub cwd: PathBuf,
    /// The caller's standard output is a terminal.
    pub tty: bool,
    /// Progress bars may be drawn (on this process's standard error).
    pub progress: bool,
    /// Set when the caller went away (a forwarded command's client closed the socket).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Io<'_> {
    /// A path argument as the caller meant it.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.cwd.join(p)
        }
    }

    fn warn(&mut self, msg: impl std::fmt::Display) {
        let _ = writeln!(self.err, "artifactfs: warning: {msg}");
    }
}

/// Parses `123`, `64KiB`, `4MiB`, `1GiB` (K, M, G are binary too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64KiB, 4MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn default_store() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("artifactfs"));
    }
    let home = std::env::var_os("HOME")
        .context("neither --store, ARTIFACTFS_STORE, XDG_DATA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/artifactfs"))
}

fn init_logging(verbose: u8, json: bool) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARTIFACTFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // One JSON object a line, with the request span's fields (request_id, route, …).
        fmt.json().with_current_span(true).init();
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// The engine's clock: the system clock, or, when `ARTIFACTFS_CLOCK_FILE` names a file, the
/// RFC 3339 instant in it (for tests and retention drills; see `FileClock`).
pub fn clock() -> std::sync::Arc<dyn artifactfs_core::clock::Clock> {
    match std::env::var_os("ARTIFACTFS_CLOCK_FILE") {
        Some(f) => std::sync::Arc::new(artifactfs_core::clock::FileClock::new(f)),
        None => std::sync::Arc::new(artifactfs_core::clock::SystemClock),
    }
}

/// Opens a store (tiered or not) with the engine's [`clock`].
pub fn open_store(dir: &Path) -> Result<Store> {
    crate::tier::open_store(dir)
}

/// `--lock-wait`, set once from the command line.
static LOCK_WAIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// `--lock-wait` as given (0 until the command line is read).
pub fn lock_wait() -> Duration {
    LOCK_WAIT.get().copied().unwrap_or_default()
}

/// How often a waiting command tries the store's lock again.
const LOCK_RETRY: Duration = Duration::from_millis(200);

/// What [`open_or_reach`] found.
pub enum Reached {
    /// The store was free: it is open here.
    Here(Box<Store>),
    /// The process that owns it answers on its control socket; `locked` said it is owned.
    Owner {
        stream: std::os::unix::net::UnixStream,
        locked: anyhow::Error,
    },
}

/// Opens the store. While another process holds its lock: an owner that answers on the
/// control socket (a mount, `serve`, `watch`) is returned to talk to; a holder that does not
/// (a command such as `ingest` or `gc`, which ends by itself) is waited for, up to
/// `--lock-wait`, with one line on standard error that says so.
pub fn open_or_reach(dir: &Path) -> Result<Reached> {
    let wait = lock_wait();
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        let locked = match open_store(dir) {
            Ok(store) => return Ok(Reached::Here(Box::new(store))),
            Err(e) if matches!(e.downcast_ref::<Error>(), Some(Error::Locked { .. })) => e,
            Err(e) => return Err(e),
        };
        let sock = crate::control::socket_path(dir);
        match crate::control::connect(dir) {
            Ok(Some(stream)) => return Ok(Reached::Owner { stream, locked }),
            Ok(None) => {}
            Err(e) => {
                return Err(locked.context(format!("cannot connect to {}: {e}", sock.display())));
            }
        }
        if started.elapsed() >= wait {
            let waited = if wait.is_zero() {
                String::new()
            } else {
                format!(
                    "; waited {} (--lock-wait)",
                    humantime::format_duration(wait)
                )
            };
            return Err(locked.context(format!(
                "no mount answers on {} (only a mount, server or watch takes commands for its \
                 store; another command holds it){waited}",
                sock.display()
            )));
        }
        if !said {
            said = true;
            eprintln!(
                "artifactfs: {}; waiting up to {} for it (--lock-wait)",
                locked.root_cause(),
                humantime::format_duration(wait)
            );
        }
        std::thread::sleep(LOCK_RETRY.min(wait.saturating_sub(started.elapsed())));
    }
}

pub fn is_empty_or_missing(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => rd.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// The exit status for an error: scripts can tell these apart.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        Some(Error::NotFound(_) | Error::NoAttr(_)) => 3,
        Some(err) if err.is_damage() => EXIT_DAMAGE,
        Some(Error::Locked { .. }) => EXIT_LOCKED,
        Some(Error::AlreadyExists(_)) => 6,
        Some(Error::Cancelled(_)) => EXIT_CANCELLED,
        Some(Error::Invalid { .. }) => 7,
        Some(Error::NotAStore { .. }) => 8,
        Some(Error::Busy(_)) => EXIT_BUSY,
        Some(Error::NotPermitted(_)) => EXIT_REFUSED,
        Some(err) if err.is_disk_full() => EXIT_DISK_FULL,
        _ => 1,
    }
}

fn parse_meta(items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(Error::invalid("--meta", format!("{item:?} is not KEY=VALUE")).into());
        };
        if k.is_empty() || k.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::invalid("--meta", format!("bad key {k:?}")).into());
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(Error::invalid("--meta", format!("key {k:?} given twice")).into());
        }
    }
    Ok(out)
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(cli.verbose, matches!(cli.command, Command::Serve { .. }));
    LOCK_WAIT
        .set(cli.lock_wait)
        .expect("the lock wait is set once");
    let store_dir = match cli.store {
        Some(s) => s,
        None => default_store()?,
    };
    // Verbs that never go through a store's owner.
    match cli.command {
        Command::Init {
            chunk_min,
            chunk_avg,
            chunk_max,
            compression_level,
            pack_size,
            default_retention,
            backend,
            storage_class,
            cache_size,
        } => {
            let d = InitOptions::default();
            let as_u32 = |v: Option<u64>, dflt: u32| -> Result<u32> {
                Ok(match v {
                    None => dflt,
                    Some(v) => u32::try_from(v).context("chunk size too large")?,
                })
            };
            let opts = InitOptions {
                chunker: ChunkerParams {
                    min_size: as_u32(chunk_min, d.chunker.min_size)?,
                    avg_size: as_u32(chunk_avg, d.chunker.avg_size)?,
                    max_size: as_u32(chunk_max, d.chunker.max_size)?,
                },
                compression_level: compression_level.unwrap_or(d.compression_level),
                pack_target_size: pack_size.unwrap_or(d.pack_target_size),
                default_retention,
                tier: backend.map(|b| artifactfs_core::tier::TierConfig {
                    storage_class,
                    cache_size: cache_size.unwrap_or(artifactfs_core::tier::DEFAULT_CACHE_SIZE),
                    ..artifactfs_core::tier::TierConfig::new(b)
                }),
            };
            if opts.tier.is_some() {
                crate::tier::init(&store_dir, &opts)?;
            } else {
                Store::init(&store_dir, &opts)
                    .with_context(|| format!("cannot initialise store {}", store_dir.display()))?;
            }
            println!("initialised store {}", store_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Mount {
            mountpoint,
            foreground,
            seal_after,
            seal_marker,
            allow_other,
            nats,
            serve,
            detached,
        } => {
            let opts = crate::mount::MountArgs {
                store: store_dir,
                mountpoint,
                seal_after,
                seal_marker,
                allow_other,
                nats,
                serve,
                verbose: cli.verbose,
            };
            if foreground {
                crate::mount::foreground(&opts, detached)?;
            } else {
                crate::mount::detach(&opts)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Umount { mountpoint } => {
            crate::mount::umount(&mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch {
            spool,
            namespace,
            seal_after,
            seal_marker,
            remove_after_seal,
        } => {
            crate::watch::watch(&crate::watch::WatchArgs {
                store: store_dir,
                spool,
                namespace,
                seal_after,
                seal_marker,
                remove_after_seal,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            seal_after,
            max_json_body,
            max_header_size,
            upload_expiry,
            nats,
        } => {
            let to_usize = |v: u64, what: &str| {
                usize::try_from(v).with_context(|| format!("{what} is too large"))
            };
            crate::serve::serve(crate::serve::ServeArgs {
                store: store_dir,
                listen,
                seal_after,
                nats,
                options: artifactfs_server::ServerOptions {
                    max_json_bytes: to_usize(max_json_body, "--max-json-body")?,
                    max_header_bytes: to_usize(max_header_size, "--max-header-size")?,
                    upload_expiry,
                    ..artifactfs_server::ServerOptions::default()
                },
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Index {
            command: IndexCommand::Rebuild { from, json },
        } => {
            let (store, report) = crate::tier::rebuild(&store_dir, from.as_deref())?;
            output::rebuild(&mut std::io::stdout().lock(), &store, &report, json)?;
            // Rebuilt, but some runs name chunks no readable pack holds, or runs the previous
            // index knew could not be restored: damage, as `verify`.
            Ok(
                if report.damaged_runs.is_empty() && report.lost_runs.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_DAMAGE)
                },
            )
        }
        cmd => engine_verb(&store_dir, cmd).map(ExitCode::from),
    }
}

/// Runs an engine verb here if the store is free, or in the process that owns it.
fn engine_verb(store_dir: &Path, cmd: Command) -> Result<u8> {
    if cmd.creates_store() && is_empty_or_missing(store_dir) {
        // Created, then opened like any store (with the configured clock).
        drop(
            Store::init(store_dir, &InitOptions::default())
                .with_context(|| format!("cannot initialise store {}", store_dir.display()))?,
        );
    }
    let store = match open_or_reach(store_dir)? {
        Reached::Here(store) => *store,
        Reached::Owner { stream, locked } => {
            return crate::control::forward(store_dir, stream, &cmd, locked);
        }
    };
    let stdout = std::io::stdout();
    let tty = stdout.is_terminal();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let mut err = std::io::stderr();
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        cwd: std::env::current_dir().context("cannot find the current directory")?,
        tty,
        progress: tty,
        cancel: None,
    };
    let engine = Engine {
        store: &store,
        vfs: None,
    };
    let res = execute(cmd, &engine, &mut io);
    let flushed = out.flush().context("write to standard output");
    let code = res?;
    flushed?;
    Ok(code)
}

/// The one dispatch point of engine verbs, here or in a mount: runs `cmd` and returns its exit
/// status (0, or e.g. [`EXIT_DAMAGE`]); errors are returned and become a status with
/// [`exit_code`]. Each verb body is `fn(&Engine, &mut Io, args…) -> Result<u8>`.
pub fn execute(cmd: Command, eng: &Engine, io: &mut Io) -> Result<u8> {
    match cmd {
        Command::Ingest {
            src,
            run,
            meta,
            json,
        } => ingest(eng, io, &src, &run, &meta, json),
        Command::Runs {
            namespace,
            expired,
            deleted,
            json,
        } => {
            if let Some(ns) = &namespace {
                artifactfs_core::names::validate_component("namespace", ns, false)?;
            }
            if expired {
                crate::lifecycle::expired(eng.store, io.out, namespace.as_deref(), json)?;
                Ok(0)
            } else if deleted {
                crate::lifecycle::deleted(eng.store, io.out, namespace.as_deref(), json)?;
                Ok(0)
            } else {
                runs(eng, io, namespace.as_deref(), json)
            }
        }
        Command::Retain {
            target,
            value,
            override_,
            reason,
            clear,
            json,
        } => crate::lifecycle::retain(
            eng.store,
            io.out,
            crate::lifecycle::RetainArgs {
                target,
                value,
                override_,
                reason,
                clear,
                json,
            },
        )
        .map(|()| 0),
        Command::Hold { cmd } => crate::lifecycle::hold(eng.store, io.out, cmd).map(|()| 0),
        Command::Gc {
            dry_run,
            grace,
            compact_below,
            json,
        } => crate::lifecycle::gc(
            eng,
            io,
            crate::lifecycle::GcArgs {
                dry_run,
                grace,
                compact_below,
                json,
            },
        )
        .map(|()| 0),
        Command::Tier { command } => tier(eng, io, command),
        Command::Ls { path, json } => ls(eng, io, &path, json),
        Command::Cat { path } => cat(eng, io, &path),
        Command::Export { run, dest } => export(eng, io, &run, &dest),
        Command::Manifest { run, json } => manifest(eng, io, &run, json),
        Command::Seal { run } => seal(eng, io, &run),
        Command::Verify { run, json } => verify(eng, io, run.as_deref(), json),
        Command::Stats { json } => stats(eng, io, json),
        Command::Init { .. }
        | Command::Mount { .. }
        | Command::Umount { .. }
        | Command::Watch { .. }
        | Command::Serve { .. }
        | Command::Index { .. } => {
            bail!("this command does not run through a store's owner")
        }
    }
}

fn ingest(
    eng: &Engine,
    io: &mut Io,
    src: &Path,
    run: &str,
    meta: &[String],
    json: bool,
) -> Result<u8> {
    let run = RunRef::parse(run)?;
    let meta = parse_meta(meta)?;
    let src = io.path(src);
    let bar = Bar::bytes(io.progress, "ingest").cancelled_by(io.cancel.clone());
    let report = eng
        .store
        .ingest_dir(&src, &run, meta, &bar)
        .with_context(|| format!("ingest of {} into {run} failed", src.display()))?;
    bar.finish();
    output::ingest(io.out, &report, json)?;
    Ok(0)
}

fn runs(eng: &Engine, io: &mut Io, namespace: Option<&str>, json: bool) -> Result<u8> {
    if let Some(ns) = namespace {
        artifactfs_core::names::validate_component("namespace", ns, false)?;
    }
    let runs = eng.store.runs(namespace)?;
    output::runs(io.out, eng.store, &runs, json)?;
    Ok(0)
}

fn ls(eng: &Engine, io: &mut Io, path: &str, json: bool) -> Result<u8> {
    let (run, p) = RunRef::parse_with_path(path)?;
    let entry = eng.store.entry(&run, &p)?;
    let list = if entry.kind == artifactfs_core::manifest::Kind::Dir {
        eng.store.list_dir(&run, &p)?
    } else {
        vec![entry]
    };
    output::ls(io.out, &list, json)?;
    Ok(0)
}

fn cat(eng: &Engine, io: &mut Io, path: &str) -> Result<u8> {
    let (run, p) = RunRef::parse_with_path(path)?;
    if p.is_empty() {
        bail!(Error::invalid(
            "path",
            format!("{path:?} names a run, not a file")
        ));
    }
    let store = eng.store;
    let mut entry = store.entry(&run, &p)?;
    if entry.kind == artifactfs_core::manifest::Kind::Hardlink {
        // A hard link names its first name's entry, which may be a symlink or a FIFO.
        entry = store.entry(&run, entry.target.as_deref().unwrap_or_default())?;
    }
    let entry = match entry.kind {
        artifactfs_core::manifest::Kind::File => entry,
        other => bail!(Error::invalid(
            "path",
            format!("{path} is a {}, not a file", other.as_str())
        )),
    };
    store
        .read_file_to(&entry, io.out)
        .with_context(|| format!("cannot read {path}"))?;
    Ok(0)
}

fn export(eng: &Engine, io: &mut Io, run: &str, dest: &Path) -> Result<u8> {
    let run = RunRef::parse(run)?;
    let dest = io.path(dest);
    let bar = Bar::bytes(io.progress, "export");
    let report = eng
        .store
        .export(&run, &dest, &bar)
        .with_context(|| format!("export of {run} to {} failed", dest.display()))?;
    bar.finish();
    for w in &report.warnings {
        io.warn(w);
    }
    if io.tty {
        writeln!(
            io.out,
            "exported {run}: {} entries, {} bytes",
            report.entries, report.bytes
        )?;
    }
    Ok(0)
}

fn manifest(eng: &Engine, io: &mut Io, run: &str, json: bool) -> Result<u8> {
    let run = RunRef::parse(run)?;
    if json {
        let (_, bytes) = eng.store.manifest_bytes(&run)?;
        io.out.write_all(&bytes)?;
        io.out.write_all(b"\n")?;
    } else {
        let (digest, m) = eng.store.manifest(&run)?;
        output::manifest(io.out, &digest, &m)?;
    }
    Ok(0)
}

fn seal(eng: &Engine, io: &mut Io, run: &str) -> Result<u8> {
    let r = RunRef::parse(run)?;
    let row = eng.store.run(&r)?;
    if let Some(d) = row.manifest {
        writeln!(io.err, "artifactfs: {r} is already sealed")?;
        writeln!(io.out, "{d}")?;
        return Ok(0);
    }
    let digest = match eng.vfs {
        Some(v) => v.seal(&r),
        None => vfs::seal_offline(eng.store, &r),
    }
    .with_context(|| format!("cannot seal {r}"))?;
    writeln!(io.out, "{digest}")?;
    Ok(0)
}

fn verify(eng: &Engine, io: &mut Io, run: Option<&str>, json: bool) -> Result<u8> {
    let run = run.map(RunRef::parse).transpose()?;
    let bar = Bar::bytes(io.progress, "verify");
    let report = eng.store.verify(run.as_ref(), &bar)?;
    bar.finish();
    output::verify(io.out, &report, json)?;
    Ok(if report.ok() { 0 } else { EXIT_DAMAGE })
}

fn stats(eng: &Engine, io: &mut Io, json: bool) -> Result<u8> {
    output::stats(io.out, eng.store, &eng.store.stats()?, json)?;
    Ok(0)
}

fn tier(eng: &Engine, io: &mut Io, command: TierCommand) -> Result<u8> {
    let store = eng.store;
    match command {
        TierCommand::Push { json } => {
            let report = store.push_pending().with_context(|| {
                format!(
                    "push from {} failed; what is pending stays pending",
                    store.root().display()
                )
            })?;
            output::tier_push(io.out, io.err, &report, json)?;
            if report.still_pending > 0 {
                return Ok(1);
            }
        }
        TierCommand::Status { json } => output::tier_status(io.out, &store.tier_status()?, json)?,
        TierCommand::Snapshot => {
            let key = store
                .upload_index_snapshot()
                .context("index snapshot failed")?;
            writeln!(io.out, "uploaded index snapshot {key}")?;
        }
    }
    Ok(0)
}
