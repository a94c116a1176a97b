//! Tests of [`super`].
use super::*;
use crate::ir::{RAX, RBP, RBX, RCX, RDI, RDX, RSI, RSP};
use iced_x86::{Decoder, DecoderOptions};

const IP: u64 = 0x1000;

fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
    let mut decoder = Decoder::with_ip(bitness, bytes, IP, DecoderOptions::NONE);
    let instr = decoder.decode();
    assert!(!instr.is_invalid(), "test bytes must decode: {bytes:02x?}");
    assert_eq!(instr.len(), bytes.len(), "one instruction: {bytes:02x?}");
    instr
}

fn lower64(bytes: &[u8]) -> Result<Op, Unsupported> {
    lower(&decode(64, bytes))
}
fn lower32(bytes: &[u8]) -> Result<Op, Unsupported> {
    lower(&decode(32, bytes))
}
fn lower16(bytes: &[u8]) -> Result<Op, Unsupported> {
    lower(&decode(16, bytes))
}

fn r(index: u8, size: Size) -> RegRef {
    RegRef {
        index,
        size,
        high8: false,
    }
}
fn reg(index: u8, size: Size) -> Operand {
    Operand::Reg(r(index, size))
}
fn mem(
    seg: Seg,
    base: Option<u8>,
    index: Option<u8>,
    scale: u8,
    disp: i64,
    addr_size: Size,
) -> MemRef {
    MemRef {
        seg,
        base,
        index,
        scale,
        disp,
        addr_size,
    }
}

#[test]
fn mov_register_immediate_and_memory_forms() {
    // mov rax, rbx
    assert_eq!(
        lower64(&[0x48, 0x89, 0xd8]),
        Ok(Op::Mov {
            size: Size::S8,
            dst: reg(RAX, Size::S8),
            src: reg(RBX, Size::S8)
        })
    );
    // mov ah, bl: high-byte register
    assert_eq!(
        lower32(&[0x88, 0xdc]),
        Ok(Op::Mov {
            size: Size::S1,
            dst: Operand::Reg(RegRef {
                index: RAX,
                size: Size::S1,
                high8: true
            }),
            src: reg(RBX, Size::S1)
        })
    );
    // mov sil, 5 (REX: SIL, not DH)
    assert_eq!(
        lower64(&[0x40, 0xb6, 0x05]),
        Ok(Op::Mov {
            size: Size::S1,
            dst: reg(RSI, Size::S1),
            src: Operand::Imm(5)
        })
    );
    // mov rax, -1 (C7 /0 imm32 sign-extended to 64)
    assert_eq!(
        lower64(&[0x48, 0xc7, 0xc0, 0xff, 0xff, 0xff, 0xff]),
        Ok(Op::Mov {
            size: Size::S8,
            dst: reg(RAX, Size::S8),
            src: Operand::Imm(u64::MAX)
        })
    );
    // mov eax, 0xffffffff: zero-extended
    assert_eq!(
        lower64(&[0xb8, 0xff, 0xff, 0xff, 0xff]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Imm(0xffff_ffff)
        })
    );
    // movabs rcx, 0x1122334455667788
    assert_eq!(
        lower64(&[0x48, 0xb9, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]),
        Ok(Op::Mov {
            size: Size::S8,
            dst: reg(RCX, Size::S8),
            src: Operand::Imm(0x1122_3344_5566_7788)
        })
    );
    // mov dword [rbx+rsi*4-8], edx
    assert_eq!(
        lower64(&[0x89, 0x54, 0xb3, 0xf8]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: Operand::Mem(mem(Seg::Ds, Some(RBX), Some(RSI), 4, -8, Size::S8)),
            src: reg(RDX, Size::S4)
        })
    );
    // mov eax, [ebp+8] in 32-bit code: SS by default
    assert_eq!(
        lower32(&[0x8b, 0x45, 0x08]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ss, Some(RBP), None, 1, 8, Size::S4))
        })
    );
    // mov eax, [ebx-4] in 32-bit code: displacement sign-extended
    assert_eq!(
        lower32(&[0x8b, 0x43, 0xfc]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ds, Some(RBX), None, 1, -4, Size::S4))
        })
    );
    // mov al, fs:[rax]
    assert_eq!(
        lower64(&[0x64, 0x8a, 0x00]),
        Ok(Op::Mov {
            size: Size::S1,
            dst: reg(RAX, Size::S1),
            src: Operand::Mem(mem(Seg::Fs, Some(RAX), None, 1, 0, Size::S8))
        })
    );
}

#[test]
fn rip_relative_becomes_absolute() {
    // mov eax, [rip+0x10] at 0x1000, 6 bytes long: target 0x1016
    assert_eq!(
        lower64(&[0x8b, 0x05, 0x10, 0x00, 0x00, 0x00]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ds, None, None, 1, 0x1016, Size::S8))
        })
    );
    // lea rdi, [rip-0x20] at 0x1000, 7 bytes: 0x1007 - 0x20 = 0xfe7
    assert_eq!(
        lower64(&[0x48, 0x8d, 0x3d, 0xe0, 0xff, 0xff, 0xff]),
        Ok(Op::Lea {
            dst: r(RDI, Size::S8),
            addr: mem(Seg::Ds, None, None, 1, 0xfe7, Size::S8)
        })
    );
    // mov eax, [eip+0x10] (67 prefix): 32-bit address
    assert_eq!(
        lower64(&[0x67, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ds, None, None, 1, 0x1017, Size::S4))
        })
    );
}

