//! The exit loop: VM entry, then each exit decoded into what the guest asked for
//! ([`decode`]) and applied ([`apply`]): hv/core's exit handler, instruction
//! completion (by the engine where the instruction needs more than registers),
//! cluster runs, and the guest's end (debug-exit port, or a stop with a diagnosis:
//! triple fault, EPT violation outside its RAM, failed entry).

use alloc::format;
use alloc::string::String;

use avex_core::arch::dr;
use avex_core::distance::DistanceMeter;
use avex_core::emulate::{self, Completion};
use avex_core::exit::{Exit, ExitHandler, Next};
use avex_core::guest::{Fault, Guest};
use avex_core::stats::ExitReason as CountedReason;

use crate::ept::PAGE;
use crate::exit_reason::ExitReason;
use crate::logln;
use crate::vcpu::{rdtsc, Vcpu};
use crate::vmx::{field as f, vmread, vmwrite};

/// How the guest's run ended.
pub enum Outcome {
    /// The guest wrote its status to the debug-exit port.
    Exited(u8),
    /// The guest executed HLT with interrupts off (at `rip`): nothing can wake
    /// it, so its run is over (as a kernel's `poweroff` without ACPI ends).
    Halted { rip: u64 },
    /// The guest was stopped: the diagnosis.
    Stopped(String),
}

fn guest_where(v: &mut Vcpu) -> String {
    let s = v.state();
    let mut w = format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        s.rip, s.gpr[4], s.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.seg[1].selector
    );
    if v.pae_paging() {
        w += &format!(" pdptes={:x?}", v.pdptes());
    }
    w
}

/// One VM exit as the hardware reported it.
#[derive(Clone, Copy)]
struct ExitInfo {
    reason: ExitReason,
    /// The basic reason's number (hv/core's `Exit::Other` carries it).
    basic: u16,
    rip: u64,
    len: u64,
    qual: u64,
}

/// What completing an exiting instruction needs beyond advancing RIP.
enum Complete {
    Nothing,
    In {
        size: u8,
    },
    Rdmsr,
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    /// Run by the engine as a one-instruction translation (MOV CR, CLTS, LMSW).
    Engine,
    Rdtsc {
        aux: bool,
    },
    Xsetbv,
    MovDr {
        qual: u64,
    },
    Rdpmc,
    /// Inject #UD instead of completing (VMX instructions, VMCALL).
    Ud,
}

/// What an exit asks the hypervisor to do.
enum Decoded {
    /// An instruction hv/core's exit handler sees, then completed as `complete`.
    Handle { exit: Exit, complete: Complete },
    /// INS/OUTS (with REP): completed by the engine as one exit, counted apart.
    StringIo { input: bool },
    /// Nothing to complete (an interrupt window opened, an interrupt or NMI
    /// arrived): count it and enter again.
    Reenter,
    /// A guest write to guest-physical `gpa`, outside RAM or to a write-protected
    /// code page.
    EptWrite { gpa: u64 },
    /// The guest must stop: the diagnosis.
    Stop(String),
}

/// Write-protect (in the EPT) every guest page that holds translated code, so a
/// guest write to it is seen by the hypervisor (and counted). The boot ABI
/// identity-maps the guest's code, so a translation's RIPs are its guest-physical
/// addresses; pages outside guest RAM are skipped. Returns how many pages changed.
pub fn protect_translated_pages(v: &mut Vcpu, handler: &ExitHandler) -> usize {
    let mut n = 0;
    for range in handler.cache().iter().flat_map(|e| &e.cluster.code) {
        let mut page = range.start & !(PAGE - 1);
        while page < range.end() {
            if v.protect_code_page(page) {
                n += 1;
            }
            page += PAGE;
        }
    }
    if n > 0 {
        v.invept();
    }
    n
}

/// Machine time (TSC ticks at the configured rate, in seconds) between two
/// progress lines on the hypervisor's log: a long guest (Linux) shows where it is.
const HEARTBEAT_SECONDS: u64 = 10;

