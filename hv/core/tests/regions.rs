//! Clusters that are regions over the control-flow graph: several code ranges,
//! direct and indirect calls, returns and guarded indirect jumps. Every stop is
//! compared in full (CPU state, RAM below the page tables, port I/O) with what the
//! CPU would leave.

mod engine_support;

use avex_core::arch::{pfec, pte};
use avex_core::engine::test_guest::{PageSize, TestGuest};
use avex_core::engine::{self, RunLimits, RunOutcome, StopReason};
use avex_core::guest::Fault;
use avex_core::ir::*;
use engine_support::*;

/// Where a callee lies, a page above the caller (another code range, another page).
const CALLEE: u64 = CODE_VA + 0x1010;
/// The stack: the middle of the data page.
const STACK_TOP: u64 = DATA_VA + 0x800;

/// The long-mode guest of the engine tests with a second code page mapped (the
/// callee's), the stack in the data page, and the cluster's code loaded.
fn guest_with(c: &Cluster) -> TestGuest {
    let mut g = guest();
    g.map_range(CODE_VA + 0x2000, CODE_GPA + 0x2000, 0x1000, pte::P);
    load(&mut g, c);
    g.state.rip = c.insns[c.entry_index().unwrap()].rip;
    g.state.gpr[RSP as usize] = STACK_TOP;
    g.state.gpr[RAX as usize] = 0x55;
    g
}

/// Writes the cluster's code where the long-mode guest maps CODE_VA.
fn load(g: &mut TestGuest, c: &Cluster) {
    for r in &c.code {
        g.write_bytes(CODE_GPA + (r.start - CODE_VA), &r.bytes);
    }
}

fn data_gpa(va: u64) -> u64 {
    DATA_GPA + (va - DATA_VA)
}

fn run_from_entry(g: &mut TestGuest, c: &Cluster, limits: &RunLimits) -> RunOutcome {
    engine::run(c, g, c.entry_index().unwrap(), limits)
}

fn push64(want: &mut TestGuest, value: u64) {
    let sp = want.state.gpr[RSP as usize] - 8;
    want.state.gpr[RSP as usize] = sp;
    want.write_bytes(data_gpa(sp), &value.to_le_bytes());
}

/// out 0x80; call F; out 0x81 -- F: mov rbx, 7; ret, the callee laid out between
/// the call and its return point.
fn call_and_return() -> (Cluster, u64) {
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    r.at(a + 4, call(a + 8, Target::Insn(2)));
    r.at(CALLEE, mov_imm(RBX, 7));
    let ret_at = r.at(CALLEE + 4, ret(0));
    let back = r.at(a + 8, out_al(0x81));
    r.guard(ret_at, a + 8, Target::Insn(back));
    (r.build(), a + 12)
}

#[test]
fn call_pushes_the_return_address_and_a_guarded_ret_goes_on() {
    let (c, end) = call_and_return();
    validate(&c).unwrap();
    assert_eq!(c.code.len(), 2);
    let mut g = guest_with(&c);
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (StopReason::End, end, None)
    );
    assert_eq!(out.stats.insns, 5);
    out_log(&mut want, 0x80, 0x55);
    push64(&mut want, CODE_VA + 8);
    want.state.gpr[RSP as usize] += 8;
    want.state.gpr[RBX as usize] = 7;
    out_log(&mut want, 0x81, 0x55);
    want.state.rip = end;
    assert_same(&g, &want);
}

#[test]
fn ret_imm16_releases_the_extra_bytes() {
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    r.at(a + 4, call(a + 8, Target::Insn(2)));
    let ret_at = r.at(CALLEE, ret(0x18));
    let back = r.at(a + 8, out_al(0x81));
    r.guard(ret_at, a + 8, Target::Insn(back));
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, a + 12));
    out_log(&mut want, 0x80, 0x55);
    push64(&mut want, a + 8);
    want.state.gpr[RSP as usize] += 8 + 0x18;
    out_log(&mut want, 0x81, 0x55);
    want.state.rip = a + 12;
    assert_same(&g, &want);
}

