//! ELF reading for the AOT pass: every size and offset is checked against the file
//! before it is trusted, so corrupt input gives an [`AnalyzeError`] naming the field and
//! its file offset, never a panic. goblin parses the fixed-size records (header,
//! program headers, section headers, symbols); names are read here, leniently.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{self, Header};
use goblin::elf::program_header::{ProgramHeader, PT_LOAD};
use goblin::elf::section_header::{
    SectionHeader, SHF_EXECINSTR, SHT_DYNSYM, SHT_NOBITS, SHT_SYMTAB,
};
use goblin::elf::sym::{Symtab, STT_FUNC, STT_NOTYPE};

use crate::AnalyzeError;

/// ELF file kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfKind {
    Exec,
    Dyn,
    Rel,
}

impl ElfKind {
    pub fn name(self) -> &'static str {
        match self {
            ElfKind::Exec => "EXEC",
            ElfKind::Dyn => "DYN",
            ElfKind::Rel => "REL",
        }
    }
}

/// An executable piece of the file: a section, or a PT_LOAD segment when the file has
/// no section headers.
#[derive(Clone, Debug)]
pub struct CodeArea<'a> {
    pub name: String,
    /// Section index (None for segments).
    pub section: Option<usize>,
    /// Address of `bytes[0]` (sh_addr, 0-based in ET_REL, or p_vaddr).
    pub addr: u64,
    /// Offset of `bytes[0]` in the file.
    pub file_offset: u64,
    pub bytes: &'a [u8],
    /// Address space: areas only branch into areas of the same space. ET_REL gives each
    /// section its own space (their addresses all start at 0); otherwise 0.
    pub space: usize,
}

/// A code symbol: a root for recursive traversal.
#[derive(Clone, Debug)]
pub struct CodeSym {
    pub name: String,
    /// Index into `Elf::code` of the area holding it.
    pub area: usize,
    pub addr: u64,
    pub size: u64,
    pub is_func: bool,
}

/// What the AOT pass needs of an ELF file.
#[derive(Debug)]
pub struct Elf<'a> {
    pub bits: u32,
    pub machine: u16,
    pub kind: ElfKind,
    pub entry: Option<u64>,
    pub code: Vec<CodeArea<'a>>,
    pub syms: Vec<CodeSym>,
    /// Loadable segments: (p_paddr, file bytes), the guest identity input. For ET_REL
    /// (no segments): the allocated PROGBITS sections, (sh_addr, bytes), in index order.
    pub segments: Vec<(u64, &'a [u8])>,
}

pub const EM_386: u16 = 3;
pub const EM_X86_64: u16 = 62;

fn machine_name(m: u16) -> &'static str {
    match m {
        0 => "none",
        2 => "SPARC",
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "S390",
        40 => "ARM",
        42 => "SuperH",
        50 => "IA-64",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        247 => "BPF",
        258 => "LoongArch",
        _ => "unknown",
    }
}

fn corrupt(field: &'static str, value: u64, offset: u64, why: &'static str) -> AnalyzeError {
    AnalyzeError::CorruptField {
        field,
        value,
        offset,
        why,
    }
}

/// `off + len` within a file of `file_len` bytes?
fn fits(off: u64, len: u64, file_len: usize) -> bool {
    off.checked_add(len)
        .is_some_and(|end| end <= file_len as u64)
}

fn cstr(bytes: &[u8], off: u64) -> String {
    let Some(rest) = usize::try_from(off).ok().and_then(|o| bytes.get(o..)) else {
        return String::new();
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end.min(4096)]).into_owned()
}

