//! The exit loop: VM entry, exit decoding, hv/core's exit handler, instruction
//! completion, cluster runs, and the guest's end (debug-exit port, or a stop with
//! a diagnosis: triple fault, EPT violation outside its RAM, failed entry).

use alloc::format;
use alloc::string::String;

use avex_core::emulate::{self, Completion};
use avex_core::exit::{Exit, ExitHandler, Next};
use avex_core::guest::{Fault, Guest};

use crate::ept::PAGE;
use crate::logln;
use crate::vcpu::{Vcpu, RFLAGS_IF};
use crate::vmx::{self, field as f, vmread, vmwrite};

/// How the guest's run ended.
pub enum Outcome {
    /// The guest wrote its status to the debug-exit port.
    Exited(u8),
    /// The guest was stopped: the diagnosis.
    Stopped(String),
}

/// Names of the basic exit reasons (SDM Appendix C), for diagnoses and statistics.
pub fn reason_name(r: u32) -> &'static str {
    match r {
        0 => "exception_nmi",
        1 => "external_interrupt",
        2 => "triple_fault",
        7 => "interrupt_window",
        9 => "task_switch",
        10 => "cpuid",
        12 => "hlt",
        13 => "invd",
        14 => "invlpg",
        15 => "rdpmc",
        16 => "rdtsc",
        18 => "vmcall",
        19..=27 => "vmx_instruction",
        28 => "cr_access",
        29 => "dr_access",
        30 => "io",
        31 => "rdmsr",
        32 => "wrmsr",
        33 => "entry_invalid_guest_state",
        34 => "entry_msr_loading",
        36 => "mwait",
        37 => "monitor_trap_flag",
        39 => "monitor",
        40 => "pause",
        41 => "entry_machine_check",
        46 => "gdtr_idtr_access",
        47 => "ldtr_tr_access",
        48 => "ept_violation",
        49 => "ept_misconfig",
        50 => "invept",
        51 => "rdtscp",
        52 => "preemption_timer",
        53 => "invvpid",
        54 => "wbinvd",
        55 => "xsetbv",
        57 => "rdrand",
        58 => "invpcid",
        61 => "rdseed",
        _ => "unknown",
    }
}

fn guest_where(v: &mut Vcpu) -> String {
    let s = v.state();
    let mut w = format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        s.rip, s.gpr[4], s.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.seg[1].selector
    );
    if s.cr0 & (1 << 31) != 0 && s.cr4 & (1 << 5) != 0 && s.efer & (1 << 10) == 0 {
        w += &format!(" pdptes={:x?}", v.pdptes());
    }
    w
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

