//! Arithmetic and flags, exactly as the Intel SDM defines them.
//!
//! Where the SDM leaves a flag undefined the engine does what an Intel CPU does
//! (measured on the Xeon of this project's machines against every count 0..63,
//! every operand size and random operands, by running the instruction natively):
//! - AND/OR/XOR/TEST: AF undefined: cleared.
//! - SHL/SHR/SAR with a non-zero count: AF undefined: cleared. CF for SHL/SHR when
//!   the count is >= the operand width (8/16-bit operands): the last bit shifted
//!   out, 0 past it.
//! - OF for counts other than 1 (masked count, non-zero): the 1-bit formula applied
//!   to the *original* operand, as if the count were 1: SHL and ROL and RCL
//!   MSB ^ bit(n-2), ROR MSB ^ LSB, RCR MSB ^ CF-in, SHR MSB, SAR 0; except ROL and
//!   ROR of a *register* by an *immediate*, which leave OF unchanged
//!   ([`shift_reg_imm`]; by CL or on memory they compute it). RCL/RCR
//!   of an 8/16-bit operand whose masked count is a multiple of 9/17 change no flag.
//! - BT/BTS/BTR/BTC: OF, SF, AF, PF undefined: unchanged; ZF unaffected.
//! - IMUL: SF, ZF, AF, PF undefined: SF and PF from the truncated result, ZF and
//!   AF cleared.
//!
//! Other vendors may choose differently (AMD has not been measured): computing
//! flags with the host's own instruction would match any CPU by construction.

use crate::ir::{AluOp, Cond, ShiftOp, Size, UnaryOp};

// engine/mod.rs re-exports these as `engine::CF` etc.
pub use crate::arch::rflags::{AF, CF, DF, OF, PF, SF, STATUS, VM, ZF};

#[inline(always)]
fn msb(v: u64, size: Size) -> u64 {
    (v >> (size.bits() - 1)) & 1
}

/// The bit below the most significant one.
#[inline(always)]
fn msb2(v: u64, size: Size) -> u64 {
    (v >> (size.bits() - 2)) & 1
}

/// PF, ZF and SF of a result (already masked to `size`).
#[inline(always)]
pub fn szp(r: u64, size: Size) -> u64 {
    let mut f = if (r as u8).count_ones() & 1 == 0 {
        PF
    } else {
        0
    };
    if r == 0 {
        f |= ZF;
    }
    if msb(r, size) != 0 {
        f |= SF;
    }
    f
}

/// Sign-extends the low `size` bits of `v` to 64 bits.
#[inline(always)]
pub fn sext(v: u64, size: Size) -> u64 {
    let sh = 64 - size.bits();
    (((v << sh) as i64) >> sh) as u64
}

#[inline(always)]
fn add_flags(a: u64, b: u64, r: u64, size: Size) -> u64 {
    let cf = msb((a & b) | ((a | b) & !r), size);
    let of = msb((a ^ r) & (b ^ r), size);
    szp(r, size) | (cf * CF) | (of * OF) | ((a ^ b ^ r) & AF)
}

#[inline(always)]
fn sub_flags(a: u64, b: u64, r: u64, size: Size) -> u64 {
    let cf = msb((!a & b) | ((!a | b) & r), size);
    let of = msb((a ^ b) & (a ^ r), size);
    szp(r, size) | (cf * CF) | (of * OF) | ((a ^ b ^ r) & AF)
}

