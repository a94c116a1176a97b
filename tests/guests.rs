//! The bundled guest kernels, checked without a VMM: each is a static ELF64 loaded
//! at its physical addresses, has no undefined symbols and no SSE/AVX (KVM here
//! cannot emulate them), and contains the exiting instructions it exists for.
//! Each guest is also booted under QEMU TCG through the `mbloader` trampoline and
//! its output checked (ignored where QEMU is missing, a failure under CI). The C
//! guests (guest-kernels/c/, built with gcc) are checked like the Rust ones.

#[path = "../src/guests.rs"]
mod guests;
mod support;

use std::path::PathBuf;
use std::process::Command;

use guests::{bundled, BundledGuest, GUEST_DIR, MBLOADER};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_RELA: u32 = 4;
const SHT_DYNAMIC: u32 = 6;
const SHT_REL: u32 = 9;
const SHT_DYNSYM: u32 = 11;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[derive(Debug)]
struct Phdr {
    p_type: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

#[derive(Debug)]
struct Shdr {
    sh_type: u32,
    offset: u64,
    size: u64,
    entsize: u64,
}

struct Elf<'a> {
    bytes: &'a [u8],
    e_type: u16,
    machine: u16,
    entry: u64,
    phdrs: Vec<Phdr>,
    shdrs: Vec<Shdr>,
}

/// A minimal ELF64 little-endian reader; panics (failing the test) on anything
/// malformed.
fn parse<'a>(name: &str, b: &'a [u8]) -> Elf<'a> {
    assert!(b.len() >= 64, "{name}: shorter than an ELF header");
    assert_eq!(&b[..4], b"\x7fELF", "{name}: no ELF magic");
    assert_eq!(b[4], 2, "{name}: not ELFCLASS64");
    assert_eq!(b[5], 1, "{name}: not little-endian");
    let phoff = u64_at(b, 32) as usize;
    let shoff = u64_at(b, 40) as usize;
    let (phentsize, phnum) = (u16_at(b, 54) as usize, u16_at(b, 56) as usize);
    let (shentsize, shnum) = (u16_at(b, 58) as usize, u16_at(b, 60) as usize);
    assert!(
        phentsize >= 56 && phoff + phnum * phentsize <= b.len(),
        "{name}: program headers out of bounds"
    );
    assert!(
        shnum == 0 || (shentsize >= 64 && shoff + shnum * shentsize <= b.len()),
        "{name}: section headers out of bounds"
    );
    let phdrs = (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            Phdr {
                p_type: u32_at(b, o),
                flags: u32_at(b, o + 4),
                offset: u64_at(b, o + 8),
                vaddr: u64_at(b, o + 16),
                paddr: u64_at(b, o + 24),
                filesz: u64_at(b, o + 32),
                memsz: u64_at(b, o + 40),
            }
        })
        .collect();
    let shdrs = (0..shnum)
        .map(|i| {
            let o = shoff + i * shentsize;
            Shdr {
                sh_type: u32_at(b, o + 4),
                offset: u64_at(b, o + 24),
                size: u64_at(b, o + 32),
                entsize: u64_at(b, o + 56),
            }
        })
        .collect();
    Elf {
        bytes: b,
        e_type: u16_at(b, 16),
        machine: u16_at(b, 18),
        entry: u64_at(b, 24),
        phdrs,
        shdrs,
    }
}

fn guest_path(g: &BundledGuest) -> PathBuf {
    PathBuf::from(GUEST_DIR).join(g.name)
}

