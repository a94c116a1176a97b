//! Cluster formation: from the guest code at an exiting instruction to a translated
//! [`Cluster`], a region of the guest's control-flow graph (Agesen et al., USENIX
//! ATC 2012, section 5, with their window and gap rules applied per path;
//! DESIGN.md "Cluster rules").
//!
//! One translator, two callers: the AOT pass calls [`translate_region`] at every
//! exit-prone site of a guest ELF with the ELF's code, the hypervisor at the third
//! exit of a RIP its translations do not cover with the guest's memory. Both pass
//! the same [`ExitPolicy`] and [`TranslatorConfig`], so both agree on what a
//! cluster is.
//!
//! The rules:
//! 1. The region starts at `rip`, which must hold a strongly exiting instruction
//!    under the policy that the engine can run.
//! 2. From there it follows every path the code can take, decoding only what
//!    control reaches: both sides of conditional branches and LOOPs, jumps forward
//!    and backward, direct calls into their callees (the call pushes the real
//!    return address; the callee's RET goes on at that address through a guard),
//!    and indirect calls, indirect jumps and RETs of the entry function to the
//!    destinations the [`CodeSource`] knows (seen at run time or resolved from the
//!    ELF), each through a guard. Calls nest at most `max_call_depth` deep, and a
//!    call to a function the region is already inside (recursion) is not followed.
//! 3. Each path obeys the paper's rules: it ends `look_ahead` instructions after
//!    its last exiting instruction, and the gap fillers between two exiting
//!    instructions make at most `max_gap_memory_accesses` memory accesses. A path
//!    also ends *before* an instruction that cannot be decoded or lowered, and
//!    *after* one that ends every cluster (HLT; MOV to CR0/CR4 and LMSW:
//!    translations never span a change of paging mode; MOV to CR3 too if
//!    `end_after_cr3_load` is set). The region's size is bounded by
//!    `max_cluster_insns`, `max_region_bytes` and `max_code_ranges`; a region
//!    that still outgrows what a cluster may record (back-edges, guards, code
//!    ranges: [`limits`]) is formed again with fewer instructions, the most
//!    that fit.
//! 4. What cannot lead to an exiting instruction is dropped: a path's tail after
//!    its last exiting instruction gains nothing. With one exiting instruction and
//!    no loop back to it there is nothing to gain ([`NoCluster`] says why the
//!    paths found no second one).
//! 5. Every edge that leaves the region is an exit with an exact RIP
//!    (`Target::Exit`, a guard's `Target::Exit`, falling off a block, or a guard
//!    miss that stops before the instruction). A branch back to an earlier
//!    instruction of the layout is a back-edge: uncapped only if every way round
//!    passes an exiting instruction ([`loop_qualifies`]), else capped at
//!    `back_edge_cap` takings per run.

use alloc::vec::Vec;
use core::fmt;
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use serde::{Deserialize, Serialize};

use crate::ir::{limits, Bitness, Cluster, Op, Operand};
use crate::lower::lower;
use crate::policy::{ExitClass, ExitPolicy};

mod copies;
mod region;
pub mod source;
mod thunk;
pub use copies::RegCopies;
pub use region::loop_qualifies;
pub use source::{Bytes, CodeSource, Pieces};
pub use thunk::{may_start_thunk, resolve_thunk, THUNK_FIRST_BYTES};

/// The tunable cluster rules. `Default` is the paper's, with the region limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslatorConfig {
    /// How many instructions after an exiting one a path examines for the next
    /// exiting one. Paper: 16.
    pub look_ahead: usize,
    /// The most instructions one region may hold (a block reached in two call
    /// contexts counts twice).
    pub max_cluster_insns: usize,
    /// The most guest code bytes one region may cover (at most
    /// [`limits::MAX_CLUSTER_BYTES`]).
    pub max_region_bytes: usize,
    /// The most separate runs of code one region may cover (at most
    /// [`limits::MAX_CODE_RANGES`]).
    pub max_code_ranges: usize,
    /// How deep calls nest inside one region.
    pub max_call_depth: usize,
    /// The most memory accesses the gap fillers between two consecutive exiting
    /// instructions may make on a path: each needs a software page walk. Paper: 4.
    pub max_gap_memory_accesses: u32,
    /// How often per cluster run a back-edge that is not sure to reach an exiting
    /// instruction may be taken. Paper: 10.
    pub back_edge_cap: u16,
    /// End the cluster right after a MOV to CR3. Off by default: a CR3 load changes
    /// the address space, not the paging mode, and the engine re-checks the cluster's
    /// code bytes under the new tables (stopping if they differ, and after any PAE
    /// PDPTE load). CR0/CR4 writes and LMSW always end the cluster.
    pub end_after_cr3_load: bool,
}

