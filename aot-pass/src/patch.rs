//! Code a Linux kernel rewrites at boot, from the ELF's own patch tables: the
//! AOT pass does not translate it (region formation stops where its bytes begin),
//! since a translation holding bytes the kernel replaces is dropped as stale by
//! the byte check before its first run.
//!
//! The tables (Linux 6.1, x86-64), each found by section name:
//!
//! | section | entry | what the kernel rewrites |
//! |---|---|---|
//! | `.altinstructions` | `s32 instr, s32 repl, u16 cpuid, u8 instrlen, u8 repllen` (12 bytes) | `instrlen` bytes at `instr`: the replacement if the CPU has the feature, else the padding NOPs optimised; the replacement itself only ever runs copied |
//! | `.parainstructions` | `u64 instr, u8 type, u8 len` (16 bytes, aligned) | `len` bytes at `instr` (a `call *pv_ops[...]`): native code on bare hardware |
//! | `.retpoline_sites` | `s32` | the `call`/`jmp` (or `jcc`) to `__x86_indirect_thunk_*` there |
//! | `.return_sites` | `s32` | the `jmp __x86_return_thunk` there (`ret` or another thunk, by the mitigation) |
//! | `.call_sites` | `s32` | the `call` there (call-depth tracking; newer kernels) |
//! | `.ibt_endbr_seal` | `s32` | the `endbr64` there (sealed by IBT; newer kernels) |
//! | `.smp_locks` | `s32` | the `lock` prefix there (a `ds` prefix on one CPU) |
//!
//! `s32` fields are offsets from the field's own address. Static keys (`__jump_table`)
//! are not a section of their own in vmlinux (only `__start___jump_table`, a symbol,
//! says where they are) and their sites keep their compiled bytes until a key
//! changes, so they are not read. Relocatable objects (`.ko`) hold these tables as
//! relocations: not read either. An entry that points outside the executable areas
//! is skipped and counted, never an error.

use crate::elf::Elf;
use avex_core::translator::source::Thunk;
use avex_core::translator::{CodeSource, Pieces};

/// What rewrites a patched range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PatchKind {
    Alternative,
    Replacement,
    Paravirt,
    Retpoline,
    Return,
    Call,
    EndbrSeal,
    SmpLock,
}

impl PatchKind {
    pub fn name(self) -> &'static str {
        match self {
            PatchKind::Alternative => "alternative",
            PatchKind::Replacement => "alternative-replacement",
            PatchKind::Paravirt => "paravirt",
            PatchKind::Retpoline => "retpoline",
            PatchKind::Return => "return-thunk",
            PatchKind::Call => "call-depth",
            PatchKind::EndbrSeal => "endbr-seal",
            PatchKind::SmpLock => "smp-lock",
        }
    }
}

/// The sections holding `s32` self-relative site offsets, with the kind.
const OFFSET_TABLES: [(&str, PatchKind); 5] = [
    (".retpoline_sites", PatchKind::Retpoline),
    (".return_sites", PatchKind::Return),
    (".call_sites", PatchKind::Call),
    (".ibt_endbr_seal", PatchKind::EndbrSeal),
    (".smp_locks", PatchKind::SmpLock),
];
const ALT_ENTRY: usize = 12;
const PARA_ENTRY: usize = 16;

/// The byte ranges a kernel rewrites at boot.
#[derive(Clone, Debug, Default)]
pub struct PatchSites {
    /// Merged, sorted, non-empty `[start, end)` ranges.
    ranges: Vec<(u64, u64)>,
    /// Each site as read, `(start, end, kind)`, sorted.
    sites: Vec<(u64, u64, PatchKind)>,
    /// Sites read per kind (before merging).
    pub by_kind: Vec<(PatchKind, u64)>,
    /// Entries skipped: pointing outside the executable areas, or of no length.
    pub skipped: u64,
}

