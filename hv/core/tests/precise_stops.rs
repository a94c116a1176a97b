//! Every way a cluster run ends: the resume RIP is exact, every earlier effect is
//! done and no later one. Also the exiting instructions' effects through `Guest`.

use avex_core::arch::{cr0, cr4, msr, pfec, pte};
use avex_core::engine::mmu::Paging;
use avex_core::engine::test_guest::{fake_cluster, PageSize, TestGuest, INSN_LEN};
use avex_core::engine::{self, RunLimits, RunOutcome, StopReason, DF};
use avex_core::guest::Fault;
use avex_core::ir::Cluster;
use avex_core::ir::*;
use avex_core::policy::ExitClass;

const CODE_VA: u64 = 0x40_0000;
const CODE_GPA: u64 = 0x1000;
const DATA_VA: u64 = 0x80_0000;
const DATA_GPA: u64 = 0x10_0000;
const L: u64 = INSN_LEN as u64;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;
const R11: u8 = 11;

fn reg(index: u8, size: Size) -> RegRef {
    RegRef {
        index,
        size,
        high8: false,
    }
}
fn r64(i: u8) -> Operand {
    Operand::Reg(reg(i, Size::S8))
}
fn mem(base: u8, disp: i64) -> MemRef {
    MemRef {
        seg: Seg::Ds,
        base: Some(base),
        index: None,
        scale: 1,
        disp,
        addr_size: Size::S8,
    }
}
fn out_al(port: u8) -> (Op, Option<ExitClass>) {
    (
        Op::Out {
            size: Size::S1,
            port: PortSrc::Imm(port),
        },
        Some(ExitClass::Out),
    )
}
fn gap(op: Op) -> (Op, Option<ExitClass>) {
    (op, None)
}
fn mov_imm(r: u8, v: u64) -> (Op, Option<ExitClass>) {
    gap(Op::Mov {
        size: Size::S8,
        dst: r64(r),
        src: Operand::Imm(v),
    })
}
fn inc(r: u8) -> (Op, Option<ExitClass>) {
    gap(Op::Unary {
        op: UnaryOp::Inc,
        size: Size::S8,
        dst: r64(r),
    })
}

fn guest() -> TestGuest {
    let mut g = TestGuest::long_mode(4 << 20);
    g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g
}

fn prepare(g: &mut TestGuest, ops: &[(Op, Option<ExitClass>)]) -> Cluster {
    let c = fake_cluster(CODE_VA, Bitness::B64, ops);
    g.load_code(CODE_GPA, &c);
    g.state.rip = CODE_VA;
    c
}

fn run(g: &mut TestGuest, c: &Cluster) -> RunOutcome {
    engine::run(c, g, 0, &RunLimits::default())
}

#[test]
fn end_of_cluster_resumes_after_the_last_instruction() {
    let mut g = guest();
    let c = prepare(&mut g, &[out_al(0x80), mov_imm(RBX, 7), out_al(0x81)]);
    g.state.gpr[RAX as usize] = 0x55;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(out.rip, c.end);
    assert_eq!(g.state.rip, c.end);
    assert_eq!(g.outs(), vec![(0x80, 1, 0x55), (0x81, 1, 0x55)]);
    assert_eq!(g.state.gpr[RBX as usize], 7);
    assert_eq!(out.stats.insns, 3);
    assert_eq!(out.stats.exiting, 2);
    assert_eq!(out.stats.exits_of(ExitClass::Out), 2);
    assert_eq!(out.exiting_by_class().collect::<Vec<_>>(), vec![("OUT", 2)]);
    assert_eq!(out.early_stop(), None);
    assert_eq!(
        (g.state_reads, g.state_writes),
        (1, 1),
        "one bulk get and set"
    );
}

