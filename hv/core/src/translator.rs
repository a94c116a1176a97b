//! Cluster formation: from the guest code at an exiting instruction to a translated
//! [`Cluster`] (Agesen et al., USENIX ATC 2012, section 5; DESIGN.md "Cluster rules").
//!
//! One translator, two callers: the AOT pass calls [`translate`] at every exit-prone
//! site of a guest ELF, the hypervisor at the third exit of a RIP its translations do
//! not cover. Both pass the same [`ExitPolicy`] and [`TranslatorConfig`], so both agree
//! on what a cluster is.
//!
//! The rules, in the order [`translate`] applies them:
//! 1. The cluster starts at `rip`, which must hold a strongly exiting instruction under
//!    the policy that the engine can run.
//! 2. The translator looks `look_ahead` instructions ahead of the last exiting
//!    instruction found, in address order: every exiting instruction it meets opens
//!    a new window, up to `max_cluster_insns`. The scan stops *before* an instruction it cannot decode or lower, before
//!    one only reachable from outside (after an unconditional jump, unless an earlier
//!    branch of the cluster jumps forward to it), before a gap filler that would bring
//!    its gap over `max_gap_memory_accesses`, and *after* an instruction that ends any
//!    cluster (HLT; MOV to CR0/CR4 and LMSW: translations never span a change of
//!    paging mode; MOV to CR3 too if `end_after_cr3_load` is set).
//! 3. The cluster covers the first exiting instruction to the last exiting one
//!    scanned, and no further, except for a loop: a backward branch after the last
//!    exiting instruction is included when its loop holds an exiting instruction,
//!    and when a back-edge
//!    returns to a loop head a few instructions *before* the first exiting
//!    instruction (the common `mov dx, port; in al, dx; ...; jnz head` shape), those
//!    instructions are prepended. The cluster is still entered at its first exiting
//!    instruction ([`Cluster::entry_index`]); the prefix runs only when the loop comes
//!    round. With one exiting instruction and no loop there is nothing to gain
//!    ([`NoCluster`] says why the scan found no second one).
//! 4. Branches to an instruction of the cluster become `Target::Insn`; every other
//!    target (outside the cluster, or inside an instruction) stays `Target::Exit`.
//!    A branch to an earlier (or its own) instruction is a back-edge; see
//!    [`loop_qualifies`] for when it runs without a cap.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use serde::{Deserialize, Serialize};

use crate::ir::{limits, BackEdge, Bitness, Cluster, Insn, Op, Operand, Target};
use crate::lower::lower;
use crate::policy::{ExitClass, ExitPolicy};

/// The tunable cluster rules. `Default` is the paper's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslatorConfig {
    /// How many instructions after an exiting one the translator examines for the
    /// next exiting one. Paper: 16.
    pub look_ahead: usize,
    /// The most instructions one cluster may hold, prefix included.
    pub max_cluster_insns: usize,
    /// The most instructions prepended before the first exiting one for a loop head.
    pub max_loop_head_insns: usize,
    /// The most memory accesses the gap fillers between two consecutive exiting
    /// instructions may make: each needs a software page walk. Paper: 4.
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

impl TranslatorConfig {
    /// Guest code bytes before an exiting instruction a caller should hand to
    /// [`translate_in`]: enough for the longest loop head this config allows
    /// (`max_loop_head_insns` instructions of at most 15 bytes).
    pub fn loop_head_context_bytes(&self) -> u64 {
        (self.loop_head_insns() as u64).saturating_mul(u64::from(limits::MAX_INSN_LEN))
    }

    /// `max_loop_head_insns` within what the IR accepts
    /// ([`limits::MAX_LOOP_HEAD_INSNS`]): a larger setting would build clusters
    /// the validator refuses.
    pub fn loop_head_insns(&self) -> usize {
        self.max_loop_head_insns.min(limits::MAX_LOOP_HEAD_INSNS)
    }
}

