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
//! CS.base + RIP with the guest's CPL, equals `cluster.guest_bytes` byte by byte
//! ([`StopReason::CodeChanged`] / [`StopReason::CodeUnreadable`], nothing done).
//!
//! Untrusted clusters: [`validate`] checks every operand, index and bound and is
//! meant to run once, when a cluster is loaded. `run` itself does only the cheap
//! structural checks (non-empty, byte length, start index, every instruction it
//! runs inside the checked bytes, branch targets, back-edge count) and masks or
//! bound-checks every index it uses, so whatever a cluster holds the engine never
//! panics and reaches nothing but the guest, through the trait.
//!
//! # Control flow
//!
//! Forward branches to `Target::Insn` continue the run; `Target::Exit` ends it
//! ([`StopReason::ExitBranch`]). At every taken backward branch the engine counts
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
//! Every stop is precise: [`RunOutcome::rip`] is where the guest resumes; every
//! instruction before it is complete, none after it has any effect. A stop *before*
//! an instruction (page fault, not-RAM, #GP/#UD, unsupported, HLT, budget) leaves
//! that instruction entirely undone (page-table accessed/dirty bits aside), except a
//! REP INS/OUTS interrupted between iterations, whose completed iterations are
//! committed with RCX/RSI/RDI updated exactly as the hardware does when it is
//! interrupted. The engine never injects an exception: the guest resumes at the
//! instruction and takes the fault (or the exit) natively.

pub mod alu;
pub mod cr;
pub mod mmu;
pub mod test_guest;

pub use alu::{cond, sext, AF, CF, DF, OF, PF, SF, STATUS, ZF};
pub use mmu::{Access, Mmu, Paging, XlateError};

use crate::guest::{CpuCaps, CpuState, Fault, Guest};
use crate::ir::*;
use crate::policy::ExitClass;
use alloc::string::String;
use mmu::*;

/// Largest cluster the engine accepts, in guest code bytes.
pub const MAX_CLUSTER_BYTES: u64 = 16 * 4096;
/// Largest number of back-edges per cluster.
pub const MAX_BACK_EDGES: usize = 64;
/// Size of [`RunStats::by_class`] (indexed by `ExitClass as usize`).
pub const EXIT_CLASS_SLOTS: usize = 64;
const MAX_CODE_PAGES: usize = (MAX_CLUSTER_BYTES / 4096) as usize + 1;

/// Limits of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Instruction budget (each REP iteration counts as one): the run stops with
    /// [`StopReason::Budget`] before exceeding it, so interrupts are never held off
    /// long. Default 4096.
    pub max_insns: u64,
    /// The guest's MAXPHYADDR (paging-structure bits above it are reserved).
    /// Default 52 (the architectural maximum; a smaller value only makes more walks
    /// fault, which always stops the cluster safely).
    pub maxphyaddr: u8,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            max_insns: 4096,
            maxphyaddr: 52,
        }
    }
}

/// The name the exit handler uses for [`RunLimits`].
pub type Limits = RunLimits;

/// Why a cluster is malformed (see [`validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    TooLarge,
    BytesLength,
    FirstRip,
    /// Instruction `n` lies outside `[start, end)`, overlaps its predecessor or has a
    /// bad length.
    InsnPlacement(u16),
    /// Instruction `n` has an operand, size or register the engine does not accept.
    Operand(u16),
    /// Instruction `n` branches to an index outside the cluster.
    Target(u16),
    BackEdge(u16),
    TooManyBackEdges,
    StartIndex,
}

/// Why a run ended. The guest resumes at [`RunOutcome::rip`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Ran past the last instruction (or fell through to a non-contiguous one).
    End,
    /// A branch to `Target::Exit`.
    ExitBranch,
    /// Stopped at a HLT: the backend handles it.
    Hlt,
    /// The guest's code differs from `cluster.guest_bytes` (at the start: nothing
    /// done; after a MOV to CR3: the code under the new CR3 differs).
    CodeChanged,
    /// The code check could not fetch the code (a fault or not RAM); nothing done.
    CodeUnreadable,
    /// A guest page fault on the instruction at `rip` (not injected).
    PageFault { addr: u64, error_code: u32 },
    /// The instruction at `rip` accesses guest-physical memory that is not RAM.
    NotRam { gpa: u64 },
    /// The instruction at `rip` would raise this exception.
    Fault(Fault),
    /// An interrupt is pending at a back-edge (or after a TPR write).
    InterruptPending,
    /// A capped back-edge was taken more often than its cap allows.
    BackEdgeCap,
    /// [`RunLimits::max_insns`] reached.
    Budget,
    /// An instruction wrote into the cluster's own code pages; it completed.
    SelfWrite,
    /// A port write made a device ask the VMM to stop the guest (the debug-exit
    /// port, see [`Guest::stop_requested`]); the write completed, nothing after it
    /// ran. A REP OUTS stops between iterations, as when interrupted.
    StopRequested,
    /// A control-register or LMSW write changed the paging mode, PE, PG, PAE, PCIDE
    /// or another translation-affecting bit; it completed.
    ModeChange,
    /// Something the engine does not do (RDPMC, EFER writes, I/O needing the TSS
    /// permission bitmap, unknown CR4 bits, 5-level paging ...).
    Unsupported,
    /// The cluster failed validation; nothing done.
    Invalid(Invalid),
    /// The guest's RIP or code size does not match the cluster; nothing done.
    StateMismatch,
}

/// What a run did. The statistics of later work are built from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunStats {
    /// Instructions completed.
    pub insns: u32,
    /// Exit-prone instructions (those with `exit_class`) completed.
    pub exiting: u32,
    /// Completed exit-prone instructions by `ExitClass as usize`.
    pub by_class: [u32; EXIT_CLASS_SLOTS],
    /// Guest memory accesses by instructions (code check excluded); an access that
    /// crosses a page counts once.
    pub mem_accesses: u32,
    /// Page walks done (code check included; 0 without paging).
    pub page_walks: u32,
    /// REP INS/OUTS iterations done.
    pub rep_iterations: u32,
    /// Backward branches taken.
    pub back_edges: u32,
}

impl Default for RunStats {
    fn default() -> Self {
        RunStats {
            insns: 0,
            exiting: 0,
            by_class: [0; EXIT_CLASS_SLOTS],
            mem_accesses: 0,
            page_walks: 0,
            rep_iterations: 0,
            back_edges: 0,
        }
    }
}

impl RunStats {
    /// Completed instructions of one exit class.
    pub fn exits_of(&self, class: ExitClass) -> u32 {
        self.by_class.get(class as usize).copied().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    pub reason: StopReason,
    /// Where the guest resumes.
    pub rip: u64,
    /// Index of the cluster instruction at `rip`, if `rip` is one of them.
    pub index: Option<usize>,
    pub stats: RunStats,
}

impl StopReason {
    /// False for the natural ends of a cluster (its end, a branch out of it, a HLT).
    pub fn is_early(&self) -> bool {
        !matches!(
            self,
            StopReason::End | StopReason::ExitBranch | StopReason::Hlt
        )
    }

