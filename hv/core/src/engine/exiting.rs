//! The exiting instructions: port I/O (string forms precise per iteration), MSRs,
//! CPUID, TSC, XCRs, control registers, INVLPG, and the privilege checks they
//! make. Each goes to the guest through the trait (see the module documentation).

use super::*;
use cr::{MSR_EFER, MSR_FS_BASE, MSR_GS_BASE};

impl<G: Guest + ?Sized> Engine<'_, G> {
    // ---- privilege ------------------------------------------------------------------

    pub(super) fn cpl0(&self) -> R<()> {
        if self.st.cpl() == 0 {
            Ok(())
        } else {
            Err(GP)
        }
    }

    fn io_allowed(&self) -> R<()> {
        let iopl = ((self.st.rflags >> 12) & 3) as u8;
        if self.st.cr0 & CR0_PE != 0 && self.st.cpl() > iopl {
            // Allowed or not by the TSS I/O permission bitmap: let the CPU decide.
            return Err(StopReason::Unsupported);
        }
        Ok(())
    }

    // ---- port I/O -------------------------------------------------------------------

    pub(super) fn io_in(&mut self, size: Size, port: PortSrc) -> R<Flow> {
        self.io_allowed()?;
        let p = self.port(port);
        let v = self.g.port_in(p, size.bytes() as u8) as u64;
        write_gpr(&mut self.st.gpr[0], size, v);
        Ok(Flow::Next)
    }

    /// OUT; the run stops right after it if a device asked the VMM to stop.
    pub(super) fn io_out(&mut self, size: Size, port: PortSrc) -> R<Flow> {
        self.io_allowed()?;
        let p = self.port(port);
        let v = self.st.gpr[0] & size.mask();
        self.g.port_out(p, size.bytes() as u8, v as u32);
        if self.g.stop_requested() {
            return Ok(Flow::StopAfter(StopReason::StopRequested));
        }
        Ok(Flow::Next)
    }

    pub(super) fn outs(&mut self, size: Size, addr_size: Size, rep: bool, seg: Seg) -> R<Flow> {
        let f = self.string_io(false, size, addr_size, rep, seg)?;
        if self.g.stop_requested() {
            return Ok(Flow::StopAfter(StopReason::StopRequested));
        }
        Ok(f)
    }

    fn port(&self, p: PortSrc) -> u16 {
        match p {
            PortSrc::Imm(i) => i as u16,
            PortSrc::Dx => self.st.gpr[RDX as usize] as u16,
        }
    }

    pub(super) fn string_io(
        &mut self,
        input: bool,
        size: Size,
        addr_size: Size,
        rep: bool,
        seg: Seg,
    ) -> R<Flow> {
        self.io_allowed()?;
        let port = self.st.gpr[RDX as usize] as u16;
        let am = addr_size.mask();
        let idx_reg = if input { RDI } else { RSI } as usize;
        let step = size.bytes() as u64;
        let mut first = true;
        loop {
            if rep && self.st.gpr[RCX as usize] & am == 0 {
                return Ok(Flow::Next);
            }
            if !first {
                // Between iterations: the instruction is interruptible here.
                if self.units <= 1 {
                    return Err(StopReason::Budget);
                }
                if self.code_written {
                    return Err(StopReason::SelfWrite);
                }
                if !input && self.g.stop_requested() {
                    return Err(StopReason::StopRequested);
                }
                self.units -= 1;
            }
            first = false;
            let off = self.st.gpr[idx_reg] & am;
            let la = self.seg_linear(seg, off, size.bytes(), input)?;
            if input {
                let s = self.xlate(la, size.bytes(), Access::Write)?;
                // Make sure the whole element can be written before consuming input.
                let mut b = [0u8; 1];
                self.g
                    .read_phys(s.p0, &mut b)
                    .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
                self.probe_write(s)?;
                let v = self.g.port_in(port, size.bytes() as u8) as u64;
                self.write_span(s, v)?;
            } else {
                let s = self.xlate(la, size.bytes(), Access::Read)?;
                let v = self.read_span(s)?;
                self.g.port_out(port, size.bytes() as u8, v as u32);
            }
            self.stats.rep_iterations += 1;
            let ni = if self.st.rflags & DF != 0 {
                off.wrapping_sub(step)
            } else {
                off.wrapping_add(step)
            };
            write_gpr(&mut self.st.gpr[idx_reg], addr_size, ni & am);
            if !rep {
                return Ok(Flow::Next);
            }
            let cnt = self.st.gpr[RCX as usize].wrapping_sub(1) & am;
            write_gpr(&mut self.st.gpr[RCX as usize], addr_size, cnt);
        }
    }

    // ---- MSRs, CPUID, TSC, XCRs ---------------------------------------------------

    pub(super) fn rdmsr(&mut self) -> R<Flow> {
        self.cpl0()?;
        let msr = self.st.gpr[RCX as usize] as u32;
        let v = match msr {
            MSR_EFER => self.st.efer,
            MSR_FS_BASE => self.st.seg[Seg::Fs as usize].base,
            MSR_GS_BASE => self.st.seg[Seg::Gs as usize].base,
            _ => self.g.rdmsr(msr).map_err(StopReason::Fault)?,
        };
        self.st.gpr[0] = v & 0xffff_ffff;
        self.st.gpr[RDX as usize] = v >> 32;
        Ok(Flow::Next)
    }

    pub(super) fn wrmsr(&mut self) -> R<Flow> {
        self.cpl0()?;
        let msr = self.st.gpr[RCX as usize] as u32;
        let v = (self.st.gpr[0] & 0xffff_ffff) | (self.st.gpr[RDX as usize] << 32);
        match msr {
            // EFER changes the paging mode and NX: leave it to the CPU.
            MSR_EFER => return Err(StopReason::Unsupported),
            _ => {
                if cr::LINEAR_ADDRESS_MSRS.contains(&msr) {
                    let caps = self.caps();
                    cr::check_wrmsr(msr, v, &caps).map_err(StopReason::Fault)?;
                }
                self.g.wrmsr(msr, v).map_err(StopReason::Fault)?;
                match msr {
                    MSR_FS_BASE => self.st.seg[Seg::Fs as usize].base = v,
                    MSR_GS_BASE => self.st.seg[Seg::Gs as usize].base = v,
                    _ => {}
                }
            }
        }
        Ok(Flow::Next)
    }

    pub(super) fn cpuid(&mut self) -> R<Flow> {
        let r = self
            .g
            .cpuid(self.st.gpr[0] as u32, self.st.gpr[RCX as usize] as u32);
        self.st.gpr[0] = r[0] as u64;
        self.st.gpr[RBX as usize] = r[1] as u64;
        self.st.gpr[RCX as usize] = r[2] as u64;
        self.st.gpr[RDX as usize] = r[3] as u64;
        Ok(Flow::Next)
    }

    /// RDTSC, or RDTSCP (`aux`: also TSC_AUX into ECX).
    pub(super) fn rdtsc(&mut self, aux: bool) -> R<Flow> {
        if self.st.cr4 & CR4_TSD != 0 && self.st.cpl() != 0 {
            return Err(GP);
        }
        let t = self.g.tsc();
        if aux {
            let aux = self.g.tsc_aux();
            self.st.gpr[RCX as usize] = aux & 0xffff_ffff;
        }
        self.st.gpr[0] = t & 0xffff_ffff;
        self.st.gpr[RDX as usize] = t >> 32;
        Ok(Flow::Next)
    }

    pub(super) fn xgetbv(&mut self) -> R<Flow> {
        if self.st.cr4 & CR4_OSXSAVE == 0 {
            return Err(UD);
        }
        let v = self
            .g
            .xgetbv(self.st.gpr[RCX as usize] as u32)
            .map_err(StopReason::Fault)?;
        self.st.gpr[0] = v & 0xffff_ffff;
        self.st.gpr[RDX as usize] = v >> 32;
        Ok(Flow::Next)
    }

    pub(super) fn xsetbv(&mut self) -> R<Flow> {
        if self.st.cr4 & CR4_OSXSAVE == 0 {
            return Err(UD);
        }
        self.cpl0()?;
        let v = (self.st.gpr[0] & 0xffff_ffff) | (self.st.gpr[RDX as usize] << 32);
        self.g
            .xsetbv(self.st.gpr[RCX as usize] as u32, v)
            .map_err(StopReason::Fault)?;
        Ok(Flow::Next)
    }

    pub(super) fn invlpg(&mut self) -> R<Flow> {
        self.cpl0()?;
        self.g.invalidate_tlb();
        // The run's own cache of translations too: the next access walks the
        // tables as they are now.
        self.tlb = Tlb::EMPTY;
        Ok(Flow::Next)
    }

    // ---- control registers ----------------------------------------------------------

    pub(super) fn mov_from_cr(&mut self, cr: CrIndex, dst: GprIndex) -> R<Flow> {
        self.cpl0()?;
        let v = match cr {
            0 => self.st.cr0,
            2 => self.st.cr2,
            3 => self.st.cr3,
            4 => self.st.cr4,
            8 if self.b64 => self.st.cr8,
            _ => return Err(UD),
        };
        let sz = if self.b64 { Size::S8 } else { Size::S4 };
        write_gpr(&mut self.st.gpr[(dst & 15) as usize], sz, v);
        Ok(Flow::Next)
    }

    pub(super) fn clts(&mut self) -> R<Flow> {
        self.cpl0()?;
        self.st.cr0 &= !CR0_TS;
        Ok(Flow::Next)
    }

    pub(super) fn lmsw(&mut self, src: &Operand) -> R<Flow> {
        self.cpl0()?;
        let v = self.read(src, Size::S2)?;
        let old = self.st.cr0;
        let new = (old & !0xe) | (v & 0xf) | (old & 1);
        self.st.cr0 = new;
        if new & CR0_PE != old & CR0_PE {
            self.refresh_mmu();
            return Ok(Flow::StopAfter(StopReason::ModeChange));
        }
        Ok(Flow::Next)
    }

    /// The vCPU's features, read from the guest once per run, when first needed.
    fn caps(&mut self) -> CpuCaps {
        match self.caps {
            Some(c) => c,
            None => {
                let c = self.g.cpu_caps();
                self.caps = Some(c);
                c
            }
        }
    }

    pub(super) fn mov_to_cr(&mut self, cr: CrIndex, src: GprIndex) -> R<Flow> {
        self.cpl0()?;
        let mut v = self.gpr(src);
        if !self.b64 {
            v &= 0xffff_ffff;
        }
        if cr == 8 && !self.b64 {
            return Err(UD);
        }
        // Only the CR3 and CR4 rules depend on features: CR0/CR8 writes (TPR
        // updates are frequent) do not ask the guest for them.
        let caps = if matches!(cr, 3 | 4) {
            self.caps()
        } else {
            CpuCaps::default()
        };
        cr::check_write(cr, v, &self.st, &caps).map_err(StopReason::Fault)?;
        let before = self.st.clone();
        let lma = self.st.efer & EFER_LMA != 0;
        // What the write does beyond the register (the CPU's checks passed); guest
        // side effects (TLB flush, interrupt check) only once nothing can fault.
        let mut stop = None;
        let mut flush = false;
        match cr {
            0 => {
                let old = self.st.cr0;
                let v = v | CR0_ET; // ET is hardwired.
                let pg_on = v & CR0_PG != 0 && old & CR0_PG == 0;
                if lma && v & CR0_PG == 0 {
                    // Leaving long mode (from compatibility mode): let the CPU do it.
                    return Err(StopReason::Unsupported);
                }
                self.st.cr0 = v;
                if pg_on && self.st.efer & EFER_LME != 0 {
                    self.st.efer |= EFER_LMA;
                }
                let changed = old ^ v;
                flush = changed & (CR0_PG | CR0_WP | CR0_CD) != 0;
                if changed & (CR0_PG | CR0_PE) != 0 {
                    stop = Some(StopReason::ModeChange);
                }
            }
            2 => self.st.cr2 = v,
            3 => {
                let pcide = self.st.cr4 & CR4_PCIDE != 0;
                flush = !(pcide && v & cr::CR3_NOFLUSH != 0);
                self.st.cr3 = if pcide { v & !cr::CR3_NOFLUSH } else { v };
            }
            4 => {
                // Bits the engine does not model (CET changes CALL/RET, LAM and
                // FRED change addressing and events): the CPU runs the write.
                const MODELLED: u64 = (1 << 23) - 1;
                let old = self.st.cr4;
                if (v ^ old) & !MODELLED != 0 {
                    return Err(StopReason::Unsupported);
                }
                self.st.cr4 = v;
                const PAGING: u64 = CR4_PSE
                    | CR4_PAE
                    | CR4_PGE
                    | CR4_LA57
                    | CR4_PCIDE
                    | CR4_SMEP
                    | CR4_SMAP
                    | CR4_PKE;
                if (old ^ v) & PAGING != 0 {
                    flush = true;
                    stop = Some(StopReason::ModeChange);
                }
            }
            8 => self.st.cr8 = v,
            _ => return Err(UD),
        }
        if cr::loads_pdptes(cr, &before, &self.st) {
            let caps = self.caps();
            match cr::load_pdptes(self.g, self.st.cr3, &caps) {
                Ok(p) => self.st.pdpte = Some(p),
                Err(e) => {
                    // The instruction faults (or cannot be done here): undo it.
                    self.st = before;
                    return Err(match e {
                        cr::PdpteError::Fault(f) => StopReason::Fault(f),
                        cr::PdpteError::NotRam { gpa } => StopReason::NotRam { gpa },
                    });
                }
            }
            // New PDPTE registers: end the run right after, so a backend that
            // reloads them from memory at CR3 still gets what was loaded.
            stop = stop.or(Some(StopReason::ModeChange));
        }
        if flush {
            self.g.invalidate_tlb();
        }
        if cr == 8 && self.st.cr8 < before.cr8 && self.interrupt_can_be_taken() {
            stop = Some(StopReason::InterruptPending);
        }
        self.refresh_mmu();
        if let Some(r) = stop {
            return Ok(Flow::StopAfter(r));
        }
        if cr == 3 && self.mmu.paging != Paging::None {
            // The code must still be the cluster's under the new tables.
            self.code_pages = [u64::MAX; MAX_CODE_PAGES];
            if let Err(r) = self.check_code() {
                let r = if r == StopReason::CodeUnreadable {
                    StopReason::CodeChanged
                } else {
                    r
                };
                return Ok(Flow::StopAfter(r));
            }
        }
        Ok(Flow::Next)
    }
}
