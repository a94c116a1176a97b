//! Where the translator reads guest code: a [`CodeSource`]. A region over the
//! control-flow graph reaches code anywhere (a callee, a block after the function's
//! end), so the translator asks for bytes by address rather than taking one slice.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::ir::GprIndex;

/// Guest code, and what is known of where its indirect branches go.
pub trait CodeSource {
    /// Copies the guest's code bytes at `addr` into `buf` and returns how many could
    /// be read from `addr` on (0: none; fewer than `buf.len()` where the code ends or
    /// stops being readable).
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize;

    /// Destinations known for the indirect CALL or JMP, or the RET, at `at`: seen
    /// at run time, or resolved from the ELF. The translator builds one guard per
    /// destination (see [`crate::ir::Guard`]); an empty list leaves the guard with
    /// nothing to accept, so the run stops there and the hypervisor can learn.
    fn indirect_targets(&self, _at: u64) -> &[u64] {
        &[]
    }

    /// What a direct CALL or JMP to `addr` really does, when `addr` is a known thunk
    /// (Linux's `__x86_indirect_thunk_<reg>` and `__x86_return_thunk`): the
    /// translator then treats the branch as the indirect CALL/JMP or the RET the
    /// thunk stands for, guarded like one. `None`: an ordinary destination.
    fn thunk(&mut self, _addr: u64) -> Option<Thunk> {
        None
    }

    /// The general registers at the exit the region is entered at, for a
    /// translation made at run time (the gap rule's page estimate,
    /// [`super::gap_pages`]); `None` ahead of time.
    fn entry_registers(&self) -> Option<[u64; 16]> {
        None
    }
}

/// Code held in one slice at a known address (an ELF section, a test's bytes).
#[derive(Clone, Copy, Debug)]
pub struct Bytes<'a> {
    /// Guest address of `bytes[0]`.
    pub base: u64,
    pub bytes: &'a [u8],
}

impl CodeSource for Bytes<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        let Some(off) = addr.checked_sub(self.base) else {
            return 0;
        };
        let Ok(off) = usize::try_from(off) else {
            return 0;
        };
        let Some(from) = self.bytes.get(off..) else {
            return 0;
        };
        let n = from.len().min(buf.len());
        buf[..n].copy_from_slice(&from[..n]);
        n
    }
}

/// Several pieces of code at their addresses (every executable section of an ELF),
/// plus known indirect destinations.
#[derive(Clone, Debug, Default)]
pub struct Pieces<'a> {
    /// (address, bytes), in any order; pieces do not overlap.
    pieces: Vec<(u64, &'a [u8])>,
    targets: BTreeMap<u64, Vec<u64>>,
    thunks: BTreeMap<u64, Thunk>,
}

impl<'a> Pieces<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the code `bytes` at `base`.
    pub fn add(&mut self, base: u64, bytes: &'a [u8]) {
        self.pieces.push((base, bytes));
    }

    /// Records that the indirect branch or RET at `at` may go to `to`.
    pub fn add_target(&mut self, at: u64, to: u64) {
        let list = self.targets.entry(at).or_default();
        if !list.contains(&to) {
            list.push(to);
        }
    }
}

impl CodeSource for Pieces<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        self.read_at(addr, buf)
    }

    fn indirect_targets(&self, at: u64) -> &[u64] {
        self.targets.get(&at).map_or(&[], |v| v.as_slice())
    }

    fn thunk(&mut self, addr: u64) -> Option<Thunk> {
        self.thunks.get(&addr).copied()
    }
}

impl Pieces<'_> {
    /// [`CodeSource::read`] without `&mut`: one `Pieces` can serve many
    /// translations at once (the AOT pass shares one across its threads through
    /// `&Pieces`, which is a `CodeSource` too).
    pub fn read_at(&self, addr: u64, buf: &mut [u8]) -> usize {
        // Pieces do not overlap: the first that holds `addr` is the only one.
        self.pieces
            .iter()
            .find(|&&(base, bytes)| {
                addr.checked_sub(base)
                    .is_some_and(|off| off < bytes.len() as u64)
            })
            .map_or(0, |&(base, bytes)| Bytes { base, bytes }.read(addr, buf))
    }

    /// Records that a CALL or JMP to `addr` is the thunk `thunk` (see [`Thunk`]).
    pub fn add_thunk(&mut self, addr: u64, thunk: Thunk) {
        self.thunks.insert(addr, thunk);
    }

    /// Records many `(at, to)` pairs at once (faster than [`Pieces::add_target`]
    /// one by one when they come sorted, as the AOT pass's do).
    pub fn add_targets(&mut self, pairs: &[(u64, u64)]) {
        let mut groups: Vec<(u64, Vec<u64>)> = Vec::new();
        for &(at, to) in pairs {
            match groups.last_mut() {
                Some((a, list)) if *a == at => {
                    if !list.contains(&to) {
                        list.push(to);
                    }
                }
                _ => groups.push((at, alloc::vec![to])),
            }
        }
        if self.targets.is_empty() {
            // Built in bulk from sorted keys; duplicates (unsorted input) merge below.
            let sorted = groups.windows(2).all(|w| w[0].0 < w[1].0);
            if sorted {
                self.targets = groups.into_iter().collect();
                return;
            }
        }
        for (at, list) in groups {
            for to in list {
                self.add_target(at, to);
            }
        }
    }

    /// Every branch site with known destinations, by address.
    pub fn targets(&self) -> impl Iterator<Item = (u64, &[u64])> {
        self.targets.iter().map(|(&at, v)| (at, v.as_slice()))
    }

    /// Every known thunk, by address.
    pub fn thunks(&self) -> impl Iterator<Item = (u64, Thunk)> + '_ {
        self.thunks.iter().map(|(&a, &t)| (a, t))
    }
}

impl CodeSource for &Pieces<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        self.read_at(addr, buf)
    }

    fn indirect_targets(&self, at: u64) -> &[u64] {
        (**self).indirect_targets(at)
    }

    fn thunk(&mut self, addr: u64) -> Option<Thunk> {
        self.thunks.get(&addr).copied()
    }
}

/// What a direct CALL or JMP to a known thunk does (Linux's retpolines and return
/// thunks, found by the AOT pass by symbol name or by their bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Thunk {
    /// `__x86_indirect_thunk_<reg>` (or code equivalent to it): a `call` to it is
    /// `call *%reg`, a `jmp` to it is `jmp *%reg`, at the width of the code. Its
    /// known destinations are [`CodeSource::indirect_targets`] of the CALL or JMP.
    Indirect(GprIndex),
    /// `__x86_return_thunk` (code starting with RET): a `jmp` to it is a RET at the
    /// JMP's address; its known destinations are `indirect_targets` of the JMP.
    Return,
}
