//! Fuzzes run references and paths inside a run (`artifactfs_core::names`), as the CLI, the
//! control socket and JSON bodies give them: parsing must never panic; what it accepts must
//! print back to itself and parse again to the same value; an accepted path is normalised
//! (validating it again changes nothing) and has no empty, `.` or `..` component, no NUL and
//! no control character.

#![no_main]

use artifactfs_core::RunRef;
use artifactfs_core::names::validate_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((r, path)) = RunRef::parse_with_path(s) {
        let again = RunRef::new(&r.namespace, &r.run).expect("accepted names stay valid");
        assert_eq!(again, r);
        let printed = r.to_string();
        assert_eq!(RunRef::parse(&printed).expect("printed form parses"), r);
        assert_eq!(validate_path(&path).expect("a normalised path stays valid"), path);
        if !path.is_empty() {
            for c in path.split('/') {
                assert!(!c.is_empty() && c != "." && c != "..", "{s:?} -> {path:?}");
                assert!(!c.chars().any(char::is_control), "{s:?} -> {path:?}");
            }
        }
    }
    if let Ok(r) = RunRef::parse(s) {
        assert_eq!(r.to_string(), s, "a plain reference prints as given");
    }
});
