//! The IR contract: every rule a cluster must satisfy before the engine may run
//! it. One validator serves every source of clusters (decoded translation files,
//! the AOT pass, the run-time translator); its limits are [`super::limits`].

use core::fmt;

use super::limits::{MAX_BACK_EDGES, MAX_CLUSTER_BYTES, MAX_INSN_LEN, MAX_LOOP_HEAD_INSNS};
use super::*;

/// Why a cluster is not acceptable to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterError {
    /// No instructions.
    Empty,
    /// `insns[0].rip` is not `start`.
    FirstRipNotStart { rip: u64, start: u64 },
    /// The cluster does not start at an exiting instruction of its class, nor at a
    /// loop head of at most [`MAX_LOOP_HEAD_INSNS`] gap fillers (conditional branches
    /// allowed, no exiting instruction) that one of its back-edges reaches.
    FirstNotExiting,
    /// An instruction length outside 1..=15.
    BadLength { insn: usize, len: u8 },
    /// An instruction does not start where the previous one ended.
    NotContiguous {
        insn: usize,
        rip: u64,
        expected: u64,
    },
    /// Addresses wrap around (or leave the 4 GiB space of 16/32-bit code).
    AddressOverflow { insn: usize },
    /// `end` is not the RIP after the last instruction.
    EndMismatch { end: u64, expected: u64 },
    /// `guest_bytes` does not cover exactly `start..end`.
    GuestBytesLength { len: usize, expected: u64 },
    /// The cluster covers more than [`MAX_CLUSTER_BYTES`].
    TooLarge { bytes: u64 },
    /// An operand, size or index that the op does not allow.
    Operand { insn: usize, reason: &'static str },
    /// A branch target `Target::Insn(i)` with `i` outside the cluster.
    TargetOutOfRange {
        insn: usize,
        target: u16,
        count: usize,
    },
    /// A branch to an earlier (or the same) instruction with no `BackEdge` record.
    UnrecordedBackEdge { insn: usize },
    /// A `BackEdge` record that is out of range, duplicated, out of order, or not on
    /// a backward branch.
    BadBackEdge { index: usize, reason: &'static str },
    /// `exit_class` does not match the op.
    ExitClassMismatch { insn: usize },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ClusterError::*;
        match self {
            Empty => write!(f, "no instructions"),
            FirstRipNotStart { rip, start } => {
                write!(f, "first instruction at {rip:#x} is not the cluster start {start:#x}")
            }
            FirstNotExiting => write!(
                f,
                "does not start at an exiting instruction (or at a loop head of at most {MAX_LOOP_HEAD_INSNS} gap fillers, no exiting instruction, that a back-edge reaches)"
            ),
            BadLength { insn, len } => {
                write!(f, "instruction {insn}: length {len} is outside 1..=15")
            }
            NotContiguous { insn, rip, expected } => write!(
                f,
                "instruction {insn}: at {rip:#x}, expected {expected:#x} (instructions must be contiguous and in order)"
            ),
            AddressOverflow { insn } => {
                write!(f, "instruction {insn}: address wraps around the address space")
            }
            EndMismatch { end, expected } => {
                write!(f, "end {end:#x} is not the end of the last instruction {expected:#x}")
            }
            GuestBytesLength { len, expected } => {
                write!(f, "guest_bytes has {len} bytes, the instructions cover {expected}")
            }
            TooLarge { bytes } => {
                write!(f, "covers {bytes} bytes, more than the limit {MAX_CLUSTER_BYTES}")
            }
            Operand { insn, reason } => write!(f, "instruction {insn}: {reason}"),
            TargetOutOfRange { insn, target, count } => write!(
                f,
                "instruction {insn}: branch target index {target} is outside the cluster's {count} instructions"
            ),
            UnrecordedBackEdge { insn } => {
                write!(f, "instruction {insn}: backward branch without a back-edge record")
            }
            BadBackEdge { index, reason } => write!(f, "back-edge record {index}: {reason}"),
            ExitClassMismatch { insn } => {
                write!(f, "instruction {insn}: exit class does not match the instruction")
            }
        }
    }
}

impl core::error::Error for ClusterError {}