/// TSC ticks of one [`Vcpu::enter`] that are not the guest's: the hypervisor's
/// instructions from the RDTSC in `vmx_enter` to VMRESUME and from the exit to the
/// RDTSC in `vmx_exit_entry` (fixed assembly, so no change to the Rust code moves
/// it), the VM entry and exit, and the exiting instruction. In Bochs the TSC
/// counts instructions, so what is left of an entry's ticks is the guest
/// instructions it ran before the exiting one. Measured on Bochs 2.7 with a guest
/// whose gaps are 0, 5, 201 and 1 instructions: 371 ticks in all, 4 x 41 + 207. A
/// change to that assembly changes it; the test
/// `exit_distance_counts_guest_instructions_from_the_tsc` in tests/bochs.rs
/// catches that. (Timed around the Rust call instead, it was 78 ticks one build
/// and 74 after an unrelated change to the exit handler.)
pub const ENTRY_EXIT_TICKS: u64 = 41;

/// Run the guest until it ends; `distance` gets the guest instructions between
/// exits (the TSC's ticks of each entry, less [`ENTRY_EXIT_TICKS`], plus the
/// engine's instructions in clusters).
pub fn run(v: &mut Vcpu, handler: &mut ExitHandler, distance: &mut DistanceMeter) -> Outcome {
    let mut t = rdtsc();
    let mut in_cluster = 0u64;
    let heartbeat = v.tsc_hz().saturating_mul(HEARTBEAT_SECONDS);
    let mut next_beat = t.wrapping_add(heartbeat);
    loop {
        if t >= next_beat {
            next_beat = t.wrapping_add(heartbeat);
            let (c, st) = (v.counters(), handler.stats());
            logln!(
                "avex-vmx: progress: {} exits, {} interrupts (the last at {:#x}), {} clusters \
                 run ({} early stops, {} instructions), {} built, {} stale; guest {}",
                st.exits(),
                c.interrupts,
                c.interrupted_rip,
                st.clusters_run,
                st.early_stops.values().sum::<u64>(),
                st.cluster_insns,
                st.translations_built,
                st.stale_dropped,
                guest_where(v)
            );
        }
        v.deliver_interrupts();
        v.arm_preemption_timer();
        if let Err(why) = v.load_pdptes_if_stale() {
            return Outcome::Stopped(format!("{why}; guest {}", guest_where(v)));
        }
        let t_enter = rdtsc();
        v.account(t_enter.wrapping_sub(t).saturating_sub(in_cluster), 0);
        let entered = v.enter();
        t = rdtsc();
        if let Err(e) = entered {
            let why = format!("VM entry failed: {e}; guest {}", guest_where(v));
            return Outcome::Stopped(why);
        }
        let full = vmread(f::EXIT_REASON) as u32;
        let info = ExitInfo {
            reason: ExitReason::from_basic(full as u16),
            basic: full as u16,
            rip: vmread(f::GUEST_RIP),
            len: vmread(f::EXIT_INSTRUCTION_LEN),
            qual: vmread(f::EXIT_QUALIFICATION),
        };
        if full & (1 << 31) != 0 {
            handler.count_exit(info.reason.counted());
            return Outcome::Stopped(format!(
                "VM entry failed: exit reason {} ({}), qualification {:#x}; guest {}",
                info.basic,
                info.reason.name(),
                info.qual,
                guest_where(v)
            ));
        }
        if v.debug() {
            logln!(
                "vmx: exit {} after {} ticks",
                info.basic,
                v.last_entry_ticks()
            );
        }
        distance.exit(
            v.last_entry_ticks().checked_sub(ENTRY_EXIT_TICKS),
            handler.stats().cluster_insns,
        );
        let decoded = decode(v, &info);
        match apply(v, handler, &info, decoded) {
            Ok(ticks) => in_cluster = ticks,
            Err(end) => return end,
        }
    }
}