#[test]
fn absolute_addresses_take_the_address_size() {
    // 16-bit: mov al, [0x1234] (moffs16)
    assert_eq!(
        lower16(&[0xa0, 0x34, 0x12]),
        Ok(Op::Mov {
            size: Size::S1,
            dst: reg(RAX, Size::S1),
            src: Operand::Mem(mem(Seg::Ds, None, None, 1, 0x1234, Size::S2))
        })
    );
    // 32-bit: mov eax, [0x80001000] via ModRM disp32: sign-extended from 32 bits
    assert_eq!(
        lower32(&[0x8b, 0x05, 0x00, 0x10, 0x00, 0x80]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(
                Seg::Ds,
                None,
                None,
                1,
                0xffff_ffff_8000_1000u64 as i64,
                Size::S4
            ))
        })
    );
    // 64-bit: mov al, [0x1122334455667788] (moffs64)
    assert_eq!(
        lower64(&[0xa0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]),
        Ok(Op::Mov {
            size: Size::S1,
            dst: reg(RAX, Size::S1),
            src: Operand::Mem(mem(Seg::Ds, None, None, 1, 0x1122_3344_5566_7788, Size::S8))
        })
    );
    // 64-bit with 67: mov al, [moffs32]
    assert_eq!(
        lower64(&[0x67, 0xa0, 0x78, 0x56, 0x34, 0x12]),
        Ok(Op::Mov {
            size: Size::S1,
            dst: reg(RAX, Size::S1),
            src: Operand::Mem(mem(Seg::Ds, None, None, 1, 0x1234_5678, Size::S4))
        })
    );
    // 64-bit SIB absolute [disp32] (no base, no index): 64-bit addressing, sign-extended
    assert_eq!(
        lower64(&[0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x80]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ds, None, None, 1, -0x8000_0000, Size::S8))
        })
    );
}

#[test]
fn sixteen_bit_addressing() {
    // mov ax, [bx+si+2]
    assert_eq!(
        lower16(&[0x8b, 0x40, 0x02]),
        Ok(Op::Mov {
            size: Size::S2,
            dst: reg(RAX, Size::S2),
            src: Operand::Mem(mem(Seg::Ds, Some(RBX), Some(RSI), 1, 2, Size::S2))
        })
    );
    // mov ax, [bp-2]: SS, displacement -2
    assert_eq!(
        lower16(&[0x8b, 0x46, 0xfe]),
        Ok(Op::Mov {
            size: Size::S2,
            dst: reg(RAX, Size::S2),
            src: Operand::Mem(mem(Seg::Ss, Some(RBP), None, 1, -2, Size::S2))
        })
    );
    // mov eax, [ebx] in 16-bit code with 66 67
    assert_eq!(
        lower16(&[0x66, 0x67, 0x8b, 0x03]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ds, Some(RBX), None, 1, 0, Size::S4))
        })
    );
}

#[test]
fn extensions_and_lea() {
    // movzx eax, byte [rdi]
    assert_eq!(
        lower64(&[0x0f, 0xb6, 0x07]),
        Ok(Op::Movzx {
            dst: r(RAX, Size::S4),
            src: Operand::Mem(mem(Seg::Ds, Some(RDI), None, 1, 0, Size::S8)),
            src_size: Size::S1
        })
    );
    // movsx rcx, dx
    assert_eq!(
        lower64(&[0x48, 0x0f, 0xbf, 0xca]),
        Ok(Op::Movsx {
            dst: r(RCX, Size::S8),
            src: reg(RDX, Size::S2),
            src_size: Size::S2
        })
    );
    // movsxd rax, ecx
    assert_eq!(
        lower64(&[0x48, 0x63, 0xc1]),
        Ok(Op::Movsx {
            dst: r(RAX, Size::S8),
            src: reg(RCX, Size::S4),
            src_size: Size::S4
        })
    );
    // movsxd eax, ecx (no REX.W): a plain 32-bit move
    assert_eq!(
        lower64(&[0x63, 0xc1]),
        Ok(Op::Mov {
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: reg(RCX, Size::S4)
        })
    );
    // lea eax, [rbx+rcx*8+0x10]
    assert_eq!(
        lower64(&[0x8d, 0x44, 0xcb, 0x10]),
        Ok(Op::Lea {
            dst: r(RAX, Size::S4),
            addr: mem(Seg::Ds, Some(RBX), Some(RCX), 8, 0x10, Size::S8)
        })
    );
}

