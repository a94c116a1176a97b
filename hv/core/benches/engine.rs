//! Engine throughput: time per register-only gap filler and per guest memory access
//! (4-level page walk included). Each benchmark runs a 1000-instruction cluster on
//! the in-memory test guest; criterion's throughput is per instruction. And a
//! region that crosses calls (`calls_and_returns`): its cost per exiting
//! instruction absorbed, against one hardware exit round trip.

use avex_core::engine::test_guest::TestGuest;
use avex_core::engine::{self, RunLimits, StopReason};
use avex_core::ir::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

const CODE_VA: u64 = 0xffff_8000_0010_0000;
const CODE_GPA: u64 = 0x10_0000;
const DATA_VA: u64 = 0xffff_8000_4000_0000;
const DATA_GPA: u64 = 0x20_0000;
const N: usize = 1000;

fn r(index: u8, size: Size) -> RegRef {
    RegRef {
        index,
        size,
        high8: false,
    }
}

fn cluster(ops: Vec<Op>) -> Cluster {
    let len = 4u8;
    let insns: Vec<Insn> = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| Insn {
            rip: CODE_VA + i as u64 * len as u64,
            len,
            op,
            exit_class: None,
        })
        .collect();
    let bytes = vec![0x90; insns.len() * len as usize];
    Cluster::contiguous(Bitness::B64, CODE_VA, bytes, insns, vec![])
}

fn guest(c: &Cluster) -> TestGuest {
    let mut g = TestGuest::long_mode(8 << 20);
    g.map_range(
        CODE_VA,
        CODE_GPA,
        0x2000 + c.code[0].bytes.len() as u64,
        0x1,
    );
    g.map_range(DATA_VA, DATA_GPA, 64 * 4096, 0x3);
    g.write_bytes(CODE_GPA, &c.code[0].bytes);
    g.state.gpr[RBX as usize] = DATA_VA;
    g.state.rip = CODE_VA;
    g
}

/// Thread CPU time in ns (not disturbed by other processes sharing the cores).
fn cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// ns per instruction over `runs` runs, by thread CPU time (best of 5 rounds).
fn cpu_time_per_insn(c: &Cluster, runs: u32) -> f64 {
    let mut g = guest(c);
    let limits = RunLimits {
        max_insns: 1 << 20,
        ..RunLimits::default()
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = cpu_ns();
        for _ in 0..runs {
            g.state.rip = CODE_VA;
            black_box(engine::run(black_box(c), &mut g, 0, &limits).stats.insns);
        }
        let dt = (cpu_ns() - t0) as f64 / runs as f64 / c.insns.len() as f64;
        best = best.min(dt);
    }
    best
}

fn bench_cluster(cr: &mut Criterion, name: &str, c: &Cluster) {
    println!(
        "engine/{name}: {:.2} ns per instruction (thread CPU time, whole run incl. code check)",
        cpu_time_per_insn(c, 2000)
    );
    let mut g = guest(c);
    let limits = RunLimits {
        max_insns: 1 << 20,
        ..RunLimits::default()
    };
    let out = engine::run(c, &mut g, 0, &limits);
    assert_eq!(out.reason, StopReason::End, "{name}: {out:?}");
    assert_eq!(out.stats.insns as usize, c.insns.len());
    let mut grp = cr.benchmark_group("engine");
    grp.throughput(Throughput::Elements(c.insns.len() as u64));
    grp.bench_function(name, |b| {
        b.iter(|| {
            g.state.rip = CODE_VA;
            let out = engine::run(black_box(c), &mut g, 0, &limits);
            black_box(out.stats.insns)
        })
    });
    // The IR contract's validator, as the cache runs it on insert: a cluster
    // starts at an exiting instruction, so the first becomes an OUT here.
    let mut v = c.clone();
    v.insns[0].op = Op::Out {
        size: Size::S1,
        port: PortSrc::Dx,
    };
    v.insns[0].exit_class = v.insns[0].op.exit_class();
    assert_eq!(validate(&v), Ok(()), "{name}");
    grp.bench_function(format!("{name}_validate"), |b| {
        b.iter(|| validate(black_box(&v)).is_ok())
    });
    grp.finish();
}

