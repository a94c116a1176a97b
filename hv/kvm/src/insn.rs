//! Which instruction exited: decoding IN/OUT/INS/OUTS and RDMSR/WRMSR, and the
//! candidates for an exiting instruction that KVM had completed before exiting.
//!
//! KVM does not say whether RIP at an exit to user space is at the exiting
//! instruction or already past it (on this host an OUT has completed, an IN has
//! not; on hardware KVM neither has). The backend therefore always completes the
//! exit (`attribute` module) and compares RIP before and after: when RIP moved,
//! the instruction is exactly [before, after); when it did not, KVM had completed
//! the instruction before exiting and it *ends* at RIP, and this module lists
//! every start 1..=15 bytes before RIP whose instruction ends exactly at RIP and
//! matches the exit.

use avex_core::ir::Bitness;

/// An IN/OUT/INS/OUTS or RDMSR/WRMSR as decoded from guest bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub len: usize,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// IN/OUT (or INS/OUTS when `string`): direction, size, immediate port (None:
    /// DX), REP prefix.
    Io {
        write: bool,
        size: u8,
        imm: Option<u8>,
        string: bool,
        rep: bool,
    },
    Rdmsr,
    Wrmsr,
}

impl Kind {
    pub fn is_string(&self) -> bool {
        matches!(self, Kind::Io { string: true, .. })
    }
}

/// What KVM reported for an exit, to match decoded instructions against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Io { write: bool, size: u8, port: u16 },
    Rdmsr,
    Wrmsr,
}

/// Decode an IN/OUT/INS/OUTS/RDMSR/WRMSR at the start of `b`, in code of
/// `bits` (legacy prefixes and, in 64-bit code, one REX prefix allowed). `None`
/// for anything else, and with a LOCK prefix (#UD on these instructions: such
/// bytes never exited).
pub fn decode(b: &[u8], bits: Bitness) -> Option<Decoded> {
    let mut i = 0;
    let mut opsize16 = false;
    let mut rep = false;
    while i < b.len() && i < 14 {
        match b[i] {
            0x66 => opsize16 = true,
            0xf2 | 0xf3 => rep = true,
            0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 => {}
            0xf0 => return None,
            _ => break,
        }
        i += 1;
    }
    if bits == Bitness::B64 && i < b.len() && (0x40..=0x4f).contains(&b[i]) {
        i += 1;
    }
    let op = *b.get(i)?;
    // 0x66 selects the other operand size: 16 bits in 32/64-bit code, 32 in 16.
    let wide = if opsize16 == (bits == Bitness::B16) {
        4
    } else {
        2
    };
    let io = |write: bool, size: u8, imm: bool, string: bool| -> Option<Decoded> {
        let (imm, len) = if imm {
            (Some(*b.get(i + 1)?), i + 2)
        } else {
            (None, i + 1)
        };
        Some(Decoded {
            len,
            kind: Kind::Io {
                write,
                size,
                imm,
                string,
                rep: string && rep,
            },
        })
    };
    match op {
        0xe4 => io(false, 1, true, false),
        0xe5 => io(false, wide, true, false),
        0xe6 => io(true, 1, true, false),
        0xe7 => io(true, wide, true, false),
        0xec => io(false, 1, false, false),
        0xed => io(false, wide, false, false),
        0xee => io(true, 1, false, false),
        0xef => io(true, wide, false, false),
        0x6c => io(false, 1, false, true),
        0x6d => io(false, wide, false, true),
        0x6e => io(true, 1, false, true),
        0x6f => io(true, wide, false, true),
        0x0f => match b.get(i + 1)? {
            0x32 => Some(Decoded {
                len: i + 2,
                kind: Kind::Rdmsr,
            }),
            0x30 => Some(Decoded {
                len: i + 2,
                kind: Kind::Wrmsr,
            }),
            _ => None,
        },
        _ => None,
    }
}

/// Does the decoded instruction make the access KVM reported? Direction, size,
/// and the port: the immediate, or DX (= `dx`) for the DX and string forms.
pub fn matches(d: &Decoded, want: &Access, dx: u16) -> bool {
    match (d.kind, *want) {
        (
            Kind::Io {
                write, size, imm, ..
            },
            Access::Io {
                write: w,
                size: s,
                port,
            },
        ) => write == w && size == s && imm.map_or(dx, u16::from) == port,
        (Kind::Rdmsr, Access::Rdmsr) | (Kind::Wrmsr, Access::Wrmsr) => true,
        _ => false,
    }
}

