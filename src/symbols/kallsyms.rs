//! The kernel's own symbol tables (kallsyms) inside a Linux image that has no ELF
//! symbols, as a distribution vmlinux is stripped: found by their shape, since
//! nothing in the file says where they are (their labels are symbols too).
//!
//! The tables (`scripts/kallsyms.c`, x86-64, `CONFIG_KALLSYMS_BASE_RELATIVE`),
//! each 8-byte aligned:
//!
//! - `kallsyms_token_table`: 256 NUL-terminated strings, the expansion of each byte
//!   value in a compressed name. Byte values that are themselves characters of
//!   names expand to themselves, so the digits appear as `"0\0" "1\0" ... "9\0"`
//!   at indices 0x30..0x39: that run is how the table is found.
//! - `kallsyms_token_index`: right after it, 256 `u16` offsets of the tokens in
//!   the table: the check that the table found is one.
//! - `kallsyms_num_syms` (`u32`), then `kallsyms_names`: per symbol a length
//!   (one byte, or two as ULEB128 when the first has bit 7 set) and that many
//!   token bytes; the first character of the expansion is the `nm` type letter.
//! - `kallsyms_markers`: a `u32` per 256 symbols, the first 0; in 6.1 followed by
//!   `kallsyms_seqs_of_names` (3 bytes per symbol), then the token table.
//! - `kallsyms_offsets` (`s32` per symbol) and `kallsyms_relative_base` (`u64`):
//!   before `kallsyms_num_syms` up to 6.1, after the token index from 6.2. With
//!   `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` a non-negative offset is an absolute
//!   (per-CPU) address and a negative one `relative_base - 1 - offset`.
//!
//! Every read is bounds-checked: a file where these do not all agree gives `None`.

/// The most symbols believed (Debian's 6.1 kernel has about 94,000).
const MAX_SYMS: usize = 4 << 20;
/// How far before the token table the names may start.
const MAX_NAMES_SPAN: usize = 64 << 20;

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        d.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        d.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        d.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}
fn align8(x: usize) -> usize {
    x.next_multiple_of(8)
}

/// The token table at `start`: its 256 tokens and where it ends, if
/// `kallsyms_token_index` follows it and agrees.
fn tokens_at(d: &[u8], start: usize) -> Option<(Vec<&[u8]>, usize)> {
    let mut tokens = Vec::with_capacity(256);
    let mut offsets = Vec::with_capacity(256);
    let mut p = start;
    for _ in 0..256 {
        let len = d.get(p..)?.iter().position(|&b| b == 0)?;
        if len == 0 {
            return None;
        }
        offsets.push(p - start);
        tokens.push(&d[p..p + len]);
        p += len + 1;
    }
    let index = align8(p);
    for (i, &off) in offsets.iter().enumerate() {
        if usize::from(u16_at(d, index + 2 * i)?) != off {
            return None;
        }
    }
    Some((tokens, index + 512))
}

/// The token table holding the digit run at `digits` (token 0x30 there).
fn token_table(d: &[u8], digits: usize) -> Option<(usize, Vec<&[u8]>, usize)> {
    // Back over tokens 0x2f..0x00: each ends with the NUL before the next.
    let mut p = digits;
    for _ in 0..0x30 {
        if p == 0 || d[p - 1] != 0 {
            return None;
        }
        p -= 1;
        while p > 0 && d[p - 1] != 0 {
            p -= 1;
        }
    }
    let (tokens, end) = tokens_at(d, p)?;
    Some((p, tokens, end))
}

