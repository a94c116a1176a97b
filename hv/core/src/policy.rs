//! The exit policy: which instructions exit under the hypervisor's configuration.
//! One policy value is shared by the hypervisor (it configures the VMCS / KVM from
//! it) and by the AOT pass (it clusters by it), so both agree on what exits.
//!
//! Three things decide whether an instruction exits under VT-x:
//! - its class alone (CPUID, XSETBV, INVD, GETSEC, VMX instructions: always);
//! - a VM-execution control (HLT exiting, RDTSC exiting, CR3-load exiting, ...),
//!   for I/O and MSRs together with the I/O and MSR bitmaps (here: port and MSR ranges);
//! - for CR0/CR4 writes, CLTS and LMSW: the guest/host masks (bits the hypervisor owns).
//!
//! [`ExitPolicy::classify`] folds these into one answer per decoded instruction.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::cr0;

/// Every x86 instruction class that can exit under VT-x. `name()` gives the upper-case
/// name used in reports and JSON (`OUT`, `MOV_TO_CR3`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
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
    /// WBNOINVD: governed by WBINVD exiting, counted apart so per-mnemonic counts match.
    Wbnoinvd,
}

impl ExitClass {
    /// Every class, in declaration order.
    pub const ALL: [ExitClass; 48] = [
        ExitClass::In,
        ExitClass::Out,
        ExitClass::Ins,
        ExitClass::Outs,
        ExitClass::Rdmsr,
        ExitClass::Wrmsr,
        ExitClass::MovToCr0,
        ExitClass::MovFromCr0,
        ExitClass::MovToCr3,
        ExitClass::MovFromCr3,
        ExitClass::MovToCr4,
        ExitClass::MovFromCr4,
        ExitClass::MovToCr8,
        ExitClass::MovFromCr8,
        ExitClass::Clts,
        ExitClass::Lmsw,
        ExitClass::Cpuid,
        ExitClass::Hlt,
        ExitClass::Invlpg,
        ExitClass::Invpcid,
        ExitClass::Wbinvd,
        ExitClass::Invd,
        ExitClass::Xsetbv,
        ExitClass::Xgetbv,
        ExitClass::Rdtsc,
        ExitClass::Rdtscp,
        ExitClass::Rdpmc,
        ExitClass::Vmcall,
        ExitClass::VmxInstruction,
        ExitClass::Monitor,
        ExitClass::Mwait,
        ExitClass::Lgdt,
        ExitClass::Lidt,
        ExitClass::Lldt,
        ExitClass::Ltr,
        ExitClass::Sgdt,
        ExitClass::Sidt,
        ExitClass::Sldt,
        ExitClass::Str,
        ExitClass::MovToDr,
        ExitClass::MovFromDr,
        ExitClass::Pause,
        ExitClass::Rdrand,
        ExitClass::Rdseed,
        ExitClass::Getsec,
        ExitClass::Invlpga,
        ExitClass::Rsm,
        ExitClass::Wbnoinvd,
    ];

