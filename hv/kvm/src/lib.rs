//! avex's hosted backend on `/dev/kvm` (rust-vmm's `kvm-ioctls`).
//!
//! One VM, one vCPU, guest RAM mmap'd at guest-physical 0 and loaded by the boot
//! ABI (`avex_core::boot`), the standard device models on a [`PortBus`], CPUID from
//! KVM's supported table, and user-space MSR exits (`KVM_CAP_X86_USER_SPACE_MSR` +
//! `KVM_X86_SET_MSR_FILTER`) for the MSRs the exit policy intercepts.
//!
//! Exits to user space become [`avex_core::exit::Exit`]s for the backend-neutral
//! [`ExitHandler`]. In clustered modes the backend writes the handler's result
//! (IN data, RDMSR value) into `kvm_run`, always completes the exiting instruction
//! without running guest code (`immediate_exit` = 1: KVM_RUN returns EINTR), and
//! finds that instruction exactly from RIP before and after (the [`attribute`]
//! module); the handler then names the cluster to run after it, if any, and runs
//! it through the [`Guest`] trait.
//!
//! Exits are counted from the vCPU's `KVM_GET_STATS_FD` statistics (`exits` and
//! the per-kind counters), with the exits to user space counted apart.
//!
//! With [`Config::coalesce`], writes to a few ports go to KVM's coalesced PIO
//! ring instead of user space and are applied, in order, before the next exit is
//! handled (the [`coalesce`] module says which ports and why each is safe).
//!
//! Measured on this project's host (software KVM `kvm_pvm`, API 12):
//! - KVM_RUN with `immediate_exit` = 1 after an IN exit returns EINTR with the IN
//!   completed (AL written, RIP after it); such completions do not count in `exits`.
//! - An OUT has already completed (RIP after it) when it reaches user space; an IN
//!   and RDMSR/WRMSR have not (on hardware KVM none has): the completion KVM_RUN
//!   then leaves RIP where it is, and [`attribute`] takes the one instruction that
//!   ends there and matches the exit.
//! - KVM_GET/SET_REGS, SREGS and MSRS cost 13-25 us each, more than the user-space
//!   part of an exit; registers therefore travel in `kvm_run` (KVM_CAP_SYNC_REGS)
//!   and FS/GS base MSRs go through the segment bases.
//! - `KVM_CAP_X86_USER_SPACE_MSR` and `KVM_X86_SET_MSR_FILTER` work: the MSRs the
//!   policy intercepts exit to avex. CPUID, MOV CR and RDTSC stay inside KVM, so
//!   clusters that start there are entered at their next exit ([`ExitHandler`]
//!   runs a translation from an exiting instruction inside it).
//! - KVM's supported CPUID table carries the APIC ID of the host CPU that answered;
//!   it is normalized to 0 so that runs are deterministic.

mod attribute;
mod coalesce;
mod distance;
mod exits;
mod insn;
mod kstats;
mod mem;
mod vcpu;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::time::{Duration, Instant};

use avex_core::boot::{self, BootError};
use avex_core::devices::{PortBus, StandardConfig};
use avex_core::exit::{ExitHandler, Mode};
use avex_core::format::TranslationSet;
use avex_core::guest::Guest;
use avex_core::policy::{ExitPolicy, MSR_BITMAP_RANGES};
use avex_core::stats::{BackendExits, ExitReason, ExitStats};
use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_EXIT_INTERNAL_ERROR, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VmFd,
};

pub use coalesce::{Coalescing, Zone, ZONES};
pub use kstats::VcpuStats;
pub use mem::GuestRam;
pub use vcpu::KvmGuest;

/// Default guest RAM: 32 MiB.
pub const DEFAULT_RAM_BYTES: usize = 32 << 20;

