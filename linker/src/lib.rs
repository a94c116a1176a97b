//! avex's linker: pre-analyzed images.
//!
//! A pre-analyzed image is the guest ELF with its translation set (see
//! `avex_core::format`) in a non-allocated section of its own, `.avex.translations`.
//! The section is appended by hand so that nothing the guest loads moves:
//!
//! ```text
//! [original file, unchanged except e_shoff / e_shnum in the ELF header]
//! [.avex.translations data, 8-aligned]
//! [section name table: the old one plus ".avex.translations"]
//! [section header table: the old entries (the name table's entry repointed) + one]
//! ```
//!
//! Program headers, segment offsets and segment bytes stay as they were. The only
//! bytes of the original file that change are the ELF header's section-table fields
//! (`e_shoff`, `e_shnum`, `e_shstrndx`); when the ELF header lies inside a loadable
//! segment (ordinary executables), those bytes are part of the loaded image, so the
//! set in the image is stamped with the identity of the *output* image (after
//! checking it was made for the input), which is what a backend computes when it
//! loads the image.

pub mod inspect;
pub mod iso;

use avex_core::elf::section_header::{
    SHN_LORESERVE, SHN_XINDEX, SHT_NOBITS, SHT_PROGBITS, SHT_STRTAB,
};
use avex_core::elf::{ElfError, ElfFile};
use avex_core::format::{self, FormatError, Hex, TranslationSet};
use avex_core::identity;

/// The section that holds the translations.
pub const SECTION_NAME: &str = ".avex.translations";

/// Why an image could not be read or written. Offsets are file offsets.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The ELF reader refused the file ([`avex_core::elf`]).
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("malformed ELF: {what} at offset {offset:#x}: {reason}")]
    Malformed {
        what: String,
        offset: u64,
        reason: String,
    },
    #[error("cannot compute the guest identity: {0}")]
    Identity(String),
    #[error("section {SECTION_NAME} (file offset {offset:#x}, {size} bytes): {source}")]
    Translations {
        offset: u64,
        size: u64,
        source: FormatError,
    },
    #[error("the translations were made for another guest build (identity {set}), not this ELF (identity {elf}); re-run the analysis on this ELF")]
    Stale { set: String, elf: String },
    #[error("{SECTION_NAME} is section {index} of {count}, not the last one; cannot replace it without renumbering sections")]
    CannotReplace { index: usize, count: usize },
    #[error("more than one {SECTION_NAME} section (indices {first} and {second})")]
    Duplicate { first: usize, second: usize },
    #[error("the image would be larger than ELF32 offsets can address")]
    TooLarge,
}

fn malformed(what: impl Into<String>, offset: u64, reason: impl Into<String>) -> LinkError {
    LinkError::Malformed {
        what: what.into(),
        offset,
        reason: reason.into(),
    }
}

/// One section header as the linker writes it back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Shdr {
    name: u32,
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    addralign: u64,
    entsize: u64,
}

struct Elf<'a> {
    file: ElfFile<'a>,
    is64: bool,
    shstrndx: u16,
    headers: Vec<avex_core::elf::SectionHeader>,
    sections: Vec<Shdr>,
}

impl<'a> Elf<'a> {
    /// Read by hv/core's reader, plus what rewriting the section table needs:
    /// no extended section numbering.
    fn parse(bytes: &'a [u8]) -> Result<Self, LinkError> {
        let file = ElfFile::parse(bytes)?;
        let is64 = file.bits == 64;
        let (shnum, shstrndx) = (file.header.e_shnum, file.header.e_shstrndx);
        let (shnum_off, shstrndx_off) = if is64 { (0x3c, 0x3e) } else { (0x30, 0x32) };
        if shnum == 0 && file.header.e_shoff != 0 {
            return Err(malformed(
                "e_shnum",
                shnum_off,
                "extended section numbering (e_shnum = 0 with a section table) is not supported",
            ));
        }
        if shnum >= SHN_LORESERVE as u16 {
            return Err(malformed("e_shnum", shnum_off, "too many sections"));
        }
        if shstrndx == SHN_XINDEX as u16 {
            return Err(malformed(
                "e_shstrndx",
                shstrndx_off,
                "extended index is not supported",
            ));
        }
        let headers = if shnum == 0 {
            Vec::new()
        } else {
            file.section_headers()?
        };
        if shstrndx as usize >= headers.len() && shstrndx != 0 {
            return Err(malformed(
                "e_shstrndx",
                shstrndx_off,
                format!("index {shstrndx} but only {} sections", headers.len()),
            ));
        }
        let sections = headers
            .iter()
            .map(|h| Shdr {
                name: h.sh_name as u32,
                kind: h.sh_type,
                flags: h.sh_flags,
                addr: h.sh_addr,
                offset: h.sh_offset,
                size: h.sh_size,
                link: h.sh_link,
                info: h.sh_info,
                addralign: h.sh_addralign,
                entsize: h.sh_entsize,
            })
            .collect();
        Ok(Elf {
            file,
            is64,
            shstrndx,
            headers,
            sections,
        })
    }

