//! Exact attribution of an exit to the instruction that made it.
//!
//! In clustered modes, once the handler's result (IN data, RDMSR value) is in
//! `kvm_run`, the backend always makes a KVM_RUN with `immediate_exit` set: KVM
//! completes whatever is pending for the exit and returns EINTR without running
//! guest code. Then:
//! - RIP moved: the instruction was pending and is exactly [before, after) (the
//!   completion runs the rest of one instruction, nothing more); its bytes there
//!   must decode to an instruction of that length matching the exit.
//! - RIP did not move and no register changed: KVM had completed the instruction
//!   before exiting (an OUT on this host), so it ends at RIP; or it is a REP
//!   string instruction at RIP that KVM restarts (a `rep outs` exits once per
//!   element with RIP on it). The candidates are every start 1..=15 bytes before
//!   RIP whose instruction ends exactly at RIP and matches the exit, and a
//!   matching REP string instruction at RIP.
//! - RIP did not move but registers did (a REP INS the completion advanced), or
//!   an exception is pending (an INS whose store faulted): the instruction is the
//!   one at RIP.
//!
//! Exactly one candidate is the instruction. Several that are all string I/O are
//! string I/O (handled singly either way). Anything else is unattributed: the
//! exit is handled singly, with no cluster, and counted in
//! [`Report::unattributed_exits`](crate::Report::unattributed_exits).
//!
//! Whether an exit is string I/O comes from the instruction found here, never
//! from `kvm_run`'s count (a single INSB has count 1).

use std::time::Instant;

use avex_core::exit::{bitness_of, fetch_code};
use avex_core::guest::{CpuState, Guest};

use crate::insn::{self, Access, Decoded};
use crate::{kvm_err, Error, Vm};

/// Which instruction made an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attribution {
    /// The exiting instruction starts at `start`.
    Exact { start: u64, insn: Decoded },
    /// Several candidates, every one string I/O.
    String,
    /// No candidate, or several that differ: why.
    Unattributed(&'static str),
}

impl Vm {
    /// Complete the exit now in `kvm_run` (the handler's result written there)
    /// and find its instruction. `before` is the vCPU state at the exit.
    pub(crate) fn complete_and_attribute(
        &mut self,
        access: Access,
        before: &CpuState,
    ) -> Result<Attribution, Error> {
        let t = Instant::now();
        let done = self.complete_pending();
        self.time.completion_ns += t.elapsed().as_nanos() as u64;
        done?;
        let after = self.guest.state();
        let bits = bitness_of(&after);
        let dx = before.gpr[2] as u16;
        if after.rip != before.rip {
            let len = after.rip.wrapping_sub(before.rip);
            if !(1..=15).contains(&len) {
                return Ok(Attribution::Unattributed(
                    "RIP moved by more than one instruction",
                ));
            }
            let mut code = [0u8; 15];
            let n = fetch_code(
                &mut self.guest,
                before,
                before.rip,
                &mut code[..len as usize],
            );
            return Ok(
                match insn::decode(&code[..n], bits)
                    .filter(|d| d.len as u64 == len && insn::matches(d, &access, dx))
                {
                    Some(d) => Attribution::Exact {
                        start: before.rip,
                        insn: d,
                    },
                    None => Attribution::Unattributed(
                        "the completed instruction does not match the exit",
                    ),
                },
            );
        }
        let rip = after.rip;
        // Guest code around RIP: up to 15 bytes before (fewer when the page before
        // is not mapped) and 15 from RIP.
        let mut code = [0u8; 30];
        let mut lo = rip.saturating_sub(15);
        let mut n = fetch_code(&mut self.guest, &after, lo, &mut code);
        if n < (rip - lo) as usize {
            lo = lo.max((rip.saturating_sub(1)) & !0xfff);
            n = fetch_code(&mut self.guest, &after, lo, &mut code);
        }
        let end = ((rip - lo) as usize).min(n);
        let code = &code[..n];
        let at_rip = code
            .get(end..)
            .and_then(|c| insn::decode(c, bits))
            .filter(|d| insn::matches(d, &access, dx));
        let worked = before.gpr != after.gpr;
        let faulted = if matches!(access, Access::Io { write: false, .. }) && !worked {
            match self.exception_pending() {
                Some(f) => f,
                None => {
                    return Ok(Attribution::Unattributed(
                        "KVM_GET_VCPU_EVENTS failed after a completion that did not move RIP",
                    ))
                }
            }
        } else {
            false
        };
        if worked || faulted {
            return Ok(match at_rip {
                Some(d) => Attribution::Exact {
                    start: rip,
                    insn: d,
                },
                None => Attribution::Unattributed(
                    "the instruction at RIP that did not complete does not match the exit",
                ),
            });
        }
        let mut candidates: Vec<(u64, Decoded)> = if end == (rip - lo) as usize {
            insn::ending_at(code, end, &access, dx, bits)
                .into_iter()
                .map(|(off, d)| (lo + off as u64, d))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(d) = at_rip.filter(|d| matches!(d.kind, insn::Kind::Io { rep: true, .. })) {
            candidates.push((rip, d));
        }
        Ok(match candidates.as_slice() {
            [(start, d)] => Attribution::Exact {
                start: *start,
                insn: *d,
            },
            [] => Attribution::Unattributed("no instruction ending at RIP matches the exit"),
            c if c.iter().all(|(_, d)| d.kind.is_string()) => Attribution::String,
            _ => Attribution::Unattributed("several instructions ending at RIP match the exit"),
        })
    }

    /// KVM_RUN with `immediate_exit` set: KVM finishes the pending completion of
    /// the last exit (writes IN data or the RDMSR result, advances RIP; nothing
    /// when the instruction had completed before the exit) and returns EINTR
    /// without running guest code.
    pub(crate) fn complete_pending(&mut self) -> Result<(), Error> {
        self.completions += 1;
        self.immediate_run()
    }

    /// KVM_RUN with `immediate_exit` set: KVM loads the synced registers, finishes
    /// any pending completion and returns EINTR without running guest code.
    pub(crate) fn immediate_run(&mut self) -> Result<(), Error> {
        self.guest.vcpu.set_kvm_immediate_exit(1);
        let r = self.guest.vcpu.run().map(|e| format!("{e:?}"));
        self.guest.vcpu.set_kvm_immediate_exit(0);
        self.guest.ran();
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(kvm_err("KVM_RUN (completing an instruction)")(e)),
            Ok(what) => {
                let rip = self.guest.rip();
                Err(Error::Unexpected {
                    rip,
                    what: format!("KVM_RUN with immediate_exit did not return at once: {what}"),
                })
            }
        }
    }

    /// An exception is queued for the vCPU (a completion that faulted).
    fn exception_pending(&mut self) -> Option<bool> {
        self.guest.reg_ioctls += 1;
        let e = self.guest.vcpu.get_vcpu_events().ok()?;
        Some(e.exception.injected != 0 || e.exception.pending != 0)
    }
}
