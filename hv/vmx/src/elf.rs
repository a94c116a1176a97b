//! Just enough ELF (32 and 64) to find a named section in the guest image, bounds-checked
//! (the image is untrusted input).

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The bytes of the section called `name`, if the file is ELF32 or ELF64 and has
/// one whose contents lie inside the file.
pub fn section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if elf.len() < 52 || &elf[..4] != b"\x7fELF" || elf[5] != 1 {
        return None;
    }
    let is64 = match elf[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let (shoff, shentsize, shnum, shstrndx, min_ent) = if is64 {
        (
            usize::try_from(u64_at(elf, 0x28)?).ok()?,
            usize::from(u16_at(elf, 0x3a)?),
            usize::from(u16_at(elf, 0x3c)?),
            usize::from(u16_at(elf, 0x3e)?),
            64,
        )
    } else {
        (
            u32_at(elf, 0x20)? as usize,
            usize::from(u16_at(elf, 0x2e)?),
            usize::from(u16_at(elf, 0x30)?),
            usize::from(u16_at(elf, 0x32)?),
            40,
        )
    };
    if shentsize < min_ent || shstrndx >= shnum {
        return None;
    }
    let header = |i: usize| -> Option<(u32, u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, h)?;
        let kind = u32_at(elf, h + 4)?;
        let (off, size) = if is64 {
            (
                usize::try_from(u64_at(elf, h + 24)?).ok()?,
                usize::try_from(u64_at(elf, h + 32)?).ok()?,
            )
        } else {
            (u32_at(elf, h + 16)? as usize, u32_at(elf, h + 20)? as usize)
        };
        Some((name, kind, off, size))
    };
    let (_, _, str_off, str_size) = header(shstrndx)?;
    let strtab = elf.get(str_off..str_off.checked_add(str_size)?)?;
    for i in 0..shnum {
        let (n, kind, off, size) = header(i)?;
        let rest = strtab.get(n as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        if &rest[..end] == name.as_bytes() {
            if kind == 8 {
                // SHT_NOBITS: no contents in the file.
                return Some(&[]);
            }
            return elf.get(off..off.checked_add(size)?);
        }
    }
    None
}
