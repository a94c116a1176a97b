//! `avex analyze` end to end: test ELFs are built here with gcc (32- and 64-bit,
//! executables, PIE, static, stripped, relocatable objects, mixed 16/32/64-bit code)
//! and the per-class counts of `avex analyze --json` are compared with the counts GNU
//! objdump's disassembly gives for the same bytes. Bad input gets one clear line.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod support;
use support::{avex, run_ok as run};

/// Exiting instructions in every form, for 32- and 64-bit assembly (`AX`, `CX`, `DI`,
/// `SI` are replaced by the accumulator etc. of the bitness).
const EXITING: &str = r#"
    in $0x60, %al
    in $0x60, %ax
    in $0x60, %eax
    in %dx, %al
    in %dx, %ax
    in %dx, %eax
    out %al, $0x80
    out %ax, $0x80
    out %eax, $0x80
    out %al, %dx
    out %ax, %dx
    out %eax, %dx
    insb
    insw
    insl
    rep insb
    rep insw
    rep insl
    outsb
    outsw
    outsl
    rep outsb
    rep outsw
    rep outsl
    rdmsr
    wrmsr
    rdmsr
    mov %cr0, AX
    mov AX, %cr0
    mov %cr3, AX
    mov AX, %cr3
    mov AX, %cr3
    mov %cr4, AX
    mov AX, %cr4
    mov %cr2, AX
    cpuid
    cpuid
    hlt
    rdtsc
    rdtscp
    rdpmc
    wbinvd
    invd
    invlpg (AX)
    invlpg 8(CX,DI,4)
    xsetbv
    xgetbv
    lgdt (AX)
    lidt (AX)
    sgdt (AX)
    sidt (AX)
    lldt %ax
    ltr %ax
    sldt %ax
    str %ax
    mov %db7, AX
    mov AX, %db0
    mov AX, %db7
    pause
    pause
    clts
    lmsw %ax
    smsw %ax
    vmcall
    monitor
    mwait
    rdrand %eax
    rdseed %eax
    mov %eax, %ebx
    add $1, %ecx
"#;

/// Extra 64-bit-only forms.
const EXITING64: &str = r#"
    mov %cr8, %rax
    mov %rax, %cr8
    mov %cr3, %r12
    mov %r9, %cr4
    invpcid (%rax), %rdx
    movq %rax, %r8
    movq %r8, %r9
    rex.W in %dx, %eax
"#;

fn body(bits: u32) -> String {
    let (ax, cx, di) = if bits == 64 {
        ("%rax", "%rcx", "%rdi")
    } else {
        ("%eax", "%ecx", "%edi")
    };
    let mut s = EXITING
        .replace("AX", ax)
        .replace("CX", cx)
        .replace("DI", di);
    if bits == 64 {
        s += &EXITING64.replace("rex.W in %dx, %eax", "");
    }
    s
}

fn asm_source(bits: u32) -> String {
    let mut s = String::from(".text\n.globl _start\n.type _start,@function\n_start:\n");
    s += &body(bits);
    s += "    call helper\n    ret\n.size _start, .-_start\n";
    // A function without a symbol (reached only by the linear sweep).
    s += "    .p2align 4\n";
    s += "    in $0x71, %al\n    out %al, $0x70\n    cpuid\n    ret\n";
    s += ".type helper,@function\nhelper:\n    rdmsr\n    jz 1f\n    wrmsr\n1:  rdtsc\n    ret\n.size helper, .-helper\n";
    // A second executable section.
    s += ".section .text.unlikely,\"ax\",@progbits\ncold:\n    hlt\n    jmp cold\n";
    s
}