impl Default for TranslatorConfig {
    fn default() -> Self {
        TranslatorConfig {
            look_ahead: 16,
            max_cluster_insns: 128,
            max_loop_head_insns: 8,
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
    /// The look-ahead window holds no second exiting instruction, and no loop
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
    /// Control leaves (an unconditional jump) before a second exiting instruction.
    ControlLeaves,
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
            NoCluster::ControlLeaves => "control-leaves",
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
    } else if cluster.insns.iter().any(|i| is_branch(&i.op)) {
        Shape::Branching
    } else {
        Shape::StraightLine
    }
}

/// Translate the cluster entered at `rip`. `code` holds the guest's bytes from `rip`
/// on (it may end early, e.g. at the end of a section). Never panics.
pub fn translate(
    code: &[u8],
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Cluster, NoCluster> {
    translate_in(code, rip, rip, bitness, policy, config).map(|t| t.cluster)
}

/// A cluster and what kept it from growing further.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translated {
    pub cluster: Cluster,
    /// Why the scan found no exiting instruction after the cluster's last one: the
    /// window ran out (`Single`), a blocker (`Unsupported(mnemonic)`), a full gap,
    /// a cluster end, the end of the code, or control leaving.
    pub grows_no_further: NoCluster,
}

/// [`translate`], also saying what ended the cluster (for reports on what limits
/// cluster size).
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
/// `code_rip` (at or before `rip`) on. The bytes before `rip` let the translator
/// prepend a loop head (module docs, rule 3); with `code_rip == rip` there is none.
/// Never panics.
pub fn translate_in(
    code: &[u8],
    code_rip: u64,
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Translated, NoCluster> {
    // Instruction pointers do not wrap inside a cluster: only the bytes up to the top
    // of the bitness's address range count (and in 64-bit code, the last byte is
    // dropped so that `end` stays representable).
    let end_max: u64 = match bitness {
        Bitness::B16 => 0x1_0000,
        Bitness::B32 => 0x1_0000_0000,
        Bitness::B64 => u64::MAX,
    };
    if rip >= end_max || rip < code_rip {
        return Err(NoCluster::RipOutOfRange);
    }
    let before = usize::try_from(rip - code_rip).unwrap_or(usize::MAX);
    if before > code.len() {
        return Err(NoCluster::RipOutOfRange);
    }
    let (context, code) = code.split_at(before);
    let addressable = usize::try_from(end_max - rip).unwrap_or(usize::MAX);
    let code = &code[..code.len().min(addressable)];

    let scan = scan(code, rip, bitness, policy, config)?;
    if !scan.insns.iter().any(|i| i.exit_class.is_some()) {
        return Err(NoCluster::NotExiting);
    }
    // A loop head before `rip`, if a back-edge of the scan returns to one.
    let head = scan
        .insns
        .iter()
        .filter_map(|i| exit_target(&i.op))
        .filter(|&t| t < rip)
        .min()
        .and_then(|t| loop_head(context, code_rip, t, rip, bitness, policy, config))
        .unwrap_or_default();

    // The head is worth its bytes only if a branch of the cluster goes back to it.
    let with_head = if head.is_empty() {
        None
    } else {
        assemble(head, &scan.insns, config).filter(|(insns, back_edges, head_len)| {
            back_edges
                .iter()
                .any(|b| targets_below(&insns[usize::from(b.insn)].op, *head_len))
        })
    };
    let Some((mut insns, back_edges, _)) =
        with_head.or_else(|| assemble(Vec::new(), &scan.insns, config))
    else {
        return Err(scan.stop);
    };
    insns.shrink_to_fit();
    let start = insns.first().map_or(rip, |i| i.rip);
    let end = insns
        .last()
        .map_or(rip, |last| last.rip + u64::from(last.len));
    let head_bytes = usize::try_from(rip - start).unwrap_or(0);
    let mut guest_bytes = context[context.len() - head_bytes..].to_vec();
    let covered = usize::try_from(end - rip).unwrap_or(0).min(code.len());
    guest_bytes.extend_from_slice(&code[..covered]);
    Ok(Translated {
        cluster: Cluster {
            start,
            end,
            bitness,
            guest_bytes,
            insns,
            back_edges,
        },
        grows_no_further: scan.stop,
    })
}

/// Join a loop head and the scanned instructions into a cluster: cut after the last
/// exiting instruction, or after a later backward branch whose loop qualifies, and
/// resolve branches. `None` when that leaves nothing to gain: one exiting
/// instruction and no loop. Returns the instructions, back-edges and head length.
fn assemble(
    head: Vec<Insn>,
    scanned: &[Insn],
    config: &TranslatorConfig,
) -> Option<(Vec<Insn>, Vec<BackEdge>, usize)> {
    let head_len = head.len();
    let mut insns = head;
    insns.extend_from_slice(scanned);
    let last_exiting = insns.iter().rposition(|i| i.exit_class.is_some())?;
    // A trailing back-edge whose loop holds an exiting instruction (uncapped if it
    // qualifies, else capped: `resolve_branches` decides).
    let cut = (last_exiting + 1..insns.len())
        .rev()
        .find(|&j| {
            exit_target(&insns[j].op)
                .filter(|&t| t <= insns[j].rip)
                .and_then(|t| insns.binary_search_by_key(&t, |i| i.rip).ok())
                .is_some_and(|target| insns[target..=j].iter().any(|i| i.exit_class.is_some()))
        })
        .unwrap_or(last_exiting);
    insns.truncate(cut + 1);
    let back_edges = resolve_branches(&mut insns, config);
    let exiting = insns.iter().filter(|i| i.exit_class.is_some()).count();
    if exiting < 2 && back_edges.is_empty() {
        return None;
    }
    Some((insns, back_edges, head_len))
}

/// Whether `op` branches to an instruction index below `limit`.
fn targets_below(op: &Op, limit: usize) -> bool {
    matches!(
        op,
        Op::Jmp { target: Target::Insn(t) }
            | Op::Jcc { target: Target::Insn(t), .. }
            | Op::Loop { target: Target::Insn(t), .. }
            if usize::from(*t) < limit
    )
}

/// The instructions from `head` up to `rip`, if they form a loop head: they decode
/// to end exactly at `rip`, none exits or ends a cluster, the only branches are
/// conditional ones (a loop's exit test, as in `inc; cmp; je done`), they lower, and
/// they fit the gap rules. `context` holds the bytes from `code_rip` to `rip`.
fn loop_head(
    context: &[u8],
    code_rip: u64,
    head: u64,
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Option<Vec<Insn>> {
    let from = usize::try_from(head.checked_sub(code_rip)?).ok()?;
    let bytes = context.get(from..)?;
    let mut decoder = Decoder::with_ip(bitness.bits(), bytes, head, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    let mut insns = Vec::new();
    let mut accesses = 0u32;
    while decoder.ip() < rip {
        if insns.len() >= config.loop_head_insns() || !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instr);
        if instr.is_invalid() || policy.classify(&instr).is_some() {
            return None;
        }
        let op = lower(&instr).ok()?;
        let conditional = matches!(op, Op::Jcc { .. });
        if (is_branch(&op) && !conditional) || ends_cluster(&op, config) {
            return None;
        }
        accesses = accesses.saturating_add(memory_accesses(&op));
        if accesses > config.max_gap_memory_accesses {
            return None;
        }
        insns.push(Insn {
            rip: instr.ip(),
            len: instr.len() as u8,
            op,
            exit_class: None,
        });
    }
    (decoder.ip() == rip).then_some(insns)
}

/// The instructions scanned from the start, and why the scan stopped.
struct Scan {
    insns: Vec<Insn>,
    stop: NoCluster,
}

/// Decode and lower from `rip` until a rule stops the scan (module docs, rule 2).
fn scan(
    code: &[u8],
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Scan, NoCluster> {
    let mut decoder = Decoder::with_ip(bitness.bits(), code, rip, DecoderOptions::NONE);
    let mut instr = Instruction::default();

    // The first instruction: exiting, decodable, runnable, not a cluster end.
    decoder.decode_out(&mut instr);
    if instr.is_invalid() {
        return Err(NoCluster::Undecodable);
    }
    let class = policy.classify(&instr).ok_or(NoCluster::NotExiting)?;
    let op = lower(&instr).map_err(|u| NoCluster::Unsupported(u.mnemonic()))?;
    if ends_cluster(&op, config) {
        return Err(NoCluster::EndsCluster);
    }
    let first = Insn {
        rip,
        len: instr.len() as u8,
        op,
        exit_class: Some(class),
    };

    let mut next_rip = rip + instr.len() as u64;
    let mut falls_through = falls_through(&first.op);
    // Addresses later instructions are reached at by forward branches of the cluster.
    let mut forward_targets = BTreeSet::new();
    forward_targets.extend(exit_target(&first.op).filter(|&t| t > rip));
    let max_insns = config.max_cluster_insns.clamp(1, limits::MAX_CLUSTER_INSNS);
    let mut insns = Vec::with_capacity(config.look_ahead.min(max_insns) + 1);
    insns.push(first);
    let mut gap_accesses: u32 = 0;
    // Instructions scanned since the last exiting one: the window slides.
    let mut since_exit = 0usize;

    let mut stop = NoCluster::Single;
    while since_exit < config.look_ahead && insns.len() < max_insns {
        if !falls_through && !forward_targets.contains(&next_rip) {
            stop = NoCluster::ControlLeaves;
            break;
        }
        if !decoder.can_decode() {
            stop = NoCluster::CodeEnds;
            break;
        }
        let offset = decoder.position();
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            // Bytes that run out or do not decode both end the code we can translate.
            stop = NoCluster::CodeEnds;
            break;
        }
        let op = match lower(&instr) {
            Ok(op) => op,
            Err(unsupported) => {
                stop = NoCluster::Unsupported(unsupported.mnemonic());
                break;
            }
        };
        let exit_class = policy.classify(&instr);
        if exit_class.is_some() {
            gap_accesses = 0;
            since_exit = 0;
        } else {
            since_exit += 1;
            gap_accesses = gap_accesses.saturating_add(memory_accesses(&op));
            if gap_accesses > config.max_gap_memory_accesses {
                stop = NoCluster::GapTooManyMemoryAccesses;
                break;
            }
        }
        let insn_rip = rip + offset as u64;
        next_rip = insn_rip + instr.len() as u64;
        falls_through = self::falls_through(&op);
        forward_targets.extend(exit_target(&op).filter(|&t| t > insn_rip));
        let ends = ends_cluster(&op, config);
        insns.push(Insn {
            rip: insn_rip,
            len: instr.len() as u8,
            op,
            exit_class,
        });
        if ends {
            stop = NoCluster::EndsCluster;
            break;
        }
    }
    Ok(Scan { insns, stop })
}

/// Rewrite branch targets that are instructions of the cluster to `Target::Insn`, and
/// list the back-edges with their caps.
fn resolve_branches(insns: &mut [Insn], config: &TranslatorConfig) -> Vec<BackEdge> {
    let index_of = |insns: &[Insn], addr: u64| {
        insns
            .binary_search_by_key(&addr, |i| i.rip)
            .ok()
            .and_then(|k| u16::try_from(k).ok())
    };
    let mut back_edges = Vec::new();
    for at in 0..insns.len() {
        let Some(addr) = exit_target(&insns[at].op) else {
            continue;
        };
        let Some(target) = index_of(insns, addr) else {
            continue;
        };
        set_branch_target(&mut insns[at].op, Target::Insn(target));
        if usize::from(target) <= at {
            let cap = if loop_qualifies(insns, usize::from(target), at) {
                None
            } else {
                Some(config.back_edge_cap)
            };
            back_edges.push(BackEdge {
                insn: at as u16,
                cap,
            });
        }
    }
    back_edges
}

/// Whether the back-edge at `branch` to `target` (`target <= branch`) qualifies to run
/// uncapped: walking from `target` in address order, an exiting instruction comes
/// before any branch to an instruction of the cluster. A branch out of the cluster
/// (`Target::Exit`) does not count: taken, it ends the run. So every time the
/// back-edge is taken and the cluster goes on, control comes straight to that
/// exiting instruction, and each iteration does the work of an exit; the engine
/// checks for interrupts at every back-edge and stops the cluster there when one is
/// pending. Branches between `target` and `branch` must already be resolved.
pub fn loop_qualifies(insns: &[Insn], target: usize, branch: usize) -> bool {
    insns
        .get(target..=branch)
        .into_iter()
        .flatten()
        .find(|insn| insn.exit_class.is_some() || branches_inside(&insn.op))
        .is_some_and(|insn| insn.exit_class.is_some())
}

/// A branch that may stay inside the cluster: resolved to one of its instructions,
/// or not yet resolved.
fn branches_inside(op: &Op) -> bool {
    matches!(op.target(), Some(Target::Insn(_)))
}

fn is_branch(op: &Op) -> bool {
    op.target().is_some()
}

/// The absolute target of a branch op aimed at `Target::Exit` (as lowered).
fn exit_target(op: &Op) -> Option<u64> {
    match op.target()? {
        Target::Exit(addr) => Some(addr),
        Target::Insn(_) => None,
    }
}

fn set_branch_target(op: &mut Op, new: Target) {
    if let Some(target) = op.target_mut() {
        *target = new;
    }
}

/// False for ops after which execution never goes on to the next instruction.
fn falls_through(op: &Op) -> bool {
    !matches!(op, Op::Jmp { .. } | Op::Hlt)
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
        Op::Setcc { dst, .. } => mem(dst),
        Op::Xchg { a, b, .. } => mem(a) + mem(b),
        Op::Push { src, .. } => 1 + mem(src),
        Op::Pop { dst, .. } => 1 + mem(dst),
        Op::Lmsw { src } => mem(src),
        Op::Ins { rep: true, .. } | Op::Outs { rep: true, .. } => u32::MAX,
        Op::Ins { .. } | Op::Outs { .. } => 1,
        _ => 0,
    }
}

/// Exit classes of the cluster's instructions in order, for reports and tests.
pub fn exit_classes(cluster: &Cluster) -> Vec<ExitClass> {
    cluster.insns.iter().filter_map(|i| i.exit_class).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{PortSrc, Size};
    use crate::policy::{ExitPolicy, VmcsControl};
    use alloc::string::ToString;
    use alloc::vec;

    /// Concatenated encodings.
    fn asm(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn translate64(code: &[u8], rip: u64) -> Result<Cluster, NoCluster> {
        translate(
            code,
            rip,
            Bitness::B64,
            &ExitPolicy::default(),
            &TranslatorConfig::default(),
        )
    }

    // Encodings used below (64-bit unless noted).
    const CPUID: &[u8] = &[0x0f, 0xa2];
    const RDTSC: &[u8] = &[0x0f, 0x31];
    const WRMSR: &[u8] = &[0x0f, 0x30];
    const HLT: &[u8] = &[0xf4];
    const NOP: &[u8] = &[0x90];
    const STI: &[u8] = &[0xfb];
    const IN_AL_DX: &[u8] = &[0xec];
    const OUT_DX_AL: &[u8] = &[0xee];
    const OUT_80_AL: &[u8] = &[0xe6, 0x80];
    const LOAD_EAX_RBX: &[u8] = &[0x8b, 0x03]; // mov eax, [rbx]
    const STORE_RBX_EAX: &[u8] = &[0x89, 0x03]; // mov [rbx], eax
    const PUSH_RAX: &[u8] = &[0x50];
    const POP_RAX: &[u8] = &[0x58];
    const TEST_AL_20: &[u8] = &[0xa8, 0x20];
    const DEC_ECX: &[u8] = &[0xff, 0xc9];
    const MOV_CR3_RAX: &[u8] = &[0x0f, 0x22, 0xd8];
    const MOV_CR0_RAX: &[u8] = &[0x0f, 0x22, 0xc0];

    fn jz(rel: i8) -> Vec<u8> {
        vec![0x74, rel as u8]
    }
    fn jnz(rel: i8) -> Vec<u8> {
        vec![0x75, rel as u8]
    }
    fn jmp(rel: i8) -> Vec<u8> {
        vec![0xeb, rel as u8]
    }

    /// The structural promises every cluster keeps (also checked by the proptest).
    fn check_cluster(cluster: &Cluster, code: &[u8], rip: u64, config: &TranslatorConfig) {
        check_cluster_in(cluster, code, rip, rip, config)
    }

    /// [`check_cluster`] for [`translate_in`]: `code` starts at `code_rip`.
    fn check_cluster_in(
        cluster: &Cluster,
        code: &[u8],
        code_rip: u64,
        rip: u64,
        config: &TranslatorConfig,
    ) {
        let first = cluster.insns.first().expect("a cluster has instructions");
        let last = cluster.insns.last().unwrap();
        assert_eq!(first.rip, cluster.start);
        assert!(code_rip <= cluster.start && cluster.start <= rip);
        assert_eq!(
            cluster.entry_rip(),
            Some(rip),
            "entered at the exiting instruction"
        );
        let entry = cluster.entry_index().unwrap();
        assert!(entry <= config.loop_head_insns());
        // Whatever the config, the translator builds only what the IR accepts.
        if let Err(e) = crate::ir::validate(cluster) {
            panic!("the translator built a cluster the validator refuses: {e}");
        }
        for pair in cluster.insns.windows(2) {
            assert_eq!(
                pair[1].rip,
                pair[0].rip + u64::from(pair[0].len),
                "contiguous"
            );
        }
        assert_eq!(cluster.end, last.rip + u64::from(last.len));
        let from = (cluster.start - code_rip) as usize;
        let to = (cluster.end - code_rip) as usize;
        assert_eq!(cluster.guest_bytes, code[from..to]);
        let last_is_back_edge = cluster
            .back_edges
            .iter()
            .any(|b| usize::from(b.insn) == cluster.insns.len() - 1);
        assert!(last.exit_class.is_some() || last_is_back_edge);
        assert!(cluster.exiting_count() >= 2 || !cluster.back_edges.is_empty());
        if entry > 0 {
            assert!(
                cluster.insns.iter().any(|i| targets_below(&i.op, entry)),
                "a loop head is only kept when a branch returns to it"
            );
        }
        assert!(cluster.insns.len() <= config.max_cluster_insns.max(1) + config.loop_head_insns());
        let n = cluster.insns.len();
        for (at, insn) in cluster.insns.iter().enumerate() {
            assert!((1..=15).contains(&insn.len));
            if let Some(target) = insn.op.target() {
                match target {
                    Target::Insn(k) => {
                        assert!(usize::from(k) < n);
                        let backward = usize::from(k) <= at;
                        let listed = cluster.back_edges.iter().any(|b| usize::from(b.insn) == at);
                        assert_eq!(backward, listed, "back-edges are the backward branches");
                    }
                    Target::Exit(addr) => {
                        assert!(
                            cluster.insns.iter().all(|i| i.rip != addr),
                            "inside targets resolved"
                        );
                    }
                }
            }
        }
        for edge in &cluster.back_edges {
            assert!(usize::from(edge.insn) < n);
        }
    }

    #[test]
    fn starts_only_at_an_exiting_instruction() {
        assert_eq!(
            translate64(&asm(&[NOP, CPUID, CPUID]), 0x1000),
            Err(NoCluster::NotExiting)
        );
        assert_eq!(translate64(&[], 0x1000), Err(NoCluster::Undecodable));
        assert_eq!(translate64(&[0x0f], 0x1000), Err(NoCluster::Undecodable));
        // push es is invalid in 64-bit code
        assert_eq!(
            translate64(&[0x06, 0x0f, 0xa2], 0x1000),
            Err(NoCluster::Undecodable)
        );
        // VMCALL always exits but the engine cannot run it
        assert_eq!(
            translate64(&asm(&[&[0x0f, 0x01, 0xc1], CPUID]), 0x1000),
            Err(NoCluster::Unsupported(Mnemonic::Vmcall))
        );
        // HLT and paging-mode changes end every cluster
        assert_eq!(
            translate64(&asm(&[HLT, CPUID]), 0x1000),
            Err(NoCluster::EndsCluster)
        );
        assert_eq!(
            translate64(&asm(&[MOV_CR0_RAX, CPUID]), 0x1000),
            Err(NoCluster::EndsCluster)
        );
    }

    #[test]
    fn reasons_have_names_for_reports() {
        assert_eq!(
            NoCluster::Unsupported(Mnemonic::Sti).to_string(),
            "unsupported (Sti)"
        );
        assert_eq!(
            NoCluster::Unsupported(Mnemonic::Sti).blocker(),
            Some(Mnemonic::Sti)
        );
        assert_eq!(NoCluster::Single.to_string(), "single");
        assert_eq!(NoCluster::Single.blocker(), None);
        assert_eq!(Shape::Looping.name(), "looping");
        let config = TranslatorConfig::default();
        let bytes = postcard::to_allocvec(&config).unwrap();
        assert_eq!(
            postcard::from_bytes::<TranslatorConfig>(&bytes).unwrap(),
            config
        );
    }

    #[test]
    fn explains_what_ended_a_cluster() {
        let explained = |code: &[u8]| {
            translate_explained(
                code,
                0x1000,
                Bitness::B64,
                &ExitPolicy::default(),
                &TranslatorConfig::default(),
            )
            .unwrap()
            .grows_no_further
        };
        assert_eq!(
            explained(&asm(&[CPUID, RDTSC, STI])),
            NoCluster::Unsupported(Mnemonic::Sti)
        );
        assert_eq!(explained(&asm(&[CPUID, RDTSC])), NoCluster::CodeEnds);
        assert_eq!(
            explained(&asm(&[CPUID, RDTSC, HLT])),
            NoCluster::EndsCluster
        );
        let mut long = asm(&[CPUID, RDTSC]);
        long.extend(core::iter::repeat_n(0x90, 20));
        assert_eq!(explained(&long), NoCluster::Single);
    }

    #[test]
    fn two_exits_make_a_cluster_one_does_not() {
        let code = asm(&[CPUID, NOP, RDTSC, NOP, NOP]);
        let c = translate64(&code, 0x1000).unwrap();
        check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
        assert_eq!(c.insns.len(), 3, "ends at the last exiting instruction");
        assert_eq!(c.end, 0x1005);
        assert_eq!(exit_classes(&c), vec![ExitClass::Cpuid, ExitClass::Rdtsc]);
        assert_eq!(c.insns[1].exit_class, None);
        assert_eq!(shape(&c), Shape::StraightLine);

        assert_eq!(
            translate64(&asm(&[CPUID, NOP, NOP]), 0x1000),
            Err(NoCluster::CodeEnds)
        );
        assert_eq!(
            translate64(&asm(&[CPUID, &[0x0f]]), 0x1000),
            Err(NoCluster::CodeEnds)
        );
        assert_eq!(
            translate64(&asm(&[CPUID, NOP, &[0x06], CPUID]), 0x1000),
            Err(NoCluster::CodeEnds)
        );
    }

    #[test]
    fn the_window_slides_with_each_exiting_instruction() {
        // CPUID, 15 NOPs, CPUID, 15 NOPs, CPUID: each exit opens a new 16-wide window.
        let mut code = CPUID.to_vec();
        for _ in 0..2 {
            code.extend(core::iter::repeat_n(0x90, 15));
            code.extend(CPUID);
        }
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 33);
        assert_eq!(c.exiting_count(), 3);
        check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());

        let short = TranslatorConfig {
            max_cluster_insns: 20,
            ..TranslatorConfig::default()
        };
        let c = translate(&code, 0x1000, Bitness::B64, &ExitPolicy::default(), &short).unwrap();
        assert_eq!(
            c.insns.len(),
            17,
            "cut at the last exit within the size cap"
        );
        check_cluster(&c, &code, 0x1000, &short);
    }

    /// The 16550 transmit loop as compilers emit it: the back-edge returns to the
    /// `mov dx` before the exiting OUT.
    const UART_TX_LOOP: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // 0x100170 mov dx, 0x3f8      (loop head)
        0x89, 0xc8, //             0x100174 mov eax, ecx
        0xee, //                   0x100176 out dx, al         (entry)
        0x48, 0xff, 0xc6, //       0x100177 inc rsi
        0x66, 0xba, 0xfd, 0x03, // 0x10017a mov dx, 0x3fd
        0xec, //                   0x10017e in al, dx
        0xa8, 0x20, //             0x10017f test al, 0x20
        0x75, 0xed, //             0x100181 jnz 0x100170
    ];

