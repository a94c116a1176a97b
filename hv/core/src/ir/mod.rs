//! The translation IR: what a cluster is made of.
//!
//! The translator lowers decoded x86 instructions (iced-x86) into these ops once,
//! ahead of time or at the third exit of a RIP; the engine interprets them without
//! decoding x86 again. The IR is serialized in translation files (see `format`), so
//! every value here can come from untrusted input: [`validate()`] checks every
//! index and bound before the engine may run it.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::policy::ExitClass;

pub mod validate;

pub use validate::{validate, ClusterError};

/// Code size the instructions were decoded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Bitness {
    B16,
    B32,
    B64,
}

impl Bitness {
    pub fn bits(self) -> u32 {
        match self {
            Bitness::B16 => 16,
            Bitness::B32 => 32,
            Bitness::B64 => 64,
        }
    }
}

/// Operand or address size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Size {
    S1,
    S2,
    S4,
    S8,
}

impl Size {
    pub fn bytes(self) -> u32 {
        match self {
            Size::S1 => 1,
            Size::S2 => 2,
            Size::S4 => 4,
            Size::S8 => 8,
        }
    }
    pub fn bits(self) -> u32 {
        self.bytes() * 8
    }
    /// All-ones mask of this width.
    pub fn mask(self) -> u64 {
        match self {
            Size::S8 => u64::MAX,
            s => (1u64 << s.bits()) - 1,
        }
    }
}

/// A general-purpose register by number: 0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX,
/// 4 = RSP, 5 = RBP, 6 = RSI, 7 = RDI, 8..=15 = R8..R15 (the hardware's encoding).
pub type GprIndex = u8;

pub const RAX: GprIndex = 0;
pub const RCX: GprIndex = 1;
pub const RDX: GprIndex = 2;
pub const RBX: GprIndex = 3;
pub const RSP: GprIndex = 4;
pub const RBP: GprIndex = 5;
pub const RSI: GprIndex = 6;
pub const RDI: GprIndex = 7;

/// A register operand of a given width. `high8` selects AH/CH/DH/BH (index 0..=3,
/// size S1). Writes follow x86 rules: a 32-bit write zero-extends to 64 bits, 8- and
/// 16-bit writes merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegRef {
    pub index: GprIndex,
    pub size: Size,
    pub high8: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// A memory operand. The effective address is
/// `base + index * scale + disp`, truncated to `addr_size`, plus the segment base.
/// RIP-relative operands are resolved by the translator into `base: None` and an
/// absolute `disp` (the instruction's address is fixed in a translation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRef {
    pub seg: Seg,
    pub base: Option<GprIndex>,
    pub index: Option<GprIndex>,
    /// 1, 2, 4 or 8.
    pub scale: u8,
    pub disp: i64,
    /// S2, S4 or S8.
    pub addr_size: Size,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operand {
    Reg(RegRef),
    /// Already sign- or zero-extended as the instruction defines, to 64 bits.
    Imm(u64),
    Mem(MemRef),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AluOp {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    /// Like Sub, flags only.
    Cmp,
    /// Like And, flags only.
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnaryOp {
    Inc,
    Dec,
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShiftOp {
    Rol,
    Ror,
    Rcl,
    Rcr,
    Shl,
    Shr,
    Sar,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BitOp {
    Bt,
    Bts,
    Btr,
    Btc,
}

/// Condition codes in the hardware's order (the low nibble of Jcc/SETcc/CMOVcc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cond {
    O,
    No,
    B,
    Ae,
    E,
    Ne,
    Be,
    A,
    S,
    Ns,
    P,
    Np,
    L,
    Ge,
    Le,
    G,
}

/// LOOP, LOOPE, LOOPNE and JCXZ/JECXZ/JRCXZ: they count or test (R/E)CX at `addr_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoopKind {
    Loop,
    Loope,
    Loopne,
    Jcxz,
}

/// Where a branch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// An instruction of this cluster, by index into `Cluster::insns`.
    Insn(u16),
    /// Outside the cluster: the cluster ends and the guest resumes at this RIP.
    Exit(u64),
}

/// Port number source for IN/OUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortSrc {
    Imm(u8),
    Dx,
}