pub fn parse(data: &[u8]) -> Result<Elf<'_>, AnalyzeError> {
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return Err(AnalyzeError::NotElf {
            len: data.len() as u64,
            hint: compressed_hint(data),
        });
    }
    if data.len() < 16 {
        return Err(AnalyzeError::Truncated {
            what: "ELF identification (e_ident)",
            offset: 0,
            need: 16,
            len: data.len() as u64,
        });
    }
    let bits = match data[header::EI_CLASS] {
        header::ELFCLASS32 => 32,
        header::ELFCLASS64 => 64,
        c => {
            return Err(corrupt(
                "e_ident[EI_CLASS]",
                c.into(),
                header::EI_CLASS as u64,
                "must be 1 (ELFCLASS32) or 2 (ELFCLASS64)",
            ))
        }
    };
    match data[header::EI_DATA] {
        header::ELFDATA2LSB => {}
        header::ELFDATA2MSB => {
            return Err(corrupt(
                "e_ident[EI_DATA]",
                2,
                header::EI_DATA as u64,
                "big-endian: x86 ELF files are little-endian",
            ))
        }
        d => {
            return Err(corrupt(
                "e_ident[EI_DATA]",
                d.into(),
                header::EI_DATA as u64,
                "must be 1 (little-endian)",
            ))
        }
    }
    if data[header::EI_VERSION] != 1 {
        return Err(corrupt(
            "e_ident[EI_VERSION]",
            data[header::EI_VERSION].into(),
            header::EI_VERSION as u64,
            "must be 1 (EV_CURRENT)",
        ));
    }
    let ehsize = if bits == 64 { 64 } else { 52 };
    if data.len() < ehsize {
        return Err(AnalyzeError::Truncated {
            what: "ELF header",
            offset: 0,
            need: ehsize as u64,
            len: data.len() as u64,
        });
    }
    let hdr: Header = goblin::elf::Elf::parse_header(data).map_err(|e| AnalyzeError::Corrupt {
        offset: 0,
        what: format!("ELF header: {e}"),
    })?;
    // Offsets of header fields (ELF32 / ELF64).
    let (o_phoff, o_shoff, o_phentsize, _o_phnum, o_shentsize, _o_shnum, o_shstrndx) = if bits == 64
    {
        (32u64, 40u64, 54u64, 56u64, 58u64, 60u64, 62u64)
    } else {
        (28, 32, 42, 44, 46, 48, 50)
    };
    let machine = hdr.e_machine;
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(AnalyzeError::UnknownMachine {
            machine,
            name: machine_name(machine),
        });
    }
    let kind = match hdr.e_type {
        header::ET_REL => ElfKind::Rel,
        header::ET_EXEC => ElfKind::Exec,
        header::ET_DYN => ElfKind::Dyn,
        t => {
            return Err(corrupt(
                "e_type",
                t.into(),
                16,
                "must be ET_REL (1), ET_EXEC (2) or ET_DYN (3)",
            ))
        }
    };
    let ctx = Ctx::new(
        if bits == 64 {
            Container::Big
        } else {
            Container::Little
        },
        Endian::Little,
    );
    let phent = if bits == 64 { 56u64 } else { 32 };
    let shent = if bits == 64 { 64u64 } else { 40 };

    // Program headers.
    let mut phdrs = Vec::new();
    if hdr.e_phnum > 0 {
        if u64::from(hdr.e_phentsize) != phent {
            return Err(corrupt(
                "e_phentsize",
                hdr.e_phentsize.into(),
                o_phentsize,
                "does not match the ELF class",
            ));
        }
        let size = phent * u64::from(hdr.e_phnum);
        if hdr.e_phoff == 0 || !fits(hdr.e_phoff, size, data.len()) {
            return Err(AnalyzeError::TablePastEnd {
                what: "program header table",
                field_offset: o_phoff,
                offset: hdr.e_phoff,
                size,
                len: data.len() as u64,
            });
        }
        phdrs = ProgramHeader::parse(data, hdr.e_phoff as usize, hdr.e_phnum as usize, ctx)
            .map_err(|e| AnalyzeError::Corrupt {
                offset: hdr.e_phoff,
                what: format!("program headers: {e}"),
            })?;
    }
    for (i, ph) in phdrs.iter().enumerate() {
        if ph.p_type == PT_LOAD && !fits(ph.p_offset, ph.p_filesz, data.len()) {
            return Err(AnalyzeError::SegmentPastEnd {
                index: i,
                offset: ph.p_offset,
                size: ph.p_filesz,
                len: data.len() as u64,
            });
        }
    }

    // Section headers.
    let mut shdrs: Vec<SectionHeader> = Vec::new();
    if hdr.e_shoff != 0 {
        if u64::from(hdr.e_shentsize) != shent {
            return Err(corrupt(
                "e_shentsize",
                hdr.e_shentsize.into(),
                o_shentsize,
                "does not match the ELF class",
            ));
        }
        if !fits(hdr.e_shoff, shent, data.len()) {
            return Err(AnalyzeError::TablePastEnd {
                what: "section header table",
                field_offset: o_shoff,
                offset: hdr.e_shoff,
                size: shent,
                len: data.len() as u64,
            });
        }
        let first = SectionHeader::parse(data, hdr.e_shoff as usize, 1, ctx).map_err(|e| {
            AnalyzeError::Corrupt {
                offset: hdr.e_shoff,
                what: format!("section header 0: {e}"),
            }
        })?;
        let count = if hdr.e_shnum == 0 {
            first.first().map_or(0, |s| s.sh_size)
        } else {
            u64::from(hdr.e_shnum)
        };
        let size = count.saturating_mul(shent);
        if !fits(hdr.e_shoff, size, data.len()) {
            return Err(AnalyzeError::TablePastEnd {
                what: "section header table",
                field_offset: o_shoff,
                offset: hdr.e_shoff,
                size,
                len: data.len() as u64,
            });
        }
        shdrs =
            SectionHeader::parse(data, hdr.e_shoff as usize, count as usize, ctx).map_err(|e| {
                AnalyzeError::Corrupt {
                    offset: hdr.e_shoff,
                    what: format!("section headers: {e}"),
                }
            })?;
    }
    let sh_file_off = |i: usize| hdr.e_shoff + i as u64 * shent;
    let section_bytes = |sh: &SectionHeader| -> &[u8] {
        if sh.sh_type == SHT_NOBITS {
            return &[];
        }
        let (Ok(o), Ok(n)) = (usize::try_from(sh.sh_offset), usize::try_from(sh.sh_size)) else {
            return &[];
        };
        o.checked_add(n).and_then(|e| data.get(o..e)).unwrap_or(&[])
    };
    // Section names.
    let mut shstrndx = u64::from(hdr.e_shstrndx);
    if shstrndx == u64::from(goblin::elf::section_header::SHN_XINDEX) {
        shstrndx = shdrs.first().map_or(0, |s| u64::from(s.sh_link));
    }
    let shstr: &[u8] = if shdrs.is_empty() || shstrndx == 0 {
        &[]
    } else {
        match shdrs.get(shstrndx as usize) {
            Some(sh) => section_bytes(sh),
            None => {
                return Err(corrupt(
                    "e_shstrndx",
                    shstrndx,
                    o_shstrndx,
                    "names no section",
                ))
            }
        }
    };
    let names: Vec<String> = shdrs
        .iter()
        .map(|s| cstr(shstr, s.sh_name as u64))
        .collect();

    for (i, sh) in shdrs.iter().enumerate() {
        if sh.sh_type != SHT_NOBITS && sh.sh_size > 0 && !fits(sh.sh_offset, sh.sh_size, data.len())
        {
            return Err(AnalyzeError::SectionPastEnd {
                index: i,
                name: Some(names[i].clone()).filter(|n| !n.is_empty()),
                header_offset: sh_file_off(i),
                offset: sh.sh_offset,
                size: sh.sh_size,
                len: data.len() as u64,
            });
        }
    }
    // Code areas.
    let mut code = Vec::new();
    let exec_sections: Vec<usize> = shdrs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sh_flags & u64::from(SHF_EXECINSTR) != 0 && s.sh_type != SHT_NOBITS)
        .filter(|(_, s)| s.sh_size > 0)
        .map(|(i, _)| i)
        .collect();
    let mut area_of_section = vec![usize::MAX; shdrs.len()];
    if !exec_sections.is_empty() {
        for &i in &exec_sections {
            let sh = &shdrs[i];
            if sh.sh_addr.checked_add(sh.sh_size).is_none() {
                return Err(corrupt(
                    "sh_addr",
                    sh.sh_addr,
                    sh_file_off(i) + if bits == 64 { 16 } else { 12 },
                    "section address plus size overflows",
                ));
            }
            area_of_section[i] = code.len();
            code.push(CodeArea {
                name: if names[i].is_empty() {
                    format!("section {i}")
                } else {
                    names[i].clone()
                },
                section: Some(i),
                addr: sh.sh_addr,
                file_offset: sh.sh_offset,
                bytes: section_bytes(sh),
                space: if kind == ElfKind::Rel { i } else { 0 },
            });
        }
    } else {
        for (i, ph) in phdrs.iter().enumerate() {
            if ph.p_type == PT_LOAD && ph.is_executable() && ph.p_filesz > 0 {
                if ph.p_vaddr.checked_add(ph.p_filesz).is_none() {
                    return Err(corrupt(
                        "p_vaddr",
                        ph.p_vaddr,
                        hdr.e_phoff + i as u64 * phent + if bits == 64 { 16 } else { 8 },
                        "segment address plus size overflows",
                    ));
                }
                code.push(CodeArea {
                    name: format!("segment {i}"),
                    section: None,
                    addr: ph.p_vaddr,
                    file_offset: ph.p_offset,
                    bytes: &data[ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize],
                    space: 0,
                });
            }
        }
    }

    // Symbols.
    let mut syms = Vec::new();
    let symsize = if bits == 64 { 24u64 } else { 16 };
    for (ti, sh) in shdrs.iter().enumerate() {
        if sh.sh_type != SHT_SYMTAB && sh.sh_type != SHT_DYNSYM {
            continue;
        }
        if sh.sh_entsize != symsize {
            return Err(corrupt(
                "sh_entsize",
                sh.sh_entsize,
                sh_file_off(ti) + if bits == 64 { 56 } else { 36 },
                "symbol table entry size does not match the ELF class",
            ));
        }
        let strtab: &[u8] = shdrs
            .get(sh.sh_link as usize)
            .map_or(&[][..], |s| section_bytes(s));
        let count = (sh.sh_size / symsize) as usize;
        let table = Symtab::parse(data, sh.sh_offset as usize, count, ctx).map_err(|e| {
            AnalyzeError::Corrupt {
                offset: sh.sh_offset,
                what: format!("symbol table {}: {e}", names[ti]),
            }
        })?;
        for sym in table.iter() {
            let ty = sym.st_type();
            if ty != STT_FUNC && ty != STT_NOTYPE {
                continue;
            }
            let shndx = sym.st_shndx;
            let area = if shndx > 0 && shndx < area_of_section.len() {
                area_of_section[shndx]
            } else {
                usize::MAX
            };
            let addr = if kind == ElfKind::Rel {
                if area == usize::MAX {
                    continue;
                }
                code[area].addr.wrapping_add(sym.st_value)
            } else {
                sym.st_value
            };
            let area = if area != usize::MAX {
                area
            } else if let Some(a) = code.iter().position(|c| c.contains(addr)) {
                a
            } else {
                continue;
            };
            if !code[area].contains(addr) {
                continue;
            }
            let name = cstr(strtab, sym.st_name as u64);
            // Section and file symbols have other types; skip assembler-local labels.
            if ty == STT_NOTYPE && (name.is_empty() || name.starts_with(".L")) {
                continue;
            }
            syms.push(CodeSym {
                name,
                area,
                addr,
                size: sym.st_size,
                is_func: ty == STT_FUNC,
            });
        }
    }

    // Entry point: a virtual address, or (as in Linux's vmlinux) a physical one.
    let mut entry = None;
    if kind != ElfKind::Rel && hdr.e_entry != 0 {
        let e = hdr.e_entry;
        if code.iter().any(|c| c.contains(e)) {
            entry = Some(e);
        } else {
            for ph in phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
                if e >= ph.p_paddr && e - ph.p_paddr < ph.p_memsz {
                    let v = ph.p_vaddr.wrapping_add(e - ph.p_paddr);
                    if code.iter().any(|c| c.contains(v)) {
                        entry = Some(v);
                        break;
                    }
                }
            }
        }
    }

    // Guest identity: loadable segments.
    let mut segments = Vec::new();
    if kind == ElfKind::Rel || phdrs.is_empty() {
        for (i, sh) in shdrs.iter().enumerate() {
            if sh.sh_flags & u64::from(goblin::elf::section_header::SHF_ALLOC) != 0
                && sh.sh_type != SHT_NOBITS
                && sh.sh_size > 0
            {
                let _ = i;
                segments.push((sh.sh_addr, section_bytes(sh)));
            }
        }
    } else {
        for ph in phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
        {
            segments.push((
                ph.p_paddr,
                &data[ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize],
            ));
        }
    }

    Ok(Elf {
        bits,
        machine,
        kind,
        entry,
        code,
        syms,
        segments,
    })
}

impl CodeArea<'_> {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.bytes.len() as u64
    }
}

/// What a non-ELF file looks like, when it is a compressed file or a kernel image.
fn compressed_hint(data: &[u8]) -> &'static str {
    let starts = |m: &[u8]| data.starts_with(m);
    if starts(b"\xfd7zXZ\x00") {
        "; it is xz-compressed: decompress it first (xz -d)"
    } else if starts(b"\x28\xb5\x2f\xfd") {
        "; it is zstd-compressed: decompress it first (zstd -d)"
    } else if starts(b"\x1f\x8b") {
        "; it is gzip-compressed: decompress it first (gzip -d)"
    } else if data.len() > 0x206 && &data[0x202..0x206] == b"HdrS" {
        "; it is a bzImage: extract the ELF vmlinux from it first (see scripts/linux-kernel.sh)"
    } else {
        ""
    }
}
