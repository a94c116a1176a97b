//! Hand-shaped parts of cases the random generator would rarely produce: writes to
//! the stack pointer, and loops closed by a back-edge.

use super::gen::{Gen, Opts, Rng};
use super::{Case, Mode, Spec};
use avex_core::ir::{Op, Size};
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic, Register};

/// The register holding a second valid stack address in the stack-pointer category.
pub fn alt_stack_reg(mode: Mode) -> u64 {
    match mode {
        Mode::M64 => 12,
        Mode::M32 => 3,
        Mode::M16 => 5,
    }
}

/// The loop iteration counter (incremented once per pass through the body).
pub fn iter_reg(mode: Mode) -> u64 {
    alt_stack_reg(mode)
}

/// One instruction that writes the stack pointer, keeping it inside the stack area
/// (moves of at most 32 bytes, or to the other valid stack address).
pub fn rsp_write(mode: Mode, rng: &mut Rng) -> Option<Instruction> {
    use Register::*;
    let d = rng.below(65) as i64 - 32;
    let i = match mode {
        Mode::M64 => {
            let m = MemoryOperand::with_base_displ(RSP, d);
            match rng.below(12) {
                0 => Instruction::with2(Code::Lea_r64_m, RSP, m),
                1 => Instruction::with2(Code::Add_rm64_imm8, RSP, d as i32),
                2 => Instruction::with2(Code::Sub_rm64_imm8, RSP, d as i32),
                3 => Instruction::with2(Code::Mov_r64_rm64, RSP, R12),
                4 => Instruction::with2(Code::Mov_rm64_r64, RSP, R12),
                5 => Instruction::with2(Code::Xchg_rm64_r64, RSP, R12),
                6 => {
                    Instruction::with2(Code::Lea_r64_m, RSP, MemoryOperand::with_base_displ(R12, d))
                }
                // 32-bit writes zero-extend (the stack is below 4G in this world).
                7 => Instruction::with2(Code::Mov_r32_rm32, ESP, R12D),
                8 => Instruction::with2(Code::Lea_r32_m, ESP, m),
                9 => Instruction::with2(Code::And_rm64_imm8, RSP, -16),
                10 => Instruction::with1(Code::Push_r64, RSP),
                _ => Instruction::with2(Code::Mov_r16_rm16, SP, R12W),
            }
        }
        Mode::M32 => {
            let m = MemoryOperand::with_base_displ(ESP, d);
            match rng.below(10) {
                0 => Instruction::with2(Code::Lea_r32_m, ESP, m),
                1 => Instruction::with2(Code::Add_rm32_imm8, ESP, d as i32),
                2 => Instruction::with2(Code::Sub_rm32_imm8, ESP, d as i32),
                3 => Instruction::with2(Code::Mov_r32_rm32, ESP, EBX),
                4 => Instruction::with2(Code::Xchg_rm32_r32, EBX, ESP),
                5 => {
                    Instruction::with2(Code::Lea_r32_m, ESP, MemoryOperand::with_base_displ(EBX, d))
                }
                6 => Instruction::with2(Code::And_rm32_imm8, ESP, -16),
                7 => Instruction::with1(Code::Push_r32, ESP),
                8 => Instruction::with2(Code::Mov_r16_rm16, SP, BX),
                _ => Instruction::with2(Code::Add_rm16_imm8, SP, d as i32),
            }
        }
        Mode::M16 => {
            // SS is a 16-bit segment: the stack pointer is SP.
            let m = MemoryOperand::with_base_displ_size(BP, d, 1);
            match rng.below(10) {
                0 => Instruction::with2(Code::Lea_r16_m, SP, m),
                1 => Instruction::with2(Code::Add_rm16_imm8, SP, d as i32),
                2 => Instruction::with2(Code::Sub_rm16_imm8, SP, d as i32),
                3 => Instruction::with2(Code::Mov_r16_rm16, SP, BP),
                4 => Instruction::with2(Code::Xchg_rm16_r16, BP, SP),
                5 => Instruction::with2(Code::And_rm16_imm8, SP, -16),
                6 => Instruction::with1(Code::Push_r16, SP),
                7 => Instruction::with2(Code::Mov_r32_rm32, ESP, EBP),
                8 => {
                    Instruction::with2(Code::Lea_r32_m, ESP, MemoryOperand::with_base_displ(EBP, d))
                }
                _ => Instruction::with1(Code::Push_r32, ESP),
            }
        }
    };
    i.ok()
}