const C_SOURCE: &str = r#"
static inline unsigned char inb(unsigned short p) { unsigned char v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline void outb(unsigned char v, unsigned short p) { __asm__ volatile("outb %0,%1" : : "a"(v), "Nd"(p)); }
static inline void outsb(unsigned short p, const void *a, unsigned long n) { __asm__ volatile("rep outsb" : "+S"(a), "+c"(n) : "d"(p)); }
static inline unsigned long long rdmsr(unsigned m) { unsigned lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(m)); return ((unsigned long long)hi << 32) | lo; }
static inline void wrmsr(unsigned m, unsigned long long v) { __asm__ volatile("wrmsr" : : "c"(m), "a"((unsigned)v), "d"((unsigned)(v >> 32))); }
static inline unsigned long read_cr3(void) { unsigned long v; __asm__ volatile("mov %%cr3,%0" : "=r"(v)); return v; }
static inline void write_cr3(unsigned long v) { __asm__ volatile("mov %0,%%cr3" : : "r"(v) : "memory"); }
void serial_puts(const char *s) { while (*s) { while (!(inb(0x3fd) & 0x20)) __asm__ volatile("pause"); outb(*s++, 0x3f8); } }
unsigned rtc(unsigned char reg) { outb(reg, 0x70); return inb(0x71); }
void blast(const char *b, unsigned long n) { outsb(0xe9, b, n); }
unsigned long long msr_toggle(unsigned m) { unsigned long long v = rdmsr(m); wrmsr(m, v ^ 1); return v; }
void switch_mm(unsigned long next) { if (read_cr3() != next) write_cr3(next); }
unsigned cpu_max(void) { unsigned a = 0, b, c, d; __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d)); return a; }
int main(void) { serial_puts("hi"); blast("x", 1); switch_mm(0); return rtc(4) + (int)msr_toggle(0x10) + cpu_max(); }
"#;

/// A 32-bit ELF with a 16-bit section, 32-bit code that far-jumps into 64-bit code
/// in the same section, and a 64-bit section.
const MIXED_SOURCE: &str = r#"
.section .text16,"ax",@progbits
.code16
.globl start16
start16:
    cli
    in $0x92, %al
    or $2, %al
    out %al, $0x92
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    in %dx, %al
    outsb
    rep insw
    cpuid
    ljmpl $0x08, $_start
.text
.code32
.globl _start
_start:
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    mov %eax, %cr0
    ljmp $0x10, $long_mode
.code64
long_mode:
    mov $0x3f8, %dx
    mov $0x41, %al
    out %al, %dx
    mov %rsp, %r8
    mov %r8, %r9
    mov %cr3, %rax
    mov %rax, %cr3
    movq %rax, %r10
    add %r10, %r11
    cpuid
    rdtsc
    hlt
    jmp long_mode
.section .text64,"ax",@progbits
.code64
.globl entry64
entry64:
    mov %rdi, %r12
    mov %rsi, %r13
    mov %cr8, %rax
    mov %rax, %cr8
    in $0x61, %al
    out %al, $0x61
    mov %r12, %rdi
    mov %r13, %rsi
    lea 8(%rsp), %rsp
    wrmsr
    ret
"#;

struct Built {
    dir: tempfile::TempDir,
}

