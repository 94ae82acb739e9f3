//! `S3Store` against a real Ceph RGW on 127.0.0.1:7480, started by `tools/ceph-rgw/start.sh`
//! (idempotent; `tools/test.sh` stops it afterwards). Each test makes its own bucket with the
//! SDK and removes it at the end. The tests fail, not skip, when the gateway cannot be
//! started.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use artifactfs_core::error::Error;
use artifactfs_core::objstore::{ObjectStore, conformance};
use artifactfs_s3::{S3Config, S3Credentials, S3Store};
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::types::StorageClass;

const MIB: usize = 1024 * 1024;

/// The gateway's address and test credentials, as `tools/ceph-rgw/env.sh` prints them.
struct Gateway {
    endpoint: String,
    region: String,
    access_key: String,
    secret_key: String,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_script(name: &str) -> String {
    let path = repo().join("tools/ceph-rgw").join(name);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the gateway once per test binary and reads its environment.
fn gateway() -> &'static Gateway {
    static GW: OnceLock<Gateway> = OnceLock::new();
    GW.get_or_init(|| {
        run_script("start.sh");
        let env = run_script("env.sh");
        let var = |name: &str| {
            env.lines()
                .filter_map(|l| l.trim().strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.trim_matches(['"', '\'']).to_owned())
                .unwrap_or_else(|| panic!("env.sh does not set {name}:\n{env}"))
        };
        Gateway {
            endpoint: var("AWS_ENDPOINT_URL"),
            region: var("AWS_REGION"),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
        }
    })
}

fn config(bucket: &str, prefix: &str) -> S3Config {
    let gw = gateway();
    S3Config {
        prefix: prefix.to_owned(),
        endpoint: Some(gw.endpoint.clone()),
        region: Some(gw.region.clone()),
        credentials: Some(S3Credentials {
            access_key_id: gw.access_key.clone(),
            secret_access_key: gw.secret_key.clone(),
            session_token: None,
        }),
        ..S3Config::new(bucket)
    }
}

/// The SDK directly, for what the store does not expose: buckets, storage classes.
struct Sdk {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
}

impl Sdk {
    fn new() -> Self {
        let gw = gateway();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&gw.endpoint)
            .region(Region::new(gw.region.clone()))
            .credentials_provider(Credentials::new(
                &gw.access_key,
                &gw.secret_key,
                None,
                None,
                "test",
            ))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Self {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: aws_sdk_s3::Client::from_conf(conf),
        }
    }

    /// A new, empty bucket whose name starts with `tag`.
    fn bucket(&self, tag: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("afs-{tag}-{}-{nanos}", std::process::id());
        self.rt
            .block_on(self.client.create_bucket().bucket(&name).send())
            .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
        name
    }

    /// Deletes every object of `bucket`, then the bucket.
    fn remove_bucket(&self, bucket: &str) {
        self.rt.block_on(async {
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(bucket)
                    .send()
                    .await
                    .unwrap();
                if page.contents().is_empty() {
                    break;
                }
                for o in page.contents() {
                    self.client
                        .delete_object()
                        .bucket(bucket)
                        .set_key(o.key().map(str::to_owned))
                        .send()
                        .await
                        .unwrap();
                }
            }
            self.client
                .delete_bucket()
                .bucket(bucket)
                .send()
                .await
                .unwrap();
        });
    }

    fn head(
        &self,
        bucket: &str,
        key: &str,
    ) -> aws_sdk_s3::operation::head_object::HeadObjectOutput {
        self.rt
            .block_on(self.client.head_object().bucket(bucket).key(key).send())
            .unwrap_or_else(|e| panic!("head {bucket}/{key}: {e:?}"))
    }
}

