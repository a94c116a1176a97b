//! Register copies along a path, for the gap rule's page keys
//! ([`super::gap_pages`]).
//!
//! Compiled C passes a structure's pointer on by copying it: Linux's transmit loop
//! reads `0x23c(%rbx)`, then `mov %rbx,%rdi` and calls `io_serial_out`, which
//! reads `0xb9(%rdi)`. Both are fields of one `uart_port`, one page the engine
//! walks once. Keyed by register number they would count as two, and the loop's
//! path would end one page short of the next OUT. So the gap rule keys a memory
//! operand by the *value* in its base register: a 64-bit register-to-register MOV
//! gives its destination the source's value; any other write gives the register
//! a value of its own. Like the rest of the gap rule this is a cost estimate,
//! never a promise about addresses.

use crate::ir::{GprIndex, Op, Operand, RegRef, Size, RAX, RBP, RBX, RCX, RDI, RDX, RSI, RSP};

/// Which value each general register holds, as an id: registers with the same id
/// hold the same value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegCopies {
    value: [u16; 16],
    /// The next id a write gives a register.
    next: u16,
}

impl Default for RegCopies {
    fn default() -> Self {
        RegCopies::FRESH
    }
}

impl RegCopies {
    /// Every register with a value of its own.
    pub const FRESH: RegCopies = RegCopies {
        value: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        next: 16,
    };

    /// The id of the value in register `r`.
    pub fn value(&self, r: GprIndex) -> u16 {
        self.value[usize::from(r & 15)]
    }

    /// After `op` has run.
    pub fn after(&self, op: &Op) -> RegCopies {
        let mut c = *self;
        if let Op::Mov {
            size: Size::S8,
            dst: Operand::Reg(d),
            src: Operand::Reg(s),
        } = *op
        {
            c.value[usize::from(d.index & 15)] = self.value(s.index);
            return c;
        }
        match written(op) {
            Some(mask) => {
                for r in 0..16u8 {
                    if mask & (1 << r) != 0 {
                        c.give_own_value(r);
                    }
                }
            }
            None => c = RegCopies::FRESH,
        }
        c.compact_if_needed();
        c
    }

    fn give_own_value(&mut self, r: GprIndex) {
        self.value[usize::from(r)] = self.next;
        self.next += 1;
    }

    /// Ids renumbered from 0 once they grow large (a path is at most a window
    /// long, so this is rare): equal ids stay equal.
    fn compact_if_needed(&mut self) {
        if self.next < u16::MAX - 32 {
            return;
        }
        let old = self.value;
        for r in 0..16 {
            let first = old.iter().position(|&v| v == old[r]).unwrap_or(r);
            self.value[r] = first as u16;
        }
        self.next = 16;
    }
}

