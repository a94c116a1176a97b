//! Lowering: one decoded x86 instruction (iced-x86) into one IR op.
//!
//! Branches lower to `Target::Exit(absolute target)`; the translator rewrites
//! targets inside its cluster to `Target::Insn(index)`.
//!
//! Conventions the engine relies on (see `ir`):
//! - Immediates are extended to 64 bits as iced defines them: sign-extended forms
//!   (`imm8` of a 16/32/64-bit operation, `imm32` of a 64-bit one) are sign-extended
//!   all the way to 64 bits, the others zero-extended. The engine truncates to `size`.
//! - Memory displacements are sign-extended from the address size, so `[ebx-4]` has
//!   `disp: -4`. RIP/EIP-relative operands become `base: None` with the absolute
//!   target address in `disp` (sign-extended from `addr_size` likewise).
//! - `Push`/`Pop` sizes are the stack slot width (2, 4 or 8).
//! - `MovToCr`/`MovFromCr` name the register by number: its width is the code's
//!   (64 bits in 64-bit code, 32 otherwise). `Lmsw` register sources are 16-bit.
//! - NOP forms, ENDBR32/64 and LFENCE/MFENCE/SFENCE lower to `Nop`.

use crate::ir::{
    AluOp, BitOp, Cond, GprIndex, LoopKind, MemRef, Op, Operand, PortSrc, RegRef, Seg, ShiftOp,
    Size, Target, UnaryOp,
};
use iced_x86::{Code, ConditionCode, Instruction, Mnemonic, OpKind, Register};

/// Why an instruction has no IR op (the translator ends a cluster before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unsupported {
    /// The engine does not implement this instruction.
    Mnemonic(iced_x86::Mnemonic),
    /// Implemented, but not with these operands or prefixes (e.g. LOCK, far forms).
    Form(iced_x86::Code),
}

impl Unsupported {
    /// The blocking instruction's mnemonic, whichever the reason.
    pub fn mnemonic(self) -> Mnemonic {
        match self {
            Unsupported::Mnemonic(m) => m,
            Unsupported::Form(code) => code.mnemonic(),
        }
    }
}

