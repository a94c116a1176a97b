//! What the AOT pass needs of an ELF file: its code areas, code symbols, entry
//! point and where function pointers are. The file is read by hv/core's one ELF
//! reader ([`avex_core::elf`]), which checks every size and offset, so corrupt
//! input gives an error naming the field and its file offset, never a panic.

use avex_core::elf::program_header::PT_LOAD;
use avex_core::elf::section_header::{SHF_EXECINSTR, SHT_DYNSYM, SHT_NOBITS, SHT_SYMTAB};
use avex_core::elf::sym::{STT_FUNC, STT_NOTYPE};
use avex_core::elf::{cstr, header, machine_name, ElfError, ElfFile, ProgramHeader, SectionHeader};

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
    /// Data sections, the objects in them and (ET_REL) relocations from them to
    /// code: where function pointers are.
    pub data: DataInfo<'a>,
}

pub use avex_core::elf::{EM_386, EM_X86_64};

fn corrupt(field: &'static str, value: u64, offset: u64, why: &'static str) -> AnalyzeError {
    AnalyzeError::Elf(ElfError::CorruptField {
        field,
        value,
        offset,
        why,
    })
}

/// The checked file and what the AOT pass decided from its header.
struct Reader<'a> {
    file: ElfFile<'a>,
    bits: u32,
    kind: ElfKind,
}

pub fn parse(data: &[u8]) -> Result<Elf<'_>, AnalyzeError> {
    let r = Reader::new(data)?;
    let phdrs = r.file.program_headers()?;
    let shdrs = r.file.section_headers()?;
    let names = r.file.section_names(&shdrs)?;
    let (code, area_of_section) = r.code_areas(&phdrs, &shdrs, &names)?;
    let syms = r.code_symbols(&shdrs, &code, &area_of_section)?;
    let data = r.data_info(&shdrs, &names, &code, &area_of_section);
    Ok(Elf {
        data,
        bits: r.bits,
        machine: r.file.header.e_machine,
        kind: r.kind,
        entry: r.entry_point(&phdrs, &code),
        code,
        syms,
    })
}

impl<'a> Reader<'a> {
    /// The header checks the AOT pass adds to the reader's: x86, and a file type it
    /// analyzes.
    fn new(data: &'a [u8]) -> Result<Reader<'a>, AnalyzeError> {
        let file = ElfFile::parse(data)?;
        let machine = file.header.e_machine;
        if machine != EM_386 && machine != EM_X86_64 {
            return Err(AnalyzeError::UnknownMachine {
                machine,
                name: machine_name(machine),
            });
        }
        let kind = match file.header.e_type {
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
        Ok(Reader {
            bits: file.bits,
            file,
            kind,
        })
    }

    fn sh_file_off(&self, i: usize) -> u64 {
        self.file.section_header_offset(i)
    }

    fn section_bytes(&self, sh: &SectionHeader) -> &'a [u8] {
        self.file.section_bytes(sh)
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
                            self.file.program_header_offset(i)
                                + if self.bits == 64 { 16 } else { 8 },
                            "segment address plus size overflows",
                        ));
                    }
                    code.push(CodeArea {
                        name: format!("segment {i}"),
                        section: None,
                        addr: ph.p_vaddr,
                        file_offset: ph.p_offset,
                        bytes: self.file.segment_bytes(ph),
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
        code: &[CodeArea<'a>],
        area_of_section: &[usize],
    ) -> Result<Vec<CodeSym>, AnalyzeError> {
        let kind = self.kind;
        let mut syms = Vec::new();
        for (ti, sh) in shdrs.iter().enumerate() {
            if sh.sh_type != SHT_SYMTAB && sh.sh_type != SHT_DYNSYM {
                continue;
            }
            let strtab: &[u8] = shdrs
                .get(sh.sh_link as usize)
                .map_or(&[][..], |s| self.section_bytes(s));
            let table = self.file.symbol_table(shdrs, ti)?;
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
        if kind != ElfKind::Rel && self.file.header.e_entry != 0 {
            let e = self.file.header.e_entry;
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
}

impl CodeArea<'_> {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.bytes.len() as u64
    }
}