/// Check every index and bound of one cluster (see the module's rules): after this
/// the engine may run it without further checks of the IR itself.
pub fn validate(c: &Cluster) -> Result<(), ClusterError> {
    use ClusterError as CE;
    let n = c.insns.len();
    if n == 0 {
        return Err(CE::Empty);
    }
    if c.insns[0].rip != c.start {
        return Err(CE::FirstRipNotStart {
            rip: c.insns[0].rip,
            start: c.start,
        });
    }
    let limit: u64 = match c.bitness {
        Bitness::B64 => u64::MAX,
        _ => 1 << 32,
    };
    let mut next = c.start;
    for (i, insn) in c.insns.iter().enumerate() {
        if insn.len == 0 || insn.len > MAX_INSN_LEN {
            return Err(CE::BadLength {
                insn: i,
                len: insn.len,
            });
        }
        if insn.rip != next {
            return Err(CE::NotContiguous {
                insn: i,
                rip: insn.rip,
                expected: next,
            });
        }
        next = match insn.rip.checked_add(insn.len as u64) {
            Some(e) if e <= limit => e,
            _ => return Err(CE::AddressOverflow { insn: i }),
        };
        if next - c.start > MAX_CLUSTER_BYTES as u64 {
            return Err(CE::TooLarge {
                bytes: next - c.start,
            });
        }
    }
    if c.end != next {
        return Err(CE::EndMismatch {
            end: c.end,
            expected: next,
        });
    }
    let covered = next - c.start;
    if c.guest_bytes.len() as u64 != covered {
        return Err(CE::GuestBytesLength {
            len: c.guest_bytes.len(),
            expected: covered,
        });
    }

    if c.back_edges.len() > MAX_BACK_EDGES {
        return Err(CE::BadBackEdge {
            index: MAX_BACK_EDGES,
            reason: "more back-edge records than the limit (64)",
        });
    }
    let mut prev: Option<u16> = None;
    for (k, b) in c.back_edges.iter().enumerate() {
        let bad = |reason| CE::BadBackEdge { index: k, reason };
        if b.insn as usize >= n {
            return Err(bad("instruction index outside the cluster"));
        }
        if let Some(p) = prev {
            if b.insn <= p {
                return Err(bad(
                    "records must be sorted by instruction index and unique",
                ));
            }
        }
        prev = Some(b.insn);
        match c.insns[b.insn as usize].op.target() {
            Some(Target::Insn(t)) if t <= b.insn => {}
            Some(_) => return Err(bad("the instruction is not a backward branch")),
            None => return Err(bad("the instruction is not a branch")),
        }
    }
    for (i, insn) in c.insns.iter().enumerate() {
        check_op(&insn.op, c.bitness).map_err(|reason| CE::Operand { insn: i, reason })?;
        if let Some(class) = insn.exit_class {
            if insn.op.exit_class() != Some(class) {
                return Err(CE::ExitClassMismatch { insn: i });
            }
        }
        if let Some(Target::Insn(t)) = insn.op.target() {
            if t as usize >= n {
                return Err(CE::TargetOutOfRange {
                    insn: i,
                    target: t,
                    count: n,
                });
            }
            if (t as usize) <= i && !c.back_edges.iter().any(|b| b.insn as usize == i) {
                return Err(CE::UnrecordedBackEdge { insn: i });
            }
        }
    }
    // The cluster is entered at its first exiting instruction. Up to
    // MAX_LOOP_HEAD_INSNS plain gap fillers may come before it as a loop head
    // (translator rule 3), which only a back-edge of the cluster reaches.
    let entry = c.insns.iter().position(|i| i.exit_class.is_some());
    let entry = match entry {
        Some(k) if k <= MAX_LOOP_HEAD_INSNS => k,
        _ => return Err(CE::FirstNotExiting),
    };
    if c.insns[entry].op.exit_class().is_none() {
        return Err(CE::FirstNotExiting);
    }
    if entry > 0 {
        // `exit_class` is what the cluster's policy makes exit (checked against the
        // op above): PAUSE, say, is a plain gap filler when PAUSE exiting is off.
        let plain = c.insns[..entry]
            .iter()
            .all(|i| i.exit_class.is_none() && !matches!(i.op, Op::Jmp { .. } | Op::Loop { .. }));
        let reached = c.back_edges.iter().any(|b| {
            matches!(c.insns[b.insn as usize].op.target(),
                Some(Target::Insn(t)) if (t as usize) < entry)
        });
        if !plain || !reached {
            return Err(CE::FirstNotExiting);
        }
    }

    Ok(())
}

