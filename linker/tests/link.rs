//! Pre-analyzed images: built from guest ELFs that gcc makes in the test, checked with
//! readelf and objdump and by reading the section back.

use std::path::{Path, PathBuf};
use std::process::Command;

use avex_core::boot::parse_elf;
use avex_core::elf::ElfError;
use avex_core::format::{check_against, encode, GuestIdentity, TranslationSet, TranslatorStamp};
use avex_core::ir::{Bitness, Cluster, Insn, Op, PortSrc, Size};
use avex_core::policy::{ExitClass, ExitPolicy};
use avex_linker::{
    embed, identity, inspect, link, read_translation_set, read_translations, LinkError,
    SECTION_NAME,
};

/// `out dx, al; in al, dx; out dx, al; hlt` at `_start`, plus some data.
const GUEST_S: &str = "
    .globl _start
    .text
_start:
    out %al, (%dx)
    in (%dx), %al
    out %al, (%dx)
    hlt
    .data
value: .long 0x12345678
    .bss
buffer: .zero 256
";

/// A linker script that keeps the ELF and program headers out of every segment.
const NOHDR_LD: &str = "
ENTRY(_start)
PHDRS { text PT_LOAD FILEHDR PHDRS; }
SECTIONS {
    . = 0x100000;
    .text : { *(.text) } :text
    .data : { *(.data) }
    .bss : { *(.bss) }
}
";

const NOHDR_LD_NO_FILEHDR: &str = "
ENTRY(_start)
PHDRS { text PT_LOAD; }
SECTIONS {
    . = 0x100000;
    .text : { *(.text) } :text
    .data : { *(.data) } :text
    .bss : { *(.bss) } :text
}
";

struct Guest {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bytes: Vec<u8>,
}

fn gcc(args: &[&str], script: Option<&str>) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("guest.S");
    std::fs::write(&src, GUEST_S).unwrap();
    let path = dir.path().join("guest.elf");
    let mut cmd = Command::new("gcc");
    cmd.args(["-static", "-nostdlib", "-no-pie", "-Wl,--build-id=none"])
        .args(args);
    if let Some(s) = script {
        let ld = dir.path().join("guest.ld");
        std::fs::write(&ld, s).unwrap();
        cmd.arg(format!("-Wl,-T,{}", ld.display()));
    }
    cmd.arg("-o").arg(&path).arg(&src);
    let out = cmd.output().expect("gcc runs");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    Guest {
        _dir: dir,
        path,
        bytes,
    }
}

fn guest64() -> Guest {
    gcc(&[], None)
}

