//! The engine: runs a translated cluster against a guest through the [`Guest`] trait.
//!
//! # Contract
//!
//! [`run`]`(cluster, guest, start, limits)` runs `cluster.insns[start..]`:
//! `start = 0` runs the cluster's first (exiting) instruction too; a backend that
//! already completed that instruction natively or in its exit handler passes `1`
//! (generally: the index of the instruction at the guest's current RIP). The guest's
//! RIP must equal `cluster.insns[start].rip` and its code size must equal
//! `cluster.bitness`, or the run stops with [`StopReason::StateMismatch`] having
//! done nothing.
//!
//! The engine reads `guest.state()` once, and writes `guest.set_state()` once at
//! the end if (and only if) the state changed. Before running anything it checks
//! that the guest code it covers, fetched through the guest's page tables at
//! CS.base + RIP with the guest's CPL, equals every range of `cluster.code` byte by byte
//! ([`StopReason::CodeChanged`] / [`StopReason::CodeUnreadable`], nothing done).
//!
//! Untrusted clusters: [`crate::ir::validate`] checks every operand, index and bound
//! once, when a cluster enters the translation cache. `run` itself does only the
//! cheap structural checks (non-empty, byte length, start index, every instruction
//! it runs inside the checked bytes, branch targets, back-edge count) and masks or
//! bound-checks every index it uses, so whatever a cluster holds the engine never
//! panics and reaches nothing but the guest, through the trait. These checks stay:
//! `run` is public and is also handed clusters that never went through the cache
//! ([`crate::emulate`] runs a one-instruction cluster it built in place).
//!
//! # Files
//!
//! `outcome` (limits, stop reasons, statistics), `control` (the run loop,
//! back-edges, the code check, branches), `operand` (registers, memory operands
//! through segmentation and the software MMU, the stack), `gap` (one instruction:
//! the gap fillers and the dispatch), `exiting` (the exiting instructions), `alu`
//! (flags arithmetic), `mmu` (page walks), `cr` (the CPU's checks of control
//! register and MSR writes).
//!
//! # Control flow
//!
//! Forward branches to `Target::Insn` continue the run; `Target::Exit` ends it
//! ([`StopReason::ExitBranch`]), unless the CPU would refuse the destination
//! (beyond CS.limit outside 64-bit code, not canonical in it): then the run stops
//! before the branch with #GP, nothing of it done, as the CPU faults there. A direct CALL pushes its return address and goes
//! on like a JMP. An indirect CALL or JMP, or a RET, reads its destination and
//! goes on only through a guard of the cluster expecting exactly that address
//! (CALL pushes, RET pops, as the CPU does); with none it stops before itself,
//! nothing done ([`StopReason::GuardMiss`], which carries the destination so the
//! hypervisor can learn it). At every taken backward branch the engine counts
//! the back-edge: with `cap: Some(n)` the (n+1)-th taking ends the run at the
//! branch target ([`StopReason::BackEdgeCap`]; a backward branch with no
//! `BackEdge` entry is treated as cap 0), then asks `guest.interrupt_pending()` and
//! ends the run at the target if so. The budget ([`RunLimits::max_insns`], each REP
//! iteration counting one) bounds every run.
//!
//! # Exiting instructions
//!
//! IN/OUT/INS/OUTS go to `port_in`/`port_out` (at CPL > IOPL in protected mode the
//! TSS permission bitmap would decide: [`StopReason::Unsupported`]); after every
//! port write the engine asks `stop_requested` and ends the run right after the
//! write if a device asked the VMM to stop the guest ([`StopReason::StopRequested`]).
//! RDMSR/WRMSR go to the guest trait, except EFER (read from the state; writes are
//! left to the CPU) and FS/GS base (kept in the segment state as well); a
//! non-canonical value for an MSR holding a linear address raises #GP
//! ([`cr::check_wrmsr`]). CPUID, RDTSC/RDTSCP (`tsc`, `tsc_aux`), XGETBV/XSETBV go
//! to the trait. A MOV to a control register is first checked as the CPU checks it
//! ([`cr::check_write`], against `Guest::cpu_caps`, asked once per run), then, in
//! PAE paging, loads the PDPTE registers into `CpuState::pdpte` where the CPU does
//! ([`cr::loads_pdptes`]; a reserved bit in a PDPTE is #GP). MOV to CR0/CR4
//! changing PE, PG or a translation bit, and MOV to CR3 in PAE mode, complete and
//! end the run ([`StopReason::ModeChange`]); other CR3 writes invalidate the TLB
//! and re-check the code under the new tables. Privilege and reserved-bit
//! violations stop before the instruction with [`StopReason::Fault`]; RDPMC is
//! unsupported; HLT ends the run at the HLT ([`StopReason::Hlt`]).
//!
//! # The interrupt flag
//!
//! PUSHF, POPF, CLI and STI change flags as the CPU does at the guest's CPL and
//! IOPL (`interrupt_flag`). Enabling interrupts ends the run where the CPU would
//! first take one ([`StopReason::InterruptWindow`]): right after a POPF that sets
//! IF, or after the instruction in the shadow of an STI that sets it. The engine
//! hands back no interrupt shadow, so an STI whose next instruction it cannot
//! complete (a stop before it, a REP string instruction, the cluster's end) is not
//! run: the run stops before the STI, IF still clear. A POPF setting TF, and CLI or
//! STI at CPL > IOPL, stop before themselves.
//!
//! Every stop is precise: [`RunOutcome::rip`] is where the guest resumes; every
//! instruction before it is complete, none after it has any effect. A stop *before*
//! an instruction (page fault, not-RAM, #GP/#UD, unsupported, HLT, budget) leaves
//! that instruction entirely undone (page-table accessed/dirty bits aside), except a
//! REP INS/OUTS interrupted between iterations, whose completed iterations are
//! committed with RCX/RSI/RDI updated exactly as the hardware does when it is
//! interrupted. The engine never injects an exception: the guest resumes at the
//! instruction and takes the fault (or the exit) natively.

