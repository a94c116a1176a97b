//! The exit handler learns where guarded indirect calls, jumps and returns went
//! when no guard expected it, and translates the cluster again (dynamic modes).
//! The clusters here are made by hand and put in the cache, so the bookkeeping is
//! tested whatever the translator makes of the code.

mod engine_support;

use avex_core::cache::Origin;
use avex_core::engine::test_guest::TestGuest;
use avex_core::engine::Paging;
use avex_core::exit::{Exit, ExitHandler, Mode, Next};
use avex_core::guest_code::{RegionKey, MAX_LEARNED_PER_SITE, MAX_TARGETS_PER_SITE};
use avex_core::ir::*;
use avex_core::policy::{ExitClass, ExitPolicy};

/// 32-bit code:
///   0x1000: in al, dx
///   0x1001: out dx, al
///   0x1002: call *%ebx          (ff d3)
///   0x1004: out dx, al
///   0x1005: hlt
///   0x1010: out dx, al ; ret    (one callee)
///   0x1020: out dx, al ; ret    (another)
fn guest() -> TestGuest {
    let mut g = TestGuest::protected32(1 << 20, Paging::None);
    g.write_bytes(0x1000, &[0xec, 0xee, 0xff, 0xd3, 0xee, 0xf4]);
    g.write_bytes(0x1010, &[0xee, 0xc3]);
    g.write_bytes(0x1020, &[0xee, 0xc3]);
    g.state.rip = 0x1000;
    g.state.gpr[RDX as usize] = 0x3f8;
    g.state.gpr[RSP as usize] = 0x8000;
    g.default_port_in = 0x41;
    g
}

fn insn(rip: u64, len: u8, op: Op, exit_class: Option<ExitClass>) -> Insn {
    Insn {
        rip,
        len,
        op,
        exit_class,
    }
}

fn out() -> Op {
    Op::Out {
        size: Size::S1,
        port: PortSrc::Dx,
    }
}

/// The region a translator would make knowing the callee at 0x1010 only.
fn region() -> Cluster {
    let c = Cluster {
        bitness: Bitness::B32,
        code: vec![
            CodeRange {
                start: 0x1000,
                bytes: vec![0xec, 0xee, 0xff, 0xd3, 0xee],
            },
            CodeRange {
                start: 0x1010,
                bytes: vec![0xee, 0xc3],
            },
        ],
        insns: vec![
            insn(
                0x1000,
                1,
                Op::In {
                    size: Size::S1,
                    port: PortSrc::Dx,
                },
                Some(ExitClass::In),
            ),
            insn(0x1001, 1, out(), Some(ExitClass::Out)),
            insn(
                0x1002,
                2,
                Op::CallIndirect {
                    size: Size::S4,
                    src: Operand::Reg(RegRef {
                        index: RBX,
                        size: Size::S4,
                        high8: false,
                    }),
                    ret: 0x1004,
                },
                None,
            ),
            insn(0x1010, 1, out(), Some(ExitClass::Out)),
            insn(
                0x1011,
                1,
                Op::Ret {
                    size: Size::S4,
                    pop: 0,
                },
                None,
            ),
            insn(0x1004, 1, out(), Some(ExitClass::Out)),
        ],
        back_edges: vec![],
        guards: vec![
            Guard {
                insn: 2,
                expect: 0x1010,
                target: Target::Insn(3),
            },
            Guard {
                insn: 4,
                expect: 0x1004,
                target: Target::Insn(5),
            },
        ],
        learn_sites: vec![],
    };
    validate(&c).unwrap();
    c
}

fn in_exit() -> Exit {
    Exit::PortIo {
        port: 0x3f8,
        size: 1,
        write: false,
        value: 0,
    }
}

/// One exit of the IN and the cluster run after it, as a backend does them.
fn exit_and_run(h: &mut ExitHandler, g: &mut TestGuest) -> avex_core::exit::ClusterEnd {
    g.state.rip = 0x1000;
    g.state.gpr[RSP as usize] = 0x8000;
    let r = h.handle(&in_exit(), 0x1000, g);
    assert_eq!(r.next, Next::RunCluster { start: 0x1000 });
    g.state.gpr[RAX as usize] = 0x41;
    g.state.rip = 0x1001;
    h.run_cluster(0x1000, g)
}

fn handler(mode: Mode) -> ExitHandler {
    let mut h = ExitHandler::new(mode, ExitPolicy::default());
    h.cache_mut().insert(region(), Origin::Aot).unwrap();
    h
}

