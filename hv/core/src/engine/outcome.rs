//! How a run ends and what it did: the limits a run is given, the reasons it stops
//! and the statistics it returns.

use crate::guest::Fault;
use crate::policy::ExitClass;
use alloc::string::String;

/// Size of [`RunStats::by_class`] (indexed by `ExitClass as usize`).
pub const EXIT_CLASS_SLOTS: usize = 64;

/// Limits of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Instruction budget (each REP iteration counts as one): the run stops with
    /// [`StopReason::Budget`] before exceeding it, so interrupts are never held off
    /// long. Default 4096.
    pub max_insns: u64,
    /// The guest's MAXPHYADDR (paging-structure bits above it are reserved).
    /// Default 52 (the architectural maximum; a smaller value only makes more walks
    /// fault, which always stops the cluster safely).
    pub maxphyaddr: u8,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            max_insns: 4096,
            maxphyaddr: 52,
        }
    }
}

/// What the engine's own run-time checks found wrong with a cluster it was handed
/// ([`StopReason::Invalid`]). Clusters from the translation cache passed
/// [`crate::ir::validate`] and never stop this way; the checks keep a cluster that
/// did not (one built in place, as [`crate::emulate`] does, or a bad one handed to
/// [`super::run`] directly) from making the engine panic or run an instruction
/// whose bytes it did not check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    /// No code range, more than [`crate::ir::limits::MAX_CODE_RANGES`], or more
    /// than [`crate::ir::limits::MAX_CLUSTER_BYTES`] bytes.
    TooLarge,
    /// Instruction `n` lies outside every code range or has length 0.
    InsnPlacement(u16),
    /// An operand the instruction cannot have (an immediate destination or a
    /// memory bit offset); the instruction's index is not recorded (0).
    Operand(u16),
    /// Instruction `n` branches to an index outside the cluster.
    Target(u16),
    /// More than [`super::MAX_BACK_EDGES`] back-edge records.
    TooManyBackEdges,
    /// The start index is not an instruction of the cluster.
    StartIndex,
}

/// Why a run ended. The guest resumes at [`RunOutcome::rip`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Ran past the last instruction (or fell through to a non-contiguous one).
    End,
    /// A branch to `Target::Exit`.
    ExitBranch,
    /// An indirect CALL/JMP or a RET at `rip` (instruction `insn` of the cluster)
    /// read the destination `to`, which no guard of the cluster expects; nothing of
    /// it done. A natural end: the guest runs the instruction natively.
    GuardMiss { to: u64, insn: u16 },
    /// Stopped at a HLT: the backend handles it.
    Hlt,
    /// The instruction before `rip` enabled interrupts: a POPF that set IF, or the
    /// instruction in the shadow of an STI that set it (the shadow has passed). The
    /// run ends so the hypervisor can deliver a pending interrupt exactly here; a
    /// natural end.
    InterruptWindow,
    /// The guest's code differs from `cluster.code` (at the start: nothing
    /// done; after a MOV to CR3: the code under the new CR3 differs).
    CodeChanged,
    /// The code check could not fetch the code (a fault or not RAM); nothing done.
    CodeUnreadable,
    /// A guest page fault on the instruction at `rip` (not injected).
    PageFault { addr: u64, error_code: u32 },
    /// The instruction at `rip` accesses guest-physical memory that is not RAM.
    NotRam { gpa: u64 },
    /// The instruction at `rip` would raise this exception.
    Fault(Fault),
    /// An interrupt is pending at a back-edge (or after a TPR write).
    InterruptPending,
    /// A capped back-edge was taken more often than its cap allows.
    BackEdgeCap,
    /// [`RunLimits::max_insns`] reached.
    Budget,
    /// An instruction wrote into the cluster's own code pages; it completed.
    SelfWrite,
    /// A port write made a device ask the VMM to stop the guest (the debug-exit
    /// port, see [`Guest::stop_requested`]); the write completed, nothing after it
    /// ran. A REP OUTS stops between iterations, as when interrupted.
    StopRequested,
    /// A control-register or LMSW write changed the paging mode, PE, PG, PAE, PCIDE
    /// or another translation-affecting bit; it completed.
    ModeChange,
    /// Something the engine does not do (RDPMC, EFER writes, I/O needing the TSS
    /// permission bitmap, unknown CR4 bits, 5-level paging ...).
    Unsupported,
    /// The engine's run-time checks refused the cluster (see [`Invalid`]).
    Invalid(Invalid),
    /// The guest's RIP or code size does not match the cluster; nothing done.
    StateMismatch,
}

