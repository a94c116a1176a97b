//! A hardware cost model: a projection, never a measurement. What a run would
//! cost on VT-x hardware, from its counts:
//!
//! ```text
//! projected cycles = exits × round trip
//!                  + instructions avex's engine ran × ENGINE_CYCLES_PER_INSN
//!                  + the other guest instructions × NATIVE_CPI
//! native cycles    = every guest instruction × NATIVE_CPI
//! ```
//!
//! with the round trip at [`ROUND_TRIP_CYCLES`] (the bare VM exit and resume) and
//! at [`ROUND_TRIP_WITH_VMM_CYCLES`] (with the VMM's software), both shown. Guest
//! instructions come from the run's exit distance ([`ExitDistance`]: the gaps
//! plus the exiting instructions), so a run without one has no projection. What
//! the model leaves out: cache and TLB effects of exits, instructions before the
//! first exit, a native IPC other than 1, and the engine's cost on a CPU other
//! than this one.

use std::fmt::Write as _;

use avex_core::distance::ExitDistance;
use avex_core::exit::Mode;
use avex_core::stats::ExitStats;
use serde::Serialize;

use crate::compare::Row;

/// One VM exit and resume on Sandy Bridge: Agesen et al., "Software Techniques
/// for Avoiding Hardware Virtualization Exits", ATC 2012, Table 1.
pub const ROUND_TRIP_CYCLES: f64 = 784.0;
/// About what an exit costs with the VMM's software handling it (same paper,
/// section 9: VMware's budget per exit).
pub const ROUND_TRIP_WITH_VMM_CYCLES: f64 = 3000.0;
/// avex's engine per guest instruction, measured by the engine bench:
/// `cargo bench -p avex-core --bench engine -- --warm-up-time 1
/// --measurement-time 2`, line `engine/typical_cluster: 222.1 ns per run of 8
/// instructions (2 port I/O, 1 memory read; thread CPU time)` = 27.8 ns per
/// instruction, × 2.7 GHz (this machine's clock, as the bench converts) = 75
/// cycles. The same run measured 8.5 ns per register-only instruction and 46 ns
/// per memory access with a page walk; the typical cluster mixes both.
pub const ENGINE_CYCLES_PER_INSN: f64 = 75.0;
/// Assumed cycles per guest instruction run natively (an IPC of 1): not measured
/// (this machine has no VT-x and its KVM emulates every instruction).
pub const NATIVE_CPI: f64 = 1.0;

/// A run's projection (`cost_model` in the JSON record).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Projection {
    /// Always "projection": these are not measured times.
    pub kind: &'static str,
    pub round_trip_cycles: f64,
    pub round_trip_with_vmm_cycles: f64,
    pub engine_cycles_per_insn: f64,
    pub native_cpi: f64,
    /// Guest instructions from the first exit to the last, exiting ones included.
    pub guest_insns: u64,
    pub engine_insns: u64,
    pub exits: u64,
    pub native_cycles: f64,
    /// Projected on VT-x with the bare round trip, and with the VMM's software.
    pub vtx_cycles: f64,
    pub vtx_with_vmm_cycles: f64,
    /// Projected time against native (1.0: no virtualization overhead).
    pub vs_native: f64,
    pub vs_native_with_vmm: f64,
    /// Projected speedup against the same guest's `off` run (filled in by
    /// `avex compare`, which has it).
    pub speedup_vs_off: Option<f64>,
    pub speedup_vs_off_with_vmm: Option<f64>,
}

/// The model's arithmetic: `exits` round trips, `engine_insns` run by the engine,
/// the rest of `guest_insns` (which includes them) run natively.
pub fn project(exits: u64, guest_insns: u64, engine_insns: u64) -> Projection {
    let native_run = guest_insns.saturating_sub(engine_insns) as f64 * NATIVE_CPI;
    let engine = engine_insns as f64 * ENGINE_CYCLES_PER_INSN;
    let native_cycles = guest_insns as f64 * NATIVE_CPI;
    let vtx = |rt: f64| exits as f64 * rt + engine + native_run;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let (vtx_cycles, vtx_with_vmm_cycles) =
        (vtx(ROUND_TRIP_CYCLES), vtx(ROUND_TRIP_WITH_VMM_CYCLES));
    Projection {
        kind: "projection",
        round_trip_cycles: ROUND_TRIP_CYCLES,
        round_trip_with_vmm_cycles: ROUND_TRIP_WITH_VMM_CYCLES,
        engine_cycles_per_insn: ENGINE_CYCLES_PER_INSN,
        native_cpi: NATIVE_CPI,
        guest_insns,
        engine_insns,
        exits,
        native_cycles,
        vtx_cycles,
        vtx_with_vmm_cycles,
        vs_native: ratio(vtx_cycles, native_cycles),
        vs_native_with_vmm: ratio(vtx_with_vmm_cycles, native_cycles),
        speedup_vs_off: None,
        speedup_vs_off_with_vmm: None,
    }
}

