//! The guide-board pilot end to end: the producer writes runs into a real FUSE mount the way
//! the lab harness does (two at once, then one with a marker); each run seals (on quiet, on
//! its marker), carries its Statehub id and producer metadata, takes a retention and a hold by
//! `setfattr` that the CLI views agree with, logs opened → sealed → retention → hold in order,
//! and exports bit-exact against the generator's reference tree. Then the same with the store
//! tiered to the Ceph RGW bucket (`tools/ceph-rgw/start.sh`, idempotent): push, snapshot,
//! rebuild into a new store from the bucket alone, and every run exports bit-exact with its
//! retention and hold intact.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::mount::{Mount, wait_sealed};
use common::rgw::{Bucket, gateway_env};
use common::{Env, assert_same_tree};
use guide_board_sim::generate::{Options, generate, run_mtime, run_name};
use guide_board_sim::produce::{ProduceOptions, produce, run_xattrs};

const NS: &str = "guide-board";
const SEED: u64 = 42;
const SIZE: u64 = 2 << 20;
const MARKER: &str = "_SUCCESS";
/// Against hangs only.
const DEADLINE: Duration = Duration::from_secs(120);

/// `artifactfs --store STORE ARGS…` with extra environment (the gateway's, for a tiered store).
fn afs(store: &Path, vars: &[(String, String)], args: &[&str]) -> String {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("artifactfs"));
    c.env_remove("ARTIFACTFS_STORE")
        .env_remove("ARTIFACTFS_CLOCK_FILE")
        .arg("--store")
        .arg(store)
        .args(args);
    for (k, v) in vars {
        c.env(k, v);
    }
    let out = c.output().expect("run artifactfs");
    assert!(
        out.status.success(),
        "artifactfs {args:?} failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn afs_json(store: &Path, vars: &[(String, String)], args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&afs(store, vars, args)).expect("json output")
}

/// One run of the pilot: how it was produced.
struct Case {
    opts: ProduceOptions,
    index: u32,
}

impl Case {
    fn run(&self) -> String {
        format!("{NS}/{}", run_name(u64::from(self.index)))
    }

    /// The generator's tree of this run, with what the mount keeps of the producer's tags
    /// (`user.retain` is the run's retention there, not an xattr) and the marker, if any.
    fn reference(&self, env: &Env) -> PathBuf {
        let out = env.path(&format!("ref-{}", self.index));
        let root = out.join(run_name(u64::from(self.index)));
        if root.exists() {
            return root;
        }
        generate(
            &Options {
                out: out.clone(),
                seed: self.opts.seed,
                runs: 1,
                size: self.opts.size,
                small_files: None,
                first_run: self.index,
            },
            |_| {},
        )
        .unwrap();
        for (k, v) in run_xattrs(&self.opts, u64::from(self.index)) {
            if k != "user.retain" {
                xattr::set(&root, &k, v.as_bytes()).unwrap();
            }
        }
        if let Some(m) = &self.opts.marker {
            let mtime = run_mtime(u64::from(self.index));
            let f = File::create(root.join(m)).unwrap();
            f.set_modified(mtime).unwrap();
            File::open(&root).unwrap().set_modified(mtime).unwrap();
        }
        root
    }
}

fn produced(mnt: &Path, first: u32, runs: u32, producers: usize, marker: bool) -> ProduceOptions {
    ProduceOptions {
        out: mnt.to_path_buf(),
        namespace: Some(NS.into()),
        seed: SEED,
        runs,
        first_run: first,
        size: SIZE,
        small_files: None,
        retain: Some("90d".into()),
        statehub_id_prefix: "statehub:lab-7:".into(),
        pace: Duration::from_millis(100),
        producers,
        marker: marker.then(|| MARKER.to_string()),
    }
}

