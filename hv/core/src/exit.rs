//! The backend-neutral exit handler.
//!
//! A backend turns its hardware's exit into an [`Exit`] and calls
//! [`ExitHandler::handle`] with the exiting instruction's RIP. The handler performs
//! the exit's own work through the [`Guest`] trait (device access, MSR, CPUID) and
//! answers with the value the backend must complete the instruction with. When the
//! RIP starts a translation (loaded ahead of time, or built now at the instruction's
//! third exit), the answer also says [`Next::RunCluster`]: the backend completes the
//! exiting instruction (its result written, RIP after it) and calls
//! [`ExitHandler::run_cluster`], which runs the rest of the cluster with the engine
//! and leaves the guest state at the cluster's end. Backends know no cluster rules:
//! those belong to the translator and the engine.
//!
//! Statistics ([`ExitStats`]) are counted here for every backend.

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;

use crate::cache::{Origin, TranslationCache};
use crate::engine;
use crate::format::{self as tformat, CheckedSet};
use crate::guest::{CpuState, Fault, Guest};
use crate::guest_code::{GuestCode, LearnedTargets, RegionKey};
use crate::ir::Bitness;
use crate::policy::{ExitClass, ExitPolicy};
use crate::stats::{BackendExits, EarlyStop, ExitReason, ExitStats};
use crate::tracker::{Tracker, TrackerConfig};
use crate::translator::{self, TranslatorConfig};

mod callers;
mod mode;
mod served;
pub use callers::{EXITS_TO_REPLACE, MAX_CALLERS_PER_SITE};
pub use mode::Mode;
use served::{Served, Way};

/// One VM exit, as a backend reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// IN or OUT of `size` bytes (1, 2 or 4). `value` is the data written (OUT).
    PortIo {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    /// RDMSR or WRMSR; `value` is EDX:EAX for a write.
    Msr {
        msr: u32,
        write: bool,
        value: u64,
    },
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    Hlt,
    /// MOV to/from a control register (CLTS and LMSW included).
    CrAccess {
        cr: u8,
        write: bool,
    },
    /// Anything else, with the backend's own reason number and the name it is
    /// counted under.
    Other {
        reason: u32,
        counted: ExitReason,
    },
}

impl Exit {
    /// The reason it is counted under in [`ExitStats::by_reason`].
    pub fn reason(&self) -> ExitReason {
        match self {
            Exit::PortIo { write: false, .. } => ExitReason::IoIn,
            Exit::PortIo { write: true, .. } => ExitReason::IoOut,
            Exit::Msr { write: false, .. } => ExitReason::Rdmsr,
            Exit::Msr { write: true, .. } => ExitReason::Wrmsr,
            Exit::Cpuid { .. } => ExitReason::Cpuid,
            Exit::Hlt => ExitReason::Hlt,
            Exit::CrAccess { .. } => ExitReason::CrAccess,
            Exit::Other { counted, .. } => *counted,
        }
    }
}

/// What the backend does after [`ExitHandler::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Complete the instruction and resume the guest.
    Resume,
    /// Complete the instruction (RIP after it, result written), then call
    /// [`ExitHandler::run_cluster`] with this start RIP before resuming.
    RunCluster { start: u64 },
    /// The guest halted (HLT): the backend decides (wait for an interrupt, or stop).
    Halt,
}

/// The handler's answer to one exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The instruction's result: IN data (low `size` bytes), RDMSR value, or a fault
    /// the backend injects instead of completing the instruction. `Ok(0)` for exits
    /// without a result.
    pub value: Result<u64, Fault>,
    pub next: Next,
}

/// How a cluster run ended, for the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterEnd {
    /// Where the guest resumes.
    pub rip: u64,
    /// Instructions the run executed that exit on this backend (each an exit avoided).
    pub exiting: u64,
    /// Guest instructions the engine ran.
    pub insns: u64,
    /// Set when the run stopped early (fault delivered, unsupported instruction...).
    pub early: Option<String>,
}