#[test]
fn a_known_destination_runs_through_and_learns_nothing() {
    let mut h = handler(Mode::AotDynamic);
    let mut g = guest();
    g.state.gpr[RBX as usize] = 0x1010;
    let end = exit_and_run(&mut h, &mut g);
    assert_eq!((end.rip, end.exiting, end.early), (0x1005, 3, None));
    assert_eq!(h.stats().indirect_targets_learned, 0);
    assert_eq!(h.stats().translations_rebuilt, 0);
}

#[test]
fn a_missed_destination_is_learned_once_and_the_cluster_rebuilt() {
    let mut h = handler(Mode::AotDynamic);
    let mut g = guest();
    g.state.gpr[RBX as usize] = 0x1020;
    let end = exit_and_run(&mut h, &mut g);
    // Stopped before the CALL, nothing of it done: the CPU runs it natively.
    assert_eq!((end.rip, end.exiting, end.early), (0x1002, 1, None));
    assert_eq!(g.state.gpr[RSP as usize], 0x8000);
    assert_eq!(h.stats().indirect_targets_learned, 1);
    assert_eq!(h.stats().translations_rebuilt, 1);
    // The rebuilt translation replaced the hand-made one, entered at the same RIP.
    let e = h
        .cache()
        .lookup(0x1000)
        .expect("a translation at the entry");
    assert_eq!(e.origin, Origin::Dynamic);
    assert_ne!(e.cluster, region());
    // The same destination again is not news: nothing learned, nothing rebuilt
    // (whatever the rebuilt translation does with it).
    let _ = exit_and_run(&mut h, &mut g);
    assert_eq!(h.stats().indirect_targets_learned, 1);
    assert_eq!(h.stats().translations_rebuilt, 1);
}

#[test]
fn a_site_learns_a_bounded_number_of_destinations() {
    let mut h = handler(Mode::Dynamic);
    let mut g = guest();
    for k in 0..MAX_TARGETS_PER_SITE as u64 + 2 {
        // Put the hand-made region back, so every run reaches the guard.
        h.cache_mut().insert(region(), Origin::Dynamic).unwrap();
        g.state.gpr[RBX as usize] = 0x2000 + 0x10 * k;
        let end = exit_and_run(&mut h, &mut g);
        assert_eq!(end.rip, 0x1002);
    }
    // Every new destination is learned (the oldest gives way past
    // MAX_TARGETS_PER_SITE), up to MAX_LEARNED_PER_SITE over the run.
    let tried = MAX_TARGETS_PER_SITE as u64 + 2;
    assert_eq!(h.stats().indirect_targets_learned, tried);
    assert_eq!(h.stats().translations_rebuilt, tried);
    for k in tried..u64::from(MAX_LEARNED_PER_SITE) + 4 {
        h.cache_mut().insert(region(), Origin::Dynamic).unwrap();
        g.state.gpr[RBX as usize] = 0x2000 + 0x10 * k;
        exit_and_run(&mut h, &mut g);
    }
    assert_eq!(
        h.stats().indirect_targets_learned,
        u64::from(MAX_LEARNED_PER_SITE),
        "a megamorphic site stops learning"
    );
}

#[test]
fn without_dynamic_translation_nothing_is_learned() {
    let mut h = handler(Mode::Aot);
    let mut g = guest();
    g.state.gpr[RBX as usize] = 0x1020;
    let end = exit_and_run(&mut h, &mut g);
    assert_eq!(end.rip, 0x1002);
    assert_eq!(h.stats().indirect_targets_learned, 0);
    assert_eq!(h.stats().translations_rebuilt, 0);
    assert_eq!(h.cache().lookup(0x1000).unwrap().cluster, region());
}

/// What the learning is for: after the miss, the next run goes through the
/// learned destination. Needs the region translator (translator.rs) to follow
/// `call *%ebx` through `CodeSource::indirect_targets` and emit a guard for it;
/// today's translator scans in a straight line and stops at the CALL.
#[test]
fn after_learning_the_next_run_goes_through_the_learned_destination() {
    let mut h = handler(Mode::AotDynamic);
    let mut g = guest();
    g.state.gpr[RBX as usize] = 0x1020;
    let _ = exit_and_run(&mut h, &mut g);
    let c = &h.cache().lookup(0x1000).unwrap().cluster;
    let site = c.insns.iter().position(|i| i.rip == 0x1002).unwrap();
    assert!(c.guards_of(site).any(|g| g.expect == 0x1020));
    g.io_log.clear();
    let end = exit_and_run(&mut h, &mut g);
    assert_eq!((end.rip, end.exiting, end.early), (0x1005, 3, None));
    assert_eq!(g.outs(), vec![(0x3f8, 1, 0x41); 3]);
    assert_eq!(h.stats().indirect_targets_learned, 1);
}