pub mod alu;
mod control;
pub mod cr;
mod exiting;
mod gap;
mod interrupt_flag;
pub mod mmu;
mod operand;
mod outcome;
pub mod test_guest;

pub use alu::{cond, sext, AF, CF, DF, OF, PF, SF, STATUS, ZF};
pub use mmu::{Access, Mmu, Paging, XlateError};
pub use outcome::{Invalid, RunLimits, RunOutcome, RunStats, StopReason, EXIT_CLASS_SLOTS};

use crate::guest::{CpuCaps, CpuState, Fault, Guest};
use crate::ir::limits::{MAX_CLUSTER_BYTES, MAX_CODE_RANGES};
use crate::ir::*;
use mmu::*;

pub use crate::ir::limits::MAX_BACK_EDGES;
/// Code pages a cluster can span (recorded by the code check for the self-write
/// check): a range of at most [`MAX_CLUSTER_BYTES`] (one page) spans at most two
/// pages, so `MAX_CODE_RANGES` ranges at most twice as many.
const MAX_CODE_PAGES: usize = 2 * MAX_CODE_RANGES;
const _: () = assert!(MAX_CLUSTER_BYTES <= 4096, "a range spans at most two pages");

/// Runs `cluster` from instruction index `start` (see the module documentation).
pub fn run<G: Guest + ?Sized>(
    cluster: &Cluster,
    guest: &mut G,
    start: usize,
    limits: &RunLimits,
) -> RunOutcome {
    let nothing = |reason, rip| RunOutcome {
        reason,
        rip,
        index: None,
        stats: RunStats::default(),
    };
    // Cheap structural checks (the full `ir::validate` runs when a cluster enters
    // the cache). Everything else the run uses is checked where it is used.
    let n = cluster.insns.len();
    if n == 0 {
        return nothing(StopReason::Invalid(Invalid::Empty), 0);
    }
    if cluster.code.is_empty()
        || cluster.code.len() > MAX_CODE_RANGES
        || cluster.code_bytes() > MAX_CLUSTER_BYTES
    {
        return nothing(StopReason::Invalid(Invalid::TooLarge), 0);
    }
    if cluster.back_edges.len() > MAX_BACK_EDGES {
        return nothing(StopReason::Invalid(Invalid::TooManyBackEdges), 0);
    }
    if start >= n {
        return nothing(StopReason::Invalid(Invalid::StartIndex), 0);
    }
    let st = guest.state();
    let rip0 = st.rip;
    if st.rip != cluster.insns[start].rip || code_bitness(&st) != Some(cluster.bitness) {
        return nothing(StopReason::StateMismatch, rip0);
    }
    if guest.stop_requested() {
        return nothing(StopReason::StopRequested, rip0);
    }
    let initial = st.clone();
    let mut e = Engine {
        mmu: Mmu::new(&st, limits.maxphyaddr),
        st,
        g: guest,
        c: cluster,
        b64: cluster.bitness == Bitness::B64,
        limits: *limits,
        code_pages: [u64::MAX; MAX_CODE_PAGES],
        code_written: false,
        stats: RunStats::default(),
        units: limits.max_insns,
        be_counts: [0; MAX_BACK_EDGES],
        caps: None,
        tlb: Tlb::EMPTY,
    };
    if let Err(r) = e.check_code() {
        let stats = e.stats;
        return RunOutcome {
            reason: r,
            rip: rip0,
            index: Some(start),
            stats,
        };
    }
    let (reason, rip, index) = e.run_from(start);
    e.st.rip = rip;
    let stats = e.stats;
    if e.st != initial {
        e.g.set_state(&e.st);
    }
    RunOutcome {
        reason,
        rip,
        index,
        stats,
    }
}