fn s32_at(bytes: &[u8], off: usize) -> Option<i64> {
    let b = bytes.get(off..off + 4)?;
    Some(i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
}

impl PatchSites {
    /// The patch tables of `elf` (none for relocatable objects).
    pub fn of_elf(elf: &Elf<'_>) -> Self {
        let mut out = PatchSites::default();
        if elf.kind == crate::elf::ElfKind::Rel || elf.bits != 64 {
            return out;
        }
        // Addresses come from an untrusted file: no arithmetic here may overflow.
        let in_code = |a: u64, len: u64| {
            elf.code.iter().any(|c| {
                let end = c.addr.checked_add(c.bytes.len() as u64);
                a >= c.addr && a.checked_add(len).zip(end).is_some_and(|(e, end)| e <= end)
            })
        };
        let code_byte = |a: u64| {
            elf.code.iter().find_map(|c| {
                let off = usize::try_from(a.checked_sub(c.addr)?).ok()?;
                c.bytes.get(off).copied()
            })
        };
        let table = |name: &str| elf.data.data.iter().find(|d| d.name == name);
        let mut sites: Vec<(u64, u64, PatchKind)> = Vec::new();
        if let Some(t) = table(".altinstructions") {
            for (i, e) in t.bytes.chunks_exact(ALT_ENTRY).enumerate() {
                let field = t.addr.wrapping_add((i * ALT_ENTRY) as u64);
                let (Some(instr), Some(repl)) = (s32_at(e, 0), s32_at(e, 4)) else {
                    continue;
                };
                let instr = field.wrapping_add_signed(instr);
                let repl = field.wrapping_add(4).wrapping_add_signed(repl);
                sites.push((instr, u64::from(e[10]), PatchKind::Alternative));
                sites.push((repl, u64::from(e[11]), PatchKind::Replacement));
            }
        }
        if let Some(t) = table(".parainstructions") {
            for e in t.bytes.chunks_exact(PARA_ENTRY) {
                let mut w = [0u8; 8];
                w.copy_from_slice(&e[..8]);
                sites.push((u64::from_le_bytes(w), u64::from(e[9]), PatchKind::Paravirt));
            }
        }
        for (name, kind) in OFFSET_TABLES {
            let Some(t) = table(name) else { continue };
            for (i, e) in t.bytes.chunks_exact(4).enumerate() {
                let Some(off) = s32_at(e, 0) else { continue };
                let at = t.addr.wrapping_add((i * 4) as u64).wrapping_add_signed(off);
                // A jcc rel32 (0f 8x) is 6 bytes, a call or jmp rel32 5.
                let len = match kind {
                    PatchKind::SmpLock => 1,
                    PatchKind::EndbrSeal => 4,
                    _ if code_byte(at) == Some(0x0f) => 6,
                    _ => 5,
                };
                sites.push((at, len, kind));
            }
        }
        let mut ranges = Vec::with_capacity(sites.len());
        for (at, len, kind) in sites {
            if len == 0 || !in_code(at, len) {
                out.skipped += 1;
                continue;
            }
            match out.by_kind.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => out.by_kind.push((kind, 1)),
            }
            // in_code checked that at + len does not overflow.
            ranges.push((at, at + len));
            out.sites.push((at, at + len, kind));
        }
        out.by_kind.sort();
        out.sites.sort_unstable();
        out.ranges = merge(ranges);
        out
    }

    /// Sites from explicit `(start, len)` ranges (tests).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let r = ranges
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(a, len)| (a, a.saturating_add(len)))
            .collect();
        PatchSites {
            ranges: merge(r),
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The first patched address in `[start, end)`, if any.
    pub fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges
            .get(i)
            .filter(|&&(s, _)| s < end)
            .map(|&(s, _)| s.max(start))
    }

    /// The kinds of the sites overlapping `[start, end)`, each once.
    pub fn kinds_in(&self, start: u64, end: u64) -> Vec<PatchKind> {
        // Sites are at most 255 bytes long: look back that far.
        let from = self
            .sites
            .partition_point(|&(s, _, _)| s < start.saturating_sub(256));
        let mut kinds: Vec<PatchKind> = self.sites[from..]
            .iter()
            .take_while(|&&(s, _, _)| s < end)
            .filter(|&&(_, e, _)| e > start)
            .map(|&(_, _, k)| k)
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// Whether any byte of `[start, end)` is patched.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.first_in(start, end).is_some()
    }
}

fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The code as the translator may use it: [`Pieces`] with every patched byte
/// unreadable, so a region ends before an instruction that holds one.
pub struct Unpatched<'p, 'a> {
    pub pieces: &'p Pieces<'a>,
    pub patches: &'p PatchSites,
}

impl CodeSource for Unpatched<'_, '_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        let n = self.pieces.read_at(addr, buf);
        match self.patches.first_in(addr, addr.saturating_add(n as u64)) {
            Some(p) => (p - addr) as usize,
            None => n,
        }
    }

    fn indirect_targets(&self, at: u64) -> &[u64] {
        self.pieces.indirect_targets(at)
    }

    fn thunk(&mut self, addr: u64) -> Option<Thunk> {
        self.pieces.thunk(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_in_finds_the_first_patched_byte_of_a_span() {
        let p = PatchSites::from_ranges([(0x100, 5), (0x103, 4), (0x200, 1)]);
        assert_eq!(p.first_in(0x0, 0x100), None);
        assert_eq!(p.first_in(0x0, 0x101), Some(0x100));
        assert_eq!(p.first_in(0x104, 0x110), Some(0x104));
        assert_eq!(p.first_in(0x107, 0x200), None);
        assert_eq!(p.first_in(0x107, 0x201), Some(0x200));
        assert!(!p.overlaps(0x201, 0x300));
    }

    #[test]
    fn reads_stop_at_patched_bytes() {
        let code = [0x90u8; 32];
        let mut pieces = Pieces::new();
        pieces.add(0x1000, &code);
        let patches = PatchSites::from_ranges([(0x1010, 5)]);
        let mut src = Unpatched {
            pieces: &pieces,
            patches: &patches,
        };
        let mut buf = [0u8; 15];
        assert_eq!(src.read(0x1000, &mut buf), 15);
        assert_eq!(src.read(0x1008, &mut buf), 8);
        assert_eq!(src.read(0x1012, &mut buf), 0);
        assert_eq!(src.read(0x1015, &mut buf), 11);
    }
}