fn benches(cr: &mut Criterion) {
    // Register-only gap fillers: ALU, shifts, moves, LEA, flags consumers.
    let mut reg_ops = Vec::new();
    for i in 0..N {
        let a = (i % 6) as u8;
        let b = ((i + 3) % 14) as u8;
        let b = if b == RSP { 15 } else { b };
        let op = match i % 8 {
            0 => Op::Alu {
                op: AluOp::Add,
                size: Size::S8,
                dst: Operand::Reg(r(a, Size::S8)),
                src: Operand::Reg(r(b, Size::S8)),
            },
            1 => Op::Alu {
                op: AluOp::Xor,
                size: Size::S4,
                dst: Operand::Reg(r(a, Size::S4)),
                src: Operand::Imm(0x1234_5678),
            },
            2 => Op::Shift {
                op: ShiftOp::Shl,
                size: Size::S8,
                dst: Operand::Reg(r(a, Size::S8)),
                count: Operand::Imm(3),
            },
            3 => Op::Mov {
                size: Size::S8,
                dst: Operand::Reg(r(b, Size::S8)),
                src: Operand::Reg(r(a, Size::S8)),
            },
            4 => Op::Lea {
                dst: r(a, Size::S8),
                addr: MemRef {
                    seg: Seg::Ds,
                    base: Some(b),
                    index: Some(a),
                    scale: 4,
                    disp: 8,
                    addr_size: Size::S8,
                },
            },
            5 => Op::Alu {
                op: AluOp::Cmp,
                size: Size::S2,
                dst: Operand::Reg(r(a, Size::S2)),
                src: Operand::Imm(7),
            },
            6 => Op::Cmovcc {
                cond: Cond::B,
                size: Size::S8,
                dst: r(a, Size::S8),
                src: Operand::Reg(r(b, Size::S8)),
            },
            _ => Op::Unary {
                op: UnaryOp::Inc,
                size: Size::S1,
                dst: Operand::Reg(r(a, Size::S1)),
            },
        };
        reg_ops.push(op);
    }
    bench_cluster(cr, "register_only", &cluster(reg_ops));

    // Memory accesses: loads and stores spread over 64 pages (a full walk each).
    let mut mem_ops = Vec::new();
    for i in 0..N {
        let m = MemRef {
            seg: Seg::Ds,
            base: Some(RBX),
            index: None,
            scale: 1,
            disp: ((i * 4096 * 7 + i * 24) % (64 * 4096 - 8)) as i64,
            addr_size: Size::S8,
        };
        let op = if i % 2 == 0 {
            Op::Mov {
                size: Size::S8,
                dst: Operand::Reg(r(0, Size::S8)),
                src: Operand::Mem(m),
            }
        } else {
            Op::Mov {
                size: Size::S8,
                dst: Operand::Mem(m),
                src: Operand::Reg(r(0, Size::S8)),
            }
        };
        mem_ops.push(op);
    }
    bench_cluster(cr, "memory_access", &cluster(mem_ops));

    // A typical small cluster (a UART transmit: LSR poll, data out, a few fillers):
    // the cost of one whole run, state get/set and code check included.
    let typical = vec![
        Op::Mov {
            size: Size::S4,
            dst: Operand::Reg(r(RDX, Size::S4)),
            src: Operand::Imm(0x3fd),
        },
        Op::In {
            size: Size::S1,
            port: PortSrc::Dx,
        },
        Op::Alu {
            op: AluOp::Test,
            size: Size::S1,
            dst: Operand::Reg(r(RAX, Size::S1)),
            src: Operand::Imm(0x20),
        },
        Op::Jcc {
            cond: Cond::E,
            target: Target::Exit(0),
        },
        Op::Movzx {
            dst: r(RAX, Size::S4),
            src: Operand::Mem(MemRef {
                seg: Seg::Ds,
                base: Some(RBX),
                index: None,
                scale: 1,
                disp: 0x40,
                addr_size: Size::S8,
            }),
            src_size: Size::S1,
        },
        Op::Mov {
            size: Size::S4,
            dst: Operand::Reg(r(RDX, Size::S4)),
            src: Operand::Imm(0x3f8),
        },
        Op::Out {
            size: Size::S1,
            port: PortSrc::Dx,
        },
        Op::Unary {
            op: UnaryOp::Inc,
            size: Size::S8,
            dst: Operand::Reg(r(RBX, Size::S8)),
        },
    ];
    let c = cluster(typical);
    let mut g = guest(&c);
    g.default_port_in = 0x60;
    let limits = RunLimits::default();
    let out = engine::run(&c, &mut g, 0, &limits);
    assert_eq!(
        (out.reason, out.stats.insns),
        (StopReason::End, 8),
        "{out:?}"
    );
    let runs = 200_000u32;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = cpu_ns();
        for _ in 0..runs {
            g.state.rip = CODE_VA;
            g.state.gpr[RBX as usize] = DATA_VA;
            g.io_log.clear();
            black_box(engine::run(black_box(&c), &mut g, 0, &limits).stats.insns);
        }
        best = best.min((cpu_ns() - t0) as f64 / runs as f64);
    }
    println!("engine/typical_cluster: {best:.1} ns per run of 8 instructions (2 port I/O, 1 memory read; thread CPU time)");

    calls_and_returns(cr);
}

