//! The close journal (ADR 0031): what the view's open index transaction holds, written at each
//! close so that the close need not commit.
//!
//! A file created in an open run commits with its close (ADR 0018). That commit was most of
//! the mount's own time per small file, and a producer closes one every half millisecond. Now
//! the changes the view makes inside its deferred transaction (a file's creation, its content
//! and attributes at a close) are also recorded as *steps*, and a close appends the steps not
//! yet written to `STORE/index.journal` (one `write`, no `fsync`: a commit with
//! `synchronous=NORMAL` does not sync either) and leaves the transaction open. The transaction
//! commits when a batch is full, after a second, or when anything else takes the index; each
//! commit empties the journal.
//!
//! Every commit that holds steps also sets the index's `journal_mark` to the last of them, in
//! the same transaction: the mark says which steps the index holds. When the store is
//! opened after a crash, the steps past the mark are applied again, in order, in one
//! transaction. A torn or damaged record ends the journal there (the closes after it had not
//! returned, or the disk lost them as it may lose a commit that was never synced).
//!
//! Format (little-endian): a 48-byte header, `AFSJRNL1`, the journal's 16-byte id, and the
//! index's mark when the journal was made (its `base`: a journal id, all zeros for none, and a
//! sequence number). The journal's steps are numbered on from the base's. A journal is only
//! applied to an index whose mark is its base or one of its own steps: to the index it was
//! written for. Then records of `len: u32`, `check: [u8; 8]` (the first 8 bytes of the BLAKE3
//! of the payload) and the payload: `seq: u64`, a tag and the step's fields.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{InodeRow, Meta};
use crate::error::{Error, Result};
use crate::manifest::Kind;

const MAGIC: &[u8; 8] = b"AFSJRNL1";
const HEADER: u64 = 48;
/// A record larger than this is damage, not a step (inline content is at most a few MiB).
const MAX_RECORD: usize = 64 << 20;

/// The journal of the store whose index is at `index`.
pub fn path_for(index: &Path) -> PathBuf {
    index.with_file_name("index.journal")
}

/// A change of the view's open transaction, as it is applied (live and on replay).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A file made by `create`: its inode (with its number), its name in `dir`, whose times
    /// become the inode's change time, and (for a regular file) its empty inline content.
    Create {
        dir: i64,
        name: String,
        row: InodeRow,
    },
    /// What a close wrote: the inode's attributes (the whole row) or only its times, and its
    /// inline content if that changed.
    Persist {
        ino: i64,
        row: Option<InodeRow>,
        times: Option<i64>,
        inline: Option<Vec<u8>>,
    },
}

impl Step {
    /// Applies the step. A `Create` whose row has inode number 0 takes the next number, which
    /// it writes back into the row (the live path); a replay gives the recorded one.
    pub fn apply(&mut self, m: &Meta<'_>) -> Result<()> {
        match self {
            Step::Create { dir, name, row } => {
                let ino = m.insert_inode(row)?;
                row.ino = ino;
                m.set_dentry(*dir, name, ino)?;
                m.set_times(*dir, row.ctime_ns, row.ctime_ns)?;
                if row.kind == Kind::File {
                    // A new file starts inline; it moves to a staging file if it grows.
                    m.set_inline_data(ino, &[])?;
                }
            }
            Step::Persist {
                ino,
                row,
                times,
                inline,
            } => {
                if let Some(row) = row {
                    m.update_inode(row)?;
                } else if let Some(t) = times {
                    m.set_times(*ino, *t, *t)?;
                }
                if let Some(d) = inline {
                    m.set_inline_data(*ino, d)?;
                }
            }
        }
        Ok(())
    }

