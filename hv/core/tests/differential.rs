#![cfg(all(target_arch = "x86_64", target_os = "linux"))]
//! Differential test of the engine against the real CPU.
//!
//! Three cases in four run in 64-bit mode (engine: 4-level paging), one in four in
//! 32-bit compatibility mode (natively: a far jump to the 32-bit user code segment
//! 0x23 with code and data mapped below 4 GiB; engine: 32-bit protected mode with
//! non-PAE paging), where edi is the buffer base, ebp the small index, esi the bit
//! offset and esp the stack.
//!
//! Random sequences of gap-filler instructions (every legacy 64-bit form iced knows
//! for the IR's mnemonics, with random registers, immediates and memory operands) are
//! encoded with iced, run natively in this process (an RWX page with a prologue that
//! loads all GPRs and RFLAGS from a context and an epilogue that stores them), then
//! decoded, lowered with `avex_core::lower::lower` (the production path) and run by
//! the engine on a `TestGuest` whose 4-level page tables map the same virtual
//! addresses. Every GPR, the defined status flags and DF, and the data buffer must
//! agree.
//!
//! Memory operands are `[r15 + r13*scale + disp]` (r15 = the buffer, r13 small) or
//! `[rsp + disp]`; RSP points at a scratch stack inside the buffer. RSP, r13, r14
//! (a small bit offset for BT* with memory) and r15 are never written except by
//! PUSH/POP. Branches only go forward, inside the sequence or to its end. Flags the
//! SDM leaves undefined are tracked along every path: a candidate instruction that
//! would read an undefined flag is not generated, and flags still undefined at the
//! end are masked.
//!
//! Cases: `AVEX_DIFF_CASES` (default 1,000,000),
//! seed `AVEX_DIFF_SEED`. Prints exactly one line `differential: N cases, M
//! mismatches`; each mismatch (up to 5) is first minimized and printed with its bytes,
//! disassembly and inputs.

use avex_core::engine::{self, test_guest::TestGuest, Paging, RunLimits, StopReason};
use avex_core::guest::Guest;
use avex_core::ir::{Bitness, Cluster, Insn, Op, Target};
use avex_core::lower;
use iced_x86::{
    Code, Decoder, DecoderOptions, Encoder, Formatter, Instruction, IntelFormatter, MemoryOperand,
    Mnemonic, OpCodeOperandKind as K, Register, RflagsBits,
};

const STATUS: u64 = 0x8d5; // CF PF AF ZF SF OF
const DF: u64 = 0x400;

// Native code region layout (offsets in the RWX mapping).
const CODE_SIZE: usize = 0x3000;
const SEQ_OFF: u64 = 0xfc0; // sequences cross a page boundary
const EPI_OFF: u64 = 0x2000;
const CTX_OFF: u64 = 0x2800; // gpr[16], rflags, host rsp
                             // Data buffer.
const BUF_SIZE: usize = 5 * 4096;
const R15_OFF: u64 = 256;
const STACK_TOP: u64 = BUF_SIZE as u64 - 512;
// Guest-physical layout.
const CODE_GPA: u64 = 0x10000;
const BUF_GPA: u64 = 0x20000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// Interesting 64-bit values: edges, small numbers, random bits.
    fn value(&mut self) -> u64 {
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

/// The code size a case runs in natively and in the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// 64-bit mode, 4-level paging.
    M64,
    /// 32-bit compatibility mode (CS 0x23) natively; 32-bit protected mode with
    /// 32-bit (non-PAE) paging in the engine.
    M32,
}

impl Mode {
    fn bits(self) -> u32 {
        match self {
            Mode::M64 => 64,
            Mode::M32 => 32,
        }
    }
    fn nregs(self) -> u64 {
        match self {
            Mode::M64 => 16,
            Mode::M32 => 8,
        }
    }
    /// Never written except RSP by PUSH/POP: stack pointer, small index (memory
    /// operands), small bit offset (BT* with memory), buffer base.
    fn protected(self) -> [u64; 4] {
        match self {
            Mode::M64 => [4, 13, 14, 15],
            Mode::M32 => [4, 5, 6, 7],
        }
    }
    fn base(self) -> u64 {
        self.protected()[3]
    }
    fn index(self) -> u64 {
        self.protected()[1]
    }
    fn bitoff(self) -> u64 {
        self.protected()[2]
    }
    fn mask(self) -> u64 {
        match self {
            Mode::M64 => u64::MAX,
            Mode::M32 => 0xffff_ffff,
        }
    }
}

/// Register `i` of `size` bytes in `mode` (8-bit 4..=7 are AH..BH in 32-bit mode,
/// SPL..DIL in 64-bit mode).
fn reg_of(mode: Mode, size: u32, i: u64) -> Register {
    if mode == Mode::M32 && size == 1 {
        return Register::try_from(Register::AL as usize + i as usize).unwrap();
    }
    gpr(size, i)
}

const USER32_CS: u16 = 0x23;
const USER64_CS: u16 = 0x33;
const USER_DS: u16 = 0x2b;
const FAR_OFF: u64 = 0x2700; // far pointers (m16:32)
const PRO32_OFF: u64 = 0x100;
const EPI64_OFF: u64 = 0x2400;

