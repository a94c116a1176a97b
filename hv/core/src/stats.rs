//! Exit statistics, counted the same way by every backend (DESIGN.md, "How results
//! are counted"):
//!
//! - **exits**: VM exits the hardware took. The VT-x hypervisor counts the exits its
//!   handler sees; the KVM backend reads the vCPU's `exits` statistic from
//!   `KVM_GET_STATS_FD` and keeps the exits to user space apart
//!   ([`ExitStats::hardware_exits`] and [`ExitStats::handled`]).
//! - **exit-prone executions**: exits plus the instructions run inside clusters that
//!   would have exited *on that backend, as configured* ([`BackendExits`]). The
//!   others (CPUID on KVM, which KVM handles in the kernel) are counted apart and
//!   are never "avoided".
//! - **avoided**: exit-prone executions minus exits.
//! - **reduction**: avoided / exit-prone executions.
//!
//! One schema: [`ExitStats`] is keyed by enums ([`ExitReason`], [`ExitClass`],
//! [`EarlyStop`]) whose serde names are the report names (`io_out`, `OUT`,
//! `BUDGET`). A hypervisor that cannot hand the host a Rust value (VT-x, in Bochs)
//! prints a [`Summary`] as JSON and the host reads it back into the same types.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::distance::ExitDistance;
use crate::engine::StopReason;
use crate::guest::Fault;
use crate::policy::{ExitClass, ExitPolicy};

