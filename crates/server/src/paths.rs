//! The request-path parser: turns the raw (still percent-encoded) path of a request under
//! `/v1/runs/` into a run, a sub-resource and a validated path inside the run. It is a pure
//! function of its input (fuzzed in `fuzz/`), and it is the only place that decodes paths: the
//! router's own decoding is never used for names, so `%2F` cannot smuggle a `/` into a name.
//!
//! Refused, each with a reason: empty segments (`a//b`), `.` and `..`, encoded slashes
//! (`%2F`), NUL and other control characters (encoded or not), invalid UTF-8, malformed
//! escapes, invalid namespace or run names (`artifactfs_core::names`), invalid hold names.

use artifactfs_core::RunRef;
use artifactfs_core::names::{validate_component, validate_path};
use artifactfs_core::retention::validate_hold_name;

/// The prefix every run route starts with.
pub const RUNS_PREFIX: &str = "/v1/runs/";

/// What a path under `/v1/runs/NS/RUN` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunResource {
    /// `/v1/runs/NS/RUN`
    Run,
    /// `/v1/runs/NS/RUN/manifest`
    Manifest,
    /// `/v1/runs/NS/RUN/seal`
    Seal,
    /// `/v1/runs/NS/RUN/retention`
    Retention,
    /// `/v1/runs/NS/RUN/holds/NAME`
    Hold(String),
    /// `/v1/runs/NS/RUN/files[/PATH]`; the empty path is the run's root directory.
    File(String),
}

/// A parsed run route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPath {
    pub run: RunRef,
    pub resource: RunResource,
}

/// Why a path is refused (always a 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadPath(pub String);

fn bad(msg: impl Into<String>) -> BadPath {
    BadPath(msg.into())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes one path segment (which holds no raw `/`), refusing what may not be in a
/// name: an encoded `/`, NUL or another control character, a malformed escape, non-UTF-8.
pub fn decode_segment(seg: &str) -> Result<String, BadPath> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(bad(format!("malformed percent-escape in {seg:?}")));
            };
            let v = h * 16 + l;
            if v == b'/' {
                return Err(bad(format!(
                    "{seg:?} contains an encoded '/' (%2F): a name cannot contain '/'"
                )));
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| bad(format!("{seg:?} is not UTF-8")))?;
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(bad(format!("{seg:?} contains the control character {c:?}")));
    }
    Ok(s)
}

/// Parses a raw request path (as sent, before any decoding; no query string) that starts with
/// [`RUNS_PREFIX`].
pub fn parse_run_path(raw: &str) -> Result<RunPath, BadPath> {
    let rest = raw
        .strip_prefix(RUNS_PREFIX)
        .ok_or_else(|| bad(format!("{raw:?} is not under {RUNS_PREFIX}")))?;
    let raw_segs: Vec<&str> = rest.split('/').collect();
    // A single trailing slash is allowed after `files` only (a directory listing).
    let (raw_segs, trailing) = match raw_segs.split_last() {
        Some((&"", init)) if !init.is_empty() => (init, true),
        _ => (&raw_segs[..], false),
    };
    let mut segs = Vec::with_capacity(raw_segs.len());
    for s in raw_segs {
        if s.is_empty() {
            return Err(bad(format!("{raw:?} has an empty path segment")));
        }
        let d = decode_segment(s)?;
        if d == "." || d == ".." {
            return Err(bad(format!("{raw:?}: {d:?} segments are not allowed")));
        }
        segs.push(d);
    }
    if segs.len() < 2 {
        return Err(bad(format!("{raw:?} does not name NAMESPACE/RUN")));
    }
    validate_component("namespace", &segs[0], false).map_err(|e| bad(e.to_string()))?;
    validate_component("run name", &segs[1], false).map_err(|e| bad(e.to_string()))?;
    let run = RunRef {
        namespace: segs[0].clone(),
        run: segs[1].clone(),
    };
    let sub: Vec<&str> = segs[2..].iter().map(String::as_str).collect();
    let resource = match sub.as_slice() {
        [] => RunResource::Run,
        ["manifest"] => RunResource::Manifest,
        ["seal"] => RunResource::Seal,
        ["retention"] => RunResource::Retention,
        ["holds", name] => {
            validate_hold_name(name).map_err(|e| bad(e.to_string()))?;
            RunResource::Hold((*name).to_owned())
        }
        ["files", path @ ..] => {
            let joined = path.join("/");
            let p = validate_path(&joined).map_err(|e| bad(e.to_string()))?;
            RunResource::File(p)
        }
        _ => return Err(bad(format!("{raw:?} names no resource of a run"))),
    };
    if trailing && !matches!(resource, RunResource::File(_)) {
        return Err(bad(format!("{raw:?} ends with '/'")));
    }
    Ok(RunPath { run, resource })
}

