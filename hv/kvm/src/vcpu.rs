//! The KVM vCPU as an avex [`Guest`]: registers through KVM_GET/SET_(S)REGS, guest
//! memory through the mmap, port I/O to the device models, MSRs through
//! KVM_GET/SET_MSRS, CPUID from the vCPU's own table (KVM_GET_CPUID2, which KVM
//! keeps updated as CR4 and XCR0 change), XCRs through KVM_GET/SET_XCRS.

use std::time::Instant;

use avex_core::arch::{cpuid, msr};
use avex_core::devices::PortBus;
use avex_core::guest::{CpuState, Fault, Guest, NotRam, Segment};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{SyncReg, VcpuFd};

use crate::mem::GuestRam;

/// `kvm_cpuid_entry2.flags`: the entry depends on the subleaf (ECX).
const KVM_CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

pub(crate) fn to_kvm_segment(s: &Segment) -> kvm_segment {
    let a = s.attrs;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (a & 0xf) as u8,
        s: ((a >> 4) & 1) as u8,
        dpl: ((a >> 5) & 3) as u8,
        present: ((a >> 7) & 1) as u8,
        avl: ((a >> 12) & 1) as u8,
        l: ((a >> 13) & 1) as u8,
        db: ((a >> 14) & 1) as u8,
        g: ((a >> 15) & 1) as u8,
        unusable: ((a >> 16) & 1) as u8,
        padding: 0,
    }
}

pub(crate) fn from_kvm_segment(k: &kvm_segment) -> Segment {
    let attrs = u32::from(k.type_ & 0xf)
        | u32::from(k.s & 1) << 4
        | u32::from(k.dpl & 3) << 5
        | u32::from(k.present & 1) << 7
        | u32::from(k.avl & 1) << 12
        | u32::from(k.l & 1) << 13
        | u32::from(k.db & 1) << 14
        | u32::from(k.g & 1) << 15
        | u32::from(k.unusable & 1) << 16;
    Segment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        attrs,
    }
}

/// Put `st` into KVM register structures, keeping the fields avex does not model
/// (TR, LDTR, GDTR, IDTR, APIC base, pending interrupts) from `sregs`.
pub(crate) fn apply_state(st: &CpuState, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    let g = &st.gpr;
    regs.rax = g[0];
    regs.rcx = g[1];
    regs.rdx = g[2];
    regs.rbx = g[3];
    regs.rsp = g[4];
    regs.rbp = g[5];
    regs.rsi = g[6];
    regs.rdi = g[7];
    regs.r8 = g[8];
    regs.r9 = g[9];
    regs.r10 = g[10];
    regs.r11 = g[11];
    regs.r12 = g[12];
    regs.r13 = g[13];
    regs.r14 = g[14];
    regs.r15 = g[15];
    regs.rip = st.rip;
    regs.rflags = st.rflags;
    sregs.es = to_kvm_segment(&st.seg[0]);
    sregs.cs = to_kvm_segment(&st.seg[1]);
    sregs.ss = to_kvm_segment(&st.seg[2]);
    sregs.ds = to_kvm_segment(&st.seg[3]);
    sregs.fs = to_kvm_segment(&st.seg[4]);
    sregs.gs = to_kvm_segment(&st.seg[5]);
    sregs.cr0 = st.cr0;
    sregs.cr2 = st.cr2;
    sregs.cr3 = st.cr3;
    sregs.cr4 = st.cr4;
    sregs.cr8 = st.cr8;
    sregs.efer = st.efer;
}

