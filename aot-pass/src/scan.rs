//! Code discovery: recursive traversal from known code addresses, then a linear sweep
//! of every byte range traversal did not reach, decoding with iced-x86 and classifying
//! each instruction with the exit policy.
//!
//! Parallelism: each region is split into chunks (at function symbols where there are
//! any, else at fixed offsets). Traversal runs per chunk in rounds, handing branch
//! targets in other chunks to their owners between rounds. The gap sweep runs per chunk;
//! a chunk that does not start at a known instruction is then re-synchronized with the
//! sweep of the chunk before it (re-decoding from where that sweep left off until it
//! meets an instruction start this chunk already decoded), so the result is exactly
//! that of one sequential sweep.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};
use rayon::prelude::*;

use crate::api::{exit_class_of, ExitClass, ExitPolicy};
use avex_core::ir::Bitness;

/// A contiguous run of code decoded in one bitness.
#[derive(Clone, Debug)]
pub struct Region<'a> {
    pub area: usize,
    pub addr: u64,
    pub bytes: &'a [u8],
    pub bitness: Bitness,
    pub space: usize,
}

impl Region<'_> {
    pub fn end(&self) -> u64 {
        self.addr + self.bytes.len() as u64
    }
}

/// What scanning found in one region.
#[derive(Debug, Default)]
pub struct RegionScan {
    /// Exit-prone sites (the policy's classification), sorted by address.
    pub sites: Vec<(u64, ExitClass)>,
    /// Instructions of an exit class whatever the policy, per class.
    pub by_class: Vec<(ExitClass, u64)>,
    pub instructions: u64,
    /// Bytes covered by decoded instructions.
    pub bytes_decoded: u64,
    /// Bytes reached by recursive traversal (the rest by linear sweep).
    pub bytes_traversed: u64,
    /// Byte positions that did not decode (each invalid instruction counts 1).
    pub invalid: u64,
    /// Far jumps with an immediate target: (target, bitness of the jump).
    pub far_targets: Vec<u64>,
    /// Control transfers the indirect-destination knowledge is built from
    /// (`crate::targets`), sorted by address.
    /// Per chunk of the scan, each sorted, the chunks in address order.
    pub branches: Vec<Vec<Branch>>,
}

/// A control transfer found while decoding (16 bytes: vmlinux has over a million).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Branch {
    /// Address of the instruction.
    pub at: u64,
    /// Target minus `next()` (direct branches), or the displacement (`CallField`).
    rel: i32,
    len: u8,
    tag: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchKind {
    /// Direct near CALL to this address.
    Call(u64),
    /// Direct near unconditional JMP to this address (only those whose target
    /// may be a thunk: see `THUNK_FIRST_BYTES`).
    Jmp(u64),
    /// RET (without an immediate).
    Ret,
    /// `call *disp(%reg)` (a base register, no index): a call through a field of a
    /// structure, this displacement.
    CallField(i64),
    /// `call *slot(%rip)` or `call *slot` (no register): a call through the
    /// pointer stored at this address (Linux's paravirt calls through pv_ops).
    CallSlot(u64),
}

use avex_core::translator::THUNK_FIRST_BYTES;

const CALL: u8 = 0;
const JMP: u8 = 1;
const RET: u8 = 2;
const CALL_FIELD: u8 = 3;
const CALL_SLOT: u8 = 4;

impl Branch {
    fn new(ins: &Instruction, kind: BranchKind) -> Option<Branch> {
        let next = ins.next_ip();
        let (tag, rel) = match kind {
            BranchKind::Call(t) => (CALL, t.wrapping_sub(next) as i64),
            BranchKind::Jmp(t) => (JMP, t.wrapping_sub(next) as i64),
            BranchKind::Ret => (RET, 0),
            BranchKind::CallField(d) => (CALL_FIELD, d),
            BranchKind::CallSlot(a) => (CALL_SLOT, a.wrapping_sub(next) as i64),
        };
        Some(Branch {
            at: ins.ip(),
            rel: i32::try_from(rel).ok()?,
            len: ins.len() as u8,
            tag,
        })
    }

    /// Address of the next instruction (a CALL's return address).
    pub fn next(&self) -> u64 {
        self.at.wrapping_add(u64::from(self.len))
    }

    pub fn kind(&self) -> BranchKind {
        let target = self.next().wrapping_add(i64::from(self.rel) as u64);
        match self.tag {
            CALL => BranchKind::Call(target),
            JMP => BranchKind::Jmp(target),
            RET => BranchKind::Ret,
            CALL_SLOT => BranchKind::CallSlot(target),
            _ => BranchKind::CallField(i64::from(self.rel)),
        }
    }
}

