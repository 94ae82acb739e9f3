//! Verification: re-read and re-hash everything sealed runs depend on.
//!
//! For each run: its manifest object must exist and match its digest. For each distinct chunk
//! the runs reference: it must be indexed, its pack must exist, and its stored bytes must decode
//! to plaintext whose BLAKE3 is the chunk id. Packs are read whole, once each. Every problem is
//! reported with the runs and files it affects.
//!
//! What verify finds damaged for certain (bytes that do not decode to their id, a pack that is
//! shorter than the index says or gone) is recorded as lost in the index
//! ([`crate::index::Index::mark_chunks_lost`]): no read goes to those bytes again, and the next
//! store of the same bytes writes them anew and repairs every run that names them. A pack that
//! could not be read for another reason (a remote tier that does not answer, an I/O error) is
//! reported and left as it is. In a tiered store, a damaged local copy of a pack whose bucket
//! copy is whole is replaced by the bucket's copy (reported in `repaired`, not as damage).

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::manifest;
use crate::names::RunRef;
use crate::pack::{self, PackEntry};
use crate::store::{Progress, Store};

/// One damaged object and what it breaks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    /// `chunk`, `manifest` or `pack`.
    pub object: String,
    pub id: String,
    pub problem: String,
    /// `namespace/run/path` (or `namespace/run` for a manifest) of everything affected.
    pub affects: Vec<String>,
}

/// The outcome of a verify.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub runs: u64,
    pub chunks: u64,
    pub packs: u64,
    pub bytes: u64,
    pub damage: Vec<Damage>,
    /// Damage verify repaired itself (a local copy of a pack replaced by the bucket's).
    pub repaired: Vec<String>,
    /// Chunks this verify found damaged and recorded as lost (see the module documentation).
    pub recorded_lost: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damage.is_empty()
    }
}

