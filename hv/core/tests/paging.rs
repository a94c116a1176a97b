//! Page walks in every paging mode, every fault kind, accessed/dirty updates,
//! page-crossing accesses and not-RAM, through the engine and through `Mmu`.

mod engine_support;

use avex_core::arch::{cr0, cr4, efer, pfec, pte};
use avex_core::engine::mmu::{Access, Mmu, Paging, XlateError};
use avex_core::engine::test_guest::{attrs, fake_cluster, PageSize, TestGuest};
use avex_core::engine::{self, RunLimits, RunOutcome, StopReason};
use avex_core::guest::Guest;
use avex_core::ir::*;
use engine_support::{mem_sized as mem, reg};

const CODE_VA: u64 = 0x40_0000;
const CODE_GPA: u64 = 0x1000;
const DATA_VA: u64 = 0x80_0000;
const DATA_GPA: u64 = 0x10_0000;
const RAM: usize = 4 << 20;

fn load(size: Size, dst: u8, m: MemRef) -> Op {
    Op::Mov {
        size,
        dst: Operand::Reg(reg(dst, size)),
        src: Operand::Mem(m),
    }
}

fn store(size: Size, m: MemRef, src: u8) -> Op {
    Op::Mov {
        size,
        dst: Operand::Mem(m),
        src: Operand::Reg(reg(src, size)),
    }
}

/// Runs `ops` as a cluster at CODE_VA (mapped by the caller) from the start.
fn run(g: &mut TestGuest, bitness: Bitness, ops: &[Op]) -> RunOutcome {
    let ops: Vec<_> = ops.iter().map(|&o| (o, None)).collect();
    let c = fake_cluster(CODE_VA, bitness, &ops);
    g.load_code(CODE_GPA, &c);
    g.state.rip = CODE_VA;
    engine::run(&c, g, 0, &RunLimits::default())
}

fn long_guest() -> TestGuest {
    let mut g = TestGuest::long_mode(RAM);
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P);
    g
}

fn assert_pf(out: &RunOutcome, addr: u64, error_code: u32) {
    assert_eq!(
        out.reason,
        StopReason::PageFault { addr, error_code },
        "{out:?}"
    );
    assert_eq!(out.rip, CODE_VA, "stops before the faulting instruction");
    assert_eq!(out.stats.insns, 0);
}

#[test]
fn long_mode_4k_read_sets_accessed_bits_write_sets_dirty() {
    let mut g = long_guest();
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW | pte::NX);
    g.write_bytes(DATA_GPA + 0x10, &0x1122_3344_5566_7788u64.to_le_bytes());
    g.state.gpr[RBX as usize] = DATA_VA;
    let entries = g.entries(DATA_VA);
    assert_eq!(entries.len(), 4);
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S8, RAX, mem(RBX, 0x10, Size::S8))],
    );
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.gpr[RAX as usize], 0x1122_3344_5566_7788);
    for &e in &entries {
        assert_ne!(g.read_u64(e) & pte::A, 0, "A set in every level");
    }
    assert_eq!(g.leaf(DATA_VA) & pte::D, 0, "a read does not set D");
    assert!(out.stats.page_walks >= 2, "code check and data access walk");
    assert_eq!(out.stats.mem_accesses, 1);

    g.state.gpr[RCX as usize] = 0xabcd;
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S2, mem(RBX, 0x20, Size::S8), RCX)],
    );
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.bytes(DATA_GPA + 0x20, 2), &[0xcd, 0xab]);
    assert_ne!(
        g.leaf(DATA_VA) & pte::D,
        0,
        "a write sets D in the final entry"
    );
    // D only in the leaf.
    let pde = g.read_u64(entries[2]);
    assert_eq!(pde & pte::D, 0);
}

