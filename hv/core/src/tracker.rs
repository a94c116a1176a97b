//! The dynamic tracker (Agesen et al., ATC 2012, section 5): which exiting
//! instructions exit often enough to be worth translating at run time.
//!
//! A table of [`ROWS`] rows, each a FIFO of at most [`DEPTH`] entries. An entry is
//! keyed by the exiting instruction's RIP, length and bytes; its row is chosen by a
//! hash of the three. An instruction seen for the first time enters its row's FIFO
//! (evicting the row's oldest entry when the row is full); every later exit of the
//! same instruction counts up. At the configured threshold (the paper's third exit)
//! [`Observation::translate`] says to build a translation: the first exits are
//! handled singly, and what followed them predicts the cluster.
//!
//! The table is deterministic: the same sequence of observations always gives the
//! same answers (no randomness, no time).

use alloc::vec::Vec;

/// Rows of the table.
pub const ROWS: usize = 512;
/// Entries per row (a FIFO: the oldest is evicted first).
pub const DEPTH: usize = 8;
/// Longest x86 instruction; longer byte slices are cut to this.
pub const MAX_INSN_BYTES: usize = 15;

/// Tracker settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Translate at this exit of one instruction (the paper: 3). 0 is treated as 1.
    pub threshold: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig { threshold: 3 }
    }
}

/// What the tracker says about one exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// How many times this instruction has exited since it entered the table
    /// (this exit included).
    pub count: u32,
    /// This exit reached the threshold: build a translation now. True exactly once
    /// per entry lifetime (see [`Tracker::forget`] to allow a rebuild).
    pub translate: bool,
}

/// Counters for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub observations: u64,
    /// Entries pushed out of a full row.
    pub evictions: u64,
    /// Observations that answered `translate: true`.
    pub translate_requests: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    rip: u64,
    len: u8,
    bytes: [u8; MAX_INSN_BYTES],
    count: u32,
}

impl Entry {
    fn matches(&self, rip: u64, bytes: &[u8]) -> bool {
        self.rip == rip && self.len as usize == bytes.len() && &self.bytes[..bytes.len()] == bytes
    }
}

#[derive(Clone, Debug, Default)]
struct Row {
    /// Oldest first.
    entries: Vec<Entry>,
}

/// The run-time exit tracker.
#[derive(Clone, Debug)]
pub struct Tracker {
    config: TrackerConfig,
    rows: Vec<Row>,
    stats: TrackerStats,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(TrackerConfig::default())
    }
}