#[test]
fn the_workloads_are_bundled_once_each() {
    let names: Vec<&str> = bundled().iter().map(|g| g.name).collect();
    let rust = ["console", "pci", "rtc", "pit", "cpuid", "ctxswitch"];
    let c = ["c8250", "c8250-os", "c8250-retpoline", "cpci", "crtc"];
    assert_eq!(guests::c_guest_names().collect::<Vec<_>>(), c);
    if guests::C_GUESTS_MISSING.is_empty() {
        assert_eq!(names, [&rust[..], &c[..]].concat());
    } else {
        assert_eq!(
            names,
            rust,
            "C guests missing: {}",
            guests::C_GUESTS_MISSING
        );
    }
    for g in bundled() {
        assert!(!g.description.is_empty(), "{}: no description", g.name);
        assert_eq!(guests::find(g.name).map(|f| f.name), Some(g.name));
        // The embedded bytes are the file build.rs produced.
        let on_disk = std::fs::read(guest_path(g)).expect("guest ELF in AVEX_GUEST_DIR");
        assert_eq!(
            on_disk, g.elf,
            "{}: embedded ELF differs from {}",
            g.name, GUEST_DIR
        );
    }
    assert!(guests::find("nonesuch").is_none());
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
fn the_c_guests_are_built_where_gcc_is() {
    assert_eq!(guests::C_GUESTS_MISSING, "", "the C guests were not built");
    for name in guests::c_guest_names() {
        let g = guests::find(name).unwrap_or_else(|| panic!("{name} not bundled"));
        assert!(!g.elf.is_empty(), "{name}: empty ELF");
    }
    // -Os made different code from the same source.
    let (o2, os) = (guests::find("c8250"), guests::find("c8250-os"));
    assert_ne!(o2.map(|g| g.elf), os.map(|g| g.elf), "c8250-os is c8250");
}

#[test]
fn every_guest_is_a_static_elf64_loaded_at_its_physical_addresses() {
    for g in bundled() {
        let e = parse(g.name, g.elf);
        assert_eq!(e.e_type, 2, "{}: not ET_EXEC", g.name);
        assert_eq!(e.machine, 62, "{}: not x86-64", g.name);
        assert!(
            !e.phdrs
                .iter()
                .any(|p| p.p_type == PT_INTERP || p.p_type == PT_DYNAMIC),
            "{}: dynamically linked",
            g.name
        );
        let loads: Vec<&Phdr> = e.phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
        assert!(!loads.is_empty(), "{}: no PT_LOAD", g.name);
        for p in &loads {
            assert_eq!(p.paddr, p.vaddr, "{}: p_paddr != p_vaddr in {p:?}", g.name);
            assert!(
                p.filesz <= p.memsz,
                "{}: p_filesz > p_memsz in {p:?}",
                g.name
            );
            assert!(
                p.offset + p.filesz <= e.bytes.len() as u64,
                "{}: segment past EOF",
                g.name
            );
            // Above the real-mode area and BIOS, inside the identity-mapped 4 GiB.
            assert!(
                p.paddr >= 0x10_0000,
                "{}: segment below 1 MiB: {p:?}",
                g.name
            );
            assert!(
                p.paddr + p.memsz <= 1 << 32,
                "{}: segment above 4 GiB: {p:?}",
                g.name
            );
        }
        for (i, a) in loads.iter().enumerate() {
            for b in &loads[i + 1..] {
                let disjoint = a.paddr + a.memsz <= b.paddr || b.paddr + b.memsz <= a.paddr;
                assert!(disjoint, "{}: overlapping segments {a:?} {b:?}", g.name);
            }
        }
        let entry_seg = loads
            .iter()
            .find(|p| (p.paddr..p.paddr + p.filesz).contains(&e.entry))
            .unwrap_or_else(|| panic!("{}: entry {:#x} in no loadable segment", g.name, e.entry));
        assert!(
            entry_seg.flags & PF_X != 0,
            "{}: entry segment not executable",
            g.name
        );
    }
}

#[test]
fn no_guest_has_undefined_symbols_or_relocations() {
    for g in bundled() {
        let e = parse(g.name, g.elf);
        for s in &e.shdrs {
            assert!(
                ![SHT_REL, SHT_RELA, SHT_DYNAMIC, SHT_DYNSYM].contains(&s.sh_type),
                "{}: has a relocation or dynamic section (type {})",
                g.name,
                s.sh_type
            );
        }
        let symtab = e
            .shdrs
            .iter()
            .find(|s| s.sh_type == SHT_SYMTAB)
            .unwrap_or_else(|| panic!("{}: no symbol table to check", g.name));
        assert_eq!(symtab.entsize, 24);
        let mut defined = 0;
        for i in 1..(symtab.size / 24) as usize {
            let o = symtab.offset as usize + i * 24;
            let shndx = u16_at(e.bytes, o + 6);
            let value = u64_at(e.bytes, o + 8);
            assert_ne!(
                shndx, 0,
                "{}: undefined symbol #{i} (value {value:#x})",
                g.name
            );
            defined += 1;
        }
        assert!(defined > 0, "{}: empty symbol table", g.name);
    }
}

/// `objdump -d` of one guest, in AT&T syntax.
fn disassemble(g: &BundledGuest) -> String {
    let out = Command::new("objdump")
        .arg("-d")
        .arg(guest_path(g))
        .output()
        .expect("objdump (binutils) is needed to check the guests for SSE");
    assert!(out.status.success(), "objdump failed on {}", g.name);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn no_guest_uses_sse_avx_or_x87() {
    // KVM's emulator here stops on these (PLATFORM.md); x87 and XSAVE-family too.
    let forbidden_regs = ["%xmm", "%ymm", "%zmm", "%st", "%mm"];
    let forbidden_mnemonics = [
        "ldmxcsr",
        "stmxcsr",
        "fxsave",
        "fxrstor",
        "xsave",
        "xrstor",
        "fwait",
        "cmpxchg16b",
        "emms",
    ];
    for g in bundled() {
        let dis = disassemble(g);
        // `addr:\tbytes\tmnemonic operands`; long encodings continue on lines of
        // bytes only.
        let insns: Vec<(&str, &str)> = dis
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                let (addr, _bytes, text) = (f.next()?, f.next()?, f.next()?);
                addr.trim_end().ends_with(':').then_some((l, text))
            })
            .collect();
        assert!(insns.len() > 50, "{}: objdump saw almost no code", g.name);
        for (line, text) in insns {
            for r in forbidden_regs {
                assert!(!text.contains(r), "{}: uses {r}: {line}", g.name);
            }
            let mnemonic = text.split_whitespace().next().unwrap_or("");
            assert!(
                !forbidden_mnemonics.iter().any(|m| mnemonic.starts_with(m))
                    && !mnemonic.starts_with('f'),
                "{}: forbidden instruction: {line}",
                g.name
            );
        }
    }
}

