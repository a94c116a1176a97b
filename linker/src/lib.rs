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

use avex_core::format::{self, FormatError, Hex, TranslationSet};
use avex_core::identity;

/// The section that holds the translations.
pub const SECTION_NAME: &str = ".avex.translations";

const SHT_PROGBITS: u32 = 1;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHN_LORESERVE: u16 = 0xff00;
const SHN_XINDEX: u16 = 0xffff;

/// Why an image could not be read or written. Offsets are file offsets.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("not an ELF file (no \\x7fELF magic at offset 0)")]
    NotElf,
    #[error("unsupported ELF: class {class}, data encoding {data} at offsets 4..6 (only little-endian ELF32/ELF64)")]
    Unsupported { class: u8, data: u8 },
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

/// One section header, class-independent.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    bytes: &'a [u8],
    is64: bool,
    shoff: u64,
    shstrndx: u16,
    sections: Vec<Shdr>,
}

fn rd<const N: usize>(b: &[u8], off: u64, what: &str) -> Result<[u8; N], LinkError> {
    let start = usize::try_from(off).map_err(|_| malformed(what, off, "offset out of range"))?;
    let s = start
        .checked_add(N)
        .and_then(|end| b.get(start..end))
        .ok_or_else(|| malformed(what, off, format!("file ends (length {:#x})", b.len())))?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}
fn u16_at(b: &[u8], off: u64, what: &str) -> Result<u16, LinkError> {
    rd::<2>(b, off, what).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: u64, what: &str) -> Result<u32, LinkError> {
    rd::<4>(b, off, what).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: u64, what: &str) -> Result<u64, LinkError> {
    rd::<8>(b, off, what).map(u64::from_le_bytes)
}

impl<'a> Elf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, LinkError> {
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(LinkError::NotElf);
        }
        let (class, data) = (
            *bytes
                .get(4)
                .ok_or_else(|| malformed("ELF header", 4, "file ends"))?,
            *bytes
                .get(5)
                .ok_or_else(|| malformed("ELF header", 5, "file ends"))?,
        );
        let is64 = match (class, data) {
            (1, 1) => false,
            (2, 1) => true,
            _ => return Err(LinkError::Unsupported { class, data }),
        };
        let hdr = "ELF header";
        let (shoff, shentsize, shnum, shstrndx, min_ent) = if is64 {
            (
                u64_at(bytes, 0x28, hdr)?,
                u16_at(bytes, 0x3a, hdr)?,
                u16_at(bytes, 0x3c, hdr)?,
                u16_at(bytes, 0x3e, hdr)?,
                64u16,
            )
        } else {
            (
                u32_at(bytes, 0x20, hdr)? as u64,
                u16_at(bytes, 0x2e, hdr)?,
                u16_at(bytes, 0x30, hdr)?,
                u16_at(bytes, 0x32, hdr)?,
                40u16,
            )
        };
        let (shnum_off, shstrndx_off) = if is64 { (0x3c, 0x3e) } else { (0x30, 0x32) };
        if shnum == 0 && shoff != 0 {
            return Err(malformed(
                "e_shnum",
                shnum_off,
                "extended section numbering (e_shnum = 0 with a section table) is not supported",
            ));
        }
        if shnum >= SHN_LORESERVE {
            return Err(malformed("e_shnum", shnum_off, "too many sections"));
        }
        if shstrndx == SHN_XINDEX {
            return Err(malformed(
                "e_shstrndx",
                shstrndx_off,
                "extended index is not supported",
            ));
        }
        if shnum > 0 && shentsize < min_ent {
            return Err(malformed(
                "e_shentsize",
                if is64 { 0x3a } else { 0x2e },
                format!("{shentsize} is smaller than a section header ({min_ent})"),
            ));
        }
        let mut sections = Vec::with_capacity(shnum as usize);
        for i in 0..shnum as u64 {
            let at = i
                .checked_mul(shentsize as u64)
                .and_then(|o| o.checked_add(shoff))
                .ok_or_else(|| malformed("section header table", shoff, "offset overflows"))?;
            let what = format!("section header {i}");
            let s = if is64 {
                Shdr {
                    name: u32_at(bytes, at, &what)?,
                    kind: u32_at(bytes, at + 4, &what)?,
                    flags: u64_at(bytes, at + 8, &what)?,
                    addr: u64_at(bytes, at + 16, &what)?,
                    offset: u64_at(bytes, at + 24, &what)?,
                    size: u64_at(bytes, at + 32, &what)?,
                    link: u32_at(bytes, at + 40, &what)?,
                    info: u32_at(bytes, at + 44, &what)?,
                    addralign: u64_at(bytes, at + 48, &what)?,
                    entsize: u64_at(bytes, at + 56, &what)?,
                }
            } else {
                Shdr {
                    name: u32_at(bytes, at, &what)?,
                    kind: u32_at(bytes, at + 4, &what)?,
                    flags: u32_at(bytes, at + 8, &what)? as u64,
                    addr: u32_at(bytes, at + 12, &what)? as u64,
                    offset: u32_at(bytes, at + 16, &what)? as u64,
                    size: u32_at(bytes, at + 20, &what)? as u64,
                    link: u32_at(bytes, at + 24, &what)?,
                    info: u32_at(bytes, at + 28, &what)?,
                    addralign: u32_at(bytes, at + 32, &what)? as u64,
                    entsize: u32_at(bytes, at + 36, &what)? as u64,
                }
            };
            sections.push(s);
        }
        if shstrndx as usize >= sections.len() && shstrndx != 0 {
            return Err(malformed(
                "e_shstrndx",
                shstrndx_off,
                format!("index {shstrndx} but only {} sections", sections.len()),
            ));
        }
        Ok(Elf {
            bytes,
            is64,
            shoff,
            shstrndx,
            sections,
        })
    }

    /// The bytes of section `i` (empty for SHT_NOBITS).
    fn data(&self, i: usize) -> Result<&'a [u8], LinkError> {
        let s = &self.sections[i];
        if s.kind == SHT_NOBITS {
            return Ok(&[]);
        }
        let hdr_off = self.shoff + i as u64 * if self.is64 { 64 } else { 40 };
        let end = s.offset.checked_add(s.size);
        match end {
            Some(end) if end <= self.bytes.len() as u64 => {
                Ok(&self.bytes[s.offset as usize..end as usize])
            }
            _ => Err(malformed(
                format!("section {i} (header at {hdr_off:#x})"),
                s.offset,
                format!(
                    "{} bytes run past the end of the file ({:#x} bytes)",
                    s.size,
                    self.bytes.len()
                ),
            )),
        }
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
        sections.push(Shdr {
            name: 0,
            kind: 0,
            flags: 0,
            addr: 0,
            offset: 0,
            size: 0,
            link: 0,
            info: 0,
            addralign: 0,
            entsize: 0,
        });
    }
    let mut shstrndx = e.shstrndx as usize;
    let new_strtab = shstrndx == 0;
    if new_strtab {
        let name = strtab.len() as u32;
        strtab.extend_from_slice(b".shstrtab\0");
        sections.push(Shdr {
            name,
            kind: SHT_STRTAB,
            flags: 0,
            addr: 0,
            offset: 0,
            size: 0,
            link: 0,
            info: 0,
            addralign: 1,
            entsize: 0,
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
        flags: 0,
        addr: 0,
        offset: payload_off,
        size: payload.len() as u64,
        link: 0,
        info: 0,
        addralign: 8,
        entsize: 0,
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
