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

pub mod source;
use crate::lower::lower;
use crate::policy::{ExitClass, ExitPolicy};
pub use source::{Bytes, CodeSource, Pieces};

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

/// Translate the cluster entered at `rip`, reading the guest's code from `src`.
/// The entry point every caller uses (the AOT pass over an ELF's sections, the
/// hypervisor over guest memory). Never panics.
pub fn translate_region(
    src: &mut dyn CodeSource,
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Translated, NoCluster> {
    // A window around `rip`: the loop head before it, the look-ahead after it.
    let context = config.loop_head_context_bytes();
    let want = config
        .look_ahead
        .saturating_add(1)
        .saturating_mul(usize::from(limits::MAX_INSN_LEN) * 4)
        .min(limits::MAX_CLUSTER_BYTES * 4);
    let mut code = alloc::vec![0u8; want];
    let mut code_rip = rip;
    let mut n = 0;
    if let Some(from) = rip.checked_sub(context) {
        let mut buf = alloc::vec![0u8; context as usize + want];
        let got = src.read(from, &mut buf);
        if got > context as usize {
            buf.truncate(got);
            code = buf;
            code_rip = from;
            n = got;
        }
    }
    if code_rip == rip {
        n = src.read(rip, &mut code);
    }
    code.truncate(n);
    translate_in(&code, code_rip, rip, bitness, policy, config)
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
        cluster: Cluster::contiguous(bitness, start, guest_bytes, insns, back_edges),
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
    if (exiting < 2 && back_edges.is_empty()) || back_edges.len() > limits::MAX_BACK_EDGES {
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
mod tests;