/// Write-protect (in the EPT) every guest page that holds translated code, so a
/// guest write to it is seen by the hypervisor (and counted). The boot ABI
/// identity-maps the guest's code, so a translation's RIPs are its guest-physical
/// addresses; pages outside guest RAM are skipped. Returns how many pages changed.
pub fn protect_translated_pages(v: &mut Vcpu, handler: &ExitHandler) -> usize {
    let mut n = 0;
    for e in handler.cache().iter() {
        let mut page = e.cluster.start & !(PAGE - 1);
        while page < e.cluster.end {
            if v.ept.protect(page) {
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

/// Run the guest until it ends.
pub fn run(v: &mut Vcpu, handler: &mut ExitHandler) -> Outcome {
    let mut built = handler.stats().translations_built;
    let mut t = crate::vcpu::rdtsc();
    let mut in_cluster = 0u64;
    loop {
        v.deliver_interrupts();
        if let Err(why) = v.load_pdptes_if_stale() {
            return Outcome::Stopped(format!("{why}; guest {}", guest_where(v)));
        }
        let t_enter = crate::vcpu::rdtsc();
        v.ticks_handler += t_enter.wrapping_sub(t).saturating_sub(in_cluster);
        in_cluster = 0;
        let entered = vmx::enter(&mut v.regs, v.launched);
        t = crate::vcpu::rdtsc();
        v.ticks_guest += t.wrapping_sub(t_enter);
        if let Err(e) = entered {
            let why = format!("VM entry failed: {e}; guest {}", guest_where(v));
            return Outcome::Stopped(why);
        }
        v.launched = true;
        let full = vmread(f::EXIT_REASON) as u32;
        let reason = full & 0xffff;
        if full & (1 << 31) != 0 {
            handler.count_exit(reason_name(reason));
            let qual = vmread(f::EXIT_QUALIFICATION);
            return Outcome::Stopped(format!(
                "VM entry failed: exit reason {reason} ({}), qualification {qual:#x}; guest {}",
                reason_name(reason),
                guest_where(v)
            ));
        }
        let rip = vmread(f::GUEST_RIP);
        let len = vmread(f::EXIT_INSTRUCTION_LEN);
        let qual = vmread(f::EXIT_QUALIFICATION);
        let rax = v.gpr_value(0);
        let rcx = v.gpr_value(1);
        let rdx = v.gpr_value(2);

        let (exit, complete) = match reason {
            30 => {
                let size = ((qual & 7) + 1) as u8;
                let input = qual & (1 << 3) != 0;
                let port = (qual >> 16) as u16;
                if qual & (1 << 4) != 0 {
                    // INS/OUTS: one exit for the whole (REP) instruction, run by the
                    // engine (an interrupted REP resumes at itself and exits again).
                    handler.count_exit(if input { "ins" } else { "outs" });
                    if let Err(stop) = complete_with_engine(v, rip) {
                        return stop;
                    }
                    if let Some(status) = v.bus.exit_status() {
                        return Outcome::Exited(status);
                    }
                    continue;
                }
                let mask = match size {
                    1 => 0xff,
                    2 => 0xffff,
                    _ => 0xffff_ffff,
                };
                (
                    Exit::PortIo {
                        port,
                        size,
                        write: !input,
                        value: (rax & mask) as u32,
                    },
                    if input {
                        Complete::In { size }
                    } else {
                        Complete::Nothing
                    },
                )
            }
            31 => (
                Exit::Msr {
                    msr: rcx as u32,
                    write: false,
                    value: 0,
                },
                Complete::Rdmsr,
            ),
            32 => (
                Exit::Msr {
                    msr: rcx as u32,
                    write: true,
                    value: (rdx << 32) | (rax & 0xffff_ffff),
                },
                Complete::Nothing,
            ),
            10 => {
                let (leaf, subleaf) = (rax as u32, rcx as u32);
                (
                    Exit::Cpuid { leaf, subleaf },
                    Complete::Cpuid { leaf, subleaf },
                )
            }
            12 => (Exit::Hlt, Complete::Nothing),
            28 => {
                let cr = (qual & 0xf) as u8;
                let write = matches!((qual >> 4) & 3, 0 | 2 | 3);
                (Exit::CrAccess { cr, write }, Complete::Engine)
            }
            16 => (Exit::Other { reason }, Complete::Rdtsc { aux: false }),
            51 => (Exit::Other { reason }, Complete::Rdtsc { aux: true }),
            55 => (Exit::Other { reason }, Complete::Xsetbv),
            29 => (Exit::Other { reason }, Complete::MovDr { qual }),
            15 => (Exit::Other { reason }, Complete::Rdpmc),
            13 | 14 | 36 | 39 | 40 | 54 | 57 | 58 | 61 => {
                (Exit::Other { reason }, Complete::Nothing)
            }
            18..=27 | 50 | 53 => (Exit::Other { reason }, Complete::Ud),
            7 => {
                // The guest can take the interrupt now: delivered before the entry.
                handler.count_exit("interrupt_window");
                continue;
            }
            0 | 1 => {
                // NMI or external interrupt while the guest ran (the hypervisor's own
                // interrupts are masked at the PIC): nothing to complete.
                handler.count_exit(reason_name(reason));
                continue;
            }
            48 => {
                handler.count_exit("ept_violation");
                let gpa = vmread(f::GUEST_PHYSICAL_ADDRESS);
                if gpa < v.ram.size() && qual & 2 != 0 && v.ept.is_protected(gpa) {
                    // A write to a code page with translations: give the page back its
                    // write permission and let the write happen; translations on the
                    // page are checked byte by byte before their next run and dropped
                    // if the bytes changed.
                    v.ept.unprotect(gpa & !(PAGE - 1));
                    v.invept();
                    v.code_writes += 1;
                    continue;
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
                return Outcome::Stopped(format!(
                    "EPT violation: guest {kind} of guest-physical {gpa:#x}{la}, outside its RAM 0..{:#x}; guest {}",
                    v.ram.size(),
                    guest_where(v)
                ));
            }
            2 => {
                handler.count_exit("triple_fault");
                return Outcome::Stopped(format!("guest triple fault; guest {}", guest_where(v)));
            }
            _ => {
                handler.count_exit(reason_name(reason));
                return Outcome::Stopped(format!(
                    "unhandled VM exit {reason} ({}), qualification {qual:#x}; guest {}",
                    reason_name(reason),
                    guest_where(v)
                ));
            }
        };

        let reply = handler.handle(&exit, rip, v);
        let value = match reply.value {
            Ok(x) => x,
            Err(fault) => {
                v.inject(fault);
                continue;
            }
        };
        let mut advanced = false;
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
            Complete::Engine => {
                match complete_with_engine(v, rip) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(stop) => return stop,
                }
                advanced = true;
            }
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
                    continue;
                }
            }
            Complete::MovDr { qual } => {
                // MOV from DRn reads the architectural defaults; writes are dropped
                // (the hypervisor offers no hardware breakpoints).
                if (qual >> 4) & 1 == 1 {
                    let dr = qual & 7;
                    let val = match dr {
                        6 => 0xffff_0ff0,
                        7 => 0x400,
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
                continue;
            }
        }
        if !advanced {
            vmwrite(f::GUEST_RIP, rip + len);
        }
        // A completed instruction ends MOV SS / STI blocking.
        let intr = vmread(f::GUEST_INTERRUPTIBILITY);
        if intr & 3 != 0 {
            vmwrite(f::GUEST_INTERRUPTIBILITY, intr & !3);
        }

        if let Some(status) = v.bus.exit_status() {
            return Outcome::Exited(status);
        }
        match reply.next {
            Next::Resume => {}
            Next::RunCluster { start } => {
                let t0 = crate::vcpu::rdtsc();
                let end = handler.run_cluster(start, v);
                let t1 = crate::vcpu::rdtsc();
                in_cluster = t1.wrapping_sub(t0);
                if end.early.as_deref() == Some("MODE_CHANGE") {
                    v.note_mode_change();
                }
                v.ticks_clusters += in_cluster;
                if v.debug {
                    logln!("vmx: {end}");
                }
                if handler.stats().translations_built != built {
                    built = handler.stats().translations_built;
                    protect_translated_pages(v, handler);
                }
                if let Some(status) = v.bus.exit_status() {
                    return Outcome::Exited(status);
                }
            }
            Next::Halt => {
                if let Err(why) = wait_for_interrupt(v) {
                    return Outcome::Stopped(format!("guest halted at {rip:#x}: {why}"));
                }
            }
        }
    }
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

/// HLT: the guest waits for an interrupt. With interrupts off, or with no device that
/// will ever raise one, it would wait forever: that ends it. Otherwise the devices'
/// virtual time jumps to their next event (no spinning through the wait) until the
/// PIC has an interrupt, which `deliver_interrupts` injects before the next entry.
fn wait_for_interrupt(v: &mut Vcpu) -> Result<(), String> {
    if vmread(f::GUEST_RFLAGS) & RFLAGS_IF == 0 {
        return Err("interrupts are off, so nothing can wake it (no debug-exit write)".into());
    }
    for _ in 0..64 {
        let now = v.now_ns();
        if v.bus.pending_vector(now).is_some() {
            return Ok(());
        }
        match v.bus.next_event_ns(now) {
            Some(t) => v.skip_time(t.saturating_sub(now).max(1)),
            None => break,
        }
    }
    Err("interrupts are on but no device will raise one".into())
}