impl Default for TranslatorConfig {
    fn default() -> Self {
        TranslatorConfig {
            look_ahead: 64,
            max_cluster_insns: 1024,
            max_region_bytes: limits::MAX_CLUSTER_BYTES,
            max_code_ranges: limits::MAX_CODE_RANGES,
            max_call_depth: 4,
            max_gap_memory_accesses: 4,
            back_edge_cap: 10,
            end_after_cr3_load: false,
        }
    }
}

/// Why there is no cluster at a RIP. The AOT report counts these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoCluster {
    /// The instruction at `rip` does not exit under the policy.
    NotExiting,
    /// The bytes at `rip` do not decode to a valid instruction (or are cut short).
    Undecodable,
    /// `rip` is beyond what the bitness can address (above 0xffff in 16-bit code,
    /// above 0xffff_ffff in 32-bit code, `u64::MAX` in 64-bit code).
    RipOutOfRange,
    /// The engine cannot run this instruction: the first exiting instruction itself,
    /// or the first blocker before a second exiting instruction.
    Unsupported(Mnemonic),
    /// No path's look-ahead window holds a second exiting instruction, and no loop
    /// brings control back to the first.
    Single,
    /// A gap filler would have exceeded the memory-access limit before a second
    /// exiting instruction.
    GapTooManyMemoryAccesses,
    /// The first instruction ends every cluster (HLT, a paging-mode change).
    EndsCluster,
    /// The code ends before a second exiting instruction (end of section, or the
    /// following bytes do not decode).
    CodeEnds,
    /// An indirect call or jump, or a return from the entry function, whose
    /// destinations are not known yet (the run-time guard learns them).
    IndirectUnknown,
    /// A call nested deeper than `max_call_depth`, or recursion.
    CallDepth,
    /// The region reached its size limits (instructions, bytes, code ranges,
    /// back-edges or guards).
    RegionFull,
}

impl NoCluster {
    /// A short, stable name for reports: the variant's name, without the mnemonic.
    pub fn name(self) -> &'static str {
        match self {
            NoCluster::NotExiting => "not-exiting",
            NoCluster::Undecodable => "undecodable",
            NoCluster::RipOutOfRange => "rip-out-of-range",
            NoCluster::Unsupported(_) => "unsupported",
            NoCluster::Single => "single",
            NoCluster::GapTooManyMemoryAccesses => "gap-too-many-memory-accesses",
            NoCluster::EndsCluster => "ends-cluster",
            NoCluster::CodeEnds => "code-ends",
            NoCluster::IndirectUnknown => "indirect-unknown",
            NoCluster::CallDepth => "call-depth",
            NoCluster::RegionFull => "region-full",
        }
    }

    /// The instruction that blocked the cluster, for `Unsupported`.
    pub fn blocker(self) -> Option<Mnemonic> {
        match self {
            NoCluster::Unsupported(mnemonic) => Some(mnemonic),
            _ => None,
        }
    }
}

impl fmt::Display for NoCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoCluster::Unsupported(mnemonic) => write!(f, "unsupported ({mnemonic:?})"),
            other => f.write_str(other.name()),
        }
    }
}

/// What control flow a cluster has, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// No branch instruction.
    StraightLine,
    /// Branches, none of them backward inside the cluster.
    Branching,
    /// At least one back-edge.
    Looping,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::StraightLine => "straight-line",
            Shape::Branching => "branching",
            Shape::Looping => "looping",
        }
    }
}

/// The shape of a cluster's control flow.
pub fn shape(cluster: &Cluster) -> Shape {
    if !cluster.back_edges.is_empty() {
        Shape::Looping
    } else if cluster
        .insns
        .iter()
        .any(|i| i.op.target().is_some() || i.op.is_guarded())
    {
        Shape::Branching
    } else {
        Shape::StraightLine
    }
}