/// What the exit `info` asks for.
fn decode(v: &mut Vcpu, info: &ExitInfo) -> Decoded {
    let qual = info.qual;
    let (rax, rcx, rdx) = (v.gpr(0), v.gpr(1), v.gpr(2));
    let handle = |exit, complete| Decoded::Handle { exit, complete };
    let other = |complete| Decoded::Handle {
        exit: Exit::Other {
            reason: u32::from(info.basic),
            counted: info.reason.counted(),
        },
        complete,
    };
    match info.reason {
        ExitReason::Io => {
            let size = ((qual & 7) + 1) as u8;
            let input = qual & (1 << 3) != 0;
            if qual & (1 << 4) != 0 {
                return Decoded::StringIo { input };
            }
            let mask = match size {
                1 => 0xff,
                2 => 0xffff,
                _ => 0xffff_ffff,
            };
            let exit = Exit::PortIo {
                port: (qual >> 16) as u16,
                size,
                write: !input,
                value: (rax & mask) as u32,
            };
            handle(
                exit,
                if input {
                    Complete::In { size }
                } else {
                    Complete::Nothing
                },
            )
        }
        ExitReason::Rdmsr => handle(
            Exit::Msr {
                msr: rcx as u32,
                write: false,
                value: 0,
            },
            Complete::Rdmsr,
        ),
        ExitReason::Wrmsr => handle(
            Exit::Msr {
                msr: rcx as u32,
                write: true,
                value: (rdx << 32) | (rax & 0xffff_ffff),
            },
            Complete::Nothing,
        ),
        ExitReason::Cpuid => {
            let (leaf, subleaf) = (rax as u32, rcx as u32);
            handle(
                Exit::Cpuid { leaf, subleaf },
                Complete::Cpuid { leaf, subleaf },
            )
        }
        ExitReason::Hlt => handle(Exit::Hlt, Complete::Nothing),
        ExitReason::CrAccess => {
            let cr = (qual & 0xf) as u8;
            let write = matches!((qual >> 4) & 3, 0 | 2 | 3);
            handle(Exit::CrAccess { cr, write }, Complete::Engine)
        }
        ExitReason::Rdtsc => other(Complete::Rdtsc { aux: false }),
        ExitReason::Rdtscp => other(Complete::Rdtsc { aux: true }),
        ExitReason::Xsetbv => other(Complete::Xsetbv),
        ExitReason::DrAccess => other(Complete::MovDr { qual }),
        ExitReason::Rdpmc => other(Complete::Rdpmc),
        ExitReason::Invd
        | ExitReason::Invlpg
        | ExitReason::Mwait
        | ExitReason::Monitor
        | ExitReason::Pause
        | ExitReason::Wbinvd
        | ExitReason::Rdrand
        | ExitReason::Invpcid
        | ExitReason::Rdseed => other(Complete::Nothing),
        ExitReason::Vmcall
        | ExitReason::VmxInstruction
        | ExitReason::Invept
        | ExitReason::Invvpid => other(Complete::Ud),
        // The guest can take the interrupt now: delivered before the entry. An NMI
        // or external interrupt while the guest ran (the hypervisor's own
        // interrupts are masked at the PIC): nothing to complete.
        ExitReason::InterruptWindow
        | ExitReason::ExceptionNmi
        | ExitReason::ExternalInterrupt
        | ExitReason::PreemptionTimer => Decoded::Reenter,
        ExitReason::EptViolation => {
            let gpa = vmread(f::GUEST_PHYSICAL_ADDRESS);
            if qual & 2 != 0 && gpa < v.ram_size() {
                return Decoded::EptWrite { gpa };
            }
            let kind = if qual & 4 != 0 {
                "instruction fetch"
            } else if qual & 2 != 0 {
                "write"
            } else {
                "read"
            };
            let la = if qual & (1 << 7) != 0 {
                format!(" (linear {:#x})", vmread(f::GUEST_LINEAR_ADDRESS))
            } else {
                String::new()
            };
            Decoded::Stop(format!(
                "EPT violation: guest {kind} of guest-physical {gpa:#x}{la}, outside its RAM 0..{:#x}; guest {}",
                v.ram_size(),
                guest_where(v)
            ))
        }
        ExitReason::TripleFault => {
            Decoded::Stop(format!("guest triple fault; guest {}", guest_where(v)))
        }
        r => Decoded::Stop(format!(
            "unhandled VM exit {} ({}), qualification {qual:#x}; guest {}",
            info.basic,
            r.name(),
            guest_where(v)
        )),
    }
}

