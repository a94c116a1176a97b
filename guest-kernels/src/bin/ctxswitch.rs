//! `ctxswitch`: the privileged part of a context-switch loop, 2000 times: load CR3
//! (alternating between two address spaces the guest built, both identity-mapping
//! the first 4 GiB with 2 MiB pages and sharing the page directories, as two
//! processes share the kernel's mappings), write the FS_BASE and GS_BASE MSRs of
//! the next task and read them back as `save_fsgs` does, and read the TSC for the
//! scheduler clock. Prints a checksum of what it read back (never TSC values).
#![no_std]
#![no_main]

use rt::cpu::{rdmsr, rdtsc, read_cr3, write_cr3, wrmsr};
use rt::{print, print_dec, print_hex_n, println, Checksum};

rt::entry!(main);

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const SWITCHES: u64 = 2000;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

#[repr(C, align(4096))]
struct Table([u64; 512]);

/// Two PML4s, two PDPTs, four page directories shared by both address spaces.
#[repr(C)]
struct Tables {
    pml4: [Table; 2],
    pdpt: [Table; 2],
    pd: [Table; 4],
}

const EMPTY: Table = Table([0; 512]);

static mut TABLES: Tables = Tables {
    pml4: [EMPTY, EMPTY],
    pdpt: [EMPTY, EMPTY],
    pd: [EMPTY, EMPTY, EMPTY, EMPTY],
};

/// Build both address spaces and return their roots' physical addresses (the
/// image runs identity-mapped, so a static's address is its physical address).
fn build_address_spaces() -> [u64; 2] {
    let t = &raw mut TABLES;
    let mut roots = [0u64; 2];
    // SAFETY: single-threaded guest; the tables are written only here, through
    // the raw pointer, before either root is loaded.
    unsafe {
        for g in 0..4 {
            for i in 0..512 {
                (*t).pd[g].0[i] =
                    (g as u64 * ONE_GIB + i as u64 * TWO_MIB) | PRESENT | WRITABLE | HUGE;
            }
        }
        for (s, root) in roots.iter_mut().enumerate() {
            for g in 0..4 {
                (*t).pdpt[s].0[g] = (&raw const (*t).pd[g]) as u64 | PRESENT | WRITABLE;
            }
            (*t).pml4[s].0[0] = (&raw const (*t).pdpt[s]) as u64 | PRESENT | WRITABLE;
            *root = (&raw const (*t).pml4[s]) as u64;
        }
    }
    roots
}

fn main() -> u8 {
    let original_cr3 = read_cr3();
    let roots = build_address_spaces();
    let mut sum = Checksum::new();
    let mut mismatches = 0u64;
    let mut tsc_backwards = 0u64;
    let mut last_tsc = rdtsc();

    for i in 0..SWITCHES {
        let next = (i & 1) as usize;
        // Task i's user FS base and per-CPU GS base: canonical addresses.
        let fs = 0x0000_7f00_0000_0000 + i * 0x1000;
        let gs = 0xffff_8880_0000_0000 + i * 0x40;

        // SAFETY: both roots identity-map the first 4 GiB, where the image, its
        // stack and its data live, exactly as the boot tables do.
        unsafe { write_cr3(roots[next]) };
        wrmsr(MSR_FS_BASE, fs);
        wrmsr(MSR_GS_BASE, gs);
        let cr3 = read_cr3();
        let fs_back = rdmsr(MSR_FS_BASE);
        let gs_back = rdmsr(MSR_GS_BASE);
        let now = rdtsc();

        sum.add_u64(cr3.wrapping_sub(roots[0]));
        sum.add_u64(fs_back);
        sum.add_u64(gs_back);
        mismatches += u64::from(cr3 & !0xfff != roots[next])
            + u64::from(fs_back != fs)
            + u64::from(gs_back != gs);
        tsc_backwards += u64::from(now < last_tsc);
        last_tsc = now;
    }

    // SAFETY: the boot tables are still in place and map everything identically.
    unsafe { write_cr3(original_cr3) };

    print("ctxswitch: ");
    print_dec(SWITCHES);
    print(" switches, read-back mismatches ");
    print_dec(mismatches);
    print(", tsc went backwards ");
    print_dec(tsc_backwards);
    println("");
    print("ctxswitch: checksum ");
    print_hex_n(sum.value(), 16);
    println("");
    if mismatches != 0 || tsc_backwards != 0 {
        println("ctxswitch: failed");
        return rt::EXIT_FAILED;
    }
    println("ctxswitch: ok");
    rt::EXIT_OK
}