    /// Upper-case name for reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ExitClass::In => "IN",
            ExitClass::Out => "OUT",
            ExitClass::Ins => "INS",
            ExitClass::Outs => "OUTS",
            ExitClass::Rdmsr => "RDMSR",
            ExitClass::Wrmsr => "WRMSR",
            ExitClass::MovToCr0 => "MOV_TO_CR0",
            ExitClass::MovFromCr0 => "MOV_FROM_CR0",
            ExitClass::MovToCr3 => "MOV_TO_CR3",
            ExitClass::MovFromCr3 => "MOV_FROM_CR3",
            ExitClass::MovToCr4 => "MOV_TO_CR4",
            ExitClass::MovFromCr4 => "MOV_FROM_CR4",
            ExitClass::MovToCr8 => "MOV_TO_CR8",
            ExitClass::MovFromCr8 => "MOV_FROM_CR8",
            ExitClass::Clts => "CLTS",
            ExitClass::Lmsw => "LMSW",
            ExitClass::Cpuid => "CPUID",
            ExitClass::Hlt => "HLT",
            ExitClass::Invlpg => "INVLPG",
            ExitClass::Invpcid => "INVPCID",
            ExitClass::Wbinvd => "WBINVD",
            ExitClass::Invd => "INVD",
            ExitClass::Xsetbv => "XSETBV",
            ExitClass::Xgetbv => "XGETBV",
            ExitClass::Rdtsc => "RDTSC",
            ExitClass::Rdtscp => "RDTSCP",
            ExitClass::Rdpmc => "RDPMC",
            ExitClass::Vmcall => "VMCALL",
            ExitClass::VmxInstruction => "VMX_INSTRUCTION",
            ExitClass::Monitor => "MONITOR",
            ExitClass::Mwait => "MWAIT",
            ExitClass::Lgdt => "LGDT",
            ExitClass::Lidt => "LIDT",
            ExitClass::Lldt => "LLDT",
            ExitClass::Ltr => "LTR",
            ExitClass::Sgdt => "SGDT",
            ExitClass::Sidt => "SIDT",
            ExitClass::Sldt => "SLDT",
            ExitClass::Str => "STR",
            ExitClass::MovToDr => "MOV_TO_DR",
            ExitClass::MovFromDr => "MOV_FROM_DR",
            ExitClass::Pause => "PAUSE",
            ExitClass::Rdrand => "RDRAND",
            ExitClass::Rdseed => "RDSEED",
            ExitClass::Getsec => "GETSEC",
            ExitClass::Invlpga => "INVLPGA",
            ExitClass::Rsm => "RSM",
            ExitClass::Wbnoinvd => "WBNOINVD",
        }
    }

    /// The class whose `name()` is `name` (exact, upper case).
    pub fn from_name(name: &str) -> Option<ExitClass> {
        ExitClass::ALL.iter().copied().find(|c| c.name() == name)
    }

    /// How an instruction of this class comes to exit under VT-x (Intel SDM vol. 3C,
    /// 26.1.2 and 26.1.3).
    pub fn exit_kind(self) -> ExitKind {
        use ExitClass::*;
        use VmcsControl as C;
        match self {
            Cpuid | Getsec | Invd | Xsetbv | Vmcall | VmxInstruction => ExitKind::Always,
            // The I/O bitmaps (or unconditional I/O exiting) decide per port.
            In | Out | Ins | Outs => ExitKind::Control(C::UseIoBitmaps),
            // The MSR bitmaps decide per MSR; without them every access exits.
            Rdmsr | Wrmsr => ExitKind::Control(C::UseMsrBitmaps),
            MovToCr0 | Clts | Lmsw => ExitKind::OwnedCrBits { cr: 0 },
            MovToCr4 => ExitKind::OwnedCrBits { cr: 4 },
            MovToCr3 => ExitKind::Control(C::Cr3LoadExiting),
            MovFromCr3 => ExitKind::Control(C::Cr3StoreExiting),
            MovToCr8 => ExitKind::Control(C::Cr8LoadExiting),
            MovFromCr8 => ExitKind::Control(C::Cr8StoreExiting),
            Hlt => ExitKind::Control(C::HltExiting),
            // INVPCID exits under "INVLPG exiting" when "enable INVPCID" is set.
            Invlpg | Invpcid => ExitKind::Control(C::InvlpgExiting),
            Wbinvd | Wbnoinvd => ExitKind::Control(C::WbinvdExiting),
            // RDTSCP exits under "RDTSC exiting" when "enable RDTSCP" is set.
            Rdtsc | Rdtscp => ExitKind::Control(C::RdtscExiting),
            Rdpmc => ExitKind::Control(C::RdpmcExiting),
            Monitor => ExitKind::Control(C::MonitorExiting),
            Mwait => ExitKind::Control(C::MwaitExiting),
            Lgdt | Lidt | Lldt | Ltr | Sgdt | Sidt | Sldt | Str => {
                ExitKind::Control(C::DescriptorTableExiting)
            }
            MovToDr | MovFromDr => ExitKind::Control(C::MovDrExiting),
            Pause => ExitKind::Control(C::PauseExiting),
            Rdrand => ExitKind::Control(C::RdrandExiting),
            Rdseed => ExitKind::Control(C::RdseedExiting),
            // Reads of CR0/CR4 return the read shadows; XGETBV never exits on VT-x;
            // INVLPGA is AMD-only; RSM outside SMM is #UD.
            MovFromCr0 | MovFromCr4 | Xgetbv | Invlpga | Rsm => ExitKind::Never,
        }
    }
}