    #[test]
    fn a_back_edge_to_a_loop_head_before_the_entry_takes_the_head_in() {
        let config = TranslatorConfig::default();
        let policy = ExitPolicy::default();
        let t = translate_in(
            UART_TX_LOOP,
            0x100170,
            0x100176,
            Bitness::B64,
            &policy,
            &config,
        )
        .unwrap();
        let c = &t.cluster;
        check_cluster_in(c, UART_TX_LOOP, 0x100170, 0x100176, &config);
        assert_eq!(c.start, 0x100170);
        assert_eq!(c.end, 0x100183);
        assert_eq!(c.entry_index(), Some(2));
        assert_eq!(c.insns.len(), 8);
        assert_eq!(
            c.insns[7].op,
            Op::Jcc {
                cond: crate::ir::Cond::Ne,
                target: Target::Insn(0)
            }
        );
        assert_eq!(c.back_edges, vec![BackEdge { insn: 7, cap: None }]);
        assert_eq!(shape(c), Shape::Looping);

        // Without the bytes before the entry there is no head, and the loop's branch
        // leaves the cluster, so the cluster ends at its last exit.
        let c = translate64(&UART_TX_LOOP[6..], 0x100176).unwrap();
        assert_eq!((c.start, c.end), (0x100176, 0x10017f));
        assert!(c.back_edges.is_empty());
    }

