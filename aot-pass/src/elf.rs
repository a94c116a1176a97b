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

mod data;
pub use data::{CodePointer, DataArea, DataInfo, DataObject};

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
    /// Data sections, the objects in them and (ET_REL) relocations from them to
    /// code: where function pointers are.
    pub data: DataInfo<'a>,
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

/// The checked ELF header and what reading the rest needs.
struct Reader<'a> {
    data: &'a [u8],
    bits: u32,
    hdr: Header,
    kind: ElfKind,
    ctx: Ctx,
    /// Program and section header entry sizes for the class.
    phent: u64,
    shent: u64,
    fields: HeaderFields,
}

/// File offsets of the ELF header's fields, for error messages.
struct HeaderFields {
    phoff: u64,
    shoff: u64,
    phentsize: u64,
    shentsize: u64,
    shstrndx: u64,
}

pub fn parse(data: &[u8]) -> Result<Elf<'_>, AnalyzeError> {
    let r = Reader::new(data)?;
    let phdrs = r.program_headers()?;
    let shdrs = r.section_headers()?;
    let names = r.section_names(&shdrs)?;
    let (code, area_of_section) = r.code_areas(&phdrs, &shdrs, &names)?;
    let syms = r.code_symbols(&shdrs, &names, &code, &area_of_section)?;
    let data = r.data_info(&shdrs, &names, &code, &area_of_section);
    Ok(Elf {
        data,
        bits: r.bits,
        machine: r.hdr.e_machine,
        kind: r.kind,
        entry: r.entry_point(&phdrs, &code),
        segments: r.loadable_segments(&phdrs, &shdrs),
        code,
        syms,
    })
}

