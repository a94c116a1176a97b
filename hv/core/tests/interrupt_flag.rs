//! PUSHF, POPF, CLI and STI in the engine: which flags change at which privilege,
//! and where a run ends when interrupts become enabled (right after a POPF that
//! sets IF; after the instruction in an STI's shadow, or before the STI when the
//! engine cannot complete that instruction).

mod engine_support;

use avex_core::arch::rflags::{CF, FIXED, IF, IOPL, RF, TF, ZF};
use avex_core::engine::test_guest::TestGuest;
use avex_core::engine::StopReason;
use avex_core::guest::Fault;
use avex_core::ir::*;
use avex_core::policy::ExitClass;
use engine_support::*;

const STACK_TOP: u64 = DATA_VA + 0x800;
const STACK_GPA: u64 = DATA_GPA + 0x800;

fn stack_guest(rflags: u64) -> TestGuest {
    let mut g = guest();
    g.state.gpr[RSP as usize] = STACK_TOP;
    g.state.rflags = rflags;
    g
}

/// A guest at CPL 3 with its code and data user-accessible.
fn user_guest(rflags: u64) -> TestGuest {
    use avex_core::arch::pte;
    use avex_core::engine::test_guest::PageSize;
    let mut g = TestGuest::long_mode(4 << 20);
    g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P | pte::US);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW | pte::US);
    g.state.gpr[RSP as usize] = STACK_TOP;
    g.state.rflags = rflags;
    g.set_cpl(3);
    g
}

fn push_imm(v: u64) -> (Op, Option<ExitClass>) {
    gap(Op::Push {
        size: Size::S8,
        src: Operand::Imm(v),
    })
}
fn popf() -> (Op, Option<ExitClass>) {
    gap(Op::Popf { size: Size::S8 })
}

#[test]
fn popf_setting_if_ends_the_run_right_after_it() {
    let mut g = stack_guest(FIXED);
    let ops = [
        out_al(0x80),
        push_imm(FIXED | IF | CF),
        popf(),
        out_al(0x81),
    ];
    let c = prepare(&mut g, &ops);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::InterruptWindow);
    assert_eq!(out.rip, CODE_VA + 3 * L, "right after the POPF");
    assert_eq!(out.index, Some(3));
    assert_eq!(out.early_stop(), None, "a natural end");
    assert_eq!(g.state.rflags, FIXED | IF | CF);
    assert_eq!(g.state.gpr[RSP as usize], STACK_TOP);
    assert_eq!(g.outs().len(), 1);

    // IF stays clear (or was already set): the run goes on.
    for (before, popped) in [(FIXED, FIXED | ZF), (FIXED | IF, FIXED | IF)] {
        let mut g = stack_guest(before);
        let c = prepare(
            &mut g,
            &[out_al(0x80), push_imm(popped), popf(), out_al(0x81)],
        );
        let out = run(&mut g, &c);
        assert_eq!(out.reason, StopReason::End);
        assert_eq!(g.state.rflags, popped);
        assert_eq!(g.outs().len(), 2);
    }
}

#[test]
fn popf_loads_by_privilege_and_never_sets_tf() {
    // CPL 0: IOPL loads, RF clears.
    let mut g = stack_guest(FIXED | IF | RF);
    let c = prepare(
        &mut g,
        &[out_al(0x80), push_imm(FIXED | IF | IOPL | ZF), popf()],
    );
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.state.rflags, FIXED | IF | IOPL | ZF);

    // CPL 3, IOPL 0: neither IF nor IOPL changes (no fault).
    let mut g = user_guest(FIXED | IF);
    let c = prepare(&mut g, &[out_al(0x80), push_imm(FIXED | IOPL | CF), popf()]);
    g.state.rflags = FIXED | IF | IOPL; // IOPL 3 so the OUT runs
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End);
    assert_eq!(g.state.rflags, FIXED | IOPL | CF, "IF loads at CPL <= IOPL");
    let mut g = user_guest(FIXED);
    let c = prepare(
        &mut g,
        &[push_imm(FIXED | IF | IOPL | CF), popf(), out_al(0x80)],
    );
    let c = Cluster {
        insns: c.insns[..2]
            .iter()
            .cloned()
            .chain([Insn {
                exit_class: None,
                ..c.insns[2].clone()
            }])
            .collect(),
        ..c
    };
    // A cluster must start at an exiting instruction: run the POPF from index 1.
    g.state.rip = CODE_VA + L;
    g.state.gpr[RSP as usize] = STACK_TOP - 8;
    g.write_bytes(STACK_GPA - 8, &(FIXED | IF | IOPL | CF).to_le_bytes());
    let out = avex_core::engine::run(&c, &mut g, 1, &Default::default());
    assert_ne!(out.reason, StopReason::InterruptWindow);
    assert_eq!(g.state.rflags & (IF | IOPL | CF), CF, "CPL 3 > IOPL 0");

    // Setting TF: stop before the POPF, nothing done.
    let mut g = stack_guest(FIXED | IF);
    let c = prepare(
        &mut g,
        &[out_al(0x80), push_imm(FIXED | TF), popf(), out_al(0x81)],
    );
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::Unsupported);
    assert_eq!(out.rip, CODE_VA + 2 * L);
    assert_eq!(g.state.gpr[RSP as usize], STACK_TOP - 8, "not popped");
    assert_eq!(g.state.rflags, FIXED | IF);
}