    /// A short upper-case name for reports (`PAGE_FAULT`, `BUDGET`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            StopReason::End => "END",
            StopReason::ExitBranch => "EXIT_BRANCH",
            StopReason::Hlt => "HLT",
            StopReason::CodeChanged => "CODE_CHANGED",
            StopReason::CodeUnreadable => "CODE_UNREADABLE",
            StopReason::PageFault { .. } => "PAGE_FAULT",
            StopReason::NotRam { .. } => "NOT_RAM",
            StopReason::Fault(Fault::GeneralProtection) => "GP",
            StopReason::Fault(Fault::InvalidOpcode) => "UD",
            StopReason::Fault(Fault::PageFault { .. }) => "PAGE_FAULT",
            StopReason::InterruptPending => "INTERRUPT_PENDING",
            StopReason::BackEdgeCap => "BACK_EDGE_CAP",
            StopReason::Budget => "BUDGET",
            StopReason::SelfWrite => "SELF_WRITE",
            StopReason::StopRequested => "STOP_REQUESTED",
            StopReason::ModeChange => "MODE_CHANGE",
            StopReason::Unsupported => "UNSUPPORTED",
            StopReason::Invalid(_) => "INVALID",
            StopReason::StateMismatch => "STATE_MISMATCH",
        }
    }
}

impl RunOutcome {
    /// Where the guest resumes.
    pub fn rip(&self) -> u64 {
        self.rip
    }
    /// Instructions completed.
    pub fn insns(&self) -> u64 {
        self.stats.insns as u64
    }
    /// Completed exit-prone instructions per class name (classes with none omitted).
    pub fn exiting_by_class(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ExitClass::ALL.iter().filter_map(move |&c| {
            let n = self.stats.exits_of(c);
            (n > 0).then(|| (c.name(), n as u64))
        })
    }
    /// The stop reason's name when the run ended early (see [`StopReason::is_early`]).
    pub fn early_stop(&self) -> Option<String> {
        self.reason.is_early().then(|| self.reason.name().into())
    }
}

/// Checks every index and bound of a cluster the engine relies on.
pub fn validate(c: &Cluster) -> Result<(), Invalid> {
    let n = c.insns.len();
    if n == 0 {
        return Err(Invalid::Empty);
    }
    if n > u16::MAX as usize || c.end <= c.start || c.end - c.start > MAX_CLUSTER_BYTES {
        return Err(Invalid::TooLarge);
    }
    if c.bitness != Bitness::B64 && c.end > 1 << 32 {
        return Err(Invalid::TooLarge);
    }
    if c.guest_bytes.len() as u64 != c.end - c.start {
        return Err(Invalid::BytesLength);
    }
    if c.insns[0].rip != c.start {
        return Err(Invalid::FirstRip);
    }
    let b64 = c.bitness == Bitness::B64;
    let mut prev_end = c.start;
    for (i, insn) in c.insns.iter().enumerate() {
        let i16 = i as u16;
        if insn.len == 0
            || insn.len > 15
            || insn.rip < prev_end
            || insn.rip.saturating_add(insn.len as u64) > c.end
        {
            return Err(Invalid::InsnPlacement(i16));
        }
        prev_end = insn.rip.saturating_add(insn.len as u64);
        if !op_ok(&insn.op, b64) {
            return Err(Invalid::Operand(i16));
        }
        let t = match insn.op {
            Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => Some(target),
            _ => None,
        };
        if let Some(Target::Insn(t)) = t {
            if t as usize >= n {
                return Err(Invalid::Target(i16));
            }
        }
    }
    if c.back_edges.len() > MAX_BACK_EDGES {
        return Err(Invalid::TooManyBackEdges);
    }
    for be in &c.back_edges {
        let ok = match c.insns.get(be.insn as usize).map(|i| i.op) {
            Some(Op::Jmp { target })
            | Some(Op::Jcc { target, .. })
            | Some(Op::Loop { target, .. }) => {
                matches!(target, Target::Insn(t) if t <= be.insn)
            }
            _ => false,
        };
        if !ok {
            return Err(Invalid::BackEdge(be.insn));
        }
    }
    Ok(())
}

fn reg_ok(r: &RegRef) -> bool {
    r.index < 16 && (!r.high8 || (r.index < 4 && r.size == Size::S1))
}

fn mem_ok(m: &MemRef, b64: bool) -> bool {
    m.base.is_none_or(|b| b < 16)
        && m.index.is_none_or(|x| x < 16)
        && matches!(m.scale, 1 | 2 | 4 | 8)
        && match m.addr_size {
            Size::S1 => false,
            Size::S2 => !b64,
            Size::S4 => true,
            Size::S8 => b64,
        }
}

fn opnd_ok(o: &Operand, b64: bool, dst: bool) -> bool {
    match o {
        Operand::Reg(r) => reg_ok(r),
        Operand::Imm(_) => !dst,
        Operand::Mem(m) => mem_ok(m, b64),
    }
}

/// x86 has no two-memory-operand forms of these; the engine relies on at most one
/// memory write per instruction for precise stops.
fn both_mem(a: &Operand, b: &Operand) -> bool {
    matches!((a, b), (Operand::Mem(_), Operand::Mem(_)))
}

