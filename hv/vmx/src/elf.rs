//! Just enough ELF64 to find a named section in the guest image, bounds-checked
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

/// The bytes of the section called `name`, if the file is ELF64 and has one whose
/// contents lie inside the file.
pub fn section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return None;
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    if shentsize < 64 || shstrndx >= shnum {
        return None;
    }
    let header = |i: usize| -> Option<(u32, u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, h)?;
        let kind = u32_at(elf, h + 4)?;
        let off = usize::try_from(u64_at(elf, h + 24)?).ok()?;
        let size = usize::try_from(u64_at(elf, h + 32)?).ok()?;
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
