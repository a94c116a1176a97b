//! The CPU's rules for control-register and linear-address MSR writes
//! (`engine::cr`), one case per rule, and the features they are checked against
//! (`CpuCaps` from CPUID).

use avex_core::arch::{cr0, cr4, efer, msr};
use avex_core::engine::cr::{self, PdpteError};
use avex_core::engine::mmu::Paging;
use avex_core::engine::test_guest::{attrs, TestGuest};
use avex_core::guest::{CpuCaps, CpuState, Fault};
use avex_core::ir::Seg;

const GP: Result<(), Fault> = Err(Fault::GeneralProtection);
const OK: Result<(), Fault> = Ok(());

/// A vCPU with every feature the checks know, MAXPHYADDR 46.
fn all_caps() -> CpuCaps {
    CpuCaps {
        maxphyaddr: 46,
        la57: true,
        vmx: true,
        smx: true,
        pcid: true,
        xsave: true,
        fsgsbase: true,
        smep: true,
        smap: true,
        umip: true,
        pku: true,
        pks: true,
        cet: true,
        keylocker: true,
        uintr: true,
        lam: true,
        fred: true,
    }
}

/// No optional feature, MAXPHYADDR 36.
fn no_caps() -> CpuCaps {
    CpuCaps {
        maxphyaddr: 36,
        ..CpuCaps::default()
    }
}

/// 64-bit mode, paging on, CR4.PAE, CR3 = 0x1000.
fn long64() -> CpuState {
    TestGuest::long_mode(1 << 20).state
}

fn compat() -> CpuState {
    let mut s = long64();
    s.seg[Seg::Cs as usize].attrs = attrs::CODE32;
    s
}

/// 32-bit protected mode, paging off.
fn prot32() -> CpuState {
    TestGuest::protected32(1 << 20, Paging::None).state
}

#[test]
fn caps_come_from_cpuid_within_the_maximum_leaves() {
    let g = TestGuest::new(4096);
    let leaves = g.cpuid_leaves.clone();
    let look = |l: u32, s: u32| {
        leaves
            .get(&(l, s))
            .or_else(|| leaves.get(&(l, 0)))
            .copied()
            .unwrap_or([0; 4])
    };
    let c = CpuCaps::from_cpuid(look);
    assert_eq!(c.maxphyaddr, 46);
    assert!(c.pcid && c.xsave && c.fsgsbase && c.smep && c.smap && c.umip);
    assert!(!c.vmx && !c.smx && !c.pku && !c.cet && !c.la57 && !c.lam && !c.fred);
    assert_eq!(c.linear_bits(), 48);
    // Every bit set, but leaf 7 beyond the maximum basic leaf and no 0x80000008:
    // leaf 7 features absent, MAXPHYADDR 36 (PAE) or 32.
    let full = |l: u32, _s: u32| match l {
        0 => [1, 0, 0, 0],
        0x8000_0000 => [0x8000_0001, 0, 0, 0],
        _ => [u32::MAX; 4],
    };
    let c = CpuCaps::from_cpuid(full);
    assert!(c.vmx && c.smx && c.pcid && c.xsave);
    assert!(!c.smep && !c.la57 && !c.lam);
    assert_eq!(c.maxphyaddr, 36);
    let c = CpuCaps::from_cpuid(|l, _| match l {
        0 => [1, 0, 0, 0],
        _ => [0; 4],
    });
    assert_eq!(c.maxphyaddr, 32);
    // Leaf 7.1 is read only when leaf 7.0 says it exists.
    let c = CpuCaps::from_cpuid(|l, s| match (l, s) {
        (0, _) => [7, 0, 0, 0],
        (7, 0) => [1, 0, 1 << 16, 0],
        (7, 1) => [1 << 26 | 1 << 17, 0, 0, 0],
        _ => [0; 4],
    });
    assert!(c.la57 && c.lam && c.fred);
    assert_eq!(c.linear_bits(), 57);
}

