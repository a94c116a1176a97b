//! Every way a cluster run ends: the resume RIP is exact, every earlier effect is
//! done and no later one; clusters the engine refuses never make it panic. The
//! exiting instructions' effects are in exiting_effects.rs.

mod engine_support;

use avex_core::arch::pte;
use avex_core::engine::mmu::*;
use avex_core::engine::test_guest::{fake_cluster, PageSize, TestGuest, INSN_LEN};
use avex_core::engine::{self, RunLimits, StopReason};
use avex_core::guest::Fault;
use avex_core::ir::Cluster;
use avex_core::ir::*;
use avex_core::policy::ExitClass;
use engine_support::*;

#[test]
fn end_of_cluster_resumes_after_the_last_instruction() {
    let mut g = guest();
    let c = prepare(&mut g, &[out_al(0x80), mov_imm(RBX, 7), out_al(0x81)]);
    g.state.gpr[RAX as usize] = 0x55;
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(out.rip, c.highest_end());
    assert_eq!(g.state.rip, c.highest_end());
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
    let [dec, jnz] = dec_ecx_jnz(0);
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
            dec,
            jnz,
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
    g.state.rflags |= avex_core::arch::rflags::IF;
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
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::SelfWrite, c.highest_end())
    );
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
    c2.code[0].bytes.extend([0x90; INSN_LEN as usize]);
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
    g.state.cr4 &= !CR4_OSXSAVE;
    let c = prepare(&mut g, &[(Op::Xgetbv, Some(ExitClass::Xgetbv))]);
    assert_eq!(
        run(&mut g, &c).reason,
        StopReason::Fault(Fault::InvalidOpcode)
    );
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
    c.code[0].bytes.pop();
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
    c.code[0].start = u64::MAX - 1;
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
        assert!(validate(c).is_err(), "variant {k} must fail validation");
    }
    assert!(validate(&good).is_ok());
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
            let _ = validate(&c);
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
