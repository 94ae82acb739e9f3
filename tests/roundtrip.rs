//! Ingest → export round trips: the exported tree equals the source in content, type, mode,
//! ownership, nanosecond mtime, symlink target, hard-link structure, device number and xattrs.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use artifactfs_core::chunker::ChunkerParams;
use common::{Env, assert_same_tree, bytes, set_mtime};

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap();
}

fn round_trip(env: &Env, src: &Path, run: &str) -> serde_json::Value {
    let report = env.ingest(src, run);
    let dest = env.path(&format!("export-{}", run.replace('/', "-")));
    env.ok(&["export", run, dest.to_str().unwrap()]);
    assert_same_tree(src, &dest);
    assert!(env.ok(&["verify", run]).contains("ok"));
    report
}

#[test]
fn edge_case_sizes_names_and_attributes() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    let p = ChunkerParams::default();
    write(&src.join("empty"), b"");
    write(&src.join("one-byte"), b"x");
    for (label, n) in [
        ("min", p.min_size),
        ("avg", p.avg_size),
        ("max", p.max_size),
    ] {
        for delta in [-1i64, 0, 1] {
            let size = (i64::from(n) + delta) as usize;
            write(
                &src.join(format!("sizes/{label}{delta:+}")),
                &bytes(size, size as u64),
            );
        }
    }
    // Several max-size chunks plus a tail, compressible.
    let text: Vec<u8> = b"2026-11-29T10:00:00Z INFO harness: step ok\n"
        .iter()
        .copied()
        .cycle()
        .take(3 * p.max_size as usize + 12345)
        .collect();
    write(&src.join("logs/harness.log"), &text);
    write(&src.join("names/ünïcødé ✓.txt"), "ok".as_bytes());
    write(&src.join("names/with space/and  two.txt"), b"spaces");
    write(&src.join("names/.hidden"), b"dot");
    write(&src.join("names/日本語/ファイル"), b"cjk");
    let mut deep = src.join("deep");
    for i in 0..60 {
        deep = deep.join(format!("level-{i}"));
    }
    write(&deep.join("leaf.txt"), b"deep");
    fs::create_dir_all(src.join("empty-dir/nested-empty")).unwrap();
    std::os::unix::fs::symlink("../one-byte", src.join("names/rel-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", src.join("dangling")).unwrap();
    fs::hard_link(src.join("one-byte"), src.join("names/hard-one")).unwrap();
    fs::set_permissions(src.join("one-byte"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::set_permissions(src.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("empty-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
    nix::unistd::chown(&src.join("empty"), Some(1234.into()), Some(5678.into())).unwrap();
    xattr::set(src.join("logs/harness.log"), "user.origin", b"lab-7").unwrap();
    xattr::set(src.join("names"), "user.binary", &[0, 159, 255, 1]).unwrap();
    xattr::set(src.join("empty"), "user.empty", b"").unwrap();
    // Special files: recorded, never read, recreated on export.
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &src.join("null-dev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &src.join("loop-dev"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        nix::sys::stat::makedev(7, 42),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("control.sock")).unwrap();
    // Hard links to a symlink, a FIFO and a device node are links too.
    fs::hard_link(src.join("names/rel-link"), src.join("rel-link-2")).unwrap();
    fs::hard_link(src.join("fifo"), src.join("names/fifo-2")).unwrap();
    fs::hard_link(src.join("null-dev"), src.join("names/null-2")).unwrap();
    // Exact nanosecond times, set last (children before parents).
    set_mtime(&src.join("one-byte"), 1_700_000_000, 123_456_789);
    set_mtime(&src.join("names/rel-link"), 1_600_000_000, 1);
    set_mtime(
        &src.join("empty-dir/nested-empty"),
        1_500_000_000,
        999_999_999,
    );
    set_mtime(&src.join("empty-dir"), 1_400_000_000, 5);

    let report = round_trip(&env, &src, "edge/cases");
    assert!(report["raw_bytes"].as_u64().unwrap() > 3 * u64::from(p.max_size));

    // The manifest records special files as such and hard links as links.
    let m: serde_json::Value =
        serde_json::from_str(&env.ok(&["manifest", "edge/cases", "--json"])).unwrap();
    let entry = |path: &str| -> serde_json::Value {
        m["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no entry {path}"))
            .clone()
    };
    assert_eq!(entry("fifo")["type"], "fifo");
    assert_eq!(entry("names/null-2")["type"], "char"); // linked as null-dev too
    assert_eq!(entry("loop-dev")["type"], "block");
    assert_eq!(entry("control.sock")["type"], "socket");
    // The first name in path order holds the content; later names link to it.
    let hard = entry("one-byte");
    assert_eq!(hard["type"], "hardlink");
    assert_eq!(hard["target"], "names/hard-one");
    assert_eq!(entry("names/hard-one")["type"], "file");
    for (first, later, kind) in [
        ("names/rel-link", "rel-link-2", "symlink"),
        ("fifo", "names/fifo-2", "fifo"),
        ("names/null-2", "null-dev", "char"),
    ] {
        assert_eq!(entry(first)["type"], kind, "{first}");
        assert_eq!(entry(later)["type"], "hardlink", "{later}");
        assert_eq!(entry(later)["target"], first, "{later}");
    }
    // `cat` of a link to a symlink says what it is.
    let out = env.cmd(&["cat", "edge/cases/rel-link-2"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a symlink, not a file"), "{err}");
    assert_eq!(
        entry("names")["xattrs"]["user.binary"]["base64"],
        "AJ//AQ=="
    );

    // The manifest digest printed by ingest is BLAKE3 of the canonical bytes.
    let raw = env
        .cmd(&["manifest", "edge/cases", "--json"])
        .output()
        .unwrap()
        .stdout;
    let canonical = &raw[..raw.len() - 1];
    assert_eq!(
        blake3::hash(canonical).to_hex().as_str(),
        report["manifest"].as_str().unwrap()
    );

    // cat gives the bytes; ls lists the directory.
    let out = env
        .cmd(&["cat", "edge/cases/logs/harness.log"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, text);
    let ls = env.ok(&["ls", "edge/cases/names"]);
    assert!(
        ls.contains("ünïcødé ✓.txt") && ls.contains("rel-link -> ../one-byte"),
        "{ls}"
    );
}

#[test]
fn sparse_file_of_3_gib() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(3 << 30).unwrap();
    // A little data in the middle and at the end, the rest holes.
    use std::os::unix::fs::FileExt;
    f.write_all_at(&bytes(100_000, 1), 1 << 30).unwrap();
    f.write_all_at(b"tail", (3 << 30) - 4).unwrap();
    drop(f);
    let report = round_trip(&env, &src, "sparse/disk");
    assert_eq!(report["raw_bytes"].as_u64().unwrap(), 3 << 30);
    // Zeros deduplicate: the store holds far less than the file's size.
    let stored = env.stats()["stored_bytes"].as_u64().unwrap();
    assert!(
        stored < 10 << 20,
        "stored {stored} bytes for a sparse 3 GiB file"
    );
    // The export stays sparse.
    let meta = fs::metadata(env.path("export-sparse-disk/disk.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 100 << 20,
        "export allocated {} blocks",
        meta.blocks()
    );
}

#[test]
fn fifty_thousand_small_files() {
    let env = Env::new();
    let src = env.path("src");
    for d in 0..50 {
        let dir = src.join(format!("cases/d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..1000 {
            let n = d * 1000 + i;
            // Some identical contents across files, most distinct.
            let body = if n % 10 == 0 {
                "{\"status\": \"pass\"}\n".to_string()
            } else {
                format!("{{\"case\": {n}, \"value\": {}}}\n", n * 7919 % 10007)
            };
            fs::write(dir.join(format!("case-{n:05}.json")), body).unwrap();
        }
    }
    let report = round_trip(&env, &src, "many/files");
    assert_eq!(report["files"].as_u64().unwrap(), 50_000);
    let runs: serde_json::Value = serde_json::from_str(&env.ok(&["runs", "--json"])).unwrap();
    assert_eq!(runs[0]["files"], 50_000);
    let stats = env.stats();
    // Identical small files are stored once.
    assert!(stats["chunks"].as_u64().unwrap() < 50_000);
}