/// How to run a guest.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub policy: ExitPolicy,
    pub ram_bytes: usize,
    pub cmdline: String,
    /// Wall-clock limit for the whole run.
    pub timeout: Option<Duration>,
    pub devices: StandardConfig,
    /// Translations made ahead of time: a decoded set, or why it could not be
    /// decoded (the guest then runs on dynamic clustering where the mode allows).
    pub translations: Option<Result<TranslationSet, String>>,
    /// Register KVM coalesced PIO zones ([`ZONES`]) for the ports whose writes
    /// the guest cannot observe before its next exit.
    pub coalesce: bool,
    /// Measure the guest instructions between exits (`stats.exit_distance`) from
    /// KVM's `insn_emulation`, read at each exit (the [`distance`] module).
    pub exit_distance: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Dynamic,
            policy: ExitPolicy::default(),
            ram_bytes: DEFAULT_RAM_BYTES,
            cmdline: String::new(),
            timeout: Some(Duration::from_secs(60)),
            devices: StandardConfig::default(),
            translations: None,
            coalesce: false,
            exit_distance: false,
        }
    }
}

/// Whether guest MSR accesses reach user space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsrExits {
    /// The policy intercepts no MSR.
    NotNeeded,
    /// Enabled: MSRs the policy intercepts exit to avex.
    Enabled,
    /// The host refused (the reason): KVM handles every MSR itself.
    Unsupported(String),
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// The guest's debug-exit status.
    pub status: u8,
    pub mode: Mode,
    /// Counters of the exit handler, with `hardware_exits` from KVM's `exits`.
    pub stats: ExitStats,
    /// KVM_RUN calls that returned to user space with an exit (immediate-exit
    /// completions not included).
    pub user_exits: u64,
    /// KVM_RUN calls made only to complete an exiting instruction (immediate
    /// exit), one per exit in clustered modes (see the `attribute` module).
    pub completions: u64,
    /// Exits whose instruction could not be identified exactly (no candidate, or
    /// several): each was handled singly, without a cluster.
    pub unattributed_exits: u64,
    /// Guest TLB flushes the backend made KVM do after clusters that invalidated
    /// translations (INVLPG, MOV CR3...) where KVM would not have flushed itself.
    pub tlb_flushes: u64,
    /// Register/CPUID ioctls the backend made (registers travel in `kvm_run`
    /// when the host has KVM_CAP_SYNC_REGS, which makes this small).
    pub reg_ioctls: u64,
    /// Where the time went.
    pub time: TimeSplit,
    /// Changes of the vCPU's KVM statistics over the run (`exits`, `io_exits`, ...).
    pub kvm_stats: BTreeMap<String, u64>,
    pub msr_exits: MsrExits,
    /// Whether writes were coalesced (`stats.coalesced_writes` counts them).
    pub coalescing: Coalescing,
    /// Why KVM's `exits` statistic could not be read, when it could not: then
    /// `stats.hardware_exits` is `None` and `stats.exits()` counts only the exits
    /// that reached user space.
    pub exit_statistics_unreadable: Option<String>,
    /// Every console byte the guest wrote.
    pub console: Vec<u8>,
    /// Wall time of the run (boot to debug exit).
    pub seconds: f64,
}

/// Why a guest could not be run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm is not available ({0}): the KVM backend needs a host with KVM")]
    NoKvm(String),
    #[error("no permission to open /dev/kvm ({0}): run as a user in the kvm group, or as root")]
    NoPermission(String),
    #[error("KVM_GET_API_VERSION returned {0}, need 12")]
    ApiVersion(i32),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {bytes} bytes of guest RAM: {source}")]
    Memory {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("cannot load the guest: {0}")]
    Boot(BootError),
    #[error(
        "KVM could not run the guest's instruction at RIP {rip:#x} (bytes {bytes}): \
         KVM_EXIT_INTERNAL_ERROR, suberror {suberror}{hint}"
    )]
    InternalError {
        rip: u64,
        bytes: String,
        suberror: u32,
        hint: &'static str,
    },
    #[error("the guest shut down (triple fault) at RIP {rip:#x}")]
    Shutdown { rip: u64 },
    #[error(
        "the guest halted with interrupts off at RIP {rip:#x} without writing the debug-exit port"
    )]
    Halted { rip: u64 },
    #[error("the guest ran past the timeout of {secs:.1} s (RIP {rip:#x})")]
    Timeout { secs: f64, rip: u64 },
    #[error("VM entry failed: hardware reason {reason:#x}")]
    FailEntry { reason: u64 },
    #[error("unexpected exit at RIP {rip:#x}: {what}")]
    Unexpected { rip: u64, what: String },
    #[error("vCPU register access failed: {0}")]
    Register(String),
    #[error("the vCPU thread died: {0}")]
    Thread(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Open /dev/kvm, with a clear message when it is missing or not permitted.
pub fn open_kvm() -> Result<Kvm, Error> {
    open_kvm_at(c"/dev/kvm")
}

/// Open the KVM device at `path` (see [`open_kvm`]).
pub fn open_kvm_at(path: &std::ffi::CStr) -> Result<Kvm, Error> {
    match Kvm::new_with_path(path) {
        Ok(k) => {
            let v = k.get_api_version();
            if v != 12 {
                return Err(Error::ApiVersion(v));
            }
            Ok(k)
        }
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(Error::NoPermission(e.to_string()))
        }
        Err(e) => Err(Error::NoKvm(e.to_string())),
    }
}