    #[test]
    fn a_loop_head_must_be_plain_gap_fillers_ending_at_the_entry() {
        let config = TranslatorConfig::default();
        let policy = ExitPolicy::default();
        // Head holds an exiting instruction (IN): no head, the cluster starts at the entry.
        let exiting_head: &[u8] = &[
            0xec, //       0x2000 in al, dx
            0x89, 0xc8, // 0x2001 mov eax, ecx
            0xee, //       0x2003 out dx, al (entry)
            0xec, //       0x2004 in al, dx
            0x75, 0xf9, // 0x2005 jnz 0x2000
        ];
        let t = translate_in(exiting_head, 0x2000, 0x2003, Bitness::B64, &policy, &config).unwrap();
        assert_eq!(t.cluster.start, 0x2003);
        check_cluster_in(&t.cluster, exiting_head, 0x2000, 0x2003, &config);

        // The back-edge lands inside an instruction of the head: it does not decode to
        // the entry, so no head.
        let misaligned: &[u8] = &[
            0x66, 0xba, 0xf8, 0x03, // 0x3000 mov dx, 0x3f8
            0xee, //                   0x3004 out dx, al (entry)
            0xec, //                   0x3005 in al, dx
            0x75, 0xf9, //             0x3006 jnz 0x3001
        ];
        let t = translate_in(misaligned, 0x3000, 0x3004, Bitness::B64, &policy, &config).unwrap();
        assert_eq!(t.cluster.start, 0x3004);

        // A head longer than allowed is refused.
        let tight = TranslatorConfig {
            max_loop_head_insns: 1,
            ..TranslatorConfig::default()
        };
        let t = translate_in(
            UART_TX_LOOP,
            0x100170,
            0x100176,
            Bitness::B64,
            &policy,
            &tight,
        )
        .unwrap();
        assert_eq!(t.cluster.start, 0x100176);
    }