    /// The bytes of section `i` (empty for SHT_NOBITS).
    fn data(&self, i: usize) -> Result<&'a [u8], LinkError> {
        Ok(self.file.section_data(&self.headers, i)?)
    }

    /// The section name table, if the file has one.
    fn shstrtab(&self) -> Result<Option<&'a [u8]>, LinkError> {
        if self.shstrndx == 0 || self.sections.is_empty() {
            return Ok(None);
        }
        self.data(self.shstrndx as usize).map(Some)
    }

    fn name_of(&self, strtab: Option<&'a [u8]>, i: usize) -> Option<&'a [u8]> {
        let rest = strtab?.get(self.sections[i].name as usize..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..len])
    }

    /// Index of the translations section, if any.
    fn find_translations(&self) -> Result<Option<usize>, LinkError> {
        let strtab = self.shstrtab()?;
        let mut found = None;
        for i in 0..self.sections.len() {
            if self.name_of(strtab, i) == Some(SECTION_NAME.as_bytes()) {
                if let Some(first) = found {
                    return Err(LinkError::Duplicate { first, second: i });
                }
                found = Some(i);
            }
        }
        Ok(found)
    }
}

/// The raw bytes of the `.avex.translations` section, or `None` if the ELF has none.
/// Backends decode them with [`avex_core::format::decode`] (or use
/// [`read_translation_set`]).
pub fn read_translations(elf: &[u8]) -> Result<Option<Vec<u8>>, LinkError> {
    Ok(locate(elf)?.map(|(_, bytes)| bytes.to_vec()))
}

fn locate(elf: &[u8]) -> Result<Option<(u64, &[u8])>, LinkError> {
    let e = Elf::parse(elf)?;
    let Some(i) = e.find_translations()? else {
        return Ok(None);
    };
    if e.sections[i].kind == SHT_NOBITS {
        return Err(malformed(
            format!("section {i} ({SECTION_NAME})"),
            e.sections[i].offset,
            "is SHT_NOBITS: it holds no bytes",
        ));
    }
    Ok(Some((e.sections[i].offset, e.data(i)?)))
}

/// Find and decode (so validate) the translation set of an image. Errors name the
/// section's file offset and the format's own offset and reason.
pub fn read_translation_set(elf: &[u8]) -> Result<Option<TranslationSet>, LinkError> {
    let Some((offset, bytes)) = locate(elf)? else {
        return Ok(None);
    };
    format::decode(bytes)
        .map(Some)
        .map_err(|source| LinkError::Translations {
            offset,
            size: bytes.len() as u64,
            source,
        })
}

/// The guest identity of an ELF image ([`avex_core::identity::of_elf`]).
pub fn identity(elf: &[u8]) -> Result<[u8; 32], LinkError> {
    identity::of_elf(elf).map_err(|e| LinkError::Identity(e.to_string()))
}

fn align(v: &mut Vec<u8>, to: usize) {
    while !v.len().is_multiple_of(to) {
        v.push(0);
    }
}