/// Do what `decoded` asks: `Ok` with the machine time spent running a cluster, or
/// `Err` with how the guest's run ended.
fn apply(
    v: &mut Vcpu,
    handler: &mut ExitHandler,
    info: &ExitInfo,
    decoded: Decoded,
) -> Result<u64, Outcome> {
    let rip = info.rip;
    let (exit, complete) = match decoded {
        Decoded::Handle { exit, complete } => (exit, complete),
        Decoded::StringIo { input } => {
            // One exit for the whole (REP) instruction, up to the engine's REP
            // budget (an interrupted REP resumes at itself and exits again).
            handler.count_exit(if input {
                CountedReason::Ins
            } else {
                CountedReason::Outs
            });
            complete_with_engine(v, rip)?;
            v.add_emulated_insns(1);
            return ended(v).map(|()| 0);
        }
        Decoded::Reenter => {
            handler.count_exit(info.reason.counted());
            return Ok(0);
        }
        Decoded::EptWrite { gpa } => {
            handler.count_exit(info.reason.counted());
            if v.code_page_written(gpa) {
                return Ok(0);
            }
            return Err(Outcome::Stopped(format!(
                "EPT violation: guest write of guest-physical {gpa:#x} not allowed; guest {}",
                guest_where(v)
            )));
        }
        Decoded::Stop(why) => {
            handler.count_exit(info.reason.counted());
            return Err(Outcome::Stopped(why));
        }
    };

    // The handler may build a translation (whose code pages are then protected).
    let built = handler.stats().translations_built;
    let reply = handler.handle(&exit, rip, v);
    let value = match reply.value {
        Ok(x) => x,
        Err(fault) => {
            v.inject(fault);
            return Ok(0);
        }
    };
    if !complete_instruction(v, info, complete, value)? {
        return Ok(0);
    }
    v.add_emulated_insns(1);
    // A completed instruction ends MOV SS / STI blocking.
    let intr = vmread(f::GUEST_INTERRUPTIBILITY);
    if intr & 3 != 0 {
        vmwrite(f::GUEST_INTERRUPTIBILITY, intr & !3);
    }
    ended(v)?;
    match reply.next {
        Next::Resume => Ok(0),
        Next::RunCluster { start } => {
            let t0 = rdtsc();
            let insns = handler.stats().cluster_insns;
            let end = handler.run_cluster(start, v);
            let ticks = rdtsc().wrapping_sub(t0);
            let ran = handler.stats().cluster_insns.wrapping_sub(insns);
            v.add_emulated_insns(ran);
            v.account(0, ticks);
            if end.early.as_deref() == Some("MODE_CHANGE") {
                v.note_mode_change();
            }
            if v.debug() {
                logln!("vmx: {end}");
            }
            if handler.stats().translations_built != built {
                protect_translated_pages(v, handler);
            }
            ended(v).map(|()| ticks)
        }
        Next::Halt if v.interrupts_masked() => Err(Outcome::Halted { rip }),
        Next::Halt => match v.wait_for_interrupt() {
            Ok(()) => Ok(0),
            Err(why) => Err(Outcome::Stopped(format!("guest halted at {rip:#x}: {why}"))),
        },
    }
}