/// Lower one instruction. The bitness is the instruction's own (iced records it).
pub fn lower(instr: &Instruction) -> Result<Op, Unsupported> {
    let mnemonic = instr.mnemonic();
    if instr.is_invalid() {
        return Err(Unsupported::Mnemonic(mnemonic));
    }
    let form = Unsupported::Form(instr.code());
    // LOCK makes a read-modify-write of memory atomic against other processors and
    // devices; the engine runs one vCPU with nothing else touching its memory
    // during a run, so doing the operation is enough. Where the CPU raises #UD
    // (another instruction, a register destination) it is left to the CPU.
    if instr.has_lock_prefix() && !lockable(instr) {
        return Err(form);
    }
    let op = match mnemonic {
        Mnemonic::Mov => lower_mov(instr)?,
        Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => lower_extend(instr)?,
        Mnemonic::Lea => Op::Lea {
            dst: reg_operand(instr, 0)?,
            addr: mem_operand(instr)?,
        },

        Mnemonic::Add => alu(instr, AluOp::Add)?,
        Mnemonic::Or => alu(instr, AluOp::Or)?,
        Mnemonic::Adc => alu(instr, AluOp::Adc)?,
        Mnemonic::Sbb => alu(instr, AluOp::Sbb)?,
        Mnemonic::And => alu(instr, AluOp::And)?,
        Mnemonic::Sub => alu(instr, AluOp::Sub)?,
        Mnemonic::Xor => alu(instr, AluOp::Xor)?,
        Mnemonic::Cmp => alu(instr, AluOp::Cmp)?,
        Mnemonic::Test => alu(instr, AluOp::Test)?,

        Mnemonic::Inc => unary(instr, UnaryOp::Inc)?,
        Mnemonic::Dec => unary(instr, UnaryOp::Dec)?,
        Mnemonic::Neg => unary(instr, UnaryOp::Neg)?,
        Mnemonic::Not => unary(instr, UnaryOp::Not)?,

        Mnemonic::Rol => shift(instr, ShiftOp::Rol)?,
        Mnemonic::Ror => shift(instr, ShiftOp::Ror)?,
        Mnemonic::Rcl => shift(instr, ShiftOp::Rcl)?,
        Mnemonic::Rcr => shift(instr, ShiftOp::Rcr)?,
        // SAL is SHL's other encoding (D0-D3 /6, C0/C1 /6).
        Mnemonic::Shl | Mnemonic::Sal => shift(instr, ShiftOp::Shl)?,
        Mnemonic::Shr => shift(instr, ShiftOp::Shr)?,
        Mnemonic::Sar => shift(instr, ShiftOp::Sar)?,

        Mnemonic::Bt => bit(instr, BitOp::Bt)?,
        Mnemonic::Bts => bit(instr, BitOp::Bts)?,
        Mnemonic::Btr => bit(instr, BitOp::Btr)?,
        Mnemonic::Btc => bit(instr, BitOp::Btc)?,

        Mnemonic::Xchg => {
            expect_ops(instr, 2)?;
            Op::Xchg {
                size: operand_size(instr, 0)?,
                a: operand(instr, 0)?,
                b: operand(instr, 1)?,
            }
        }
        Mnemonic::Push => {
            expect_ops(instr, 1)?;
            Op::Push {
                size: stack_slot(instr)?,
                src: operand(instr, 0)?,
            }
        }
        Mnemonic::Pop => {
            expect_ops(instr, 1)?;
            Op::Pop {
                size: stack_slot(instr)?,
                dst: operand(instr, 0)?,
            }
        }

        Mnemonic::Seto
        | Mnemonic::Setno
        | Mnemonic::Setb
        | Mnemonic::Setae
        | Mnemonic::Sete
        | Mnemonic::Setne
        | Mnemonic::Setbe
        | Mnemonic::Seta
        | Mnemonic::Sets
        | Mnemonic::Setns
        | Mnemonic::Setp
        | Mnemonic::Setnp
        | Mnemonic::Setl
        | Mnemonic::Setge
        | Mnemonic::Setle
        | Mnemonic::Setg => {
            expect_ops(instr, 1)?;
            Op::Setcc {
                cond: cond(instr)?,
                dst: operand(instr, 0)?,
            }
        }
        Mnemonic::Cmovo
        | Mnemonic::Cmovno
        | Mnemonic::Cmovb
        | Mnemonic::Cmovae
        | Mnemonic::Cmove
        | Mnemonic::Cmovne
        | Mnemonic::Cmovbe
        | Mnemonic::Cmova
        | Mnemonic::Cmovs
        | Mnemonic::Cmovns
        | Mnemonic::Cmovp
        | Mnemonic::Cmovnp
        | Mnemonic::Cmovl
        | Mnemonic::Cmovge
        | Mnemonic::Cmovle
        | Mnemonic::Cmovg => {
            expect_ops(instr, 2)?;
            let dst = reg_operand(instr, 0)?;
            Op::Cmovcc {
                cond: cond(instr)?,
                size: dst.size,
                dst,
                src: operand(instr, 1)?,
            }
        }

        // The one-operand form (RDX:RAX result) is `MulWide` below.
        Mnemonic::Imul if matches!(instr.op_count(), 2 | 3) => {
            let dst = reg_operand(instr, 0)?;
            let factor = if instr.op_count() == 3 {
                match operand(instr, 2)? {
                    Operand::Imm(v) => Some(v),
                    _ => return Err(Unsupported::Form(instr.code())),
                }
            } else {
                None
            };
            Op::Imul {
                size: dst.size,
                dst,
                src: operand(instr, 1)?,
                factor,
            }
        }
        Mnemonic::Imul | Mnemonic::Mul => {
            expect_ops(instr, 1)?;
            Op::MulWide {
                signed: mnemonic == Mnemonic::Imul,
                size: operand_size(instr, 0)?,
                src: operand(instr, 0)?,
            }
        }
        Mnemonic::Cmpxchg | Mnemonic::Xadd => {
            expect_ops(instr, 2)?;
            let size = operand_size(instr, 0)?;
            let dst = operand(instr, 0)?;
            let src = reg_operand(instr, 1)?;
            if mnemonic == Mnemonic::Cmpxchg {
                Op::Cmpxchg { size, dst, src }
            } else {
                Op::Xadd { size, dst, src }
            }
        }
        Mnemonic::Bswap => {
            expect_ops(instr, 1)?;
            let dst = reg_operand(instr, 0)?;
            // BSWAP of a 16-bit register is undefined (SDM).
            if dst.size == Size::S2 {
                return Err(form);
            }
            Op::Bswap { dst }
        }
        Mnemonic::Leave => Op::Leave {
            size: stack_slot_of_pop(instr)?,
        },
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => Op::Pushf {
            size: stack_slot(instr)?,
        },
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => Op::Popf {
            size: stack_slot(instr)?,
        },
        Mnemonic::Cli => Op::Cli,
        Mnemonic::Sti => Op::Sti,
        Mnemonic::Cbw => Op::SignExtendAcc { size: Size::S2 },
        Mnemonic::Cwde => Op::SignExtendAcc { size: Size::S4 },
        Mnemonic::Cdqe => Op::SignExtendAcc { size: Size::S8 },
        Mnemonic::Cwd => Op::SignExtendAccToDx { size: Size::S2 },
        Mnemonic::Cdq => Op::SignExtendAccToDx { size: Size::S4 },
        Mnemonic::Cqo => Op::SignExtendAccToDx { size: Size::S8 },
        Mnemonic::Clc => Op::Clc,
        Mnemonic::Stc => Op::Stc,
        Mnemonic::Cmc => Op::Cmc,
        Mnemonic::Cld => Op::Cld,
        Mnemonic::Std => Op::Std,
        // NOP forms (90, 0F 1F /0 with its never-accessed memory operand, reserved
        // NOPs), ENDBR (a NOP when not reached by an indirect branch, and branches
        // inside a cluster are direct) and fences (a single in-order interpreter has
        // nothing to order).
        Mnemonic::Nop
        | Mnemonic::Endbr32
        | Mnemonic::Endbr64
        | Mnemonic::Lfence
        | Mnemonic::Mfence
        | Mnemonic::Sfence => Op::Nop,

        Mnemonic::Jmp => match instr.op0_kind() {
            OpKind::Register | OpKind::Memory => Op::JmpIndirect {
                size: branch_size(instr)?,
                src: operand(instr, 0)?,
            },
            _ => Op::Jmp {
                target: near_target(instr)?,
            },
        },
        Mnemonic::Call => {
            let size = branch_size(instr)?;
            let ret = instr.next_ip();
            match instr.op0_kind() {
                OpKind::Register | OpKind::Memory => Op::CallIndirect {
                    size,
                    src: operand(instr, 0)?,
                    ret,
                },
                _ => Op::Call {
                    size,
                    ret,
                    target: near_target(instr)?,
                },
            }
        }
        Mnemonic::Ret => Op::Ret {
            size: branch_size(instr)?,
            pop: match instr.op_count() {
                0 => 0,
                1 if instr.op0_kind() == OpKind::Immediate16 => instr.immediate16(),
                _ => return Err(form),
            },
        },
        Mnemonic::Jo
        | Mnemonic::Jno
        | Mnemonic::Jb
        | Mnemonic::Jae
        | Mnemonic::Je
        | Mnemonic::Jne
        | Mnemonic::Jbe
        | Mnemonic::Ja
        | Mnemonic::Js
        | Mnemonic::Jns
        | Mnemonic::Jp
        | Mnemonic::Jnp
        | Mnemonic::Jl
        | Mnemonic::Jge
        | Mnemonic::Jle
        | Mnemonic::Jg => Op::Jcc {
            cond: cond(instr)?,
            target: near_target(instr)?,
        },
        Mnemonic::Loop
        | Mnemonic::Loope
        | Mnemonic::Loopne
        | Mnemonic::Jcxz
        | Mnemonic::Jecxz
        | Mnemonic::Jrcxz => lower_loop(instr)?,

        Mnemonic::In => {
            expect_ops(instr, 2)?;
            Op::In {
                size: accumulator_size(instr, 0)?,
                port: port_operand(instr, 1)?,
            }
        }
        Mnemonic::Out => {
            expect_ops(instr, 2)?;
            Op::Out {
                size: accumulator_size(instr, 1)?,
                port: port_operand(instr, 0)?,
            }
        }
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => {
            // REPNE on INS is not architecturally defined; leave it to hardware.
            if instr.has_repne_prefix() {
                return Err(form);
            }
            Op::Ins {
                size: string_element_size(mnemonic),
                addr_size: string_addr_size(instr.op0_kind()).ok_or(form)?,
                rep: instr.has_rep_prefix(),
            }
        }
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => {
            if instr.has_repne_prefix() {
                return Err(form);
            }
            Op::Outs {
                size: string_element_size(mnemonic),
                addr_size: string_addr_size(instr.op1_kind()).ok_or(form)?,
                rep: instr.has_rep_prefix(),
                seg: seg_of(instr.memory_segment()).ok_or(form)?,
            }
        }

        Mnemonic::Rdmsr => Op::Rdmsr,
        Mnemonic::Wrmsr => Op::Wrmsr,
        Mnemonic::Cpuid => Op::Cpuid,
        Mnemonic::Clts => Op::Clts,
        Mnemonic::Lmsw => {
            expect_ops(instr, 1)?;
            // LMSW reads a 16-bit source; iced names the register form's register at
            // the operand size (EAX for `0F 01 F0` in 32-bit code).
            let src = match operand(instr, 0)? {
                Operand::Reg(r) if !r.high8 => Operand::Reg(RegRef {
                    size: Size::S2,
                    ..r
                }),
                Operand::Mem(m) => Operand::Mem(m),
                _ => return Err(form),
            };
            Op::Lmsw { src }
        }
        Mnemonic::Rdtsc => Op::Rdtsc,
        Mnemonic::Rdtscp => Op::Rdtscp,
        Mnemonic::Rdpmc => Op::Rdpmc,
        Mnemonic::Xgetbv => Op::Xgetbv,
        Mnemonic::Xsetbv => Op::Xsetbv,
        Mnemonic::Wbinvd => Op::Wbinvd,
        Mnemonic::Invd => Op::Invd,
        Mnemonic::Invlpg => Op::Invlpg {
            addr: mem_operand(instr)?,
        },
        Mnemonic::Pause => Op::Pause,
        Mnemonic::Hlt => Op::Hlt,

        _ => return Err(Unsupported::Mnemonic(mnemonic)),
    };
    Ok(op)
}

