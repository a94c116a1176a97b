//! Software page walks through the guest's own page tables.
//!
//! Paging modes: none (real mode or protected mode with CR0.PG=0: linear =
//! physical, 32 bits), 32-bit (4K pages, 4M pages with CR4.PSE, PSE-36 high bits),
//! PAE (the PDPTE registers of `CpuState::pdpte`, or memory at CR3 when the
//! backend does not supply them; 2M pages) and 4-level long mode (2M and 1G
//! pages). 5-level paging (CR4.LA57) is not supported (walks fail with
//! `Unsupported`). Permissions: R/W with CR0.WP, U/S by CPL, NX with EFER.NXE, SMEP
//! and SMAP (with EFLAGS.AC). Protection keys are not modelled: with CR4.PKE a data
//! access to a user page is `Unsupported` (the guest runs it natively).
//!
//! Accessed and dirty bits: on a successful translation the accessed bit is set in
//! every paging-structure entry used (PDPTEs in PAE mode have none) and the dirty bit
//! in the final entry for a write, as the hardware does. A translation that faults
//! sets no bits.

use crate::arch::{cr0, cr3, cr4, efer, pfec, pte, rflags};
use crate::guest::{CpuState, Guest};

// The engine's modules (engine/mod.rs, test_guest.rs) name these as they did when
// they were defined here; new code imports `crate::arch` directly.
pub use crate::arch::cr0::{
    CD as CR0_CD, ET as CR0_ET, PE as CR0_PE, PG as CR0_PG, TS as CR0_TS, WP as CR0_WP,
};
pub use crate::arch::cr4::{
    LA57 as CR4_LA57, OSXSAVE as CR4_OSXSAVE, PAE as CR4_PAE, PCIDE as CR4_PCIDE, PGE as CR4_PGE,
    PKE as CR4_PKE, PSE as CR4_PSE, SMAP as CR4_SMAP, SMEP as CR4_SMEP, TSD as CR4_TSD,
};
pub use crate::arch::efer::{LMA as EFER_LMA, LME as EFER_LME};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paging {
    /// CR0.PG = 0.
    None,
    /// 32-bit paging; `pse` = CR4.PSE.
    Bits32 {
        pse: bool,
    },
    Pae,
    Long4,
    /// A mode the engine does not walk (5-level paging).
    Unsupported,
}

impl Paging {
    pub fn of(st: &CpuState) -> Paging {
        if st.cr0 & cr0::PG == 0 {
            Paging::None
        } else if st.cr4 & cr4::PAE == 0 {
            Paging::Bits32 {
                pse: st.cr4 & cr4::PSE != 0,
            }
        } else if st.efer & efer::LMA != 0 {
            if st.cr4 & cr4::LA57 != 0 {
                Paging::Unsupported
            } else {
                Paging::Long4
            }
        } else {
            Paging::Pae
        }
    }
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XlateError {
    PageFault { addr: u64, error_code: u32 },
    NotRam { gpa: u64 },
    Unsupported,
}

/// Per-run translation context: the mode and the bits of state that govern it.
#[derive(Clone, Copy, Debug)]
pub struct Mmu {
    pub paging: Paging,
    pub cr3: u64,
    pub user: bool,
    pub wp: bool,
    pub nxe: bool,
    pub smep: bool,
    pub smap: bool,
    pub ac: bool,
    pub pke: bool,
    /// Physical-address bits an entry may hold (bits 12..MAXPHYADDR).
    pub addr_mask: u64,
    /// Bits of an entry that must be zero above MAXPHYADDR (bits MAXPHYADDR..52).
    pub high_rsvd: u64,
    /// The PDPTE registers (PAE paging), when known.
    pub pdpte: Option<[u64; 4]>,
}

impl Mmu {
    pub fn new(st: &CpuState, maxphyaddr: u8) -> Mmu {
        let mp = maxphyaddr.clamp(32, 52) as u32;
        let phys = if mp >= 64 { u64::MAX } else { (1u64 << mp) - 1 };
        Mmu {
            paging: Paging::of(st),
            cr3: st.cr3,
            user: st.cpl() == 3,
            wp: st.cr0 & cr0::WP != 0,
            nxe: st.efer & efer::NXE != 0,
            smep: st.cr4 & cr4::SMEP != 0,
            smap: st.cr4 & cr4::SMAP != 0,
            ac: st.rflags & rflags::AC != 0,
            pke: st.cr4 & cr4::PKE != 0,
            addr_mask: phys & !0xfff,
            high_rsvd: ((1u64 << 52) - 1) & !phys,
            pdpte: st.pdpte,
        }
    }