/// Two-operand ALU op: returns (result, new rflags). The result of CMP/TEST is the
/// destination unchanged (callers do not write it back).
#[inline(always)]
pub fn alu(op: AluOp, size: Size, a: u64, b: u64, flags: u64) -> (u64, u64) {
    let m = size.mask();
    let (a, b) = (a & m, b & m);
    let keep = flags & !STATUS;
    match op {
        AluOp::Add | AluOp::Adc => {
            let cin = if op == AluOp::Adc { flags & CF } else { 0 };
            let r = a.wrapping_add(b).wrapping_add(cin) & m;
            (r, keep | add_flags(a, b, r, size))
        }
        AluOp::Sub | AluOp::Sbb | AluOp::Cmp => {
            let bin = if op == AluOp::Sbb { flags & CF } else { 0 };
            let r = a.wrapping_sub(b).wrapping_sub(bin) & m;
            let f = keep | sub_flags(a, b, r, size);
            (if op == AluOp::Cmp { a } else { r }, f)
        }
        AluOp::And | AluOp::Test => {
            let r = a & b;
            (if op == AluOp::Test { a } else { r }, keep | szp(r, size))
        }
        AluOp::Or => {
            let r = a | b;
            (r, keep | szp(r, size))
        }
        AluOp::Xor => {
            let r = a ^ b;
            (r, keep | szp(r, size))
        }
    }
}

/// Two- and three-operand IMUL: returns (truncated product, new rflags).
#[inline(always)]
pub fn imul(size: Size, a: u64, b: u64, flags: u64) -> (u64, u64) {
    let full = i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64);
    let r = (full as u64) & size.mask();
    let fits = i128::from(sext(r, size) as i64) == full;
    let f = if fits { 0 } else { CF | OF };
    (r, (flags & !STATUS) | f | (szp(r, size) & !ZF))
}

/// One-operand MUL (`signed: false`) and IMUL of the accumulator `a` by `b` at
/// `size`: returns (low half, high half, new rflags). CF = OF = 1 when the high
/// half is significant (MUL: non-zero; IMUL: not the low half's sign extension).
/// SF, ZF, AF, PF are undefined: as two-operand IMUL, SF and PF from the low half,
/// ZF and AF cleared.
#[inline]
pub fn mul_wide(signed: bool, size: Size, a: u64, b: u64, flags: u64) -> (u64, u64, u64) {
    let m = size.mask();
    let bits = size.bits();
    let full = if signed {
        (i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64)) as u128
    } else {
        u128::from(a & m) * u128::from(b & m)
    };
    let lo = (full as u64) & m;
    let hi = ((full >> bits) as u64) & m;
    let significant = if signed {
        hi != if msb(lo, size) != 0 { m } else { 0 }
    } else {
        hi != 0
    };
    let f = if significant { CF | OF } else { 0 };
    (lo, hi, (flags & !STATUS) | f | (szp(lo, size) & !ZF))
}

/// INC/DEC/NEG/NOT: returns (result, new rflags).
#[inline(always)]
pub fn unary(op: UnaryOp, size: Size, a: u64, flags: u64) -> (u64, u64) {
    let m = size.mask();
    let a = a & m;
    match op {
        UnaryOp::Inc => {
            let r = a.wrapping_add(1) & m;
            let f = add_flags(a, 1, r, size) & !CF;
            (r, (flags & !STATUS) | (flags & CF) | f)
        }
        UnaryOp::Dec => {
            let r = a.wrapping_sub(1) & m;
            let f = sub_flags(a, 1, r, size) & !CF;
            (r, (flags & !STATUS) | (flags & CF) | f)
        }
        UnaryOp::Neg => {
            let r = 0u64.wrapping_sub(a) & m;
            (r, (flags & !STATUS) | sub_flags(0, a, r, size))
        }
        UnaryOp::Not => (!a & m, flags),
    }
}