fn branch_of(ins: &Instruction) -> Option<BranchKind> {
    match ins.flow_control() {
        FlowControl::Call if !ins.is_call_far() => Some(BranchKind::Call(ins.near_branch_target())),
        FlowControl::UnconditionalBranch if !ins.is_jmp_far() => {
            Some(BranchKind::Jmp(ins.near_branch_target()))
        }
        FlowControl::Return if matches!(ins.code(), Code::Retnq | Code::Retnd | Code::Retnw) => {
            Some(BranchKind::Ret)
        }
        FlowControl::IndirectCall
            if ins.op0_kind() == OpKind::Memory
                && ins.memory_base() != Register::None
                && ins.memory_base() != Register::RIP
                && ins.memory_base() != Register::EIP
                && ins.memory_index() == Register::None =>
        {
            Some(BranchKind::CallField(ins.memory_displacement64() as i64))
        }
        FlowControl::IndirectCall
            if ins.op0_kind() == OpKind::Memory
                && matches!(
                    ins.memory_base(),
                    Register::None | Register::RIP | Register::EIP
                )
                && ins.memory_index() == Register::None
                && ins.segment_prefix() == Register::None =>
        {
            // iced gives RIP-relative operands as absolute addresses.
            Some(BranchKind::CallSlot(ins.memory_displacement64()))
        }
        _ => None,
    }
}

const CHUNK: usize = 256 * 1024;