/// How an exit class comes to exit under VT-x.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// Exits unconditionally in VMX non-root operation.
    Always,
    /// Exits when this VM-execution control is on (for I/O and MSRs: and the port or
    /// MSR is intercepted).
    Control(VmcsControl),
    /// A write to CR0 or CR4 (`cr`): exits when it changes a bit the hypervisor owns
    /// (set in the guest/host mask).
    OwnedCrBits { cr: u8 },
    /// Does not exit under VT-x.
    Never,
}

/// The VM-execution controls that make instruction classes exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VmcsControl {
    HltExiting,
    InvlpgExiting,
    MwaitExiting,
    RdpmcExiting,
    RdtscExiting,
    Cr3LoadExiting,
    Cr3StoreExiting,
    Cr8LoadExiting,
    Cr8StoreExiting,
    MovDrExiting,
    /// Every IN/OUT/INS/OUTS exits, whatever the I/O bitmaps say.
    UnconditionalIoExiting,
    /// The I/O bitmaps decide: the policy's intercepted ports exit.
    UseIoBitmaps,
    /// The MSR bitmaps decide: the policy's intercepted MSRs exit (and, on hardware,
    /// every MSR outside the bitmaps' two ranges). Off: every RDMSR/WRMSR exits.
    UseMsrBitmaps,
    MonitorExiting,
    PauseExiting,
    DescriptorTableExiting,
    WbinvdExiting,
    RdrandExiting,
    RdseedExiting,
}

impl VmcsControl {
    pub const ALL: [VmcsControl; 19] = [
        VmcsControl::HltExiting,
        VmcsControl::InvlpgExiting,
        VmcsControl::MwaitExiting,
        VmcsControl::RdpmcExiting,
        VmcsControl::RdtscExiting,
        VmcsControl::Cr3LoadExiting,
        VmcsControl::Cr3StoreExiting,
        VmcsControl::Cr8LoadExiting,
        VmcsControl::Cr8StoreExiting,
        VmcsControl::MovDrExiting,
        VmcsControl::UnconditionalIoExiting,
        VmcsControl::UseIoBitmaps,
        VmcsControl::UseMsrBitmaps,
        VmcsControl::MonitorExiting,
        VmcsControl::PauseExiting,
        VmcsControl::DescriptorTableExiting,
        VmcsControl::WbinvdExiting,
        VmcsControl::RdrandExiting,
        VmcsControl::RdseedExiting,
    ];

    /// The SDM's name of the control, for reports.
    pub fn name(self) -> &'static str {
        match self {
            VmcsControl::HltExiting => "HLT exiting",
            VmcsControl::InvlpgExiting => "INVLPG exiting",
            VmcsControl::MwaitExiting => "MWAIT exiting",
            VmcsControl::RdpmcExiting => "RDPMC exiting",
            VmcsControl::RdtscExiting => "RDTSC exiting",
            VmcsControl::Cr3LoadExiting => "CR3-load exiting",
            VmcsControl::Cr3StoreExiting => "CR3-store exiting",
            VmcsControl::Cr8LoadExiting => "CR8-load exiting",
            VmcsControl::Cr8StoreExiting => "CR8-store exiting",
            VmcsControl::MovDrExiting => "MOV-DR exiting",
            VmcsControl::UnconditionalIoExiting => "unconditional I/O exiting",
            VmcsControl::UseIoBitmaps => "use I/O bitmaps",
            VmcsControl::UseMsrBitmaps => "use MSR bitmaps",
            VmcsControl::MonitorExiting => "MONITOR exiting",
            VmcsControl::PauseExiting => "PAUSE exiting",
            VmcsControl::DescriptorTableExiting => "descriptor-table exiting",
            VmcsControl::WbinvdExiting => "WBINVD exiting",
            VmcsControl::RdrandExiting => "RDRAND exiting",
            VmcsControl::RdseedExiting => "RDSEED exiting",
        }
    }
}

/// A set of inclusive `u32` ranges, kept sorted, disjoint and merged (so equal sets
/// have equal encodings and fingerprints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<(u32, u32)>", into = "Vec<(u32, u32)>")]
pub struct RangeSet {
    ranges: Vec<(u32, u32)>,
}

impl From<Vec<(u32, u32)>> for RangeSet {
    /// Normalizes: reversed pairs are swapped, overlapping and adjacent ones merged.
    fn from(raw: Vec<(u32, u32)>) -> Self {
        let mut set = RangeSet::default();
        for (a, b) in raw {
            set.insert(a.min(b), a.max(b));
        }
        set
    }
}

