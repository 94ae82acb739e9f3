//! The real Ceph RGW of the tests (`tools/ceph-rgw/start.sh`, idempotent) and buckets on it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use artifactfs_core::objstore::ObjectStore;
use artifactfs_s3::{S3Config, S3Credentials, S3Store};

/// `tools/ceph-rgw/env.sh`, as (name, value) pairs, after starting the gateway once.
pub fn gateway_env() -> &'static Vec<(String, String)> {
    static ENV: OnceLock<Vec<(String, String)>> = OnceLock::new();
    ENV.get_or_init(|| {
        let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/ceph-rgw");
        let run = |script: &str| {
            let out = Command::new("bash")
                .arg(tools.join(script))
                .output()
                .expect("run a tools/ceph-rgw script");
            assert!(
                out.status.success(),
                "{script} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        run("start.sh");
        run("env.sh")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches(['"', '\'']).to_owned()))
            .collect()
    })
}

/// One of the gateway's variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …).
pub fn var(name: &str) -> String {
    gateway_env()
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("env.sh does not set {name}"))
}

/// A new bucket, emptied and removed when dropped. Stores use the prefix `site`.
pub struct Bucket {
    pub store: S3Store,
    pub name: String,
}

impl Bucket {
    pub fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("afs-{tag}-{}-{}", std::process::id(), nanos % 1_000_000_000);
        let config = S3Config {
            endpoint: Some(var("AWS_ENDPOINT_URL")),
            region: Some(var("AWS_REGION")),
            credentials: Some(S3Credentials {
                access_key_id: var("AWS_ACCESS_KEY_ID"),
                secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
                session_token: None,
            }),
            ..S3Config::new(&name)
        };
        let store = S3Store::connect(config).unwrap();
        store.create_bucket().unwrap();
        Self { store, name }
    }

    /// The `--backend` of a store in this bucket.
    pub fn url(&self) -> String {
        format!("s3://{}/site", self.name)
    }

    /// The keys under `site/PREFIX`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.store
            .list(&format!("site/{prefix}"))
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect()
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if let Ok(all) = self.store.list("") {
            for m in all {
                let _ = self.store.delete(&m.key);
            }
        }
        let _ = self.store.delete_bucket();
    }
}

/// A radosgw of its own on a free loopback port, serving the same cluster (and so the same
/// users, keys and buckets) as the shared gateway, for tests that kill the gateway. The
/// shared one is never stopped. It runs with the cluster's `ceph.conf` under its own name
/// (`client.rgw.pPORT`), admin socket and log; `tools/ceph-rgw/stop.sh` stops it too.
pub struct PrivateGateway {
    pub port: u16,
    dir: PathBuf,
    conf: PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateGateway {
    /// Starts one and waits until it answers HTTP.
    pub fn start() -> Self {
        gateway_env();
        let cluster = PathBuf::from(
            std::env::var("ARTIFACTFS_RGW_DIR").unwrap_or_else(|_| "/tmp/artifactfs-ceph".into()),
        );
        let conf = cluster.join("ceph.conf");
        assert!(conf.is_file(), "{} missing", conf.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = cluster.join(format!("private-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut gw = Self {
            port,
            dir,
            conf,
            child: None,
        };
        gw.restart();
        gw
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The gateway's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// [`gateway_env`] with this gateway's endpoint.
    pub fn env(&self) -> Vec<(String, String)> {
        gateway_env()
            .iter()
            .map(|(k, v)| {
                let v = if k == "AWS_ENDPOINT_URL" {
                    self.url()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let name = format!("client.rgw.p{}", self.port);
        let log = std::fs::File::create(self.dir.join("radosgw.out")).unwrap();
        let child = Command::new("radosgw")
            .arg("-c")
            .arg(&self.conf)
            .args(["-n", &name, "-f"])
            .arg(format!(
                "--rgw-frontends=beast endpoint=127.0.0.1:{}",
                self.port
            ))
            .arg(format!("--rgw-data={}", self.dir.display()))
            .arg(format!(
                "--admin-socket={}/radosgw.asok",
                self.dir.display()
            ))
            .arg(format!("--log-file={}/radosgw.log", self.dir.display()))
            .arg("--rgw-thread-pool-size=32")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start radosgw");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.answers() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "radosgw on port {} exited ({st}):\n{}",
                    self.port,
                    std::fs::read_to_string(self.dir.join("radosgw.out")).unwrap_or_default()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "radosgw on port {} did not answer within 60 s",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// An HTTP answer of any status to `GET /`.
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
    }
}

impl Drop for PrivateGateway {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
