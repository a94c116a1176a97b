//! The translation cache: every translation the hypervisor may run, keyed by the
//! RIP of its first instruction, whether it was loaded from a pre-analyzed image
//! (AOT) or built at run time (dynamic).
//!
//! Entries are validated ([`crate::format::validate`]) on the way in, so the engine
//! never sees a malformed cluster. Writes to guest code pages invalidate every
//! translation whose guest bytes overlap the page.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::format::{self, ClusterError, TranslationSet, MAX_CLUSTER_BYTES};
use crate::ir::Cluster;

/// Size of a guest page for [`TranslationCache::invalidate_page`].
pub const PAGE_SIZE: u64 = 4096;

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

/// Counters for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// AOT translations accepted.
    pub loaded: u64,
    /// Dynamic translations accepted.
    pub built: u64,
    /// Translations removed (stale bytes, invalidated pages, replaced, cleared).
    pub dropped: u64,
    /// Insertions refused because the cluster failed validation.
    pub rejected: u64,
}

/// The cache. Clusters are at most [`MAX_CLUSTER_BYTES`] long, which bounds the
/// search for overlapping translations.
#[derive(Clone, Debug, Default)]
pub struct TranslationCache {
    map: BTreeMap<u64, Entry>,
    stats: CacheStats,
}