#[test]
fn ret_to_an_address_no_guard_expects_stops_before_the_ret() {
    // The callee returns somewhere else than the call site (it rewrote its return
    // address): the RET is left to the CPU, RSP and the stack untouched.
    let (mut c, _) = call_and_return();
    c.insns[2].op = Op::Mov {
        size: Size::S8,
        dst: Operand::Mem(mem(RSP, 0)),
        src: r64(RCX),
    };
    let mut g = guest_with(&c);
    g.state.gpr[RCX as usize] = 0x1234_5678;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (
            StopReason::GuardMiss {
                to: 0x1234_5678,
                insn: 3
            },
            CALLEE + 4,
            Some(3)
        )
    );
    assert!(!out.reason.is_early(), "a miss is a natural end");
    out_log(&mut want, 0x80, 0x55);
    push64(&mut want, CODE_VA + 8);
    want.write_bytes(data_gpa(STACK_TOP - 8), &0x1234_5678u64.to_le_bytes());
    want.state.rip = CALLEE + 4;
    assert_same(&g, &want);

    // A RET with no guard at all stops the same way, with the stack's value.
    c.guards.clear();
    c.insns[2] = Insn {
        op: Op::Nop,
        ..c.insns[2].clone()
    };
    let mut g = guest_with(&c);
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (
            StopReason::GuardMiss {
                to: CODE_VA + 8,
                insn: 3
            },
            CALLEE + 4
        )
    );
    out_log(&mut want, 0x80, 0x55);
    push64(&mut want, CODE_VA + 8);
    want.state.rip = CALLEE + 4;
    assert_same(&g, &want);
}

/// out 0x80; call *SRC (guarded to F); out 0x81 -- F: inc rbx; ret.
fn indirect_call(src: Operand) -> Cluster {
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    let site = r.at(a + 4, call_ind(src, a + 8));
    let callee = r.at(CALLEE, inc(RBX));
    let ret_at = r.at(CALLEE + 4, ret(0));
    let back = r.at(a + 8, out_al(0x81));
    r.guard(site, CALLEE, Target::Insn(callee));
    r.guard(ret_at, a + 8, Target::Insn(back));
    r.build()
}

#[test]
fn indirect_call_through_a_register_goes_on_through_its_guard() {
    let c = indirect_call(r64(R11));
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    g.state.gpr[R11 as usize] = CALLEE;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, CODE_VA + 12));
    out_log(&mut want, 0x80, 0x55);
    push64(&mut want, CODE_VA + 8);
    want.state.gpr[RSP as usize] += 8;
    want.state.gpr[RBX as usize] += 1;
    out_log(&mut want, 0x81, 0x55);
    want.state.rip = CODE_VA + 12;
    assert_same(&g, &want);

    // Another destination: stop before the CALL, nothing pushed.
    let mut g = guest_with(&c);
    g.state.gpr[R11 as usize] = CALLEE + 0x40;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (
            StopReason::GuardMiss {
                to: CALLEE + 0x40,
                insn: 1
            },
            CODE_VA + 4,
            Some(1)
        )
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = CODE_VA + 4;
    assert_same(&g, &want);
}