#[test]
fn start_index_skips_the_completed_exiting_instruction() {
    let mut g = guest();
    let c = prepare(&mut g, &[out_al(0x80), mov_imm(RBX, 7), out_al(0x81)]);
    g.state.rip = CODE_VA + L;
    let out = engine::run(&c, &mut g, 1, &RunLimits::default());
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.outs(), vec![(0x81, 1, 0xff & g.state.gpr[0] as u32)]);
    // A RIP that is not the start instruction's: nothing done.
    let mut g = guest();
    let c = prepare(&mut g, &[out_al(0x80), mov_imm(RBX, 7)]);
    g.state.rip = CODE_VA + L;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(out.reason, StopReason::StateMismatch);
    assert!(g.io_log.is_empty());
    assert_eq!(g.state_writes, 0);
    // Wrong code size (cluster is 32-bit, guest is in 64-bit mode).
    let mut c32 = c.clone();
    c32.bitness = Bitness::B32;
    g.state.rip = CODE_VA;
    assert_eq!(
        engine::run(&c32, &mut g, 0, &RunLimits::default()).reason,
        StopReason::StateMismatch
    );
    // Start past the end.
    assert!(matches!(
        engine::run(&c, &mut g, 9, &RunLimits::default()).reason,
        StopReason::Invalid(_)
    ));
}

#[test]
fn page_fault_on_a_gap_filler_stops_before_it() {
    let mut g = guest();
    g.state.gpr[RSI as usize] = 0x9999_0000; // unmapped
    let c = prepare(
        &mut g,
        &[
            out_al(0x80),
            mov_imm(RBX, 1),
            gap(Op::Mov {
                size: Size::S8,
                dst: r64(RAX),
                src: Operand::Mem(mem(RSI, 8)),
            }),
            mov_imm(RBX, 2),
            out_al(0x81),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(
        out.reason,
        StopReason::PageFault {
            addr: 0x9999_0008,
            error_code: 0
        }
    );
    assert_eq!(out.rip, CODE_VA + 2 * L);
    assert_eq!(out.index, Some(2));
    assert_eq!(g.state.rip, CODE_VA + 2 * L);
    assert_eq!(
        g.state.gpr[RBX as usize], 1,
        "earlier effects done, later not"
    );
    assert_eq!(g.outs().len(), 1);
    assert_eq!(out.stats.insns, 2);
    assert_eq!(out.early_stop().as_deref(), Some("PAGE_FAULT"));
    assert_eq!(
        g.state.cr2, 0,
        "nothing injected: the guest takes the fault natively"
    );
}

fn loop_cluster(g: &mut TestGuest, cap: Option<u16>) -> Cluster {
    // 0: in al, dx   1: inc rbx   2: dec ecx   3: jnz 0   4: out 0x81, al
    let mut c = prepare(
        g,
        &[
            (
                Op::In {
                    size: Size::S1,
                    port: PortSrc::Dx,
                },
                Some(ExitClass::In),
            ),
            inc(RBX),
            gap(Op::Unary {
                op: UnaryOp::Dec,
                size: Size::S4,
                dst: Operand::Reg(reg(RCX, Size::S4)),
            }),
            gap(Op::Jcc {
                cond: Cond::Ne,
                target: Target::Insn(0),
            }),
            out_al(0x81),
        ],
    );
    c.back_edges.push(BackEdge { insn: 3, cap });
    c
}

#[test]
fn interrupt_pending_at_a_back_edge() {
    let mut g = guest();
    let c = loop_cluster(&mut g, None);
    g.state.gpr[RCX as usize] = 100;
    g.state.gpr[RDX as usize] = 0x3f8;
    g.irq_after = Some(2); // pending at the third back-edge
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::InterruptPending);
    assert_eq!(out.rip, CODE_VA, "at the branch target");
    assert_eq!(out.index, Some(0));
    assert_eq!(g.state.gpr[RBX as usize], 3);
    assert_eq!(g.state.gpr[RCX as usize], 97);
    assert_eq!(g.io_log.len(), 3);
    assert_eq!(g.irq_checks, 3);
    assert_eq!(out.stats.back_edges, 3);
    assert_eq!(out.stats.exits_of(ExitClass::In), 3);
    // Without an interrupt the loop runs to completion.
    let mut g = guest();
    let c = loop_cluster(&mut g, None);
    g.state.gpr[RCX as usize] = 100;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.gpr[RBX as usize], 100);
    assert_eq!(g.outs().len(), 1);
}

