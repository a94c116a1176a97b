//! Where the exiting instruction is.
//!
//! KVM does not say whether RIP at an exit to user space is at the exiting
//! instruction or already past it, and it differs by path: on this host's software
//! KVM an OUT has completed (RIP after it) when user space sees it, an IN has not
//! (KVM writes the data and advances RIP at the next KVM_RUN); RDMSR/WRMSR exits
//! leave RIP at the instruction. The exit handler needs the instruction's own
//! address (translations and the dynamic tracker are keyed by it), so the backend
//! matches the bytes at RIP, and failing that just before it, against the access
//! KVM reported.

/// An IN/OUT or RDMSR/WRMSR as decoded from guest bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub len: usize,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// IN/OUT: direction, size, immediate port (None: DX).
    Io {
        write: bool,
        size: u8,
        imm: Option<u8>,
    },
    Rdmsr,
    Wrmsr,
}

/// Decode an IN/OUT/RDMSR/WRMSR at the start of `b` (legacy prefixes and, in 64-bit
/// code, one REX prefix allowed). `None` for anything else.
pub fn decode(b: &[u8], long_mode: bool) -> Option<Decoded> {
    let mut i = 0;
    let mut opsize16 = false;
    while i < b.len() && i < 14 {
        match b[i] {
            0x66 => opsize16 = true,
            0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0xf0 | 0xf2 | 0xf3 => {}
            _ => break,
        }
        i += 1;
    }
    if long_mode && i < b.len() && (0x40..=0x4f).contains(&b[i]) {
        i += 1;
    }
    let op = *b.get(i)?;
    let wide = if opsize16 { 2 } else { 4 };
    let io = |write: bool, size: u8, imm: bool| -> Option<Decoded> {
        let (imm, len) = if imm {
            (Some(*b.get(i + 1)?), i + 2)
        } else {
            (None, i + 1)
        };
        Some(Decoded {
            len,
            kind: Kind::Io { write, size, imm },
        })
    };
    match op {
        0xe4 => io(false, 1, true),
        0xe5 => io(false, wide, true),
        0xe6 => io(true, 1, true),
        0xe7 => io(true, wide, true),
        0xec => io(false, 1, false),
        0xed => io(false, wide, false),
        0xee => io(true, 1, false),
        0xef => io(true, wide, false),
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

/// Same kind of access (direction and size for IN/OUT)?
fn same_access(d: &Decoded, want: &Kind) -> bool {
    match (d.kind, *want) {
        (
            Kind::Io { write, size, .. },
            Kind::Io {
                write: w, size: s, ..
            },
        ) => write == w && size == s,
        (Kind::Rdmsr, Kind::Rdmsr) | (Kind::Wrmsr, Kind::Wrmsr) => true,
        _ => false,
    }
}

/// Where the exiting instruction is, given the guest code around RIP.
///
/// `code` holds guest bytes from `rip - before` on (`before` ≤ 15 bytes before
/// RIP, fewer at the start of memory). Returns `(instruction address, completed)`:
/// `completed` is true when RIP is already past the instruction.
pub fn locate(
    code: &[u8],
    before: usize,
    rip: u64,
    want: &Kind,
    port: u16,
    dx: u16,
    long_mode: bool,
) -> Option<(u64, bool)> {
    // The port must be the immediate, or DX for the DX forms.
    let port_ok = |d: &Decoded| match d.kind {
        Kind::Io { imm: Some(p), .. } => u16::from(p) == port,
        Kind::Io { imm: None, .. } => dx == port,
        _ => true,
    };
    let ok = |d: &Decoded| same_access(d, want) && port_ok(d);
    if let Some(d) = code.get(before..).and_then(|c| decode(c, long_mode)) {
        if ok(&d) {
            return Some((rip, false));
        }
    }
    for k in 1..=before.min(15) {
        if let Some(d) = decode(&code[before - k..], long_mode) {
            if d.len == k && ok(&d) {
                return Some((rip - k as u64, true));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(size: u8) -> Kind {
        Kind::Io {
            write: true,
            size,
            imm: None,
        }
    }
    fn inp(size: u8) -> Kind {
        Kind::Io {
            write: false,
            size,
            imm: None,
        }
    }

    #[test]
    fn decodes_the_io_and_msr_forms() {
        assert_eq!(decode(&[0xee], true).unwrap().len, 1);
        assert_eq!(
            decode(&[0x66, 0xef], true).unwrap().kind,
            Kind::Io {
                write: true,
                size: 2,
                imm: None
            }
        );
        assert_eq!(
            decode(&[0xe4, 0x71], true).unwrap(),
            Decoded {
                len: 2,
                kind: Kind::Io {
                    write: false,
                    size: 1,
                    imm: Some(0x71)
                }
            }
        );
        assert_eq!(decode(&[0x0f, 0x32], true).unwrap().kind, Kind::Rdmsr);
        assert_eq!(decode(&[0x48, 0x0f, 0x30], true).unwrap().len, 3);
        assert_eq!(decode(&[0x90], true), None);
        assert_eq!(decode(&[0xe4], true), None, "truncated immediate");
        assert_eq!(decode(&[], true), None);
    }

    #[test]
    fn finds_an_in_at_rip_and_an_out_just_before_it() {
        // 0x1000: mov dx,0x3fd ; in al,dx ; test al,0x20
        let code = [0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20];
        // RIP at the IN (not completed): 4 bytes before it are available.
        assert_eq!(
            locate(&code, 4, 0x1004, &inp(1), 0x3fd, 0x3fd, true),
            Some((0x1004, false))
        );
        // 0x2000: mov dx,0x3f8 ; mov eax,ecx ; out dx,al ; cmp r10,r8
        let code = [0x66, 0xba, 0xf8, 0x03, 0x89, 0xc8, 0xee, 0x4d, 0x39, 0xc2];
        // RIP already after the OUT.
        assert_eq!(
            locate(&code, 7, 0x2007, &out(1), 0x3f8, 0x3f8, true),
            Some((0x2006, true))
        );
        // Same bytes, RIP at the OUT.
        assert_eq!(
            locate(&code, 6, 0x2006, &out(1), 0x3f8, 0x3f8, true),
            Some((0x2006, false))
        );
    }

    #[test]
    fn immediate_port_forms_need_the_right_port() {
        // out 0x80, al ; nop
        let code = [0xe6, 0x80, 0x90];
        assert_eq!(
            locate(&code, 2, 0x3002, &out(1), 0x80, 0x3f8, true),
            Some((0x3000, true))
        );
        // Wrong port: no match.
        assert_eq!(locate(&code, 2, 0x3002, &out(1), 0x81, 0x3f8, true), None);
        // A DX form needs DX = port.
        let code = [0xee, 0x90];
        assert_eq!(locate(&code, 1, 0x4001, &out(1), 0x3f8, 0x3f9, true), None);
        assert_eq!(
            locate(&code, 1, 0x4001, &out(1), 0x3f8, 0x3f8, true),
            Some((0x4000, true))
        );
        // Size must match.
        assert_eq!(locate(&code, 1, 0x4001, &out(2), 0x3f8, 0x3f8, true), None);
    }

    #[test]
    fn msr_at_rip() {
        let code = [0x90, 0x0f, 0x32, 0x90];
        assert_eq!(
            locate(&code, 1, 0x5001, &Kind::Rdmsr, 0, 0, true),
            Some((0x5001, false))
        );
        assert_eq!(locate(&code, 1, 0x5001, &Kind::Wrmsr, 0, 0, true), None);
    }
}