/// `kallsyms_num_syms` and `kallsyms_markers` before the token table at `tt`:
/// (offset of num_syms, count).
fn num_syms(d: &[u8], tt: usize) -> Option<(usize, usize)> {
    let lowest = tt.saturating_sub(MAX_NAMES_SPAN);
    let mut q = tt.checked_sub(8)? & !7;
    while q > lowest {
        let n = u32_at(d, q)? as usize;
        if (256..MAX_SYMS).contains(&n) {
            let m = n.div_ceil(256);
            for seqs in [align8(3 * n), 0] {
                let Some(markers) = tt.checked_sub(seqs + align8(4 * m)) else {
                    continue;
                };
                if markers <= q || u32_at(d, markers) != Some(0) {
                    continue;
                }
                let rising = (1..m).all(|i| {
                    matches!((u32_at(d, markers + 4 * (i - 1)), u32_at(d, markers + 4 * i)),
                        (Some(a), Some(b)) if b > a)
                });
                if rising && names_end(d, q + 8, n) == Some(markers) {
                    return Some((q, n));
                }
            }
        }
        q -= 8;
    }
    None
}

/// The length of the name at `p`: (length, bytes of the length).
fn name_len(d: &[u8], p: usize) -> Option<(usize, usize)> {
    let b = *d.get(p)?;
    if b & 0x80 == 0 {
        return Some((usize::from(b), 1));
    }
    let hi = *d.get(p + 1)?;
    Some((usize::from(b & 0x7f) | usize::from(hi) << 7, 2))
}

/// Where the markers start after `n` names from `p` (the end, 8-aligned).
fn names_end(d: &[u8], mut p: usize, n: usize) -> Option<usize> {
    for _ in 0..n {
        let (len, hdr) = name_len(d, p)?;
        if len == 0 {
            return None;
        }
        p = p.checked_add(hdr + len)?;
        if p > d.len() {
            return None;
        }
    }
    Some(align8(p))
}

/// Whether `base` looks like x86-64 Linux's kernel text base.
fn kernel_base(base: u64) -> bool {
    base >> 31 == 0x1_ffff_ffff
}

/// (offset of kallsyms_offsets, relative_base), before num_syms (to 6.1) or after
/// the token index (6.2 on).
fn offsets(d: &[u8], q: usize, n: usize, index_end: usize) -> Option<(usize, u64)> {
    let before = q
        .checked_sub(8)
        .and_then(|rb| Some((rb.checked_sub(align8(4 * n))?, u64_at(d, rb)?)));
    if let Some((at, base)) = before.filter(|&(_, b)| kernel_base(b)) {
        return Some((at, base));
    }
    let at = align8(index_end);
    let base = u64_at(d, align8(at + 4 * n))?;
    kernel_base(base).then_some((at, base))
}

