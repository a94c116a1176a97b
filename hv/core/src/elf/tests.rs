//! The reader on small hand-made files.

use super::*;
use alloc::string::ToString;
use alloc::vec;

/// An ELF64 header with `e_shoff`/`e_shnum`/`e_shstrndx` set, followed by
/// `body`.
fn header64(shoff: u64, shnum: u16, shstrndx: u16) -> Vec<u8> {
    let mut e = vec![0u8; 64];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&header::ET_EXEC.to_le_bytes());
    e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    e[40..48].copy_from_slice(&shoff.to_le_bytes());
    e[58..60].copy_from_slice(&64u16.to_le_bytes());
    e[60..62].copy_from_slice(&shnum.to_le_bytes());
    e[62..64].copy_from_slice(&shstrndx.to_le_bytes());
    e
}

fn section64(name: u32, kind: u32, offset: u64, size: u64) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0..4].copy_from_slice(&name.to_le_bytes());
    s[4..8].copy_from_slice(&kind.to_le_bytes());
    s[24..32].copy_from_slice(&offset.to_le_bytes());
    s[32..40].copy_from_slice(&size.to_le_bytes());
    s
}

/// Sections: null, `.shstrtab`, `.avex` (contents "hello"), `.bss` (NOBITS).
fn with_sections() -> Vec<u8> {
    let strtab = b"\0.shstrtab\0.avex\0.bss\0";
    let str_off = 64u64;
    let data_off = str_off + strtab.len() as u64;
    let shoff = data_off + 5;
    let mut e = header64(shoff, 4, 1);
    e.extend_from_slice(strtab);
    e.extend_from_slice(b"hello");
    e.extend_from_slice(&[0u8; 64]);
    e.extend_from_slice(&section64(1, 3, str_off, strtab.len() as u64));
    e.extend_from_slice(&section64(11, 1, data_off, 5));
    e.extend_from_slice(&section64(17, 8, 0, 0x1000));
    e
}

#[test]
fn finds_sections_by_name() {
    let e = with_sections();
    let f = ElfFile::parse(&e).unwrap();
    assert_eq!(f.section_named(".avex"), Some(&b"hello"[..]));
    assert_eq!(f.section_named(".bss"), Some(&[][..]));
    // A prefix of a name is not the name.
    assert_eq!(f.section_named(".av"), None);
    assert_eq!(f.section_named(".avex2"), None);
    let shdrs = f.section_headers().unwrap();
    assert_eq!(
        f.section_names(&shdrs).unwrap(),
        ["", ".shstrtab", ".avex", ".bss"]
    );
}

#[test]
fn errors_name_the_field_and_its_offset() {
    let mut e = with_sections();
    e[4] = 9;
    let err = ElfFile::parse(&e).err().unwrap();
    assert_eq!(
        err.to_string(),
        "corrupt ELF header field e_ident[EI_CLASS] = 0x9 at offset 0x4: must be 1 \
         (ELFCLASS32) or 2 (ELFCLASS64)"
    );
    let mut e = with_sections();
    e[58] = 7;
    let f = ElfFile::parse(&e).unwrap();
    assert!(matches!(
        f.section_headers(),
        Err(ElfError::CorruptField {
            field: "e_shentsize",
            offset: 58,
            ..
        })
    ));
    // .avex's contents past the end of the file.
    let mut e = with_sections();
    let len = e.len();
    let avex = len - 2 * 64;
    e[avex + 32..avex + 40].copy_from_slice(&(len as u64).to_le_bytes());
    let f = ElfFile::parse(&e).unwrap();
    let shdrs = f.section_headers().unwrap();
    let err = f.section_names(&shdrs).unwrap_err();
    assert!(
        matches!(&err, ElfError::SectionPastEnd { index: 2, name: Some(n), .. } if n == ".avex"),
        "{err:?}"
    );
    assert_eq!(f.section_named(".avex"), None);
    let err = ElfFile::parse(&e[..40]).err().unwrap();
    assert!(matches!(
        err,
        ElfError::Truncated {
            what: "ELF header",
            need: 64,
            len: 40,
            ..
        }
    ));
    assert!(matches!(
        ElfFile::parse(b"\x1f\x8b\x08\x00"),
        Err(ElfError::NotElf { hint, .. }) if hint.contains("gzip")
    ));
}

#[test]
fn notes_are_read_in_order_and_a_cut_note_ends_the_list() {
    let mut seg = Vec::new();
    for (name, kind, desc) in [
        (&b"GNU\0"[..], 3u32, &[1u8, 2, 3][..]),
        (&b"Xen\0"[..], 18, &[0x00, 0x10, 0x00, 0x01, 0, 0, 0, 0][..]),
    ] {
        seg.extend_from_slice(&(name.len() as u32).to_le_bytes());
        seg.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        seg.extend_from_slice(&kind.to_le_bytes());
        seg.extend_from_slice(name);
        seg.resize(seg.len().next_multiple_of(4), 0);
        seg.extend_from_slice(desc);
        seg.resize(seg.len().next_multiple_of(4), 0);
    }
    let e = header64(0, 0, 0);
    let mut file = e.clone();
    file.extend_from_slice(&seg);
    let f = ElfFile::parse(&file).unwrap();
    let ph = ProgramHeader {
        p_type: program_header::PT_NOTE,
        p_offset: 64,
        p_filesz: seg.len() as u64,
        ..ProgramHeader::default()
    };
    let notes: Vec<Note<'_>> = f.notes(&ph).collect();
    assert_eq!(notes.len(), 2);
    assert_eq!((notes[0].name, notes[0].kind), (&b"GNU\0"[..], 3));
    assert_eq!(notes[0].desc, [1, 2, 3]);
    assert_eq!(notes[1].desc.len(), 8);
    // Cut inside the second note's descriptor: only the first is listed.
    let cut = ProgramHeader {
        p_filesz: seg.len() as u64 - 4,
        ..ph
    };
    assert_eq!(f.notes(&cut).count(), 1);
}