/// A field-less enum whose variants each have one report name, used as is by serde
/// (a string, also as a JSON map key), `name()`, `from_name()` and `Display`.
macro_rules! named_enum {
    ($(#[$m:meta])* pub enum $t:ident { $($(#[$vm:meta])* $v:ident => $n:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(into = "&'static str", try_from = "String")]
        pub enum $t { $($(#[$vm])* $v,)* }

        impl $t {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$t] = &[$($t::$v,)*];
            /// The report name (also the JSON name).
            pub fn name(self) -> &'static str {
                match self { $($t::$v => $n,)* }
            }
            pub fn from_name(name: &str) -> Option<$t> {
                $t::ALL.iter().copied().find(|v| v.name() == name)
            }
        }
        impl From<$t> for &'static str {
            fn from(v: $t) -> &'static str {
                v.name()
            }
        }
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<$t, String> {
                $t::from_name(&s).ok_or_else(|| alloc::format!("unknown {} {s:?}", stringify!($t)))
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum! {
    /// Why an exit reached the exit handler: the key of [`ExitStats::by_reason`]. The
    /// same names on every backend; a reason a backend never sees is simply absent.
    pub enum ExitReason {
        IoIn => "io_in",
        IoOut => "io_out",
        /// String port I/O (INS/OUTS, REP or not): one exit per instruction run.
        Ins => "ins",
        Outs => "outs",
        Rdmsr => "rdmsr",
        Wrmsr => "wrmsr",
        Cpuid => "cpuid",
        Hlt => "hlt",
        CrAccess => "cr_access",
        /// A guest access to memory that is not RAM (KVM's MMIO exit).
        Mmio => "mmio",
        /// VT-x: an EPT violation (a write to a protected code page, or worse).
        EptViolation => "ept_violation",
        /// VT-x: an exception or NMI, an external interrupt, an open interrupt window.
        ExceptionNmi => "exception_nmi",
        ExternalInterrupt => "external_interrupt",
        InterruptWindow => "interrupt_window",
        TripleFault => "triple_fault",
        /// VT-x: the hypervisor's preemption timer, armed for the devices' next
        /// event so their interrupts reach a guest that makes no exit (the exit a
        /// host timer interrupt would be on hardware).
        PreemptionTimer => "preemption_timer",
        /// A VM entry the processor refused (invalid guest state, MSR loading, ...).
        EntryFailed => "entry_failed",
        /// VT-x: RDTSC/RDTSCP exiting (the guest clock), XSETBV, MOV DR, RDPMC.
        Rdtsc => "rdtsc",
        Rdtscp => "rdtscp",
        Xsetbv => "xsetbv",
        DrAccess => "dr_access",
        Rdpmc => "rdpmc",
        /// Anything else (the backend's own log says more).
        Other => "other",
    }
}

named_enum! {
    /// Why a cluster run stopped before its natural end: the key of
    /// [`ExitStats::early_stops`], named as the engine's [`StopReason::name`].
    pub enum EarlyStop {
        CodeChanged => "CODE_CHANGED",
        CodeUnreadable => "CODE_UNREADABLE",
        PageFault => "PAGE_FAULT",
        NotRam => "NOT_RAM",
        GeneralProtection => "GP",
        InvalidOpcode => "UD",
        InterruptPending => "INTERRUPT_PENDING",
        BackEdgeCap => "BACK_EDGE_CAP",
        Budget => "BUDGET",
        SelfWrite => "SELF_WRITE",
        StopRequested => "STOP_REQUESTED",
        ModeChange => "MODE_CHANGE",
        Unsupported => "UNSUPPORTED",
        Invalid => "INVALID",
        StateMismatch => "STATE_MISMATCH",
    }
}

impl EarlyStop {
    /// The early stop a run ended with; `None` for a natural end (end, branch out, HLT,
    /// interrupt window).
    pub fn of(reason: &StopReason) -> Option<EarlyStop> {
        Some(match reason {
            StopReason::End
            | StopReason::ExitBranch
            | StopReason::GuardMiss { .. }
            | StopReason::Hlt
            | StopReason::InterruptWindow => return None,
            StopReason::CodeChanged => EarlyStop::CodeChanged,
            StopReason::CodeUnreadable => EarlyStop::CodeUnreadable,
            StopReason::PageFault { .. } | StopReason::Fault(Fault::PageFault { .. }) => {
                EarlyStop::PageFault
            }
            StopReason::NotRam { .. } => EarlyStop::NotRam,
            StopReason::Fault(Fault::GeneralProtection) => EarlyStop::GeneralProtection,
            StopReason::Fault(Fault::InvalidOpcode) => EarlyStop::InvalidOpcode,
            StopReason::InterruptPending => EarlyStop::InterruptPending,
            StopReason::BackEdgeCap => EarlyStop::BackEdgeCap,
            StopReason::Budget => EarlyStop::Budget,
            StopReason::SelfWrite => EarlyStop::SelfWrite,
            StopReason::StopRequested => EarlyStop::StopRequested,
            StopReason::ModeChange => EarlyStop::ModeChange,
            StopReason::Unsupported => EarlyStop::Unsupported,
            StopReason::Invalid(_) => EarlyStop::Invalid,
            StopReason::StateMismatch => EarlyStop::StateMismatch,
        })
    }
}

/// The exit classes that reach the hypervisor on a backend, as configured. Each
/// backend states its own: on VT-x, every class the exit policy intercepts
/// ([`BackendExits::of_policy`]); a hosted backend sees only what its kernel sends
/// to user space. An instruction run inside a cluster counts as an avoided exit only
/// if its class is in the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendExits {
    classes: BTreeSet<ExitClass>,
}

impl BackendExits {
    /// Every class the policy makes exit (what VT-x configured from it takes).
    pub fn of_policy(policy: &ExitPolicy) -> Self {
        Self::only(
            ExitClass::ALL
                .into_iter()
                .filter(|&c| policy.class_exits(c)),
        )
    }
    /// Exactly these classes.
    pub fn only(classes: impl IntoIterator<Item = ExitClass>) -> Self {
        BackendExits {
            classes: classes.into_iter().collect(),
        }
    }
    pub fn contains(&self, class: ExitClass) -> bool {
        self.classes.contains(&class)
    }
    /// The classes, in declaration order.
    pub fn classes(&self) -> impl Iterator<Item = ExitClass> + '_ {
        self.classes.iter().copied()
    }
}

/// Counters kept by the exit handler (backend-neutral) plus the hardware exit count
/// the backend fills in. Serialised whole into each run record (field names: the
/// serde names below); nothing is copied field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExitStats {
    /// Exits the handler saw, by reason (`io_in`, `io_out`, `rdmsr`, ...).
    #[serde(rename = "exits_by_reason")]
    pub by_reason: BTreeMap<ExitReason, u64>,
    /// Exits the handler saw (for KVM: exits to user space that reached it).
    #[serde(rename = "handled_exits")]
    pub handled: u64,
    /// VM exits the hardware took, when the backend knows a number beyond the
    /// handled ones (KVM: the `exits` statistic). `None`: `handled` is the count.
    pub hardware_exits: Option<u64>,
    /// Instructions run inside clusters that would have exited on this backend
    /// (their class is in [`ExitStats::exit_set`]): each an exit avoided.
    pub in_cluster_exiting: u64,
    /// The same, by exit class (`IN`, `OUT`, `RDMSR`, ...).
    #[serde(rename = "in_cluster_exiting_by_class")]
    pub in_cluster_by_class: BTreeMap<ExitClass, u64>,
    /// Instructions of an exit class run inside clusters that would *not* have
    /// exited on this backend (KVM runs CPUID, RDTSC and CR moves in the kernel):
    /// by class. Never counted as avoided.
    pub in_cluster_not_exiting_by_class: BTreeMap<ExitClass, u64>,
    /// The exit classes that exit on this backend, as configured ([`BackendExits`]);
    /// empty when the handler was given none.
    pub exit_set: Vec<ExitClass>,
    /// Cluster runs started.
    pub clusters_run: u64,
    /// Cluster runs by where the translation came from.
    pub clusters_run_aot: u64,
    pub clusters_run_dynamic: u64,
    /// Instructions (exiting and gap fillers) the engine ran inside clusters.
    pub cluster_insns: u64,
    /// Exits after which no cluster ran because the clusters run after that
    /// site's earlier exits absorbed nothing ([`ExitSite::idle`]).
    pub clusters_skipped_idle: u64,
    /// Cluster runs that stopped before their natural end (fault, unsupported
    /// instruction, budget, pending interrupt, ...), by stop reason.
    pub early_stops: BTreeMap<EarlyStop, u64>,
    /// Translations loaded from a pre-analyzed image (accepted into the cache).
    pub translations_loaded: u64,
    /// Why a loaded translation set was rejected, if it was.
    pub translations_rejected: Option<String>,
    /// Translations built at run time by the dynamic tracker + translator.
    pub translations_built: u64,
    /// Dynamic translation attempts that produced no cluster.
    pub translation_failures: u64,
    /// Why the translator made no cluster, by the translator's own words
    /// (`unsupported(Imul)`, ...).
    pub translation_failures_by_reason: BTreeMap<String, u64>,
    /// Run-time translation work: nanoseconds spent in the translator (0 when the
    /// backend gave the handler no clock) and guest instructions decoded into IR.
    pub translate_ns: u64,
    pub translate_insns: u64,
    /// Translations dropped because the guest bytes they cover changed.
    pub stale_dropped: u64,
    /// Loaded (AOT) translations that ran at least once, and that the byte check
    /// dropped as stale (a kernel patches its own code at boot); the others
    /// loaded never ran.
    pub aot_translations_ran: u64,
    pub aot_translations_stale: u64,
    /// Destinations of indirect branches and returns learned at run time (a
    /// cluster's guard saw one it did not expect), and the translations built
    /// again to accept them.
    pub indirect_targets_learned: u64,
    pub translations_rebuilt: u64,
    /// Translations made for one caller of the function a site is in (see
    /// [`crate::exit`]'s caller translations).
    pub translations_for_callers: u64,
    /// Exits by RIP of the exiting instruction (only where the backend gave the
    /// RIP: in modes other than `off`), for finding sites no translation covers.
    pub by_rip: BTreeMap<u64, u64>,
    /// What is known of each site in `by_rip` (same keys): its exit reason and
    /// how many of its exits a cluster ran after (`avex run --profile`).
    pub exit_sites: BTreeMap<u64, ExitSite>,
    /// Port writes the host held back and handed over in order at the next exit
    /// (KVM's coalesced PIO): applied to the devices, never counted in `handled`.
    pub coalesced_writes: u64,
    /// IN and OUT exits (not string I/O) by port, to tell a device's exits from
    /// the rest (the console's 0x3f8..0x3ff, say).
    pub port_exits: BTreeMap<u16, u64>,
    /// Guest instructions between consecutive exits (the paper's Figure 5), when
    /// the backend measured them: VT-x in Bochs always, KVM with
    /// `--exit-distance`. `None`: not measured.
    pub exit_distance: Option<ExitDistance>,
}

