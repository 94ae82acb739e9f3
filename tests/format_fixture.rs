//! Backward compatibility: a store written with format version 1 (store layout 1, pack format
//! `AFSPACK1`, manifest format 1, index schema 1) must stay readable, bit for bit, by every later
//! build.
//!
//! `tests/fixtures/store-v1/` is a checked-in store holding one run, `fixture/run-0001`, ingested
//! from `tests/fixtures/store-v1-source/` (see the README there). It is never regenerated: if this
//! test fails, the change under test broke the reading of existing stores, and needs a migration
//! or a new format version, not a new fixture.
//!
//! Git keeps neither xattrs, mtimes, ownership, hard links nor modes other than the executable
//! bit, so the source checkout is compared by content, type, executable bit and symlink target;
//! everything else is checked against the values the manifest recorded when the fixture was made.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

/// The digest printed when the fixture was made. It pins the canonical manifest encoding.
const DIGEST: &str = "7db23ee8549b55fd719f9926515abfe4fa0e63b8f40dcb2ac85d0911bb615e38";
/// The only pack of the fixture, named by the BLAKE3 of its bytes.
const PACK: &str = "fc6fe074fa5ef5f6773bc3e89a1bb5612c9b4ce4d232f359812f05bf5bf72eb2";
const RUN: &str = "fixture/run-0001";
/// Whole-file BLAKE3 and chunk lengths of the multi-chunk file.
const BIG_BLAKE3: &str = "be50589c20b38a8023c516950a6ccefbfb000d29016dc02e6f7b897b94d08498";
const BIG_CHUNKS: [u64; 3] = [138_838, 83_423, 84_939];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn source() -> PathBuf {
    fixtures().join("store-v1-source")
}

/// Copies a tree of plain files and directories.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for ent in fs::read_dir(from).unwrap() {
        let ent = ent.unwrap();
        let ft = ent.file_type().unwrap();
        let dest = to.join(ent.file_name());
        if ft.is_dir() {
            copy_tree(&ent.path(), &dest);
        } else {
            assert!(ft.is_file(), "unexpected {:?} in the fixture", ent.path());
            fs::copy(ent.path(), &dest).unwrap();
        }
    }
}

/// A scratch copy of the fixture store: the checked-in one must never be opened (opening a
/// store writes its lock and the index's WAL).
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        // Under target/, not /tmp: the export sets `user.` xattrs, which tmpfs may refuse.
        let dir = tempfile::Builder::new()
            .prefix("format-fixture-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        copy_tree(&fixtures().join("store-v1"), &dir.path().join("store"));
        Self { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::cargo_bin("artifactfs").unwrap();
        c.arg("--store").arg(self.store()).args(args);
        c.env_remove("ARTIFACTFS_STORE")
            .env_remove("ARTIFACTFS_LOG");
        c
    }

    /// Runs, asserts exit status 0, returns stdout.
    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "artifactfs {args:?} exited with {:?}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

fn manifest_json(s: &Scratch) -> (Vec<u8>, Value) {
    let mut out = s.ok(&["manifest", RUN, "--json"]);
    assert_eq!(
        out.pop(),
        Some(b'\n'),
        "manifest --json ends with one newline"
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    (out, v)
}

fn entries(m: &Value) -> BTreeMap<String, Value> {
    m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

#[test]
fn verify_is_clean() {
    let s = Scratch::new();
    let out = String::from_utf8(s.ok(&["verify"])).unwrap();
    assert!(
        out.contains("verified 1 runs, 9 chunks in 1 packs, 314810 bytes"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "ok"), "{out}");
}

#[test]
fn runs_lists_the_pinned_digest() {
    let s = Scratch::new();
    let runs: Value = serde_json::from_slice(&s.ok(&["runs", "--json"])).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let r = &runs[0];
    assert_eq!(r["namespace"], "fixture");
    assert_eq!(r["run"], "run-0001");
    assert_eq!(r["state"], "sealed");
    assert_eq!(r["manifest"], DIGEST);
    assert_eq!(r["files"], 11);
    assert_eq!(r["raw_bytes"], 314_828);
    assert_eq!(r["metadata"]["producer"], "fixture");
}

#[test]
fn manifest_bytes_hash_to_the_digest() {
    let s = Scratch::new();
    let (bytes, m) = manifest_json(&s);
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), DIGEST);
    // The object is stored under its digest, zstd-compressed.
    let key = s
        .store()
        .join(format!("objects/manifests/{}/{DIGEST}", &DIGEST[..2]));
    let stored = fs::read(key).unwrap();
    assert_eq!(zstd::decode_all(&stored[..]).unwrap(), bytes);

    // The fields that format version 1 defines, as recorded.
    assert_eq!(m["format"], 1);
    assert_eq!(m["namespace"], "fixture");
    assert_eq!(m["run"], "run-0001");
    assert_eq!(m["metadata"], serde_json::json!({"producer": "fixture"}));
    let paths: Vec<&str> = m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            ".",
            "big.bin",
            "copy-of-hello.txt",
            "empty",
            "hello.txt",
            "link-to-hello",
            "naïve café.txt",
            "one-byte",
            "run.sh",
            "sub",
            "sub/deeper",
            "sub/deeper/leaf.txt",
            "sub/leaf-hardlink.txt",
            "sub/notes.md",
        ]
    );
    let e = entries(&m);
    assert_eq!(e["."]["xattrs"]["user.statehub.run_id"], "run-0001");
    assert_eq!(e["hello.txt"]["xattrs"]["user.fixture"], "pinned");
    assert_eq!(e["big.bin"]["xattrs"]["user.blob"]["base64"], "AP8QgA==");
    assert_eq!(e["big.bin"]["blake3"], BIG_BLAKE3);
    let lens: Vec<u64> = e["big.bin"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_u64().unwrap())
        .collect();
    assert_eq!(lens, BIG_CHUNKS);
    assert_eq!(e["empty"]["size"], 0);
    assert!(
        e["empty"].get("chunks").is_none(),
        "empty files have no chunk list"
    );
    assert_eq!(e["link-to-hello"]["type"], "symlink");
    assert_eq!(e["link-to-hello"]["target"], "hello.txt");
    assert_eq!(e["sub/leaf-hardlink.txt"]["type"], "hardlink");
    assert_eq!(e["sub/leaf-hardlink.txt"]["target"], "sub/deeper/leaf.txt");
    assert_eq!(e["one-byte"]["mode"], 0o600);
    assert_eq!(e["run.sh"]["mode"], 0o755);
    assert_eq!(e["sub"]["mtime_ns"], 1_767_323_048_000_000_001_i64);
}