#[test]
fn alu_unary_and_immediates() {
    // add eax, 0x12345678
    assert_eq!(
        lower32(&[0x05, 0x78, 0x56, 0x34, 0x12]),
        Ok(Op::Alu {
            op: AluOp::Add,
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            src: Operand::Imm(0x1234_5678)
        })
    );
    // sub rsp, -8 (imm8 sign-extended to 64)
    assert_eq!(
        lower64(&[0x48, 0x83, 0xec, 0xf8]),
        Ok(Op::Alu {
            op: AluOp::Sub,
            size: Size::S8,
            dst: reg(RSP, Size::S8),
            src: Operand::Imm(u64::MAX - 7)
        })
    );
    // and ax, 0xff00 (imm16, zero-extended)
    assert_eq!(
        lower16(&[0x25, 0x00, 0xff]),
        Ok(Op::Alu {
            op: AluOp::And,
            size: Size::S2,
            dst: reg(RAX, Size::S2),
            src: Operand::Imm(0xff00)
        })
    );
    // test al, 0x20
    assert_eq!(
        lower16(&[0xa8, 0x20]),
        Ok(Op::Alu {
            op: AluOp::Test,
            size: Size::S1,
            dst: reg(RAX, Size::S1),
            src: Operand::Imm(0x20)
        })
    );
    // cmp byte [rsi], 0
    assert_eq!(
        lower64(&[0x80, 0x3e, 0x00]),
        Ok(Op::Alu {
            op: AluOp::Cmp,
            size: Size::S1,
            dst: Operand::Mem(mem(Seg::Ds, Some(RSI), None, 1, 0, Size::S8)),
            src: Operand::Imm(0)
        })
    );
    for (bytes, op) in [
        (&[0x11, 0xc8][..], AluOp::Adc),
        (&[0x19, 0xc8][..], AluOp::Sbb),
        (&[0x09, 0xc8][..], AluOp::Or),
        (&[0x31, 0xc8][..], AluOp::Xor),
    ] {
        assert_eq!(
            lower32(bytes),
            Ok(Op::Alu {
                op,
                size: Size::S4,
                dst: reg(RAX, Size::S4),
                src: reg(RCX, Size::S4)
            })
        );
    }
    // inc ecx in 32-bit code (41), dec dword [rbx], neg rax, not word [rdi]
    assert_eq!(
        lower32(&[0x41]),
        Ok(Op::Unary {
            op: UnaryOp::Inc,
            size: Size::S4,
            dst: reg(RCX, Size::S4)
        })
    );
    assert_eq!(
        lower64(&[0xff, 0x0b]),
        Ok(Op::Unary {
            op: UnaryOp::Dec,
            size: Size::S4,
            dst: Operand::Mem(mem(Seg::Ds, Some(RBX), None, 1, 0, Size::S8))
        })
    );
    assert_eq!(
        lower64(&[0x48, 0xf7, 0xd8]),
        Ok(Op::Unary {
            op: UnaryOp::Neg,
            size: Size::S8,
            dst: reg(RAX, Size::S8)
        })
    );
    assert_eq!(
        lower64(&[0x66, 0xf7, 0x17]),
        Ok(Op::Unary {
            op: UnaryOp::Not,
            size: Size::S2,
            dst: Operand::Mem(mem(Seg::Ds, Some(RDI), None, 1, 0, Size::S8))
        })
    );
}

#[test]
fn shifts_rotates_and_bits() {
    // shl eax, 1 (D1 /4): count 1
    assert_eq!(
        lower32(&[0xd1, 0xe0]),
        Ok(Op::Shift {
            op: ShiftOp::Shl,
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            count: Operand::Imm(1)
        })
    );
    // shr rdx, 4
    assert_eq!(
        lower64(&[0x48, 0xc1, 0xea, 0x04]),
        Ok(Op::Shift {
            op: ShiftOp::Shr,
            size: Size::S8,
            dst: reg(RDX, Size::S8),
            count: Operand::Imm(4)
        })
    );
    // sar bl, cl
    assert_eq!(
        lower32(&[0xd2, 0xfb]),
        Ok(Op::Shift {
            op: ShiftOp::Sar,
            size: Size::S1,
            dst: reg(RBX, Size::S1),
            count: reg(RCX, Size::S1)
        })
    );
    for (bytes, op) in [
        (&[0xd1, 0xc0][..], ShiftOp::Rol),
        (&[0xd1, 0xc8][..], ShiftOp::Ror),
        (&[0xd1, 0xd0][..], ShiftOp::Rcl),
        (&[0xd1, 0xd8][..], ShiftOp::Rcr),
        (&[0xd1, 0xf0][..], ShiftOp::Shl), // SAL encoding /6
    ] {
        assert_eq!(
            lower32(bytes),
            Ok(Op::Shift {
                op,
                size: Size::S4,
                dst: reg(RAX, Size::S4),
                count: Operand::Imm(1)
            })
        );
    }
    // bt eax, 5 ; bts [rdi], rax ; btr ecx, edx ; btc ax, 3
    assert_eq!(
        lower32(&[0x0f, 0xba, 0xe0, 0x05]),
        Ok(Op::Bit {
            op: BitOp::Bt,
            size: Size::S4,
            dst: reg(RAX, Size::S4),
            bit: Operand::Imm(5)
        })
    );
    assert_eq!(
        lower64(&[0x48, 0x0f, 0xab, 0x07]),
        Ok(Op::Bit {
            op: BitOp::Bts,
            size: Size::S8,
            dst: Operand::Mem(mem(Seg::Ds, Some(RDI), None, 1, 0, Size::S8)),
            bit: reg(RAX, Size::S8)
        })
    );
    assert_eq!(
        lower32(&[0x0f, 0xb3, 0xd1]),
        Ok(Op::Bit {
            op: BitOp::Btr,
            size: Size::S4,
            dst: reg(RCX, Size::S4),
            bit: reg(RDX, Size::S4)
        })
    );
    assert_eq!(
        lower16(&[0x0f, 0xba, 0xf8, 0x03]),
        Ok(Op::Bit {
            op: BitOp::Btc,
            size: Size::S2,
            dst: reg(RAX, Size::S2),
            bit: Operand::Imm(3)
        })
    );
}