pub(crate) fn read_state(regs: &kvm_regs, sregs: &kvm_sregs) -> CpuState {
    CpuState {
        gpr: [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        rip: regs.rip,
        rflags: regs.rflags,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        cr8: sregs.cr8,
        efer: sregs.efer,
        seg: [
            from_kvm_segment(&sregs.es),
            from_kvm_segment(&sregs.cs),
            from_kvm_segment(&sregs.ss),
            from_kvm_segment(&sregs.ds),
            from_kvm_segment(&sregs.fs),
            from_kvm_segment(&sregs.gs),
        ],
        pdpte: None,
    }
}

/// A register-access failure inside a [`Guest`] call (which cannot return errors):
/// remembered and reported by the run loop after the call.
#[derive(Debug, Clone)]
pub struct DeferredError(pub String);

/// The KVM vCPU with its memory and devices.
pub struct KvmGuest {
    pub(crate) vcpu: VcpuFd,
    pub(crate) ram: GuestRam,
    pub(crate) bus: PortBus,
    start: Instant,
    /// KVM's register state as last read or written (invalid once the vCPU ran).
    cached: Option<(kvm_regs, kvm_sregs)>,
    /// The vCPU's CPUID table as last read, with the state it was read under (see
    /// [`CpuidKey`]).
    cpuid: Option<(CpuidKey, Vec<kvm_cpuid_entry2>)>,
    pub(crate) error: Option<DeferredError>,
    /// KVM_CAP_SYNC_REGS in use: registers travel in `kvm_run` (register ioctls
    /// cost 13-25 us each on this host's software KVM; an exit costs less).
    sync: bool,
    /// `kvm_run`'s synced registers are valid (a KVM_RUN has returned).
    synced: bool,
    /// Register ioctls made (for the statistics).
    pub(crate) reg_ioctls: u64,
    /// The engine invalidated translations (INVLPG, MOV CR3, paging bits of
    /// CR0/CR4): the guest TLB must be flushed before the guest runs again.
    tlb_flush_pending: bool,
    /// CR0, CR3, CR4 and EFER as KVM has them (from the last KVM_RUN or
    /// KVM_SET_SREGS), when known: KVM resets its MMU and flushes the guest TLB
    /// itself when synced or set sregs change one of them.
    kvm_paging: Option<[u64; 4]>,
}

fn paging_of(s: &kvm_sregs) -> [u64; 4] {
    [s.cr0, s.cr3, s.cr4, s.efer]
}

impl KvmGuest {
    pub(crate) fn new(mut vcpu: VcpuFd, ram: GuestRam, bus: PortBus, sync: bool) -> Self {
        if sync {
            vcpu.set_sync_valid_reg(SyncReg::Register);
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        KvmGuest {
            vcpu,
            ram,
            bus,
            start: Instant::now(),
            cached: None,
            cpuid: None,
            error: None,
            sync,
            synced: false,
            reg_ioctls: 0,
            tlb_flush_pending: false,
            kvm_paging: None,
        }
    }

    /// Virtual time for the devices: host monotonic nanoseconds since start.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn bus(&self) -> &PortBus {
        &self.bus
    }
    pub fn bus_mut(&mut self) -> &mut PortBus {
        &mut self.bus
    }
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Forget cached vCPU state: call around every KVM_RUN.
    pub(crate) fn invalidate(&mut self) {
        self.cached = None;
    }

    /// A KVM_RUN returned: the synced registers in `kvm_run` are current.
    pub(crate) fn ran(&mut self) {
        self.cached = None;
        if self.sync {
            self.synced = true;
            self.kvm_paging = Some(paging_of(&self.vcpu.sync_regs().sregs));
        } else {
            self.kvm_paging = None;
        }
    }

    /// Whether the guest TLB needs an explicit flush before the guest runs again:
    /// the engine invalidated translations and KVM will not flush by itself (the
    /// sregs it loads next leave CR0, CR3, CR4 and EFER as they are). Clears the
    /// request.
    pub(crate) fn take_tlb_flush(&mut self) -> bool {
        if !std::mem::take(&mut self.tlb_flush_pending) {
            return false;
        }
        let s = self.regs().1;
        self.kvm_paging.is_none_or(|k| k == paging_of(&s))
    }

    /// Load `sregs` into the vCPU: into `kvm_run` for the next KVM_RUN when
    /// synced, else by ioctl now.
    pub(crate) fn put_sregs(&mut self, sregs: kvm_sregs) {
        let (r, s) = self.regs();
        self.write_regs(r, s, r, sregs);
    }

    /// The special registers as the vCPU will run with them.
    pub(crate) fn state_sregs(&mut self) -> kvm_sregs {
        self.regs().1
    }

    pub(crate) fn synced(&self) -> bool {
        self.synced
    }

    fn fail(&mut self, what: &str, e: impl std::fmt::Display) {
        if self.error.is_none() {
            self.error = Some(DeferredError(format!("{what}: {e}")));
        }
    }

    fn regs(&mut self) -> (kvm_regs, kvm_sregs) {
        if let Some(c) = self.cached {
            return c;
        }
        if self.synced {
            let r = self.vcpu.sync_regs();
            self.cached = Some((r.regs, r.sregs));
            return (r.regs, r.sregs);
        }
        self.reg_ioctls += 2;
        let regs = match self.vcpu.get_regs() {
            Ok(r) => r,
            Err(e) => {
                self.fail("KVM_GET_REGS", e);
                kvm_regs::default()
            }
        };
        let sregs = match self.vcpu.get_sregs() {
            Ok(s) => s,
            Err(e) => {
                self.fail("KVM_GET_SREGS", e);
                kvm_sregs::default()
            }
        };
        self.cached = Some((regs, sregs));
        (regs, sregs)
    }

    /// Write registers back: into `kvm_run` for the next KVM_RUN when synced,
    /// else by ioctl; only what changed.
    fn write_regs(&mut self, old_r: kvm_regs, old_s: kvm_sregs, r: kvm_regs, s: kvm_sregs) {
        // Without an in-kernel APIC, KVM loads CR8 from kvm_run's `cr8` at every
        // KVM_RUN (after the synced or ioctl-set sregs): hand the new value there
        // too, or the next KVM_RUN reverts it.
        self.vcpu.get_kvm_run().cr8 = s.cr8;
        if self.synced {
            // Written back into kvm_run and loaded by KVM at the next KVM_RUN.
            let sr = self.vcpu.sync_regs_mut();
            if r != old_r {
                sr.regs = r;
            }
            if s != old_s {
                sr.sregs = s;
            }
            if r != old_r {
                self.vcpu.set_sync_dirty_reg(SyncReg::Register);
            }
            if s != old_s {
                self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
            }
        } else {
            if r != old_r {
                self.reg_ioctls += 1;
                if let Err(e) = self.vcpu.set_regs(&r) {
                    self.fail("KVM_SET_REGS", e);
                }
            }
            if s != old_s {
                self.reg_ioctls += 1;
                match self.vcpu.set_sregs(&s) {
                    Ok(()) => self.kvm_paging = Some(paging_of(&s)),
                    Err(e) => self.fail("KVM_SET_SREGS", e),
                }
            }
        }
        self.cached = Some((r, s));
    }

    /// Before an ioctl that changes vCPU state behind the synced registers (a
    /// WRMSR): hand KVM any register changes still waiting in `kvm_run`, and read
    /// registers by ioctl until the next KVM_RUN syncs them again.
    fn leave_sync(&mut self) {
        if self.synced {
            let (r, s) = self.regs();
            let run = self.vcpu.get_kvm_run();
            let dirty = run.kvm_dirty_regs;
            run.kvm_dirty_regs = 0;
            if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) != 0 {
                self.reg_ioctls += 1;
                if let Err(e) = self.vcpu.set_regs(&r) {
                    self.fail("KVM_SET_REGS", e);
                }
            }
            if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_SREGS) != 0 {
                self.reg_ioctls += 1;
                match self.vcpu.set_sregs(&s) {
                    Ok(()) => self.kvm_paging = Some(paging_of(&s)),
                    Err(e) => self.fail("KVM_SET_SREGS", e),
                }
            }
        }
        self.cached = None;
        self.synced = false;
    }

    /// RIP now (one KVM_GET_REGS unless cached).
    pub fn rip(&mut self) -> u64 {
        self.regs().0.rip
    }

    fn cpuid_table(&mut self, leaf: u32) -> &[kvm_cpuid_entry2] {
        let s = self.regs().1;
        let key = CpuidKey {
            cr4: s.cr4,
            apic_base: s.apic_base,
        };
        // Leaf 0xD depends on XCR0 and IA32_XSS, which the guest may change
        // without exiting to us: never from the cache.
        let fresh = matches!(&self.cpuid, Some((k, _)) if *k == key) && leaf != 0xd;
        if !fresh {
            self.reg_ioctls += 1;
            let t = match self.vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
                Ok(c) => c.as_slice().to_vec(),
                Err(e) => {
                    self.fail("KVM_GET_CPUID2", e);
                    Vec::new()
                }
            };
            self.cpuid = Some((key, t));
        }
        self.cpuid.as_ref().map_or(&[], |(_, t)| t.as_slice())
    }
}