fn lower_mov(instr: &Instruction) -> Result<Op, Unsupported> {
    expect_ops(instr, 2)?;
    let form = Unsupported::Form(instr.code());
    let register = |i: u32| (instr.op_kind(i) == OpKind::Register).then(|| instr.op_register(i));
    if let Some(cr) = register(0).filter(|r| r.is_cr()) {
        let src = register(1).and_then(gpr_index).ok_or(form)?;
        return Ok(Op::MovToCr {
            cr: cr_index(cr).ok_or(form)?,
            src,
        });
    }
    if let Some(cr) = register(1).filter(|r| r.is_cr()) {
        let dst = register(0).and_then(gpr_index).ok_or(form)?;
        return Ok(Op::MovFromCr {
            cr: cr_index(cr).ok_or(form)?,
            dst,
        });
    }
    // Debug and segment registers are rejected by `operand`.
    Ok(Op::Mov {
        size: operand_size(instr, 0)?,
        dst: operand(instr, 0)?,
        src: operand(instr, 1)?,
    })
}

/// MOVZX, MOVSX, MOVSXD. MOVSXD whose source is as wide as its destination (16- or
/// 32-bit destination) is a plain move.
fn lower_extend(instr: &Instruction) -> Result<Op, Unsupported> {
    expect_ops(instr, 2)?;
    let dst = reg_operand(instr, 0)?;
    let src = operand(instr, 1)?;
    let src_size = operand_size(instr, 1)?;
    if src_size.bytes() >= dst.size.bytes() {
        return Ok(Op::Mov {
            size: dst.size,
            dst: Operand::Reg(dst),
            src,
        });
    }
    Ok(match instr.mnemonic() {
        Mnemonic::Movzx => Op::Movzx { dst, src, src_size },
        _ => Op::Movsx { dst, src, src_size },
    })
}