#[test]
fn back_edge_cap_stops_at_the_target() {
    let mut g = guest();
    let c = loop_cluster(&mut g, Some(2));
    g.state.gpr[RCX as usize] = 100;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::BackEdgeCap);
    assert_eq!(out.rip, CODE_VA);
    // The body ran 3 times; the third branch was taken and ended the run.
    assert_eq!(g.state.gpr[RBX as usize], 3);
    assert_eq!(g.state.gpr[RCX as usize], 97);
    assert!(g.outs().is_empty());
    // A backward branch with no back-edge entry is treated as cap 0.
    let mut g = guest();
    let mut c = loop_cluster(&mut g, None);
    c.back_edges.clear();
    g.state.gpr[RCX as usize] = 100;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::BackEdgeCap);
    assert_eq!(g.state.gpr[RBX as usize], 1);
}

#[test]
fn instruction_budget() {
    let mut g = guest();
    let c = loop_cluster(&mut g, None);
    g.state.gpr[RCX as usize] = 1000;
    let limits = RunLimits {
        max_insns: 10,
        ..RunLimits::default()
    };
    let out = engine::run(&c, &mut g, 0, &limits);
    assert_eq!(out.reason, StopReason::Budget);
    assert_eq!(out.stats.insns, 10);
    // 10 instructions: two full iterations (8) then IN and INC.
    assert_eq!(out.rip, CODE_VA + 2 * L);
    assert_eq!(g.state.gpr[RBX as usize], 3);
    assert_eq!(g.state.gpr[RCX as usize], 998);
    assert_eq!(RunLimits::default().max_insns, 4096);
}