struct Bits(Vec<u64>);
impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    #[inline]
    fn get(&self, i: usize) -> bool {
        self.0[i >> 6] >> (i & 63) & 1 != 0
    }
    #[inline]
    fn set(&mut self, i: usize) {
        self.0[i >> 6] |= 1 << (i & 63);
    }
    /// Sets bits `lo..hi` a word at a time (the hot path: every decoded
    /// instruction's bytes).
    #[inline]
    fn set_range(&mut self, lo: usize, hi: usize) {
        let mut i = lo;
        while i < hi {
            let bit = i & 63;
            let n = (64 - bit).min(hi - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.0[i >> 6] |= mask;
            i += n;
        }
    }
    #[inline]
    fn clear(&mut self, i: usize) {
        self.0[i >> 6] &= !(1 << (i & 63));
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

struct Chunk {
    /// Offsets into the region.
    start: usize,
    end: usize,
    /// Starts at a symbol (or the region start): its sweep needs no re-synchronization.
    synced: bool,
    /// Instruction starts and covered bytes, indexed from `start`.
    starts: Bits,
    covered: Bits,
    traversed: Bits,
    sites: Vec<(u64, ExitClass, bool)>,
    /// Region offsets of undecodable positions.
    invalid: Vec<usize>,
    /// (region offset of the jump, target).
    far_targets: Vec<(usize, u64)>,
    branches: Vec<Branch>,
    /// Traversal roots not yet visited (region offsets).
    pending: Vec<usize>,
    /// Branch targets found in other chunks (region offsets), handed over after a round.
    outgoing: Vec<usize>,
    /// Where the chunk's last instruction (traversed or swept) ends (region offset,
    /// may be >= `end`): where a sequential sweep would enter the next chunk.
    sweep_exit: usize,
    /// Where the chunk's last traversed instruction ends (region offset).
    trav_exit: usize,
    /// End of the first gap (region offset), if the chunk starts in a gap.
    first_gap_end: Option<usize>,
}

struct Ctx<'r, 'a> {
    region: &'r Region<'a>,
    policy: &'r ExitPolicy,
}

impl Ctx<'_, '_> {
    fn decoder(&self, off: usize) -> Decoder<'_> {
        let mut d = Decoder::with_ip(
            self.region.bitness.bits(),
            self.region.bytes,
            self.region.addr,
            DecoderOptions::NONE,
        );
        // `off` is always within the region.
        let _ = d.set_position(off);
        d.set_ip(self.region.addr + off as u64);
        d
    }

    /// Decodes one instruction at `off`, recording it in `c`. Returns the instruction.
    fn record(&self, c: &mut Chunk, off: usize, ins: &Instruction) {
        let rel = off - c.start;
        c.starts.set(rel);
        let len = ins.len().max(1);
        c.sweep_exit = c.sweep_exit.max(off + len);
        c.covered.set_range(rel, (rel + len).min(c.end - c.start));
        if ins.is_invalid() {
            c.invalid.push(off);
            return;
        }
        if let Some(class) = exit_class_of(ins) {
            let exits = self.policy.classify(ins).is_some();
            c.sites.push((ins.ip(), class, exits));
        }
        if let Some(k) = branch_of(ins) {
            // A jump matters to the knowledge only if it may go to a thunk: most
            // jumps stay in their function and are dropped by their target's byte.
            let keep = match k {
                BranchKind::Jmp(t) => t
                    .checked_sub(self.region.addr)
                    .and_then(|o| self.region.bytes.get(usize::try_from(o).ok()?))
                    .is_none_or(|&b| THUNK_FIRST_BYTES.contains(&b)),
                _ => true,
            };
            if let Some(b) = Branch::new(ins, k).filter(|_| keep) {
                c.branches.push(b);
            }
        }
        if matches!(ins.code(), Code::Jmp_ptr1632 | Code::Jmp_ptr1616)
            && self.region.bitness != Bitness::B64
        {
            let t = if ins.code() == Code::Jmp_ptr1632 {
                u64::from(ins.far_branch32())
            } else {
                u64::from(ins.far_branch16())
            };
            c.far_targets.push((off, t));
        }
    }

    fn traverse(&self, c: &mut Chunk) {
        let region_len = self.region.bytes.len();
        let mut ins = Instruction::default();
        let mut d = self.decoder(0);
        while let Some(root) = c.pending.pop() {
            let mut off = root;
            let _ = d.set_position(off);
            d.set_ip(self.region.addr + off as u64);
            loop {
                if off < c.start || off >= c.end {
                    if off < region_len {
                        c.outgoing.push(off);
                    }
                    break;
                }
                let rel = off - c.start;
                if c.traversed.get(rel) {
                    break;
                }
                d.decode_out(&mut ins);
                self.record(c, off, &ins);
                let len = ins.len().max(1);
                c.traversed.set_range(rel, (rel + len).min(c.end - c.start));
                c.trav_exit = c.trav_exit.max(off + len);
                if ins.is_invalid() {
                    break;
                }
                let next = off + ins.len();
                match ins.flow_control() {
                    FlowControl::Next | FlowControl::Interrupt | FlowControl::XbeginXabortXend => {
                        if ins.code() == Code::Ud2 {
                            break;
                        }
                    }
                    FlowControl::ConditionalBranch | FlowControl::Call => {
                        self.push_target(c, &ins);
                    }
                    FlowControl::UnconditionalBranch => {
                        self.push_target(c, &ins);
                        break;
                    }
                    FlowControl::IndirectBranch | FlowControl::Return | FlowControl::Exception => {
                        break
                    }
                    FlowControl::IndirectCall => {}
                }
                off = next;
            }
        }
    }

    fn push_target(&self, c: &mut Chunk, ins: &Instruction) {
        if ins.is_jmp_far() || ins.is_call_far() {
            return;
        }
        let t = ins.near_branch_target();
        if self.region.bitness != Bitness::B64 && t == 0 && ins.near_branch64() == 0 {
            // Unresolved (relocatable) target; the fallthrough is followed anyway.
        }
        if t >= self.region.addr && t < self.region.end() {
            let off = (t - self.region.addr) as usize;
            if off >= c.start && off < c.end {
                c.pending.push(off);
            } else {
                c.outgoing.push(off);
            }
        }
    }

    /// Linear sweep of every gap in the chunk (bytes traversal did not cover).
    fn sweep(&self, c: &mut Chunk) {
        let mut ins = Instruction::default();
        let n = c.end - c.start;
        let mut rel = 0;
        while rel < n {
            if c.covered.get(rel) {
                rel += 1;
                continue;
            }
            let gap_start = rel;
            let mut gap_end = rel;
            while gap_end < n && !c.covered.get(gap_end) {
                gap_end += 1;
            }
            if gap_start == 0 {
                c.first_gap_end = Some(c.start + gap_end);
            }
            let mut d = self.decoder(c.start + gap_start);
            let mut off = c.start + gap_start;
            while off < c.start + gap_end {
                d.decode_out(&mut ins);
                self.record(c, off, &ins);
                off += ins.len().max(1);
                if ins.is_invalid() {
                    let _ = d.set_position(off);
                    d.set_ip(self.region.addr + off as u64);
                }
            }
            rel = gap_end;
        }
    }
}

/// Scans one region from `roots` (addresses inside it).
pub fn scan_region(
    region: &Region<'_>,
    roots: &[u64],
    chunk_starts_hint: &[u64],
    policy: &ExitPolicy,
) -> RegionScan {
    scan_region_chunked(region, roots, chunk_starts_hint, policy, CHUNK)
}

fn scan_region_chunked(
    region: &Region<'_>,
    roots: &[u64],
    chunk_starts_hint: &[u64],
    policy: &ExitPolicy,
    chunk: usize,
) -> RegionScan {
    let chunk = chunk.max(16);
    let cx = Ctx { region, policy };
    let len = region.bytes.len();
    if len == 0 {
        return RegionScan::default();
    }
    // Chunk boundaries: every CHUNK bytes, moved forward to the next hinted start
    // (function symbol) when one is near.
    let mut bounds = vec![(0usize, true)];
    let mut hints: Vec<usize> = chunk_starts_hint
        .iter()
        .filter(|&&a| a > region.addr && a < region.end())
        .map(|&a| (a - region.addr) as usize)
        .collect();
    hints.sort_unstable();
    hints.dedup();
    let mut next = chunk;
    while next + chunk / 4 < len {
        let i = hints.partition_point(|&h| h < next);
        match hints.get(i) {
            Some(&h) if h < next + chunk / 2 => {
                bounds.push((h, true));
                next = h + chunk;
            }
            _ => {
                // Keep chunk starts 64-byte aligned within the region.
                bounds.push((next, false));
                next += chunk;
            }
        }
    }
    let mut chunks: Vec<Chunk> = bounds
        .iter()
        .enumerate()
        .map(|(i, &(s, synced))| {
            let e = bounds.get(i + 1).map_or(len, |b| b.0);
            Chunk {
                start: s,
                end: e,
                synced,
                starts: Bits::new(e - s),
                covered: Bits::new(e - s),
                traversed: Bits::new(e - s),
                sites: Vec::new(),
                invalid: Vec::new(),
                far_targets: Vec::new(),
                // About one instruction in five is a call, jump or return.
                branches: Vec::with_capacity((e - s) / 16),
                pending: Vec::new(),
                outgoing: Vec::new(),
                sweep_exit: s,
                trav_exit: s,
                first_gap_end: None,
            }
        })
        .collect();
    let owner = |chunks: &[Chunk], off: usize| chunks.partition_point(|c| c.start <= off) - 1;
    for &r in roots {
        if r >= region.addr && r < region.end() {
            let off = (r - region.addr) as usize;
            let o = owner(&chunks, off);
            chunks[o].pending.push(off);
        }
    }
    // Traversal rounds.
    loop {
        if chunks.iter().all(|c| c.pending.is_empty()) {
            break;
        }
        chunks.par_iter_mut().for_each(|c| cx.traverse(c));
        let mut handoff = Vec::new();
        for c in chunks.iter_mut() {
            handoff.append(&mut c.outgoing);
        }
        for off in handoff {
            let o = owner(&chunks, off);
            if !chunks[o].traversed.get(off - chunks[o].start) {
                chunks[o].pending.push(off);
            }
        }
    }
    chunks.par_iter_mut().for_each(|c| cx.sweep(c));
    // Re-synchronize chunks that start in the middle of a linear sweep.
    let mut ins = Instruction::default();
    for k in 1..chunks.len() {
        let p = chunks[k - 1].sweep_exit;
        let c = &mut chunks[k];
        let Some(gap_end) = c.first_gap_end else {
            continue; // starts at a traversed instruction
        };
        if c.synced || p <= c.start {
            continue;
        }
        // The previous chunk's sweep ran to `p`; decode from there until meeting an
        // instruction start of this chunk's sweep.
        let stop = gap_end.min(c.end);
        let mut q = p;
        let mut fresh = Vec::new();
        let mut d = cx.decoder(q.min(len));
        while q < stop && !c.starts.get(q - c.start) {
            d.decode_out(&mut ins);
            fresh.push((q, ins));
            q += ins.len().max(1);
            if ins.is_invalid() {
                let _ = d.set_position(q.min(len));
                d.set_ip(region.addr + q as u64);
            }
        }
        // Forget this chunk's records in [start, q), then record the fresh ones.
        for rel in 0..(q.min(c.end) - c.start) {
            c.starts.clear(rel);
            if c.start + rel < gap_end {
                c.covered.clear(rel);
            }
        }
        let lo = region.addr + c.start as u64;
        let hi = region.addr + q as u64;
        c.sites.retain(|&(a, _, _)| a < lo || a >= hi);
        c.branches.retain(|b| b.at < lo || b.at >= hi);
        c.invalid.retain(|&o| o < c.start || o >= q);
        c.far_targets.retain(|&(o, _)| o < c.start || o >= q);
        // Records before this chunk's start already belong to the previous chunk's
        // straddling instruction; clear the bytes it covers here.
        c.covered.set_range(0, p.min(c.end) - c.start);
        for (off, i) in &fresh {
            cx.record(c, *off, i);
        }
        if q >= c.end {
            c.sweep_exit = q;
        }
    }
    // Bytes of instructions that straddle a chunk boundary count in the next chunk.
    for k in 1..chunks.len() {
        let (p, t) = (chunks[k - 1].sweep_exit, chunks[k - 1].trav_exit);
        let c = &mut chunks[k];
        c.covered.set_range(0, p.min(c.end).saturating_sub(c.start));
        c.traversed
            .set_range(0, t.min(c.end).saturating_sub(c.start));
    }
    // Each chunk's branches lie in its own range: sorting per chunk sorts them all.
    chunks.par_iter_mut().for_each(|c| {
        c.branches.sort_unstable_by_key(|b| b.at);
        c.branches.dedup_by_key(|b| b.at);
    });
    let mut out = RegionScan::default();
    let mut all = Vec::new();
    for c in chunks {
        out.instructions += c.starts.count();
        out.bytes_decoded += c.covered.count();
        out.bytes_traversed += c.traversed.count();
        out.invalid += c.invalid.len() as u64;
        all.extend(c.sites);
        out.far_targets.extend(c.far_targets.iter().map(|f| f.1));
        out.branches.push(c.branches);
    }
    all.sort_unstable_by_key(|s| s.0);
    all.dedup_by_key(|s| s.0);
    let mut by_class = std::collections::BTreeMap::new();
    for &(rip, class, exits) in &all {
        *by_class.entry(class).or_insert(0u64) += 1;
        if exits {
            out.sites.push((rip, class));
        }
    }
    out.by_class = by_class.into_iter().collect();
    out
}

/// How much a byte range looks like code of `bitness`: (invalid instructions,
/// instructions, one-byte INC/DEC r32 in 32-bit decoding (REX prefixes of 64-bit code)).
pub fn decode_score(bytes: &[u8], addr: u64, bitness: Bitness) -> (u32, u32, u32) {
    let mut d = Decoder::with_ip(bitness.bits(), bytes, addr, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    let (mut invalid, mut n, mut rexlike) = (0u32, 0u32, 0u32);
    while d.can_decode() {
        let pos = d.position();
        d.decode_out(&mut ins);
        n += 1;
        if ins.is_invalid() {
            invalid += 1;
            let _ = d.set_position(pos + 1);
            d.set_ip(addr + pos as u64 + 1);
        } else if bitness != Bitness::B64 && ins.len() == 1 && (0x40..=0x4f).contains(&bytes[pos]) {
            rexlike += 1;
        }
    }
    (invalid, n, rexlike)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunking (parallel traversal rounds, parallel sweep, re-synchronization at
    /// boundaries that cut instructions) gives exactly the result of one chunk.
    #[test]
    fn chunk_size_does_not_change_the_result() {
        let policy = ExitPolicy::default();
        for bits in [32, 64] {
            let with = crate::synth::elf(bits, 20_000, 3, true);
            let stripped = crate::synth::elf(bits, 20_000, 3, false);
            let syms = crate::elf::parse(&with).unwrap().syms;
            let elf = crate::elf::parse(&stripped).unwrap();
            let area = &elf.code[0];
            let region = Region {
                area: 0,
                addr: area.addr,
                bytes: area.bytes,
                bitness: if bits == 64 {
                    Bitness::B64
                } else {
                    Bitness::B32
                },
                space: 0,
            };
            // Traversal islands: every third function; the rest is swept.
            let roots: Vec<u64> = syms.iter().step_by(3).map(|s| s.addr).collect();
            let whole = scan_region_chunked(&region, &roots, &[], &policy, usize::MAX / 4);
            assert!(whole.bytes_traversed > 0 && whole.bytes_traversed < whole.bytes_decoded);
            assert_eq!(whole.bytes_decoded, area.bytes.len() as u64);
            for chunk in [16, 37, 64, 100, 333, 1000, 4096] {
                for hints in [&[][..], &roots[..]] {
                    let r = scan_region_chunked(&region, &roots, hints, &policy, chunk);
                    let what = format!("{bits}-bit, chunk {chunk}, {} hints", hints.len());
                    assert_eq!(r.sites, whole.sites, "{what}");
                    assert_eq!(r.branches.concat(), whole.branches.concat(), "{what}");
                    assert_eq!(r.instructions, whole.instructions, "{what}");
                    assert_eq!(r.bytes_decoded, whole.bytes_decoded, "{what}");
                    assert_eq!(r.bytes_traversed, whole.bytes_traversed, "{what}");
                    assert_eq!(r.invalid, whole.invalid, "{what}");
                }
            }
        }
    }
}