/// The pilot through a mount of the store in `env` (tiered or not: `vars` reach every
/// command). Returns the cases, sealed, with retention 1y and hold `audit` placed.
fn pilot(env: &Env, vars: &[(String, String)]) -> Vec<Case> {
    let m = Mount::start_with(
        env,
        &env.path("mnt"),
        &["--seal-after", "2s", "--seal-marker", MARKER],
        vars,
    );
    let two = produced(&m.mnt, 0, 2, 2, false);
    produce(&two, |_| {}).unwrap();
    let marked = produced(&m.mnt, 2, 1, 1, true);
    produce(&marked, |_| {}).unwrap();
    let cases = vec![
        Case {
            opts: two.clone(),
            index: 0,
        },
        Case {
            opts: two,
            index: 1,
        },
        Case {
            opts: marked,
            index: 2,
        },
    ];
    let store = env.store();
    for c in &cases {
        let dir = m.mnt.join(c.run());
        wait_sealed(&dir, DEADLINE);

        // The manifest carries the Statehub id and the producer's metadata.
        let man = afs_json(&store, vars, &["manifest", &c.run(), "--json"]);
        let meta = &man["metadata"];
        assert_eq!(
            meta["statehub.run_id"],
            format!("statehub:lab-7:run-{:04}", c.index),
            "{meta}"
        );
        assert_eq!(meta["producer.seed"], SEED.to_string(), "{meta}");
        assert_eq!(meta["producer.run"], c.index.to_string(), "{meta}");
        assert!(
            meta["producer"]
                .as_str()
                .is_some_and(|p| p.starts_with("guide-board-sim")),
            "{meta}"
        );

        // Retention (tagged 90d by the producer) extended, and a hold, by setfattr.
        let before = afs_json(&store, vars, &["retain", &c.run(), "--json"]);
        assert_eq!(before["retain"], "90d", "{before}");
        xattr::set(&dir, "user.retain", b"1y").unwrap();
        xattr::set(&dir, "user.hold.audit", b"pilot review").unwrap();
        let after = afs_json(&store, vars, &["retain", &c.run(), "--json"]);
        assert_eq!(after["retain"], "1y", "{after}");
        let holds = afs_json(&store, vars, &["hold", "ls", &c.run(), "--json"]);
        assert_eq!(holds[0]["name"], "audit", "{holds}");
        assert_eq!(holds[0]["reason"], "pilot review", "{holds}");
        let view: serde_json::Value = serde_json::from_slice(
            &fs::read(m.mnt.join(".artifactfs/retention").join(c.run())).unwrap(),
        )
        .unwrap();
        assert_eq!(view["retain"], "1y", "{view}");
        assert_eq!(view["retain_until"], after["retain_until"], "{view}");
        assert_eq!(view["eligible"], false, "{view}");

        // Events of this run, in order: opened, (the producer's retention), sealed, the
        // retention set afterwards, the hold.
        let events = fs::read_to_string(m.mnt.join(".artifactfs/events")).unwrap();
        let kinds: Vec<String> = events
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["namespace"] == NS && e["run"] == run_name(u64::from(c.index)))
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect();
        let want = [
            "run.opened",
            "run.sealed",
            "run.retention",
            "run.hold_placed",
        ];
        let mut at = 0;
        for k in &kinds {
            if at < want.len() && k == want[at] {
                at += 1;
            }
        }
        assert_eq!(at, want.len(), "events of {}: {kinds:?}", c.run());
        assert_eq!(kinds.first().map(String::as_str), Some("run.opened"));

        // Bit-exact export against the generated reference.
        let dest = env.path(&format!("export-{}", c.index));
        afs(&store, vars, &["export", &c.run(), dest.to_str().unwrap()]);
        assert_same_tree(&c.reference(env), &dest);
        fs::remove_dir_all(&dest).unwrap();
    }
    m.unmount();
    cases
}

#[test]
fn pilot_through_a_mount() {
    let env = Env::new();
    let cases = pilot(&env, &[]);
    assert_eq!(cases.len(), 3);
    assert!(afs(&env.store(), &[], &["verify"]).contains("ok"));
}

/// The pilot on a store tiered to RGW, then a new store rebuilt from the bucket alone: every
/// run exports bit-exact from it, with its retention and hold. Retention and holds are index
/// state (not in manifests): they reach the bucket in an index snapshot, so the pilot takes
/// one after setting them (docs/pilot.md).
#[test]
fn pilot_tiered_then_rebuilt_from_the_bucket() {
    let env = Env::new();
    let vars = gateway_env().clone();
    let b = Bucket::new("pilot");
    let store = env.store();
    afs(
        &store,
        &vars,
        &["init", "--pack-size", "1MiB", "--backend", &b.url()],
    );
    let cases = pilot(&env, &vars);

    let pushed = afs_json(&store, &vars, &["tier", "push", "--json"]);
    assert_eq!(pushed["still_pending"], 0, "{pushed}");
    afs(&store, &vars, &["tier", "snapshot"]);
    let status = afs_json(&store, &vars, &["tier", "status", "--json"]);
    assert_eq!(
        (
            status["pending_packs"].as_u64(),
            status["pending_manifests"].as_u64()
        ),
        (Some(0), Some(0)),
        "{status}"
    );

    let fresh = env.path("rebuilt");
    let report = afs_json(
        &fresh,
        &vars,
        &["index", "rebuild", "--from", &b.url(), "--json"],
    );
    assert_eq!(report["runs"], 3, "{report}");
    assert!(report["snapshot"].is_string(), "{report}");
    for c in &cases {
        let dest = env.path(&format!("rebuilt-export-{}", c.index));
        afs(&fresh, &vars, &["export", &c.run(), dest.to_str().unwrap()]);
        assert_same_tree(&c.reference(&env), &dest);
        let r = afs_json(&fresh, &vars, &["retain", &c.run(), "--json"]);
        assert_eq!(r["retain"], "1y", "{r}");
        let holds = afs_json(&fresh, &vars, &["hold", "ls", &c.run(), "--json"]);
        assert_eq!(holds[0]["name"], "audit", "{holds}");
        let man = afs_json(&fresh, &vars, &["manifest", &c.run(), "--json"]);
        assert_eq!(
            man["metadata"]["statehub.run_id"],
            format!("statehub:lab-7:run-{:04}", c.index)
        );
    }
    assert!(afs(&fresh, &vars, &["verify"]).contains("ok"));
}