/// Distinct end RIPs kept per exit site ([`ExitSite::ends`]).
pub const SITE_ENDS: usize = 8;

/// Ports the summary names (the busiest).
const PORTS_SHOWN: usize = 12;

/// One exit site (the RIP of an exiting instruction) beyond its exit count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExitSite {
    /// Why the instruction there exits (`None`: not told).
    pub reason: Option<ExitReason>,
    /// Its exits after which a cluster ran (covering the exits that follow).
    pub clustered: u64,
    /// Exits those clusters absorbed (exiting instructions they ran that would
    /// have exited on this backend).
    pub absorbed: u64,
    /// Where those clusters ended (the RIP the guest resumed at) and about how
    /// often, for at most [`SITE_ENDS`] RIPs: a new RIP takes the place of the
    /// least frequent one and inherits its count (the space-saving sketch), so a
    /// frequent end is never lost and counts may be over by at most the evicted
    /// ones, whose total is `ends_other`. Where clustering stops short is where
    /// to look next.
    pub ends: BTreeMap<u64, u64>,
    pub ends_other: u64,
    /// Those runs since one last taught the hypervisor a new indirect destination
    /// (a site still learning is not idle: its next translation may reach on).
    pub runs_since_learning: u64,
}

/// Cluster runs after a site's exits before the site may be judged idle.
pub const IDLE_SITE_RUNS: u64 = 64;