/// Every symbol of the image's kallsyms: (address, type letter, name).
pub fn read(d: &[u8]) -> Option<Vec<(u64, u8, String)>> {
    const DIGITS: &[u8; 20] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
    let mut from = 0;
    while let Some(at) = d
        .get(from..)?
        .windows(DIGITS.len())
        .position(|w| w == DIGITS)
    {
        let digits = from + at;
        from = digits + 1;
        let Some((tt, tokens, index_end)) = token_table(d, digits) else {
            continue;
        };
        let Some((q, n)) = num_syms(d, tt) else {
            continue;
        };
        let Some((offs, base)) = offsets(d, q, n, index_end) else {
            continue;
        };
        let mut out = Vec::with_capacity(n);
        let mut p = q + 8;
        for i in 0..n {
            let (len, hdr) = name_len(d, p)?;
            let name: Vec<u8> = d
                .get(p + hdr..p + hdr + len)?
                .iter()
                .flat_map(|&b| tokens[usize::from(b)].iter().copied())
                .collect();
            p += hdr + len;
            let off = u32_at(d, offs + 4 * i)? as i32;
            let addr = if off >= 0 {
                off as u64
            } else {
                base.wrapping_sub(1).wrapping_sub(i64::from(off) as u64)
            };
            let (&kind, rest) = name.split_first()?;
            out.push((addr, kind, String::from_utf8_lossy(rest).into_owned()));
        }
        return Some(out);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6.1-shaped kallsyms blob: offsets, relative base, num_syms, names,
    /// markers, seqs_of_names, token table, token index. Token 0x80 stands for
    /// `serial`; every other byte value for itself (0 for `\x01`).
    fn blob(syms: &[(i32, &str)], base: u64) -> Vec<u8> {
        let pad = |v: &mut Vec<u8>| v.resize(align8(v.len()), 0);
        let mut d = vec![0xaau8; 40]; // what precedes the tables
        pad(&mut d);
        for &(off, _) in syms {
            d.extend_from_slice(&off.to_le_bytes());
        }
        pad(&mut d);
        d.extend_from_slice(&base.to_le_bytes());
        d.extend_from_slice(&(syms.len() as u32).to_le_bytes());
        pad(&mut d);
        let mut markers = Vec::new();
        let names_start = d.len();
        for (i, &(_, name)) in syms.iter().enumerate() {
            if i % 256 == 0 {
                markers.push((d.len() - names_start) as u32);
            }
            let enc = name.replace("serial", "\u{80}");
            let bytes: Vec<u8> = enc
                .chars()
                .map(|c| if c == '\u{80}' { 0x80 } else { c as u8 })
                .collect();
            if bytes.len() < 0x80 {
                d.push(bytes.len() as u8);
            } else {
                d.push(bytes.len() as u8 | 0x80);
                d.push((bytes.len() >> 7) as u8);
            }
            d.extend_from_slice(&bytes);
        }
        pad(&mut d);
        for m in markers {
            d.extend_from_slice(&m.to_le_bytes());
        }
        pad(&mut d);
        d.extend(std::iter::repeat_n(0x11, 3 * syms.len()));
        pad(&mut d);
        let tt = d.len();
        let mut index = Vec::new();
        for b in 0..=255u8 {
            index.push((d.len() - tt) as u16);
            match b {
                0x80 => d.extend_from_slice(b"serial"),
                0 => d.push(1),
                _ => d.push(b),
            }
            d.push(0);
        }
        pad(&mut d);
        for i in index {
            d.extend_from_slice(&i.to_le_bytes());
        }
        d.extend_from_slice(b"arch/x86/kernel/head64.c\0");
        d
    }

    #[test]
    fn reads_names_types_and_addresses_of_a_6_1_layout() {
        const BASE: u64 = 0xffff_ffff_8100_0000;
        let mut syms: Vec<(i32, String)> = vec![(0x1000, "Acpu_debug_store".into())];
        // Enough symbols for two markers; negative offsets are base-relative.
        for i in 0..300 {
            syms.push((-1 - 0x100 * i, format!("tfn_{i}")));
        }
        syms.push((-1 - 0x6a_f1a0, "Tserial8250_console_write".into()));
        let long = format!("t{}", "x".repeat(200));
        syms.push((-1 - 0x70_0000, long.clone()));
        let refs: Vec<(i32, &str)> = syms.iter().map(|(o, n)| (*o, n.as_str())).collect();
        let d = blob(&refs, BASE);
        let got = read(&d).expect("kallsyms found");
        assert_eq!(got.len(), syms.len());
        assert_eq!(got[0], (0x1000, b'A', "cpu_debug_store".to_string()));
        assert_eq!(got[1], (BASE, b't', "fn_0".to_string()));
        assert_eq!(got[300], (BASE + 0x100 * 299, b't', "fn_299".to_string()));
        assert_eq!(
            got[301],
            (
                BASE + 0x6a_f1a0,
                b'T',
                "serial8250_console_write".to_string()
            )
        );
        assert_eq!(got[302].2, long[1..]);
        // Damaged: a token index that disagrees, then names that overrun.
        let mut bad = d.clone();
        let idx = bad.len() - 25 - 512 + 2 * 0x31;
        bad[idx] ^= 1;
        assert_eq!(read(&bad), None);
        assert_eq!(read(&d[..d.len() / 2]), None);
        assert_eq!(read(b"no tables"), None);
    }
}
