//! The one virtual CPU: its VMCS (controls chosen from the exit policy and the CPU's
//! capabilities), its guest RAM and EPT, its device models, and the
//! [`avex_core::guest::Guest`] implementation hv/core's exit handler and engine use
//! (in `guest`).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use core::arch::asm;

use avex_core::arch::{cr0, cr3, cr4, dr, efer, msr, rflags, vector};
use avex_core::boot::BootImage;
use avex_core::devices::{PortBus, StandardConfig};
use avex_core::engine::cr;
use avex_core::guest::{Fault, Guest};
use avex_core::policy::{ExitPolicy, VmcsControl, MSR_BITMAP_RANGES};

use crate::ept::{Ept, GuestRam};
use crate::logln;
use crate::vmx::{self, alloc_page, ctl, field as f, phys, vmread, vmwrite, Caps, GuestRegs};

mod guest;

/// What the vCPU counted, for the run's summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Guest writes to write-protected code pages (pages holding translations).
    pub code_page_writes: u64,
    /// External interrupts delivered to the guest.
    pub interrupts: u64,
    /// Machine time (TSC ticks) spent in the guest, in the exit handler, and running
    /// clusters (Bochs: emulated instructions, so a VM exit itself costs almost
    /// nothing here; the real cost of an exit is the hardware's).
    pub ticks_guest: u64,
    pub ticks_handler: u64,
    pub ticks_clusters: u64,
    /// Where the guest was when it took its last interrupt (progress lines).
    pub interrupted_rip: u64,
}

pub struct Vcpu {
    caps: Caps,
    regs: Box<GuestRegs>,
    ram: GuestRam,
    ept: Ept,
    bus: PortBus,
    launched: bool,
    counters: Counters,
    /// TSC ticks of the last [`Vcpu::enter`], from just before the entry to just
    /// after the exit (Bochs: the guest's instructions plus the entry and exit
    /// paths', see `run::ENTRY_EXIT_TICKS`).
    last_entry_ticks: u64,
    /// Virtual time skipped while the guest was halted, in TSC ticks.
    skipped_ticks: u64,
    /// Virtual time of the instructions the hypervisor ran for the guest (the
    /// exiting instructions it completed, the engine's clusters): one tick each.
    emulated_ticks: u64,
    /// Log every cluster run.
    debug: bool,
    /// Software-backed MSRs (those with no VMCS field and no hardware pass-through).
    msrs: BTreeMap<u32, u64>,
    xcr0: u64,
    /// The PDPTE fields must be loaded from guest memory before the next entry: the
    /// hypervisor completed a write to CR0, CR3 or CR4 that makes the CPU load them
    /// (SDM 4.4.1), and with EPT VM entry loads PAE paging's PDPTEs from the VMCS.
    pdptes_stale: bool,
    /// VPID in use (0: none, so every VM entry and exit flushes the guest's TLB).
    vpid: u16,
    /// TSC at guest start and the TSC's rate, for the guest's virtual time
    /// ([`Vcpu::virtual_ticks`]).
    tsc0: u64,
    tsc_hz: u64,
    /// The VMX preemption timer's rate (it counts TSC >> this), when the CPU has
    /// the timer: it bounds how long the guest runs without an exit, so device
    /// interrupts (the PIT's tick) are delivered to a guest that makes no exits.
    preemption_shift: Option<u32>,
    /// "Use TSC offsetting" is on: the VMCS's TSC offset keeps the guest's native
    /// RDTSC on its virtual time.
    tsc_offsetting: bool,
    /// Whether MOV to CR3 and MOV from CR3 exit (a CPU may force the controls on).
    cr3_exits: (bool, bool),
}

/// Longest stretch the guest runs without an exit while an interrupt may come.
const MAX_QUANTUM_NS: u64 = 10_000_000;

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter; no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub(crate) fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

pub(crate) fn write_cr2(v: u64) {
    // SAFETY: CR2 is the guest's (the hypervisor takes no page faults); writing it
    // only changes what the guest reads.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack)) };
}

fn sgdt_base() -> u64 {
    x86_64::instructions::tables::sgdt().base.as_u64()
}

