//! What the AOT pass knows of where indirect branches go, handed to the translator
//! through [`Pieces`] (every executable section of one address space, so a region
//! can follow calls into other functions and sections):
//!
//! - thunks (`avex_core::translator::resolve_thunk`): Linux's `__x86_indirect_thunk_<reg>` (a call or
//!   jump to it is an indirect call or jump through `<reg>`) and
//!   `__x86_return_thunk` (a jump to it is a RET), by symbol name or by their bytes
//!   (a stripped vmlinux has no symbols);
//! - returns: a RET (or a jump to a return thunk) of a function with at most
//!   [`MAX_RETURN_CALLERS`] direct callers may go back to each caller's return
//!   address;
//! - function-pointer tables: functions whose address is stored in data (ET_REL:
//!   absolute relocations; executables: pointer-sized words equal to a function
//!   start) are address-taken; a `call *disp(%reg)` gets as candidates the functions
//!   stored at offset `disp` of data objects, when there are at most
//!   [`MAX_FIELD_CANDIDATES`] of them;
//! - static initialisers: a `call *slot(%rip)` gets the code address the ELF stores
//!   in the slot (Linux's paravirt calls through pv_ops).
//!
//! The translator guards every such destination at run time (the value read must
//! equal it), so a wrong or incomplete list costs only a stop, never correctness;
//! the limits keep guards few.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use avex_core::ir::{Bitness, GprIndex};
pub use avex_core::translator::source::Thunk;
use avex_core::translator::{may_start_thunk, resolve_thunk, Pieces};
use rayon::prelude::*;
use serde::Serialize;

use crate::elf::{Elf, ElfKind};
use crate::scan::{Branch, BranchKind, Region};

/// A RET gets its function's callers' return addresses only up to this many callers.
pub const MAX_RETURN_CALLERS: usize = 4;
/// A call through a structure field gets candidates only up to this many.
pub const MAX_FIELD_CANDIDATES: usize = 4;

/// What the knowledge holds, for the report.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KnowledgeReport {
    /// Thunk addresses recognised as an indirect call/jump through a register.
    pub indirect_thunks: u64,
    /// Thunk addresses recognised as a return.
    pub return_thunks: u64,
    /// RETs (and jumps to return thunks) given their callers' return addresses.
    pub returns_resolved: u64,
    /// Functions whose address is stored in data.
    pub address_taken: u64,
    /// `call *disp(%reg)` sites given candidates.
    pub field_calls_resolved: u64,
    /// `call *slot(%rip)` sites given the code address stored in the slot.
    pub slot_calls_resolved: u64,
}

/// The code and known destinations per address space (ET_REL: one per section).
pub struct Knowledge<'a> {
    pub spaces: BTreeMap<usize, Pieces<'a>>,
    /// What the pieces were given: (space, branch address, destination), sorted.
    pub targets: Vec<(usize, u64, u64)>,
    /// (space, address, thunk), sorted.
    pub thunks: Vec<(usize, u64, Thunk)>,
    pub report: KnowledgeReport,
}

impl<'a> Knowledge<'a> {
    /// The code source for translations in `space`.
    pub fn source(&self, space: usize) -> Option<&Pieces<'a>> {
        self.spaces.get(&space)
    }
}

/// A thunk by its Linux symbol name.
fn thunk_by_name(name: &str) -> Option<Thunk> {
    if name == "__x86_return_thunk" {
        return Some(Thunk::Return);
    }
    let reg = name.strip_prefix("__x86_indirect_thunk_")?;
    const NAMES: [[&str; 2]; 16] = [
        ["rax", "eax"],
        ["rcx", "ecx"],
        ["rdx", "edx"],
        ["rbx", "ebx"],
        ["rsp", "esp"],
        ["rbp", "ebp"],
        ["rsi", "esi"],
        ["rdi", "edi"],
        ["r8", "r8d"],
        ["r9", "r9d"],
        ["r10", "r10d"],
        ["r11", "r11d"],
        ["r12", "r12d"],
        ["r13", "r13d"],
        ["r14", "r14d"],
        ["r15", "r15d"],
    ];
    let i = NAMES.iter().position(|n| n.contains(&reg))?;
    (i != usize::from(avex_core::ir::RSP)).then_some(Thunk::Indirect(i as GprIndex))
}

/// One address space's inputs.
struct Space<'r, 'a> {
    regions: Vec<&'r Region<'a>>,
    /// Runs of branches, each sorted by address.
    branches: Vec<&'r [Branch]>,
}

