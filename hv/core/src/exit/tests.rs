//! Tests of [`super`].
use super::*;
use crate::engine::test_guest::TestGuest;
use crate::engine::Paging;
use crate::format::{GuestIdentity, TranslationSet, TranslatorStamp};

/// 0x1000: in al,dx ; mov bl,al ; out dx,al ; out dx,al ; hlt
const CODE: [u8; 6] = [0xec, 0x88, 0xc3, 0xee, 0xee, 0xf4];

fn guest() -> TestGuest {
    let mut g = TestGuest::protected32(1 << 20, Paging::None);
    g.write_bytes(0x1000, &CODE);
    g.state.rip = 0x1000;
    g.state.gpr[2] = 0x3f8;
    g.default_port_in = 0x41;
    g
}

fn in_exit() -> Exit {
    Exit::PortIo {
        port: 0x3f8,
        size: 1,
        write: false,
        value: 0,
    }
}

/// What a backend does to complete the IN before a cluster runs.
fn complete_in(g: &mut TestGuest, value: u64) {
    g.state.gpr[0] = (g.state.gpr[0] & !0xff) | (value & 0xff);
    g.state.rip = 0x1001;
}

#[test]
fn dynamic_translates_at_the_third_exit_and_runs_the_rest() {
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let mut g = guest();
    for _ in 0..2 {
        let r = h.handle(&in_exit(), 0x1000, &mut g);
        assert_eq!(r.value, Ok(0x41));
        assert_eq!(r.next, Next::Resume);
    }
    let r = h.handle(&in_exit(), 0x1000, &mut g);
    let Next::RunCluster { start } = r.next else {
        panic!("no cluster at the third exit: {r:?} {:?}", h.stats())
    };
    assert_eq!(h.stats().translations_built, 1);
    assert!(h.stats().translate_insns >= 4);
    complete_in(&mut g, 0x41);
    let end = h.run_cluster(start, &mut g);
    assert_eq!(end.exiting, 2, "{end}");
    assert_eq!(end.rip, 0x1005, "{end}");
    assert!(end.early.is_none(), "{end}");
    assert_eq!(g.state.rip, 0x1005);
    assert_eq!(g.state.gpr[3] & 0xff, 0x41, "mov bl,al ran");
    let outs: alloc::vec::Vec<_> = g
        .io_log
        .iter()
        .filter(|p| p.out)
        .map(|p| (p.port, p.value))
        .collect();
    assert_eq!(outs, [(0x3f8, 0x41), (0x3f8, 0x41)]);
    let s = h.stats();
    assert_eq!(s.by_reason[&ExitReason::IoIn], 3);
    assert_eq!(s.in_cluster_exiting, 2);
    assert_eq!(s.exit_prone(), 5);
    assert_eq!(s.avoided(), 2);
    assert_eq!(s.clusters_run_dynamic, 1);
    assert_eq!(s.by_rip[&0x1000], 3);
    // The site knows its reason and that a cluster ran after one of its exits.
    assert_eq!(s.exit_sites[&0x1000].reason, Some(ExitReason::IoIn));
    assert_eq!(s.exit_sites[&0x1000].clustered, 1);
    // And what that cluster absorbed and where it left the guest.
    assert_eq!(s.exit_sites[&0x1000].absorbed, 2);
    assert_eq!(s.exit_sites[&0x1000].top_end(), Some((0x1005, 1)));
}

#[test]
fn a_sites_most_frequent_cluster_end_survives_many_rare_ones() {
    let mut s = ExitStats::default();
    // More distinct rare ends than are kept come first; then one end dominates,
    // interleaved with more rare ones.
    for i in 0..10u64 {
        s.count_cluster_end(0x1000, 0, 0x100 + i, false);
    }
    for i in 0..40u64 {
        s.count_cluster_end(0x1000, 1, 0x20, false);
        s.count_cluster_end(0x1000, 0, 0x200 + i, false);
    }
    let site = &s.exit_sites[&0x1000];
    assert_eq!(site.absorbed, 40);
    assert_eq!(site.ends.len(), crate::stats::SITE_ENDS);
    // Counted from when it was let in, over by at most the evicted count.
    let (rip, n) = site.top_end().unwrap();
    assert_eq!(rip, 0x20);
    assert!((40..=40 + site.ends_other).contains(&n), "{n} {site:?}");
    assert!(site.ends_other > 0);
}

