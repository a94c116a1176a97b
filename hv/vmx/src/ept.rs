//! The guest's RAM and its EPT: a 4-level EPT mapping guest-physical
//! `0..size` to the host pages that back it, and nothing else, so every guest access
//! outside its RAM is an EPT violation the hypervisor sees. Leaves are 4 KiB pages so
//! single code pages can be write-protected (translations of code on them must be
//! dropped when the guest writes to them).

use alloc::vec;
use alloc::vec::Vec;

use crate::vmx::{alloc_page, phys, Page};

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const RWX: u64 = READ | WRITE | EXEC;
/// Leaf memory type (bits 5:3): 6 = write-back.
const MT_WB: u64 = 6 << 3;

pub const PAGE: u64 = 4096;

/// Guest RAM, host memory the hypervisor owns, page-aligned.
pub struct GuestRam {
    base: *mut u8,
    size: u64,
}

impl GuestRam {
    /// Allocate `size` bytes (a multiple of 2 MiB), zeroed.
    pub fn new(size: u64) -> Option<GuestRam> {
        let layout = core::alloc::Layout::from_size_align(size as usize, 2 << 20).ok()?;
        // SAFETY: a non-zero-sized layout; the memory is owned by this GuestRam and
        // never freed (the hypervisor runs one guest per boot).
        let base = unsafe { alloc::alloc::alloc(layout) };
        if base.is_null() {
            return None;
        }
        // Zero it 8 bytes at a time (an emulator counts every iteration of a string
        // instruction; `rep stosb` would cost 8 times as much).
        // SAFETY: base..base+size was just allocated, size is a multiple of 8.
        unsafe {
            core::arch::asm!("rep stosq", inout("rcx") size / 8 => _, inout("rdi") base => _,
                             in("rax") 0u64, options(nostack, preserves_flags));
        }
        Some(GuestRam { base, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host-physical address of guest-physical `gpa` (identity-mapped host).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: base..base+size is owned by this GuestRam and stays allocated.
        unsafe { core::slice::from_raw_parts(self.base, self.size as usize) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; `&mut self` makes the borrow unique on the host side
        // (the guest only runs while no such borrow is live).
        unsafe { core::slice::from_raw_parts_mut(self.base, self.size as usize) }
    }

    /// The range `gpa..gpa+len` if it lies inside guest RAM.
    pub fn range(&self, gpa: u64, len: usize) -> Option<core::ops::Range<usize>> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.size).then_some(gpa as usize..end as usize)
    }
}

/// The EPT hierarchy for one guest.
pub struct Ept {
    pml4: &'static mut Page,
    /// Leaf tables, one per 2 MiB of guest RAM, by `gpa >> 21`.
    leaves: Vec<*mut [u64; 512]>,
    /// Pages currently write-protected (by page number).
    protected: Vec<bool>,
    size: u64,
}

fn table(p: &mut Page) -> &mut [u64; 512] {
    // SAFETY: a Page is 4096 bytes, 4096-aligned: exactly one table of 512 entries.
    unsafe { &mut *(p.0.as_mut_ptr() as *mut [u64; 512]) }
}

impl Ept {
    /// Map guest-physical `0..ram.size()` to `ram` with read, write and execute.
    pub fn new(ram: &GuestRam) -> Ept {
        let size = ram.size();
        let pml4 = alloc_page();
        let mut leaves = Vec::new();
        let pdpt_of = |pml4: &mut Page, gpa: u64| -> *mut [u64; 512] {
            let i4 = ((gpa >> 39) & 511) as usize;
            let t4 = table(pml4);
            if t4[i4] == 0 {
                t4[i4] = phys(alloc_page()) | RWX;
            }
            (t4[i4] & !0xfff) as *mut [u64; 512]
        };
        let mut gpa = 0;
        while gpa < size {
            let pdpt = pdpt_of(pml4, gpa);
            // SAFETY: every table pointer comes from alloc_page (leaked, aligned) via
            // the entries written here.
            let pdpt = unsafe { &mut *pdpt };
            let i3 = ((gpa >> 30) & 511) as usize;
            if pdpt[i3] == 0 {
                pdpt[i3] = phys(alloc_page()) | RWX;
            }
            // SAFETY: as above.
            let pd = unsafe { &mut *((pdpt[i3] & !0xfff) as *mut [u64; 512]) };
            let i2 = ((gpa >> 21) & 511) as usize;
            let pt_page = alloc_page();
            let pt_pa = phys(pt_page);
            let pt = table(pt_page);
            for (i, e) in pt.iter_mut().enumerate() {
                *e = ram.host_addr(gpa + i as u64 * PAGE) | RWX | MT_WB;
            }
            pd[i2] = pt_pa | RWX;
            leaves.push(pt as *mut [u64; 512]);
            gpa += 2 << 20;
        }
        Ept {
            pml4,
            leaves,
            protected: vec![false; (size / PAGE) as usize],
            size,
        }
    }

    /// EPT pointer: write-back paging structures, 4-level walk.
    pub fn eptp(&self) -> u64 {
        phys(self.pml4) | (3 << 3) | 6
    }

    fn leaf(&mut self, gpa: u64) -> Option<&mut u64> {
        if gpa >= self.size {
            return None;
        }
        let pt = *self.leaves.get((gpa >> 21) as usize)?;
        // SAFETY: leaf tables are leaked pages owned by this EPT.
        Some(unsafe { &mut (*pt)[((gpa >> 12) & 511) as usize] })
    }

    /// Remove write permission from the page holding `gpa`. Returns true if changed.
    pub fn protect(&mut self, gpa: u64) -> bool {
        let page = (gpa / PAGE) as usize;
        match self.leaf(gpa) {
            Some(e) if *e & WRITE != 0 => {
                *e &= !WRITE;
                self.protected[page] = true;
                true
            }
            _ => false,
        }
    }

    /// Give write permission back to the page holding `gpa`. Returns true if changed.
    pub fn unprotect(&mut self, gpa: u64) -> bool {
        let page = (gpa / PAGE) as usize;
        match self.leaf(gpa) {
            Some(e) if *e & WRITE == 0 => {
                *e |= WRITE;
                self.protected[page] = false;
                true
            }
            _ => false,
        }
    }

    pub fn is_protected(&self, gpa: u64) -> bool {
        self.protected
            .get((gpa / PAGE) as usize)
            .copied()
            .unwrap_or(false)
    }
}
