//! The [`Guest`] implementation hv/core's exit handler and engine use: the vCPU's
//! state in the VMCS, guest RAM, the device models' ports, the MSRs and CPUID the
//! guest sees.

use core::arch::asm;

use avex_core::arch::{cpuid, cr4, efer, msr, rflags, xcr0};
use avex_core::engine::cr;
use avex_core::guest::{CpuState, Fault, Guest, NotRam, Segment};

use super::{read_cr2, write_cr2, Vcpu};
use crate::vmx::{self, field as f, vmread, vmwrite};

/// The guest's TPR is the processor's own CR8. With neither "CR8-load exiting",
/// "CR8-store exiting" nor "use TPR shadow", MOV to or from CR8 in VMX non-root
/// operation reads and writes the processor's TPR (SDM 26.3, "MOV to CR8"), and
/// TPR is not switched at VM entry or exit; the hypervisor uses no local-APIC
/// interrupts (its own are off), so the TPR is the guest's alone. The engine's
/// CR8 (through `state`/`set_state`) and CR8 in native guest code are then one
/// register. Were CR8 exiting enabled by a policy, its exits complete through the
/// engine and land here too; a TPR shadow would move this to the virtual-APIC page.
fn read_tpr() -> u64 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack)) };
    v
}

fn write_tpr(v: u64) {
    // SAFETY: CR8 holds the guest's TPR only (see `read_tpr`); bits above 3 are
    // masked off, which would otherwise #GP in the hypervisor.
    unsafe { asm!("mov cr8, {}", in(reg) v & 0xf, options(nomem, nostack)) };
}

/// The hypervisor's signature in leaf 0x40000000 (EBX, ECX, EDX).
const SIGNATURE: &[u8; 12] = b"avexavexavex";

/// Leaf 1 ECX features the hypervisor does not virtualise: nested VMX and SMX, the
/// x2APIC and TSC-deadline timer (no local APIC is emulated), MONITOR/MWAIT, the
/// thermal, debug-store and performance features whose MSRs are not emulated, and
/// XSAVE (the guest's XCR0 is not loaded into the CPU: FXSAVE state only).
const HIDDEN_L1_ECX: u32 = cpuid::L1_ECX_DTES64
    | cpuid::L1_ECX_MONITOR
    | cpuid::L1_ECX_DS_CPL
    | cpuid::L1_ECX_VMX
    | cpuid::L1_ECX_SMX
    | cpuid::L1_ECX_EST
    | cpuid::L1_ECX_TM2
    | cpuid::L1_ECX_XTPR
    | cpuid::L1_ECX_PDCM
    | cpuid::L1_ECX_X2APIC
    | cpuid::L1_ECX_TSC_DEADLINE
    | cpuid::L1_ECX_XSAVE
    | cpuid::L1_ECX_OSXSAVE
    | cpuid::L1_ECX_AVX;
/// Leaf 1 EDX: no local APIC, no machine-check, MTRR, debug-store, ACPI-thermal
/// MSRs.
const HIDDEN_L1_EDX: u32 = cpuid::L1_EDX_MCE
    | cpuid::L1_EDX_APIC
    | cpuid::L1_EDX_MTRR
    | cpuid::L1_EDX_MCA
    | cpuid::L1_EDX_DS
    | cpuid::L1_EDX_ACPI
    | cpuid::L1_EDX_TM
    | cpuid::L1_EDX_PBE;
/// Leaf 7 EBX features offered (instructions and paging features the CPU runs
/// natively and the engine knows); every other leaf 7 bit (AVX2/AVX-512, TSX,
/// speculation-control MSRs, TSC_ADJUST, PT, ...) is hidden.
const OFFERED_L7_EBX: u32 = cpuid::L7_EBX_FSGSBASE
    | cpuid::L7_EBX_BMI1
    | cpuid::L7_EBX_SMEP
    | cpuid::L7_EBX_BMI2
    | cpuid::L7_EBX_ERMS
    | cpuid::L7_EBX_ADX
    | cpuid::L7_EBX_SMAP
    | cpuid::L7_EBX_CLFLUSHOPT;

/// The hypervisor leaves: 0x40000000 names the hypervisor and is the last one.
fn hypervisor_leaf(leaf: u32) -> [u32; 4] {
    if leaf != cpuid::LEAF_HYPERVISOR {
        return [0; 4];
    }
    let w = |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
    [cpuid::LEAF_HYPERVISOR, w(0), w(4), w(8)]
}