fn lower_loop(instr: &Instruction) -> Result<Op, Unsupported> {
    let form = Unsupported::Form(instr.code());
    let (kind, addr_size) = match instr.code() {
        Code::Loop_rel8_16_CX | Code::Loop_rel8_32_CX => (LoopKind::Loop, Size::S2),
        Code::Loop_rel8_16_ECX | Code::Loop_rel8_32_ECX | Code::Loop_rel8_64_ECX => {
            (LoopKind::Loop, Size::S4)
        }
        Code::Loop_rel8_16_RCX | Code::Loop_rel8_64_RCX => (LoopKind::Loop, Size::S8),
        Code::Loope_rel8_16_CX | Code::Loope_rel8_32_CX => (LoopKind::Loope, Size::S2),
        Code::Loope_rel8_16_ECX | Code::Loope_rel8_32_ECX | Code::Loope_rel8_64_ECX => {
            (LoopKind::Loope, Size::S4)
        }
        Code::Loope_rel8_16_RCX | Code::Loope_rel8_64_RCX => (LoopKind::Loope, Size::S8),
        Code::Loopne_rel8_16_CX | Code::Loopne_rel8_32_CX => (LoopKind::Loopne, Size::S2),
        Code::Loopne_rel8_16_ECX | Code::Loopne_rel8_32_ECX | Code::Loopne_rel8_64_ECX => {
            (LoopKind::Loopne, Size::S4)
        }
        Code::Loopne_rel8_16_RCX | Code::Loopne_rel8_64_RCX => (LoopKind::Loopne, Size::S8),
        Code::Jcxz_rel8_16 | Code::Jcxz_rel8_32 => (LoopKind::Jcxz, Size::S2),
        Code::Jecxz_rel8_16 | Code::Jecxz_rel8_32 | Code::Jecxz_rel8_64 => {
            (LoopKind::Jcxz, Size::S4)
        }
        Code::Jrcxz_rel8_16 | Code::Jrcxz_rel8_64 => (LoopKind::Jcxz, Size::S8),
        _ => return Err(form),
    };
    Ok(Op::Loop {
        kind,
        addr_size,
        target: near_target(instr)?,
    })
}