#[test]
fn stack_and_exchange() {
    // push rbp (64-bit slot), push imm8 sign-extended, push qword [rax], pop rbx
    assert_eq!(
        lower64(&[0x55]),
        Ok(Op::Push {
            size: Size::S8,
            src: reg(RBP, Size::S8)
        })
    );
    assert_eq!(
        lower64(&[0x6a, 0xff]),
        Ok(Op::Push {
            size: Size::S8,
            src: Operand::Imm(u64::MAX)
        })
    );
    assert_eq!(
        lower64(&[0xff, 0x30]),
        Ok(Op::Push {
            size: Size::S8,
            src: Operand::Mem(mem(Seg::Ds, Some(RAX), None, 1, 0, Size::S8))
        })
    );
    assert_eq!(
        lower64(&[0x5b]),
        Ok(Op::Pop {
            size: Size::S8,
            dst: reg(RBX, Size::S8)
        })
    );
    // 32-bit push imm32, 16-bit push ax, pop word [bx]
    assert_eq!(
        lower32(&[0x68, 0x00, 0x00, 0x00, 0x80]),
        Ok(Op::Push {
            size: Size::S4,
            src: Operand::Imm(0x8000_0000)
        })
    );
    assert_eq!(
        lower16(&[0x50]),
        Ok(Op::Push {
            size: Size::S2,
            src: reg(RAX, Size::S2)
        })
    );
    assert_eq!(
        lower16(&[0x8f, 0x07]),
        Ok(Op::Pop {
            size: Size::S2,
            dst: Operand::Mem(mem(Seg::Ds, Some(RBX), None, 1, 0, Size::S2))
        })
    );
    // push ax in 64-bit code: a 2-byte slot
    assert_eq!(
        lower64(&[0x66, 0x50]),
        Ok(Op::Push {
            size: Size::S2,
            src: reg(RAX, Size::S2)
        })
    );
    // xchg eax, ecx ; xchg [rdi], al
    assert_eq!(
        lower32(&[0x91]),
        Ok(Op::Xchg {
            size: Size::S4,
            a: reg(RCX, Size::S4),
            b: reg(RAX, Size::S4)
        })
    );
    assert_eq!(
        lower64(&[0x86, 0x07]),
        Ok(Op::Xchg {
            size: Size::S1,
            a: Operand::Mem(mem(Seg::Ds, Some(RDI), None, 1, 0, Size::S8)),
            b: reg(RAX, Size::S1)
        })
    );
}

#[test]
fn conditions_and_flag_ops() {
    // setne al ; cmovb rax, [rbx]
    assert_eq!(
        lower64(&[0x0f, 0x95, 0xc0]),
        Ok(Op::Setcc {
            cond: Cond::Ne,
            dst: reg(RAX, Size::S1)
        })
    );
    assert_eq!(
        lower64(&[0x48, 0x0f, 0x42, 0x03]),
        Ok(Op::Cmovcc {
            cond: Cond::B,
            size: Size::S8,
            dst: r(RAX, Size::S8),
            src: Operand::Mem(mem(Seg::Ds, Some(RBX), None, 1, 0, Size::S8))
        })
    );
    // every condition code in hardware order via SETcc 0F 90+cc
    let conds = [
        Cond::O,
        Cond::No,
        Cond::B,
        Cond::Ae,
        Cond::E,
        Cond::Ne,
        Cond::Be,
        Cond::A,
        Cond::S,
        Cond::Ns,
        Cond::P,
        Cond::Np,
        Cond::L,
        Cond::Ge,
        Cond::Le,
        Cond::G,
    ];
    for (cc, cond) in conds.into_iter().enumerate() {
        assert_eq!(
            lower32(&[0x0f, 0x90 + cc as u8, 0xc1]),
            Ok(Op::Setcc {
                cond,
                dst: reg(RCX, Size::S1)
            })
        );
    }
    assert_eq!(lower16(&[0x98]), Ok(Op::SignExtendAcc { size: Size::S2 }));
    assert_eq!(lower32(&[0x98]), Ok(Op::SignExtendAcc { size: Size::S4 }));
    assert_eq!(
        lower64(&[0x48, 0x98]),
        Ok(Op::SignExtendAcc { size: Size::S8 })
    );
    assert_eq!(
        lower16(&[0x99]),
        Ok(Op::SignExtendAccToDx { size: Size::S2 })
    );
    assert_eq!(
        lower32(&[0x99]),
        Ok(Op::SignExtendAccToDx { size: Size::S4 })
    );
    assert_eq!(
        lower64(&[0x48, 0x99]),
        Ok(Op::SignExtendAccToDx { size: Size::S8 })
    );
    assert_eq!(lower64(&[0xf8]), Ok(Op::Clc));
    assert_eq!(lower64(&[0xf9]), Ok(Op::Stc));
    assert_eq!(lower64(&[0xf5]), Ok(Op::Cmc));
    assert_eq!(lower64(&[0xfc]), Ok(Op::Cld));
    assert_eq!(lower64(&[0xfd]), Ok(Op::Std));
    assert_eq!(lower64(&[0x90]), Ok(Op::Nop));
    assert_eq!(lower64(&[0x0f, 0x1f, 0x44, 0x00, 0x00]), Ok(Op::Nop));
    assert_eq!(lower64(&[0xf3, 0x0f, 0x1e, 0xfa]), Ok(Op::Nop)); // endbr64
    assert_eq!(lower64(&[0x0f, 0xae, 0xe8]), Ok(Op::Nop)); // lfence
}