struct Native {
    mode: Mode,
    code: *mut u8,
    buf: *mut u8,
}

impl Native {
    fn new(mode: Mode) -> Native {
        let low = if mode == Mode::M32 {
            libc::MAP_32BIT
        } else {
            0
        };
        // SAFETY: anonymous private mappings with no address hint; checked for failure.
        let (code, buf) = unsafe {
            let code = libc::mmap(
                core::ptr::null_mut(),
                CODE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | low,
                -1,
                0,
            );
            let buf = libc::mmap(
                core::ptr::null_mut(),
                BUF_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | low,
                -1,
                0,
            );
            assert!(
                code != libc::MAP_FAILED && buf != libc::MAP_FAILED,
                "mmap failed"
            );
            (code as *mut u8, buf as *mut u8)
        };
        let n = Native { mode, code, buf };
        if mode == Mode::M32 {
            assert!(
                n.base() + CODE_SIZE as u64 <= 1 << 32 && n.buf_va() + BUF_SIZE as u64 <= 1 << 32
            );
            n.write_code(0, &n.prologue64_to_32());
            n.write_code(PRO32_OFF, &n.prologue32());
            n.write_code(EPI_OFF, &n.epilogue32());
            n.write_code(EPI64_OFF, &n.epilogue64_from_32());
            let mut far = Vec::new();
            far.extend(((n.base() + PRO32_OFF) as u32).to_le_bytes());
            far.extend(USER32_CS.to_le_bytes());
            far.extend([0, 0]);
            far.extend(((n.base() + EPI64_OFF) as u32).to_le_bytes());
            far.extend(USER64_CS.to_le_bytes());
            n.write_code(FAR_OFF, &far);
        } else {
            n.write_code(0, &n.prologue());
            n.write_code(EPI_OFF, &n.epilogue());
        }
        n
    }
    fn base(&self) -> u64 {
        self.code as u64
    }
    fn buf_va(&self) -> u64 {
        self.buf as u64
    }
    fn write_code(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= CODE_SIZE);
        // SAFETY: in bounds of the CODE_SIZE mapping (checked above).
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.code.add(off as usize), bytes.len())
        }
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is BUF_SIZE bytes, private to this test (single-threaded use).
        unsafe { core::slice::from_raw_parts_mut(self.buf, BUF_SIZE) }
    }
    fn ctx(&mut self) -> &mut [u64; 18] {
        // SAFETY: CTX_OFF + 18*8 is inside the code mapping, 8-byte aligned.
        unsafe { &mut *(self.code.add(CTX_OFF as usize) as *mut [u64; 18]) }
    }

    fn enc(ip: u64, list: &[Instruction]) -> Vec<u8> {
        Self::enc_bits(64, ip, list)
    }

    fn enc_bits(bits: u32, ip: u64, list: &[Instruction]) -> Vec<u8> {
        let mut e = Encoder::new(bits);
        let mut ip = ip;
        for i in list {
            let n = e.encode(i, ip).expect("harness encoding");
            ip += n as u64;
        }
        e.take_buffer()
    }

    fn ctx_mem(&self, slot: u64) -> MemoryOperand {
        MemoryOperand::with_base_displ(Register::RIP, (self.base() + CTX_OFF + slot * 8) as i64)
    }

    fn prologue(&self) -> Vec<u8> {
        let mut l = Vec::new();
        for r in [
            Register::RBX,
            Register::RBP,
            Register::R12,
            Register::R13,
            Register::R14,
            Register::R15,
        ] {
            l.push(Instruction::with1(Code::Push_r64, r).unwrap());
        }
        l.push(Instruction::with2(Code::Mov_rm64_r64, self.ctx_mem(17), Register::RSP).unwrap());
        l.push(Instruction::with2(Code::Lea_r64_m, Register::RSP, self.ctx_mem(16)).unwrap());
        l.push(Instruction::with(Code::Popfq));
        for i in 0..16u64 {
            if i != 4 {
                l.push(Instruction::with2(Code::Mov_r64_rm64, gpr64(i), self.ctx_mem(i)).unwrap());
            }
        }
        l.push(Instruction::with2(Code::Mov_r64_rm64, Register::RSP, self.ctx_mem(4)).unwrap());
        l.push(Instruction::with_branch(Code::Jmp_rel32_64, self.base() + SEQ_OFF).unwrap());
        Self::enc(self.base(), &l)
    }

    fn epilogue(&self) -> Vec<u8> {
        let mut l = Vec::new();
        for i in 0..16u64 {
            l.push(Instruction::with2(Code::Mov_rm64_r64, self.ctx_mem(i), gpr64(i)).unwrap());
        }
        l.push(Instruction::with2(Code::Lea_r64_m, Register::RSP, self.ctx_mem(17)).unwrap());
        l.push(Instruction::with(Code::Pushfq));
        l.push(Instruction::with2(Code::Mov_r64_rm64, Register::RSP, self.ctx_mem(17)).unwrap());
        for r in [
            Register::R15,
            Register::R14,
            Register::R13,
            Register::R12,
            Register::RBP,
            Register::RBX,
        ] {
            l.push(Instruction::with1(Code::Pop_r64, r).unwrap());
        }
        l.push(Instruction::with(Code::Cld));
        l.push(Instruction::with(Code::Retnq));
        Self::enc(self.base() + EPI_OFF, &l)
    }

    /// Absolute 32-bit memory operand for a context slot.
    fn ctx_abs(&self, slot: u64) -> MemoryOperand {
        MemoryOperand::with_displ(self.base() + CTX_OFF + slot * 8, 4)
    }

    fn prologue64_to_32(&self) -> Vec<u8> {
        let mut l = Vec::new();
        for r in [
            Register::RBX,
            Register::RBP,
            Register::R12,
            Register::R13,
            Register::R14,
            Register::R15,
        ] {
            l.push(Instruction::with1(Code::Push_r64, r).unwrap());
        }
        l.push(Instruction::with2(Code::Mov_rm64_r64, self.ctx_mem(17), Register::RSP).unwrap());
        let far = MemoryOperand::with_base_displ(Register::RIP, (self.base() + FAR_OFF) as i64);
        l.push(Instruction::with1(Code::Jmp_m1632, far).unwrap());
        Self::enc(self.base(), &l)
    }

    fn prologue32(&self) -> Vec<u8> {
        // Compatibility mode needs usable data segments (64-bit Linux runs with DS=ES=0).
        let mut l = vec![
            Instruction::with2(Code::Mov_r32_imm32, Register::EAX, USER_DS as u32).unwrap(),
            Instruction::with2(Code::Mov_Sreg_r32m16, Register::DS, Register::EAX).unwrap(),
            Instruction::with2(Code::Mov_Sreg_r32m16, Register::ES, Register::EAX).unwrap(),
        ];
        l.push(
            Instruction::with2(
                Code::Mov_r32_imm32,
                Register::ESP,
                (self.base() + CTX_OFF + 16 * 8) as u32,
            )
            .unwrap(),
        );
        l.push(Instruction::with(Code::Popfd));
        for i in 0..8u64 {
            if i != 4 {
                l.push(Instruction::with2(Code::Mov_r32_rm32, gpr(4, i), self.ctx_abs(i)).unwrap());
            }
        }
        l.push(Instruction::with2(Code::Mov_r32_rm32, Register::ESP, self.ctx_abs(4)).unwrap());
        l.push(Instruction::with_branch(Code::Jmp_rel32_32, self.base() + SEQ_OFF).unwrap());
        Self::enc_bits(32, self.base() + PRO32_OFF, &l)
    }

    fn epilogue32(&self) -> Vec<u8> {
        let mut l = Vec::new();
        for i in 0..8u64 {
            l.push(Instruction::with2(Code::Mov_rm32_r32, self.ctx_abs(i), gpr(4, i)).unwrap());
        }
        l.push(
            Instruction::with2(
                Code::Mov_r32_imm32,
                Register::ESP,
                (self.base() + CTX_OFF + 16 * 8 + 4) as u32,
            )
            .unwrap(),
        );
        l.push(Instruction::with(Code::Pushfd));
        let far = MemoryOperand::with_displ(self.base() + FAR_OFF + 8, 4);
        l.push(Instruction::with1(Code::Jmp_m1632, far).unwrap());
        Self::enc_bits(32, self.base() + EPI_OFF, &l)
    }

    fn epilogue64_from_32(&self) -> Vec<u8> {
        let mut l = Vec::new();
        l.push(Instruction::with2(Code::Mov_r64_rm64, Register::RSP, self.ctx_mem(17)).unwrap());
        for r in [
            Register::R15,
            Register::R14,
            Register::R13,
            Register::R12,
            Register::RBP,
            Register::RBX,
        ] {
            l.push(Instruction::with1(Code::Pop_r64, r).unwrap());
        }
        l.push(Instruction::with(Code::Cld));
        l.push(Instruction::with(Code::Retnq));
        Self::enc(self.base() + EPI64_OFF, &l)
    }

    /// Runs `seq` (placed at SEQ_OFF, followed by a jump to the epilogue).
    fn run(&mut self, seq: &[u8], gpr: &[u64; 16], rflags: u64) -> ([u64; 16], u64) {
        let mut code = seq.to_vec();
        let after = self.base() + SEQ_OFF + seq.len() as u64;
        let jmp = if self.mode == Mode::M32 {
            Code::Jmp_rel32_32
        } else {
            Code::Jmp_rel32_64
        };
        code.extend(Self::enc_bits(
            self.mode.bits(),
            after,
            &[Instruction::with_branch(jmp, self.base() + EPI_OFF).unwrap()],
        ));
        self.write_code(SEQ_OFF, &code);
        let ctx = self.ctx();
        ctx[..16].copy_from_slice(gpr);
        ctx[16] = rflags;
        ctx[17] = 0;
        // SAFETY: the mapping holds the prologue (saves callee-saved registers and the
        // host RSP, loads the context), the sequence (generated to touch only the
        // buffer and its scratch stack, never to branch outside itself) and the
        // epilogue (stores the context, restores the host state, clears DF, returns).
        unsafe {
            let f: extern "sysv64" fn() = core::mem::transmute(self.code);
            f();
        }
        let mode = self.mode;
        let ctx = self.ctx();
        let mut out = [0; 16];
        out.copy_from_slice(&ctx[..16]);
        if mode == Mode::M32 {
            // The 32-bit epilogue stored dwords over the inputs: keep the low halves.
            for v in out.iter_mut() {
                *v &= 0xffff_ffff;
            }
            return (out, ctx[16] & 0xffff_ffff);
        }
        (out, ctx[16])
    }
}