    fn fault(&self, la: u64, access: Access, present: bool, rsvd: bool) -> XlateError {
        let mut ec = 0;
        if present {
            ec |= pfec::P;
        }
        if access == Access::Write {
            ec |= pfec::W;
        }
        if self.user {
            ec |= pfec::U;
        }
        if rsvd {
            ec |= pfec::RSVD;
        }
        let id_reported = match self.paging {
            Paging::Bits32 { .. } => self.smep,
            _ => self.nxe || self.smep,
        };
        if access == Access::Fetch && id_reported {
            ec |= pfec::ID;
        }
        XlateError::PageFault {
            addr: la,
            error_code: ec,
        }
    }

    /// Translates a linear address to a guest-physical one, checking permissions
    /// and setting accessed/dirty bits. `walks` counts page walks done.
    pub fn translate<G: Guest + ?Sized>(
        &self,
        g: &mut G,
        la: u64,
        access: Access,
        walks: &mut u32,
    ) -> Result<u64, XlateError> {
        match self.paging {
            Paging::None => Ok(la & 0xffff_ffff),
            Paging::Unsupported => Err(XlateError::Unsupported),
            Paging::Long4 => {
                *walks += 1;
                self.walk64(g, la, access, 4)
            }
            Paging::Pae => {
                *walks += 1;
                self.walk64(g, la & 0xffff_ffff, access, 3)
            }
            Paging::Bits32 { pse } => {
                *walks += 1;
                self.walk32(g, la & 0xffff_ffff, access, pse)
            }
        }
    }

    fn read_entry<G: Guest + ?Sized>(g: &mut G, gpa: u64, wide: bool) -> Result<u64, XlateError> {
        if wide {
            let mut b = [0u8; 8];
            g.read_phys(gpa, &mut b)
                .map_err(|e| XlateError::NotRam { gpa: e.gpa })?;
            Ok(u64::from_le_bytes(b))
        } else {
            let mut b = [0u8; 4];
            g.read_phys(gpa, &mut b)
                .map_err(|e| XlateError::NotRam { gpa: e.gpa })?;
            Ok(u32::from_le_bytes(b) as u64)
        }
    }

    /// Final permission check once the walk found a present, well-formed mapping.
    fn check(
        &self,
        la: u64,
        access: Access,
        writable: bool,
        user_page: bool,
        nx: bool,
    ) -> Result<(), XlateError> {
        let deny = match access {
            Access::Write => {
                (!writable && (self.user || self.wp))
                    || (self.user && !user_page)
                    || (!self.user && user_page && self.smap && !self.ac)
            }
            Access::Read => {
                (self.user && !user_page) || (!self.user && user_page && self.smap && !self.ac)
            }
            Access::Fetch => {
                nx || (self.user && !user_page) || (!self.user && user_page && self.smep)
            }
        };
        if deny {
            return Err(self.fault(la, access, true, false));
        }
        if self.pke && user_page && access != Access::Fetch {
            return Err(XlateError::Unsupported);
        }
        Ok(())
    }