#[test]
fn pushf_clears_rf_and_cli_needs_privilege() {
    let mut g = stack_guest(FIXED | IF | RF | ZF);
    let pushf = gap(Op::Pushf { size: Size::S8 });
    let c = prepare(&mut g, &[out_al(0x80), pushf, gap(Op::Cli)]);
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(
        g.read_u64(STACK_GPA - 8),
        FIXED | IF | ZF,
        "RF is not pushed"
    );
    assert_eq!(g.state.rflags & IF, 0);

    // CPL 3 > IOPL: #GP, stopped before the CLI.
    let mut g = user_guest(FIXED | IF | IOPL);
    let c = prepare(&mut g, &[out_al(0x80), gap(Op::Cli)]);
    g.state.rflags = FIXED | IF | IOPL;
    assert_eq!(run(&mut g, &c).reason, StopReason::End, "IOPL 3: allowed");
    assert_eq!(g.state.rflags & IF, 0);
    let mut g = user_guest(FIXED | IF);
    let c = prepare(&mut g, &[gap(Op::Cli), out_al(0x80)]);
    let c = Cluster {
        insns: vec![c.insns[1].clone(), c.insns[0].clone()]
            .into_iter()
            .enumerate()
            .map(|(k, i)| Insn {
                rip: CODE_VA + k as u64 * L,
                ..i
            })
            .collect(),
        ..c
    };
    g.state.rip = CODE_VA + L;
    let out = avex_core::engine::run(&c, &mut g, 1, &Default::default());
    assert_eq!(out.reason, StopReason::Fault(Fault::GeneralProtection));
    assert_eq!(out.rip, CODE_VA + L);
    assert_eq!(g.state.rflags & IF, IF);
}

#[test]
fn sti_runs_its_shadow_then_ends() {
    let sti = gap(Op::Sti);
    // IF clear: STI, the next instruction, then the run ends.
    let mut g = stack_guest(FIXED);
    let c = prepare(&mut g, &[out_al(0x80), sti, inc(RBX), out_al(0x81)]);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::InterruptWindow);
    assert_eq!(out.rip, CODE_VA + 3 * L, "after the shadowed instruction");
    assert_eq!(out.index, Some(3));
    assert_eq!(g.state.gpr[RBX as usize], 1);
    assert_eq!(g.state.rflags & IF, IF);
    assert_eq!(out.stats.insns, 3);
    assert_eq!(g.outs().len(), 1);

    // IF already set: no shadow, the run goes on.
    let mut g = stack_guest(FIXED | IF);
    let c = prepare(&mut g, &[out_al(0x80), sti, inc(RBX), out_al(0x81)]);
    assert_eq!(run(&mut g, &c).reason, StopReason::End);
    assert_eq!(g.outs().len(), 2);

    // An exiting instruction in the shadow completes; the run ends after it.
    let mut g = stack_guest(FIXED);
    let c = prepare(&mut g, &[out_al(0x80), sti, out_al(0x81), out_al(0x82)]);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::InterruptWindow);
    assert_eq!(out.rip, CODE_VA + 3 * L);
    assert_eq!(g.outs().len(), 2);
}

#[test]
fn sti_whose_shadow_cannot_complete_is_not_run() {
    let sti = gap(Op::Sti);
    let unmapped = gap(Op::Mov {
        size: Size::S8,
        dst: r64(RBX),
        src: Operand::Mem(mem(RSI, 0)),
    });
    type Ops<'a> = &'a [(Op, Option<ExitClass>)];
    let cases: [(Ops, StopReason); 3] = [
        // The next instruction faults: stop before the STI, IF still clear.
        (
            &[out_al(0x80), sti, unmapped],
            StopReason::PageFault {
                addr: 0x9999_0000,
                error_code: 0,
            },
        ),
        // HLT in the shadow (`sti; hlt`): the guest must run both natively.
        (&[out_al(0x80), sti, gap(Op::Hlt)], StopReason::Hlt),
        // The cluster ends after the STI.
        (&[out_al(0x80), sti], StopReason::End),
    ];
    for (ops, reason) in cases {
        let mut g = stack_guest(FIXED);
        g.state.gpr[RSI as usize] = 0x9999_0000;
        let c = prepare(&mut g, ops);
        let out = run(&mut g, &c);
        assert_eq!(out.reason, reason, "{ops:?}");
        assert_eq!(out.rip, CODE_VA + L, "at the STI: {ops:?}");
        assert_eq!(out.index, Some(1));
        assert_eq!(g.state.rflags & IF, 0, "{ops:?}");
        assert_eq!(out.stats.insns, 1, "only the OUT completed: {ops:?}");
    }
}

#[test]
fn after_a_cli_in_the_run_a_pending_interrupt_does_not_end_it_at_a_back_edge() {
    // 0: out 0x80,al  1: cli  2: dec ecx  3: jnz 0  4: out 0x81,al, with an
    // interrupt pending throughout: the guest cannot take it once IF is clear,
    // so the loop runs on (the backend's IF, read outside the run, is stale).
    let mut g = stack_guest(FIXED | IF);
    let [dec, jnz] = dec_ecx_jnz(0);
    let ops = [out_al(0x80), gap(Op::Cli), dec, jnz, out_al(0x81)];
    let mut c = prepare(&mut g, &ops);
    c.back_edges.push(BackEdge { insn: 3, cap: None });
    g.state.gpr[RCX as usize] = 5;
    g.irq_after = Some(0);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::End, "{out:?}");
    assert_eq!(g.outs().len(), 6);
    assert_eq!(g.state.rflags & IF, 0);
    // With IF set all along, the same pending interrupt ends it at the back-edge.
    let mut g = stack_guest(FIXED | IF);
    let mut c = prepare(
        &mut g,
        &[out_al(0x80), gap(Op::Nop), ops[2], ops[3], ops[4]],
    );
    c.back_edges.push(BackEdge { insn: 3, cap: None });
    g.state.gpr[RCX as usize] = 5;
    g.irq_after = Some(0);
    let out = run(&mut g, &c);
    assert_eq!(out.reason, StopReason::InterruptPending);
    assert_eq!(g.outs().len(), 1);
}