fn sidt_base() -> u64 {
    x86_64::instructions::tables::sidt().base.as_u64()
}

impl Vcpu {
    /// Make the VMCS current and program it for `boot`'s initial state under `policy`.
    pub fn new(
        caps: Caps,
        ram: GuestRam,
        boot: &BootImage,
        policy: &ExitPolicy,
        tsc_hz: u64,
    ) -> Result<Vcpu, String> {
        let ept = Ept::new(&ram);
        let vmcs = vmx::Vmcs::new(&caps)?;
        logln!("vmx: VMCS at {:#x}, EPT pointer {:#x}", vmcs.pa, ept.eptp());
        let mut v = Vcpu {
            caps,
            regs: GuestRegs::new(),
            ram,
            ept,
            bus: PortBus::standard(StandardConfig::default()),
            launched: false,
            counters: Counters::default(),
            last_entry_ticks: 0,
            skipped_ticks: 0,
            emulated_ticks: 0,
            debug: false,
            msrs: BTreeMap::new(),
            xcr0: 1,
            pdptes_stale: true,
            vpid: 0,
            tsc0: rdtsc(),
            tsc_hz: tsc_hz.max(1),
            preemption_shift: None,
            tsc_offsetting: false,
            cr3_exits: (false, false),
        };
        v.msrs
            .insert(msr::MISC_ENABLE, msr::MISC_ENABLE_FAST_STRINGS);
        v.msrs.insert(msr::PAT, msr::PAT_RESET);
        v.setup_controls(policy)?;
        v.setup_host();
        v.setup_guest(boot);
        Ok(v)
    }