    /// PAE (levels = 3) and 4-level (levels = 4) walks.
    fn walk64<G: Guest + ?Sized>(
        &self,
        g: &mut G,
        la: u64,
        access: Access,
        levels: u32,
    ) -> Result<u64, XlateError> {
        let mut entries = [(0u64, 0u64); 4];
        let mut n = 0;
        let mut writable = true;
        let mut user_page = true;
        let mut nx = false;
        let nx_rsvd = if self.nxe { 0 } else { pte::NX };
        let mut table;
        let mut level; // 3 = PML4, 2 = PDPT, 1 = PD, 0 = PT
        if levels == 3 {
            // PAE: the PDPTE register (no A bit, no R/W or U/S), as loaded at the
            // last CR3 write; from memory only when the backend did not supply it.
            let i = ((la >> 30) & 3) as usize;
            let e = match self.pdpte {
                Some(p) => p[i],
                None => Self::read_entry(g, (self.cr3 & cr3::PAE_PDPT) + i as u64 * 8, true)?,
            };
            if e & pte::P == 0 {
                return Err(self.fault(la, access, false, false));
            }
            if e & (self.high_rsvd | pte::PDPTE_RSVD | pte::NX) != 0 {
                // Reserved PDPTE bits fault at CR3 load on hardware; do not guess.
                return Err(XlateError::Unsupported);
            }
            table = e & self.addr_mask;
            level = 1;
        } else {
            table = self.cr3 & self.addr_mask;
            level = 3;
        }
        loop {
            let shift = 12 + 9 * level;
            let ea = table + ((la >> shift) & 0x1ff) * 8;
            let e = Self::read_entry(g, ea, true)?;
            if e & pte::P == 0 {
                return Err(self.fault(la, access, false, false));
            }
            let mut rsvd = e & (self.high_rsvd | nx_rsvd) != 0;
            let large = e & pte::PS != 0 && (level == 1 || level == 2);
            if level == 3 && e & pte::PS != 0 {
                rsvd = true;
            }
            if large {
                // Bits 12..(page size) except PAT (bit 12) must be zero.
                let low = (1u64 << shift) - 1;
                if e & low & !0x1fff & self.addr_mask != 0 {
                    rsvd = true;
                }
            }
            if rsvd {
                return Err(self.fault(la, access, true, true));
            }
            writable &= e & pte::RW != 0;
            user_page &= e & pte::US != 0;
            nx |= self.nxe && e & pte::NX != 0;
            entries[n] = (ea, e);
            n += 1;
            if level == 0 || large {
                let size = 1u64 << shift;
                let base = e & self.addr_mask & !(size - 1);
                self.check(la, access, writable, user_page, nx)?;
                self.set_ad(g, &entries[..n], access, true)?;
                return Ok(base | (la & (size - 1)));
            }
            table = e & self.addr_mask;
            level -= 1;
        }
    }

    fn walk32<G: Guest + ?Sized>(
        &self,
        g: &mut G,
        la: u64,
        access: Access,
        pse: bool,
    ) -> Result<u64, XlateError> {
        let pde_addr = (self.cr3 & 0xffff_f000) + ((la >> 22) & 0x3ff) * 4;
        let pde = Self::read_entry(g, pde_addr, false)?;
        if pde & pte::P == 0 {
            return Err(self.fault(la, access, false, false));
        }
        if pse && pde & pte::PS != 0 {
            // 4M page; bits 20:13 hold physical address bits 39:32 (PSE-36), bit 21
            // is reserved, as are high bits beyond MAXPHYADDR (capped at 40 here).
            let high = ((pde >> 13) & 0xff) << 32;
            let phys_limit = self.addr_mask | 0xfff;
            if pde & (1 << 21) != 0 || high & !phys_limit != 0 {
                return Err(self.fault(la, access, true, true));
            }
            let (w, u) = (pde & pte::RW != 0, pde & pte::US != 0);
            self.check(la, access, w, u, false)?;
            self.set_ad(g, &[(pde_addr, pde)], access, false)?;
            return Ok((pde & 0xffc0_0000) | high | (la & 0x3f_ffff));
        }
        let pte_addr = (pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4;
        let pte = Self::read_entry(g, pte_addr, false)?;
        if pte & pte::P == 0 {
            return Err(self.fault(la, access, false, false));
        }
        let w = pde & pte & pte::RW != 0;
        let u = pde & pte & pte::US != 0;
        self.check(la, access, w, u, false)?;
        self.set_ad(g, &[(pde_addr, pde), (pte_addr, pte)], access, false)?;
        Ok((pte & 0xffff_f000) | (la & 0xfff))
    }

    /// Sets A in every entry used and D in the last one for writes.
    fn set_ad<G: Guest + ?Sized>(
        &self,
        g: &mut G,
        entries: &[(u64, u64)],
        access: Access,
        wide: bool,
    ) -> Result<(), XlateError> {
        let last = entries.len().saturating_sub(1);
        for (i, &(addr, e)) in entries.iter().enumerate() {
            let mut want = pte::A;
            if i == last && access == Access::Write {
                want |= pte::D;
            }
            if e & want != want {
                let ne = e | want;
                let r = if wide {
                    g.write_phys(addr, &ne.to_le_bytes())
                } else {
                    g.write_phys(addr, &(ne as u32).to_le_bytes())
                };
                r.map_err(|e| XlateError::NotRam { gpa: e.gpa })?;
            }
        }
        Ok(())
    }
}
