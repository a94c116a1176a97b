//! VT-x basic exit reasons (SDM Appendix C), by name.

/// The basic exit reason (bits 15:0 of the exit-reason field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    ExceptionNmi,
    ExternalInterrupt,
    TripleFault,
    InterruptWindow,
    TaskSwitch,
    Cpuid,
    Hlt,
    Invd,
    Invlpg,
    Rdpmc,
    Rdtsc,
    Vmcall,
    /// VMCLEAR, VMLAUNCH, VMPTRLD, VMPTRST, VMREAD, VMRESUME, VMWRITE, VMXOFF,
    /// VMXON (19..=27).
    VmxInstruction,
    CrAccess,
    DrAccess,
    Io,
    Rdmsr,
    Wrmsr,
    EntryInvalidGuestState,
    EntryMsrLoading,
    Mwait,
    MonitorTrapFlag,
    Monitor,
    Pause,
    EntryMachineCheck,
    GdtrIdtrAccess,
    LdtrTrAccess,
    EptViolation,
    EptMisconfig,
    Invept,
    Rdtscp,
    PreemptionTimer,
    Invvpid,
    Wbinvd,
    Xsetbv,
    Rdrand,
    Invpcid,
    Rdseed,
    /// A reason the hypervisor has no name for.
    Other(u16),
}

impl ExitReason {
    pub fn from_basic(r: u16) -> ExitReason {
        use ExitReason::*;
        match r {
            0 => ExceptionNmi,
            1 => ExternalInterrupt,
            2 => TripleFault,
            7 => InterruptWindow,
            9 => TaskSwitch,
            10 => Cpuid,
            12 => Hlt,
            13 => Invd,
            14 => Invlpg,
            15 => Rdpmc,
            16 => Rdtsc,
            18 => Vmcall,
            19..=27 => VmxInstruction,
            28 => CrAccess,
            29 => DrAccess,
            30 => Io,
            31 => Rdmsr,
            32 => Wrmsr,
            33 => EntryInvalidGuestState,
            34 => EntryMsrLoading,
            36 => Mwait,
            37 => MonitorTrapFlag,
            39 => Monitor,
            40 => Pause,
            41 => EntryMachineCheck,
            46 => GdtrIdtrAccess,
            47 => LdtrTrAccess,
            48 => EptViolation,
            49 => EptMisconfig,
            50 => Invept,
            51 => Rdtscp,
            52 => PreemptionTimer,
            53 => Invvpid,
            54 => Wbinvd,
            55 => Xsetbv,
            57 => Rdrand,
            58 => Invpcid,
            61 => Rdseed,
            r => Other(r),
        }
    }

    /// What an exit the handler does not decode into a [`avex_core::exit::Exit`] is
    /// counted as (the reasons both backends share; the rest are `other`).
    pub fn counted(self) -> avex_core::stats::ExitReason {
        use avex_core::stats::ExitReason as C;
        use ExitReason::*;
        match self {
            ExceptionNmi => C::ExceptionNmi,
            ExternalInterrupt => C::ExternalInterrupt,
            InterruptWindow => C::InterruptWindow,
            TripleFault => C::TripleFault,
            PreemptionTimer => C::PreemptionTimer,
            Cpuid => C::Cpuid,
            Hlt => C::Hlt,
            CrAccess => C::CrAccess,
            Rdmsr => C::Rdmsr,
            Wrmsr => C::Wrmsr,
            EptViolation => C::EptViolation,
            EntryInvalidGuestState | EntryMsrLoading | EntryMachineCheck => C::EntryFailed,
            _ => C::Other,
        }
    }

    /// The name used in diagnoses.
    pub fn name(self) -> &'static str {
        use ExitReason::*;
        match self {
            ExceptionNmi => "exception_nmi",
            ExternalInterrupt => "external_interrupt",
            TripleFault => "triple_fault",
            InterruptWindow => "interrupt_window",
            TaskSwitch => "task_switch",
            Cpuid => "cpuid",
            Hlt => "hlt",
            Invd => "invd",
            Invlpg => "invlpg",
            Rdpmc => "rdpmc",
            Rdtsc => "rdtsc",
            Vmcall => "vmcall",
            VmxInstruction => "vmx_instruction",
            CrAccess => "cr_access",
            DrAccess => "dr_access",
            Io => "io",
            Rdmsr => "rdmsr",
            Wrmsr => "wrmsr",
            EntryInvalidGuestState => "entry_invalid_guest_state",
            EntryMsrLoading => "entry_msr_loading",
            Mwait => "mwait",
            MonitorTrapFlag => "monitor_trap_flag",
            Monitor => "monitor",
            Pause => "pause",
            EntryMachineCheck => "entry_machine_check",
            GdtrIdtrAccess => "gdtr_idtr_access",
            LdtrTrAccess => "ldtr_tr_access",
            EptViolation => "ept_violation",
            EptMisconfig => "ept_misconfig",
            Invept => "invept",
            Rdtscp => "rdtscp",
            PreemptionTimer => "preemption_timer",
            Invvpid => "invvpid",
            Wbinvd => "wbinvd",
            Xsetbv => "xsetbv",
            Rdrand => "rdrand",
            Invpcid => "invpcid",
            Rdseed => "rdseed",
            Other(_) => "unknown",
        }
    }
}
