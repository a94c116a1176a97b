//! The exit policy: which instructions exit under the hypervisor's configuration.
//! One policy value is shared by the hypervisor (it configures the VMCS / KVM from
//! it) and by the AOT pass (it clusters by it), so both agree on what exits.

use serde::{Deserialize, Serialize};

/// Every x86 instruction class that can exit under VT-x. `name()` gives the upper-case
/// name used in reports and JSON (`OUT`, `MOV_TO_CR3`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ExitClass {
    In,
    Out,
    Ins,
    Outs,
    Rdmsr,
    Wrmsr,
    MovToCr0,
    MovFromCr0,
    MovToCr3,
    MovFromCr3,
    MovToCr4,
    MovFromCr4,
    MovToCr8,
    MovFromCr8,
    Clts,
    Lmsw,
    Cpuid,
    Hlt,
    Invlpg,
    Invpcid,
    Wbinvd,
    Invd,
    Xsetbv,
    Xgetbv,
    Rdtsc,
    Rdtscp,
    Rdpmc,
    Vmcall,
    /// VMLAUNCH, VMRESUME, VMPTRLD, VMREAD, VMWRITE, VMXON, VMXOFF, INVEPT, INVVPID, ...
    VmxInstruction,
    Monitor,
    Mwait,
    Lgdt,
    Lidt,
    Lldt,
    Ltr,
    Sgdt,
    Sidt,
    Sldt,
    Str,
    MovToDr,
    MovFromDr,
    Pause,
    Rdrand,
    Rdseed,
    Getsec,
    Invlpga,
    Rsm,
}