impl Store {
    /// Verifies one sealed run, or all of them.
    pub fn verify(&self, only: Option<&RunRef>, progress: &dyn Progress) -> Result<VerifyReport> {
        let runs: Vec<_> = match only {
            Some(r) => vec![self.run(r)?],
            None => self.runs(None)?,
        }
        .into_iter()
        .filter(|r| r.manifest.is_some())
        .collect();
        let mut report = VerifyReport {
            runs: runs.len() as u64,
            ..Default::default()
        };
        for run in &runs {
            let Some(d) = run.manifest else { continue };
            let m = manifest::load_manifest_bytes(&*self.objects, &d)
                .and_then(|b| manifest::Manifest::from_bytes(&b, &format!("manifest {d}")));
            match m {
                Err(e) => report.damage.push(Damage {
                    object: "manifest".into(),
                    id: d.to_hex(),
                    problem: e.to_string(),
                    affects: vec![run.run.to_string()],
                }),
                // The index's copy of the tree must say what the manifest says.
                Ok(m) => {
                    let mut rows = self.index().files(run.id)?;
                    manifest::sort_entries(&mut rows);
                    if rows != m.entries {
                        report.damage.push(Damage {
                            object: "index".into(),
                            id: d.to_hex(),
                            problem: "the index's files of this run differ from its manifest"
                                .into(),
                            affects: vec![run.run.to_string()],
                        });
                    }
                }
            }
        }
        let refs = self.index().referenced_chunks(&runs)?;
        report.chunks = refs.len() as u64;
        let affects = |id: &ChunkId| -> Vec<String> {
            refs.get(id)
                .map(|v| v.iter().map(|(r, p)| format!("{r}/{p}")).collect())
                .unwrap_or_default()
        };
        // Group chunks by pack.
        let mut by_pack: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
        let mut total = 0u64;
        {
            let index = self.index();
            let mut unindexed = Vec::new();
            for id in refs.keys() {
                match index.chunk(id)? {
                    Some(loc) => {
                        total += u64::from(loc.entry.raw_len);
                        by_pack.entry(loc.pack).or_default().push(loc.entry);
                    }
                    None => unindexed.push(*id),
                }
            }
            let lost = index.lost_among(&unindexed)?;
            for id in &unindexed {
                report.damage.push(Damage {
                    object: "chunk".into(),
                    id: id.to_hex(),
                    problem: if lost.contains(id) {
                        "lost: found damaged or missing earlier; storing the same bytes again repairs it"
                    } else {
                        "not in the index"
                    }
                    .into(),
                    affects: affects(id),
                });
            }
        }
        progress.set_total(total);
        report.packs = by_pack.len() as u64;
        // Packs come whole; with a remote tier several are fetched at once, ahead of the
        // checks, in order (`crate::fetch`).
        let packs: Vec<(&PackId, &Vec<PackEntry>)> = by_pack.iter().collect();
        let threads = if self.tier.is_some() {
            crate::fetch::FETCHES_IN_FLIGHT
        } else {
            1
        };
        let fetch = |i: usize| self.objects.get(&pack::pack_key(packs[i].0));
        let mut lost: Vec<(ChunkId, PackId)> = Vec::new();
        crate::fetch::pipelined(packs.len(), threads, threads + 1, &fetch, &mut |i, got| {
            let (pack_id, entries) = packs[i];
            let key = pack::pack_key(pack_id);
            let mut bytes = match got {
                Ok(b) => b,
                Err(e) => {
                    for ent in entries {
                        report.damage.push(Damage {
                            object: "chunk".into(),
                            id: ent.chunk.to_hex(),
                            problem: e.to_string(),
                            affects: affects(&ent.chunk),
                        });
                    }
                    if e.is_damage() {
                        lost.extend(entries.iter().map(|ent| (ent.chunk, *pack_id)));
                    }
                    return Ok(());
                }
            };
            let mut failed = check_chunks(&key, entries, &bytes);
            if !failed.is_empty()
                && let Some(good) = self.bucket_copy(&key, pack_id)
            {
                report.repaired.push(format!(
                    "{key}: the local copy was damaged ({} chunks); replaced by the bucket's copy",
                    failed.len()
                ));
                bytes = good;
                failed = check_chunks(&key, entries, &bytes);
            }
            let whole_ok = PackId::of(&bytes) == *pack_id;
            let chunk_damage = failed.len();
            let mut failed = failed.into_iter().peekable();
            for ent in entries {
                match failed.next_if(|(chunk, _)| *chunk == ent.chunk) {
                    None => report.bytes += u64::from(ent.raw_len),
                    Some((_, e)) => {
                        report.damage.push(Damage {
                            object: "chunk".into(),
                            id: ent.chunk.to_hex(),
                            problem: e.to_string(),
                            affects: affects(&ent.chunk),
                        });
                        lost.push((ent.chunk, *pack_id));
                    }
                }
                progress.inc(u64::from(ent.raw_len));
            }
            if !whole_ok && chunk_damage == 0 {
                match self.damage_outside(&key, pack_id, entries, &bytes)? {
                    None => report.damage.push(Damage {
                        object: "pack".into(),
                        id: pack_id.to_hex(),
                        problem: "pack bytes do not match the pack id (damage outside its chunks)"
                            .into(),
                        affects: Vec::new(),
                    }),
                    Some(unreferenced) => {
                        for id in unreferenced {
                            report.repaired.push(format!(
                                "chunk {id} in {key}: damaged, referenced by no run; dropped from the index"
                            ));
                            lost.push((id, *pack_id));
                        }
                    }
                }
            }
            Ok(())
        })?;
        if only.is_none() {
            // gc trusts the reference counts: a count below the real one would let it sweep a
            // live chunk, so they are checked against a recount.
            for (id, stored, counted) in self.index().refcount_mismatches()? {
                report.damage.push(Damage {
                    object: "index".into(),
                    id: id.to_hex(),
                    problem: format!(
                        "reference count of the chunk is {stored}, but live runs reference it {counted} times"
                    ),
                    affects: affects(&id),
                });
            }
        }
        for d in &report.damage {
            tracing::error!(object = %d.object, id = %d.id, problem = %d.problem, affects = d.affects.len(), "damage found");
        }
        if !lost.is_empty() {
            let now = crate::clock::to_unix_ns(self.clock.now());
            report.recorded_lost =
                self.index()
                    .mark_chunks_lost(&lost, now, "verify found it damaged")?;
            tracing::warn!(
                chunks = report.recorded_lost,
                "damaged chunks recorded as lost: storing the same bytes again repairs the runs"
            );
        }
        Ok(report)
    }

    /// Where the damage of a pack whose referenced chunks (`checked`) all decode lies: in the
    /// other chunks its table lists. `None` when none of them is damaged either (the damage is
    /// in its header, table or between chunks) or its table does not parse. Otherwise the
    /// damaged chunks the index still places in this pack (kept for gc's grace period,
    /// referenced by no run), to be dropped before an ingest deduplicates against them;
    /// damaged copies the index places elsewhere (or nowhere) are dead bytes, left for gc.
    fn damage_outside(
        &self,
        key: &str,
        id: &PackId,
        checked: &[PackEntry],
        bytes: &[u8],
    ) -> Result<Option<Vec<ChunkId>>> {
        let Ok(table) = pack::parse_table(key, bytes) else {
            return Ok(None);
        };
        let checked: std::collections::HashSet<ChunkId> = checked.iter().map(|e| e.chunk).collect();
        let others: Vec<PackEntry> = table
            .into_iter()
            .filter(|e| !checked.contains(&e.chunk))
            .collect();
        let damaged = check_chunks(key, &others, bytes);
        if damaged.is_empty() {
            return Ok(None);
        }
        let index = self.index();
        let mut indexed_here = Vec::new();
        for (chunk, _) in damaged {
            if index.chunk(&chunk)?.is_some_and(|l| l.pack == *id) {
                indexed_here.push(chunk);
            }
        }
        Ok(Some(indexed_here))
    }