#[test]
fn branch_out_of_the_cluster() {
    let mut g = guest();
    let c = prepare(
        &mut g,
        &[
            out_al(0x80),
            gap(Op::Jmp {
                target: Target::Exit(0xdead_b000),
            }),
            out_al(0x81),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::ExitBranch);
    assert_eq!(out.rip, 0xdead_b000);
    assert_eq!(g.state.rip, 0xdead_b000);
    assert_eq!(g.outs().len(), 1);
    // A forward branch inside the cluster skips instructions.
    let mut g = guest();
    let c = prepare(
        &mut g,
        &[
            gap(Op::Stc),
            gap(Op::Jcc {
                cond: Cond::B,
                target: Target::Insn(3),
            }),
            out_al(0x80),
            out_al(0x81),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.outs().iter().map(|o| o.0).collect::<Vec<_>>(), vec![0x81]);
}

#[test]
fn code_changed_does_nothing() {
    let mut g = guest();
    let c = prepare(&mut g, &[out_al(0x80), mov_imm(RBX, 1)]);
    g.write_bytes(CODE_GPA + 5, &[0xcc]);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::CodeChanged);
    assert_eq!(out.rip, CODE_VA);
    assert!(g.io_log.is_empty());
    assert_eq!(g.state_writes, 0);
    assert_eq!(g.state.gpr[RBX as usize], 0);
    // Unmapped code: unreadable, nothing done.
    g.map(CODE_VA, CODE_GPA, PageSize::K4, 0);
    assert_eq!(run(&mut g, &c).reason, StopReason::CodeUnreadable);
}

#[test]
fn write_into_own_code_stops_right_after_it() {
    let mut g = guest();
    g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P | pte::RW);
    g.state.gpr[RDI as usize] = CODE_VA + 0x800; // same page, beyond the cluster
    g.state.gpr[RAX as usize] = 0xab;
    let c = prepare(
        &mut g,
        &[
            out_al(0x80),
            gap(Op::Mov {
                size: Size::S1,
                dst: Operand::Mem(mem(RDI, 0)),
                src: Operand::Reg(reg(RAX, Size::S1)),
            }),
            mov_imm(RBX, 9),
            out_al(0x81),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::SelfWrite);
    assert_eq!(out.rip, CODE_VA + 2 * L);
    assert_eq!(out.index, Some(2));
    assert_eq!(g.bytes(CODE_GPA + 0x800, 1), &[0xab], "the write is done");
    assert_eq!(g.state.gpr[RBX as usize], 0, "nothing after it");
    assert_eq!(g.outs().len(), 1);
    // As the last instruction: still reported, resuming after it.
    let mut g = guest();
    g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P | pte::RW);
    g.state.gpr[RDI as usize] = CODE_VA + 0x800;
    let c = prepare(
        &mut g,
        &[gap(Op::Mov {
            size: Size::S1,
            dst: Operand::Mem(mem(RDI, 0)),
            src: Operand::Imm(0xcc),
        })],
    );
    let out = run(&mut g, &c);
    assert_eq!((out.reason, out.rip), (StopReason::SelfWrite, c.end));
    // Through another virtual alias of the same frame: still caught (physical pages).
    let mut g = guest();
    g.map(DATA_VA, CODE_GPA, PageSize::K4, pte::P | pte::RW);
    g.state.gpr[RDI as usize] = DATA_VA + 0x900;
    let c = prepare(
        &mut g,
        &[gap(Op::Mov {
            size: Size::S8,
            dst: Operand::Mem(mem(RDI, 0)),
            src: Operand::Imm(1),
        })],
    );
    let mut c2 = c.clone();
    let extra = fake_cluster(CODE_VA, Bitness::B64, &[out_al(0x80), out_al(0x80)]);
    c2.insns.push(Insn {
        rip: CODE_VA + L,
        ..extra.insns[1].clone()
    });
    c2.end += L;
    c2.guest_bytes.extend([0x90; INSN_LEN as usize]);
    g.load_code(CODE_GPA, &c2);
    let out = run(&mut g, &c2);
    assert_eq!(out.reason, StopReason::SelfWrite);
    assert!(g.io_log.is_empty());
}

#[test]
fn hlt_and_unsupported_and_faults_stop_before() {
    // HLT: resume at the HLT, the backend handles it.
    let mut g = guest();
    let c = prepare(
        &mut g,
        &[out_al(0x80), (Op::Hlt, Some(ExitClass::Hlt)), out_al(0x81)],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Hlt);
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(out.early_stop(), None);
    assert_eq!(out.stats.exiting, 1, "the HLT itself is not counted");
    assert_eq!(g.outs().len(), 1);
    // RDPMC: unsupported.
    let mut g = guest();
    let c = prepare(
        &mut g,
        &[inc(RBX), (Op::Rdpmc, Some(ExitClass::Rdpmc)), inc(RBX)],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Unsupported);
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(g.state.gpr[RBX as usize], 1);
    // RDMSR of an MSR the guest trait faults: #GP before it.
    let mut g = guest();
    g.msr_faults.insert(0x1234);
    g.state.gpr[RCX as usize] = 0x1234;
    let c = prepare(&mut g, &[inc(RBX), (Op::Rdmsr, Some(ExitClass::Rdmsr))]);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Fault(Fault::GeneralProtection));
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(g.state.gpr[RBX as usize], 1);
    // Privileged instructions at CPL 3: #GP before them, nothing done.
    for op in [
        Op::Wrmsr,
        Op::Rdmsr,
        Op::MovToCr { cr: 3, src: RAX },
        Op::MovFromCr { cr: 0, dst: RAX },
        Op::Clts,
        Op::Hlt,
        Op::Wbinvd,
        Op::Invd,
        Op::Xsetbv,
        Op::Invlpg { addr: mem(RAX, 0) },
    ] {
        let mut g = guest();
        g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P | pte::US);
        g.set_cpl(3);
        g.msrs.insert(0, 0);
        let c = prepare(&mut g, &[gap(op)]);
        let out = run(&mut g, &c);
        assert_eq!(
            out.reason,
            StopReason::Fault(Fault::GeneralProtection),
            "{op:?}"
        );
        assert_eq!(out.rip, CODE_VA);
        assert!(g.msr_writes.is_empty() && g.tlb_flushes == 0 && g.state_writes == 0);
    }
    // Port I/O at CPL 3 with IOPL 0 needs the TSS bitmap: left to the CPU.
    let mut g = guest();
    g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P | pte::US);
    g.set_cpl(3);
    let c = prepare(&mut g, &[out_al(0x80)]);
    assert_eq!(run(&mut g, &c).reason, StopReason::Unsupported);
    assert!(g.io_log.is_empty());
    // ... but fine with IOPL 3.
    g.state.rflags |= 3 << 12;
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.outs().len(), 1);
    // XGETBV without CR4.OSXSAVE: #UD.
    let mut g = guest();
    g.state.cr4 &= !cr4::OSXSAVE;
    let c = prepare(&mut g, &[(Op::Xgetbv, Some(ExitClass::Xgetbv))]);
    assert_eq!(
        run(&mut g, &c).reason,
        StopReason::Fault(Fault::InvalidOpcode)
    );
}