#[test]
fn long_mode_2m_and_1g_pages() {
    let mut g = long_guest();
    g.map(
        0x4000_0000 + 0x20_0000,
        0x20_0000,
        PageSize::Large,
        pte::P | pte::RW,
    );
    g.map(0x80_0000_0000, 0, PageSize::G1, pte::P | pte::RW);
    g.write_bytes(0x20_0000 + 0x1_2345, &[0x5a]);
    g.write_bytes(0x30_1234, &[0xa5]);
    g.state.gpr[RBX as usize] = 0x4020_0000 + 0x1_2345;
    g.state.gpr[RSI as usize] = 0x80_0000_0000 + 0x30_1234;
    let out = run(
        &mut g,
        Bitness::B64,
        &[
            load(Size::S1, RAX, mem(RBX, 0, Size::S8)),
            load(Size::S1, RCX, mem(RSI, 0, Size::S8)),
            store(Size::S1, mem(RSI, 1, Size::S8), RAX),
        ],
    );
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.gpr[RAX as usize] & 0xff, 0x5a);
    assert_eq!(g.state.gpr[RCX as usize] & 0xff, 0xa5);
    assert_eq!(g.bytes(0x30_1235, 1), &[0x5a]);
    let e2m = g.entries(0x4020_0000);
    assert_eq!(e2m.len(), 3, "PML4E, PDPTE, PDE(PS)");
    assert_eq!(g.read_u64(*e2m.last().unwrap()) & (pte::A | pte::D), pte::A);
    let e1g = g.entries(0x80_0000_0000);
    assert_eq!(e1g.len(), 2, "PML4E, PDPTE(PS)");
    assert_eq!(g.read_u64(e1g[1]) & (pte::A | pte::D), pte::A | pte::D);
}

#[test]
fn not_present_faults_and_sets_no_accessed_bits() {
    let mut g = long_guest();
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::RW); // not present
    g.state.gpr[RBX as usize] = DATA_VA + 8;
    g.state.gpr[RAX as usize] = 77;
    // (The PML4E and PDPTE are shared with the code page, which the code check walks.)
    let before = g.entries(DATA_VA)[2..]
        .iter()
        .map(|&e| g.read_u64(e))
        .collect::<Vec<_>>();
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S8, RAX, mem(RBX, 0, Size::S8))],
    );
    assert_pf(&out, DATA_VA + 8, 0);
    assert_eq!(g.state.gpr[RAX as usize], 77);
    let after = g.entries(DATA_VA)[2..]
        .iter()
        .map(|&e| g.read_u64(e))
        .collect::<Vec<_>>();
    assert_eq!(before, after, "a faulting walk sets no A bits");
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S8, mem(RBX, 0, Size::S8), RAX)],
    );
    assert_pf(&out, DATA_VA + 8, pfec::W);
    // A missing intermediate level faults too.
    g.state.gpr[RBX as usize] = 0x7000_0000_0000;
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S8, RAX, mem(RBX, 0, Size::S8))],
    );
    assert_pf(&out, 0x7000_0000_0000, 0);
}

#[test]
fn write_to_read_only_honours_cr0_wp() {
    let mut g = long_guest();
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P);
    g.state.gpr[RBX as usize] = DATA_VA;
    g.state.gpr[RAX as usize] = 0x42;
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S1, mem(RBX, 0, Size::S8), RAX)],
    );
    assert_pf(&out, DATA_VA, pfec::P | pfec::W);
    assert_eq!(g.bytes(DATA_GPA, 1), &[0]);
    g.state.cr0 &= !cr0::WP;
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S1, mem(RBX, 0, Size::S8), RAX)],
    );
    assert_eq!(
        out.reason,
        StopReason::End,
        "supervisor writes ignore R/W without WP"
    );
    assert_eq!(g.bytes(DATA_GPA, 1), &[0x42]);
    // A user write to a read-only user page faults whatever WP says.
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P | pte::US);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::US);
    g.set_cpl(3);
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S1, mem(RBX, 0, Size::S8), RAX)],
    );
    assert_pf(&out, DATA_VA, pfec::P | pfec::W | pfec::U);
}

