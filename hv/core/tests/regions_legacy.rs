//! Regions in 16- and 32-bit code: the stack's width follows SS.B, the operand
//! size of CALL/RET sets the return address's, segment limits are checked as the
//! CPU checks them. Every stop is compared in full with what the CPU would leave.

mod engine_support;

use avex_core::engine::test_guest::TestGuest;
use avex_core::engine::{self, Paging, RunLimits, StopReason};
use avex_core::guest::Fault;
use avex_core::ir::*;
use engine_support::*;

const CODE32: u64 = 0x1000;
const CALLEE32: u64 = 0x2010;

/// 32-bit protected mode without paging; the stack at SS.base + ESP.
fn guest32(c: &Cluster) -> TestGuest {
    let mut g = TestGuest::protected32(1 << 20, Paging::None);
    for r in &c.code {
        g.write_bytes(r.start, &r.bytes);
    }
    g.state.rip = c.insns[0].rip;
    g.state.gpr[RSP as usize] = 0x8000;
    g.state.gpr[RAX as usize] = 0x55;
    g
}

/// out 0x80; call F (at `size`); out 0x81 -- F: ret (at `size`).
fn call32(size: Size, ret_pop: u16) -> Cluster {
    let a = CODE32;
    let mut r = Region::new(Bitness::B32);
    r.at(a, out_al(0x80));
    r.at(
        a + 4,
        gap(Op::Call {
            size,
            ret: a + 8,
            target: Target::Insn(2),
        }),
    );
    let ret_at = r.at(CALLEE32, gap(Op::Ret { size, pop: ret_pop }));
    let back = r.at(a + 8, out_al(0x81));
    r.guard(ret_at, a + 8, Target::Insn(back));
    r.build()
}

#[test]
fn call_and_ret_in_32_bit_code_use_the_32_bit_stack() {
    let c = call32(Size::S4, 4);
    validate(&c).unwrap();
    let mut g = guest32(&c);
    g.state.gpr[RSP as usize] = 0xdead_0000_0000_8000; // upper half: not part of ESP
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, CODE32 + 12));
    out_log(&mut want, 0x80, 0x55);
    want.write_bytes(0x7ffc, &(CODE32 as u32 + 8).to_le_bytes());
    // A 32-bit write of ESP clears the upper half.
    want.state.gpr[RSP as usize] = 0x8000 + 4;
    out_log(&mut want, 0x81, 0x55);
    want.state.rip = CODE32 + 12;
    assert_same(&g, &want);
}

#[test]
fn a_16_bit_stack_wraps_sp_and_keeps_the_upper_half_of_esp() {
    // SS.B = 0: pushes and pops move SP only, at SS.base + SP.
    let c = call32(Size::S4, 0);
    let mut g = guest32(&c);
    let ss = &mut g.state.seg[Seg::Ss as usize];
    ss.attrs &= !(1 << 14);
    ss.base = 0x3_0000;
    ss.limit = 0xffff;
    g.state.gpr[RSP as usize] = 0xabcd_0800;
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, CODE32 + 12));
    out_log(&mut want, 0x80, 0x55);
    want.write_bytes(0x3_07fc, &(CODE32 as u32 + 8).to_le_bytes());
    out_log(&mut want, 0x81, 0x55);
    want.state.rip = CODE32 + 12;
    assert_same(&g, &want);

    // SP = 2: the 4-byte push would reach past the 64K limit (#SS on the CPU):
    // stop before the CALL.
    let mut g2 = g.clone();
    g2.io_log.clear();
    g2.state.rip = CODE32;
    g2.state.gpr[RSP as usize] = 0xabcd_0002;
    let mut want = g2.clone();
    let out = engine::run(&c, &mut g2, 0, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), CODE32 + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = CODE32 + 4;
    assert_same(&g2, &want);
}

