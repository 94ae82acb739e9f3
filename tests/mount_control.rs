//! Commands on a store that a mount owns: they reach the mount over `STORE/control.sock` and
//! behave as they do on a free store; `seal` through the mount and offline; a dead mount's
//! socket and a second mount of the same store.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::Env;
use common::mount::{Mount, state};

const TIMEOUT: Duration = Duration::from_secs(120);

fn src_tree(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a"), b"alpha").unwrap();
    fs::write(src.join("sub/b"), common::bytes(3_000_000, 5)).unwrap();
    src
}

/// `artifactfs ARGS…` in the test's scratch directory, with a timeout so a hang fails.
fn run_in(env: &Env, args: &[&str]) -> std::process::Output {
    env.cmd(args)
        .current_dir(env.dir.path())
        .timeout(TIMEOUT)
        .output()
        .unwrap()
}

fn ok_in(env: &Env, args: &[&str]) -> String {
    let out = run_in(env, args);
    assert!(
        out.status.success(),
        "artifactfs {args:?} failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn commands_reach_a_running_mount() {
    let env = Env::new();
    let src = src_tree(&env);
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    assert!(env.store().join("control.sock").exists());
    fs::create_dir_all(m.p("ns/open")).unwrap();
    fs::write(m.p("ns/open/f"), b"open file").unwrap();

    let runs = ok_in(&env, &["runs"]);
    assert!(runs.contains("ns/open\topen"), "{runs}");

    // Relative paths are the caller's; the new run is in the mount at once, even right after
    // a lookup that did not find it.
    assert!(!m.p("ns/new").exists());
    let report: serde_json::Value =
        serde_json::from_str(&ok_in(&env, &["ingest", "src", "ns/new", "--json"])).unwrap();
    assert_eq!(fs::read(m.p("ns/new/a")).unwrap(), b"alpha");
    assert_eq!(
        fs::read(m.p("ns/new/sub/b")).unwrap(),
        common::bytes(3_000_000, 5)
    );
    assert_eq!(state(&m.p("ns/new")), "sealed");
    let digest = xattr::get(m.p("ns/new"), "user.artifactfs.manifest")
        .unwrap()
        .unwrap();
    assert_eq!(report["manifest"].as_str().unwrap().as_bytes(), digest);

    let ls = ok_in(&env, &["ls", "ns/new"]);
    assert!(ls.contains(" a\n") && ls.contains(" sub\n"), "{ls}");
    let out = run_in(&env, &["cat", "ns/new/sub/b"]);
    assert!(out.status.success());
    assert!(out.stdout == common::bytes(3_000_000, 5));
    let manifest = run_in(&env, &["manifest", "ns/new", "--json"]).stdout;
    assert_eq!(
        manifest.strip_suffix(b"\n").unwrap(),
        fs::read(m.p(".artifactfs/manifests/ns/new.json")).unwrap()
    );
    ok_in(&env, &["export", "ns/new", "out"]);
    common::assert_same_tree(&src, &env.path("out"));
    assert!(ok_in(&env, &["verify"]).contains("ok"));
    let stats: serde_json::Value =
        serde_json::from_str(&ok_in(&env, &["stats", "--json"])).unwrap();
    assert_eq!(stats["runs_sealed"], 1);
    assert_eq!(stats["runs_open"], 1);

    // Errors keep their message and exit status.
    let out = run_in(&env, &["cat", "ns/missing/x"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = run_in(&env, &["ingest", "src", "ns/new"]);
    assert_eq!(out.status.code(), Some(6));
    let out = run_in(&env, &["ingest", "no-such-dir", "ns/other"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-dir"),
        "the error names the path"
    );
    assert!(m.log_text().contains("command from the control socket"));
    m.unmount();
    assert!(!env.store().join("control.sock").exists());
    assert!(ok_in(&env, &["runs"]).contains("ns/new\tsealed"));
}

#[test]
fn seal_through_the_mount_and_offline() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    fs::create_dir_all(m.p("ns/r/d")).unwrap();
    fs::write(m.p("ns/r/d/f"), b"sealed by command").unwrap();
    let open = OpenOptions::new()
        .append(true)
        .open(m.p("ns/r/d/f"))
        .unwrap();
    let out = run_in(&env, &["seal", "ns/r"]);
    assert_eq!(out.status.code(), Some(9), "busy while a file is open");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("open files"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state(&m.p("ns/r")), "open");
    drop(open);
    let digest = ok_in(&env, &["seal", "ns/r"]);
    assert_eq!(state(&m.p("ns/r")), "sealed");
    let xattr = xattr::get(m.p("ns/r"), "user.artifactfs.manifest")
        .unwrap()
        .unwrap();
    assert_eq!(digest.trim().as_bytes(), xattr);
    // Sealing again is not an error: the digest is the same.
    let out = run_in(&env, &["seal", "ns/r"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), digest);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already sealed"));
    assert_eq!(run_in(&env, &["seal", "ns/none"]).status.code(), Some(3));
    assert_eq!(run_in(&env, &["seal", "bad name"]).status.code(), Some(7));

    // A run left open by a mount is sealed without one.
    fs::create_dir_all(m.p("ns/left")).unwrap();
    fs::write(m.p("ns/left/g"), b"left open").unwrap();
    m.unmount();
    assert!(ok_in(&env, &["runs"]).contains("ns/left\topen"));
    let digest = ok_in(&env, &["seal", "ns/left"]);
    let runs = ok_in(&env, &["runs"]);
    assert!(runs.contains("ns/left\tsealed"), "{runs}");
    assert!(runs.contains(digest.trim()), "{runs}");
    assert_eq!(
        run_in(&env, &["cat", "ns/left/g"]).stdout,
        b"left open".to_vec()
    );
    ok_in(&env, &["verify"]);
}

#[test]
fn a_dead_mount_does_not_hang_commands_and_a_second_mount_is_refused() {
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let mnt2 = env.path("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    for extra in [&["--foreground"][..], &[][..]] {
        let mut args = vec!["mount", mnt2.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run_in(&env, &args);
        assert_eq!(out.status.code(), Some(5), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("already owned"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!common::mount::is_mounted(&mnt2));
    fs::create_dir_all(m.p("ns/r")).unwrap();
    m.kill9();

    // The socket file stays behind; the lock says nobody owns the store.
    let sock = env.store().join("control.sock");
    assert!(sock.exists());
    assert!(ok_in(&env, &["runs"]).contains("ns/r\topen"));

    // Owned by a process that is not a mount: a stale socket answers nothing, status 5.
    let lock = File::options()
        .read(true)
        .write(true)
        .open(env.store().join("lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let out = run_in(&env, &["runs", "--lock-wait", "0"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mount answers"));
    drop(lock);

    // A new mount replaces the stale socket.
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    assert!(ok_in(&env, &["runs"]).contains("ns/r\topen"));
    assert!(m.log_text().contains("removed a stale control socket"));
    m.unmount();
}

/// `cat` of a large file through the mount streams: the mount's peak memory does not grow by
/// the file's size.
#[test]
fn a_mount_started_while_a_command_holds_the_store_waits_for_it() {
    let env = Env::new();
    ok_in(&env, &["init"]);
    // Held by a process that takes no commands, as an `ingest` would, for a moment.
    let held = artifactfs_core::Store::open(&env.store()).unwrap();
    let letgo = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(held);
    });
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    letgo.join().unwrap();
    assert!(
        m.log_text()
            .contains("waiting up to 2m for it (--lock-wait)"),
        "{}",
        m.log_text()
    );
    fs::create_dir_all(m.p("ns/r")).unwrap();
    assert!(ok_in(&env, &["runs"]).contains("ns/r\topen"));
    drop(m);

    // Detached: `mount` returns 0 once the mount is up, after the wait.
    let held = artifactfs_core::Store::open(&env.store()).unwrap();
    let letgo = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(held);
    });
    let mnt = env.path("mnt2");
    fs::create_dir_all(&mnt).unwrap();
    let out = run_in(
        &env,
        &["mount", mnt.to_str().unwrap(), "--seal-after", "1h"],
    );
    letgo.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("waiting up to 2m"), "{err}");
    assert!(common::mount::is_mounted(&mnt));
    assert!(ok_in(&env, &["runs"]).contains("ns/r\topen"));
    ok_in(&env, &["umount", mnt.to_str().unwrap()]);
}

#[test]
fn cat_through_the_mount_streams() {
    let env = Env::new();
    let src = env.path("big");
    fs::create_dir_all(&src).unwrap();
    let size: u64 = 768 << 20;
    let mut f = File::create(src.join("zeros")).unwrap();
    f.set_len(size).unwrap();
    f.write_all(b"head").unwrap();
    drop(f);
    env.ingest(&src, "ns/big");
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let before = m.peak_rss_kib();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --store {} cat ns/big/zeros | wc -c",
            assert_cmd::cargo::cargo_bin("artifactfs").display(),
            env.store().display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        size.to_string()
    );
    let after = m.peak_rss_kib();
    assert!(
        after < before + (256 << 10),
        "peak RSS of the mount went from {before} KiB to {after} KiB for a {size}-byte cat"
    );
    m.unmount();
}

