//! The one ELF reader: boot ([`crate::boot`]), the PVH note, guest identity
//! ([`crate::identity`]), the VT-x hypervisor's translations section and the AOT
//! pass all read ELF files through [`ElfFile`].
//!
//! The input is untrusted: every size and offset is checked against the file before
//! it is trusted, so a corrupt file gives an [`ElfError`] naming the field, its file
//! offset and the reason, never a panic. goblin parses the fixed-size records
//! (header, program and section headers, symbols, relocations); this module checks
//! where they lie and reads names and notes. Only little-endian files (x86) are
//! accepted.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use goblin::container::{Container, Ctx, Endian};
pub use goblin::elf::header::{self, Header};
pub use goblin::elf::program_header::{self, ProgramHeader};
pub use goblin::elf::reloc::{self, Reloc, RelocSection};
pub use goblin::elf::section_header::{self, SectionHeader};
pub use goblin::elf::sym::{self, Sym, Symtab};

/// `e_machine` of i386 and x86-64.
pub const EM_386: u16 = header::EM_386;
pub const EM_X86_64: u16 = header::EM_X86_64;

/// Why a file could not be read as ELF. Each names where in the file the problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// No ELF magic; `hint` says what the file looks like when that is known.
    NotElf { len: u64, hint: &'static str },
    /// The file ends inside `what`.
    Truncated {
        what: &'static str,
        offset: u64,
        need: u64,
        len: u64,
    },
    /// A header field with a value the reader cannot accept.
    CorruptField {
        field: &'static str,
        value: u64,
        offset: u64,
        why: &'static str,
    },
    /// The program or section header table runs past the end of the file.
    TablePastEnd {
        what: &'static str,
        field_offset: u64,
        offset: u64,
        size: u64,
        len: u64,
    },
    SectionPastEnd {
        index: usize,
        name: Option<String>,
        header_offset: u64,
        offset: u64,
        size: u64,
        len: u64,
    },
    /// A `PT_LOAD` segment's file bytes run past the end of the file.
    SegmentPastEnd {
        index: usize,
        offset: u64,
        size: u64,
        len: u64,
    },
    /// goblin refused a record.
    Corrupt { offset: u64, what: String },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::NotElf { len, hint } => write!(
                f,
                "not an ELF file (no \\x7fELF magic at offset 0; {len} bytes){hint}"
            ),
            ElfError::Truncated {
                what,
                offset,
                need,
                len,
            } => write!(
                f,
                "truncated: {what} needs {need} bytes at offset {offset:#x}, the file has {len}"
            ),
            ElfError::CorruptField {
                field,
                value,
                offset,
                why,
            } => write!(
                f,
                "corrupt ELF header field {field} = {value:#x} at offset {offset:#x}: {why}"
            ),
            ElfError::TablePastEnd {
                what,
                field_offset,
                offset,
                size,
                len,
            } => write!(
                f,
                "{what} (e_{} at offset {field_offset:#x}) at offset {offset:#x}, {size:#x} \
                 bytes, runs past the end of the file ({len:#x} bytes)",
                if *what == "program header table" {
                    "phoff"
                } else {
                    "shoff"
                }
            ),
            ElfError::SectionPastEnd {
                index,
                name,
                header_offset,
                offset,
                size,
                len,
            } => write!(
                f,
                "section {} (index {index}, header at offset {header_offset:#x}) at offset \
                 {offset:#x}, {size:#x} bytes, runs past the end of the file ({len:#x} bytes)",
                name.as_deref().unwrap_or("?")
            ),
            ElfError::SegmentPastEnd {
                index,
                offset,
                size,
                len,
            } => write!(
                f,
                "segment {index} (PT_LOAD) at offset {offset:#x}, {size:#x} bytes, runs past \
                 the end of the file ({len:#x} bytes)"
            ),
            ElfError::Corrupt { offset, what } => {
                write!(f, "corrupt ELF at offset {offset:#x}: {what}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ElfError {}

fn corrupt(field: &'static str, value: u64, offset: u64, why: &'static str) -> ElfError {
    ElfError::CorruptField {
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

/// `data[off..off + len]`, if it is all inside `data`.
fn slice(data: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    data.get(start..end)
}

/// The NUL-terminated string at `off` in a string table (lossy UTF-8, at most 4096
/// bytes); empty when `off` is outside the table.
pub fn cstr(table: &[u8], off: u64) -> String {
    let Some(rest) = usize::try_from(off).ok().and_then(|o| table.get(o..)) else {
        return String::new();
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end.min(4096)]).into_owned()
}

/// The usual name of an `e_machine` value, for messages.
pub fn machine_name(m: u16) -> &'static str {
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

/// File offsets of the ELF header's fields, for error messages.
struct HeaderFields {
    phoff: u64,
    shoff: u64,
    phentsize: u64,
    shentsize: u64,
    shstrndx: u64,
}

/// An ELF file whose identification and header were checked. The tables are read
/// on demand, each checked to lie in the file.
pub struct ElfFile<'a> {
    data: &'a [u8],
    /// 32 or 64.
    pub bits: u32,
    pub header: Header,
    ctx: Ctx,
    /// Program and section header entry sizes for the class.
    phent: u64,
    shent: u64,
    fields: HeaderFields,
}

impl<'a> ElfFile<'a> {
    /// Check the identification (magic, class, byte order, version) and read the
    /// header. The machine and file type are the caller's to judge.
    pub fn parse(data: &'a [u8]) -> Result<ElfFile<'a>, ElfError> {
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf {
                len: data.len() as u64,
                hint: compressed_hint(data),
            });
        }
        if data.len() < 16 {
            return Err(ElfError::Truncated {
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
            return Err(ElfError::Truncated {
                what: "ELF header",
                offset: 0,
                need: ehsize as u64,
                len: data.len() as u64,
            });
        }
        let header = goblin::elf::Elf::parse_header(data).map_err(|e| ElfError::Corrupt {
            offset: 0,
            what: alloc::format!("ELF header: {e}"),
        })?;
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
        Ok(ElfFile {
            data,
            bits,
            header,
            ctx: Ctx::new(container, Endian::Little),
            phent: if bits == 64 { 56 } else { 32 },
            shent: if bits == 64 { 64 } else { 40 },
            fields,
        })
    }

    /// The whole file.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// File offset of program header `i`.
    pub fn program_header_offset(&self, i: usize) -> u64 {
        self.header.e_phoff + i as u64 * self.phent
    }

    /// File offset of section header `i`.
    pub fn section_header_offset(&self, i: usize) -> u64 {
        self.header.e_shoff + i as u64 * self.shent
    }

    /// The program headers, each `PT_LOAD` checked to lie in the file.
    pub fn program_headers(&self) -> Result<Vec<ProgramHeader>, ElfError> {
        let hdr = &self.header;
        let mut phdrs = Vec::new();
        if hdr.e_phnum > 0 {
            if u64::from(hdr.e_phentsize) != self.phent {
                return Err(corrupt(
                    "e_phentsize",
                    hdr.e_phentsize.into(),
                    self.fields.phentsize,
                    "does not match the ELF class",
                ));
            }
            let size = self.phent * u64::from(hdr.e_phnum);
            if hdr.e_phoff == 0 || !fits(hdr.e_phoff, size, self.data.len()) {
                return Err(ElfError::TablePastEnd {
                    what: "program header table",
                    field_offset: self.fields.phoff,
                    offset: hdr.e_phoff,
                    size,
                    len: self.data.len() as u64,
                });
            }
            phdrs = ProgramHeader::parse(
                self.data,
                hdr.e_phoff as usize,
                hdr.e_phnum as usize,
                self.ctx,
            )
            .map_err(|e| ElfError::Corrupt {
                offset: hdr.e_phoff,
                what: alloc::format!("program headers: {e}"),
            })?;
        }
        for (i, ph) in phdrs.iter().enumerate() {
            if ph.p_type == program_header::PT_LOAD
                && !fits(ph.p_offset, ph.p_filesz, self.data.len())
            {
                return Err(ElfError::SegmentPastEnd {
                    index: i,
                    offset: ph.p_offset,
                    size: ph.p_filesz,
                    len: self.data.len() as u64,
                });
            }
        }
        Ok(phdrs)
    }

    /// A segment's file bytes (empty when they are not all in the file; a `PT_LOAD`
    /// from [`Self::program_headers`] always is).
    pub fn segment_bytes(&self, ph: &ProgramHeader) -> &'a [u8] {
        slice(self.data, ph.p_offset, ph.p_filesz).unwrap_or(&[])
    }

    /// The section headers (the count from section 0 when `e_shnum` is 0).
    pub fn section_headers(&self) -> Result<Vec<SectionHeader>, ElfError> {
        let hdr = &self.header;
        if hdr.e_shoff == 0 {
            return Ok(Vec::new());
        }
        if u64::from(hdr.e_shentsize) != self.shent {
            return Err(corrupt(
                "e_shentsize",
                hdr.e_shentsize.into(),
                self.fields.shentsize,
                "does not match the ELF class",
            ));
        }
        let past_end = |size| ElfError::TablePastEnd {
            what: "section header table",
            field_offset: self.fields.shoff,
            offset: hdr.e_shoff,
            size,
            len: self.data.len() as u64,
        };
        if !fits(hdr.e_shoff, self.shent, self.data.len()) {
            return Err(past_end(self.shent));
        }
        let first =
            SectionHeader::parse(self.data, hdr.e_shoff as usize, 1, self.ctx).map_err(|e| {
                ElfError::Corrupt {
                    offset: hdr.e_shoff,
                    what: alloc::format!("section header 0: {e}"),
                }
            })?;
        let count = if hdr.e_shnum == 0 {
            first.first().map_or(0, |s| s.sh_size)
        } else {
            u64::from(hdr.e_shnum)
        };
        let size = count.saturating_mul(self.shent);
        if !fits(hdr.e_shoff, size, self.data.len()) {
            return Err(past_end(size));
        }
        SectionHeader::parse(self.data, hdr.e_shoff as usize, count as usize, self.ctx).map_err(
            |e| ElfError::Corrupt {
                offset: hdr.e_shoff,
                what: alloc::format!("section headers: {e}"),
            },
        )
    }

    /// A section's bytes (none for `SHT_NOBITS` or a range outside the file).
    pub fn section_bytes(&self, sh: &SectionHeader) -> &'a [u8] {
        if sh.sh_type == section_header::SHT_NOBITS {
            return &[];
        }
        slice(self.data, sh.sh_offset, sh.sh_size).unwrap_or(&[])
    }

    /// The section-name string table (empty when there is none).
    fn shstrtab(&self, shdrs: &[SectionHeader]) -> Result<&'a [u8], ElfError> {
        let mut shstrndx = u64::from(self.header.e_shstrndx);
        if shstrndx == u64::from(section_header::SHN_XINDEX) {
            shstrndx = shdrs.first().map_or(0, |s| u64::from(s.sh_link));
        }
        if shdrs.is_empty() || shstrndx == 0 {
            return Ok(&[]);
        }
        match shdrs.get(shstrndx as usize) {
            Some(sh) => Ok(self.section_bytes(sh)),
            None => Err(corrupt(
                "e_shstrndx",
                shstrndx,
                self.fields.shstrndx,
                "names no section",
            )),
        }
    }

    /// Section names, after checking that every section with contents lies in the
    /// file.
    pub fn section_names(&self, shdrs: &[SectionHeader]) -> Result<Vec<String>, ElfError> {
        let shstr = self.shstrtab(shdrs)?;
        let names: Vec<String> = shdrs
            .iter()
            .map(|s| cstr(shstr, s.sh_name as u64))
            .collect();
        for (i, name) in names.iter().enumerate() {
            self.section_data(shdrs, i).map_err(|e| match e {
                ElfError::SectionPastEnd {
                    index,
                    header_offset,
                    offset,
                    size,
                    len,
                    ..
                } => ElfError::SectionPastEnd {
                    index,
                    name: Some(name.clone()).filter(|n| !n.is_empty()),
                    header_offset,
                    offset,
                    size,
                    len,
                },
                e => e,
            })?;
        }
        Ok(names)
    }

    /// Section `index`'s contents (empty for `SHT_NOBITS` or size 0), or why they
    /// are not all in the file.
    pub fn section_data(
        &self,
        shdrs: &[SectionHeader],
        index: usize,
    ) -> Result<&'a [u8], ElfError> {
        let sh = &shdrs[index];
        if sh.sh_type == section_header::SHT_NOBITS || sh.sh_size == 0 {
            return Ok(&[]);
        }
        slice(self.data, sh.sh_offset, sh.sh_size).ok_or(ElfError::SectionPastEnd {
            index,
            name: None,
            header_offset: self.section_header_offset(index),
            offset: sh.sh_offset,
            size: sh.sh_size,
            len: self.data.len() as u64,
        })
    }

    /// The contents of the section called `name` (empty for `SHT_NOBITS`), if the
    /// file has one that lies in the file.
    pub fn section_named(&self, name: &str) -> Option<&'a [u8]> {
        let shdrs = self.section_headers().ok()?;
        let shstr = self.shstrtab(&shdrs).ok()?;
        let sh = shdrs.iter().find(|sh| {
            shstr
                .get(sh.sh_name..)
                .and_then(|rest| rest.get(..=name.len()))
                .is_some_and(|n| &n[..name.len()] == name.as_bytes() && n[name.len()] == 0)
        })?;
        if sh.sh_type == section_header::SHT_NOBITS {
            return Some(&[]);
        }
        slice(self.data, sh.sh_offset, sh.sh_size)
    }

    /// The symbol table in section `index` (`SHT_SYMTAB` or `SHT_DYNSYM`), its entry
    /// size checked against the class. `shdrs[index]` must have passed
    /// [`Self::section_names`]' check, or its range is checked here.
    pub fn symbol_table(
        &self,
        shdrs: &[SectionHeader],
        index: usize,
    ) -> Result<Symtab<'a>, ElfError> {
        let sh = &shdrs[index];
        let symsize = if self.bits == 64 { 24u64 } else { 16 };
        if sh.sh_entsize != symsize {
            return Err(corrupt(
                "sh_entsize",
                sh.sh_entsize,
                self.section_header_offset(index) + if self.bits == 64 { 56 } else { 36 },
                "symbol table entry size does not match the ELF class",
            ));
        }
        self.section_data(shdrs, index)?;
        let count = (sh.sh_size / symsize) as usize;
        Symtab::parse(self.data, sh.sh_offset as usize, count, self.ctx).map_err(|e| {
            ElfError::Corrupt {
                offset: sh.sh_offset,
                what: alloc::format!("symbol table (section {index}): {e}"),
            }
        })
    }

    /// The relocations of an `SHT_REL` or `SHT_RELA` section (None when it is
    /// another kind or does not parse).
    pub fn relocations(&self, sh: &SectionHeader) -> Option<RelocSection<'a>> {
        let is_rela = match sh.sh_type {
            section_header::SHT_RELA => true,
            section_header::SHT_REL => false,
            _ => return None,
        };
        slice(self.data, sh.sh_offset, sh.sh_size)?;
        RelocSection::parse(
            self.data,
            sh.sh_offset as usize,
            sh.sh_size as usize,
            is_rela,
            self.ctx,
        )
        .ok()
    }

    /// The notes of a `PT_NOTE` segment, in order; a note that runs past the
    /// segment ends the list.
    pub fn notes(&self, ph: &ProgramHeader) -> Notes<'a> {
        Notes {
            bytes: self.segment_bytes(ph),
        }
    }

    /// What the guest's identity covers ([`crate::identity`]): the loadable
    /// segments, (`p_paddr`, file bytes) of every `PT_LOAD` with a non-zero memory
    /// size; for `ET_REL` or a file without program headers, the allocated sections
    /// with contents, (`sh_addr`, bytes), in index order.
    pub fn loadable(&self) -> Result<Vec<(u64, &'a [u8])>, ElfError> {
        let phdrs = self.program_headers()?;
        if self.header.e_type != header::ET_REL && !phdrs.is_empty() {
            return Ok(phdrs
                .iter()
                .filter(|p| p.p_type == program_header::PT_LOAD && p.p_memsz > 0)
                .map(|ph| (ph.p_paddr, self.segment_bytes(ph)))
                .collect());
        }
        Ok(self
            .section_headers()?
            .iter()
            .filter(|sh| {
                sh.sh_flags & u64::from(section_header::SHF_ALLOC) != 0
                    && sh.sh_type != section_header::SHT_NOBITS
                    && sh.sh_size > 0
            })
            .map(|sh| (sh.sh_addr, self.section_bytes(sh)))
            .collect())
    }
}

/// One ELF note: its name (with the NUL), type and descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// The notes of a segment ([`ElfFile::notes`]); name and descriptor are 4-byte
/// aligned, as on x86.
pub struct Notes<'a> {
    bytes: &'a [u8],
}

impl<'a> Iterator for Notes<'a> {
    type Item = Note<'a>;

    fn next(&mut self) -> Option<Note<'a>> {
        let b = self.bytes;
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        let namesz = word(0)? as usize;
        let descsz = word(4)? as usize;
        let kind = word(8)?;
        let align = |n: usize| n.checked_add(3).map(|n| n & !3);
        let desc_at = 12usize.checked_add(align(namesz)?)?;
        let next = desc_at.checked_add(align(descsz)?)?;
        if next > b.len() {
            self.bytes = &[];
            return None;
        }
        self.bytes = &b[next..];
        Some(Note {
            name: &b[12..12 + namesz],
            kind,
            desc: &b[desc_at..desc_at + descsz],
        })
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

#[cfg(test)]
mod tests;
