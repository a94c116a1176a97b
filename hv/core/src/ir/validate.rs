//! The IR contract: every rule a cluster must satisfy before the engine may run
//! it. One validator serves every source of clusters (decoded translation files,
//! the AOT pass, the run-time translator); its limits are [`super::limits`].

use core::fmt;

use super::limits::{
    MAX_BACK_EDGES, MAX_CLUSTER_BYTES, MAX_CLUSTER_INSNS, MAX_CODE_RANGES, MAX_GUARDS,
    MAX_INSN_LEN, MAX_LOOP_HEAD_INSNS,
};
use super::*;

/// Why a cluster is not acceptable to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterError {
    /// No instructions.
    Empty,
    /// The cluster does not start at an exiting instruction of its class, nor at a
    /// loop head of at most [`MAX_LOOP_HEAD_INSNS`] gap fillers (conditional branches
    /// allowed, no exiting instruction) that one of its back-edges reaches.
    FirstNotExiting,
    /// An instruction length outside 1..=15.
    BadLength { insn: usize, len: u8 },
    /// An instruction does not lie inside one of the cluster's code ranges.
    OutsideCode { insn: usize, rip: u64 },
    /// Two instructions at one RIP with different lengths.
    LengthDiffers { insn: usize, rip: u64 },
    /// A code range is empty, wraps around (or leaves the 4 GiB space of 16/32-bit
    /// code), overlaps or touches the previous one, or is out of order.
    BadCodeRange { range: usize, reason: &'static str },
    /// The cluster covers more than [`MAX_CLUSTER_BYTES`] bytes or
    /// [`MAX_CODE_RANGES`] ranges.
    TooLarge { bytes: u64 },
    /// More than [`MAX_CLUSTER_INSNS`] instructions.
    TooManyInsns { count: usize },
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
    /// A `Guard` record that is out of range, out of order, not on a guarded
    /// instruction, or whose target is not at its expected address.
    BadGuard { index: usize, reason: &'static str },
    /// A `learn_sites` record is malformed.
    BadLearnSite { index: usize, reason: &'static str },
    /// `exit_class` does not match the op.
    ExitClassMismatch { insn: usize },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ClusterError::*;
        match self {
            Empty => write!(f, "no instructions"),
            FirstNotExiting => write!(
                f,
                "does not start at an exiting instruction (or at a loop head of at most {MAX_LOOP_HEAD_INSNS} gap fillers, no exiting instruction, that a back-edge reaches)"
            ),
            BadLength { insn, len } => {
                write!(f, "instruction {insn}: length {len} is outside 1..=15")
            }
            OutsideCode { insn, rip } => write!(
                f,
                "instruction {insn}: at {rip:#x}, not inside one of the cluster's code ranges"
            ),
            LengthDiffers { insn, rip } => write!(
                f,
                "instruction {insn}: at {rip:#x} with a length another instruction there does not have"
            ),
            BadCodeRange { range, reason } => write!(f, "code range {range}: {reason}"),
            TooLarge { bytes } => write!(
                f,
                "covers {bytes} bytes, more than the limit {MAX_CLUSTER_BYTES} (or more than {MAX_CODE_RANGES} code ranges)"
            ),
            TooManyInsns { count } => write!(
                f,
                "{count} instructions, more than the limit {MAX_CLUSTER_INSNS}"
            ),
            Operand { insn, reason } => write!(f, "instruction {insn}: {reason}"),
            TargetOutOfRange { insn, target, count } => write!(
                f,
                "instruction {insn}: branch target index {target} is outside the cluster's {count} instructions"
            ),
            UnrecordedBackEdge { insn } => {
                write!(f, "instruction {insn}: backward branch without a back-edge record")
            }
            BadBackEdge { index, reason } => write!(f, "back-edge record {index}: {reason}"),
            BadGuard { index, reason } => write!(f, "guard record {index}: {reason}"),
            BadLearnSite { index, reason } => write!(f, "learn-site record {index}: {reason}"),
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
    check_code_ranges(c)?;
    if n > MAX_CLUSTER_INSNS {
        return Err(CE::TooManyInsns { count: n });
    }
    for (i, insn) in c.insns.iter().enumerate() {
        if insn.len == 0 || insn.len > MAX_INSN_LEN {
            return Err(CE::BadLength {
                insn: i,
                len: insn.len,
            });
        }
        if !c.code.iter().any(|r| r.holds(insn.rip, insn.len.into())) {
            return Err(CE::OutsideCode {
                insn: i,
                rip: insn.rip,
            });
        }
    }
    // One RIP, one instruction: a block laid out twice decodes the same.
    let mut by_rip: Vec<(u64, u8)> = c.insns.iter().map(|i| (i.rip, i.len)).collect();
    by_rip.sort_unstable();
    if let Some(w) = by_rip
        .windows(2)
        .find(|w| w[0].0 == w[1].0 && w[0].1 != w[1].1)
    {
        let rip = w[0].0;
        let insn = c.insns.iter().position(|i| i.rip == rip).unwrap_or(0);
        return Err(CE::LengthDiffers { insn, rip });
    }

    check_back_edges(c)?;
    check_guards(c)?;
    for (i, insn) in c.insns.iter().enumerate() {
        check_op(&insn.op, c.bitness).map_err(|reason| CE::Operand { insn: i, reason })?;
        check_return_address(insn).map_err(|reason| CE::Operand { insn: i, reason })?;
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
        let plain = c.insns[..entry].iter().all(|i| {
            i.exit_class.is_none() && i.op.falls_through() && !matches!(i.op, Op::Loop { .. })
        });
        let reached = c.back_edges.iter().any(|b| {
            let at = usize::from(b.insn);
            let direct = matches!(c.insns[at].op.target(),
                Some(Target::Insn(t)) if (t as usize) < entry);
            direct
                || c.guards_of(at)
                    .any(|g| matches!(g.target, Target::Insn(t) if (t as usize) < entry))
        });
        if !plain || !reached {
            return Err(CE::FirstNotExiting);
        }
    }

    Ok(())
}

/// Code ranges: in order, apart, within the address space, within the limits.
fn check_code_ranges(c: &Cluster) -> Result<(), ClusterError> {
    use ClusterError as CE;
    let limit: u64 = match c.bitness {
        Bitness::B64 => u64::MAX,
        _ => 1 << 32,
    };
    if c.code.is_empty() || c.code.len() > MAX_CODE_RANGES {
        return Err(CE::BadCodeRange {
            range: c.code.len(),
            reason: "a cluster has 1 to 32 code ranges",
        });
    }
    let mut total = 0u64;
    let mut prev_end: Option<u64> = None;
    for (k, r) in c.code.iter().enumerate() {
        let bad = |reason| CE::BadCodeRange { range: k, reason };
        if r.bytes.is_empty() {
            return Err(bad("empty"));
        }
        match r.start.checked_add(r.bytes.len() as u64) {
            Some(e) if e <= limit => {}
            _ => return Err(bad("wraps around the address space")),
        }
        if prev_end.is_some_and(|p| r.start <= p) {
            return Err(bad(
                "does not start after the previous range ends (ranges are sorted, apart and not touching)",
            ));
        }
        prev_end = Some(r.end());
        total = total.saturating_add(r.bytes.len() as u64);
        if total > MAX_CLUSTER_BYTES as u64 {
            return Err(CE::TooLarge { bytes: total });
        }
    }
    Ok(())
}

fn check_back_edges(c: &Cluster) -> Result<(), ClusterError> {
    use ClusterError as CE;
    let n = c.insns.len();
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
        let at = usize::from(b.insn);
        let backward = |t: Target| matches!(t, Target::Insn(t) if t <= b.insn);
        let op = &c.insns[at].op;
        let ok = match op.target() {
            Some(t) => backward(t),
            None if op.is_guarded() => c.guards_of(at).any(|g| backward(g.target)),
            None => return Err(bad("the instruction is not a branch")),
        };
        if !ok {
            return Err(bad("the instruction is not a backward branch"));
        }
    }
    Ok(())
}

fn check_guards(c: &Cluster) -> Result<(), ClusterError> {
    use ClusterError as CE;
    let n = c.insns.len();
    if c.guards.len() > MAX_GUARDS {
        return Err(CE::BadGuard {
            index: MAX_GUARDS,
            reason: "more guard records than the limit (256)",
        });
    }
    let mut prev: Option<u16> = None;
    for (k, g) in c.guards.iter().enumerate() {
        let bad = |reason| CE::BadGuard { index: k, reason };
        let at = usize::from(g.insn);
        if at >= n {
            return Err(bad("instruction index outside the cluster"));
        }
        if prev.is_some_and(|p| g.insn < p) {
            return Err(bad("records must be sorted by instruction index"));
        }
        prev = Some(g.insn);
        if !c.insns[at].op.is_guarded() {
            return Err(bad("the instruction is not an indirect CALL/JMP or a RET"));
        }
        match g.target {
            Target::Insn(t) => {
                let Some(target) = c.insns.get(usize::from(t)) else {
                    return Err(bad("target index outside the cluster"));
                };
                if target.rip != g.expect {
                    return Err(bad("target instruction is not at the expected address"));
                }
                if t <= g.insn && !c.back_edges.iter().any(|b| b.insn == g.insn) {
                    return Err(bad("backward target without a back-edge record"));
                }
            }
            Target::Exit(rip) if rip != g.expect => {
                return Err(bad("exit address is not the expected address"));
            }
            Target::Exit(_) => {}
        }
    }
    let mut prev: Option<u16> = None;
    for (k, l) in c.learn_sites.iter().enumerate() {
        let bad = |reason| CE::BadLearnSite { index: k, reason };
        let at = usize::from(l.insn);
        if at >= n {
            return Err(bad("instruction index outside the cluster"));
        }
        if prev.is_some_and(|p| l.insn <= p) {
            return Err(bad("records must be sorted by instruction index, one each"));
        }
        prev = Some(l.insn);
        if !c.insns[at].op.is_guarded() {
            return Err(bad("the instruction is not an indirect CALL/JMP or a RET"));
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
        Op::Pushf { size } | Op::Popf { size } | Op::Leave { size } => push_size(*size, b),
        Op::Cli | Op::Sti => Ok(()),
        Op::Cmpxchg { size, dst, src } | Op::Xadd { size, dst, src } => {
            size_ok(*size, b)?;
            operand(dst, *size, b, false)?;
            operand(&Operand::Reg(*src), *size, b, false)
        }
        Op::Bswap { dst } => {
            reg(dst, b)?;
            if !matches!(dst.size, Size::S4 | Size::S8) {
                return Err("BSWAP operand size must be 4 or 8");
            }
            Ok(())
        }
        Op::MulWide { size, src, .. } => {
            size_ok(*size, b)?;
            operand(src, *size, b, false)
        }
        Op::Jmp { .. } | Op::Jcc { .. } => Ok(()),
        Op::Loop { addr_size: a, .. } => addr_size(*a, b),
        Op::Call { size, .. } | Op::Ret { size, .. } => near_branch_size(*size, b),
        Op::CallIndirect { size, src, .. } | Op::JmpIndirect { size, src } => {
            near_branch_size(*size, b)?;
            operand(src, *size, b, false)
        }
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

/// The operand size of a near CALL, RET or indirect JMP: 16 or 32 bits outside
/// 64-bit code (the return address pushed and popped at that width); in 64-bit code
/// always 64, as on Intel CPUs, which ignore an operand-size prefix on near
/// branches (SDM Vol. 1 3.6.1, Vol. 2 CALL/RET: "forced to 64 bits").
fn near_branch_size(size: Size, bitness: Bitness) -> Check {
    match (size, bitness) {
        (Size::S8, Bitness::B64) | (Size::S2 | Size::S4, Bitness::B16 | Bitness::B32) => Ok(()),
        (_, Bitness::B64) => Err("near CALL/RET/JMP in 64-bit code has operand size 8"),
        _ => Err("near CALL/RET/JMP outside 64-bit code has operand size 2 or 4"),
    }
}

/// A CALL pushes the address of the instruction after it, at its operand size:
/// the return address a guard of the callee's RET expects, so it must be exact.
fn check_return_address(insn: &Insn) -> Check {
    match insn.op {
        Op::Call { size, ret, .. } | Op::CallIndirect { size, ret, .. } => {
            let next = insn.rip.wrapping_add(u64::from(insn.len)) & size.mask();
            if ret != next {
                return Err("return address is not the address after the CALL");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