#[test]
fn branches_are_relative_and_absolute() {
    // jmp short +2 at 0x1000 (2 bytes): 0x1004
    assert_eq!(
        lower64(&[0xeb, 0x02]),
        Ok(Op::Jmp {
            target: Target::Exit(0x1004)
        })
    );
    // jz -4 at 0x1000: 0x0ffe
    assert_eq!(
        lower32(&[0x74, 0xfc]),
        Ok(Op::Jcc {
            cond: Cond::E,
            target: Target::Exit(0xffe)
        })
    );
    // jne rel32 (0F 85) +0x100: 0x1006 + 0x100
    assert_eq!(
        lower64(&[0x0f, 0x85, 0x00, 0x01, 0x00, 0x00]),
        Ok(Op::Jcc {
            cond: Cond::Ne,
            target: Target::Exit(0x1106)
        })
    );
    // 16-bit jmp rel16 wraps within the segment: 0x1003 + 0xf000 = 0x0003
    assert_eq!(
        lower16(&[0xe9, 0x00, 0xf0]),
        Ok(Op::Jmp {
            target: Target::Exit(0x0003)
        })
    );
    // loop in 64-bit code counts RCX; with 67, ECX
    assert_eq!(
        lower64(&[0xe2, 0xfe]),
        Ok(Op::Loop {
            kind: LoopKind::Loop,
            addr_size: Size::S8,
            target: Target::Exit(0x1000)
        })
    );
    assert_eq!(
        lower64(&[0x67, 0xe1, 0xfd]),
        Ok(Op::Loop {
            kind: LoopKind::Loope,
            addr_size: Size::S4,
            target: Target::Exit(0x1000)
        })
    );
    assert_eq!(
        lower16(&[0xe0, 0x10]),
        Ok(Op::Loop {
            kind: LoopKind::Loopne,
            addr_size: Size::S2,
            target: Target::Exit(0x1012)
        })
    );
    assert_eq!(
        lower32(&[0xe3, 0x00]),
        Ok(Op::Loop {
            kind: LoopKind::Jcxz,
            addr_size: Size::S4,
            target: Target::Exit(0x1002)
        })
    );
    assert_eq!(
        lower64(&[0xe3, 0x00]),
        Ok(Op::Loop {
            kind: LoopKind::Jcxz,
            addr_size: Size::S8,
            target: Target::Exit(0x1002)
        })
    );
}

#[test]
fn port_io() {
    assert_eq!(
        lower64(&[0xe4, 0x71]),
        Ok(Op::In {
            size: Size::S1,
            port: PortSrc::Imm(0x71)
        })
    );
    assert_eq!(
        lower64(&[0xec]),
        Ok(Op::In {
            size: Size::S1,
            port: PortSrc::Dx
        })
    );
    assert_eq!(
        lower32(&[0xed]),
        Ok(Op::In {
            size: Size::S4,
            port: PortSrc::Dx
        })
    );
    assert_eq!(
        lower16(&[0xed]),
        Ok(Op::In {
            size: Size::S2,
            port: PortSrc::Dx
        })
    );
    assert_eq!(
        lower32(&[0x66, 0xe5, 0x40]),
        Ok(Op::In {
            size: Size::S2,
            port: PortSrc::Imm(0x40)
        })
    );
    assert_eq!(
        lower64(&[0xe6, 0x80]),
        Ok(Op::Out {
            size: Size::S1,
            port: PortSrc::Imm(0x80)
        })
    );
    assert_eq!(
        lower64(&[0xef]),
        Ok(Op::Out {
            size: Size::S4,
            port: PortSrc::Dx
        })
    );
    assert_eq!(
        lower16(&[0x66, 0xef]),
        Ok(Op::Out {
            size: Size::S4,
            port: PortSrc::Dx
        })
    );
    // rep insw in 64-bit code: RDI addressing; rep outsb with 67 and a segment override
    assert_eq!(
        lower64(&[0xf3, 0x66, 0x6d]),
        Ok(Op::Ins {
            size: Size::S2,
            addr_size: Size::S8,
            rep: true
        })
    );
    assert_eq!(
        lower16(&[0x6c]),
        Ok(Op::Ins {
            size: Size::S1,
            addr_size: Size::S2,
            rep: false
        })
    );
    assert_eq!(
        lower64(&[0xf3, 0x67, 0x65, 0x6e]),
        Ok(Op::Outs {
            size: Size::S1,
            addr_size: Size::S4,
            rep: true,
            seg: Seg::Gs
        })
    );
    assert_eq!(
        lower32(&[0x6f]),
        Ok(Op::Outs {
            size: Size::S4,
            addr_size: Size::S4,
            rep: false,
            seg: Seg::Ds
        })
    );
}