fn alu(instr: &Instruction, op: AluOp) -> Result<Op, Unsupported> {
    expect_ops(instr, 2)?;
    Ok(Op::Alu {
        op,
        size: operand_size(instr, 0)?,
        dst: operand(instr, 0)?,
        src: operand(instr, 1)?,
    })
}

fn unary(instr: &Instruction, op: UnaryOp) -> Result<Op, Unsupported> {
    expect_ops(instr, 1)?;
    Ok(Op::Unary {
        op,
        size: operand_size(instr, 0)?,
        dst: operand(instr, 0)?,
    })
}

/// Shifts and rotates by an immediate (iced gives the `D1 /x` "by 1" forms an
/// immediate 1) or by CL.
fn shift(instr: &Instruction, op: ShiftOp) -> Result<Op, Unsupported> {
    expect_ops(instr, 2)?;
    let count = operand(instr, 1)?;
    if let Operand::Reg(r) = count {
        if r.index != crate::ir::RCX || r.size != Size::S1 || r.high8 {
            return Err(Unsupported::Form(instr.code()));
        }
    }
    Ok(Op::Shift {
        op,
        size: operand_size(instr, 0)?,
        dst: operand(instr, 0)?,
        count,
    })
}

fn bit(instr: &Instruction, op: BitOp) -> Result<Op, Unsupported> {
    expect_ops(instr, 2)?;
    Ok(Op::Bit {
        op,
        size: operand_size(instr, 0)?,
        dst: operand(instr, 0)?,
        bit: operand(instr, 1)?,
    })
}