#[test]
fn conformance_on_rgw() {
    let sdk = Sdk::new();
    let bucket = sdk.bucket("conf");
    // Twice: at the bucket's root and under a prefix, with an object outside the prefix that
    // must stay invisible.
    let root = S3Store::open(config(&bucket, "")).unwrap();
    conformance(&root).unwrap();
    root.put("conformance/a/zz-outside", b"x").unwrap();
    let store = S3Store::open(config(&bucket, "site/one")).unwrap();
    assert_eq!(store.describe(), format!("s3://{bucket}/site/one"));
    conformance(&store).unwrap();

    store.put("conformance/a/k", b"under the prefix").unwrap();
    let listed = store.list("conformance/").unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, "conformance/a/k");
    assert_eq!(listed[0].size, 16);
    let at_root: Vec<String> = root.list("").unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(
        at_root,
        ["conformance/a/zz-outside", "site/one/conformance/a/k"]
    );

    // A missing object through get_range is MissingObject too; an empty range is fine.
    assert!(matches!(
        store.get_range("nope", 0, 10),
        Err(Error::MissingObject { .. })
    ));
    assert_eq!(store.get_range("conformance/a/k", 16, 0).unwrap(), b"");
    assert!(matches!(
        store.get_range("conformance/a/k", 17, 0),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        store.get_range("conformance/a/k", 100, 1),
        Err(Error::Corrupt { .. })
    ));

    // Listing pages through more than one ListObjectsV2 page (RGW's default is 1000 keys).
    let many = S3Store::open(config(&bucket, "many")).unwrap();
    let keys: Vec<String> = (0..1100).map(|i| format!("k/{i:05}")).collect();
    std::thread::scope(|s| {
        for part in keys.chunks(275) {
            let many = &many;
            s.spawn(move || {
                for k in part {
                    many.put(k, k.as_bytes()).unwrap();
                }
            });
        }
    });
    let listed: Vec<String> = many
        .list("k/")
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(listed, keys);

    drop((root, store, many));
    sdk.remove_bucket(&bucket);
}

#[test]
fn multipart_40_mib_round_trip() {
    let sdk = Sdk::new();
    let bucket = sdk.bucket("mp");
    let store = S3Store::open(config(&bucket, "p")).unwrap();
    let size = 40 * MIB;
    let mut data = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let t = Instant::now();
    store.put("packs/big", &data).unwrap();
    eprintln!("put 40 MiB in {:?}", t.elapsed());

    // Five parts of 8 MiB: the ETag of a multipart object ends in -5.
    let head = sdk.head(&bucket, "p/packs/big");
    assert_eq!(head.content_length(), Some(size as i64));
    assert!(
        head.e_tag()
            .is_some_and(|e| e.trim_matches('"').ends_with("-5")),
        "{:?}",
        head.e_tag()
    );
    assert_eq!(store.head("packs/big").unwrap(), Some(size as u64));

    let t = Instant::now();
    assert!(store.get("packs/big").unwrap() == data, "whole get differs");
    eprintln!("get 40 MiB in {:?}", t.elapsed());

    let part = 8 * MIB;
    let ranges = [
        (0, 1),
        (0, part),
        (part - 1, 2),
        (part, part),
        (part - 100, part + 200),
        (2 * part - 7, 2 * part + 14),
        (4 * part, part),
        (size - 1, 1),
        (1, size - 1),
        (12_345, 3 * MIB),
    ];
    for (off, len) in ranges {
        let got = store
            .get_range("packs/big", off as u64, len as u64)
            .unwrap();
        assert!(got == data[off..off + len], "range {off}+{len} differs");
    }
    for (off, len) in [(size - 1, 2), (size, 1), (size + 10, 10)] {
        match store.get_range("packs/big", off as u64, len as u64) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!(
                "range {off}+{len} past the end: {:?}",
                other.map(|v| v.len())
            ),
        }
    }

    // A second put of the same key with the same bytes is harmless.
    store.put("packs/big", &data).unwrap();
    assert_eq!(store.head("packs/big").unwrap(), Some(size as u64));

    drop(store);
    sdk.remove_bucket(&bucket);
}

