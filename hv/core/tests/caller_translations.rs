//! Caller translations (`exit/callers.rs`): a small exiting function called from
//! many places gets a translation for each caller, so that its clusters go on
//! into every caller, not only the few one RET guard keeps.

use avex_core::arch::pte;
use avex_core::engine::test_guest::TestGuest;
use avex_core::exit::{Exit, ExitHandler, Mode, Next};
use avex_core::guest_code::MAX_TARGETS_PER_SITE;
use avex_core::ir::*;
use avex_core::policy::ExitPolicy;

/// The leaf: `out %al,(%dx); ret`.
const LEAF: u64 = 0x2000;
/// Caller `k` resumes at `CALLERS + k * 0x100`: `out %al,(%dx); hlt`.
const CALLERS: u64 = 0x3000;
const STACK_TOP: u64 = 0x8000;

fn guest(callers: u64) -> TestGuest {
    let mut g = TestGuest::long_mode(4 << 20);
    g.map_range(0, 0, 0x10000, pte::P | pte::RW);
    g.write_bytes(LEAF, &[0xee, 0xc3]);
    for k in 0..callers {
        g.write_bytes(CALLERS + k * 0x100, &[0xee, 0xf4]);
    }
    g.state.gpr[RDX as usize] = 0x3f8;
    g
}

fn out_exit() -> Exit {
    Exit::PortIo {
        port: 0x3f8,
        size: 1,
        write: true,
        value: 0x41,
    }
}

/// One exit of the leaf's OUT, called from caller `k` (its return address on top
/// of the stack), and the cluster run after it as a backend does them: the exits
/// the run absorbed.
fn call_from(h: &mut ExitHandler, g: &mut TestGuest, k: u64) -> u64 {
    let caller = CALLERS + k * 0x100;
    g.write_bytes(STACK_TOP - 8, &caller.to_le_bytes());
    g.state.gpr[RSP as usize] = STACK_TOP - 8;
    g.state.rip = LEAF;
    let r = h.handle(&out_exit(), LEAF, g);
    let Next::RunCluster { start } = r.next else {
        return 0;
    };
    g.state.rip = LEAF + 1;
    let end = h.run_cluster(start, g);
    if end.exiting > 0 {
        // It went on into the caller: back in it, at its HLT, stack popped.
        assert!((caller..caller + 4).contains(&end.rip), "{end}");
        assert_eq!(g.state.gpr[RSP as usize], STACK_TOP);
    }
    end.exiting
}

/// Calls from `callers` callers in turn, `rounds` times: what the runs of the
/// last round absorbed.
fn round_robin(h: &mut ExitHandler, callers: u64, rounds: u64) -> Vec<u64> {
    let mut g = guest(callers);
    let mut last = Vec::new();
    for round in 0..rounds {
        for k in 0..callers {
            let absorbed = call_from(h, &mut g, k);
            if round + 1 == rounds {
                last.push(absorbed);
            }
        }
    }
    last
}

#[test]
fn a_leaf_called_from_more_places_than_a_guard_keeps_goes_on_into_every_caller() {
    // More callers than one RET guard keeps destinations for, called in turn:
    // one translation for all would miss at its RET for some of them every round.
    let callers = MAX_TARGETS_PER_SITE as u64 + 2;
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let last = round_robin(&mut h, callers, 4);
    assert_eq!(last, vec![1; callers as usize], "{:#?}", h.stats());
    assert_eq!(h.stats().translations_for_callers, callers);
}

#[test]
fn a_site_gets_translations_for_a_bounded_number_of_callers() {
    use avex_core::exit::MAX_CALLERS_PER_SITE;
    let callers = MAX_CALLERS_PER_SITE as u64 + 4;
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let last = round_robin(&mut h, callers, 3);
    assert_eq!(
        h.stats().translations_for_callers,
        MAX_CALLERS_PER_SITE as u64
    );
    // The callers with a translation of their own go on into the caller.
    let served = last.iter().filter(|&&a| a == 1).count();
    assert!(served >= MAX_CALLERS_PER_SITE, "{last:?}");
}

#[test]
fn without_run_time_translation_there_are_no_caller_translations() {
    let mut h = ExitHandler::new(Mode::Aot, ExitPolicy::default());
    let last = round_robin(&mut h, 3, 3);
    assert_eq!(last, vec![0; 3]);
    assert_eq!(h.stats().translations_for_callers, 0);
}

#[test]
fn a_caller_translation_whose_code_changed_is_dropped_and_made_again() {
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let mut g = guest(2);
    for _ in 0..4 {
        call_from(&mut h, &mut g, 0);
        call_from(&mut h, &mut g, 1);
    }
    let made = h.stats().translations_for_callers;
    // Caller 1 now writes a different port after the call: `out %al,$0x80`.
    g.write_bytes(CALLERS + 0x100, &[0xe6, 0x80, 0xf4]);
    let _ = call_from(&mut h, &mut g, 1);
    assert!(h.stats().stale_dropped >= 1, "{:#?}", h.stats());
    let absorbed = call_from(&mut h, &mut g, 1);
    assert_eq!(absorbed, 1);
    assert_eq!(h.stats().translations_for_callers, made + 1);
    assert!(g.outs().iter().any(|&(port, _, _)| port == 0x80));
}

#[test]
fn a_caller_that_keeps_exiting_takes_the_place_of_the_least_used() {
    use avex_core::exit::{EXITS_TO_REPLACE, MAX_CALLERS_PER_SITE};
    let full = MAX_CALLERS_PER_SITE as u64;
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
    let mut g = guest(full + 1);
    // Every place taken (the first exits also find where the return address is).
    for _ in 0..2 {
        for k in 0..full {
            call_from(&mut h, &mut g, k);
        }
    }
    assert_eq!(h.stats().translations_for_callers, full);
    // A new caller runs the common translation until it has exited there
    // EXITS_TO_REPLACE times, then has its own.
    let newcomer: Vec<u64> = (0..EXITS_TO_REPLACE)
        .map(|_| call_from(&mut h, &mut g, full))
        .collect();
    assert_eq!(h.stats().translations_for_callers, full + 1);
    assert_eq!(newcomer.last(), Some(&1), "{newcomer:?}");
    // It replaced one: still a place per caller at most.
    let last = round_robin(&mut h, full + 1, 1);
    assert!(last.iter().filter(|&&a| a == 1).count() >= full as usize - 1);
}

#[test]
fn every_translation_is_timed_caller_translations_and_rebuilds_too() {
    use std::sync::atomic::{AtomicU64, Ordering};
    // A clock that moves 1000 ns each time it is read.
    static NOW: AtomicU64 = AtomicU64::new(0);
    fn clock() -> u64 {
        NOW.fetch_add(1000, Ordering::Relaxed)
    }
    let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default()).with_clock(clock);
    round_robin(&mut h, 3, 3);
    let s = h.stats();
    let builds = s.translations_built + s.translations_rebuilt + s.translations_for_callers;
    assert!(
        s.translations_for_callers > 0 && s.translations_rebuilt > 0,
        "{s:#?}"
    );
    assert!(
        s.translate_ns >= 1000 * builds,
        "{} ns for {builds} builds",
        s.translate_ns
    );
}