type Check = Result<(), &'static str>;

fn gpr(index: GprIndex, bitness: Bitness) -> Check {
    if index >= 16 {
        return Err("register index is 16 or more");
    }
    if index >= 8 && bitness != Bitness::B64 {
        return Err("registers R8..R15 exist only in 64-bit code");
    }
    Ok(())
}

fn size_ok(size: Size, bitness: Bitness) -> Check {
    if size == Size::S8 && bitness != Bitness::B64 {
        return Err("64-bit operand size outside 64-bit code");
    }
    Ok(())
}

fn reg(r: &RegRef, bitness: Bitness) -> Check {
    gpr(r.index, bitness)?;
    size_ok(r.size, bitness)?;
    if r.high8 && (r.size != Size::S1 || r.index >= 4) {
        return Err("high-byte register (AH/CH/DH/BH) needs size 1 and index 0..=3");
    }
    Ok(())
}

fn addr_size(size: Size, bitness: Bitness) -> Check {
    match (size, bitness) {
        (Size::S1, _) => Err("address size 1 does not exist"),
        (Size::S2, Bitness::B64) => Err("16-bit addressing does not exist in 64-bit code"),
        (Size::S8, Bitness::B16 | Bitness::B32) => {
            Err("64-bit addressing exists only in 64-bit code")
        }
        _ => Ok(()),
    }
}

fn mem(m: &MemRef, bitness: Bitness) -> Check {
    if let Some(b) = m.base {
        gpr(b, bitness)?;
    }
    if let Some(i) = m.index {
        gpr(i, bitness)?;
    }
    if !matches!(m.scale, 1 | 2 | 4 | 8) {
        return Err("scale is not 1, 2, 4 or 8");
    }
    addr_size(m.addr_size, bitness)
}

/// An operand of width `size`: a register of exactly that width, memory, or (if
/// `imm_ok`) an immediate.
fn operand(o: &Operand, size: Size, bitness: Bitness, imm_ok: bool) -> Check {
    match o {
        Operand::Reg(r) => {
            reg(r, bitness)?;
            if r.size != size {
                return Err("register width differs from the operation size");
            }
            Ok(())
        }
        Operand::Mem(m) => mem(m, bitness),
        Operand::Imm(_) => {
            if imm_ok {
                Ok(())
            } else {
                Err("immediate where a register or memory operand is needed")
            }
        }
    }
}

fn dst_src(size: Size, dst: &Operand, src: &Operand, bitness: Bitness) -> Check {
    size_ok(size, bitness)?;
    operand(dst, size, bitness, false)?;
    operand(src, size, bitness, true)?;
    if matches!(dst, Operand::Mem(_)) && matches!(src, Operand::Mem(_)) {
        return Err("two memory operands");
    }
    Ok(())
}

fn wide(size: Size) -> Check {
    if size == Size::S1 {
        return Err("operation size 1 is not allowed here");
    }
    Ok(())
}

fn io_size(size: Size) -> Check {
    if size == Size::S8 {
        return Err("port I/O size must be 1, 2 or 4");
    }
    Ok(())
}

fn cr(index: CrIndex) -> Check {
    if !matches!(index, 0 | 2 | 3 | 4 | 8) {
        return Err("control register is not CR0, CR2, CR3, CR4 or CR8");
    }
    Ok(())
}