/// Control register number for MOV CRn: 0, 2, 3, 4 or 8.
pub type CrIndex = u8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    // --- gap fillers ------------------------------------------------------------
    Mov {
        size: Size,
        dst: Operand,
        src: Operand,
    },
    /// MOVZX / MOVSX / MOVSXD; `src_size` < `dst_size` (MOVSXD with 32-bit dst is a Mov).
    Movzx {
        dst: RegRef,
        src: Operand,
        src_size: Size,
    },
    Movsx {
        dst: RegRef,
        src: Operand,
        src_size: Size,
    },
    /// LEA: `dst` gets the effective address (no segment base) at `dst.size`.
    Lea {
        dst: RegRef,
        addr: MemRef,
    },
    Alu {
        op: AluOp,
        size: Size,
        dst: Operand,
        src: Operand,
    },
    Unary {
        op: UnaryOp,
        size: Size,
        dst: Operand,
    },
    /// `count` is Imm or CL.
    Shift {
        op: ShiftOp,
        size: Size,
        dst: Operand,
        count: Operand,
    },
    /// `bit` is Imm or a register (register bit offsets into memory may reach
    /// beyond the operand, as on hardware).
    Bit {
        op: BitOp,
        size: Size,
        dst: Operand,
        bit: Operand,
    },
    Xchg {
        size: Size,
        a: Operand,
        b: Operand,
    },
    /// IMUL's two- and three-operand forms (16, 32, 64 bits): `dst = dst * src`, or
    /// `dst = src * factor` when `factor` (the sign-extended immediate) is given.
    /// CF = OF = 1 when the signed product does not fit `size`.
    Imul {
        size: Size,
        dst: RegRef,
        src: Operand,
        factor: Option<u64>,
    },
    /// `size` is the push width (2, 4 or 8); the stack pointer width follows the
    /// stack segment (the cluster's bitness here: SS.B in 32-bit code, 64 in long mode).
    Push {
        size: Size,
        src: Operand,
    },
    Pop {
        size: Size,
        dst: Operand,
    },
    Setcc {
        cond: Cond,
        dst: Operand,
    },
    Cmovcc {
        cond: Cond,
        size: Size,
        dst: RegRef,
        src: Operand,
    },
    /// CBW/CWDE/CDQE (sign-extend the accumulator's lower half into itself).
    SignExtendAcc {
        size: Size,
    },
    /// CWD/CDQ/CQO (sign of the accumulator into DX/EDX/RDX).
    SignExtendAccToDx {
        size: Size,
    },
    Clc,
    Stc,
    Cmc,
    Cld,
    Std,
    Nop,
    /// PUSHF/PUSHFD/PUSHFQ: pushes RFLAGS at `size` (the push width) with RF and VM
    /// cleared.
    Pushf {
        size: Size,
    },
    /// POPF/POPFD/POPFQ: pops `size` bytes into RFLAGS. Which flags may change
    /// follows CPL and IOPL as on the CPU (RF cleared; VM, VIF, VIP and the
    /// reserved bits unaffected). A POPF that would set TF stops before itself; one
    /// that sets IF (0 to 1) ends the run right after itself
    /// ([`crate::engine::StopReason::InterruptWindow`]).
    Popf {
        size: Size,
    },
    /// CLI; at CPL > IOPL the run stops before it (#GP, or VIF under CR4.PVI).
    Cli,
    /// STI; privilege as CLI. With IF clear it opens an interrupt shadow: the
    /// engine runs the next instruction too and ends the run after it, or stops
    /// before the STI if it cannot complete that instruction.
    Sti,
    /// CMPXCHG r/m, reg (with or without LOCK): compares the accumulator (at
    /// `size`) with `dst`; equal: ZF = 1 and `dst` = `src`; else ZF = 0 and the
    /// accumulator = `dst` (a memory `dst` is written back either way). Flags as
    /// CMP accumulator, dst.
    Cmpxchg {
        size: Size,
        dst: Operand,
        src: RegRef,
    },
    /// XADD r/m, reg (with or without LOCK): `src` = old `dst`, `dst` = sum; flags
    /// as ADD.
    Xadd {
        size: Size,
        dst: Operand,
        src: RegRef,
    },
    /// LEAVE: the stack pointer (at the stack width) = the frame pointer, then the
    /// frame pointer is popped at `size` (2, 4 or 8).
    Leave {
        size: Size,
    },
    /// BSWAP r32/r64 (the 16-bit form is undefined and not lowered).
    Bswap {
        dst: RegRef,
    },
    /// One-operand MUL (`signed: false`) and IMUL: accumulator * `src` into AX,
    /// DX:AX, EDX:EAX or RDX:RAX. CF = OF = the upper half is significant; SF, ZF,
    /// AF, PF undefined (as two-operand IMUL computes them).
    MulWide {
        signed: bool,
        size: Size,
        src: Operand,
    },
    Jmp {
        target: Target,
    },
    Jcc {
        cond: Cond,
        target: Target,
    },
    Loop {
        kind: LoopKind,
        addr_size: Size,
        target: Target,
    },
    /// CALL rel: pushes `ret` (the address after the CALL) at `size`, the stack
    /// width of the code (2, 4 or 8), and goes to `target`: the callee in the
    /// cluster, or `Target::Exit` to leave the cluster at the callee with the return
    /// address pushed, as the CPU leaves it.
    Call {
        size: Size,
        ret: u64,
        target: Target,
    },
    /// CALL r/m (an indirect call): the destination is read from `src` (at `size`,
    /// zero-extended). A guard of this instruction ([`Cluster::guards`]) whose
    /// `expect` equals it says where to go after pushing `ret`; with none the run
    /// stops *before* the CALL, nothing done ([`crate::engine::StopReason::GuardMiss`]).
    CallIndirect {
        size: Size,
        src: Operand,
        ret: u64,
    },
    /// JMP r/m (an indirect jump, a jump table's dispatch): guarded like
    /// `CallIndirect`, without the push.
    JmpIndirect {
        size: Size,
        src: Operand,
    },
    /// RET and RET imm16: the return address is read from the stack top (at `size`);
    /// a guard whose `expect` equals it says where to go after popping it and
    /// `pop` more bytes. With none the run stops before the RET, nothing done. A
    /// RET of a callee the cluster called carries the guard of its call site (the
    /// return address pushed there); a RET leaving the function the cluster was
    /// entered in carries the return addresses seen at run time, if any.
    Ret {
        size: Size,
        pop: u16,
    },

    // --- exiting instructions --------------------------------------------------------
    In {
        size: Size,
        port: PortSrc,
    },
    Out {
        size: Size,
        port: PortSrc,
    },
    /// INS: to ES:[(E/R)DI]. `rep` repeats (E/R)CX times.
    Ins {
        size: Size,
        addr_size: Size,
        rep: bool,
    },
    /// OUTS: from seg:[(E/R)SI] (DS unless overridden).
    Outs {
        size: Size,
        addr_size: Size,
        rep: bool,
        seg: Seg,
    },
    Rdmsr,
    Wrmsr,
    Cpuid,
    MovToCr {
        cr: CrIndex,
        src: GprIndex,
    },
    MovFromCr {
        cr: CrIndex,
        dst: GprIndex,
    },
    Clts,
    Lmsw {
        src: Operand,
    },
    Rdtsc,
    Rdtscp,
    Rdpmc,
    Xgetbv,
    Xsetbv,
    Wbinvd,
    Invd,
    Invlpg {
        addr: MemRef,
    },
    Pause,
    /// Ends the cluster: the guest resumes at the HLT and the backend handles it.
    Hlt,
}