#[test]
fn user_access_to_supervisor_page_faults() {
    let mut g = long_guest();
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P | pte::US);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g.set_cpl(3);
    g.state.gpr[RBX as usize] = DATA_VA;
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S4, RAX, mem(RBX, 0, Size::S8))],
    );
    assert_pf(&out, DATA_VA, pfec::P | pfec::U);
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S4, mem(RBX, 0, Size::S8), RAX)],
    );
    assert_pf(&out, DATA_VA, pfec::P | pfec::U | pfec::W);
    // User code on a supervisor code page cannot even be fetched.
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P);
    let out = run(&mut g, Bitness::B64, &[Op::Nop]);
    assert_eq!(out.reason, StopReason::CodeUnreadable);
    assert_eq!(out.stats.insns, 0);
}

#[test]
fn nx_fetch_faults_with_instruction_fetch_bit() {
    let mut g = long_guest();
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P | pte::NX);
    let out = run(&mut g, Bitness::B64, &[Op::Nop]);
    assert_eq!(
        out.reason,
        StopReason::CodeUnreadable,
        "the code check fetches"
    );
    let mmu = Mmu::new(&g.state, 52);
    let mut walks = 0;
    assert_eq!(
        mmu.translate(&mut g, CODE_VA, Access::Fetch, &mut walks),
        Err(XlateError::PageFault {
            addr: CODE_VA,
            error_code: pfec::P | pfec::ID
        })
    );
    // Reads of an NX page are fine.
    assert_eq!(
        mmu.translate(&mut g, CODE_VA + 5, Access::Read, &mut walks),
        Ok(CODE_GPA + 5)
    );
    // Without EFER.NXE the NX bit is reserved.
    g.state.efer &= !efer::NXE;
    let mmu = Mmu::new(&g.state, 52);
    assert_eq!(
        mmu.translate(&mut g, CODE_VA, Access::Read, &mut walks),
        Err(XlateError::PageFault {
            addr: CODE_VA,
            error_code: pfec::P | pfec::RSVD
        })
    );
}

#[test]
fn smep_and_smap() {
    let mut g = long_guest();
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW | pte::US);
    g.state.cr4 |= cr4::SMAP | cr4::SMEP;
    g.state.gpr[RBX as usize] = DATA_VA;
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S1, RAX, mem(RBX, 0, Size::S8))],
    );
    assert_pf(&out, DATA_VA, pfec::P);
    g.state.rflags |= 1 << 18; // AC: SMAP off for explicit accesses
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S1, RAX, mem(RBX, 0, Size::S8))],
    );
    assert_eq!(out.reason, StopReason::End);
    let mmu = Mmu::new(&g.state, 52);
    let mut w = 0;
    assert_eq!(
        mmu.translate(&mut g, DATA_VA, Access::Fetch, &mut w),
        Err(XlateError::PageFault {
            addr: DATA_VA,
            error_code: pfec::P | pfec::ID
        }),
        "SMEP: supervisor fetch from a user page"
    );
}