#[test]
fn every_guest_contains_the_exiting_instructions_it_exists_for() {
    // Every guest prints through COM1 (`in` LSR, `out` THR) and ends through 0xf4.
    let common = ["in     (%dx),%al", "out    %al,(%dx)"];
    let specific: &[(&str, &[&str])] = &[
        ("console", &[]),
        ("pci", &["out    %eax,(%dx)", "in     (%dx),%eax"]),
        ("rtc", &[]),
        ("pit", &["rdtsc"]),
        ("cpuid", &["cpuid", "xgetbv", "rdmsr", "wrmsr"]),
        ("ctxswitch", &[",%cr3", "rdmsr", "wrmsr", "rdtsc"]),
        // The C guests reach their ports through function pointers (`call *`),
        // and the 8250 console's LSR wait delays with writes to port 0x80.
        ("c8250", &["call   *", "out    %al,$0x80"]),
        ("c8250-os", &["call   *", "out    %al,$0x80"]),
        // Function pointers through retpolines, returns through the return thunk.
        (
            "c8250-retpoline",
            &[
                "<__x86_indirect_thunk_",
                "<__x86_return_thunk>",
                "out    %al,$0x80",
            ],
        ),
        (
            "cpci",
            &[
                "call   *",
                "out    %eax,(%dx)",
                "in     (%dx),%eax",
                "in     (%dx),%ax",
            ],
        ),
        (
            "crtc",
            &["call   *", "out    %al,$0x70", "in     $0x71,%al"],
        ),
    ];
    for g in bundled() {
        let dis = disassemble(g);
        let (_, extra) = specific.iter().find(|(n, _)| *n == g.name).expect("listed");
        for needle in common.iter().chain(extra.iter()) {
            assert!(
                dis.contains(needle),
                "{}: no `{needle}` in its code",
                g.name
            );
        }
    }
}