impl Built {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn build() -> Built {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for bits in [32u32, 64] {
        let m = format!("-m{bits}");
        let s = d.join(format!("exits{bits}.S"));
        std::fs::write(&s, asm_source(bits)).unwrap();
        // Static ET_EXEC, its stripped copy, and a relocatable object.
        run(Command::new("gcc")
            .args([&m, "-nostdlib", "-static", "-no-pie", "-o"])
            .arg(d.join(format!("exits{bits}")))
            .arg(&s));
        run(Command::new("gcc")
            .args([&m, "-nostdlib", "-static", "-no-pie", "-s", "-o"])
            .arg(d.join(format!("exits{bits}-stripped")))
            .arg(&s));
        run(Command::new("gcc")
            .args([&m, "-c", "-o"])
            .arg(d.join(format!("exits{bits}.o")))
            .arg(&s));
        // C with inline assembly: a PIE (ET_DYN), and -ffunction-sections objects
        // (one executable section per function, each at address 0).
        let c = d.join("drivers.c");
        std::fs::write(&c, C_SOURCE).unwrap();
        run(Command::new("gcc")
            .args([&m, "-O2", "-o"])
            .arg(d.join(format!("drivers{bits}")))
            .arg(&c));
        run(Command::new("gcc")
            .args([&m, "-O2", "-ffunction-sections", "-c", "-o"])
            .arg(d.join(format!("drivers{bits}.o")))
            .arg(&c));
    }
    let s = d.join("mixed.S");
    std::fs::write(&s, MIXED_SOURCE).unwrap();
    run(Command::new("gcc")
        .args([
            "-m32",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(d.join("mixed32"))
        .arg(&s));
    Built { dir }
}

/// objdump's mnemonic and operands (Intel syntax) to an exit class name.
fn class_of(mnemonic: &str, operands: &str) -> Option<&'static str> {
    let ops: Vec<&str> = operands.split(',').map(str::trim).collect();
    let cr = |s: &str| s.strip_prefix("cr").and_then(|n| n.parse::<u8>().ok());
    let dr = |s: &str| s.starts_with("db") || s.starts_with("dr");
    Some(match mnemonic {
        "in" => "IN",
        "out" => "OUT",
        "ins" | "insb" | "insw" | "insd" => "INS",
        "outs" | "outsb" | "outsw" | "outsd" => "OUTS",
        "rdmsr" => "RDMSR",
        "wrmsr" => "WRMSR",
        "cpuid" => "CPUID",
        "hlt" => "HLT",
        "rdtsc" => "RDTSC",
        "rdtscp" => "RDTSCP",
        "rdpmc" => "RDPMC",
        "wbinvd" => "WBINVD",
        "wbnoinvd" => "WBNOINVD",
        "invd" => "INVD",
        "invlpg" => "INVLPG",
        "invpcid" => "INVPCID",
        "invlpga" => "INVLPGA",
        "xsetbv" => "XSETBV",
        "xgetbv" => "XGETBV",
        "lgdt" | "lgdtd" | "lgdtw" => "LGDT",
        "lidt" | "lidtd" | "lidtw" => "LIDT",
        "lldt" => "LLDT",
        "ltr" => "LTR",
        "sgdt" | "sgdtd" | "sgdtw" => "SGDT",
        "sidt" | "sidtd" | "sidtw" => "SIDT",
        "sldt" => "SLDT",
        "str" => "STR",
        "pause" => "PAUSE",
        "clts" => "CLTS",
        "lmsw" => "LMSW",
        "vmcall" => "VMCALL",
        "vmlaunch" | "vmresume" | "vmptrld" | "vmptrst" | "vmread" | "vmwrite" | "vmclear"
        | "vmxon" | "vmxoff" | "invept" | "invvpid" => "VMX_INSTRUCTION",
        "monitor" => "MONITOR",
        "mwait" => "MWAIT",
        "rdrand" => "RDRAND",
        "rdseed" => "RDSEED",
        "getsec" => "GETSEC",
        "rsm" => "RSM",
        "mov" if ops.len() == 2 => {
            if let Some(n) = cr(ops[0]) {
                match n {
                    0 => "MOV_TO_CR0",
                    3 => "MOV_TO_CR3",
                    4 => "MOV_TO_CR4",
                    8 => "MOV_TO_CR8",
                    _ => return None,
                }
            } else if let Some(n) = cr(ops[1]) {
                match n {
                    0 => "MOV_FROM_CR0",
                    3 => "MOV_FROM_CR3",
                    4 => "MOV_FROM_CR4",
                    8 => "MOV_FROM_CR8",
                    _ => return None,
                }
            } else if dr(ops[0]) {
                "MOV_TO_DR"
            } else if dr(ops[1]) {
                "MOV_FROM_DR"
            } else {
                return None;
            }
        }
        _ => return None,
    })
}

const PREFIXES: &[&str] = &[
    "rep", "repz", "repe", "repnz", "repne", "lock", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "ss", "fs", "gs", "notrack", "bnd", "rex", "rex.w", "rex.W",
];

/// Counts per exit class in `objdump -d` output (extra args select sections, ranges
/// and the decoding mode).
fn objdump_counts(file: &Path, extra: &[&str]) -> BTreeMap<String, u64> {
    let out = run(Command::new("objdump")
        .args(["-d", "-w", "--no-show-raw-insn", "-M", "intel"])
        .args(extra)
        .arg(file));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        // "  401000:\tin     al,dx"
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let insn = insn
            .split('#')
            .next()
            .unwrap_or("")
            .split('<')
            .next()
            .unwrap_or("");
        let mut words = insn.split_whitespace().peekable();
        while words
            .peek()
            .is_some_and(|w| PREFIXES.contains(w) || w.starts_with("rex."))
        {
            words.next();
        }
        let Some(mnemonic) = words.next() else {
            continue;
        };
        let operands: String = words.collect::<Vec<_>>().join(" ");
        if let Some(class) = class_of(mnemonic, &operands) {
            *counts.entry(class.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

fn add(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

fn analyze_json(files: &[&Path], policy: &str) -> (Value, Output) {
    let out = avex()
        .args(["analyze", "--json", "--policy", policy])
        .args(files)
        .output()
        .expect("run avex");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out)
}

fn map_of(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().expect("count")))
        .collect()
}

/// Compares one file's report with objdump's counts, class by class.
fn check_against(file: &Path, report: &Value, objdump: &BTreeMap<String, u64>) {
    let all = map_of(&report["class_instructions"]);
    let policy_classes: Vec<String> = report["policy_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let sites = map_of(&report["sites"]);
    let mut classes: Vec<&String> = all.keys().chain(objdump.keys()).collect();
    classes.sort();
    classes.dedup();
    for class in classes {
        let want = objdump.get(class).copied().unwrap_or(0);
        let got = all.get(class).copied().unwrap_or(0);
        assert_eq!(
            got,
            want,
            "{}: class {class}: avex found {got} instructions, objdump {want}",
            file.display()
        );
        let exits = policy_classes.contains(class);
        let site_count = sites.get(class).copied().unwrap_or(0);
        assert_eq!(
            site_count,
            if exits { want } else { 0 },
            "{}: class {class}: {site_count} sites (class exits under the policy: {exits})",
            file.display()
        );
    }
    let total: u64 = sites.values().sum();
    assert_eq!(report["sites_total"].as_u64(), Some(total));
    // Every site was translated, covered by an earlier cluster, or left with a reason.
    assert_eq!(
        report["sites_translated"].as_u64().unwrap() + report["sites_covered"].as_u64().unwrap(),
        total
    );
    assert_eq!(
        report["clusters"].as_u64().unwrap() + report["sites_unclustered"].as_u64().unwrap(),
        report["sites_translated"].as_u64().unwrap()
    );
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc with 32-bit support and objdump")]
fn counts_agree_with_objdump_for_every_class() {
    let b = build();
    let names = [
        "exits32",
        "exits64",
        "exits32-stripped",
        "exits64-stripped",
        "exits32.o",
        "exits64.o",
        "drivers32",
        "drivers64",
        "drivers32.o",
        "drivers64.o",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| b.path(n)).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    for policy in ["all", "default"] {
        let (v, out) = analyze_json(&refs, policy);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let files = v["files"].as_array().unwrap();
        assert_eq!(files.len(), names.len());
        for (p, report) in paths.iter().zip(files) {
            assert_eq!(report["file"].as_str(), Some(p.to_str().unwrap()));
            let od = objdump_counts(p, &[]);
            check_against(p, report, &od);
        }
    }
    // The hand-written sources hold these classes; make sure the comparison saw them.
    let od = objdump_counts(&b.path("exits64"), &[]);
    for class in [
        "IN",
        "OUT",
        "INS",
        "OUTS",
        "RDMSR",
        "WRMSR",
        "MOV_TO_CR0",
        "MOV_FROM_CR0",
        "MOV_TO_CR3",
        "MOV_FROM_CR3",
        "MOV_TO_CR4",
        "MOV_FROM_CR4",
        "MOV_TO_CR8",
        "MOV_FROM_CR8",
        "CPUID",
        "HLT",
        "RDTSC",
        "RDTSCP",
        "RDPMC",
        "WBINVD",
        "INVD",
        "INVLPG",
        "INVPCID",
        "XSETBV",
        "XGETBV",
        "LGDT",
        "LIDT",
        "SGDT",
        "SIDT",
        "LLDT",
        "LTR",
        "SLDT",
        "STR",
        "MOV_TO_DR",
        "MOV_FROM_DR",
        "PAUSE",
        "CLTS",
        "LMSW",
        "VMCALL",
        "MONITOR",
        "MWAIT",
        "RDRAND",
        "RDSEED",
    ] {
        assert!(
            od.get(class).copied().unwrap_or(0) > 0,
            "objdump saw no {class}"
        );
    }
    let od = objdump_counts(&b.path("drivers64"), &[]);
    for class in [
        "IN",
        "OUT",
        "OUTS",
        "RDMSR",
        "WRMSR",
        "MOV_TO_CR3",
        "MOV_FROM_CR3",
        "CPUID",
        "PAUSE",
    ] {
        assert!(
            od.get(class).copied().unwrap_or(0) > 0,
            "objdump saw no {class} in drivers64"
        );
    }
}

fn symbol_addr(file: &Path, name: &str) -> u64 {
    let out = run(Command::new("nm").arg(file));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let addr = w.next()?;
            let _ty = w.next()?;
            (w.next()? == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("no symbol {name} in {}", file.display()))
}

fn section_range(file: &Path, name: &str) -> (u64, u64) {
    let out = run(Command::new("objdump").args(["-h", "-w"]).arg(file));
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() > 4 && w[1] == name {
            let size = u64::from_str_radix(w[2], 16).unwrap();
            let vma = u64::from_str_radix(w[3], 16).unwrap();
            return (vma, vma + size);
        }
    }
    panic!("no section {name} in {}", file.display());
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc with 32-bit support and objdump")]
fn mixed_16_32_64_bit_code_in_an_elf32() {
    let b = build();
    let f = b.path("mixed32");
    let (v, out) = analyze_json(&[&f], "all");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = &v["files"][0];
    assert_eq!(report["elf_class"], 32);
    // objdump, told each range's mode: .text16 as 8086, .text up to long_mode as i386,
    // from long_mode on and .text64 as x86-64.
    let long_mode = symbol_addr(&f, "long_mode");
    let (t0, t1) = section_range(&f, ".text");
    let mut od = objdump_counts(&f, &["-j", ".text16", "-M", "i8086"]);
    add(
        &mut od,
        objdump_counts(
            &f,
            &["-j", ".text", &format!("--stop-address={long_mode:#x}")],
        ),
    );
    add(
        &mut od,
        objdump_counts(
            &f,
            &[
                "-j",
                ".text",
                "-M",
                "x86-64",
                &format!("--start-address={long_mode:#x}"),
                &format!("--stop-address={t1:#x}"),
            ],
        ),
    );
    add(
        &mut od,
        objdump_counts(&f, &["-j", ".text64", "-M", "x86-64"]),
    );
    check_against(&f, report, &od);
    assert!(od["MOV_TO_CR8"] > 0 && od["MOV_TO_CR0"] > 0 && od["INS"] > 0);
    // The regions and why each has its bitness.
    let regions = report["regions"].as_array().unwrap();
    let find = |addr: u64| {
        regions
            .iter()
            .find(|r| r["addr"].as_u64() == Some(addr))
            .unwrap_or_else(|| panic!("no region at {addr:#x}: {regions:?}"))
    };
    let (s16, _) = section_range(&f, ".text16");
    let (s64, _) = section_range(&f, ".text64");
    assert_eq!(find(s16)["bitness"], 16);
    assert_eq!(find(s16)["bitness_reason"], "section-name");
    assert_eq!(find(t0)["bitness"], 32);
    assert_eq!(find(long_mode)["bitness"], 64);
    assert_eq!(find(long_mode)["bitness_reason"], "far-jump");
    assert_eq!(find(s64)["bitness"], 64);
    assert_eq!(find(s64)["bitness_reason"], "section-name");
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc with 32-bit support and objdump")]
fn table_output_and_translation_set() {
    let b = build();
    let f = b.path("drivers64");
    let out = run(avex().arg("analyze").arg(&f));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ELF64 x86-64 DYN"), "{text}");
    assert!(text.contains("MOV_TO_CR3"), "{text}");
    assert!(text.contains("clusters"), "{text}");
    // -o with one input writes one file; with several, a directory of them.
    let one = b.path("drivers64.avxt");
    run(avex().arg("analyze").arg(&f).arg("-o").arg(&one));
    let bytes = std::fs::read(&one).unwrap();
    let set = avex_core::format::decode(&bytes).expect("a valid translation set");
    let (v, _) = analyze_json(&[&f], "default");
    assert_eq!(
        set.clusters.len() as u64,
        v["files"][0]["clusters"].as_u64().unwrap()
    );
    // The set names the guest as the loader and linker identify it.
    let exe = b.path("exits64");
    let set_path = b.path("exits64.avxt");
    run(avex().arg("analyze").arg(&exe).arg("-o").arg(&set_path));
    let set = avex_core::format::decode(&std::fs::read(&set_path).unwrap()).unwrap();
    let elf = std::fs::read(&exe).unwrap();
    assert_eq!(
        set.guest.digest,
        avex_core::identity::of_elf(&elf).expect("loadable")
    );
    assert_eq!(
        set.policy,
        avex_core::policy::ExitPolicy::default().fingerprint()
    );
    assert!(!set.clusters.is_empty());
    // A relocatable object has no load addresses: reported, but no set written.
    let obj = b.path("exits64.o");
    let out = avex()
        .arg("analyze")
        .arg(&obj)
        .arg("-o")
        .arg(b.path("obj.avxt"))
        .output()
        .unwrap();
    assert_one_line_error(&out, &obj, &["relocatable", "link it first"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ELF64 x86-64 REL"));
    assert!(!b.path("obj.avxt").exists());
    let dir = b.path("sets");
    run(avex()
        .arg("analyze")
        .arg(&f)
        .arg(b.path("exits32"))
        .arg("-o")
        .arg(&dir));
    assert!(dir.join("drivers64.avxt").is_file());
    assert!(dir.join("exits32.avxt").is_file());
    // Two inputs with the same file name: the second gets no set and one line.
    let sub = b.path("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(&f, sub.join("drivers64")).unwrap();
    let out = avex()
        .arg("analyze")
        .arg(&f)
        .arg(sub.join("drivers64"))
        .arg("-o")
        .arg(b.path("sets2"))
        .output()
        .unwrap();
    assert_one_line_error(&out, &sub.join("drivers64"), &["same file name"]);
    assert!(b.path("sets2").join("drivers64.avxt").is_file());
}

// ---- bad input ------------------------------------------------------------------

fn rd16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn rd32(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[o..o + 4].try_into().unwrap()))
}
fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// File offset of the section header of `name` in an ELF64, and of its sh_offset field.
fn section_header(b: &[u8], name: &str) -> (usize, usize) {
    let shoff = rd64(b, 0x28) as usize;
    let shentsize = rd16(b, 0x3a) as usize;
    let shnum = rd16(b, 0x3c) as usize;
    let shstrndx = rd16(b, 0x3e) as usize;
    let strtab = rd64(b, shoff + shstrndx * shentsize + 0x18) as usize;
    for i in 0..shnum {
        let h = shoff + i * shentsize;
        let n = strtab + rd32(b, h) as usize;
        let end = b[n..].iter().position(|&c| c == 0).unwrap();
        if &b[n..n + end] == name.as_bytes() {
            return (h, h + 0x18);
        }
    }
    panic!("no section {name}");
}

fn assert_one_line_error(out: &Output, file: &Path, words: &[&str]) {
    assert!(!out.status.success(), "should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    let prefix = format!("avex: {}: ", file.display());
    assert!(lines[0].starts_with(&prefix), "{err}");
    for w in words {
        assert!(lines[0].contains(w), "expected {w:?} in: {err}");
    }
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc with 32-bit support and objdump")]
fn bad_input_gets_one_clear_line_and_good_files_are_still_analyzed() {
    let b = build();
    let good = std::fs::read(b.path("exits64")).unwrap();
    let d = b.dir.path();
    let past = format!("{:#x}", good.len() - 4);
    let mut cases: Vec<(PathBuf, Vec<&str>)> = Vec::new();

    let p = d.join("not-elf.txt");
    std::fs::write(&p, "hello, this is text\n").unwrap();
    cases.push((p, vec!["not an ELF"]));

    let p = d.join("truncated");
    std::fs::write(&p, &good[..40]).unwrap();
    cases.push((p, vec!["truncated", "ELF header", "64 bytes"]));

    let p = d.join("bad-class");
    let mut x = good.clone();
    x[4] = 9;
    std::fs::write(&p, &x).unwrap();
    cases.push((p, vec!["EI_CLASS", "offset 0x4"]));

    let p = d.join("bad-shentsize");
    let mut x = good.clone();
    x[0x3a] = 7;
    std::fs::write(&p, &x).unwrap();
    cases.push((p, vec!["e_shentsize", "offset 0x3a"]));

    let p = d.join("text-past-end");
    let mut x = good.clone();
    let (_, off_field) = section_header(&x, ".text");
    let huge = (good.len() as u64 - 4).to_le_bytes();
    x[off_field..off_field + 8].copy_from_slice(&huge);
    std::fs::write(&p, &x).unwrap();
    cases.push((p, vec!["section .text", "past the end", &past]));

    let p = d.join("arm");
    let mut x = good.clone();
    x[0x12] = 40;
    x[0x13] = 0;
    std::fs::write(&p, &x).unwrap();
    cases.push((p, vec!["unknown machine 40", "ARM"]));

    let p = d.join("shoff-past-end");
    let mut x = good.clone();
    x[0x28..0x30].copy_from_slice(&(good.len() as u64 * 2).to_le_bytes());
    std::fs::write(&p, &x).unwrap();
    cases.push((p, vec!["section header table", "past the end"]));

    let p = d.join("exits64.xz");
    let xz = run(Command::new("xz").arg("-c").arg(b.path("exits64")));
    std::fs::write(&p, &xz.stdout).unwrap();
    cases.push((p, vec!["not an ELF", "xz-compressed", "xz -d"]));

    for (p, words) in &cases {
        let out = avex().arg("analyze").arg(p).output().unwrap();
        assert_one_line_error(&out, p, words);
        assert_eq!(out.status.code(), Some(1));
    }
    // All together with good files: one line per bad file, the good ones reported.
    let mut files: Vec<PathBuf> = cases.iter().map(|c| c.0.clone()).collect();
    files.insert(2, b.path("exits64"));
    files.push(b.path("drivers32"));
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let (v, out) = analyze_json(&refs, "default");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), cases.len(), "{err}");
    let reported: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        reported,
        vec![
            b.path("exits64").to_str().unwrap(),
            b.path("drivers32").to_str().unwrap()
        ]
    );
    assert_eq!(v["failed"].as_array().unwrap().len(), cases.len());
    // Directories are searched for ELF files (the text file is skipped there).
    let (v, out) = analyze_json(&[d], "default");
    let n_elf = std::fs::read_dir(d)
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.is_file() && std::fs::read(&p).unwrap().starts_with(b"\x7fELF")
        })
        .count();
    let analyzed = v["files"].as_array().unwrap().len();
    let failed = v["failed"].as_array().unwrap().len();
    assert_eq!(
        analyzed + failed,
        n_elf,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let non_elf = cases
        .iter()
        .filter(|c| !std::fs::read(&c.0).unwrap().starts_with(b"\x7fELF"))
        .count();
    assert_eq!(failed, cases.len() - non_elf);
}