#[test]
fn reserved_bits_fault_with_rsvd() {
    let mut g = long_guest();
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g.state.gpr[RBX as usize] = DATA_VA;
    let leaf = *g.entries(DATA_VA).last().unwrap();
    let good = g.read_u64(leaf);
    // A physical-address bit above MAXPHYADDR.
    g.write_bytes(leaf, &(good | 1 << 40).to_le_bytes());
    let ops = [store(Size::S1, mem(RBX, 0, Size::S8), RAX)];
    let ops1: Vec<_> = ops.iter().map(|&o| (o, None)).collect();
    let c = fake_cluster(CODE_VA, Bitness::B64, &ops1);
    g.load_code(CODE_GPA, &c);
    g.state.rip = CODE_VA;
    let limits = RunLimits {
        maxphyaddr: 36,
        ..RunLimits::default()
    };
    let out = engine::run(&c, &mut g, 0, &limits);
    assert_pf(&out, DATA_VA, pfec::P | pfec::W | pfec::RSVD);
    // With a larger MAXPHYADDR that bit is an address bit: not RAM here.
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(
        out.reason,
        StopReason::NotRam {
            gpa: (1 << 40) | DATA_GPA
        }
    );
    g.write_bytes(leaf, &good.to_le_bytes());
    // PS in a PML4E is reserved.
    let pml4e = g.entries(DATA_VA)[0];
    let e = g.read_u64(pml4e);
    g.write_bytes(pml4e, &(e | pte::PS).to_le_bytes());
    let out = run(
        &mut g,
        Bitness::B64,
        &[load(Size::S1, RAX, mem(RBX, 0, Size::S8))],
    );
    // The code page shares the PML4E: the fetch for the code check faults first.
    assert_eq!(out.reason, StopReason::CodeUnreadable);
    let mmu = Mmu::new(&g.state, 52);
    let mut w = 0;
    assert_eq!(
        mmu.translate(&mut g, DATA_VA, Access::Read, &mut w),
        Err(XlateError::PageFault {
            addr: DATA_VA,
            error_code: pfec::P | pfec::RSVD
        })
    );
    g.write_bytes(pml4e, &e.to_le_bytes());
    // Bits 20:13 of a 2M PDE are reserved.
    g.map(
        0x4000_0000,
        0x20_0000,
        PageSize::Large,
        pte::P | pte::RW | 1 << 13,
    );
    assert_eq!(
        mmu.translate(&mut g, 0x4000_0000, Access::Read, &mut w),
        Err(XlateError::PageFault {
            addr: 0x4000_0000,
            error_code: pfec::P | pfec::RSVD
        })
    );
    // Bit 12 there is PAT, not reserved.
    g.map(
        0x4000_0000,
        0x20_0000,
        PageSize::Large,
        pte::P | pte::RW | 1 << 12,
    );
    assert_eq!(
        mmu.translate(&mut g, 0x4000_0000, Access::Read, &mut w),
        Ok(0x20_0000)
    );
}

#[test]
fn page_crossing_accesses() {
    let mut g = long_guest();
    // Two adjacent virtual pages on non-adjacent frames.
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g.map(
        DATA_VA + 0x1000,
        DATA_GPA + 0x5000,
        PageSize::K4,
        pte::P | pte::RW,
    );
    g.write_bytes(DATA_GPA + 0xffd, &[1, 2, 3]);
    g.write_bytes(DATA_GPA + 0x5000, &[4, 5, 6, 7, 8]);
    g.state.gpr[RBX as usize] = DATA_VA + 0xffd;
    g.state.gpr[RCX as usize] = 0x1111_2222_3333_4444;
    let out = run(
        &mut g,
        Bitness::B64,
        &[
            load(Size::S8, RAX, mem(RBX, 0, Size::S8)),
            store(Size::S8, mem(RBX, 1, Size::S8), RCX),
        ],
    );
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.gpr[RAX as usize], 0x0807_0605_0403_0201);
    assert_eq!(g.bytes(DATA_GPA + 0xffe, 2), &[0x44, 0x44]);
    assert_eq!(
        g.bytes(DATA_GPA + 0x5000, 6),
        &[0x33, 0x33, 0x22, 0x22, 0x11, 0x11]
    );
    assert_eq!(out.stats.mem_accesses, 2);
    assert_ne!(g.leaf(DATA_VA + 0x1000) & pte::D, 0);

    // Second page not present: the fault names it and the first page is untouched.
    g.map(DATA_VA + 0x1000, DATA_GPA + 0x5000, PageSize::K4, pte::RW);
    let before = g.bytes(DATA_GPA + 0xff8, 8).to_vec();
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S8, mem(RBX, 1, Size::S8), RCX)],
    );
    assert_pf(&out, DATA_VA + 0x1000, pfec::W);
    assert_eq!(g.bytes(DATA_GPA + 0xff8, 8), &before[..]);

    // Second page on MMIO: not RAM, nothing written.
    g.map(DATA_VA + 0x1000, 0x3f_0000, PageSize::K4, pte::P | pte::RW);
    g.mmio.push((0x3f_0000, 0x1000));
    let out = run(
        &mut g,
        Bitness::B64,
        &[store(Size::S8, mem(RBX, 1, Size::S8), RCX)],
    );
    assert_eq!(out.reason, StopReason::NotRam { gpa: 0x3f_0000 });
    assert_eq!(out.rip, CODE_VA);
    assert_eq!(g.bytes(DATA_GPA + 0xff8, 8), &before[..]);
}