#[test]
fn mbloader_is_a_multiboot1_kernel_with_address_fields() {
    let b = MBLOADER;
    let at = (0..b.len().min(8192) - 12)
        .step_by(4)
        .find(|&o| u32_at(b, o) == 0x1bad_b002)
        .expect("multiboot magic in the first 8 KiB");
    let (flags, sum) = (u32_at(b, at + 4), u32_at(b, at + 8));
    assert_eq!(
        0x1bad_b002u32.wrapping_add(flags).wrapping_add(sum),
        0,
        "header checksum"
    );
    assert!(flags & 0x1_0000 != 0, "a.out kludge flag");
    let (header_addr, load_addr, load_end, bss_end, entry) = (
        u32_at(b, at + 12),
        u32_at(b, at + 16),
        u32_at(b, at + 20),
        u32_at(b, at + 24),
        u32_at(b, at + 28),
    );
    assert_eq!(
        header_addr - load_addr,
        at as u32,
        "header at its load offset"
    );
    assert!(load_end - load_addr <= b.len() as u32 && load_end <= bss_end);
    assert!((load_addr..load_end).contains(&entry));
    // Above every guest, so loading a guest never overwrites the loader.
    for g in bundled() {
        let e = parse(g.name, g.elf);
        for p in e.phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
            assert!(
                p.paddr + p.memsz <= u64::from(load_addr),
                "{} overlaps mbloader",
                g.name
            );
        }
    }
}

// ---- Booting the guests under QEMU TCG, when QEMU is installed ----

/// Boot `g` under QEMU through mbloader; return (guest exit status, serial output).
fn boot(qemu: &str, g: &BundledGuest) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let loader = dir.path().join("mbloader.bin");
    std::fs::write(&loader, MBLOADER).unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg(qemu)
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-m",
            "64",
            "-machine",
            "pc",
        ])
        .args([
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .args(["-rtc", "base=2024-03-15T12:00:00,clock=vm"])
        .arg("-kernel")
        .arg(&loader)
        .arg("-initrd")
        .arg(guest_path(g))
        .output()
        .expect("run qemu");
    let code = out.status.code().expect("qemu ended by a signal");
    // isa-debug-exit: QEMU exits with (V << 1) | 1 for a write of V.
    assert_eq!(
        code & 1,
        1,
        "{}: did not end through port 0xf4 (qemu status {code})",
        g.name
    );
    (
        code >> 1,
        String::from_utf8(out.stdout).expect("ASCII output"),
    )
}

/// The guests' FNV-1a over bytes.
fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The text the console guest writes, as the UART sees it (`\n` sent as `\r\n`).
fn console_text() -> Vec<u8> {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog",
    ];
    let mut text = Vec::new();
    for n in 0..64 {
        let rotated: Vec<&str> = (0..words.len())
            .map(|k| words[(k + n) % words.len()])
            .collect();
        text.extend_from_slice(format!("{n:03}: {}\r\n", rotated.join(" ")).as_bytes());
    }
    text
}

