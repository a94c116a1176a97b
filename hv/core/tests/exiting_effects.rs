//! The exiting instructions' effects through `Guest` (port I/O, MSRs, CPUID, TSC,
//! control registers, REP INS/OUTS per iteration), and real instructions lowered
//! from their bytes.

mod engine_support;

use avex_core::arch::{pfec, pte};
use avex_core::engine::mmu::*;
use avex_core::engine::test_guest::PageSize;
use avex_core::engine::{self, RunLimits, StopReason, DF};
use avex_core::guest::Fault;
use avex_core::ir::Cluster;
use avex_core::ir::*;
use avex_core::policy::ExitClass;
use engine_support::*;

#[test]
fn exiting_instructions_do_their_work_through_the_guest() {
    let mut g = guest();
    g.script_port(0x71, &[0x12345678]);
    g.cpuid_leaves.insert((7, 0), [1, 2, 3, 4]);
    g.msrs.insert(0x1b, 0xfee0_0900);
    g.msrs.insert(0xc000_0103, 5);
    g.tsc = 0x1_0000_0000;
    g.tsc_step = 10;
    g.state.gpr[RAX as usize] = 0xffff_ffff_ffff_ffff;
    g.state.gpr[RDX as usize] = 0x71;
    let c = prepare(
        &mut g,
        &[
            (
                Op::In {
                    size: Size::S4,
                    port: PortSrc::Dx,
                },
                Some(ExitClass::In),
            ),
            gap(Op::Mov {
                size: Size::S8,
                dst: r64(R8),
                src: r64(RAX),
            }),
            mov_imm(RAX, 7),
            mov_imm(RCX, 0),
            (Op::Cpuid, Some(ExitClass::Cpuid)),
            gap(Op::Mov {
                size: Size::S8,
                dst: r64(R9),
                src: r64(RDX),
            }),
            mov_imm(RCX, 0x1b),
            (Op::Rdmsr, Some(ExitClass::Rdmsr)),
            gap(Op::Mov {
                size: Size::S8,
                dst: r64(R10),
                src: r64(RAX),
            }),
            mov_imm(RCX, 0xc000_0100),
            mov_imm(RAX, 0x5000),
            mov_imm(RDX, 0x7fff),
            (Op::Wrmsr, Some(ExitClass::Wrmsr)),
            (Op::Rdtscp, Some(ExitClass::Rdtscp)),
            (
                Op::MovFromCr { cr: 0, dst: R11 },
                Some(ExitClass::MovFromCr0),
            ),
            (Op::Clts, Some(ExitClass::Clts)),
            mov_imm(RCX, 0),
            (Op::Xgetbv, Some(ExitClass::Xgetbv)),
            mov_imm(RAX, 7),
            mov_imm(RDX, 0),
            (Op::Xsetbv, Some(ExitClass::Xsetbv)),
            (Op::Pause, Some(ExitClass::Pause)),
            (Op::Invlpg { addr: mem(RAX, 0) }, Some(ExitClass::Invlpg)),
        ],
    );
    g.state.cr0 |= CR0_TS;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(
        g.state.gpr[R8 as usize], 0x1234_5678,
        "32-bit IN zero-extends"
    );
    assert_eq!(g.state.gpr[R9 as usize], 4);
    assert_eq!(g.state.gpr[RBX as usize], 2);
    assert_eq!(g.state.gpr[R10 as usize], 0xfee0_0900);
    assert_eq!(g.msr_writes, vec![(0xc000_0100, 0x7fff_0000_5000)]);
    assert_eq!(
        g.state.seg[Seg::Fs as usize].base,
        0x7fff_0000_5000,
        "FS base follows the MSR"
    );
    assert_eq!(
        g.state.gpr[RCX as usize], 0,
        "RDTSCP's ECX was overwritten by the mov"
    );
    assert_eq!(
        g.state.gpr[R11 as usize] & CR0_TS,
        CR0_TS,
        "read before CLTS"
    );
    assert_eq!(g.state.cr0 & CR0_TS, 0);
    assert_eq!(g.xcr0, 7);
    assert_eq!(g.tlb_flushes, 1);
    assert_eq!(out.stats.exiting, 11);
    assert_eq!(out.stats.exits_of(ExitClass::Wrmsr), 1);
    assert_eq!(g.cpuid_calls, 1);

    // RDTSC/RDTSCP values.
    let mut g = guest();
    g.tsc = 0x1_0000_0000;
    g.tsc_step = 10;
    g.msrs.insert(0xc000_0103, 5);
    let c = prepare(&mut g, &[(Op::Rdtscp, Some(ExitClass::Rdtscp))]);
    run(&mut g, &c);
    assert_eq!(g.state.gpr[RAX as usize], 10);
    assert_eq!(g.state.gpr[RDX as usize], 1);
    assert_eq!(g.state.gpr[RCX as usize], 5);
}

