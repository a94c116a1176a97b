//! The exit loop: VM entry, exit decoding, hv/core's exit handler, instruction
//! completion, cluster runs, and the guest's end (debug-exit port, or a stop with
//! a diagnosis: triple fault, EPT violation outside its RAM, failed entry).

use alloc::format;
use alloc::string::String;

use avex_core::exit::{Exit, ExitHandler, Next};
use avex_core::guest::{Fault, Guest};

use crate::ept::PAGE;
use crate::logln;
use crate::vcpu::{Vcpu, CR0_TS, RFLAGS_IF};
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
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        s.rip, s.gpr[4], s.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.seg[1].selector
    )
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
    Cr {
        qual: u64,
    },
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
                    // INS/OUTS: one exit for the whole (REP) instruction.
                    handler.count_exit(if input { "ins" } else { "outs" });
                    match string_io(v, port, size, input, qual & (1 << 5) != 0) {
                        Ok(()) => {
                            vmwrite(f::GUEST_RIP, rip + len);
                            if let Some(status) = v.bus.exit_status() {
                                return Outcome::Exited(status);
                            }
                        }
                        Err(StringIoStop::Fault(fault)) => v.inject(fault),
                        Err(StringIoStop::Outside(gpa)) => {
                            return Outcome::Stopped(format!(
                                "string port I/O at {rip:#x} touches guest-physical {gpa:#x}, outside its RAM; guest {}",
                                guest_where(v)
                            ))
                        }
                        Err(StringIoStop::Unsupported) => {
                            return Outcome::Stopped(format!(
                                "string port I/O at {rip:#x} in a paging mode the hypervisor cannot walk; guest {}",
                                guest_where(v)
                            ))
                        }
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
                (Exit::CrAccess { cr, write }, Complete::Cr { qual })
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
            Complete::Cr { qual } => {
                if let Err(fault) = complete_cr(v, qual) {
                    v.inject(fault);
                    continue;
                }
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
        vmwrite(f::GUEST_RIP, rip + len);
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

/// Complete MOV to/from CRn, CLTS and LMSW.
fn complete_cr(v: &mut Vcpu, qual: u64) -> Result<(), Fault> {
    let cr = qual & 0xf;
    let kind = (qual >> 4) & 3;
    let reg = ((qual >> 8) & 0xf) as usize;
    let s = v.state();
    match kind {
        0 => {
            let val = v.gpr_value(reg);
            match cr {
                0 => {
                    if val >> 32 != 0 || (val & (1 << 31) != 0 && val & 1 == 0) {
                        return Err(Fault::GeneralProtection);
                    }
                    v.write_cr0(val);
                }
                3 => vmwrite(f::GUEST_CR3, val & !(1 << 63)),
                4 => {
                    if val & (1 << 13) != 0 {
                        // The guest may not turn VMX on (no nested VMX).
                        return Err(Fault::GeneralProtection);
                    }
                    v.write_cr4(val);
                }
                8 => v.set_cr8(val),
                _ => return Err(Fault::InvalidOpcode),
            }
        }
        1 => {
            let val = match cr {
                3 => s.cr3,
                8 => v.cr8(),
                _ => return Err(Fault::InvalidOpcode),
            };
            v.set_gpr(reg, val);
        }
        2 => v.write_cr0(s.cr0 & !CR0_TS),
        _ => {
            // LMSW: loads PE, MP, EM, TS; cannot clear PE.
            let src = (qual >> 16) & 0xf;
            let cr0 = (s.cr0 & !0xe) | (src & 0xe) | ((s.cr0 | src) & 1);
            v.write_cr0(cr0);
        }
    }
    Ok(())
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

enum StringIoStop {
    Fault(Fault),
    Outside(u64),
    Unsupported,
}

/// Complete INS/OUTS (with REP: all of it) through the guest's page tables: data
/// from ES:(E/R)DI for INS, DS-or-override:(E/R)SI for OUTS, by RFLAGS.DF.
/// Registers are updated element by element, so a fault leaves them exact.
fn string_io(
    v: &mut Vcpu,
    port: u16,
    size: u8,
    input: bool,
    rep: bool,
) -> Result<(), StringIoStop> {
    let info = vmread(f::EXIT_INSTRUCTION_INFO);
    let addr_mask: u64 = match (info >> 7) & 7 {
        0 => 0xffff,
        1 => 0xffff_ffff,
        _ => u64::MAX,
    };
    let state = v.state();
    let long = state.efer & (1 << 10) != 0 && state.seg[1].long();
    // Segment: ES for INS; for OUTS the instruction's (bits 17:15: ES, CS, SS, DS, FS, GS).
    let seg = if input {
        0
    } else {
        ((info >> 15) & 7) as usize
    };
    let base = if long && seg < 4 {
        0
    } else {
        state.seg.get(seg).map_or(0, |s| s.base)
    };
    let mmu = avex_core::engine::mmu::Mmu::new(&state, 52);
    let step = if state.rflags & (1 << 10) != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let (ptr_reg, count_reg) = (if input { 7 } else { 6 }, 1);
    let mut count = if rep {
        state.gpr[count_reg] & addr_mask
    } else {
        1
    };
    let mut ptr = state.gpr[ptr_reg];
    let access = if input {
        avex_core::engine::mmu::Access::Write
    } else {
        avex_core::engine::mmu::Access::Read
    };
    while count > 0 {
        let la = base.wrapping_add(ptr & addr_mask);
        let mut buf = [0u8; 4];
        let n = size as usize;
        let mut walks = 0;
        // Translate byte by byte so an element crossing a page boundary is right.
        let mut gpas = [0u64; 4];
        for (i, g) in gpas.iter_mut().enumerate().take(n) {
            *g = match mmu.translate(v, la.wrapping_add(i as u64), access, &mut walks) {
                Ok(pa) => pa,
                Err(avex_core::engine::mmu::XlateError::PageFault { addr, error_code }) => {
                    return Err(StringIoStop::Fault(Fault::PageFault { addr, error_code }))
                }
                Err(avex_core::engine::mmu::XlateError::NotRam { gpa }) => {
                    return Err(StringIoStop::Outside(gpa))
                }
                Err(avex_core::engine::mmu::XlateError::Unsupported) => {
                    return Err(StringIoStop::Unsupported)
                }
            };
        }
        if input {
            let value = v.port_in(port, size);
            buf[..n].copy_from_slice(&value.to_le_bytes()[..n]);
            for i in 0..n {
                v.write_phys(gpas[i], &buf[i..i + 1])
                    .map_err(|e| StringIoStop::Outside(e.gpa))?;
            }
        } else {
            for i in 0..n {
                v.read_phys(gpas[i], &mut buf[i..i + 1])
                    .map_err(|e| StringIoStop::Outside(e.gpa))?;
            }
            v.port_out(port, size, u32::from_le_bytes(buf));
        }
        ptr = (ptr & !addr_mask) | (ptr.wrapping_add(step) & addr_mask);
        count -= 1;
        v.set_gpr(ptr_reg, ptr);
        if rep {
            let rcx = v.gpr_value(count_reg);
            v.set_gpr(count_reg, (rcx & !addr_mask) | (count & addr_mask));
        }
        if v.bus.exit_status().is_some() {
            break;
        }
    }
    Ok(())
}