/// The cluster at the entry point, with the guest's real bytes.
fn set_for(elf: &[u8]) -> TranslationSet {
    let img = parse_elf(elf).unwrap();
    let seg = img
        .segments
        .iter()
        .find(|s| img.entry >= s.vaddr && img.entry < s.vaddr + s.filesz)
        .unwrap();
    let off = (seg.offset + img.entry - seg.vaddr) as usize;
    let start = img.entry;
    let io = |rip: u64, op: Op, class| Insn {
        rip,
        len: 1,
        op,
        exit_class: Some(class),
    };
    let cluster = Cluster::contiguous(
        if img.class_bits == 64 {
            Bitness::B64
        } else {
            Bitness::B32
        },
        start,
        elf[off..off + 3].to_vec(),
        vec![
            io(
                start,
                Op::Out {
                    size: Size::S1,
                    port: PortSrc::Dx,
                },
                ExitClass::Out,
            ),
            io(
                start + 1,
                Op::In {
                    size: Size::S1,
                    port: PortSrc::Dx,
                },
                ExitClass::In,
            ),
            io(
                start + 2,
                Op::Out {
                    size: Size::S1,
                    port: PortSrc::Dx,
                },
                ExitClass::Out,
            ),
        ],
        vec![],
    );
    assert_eq!(cluster.code[0].bytes, [0xee, 0xec, 0xee]);
    TranslationSet {
        guest: GuestIdentity {
            digest: identity(elf).unwrap(),
            name: "guest.elf".into(),
        },
        policy: ExitPolicy::default().fingerprint(),
        translator: TranslatorStamp {
            fingerprint: [1; 32],
            description: "test".into(),
        },
        clusters: vec![cluster],
    }
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Offsets of the ELF header's section-table fields (the only bytes `embed` changes).
fn header_section_fields(elf: &[u8]) -> Vec<usize> {
    if elf[4] == 2 {
        (0x28..0x30).chain(0x3a..0x40).collect()
    } else {
        (0x20..0x24).chain(0x2e..0x34).collect()
    }
}

fn assert_segments_preserved(input: &[u8], output: &[u8]) {
    let a = parse_elf(input).unwrap();
    let b = parse_elf(output).unwrap();
    assert_eq!(
        a, b,
        "program headers (offsets, addresses, sizes, flags) differ"
    );
    // Every byte of the original file is unchanged but the section-table fields.
    let masked = header_section_fields(input);
    for (i, (x, y)) in input.iter().zip(output.iter()).enumerate() {
        if x != y {
            assert!(
                masked.contains(&i),
                "byte {i:#x} changed: {x:#04x} -> {y:#04x}"
            );
        }
    }
    // Program header table bytes are identical.
    let (phoff, phnum, phentsize) = if input[4] == 2 {
        (
            u64::from_le_bytes(input[0x20..0x28].try_into().unwrap()) as usize,
            u16::from_le_bytes([input[0x38], input[0x39]]) as usize,
            u16::from_le_bytes([input[0x36], input[0x37]]) as usize,
        )
    } else {
        (
            u32::from_le_bytes(input[0x1c..0x20].try_into().unwrap()) as usize,
            u16::from_le_bytes([input[0x2c], input[0x2d]]) as usize,
            u16::from_le_bytes([input[0x2a], input[0x2b]]) as usize,
        )
    };
    let ph = phoff..phoff + phnum * phentsize;
    assert_eq!(input[ph.clone()], output[ph]);
}

fn readelf_sections(path: &Path) -> String {
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "readelf complained: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn objdump_d(path: &Path) -> String {
    let out = Command::new("objdump")
        .arg("-d")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "objdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "objdump complained: {stderr}");
    // Drop the line naming the file.
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("file format"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn linked_image_keeps_segments_and_carries_the_set() {
    let g = guest64();
    let set = set_for(&g.bytes);
    let (image, stamped) = link(&g.bytes, &set).unwrap();
    assert_segments_preserved(&g.bytes, &image);

    // What was written is exactly what is read back.
    assert_eq!(
        read_translations(&image).unwrap().unwrap(),
        encode(&stamped)
    );
    let back = read_translation_set(&image).unwrap().unwrap();
    assert_eq!(back, stamped);
    assert_eq!(back.clusters, set.clusters);
    // The set names the image it is in, so a backend that loads the image accepts it.
    assert_eq!(back.guest.digest, identity(&image).unwrap());
    assert_eq!(
        check_against(
            &back,
            &identity(&image).unwrap(),
            &ExitPolicy::default().fingerprint()
        ),
        Ok(())
    );
    // The input had no translations.
    assert_eq!(read_translations(&g.bytes).unwrap(), None);
}

#[test]
fn readelf_lists_the_section_and_objdump_still_reads_the_image() {
    let g = guest64();
    let (image, _) = link(&g.bytes, &set_for(&g.bytes)).unwrap();
    let out = write_tmp(g.path.parent().unwrap(), "guest.pre.elf", &image);

    let sections = readelf_sections(&out);
    let line = sections
        .lines()
        .find(|l| l.contains(SECTION_NAME))
        .unwrap_or_else(|| panic!("readelf -S does not list {SECTION_NAME}:\n{sections}"));
    assert!(line.contains("PROGBITS"), "{line}");
    // Every section the input had is still listed.
    let before = readelf_sections(&g.path);
    for name in [".text", ".data", ".bss", ".symtab", ".strtab", ".shstrtab"] {
        assert!(
            before.contains(name) && sections.contains(name),
            "{name} missing"
        );
    }

    let dis = objdump_d(&out);
    assert!(dis.contains("out    %al,(%dx)"), "{dis}");
    assert_eq!(dis, objdump_d(&g.path), "objdump -d output changed");

    // readelf -l shows the same program headers.
    let ph = |p: &Path| {
        let o = Command::new("readelf")
            .args(["-l", "-W"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(ph(&g.path), ph(&out));
}

#[test]
fn headers_outside_segments_leave_the_identity_unchanged() {
    // Header not in any segment: the loadable bytes are fully identical, and so is
    // the identity, so the set is not re-stamped.
    let g = gcc(&["-Wl,-n"], Some(NOHDR_LD_NO_FILEHDR));
    let img = parse_elf(&g.bytes).unwrap();
    assert!(img.segments.iter().all(|s| s.offset >= 0x40), "{img:?}");
    let set = set_for(&g.bytes);
    let (image, stamped) = link(&g.bytes, &set).unwrap();
    assert_segments_preserved(&g.bytes, &image);
    assert_eq!(identity(&image).unwrap(), identity(&g.bytes).unwrap());
    assert_eq!(stamped, set);
    for s in &img.segments {
        let r = s.offset as usize..(s.offset + s.filesz) as usize;
        assert_eq!(g.bytes[r.clone()], image[r]);
    }
}

#[test]
fn headers_inside_a_segment_are_restamped() {
    let g = gcc(&["-Wl,-n"], Some(NOHDR_LD));
    let set = set_for(&g.bytes);
    let (image, stamped) = link(&g.bytes, &set).unwrap();
    assert_segments_preserved(&g.bytes, &image);
    assert_ne!(identity(&image).unwrap(), identity(&g.bytes).unwrap());
    assert_eq!(stamped.guest.digest, identity(&image).unwrap());
}

#[test]
fn elf32_guest() {
    let g = gcc(&["-m32"], None);
    assert_eq!(g.bytes[4], 1, "gcc -m32 made an ELF32");
    let set = set_for(&g.bytes);
    let (image, stamped) = link(&g.bytes, &set).unwrap();
    assert_segments_preserved(&g.bytes, &image);
    assert_eq!(read_translation_set(&image).unwrap().unwrap(), stamped);
    let out = write_tmp(g.path.parent().unwrap(), "guest32.pre.elf", &image);
    assert!(readelf_sections(&out).contains(SECTION_NAME));
    assert_eq!(objdump_d(&out), objdump_d(&g.path));
}

#[test]
fn damaged_section_is_reported_clearly() {
    let g = guest64();
    let (image, stamped) = link(&g.bytes, &set_for(&g.bytes)).unwrap();
    let encoded = encode(&stamped);
    let at = image
        .windows(encoded.len())
        .position(|w| w == encoded.as_slice())
        .unwrap();

    // A flipped payload byte: checksum mismatch, naming the section and its offset.
    let mut bad = image.clone();
    let last = at + encoded.len() - 1;
    bad[last] ^= 1;
    let e = read_translation_set(&bad).unwrap_err();
    assert!(
        matches!(e, LinkError::Translations { offset, .. } if offset == at as u64),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(SECTION_NAME) && msg.contains("checksum mismatch"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{at:#x}")), "{msg}");
    // The raw bytes are still readable (a backend then falls back to dynamic).
    assert_eq!(
        read_translations(&bad).unwrap().unwrap().len(),
        encoded.len()
    );

    // A damaged magic.
    let mut bad = image.clone();
    bad[at] = b'Z';
    let msg = read_translation_set(&bad).unwrap_err().to_string();
    assert!(msg.contains("bad magic"), "{msg}");

    // The section's size runs past the end of the file.
    let mut bad = image.clone();
    bad.truncate(at + 10);
    let e = read_translations(&bad).unwrap_err();
    assert!(
        matches!(e, LinkError::Elf(ElfError::TablePastEnd { .. })),
        "{e:?}"
    );
}

#[test]
fn stale_and_invalid_sets_are_refused() {
    let g = guest64();
    let mut set = set_for(&g.bytes);
    set.guest.digest = [0xab; 32];
    let e = link(&g.bytes, &set).unwrap_err();
    assert!(matches!(e, LinkError::Stale { .. }), "{e:?}");
    assert!(e.to_string().contains("another guest build"));

    let mut set = set_for(&g.bytes);
    set.clusters[0].code[0].bytes.pop();
    let e = link(&g.bytes, &set).unwrap_err();
    assert!(e.to_string().contains("cluster 0"), "{e}");
}

#[test]
fn relinking_replaces_the_section() {
    let g = guest64();
    let set = set_for(&g.bytes);
    let (once, _) = link(&g.bytes, &set).unwrap();
    // Re-link the linked image with a set made for it, with no clusters.
    let mut empty = set.clone();
    empty.clusters.clear();
    empty.guest.digest = identity(&once).unwrap();
    let (twice, stamped) = link(&once, &empty).unwrap();
    assert_eq!(read_translation_set(&twice).unwrap().unwrap(), stamped);
    let out = write_tmp(g.path.parent().unwrap(), "twice.elf", &twice);
    let sections = readelf_sections(&out);
    assert_eq!(sections.matches(SECTION_NAME).count(), 1, "{sections}");
    assert_segments_preserved(&g.bytes, &twice);
}

#[test]
fn elf_without_section_table_gets_one() {
    let g = guest64();
    let mut bare = g.bytes.clone();
    // Forget the section table: e_shoff, e_shnum, e_shstrndx = 0.
    bare[0x28..0x30].fill(0);
    bare[0x3c..0x40].fill(0);
    let image = embed(&bare, b"payload").unwrap();
    assert_eq!(read_translations(&image).unwrap().unwrap(), b"payload");
    let out = write_tmp(g.path.parent().unwrap(), "bare.elf", &image);
    let sections = readelf_sections(&out);
    assert!(
        sections.contains(SECTION_NAME) && sections.contains(".shstrtab"),
        "{sections}"
    );
}

#[test]
fn bad_inputs_give_errors_not_panics() {
    assert!(matches!(
        read_translations(b"not an elf"),
        Err(LinkError::Elf(ElfError::NotElf { .. }))
    ));
    assert!(matches!(
        embed(b"", b"x"),
        Err(LinkError::Elf(ElfError::NotElf { .. }))
    ));
    let g = guest64();
    for n in [5, 16, 0x30, 0x3e, 0x40] {
        assert!(
            read_translations(&g.bytes[..n]).is_err(),
            "truncated to {n}"
        );
    }
    // Section header table pointing past the end.
    let mut bad = g.bytes.clone();
    bad[0x28..0x30].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = read_translations(&bad).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("section header table (e_shoff at offset 0x28)")
            && msg.contains("past the end"),
        "{e}"
    );
    // Every prefix of a linked image is an error or a result, never a panic.
    let (image, _) = link(&g.bytes, &set_for(&g.bytes)).unwrap();
    for n in (0..image.len()).step_by(7) {
        let _ = read_translation_set(&image[..n]);
    }
}

#[test]
fn inspect_lists_clusters_with_disassembly() {
    let g = guest64();
    let (image, stamped) = link(&g.bytes, &set_for(&g.bytes)).unwrap();
    let text = inspect::render(&stamped, inspect::IdentityCheck::Matches);
    let entry = format!("{:#x}", stamped.clusters[0].entry_rip().unwrap());
    assert!(
        text.contains(&format!(
            "cluster 0: entry {entry}, 1 code range(s) {entry}.."
        )),
        "{text}"
    );
    assert!(
        text.contains("3 instructions, 3 exiting [IN, OUT]"),
        "{text}"
    );
    assert!(text.contains("out dx,al"), "{text}");
    assert!(text.contains("in al,dx"), "{text}");
    assert!(text.contains("exits: OUT"), "{text}");
    assert!(text.contains("matches this image"));
    let _ = image;
}

/// Found by the `link_embed` fuzz target: an ELF32 whose section headers have garbage
/// name offsets. Re-linking once appended the name again, where a garbage offset
/// then resolved to it; now the existing name is reused and re-linking works.
#[test]
fn relinking_with_damaged_section_names() {
    let data = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/damaged-section-names.elf"
    ))
    .unwrap();
    let once = embed(&data, b"first").unwrap();
    let twice = embed(&once, b"second").unwrap();
    assert_eq!(read_translations(&twice).unwrap().unwrap(), b"second");
    let thrice = embed(&twice, b"third").unwrap();
    assert_eq!(read_translations(&thrice).unwrap().unwrap(), b"third");
}