fn check_op(op: &Op, bitness: Bitness) -> Check {
    let b = bitness;
    match op {
        Op::Mov { size, dst, src } => dst_src(*size, dst, src, b),
        Op::Movzx { dst, src, src_size } | Op::Movsx { dst, src, src_size } => {
            reg(dst, b)?;
            if dst.high8 {
                return Err("MOVZX/MOVSX destination cannot be a high-byte register");
            }
            if src_size.bytes() >= dst.size.bytes() {
                return Err("MOVZX/MOVSX source must be narrower than the destination");
            }
            match src {
                Operand::Imm(_) => Err("MOVZX/MOVSX source cannot be an immediate"),
                _ => operand(src, *src_size, b, false),
            }
        }
        Op::Lea { dst, addr } => {
            reg(dst, b)?;
            wide(dst.size)?;
            mem(addr, b)
        }
        Op::Alu { size, dst, src, .. } => dst_src(*size, dst, src, b),
        Op::Unary { size, dst, .. } => {
            size_ok(*size, b)?;
            operand(dst, *size, b, false)
        }
        Op::Shift {
            size, dst, count, ..
        } => {
            size_ok(*size, b)?;
            operand(dst, *size, b, false)?;
            match count {
                Operand::Imm(_) => Ok(()),
                Operand::Reg(r) if r.index == 1 && r.size == Size::S1 && !r.high8 => Ok(()),
                _ => Err("shift count must be an immediate or CL"),
            }
        }
        Op::Bit { size, dst, bit, .. } => {
            wide(*size)?;
            size_ok(*size, b)?;
            operand(dst, *size, b, false)?;
            match bit {
                Operand::Mem(_) => Err("bit offset cannot be a memory operand"),
                _ => operand(bit, *size, b, true),
            }
        }
        Op::Xchg { size, a, b: other } => {
            size_ok(*size, b)?;
            operand(a, *size, b, false)?;
            operand(other, *size, b, false)?;
            if matches!(a, Operand::Mem(_)) && matches!(other, Operand::Mem(_)) {
                return Err("two memory operands");
            }
            Ok(())
        }
        Op::Push { size, src } => {
            push_size(*size, b)?;
            operand(src, *size, b, true)
        }
        Op::Pop { size, dst } => {
            push_size(*size, b)?;
            operand(dst, *size, b, false)
        }
        Op::Setcc { dst, .. } => operand(dst, Size::S1, b, false),
        Op::Cmovcc { size, dst, src, .. } | Op::Imul { size, dst, src, .. } => {
            wide(*size)?;
            size_ok(*size, b)?;
            reg(dst, b)?;
            if dst.size != *size {
                return Err("register width differs from the operation size");
            }
            operand(src, *size, b, false)
        }
        Op::SignExtendAcc { size } | Op::SignExtendAccToDx { size } => {
            wide(*size)?;
            size_ok(*size, b)
        }
        Op::Clc | Op::Stc | Op::Cmc | Op::Cld | Op::Std | Op::Nop => Ok(()),
        Op::Jmp { .. } | Op::Jcc { .. } => Ok(()),
        Op::Loop { addr_size: a, .. } => addr_size(*a, b),
        Op::In { size, port: _ } | Op::Out { size, port: _ } => io_size(*size),
        Op::Ins {
            size, addr_size: a, ..
        }
        | Op::Outs {
            size, addr_size: a, ..
        } => {
            io_size(*size)?;
            addr_size(*a, b)
        }
        Op::Rdmsr | Op::Wrmsr | Op::Cpuid => Ok(()),
        Op::MovToCr { cr: c, src: r } => {
            cr(*c)?;
            gpr(*r, b)
        }
        Op::MovFromCr { cr: c, dst: r } => {
            cr(*c)?;
            gpr(*r, b)
        }
        Op::Clts => Ok(()),
        Op::Lmsw { src } => operand(src, Size::S2, b, false),
        Op::Rdtsc | Op::Rdtscp | Op::Rdpmc | Op::Xgetbv | Op::Xsetbv => Ok(()),
        Op::Wbinvd | Op::Invd | Op::Pause | Op::Hlt => Ok(()),
        Op::Invlpg { addr } => mem(addr, b),
    }
}

fn push_size(size: Size, bitness: Bitness) -> Check {
    match (size, bitness) {
        (Size::S2, _) | (Size::S8, Bitness::B64) => Ok(()),
        (Size::S4, Bitness::B16 | Bitness::B32) => Ok(()),
        _ => Err("push/pop width not valid for this code size"),
    }
}