/// The instructions that end exactly at `code[end]` and match `want`, as (offset
/// in `code`, decoded). Each is decoded from `code[start..end]` only, so no
/// candidate reads past the end.
pub fn ending_at(
    code: &[u8],
    end: usize,
    want: &Access,
    dx: u16,
    bits: Bitness,
) -> Vec<(usize, Decoded)> {
    (1..=end.min(15))
        .filter_map(|k| {
            let start = end - k;
            let d = decode(&code[start..end], bits)?;
            (d.len == k && matches(&d, want, dx)).then_some((start, d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Bitness::{B16, B32, B64};

    const OUT_DX: Access = Access::Io {
        write: true,
        size: 1,
        port: 0x3f8,
    };

    #[test]
    fn decodes_the_io_string_and_msr_forms() {
        assert_eq!(decode(&[0xee], B64).unwrap().len, 1);
        assert_eq!(
            decode(&[0x66, 0xef], B64).unwrap().kind,
            Kind::Io {
                write: true,
                size: 2,
                imm: None,
                string: false,
                rep: false
            }
        );
        assert_eq!(
            decode(&[0xe4, 0x71], B64).unwrap(),
            Decoded {
                len: 2,
                kind: Kind::Io {
                    write: false,
                    size: 1,
                    imm: Some(0x71),
                    string: false,
                    rep: false
                }
            }
        );
        let insb = decode(&[0x6c], B64).unwrap();
        assert!(insb.kind.is_string());
        assert_eq!(
            decode(&[0xf3, 0x66, 0x6f], B64).unwrap().kind,
            Kind::Io {
                write: true,
                size: 2,
                imm: None,
                string: true,
                rep: true
            }
        );
        assert_eq!(decode(&[0x0f, 0x32], B64).unwrap().kind, Kind::Rdmsr);
        assert_eq!(decode(&[0x48, 0x0f, 0x30], B64).unwrap().len, 3);
        assert_eq!(decode(&[0x90], B64), None);
        assert_eq!(decode(&[0xe4], B64), None, "truncated immediate");
        assert_eq!(decode(&[], B64), None);
    }

    #[test]
    fn the_port_size_and_direction_must_match() {
        let out80 = decode(&[0xe6, 0x80], B64).unwrap();
        let at = |port| Access::Io {
            write: true,
            size: 1,
            port,
        };
        assert!(matches(&out80, &at(0x80), 0x3f8));
        assert!(!matches(&out80, &at(0x81), 0x81), "the immediate, not DX");
        let out_dx = decode(&[0xee], B64).unwrap();
        assert!(matches(&out_dx, &OUT_DX, 0x3f8));
        assert!(!matches(&out_dx, &OUT_DX, 0x3f9), "DX must be the port");
        let wide = Access::Io {
            write: true,
            size: 2,
            port: 0x3f8,
        };
        assert!(!matches(&out_dx, &wide, 0x3f8));
        let in_dx = decode(&[0xec], B64).unwrap();
        assert!(!matches(&in_dx, &OUT_DX, 0x3f8));
    }

    #[test]
    fn one_candidate_ends_at_rip_after_two_identical_outs() {
        // mov dx,0x3ff ; out dx,al ; out dx,al ; nop: KVM completed the first OUT
        // and exits with RIP at the second.
        let code = [0x66, 0xba, 0xff, 0x03, 0xee, 0xee, 0x90];
        let want = Access::Io {
            write: true,
            size: 1,
            port: 0x3ff,
        };
        let c = ending_at(&code, 5, &want, 0x3ff, B64);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, 4);
        // The second OUT, completed: it ends at 6.
        assert_eq!(ending_at(&code, 6, &want, 0x3ff, B64)[0].0, 5);
    }

    #[test]
    fn a_prefix_before_the_opcode_makes_several_candidates() {
        // mov al,0x48 ; out dx,eax: 0x48 may be a REX prefix of the OUT.
        let code = [0xb0, 0x48, 0xef];
        let want = Access::Io {
            write: true,
            size: 4,
            port: 0x3f8,
        };
        assert_eq!(ending_at(&code, 3, &want, 0x3f8, B64).len(), 2);
        // Not in 32-bit code, where 0x48 is DEC EAX.
        assert_eq!(ending_at(&code, 3, &want, 0x3f8, B32).len(), 1);
        // rep outsb: `f3 6e` and `6e` both end there; both are string I/O.
        let code = [0xf3, 0x6e];
        let c = ending_at(&code, 2, &OUT_DX, 0x3f8, B64);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|(_, d)| d.kind.is_string()));
    }

    #[test]
    fn the_operand_size_follows_the_code_size() {
        let size = |b: &[u8], bits| match decode(b, bits).unwrap().kind {
            Kind::Io { size, .. } => size,
            _ => 0,
        };
        assert_eq!(size(&[0xed], B64), 4);
        assert_eq!(size(&[0xed], B16), 2);
        assert_eq!(size(&[0x66, 0xed], B32), 2);
        assert_eq!(size(&[0x66, 0xed], B16), 4);
        assert_eq!(size(&[0xec], B16), 1);
    }

    #[test]
    fn a_lock_prefix_is_no_candidate() {
        // mov eax,esi ; out dx,al: `f0 ee` would be LOCK OUT, which is #UD.
        let code = [0x89, 0xf0, 0xee];
        assert_eq!(ending_at(&code, 3, &OUT_DX, 0x3f8, B64).len(), 1);
        assert_eq!(decode(&[0xf0, 0xee], B64), None);
    }

    #[test]
    fn msr_candidates() {
        let code = [0x90, 0x0f, 0x32];
        assert_eq!(ending_at(&code, 3, &Access::Rdmsr, 0, B64).len(), 1);
        assert!(ending_at(&code, 3, &Access::Wrmsr, 0, B64).is_empty());
    }
}