/// The row of an instruction: FNV-1a over RIP (LE), length and bytes, folded.
pub fn row_of(rip: u64, bytes: &[u8]) -> usize {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_BYTES)];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for b in rip.to_le_bytes() {
        eat(b);
    }
    eat(bytes.len() as u8);
    for &b in bytes {
        eat(b);
    }
    ((h ^ (h >> 32)) % ROWS as u64) as usize
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Self {
        let mut rows = Vec::with_capacity(ROWS);
        rows.resize_with(ROWS, Row::default);
        Tracker {
            config,
            rows,
            stats: TrackerStats::default(),
        }
    }

    pub fn config(&self) -> TrackerConfig {
        self.config
    }

    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Record one exit of the instruction at `rip` whose encoding is `bytes`
    /// (cut to 15 bytes).
    pub fn observe(&mut self, rip: u64, bytes: &[u8]) -> Observation {
        let bytes = &bytes[..bytes.len().min(MAX_INSN_BYTES)];
        let threshold = self.config.threshold.max(1);
        self.stats.observations += 1;
        let row = &mut self.rows[row_of(rip, bytes)];
        let count = match row.entries.iter_mut().find(|e| e.matches(rip, bytes)) {
            Some(e) => {
                e.count = e.count.saturating_add(1);
                e.count
            }
            None => {
                if row.entries.len() == DEPTH {
                    row.entries.remove(0);
                    self.stats.evictions += 1;
                }
                let mut stored = [0u8; MAX_INSN_BYTES];
                stored[..bytes.len()].copy_from_slice(bytes);
                row.entries.push(Entry {
                    rip,
                    len: bytes.len() as u8,
                    bytes: stored,
                    count: 1,
                });
                1
            }
        };
        let translate = count == threshold;
        if translate {
            self.stats.translate_requests += 1;
        }
        Observation { count, translate }
    }

    /// The current count of an instruction, without counting an exit.
    pub fn count(&self, rip: u64, bytes: &[u8]) -> u32 {
        let bytes = &bytes[..bytes.len().min(MAX_INSN_BYTES)];
        self.rows[row_of(rip, bytes)]
            .entries
            .iter()
            .find(|e| e.matches(rip, bytes))
            .map_or(0, |e| e.count)
    }

    /// Drop an instruction's entry (e.g. after its translation was dropped because
    /// the guest code changed, so that a later exit can rebuild it). Returns whether
    /// it was present.
    pub fn forget(&mut self, rip: u64, bytes: &[u8]) -> bool {
        let bytes = &bytes[..bytes.len().min(MAX_INSN_BYTES)];
        let row = &mut self.rows[row_of(rip, bytes)];
        match row.entries.iter().position(|e| e.matches(rip, bytes)) {
            Some(i) => {
                row.entries.remove(i);
                true
            }
            None => false,
        }
    }

    /// Empty the table (e.g. at a change of paging mode). Statistics are kept.
    pub fn clear(&mut self) {
        for r in &mut self.rows {
            r.entries.clear();
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.rows.iter().map(|r| r.entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const OUT_DX: &[u8] = &[0xee];

    #[test]
    fn translate_at_third_exit_exactly_once() {
        let mut t = Tracker::default();
        let obs: Vec<Observation> = (0..5).map(|_| t.observe(0x1000, OUT_DX)).collect();
        assert_eq!(
            obs.iter().map(|o| o.count).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(
            obs.iter().map(|o| o.translate).collect::<Vec<_>>(),
            vec![false, false, true, false, false]
        );
        assert_eq!(t.stats().translate_requests, 1);
    }

    #[test]
    fn threshold_is_configurable() {
        let mut t = Tracker::new(TrackerConfig { threshold: 1 });
        assert!(t.observe(0x10, OUT_DX).translate);
        let mut t = Tracker::new(TrackerConfig { threshold: 5 });
        let hits: Vec<bool> = (0..6).map(|_| t.observe(0x10, OUT_DX).translate).collect();
        assert_eq!(hits, vec![false, false, false, false, true, false]);
    }

    #[test]
    fn key_includes_length_and_bytes() {
        let mut t = Tracker::default();
        t.observe(0x1000, &[0xee]);
        t.observe(0x1000, &[0xee]);
        // Same RIP, other bytes (the code changed): a new entry.
        assert_eq!(t.observe(0x1000, &[0xec]).count, 1);
        // Same first byte, other length: a new entry.
        assert_eq!(t.observe(0x1000, &[0xee, 0x90]).count, 1);
        assert_eq!(t.count(0x1000, &[0xee]), 2);
    }

    #[test]
    fn full_row_evicts_oldest_first() {
        let mut t = Tracker::default();
        // Find DEPTH + 1 RIPs that share a row.
        let row = row_of(0, OUT_DX);
        let rips: Vec<u64> = (0u64..)
            .filter(|&r| row_of(r, OUT_DX) == row)
            .take(DEPTH + 1)
            .collect();
        for &r in &rips[..DEPTH] {
            t.observe(r, OUT_DX);
            t.observe(r, OUT_DX);
        }
        assert_eq!(t.stats().evictions, 0);
        t.observe(rips[DEPTH], OUT_DX);
        assert_eq!(t.stats().evictions, 1);
        // The oldest (first inserted) is gone, the rest keep their counts.
        assert_eq!(t.count(rips[0], OUT_DX), 0);
        for &r in &rips[1..DEPTH] {
            assert_eq!(t.count(r, OUT_DX), 2);
        }
        assert_eq!(t.observe(rips[0], OUT_DX).count, 1);
    }

    #[test]
    fn forget_allows_a_rebuild() {
        let mut t = Tracker::default();
        for _ in 0..3 {
            t.observe(0x2000, OUT_DX);
        }
        assert!(t.forget(0x2000, OUT_DX));
        assert!(!t.forget(0x2000, OUT_DX));
        let hits: Vec<bool> = (0..3)
            .map(|_| t.observe(0x2000, OUT_DX).translate)
            .collect();
        assert_eq!(hits, vec![false, false, true]);
    }

    #[test]
    fn deterministic_and_bounded() {
        let run = || {
            let mut t = Tracker::default();
            let mut out = Vec::new();
            let mut x: u64 = 12345;
            for _ in 0..20_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let rip = (x >> 33) % 3000;
                out.push(t.observe(rip, &[0xe6, (rip & 0xff) as u8]));
            }
            (out, t.stats(), t.len())
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.2 <= ROWS * DEPTH);
        assert!(a.1.evictions > 0);
    }

    #[test]
    fn nearby_rips_spread_over_rows() {
        // A driver's exiting instructions sit a few bytes apart: they must not pile
        // into a few rows (8 entries each) and evict each other.
        let mut rows = alloc::collections::BTreeSet::new();
        for i in 0..512u64 {
            rows.insert(row_of(0xffff_ffff_8100_0000 + i * 2, &[0xec]));
        }
        assert!(rows.len() > 256, "only {} rows used", rows.len());
        let mut t = Tracker::default();
        for i in 0..1024u64 {
            t.observe(0x40_0000 + i * 3, &[0xee]);
        }
        assert!(t.stats().evictions < 100, "{:?}", t.stats());
    }

    #[test]
    fn overlong_bytes_are_cut() {
        let mut t = Tracker::default();
        let long = [0x66u8; 20];
        t.observe(1, &long);
        assert_eq!(t.count(1, &long[..15]), 1);
    }
}
