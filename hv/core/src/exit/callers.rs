//! Caller translations: one translation of a region for each caller of the
//! function it is entered in.
//!
//! A small function that exits (Linux's `io_serial_out`: `out %al,(%dx); ret`) is
//! called from many places, and what follows its RET, where the cluster goes on,
//! is different for each. One translation for all of them must learn every
//! caller at its RET guard, and keeps only a few ([`MAX_TARGETS_PER_SITE`]):
//! during a boot the callers seen first take the slots, and the loop that later
//! calls the function thousands of times (the 8250 transmit loop) is learned too
//! late or never. So once a run of a site's translation has returned out of the
//! function (its RET guard missed with the return address at a fixed offset
//! above the stack pointer of the exit), the handler reads the return address at
//! that offset at each exit there, and runs a translation made for that caller:
//! its RET guard expects the caller from the start, and what it learns after is
//! that caller's alone. A region has translations for at most
//! [`MAX_CALLERS_PER_SITE`] callers at a time; a caller without one runs the
//! translation for every caller, until it has exited there often enough to take
//! the place of the least used ([`EXITS_TO_REPLACE`]).
//!
//! The return address read at an exit only chooses a translation: every
//! translation checks where its RET goes, so a wrong guess costs a guard miss,
//! never a wrong result.
//!
//! [`MAX_TARGETS_PER_SITE`]: crate::guest_code::MAX_TARGETS_PER_SITE

use alloc::collections::BTreeMap;

use super::{ExitHandler, Way};
use crate::engine;
use crate::guest::Guest;
use crate::guest_code::{bitness_of, read_u64, RegionKey};
use crate::ir::{Bitness, RSP};

/// Most callers one region has translations for at a time.
pub const MAX_CALLERS_PER_SITE: usize = 16;

/// Exits from a caller without a translation, at a site whose translations are
/// all taken, after which it takes the place of the least used one. A driver's
/// start-up calls give way to its steady state, and callers that take turns
/// cost one translation per this many exits at most, never one per exit.
pub const EXITS_TO_REPLACE: u32 = 16;

/// Most callers waiting for a place counted at one site; past it the counts
/// start again (a site called from everywhere stays on its common translation).
const MAX_WAITING: usize = 64;

/// Farthest above the exit's stack pointer a return address is looked for: the
/// frame of a small function (saved registers, a few locals).
const MAX_RETURN_SLOT: u64 = 256;

/// Where the return address of the function a site is in lies, as a run showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ReturnSlot {
    /// The RET (or the site whose destinations stand for it: the JMP into a
    /// return thunk) that returned out of the function.
    pub at: u64,
    /// Its offset above the stack pointer at the exit.
    pub offset: u64,
}

/// One site's callers.
#[derive(Clone, Debug)]
pub(super) struct SiteCallers {
    pub slot: ReturnSlot,
    /// Callers with a place, by return address.
    placed: BTreeMap<u64, Place>,
    /// Exits from callers without a place, since the last replacement.
    waiting: BTreeMap<u64, u32>,
}

/// A caller's place at a site.
#[derive(Clone, Copy, Debug)]
struct Place {
    /// Whether its translation was made (one that failed is not tried again
    /// while it keeps its place).
    made: bool,
    /// Exits from it since the last replacement.
    runs: u32,
}

/// What to do for an exit from one caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CallerPlan {
    /// Its translation is there.
    Run,
    /// Make one (in place of `evict`'s, if set).
    Make { evict: Option<u64> },
    /// Run the translation for every caller.
    Common,
}

