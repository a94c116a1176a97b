//! The validator's rules for regions: code ranges, guards, calls and returns. Each
//! refused cluster differs from a valid one in the one thing the rule is about.

mod engine_support;

use avex_core::ir::limits::{MAX_CODE_RANGES, MAX_GUARDS};
use avex_core::ir::*;
use engine_support::*;

const A: u64 = CODE_VA;
const F: u64 = CODE_VA + 0x1010;

/// out 0x80; call *%r11 (guarded to F); out 0x81 -- F: nop; ret (guarded back).
fn valid() -> Cluster {
    let mut r = Region::new(Bitness::B64);
    r.at(A, out_al(0x80));
    let site = r.at(A + 4, call_ind(r64(R11), A + 8));
    let callee = r.at(F, gap(Op::Nop));
    let ret_at = r.at(F + 4, ret(0));
    let back = r.at(A + 8, out_al(0x81));
    r.guard(site, F, Target::Insn(callee));
    r.guard(site, 0x9000, Target::Exit(0x9000));
    r.guard(ret_at, A + 8, Target::Insn(back));
    r.build()
}

fn bad_guard(c: &Cluster) -> (usize, &'static str) {
    match validate(c) {
        Err(ClusterError::BadGuard { index, reason }) => (index, reason),
        other => panic!("expected BadGuard, got {other:?}"),
    }
}

fn bad_range(c: &Cluster) -> (usize, &'static str) {
    match validate(c) {
        Err(ClusterError::BadCodeRange { range, reason }) => (range, reason),
        other => panic!("expected BadCodeRange, got {other:?}"),
    }
}

fn operand(c: &Cluster) -> (usize, &'static str) {
    match validate(c) {
        Err(ClusterError::Operand { insn, reason }) => (insn, reason),
        other => panic!("expected Operand, got {other:?}"),
    }
}

#[test]
fn the_valid_region_passes() {
    let c = valid();
    assert_eq!(c.code.len(), 2);
    assert_eq!(validate(&c), Ok(()));
}

#[test]
fn guard_on_an_instruction_outside_the_cluster() {
    let mut c = valid();
    c.guards.push(Guard {
        insn: 5,
        expect: 0,
        target: Target::Exit(0),
    });
    assert_eq!(bad_guard(&c), (3, "instruction index outside the cluster"));
}

#[test]
fn guard_on_an_instruction_that_is_not_guarded() {
    let mut c = valid();
    c.guards.insert(
        0,
        Guard {
            insn: 0,
            expect: 0x9000,
            target: Target::Exit(0x9000),
        },
    );
    assert_eq!(
        bad_guard(&c),
        (0, "the instruction is not an indirect CALL/JMP or a RET")
    );
    // A direct CALL carries its target in the op, not in guards.
    let mut c = valid();
    c.insns[1].op = Op::Call {
        size: Size::S8,
        ret: A + 8,
        target: Target::Insn(2),
    };
    assert_eq!(bad_guard(&c).0, 0);
}

#[test]
fn guard_target_instruction_not_at_the_expected_address() {
    let mut c = valid();
    c.guards[0].expect = F + 4;
    assert_eq!(
        bad_guard(&c),
        (0, "target instruction is not at the expected address")
    );
    let mut c = valid();
    c.guards[0].target = Target::Insn(9);
    assert_eq!(bad_guard(&c), (0, "target index outside the cluster"));
}

#[test]
fn exit_guard_leaving_for_another_address_than_expected() {
    let mut c = valid();
    c.guards[1].target = Target::Exit(0x9001);
    assert_eq!(
        bad_guard(&c),
        (1, "exit address is not the expected address")
    );
}

#[test]
fn guards_out_of_order() {
    let mut c = valid();
    c.guards.swap(1, 2);
    assert_eq!(
        bad_guard(&c),
        (2, "records must be sorted by instruction index")
    );
}

#[test]
fn too_many_guards() {
    let mut c = valid();
    let extra: Vec<Guard> = (0..MAX_GUARDS as u64)
        .map(|k| Guard {
            insn: 1,
            expect: 0x10_0000 + k,
            target: Target::Exit(0x10_0000 + k),
        })
        .collect();
    c.guards.splice(0..0, extra);
    assert_eq!(c.guards.len(), MAX_GUARDS + 3);
    assert_eq!(bad_guard(&c).0, MAX_GUARDS);
    c.guards.drain(..3);
    assert_eq!(validate(&c), Ok(()), "exactly the limit is fine");
}

#[test]
fn backward_guard_target_needs_a_back_edge_record() {
    // The RET returns to the entry, an earlier instruction.
    let mut c = valid();
    c.guards[2] = Guard {
        insn: 3,
        expect: A,
        target: Target::Insn(0),
    };
    assert_eq!(
        bad_guard(&c),
        (2, "backward target without a back-edge record")
    );
    c.back_edges.push(BackEdge {
        insn: 3,
        cap: Some(4),
    });
    assert_eq!(validate(&c), Ok(()));
    // A back-edge record on a guarded instruction whose guards all go forward.
    let mut c = valid();
    c.back_edges.push(BackEdge { insn: 3, cap: None });
    assert!(matches!(
        validate(&c),
        Err(ClusterError::BadBackEdge { index: 0, .. })
    ));
}