#[test]
fn off_never_clusters_and_aot_never_translates() {
    for mode in [Mode::Off, Mode::Aot] {
        let mut h = ExitHandler::new(mode, ExitPolicy::default());
        let mut g = guest();
        for _ in 0..5 {
            assert_eq!(h.handle(&in_exit(), 0x1000, &mut g).next, Next::Resume);
        }
        assert_eq!(h.stats().translations_built, 0);
        assert_eq!(h.stats().handled, 5);
    }
}

fn set_for(_g: &mut TestGuest, digest: [u8; 32], policy: &ExitPolicy) -> CheckedSet {
    let mut code = CODE.to_vec();
    code.truncate(5);
    let c = translator::translate(
        &code,
        0x1000,
        Bitness::B32,
        policy,
        &TranslatorConfig::default(),
    )
    .expect("translatable");
    crate::format::check(TranslationSet {
        guest: GuestIdentity {
            digest,
            name: "t".into(),
        },
        policy: policy.fingerprint(),
        translator: TranslatorStamp::default(),
        clusters: alloc::vec![c],
    })
    .expect("a valid set")
}

#[test]
fn aot_sets_are_checked_and_entered_at_exits_inside_them() {
    let policy = ExitPolicy::default();
    let mut g = guest();
    // Made for another guest: rejected with the reason, nothing loaded.
    let mut h = ExitHandler::new(Mode::AotDynamic, policy.clone());
    let err = h
        .load_translations(set_for(&mut g, [1; 32], &policy), &[2; 32])
        .unwrap_err();
    assert!(err.contains("stale"), "{err}");
    assert_eq!(
        h.stats().translations_rejected.as_deref(),
        Some(err.as_str())
    );
    assert!(h.cache().is_empty());
    // The right guest: loaded, and the IN's exit runs it at once.
    let mut h = ExitHandler::new(Mode::Aot, policy.clone());
    assert_eq!(
        h.load_translations(set_for(&mut g, [2; 32], &policy), &[2; 32]),
        Ok(1)
    );
    assert_eq!(
        h.handle(&in_exit(), 0x1000, &mut g).next,
        Next::RunCluster { start: 0x1000 }
    );
    // An exit at the first OUT (inside the cluster, not its last instruction)
    // enters the same translation there.
    let out = Exit::PortIo {
        port: 0x3f8,
        size: 1,
        write: true,
        value: 0x41,
    };
    assert_eq!(
        h.handle(&out, 0x1003, &mut g).next,
        Next::RunCluster { start: 0x1000 }
    );
    g.state.rip = 0x1004;
    let end = h.run_cluster(0x1000, &mut g);
    assert_eq!((end.exiting, end.rip), (1, 0x1005), "{end}");
    assert_eq!(h.stats().clusters_run_aot, 1);
    assert_eq!(h.stats().aot_translations_ran, 1);
    // A second run of the same translation: still one that ran.
    g.state.rip = 0x1004;
    h.run_cluster(0x1000, &mut g);
    assert_eq!(h.stats().aot_translations_ran, 1);
    assert!(h
        .stats()
        .summary()
        .contains("1 ran, 0 dropped as stale, 0 never ran"));
    // Not in mode dynamic: nothing loaded.
    let mut h = ExitHandler::new(Mode::Dynamic, policy.clone());
    assert_eq!(
        h.load_translations(set_for(&mut g, [2; 32], &policy), &[2; 32]),
        Ok(0)
    );
}