fn gpr64(i: u64) -> Register {
    [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ][i as usize]
}

fn gpr(size: u32, i: u64) -> Register {
    let base = match size {
        8 => Register::RAX,
        4 => Register::EAX,
        2 => Register::AX,
        _ => Register::AL,
    };
    if size == 1 && (4..8).contains(&i) {
        // AL..BL, then SPL..DIL (index 4..7 with REX)
        return [Register::SPL, Register::BPL, Register::SIL, Register::DIL][i as usize - 4];
    }
    if size == 1 && i >= 8 {
        return Register::try_from(Register::R8L as usize + (i as usize - 8)).unwrap();
    }
    Register::try_from(base as usize + i as usize).unwrap()
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

/// One generated instruction; branches carry their target as an index (len = end).
#[derive(Clone)]
struct Spec {
    instr: Instruction,
    target: Option<usize>,
}

struct Gen {
    mode: Mode,
    /// Host (= guest virtual) address of the data buffer and of the sequence, for
    /// RIP-relative (64-bit) and absolute (32-bit) memory operands.
    buf_base: u64,
    seq_ip: u64,
    codes: Vec<Code>,
    branch_codes: Vec<Code>,
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
            | Jrcxz
            | Jecxz
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
    )
}

impl Gen {
    fn new(mode: Mode, buf_base: u64, seq_ip: u64) -> Gen {
        let mut codes = Vec::new();
        let mut branch_codes = Vec::new();
        for c in Code::values() {
            let oc = c.op_code();
            if !oc.is_instruction()
                || !(if mode == Mode::M64 {
                    oc.mode64()
                } else {
                    oc.mode32()
                })
                || oc.encoding() != iced_x86::EncodingKind::Legacy
            {
                continue;
            }
            let m = c.mnemonic();
            let kinds: Vec<K> = (0..oc.op_count()).map(|i| oc.op_kind(i)).collect();
            if branch_ok(m) {
                let br = if mode == Mode::M64 {
                    matches!(kinds[0], K::br64_1 | K::br64_4)
                } else {
                    matches!(kinds[0], K::br32_1 | K::br32_4)
                };
                if kinds.len() == 1 && br {
                    branch_codes.push(c);
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
                // One-operand IMUL (RDX:RAX result) is not in the IR's set.
                if m == Mnemonic::Imul && kinds.len() == 1 {
                    continue;
                }
                codes.push(c);
            }
        }
        Gen {
            mode,
            buf_base,
            seq_ip,
            codes,
            branch_codes,
        }
    }

    fn reg_for(&self, rng: &mut Rng, size: u32, dst: bool) -> Register {
        if self.mode == Mode::M32 {
            loop {
                let i = rng.below(8);
                // AH..BH (4..=7) are parts of EAX..EBX, never protected.
                if dst && size != 1 && self.mode.protected().contains(&i) {
                    continue;
                }
                return reg_of(self.mode, size, i);
            }
        }
        loop {
            let i = rng.below(if size == 1 { 20 } else { 16 });
            if size == 1 && i >= 16 {
                // AH..BH
                return [Register::AH, Register::CH, Register::DH, Register::BH][i as usize - 16];
            }
            if dst && self.mode.protected().contains(&i) {
                continue;
            }
            return gpr(size, i);
        }
    }

    fn mem(&self, rng: &mut Rng) -> MemoryOperand {
        if rng.chance(1, 8) {
            let d = rng.below(512) as i64 - 256;
            return MemoryOperand::with_base_displ_size(
                gpr(self.mode.bits() / 8, 4),
                d,
                if (-128..128).contains(&d) { 1 } else { 4 },
            );
        }
        let max = (BUF_SIZE as u64 - R15_OFF - 1024) as i64;
        let d = match rng.below(3) {
            // near a page boundary (of the buffer's pages)
            0 => (4096 * (1 + rng.below(3)) as i64 - 8 + rng.below(16) as i64) - R15_OFF as i64,
            _ => rng.below(max as u64) as i64,
        };
        if rng.chance(1, 8) {
            // RIP-relative (64-bit; lowered to an absolute address) or absolute disp32.
            let target = self.buf_base + R15_OFF + d as u64;
            match self.mode {
                Mode::M64 if (target as i64 - self.seq_ip as i64).unsigned_abs() < 0x7000_0000 => {
                    return MemoryOperand::with_base_displ(Register::RIP, target as i64);
                }
                Mode::M32 => return MemoryOperand::with_displ(target, 4),
                _ => {}
            }
        }
        let ds = if (-128..128).contains(&d) { 1 } else { 4 };
        if rng.chance(1, 2) {
            let scale = 1 << rng.below(4);
            MemoryOperand::with_base_index_scale_displ_size(
                gpr(self.mode.bits() / 8, self.mode.base()),
                gpr(self.mode.bits() / 8, self.mode.index()),
                scale,
                d,
                ds,
            )
        } else {
            MemoryOperand::with_base_displ_size(gpr(self.mode.bits() / 8, self.mode.base()), d, ds)
        }
    }

    /// One random non-branch instruction.
    fn insn(&self, rng: &mut Rng) -> Option<Instruction> {
        let code = self.codes[rng.below(self.codes.len() as u64) as usize];
        let oc = code.op_code();
        let m = code.mnemonic();
        let n = oc.op_count();
        // Operands written: op0 (and op1 for XCHG); POP's and everything's op0.
        let bitop = matches!(
            m,
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        );
        let mut ops: Vec<Arg> = Vec::new();
        let mut mem_used = false;
        for i in 0..n {
            let k = oc.op_kind(i);
            let dst = i == 0 || m == Mnemonic::Xchg;
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
                        Arg::M(self.mem(rng))
                    } else {
                        Arg::R(self.reg_for(rng, size, dst))
                    }
                }
                K::mem => Arg::M(self.mem(rng)),
                K::r8_reg | K::r8_opcode => Arg::R(self.reg_for(rng, 1, dst)),
                K::r16_reg | K::r16_opcode => Arg::R(self.reg_for(rng, 2, dst)),
                K::r32_reg | K::r32_opcode => Arg::R(self.reg_for(rng, 4, dst)),
                K::r64_reg | K::r64_opcode => Arg::R(self.reg_for(rng, 8, dst)),
                K::al => Arg::R(Register::AL),
                K::ax => Arg::R(Register::AX),
                K::eax => Arg::R(Register::EAX),
                K::rax => Arg::R(Register::RAX),
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
        // BT* with a memory operand and a register offset: the offset register must be
        // r14 (small), or the access would leave the buffer.
        if bitop && matches!(ops.first(), Some(Arg::M(_))) {
            if let Some(Arg::R(r)) = ops.get(1) {
                let size = r.size() as u32;
                ops[1] = Arg::R(reg_of(self.mode, size, self.mode.bitoff()));
            }
        }
        // XCHG/MOV etc. written registers must not be protected (checked by reg_for);
        // implicit RSP writers other than PUSH/POP do not exist in the set.
        // Three operands: IMUL r, r/m, imm.
        if let [a, b, Arg::I(imm)] = ops[..] {
            let r = match (a, b) {
                (Arg::R(x), Arg::R(y)) => Instruction::with3(code, x, y, imm as i32),
                (Arg::R(x), Arg::M(y)) => Instruction::with3(code, x, y, imm as i32),
                _ => return None,
            };
            let instr = r.ok()?;
            Encoder::new(self.mode.bits())
                .encode(&instr, self.seq_ip)
                .ok()?;
            return Some(instr);
        }
        let r = match (ops.first(), ops.get(1)) {
            (None, _) => Ok(Instruction::with(code)),
            (Some(a), None) => match *a {
                Arg::R(r) => Instruction::with1(code, r),
                Arg::M(mm) => Instruction::with1(code, mm),
                Arg::I(i) => Instruction::with1(code, i as i32),
                Arg::I64(_) => return None,
            },
            (Some(a), Some(b)) => match (*a, *b) {
                (Arg::R(x), Arg::R(y)) => Instruction::with2(code, x, y),
                (Arg::R(x), Arg::M(y)) => Instruction::with2(code, x, y),
                (Arg::M(x), Arg::R(y)) => Instruction::with2(code, x, y),
                (Arg::R(x), Arg::I(y)) => Instruction::with2(code, x, y as i32),
                (Arg::R(x), Arg::I64(y)) => Instruction::with2(code, x, y),
                (Arg::M(x), Arg::I(y)) => Instruction::with2(code, x, y as i32),
                _ => return None,
            },
        };
        let instr = r.ok()?;
        // Must encode (e.g. AH with a REX prefix does not).
        Encoder::new(self.mode.bits())
            .encode(&instr, self.seq_ip)
            .ok()?;
        Some(instr)
    }
}

