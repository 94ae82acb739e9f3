//! Subjects and payloads of published events.
//!
//! An event goes to `<prefix>.<namespace>.<kind tokens>`: the namespace is one subject token,
//! the kind keeps its dots as token separators (`run.sealed` is two tokens), so
//! `artifactfs.events.*.run.sealed` matches every seal and `artifactfs.events.lab.>` every
//! event of namespace `lab`. Names may contain what a subject token cannot (`.`, `*`, `>`,
//! whitespace), so a token is percent-encoded: those bytes, `%` itself and control characters
//! become `%XX`. The encoding is injective, so two namespaces never share a subject. Events
//! without a namespace (`gc.finished`, `tier.uploaded`) use the token `_`; a namespace that
//! is literally `_` is written `%5F`, an empty token `%`.

use artifactfs_core::index::EventRow;

/// The token of events without a namespace.
pub const NO_NAMESPACE: &str = "_";

/// Encodes one subject token (see the module documentation).
pub fn token(s: &str) -> String {
    if s.is_empty() {
        // A lone `%` is never produced otherwise (an escape always has two hex digits).
        return "%".into();
    }
    if s == NO_NAMESPACE {
        return "%5F".into();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The subject of `ev` under `prefix` (e.g. `artifactfs.events`).
pub fn subject(prefix: &str, ev: &EventRow) -> String {
    let ns = match &ev.namespace {
        Some(ns) => token(ns),
        None => NO_NAMESPACE.to_string(),
    };
    let kind: Vec<String> = ev.kind.split('.').map(token).collect();
    format!("{prefix}.{ns}.{}", kind.join("."))
}

/// The `Nats-Msg-Id` of an event: unique per store and sequence number, so that JetStream
/// drops a second copy of the same event.
pub fn msg_id(store_id: &str, seq: i64) -> String {
    format!("{store_id}-{seq}")
}

/// The JSON body of a published event: the row as `.artifactfs/events` shows it, plus the
/// store id and the time in RFC 3339.
pub fn payload(store_id: &str, ev: &EventRow) -> serde_json::Value {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ev.at_ns.max(0) as u64);
    serde_json::json!({
        "store": store_id,
        "seq": ev.seq,
        "at_ns": ev.at_ns,
        "at": humantime::format_rfc3339_nanos(at).to_string(),
        "kind": ev.kind,
        "namespace": ev.namespace,
        "run": ev.run,
        "detail": ev.detail,
    })
}

/// Checks a subject prefix given in the options: dot-separated non-empty tokens without
/// wildcards or whitespace.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && !t
                    .chars()
                    .any(|c| matches!(c, '*' | '>') || c.is_whitespace() || c.is_control())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ns: Option<&str>, kind: &str) -> EventRow {
        EventRow {
            seq: 7,
            at_ns: 1_700_000_000_123_456_789,
            kind: kind.into(),
            namespace: ns.map(Into::into),
            run: ns.map(|_| "r1".into()),
            detail: serde_json::json!({"k": 1}),
        }
    }

    #[test]
    fn tokens_are_safe_and_distinct() {
        assert_eq!(token("guide-board"), "guide-board");
        assert_eq!(token("a.b"), "a%2Eb");
        assert_eq!(token("a*b>c d\te"), "a%2Ab%3Ec%20d%09e");
        assert_eq!(token("100%"), "100%25");
        assert_eq!(token("_"), "%5F");
        assert_eq!(token("x_y"), "x_y");
        assert_eq!(token("é"), "é");
        assert_eq!(token(""), "%");
        // Injective on the pairs that a lossy replacement would merge.
        assert_ne!(token("a.b"), token("a_b"));
        assert_ne!(token("a%2Eb"), token("a.b"));
        assert_ne!(token("_"), NO_NAMESPACE);
        for t in ["a.b", "a*b", "a>b", "a b", "a\u{a0}b", "_"] {
            let s = token(t);
            assert!(
                !s.contains(['.', '*', '>']) && !s.chars().any(char::is_whitespace),
                "{s}"
            );
        }
    }

    #[test]
    fn subjects_and_payloads() {
        assert_eq!(
            subject("artifactfs.events", &ev(Some("lab.a"), "run.sealed")),
            "artifactfs.events.lab%2Ea.run.sealed"
        );
        assert_eq!(
            subject("artifactfs.events", &ev(None, "gc.finished")),
            "artifactfs.events._.gc.finished"
        );
        let p = payload("s1", &ev(Some("lab"), "run.sealed"));
        assert_eq!(p["store"], "s1");
        assert_eq!(p["seq"], 7);
        assert_eq!(p["namespace"], "lab");
        assert_eq!(p["run"], "r1");
        assert_eq!(p["detail"]["k"], 1);
        assert_eq!(p["at"], "2023-11-14T22:13:20.123456789Z");
        assert_eq!(msg_id("s1", 7), "s1-7");
    }

    #[test]
    fn prefixes() {
        assert!(valid_prefix("artifactfs.events"));
        assert!(valid_prefix("x"));
        for bad in ["", "a..b", ".a", "a.", "a.*", "a.>", "a b"] {
            assert!(!valid_prefix(bad), "{bad}");
        }
    }
}
