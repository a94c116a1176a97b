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
    /// Where the op branches to, for the branches (JMP, Jcc, LOOP/JCXZ).
    pub fn target(&self) -> Option<Target> {
        match self {
            Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => Some(*target),
            _ => None,
        }
    }

    /// The branch target, mutably (the translator resolves targets in place).
    pub fn target_mut(&mut self) -> Option<&mut Target> {
        match self {
            Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => Some(target),
            _ => None,
        }
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

/// A translated cluster: from its first exiting instruction to its last one, plus,
/// for a loop, a loop head before the first exiting instruction and the back-edge
/// after the last. It is entered at its first exiting instruction (`entry_index`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// RIP of the first instruction: the entry, or the loop head before it.
    pub start: u64,
    /// RIP just after the last instruction in address order.
    pub end: u64,
    pub bitness: Bitness,
    /// The guest's code bytes from `start` to `end`, checked byte by byte before
    /// each run: a mismatch drops the translation.
    pub guest_bytes: Vec<u8>,
    /// In address order; `insns[0].rip == start`.
    pub insns: Vec<Insn>,
    pub back_edges: Vec<BackEdge>,
}

impl Cluster {
    /// Index of the instruction the cluster is entered at: its first exiting
    /// instruction. The ones before it form a loop head, reached only by a back-edge.
    pub fn entry_index(&self) -> Option<usize> {
        self.insns.iter().position(|i| i.exit_class.is_some())
    }

    /// RIP the cluster is entered at (the exit that runs it happens here).
    pub fn entry_rip(&self) -> Option<u64> {
        self.entry_index().map(|i| self.insns[i].rip)
    }

    /// Exiting instructions in the cluster.
    pub fn exiting_count(&self) -> usize {
        self.insns.iter().filter(|i| i.exit_class.is_some()).count()
    }
}
