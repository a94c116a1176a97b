//! One instruction: the gap fillers (data movement, ALU, shifts, bit tests, flags)
//! and the dispatch of every op to the module that runs it.

use super::operand::Loc;
use super::*;

impl<G: Guest + ?Sized> Engine<'_, G> {
    /// Register/immediate-only forms of the commonest gap fillers, inlined into the
    /// run loop. Returns false (having done nothing) for anything else.
    #[inline(always)]
    pub(super) fn exec_fast(&mut self, op: &Op) -> bool {
        let fl = self.st.rflags;
        match *op {
            Op::Mov {
                size,
                dst: Operand::Reg(d),
                ref src,
            } => {
                let v = match *src {
                    Operand::Reg(r) => self.reg(r),
                    Operand::Imm(i) => i,
                    Operand::Mem(_) => return false,
                };
                self.set_reg(d, v & size.mask());
            }
            Op::Alu {
                op,
                size,
                dst: Operand::Reg(d),
                ref src,
            } => {
                let b = match *src {
                    Operand::Reg(r) => self.reg(r),
                    Operand::Imm(i) => i,
                    Operand::Mem(_) => return false,
                };
                let (res, f) = alu::alu(op, size, self.reg(d), b, fl);
                if !matches!(op, AluOp::Cmp | AluOp::Test) {
                    self.set_reg(d, res);
                }
                self.st.rflags = f;
            }
            Op::Lea { dst, ref addr } => {
                let v = self.ea(addr, 0);
                self.set_reg(dst, v);
            }
            _ => return false,
        }
        true
    }

    /// One instruction, the slow path (everything [`Self::exec_fast`] does not
    /// do): the gap fillers' rules are here; branches are in `control`, exiting
    /// instructions in `exiting`, stack and memory access in `operand`.
    /// Runs instruction `at` of the cluster (`insn`).
    pub(super) fn exec(&mut self, at: usize, insn: &Insn) -> R<Flow> {
        let fl = self.st.rflags;
        match insn.op {
            Op::Mov {
                size,
                ref dst,
                ref src,
            } => {
                let v = self.read(src, size)?;
                if let Operand::Reg(r) = *dst {
                    self.set_reg(r, v);
                } else {
                    let d = self.dst(dst, size, 0)?;
                    self.store(d, v)?;
                }
            }
            Op::Movzx {
                dst,
                ref src,
                src_size,
            } => {
                let v = self.read(src, src_size)?;
                self.set_reg(dst, v);
            }
            Op::Movsx {
                dst,
                ref src,
                src_size,
            } => {
                let v = self.read(src, src_size)?;
                self.set_reg(dst, sext(v, src_size));
            }
            Op::Lea { dst, addr } => {
                let v = self.ea(&addr, 0);
                self.set_reg(dst, v);
            }
            Op::Alu {
                op,
                size,
                ref dst,
                ref src,
            } => {
                let b = self.read(src, size)?;
                let flags_only = matches!(op, AluOp::Cmp | AluOp::Test);
                if let Operand::Reg(r) = *dst {
                    let (res, f) = alu::alu(op, size, self.reg(r), b, fl);
                    if !flags_only {
                        self.set_reg(r, res);
                    }
                    self.st.rflags = f;
                    return Ok(Flow::Next);
                }
                let d = if flags_only {
                    None
                } else {
                    Some(self.dst(dst, size, 0)?)
                };
                let a = match d {
                    Some(l) => self.load(l, size)?,
                    None => self.read(dst, size)?,
                };
                let (r, f) = alu::alu(op, size, a, b, fl);
                if let Some(l) = d {
                    self.store(l, r)?;
                }
                self.set_flags(f);
            }
            Op::Unary { op, size, ref dst } => {
                if let Operand::Reg(r) = *dst {
                    let (res, f) = alu::unary(op, size, self.reg(r), fl);
                    self.set_reg(r, res);
                    self.st.rflags = f;
                    return Ok(Flow::Next);
                }
                let d = self.dst(dst, size, 0)?;
                let a = self.load(d, size)?;
                let (r, f) = alu::unary(op, size, a, fl);
                self.store(d, r)?;
                self.set_flags(f);
            }
            Op::Shift {
                op,
                size,
                ref dst,
                ref count,
            } => {
                let cnt = self.read(count, Size::S1)?;
                if let Operand::Reg(r) = *dst {
                    let v = self.reg(r);
                    let (res, f) = if matches!(count, Operand::Imm(_)) {
                        alu::shift_reg_imm(op, size, v, cnt, fl)
                    } else {
                        alu::shift(op, size, v, cnt, fl)
                    };
                    self.set_reg(r, res);
                    self.st.rflags = f;
                    return Ok(Flow::Next);
                }
                let d = self.dst(dst, size, 0)?;
                let a = self.load(d, size)?;
                let (r, f) = alu::shift(op, size, a, cnt, fl);
                self.store(d, r)?;
                self.set_flags(f);
            }
            Op::Bit {
                op,
                size,
                ref dst,
                ref bit,
            } => self.bit(op, size, dst, bit)?,
            Op::Xchg { size, ref a, ref b } => {
                // Memory first so a fault leaves everything undone.
                let (la, lb) = match (a, b) {
                    (Operand::Mem(_), _) => {
                        let la = self.dst(a, size, 0)?;
                        (la, self.dst(b, size, 0)?)
                    }
                    _ => {
                        let lb = self.dst(b, size, 0)?;
                        (self.dst(a, size, 0)?, lb)
                    }
                };
                let va = self.load(la, size)?;
                let vb = self.load(lb, size)?;
                if let Loc::Mem(_) = la {
                    self.store(la, vb)?;
                    self.store(lb, va)?;
                } else {
                    self.store(lb, va)?;
                    self.store(la, vb)?;
                }
            }
            Op::Push { size, ref src } => self.push(size, src)?,
            Op::Pop { size, ref dst } => self.pop(size, dst)?,
            Op::Setcc { cond: c, ref dst } => {
                let d = self.dst(dst, Size::S1, 0)?;
                self.store(d, alu::cond(c, fl) as u64)?;
            }
            Op::Cmovcc {
                cond: c,
                size,
                dst,
                ref src,
            } => {
                let v = self.read(src, size)?;
                let v = if alu::cond(c, fl) { v } else { self.reg(dst) };
                self.set_reg(dst, v);
            }
            Op::Imul {
                size,
                dst,
                ref src,
                factor,
            } => {
                let s = self.read(src, size)?;
                let (a, b) = match factor {
                    Some(imm) => (s, imm),
                    None => (self.reg(dst), s),
                };
                let (r, f) = alu::imul(size, a, b, self.st.rflags);
                self.set_reg(dst, r);
                self.st.rflags = f;
            }
            Op::SignExtendAcc { size } => {
                let half = match size {
                    Size::S8 => Size::S4,
                    Size::S4 => Size::S2,
                    _ => Size::S1,
                };
                let v = sext(self.st.gpr[0], half);
                write_gpr(&mut self.st.gpr[0], size, v);
            }
            Op::SignExtendAccToDx { size } => {
                let neg = (self.st.gpr[0] >> (size.bits() - 1)) & 1 != 0;
                write_gpr(
                    &mut self.st.gpr[RDX as usize],
                    size,
                    if neg { u64::MAX } else { 0 },
                );
            }
            Op::Clc => self.st.rflags &= !CF,
            Op::Stc => self.st.rflags |= CF,
            Op::Cmc => self.st.rflags ^= CF,
            Op::Cld => self.st.rflags &= !DF,
            Op::Std => self.st.rflags |= DF,
            Op::Nop | Op::Pause => {}
            Op::Pushf { size } => self.pushf(size)?,
            Op::Popf { size } => return self.popf(size),
            Op::Cli => self.cli()?,
            Op::Sti => return self.sti(at),
            Op::Cmpxchg { size, ref dst, src } => self.cmpxchg(size, dst, src)?,
            Op::Xadd { size, ref dst, src } => {
                let d = self.dst(dst, size, 0)?;
                let a = self.load(d, size)?;
                let (sum, f) = alu::alu(AluOp::Add, size, a, self.reg(src), fl);
                match d {
                    Loc::Mem(_) => {
                        self.store(d, sum)?;
                        self.set_reg(src, a);
                    }
                    // SRC = old DEST, then DEST = sum (one register: the sum).
                    Loc::Reg(r) => {
                        self.set_reg(src, a);
                        self.set_reg(r, sum);
                    }
                }
                self.st.rflags = f;
            }
            Op::Leave { size } => self.leave(size)?,
            Op::Bswap { dst } => {
                let v = self.reg(dst);
                let r = match dst.size {
                    Size::S8 => v.swap_bytes(),
                    _ => u64::from((v as u32).swap_bytes()),
                };
                self.set_reg(dst, r);
            }
            Op::MulWide {
                signed,
                size,
                ref src,
            } => {
                let b = self.read(src, size)?;
                let (lo, hi, f) = alu::mul_wide(signed, size, self.st.gpr[0], b, fl);
                if size == Size::S1 {
                    write_gpr(&mut self.st.gpr[0], Size::S2, (hi << 8) | lo);
                } else {
                    write_gpr(&mut self.st.gpr[0], size, lo);
                    write_gpr(&mut self.st.gpr[RDX as usize], size, hi);
                }
                self.st.rflags = f;
            }
            Op::Jmp { target } => return self.jmp(target),
            Op::Jcc { cond: c, target } => return self.jcc(c, target),
            Op::Loop {
                kind,
                addr_size,
                target,
            } => return self.loop_(kind, addr_size, target),
            Op::Call { size, ret, target } => return self.call(size, ret, target),
            Op::CallIndirect { size, ref src, ret } => {
                return self.call_indirect(at, size, src, ret)
            }
            Op::JmpIndirect { size, ref src } => return self.jmp_indirect(at, size, src),
            Op::Ret { size, pop } => return self.ret(at, size, pop),
            // ---- exiting instructions (exiting.rs) ----
            Op::In { size, port } => return self.io_in(size, port),
            Op::Out { size, port } => return self.io_out(size, port),
            Op::Ins {
                size,
                addr_size,
                rep,
            } => return self.string_io(true, size, addr_size, rep, Seg::Es),
            Op::Outs {
                size,
                addr_size,
                rep,
                seg,
            } => return self.outs(size, addr_size, rep, seg),
            Op::Rdmsr => return self.rdmsr(),
            Op::Wrmsr => return self.wrmsr(),
            Op::Cpuid => return self.cpuid(),
            Op::MovToCr { cr, src } => return self.mov_to_cr(cr, src),
            Op::MovFromCr { cr, dst } => return self.mov_from_cr(cr, dst),
            Op::Clts => return self.clts(),
            Op::Lmsw { ref src } => return self.lmsw(src),
            Op::Rdtsc => return self.rdtsc(false),
            Op::Rdtscp => return self.rdtsc(true),
            Op::Rdpmc => return Err(StopReason::Unsupported),
            Op::Xgetbv => return self.xgetbv(),
            Op::Xsetbv => return self.xsetbv(),
            Op::Wbinvd | Op::Invd => self.cpl0()?,
            Op::Invlpg { .. } => return self.invlpg(),
            Op::Hlt => {
                self.cpl0()?;
                return Err(StopReason::Hlt);
            }
        }
        Ok(Flow::Next)
    }

    /// CMPXCHG: a memory destination is written either way (with its own value
    /// when unequal), so it needs write access even when the comparison fails.
    fn cmpxchg(&mut self, size: Size, dst: &Operand, src: RegRef) -> R<()> {
        let d = self.dst(dst, size, 0)?;
        let cur = self.load(d, size)?;
        let acc = self.st.gpr[0] & size.mask();
        let (_, f) = alu::alu(AluOp::Cmp, size, acc, cur, self.st.rflags);
        if acc == cur {
            self.store(d, self.reg(src))?;
        } else {
            if let Loc::Mem(_) = d {
                self.store(d, cur)?;
            }
            write_gpr(&mut self.st.gpr[0], size, cur);
        }
        self.st.rflags = f;
        Ok(())
    }

    /// LEAVE: the stack pointer (at the stack width) takes the frame pointer, then
    /// the frame pointer is popped at `size`; a fault leaves both unchanged.
    fn leave(&mut self, size: Size) -> R<()> {
        let ss = self.stack_size();
        let sp = self.st.gpr[RBP as usize] & ss.mask();
        let la = self.seg_linear(Seg::Ss, sp, size.bytes(), false)?;
        let span = self.xlate(la, size.bytes(), Access::Read)?;
        let v = self.read_span(span)?;
        let new_sp = sp.wrapping_add(u64::from(size.bytes())) & ss.mask();
        write_gpr(&mut self.st.gpr[RSP as usize], ss, new_sp);
        write_gpr(&mut self.st.gpr[RBP as usize], size, v);
        Ok(())
    }

    fn set_flags(&mut self, f: u64) {
        self.st.rflags = f;
    }

    fn bit(&mut self, op: BitOp, size: Size, dst: &Operand, bit: &Operand) -> R<()> {
        let bits = size.bits() as u64;
        let (off, extra) = match bit {
            Operand::Imm(v) => (*v & (bits - 1), 0),
            Operand::Reg(r) => {
                let raw = self.reg(*r) & size.mask();
                match dst {
                    Operand::Mem(_) => {
                        let s = sext(raw, size) as i64;
                        let words = s >> size.bits().trailing_zeros();
                        (
                            raw & (bits - 1),
                            (words as u64).wrapping_mul(size.bytes() as u64),
                        )
                    }
                    _ => (raw & (bits - 1), 0),
                }
            }
            Operand::Mem(_) => return Err(StopReason::Invalid(Invalid::Operand(0))),
        };
        let access = if op == BitOp::Bt {
            Access::Read
        } else {
            Access::Write
        };
        let loc = match dst {
            Operand::Reg(r) => Loc::Reg(*r),
            Operand::Mem(m) => Loc::Mem(self.mem_span(m, size, extra, access)?),
            Operand::Imm(_) => return Err(StopReason::Invalid(Invalid::Operand(0))),
        };
        let v = self.load(loc, size)?;
        let cf = (v >> off) & 1;
        let nv = match op {
            BitOp::Bt => v,
            BitOp::Bts => v | (1 << off),
            BitOp::Btr => v & !(1 << off),
            BitOp::Btc => v ^ (1 << off),
        };
        if op != BitOp::Bt {
            self.store(loc, nv)?;
        }
        self.st.rflags = (self.st.rflags & !CF) | cf;
        Ok(())
    }
}