/// Shifts and rotates: returns (result, new rflags). `count` is the raw count
/// operand (CL or imm8); it is masked to 5 bits (6 for 64-bit operands). A masked
/// count of 0 changes nothing.
#[inline]
pub fn shift(op: ShiftOp, size: Size, a: u64, count: u64, flags: u64) -> (u64, u64) {
    let bits = size.bits() as u64;
    let m = size.mask();
    let a = a & m;
    let c = count & if bits == 64 { 63 } else { 31 };
    if c == 0 {
        return (a, flags);
    }
    match op {
        ShiftOp::Shl => {
            let r = if c < 64 { (a << c) & m } else { 0 };
            let cf = if c <= bits { (a >> (bits - c)) & 1 } else { 0 };
            let of = msb(a, size) ^ msb2(a, size);
            (r, (flags & !STATUS) | szp(r, size) | (cf * CF) | (of * OF))
        }
        ShiftOp::Shr => {
            let r = if c < 64 { a >> c } else { 0 };
            let cf = if c - 1 < 64 { (a >> (c - 1)) & 1 } else { 0 };
            let of = msb(a, size);
            (r, (flags & !STATUS) | szp(r, size) | (cf * CF) | (of * OF))
        }
        ShiftOp::Sar => {
            let sa = sext(a, size) as i64;
            let r = ((sa >> c.min(63)) as u64) & m;
            let cf = ((sa >> (c - 1).min(63)) as u64) & 1;
            (r, (flags & !STATUS) | szp(r, size) | (cf * CF))
        }
        ShiftOp::Rol => {
            let t = c % bits;
            let r = if t == 0 {
                a
            } else {
                ((a << t) | (a >> (bits - t))) & m
            };
            let cf = r & 1;
            let of = msb(a, size) ^ msb2(a, size);
            (r, (flags & !(CF | OF)) | (cf * CF) | (of * OF))
        }
        ShiftOp::Ror => {
            let t = c % bits;
            let r = if t == 0 {
                a
            } else {
                ((a >> t) | (a << (bits - t))) & m
            };
            let cf = msb(r, size);
            let of = msb(a, size) ^ (a & 1);
            (r, (flags & !(CF | OF)) | (cf * CF) | (of * OF))
        }
        ShiftOp::Rcl | ShiftOp::Rcr => {
            let n = bits + 1;
            let t = if bits < 32 { c % n } else { c };
            let cin = flags & CF;
            if t == 0 {
                // A rotate through CF by a multiple of n: nothing changes.
                return (a, flags);
            }
            let (r, cf) = {
                let v = ((cin as u128) << bits) | a as u128;
                let nm = (1u128 << n) - 1;
                let rot = if op == ShiftOp::Rcl {
                    ((v << t) | (v >> (n - t))) & nm
                } else {
                    ((v >> t) | (v << (n - t))) & nm
                };
                ((rot as u64) & m, ((rot >> bits) & 1) as u64)
            };
            let of = if op == ShiftOp::Rcl {
                msb(a, size) ^ msb2(a, size)
            } else {
                msb(a, size) ^ cin
            };
            (r, (flags & !(CF | OF)) | (cf * CF) | (of * OF))
        }
    }
}

/// [`shift`] of a register by an immediate count: the CPU leaves OF unchanged
/// after ROL/ROR by an immediate other than 1 (masked), where by CL, or on a
/// memory operand, it computes it (measured).
#[inline]
pub fn shift_reg_imm(op: ShiftOp, size: Size, a: u64, count: u64, flags: u64) -> (u64, u64) {
    let (r, f) = shift(op, size, a, count, flags);
    let masked = count & if size.bits() == 64 { 63 } else { 31 };
    if matches!(op, ShiftOp::Rol | ShiftOp::Ror) && masked > 1 {
        (r, (f & !OF) | (flags & OF))
    } else {
        (r, f)
    }
}