impl TranslationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert one cluster, replacing any translation with the same start (the
    /// replaced one is returned and counted as dropped). A cluster that fails
    /// validation is refused and counted as rejected.
    pub fn insert(
        &mut self,
        cluster: Cluster,
        origin: Origin,
    ) -> Result<Option<Entry>, ClusterError> {
        if let Err(e) = format::validate(&cluster) {
            self.stats.rejected += 1;
            return Err(e);
        }
        match origin {
            Origin::Aot => self.stats.loaded += 1,
            Origin::Dynamic => self.stats.built += 1,
        }
        let old = self.map.insert(cluster.start, Entry { cluster, origin });
        if old.is_some() {
            self.stats.dropped += 1;
        }
        Ok(old)
    }

    /// Insert every cluster of a decoded (so already validated) set as AOT
    /// translations. Returns how many were inserted.
    pub fn load_set(&mut self, set: TranslationSet) -> usize {
        let mut n = 0;
        for c in set.clusters {
            if self.insert(c, Origin::Aot).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// The translation that starts at `rip`.
    pub fn lookup(&self, rip: u64) -> Option<&Entry> {
        self.map.get(&rip)
    }

    /// Translations whose covered bytes contain `addr`, in start order.
    pub fn containing(&self, addr: u64) -> impl Iterator<Item = &Entry> {
        self.overlapping(addr, addr.saturating_add(1))
    }

    /// Translations whose guest bytes overlap `[lo, hi)`, in start order.
    pub fn overlapping(&self, lo: u64, hi: u64) -> impl Iterator<Item = &Entry> {
        let from = lo.saturating_sub(MAX_CLUSTER_BYTES as u64);
        self.map
            .range(from..hi.max(from))
            .map(|(_, e)| e)
            .filter(move |e| e.cluster.end > lo && e.cluster.start < hi)
    }

    /// Remove the translation that starts at `rip` (e.g. its guest bytes changed).
    pub fn remove(&mut self, rip: u64) -> Option<Entry> {
        let e = self.map.remove(&rip);
        if e.is_some() {
            self.stats.dropped += 1;
        }
        e
    }

    /// Remove every translation whose guest bytes overlap `[lo, hi)`; returns them.
    pub fn invalidate_range(&mut self, lo: u64, hi: u64) -> Vec<Entry> {
        let starts: Vec<u64> = self.overlapping(lo, hi).map(|e| e.cluster.start).collect();
        starts.into_iter().filter_map(|s| self.remove(s)).collect()
    }

    /// A guest write hit the page holding `addr` (in the address space the
    /// clusters' RIPs are in): drop every translation overlapping that 4 KiB page.
    pub fn invalidate_page(&mut self, addr: u64) -> Vec<Entry> {
        let lo = addr & !(PAGE_SIZE - 1);
        self.invalidate_range(lo, lo.saturating_add(PAGE_SIZE))
    }

    /// Drop everything (e.g. at a change of paging mode).
    pub fn clear(&mut self) {
        self.stats.dropped += self.map.len() as u64;
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Translations held now from `origin`.
    pub fn count_from(&self, origin: Origin) -> usize {
        self.map.values().filter(|e| e.origin == origin).count()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Every translation in start order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.map.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Bitness, Insn, Op, PortSrc, Size};
    use crate::policy::ExitClass;
    use alloc::vec;

    /// A cluster of `n` one-byte `out dx, al` at `start`.
    fn outs(start: u64, n: usize) -> Cluster {
        Cluster {
            start,
            end: start + n as u64,
            bitness: Bitness::B64,
            guest_bytes: vec![0xee; n],
            insns: (0..n)
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
            back_edges: vec![],
        }
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
        assert_eq!(
            (c.count_from(Origin::Aot), c.count_from(Origin::Dynamic)),
            (1, 1)
        );
        assert_eq!(c.remove(0x1000).unwrap().cluster.end, 0x1003);
        assert!(c.remove(0x1000).is_none());
        let s = c.stats();
        assert_eq!((s.loaded, s.built, s.dropped, s.rejected), (1, 1, 1, 0));
    }

    #[test]
    fn replacing_counts_a_drop() {
        let mut c = TranslationCache::new();
        c.insert(outs(0x1000, 3), Origin::Aot).unwrap();
        let old = c.insert(outs(0x1000, 5), Origin::Dynamic).unwrap().unwrap();
        assert_eq!(old.origin, Origin::Aot);
        assert_eq!(c.lookup(0x1000).unwrap().cluster.end, 0x1005);
        assert_eq!(c.stats().dropped, 1);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn invalid_clusters_are_refused() {
        let mut c = TranslationCache::new();
        let mut bad = outs(0x1000, 3);
        bad.end = 0x1004;
        assert!(c.insert(bad, Origin::Dynamic).is_err());
        assert!(c.is_empty());
        assert_eq!(c.stats().rejected, 1);
        assert_eq!(c.stats().built, 0);
    }

    #[test]
    fn page_invalidation_drops_exactly_the_overlapping() {
        let mut c = TranslationCache::new();
        c.insert(outs(0x0ff0, 0x20), Origin::Aot).unwrap(); // spans 0x0ff0..0x1010
        c.insert(outs(0x0fe0, 0x10), Origin::Aot).unwrap(); // ends at 0x0ff0: page 0 only
        c.insert(outs(0x1800, 4), Origin::Dynamic).unwrap();
        c.insert(outs(0x1ffc, 4), Origin::Aot).unwrap(); // ends exactly at 0x2000
        c.insert(outs(0x2000, 4), Origin::Aot).unwrap(); // next page
        let dropped: Vec<u64> = c
            .invalidate_page(0x1234)
            .iter()
            .map(|e| e.cluster.start)
            .collect();
        assert_eq!(dropped, vec![0x0ff0, 0x1800, 0x1ffc]);
        let left: Vec<u64> = c.iter().map(|e| e.cluster.start).collect();
        assert_eq!(left, vec![0x0fe0, 0x2000]);
        assert_eq!(c.stats().dropped, 3);
        // A cluster of the maximum size that starts a full page before still overlaps.
        c.insert(outs(0x3001, MAX_CLUSTER_BYTES), Origin::Aot)
            .unwrap();
        assert_eq!(c.invalidate_page(0x4000).len(), 1);
    }

    #[test]
    fn containing_finds_covering_translations() {
        let mut c = TranslationCache::new();
        c.insert(outs(0x100, 8), Origin::Aot).unwrap();
        c.insert(outs(0x104, 8), Origin::Dynamic).unwrap();
        let at = |a| c.containing(a).map(|e| e.cluster.start).collect::<Vec<_>>();
        assert_eq!(at(0x105), vec![0x100, 0x104]);
        assert_eq!(at(0x108), vec![0x104]);
        assert_eq!(at(0x10c), Vec::<u64>::new());
        assert_eq!(at(0xff), Vec::<u64>::new());
    }

    #[test]
    fn load_set_marks_aot_and_clear_drops_all() {
        let mut c = TranslationCache::new();
        let set = TranslationSet {
            guest: format::GuestIdentity {
                digest: [0; 32],
                name: "g".into(),
            },
            policy: [0; 32],
            translator: Default::default(),
            clusters: vec![outs(0x10, 1), outs(0x20, 2)],
        };
        assert_eq!(c.load_set(set), 2);
        assert_eq!(c.count_from(Origin::Aot), 2);
        assert_eq!(c.stats().loaded, 2);
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.stats().dropped, 2);
    }
}
