//! How far apart exits are in the guest's instruction stream (Agesen et al., ATC
//! 2012, Figure 5): the guest instructions run between one exit and the next, as a
//! histogram with log2 buckets.
//!
//! A gap counts every guest instruction completed after the exiting instruction of
//! one exit and before the exiting instruction of the next: those the CPU (or KVM)
//! ran, and those avex's engine ran inside a cluster after the first exit (a cluster
//! moves instructions from the CPU to the engine; it does not take them out of the
//! guest's stream). The exiting instructions themselves are in no gap, so two exits
//! back to back are a gap of 0. There is one gap per exit after the first: the
//! histogram's total is the backend's measured exits minus one.
//!
//! Each backend counts the CPU's share its own way ([`ExitDistance::source`]): the
//! VT-x hypervisor in Bochs from the TSC (which counts emulated instructions there),
//! the KVM backend from KVM's `insn_emulation` statistic (KVM here emulates every
//! guest instruction). [`DistanceMeter`] turns their per-exit readings into gaps.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// The histogram of gaps between consecutive exits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExitDistance {
    /// How the CPU's share was counted (`bochs_tsc`, `kvm_insn_emulation`).
    pub source: String,
    /// `log2_buckets[0]` counts gaps of 0 instructions (exits back to back);
    /// `log2_buckets[i]`, i ≥ 1, gaps g with 2^(i-1) ≤ g < 2^i. Trailing empty
    /// buckets are not kept.
    pub log2_buckets: Vec<u64>,
    /// Gaps measured: one per exit after the first (the buckets' total).
    pub gaps: u64,
    /// Guest instructions in all gaps (between the first exit and the last).
    pub guest_insns: u64,
    /// Of those, the ones avex's engine ran inside clusters.
    pub engine_insns: u64,
    /// Gaps whose CPU reading came out below zero and was taken as 0 (the
    /// backend's fixed correction over-subtracted: should stay 0).
    pub clamped: u64,
}

impl ExitDistance {
    pub fn new(source: &str) -> ExitDistance {
        ExitDistance {
            source: source.into(),
            ..ExitDistance::default()
        }
    }

    /// The bucket a gap of `gap` instructions falls in.
    pub fn bucket_of(gap: u64) -> usize {
        (u64::BITS - gap.leading_zeros()) as usize
    }

    /// The gaps bucket `i` holds: `lo..=hi`.
    pub fn bucket_range(i: usize) -> (u64, u64) {
        match i {
            0 => (0, 0),
            64.. => (1 << 63, u64::MAX),
            _ => (1 << (i - 1), (1 << i) - 1),
        }
    }

    /// Count one gap: `cpu` instructions the CPU ran and `engine` the engine ran.
    pub fn record(&mut self, cpu: u64, engine: u64) {
        let gap = cpu.saturating_add(engine);
        let b = Self::bucket_of(gap);
        if self.log2_buckets.len() <= b {
            self.log2_buckets.resize(b + 1, 0);
        }
        self.log2_buckets[b] += 1;
        self.gaps += 1;
        self.guest_insns = self.guest_insns.saturating_add(gap);
        self.engine_insns = self.engine_insns.saturating_add(engine);
    }

    /// The buckets' total (equal to `gaps` in a consistent histogram).
    pub fn total(&self) -> u64 {
        self.log2_buckets.iter().sum()
    }

    /// The share of gaps shorter than `n` instructions, counting whole buckets
    /// only (`n` a power of two, or 0..=1), in 0.0..=1.0.
    pub fn share_below(&self, n: u64) -> f64 {
        if self.gaps == 0 {
            return 0.0;
        }
        let below: u64 = self
            .log2_buckets
            .iter()
            .enumerate()
            .filter(|(i, _)| Self::bucket_range(*i).1 < n)
            .map(|(_, c)| c)
            .sum();
        below as f64 / self.gaps as f64
    }

