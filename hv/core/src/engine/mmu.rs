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

use super::alu::AC;
use crate::guest::{CpuState, Guest};

pub const PTE_P: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_US: u64 = 1 << 2;
pub const PTE_A: u64 = 1 << 5;
pub const PTE_D: u64 = 1 << 6;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_NX: u64 = 1 << 63;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_VME: u64 = 1 << 0;
pub const CR4_PVI: u64 = 1 << 1;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_UMIP: u64 = 1 << 11;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_SMXE: u64 = 1 << 14;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_KL: u64 = 1 << 19;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const CR4_PKE: u64 = 1 << 22;
pub const CR4_CET: u64 = 1 << 23;
pub const CR4_PKS: u64 = 1 << 24;
pub const CR4_UINTR: u64 = 1 << 25;
pub const CR4_LAM_SUP: u64 = 1 << 28;
pub const CR4_FRED: u64 = 1 << 32;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Page-fault error code bits.
pub const PF_P: u32 = 1 << 0;
pub const PF_W: u32 = 1 << 1;
pub const PF_U: u32 = 1 << 2;
pub const PF_RSVD: u32 = 1 << 3;
pub const PF_ID: u32 = 1 << 4;

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
        if st.cr0 & CR0_PG == 0 {
            Paging::None
        } else if st.cr4 & CR4_PAE == 0 {
            Paging::Bits32 {
                pse: st.cr4 & CR4_PSE != 0,
            }
        } else if st.efer & EFER_LMA != 0 {
            if st.cr4 & CR4_LA57 != 0 {
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
            wp: st.cr0 & CR0_WP != 0,
            nxe: st.efer & EFER_NXE != 0,
            smep: st.cr4 & CR4_SMEP != 0,
            smap: st.cr4 & CR4_SMAP != 0,
            ac: st.rflags & AC != 0,
            pke: st.cr4 & CR4_PKE != 0,
            addr_mask: phys & !0xfff,
            high_rsvd: ((1u64 << 52) - 1) & !phys,
            pdpte: st.pdpte,
        }
    }

    fn fault(&self, la: u64, access: Access, present: bool, rsvd: bool) -> XlateError {
        let mut ec = 0;
        if present {
            ec |= PF_P;
        }
        if access == Access::Write {
            ec |= PF_W;
        }
        if self.user {
            ec |= PF_U;
        }
        if rsvd {
            ec |= PF_RSVD;
        }
        let id_reported = match self.paging {
            Paging::Bits32 { .. } => self.smep,
            _ => self.nxe || self.smep,
        };
        if access == Access::Fetch && id_reported {
            ec |= PF_ID;
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
        let nx_rsvd = if self.nxe { 0 } else { PTE_NX };
        let mut table;
        let mut level; // 3 = PML4, 2 = PDPT, 1 = PD, 0 = PT
        if levels == 3 {
            // PAE: the PDPTE register (no A bit, no R/W or U/S), as loaded at the
            // last CR3 write; from memory only when the backend did not supply it.
            let i = ((la >> 30) & 3) as usize;
            let e = match self.pdpte {
                Some(p) => p[i],
                None => Self::read_entry(g, (self.cr3 & 0xffff_ffe0) + i as u64 * 8, true)?,
            };
            if e & PTE_P == 0 {
                return Err(self.fault(la, access, false, false));
            }
            if e & (self.high_rsvd | 0x1e6 | PTE_NX) != 0 {
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
            if e & PTE_P == 0 {
                return Err(self.fault(la, access, false, false));
            }
            let mut rsvd = e & (self.high_rsvd | nx_rsvd) != 0;
            let large = e & PTE_PS != 0 && (level == 1 || level == 2);
            if level == 3 && e & PTE_PS != 0 {
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
            writable &= e & PTE_RW != 0;
            user_page &= e & PTE_US != 0;
            nx |= self.nxe && e & PTE_NX != 0;
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
        if pde & PTE_P == 0 {
            return Err(self.fault(la, access, false, false));
        }
        if pse && pde & PTE_PS != 0 {
            // 4M page; bits 20:13 hold physical address bits 39:32 (PSE-36), bit 21
            // is reserved, as are high bits beyond MAXPHYADDR (capped at 40 here).
            let high = ((pde >> 13) & 0xff) << 32;
            let phys_limit = self.addr_mask | 0xfff;
            if pde & (1 << 21) != 0 || high & !phys_limit != 0 {
                return Err(self.fault(la, access, true, true));
            }
            let (w, u) = (pde & PTE_RW != 0, pde & PTE_US != 0);
            self.check(la, access, w, u, false)?;
            self.set_ad(g, &[(pde_addr, pde)], access, false)?;
            return Ok((pde & 0xffc0_0000) | high | (la & 0x3f_ffff));
        }
        let pte_addr = (pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4;
        let pte = Self::read_entry(g, pte_addr, false)?;
        if pte & PTE_P == 0 {
            return Err(self.fault(la, access, false, false));
        }
        let w = pde & pte & PTE_RW != 0;
        let u = pde & pte & PTE_US != 0;
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
            let mut want = PTE_A;
            if i == last && access == Access::Write {
                want |= PTE_D;
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