/// Only root and the mount's own uid may send commands: the socket is mode 0600, and the mount
/// checks the peer's uid too (here with the socket opened up on purpose).
#[test]
fn other_users_cannot_use_the_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let sock = env.store().join("control.sock");
    assert_eq!(
        fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // `nobody` can reach the store's lock, and so finds the store owned.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(env.store().join("lock"), fs::Permissions::from_mode(0o666)).unwrap();
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(assert_cmd::cargo::cargo_bin("artifactfs"))
            .arg("--store")
            .arg(env.store())
            .arg("runs")
            .output()
            .unwrap()
    };
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("ermission denied"), "{err}");

    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("uid 65534 may not use this store's control socket"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(m.log_text().contains("refused a command from uid 65534"));
    m.unmount();
}

/// A store deleted and made again at the same path while its old mount still runs: the old
/// mount's exit leaves the new mount's control socket alone, and commands reach the new one.
#[test]
fn an_old_mount_leaving_keeps_a_new_mounts_socket() {
    let env = Env::new();
    let old = Mount::start(&env, &env.path("mnt-old"), &["--seal-after", "1h"]);
    fs::remove_dir_all(env.store()).unwrap();
    let new = Mount::start(&env, &env.path("mnt-new"), &["--seal-after", "1h"]);
    fs::create_dir_all(new.p("ns/r")).unwrap();
    old.unmount();
    assert!(env.store().join("control.sock").exists());
    let runs = env.ok(&["runs"]);
    assert!(runs.contains("ns/r"), "{runs}");
    new.unmount();
    assert!(!env.store().join("control.sock").exists());
}