impl<'a> Reader<'a> {
    /// The identification and header checks: class, byte order, version, machine,
    /// type.
    fn new(data: &'a [u8]) -> Result<Reader<'a>, AnalyzeError> {
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
        let hdr: Header =
            goblin::elf::Elf::parse_header(data).map_err(|e| AnalyzeError::Corrupt {
                offset: 0,
                what: format!("ELF header: {e}"),
            })?;
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
        let fields = if bits == 64 {
            HeaderFields {
                phoff: 32,
                shoff: 40,
                phentsize: 54,
                shentsize: 58,
                shstrndx: 62,
            }
        } else {
            HeaderFields {
                phoff: 28,
                shoff: 32,
                phentsize: 42,
                shentsize: 46,
                shstrndx: 50,
            }
        };
        let container = if bits == 64 {
            Container::Big
        } else {
            Container::Little
        };
        Ok(Reader {
            data,
            bits,
            hdr,
            kind,
            ctx: Ctx::new(container, Endian::Little),
            phent: if bits == 64 { 56 } else { 32 },
            shent: if bits == 64 { 64 } else { 40 },
            fields,
        })
    }

    /// The program headers, each PT_LOAD checked to lie in the file.
    fn program_headers(&self) -> Result<Vec<ProgramHeader>, AnalyzeError> {
        let mut phdrs = Vec::new();
        if self.hdr.e_phnum > 0 {
            if u64::from(self.hdr.e_phentsize) != self.phent {
                return Err(corrupt(
                    "e_phentsize",
                    self.hdr.e_phentsize.into(),
                    self.fields.phentsize,
                    "does not match the ELF class",
                ));
            }
            let size = self.phent * u64::from(self.hdr.e_phnum);
            if self.hdr.e_phoff == 0 || !fits(self.hdr.e_phoff, size, self.data.len()) {
                return Err(AnalyzeError::TablePastEnd {
                    what: "program header table",
                    field_offset: self.fields.phoff,
                    offset: self.hdr.e_phoff,
                    size,
                    len: self.data.len() as u64,
                });
            }
            phdrs = ProgramHeader::parse(
                self.data,
                self.hdr.e_phoff as usize,
                self.hdr.e_phnum as usize,
                self.ctx,
            )
            .map_err(|e| AnalyzeError::Corrupt {
                offset: self.hdr.e_phoff,
                what: format!("program headers: {e}"),
            })?;
        }
        for (i, ph) in phdrs.iter().enumerate() {
            if ph.p_type == PT_LOAD && !fits(ph.p_offset, ph.p_filesz, self.data.len()) {
                return Err(AnalyzeError::SegmentPastEnd {
                    index: i,
                    offset: ph.p_offset,
                    size: ph.p_filesz,
                    len: self.data.len() as u64,
                });
            }
        }
        Ok(phdrs)
    }

    /// The section headers (the count from section 0 when e_shnum is 0).
    fn section_headers(&self) -> Result<Vec<SectionHeader>, AnalyzeError> {
        let mut shdrs: Vec<SectionHeader> = Vec::new();
        if self.hdr.e_shoff != 0 {
            if u64::from(self.hdr.e_shentsize) != self.shent {
                return Err(corrupt(
                    "e_shentsize",
                    self.hdr.e_shentsize.into(),
                    self.fields.shentsize,
                    "does not match the ELF class",
                ));
            }
            if !fits(self.hdr.e_shoff, self.shent, self.data.len()) {
                return Err(AnalyzeError::TablePastEnd {
                    what: "section header table",
                    field_offset: self.fields.shoff,
                    offset: self.hdr.e_shoff,
                    size: self.shent,
                    len: self.data.len() as u64,
                });
            }
            let first = SectionHeader::parse(self.data, self.hdr.e_shoff as usize, 1, self.ctx)
                .map_err(|e| AnalyzeError::Corrupt {
                    offset: self.hdr.e_shoff,
                    what: format!("section header 0: {e}"),
                })?;
            let count = if self.hdr.e_shnum == 0 {
                first.first().map_or(0, |s| s.sh_size)
            } else {
                u64::from(self.hdr.e_shnum)
            };
            let size = count.saturating_mul(self.shent);
            if !fits(self.hdr.e_shoff, size, self.data.len()) {
                return Err(AnalyzeError::TablePastEnd {
                    what: "section header table",
                    field_offset: self.fields.shoff,
                    offset: self.hdr.e_shoff,
                    size,
                    len: self.data.len() as u64,
                });
            }
            shdrs = SectionHeader::parse(
                self.data,
                self.hdr.e_shoff as usize,
                count as usize,
                self.ctx,
            )
            .map_err(|e| AnalyzeError::Corrupt {
                offset: self.hdr.e_shoff,
                what: format!("section headers: {e}"),
            })?;
        }
        Ok(shdrs)
    }

    fn sh_file_off(&self, i: usize) -> u64 {
        self.hdr.e_shoff + i as u64 * self.shent
    }

    /// A section's bytes (none for NOBITS or a range outside the file).
    fn section_bytes(&self, sh: &SectionHeader) -> &'a [u8] {
        if sh.sh_type == SHT_NOBITS {
            return &[];
        }
        let (Ok(o), Ok(n)) = (usize::try_from(sh.sh_offset), usize::try_from(sh.sh_size)) else {
            return &[];
        };
        o.checked_add(n)
            .and_then(|e| self.data.get(o..e))
            .unwrap_or(&[])
    }