/// At an idle site ([`ExitSite::idle`]), one exit in this many still runs a
/// cluster, in case the guest's path there has changed.
pub const IDLE_SITE_RETRY: u64 = 256;

impl ExitSite {
    /// Its clusters have absorbed no exit at all, and none has taught a new
    /// destination in the last [`IDLE_SITE_RUNS`] runs: running one costs the
    /// engine's time and saves nothing. (Any absorbed exit keeps a site active:
    /// which of a RIP's translations serves it best is the handler's choice, and
    /// it needs runs to choose.)
    pub fn idle(&self) -> bool {
        self.runs_since_learning >= IDLE_SITE_RUNS && self.absorbed == 0
    }

    /// The RIP its clusters ended at most often, with the count.
    pub fn top_end(&self) -> Option<(u64, u64)> {
        self.ends
            .iter()
            .max_by_key(|&(rip, n)| (*n, core::cmp::Reverse(*rip)))
            .map(|(rip, n)| (*rip, *n))
    }
}

impl ExitStats {
    /// Count an exit at `rip` (its reason, if known), and whether a cluster ran
    /// after it.
    pub(crate) fn count_site(&mut self, rip: u64, reason: Option<ExitReason>, clustered: bool) {
        *self.by_rip.entry(rip).or_insert(0) += 1;
        let site = self.exit_sites.entry(rip).or_default();
        if reason.is_some() {
            site.reason = reason;
        }
        site.clustered += u64::from(clustered);
    }

    /// A cluster run after an exit at `site` absorbed `absorbed` exits and left the
    /// guest at `end`; `learned`: its stop taught a new indirect destination.
    pub(crate) fn count_cluster_end(&mut self, site: u64, absorbed: u64, end: u64, learned: bool) {
        let s = self.exit_sites.entry(site).or_default();
        s.absorbed += absorbed;
        s.runs_since_learning = if learned {
            0
        } else {
            s.runs_since_learning + 1
        };
        if let Some(n) = s.ends.get_mut(&end) {
            *n += 1;
        } else if s.ends.len() < SITE_ENDS {
            s.ends.insert(end, 1);
        } else if let Some((&least, &n)) = s.ends.iter().min_by_key(|&(rip, n)| (*n, *rip)) {
            s.ends.remove(&least);
            s.ends.insert(end, n + 1);
            s.ends_other += n;
        }
    }

    /// VM exits taken: the hardware count if the backend has one, else the handled ones.
    pub fn exits(&self) -> u64 {
        self.hardware_exits.unwrap_or(self.handled)
    }
    /// Exits plus exiting instructions run inside clusters.
    pub fn exit_prone(&self) -> u64 {
        self.exits() + self.in_cluster_exiting
    }
    /// Exit-prone executions minus exits.
    pub fn avoided(&self) -> u64 {
        self.exit_prone() - self.exits()
    }
    /// avoided / exit-prone executions, in 0.0..=1.0 (0 when nothing was exit-prone).
    pub fn reduction(&self) -> f64 {
        match self.exit_prone() {
            0 => 0.0,
            p => self.avoided() as f64 / p as f64,
        }
    }

    pub(crate) fn count_exit(&mut self, reason: ExitReason) {
        self.handled += 1;
        *self.by_reason.entry(reason).or_insert(0) += 1;
    }

    /// Instructions of an exit class run inside clusters that would not have exited
    /// on this backend.
    pub fn in_cluster_not_exiting(&self) -> u64 {
        self.in_cluster_not_exiting_by_class.values().sum()
    }

