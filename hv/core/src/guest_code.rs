//! The run-time translator's view of the guest: its code read through its page
//! tables, and the destinations of indirect branches and returns that clusters saw
//! (a guard that found no match reports where control went; the next translation
//! of that cluster accepts it).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::engine;
use crate::guest::{CpuState, Guest};
use crate::ir::Bitness;
use crate::translator::source::Thunk;
use crate::translator::{resolve_thunk, CodeSource};

/// Most destinations kept per indirect branch or RET (each adds a guard and code).
/// A new one replaces the oldest: the destinations of a driver's start-up probes
/// give way to those of its steady state.
pub const MAX_TARGETS_PER_SITE: usize = 4;

/// Most destinations learned per site over a run: past this the site is treated as
/// megamorphic and learns no more, so alternating destinations cannot make the
/// hypervisor translate the same region again and again.
pub const MAX_LEARNED_PER_SITE: u32 = 16;

/// Destinations seen at run time, by the translation they were seen in (its
/// [`RegionKey`]) and the RIP of the branch or RET. Per region, because one RET
/// serves many functions: Linux returns through one `__x86_return_thunk`, whose RET
/// goes back to every caller in the kernel, while in the region of one driver
/// function it goes back to that function's few callers; and per caller where a
/// region has a translation for each ([`crate::exit`]), so that one caller's
/// destinations never take another's slots.
#[derive(Clone, Debug, Default)]
pub struct LearnedTargets {
    map: BTreeMap<(RegionKey, u64), (Vec<u64>, u32)>,
}

/// Which translation of a region: its entry, and the return address it was made
/// for (the caller of the function the region is entered in), or `None` for the
/// translation that serves every caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RegionKey {
    pub entry: u64,
    pub caller: Option<u64>,
}

impl RegionKey {
    /// The translation of the region entered at `entry` for every caller.
    pub fn any_caller(entry: u64) -> Self {
        RegionKey {
            entry,
            caller: None,
        }
    }
}

impl LearnedTargets {
    /// Records that the instruction at `at` went to `to`. True if that is new and
    /// kept (the site has learned fewer than [`MAX_LEARNED_PER_SITE`]).
    pub fn learn(&mut self, region: RegionKey, at: u64, to: u64) -> bool {
        let (list, learned) = self.map.entry((region, at)).or_default();
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

    /// What is known for the instruction at `at` in the translation `region`,
    /// oldest first.
    pub fn of(&self, region: RegionKey, at: u64) -> &[u64] {
        self.map
            .get(&(region, at))
            .map_or(&[], |(v, _)| v.as_slice())
    }

    /// Forget what the translation `region` learned (it is gone).
    pub fn forget(&mut self, region: RegionKey) {
        self.map.retain(|(r, _), _| *r != region);
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
    /// The translation being made.
    pub region: RegionKey,
}

impl<G: Guest + ?Sized> CodeSource for GuestCode<'_, G> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        fetch_code(self.guest, self.state, addr, buf)
    }

    fn indirect_targets(&self, at: u64) -> &[u64] {
        self.learned.of(self.region, at)
    }

    /// Thunks by their bytes in guest memory, as the kernel left them after its
    /// boot-time patching (there are no symbols at run time).
    fn thunk(&mut self, addr: u64) -> Option<Thunk> {
        let bitness = bitness_of(self.state);
        resolve_thunk(self, addr, bitness)
    }

    /// The registers at the exit: the translation is made right after it.
    fn entry_registers(&self) -> Option<[u64; 16]> {
        Some(self.state.gpr)
    }
}

/// Read guest code at `rip` (CS-relative) through the guest's page tables into
/// `buf`; returns how many bytes could be read (stops at the first unmapped byte,
/// and outside 64-bit code at the CS limit, past which the CPU fetches nothing).
pub fn fetch_code<G: Guest + ?Sized>(
    guest: &mut G,
    state: &CpuState,
    rip: u64,
    buf: &mut [u8],
) -> usize {
    let cs = state.segment(crate::ir::Seg::Cs);
    let (base, len) = match bitness_of(state) {
        Bitness::B64 => (0, buf.len()),
        _ => {
            let room = (u64::from(cs.limit) + 1).saturating_sub(rip);
            (
                cs.base,
                buf.len().min(usize::try_from(room).unwrap_or(usize::MAX)),
            )
        }
    };
    read_linear(
        guest,
        state,
        base.wrapping_add(rip),
        &mut buf[..len],
        engine::Access::Fetch,
    )
}

/// The 8 bytes at linear address `la`, read as a data load through the guest's
/// page tables, or `None` where they are not mapped readable.
pub fn read_u64<G: Guest + ?Sized>(guest: &mut G, state: &CpuState, la: u64) -> Option<u64> {
    let mut bytes = [0u8; 8];
    let n = read_linear(guest, state, la, &mut bytes, engine::Access::Read);
    (n == bytes.len()).then(|| u64::from_le_bytes(bytes))
}

/// Read `buf.len()` bytes from linear address `la` through the guest's page
/// tables, a page at a time, as an `access`; returns how many were read (stops at
/// the first byte not mapped for it).
fn read_linear<G: Guest + ?Sized>(
    guest: &mut G,
    state: &CpuState,
    la: u64,
    buf: &mut [u8],
    access: engine::Access,
) -> usize {
    let mmu = engine::Mmu::new(state, 52);
    let mut done = 0;
    while done < buf.len() {
        let at = la.wrapping_add(done as u64);
        let mut walks = 0;
        let Ok(pa) = mmu.translate(guest, at, access, &mut walks) else {
            break;
        };
        let n = ((0x1000 - (at & 0xfff)) as usize).min(buf.len() - done);
        if guest.read_phys(pa, &mut buf[done..done + n]).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// The code size of the guest's current mode.
pub fn bitness_of(state: &CpuState) -> Bitness {
    let cs = state.segment(crate::ir::Seg::Cs);
    if state.efer & crate::arch::efer::LMA != 0 && cs.long() {
        Bitness::B64
    } else if state.cr0 & crate::arch::cr0::PE != 0 && cs.db() {
        Bitness::B32
    } else {
        Bitness::B16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_guest::TestGuest;
    use crate::engine::Paging;

    #[test]
    fn code_is_fetched_up_to_the_cs_limit_only() {
        let mut g = TestGuest::protected32(1 << 20, Paging::None);
        g.write_bytes(0x1000, &[0xee; 16]);
        let mut buf = [0u8; 16];
        let fetch = |g: &mut TestGuest, rip, buf: &mut [u8]| {
            let st = g.state.clone();
            fetch_code(g, &st, rip, buf)
        };
        assert_eq!(fetch(&mut g, 0x1000, &mut buf), 16);
        g.state.seg[crate::ir::Seg::Cs as usize].limit = 0x1003;
        assert_eq!(fetch(&mut g, 0x1000, &mut buf), 4);
        assert_eq!(fetch(&mut g, 0x1004, &mut buf), 0);
        // Real mode: IP 0xfffe leaves 2 bytes below the 64K limit.
        let mut g = TestGuest::new(1 << 20);
        assert_eq!(fetch(&mut g, 0xfffe, &mut buf), 2);
    }
}