impl Op {
    /// Where the op branches to, for the direct branches (JMP, Jcc, LOOP/JCXZ, CALL).
    /// Guarded ops ([`Op::is_guarded`]) have their targets in [`Cluster::guards`].
    pub fn target(&self) -> Option<Target> {
        match self {
            Op::Jmp { target }
            | Op::Jcc { target, .. }
            | Op::Loop { target, .. }
            | Op::Call { target, .. } => Some(*target),
            _ => None,
        }
    }

    /// The branch target, mutably (the translator resolves targets in place).
    pub fn target_mut(&mut self) -> Option<&mut Target> {
        match self {
            Op::Jmp { target }
            | Op::Jcc { target, .. }
            | Op::Loop { target, .. }
            | Op::Call { target, .. } => Some(target),
            _ => None,
        }
    }

    /// Whether control goes where a run-time value says (indirect CALL and JMP,
    /// RET): on, only through a [`Guard`] that expects that value.
    pub fn is_guarded(&self) -> bool {
        matches!(
            self,
            Op::CallIndirect { .. } | Op::JmpIndirect { .. } | Op::Ret { .. }
        )
    }

    /// False for ops after which execution never goes on to the next instruction.
    pub fn falls_through(&self) -> bool {
        !matches!(
            self,
            Op::Jmp { .. }
                | Op::Hlt
                | Op::Call { .. }
                | Op::CallIndirect { .. }
                | Op::JmpIndirect { .. }
                | Op::Ret { .. }
        )
    }