/// The code size the guest runs in now, or `None` in virtual-8086 mode.
pub fn code_bitness(st: &CpuState) -> Option<Bitness> {
    if st.rflags & alu::VM != 0 {
        return None;
    }
    let cs = &st.seg[Seg::Cs as usize];
    if st.efer & EFER_LMA != 0 && cs.long() {
        Some(Bitness::B64)
    } else if st.cr0 & CR0_PE != 0 && cs.db() {
        Some(Bitness::B32)
    } else {
        Some(Bitness::B16)
    }
}

/// How an instruction ended when it did not stop before itself.
enum Flow {
    Next,
    Jump(u16),
    Exit(u64),
    /// Completed; stop after it.
    StopAfter(StopReason),
    /// An STI that set IF: the next instruction runs in its interrupt shadow, then
    /// the run ends (`interrupt_flag`).
    Shadow,
}

type R<T> = Result<T, StopReason>;

struct Engine<'a, G: Guest + ?Sized> {
    st: CpuState,
    mmu: Mmu,
    g: &'a mut G,
    c: &'a Cluster,
    b64: bool,
    limits: RunLimits,
    code_pages: [u64; MAX_CODE_PAGES],
    code_written: bool,
    stats: RunStats,
    units: u64,
    be_counts: [u32; MAX_BACK_EDGES],
    /// The vCPU's features, once a write that is checked against them ran.
    caps: Option<CpuCaps>,
    /// Translations done in this run (operand.rs `xlate`): a page touched again
    /// costs no second walk, as in the CPU's TLB.
    tlb: Tlb,
}

/// A small direct-mapped cache of the run's translations, by linear page and
/// access kind (a write entry comes from a walk that set the dirty bit). Emptied
/// whenever the paging state changes (`refresh_mmu`: CR writes, INVLPG).
#[derive(Clone, Copy)]
struct Tlb {
    /// (linear page << 2 | access kind, guest-physical page); `u64::MAX` = empty.
    slots: [(u64, u64); TLB_SLOTS],
}

const TLB_SLOTS: usize = 16;

impl Tlb {
    const EMPTY: Tlb = Tlb {
        slots: [(u64::MAX, 0); TLB_SLOTS],
    };

    fn key(la: u64, access: Access) -> (u64, usize) {
        let kind = match access {
            Access::Read => 0,
            Access::Write => 1,
            Access::Fetch => 2,
        };
        let page = la >> 12;
        (
            (page << 2) | kind,
            (page as usize ^ kind as usize) % TLB_SLOTS,
        )
    }

    fn get(&self, la: u64, access: Access) -> Option<u64> {
        let (key, slot) = Self::key(la, access);
        let (k, gpa_page) = self.slots[slot];
        (k == key).then_some(gpa_page | (la & 0xfff))
    }

    fn put(&mut self, la: u64, access: Access, gpa: u64) {
        let (key, slot) = Self::key(la, access);
        self.slots[slot] = (key, gpa & !0xfff);
    }
}

const GP: StopReason = StopReason::Fault(Fault::GeneralProtection);
const UD: StopReason = StopReason::Fault(Fault::InvalidOpcode);

impl<G: Guest + ?Sized> Engine<'_, G> {
    fn refresh_mmu(&mut self) {
        self.mmu = Mmu::new(&self.st, self.limits.maxphyaddr);
        self.tlb = Tlb::EMPTY;
    }

    /// The guest-physical address of linear `la` for `access`: from the run's TLB,
    /// or by a page walk whose result it keeps.
    fn translate_cached(&mut self, la: u64, access: Access) -> Result<u64, XlateError> {
        if let Some(gpa) = self.tlb.get(la, access) {
            return Ok(gpa);
        }
        let gpa = self
            .mmu
            .translate(self.g, la, access, &mut self.stats.page_walks)?;
        self.tlb.put(la, access, gpa);
        Ok(gpa)
    }
}

/// x86 register-write rules: 32-bit writes zero-extend, 8/16-bit writes merge.
#[inline(always)]
fn write_gpr(g: &mut u64, size: Size, v: u64) {
    *g = match size {
        Size::S8 => v,
        Size::S4 => v & 0xffff_ffff,
        s => (*g & !s.mask()) | (v & s.mask()),
    };
}

#[inline(always)]
fn canonical(a: u64) -> bool {
    cr::canonical(a, 48)
}