#[derive(Clone, Copy)]
enum Arg {
    R(Register),
    M(MemoryOperand),
    I(i64),
    I64(u64),
}

fn iced_to_x86(f: u32) -> u64 {
    let mut r = 0;
    for (i, x) in [
        (RflagsBits::OF, 0x800),
        (RflagsBits::SF, 0x80),
        (RflagsBits::ZF, 0x40),
        (RflagsBits::AF, 0x10),
        (RflagsBits::CF, 0x1),
        (RflagsBits::PF, 0x4),
        (RflagsBits::DF, 0x400),
    ] {
        if f & i != 0 {
            r |= x;
        }
    }
    r
}

/// Flags an instruction leaves undefined (SDM), beyond what iced reports.
fn undefined_by(i: &Instruction) -> u64 {
    let mut u = iced_to_x86(i.rflags_undefined());
    let m = i.mnemonic();
    let size = operand_bits(i);
    match m {
        Mnemonic::And | Mnemonic::Or | Mnemonic::Xor | Mnemonic::Test => u |= 0x10,
        Mnemonic::Shl
        | Mnemonic::Sal
        | Mnemonic::Shr
        | Mnemonic::Sar
        | Mnemonic::Rol
        | Mnemonic::Ror
        | Mnemonic::Rcl
        | Mnemonic::Rcr => {
            let cnt = if i.op_count() > 1 && i.op1_kind() != iced_x86::OpKind::Register {
                Some(i.immediate8() as u64 & if size == 64 { 63 } else { 31 })
            } else {
                None // CL: unknown here
            };
            let shift = matches!(
                m,
                Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr | Mnemonic::Sar
            );
            if cnt != Some(1) {
                u |= 0x800;
            }
            if shift && cnt != Some(0) {
                u |= 0x10;
            }
            if matches!(m, Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr)
                && size < 32
                && cnt.is_none_or(|c| c >= size as u64)
            {
                u |= 1;
            }
        }
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
            u |= 0x800 | 0x80 | 0x10 | 0x4
        }
        _ => {}
    }
    u
}

