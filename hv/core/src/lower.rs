//! Lowering: one decoded x86 instruction (iced-x86) into one IR op.
//!
//! Branches lower to `Target::Exit(absolute target)`; the translator rewrites
//! targets inside its cluster to `Target::Insn(index)`.

use crate::ir::Op;
use iced_x86::Instruction;

/// Why an instruction has no IR op (the translator ends a cluster before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// The engine does not implement this instruction.
    Mnemonic(iced_x86::Mnemonic),
    /// Implemented, but not with these operands or prefixes (e.g. LOCK, far forms).
    Form(iced_x86::Code),
}

/// Lower one instruction. The bitness is the instruction's own (iced records it).
pub fn lower(instr: &Instruction) -> Result<Op, Unsupported> {
    Err(Unsupported::Mnemonic(instr.mnemonic()))
}