/// Instruction budget of one cluster run (the engine's default).
pub const DEFAULT_INSN_BUDGET: u64 = 4096;

pub use crate::stats::IDLE_SITE_RETRY;

/// How the cluster about to run was entered ([`ExitHandler::enter`]).
#[derive(Clone, Copy, Debug)]
struct Entered {
    /// The exit RIP the run is counted for.
    site: u64,
    way: Way,
    /// The translation's entry.
    start: u64,
    /// The caller the translation was made for ([`callers`]).
    caller: Option<u64>,
}

/// The exit handler: mode, translation cache, dynamic tracker and statistics.
pub struct ExitHandler {
    mode: Mode,
    policy: ExitPolicy,
    /// What exits on this backend: only these count as avoided inside clusters.
    backend_exits: BackendExits,
    cache: TranslationCache,
    tracker: Tracker,
    stats: ExitStats,
    /// A monotonic nanosecond clock for measuring translation work, if the backend has one.
    clock: Option<fn() -> u64>,
    insn_budget: u64,
    translator: TranslatorConfig,
    /// The guest's physical-address width (from its CPUID, which does not change
    /// it at run time), read at the first cluster run: page walks check reserved
    /// bits against it.
    maxphyaddr: Option<u8>,
    /// Where indirect branches and returns of clusters went when no guard expected
    /// it: the next translation accepts these.
    learned: LearnedTargets,
    /// How the cluster about to run was entered.
    entered: Option<Entered>,
    /// Where the return address of each site's function lies, and the callers
    /// with translations there ([`callers`]).
    callers: callers::Callers,
    /// What the runs after exits at each RIP absorbed, entered each way
    /// ([`served`]).
    served: alloc::collections::BTreeMap<u64, Served>,
    /// Entries of AOT translations that ran at least once.
    aot_ran: alloc::collections::BTreeSet<u64>,
    /// The reason of the exit counted last: the one `next_after` is asked about.
    last_reason: Option<ExitReason>,
}