    fn encode(&self, seq: u64, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        out.extend_from_slice(&[0u8; 12]);
        let mut e = Enc(out);
        e.u64(seq);
        match self {
            Step::Create { dir, name, row } => {
                e.u8(1);
                e.i64(*dir);
                e.str(name);
                e.row(row)?;
            }
            Step::Persist {
                ino,
                row,
                times,
                inline,
            } => {
                e.u8(2);
                e.i64(*ino);
                e.opt(row.as_ref(), Enc::row)?;
                e.opt(times.as_ref(), |e, t| {
                    e.i64(*t);
                    Ok(())
                })?;
                e.opt(inline.as_ref(), |e, d| {
                    e.bytes(d);
                    Ok(())
                })?;
            }
        }
        let len = out.len() - start - 12;
        let check = blake3::hash(&out[start + 12..]);
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        out[start + 4..start + 12].copy_from_slice(&check.as_bytes()[..8]);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<(u64, Step)> {
        let mut d = Dec(payload);
        let seq = d.u64()?;
        let step = match d.u8()? {
            1 => Step::Create {
                dir: d.i64()?,
                name: d.str()?,
                row: d.row()?,
            },
            2 => Step::Persist {
                ino: d.i64()?,
                row: d.opt(Dec::row)?,
                times: d.opt(Dec::i64)?,
                inline: d.opt(|d| Ok(d.bytes()?.to_vec()))?,
            },
            t => return Err(bad(format!("unknown step {t}"))),
        };
        if !d.0.is_empty() {
            return Err(bad("bytes after the step".into()));
        }
        Ok((seq, step))
    }
}

fn bad(reason: String) -> Error {
    Error::corrupt("index journal record", reason)
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    /// One byte, 0 for none or 1, then the value.
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T) -> Result<()>) -> Result<()> {
        match v {
            Some(v) => {
                self.u8(1);
                f(self, v)
            }
            None => {
                self.u8(0);
                Ok(())
            }
        }
    }
    fn row(&mut self, r: &InodeRow) -> Result<()> {
        self.i64(r.ino);
        self.i64(r.run);
        self.str(r.kind.as_str());
        self.u32(r.mode);
        self.u32(r.uid);
        self.u32(r.gid);
        self.u64(r.size);
        self.i64(r.mtime_ns);
        self.i64(r.ctime_ns);
        self.u64(r.rdev);
        self.opt(r.target.as_deref(), |e, t| {
            e.str(t);
            Ok(())
        })?;
        self.u32(r.nlink);
        self.str(&super::xattrs_text(&r.xattrs)?.unwrap_or_default());
        Ok(())
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("record ends early".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("a name is not UTF-8".into()))
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            b => Err(bad(format!("an optional field's flag is {b}"))),
        }
    }
    fn row(&mut self) -> Result<InodeRow> {
        let ino = self.i64()?;
        let run = self.i64()?;
        let kind = Kind::parse(&self.str()?)?;
        let (mode, uid, gid) = (self.u32()?, self.u32()?, self.u32()?);
        let size = self.u64()?;
        let (mtime_ns, ctime_ns) = (self.i64()?, self.i64()?);
        let rdev = self.u64()?;
        let target = self.opt(Dec::str)?;
        let nlink = self.u32()?;
        let x = self.str()?;
        let xattrs = if x.is_empty() {
            Default::default()
        } else {
            serde_json::from_str(&x).map_err(|e| bad(format!("xattrs: {e}")))?
        };
        Ok(InodeRow {
            ino,
            run,
            kind,
            mode,
            uid,
            gid,
            size,
            mtime_ns,
            ctime_ns,
            rdev,
            target,
            nlink,
            xattrs,
        })
    }
}

/// An index's journal mark: (journal id, step), `([0; 16], 0)` before any.
pub type Mark = ([u8; 16], u64);

/// The records of a journal file, in order, up to the first that is torn or damaged.
pub struct Contents {
    pub id: [u8; 16],
    pub base: Mark,
    pub steps: Vec<(u64, Step)>,
    /// Bytes after the last whole record (a torn or damaged tail).
    pub dropped_bytes: u64,
}

impl Contents {
    /// The steps an index whose mark is `mark` does not hold, or `None` if the journal was
    /// not written for that index.
    pub fn unapplied(self, mark: Mark) -> Option<Vec<(u64, Step)>> {
        let done = if mark.0 == self.id {
            mark.1
        } else if mark == self.base {
            0
        } else {
            return None;
        };
        Some(self.steps.into_iter().filter(|(s, _)| *s > done).collect())
    }
}