#[test]
fn exiting_instructions_do_their_work_through_the_guest() {
    let mut g = guest();
    g.script_port(0x71, &[0x12345678]);
    g.cpuid_leaves.insert((7, 0), [1, 2, 3, 4]);
    g.msrs.insert(msr::APIC_BASE, msr::APIC_BASE_RESET);
    g.msrs.insert(msr::TSC_AUX, 5);
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
            mov_imm(RCX, msr::APIC_BASE.into()),
            (Op::Rdmsr, Some(ExitClass::Rdmsr)),
            gap(Op::Mov {
                size: Size::S8,
                dst: r64(R10),
                src: r64(RAX),
            }),
            mov_imm(RCX, msr::FS_BASE.into()),
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
    g.state.cr0 |= cr0::TS;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(
        g.state.gpr[R8 as usize], 0x1234_5678,
        "32-bit IN zero-extends"
    );
    assert_eq!(g.state.gpr[R9 as usize], 4);
    assert_eq!(g.state.gpr[RBX as usize], 2);
    assert_eq!(g.state.gpr[R10 as usize], msr::APIC_BASE_RESET);
    assert_eq!(g.msr_writes, vec![(msr::FS_BASE, 0x7fff_0000_5000)]);
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
        g.state.gpr[R11 as usize] & cr0::TS,
        cr0::TS,
        "read before CLTS"
    );
    assert_eq!(g.state.cr0 & cr0::TS, 0);
    assert_eq!(g.xcr0, 7);
    assert_eq!(g.tlb_flushes, 1);
    assert_eq!(out.stats.exiting, 11);
    assert_eq!(out.stats.exits_of(ExitClass::Wrmsr), 1);
    assert_eq!(g.cpuid_calls, 1);

    // RDTSC/RDTSCP values.
    let mut g = guest();
    g.tsc = 0x1_0000_0000;
    g.tsc_step = 10;
    g.msrs.insert(msr::TSC_AUX, 5);
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
    g.state.gpr[RAX as usize] = g.state.cr4 | cr4::PGE;
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
    assert_ne!(g.state.cr4 & cr4::PGE, 0);
    assert_eq!(g.tlb_flushes, 1);
    assert_eq!(g.state.gpr[RBX as usize], 0);
    // CR4 bits that do not affect translation: the run continues.
    let mut g = guest();
    g.state.gpr[RAX as usize] = g.state.cr4 | cr4::TSD;
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
    g.state.gpr[RAX as usize] = g.state.cr4 & !cr4::PAE;
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
    g.state.gpr[RAX as usize] = cr0::PG;
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
    g.state.gpr[RAX as usize] = g.state.cr0 & !cr0::WP;
    let c = prepare(
        &mut g,
        &[
            (Op::MovToCr { cr: 0, src: RAX }, Some(ExitClass::MovToCr0)),
            inc(RBX),
        ],
    );
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.state.cr0 & cr0::WP, 0);
    // CR8 lowered with an interrupt pending: stop right after.
    let mut g = guest();
    g.state.cr8 = 0xf;
    g.irq_after = Some(0);
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
    assert_eq!(g.state.cr0 & 0xf, cr0::TS | cr0::PE);
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
fn push_pop_and_stack_widths() {
    let mut g = guest();
    g.state.gpr[RSP as usize] = DATA_VA + 0x100;
    g.state.gpr[RAX as usize] = 0x1122_3344_5566_7788;
    let c = prepare(
        &mut g,
        &[
            gap(Op::Push {
                size: Size::S8,
                src: r64(RAX),
            }),
            gap(Op::Push {
                size: Size::S2,
                src: Operand::Imm(0xfffe),
            }),
            gap(Op::Pop {
                size: Size::S2,
                dst: Operand::Reg(reg(RBX, Size::S2)),
            }),
            // pop [rsp+8]: the address uses RSP after the pop.
            gap(Op::Pop {
                size: Size::S8,
                dst: Operand::Mem(mem(RSP, 0)),
            }),
            gap(Op::Pop {
                size: Size::S8,
                dst: r64(RSP),
            }),
        ],
    );
    g.write_bytes(DATA_GPA + 0x100, &0x80_0500u64.to_le_bytes());
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.state.gpr[RBX as usize] & 0xffff, 0xfffe);
    assert_eq!(
        g.bytes(DATA_GPA + 0x100, 8),
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    assert_eq!(
        g.state.gpr[RSP as usize], 0x1122_3344_5566_7788,
        "POP RSP loads the popped value"
    );
    // 32-bit code with a 16-bit stack segment (SS.B = 0): SP wraps within 64K.
    let mut g = TestGuest::protected32(1 << 20, Paging::None);
    g.state.seg[Seg::Ss as usize].attrs &= !(1 << 14);
    g.state.seg[Seg::Ss as usize].limit = 0xffff;
    g.state.gpr[RSP as usize] = 0x1234_0000;
    g.state.gpr[RAX as usize] = 0xaabb_ccdd;
    let push32 = gap(Op::Push {
        size: Size::S4,
        src: Operand::Reg(reg(RAX, Size::S4)),
    });
    let push16 = gap(Op::Push {
        size: Size::S2,
        src: Operand::Imm(0x5566),
    });
    let c = fake_cluster(0x8000, Bitness::B32, &[push16, push32]);
    g.load_code(0x8000, &c);
    g.state.rip = 0x8000;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(
        g.state.gpr[RSP as usize], 0x1234_fffa,
        "SP wrapped, upper bits kept"
    );
    assert_eq!(g.bytes(0xfffa, 6), &[0xdd, 0xcc, 0xbb, 0xaa, 0x66, 0x55]);
    // A 4-byte push at SP 2 would write 0xfffe..0x10001, past the 64K limit: #GP
    // (#SS on hardware) before it.
    let c = fake_cluster(0x8000, Bitness::B32, &[push32]);
    g.state.gpr[RSP as usize] = 0x2;
    g.state.rip = 0x8000;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(
        out.reason,
        StopReason::Fault(Fault::GeneralProtection),
        "{out:?}"
    );
    assert_eq!(out.rip, 0x8000);
    assert_eq!(g.state.gpr[RSP as usize], 0x2);
}