#[test]
fn system_instructions() {
    assert_eq!(lower64(&[0x0f, 0x32]), Ok(Op::Rdmsr));
    assert_eq!(lower64(&[0x0f, 0x30]), Ok(Op::Wrmsr));
    assert_eq!(lower64(&[0x0f, 0xa2]), Ok(Op::Cpuid));
    // mov cr3, rax ; mov rax, cr3 ; mov cr0, eax (32-bit) ; mov cr8, r9 ; mov rdx, cr2 ; mov cr4, rcx
    assert_eq!(
        lower64(&[0x0f, 0x22, 0xd8]),
        Ok(Op::MovToCr { cr: 3, src: RAX })
    );
    assert_eq!(
        lower64(&[0x0f, 0x20, 0xd8]),
        Ok(Op::MovFromCr { cr: 3, dst: RAX })
    );
    assert_eq!(
        lower32(&[0x0f, 0x22, 0xc0]),
        Ok(Op::MovToCr { cr: 0, src: RAX })
    );
    assert_eq!(
        lower64(&[0x45, 0x0f, 0x22, 0xc1]),
        Ok(Op::MovToCr { cr: 8, src: 9 })
    );
    assert_eq!(
        lower64(&[0x0f, 0x20, 0xd2]),
        Ok(Op::MovFromCr { cr: 2, dst: RDX })
    );
    assert_eq!(
        lower64(&[0x0f, 0x22, 0xe1]),
        Ok(Op::MovToCr { cr: 4, src: RCX })
    );
    assert_eq!(lower64(&[0x0f, 0x06]), Ok(Op::Clts));
    assert_eq!(
        lower32(&[0x0f, 0x01, 0xf0]),
        Ok(Op::Lmsw {
            src: reg(RAX, Size::S2)
        })
    );
    assert_eq!(lower64(&[0x0f, 0x31]), Ok(Op::Rdtsc));
    assert_eq!(lower64(&[0x0f, 0x01, 0xf9]), Ok(Op::Rdtscp));
    assert_eq!(lower64(&[0x0f, 0x33]), Ok(Op::Rdpmc));
    assert_eq!(lower64(&[0x0f, 0x01, 0xd0]), Ok(Op::Xgetbv));
    assert_eq!(lower64(&[0x0f, 0x01, 0xd1]), Ok(Op::Xsetbv));
    assert_eq!(lower64(&[0x0f, 0x09]), Ok(Op::Wbinvd));
    assert_eq!(lower64(&[0x0f, 0x08]), Ok(Op::Invd));
    assert_eq!(
        lower64(&[0x0f, 0x01, 0x3f]),
        Ok(Op::Invlpg {
            addr: mem(Seg::Ds, Some(RDI), None, 1, 0, Size::S8)
        })
    );
    assert_eq!(lower64(&[0xf3, 0x90]), Ok(Op::Pause));
    assert_eq!(lower64(&[0xf4]), Ok(Op::Hlt));
}

#[test]
fn calls_returns_and_indirect_branches() {
    // 0x1000: call 0x1105 (rel32), its return address the next instruction.
    assert_eq!(
        lower64(&[0xe8, 0x00, 0x01, 0x00, 0x00]),
        Ok(Op::Call {
            size: Size::S8,
            ret: 0x1005,
            target: Target::Exit(0x1105)
        })
    );
    // call rax ; call [rdi+0x10] ; jmp rax ; ret ; ret 8
    assert_eq!(
        lower64(&[0xff, 0xd0]),
        Ok(Op::CallIndirect {
            size: Size::S8,
            src: Operand::Reg(RegRef {
                index: RAX,
                size: Size::S8,
                high8: false
            }),
            ret: 0x1002
        })
    );
    assert_eq!(
        lower64(&[0xff, 0x57, 0x10]),
        Ok(Op::CallIndirect {
            size: Size::S8,
            src: Operand::Mem(mem(Seg::Ds, Some(RDI), None, 1, 0x10, Size::S8)),
            ret: 0x1003
        })
    );
    assert!(matches!(
        lower64(&[0xff, 0xe0]),
        Ok(Op::JmpIndirect { size: Size::S8, .. })
    ));
    assert_eq!(
        lower64(&[0xc3]),
        Ok(Op::Ret {
            size: Size::S8,
            pop: 0
        })
    );
    assert_eq!(
        lower64(&[0xc2, 0x08, 0x00]),
        Ok(Op::Ret {
            size: Size::S8,
            pop: 8
        })
    );
    // 32-bit code: call [ebx] reads and pushes 4 bytes.
    assert!(matches!(
        lower32(&[0xff, 0x13]),
        Ok(Op::CallIndirect { size: Size::S4, .. })
    ));
}