/// What the stack-pointer category inserts: one stack-pointer write, or LEAVE
/// from a frame at the second stack address (64-bit code: RBP is no operand's
/// base there), or `push imm; popf` of random status flags and DF with IF set (the
/// CPU runs it at CPL 3, where POPF leaves IF and IOPL alone; the engine's guest
/// is at CPL 0, where it loads them: the value keeps them as they are).
pub fn stack_shape(mode: Mode, rng: &mut Rng) -> Option<Vec<Instruction>> {
    use avex_core::arch::rflags::{DF, FIXED, IF, STATUS};
    match rng.below(6) {
        0 if mode == Mode::M64 => {
            let alt = super::gen::reg_of(mode, 8, alt_stack_reg(mode));
            let leave = if rng.chance(1, 4) {
                Code::Leavew
            } else {
                Code::Leaveq
            };
            Some(vec![
                Instruction::with2(Code::Mov_r64_rm64, Register::RBP, alt).ok()?,
                Instruction::with(leave),
            ])
        }
        1 => {
            let flags = FIXED | IF | (rng.next() & (STATUS | DF));
            let (push, popf) = match mode {
                Mode::M64 => (Code::Pushq_imm32, Code::Popfq),
                Mode::M32 => (Code::Pushd_imm32, Code::Popfd),
                Mode::M16 => (Code::Push_imm16, Code::Popfw),
            };
            Some(vec![
                Instruction::with1(push, flags as u32).ok()?,
                Instruction::with(popf),
            ])
        }
        _ => rsp_write(mode, rng).map(|i| vec![i]),
    }
}

fn plain(instr: Instruction) -> Spec {
    Spec {
        instr,
        target: None,
    }
}

fn counter(mode: Mode, size: Size) -> Register {
    match (mode, size) {
        (_, Size::S2) => Register::CX,
        (Mode::M64, Size::S8) => Register::RCX,
        _ => Register::ECX,
    }
}

fn loop_width(instr: &Instruction) -> Option<Size> {
    match avex_core::lower::lower(instr).ok()? {
        Op::Loop { addr_size, .. } => Some(addr_size),
        _ => None,
    }
}