#[test]
fn hostile_clusters_never_panic() {
    let mut g = guest();
    let good = prepare(&mut g, &[out_al(0x80), mov_imm(RBX, 1)]);
    let mut variants = Vec::new();
    let mut c = good.clone();
    c.insns.clear();
    variants.push(c);
    let mut c = good.clone();
    c.guest_bytes.pop();
    variants.push(c);
    let mut c = good.clone();
    c.insns[1].rip = u64::MAX - 2;
    variants.push(c);
    let mut c = good.clone();
    c.insns[1].op = Op::Jmp {
        target: Target::Insn(999),
    };
    variants.push(c);
    let mut c = good.clone();
    c.insns[1].op = Op::Mov {
        size: Size::S8,
        dst: Operand::Imm(3),
        src: Operand::Imm(4),
    };
    variants.push(c);
    let mut c = good.clone();
    c.insns[1].op = Op::Mov {
        size: Size::S8,
        dst: Operand::Reg(RegRef {
            index: 200,
            size: Size::S1,
            high8: true,
        }),
        src: Operand::Mem(MemRef {
            seg: Seg::Gs,
            base: Some(77),
            index: Some(99),
            scale: 3,
            disp: i64::MIN,
            addr_size: Size::S1,
        }),
    };
    variants.push(c);
    let mut c = good.clone();
    c.end = u64::MAX;
    variants.push(c);
    let mut c = good.clone();
    c.insns[1].op = Op::Xchg {
        size: Size::S8,
        a: Operand::Mem(mem(RBX, 0)),
        b: Operand::Mem(mem(RCX, 0)),
    };
    variants.push(c);
    let mut c = good.clone();
    c.back_edges = vec![
        BackEdge {
            insn: 500,
            cap: Some(0)
        };
        100
    ];
    variants.push(c);
    for (k, c) in variants.iter().enumerate() {
        g.state.rip = CODE_VA;
        let _ = engine::run(c, &mut g, 0, &RunLimits::default());
        let _ = engine::run(c, &mut g, 1, &RunLimits::default());
        assert!(
            engine::validate(c).is_err(),
            "variant {k} must fail validation"
        );
    }
    assert!(engine::validate(&good).is_ok());
    // A LOOP to an index outside the cluster stops before it, RCX untouched.
    let mut g = guest();
    g.state.gpr[RCX as usize] = 5;
    let c = prepare(
        &mut g,
        &[
            inc(RBX),
            gap(Op::Loop {
                kind: LoopKind::Loop,
                addr_size: Size::S8,
                target: Target::Insn(77),
            }),
        ],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Invalid(engine::Invalid::Target(77)));
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(
        (g.state.gpr[RBX as usize], g.state.gpr[RCX as usize]),
        (1, 5)
    );
}

