//! The distance between exits on KVM ([`Config::exit_distance`](crate::Config)):
//! guest instructions from KVM's `insn_emulation` statistic, read with one `pread`
//! of the binary statistics file before each KVM_RUN that resumes the guest after
//! an exit, and again at the next exit. This KVM runs every guest instruction in
//! its emulator and counts each in `insn_emulation` (PLATFORM.md), so the
//! difference is the instructions the guest ran in between, the exiting one
//! included; instructions avex's engine ran come from the exit handler.
//!
//! Not always on: the two `pread`s per exit are system calls in the middle of
//! handling exits (measured here: 4.5-12.6 ms for the 13,730 reads of `avex run
//! console --mode off --exit-distance`, 0.3-0.9 us each, on a loaded machine),
//! and the time they take is measurement, not exit handling: it is timed apart
//! (`TimeSplit::distance_ns`) and taken out of the times avex reports. On hardware KVM (VT-x/SVM
//! running the guest natively) `insn_emulation` counts only what KVM emulated and
//! this would measure nothing useful.

use std::time::Instant;

use avex_core::distance::{DistanceMeter, ExitDistance};

use crate::Vm;

/// KVM counts the exiting instruction in `insn_emulation` before it reaches user
/// space (measured here: `out; out` back to back reads 1 between the two exits,
/// checked by tests/kvm.rs), and no gap includes it.
const EXITING_INSN: u64 = 1;

/// Where `insn_emulation` is and what was read.
pub(crate) struct KvmDistance {
    meter: DistanceMeter,
    at: u64,
    /// `insn_emulation` when the guest was last resumed after an exit; `None`
    /// until the next resume is read.
    resumed: Option<u64>,
}

impl Vm {
    /// Before KVM_RUN: read the counter if this run resumes the guest after an
    /// exit (an interrupted KVM_RUN leaves the reading of its resume in place).
    pub(crate) fn distance_resume(&mut self) {
        let (Some(d), Ok(stats)) = (&mut self.distance, &self.stats) else {
            return;
        };
        if d.resumed.is_none() {
            let t = Instant::now();
            d.resumed = stats.read_at(d.at);
            self.time.distance_ns += t.elapsed().as_nanos() as u64;
        }
    }

    /// At an exit that reaches the exit handler, before it is handled.
    pub(crate) fn distance_exit(&mut self) {
        let (Some(d), Ok(stats)) = (&mut self.distance, &self.stats) else {
            return;
        };
        let t = Instant::now();
        let now = stats.read_at(d.at);
        self.time.distance_ns += t.elapsed().as_nanos() as u64;
        let cpu = match (d.resumed.take(), now) {
            (Some(r), Some(n)) => n.checked_sub(r).and_then(|x| x.checked_sub(EXITING_INSN)),
            _ => None,
        };
        d.meter.exit(cpu, self.handler.stats().cluster_insns);
    }

    pub(crate) fn distance_histogram(&self) -> Option<ExitDistance> {
        self.distance.as_ref().map(|d| d.meter.histogram().clone())
    }
}

impl KvmDistance {
    /// `None` when `insn_emulation` cannot be read (the statistics file did not
    /// open, or has no such statistic).
    pub(crate) fn open(stats: &Result<crate::VcpuStats, String>) -> Option<KvmDistance> {
        let at = stats.as_ref().ok()?.locate("insn_emulation")?;
        Some(KvmDistance {
            meter: DistanceMeter::new("kvm_insn_emulation"),
            at,
            resumed: None,
        })
    }
}
