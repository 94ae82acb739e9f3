//! Resumable uploads (tus 1.0 where it fits): the state of each upload lives in the store, in
//! `STORE/uploads/<id>/meta.json` (target run and path, expected length, creation time) and
//! `STORE/uploads/<id>/data` (the bytes received so far). Both are fsynced before an answer
//! says they are there, so the offset `HEAD` reports survives a killed client and a restarted
//! server. Completing an upload checks the whole file's BLAKE3 against the one the client
//! expects and only then writes it into the open run (through the same [`crate::fsops::Put`]
//! as a plain `PUT`); a mismatch commits nothing and keeps the upload for a retry.
//!
//! Everything here blocks (file I/O): handlers call it through `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use artifactfs_core::RunRef;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The directory of all uploads in a store.
pub fn uploads_dir(store_root: &Path) -> PathBuf {
    store_root.join("uploads")
}

/// What an upload is for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadMeta {
    pub namespace: String,
    pub run: String,
    pub path: String,
    /// The total length announced with `Upload-Length`, if any.
    pub length: Option<u64>,
    pub created_ns: i64,
}

impl UploadMeta {
    pub fn run_ref(&self) -> RunRef {
        RunRef {
            namespace: self.namespace.clone(),
            run: self.run.clone(),
        }
    }
}

/// Checks an upload id: 32 lowercase hex digits (what [`create`] makes).
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn dir_of(root: &Path, id: &str) -> Result<PathBuf, ApiError> {
    if !valid_id(id) {
        return Err(ApiError::bad_request(format!("{id:?} is not an upload id")));
    }
    Ok(uploads_dir(root).join(id))
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

/// Makes a new upload and returns its id.
pub fn create(root: &Path, meta: &UploadMeta) -> Result<String, ApiError> {
    let all = uploads_dir(root);
    fs::create_dir_all(&all)?;
    let id = format!("{:032x}", rand::random::<u128>());
    let tmp = all.join(format!(".new-{id}"));
    fs::create_dir(&tmp)?;
    File::create(tmp.join("data"))?.sync_all()?;
    let mut f = File::create(tmp.join("meta.json"))?;
    f.write_all(&serde_json::to_vec_pretty(meta).map_err(|e| ApiError::internal(e.to_string()))?)?;
    f.sync_all()?;
    fsync_dir(&tmp)?;
    fs::rename(&tmp, all.join(&id))?;
    fsync_dir(&all)?;
    tracing::info!(upload = %id, run = %meta.run_ref(), path = %meta.path, "upload created");
    Ok(id)
}

/// An upload's metadata and its current offset.
pub fn state(root: &Path, id: &str) -> Result<(UploadMeta, u64), ApiError> {
    let dir = dir_of(root, id)?;
    let meta = match fs::read(dir.join("meta.json")) {
        Ok(b) => serde_json::from_slice::<UploadMeta>(&b)
            .map_err(|e| ApiError::internal(format!("upload {id}: unreadable meta.json: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!("no upload {id}")));
        }
        Err(e) => return Err(e.into()),
    };
    let len = fs::metadata(dir.join("data"))?.len();
    Ok((meta, len))
}

/// Opens the data file for appending at `offset` (which must be its length).
pub fn open_append(root: &Path, id: &str, offset: u64) -> Result<(File, UploadMeta), ApiError> {
    let (meta, len) = state(root, id)?;
    if len != offset {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "offset_mismatch",
            format!("upload {id} is at offset {len}, not {offset}"),
        ));
    }
    let f = OpenOptions::new()
        .append(true)
        .open(dir_of(root, id)?.join("data"))?;
    Ok((f, meta))
}

/// The BLAKE3 (hex) and length of what an upload holds.
pub fn hash(root: &Path, id: &str) -> Result<(String, u64), ApiError> {
    let mut f = File::open(dir_of(root, id)?.join("data"))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().to_hex().to_string(), n))
}

/// Opens what an upload holds for reading.
pub fn data(root: &Path, id: &str) -> Result<File, ApiError> {
    Ok(File::open(dir_of(root, id)?.join("data"))?)
}

/// Removes an upload.
pub fn remove(root: &Path, id: &str) -> Result<(), ApiError> {
    let dir = dir_of(root, id)?;
    match fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("no upload {id}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes uploads untouched for longer than `expiry` (and half-made ones); returns how many.
pub fn expire(root: &Path, expiry: Duration) -> usize {
    let Ok(rd) = fs::read_dir(uploads_dir(root)) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let touched = fs::metadata(p.join("data"))
            .and_then(|m| m.modified())
            .or_else(|_| e.metadata().and_then(|m| m.modified()));
        let age = touched.map_or(Duration::ZERO, |t| {
            now.duration_since(t).unwrap_or_default()
        });
        // A half-made upload is one whose creation stopped in the middle (a minute is long).
        let stale = age > expiry || (name.starts_with(".new-") && age > Duration::from_secs(60));
        if stale {
            match fs::remove_dir_all(&p) {
                Ok(()) => {
                    n += 1;
                    tracing::info!(upload = %name, "expired upload removed");
                }
                Err(err) => {
                    tracing::warn!(upload = %name, "cannot remove an expired upload: {err}")
                }
            }
        }
    }
    n
}
