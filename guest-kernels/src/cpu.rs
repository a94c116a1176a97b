//! Privileged and exit-prone instructions, one inline-asm wrapper each.
//!
//! The guests run in ring 0 with no other software underneath but the hypervisor,
//! so these are safe to call as far as the guest is concerned: each one touches
//! only the device, MSR or register it names. A wrong MSR number faults, which (no
//! IDT) ends the run; callers use only architectural MSRs.
use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; ring 0 guest.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects; ring 0 guest.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: port I/O has no memory effects; ring 0 guest.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port I/O has no memory effects; ring 0 guest.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: port I/O has no memory effects; ring 0 guest.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port I/O has no memory effects; ring 0 guest.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an architectural MSR chosen by the caller; no memory effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writes an architectural MSR chosen by the caller (FS/GS base, PAT):
    // none of them changes how this code or its memory is reached.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// CPUID result registers.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID only writes the four registers. RBX is reserved by LLVM, so it
    // is saved and restored around the instruction by hand.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags)
        )
    }
    Cpuid { eax, ebx, ecx, edx }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter; no memory effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// XGETBV; the caller checks CPUID.1:ECX.OSXSAVE first (else #UD).
#[inline(always)]
pub fn xgetbv(xcr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an extended control register; no memory effects.
    unsafe {
        asm!("xgetbv", in("ecx") xcr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reads CR3; no memory effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Load CR3.
///
/// # Safety
/// `root` must be the physical address of a PML4 that maps this code, its stack
/// and every datum it will touch at the same addresses as the current one.
#[inline(always)]
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the new tables map everything identically.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) }
}

#[inline(always)]
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reads CR0; no memory effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reads CR4; no memory effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Disable interrupts and halt (the end of a run when no debug-exit device exists).
#[inline(always)]
pub fn cli_hlt() {
    // SAFETY: stops this CPU until an NMI or reset; no memory effects.
    unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
}
