//! Where the translator reads guest code: a [`CodeSource`]. A region over the
//! control-flow graph reaches code anywhere (a callee, a block after the function's
//! end), so the translator asks for bytes by address rather than taking one slice.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

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
        self.pieces
            .iter()
            .map(|&(base, bytes)| Bytes { base, bytes }.read(addr, buf))
            .max()
            .unwrap_or(0)
    }

    fn indirect_targets(&self, at: u64) -> &[u64] {
        self.targets.get(&at).map_or(&[], |v| v.as_slice())
    }
}
