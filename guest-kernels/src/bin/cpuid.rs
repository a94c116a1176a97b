//! `cpuid`: feature probing as a kernel's early CPU setup does it: CPUID leaves 0,
//! 1, 7 (every subleaf), 0xd (the XSAVE components), 0x80000000..0x80000008,
//! XGETBV(0) when the OS has enabled XSAVE, RDMSR of architectural MSRs, and a
//! WRMSR/RDMSR round trip of IA32_PAT (restored afterwards). Prints what it read
//! and a checksum of it.
#![no_std]
#![no_main]

use rt::cpu::{cpuid, rdmsr, read_cr0, read_cr4, wrmsr, xgetbv, Cpuid};
use rt::serial::{print_bytes, print_hex_digits};
use rt::{print, print_hex_n, println, Checksum};

rt::entry!(main);

const IA32_APIC_BASE: u32 = 0x1b;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_PAT: u32 = 0x277;
const IA32_EFER: u32 = 0xc000_0080;
/// The PAT Linux programs: WB, WC, UC-, UC, WB, WP, UC-, WT.
const LINUX_PAT: u64 = 0x0407_0506_0007_0106;

fn leaf(l: u32, sub: u32, sum: &mut Checksum) -> Cpuid {
    let r = cpuid(l, sub);
    sum.add_u32(l);
    sum.add_u32(sub);
    sum.add_u32(r.eax);
    sum.add_u32(r.ebx);
    sum.add_u32(r.ecx);
    sum.add_u32(r.edx);
    print("cpuid ");
    print_hex_digits(u64::from(l), 8);
    print(".");
    print_hex_digits(u64::from(sub), 2);
    for v in [r.eax, r.ebx, r.ecx, r.edx] {
        print(" ");
        print_hex_digits(u64::from(v), 8);
    }
    println("");
    r
}

fn msr(name: &str, index: u32, sum: &mut Checksum) -> u64 {
    let v = rdmsr(index);
    sum.add_u32(index);
    sum.add_u64(v);
    print("msr ");
    print(name);
    print(" ");
    print_hex_n(v, 16);
    println("");
    v
}

fn main() -> u8 {
    let mut sum = Checksum::new();

    let l0 = leaf(0, 0, &mut sum);
    let max = l0.eax;
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
    print("cpuid: vendor ");
    print_bytes(&vendor);
    println("");

    let mut osxsave = false;
    if max >= 1 {
        let l1 = leaf(1, 0, &mut sum);
        osxsave = l1.ecx & (1 << 27) != 0;
    }
    if max >= 7 {
        let l7 = leaf(7, 0, &mut sum);
        for sub in 1..=l7.eax.min(8) {
            leaf(7, sub, &mut sum);
        }
    }
    if max >= 0xd {
        let d0 = leaf(0xd, 0, &mut sum);
        leaf(0xd, 1, &mut sum);
        let components = u64::from(d0.eax) | (u64::from(leaf_edx(0xd, 0)) << 32);
        for c in 2..63u32 {
            if components & (1 << c) != 0 {
                leaf(0xd, c, &mut sum);
            }
        }
    }
    let ext = leaf(0x8000_0000, 0, &mut sum);
    if ext.eax & 0xffff_0000 == 0x8000_0000 {
        for l in 0x8000_0001..=ext.eax.min(0x8000_0008) {
            leaf(l, 0, &mut sum);
        }
    }

    if osxsave {
        let xcr0 = xgetbv(0);
        sum.add_u64(xcr0);
        print("xcr0 ");
        print_hex_n(xcr0, 16);
        println("");
    } else {
        println("xcr0 not enabled (CR4.OSXSAVE clear)");
    }
    let (cr0, cr4) = (read_cr0(), read_cr4());
    sum.add_u64(cr0);
    sum.add_u64(cr4);
    print("cr0 ");
    print_hex_n(cr0, 16);
    print(" cr4 ");
    print_hex_n(cr4, 16);
    println("");

    msr("IA32_APIC_BASE", IA32_APIC_BASE, &mut sum);
    msr("IA32_MISC_ENABLE", IA32_MISC_ENABLE, &mut sum);
    msr("IA32_EFER", IA32_EFER, &mut sum);
    let pat = msr("IA32_PAT", IA32_PAT, &mut sum);

    // Round trip: program Linux's PAT, read it back, restore the original.
    wrmsr(IA32_PAT, LINUX_PAT);
    let back = rdmsr(IA32_PAT);
    wrmsr(IA32_PAT, pat);
    let restored = rdmsr(IA32_PAT);
    sum.add_u64(back);
    sum.add_u64(restored);
    print("pat: wrote ");
    print_hex_n(LINUX_PAT, 16);
    print(" read ");
    print_hex_n(back, 16);
    print(" restored ");
    print_hex_n(restored, 16);
    println("");

    print("cpuid: checksum ");
    print_hex_n(sum.value(), 16);
    println("");
    if back != LINUX_PAT || restored != pat {
        println("cpuid: PAT round trip failed");
        return rt::EXIT_FAILED;
    }
    println("cpuid: ok");
    rt::EXIT_OK
}

/// EDX of a leaf, without printing or summing it again.
fn leaf_edx(l: u32, sub: u32) -> u32 {
    cpuid(l, sub).edx
}