impl From<RangeSet> for Vec<(u32, u32)> {
    fn from(set: RangeSet) -> Self {
        set.ranges
    }
}

impl RangeSet {
    /// The inclusive ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
    pub fn contains(&self, value: u32) -> bool {
        self.intersects(value, value)
    }
    /// True if any value in `first..=last` is in the set.
    pub fn intersects(&self, first: u32, last: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= last && first <= b)
    }
    /// Adds `first..=last` (empty if `first > last`).
    pub fn insert(&mut self, first: u32, last: u32) {
        if first > last {
            return;
        }
        let (mut lo, mut hi) = (first, last);
        // Absorb every range that overlaps or touches the new one.
        self.ranges.retain(|&(a, b)| {
            let touches = a <= hi.saturating_add(1) && lo <= b.saturating_add(1);
            if touches {
                lo = lo.min(a);
                hi = hi.max(b);
            }
            !touches
        });
        let at = self.ranges.partition_point(|&(a, _)| a < lo);
        self.ranges.insert(at, (lo, hi));
    }
    /// Removes `first..=last` (nothing if `first > last`).
    pub fn remove(&mut self, first: u32, last: u32) {
        if first > last {
            return;
        }
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b < first || a > last {
                kept.push((a, b));
                continue;
            }
            if a < first {
                kept.push((a, first - 1));
            }
            if b > last {
                kept.push((last + 1, b));
            }
        }
        self.ranges = kept;
    }
}

/// The MSR ranges the VT-x MSR bitmaps cover; accesses to any other MSR exit whenever
/// MSR bitmaps are in use (SDM 26.1.3).
pub const MSR_BITMAP_RANGES: [(u32, u32); 2] = [(0, 0x1fff), (0xc000_0000, 0xc000_1fff)];

/// Which instructions exit: the hypervisor configures VT-x (or KVM) from this value,
/// and the AOT pass clusters by it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPolicy {
    /// Ports whose IN/OUT/INS/OUTS exit (the I/O bitmaps), within 0..=0xffff.
    intercepted_ports: RangeSet,
    /// MSRs whose RDMSR/WRMSR exit (the MSR bitmaps).
    intercepted_msrs: RangeSet,
    controls: BTreeSet<VmcsControl>,
    /// CR0 bits the hypervisor owns: a guest write that changes one exits.
    cr0_guest_host_mask: u64,
    /// CR4 bits the hypervisor owns.
    cr4_guest_host_mask: u64,
}

impl Default for ExitPolicy {
    /// What the hypervisor configures: every port and MSR intercepted (through the
    /// bitmaps); CR3-load, HLT, RDTSC, RDPMC, MOV-DR, WBINVD, MONITOR and MWAIT
    /// exiting on; every CR0 and CR4 bit owned, so writes that change them exit.
    fn default() -> Self {
        ExitPolicyBuilder::new()
            .intercept_all_ports()
            .intercept_all_msrs()
            .enable(VmcsControl::Cr3LoadExiting)
            .enable(VmcsControl::HltExiting)
            .enable(VmcsControl::RdtscExiting)
            .enable(VmcsControl::RdpmcExiting)
            .enable(VmcsControl::MovDrExiting)
            .enable(VmcsControl::WbinvdExiting)
            .enable(VmcsControl::MonitorExiting)
            .enable(VmcsControl::MwaitExiting)
            .cr0_guest_host_mask(u64::MAX)
            .cr4_guest_host_mask(u64::MAX)
            .build()
    }
}

impl ExitPolicy {
    /// A builder starting from nothing intercepted (only unconditional exits remain).
    pub fn builder() -> ExitPolicyBuilder {
        ExitPolicyBuilder::new()
    }

    /// A builder starting from this policy.
    pub fn to_builder(&self) -> ExitPolicyBuilder {
        ExitPolicyBuilder {
            policy: self.clone(),
        }
    }