#[test]
fn pae_paging_4k_and_2m() {
    let mut g = TestGuest::protected32(RAM, Paging::Pae);
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW | pte::NX);
    g.map(0x8000_0000, 0x20_0000, PageSize::Large, pte::P | pte::RW);
    g.write_bytes(DATA_GPA + 4, &0xdead_beefu32.to_le_bytes());
    g.state.gpr[RBX as usize] = DATA_VA + 4;
    g.state.gpr[RSI as usize] = 0x8000_0000 + 0x1_0000;
    let out = run(
        &mut g,
        Bitness::B32,
        &[
            load(Size::S4, RAX, mem(RBX, 0, Size::S4)),
            store(Size::S4, mem(RSI, 0, Size::S4), RAX),
        ],
    );
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.state.gpr[RAX as usize], 0xdead_beef);
    assert_eq!(g.bytes(0x21_0000, 4), &0xdead_beefu32.to_le_bytes());
    let e = g.entries(0x8000_0000);
    assert_eq!(e.len(), 2, "PDPTE, PDE(PS)");
    assert_eq!(g.read_u64(e[1]) & (pte::A | pte::D), pte::A | pte::D);
    assert_eq!(
        g.read_u64(e[0]) & pte::A,
        0,
        "PAE PDPTEs have no accessed bit"
    );
    // NX data page: fetch faults with I/D.
    let mmu = Mmu::new(&g.state, 52);
    let mut w = 0;
    assert_eq!(
        mmu.translate(&mut g, DATA_VA, Access::Fetch, &mut w),
        Err(XlateError::PageFault {
            addr: DATA_VA,
            error_code: pfec::P | pfec::ID
        })
    );
    // Not-present PDE.
    g.state.gpr[RBX as usize] = 0x4000_0000;
    let out = run(
        &mut g,
        Bitness::B32,
        &[load(Size::S4, RAX, mem(RBX, 0, Size::S4))],
    );
    assert_pf(&out, 0x4000_0000, 0);
}

#[test]
fn legacy_32bit_paging_4k_and_4m() {
    let mut g = TestGuest::protected32(RAM, Paging::Bits32 { pse: true });
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g.map(0xc000_0000, 0, PageSize::Large, pte::P | pte::RW);
    g.write_bytes(0x2_0000, &[0x99]);
    g.state.gpr[RBX as usize] = DATA_VA;
    g.state.gpr[RSI as usize] = 0xc002_0000;
    g.state.gpr[RAX as usize] = 0x1234_5678;
    let out = run(
        &mut g,
        Bitness::B32,
        &[
            store(Size::S4, mem(RBX, 0, Size::S4), RAX),
            load(Size::S1, RCX, mem(RSI, 0, Size::S4)),
        ],
    );
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.bytes(DATA_GPA, 4), &0x1234_5678u32.to_le_bytes());
    assert_eq!(g.state.gpr[RCX as usize] & 0xff, 0x99);
    let e = g.entries(DATA_VA);
    assert_eq!(e.len(), 2);
    assert_eq!(
        g.read_u32(e[0]) as u64 & (pte::A | pte::D),
        pte::A,
        "PDE: A only"
    );
    assert_eq!(g.read_u32(e[1]) as u64 & (pte::A | pte::D), pte::A | pte::D);
    let big = g.entries(0xc000_0000);
    assert_eq!(
        g.read_u32(big[0]) as u64 & (pte::A | pte::D),
        pte::A,
        "4M PDE read: A"
    );
    // PSE-36: PDE bits 20:13 are physical bits 39:32.
    g.map(
        0xc040_0000,
        0x1_0000_0000,
        PageSize::Large,
        pte::P | pte::RW,
    );
    g.state.gpr[RSI as usize] = 0xc040_0010;
    let out = run(
        &mut g,
        Bitness::B32,
        &[load(Size::S1, RCX, mem(RSI, 0, Size::S4))],
    );
    assert_eq!(out.reason, StopReason::NotRam { gpa: 0x1_0000_0010 });
    // Bit 21 of a 4M PDE is reserved.
    g.map(0xc040_0000, 0x40_0000, PageSize::Large, pte::P | 1 << 21);
    let out = run(
        &mut g,
        Bitness::B32,
        &[load(Size::S1, RCX, mem(RSI, 0, Size::S4))],
    );
    assert_pf(&out, 0xc040_0010, pfec::P | pfec::RSVD);
    // Without CR4.PSE the PS bit is ignored: the PDE points at a page table (frame
    // 0, all zeros here), so the walk finds a not-present PTE.
    g.state.cr4 &= !cr4::PSE;
    let mmu = Mmu::new(&g.state, 52);
    let mut w = 0;
    assert_eq!(mmu.paging, Paging::Bits32 { pse: false });
    assert_eq!(
        mmu.translate(&mut g, 0xc000_0000, Access::Read, &mut w),
        Err(XlateError::PageFault {
            addr: 0xc000_0000,
            error_code: 0
        })
    );
    // No NX in 32-bit paging: fetches of data pages are fine.
    assert_eq!(
        mmu.translate(&mut g, DATA_VA, Access::Fetch, &mut w),
        Ok(DATA_GPA)
    );
}

