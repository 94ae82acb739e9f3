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