/// The guest's CPUID: the CPU's answer `host` with what the hypervisor does not
/// virtualise hidden and the hypervisor bit set; the TSC's rate is `tsc_hz`.
fn model_cpuid(leaf: u32, subleaf: u32, host: [u32; 4], tsc_hz: u64) -> [u32; 4] {
    let [eax, ebx, ecx, edx] = host;
    let tsc_hz = u32::try_from(tsc_hz).unwrap_or(u32::MAX);
    match leaf {
        // The TSC runs at the rate the hypervisor was told (Bochs: its instruction
        // rate), not the CPU model's nominal frequency: said as a crystal of that
        // frequency with a 1:1 ratio, so the guest need not measure it (measuring
        // it against the PIT fails here: the hypervisor's own work between two
        // port reads counts on the TSC).
        cpuid::LEAF_TSC_CRYSTAL => [1, 1, tsc_hz, 0],
        cpuid::LEAF_FREQUENCIES => {
            let mhz = (tsc_hz / 1_000_000).max(1);
            [mhz, mhz, 0, 0]
        }
        cpuid::LEAF_FEATURES => [
            eax,
            ebx,
            (ecx & !HIDDEN_L1_ECX) | cpuid::L1_ECX_HYPERVISOR,
            edx & !HIDDEN_L1_EDX,
        ],
        cpuid::LEAF_EXT_FEATURES if subleaf == 0 => [0, ebx & OFFERED_L7_EBX, 0, 0],
        cpuid::LEAF_EXT_FEATURES
        | cpuid::LEAF_THERMAL_POWER
        | cpuid::LEAF_PERFMON
        | cpuid::LEAF_XSAVE => [0; 4],
        _ => host,
    }
}

/// MSRs the guest may use on the real CPU: the host never uses them.
fn passthrough_msr(msr: u32) -> bool {
    matches!(
        msr,
        msr::STAR..=msr::FMASK | msr::KERNEL_GS_BASE | msr::TSC_AUX
    )
}

impl Guest for Vcpu {
    fn state(&mut self) -> CpuState {
        let mut gpr = [0u64; 16];
        for (i, g) in gpr.iter_mut().enumerate() {
            *g = self.gpr(i);
        }
        let mut seg = [Segment::default(); 6];
        for (i, s) in seg.iter_mut().enumerate() {
            let i = i as u64;
            *s = Segment {
                selector: vmread(f::seg_sel(i)) as u16,
                base: vmread(f::seg_base(i)),
                limit: vmread(f::seg_limit(i)) as u32,
                attrs: vmread(f::seg_ar(i)) as u32,
            };
        }
        CpuState {
            gpr,
            rip: vmread(f::GUEST_RIP),
            rflags: vmread(f::GUEST_RFLAGS),
            cr0: vmread(f::CR0_READ_SHADOW),
            cr2: read_cr2(),
            cr3: vmread(f::GUEST_CR3),
            cr4: vmread(f::CR4_READ_SHADOW),
            cr8: read_tpr(),
            efer: vmread(f::GUEST_EFER),
            seg,
            // Under PAE paging the CPU walks with the PDPTEs loaded at the last
            // CR3/CR0/CR4 write (saved in the VMCS at each exit), not memory.
            pdpte: self.pae_paging().then(|| self.pdptes()),
        }
    }

