//! Names of namespaces and runs, and paths inside a run.
//!
//! A namespace or run name is one path component: non-empty UTF-8 of at most 255 bytes, not `.`
//! or `..`, not starting with `.` (the mount reserves `.artifactfs`), without `/`, NUL or other
//! control characters. Paths inside a run are `/`-separated components obeying the same rules
//! except that a leading `.` is allowed (dotfiles are ordinary files in a run).

use std::fmt;

use crate::error::{Error, Result};

/// Longest name component accepted, in bytes (the Linux NAME_MAX).
pub const NAME_MAX: usize = 255;

/// A run's address: `namespace/run`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunRef {
    pub namespace: String,
    pub run: String,
}

impl RunRef {
    /// Builds a reference from two validated components.
    pub fn new(namespace: &str, run: &str) -> Result<Self> {
        validate_component("namespace", namespace, false)?;
        validate_component("run name", run, false)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            run: run.to_owned(),
        })
    }

    /// Parses exactly `NAMESPACE/RUN`.
    pub fn parse(s: &str) -> Result<Self> {
        let (r, _) = Self::parse_with_path(s)?;
        if s.matches('/').count() != 1 {
            return Err(Error::invalid(
                "run reference",
                format!("{s:?} has a path after NAMESPACE/RUN"),
            ));
        }
        Ok(r)
    }

    /// Parses `NAMESPACE/RUN[/PATH]`, returning the run and the (validated, possibly empty) path.
    pub fn parse_with_path(s: &str) -> Result<(Self, String)> {
        let mut parts = s.splitn(3, '/');
        let ns = parts.next().unwrap_or("");
        let run = parts.next().ok_or_else(|| {
            Error::invalid(
                "run reference",
                format!("{s:?} is not of the form NAMESPACE/RUN"),
            )
        })?;
        let r = Self::new(ns, run).map_err(|e| match e {
            Error::Invalid { what, reason } => Error::invalid(what, format!("{reason} (in {s:?})")),
            other => other,
        })?;
        let path = match parts.next() {
            None => String::new(),
            Some(p) => validate_path(p)?,
        };
        Ok((r, path))
    }
}

impl fmt::Display for RunRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.run)
    }
}

/// Checks one name component. `allow_dot` permits a leading `.` (not `.`/`..` themselves).
pub fn validate_component(what: &str, s: &str, allow_dot: bool) -> Result<()> {
    let bad = |reason: String| Err(Error::invalid(what, reason));
    if s.is_empty() {
        return bad("empty name".into());
    }
    if s.len() > NAME_MAX {
        return bad(format!("{} bytes is longer than {NAME_MAX}", s.len()));
    }
    if s == "." || s == ".." {
        return bad(format!("{s:?} is not a name"));
    }
    if !allow_dot && s.starts_with('.') {
        return bad(format!("{s:?} starts with '.'"));
    }
    if let Some(c) = s.chars().find(|c| *c == '/' || c.is_control()) {
        return bad(format!("{s:?} contains {c:?}"));
    }
    Ok(())
}

/// Validates a relative path inside a run and returns it normalised (no trailing `/`).
/// An empty string (or `/` alone) means the run's root.
pub fn validate_path(p: &str) -> Result<String> {
    let trimmed = p.strip_suffix('/').unwrap_or(p);
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for comp in trimmed.split('/') {
        validate_component("path", comp, true).map_err(|e| match e {
            Error::Invalid { reason, .. } => {
                Error::invalid("path", format!("{p:?}: component {reason}"))
            }
            other => other,
        })?;
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_refs() {
        let r = RunRef::parse("guide-board/run-0042").unwrap();
        assert_eq!(r.namespace, "guide-board");
        assert_eq!(r.run, "run-0042");
        let (r, p) = RunRef::parse_with_path("ns/run with space/a/ü.txt").unwrap();
        assert_eq!(r.run, "run with space");
        assert_eq!(p, "a/ü.txt");
        let (_, p) = RunRef::parse_with_path("ns/r/.hidden/x").unwrap();
        assert_eq!(p, ".hidden/x");
    }

    #[test]
    fn bad_refs() {
        for s in [
            "",
            "ns",
            "ns/",
            "/run",
            "ns//run",
            "../run",
            "ns/..",
            "ns/.",
            ".ns/run",
            "ns/.run",
            "ns/ru\nn",
            "ns/r\u{7f}",
            "ns/run/",
            "ns/run/a//b",
            "ns/run/../x",
            "ns/run/a/./b",
        ] {
            assert!(
                RunRef::parse(s).is_err(),
                "{s:?} should be refused as a run reference"
            );
        }
        assert!(RunRef::parse_with_path("ns/run/a//b").is_err());
        assert!(RunRef::parse_with_path("ns/run/../b").is_err());
        assert!(RunRef::new("ns", &"x".repeat(256)).is_err());
        assert!(RunRef::new("ns", &"x".repeat(255)).is_ok());
    }
}