    /// The exit class an op has when it exits, or `None` for ops that never exit
    /// (gap fillers, and MOV to/from CR2, which VT-x never intercepts).
    pub fn exit_class(&self) -> Option<ExitClass> {
        use ExitClass as E;
        Some(match self {
            Op::In { .. } => E::In,
            Op::Out { .. } => E::Out,
            Op::Ins { .. } => E::Ins,
            Op::Outs { .. } => E::Outs,
            Op::Rdmsr => E::Rdmsr,
            Op::Wrmsr => E::Wrmsr,
            Op::Cpuid => E::Cpuid,
            Op::MovToCr { cr, .. } => match cr {
                0 => E::MovToCr0,
                3 => E::MovToCr3,
                4 => E::MovToCr4,
                8 => E::MovToCr8,
                _ => return None,
            },
            Op::MovFromCr { cr, .. } => match cr {
                0 => E::MovFromCr0,
                3 => E::MovFromCr3,
                4 => E::MovFromCr4,
                8 => E::MovFromCr8,
                _ => return None,
            },
            Op::Clts => E::Clts,
            Op::Lmsw { .. } => E::Lmsw,
            Op::Rdtsc => E::Rdtsc,
            Op::Rdtscp => E::Rdtscp,
            Op::Rdpmc => E::Rdpmc,
            Op::Xgetbv => E::Xgetbv,
            Op::Xsetbv => E::Xsetbv,
            Op::Wbinvd => E::Wbinvd,
            Op::Invd => E::Invd,
            Op::Invlpg { .. } => E::Invlpg,
            Op::Pause => E::Pause,
            Op::Hlt => E::Hlt,
            _ => return None,
        })
    }
}

/// The bounds every cluster stays within, whoever made it: the validator enforces
/// them and `TranslatorConfig` is clamped to them.
pub mod limits {
    /// The longest x86 instruction.
    pub const MAX_INSN_LEN: u8 = 15;
    /// The most guest code bytes one cluster covers (a translation's code pages
    /// are checked byte by byte before each run).
    pub const MAX_CLUSTER_BYTES: usize = 4096;
    /// The most gap fillers before the entry that a cluster may take in as a loop
    /// head (translator rule 3).
    pub const MAX_LOOP_HEAD_INSNS: usize = 8;
    /// The most instructions in a cluster (indices fit `Target::Insn(u16)`).
    pub const MAX_CLUSTER_INSNS: usize = 4096;
    /// The most back-edge records in a cluster (the engine counts each edge's
    /// iterations in a fixed table).
    pub const MAX_BACK_EDGES: usize = 64;
    /// The most separate runs of guest code one cluster covers (a region over the
    /// control-flow graph takes in callees and blocks apart from each other).
    pub const MAX_CODE_RANGES: usize = 32;
    /// The most guard records in a cluster (known destinations of its indirect
    /// calls and jumps and of its returns).
    pub const MAX_GUARDS: usize = 256;
}

/// One instruction of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insn {
    /// Guest virtual address of the instruction.
    pub rip: u64,
    /// Encoded length in bytes (1..=15).
    pub len: u8,
    pub op: Op,
    /// Set for instructions that would exit under the policy the cluster was built for.
    pub exit_class: Option<ExitClass>,
}