    /// Count `n` instructions of `class` run inside a cluster: as avoided exits if
    /// the backend exits on the class, apart otherwise. Returns the avoided ones.
    pub(crate) fn count_in_cluster(
        &mut self,
        class: ExitClass,
        n: u64,
        backend: &BackendExits,
    ) -> u64 {
        if n == 0 {
            return 0;
        }
        if !backend.contains(class) {
            *self
                .in_cluster_not_exiting_by_class
                .entry(class)
                .or_insert(0) += n;
            return 0;
        }
        self.in_cluster_exiting += n;
        *self.in_cluster_by_class.entry(class).or_insert(0) += n;
        n
    }

    pub(crate) fn count_early_stop(&mut self, why: EarlyStop) {
        *self.early_stops.entry(why).or_insert(0) += 1;
    }

    /// A port's IN or OUT exit.
    pub fn count_port_exit(&mut self, port: u16) {
        *self.port_exits.entry(port).or_insert(0) += 1;
    }

    /// A multi-line human summary (what `avex run` prints on stderr).
    pub fn summary(&self) -> String {
        use core::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "exits:                  {}", self.exits());
        if self.hardware_exits.is_some() {
            let _ = writeln!(s, "  to the exit handler:  {}", self.handled);
        }
        let reasons: Vec<String> = self
            .by_reason
            .iter()
            .map(|(k, v)| alloc::format!("{k} {v}"))
            .collect();
        if !reasons.is_empty() {
            let _ = writeln!(s, "  by reason:            {}", reasons.join(", "));
        }
        if !self.port_exits.is_empty() {
            let mut ports: Vec<(&u16, &u64)> = self.port_exits.iter().collect();
            ports.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = ports
                .iter()
                .take(PORTS_SHOWN)
                .map(|(p, n)| alloc::format!("{p:#x} {n}"))
                .collect();
            let more = ports.len().saturating_sub(PORTS_SHOWN);
            let rest = if more > 0 {
                alloc::format!(" ({more} more ports)")
            } else {
                String::new()
            };
            let _ = writeln!(s, "  by port (IN/OUT):     {}{rest}", top.join(", "));
        }
        if !self.exit_set.is_empty() {
            let names: Vec<&str> = self.exit_set.iter().map(|c| c.name()).collect();
            let _ = writeln!(s, "exit classes here:      {}", names.join(", "));
        }
        let _ = writeln!(s, "exit-prone executions:  {}", self.exit_prone());
        let _ = writeln!(
            s,
            "avoided:                {} ({:.1}%)",
            self.avoided(),
            self.reduction() * 100.0
        );
        if !self.in_cluster_by_class.is_empty() {
            let _ = writeln!(
                s,
                "  in clusters, by class: {}",
                counts(&self.in_cluster_by_class)
            );
        }
        if !self.in_cluster_not_exiting_by_class.is_empty() {
            let _ = writeln!(
                s,
                "not exiting here, run in clusters (not avoided): {}",
                counts(&self.in_cluster_not_exiting_by_class)
            );
        }
        let _ = writeln!(
            s,
            "clusters run:           {} (aot {}, dynamic {}), {} instructions inside",
            self.clusters_run, self.clusters_run_aot, self.clusters_run_dynamic, self.cluster_insns
        );
        if self.clusters_skipped_idle > 0 {
            let _ = writeln!(
                s,
                "  skipped:              {} (after exits at sites whose clusters absorb nothing)",
                self.clusters_skipped_idle
            );
        }
        if !self.early_stops.is_empty() {
            let stops: Vec<String> = self
                .early_stops
                .iter()
                .map(|(k, v)| alloc::format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "  stopped early:        {}", stops.join(", "));
        }
        let _ = writeln!(s, "translations loaded:    {}", self.translations_loaded);
        if self.translations_loaded > 0 {
            let never = self
                .translations_loaded
                .saturating_sub(self.aot_translations_ran + self.aot_translations_stale);
            let _ = writeln!(
                s,
                "  of them:              {} ran, {} dropped as stale, {} never ran",
                self.aot_translations_ran, self.aot_translations_stale, never
            );
        }
        if let Some(r) = &self.translations_rejected {
            let _ = writeln!(s, "  rejected:             {r}");
        }
        let _ = writeln!(
            s,
            "translations built:     {} ({} failed; {} instructions, {:.3} ms of translation work)",
            self.translations_built,
            self.translation_failures,
            self.translate_insns,
            self.translate_ns as f64 / 1e6
        );
        if !self.translation_failures_by_reason.is_empty() {
            let why: Vec<String> = self
                .translation_failures_by_reason
                .iter()
                .map(|(k, v)| alloc::format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "  not translated:       {}", why.join(", "));
        }
        if !self.by_rip.is_empty() {
            let mut hot: Vec<(u64, u64)> = self.by_rip.iter().map(|(r, n)| (*r, *n)).collect();
            hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let top: Vec<String> = hot
                .iter()
                .take(5)
                .map(|(r, n)| alloc::format!("{r:#x} {n}"))
                .collect();
            let _ = writeln!(s, "hottest exit sites:     {}", top.join(", "));
        }
        if self.coalesced_writes > 0 {
            let _ = writeln!(
                s,
                "coalesced writes:       {} (held by the host, applied at the next exit)",
                self.coalesced_writes
            );
        }
        if let Some(d) = &self.exit_distance {
            let _ = writeln!(
                s,
                "exit distance:          {} gaps, {} guest instructions in them ({} by the engine); {:.1}% under 16 ({})",
                d.gaps,
                d.guest_insns,
                d.engine_insns,
                d.share_below(16) * 100.0,
                d.source
            );
        }
        if self.stale_dropped > 0 {
            let _ = writeln!(s, "stale translations:     {}", self.stale_dropped);
        }
        if self.indirect_targets_learned > 0 {
            let _ = writeln!(
                s,
                "indirect targets:       {} learned, {} translations rebuilt",
                self.indirect_targets_learned, self.translations_rebuilt
            );
        }
        if self.translations_for_callers > 0 {
            let _ = writeln!(
                s,
                "caller translations:    {}",
                self.translations_for_callers
            );
        }
        s
    }
}

