//! Crash safety: kill -9 of the CLI at many points of an ingest never leaves a store that fails
//! to verify, never shows a half-ingested run, and the next ingest succeeds; kill -9 of the
//! mount while producers write or while a run seals loses no file that was closed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, assert_same_tree};
use guide_board_sim::generate::{Options, generate};

/// Generates `runs` guide-board-sim runs of `size` bytes and `small_files` small files under
/// `ENV/runs`; returns that directory.
fn generated(env: &Env, seed: u64, runs: u32, size: u64, small_files: u64) -> PathBuf {
    let out = env.path("runs");
    generate(
        &Options {
            out: out.clone(),
            seed,
            runs,
            size,
            small_files: Some(small_files),
            first_run: 0,
        },
        |_| {},
    )
    .unwrap();
    out
}

/// Runs `artifactfs ARGS` and kill -9s it `after` its start; whether it had exited by then,
/// and how it ended.
fn killed_after(env: &Env, args: &[&str], after: Duration) -> (bool, ExitStatus) {
    let mut child = env
        .std_cmd(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill(); // SIGKILL
    (finished, child.wait().unwrap())
}

#[test]
fn kill_9_during_ingest_loses_nothing_committed() {
    let env = Env::new();
    let runs_dir = generated(&env, 7, 2, 96 << 20, 2000);
    let src0 = runs_dir.join("run-0000");
    let src1 = runs_dir.join("run-0001");
    env.ingest(&src0, "lab/base");

    // How long an undisturbed ingest takes here, to spread the kill points over it.
    let t = Instant::now();
    env.ingest(&src1, "lab/timing");
    let full = t.elapsed();

    // Kill points from very early to nearly done, in a fixed pseudo-random order.
    let fractions = [0.05, 0.6, 0.25, 0.9, 0.4, 0.75, 0.15, 0.5];
    let mut sealed_by_race = 0;
    for (i, f) in fractions.iter().enumerate() {
        let name = format!("lab/crash-{i}");
        let (finished_before_kill, status) = killed_after(
            &env,
            &["ingest", src1.to_str().unwrap(), &name],
            full.mul_f64(*f),
        );

        let visible = env.run_info(&name).is_some();
        if finished_before_kill && status.success() {
            assert!(visible, "{name} finished but is not listed");
        }
        if visible {
            // The kill landed after the commit (the process was exiting): the run must be
            // whole, never half-ingested.
            sealed_by_race += 1;
            env.ok(&["verify", &name]);
            let listed = |run: &str| -> (u64, u64) {
                let r = env.run_info(run).expect("listed");
                (
                    r["files"].as_u64().unwrap(),
                    r["raw_bytes"].as_u64().unwrap(),
                )
            };
            assert_eq!(
                listed(&name),
                listed("lab/timing"),
                "{name} is listed but not whole"
            );
        }
        let out = env.run(&["verify"]);
        assert!(
            out.status.success(),
            "verify failed after kill at {f}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        sealed_by_race < fractions.len(),
        "no ingest was ever interrupted"
    );

    // The next ingest of the same tree succeeds and exports exactly.
    env.ingest(&src1, "lab/after");
    env.ok(&["export", "lab/after", env.path("out").to_str().unwrap()]);
    assert_same_tree(&src1, &env.path("out"));
    assert!(env.ok(&["verify"]).contains("ok"));
}

#[test]
fn kill_9_during_an_index_rebuild_never_leaves_a_partial_index_in_use() {
    let env = Env::new();
    let src = generated(&env, 9, 1, 48 << 20, 300).join("run-0000");
    for i in 0..6 {
        env.ingest(&src, &format!("lab/r{i}"));
    }
    let listed = env.ok(&["runs"]);
    let t = Instant::now();
    env.ok(&["index", "rebuild"]);
    let full = t.elapsed();
    let mut interrupted = 0;
    for f in [0.1, 0.5, 0.3, 0.8, 0.05, 0.65] {
        let (finished, _) = killed_after(&env, &["index", "rebuild"], full.mul_f64(f));
        // Either the store is whole, or it refuses to open and says what to do.
        let out = env.run(&["runs"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), listed, "kill at {f}");
        } else {
            assert!(!finished, "a finished rebuild left the store closed");
            interrupted += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("artifactfs index rebuild"), "{err}");
            env.ok(&["index", "rebuild"]);
            assert_eq!(env.ok(&["runs"]), listed);
        }
        env.ok(&["verify"]);
    }
    eprintln!("{interrupted} of 6 rebuilds interrupted");
    assert!(interrupted > 0, "no rebuild was ever interrupted");
}

/// A file a producer wrote through the mount and closed without an error: (path in the run,
/// size, seed of its bytes).
type Closed = (String, usize, u64);

