//! Publishes a store's event log to NATS (ADR 0012).
//!
//! A [`Publisher`] tails the append-only `events` table through a function the caller gives
//! it (normally [`Store::events`]; this crate never opens the store itself) and publishes each
//! event, in order and at least once, as JSON to `artifactfs.events.<namespace>.<kind>`
//! (see [`subject`]). With JetStream (the default) each message carries `Nats-Msg-Id:
//! <store id>-<seq>`, the publisher waits for the stream's acknowledgement before it moves on,
//! and the sequence number of the last acknowledged event is kept in `STORE/nats-cursor`
//! ([`cursor`]), so that a restarted publisher resumes after it; after any failed publish it
//! first asks the stream which of this store's events it already holds, so the stream gets
//! every event exactly once. Without JetStream, an event counts as delivered once the client
//! flushed it to the server: subscribers connected at that moment get it at least once.
//!
//! The publisher runs on a thread of its own with a single-threaded tokio runtime, so that a
//! synchronous caller (the mount) and an async one (the server) start it the same way; reads
//! of the event log go through `spawn_blocking`. It must not run SQL or touch pack files: the
//! event function is its only view of the store.

pub mod cursor;
mod publish;
pub mod subject;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use artifactfs_core::Store;
use artifactfs_core::index::EventRow;

/// Default JetStream stream name.
pub const DEFAULT_STREAM: &str = "ARTIFACTFS_EVENTS";
/// Default subject prefix; the stream covers `<prefix>.>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "artifactfs.events";
/// Default name of the cursor file in the store directory.
pub const CURSOR_FILE: &str = "nats-cursor";

/// Errors of [`Publisher::spawn`]. Once running, the publisher does not fail: it retries, logs
/// and reports what went wrong in [`Status::last_error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid NATS option {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("NATS cursor {}: {reason}", path.display())]
    Cursor { path: PathBuf, reason: String },
    #[error("start the NATS publisher: {0}")]
    Start(#[source] std::io::Error),
}

/// How and where to publish.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Server URL, e.g. `nats://127.0.0.1:4222`; several may be given separated by commas.
    pub url: String,
    /// Publish to a JetStream stream and wait for its acknowledgements (ADR 0012); `false`:
    /// core NATS publish and flush.
    pub jetstream: bool,
    /// The stream, created with subjects `<subject_prefix>.>` if it does not exist.
    pub stream: String,
    pub subject_prefix: String,
    /// JetStream's duplicate window for a stream this publisher creates.
    pub duplicate_window: Duration,
    /// Where the cursor is kept; default `STORE/nats-cursor`.
    pub cursor_file: Option<PathBuf>,
    /// How often the log is read when nobody calls [`Publisher::nudge`].
    pub poll_interval: Duration,
    /// How long to wait for a connection, an acknowledgement or a flush.
    pub timeout: Duration,
    /// Longest wait between retries while NATS is unreachable (the wait doubles from 50 ms).
    pub max_backoff: Duration,
    /// Events read from the log at a time.
    pub batch: usize,
    /// How many of the stream's newest messages are searched for this store's last event
    /// after a failed publish or a start.
    pub reconcile_scan: u64,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            jetstream: true,
            stream: DEFAULT_STREAM.into(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
            duplicate_window: Duration::from_secs(600),
            cursor_file: None,
            poll_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(10),
            batch: 256,
            reconcile_scan: 1000,
        }
    }
}

impl NatsOptions {
    fn validate(&self) -> Result<Vec<async_nats::ServerAddr>, Error> {
        let invalid = |what, reason: String| Err(Error::Invalid { what, reason });
        let mut addrs = Vec::new();
        for u in self.url.split(',').map(str::trim) {
            match u.parse::<async_nats::ServerAddr>() {
                Ok(a) => addrs.push(a),
                Err(e) => return invalid("url", format!("{u:?}: {e}")),
            }
        }
        if self.jetstream
            && (self.stream.is_empty()
                || self
                    .stream
                    .chars()
                    .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace()))
        {
            return invalid(
                "stream",
                format!(
                    "{:?}: a stream name is not empty and has no '.', '*', '>', slash or whitespace",
                    self.stream
                ),
            );
        }
        if !subject::valid_prefix(&self.subject_prefix) {
            return invalid(
                "subject prefix",
                format!(
                    "{:?}: dot-separated tokens without wildcards",
                    self.subject_prefix
                ),
            );
        }
        if self.batch == 0 {
            return invalid("batch", "must be at least 1".into());
        }
        for (what, d) in [
            ("poll interval", self.poll_interval),
            ("timeout", self.timeout),
            ("max backoff", self.max_backoff),
        ] {
            if d.is_zero() {
                return invalid(what, "must be more than zero".into());
            }
        }
        Ok(addrs)
    }
}