fn operand_bits(i: &Instruction) -> u32 {
    match i.op0_kind() {
        iced_x86::OpKind::Register => i.op0_register().size() as u32 * 8,
        iced_x86::OpKind::Memory => i.memory_size().size() as u32 * 8,
        _ => 64,
    }
}

/// Undefined flags at the end of the sequence, or `None` when some instruction on
/// some path reads a flag that is undefined there.
fn analyze(specs: &[Spec]) -> Option<u64> {
    let n = specs.len();
    let mut incoming = vec![0u64; n + 1];
    let mut live = vec![false; n + 1];
    live[0] = true;
    for (i, s) in specs.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let cur = incoming[i];
        let read = iced_to_x86(s.instr.rflags_read());
        if read & cur != 0 {
            return None;
        }
        let written = iced_to_x86(s.instr.rflags_modified());
        let undef = undefined_by(&s.instr);
        let by_cl = s.instr.op_count() > 1
            && s.instr.op1_kind() == iced_x86::OpKind::Register
            && s.instr.op1_register() == Register::CL;
        // A shift/rotate by CL may leave every flag unchanged (count 0): keep old taint.
        let out = if by_cl {
            cur | undef
        } else {
            (cur & !written) | undef
        };
        if let Some(t) = s.target {
            let t = t.min(n);
            incoming[t] |= out;
            live[t] = true;
        }
        if s.instr.mnemonic() != Mnemonic::Jmp {
            incoming[i + 1] |= out;
            live[i + 1] = true;
        }
    }
    Some(incoming[n])
}

