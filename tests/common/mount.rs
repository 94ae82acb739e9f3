//! A real `artifactfs mount --foreground` child for end-to-end tests, owned by a guard that
//! unmounts (lazily if busy) and kills it on drop, so a failing test never leaves a hung mount;
//! and small helpers for what tests check through a mount.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Env, Node, snapshot};

pub fn is_mounted(dir: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_str().unwrap().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()) && l.contains(" - fuse"))
}

/// A running `artifactfs mount --foreground`.
pub struct Mount {
    child: Option<Child>,
    pub mnt: PathBuf,
    log: PathBuf,
}

impl Mount {
    pub fn start(env: &Env, mnt: &Path, extra: &[&str]) -> Mount {
        Self::start_with(env, mnt, extra, &[])
    }

    /// [`Mount::start`] with extra environment variables (e.g. a gateway's endpoint and keys).
    pub fn start_with(env: &Env, mnt: &Path, extra: &[&str], vars: &[(String, String)]) -> Mount {
        fs::create_dir_all(mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let log = env.path(&format!(
            "mount-{}.log",
            Instant::now().elapsed().as_nanos() ^ rand::random::<u64>() as u128
        ));
        let mut args = vec!["-v", "mount", mnt.to_str().unwrap(), "--foreground"];
        args.extend_from_slice(extra);
        let mut cmd = env.std_cmd(&args);
        cmd.envs(vars.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn mount");
        let mut m = Mount {
            child: Some(child),
            mnt,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&m.mnt) {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mount exited early ({st}):\n{}", m.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mount not ready:\n{}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// The mount process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The mount process's peak resident set size (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Clean unmount; waits for the process to exit 0.
    pub fn unmount(mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "fusermount3 -u failed:\n{}", self.log_text());
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "mount exited with {st}:\n{}", self.log_text());
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mount did not exit after unmount:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, then clean the stale mount point.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.mnt)
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("operation should fail")
        .raw_os_error()
        .expect("an OS error")
}

pub fn state(run_dir: &Path) -> String {
    String::from_utf8(
        xattr::get(run_dir, "user.artifactfs.state")
            .unwrap()
            .unwrap_or_default(),
    )
    .unwrap()
}

pub fn wait_sealed(run_dir: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while state(run_dir) != "sealed" {
        assert!(
            Instant::now() < deadline,
            "{} not sealed in time",
            run_dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn seal(run_dir: &Path) {
    xattr::set(run_dir, "user.artifactfs.seal", b"1").expect("seal");
}

/// A tree snapshot without the mount's read-only `user.artifactfs.*` facts.
pub fn facts_free(root: &Path) -> BTreeMap<String, Node> {
    let mut s = snapshot(root, true);
    for n in s.values_mut() {
        n.xattrs.retain(|k, _| !k.starts_with("user.artifactfs."));
    }
    s
}

pub fn assert_same(a: &Path, b: &Path) {
    let (sa, sb) = (facts_free(a), facts_free(b));
    assert_eq!(
        sa.keys().collect::<Vec<_>>(),
        sb.keys().collect::<Vec<_>>(),
        "paths differ"
    );
    for (k, v) in &sa {
        assert_eq!(v, &sb[k], "entry {k:?} differs");
    }
}