#[test]
fn a_16_bit_call_in_32_bit_code_pushes_two_bytes() {
    // o16 call / o16 ret: IP pushed and popped as 16 bits.
    let c = call32(Size::S2, 0);
    validate(&c).unwrap();
    let mut g = guest32(&c);
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, CODE32 + 12));
    out_log(&mut want, 0x80, 0x55);
    want.write_bytes(0x7ffe, &(CODE32 as u16 + 8).to_le_bytes());
    out_log(&mut want, 0x81, 0x55);
    want.state.rip = CODE32 + 12;
    assert_same(&g, &want);
}

#[test]
fn the_stack_segment_limit_is_checked_for_the_return_address_only() {
    // Expand-up SS with limit 0x7fff: a RET with ESP = 0x7ffc reads 0x7ffc..0x7fff
    // (inside), and RET 8 moves ESP past the limit without a check (the CPU checks
    // only the return address).
    let a = CODE32;
    let mut r = Region::new(Bitness::B32);
    r.at(a, out_al(0x80));
    let site = r.at(
        a + 4,
        gap(Op::Ret {
            size: Size::S4,
            pop: 8,
        }),
    );
    r.guard(site, 0x5000, Target::Exit(0x5000));
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest32(&c);
    g.state.seg[Seg::Ss as usize].limit = 0x7fff;
    g.state.gpr[RSP as usize] = 0x7ffc;
    g.write_bytes(0x7ffc, &0x5000u32.to_le_bytes());
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::ExitBranch, 0x5000));
    out_log(&mut want, 0x80, 0x55);
    want.state.gpr[RSP as usize] = 0x7ffc + 12;
    want.state.rip = 0x5000;
    assert_same(&g, &want);

    // ESP = 0x7ffe: the return address reaches past the limit: stop before.
    let mut g = guest32(&c);
    g.state.seg[Seg::Ss as usize].limit = 0x7fff;
    g.state.gpr[RSP as usize] = 0x7ffe;
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), a + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = a + 4;
    assert_same(&g, &want);
}

#[test]
fn an_exit_destination_beyond_the_code_segment_limit_stops_before_the_branch() {
    // The CPU checks the new EIP against CS.limit before pushing or popping
    // anything (#GP at the branch); outside 64-bit code the engine must too.
    let a = CODE32;
    let mut r = Region::new(Bitness::B32);
    r.at(a, out_al(0x80));
    r.at(
        a + 4,
        gap(Op::Call {
            size: Size::S4,
            ret: a + 8,
            target: Target::Exit(0x2_0000),
        }),
    );
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest32(&c);
    g.state.seg[Seg::Cs as usize].limit = 0xffff;
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), a + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = a + 4;
    assert_same(&g, &want);
    // Within the limit it completes.
    let mut g = guest32(&c);
    g.state.seg[Seg::Cs as usize].limit = 0x2_0000;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::ExitBranch, 0x2_0000));
}

#[test]
fn real_mode_call_and_ret_use_sp_at_ss_base() {
    // 16-bit code at CS.base 0x1_0000; the stack at SS.base 0x2_0000 + SP. A call
    // with the default operand size pushes IP (2 bytes); with an operand-size
    // prefix (o32) it pushes EIP (4 bytes) and its RET pops 4.
    for size in [Size::S2, Size::S4] {
        let mut r = Region::new(Bitness::B16);
        r.at(0x100, out_al(0x80));
        r.at(
            0x104,
            gap(Op::Call {
                size,
                ret: 0x108,
                target: Target::Insn(2),
            }),
        );
        let ret_at = r.at(0x200, gap(Op::Ret { size, pop: 2 }));
        let back = r.at(0x108, out_al(0x81));
        r.guard(ret_at, 0x108, Target::Insn(back));
        let c = r.build();
        validate(&c).unwrap();
        let mut g = TestGuest::new(1 << 20);
        g.state.seg[Seg::Cs as usize].base = 0x1_0000;
        g.state.seg[Seg::Ss as usize].base = 0x2_0000;
        for r in &c.code {
            g.write_bytes(0x1_0000 + r.start, &r.bytes);
        }
        g.state.rip = 0x100;
        g.state.gpr[RSP as usize] = 0x1234_0100;
        g.state.gpr[RAX as usize] = 0x55;
        let mut want = g.clone();
        let out = engine::run(&c, &mut g, 0, &RunLimits::default());
        assert_eq!((out.reason, out.rip), (StopReason::End, 0x10c), "{size:?}");
        out_log(&mut want, 0x80, 0x55);
        let n = size.bytes() as u64;
        want.write_bytes(0x2_0100 - n, &0x108u32.to_le_bytes()[..n as usize]);
        // SP moves (down n, up n + 2); the upper half of ESP stays.
        want.state.gpr[RSP as usize] = 0x1234_0102;
        out_log(&mut want, 0x81, 0x55);
        want.state.rip = 0x10c;
        assert_same(&g, &want);
    }
}

