//! Flags the SDM leaves undefined, the flag analysis along every path of a case, and
//! the case's layout in memory.

use super::Spec;
use iced_x86::{Encoder, Instruction, Mnemonic, Register, RflagsBits};

pub fn iced_to_x86(f: u32) -> u64 {
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
pub fn undefined_by(i: &Instruction) -> u64 {
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

/// Flags undefined on entry to each instruction (and at the end, index `n`), or
/// `None` when some instruction on some path reads a flag that is undefined there.
/// Back-edges make this a fixpoint.
pub fn analyze(specs: &[Spec]) -> Option<Vec<u64>> {
    let n = specs.len();
    let mut incoming = vec![0u64; n + 1];
    let mut live = vec![false; n + 1];
    live[0] = true;
    loop {
        let mut changed = false;
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
            let mut flow = |t: usize| {
                if incoming[t] | out != incoming[t] || !live[t] {
                    changed = true;
                }
                incoming[t] |= out;
                live[t] = true;
            };
            if let Some(t) = s.target {
                flow(t.min(n));
            }
            if s.instr.mnemonic() != Mnemonic::Jmp {
                flow(i + 1);
            }
        }
        if !changed {
            return Some(incoming);
        }
    }
}

/// Encodes the sequence at `ip`; returns the bytes and each instruction's address.
pub fn layout(bits: u32, specs: &[Spec], ip: u64) -> Option<(Vec<u8>, Vec<u64>)> {
    let mut enc = Encoder::new(bits);
    let mut lens = Vec::with_capacity(specs.len());
    let near = |i: &mut Instruction, t: u64| match bits {
        16 => i.set_near_branch16(t as u16),
        32 => i.set_near_branch32(t as u32),
        _ => i.set_near_branch64(t),
    };
    for s in specs {
        let mut i = s.instr;
        // Lengths do not depend on the position (branches are encoded in their own
        // fixed-size forms, RIP-relative operands always take a disp32).
        if s.target.is_some() {
            near(&mut i, ip + 0x10);
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
            near(&mut i, rips[t]);
        }
        let l = enc.encode(&i, rips[k]).ok()?;
        if l != lens[k] {
            return None;
        }
    }
    rips.pop();
    Some((enc.take_buffer(), rips))
}