#[test]
fn control_register_writes() {
    // CR3: TLB invalidated, the run goes on (the code is rechecked under the new CR3).
    let mut g = guest();
    let new_cr3 = g.state.cr3; // same tables
    g.state.gpr[RAX as usize] = new_cr3;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 3, src: RAX }, Some(ExitClass::MovToCr3)),
            inc(RBX),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.tlb_flushes, 1);
    assert_eq!(g.state.gpr[RBX as usize], 1);
    // A CR3 whose tables do not map the code the same way: stop right after it.
    let mut g = guest();
    let other = g.alloc_table();
    g.state.gpr[RAX as usize] = other;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 3, src: RAX }, Some(ExitClass::MovToCr3)),
            inc(RBX),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::CodeChanged);
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(g.state.cr3, other);
    assert_eq!(g.state.gpr[RBX as usize], 0);
    // CR4 paging bits: done, then the cluster ends.
    let mut g = guest();
    g.state.gpr[RAX as usize] = g.state.cr4 | CR4_PGE;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 4, src: RAX }, Some(ExitClass::MovToCr4)),
            inc(RBX),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::ModeChange);
    assert_eq!(out.rip, CODE_VA + L);
    assert_ne!(g.state.cr4 & CR4_PGE, 0);
    assert_eq!(g.tlb_flushes, 1);
    assert_eq!(g.state.gpr[RBX as usize], 0);
    // CR4 bits that do not affect translation: the run continues.
    let mut g = guest();
    g.state.gpr[RAX as usize] = g.state.cr4 | CR4_TSD;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 4, src: RAX }, Some(ExitClass::MovToCr4)),
            inc(RBX),
        ],
    );
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.state.gpr[RBX as usize], 1);
    // Clearing CR4.PAE in long mode: #GP before.
    let mut g = guest();
    g.state.gpr[RAX as usize] = g.state.cr4 & !CR4_PAE;
    let c = prepare(
        &mut g,
        &[(Op::MovToCr { cr: 4, src: RAX }, Some(ExitClass::MovToCr4))],
    );
    assert_eq!(
        run(&mut g, &c).reason,
        StopReason::Fault(Fault::GeneralProtection)
    );
    // CR0 with PG set and PE clear: #GP. Reserved CR0 bits 63:32: #GP.
    let mut g = guest();
    g.state.gpr[RAX as usize] = CR0_PG;
    g.state.gpr[RCX as usize] = g.state.cr0 | 1 << 40;
    let c = prepare(
        &mut g,
        &[(Op::MovToCr { cr: 0, src: RAX }, Some(ExitClass::MovToCr0))],
    );
    assert_eq!(
        run(&mut g, &c).reason,
        StopReason::Fault(Fault::GeneralProtection)
    );
    let c = prepare(
        &mut g,
        &[(Op::MovToCr { cr: 0, src: RCX }, Some(ExitClass::MovToCr0))],
    );
    assert_eq!(
        run(&mut g, &c).reason,
        StopReason::Fault(Fault::GeneralProtection)
    );
    // CR0.WP toggle: done, TLB invalidated, run continues with the new WP.
    let mut g = guest();
    g.state.gpr[RAX as usize] = g.state.cr0 & !CR0_WP;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 0, src: RAX }, Some(ExitClass::MovToCr0)),
            inc(RBX),
        ],
    );
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.state.cr0 & CR0_WP, 0);
    // CR8 lowered with an interrupt pending: stop right after.
    let mut g = guest();
    g.state.cr8 = 0xf;
    g.irq_after = Some(0);
    g.state.rflags |= avex_core::arch::rflags::IF;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 8, src: RAX }, Some(ExitClass::MovToCr8)),
            inc(RBX),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::InterruptPending);
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(g.state.cr8, 0);
    // LMSW cannot clear PE; setting TS works.
    let mut g = guest();
    g.state.gpr[RAX as usize] = 0x8;
    let c = prepare(
        &mut g,
        &[(Op::Lmsw { src: r64(RAX) }, Some(ExitClass::Lmsw))],
    );
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.state.cr0 & 0xf, CR0_TS | CR0_PE);
}