/// A backward branch inside a cluster and how often it may be taken per cluster run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackEdge {
    /// Index of the branch instruction in `Cluster::insns`.
    pub insn: u16,
    /// `None`: the loop qualified (its body is sure to reach an exiting instruction
    /// and an interrupt check), bounded only by the engine's instruction budget.
    /// `Some(n)`: taken at most `n` times per run, then the cluster stops at the
    /// branch's target with a precise RIP.
    pub cap: Option<u16>,
}

/// A destination an indirect CALL or JMP, or a RET, may go on to inside the run:
/// when the value the instruction reads equals `expect`, control goes to `target`.
/// Several guards of one instruction are tried in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// Index of the guarded instruction in `Cluster::insns`.
    pub insn: u16,
    /// The destination address the instruction must read.
    pub expect: u64,
    /// Where the run goes on: an instruction of the cluster (whose RIP is `expect`),
    /// or `Target::Exit(expect)` to complete the instruction and leave there.
    pub target: Target,
}

/// Where a guarded instruction inside a thunk learns its destinations: the CALL or
/// JMP that entered the thunk. One return thunk (or one retpoline) serves every
/// function of a kernel; the destinations of its RET seen through one site are
/// that site's, so the hypervisor keeps them per site, not per RET.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnSite {
    /// Index of the guarded instruction in `Cluster::insns`.
    pub insn: u16,
    /// Guest address of the CALL or JMP that entered the thunk.
    pub site: u64,
}

/// A run of guest code the cluster's instructions were decoded from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRange {
    /// Guest virtual address of the first byte.
    pub start: u64,
    /// The guest's bytes, checked byte by byte before each run: a mismatch drops
    /// the translation.
    pub bytes: Vec<u8>,
}

impl CodeRange {
    /// One past the last byte (saturating: the validator refuses ranges that wrap).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.bytes.len() as u64)
    }

    /// Whether `[rip, rip + len)` lies inside this range.
    pub fn holds(&self, rip: u64, len: u64) -> bool {
        rip >= self.start && rip.checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// A translated cluster: a region of the guest's control-flow graph entered at an
/// exiting instruction. It holds the code control reaches from there along the
/// translator's paths (both sides of branches, jumps, callees of direct calls, the
/// destinations its guards know), plus, for a loop, a loop head before the first
/// exiting instruction. It is entered at its first exiting instruction
/// (`entry_index`).
///
/// `insns` is in *layout* order: an instruction that falls through continues at
/// the next index if that instruction is at its own end address, and otherwise the
/// run ends there (control leaves the region with an exact RIP). A block may appear
/// more than once (a callee reached from two call sites, each returning to its own
/// caller), so a RIP may have several indices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub bitness: Bitness,
    /// The guest code the instructions lie in: sorted by address, not overlapping,
    /// every instruction inside one range.
    pub code: Vec<CodeRange>,
    /// In layout order (see above).
    pub insns: Vec<Insn>,
    pub back_edges: Vec<BackEdge>,
    /// The known destinations of the guarded instructions, sorted by instruction.
    pub guards: Vec<Guard>,
    /// Guarded instructions reached inside a thunk, sorted by instruction (at most
    /// one record each): where their destinations are learned.
    pub learn_sites: Vec<LearnSite>,
}

impl Cluster {
    /// A cluster over one run of code starting at `start` (every cluster before
    /// regions over the control-flow graph, and most tests).
    pub fn contiguous(
        bitness: Bitness,
        start: u64,
        bytes: Vec<u8>,
        insns: Vec<Insn>,
        back_edges: Vec<BackEdge>,
    ) -> Cluster {
        Cluster {
            bitness,
            code: alloc::vec![CodeRange { start, bytes }],
            insns,
            back_edges,
            guards: Vec::new(),
            learn_sites: Vec::new(),
        }
    }

    /// Index of the instruction the cluster is entered at: its first exiting
    /// instruction. The ones before it form a loop head, reached only by a back-edge.
    pub fn entry_index(&self) -> Option<usize> {
        self.insns.iter().position(|i| i.exit_class.is_some())
    }

