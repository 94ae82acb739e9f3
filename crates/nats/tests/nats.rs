//! The event publisher against a real nats-server with JetStream: the one `tools/nats/start.sh`
//! runs (`ARTIFACTFS_TEST_NATS`, default `nats://127.0.0.1:4222`) for the tests that only
//! publish, and servers of their own on other ports (`nats-server` spawned directly with a
//! temporary JetStream directory) for the tests that stop one. A missing `nats-server` or an
//! unreachable shared server fails the tests: `tools/test.sh` provides both.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use artifactfs_core::{InitOptions, NoProgress, RunRef, Store};
use artifactfs_nats::{NatsOptions, Publisher, subject};
use async_nats::jetstream;

#[path = "../../../tests/common/jetstream.rs"]
mod stream_reader;
use futures_util::StreamExt;

/// Longest wait for something that should happen in well under a second; a bound against
/// hangs, not a measured time.
const PATIENCE: Duration = Duration::from_secs(60);

fn shared_url() -> String {
    std::env::var("ARTIFACTFS_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A name no other test or earlier run uses, for streams and subject prefixes on the shared
/// server.
fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}{}x{nanos}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Publisher options for a test: quick retries.
fn opts(url: &str, stream: &str, prefix: &str) -> NatsOptions {
    NatsOptions {
        url: url.into(),
        stream: stream.into(),
        subject_prefix: prefix.into(),
        poll_interval: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        max_backoff: Duration::from_millis(300),
        batch: 7,
        ..NatsOptions::default()
    }
}

// ---- a nats-server of a test's own ----

fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("nats-server is not installed: run tools/nats/start.sh (or tools/test.sh)")
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Self {
        let mut s = Server {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        s.restart();
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port with the same JetStream directory.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(nats_server_bin())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path().join("js"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Ok(c) = TcpStream::connect(("127.0.0.1", self.port)) {
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut line = String::new();
                if BufReader::new(c).read_line(&mut line).is_ok()
                    && line.contains("\"jetstream\":true")
                {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
                panic!("nats-server exited with {st}: {log}");
            }
            assert!(t0.elapsed() < PATIENCE, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server as an operator would (SIGTERM: JetStream writes out what it holds).
    fn stop(&mut self) {
        let mut c = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- a store with events ----

struct TestStore {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    n: u64,
}

impl TestStore {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        Self {
            dir,
            store: Arc::new(store),
            n: 0,
        }
    }

    fn last_seq(&self) -> i64 {
        self.store
            .events(0, 1_000_000)
            .unwrap()
            .last()
            .map_or(0, |e| e.seq)
    }

    /// Ingests a small run (run.opened, run.sealed, and retention events if any).
    fn ingest(&mut self, run: &str) {
        self.n += 1;
        let src = self.dir.path().join(format!("src-{}", self.n));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), format!("run {run} file {}", self.n)).unwrap();
        self.store
            .ingest_dir(
                &src,
                &RunRef::parse(run).unwrap(),
                BTreeMap::new(),
                &NoProgress,
            )
            .unwrap();
    }

    /// `n` quick events: holds placed and removed on `run`.
    fn holds(&mut self, run: &str, n: usize) {
        let r = RunRef::parse(run).unwrap();
        for i in 0..n {
            let name = format!("h{}", self.n);
            self.n += 1;
            if i % 2 == 0 {
                self.store.place_hold(&r, &name, b"test").unwrap();
            } else {
                self.store.place_hold(&r, &name, b"test").unwrap();
                self.store.remove_hold(&r, &name).unwrap();
            }
        }
    }

    /// Every event as the publisher must publish it: (subject, msg id, payload).
    fn expected(&self, prefix: &str) -> Vec<(String, String, serde_json::Value)> {
        let id = &self.store.config().store_id;
        self.store
            .events(0, 1_000_000)
            .unwrap()
            .iter()
            .map(|e| {
                (
                    subject::subject(prefix, e),
                    subject::msg_id(id, e.seq),
                    subject::payload(id, e),
                )
            })
            .collect()
    }

    fn cursor(&self) -> PathBuf {
        self.store.root().join("nats-cursor")
    }

    /// `index rebuild` of the store, after `remove` of its index files (`index.sqlite*`)
    /// when asked. The store must have no other owner (publishers shut down).
    fn rebuild(&mut self, remove_indexes: bool) -> artifactfs_core::rebuild::RebuildReport {
        let root = self.store.root().to_path_buf();
        self.n += 1;
        let spare = Store::init(
            &self.dir.path().join(format!("spare-{}", self.n)),
            &InitOptions::default(),
        )
        .unwrap();
        let old = std::mem::replace(&mut self.store, Arc::new(spare));
        drop(
            Arc::try_unwrap(old)
                .ok()
                .expect("no other owner of the store"),
        );
        if remove_indexes {
            for e in std::fs::read_dir(&root).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("index.sqlite") {
                    std::fs::remove_file(e.path()).unwrap();
                }
            }
        }
        let (store, report) = Store::rebuild_index(&root, None).unwrap();
        self.store = Arc::new(store);
        report
    }
}

fn cursor_value(p: &Path) -> Option<i64> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().parse().unwrap())
}

fn wait_acked(p: &Publisher, seq: i64) {
    wait_for(&format!("event {seq} to be acknowledged"), || {
        p.status().acked >= seq
    });
    assert_eq!(p.status().acked, seq, "{:?}", p.status());
}

/// Everything in `stream`, in stream order: (stream seq, subject, msg id, payload).
fn read_stream(url: &str, stream: &str) -> Vec<(u64, String, String, serde_json::Value)> {
    stream_reader::read_stream(url, stream, PATIENCE)
        .unwrap_or_else(|| panic!("no stream {stream} at {url}"))
        .into_iter()
        .map(|m| (m.stream_seq, m.subject, m.msg_id, m.payload))
        .collect()
}

/// Asserts that the stream holds exactly `want`, once each, in order, from its first message.
fn assert_stream_is(url: &str, stream: &str, want: &[(String, String, serde_json::Value)]) {
    let got = read_stream(url, stream);
    let got_ids: Vec<&str> = got.iter().map(|g| g.2.as_str()).collect();
    let want_ids: Vec<&str> = want.iter().map(|w| w.1.as_str()).collect();
    assert_eq!(got_ids, want_ids, "message ids in the stream");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, i as u64 + 1, "stream sequence: no gap, no duplicate");
        assert_eq!((&g.1, &g.3), (&w.0, &w.2), "message {i}");
    }
}

