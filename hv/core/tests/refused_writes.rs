//! Inside a cluster the engine refuses what the CPU refuses and stops where the
//! VMM would: a control-register or MSR write the vCPU faults on stops precisely
//! with the fault, every earlier effect done; a port write that asks the VMM to
//! stop the guest (debug-exit) ends the cluster right after it; CR8 written and
//! read back inside one cluster goes through `CpuState::cr8`.

mod engine_support;

use avex_core::arch::{cr0, cr4, msr};
use avex_core::engine::mmu::Paging;
use avex_core::engine::test_guest::{fake_cluster, TestGuest};
use avex_core::engine::{self, RunLimits, RunOutcome, StopReason};
use avex_core::guest::Fault;
use avex_core::ir::*;
use avex_core::policy::ExitClass;
use engine_support::{guest, mov_imm, out_al as out_imm, prepare, CODE_VA, DATA_GPA, DATA_VA, L};
const COM1: u8 = 0xf8; // low byte of 0x3f8, through DX below
const GP: StopReason = StopReason::Fault(Fault::GeneralProtection);

type Step = (Op, Option<ExitClass>);

fn out_dx() -> Step {
    (
        Op::Out {
            size: Size::S1,
            port: PortSrc::Dx,
        },
        Some(ExitClass::Out),
    )
}
fn mov_to_cr(cr: u8, src: u8) -> Step {
    let class = match cr {
        0 => ExitClass::MovToCr0,
        3 => ExitClass::MovToCr3,
        4 => ExitClass::MovToCr4,
        _ => ExitClass::MovToCr8,
    };
    (Op::MovToCr { cr, src }, Some(class))
}

fn run(g: &mut TestGuest, ops: &[Step]) -> RunOutcome {
    let c = prepare(g, ops);
    engine_support::run(g, &c)
}

#[test]
fn mov_cr4_setting_vmxe_raises_gp_after_every_earlier_effect() {
    let mut g = guest();
    let cr4 = g.state.cr4;
    g.state.gpr[RAX as usize] = 0x41;
    g.state.gpr[RCX as usize] = cr4 | cr4::VMXE; // the test guest's CPUID: no VMX
    let out = run(
        &mut g,
        &[
            out_imm(0x80),
            mov_imm(RBX, 7),
            mov_to_cr(4, RCX),
            mov_imm(RBX, 8),
            out_imm(0x81),
        ],
    );
    assert_eq!(out.reason, GP, "{out:?}");
    assert_eq!(out.rip, CODE_VA + 2 * L, "at the MOV to CR4");
    assert_eq!(out.index, Some(2));
    assert_eq!(g.state.rip, CODE_VA + 2 * L);
    assert_eq!(g.outs(), vec![(0x80, 1, 0x41)], "the OUT before: done");
    assert_eq!(g.state.gpr[RBX as usize], 7, "the MOV before: done");
    assert_eq!(g.state.cr4, cr4, "CR4 not written");
    assert_eq!(out.stats.insns, 2);
}

#[test]
fn refused_control_register_writes_fault_before_the_instruction() {
    // (register, value from the state) for writes the CPU refuses in 64-bit mode.
    type Case = (u8, fn(&TestGuest) -> u64);
    let cases: [Case; 7] = [
        (4, |g| g.state.cr4 | 1 << 15),                     // reserved
        (4, |g| g.state.cr4 | cr4::PKE),                    // no PKU in CPUID
        (4, |g| (g.state.cr4 & !cr4::OSXSAVE) | cr4::SMXE), // no SMX
        (0, |g| g.state.cr0 | cr0::NW),                     // NW without CD
        (0, |g| g.state.cr0 & !cr0::PG),                    // 64-bit mode
        (3, |_| 1 << 46),                                   // above MAXPHYADDR 46
        (8, |_| 0x10),                                      // CR8 bits 63:4
    ];
    for (i, (cr, value)) in cases.iter().enumerate() {
        let mut g = guest();
        g.state.gpr[RCX as usize] = value(&g);
        let before = g.state.clone();
        let out = run(&mut g, &[mov_imm(RBX, 1), mov_to_cr(*cr, RCX)]);
        assert_eq!(out.reason, GP, "case {i}: CR{cr}");
        assert_eq!(out.rip, CODE_VA + L, "case {i}");
        let mut expect = before;
        expect.gpr[RBX as usize] = 1;
        expect.rip = CODE_VA + L;
        assert_eq!(g.state, expect, "case {i}: only the MOV before took effect");
        assert_eq!(g.tlb_flushes, 0, "case {i}");
    }
    // A CPUID that reports the feature: the same CR4 write completes.
    let mut g = guest();
    g.cpuid_leaves
        .insert((7, 0), [0, 0x0010_0081, 0x4 | 1 << 3, 0]);
    g.state.gpr[RCX as usize] = g.state.cr4 | cr4::PKE;
    let out = run(&mut g, &[mov_to_cr(4, RCX)]);
    assert_eq!(out.reason, StopReason::ModeChange);
    assert_ne!(g.state.cr4 & cr4::PKE, 0);
}

