//! Control flow: the run loop (budget, self-writes, back-edge caps and the
//! interrupt check at back-edges), the code check before a run, and the branches.

use super::*;

impl<G: Guest + ?Sized> Engine<'_, G> {
    pub(super) fn run_from(&mut self, start: usize) -> (StopReason, u64, Option<usize>) {
        let c = self.c;
        let n = c.insns.len();
        let mut idx = start;
        // The STI whose interrupt shadow the current instruction is in.
        let mut shadow: Option<usize> = None;
        loop {
            let Some(insn) = c.insns.get(idx) else {
                return (StopReason::Invalid(Invalid::StartIndex), self.st.rip, None);
            };
            // A stop before the instruction in an STI's shadow stops before the STI.
            let before =
                move |e: &mut Self, r: StopReason, rip: u64, at: Option<usize>| match shadow {
                    Some(s) => {
                        let (rip, at) = e.undo_sti(s);
                        (r, rip, at)
                    }
                    None => (r, rip, at),
                };
            if insn.len == 0 || !c.code.iter().any(|r| r.holds(insn.rip, insn.len.into())) {
                // Only instructions inside the checked bytes ever run. Control
                // reached this instruction's claimed address: resume there.
                let r = StopReason::Invalid(Invalid::InsnPlacement(idx as u16));
                return before(self, r, insn.rip, None);
            }
            if self.units == 0 {
                return before(self, StopReason::Budget, insn.rip, Some(idx));
            }
            let flow = if self.exec_fast(&insn.op) {
                Flow::Next
            } else {
                match self.exec(idx, insn) {
                    Ok(f) => f,
                    Err(r) => return before(self, r, insn.rip, Some(idx)),
                }
            };
            self.units -= 1;
            self.stats.insns += 1;
            if let Some(cl) = insn.exit_class {
                self.stats.exiting += 1;
                if let Some(s) = self.stats.by_class.get_mut(cl as usize) {
                    *s += 1;
                }
            }
            let next_rip = insn.rip + insn.len as u64;
            let fall = (idx + 1 < n && c.insns[idx + 1].rip == next_rip).then_some(idx + 1);
            if shadow.is_some() {
                // The shadow has passed: end where the CPU may first take an interrupt.
                let (mut reason, rip, at) = match flow {
                    Flow::Next | Flow::Shadow => (StopReason::InterruptWindow, next_rip, fall),
                    Flow::Exit(rip) => (StopReason::InterruptWindow, rip, None),
                    Flow::StopAfter(r) => (r, next_rip, fall),
                    Flow::Jump(t) => match c.insns.get(t as usize) {
                        Some(tgt) => (StopReason::InterruptWindow, tgt.rip, Some(t as usize)),
                        None => {
                            let r = StopReason::Invalid(Invalid::Target(idx as u16));
                            return (r, insn.rip, Some(idx));
                        }
                    },
                };
                if self.code_written {
                    reason = StopReason::SelfWrite;
                }
                return (reason, rip, at);
            }
            let next = match flow {
                Flow::Shadow => match fall {
                    Some(k) => {
                        shadow = Some(idx);
                        k
                    }
                    // `sti` checked that the next instruction follows; were it
                    // not there, the guest must run the STI itself.
                    None => {
                        let (rip, at) = self.undo_sti(idx);
                        return (StopReason::End, rip, at);
                    }
                },
                Flow::Next => {
                    if idx + 1 < n && c.insns[idx + 1].rip == next_rip {
                        idx + 1
                    } else if self.code_written {
                        return (StopReason::SelfWrite, next_rip, None);
                    } else {
                        return (StopReason::End, next_rip, None);
                    }
                }
                Flow::Exit(rip) => return (StopReason::ExitBranch, rip, None),
                Flow::StopAfter(r) => return (r, next_rip, fall),
                Flow::Jump(t) => {
                    let t = t as usize;
                    let Some(tgt) = c.insns.get(t) else {
                        return (
                            StopReason::Invalid(Invalid::Target(idx as u16)),
                            insn.rip,
                            Some(idx),
                        );
                    };
                    if t <= idx {
                        self.stats.back_edges += 1;
                        let slot = c.back_edges.iter().position(|b| b.insn as usize == idx);
                        let capped = match slot {
                            Some(k) => {
                                let cnt = &mut self.be_counts[k % MAX_BACK_EDGES];
                                *cnt += 1;
                                matches!(c.back_edges[k].cap, Some(cap) if *cnt > cap as u32)
                            }
                            None => true,
                        };
                        if capped {
                            return (StopReason::BackEdgeCap, tgt.rip, Some(t));
                        }
                        if self.interrupt_can_be_taken() {
                            return (StopReason::InterruptPending, tgt.rip, Some(t));
                        }
                    }
                    t
                }
            };
            if self.code_written {
                let rip = c.insns[next].rip;
                return (StopReason::SelfWrite, rip, Some(next));
            }
            idx = next;
        }
    }

    /// Compares the guest's code with the cluster's bytes, recording the code pages.
    pub(super) fn check_code(&mut self) -> R<()> {
        let c = self.c;
        let cs = self.st.seg[Seg::Cs as usize];
        let base = if self.b64 { 0 } else { cs.base };
        let mut pages = 0;
        self.code_pages = [u64::MAX; MAX_CODE_PAGES];
        let mut buf = [0u8; 256];
        for range in &c.code {
            let bytes = &range.bytes;
            if !self.b64 && (range.end() - 1 > cs.limit as u64 || cs.attrs & (1 << 16) != 0) {
                return Err(StopReason::CodeUnreadable);
            }
            let mut off = 0usize;
            while off < bytes.len() {
                let mut la = base.wrapping_add(range.start).wrapping_add(off as u64);
                if !self.b64 {
                    la &= 0xffff_ffff;
                } else if !canonical(la) {
                    return Err(StopReason::CodeUnreadable);
                }
                let gpa = self
                    .mmu
                    .translate(self.g, la, Access::Fetch, &mut self.stats.page_walks)
                    .map_err(|_| StopReason::CodeUnreadable)?;
                let in_page = (4096 - (la & 0xfff)) as usize;
                let chunk = in_page.min(bytes.len() - off);
                // Every code page is recorded, or the run does not start: a write
                // into an unrecorded one would go unseen.
                if !self.code_pages[..pages].contains(&(gpa >> 12)) {
                    let slot = self
                        .code_pages
                        .get_mut(pages)
                        .ok_or(StopReason::Invalid(Invalid::TooLarge))?;
                    *slot = gpa >> 12;
                    pages += 1;
                }
                let mut done = 0;
                while done < chunk {
                    let k = (chunk - done).min(buf.len());
                    self.g
                        .read_phys(gpa + done as u64, &mut buf[..k])
                        .map_err(|_| StopReason::CodeUnreadable)?;
                    if buf[..k] != bytes[off + done..off + done + k] {
                        return Err(StopReason::CodeChanged);
                    }
                    done += k;
                }
                off += chunk;
            }
        }
        Ok(())
    }

    /// An interrupt waits that the guest could take now: the backend's answer,
    /// asked only while IF is set in the run's RFLAGS (after an in-run CLI the
    /// backend's copy still says IF=1).
    pub(super) fn interrupt_can_be_taken(&mut self) -> bool {
        self.st.rflags & crate::arch::rflags::IF != 0 && self.g.interrupt_pending()
    }

    // ---- branches -------------------------------------------------------------------

    /// Where a taken branch goes. Inside the cluster the code check vouched for
    /// the destination; a destination outside it the CPU checks before the branch
    /// does anything (SDM JMP/CALL/RET/Jcc: #GP(0) if the new EIP is beyond the CS
    /// limit, or the new RIP is not canonical), so the run stops before the branch
    /// rather than resume the guest where it could not be (a non-canonical RIP
    /// would fail the VM entry).
    fn target(&self, t: Target) -> R<Flow> {
        match t {
            Target::Insn(i) => Ok(Flow::Jump(i)),
            Target::Exit(r) => {
                let ok = if self.b64 {
                    canonical(r)
                } else {
                    r <= u64::from(self.st.seg[Seg::Cs as usize].limit)
                };
                if ok {
                    Ok(Flow::Exit(r))
                } else {
                    Err(GP)
                }
            }
        }
    }

    /// A branch target outside the cluster stops before the branch (nothing done).
    fn check_target(&self, t: Target) -> R<()> {
        match t {
            Target::Insn(i) if i as usize >= self.c.insns.len() => {
                Err(StopReason::Invalid(Invalid::Target(i)))
            }
            _ => Ok(()),
        }
    }

    /// CALL rel: push the return address, then go to the target.
    pub(super) fn call(&mut self, size: Size, ret: u64, target: Target) -> R<Flow> {
        self.check_target(target)?;
        let flow = self.target(target)?;
        self.push(size, &Operand::Imm(ret))?;
        Ok(flow)
    }

    /// Where a guarded instruction (index `at`) goes for destination `to`: the first
    /// guard expecting it, or a stop before the instruction.
    fn guarded(&self, at: usize, to: u64) -> R<Target> {
        match self.c.guards_of(at).find(|g| g.expect == to) {
            Some(g) => {
                self.check_target(g.target)?;
                Ok(g.target)
            }
            None => Err(StopReason::GuardMiss {
                to,
                insn: at as u16,
            }),
        }
    }

    /// CALL r/m: read the destination, check it against the guards, push, go.
    pub(super) fn call_indirect(
        &mut self,
        at: usize,
        size: Size,
        src: &Operand,
        ret: u64,
    ) -> R<Flow> {
        let to = self.read(src, size)?;
        let flow = self.target(self.guarded(at, to)?)?;
        self.push(size, &Operand::Imm(ret))?;
        Ok(flow)
    }

    /// JMP r/m: read the destination, check it against the guards, go.
    pub(super) fn jmp_indirect(&mut self, at: usize, size: Size, src: &Operand) -> R<Flow> {
        let to = self.read(src, size)?;
        self.target(self.guarded(at, to)?)
    }

    /// RET / RET imm16: read the return address, check it against the guards, pop
    /// it and `pop` more bytes, go.
    pub(super) fn ret(&mut self, at: usize, size: Size, pop: u16) -> R<Flow> {
        let ss = self.stack_size();
        let sp = self.st.gpr[RSP as usize] & ss.mask();
        let la = self.seg_linear(Seg::Ss, sp, size.bytes(), false)?;
        let span = self.xlate(la, size.bytes(), Access::Read)?;
        let to = self.read_span(span)?;
        let flow = self.target(self.guarded(at, to)?)?;
        let new_sp = sp
            .wrapping_add(u64::from(size.bytes()))
            .wrapping_add(u64::from(pop))
            & ss.mask();
        write_gpr(&mut self.st.gpr[RSP as usize], ss, new_sp);
        Ok(flow)
    }

    pub(super) fn jmp(&self, target: Target) -> R<Flow> {
        self.check_target(target)?;
        self.target(target)
    }

    pub(super) fn jcc(&mut self, c: Cond, target: Target) -> R<Flow> {
        self.check_target(target)?;
        if alu::cond(c, self.st.rflags) {
            return self.target(target);
        }
        Ok(Flow::Next)
    }

    /// LOOP/LOOPE/LOOPNE count (R/E)CX down at `addr_size`; JCXZ only tests it.
    pub(super) fn loop_(&mut self, kind: LoopKind, addr_size: Size, target: Target) -> R<Flow> {
        self.check_target(target)?;
        let rcx = self.st.gpr[RCX as usize] & addr_size.mask();
        let zf = self.st.rflags & ZF != 0;
        let (taken, count) = if kind == LoopKind::Jcxz {
            (rcx == 0, None)
        } else {
            let n = rcx.wrapping_sub(1) & addr_size.mask();
            let go = n != 0
                && match kind {
                    LoopKind::Loope => zf,
                    LoopKind::Loopne => !zf,
                    _ => true,
                };
            (go, Some(n))
        };
        // A taken branch that faults undoes the decrement with the rest.
        let flow = if taken {
            self.target(target)?
        } else {
            Flow::Next
        };
        if let Some(n) = count {
            write_gpr(&mut self.st.gpr[RCX as usize], addr_size, n);
        }
        Ok(flow)
    }
}