#[test]
fn changed_guest_code_drops_the_translation_and_runs_nothing() {
    let policy = ExitPolicy::default();
    let mut g = guest();
    let mut h = ExitHandler::new(Mode::Aot, policy.clone());
    h.load_translations(set_for(&mut g, [2; 32], &policy), &[2; 32])
        .unwrap();
    // The guest rewrote the first OUT into a NOP.
    g.write_bytes(0x1003, &[0x90]);
    complete_in(&mut g, 0x41);
    let end = h.run_cluster(0x1000, &mut g);
    assert_eq!(end.exiting, 0);
    assert_eq!(end.rip, 0x1001);
    assert!(end.early.is_some());
    assert_eq!(h.stats().stale_dropped, 1);
    assert_eq!(
        (
            h.stats().aot_translations_stale,
            h.stats().aot_translations_ran
        ),
        (1, 0)
    );
    assert!(h.cache().is_empty());
    assert!(g.io_log.iter().all(|p| !p.out), "nothing ran");
}

#[test]
fn msr_faults_come_back_for_injection() {
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let mut g = guest();
    g.msr_faults.insert(0x1234);
    let r = h.handle(
        &Exit::Msr {
            msr: 0x1234,
            write: false,
            value: 0,
        },
        0x1000,
        &mut g,
    );
    assert_eq!(r.value, Err(Fault::GeneralProtection));
    assert_eq!(r.next, Next::Resume);
    assert_eq!(h.handle(&Exit::Hlt, 0x1000, &mut g).next, Next::Halt);
    assert_eq!(h.stats().by_reason[&ExitReason::Rdmsr], 1);
}

#[test]
fn port_exits_are_counted_by_port_and_coalesced_writes_are_not() {
    let mut h = ExitHandler::new(Mode::Off, ExitPolicy::default());
    let mut g = guest();
    h.handle(&in_exit(), 0x1000, &mut g);
    h.handle(&in_exit(), 0x1000, &mut g);
    let out_80 = Exit::PortIo {
        port: 0x80,
        size: 1,
        write: true,
        value: 0,
    };
    assert_eq!(h.perform(&out_80, &mut g), Ok(0));
    h.perform_coalesced(&out_80, &mut g);
    let ports: alloc::vec::Vec<(u16, u64)> =
        h.stats().port_exits.iter().map(|(&p, &n)| (p, n)).collect();
    assert_eq!(ports, [(0x80, 1), (0x3f8, 2)]);
    assert!(h
        .stats()
        .summary()
        .contains("by port (IN/OUT):     0x3f8 2, 0x80 1"));
}

#[test]
fn mode_names_round_trip() {
    for m in Mode::ALL {
        assert_eq!(Mode::parse(m.name()), Some(m));
    }
    assert_eq!(Mode::parse("aot-dynamic"), None);
    assert!(Mode::AotDynamic.uses_aot() && Mode::AotDynamic.uses_dynamic());
    assert!(!Mode::Off.uses_aot() && !Mode::Off.uses_dynamic());
}