fn op_ok(op: &Op, b64: bool) -> bool {
    let stack = |s: Size| match s {
        Size::S2 => true,
        Size::S4 => !b64,
        Size::S8 => b64,
        Size::S1 => false,
    };
    let io = |s: Size| s != Size::S8;
    match op {
        Op::Mov { dst, src, .. } => {
            opnd_ok(dst, b64, true) && opnd_ok(src, b64, false) && !both_mem(dst, src)
        }
        Op::Movzx { dst, src, src_size } | Op::Movsx { dst, src, src_size } => {
            reg_ok(dst) && dst.size.bytes() > src_size.bytes() && opnd_ok(src, b64, false)
        }
        Op::Lea { dst, addr } => reg_ok(dst) && dst.size != Size::S1 && mem_ok(addr, b64),
        Op::Alu { dst, src, .. } => {
            opnd_ok(dst, b64, true) && opnd_ok(src, b64, false) && !both_mem(dst, src)
        }
        Op::Unary { dst, .. } => opnd_ok(dst, b64, true),
        Op::Shift { dst, count, .. } => {
            opnd_ok(dst, b64, true)
                && matches!(count, Operand::Imm(_) | Operand::Reg(_))
                && opnd_ok(count, b64, false)
        }
        Op::Bit { size, dst, bit, .. } => {
            *size != Size::S1
                && opnd_ok(dst, b64, true)
                && matches!(bit, Operand::Imm(_) | Operand::Reg(_))
                && opnd_ok(bit, b64, false)
        }
        Op::Xchg { a, b, .. } => opnd_ok(a, b64, true) && opnd_ok(b, b64, true) && !both_mem(a, b),
        Op::Push { size, src } => stack(*size) && opnd_ok(src, b64, false),
        Op::Pop { size, dst } => stack(*size) && opnd_ok(dst, b64, true),
        Op::Setcc { dst, .. } => opnd_ok(dst, b64, true),
        Op::Cmovcc { size, dst, src, .. } => {
            *size != Size::S1 && reg_ok(dst) && opnd_ok(src, b64, false)
        }
        Op::Imul { size, dst, src, .. } => {
            *size != Size::S1 && reg_ok(dst) && dst.size == *size && opnd_ok(src, b64, false)
        }
        Op::SignExtendAcc { size } | Op::SignExtendAccToDx { size } => *size != Size::S1,
        Op::Loop { addr_size, .. } => *addr_size != Size::S1 && (b64 || *addr_size != Size::S8),
        Op::In { size, .. } | Op::Out { size, .. } => io(*size),
        Op::Ins {
            size, addr_size, ..
        }
        | Op::Outs {
            size, addr_size, ..
        } => io(*size) && *addr_size != Size::S1 && (b64 || *addr_size != Size::S8),
        Op::MovToCr { cr, src: r } | Op::MovFromCr { cr, dst: r } => {
            matches!(cr, 0 | 2 | 3 | 4 | 8) && *r < 16
        }
        Op::Lmsw { src } => opnd_ok(src, b64, false),
        Op::Invlpg { addr } => mem_ok(addr, b64),
        _ => true,
    }
}

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
    // Cheap structural checks; the full `validate` runs once when a cluster is
    // loaded. Everything else the run uses is checked where it is used.
    let n = cluster.insns.len();
    if n == 0 {
        return nothing(StopReason::Invalid(Invalid::Empty), 0);
    }
    if cluster.end <= cluster.start || cluster.end - cluster.start > MAX_CLUSTER_BYTES {
        return nothing(StopReason::Invalid(Invalid::TooLarge), 0);
    }
    if cluster.guest_bytes.len() as u64 != cluster.end - cluster.start {
        return nothing(StopReason::Invalid(Invalid::BytesLength), 0);
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
}

type R<T> = Result<T, StopReason>;

/// A translated guest access: `len0` bytes at `p0`, the rest at `p1`.
#[derive(Clone, Copy)]
struct Span {
    p0: u64,
    len0: u32,
    p1: u64,
    size: u32,
}

#[derive(Clone, Copy)]
enum Loc {
    Reg(RegRef),
    Mem(Span),
}

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
}

fn xerr(e: XlateError) -> StopReason {
    match e {
        XlateError::PageFault { addr, error_code } => StopReason::PageFault { addr, error_code },
        XlateError::NotRam { gpa } => StopReason::NotRam { gpa },
        XlateError::Unsupported => StopReason::Unsupported,
    }
}

const GP: StopReason = StopReason::Fault(Fault::GeneralProtection);
const UD: StopReason = StopReason::Fault(Fault::InvalidOpcode);