/// Whether a LOCK prefix is valid on this instruction (SDM LOCK): one of the
/// lockable read-modify-writes, with a memory destination.
fn lockable(instr: &Instruction) -> bool {
    use Mnemonic as M;
    matches!(
        instr.mnemonic(),
        M::Add
            | M::Adc
            | M::And
            | M::Btc
            | M::Btr
            | M::Bts
            | M::Cmpxchg
            | M::Dec
            | M::Inc
            | M::Neg
            | M::Not
            | M::Or
            | M::Sbb
            | M::Sub
            | M::Xor
            | M::Xadd
            | M::Xchg
    ) && instr.op_count() >= 1
        && instr.op0_kind() == OpKind::Memory
}

/// LEAVE's pop width: its operand size (iced names the forms by it).
fn stack_slot_of_pop(instr: &Instruction) -> Result<Size, Unsupported> {
    match instr.code() {
        Code::Leavew => Ok(Size::S2),
        Code::Leaved => Ok(Size::S4),
        Code::Leaveq => Ok(Size::S8),
        _ => Err(Unsupported::Form(instr.code())),
    }
}

fn expect_ops(instr: &Instruction, count: u32) -> Result<(), Unsupported> {
    if instr.op_count() == count {
        Ok(())
    } else {
        Err(Unsupported::Form(instr.code()))
    }
}

fn size_from_bytes(bytes: usize) -> Option<Size> {
    match bytes {
        1 => Some(Size::S1),
        2 => Some(Size::S2),
        4 => Some(Size::S4),
        8 => Some(Size::S8),
        _ => None,
    }
}

/// A general-purpose register as a `RegRef`; `None` for every other register.
fn gpr(reg: Register) -> Option<RegRef> {
    if !reg.is_gpr() {
        return None;
    }
    let high8 = matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    );
    Some(RegRef {
        index: gpr_index(reg)?,
        size: size_from_bytes(reg.size())?,
        high8,
    })
}

/// The hardware number of the 64-bit register a GPR belongs to (AH -> 0, SIL -> 6).
pub(crate) fn gpr_index(reg: Register) -> Option<GprIndex> {
    if !reg.is_gpr() {
        return None;
    }
    GprIndex::try_from(reg.full_register().number())
        .ok()
        .filter(|&n| n < 16)
}

fn cr_index(reg: Register) -> Option<u8> {
    match reg {
        Register::CR0 => Some(0),
        Register::CR2 => Some(2),
        Register::CR3 => Some(3),
        Register::CR4 => Some(4),
        Register::CR8 => Some(8),
        _ => None,
    }
}

fn seg_of(reg: Register) -> Option<Seg> {
    match reg {
        Register::ES => Some(Seg::Es),
        Register::CS => Some(Seg::Cs),
        Register::SS => Some(Seg::Ss),
        Register::DS => Some(Seg::Ds),
        Register::FS => Some(Seg::Fs),
        Register::GS => Some(Seg::Gs),
        _ => None,
    }
}

