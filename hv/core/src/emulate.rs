//! Completing one exiting instruction with the engine.
//!
//! A backend that must finish an instruction the CPU stopped at (string port I/O,
//! MOV to or from a control register, CLTS, LMSW, ...) does not write its own copy
//! of the instruction's rules: [`complete`] decodes the instruction at the guest's
//! RIP, lowers it into the IR and runs it as a one-instruction translation through
//! [`engine::run`], so the engine's rules (address-size truncation, segment checks,
//! the control-register checks that raise #GP, precise REP interruption) are the
//! only ones. Backend-neutral: it sees the guest only through [`Guest`].

use alloc::vec;

use crate::engine::{self, RunLimits, RunOutcome, StopReason};
use crate::exit::{bitness_of, fetch_code};
use crate::guest::{Fault, Guest};
use crate::ir::{Cluster, Insn};
use crate::lower;
use crate::policy;

/// REP iterations completed per call before the guest resumes at the same
/// instruction (the CPU's interruptible REP): it exits again for the rest, so
/// pending interrupts are never held off by one long string instruction.
pub const REP_BUDGET: u64 = 4096;

/// How completing the instruction at RIP went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Done (the guest's state is written back): it resumes at `rip`, after the
    /// instruction, or at it when a REP was interrupted between iterations.
    /// `mode_change`: the instruction changed the paging mode or a
    /// translation-affecting control bit (the backend reloads what depends on it).
    Done { rip: u64, mode_change: bool },
    /// The instruction raises this exception: the backend injects it. Nothing done
    /// (for REP: the iterations before the faulting one are done).
    Fault(Fault),
    /// The instruction touches guest-physical memory outside RAM.
    NotRam { gpa: u64 },
    /// The engine cannot complete it (the reason's name, for a diagnosis).
    Cannot(&'static str),
}

/// Complete the instruction at the guest's RIP with the engine.
pub fn complete<G: Guest + ?Sized>(guest: &mut G) -> Completion {
    let mut spent = 0;
    loop {
        let out = match run_one(guest, REP_BUDGET - spent) {
            Ok(out) => out,
            Err(c) => return c,
        };
        let done = |mode_change| Completion::Done {
            rip: out.rip,
            mode_change,
        };
        return match out.reason {
            // A REP INS wrote into the page it runs from: the engine stops between
            // iterations (the bytes it runs may have changed) with the done ones
            // committed. Decode the instruction again and go on.
            StopReason::SelfWrite
                if out.stats.insns == 0
                    && out.stats.rep_iterations > 0
                    && spent + u64::from(out.stats.rep_iterations) < REP_BUDGET =>
            {
                spent += u64::from(out.stats.rep_iterations);
                continue;
            }
            // Completed, or a REP stopped between iterations with the done ones
            // committed: the guest resumes at `out.rip`, at the instruction for the
            // rest (it exits again).
            StopReason::End
            | StopReason::Budget
            | StopReason::InterruptPending
            | StopReason::InterruptWindow
            | StopReason::SelfWrite => done(false),
            StopReason::ModeChange => done(true),
            // A MOV to CR3 whose code check under the new tables failed: the
            // instruction completed all the same.
            StopReason::CodeChanged if out.stats.insns == 1 => done(false),
            StopReason::Fault(f) => Completion::Fault(f),
            StopReason::PageFault { addr, error_code } => {
                Completion::Fault(Fault::PageFault { addr, error_code })
            }
            StopReason::NotRam { gpa } => Completion::NotRam { gpa },
            r => Completion::Cannot(r.name()),
        };
    }
}