    fn set_state(&mut self, s: &CpuState) {
        for i in 0..16 {
            self.set_gpr(i, s.gpr[i]);
        }
        vmwrite(f::GUEST_RIP, s.rip);
        vmwrite(f::GUEST_RFLAGS, s.rflags | 2);
        if s.cr2 != read_cr2() {
            write_cr2(s.cr2);
        }
        vmwrite(f::GUEST_CR3, s.cr3);
        self.write_cr4(s.cr4);
        vmwrite(f::GUEST_EFER, s.efer);
        self.write_cr0(s.cr0);
        if s.cr8 != read_tpr() {
            write_tpr(s.cr8);
        }
        if let Some(p) = s.pdpte.filter(|_| self.pae_paging()) {
            self.set_pdptes(p);
        }
        for (i, sg) in s.seg.iter().enumerate() {
            let i = i as u64;
            vmwrite(f::seg_sel(i), u64::from(sg.selector));
            vmwrite(f::seg_base(i), sg.base);
            vmwrite(f::seg_limit(i), u64::from(sg.limit));
            vmwrite(f::seg_ar(i), u64::from(sg.attrs));
        }
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let r = self.ram.range(gpa, buf.len()).ok_or(NotRam { gpa })?;
        buf.copy_from_slice(&self.ram.as_slice()[r]);
        Ok(())
    }

    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let r = self.ram.range(gpa, data.len()).ok_or(NotRam { gpa })?;
        self.ram.as_mut_slice()[r].copy_from_slice(data);
        Ok(())
    }

    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        let now = self.now_ns();
        self.bus.read(port, size, now)
    }

    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        let now = self.now_ns();
        self.bus.write(port, size, value, now);
        let out = self.bus.take_console_output();
        if !out.is_empty() {
            crate::serial::console_write(&out);
        }
    }

    fn stop_requested(&mut self) -> bool {
        self.bus.exit_status().is_some()
    }

    fn rdmsr(&mut self, msr: u32) -> Result<u64, Fault> {
        Ok(match msr {
            msr::TSC => self.guest_tsc(),
            msr::APIC_BASE => msr::APIC_BASE_RESET,
            msr::UCODE_REV => 0,
            msr::SYSENTER_CS => vmread(f::GUEST_SYSENTER_CS),
            msr::SYSENTER_ESP => vmread(f::GUEST_SYSENTER_ESP),
            msr::SYSENTER_EIP => vmread(f::GUEST_SYSENTER_EIP),
            msr::EFER => vmread(f::GUEST_EFER),
            msr::FS_BASE => vmread(f::seg_base(4)),
            msr::GS_BASE => vmread(f::seg_base(5)),
            m if passthrough_msr(m) => {
                // SAFETY: syscall/swapgs MSRs the hypervisor never uses; reading them
                // has no effect on the host.
                unsafe { x86_64::registers::model_specific::Msr::new(m).read() }
            }
            m => match self.msrs.get(&m) {
                Some(&v) => v,
                None => return Err(Fault::GeneralProtection),
            },
        })
    }

    fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), Fault> {
        // A non-canonical linear address would make the next VM entry fail (VMCS
        // fields) or fault in the hypervisor (MSRs it passes through): #GP, as the
        // CPU raises.
        if cr::LINEAR_ADDRESS_MSRS.contains(&msr) {
            cr::check_wrmsr(msr, value, &self.cpu_caps())?;
        }
        match msr {
            msr::TSC | msr::APIC_BASE => {}
            msr::SYSENTER_CS => vmwrite(f::GUEST_SYSENTER_CS, value),
            msr::SYSENTER_ESP => vmwrite(f::GUEST_SYSENTER_ESP, value),
            msr::SYSENTER_EIP => vmwrite(f::GUEST_SYSENTER_EIP, value),
            msr::EFER => {
                // LMA is read-only; it follows LME and CR0.PG.
                if value & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0 {
                    return Err(Fault::GeneralProtection);
                }
                let lma = vmread(f::GUEST_EFER) & efer::LMA;
                self.write_efer((value & !efer::LMA) | lma);
            }
            msr::FS_BASE => vmwrite(f::seg_base(4), value),
            msr::GS_BASE => vmwrite(f::seg_base(5), value),
            m if passthrough_msr(m) => {
                // SAFETY: as in rdmsr; the value is the guest's own and only the
                // guest's SYSCALL/SWAPGS/RDTSCP use it.
                unsafe { x86_64::registers::model_specific::Msr::new(m).write(value) }
            }
            msr::PAT
            | msr::MISC_ENABLE
            | msr::MTRR_DEF_TYPE
            | msr::MTRR_PHYS_FIRST..=msr::MTRR_PHYS_LAST
            | msr::MTRR_FIX_FIRST..=msr::MTRR_FIX_LAST => {
                self.msrs.insert(msr, value);
            }
            // No microcode to report: writes (Linux's way of asking) are dropped.
            msr::UCODE_REV => {}
            // MSRs the hypervisor does not model: #GP, as a CPU without them raises
            // (Linux's wrmsr_safe paths rely on it).
            _ => return Err(Fault::GeneralProtection),
        }
        Ok(())
    }

    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        if (cpuid::LEAF_HYPERVISOR..=cpuid::LEAF_HYPERVISOR_LAST).contains(&leaf) {
            return hypervisor_leaf(leaf);
        }
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        model_cpuid(leaf, subleaf, [r.eax, r.ebx, r.ecx, r.edx], self.tsc_hz)
    }

    fn tsc(&mut self) -> u64 {
        self.guest_tsc()
    }

    fn xgetbv(&mut self, index: u32) -> Result<u64, Fault> {
        if index == 0 && vmread(f::CR4_READ_SHADOW) & cr4::OSXSAVE != 0 {
            Ok(self.xcr0)
        } else if index == 0 {
            Err(Fault::InvalidOpcode)
        } else {
            Err(Fault::GeneralProtection)
        }
    }

    fn xsetbv(&mut self, index: u32, value: u64) -> Result<(), Fault> {
        if index != 0
            || value & xcr0::X87 == 0
            || value & !(xcr0::X87 | xcr0::SSE | xcr0::AVX) != 0
            || (value & xcr0::AVX != 0 && value & xcr0::SSE == 0)
        {
            return Err(Fault::GeneralProtection);
        }
        self.xcr0 = value;
        Ok(())
    }

    fn interrupt_pending(&mut self) -> bool {
        if vmread(f::GUEST_RFLAGS) & rflags::IF == 0 {
            return false;
        }
        let now = self.now_ns();
        self.bus.pending_vector(now).is_some()
    }

    /// The engine changed the guest's mappings (MOV CR3, INVLPG, a paging bit of
    /// CR0/CR4): with VPID the CPU keeps the guest's TLB entries across exits and
    /// entries, so flush them (single-context: INVLPG's address is not passed, and
    /// flushing more is always correct). Without VPID every VM entry and exit
    /// flushes them already. EPT permission changes flush with INVEPT (`invept`).
    fn invalidate_tlb(&mut self) {
        if self.vpid != 0 {
            vmx::invvpid_single(self.vpid);
        }
    }
}
