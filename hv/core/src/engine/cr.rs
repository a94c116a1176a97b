//! What the CPU refuses when a control register or a linear-address MSR is
//! written: the one rule both the engine (a MOV to CRn inside a cluster) and a
//! backend's exit handler (a single MOV-to-CR or WRMSR exit) apply, so a write the
//! vCPU would fault on is never installed.
//!
//! The rules are the SDM's (MOV to CR, WRMSR, 4.4.1 PDPTE registers), with the set
//! of feature-dependent CR4 bits that KVM enforces (`__cr4_reserved_bits`): a bit
//! for a feature the guest's CPUID does not report is reserved. Legacy CR4 bits
//! (VME..OSXMMEXCPT) are not tied to CPUID, as on KVM.

use crate::arch::{cr0, cr3, cr4, efer, msr, pte};
use crate::guest::{CpuCaps, CpuState, Fault, Guest};
use crate::ir::Seg;

const GP: Fault = Fault::GeneralProtection;

// engine/mod.rs names these as they were when defined here; new code imports
// `crate::arch` directly.
pub use crate::arch::cr3::NOFLUSH as CR3_NOFLUSH;
pub use crate::arch::msr::{EFER as MSR_EFER, FS_BASE as MSR_FS_BASE, GS_BASE as MSR_GS_BASE};

/// CR4 bits reserved on a vCPU with these features.
pub fn cr4_reserved(caps: &CpuCaps) -> u64 {
    let mut r = !cr4::DEFINED;
    for (has, bit) in [
        (caps.vmx, cr4::VMXE),
        (caps.smx, cr4::SMXE),
        (caps.umip, cr4::UMIP),
        (caps.la57, cr4::LA57),
        (caps.fsgsbase, cr4::FSGSBASE),
        (caps.pcid, cr4::PCIDE),
        (caps.xsave, cr4::OSXSAVE),
        (caps.keylocker, cr4::KL),
        (caps.smep, cr4::SMEP),
        (caps.smap, cr4::SMAP),
        (caps.pku, cr4::PKE),
        (caps.cet, cr4::CET),
        (caps.pks, cr4::PKS),
        (caps.uintr, cr4::UINTR),
        (caps.lam, cr4::LAM_SUP),
        (caps.fred, cr4::FRED),
    ] {
        if !has {
            r |= bit;
        }
    }
    r
}

/// True in 64-bit mode (IA-32e mode with a 64-bit code segment).
fn mode64(st: &CpuState) -> bool {
    st.efer & efer::LMA != 0 && st.seg[Seg::Cs as usize].long()
}

/// Checks a MOV of `value` to CR`cr` against the vCPU's current state `st` and its
/// features: `Err(#GP)` where the CPU raises it, `Err(#UD)` for a control register
/// that does not exist. `value` is the source operand as the instruction reads it
/// (32 bits outside 64-bit mode). Only the architectural faults are checked here;
/// CPL is the caller's (MOV CR is privileged before anything else). The CR0, CR2
/// and CR8 rules do not read `caps`.
pub fn check_write(cr: u8, value: u64, st: &CpuState, caps: &CpuCaps) -> Result<(), Fault> {
    let lma = st.efer & efer::LMA != 0;
    match cr {
        0 => {
            let v = value;
            if v >> 32 != 0 || (v & cr0::PG != 0 && v & cr0::PE == 0) {
                return Err(GP);
            }
            if v & cr0::NW != 0 && v & cr0::CD == 0 {
                return Err(GP);
            }
            let pg_on = v & cr0::PG != 0 && st.cr0 & cr0::PG == 0;
            if pg_on && st.efer & efer::LME != 0 {
                // Entering IA-32e mode needs PAE and a code segment that is not 64-bit.
                if st.cr4 & cr4::PAE == 0 || st.seg[Seg::Cs as usize].long() {
                    return Err(GP);
                }
            }
            if v & cr0::PG == 0 && (mode64(st) || st.cr4 & cr4::PCIDE != 0) {
                return Err(GP);
            }
            if v & cr0::WP == 0 && st.cr4 & cr4::CET != 0 {
                return Err(GP);
            }
            Ok(())
        }
        2 => Ok(()),
        3 => {
            let mut v = value;
            if st.cr4 & cr4::PCIDE != 0 {
                v &= !cr3::NOFLUSH;
            }
            if caps.lam {
                v &= !cr3::LAM;
            }
            let mp = caps.maxphyaddr.clamp(32, 52);
            if lma && v >> mp != 0 {
                return Err(GP);
            }
            Ok(())
        }
        4 => {
            let v = value;
            if v & cr4_reserved(caps) != 0 {
                return Err(GP);
            }
            if lma && (v & cr4::PAE == 0 || (v ^ st.cr4) & cr4::LA57 != 0) {
                return Err(GP);
            }
            if v & cr4::PCIDE != 0 && st.cr4 & cr4::PCIDE == 0 && (!lma || st.cr3 & 0xfff != 0) {
                return Err(GP);
            }
            if v & cr4::CET != 0 && st.cr0 & cr0::WP == 0 {
                return Err(GP);
            }
            Ok(())
        }
        8 => {
            if value >> 4 != 0 {
                return Err(GP);
            }
            Ok(())
        }
        _ => Err(Fault::InvalidOpcode),
    }
}

