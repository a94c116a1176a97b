#![cfg(all(target_arch = "x86_64", target_os = "linux"))]
//! Differential test of the engine against the real CPU.
//!
//! Random sequences of gap-filler instructions (every legacy form iced knows for the
//! IR's mnemonics, with random registers, immediates and memory operands) are encoded
//! with iced, run natively in this process (`native`), then decoded, lowered with
//! `avex_core::lower::lower` (the production path) and run by the engine on a
//! `TestGuest` whose page tables map the same linear addresses to scattered
//! guest-physical frames (`world`). Every GPR, the defined status flags and DF, the
//! data buffer, and where and why the run stopped must agree.
//!
//! Four worlds: 64-bit code with the buffer high or below 4G, 32-bit compatibility
//! mode (CS 0x23), and 16-bit code (a 16-bit code segment in this process's LDT,
//! entered by a far jump, with DS/SS/FS/GS 16-bit LDT data segments based near the
//! buffer). Each case belongs to a category that shapes its operands:
//!
//! - `base64`, `base32`: the original mix (DS operands, forward branches).
//! - `fs-gs`: FS/GS overrides with non-zero bases (WRFSBASE/WRGSBASE in 64-bit code,
//!   LDT descriptors in 32/16-bit code; FS's base in 32-bit code makes the linear
//!   address wrap around 4G).
//! - `addr-size`: the 0x67 prefix (32-bit addresses in 64-bit code with garbage in
//!   the base register's upper half and offsets that wrap around 4G; 16-bit addresses
//!   in 32-bit code; 32-bit addresses in 16-bit code).
//! - `code16`: 16-bit code.
//! - `jcxz`: JCXZ/JECXZ/JRCXZ and LOOP forms with counters whose low parts are zero.
//! - `moffs`: MOV A0-A3 with every address size and segment.
//! - `rsp`: writes to the stack pointer (MOV, XCHG, LEA, ADD, AND, PUSH RSP; 32- and
//!   16-bit writes; in 16-bit code SP near 0, so pushes wrap around the segment),
//!   LEAVE from a valid frame (64-bit code), and POPF of pushed flag values.
//! - `split`: every data access straddles a page boundary.
//! - `fault`: accesses to an inaccessible page, writes to a read-only page,
//!   non-canonical addresses, 16-bit segment limit violations: the CPU's SIGSEGV or
//!   SIGBUS (RIP, #PF/#GP/#SS, CR2, W bit) against the engine's precise stop (same
//!   RIP, every earlier instruction's effects, nothing of the faulting one).
//! - `loop`: back-edges (LOOPcc, DEC+JNZ, JCXZ+JMP), with random caps the harness
//!   resumes after as a backend would; the iteration register is compared.
//!
//! Cases: `AVEX_DIFF_CASES` (default 1,000,000), seed `AVEX_DIFF_SEED`. Prints
//! `differential: N cases, M mismatches` and one line per category; each mismatch
//! (up to 5) is first minimized and printed with its bytes, disassembly and inputs.

mod flags;
mod gen;
mod native;
mod shapes;
mod world;

use gen::{Gen, Opts, Rng};
use iced_x86::Instruction;
use native::{FaultCatcher, BUF_SIZE};
use world::{CaseResult, World};

use avex_core::arch::rflags::{DF, STATUS};

/// Offset of the base register's target in the buffer.
const R15_OFF: u64 = 256;
const STACK_TOP: u64 = BUF_SIZE as u64 - 1024;

/// The code size a case runs in natively and in the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit mode, 4-level paging.
    M64,
    /// 32-bit compatibility mode (CS 0x23) natively; 32-bit protected mode with
    /// 32-bit (non-PAE) paging in the engine.
    M32,
    /// A 16-bit code segment natively (LDT); the same in the engine.
    M16,
}

impl Mode {
    pub fn bits(self) -> u32 {
        match self {
            Mode::M64 => 64,
            Mode::M32 => 32,
            Mode::M16 => 16,
        }
    }
    pub fn nregs(self) -> u64 {
        match self {
            Mode::M64 => 16,
            _ => 8,
        }
    }
    /// Never written except the stack pointer by the stack instructions: stack
    /// pointer, small index (memory operands), small bit offset (BT* with memory),
    /// buffer base.
    pub fn protected(self) -> [u64; 4] {
        match self {
            Mode::M64 => [4, 13, 14, 15],
            Mode::M32 => [4, 5, 6, 7],
            Mode::M16 => [4, 6, 7, 3],
        }
    }
    pub fn base(self) -> u64 {
        self.protected()[3]
    }
    pub fn index(self) -> u64 {
        self.protected()[1]
    }
    pub fn bitoff(self) -> u64 {
        self.protected()[2]
    }
    pub fn mask(self) -> u64 {
        match self {
            Mode::M64 => u64::MAX,
            _ => 0xffff_ffff,
        }
    }
}

