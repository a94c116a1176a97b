//! x86 architectural facts: control-register, EFER and RFLAGS bits, MSR numbers,
//! CPUID leaves and feature bits, paging-structure entry bits, exception vectors.
//! Each is written here once; the engine, the exit handler, the boot loader and
//! both backends import them. VT-x facts (VMCS field encodings, exit reasons,
//! VMX capability MSRs) are hv/vmx's own.
//!
//! Sources: Intel SDM vol. 3A (chapter 2 for CR0/CR3/CR4/EFER/RFLAGS, chapter 4 for
//! paging, chapter 6 for vectors), vol. 4 (MSRs), vol. 2A (CPUID); AMD APM vol. 2
//! agrees for the bits both define.

/// CR0 bits (SDM 2.5, "Control Registers").
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation.
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Extension type (hard-wired to 1 on every CPU since the i486).
    pub const ET: u64 = 1 << 4;
    /// Numeric error (native x87 error reporting).
    pub const NE: u64 = 1 << 5;
    /// Write protect (supervisor writes honour R/W).
    pub const WP: u64 = 1 << 16;
    /// Alignment mask.
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
    /// The bits LMSW can write (PE, MP, EM, TS; SDM vol. 2A, LMSW).
    pub const LMSW_BITS: u64 = PE | MP | EM | TS;
}

/// CR3 bits (SDM 4.5, 4.10.4.1, 4.4.1; LAM: ISE chapter 10).
pub mod cr3 {
    /// Page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Bits 62:61 (LAM_U57, LAM_U48) where LAM is supported.
    pub const LAM: u64 = 3 << 61;
    /// Bit 63 with CR4.PCIDE: "do not flush", not part of the value.
    pub const NOFLUSH: u64 = 1 << 63;
    /// Under PAE paging, the PDPT's address (bits 31:5).
    pub const PAE_PDPT: u64 = 0xffff_ffe0;
}

/// CR4 bits (SDM 2.5, "Control Registers").
pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const LA57: u64 = 1 << 12;
    pub const VMXE: u64 = 1 << 13;
    pub const SMXE: u64 = 1 << 14;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const PCIDE: u64 = 1 << 17;
    pub const OSXSAVE: u64 = 1 << 18;
    /// Key Locker.
    pub const KL: u64 = 1 << 19;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
    pub const PKE: u64 = 1 << 22;
    pub const CET: u64 = 1 << 23;
    pub const PKS: u64 = 1 << 24;
    pub const UINTR: u64 = 1 << 25;
    /// LAM for supervisor pointers.
    pub const LAM_SUP: u64 = 1 << 28;
    pub const FRED: u64 = 1 << 32;
    /// The bits that exist on some CPU; every other bit is reserved everywhere.
    pub const DEFINED: u64 = VME
        | PVI
        | TSD
        | DE
        | PSE
        | PAE
        | MCE
        | PGE
        | PCE
        | OSFXSR
        | OSXMMEXCPT
        | UMIP
        | LA57
        | VMXE
        | SMXE
        | FSGSBASE
        | PCIDE
        | OSXSAVE
        | KL
        | SMEP
        | SMAP
        | PKE
        | CET
        | PKS
        | UINTR
        | LAM_SUP
        | FRED;
}

/// IA32_EFER bits (SDM 2.2.1, vol. 4 table 2-2).
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// IA-32e mode enable.
    pub const LME: u64 = 1 << 8;
    /// IA-32e mode active (read-only: follows LME and CR0.PG).
    pub const LMA: u64 = 1 << 10;
    /// Execute-disable enable.
    pub const NXE: u64 = 1 << 11;
}