/// A run's projection from its statistics: `None` without an exit distance.
/// Guest instructions: the gaps' plus one exiting instruction per exit seen.
pub fn of_stats(exits: u64, stats: &ExitStats) -> Option<Projection> {
    let d: &ExitDistance = stats.exit_distance.as_ref()?;
    let guest = d.guest_insns + stats.handled;
    Some(project(exits, guest, stats.cluster_insns.min(guest)))
}

impl Projection {
    /// Fill in the speedups against `off`'s projection.
    pub fn against_off(&mut self, off: &Projection) {
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        self.speedup_vs_off = ratio(off.vtx_cycles, self.vtx_cycles);
        self.speedup_vs_off_with_vmm = ratio(off.vtx_with_vmm_cycles, self.vtx_with_vmm_cycles);
    }
}

/// Fill in each run's speedup against its guest's `off` run (not coalesced).
pub fn against_off(rows: &mut [Row]) {
    let offs: Vec<(String, Projection)> = rows
        .iter()
        .filter(|r| r.mode == Mode::Off && !r.coalesced)
        .filter_map(|r| Some((r.guest.clone(), r.result.as_ref().ok()?.cost_model.clone()?)))
        .collect();
    for r in rows.iter_mut() {
        let Ok(rec) = &mut r.result else { continue };
        let (Some(p), Some((_, off))) = (
            rec.cost_model.as_mut(),
            offs.iter().find(|(g, _)| *g == r.guest),
        ) else {
            continue;
        };
        p.against_off(off);
    }
}

/// The projection per guest and run, next to the counts it comes from. Empty when
/// no run has one.
pub fn table(rows: &[Row]) -> String {
    let with: Vec<(&Row, &Projection)> = rows
        .iter()
        .filter_map(|r| Some((r, r.result.as_ref().ok()?.cost_model.as_ref()?)))
        .collect();
    if with.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "PROJECTED on VT-x hardware (a cost model, not a measurement): exits x {ROUND_TRIP_CYCLES:.0} \
         cycles (or {ROUND_TRIP_WITH_VMM_CYCLES:.0} with VMM software) + engine instructions x \
         {ENGINE_CYCLES_PER_INSN:.0} + other guest instructions x {NATIVE_CPI:.0}\n"
    );
    let _ = writeln!(
        s,
        "{:<10} {:<20} {:>9} {:>11} {:>10} {:>11} {:>9} {:>10} {:>9} {:>10}",
        "guest",
        "mode",
        "exits",
        "guest insns",
        "engine",
        "Mcyc @784",
        "x native",
        "x off @784",
        "Mcyc @3k",
        "x off @3k"
    );
    let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
    for (r, p) in with {
        let _ = writeln!(
            s,
            "{:<10} {:<20} {:>9} {:>11} {:>10} {:>11.2} {:>9.2} {:>10} {:>9.2} {:>10}",
            r.guest,
            r.name(),
            p.exits,
            p.guest_insns,
            p.engine_insns,
            p.vtx_cycles / 1e6,
            p.vs_native,
            x(p.speedup_vs_off),
            p.vtx_with_vmm_cycles / 1e6,
            x(p.speedup_vs_off_with_vmm),
        );
    }
    s.push_str(
        "(x native: projected time against the same guest instructions run natively; \
         x off: projected speedup against off. Guest instructions are those from the \
         first exit to the last, counted by the exit distance.)\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arithmetic_is_the_documented_one() {
        // off: 1,000 exits in 100,000 guest instructions, nothing in the engine.
        let mut off = project(1000, 100_000, 0);
        assert_eq!(off.native_cycles, 100_000.0);
        assert_eq!(off.vtx_cycles, 1000.0 * 784.0 + 100_000.0);
        assert_eq!(off.vtx_with_vmm_cycles, 1000.0 * 3000.0 + 100_000.0);
        assert_eq!(off.vs_native, 8.84);
        // Clusters: 10 exits, 2,000 of the instructions run by the engine.
        let mut c = project(10, 100_000, 2000);
        assert_eq!(c.vtx_cycles, 10.0 * 784.0 + 2000.0 * 75.0 + 98_000.0);
        c.against_off(&off);
        let s = c.speedup_vs_off.unwrap();
        assert!((s - 884_000.0 / 255_840.0).abs() < 1e-12, "{s}");
        let v = c.speedup_vs_off_with_vmm.unwrap();
        assert!((v - 3_100_000.0 / 278_000.0).abs() < 1e-12, "{v}");
        off.against_off(&off.clone());
        assert_eq!(off.speedup_vs_off, Some(1.0));
        // Nothing run: no division by zero.
        let z = project(0, 0, 0);
        assert_eq!((z.vs_native, z.vtx_cycles), (0.0, 0.0));
    }

    #[test]
    fn guest_instructions_are_the_gaps_plus_the_exiting_ones() {
        let mut s = ExitStats::default();
        assert_eq!(of_stats(5, &s), None);
        s.handled = 4;
        s.cluster_insns = 6;
        s.exit_distance = Some(ExitDistance {
            gaps: 3,
            guest_insns: 20,
            ..ExitDistance::default()
        });
        let p = of_stats(5, &s).unwrap();
        assert_eq!((p.guest_insns, p.engine_insns, p.exits), (24, 6, 5));
    }
}