fn exit_class_of(op: &Op) -> Option<ExitClass> {
    Some(match op {
        Op::In { .. } => ExitClass::In,
        Op::Out { .. } => ExitClass::Out,
        Op::Ins { .. } => ExitClass::Ins,
        Op::Cpuid => ExitClass::Cpuid,
        Op::Rdtsc => ExitClass::Rdtsc,
        Op::Hlt => ExitClass::Hlt,
        _ => return None,
    })
}

#[test]
fn real_exiting_instructions_through_lower() {
    use iced_x86::{Decoder, DecoderOptions};
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0xb0, 0x41,                   // mov al, 'A'
        0xee,                         // out dx, al
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
            exit_class: exit_class_of(&op),
            op,
        });
    }
    let c = Cluster {
        start: CODE_VA,
        end: CODE_VA + bytes.len() as u64,
        bitness: Bitness::B64,
        guest_bytes: bytes.to_vec(),
        insns,
        back_edges: vec![],
    };
    assert!(engine::validate(&c).is_ok());
    let mut g = guest();
    g.write_bytes(CODE_GPA, bytes);
    g.state.rip = CODE_VA;
    g.state.gpr[RDI as usize] = DATA_VA;
    g.script_port(0x3f8, &[0x42]);
    g.script_port(0x60, &[7, 8]);
    g.cpuid_leaves.insert((0x42, 0), [0, 0, 2, 0]);
    g.tsc = 0x60_0000_0000;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Hlt, "{out:?}");
    assert_eq!(out.rip, c.end - 1);
    assert_eq!(g.outs(), vec![(0x3f8, 1, 0x41), (0x80, 1, 0x42)]);
    assert_eq!(g.bytes(DATA_GPA, 2), &[7, 8]);
    assert_eq!(g.state.gpr[RDI as usize], DATA_VA + 2);
    assert_eq!(g.state.gpr[RCX as usize], 0);
    assert_eq!(out.stats.exiting, 6);
    assert_eq!(out.stats.rep_iterations, 2);
}