/// Parses a path inside a run given in a JSON body or a header (not percent-encoded).
pub fn parse_file_path(p: &str) -> Result<String, BadPath> {
    if p.starts_with('/') {
        return Err(bad(format!(
            "{p:?} is absolute; give a path inside the run"
        )));
    }
    let v = validate_path(p).map_err(|e| bad(e.to_string()))?;
    if v.is_empty() {
        return Err(bad("the path is empty: name a file inside the run"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> RunPath {
        parse_run_path(raw).unwrap_or_else(|e| panic!("{raw:?} refused: {e}"))
    }

    #[test]
    fn good_paths() {
        let p = ok("/v1/runs/ns/r1");
        assert_eq!(p.run, RunRef::new("ns", "r1").unwrap());
        assert_eq!(p.resource, RunResource::Run);
        assert_eq!(ok("/v1/runs/ns/r1/seal").resource, RunResource::Seal);
        assert_eq!(
            ok("/v1/runs/ns/r1/manifest").resource,
            RunResource::Manifest
        );
        assert_eq!(
            ok("/v1/runs/ns/r1/holds/legal-1").resource,
            RunResource::Hold("legal-1".into())
        );
        assert_eq!(
            ok("/v1/runs/ns/r1/files/a/b%20c/.hidden").resource,
            RunResource::File("a/b c/.hidden".into())
        );
        assert_eq!(
            ok("/v1/runs/ns/r1/files").resource,
            RunResource::File("".into())
        );
        assert_eq!(
            ok("/v1/runs/ns/r1/files/").resource,
            RunResource::File("".into())
        );
        assert_eq!(
            ok("/v1/runs/ns/r1/files/d/").resource,
            RunResource::File("d".into())
        );
        assert_eq!(ok("/v1/runs/n%C3%BC/r").run.namespace, "nü");
    }

    #[test]
    fn bad_paths() {
        for raw in [
            "/v1/runs/",
            "/v1/runs/ns",
            "/v1/runs/ns/",
            "/v1/runs//r",
            "/v1/runs/ns//files/x",
            "/v1/runs/ns/r/files/a//b",
            "/v1/runs/ns/r/files/../x",
            "/v1/runs/ns/r/files/a/%2E%2E/x",
            "/v1/runs/ns/r/files/./x",
            "/v1/runs/ns/r/files/a%2Fb",
            "/v1/runs/ns/r/files/a%2fb",
            "/v1/runs/ns%2Fx/r",
            "/v1/runs/ns/r/files/a%00b",
            "/v1/runs/ns/r/files/a%0Ab",
            "/v1/runs/ns/r/files/a%zz",
            "/v1/runs/ns/r/files/a%4",
            "/v1/runs/ns/r/files/%FF",
            "/v1/runs/.ns/r",
            "/v1/runs/ns/.r",
            "/v1/runs/../r",
            "/v1/runs/ns/r/holds/",
            "/v1/runs/ns/r/holds/-x",
            "/v1/runs/ns/r/holds/a/b",
            "/v1/runs/ns/r/seal/",
            "/v1/runs/ns/r/unknown",
            "/v1/other/ns/r",
        ] {
            assert!(parse_run_path(raw).is_err(), "{raw:?} should be refused");
        }
        let long = format!("/v1/runs/ns/{}", "x".repeat(256));
        assert!(parse_run_path(&long).is_err());
    }

    #[test]
    fn body_paths() {
        assert_eq!(parse_file_path("a/b.txt").unwrap(), "a/b.txt");
        for p in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a\0b", "."] {
            assert!(parse_file_path(p).is_err(), "{p:?} should be refused");
        }
    }
}