/// Operand `i` as an IR operand: a GPR, an immediate or an explicit memory operand.
fn operand(instr: &Instruction, i: u32) -> Result<Operand, Unsupported> {
    let form = Unsupported::Form(instr.code());
    match instr.op_kind(i) {
        OpKind::Register => gpr(instr.op_register(i)).map(Operand::Reg).ok_or(form),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => instr.try_immediate(i).map(Operand::Imm).map_err(|_| form),
        OpKind::Memory => mem_operand(instr).map(Operand::Mem),
        _ => Err(form),
    }
}

fn reg_operand(instr: &Instruction, i: u32) -> Result<RegRef, Unsupported> {
    match operand(instr, i)? {
        Operand::Reg(r) => Ok(r),
        _ => Err(Unsupported::Form(instr.code())),
    }
}

/// Width of operand `i`: the register's, or the memory operand's access size.
fn operand_size(instr: &Instruction, i: u32) -> Result<Size, Unsupported> {
    let bytes = match instr.op_kind(i) {
        OpKind::Register => instr.op_register(i).size(),
        OpKind::Memory => instr.memory_size().size(),
        _ => 0,
    };
    size_from_bytes(bytes).ok_or(Unsupported::Form(instr.code()))
}

/// The instruction's explicit memory operand.
fn mem_operand(instr: &Instruction) -> Result<MemRef, Unsupported> {
    let form = Unsupported::Form(instr.code());
    if !(0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Memory) {
        return Err(form);
    }
    let seg = seg_of(instr.memory_segment()).ok_or(form)?;
    let base_reg = instr.memory_base();
    let index_reg = instr.memory_index();
    let index = match index_reg {
        Register::None => None,
        r => Some(gpr_index(r).ok_or(form)?),
    };
    // The address size: the base's or index's width, else (absolute addresses) the
    // displacement's width, which iced records as 2, 4 or 8 for 16-, 32- and 64-bit
    // addressing.
    let addr_size = match (base_reg, index_reg) {
        (Register::RIP, _) => Size::S8,
        (Register::EIP, _) => Size::S4,
        (Register::None, Register::None) => match instr.memory_displ_size() {
            2 => Size::S2,
            4 => Size::S4,
            8 => Size::S8,
            _ => return Err(form),
        },
        (Register::None, r) | (r, _) => size_from_bytes(r.size()).ok_or(form)?,
    };
    if !matches!(addr_size, Size::S2 | Size::S4 | Size::S8) {
        return Err(form);
    }
    let (base, raw_disp) = match base_reg {
        // The instruction's address is fixed in a translation: resolve to absolute.
        Register::RIP | Register::EIP => (None, instr.ip_rel_memory_address()),
        Register::None => (None, instr.memory_displacement64()),
        r => (
            Some(gpr_index(r).ok_or(form)?),
            instr.memory_displacement64(),
        ),
    };
    let disp = match addr_size {
        Size::S2 => i64::from(raw_disp as u16 as i16),
        Size::S4 => i64::from(raw_disp as u32 as i32),
        _ => raw_disp as i64,
    };
    let scale = match instr.memory_index_scale() {
        s @ (1 | 2 | 4 | 8) => s as u8,
        _ => return Err(form),
    };
    Ok(MemRef {
        seg,
        base,
        index,
        scale,
        disp,
        addr_size,
    })
}

/// Push/pop slot width from the stack pointer change (2, 4 or 8 bytes).
fn stack_slot(instr: &Instruction) -> Result<Size, Unsupported> {
    size_from_bytes(instr.stack_pointer_increment().unsigned_abs() as usize)
        .filter(|s| *s != Size::S1)
        .ok_or(Unsupported::Form(instr.code()))
}