#[test]
fn rep_ins_and_outs_are_precise_per_iteration() {
    // REP INSB into a buffer whose second page is not present: the iterations on the
    // first page are done, RCX/RDI say where to continue, the stop names the page.
    let mut g = guest();
    g.map(DATA_VA + 0x1000, DATA_GPA + 0x1000, PageSize::K4, pte::RW);
    g.script_port(0x60, &[1, 2, 3, 4, 5, 6]);
    g.state.gpr[RDX as usize] = 0x60;
    g.state.gpr[RDI as usize] = DATA_VA + 0xffc;
    g.state.gpr[RCX as usize] = 6;
    let c = prepare(
        &mut g,
        &[(
            Op::Ins {
                size: Size::S1,
                addr_size: Size::S8,
                rep: true,
            },
            Some(ExitClass::Ins),
        )],
    );
    let out = run(&mut g, &c);
    assert_eq!(
        out.reason,
        StopReason::PageFault {
            addr: DATA_VA + 0x1000,
            error_code: pfec::W
        }
    );
    assert_eq!(out.rip, CODE_VA, "resume at the REP INS");
    assert_eq!(g.bytes(DATA_GPA + 0xffc, 4), &[1, 2, 3, 4]);
    assert_eq!(g.state.gpr[RCX as usize], 2);
    assert_eq!(g.state.gpr[RDI as usize], DATA_VA + 0x1000);
    assert_eq!(g.io_log.len(), 4, "no port read for the faulting element");
    assert_eq!(out.stats.rep_iterations, 4);
    assert_eq!(out.stats.insns, 0);

    // REP OUTSW backwards (DF=1), 32-bit address size wraps ESI, budget mid-way.
    let mut g = guest();
    g.map(0, DATA_GPA + 0x2000, PageSize::K4, pte::P);
    g.write_bytes(DATA_GPA + 0x2000, &[0x11, 0x22, 0x33, 0x44]);
    g.state.rflags |= DF;
    g.state.gpr[RSI as usize] = 0xdead_0000_0000_0002;
    g.state.gpr[RCX as usize] = 0xffff_0000_0000_0005;
    g.state.gpr[RDX as usize] = 0x3f8;
    let c = prepare(
        &mut g,
        &[(
            Op::Outs {
                size: Size::S2,
                addr_size: Size::S4,
                rep: true,
                seg: Seg::Ds,
            },
            Some(ExitClass::Outs),
        )],
    );
    let limits = RunLimits {
        max_insns: 2,
        ..RunLimits::default()
    };
    let out = engine::run(&c, &mut g, 0, &limits);
    assert_eq!(
        out.reason,
        StopReason::Budget,
        "each iteration counts against the budget"
    );
    assert_eq!(out.rip, CODE_VA);
    assert_eq!(g.outs(), vec![(0x3f8, 2, 0x4433), (0x3f8, 2, 0x2211)]);
    assert_eq!(
        g.state.gpr[RSI as usize], 0xffff_fffe,
        "ESI written, zero-extended"
    );
    assert_eq!(g.state.gpr[RCX as usize], 3, "ECX counts");
    // Non-REP INSW: one element, RDI advanced.
    let mut g = guest();
    g.script_port(0x1f0, &[0xbeef]);
    g.state.gpr[RDX as usize] = 0x1f0;
    g.state.gpr[RDI as usize] = DATA_VA + 0x10;
    let c = prepare(
        &mut g,
        &[(
            Op::Ins {
                size: Size::S2,
                addr_size: Size::S8,
                rep: false,
            },
            Some(ExitClass::Ins),
        )],
    );
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.bytes(DATA_GPA + 0x10, 2), &[0xef, 0xbe]);
    assert_eq!(g.state.gpr[RDI as usize], DATA_VA + 0x12);
}

#[test]
fn real_exiting_instructions_through_lower() {
    use iced_x86::{Decoder, DecoderOptions};
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        0xee,                         // out dx, al (a cluster starts at an exiting instruction)
        0xec,                         // in al, dx
        0xe6, 0x80,                   // out 0x80, al
        0x0f, 0xa2,                   // cpuid
        0x0f, 0x31,                   // rdtsc
        0xf3, 0x6c,                   // rep insb
        0xf4,                         // hlt
    ];
    let mut insns = Vec::new();
    for d in Decoder::with_ip(64, bytes, CODE_VA, DecoderOptions::NONE) {
        let op = avex_core::lower::lower(&d).expect("lowers");
        insns.push(Insn {
            rip: d.ip(),
            len: d.len() as u8,
            exit_class: op.exit_class(),
            op,
        });
    }
    let c = Cluster::contiguous(Bitness::B64, CODE_VA, bytes.to_vec(), insns, vec![]);
    assert!(validate(&c).is_ok());
    let mut g = guest();
    g.write_bytes(CODE_GPA, bytes);
    g.state.rip = CODE_VA;
    g.state.gpr[RDX as usize] = 0x3f8;
    g.state.gpr[RAX as usize] = 0x41;
    g.state.gpr[RDI as usize] = DATA_VA;
    g.script_port(0x3f8, &[0x42]);
    g.script_port(0x60, &[7, 8]);
    g.cpuid_leaves.insert((0x42, 0), [0, 0, 2, 0]);
    g.tsc = 0x60_0000_0000;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Hlt, "{out:?}");
    assert_eq!(out.rip, c.highest_end() - 1);
    assert_eq!(g.outs(), vec![(0x3f8, 1, 0x41), (0x80, 1, 0x42)]);
    assert_eq!(g.bytes(DATA_GPA, 2), &[7, 8]);
    assert_eq!(g.state.gpr[RDI as usize], DATA_VA + 2);
    assert_eq!(g.state.gpr[RCX as usize], 0);
    assert_eq!(out.stats.exiting, 6);
    assert_eq!(out.stats.rep_iterations, 2);
}