/// Whether this host can run the KVM backend; `Err` says why not.
pub fn available() -> Result<(), Error> {
    open_kvm().map(|_| ())
}

/// One guest on one vCPU. Created and run on the same thread (the device models
/// are not `Send`); [`run`] does that on a thread of its own.
pub struct Vm {
    // Field order matters for drop: the vCPU and VM fds go before guest RAM.
    guest: KvmGuest,
    _vm: VmFd,
    _kvm: Kvm,
    handler: ExitHandler,
    stats: Result<VcpuStats, String>,
    msr_exits: MsrExits,
    coalescing: Coalescing,
    distance: Option<distance::KvmDistance>,
    user_exits: u64,
    completions: u64,
    unattributed_exits: u64,
    tlb_flushes: u64,
    run_size: usize,
    console: Vec<u8>,
    time: TimeSplit,
}

fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Vm {
    /// Create the VM, load `elf` by the boot ABI and set the vCPU up.
    pub fn new(elf: &[u8], config: &Config) -> Result<Vm, Error> {
        let kvm = open_kvm()?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut ram = GuestRam::new(config.ram_bytes).map_err(|source| Error::Memory {
            bytes: config.ram_bytes,
            source,
        })?;
        let image = boot::load(elf, ram.as_mut_slice(), &config.cmdline).map_err(Error::Boot)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.len() as u64,
            userspace_addr: ram.host_addr(),
        };
        // SAFETY: the region is exactly the live mapping `ram` owns; `Vm` drops the
        // VM fd (and with it the slot) before `ram` (field order).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let msr_exits = setup_msr_exits(&kvm, &vm, &config.policy);
        let coalescing = if config.coalesce {
            coalesce::register(&kvm, &vm)
        } else {
            Coalescing::Off
        };
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let coalescing = coalesce::map_ring(&mut vcpu, coalescing);
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        normalize_cpuid(cpuid.as_mut_slice());
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        vcpu::apply_state(&image.state, &mut regs, &mut sregs);
        sregs.gdt.base = image.gdt_base;
        sregs.gdt.limit = image.gdt_limit;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let stats = VcpuStats::open(&vcpu);
        let distance = config
            .exit_distance
            .then(|| distance::KvmDistance::open(&stats))
            .flatten();
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;

        let mut handler = ExitHandler::new(config.mode, config.policy.clone())
            .with_clock(monotonic_ns)
            .with_backend_exits(user_space_exits(&msr_exits));
        match &config.translations {
            None => {}
            Some(Err(why)) => handler.reject_translations(why.clone()),
            Some(Ok(set)) => {
                let digest = avex_core::identity::of_elf(elf).map_err(|e| Error::Boot(e.into()))?;
                // A rejected set is recorded in the statistics; the guest runs on.
                match avex_core::format::check(set.clone()) {
                    Ok(set) => {
                        let _ = handler.load_translations(set, &digest);
                    }
                    Err(e) => handler.reject_translations(format!("invalid translations: {e}")),
                }
            }
        }
        let bus = PortBus::standard(config.devices.clone());
        let sync = kvm.check_extension(Cap::SyncRegs);
        Ok(Vm {
            guest: KvmGuest::new(vcpu, ram, bus, sync),
            _vm: vm,
            _kvm: kvm,
            handler,
            stats,
            msr_exits,
            coalescing,
            distance,
            user_exits: 0,
            completions: 0,
            unattributed_exits: 0,
            tlb_flushes: 0,
            run_size,
            console: Vec::new(),
            time: TimeSplit::default(),
        })
    }

    pub fn handler(&self) -> &ExitHandler {
        &self.handler
    }
    pub fn guest_mut(&mut self) -> &mut KvmGuest {
        &mut self.guest
    }

    /// Run until the guest writes the debug-exit port (its status is returned), or
    /// fails. `console` gets the guest's console bytes as they come; `stop` ends the
    /// run with [`Error::Timeout`] when set (a signal kicks the vCPU out of KVM_RUN).
    pub fn run(
        &mut self,
        console: &mut dyn FnMut(&[u8]),
        stop: &AtomicBool,
        timeout_secs: f64,
    ) -> Result<Report, Error> {
        let before = self
            .stats
            .as_ref()
            .map(|s| s.read_all())
            .unwrap_or_default();
        let t0 = Instant::now();
        let status = self.run_loop(console, stop, timeout_secs);
        // Writes still in the ring when the run ended (a timeout, an error).
        self.drain_coalesced();
        let seconds = t0.elapsed().as_secs_f64();
        let after = self
            .stats
            .as_ref()
            .map(|s| s.read_all())
            .unwrap_or_default();
        let status = status?;
        let kvm_stats = kstats::delta(&before, &after);
        let mut stats = self.handler.stats().clone();
        stats.hardware_exits = kvm_stats.get("exits").copied();
        stats.exit_distance = self.distance_histogram();
        let exit_statistics_unreadable = statistics_unreadable(
            self.stats.as_ref().map(|_| ()).map_err(String::as_str),
            stats.hardware_exits,
        );
        Ok(Report {
            status,
            mode: self.handler.mode(),
            stats,
            user_exits: self.user_exits,
            completions: self.completions,
            unattributed_exits: self.unattributed_exits,
            tlb_flushes: self.tlb_flushes,
            reg_ioctls: self.guest.reg_ioctls,
            time: self.time,
            kvm_stats,
            msr_exits: self.msr_exits.clone(),
            coalescing: self.coalescing.clone(),
            exit_statistics_unreadable,
            console: std::mem::take(&mut self.console),
            seconds,
        })
    }

    fn flush_console(&mut self, console: &mut dyn FnMut(&[u8])) {
        if let Some(u) = self.guest.bus_mut().uart_mut() {
            let out = u.take_output();
            if !out.is_empty() {
                console(&out);
                self.console.extend_from_slice(&out);
            }
        }
    }

    fn debug_exit(&self) -> Option<u8> {
        self.guest.bus().debug_exit().and_then(|d| d.exit_status())
    }

    fn run_loop(
        &mut self,
        console: &mut dyn FnMut(&[u8]),
        stop: &AtomicBool,
        timeout_secs: f64,
    ) -> Result<u8, Error> {
        let _kick = KickTarget::set(self.guest.vcpu.get_kvm_run());
        loop {
            if stop.load(Ordering::SeqCst) {
                self.guest.invalidate();
                let rip = self.guest.rip();
                return Err(Error::Timeout {
                    secs: timeout_secs,
                    rip,
                });
            }
            self.flush_guest_tlb()?;
            self.guest.invalidate();
            self.distance_resume();
            let t_run = Instant::now();
            let result = self.guest.vcpu.run();
            self.time.kvm_run_ns += t_run.elapsed().as_nanos() as u64;
            let event = match result {
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => Event::Io,
                Ok(VcpuExit::X86Rdmsr(m)) => Event::RdMsr { index: m.index },
                Ok(VcpuExit::X86Wrmsr(m)) => Event::WrMsr {
                    index: m.index,
                    data: m.data,
                },
                Ok(VcpuExit::Hlt) => Event::Hlt,
                Ok(VcpuExit::Shutdown) => Event::Shutdown,
                Ok(VcpuExit::InternalError) => Event::Internal,
                Ok(VcpuExit::FailEntry(reason, _)) => return Err(Error::FailEntry { reason }),
                Ok(VcpuExit::MmioRead(_, data)) => {
                    data.fill(0xff);
                    Event::Mmio
                }
                Ok(VcpuExit::MmioWrite(..)) => Event::Mmio,
                Ok(VcpuExit::Intr) => Event::Interrupted,
                Ok(other) => Event::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Event::Interrupted
                }
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            };
            self.guest.ran();
            // Coalesced writes came before this exit: apply them first, so the
            // devices see every write in guest order.
            self.drain_coalesced();
            if !matches!(event, Event::Interrupted) {
                self.user_exits += 1;
                self.distance_exit();
            }
            match event {
                Event::Io => self.on_io()?,
                Event::RdMsr { index } => self.on_msr(index, false, 0)?,
                Event::WrMsr { index, data } => self.on_msr(index, true, data)?,
                Event::Hlt => {
                    self.handler.count_exit(ExitReason::Hlt);
                    self.flush_console(console);
                    if let Some(s) = self.debug_exit() {
                        return Ok(s);
                    }
                    let rip = self.guest.rip();
                    return Err(Error::Halted { rip });
                }
                Event::Shutdown => {
                    let rip = self.guest.rip();
                    self.flush_console(console);
                    return Err(Error::Shutdown { rip });
                }
                Event::Internal => {
                    self.flush_console(console);
                    return Err(self.internal_error());
                }
                Event::Mmio => self.handler.count_exit(ExitReason::Mmio),
                Event::Interrupted => {}
                Event::Other(what) => {
                    let rip = self.guest.rip();
                    return Err(Error::Unexpected { rip, what });
                }
            }
            if let Some(e) = self.guest.error.take() {
                return Err(Error::Register(e.0));
            }
            self.flush_console(console);
            if let Some(s) = self.debug_exit() {
                return Ok(s);
            }
        }
    }

    fn internal_error(&mut self) -> Error {
        let run = self.guest.vcpu.get_kvm_run();
        let suberror = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the one
            // KVM wrote; it is plain integers.
            unsafe { run.__bindgen_anon_1.internal.suberror }
        } else {
            0
        };
        let state = self.guest.state();
        let mut bytes = [0u8; 15];
        let n = avex_core::exit::fetch_code(&mut self.guest, &state, state.rip, &mut bytes);
        let hint = if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            " (KVM's instruction emulator cannot run this instruction; guests for the KVM \
             backend here must use general-purpose instructions only, no SSE/x87)"
        } else {
            ""
        };
        Error::InternalError {
            rip: state.rip,
            bytes: if n == 0 {
                "unreadable".into()
            } else {
                bytes[..n]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            suberror,
            hint,
        }
    }
}

