//! Random instructions: every legacy form iced knows for the IR's mnemonics in the
//! case's code size, with random registers, immediates and memory operands aimed at
//! the data buffer through the segment and address size a case category asks for.

use super::flags::analyze;
use super::native::{gpr, Segs, BUF_SIZE, GUARD_PAGE, RO_PAGE};
use super::{Mode, Spec, R15_OFF};
use iced_x86::{
    Code, Encoder, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind as K, Register,
};

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// Interesting 64-bit values: edges, small numbers, random bits.
    pub fn value(&mut self) -> u64 {
        match self.below(8) {
            0 => [0, 1, u64::MAX, 0x80, 0x7f, 0x8000, 0x7fff_ffff, 0x8000_0000]
                [self.below(8) as usize],
            1 => 1u64 << self.below(64),
            2 => self.below(64),
            3 => (self.next() as i8) as i64 as u64,
            _ => self.next(),
        }
    }
}

/// Register `i` of `size` bytes in `mode` (8-bit 4..=7 are AH..BH without REX).
pub fn reg_of(mode: Mode, size: u32, i: u64) -> Register {
    if mode != Mode::M64 && size == 1 {
        return Register::try_from(Register::AL as usize + i as usize).unwrap();
    }
    gpr(size, i)
}

/// Where a world's code and data are, as its sequences address them.
#[derive(Clone, Copy)]
pub struct Place {
    pub mode: Mode,
    /// Linear address of the data buffer.
    pub buf: u64,
    /// Address of the sequence (IP in 16-bit code).
    pub seq_ip: u64,
    pub segs: Segs,
}

/// What a case's memory operands and registers may be.
#[derive(Clone, Copy, Default)]
pub struct Opts {
    /// FS/GS overrides (two operands in three).
    pub segs: bool,
    /// The other address size (0x67) for three operands in four.
    pub alt_addr: bool,
    /// Value of the base register (its low 32 bits in 32-bit addressing).
    pub base_val: u64,
    /// Every data operand straddles a page boundary.
    pub split: bool,
    /// Some operands fault (guard page, read-only page, segment limit).
    pub fault: bool,
    /// Moffs MOV (A0-A3) for one instruction in two.
    pub moffs: bool,
    /// Branches only LOOP/JCXZ forms, one instruction in three.
    pub jcxz: bool,
    /// Full registers (bit per index) never written, beyond the mode's own.
    pub protect: u32,
}

pub struct Gen {
    pub mode: Mode,
    pub place: Place,
    codes: Vec<Code>,
    branch_codes: Vec<Code>,
    loop_codes: Vec<Code>,
    moffs_codes: Vec<Code>,
}