/// Append (or replace) the `.avex.translations` section holding `payload`, bytes as
/// given. Loadable segments and program headers are left as they are.
pub fn embed(elf: &[u8], payload: &[u8]) -> Result<Vec<u8>, LinkError> {
    let e = Elf::parse(elf)?;
    let mut sections = e.sections.clone();
    if let Some(i) = e.find_translations()? {
        if i + 1 != sections.len() || i as u16 == e.shstrndx {
            return Err(LinkError::CannotReplace {
                index: i,
                count: sections.len(),
            });
        }
        sections.pop();
    }
    // The name table: the old one (if any) plus our name (and its own name if new).
    let mut strtab: Vec<u8> = match e.shstrtab()? {
        Some(t) => t.to_vec(),
        None => vec![0],
    };
    if strtab.last() != Some(&0) {
        strtab.push(0);
    }
    if sections.is_empty() {
        sections.push(Shdr::default());
    }
    let mut shstrndx = e.shstrndx as usize;
    let new_strtab = shstrndx == 0;
    if new_strtab {
        let name = strtab.len() as u32;
        strtab.extend_from_slice(b".shstrtab\0");
        sections.push(Shdr {
            name,
            kind: SHT_STRTAB,
            addralign: 1,
            ..Shdr::default()
        });
        shstrndx = sections.len() - 1;
    }
    // Reuse the name if the table has it (re-linking), so that the table and every
    // other section's name stay exactly as they were.
    let mut wanted = SECTION_NAME.as_bytes().to_vec();
    wanted.push(0);
    let our_name = match strtab
        .windows(wanted.len())
        .position(|w| w == wanted.as_slice())
    {
        Some(at) => at as u32,
        None => {
            let at = strtab.len() as u32;
            strtab.extend_from_slice(&wanted);
            at
        }
    };

    let mut out = elf.to_vec();
    align(&mut out, 8);
    let payload_off = out.len() as u64;
    out.extend_from_slice(payload);
    let strtab_off = out.len() as u64;
    out.extend_from_slice(&strtab);
    align(&mut out, 8);
    let shoff = out.len() as u64;

    sections[shstrndx].offset = strtab_off;
    sections[shstrndx].size = strtab.len() as u64;
    sections.push(Shdr {
        name: our_name,
        kind: SHT_PROGBITS,
        offset: payload_off,
        size: payload.len() as u64,
        addralign: 8,
        ..Shdr::default()
    });
    let shnum = sections.len();
    if shnum >= SHN_LORESERVE as usize {
        return Err(malformed("e_shnum", 0, "too many sections to add one"));
    }
    for s in &sections {
        if e.is64 {
            out.extend_from_slice(&s.name.to_le_bytes());
            out.extend_from_slice(&s.kind.to_le_bytes());
            for v in [s.flags, s.addr, s.offset, s.size] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&s.link.to_le_bytes());
            out.extend_from_slice(&s.info.to_le_bytes());
            out.extend_from_slice(&s.addralign.to_le_bytes());
            out.extend_from_slice(&s.entsize.to_le_bytes());
        } else {
            let n = |v: u64| u32::try_from(v).map_err(|_| LinkError::TooLarge);
            out.extend_from_slice(&s.name.to_le_bytes());
            out.extend_from_slice(&s.kind.to_le_bytes());
            for v in [s.flags, s.addr, s.offset, s.size] {
                out.extend_from_slice(&n(v)?.to_le_bytes());
            }
            out.extend_from_slice(&s.link.to_le_bytes());
            out.extend_from_slice(&s.info.to_le_bytes());
            out.extend_from_slice(&n(s.addralign)?.to_le_bytes());
            out.extend_from_slice(&n(s.entsize)?.to_le_bytes());
        }
    }
    if e.is64 {
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&(shnum as u16).to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&(shstrndx as u16).to_le_bytes());
    } else {
        let shoff = u32::try_from(shoff).map_err(|_| LinkError::TooLarge)?;
        out[0x20..0x24].copy_from_slice(&shoff.to_le_bytes());
        out[0x2e..0x30].copy_from_slice(&40u16.to_le_bytes());
        out[0x30..0x32].copy_from_slice(&(shnum as u16).to_le_bytes());
        out[0x32..0x34].copy_from_slice(&(shstrndx as u16).to_le_bytes());
    }
    // Self-check: a damaged input (e.g. a section name table that holds no bytes)
    // could make another section's name resolve to ours.
    match locate(&out) {
        Ok(Some((off, bytes))) if off == payload_off && bytes == payload => Ok(out),
        _ => Err(malformed(
            "section name table",
            e.sections.get(e.shstrndx as usize).map_or(0, |s| s.offset),
            "the input's section names are damaged: the new section would not be found unambiguously",
        )),
    }
}

/// Write a pre-analyzed image: check `set` (every cluster, and that it was made for
/// this ELF), stamp it with the output image's identity, and embed it. Returns the
/// image and the set as written.
pub fn link(elf: &[u8], set: &TranslationSet) -> Result<(Vec<u8>, TranslationSet), LinkError> {
    format::validate_set(set).map_err(|source| LinkError::Translations {
        offset: 0,
        size: 0,
        source,
    })?;
    let input_id = identity(elf)?;
    if set.guest.digest != input_id {
        return Err(LinkError::Stale {
            set: Hex(&set.guest.digest).to_string(),
            elf: Hex(&input_id).to_string(),
        });
    }
    // The output's layout, and so its header bytes, depend only on the section's
    // size, which the digest value does not change: embed once to learn the output
    // identity, then embed the stamped set.
    let mut stamped = set.clone();
    let probe = embed(elf, &format::encode(&stamped))?;
    stamped.guest.digest = identity(&probe)?;
    let image = embed(elf, &format::encode(&stamped))?;
    debug_assert_eq!(identity(&image)?, stamped.guest.digest);
    Ok((image, stamped))
}
