//! Operands: registers, memory operands through segmentation and the software MMU
//! (split accesses, the self-write check), and the stack.

use super::*;

/// A translated guest access: `len0` bytes at `p0`, the rest at `p1`.
#[derive(Clone, Copy)]
pub(super) struct Span {
    pub(super) p0: u64,
    pub(super) len0: u32,
    pub(super) p1: u64,
    pub(super) size: u32,
}

#[derive(Clone, Copy)]
pub(super) enum Loc {
    Reg(RegRef),
    Mem(Span),
}

fn xerr(e: XlateError) -> StopReason {
    match e {
        XlateError::PageFault { addr, error_code } => StopReason::PageFault { addr, error_code },
        XlateError::NotRam { gpa } => StopReason::NotRam { gpa },
        XlateError::Unsupported => StopReason::Unsupported,
    }
}

impl<G: Guest + ?Sized> Engine<'_, G> {
    // ---- registers ----------------------------------------------------------------

    #[inline(always)]
    pub(super) fn reg(&self, r: RegRef) -> u64 {
        if r.high8 {
            (self.st.gpr[(r.index & 3) as usize] >> 8) & 0xff
        } else {
            self.st.gpr[(r.index & 15) as usize] & r.size.mask()
        }
    }

    #[inline(always)]
    pub(super) fn set_reg(&mut self, r: RegRef, v: u64) {
        if r.high8 {
            let g = &mut self.st.gpr[(r.index & 3) as usize];
            *g = (*g & !0xff00) | ((v & 0xff) << 8);
        } else {
            write_gpr(&mut self.st.gpr[(r.index & 15) as usize], r.size, v);
        }
    }

    #[inline(always)]
    pub(super) fn gpr(&self, i: u8) -> u64 {
        self.st.gpr[(i & 15) as usize]
    }

    // ---- memory --------------------------------------------------------------------

    /// Effective address (no segment base), plus `extra`, truncated to the address size.
    #[inline(always)]
    pub(super) fn ea(&self, m: &MemRef, extra: u64) -> u64 {
        let mut a = m.disp as u64;
        if let Some(b) = m.base {
            a = a.wrapping_add(self.gpr(b));
        }
        if let Some(x) = m.index {
            a = a.wrapping_add(self.gpr(x).wrapping_mul(m.scale as u64));
        }
        a.wrapping_add(extra) & m.addr_size.mask()
    }

    /// Linear address of an access of `size` bytes at `seg:off`, with segment checks.
    #[inline(always)]
    pub(super) fn seg_linear(&self, seg: Seg, off: u64, size: u32, write: bool) -> R<u64> {
        let s = &self.st.seg[seg as usize];
        if self.b64 {
            let base = if matches!(seg, Seg::Fs | Seg::Gs) {
                s.base
            } else {
                0
            };
            let la = base.wrapping_add(off);
            if !canonical(la) || !canonical(la.wrapping_add(size as u64 - 1)) {
                return Err(GP);
            }
            return Ok(la);
        }
        if s.attrs & (1 << 16) != 0 {
            return Err(GP);
        }
        let ty = s.attrs & 0xf;
        if self.st.cr0 & CR0_PE != 0 {
            // Code: readable (bit 1), never writable. Data: writable (bit 1).
            let allowed = if ty & 8 != 0 {
                !write && ty & 2 != 0
            } else {
                !write || ty & 2 != 0
            };
            if !allowed {
                return Err(GP);
            }
        }
        let last = off.saturating_add(size as u64 - 1);
        let limit = s.limit as u64;
        let expand_down = ty & 0xc == 0x4;
        let ok = if expand_down {
            let top = if s.db() { 0xffff_ffff } else { 0xffff };
            off > limit && last <= top
        } else {
            last <= limit
        };
        if !ok {
            return Err(GP);
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    #[inline(always)]
    pub(super) fn xlate(&mut self, la: u64, size: u32, access: Access) -> R<Span> {
        self.stats.mem_accesses += 1;
        let p0 = self.translate_cached(la, access).map_err(xerr)?;
        let in_page = 4096 - (la & 0xfff) as u32;
        if size <= in_page {
            return Ok(Span {
                p0,
                len0: size,
                p1: 0,
                size,
            });
        }
        let la1 = if self.b64 {
            la.wrapping_add(in_page as u64)
        } else {
            la.wrapping_add(in_page as u64) & 0xffff_ffff
        };
        let p1 = self.translate_cached(la1, access).map_err(xerr)?;
        Ok(Span {
            p0,
            len0: in_page,
            p1,
            size,
        })
    }

    #[inline(always)]
    pub(super) fn mem_span(
        &mut self,
        m: &MemRef,
        size: Size,
        extra: u64,
        access: Access,
    ) -> R<Span> {
        let off = self.ea(m, extra);
        let la = self.seg_linear(m.seg, off, size.bytes(), access == Access::Write)?;
        self.xlate(la, size.bytes(), access)
    }

    #[inline(always)]
    pub(super) fn read_span(&mut self, s: Span) -> R<u64> {
        let mut b = [0u8; 8];
        let size = (s.size as usize).min(8);
        let l0 = (s.len0 as usize).min(size);
        self.g
            .read_phys(s.p0, &mut b[..l0])
            .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        if l0 < size {
            self.g
                .read_phys(s.p1, &mut b[l0..size])
                .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        }
        Ok(u64::from_le_bytes(b))
    }

    /// Checks that a write to `s` can complete (so a split write is never half done).
    #[inline(always)]
    pub(super) fn probe_write(&mut self, s: Span) -> R<()> {
        let mut b = [0u8; 1];
        if s.len0 < s.size {
            self.g
                .read_phys(s.p1, &mut b)
                .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        }
        Ok(())
    }

    #[inline(always)]
    pub(super) fn write_span(&mut self, s: Span, v: u64) -> R<()> {
        let b = v.to_le_bytes();
        let size = (s.size as usize).min(8);
        let l0 = (s.len0 as usize).min(size);
        self.probe_write(s)?;
        self.g
            .write_phys(s.p0, &b[..l0])
            .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
        self.note_write(s.p0);
        if l0 < size {
            self.g
                .write_phys(s.p1, &b[l0..size])
                .map_err(|e| StopReason::NotRam { gpa: e.gpa })?;
            self.note_write(s.p1);
        }
        Ok(())
    }

    #[inline(always)]
    pub(super) fn note_write(&mut self, gpa: u64) {
        let p = gpa >> 12;
        if self.code_pages.contains(&p) {
            self.code_written = true;
        }
    }

    #[inline(always)]
    pub(super) fn read(&mut self, o: &Operand, size: Size) -> R<u64> {
        match o {
            Operand::Reg(r) => Ok(self.reg(*r) & size.mask()),
            Operand::Imm(v) => Ok(*v & size.mask()),
            Operand::Mem(m) => self.read_mem(m, size),
        }
    }

    #[inline(never)]
    pub(super) fn read_mem(&mut self, m: &MemRef, size: Size) -> R<u64> {
        let s = self.mem_span(m, size, 0, Access::Read)?;
        self.read_span(s)
    }

    /// Resolves a destination (for memory: translated for writing).
    #[inline(always)]
    pub(super) fn dst(&mut self, o: &Operand, size: Size, extra: u64) -> R<Loc> {
        match o {
            Operand::Reg(r) => Ok(Loc::Reg(*r)),
            Operand::Mem(m) => Ok(Loc::Mem(self.mem_span(m, size, extra, Access::Write)?)),
            Operand::Imm(_) => Err(StopReason::Invalid(Invalid::Operand(0))),
        }
    }

    #[inline(always)]
    pub(super) fn load(&mut self, l: Loc, size: Size) -> R<u64> {
        match l {
            Loc::Reg(r) => Ok(self.reg(r) & size.mask()),
            Loc::Mem(s) => self.read_span(s),
        }
    }

    #[inline(always)]
    pub(super) fn store(&mut self, l: Loc, v: u64) -> R<()> {
        match l {
            Loc::Reg(r) => {
                self.set_reg(r, v);
                Ok(())
            }
            Loc::Mem(s) => self.write_span(s, v),
        }
    }

    // ---- stack ----------------------------------------------------------------------

    pub(super) fn stack_size(&self) -> Size {
        if self.b64 {
            Size::S8
        } else if self.st.seg[Seg::Ss as usize].db() {
            Size::S4
        } else {
            Size::S2
        }
    }

    pub(super) fn push(&mut self, size: Size, src: &Operand) -> R<()> {
        let v = self.read(src, size)?;
        let ss = self.stack_size();
        let sp = self.st.gpr[RSP as usize].wrapping_sub(size.bytes() as u64) & ss.mask();
        let la = self.seg_linear(Seg::Ss, sp, size.bytes(), true)?;
        let s = self.xlate(la, size.bytes(), Access::Write)?;
        self.write_span(s, v)?;
        write_gpr(&mut self.st.gpr[RSP as usize], ss, sp);
        Ok(())
    }

    pub(super) fn pop(&mut self, size: Size, dst: &Operand) -> R<()> {
        let ss = self.stack_size();
        let sp = self.st.gpr[RSP as usize] & ss.mask();
        let la = self.seg_linear(Seg::Ss, sp, size.bytes(), false)?;
        let s = self.xlate(la, size.bytes(), Access::Read)?;
        let new_sp = sp.wrapping_add(size.bytes() as u64) & ss.mask();
        let mut rsp = self.st.gpr[RSP as usize];
        write_gpr(&mut rsp, ss, new_sp);
        match dst {
            Operand::Mem(_) => {
                // The destination address uses the incremented stack pointer.
                let old = core::mem::replace(&mut self.st.gpr[RSP as usize], rsp);
                let d = self.dst(dst, size, 0);
                self.st.gpr[RSP as usize] = old;
                let d = d?;
                let v = self.read_span(s)?;
                self.store(d, v)?;
                self.st.gpr[RSP as usize] = rsp;
            }
            Operand::Reg(r) => {
                let v = self.read_span(s)?;
                self.st.gpr[RSP as usize] = rsp;
                self.set_reg(*r, v);
            }
            Operand::Imm(_) => return Err(StopReason::Invalid(Invalid::Operand(0))),
        }
        Ok(())
    }
}