/// Writes files number `first`, `first + 1`, … into `run` until an operation fails (the mount
/// is gone) or `stop` is set, and returns the number of the first file it did not close. Each
/// file is pushed to `closed` only once its `close` returned 0. Sizes mix inline small files
/// with files large enough to be chunked ahead into packs; every fifth file is fsynced first.
fn produce(
    run: PathBuf,
    first: usize,
    closed: Arc<Mutex<Vec<Closed>>>,
    stop: Arc<AtomicBool>,
) -> usize {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    for i in first.. {
        if stop.load(Ordering::Relaxed) {
            return i;
        }
        let rel = format!("d{}/f{i}", i % 7);
        let size = match i % 10 {
            0 => 300_000 + (i * 7919) % 2_700_000,
            3 => 0,
            _ => (i * 104_729) % 20_000,
        };
        let seed = 1_000 + i as u64;
        let data = common::bytes(size, seed);
        let path = run.join(&rel);
        let wrote = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap())?;
            let mut f = std::fs::File::create(&path)?;
            for piece in data.chunks(64 << 10) {
                f.write_all(piece)?;
            }
            if i % 5 == 1 {
                f.sync_all()?;
            }
            nix::unistd::close(f.into_raw_fd())?;
            Ok(())
        })();
        if wrote.is_err() {
            return i;
        }
        closed.lock().unwrap().push((rel, size, seed));
    }
    unreachable!("the producer writes until it is stopped")
}

/// Every file the producers closed is in `run` with its bytes.
fn assert_closed_files_kept(run: &Path, closed: &[Closed], when: &str) {
    for (rel, size, seed) in closed {
        let got = std::fs::read(run.join(rel))
            .unwrap_or_else(|e| panic!("{when}: closed file {rel} is gone: {e}"));
        assert!(
            got == common::bytes(*size, *seed),
            "{when}: closed file {rel} has other bytes ({} of {size})",
            got.len()
        );
    }
}

#[test]
fn kill_9_of_the_mount_mid_write_and_mid_seal_loses_nothing_closed() {
    use common::mount::{Mount, seal, state};

    let env = Env::new();
    let mnt = env.path("mnt");
    let args = ["--seal-after", "1h"];
    // Kill points while a producer writes, in milliseconds after it starts.
    let write_kills = [150u64, 900, 400, 1300];
    let closed = Arc::new(Mutex::new(Vec::new()));
    let mut next = 0;
    for (round, after) in write_kills.iter().enumerate() {
        let m = Mount::start(&env, &mnt, &args);
        let run = m.p("lab/written");
        std::fs::create_dir_all(&run).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (run, closed, stop) = (run.clone(), closed.clone(), stop.clone());
            std::thread::spawn(move || produce(run, next, closed, stop))
        };
        std::thread::sleep(Duration::from_millis(*after));
        m.kill9();
        next = producer.join().unwrap();
        let done = closed.lock().unwrap().clone();

        let m = Mount::start(&env, &mnt, &args);
        assert_eq!(state(&run), "open", "round {round}");
        assert_closed_files_kept(&run, &done, &format!("after kill {round}"));
        env.ok(&["verify"]);
        m.unmount();
    }
    let done = closed.lock().unwrap().clone();
    assert!(
        done.len() > 20,
        "the producer closed only {} files",
        done.len()
    );

    // Kill points while a run seals: a run of a few thousand files, killed at fractions of an
    // undisturbed seal's time (measured on a copy of the same files).
    let m = Mount::start(&env, &mnt, &args);
    let fill = |run: &str, closed: &Arc<Mutex<Vec<Closed>>>| {
        let dir = m.p(run);
        std::fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (closed.clone(), stop.clone());
        let t = std::thread::spawn(move || produce(dir, 0, c, s));
        std::thread::sleep(Duration::from_millis(2500));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    };
    let timing = Arc::new(Mutex::new(Vec::new()));
    fill("lab/timing", &timing);
    let t = Instant::now();
    seal(&m.p("lab/timing"));
    let full = t.elapsed();
    let mut runs = Vec::new();
    for i in 0..4 {
        let c = Arc::new(Mutex::new(Vec::new()));
        fill(&format!("lab/seal-{i}"), &c);
        runs.push((format!("lab/seal-{i}"), c));
    }
    m.unmount();
    let mut interrupted = 0;
    for (i, (run, c)) in runs.iter().enumerate() {
        let m = Mount::start(&env, &mnt, &args);
        let dir = m.p(run);
        let sealing = {
            let dir = dir.clone();
            std::thread::spawn(move || xattr::set(&dir, "user.artifactfs.seal", b"1").is_ok())
        };
        std::thread::sleep(full.mul_f64([0.1, 0.5, 0.8, 1.5][i]));
        m.kill9();
        let sealed_before_kill = sealing.join().unwrap();

        let m = Mount::start(&env, &mnt, &args);
        let after = state(&dir);
        if sealed_before_kill {
            assert_eq!(
                after, "sealed",
                "{run}: the seal returned, but did not last"
            );
        }
        if after == "open" {
            interrupted += 1;
            seal(&dir);
        }
        let done = c.lock().unwrap().clone();
        assert_closed_files_kept(&dir, &done, run);
        env.ok(&["verify", run]);
        m.unmount();
        let out = env.path(&format!("out-{i}"));
        env.ok(&["export", run, out.to_str().unwrap()]);
        assert_closed_files_kept(&out, &done, &format!("export of {run}"));
    }
    eprintln!(
        "{interrupted} of {} seals interrupted; an undisturbed seal of {} files took {full:?}",
        runs.len(),
        timing.lock().unwrap().len()
    );
    assert!(env.ok(&["verify"]).contains("ok"));
}