impl Space<'_, '_> {
    fn bitness_at(&self, addr: u64) -> Option<Bitness> {
        self.regions
            .iter()
            .find(|r| addr >= r.addr && addr < r.end())
            .map(|r| r.bitness)
    }
}

/// Builds the knowledge from the parsed ELF, its regions and what their scans
/// found (`branches[i]` of `regions[i]`). Deterministic: every list is sorted.
pub fn build<'r, 'a>(
    elf: &Elf<'a>,
    regions: &[&'r Region<'a>],
    branches: &[&'r [Vec<Branch>]],
) -> Knowledge<'a> {
    let mut spaces: BTreeMap<usize, Space<'r, 'a>> = BTreeMap::new();
    for (r, b) in regions.iter().zip(branches) {
        let s = spaces.entry(r.space).or_insert_with(|| Space {
            regions: Vec::new(),
            branches: Vec::new(),
        });
        s.regions.push(r);
        s.branches.extend(b.iter().map(|v| v.as_slice()));
    }
    let built: Vec<(usize, Built<'a>)> = spaces
        .into_par_iter()
        .map(|(id, s)| (id, build_space(elf, id, &s)))
        .collect();
    let mut out = Knowledge {
        spaces: BTreeMap::new(),
        targets: Vec::new(),
        thunks: Vec::new(),
        report: KnowledgeReport::default(),
    };
    for (id, b) in built {
        let r = b.report;
        out.targets
            .extend(b.pairs.into_iter().map(|(at, to)| (id, at, to)));
        out.thunks
            .extend(b.thunks.into_iter().map(|(at, t)| (id, at, t)));
        let p = b.pieces;
        out.report.indirect_thunks += r.indirect_thunks;
        out.report.return_thunks += r.return_thunks;
        out.report.returns_resolved += r.returns_resolved;
        out.report.address_taken += r.address_taken;
        out.report.field_calls_resolved += r.field_calls_resolved;
        out.report.slot_calls_resolved += r.slot_calls_resolved;
        out.spaces.insert(id, p);
    }
    out
}

/// Direct calls (callee, return address) and the function starts (function
/// symbols and call targets) of one space, sorted.
struct Calls<'e> {
    calls: Vec<(u64, u64)>,
    jump_targets: Vec<u64>,
    starts: Vec<u64>,
    func_syms: Vec<&'e crate::elf::CodeSym>,
}

fn calls_of<'e>(
    elf: &'e Elf<'_>,
    areas: &[usize],
    s: &Space<'_, '_>,
    pieces: &Pieces<'_>,
) -> Calls<'e> {
    let lo = areas.iter().map(|&a| elf.code[a].addr).min().unwrap_or(0);
    let hi = areas
        .iter()
        .map(|&a| elf.code[a].addr + elf.code[a].bytes.len() as u64)
        .max()
        .unwrap_or(0);
    let in_space = |t: u64| t >= lo && t < hi && areas.iter().any(|&a| elf.code[a].contains(t));
    let (mut calls, mut jump_targets): (Vec<(u64, u64)>, Vec<u64>) = s
        .branches
        .par_iter()
        .flat_map(|b| b.par_chunks(1 << 16))
        .map(|chunk| {
            let (mut calls, mut jumps) = (Vec::new(), Vec::new());
            for b in chunk {
                match b.kind() {
                    BranchKind::Call(t) if in_space(t) => calls.push((t, b.next())),
                    BranchKind::Jmp(t) if may_start_thunk(&mut { pieces }, t) => jumps.push(t),
                    _ => {}
                }
            }
            (calls, jumps)
        })
        .reduce(
            || (Vec::new(), Vec::new()),
            |mut a, b| {
                a.0.extend(b.0);
                a.1.extend(b.1);
                a
            },
        );
    calls.par_sort_unstable();
    calls.dedup();
    jump_targets.par_sort_unstable();
    jump_targets.dedup();
    let func_syms: Vec<&crate::elf::CodeSym> = elf
        .syms
        .iter()
        .filter(|f| f.is_func && areas.contains(&f.area))
        .collect();
    let mut starts: Vec<u64> = calls.iter().map(|c| c.0).collect();
    starts.extend(func_syms.iter().map(|f| f.addr));
    starts.sort_unstable();
    starts.dedup();
    Calls {
        calls,
        jump_targets,
        starts,
        func_syms,
    }
}