/// A forwarded `ingest` whose client is killed stops in the mount before sealing: the run is
/// not there, the mount's log says why, and the same ingest succeeds afterwards.
#[test]
fn a_forwarded_ingest_stops_when_its_client_is_killed() {
    let env = Env::new();
    let src = env.path("big");
    fs::create_dir_all(&src).unwrap();
    // 16 GiB of holes: several seconds to read and cut, nothing on disk.
    let f = File::create(src.join("zeros")).unwrap();
    f.set_len(16 << 30).unwrap();
    drop(f);
    let m = Mount::start(&env, &env.path("mnt"), &["--seal-after", "1h"]);
    let mut client = Command::new(assert_cmd::cargo::cargo_bin("artifactfs"))
        .arg("--store")
        .arg(env.store())
        .args(["ingest", src.to_str().unwrap(), "ns/stopped"])
        .env_remove("ARTIFACTFS_STORE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !m.log_text().contains("command from the control socket") {
        assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
        assert!(
            client.try_wait().unwrap().is_none(),
            "the ingest ended before it could be stopped:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    client.kill().unwrap();
    client.wait().unwrap();
    while !m.log_text().contains("command done") {
        assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = m.log_text();
    assert!(log.contains("stopping its command"), "{log}");
    assert!(log.contains("code=12"), "{log}");
    assert!(!m.p("ns/stopped").exists());
    let runs = ok_in(&env, &["runs"]);
    assert!(!runs.contains("ns/stopped"), "{runs}");
    // The same run name is free: a small tree ingests into it through the mount.
    let small = src_tree(&env);
    ok_in(&env, &["ingest", small.to_str().unwrap(), "ns/stopped"]);
    assert_eq!(fs::read(m.p("ns/stopped/a")).unwrap(), b"alpha");
    m.unmount();
}