#[test]
fn pack_is_named_by_its_hash() {
    let bytes =
        fs::read(fixtures().join(format!("store-v1/objects/packs/{}/{PACK}", &PACK[..2]))).unwrap();
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), PACK);
    assert_eq!(&bytes[..8], b"AFSPACK1");
    assert_eq!(&bytes[bytes.len() - 8..], b"AFSPEND1");
}

#[test]
fn export_reproduces_the_source() {
    let s = Scratch::new();
    let (_, m) = manifest_json(&s);
    let recorded = entries(&m);
    let dest = s.dir.path().join("export");
    s.ok(&["export", RUN, dest.to_str().unwrap()]);

    // Same names, types, contents, executable bits and symlink targets as the checkout.
    let mut seen = Vec::new();
    compare(&source(), &dest, "", &mut seen);
    seen.sort();
    let mut expected: Vec<String> = recorded.keys().filter(|p| *p != ".").cloned().collect();
    expected.sort();
    assert_eq!(seen, expected);

    // What git does not keep, against the manifest.
    for (path, e) in &recorded {
        let p = if path == "." {
            dest.clone()
        } else {
            dest.join(path)
        };
        let meta = fs::symlink_metadata(&p).unwrap();
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        assert_eq!(
            mtime_ns,
            i128::from(e["mtime_ns"].as_i64().unwrap()),
            "mtime of {path}"
        );
        if e["type"] != "symlink" {
            assert_eq!(
                u64::from(meta.permissions().mode() & 0o7777),
                e["mode"].as_u64().unwrap(),
                "mode of {path}"
            );
        }
        if let Some(x) = e.get("xattrs").and_then(Value::as_object) {
            for (name, value) in x {
                let want = match value {
                    Value::String(t) => t.as_bytes().to_vec(),
                    _ => match value["base64"].as_str().unwrap() {
                        "AP8QgA==" => vec![0x00, 0xff, 0x10, 0x80],
                        other => panic!("unexpected base64 value {other}"),
                    },
                };
                assert_eq!(
                    xattr::get(&p, name).unwrap(),
                    Some(want),
                    "xattr {name} of {path}"
                );
            }
        }
    }
    let a = fs::metadata(dest.join("sub/deeper/leaf.txt")).unwrap();
    let b = fs::metadata(dest.join("sub/leaf-hardlink.txt")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "hard link restored");
}

/// Walks the source checkout and the export side by side.
fn compare(src: &Path, dst: &Path, rel: &str, seen: &mut Vec<String>) {
    let mut names: Vec<_> = fs::read_dir(dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut src_names: Vec<_> = fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    src_names.sort();
    assert_eq!(names, src_names, "entries of {rel:?}");
    for name in names {
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let (s, d) = (src.join(&name), dst.join(&name));
        let (sm, dm) = (
            fs::symlink_metadata(&s).unwrap(),
            fs::symlink_metadata(&d).unwrap(),
        );
        assert_eq!(sm.file_type(), dm.file_type(), "type of {path}");
        if sm.is_symlink() {
            assert_eq!(fs::read_link(&s).unwrap(), fs::read_link(&d).unwrap());
        } else if sm.is_dir() {
            compare(&s, &d, &path, seen);
        } else {
            assert!(
                fs::read(&s).unwrap() == fs::read(&d).unwrap(),
                "content of {path}"
            );
            assert_eq!(
                sm.permissions().mode() & 0o111 != 0,
                dm.permissions().mode() & 0o111 != 0,
                "executable bit of {path}"
            );
        }
        seen.push(path);
    }
}

#[test]
fn cat_of_the_multi_chunk_file() {
    let s = Scratch::new();
    let out = s.ok(&["cat", &format!("{RUN}/big.bin")]);
    let want = fs::read(source().join("big.bin")).unwrap();
    assert_eq!(out.len(), want.len());
    assert!(out == want, "cat differs from the source");
    assert_eq!(blake3::hash(&out).to_hex().as_str(), BIG_BLAKE3);
}

#[test]
fn the_checked_in_store_is_closed() {
    let store = fixtures().join("store-v1");
    for name in ["lock", "index.sqlite-wal", "index.sqlite-shm"] {
        assert!(
            !store.join(name).exists(),
            "{name} in the fixture: it was opened in place; restore it from git"
        );
    }
}