    pub fn intercepted_ports(&self) -> &RangeSet {
        &self.intercepted_ports
    }
    pub fn intercepted_msrs(&self) -> &RangeSet {
        &self.intercepted_msrs
    }
    pub fn controls(&self) -> impl Iterator<Item = VmcsControl> + '_ {
        self.controls.iter().copied()
    }
    pub fn control_enabled(&self, control: VmcsControl) -> bool {
        self.controls.contains(&control)
    }
    pub fn cr0_guest_host_mask(&self) -> u64 {
        self.cr0_guest_host_mask
    }
    pub fn cr4_guest_host_mask(&self) -> u64 {
        self.cr4_guest_host_mask
    }

    /// True if an access of `size` bytes (1, 2 or 4) at `port` exits: the I/O bitmaps
    /// are checked for every byte the access touches.
    pub fn port_exits(&self, port: u16, size: u8) -> bool {
        if self.control_enabled(VmcsControl::UnconditionalIoExiting) {
            return true;
        }
        if !self.control_enabled(VmcsControl::UseIoBitmaps) {
            return false;
        }
        let first = u32::from(port);
        let last = first + u32::from(size.max(1)) - 1;
        // An access wrapping past 0xffff exits on hardware.
        last > 0xffff || self.intercepted_ports.intersects(first, last)
    }

    /// True if some port access may exit (IN/OUT with DX, INS, OUTS).
    pub fn any_port_exits(&self) -> bool {
        self.control_enabled(VmcsControl::UnconditionalIoExiting)
            || (self.control_enabled(VmcsControl::UseIoBitmaps)
                && !self.intercepted_ports.is_empty())
    }

    /// True if RDMSR/WRMSR of `msr` exits.
    pub fn msr_exits(&self, msr: u32) -> bool {
        if !self.control_enabled(VmcsControl::UseMsrBitmaps) {
            return true;
        }
        let in_bitmaps = MSR_BITMAP_RANGES
            .iter()
            .any(|&(a, b)| (a..=b).contains(&msr));
        !in_bitmaps || self.intercepted_msrs.contains(msr)
    }

    /// True if some RDMSR/WRMSR may exit: MSR bitmaps off, or any MSR intercepted.
    pub fn any_msr_exits(&self) -> bool {
        !self.control_enabled(VmcsControl::UseMsrBitmaps) || !self.intercepted_msrs.is_empty()
    }

    /// Whether instructions of `class` exit under this policy, when that does not depend
    /// on run-time values beyond what the policy states (ports with DX and MSRs count
    /// as exiting if any of them is intercepted).
    pub fn class_exits(&self, class: ExitClass) -> bool {
        match class {
            ExitClass::In | ExitClass::Out | ExitClass::Ins | ExitClass::Outs => {
                self.any_port_exits()
            }
            ExitClass::Rdmsr | ExitClass::Wrmsr => self.any_msr_exits(),
            ExitClass::Clts => self.cr0_guest_host_mask & cr0::TS != 0,
            ExitClass::Lmsw => self.cr0_guest_host_mask & cr0::LMSW_BITS != 0,
            _ => match class.exit_kind() {
                ExitKind::Always => true,
                ExitKind::Control(control) => self.control_enabled(control),
                ExitKind::OwnedCrBits { cr: 0 } => self.cr0_guest_host_mask != 0,
                ExitKind::OwnedCrBits { .. } => self.cr4_guest_host_mask != 0,
                ExitKind::Never => false,
            },
        }
    }

    /// SHA-256 of the policy's postcard encoding: translations record it, and the
    /// hypervisor rejects translations made for another policy.
    pub fn fingerprint(&self) -> [u8; 32] {
        // The encoding of plain sets and integers cannot fail; an empty encoding
        // would still give a fixed, distinct-from-real-policies hash.
        let encoded = postcard::to_allocvec(self).unwrap_or_default();
        Sha256::digest(&encoded).into()
    }

    /// The strongly exiting class of `instr` under this policy: `None` if it does not
    /// exit (or is no exiting class at all). IN/OUT with an immediate port exit if any
    /// byte of the access is intercepted; with DX (and INS/OUTS), if any port is.
    /// RDMSR/WRMSR exit if any MSR is intercepted.
    pub fn classify(&self, instr: &Instruction) -> Option<ExitClass> {
        let class = exit_class_of(instr)?;
        let exits = match class {
            ExitClass::In | ExitClass::Out => match immediate_port(instr) {
                Some(port) => self.port_exits(port, io_size(instr)),
                None => self.any_port_exits(),
            },
            _ => self.class_exits(class),
        };
        exits.then_some(class)
    }

    /// True for instructions that access memory through an operand (loads, stores,
    /// read-modify-writes, string instructions): they may hit MMIO or traced memory and
    /// exit. Implicit stack accesses are not counted (the stack is RAM), nor operands
    /// that only compute an address (LEA, INVLPG, NOP forms, prefetches, CLFLUSH).
    pub fn is_weak(&self, instr: &Instruction) -> bool {
        if address_only(instr.mnemonic()) {
            return false;
        }
        (0..instr.op_count()).any(|i| is_memory_kind(instr.op_kind(i)))
    }
}