#[test]
fn cr0_rules() {
    let s = long64();
    let c = all_caps();
    let cr0 = s.cr0;
    assert_eq!(cr::check_write(0, cr0, &s, &c), OK);
    assert_eq!(cr::check_write(0, cr0 | 1 << 32, &s, &c), GP, "bits 63:32");
    assert_eq!(
        cr::check_write(0, cr0 | cr0::NW, &s, &c),
        GP,
        "NW without CD"
    );
    assert_eq!(cr::check_write(0, cr0 | cr0::NW | cr0::CD, &s, &c), OK);
    assert_eq!(
        cr::check_write(0, cr0 & !cr0::PG, &s, &c),
        GP,
        "clearing PG in 64-bit mode"
    );
    assert_eq!(
        cr::check_write(0, cr0 & !cr0::PG, &compat(), &c),
        OK,
        "compatibility mode may leave IA-32e mode"
    );
    let p = prot32();
    assert_eq!(
        cr::check_write(0, cr0::PG | cr0::ET, &p, &c),
        GP,
        "PG without PE"
    );
    assert_eq!(cr::check_write(0, p.cr0 | cr0::PG, &p, &c), OK);
    // Enabling paging with EFER.LME: needs CR4.PAE, and CS.L clear.
    let mut p = prot32();
    p.efer |= efer::LME;
    assert_eq!(
        cr::check_write(0, p.cr0 | cr0::PG, &p, &c),
        GP,
        "LME without PAE"
    );
    p.cr4 |= cr4::PAE;
    assert_eq!(cr::check_write(0, p.cr0 | cr0::PG, &p, &c), OK);
    p.seg[Seg::Cs as usize].attrs = attrs::CODE64;
    assert_eq!(cr::check_write(0, p.cr0 | cr0::PG, &p, &c), GP, "CS.L set");
    // Clearing PG with CR4.PCIDE set; clearing WP with CR4.CET set.
    let mut p = compat();
    p.cr4 |= cr4::PCIDE;
    assert_eq!(cr::check_write(0, p.cr0 & !cr0::PG, &p, &c), GP);
    let mut s = long64();
    s.cr4 |= cr4::CET;
    assert_eq!(cr::check_write(0, s.cr0 & !cr0::WP, &s, &c), GP);
}

#[test]
fn cr4_reserved_and_feature_bits() {
    let s = long64();
    let base = s.cr4;
    let c = all_caps();
    let none = no_caps();
    for bit in [15, 26, 27, 29, 30, 31, 33, 63] {
        assert_eq!(
            cr::check_write(4, base | 1 << bit, &s, &c),
            GP,
            "bit {bit} is reserved on every CPU"
        );
    }
    let features = [
        ("VMXE", cr4::VMXE),
        ("SMXE", cr4::SMXE),
        ("UMIP", cr4::UMIP),
        ("FSGSBASE", cr4::FSGSBASE),
        ("OSXSAVE", cr4::OSXSAVE),
        ("KL", cr4::KL),
        ("SMEP", cr4::SMEP),
        ("SMAP", cr4::SMAP),
        ("PKE", cr4::PKE),
        ("CET", cr4::CET),
        ("PKS", cr4::PKS),
        ("UINTR", cr4::UINTR),
        ("LAM_SUP", cr4::LAM_SUP),
        ("FRED", cr4::FRED),
    ];
    let base = base & !cr4::OSXSAVE;
    for (name, bit) in features {
        assert_eq!(
            cr::check_write(4, base | bit, &s, &c),
            OK,
            "{name} with the feature"
        );
        assert_eq!(
            cr::check_write(4, base | bit, &s, &none),
            GP,
            "{name} without the feature"
        );
    }
    // Legacy bits are not tied to CPUID (as on KVM).
    let legacy = cr4::VME | cr4::PVI | cr4::TSD | cr4::DE | cr4::PSE | cr4::MCE | cr4::PGE;
    let legacy = legacy | cr4::PCE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    assert_eq!(cr::check_write(4, base | legacy, &s, &none), OK);
    // VMXE on the test guest's default CPUID (no VMX).
    let mut g = TestGuest::long_mode(1 << 20);
    let caps = avex_core::guest::Guest::cpu_caps(&mut g);
    assert_eq!(
        cr::check_write(4, g.state.cr4 | cr4::VMXE, &g.state, &caps),
        GP
    );
}

#[test]
fn cr4_mode_rules() {
    let c = all_caps();
    let s = long64();
    assert_eq!(
        cr::check_write(4, s.cr4 & !cr4::PAE, &s, &c),
        GP,
        "clearing PAE in IA-32e mode"
    );
    assert_eq!(
        cr::check_write(4, s.cr4 | cr4::LA57, &s, &c),
        GP,
        "changing LA57 in IA-32e mode"
    );
    // PCIDE: only in IA-32e mode, only with CR3[11:0] = 0, only on a 0-to-1 change.
    assert_eq!(cr::check_write(4, s.cr4 | cr4::PCIDE, &s, &c), OK);
    let mut t = long64();
    t.cr3 |= 0x8;
    assert_eq!(cr::check_write(4, t.cr4 | cr4::PCIDE, &t, &c), GP);
    t.cr4 |= cr4::PCIDE;
    assert_eq!(cr::check_write(4, t.cr4, &t, &c), OK, "already set");
    let p = prot32();
    assert_eq!(
        cr::check_write(4, p.cr4 | cr4::PCIDE, &p, &c),
        GP,
        "not IA-32e"
    );
    assert_eq!(cr::check_write(4, p.cr4 | cr4::LA57 | cr4::PAE, &p, &c), OK);
    // CET needs CR0.WP.
    let mut p = prot32();
    p.cr0 &= !cr0::WP;
    assert_eq!(cr::check_write(4, p.cr4 | cr4::CET, &p, &c), GP);
}