/// A poll loop that calls its port accessors, the shape of Linux's 8250 console
/// (issue 9): per iteration `in` (LSR); `call putc` (direct), which does
/// `out` (THR) and `in` (LSR) and returns through its guard; `call *%r11` (the
/// port's serial_out through a function pointer, guarded), which does `out` (port
/// 0x80) and returns; `dec rcx; jnz` back (an uncapped back-edge). 12 instructions,
/// 4 of them exiting, per iteration; three code ranges on two pages.
fn call_region() -> Cluster {
    let a = CODE_VA;
    let f = CODE_VA + 0x1000;
    let g = CODE_VA + 0x1800;
    let port = |out: bool| {
        let op = if out {
            Op::Out {
                size: Size::S1,
                port: PortSrc::Dx,
            }
        } else {
            Op::In {
                size: Size::S1,
                port: PortSrc::Dx,
            }
        };
        (op, op.exit_class())
    };
    let gap = |op: Op| (op, None);
    let edx = |v: u64| {
        gap(Op::Mov {
            size: Size::S4,
            dst: Operand::Reg(r(RDX, Size::S4)),
            src: Operand::Imm(v),
        })
    };
    let ret = gap(Op::Ret {
        size: Size::S8,
        pop: 0,
    });
    let layout = [
        (a, port(false)),
        (
            a + 4,
            gap(Op::Call {
                size: Size::S8,
                ret: a + 8,
                target: Target::Insn(2),
            }),
        ),
        (f, edx(0x3f8)),
        (f + 4, port(true)),
        (f + 8, edx(0x3fd)),
        (f + 12, port(false)),
        (f + 16, ret),
        (
            a + 8,
            gap(Op::CallIndirect {
                size: Size::S8,
                src: Operand::Reg(r(11, Size::S8)),
                ret: a + 12,
            }),
        ),
        (g, port(true)),
        (g + 4, ret),
        (
            a + 12,
            gap(Op::Unary {
                op: UnaryOp::Dec,
                size: Size::S8,
                dst: Operand::Reg(r(RCX, Size::S8)),
            }),
        ),
        (
            a + 16,
            gap(Op::Jcc {
                cond: Cond::Ne,
                target: Target::Insn(0),
            }),
        ),
    ];
    let insns: Vec<Insn> = layout
        .iter()
        .map(|&(rip, (op, exit_class))| Insn {
            rip,
            len: 4,
            op,
            exit_class,
        })
        .collect();
    let range = |start: u64, n: usize| CodeRange {
        start,
        bytes: vec![0x90; 4 * n],
    };
    let c = Cluster {
        bitness: Bitness::B64,
        code: vec![range(a, 5), range(f, 5), range(g, 2)],
        insns,
        back_edges: vec![BackEdge {
            insn: 11,
            cap: None,
        }],
        guards: vec![
            Guard {
                insn: 6,
                expect: a + 8,
                target: Target::Insn(7),
            },
            Guard {
                insn: 7,
                expect: g,
                target: Target::Insn(8),
            },
            Guard {
                insn: 9,
                expect: a + 12,
                target: Target::Insn(10),
            },
        ],
        learn_sites: Vec::new(),
    };
    assert_eq!(validate(&c), Ok(()));
    c
}

fn calls_and_returns(cr: &mut Criterion) {
    let c = call_region();
    let mut g = TestGuest::long_mode(8 << 20);
    g.map_range(CODE_VA, CODE_GPA, 0x2000, 0x1);
    g.map_range(DATA_VA, DATA_GPA, 64 * 4096, 0x3);
    for r in &c.code {
        g.write_bytes(CODE_GPA + (r.start - CODE_VA), &r.bytes);
    }
    g.default_port_in = 0x60;
    let limits = RunLimits {
        max_insns: 1 << 20,
        ..RunLimits::default()
    };
    // The machine's clock, to express the cost in cycles (cpu MHz of the first
    // CPU in /proc/cpuinfo; 2700 if it cannot be read).
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(2700.0);
    for iterations in [1u64, 100] {
        let run = |g: &mut TestGuest| {
            g.state.rip = CODE_VA;
            g.state.gpr[RSP as usize] = DATA_VA + 0x8000;
            g.state.gpr[RCX as usize] = iterations;
            g.state.gpr[11] = CODE_VA + 0x1800;
            g.io_log.clear();
            engine::run(black_box(&c), g, 0, &limits)
        };
        let out = run(&mut g);
        assert_eq!(
            (out.reason, out.stats.exiting as u64, out.stats.insns as u64),
            (StopReason::End, 4 * iterations, 12 * iterations),
            "{out:?}"
        );
        let exiting = out.stats.exiting as f64;
        let runs = (200_000 / iterations).max(2000) as u32;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t0 = cpu_ns();
            for _ in 0..runs {
                black_box(run(&mut g).stats.insns);
            }
            best = best.min((cpu_ns() - t0) as f64 / runs as f64);
        }
        let per_exit = best / exiting;
        println!(
            "engine/calls_and_returns x{iterations}: {best:.0} ns per run, {per_exit:.1} ns = {:.0} cycles at {mhz:.0} MHz per exiting instruction absorbed ({} exiting, {} instructions, a direct and a guarded indirect call and 2 guarded returns per iteration; thread CPU time; a hardware round trip is about 800 cycles)",
            per_exit * mhz / 1000.0,
            out.stats.exiting,
            out.stats.insns,
        );
        let mut grp = cr.benchmark_group("engine");
        grp.throughput(Throughput::Elements(out.stats.exiting as u64));
        grp.bench_function(format!("calls_and_returns_x{iterations}"), |b| {
            b.iter(|| black_box(run(&mut g).stats.insns))
        });
        grp.finish();
    }
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