/// What the ctxswitch guest folds into its checksum for 2000 switches.
fn ctxswitch_checksum() -> u64 {
    let mut bytes = Vec::new();
    for i in 0..2000u64 {
        let cr3_delta = (i & 1) * 0x1000; // the second PML4 follows the first
        let fs = 0x0000_7f00_0000_0000 + i * 0x1000;
        let gs = 0xffff_8880_0000_0000 + i * 0x40;
        for v in [cr3_delta, fs, gs] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    fnv(bytes)
}

#[test]
#[cfg_attr(not(avex_qemu), ignore = "needs qemu-system-x86_64")]
fn guests_run_under_qemu_deterministically_and_print_what_they_computed() {
    let qemu = "qemu-system-x86_64";
    for g in bundled() {
        let (status, out) = boot(qemu, g);
        assert_eq!(
            status, 0,
            "{}: exit status {status}, output:\n{out}",
            g.name
        );
        // c8250-os and c8250-retpoline are c8250's source built otherwise: they
        // print the same bytes.
        let tag = g.name.split('-').next().unwrap_or(g.name);
        assert!(
            out.ends_with(&format!("{tag}: ok\r\n")),
            "{}: output:\n{out}",
            g.name
        );
        let (status2, out2) = boot(qemu, g);
        assert_eq!(
            (status2, &out2),
            (status, &out),
            "{}: not deterministic",
            g.name
        );

        let has = |line: &str| out.lines().any(|l| l.trim_end() == line);
        match g.name {
            "console" => {
                let text = console_text();
                assert!(
                    out.contains(std::str::from_utf8(&text).unwrap()),
                    "console text"
                );
                assert!(has("console: uart 16550A"), "{out}");
                let want = format!(
                    "console: wrote {} bytes, checksum {:#018x}",
                    text.len(),
                    fnv(text.iter().copied())
                );
                assert!(has(&want), "want `{want}` in:\n{out}");
            }
            "pci" => {
                // QEMU's i440FX host bridge and PIIX3 (multi-function) ISA bridge.
                assert!(
                    out.starts_with("pci 00:00.0 8086:1237 class 060000"),
                    "{out}"
                );
                assert!(
                    out.contains("pci 00:01.0 8086:7000 class 060100 rev 00 hdr 80"),
                    "{out}"
                );
                assert!(
                    out.contains("pci 00:01.1 8086:7010"),
                    "multi-function scan:\n{out}"
                );
                assert!(out.contains("pci: probed 8199 functions"), "{out}");
            }
            "rtc" => assert!(has("rtc: date 2024-03-15 weekday 6"), "{out}"),
            "pit" => {
                for run in 0..3 {
                    let want = format!(
                        "pit: run {run}: latch 11931, out2 went high: yes, polled at least once: yes, \
                         tsc advanced: yes, tsc monotonic: yes"
                    );
                    assert!(has(&want), "want `{want}` in:\n{out}");
                }
            }
            "cpuid" => {
                // QEMU's qemu64 CPU; two lines, so that the guest's exits are its
                // probing, not its console. The checksum is the old per-leaf
                // output's: the same values, read 64 times and all equal.
                assert!(
                    has("cpuid: AuthenticAMD, 64 rounds of 14 leaves and 6 MSRs, \
                         checksum 0xefd6a5f477ccf123"),
                    "{out}"
                );
                assert_eq!(out.lines().count(), 2, "{out}");
            }
            "ctxswitch" => {
                assert!(
                    has("ctxswitch: 2000 switches, read-back mismatches 0, tsc went backwards 0"),
                    "{out}"
                );
                let want = format!("ctxswitch: checksum {:#018x}", ctxswitch_checksum());
                assert!(has(&want), "want `{want}` in:\n{out}");
            }
            "c8250" | "c8250-os" | "c8250-retpoline" => {
                let want = support::cguests::c8250_output();
                assert!(
                    out.as_bytes() == want,
                    "{}: output differs from the expected:\n{out}",
                    g.name
                );
            }
            "cpci" => {
                // The same i440FX functions the Rust pci guest finds, in Linux's
                // words; QEMU's PIIX3 IDE has its I/O BAR at 0xc000 here.
                for line in [
                    "PCI: Using configuration type 1 for base access",
                    "pci 0000:00:00.0: [8086:1237] type 00 class 0x060000 rev 02",
                    "pci 0000:00:01.0: [8086:7000] type 00 class 0x060100 rev 00",
                    "pci 0000:00:01.1: [8086:7010] type 00 class 0x010180 rev 00",
                    "pci 0000:00:01.1: reg 0x20: [io  0x0000c000-0x0000c00f]",
                    "pci 0000:00:01.3: [8086:7113] type 00 class 0x068000 rev 03",
                    "cpci: bus 00: 4 functions, 1 BARs sized; buses 01-ff: 0 peer buses",
                ] {
                    assert!(has(line), "want `{line}` in:\n{out}");
                }
            }
            "crtc" => {
                // 2024-03-15 was a Friday, 19797 days after 1970-01-01.
                assert!(
                    has("rtc_cmos: register b 0x02 (bcd, 24h), battery good"),
                    "{out}"
                );
                assert!(
                    has("crtc: 64 reads, date 2024-03-15 weekday 5, day 19797 of the epoch"),
                    "{out}"
                );
            }
            other => panic!("unexpected guest {other}"),
        }
    }
}