#[test]
fn subscribers_get_every_event_in_order() {
    let url = shared_url();
    let stream = unique("T");
    let prefix = unique("t.events");
    let mut ts = TestStore::new();
    // A backlog from before the publisher starts, with a namespace that needs escaping.
    ts.ingest("lab/r1");
    ts.ingest("odd.ns *>/r1");
    ts.holds("lab/r1", 4);

    let rt = runtime();
    let (client, mut sub) = rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap_or_else(|e| {
            panic!("no NATS server at {url} ({e}): run tools/nats/start.sh or tools/test.sh")
        });
        let sub = client.subscribe(format!("{prefix}.>")).await.unwrap();
        client.flush().await.unwrap();
        (client, sub)
    });
    let p = Publisher::spawn_for_store(ts.store.clone(), opts(&url, &stream, &prefix)).unwrap();
    // More while it runs, without a namespace too; a nudge wakes it.
    ts.ingest("lab/r2");
    ts.store
        .set_namespace_retention("lab", Some("30d"))
        .unwrap();
    ts.store
        .gc(&artifactfs_core::gc::GcOptions::default(), &NoProgress)
        .unwrap();
    ts.holds("odd.ns *>/r1", 3);
    p.nudge();
    let last = ts.last_seq();
    wait_acked(&p, last);
    let want = ts.expected(&prefix);
    assert_eq!(want.len() as i64, last);
    assert!(
        want.iter()
            .any(|w| w.0 == format!("{prefix}.odd%2Ens%20%2A%3E.run.sealed")),
        "{want:?}"
    );
    assert!(
        want.iter()
            .any(|w| w.0 == format!("{prefix}._.gc.finished"))
    );

    // The core subscriber saw every event once, in order.
    let got: Vec<(String, String, serde_json::Value)> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..want.len() {
            let m = tokio::time::timeout(PATIENCE, sub.next())
                .await
                .expect("core message")
                .unwrap();
            let id = m.headers.as_ref().unwrap().get("Nats-Msg-Id").unwrap();
            v.push((
                m.subject.to_string(),
                id.as_str().to_owned(),
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
        v
    });
    assert_eq!(got, want);
    // The stream holds each once, in order; the cursor says how far.
    assert_stream_is(&url, &stream, &want);
    let st = p.status();
    assert_eq!((st.published, st.duplicates), (last as u64, 0));
    assert!(st.connected && st.last_error.is_none(), "{st:?}");
    p.shutdown();
    assert_eq!(cursor_value(&ts.cursor()), Some(last));

    // Without JetStream: core publish and flush, its own cursor, the same messages.
    let core_cursor = ts.dir.path().join("core-cursor");
    let (mut sub2, ()) = rt.block_on(async {
        let s = client.subscribe(format!("{prefix}.>")).await.unwrap();
        client.flush().await.unwrap();
        (s, ())
    });
    let p = Publisher::spawn_for_store(
        ts.store.clone(),
        NatsOptions {
            jetstream: false,
            cursor_file: Some(core_cursor.clone()),
            ..opts(&url, "unused", &prefix)
        },
    )
    .unwrap();
    wait_acked(&p, last);
    p.shutdown();
    assert_eq!(cursor_value(&core_cursor), Some(last));
    let got: Vec<(String, serde_json::Value)> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..want.len() {
            let m = tokio::time::timeout(PATIENCE, sub2.next())
                .await
                .expect("core message")
                .unwrap();
            v.push((
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
        v
    });
    let want2: Vec<(String, serde_json::Value)> =
        want.iter().map(|w| (w.0.clone(), w.2.clone())).collect();
    assert_eq!(got, want2);
    // And the stream got no second copy from the core publisher's messages: its subjects
    // are the stream's, but the Msg-Id dedup window drops them.
    assert_stream_is(&url, &stream, &want);
    rt.block_on(async { jetstream::new(client).delete_stream(&stream).await })
        .unwrap();
}

#[test]
fn a_nats_outage_loses_and_duplicates_nothing() {
    let mut server = Server::start();
    let url = server.url();
    let mut ts = TestStore::new();
    ts.ingest("lab/a");
    let p = Publisher::spawn_for_store(ts.store.clone(), opts(&url, "OUTAGE", "artifactfs.events"))
        .unwrap();
    ts.holds("lab/a", 10);
    p.nudge();
    let before = ts.last_seq();
    wait_acked(&p, before);

    server.stop();
    // Events keep coming while NATS is down.
    ts.ingest("lab/b");
    ts.holds("lab/b", 10);
    p.nudge();
    wait_for("the publisher to notice the outage", || {
        p.status().last_error.is_some()
    });
    let st = p.status();
    assert!(
        st.last_error.as_deref().unwrap().contains(&url),
        "the error names the server: {st:?}"
    );
    assert!(!st.connected);
    assert_eq!(
        st.acked, before,
        "nothing acknowledged while the server is down"
    );
    assert_eq!(cursor_value(&ts.cursor()), Some(before));

    server.restart();
    ts.holds("lab/a", 5);
    p.nudge();
    let last = ts.last_seq();
    wait_acked(&p, last);
    assert!(p.status().connected);
    assert!(p.status().last_error.is_none());
    p.shutdown();
    assert_eq!(cursor_value(&ts.cursor()), Some(last));
    assert_stream_is(&url, "OUTAGE", &ts.expected("artifactfs.events"));
}

#[test]
fn a_restarted_publisher_resumes_from_its_cursor() {
    let server = Server::start();
    let url = server.url();
    let mut ts = TestStore::new();
    ts.ingest("lab/a");
    ts.holds("lab/a", 9);
    let o = opts(&url, "RESTART", "artifactfs.events");
    let p = Publisher::spawn_for_store(ts.store.clone(), o.clone()).unwrap();
    let first = ts.last_seq();
    wait_acked(&p, first);
    p.shutdown();
    assert_eq!(cursor_value(&ts.cursor()), Some(first));

    // More events while no publisher runs; the next one starts after the cursor.
    ts.ingest("lab/b");
    ts.holds("lab/b", 6);
    let second = ts.last_seq();
    let p = Publisher::spawn_for_store(ts.store.clone(), o.clone()).unwrap();
    assert_eq!(p.status().acked, first);
    wait_acked(&p, second);
    let st = p.status();
    assert_eq!(
        (st.published, st.duplicates),
        ((second - first) as u64, 0),
        "only the new events were sent: {st:?}"
    );
    p.shutdown();
    assert_stream_is(&url, "RESTART", &ts.expected("artifactfs.events"));

    // A publisher that died after the acknowledgements but before writing its cursor: the
    // cursor lags behind the stream. The next one asks the stream and sends nothing twice.
    std::fs::write(ts.cursor(), format!("{}\n", first - 3)).unwrap();
    ts.holds("lab/a", 4);
    let third = ts.last_seq();
    let p = Publisher::spawn_for_store(ts.store.clone(), o).unwrap();
    wait_acked(&p, third);
    let st = p.status();
    assert_eq!(
        (st.published, st.duplicates),
        ((third - second) as u64, 0),
        "{st:?}"
    );
    p.shutdown();
    assert_eq!(cursor_value(&ts.cursor()), Some(third));
    assert_stream_is(&url, "RESTART", &ts.expected("artifactfs.events"));
}

/// Collects what the publisher logs, to check its warnings.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_server_down_at_start_is_named_and_nothing_is_acknowledged() {
    let log = LogBuf::default();
    let writer = log.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    )
    .unwrap();

    // Nothing listens on this port, yet.
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut ts = TestStore::new();
    ts.ingest("lab/a");
    let p = Publisher::spawn_for_store(ts.store.clone(), opts(&url, "DOWN", "artifactfs.events"))
        .unwrap();
    wait_for("a failed connection", || p.status().last_error.is_some());
    let st = p.status();
    let err = st.last_error.clone().unwrap();
    assert!(
        err.contains(&url) && err.contains("cannot connect"),
        "{err}"
    );
    assert_eq!((st.acked, st.published, st.connected), (0, 0, false));
    wait_for("a warning naming the server", || {
        let text = String::from_utf8_lossy(&log.0.lock().unwrap()).to_string();
        text.lines()
            .any(|l| l.contains("WARN") && l.contains(&url) && l.contains("cannot connect"))
    });
    assert_eq!(
        cursor_value(&ts.cursor()),
        None,
        "no cursor: nothing acknowledged"
    );
    // The server comes up: the publisher catches up on its own.
    let _server = Server::start_on(port);
    ts.holds("lab/a", 3);
    let last = ts.last_seq();
    wait_acked(&p, last);
    p.shutdown();
    assert_eq!(cursor_value(&ts.cursor()), Some(last));
    assert_stream_is(&url, "DOWN", &ts.expected("artifactfs.events"));

    // A URL that is not one fails at once, and says which.
    let e = Publisher::spawn_for_store(
        ts.store.clone(),
        NatsOptions {
            url: "nats://[::1".into(),
            ..NatsOptions::default()
        },
    )
    .err()
    .expect("invalid URL refused");
    assert!(e.to_string().contains("nats://[::1"), "{e}");
    // So does a cursor file that is not one, without being overwritten.
    std::fs::write(ts.cursor(), "garbage\n").unwrap();
    let e = Publisher::spawn_for_store(ts.store.clone(), opts(&url, "DOWN", "artifactfs.events"))
        .err()
        .expect("bad cursor refused");
    assert!(e.to_string().contains("nats-cursor"), "{e}");
    assert_eq!(std::fs::read_to_string(ts.cursor()).unwrap(), "garbage\n");
}