/// Why KVM's `exits` statistic is missing from a run's record, if it is: said,
/// never silently replaced by the handled exits.
fn statistics_unreadable(opened: Result<(), &str>, exits: Option<u64>) -> Option<String> {
    match (opened, exits) {
        (Err(why), _) => Some(format!("KVM's vCPU statistics cannot be read: {why}")),
        (Ok(()), None) => Some("KVM's vCPU statistics have no readable `exits`".into()),
        (Ok(()), Some(_)) => None,
    }
}

/// Where the backend's time went (nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeSplit {
    /// Inside KVM_RUN calls that ran the guest.
    pub kvm_run_ns: u64,
    /// Inside KVM_RUN calls that only completed an instruction (immediate exit).
    pub completion_ns: u64,
    /// Running clusters (engine, device models, register sync).
    pub cluster_ns: u64,
    /// Reading `insn_emulation` for the exit distance (`Config::exit_distance`):
    /// measurement overhead, to be taken out of the time handling exits.
    pub distance_ns: u64,
}

enum Event {
    Io,
    RdMsr { index: u32 },
    WrMsr { index: u32, data: u64 },
    Hlt,
    Shutdown,
    Internal,
    Mmio,
    Interrupted,
    Other(String),
}

/// Make the CPUID table the same on every run: KVM's supported table carries the
/// APIC ID of whichever host CPU answered the ioctl; the guest's one vCPU is 0.
fn normalize_cpuid(entries: &mut [kvm_bindings::kvm_cpuid_entry2]) {
    use avex_core::arch::cpuid::*;
    for e in entries {
        match e.function {
            LEAF_FEATURES => e.ebx &= !L1_EBX_APIC_ID,
            // x2APIC ID.
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = 0,
            LEAF_AMD_EXT_APIC_ID => e.eax = 0,
            _ => {}
        }
    }
}