/// Thunks of one space: by name, then by the bytes at every direct call or jump
/// target.
fn thunks_of(
    elf: &Elf<'_>,
    areas: &[usize],
    s: &Space<'_, '_>,
    c: &Calls<'_>,
    pieces: &Pieces<'_>,
) -> BTreeMap<u64, Thunk> {
    let mut thunks: BTreeMap<u64, Thunk> = BTreeMap::new();
    for f in elf.syms.iter().filter(|f| areas.contains(&f.area)) {
        if let Some(t) = thunk_by_name(&f.name) {
            thunks.insert(f.addr, t);
        }
    }
    let mut candidates: Vec<u64> = c.jump_targets.clone();
    candidates.extend(c.starts.iter().copied());
    candidates.par_sort_unstable();
    candidates.dedup();
    let by_bytes: Vec<(u64, Thunk)> = candidates
        .par_iter()
        .filter(|a| !thunks.contains_key(a))
        .filter_map(|&a| Some((a, resolve_thunk(&mut { pieces }, a, s.bitness_at(a)?)?)))
        .collect();
    thunks.extend(by_bytes);
    thunks
}

/// Return addresses for the returns of one space: a RET, or a jump to a return
/// thunk, in a function with at most [`MAX_RETURN_CALLERS`] callers, gets each
/// caller's return address. Returns (site, destination) pairs and the sites count.
fn returns_of(
    s: &Space<'_, '_>,
    c: &Calls<'_>,
    thunks: &BTreeMap<u64, Thunk>,
) -> (Vec<(u64, u64)>, u64) {
    let sym_end: BTreeMap<u64, u64> = c
        .func_syms
        .iter()
        .filter(|f| f.size > 0)
        .map(|f| (f.addr, f.addr.saturating_add(f.size)))
        .collect();
    // Callers per function start: calls are sorted by callee, starts by address.
    let mut callers: Vec<(usize, usize)> = Vec::with_capacity(c.starts.len());
    let mut k = 0;
    for &f in &c.starts {
        while k < c.calls.len() && c.calls[k].0 < f {
            k += 1;
        }
        let lo = k;
        while k < c.calls.len() && c.calls[k].0 == f {
            k += 1;
        }
        callers.push((lo, k));
    }
    let mut out = Vec::new();
    let mut sites = 0;
    for region in &s.branches {
        // Branches are sorted: the function start only moves forward.
        let mut fi = 0;
        for b in region.iter() {
            let returns = match b.kind() {
                BranchKind::Ret => true,
                BranchKind::Jmp(t) => thunks.get(&t) == Some(&Thunk::Return),
                _ => false,
            };
            if !returns {
                continue;
            }
            while fi < c.starts.len() && c.starts[fi] <= b.at {
                fi += 1;
            }
            let Some(i) = fi.checked_sub(1) else {
                continue;
            };
            let f = c.starts[i];
            if sym_end.get(&f).is_some_and(|&end| b.at >= end) {
                continue;
            }
            let (lo, hi) = callers[i];
            if hi > lo && hi - lo <= MAX_RETURN_CALLERS {
                out.extend(c.calls[lo..hi].iter().map(|x| (b.at, x.1)));
                sites += 1;
            }
        }
    }
    (out, sites)
}

/// Candidates for the calls through structure fields of one space, from the
/// function pointers stored in data objects. Returns (site, destination) pairs, the
/// sites count and the number of address-taken functions.
fn fields_of(
    elf: &Elf<'_>,
    id: usize,
    s: &Space<'_, '_>,
    c: &Calls<'_>,
) -> (Vec<(u64, u64)>, u64, u64) {
    let funcs: HashSet<u64> = c.func_syms.iter().map(|f| f.addr).collect();
    let pointers = code_pointers(elf, id, &funcs, &c.starts);
    let taken: BTreeSet<u64> = pointers.iter().map(|p| p.2).collect();
    // Per field offset (within a data object), the functions stored there.
    let mut fields: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let objects = &elf.data.objects;
    for &(area, at, to) in &pointers {
        let k = objects.partition_point(|o| (o.area, o.addr) <= (area, at));
        let Some(o) = k.checked_sub(1).map(|k| &objects[k]) else {
            continue;
        };
        if o.area == area && at - o.addr < o.size {
            fields.entry(at - o.addr).or_default().insert(to);
        }
    }
    let mut out = Vec::new();
    let mut sites = 0;
    for b in s.branches.iter().flat_map(|b| b.iter()) {
        let BranchKind::CallField(disp) = b.kind() else {
            continue;
        };
        let Some(set) = u64::try_from(disp).ok().and_then(|d| fields.get(&d)) else {
            continue;
        };
        if set.len() <= MAX_FIELD_CANDIDATES {
            out.extend(set.iter().map(|&to| (b.at, to)));
            sites += 1;
        }
    }
    (out, sites, taken.len() as u64)
}

