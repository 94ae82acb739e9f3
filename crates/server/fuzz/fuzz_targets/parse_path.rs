//! Fuzzes the request-path parser: it must never panic, and whatever it accepts must be a
//! valid run reference and a path that no `..`, `.`, empty segment, NUL or `/` inside a
//! name can have reached.

#![no_main]

use artifactfs_server::paths::{RunResource, parse_file_path, parse_run_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let raw = format!("/v1/runs/{s}");
    if let Ok(p) = parse_run_path(&raw) {
        assert!(artifactfs_core::RunRef::new(&p.run.namespace, &p.run.run).is_ok());
        if let RunResource::File(path) = &p.resource {
            assert!(!path.starts_with('/'));
            for c in path.split('/').filter(|c| !path.is_empty() || !c.is_empty()) {
                assert!(!c.is_empty() && c != "." && c != "..", "{raw:?} -> {path:?}");
                assert!(!c.contains('\0'));
            }
        }
    }
    if let Ok(p) = parse_file_path(s) {
        assert!(!p.is_empty() && !p.starts_with('/'));
        assert!(p.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
    }
});
