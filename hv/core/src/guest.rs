//! The one guest-access trait every backend implements (VT-x, KVM, and the test
//! guest in memory). The engine and the exit handler see guests only through it.

use crate::ir::Seg;

/// A segment register's hidden state, as far as the engine needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Access rights in the VMCS layout (type, S, DPL, P, AVL, L, D/B, G at bits
    /// 0..=15); bit 16 set means unusable.
    pub attrs: u32,
}

impl Segment {
    /// D/B bit: 32-bit default operand/stack size.
    pub fn db(&self) -> bool {
        self.attrs & (1 << 14) != 0
    }
    /// L bit: 64-bit code segment.
    pub fn long(&self) -> bool {
        self.attrs & (1 << 13) != 0
    }
    pub fn dpl(&self) -> u8 {
        ((self.attrs >> 5) & 3) as u8
    }
}

/// The guest CPU state the engine reads at the start of a cluster run and writes
/// back at its end (one bulk get/set per run, not one call per register).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// ES, CS, SS, DS, FS, GS in `Seg` order.
    pub seg: [Segment; 6],
    /// The four PDPTE registers of PAE paging, loaded by the CPU at the last MOV to
    /// CR3 (or the CR0/CR4 write that enabled PAE paging); PAE walks use them, not
    /// memory. `None`: the backend does not supply them, and the engine's walks read
    /// them from memory at CR3 until the engine itself loads them (at every MOV to
    /// CR3/CR0/CR4 that loads them on the CPU: `engine::cr::loads_pdptes`). A
    /// backend that receives `Some` in `set_state` must make the vCPU use exactly
    /// these values.
    pub pdpte: Option<[u64; 4]>,
}

impl CpuState {
    pub fn segment(&self, s: Seg) -> &Segment {
        &self.seg[s as usize]
    }
    pub fn segment_mut(&mut self, s: Seg) -> &mut Segment {
        &mut self.seg[s as usize]
    }
    /// Current privilege level (CS.DPL, which equals SS.DPL outside transitions).
    pub fn cpl(&self) -> u8 {
        self.seg[Seg::Cs as usize].dpl()
    }
}

/// What the guest's CPUID says the vCPU supports, as far as the checks of control
/// register and MSR writes need it (see [`crate::engine::cr`]). Derived once from
/// CPUID by [`CpuCaps::from_cpuid`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCaps {
    /// Physical-address width (CPUID 0x80000008 EAX[7:0]; 36 with PAE, else 32,
    /// when that leaf is absent).
    pub maxphyaddr: u8,
    /// 5-level paging (CPUID 7.0 ECX[16]): linear addresses are 57 bits wide.
    pub la57: bool,
    pub vmx: bool,
    pub smx: bool,
    pub pcid: bool,
    pub xsave: bool,
    pub fsgsbase: bool,
    pub smep: bool,
    pub smap: bool,
    pub umip: bool,
    pub pku: bool,
    pub pks: bool,
    /// CET: shadow stacks (7.0 ECX[7]) or indirect-branch tracking (7.0 EDX[20]).
    pub cet: bool,
    pub keylocker: bool,
    pub uintr: bool,
    pub lam: bool,
    pub fred: bool,
}