#[test]
fn a_loop_to_a_destination_beyond_the_cs_limit_leaves_ecx_alone() {
    // LOOP decrements ECX and branches; a destination beyond CS.limit faults
    // (#GP) and a fault undoes the whole instruction, the decrement included.
    let mut r = Region::new(Bitness::B32);
    r.at(CODE32, out_al(0x80));
    r.at(
        CODE32 + 4,
        gap(Op::Loop {
            kind: LoopKind::Loop,
            addr_size: Size::S4,
            target: Target::Exit(0x2_0000),
        }),
    );
    let c = r.build();
    validate(&c).unwrap();
    let mut g = guest32(&c);
    g.state.seg[Seg::Cs as usize].limit = 0xffff;
    g.state.gpr[RCX as usize] = 5;
    let mut want = g.clone();
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!(
        (out.reason, out.rip),
        (StopReason::Fault(Fault::GeneralProtection), CODE32 + 4)
    );
    out_log(&mut want, 0x80, 0x55);
    want.state.rip = CODE32 + 4;
    assert_same(&g, &want);
    // Not taken (ECX reaches 0): no branch, no check, the decrement done.
    let mut g = guest32(&c);
    g.state.seg[Seg::Cs as usize].limit = 0xffff;
    g.state.gpr[RCX as usize] = 1;
    let out = engine::run(&c, &mut g, 0, &RunLimits::default());
    assert_eq!((out.reason, out.rip), (StopReason::End, CODE32 + 8));
    assert_eq!(g.state.gpr[RCX as usize], 0);
}

#[test]
fn an_expand_down_stack_refuses_pushes_at_or_below_its_limit() {
    // Expand-down SS (type 0x7), B = 1, limit 0x7fff: offsets 0x8000..=0xffff_ffff
    // are valid. A push whose lowest byte is at or below the limit is #SS on the
    // CPU: the CALL stops before itself.
    let c = call32(Size::S4, 0);
    for (esp, ok) in [(0x9000u64, true), (0x8004, true), (0x8002, false)] {
        let mut g = guest32(&c);
        let ss = &mut g.state.seg[Seg::Ss as usize];
        ss.attrs = (ss.attrs & !0xf) | 0x7;
        ss.limit = 0x7fff;
        g.state.gpr[RSP as usize] = esp;
        let mut want = g.clone();
        let out = engine::run(&c, &mut g, 0, &RunLimits::default());
        out_log(&mut want, 0x80, 0x55);
        if ok {
            assert_eq!((out.reason, out.rip), (StopReason::End, CODE32 + 12));
            want.write_bytes(esp - 4, &(CODE32 as u32 + 8).to_le_bytes());
            out_log(&mut want, 0x81, 0x55);
            want.state.rip = CODE32 + 12;
        } else {
            assert_eq!(
                (out.reason, out.rip),
                (StopReason::Fault(Fault::GeneralProtection), CODE32 + 4),
                "ESP {esp:#x}"
            );
            want.state.rip = CODE32 + 4;
        }
        assert_same(&g, &want);
    }
}