/// Encodes the sequence at `ip`; returns the bytes and each instruction's address.
fn layout(bits: u32, specs: &[Spec], ip: u64) -> Option<(Vec<u8>, Vec<u64>)> {
    let mut enc = Encoder::new(bits);
    let mut lens = Vec::with_capacity(specs.len());
    for s in specs {
        let mut i = s.instr;
        // Lengths do not depend on the position (branches are encoded in their own
        // fixed-size forms, RIP-relative operands always take a disp32).
        if s.target.is_some() {
            i.set_near_branch64(ip + 0x10);
        }
        lens.push(enc.encode(&i, ip).ok()?);
        let _ = enc.take_buffer();
    }
    let mut rips = Vec::with_capacity(specs.len() + 1);
    let mut r = ip;
    for l in &lens {
        rips.push(r);
        r += *l as u64;
    }
    rips.push(r);
    let mut enc = Encoder::new(bits);
    for (k, s) in specs.iter().enumerate() {
        let mut i = s.instr;
        if let Some(t) = s.target {
            i.set_near_branch64(rips[t]);
        }
        let l = enc.encode(&i, rips[k]).ok()?;
        if l != lens[k] {
            return None;
        }
    }
    rips.pop();
    Some((enc.take_buffer(), rips))
}

fn gen_case(g: &Gen, rng: &mut Rng) -> Vec<Spec> {
    let k = 1 + rng.below(8) as usize;
    let mut specs: Vec<Spec> = Vec::with_capacity(k);
    let mut tries = 0;
    while specs.len() < k && tries < 200 {
        tries += 1;
        let spec = if rng.chance(1, 8) && specs.len() + 1 < k + 1 {
            let code = g.branch_codes[rng.below(g.branch_codes.len() as u64) as usize];
            let Ok(instr) = Instruction::with_branch(code, 0x1010) else {
                continue;
            };
            // Forward: to a later instruction or the end (index k).
            let t = specs.len() + 1 + rng.below((k - specs.len()) as u64) as usize;
            Spec {
                instr,
                target: Some(t),
            }
        } else {
            match g.insn(rng) {
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

struct World {
    mode: Mode,
    native: Native,
    guest: TestGuest,
    buf_snapshot: Vec<u8>,
}

#[derive(Debug)]
enum CaseResult {
    Ok,
    /// lower() refused an instruction.
    Skipped,
    Mismatch(String),
}

impl World {
    fn new(mode: Mode) -> World {
        let native = Native::new(mode);
        let mut guest = match mode {
            Mode::M64 => TestGuest::long_mode(1 << 20),
            Mode::M32 => TestGuest::protected32(1 << 20, Paging::Bits32 { pse: false }),
        };
        let flags = 0x3; // P | RW
        let nx = if mode == Mode::M64 { 1 << 63 } else { 0 };
        guest.map_range(native.base() & !0xfff, CODE_GPA, CODE_SIZE as u64, flags);
        guest.map_range(native.buf_va(), BUF_GPA, BUF_SIZE as u64, flags | nx);
        World {
            mode,
            native,
            guest,
            buf_snapshot: vec![0; BUF_SIZE],
        }
    }

    fn seq_ip(&self) -> u64 {
        self.native.base() + SEQ_OFF
    }

    fn run_case(&mut self, specs: &[Spec], gpr0: &[u64; 16], fl0: u64, report: bool) -> CaseResult {
        let ip = self.seq_ip();
        let bits = self.mode.bits();
        let Some((bytes, rips)) = layout(bits, specs, ip) else {
            return CaseResult::Skipped;
        };
        let Some(undef) = analyze(specs) else {
            return CaseResult::Skipped;
        };
        // Decode and lower (the production path).
        let end = ip + bytes.len() as u64;
        let mut dec = Decoder::with_ip(bits, &bytes, ip, DecoderOptions::NONE);
        let mut insns = Vec::new();
        while dec.can_decode() {
            let d = dec.decode();
            let Ok(op) = lower::lower(&d) else {
                return CaseResult::Skipped;
            };
            insns.push(Insn {
                rip: d.ip(),
                len: d.len() as u8,
                op,
                exit_class: None,
            });
        }
        for insn in insns.iter_mut() {
            let fix = |t: Target| match t {
                Target::Exit(a) => match rips.iter().position(|&r| r == a) {
                    Some(k) => Target::Insn(k as u16),
                    None => t,
                },
                t => t,
            };
            match &mut insn.op {
                Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => {
                    *target = fix(*target)
                }
                _ => {}
            }
        }
        let cluster = Cluster {
            start: ip,
            end,
            bitness: if bits == 64 {
                Bitness::B64
            } else {
                Bitness::B32
            },
            guest_bytes: bytes.clone(),
            insns,
            back_edges: Vec::new(),
        };
        // Native run.
        self.native.buf().copy_from_slice(&self.buf_snapshot);
        let (ngpr, nfl) = self.native.run(&bytes, gpr0, fl0);
        // Engine run.
        let code_gpa = CODE_GPA + (ip - self.native.base());
        self.guest.write_bytes(code_gpa, &bytes);
        self.guest.write_bytes(BUF_GPA, &self.buf_snapshot);
        self.guest.state.gpr = *gpr0;
        self.guest.state.rflags = fl0 | 0x202;
        self.guest.state.rip = ip;
        let out = engine::run(&cluster, &mut self.guest, 0, &RunLimits::default());
        let st = self.guest.state();
        let mask = (STATUS | DF) & !undef;
        let mut diffs = String::new();
        if !matches!(out.reason, StopReason::End | StopReason::ExitBranch) || out.rip != end {
            diffs += &format!(
                "  stop: {:?} at {:#x} (expected end {:#x})\n",
                out.reason, out.rip, end
            );
        }
        let m = self.mode.mask();
        for (i, (&e, &n)) in st
            .gpr
            .iter()
            .zip(ngpr.iter())
            .enumerate()
            .take(self.mode.nregs() as usize)
        {
            let (e, n) = (e & m, n & m);
            if e != n {
                diffs += &format!(
                    "  {:?}: engine {:#x} cpu {:#x}\n",
                    reg_of(self.mode, bits / 8, i as u64),
                    e,
                    n
                );
            }
        }
        if (st.rflags ^ nfl) & mask != 0 {
            diffs += &format!(
                "  rflags (mask {:#x}): engine {:#x} cpu {:#x}\n",
                mask,
                st.rflags & mask,
                nfl & mask
            );
        }
        let gbuf = self.guest.bytes(BUF_GPA, BUF_SIZE).to_vec();
        let nbuf = self.native.buf();
        if gbuf != nbuf {
            let first = (0..BUF_SIZE).find(|&k| gbuf[k] != nbuf[k]).unwrap();
            diffs += &format!(
                "  memory differs first at buf+{:#x} (r15{:+}): engine {:02x?} cpu {:02x?}\n",
                first,
                first as i64 - R15_OFF as i64,
                &gbuf[first..(first + 8).min(BUF_SIZE)],
                &nbuf[first..(first + 8).min(BUF_SIZE)]
            );
        }
        if diffs.is_empty() {
            return CaseResult::Ok;
        }
        if !report {
            return CaseResult::Mismatch(String::new());
        }
        let mut s = String::new();
        s += &format!(
            "  bytes: {}\n",
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut f = IntelFormatter::new();
        let mut dec = Decoder::with_ip(bits, &bytes, ip, DecoderOptions::NONE);
        for (k, d) in (&mut dec).into_iter().enumerate() {
            let mut t = String::new();
            f.format(&d, &mut t);
            s += &format!(
                "  [{k}] {:#x}: {t}   => {:?}\n",
                d.ip(),
                cluster.insns.get(k).map(|i| i.op)
            );
        }
        s += &format!("  inputs: rflags {fl0:#x}\n");
        for (i, v) in gpr0.iter().enumerate() {
            if (i as u64) < self.mode.nregs() {
                s += &format!(
                    "    {:?} = {:#x}\n",
                    reg_of(self.mode, bits / 8, i as u64),
                    v
                );
            }
        }
        CaseResult::Mismatch(s + &diffs)
    }
}

fn random_inputs(rng: &mut Rng, w: &World) -> ([u64; 16], u64) {
    let mode = w.mode;
    let mut gpr = [0u64; 16];
    for g in gpr.iter_mut().take(mode.nregs() as usize) {
        *g = rng.value() & mode.mask();
    }
    gpr[4] = w.native.buf_va() + STACK_TOP - 8 * rng.below(8);
    gpr[mode.index() as usize] = rng.below(64);
    gpr[mode.bitoff() as usize] = (rng.below(512) as i64 - 256) as u64 & mode.mask();
    gpr[mode.base() as usize] = w.native.buf_va() + R15_OFF;
    let fl = 0x2 | (rng.next() & STATUS) | if rng.chance(1, 8) { DF } else { 0 };
    (gpr, fl)
}

#[test]
fn differential_against_cpu() {
    let default = 1_000_000;
    let cases: u64 = std::env::var("AVEX_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let seed: u64 = std::env::var("AVEX_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_a7e5);
    let mut worlds = [World::new(Mode::M64), World::new(Mode::M32)];
    let gens = [0, 1].map(|m| {
        let w = &worlds[m];
        Gen::new(w.mode, w.native.buf_va(), w.seq_ip())
    });
    for g in &gens {
        assert!(
            g.codes.len() > 150,
            "too few {:?} instruction forms: {}",
            g.mode,
            g.codes.len()
        );
    }
    let mut rng = Rng(seed);
    for w in worlds.iter_mut() {
        for b in w.buf_snapshot.iter_mut() {
            *b = rng.next() as u8;
        }
    }
    let (mut mismatches, mut skipped, mut insns) = (0u64, 0u64, 0u64);
    let mut reports = Vec::new();
    let mut per_mode = [0u64; 2];
    for case in 0..cases {
        // One case in four runs in 32-bit mode.
        let m = usize::from(rng.chance(1, 4));
        per_mode[m] += 1;
        let (g, w) = (&gens[m], &mut worlds[m]);
        let specs = gen_case(g, &mut rng);
        let (gpr, fl) = random_inputs(&mut rng, w);
        // Refresh a few buffer words so memory inputs vary.
        for _ in 0..4 {
            let k = rng.below(BUF_SIZE as u64 - 8) as usize;
            w.buf_snapshot[k..k + 8].copy_from_slice(&rng.next().to_le_bytes());
        }
        let snapshot = w.buf_snapshot.clone();
        match w.run_case(&specs, &gpr, fl, false) {
            CaseResult::Ok => insns += specs.len() as u64,
            CaseResult::Skipped => skipped += 1,
            CaseResult::Mismatch(_) => {
                mismatches += 1;
                if reports.len() < 5 {
                    // Minimize: drop instructions while the mismatch persists.
                    let mut cur = specs.clone();
                    let mut k = 0;
                    while k < cur.len() && cur.len() > 1 {
                        let mut cand = cur.clone();
                        cand.remove(k);
                        for s in cand.iter_mut() {
                            if let Some(t) = s.target.as_mut() {
                                if *t > k {
                                    *t -= 1;
                                }
                            }
                        }
                        let ok_targets = cand
                            .iter()
                            .enumerate()
                            .all(|(i, s)| s.target.is_none_or(|t| t > i));
                        if ok_targets {
                            w.buf_snapshot.copy_from_slice(&snapshot);
                            if let CaseResult::Mismatch(_) = w.run_case(&cand, &gpr, fl, false) {
                                cur = cand;
                                continue;
                            }
                        }
                        k += 1;
                    }
                    w.buf_snapshot.copy_from_slice(&snapshot);
                    if let CaseResult::Mismatch(s) = w.run_case(&cur, &gpr, fl, true) {
                        reports.push(
                            format!("{:?} ", w.mode,)
                                + &format!(
                            "case {case} (seed {seed:#x}), minimized to {} instruction(s):\n{s}",
                            cur.len()
                        ),
                        );
                    }
                }
            }
        }
        // The CPU's memory is the truth for the next case.
        w.buf_snapshot.copy_from_slice(w.native.buf());
    }
    println!("differential: {cases} cases, {mismatches} mismatches");
    for r in &reports {
        eprintln!("{r}");
    }
    if mismatches > 0 || skipped > 0 {
        eprintln!(
        "(instructions compared: {insns}; 64-bit cases {}, 32-bit cases {}; cases skipped because lower() refused a form: {skipped})",
        per_mode[0], per_mode[1]
    );
    }
    assert_eq!(mismatches, 0, "engine and CPU disagree");
    assert!(
        skipped * 20 < cases.max(1),
        "lower() refused too many generated forms: {skipped} of {cases}"
    );
}