#[test]
fn indirect_call_through_memory_reads_the_pointer() {
    // call *0x10(%rdi): the port struct's method pointer.
    let c = indirect_call(Operand::Mem(mem(RDI, 0x10)));
    validate(&c).unwrap();
    for (pointer, hit) in [(CALLEE, true), (CALLEE + 8, false)] {
        let mut g = guest_with(&c);
        g.state.gpr[RDI as usize] = DATA_VA + 0x100;
        g.write_bytes(data_gpa(DATA_VA + 0x110), &pointer.to_le_bytes());
        let mut want = g.clone();
        let out = run_from_entry(&mut g, &c, &RunLimits::default());
        out_log(&mut want, 0x80, 0x55);
        if hit {
            assert_eq!((out.reason, out.rip), (StopReason::End, CODE_VA + 12));
            push64(&mut want, CODE_VA + 8);
            want.state.gpr[RSP as usize] += 8;
            want.state.gpr[RBX as usize] += 1;
            out_log(&mut want, 0x81, 0x55);
            want.state.rip = CODE_VA + 12;
        } else {
            assert_eq!(
                (out.reason, out.rip),
                (
                    StopReason::GuardMiss {
                        to: pointer,
                        insn: 1
                    },
                    CODE_VA + 4
                )
            );
            want.state.rip = CODE_VA + 4;
        }
        assert_same(&g, &want);
    }
    // The pointer itself unreadable: a page fault on the read, before the CALL.
    let mut g = guest_with(&c);
    g.state.gpr[RDI as usize] = DATA_VA + 0x1000;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (
            StopReason::PageFault {
                addr: DATA_VA + 0x1010,
                error_code: 0
            },
            CODE_VA + 4
        )
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = CODE_VA + 4;
    assert_same(&g, &want);
}

#[test]
fn jump_table_dispatch_goes_to_each_guarded_case() {
    // jmp *TABLE(,%rax,8) with two known cases, each writing its port.
    let a = CODE_VA;
    let table = DATA_VA + 0x200;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    let site = r.at(
        a + 4,
        jmp_ind(Operand::Mem(MemRef {
            seg: Seg::Ds,
            base: None,
            index: Some(RCX),
            scale: 8,
            disp: table as i64,
            addr_size: Size::S8,
        })),
    );
    let case0 = r.at(a + 0x20, out_al(0x90));
    let case1 = r.at(a + 0x40, out_al(0x91));
    r.guard(site, a + 0x20, Target::Insn(case0));
    r.guard(site, a + 0x40, Target::Insn(case1));
    let c = r.build();
    validate(&c).unwrap();
    assert_eq!(c.code.len(), 3);
    for (case, port, dest) in [
        (0u64, 0x90, a + 0x20),
        (1, 0x91, a + 0x40),
        (2, 0, a + 0x60),
    ] {
        let mut g = guest_with(&c);
        for (k, d) in [a + 0x20, a + 0x40, a + 0x60].iter().enumerate() {
            g.write_bytes(data_gpa(table + 8 * k as u64), &d.to_le_bytes());
        }
        g.state.gpr[RCX as usize] = case;
        let mut want = g.clone();
        let out = run_from_entry(&mut g, &c, &RunLimits::default());
        out_log(&mut want, 0x80, 0x55);
        if case < 2 {
            assert_eq!((out.reason, out.rip), (StopReason::End, dest + 4));
            out_log(&mut want, port, 0x55);
            want.state.rip = dest + 4;
        } else {
            assert_eq!(
                (out.reason, out.rip),
                (StopReason::GuardMiss { to: dest, insn: 1 }, a + 4)
            );
            want.state.rip = a + 4;
        }
        assert_same(&g, &want);
    }
}

#[test]
fn exit_guards_complete_the_call_or_ret_and_resume_at_the_destination() {
    // call *%r11 with a known destination outside the region: pushed, left there.
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    let site = r.at(a + 4, call_ind(r64(R11), a + 8));
    r.guard(site, 0x7000, Target::Exit(0x7000));
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    g.state.gpr[R11 as usize] = 0x7000;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (StopReason::ExitBranch, 0x7000, None)
    );
    out_log(&mut want, 0x80, 0x55);
    push64(&mut want, a + 8);
    want.state.rip = 0x7000;
    assert_same(&g, &want);

    // ret 8 to a known caller outside the region: popped, left there.
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    let site = r.at(a + 4, ret(8));
    r.guard(site, 0x7123, Target::Exit(0x7123));
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    g.write_bytes(data_gpa(STACK_TOP), &0x7123u64.to_le_bytes());
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::ExitBranch, 0x7123));
    out_log(&mut want, 0x80, 0x55);
    want.state.gpr[RSP as usize] += 16;
    want.state.rip = 0x7123;
    assert_same(&g, &want);
}