/// The exit classes that reach avex here: port I/O (string or not), HLT (there is
/// no in-kernel irqchip) and, with the MSR filter, the MSRs the policy intercepts.
/// KVM handles CPUID, CR moves, RDTSC, XSETBV, INVLPG... in the kernel.
fn user_space_exits(msr_exits: &MsrExits) -> BackendExits {
    use avex_core::policy::ExitClass as C;
    let msrs = (*msr_exits == MsrExits::Enabled).then_some([C::Rdmsr, C::Wrmsr]);
    BackendExits::only(
        [C::In, C::Out, C::Ins, C::Outs, C::Hlt]
            .into_iter()
            .chain(msrs.into_iter().flatten()),
    )
}

/// Ask KVM to send guest accesses to the MSRs the policy intercepts to user space.
fn setup_msr_exits(kvm: &Kvm, vm: &VmFd, policy: &ExitPolicy) -> MsrExits {
    if !policy.any_msr_exits() {
        return MsrExits::NotNeeded;
    }
    if !kvm.check_extension(Cap::X86UserSpaceMsr) || !kvm.check_extension(Cap::X86MsrFilter) {
        return MsrExits::Unsupported(
            "the host lacks KVM_CAP_X86_USER_SPACE_MSR or KVM_CAP_X86_MSR_FILTER".into(),
        );
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = vm.enable_cap(&cap) {
        return MsrExits::Unsupported(format!("KVM_ENABLE_CAP(X86_USER_SPACE_MSR): {e}"));
    }
    // One bitmap per MSR-bitmap range: a set bit lets KVM handle the MSR, a clear
    // bit sends the access to user space.
    let bitmaps: Vec<(u32, Vec<u8>)> = MSR_BITMAP_RANGES
        .iter()
        .map(|&(first, last)| {
            let count = last - first + 1;
            let mut bm = vec![0u8; count.div_ceil(8) as usize];
            for i in 0..count {
                if !policy.msr_exits(first + i) {
                    bm[(i / 8) as usize] |= 1 << (i % 8);
                }
            }
            (first, bm)
        })
        .collect();
    let ranges: Vec<MsrFilterRange> = bitmaps
        .iter()
        .map(|(first, bm)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: *first,
            msr_count: (bm.len() * 8) as u32,
            bitmap: bm,
        })
        .collect();
    // MSRs outside the bitmap ranges always exit under VT-x.
    let default = if policy.msr_exits(0x4000_0000) {
        MsrFilterDefaultAction::DENY
    } else {
        MsrFilterDefaultAction::ALLOW
    };
    match vm.set_msr_filter(default, &ranges) {
        Ok(()) => MsrExits::Enabled,
        Err(e) => MsrExits::Unsupported(format!("KVM_X86_SET_MSR_FILTER: {e}")),
    }
}