#[test]
fn unpaged_protected_and_real_mode_use_segment_bases() {
    let mut g = TestGuest::protected32(RAM, Paging::None);
    g.state.seg[Seg::Ds as usize].base = 0x1_0000;
    g.write_bytes(0x1_0040, &[0x77]);
    let ops = [(load(Size::S1, RAX, mem(RBX, 0x40, Size::S4)), None)];
    let c = fake_cluster(0x2000, Bitness::B32, &ops);
    g.load_code(0x2000, &c);
    g.state.rip = 0x2000;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.gpr[RAX as usize] & 0xff, 0x77);
    assert_eq!(out.stats.page_walks, 0);
    // Beyond the DS limit: #GP, stop before.
    g.state.seg[Seg::Ds as usize].limit = 0x3f;
    g.state.rip = 0x2000;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(
        out.reason,
        StopReason::Fault(avex_core::guest::Fault::GeneralProtection)
    );

    // Real mode: CS base + IP for the code, DS base + offset (16-bit) for data,
    // 16-bit stack.
    let mut g = TestGuest::new(RAM);
    g.state.seg[Seg::Cs as usize].base = 0x1_0000;
    g.state.seg[Seg::Cs as usize].selector = 0x1000;
    g.state.seg[Seg::Ds as usize].base = 0x2_0000;
    g.state.seg[Seg::Ss as usize].base = 0x3_0000;
    g.state.gpr[RSP as usize] = 0xdead_0000_0000_0100;
    g.state.gpr[RBX as usize] = 0xffff_0010; // only BX counts
    g.write_bytes(0x2_0010, &0xbeefu16.to_le_bytes());
    let ops = [
        (load(Size::S2, RAX, mem(RBX, 0, Size::S2)), None),
        (
            Op::Push {
                size: Size::S2,
                src: Operand::Reg(reg(RAX, Size::S2)),
            },
            None,
        ),
    ];
    let c = fake_cluster(0x100, Bitness::B16, &ops);
    g.load_code(0x1_0100, &c);
    g.state.rip = 0x100;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.state.gpr[RAX as usize] & 0xffff, 0xbeef);
    assert_eq!(g.bytes(0x3_00fe, 2), &0xbeefu16.to_le_bytes());
    assert_eq!(g.state.gpr[RSP as usize], 0xdead_0000_0000_00fe, "SP only");
    assert_eq!(g.state.rip, 0x100 + 8);
}

#[test]
fn not_ram_stops_before_the_instruction() {
    let mut g = long_guest();
    g.map(DATA_VA, 0x3f_0000, PageSize::K4, pte::P | pte::RW);
    g.mmio.push((0x3f_0000, 0x1000));
    g.state.gpr[RBX as usize] = DATA_VA + 4;
    g.state.gpr[RCX as usize] = 5;
    let out = run(
        &mut g,
        Bitness::B64,
        &[
            Op::Unary {
                op: UnaryOp::Inc,
                size: Size::S8,
                dst: Operand::Reg(reg(RCX, Size::S8)),
            },
            load(Size::S4, RAX, mem(RBX, 0, Size::S8)),
        ],
    );
    assert_eq!(out.reason, StopReason::NotRam { gpa: 0x3f_0004 });
    assert_eq!(out.rip, CODE_VA + 4);
    assert_eq!(out.index, Some(1));
    assert_eq!(g.state.gpr[RCX as usize], 6);
    assert_eq!(g.state.rip, CODE_VA + 4);
}