    /// A short label for bucket `i`: its lower bound (`0`, `1`, `2`, `4`, ... `1K`,
    /// ... `1M`).
    pub fn bucket_label(i: usize) -> String {
        fn short(v: u64) -> String {
            match v {
                _ if v >= 1 << 30 && v.is_multiple_of(1 << 30) => alloc::format!("{}G", v >> 30),
                _ if v >= 1 << 20 && v.is_multiple_of(1 << 20) => alloc::format!("{}M", v >> 20),
                _ if v >= 1 << 10 && v.is_multiple_of(1 << 10) => alloc::format!("{}K", v >> 10),
                _ => alloc::format!("{v}"),
            }
        }
        short(Self::bucket_range(i).0)
    }
}

/// Turns a backend's readings at each exit into gaps: call [`DistanceMeter::exit`]
/// once for every exit the backend counts, before the exit is handled.
#[derive(Clone, Debug)]
pub struct DistanceMeter {
    hist: ExitDistance,
    /// The engine's instruction count (cumulative) at the previous exit, once
    /// there was one.
    engine_at_last_exit: Option<u64>,
}

impl DistanceMeter {
    pub fn new(source: &str) -> DistanceMeter {
        DistanceMeter {
            hist: ExitDistance::new(source),
            engine_at_last_exit: None,
        }
    }

    /// An exit: the CPU ran `cpu` guest instructions since the guest was last
    /// resumed (the exiting instruction not included; `None` when the reading came
    /// out below zero, taken as 0 and counted as clamped), and the engine has run
    /// `engine_total` instructions since the start of the run (the exit handler's
    /// `cluster_insns`).
    pub fn exit(&mut self, cpu: Option<u64>, engine_total: u64) {
        if let Some(prev) = self.engine_at_last_exit {
            if cpu.is_none() {
                self.hist.clamped += 1;
            }
            self.hist
                .record(cpu.unwrap_or(0), engine_total.saturating_sub(prev));
        }
        self.engine_at_last_exit = Some(engine_total);
    }

    pub fn histogram(&self) -> &ExitDistance {
        &self.hist
    }

    pub fn into_histogram(self) -> ExitDistance {
        self.hist
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_with_zero_apart() {
        assert_eq!(ExitDistance::bucket_of(0), 0);
        assert_eq!(ExitDistance::bucket_of(1), 1);
        assert_eq!(ExitDistance::bucket_of(2), 2);
        assert_eq!(ExitDistance::bucket_of(3), 2);
        assert_eq!(ExitDistance::bucket_of(4), 3);
        assert_eq!(ExitDistance::bucket_of(u64::MAX), 64);
        for i in 0..=64 {
            let (lo, hi) = ExitDistance::bucket_range(i);
            assert_eq!(ExitDistance::bucket_of(lo), i);
            assert_eq!(ExitDistance::bucket_of(hi), i);
        }
        assert_eq!(ExitDistance::bucket_label(0), "0");
        assert_eq!(ExitDistance::bucket_label(1), "1");
        assert_eq!(ExitDistance::bucket_label(3), "4");
        assert_eq!(ExitDistance::bucket_label(11), "1K");
    }

    #[test]
    fn one_gap_per_exit_after_the_first_with_the_engine_counted_in() {
        let mut m = DistanceMeter::new("test");
        // Boot to the first exit is no gap.
        m.exit(Some(1000), 0);
        // Back to back; then 3 by the CPU after a cluster of 5; then 9.
        m.exit(Some(0), 0);
        m.exit(Some(3), 5);
        m.exit(None, 5);
        m.exit(Some(9), 5);
        let h = m.into_histogram();
        assert_eq!(h.gaps, 4);
        assert_eq!(h.total(), h.gaps);
        assert_eq!(h.log2_buckets, [2, 0, 0, 0, 2]);
        assert_eq!(h.guest_insns, 17);
        assert_eq!(h.engine_insns, 5);
        assert_eq!(h.clamped, 1);
        assert_eq!(h.share_below(1), 0.5);
        assert_eq!(h.share_below(16), 1.0);
    }
}
