//! `artifactfs watch`: a real spool directory, the guide-board producer writing runs into it
//! over time while the watcher runs as a process; runs seal on their marker and on quiet, with
//! the manifest `ingest` gives for the same tree; a watcher killed with SIGKILL mid-run and
//! restarted neither ingests a run twice nor loses one. No assertion is about durations: waits
//! have deadlines only against hangs.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::Env;
use guide_board_sim::generate::{Options, generate, run_mtime, run_name};
use guide_board_sim::produce::{ProduceOptions, produce, run_xattrs};

const CLOCK: &str = "2026-11-01T12:00:00Z";
const SIZE: u64 = 1 << 20;
const SEED: u64 = 11;
/// Against hangs only.
const DEADLINE: Duration = Duration::from_secs(120);

/// A running `artifactfs watch` and the lines of its standard output.
struct Watcher {
    child: Child,
    lines: Receiver<String>,
    log: std::path::PathBuf,
}

impl Watcher {
    fn start(env: &Env, spool: &Path, extra: &[&str], log: &str) -> Self {
        let log = env.path(log);
        let mut args = vec!["-v", "watch", spool.to_str().unwrap(), "--seal-after", "2s"];
        args.extend_from_slice(extra);
        let mut child = env
            .std_cmd(&args)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start artifactfs watch");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let w = Self { child, lines, log };
        // Ready once the store is owned (the control socket answers).
        let deadline = Instant::now() + DEADLINE;
        while !env.store().join("control.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "watch did not start: {}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }

    /// The next `sealed NS/RUN DIGEST` line, as (run, digest).
    fn next_sealed(&self) -> (String, String) {
        let line = self
            .lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("no seal reported; log:\n{}", self.log()));
        let mut parts = line.split(' ');
        assert_eq!(parts.next(), Some("sealed"), "{line}");
        (
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) {
        let status = common::terminate(&mut self.child);
        assert!(status.success(), "watch ended with {status}");
    }
}

impl Drop for Watcher {
    /// A test that fails leaves no watcher running (and owning its store) behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn producer(out: &Path, first: u32, runs: u32, pace_ms: u64) -> ProduceOptions {
    ProduceOptions {
        out: out.to_path_buf(),
        namespace: None,
        seed: SEED,
        runs,
        first_run: first,
        size: SIZE,
        small_files: None,
        retain: Some("30d".into()),
        statehub_id_prefix: "statehub:gb:".into(),
        pace: Duration::from_millis(pace_ms),
        producers: 1,
        marker: None,
    }
}

/// The reference tree of run `index`: the generator's, tagged as the producer tags it, with
/// the marker if there is one. Its `ingest` into a store with the same clock gives a digest.
fn reference_digest(p: &ProduceOptions, index: u32, marker: Option<&str>) -> String {
    let env = Env::with_clock(CLOCK);
    let out = env.path("ref");
    generate(
        &Options {
            out: out.clone(),
            seed: p.seed,
            runs: 1,
            size: p.size,
            small_files: None,
            first_run: index,
        },
        |_| {},
    )
    .unwrap();
    let root = out.join(run_name(u64::from(index)));
    for (k, v) in run_xattrs(p, u64::from(index)) {
        xattr::set(&root, &k, v.as_bytes()).unwrap();
    }
    if let Some(m) = marker {
        let f = File::create(root.join(m)).unwrap();
        f.set_modified(run_mtime(u64::from(index))).unwrap();
        File::open(&root)
            .unwrap()
            .set_modified(run_mtime(u64::from(index)))
            .unwrap();
    }
    let run = format!("gb/{}", run_name(u64::from(index)));
    env.ingest(&root, &run)["manifest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Two runs written at once and sealed on quiet, then one sealed on its marker: each manifest
/// is the one `ingest` gives for the generated tree (so no run was sealed while its logs were
/// still growing: the producer appends every 250 ms, the quiet period is 2 s). Retention comes
/// from the run directory's `user.retain`.
#[test]
fn runs_seal_on_quiet_and_marker_with_the_manifest_of_ingest() {
    let env = Env::with_clock(CLOCK);
    let spool = env.path("gb");
    std::fs::create_dir(&spool).unwrap();
    let w = Watcher::start(&env, &spool, &["--seal-marker", "_SUCCESS"], "watch.log");

    let mut two = producer(&spool, 0, 2, 250);
    two.producers = 2;
    produce(&two, |_| {}).unwrap();
    let mut sealed = vec![w.next_sealed(), w.next_sealed()];
    let mut marked = producer(&spool, 2, 1, 100);
    marked.marker = Some("_SUCCESS".into());
    produce(&marked, |_| {}).unwrap();
    sealed.push(w.next_sealed());
    sealed.sort();

    let runs: Vec<&str> = sealed.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(runs, ["gb/run-0000", "gb/run-0001", "gb/run-0002"]);
    assert_eq!(sealed[0].1, reference_digest(&two, 0, None));
    assert_eq!(sealed[1].1, reference_digest(&two, 1, None));
    assert_eq!(sealed[2].1, reference_digest(&marked, 2, Some("_SUCCESS")));

    // The store answers through the watcher's control socket meanwhile.
    let info = env.run_info("gb/run-0001").expect("listed");
    assert_eq!(info["state"], "sealed");
    let retain: serde_json::Value =
        serde_json::from_str(&env.ok(&["retain", "gb/run-0001", "--json"])).unwrap();
    assert_eq!(retain["retain"], "30d", "{retain}");
    let manifest: serde_json::Value =
        serde_json::from_str(&env.ok(&["manifest", "gb/run-0001", "--json"])).unwrap();
    assert_eq!(
        manifest["metadata"]["statehub.run_id"],
        "statehub:gb:run-0001"
    );
    w.stop();
}

/// A watcher killed with SIGKILL while a run is being written, then restarted with
/// --remove-after-seal: the run sealed before is not ingested again (its directory is removed),
/// the run written meanwhile is sealed once and complete. A second watcher on an owned store
/// is refused with status 5.
#[test]
fn kill_9_then_restart_neither_duplicates_nor_loses() {
    let env = Env::with_clock(CLOCK);
    let spool = env.path("gb");
    std::fs::create_dir(&spool).unwrap();
    let mut w = Watcher::start(&env, &spool, &[], "watch-1.log");

    let second = env.run(&["watch", spool.to_str().unwrap()]);
    assert_eq!(second.status.code(), Some(5), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("cannot watch"),
        "{second:?}"
    );

    let first = producer(&spool, 0, 1, 0);
    produce(&first, |_| {}).unwrap();
    let (run, digest0) = w.next_sealed();
    assert_eq!(run, "gb/run-0000");

    let slow = producer(&spool, 1, 1, 250);
    let writer = {
        let slow = slow.clone();
        std::thread::spawn(move || produce(&slow, |_| {}).unwrap())
    };
    let deadline = Instant::now() + DEADLINE;
    while !spool.join("run-0001").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    writer.join().unwrap();

    let w = Watcher::start(&env, &spool, &["--remove-after-seal"], "watch-2.log");
    let (run, digest1) = w.next_sealed();
    assert_eq!(run, "gb/run-0001");
    let deadline = Instant::now() + DEADLINE;
    while std::fs::read_dir(&spool).unwrap().next().is_some() {
        assert!(Instant::now() < deadline, "spool not emptied: {}", w.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let restarted = w.log();
    w.stop();

    assert_eq!(digest0, reference_digest(&first, 0, None));
    assert_eq!(digest1, reference_digest(&slow, 1, None));
    let runs: serde_json::Value = serde_json::from_str(&env.ok(&["runs", "--json"])).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs}");
    // The restarted watcher recognised run-0000 and never tried to ingest it again.
    assert!(
        restarted.contains("already sealed with the same content")
            && restarted.contains("gb/run-0000"),
        "{restarted}"
    );
    assert!(
        !restarted.contains("sealing run=gb/run-0000"),
        "{restarted}"
    );
    assert!(!restarted.contains("exists already"), "{restarted}");
}

/// A run larger than the store's disk fails to seal with the disk full; the watcher keeps it
/// pending and seals it, bit-exact, once there is room, without any change to the run.
#[test]
fn a_run_that_fills_the_disk_seals_once_there_is_room() {
    let env = Env::new();
    let disk = common::SmallDisk::mount(&env.store(), "24m");
    env.ok(&["init"]);
    let spool = env.path("spool");
    let run = spool.join("run-a");
    std::fs::create_dir_all(run.join("logs")).unwrap();
    for i in 0..4u64 {
        std::fs::write(
            run.join(format!("blob-{i}.bin")),
            common::bytes(12 << 20, 40 + i),
        )
        .unwrap();
    }
    for i in 0..20 {
        std::fs::write(run.join(format!("logs/{i}.log")), format!("line {i}\n")).unwrap();
    }
    let w = Watcher::start(&env, &spool, &[], "watch.log");
    let deadline = Instant::now() + DEADLINE;
    while !w.log().contains("No space left on device") {
        assert!(
            Instant::now() < deadline,
            "no disk-full failure:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    disk.resize("200m");
    let (name, _) = w.next_sealed();
    assert!(name.ends_with("/run-a"), "{name}");
    w.stop();
    env.ok(&["verify"]);
    let out = env.path("out");
    env.ok(&["export", &name, out.to_str().unwrap()]);
    common::assert_same_tree(&run, &out);
}

/// A file deeper than PATH_MAX, appended to every 500 ms for 6 s: inotify cannot watch its
/// directory by path and reports none of it, yet the run is not sealed while it changes (the
/// watcher checks the tree's change times before a quiet seal): the sealed file has every line.
#[test]
fn changes_inotify_misses_still_keep_a_run_from_sealing() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let env = Env::new();
    let spool = env.path("gb");
    std::fs::create_dir(&spool).unwrap();
    let w = Watcher::start(&env, &spool, &["--namespace", "lab"], "watch.log");

    // The directories, each named through a descriptor of its parent.
    let run = spool.join("deep");
    std::fs::create_dir(&run).unwrap();
    let mut dir = File::open(&run).unwrap();
    let via = |d: &File, name: &str| format!("/proc/self/fd/{}/{name}", d.as_raw_fd());
    for i in 0..24 {
        let name = format!("{i:02}{}", "d".repeat(198));
        std::fs::create_dir(via(&dir, &name)).unwrap();
        dir = File::open(via(&dir, &name)).unwrap();
    }
    const LINES: usize = 12;
    for k in 0..LINES {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(via(&dir, "deep.txt"))
            .unwrap();
        writeln!(f, "line {k:02}").unwrap();
        drop(f);
        std::thread::sleep(Duration::from_millis(500));
    }
    let (sealed, _) = w.next_sealed();
    assert_eq!(sealed, "lab/deep");
    let manifest: serde_json::Value =
        serde_json::from_str(&env.ok(&["manifest", "lab/deep", "--json"])).unwrap();
    let deep = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"].as_str().unwrap().ends_with("/deep.txt"))
        .expect("deep.txt in the manifest");
    assert_eq!(
        deep["size"],
        "line 00\n".len() * LINES,
        "the run sealed while its deep file still grew"
    );
    assert!(
        w.log().contains("without an inotify event"),
        "the tree's change times held the seal back:\n{}",
        w.log()
    );
    w.stop();
}
