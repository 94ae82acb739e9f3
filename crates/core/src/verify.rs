//! Verification: re-read and re-hash everything sealed runs depend on.
//!
//! For each run: its manifest object must exist and match its digest. For each distinct chunk
//! the runs reference: it must be indexed, its pack must exist, and its stored bytes must decode
//! to plaintext whose BLAKE3 is the chunk id. Packs are read whole, once each. Every problem is
//! reported with the runs and files it affects; nothing is repaired here.

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
            for id in refs.keys() {
                match index.chunk(id)? {
                    Some(loc) => {
                        total += u64::from(loc.entry.raw_len);
                        by_pack.entry(loc.pack).or_default().push(loc.entry);
                    }
                    None => report.damage.push(Damage {
                        object: "chunk".into(),
                        id: id.to_hex(),
                        problem: "not in the index".into(),
                        affects: affects(id),
                    }),
                }
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
        crate::fetch::pipelined(packs.len(), threads, threads + 1, &fetch, &mut |i, got| {
            let (pack_id, entries) = packs[i];
            let key = pack::pack_key(pack_id);
            let bytes = match got {
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
                    return Ok(());
                }
            };
            let whole_ok = PackId::of(&bytes) == *pack_id;
            let mut chunk_damage = 0;
            for ent in entries {
                let end = ent.offset.checked_add(u64::from(ent.stored_len));
                let res = match end {
                    Some(end) if end <= bytes.len() as u64 => {
                        pack::decode_chunk(&key, ent, &bytes[ent.offset as usize..end as usize])
                            .map(|_| ())
                    }
                    _ => Err(Error::corrupt(
                        format!("chunk {} in {key}", ent.chunk),
                        "pack is shorter than the index says",
                    )),
                };
                match res {
                    Ok(()) => report.bytes += u64::from(ent.raw_len),
                    Err(e) => {
                        chunk_damage += 1;
                        report.damage.push(Damage {
                            object: "chunk".into(),
                            id: ent.chunk.to_hex(),
                            problem: e.to_string(),
                            affects: affects(&ent.chunk),
                        });
                    }
                }
                progress.inc(u64::from(ent.raw_len));
            }
            if !whole_ok && chunk_damage == 0 {
                // Damage outside the referenced chunks (e.g. in the table): worth knowing.
                report.damage.push(Damage {
                    object: "pack".into(),
                    id: pack_id.to_hex(),
                    problem:
                        "pack bytes do not match the pack id (damage outside referenced chunks)"
                            .into(),
                    affects: Vec::new(),
                });
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
        Ok(report)
    }
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
