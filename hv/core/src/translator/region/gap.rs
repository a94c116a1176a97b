//! The gap rule's state along one path of a region ([`super`]): how far the path
//! is from its last exiting instruction, in instructions and memory pages.

use alloc::vec::Vec;

use crate::ir::Op;
use crate::translator::RegCopies;

/// A path's gap since its last exiting instruction: the instructions, and the
/// memory pages its gap fillers touch (as far as the code tells: see
/// [`crate::translator::gap_pages`]), sorted; `None` when a gap filler's accesses have no bound.
/// `regs` follows register copies along the path, across exiting instructions too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Gap {
    pub insns: usize,
    pages: Option<Vec<u64>>,
    regs: RegCopies,
}

impl Gap {
    pub const EXIT: Gap = Gap {
        insns: 0,
        pages: Some(Vec::new()),
        regs: RegCopies::FRESH,
    };

    /// The gap after a gap filler `op` (`entry`: the registers at the region's
    /// entry, when known).
    pub fn then(&self, op: &Op, entry: Option<&[u64; 16]>) -> Gap {
        let pages = self.pages.as_ref().and_then(|held| {
            let mut pages = held.clone();
            for p in crate::translator::gap_pages(op, &self.regs, entry)? {
                if let Err(at) = pages.binary_search(&p) {
                    pages.insert(at, p);
                }
            }
            Some(pages)
        });
        Gap {
            insns: self.insns + 1,
            pages,
            regs: self.regs.after(op),
        }
    }

    /// The gap right after an exiting instruction `op`: none, with the copies
    /// the path made still known.
    pub fn after_exit(&self, op: &Op) -> Gap {
        Gap {
            regs: self.regs.after(op),
            ..Gap::EXIT
        }
    }

    pub fn page_count(&self) -> usize {
        self.pages.as_ref().map_or(usize::MAX, |p| p.len())
    }

    /// Shorter, or as short with fewer pages.
    pub fn better_than(&self, other: &Gap) -> bool {
        (self.insns, self.page_count()) < (other.insns, other.page_count())
    }
}