#[test]
fn user_mode_segment_attrs_and_five_level_paging_unsupported() {
    let mut g = long_guest();
    g.state.cr4 |= cr4::LA57;
    let out = run(&mut g, Bitness::B64, &[Op::Nop]);
    assert_eq!(out.reason, StopReason::CodeUnreadable);
    assert_eq!(Paging::of(&g.state), Paging::Unsupported);
    // CPL comes from CS.DPL.
    let mut g = long_guest();
    g.state.seg[Seg::Cs as usize].attrs = attrs::CODE64 | attrs::DPL3;
    assert_eq!(g.state().cpl(), 3);
}

/// A PAE guest whose code is in the first GiB (PDPTE 0) and whose data page at
/// 0x4000_0000 (PDPTE 1) reads 0x1111_1111; a second page directory, not in use,
/// maps the same address to a page reading 0x2222_2222. The PDPT is mapped at
/// PDPT_VA so the guest can rewrite it. Returns the second PD's address.
fn pae_two_tables(g: &mut TestGuest) -> u64 {
    const PDPT_VA: u64 = 0x60_0000;
    g.map(CODE_VA, CODE_GPA, PageSize::K4, pte::P);
    g.map(0x4000_0000, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g.map(
        PDPT_VA,
        g.state.cr3 & !0xfff,
        PageSize::K4,
        pte::P | pte::RW,
    );
    g.write_bytes(DATA_GPA, &0x1111_1111u32.to_le_bytes());
    g.write_bytes(DATA_GPA + 0x1000, &0x2222_2222u32.to_le_bytes());
    let pd = g.alloc_table();
    let pt = g.alloc_table();
    g.write_bytes(pd, &(pt | pte::P | pte::RW).to_le_bytes());
    g.write_bytes(pt, &((DATA_GPA + 0x1000) | pte::P | pte::RW).to_le_bytes());
    g.state.gpr[RDI as usize] = PDPT_VA + (g.state.cr3 & 0xfe0) + 8;
    g.state.gpr[RSI as usize] = 0x4000_0000;
    pd
}

#[test]
fn pae_walks_use_the_pdptes_loaded_at_the_last_cr3_write() {
    let mut g = TestGuest::protected32(RAM, Paging::Pae);
    let pd = pae_two_tables(&mut g);
    // MOV to CR3 (same tables) loads the PDPTE registers and ends the run.
    g.state.gpr[RAX as usize] = g.state.cr3;
    let out = run(&mut g, Bitness::B32, &[Op::MovToCr { cr: 3, src: RAX }]);
    assert_eq!(out.reason, StopReason::ModeChange, "{out:?}");
    let base = g.state.cr3 & 0xffff_ffe0;
    let in_memory: Vec<u64> = (0..4).map(|i| g.read_u64(base + 8 * i)).collect();
    assert_eq!(g.state.pdpte.map(|p| p.to_vec()), Some(in_memory));
    // The guest points PDPTE 1 at the other page directory without reloading CR3:
    // the CPU keeps translating through the old PDPTE.
    g.state.gpr[RAX as usize] = pd | pte::P;
    let out = run(
        &mut g,
        Bitness::B32,
        &[
            store(Size::S4, mem(RDI, 0, Size::S4), RAX),
            load(Size::S4, RBX, mem(RSI, 0, Size::S4)),
        ],
    );
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.read_u64(base + 8), pd | pte::P, "memory was rewritten");
    assert_eq!(g.state.gpr[RBX as usize], 0x1111_1111, "old PDPTE used");
    // The next MOV to CR3 picks the new one up.
    g.state.gpr[RAX as usize] = g.state.cr3;
    run(&mut g, Bitness::B32, &[Op::MovToCr { cr: 3, src: RAX }]);
    let out = run(
        &mut g,
        Bitness::B32,
        &[load(Size::S4, RBX, mem(RSI, 0, Size::S4))],
    );
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.gpr[RBX as usize], 0x2222_2222);
}