/// Instructions whose memory operand is only an address, never accessed as data.
fn address_only(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Lea
            | Mnemonic::Nop
            | Mnemonic::Invlpg
            | Mnemonic::Invlpga
            | Mnemonic::Prefetch
            | Mnemonic::Prefetchnta
            | Mnemonic::Prefetcht0
            | Mnemonic::Prefetcht1
            | Mnemonic::Prefetcht2
            | Mnemonic::Prefetchw
            | Mnemonic::Prefetchwt1
            | Mnemonic::Clflush
            | Mnemonic::Clflushopt
            | Mnemonic::Clwb
            | Mnemonic::Cldemote
    )
}

fn is_memory_kind(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Memory
            | OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// The port of IN/OUT with an 8-bit immediate port, `None` for the DX forms.
fn immediate_port(instr: &Instruction) -> Option<u16> {
    (0..instr.op_count())
        .find(|&i| instr.op_kind(i) == OpKind::Immediate8)
        .map(|_| u16::from(instr.immediate8()))
}

/// Access size of IN/OUT: the accumulator's width.
fn io_size(instr: &Instruction) -> u8 {
    (0..instr.op_count())
        .filter(|&i| instr.op_kind(i) == OpKind::Register)
        .map(|i| instr.op_register(i))
        .find(|r| matches!(r, Register::AL | Register::AX | Register::EAX))
        .map_or(1, |r| r.size() as u8)
}

/// The exit class an instruction belongs to by mnemonic and operands alone,
/// whatever the policy.
pub fn exit_class_of(instr: &Instruction) -> Option<ExitClass> {
    use ExitClass as E;
    Some(match instr.mnemonic() {
        Mnemonic::In => E::In,
        Mnemonic::Out => E::Out,
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => E::Ins,
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => E::Outs,
        Mnemonic::Rdmsr => E::Rdmsr,
        Mnemonic::Wrmsr => E::Wrmsr,
        Mnemonic::Mov => return mov_cr_dr_class(instr),
        Mnemonic::Clts => E::Clts,
        Mnemonic::Lmsw => E::Lmsw,
        Mnemonic::Cpuid => E::Cpuid,
        Mnemonic::Hlt => E::Hlt,
        Mnemonic::Invlpg => E::Invlpg,
        Mnemonic::Invpcid => E::Invpcid,
        Mnemonic::Wbinvd => E::Wbinvd,
        Mnemonic::Wbnoinvd => E::Wbnoinvd,
        Mnemonic::Invd => E::Invd,
        Mnemonic::Xsetbv => E::Xsetbv,
        Mnemonic::Xgetbv => E::Xgetbv,
        Mnemonic::Rdtsc => E::Rdtsc,
        Mnemonic::Rdtscp => E::Rdtscp,
        Mnemonic::Rdpmc => E::Rdpmc,
        Mnemonic::Vmcall => E::Vmcall,
        Mnemonic::Vmlaunch
        | Mnemonic::Vmresume
        | Mnemonic::Vmptrld
        | Mnemonic::Vmptrst
        | Mnemonic::Vmread
        | Mnemonic::Vmwrite
        | Mnemonic::Vmclear
        | Mnemonic::Vmxon
        | Mnemonic::Vmxoff
        | Mnemonic::Invept
        | Mnemonic::Invvpid => E::VmxInstruction,
        Mnemonic::Monitor => E::Monitor,
        Mnemonic::Mwait => E::Mwait,
        Mnemonic::Lgdt => E::Lgdt,
        Mnemonic::Lidt => E::Lidt,
        Mnemonic::Lldt => E::Lldt,
        Mnemonic::Ltr => E::Ltr,
        Mnemonic::Sgdt => E::Sgdt,
        Mnemonic::Sidt => E::Sidt,
        Mnemonic::Sldt => E::Sldt,
        Mnemonic::Str => E::Str,
        Mnemonic::Pause => E::Pause,
        Mnemonic::Rdrand => E::Rdrand,
        Mnemonic::Rdseed => E::Rdseed,
        Mnemonic::Getsec => E::Getsec,
        Mnemonic::Invlpga => E::Invlpga,
        Mnemonic::Rsm => E::Rsm,
        _ => return None,
    })
}

/// MOV to or from a control or debug register: which class, by direction and number.
fn mov_cr_dr_class(instr: &Instruction) -> Option<ExitClass> {
    if instr.op_count() != 2
        || instr.op0_kind() != OpKind::Register
        || instr.op1_kind() != OpKind::Register
    {
        return None;
    }
    let (dst, src) = (instr.op0_register(), instr.op1_register());
    if dst.is_cr() {
        return match dst.number() {
            0 => Some(ExitClass::MovToCr0),
            3 => Some(ExitClass::MovToCr3),
            4 => Some(ExitClass::MovToCr4),
            8 => Some(ExitClass::MovToCr8),
            _ => None,
        };
    }
    if src.is_cr() {
        return match src.number() {
            0 => Some(ExitClass::MovFromCr0),
            3 => Some(ExitClass::MovFromCr3),
            4 => Some(ExitClass::MovFromCr4),
            8 => Some(ExitClass::MovFromCr8),
            _ => None,
        };
    }
    if dst.is_dr() {
        return Some(ExitClass::MovToDr);
    }
    if src.is_dr() {
        return Some(ExitClass::MovFromDr);
    }
    None
}

/// States a policy other than the default. Ranges are inclusive; later calls override
/// earlier ones where they overlap.
#[derive(Clone, Debug)]
pub struct ExitPolicyBuilder {
    policy: ExitPolicy,
}

impl Default for ExitPolicyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitPolicyBuilder {
    /// Nothing intercepted, no controls on, no CR bits owned. I/O and MSR bitmaps are
    /// in use (so ports and MSRs exit only as later intercepted).
    pub fn new() -> Self {
        let mut controls = BTreeSet::new();
        controls.insert(VmcsControl::UseIoBitmaps);
        controls.insert(VmcsControl::UseMsrBitmaps);
        ExitPolicyBuilder {
            policy: ExitPolicy {
                intercepted_ports: RangeSet::default(),
                intercepted_msrs: RangeSet::default(),
                controls,
                cr0_guest_host_mask: 0,
                cr4_guest_host_mask: 0,
            },
        }
    }
    pub fn intercept_ports(mut self, first: u16, last: u16) -> Self {
        self.policy
            .intercepted_ports
            .insert(u32::from(first), u32::from(last));
        self
    }
    pub fn intercept_all_ports(self) -> Self {
        self.intercept_ports(0, 0xffff)
    }
    pub fn pass_through_ports(mut self, first: u16, last: u16) -> Self {
        self.policy
            .intercepted_ports
            .remove(u32::from(first), u32::from(last));
        self
    }
    pub fn intercept_msrs(mut self, first: u32, last: u32) -> Self {
        self.policy.intercepted_msrs.insert(first, last);
        self
    }
    /// Every MSR the bitmaps cover (the others exit anyway with bitmaps in use).
    pub fn intercept_all_msrs(mut self) -> Self {
        for (first, last) in MSR_BITMAP_RANGES {
            self.policy.intercepted_msrs.insert(first, last);
        }
        self
    }
    pub fn pass_through_msrs(mut self, first: u32, last: u32) -> Self {
        self.policy.intercepted_msrs.remove(first, last);
        self
    }
    pub fn enable(mut self, control: VmcsControl) -> Self {
        self.policy.controls.insert(control);
        self
    }
    pub fn disable(mut self, control: VmcsControl) -> Self {
        self.policy.controls.remove(&control);
        self
    }
    pub fn cr0_guest_host_mask(mut self, mask: u64) -> Self {
        self.policy.cr0_guest_host_mask = mask;
        self
    }
    pub fn cr4_guest_host_mask(mut self, mask: u64) -> Self {
        self.policy.cr4_guest_host_mask = mask;
        self
    }
    pub fn build(self) -> ExitPolicy {
        self.policy
    }
}

#[cfg(test)]
mod tests;