/// `Err` once the guest has written its status to the debug-exit port.
fn ended(v: &Vcpu) -> Result<(), Outcome> {
    match v.exit_status() {
        Some(status) => Err(Outcome::Exited(status)),
        None => Ok(()),
    }
}

/// Complete the instruction the handler answered with `value`: `Ok(true)` when it
/// completed (RIP after it), `Ok(false)` when a fault was injected instead.
fn complete_instruction(
    v: &mut Vcpu,
    info: &ExitInfo,
    complete: Complete,
    value: u64,
) -> Result<bool, Outcome> {
    let (rax, rcx, rdx) = (v.gpr(0), v.gpr(1), v.gpr(2));
    match complete {
        Complete::Nothing => {}
        Complete::In { size } => {
            let merged = match size {
                1 => (rax & !0xff) | (value & 0xff),
                2 => (rax & !0xffff) | (value & 0xffff),
                _ => value & 0xffff_ffff,
            };
            v.set_gpr(0, merged);
        }
        Complete::Rdmsr => {
            v.set_gpr(0, value & 0xffff_ffff);
            v.set_gpr(2, value >> 32);
        }
        Complete::Cpuid { leaf, subleaf } => {
            let r = v.cpuid(leaf, subleaf);
            for (i, reg) in [0usize, 3, 1, 2].into_iter().enumerate() {
                v.set_gpr(reg, u64::from(r[i]));
            }
        }
        // The engine sets RIP itself.
        Complete::Engine => return complete_with_engine(v, info.rip),
        Complete::Rdtsc { aux } => {
            let t = v.tsc();
            v.set_gpr(0, t & 0xffff_ffff);
            v.set_gpr(2, t >> 32);
            if aux {
                let a = v.tsc_aux();
                v.set_gpr(1, a & 0xffff_ffff);
            }
        }
        Complete::Xsetbv => {
            let val = (rdx << 32) | (rax & 0xffff_ffff);
            if let Err(fault) = v.xsetbv(rcx as u32, val) {
                v.inject(fault);
                return Ok(false);
            }
        }
        Complete::MovDr { qual } => {
            // MOV from DRn reads the architectural defaults; writes are dropped
            // (the hypervisor offers no hardware breakpoints).
            if (qual >> 4) & 1 == 1 {
                let val = match qual & 7 {
                    6 => dr::DR6_RESET,
                    7 => dr::DR7_RESET,
                    _ => 0,
                };
                v.set_gpr(((qual >> 8) & 0xf) as usize, val);
            }
        }
        Complete::Rdpmc => {
            v.set_gpr(0, 0);
            v.set_gpr(2, 0);
        }
        Complete::Ud => {
            v.inject(Fault::InvalidOpcode);
            return Ok(false);
        }
    }
    vmwrite(f::GUEST_RIP, info.rip + info.len);
    Ok(true)
}

/// Complete the exiting instruction at `rip` with the engine (hv/core's
/// `emulate`): `Ok(true)` when it completed, `Ok(false)` when it raised a fault
/// (injected), `Err` when the guest must stop.
fn complete_with_engine(v: &mut Vcpu, rip: u64) -> Result<bool, Outcome> {
    match emulate::complete(v) {
        Completion::Done { mode_change, .. } => {
            if mode_change {
                v.note_mode_change();
            }
            Ok(true)
        }
        Completion::Fault(fault) => {
            v.inject(fault);
            Ok(false)
        }
        Completion::NotRam { gpa } => Err(Outcome::Stopped(format!(
            "the instruction at {rip:#x} touches guest-physical {gpa:#x}, outside its RAM; guest {}",
            guest_where(v)
        ))),
        Completion::Cannot(why) => Err(Outcome::Stopped(format!(
            "the engine cannot complete the exiting instruction at {rip:#x} ({why}); guest {}",
            guest_where(v)
        ))),
    }
}
