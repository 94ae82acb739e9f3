//! The publisher's cursor: the sequence number of the last event NATS acknowledged, kept in
//! one small file in the store directory (`STORE/nats-cursor` by default) so that a restarted
//! publisher resumes after it. The file holds the number in decimal and a newline; it is
//! replaced atomically (temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old or the new value. A missing file means nothing was acknowledged yet.
//! A file that does not parse is an error, never read as 0: that would publish the whole log
//! again.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

/// Reads the cursor; `Ok(0)` when the file does not exist.
pub fn read(path: &Path) -> Result<i64, Error> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let t = text.trim();
            t.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Error::Cursor {
                    path: path.to_path_buf(),
                    reason: format!("{t:?} is not a sequence number; fix or remove the file"),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::Cursor {
            path: path.to_path_buf(),
            reason: format!("read: {e}"),
        }),
    }
}

/// Replaces the cursor with `seq`, durably.
pub fn write(path: &Path, seq: i64) -> Result<(), Error> {
    let err = |op: &str, p: &Path, e: std::io::Error| Error::Cursor {
        path: p.to_path_buf(),
        reason: format!("{op}: {e}"),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| err("create", &tmp, e))?;
    f.write_all(format!("{seq}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| err("write", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| err("rename", path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err("sync directory", dir, e))?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nats-cursor");
        assert_eq!(read(&p).unwrap(), 0);
        write(&p, 42).unwrap();
        assert_eq!(read(&p).unwrap(), 42);
        assert_eq!(fs::read_to_string(&p).unwrap(), "42\n");
        write(&p, 43).unwrap();
        assert_eq!(read(&p).unwrap(), 43);
        assert!(!tmp_path(&p).exists());
        for bad in ["", "x", "-1", "12 13"] {
            fs::write(&p, bad).unwrap();
            let e = read(&p).unwrap_err().to_string();
            assert!(e.contains("nats-cursor"), "{e}");
        }
    }

    #[test]
    fn a_rebuild_numbers_the_new_log_after_the_default_cursor() {
        assert!(artifactfs_core::rebuild::EVENT_CURSOR_FILES.contains(&crate::CURSOR_FILE));
    }
}
