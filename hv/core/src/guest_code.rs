//! The run-time translator's view of the guest: its code read through its page
//! tables, and the destinations of indirect branches and returns that clusters saw
//! (a guard that found no match reports where control went; the next translation
//! of that cluster accepts it).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::engine;
use crate::exit::bitness_of;
use crate::guest::{CpuState, Guest};
use crate::ir::Bitness;
use crate::translator::CodeSource;

/// Most destinations kept per indirect branch or RET (each adds a guard and code).
/// A new one replaces the oldest: the destinations of a driver's start-up probes
/// give way to those of its steady state.
pub const MAX_TARGETS_PER_SITE: usize = 4;

/// Most destinations learned per site over a run: past this the site is treated as
/// megamorphic and learns no more, so alternating destinations cannot make the
/// hypervisor translate the same region again and again.
pub const MAX_LEARNED_PER_SITE: u32 = 16;

/// Destinations seen at run time, by the RIP of the branch or RET.
#[derive(Clone, Debug, Default)]
pub struct LearnedTargets {
    map: BTreeMap<u64, (Vec<u64>, u32)>,
}

impl LearnedTargets {
    /// Records that the instruction at `at` went to `to`. True if that is new and
    /// kept (the site has learned fewer than [`MAX_LEARNED_PER_SITE`]).
    pub fn learn(&mut self, at: u64, to: u64) -> bool {
        let (list, learned) = self.map.entry(at).or_default();
        if list.contains(&to) || *learned >= MAX_LEARNED_PER_SITE {
            return false;
        }
        if list.len() >= MAX_TARGETS_PER_SITE {
            list.remove(0);
        }
        list.push(to);
        *learned += 1;
        true
    }

    /// What is known for the instruction at `at`, oldest first.
    pub fn of(&self, at: u64) -> &[u64] {
        self.map.get(&at).map_or(&[], |(v, _)| v.as_slice())
    }

    /// Sites with at least one destination.
    pub fn sites(&self) -> usize {
        self.map.len()
    }
}

/// Guest code read through the guest's page tables in its current mode.
pub struct GuestCode<'a, G: Guest + ?Sized> {
    pub guest: &'a mut G,
    pub state: &'a CpuState,
    pub learned: &'a LearnedTargets,
}

impl<G: Guest + ?Sized> CodeSource for GuestCode<'_, G> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        fetch_code(self.guest, self.state, addr, buf)
    }

    fn indirect_targets(&self, at: u64) -> &[u64] {
        self.learned.of(at)
    }
}

/// Read guest code at `rip` (CS-relative) through the guest's page tables into
/// `buf`; returns how many bytes could be read (stops at the first unmapped byte).
pub fn fetch_code<G: Guest + ?Sized>(
    guest: &mut G,
    state: &CpuState,
    rip: u64,
    buf: &mut [u8],
) -> usize {
    let mmu = engine::Mmu::new(state, 52);
    let base = match bitness_of(state) {
        Bitness::B64 => 0,
        _ => state.segment(crate::ir::Seg::Cs).base,
    };
    let mut done = 0;
    while done < buf.len() {
        let la = base.wrapping_add(rip).wrapping_add(done as u64);
        let mut walks = 0;
        let Ok(pa) = mmu.translate(guest, la, engine::Access::Fetch, &mut walks) else {
            break;
        };
        let in_page = (0x1000 - (la & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if guest.read_phys(pa, &mut buf[done..done + n]).is_err() {
            break;
        }
        done += n;
    }
    done
}