#[test]
fn a_callee_laid_out_twice_returns_to_each_call_site() {
    // out 0x80; call F; out 0x81; call F; out 0x82, F = inc rbx; ret, one copy per
    // call site, each returning to its own caller.
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    r.at(a + 4, call(a + 8, Target::Insn(2)));
    r.at(CALLEE, inc(RBX));
    let ret1 = r.at(CALLEE + 4, ret(0));
    let back1 = r.at(a + 8, out_al(0x81));
    r.at(a + 12, call(a + 16, Target::Insn(6)));
    r.at(CALLEE, inc(RBX));
    let ret2 = r.at(CALLEE + 4, ret(0));
    let back2 = r.at(a + 16, out_al(0x82));
    r.guard(ret1, a + 8, Target::Insn(back1));
    r.guard(ret2, a + 16, Target::Insn(back2));
    let c = r.build();
    validate(&c).unwrap();
    assert_eq!(c.code.len(), 2);
    let mut g = guest_with(&c);
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, a + 20));
    assert_eq!(out.stats.insns, 9);
    out_log(&mut want, 0x80, 0x55);
    out_log(&mut want, 0x81, 0x55);
    out_log(&mut want, 0x82, 0x55);
    // Both calls pushed to the same slot; the second return address stays there.
    push64(&mut want, a + 16);
    want.state.gpr[RSP as usize] += 8;
    want.state.gpr[RBX as usize] += 2;
    want.state.rip = a + 20;
    assert_same(&g, &want);
}

#[test]
fn a_push_that_faults_stops_before_the_call_with_nothing_done() {
    let (c, _) = call_and_return();
    let ind = indirect_call(r64(R11));
    for c in [c, ind] {
        let mut g = guest_with(&c);
        // The stack at the bottom of the data page: the push goes below it.
        g.state.gpr[RSP as usize] = DATA_VA;
        g.state.gpr[R11 as usize] = CALLEE;
        let mut want = g.clone();
        let out = run_from_entry(&mut g, &c, &RunLimits::default());
        assert_eq!(
            (out.reason, out.rip, out.index),
            (
                StopReason::PageFault {
                    addr: DATA_VA - 8,
                    error_code: pfec::W
                },
                CODE_VA + 4,
                Some(1)
            )
        );
        out_log(&mut want, 0x80, 0x55);
        want.state.rip = CODE_VA + 4;
        assert_same(&g, &want);
    }
    // A non-canonical stack: #GP (the CPU's #SS), before the CALL.
    let (c, _) = call_and_return();
    let mut g = guest_with(&c);
    g.state.gpr[RSP as usize] = 0x0000_8000_0000_0004;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), CODE_VA + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = CODE_VA + 4;
    assert_same(&g, &want);
}

#[test]
fn a_ret_whose_stack_faults_stops_before_it() {
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    let site = r.at(a + 4, ret(0));
    r.guard(site, 0x7000, Target::Exit(0x7000));
    let c = r.build();
    let mut g = guest_with(&c);
    g.state.gpr[RSP as usize] = DATA_VA + 0xffc; // the return address straddles
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (
            StopReason::PageFault {
                addr: DATA_VA + 0x1000,
                error_code: 0
            },
            a + 4
        )
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = a + 4;
    assert_same(&g, &want);
}

#[test]
fn code_is_checked_in_every_range() {
    let (c, _) = call_and_return();
    assert_ne!(c.code[0].start >> 12, c.code[1].start >> 12);
    for range in 0..2 {
        let mut g = guest_with(&c);
        let at = CODE_GPA + (c.code[range].start - CODE_VA) + 1;
        g.ram[at as usize] ^= 0xff;
        let want = g.clone();
        let out = run_from_entry(&mut g, &c, &RunLimits::default());
        assert_eq!(
            (out.reason, out.rip),
            (StopReason::CodeChanged, CODE_VA),
            "range {range}"
        );
        assert_same(&g, &want);
        assert_eq!(g.state_writes, 0);
    }
    // The second range unmapped: unreadable, nothing done.
    let mut g = guest_with(&c);
    let leaf = *g.entries(CALLEE).last().unwrap();
    g.ram[leaf as usize] &= !1;
    let want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(out.reason, StopReason::CodeUnreadable);
    assert_same(&g, &want);
}