/// A cluster and what kept it from growing further.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translated {
    pub cluster: Cluster,
    /// Why the paths found no more: the first rule that stopped one, nearest the
    /// entry (the window ran out: `Single`; a blocker: `Unsupported(mnemonic)`; a
    /// full gap, a cluster end, the end of the code, an unknown indirect
    /// destination, the call depth, the region's size).
    pub grows_no_further: NoCluster,
}

/// Translate the region entered at `rip`, reading the guest's code from `src`: the
/// entry point every caller uses (the AOT pass over an ELF's code, the hypervisor
/// over guest memory). Never panics.
pub fn translate_region(
    src: &mut dyn CodeSource,
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Translated, NoCluster> {
    // The entry: exiting, decodable, runnable, not a cluster end.
    if rip >= address_limit(bitness) {
        return Err(NoCluster::RipOutOfRange);
    }
    let instr = decode_at(src, rip, bitness).ok_or(NoCluster::Undecodable)?;
    policy.classify(&instr).ok_or(NoCluster::NotExiting)?;
    let op = lower(&instr).map_err(|u| NoCluster::Unsupported(u.mnemonic()))?;
    if ends_cluster(&op, config) {
        return Err(NoCluster::EndsCluster);
    }
    // A region that outgrew what the IR holds (back-edges, guards, code ranges) is
    // formed again with fewer instructions: exploration is breadth-first, so a
    // smaller region keeps the paths nearest the entry. Halved until one fits,
    // then the budget between that one and the last too full is searched for
    // the largest that fits.
    let full = config.max_cluster_insns.min(limits::MAX_CLUSTER_INSNS);
    let mut config = config.clone();
    let mut too_full = match region::build(src, rip, bitness, policy, &config) {
        Err(NoCluster::RegionFull) => full,
        built => return built,
    };
    let mut fits = None;
    while too_full > MIN_SHRUNK_INSNS {
        let budget = match fits {
            None => too_full / 2,
            Some((n, _)) if too_full - n > SHRINK_STEP => n + (too_full - n) / 2,
            Some(_) => break,
        };
        config.max_cluster_insns = budget;
        match region::build(src, rip, bitness, policy, &config) {
            Err(NoCluster::RegionFull) => too_full = budget,
            Ok(t) => fits = Some((budget, t)),
            Err(why) => return fits.map(|(_, t)| t).ok_or(why),
        }
    }
    fits.map(|(_, t)| t).ok_or(NoCluster::RegionFull)
}

/// How close the search for the largest region that fits gets (instructions).
const SHRINK_STEP: usize = 32;

/// The smallest instruction budget a full region is shrunk to before it is
/// refused as [`NoCluster::RegionFull`].
const MIN_SHRUNK_INSNS: usize = 32;

/// The highest address plus one that code of this bitness may occupy: instruction
/// pointers do not wrap inside a cluster.
fn address_limit(bitness: Bitness) -> u64 {
    match bitness {
        Bitness::B16 => 0x1_0000,
        Bitness::B32 => 0x1_0000_0000,
        Bitness::B64 => u64::MAX,
    }
}

/// The instruction at `rip`, if the source has bytes there that decode to one that
/// ends below the bitness's address limit.
fn decode_at(
    src: &mut dyn CodeSource,
    rip: u64,
    bitness: Bitness,
) -> Option<iced_x86::Instruction> {
    let limit = address_limit(bitness);
    let mut buf = [0u8; limits::MAX_INSN_LEN as usize];
    let room = usize::try_from(limit.checked_sub(rip)?).unwrap_or(usize::MAX);
    let want = buf.len().min(room);
    let n = src.read(rip, &mut buf[..want]);
    let mut decoder = Decoder::with_ip(bitness.bits(), &buf[..n], rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    (!instr.is_invalid()).then_some(instr)
}

/// Translate the cluster entered at `rip` from code in one slice starting at `rip`
/// (tests, and callers with one slice of code).
pub fn translate(
    code: &[u8],
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Cluster, NoCluster> {
    translate_in(code, rip, rip, bitness, policy, config).map(|t| t.cluster)
}

/// [`translate`], also saying what ended the cluster.
pub fn translate_explained(
    code: &[u8],
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Translated, NoCluster> {
    translate_in(code, rip, rip, bitness, policy, config)
}

/// Translate the cluster entered at `rip`, where `code` holds the guest's bytes from
/// `code_rip` (at or before `rip`) on: code outside the slice is out of reach.
pub fn translate_in(
    code: &[u8],
    code_rip: u64,
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Translated, NoCluster> {
    if rip < code_rip || rip - code_rip > code.len() as u64 {
        return Err(NoCluster::RipOutOfRange);
    }
    let mut src = Bytes {
        base: code_rip,
        bytes: code,
    };
    translate_region(&mut src, rip, bitness, policy, config)
}

/// Ops after which the cluster must end: HLT (the backend handles it), and writes that
/// can change the paging mode or address space.
fn ends_cluster(op: &Op, config: &TranslatorConfig) -> bool {
    match op {
        Op::Hlt | Op::Lmsw { .. } => true,
        Op::MovToCr { cr: 0 | 4, .. } => true,
        Op::MovToCr { cr: 3, .. } => config.end_after_cr3_load,
        _ => false,
    }
}

/// Memory accesses (software page walks) one execution of a gap filler makes: one per
/// memory operand (a read-modify-write walks once), one per stack slot. A REP INS/OUTS
/// has no static bound, so it never fits a gap.
pub fn memory_accesses(op: &Op) -> u32 {
    let mem = |o: &Operand| u32::from(matches!(o, Operand::Mem(_)));
    match op {
        Op::Mov { dst, src, .. } | Op::Alu { dst, src, .. } => mem(dst) + mem(src),
        Op::Movzx { src, .. }
        | Op::Movsx { src, .. }
        | Op::Cmovcc { src, .. }
        | Op::Imul { src, .. } => mem(src),
        Op::Unary { dst, .. } | Op::Shift { dst, .. } | Op::Bit { dst, .. } => mem(dst),
        Op::Setcc { dst, .. } | Op::Cmpxchg { dst, .. } | Op::Xadd { dst, .. } => mem(dst),
        Op::MulWide { src, .. } => mem(src),
        Op::Pushf { .. } | Op::Popf { .. } | Op::Leave { .. } => 1,
        Op::Xchg { a, b, .. } => mem(a) + mem(b),
        Op::Push { src, .. } => 1 + mem(src),
        Op::Pop { dst, .. } => 1 + mem(dst),
        Op::Call { .. } | Op::Ret { .. } => 1,
        Op::CallIndirect { src, .. } => 1 + mem(src),
        Op::JmpIndirect { src, .. } => mem(src),
        Op::Lmsw { src } => mem(src),
        Op::Ins { rep: true, .. } | Op::Outs { rep: true, .. } => u32::MAX,
        Op::Ins { .. } | Op::Outs { .. } => 1,
        _ => 0,
    }
}

/// The memory pages one execution of a gap filler may touch, as the code tells
/// them: the stack (one page for pushes, pops, calls, returns and RSP-based
/// operands), an absolute address's own page, and for any other operand its base,
/// index, scale and segment with the displacement's 4 KiB page. `None` when the
/// accesses have no static bound (REP INS/OUTS).
///
/// The paper bounds the memory accesses between two exiting instructions (4),
/// because each needs a software page walk. The engine keeps the translations of a
/// run (a small TLB), so only a page it has not walked yet costs one; the gap rule
/// counts these pages. Two operands whose base registers hold the same value
/// (the same register, or a copy of it: [`copies`]) with nearby displacements
/// (fields of one structure) are one page, which is what the cost model needs,
/// not a promise about addresses. A run-time translation also knows the
/// registers at its entry (`entry`): an operand whose base still holds its entry
/// value is keyed by the page it pointed to then, the stack's if it pointed into
/// the stack's page (Linux's `native_cpuid` stores through four pointer
/// arguments, all to its caller's locals).
pub fn gap_pages(op: &Op, regs: &RegCopies, entry: Option<&[u64; 16]>) -> Option<Vec<u64>> {
    use crate::ir::{MemRef, Seg, Size, RDI, RSI};
    let string = |seg: Seg, base| MemRef {
        seg,
        base: Some(base),
        index: None,
        scale: 1,
        disp: 0,
        addr_size: Size::S8,
    };
    let none = Operand::Imm(0);
    // (operands that may be memory, whether the stack is touched, a string operand)
    let (a, b, stack, string_op) = match op {
        Op::Mov { dst, src, .. } | Op::Alu { dst, src, .. } => (dst, src, false, None),
        Op::Xchg { a, b, .. } => (a, b, false, None),
        Op::Movzx { src, .. }
        | Op::Movsx { src, .. }
        | Op::Cmovcc { src, .. }
        | Op::Imul { src, .. }
        | Op::JmpIndirect { src, .. }
        | Op::Lmsw { src } => (src, &none, false, None),
        Op::Unary { dst, .. }
        | Op::Shift { dst, .. }
        | Op::Bit { dst, .. }
        | Op::Setcc { dst, .. }
        | Op::Cmpxchg { dst, .. }
        | Op::Xadd { dst, .. } => (dst, &none, false, None),
        Op::MulWide { src, .. } => (src, &none, false, None),
        Op::Pushf { .. } | Op::Popf { .. } | Op::Leave { .. } => (&none, &none, true, None),
        Op::Push { src: o, .. } | Op::Pop { dst: o, .. } | Op::CallIndirect { src: o, .. } => {
            (o, &none, true, None)
        }
        Op::Call { .. } | Op::Ret { .. } => (&none, &none, true, None),
        Op::Ins { rep: true, .. } | Op::Outs { rep: true, .. } => return None,
        Op::Ins { .. } => (&none, &none, false, Some(string(Seg::Es, RDI))),
        Op::Outs { seg, .. } => (&none, &none, false, Some(string(*seg, RSI))),
        _ => (&none, &none, false, None),
    };
    let mut pages = Vec::new();
    for o in [a, b] {
        if let Operand::Mem(m) = o {
            pages.push(page_key(m, regs, entry));
        }
    }
    if stack {
        pages.push(STACK_PAGE);
    }
    if let Some(m) = string_op {
        pages.push(page_key(&m, regs, entry));
    }
    Some(pages)
}

/// The key [`gap_pages`] gives the stack.
const STACK_PAGE: u64 = u64::MAX;

/// The tag of the keys of pages known by address (segment tags are 0 to 5).
const ADDRESS_PAGES: u64 = 7 << 61;

/// The page key of one memory operand (see [`gap_pages`]).
fn page_key(m: &crate::ir::MemRef, regs: &RegCopies, entry: Option<&[u64; 16]>) -> u64 {
    use crate::ir::RSP;
    if m.base == Some(RSP) && m.index.is_none() {
        return STACK_PAGE;
    }
    // A base that still holds an entry register's value (its id is that
    // register's number), no index, a flat segment: the page it pointed to.
    let flat = !matches!(m.seg, crate::ir::Seg::Fs | crate::ir::Seg::Gs);
    if let (Some(e), Some(base), None, true) = (entry, m.base, m.index, flat) {
        let id = usize::from(regs.value(base));
        if id < 16 {
            let page = e[id].wrapping_add(m.disp as u64) >> 12;
            if page == e[usize::from(RSP)] >> 12 {
                return STACK_PAGE;
            }
            return ADDRESS_PAGES | (page & ((1 << 45) - 1));
        }
    }
    let reg = |r: Option<u8>| r.map_or(0xffff, |r| u64::from(regs.value(r)));
    // 3 + 16 + 16 + 4 bits of segment, base and index values and scale; the
    // displacement's page in the rest (a collision only merges two estimates).
    (m.seg as u64) << 61
        | reg(m.base) << 45
        | reg(m.index) << 29
        | u64::from(m.scale) << 25
        | ((m.disp >> 12) as u64 & 0x1ff_ffff)
}

/// Exit classes of the cluster's instructions in order, for reports and tests.
pub fn exit_classes(cluster: &Cluster) -> Vec<ExitClass> {
    cluster.insns.iter().filter_map(|i| i.exit_class).collect()
}

#[cfg(test)]
mod tests;