/// Opens `config` with one attempt and a short timeout; returns the error and the time taken.
fn open_fails(config: S3Config) -> (Error, Duration) {
    let config = S3Config {
        max_attempts: 2,
        connect_timeout: Duration::from_secs(2),
        attempt_timeout: Duration::from_secs(5),
        operation_timeout: Duration::from_secs(10),
        ..config
    };
    let t = Instant::now();
    let err = S3Store::open(config).expect_err("open succeeded");
    (err, t.elapsed())
}

#[test]
fn bad_configurations_fail_at_open() {
    let gw = gateway();
    let sdk = Sdk::new();
    let bucket = sdk.bucket("bad");

    // A bucket that does not exist.
    let missing = format!("{bucket}-absent");
    let (err, took) = open_fails(config(&missing, ""));
    let msg = err.to_string();
    eprintln!("missing bucket ({took:?}): {msg}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(
        msg.contains(&gw.endpoint) && msg.contains(&missing),
        "{msg}"
    );
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(
        matches!(
            err,
            Error::Backend {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );

    // A wrong secret key.
    let mut c = config(&bucket, "");
    c.credentials.as_mut().unwrap().secret_access_key = "wrong-secret".into();
    let (err, took) = open_fails(c);
    let msg = err.to_string();
    eprintln!("wrong secret ({took:?}): {msg}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(msg.contains(&gw.endpoint) && msg.contains(&bucket), "{msg}");
    assert!(
        msg.contains("403") && msg.contains("access denied"),
        "{msg}"
    );
    assert!(!msg.contains("wrong-secret"), "{msg}");
    assert!(
        matches!(
            err,
            Error::Backend {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );

    // Nothing listening.
    let c = S3Config {
        endpoint: Some("http://127.0.0.1:1".into()),
        ..config(&bucket, "")
    };
    let (err, took) = open_fails(c);
    let msg = err.to_string();
    eprintln!("unreachable ({took:?}): {msg}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(
        msg.contains("http://127.0.0.1:1") && msg.contains(&bucket),
        "{msg}"
    );
    assert!(
        matches!(
            err,
            Error::Backend {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );

    // An invalid storage class is refused by the gateway at the first put.
    let store = S3Store::open(S3Config {
        storage_class: Some("GLACIER".into()),
        ..config(&bucket, "")
    })
    .unwrap();
    let err = store.put("k", b"x").expect_err("GLACIER accepted");
    let msg = err.to_string();
    assert!(msg.contains("put k") && msg.contains(&bucket), "{msg}");

    drop(store);
    sdk.remove_bucket(&bucket);
}

#[test]
fn storage_class_of_new_objects() {
    let sdk = Sdk::new();
    let bucket = sdk.bucket("class");
    let ia = S3Store::open(S3Config {
        storage_class: Some("STANDARD_IA".into()),
        multipart_threshold: 5 * MIB,
        part_size: 5 * MIB,
        ..config(&bucket, "")
    })
    .unwrap();
    let standard = S3Store::open(config(&bucket, "")).unwrap();

    ia.put("small", b"infrequent").unwrap();
    let big: Vec<u8> = (0..11 * MIB).map(|i| (i % 253) as u8).collect();
    ia.put("big", &big).unwrap();
    standard.put("plain", b"standard").unwrap();

    assert_eq!(
        sdk.head(&bucket, "small").storage_class(),
        Some(&StorageClass::StandardIa)
    );
    let head = sdk.head(&bucket, "big");
    assert_eq!(head.storage_class(), Some(&StorageClass::StandardIa));
    assert!(
        head.e_tag()
            .is_some_and(|e| e.trim_matches('"').ends_with("-3"))
    );
    assert!(matches!(
        sdk.head(&bucket, "plain").storage_class(),
        None | Some(StorageClass::Standard)
    ));
    assert_eq!(ia.get("small").unwrap(), b"infrequent");
    assert!(ia.get("big").unwrap() == big);

    drop((ia, standard));
    sdk.remove_bucket(&bucket);
}
