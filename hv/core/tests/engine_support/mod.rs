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

/// `dec ecx` and `jnz` to instruction `to`: a loop's counted back-edge.
pub fn dec_ecx_jnz(to: u16) -> [(Op, Option<ExitClass>); 2] {
    [
        gap(Op::Unary {
            op: UnaryOp::Dec,
            size: Size::S4,
            dst: Operand::Reg(reg(RCX, Size::S4)),
        }),
        gap(Op::Jcc {
            cond: Cond::Ne,
            target: Target::Insn(to),
        }),
    ]
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

/// Every instruction of a hand-built region is 4 bytes of filler (the engine
/// never decodes; the code check compares the bytes).
pub const LEN: u8 = 4;
/// A region built by hand: instructions at given addresses, in layout order.
pub struct Region {
    pub bitness: Bitness,
    pub insns: Vec<Insn>,
    pub guards: Vec<Guard>,
    pub back_edges: Vec<BackEdge>,
}

impl Region {
    pub fn new(bitness: Bitness) -> Region {
        Region {
            bitness,
            insns: vec![],
            guards: vec![],
            back_edges: vec![],
        }
    }
    /// Appends the instruction at `rip`; returns its index.
    pub fn at(&mut self, rip: u64, (op, exit_class): (Op, Option<ExitClass>)) -> u16 {
        self.insns.push(Insn {
            rip,
            len: LEN,
            op,
            exit_class,
        });
        (self.insns.len() - 1) as u16
    }
    pub fn guard(&mut self, insn: u16, expect: u64, target: Target) {
        self.guards.push(Guard {
            insn,
            expect,
            target,
        });
    }
    pub fn back_edge(&mut self, insn: u16, cap: Option<u16>) {
        self.back_edges.push(BackEdge { insn, cap });
    }
    /// The cluster: code ranges are the maximal runs of adjacent instructions.
    pub fn build(mut self) -> Cluster {
        let mut spans: Vec<(u64, u64)> = self
            .insns
            .iter()
            .map(|i| (i.rip, i.rip + u64::from(i.len)))
            .collect();
        spans.sort_unstable();
        spans.dedup();
        let mut code: Vec<CodeRange> = vec![];
        for (s, e) in spans {
            match code.last_mut() {
                Some(r) if r.end() == s => r.bytes.resize((e - r.start) as usize, 0x90),
                _ => code.push(CodeRange {
                    start: s,
                    bytes: vec![0x90; (e - s) as usize],
                }),
            }
        }
        self.guards.sort_by_key(|g| g.insn);
        self.back_edges.sort_by_key(|b| b.insn);
        Cluster {
            bitness: self.bitness,
            code,
            insns: self.insns,
            back_edges: self.back_edges,
            guards: self.guards,
            learn_sites: Vec::new(),
        }
    }
}

/// 64-bit CALL rel, CALL r/m, JMP r/m and RET for [`Region::at`].
pub fn call(ret: u64, target: Target) -> (Op, Option<ExitClass>) {
    gap(Op::Call {
        size: Size::S8,
        ret,
        target,
    })
}
pub fn call_ind(src: Operand, ret: u64) -> (Op, Option<ExitClass>) {
    gap(Op::CallIndirect {
        size: Size::S8,
        src,
        ret,
    })
}
pub fn jmp_ind(src: Operand) -> (Op, Option<ExitClass>) {
    gap(Op::JmpIndirect {
        size: Size::S8,
        src,
    })
}
pub fn ret(pop: u16) -> (Op, Option<ExitClass>) {
    gap(Op::Ret {
        size: Size::S8,
        pop,
    })
}

/// The guest after the run equals `want` (built from the guest before the run by
/// applying what the CPU does): registers, RIP, flags, segments, control
/// registers, RAM below the page tables (whose accessed/dirty bits the walks set),
/// and the port I/O.
pub fn assert_same(g: &TestGuest, want: &TestGuest) {
    assert_eq!(g.state, want.state, "CPU state");
    let top = want.next_table.min(g.next_table) as usize;
    let differs = (0..top).find(|&a| g.ram[a] != want.ram[a]);
    assert_eq!(differs, None, "first RAM byte that differs");
    assert_eq!(g.io_log, want.io_log, "port I/O");
}

/// Records the OUT of one byte the CPU would do.
pub fn out_log(want: &mut TestGuest, port: u16, value: u32) {
    want.io_log.push(avex_core::engine::test_guest::PortIo {
        out: true,
        port,
        size: 1,
        value,
    });
}