impl CpuCaps {
    /// Reads the leaves it needs through `cpuid(leaf, subleaf)`, honouring the
    /// maximum basic and extended leaves.
    pub fn from_cpuid(mut cpuid: impl FnMut(u32, u32) -> [u32; 4]) -> CpuCaps {
        use crate::arch::cpuid::*;
        let has = |r: u32, bit: u32| r & bit != 0;
        let max = cpuid(LEAF_MAX, 0)[0];
        let l1 = if max >= LEAF_FEATURES {
            cpuid(LEAF_FEATURES, 0)
        } else {
            [0; 4]
        };
        let l7 = if max >= LEAF_EXT_FEATURES {
            cpuid(LEAF_EXT_FEATURES, 0)
        } else {
            [0; 4]
        };
        let l7_1 = if max >= LEAF_EXT_FEATURES && l7[0] >= 1 {
            cpuid(LEAF_EXT_FEATURES, 1)
        } else {
            [0; 4]
        };
        let max_ext = cpuid(LEAF_EXT_MAX, 0)[0];
        let maxphyaddr = if (LEAF_ADDRESS_SIZES..0x8000_ffff).contains(&max_ext) {
            (cpuid(LEAF_ADDRESS_SIZES, 0)[0] & 0xff) as u8
        } else if has(l1[3], L1_EDX_PAE) {
            36
        } else {
            32
        };
        CpuCaps {
            maxphyaddr: maxphyaddr.clamp(32, 52),
            la57: has(l7[2], L7_ECX_LA57),
            vmx: has(l1[2], L1_ECX_VMX),
            smx: has(l1[2], L1_ECX_SMX),
            pcid: has(l1[2], L1_ECX_PCID),
            xsave: has(l1[2], L1_ECX_XSAVE),
            fsgsbase: has(l7[1], L7_EBX_FSGSBASE),
            smep: has(l7[1], L7_EBX_SMEP),
            smap: has(l7[1], L7_EBX_SMAP),
            umip: has(l7[2], L7_ECX_UMIP),
            pku: has(l7[2], L7_ECX_PKU),
            pks: has(l7[2], L7_ECX_PKS),
            cet: has(l7[2], L7_ECX_CET_SS) || has(l7[3], L7_EDX_CET_IBT),
            keylocker: has(l7[2], L7_ECX_KEYLOCKER),
            uintr: has(l7[3], L7_EDX_UINTR),
            lam: has(l7_1[0], L7_1_EAX_LAM),
            fred: has(l7_1[0], L7_1_EAX_FRED),
        }
    }

    /// Width of a canonical linear address (57 with 5-level paging support: MSRs
    /// holding linear addresses are checked against the widest the CPU has).
    pub fn linear_bits(&self) -> u32 {
        if self.la57 {
            57
        } else {
            48
        }
    }
}

/// An exception the guest should take, with its error code where it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// #GP(0)
    GeneralProtection,
    /// #UD
    InvalidOpcode,
    /// #PF with the address and error code.
    PageFault { addr: u64, error_code: u32 },
}

/// Why a guest-physical access failed: the address is not backed by guest RAM
/// (MMIO or outside the guest). The engine stops the cluster before such an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotRam {
    pub gpa: u64,
}

/// What a backend lets the engine do to its guest.
pub trait Guest {
    fn state(&mut self) -> CpuState;
    fn set_state(&mut self, state: &CpuState);

    /// Guest-physical memory. Backends bound-check against the guest's RAM.
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam>;
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam>;

    /// Port I/O to the device models. `size` is 1, 2 or 4 bytes.
    fn port_in(&mut self, port: u16, size: u8) -> u32;
    fn port_out(&mut self, port: u16, size: u8, value: u32);
    /// True once a device has asked the VMM to stop the guest (the debug-exit port
    /// was written). The engine asks after every port write and ends the cluster
    /// right after that instruction, so nothing the guest does later happens.
    fn stop_requested(&mut self) -> bool {
        false
    }

    fn rdmsr(&mut self, msr: u32) -> Result<u64, Fault>;
    fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), Fault>;
    /// CPUID as the guest should see it (the backend's configured leaves).
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The features control-register and MSR writes are checked against. The
    /// engine asks at most once per run, and only when it runs such a write; a
    /// backend may cache the answer (CPUID's feature bits do not change at run time).
    fn cpu_caps(&mut self) -> CpuCaps {
        CpuCaps::from_cpuid(|leaf, subleaf| self.cpuid(leaf, subleaf))
    }
    /// The guest's TSC now (RDTSC/RDTSCP inside a cluster read this).
    fn tsc(&mut self) -> u64;
    fn xgetbv(&mut self, index: u32) -> Result<u64, Fault>;
    fn xsetbv(&mut self, index: u32, value: u64) -> Result<(), Fault>;
    /// IA32_TSC_AUX for RDTSCP.
    fn tsc_aux(&mut self) -> u64 {
        self.rdmsr(crate::arch::msr::TSC_AUX).unwrap_or(0)
    }
    /// True when an interrupt is waiting that the guest could take now; the engine
    /// checks it at back-edges and stops the cluster so it is delivered. The engine
    /// asks only while its own copy of the guest's RFLAGS.IF is set: the backend's
    /// copy is stale inside a run (a CLI the engine ran has not reached it).
    fn interrupt_pending(&mut self) -> bool;
    /// Called after the engine writes guest memory or control registers that may
    /// affect the backend (paging caches, EPT write protection of code pages).
    fn invalidate_tlb(&mut self) {}
}
