//! End-to-end tests of the HTTP API: a real `artifactfs serve` (or `mount --serve`) process
//! on loopback, driven with a real HTTP client (and with raw TCP where a client library would
//! clean up the bad input the test means to send).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use reqwest::blocking::{Body, Client, Response};
use serde_json::{Value, json};

/// A running `artifactfs serve`, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Server {
    fn start(env: &Env) -> Server {
        Self::start_with(env, &[])
    }

    fn start_with(env: &Env, extra: &[&str]) -> Server {
        let log = env.path(&format!("serve-{}.log", rand::random::<u32>()));
        let mut args = vec!["-v", "serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut child = env
            .std_cmd(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| {
                panic!(
                    "serve did not start ({line:?}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .parse()
            .unwrap();
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(mut self) {
        let st = common::terminate(&mut self.child);
        assert!(st.success(), "serve exited with {st}:\n{}", self.log_text());
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client {
    Client::builder().timeout(None).build().unwrap()
}

fn json_of(r: Response) -> Value {
    let status = r.status();
    let text = r.text().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"))
}

fn ok_json(r: Response) -> Value {
    let status = r.status();
    let v = json_of(r);
    assert!(status.is_success(), "{status}: {v}");
    v
}

fn create_run(s: &Server, ns: &str, run: &str, meta: Value) {
    let r = client()
        .post(s.url("/v1/runs"))
        .json(&json!({"namespace": ns, "run": run, "metadata": meta}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
}

fn put(s: &Server, run: &str, path: &str, data: Vec<u8>) -> Value {
    ok_json(
        client()
            .put(s.url(&format!("/v1/runs/{run}/files/{path}")))
            .body(data)
            .send()
            .unwrap(),
    )
}

fn get_bytes(s: &Server, path: &str) -> Vec<u8> {
    let r = client().get(s.url(path)).send().unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.bytes().unwrap().to_vec()
}

fn seal(s: &Server, run: &str) -> String {
    let v = ok_json(
        client()
            .post(s.url(&format!("/v1/runs/{run}/seal")))
            .send()
            .unwrap(),
    );
    v["digest"].as_str().unwrap().to_owned()
}

/// A deterministic stream of `len` bytes, read without holding it in memory. Every byte is a
/// function of its position (so any range can be produced on its own): in each 4 KiB, the
/// first half is pseudo-random and the second half repeats one value (compressible).
struct Gen {
    seed: u64,
    pos: u64,
    len: u64,
}

impl Gen {
    fn new(seed: u64, len: u64) -> Self {
        Gen { seed, pos: 0, len }
    }

    fn at(&self, p: u64) -> Gen {
        Gen {
            seed: self.seed,
            pos: p,
            len: self.len,
        }
    }

    fn word(&self, w: u64) -> [u8; 8] {
        let p = w * 8;
        if (p / 2048) % 2 == 1 {
            return (p / 4096).to_le_bytes();
        }
        // splitmix64
        let mut z = self
            .seed
            .wrapping_add(w.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    }
}

impl Read for Gen {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        let mut i = 0;
        while i < n {
            let w = self.word(self.pos / 8);
            let off = (self.pos % 8) as usize;
            let k = (8 - off).min(n - i);
            buf[i..i + k].copy_from_slice(&w[off..off + k]);
            i += k;
            self.pos += k as u64;
        }
        Ok(n)
    }
}

/// BLAKE3 and length of everything `r` yields.
fn hash_reader(mut r: impl Read) -> (blake3::Hash, u64) {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (h.finalize(), n)
}

/// Bytes `[start, end)` of the generator's stream.
fn gen_slice(seed: u64, len: u64, start: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::new();
    Gen::new(seed, len)
        .at(start)
        .take(end - start)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Sends `head` and then `body` on a raw connection and returns (status, body text).
fn raw(addr: SocketAddr, head: &str, body: &[u8], close_write: bool) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    if close_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {head:?}: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

// ------------------------------------------------------------------------------------------

const BIG_SEED: u64 = 0x5eed_0001;
const BIG_LEN: u64 = (1 << 30) + 12_345;

#[test]
fn whole_flow_with_a_large_streamed_file_and_cli_export() {
    let env = Env::new();
    let s = Server::start(&env);
    create_run(
        &s,
        "lab",
        "r1",
        json!({"producer": "http-test", "board": "b7"}),
    );
    let small = b"hello over http\n".to_vec();
    let mid = common::bytes(5 << 20, 7);
    put(&s, "lab/r1", "notes.txt", small.clone());
    let v = put(&s, "lab/r1", "data/sub/mid.bin", mid.clone());
    assert_eq!(v["blake3"], blake3::hash(&mid).to_hex().as_str());
    // The big one: a streamed body from a generator, never in memory on either side.
    let (want_hash, _) = hash_reader(Gen::new(BIG_SEED, BIG_LEN));
    let v = ok_json(
        client()
            .put(s.url("/v1/runs/lab/r1/files/data/big.bin"))
            .body(Body::sized(Gen::new(BIG_SEED, BIG_LEN), BIG_LEN))
            .send()
            .unwrap(),
    );
    assert_eq!(v["size"], BIG_LEN);
    assert_eq!(v["blake3"], want_hash.to_hex().as_str());
    // An open run's files are readable already (no ETag: they may change).
    let r = client()
        .get(s.url("/v1/runs/lab/r1/files/notes.txt"))
        .send()
        .unwrap();
    assert!(r.headers().get("etag").is_none());
    assert_eq!(r.bytes().unwrap().as_ref(), &small[..]);
    let info = ok_json(client().get(s.url("/v1/runs/lab/r1")).send().unwrap());
    assert_eq!(info["state"], "open");
    // Counted as they are written: files and bytes (inline, staged and streamed alike).
    assert_eq!(info["files"], 3, "{info}");
    let raw = small.len() as u64 + mid.len() as u64 + BIG_LEN;
    assert_eq!(info["raw_bytes"], raw, "{info}");
    let listed = ok_json(
        client()
            .get(s.url("/v1/runs?namespace=lab"))
            .send()
            .unwrap(),
    );
    assert!(
        listed.to_string().contains(&format!("\"raw_bytes\":{raw}")),
        "{listed}"
    );

    let digest = seal(&s, "lab/r1");
    let info = ok_json(client().get(s.url("/v1/runs/lab/r1")).send().unwrap());
    assert_eq!(info["state"], "sealed");
    assert_eq!(info["raw_bytes"], raw, "{info}");
    assert_eq!(info["digest"], digest.as_str());
    assert_eq!(info["metadata"]["producer"], "http-test");
    assert_eq!(info["metadata"]["board"], "b7");
    let rss = s.peak_rss_kib();
    assert!(
        rss < 600 * 1024,
        "serve's peak RSS is {rss} KiB after a 1 GiB upload and its seal"
    );

    // The manifest: by run and by digest, the same bytes the CLI prints (through the socket).
    let m = get_bytes(&s, "/v1/runs/lab/r1/manifest");
    assert_eq!(m, get_bytes(&s, &format!("/v1/manifests/{digest}")));
    let cli = env.ok(&["manifest", "lab/r1", "--json"]);
    assert_eq!(String::from_utf8(m.clone()).unwrap(), cli.trim_end());
    let mv: Value = serde_json::from_slice(&m).unwrap();
    assert!(mv.to_string().contains("big.bin"));

    // Downloads: whole, ranges, ETag.
    let r = client()
        .get(s.url("/v1/runs/lab/r1/files/data/big.bin"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", want_hash.to_hex()));
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        BIG_LEN.to_string()
    );
    assert_eq!(hash_reader(r), (want_hash, BIG_LEN));
    for (start, end) in [
        (0u64, 99u64),
        (1 << 30, BIG_LEN - 1),
        (123_456_789, 130_000_000),
    ] {
        let r = client()
            .get(s.url("/v1/runs/lab/r1/files/data/big.bin"))
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {start}-{end}/{BIG_LEN}")
        );
        assert!(r.bytes().unwrap().as_ref() == gen_slice(BIG_SEED, BIG_LEN, start, end + 1));
    }
    let r = client()
        .get(s.url("/v1/runs/lab/r1/files/data/big.bin"))
        .header("range", format!("bytes={BIG_LEN}-"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(json_of(r)["code"], "range");
    // A Range header that does not parse, or of another unit, is ignored: the whole file.
    for h in ["bytes=garbage", "items=0-9"] {
        let r = client()
            .get(s.url("/v1/runs/lab/r1/files/notes.txt"))
            .header("range", h)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{h}");
        assert_eq!(r.bytes().unwrap().as_ref(), b"hello over http\n", "{h}");
    }
    let r = client()
        .get(s.url("/v1/runs/lab/r1/files/data/big.bin"))
        .header("if-none-match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(get_bytes(&s, "/v1/runs/lab/r1/files/data/sub/mid.bin"), mid);
    let listing = ok_json(
        client()
            .get(s.url("/v1/runs/lab/r1/files/data"))
            .send()
            .unwrap(),
    );
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big.bin", "sub"]);

    // The CLI's export of the same run (the server owns the store: through its socket).
    let dest = env.path("export");
    env.ok(&["export", "lab/r1", dest.to_str().unwrap()]);
    assert_eq!(std::fs::read(dest.join("notes.txt")).unwrap(), small);
    assert_eq!(std::fs::read(dest.join("data/sub/mid.bin")).unwrap(), mid);
    assert_eq!(
        hash_reader(std::fs::File::open(dest.join("data/big.bin")).unwrap()),
        (want_hash, BIG_LEN)
    );
    std::fs::remove_dir_all(&dest).unwrap();
    // verify exits non-zero on any damage.
    env.ok(&["verify", "lab/r1", "--json"]);
    s.stop();
}

/// An upload for `run`/`path` of `len` bytes; returns its location.
fn new_upload(s: &Server, ns: &str, run: &str, path: &str, len: u64) -> String {
    let r = client()
        .post(s.url("/v1/uploads"))
        .header("upload-length", len)
        .json(&json!({"namespace": ns, "run": run, "path": path}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["upload-offset"], "0");
    r.headers()["location"].to_str().unwrap().to_owned()
}

fn head_offset(s: &Server, loc: &str) -> u64 {
    let r = client().head(s.url(loc)).send().unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["upload-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn patch(s: &Server, loc: &str, offset: u64, data: &[u8]) -> reqwest::StatusCode {
    client()
        .patch(s.url(loc))
        .header("upload-offset", offset)
        .header("content-type", "application/offset+octet-stream")
        .body(data.to_vec())
        .send()
        .unwrap()
        .status()
}

#[test]
fn resumable_upload_survives_a_cut_client_and_a_killed_server() {
    let env = Env::new();
    let data = common::bytes(6 << 20, 42);
    let len = data.len() as u64;
    let s = Server::start(&env);
    create_run(&s, "up", "r", json!({}));
    let loc = new_upload(&s, "up", "r", "dir/file.bin", len);
    assert_eq!(patch(&s, &loc, 0, &data[..1 << 20]), 204);
    assert_eq!(head_offset(&s, &loc), 1 << 20);
    // A wrong offset is refused and changes nothing.
    assert_eq!(patch(&s, &loc, 5, &data[..10]), 409);
    // A client that dies in the middle of a PATCH: it announced 3 MiB and sent 1.5 MiB.
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nhost: x\r\nupload-offset: {}\r\n\
         content-type: application/offset+octet-stream\r\ncontent-length: {}\r\n\r\n",
        1 << 20,
        3 << 20
    );
    {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(&data[1 << 20..(1 << 20) + (3 << 19)]).unwrap();
        c.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    } // dropped: the connection is cut
    // The server keeps what arrived; then the server is killed outright and restarted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while head_offset(&s, &loc) == 1 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    s.kill9();
    let s = Server::start(&env);
    let off = head_offset(&s, &loc);
    assert!(
        ((1 << 20)..=(1 << 20) + (3 << 19)).contains(&off),
        "offset after restart: {off}"
    );
    assert_eq!(patch(&s, &loc, off, &data[off as usize..]), 204);
    assert_eq!(head_offset(&s, &loc), len);
    // A wrong BLAKE3 is refused and nothing is committed.
    let r = client()
        .put(s.url(&format!("{loc}/complete")))
        .header(
            "upload-blake3",
            blake3::hash(b"something else").to_hex().as_str(),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(json_of(r)["code"], "digest_mismatch");
    let r = client()
        .get(s.url("/v1/runs/up/r/files/dir/file.bin"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    // The right one commits the exact bytes.
    let want = blake3::hash(&data).to_hex().to_string();
    let v = ok_json(
        client()
            .put(s.url(&format!("{loc}/complete")))
            .json(&json!({"blake3": want}))
            .send()
            .unwrap(),
    );
    assert_eq!(v["size"], len);
    assert_eq!(client().head(s.url(&loc)).send().unwrap().status(), 404);
    seal(&s, "up/r");
    assert_eq!(get_bytes(&s, "/v1/runs/up/r/files/dir/file.bin"), data);
    // An abandoned upload is deleted on request.
    create_run(&s, "up", "r2", json!({}));
    let loc2 = new_upload(&s, "up", "r2", "x", 10);
    assert_eq!(patch(&s, &loc2, 0, b"12345"), 204);
    assert_eq!(client().delete(s.url(&loc2)).send().unwrap().status(), 204);
    assert_eq!(client().head(s.url(&loc2)).send().unwrap().status(), 404);
    assert!(
        std::fs::read_dir(env.store().join("uploads"))
            .unwrap()
            .next()
            .is_none(),
        "upload state left behind"
    );
    s.stop();
}

#[test]
fn upload_expiry_removes_abandoned_uploads_at_start() {
    let env = Env::new();
    let s = Server::start(&env);
    create_run(&s, "ex", "r", json!({}));
    let loc = new_upload(&s, "ex", "r", "f", 4);
    s.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let s = Server::start_with(&env, &["--upload-expiry", "1s"]);
    assert_eq!(client().head(s.url(&loc)).send().unwrap().status(), 404);
    s.stop();
}

fn all_events(s: &Server, after: i64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let v = ok_json(
            client()
                .get(s.url(&format!("/v1/events?after={after}&limit=3")))
                .send()
                .unwrap(),
        );
        let page = v.as_array().unwrap().clone();
        if page.is_empty() {
            return out;
        }
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        out.extend(page);
    }
}

#[test]
fn events_long_poll_in_order_across_a_restart_and_wakes_on_seal() {
    let env = Env::new();
    let s = Server::start(&env);
    create_run(&s, "ev", "a", json!({}));
    put(&s, "ev/a", "f", b"x".to_vec());
    seal(&s, "ev/a");
    let first = all_events(&s, 0);
    let last = first.last().unwrap()["seq"].as_i64().unwrap();
    s.stop();
    let s = Server::start(&env);
    create_run(&s, "ev", "b", json!({}));
    put(&s, "ev/b", "f", b"y".to_vec());
    // A poll that waits: nothing new after the open of ev/b until the seal.
    let now = all_events(&s, last);
    let cursor = now.last().unwrap()["seq"].as_i64().unwrap();
    let url = s.url(&format!("/v1/events?after={cursor}&wait=30s"));
    let poll = std::thread::spawn(move || json_of(client().get(url).send().unwrap()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!poll.is_finished(), "the poll returned with nothing new");
    seal(&s, "ev/b");
    let woke = poll.join().unwrap();
    let kinds: Vec<&str> = woke
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"run.sealed"), "{woke}");
    // Paged reads across the restart are the whole log, in order, without gaps.
    let mut paged = first.clone();
    paged.extend(all_events(&s, last));
    let whole = ok_json(
        client()
            .get(s.url("/v1/events?after=0&limit=1000"))
            .send()
            .unwrap(),
    );
    assert_eq!(&paged, whole.as_array().unwrap());
    let seqs: Vec<i64> = paged.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let sealed: Vec<&str> = paged
        .iter()
        .filter(|e| e["kind"] == "run.sealed")
        .map(|e| e["run"].as_str().unwrap())
        .collect();
    assert_eq!(sealed, ["a", "b"]);
    s.stop();
}

#[test]
fn bad_input_gets_json_4xx_and_changes_nothing() {
    let env = Env::new();
    let s = Server::start_with(
        &env,
        &["--max-json-body", "4KiB", "--max-header-size", "16KiB"],
    );
    create_run(&s, "ns", "open", json!({}));
    put(&s, "ns/open", "keep.txt", b"keep".to_vec());
    create_run(&s, "ns", "done", json!({}));
    put(&s, "ns/done", "f", b"sealed".to_vec());
    seal(&s, "ns/done");
    ok_json(
        client()
            .put(s.url("/v1/runs/ns/done/retention"))
            .json(&json!({"value": "30d"}))
            .send()
            .unwrap(),
    );
    let runs_before = env.ok(&["runs", "--json"]);
    let verify_before = env.ok(&["verify", "--json"]);
    let listing = |s: &Server| get_bytes(s, "/v1/runs/ns/open/files/");
    let open_before = listing(&s);

    let big_json = format!(
        "{{\"namespace\": \"ns\", \"run\": \"{}\"}}",
        "x".repeat(8 << 10)
    );
    let big_header = "a".repeat(64 << 10);
    let req = |method: &str, path: &str, extra: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let cases: Vec<(String, u16, &str)> = vec![
        (
            req("PUT", "/v1/runs/ns/open/files/../x", "", "data"),
            400,
            "traversal",
        ),
        (
            req("PUT", "/v1/runs/ns/open/files/a/../../done/x", "", "d"),
            400,
            "traversal 2",
        ),
        (
            req("PUT", "/v1/runs/ns/open/files/a%2F..%2Fx", "", "d"),
            400,
            "encoded slash",
        ),
        (
            req("GET", "/v1/runs/ns%2Fopen/x", "", ""),
            400,
            "encoded slash in a name",
        ),
        (
            req("PUT", "/v1/runs/ns/open/files/a%00b", "", "d"),
            400,
            "NUL",
        ),
        (
            req("PUT", "/v1/runs/ns/open/files/a//b", "", "d"),
            400,
            "empty segment",
        ),
        (
            req("PUT", "/v1/runs/ns/open/files//etc/passwd", "", "d"),
            400,
            "absolute",
        ),
        (
            req("GET", "/v1/runs/.hidden/r", "", ""),
            400,
            "invalid namespace",
        ),
        (
            req(
                "POST",
                "/v1/runs",
                "content-type: application/json\r\n",
                r#"{"namespace": "ns", "run": "../x"}"#,
            ),
            400,
            "invalid run name",
        ),
        (
            req("POST", "/v1/runs", "", r#"{"namespace": "ns", "#),
            400,
            "invalid JSON",
        ),
        (
            req(
                "POST",
                "/v1/runs",
                "",
                r#"{"namespace": "ns", "run": "y", "extra": 1}"#,
            ),
            400,
            "unknown field",
        ),
        (
            req("POST", "/v1/runs", "", &big_json),
            413,
            "JSON body too large",
        ),
        (
            req(
                "POST",
                "/v1/runs",
                "",
                r#"{"namespace": "ns", "run": "open"}"#,
            ),
            409,
            "existing run",
        ),
        (req("GET", "/v1/runs/ns/nope", "", ""), 404, "unknown run"),
        (
            req("GET", "/v1/runs/ns/nope/files/x", "", ""),
            404,
            "unknown run's file",
        ),
        (
            req("PUT", "/v1/runs/ns/nope/files/x", "", "d"),
            404,
            "write to an unknown run",
        ),
        (
            req("PUT", "/v1/runs/ns/done/files/new", "", "d"),
            409,
            "write to a sealed run",
        ),
        (
            req("PUT", "/v1/runs/ns/open/files/keep.txt/x", "", "d"),
            409,
            "file as a directory",
        ),
        (
            req(
                "PUT",
                "/v1/runs/ns/done/retention",
                "",
                r#"{"value": "1d"}"#,
            ),
            403,
            "shorter retention",
        ),
        (
            req("POST", "/v1/runs/ns/done/holds/-bad", "", ""),
            400,
            "invalid hold name",
        ),
        (req("GET", "/v1/events?after=abc", "", ""), 400, "bad query"),
        (req("GET", "/v1/manifests/xyz", "", ""), 400, "bad digest"),
        (
            req(
                "POST",
                "/v1/uploads",
                "",
                r#"{"namespace": "ns", "run": "open", "path": "/abs"}"#,
            ),
            400,
            "absolute upload path",
        ),
        (
            req(
                "POST",
                "/v1/uploads",
                "",
                r#"{"namespace": "ns", "run": "done", "path": "x"}"#,
            ),
            409,
            "upload to a sealed run",
        ),
        (
            req("PUT", "/v1/uploads/0123/complete", "", ""),
            400,
            "bad upload id",
        ),
        (req("DELETE", "/v1/runs/ns/open", "", ""), 405, "method"),
    ];
    for (head, want, what) in &cases {
        let (status, body) = raw(s.addr, head, b"", false);
        assert_eq!(status, *want, "{what}: {body}");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: not a JSON error ({e}): {body:?}"));
        assert!(
            v["code"].is_string() && v["message"].is_string(),
            "{what}: {v}"
        );
    }
    // Oversized headers: refused by the HTTP layer (431, no JSON body there).
    let (status, _) = raw(
        s.addr,
        &format!("GET /health HTTP/1.1\r\nhost: x\r\nx-big: {big_header}\r\n\r\n"),
        b"",
        false,
    );
    assert_eq!(status, 431);
    // A body shorter than its Content-Length: the client stops sending.
    let (status, body) = raw(
        s.addr,
        "PUT /v1/runs/ns/open/files/short.bin HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n",
        &[7u8; 1000],
        true,
    );
    assert_eq!(status, 400, "{body}");
    // Nothing changed: the runs, their data, the open run's files.
    assert_eq!(env.ok(&["runs", "--json"]), runs_before);
    assert_eq!(env.ok(&["verify", "--json"]), verify_before);
    assert_eq!(listing(&s), open_before);
    assert_eq!(get_bytes(&s, "/v1/runs/ns/open/files/keep.txt"), b"keep");
    let info = ok_json(client().get(s.url("/v1/runs/ns/done")).send().unwrap());
    assert_eq!(info["retention"]["retain"], "30d");
    s.stop();
}

#[test]
fn retention_and_holds_follow_the_engine_rules() {
    let env = Env::new();
    let s = Server::start(&env);
    create_run(&s, "ret", "r", json!({}));
    put(&s, "ret/r", "f", b"1".to_vec());
    seal(&s, "ret/r");
    let set = |body: Value| {
        client()
            .put(s.url("/v1/runs/ret/r/retention"))
            .json(&body)
            .send()
            .unwrap()
    };
    let v = ok_json(set(json!({"value": "90d"})));
    assert_eq!(v["retain"], "90d");
    let r = set(json!({"value": "10d"}));
    assert_eq!(r.status(), 403);
    let e = json_of(r);
    assert_eq!(e["code"], "refused");
    assert!(!e["message"].as_str().unwrap().is_empty());
    assert_eq!(set(json!({"value": "10d", "override": true})).status(), 400);
    let v = ok_json(set(
        json!({"value": "10d", "override": true, "reason": "ticket 7"}),
    ));
    assert_eq!(v["retain"], "10d");
    let v = ok_json(
        client()
            .post(s.url("/v1/runs/ret/r/holds/legal"))
            .json(&json!({"reason": "audit"}))
            .send()
            .unwrap(),
    );
    assert_eq!(v["holds"][0]["name"], "legal");
    // The CLI (through the socket) sees the same hold.
    let holds = env.ok(&["hold", "ls", "ret/r"]);
    assert!(holds.starts_with("legal\t"), "{holds}");
    let v = ok_json(
        client()
            .delete(s.url("/v1/runs/ret/r/holds/legal"))
            .send()
            .unwrap(),
    );
    assert_eq!(v["holds"], json!([]));
    assert_eq!(
        client()
            .delete(s.url("/v1/runs/ret/r/holds/legal"))
            .send()
            .unwrap()
            .status(),
        404
    );
    s.stop();
}

#[test]
fn service_routes_openapi_and_metrics() {
    let env = Env::new();
    let s = Server::start(&env);
    assert_eq!(
        ok_json(client().get(s.url("/health")).send().unwrap())["status"],
        "ok"
    );
    assert_eq!(
        ok_json(client().get(s.url("/ready")).send().unwrap())["status"],
        "ready"
    );
    // The served document is the checked-in one, and documents exactly the router's routes.
    let served = get_bytes(&s, "/v1/openapi.json");
    let file =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")).unwrap();
    assert_eq!(served, file);
    let doc: Value = serde_json::from_slice(&file).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (m, _) in ops.as_object().unwrap() {
            if m != "parameters" {
                documented.push((m.to_uppercase(), path.clone()));
            }
        }
    }
    let mut routes: Vec<(String, String)> = artifactfs_server::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    routes.sort();
    assert_eq!(documented, routes);
    // And every one of them is routed (answers something other than 405 / no route).
    create_run(&s, "m", "r", json!({}));
    for (m, p) in &routes {
        let path = p
            .replace("{namespace}", "m")
            .replace("{run}", "r")
            .replace("{path}", "x")
            .replace("{name}", "h")
            .replace("{digest}", &"0".repeat(64))
            .replace("{id}", &"0".repeat(32));
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        let r = client().request(method, s.url(&path)).send().unwrap();
        assert_ne!(r.status(), 405, "{m} {path}");
        if r.status() == 404 && m != "HEAD" {
            let v = json_of(r);
            assert!(
                !v["message"].as_str().unwrap().starts_with("no route"),
                "{m} {path}: {v}"
            );
        }
    }
    let text = client()
        .get(s.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for name in [
        "artifactfs_http_requests_total{method=\"GET\",route=\"/health\",status=\"200\"} 2",
        "artifactfs_http_request_seconds_bucket{route=\"/health\",le=\"+Inf\"} 2",
        "artifactfs_http_requests_total{method=\"POST\",route=\"/v1/runs\",status=\"201\"} 1",
        "artifactfs_dedup_ratio",
        "artifactfs_chunk_cache_hits_total",
        "artifactfs_seal_seconds_count",
        "artifactfs_gc_runs_total 0",
        "artifactfs_http_ingest_bytes_total",
    ] {
        assert!(text.contains(name), "{name} not in:\n{text}");
    }
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("request done") && l.contains("/health"))
        .unwrap_or_else(|| panic!("no request log line:\n{log}"));
    let v: Value = serde_json::from_str(line).expect("JSON log line");
    assert!(v["span"]["request_id"].is_string(), "{v}");
    s.stop();
}

#[test]
fn serve_owns_the_store_and_a_second_owner_is_refused() {
    let env = Env::new();
    let s = Server::start(&env);
    let out = env.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already owned"));
    // Other verbs go through the control socket meanwhile.
    env.ok(&["runs"]);
    s.stop();
}

#[test]
fn curl_script_round_trip() {
    let env = Env::new();
    let s = Server::start(&env);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/http_curl.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(format!("http://{}", s.addr))
        .arg(env.path("curl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop();
}

#[test]
fn mount_serve_shares_one_engine() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let m = common::mount::Mount::start(&env, &env.path("mnt"), &["--serve", &listen]);
    let base = format!("http://{listen}");
    let url = |p: &str| format!("{base}{p}");
    // Wait for the listener (the mount is ready first).
    let deadline = Instant::now() + Duration::from_secs(30);
    while client().get(url("/health")).send().is_err() {
        assert!(
            Instant::now() < deadline,
            "no HTTP server:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = client()
        .post(url("/v1/runs"))
        .json(&json!({"namespace": "both", "run": "r", "metadata": {"via": "http"}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let a = common::bytes(300_000, 1);
    let r = client()
        .put(url("/v1/runs/both/r/files/sub/a.bin"))
        .body(a.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    // The open run written over HTTP is the mount's open run, and the other way round.
    assert_eq!(std::fs::read(m.p("both/r/sub/a.bin")).unwrap(), a);
    let b = common::bytes(70_000, 2);
    std::fs::write(m.p("both/r/b.bin"), &b).unwrap();
    let got = client()
        .get(url("/v1/runs/both/r/files/b.bin"))
        .send()
        .unwrap();
    assert_eq!(got.bytes().unwrap().as_ref(), &b[..]);
    let r = client().post(url("/v1/runs/both/r/seal")).send().unwrap();
    assert_eq!(r.status(), 200);
    common::mount::wait_sealed(&m.p("both/r"), Duration::from_secs(30));
    assert_eq!(
        xattr::get(m.p("both/r"), "user.via").unwrap().as_deref(),
        Some(&b"http"[..])
    );
    // Listings and bytes agree.
    for dir in ["", "sub"] {
        let v: Value = client()
            .get(url(&format!("/v1/runs/both/r/files/{dir}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let http: Vec<(String, u64)> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["size"].as_u64().unwrap(),
                )
            })
            .collect();
        let mut fs: Vec<(String, u64)> = std::fs::read_dir(m.p(&format!("both/r/{dir}")))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                let size = if md.is_dir() { 0 } else { md.len() };
                (e.file_name().into_string().unwrap(), size)
            })
            .collect();
        fs.sort();
        let mut http_sorted = http.clone();
        http_sorted.sort();
        let http_files: Vec<_> = http_sorted.iter().filter(|(n, _)| n != "sub").collect();
        let fs_files: Vec<_> = fs.iter().filter(|(n, _)| n != "sub").collect();
        assert_eq!(http_files, fs_files, "listing of {dir:?}");
        assert_eq!(http_sorted.len(), fs.len());
    }
    let got = client()
        .get(url("/v1/runs/both/r/files/sub/a.bin"))
        .send()
        .unwrap();
    assert_eq!(
        got.bytes().unwrap().as_ref(),
        &std::fs::read(m.p("both/r/sub/a.bin")).unwrap()[..]
    );
    m.unmount();
}

/// A store with one sealed run `dl/r` holding `big.bin` (several chunks, partly compressible)
/// ingested by the CLI; returns the file's bytes and the file offsets where its chunks start.
fn sealed_download_setup(env: &Env) -> (Vec<u8>, Vec<u64>) {
    let mut data = common::bytes(3 << 20, 7);
    // Every other 4 KiB block zeroed: the codec compresses some chunks.
    for block in data.chunks_mut(8 << 10) {
        let n = block.len().min(4 << 10);
        block[..n].fill(0);
    }
    let src = env.path("src-dl");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big.bin"), &data).unwrap();
    env.ingest(&src, "dl/r");
    let store = artifactfs_core::Store::open(&env.store()).unwrap();
    let r = artifactfs_core::RunRef::parse("dl/r").unwrap();
    let entry = store.entry(&r, "big.bin").unwrap();
    let mut starts = Vec::new();
    let mut pos = 0u64;
    for c in &entry.chunks {
        starts.push(pos);
        pos += u64::from(c.1);
    }
    assert!(
        starts.len() >= 4,
        "the file spans several chunks: {starts:?}"
    );
    (data, starts)
}

/// GET with a Range header: (status, Content-Range, body).
fn get_range(s: &Server, path: &str, range: &str) -> (u16, String, Vec<u8>) {
    let r = client()
        .get(s.url(path))
        .header("range", range)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let cr = r
        .headers()
        .get("content-range")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cr, r.bytes().unwrap().to_vec())
}

#[test]
fn sealed_file_downloads_whole_and_in_ranges_are_bit_exact() {
    let env = Env::new();
    let (data, starts) = sealed_download_setup(&env);
    let s = Server::start(&env);
    let path = "/v1/runs/dl/r/files/big.bin";
    let len = data.len() as u64;
    // Whole, twice: the first decodes every chunk and keeps it in the view's cache, the
    // second takes every chunk from there.
    let hits = || -> u64 {
        let m = String::from_utf8(get_bytes(&s, "/metrics")).unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("artifactfs_chunk_cache_hits_total "))
            .expect("cache hits in /metrics")
            .trim()
            .parse()
            .unwrap()
    };
    let mut hit = Vec::new();
    for _ in 0..2 {
        let before = hits();
        let r = client().get(s.url(path)).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"].to_str().unwrap(),
            len.to_string()
        );
        assert!(r.headers().contains_key("etag"));
        assert!(r.bytes().unwrap() == data, "whole download differs");
        hit.push(hits() - before);
    }
    assert_eq!(hit, [0, starts.len() as u64], "cache hits of two downloads");
    let b1 = starts[1];
    let b2 = starts[2];
    let last = *starts.last().unwrap();
    let ranges: Vec<(String, u64, u64)> = vec![
        ("bytes=0-0".into(), 0, 1),
        ("bytes=0-99".into(), 0, 100),
        // Across one chunk boundary, and exactly one whole chunk.
        (format!("bytes={}-{}", b1 - 10, b1 + 9), b1 - 10, b1 + 10),
        (format!("bytes={b1}-{}", b2 - 1), b1, b2),
        // From inside the first chunk to inside the last: every chunk in between.
        (format!("bytes=5-{}", last + 4), 5, last + 5),
        // Open-ended from the middle of a chunk, and a suffix range.
        (format!("bytes={}-", b2 + 3), b2 + 3, len),
        ("bytes=-1000".into(), len - 1000, len),
        (format!("bytes=-{}", len - last + 1), last - 1, len),
        (format!("bytes={}-{}", len - 1, len + 50), len - 1, len),
    ];
    for (h, from, to) in ranges {
        let (status, cr, body) = get_range(&s, path, &h);
        assert_eq!(status, 206, "{h}");
        assert_eq!(cr, format!("bytes {from}-{}/{len}", to - 1), "{h}");
        assert!(
            body == data[from as usize..to as usize],
            "{h}: {} bytes, not the file's [{from}, {to})",
            body.len()
        );
    }
    // A range past the end is refused, not served short.
    let (status, cr, _) = get_range(&s, path, &format!("bytes={len}-"));
    assert_eq!(status, 416);
    assert_eq!(cr, format!("bytes */{len}"));
    s.stop();
}

#[test]
fn a_damaged_chunk_cuts_the_download_instead_of_serving_wrong_bytes() {
    let env = Env::new();
    let (data, starts) = sealed_download_setup(&env);
    // Damage the file's third chunk in its pack (found through the packs' own tables).
    let (pack, offset) = common::chunk_in_pack(&env, "dl/r/big.bin", 2);
    common::flip_byte(&pack, offset + 92);
    let s = Server::start(&env);
    let path = "/v1/runs/dl/r/files/big.bin";
    // The whole file, and a range wholly inside the damaged chunk: each response breaks
    // off (or, when nothing was sent yet, the connection closes before the headers).
    let ranges = [
        None,
        Some(format!("bytes={}-{}", starts[2] + 1, starts[2] + 10)),
    ];
    for range in ranges {
        let mut req = client().get(s.url(path));
        if let Some(h) = &range {
            req = req.header("range", h);
        }
        let Ok(r) = req.send() else { continue };
        assert_eq!(r.status(), if range.is_some() { 206 } else { 200 });
        let announced: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut got = Vec::new();
        let res = BufReader::new(r).read_to_end(&mut got);
        assert!(
            res.is_err(),
            "{range:?}: the body must end in an error, got {} bytes",
            got.len()
        );
        assert!(got.len() < announced);
        if range.is_none() {
            assert_eq!(announced, data.len());
            // What did arrive is the file's, and nothing of the damaged chunk or after it.
            assert!(got.len() as u64 <= starts[2]);
            assert!(got == data[..got.len()]);
        }
    }
    let (status, _, body) = get_range(&s, path, &format!("bytes=0-{}", starts[2] - 1));
    assert_eq!(status, 206);
    assert!(body == data[..starts[2] as usize]);
    // The server says which run and file.
    let log = s.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("download cut") && l.contains("dl/r") && l.contains("big.bin")),
        "the log names the run and the file:\n{log}"
    );
    s.stop();
}

#[test]
fn run_info_answers_while_the_run_is_written_and_sealed() {
    // Readers of GET /v1/runs/NS/RUN take read-only index connections (ADR 0019): they run
    // while files are uploaded and the run is sealed, see only committed states, and a read
    // after the seal answered sees it.
    let env = Env::new();
    let s = Server::start(&env);
    create_run(&s, "busy", "r", json!({"producer": "readers"}));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|sc| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                sc.spawn(|| {
                    let c = client();
                    let mut states = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let v = ok_json(c.get(s.url("/v1/runs/busy/r")).send().unwrap());
                        states.push((v["state"].as_str().unwrap().to_owned(), v["files"].clone()));
                    }
                    states
                })
            })
            .collect();
        for i in 0..40 {
            put(
                &s,
                "busy/r",
                &format!("dir/f{i}.txt"),
                format!("file {i}").into_bytes(),
            );
        }
        let digest = seal(&s, "busy/r");
        let v = ok_json(client().get(s.url("/v1/runs/busy/r")).send().unwrap());
        assert_eq!(
            (v["state"].as_str(), v["digest"].as_str()),
            (Some("sealed"), Some(digest.as_str()))
        );
        assert_eq!(v["files"], 40);
        assert_eq!(v["metadata"]["producer"], "readers");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        readers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(!seen.is_empty());
    for (state, files) in &seen {
        match state.as_str() {
            // A sealed run's counts are its manifest's: all or nothing.
            "sealed" => assert_eq!(files, 40),
            "open" => assert!(files.as_u64().unwrap() <= 40, "{files}"),
            other => panic!("state {other}"),
        }
    }
}

#[test]
fn run_info_follows_every_change_and_the_clock() {
    // GET /v1/runs/NS/RUN answers again from what it read while nothing has been committed
    // (ADR 0022). Every change below is a commit and shows in the next answer; a retention
    // that runs out shows by the clock alone; a run gc deleted is gone.
    let env = Env::with_clock("2026-11-30T12:00:00Z");
    let s = Server::start(&env);
    let info = || ok_json(client().get(s.url("/v1/runs/chg/r")).send().unwrap());
    create_run(&s, "chg", "r", json!({"owner": "lab"}));
    let v = info();
    assert_eq!(
        (v["state"].as_str(), v["digest"].as_str()),
        (Some("open"), None)
    );
    assert_eq!(info()["metadata"]["owner"], "lab");
    put(&s, "chg/r", "a.txt", b"one".to_vec());
    put(&s, "chg/r", "b.txt", b"two".to_vec());
    let digest = seal(&s, "chg/r");
    let v = info();
    assert_eq!(
        (
            v["state"].as_str(),
            v["digest"].as_str(),
            v["files"].as_u64()
        ),
        (Some("sealed"), Some(digest.as_str()), Some(2))
    );
    let hold = |method: reqwest::Method| {
        client()
            .request(method, s.url("/v1/runs/chg/r/holds/audit"))
            .json(&json!({"reason": "check"}))
            .send()
            .unwrap()
            .status()
    };
    assert!(hold(reqwest::Method::POST).is_success());
    assert_eq!(info()["holds"][0]["name"], "audit");
    assert!(hold(reqwest::Method::DELETE).is_success());
    assert_eq!(info()["holds"], json!([]));
    let r = client()
        .put(s.url("/v1/runs/chg/r/retention"))
        .json(&json!({"value": "1d"}))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let v = info();
    assert_eq!(v["retention"]["retain"], "1d");
    assert_eq!(v["retention"]["eligible"], false);
    // Asked again before the retention runs out: the same answer.
    assert_eq!(info(), v);
    assert_eq!(v["retention"]["retain_until"], "2026-12-01T12:00:00Z");
    env.set_time("2026-12-01T11:59:59Z");
    assert_eq!(info(), v);
    env.set_time("2026-12-01T12:00:00Z");
    assert_eq!(info()["retention"]["eligible"], true);
    env.ok(&["gc", "--grace", "0s"]);
    let r = client().get(s.url("/v1/runs/chg/r")).send().unwrap();
    assert_eq!(r.status(), 404);
    s.stop();
}

#[test]
fn uploads_either_side_of_the_whole_body_size_store_exact_bytes() {
    // Bodies up to 256 KiB are read whole and stored by one engine call; larger ones are
    // streamed. Both store the exact bytes, replace a file already there, and answer its hash.
    let env = Env::new();
    let s = Server::start(&env);
    create_run(&s, "edge", "r", json!({}));
    let small = 256 << 10;
    let files: Vec<(String, Vec<u8>)> = [small - 1, small, small + 1, 3 * small]
        .into_iter()
        .map(|n| {
            (
                format!("d/f{n}"),
                gen_slice(n as u64, n as u64, 0, n as u64),
            )
        })
        .collect();
    for (path, data) in &files {
        // A first version, then the real one over it.
        put(&s, "edge/r", path, vec![7; 10]);
        let v = put(&s, "edge/r", path, data.clone());
        assert_eq!(v["size"], data.len() as u64, "{path}");
        assert_eq!(v["blake3"], blake3::hash(data).to_hex().as_str(), "{path}");
    }
    seal(&s, "edge/r");
    for (path, data) in &files {
        let got = get_bytes(&s, &format!("/v1/runs/edge/r/files/{path}"));
        assert!(got == *data, "{path}: {} bytes back", got.len());
    }
    let listing = ok_json(
        client()
            .get(s.url("/v1/runs/edge/r/files/d"))
            .send()
            .unwrap(),
    );
    assert_eq!(
        listing["entries"].as_array().map(Vec::len),
        Some(files.len()),
        "{listing}"
    );
    s.stop();
}

#[test]
fn an_upload_onto_a_full_disk_gets_507_and_stores_nothing() {
    let env = Env::new();
    let disk = common::SmallDisk::mount(&env.store(), "32m");
    env.ok(&["init"]);
    let s = Server::start(&env);
    create_run(&s, "lab", "r1", json!({}));
    let kept = common::bytes(300_000, 3);
    put(&s, "lab/r1", "kept.bin", kept.clone());
    let before = ok_json(
        client()
            .get(s.url("/v1/runs/lab/r1/files/"))
            .send()
            .unwrap(),
    );
    let used = disk.used();

    // A body larger than the disk, streamed: 507 with a JSON error naming the cause.
    // It arrives at a trickle, so most of it is still to come when the disk fills: the
    // client reads the answer all the same.
    let r = client()
        .put(s.url("/v1/runs/lab/r1/files/big.bin"))
        .body(Trickle::body(
            common::bytes(48 << 20, 4),
            Duration::from_millis(5),
        ))
        .send()
        .expect("the answer to an upload onto a full disk");
    assert_eq!(r.status(), 507);
    let v = json_of(r);
    assert_eq!(v["code"], "disk_full", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("No space left"),
        "{v}"
    );
    // The run is as it was: the unfinished upload left no file, the kept one reads back.
    let after = ok_json(
        client()
            .get(s.url("/v1/runs/lab/r1/files/"))
            .send()
            .unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(get_bytes(&s, "/v1/runs/lab/r1/files/kept.bin"), kept);
    // Nor did it leave space taken: its staging file is gone, and it was not chunked ahead.
    assert!(
        disk.used() <= used + (1 << 20),
        "{} bytes more in use after the failed upload",
        disk.used().saturating_sub(used)
    );

    // A disk filled by something else: not ready (503), and the metrics say how little is
    // left; ready again once the space is back.
    let filler = disk.fill();
    let r = client().get(s.url("/ready")).send().unwrap();
    assert_eq!(r.status(), 503);
    let v = json_of(r);
    assert_eq!(v["code"], "not_ready", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("No space left"),
        "{v}"
    );
    let metrics = client()
        .get(s.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let free: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("artifactfs_disk_free_bytes "))
        .expect("artifactfs_disk_free_bytes")
        .parse()
        .unwrap();
    assert!(free < 8 << 20, "{free}");
    assert!(metrics.contains("artifactfs_reserve_held 1"), "{metrics}");
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(client().get(s.url("/ready")).send().unwrap().status(), 200);

    // With room, the same upload succeeds and the run seals and verifies.
    disk.resize("160m");
    let big = common::bytes(48 << 20, 4);
    put(&s, "lab/r1", "big.bin", big.clone());
    seal(&s, "lab/r1");
    assert_eq!(get_bytes(&s, "/v1/runs/lab/r1/files/big.bin"), big);
    s.stop();
    env.ok(&["verify"]);
}

/// A request body handed out a MiB at a time with a pause after each, as a client on a slow
/// link sends it: the server's refusal lands while most of it is still to come.
struct Trickle {
    data: std::io::Cursor<Vec<u8>>,
    pause: Duration,
}

impl Trickle {
    fn body(data: Vec<u8>, pause: Duration) -> reqwest::blocking::Body {
        let len = data.len() as u64;
        reqwest::blocking::Body::sized(
            Trickle {
                data: std::io::Cursor::new(data),
                pause,
            },
            len,
        )
    }
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        const MIB: u64 = 1 << 20;
        let at = self.data.position();
        if at.is_multiple_of(MIB) && at > 0 {
            std::thread::sleep(self.pause);
        }
        let n = buf.len().min((MIB - at % MIB) as usize);
        self.data.read(&mut buf[..n])
    }
}

#[test]
fn a_refused_upload_is_answered_to_a_client_still_sending() {
    // The server refuses a streamed body before reading it (the run is sealed) or partway
    // (an upload running past its declared length); a client still writing its body reads
    // the error, not a connection reset under its write.
    let env = Env::new();
    let s = Server::start(&env);
    create_run(&s, "lab", "done", json!({}));
    put(&s, "lab/done", "a.txt", b"a".to_vec());
    seal(&s, "lab/done");
    let r = client()
        .put(s.url("/v1/runs/lab/done/files/big.bin"))
        .body(Trickle::body(
            common::bytes(24 << 20, 5),
            Duration::from_millis(20),
        ))
        .send()
        .expect("the answer to a PUT into a sealed run");
    assert_eq!(r.status(), 409);
    let v = json_of(r);
    assert!(v["message"].as_str().unwrap().contains("sealed"), "{v}");

    // Partway: a resumable upload of 4 MiB sent 24; nothing past its end is kept.
    create_run(&s, "lab", "open", json!({}));
    let loc = new_upload(&s, "lab", "open", "big.bin", 4 << 20);
    let data = common::bytes(24 << 20, 6);
    let r = client()
        .patch(s.url(&loc))
        .header("upload-offset", 0)
        .header("content-type", "application/offset+octet-stream")
        .body(Trickle::body(data.clone(), Duration::from_millis(20)))
        .send()
        .expect("the answer to a PATCH past the upload's length");
    assert_eq!(r.status(), 413);
    assert!(
        json_of(r)["message"]
            .as_str()
            .unwrap()
            .contains("past its end")
    );
    assert!(head_offset(&s, &loc) <= 4 << 20);
    s.stop();
}