/// The end-of-run report of a hypervisor that runs apart from the host (VT-x, in
/// Bochs): printed as one JSON line on its log port after `AVEX-SUMMARY `, and read
/// back by the host with the same type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    /// The guest's debug-exit status (255 when the hypervisor stopped the guest).
    pub status: u8,
    pub mode: Option<String>,
    pub guest: Option<String>,
    /// Why the hypervisor stopped the guest, if it did.
    pub error: Option<String>,
    /// The exit handler's statistics (absent when the run ended before it existed).
    pub stats: Option<ExitStats>,
    /// The backend's own counters (`guest_ms`, `code_page_writes`, `ticks_guest`, ...).
    pub details: BTreeMap<String, u64>,
}

/// "K v, K v" for a report line.
fn counts(m: &BTreeMap<ExitClass, u64>) -> String {
    let v: Vec<String> = m
        .iter()
        .map(|(k, v)| alloc::format!("{} {v}", k.name()))
        .collect();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_design_definitions() {
        let mut s = ExitStats::default();
        s.count_exit(ExitReason::IoOut);
        s.count_exit(ExitReason::IoOut);
        s.count_exit(ExitReason::IoIn);
        let all = BackendExits::of_policy(&ExitPolicy::default());
        assert_eq!(s.count_in_cluster(ExitClass::Out, 7, &all), 7);
        assert_eq!(s.exits(), 3);
        assert_eq!(s.exit_prone(), 10);
        assert_eq!(s.avoided(), 7);
        assert!((s.reduction() - 0.7).abs() < 1e-9);
        assert_eq!(s.by_reason[&ExitReason::IoOut], 2);
        // A hardware count overrides the handled count for "exits".
        s.hardware_exits = Some(5);
        assert_eq!(s.exits(), 5);
        assert_eq!(s.exit_prone(), 12);
        assert_eq!(s.avoided(), 7);
        assert!(s.summary().contains("avoided:                7"));
    }

    /// `out dx,al; cpuid; rdtsc; in al,dx` as one cluster entered at the OUT's
    /// exit, in dynamic mode (built at the third exit): what the run counts as
    /// avoided depends on the backend's exit set.
    fn run_out_cpuid_rdtsc_in(exits: Option<BackendExits>) -> ExitStats {
        use crate::engine::test_guest::TestGuest;
        use crate::engine::Paging;
        use crate::exit::{Exit, ExitHandler, Mode, Next};
        let mut h = ExitHandler::new(Mode::Dynamic, ExitPolicy::default());
        if let Some(e) = exits {
            h = h.with_backend_exits(e);
        }
        let mut g = TestGuest::protected32(1 << 20, Paging::None);
        g.write_bytes(0x1000, &[0xee, 0x0f, 0xa2, 0x0f, 0x31, 0xec, 0x90]);
        g.state.gpr[2] = 0x3f8;
        let out = Exit::PortIo {
            port: 0x3f8,
            size: 1,
            write: true,
            value: 0,
        };
        let mut next = Next::Resume;
        for _ in 0..3 {
            g.state.rip = 0x1000;
            next = h.handle(&out, 0x1000, &mut g).next;
        }
        assert_eq!(next, Next::RunCluster { start: 0x1000 }, "{:?}", h.stats());
        g.state.rip = 0x1001;
        let end = h.run_cluster(0x1000, &mut g);
        assert_eq!(end.rip, 0x1006, "{end}");
        assert_eq!(end.insns, 3, "{end}");
        h.stats().clone()
    }

    #[test]
    fn only_what_exits_on_the_backend_counts_as_avoided() {
        // VT-x (the default, the policy's set): CPUID, RDTSC and IN all exit there.
        let vtx = run_out_cpuid_rdtsc_in(None);
        assert_eq!(vtx.in_cluster_exiting, 3);
        assert_eq!(vtx.avoided(), 3);
        assert!(vtx.in_cluster_not_exiting_by_class.is_empty());
        assert!(
            vtx.exit_set.contains(&ExitClass::Cpuid) && vtx.exit_set.contains(&ExitClass::Rdtsc)
        );
        // KVM here: only port I/O, HLT and the filtered MSRs reach avex.
        let kvm = BackendExits::only([
            ExitClass::In,
            ExitClass::Out,
            ExitClass::Ins,
            ExitClass::Outs,
            ExitClass::Hlt,
        ]);
        let s = run_out_cpuid_rdtsc_in(Some(kvm));
        assert_eq!(s.in_cluster_exiting, 1);
        assert_eq!(s.in_cluster_by_class.get(&ExitClass::In), Some(&1));
        assert_eq!(s.avoided(), 1);
        assert_eq!(
            s.in_cluster_not_exiting_by_class.get(&ExitClass::Cpuid),
            Some(&1)
        );
        assert_eq!(
            s.in_cluster_not_exiting_by_class.get(&ExitClass::Rdtsc),
            Some(&1)
        );
        assert_eq!(s.in_cluster_not_exiting(), 2);
        use ExitClass::*;
        assert_eq!(s.exit_set, [In, Out, Ins, Outs, Hlt]);
        let text = s.summary();
        assert!(text.contains("not avoided): CPUID 1, RDTSC 1"), "{text}");
    }

    #[test]
    fn early_stops_are_named_as_the_engine_names_them() {
        use crate::engine::Invalid;
        let fault = |f| StopReason::Fault(f);
        let all = [
            StopReason::CodeChanged,
            StopReason::CodeUnreadable,
            StopReason::PageFault {
                addr: 0,
                error_code: 0,
            },
            StopReason::NotRam { gpa: 0 },
            fault(Fault::GeneralProtection),
            fault(Fault::InvalidOpcode),
            fault(Fault::PageFault {
                addr: 0,
                error_code: 0,
            }),
            StopReason::InterruptPending,
            StopReason::BackEdgeCap,
            StopReason::Budget,
            StopReason::SelfWrite,
            StopReason::StopRequested,
            StopReason::ModeChange,
            StopReason::Unsupported,
            StopReason::Invalid(Invalid::Empty),
            StopReason::StateMismatch,
        ];
        for r in all {
            assert!(r.is_early());
            assert_eq!(
                EarlyStop::of(&r).map(EarlyStop::name),
                Some(r.name()),
                "{r:?}"
            );
        }
        for r in [
            StopReason::End,
            StopReason::ExitBranch,
            StopReason::Hlt,
            StopReason::InterruptWindow,
        ] {
            assert!(!r.is_early() && EarlyStop::of(&r).is_none());
        }
        for e in EarlyStop::ALL {
            assert_eq!(EarlyStop::from_name(e.name()), Some(*e));
        }
    }

    #[test]
    fn nothing_exit_prone_is_zero_reduction() {
        let s = ExitStats::default();
        assert_eq!(s.reduction(), 0.0);
        assert_eq!(s.avoided(), 0);
    }
}