/// An alias of the callee's code page, writable.
const ALIAS: u64 = 0xa0_0000;

#[test]
fn a_write_into_the_second_ranges_page_ends_the_run() {
    // The caller writes a byte of the callee's page (not one of its code bytes):
    // the write completes, then the run ends before the CALL.
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    r.at(
        a + 4,
        gap(Op::Mov {
            size: Size::S1,
            dst: Operand::Mem(mem(RDI, 0)),
            src: Operand::Reg(reg(RAX, Size::S1)),
        }),
    );
    r.at(a + 8, call(a + 12, Target::Insn(3)));
    let ret_at = r.at(CALLEE, ret(0));
    let back = r.at(a + 12, out_al(0x81));
    r.guard(ret_at, a + 12, Target::Insn(back));
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    g.map(ALIAS, CODE_GPA + 0x1000, PageSize::K4, pte::P | pte::RW);
    g.state.gpr[RDI as usize] = ALIAS + 0x800;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (StopReason::SelfWrite, a + 8, Some(2))
    );
    out_log(&mut want, 0x80, 0x55);
    want.ram[(CODE_GPA + 0x1800) as usize] = 0x55;
    want.state.rip = a + 8;
    assert_same(&g, &want);

    // The CALL's own push onto the callee's page ends the run at the callee.
    let mut g = guest_with(&c);
    g.map(ALIAS, CODE_GPA + 0x1000, PageSize::K4, pte::P | pte::RW);
    g.state.gpr[RDI as usize] = DATA_VA;
    g.state.gpr[RSP as usize] = ALIAS + 0x800;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (StopReason::SelfWrite, CALLEE, Some(3))
    );
    out_log(&mut want, 0x80, 0x55);
    want.ram[DATA_GPA as usize] = 0x55;
    want.state.gpr[RSP as usize] -= 8;
    want.write_bytes(CODE_GPA + 0x17f8, &(a + 12).to_le_bytes());
    want.state.rip = CALLEE;
    assert_same(&g, &want);
}

#[test]
fn backward_guard_targets_count_as_back_edges() {
    // loop: out 0x80; inc rbx; jmp *%r11 (guarded back to the loop).
    let a = CODE_VA;
    let build = |cap| {
        let mut r = Region::new(Bitness::B64);
        r.at(a, out_al(0x80));
        r.at(a + 4, inc(RBX));
        let site = r.at(a + 8, jmp_ind(r64(R11)));
        r.guard(site, a, Target::Insn(0));
        r.back_edge(site, cap);
        r.build()
    };
    let c = build(Some(2));
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    g.state.gpr[R11 as usize] = a;
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    // Taken twice, the third taking stops at its target.
    assert_eq!(
        (out.reason, out.rip, out.index),
        (StopReason::BackEdgeCap, a, Some(0))
    );
    assert_eq!(out.stats.back_edges, 3);
    for _ in 0..3 {
        out_log(&mut want, 0x80, 0x55);
    }
    want.state.gpr[RBX as usize] += 3;
    want.state.rflags |= avex_core::engine::PF; // INC to 3: even parity
    want.state.rip = a;
    assert_same(&g, &want);

    // Uncapped: the interrupt check at the back-edge ends it at the target.
    let c = build(None);
    let mut g = guest_with(&c);
    g.state.gpr[R11 as usize] = a;
    g.irq_after = Some(1);
    g.state.rflags |= avex_core::arch::rflags::IF;
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip, out.index),
        (StopReason::InterruptPending, a, Some(0))
    );
    assert_eq!(g.io_log.len(), 2);

    // No back-edge record (refused by the validator): treated as cap 0.
    let mut c = build(None);
    c.back_edges.clear();
    assert!(validate(&c).is_err());
    let mut g = guest_with(&c);
    g.state.gpr[R11 as usize] = a;
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::BackEdgeCap, a));
    assert_eq!(g.io_log.len(), 1);
}