/// RFLAGS bits (SDM 3.4.3).
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    /// Bit 1: reserved, always reads 1.
    pub const FIXED: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume flag (suppresses instruction breakpoints for one instruction).
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check / access control (SMAP).
    pub const AC: u64 = 1 << 18;
    /// Virtual interrupt flag and virtual interrupt pending (VME/PVI).
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    /// CPUID available (software toggles it to detect CPUID).
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// MSR numbers (SDM vol. 4, chapter 2) and the architectural values they hold.
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1b;
    /// IA32_FEATURE_CONTROL; bits in [`feature_control`].
    pub const FEATURE_CONTROL: u32 = 0x3a;
    /// Microcode revision (write 0, CPUID, read: the revision in EDX).
    pub const UCODE_REV: u32 = 0x8b;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// Variable-range MTRRs: PHYSBASE0/PHYSMASK0 .. PHYSBASE15/PHYSMASK15.
    pub const MTRR_PHYS_FIRST: u32 = 0x200;
    pub const MTRR_PHYS_LAST: u32 = 0x21f;
    /// Fixed-range MTRRs (MTRRfix64K_00000 .. MTRRfix4K_F8000).
    pub const MTRR_FIX_FIRST: u32 = 0x250;
    pub const MTRR_FIX_LAST: u32 = 0x26f;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const DS_AREA: u32 = 0x600;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const FMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;

    /// IA32_APIC_BASE after reset: xAPIC at 0xfee0_0000, enabled (bit 11), this
    /// CPU the bootstrap processor (bit 8).
    pub const APIC_BASE_RESET: u64 = 0xfee0_0900;
    /// IA32_PAT after reset (SDM 13.12.4: WB, WT, UC-, UC, twice).
    pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
    /// IA32_MISC_ENABLE bit 0: fast-strings enable.
    pub const MISC_ENABLE_FAST_STRINGS: u64 = 1 << 0;

    /// IA32_FEATURE_CONTROL bits.
    pub mod feature_control {
        pub const LOCK: u64 = 1 << 0;
        pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
    }
}

/// CPUID leaves and the feature bits avex reads or changes (SDM vol. 2A, CPUID).
/// Bit constants are named by leaf and output register.
pub mod cpuid {
    /// Maximum basic leaf (EAX) and vendor.
    pub const LEAF_MAX: u32 = 0;
    /// Version and feature information.
    pub const LEAF_FEATURES: u32 = 1;
    /// Structured extended features (subleaf 0 and 1).
    pub const LEAF_EXT_FEATURES: u32 = 7;
    /// Extended topology (x2APIC ID in EDX).
    pub const LEAF_TOPOLOGY: u32 = 0xb;
    /// V2 extended topology (x2APIC ID in EDX).
    pub const LEAF_TOPOLOGY_V2: u32 = 0x1f;
    /// Maximum extended leaf (EAX).
    pub const LEAF_EXT_MAX: u32 = 0x8000_0000;
    /// Physical- and linear-address sizes (EAX[7:0], EAX[15:8]).
    pub const LEAF_ADDRESS_SIZES: u32 = 0x8000_0008;
    /// AMD extended APIC ID (EAX).
    pub const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

    /// Thermal and power management.
    pub const LEAF_THERMAL_POWER: u32 = 6;
    /// Architectural performance monitoring.
    pub const LEAF_PERFMON: u32 = 0xa;
    /// XSAVE state components.
    pub const LEAF_XSAVE: u32 = 0xd;
    /// TSC and core crystal clock ratio.
    pub const LEAF_TSC_CRYSTAL: u32 = 0x15;
    /// Processor base, maximum and bus frequencies.
    pub const LEAF_FREQUENCIES: u32 = 0x16;
    /// First hypervisor leaf: EAX = the highest hypervisor leaf, EBX:ECX:EDX = the
    /// hypervisor's 12-byte signature.
    pub const LEAF_HYPERVISOR: u32 = 0x4000_0000;
    /// Last leaf of the range reserved for hypervisors.
    pub const LEAF_HYPERVISOR_LAST: u32 = 0x4fff_ffff;