/// What KVM's runtime CPUID bits depend on (`kvm_update_cpuid_runtime`), as far
/// as the backend sees it without an ioctl: CR4 (OSXSAVE, OSPKE) and
/// IA32_APIC_BASE (APIC, EN bit), both in the sregs the exit brought. XCR0 and
/// IA32_XSS change only leaf 0xD (never cached); IA32_MISC_ENABLE changes MWAIT
/// only with KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT disabled, which this backend
/// never does. Any MSR write or XSETBV made through the backend drops the cache
/// as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuidKey {
    cr4: u64,
    apic_base: u64,
}

impl Guest for KvmGuest {
    fn state(&mut self) -> CpuState {
        let (r, s) = self.regs();
        read_state(&r, &s)
    }

    fn set_state(&mut self, state: &CpuState) {
        let (old_r, old_s) = self.regs();
        let (mut r, mut s) = (old_r, old_s);
        apply_state(state, &mut r, &mut s);
        self.write_regs(old_r, old_s, r, s);
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        self.ram.read(gpa, buf)
    }

    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        self.ram.write(gpa, data)
    }

    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        let now = self.now_ns();
        self.bus.read(port, size, now)
    }

    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        let now = self.now_ns();
        self.bus.write(port, size, value, now)
    }

    fn stop_requested(&mut self) -> bool {
        self.bus.exit_status().is_some()
    }

    fn rdmsr(&mut self, msr: u32) -> Result<u64, Fault> {
        // FS and GS base are the segment bases: no ioctl needed.
        match msr {
            msr::FS_BASE => return Ok(self.regs().1.fs.base),
            msr::GS_BASE => return Ok(self.regs().1.gs.base),
            _ => {}
        }
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index: msr,
            ..Default::default()
        }])
        .map_err(|_| Fault::GeneralProtection)?;
        match self.vcpu.get_msrs(&mut m) {
            Ok(1) => Ok(m.as_slice()[0].data),
            _ => Err(Fault::GeneralProtection),
        }
    }

    fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), Fault> {
        if msr == msr::FS_BASE || msr == msr::GS_BASE {
            // A non-canonical base is #GP, as WRMSR does.
            if ((value as i64) << 16 >> 16) as u64 != value {
                return Err(Fault::GeneralProtection);
            }
            let (r, old_s) = self.regs();
            let mut s = old_s;
            if msr == msr::FS_BASE {
                s.fs.base = value;
            } else {
                s.gs.base = value;
            }
            self.write_regs(r, old_s, r, s);
            return Ok(());
        }
        self.leave_sync();
        // KVM derives CPUID bits from some MSRs (IA32_APIC_BASE.EN, ...).
        self.cpuid = None;
        let m = Msrs::from_entries(&[kvm_msr_entry {
            index: msr,
            data: value,
            ..Default::default()
        }])
        .map_err(|_| Fault::GeneralProtection)?;
        match self.vcpu.set_msrs(&m) {
            Ok(1) => Ok(()),
            _ => Err(Fault::GeneralProtection),
        }
    }

    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let table = self.cpuid_table(leaf);
        let hit = |e: &&kvm_cpuid_entry2| {
            e.function == leaf
                && (e.flags & KVM_CPUID_FLAG_SIGNIFICANT_INDEX == 0 || e.index == subleaf)
        };
        if let Some(e) = table.iter().find(hit) {
            return [e.eax, e.ebx, e.ecx, e.edx];
        }
        // Past the last basic leaf, Intel CPUs answer with the highest basic leaf;
        // KVM does the same (kvm_cpuid with the out-of-range rule).
        let max_basic = table
            .iter()
            .find(|e| e.function == cpuid::LEAF_MAX)
            .map_or(0, |e| e.eax);
        let in_range = if leaf >= cpuid::LEAF_EXT_MAX {
            table
                .iter()
                .find(|e| e.function == cpuid::LEAF_EXT_MAX)
                .is_some_and(|e| leaf <= e.eax)
        } else {
            leaf <= max_basic
        };
        if !in_range {
            if let Some(e) = table.iter().find(|e| {
                e.function == max_basic
                    && (e.flags & KVM_CPUID_FLAG_SIGNIFICANT_INDEX == 0 || e.index == subleaf)
            }) {
                return [e.eax, e.ebx, e.ecx, e.edx];
            }
        }
        [0; 4]
    }

    fn tsc(&mut self) -> u64 {
        match self.rdmsr(msr::TSC) {
            Ok(v) => v,
            Err(_) => {
                self.fail("reading the TSC", "KVM_GET_MSRS failed");
                0
            }
        }
    }

    fn xgetbv(&mut self, index: u32) -> Result<u64, Fault> {
        let x = self.vcpu.get_xcrs().map_err(|_| Fault::GeneralProtection)?;
        x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
            .iter()
            .find(|c| c.xcr == index)
            .map(|c| c.value)
            .ok_or(Fault::GeneralProtection)
    }

    fn xsetbv(&mut self, index: u32, value: u64) -> Result<(), Fault> {
        let mut x = self.vcpu.get_xcrs().map_err(|_| Fault::GeneralProtection)?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        let Some(c) = x.xcrs[..n].iter_mut().find(|c| c.xcr == index) else {
            return Err(Fault::GeneralProtection);
        };
        c.value = value;
        self.vcpu
            .set_xcrs(&x)
            .map_err(|_| Fault::GeneralProtection)?;
        self.cpuid = None;
        Ok(())
    }

    fn interrupt_pending(&mut self) -> bool {
        // No interrupt controller is wired to the vCPU: nothing is ever pending.
        false
    }

    fn invalidate_tlb(&mut self) {
        // Done before the next KVM_RUN (`Vm::flush_guest_tlb`), once per cluster
        // run however many INVLPGs it ran.
        self.tlb_flush_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avex_core::arch::{cr0, cr4, efer, rflags};
    use avex_core::boot::{ATTR_CODE32, ATTR_CODE64, ATTR_DATA};

    #[test]
    fn segment_attributes_round_trip() {
        for attrs in [ATTR_CODE64, ATTR_CODE32, ATTR_DATA, 0x1_0000, 0x8b, 0x82] {
            let s = Segment {
                selector: 0x28,
                base: 0x1234_5000,
                limit: 0xffff,
                attrs,
            };
            let k = to_kvm_segment(&s);
            assert_eq!(from_kvm_segment(&k), s, "attrs {attrs:#x}");
        }
        let k = to_kvm_segment(&Segment {
            attrs: ATTR_CODE64,
            ..Default::default()
        });
        assert_eq!((k.l, k.db, k.present, k.s, k.type_), (1, 0, 1, 1, 0xb));
    }

    #[test]
    fn state_round_trips_through_kvm_structures() {
        let mut st = CpuState::default();
        for (i, g) in st.gpr.iter_mut().enumerate() {
            *g = 0x1111 * (i as u64 + 1);
        }
        st.rip = 0x10_0000;
        st.rflags = rflags::FIXED | rflags::IF;
        st.cr0 = cr0::PG | cr0::ET | cr0::PE;
        st.cr3 = 0x9000;
        st.cr4 = cr4::PAE;
        st.efer = efer::LME | efer::LMA;
        st.seg[1].attrs = ATTR_CODE64;
        let (mut r, mut s) = (kvm_regs::default(), kvm_sregs::default());
        s.tr.selector = 0x77; // kept
        apply_state(&st, &mut r, &mut s);
        assert_eq!(read_state(&r, &s), st);
        assert_eq!(s.tr.selector, 0x77);
    }
}