/// What the publisher has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Connected to a server (and, with JetStream, the stream is there).
    pub connected: bool,
    /// Sequence number of the last event acknowledged (as in the cursor file).
    pub acked: i64,
    /// Events published and acknowledged by this publisher since it started.
    pub published: u64,
    /// Of those, how many JetStream reported as duplicates (sent before, e.g. by a publisher
    /// that stopped before it could record the acknowledgement).
    pub duplicates: u64,
    /// The last failure, naming the server URL; cleared by the next acknowledgement.
    pub last_error: Option<String>,
}

/// Reads events with `seq > after`, in order, at most `limit` ([`Store::events`]).
pub type EventFn =
    dyn Fn(i64, usize) -> artifactfs_core::Result<Vec<EventRow>> + Send + Sync + 'static;

pub(crate) struct Shared {
    nudge: tokio::sync::Notify,
    status: Mutex<Status>,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running publisher; stops when shut down or dropped.
pub struct Publisher {
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// Wakes a publisher after an event was appended; cheap to clone and to call.
#[derive(Clone)]
pub struct Nudger(Arc<Shared>);

impl Nudger {
    pub fn nudge(&self) {
        self.0.nudge.notify_one();
    }
}

impl Publisher {
    /// Starts publishing the events of the store at `store_root` (whose id is `store_id`),
    /// read through `events`, after the cursor. Fails only on invalid options or an
    /// unreadable cursor; an unreachable server is retried in the background with warnings
    /// that name its URL.
    pub fn spawn(
        store_root: &Path,
        store_id: &str,
        events: impl Fn(i64, usize) -> artifactfs_core::Result<Vec<EventRow>> + Send + Sync + 'static,
        opts: NatsOptions,
    ) -> Result<Self, Error> {
        let addrs = opts.validate()?;
        let cursor_path = opts
            .cursor_file
            .clone()
            .unwrap_or_else(|| store_root.join(CURSOR_FILE));
        let acked = cursor::read(&cursor_path)?;
        let shared = Arc::new(Shared {
            nudge: tokio::sync::Notify::new(),
            status: Mutex::new(Status {
                acked,
                ..Status::default()
            }),
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Start)?;
        let worker = publish::Worker {
            opts,
            addrs,
            store_id: store_id.to_owned(),
            events: Arc::new(events),
            cursor_path,
            acked,
            saved: acked,
            shared: shared.clone(),
            stop: stop_rx,
        };
        tracing::info!(
            url = %worker.opts.url, jetstream = worker.opts.jetstream,
            stream = %worker.opts.stream, after = acked, "event publisher starting"
        );
        let thread = std::thread::Builder::new()
            .name("nats-publisher".into())
            .spawn(move || {
                rt.block_on(worker.run());
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .map_err(Error::Start)?;
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// [`Publisher::spawn`] for an open store.
    pub fn spawn_for_store(store: Arc<Store>, opts: NatsOptions) -> Result<Self, Error> {
        let root = store.root().to_path_buf();
        let id = store.config().store_id.clone();
        Self::spawn(
            &root,
            &id,
            move |after, limit| store.events(after, limit),
            opts,
        )
    }

    /// Reads the log now instead of at the next poll.
    pub fn nudge(&self) {
        self.shared.nudge.notify_one();
    }

    /// A handle that nudges this publisher, for the places that append events.
    pub fn nudger(&self) -> Nudger {
        Nudger(self.shared.clone())
    }

    pub fn status(&self) -> Status {
        self.shared.status().clone()
    }

    /// Stops publishing and waits for the thread: an event whose acknowledgement has not
    /// arrived is not marked acknowledged, so the next publisher sends it again.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the NATS publisher thread panicked");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_can_be_shared_with_the_publisher() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Store>();
        send_sync::<Publisher>();
        send_sync::<Nudger>();
    }

    #[test]
    fn options_are_checked() {
        let ok = NatsOptions::default();
        assert_eq!(ok.validate().unwrap().len(), 1);
        let two = NatsOptions {
            url: "nats://127.0.0.1:4222, nats://127.0.0.1:4223".into(),
            ..NatsOptions::default()
        };
        assert_eq!(two.validate().unwrap().len(), 2);
        let cases = [
            NatsOptions {
                url: "http://[::1".into(),
                ..NatsOptions::default()
            },
            NatsOptions {
                stream: "A.B".into(),
                ..NatsOptions::default()
            },
            NatsOptions {
                subject_prefix: "a.>".into(),
                ..NatsOptions::default()
            },
            NatsOptions {
                batch: 0,
                ..NatsOptions::default()
            },
            NatsOptions {
                timeout: Duration::ZERO,
                ..NatsOptions::default()
            },
        ];
        for o in cases {
            let e = o.validate().unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{e}");
        }
        // The stream name does not matter without JetStream.
        NatsOptions {
            jetstream: false,
            stream: String::new(),
            ..NatsOptions::default()
        }
        .validate()
        .unwrap();
    }
}