    #[test]
    fn a_loop_head_setting_past_the_ir_limit_builds_only_valid_clusters() {
        // Ten gap fillers, then `out; in; jnz head`: a head longer than the IR allows.
        let mut code = [0xff, 0xc1].repeat(10); // 0x7000.. inc ecx
        code.extend_from_slice(&[0xee, 0xec, 0x75, 0xe8]); // 0x7014 out; in; jnz 0x7000
        let wide = TranslatorConfig {
            max_loop_head_insns: 20,
            ..TranslatorConfig::default()
        };
        let policy = ExitPolicy::default();
        let t = translate_in(&code, 0x7000, 0x7014, Bitness::B64, &policy, &wide).unwrap();
        if let Err(e) = crate::ir::validate(&t.cluster) {
            panic!("built a cluster the validator refuses: {e}");
        }
        assert_eq!(t.cluster.start, 0x7014, "no head beyond the IR's limit");
        assert_eq!(wide.loop_head_context_bytes(), 8 * 15);
    }

    #[test]
    fn a_loop_head_may_test_for_the_loop_exit() {
        // PCI probing as compiled: the head counts and leaves when done.
        let code: &[u8] = &[
            0xff, 0xc3, //             0x6000 inc ebx
            0x83, 0xfb, 0x10, //       0x6002 cmp ebx, 16
            0x74, 0x20, //             0x6005 je 0x6027 (leaves the loop)
            0x66, 0xba, 0xf8, 0x0c, // 0x6007 mov dx, 0xcf8
            0xef, //                   0x600b out dx, eax (entry)
            0x66, 0xba, 0xfc, 0x0c, // 0x600c mov dx, 0xcfc
            0xed, //                   0x6010 in eax, dx
            0x83, 0xf8, 0xff, //       0x6011 cmp eax, -1
            0x74, 0xea, //             0x6014 je 0x6000
        ];
        let config = TranslatorConfig::default();
        let policy = ExitPolicy::default();
        let t = translate_in(code, 0x6000, 0x600b, Bitness::B64, &policy, &config).unwrap();
        let c = &t.cluster;
        check_cluster_in(c, code, 0x6000, 0x600b, &config);
        assert_eq!(c.entry_index(), Some(4));
        assert!(matches!(
            c.insns[2].op,
            Op::Jcc {
                target: Target::Exit(0x6027),
                ..
            }
        ));
        assert_eq!(
            c.back_edges,
            vec![BackEdge { insn: 8, cap: None }],
            "a branch out of the cluster does not keep the loop from qualifying"
        );

        // A head branch that stays inside can skip the exits: the loop is capped.
        let mut inside = code.to_vec();
        inside[6] = 0x05; // je 0x600c: into the cluster, past the OUT
        let t = translate_in(&inside, 0x6000, 0x600b, Bitness::B64, &policy, &config).unwrap();
        check_cluster_in(&t.cluster, &inside, 0x6000, 0x600b, &config);
        assert_eq!(
            t.cluster.back_edges,
            vec![BackEdge {
                insn: 8,
                cap: Some(config.back_edge_cap)
            }]
        );
    }

    #[test]
    fn a_poll_loop_with_one_exit_is_a_cluster() {
        // top: in al, dx; test al, 0x20; jz top: every iteration is an exit.
        let code = [0xec, 0xa8, 0x20, 0x74, 0xfb];
        let c = translate64(&code, 0x5000).unwrap();
        assert_eq!(c.exiting_count(), 1);
        assert_eq!(c.insns.len(), 3);
        assert_eq!(c.back_edges, vec![BackEdge { insn: 2, cap: None }]);
        check_cluster(&c, &code, 0x5000, &TranslatorConfig::default());
    }

    #[test]
    fn looks_sixteen_instructions_ahead() {
        let mut reaches = CPUID.to_vec();
        reaches.extend(core::iter::repeat_n(0x90, 15));
        reaches.extend(CPUID); // 16th instruction after the first
        let c = translate64(&reaches, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 17);
        check_cluster(&c, &reaches, 0x1000, &TranslatorConfig::default());

        let mut beyond = CPUID.to_vec();
        beyond.extend(core::iter::repeat_n(0x90, 16));
        beyond.extend(CPUID); // 17th: outside the window
        assert_eq!(translate64(&beyond, 0x1000), Err(NoCluster::Single));

        let wide = TranslatorConfig {
            look_ahead: 17,
            ..TranslatorConfig::default()
        };
        let c = translate(&beyond, 0x1000, Bitness::B64, &ExitPolicy::default(), &wide).unwrap();
        assert_eq!(c.insns.len(), 18);
    }

    #[test]
    fn a_gap_holds_at_most_four_memory_accesses() {
        let four = asm(&[
            OUT_80_AL,
            LOAD_EAX_RBX,
            STORE_RBX_EAX,
            LOAD_EAX_RBX,
            STORE_RBX_EAX,
            OUT_80_AL,
        ]);
        let c = translate64(&four, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 6);

        let five = asm(&[
            OUT_80_AL,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            OUT_80_AL,
        ]);
        assert_eq!(
            translate64(&five, 0x1000),
            Err(NoCluster::GapTooManyMemoryAccesses)
        );

        // Each gap has its own budget.
        let two_gaps = asm(&[
            OUT_80_AL,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            OUT_80_AL,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            LOAD_EAX_RBX,
            OUT_80_AL,
        ]);
        let c = translate64(&two_gaps, 0x1000).unwrap();
        assert_eq!(c.exiting_count(), 3);

        // The scan stops at the fifth access; the cluster keeps what came before.
        let cut = asm(&[
            OUT_80_AL, OUT_80_AL, PUSH_RAX, POP_RAX, PUSH_RAX, POP_RAX, PUSH_RAX, OUT_80_AL,
        ]);
        let c = translate64(&cut, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 2);

        // Register-only fillers cost nothing.
        let mut free = OUT_80_AL.to_vec();
        for _ in 0..10 {
            free.extend([0x01, 0xc8]); // add eax, ecx
        }
        free.extend(OUT_80_AL);
        assert_eq!(translate64(&free, 0x1000).unwrap().insns.len(), 12);

        let tight = TranslatorConfig {
            max_gap_memory_accesses: 1,
            ..TranslatorConfig::default()
        };
        let policy = ExitPolicy::default();
        assert_eq!(
            translate(&four, 0x1000, Bitness::B64, &policy, &tight),
            Err(NoCluster::GapTooManyMemoryAccesses)
        );
    }