    /// RIP the cluster is entered at (the exit that runs it happens here): the key
    /// it is cached and shipped under.
    pub fn entry_rip(&self) -> Option<u64> {
        self.entry_index().map(|i| self.insns[i].rip)
    }

    /// Exiting instructions in the cluster.
    pub fn exiting_count(&self) -> usize {
        self.insns.iter().filter(|i| i.exit_class.is_some()).count()
    }

    /// The lowest address of its code.
    pub fn lowest(&self) -> u64 {
        self.code.first().map_or(0, |r| r.start)
    }

    /// One past the highest address of its code.
    pub fn highest_end(&self) -> u64 {
        self.code.last().map_or(0, |r| r.end())
    }

    /// Guest code bytes the cluster covers, over all its ranges.
    pub fn code_bytes(&self) -> usize {
        self.code.iter().map(|r| r.bytes.len()).sum()
    }

    /// Whether any of its code overlaps `[lo, hi)`.
    pub fn overlaps(&self, lo: u64, hi: u64) -> bool {
        self.code.iter().any(|r| r.start < hi && r.end() > lo)
    }

    /// The guards of instruction `insn`, in order.
    pub fn guards_of(&self, insn: usize) -> impl Iterator<Item = &Guard> {
        let from = self.guards.partition_point(|g| usize::from(g.insn) < insn);
        self.guards[from..]
            .iter()
            .take_while(move |g| usize::from(g.insn) == insn)
    }

    /// Where the guarded instruction at `insn` learns its destinations: the site
    /// that entered the thunk it is in, else its own address.
    pub fn learn_site(&self, insn: usize) -> Option<u64> {
        let own = self.insns.get(insn)?.rip;
        let k = self
            .learn_sites
            .binary_search_by_key(&insn, |s| usize::from(s.insn));
        Some(k.map_or(own, |k| self.learn_sites[k].site))
    }

    /// What a run that goes on after instruction `from` can reach along the
    /// cluster's edges (the exit that entered it happened at `from`).
    pub fn reach_after(&self, from: usize) -> Reach {
        let mut seen = alloc::vec![false; self.insns.len()];
        let mut stack = successors(&self.insns, &self.guards, from);
        let mut reach = Reach::default();
        while let Some(i) = stack.pop() {
            if i >= self.insns.len() || seen[i] {
                continue;
            }
            seen[i] = true;
            reach.exiting += usize::from(self.insns[i].exit_class.is_some());
            reach.loops |= self.back_edges.iter().any(|b| usize::from(b.insn) == i);
            stack.extend(successors(&self.insns, &self.guards, i));
        }
        reach
    }

    /// The guest bytes of the instruction at `index`, if its range holds them.
    pub fn insn_bytes(&self, index: usize) -> Option<&[u8]> {
        let insn = self.insns.get(index)?;
        let r = self
            .code
            .iter()
            .find(|r| r.holds(insn.rip, insn.len.into()))?;
        let at = usize::try_from(insn.rip - r.start).ok()?;
        r.bytes.get(at..at + usize::from(insn.len))
    }
}

/// What a run can reach from a point of a cluster ([`Cluster::reach_after`]),
/// ordered by what it may absorb: a loop first (it may come round again and
/// again), then more exiting instructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reach {
    /// A back-edge is reachable.
    pub loops: bool,
    /// Exiting instructions reachable (each counted once).
    pub exiting: usize,
}

/// The indices instruction `i` of `insns` (laid out as in [`Cluster::insns`], with
/// these guards) may go to inside the cluster: the next index if it falls through
/// to it, its target, its guards' targets.
pub fn successors(insns: &[Insn], guards: &[Guard], i: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let Some(insn) = insns.get(i) else {
        return out;
    };
    if insn.op.falls_through() {
        if let Some(next) = insns.get(i + 1) {
            if next.rip == insn.rip.wrapping_add(u64::from(insn.len)) {
                out.push(i + 1);
            }
        }
    }
    if let Some(Target::Insn(t)) = insn.op.target() {
        out.push(usize::from(t));
    }
    for g in guards.iter().filter(|g| usize::from(g.insn) == i) {
        if let Target::Insn(t) = g.target {
            out.push(usize::from(t));
        }
    }
    out
}