#[test]
fn a_rebuilt_index_goes_on_publishing_without_drops() {
    let server = Server::start();
    let url = server.url();
    let o = opts(&url, "REBUILT", "artifactfs.events");
    let mut ts = TestStore::new();
    ts.ingest("lab/a");
    ts.holds("lab/a", 3);
    let p = Publisher::spawn_for_store(ts.store.clone(), o.clone()).unwrap();
    let first = ts.last_seq();
    wait_acked(&p, first);
    p.shutdown();
    let mut want = ts.expected("artifactfs.events");

    // Rebuilt beside the old index: the new log (one index.rebuilt, the runs again, then what
    // comes next) is numbered after the old one, and every new event reaches the stream.
    let report = ts.rebuild(false);
    assert_eq!(report.events_after, first);
    ts.ingest("lab/b");
    ts.holds("lab/b", 2);
    let check = |ts: &TestStore, want: &mut Vec<_>, after: i64| {
        let p = Publisher::spawn_for_store(ts.store.clone(), o.clone()).unwrap();
        let last = ts.last_seq();
        wait_acked(&p, last);
        let new: Vec<_> = ts
            .expected("artifactfs.events")
            .into_iter()
            .filter(|e| e.2["seq"].as_i64().unwrap() > after)
            .collect();
        assert_eq!(new[0].2["kind"], "index.rebuilt", "{new:?}");
        assert_eq!(new[0].2["seq"], after + 1);
        let st = p.status();
        assert_eq!(
            (st.published, st.duplicates),
            (new.len() as u64, 0),
            "every new event published, none taken for a duplicate: {st:?}"
        );
        p.shutdown();
        want.extend(new);
        assert_stream_is(&url, "REBUILT", want);
        last
    };
    let second = check(&ts, &mut want, first);

    // Index files gone altogether: the cursor file alone carries the numbering on.
    let report = ts.rebuild(true);
    assert_eq!(report.events_after, second);
    ts.holds("lab/a", 2);
    let third = check(&ts, &mut want, second);

    // Index and every cursor file gone (the NATS publisher's, and the lifecycle queue's that
    // an untiered store keeps): the log starts again from 1 under the same store id. The
    // publisher finds that the stream's newest event of the store is another event than the
    // log's of that number, publishes nothing, and says so.
    for name in artifactfs_core::rebuild::EVENT_CURSOR_FILES {
        let _ = std::fs::remove_file(ts.store.root().join(name));
    }
    assert!(!ts.cursor().exists());
    let report = ts.rebuild(true);
    assert_eq!(report.events_after, 0);
    let p = Publisher::spawn_for_store(ts.store.clone(), o.clone()).unwrap();
    wait_for("the refusal", || p.status().last_error.is_some());
    let st = p.status();
    assert!(
        st.last_error.as_deref().unwrap().contains("renumbered"),
        "{st:?}"
    );
    assert_eq!((st.acked, st.published), (0, 0), "{st:?}");
    p.shutdown();
    assert_stream_is(&url, "REBUILT", &want);
    // What the error says to do: the cursor at the stream's newest, and rebuild again.
    std::fs::write(ts.cursor(), format!("{third}\n")).unwrap();
    assert_eq!(ts.rebuild(true).events_after, third);
    check(&ts, &mut want, third);
}