/// One space's knowledge.
struct Built<'a> {
    pieces: Pieces<'a>,
    report: KnowledgeReport,
    /// (branch address, destination), sorted.
    pairs: Vec<(u64, u64)>,
    thunks: BTreeMap<u64, Thunk>,
}

/// Destinations of calls through a pointer at a fixed address (`call
/// *slot(%rip)`): the code address the ELF stores there (a static initialiser,
/// as Linux's pv_ops). Not in ET_REL, whose words are filled by relocation.
/// Returns (site, destination) pairs and the sites count.
fn slots_of(elf: &Elf<'_>, areas: &[usize], s: &Space<'_, '_>) -> (Vec<(u64, u64)>, u64) {
    let mut out = Vec::new();
    if elf.kind == ElfKind::Rel {
        return (out, 0);
    }
    for b in s.branches.iter().flat_map(|b| b.iter()) {
        let BranchKind::CallSlot(slot) = b.kind() else {
            continue;
        };
        let word = match s.bitness_at(b.at) {
            Some(Bitness::B64) => 8,
            Some(Bitness::B32) => 4,
            _ => continue,
        };
        let value = elf.data.data.iter().find_map(|d| {
            let off = usize::try_from(slot.checked_sub(d.addr)?).ok()?;
            let w = d.bytes.get(off..off.checked_add(word)?)?;
            let mut v = [0u8; 8];
            v[..word].copy_from_slice(w);
            Some(u64::from_le_bytes(v))
        });
        if let Some(to) = value.filter(|&v| areas.iter().any(|&a| elf.code[a].contains(v))) {
            out.push((b.at, to));
        }
    }
    let n = out.len() as u64;
    (out, n)
}

fn build_space<'a>(elf: &Elf<'a>, id: usize, s: &Space<'_, 'a>) -> Built<'a> {
    let mut report = KnowledgeReport::default();
    let mut pieces = Pieces::new();
    let areas: Vec<usize> = (0..elf.code.len())
        .filter(|&a| elf.code[a].space == id)
        .collect();
    for &a in &areas {
        pieces.add(elf.code[a].addr, elf.code[a].bytes);
    }
    let c = calls_of(elf, &areas, s, &pieces);
    let ((thunks, (returns, returns_resolved)), (fields, field_calls, taken)) = rayon::join(
        || {
            let thunks = thunks_of(elf, &areas, s, &c, &pieces);
            let returns = returns_of(s, &c, &thunks);
            (thunks, returns)
        },
        || fields_of(elf, id, s, &c),
    );
    for (&a, &t) in &thunks {
        match t {
            Thunk::Indirect(_) => report.indirect_thunks += 1,
            Thunk::Return => report.return_thunks += 1,
        }
        pieces.add_thunk(a, t);
    }
    let (slots, slot_calls) = slots_of(elf, &areas, s);
    let mut pairs = returns;
    pairs.extend(fields);
    pairs.extend(slots);
    pairs.par_sort_unstable();
    pairs.dedup();
    pieces.add_targets(&pairs);
    report.returns_resolved = returns_resolved;
    report.field_calls_resolved = field_calls;
    report.slot_calls_resolved = slot_calls;
    report.address_taken = taken;
    Built {
        pieces,
        report,
        pairs,
        thunks,
    }
}