#[test]
fn a_rip_whose_runs_inside_another_translation_gain_nothing_gets_its_own() {
    let policy = ExitPolicy::default();
    let out = Exit::PortIo {
        port: 0x3f8,
        size: 1,
        write: true,
        value: 0x41,
    };
    // 0x3000 in al,dx ; out dx,al ; nop ; hlt: entered at the IN. A run from the
    // OUT (0x3001) inside it stops at the HLT having absorbed no exit.
    let code = [0xec, 0xee, 0x90, 0xf4];
    let region = crate::translator::translate(
        &code,
        0x3000,
        Bitness::B32,
        &policy,
        &crate::translator::TranslatorConfig::default(),
    )
    .unwrap();
    for (mode, own) in [(Mode::AotDynamic, true), (Mode::Aot, false)] {
        let mut g = guest();
        g.write_bytes(0x3000, &code);
        let mut h = ExitHandler::new(mode, policy.clone());
        h.cache_mut().insert(region.clone(), Origin::Aot).unwrap();
        let mut next = Next::Resume;
        for _ in 0..4 {
            next = h.handle(&out, 0x3001, &mut g).next;
            if next == (Next::RunCluster { start: 0x3000 }) {
                g.state.rip = 0x3002;
                let end = h.run_cluster(0x3000, &mut g);
                assert_eq!(end.exiting, 0, "{end}");
            }
        }
        if own {
            assert_eq!(next, Next::RunCluster { start: 0x3001 });
            assert_eq!(h.stats().translations_built, 1);
        } else {
            assert_eq!(next, Next::RunCluster { start: 0x3000 });
            assert_eq!(h.stats().translations_built, 0);
        }
    }
    // A tail that absorbs exits keeps being used: from the first OUT of the
    // loaded translation (0x1003), it runs the second.
    let mut g = guest();
    let mut h = ExitHandler::new(Mode::AotDynamic, policy.clone());
    h.load_translations(set_for(&mut g, [2; 32], &policy), &[2; 32])
        .unwrap();
    for _ in 0..4 {
        assert_eq!(
            h.handle(&out, 0x1003, &mut g).next,
            Next::RunCluster { start: 0x1000 }
        );
        g.state.rip = 0x1004;
        assert_eq!(h.run_cluster(0x1000, &mut g).exiting, 1);
    }
    assert_eq!(h.stats().translations_built, 0);
}

/// Runs `n` exits of the IN at 0x1000 and the clusters chosen after them.
fn run_in_exits(h: &mut ExitHandler, g: &mut TestGuest, n: usize) {
    for _ in 0..n {
        g.state.rip = 0x1000;
        let r = h.handle(&in_exit(), 0x1000, g);
        complete_in(g, 0x41);
        if let Next::RunCluster { start } = r.next {
            h.run_cluster(start, g);
        }
    }
}

#[test]
fn a_site_whose_clusters_absorb_nothing_stops_running_them() {
    // 0x1000: in al,dx ; test al,al ; jnz 0x100a ; out dx,al ; out dx,al ; nop ;
    // nop ; hlt. The region holds both OUTs, but the byte read is never 0: every
    // run leaves at the JNZ having absorbed nothing.
    let mut g = guest();
    g.write_bytes(
        0x1000,
        &[
            0xec, 0x84, 0xc0, 0x75, 0x05, 0xee, 0xee, 0x90, 0x90, 0x90, 0xf4,
        ],
    );
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    run_in_exits(&mut h, &mut g, 100);
    let s = h.stats();
    assert_eq!(s.translations_built, 1);
    // Translated at the third exit; after IDLE_SITE_RUNS runs absorbed nothing,
    // the rest of the exits run none.
    assert_eq!(s.clusters_run, crate::stats::IDLE_SITE_RUNS);
    assert_eq!(
        s.clusters_skipped_idle,
        100 - 2 - crate::stats::IDLE_SITE_RUNS
    );
    assert!(s.exit_sites[&0x1000].idle());
    assert_eq!(s.in_cluster_exiting, 0);
    // One exit in IDLE_SITE_RETRY still tries.
    run_in_exits(&mut h, &mut g, IDLE_SITE_RETRY as usize);
    assert_eq!(h.stats().clusters_run, crate::stats::IDLE_SITE_RUNS + 1);

    // Clusters that absorb keep running.
    let mut g = guest();
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    run_in_exits(&mut h, &mut g, 100);
    assert_eq!(h.stats().clusters_run, 98);
    assert_eq!(h.stats().clusters_skipped_idle, 0);
}

#[test]
fn a_site_still_learning_destinations_is_not_idle() {
    let mut s = ExitStats::default();
    for i in 0..100u64 {
        s.count_site(0x1000, Some(ExitReason::IoOut), true);
        // Every tenth run's guard miss teaches a new destination.
        s.count_cluster_end(0x1000, 0, 0x2000, i % 10 == 0);
    }
    assert!(!s.exit_sites[&0x1000].idle());
    for _ in 0..crate::stats::IDLE_SITE_RUNS {
        s.count_site(0x1000, Some(ExitReason::IoOut), true);
        s.count_cluster_end(0x1000, 0, 0x2000, false);
    }
    assert!(s.exit_sites[&0x1000].idle());
}

