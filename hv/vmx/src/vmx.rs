//! VMX: capability checks, VMXON, the VMCS and its controls, VM entry and exit.
//!
//! Every control is chosen against the capability MSRs (the TRUE_* ones when
//! IA32_VMX_BASIC bit 55 says they exist): a bit the CPU requires is set whatever we
//! want, a bit the CPU cannot set is left clear, and a bit we cannot do without
//! (EPT, unrestricted guest, secondary controls, I/O and MSR bitmaps) makes setup
//! fail with the reason.

use alloc::boxed::Box;
use alloc::string::String;
use core::arch::asm;
use core::fmt;

use x86_64::registers::control::{Cr0, Cr4};
use x86_64::registers::model_specific::Msr;

use avex_core::arch::msr::{feature_control, FEATURE_CONTROL};
use avex_core::arch::{cpuid, cr4};

// --- VMX capability MSRs (SDM Appendix A); the x86 ones are in avex_core::arch::msr ----
pub const IA32_VMX_BASIC: u32 = 0x480;
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
pub const IA32_VMX_MISC: u32 = 0x485;
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

// --- VMCS fields (SDM Appendix B) --------------------------------------------------------
pub mod field {
    pub const VPID: u64 = 0x0000;
    pub const GUEST_ES_SEL: u64 = 0x0800;
    pub const GUEST_LDTR_SEL: u64 = 0x080c;
    pub const GUEST_TR_SEL: u64 = 0x080e;
    pub const HOST_ES_SEL: u64 = 0x0c00;
    pub const HOST_CS_SEL: u64 = 0x0c02;
    pub const HOST_SS_SEL: u64 = 0x0c04;
    pub const HOST_DS_SEL: u64 = 0x0c06;
    pub const HOST_FS_SEL: u64 = 0x0c08;
    pub const HOST_GS_SEL: u64 = 0x0c0a;
    pub const HOST_TR_SEL: u64 = 0x0c0c;
    pub const IO_BITMAP_A: u64 = 0x2000;
    pub const IO_BITMAP_B: u64 = 0x2002;
    pub const MSR_BITMAP: u64 = 0x2004;
    pub const EPT_POINTER: u64 = 0x201a;
    pub const TSC_OFFSET: u64 = 0x2010;
    pub const GUEST_PHYSICAL_ADDRESS: u64 = 0x2400;
    pub const VMCS_LINK_POINTER: u64 = 0x2800;
    pub const GUEST_DEBUGCTL: u64 = 0x2802;
    pub const GUEST_PAT: u64 = 0x2804;
    pub const GUEST_EFER: u64 = 0x2806;
    /// GUEST_PDPTE0; PDPTE1..3 follow at +2, +4, +6.
    pub const GUEST_PDPTE0: u64 = 0x280a;
    pub const HOST_EFER: u64 = 0x2c02;
    pub const PIN_CONTROLS: u64 = 0x4000;
    pub const PROC_CONTROLS: u64 = 0x4002;
    pub const EXCEPTION_BITMAP: u64 = 0x4004;
    pub const CR3_TARGET_COUNT: u64 = 0x400a;
    pub const EXIT_CONTROLS: u64 = 0x400c;
    pub const EXIT_MSR_STORE_COUNT: u64 = 0x400e;
    pub const EXIT_MSR_LOAD_COUNT: u64 = 0x4010;
    pub const ENTRY_CONTROLS: u64 = 0x4012;
    pub const ENTRY_MSR_LOAD_COUNT: u64 = 0x4014;
    pub const ENTRY_INTR_INFO: u64 = 0x4016;
    pub const ENTRY_EXCEPTION_ERROR: u64 = 0x4018;
    pub const PROC_CONTROLS2: u64 = 0x401e;
    pub const VM_INSTRUCTION_ERROR: u64 = 0x4400;
    pub const EXIT_REASON: u64 = 0x4402;
    pub const EXIT_INSTRUCTION_LEN: u64 = 0x440c;
    pub const GUEST_ES_LIMIT: u64 = 0x4800;
    pub const GUEST_LDTR_LIMIT: u64 = 0x480c;
    pub const GUEST_TR_LIMIT: u64 = 0x480e;
    pub const GUEST_GDTR_LIMIT: u64 = 0x4810;
    pub const GUEST_IDTR_LIMIT: u64 = 0x4812;
    pub const GUEST_ES_AR: u64 = 0x4814;
    pub const GUEST_LDTR_AR: u64 = 0x4820;
    pub const GUEST_TR_AR: u64 = 0x4822;
    pub const GUEST_INTERRUPTIBILITY: u64 = 0x4824;
    pub const GUEST_ACTIVITY: u64 = 0x4826;
    pub const PREEMPTION_TIMER: u64 = 0x482e;
    pub const GUEST_SYSENTER_CS: u64 = 0x482a;
    pub const HOST_SYSENTER_CS: u64 = 0x4c00;
    pub const CR0_MASK: u64 = 0x6000;
    pub const CR4_MASK: u64 = 0x6002;
    pub const CR0_READ_SHADOW: u64 = 0x6004;
    pub const CR4_READ_SHADOW: u64 = 0x6006;
    pub const EXIT_QUALIFICATION: u64 = 0x6400;
    pub const GUEST_LINEAR_ADDRESS: u64 = 0x640a;
    pub const GUEST_CR0: u64 = 0x6800;
    pub const GUEST_CR3: u64 = 0x6802;
    pub const GUEST_CR4: u64 = 0x6804;
    pub const GUEST_ES_BASE: u64 = 0x6806;
    pub const GUEST_LDTR_BASE: u64 = 0x6812;
    pub const GUEST_TR_BASE: u64 = 0x6814;
    pub const GUEST_GDTR_BASE: u64 = 0x6816;
    pub const GUEST_IDTR_BASE: u64 = 0x6818;
    pub const GUEST_DR7: u64 = 0x681a;
    pub const GUEST_RSP: u64 = 0x681c;
    pub const GUEST_RIP: u64 = 0x681e;
    pub const GUEST_RFLAGS: u64 = 0x6820;
    pub const GUEST_PENDING_DBG: u64 = 0x6822;
    pub const GUEST_SYSENTER_ESP: u64 = 0x6824;
    pub const GUEST_SYSENTER_EIP: u64 = 0x6826;
    pub const HOST_CR0: u64 = 0x6c00;
    pub const HOST_CR3: u64 = 0x6c02;
    pub const HOST_CR4: u64 = 0x6c04;
    pub const HOST_FS_BASE: u64 = 0x6c06;
    pub const HOST_GS_BASE: u64 = 0x6c08;
    pub const HOST_TR_BASE: u64 = 0x6c0a;
    pub const HOST_GDTR_BASE: u64 = 0x6c0c;
    pub const HOST_IDTR_BASE: u64 = 0x6c0e;
    pub const HOST_SYSENTER_ESP: u64 = 0x6c10;
    pub const HOST_SYSENTER_EIP: u64 = 0x6c12;
    pub const HOST_RSP: u64 = 0x6c14;
    pub const HOST_RIP: u64 = 0x6c16;