/// Linux's spinlock and console paths (issue 10): `pushf; pop; cli; lock
/// cmpxchg`, the unlock's `sti`, rwlocks' `lock xadd`, LEAVE, BSWAP and
/// `native_sched_clock`'s one-operand MUL. Each was refused before.
#[test]
fn spinlock_and_wide_ops() {
    let m = |base| Operand::Mem(mem(Seg::Ds, Some(base), None, 1, 0, Size::S8));
    assert_eq!(lower64(&[0x9c]), Ok(Op::Pushf { size: Size::S8 }));
    assert_eq!(lower64(&[0x66, 0x9c]), Ok(Op::Pushf { size: Size::S2 }));
    assert_eq!(lower32(&[0x9c]), Ok(Op::Pushf { size: Size::S4 }));
    assert_eq!(lower64(&[0x9d]), Ok(Op::Popf { size: Size::S8 }));
    assert_eq!(lower16(&[0x9d]), Ok(Op::Popf { size: Size::S2 }));
    assert_eq!(lower64(&[0xfa]), Ok(Op::Cli));
    assert_eq!(lower64(&[0xfb]), Ok(Op::Sti));
    // lock cmpxchg [rdi], edx ; cmpxchg [rdi], dl ; lock cmpxchg [rdi], rdx
    assert_eq!(
        lower64(&[0xf0, 0x0f, 0xb1, 0x17]),
        Ok(Op::Cmpxchg {
            size: Size::S4,
            dst: m(RDI),
            src: r(RDX, Size::S4)
        })
    );
    assert_eq!(
        lower64(&[0x0f, 0xb0, 0x17]),
        Ok(Op::Cmpxchg {
            size: Size::S1,
            dst: m(RDI),
            src: r(RDX, Size::S1)
        })
    );
    assert!(matches!(
        lower64(&[0xf0, 0x48, 0x0f, 0xb1, 0x17]),
        Ok(Op::Cmpxchg { size: Size::S8, .. })
    ));
    // lock xadd [rdi], eax ; xadd ecx, eax
    assert_eq!(
        lower64(&[0xf0, 0x0f, 0xc1, 0x07]),
        Ok(Op::Xadd {
            size: Size::S4,
            dst: m(RDI),
            src: r(RAX, Size::S4)
        })
    );
    assert_eq!(
        lower64(&[0x0f, 0xc1, 0xc1]),
        Ok(Op::Xadd {
            size: Size::S4,
            dst: reg(RCX, Size::S4),
            src: r(RAX, Size::S4)
        })
    );
    // lock inc/dec/add/or/and/bts on memory: the ops the engine had
    assert!(matches!(lower64(&[0xf0, 0xff, 0x07]), Ok(Op::Unary { .. })));
    assert!(matches!(
        lower64(&[0xf0, 0x65, 0xff, 0x0c, 0x25, 0x10, 0, 0, 0]),
        Ok(Op::Unary { .. })
    ));
    assert!(matches!(lower64(&[0xf0, 0x01, 0x08]), Ok(Op::Alu { .. })));
    assert!(matches!(lower64(&[0xf0, 0x09, 0x08]), Ok(Op::Alu { .. })));
    assert!(matches!(lower64(&[0xf0, 0x21, 0x08]), Ok(Op::Alu { .. })));
    assert!(matches!(
        lower64(&[0xf0, 0x0f, 0xba, 0x2f, 0x03]),
        Ok(Op::Bit { .. })
    ));
    // leave (64-bit, and with an operand-size prefix), leave (16-bit code)
    assert_eq!(lower64(&[0xc9]), Ok(Op::Leave { size: Size::S8 }));
    assert_eq!(lower64(&[0x66, 0xc9]), Ok(Op::Leave { size: Size::S2 }));
    assert_eq!(lower16(&[0xc9]), Ok(Op::Leave { size: Size::S2 }));
    assert_eq!(lower32(&[0xc9]), Ok(Op::Leave { size: Size::S4 }));
    // bswap eax ; bswap r9
    assert_eq!(
        lower64(&[0x0f, 0xc8]),
        Ok(Op::Bswap {
            dst: r(RAX, Size::S4)
        })
    );
    assert_eq!(
        lower64(&[0x49, 0x0f, 0xc9]),
        Ok(Op::Bswap {
            dst: r(9, Size::S8)
        })
    );
    // mul rdx ; imul byte [rdi] ; mul cx
    assert_eq!(
        lower64(&[0x48, 0xf7, 0xe2]),
        Ok(Op::MulWide {
            signed: false,
            size: Size::S8,
            src: reg(RDX, Size::S8)
        })
    );
    assert_eq!(
        lower64(&[0xf6, 0x2f]),
        Ok(Op::MulWide {
            signed: true,
            size: Size::S1,
            src: m(RDI)
        })
    );
    assert!(matches!(
        lower32(&[0x66, 0xf7, 0xe1]),
        Ok(Op::MulWide {
            signed: false,
            size: Size::S2,
            ..
        })
    ));
}