/// What a run did. The statistics of later work are built from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunStats {
    /// Instructions completed.
    pub insns: u32,
    /// Exit-prone instructions (those with `exit_class`) completed.
    pub exiting: u32,
    /// Completed exit-prone instructions by `ExitClass as usize`.
    pub by_class: [u32; EXIT_CLASS_SLOTS],
    /// Guest memory accesses by instructions (code check excluded); an access that
    /// crosses a page counts once.
    pub mem_accesses: u32,
    /// Page walks done (code check included; 0 without paging).
    pub page_walks: u32,
    /// REP INS/OUTS iterations done.
    pub rep_iterations: u32,
    /// Backward branches taken.
    pub back_edges: u32,
}

impl Default for RunStats {
    fn default() -> Self {
        RunStats {
            insns: 0,
            exiting: 0,
            by_class: [0; EXIT_CLASS_SLOTS],
            mem_accesses: 0,
            page_walks: 0,
            rep_iterations: 0,
            back_edges: 0,
        }
    }
}

impl RunStats {
    /// Completed instructions of one exit class.
    pub fn exits_of(&self, class: ExitClass) -> u32 {
        self.by_class.get(class as usize).copied().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    pub reason: StopReason,
    /// Where the guest resumes.
    pub rip: u64,
    /// Index of the cluster instruction at `rip`, if `rip` is one of them.
    pub index: Option<usize>,
    pub stats: RunStats,
}

impl StopReason {
    /// False for the natural ends of a cluster (its end, a branch out of it, a
    /// destination no guard expects, a HLT).
    pub fn is_early(&self) -> bool {
        !matches!(
            self,
            StopReason::End
                | StopReason::ExitBranch
                | StopReason::GuardMiss { .. }
                | StopReason::Hlt
                | StopReason::InterruptWindow
        )
    }

    /// A short upper-case name for reports (`PAGE_FAULT`, `BUDGET`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            StopReason::End => "END",
            StopReason::ExitBranch => "EXIT_BRANCH",
            StopReason::GuardMiss { .. } => "GUARD_MISS",
            StopReason::Hlt => "HLT",
            StopReason::InterruptWindow => "INTERRUPT_WINDOW",
            StopReason::CodeChanged => "CODE_CHANGED",
            StopReason::CodeUnreadable => "CODE_UNREADABLE",
            StopReason::PageFault { .. } => "PAGE_FAULT",
            StopReason::NotRam { .. } => "NOT_RAM",
            StopReason::Fault(Fault::GeneralProtection) => "GP",
            StopReason::Fault(Fault::InvalidOpcode) => "UD",
            StopReason::Fault(Fault::PageFault { .. }) => "PAGE_FAULT",
            StopReason::InterruptPending => "INTERRUPT_PENDING",
            StopReason::BackEdgeCap => "BACK_EDGE_CAP",
            StopReason::Budget => "BUDGET",
            StopReason::SelfWrite => "SELF_WRITE",
            StopReason::StopRequested => "STOP_REQUESTED",
            StopReason::ModeChange => "MODE_CHANGE",
            StopReason::Unsupported => "UNSUPPORTED",
            StopReason::Invalid(_) => "INVALID",
            StopReason::StateMismatch => "STATE_MISMATCH",
        }
    }
}

impl RunOutcome {
    /// Where the guest resumes.
    pub fn rip(&self) -> u64 {
        self.rip
    }
    /// Instructions completed.
    pub fn insns(&self) -> u64 {
        self.stats.insns as u64
    }
    /// Completed exit-prone instructions per class name (classes with none omitted).
    pub fn exiting_by_class(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ExitClass::ALL.iter().filter_map(move |&c| {
            let n = self.stats.exits_of(c);
            (n > 0).then(|| (c.name(), n as u64))
        })
    }
    /// The stop reason's name when the run ended early (see [`StopReason::is_early`]).
    pub fn early_stop(&self) -> Option<String> {
        self.reason.is_early().then(|| self.reason.name().into())
    }
}
