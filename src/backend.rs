//! The seam between the commands that run guests (`avex run`, `avex compare`) and
//! the backends that run them: a backend takes a [`RunRequest`] and gives a
//! [`RunResult`] holding hv/core's [`ExitStats`] as its handler counted them. The
//! KVM backend (src/kvm.rs) and the Bochs backend (src/bochs.rs) implement
//! [`Backend`]; src/backends.rs picks one by name. This module imports neither.

use std::collections::BTreeMap;
use std::time::Duration;

use avex_core::exit::Mode;
use avex_core::format::TranslationSet;
use avex_core::policy::ExitPolicy;
use avex_core::stats::ExitStats;
use serde::Serialize;

/// A way to run a guest under avex's exit handler.
pub trait Backend: Sync {
    /// The name used in records and on the command line (`kvm`, `bochs`).
    fn name(&self) -> &'static str;
    /// Run `req`; `console` gets the guest's console bytes as they come.
    fn run(
        &self,
        req: &RunRequest<'_>,
        console: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<RunResult>;
    /// What `exits` counts on this backend (in the record, and in `avex compare`).
    fn exits_counted(&self, stats: &ExitStats) -> &'static str;
}

/// What a backend is asked to run.
pub struct RunRequest<'a> {
    pub name: &'a str,
    pub elf: &'a [u8],
    pub mode: Mode,
    pub policy: ExitPolicy,
    pub translations: Option<Result<TranslationSet, String>>,
    pub timeout: Duration,
    /// How a kernel (a PVH vmlinux) is booted: its initrd, command line and RAM.
    pub kernel: KernelBoot<'a>,
    /// Coalesce the writes the guest cannot observe before its next exit (KVM's
    /// coalesced PIO; `avex run/compare --coalesce`). Backends without it refuse.
    pub coalesce: bool,
    /// Measure the guest instructions between exits where that costs something
    /// (KVM: two reads of its statistics per exit; `avex run --exit-distance`,
    /// always in `avex compare`). The VT-x hypervisor always measures it.
    pub exit_distance: bool,
}

/// What `avex run --initrd/--append/--mem` adds to a run: what a Linux kernel
/// needs. `Default` is what the small guests get (no initrd, no command line, the
/// backend's default RAM).
#[derive(Clone, Debug, Default)]
pub struct KernelBoot<'a> {
    /// The initrd (module 0 of the PVH start info).
    pub initrd: Option<&'a [u8]>,
    /// The guest's command line.
    pub cmdline: String,
    /// Guest RAM in MiB (`None`: the backend's default).
    pub mem_mib: Option<u64>,
    /// The guest CPU's clock in MHz, where the backend sets it (`None`: the
    /// backend's default; a kernel booted with an initrd gets a clock a kernel is
    /// built for rather than the small guests' one).
    pub cpu_mhz: Option<u64>,
}

/// What a backend reports.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The guest's debug-exit status.
    pub status: u8,
    pub stats: ExitStats,
    pub console: Vec<u8>,
    pub seconds: f64,
    /// Backend-specific counters (KVM: its vCPU statistics' changes).
    pub details: BTreeMap<String, u64>,
    /// Backend notes (e.g. whether MSR exits reach the handler).
    pub notes: Vec<String>,
    /// Why the backend's exit statistic could not be read (KVM), if so: `exits`
    /// then counts only the exits that reached the handler.
    pub exit_statistics_unreadable: Option<String>,
    /// Where the wall time went, when the backend can tell (KVM).
    pub time_split: Option<TimeSplit>,
    /// Writes were coalesced (asked for, and the host took the zones).
    pub coalesced: bool,
}

/// Where a KVM run's wall time went, apart: time in user space is time handling
/// exits (avex's handler, device models, clusters); time in KVM_RUN is KVM running
/// the guest, which on this host means its instruction emulator (about 0.5 us a
/// guest instruction), the exits it handles in the kernel and the kernel's side of
/// each exit to user space. The time ratio of
/// two modes mixes both, so it is never the benefit of avoided exits alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeSplit {
    /// Wall time of the run, boot to debug exit, less `exit_distance_ms`.
    pub total_ms: f64,
    /// Inside KVM_RUN calls that ran the guest.
    pub kvm_run_ms: f64,
    /// Outside the KVM_RUN calls that ran the guest: handling exits in user space
    /// (total minus `kvm_run_ms`).
    pub user_space_ms: f64,
    /// Of which: running clusters (avex's engine, device models, register sync).
    pub cluster_ms: f64,
    /// Of which: KVM_RUN calls that only completed an instruction before a cluster.
    pub completion_ms: f64,
    /// Reading KVM's statistics for the exit distance (two reads per exit): not
    /// in `total_ms` or `user_space_ms`, which would otherwise be mostly this.
    pub exit_distance_ms: f64,
    /// Instructions KVM's emulator ran (`insn_emulation`), if KVM reports it.
    pub kvm_emulated_insns: Option<u64>,
    /// Guest instructions avex's engine ran inside clusters.
    pub engine_insns: u64,
}

/// A run's name in tables and charts: the mode, `+coalesce` when writes were
/// coalesced (`off+coalesce`).
pub fn variant_name(mode: Mode, coalesced: bool) -> String {
    if coalesced {
        format!("{}+coalesce", mode.name())
    } else {
        mode.name().to_string()
    }
}