    /// Guest segment fields are laid out by segment number (ES, CS, SS, DS, FS, GS,
    /// LDTR, TR) two encodings apart.
    pub const fn seg_sel(i: u64) -> u64 {
        GUEST_ES_SEL + 2 * i
    }
    pub const fn seg_limit(i: u64) -> u64 {
        GUEST_ES_LIMIT + 2 * i
    }
    pub const fn seg_ar(i: u64) -> u64 {
        GUEST_ES_AR + 2 * i
    }
    pub const fn seg_base(i: u64) -> u64 {
        GUEST_ES_BASE + 2 * i
    }
}

// --- control bits ------------------------------------------------------------------------
pub mod ctl {
    // Pin-based.
    pub const PIN_EXTERNAL_INTERRUPT: u32 = 1 << 0;
    pub const PIN_NMI: u32 = 1 << 3;
    pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
    // Primary processor-based.
    pub const INTR_WINDOW: u32 = 1 << 2;
    pub const HLT: u32 = 1 << 7;
    pub const INVLPG: u32 = 1 << 9;
    pub const MWAIT: u32 = 1 << 10;
    pub const RDPMC: u32 = 1 << 11;
    pub const RDTSC: u32 = 1 << 12;
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const CR3_LOAD: u32 = 1 << 15;
    pub const CR3_STORE: u32 = 1 << 16;
    pub const CR8_LOAD: u32 = 1 << 19;
    pub const CR8_STORE: u32 = 1 << 20;
    pub const MOV_DR: u32 = 1 << 23;
    pub const UNCOND_IO: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR: u32 = 1 << 29;
    pub const PAUSE: u32 = 1 << 30;
    pub const SECONDARY: u32 = 1 << 31;
    // Secondary processor-based.
    pub const EPT: u32 = 1 << 1;
    pub const DESC_TABLE: u32 = 1 << 2;
    pub const RDTSCP: u32 = 1 << 3;
    pub const VPID: u32 = 1 << 5;
    pub const WBINVD: u32 = 1 << 6;
    pub const UNRESTRICTED: u32 = 1 << 7;
    pub const RDRAND: u32 = 1 << 11;
    pub const INVPCID: u32 = 1 << 12;
    pub const RDSEED: u32 = 1 << 16;
    pub const XSAVES: u32 = 1 << 20;
    // VM-exit.
    pub const EXIT_SAVE_DEBUG: u32 = 1 << 2;
    pub const EXIT_HOST_64: u32 = 1 << 9;
    pub const EXIT_SAVE_EFER: u32 = 1 << 20;
    pub const EXIT_LOAD_EFER: u32 = 1 << 21;
    // VM-entry.
    pub const ENTRY_LOAD_DEBUG: u32 = 1 << 2;
    pub const ENTRY_IA32E: u32 = 1 << 9;
    pub const ENTRY_LOAD_EFER: u32 = 1 << 15;
}