#[test]
fn the_budget_stops_inside_a_callee_precisely() {
    let (c, _) = call_and_return();
    for budget in 0..6u64 {
        let mut g = guest_with(&c);
        let mut want = g.clone();
        let out = run_from_entry(
            &mut g,
            &c,
            &RunLimits {
                max_insns: budget,
                ..RunLimits::default()
            },
        );
        // The first `budget` instructions are done, in order.
        let rips = [
            CODE_VA,
            CODE_VA + 4,
            CALLEE,
            CALLEE + 4,
            CODE_VA + 8,
            CODE_VA + 12,
        ];
        let stop = rips[budget as usize];
        if budget < 5 {
            assert_eq!(
                (out.reason, out.rip, out.index),
                (StopReason::Budget, stop, Some(budget as usize)),
                "budget {budget}"
            );
        } else {
            assert_eq!(out.reason, StopReason::End);
        }
        if budget > 0 {
            out_log(&mut want, 0x80, 0x55);
        }
        if budget > 1 {
            push64(&mut want, CODE_VA + 8);
        }
        if budget > 2 {
            want.state.gpr[RBX as usize] = 7;
        }
        if budget > 3 {
            want.state.gpr[RSP as usize] += 8;
        }
        if budget > 4 {
            out_log(&mut want, 0x81, 0x55);
        }
        want.state.rip = stop;
        assert_same(&g, &want);
        assert_eq!(out.stats.insns as u64, budget.min(5));
    }
}

#[test]
fn self_writes_are_seen_on_every_page_of_a_region_of_many_ranges() {
    // 32 code ranges, each straddling a page boundary: 64 code pages. A write into
    // the last one must end the run like a write into the first.
    let a = CODE_VA;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    r.at(
        a + 4,
        gap(Op::Mov {
            size: Size::S1,
            dst: Operand::Mem(mem(RDI, 0)),
            src: Operand::Reg(reg(RAX, Size::S1)),
        }),
    );
    r.at(a + 8, out_al(0x81));
    for k in 1..32u64 {
        // Filler instructions no path reaches, each range over a page boundary.
        r.at(a + k * 0x2000 - 4, gap(Op::Nop));
        r.at(a + k * 0x2000, gap(Op::Nop));
    }
    let c = r.build();
    assert_eq!(c.code.len(), 32);
    let mut g = guest();
    g.map_range(CODE_VA, CODE_GPA, 0x40000, pte::P);
    g.map_range(ALIAS, CODE_GPA, 0x40000, pte::P | pte::RW);
    load(&mut g, &c);
    g.state.rip = a;
    g.state.gpr[RAX as usize] = 0x55;
    for page in [0x1000u64, 0x3e000] {
        let mut g = g.clone();
        g.state.gpr[RDI as usize] = ALIAS + page + 0x800;
        let out = engine::run(&c, &mut g, 0, &RunLimits::default());
        assert_eq!(
            (out.reason, out.rip),
            (StopReason::SelfWrite, a + 8),
            "write into code page {page:#x}"
        );
        assert_eq!(g.io_log.len(), 1);
    }
}

#[test]
fn a_non_canonical_destination_stops_before_the_branch() {
    // The CPU raises #GP at a RET or CALL whose new RIP is not canonical, before
    // popping or pushing; resuming the guest there would fail the VM entry.
    let a = CODE_VA;
    let bad = 0x0000_8000_0000_0000u64;
    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    let site = r.at(a + 4, ret(0));
    r.guard(site, bad, Target::Exit(bad));
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest_with(&c);
    g.write_bytes(data_gpa(STACK_TOP), &bad.to_le_bytes());
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), a + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = a + 4;
    assert_same(&g, &want);

    let mut r = Region::new(Bitness::B64);
    r.at(a, out_al(0x80));
    r.at(a + 4, call(a + 8, Target::Exit(bad)));
    let c = r.build();
    let mut g = guest_with(&c);
    let mut want = g.clone();
    let out = run_from_entry(&mut g, &c, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), a + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = a + 4;
    assert_same(&g, &want);
}
