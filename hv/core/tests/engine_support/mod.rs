//! What the engine's tests share (precise_stops, exiting_effects, refused_writes,
//! paging): a long-mode test guest with code and data mapped, and builders for the
//! ops they use.
#![allow(dead_code)] // each test crate uses a part

use avex_core::arch::pte;
use avex_core::engine::test_guest::{fake_cluster, PageSize, TestGuest, INSN_LEN};
use avex_core::engine::{self, RunLimits, RunOutcome};
use avex_core::ir::*;
use avex_core::policy::ExitClass;

pub const CODE_VA: u64 = 0x40_0000;
pub const CODE_GPA: u64 = 0x1000;
pub const DATA_VA: u64 = 0x80_0000;
pub const DATA_GPA: u64 = 0x10_0000;
pub const L: u64 = INSN_LEN as u64;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
pub const R10: u8 = 10;
pub const R11: u8 = 11;

pub fn reg(index: u8, size: Size) -> RegRef {
    RegRef {
        index,
        size,
        high8: false,
    }
}
pub fn r64(i: u8) -> Operand {
    Operand::Reg(reg(i, Size::S8))
}
pub fn mem(base: u8, disp: i64) -> MemRef {
    mem_sized(base, disp, Size::S8)
}
/// `[base + disp]` in DS with the given address size.
pub fn mem_sized(base: u8, disp: i64, addr_size: Size) -> MemRef {
    MemRef {
        seg: Seg::Ds,
        base: Some(base),
        index: None,
        scale: 1,
        disp,
        addr_size,
    }
}
pub fn out_al(port: u8) -> (Op, Option<ExitClass>) {
    (
        Op::Out {
            size: Size::S1,
            port: PortSrc::Imm(port),
        },
        Some(ExitClass::Out),
    )
}
pub fn gap(op: Op) -> (Op, Option<ExitClass>) {
    (op, None)
}
pub fn mov_imm(r: u8, v: u64) -> (Op, Option<ExitClass>) {
    gap(Op::Mov {
        size: Size::S8,
        dst: r64(r),
        src: Operand::Imm(v),
    })
}
pub fn inc(r: u8) -> (Op, Option<ExitClass>) {
    gap(Op::Unary {
        op: UnaryOp::Inc,
        size: Size::S8,
        dst: r64(r),
    })
}

pub fn guest() -> TestGuest {
    let mut g = TestGuest::long_mode(4 << 20);
    g.map_range(CODE_VA, CODE_GPA, 0x2000, pte::P);
    g.map(DATA_VA, DATA_GPA, PageSize::K4, pte::P | pte::RW);
    g
}

pub fn prepare(g: &mut TestGuest, ops: &[(Op, Option<ExitClass>)]) -> Cluster {
    let c = fake_cluster(CODE_VA, Bitness::B64, ops);
    g.load_code(CODE_GPA, &c);
    g.state.rip = CODE_VA;
    c
}

pub fn run(g: &mut TestGuest, c: &Cluster) -> RunOutcome {
    engine::run(c, g, 0, &RunLimits::default())
}