/// A VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid: no current VMCS.
    Invalid,
    /// VMfailValid with the VM-instruction error number.
    Valid(u32),
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VmFail::Invalid => write!(f, "VMfailInvalid"),
            VmFail::Valid(n) => write!(
                f,
                "VMfailValid, VM-instruction error {n} ({})",
                instruction_error_name(*n)
            ),
        }
    }
}

/// The SDM's VM-instruction error numbers (Table 31-1), the ones worth naming.
pub fn instruction_error_name(n: u32) -> &'static str {
    match n {
        1 => "VMCALL in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "see SDM Table 31-1",
    }
}

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only architectural MSRs that exist on every VMX-capable CPU are read
    // here (the caller checked CPUID for VMX first).
    unsafe { Msr::new(msr).read() }
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only IA32_FEATURE_CONTROL is written, before VMXON, with bits the SDM
    // defines.
    unsafe { Msr::new(msr).write(value) }
}

fn flags_to_result(fail_invalid: u8, fail_valid: u8) -> Result<(), VmFail> {
    if fail_invalid != 0 {
        Err(VmFail::Invalid)
    } else if fail_valid != 0 {
        // SAFETY: VMfailValid means a current VMCS exists, so the error field reads.
        let err = unsafe { vmread_raw(field::VM_INSTRUCTION_ERROR) }.unwrap_or(0);
        Err(VmFail::Valid(err as u32))
    } else {
        Ok(())
    }
}