    fn setup_controls(&mut self, policy: &ExitPolicy) -> Result<(), String> {
        let c = self.caps;
        let on = |ctl: VmcsControl| policy.control_enabled(ctl);
        let pick = |ctl: VmcsControl, bit: u32| if on(ctl) { bit } else { 0 };

        let timer = Caps::allowed1(c.pin, ctl::PIN_PREEMPTION_TIMER);
        let (pin, _) = vmx::adjust(
            c.pin,
            ctl::PIN_EXTERNAL_INTERRUPT
                | ctl::PIN_NMI
                | if timer { ctl::PIN_PREEMPTION_TIMER } else { 0 },
            0,
            "pin-based controls",
        )?;
        if pin & ctl::PIN_PREEMPTION_TIMER != 0 {
            self.preemption_shift = Some((c.misc & 0x1f) as u32);
        } else {
            logln!("vmx: no preemption timer: interrupts wait for the guest's next exit");
        }

        let mut want = ctl::SECONDARY | ctl::USE_MSR_BITMAPS | ctl::USE_TSC_OFFSETTING;
        want |= pick(VmcsControl::HltExiting, ctl::HLT);
        want |= pick(VmcsControl::InvlpgExiting, ctl::INVLPG);
        want |= pick(VmcsControl::MwaitExiting, ctl::MWAIT);
        want |= pick(VmcsControl::RdpmcExiting, ctl::RDPMC);
        want |= pick(VmcsControl::RdtscExiting, ctl::RDTSC);
        // With EPT the guest's CR3 is its own: its loads and stores need no exit
        // (KVM clears both controls under EPT too), whatever the policy says for
        // the translator; the exit handler is told ([`Vcpu::cr3_exits`]). Linux
        // loads CR3 at every context switch: 17,157 exits on one boot.
        want |= pick(VmcsControl::Cr8LoadExiting, ctl::CR8_LOAD);
        want |= pick(VmcsControl::Cr8StoreExiting, ctl::CR8_STORE);
        want |= pick(VmcsControl::MovDrExiting, ctl::MOV_DR);
        want |= pick(VmcsControl::UnconditionalIoExiting, ctl::UNCOND_IO);
        want |= pick(VmcsControl::MonitorExiting, ctl::MONITOR);
        want |= pick(VmcsControl::PauseExiting, ctl::PAUSE);
        // Without the I/O bitmaps and without unconditional I/O exiting no port
        // access would exit; the policy decides which one it is.
        let io = if on(VmcsControl::UseIoBitmaps) {
            ctl::USE_IO_BITMAPS
        } else {
            0
        };
        want |= io;
        let (proc, missing) = vmx::adjust(
            c.proc,
            want,
            ctl::SECONDARY | io | ctl::USE_MSR_BITMAPS,
            "processor-based controls",
        )?;
        self.tsc_offsetting = proc & ctl::USE_TSC_OFFSETTING != 0;
        self.cr3_exits = (
            proc & ctl::CR3_LOAD != 0,
            proc & ctl::CR3_STORE != 0,
        );
        let missing = missing & !ctl::USE_TSC_OFFSETTING;
        if missing != 0 {
            logln!("vmx: policy controls the CPU cannot set: {missing:#x} (those instructions run unintercepted)");
        }
        // Exiting controls the CPU will not let us clear (reserved default-1 bits
        // cause no exits and are not reported).
        let exiting = ctl::HLT
            | ctl::INVLPG
            | ctl::MWAIT
            | ctl::RDPMC
            | ctl::RDTSC
            | ctl::CR3_LOAD
            | ctl::CR3_STORE
            | ctl::CR8_LOAD
            | ctl::CR8_STORE
            | ctl::MOV_DR
            | ctl::UNCOND_IO
            | ctl::MONITOR
            | ctl::PAUSE;
        let forced = proc & !want & exiting;
        if forced != 0 {
            logln!("vmx: controls the CPU forces on beyond the policy: {forced:#x}");
        }

        let mut want2 = ctl::EPT | ctl::UNRESTRICTED;
        want2 |= pick(VmcsControl::DescriptorTableExiting, ctl::DESC_TABLE);
        want2 |= pick(VmcsControl::WbinvdExiting, ctl::WBINVD);
        want2 |= pick(VmcsControl::RdrandExiting, ctl::RDRAND);
        want2 |= pick(VmcsControl::RdseedExiting, ctl::RDSEED);
        // VPID: the guest's TLB entries survive VM exits and entries, so the
        // hypervisor flushes them (INVVPID) when the engine changes the guest's
        // mappings (`invalidate_tlb`). Used only with single-context INVVPID.
        let vpid = Caps::allowed1(c.proc2, ctl::VPID) && vmx::invvpid_supported(&c);
        if vpid {
            want2 |= ctl::VPID;
        }
        // Instructions that #UD unless enabled: enable them where the CPU can.
        for opt in [ctl::RDTSCP, ctl::INVPCID, ctl::XSAVES] {
            if Caps::allowed1(c.proc2, opt) {
                want2 |= opt;
            }
        }
        let (proc2, missing2) = vmx::adjust(
            c.proc2,
            want2,
            ctl::EPT | ctl::UNRESTRICTED,
            "secondary processor-based controls",
        )?;
        if missing2 != 0 {
            logln!("vmx: secondary controls the CPU cannot set: {missing2:#x}");
        }
        if c.ept_vpid & (1 << 6) == 0 {
            return Err("EPT with a 4-level page walk is not supported".into());
        }
        if c.ept_vpid & (1 << 14) == 0 {
            return Err("EPT write-back paging structures are not supported".into());
        }

        let (exit, _) = vmx::adjust(
            c.exit,
            ctl::EXIT_HOST_64 | ctl::EXIT_SAVE_EFER | ctl::EXIT_LOAD_EFER | ctl::EXIT_SAVE_DEBUG,
            ctl::EXIT_HOST_64 | ctl::EXIT_SAVE_EFER | ctl::EXIT_LOAD_EFER,
            "VM-exit controls",
        )?;
        let (entry, _) = vmx::adjust(
            c.entry,
            ctl::ENTRY_LOAD_EFER | ctl::ENTRY_LOAD_DEBUG,
            ctl::ENTRY_LOAD_EFER,
            "VM-entry controls",
        )?;

        vmwrite(f::PIN_CONTROLS, u64::from(pin));
        vmwrite(f::PROC_CONTROLS, u64::from(proc));
        vmwrite(f::PROC_CONTROLS2, u64::from(proc2));
        if proc2 & ctl::VPID != 0 {
            self.vpid = 1;
            vmwrite(f::VPID, u64::from(self.vpid));
            // Nothing of a previous user of this VPID may survive.
            vmx::invvpid_single(self.vpid);
        }
        logln!(
            "vmx: VPID {}",
            if self.vpid != 0 {
                "on"
            } else {
                "off (entries and exits flush the guest's TLB)"
            }
        );
        vmwrite(f::EXIT_CONTROLS, u64::from(exit));
        vmwrite(f::ENTRY_CONTROLS, u64::from(entry));
        logln!(
            "vmx: controls pin {pin:#x} proc {proc:#x} proc2 {proc2:#x} exit {exit:#x} entry {entry:#x}"
        );

        vmwrite(f::EXCEPTION_BITMAP, 0);
        vmwrite(f::CR3_TARGET_COUNT, 0);
        vmwrite(f::EXIT_MSR_STORE_COUNT, 0);
        vmwrite(f::EXIT_MSR_LOAD_COUNT, 0);
        vmwrite(f::ENTRY_MSR_LOAD_COUNT, 0);
        vmwrite(f::ENTRY_INTR_INFO, 0);
        vmwrite(f::EPT_POINTER, self.ept.eptp());

        // I/O bitmaps: a set bit makes the port exit.
        let a = alloc_page();
        let b = alloc_page();
        for &(lo, hi) in policy.intercepted_ports().ranges() {
            for port in lo..=hi.min(0xffff) {
                let page = if port < 0x8000 { &mut *a } else { &mut *b };
                let bit = (port & 0x7fff) as usize;
                page.0[bit / 8] |= 1 << (bit % 8);
            }
        }
        vmwrite(f::IO_BITMAP_A, phys(a));
        vmwrite(f::IO_BITMAP_B, phys(b));

        // MSR bitmap: read-low, read-high, write-low, write-high, 1 KiB each.
        let m = alloc_page();
        for &(lo, hi) in policy.intercepted_msrs().ranges() {
            for (half, &(rlo, rhi)) in MSR_BITMAP_RANGES.iter().enumerate() {
                let (s, e) = (lo.max(rlo), hi.min(rhi));
                for msr in s..=e.min(rhi) {
                    if s > e {
                        break;
                    }
                    let bit = (msr - rlo) as usize;
                    for base in [half * 1024, 2048 + half * 1024] {
                        m.0[base + bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
        }
        vmwrite(f::MSR_BITMAP, phys(m));

        // CR0/CR4: the policy's owned bits, plus every bit VMX fixes (the guest must
        // not see or change those directly).
        let cr0_fixed = c.cr0_fixed0 | !c.cr0_fixed1;
        let cr4_fixed = c.cr4_fixed0 | !c.cr4_fixed1;
        vmwrite(
            f::CR0_MASK,
            policy.cr0_guest_host_mask() | (cr0_fixed & !(cr0::PE | cr0::PG)),
        );
        vmwrite(f::CR4_MASK, policy.cr4_guest_host_mask() | cr4_fixed);
        Ok(())
    }

    fn setup_host(&mut self) {
        use x86_64::registers::control::{Cr0, Cr3, Cr4};
        vmwrite(f::HOST_CR0, Cr0::read_raw());
        vmwrite(f::HOST_CR3, Cr3::read_raw().0.start_address().as_u64());
        vmwrite(f::HOST_CR4, Cr4::read_raw());
        vmwrite(f::HOST_CS_SEL, u64::from(crate::cpu::CODE_SEL));
        for sel in [
            f::HOST_SS_SEL,
            f::HOST_DS_SEL,
            f::HOST_ES_SEL,
            f::HOST_FS_SEL,
            f::HOST_GS_SEL,
        ] {
            vmwrite(sel, u64::from(crate::cpu::DATA_SEL));
        }
        vmwrite(f::HOST_TR_SEL, u64::from(crate::cpu::TSS_SEL));
        vmwrite(f::HOST_FS_BASE, 0);
        vmwrite(f::HOST_GS_BASE, 0);
        vmwrite(f::HOST_TR_BASE, crate::cpu::tss_base());
        vmwrite(f::HOST_GDTR_BASE, sgdt_base());
        vmwrite(f::HOST_IDTR_BASE, sidt_base());
        vmwrite(f::HOST_SYSENTER_CS, 0);
        vmwrite(f::HOST_SYSENTER_ESP, 0);
        vmwrite(f::HOST_SYSENTER_EIP, 0);
        // SAFETY: reading EFER, an architectural MSR.
        let efer = unsafe { x86_64::registers::model_specific::Msr::new(msr::EFER).read() };
        vmwrite(f::HOST_EFER, efer);
        vmwrite(f::HOST_RIP, vmx::exit_entry_address());
        vmwrite(f::HOST_RSP, 0); // set by vmx_enter before each entry
    }

    fn setup_guest(&mut self, boot: &BootImage) {
        vmwrite(f::VMCS_LINK_POINTER, u64::MAX);
        vmwrite(f::GUEST_DEBUGCTL, 0);
        vmwrite(f::GUEST_PAT, msr::PAT_RESET);
        vmwrite(f::GUEST_DR7, dr::DR7_RESET);
        vmwrite(f::GUEST_PENDING_DBG, 0);
        vmwrite(f::GUEST_INTERRUPTIBILITY, 0);
        vmwrite(f::GUEST_ACTIVITY, 0);
        vmwrite(f::GUEST_SYSENTER_CS, 0);
        vmwrite(f::GUEST_SYSENTER_ESP, 0);
        vmwrite(f::GUEST_SYSENTER_EIP, 0);
        vmwrite(f::GUEST_GDTR_BASE, boot.gdt_base);
        vmwrite(f::GUEST_GDTR_LIMIT, u64::from(boot.gdt_limit));
        vmwrite(f::GUEST_IDTR_BASE, 0);
        vmwrite(f::GUEST_IDTR_LIMIT, 0);
        // LDTR unusable; TR a busy TSS (VM entry requires a usable TR).
        vmwrite(f::GUEST_LDTR_SEL, 0);
        vmwrite(f::GUEST_LDTR_BASE, 0);
        vmwrite(f::GUEST_LDTR_LIMIT, 0);
        vmwrite(f::GUEST_LDTR_AR, 0x1_0000);
        vmwrite(f::GUEST_TR_SEL, 0);
        vmwrite(f::GUEST_TR_BASE, 0);
        vmwrite(f::GUEST_TR_LIMIT, 0x67);
        vmwrite(f::GUEST_TR_AR, 0x8b);
        self.set_state(&boot.state);
    }

    /// Enter the guest; returns at its next VM exit (or the entry's failure).
    pub fn enter(&mut self) -> Result<(), vmx::VmFail> {
        if self.tsc_offsetting {
            // A RDTSC that does not exit reads the guest's virtual TSC too.
            vmwrite(f::TSC_OFFSET, self.guest_tsc().wrapping_sub(rdtsc()));
        }
        let t0 = rdtsc();
        let r = vmx::enter(&mut self.regs, self.launched);
        // The entry's ticks as the fixed assembly read them around VMRESUME (the
        // Rust code around the call varies with how it is compiled); a failed
        // entry read no exit.
        self.last_entry_ticks = match r {
            Ok(()) => self.regs.tsc_exit.wrapping_sub(self.regs.tsc_enter),
            Err(_) => rdtsc().wrapping_sub(t0),
        };
        self.counters.ticks_guest += self.last_entry_ticks;
        if r.is_ok() {
            self.launched = true;
        }
        r
    }

    /// TSC ticks of the last entry, exit included.
    pub fn last_entry_ticks(&self) -> u64 {
        self.last_entry_ticks
    }

    /// The TSC's rate (ticks per second) the hypervisor was told.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Machine time spent in the exit handler and in clusters (see [`Counters`]).
    pub fn account(&mut self, handler_ticks: u64, cluster_ticks: u64) {
        self.counters.ticks_handler += handler_ticks;
        self.counters.ticks_clusters += cluster_ticks;
    }

    /// Whether MOV to CR3 and MOV from CR3 exit, as the controls were set.
    pub fn cr3_exits(&self) -> (bool, bool) {
        self.cr3_exits
    }

    pub fn set_debug(&mut self, on: bool) {
        self.debug = on;
    }

    pub fn debug(&self) -> bool {
        self.debug
    }

    pub fn ram_size(&self) -> u64 {
        self.ram.size()
    }

    /// The status the guest wrote to the debug-exit port, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        self.bus.exit_status()
    }

    /// Write-protect the guest page at `gpa` in the EPT (it holds translated code);
    /// true if it changed. The caller flushes with [`Vcpu::invept`].
    pub fn protect_code_page(&mut self, gpa: u64) -> bool {
        self.ept.protect(gpa)
    }

    /// A guest write hit `gpa`: if it is a write-protected code page, give it back
    /// its write permission (translations on it are checked byte by byte before
    /// their next run), count it and return true.
    pub fn code_page_written(&mut self, gpa: u64) -> bool {
        if gpa >= self.ram.size() || !self.ept.is_protected(gpa) {
            return false;
        }
        self.ept.unprotect(gpa & !(crate::ept::PAGE - 1));
        self.invept();
        self.counters.code_page_writes += 1;
        true
    }

    /// RFLAGS.IF is clear: no external interrupt can reach the guest.
    pub fn interrupts_masked(&self) -> bool {
        vmread(f::GUEST_RFLAGS) & rflags::IF == 0
    }

    /// HLT: the guest waits for an interrupt. With interrupts off, or with no device
    /// that will ever raise one, it would wait forever: that ends it (the reason).
    /// Otherwise the devices' virtual time jumps to their next event (no spinning
    /// through the wait) until the PIC has an interrupt, which `deliver_interrupts`
    /// injects before the next entry.
    pub fn wait_for_interrupt(&mut self) -> Result<(), String> {
        if vmread(f::GUEST_RFLAGS) & rflags::IF == 0 {
            return Err("interrupts are off, so nothing can wake it (no debug-exit write)".into());
        }
        for _ in 0..64 {
            let now = self.now_ns();
            if self.bus.pending_vector(now).is_some() {
                return Ok(());
            }
            match self.bus.next_event_ns(now) {
                Some(t) => self.skip_time(t.saturating_sub(now).max(1)),
                None => break,
            }
        }
        Err("interrupts are on but no device will raise one".into())
    }

    /// The guest's virtual time in TSC ticks since it started: the time it ran on
    /// the CPU (VMX non-root), one tick for each instruction the hypervisor ran
    /// for it, and the time it skipped halted. The hypervisor's own work is not on
    /// it: the guest's TSC and its devices (the PIT's ticks) see a CPU that runs
    /// the guest alone, whatever the hypervisor spends on exits and clusters, so
    /// every clustering mode sees the same clock, and the guest's timer
    /// interrupts do not eat its time when exits are costly (Bochs).
    pub fn virtual_ticks(&self) -> u64 {
        self.counters
            .ticks_guest
            .wrapping_add(self.emulated_ticks)
            .wrapping_add(self.skipped_ticks)
    }

    /// The guest's TSC: its virtual time from the TSC's value at its start.
    pub fn guest_tsc(&self) -> u64 {
        self.tsc0.wrapping_add(self.virtual_ticks())
    }

    /// Count `n` instructions the hypervisor ran for the guest on its clock.
    pub fn add_emulated_insns(&mut self, n: u64) {
        self.emulated_ticks = self.emulated_ticks.wrapping_add(n);
    }

    /// The guest's virtual time in ns, for the device models.
    fn now_ns(&self) -> u64 {
        let ticks = self.virtual_ticks();
        // Bochs' rates divide 10^9 evenly: multiply instead of a 128-bit division
        // on every port access.
        if 1_000_000_000 % self.tsc_hz == 0 {
            ticks.wrapping_mul(1_000_000_000 / self.tsc_hz)
        } else {
            ((u128::from(ticks) * 1_000_000_000) / u128::from(self.tsc_hz)) as u64
        }
    }

    /// Move the guest's virtual time forward by at least `ns` (a halted guest
    /// waits for its next device event without the hypervisor spinning through
    /// the wait).
    fn skip_time(&mut self, ns: u64) {
        let ticks = (u128::from(ns) * u128::from(self.tsc_hz)).div_ceil(1_000_000_000) as u64;
        self.skipped_ticks = self.skipped_ticks.wrapping_add(ticks.max(1));
    }

    fn set_window_exiting(&mut self, on: bool) {
        let proc = vmread(f::PROC_CONTROLS) as u32;
        let want = if on {
            proc | ctl::INTR_WINDOW
        } else {
            proc & !ctl::INTR_WINDOW
        };
        if want != proc && (!on || Caps::allowed1(self.caps.proc, ctl::INTR_WINDOW)) {
            vmwrite(f::PROC_CONTROLS, u64::from(want));
        }
    }

    /// Before a VM entry: arm the preemption timer for the devices' next event (at
    /// most [`MAX_QUANTUM_NS`] away), so an interrupt is delivered on time even if
    /// the guest makes no exit until then.
    pub fn arm_preemption_timer(&mut self) {
        let Some(shift) = self.preemption_shift else {
            return;
        };
        let now = self.now_ns();
        let ns = self
            .bus
            .next_event_ns(now)
            .map_or(MAX_QUANTUM_NS, |t| t.saturating_sub(now))
            .clamp(1_000, MAX_QUANTUM_NS);
        let ticks = (u128::from(ns) * u128::from(self.tsc_hz) / 1_000_000_000) as u64;
        vmwrite(
            f::PREEMPTION_TIMER,
            (ticks >> shift).clamp(1, u64::from(u32::MAX)),
        );
    }

    /// Before a VM entry: deliver the PIC's pending interrupt if the guest can take
    /// it now (RFLAGS.IF set, no STI/MOV SS blocking, no event being injected),
    /// else ask for an interrupt-window exit for when it can.
    pub fn deliver_interrupts(&mut self) {
        // A guest without an IDT (the boot ABI starts it with IDTR.limit 0) cannot
        // take interrupts: do not poll the devices for it at every entry.
        if vmread(f::ENTRY_INTR_INFO) & (1 << 31) != 0 || vmread(f::GUEST_IDTR_LIMIT) == 0 {
            return;
        }
        let now = self.now_ns();
        if self.bus.pending_vector(now).is_none() {
            self.set_window_exiting(false);
            return;
        }
        let can_take =
            vmread(f::GUEST_RFLAGS) & rflags::IF != 0 && vmread(f::GUEST_INTERRUPTIBILITY) & 3 == 0;
        if can_take {
            if let Some(vector) = self.bus.acknowledge(now) {
                // External interrupt (type 0), valid.
                vmwrite(f::ENTRY_INTR_INFO, u64::from(vector) | (1 << 31));
                self.counters.interrupts += 1;
                self.counters.interrupted_rip = vmread(f::GUEST_RIP);
            }
            self.set_window_exiting(false);
        } else {
            self.set_window_exiting(true);
        }
    }

    pub fn gpr(&self, i: usize) -> u64 {
        if i == 4 {
            vmread(f::GUEST_RSP)
        } else {
            self.regs.gpr[i]
        }
    }

    pub fn set_gpr(&mut self, i: usize, v: u64) {
        if i == 4 {
            vmwrite(f::GUEST_RSP, v);
        } else {
            self.regs.gpr[i] = v;
        }
    }

    /// Write CR0 as the guest sees it: the read shadow holds the guest's value, the
    /// real CR0 that value with VMX's fixed bits (PE and PG are free under
    /// unrestricted guest). EFER.LMA and the IA-32e entry control follow CR0.PG.
    fn write_cr0(&mut self, cr0: u64) {
        let real = vmx::fixed(
            cr0,
            self.caps.cr0_fixed0,
            self.caps.cr0_fixed1,
            cr0::PE | cr0::PG,
        );
        vmwrite(f::CR0_READ_SHADOW, cr0);
        vmwrite(f::GUEST_CR0, real);
        let efer = vmread(f::GUEST_EFER);
        let lma = cr0 & cr0::PG != 0 && efer & efer::LME != 0;
        self.write_efer(if lma {
            efer | efer::LMA
        } else {
            efer & !efer::LMA
        });
    }

    fn write_cr4(&mut self, cr4: u64) {
        let real = vmx::fixed(
            cr4 | cr4::VMXE,
            self.caps.cr4_fixed0,
            self.caps.cr4_fixed1,
            0,
        );
        vmwrite(f::CR4_READ_SHADOW, cr4);
        vmwrite(f::GUEST_CR4, real);
    }

    fn write_efer(&mut self, efer: u64) {
        vmwrite(f::GUEST_EFER, efer);
        let entry = vmread(f::ENTRY_CONTROLS) as u32;
        let entry = if efer & efer::LMA != 0 {
            entry | ctl::ENTRY_IA32E
        } else {
            entry & !ctl::ENTRY_IA32E
        };
        vmwrite(f::ENTRY_CONTROLS, u64::from(entry));
    }

    /// Note that the engine completed a write to CR0, CR3 or CR4 that changed the
    /// paging mode or reloads PAE paging's PDPTEs on the CPU.
    pub fn note_mode_change(&mut self) {
        self.pdptes_stale = true;
    }

    /// Before a VM entry: with EPT, VM entry loads PAE paging's PDPTEs from the
    /// VMCS (SDM 27.3.2.4), so when the hypervisor changed CR0/CR3/CR4 and the guest
    /// now uses PAE paging (CR0.PG, CR4.PAE, not IA-32e mode), load them from the
    /// PDPT at CR3 as the CPU does at such a write. The CPU saves them at each exit,
    /// so a PAE guest that changes CR3 natively keeps its own.
    pub fn load_pdptes_if_stale(&mut self) -> Result<(), String> {
        if !self.pdptes_stale {
            return Ok(());
        }
        self.pdptes_stale = false;
        if !self.pae_paging() {
            return Ok(());
        }
        let cr3 = vmread(f::GUEST_CR3);
        let caps = self.cpu_caps();
        // The engine's load, with the CPU's reserved-bit check: a bad entry was
        // already refused (#GP) when the engine completed the write.
        let pdptes = cr::load_pdptes(self, cr3, &caps).map_err(|e| match e {
            cr::PdpteError::NotRam { gpa } => alloc::format!(
                "PAE paging with its PDPT at {:#x}, outside guest RAM ({gpa:#x})",
                cr3 & cr3::PAE_PDPT
            ),
            cr::PdpteError::Fault(_) => {
                alloc::format!("a PDPTE at CR3 {cr3:#x} has a reserved bit set")
            }
        })?;
        self.set_pdptes(pdptes);
        Ok(())
    }

    /// The guest uses PAE paging (CR0.PG, CR4.PAE, not IA-32e mode): the PDPTE
    /// fields are in use.
    pub fn pae_paging(&self) -> bool {
        let ia32e = vmread(f::ENTRY_CONTROLS) as u32 & ctl::ENTRY_IA32E != 0;
        vmread(f::GUEST_CR0) & cr0::PG != 0 && vmread(f::GUEST_CR4) & cr4::PAE != 0 && !ia32e
    }

    /// Make the CPU use these PDPTEs from the next VM entry.
    pub(super) fn set_pdptes(&mut self, pdptes: [u64; 4]) {
        for (i, p) in pdptes.into_iter().enumerate() {
            vmwrite(f::GUEST_PDPTE0 + 2 * i as u64, p);
        }
    }

    /// The PDPTEs the CPU uses now (saved by it at the last exit under PAE paging).
    pub fn pdptes(&self) -> [u64; 4] {
        core::array::from_fn(|i| vmread(f::GUEST_PDPTE0 + 2 * i as u64))
    }

    /// Make the guest take `fault` at the next VM entry instead of completing the
    /// instruction.
    pub fn inject(&mut self, fault: Fault) {
        let (vector, code) = match fault {
            Fault::GeneralProtection => (vector::GENERAL_PROTECTION, Some(0u32)),
            Fault::InvalidOpcode => (vector::INVALID_OPCODE, None),
            Fault::PageFault { addr, error_code } => {
                write_cr2(addr);
                (vector::PAGE_FAULT, Some(error_code))
            }
        };
        let mut info = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = code {
            info |= 1 << 11;
            vmwrite(f::ENTRY_EXCEPTION_ERROR, u64::from(code));
        }
        vmwrite(f::ENTRY_INTR_INFO, info);
    }

    /// Flush translations the CPU cached from the EPT after a permission change.
    pub fn invept(&self) {
        vmx::invept(&self.caps, self.ept.eptp());
    }
}