/// True in PAE paging (CR0.PG, CR4.PAE, not IA-32e mode).
pub fn pae_paging(st: &CpuState) -> bool {
    st.cr0 & cr0::PG != 0 && st.cr4 & cr4::PAE != 0 && st.efer & efer::LMA == 0
}

/// Whether a write to CR`cr` that took the vCPU from `before` to `after` loads
/// the PDPTE registers (SDM 4.4.1): in PAE paging after the write, any MOV to CR3,
/// and a MOV to CR0 or CR4 that changes CR0.CD, NW or PG or CR4.PAE, PGE, PSE or
/// SMEP.
pub fn loads_pdptes(cr: u8, before: &CpuState, after: &CpuState) -> bool {
    if !pae_paging(after) {
        return false;
    }
    match cr {
        0 => (before.cr0 ^ after.cr0) & (cr0::CD | cr0::NW | cr0::PG) != 0,
        3 => true,
        4 => (before.cr4 ^ after.cr4) & (cr4::PAE | cr4::PGE | cr4::PSE | cr4::SMEP) != 0,
        _ => false,
    }
}

/// Why the PDPTE registers could not be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdpteError {
    /// A present PDPTE has a reserved bit set: the write raises #GP.
    Fault(Fault),
    /// The PDPT is not in guest RAM.
    NotRam { gpa: u64 },
}

/// Reads the four PDPTEs at `cr3` (bits 31:5) and checks them as the CPU does when
/// it loads the PDPTE registers: a present entry with a reserved bit set (bits 2:1,
/// 8:5, 63:MAXPHYADDR) makes the loading instruction raise #GP.
pub fn load_pdptes<G: Guest + ?Sized>(
    g: &mut G,
    cr3: u64,
    caps: &CpuCaps,
) -> Result<[u64; 4], PdpteError> {
    let base = cr3 & cr3::PAE_PDPT;
    let mut raw = [0u8; 32];
    g.read_phys(base, &mut raw)
        .map_err(|e| PdpteError::NotRam { gpa: e.gpa })?;
    let mp = caps.maxphyaddr.clamp(32, 52);
    let rsvd = (u64::MAX << mp) | pte::PDPTE_RSVD;
    let mut out = [0u64; 4];
    for (i, e) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
        *e = u64::from_le_bytes(b);
        if *e & pte::P != 0 && *e & rsvd != 0 {
            return Err(PdpteError::Fault(GP));
        }
    }
    Ok(out)
}

/// MSRs that hold a linear address and refuse (#GP) a non-canonical one on WRMSR.
pub const LINEAR_ADDRESS_MSRS: [u32; 8] = [
    msr::SYSENTER_ESP,
    msr::SYSENTER_EIP,
    msr::LSTAR,
    msr::CSTAR,
    msr::FS_BASE,
    msr::GS_BASE,
    msr::KERNEL_GS_BASE,
    msr::DS_AREA,
];

/// True when `a` is canonical for a linear-address width of `bits`.
pub fn canonical(a: u64, bits: u32) -> bool {
    let sh = 64 - bits;
    ((a as i64) << sh >> sh) as u64 == a
}

/// Checks a WRMSR of `value` to `msr` for the faults that do not depend on the
/// MSR's device model: a non-canonical linear address (checked against the widest
/// linear address the vCPU supports, as the CPU does) raises #GP.
pub fn check_wrmsr(msr: u32, value: u64, caps: &CpuCaps) -> Result<(), Fault> {
    if LINEAR_ADDRESS_MSRS.contains(&msr) && !canonical(value, caps.linear_bits()) {
        return Err(GP);
    }
    Ok(())
}