/// Evaluates a condition code against rflags.
#[inline(always)]
pub fn cond(c: Cond, f: u64) -> bool {
    let cf = f & CF != 0;
    let zf = f & ZF != 0;
    let sf = f & SF != 0;
    let of = f & OF != 0;
    let pf = f & PF != 0;
    match c {
        Cond::O => of,
        Cond::No => !of,
        Cond::B => cf,
        Cond::Ae => !cf,
        Cond::E => zf,
        Cond::Ne => !zf,
        Cond::Be => cf || zf,
        Cond::A => !cf && !zf,
        Cond::S => sf,
        Cond::Ns => !sf,
        Cond::P => pf,
        Cond::Np => !pf,
        Cond::L => sf != of,
        Cond::Ge => sf == of,
        Cond::Le => zf || sf != of,
        Cond::G => !zf && sf == of,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_flags() {
        let (r, f) = alu(AluOp::Add, Size::S1, 0x7f, 1, 0);
        assert_eq!(r, 0x80);
        assert_eq!(f & STATUS, OF | SF | AF);
        let (r, f) = alu(AluOp::Add, Size::S8, u64::MAX, 1, 0);
        assert_eq!(r, 0);
        assert_eq!(f & STATUS, CF | ZF | PF | AF);
        let (r, f) = alu(AluOp::Sbb, Size::S2, 0, 0xffff, CF);
        assert_eq!(r, 0);
        assert_eq!(f & (CF | ZF | OF), CF | ZF);
        let (r, f) = alu(AluOp::Adc, Size::S4, 5, 0xffff_ffff, CF);
        assert_eq!(r, 5);
        assert_eq!(f & (CF | OF), CF);
        let (_, f) = alu(AluOp::Cmp, Size::S4, 1, 2, 0);
        assert_eq!(f & (CF | SF | ZF | OF), CF | SF);
    }

    #[test]
    fn shifts_and_rotates() {
        assert_eq!(shift(ShiftOp::Shl, Size::S1, 0x81, 1, 0), (0x02, CF | OF));
        assert_eq!(shift(ShiftOp::Sar, Size::S1, 0x80, 7, 0).0, 0xff);
        assert_eq!(shift(ShiftOp::Rcl, Size::S1, 0x80, 1, 0).0, 0);
        assert_eq!(shift(ShiftOp::Rcl, Size::S1, 0x80, 1, 0).1 & CF, CF);
        assert_eq!(shift(ShiftOp::Rcr, Size::S1, 0x01, 9, CF).0, 0x01);
        assert_eq!(shift(ShiftOp::Rol, Size::S8, 1 << 63, 1, 0).0, 1);
        // Count 0 (after masking) changes nothing.
        assert_eq!(shift(ShiftOp::Shl, Size::S4, 7, 32, OF), (7, OF));
    }

    /// Flags the SDM leaves undefined, as the Intel CPU computed them (issue 8,
    /// bug 10: each of these differed before).
    #[test]
    fn undefined_flags_as_intel_computes_them() {
        // Multi-bit counts: OF from the original operand, as for a count of 1.
        assert_eq!(shift(ShiftOp::Shl, Size::S1, 0x40, 3, 0), (0, PF | ZF | OF));
        assert_eq!(shift(ShiftOp::Rol, Size::S4, 0x4000_0000, 4, 0), (4, OF));
        assert_eq!(shift(ShiftOp::Ror, Size::S2, 0x8000, 3, 0), (0x1000, OF));
        assert_eq!(
            shift(ShiftOp::Rcr, Size::S8, 1, 2, CF),
            (0xc000_0000_0000_0000, OF)
        );
        // ROL/ROR by an immediate other than 1: OF unchanged (by CL: computed).
        assert_eq!(
            shift_reg_imm(ShiftOp::Rol, Size::S4, 0x4000_0000, 4, 0),
            (4, 0)
        );
        assert_eq!(
            shift_reg_imm(ShiftOp::Ror, Size::S1, 0x90, 9, OF),
            (0x48, OF)
        );
        assert_eq!(
            shift_reg_imm(ShiftOp::Ror, Size::S1, 0x81, 33, 0),
            (0xc0, CF)
        );
        assert_eq!(
            shift_reg_imm(ShiftOp::Shl, Size::S1, 0x40, 3, 0),
            (0, PF | ZF | OF)
        );
        // RCL/RCR of 8/16 bits by a multiple of 9/17: no flag changes.
        assert_eq!(shift(ShiftOp::Rcl, Size::S1, 0x80, 9, PF), (0x80, PF));
        assert_eq!(shift(ShiftOp::Rcr, Size::S2, 0x8001, 17, SF), (0x8001, SF));
        // IMUL: ZF cleared even for a zero product; SF and PF from it.
        assert_eq!(imul(Size::S4, 0x1_0000, 0x1_0000, ZF), (0, CF | OF | PF));
        assert_eq!(imul(Size::S2, 0, 5, 0), (0, PF));
    }
}