#[test]
fn pae_cr3_write_with_a_reserved_pdpte_bit_raises_gp() {
    let mut g = TestGuest::protected32(RAM, Paging::Pae);
    pae_two_tables(&mut g);
    g.load_pdptes();
    let base = g.state.cr3 & 0xffff_ffe0;
    let e = g.read_u64(base + 8);
    g.write_bytes(base + 8, &(e | 1 << 2).to_le_bytes()); // U/S: reserved in a PDPTE
    let before = g.state.clone();
    g.state.gpr[RAX as usize] = g.state.cr3;
    let out = run(&mut g, Bitness::B32, &[Op::MovToCr { cr: 3, src: RAX }]);
    assert_eq!(
        out.reason,
        StopReason::Fault(avex_core::guest::Fault::GeneralProtection)
    );
    assert_eq!(out.rip, CODE_VA);
    assert_eq!((g.state.cr3, g.state.pdpte), (before.cr3, before.pdpte));
    assert_eq!(g.tlb_flushes, 0, "nothing done");
}

#[test]
fn enabling_pae_paging_loads_the_pdptes() {
    let mut g = TestGuest::protected32(RAM, Paging::Pae);
    pae_two_tables(&mut g);
    // Identity-map the code too so it stays the same across the switch.
    g.map(CODE_GPA, CODE_GPA, PageSize::K4, pte::P);
    let cr0 = g.state.cr0;
    g.state.cr0 &= !cr0::PG;
    g.state.gpr[RAX as usize] = cr0;
    let ops = [(Op::MovToCr { cr: 0, src: RAX }, None)];
    let c = fake_cluster(CODE_GPA, Bitness::B32, &ops);
    g.load_code(CODE_GPA, &c);
    g.state.rip = CODE_GPA;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(out.reason, StopReason::ModeChange, "{out:?}");
    let base = g.state.cr3 & 0xffff_ffe0;
    assert_eq!(g.state.pdpte.map(|p| p[1]), Some(g.read_u64(base + 8)));
}

#[test]
fn a_pte_rewritten_and_invalidated_inside_a_run_is_walked_again() {
    // mov rax, [rbx] ; mov [rcx], rdx (the PTE: another page) ; invlpg [rbx] ;
    // mov rsi, [rbx]: the second read sees the new page, as on the CPU.
    let mut g = long_guest();
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    const OTHER_GPA: u64 = 0x20_0000;
    g.write_bytes(DATA_GPA, &0x1111u64.to_le_bytes());
    g.write_bytes(OTHER_GPA, &0x2222u64.to_le_bytes());
    let pte_gpa = *g.entries(DATA_VA).last().unwrap();
    // The page tables live in guest RAM; reach the PTE through a second mapping.
    const PT_VA: u64 = 0xc0_0000;
    g.map(PT_VA, pte_gpa & !0xfff, PageSize::K4, pte::P | pte::RW);
    g.state.gpr[RBX as usize] = DATA_VA;
    g.state.gpr[RCX as usize] = PT_VA + (pte_gpa & 0xfff);
    g.state.gpr[RDX as usize] = OTHER_GPA | pte::P | pte::RW;
    let out = run(
        &mut g,
        Bitness::B64,
        &[
            load(Size::S8, RAX, mem(RBX, 0, Size::S8)),
            store(Size::S8, mem(RCX, 0, Size::S8), RDX),
            Op::Invlpg {
                addr: mem(RBX, 0, Size::S8),
            },
            load(Size::S8, RSI, mem(RBX, 0, Size::S8)),
        ],
    );
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.state.gpr[RAX as usize], 0x1111);
    assert_eq!(
        g.state.gpr[RSI as usize], 0x2222,
        "INVLPG empties the run's TLB"
    );
}