/// A loop: a few instructions, then `head: body; iter++; back-edge`, then a few
/// more. The back-edge is LOOP/LOOPE/LOOPNE, `dec counter; jnz head`, or a JCXZ
/// exit at the head with `dec counter; jmp head` at the bottom. RCX (the counter)
/// and the iteration register are written only by the loop. Returns the case and
/// RCX's value (count in the counter's width, other bits random).
pub fn loop_case(g: &Gen, rng: &mut Rng, o: &Opts) -> Option<(Case, u64)> {
    let mode = g.mode;
    let mut specs = Vec::new();
    let filler = |specs: &mut Vec<Spec>, rng: &mut Rng, n: u64| {
        for _ in 0..rng.below(n + 1) {
            if let Some(i) = g.insn(rng, o) {
                specs.push(plain(i));
            }
        }
    };
    filler(&mut specs, rng, 2);
    let head = specs.len();
    let loops: Vec<Instruction> = (0..8)
        .filter_map(|_| {
            let b = g.branch(
                rng,
                &Opts {
                    jcxz: true,
                    ..Default::default()
                },
            )?;
            Some(b)
        })
        .collect();
    let pick = |m: &[Mnemonic]| loops.iter().copied().find(|i| m.contains(&i.mnemonic()));
    let variant = rng.below(3);
    let jcxz = if variant == 2 {
        Some(pick(&[Mnemonic::Jcxz, Mnemonic::Jecxz, Mnemonic::Jrcxz])?)
    } else {
        None
    };
    if let Some(j) = jcxz {
        specs.push(Spec {
            instr: j,
            target: Some(usize::MAX),
        });
    }
    let body = specs.len();
    filler(&mut specs, rng, 3);
    let it = super::gen::reg_of(mode, mode.bits().max(32) / 8, iter_reg(mode));
    let it16 = super::gen::reg_of(mode, 2, iter_reg(mode));
    let inc = match mode {
        Mode::M64 => Instruction::with2(Code::Lea_r64_m, it, MemoryOperand::with_base_displ(it, 1)),
        Mode::M32 => Instruction::with2(Code::Lea_r32_m, it, MemoryOperand::with_base_displ(it, 1)),
        Mode::M16 => Instruction::with2(
            Code::Lea_r16_m,
            it16,
            MemoryOperand::with_base_displ_size(it16, 1, 1),
        ),
    };
    specs.push(plain(inc.ok()?));
    let (jne, jmp) = match (mode, rng.chance(1, 2)) {
        (Mode::M64, true) => (Code::Jne_rel8_64, Code::Jmp_rel8_64),
        (Mode::M64, false) => (Code::Jne_rel32_64, Code::Jmp_rel32_64),
        (Mode::M32, true) => (Code::Jne_rel8_32, Code::Jmp_rel8_32),
        (Mode::M32, false) => (Code::Jne_rel32_32, Code::Jmp_rel32_32),
        (Mode::M16, true) => (Code::Jne_rel8_16, Code::Jmp_rel8_16),
        (Mode::M16, false) => (Code::Jne_rel16, Code::Jmp_rel16),
    };
    let target_ip = g.place.seq_ip & if mode == Mode::M16 { 0xffff } else { u64::MAX };
    let branch = |c| Instruction::with_branch(c, target_ip).ok();
    let width;
    let mut min_count = 1;
    match variant {
        0 => {
            let l = pick(&[Mnemonic::Loop, Mnemonic::Loope, Mnemonic::Loopne])?;
            width = loop_width(&l)?;
            specs.push(Spec {
                instr: l,
                target: Some(head),
            });
        }
        1 => {
            width = match (mode, rng.below(3)) {
                (Mode::M64, 0) => Size::S8,
                (_, 1) => Size::S2,
                _ => Size::S4,
            };
            let dec = match width {
                Size::S8 => Code::Dec_rm64,
                Size::S4 => Code::Dec_rm32,
                _ => Code::Dec_rm16,
            };
            specs.push(plain(Instruction::with1(dec, counter(mode, width)).ok()?));
            specs.push(Spec {
                instr: branch(jne)?,
                target: Some(head),
            });
        }
        _ => {
            width = loop_width(&jcxz?)?;
            min_count = 0;
            let dec = match width {
                Size::S8 => Code::Dec_rm64,
                Size::S4 => Code::Dec_rm32,
                _ => Code::Dec_rm16,
            };
            specs.push(plain(Instruction::with1(dec, counter(mode, width)).ok()?));
            specs.push(Spec {
                instr: branch(jmp)?,
                target: Some(head),
            });
        }
    }
    let after = specs.len();
    let _ = body;
    if let Some(s) = specs.get_mut(head).filter(|_| jcxz.is_some()) {
        s.target = Some(after);
    }
    filler(&mut specs, rng, 2);
    let n = specs.len();
    for s in specs.iter_mut() {
        if let Some(t) = s.target.as_mut() {
            *t = (*t).min(n);
        }
    }
    let back: Vec<usize> = specs
        .iter()
        .enumerate()
        .filter(|(i, s)| s.target.is_some_and(|t| t <= *i))
        .map(|(i, _)| i)
        .collect();
    let caps = back
        .iter()
        .map(|&i| {
            (
                i,
                if rng.chance(1, 3) {
                    None
                } else {
                    Some(rng.below(4) as u16)
                },
            )
        })
        .collect();
    let count = min_count + rng.below(10);
    let rcx = (rng.next() & !width.mask()) | count;
    Some((Case { specs, caps }, rcx))
}