/// Decode and lower the instruction at RIP and run it as a one-instruction
/// translation with at most `max_insns` REP iterations.
fn run_one<G: Guest + ?Sized>(guest: &mut G, max_insns: u64) -> Result<RunOutcome, Completion> {
    let state = guest.state();
    let bitness = bitness_of(&state);
    let mut bytes = [0u8; 15];
    let n = fetch_code(guest, &state, state.rip, &mut bytes);
    let mut decoder = iced_x86::Decoder::with_ip(
        bitness.bits(),
        &bytes[..n],
        state.rip,
        iced_x86::DecoderOptions::NONE,
    );
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(Completion::Cannot("UNDECODABLE"));
    }
    let op = lower::lower(&instr).map_err(|_| Completion::Cannot("NOT_LOWERED"))?;
    let len = instr.len();
    let cluster = Cluster::contiguous(
        bitness,
        state.rip,
        bytes[..len].to_vec(),
        vec![Insn {
            rip: state.rip,
            len: len as u8,
            op,
            exit_class: policy::exit_class_of(&instr),
        }],
        vec![],
    );
    let limits = RunLimits {
        max_insns: max_insns.max(1),
        maxphyaddr: guest.cpu_caps().maxphyaddr,
    };
    Ok(engine::run(&cluster, guest, 0, &limits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_guest::TestGuest;
    use crate::engine::Paging;
    use crate::ir::{RCX, RSI};

    /// 64-bit guest with `code` at 0x1000 (identity-mapped with the first 2 MiB).
    fn long_guest(code: &[u8]) -> TestGuest {
        let mut g = TestGuest::long_mode(4 << 20);
        g.map_range(0, 0, 2 << 20, 0x3);
        g.write_bytes(0x1000, code);
        g.state.rip = 0x1000;
        g
    }

    #[test]
    fn addr32_rep_outsb_zero_extends_rsi_and_rcx_as_the_cpu_does() {
        let mut g = long_guest(&[0x67, 0xf3, 0x6e]); // addr32 rep outsb
        g.write_bytes(0x2000, b"abc");
        g.state.gpr[RSI as usize] = 0xdead_beef_0000_2000;
        g.state.gpr[RCX as usize] = 0x1234_5678_0000_0003;
        g.state.gpr[2] = 0x3f8;
        let r = complete(&mut g);
        assert_eq!(
            r,
            Completion::Done {
                rip: 0x1003,
                mode_change: false
            }
        );
        let bytes: alloc::vec::Vec<u32> = g.outs().iter().map(|o| o.2).collect();
        assert_eq!(bytes, [b'a' as u32, b'b' as u32, b'c' as u32]);
        assert_eq!(g.state.gpr[RSI as usize], 0x2003);
        assert_eq!(g.state.gpr[RCX as usize], 0);
    }

    #[test]
    fn a_long_rep_is_interrupted_between_iterations_at_the_same_rip() {
        let mut g = long_guest(&[0xf3, 0x6e]); // rep outsb
        g.state.gpr[RSI as usize] = 0x2000;
        g.state.gpr[RCX as usize] = REP_BUDGET + 10;
        g.state.gpr[2] = 0x80;
        let r = complete(&mut g);
        assert_eq!(
            r,
            Completion::Done {
                rip: 0x1000,
                mode_change: false
            }
        );
        let done = g.outs().len() as u64;
        assert!(done > 0 && done <= REP_BUDGET);
        assert_eq!(g.state.gpr[RCX as usize], REP_BUDGET + 10 - done);
        assert_eq!(g.state.gpr[RSI as usize], 0x2000 + done);
    }

    #[test]
    fn a_rep_ins_into_its_own_code_page_completes_in_one_call() {
        let mut g = long_guest(&[0xf3, 0x6c]); // rep insb
        g.state.gpr[7] = 0x1800; // RDI: the code's page
        g.state.gpr[RCX as usize] = 3;
        g.state.gpr[2] = 0x3fd;
        g.default_port_in = 0x60;
        assert!(matches!(
            complete(&mut g),
            Completion::Done { rip: 0x1002, .. }
        ));
        assert_eq!(g.bytes(0x1800, 3), &[0x60; 3]);
        assert_eq!(g.state.gpr[RCX as usize], 0);
        assert_eq!(g.state.gpr[7], 0x1803);
    }

    #[test]
    fn mov_to_cr3_above_maxphyaddr_faults_with_the_guests_maxphyaddr() {
        let mut g = long_guest(&[0x0f, 0x22, 0xd8]); // mov cr3, rax
        g.cpuid_leaves
            .insert((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]);
        g.cpuid_leaves.insert((0x8000_0008, 0), [40, 0, 0, 0]);
        let cr3 = g.state.cr3;
        g.state.gpr[0] = 1 << 40;
        assert_eq!(
            complete(&mut g),
            Completion::Fault(Fault::GeneralProtection)
        );
        assert_eq!(g.state.cr3, cr3);
        assert_eq!(g.state.rip, 0x1000);
    }

    #[test]
    fn mov_to_cr4_changing_paging_bits_completes_as_a_mode_change() {
        let mut g = TestGuest::protected32(1 << 20, Paging::None);
        g.write_bytes(0x1000, &[0x0f, 0x22, 0xe0]); // mov cr4, eax
        g.state.rip = 0x1000;
        g.state.gpr[0] = 0x20; // PAE
        assert_eq!(
            complete(&mut g),
            Completion::Done {
                rip: 0x1003,
                mode_change: true
            }
        );
        assert_eq!(g.state.cr4, 0x20);
    }

    #[test]
    fn lmsw_cannot_clear_pe() {
        let mut g = TestGuest::protected32(1 << 20, Paging::None);
        g.write_bytes(0x1000, &[0x0f, 0x01, 0xf0]); // lmsw ax
        g.state.rip = 0x1000;
        g.state.gpr[0] = 0x8; // TS, PE clear
        let cr0 = g.state.cr0;
        assert!(matches!(
            complete(&mut g),
            Completion::Done { rip: 0x1003, .. }
        ));
        assert_eq!(g.state.cr0, cr0 | 0x8);
    }
}
