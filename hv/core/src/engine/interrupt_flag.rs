//! The instructions that read or write RFLAGS as a whole or its interrupt flag:
//! PUSHF, POPF, CLI, STI (SDM vol. 2, each instruction's Operation section).
//!
//! Enabling interrupts ends the run where the CPU would first take one, so the
//! hypervisor can deliver a pending interrupt exactly there: right after a POPF
//! that sets IF, and after the instruction following an STI that sets it (the STI
//! interrupt shadow). The engine cannot leave the guest inside a shadow (the
//! shadow is CPU state it does not hand back), so an STI whose next instruction it
//! cannot complete is not run either: the run stops before the STI.

use super::*;
use crate::arch::cr4;
use crate::arch::rflags::{AC, FIXED, ID, IF, IOPL, NT, RF, TF, VM};

/// The flags POPF loads at CPL 0 (and in real mode): every non-reserved flag but
/// RF (cleared), VM, VIF and VIP (unaffected).
const POPF_LOADS: u64 = STATUS | TF | IF | DF | IOPL | NT | AC | ID;

impl<G: Guest + ?Sized> Engine<'_, G> {
    fn iopl(&self) -> u8 {
        ((self.st.rflags & IOPL) >> 12) as u8
    }

    fn protected_mode(&self) -> bool {
        self.st.cr0 & CR0_PE != 0
    }

    /// CLI and STI change IF in real mode and at CPL <= IOPL. Otherwise the CPU
    /// raises #GP, or at CPL 3 with CR4.PVI changes VIF, which the engine leaves
    /// to the CPU: the run stops before the instruction either way.
    fn may_change_if(&self) -> R<()> {
        let cpl = self.st.cpl();
        if !self.protected_mode() || cpl <= self.iopl() {
            return Ok(());
        }
        if cpl == 3 && self.st.cr4 & cr4::PVI != 0 {
            return Err(StopReason::Unsupported);
        }
        Err(GP)
    }

    /// PUSHF: RFLAGS with RF and VM cleared, at the push width.
    pub(super) fn pushf(&mut self, size: Size) -> R<()> {
        let v = self.st.rflags & !(RF | VM);
        self.push(size, &Operand::Imm(v))
    }

    /// POPF: which flags load depends on CPL and IOPL (IOPL only at CPL 0, IF only
    /// at CPL <= IOPL); a 16-bit POPF loads the low 16 bits. Setting TF would trap
    /// after the instruction: the run stops before it. Setting IF ends the run.
    pub(super) fn popf(&mut self, size: Size) -> R<Flow> {
        let ss = self.stack_size();
        let sp = self.st.gpr[RSP as usize] & ss.mask();
        let la = self.seg_linear(Seg::Ss, sp, size.bytes(), false)?;
        let span = self.xlate(la, size.bytes(), Access::Read)?;
        let v = self.read_span(span)?;
        let old = self.st.rflags;
        let mut loads = POPF_LOADS & size.mask();
        if self.protected_mode() && self.st.cpl() > 0 {
            loads &= !IOPL;
            if self.st.cpl() > self.iopl() {
                loads &= !IF;
            }
        }
        let new = (((old & !loads) | (v & loads)) | FIXED) & !RF;
        if new & TF != 0 {
            return Err(StopReason::Unsupported);
        }
        let new_sp = sp.wrapping_add(u64::from(size.bytes())) & ss.mask();
        write_gpr(&mut self.st.gpr[RSP as usize], ss, new_sp);
        self.st.rflags = new;
        if (old ^ new) & AC != 0 {
            // SMAP's exemption follows AC: the MMU captured it.
            self.refresh_mmu();
        }
        if old & IF == 0 && new & IF != 0 {
            return Ok(Flow::StopAfter(StopReason::InterruptWindow));
        }
        Ok(Flow::Next)
    }

    pub(super) fn cli(&mut self) -> R<()> {
        self.may_change_if()?;
        self.st.rflags &= !IF;
        Ok(())
    }

    /// STI (instruction `at`). With IF already set nothing changes and no shadow
    /// begins. Otherwise the next instruction runs in the shadow
    /// ([`Flow::Shadow`]): it must be the cluster's next instruction and one the
    /// engine completes whole or not at all (not a REP string instruction, which
    /// may stop between iterations), or the run stops before the STI.
    pub(super) fn sti(&mut self, at: usize) -> R<Flow> {
        self.may_change_if()?;
        if self.st.rflags & IF != 0 {
            return Ok(Flow::Next);
        }
        let c = self.c;
        let here = &c.insns[at];
        let next_rip = here.rip.wrapping_add(u64::from(here.len));
        match c.insns.get(at + 1) {
            Some(n) if n.rip == next_rip => {
                if matches!(n.op, Op::Ins { rep: true, .. } | Op::Outs { rep: true, .. }) {
                    return Err(StopReason::Unsupported);
                }
            }
            // The cluster ends after the STI: the guest runs it natively.
            _ => return Err(StopReason::End),
        }
        self.st.rflags |= IF;
        Ok(Flow::Shadow)
    }

    /// Undoes an STI whose shadow instruction stopped before itself: the run stops
    /// before the STI instead (IF was clear before it; it changed nothing else).
    pub(super) fn undo_sti(&mut self, sti: usize) -> (u64, Option<usize>) {
        self.st.rflags &= !IF;
        self.stats.insns = self.stats.insns.saturating_sub(1);
        self.units += 1;
        (self.c.insns[sti].rip, Some(sti))
    }
}