fn cond(instr: &Instruction) -> Result<Cond, Unsupported> {
    Ok(match instr.condition_code() {
        ConditionCode::o => Cond::O,
        ConditionCode::no => Cond::No,
        ConditionCode::b => Cond::B,
        ConditionCode::ae => Cond::Ae,
        ConditionCode::e => Cond::E,
        ConditionCode::ne => Cond::Ne,
        ConditionCode::be => Cond::Be,
        ConditionCode::a => Cond::A,
        ConditionCode::s => Cond::S,
        ConditionCode::ns => Cond::Ns,
        ConditionCode::p => Cond::P,
        ConditionCode::np => Cond::Np,
        ConditionCode::l => Cond::L,
        ConditionCode::ge => Cond::Ge,
        ConditionCode::le => Cond::Le,
        ConditionCode::g => Cond::G,
        _ => return Err(Unsupported::Form(instr.code())),
    })
}

/// A near relative branch's absolute target (iced truncates it to the operand size).
/// Indirect and far branches are not lowered.
fn near_target(instr: &Instruction) -> Result<Target, Unsupported> {
    match instr.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            if instr.op_count() == 1 =>
        {
            Ok(Target::Exit(instr.near_branch_target()))
        }
        _ => Err(Unsupported::Form(instr.code())),
    }
}

/// The width of a near CALL, RET or indirect JMP: what it pushes, pops or reads.
/// In 64-bit code only the 64-bit forms are taken (Intel ignores an operand-size
/// prefix there where AMD honours it, so a 16-bit form would run differently).
fn branch_size(instr: &Instruction) -> Result<Size, Unsupported> {
    use Code as C;
    let size = match instr.code() {
        C::Call_rel16 | C::Call_rm16 | C::Jmp_rm16 | C::Retnw | C::Retnw_imm16 => Size::S2,
        C::Call_rel32_32 | C::Call_rm32 | C::Jmp_rm32 | C::Retnd | C::Retnd_imm16 => Size::S4,
        C::Call_rel32_64 | C::Call_rm64 | C::Jmp_rm64 | C::Retnq | C::Retnq_imm16 => Size::S8,
        _ => return Err(Unsupported::Form(instr.code())),
    };
    if instr.code_size() == iced_x86::CodeSize::Code64 && size != Size::S8 {
        return Err(Unsupported::Form(instr.code()));
    }
    Ok(size)
}

/// IN/OUT access size: the accumulator operand `i` (AL, AX or EAX).
fn accumulator_size(instr: &Instruction, i: u32) -> Result<Size, Unsupported> {
    match (instr.op_kind(i), instr.op_register(i)) {
        (OpKind::Register, Register::AL) => Ok(Size::S1),
        (OpKind::Register, Register::AX) => Ok(Size::S2),
        (OpKind::Register, Register::EAX) => Ok(Size::S4),
        _ => Err(Unsupported::Form(instr.code())),
    }
}

fn port_operand(instr: &Instruction, i: u32) -> Result<PortSrc, Unsupported> {
    match (instr.op_kind(i), instr.op_register(i)) {
        (OpKind::Immediate8, _) => Ok(PortSrc::Imm(instr.immediate8())),
        (OpKind::Register, Register::DX) => Ok(PortSrc::Dx),
        _ => Err(Unsupported::Form(instr.code())),
    }
}

fn string_element_size(mnemonic: Mnemonic) -> Size {
    match mnemonic {
        Mnemonic::Insb | Mnemonic::Outsb => Size::S1,
        Mnemonic::Insw | Mnemonic::Outsw => Size::S2,
        _ => Size::S4,
    }
}

/// Address size of a string operand, from which index register it uses.
fn string_addr_size(kind: OpKind) -> Option<Size> {
    match kind {
        OpKind::MemoryESDI | OpKind::MemorySegSI => Some(Size::S2),
        OpKind::MemoryESEDI | OpKind::MemorySegESI => Some(Size::S4),
        OpKind::MemoryESRDI | OpKind::MemorySegRSI => Some(Size::S8),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