/// The general registers `op` may write, as a mask by register number; `None`
/// when not known here (every register is then taken as written).
fn written(op: &Op) -> Option<u16> {
    let bit = |r: GprIndex| 1u16 << (r & 15);
    let reg = |r: &RegRef| bit(r.index);
    let opnd = |o: &Operand| match o {
        Operand::Reg(r) => bit(r.index),
        _ => 0,
    };
    let acc_dx = bit(RAX) | bit(RDX);
    let string = bit(RSI) | bit(RDI) | bit(RCX);
    Some(match op {
        Op::Mov { dst, .. }
        | Op::Unary { dst, .. }
        | Op::Shift { dst, .. }
        | Op::Setcc { dst, .. } => opnd(dst),
        Op::Alu { op, dst, .. } => match op {
            crate::ir::AluOp::Cmp | crate::ir::AluOp::Test => 0,
            _ => opnd(dst),
        },
        Op::Bit { op, dst, .. } => match op {
            crate::ir::BitOp::Bt => 0,
            _ => opnd(dst),
        },
        Op::Movzx { dst, .. }
        | Op::Movsx { dst, .. }
        | Op::Lea { dst, .. }
        | Op::Imul { dst, .. }
        | Op::Cmovcc { dst, .. }
        | Op::Bswap { dst } => reg(dst),
        Op::Xchg { a, b, .. } => opnd(a) | opnd(b),
        Op::Cmpxchg { dst, .. } => opnd(dst) | bit(RAX),
        Op::Xadd { dst, src, .. } => opnd(dst) | reg(src),
        Op::MulWide { .. } | Op::SignExtendAccToDx { .. } | Op::Rdtsc | Op::Rdmsr => acc_dx,
        Op::SignExtendAcc { .. } | Op::In { .. } => bit(RAX),
        Op::Rdtscp | Op::Rdpmc | Op::Xgetbv => acc_dx | bit(RCX),
        Op::Cpuid => acc_dx | bit(RCX) | bit(RBX),
        Op::Push { .. }
        | Op::Pushf { .. }
        | Op::Popf { .. }
        | Op::Call { .. }
        | Op::CallIndirect { .. }
        | Op::Ret { .. } => bit(RSP),
        Op::Pop { dst, .. } => bit(RSP) | opnd(dst),
        Op::Leave { .. } => bit(RSP) | bit(RBP),
        Op::Ins { .. } | Op::Outs { .. } => string,
        Op::MovFromCr { dst, .. } => bit(*dst),
        Op::Clc
        | Op::Stc
        | Op::Cmc
        | Op::Cld
        | Op::Std
        | Op::Nop
        | Op::Cli
        | Op::Sti
        | Op::Jmp { .. }
        | Op::Jcc { .. }
        | Op::JmpIndirect { .. }
        | Op::Out { .. }
        | Op::Wrmsr
        | Op::Xsetbv
        | Op::MovToCr { .. }
        | Op::Clts
        | Op::Lmsw { .. }
        | Op::Wbinvd
        | Op::Invd
        | Op::Invlpg { .. }
        | Op::Pause
        | Op::Hlt => 0,
        Op::Loop { .. } => bit(RCX),
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::AluOp;

    fn r64(index: GprIndex) -> RegRef {
        RegRef {
            index,
            size: Size::S8,
            high8: false,
        }
    }

    fn mov(dst: GprIndex, src: GprIndex) -> Op {
        Op::Mov {
            size: Size::S8,
            dst: Operand::Reg(r64(dst)),
            src: Operand::Reg(r64(src)),
        }
    }

    #[test]
    fn a_copy_shares_the_value_until_either_register_is_written() {
        let c = RegCopies::FRESH.after(&mov(RDI, RBX));
        assert_eq!(c.value(RDI), c.value(RBX));
        let add = Op::Alu {
            op: AluOp::Add,
            size: Size::S8,
            dst: Operand::Reg(r64(RDI)),
            src: Operand::Imm(8),
        };
        let moved = c.after(&add);
        assert_ne!(moved.value(RDI), moved.value(RBX));
        let over = c.after(&Op::Pop {
            size: Size::S8,
            dst: Operand::Reg(r64(RBX)),
        });
        assert_ne!(over.value(RDI), over.value(RBX));
        // A compare writes nothing.
        let cmp = Op::Alu {
            op: AluOp::Cmp,
            size: Size::S8,
            dst: Operand::Reg(r64(RDI)),
            src: Operand::Imm(0),
        };
        assert_eq!(c.after(&cmp).value(RDI), c.value(RBX));
    }

    #[test]
    fn a_narrow_move_is_no_copy_and_cpuid_writes_rbx() {
        let narrow = Op::Mov {
            size: Size::S4,
            dst: Operand::Reg(RegRef {
                index: RDI,
                size: Size::S4,
                high8: false,
            }),
            src: Operand::Reg(RegRef {
                index: RBX,
                size: Size::S4,
                high8: false,
            }),
        };
        let c = RegCopies::FRESH.after(&narrow);
        assert_ne!(c.value(RDI), c.value(RBX));
        let copied = RegCopies::FRESH.after(&mov(RDI, RBX));
        assert_ne!(copied.after(&Op::Cpuid).value(RBX), copied.value(RDI));
    }
}
