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

    fn rdmsr(&mut self, msr: u32) -> Result<u64, Fault>;
    fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), Fault>;
    /// CPUID as the guest should see it (the backend's configured leaves).
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The guest's TSC now (RDTSC/RDTSCP inside a cluster read this).
    fn tsc(&mut self) -> u64;
    fn xgetbv(&mut self, index: u32) -> Result<u64, Fault>;
    fn xsetbv(&mut self, index: u32, value: u64) -> Result<(), Fault>;
    /// IA32_TSC_AUX for RDTSCP.
    fn tsc_aux(&mut self) -> u64 {
        self.rdmsr(0xc000_0103).unwrap_or(0)
    }
    /// True when an interrupt is waiting that the guest could take now; the engine
    /// checks it at back-edges and stops the cluster so it is delivered.
    fn interrupt_pending(&mut self) -> bool;
    /// Called after the engine writes guest memory or control registers that may
    /// affect the backend (paging caches, EPT write protection of code pages).
    fn invalidate_tlb(&mut self) {}
}