impl fmt::Debug for ExitHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitHandler")
            .field("mode", &self.mode)
            .field("translations", &self.cache.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl ExitHandler {
    pub fn new(mode: Mode, policy: ExitPolicy) -> Self {
        let backend_exits = BackendExits::of_policy(&policy);
        ExitHandler {
            mode,
            policy,
            stats: ExitStats {
                exit_set: backend_exits.classes().collect(),
                ..ExitStats::default()
            },
            backend_exits,
            cache: TranslationCache::new(),
            tracker: Tracker::new(TrackerConfig::default()),
            clock: None,
            insn_budget: DEFAULT_INSN_BUDGET,
            translator: TranslatorConfig::default(),
            maxphyaddr: None,
            learned: LearnedTargets::default(),
            aot_ran: Default::default(),
            entered: None,
            callers: Default::default(),
            served: Default::default(),
            last_reason: None,
        }
    }

    /// Use these cluster rules for run-time translations.
    pub fn with_translator_config(mut self, config: TranslatorConfig) -> Self {
        self.translator = config;
        self
    }

    /// The exit classes that reach this handler on the backend, as configured
    /// (default: every class the policy intercepts, as on VT-x). Instructions of
    /// other classes run inside clusters are counted apart, never as avoided.
    pub fn with_backend_exits(mut self, exits: BackendExits) -> Self {
        self.stats.exit_set = exits.classes().collect();
        self.backend_exits = exits;
        self
    }

    /// Instruction budget of one cluster run.
    pub fn with_insn_budget(mut self, budget: u64) -> Self {
        self.insn_budget = budget.max(1);
        self
    }

    /// Give the handler a monotonic clock (ns) to time run-time translation.
    pub fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn policy(&self) -> &ExitPolicy {
        &self.policy
    }
    pub fn stats(&self) -> &ExitStats {
        &self.stats
    }
    pub fn stats_mut(&mut self) -> &mut ExitStats {
        &mut self.stats
    }
    /// The destinations guards have learned, by region entry and site.
    pub fn learned(&self) -> &crate::guest_code::LearnedTargets {
        &self.learned
    }

    pub fn cache(&self) -> &TranslationCache {
        &self.cache
    }
    /// The translation cache, to insert hand-made translations (tests, tools).
    /// What goes in is validated as always; the statistics do not count it.
    pub fn cache_mut(&mut self) -> &mut TranslationCache {
        &mut self.cache
    }

    /// Load a decoded translation set made ahead of time. It is checked against the
    /// running guest's identity ([`crate::identity::of_segments`]) and the policy;
    /// a rejected set leaves the guest on dynamic clustering (if the mode has it)
    /// and the reason is kept in the statistics and returned. In modes without AOT
    /// nothing is loaded.
    pub fn load_translations(
        &mut self,
        set: CheckedSet,
        guest_digest: &[u8; 32],
    ) -> Result<usize, String> {
        if !self.mode.uses_aot() {
            return Ok(0);
        }
        let fingerprint = self.policy.fingerprint();
        if let Err(r) = tformat::check_against(set.set(), guest_digest, &fingerprint) {
            let why = r.to_string();
            self.stats.translations_rejected = Some(why.clone());
            return Err(why);
        }
        let n = self.cache.load_set(set);
        self.stats.translations_loaded += n as u64;
        Ok(n)
    }

    /// Record that loading failed before a set could be decoded (damaged section).
    pub fn reject_translations(&mut self, why: String) {
        self.stats.translations_rejected = Some(why);
    }

    /// Count an exit that the backend handled itself (string I/O, MMIO, ...).
    pub fn count_exit(&mut self, reason: ExitReason) {
        self.stats.count_exit(reason);
        self.last_reason = Some(reason);
    }

    /// Handle one exit of the instruction at `rip`: count it, [`perform`] it and,
    /// when it succeeded, ask [`next_after`] what follows.
    ///
    /// [`perform`]: ExitHandler::perform
    /// [`next_after`]: ExitHandler::next_after
    pub fn handle<G: Guest + ?Sized>(&mut self, exit: &Exit, rip: u64, guest: &mut G) -> Reply {
        self.count_exit(exit.reason());
        if *exit == Exit::Hlt {
            return Reply {
                value: Ok(0),
                next: Next::Halt,
            };
        }
        let value = self.perform(exit, guest);
        let next = match value {
            Ok(_) => self.next_after(rip, guest),
            Err(_) => {
                if self.mode != Mode::Off {
                    self.stats.count_site(rip, self.last_reason, false);
                }
                Next::Resume
            }
        };
        Reply { value, next }
    }

    /// A port write the backend's host held back and handed over later, in order
    /// (KVM's coalesced PIO ring): its device work as [`perform`] does it, counted
    /// as a coalesced write, not as an exit (it never reached the handler as one).
    ///
    /// [`perform`]: ExitHandler::perform
    pub fn perform_coalesced<G: Guest + ?Sized>(&mut self, exit: &Exit, guest: &mut G) {
        let _ = self.do_exit_work(exit, guest);
        self.stats.coalesced_writes += 1;
    }

    /// The exit's own work (device access, MSR, CPUID), without counting it or
    /// looking for a cluster: for a backend that learns where the exiting
    /// instruction is only after completing it with this result (KVM).
    pub fn perform<G: Guest + ?Sized>(&mut self, exit: &Exit, guest: &mut G) -> Result<u64, Fault> {
        if let Exit::PortIo { port, .. } = *exit {
            self.stats.count_port_exit(port);
        }
        self.do_exit_work(exit, guest)
    }

    fn do_exit_work<G: Guest + ?Sized>(
        &mut self,
        exit: &Exit,
        guest: &mut G,
    ) -> Result<u64, Fault> {
        match *exit {
            Exit::PortIo {
                port,
                size,
                write: false,
                ..
            } => Ok(u64::from(guest.port_in(port, size))),
            Exit::PortIo {
                port,
                size,
                write: true,
                value,
            } => {
                guest.port_out(port, size, value);
                Ok(0)
            }
            Exit::Msr {
                msr, write: false, ..
            } => guest.rdmsr(msr),
            Exit::Msr {
                msr,
                write: true,
                value,
            } => guest.wrmsr(msr, value).map(|()| 0),
            Exit::Cpuid { leaf, subleaf } => {
                let r = guest.cpuid(leaf, subleaf);
                // EAX | EBX << 32 is of no use to a backend: it reads the four
                // registers itself through `Guest::cpuid`; report EAX.
                Ok(u64::from(r[0]))
            }
            Exit::Hlt | Exit::CrAccess { .. } | Exit::Other { .. } => Ok(0),
        }
    }

    /// What follows a performed exit of the instruction that starts at `rip` (its
    /// exact address): a cluster to run after it, or nothing. In mode `off`,
    /// always [`Next::Resume`].
    pub fn next_after<G: Guest + ?Sized>(&mut self, rip: u64, guest: &mut G) -> Next {
        if self.mode == Mode::Off {
            return Next::Resume;
        }
        // A site whose clusters absorb nothing (Linux's RDTSC on the way back to
        // user space: its cluster ends before the next exit every time) runs none: the
        // engine's work there gains no exit. One exit in IDLE_SITE_RETRY still
        // runs one, in case the guest's path there has changed.
        if let Some(site) = self.stats.exit_sites.get(&rip) {
            let exits = self.stats.by_rip.get(&rip).copied().unwrap_or(0);
            if site.idle() && exits % IDLE_SITE_RETRY != 0 {
                self.stats.count_site(rip, self.last_reason.take(), false);
                self.stats.clusters_skipped_idle += 1;
                return Next::Resume;
            }
        }
        let next = self.cluster_for(rip, guest);
        let clustered = matches!(next, Next::RunCluster { .. });
        self.stats
            .count_site(rip, self.last_reason.take(), clustered);
        next
    }

    /// The translation to run after the exit at `rip`, building one at the
    /// instruction's third exit in dynamic modes.
    fn cluster_for<G: Guest + ?Sized>(&mut self, rip: u64, guest: &mut G) -> Next {
        if self.mode.uses_dynamic() {
            if let Some(next) = self.enter_for_caller(rip, guest) {
                return next;
            }
        }
        // An exiting instruction inside a translation (not its last instruction)
        // may run the rest of that translation from there. A backend sees only some
        // exits (KVM handles CPUID and CR moves itself, and may hold port writes
        // back), so a cluster whose first instructions never exit to the handler is
        // still entered at its next exiting one.
        let tail = self.containing_exit(rip);
        let served = self.served.get(&rip).copied().unwrap_or_default();
        let own = self.cache.lookup(rip).is_some();
        if own {
            // Both may serve the RIP: the one whose runs from here absorb more.
            let Some(start) = tail else {
                return self.enter(rip, Way::Own, rip, None);
            };
            let tail_reaches_more = || self.reach(start, rip) > self.reach(rip, rip);
            return match served.choose(tail_reaches_more) {
                Way::Tail => self.enter(rip, Way::Tail, start, None),
                Way::Own => self.enter(rip, Way::Own, rip, None),
            };
        }
        // In dynamic modes a RIP whose tail absorbs less than an exit per run (the
        // tail of a callee's copy, say, returning to another region's caller) is
        // treated as uncovered: it gets its own translation at its third exit.
        if let Some(start) = tail {
            if !served.tail.poor() || !self.mode.uses_dynamic() {
                return self.enter(rip, Way::Tail, start, None);
            }
        }
        let inside = |h: &mut Self| match tail {
            Some(start) => h.enter(rip, Way::Tail, start, None),
            None => Next::Resume,
        };
        if !self.mode.uses_dynamic() {
            return inside(self);
        }
        let state = guest.state();
        let mut bytes = [0u8; 15];
        let n = fetch_code(guest, &state, rip, &mut bytes);
        if n == 0 {
            return inside(self);
        }
        let len = seam::insn_len(&bytes[..n], bitness_of(&state), rip).unwrap_or(n);
        let obs = self.tracker.observe(rip, &bytes[..len.min(n)]);
        if !obs.translate {
            return inside(self);
        }
        if self.build(RegionKey::any_caller(rip), &state, guest) {
            self.stats.translations_built += 1;
            self.enter(rip, Way::Own, rip, None)
        } else {
            self.stats.translation_failures += 1;
            inside(self)
        }
    }

    /// What a run of the translation entered at `start` can reach after the exit
    /// at `rip` (its entry, or an exiting instruction further in).
    fn reach(&self, start: u64, rip: u64) -> crate::ir::Reach {
        let Some(e) = self.cache.lookup(start) else {
            return Default::default();
        };
        let at = if start == rip {
            e.cluster.entry_index()
        } else {
            e.cluster
                .insns
                .iter()
                .position(|i| i.rip == rip && i.exit_class.is_some())
        };
        at.map(|k| e.cluster.reach_after(k)).unwrap_or_default()
    }

    /// Run the translation entered at `start` after the exit at `rip`, entered
    /// `way`: its run is counted for `rip` ([`served`]).
    /// A translation made for one caller is `for_caller`'s.
    fn enter(&mut self, rip: u64, way: Way, start: u64, for_caller: Option<u64>) -> Next {
        self.entered = Some(Entered {
            site: rip,
            way,
            start,
            caller: for_caller,
        });
        Next::RunCluster { start }
    }

    /// Translate the cluster `region` (entered at its entry) and keep it in the
    /// cache, among the translations for its caller if it was made for one:
    /// whether it is there now. Every translation's work is timed and counted
    /// here: first builds, rebuilds after a guard learned, caller translations.
    fn build<G: Guest + ?Sized>(
        &mut self,
        region: RegionKey,
        state: &CpuState,
        guest: &mut G,
    ) -> bool {
        let t0 = self.clock.map(|c| c());
        let built = self.translate(region, state, guest);
        if let (Some(t0), Some(c)) = (t0, self.clock) {
            self.stats.translate_ns += c().saturating_sub(t0);
        }
        let Some(cluster) = built else {
            return false;
        };
        self.stats.translate_insns += cluster.insns.len() as u64;
        match region.caller {
            Some(caller) => self.cache.insert_for_caller(cluster, caller).is_ok(),
            None => self.cache.insert(cluster, Origin::Dynamic).is_ok(),
        }
    }

    fn translate<G: Guest + ?Sized>(
        &mut self,
        region: RegionKey,
        state: &CpuState,
        guest: &mut G,
    ) -> Option<crate::ir::Cluster> {
        let mut src = GuestCode {
            guest,
            state,
            learned: &self.learned,
            region,
        };
        match translator::translate_region(
            &mut src,
            region.entry,
            bitness_of(state),
            &self.policy,
            &self.translator,
        ) {
            Ok(t) => Some(t.cluster),
            Err(why) => {
                let name = match why.blocker() {
                    Some(m) => format!("{}({m:?})", why.name()),
                    None => why.name().into(),
                };
                *self
                    .stats
                    .translation_failures_by_reason
                    .entry(name)
                    .or_insert(0) += 1;
                None
            }
        }
    }

    /// The entry of another translation that holds an exiting instruction at
    /// `rip` followed by more of the cluster (the largest, if several).
    fn containing_exit(&self, rip: u64) -> Option<u64> {
        self.cache
            .containing(rip)
            .filter(|e| e.key() != rip)
            .filter(|e| {
                let insns = &e.cluster.insns;
                insns
                    .iter()
                    .position(|i| i.rip == rip)
                    .is_some_and(|k| insns[k].exit_class.is_some() && k + 1 < insns.len())
            })
            .max_by_key(|e| e.cluster.insns.len())
            .map(|e| e.key())
    }

    fn drop_translation(&mut self, region: RegionKey) {
        let start = region.entry;
        if let Some(caller) = region.caller {
            if self.cache.remove_for_caller(start, caller).is_some() {
                self.stats.stale_dropped += 1;
            }
            if let Some(site) = self.callers.of(start) {
                site.unplace(caller);
            }
            return;
        }
        if let Some(e) = self.cache.remove(start) {
            if e.origin == Origin::Aot {
                self.stats.aot_translations_stale += 1;
            }
            let entry = e
                .cluster
                .entry_index()
                .and_then(|i| e.cluster.insn_bytes(i));
            if let Some(b) = entry {
                self.tracker.forget(start, b);
            }
            self.stats.stale_dropped += 1;
        }
    }

    /// A guard of the translation `region` saw the branch or RET at `at` go to
    /// `to`: remember it and, in dynamic modes, translate the cluster again so
    /// that it goes on there next time.
    /// Whether a new destination was learned.
    fn learn_target<G: Guest + ?Sized>(
        &mut self,
        region: RegionKey,
        at: u64,
        to: u64,
        run_start: &CpuState,
        guest: &mut G,
    ) -> bool {
        if !self.mode.uses_dynamic() {
            return false;
        }
        // The guest's state when the cluster began: its mode and page tables, and
        // the registers at the exit, which the translator's page estimate reads as
        // the first build did.
        let state = run_start;
        // A destination the CPU cannot branch to (#GP at the branch: beyond the
        // CS limit, or not canonical) is no target, and must not take one of the
        // site's few slots.
        let reachable = match bitness_of(state) {
            Bitness::B64 => engine::cr::canonical(to, 48),
            _ => to <= u64::from(state.segment(crate::ir::Seg::Cs).limit),
        };
        if !reachable || !self.learned.learn(region, at, to) {
            return false;
        }
        self.stats.indirect_targets_learned += 1;
        let rebuilt = self.build(region, state, guest);
        if rebuilt {
            self.stats.translations_rebuilt += 1;
            // What the old translation absorbed from its entry says little of the
            // new one: it is tried afresh against a tail there.
            if let Some(s) = self.served.get_mut(&region.entry) {
                s.own = Default::default();
            }
        } else {
            self.stats.translation_failures += 1;
        }
        true
    }

    /// Run the translation starting at `start` after the backend completed the
    /// exiting instruction (the guest's RIP is now after it). The guest state is left
    /// where the cluster ended.
    pub fn run_cluster<G: Guest + ?Sized>(&mut self, start: u64, guest: &mut G) -> ClusterEnd {
        let maxphyaddr = *self
            .maxphyaddr
            .get_or_insert_with(|| guest.cpu_caps().maxphyaddr);
        // The exit site and way the run was entered by: its end is recorded for
        // that site ([`ExitStats::count_cluster_end`]).
        let entered = self.entered.take().filter(|e| e.start == start);
        let region = RegionKey {
            entry: start,
            caller: entered.and_then(|e| e.caller),
        };
        let entry = match region.caller {
            Some(caller) => self.cache.lookup_for_caller(start, caller),
            None => self.cache.lookup(start),
        };
        let Some(entry) = entry else {
            let rip = guest.state().rip;
            return ClusterEnd {
                rip,
                exiting: 0,
                insns: 0,
                early: Some("no translation".into()),
            };
        };
        let origin = entry.origin;
        let cluster = &entry.cluster;
        let state = guest.state();
        // Right after the entry, normally (the backend completed it); a RIP may
        // have several copies in a region (a callee laid out per call site): the
        // entry's own chain comes first.
        let after_entry = cluster.entry_index().map(|e| e + 1);
        let found = match after_entry {
            Some(k) if cluster.insns.get(k).is_some_and(|i| i.rip == state.rip) => Some(k),
            _ => cluster.insns.iter().position(|i| i.rip == state.rip),
        };
        let Some(index) = found else {
            // The exiting instruction was the cluster's last.
            return ClusterEnd {
                rip: state.rip,
                exiting: 0,
                insns: 0,
                early: None,
            };
        };
        let limits = engine::RunLimits {
            max_insns: self.insn_budget,
            maxphyaddr,
        };
        let out = engine::run(cluster, guest, index, &limits);
        // Inside a thunk, a missed destination belongs to the site that entered it.
        let miss = match out.reason {
            engine::StopReason::GuardMiss { to, insn } => {
                let at = cluster.learn_site(insn.into()).unwrap_or(out.rip());
                let ret = matches!(
                    cluster.insns.get(usize::from(insn)).map(|i| &i.op),
                    Some(crate::ir::Op::Ret { .. })
                );
                Some((at, to, ret))
            }
            _ => None,
        };
        if origin == Origin::Aot
            && !matches!(out.reason, engine::StopReason::CodeChanged)
            && self.aot_ran.insert(start)
        {
            self.stats.aot_translations_ran += 1;
        }
        if matches!(
            out.reason,
            engine::StopReason::CodeChanged | engine::StopReason::Invalid(_)
        ) && out.stats.insns == 0
        {
            // The guest's code no longer matches: drop the translation; a later
            // exit can rebuild it.
            self.drop_translation(region);
        }
        self.stats.clusters_run += 1;
        match origin {
            Origin::Aot => self.stats.clusters_run_aot += 1,
            Origin::Dynamic => self.stats.clusters_run_dynamic += 1,
        }
        let mut exiting = 0;
        for class in ExitClass::ALL {
            let n = u64::from(out.stats.exits_of(class));
            exiting += self.stats.count_in_cluster(class, n, &self.backend_exits);
        }
        let insns = out.insns();
        self.stats.cluster_insns += insns;
        if let (Some(e), Some((at, _, true))) = (entered, miss) {
            // A RET of its own translation for every caller missed: where it found
            // its return address says where the site's function keeps it
            // ([`callers`]).
            if e.way == Way::Own && e.caller.is_none() && e.site == start {
                let rsp = crate::ir::RSP as usize;
                self.note_return_slot(e.site, at, state.gpr[rsp], guest.state().gpr[rsp]);
            }
        }
        let learned =
            miss.is_some_and(|(at, to, _)| self.learn_target(region, at, to, &state, guest));
        let early = EarlyStop::of(&out.reason);
        if let Some(why) = early {
            self.stats.count_early_stop(why);
        }
        if let Some(e) = entered {
            self.served.entry(e.site).or_default().count(e.way, exiting);
            self.stats
                .count_cluster_end(e.site, exiting, out.rip(), learned);
        }
        ClusterEnd {
            rip: out.rip(),
            exiting,
            insns,
            early: early.map(|e| e.name().into()),
        }
    }
}

pub use crate::guest_code::{bitness_of, fetch_code};

impl fmt::Display for ClusterEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster ran {} instructions ({} exiting), resumes at {:#x}",
            self.insns, self.exiting, self.rip
        )?;
        if let Some(e) = &self.early {
            write!(f, ", stopped early: {e}")?;
        }
        Ok(())
    }
}

mod seam {
    use super::*;

    /// Length of the instruction at the start of `code`.
    pub fn insn_len(code: &[u8], bitness: Bitness, rip: u64) -> Option<usize> {
        let mut d =
            iced_x86::Decoder::with_ip(bitness.bits(), code, rip, iced_x86::DecoderOptions::NONE);
        let i = d.decode();
        (!i.is_invalid()).then(|| i.len())
    }
}

#[cfg(test)]
mod tests;
