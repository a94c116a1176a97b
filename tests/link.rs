//! `avex link` and `avex inspect` end to end, on guest ELFs gcc builds here: a small
//! port-I/O driver (16550 polling, PCI config, RTC) as ELF64 and ELF32.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DRIVER_C: &str = r#"
static inline void outb(unsigned short p, unsigned char v) { __asm__ volatile("outb %0,%1" :: "a"(v), "Nd"(p)); }
static inline unsigned char inb(unsigned short p) { unsigned char v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline unsigned int inl(unsigned short p) { unsigned int v; __asm__ volatile("inl %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline void outl(unsigned short p, unsigned int v) { __asm__ volatile("outl %0,%1" :: "a"(v), "Nd"(p)); }
void putc_serial(char c) { while (!(inb(0x3fd) & 0x20)) ; outb(0x3f8, c); }
unsigned pci_read(unsigned bus, unsigned dev, unsigned fn, unsigned off) {
    outl(0xcf8, 0x80000000u | bus << 16 | dev << 11 | fn << 8 | (off & 0xfc));
    return inl(0xcfc);
}
unsigned char rtc(unsigned char r) { outb(0x70, 0x0a); while (inb(0x71) & 0x80) ; outb(0x70, r); return inb(0x71); }
void _start(void) {
    const char *s = "hello";
    while (*s) putc_serial(*s++);
    unsigned x = 0;
    for (unsigned d = 0; d < 32; d++) x += pci_read(0, d, 0, 0);
    x += rtc(0);
    outb(0xf4, x);
    for (;;) __asm__ volatile("hlt");
}
"#;

fn avex(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_avex"))
        .args(args)
        .output()
        .expect("avex runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "avex failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "avex succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn build(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let src = dir.join("driver.c");
    std::fs::write(&src, DRIVER_C).unwrap();
    let out = dir.join(name);
    let st = Command::new("gcc")
        .args([
            "-O2",
            "-mgeneral-regs-only",
            "-static",
            "-nostdlib",
            "-no-pie",
            "-fno-pic",
        ])
        .args(["-Wl,--build-id=none"])
        .args(extra)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

fn readelf(args: &[&str], path: &Path) -> String {
    let o = Command::new("readelf")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap()
}

fn check_guest(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let guest = build(dir.path(), "guest.elf", extra);
    let pre = dir.path().join("guest.pre.elf");

    // Analyze and link in one step.
    let out = ok(&avex(&[
        "link".as_ref(),
        guest.as_os_str(),
        "-o".as_ref(),
        pre.as_os_str(),
    ]));
    assert!(out.contains(".avex.translations"), "{out}");
    let sections = readelf(&["-S", "-W"], &pre);
    assert!(sections.contains(".avex.translations"), "{sections}");
    assert_eq!(readelf(&["-l", "-W"], &guest), readelf(&["-l", "-W"], &pre));

    let listing = ok(&avex(&["inspect".as_ref(), pre.as_os_str()]));
    assert!(listing.contains("(matches this image)"), "{listing}");
    assert!(listing.contains("cluster 0: entry 0x"), "{listing}");
    assert!(
        listing.contains("exits: OUT") && listing.contains("exits: IN"),
        "{listing}"
    );
    assert!(
        listing.contains("in al,dx") || listing.contains("in eax,dx"),
        "{listing}"
    );

    // From a translation file written by `avex analyze -o`.
    let set = dir.path().join("guest.avxt");
    ok(&avex(&[
        "analyze".as_ref(),
        guest.as_os_str(),
        "-o".as_ref(),
        set.as_os_str(),
    ]));
    let pre2 = dir.path().join("guest2.pre.elf");
    ok(&avex(&[
        "link".as_ref(),
        guest.as_os_str(),
        "--clusters".as_ref(),
        set.as_os_str(),
        "-o".as_ref(),
        pre2.as_os_str(),
    ]));
    let listing2 = ok(&avex(&["inspect".as_ref(), pre2.as_os_str()]));
    let count = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("clusters:"))
            .unwrap()
            .to_string()
    };
    assert_eq!(count(&listing), count(&listing2));
    // The translation file itself can be listed too.
    let listing3 = ok(&avex(&["inspect".as_ref(), set.as_os_str()]));
    assert_eq!(count(&listing), count(&listing3));

    // A set made for another build is refused.
    let other = build(
        dir.path(),
        "other.elf",
        &[extra, &["-DVARIANT", "-O1"]].concat(),
    );
    let err = fails(&avex(&[
        "link".as_ref(),
        other.as_os_str(),
        "--clusters".as_ref(),
        set.as_os_str(),
        "-o".as_ref(),
        dir.path().join("x.elf").as_os_str(),
    ]));
    assert!(err.contains("another guest build"), "{err}");

    // A damaged section is reported with its offset and reason.
    let mut bytes = std::fs::read(&pre).unwrap();
    let sec = sections
        .lines()
        .find(|l| l.contains(".avex.translations"))
        .unwrap();
    let fields: Vec<&str> = sec.split_whitespace().collect();
    let i = fields.iter().position(|f| *f == "PROGBITS").unwrap();
    let off = usize::from_str_radix(fields[i + 2], 16).unwrap();
    let size = usize::from_str_radix(fields[i + 3], 16).unwrap();
    bytes[off + size - 1] ^= 0x10;
    let bad = dir.path().join("bad.pre.elf");
    std::fs::write(&bad, &bytes).unwrap();
    let err = fails(&avex(&["inspect".as_ref(), bad.as_os_str()]));
    assert!(
        err.contains(".avex.translations") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(err.contains(&format!("{off:#x}")), "{err}");

    // Not a pre-analyzed image.
    let err = fails(&avex(&["inspect".as_ref(), guest.as_os_str()]));
    assert!(err.contains("not a pre-analyzed image"), "{err}");
}

#[test]
fn link_and_inspect_elf64() {
    check_guest(&[]);
}

#[test]
fn link_and_inspect_elf32() {
    check_guest(&["-m32"]);
}