/// 0x2000 out dx,al ; 0x2001 in al,dx ; test al,al ; jz 0x200a ; out dx,al ;
/// loop 0x2001 ; hlt ; 0x200a jmp $. Translated at the first OUT, the region
/// loops through the IN (0x2001): entered there, it absorbs two exits a round
/// while ECX lasts, none when AL is 0.
const LOOP_CODE: [u8; 12] = [
    0xee, 0xec, 0x84, 0xc0, 0x74, 0x04, 0xee, 0xe2, 0xf8, 0xf4, 0xeb, 0xfe,
];

fn loop_guest() -> TestGuest {
    let mut g = guest();
    g.write_bytes(0x2000, &LOOP_CODE);
    g
}

/// The loop's region entered at `rip` with at most `max_insns` instructions.
fn loop_region(rip: u64, max_insns: usize) -> crate::ir::Cluster {
    let config = TranslatorConfig {
        max_cluster_insns: max_insns,
        ..TranslatorConfig::default()
    };
    let code = &LOOP_CODE[(rip - 0x2000) as usize..];
    translator::translate(code, rip, Bitness::B32, &ExitPolicy::default(), &config).unwrap()
}

/// An exit at the loop's IN completed with AL = `al` and ECX = `ecx`, and the
/// cluster the handler picks run: (its entry, the exits it absorbed).
fn exit_at_the_in(h: &mut ExitHandler, g: &mut TestGuest, al: u64, ecx: u64) -> (u64, u64) {
    g.state.gpr[1] = ecx;
    let Next::RunCluster { start } = h.handle(&in_exit(), 0x2001, g).next else {
        return (0, 0);
    };
    g.state.gpr[0] = al;
    g.state.rip = 0x2002;
    (start, h.run_cluster(start, g).exiting)
}

#[test]
fn an_exit_with_a_small_own_translation_inside_a_loop_runs_the_one_that_absorbs_more() {
    // The IN's own translation (in, test, jz, out) stops before the LOOP: one exit
    // a run. The loop's translation, entered at the IN, goes round it.
    let own = loop_region(0x2001, 4);
    assert!(own.back_edges.is_empty() && own.exiting_count() == 2);
    let mut h = ExitHandler::new(Mode::Aot, ExitPolicy::default());
    h.cache_mut()
        .insert(loop_region(0x2000, 64), Origin::Aot)
        .unwrap();
    h.cache_mut().insert(own, Origin::Aot).unwrap();
    let mut g = loop_guest();
    let runs: alloc::vec::Vec<_> = (0..4)
        .map(|_| exit_at_the_in(&mut h, &mut g, 0x41, 3))
        .collect();
    // Each tried once (its own first), then the loop's, which absorbed more.
    assert_eq!(runs[0], (0x2001, 1));
    assert_eq!(runs[1].0, 0x2000);
    assert!(runs[1].1 >= 5, "{runs:?}");
    assert_eq!(runs[2..], [runs[1], runs[1]]);
}

#[test]
fn a_containing_translation_that_absorbs_exits_is_not_replaced_after_one_poor_run() {
    // As KVM's coalescing makes it: the exits the loop leaves are at its IN. The
    // first run from there leaves at once (AL = 0); the next go round the loop.
    let mut h = ExitHandler::new(Mode::AotDynamic, ExitPolicy::default());
    h.cache_mut()
        .insert(loop_region(0x2000, 64), Origin::Aot)
        .unwrap();
    let mut g = loop_guest();
    assert_eq!(exit_at_the_in(&mut h, &mut g, 0, 3), (0x2000, 0));
    for _ in 0..6 {
        let (start, absorbed) = exit_at_the_in(&mut h, &mut g, 0x41, 3);
        assert_eq!(start, 0x2000, "{:?}", h.stats());
        assert!(absorbed >= 5);
    }
    assert_eq!(h.stats().translations_built, 0);
}