/// Code addresses stored in data of space `id`: (data area, address of the word,
/// function). ET_REL: the relocations; otherwise aligned pointer-sized words equal
/// to the address of a function symbol.
fn code_pointers(
    elf: &Elf<'_>,
    id: usize,
    funcs: &HashSet<u64>,
    starts: &[u64],
) -> Vec<(usize, u64, u64)> {
    if elf.kind == ElfKind::Rel {
        return elf
            .data
            .code_pointers
            .iter()
            .filter(|p| elf.code[p.code_area].space == id)
            .filter(|p| funcs.contains(&p.to) || starts.binary_search(&p.to).is_ok())
            .map(|p| (p.area, p.at, p.to))
            .collect();
    }
    // Function starts by symbol only: in a stripped file a word that equals a call
    // target is too weak a sign (and no data objects would place it in a field).
    let (Some(&lo), Some(&hi)) = (funcs.iter().min(), funcs.iter().max()) else {
        return Vec::new();
    };
    let word = if elf.bits == 64 { 8 } else { 4 };
    let mut out: Vec<(usize, u64, u64)> = elf
        .data
        .data
        .par_iter()
        .enumerate()
        .flat_map_iter(|(i, d)| {
            let skip = ((word - d.addr % word) % word) as usize;
            d.bytes
                .get(skip..)
                .unwrap_or(&[])
                .chunks_exact(word as usize)
                .enumerate()
                .filter_map(move |(k, w)| {
                    let v = if word == 8 {
                        u64::from_le_bytes(w.try_into().ok()?)
                    } else {
                        u64::from(u32::from_le_bytes(w.try_into().ok()?))
                    };
                    (v >= lo && v <= hi && funcs.contains(&v)).then_some((
                        i,
                        d.addr + skip as u64 + k as u64 * word,
                        v,
                    ))
                })
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use avex_core::ir::{RAX, RCX};

    const R11: GprIndex = 11;

    const BASE: u64 = 0x1000;

    fn thunk_of(code: &[u8], at: u64) -> Option<Thunk> {
        let mut p = Pieces::new();
        p.add(BASE, code);
        resolve_thunk(&mut &p, at, Bitness::B64)
    }

    #[test]
    fn thunks_are_recognised_by_their_bytes() {
        // ret; int3: a return thunk.
        assert_eq!(thunk_of(&[0xc3, 0xcc], BASE), Some(Thunk::Return));
        // jmp *%r11; int3: an indirect thunk once patched.
        assert_eq!(
            thunk_of(&[0x41, 0xff, 0xe3, 0xcc], BASE),
            Some(Thunk::Indirect(R11))
        );
        // lfence; jmp *%rcx: the lfence form.
        assert_eq!(
            thunk_of(&[0x0f, 0xae, 0xe8, 0xff, 0xe1], BASE),
            Some(Thunk::Indirect(RCX))
        );
        // The retpoline with an int3 trap: call 1f; int3; 1: mov %rax,(%rsp); ret.
        let int3 = [0xe8, 0x01, 0, 0, 0, 0xcc, 0x48, 0x89, 0x04, 0x24, 0xc3];
        assert_eq!(thunk_of(&int3, BASE), Some(Thunk::Indirect(RAX)));
        // Debian 6.1's: call 1f; 2: pause; lfence; jmp 2b; 1: mov %rax,(%rsp);
        // jmp __x86_return_thunk (here at BASE + 0x20: ret; int3).
        let mut linux = vec![
            0xe8, 0x07, 0, 0, 0, 0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9, 0x48, 0x89, 0x04, 0x24,
            0xe9,
        ];
        let rel = 0x20i32 - (linux.len() as i32 + 4);
        linux.extend_from_slice(&rel.to_le_bytes());
        linux.resize(0x20, 0xcc);
        linux.extend_from_slice(&[0xc3, 0xcc]);
        assert_eq!(thunk_of(&linux, BASE), Some(Thunk::Indirect(RAX)));
        assert_eq!(thunk_of(&linux, BASE + 0x20), Some(Thunk::Return));
    }

    #[test]
    fn ordinary_code_is_no_thunk() {
        // push %rbp; mov %rsp,%rbp
        assert_eq!(thunk_of(&[0x55, 0x48, 0x89, 0xe5], BASE), None);
        // jmp *%rsp is refused (no guard can name the stack pointer's target).
        assert_eq!(thunk_of(&[0xff, 0xe4], BASE), None);
        // A retpoline whose store goes elsewhere: mov %rax,8(%rsp).
        let off = [
            0xe8, 0x01, 0, 0, 0, 0xcc, 0x48, 0x89, 0x44, 0x24, 0x08, 0xc3,
        ];
        assert_eq!(thunk_of(&off, BASE), None);
        // A retpoline that does not return after the store.
        let no_ret = [0xe8, 0x01, 0, 0, 0, 0xcc, 0x48, 0x89, 0x04, 0x24, 0x90];
        assert_eq!(thunk_of(&no_ret, BASE), None);
        // Outside the code.
        assert_eq!(thunk_of(&[0xc3], BASE + 1), None);
    }

    #[test]
    fn thunks_are_recognised_by_their_linux_names() {
        assert_eq!(thunk_by_name("__x86_return_thunk"), Some(Thunk::Return));
        assert_eq!(
            thunk_by_name("__x86_indirect_thunk_rax"),
            Some(Thunk::Indirect(RAX))
        );
        assert_eq!(
            thunk_by_name("__x86_indirect_thunk_r11"),
            Some(Thunk::Indirect(R11))
        );
        assert_eq!(
            thunk_by_name("__x86_indirect_thunk_ecx"),
            Some(Thunk::Indirect(RCX))
        );
        assert_eq!(thunk_by_name("__x86_indirect_thunk_rsp"), None);
        assert_eq!(thunk_by_name("__x86_indirect_thunk_xyz"), None);
        assert_eq!(thunk_by_name("memcpy"), None);
    }
}