    /// Section names, after checking that every section with contents lies in the
    /// file.
    fn section_names(&self, shdrs: &[SectionHeader]) -> Result<Vec<String>, AnalyzeError> {
        let mut shstrndx = u64::from(self.hdr.e_shstrndx);
        if shstrndx == u64::from(goblin::elf::section_header::SHN_XINDEX) {
            shstrndx = shdrs.first().map_or(0, |s| u64::from(s.sh_link));
        }
        let shstr: &[u8] = if shdrs.is_empty() || shstrndx == 0 {
            &[]
        } else {
            match shdrs.get(shstrndx as usize) {
                Some(sh) => self.section_bytes(sh),
                None => {
                    return Err(corrupt(
                        "e_shstrndx",
                        shstrndx,
                        self.fields.shstrndx,
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
            if sh.sh_type != SHT_NOBITS
                && sh.sh_size > 0
                && !fits(sh.sh_offset, sh.sh_size, self.data.len())
            {
                return Err(AnalyzeError::SectionPastEnd {
                    index: i,
                    name: Some(names[i].clone()).filter(|n| !n.is_empty()),
                    header_offset: self.sh_file_off(i),
                    offset: sh.sh_offset,
                    size: sh.sh_size,
                    len: self.data.len() as u64,
                });
            }
        }
        Ok(names)
    }

    /// The executable sections (or, without sections, the executable PT_LOAD
    /// segments), and for each section index its area's index (`usize::MAX`: none).
    fn code_areas(
        &self,
        phdrs: &[ProgramHeader],
        shdrs: &[SectionHeader],
        names: &[String],
    ) -> Result<(Vec<CodeArea<'a>>, Vec<usize>), AnalyzeError> {
        let kind = self.kind;
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
                        self.sh_file_off(i) + if self.bits == 64 { 16 } else { 12 },
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
                    bytes: self.section_bytes(sh),
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
                            self.hdr.e_phoff
                                + i as u64 * self.phent
                                + if self.bits == 64 { 16 } else { 8 },
                            "segment address plus size overflows",
                        ));
                    }
                    code.push(CodeArea {
                        name: format!("segment {i}"),
                        section: None,
                        addr: ph.p_vaddr,
                        file_offset: ph.p_offset,
                        bytes: &self.data
                            [ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize],
                        space: 0,
                    });
                }
            }
        }
        Ok((code, area_of_section))
    }

    /// Function and untyped symbols inside code areas: roots for the traversal.
    fn code_symbols(
        &self,
        shdrs: &[SectionHeader],
        names: &[String],
        code: &[CodeArea<'a>],
        area_of_section: &[usize],
    ) -> Result<Vec<CodeSym>, AnalyzeError> {
        let kind = self.kind;
        let mut syms = Vec::new();
        let symsize = if self.bits == 64 { 24u64 } else { 16 };
        for (ti, sh) in shdrs.iter().enumerate() {
            if sh.sh_type != SHT_SYMTAB && sh.sh_type != SHT_DYNSYM {
                continue;
            }
            if sh.sh_entsize != symsize {
                return Err(corrupt(
                    "sh_entsize",
                    sh.sh_entsize,
                    self.sh_file_off(ti) + if self.bits == 64 { 56 } else { 36 },
                    "symbol table entry size does not match the ELF class",
                ));
            }
            let strtab: &[u8] = shdrs
                .get(sh.sh_link as usize)
                .map_or(&[][..], |s| self.section_bytes(s));
            let count = (sh.sh_size / symsize) as usize;
            let table =
                Symtab::parse(self.data, sh.sh_offset as usize, count, self.ctx).map_err(|e| {
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
        Ok(syms)
    }

    /// The entry point: a virtual address, or (as in Linux's vmlinux) a physical one.
    fn entry_point(&self, phdrs: &[ProgramHeader], code: &[CodeArea<'a>]) -> Option<u64> {
        let kind = self.kind;
        let mut entry = None;
        if kind != ElfKind::Rel && self.hdr.e_entry != 0 {
            let e = self.hdr.e_entry;
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
        entry
    }

    /// Guest identity input: the loadable segments (for ET_REL, the allocated
    /// sections).
    fn loadable_segments(
        &self,
        phdrs: &[ProgramHeader],
        shdrs: &[SectionHeader],
    ) -> Vec<(u64, &'a [u8])> {
        let kind = self.kind;
        let mut segments = Vec::new();
        if kind == ElfKind::Rel || phdrs.is_empty() {
            for sh in shdrs {
                if sh.sh_flags & u64::from(goblin::elf::section_header::SHF_ALLOC) != 0
                    && sh.sh_type != SHT_NOBITS
                    && sh.sh_size > 0
                {
                    segments.push((sh.sh_addr, self.section_bytes(sh)));
                }
            }
        } else {
            for ph in phdrs
                .iter()
                .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
            {
                segments.push((
                    ph.p_paddr,
                    &self.data[ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize],
                ));
            }
        }
        segments
    }
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
