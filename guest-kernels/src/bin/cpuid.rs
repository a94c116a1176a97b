//! `cpuid`: feature probing as a kernel's early CPU setup does it, once for each
//! of 64 CPUs (`ROUNDS`): CPUID leaves 0, 1, 7 (every subleaf), 0xd (the XSAVE
//! components), 0x80000000..0x80000008, XGETBV(0) when the OS has enabled XSAVE,
//! RDMSR of architectural MSRs, and a WRMSR/RDMSR round trip of IA32_PAT
//! (restored afterwards). Every round must read the same values. It prints only a
//! checksum of what it read, so that its exits are its probing, not its console.
#![no_std]
#![no_main]

use rt::cpu::{cpuid, rdmsr, read_cr0, read_cr4, wrmsr, xgetbv, Cpuid};
use rt::serial::{print_bytes, print_dec};
use rt::{print, print_hex_n, println, Checksum};

rt::entry!(main);

/// Probing rounds (a kernel probes each CPU it brings up).
const ROUNDS: u32 = 64;

const IA32_APIC_BASE: u32 = 0x1b;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_PAT: u32 = 0x277;
const IA32_EFER: u32 = 0xc000_0080;
/// The PAT Linux programs: WB, WC, UC-, UC, WB, WP, UC-, WT.
const LINUX_PAT: u64 = 0x0407_0506_0007_0106;

/// What one round read.
struct Probe {
    sum: Checksum,
    leaves: u32,
    pat_ok: bool,
}

impl Probe {
    fn leaf(&mut self, l: u32, sub: u32) -> Cpuid {
        let r = cpuid(l, sub);
        for v in [l, sub, r.eax, r.ebx, r.ecx, r.edx] {
            self.sum.add_u32(v);
        }
        self.leaves += 1;
        r
    }

    fn msr(&mut self, index: u32) -> u64 {
        let v = rdmsr(index);
        self.sum.add_u32(index);
        self.sum.add_u64(v);
        v
    }
}

fn probe() -> Probe {
    let mut p = Probe {
        sum: Checksum::new(),
        leaves: 0,
        pat_ok: false,
    };
    let max = p.leaf(0, 0).eax;
    let mut osxsave = false;
    if max >= 1 {
        osxsave = p.leaf(1, 0).ecx & (1 << 27) != 0;
    }
    if max >= 7 {
        let l7 = p.leaf(7, 0);
        for sub in 1..=l7.eax.min(8) {
            p.leaf(7, sub);
        }
    }
    if max >= 0xd {
        let d0 = p.leaf(0xd, 0);
        p.leaf(0xd, 1);
        let components = u64::from(d0.eax) | (u64::from(d0.edx) << 32);
        for c in 2..63u32 {
            if components & (1 << c) != 0 {
                p.leaf(0xd, c);
            }
        }
    }
    let ext = p.leaf(0x8000_0000, 0);
    if ext.eax & 0xffff_0000 == 0x8000_0000 {
        for l in 0x8000_0001..=ext.eax.min(0x8000_0008) {
            p.leaf(l, 0);
        }
    }
    if osxsave {
        p.sum.add_u64(xgetbv(0));
    }
    p.sum.add_u64(read_cr0());
    p.sum.add_u64(read_cr4());

    p.msr(IA32_APIC_BASE);
    p.msr(IA32_MISC_ENABLE);
    p.msr(IA32_EFER);
    let pat = p.msr(IA32_PAT);
    // Round trip: program Linux's PAT, read it back, restore the original.
    wrmsr(IA32_PAT, LINUX_PAT);
    let back = rdmsr(IA32_PAT);
    wrmsr(IA32_PAT, pat);
    let restored = rdmsr(IA32_PAT);
    p.sum.add_u64(back);
    p.sum.add_u64(restored);
    p.pat_ok = back == LINUX_PAT && restored == pat;
    p
}

fn main() -> u8 {
    let first = probe();
    let mut differ = 0;
    let mut pat_failed = u32::from(!first.pat_ok);
    for _ in 1..ROUNDS {
        let p = probe();
        differ += u32::from(p.sum.value() != first.sum.value());
        pat_failed += u32::from(!p.pat_ok);
    }

    let l0 = cpuid(0, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
    print("cpuid: ");
    print_bytes(&vendor);
    print(", ");
    print_dec(u64::from(ROUNDS));
    print(" rounds of ");
    print_dec(u64::from(first.leaves));
    print(" leaves and 6 MSRs, checksum ");
    print_hex_n(first.sum.value(), 16);
    println("");
    if differ != 0 || pat_failed != 0 {
        print("cpuid: rounds that read other values ");
        print_dec(u64::from(differ));
        print(", PAT round trips failed ");
        print_dec(u64::from(pat_failed));
        println("");
        return rt::EXIT_FAILED;
    }
    println("cpuid: ok");
    rt::EXIT_OK
}