/// Reads the journal at `path`; `None` if it does not exist or holds no header (created and
/// never written to, or cut short by a crash while it was made).
pub fn read(path: &Path) -> Result<Option<Contents>> {
    let mut buf = Vec::new();
    match File::open(path) {
        Ok(mut f) => f
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("read", path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    if buf.len() < HEADER as usize {
        return Ok(None);
    }
    if &buf[..8] != MAGIC {
        return Err(Error::corrupt(
            path.display().to_string(),
            "not an artifactfs index journal (bad magic)",
        ));
    }
    let id: [u8; 16] = buf[8..24].try_into().expect("16 bytes");
    let base = (
        buf[24..40].try_into().expect("16 bytes"),
        u64::from_le_bytes(buf[40..48].try_into().expect("8 bytes")),
    );
    let mut pos = HEADER as usize;
    let mut steps = Vec::new();
    while buf.len() - pos >= 12 {
        let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD || buf.len() - pos - 12 < len {
            break;
        }
        let payload = &buf[pos + 12..pos + 12 + len];
        if blake3::hash(payload).as_bytes()[..8] != buf[pos + 4..pos + 12] {
            break;
        }
        match Step::decode(payload) {
            Ok(s) => steps.push(s),
            Err(_) => break,
        }
        pos += 12 + len;
    }
    Ok(Some(Contents {
        id,
        base,
        steps,
        dropped_bytes: (buf.len() - pos) as u64,
    }))
}

/// The open journal of the index's connection: steps of the open transaction wait in
/// `pending` until a close writes them.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    pub(crate) id: [u8; 16],
    /// The next step's sequence number.
    pub(crate) next_seq: u64,
    /// The file's length: the header and the records written since it was last emptied.
    len: u64,
    /// Encoded records of steps not written yet.
    pending: Vec<u8>,
    /// Closes written since the last commit, and when the first of them was.
    pub(crate) closes: usize,
    pub(crate) first_close: Option<Instant>,
    /// A rollback took steps that the file holds: they are applied again before the next
    /// change (`Index::restore_journal`).
    pub(crate) lost: bool,
    /// Steps were applied since the transaction began: its commit sets the mark.
    pub(crate) unmarked: bool,
}

impl Journal {
    /// Creates an empty journal at `path` (replacing what is there) for an index whose mark
    /// is `base`.
    pub(crate) fn create(path: &Path, base: Mark) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        let id: [u8; 16] = rand::random();
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&id);
        header.extend_from_slice(&base.0);
        header.extend_from_slice(&base.1.to_le_bytes());
        file.write_all_at(&header, 0)
            .map_err(|e| Error::io("write", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            id,
            next_seq: base.1 + 1,
            len: HEADER,
            pending: Vec::new(),
            closes: 0,
            first_close: None,
            lost: false,
            unmarked: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Queues step `seq` for the next write.
    pub(crate) fn push(&mut self, seq: u64, step: &Step) -> Result<()> {
        step.encode(seq, &mut self.pending)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends the queued records to the file. On an error the file is cut back to what it
    /// held, and the records stay queued.
    pub(crate) fn write_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(&self.pending, self.len) {
            let _ = self.file.set_len(self.len);
            return Err(Error::io("write", &self.path, e));
        }
        self.len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// After a commit: every step is in the index, the file is emptied.
    pub(crate) fn committed(&mut self) {
        self.pending.clear();
        self.closes = 0;
        self.first_close = None;
        self.lost = false;
        self.unmarked = false;
        if self.len > HEADER {
            match self.file.set_len(HEADER) {
                Ok(()) => self.len = HEADER,
                // Harmless: the mark says the records are in the index.
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot empty the index journal: {e}")
                }
            }
        }
    }

    /// After a rollback: the queued steps are gone with it (nothing was promised of them); the
    /// written ones must come back.
    pub(crate) fn rolled_back(&mut self) {
        self.pending.clear();
        self.unmarked = false;
        self.lost = self.len > HEADER;
    }

    /// What the file holds now.
    pub(crate) fn written(&self) -> Result<Option<Contents>> {
        read(&self.path)
    }

    /// Moves the file aside (it could not be applied) and starts an empty one for an index
    /// whose mark is `mark`; returns where the file went.
    pub(crate) fn set_aside(&mut self, mark: Mark) -> Result<PathBuf> {
        let aside = set_aside(&self.path)?;
        *self = Self::create(&self.path, mark)?;
        Ok(aside)
    }
}

/// Renames the journal at `path` to a free `index.journal.unapplied-N` beside it.
pub(crate) fn set_aside(path: &Path) -> Result<PathBuf> {
    for n in 1.. {
        let aside = path.with_file_name(format!("index.journal.unapplied-{n}"));
        if !aside.exists() {
            std::fs::rename(path, &aside).map_err(|e| Error::io("rename", path, e))?;
            return Ok(aside);
        }
    }
    unreachable!("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(ino: i64) -> InodeRow {
        let mut xattrs = BTreeMap::new();
        xattrs.insert(
            "user.k".to_owned(),
            crate::manifest::XattrValue::from_bytes(b"v\x00\xff"),
        );
        InodeRow {
            ino,
            run: 3,
            kind: Kind::File,
            mode: 0o640,
            uid: 1000,
            gid: 100,
            size: 5,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: -5,
            rdev: 0,
            target: None,
            nlink: 1,
            xattrs,
        }
    }

    fn steps() -> Vec<Step> {
        vec![
            Step::Create {
                dir: 7,
                name: "résumé .json".into(),
                row: row(42),
            },
            Step::Persist {
                ino: 42,
                row: Some(row(42)),
                times: None,
                inline: Some(b"hello".to_vec()),
            },
            Step::Persist {
                ino: 42,
                row: None,
                times: Some(9),
                inline: None,
            },
            Step::Persist {
                ino: 43,
                row: None,
                times: None,
                inline: Some(Vec::new()),
            },
        ]
    }

    #[test]
    fn records_read_back_in_order_up_to_a_torn_or_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.journal");
        let mut j = Journal::create(&p, ([7; 16], 9)).unwrap();
        assert_eq!(j.next_seq, 10);
        for (i, s) in steps().iter().enumerate() {
            j.push(10 + i as u64, s).unwrap();
        }
        j.write_pending().unwrap();
        let c = read(&p).unwrap().unwrap();
        assert_eq!(c.id, j.id);
        assert_eq!(c.base, ([7; 16], 9));
        assert_eq!(c.dropped_bytes, 0);
        let want: Vec<(u64, Step)> = steps()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (10 + i as u64, s))
            .collect();
        assert_eq!(c.steps, want);

        // What an index still lacks: all of it at the base, what follows its own last step
        // otherwise; nothing for an index whose mark is neither (another index's journal).
        let all = read(&p).unwrap().unwrap().unapplied(([7; 16], 9)).unwrap();
        assert_eq!(all, want);
        let rest = read(&p).unwrap().unwrap().unapplied((j.id, 11)).unwrap();
        assert_eq!(rest, want[2..]);
        assert!(read(&p).unwrap().unwrap().unapplied(([7; 16], 8)).is_none());
        assert!(read(&p).unwrap().unwrap().unapplied(([0; 16], 0)).is_none());

        // A torn last record: the ones before it stand.
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        let c = read(&p).unwrap().unwrap();
        assert_eq!(c.steps, want[..3]);
        assert!(c.dropped_bytes > 0);

        // A flipped byte in the second record's payload ends the journal before it.
        let mut damaged = full.clone();
        let second =
            HEADER as usize + 12 + u32::from_le_bytes(full[48..52].try_into().unwrap()) as usize;
        damaged[second + 20] ^= 1;
        std::fs::write(&p, &damaged).unwrap();
        let c = read(&p).unwrap().unwrap();
        assert_eq!(c.steps, want[..1]);

        // Not a journal at all: an error that says so, never a silent empty journal.
        std::fs::write(&p, [b"something else entirely".as_slice(); 3].concat()).unwrap();
        let e = read(&p).err().unwrap().to_string();
        assert!(e.contains("not an artifactfs index journal"), "{e}");
    }

    #[test]
    fn a_commit_empties_the_file_and_a_rollback_keeps_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.journal");
        let mut j = Journal::create(&p, ([0; 16], 0)).unwrap();
        j.push(1, &steps()[0]).unwrap();
        j.write_pending().unwrap();
        j.push(2, &steps()[1]).unwrap();
        j.rolled_back();
        assert!(j.lost);
        assert_eq!(
            j.written().unwrap().unwrap().steps.len(),
            1,
            "the queued step went"
        );
        j.committed();
        assert!(j.len() == HEADER && !j.lost);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), HEADER);
        assert!(j.written().unwrap().unwrap().steps.is_empty());
    }
}
