//! Thunks recognised by their bytes: Linux's `__x86_indirect_thunk_<reg>` and
//! return thunks, in every form its boot-time patching leaves them. The AOT pass
//! finds them in the ELF (by name too), the hypervisor in guest memory, both with
//! [`resolve_thunk`], so both build the same regions through them.

use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::source::Thunk;
use super::{decode_at, CodeSource};
use crate::ir::{Bitness, RSP};
use crate::lower::gpr_index;

/// The first bytes a thunk [`resolve_thunk`] recognises can start with: RET (C3),
/// LFENCE (0F AE E8), CALL rel32 (E8), JMP r/m (FF, with or without a REX prefix
/// 41). A caller scanning many addresses decodes only those.
pub const THUNK_FIRST_BYTES: [u8; 5] = [0xc3, 0x0f, 0xe8, 0xff, 0x41];

/// Whether the code at `addr` starts with one of [`THUNK_FIRST_BYTES`]: the cheap
/// test before decoding.
pub fn may_start_thunk(src: &mut dyn CodeSource, addr: u64) -> bool {
    let mut first = [0u8; 1];
    src.read(addr, &mut first) == 1 && THUNK_FIRST_BYTES.contains(&first[0])
}

fn is_ret(ins: &Instruction) -> bool {
    matches!(ins.code(), Code::Retnq | Code::Retnd | Code::Retnw)
}

/// `jmp *%reg` (not %rsp): the register.
fn jmp_reg(ins: &Instruction) -> Option<crate::ir::GprIndex> {
    (matches!(ins.code(), Code::Jmp_rm64 | Code::Jmp_rm32) && ins.op0_kind() == OpKind::Register)
        .then(|| gpr_index(ins.op0_register()))
        .flatten()
        .filter(|&r| r != RSP)
}

/// What a CALL or JMP to `addr` does when the code there is a thunk, by its bytes:
/// `ret` (a return thunk); `jmp *%reg` or `lfence; jmp *%reg` (an indirect thunk
/// patched, or built for lfence retpolines); or the retpoline
/// `call 1f; <trap>; 1: mov %reg, (%rsp); ret` (its `ret` may itself be a jump to a
/// return thunk): the inner call's return address is overwritten with %reg and
/// popped, leaving the outer call's. Each is, for the caller, exactly the indirect
/// branch or return it stands for; the translator still runs the thunk's own
/// instructions, so its effects (the retpoline's store below the stack pointer)
/// are the CPU's.
pub fn resolve_thunk(src: &mut dyn CodeSource, addr: u64, bitness: Bitness) -> Option<Thunk> {
    if !may_start_thunk(src, addr) {
        return None;
    }
    let mut ins = decode_at(src, addr, bitness)?;
    if is_ret(&ins) {
        return Some(Thunk::Return);
    }
    if let Some(r) = jmp_reg(&ins) {
        return Some(Thunk::Indirect(r));
    }
    if ins.mnemonic() == Mnemonic::Lfence {
        return jmp_reg(&decode_at(src, ins.next_ip(), bitness)?).map(Thunk::Indirect);
    }
    // The retpoline.
    if ins.flow_control() != FlowControl::Call || ins.is_call_far() {
        return None;
    }
    // Where the inner call lands; what lies between (a speculation trap: `int3`,
    // or `pause; lfence; jmp`) never runs.
    ins = decode_at(src, ins.near_branch_target(), bitness)?;
    let sp_store = matches!(ins.code(), Code::Mov_rm64_r64 | Code::Mov_rm32_r32)
        && ins.op0_kind() == OpKind::Memory
        && matches!(ins.memory_base(), Register::RSP | Register::ESP)
        && ins.memory_index() == Register::None
        && ins.memory_displacement64() == 0
        && ins.segment_prefix() == Register::None;
    let reg = gpr_index(ins.op1_register()).filter(|&r| r != RSP);
    let (true, Some(reg)) = (sp_store, reg) else {
        return None;
    };
    ins = decode_at(src, ins.next_ip(), bitness)?;
    let returns = is_ret(&ins)
        || (ins.flow_control() == FlowControl::UnconditionalBranch
            && !ins.is_jmp_far()
            && decode_at(src, ins.near_branch_target(), bitness).is_some_and(|i| is_ret(&i)));
    returns.then_some(Thunk::Indirect(reg))
}