#[test]
fn wrmsr_of_a_non_canonical_address_raises_gp() {
    for msr in [
        msr::FS_BASE,
        msr::GS_BASE,
        msr::KERNEL_GS_BASE,
        msr::LSTAR,
        msr::SYSENTER_EIP,
    ] {
        let mut g = guest();
        g.msrs.insert(msr, 0);
        let fs = g.state.seg[Seg::Fs as usize];
        let out = run(
            &mut g,
            &[
                mov_imm(RBX, 1),
                mov_imm(RCX, msr.into()),
                mov_imm(RAX, 0),
                mov_imm(RDX, 0x0000_8000), // 0x0000_8000_0000_0000
                (Op::Wrmsr, Some(ExitClass::Wrmsr)),
            ],
        );
        assert_eq!(out.reason, GP, "MSR {msr:#x}");
        assert_eq!(out.rip, CODE_VA + 4 * L);
        assert!(g.msr_writes.is_empty(), "MSR {msr:#x}: nothing written");
        assert_eq!(g.state.seg[Seg::Fs as usize], fs);
        assert_eq!(g.state.gpr[RBX as usize], 1);
    }
    // Canonical: written (KERNEL_GS_BASE goes to the guest's MSR).
    let mut g = guest();
    let out = run(
        &mut g,
        &[
            mov_imm(RCX, msr::KERNEL_GS_BASE.into()),
            mov_imm(RAX, 0),
            mov_imm(RDX, 0xffff_8000),
            (Op::Wrmsr, Some(ExitClass::Wrmsr)),
        ],
    );
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(
        g.msr_writes,
        vec![(msr::KERNEL_GS_BASE, 0xffff_8000_0000_0000)]
    );
}

#[test]
fn debug_exit_write_ends_the_cluster_right_after_it() {
    let mut g = guest();
    g.state.gpr[RAX as usize] = b'a' as u64;
    g.state.gpr[RDX as usize] = 0x300 | COM1 as u64;
    let out = run(
        &mut g,
        &[
            out_dx(),
            out_imm(0xf4),
            mov_imm(RAX, b'b' as u64),
            out_dx(),
            out_dx(),
        ],
    );
    assert_eq!(out.reason, StopReason::StopRequested, "{out:?}");
    assert_eq!(out.rip, CODE_VA + 2 * L, "right after the debug-exit write");
    assert_eq!(g.outs(), vec![(0x3f8, 1, 0x61), (0xf4, 1, 0x61)]);
    assert_eq!(
        g.state.gpr[RAX as usize], b'a' as u64,
        "nothing after it ran"
    );
    assert_eq!(g.exit_status, Some(0x61));
    // A run that starts after the request does nothing.
    let mut g2 = g.clone();
    let out = run(&mut g2, &[out_dx()]);
    assert_eq!(out.reason, StopReason::StopRequested);
    assert_eq!(g2.outs().len(), 2);
}

#[test]
fn debug_exit_by_rep_outs_stops_between_iterations() {
    let mut g = guest();
    g.write_bytes(DATA_GPA, b"xyz");
    g.state.gpr[RSI as usize] = DATA_VA;
    g.state.gpr[RCX as usize] = 3;
    g.state.gpr[RDX as usize] = 0xf4;
    let out = run(
        &mut g,
        &[
            (
                Op::Outs {
                    size: Size::S1,
                    addr_size: Size::S8,
                    rep: true,
                    seg: Seg::Ds,
                },
                Some(ExitClass::Outs),
            ),
            out_imm(0x80),
        ],
    );
    assert_eq!(out.reason, StopReason::StopRequested);
    assert_eq!(out.rip, CODE_VA, "interrupted REP OUTS: RIP stays on it");
    assert_eq!(g.outs(), vec![(0xf4, 1, b'x' as u32)]);
    assert_eq!(g.state.gpr[RCX as usize], 2);
    assert_eq!(g.state.gpr[RSI as usize], DATA_VA + 1);
}

#[test]
fn cr8_written_and_read_back_in_one_cluster() {
    let mut g = guest();
    let mut ops = Vec::new();
    for v in 1..=6u64 {
        ops.push(mov_imm(RAX, v));
        ops.push(mov_to_cr(8, RAX));
        ops.push((
            Op::MovFromCr {
                cr: 8,
                dst: 8 + v as u8,
            },
            Some(ExitClass::MovFromCr8),
        ));
    }
    let out = run(&mut g, &ops);
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    for v in 1..=6u64 {
        assert_eq!(
            g.state.gpr[8 + v as usize],
            v,
            "read back after writing {v}"
        );
    }
    assert_eq!(g.state.cr8, 6, "the last write reaches the state");
}

#[test]
fn cr8_outside_64_bit_mode_is_ud() {
    let mut g = TestGuest::protected32(1 << 20, Paging::None);
    let c = fake_cluster(0x1000, Bitness::B32, &[mov_to_cr(8, RAX)]);
    g.load_code(0x1000, &c);
    g.state.rip = 0x1000;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(out.reason, StopReason::Fault(Fault::InvalidOpcode));
}