#[test]
fn rejected_forms() {
    let is_form = |r: Result<Op, Unsupported>| matches!(r, Err(Unsupported::Form(_)));
    let is_mnemonic = |r: Result<Op, Unsupported>, m| r == Err(Unsupported::Mnemonic(m));
    // lock add eax, ecx: #UD on the CPU (iced decodes it only without its checks).
    let mut decoder = Decoder::with_ip(
        64,
        &[0xf0, 0x01, 0xc8],
        IP,
        DecoderOptions::NO_INVALID_CHECK,
    );
    assert!(is_form(lower(&decoder.decode())));
    // bswap ax (undefined)
    assert!(is_form(lower64(&[0x66, 0x0f, 0xc8])));
    // jmp far ptr16:32 (32-bit), call far [rax], retf
    assert!(is_form(lower32(&[0xea, 0, 0, 0, 0, 0x08, 0x00])));
    assert!(is_form(lower64(&[0xff, 0x18])));
    assert!(is_mnemonic(lower64(&[0xcb]), Mnemonic::Retf));
    // An operand-size prefix on a near branch in 64-bit code: Intel ignores it (the
    // decoder says so), so the branch stays 64-bit, as the engine runs it.
    assert!(matches!(
        lower64(&[0x66, 0xff, 0xd0]),
        Ok(Op::CallIndirect { size: Size::S8, .. })
    ));
    assert!(matches!(
        lower64(&[0x66, 0xc3]),
        Ok(Op::Ret { size: Size::S8, .. })
    ));
    // mov ds, ax ; mov ax, ds ; push fs ; mov dr7, rax
    assert!(is_form(lower32(&[0x8e, 0xd8])));
    assert!(is_form(lower32(&[0x8c, 0xd8])));
    assert!(is_form(lower64(&[0x0f, 0xa0])));
    assert!(is_form(lower64(&[0x0f, 0x23, 0xf8])));
    // string ops other than INS/OUTS
    assert!(is_mnemonic(lower64(&[0xf3, 0xa4]), Mnemonic::Movsb));
    assert!(is_mnemonic(lower64(&[0xaa]), Mnemonic::Stosb));
    // repne insb
    assert!(is_form(lower64(&[0xf2, 0x6c])));
    // other instructions: vmcall, lgdt, iretq, ud2, int3, wbnoinvd
    assert!(is_mnemonic(lower64(&[0x0f, 0x01, 0xc1]), Mnemonic::Vmcall));
    assert!(is_mnemonic(lower64(&[0x0f, 0x01, 0x10]), Mnemonic::Lgdt));
    assert!(is_mnemonic(lower64(&[0x48, 0xcf]), Mnemonic::Iretq));
    assert!(is_mnemonic(lower64(&[0x0f, 0x0b]), Mnemonic::Ud2));
    assert!(is_mnemonic(lower64(&[0xcc]), Mnemonic::Int3));
    assert!(is_mnemonic(
        lower64(&[0xf3, 0x0f, 0x09]),
        Mnemonic::Wbnoinvd
    ));
    // an invalid instruction
    let mut decoder = Decoder::with_ip(64, &[0x06], IP, DecoderOptions::NONE);
    assert!(lower(&decoder.decode()).is_err());
    assert_eq!(
        Unsupported::Form(Code::Add_rm32_r32).mnemonic(),
        Mnemonic::Add
    );
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn reg_ok(r: &RegRef) -> bool {
        r.index < 16 && (!r.high8 || (r.index < 4 && r.size == Size::S1))
    }

    fn mem_ok(m: &MemRef) -> bool {
        matches!(m.addr_size, Size::S2 | Size::S4 | Size::S8)
            && matches!(m.scale, 1 | 2 | 4 | 8)
            && m.base.is_none_or(|b| b < 16)
            && m.index.is_none_or(|i| i < 16)
            // Displacements are sign-extended from the address size.
            && match m.addr_size {
                Size::S2 => i16::try_from(m.disp).is_ok(),
                Size::S4 => i32::try_from(m.disp).is_ok(),
                _ => true,
            }
    }

    fn operand_ok(o: &Operand) -> bool {
        match o {
            Operand::Reg(r) => reg_ok(r),
            Operand::Mem(m) => mem_ok(m),
            Operand::Imm(_) => true,
        }
    }

    /// Structural promises of every lowered op.
    fn op_ok(op: &Op) -> bool {
        match op {
            Op::Mov { dst, src, .. } | Op::Alu { dst, src, .. } => {
                operand_ok(dst) && operand_ok(src) && !matches!(dst, Operand::Imm(_))
            }
            Op::Movzx { dst, src, src_size } | Op::Movsx { dst, src, src_size } => {
                reg_ok(dst) && operand_ok(src) && src_size.bytes() < dst.size.bytes()
            }
            Op::Lea { dst, addr } => reg_ok(dst) && mem_ok(addr),
            Op::Unary { dst, .. } | Op::Setcc { dst, .. } | Op::Pop { dst, .. } => {
                operand_ok(dst) && !matches!(dst, Operand::Imm(_))
            }
            Op::Shift { dst, count, .. } => {
                operand_ok(dst)
                    && match count {
                        Operand::Imm(_) => true,
                        Operand::Reg(r) => r.index == crate::ir::RCX && r.size == Size::S1,
                        Operand::Mem(_) => false,
                    }
            }
            Op::Bit { dst, bit, .. } => {
                operand_ok(dst) && operand_ok(bit) && !matches!(bit, Operand::Mem(_))
            }
            Op::Xchg { a, b, .. } => operand_ok(a) && operand_ok(b),
            Op::Push { size, src } => operand_ok(src) && *size != Size::S1,
            Op::Cmovcc { dst, src, size, .. } => {
                reg_ok(dst) && operand_ok(src) && dst.size == *size
            }
            Op::In { size, .. } | Op::Out { size, .. } => *size != Size::S8,
            Op::Ins {
                size, addr_size, ..
            }
            | Op::Outs {
                size, addr_size, ..
            } => *size != Size::S8 && *addr_size != Size::S1,
            Op::MovToCr { cr, src: r } | Op::MovFromCr { cr, dst: r } => {
                matches!(cr, 0 | 2 | 3 | 4 | 8) && *r < 16
            }
            Op::Lmsw { src } => match src {
                Operand::Reg(r) => reg_ok(r) && r.size == Size::S2,
                Operand::Mem(m) => mem_ok(m),
                Operand::Imm(_) => false,
            },
            Op::Invlpg { addr } => mem_ok(addr),
            op => op.target().is_none_or(|t| matches!(t, Target::Exit(_))),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20000, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_lower_without_panic_to_well_formed_ops(
            bytes in proptest::collection::vec(any::<u8>(), 1..16),
            bitness in proptest::sample::select(alloc::vec![16u32, 32, 64]),
            ip in any::<u64>(),
        ) {
            let ip = match bitness {
                16 => ip & 0xffff,
                32 => ip & 0xffff_ffff,
                _ => ip,
            };
            let mut decoder = Decoder::with_ip(bitness, &bytes, ip, DecoderOptions::NONE);
            let instr = decoder.decode();
            if let Ok(op) = lower(&instr) {
                prop_assert!(!instr.is_invalid());
                prop_assert!(!instr.has_lock_prefix() || instr.op0_kind() == iced_x86::OpKind::Memory);
                prop_assert!(op_ok(&op), "{op:?} from {bytes:02x?} ({bitness}-bit)");
            }
        }
    }
}