thread_local! {
    /// This thread's vCPU `kvm_run` mapping while [`Vm::run`] runs it, for the kick
    /// signal's handler (const-initialised, no destructor: a plain TLS slot that a
    /// signal handler may read).
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Publishes the vCPU's `kvm_run` to [`kick_handler`] for as long as it lives.
struct KickTarget;

impl KickTarget {
    fn set(run: *mut kvm_bindings::kvm_run) -> KickTarget {
        KVM_RUN.with(|r| r.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}

/// The kick: sets `immediate_exit`, so a KVM_RUN entered after the run loop
/// checked its stop flag returns at once (EINTR) instead of running the guest; a
/// KVM_RUN already running returns EINTR because of the signal itself. One kick is
/// never lost (Firecracker kicks its vCPUs the same way).
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's live kvm_run mapping: `KickTarget` set it
        // before the run loop and clears it before the mapping (owned by the VcpuFd
        // that outlives the loop) can go. The signal was sent to this thread, so the
        // write happens between two of its instructions; `immediate_exit` is a
        // plain u8 that KVM reads at KVM_RUN, written volatile so it is not elided.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

/// Boot `elf` on KVM and run it to its debug exit, streaming console bytes to
/// `console` as they come. The vCPU runs on a thread of its own so that the
/// timeout can kick it out of KVM_RUN.
pub fn run(elf: &[u8], config: &Config, console: &mut dyn FnMut(&[u8])) -> Result<Report, Error> {
    // Fail early, with the clear message, on this thread.
    available()?;
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
    });
    enum Msg {
        Console(Vec<u8>),
    }
    let (tx, rx) = mpsc::channel::<Msg>();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let elf = elf.to_vec();
    let config = config.clone();
    let timeout_secs = config.timeout.map_or(0.0, |t| t.as_secs_f64());
    let deadline = config.timeout.map(|t| Instant::now() + t);
    let handle = std::thread::Builder::new()
        .name("avex-vcpu".into())
        .spawn(move || -> Result<Report, Error> {
            let mut vm = Vm::new(&elf, &config)?;
            let mut sink = |b: &[u8]| {
                let _ = tx.send(Msg::Console(b.to_vec()));
            };
            vm.run(&mut sink, &stop2, timeout_secs)
        })
        .map_err(|e| Error::Thread(e.to_string()))?;
    let mut kicked = false;
    loop {
        let wait = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(100)),
            None => Duration::from_millis(100),
        };
        match rx.recv_timeout(wait) {
            Ok(Msg::Console(b)) => console(&b),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !kicked && deadline.is_some_and(|d| Instant::now() >= d) {
                    // Stop first, then kick: the vCPU thread sees the flag at its
                    // next loop, and the kick's immediate_exit makes sure there is one.
                    stop.store(true, Ordering::SeqCst);
                    use vmm_sys_util::signal::Killable;
                    let _ = handle.kill(kick_signal());
                    kicked = true;
                }
            }
        }
    }
    handle
        .join()
        .map_err(|_| Error::Thread("the vCPU thread panicked".into()))?
}