#[test]
fn code_ranges_in_order_apart_and_within_limits() {
    let mut c = valid();
    c.code.swap(0, 1);
    assert_eq!(bad_range(&c).0, 1);
    // Touching ranges must be one range.
    let mut c = valid();
    c.code[1].start = c.code[0].end();
    assert_eq!(bad_range(&c).0, 1);
    let mut c = valid();
    c.code.push(CodeRange {
        start: F + 0x100,
        bytes: vec![],
    });
    assert_eq!(bad_range(&c), (2, "empty"));
    let mut c = valid();
    c.code.push(CodeRange {
        start: u64::MAX - 2,
        bytes: vec![0; 4],
    });
    assert_eq!(bad_range(&c), (2, "wraps around the address space"));
    // 32-bit code stays below 4 GiB.
    let mut r = Region::new(Bitness::B32);
    r.at(0xffff_fff0, out_al(0x80));
    let mut c = r.build();
    assert_eq!(validate(&c), Ok(()));
    c.code[0].bytes.resize(0x11, 0x90);
    assert_eq!(bad_range(&c), (0, "wraps around the address space"));
    // No range at all.
    let mut c = valid();
    c.code.clear();
    assert_eq!(bad_range(&c).0, 0);
}

#[test]
fn too_many_code_ranges_or_bytes() {
    let mut c = valid();
    for k in 0..(MAX_CODE_RANGES as u64 - 2) {
        c.code.push(CodeRange {
            start: F + 0x100 + 0x10 * k,
            bytes: vec![0x90; 4],
        });
    }
    assert_eq!(validate(&c), Ok(()), "exactly the limit is fine");
    c.code.push(CodeRange {
        start: F + 0x1000,
        bytes: vec![0x90; 4],
    });
    assert_eq!(bad_range(&c).0, MAX_CODE_RANGES + 1);
    let mut c = valid();
    c.code.push(CodeRange {
        start: F + 0x100,
        bytes: vec![0x90; 4096 - 20 + 1],
    });
    assert!(matches!(
        validate(&c),
        Err(ClusterError::TooLarge { bytes: 4097 })
    ));
}

#[test]
fn instructions_lie_inside_one_range() {
    // An instruction over the gap between two ranges lies in neither.
    let mut c = valid();
    c.code[0].bytes.truncate(10);
    c.code.insert(
        1,
        CodeRange {
            start: A + 11,
            bytes: vec![0x90; 1],
        },
    );
    assert_eq!(
        validate(&c),
        Err(ClusterError::OutsideCode {
            insn: 4,
            rip: A + 8
        })
    );
    // A block laid out twice decodes the same at both places.
    let mut c = valid();
    let mut again = c.insns[2].clone();
    again.len = 3;
    c.insns.push(again);
    assert_eq!(
        validate(&c),
        Err(ClusterError::LengthDiffers { insn: 2, rip: F })
    );
}

#[test]
fn a_call_pushes_the_address_after_itself() {
    let mut c = valid();
    c.insns[1].op = Op::CallIndirect {
        size: Size::S8,
        src: r64(R11),
        ret: A + 4,
    };
    assert_eq!(
        operand(&c),
        (1, "return address is not the address after the CALL")
    );
    // 16-bit operand size in 32-bit code: the return IP is 16 bits.
    let mut r = Region::new(Bitness::B32);
    r.at(0x1_fffc, out_al(0x80));
    let call = |ret| {
        gap(Op::Call {
            size: Size::S2,
            ret,
            target: Target::Exit(0x10),
        })
    };
    r.at(0x2_0000, call(0x4));
    assert_eq!(validate(&r.build()), Ok(()));
    let mut r = Region::new(Bitness::B32);
    r.at(0x1_fffc, out_al(0x80));
    r.at(0x2_0000, call(0x2_0004));
    assert_eq!(operand(&r.build()).0, 1);
}

#[test]
fn near_branch_operand_sizes() {
    // 64-bit code: always 8 (an operand-size prefix is ignored on Intel CPUs).
    for size in [Size::S2, Size::S4] {
        let mut c = valid();
        c.insns[3].op = Op::Ret { size, pop: 0 };
        assert_eq!(
            operand(&c),
            (3, "near CALL/RET/JMP in 64-bit code has operand size 8")
        );
        let mut c = valid();
        c.insns[1].op = Op::Call {
            size,
            ret: (A + 8) & size.mask(),
            target: Target::Insn(2),
        };
        c.guards.remove(0);
        c.guards.remove(0);
        assert_eq!(operand(&c).0, 1);
    }
    // 16/32-bit code: 2 or 4, never 8.
    for bitness in [Bitness::B16, Bitness::B32] {
        let mut r = Region::new(bitness);
        r.at(0x100, out_al(0x80));
        r.at(
            0x104,
            gap(Op::JmpIndirect {
                size: Size::S4,
                src: Operand::Reg(reg(RAX, Size::S4)),
            }),
        );
        let mut c = r.build();
        assert_eq!(validate(&c), Ok(()));
        c.insns[1].op = Op::JmpIndirect {
            size: Size::S8,
            src: Operand::Reg(reg(RAX, Size::S8)),
        };
        assert_eq!(operand(&c).0, 1);
    }
}