#[test]
fn a_destination_the_cpu_cannot_branch_to_is_not_learned() {
    // Beyond the CS limit the CALL faults on the CPU: not a target, and it must
    // not take one of the site's few slots.
    let mut h = handler(Mode::Dynamic);
    let mut g = guest();
    g.state.seg[Seg::Cs as usize].limit = 0xffff;
    g.state.gpr[RBX as usize] = 0x2_0000;
    let end = exit_and_run(&mut h, &mut g);
    assert_eq!(end.rip, 0x1002);
    assert_eq!(h.stats().indirect_targets_learned, 0);
    assert_eq!(h.stats().translations_rebuilt, 0);
}

#[test]
fn a_rebuild_that_fails_is_counted_as_a_translation_failure() {
    // in al, dx ; call *%ebx : one exiting instruction before the call; once the
    // call's destination is known and is code no region can run, nothing is left
    // to gain, so the rebuild makes no cluster.
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let mut c = region();
    c.code[0].bytes = vec![0xec, 0xff, 0xd3, 0xee];
    c.insns.remove(1);
    for i in &mut c.insns[1..] {
        if i.rip < 0x1010 {
            i.rip -= 1;
        }
    }
    if let Op::CallIndirect { ret, .. } = &mut c.insns[1].op {
        *ret = 0x1003;
    }
    for g in &mut c.guards {
        g.insn -= 1;
        if let Target::Insn(t) = &mut g.target {
            *t -= 1;
        }
    }
    c.guards[1].expect = 0x1003;
    validate(&c).unwrap();
    h.cache_mut().insert(c, Origin::Dynamic).unwrap();
    let mut g = guest();
    g.write_bytes(0x1000, &[0xec, 0xff, 0xd3, 0xee, 0xf4]);
    // The callee the call turns out to reach: UD2, which no region takes in, so
    // the rebuilt region would hold the IN alone: no cluster.
    g.write_bytes(0x1020, &[0x0f, 0x0b]);
    g.state.gpr[RBX as usize] = 0x1020;
    let r = h.handle(&in_exit(), 0x1000, &mut g);
    assert_eq!(r.next, Next::RunCluster { start: 0x1000 });
    g.state.rip = 0x1001;
    let end = h.run_cluster(0x1000, &mut g);
    assert_eq!(end.rip, 0x1001);
    let s = h.stats();
    assert_eq!(s.indirect_targets_learned, 1);
    assert_eq!(s.translations_rebuilt, 0);
    assert_eq!(
        s.translation_failures, 1,
        "{:?}",
        s.translation_failures_by_reason
    );
    assert_eq!(
        s.translation_failures_by_reason.values().sum::<u64>(),
        s.translation_failures
    );
}

#[test]
fn a_destination_missed_inside_a_thunk_is_learned_at_the_site_that_entered_it() {
    // The CALL as if it were a retpoline's RET entered from a CALL at 0x0ff0: one
    // thunk serves every call site, so what it learns belongs to the site.
    let mut c = region();
    c.learn_sites = vec![LearnSite {
        insn: 2,
        site: 0x0ff0,
    }];
    validate(&c).unwrap();
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    h.cache_mut().insert(c, Origin::Dynamic).unwrap();
    let mut g = guest();
    g.state.gpr[RBX as usize] = 0x1020;
    let end = exit_and_run(&mut h, &mut g);
    assert_eq!(end.rip, 0x1002);
    assert_eq!(h.stats().indirect_targets_learned, 1);
    assert_eq!(
        h.learned().of(RegionKey::any_caller(0x1000), 0x0ff0),
        [0x1020]
    );
    assert!(h
        .learned()
        .of(RegionKey::any_caller(0x1000), 0x1002)
        .is_empty());
}

#[test]
fn a_learn_site_must_name_a_guarded_instruction() {
    let mut c = region();
    c.learn_sites = vec![LearnSite {
        insn: 1,
        site: 0x0ff0,
    }];
    assert!(matches!(
        validate(&c),
        Err(ClusterError::BadLearnSite { index: 0, .. })
    ));
}
