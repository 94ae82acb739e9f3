//! `artifactfs mount --nats URL`: the store's events reach the NATS server's JetStream stream
//! while the mount runs, in order and once each, as `.artifactfs/events` lists them. Needs a
//! nats-server with JetStream (`tools/nats/start.sh`; `ARTIFACTFS_TEST_NATS`).

mod common;
#[path = "common/jetstream.rs"]
mod jetstream;

use std::fs;
use std::time::{Duration, Instant};

use common::Env;
use common::mount::{Mount, seal};

fn nats_url() -> String {
    std::env::var("ARTIFACTFS_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The (message id, subject, kind) of every message of this store in the stream, in order.
fn stream_of(store_id: &str) -> Vec<(String, String, String)> {
    jetstream::read_stream(&nats_url(), "ARTIFACTFS_EVENTS", Duration::from_secs(10))
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.msg_id.starts_with(store_id))
        .map(|m| {
            let kind = m.payload["kind"].as_str().unwrap().to_owned();
            (m.msg_id, m.subject, kind)
        })
        .collect()
}

/// A new store's id.
fn init_store(env: &Env) -> String {
    env.ok(&["init"]);
    let config = fs::read_to_string(env.store().join("config.toml")).unwrap();
    config
        .lines()
        .find_map(|l| l.strip_prefix("store_id = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("store_id in config.toml")
}

/// The stream's messages of `store_id`, once there are `n` (the publisher polls the log about
/// once a second; the deadline is against hangs only).
fn wait_stream(store_id: &str, n: usize) -> Vec<(String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = stream_of(store_id);
    while got.len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = stream_of(store_id);
    }
    got
}

#[test]
fn the_mount_publishes_its_events_to_nats() {
    let env = Env::new();
    let store_id = init_store(&env);
    let url = nats_url();
    let m = Mount::start(
        &env,
        &env.path("mnt"),
        &["--seal-after", "1h", "--nats", &url],
    );
    fs::create_dir_all(m.p("lab/r1")).unwrap();
    fs::write(m.p("lab/r1/out.txt"), b"published").unwrap();
    seal(&m.p("lab/r1"));
    xattr::set(m.p("lab/r1"), "user.hold.audit", b"ticket 9").unwrap();
    let log: Vec<serde_json::Value> = fs::read_to_string(m.p(".artifactfs/events"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<(String, String, String)> = log
        .iter()
        .map(|e| {
            let kind = e["kind"].as_str().unwrap().to_owned();
            (
                format!("{store_id}-{}", e["seq"]),
                format!("artifactfs.events.lab.{kind}"),
                kind,
            )
        })
        .collect();
    assert_eq!(
        want.iter().map(|w| w.2.as_str()).collect::<Vec<_>>(),
        ["run.opened", "run.sealed", "run.hold_placed"]
    );
    assert_eq!(wait_stream(&store_id, want.len()), want);
    m.unmount();
    let cursor = fs::read_to_string(env.store().join("nats-cursor")).unwrap();
    assert!(
        cursor.contains(&log.last().unwrap()["seq"].to_string()),
        "{cursor}"
    );
}

/// `artifactfs serve --nats URL` publishes too: a run ingested through the server's control
/// socket and its retention reach the stream in order.
#[test]
fn the_server_publishes_its_events_to_nats() {
    let env = Env::new();
    let store_id = init_store(&env);
    let mut child = env
        .std_cmd(&["serve", "--listen", "127.0.0.1:0", "--nats", &nats_url()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on http://"), "{line:?}");
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"served").unwrap();
    env.ok(&["ingest", src.to_str().unwrap(), "lab/r2"]);
    env.ok(&["retain", "lab/r2", "30d"]);
    let got = wait_stream(&store_id, 3);
    let kinds: Vec<&str> = got.iter().map(|g| g.2.as_str()).collect();
    assert_eq!(
        kinds,
        ["run.opened", "run.sealed", "run.retention"],
        "{got:?}"
    );
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.0, format!("{store_id}-{}", i + 1));
        assert_eq!(g.1, format!("artifactfs.events.lab.{}", g.2));
    }
    assert!(common::terminate(&mut child).success());
}