/// One generated instruction; branches carry their target as an index (len = end).
#[derive(Clone)]
pub struct Spec {
    instr: Instruction,
    target: Option<usize>,
}

/// A case: its instructions and the caps of its back-edges (by instruction index).
#[derive(Clone)]
pub struct Case {
    specs: Vec<Spec>,
    caps: Vec<(usize, Option<u16>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cat {
    Base64,
    Base32,
    FsGs,
    AddrSize,
    Code16,
    Jcxz,
    Moffs,
    Rsp,
    Split,
    Fault,
    Loop,
}

/// Per category: name, share of the cases (per mille), worlds it runs in.
const CATS: [(Cat, &str, u64, &[usize]); 11] = [
    (Cat::Base64, "base64", 300, &[W64]),
    (Cat::Base32, "base32", 100, &[W32]),
    (Cat::FsGs, "fs-gs", 80, &[W64, W64LOW, W32, W16]),
    (Cat::AddrSize, "addr-size", 80, &[W64LOW, W32, W16]),
    (Cat::Code16, "code16", 100, &[W16]),
    (Cat::Jcxz, "jcxz", 60, &[W64, W64LOW, W32, W16]),
    (Cat::Moffs, "moffs", 50, &[W64, W64LOW, W32, W16]),
    (Cat::Rsp, "rsp", 60, &[W64LOW, W32, W16]),
    (Cat::Split, "split", 60, &[W64, W32, W16]),
    (Cat::Fault, "fault", 60, &[W64, W64LOW, W32, W16]),
    (Cat::Loop, "loop", 50, &[W64, W32, W16]),
];
const W64: usize = 0;
const W64LOW: usize = 1;
const W32: usize = 2;
const W16: usize = 3;

/// Options, the case, and its fixed inputs (register index, value).
fn make_case(cat: Cat, g: &Gen, rng: &mut Rng) -> Option<(Case, Vec<(usize, u64)>)> {
    let mode = g.mode;
    let buf = g.place.buf;
    let mut base_val = match mode {
        Mode::M16 => R15_OFF,
        _ => buf + R15_OFF,
    };
    let mut fixed = Vec::new();
    let mut o = Opts::default();
    match cat {
        Cat::Base64 | Cat::Base32 | Cat::Code16 => {}
        Cat::FsGs => o.segs = true,
        Cat::AddrSize => {
            o.alt_addr = true;
            o.segs = rng.chance(1, 4);
            if mode != Mode::M16 {
                // The low 32 bits point W bytes away: offsets wrap around 4G to
                // reach the buffer; the upper half (64-bit code) is garbage.
                let w = rng.next() & 0xffff_ffff;
                base_val = (rng.next() << 32) | (buf + R15_OFF + w) & 0xffff_ffff;
                base_val &= mode.mask();
            }
        }
        Cat::Jcxz => {
            o.jcxz = true;
            let v = [
                0,
                1,
                1 << 32,
                0x1_0000,
                0xffff_ffff_0000_0000,
                0x1_0000_0001,
                0xffff_0000,
            ][rng.below(7) as usize];
            let v = if rng.chance(1, 4) { rng.value() } else { v };
            fixed.push((1, v & mode.mask()));
        }
        Cat::Moffs => {
            o.moffs = true;
            o.segs = rng.chance(1, 3);
            o.alt_addr = mode != Mode::M64 || g.place.buf < 1 << 32;
        }
        Cat::Rsp => o.protect |= 1 << shapes::alt_stack_reg(mode),
        Cat::Split => o.split = true,
        Cat::Fault => {
            o.fault = true;
            o.segs = rng.chance(1, 4);
            if mode == Mode::M64 && rng.chance(1, 4) {
                // base + index*scale is non-canonical: #GP.
                fixed.push((mode.index() as usize, 1 << 48));
            }
        }
        Cat::Loop => o.protect |= 1 << 1 | 1 << shapes::iter_reg(mode),
    }
    o.base_val = base_val;
    fixed.push((mode.base() as usize, base_val));
    let case = match cat {
        Cat::Loop => {
            let (case, rcx) = shapes::loop_case(g, rng, &o)?;
            fixed.push((1, rcx & mode.mask()));
            case
        }
        Cat::Rsp => {
            let mut specs = g.case(rng, &o);
            let mut glued: Vec<usize> = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let mut at = rng.below(specs.len() as u64 + 1) as usize;
                if glued.contains(&at) {
                    // Not between the parts of an earlier shape (a PUSH and its POPF).
                    at -= 1;
                }
                let instrs = shapes::stack_shape(mode, rng)?;
                for g in glued.iter_mut().filter(|g| **g >= at) {
                    *g += instrs.len();
                }
                glued.extend((1..instrs.len()).map(|k| at + k));
                for s in specs.iter_mut() {
                    if let Some(t) = s.target.as_mut() {
                        if *t >= at {
                            *t += instrs.len();
                        }
                    }
                }
                for (k, instr) in instrs.into_iter().enumerate() {
                    specs.insert(
                        at + k,
                        Spec {
                            instr,
                            target: None,
                        },
                    );
                }
            }
            Case {
                specs,
                caps: Vec::new(),
            }
        }
        _ => Case {
            specs: g.case(rng, &o),
            caps: Vec::new(),
        },
    };
    flags::analyze(&case.specs)?;
    Some((case, fixed))
}

fn inputs(rng: &mut Rng, w: &World, cat: Cat, fixed: &[(usize, u64)]) -> ([u64; 16], u64) {
    let mode = w.mode;
    let mut gpr = [0u64; 16];
    for g in gpr.iter_mut().take(mode.nregs() as usize) {
        *g = rng.value() & mode.mask();
    }
    let top = STACK_TOP - 8 * rng.below(8);
    gpr[4] = match mode {
        // SS is the buffer's 16-bit segment; ESP's upper half is not the stack's.
        Mode::M16 => (rng.next() & 0xffff_0000) | top,
        _ => w.native.buf_va() + top,
    };
    gpr[mode.index() as usize] = rng.below(64);
    gpr[mode.bitoff() as usize] = (rng.below(512) as i64 - 256) as u64 & mode.mask();
    for &(r, v) in fixed {
        gpr[r] = v;
    }
    if cat == Cat::Rsp {
        let alt = shapes::alt_stack_reg(mode) as usize;
        gpr[alt] = gpr[4] - 64 - 8 * rng.below(8);
        if mode == Mode::M16 && rng.chance(1, 4) {
            // SP near 0: a push wraps to the top of the 64K stack segment (not
            // mapped: both sides fault there, at the same address).
            gpr[4] = (gpr[4] & 0xffff_0000) | rng.below(8);
        }
    }
    let fl = 0x2 | (rng.next() & STATUS) | if rng.chance(1, 8) { DF } else { 0 };
    (gpr, fl)
}

#[derive(Default, Clone, Copy)]
struct Count {
    cases: u64,
    mismatches: u64,
    skipped: u64,
    faults: u64,
    back_edges: u64,
    resumes: u64,
}

#[test]
fn differential_against_cpu() {
    assert!(
        native::have_fsgsbase(),
        "this test needs FSGSBASE in user mode"
    );
    let cases: u64 = std::env::var("AVEX_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("AVEX_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_a7e5);
    let _catcher = FaultCatcher::install();
    let mut worlds = [
        World::new(Mode::M64, false, 0),
        World::new(Mode::M64, true, 0),
        World::new(Mode::M32, false, 0),
        World::new(Mode::M16, false, 4),
    ];
    let gens: Vec<Gen> = worlds.iter().map(|w| Gen::new(w.place())).collect();
    for g in &gens {
        assert!(
            g.form_count() > 150,
            "too few {:?} instruction forms: {}",
            g.mode,
            g.form_count()
        );
    }
    let mut rng = Rng(seed);
    for w in worlds.iter_mut() {
        let data: Vec<u8> = (0..BUF_SIZE).map(|_| rng.next() as u8).collect();
        w.load_buf(&data);
    }
    let mut counts = [Count::default(); CATS.len()];
    let mut snapshot = vec![0u8; BUF_SIZE];
    let mut reports = Vec::new();
    // AVEX_DIFF_ONLY=name[,name..]: run only these categories (for a focused look).
    let only = std::env::var("AVEX_DIFF_ONLY").ok();
    let weights: Vec<u64> = CATS
        .iter()
        .map(|c| match &only {
            Some(o) if !o.split(',').any(|n| n == c.1) => 0,
            _ => c.2,
        })
        .collect();
    let total_weight: u64 = weights.iter().sum();
    for case_no in 0..cases {
        let mut pick = rng.below(total_weight);
        let ci = weights
            .iter()
            .position(|&wt| {
                let hit = pick < wt;
                pick = pick.saturating_sub(wt);
                hit
            })
            .unwrap();
        let (cat, _, _, ws) = CATS[ci];
        let wi = ws[rng.below(ws.len() as u64) as usize];
        let (g, w) = (&gens[wi], &mut worlds[wi]);
        let Some((case, fixed)) = (0..20).find_map(|_| make_case(cat, g, &mut rng)) else {
            counts[ci].skipped += 1;
            continue;
        };
        let (gpr, fl) = inputs(&mut rng, w, cat, &fixed);
        // Refresh a few buffer words so memory inputs vary; keep what the case
        // starts from (to minimize a mismatch).
        for _ in 0..4 {
            let k = rng.below(BUF_SIZE as u64 - 8) as usize;
            w.poke(k, &rng.next().to_le_bytes());
        }
        w.snapshot_into(&mut snapshot);
        counts[ci].cases += 1;
        match w.run_case(&case, &gpr, fl, false) {
            CaseResult::Ok => {
                counts[ci].faults += w.last.faulted as u64;
                counts[ci].back_edges += w.last.back_edges;
                counts[ci].resumes += w.last.resumes;
            }
            CaseResult::Skipped => counts[ci].skipped += 1,
            CaseResult::Mismatch(_) => {
                counts[ci].mismatches += 1;
                if reports.len() < 5 {
                    // Loops are left whole: dropping their counter would not end.
                    let cur = if case.caps.is_empty() {
                        minimize(w, &case, &snapshot, &gpr, fl)
                    } else {
                        case.clone()
                    };
                    w.load_buf(&snapshot);
                    if let CaseResult::Mismatch(s) = w.run_case(&cur, &gpr, fl, true) {
                        reports.push(format!(
                            "{:?} {} case {case_no} (seed {seed:#x}), minimized to {} instruction(s):\n{s}",
                            w.mode,
                            CATS[ci].1,
                            cur.specs.len()
                        ));
                    }
                }
                // The CPU's memory is the truth for the next case.
                let truth = w.snapshot();
                w.load_buf(&truth);
            }
        }
    }
    let total: u64 = counts.iter().map(|c| c.cases).sum();
    let mismatches: u64 = counts.iter().map(|c| c.mismatches).sum();
    let skipped: u64 = counts.iter().map(|c| c.skipped).sum();
    println!("differential: {total} cases, {mismatches} mismatches");
    for (c, k) in CATS.iter().zip(&counts) {
        println!(
            "differential[{}]: {} cases, {} mismatches, {} skipped ({} faulted, {} back-edges taken, {} resumed after a cap)",
            c.1, k.cases, k.mismatches, k.skipped, k.faults, k.back_edges, k.resumes
        );
    }
    for r in &reports {
        eprintln!("{r}");
    }
    assert_eq!(mismatches, 0, "engine and CPU disagree");
    for (c, k) in CATS.iter().zip(&counts) {
        assert!(
            k.skipped * 10 <= k.cases.max(1),
            "category {}: too many cases skipped ({} of {})",
            c.1,
            k.skipped,
            k.cases
        );
    }
    assert!(
        skipped * 20 < total.max(1),
        "too many cases skipped: {skipped} of {total}"
    );
}

/// Drops instructions while the mismatch persists.
fn minimize(w: &mut World, case: &Case, snapshot: &[u8], gpr: &[u64; 16], fl: u64) -> Case {
    let mut cur = case.clone();
    let mut k = 0;
    while k < cur.specs.len() && cur.specs.len() > 1 {
        let mut cand = cur.clone();
        cand.specs.remove(k);
        for s in cand.specs.iter_mut() {
            if let Some(t) = s.target.as_mut() {
                if *t > k {
                    *t -= 1;
                }
            }
        }
        cand.caps = cand
            .caps
            .iter()
            .filter(|c| c.0 != k)
            .map(|&(i, c)| (if i > k { i - 1 } else { i }, c))
            .collect();
        // Keep the shape of the control flow: forward branches stay forward,
        // back-edges stay back-edges.
        let ok = cand.specs.iter().enumerate().all(|(i, s)| {
            s.target
                .is_none_or(|t| t > i || cand.caps.iter().any(|c| c.0 == i))
        });
        if ok {
            w.load_buf(snapshot);
            if let CaseResult::Mismatch(_) = w.run_case(&cand, gpr, fl, false) {
                cur = cand;
                continue;
            }
        }
        k += 1;
    }
    cur
}