/// Is an `Err` of [`run`] about the host (no KVM), not the guest?
pub fn is_unavailable(e: &Error) -> bool {
    matches!(
        e,
        Error::NoKvm(_) | Error::NoPermission(_) | Error::ApiVersion(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kvm_device_is_a_clear_error() {
        let Err(e) = open_kvm_at(c"/nonexistent/kvm") else {
            panic!("opened a missing device");
        };
        assert!(is_unavailable(&e));
        let msg = e.to_string();
        assert!(msg.contains("/dev/kvm is not available"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        // Not a KVM device at all.
        assert!(open_kvm_at(c"/dev/null").is_err());
    }

    #[test]
    fn unreadable_statistics_are_said_with_the_reason() {
        assert_eq!(statistics_unreadable(Ok(()), Some(7)), None);
        let why = statistics_unreadable(Err("KVM_GET_STATS_FD failed: ENOTTY"), None).unwrap();
        assert!(why.contains("ENOTTY"), "{why}");
        assert!(statistics_unreadable(Ok(()), None)
            .unwrap()
            .contains("exits"));
    }

    #[test]
    fn cpuid_normalization_clears_apic_ids() {
        let mut e = [
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0302_0800,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                edx: 1,
                ..Default::default()
            },
        ];
        normalize_cpuid(&mut e);
        assert_eq!(e[0].ebx, 0x0002_0800);
        assert_eq!(e[1].edx, 0);
    }
}