impl SiteCallers {
    fn new(slot: ReturnSlot) -> Self {
        SiteCallers {
            slot,
            placed: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// What an exit from `caller` runs; counts it.
    pub fn plan(&mut self, caller: u64) -> CallerPlan {
        if let Some(p) = self.placed.get_mut(&caller) {
            p.runs += 1;
            return if p.made {
                CallerPlan::Run
            } else {
                CallerPlan::Common
            };
        }
        if self.placed.len() < MAX_CALLERS_PER_SITE {
            return CallerPlan::Make { evict: None };
        }
        if self.waiting.len() >= MAX_WAITING && !self.waiting.contains_key(&caller) {
            self.waiting.clear();
        }
        let n = self.waiting.entry(caller).or_insert(0);
        *n += 1;
        if *n < EXITS_TO_REPLACE {
            return CallerPlan::Common;
        }
        let victim = self
            .placed
            .iter()
            .min_by_key(|(_, p)| p.runs)
            .map(|(&c, _)| c);
        CallerPlan::Make { evict: victim }
    }

    /// `caller` took its place (`made`: with a translation); a replacement starts
    /// the counts again.
    pub fn placed(&mut self, caller: u64, made: bool, evicted: Option<u64>) {
        if let Some(v) = evicted {
            self.placed.remove(&v);
            self.waiting.clear();
            for p in self.placed.values_mut() {
                p.runs = 0;
            }
        }
        self.waiting.remove(&caller);
        self.placed.insert(caller, Place { made, runs: 1 });
    }
}

impl SiteCallers {
    /// `caller`'s translation is gone (its code changed): it may be made again.
    pub fn unplace(&mut self, caller: u64) {
        self.placed.remove(&caller);
    }
}

/// The callers of each site whose return slot is known.
#[derive(Clone, Debug, Default)]
pub(super) struct Callers {
    by_site: BTreeMap<u64, SiteCallers>,
}

impl Callers {
    pub fn of(&mut self, site: u64) -> Option<&mut SiteCallers> {
        self.by_site.get_mut(&site)
    }

    /// The first slot found for a site is kept: it is where its function returns.
    pub fn note(&mut self, site: u64, slot: ReturnSlot) {
        self.by_site
            .entry(site)
            .or_insert_with(|| SiteCallers::new(slot));
    }
}

impl ExitHandler {
    /// After the exit at `rip` (a site whose return slot is known, in dynamic
    /// modes): the translation for the caller its function returns to, made now if
    /// there is none yet and the region has room. `None` leaves the exit to the
    /// translation for every caller.
    pub(super) fn enter_for_caller<G: Guest + ?Sized>(
        &mut self,
        rip: u64,
        guest: &mut G,
    ) -> Option<super::Next> {
        let slot = self.callers.of(rip)?.slot;
        let state = guest.state();
        if bitness_of(&state) != Bitness::B64 {
            return None;
        }
        let caller = read_u64(
            guest,
            &state,
            state.gpr[RSP as usize].wrapping_add(slot.offset),
        )?;
        if !engine::cr::canonical(caller, 48) {
            return None;
        }
        let evict = match self.callers.of(rip)?.plan(caller) {
            CallerPlan::Run => return Some(self.enter(rip, Way::Own, rip, Some(caller))),
            CallerPlan::Common => return None,
            CallerPlan::Make { evict } => evict,
        };
        if let Some(v) = evict {
            self.cache.remove_for_caller(rip, v);
            self.learned.forget(RegionKey {
                entry: rip,
                caller: Some(v),
            });
        }
        let region = RegionKey {
            entry: rip,
            caller: Some(caller),
        };
        // The RET that returned out of the function goes to this caller.
        self.learned.learn(region, slot.at, caller);
        let made = self.build(region, &state, guest);
        if let Some(site) = self.callers.of(rip) {
            site.placed(caller, made, evict);
        }
        if !made {
            self.stats.translation_failures += 1;
            return None;
        }
        self.stats.translations_for_callers += 1;
        Some(self.enter(rip, Way::Own, rip, Some(caller)))
    }

    /// A run entered at its own translation's entry `site` stopped at a RET guard
    /// (`ret_site` is where its destinations are learned) with the stack pointer
    /// `rsp_at_ret`, having started with `rsp_at_entry`: a RET at or above the
    /// exit's stack pointer returns out of the site's function, and the return
    /// address lies at that offset at every exit there.
    pub(super) fn note_return_slot(
        &mut self,
        site: u64,
        ret_site: u64,
        rsp_at_entry: u64,
        rsp_at_ret: u64,
    ) {
        let offset = rsp_at_ret.wrapping_sub(rsp_at_entry);
        if offset < MAX_RETURN_SLOT && offset.is_multiple_of(8) {
            let slot = ReturnSlot {
                at: ret_site,
                offset,
            };
            self.callers.note(site, slot);
        }
    }
}