impl<G: Guest + ?Sized> Engine<'_, G> {
    // ---- the run loop -----------------------------------------------------------

    fn run_from(&mut self, start: usize) -> (StopReason, u64, Option<usize>) {
        let c = self.c;
        let n = c.insns.len();
        let mut idx = start;
        loop {
            let Some(insn) = c.insns.get(idx) else {
                return (StopReason::Invalid(Invalid::StartIndex), self.st.rip, None);
            };
            if insn.rip < c.start
                || insn.rip.saturating_add(insn.len as u64) > c.end
                || insn.len == 0
            {
                // Only instructions inside the checked bytes ever run. Control
                // reached this instruction's claimed address: resume there.
                return (
                    StopReason::Invalid(Invalid::InsnPlacement(idx as u16)),
                    insn.rip,
                    None,
                );
            }
            if self.units == 0 {
                return (StopReason::Budget, insn.rip, Some(idx));
            }
            let flow = if self.exec_fast(&insn.op) {
                Flow::Next
            } else {
                match self.exec(insn) {
                    Ok(f) => f,
                    Err(r) => return (r, insn.rip, Some(idx)),
                }
            };
            self.units -= 1;
            self.stats.insns += 1;
            if let Some(cl) = insn.exit_class {
                self.stats.exiting += 1;
                if let Some(s) = self.stats.by_class.get_mut(cl as usize) {
                    *s += 1;
                }
            }
            let next_rip = insn.rip + insn.len as u64;
            let next = match flow {
                Flow::Next => {
                    if idx + 1 < n && c.insns[idx + 1].rip == next_rip {
                        idx + 1
                    } else if self.code_written {
                        return (StopReason::SelfWrite, next_rip, None);
                    } else {
                        return (StopReason::End, next_rip, None);
                    }
                }
                Flow::Exit(rip) => return (StopReason::ExitBranch, rip, None),
                Flow::StopAfter(r) => {
                    let at = (idx + 1 < n && c.insns[idx + 1].rip == next_rip).then_some(idx + 1);
                    return (r, next_rip, at);
                }
                Flow::Jump(t) => {
                    let t = t as usize;
                    let Some(tgt) = c.insns.get(t) else {
                        return (
                            StopReason::Invalid(Invalid::Target(idx as u16)),
                            insn.rip,
                            Some(idx),
                        );
                    };
                    if t <= idx {
                        self.stats.back_edges += 1;
                        let slot = c.back_edges.iter().position(|b| b.insn as usize == idx);
                        let capped = match slot {
                            Some(k) => {
                                let cnt = &mut self.be_counts[k % MAX_BACK_EDGES];
                                *cnt += 1;
                                matches!(c.back_edges[k].cap, Some(cap) if *cnt > cap as u32)
                            }
                            None => true,
                        };
                        if capped {
                            return (StopReason::BackEdgeCap, tgt.rip, Some(t));
                        }
                        if self.g.interrupt_pending() {
                            return (StopReason::InterruptPending, tgt.rip, Some(t));
                        }
                    }
                    t
                }
            };
            if self.code_written {
                let rip = c.insns[next].rip;
                return (StopReason::SelfWrite, rip, Some(next));
            }
            idx = next;
        }
    }

    /// Compares the guest's code with the cluster's bytes, recording the code pages.
    fn check_code(&mut self) -> R<()> {
        let c = self.c;
        let cs = self.st.seg[Seg::Cs as usize];
        if !self.b64 && (c.end - 1 > cs.limit as u64 || cs.attrs & (1 << 16) != 0) {
            return Err(StopReason::CodeUnreadable);
        }
        let base = if self.b64 { 0 } else { cs.base };
        let mut off = 0usize;
        let mut page = 0;
        let mut buf = [0u8; 256];
        while off < c.guest_bytes.len() {
            let mut la = base.wrapping_add(c.start).wrapping_add(off as u64);
            if !self.b64 {
                la &= 0xffff_ffff;
            } else if !canonical(la) {
                return Err(StopReason::CodeUnreadable);
            }
            let gpa = self
                .mmu
                .translate(self.g, la, Access::Fetch, &mut self.stats.page_walks)
                .map_err(|_| StopReason::CodeUnreadable)?;
            let in_page = (4096 - (la & 0xfff)) as usize;
            let chunk = in_page.min(c.guest_bytes.len() - off);
            if page < MAX_CODE_PAGES {
                self.code_pages[page] = gpa >> 12;
                page += 1;
            }
            let mut done = 0;
            while done < chunk {
                let k = (chunk - done).min(buf.len());
                self.g
                    .read_phys(gpa + done as u64, &mut buf[..k])
                    .map_err(|_| StopReason::CodeUnreadable)?;
                if buf[..k] != c.guest_bytes[off + done..off + done + k] {
                    return Err(StopReason::CodeChanged);
                }
                done += k;
            }
            off += chunk;
        }
        Ok(())
    }

    // ---- registers ----------------------------------------------------------------

    #[inline(always)]
    fn reg(&self, r: RegRef) -> u64 {
        if r.high8 {
            (self.st.gpr[(r.index & 3) as usize] >> 8) & 0xff
        } else {
            self.st.gpr[(r.index & 15) as usize] & r.size.mask()
        }
    }

    #[inline(always)]
    fn set_reg(&mut self, r: RegRef, v: u64) {
        if r.high8 {
            let g = &mut self.st.gpr[(r.index & 3) as usize];
            *g = (*g & !0xff00) | ((v & 0xff) << 8);
        } else {
            write_gpr(&mut self.st.gpr[(r.index & 15) as usize], r.size, v);
        }
    }

    #[inline(always)]
    fn gpr(&self, i: u8) -> u64 {
        self.st.gpr[(i & 15) as usize]
    }

    // ---- memory --------------------------------------------------------------------

    /// Effective address (no segment base), plus `extra`, truncated to the address size.
    #[inline(always)]
    fn ea(&self, m: &MemRef, extra: u64) -> u64 {
        let mut a = m.disp as u64;
        if let Some(b) = m.base {
            a = a.wrapping_add(self.gpr(b));
        }
        if let Some(x) = m.index {
            a = a.wrapping_add(self.gpr(x).wrapping_mul(m.scale as u64));
        }
        a.wrapping_add(extra) & m.addr_size.mask()
    }

    /// Linear address of an access of `size` bytes at `seg:off`, with segment checks.
    #[inline(always)]
    fn seg_linear(&self, seg: Seg, off: u64, size: u32, write: bool) -> R<u64> {
        let s = &self.st.seg[seg as usize];
        if self.b64 {
            let base = if matches!(seg, Seg::Fs | Seg::Gs) {
                s.base
            } else {
                0
            };
            let la = base.wrapping_add(off);
            if !canonical(la) || !canonical(la.wrapping_add(size as u64 - 1)) {
                return Err(GP);
            }
            return Ok(la);
        }
        if s.attrs & (1 << 16) != 0 {
            return Err(GP);
        }
        let ty = s.attrs & 0xf;
        if self.st.cr0 & CR0_PE != 0 {
            // Code: readable (bit 1), never writable. Data: writable (bit 1).
            let allowed = if ty & 8 != 0 {
                !write && ty & 2 != 0
            } else {
                !write || ty & 2 != 0
            };
            if !allowed {
                return Err(GP);
            }
        }
        let last = off.saturating_add(size as u64 - 1);
        let limit = s.limit as u64;
        let expand_down = ty & 0xc == 0x4;
        let ok = if expand_down {
            let top = if s.db() { 0xffff_ffff } else { 0xffff };
            off > limit && last <= top
        } else {
            last <= limit
        };
        if !ok {
            return Err(GP);
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    #[inline(always)]
    fn xlate(&mut self, la: u64, size: u32, access: Access) -> R<Span> {
        self.stats.mem_accesses += 1;
        let p0 = self
            .mmu
            .translate(self.g, la, access, &mut self.stats.page_walks)
            .map_err(xerr)?;
        let in_page = 4096 - (la & 0xfff) as u32;
        if size <= in_page {
            return Ok(Span {
                p0,
                len0: size,
                p1: 0,
                size,
            });
        }
        let la1 = if self.b64 {
            la.wrapping_add(in_page as u64)
        } else {
            la.wrapping_add(in_page as u64) & 0xffff_ffff
        };
        let p1 = self
            .mmu
            .translate(self.g, la1, access, &mut self.stats.page_walks)
            .map_err(xerr)?;
        Ok(Span {
            p0,
            len0: in_page,
            p1,
            size,
        })
    }

    #[inline(always)]
    fn mem_span(&mut self, m: &MemRef, size: Size, extra: u64, access: Access) -> R<Span> {
        let off = self.ea(m, extra);
        let la = self.seg_linear(m.seg, off, size.bytes(), access == Access::Write)?;
        self.xlate(la, size.bytes(), access)
    }

    #[inline(always)]
    fn read_span(&mut self, s: Span) -> R<u64> {
        let mut b = [0u8; 8];
        let size = (s.size as usize).min(8);
        let l0 = (s.len0 as usize).min(size);
        self.g
            .read_phys(s.p0, &mut b[..l0])
            .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        if l0 < size {
            self.g
                .read_phys(s.p1, &mut b[l0..size])
                .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        }
        Ok(u64::from_le_bytes(b))
    }

    /// Checks that a write to `s` can complete (so a split write is never half done).
    #[inline(always)]
    fn probe_write(&mut self, s: Span) -> R<()> {
        let mut b = [0u8; 1];
        if s.len0 < s.size {
            self.g
                .read_phys(s.p1, &mut b)
                .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        }
        Ok(())
    }

    #[inline(always)]
    fn write_span(&mut self, s: Span, v: u64) -> R<()> {
        let b = v.to_le_bytes();
        let size = (s.size as usize).min(8);
        let l0 = (s.len0 as usize).min(size);
        self.probe_write(s)?;
        self.g
            .write_phys(s.p0, &b[..l0])
            .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        self.note_write(s.p0);
        if l0 < size {
            self.g
                .write_phys(s.p1, &b[l0..size])
                .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
            self.note_write(s.p1);
        }
        Ok(())
    }

    #[inline(always)]
    fn note_write(&mut self, gpa: u64) {
        let p = gpa >> 12;
        if self.code_pages.contains(&p) {
            self.code_written = true;
        }
    }

    #[inline(always)]
    fn read(&mut self, o: &Operand, size: Size) -> R<u64> {
        match o {
            Operand::Reg(r) => Ok(self.reg(*r) & size.mask()),
            Operand::Imm(v) => Ok(*v & size.mask()),
            Operand::Mem(m) => self.read_mem(m, size),
        }
    }

    #[inline(never)]
    fn read_mem(&mut self, m: &MemRef, size: Size) -> R<u64> {
        let s = self.mem_span(m, size, 0, Access::Read)?;
        self.read_span(s)
    }

    /// Resolves a destination (for memory: translated for writing).
    #[inline(always)]
    fn dst(&mut self, o: &Operand, size: Size, extra: u64) -> R<Loc> {
        match o {
            Operand::Reg(r) => Ok(Loc::Reg(*r)),
            Operand::Mem(m) => Ok(Loc::Mem(self.mem_span(m, size, extra, Access::Write)?)),
            Operand::Imm(_) => Err(StopReason::Invalid(Invalid::Operand(0))),
        }
    }

    #[inline(always)]
    fn load(&mut self, l: Loc, size: Size) -> R<u64> {
        match l {
            Loc::Reg(r) => Ok(self.reg(r) & size.mask()),
            Loc::Mem(s) => self.read_span(s),
        }
    }

    #[inline(always)]
    fn store(&mut self, l: Loc, v: u64) -> R<()> {
        match l {
            Loc::Reg(r) => {
                self.set_reg(r, v);
                Ok(())
            }
            Loc::Mem(s) => self.write_span(s, v),
        }
    }

    // ---- stack ----------------------------------------------------------------------

    fn stack_size(&self) -> Size {
        if self.b64 {
            Size::S8
        } else if self.st.seg[Seg::Ss as usize].db() {
            Size::S4
        } else {
            Size::S2
        }
    }

    // ---- privilege ------------------------------------------------------------------

    fn cpl0(&self) -> R<()> {
        if self.st.cpl() == 0 {
            Ok(())
        } else {
            Err(GP)
        }
    }

    fn io_allowed(&self) -> R<()> {
        let iopl = ((self.st.rflags >> 12) & 3) as u8;
        if self.st.cr0 & CR0_PE != 0 && self.st.cpl() > iopl {
            // Allowed or not by the TSS I/O permission bitmap: let the CPU decide.
            return Err(StopReason::Unsupported);
        }
        Ok(())
    }

    fn set_flags(&mut self, f: u64) {
        self.st.rflags = f;
    }

    fn target(t: Target) -> Flow {
        match t {
            Target::Insn(i) => Flow::Jump(i),
            Target::Exit(r) => Flow::Exit(r),
        }
    }

    /// A branch target outside the cluster stops before the branch (nothing done).
    fn check_target(&self, t: Target) -> R<()> {
        match t {
            Target::Insn(i) if i as usize >= self.c.insns.len() => {
                Err(StopReason::Invalid(Invalid::Target(i)))
            }
            _ => Ok(()),
        }
    }

    // ---- one instruction ------------------------------------------------------------

    /// Register/immediate-only forms of the commonest gap fillers, inlined into the
    /// run loop. Returns false (having done nothing) for anything else.
    #[inline(always)]
    fn exec_fast(&mut self, op: &Op) -> bool {
        let fl = self.st.rflags;
        match *op {
            Op::Mov {
                size,
                dst: Operand::Reg(d),
                ref src,
            } => {
                let v = match *src {
                    Operand::Reg(r) => self.reg(r),
                    Operand::Imm(i) => i,
                    Operand::Mem(_) => return false,
                };
                self.set_reg(d, v & size.mask());
            }
            Op::Alu {
                op,
                size,
                dst: Operand::Reg(d),
                ref src,
            } => {
                let b = match *src {
                    Operand::Reg(r) => self.reg(r),
                    Operand::Imm(i) => i,
                    Operand::Mem(_) => return false,
                };
                let (res, f) = alu::alu(op, size, self.reg(d), b, fl);
                if !matches!(op, AluOp::Cmp | AluOp::Test) {
                    self.set_reg(d, res);
                }
                self.st.rflags = f;
            }
            Op::Lea { dst, ref addr } => {
                let v = self.ea(addr, 0);
                self.set_reg(dst, v);
            }
            _ => return false,
        }
        true
    }

    fn exec(&mut self, insn: &Insn) -> R<Flow> {
        let fl = self.st.rflags;
        match insn.op {
            Op::Mov {
                size,
                ref dst,
                ref src,
            } => {
                let v = self.read(src, size)?;
                if let Operand::Reg(r) = *dst {
                    self.set_reg(r, v);
                } else {
                    let d = self.dst(dst, size, 0)?;
                    self.store(d, v)?;
                }
            }
            Op::Movzx {
                dst,
                ref src,
                src_size,
            } => {
                let v = self.read(src, src_size)?;
                self.set_reg(dst, v);
            }
            Op::Movsx {
                dst,
                ref src,
                src_size,
            } => {
                let v = self.read(src, src_size)?;
                self.set_reg(dst, sext(v, src_size));
            }
            Op::Lea { dst, addr } => {
                let v = self.ea(&addr, 0);
                self.set_reg(dst, v);
            }
            Op::Alu {
                op,
                size,
                ref dst,
                ref src,
            } => {
                let b = self.read(src, size)?;
                let flags_only = matches!(op, AluOp::Cmp | AluOp::Test);
                if let Operand::Reg(r) = *dst {
                    let (res, f) = alu::alu(op, size, self.reg(r), b, fl);
                    if !flags_only {
                        self.set_reg(r, res);
                    }
                    self.st.rflags = f;
                    return Ok(Flow::Next);
                }
                let d = if flags_only {
                    None
                } else {
                    Some(self.dst(dst, size, 0)?)
                };
                let a = match d {
                    Some(l) => self.load(l, size)?,
                    None => self.read(dst, size)?,
                };
                let (r, f) = alu::alu(op, size, a, b, fl);
                if let Some(l) = d {
                    self.store(l, r)?;
                }
                self.set_flags(f);
            }
            Op::Unary { op, size, ref dst } => {
                if let Operand::Reg(r) = *dst {
                    let (res, f) = alu::unary(op, size, self.reg(r), fl);
                    self.set_reg(r, res);
                    self.st.rflags = f;
                    return Ok(Flow::Next);
                }
                let d = self.dst(dst, size, 0)?;
                let a = self.load(d, size)?;
                let (r, f) = alu::unary(op, size, a, fl);
                self.store(d, r)?;
                self.set_flags(f);
            }
            Op::Shift {
                op,
                size,
                ref dst,
                ref count,
            } => {
                let cnt = self.read(count, Size::S1)?;
                if let Operand::Reg(r) = *dst {
                    let v = self.reg(r);
                    let (res, f) = if matches!(count, Operand::Imm(_)) {
                        alu::shift_reg_imm(op, size, v, cnt, fl)
                    } else {
                        alu::shift(op, size, v, cnt, fl)
                    };
                    self.set_reg(r, res);
                    self.st.rflags = f;
                    return Ok(Flow::Next);
                }
                let d = self.dst(dst, size, 0)?;
                let a = self.load(d, size)?;
                let (r, f) = alu::shift(op, size, a, cnt, fl);
                self.store(d, r)?;
                self.set_flags(f);
            }
            Op::Bit {
                op,
                size,
                ref dst,
                ref bit,
            } => self.bit(op, size, dst, bit)?,
            Op::Xchg { size, ref a, ref b } => {
                // Memory first so a fault leaves everything undone.
                let (la, lb) = match (a, b) {
                    (Operand::Mem(_), _) => {
                        let la = self.dst(a, size, 0)?;
                        (la, self.dst(b, size, 0)?)
                    }
                    _ => {
                        let lb = self.dst(b, size, 0)?;
                        (self.dst(a, size, 0)?, lb)
                    }
                };
                let va = self.load(la, size)?;
                let vb = self.load(lb, size)?;
                if let Loc::Mem(_) = la {
                    self.store(la, vb)?;
                    self.store(lb, va)?;
                } else {
                    self.store(lb, va)?;
                    self.store(la, vb)?;
                }
            }
            Op::Push { size, ref src } => {
                let v = self.read(src, size)?;
                let ss = self.stack_size();
                let sp = self.st.gpr[RSP as usize].wrapping_sub(size.bytes() as u64) & ss.mask();
                let la = self.seg_linear(Seg::Ss, sp, size.bytes(), true)?;
                let s = self.xlate(la, size.bytes(), Access::Write)?;
                self.write_span(s, v)?;
                write_gpr(&mut self.st.gpr[RSP as usize], ss, sp);
            }
            Op::Pop { size, ref dst } => {
                let ss = self.stack_size();
                let sp = self.st.gpr[RSP as usize] & ss.mask();
                let la = self.seg_linear(Seg::Ss, sp, size.bytes(), false)?;
                let s = self.xlate(la, size.bytes(), Access::Read)?;
                let new_sp = sp.wrapping_add(size.bytes() as u64) & ss.mask();
                let mut rsp = self.st.gpr[RSP as usize];
                write_gpr(&mut rsp, ss, new_sp);
                match dst {
                    Operand::Mem(_) => {
                        // The destination address uses the incremented stack pointer.
                        let old = core::mem::replace(&mut self.st.gpr[RSP as usize], rsp);
                        let d = self.dst(dst, size, 0);
                        self.st.gpr[RSP as usize] = old;
                        let d = d?;
                        let v = self.read_span(s)?;
                        self.store(d, v)?;
                        self.st.gpr[RSP as usize] = rsp;
                    }
                    Operand::Reg(r) => {
                        let v = self.read_span(s)?;
                        self.st.gpr[RSP as usize] = rsp;
                        self.set_reg(*r, v);
                    }
                    Operand::Imm(_) => return Err(StopReason::Invalid(Invalid::Operand(0))),
                }
            }
            Op::Setcc { cond: c, ref dst } => {
                let d = self.dst(dst, Size::S1, 0)?;
                self.store(d, alu::cond(c, fl) as u64)?;
            }
            Op::Cmovcc {
                cond: c,
                size,
                dst,
                ref src,
            } => {
                let v = self.read(src, size)?;
                let v = if alu::cond(c, fl) { v } else { self.reg(dst) };
                self.set_reg(dst, v);
            }
            Op::Imul {
                size,
                dst,
                ref src,
                factor,
            } => {
                let s = self.read(src, size)?;
                let (a, b) = match factor {
                    Some(imm) => (s, imm),
                    None => (self.reg(dst), s),
                };
                let (r, f) = alu::imul(size, a, b, self.st.rflags);
                self.set_reg(dst, r);
                self.st.rflags = f;
            }
            Op::SignExtendAcc { size } => {
                let half = match size {
                    Size::S8 => Size::S4,
                    Size::S4 => Size::S2,
                    _ => Size::S1,
                };
                let v = sext(self.st.gpr[0], half);
                write_gpr(&mut self.st.gpr[0], size, v);
            }
            Op::SignExtendAccToDx { size } => {
                let neg = (self.st.gpr[0] >> (size.bits() - 1)) & 1 != 0;
                write_gpr(
                    &mut self.st.gpr[RDX as usize],
                    size,
                    if neg { u64::MAX } else { 0 },
                );
            }
            Op::Clc => self.st.rflags &= !CF,
            Op::Stc => self.st.rflags |= CF,
            Op::Cmc => self.st.rflags ^= CF,
            Op::Cld => self.st.rflags &= !DF,
            Op::Std => self.st.rflags |= DF,
            Op::Nop | Op::Pause => {}
            Op::Jmp { target } => {
                self.check_target(target)?;
                return Ok(Self::target(target));
            }
            Op::Jcc { cond: c, target } => {
                self.check_target(target)?;
                if alu::cond(c, fl) {
                    return Ok(Self::target(target));
                }
            }
            Op::Loop {
                kind,
                addr_size,
                target,
            } => {
                self.check_target(target)?;
                let rcx = self.st.gpr[RCX as usize] & addr_size.mask();
                let zf = fl & ZF != 0;
                let taken = if kind == LoopKind::Jcxz {
                    rcx == 0
                } else {
                    let n = rcx.wrapping_sub(1) & addr_size.mask();
                    write_gpr(&mut self.st.gpr[RCX as usize], addr_size, n);
                    n != 0
                        && match kind {
                            LoopKind::Loope => zf,
                            LoopKind::Loopne => !zf,
                            _ => true,
                        }
                };
                if taken {
                    return Ok(Self::target(target));
                }
            }
            // ---- exiting instructions ----
            Op::In { size, port } => {
                self.io_allowed()?;
                let p = self.port(port);
                let v = self.g.port_in(p, size.bytes() as u8) as u64;
                write_gpr(&mut self.st.gpr[0], size, v);
            }
            Op::Out { size, port } => {
                self.io_allowed()?;
                let p = self.port(port);
                let v = self.st.gpr[0] & size.mask();
                self.g.port_out(p, size.bytes() as u8, v as u32);
                if self.g.stop_requested() {
                    return Ok(Flow::StopAfter(StopReason::StopRequested));
                }
            }
            Op::Ins {
                size,
                addr_size,
                rep,
            } => return self.string_io(true, size, addr_size, rep, Seg::Es),
            Op::Outs {
                size,
                addr_size,
                rep,
                seg,
            } => {
                let f = self.string_io(false, size, addr_size, rep, seg)?;
                if self.g.stop_requested() {
                    return Ok(Flow::StopAfter(StopReason::StopRequested));
                }
                return Ok(f);
            }
            Op::Rdmsr => {
                self.cpl0()?;
                let msr = self.st.gpr[RCX as usize] as u32;
                let v = match msr {
                    MSR_EFER => self.st.efer,
                    MSR_FS_BASE => self.st.seg[Seg::Fs as usize].base,
                    MSR_GS_BASE => self.st.seg[Seg::Gs as usize].base,
                    _ => self.g.rdmsr(msr).map_err(StopReason::Fault)?,
                };
                self.st.gpr[0] = v & 0xffff_ffff;
                self.st.gpr[RDX as usize] = v >> 32;
            }
            Op::Wrmsr => {
                self.cpl0()?;
                let msr = self.st.gpr[RCX as usize] as u32;
                let v = (self.st.gpr[0] & 0xffff_ffff) | (self.st.gpr[RDX as usize] << 32);
                match msr {
                    // EFER changes the paging mode and NX: leave it to the CPU.
                    MSR_EFER => return Err(StopReason::Unsupported),
                    _ => {
                        if cr::LINEAR_ADDRESS_MSRS.contains(&msr) {
                            let caps = self.caps();
                            cr::check_wrmsr(msr, v, &caps).map_err(StopReason::Fault)?;
                        }
                        self.g.wrmsr(msr, v).map_err(StopReason::Fault)?;
                        match msr {
                            MSR_FS_BASE => self.st.seg[Seg::Fs as usize].base = v,
                            MSR_GS_BASE => self.st.seg[Seg::Gs as usize].base = v,
                            _ => {}
                        }
                    }
                }
            }
            Op::Cpuid => {
                let r = self
                    .g
                    .cpuid(self.st.gpr[0] as u32, self.st.gpr[RCX as usize] as u32);
                self.st.gpr[0] = r[0] as u64;
                self.st.gpr[RBX as usize] = r[1] as u64;
                self.st.gpr[RCX as usize] = r[2] as u64;
                self.st.gpr[RDX as usize] = r[3] as u64;
            }
            Op::MovToCr { cr, src } => return self.mov_to_cr(cr, src),
            Op::MovFromCr { cr, dst } => {
                self.cpl0()?;
                let v = match cr {
                    0 => self.st.cr0,
                    2 => self.st.cr2,
                    3 => self.st.cr3,
                    4 => self.st.cr4,
                    8 if self.b64 => self.st.cr8,
                    _ => return Err(UD),
                };
                let sz = if self.b64 { Size::S8 } else { Size::S4 };
                write_gpr(&mut self.st.gpr[(dst & 15) as usize], sz, v);
            }
            Op::Clts => {
                self.cpl0()?;
                self.st.cr0 &= !CR0_TS;
            }
            Op::Lmsw { ref src } => {
                self.cpl0()?;
                let v = self.read(src, Size::S2)?;
                let old = self.st.cr0;
                let new = (old & !0xe) | (v & 0xf) | (old & 1);
                self.st.cr0 = new;
                if new & CR0_PE != old & CR0_PE {
                    self.refresh_mmu();
                    return Ok(Flow::StopAfter(StopReason::ModeChange));
                }
            }
            Op::Rdtsc | Op::Rdtscp => {
                if self.st.cr4 & CR4_TSD != 0 && self.st.cpl() != 0 {
                    return Err(GP);
                }
                let t = self.g.tsc();
                if matches!(insn.op, Op::Rdtscp) {
                    let aux = self.g.tsc_aux();
                    self.st.gpr[RCX as usize] = aux & 0xffff_ffff;
                }
                self.st.gpr[0] = t & 0xffff_ffff;
                self.st.gpr[RDX as usize] = t >> 32;
            }
            Op::Rdpmc => return Err(StopReason::Unsupported),
            Op::Xgetbv => {
                if self.st.cr4 & CR4_OSXSAVE == 0 {
                    return Err(UD);
                }
                let v = self
                    .g
                    .xgetbv(self.st.gpr[RCX as usize] as u32)
                    .map_err(StopReason::Fault)?;
                self.st.gpr[0] = v & 0xffff_ffff;
                self.st.gpr[RDX as usize] = v >> 32;
            }
            Op::Xsetbv => {
                if self.st.cr4 & CR4_OSXSAVE == 0 {
                    return Err(UD);
                }
                self.cpl0()?;
                let v = (self.st.gpr[0] & 0xffff_ffff) | (self.st.gpr[RDX as usize] << 32);
                self.g
                    .xsetbv(self.st.gpr[RCX as usize] as u32, v)
                    .map_err(StopReason::Fault)?;
            }
            Op::Wbinvd | Op::Invd => self.cpl0()?,
            Op::Invlpg { .. } => {
                self.cpl0()?;
                self.g.invalidate_tlb();
            }
            Op::Hlt => {
                self.cpl0()?;
                return Err(StopReason::Hlt);
            }
        }
        Ok(Flow::Next)
    }

    fn port(&self, p: PortSrc) -> u16 {
        match p {
            PortSrc::Imm(i) => i as u16,
            PortSrc::Dx => self.st.gpr[RDX as usize] as u16,
        }
    }

    fn refresh_mmu(&mut self) {
        self.mmu = Mmu::new(&self.st, self.limits.maxphyaddr);
    }

    fn bit(&mut self, op: BitOp, size: Size, dst: &Operand, bit: &Operand) -> R<()> {
        let bits = size.bits() as u64;
        let (off, extra) = match bit {
            Operand::Imm(v) => (*v & (bits - 1), 0),
            Operand::Reg(r) => {
                let raw = self.reg(*r) & size.mask();
                match dst {
                    Operand::Mem(_) => {
                        let s = sext(raw, size) as i64;
                        let words = s >> size.bits().trailing_zeros();
                        (
                            raw & (bits - 1),
                            (words as u64).wrapping_mul(size.bytes() as u64),
                        )
                    }
                    _ => (raw & (bits - 1), 0),
                }
            }
            Operand::Mem(_) => return Err(StopReason::Invalid(Invalid::Operand(0))),
        };
        let access = if op == BitOp::Bt {
            Access::Read
        } else {
            Access::Write
        };
        let loc = match dst {
            Operand::Reg(r) => Loc::Reg(*r),
            Operand::Mem(m) => Loc::Mem(self.mem_span(m, size, extra, access)?),
            Operand::Imm(_) => return Err(StopReason::Invalid(Invalid::Operand(0))),
        };
        let v = self.load(loc, size)?;
        let cf = (v >> off) & 1;
        let nv = match op {
            BitOp::Bt => v,
            BitOp::Bts => v | (1 << off),
            BitOp::Btr => v & !(1 << off),
            BitOp::Btc => v ^ (1 << off),
        };
        if op != BitOp::Bt {
            self.store(loc, nv)?;
        }
        self.st.rflags = (self.st.rflags & !CF) | cf;
        Ok(())
    }

    fn string_io(
        &mut self,
        input: bool,
        size: Size,
        addr_size: Size,
        rep: bool,
        seg: Seg,
    ) -> R<Flow> {
        self.io_allowed()?;
        let port = self.st.gpr[RDX as usize] as u16;
        let am = addr_size.mask();
        let idx_reg = if input { RDI } else { RSI } as usize;
        let step = size.bytes() as u64;
        let mut first = true;
        loop {
            if rep && self.st.gpr[RCX as usize] & am == 0 {
                return Ok(Flow::Next);
            }
            if !first {
                // Between iterations: the instruction is interruptible here.
                if self.units <= 1 {
                    return Err(StopReason::Budget);
                }
                if self.code_written {
                    return Err(StopReason::SelfWrite);
                }
                if !input && self.g.stop_requested() {
                    return Err(StopReason::StopRequested);
                }
                self.units -= 1;
            }
            first = false;
            let off = self.st.gpr[idx_reg] & am;
            let la = self.seg_linear(seg, off, size.bytes(), input)?;
            if input {
                let s = self.xlate(la, size.bytes(), Access::Write)?;
                // Make sure the whole element can be written before consuming input.
                let mut b = [0u8; 1];
                self.g
                    .read_phys(s.p0, &mut b)
                    .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
                self.probe_write(s)?;
                let v = self.g.port_in(port, size.bytes() as u8) as u64;
                self.write_span(s, v)?;
            } else {
                let s = self.xlate(la, size.bytes(), Access::Read)?;
                let v = self.read_span(s)?;
                self.g.port_out(port, size.bytes() as u8, v as u32);
            }
            self.stats.rep_iterations += 1;
            let ni = if self.st.rflags & DF != 0 {
                off.wrapping_sub(step)
            } else {
                off.wrapping_add(step)
            };
            write_gpr(&mut self.st.gpr[idx_reg], addr_size, ni & am);
            if !rep {
                return Ok(Flow::Next);
            }
            let cnt = self.st.gpr[RCX as usize].wrapping_sub(1) & am;
            write_gpr(&mut self.st.gpr[RCX as usize], addr_size, cnt);
        }
    }

    /// The vCPU's features, read from the guest once per run, when first needed.
    fn caps(&mut self) -> CpuCaps {
        match self.caps {
            Some(c) => c,
            None => {
                let c = self.g.cpu_caps();
                self.caps = Some(c);
                c
            }
        }
    }

    fn mov_to_cr(&mut self, cr: CrIndex, src: GprIndex) -> R<Flow> {
        self.cpl0()?;
        let mut v = self.gpr(src);
        if !self.b64 {
            v &= 0xffff_ffff;
        }
        if cr == 8 && !self.b64 {
            return Err(UD);
        }
        // Only the CR3 and CR4 rules depend on features: CR0/CR8 writes (TPR
        // updates are frequent) do not ask the guest for them.
        let caps = if matches!(cr, 3 | 4) {
            self.caps()
        } else {
            CpuCaps::default()
        };
        cr::check_write(cr, v, &self.st, &caps).map_err(StopReason::Fault)?;
        let before = self.st.clone();
        let lma = self.st.efer & EFER_LMA != 0;
        // What the write does beyond the register (the CPU's checks passed); guest
        // side effects (TLB flush, interrupt check) only once nothing can fault.
        let mut stop = None;
        let mut flush = false;
        match cr {
            0 => {
                let old = self.st.cr0;
                let v = v | CR0_ET; // ET is hardwired.
                let pg_on = v & CR0_PG != 0 && old & CR0_PG == 0;
                if lma && v & CR0_PG == 0 {
                    // Leaving long mode (from compatibility mode): let the CPU do it.
                    return Err(StopReason::Unsupported);
                }
                self.st.cr0 = v;
                if pg_on && self.st.efer & EFER_LME != 0 {
                    self.st.efer |= EFER_LMA;
                }
                let changed = old ^ v;
                flush = changed & (CR0_PG | CR0_WP | CR0_CD) != 0;
                if changed & (CR0_PG | CR0_PE) != 0 {
                    stop = Some(StopReason::ModeChange);
                }
            }
            2 => self.st.cr2 = v,
            3 => {
                let pcide = self.st.cr4 & CR4_PCIDE != 0;
                flush = !(pcide && v & cr::CR3_NOFLUSH != 0);
                self.st.cr3 = if pcide { v & !cr::CR3_NOFLUSH } else { v };
            }
            4 => {
                // Bits the engine does not model (CET changes CALL/RET, LAM and
                // FRED change addressing and events): the CPU runs the write.
                const MODELLED: u64 = (1 << 23) - 1;
                let old = self.st.cr4;
                if (v ^ old) & !MODELLED != 0 {
                    return Err(StopReason::Unsupported);
                }
                self.st.cr4 = v;
                const PAGING: u64 = CR4_PSE
                    | CR4_PAE
                    | CR4_PGE
                    | CR4_LA57
                    | CR4_PCIDE
                    | CR4_SMEP
                    | CR4_SMAP
                    | CR4_PKE;
                if (old ^ v) & PAGING != 0 {
                    flush = true;
                    stop = Some(StopReason::ModeChange);
                }
            }
            8 => self.st.cr8 = v,
            _ => return Err(UD),
        }
        if cr::loads_pdptes(cr, &before, &self.st) {
            let caps = self.caps();
            match cr::load_pdptes(self.g, self.st.cr3, &caps) {
                Ok(p) => self.st.pdpte = Some(p),
                Err(e) => {
                    // The instruction faults (or cannot be done here): undo it.
                    self.st = before;
                    return Err(match e {
                        cr::PdpteError::Fault(f) => StopReason::Fault(f),
                        cr::PdpteError::NotRam { gpa } => StopReason::NotRam { gpa },
                    });
                }
            }
            // New PDPTE registers: end the run right after, so a backend that
            // reloads them from memory at CR3 still gets what was loaded.
            stop = stop.or(Some(StopReason::ModeChange));
        }
        if flush {
            self.g.invalidate_tlb();
        }
        if cr == 8 && self.st.cr8 < before.cr8 && self.g.interrupt_pending() {
            stop = Some(StopReason::InterruptPending);
        }
        self.refresh_mmu();
        if let Some(r) = stop {
            return Ok(Flow::StopAfter(r));
        }
        if cr == 3 && self.mmu.paging != Paging::None {
            // The code must still be the cluster's under the new tables.
            self.code_pages = [u64::MAX; MAX_CODE_PAGES];
            if let Err(r) = self.check_code() {
                let r = if r == StopReason::CodeUnreadable {
                    StopReason::CodeChanged
                } else {
                    r
                };
                return Ok(Flow::StopAfter(r));
            }
        }
        Ok(Flow::Next)
    }
}

use cr::{MSR_EFER, MSR_FS_BASE, MSR_GS_BASE};

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
    ((a as i64) << 16 >> 16) as u64 == a
}
