//! The translation cache: every translation the hypervisor may run, keyed by its
//! entry RIP (its first exiting instruction, where the exit that runs it happens),
//! whether it was loaded from a pre-analyzed image (AOT) or built at run time
//! (dynamic).
//!
//! Entries are valid ([`crate::ir::validate`]), so the engine never sees a
//! malformed cluster: a cluster inserted alone is validated on the way in; a set
//! comes as a [`CheckedSet`], validated once when it was decoded or checked. A translation whose guest bytes changed is found
//! by the engine's byte check before it runs and removed ([`TranslationCache::remove`]);
//! the counts of what came and went are the exit handler's ([`crate::stats`]).
//!
//! A region may also have translations made for one caller each (the return
//! address its function was called with, [`crate::exit`]'s caller translations).
//! They are kept apart: they serve only exits at their entry with that caller,
//! never as the tail of another RIP's cluster.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::format::CheckedSet;
use crate::ir::limits::MAX_CLUSTER_BYTES;
use crate::ir::{validate, Cluster, ClusterError};

/// Where a translation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Loaded from a pre-analyzed image.
    Aot,
    /// Built at run time by the translator at an instruction's third exit.
    Dynamic,
}

/// One cached translation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub cluster: Cluster,
    pub origin: Origin,
}

impl Entry {
    /// The RIP the translation is cached under (its entry).
    pub fn key(&self) -> u64 {
        self.cluster.entry_rip().unwrap_or(0)
    }
}

/// The cache. A cluster's code ranges are each at most [`MAX_CLUSTER_BYTES`] long,
/// which bounds the search for translations overlapping an address.
#[derive(Clone, Debug, Default)]
pub struct TranslationCache {
    map: BTreeMap<u64, Entry>,
    /// (range start, entry RIP) of every code range of every translation.
    ranges: BTreeSet<(u64, u64)>,
    /// Translations made for one caller: (entry RIP, return address) -> entry.
    for_callers: BTreeMap<(u64, u64), Entry>,
}