fn mutate_and_run(g0: &TestGuest, base: &Cluster, seed: u64, rounds: u32) -> u32 {
    let ser = postcard::to_allocvec(base).unwrap();
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut g = g0.clone();
    let mut ran = 0;
    for round in 0..rounds {
        if round % 500 == 0 {
            g = g0.clone();
        }
        let mut b = ser.clone();
        for _ in 0..1 + next() % 4 {
            let k = (next() % b.len() as u64) as usize;
            b[k] = next() as u8;
        }
        if let Ok(c) = postcard::from_bytes::<Cluster>(&b) {
            g.state = g0.state.clone();
            g.state.rip = c.insns.first().map_or(0, |i| i.rip);
            let limits = RunLimits {
                max_insns: 1000,
                ..RunLimits::default()
            };
            let _ = engine::run(&c, &mut g, 0, &limits);
            let _ = engine::run(&c, &mut g, 1, &limits);
            let _ = engine::validate(&c);
            ran += 1;
        }
    }
    ran
}

#[test]
fn mutated_clusters_never_panic() {
    let ops = [
        out_al(0x80),
        gap(Op::Mov {
            size: Size::S8,
            dst: Operand::Mem(mem(RBX, 8)),
            src: r64(RAX),
        }),
        gap(Op::Bit {
            op: BitOp::Bts,
            size: Size::S4,
            dst: Operand::Mem(mem(RBX, 0)),
            bit: Operand::Reg(reg(RCX, Size::S4)),
        }),
        gap(Op::Shift {
            op: ShiftOp::Rcl,
            size: Size::S2,
            dst: r64(RDX),
            count: Operand::Reg(reg(RCX, Size::S1)),
        }),
        gap(Op::Loop {
            kind: LoopKind::Loop,
            addr_size: Size::S4,
            target: Target::Insn(0),
        }),
        (
            Op::Ins {
                size: Size::S2,
                addr_size: Size::S8,
                rep: true,
            },
            Some(ExitClass::Ins),
        ),
        (Op::MovToCr { cr: 3, src: RSI }, Some(ExitClass::MovToCr3)),
    ];
    // 64-bit long mode.
    let mut g = guest();
    g.state.gpr[RBX as usize] = DATA_VA;
    g.state.gpr[RCX as usize] = 5;
    g.state.gpr[RDI as usize] = DATA_VA;
    g.state.gpr[RSI as usize] = g.state.cr3;
    let mut c = prepare(&mut g, &ops);
    c.back_edges.push(BackEdge {
        insn: 4,
        cap: Some(3),
    });
    let ran = mutate_and_run(&g, &c, 0x9e37_79b9, 20_000);
    assert!(ran > 2_000, "only {ran} mutants deserialized");
    // 32-bit protected mode without paging (addresses wrap at 4G, segment limits).
    let mut g = TestGuest::protected32(1 << 20, Paging::None);
    g.state.gpr[RBX as usize] = 0x8_0000;
    g.state.gpr[RCX as usize] = 5;
    g.state.seg[Seg::Ds as usize].limit = 0xf_ffff;
    let mut c = fake_cluster(0x4000, Bitness::B32, &ops);
    g.load_code(0x4000, &c);
    c.back_edges.push(BackEdge { insn: 4, cap: None });
    let ran = mutate_and_run(&g, &c, 0x1234_5678, 20_000);
    assert!(ran > 2_000, "only {ran} mutants deserialized");
}
