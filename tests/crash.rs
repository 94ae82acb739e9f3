//! Crash safety: kill -9 of the CLI at many points of an ingest never leaves a store that fails
//! to verify, never shows a half-ingested run, and the next ingest succeeds.

mod common;

use std::time::Instant;

use common::{Env, assert_same_tree};
use guide_board_sim::generate::{Options, generate};

#[test]
fn kill_9_during_ingest_loses_nothing_committed() {
    let env = Env::new();
    let runs_dir = env.path("runs");
    generate(
        &Options {
            out: runs_dir.clone(),
            seed: 7,
            runs: 2,
            size: 96 << 20,
            small_files: Some(2000),
            first_run: 0,
        },
        |_| {},
    )
    .unwrap();
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
        let mut child = env
            .std_cmd(&["ingest", src1.to_str().unwrap(), &name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(*f));
        let finished_before_kill = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();

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