    #[test]
    fn memory_access_counting() {
        let lowered = |bytes: &[u8]| {
            let mut d = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
            lower(&d.decode()).unwrap()
        };
        assert_eq!(memory_accesses(&lowered(LOAD_EAX_RBX)), 1);
        assert_eq!(memory_accesses(&lowered(&[0x83, 0x03, 0x01])), 1); // add [rbx], 1
        assert_eq!(memory_accesses(&lowered(PUSH_RAX)), 1);
        assert_eq!(memory_accesses(&lowered(&[0xff, 0x33])), 2); // push [rbx]
        assert_eq!(memory_accesses(&lowered(&[0x8f, 0x03])), 2); // pop [rbx]
        assert_eq!(memory_accesses(&lowered(&[0x8d, 0x03])), 0); // lea
        assert_eq!(memory_accesses(&lowered(&[0x6c])), 1); // insb
        assert_eq!(memory_accesses(&lowered(&[0xf3, 0x6c])), u32::MAX); // rep insb
        assert_eq!(memory_accesses(&lowered(&[0x01, 0xc8])), 0);
    }

    #[test]
    fn a_loop_through_an_exiting_instruction_qualifies() {
        // L: in al, dx ; test al, 0x20 ; jz L ; out dx, al
        let code = asm(&[IN_AL_DX, TEST_AL_20, &jz(-5), OUT_DX_AL]);
        let c = translate64(&code, 0x2000).unwrap();
        check_cluster(&c, &code, 0x2000, &TranslatorConfig::default());
        assert_eq!(
            c.insns[2].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Insn(0)
            }
        );
        assert_eq!(c.back_edges, vec![BackEdge { insn: 2, cap: None }]);
        assert_eq!(shape(&c), Shape::Looping);
    }

    #[test]
    fn a_loop_not_sure_to_exit_is_capped() {
        // out 0x80, al ; L: dec ecx ; jnz L ; out 0x80, al
        let code = asm(&[OUT_80_AL, DEC_ECX, &jnz(-4), OUT_80_AL]);
        let c = translate64(&code, 0x1000).unwrap();
        check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
        assert_eq!(
            c.back_edges,
            vec![BackEdge {
                insn: 2,
                cap: Some(10)
            }]
        );

        let config = TranslatorConfig {
            back_edge_cap: 3,
            ..TranslatorConfig::default()
        };
        let c = translate(&code, 0x1000, Bitness::B64, &ExitPolicy::default(), &config).unwrap();
        assert_eq!(
            c.back_edges,
            vec![BackEdge {
                insn: 2,
                cap: Some(3)
            }]
        );

        // An exit behind a branch is not on the straight-line path: capped.
        // in al,dx ; L: test al,1 ; jz M ; in al,dx ; M: dec ecx ; jnz L ; out dx,al
        let code = asm(&[
            IN_AL_DX,
            &[0xa8, 0x01],
            &jz(1),
            IN_AL_DX,
            DEC_ECX,
            &jnz(-9),
            OUT_DX_AL,
        ]);
        let c = translate64(&code, 0x1000).unwrap();
        check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
        assert_eq!(
            c.insns[2].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Insn(4)
            }
        );
        assert_eq!(
            c.insns[5].op,
            Op::Jcc {
                cond: crate::ir::Cond::Ne,
                target: Target::Insn(1)
            }
        );
        assert_eq!(
            c.back_edges,
            vec![BackEdge {
                insn: 5,
                cap: Some(10)
            }]
        );

        // A self-loop (jmp $ would leave nothing after it; loop $ counts down).
        let code = asm(&[OUT_80_AL, &[0xe2, 0xfe], OUT_80_AL]);
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(
            c.back_edges,
            vec![BackEdge {
                insn: 1,
                cap: Some(10)
            }]
        );
        assert_eq!(
            c.insns[1].op,
            Op::Loop {
                kind: crate::ir::LoopKind::Loop,
                addr_size: Size::S8,
                target: Target::Insn(1)
            }
        );
    }

    #[test]
    fn forward_branches_inside_resolve_and_others_exit() {
        // in al,dx ; test al,1 ; jz over ; mov al,1 ; over: out dx,al
        let code = asm(&[IN_AL_DX, &[0xa8, 0x01], &jz(2), &[0xb0, 0x01], OUT_DX_AL]);
        let c = translate64(&code, 0x1000).unwrap();
        check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
        assert_eq!(
            c.insns[2].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Insn(4)
            }
        );
        assert!(c.back_edges.is_empty());
        assert_eq!(shape(&c), Shape::Branching);

        // A target past the last exiting instruction, or inside an instruction, exits.
        // in al,dx ; jz +1 (just past the out) ; out dx,al ; nop ; nop ; nop
        let code = asm(&[IN_AL_DX, &jz(1), OUT_DX_AL, NOP, NOP, NOP]);
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 3);
        assert_eq!(
            c.insns[1].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Exit(0x1004)
            }
        );
        // in al,dx ; jz into the middle of `out 0x80, al` ; out 0x80, al
        let code = asm(&[IN_AL_DX, &jz(1), OUT_80_AL]);
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(
            c.insns[1].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Exit(0x1004)
            }
        );
    }

    #[test]
    fn code_after_an_unconditional_jump_needs_a_branch_into_it() {
        // cpuid ; jmp away ; cpuid: the second cpuid is not reachable from the cluster
        let code = asm(&[CPUID, &jmp(0x40), CPUID]);
        assert_eq!(translate64(&code, 0x1000), Err(NoCluster::ControlLeaves));

        // in al,dx ; jz else ; out dx,al ; jmp done ; else: out 0x80,al ; done: rdtsc
        let code = asm(&[IN_AL_DX, &jz(3), OUT_DX_AL, &jmp(2), OUT_80_AL, RDTSC]);
        let c = translate64(&code, 0x1000).unwrap();
        check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
        assert_eq!(c.insns.len(), 6);
        assert_eq!(
            c.insns[1].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Insn(4)
            }
        );
        assert_eq!(
            c.insns[3].op,
            Op::Jmp {
                target: Target::Insn(5)
            }
        );
        assert_eq!(c.exiting_count(), 4);
    }

    #[test]
    fn the_cluster_ends_before_what_the_engine_cannot_run() {
        let code = asm(&[CPUID, RDTSC, STI, CPUID]);
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 2);
        assert_eq!(c.end, 0x1004);
        assert_eq!(c.guest_bytes, code[..4].to_vec());

        assert_eq!(
            translate64(&asm(&[CPUID, STI, CPUID]), 0x1000),
            Err(NoCluster::Unsupported(Mnemonic::Sti))
        );
        // lock inc dword [rax]
        assert_eq!(
            translate64(&asm(&[CPUID, &[0xf0, 0xff, 0x00], CPUID]), 0x1000),
            Err(NoCluster::Unsupported(Mnemonic::Inc))
        );
        // call rel32
        assert_eq!(
            translate64(&asm(&[CPUID, &[0xe8, 0, 0, 0, 0], CPUID]), 0x1000),
            Err(NoCluster::Unsupported(Mnemonic::Call))
        );
    }

    #[test]
    fn hlt_and_paging_changes_end_the_cluster_after_them() {
        let code = asm(&[OUT_80_AL, HLT, OUT_80_AL]);
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 2);
        assert_eq!(c.insns[1].op, Op::Hlt);

        // wrmsr ; wrmsr ; mov cr3, rax ; rdtsc: a CR3 load ends the cluster only when
        // configured to.
        let code = asm(&[WRMSR, WRMSR, MOV_CR3_RAX, RDTSC]);
        let c = translate64(&code, 0x1000).unwrap();
        assert_eq!(c.insns.len(), 4);
        let end_at_cr3 = TranslatorConfig {
            end_after_cr3_load: true,
            ..TranslatorConfig::default()
        };
        let c = translate(
            &code,
            0x1000,
            Bitness::B64,
            &ExitPolicy::default(),
            &end_at_cr3,
        )
        .unwrap();
        assert_eq!(
            exit_classes(&c),
            vec![ExitClass::Wrmsr, ExitClass::Wrmsr, ExitClass::MovToCr3]
        );
        assert_eq!(
            translate(
                &asm(&[MOV_CR3_RAX, RDTSC]),
                0x1000,
                Bitness::B64,
                &ExitPolicy::default(),
                &end_at_cr3
            ),
            Err(NoCluster::EndsCluster)
        );
        // CR4 writes and LMSW always end it.
        let code = asm(&[RDTSC, &[0x0f, 0x22, 0xe0], RDTSC]);
        assert_eq!(translate64(&code, 0x1000).unwrap().insns.len(), 2);
        let code = asm(&[RDTSC, &[0x0f, 0x01, 0xf0], RDTSC]);
        assert_eq!(translate64(&code, 0x1000).unwrap().insns.len(), 2);

        // A CR0 write that does not exit under the policy still ends the scan.
        let policy = ExitPolicy::builder().intercept_all_ports().build();
        let code = asm(&[OUT_80_AL, MOV_CR0_RAX, OUT_80_AL]);
        assert_eq!(
            translate(
                &code,
                0x1000,
                Bitness::B64,
                &policy,
                &TranslatorConfig::default()
            ),
            Err(NoCluster::EndsCluster)
        );
    }

    #[test]
    fn the_policy_decides_what_exits() {
        // With port 0x80 passed through, `out 0x80, al` is a gap filler.
        let policy = ExitPolicy::default()
            .to_builder()
            .pass_through_ports(0x80, 0x80)
            .build();
        let code = asm(&[CPUID, OUT_80_AL, NOP]);
        assert_eq!(
            translate(
                &code,
                0x1000,
                Bitness::B64,
                &policy,
                &TranslatorConfig::default()
            ),
            Err(NoCluster::CodeEnds)
        );
        let code = asm(&[CPUID, OUT_80_AL, CPUID]);
        let c = translate(
            &code,
            0x1000,
            Bitness::B64,
            &policy,
            &TranslatorConfig::default(),
        )
        .unwrap();
        assert_eq!(c.insns[1].exit_class, None);
        assert_eq!(
            c.insns[1].op,
            Op::Out {
                size: Size::S1,
                port: PortSrc::Imm(0x80)
            }
        );
        // RDTSC exiting off: rdtsc is no start.
        let policy = ExitPolicy::default()
            .to_builder()
            .disable(VmcsControl::RdtscExiting)
            .build();
        assert_eq!(
            translate(
                &asm(&[RDTSC, CPUID]),
                0x1000,
                Bitness::B64,
                &policy,
                &TranslatorConfig::default()
            ),
            Err(NoCluster::NotExiting)
        );
    }

    #[test]
    fn serial_line_status_polling_16550() {
        // mov dx,0x3fd ; in al,dx ; test al,0x20 ; jz back ; mov dx,0x3f8 ; out dx,al
        let code = asm(&[
            &[0x66, 0xba, 0xfd, 0x03],
            IN_AL_DX,
            TEST_AL_20,
            &jz(-9),
            &[0x66, 0xba, 0xf8, 0x03],
            OUT_DX_AL,
        ]);
        let base = 0xffff_ffff_8100_0000;
        assert_eq!(translate64(&code, base), Err(NoCluster::NotExiting));
        let c = translate64(&code[4..], base + 4).unwrap();
        check_cluster(&c, &code[4..], base + 4, &TranslatorConfig::default());
        assert_eq!(c.insns.len(), 5);
        // The poll's back-edge targets the `mov dx` before the cluster: it leaves.
        assert_eq!(
            c.insns[2].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Exit(base)
            }
        );
        assert!(c.back_edges.is_empty());
        assert_eq!(shape(&c), Shape::Branching);
        assert_eq!(exit_classes(&c), vec![ExitClass::In, ExitClass::Out]);

        // The same driver in 16-bit real-mode code (no operand-size prefix on mov dx).
        let code16 = asm(&[
            &[0xba, 0xfd, 0x03],
            IN_AL_DX,
            TEST_AL_20,
            &jz(-8),
            &[0xba, 0xf8, 0x03],
            OUT_DX_AL,
        ]);
        let c = translate(
            &code16[3..],
            0x7c03,
            Bitness::B16,
            &ExitPolicy::default(),
            &TranslatorConfig::default(),
        )
        .unwrap();
        check_cluster(&c, &code16[3..], 0x7c03, &TranslatorConfig::default());
        assert_eq!(
            c.insns[2].op,
            Op::Jcc {
                cond: crate::ir::Cond::E,
                target: Target::Exit(0x7c00)
            }
        );
        assert_eq!(
            c.insns[3].op,
            Op::Mov {
                size: Size::S2,
                dst: Operand::Reg(crate::ir::RegRef {
                    index: crate::ir::RDX,
                    size: Size::S2,
                    high8: false
                }),
                src: Operand::Imm(0x3f8),
            }
        );
        assert_eq!(c.end, 0x7c0c);
    }

    #[test]
    fn pci_config_read_32_bit() {
        // mov eax,0x80001008 ; mov dx,0xcf8 ; out dx,eax ; mov dx,0xcfc ; in eax,dx
        let code = asm(&[
            &[0xb8, 0x08, 0x10, 0x00, 0x80],
            &[0x66, 0xba, 0xf8, 0x0c],
            &[0xef],
            &[0x66, 0xba, 0xfc, 0x0c],
            &[0xed],
        ]);
        let rip = 0x0010_0000 + 9;
        let c = translate(
            &code[9..],
            rip,
            Bitness::B32,
            &ExitPolicy::default(),
            &TranslatorConfig::default(),
        )
        .unwrap();
        check_cluster(&c, &code[9..], rip, &TranslatorConfig::default());
        assert_eq!(c.insns.len(), 3);
        assert_eq!(
            c.insns[0].op,
            Op::Out {
                size: Size::S4,
                port: PortSrc::Dx
            }
        );
        assert_eq!(
            c.insns[2].op,
            Op::In {
                size: Size::S4,
                port: PortSrc::Dx
            }
        );
        assert_eq!(shape(&c), Shape::StraightLine);
        assert_eq!(c.bitness, Bitness::B32);
    }

    #[test]
    fn context_switch_cr3_msrs_and_tsc() {
        // mov cr3, rax ; mov ecx, 0xc0000100 ; mov rax, rsi ; mov rdx, rsi ;
        // shr rdx, 32 ; wrmsr ; mov ecx, 0xc0000101 ; wrmsr ; mov rax, cr3 ;
        // rdmsr ; rdtsc
        let code = asm(&[
            MOV_CR3_RAX,
            &[0xb9, 0x00, 0x01, 0x00, 0xc0],
            &[0x48, 0x89, 0xf0],
            &[0x48, 0x89, 0xf2],
            &[0x48, 0xc1, 0xea, 0x20],
            WRMSR,
            &[0xb9, 0x01, 0x01, 0x00, 0xc0],
            WRMSR,
            &[0x0f, 0x20, 0xd8],
            &[0x0f, 0x32],
            RDTSC,
        ]);
        let c = translate64(&code, 0xffff_ffff_8000_0000).unwrap();
        check_cluster(
            &c,
            &code,
            0xffff_ffff_8000_0000,
            &TranslatorConfig::default(),
        );
        assert_eq!(
            exit_classes(&c),
            vec![
                ExitClass::MovToCr3,
                ExitClass::Wrmsr,
                ExitClass::Wrmsr,
                ExitClass::Rdmsr,
                ExitClass::Rdtsc
            ]
        );
        // `mov rax, cr3` does not exit by default (no CR3-store exiting): a filler.
        assert_eq!(c.insns[8].op, Op::MovFromCr { cr: 3, dst: 0 });
        assert_eq!(c.insns[8].exit_class, None);
        assert_eq!(c.insns.len(), 11);
    }

    #[test]
    fn rtc_read_with_update_in_progress_wait() {
        // L: mov al,0x0a ; out 0x70,al ; in al,0x71 ; test al,0x80 ; jnz L ; mov al,0 ; out 0x70,al ; in al,0x71
        // The cluster starts at `out 0x70,al`; the back-edge leaves to `mov al,0x0a`.
        let code = asm(&[
            &[0xb0, 0x0a],
            &[0xe6, 0x70],
            &[0xe4, 0x71],
            &[0xa8, 0x80],
            &jnz(-10),
            &[0xb0, 0x00],
            &[0xe6, 0x70],
            &[0xe4, 0x71],
        ]);
        let c = translate64(&code[2..], 0x1002).unwrap();
        check_cluster(&c, &code[2..], 0x1002, &TranslatorConfig::default());
        assert_eq!(c.exiting_count(), 4);
        assert_eq!(
            c.insns[3].op,
            Op::Jcc {
                cond: crate::ir::Cond::Ne,
                target: Target::Exit(0x1000)
            }
        );
    }

    #[test]
    fn instruction_pointers_do_not_wrap() {
        // 16-bit code at the top of the segment: the second cpuid would wrap.
        let code = asm(&[CPUID, CPUID]);
        assert_eq!(
            translate(
                &code,
                0xfffe,
                Bitness::B16,
                &ExitPolicy::default(),
                &TranslatorConfig::default()
            ),
            Err(NoCluster::CodeEnds)
        );
        let c = translate(
            &code,
            0xfffc,
            Bitness::B16,
            &ExitPolicy::default(),
            &TranslatorConfig::default(),
        )
        .unwrap();
        assert_eq!(c.end, 0x10000);
        assert_eq!(
            translate(
                &code,
                0x10000,
                Bitness::B16,
                &ExitPolicy::default(),
                &TranslatorConfig::default()
            ),
            Err(NoCluster::RipOutOfRange)
        );
        assert_eq!(translate64(&code, u64::MAX - 3), Err(NoCluster::CodeEnds));
        assert_eq!(
            translate64(&code, u64::MAX - 1),
            Err(NoCluster::Undecodable)
        );
        assert!(translate64(&code, u64::MAX - 4).is_ok());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// Encodings that make clusters likely: exits, branches both ways, fillers,
        /// memory accesses, blockers.
        fn piece() -> impl Strategy<Value = Vec<u8>> {
            let fixed: Vec<Vec<u8>> = vec![
                CPUID.to_vec(),
                RDTSC.to_vec(),
                WRMSR.to_vec(),
                HLT.to_vec(),
                NOP.to_vec(),
                STI.to_vec(),
                IN_AL_DX.to_vec(),
                OUT_DX_AL.to_vec(),
                OUT_80_AL.to_vec(),
                LOAD_EAX_RBX.to_vec(),
                STORE_RBX_EAX.to_vec(),
                PUSH_RAX.to_vec(),
                POP_RAX.to_vec(),
                TEST_AL_20.to_vec(),
                DEC_ECX.to_vec(),
                MOV_CR3_RAX.to_vec(),
                MOV_CR0_RAX.to_vec(),
                vec![0xf3, 0x6c],
                vec![0x6e],
                vec![0xe4, 0x71],
                vec![0x0f, 0x32],
            ];
            prop_oneof![
                4 => proptest::sample::select(fixed),
                1 => any::<i8>().prop_map(jz),
                2 => (-24i8..0).prop_map(jnz),
                1 => any::<i8>().prop_map(jmp),
                1 => any::<i8>().prop_map(|r| vec![0xe2, r as u8]),
                1 => any::<i32>().prop_map(|r| {
                    let mut v = vec![0x0f, 0x85];
                    v.extend(r.to_le_bytes());
                    v
                }),
                1 => proptest::collection::vec(any::<u8>(), 0..6),
            ]
        }

        fn rip() -> impl Strategy<Value = u64> {
            prop_oneof![
                any::<u64>(),
                0u64..0x2_0000,
                (0u64..64).prop_map(|d| 0xffffu64.wrapping_sub(d)),
                (0u64..64).prop_map(|d| 0xffff_ffffu64.wrapping_sub(d)),
                (0u64..64).prop_map(|d| u64::MAX - d),
            ]
        }

        /// A RIP the bitness can address: low, or close to the top of its range.
        fn rip_in(bitness: Bitness) -> impl Strategy<Value = u64> {
            let top: u64 = match bitness {
                Bitness::B16 => 0xffff,
                Bitness::B32 => 0xffff_ffff,
                Bitness::B64 => u64::MAX,
            };
            prop_oneof![
                3 => 0u64..0x1000,
                1 => (0u64..48).prop_map(move |d| top - d),
            ]
        }

        fn bitness() -> impl Strategy<Value = Bitness> {
            proptest::sample::select(vec![Bitness::B16, Bitness::B32, Bitness::B64])
        }

        fn config() -> impl Strategy<Value = TranslatorConfig> {
            (
                0usize..40,
                0usize..200,
                // Past the IR's limit too: the config is clamped to it.
                0usize..20,
                0u32..6,
                0u16..20,
                any::<bool>(),
            )
                .prop_map(|(look_ahead, max_insns, max_head, max_gap, cap, cr3)| {
                    TranslatorConfig {
                        look_ahead,
                        max_cluster_insns: max_insns,
                        max_loop_head_insns: max_head,
                        max_gap_memory_accesses: max_gap,
                        back_edge_cap: cap,
                        end_after_cr3_load: cr3,
                    }
                })
        }

        fn check(code: &[u8], rip: u64, bitness: Bitness, config: &TranslatorConfig) {
            if let Ok(c) = translate(code, rip, bitness, &ExitPolicy::default(), config) {
                check_cluster(&c, code, rip, config);
                assert_eq!(c.bitness, bitness);
                for edge in &c.back_edges {
                    if edge.cap.is_some() {
                        assert_eq!(edge.cap, Some(config.back_edge_cap));
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            #[test]
            fn random_bytes_never_panic(code in proptest::collection::vec(any::<u8>(), 0..80), rip in rip(), bitness in bitness()) {
                check(&code, rip, bitness, &TranslatorConfig::default());
            }

            #[test]
            fn loops_with_heads_keep_cluster_promises(
                head in proptest::collection::vec(piece(), 0..5),
                first in proptest::sample::select(vec![CPUID, RDTSC, IN_AL_DX, OUT_80_AL, WRMSR]),
                pieces in proptest::collection::vec(piece(), 0..10),
                back_to in any::<proptest::sample::Index>(),
                config in config(),
            ) {
                let base = 0x40_0000u64;
                let mut code: Vec<u8> = head.concat();
                let entry = code.len();
                code.extend(first);
                for p in &pieces {
                    code.extend(p);
                }
                // A JNZ back to a random byte at or before the entry.
                let target = back_to.index(entry + 1);
                let rel = target as i64 - (code.len() as i64 + 2);
                if let Ok(rel) = i8::try_from(rel) {
                    code.extend(jnz(rel));
                }
                let rip = base + entry as u64;
                let policy = ExitPolicy::default();
                if let Ok(t) = translate_in(&code, base, rip, Bitness::B64, &policy, &config) {
                    check_cluster_in(&t.cluster, &code, base, rip, &config);
                }
            }

            #[test]
            fn instruction_soup_keeps_cluster_promises(
                first in proptest::sample::select(vec![CPUID, RDTSC, IN_AL_DX, OUT_80_AL, WRMSR]),
                pieces in proptest::collection::vec(piece(), 0..24),
                (bitness, rip) in bitness().prop_flat_map(|b| (Just(b), rip_in(b))),
                config in config(),
            ) {
                let mut code = first.to_vec();
                for p in &pieces {
                    code.extend(p);
                }
                check(&code, rip, bitness, &config);
            }
        }
    }
}