    /// Leaf 1, EBX[31:24]: initial APIC ID.
    pub const L1_EBX_APIC_ID: u32 = 0xff00_0000;
    pub const L1_ECX_DTES64: u32 = 1 << 2;
    pub const L1_ECX_MONITOR: u32 = 1 << 3;
    pub const L1_ECX_DS_CPL: u32 = 1 << 4;
    pub const L1_ECX_VMX: u32 = 1 << 5;
    pub const L1_ECX_SMX: u32 = 1 << 6;
    pub const L1_ECX_EST: u32 = 1 << 7;
    pub const L1_ECX_TM2: u32 = 1 << 8;
    pub const L1_ECX_XTPR: u32 = 1 << 14;
    pub const L1_ECX_PDCM: u32 = 1 << 15;
    pub const L1_ECX_PCID: u32 = 1 << 17;
    pub const L1_ECX_X2APIC: u32 = 1 << 21;
    pub const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
    pub const L1_ECX_XSAVE: u32 = 1 << 26;
    /// Mirrors CR4.OSXSAVE.
    pub const L1_ECX_OSXSAVE: u32 = 1 << 27;
    /// Reserved for a hypervisor to say the CPU is virtual.
    pub const L1_ECX_HYPERVISOR: u32 = 1 << 31;
    pub const L1_EDX_PAE: u32 = 1 << 6;
    pub const L1_EDX_MCE: u32 = 1 << 7;
    pub const L1_EDX_APIC: u32 = 1 << 9;
    pub const L1_EDX_MTRR: u32 = 1 << 12;
    pub const L1_EDX_MCA: u32 = 1 << 14;
    pub const L1_EDX_DS: u32 = 1 << 21;
    pub const L1_EDX_ACPI: u32 = 1 << 22;
    pub const L1_EDX_TM: u32 = 1 << 29;
    pub const L1_EDX_PBE: u32 = 1 << 31;
    /// Leaf 1, ECX[28] and leaf 7 EBX's AVX2/AVX-512 need XSAVE.
    pub const L1_ECX_AVX: u32 = 1 << 28;

    pub const L7_EBX_FSGSBASE: u32 = 1 << 0;
    pub const L7_EBX_BMI1: u32 = 1 << 3;
    pub const L7_EBX_SMEP: u32 = 1 << 7;
    pub const L7_EBX_BMI2: u32 = 1 << 8;
    pub const L7_EBX_ERMS: u32 = 1 << 9;
    pub const L7_EBX_ADX: u32 = 1 << 19;
    pub const L7_EBX_SMAP: u32 = 1 << 20;
    pub const L7_EBX_CLFLUSHOPT: u32 = 1 << 23;
    pub const L7_ECX_UMIP: u32 = 1 << 2;
    pub const L7_ECX_PKU: u32 = 1 << 3;
    /// CET shadow stacks.
    pub const L7_ECX_CET_SS: u32 = 1 << 7;
    pub const L7_ECX_LA57: u32 = 1 << 16;
    pub const L7_ECX_KEYLOCKER: u32 = 1 << 23;
    pub const L7_ECX_PKS: u32 = 1 << 31;
    pub const L7_EDX_UINTR: u32 = 1 << 5;
    /// CET indirect-branch tracking.
    pub const L7_EDX_CET_IBT: u32 = 1 << 20;
    /// Leaf 7 subleaf 1, EAX.
    pub const L7_1_EAX_FRED: u32 = 1 << 17;
    pub const L7_1_EAX_LAM: u32 = 1 << 26;
}

/// XCR0 state-component bits (SDM 13.3).
pub mod xcr0 {
    /// x87 state (always set).
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
    pub const AVX: u64 = 1 << 2;
}

/// Paging-structure entry bits (SDM 4.3, 4.4, 4.5).
pub mod pte {
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    /// Page size: the entry maps a large page (in a PDE or PDPTE).
    pub const PS: u64 = 1 << 7;
    pub const NX: u64 = 1 << 63;
    /// PAE paging's PDPTEs: reserved bits 2:1 and 8:5 (SDM 4.4.1).
    pub const PDPTE_RSVD: u64 = 0x1e6;
}

/// Page-fault error code bits (SDM 4.7).
pub mod pfec {
    pub const P: u32 = 1 << 0;
    pub const W: u32 = 1 << 1;
    pub const U: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    /// Instruction fetch.
    pub const ID: u32 = 1 << 4;
}

/// Exception vectors (SDM 6.3.1, table 6-1).
pub mod vector {
    /// #UD
    pub const INVALID_OPCODE: u8 = 6;
    /// #GP
    pub const GENERAL_PROTECTION: u8 = 13;
    /// #PF
    pub const PAGE_FAULT: u8 = 14;
}

/// Debug-register values after reset (SDM 18.2.3, 18.2.4).
pub mod dr {
    pub const DR6_RESET: u64 = 0xffff_0ff0;
    pub const DR7_RESET: u64 = 0x400;
}