impl TranslationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert one cluster, replacing any translation with the same entry RIP (the
    /// replaced one is returned). A cluster that fails validation is refused.
    pub fn insert(
        &mut self,
        cluster: Cluster,
        origin: Origin,
    ) -> Result<Option<Entry>, ClusterError> {
        validate(&cluster)?;
        let key = cluster.entry_rip().ok_or(ClusterError::FirstNotExiting)?;
        Ok(self.insert_valid(key, cluster, origin))
    }

    /// Insert a cluster known to be valid, entered at `key`.
    fn insert_valid(&mut self, key: u64, cluster: Cluster, origin: Origin) -> Option<Entry> {
        let old = self.remove(key);
        self.ranges
            .extend(cluster.code.iter().map(|r| (r.start, key)));
        self.map.insert(key, Entry { cluster, origin });
        old
    }

    /// Insert every cluster of a checked set as AOT translations, without
    /// validating them again. Returns how many were inserted.
    pub fn load_set(&mut self, set: CheckedSet) -> usize {
        let mut n = 0;
        for c in set.into_set().clusters {
            // A valid cluster has an entry (validate_set checked each).
            if let Some(key) = c.entry_rip() {
                self.insert_valid(key, c, Origin::Aot);
                n += 1;
            }
        }
        n
    }

    /// The translation entered at `rip`.
    pub fn lookup(&self, rip: u64) -> Option<&Entry> {
        self.map.get(&rip)
    }

    /// Translations whose code contains `addr`, in entry order.
    pub fn containing(&self, addr: u64) -> impl Iterator<Item = &Entry> {
        self.overlapping(addr, addr.saturating_add(1))
    }

    /// Translations whose code overlaps `[lo, hi)`, in entry order.
    pub fn overlapping(&self, lo: u64, hi: u64) -> impl Iterator<Item = &Entry> {
        let from = lo.saturating_sub(MAX_CLUSTER_BYTES as u64);
        let keys: BTreeSet<u64> = self
            .ranges
            .range((from, 0)..(hi.max(from), 0))
            .map(|&(_, key)| key)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.map.get(&k))
            .filter(move |e| e.cluster.overlaps(lo, hi))
    }

    /// Remove the translation entered at `rip` (e.g. its guest bytes changed).
    pub fn remove(&mut self, rip: u64) -> Option<Entry> {
        let e = self.map.remove(&rip)?;
        for r in &e.cluster.code {
            self.ranges.remove(&(r.start, rip));
        }
        Some(e)
    }

    /// Insert a translation of `cluster`'s region made for `caller`, replacing
    /// any for the same entry and caller. Validated as [`Self::insert`] does.
    pub fn insert_for_caller(&mut self, cluster: Cluster, caller: u64) -> Result<(), ClusterError> {
        validate(&cluster)?;
        let key = cluster.entry_rip().ok_or(ClusterError::FirstNotExiting)?;
        let entry = Entry {
            cluster,
            origin: Origin::Dynamic,
        };
        self.for_callers.insert((key, caller), entry);
        Ok(())
    }

    /// The translation of the region at `rip` made for `caller`.
    pub fn lookup_for_caller(&self, rip: u64, caller: u64) -> Option<&Entry> {
        self.for_callers.get(&(rip, caller))
    }

    pub fn remove_for_caller(&mut self, rip: u64, caller: u64) -> Option<Entry> {
        self.for_callers.remove(&(rip, caller))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every translation in entry order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.map.values()
    }

    /// Every entry RIP, in order.
    pub fn keys(&self) -> Vec<u64> {
        self.map.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Bitness, Insn, Op, PortSrc, Size};
    use crate::policy::ExitClass;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A cluster of `n` one-byte `out dx, al` at `start`.
    fn outs(start: u64, n: usize) -> Cluster {
        Cluster::contiguous(
            Bitness::B64,
            start,
            vec![0xee; n],
            (0..n)
                .map(|i| Insn {
                    rip: start + i as u64,
                    len: 1,
                    op: Op::Out {
                        size: Size::S1,
                        port: PortSrc::Dx,
                    },
                    exit_class: Some(ExitClass::Out),
                })
                .collect(),
            vec![],
        )
    }

    #[test]
    fn insert_lookup_remove_and_counts() {
        let mut c = TranslationCache::new();
        assert!(c.insert(outs(0x1000, 3), Origin::Aot).unwrap().is_none());
        assert!(c
            .insert(outs(0x2000, 2), Origin::Dynamic)
            .unwrap()
            .is_none());
        assert_eq!(c.lookup(0x1000).unwrap().origin, Origin::Aot);
        assert_eq!(c.lookup(0x2000).unwrap().origin, Origin::Dynamic);
        assert!(c.lookup(0x1001).is_none());
        assert_eq!(c.remove(0x1000).unwrap().cluster.highest_end(), 0x1003);
        assert!(c.remove(0x1000).is_none());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn inserting_at_the_same_start_replaces() {
        let mut c = TranslationCache::new();
        c.insert(outs(0x1000, 3), Origin::Aot).unwrap();
        let old = c.insert(outs(0x1000, 5), Origin::Dynamic).unwrap().unwrap();
        assert_eq!(old.origin, Origin::Aot);
        assert_eq!(c.lookup(0x1000).unwrap().cluster.highest_end(), 0x1005);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn invalid_clusters_are_refused() {
        let mut c = TranslationCache::new();
        let mut bad = outs(0x1000, 3);
        bad.code[0].bytes.truncate(2);
        assert_eq!(
            c.insert(bad, Origin::Dynamic),
            Err(ClusterError::OutsideCode {
                insn: 2,
                rip: 0x1002
            })
        );
        assert!(c.is_empty());
    }

    #[test]
    fn containing_finds_covering_translations() {
        let mut c = TranslationCache::new();
        c.insert(outs(0x100, 8), Origin::Aot).unwrap();
        c.insert(outs(0x104, 8), Origin::Dynamic).unwrap();
        let at = |a| c.containing(a).map(|e| e.key()).collect::<Vec<_>>();
        assert_eq!(at(0x105), vec![0x100, 0x104]);
        assert_eq!(at(0x108), vec![0x104]);
        assert_eq!(at(0x10c), Vec::<u64>::new());
        assert_eq!(at(0xff), Vec::<u64>::new());
        // A cluster of the largest size is found from its last byte.
        c.insert(outs(0x3001, MAX_CLUSTER_BYTES), Origin::Aot)
            .unwrap();
        let last = 0x3000 + MAX_CLUSTER_BYTES as u64;
        assert_eq!(c.containing(last).next().map(|e| e.key()), Some(0x3001));
    }

    #[test]
    fn every_code_range_of_a_region_is_indexed_and_forgotten() {
        use crate::ir::CodeRange;
        let mut c = TranslationCache::new();
        let mut region = outs(0x1000, 2);
        region.code.push(CodeRange {
            start: 0x5000,
            bytes: vec![0xee; 2],
        });
        region.insns.push(Insn {
            rip: 0x5000,
            ..outs(0x5000, 1).insns[0].clone()
        });
        c.insert(region, Origin::Dynamic).unwrap();
        let at = |c: &TranslationCache, a| c.containing(a).map(|e| e.key()).collect::<Vec<_>>();
        assert_eq!(at(&c, 0x5001), vec![0x1000]);
        assert_eq!(at(&c, 0x1001), vec![0x1000]);
        assert_eq!(at(&c, 0x3000), Vec::<u64>::new());
        assert_eq!(
            c.overlapping(0x4000, 0x6000)
                .map(|e| e.key())
                .collect::<Vec<_>>(),
            vec![0x1000]
        );
        // Replaced by a translation without the second range: it is forgotten.
        c.insert(outs(0x1000, 3), Origin::Dynamic).unwrap();
        assert_eq!(at(&c, 0x5001), Vec::<u64>::new());
        c.remove(0x1000);
        assert_eq!(at(&c, 0x1001), Vec::<u64>::new());
        assert!(c.ranges.is_empty());
    }

    #[test]
    fn a_set_is_checked_once_and_loaded_as_aot() {
        use crate::format::{check, TranslationSet};
        let mut c = TranslationCache::new();
        let set = TranslationSet {
            guest: crate::format::GuestIdentity {
                digest: [0; 32],
                name: "g".into(),
            },
            policy: [0; 32],
            translator: Default::default(),
            clusters: vec![
                outs(0x10, 1),
                outs(0x20, 2),
                Cluster {
                    code: vec![],
                    ..outs(0x30, 1)
                },
            ],
        };
        // One invalid cluster (no code) refuses the set, as decoding would.
        assert!(check(set.clone()).is_err());
        let mut good = set;
        good.clusters.pop();
        assert_eq!(c.load_set(check(good).unwrap()), 2);
        assert!(c.iter().all(|e| e.origin == Origin::Aot));
        assert!(c.lookup(0x10).is_some() && c.lookup(0x30).is_none());
    }
}