#[test]
fn cr3_rules() {
    let c = all_caps(); // MAXPHYADDR 46
    let s = long64();
    assert_eq!(cr::check_write(3, (1 << 46) - 0x1000, &s, &c), OK);
    assert_eq!(cr::check_write(3, 1 << 46, &s, &c), GP, "above MAXPHYADDR");
    assert_eq!(
        cr::check_write(3, 1 << 63 | 0x1000, &s, &c),
        GP,
        "bit 63 without PCIDE"
    );
    let mut p = long64();
    p.cr4 |= cr4::PCIDE;
    assert_eq!(
        cr::check_write(3, 1 << 63 | 0x1001, &p, &c),
        OK,
        "no-flush bit"
    );
    assert_eq!(cr::check_write(3, 3 << 61 | 0x1000, &s, &c), OK, "LAM bits");
    assert_eq!(
        cr::check_write(3, 3 << 61 | 0x1000, &s, &no_caps()),
        GP,
        "LAM bits without LAM"
    );
    assert_eq!(
        cr::check_write(3, 1 << 36, &s, &no_caps()),
        GP,
        "MAXPHYADDR 36"
    );
    // Outside IA-32e mode CR3 is 32 bits wide: nothing to refuse.
    assert_eq!(cr::check_write(3, 0xffff_f000, &prot32(), &no_caps()), OK);
}

#[test]
fn cr8_and_other_registers() {
    let s = long64();
    let c = all_caps();
    assert_eq!(cr::check_write(8, 0xf, &s, &c), OK);
    assert_eq!(cr::check_write(8, 0x10, &s, &c), GP, "bits 63:4");
    assert_eq!(cr::check_write(2, u64::MAX, &s, &c), OK);
    for n in [1, 5, 6, 7, 9, 15] {
        assert_eq!(
            cr::check_write(n, 0, &s, &c),
            Err(Fault::InvalidOpcode),
            "CR{n}"
        );
    }
}

#[test]
fn linear_address_msrs_refuse_non_canonical_values() {
    let c48 = no_caps();
    let c57 = all_caps();
    let non48 = 0x0000_8000_0000_0000u64; // canonical in 57 bits only
    let non57 = 0x0100_0000_0000_0000u64;
    for msr in cr::LINEAR_ADDRESS_MSRS {
        assert_eq!(cr::check_wrmsr(msr, 0xffff_8000_0000_0000, &c48), OK);
        assert_eq!(cr::check_wrmsr(msr, non48, &c48), GP, "{msr:#x}");
        assert_eq!(cr::check_wrmsr(msr, non48, &c57), OK, "{msr:#x}, LA57");
        assert_eq!(cr::check_wrmsr(msr, non57, &c57), GP, "{msr:#x}, LA57");
    }
    assert!(
        cr::LINEAR_ADDRESS_MSRS.contains(&msr::KERNEL_GS_BASE),
        "KERNEL_GS_BASE"
    );
    assert_eq!(
        cr::check_wrmsr(msr::APIC_BASE, non57, &c48),
        OK,
        "not an address MSR"
    );
}

#[test]
fn pdpte_loading_checks_reserved_bits_of_present_entries() {
    let mut g = TestGuest::new(1 << 20);
    let caps = no_caps(); // MAXPHYADDR 36
    let pdpt = 0x2000u64;
    let entries = [0x3001u64, 0, 0x5001, 0xffff_fffe];
    for (i, e) in entries.iter().enumerate() {
        g.write_bytes(pdpt + 8 * i as u64, &e.to_le_bytes());
    }
    // Not-present entries may hold anything; CR3 bits 4:0 are ignored.
    assert_eq!(cr::load_pdptes(&mut g, pdpt | 0x18, &caps), Ok(entries));
    for bad in [1 << 1, 1 << 2, 1 << 5, 1 << 8, 1 << 36, 1 << 63] {
        g.write_bytes(pdpt + 8, &(0x4001u64 | bad).to_le_bytes());
        assert_eq!(
            cr::load_pdptes(&mut g, pdpt, &caps),
            Err(PdpteError::Fault(Fault::GeneralProtection)),
            "bit {}",
            bad.trailing_zeros()
        );
    }
    assert_eq!(
        cr::load_pdptes(&mut g, 0x10_0000, &caps),
        Err(PdpteError::NotRam { gpa: 0x10_0000 })
    );
    // Which writes load them.
    let mut pae = TestGuest::protected32(1 << 20, Paging::Pae).state;
    let before = pae.clone();
    assert!(cr::loads_pdptes(3, &before, &pae));
    pae.cr4 |= cr4::PGE;
    assert!(cr::loads_pdptes(4, &before, &pae));
    let mut tsd = before.clone();
    tsd.cr4 |= cr4::TSD;
    assert!(!cr::loads_pdptes(4, &before, &tsd));
    let off = prot32();
    let mut on = off.clone();
    on.cr4 |= cr4::PAE;
    on.cr0 |= cr0::PG;
    assert!(cr::loads_pdptes(0, &off, &on), "enabling PAE paging");
    assert!(!cr::loads_pdptes(3, &long64(), &long64()), "4-level paging");
}