/// VMREAD without the error-number lookup (used by it).
///
/// # Safety
/// VMX operation must be on with a current VMCS.
unsafe fn vmread_raw(f: u64) -> Result<u64, VmFail> {
    let value: u64;
    let (cf, zf): (u8, u8);
    // SAFETY: per the function's contract.
    unsafe {
        asm!("vmread {v}, {f}", "setc {cf}", "setz {zf}",
             f = in(reg) f, v = out(reg) value, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        Err(VmFail::Valid(0))
    } else {
        Ok(value)
    }
}

/// Read a VMCS field of the current VMCS. Panics only on a field encoding this file
/// gets wrong (a bug in the hypervisor, not in the guest).
pub fn vmread(f: u64) -> u64 {
    // SAFETY: VMCS accessors are only called after `Vmcs::load` made a VMCS current;
    // VMREAD itself touches no memory.
    match unsafe { vmread_raw(f) } {
        Ok(v) => v,
        Err(e) => panic!("VMREAD {f:#x} failed: {e}"),
    }
}

/// Write a VMCS field of the current VMCS.
pub fn vmwrite(f: u64, value: u64) {
    let (cf, zf): (u8, u8);
    // SAFETY: as for vmread; VMWRITE changes only the current VMCS.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}",
             f = in(reg) f, v = in(reg) value, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    if let Err(e) = flags_to_result(cf, zf) {
        panic!("VMWRITE {f:#x} = {value:#x} failed: {e}");
    }
}

/// The VMX capabilities this CPU reports.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub basic: u64,
    pub true_ctls: bool,
    pub pin: u64,
    pub proc: u64,
    pub proc2: u64,
    pub exit: u64,
    pub entry: u64,
    pub ept_vpid: u64,
    /// IA32_VMX_MISC: bits 4:0 are the preemption timer's rate (TSC >> n).
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

impl Caps {
    pub fn read() -> Caps {
        let basic = rdmsr(IA32_VMX_BASIC);
        let true_ctls = basic & (1 << 55) != 0;
        let (pin, proc, exit, entry) = if true_ctls {
            (
                IA32_VMX_TRUE_PINBASED_CTLS,
                IA32_VMX_TRUE_PROCBASED_CTLS,
                IA32_VMX_TRUE_EXIT_CTLS,
                IA32_VMX_TRUE_ENTRY_CTLS,
            )
        } else {
            (
                IA32_VMX_PINBASED_CTLS,
                IA32_VMX_PROCBASED_CTLS,
                IA32_VMX_EXIT_CTLS,
                IA32_VMX_ENTRY_CTLS,
            )
        };
        let proc_v = rdmsr(proc);
        let has_secondary = (proc_v >> 32) & u64::from(ctl::SECONDARY) != 0;
        let proc2 = if has_secondary {
            rdmsr(IA32_VMX_PROCBASED_CTLS2)
        } else {
            0
        };
        let has_ept_vpid = (proc2 >> 32) & u64::from(ctl::EPT | ctl::VPID) != 0;
        Caps {
            basic,
            true_ctls,
            pin: rdmsr(pin),
            proc: proc_v,
            proc2,
            exit: rdmsr(exit),
            entry: rdmsr(entry),
            ept_vpid: if has_ept_vpid {
                rdmsr(IA32_VMX_EPT_VPID_CAP)
            } else {
                0
            },
            misc: rdmsr(IA32_VMX_MISC),
            cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
        }
    }

    pub fn revision(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// True if the control `bit` may be 1 in the capability MSR value `cap`.
    pub fn allowed1(cap: u64, bit: u32) -> bool {
        (cap >> 32) as u32 & bit == bit
    }
}

/// Choose a control word: the CPU's required-1 bits, plus the `wanted` bits it allows.
/// Returns the value and the wanted bits it could not set. `required` bits that
/// cannot be set are an error naming the control word.
pub fn adjust(cap: u64, wanted: u32, required: u32, what: &str) -> Result<(u32, u32), String> {
    let must1 = cap as u32;
    let may1 = (cap >> 32) as u32;
    if required & !may1 != 0 {
        return Err(alloc::format!(
            "{what}: the CPU cannot set required control bits {:#x} (allowed-1 {may1:#x})",
            required & !may1
        ));
    }
    let value = (wanted | required | must1) & may1;
    Ok((value, wanted & !may1))
}

/// Fix up a CR0/CR4 value for VMX operation by the FIXED0/FIXED1 MSRs, with
/// `relaxed` bits (PE and PG under unrestricted guest) exempt from FIXED0.
pub fn fixed(value: u64, fixed0: u64, fixed1: u64, relaxed: u64) -> u64 {
    (value | (fixed0 & !relaxed)) & fixed1
}

/// A 4 KiB page-aligned zeroed page from the heap, never freed (VMXON region,
/// VMCS, bitmaps, EPT tables live as long as the hypervisor).
#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

pub fn alloc_page() -> &'static mut Page {
    Box::leak(Box::new(Page([0; 4096])))
}

pub fn phys<T>(p: &T) -> u64 {
    // Identity-mapped: a pointer is its physical address.
    p as *const T as u64
}

/// Check VMX support, enable it in IA32_FEATURE_CONTROL and CR4, and run VMXON.
pub fn enable() -> Result<Caps, String> {
    let l1 = core::arch::x86_64::__cpuid(cpuid::LEAF_FEATURES);
    if l1.ecx & cpuid::L1_ECX_VMX == 0 {
        return Err("CPUID.1:ECX.VMX[bit 5] is clear: this CPU has no VMX".into());
    }
    let fc = rdmsr(FEATURE_CONTROL);
    if fc & feature_control::LOCK == 0 {
        // Unlocked: enable VMX outside SMX and lock.
        wrmsr(
            FEATURE_CONTROL,
            fc | feature_control::LOCK | feature_control::VMX_OUTSIDE_SMX,
        );
    } else if fc & feature_control::VMX_OUTSIDE_SMX == 0 {
        return Err(alloc::format!(
            "IA32_FEATURE_CONTROL is locked ({fc:#x}) with VMX outside SMX disabled (firmware setting)"
        ));
    }
    let caps = Caps::read();
    crate::logln!(
        "vmx: revision {:#x}, TRUE controls {}, VMCS size {} bytes, EPT/VPID caps {:#x}",
        caps.revision(),
        if caps.true_ctls { "yes" } else { "no" },
        (caps.basic >> 32) & 0x1fff,
        caps.ept_vpid
    );
    // CR0 and CR4 as VMX operation requires (FIXED0 bits set, FIXED1-clear bits clear).
    // SAFETY: adding CR4.VMXE and the fixed bits (NE, PE, PG are already set in long
    // mode) does not change how the hypervisor's own code runs.
    unsafe {
        let cr0 = fixed(Cr0::read_raw(), caps.cr0_fixed0, caps.cr0_fixed1, 0);
        Cr0::write_raw(cr0);
        let cr4 = fixed(
            Cr4::read_raw() | cr4::VMXE,
            caps.cr4_fixed0,
            caps.cr4_fixed1,
            0,
        );
        Cr4::write_raw(cr4);
    }
    let region = alloc_page();
    region.0[..4].copy_from_slice(&caps.revision().to_le_bytes());
    let pa = phys(region);
    let (cf, zf): (u8, u8);
    // SAFETY: VMXON with a page-aligned, zeroed region carrying the revision id; the
    // region stays allocated for the life of the hypervisor.
    unsafe {
        asm!("vmxon [{pa}]", "setc {cf}", "setz {zf}", pa = in(reg) &pa,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    if cf != 0 || zf != 0 {
        return Err(alloc::format!("VMXON failed (CF={cf}, ZF={zf})"));
    }
    Ok(caps)
}

/// A VMCS region, cleared and made current.
pub struct Vmcs {
    pub pa: u64,
}

impl Vmcs {
    pub fn new(caps: &Caps) -> Result<Vmcs, String> {
        let page = alloc_page();
        page.0[..4].copy_from_slice(&caps.revision().to_le_bytes());
        let pa = phys(page);
        let (cf, zf): (u8, u8);
        // SAFETY: VMCLEAR then VMPTRLD of a page-aligned region with the right
        // revision id, owned by this VMCS for the life of the hypervisor.
        unsafe {
            asm!("vmclear [{pa}]", pa = in(reg) &pa, options(nostack));
            asm!("vmptrld [{pa}]", "setc {cf}", "setz {zf}", pa = in(reg) &pa,
                 cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
        }
        flags_to_result(cf, zf).map_err(|e| alloc::format!("VMPTRLD failed: {e}"))?;
        Ok(Vmcs { pa })
    }
}

/// INVEPT for one EPT pointer (single-context if supported, else global).
pub fn invept(caps: &Caps, eptp: u64) {
    let kind: u64 = if caps.ept_vpid & (1 << 25) != 0 { 1 } else { 2 };
    let desc: [u64; 2] = [eptp, 0];
    // SAFETY: INVEPT only invalidates cached translations; the descriptor is valid.
    unsafe {
        asm!("invept {k}, [{d}]", k = in(reg) kind, d = in(reg) desc.as_ptr(), options(nostack));
    }
}

/// INVVPID with the single-context type is supported (IA32_VMX_EPT_VPID_CAP bits
/// 32 and 41).
pub fn invvpid_supported(caps: &Caps) -> bool {
    caps.ept_vpid & (1 << 32) != 0 && caps.ept_vpid & (1 << 41) != 0
}

/// INVVPID, single-context: every linear and combined mapping tagged `vpid`.
pub fn invvpid_single(vpid: u16) {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    // SAFETY: INVVPID only invalidates cached translations of the guest; the
    // descriptor is valid and the type supported (`invvpid_supported`).
    unsafe {
        asm!("invvpid {k}, [{d}]", k = in(reg) 1u64, d = in(reg) desc.as_ptr(), options(nostack));
    }
}

// --- VM entry and exit ------------------------------------------------------------------

/// The guest's general-purpose registers apart from RSP (which is in the VMCS), in
/// hardware order (RSP's slot unused), the FXSAVE areas of guest and host, and
/// the TSC read by `vmx_enter` right before it loads the guest's registers and
/// right after the exit saved them (fixed instructions on both sides, so what a
/// VM entry costs the hypervisor is the same however its Rust code is compiled).
#[repr(C, align(16))]
pub struct GuestRegs {
    pub gpr: [u64; 16],
    pub guest_fx: [u8; 512],
    pub host_fx: [u8; 512],
    pub tsc_enter: u64,
    pub tsc_exit: u64,
}

impl GuestRegs {
    pub fn new() -> Box<GuestRegs> {
        let mut r = Box::new(GuestRegs {
            gpr: [0; 16],
            guest_fx: [0; 512],
            host_fx: [0; 512],
            tsc_enter: 0,
            tsc_exit: 0,
        });
        // Power-on x87/SSE state: FCW 0x37f, MXCSR 0x1f80.
        r.guest_fx[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        r.guest_fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        r
    }
}

core::arch::global_asm!(
    ".section .text",
    // u64 vmx_enter(GuestRegs *regs /* rdi */, u64 launched /* rsi */)
    // Returns 0 after a VM exit, 1 on VMfailInvalid, 2 on VMfailValid.
    ".global vmx_enter",
    "vmx_enter:",
    "    push rbp",
    "    push rbx",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    push rdi",
    "    sub rsp, 8",
    "    mov rax, 0x6c14",
    "    vmwrite rax, rsp",
    "    fxsave [rdi + 640]",
    "    fxrstor [rdi + 128]",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov [rdi + 1152], rax",
    "    test rsi, rsi",
    "    mov rax, [rdi + 0]",
    "    mov rcx, [rdi + 8]",
    "    mov rdx, [rdi + 16]",
    "    mov rbx, [rdi + 24]",
    "    mov rbp, [rdi + 40]",
    "    mov rsi, [rdi + 48]",
    "    mov r8, [rdi + 64]",
    "    mov r9, [rdi + 72]",
    "    mov r10, [rdi + 80]",
    "    mov r11, [rdi + 88]",
    "    mov r12, [rdi + 96]",
    "    mov r13, [rdi + 104]",
    "    mov r14, [rdi + 112]",
    "    mov r15, [rdi + 120]",
    "    mov rdi, [rdi + 56]",
    "    jnz 5f",
    "    vmlaunch",
    "    jmp 6f",
    "5:",
    "    vmresume",
    "6:",
    // Entry failed: CF = VMfailInvalid, ZF = VMfailValid.
    "    mov eax, 1",
    "    mov ecx, 2",
    "    cmovz eax, ecx",
    "    mov rdi, [rsp + 8]",
    "    jmp 7f",
    ".global vmx_exit_entry",
    "vmx_exit_entry:",
    "    push rdi",
    "    mov rdi, [rsp + 16]",
    "    mov [rdi + 0], rax",
    "    mov [rdi + 8], rcx",
    "    mov [rdi + 16], rdx",
    "    mov [rdi + 24], rbx",
    "    mov [rdi + 40], rbp",
    "    mov [rdi + 48], rsi",
    "    mov [rdi + 64], r8",
    "    mov [rdi + 72], r9",
    "    mov [rdi + 80], r10",
    "    mov [rdi + 88], r11",
    "    mov [rdi + 96], r12",
    "    mov [rdi + 104], r13",
    "    mov [rdi + 112], r14",
    "    mov [rdi + 120], r15",
    "    pop rax",
    "    mov [rdi + 56], rax",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov [rdi + 1160], rax",
    "    xor eax, eax",
    // Both ways out (RDI = regs, RSP as vmx_enter left it, EAX = the result): the
    // guest's x87/SSE state saved and the host's restored, then the callee-saved
    // registers.
    "7:",
    "    fxsave [rdi + 128]",
    "    fxrstor [rdi + 640]",
    "    add rsp, 8",
    "    pop rdi",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbx",
    "    pop rbp",
    "    ret",
    ".section .text",
);

// The offsets the assembly above uses.
const _: () = assert!(core::mem::offset_of!(GuestRegs, guest_fx) == 128);
const _: () = assert!(core::mem::offset_of!(GuestRegs, host_fx) == 640);
const _: () = assert!(core::mem::offset_of!(GuestRegs, tsc_enter) == 1152);
const _: () = assert!(core::mem::offset_of!(GuestRegs, tsc_exit) == 1160);

extern "C" {
    fn vmx_enter(regs: *mut GuestRegs, launched: u64) -> u64;
    fn vmx_exit_entry();
}

/// The host RIP the VMCS must hold.
pub fn exit_entry_address() -> u64 {
    vmx_exit_entry as *const () as u64
}

/// Enter the guest with the current VMCS; returns after the next VM exit, or the
/// entry failure.
pub fn enter(regs: &mut GuestRegs, launched: bool) -> Result<(), VmFail> {
    // SAFETY: the current VMCS's host state points HOST_RIP at vmx_exit_entry, which
    // restores the stack frame vmx_enter built; `regs` outlives the call.
    let r = unsafe { vmx_enter(regs, u64::from(launched)) };
    match r {
        0 => Ok(()),
        1 => Err(VmFail::Invalid),
        _ => Err(VmFail::Valid(vmread(field::VM_INSTRUCTION_ERROR) as u32)),
    }
}