impl Gen {
    pub fn new(place: Place) -> Gen {
        let mode = place.mode;
        let (mut codes, mut branch_codes, mut loop_codes, mut moffs_codes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for c in Code::values() {
            let oc = c.op_code();
            let in_mode = match mode {
                Mode::M64 => oc.mode64(),
                Mode::M32 => oc.mode32(),
                Mode::M16 => oc.mode16(),
            };
            if !oc.is_instruction() || !in_mode || oc.encoding() != iced_x86::EncodingKind::Legacy {
                continue;
            }
            let m = c.mnemonic();
            let kinds: Vec<K> = (0..oc.op_count()).map(|i| oc.op_kind(i)).collect();
            if branch_ok(m) {
                // Near relative branches that keep (E/R)IP: in 32-bit code a 16-bit
                // operand would truncate EIP and leave the sequence.
                let br = match mode {
                    Mode::M64 => matches!(kinds[0], K::br64_1 | K::br64_4),
                    Mode::M32 => matches!(kinds[0], K::br32_1 | K::br32_4),
                    Mode::M16 => matches!(kinds[0], K::br16_1 | K::br16_2 | K::br32_1 | K::br32_4),
                };
                if kinds.len() == 1 && br {
                    branch_codes.push(c);
                    if matches!(
                        m,
                        Mnemonic::Loop
                            | Mnemonic::Loope
                            | Mnemonic::Loopne
                            | Mnemonic::Jcxz
                            | Mnemonic::Jecxz
                            | Mnemonic::Jrcxz
                    ) {
                        loop_codes.push(c);
                    }
                }
                continue;
            }
            if mnemonic_ok(m)
                && kinds
                    .iter()
                    .all(|&k| kind_ok(k) && (mode == Mode::M64 || !is64(k)))
            {
                // NOP with operands (0F 1F /0) is a hint, not in the IR's set.
                if m == Mnemonic::Nop && !kinds.is_empty() {
                    continue;
                }
                if kinds.contains(&K::mem_offs) {
                    moffs_codes.push(c);
                }
                codes.push(c);
            }
        }
        Gen {
            mode,
            place,
            codes,
            branch_codes,
            loop_codes,
            moffs_codes,
        }
    }

    pub fn form_count(&self) -> usize {
        self.codes.len()
    }

    /// Full-register bit mask of what no instruction may write.
    pub fn protected(&self, o: &Opts) -> u32 {
        self.mode
            .protected()
            .iter()
            .fold(o.protect, |m, &r| m | 1 << r)
    }

    fn reg_for(&self, rng: &mut Rng, o: &Opts, size: u32, dst: bool) -> Register {
        let prot = self.protected(o);
        loop {
            let (r, full) = if self.mode == Mode::M64 {
                let i = rng.below(if size == 1 { 20 } else { 16 });
                if size == 1 && i >= 16 {
                    let hi = [Register::AH, Register::CH, Register::DH, Register::BH];
                    (hi[i as usize - 16], i - 16)
                } else {
                    (gpr(size, i), i)
                }
            } else {
                let i = rng.below(8);
                let full = if size == 1 { i & 3 } else { i };
                (reg_of(self.mode, size, i), full)
            };
            if dst && prot & (1 << full) != 0 {
                continue;
            }
            return r;
        }
    }

    /// Offset in the buffer a data operand aims at.
    fn target(&self, rng: &mut Rng, o: &Opts) -> u64 {
        if o.fault && rng.chance(1, 3) {
            let page = if rng.chance(1, 2) {
                GUARD_PAGE
            } else {
                RO_PAGE
            };
            return page * 4096 + rng.below(4096 - 600);
        }
        if o.split || rng.chance(1, 3) {
            // Straddling (for some sizes) one of the boundaries between data pages.
            return 4096 * (1 + rng.below(4)) - 8 + rng.below(16);
        }
        64 + rng.below(BUF_SIZE as u64 - 1024 - 64)
    }

    fn seg_base(&self, seg: Register) -> u64 {
        let s = &self.place.segs;
        match seg {
            Register::FS => s.fs,
            Register::GS => s.gs,
            _ => s.ds,
        }
    }

    /// A memory operand reaching buffer offset `t` (plus the small index).
    pub fn mem(&self, rng: &mut Rng, o: &Opts) -> MemoryOperand {
        let mode = self.mode;
        let stack_ok = mode != Mode::M16 && !(o.alt_addr && mode == Mode::M32);
        if stack_ok && !o.split && rng.chance(1, 8) {
            let d = rng.below(512) as i64 - 256;
            let sp = gpr(mode.bits() / 8, 4);
            return MemoryOperand::with_base_displ_size(sp, d, disp_size(d, 4));
        }
        let t = self.target(rng, o);
        let lin = self.place.buf + t;
        let alt = o.alt_addr && rng.chance(3, 4);
        let addr_bits = match (mode, alt) {
            (Mode::M64, false) => 64,
            (Mode::M64, true) | (Mode::M32, false) | (Mode::M16, true) => 32,
            (Mode::M32, true) | (Mode::M16, false) => 16,
        };
        let mut seg = if o.segs && rng.chance(2, 3) {
            if rng.chance(1, 2) {
                Register::FS
            } else {
                Register::GS
            }
        } else {
            Register::None
        };
        if mode == Mode::M32 && addr_bits == 16 {
            // DS is flat: 16-bit offsets reach the buffer only through GS.
            seg = Register::GS;
        }
        let sb = self.seg_base(seg);
        let rel = lin.wrapping_sub(sb);
        let mk = |b, i, s, d, ds| MemoryOperand::new(b, i, s, d, ds, false, seg);
        let scale = 1 << rng.below(4);
        match addr_bits {
            64 => {
                let base = gpr(8, mode.base());
                let index = gpr(8, mode.index());
                if seg == Register::None {
                    let rip_rel =
                        (lin as i64 - self.place.seq_ip as i64).unsigned_abs() < 0x7000_0000;
                    if rip_rel && rng.chance(1, 8) {
                        return MemoryOperand::with_base_displ(Register::RIP, lin as i64);
                    }
                    let d = lin.wrapping_sub(o.base_val) as i64;
                    return if rng.chance(1, 2) {
                        mk(base, index, scale, d, disp_size(d, 4))
                    } else {
                        mk(base, Register::None, 1, d, disp_size(d, 4))
                    };
                }
                // FS/GS: no base register, the segment base does the work.
                let d = rel as i64;
                if i32::try_from(d).is_err() {
                    return self.mem(rng, &Opts { segs: false, ..*o });
                }
                if rng.chance(1, 2) {
                    mk(Register::None, index, scale, d, 4)
                } else {
                    // displ_size 8: a 64-bit [disp32] (4 would mean a 0x67 prefix).
                    mk(Register::None, Register::None, 1, d, 8)
                }
            }
            32 => {
                let base = gpr(4, mode.base());
                let index = gpr(4, mode.index());
                if mode == Mode::M64 && rel >> 32 != 0 {
                    // The segment base is above the buffer: 32-bit offsets cannot
                    // reach it (the 64-bit linear sum does not wrap at 4G).
                    return self.mem(rng, &Opts { segs: false, ..*o });
                }
                let mut rel = rel;
                if mode == Mode::M16 && o.fault && rng.chance(1, 4) {
                    // Beyond the 64K limit of the 16-bit data segments: #GP.
                    rel = 0x1_0000 + rng.below(0x100);
                }
                let d = (rel.wrapping_sub(o.base_val) as u32) as i32 as i64;
                match rng.below(3) {
                    0 => mk(base, index, scale, d, disp_size(d, 4)),
                    1 => mk(base, Register::None, 1, d, disp_size(d, 4)),
                    _ => mk(Register::None, Register::None, 1, rel as u32 as i64, 4),
                }
            }
            _ => {
                // 16-bit forms: [base16 + index16 + disp16], [base16 + disp16], [disp16].
                let (base, index) = match mode {
                    Mode::M16 => (Register::BX, Register::SI),
                    _ => (Register::DI, Register::BP),
                };
                let mut rel = rel;
                if mode == Mode::M16 && o.fault && rng.chance(1, 6) {
                    // At the 64K limit: wider accesses cross it (#GP), a byte does
                    // not (and faults on the page above the buffer).
                    rel = 0xfffd + rng.below(3);
                }
                let b16 = o.base_val & 0xffff;
                let d = (rel.wrapping_sub(b16) as u16) as i16 as i64;
                match rng.below(3) {
                    // [bp+di] names BP first: iced wants the BP/BX register as base.
                    0 if mode == Mode::M32 => mk(index, base, 1, d, 2),
                    0 => mk(base, index, 1, d, 2),
                    1 => mk(base, Register::None, 1, d, 2),
                    _ => mk(Register::None, Register::None, 1, rel as u16 as i64, 2),
                }
            }
        }
    }

    /// A moffs operand (absolute address, no registers).
    fn moffs(&self, rng: &mut Rng, o: &Opts) -> MemoryOperand {
        let t = self.target(rng, o);
        let seg = if o.segs && rng.chance(2, 3) {
            [Register::FS, Register::GS][rng.below(2) as usize]
        } else {
            Register::None
        };
        let alt = o.alt_addr && rng.chance(3, 4);
        let mut seg = seg;
        if self.mode == Mode::M32 && alt {
            // DS is flat: 16-bit offsets reach the buffer only through GS.
            seg = Register::GS;
        }
        if self.mode == Mode::M64
            && alt
            && (self.place.buf + t).wrapping_sub(self.seg_base(seg)) >> 32 != 0
        {
            seg = Register::None;
        }
        let rel = (self.place.buf + t).wrapping_sub(self.seg_base(seg));
        let (d, size) = match (self.mode, alt) {
            (Mode::M64, false) => (rel as i64, 8),
            (Mode::M64, true) | (Mode::M32, false) | (Mode::M16, true) => (rel as u32 as i64, 4),
            _ => (rel as u16 as i64, 2),
        };
        MemoryOperand::new(Register::None, Register::None, 1, d, size, false, seg)
    }

    /// A forward branch (LOOP/JCXZ forms only with `o.jcxz`), target filled later.
    pub fn branch(&self, rng: &mut Rng, o: &Opts) -> Option<Instruction> {
        let list = if o.jcxz && !self.loop_codes.is_empty() {
            &self.loop_codes
        } else {
            &self.branch_codes
        };
        let code = list[rng.below(list.len() as u64) as usize];
        // RCX is a loop counter the case must not disturb.
        if o.protect & 2 != 0 && self.loop_codes.contains(&code) {
            return None;
        }
        let ip = self.place.seq_ip + 0x10;
        match self.mode {
            Mode::M16 => Instruction::with_branch(code, ip & 0xffff).ok(),
            _ => Instruction::with_branch(code, ip).ok(),
        }
    }

    /// One random non-branch instruction.
    pub fn insn(&self, rng: &mut Rng, o: &Opts) -> Option<Instruction> {
        let code = if o.moffs && !self.moffs_codes.is_empty() && rng.chance(1, 2) {
            self.moffs_codes[rng.below(self.moffs_codes.len() as u64) as usize]
        } else {
            self.codes[rng.below(self.codes.len() as u64) as usize]
        };
        let oc = code.op_code();
        let m = code.mnemonic();
        let n = oc.op_count();
        let bitop = matches!(
            m,
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        );
        let prot = self.protected(o);
        let mut ops: Vec<Arg> = Vec::new();
        let mut mem_used = false;
        for i in 0..n {
            let k = oc.op_kind(i);
            // Operands written: op0 (and op1 for XCHG).
            let dst = i == 0 || matches!(m, Mnemonic::Xchg | Mnemonic::Xadd);
            let fixed = |r: Register| {
                // Implicit accumulator/count operands: refuse writes to protected ones.
                if dst && prot & (1 << r.full_register().number()) != 0 {
                    None
                } else {
                    Some(Arg::R(r))
                }
            };
            let a = match k {
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => {
                    let size = match k {
                        K::r8_or_mem => 1,
                        K::r16_or_mem => 2,
                        K::r32_or_mem => 4,
                        _ => 8,
                    };
                    if !mem_used && rng.chance(1, 2) {
                        mem_used = true;
                        Arg::M(self.mem(rng, o))
                    } else {
                        Arg::R(self.reg_for(rng, o, size, dst))
                    }
                }
                K::mem => Arg::M(self.mem(rng, o)),
                K::mem_offs => Arg::M(self.moffs(rng, o)),
                K::r8_reg | K::r8_opcode => Arg::R(self.reg_for(rng, o, 1, dst)),
                K::r16_reg | K::r16_opcode => Arg::R(self.reg_for(rng, o, 2, dst)),
                K::r32_reg | K::r32_opcode => Arg::R(self.reg_for(rng, o, 4, dst)),
                K::r64_reg | K::r64_opcode => Arg::R(self.reg_for(rng, o, 8, dst)),
                K::al => fixed(Register::AL)?,
                K::ax => fixed(Register::AX)?,
                K::eax => fixed(Register::EAX)?,
                K::rax => fixed(Register::RAX)?,
                K::cl => Arg::R(Register::CL),
                K::imm8_const_1 => Arg::I(1),
                K::imm8 => Arg::I(if rng.chance(1, 2) {
                    rng.below(80) as i64
                } else {
                    rng.below(256) as i64
                }),
                K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => Arg::I(rng.below(256) as i64 - 128),
                K::imm16 => Arg::I(rng.below(65536) as i64),
                K::imm32 | K::imm32sex64 => Arg::I(rng.value() as i32 as i64),
                K::imm64 => Arg::I64(rng.value()),
                _ => return None,
            };
            ops.push(a);
        }
        // Implicit writes: CBW.. write the accumulator, CWD.. RDX.
        let implicit = match m {
            Mnemonic::Cbw | Mnemonic::Cwde | Mnemonic::Cdqe => 1 << 0,
            Mnemonic::Cwd | Mnemonic::Cdq | Mnemonic::Cqo => 1 << 2,
            _ => 0,
        };
        if implicit & prot != 0 {
            return None;
        }
        // BT* with a memory operand and a register offset: the offset register must be
        // the small one, or the access would leave the buffer.
        if bitop && matches!(ops.first(), Some(Arg::M(_))) {
            if let Some(Arg::R(r)) = ops.get(1) {
                let size = r.size() as u32;
                ops[1] = Arg::R(reg_of(self.mode, size, self.mode.bitoff()));
            }
        }
        let instr = build(code, &ops)?;
        // Must encode (e.g. AH with a REX prefix does not).
        Encoder::new(self.mode.bits())
            .encode(&instr, self.place.seq_ip)
            .ok()?;
        Some(instr)
    }

    /// A random case: forward branches only, flags never read while undefined.
    pub fn case(&self, rng: &mut Rng, o: &Opts) -> Vec<Spec> {
        let k = 1 + rng.below(8) as usize;
        let mut specs: Vec<Spec> = Vec::with_capacity(k);
        let branch_odds = if o.jcxz { 3 } else { 8 };
        let mut tries = 0;
        while specs.len() < k && tries < 200 {
            tries += 1;
            let spec = if rng.chance(1, branch_odds) {
                let Some(instr) = self.branch(rng, o) else {
                    continue;
                };
                // Forward: to a later instruction or the end (index k).
                let t = specs.len() + 1 + rng.below((k - specs.len()) as u64) as usize;
                Spec {
                    instr,
                    target: Some(t),
                }
            } else {
                match self.insn(rng, o) {
                    Some(instr) => Spec {
                        instr,
                        target: None,
                    },
                    None => continue,
                }
            };
            specs.push(spec);
            if analyze(&specs).is_none() {
                specs.pop();
            }
        }
        // Targets beyond the final length point at the end.
        let n = specs.len();
        for s in specs.iter_mut() {
            if let Some(t) = s.target.as_mut() {
                *t = (*t).min(n);
            }
        }
        specs
    }
}

fn disp_size(d: i64, wide: u32) -> u32 {
    if (-128..128).contains(&d) {
        1
    } else {
        wide
    }
}

#[derive(Clone, Copy)]
pub enum Arg {
    R(Register),
    M(MemoryOperand),
    I(i64),
    I64(u64),
}

pub fn build(code: Code, ops: &[Arg]) -> Option<Instruction> {
    let r = match ops {
        [] => Ok(Instruction::with(code)),
        [Arg::R(r)] => Instruction::with1(code, *r),
        [Arg::M(m)] => Instruction::with1(code, *m),
        [Arg::I(i)] => Instruction::with1(code, *i as i32),
        [Arg::R(x), Arg::R(y)] => Instruction::with2(code, *x, *y),
        [Arg::R(x), Arg::M(y)] => Instruction::with2(code, *x, *y),
        [Arg::M(x), Arg::R(y)] => Instruction::with2(code, *x, *y),
        [Arg::R(x), Arg::I(y)] => Instruction::with2(code, *x, *y as i32),
        [Arg::R(x), Arg::I64(y)] => Instruction::with2(code, *x, *y),
        [Arg::M(x), Arg::I(y)] => Instruction::with2(code, *x, *y as i32),
        // Three operands: IMUL r, r/m, imm.
        [Arg::R(x), Arg::R(y), Arg::I(i)] => Instruction::with3(code, *x, *y, *i as i32),
        [Arg::R(x), Arg::M(y), Arg::I(i)] => Instruction::with3(code, *x, *y, *i as i32),
        _ => return None,
    };
    r.ok()
}

fn is64(k: K) -> bool {
    matches!(
        k,
        K::r64_or_mem
            | K::r64_reg
            | K::r64_opcode
            | K::rax
            | K::imm64
            | K::imm8sex64
            | K::imm32sex64
    )
}

fn mnemonic_ok(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Mov | Movzx
            | Movsx
            | Movsxd
            | Lea
            | Add
            | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shl
            | Sal
            | Shr
            | Sar
            | Bt
            | Bts
            | Btr
            | Btc
            | Xchg
            | Push
            | Pop
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Imul
            | Mul
            | Cmpxchg
            | Xadd
            | Bswap
            | Pushf
            | Pushfd
            | Pushfq
            | Clc
            | Stc
            | Cmc
            | Cld
            | Std
            | Nop
    )
}

fn branch_ok(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Jmp | Jo
            | Jno
            | Jb
            | Jae
            | Je
            | Jne
            | Jbe
            | Ja
            | Js
            | Jns
            | Jp
            | Jnp
            | Jl
            | Jge
            | Jle
            | Jg
            | Loop
            | Loope
            | Loopne
            | Jcxz
            | Jecxz
            | Jrcxz
    )
}

fn kind_ok(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::r8_reg
            | K::r16_reg
            | K::r32_reg
            | K::r64_reg
            | K::r8_opcode
            | K::r16_opcode
            | K::r32_opcode
            | K::r64_opcode
            | K::al
            | K::ax
            | K::eax
            | K::rax
            | K::cl
            | K::imm8
            | K::imm16
            | K::imm32
            | K::imm64
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm32sex64
            | K::imm8_const_1
            | K::mem
            | K::mem_offs
    )
}

/// Unused here; keeps `R15_OFF` tied to the generator's targets (64 + ...).
const _: () = assert!(R15_OFF >= 64);