    /// The bucket's copy of a pack whose local copy is damaged, when the store is tiered and
    /// the bucket holds a whole one (its bytes hash to the pack id): it replaces the local
    /// copy, and is returned. `None` otherwise (also when the bucket does not answer).
    fn bucket_copy(&self, key: &str, id: &PackId) -> Option<Vec<u8>> {
        let tier = self.tier.as_ref()?;
        let bytes = match tier.remote().get(key) {
            Ok(b) if PackId::of(&b) == *id => b,
            Ok(_) => {
                tracing::warn!(key, "the bucket's copy of a damaged pack is damaged too");
                return None;
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot read the bucket's copy of a damaged pack");
                return None;
            }
        };
        if let Err(e) = tier.local().put(key, &bytes) {
            tracing::error!(key, error = %e, "cannot replace a damaged local copy of a pack");
        } else {
            tracing::warn!(
                key,
                "damaged local copy of a pack replaced by the bucket's copy"
            );
        }
        Some(bytes)
    }
}

/// The entries of a pack whose stored bytes in `bytes` do not decode to their chunk, with
/// why, in the entries' order.
fn check_chunks(key: &str, entries: &[PackEntry], bytes: &[u8]) -> Vec<(ChunkId, Error)> {
    let mut failed = Vec::new();
    for ent in entries {
        let end = ent.offset.checked_add(u64::from(ent.stored_len));
        let res = match end {
            Some(end) if end <= bytes.len() as u64 => {
                pack::decode_chunk(key, ent, &bytes[ent.offset as usize..end as usize]).map(|_| ())
            }
            _ => Err(Error::corrupt(
                format!("chunk {} in {key}", ent.chunk),
                "pack is shorter than the index says",
            )),
        };
        if let Err(e) = res {
            failed.push((ent.chunk, e));
        }
    }
    failed
}

/// Runs affected by a report's damage, for messages.
pub fn affected_runs(report: &VerifyReport) -> Vec<String> {
    let mut runs: HashMap<String, ()> = HashMap::new();
    for d in &report.damage {
        for a in &d.affects {
            let mut it = a.splitn(3, '/');
            if let (Some(ns), Some(r)) = (it.next(), it.next()) {
                runs.insert(format!("{ns}/{r}"), ());
            }
        }
    }
    let mut v: Vec<String> = runs.into_keys().collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::objstore::{MemoryStore, ObjectStore};
    use crate::tier::TierConfig;

    /// Ingests one file of 2 MiB of seeded bytes as `run`; returns the store's first pack key.
    fn ingest(store: &Store, dir: &Path, run: &str, seed: u64) -> String {
        let src = dir.join(format!("src-{seed}"));
        fs::create_dir_all(&src).unwrap();
        let mut data = vec![0u8; 2 << 20];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.finalize_xof().fill(&mut data);
        fs::write(src.join("f"), &data).unwrap();
        store
            .ingest_dir(
                &src,
                &RunRef::parse(run).unwrap(),
                Default::default(),
                &crate::NoProgress,
            )
            .unwrap();
        store.objects.list("packs/").unwrap()[0].key.clone()
    }

    fn flip(path: &Path, at: usize) {
        let mut b = fs::read(path).unwrap();
        b[at] ^= 1;
        fs::write(path, b).unwrap();
    }

    #[test]
    fn a_damaged_local_copy_is_replaced_by_the_buckets_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let remote: Arc<MemoryStore> = Arc::new(MemoryStore::default());
        let opts = crate::InitOptions {
            tier: Some(TierConfig::new("s3://b/p")),
            ..Default::default()
        };
        let store = Store::init_tiered(&root, &opts, remote.clone()).unwrap();
        let key = ingest(&store, dir.path(), "ns/a", 1);
        store.push_pending().unwrap();
        let local = root.join("objects").join(&key);
        flip(&local, 200);
        let report = store.verify(None, &crate::NoProgress).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.repaired.len(), 1, "{report:?}");
        assert_eq!(report.recorded_lost, 0);
        assert_eq!(fs::read(&local).unwrap(), remote.get(&key).unwrap());
        assert_eq!(store.stats().unwrap().lost_chunks, 0);
    }

    #[test]
    fn a_chunk_found_damaged_where_it_no_longer_is_is_not_recorded_lost() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::init(&root, &crate::InitOptions::default()).unwrap();
        ingest(&store, dir.path(), "ns/a", 1);
        let e = store.entry(&RunRef::parse("ns/a").unwrap(), "f").unwrap();
        let chunk = e.chunks[0].0;
        let here = store.index().chunk(&chunk).unwrap().unwrap().pack;
        // As if gc had moved the chunk to another pack while verify read the old one.
        let elsewhere = PackId::of(b"another pack");
        let mut index = store.index();
        assert_eq!(
            index
                .mark_chunks_lost(&[(chunk, elsewhere)], 1, "test")
                .unwrap(),
            0
        );
        assert!(index.has_chunk(&chunk).unwrap());
        assert_eq!(
            index.mark_chunks_lost(&[(chunk, here)], 1, "test").unwrap(),
            1
        );
        assert!(!index.has_chunk(&chunk).unwrap());
        assert_eq!(index.lost_among(&[chunk]).unwrap().len(), 1);
        let events = index.events(0, 100).unwrap();
        let lost = events.iter().find(|e| e.kind == "chunks.lost").unwrap();
        assert!(
            lost.detail.to_string().contains(&chunk.to_hex()),
            "{lost:?}"
        );
    }
}
