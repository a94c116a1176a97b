//! What the ELF says about code addresses stored in data: the allocated data
//! sections, the data objects (STT_OBJECT) in them, and, in ET_REL objects, the
//! absolute relocations (R_X86_64_64, R_386_32) from data to code. The AOT pass
//! turns these into known destinations of indirect calls (`crate::targets`).
//! Everything here is best effort: a malformed table is skipped, never an error.

use avex_core::elf::reloc::{R_386_32, R_X86_64_64};
use avex_core::elf::section_header::{
    SectionHeader, SHF_ALLOC, SHF_EXECINSTR, SHT_PROGBITS, SHT_SYMTAB,
};
use avex_core::elf::sym::{STT_FUNC, STT_OBJECT, STT_SECTION};

use super::{CodeArea, ElfKind, Reader};

/// An allocated, non-executable section with contents.
#[derive(Clone, Debug)]
pub struct DataArea<'a> {
    pub name: String,
    pub addr: u64,
    pub bytes: &'a [u8],
}

/// A data object (STT_OBJECT symbol) inside a [`DataArea`]: a structure whose
/// fields may hold function pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DataObject {
    /// Index into `Elf::data`.
    pub area: usize,
    pub addr: u64,
    pub size: u64,
}

/// An ET_REL relocation that stores the address of code into data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CodePointer {
    /// Index into `Elf::data` and the address of the word there.
    pub area: usize,
    pub at: u64,
    /// Index into `Elf::code` and the code address stored.
    pub code_area: usize,
    pub to: u64,
}

/// What [`read`] found.
#[derive(Debug, Default)]
pub struct DataInfo<'a> {
    pub data: Vec<DataArea<'a>>,
    pub objects: Vec<DataObject>,
    pub code_pointers: Vec<CodePointer>,
}

impl<'a> Reader<'a> {
    /// The data sections, their objects and (ET_REL) their relocations to code.
    pub(super) fn data_info(
        &self,
        shdrs: &[SectionHeader],
        names: &[String],
        code: &[CodeArea<'a>],
        area_of_section: &[usize],
    ) -> DataInfo<'a> {
        let mut out = DataInfo::default();
        let mut data_of_section = vec![usize::MAX; shdrs.len()];
        for (i, sh) in shdrs.iter().enumerate() {
            let alloc = sh.sh_flags & u64::from(SHF_ALLOC) != 0;
            let exec = sh.sh_flags & u64::from(SHF_EXECINSTR) != 0;
            if alloc && !exec && sh.sh_type == SHT_PROGBITS && sh.sh_size > 0 {
                data_of_section[i] = out.data.len();
                out.data.push(DataArea {
                    name: names[i].clone(),
                    addr: sh.sh_addr,
                    bytes: self.section_bytes(sh),
                });
            }
        }
        if out.data.is_empty() {
            return out;
        }
        for (i, sh) in shdrs.iter().enumerate() {
            if sh.sh_type != SHT_SYMTAB {
                continue;
            }
            let Ok(table) = self.file.symbol_table(shdrs, i) else {
                continue;
            };
            for sym in table.iter() {
                let area = data_of_section.get(sym.st_shndx).copied();
                let Some(area) = area.filter(|&a| a != usize::MAX) else {
                    continue;
                };
                if sym.st_type() == STT_OBJECT && sym.st_size > 0 {
                    let addr = if self.kind == ElfKind::Rel {
                        out.data[area].addr.wrapping_add(sym.st_value)
                    } else {
                        sym.st_value
                    };
                    out.objects.push(DataObject {
                        area,
                        addr,
                        size: sym.st_size,
                    });
                }
            }
        }
        out.objects.sort_unstable();
        out.objects.dedup();
        if self.kind == ElfKind::Rel {
            self.relocations_to_code(shdrs, code, area_of_section, &data_of_section, &mut out);
        }
        out
    }

    /// ET_REL: absolute pointer-sized relocations in data sections whose symbol is
    /// in an executable section (a function, or the section plus an addend).
    fn relocations_to_code(
        &self,
        shdrs: &[SectionHeader],
        code: &[CodeArea<'a>],
        area_of_section: &[usize],
        data_of_section: &[usize],
        out: &mut DataInfo<'a>,
    ) {
        let abs = if self.bits == 64 {
            R_X86_64_64
        } else {
            R_386_32
        };
        for sh in shdrs {
            let Some(relocs) = self.file.relocations(sh) else {
                continue;
            };
            let Some(&area) = data_of_section.get(sh.sh_info as usize) else {
                continue;
            };
            if area == usize::MAX {
                continue;
            }
            let symtab = sh.sh_link as usize;
            if shdrs.get(symtab).is_none_or(|s| s.sh_type != SHT_SYMTAB) {
                continue;
            }
            let Ok(syms) = self.file.symbol_table(shdrs, symtab) else {
                continue;
            };
            let bytes = out.data[area].bytes;
            for r in relocs.iter() {
                if r.r_type != abs {
                    continue;
                }
                let Some(sym) = syms.get(r.r_sym) else {
                    continue;
                };
                if sym.st_type() != STT_FUNC && sym.st_type() != STT_SECTION {
                    continue;
                }
                let Some(&code_area) = area_of_section.get(sym.st_shndx) else {
                    continue;
                };
                if code_area == usize::MAX {
                    continue;
                }
                // REL keeps the addend in the word itself.
                let addend = match r.r_addend {
                    Some(a) => a,
                    None => usize::try_from(r.r_offset)
                        .ok()
                        .and_then(|o| bytes.get(o..o.checked_add(4)?))
                        .map_or(0, |w| {
                            i64::from(i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                        }),
                };
                let to = code[code_area]
                    .addr
                    .wrapping_add(sym.st_value)
                    .wrapping_add(addend as u64);
                out.code_pointers.push(CodePointer {
                    area,
                    at: out.data[area].addr.wrapping_add(r.r_offset),
                    code_area,
                    to,
                });
            }
        }
        out.code_pointers.sort_unstable();
        out.code_pointers.dedup();
    }
}
