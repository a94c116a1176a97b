//! End to end on the bare-metal VT-x hypervisor, booted by GRUB in Bochs
//! (`avex run --backend bochs`):
//!
//! - every bundled guest, pre-analyzed with `avex link`, prints the same console
//!   bytes with clustering off and in `aot+dynamic`, and takes fewer exits with
//!   clusters (except the C guests today's translator cannot cluster yet);
//! - a damaged and a stale `.avex.translations` section are each rejected with
//!   their reason, and the guest still prints the same bytes;
//! - a guest that writes over its own clustered code still prints the right
//!   result (the hypervisor sees the write through EPT write protection of the
//!   page, and the stale translation is dropped before it runs again).
//!
//! Needs Bochs and the GRUB tools (`.ci/install-bochs.sh`). Each run boots BIOS,
//! GRUB and the hypervisor (about 1.1 s of Bochs time); runs go two at a time.

#[path = "../src/guests.rs"]
mod guests;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use avex_core::arch::msr;
use serde_json::Value;

use support::avex;
use support::cguests::c8250_output;

fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "avex-test-bochs-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One `avex run --backend bochs` result: the JSON record and the console bytes.
#[derive(Debug, Clone)]
struct Run {
    record: Value,
    console: Vec<u8>,
}

impl Run {
    fn exits(&self) -> u64 {
        self.record["exits"].as_u64().unwrap()
    }
    fn rejected(&self) -> Option<String> {
        self.record["translations_rejected"]
            .as_str()
            .map(str::to_string)
    }
}

fn run_bochs(image: &Path, mode: &str) -> Run {
    let r = try_run_bochs(image, mode).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.record["status"],
        0,
        "{} in {mode}: guest status",
        image.display()
    );
    r
}

/// [`run_bochs`] without its assertions: the run, or why it failed.
fn try_run_bochs(image: &Path, mode: &str) -> Result<Run, String> {
    let json = image.with_extension(format!("{}.json", mode.replace('+', "_")));
    let out = avex()
        .arg("run")
        .arg("--backend")
        .arg("bochs")
        .arg("--mode")
        .arg(mode)
        .arg("--timeout")
        .arg("120")
        .arg("--json")
        .arg(&json)
        .arg(image)
        .output()
        .expect("run avex");
    if !out.status.success() {
        return Err(format!(
            "{} in {mode}: avex failed ({}):\n{}\n{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let record: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(record["backend"], "bochs");
    Ok(Run {
        record,
        console: out.stdout,
    })
}

fn link(elf: &Path, out: &Path) {
    let o = avex()
        .arg("link")
        .arg(elf)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "avex link {}: {}",
        elf.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A job for [`parallel`].
type Job<T> = Box<dyn FnOnce() -> T + Send>;

/// Run `jobs` two at a time (the machines this runs on have two cores).
fn parallel<T: Send>(jobs: Vec<Job<T>>) -> Vec<T> {
    let n = jobs.len();
    let jobs = std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let results = std::sync::Mutex::new((0..n).map(|_| None).collect::<Vec<Option<T>>>());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some((i, job)) = jobs.lock().unwrap().pop() else {
                    break;
                };
                let r = job();
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("job ran"))
        .collect()
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn bundled_guests_print_the_same_bytes_with_fewer_exits_in_aot_dynamic() {
    let dir = scratch("bundled");
    let mut jobs: Vec<Job<(String, String, Run)>> = Vec::new();
    for g in guests::bundled() {
        let elf = dir.join(g.name);
        std::fs::write(&elf, g.elf).unwrap();
        let pre = dir.join(format!("{}.pre.elf", g.name));
        link(&elf, &pre);
        for mode in ["off", "aot+dynamic"] {
            let pre = pre.clone();
            let name = g.name.to_string();
            jobs.push(Box::new(move || {
                let r = run_bochs(&pre, mode);
                (name, mode.to_string(), r)
            }));
        }
    }
    let results = parallel(jobs);
    eprintln!(
        "{:<10} {:>8} {:>12} {:>10} {:>10}",
        "guest", "off", "aot+dynamic", "avoided", "clusters"
    );
    let mut failures = Vec::new();
    for g in guests::bundled() {
        let get = |m: &str| {
            results
                .iter()
                .find(|(n, mm, _)| n == g.name && mm == m)
                .map(|(_, _, r)| r.clone())
                .unwrap()
        };
        let (off, aot) = (get("off"), get("aot+dynamic"));
        eprintln!(
            "{:<10} {:>8} {:>12} {:>10} {:>10}",
            g.name,
            off.exits(),
            aot.exits(),
            aot.record["avoided"].as_u64().unwrap_or(0),
            aot.record["clusters_run"].as_u64().unwrap_or(0)
        );
        if off.console != aot.console {
            failures.push(format!(
                "{}: console differs between off and aot+dynamic:\n--- off\n{}\n--- aot+dynamic\n{}",
                g.name,
                String::from_utf8_lossy(&off.console),
                String::from_utf8_lossy(&aot.console)
            ));
        }
        if off.console.is_empty() {
            failures.push(format!("{}: printed nothing", g.name));
        }
        if g.name.starts_with("c8250") && off.console != c8250_output() {
            failures.push(format!(
                "{}: not the bytes it prints under QEMU:\n{}",
                g.name,
                String::from_utf8_lossy(&off.console)
            ));
        }
        // Fewer exits with clusters, for every guest, by a clear margin.
        if !support::clusters_cut_enough(g.name, off.exits(), aot.exits()) {
            failures.push(format!(
                "{}: {} exits with clusters, {} without",
                g.name,
                aot.exits(),
                off.exits()
            ));
        }
        if let Some(r) = aot.rejected() {
            failures.push(format!(
                "{}: its own translations were rejected: {r}",
                g.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The console guest's ELF and its pre-analyzed image, in `dir`.
fn console_images(dir: &Path) -> (PathBuf, PathBuf) {
    let g = guests::find("console").expect("bundled console guest");
    let elf = dir.join("console.elf");
    std::fs::write(&elf, g.elf).unwrap();
    let pre = dir.join("console.pre.elf");
    link(&elf, &pre);
    (elf, pre)
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn damaged_and_stale_translations_are_rejected_and_the_guest_still_runs() {
    let dir = scratch("reject");
    let (elf, pre) = console_images(&dir);
    let pre_bytes = std::fs::read(&pre).unwrap();

    // Damaged: one payload byte flipped (the header's checksum no longer matches).
    let section = avex_linker::read_translations(&pre_bytes)
        .unwrap()
        .expect("a translations section");
    let at = pre_bytes
        .windows(section.len())
        .position(|w| w == section.as_slice())
        .expect("section bytes in the file");
    let mut damaged = pre_bytes.clone();
    damaged[at + section.len() - 3] ^= 0x5a;
    let damaged_path = dir.join("console.damaged.elf");
    std::fs::write(&damaged_path, &damaged).unwrap();

    // Stale: the console guest's translations in another guest's image (as if the
    // guest had been rebuilt since the analysis).
    let pci = guests::find("pci").expect("bundled pci guest");
    let stale = avex_linker::embed(pci.elf, &section).unwrap();
    let stale_path = dir.join("pci.stale.elf");
    std::fs::write(&stale_path, &stale).unwrap();
    let pci_path = dir.join("pci.elf");
    std::fs::write(&pci_path, pci.elf).unwrap();

    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = elf.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&damaged_path, "aot+dynamic")),
        Box::new(move || run_bochs(&pci_path, "off")),
        Box::new(move || run_bochs(&stale_path, "aot+dynamic")),
    ];
    let r = parallel(jobs);
    let (console_off, damaged, pci_off, stale) = (&r[0], &r[1], &r[2], &r[3]);

    let why = damaged.rejected().expect("the damaged set is rejected");
    assert!(why.contains("damaged"), "reason: {why}");
    assert_eq!(damaged.record["translations_loaded"], 0);
    assert_eq!(
        damaged.console, console_off.console,
        "damaged: same console bytes"
    );

    let why = stale.rejected().expect("the stale set is rejected");
    assert!(why.contains("stale"), "reason: {why}");
    assert_eq!(stale.record["translations_loaded"], 0);
    assert_eq!(stale.console, pci_off.console, "stale: same console bytes");
}

/// A 64-bit guest that prints `[AA\n` with a cluster of OUTs, then increments the
/// immediate of the `mov al, 'A'` inside that cluster, three times over: the right
/// output is `[AA\n[BB\n[CC\n`.
fn self_modifying_guest() -> Vec<u8> {
    #[rustfmt::skip]
    let code: Vec<u8> = vec![
        0x48, 0xc7, 0xc4, 0x00, 0x00, 0x18, 0x00, //  0: mov rsp, 0x180000
        0xb9, 0x03, 0x00, 0x00, 0x00,             //  7: mov ecx, 3
        0xe8, 0x11, 0x00, 0x00, 0x00,             // 12: call print (34)
        0xfe, 0x05, 0x13, 0x00, 0x00, 0x00,       // 17: inc byte [rip + 19] (42)
        0xff, 0xc9,                               // 23: dec ecx
        0x75, 0xf1,                               // 25: jnz 12
        0x31, 0xc0,                               // 27: xor eax, eax
        0xe6, 0xf4,                               // 29: out 0xf4, al
        0xf4,                                     // 31: hlt
        0xeb, 0xfd,                               // 32: jmp 31
        0x66, 0xba, 0xf8, 0x03,                   // 34: print: mov dx, 0x3f8
        0xb0, b'[',                               // 38: mov al, '['
        0xee,                                     // 40: out dx, al
        0xb0, b'A',                               // 41: mov al, 'A' (patched)
        0xee,                                     // 43: out dx, al
        0xee,                                     // 44: out dx, al
        0xb0, b'\n',                              // 45: mov al, '\n'
        0xee,                                     // 47: out dx, al
        0xc3,                                     // 48: ret
    ];
    elf64_at_1mib(&code)
}

/// A static ELF64 with `code` as one RWX segment at 1 MiB, entered at its start.
fn elf64_at_1mib(code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 0x1000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELF64
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    elf[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    elf[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    elf[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // memsz
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(code);
    elf
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_guest_writing_over_its_clustered_code_prints_the_right_result() {
    let dir = scratch("smc");
    let elf = dir.join("smc.elf");
    std::fs::write(&elf, self_modifying_guest()).unwrap();
    let pre = dir.join("smc.pre.elf");
    link(&elf, &pre);
    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = pre.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&pre, "aot+dynamic")),
    ];
    let r = parallel(jobs);
    let (off, aot) = (&r[0], &r[1]);
    assert_eq!(String::from_utf8_lossy(&off.console), "[AA\n[BB\n[CC\n");
    assert_eq!(String::from_utf8_lossy(&aot.console), "[AA\n[BB\n[CC\n");
    assert!(
        aot.record["translations_loaded"].as_u64().unwrap() >= 1,
        "the AOT pass clustered the OUTs"
    );
    assert!(
        aot.record["clusters_run"].as_u64().unwrap() >= 1,
        "the cluster ran before the write"
    );
    assert!(
        aot.record["backend_stats"]["code_page_writes"]
            .as_u64()
            .unwrap()
            >= 1,
        "the hypervisor saw the write to the write-protected code page: {}",
        aot.record
    );
}

/// `avex run --backend bochs` for a guest the hypervisor must stop: it fails, and
/// its error carries the hypervisor's diagnosis.
fn run_bochs_failing(image: &Path) -> String {
    let out = avex()
        .args([
            "run",
            "--backend",
            "bochs",
            "--mode",
            "off",
            "--timeout",
            "120",
        ])
        .arg(image)
        .output()
        .expect("run avex");
    assert!(
        !out.status.success(),
        "{} should have been stopped",
        image.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn guest_misbehaviour_stops_the_guest_with_a_diagnosis() {
    let dir = scratch("misbehave");
    // A write far outside the guest's 16 MiB of RAM (inside its identity map).
    #[rustfmt::skip]
    let wild_write = elf64_at_1mib(&[
        0xb8, 0x00, 0x00, 0x00, 0x40,             // mov eax, 0x40000000
        0xc6, 0x00, 0x2a,                         // mov byte [rax], 42
        0xf4,                                     // hlt
    ]);
    // An exception with no IDT: #UD, then #GP delivering it, then a triple fault.
    let triple = elf64_at_1mib(&[0x0f, 0x0b, 0xf4]); // ud2; hlt
    let (a, b) = (dir.join("wild.elf"), dir.join("triple.elf"));
    std::fs::write(&a, wild_write).unwrap();
    std::fs::write(&b, triple).unwrap();
    let jobs: Vec<Job<String>> = vec![
        Box::new(move || run_bochs_failing(&a)),
        Box::new(move || run_bochs_failing(&b)),
    ];
    let r = parallel(jobs);
    assert!(
        r[0].contains("EPT violation") && r[0].contains("0x40000000"),
        "{}",
        r[0]
    );
    assert!(r[0].contains("write"), "{}", r[0]);
    assert!(r[1].contains("triple fault"), "{}", r[1]);
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn avex_image_writes_a_bootable_iso() {
    let dir = scratch("image");
    let iso = dir.join("boot.iso");
    let out = avex()
        .args(["image", "console", "--mode", "aot+dynamic", "-o"])
        .arg(&iso)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&iso).unwrap();
    // ISO 9660 primary volume descriptor at sector 16, and GRUB's El Torito boot record.
    assert_eq!(&bytes[0x8001..0x8006], b"CD001");
    assert!(bytes.windows(8).any(|w| w == b"EL TORITO"[..8].as_ref()));
}

/// A static ELF32 with `code` as one RWX segment at 1 MiB (entered in 32-bit
/// protected mode with paging off, by the boot ABI's multiboot convention).
fn elf32_at_1mib(code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 0x1000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 1; // ELF32
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&3u16.to_le_bytes()); // i386
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..28].copy_from_slice(&0x10_0000u32.to_le_bytes()); // entry
    elf[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
    elf[40..42].copy_from_slice(&52u16.to_le_bytes());
    elf[42..44].copy_from_slice(&32u16.to_le_bytes());
    elf[44..46].copy_from_slice(&1u16.to_le_bytes());
    elf[46..48].copy_from_slice(&40u16.to_le_bytes());
    let ph = 52;
    for (i, v) in [
        1u32,
        0x1000,
        0x10_0000,
        0x10_0000,
        code.len() as u32,
        0x1000,
        7,
        0x1000,
    ]
    .into_iter()
    .enumerate()
    {
        elf[ph + 4 * i..ph + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_32_bit_guest_runs_in_protected_mode_under_unrestricted_guest() {
    let dir = scratch("elf32");
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'3', 0xee,       // mov al, '3'; out dx, al
        0xb0, b'2', 0xee,       // mov al, '2'; out dx, al
        0x31, 0xc0, 0x0f, 0xa2, // xor eax, eax; cpuid
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'\n', 0xee,      // mov al, '\n'; out dx, al
        0x31, 0xc0, 0xe6, 0xf4, // xor eax, eax; out 0xf4, al
        0xf4,                   // hlt
    ];
    let elf = dir.join("g32.elf");
    std::fs::write(&elf, elf32_at_1mib(&code)).unwrap();
    let pre = dir.join("g32.pre.elf");
    link(&elf, &pre);
    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = pre.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&pre, "aot+dynamic")),
    ];
    let r = parallel(jobs);
    assert_eq!(String::from_utf8_lossy(&r[0].console), "32\n");
    assert_eq!(r[1].console, r[0].console);
    assert_eq!(r[0].record["exits_by_reason"]["cpuid"], 1);
    assert!(
        r[1].exits() < r[0].exits(),
        "{} vs {}",
        r[1].exits(),
        r[0].exits()
    );
}

/// A 64-bit guest that takes timer interrupts: it programs the PIC (IRQ0 at vector
/// 0x20, others masked) and PIT channel 0 (mode 2, about 1 ms), then waits with
/// `sti; hlt` until its handler has counted 5 ticks, and prints `K`.
fn interrupt_guest() -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const HANDLER: u64 = BASE + 75;
    #[rustfmt::skip]
    let code: [u8; 90] = [
        0x48, 0xc7, 0xc4, 0x00, 0x00, 0x18, 0x00,       //  0: mov rsp, 0x180000
        0x0f, 0x01, 0x1c, 0x25, 0x10, 0x04, 0x10, 0x00, //  7: lidt [0x100410]
        0xb0, 0x11, 0xe6, 0x20,                         // 15: PIC ICW1
        0xb0, 0x20, 0xe6, 0x21,                         // 19: ICW2: vectors 0x20..
        0xb0, 0x04, 0xe6, 0x21,                         // 23: ICW3
        0xb0, 0x01, 0xe6, 0x21,                         // 27: ICW4
        0xb0, 0xfe, 0xe6, 0x21,                         // 31: mask all but IRQ0
        0xb0, 0x34, 0xe6, 0x43,                         // 35: PIT ch0, lo/hi, mode 2
        0xb0, 0xa9, 0xe6, 0x40,                         // 39: count 0x04a9 (1 ms)
        0xb0, 0x04, 0xe6, 0x40,                         // 43
        0xfb,                                           // 47: wait: sti
        0xf4,                                           // 48: hlt
        0x83, 0x3c, 0x25, 0x00, 0x04, 0x10, 0x00, 0x05, // 49: cmp dword [0x100400], 5
        0x72, 0xf4,                                     // 57: jb wait
        0xfa,                                           // 59: cli
        0x66, 0xba, 0xf8, 0x03,                         // 60: mov dx, 0x3f8
        0xb0, b'K', 0xee,                               // 64: out 'K'
        0xb0, b'\n', 0xee,                              // 67: out '\n'
        0x31, 0xc0, 0xe6, 0xf4,                         // 70: exit 0
        0xf4,                                           // 74: hlt
        0x50,                                           // 75: handler: push rax
        0xff, 0x04, 0x25, 0x00, 0x04, 0x10, 0x00,       // 76: inc dword [0x100400]
        0xb0, 0x20, 0xe6, 0x20,                         // 83: EOI
        0x58,                                           // 87: pop rax
        0x48, 0xcf,                                     // 88: iretq
    ];
    let mut seg = vec![0u8; 0x420];
    seg[..code.len()].copy_from_slice(&code);
    // IDT at BASE + 0x100; the gate for vector 0x20 (64-bit interrupt gate, CS 0x08).
    let gate =
        (HANDLER & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((HANDLER >> 16) & 0xffff) << 48);
    let at = 0x100 + 0x20 * 16;
    seg[at..at + 8].copy_from_slice(&gate.to_le_bytes());
    seg[at + 8..at + 16].copy_from_slice(&(HANDLER >> 32).to_le_bytes());
    // IDTR at BASE + 0x410.
    seg[0x410..0x412].copy_from_slice(&(0x21u16 * 16 - 1).to_le_bytes());
    seg[0x412..0x41a].copy_from_slice(&(BASE + 0x100).to_le_bytes());
    elf64_at_1mib(&seg)
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_guest_waiting_in_hlt_gets_its_timer_interrupts() {
    let dir = scratch("irq");
    let elf = dir.join("irq.elf");
    std::fs::write(&elf, interrupt_guest()).unwrap();
    let pre = dir.join("irq.pre.elf");
    link(&elf, &pre);
    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = pre.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&pre, "aot+dynamic")),
    ];
    let r = parallel(jobs);
    for run in &r {
        assert_eq!(
            String::from_utf8_lossy(&run.console),
            "K\n",
            "{}",
            run.record
        );
        assert_eq!(
            run.record["backend_stats"]["interrupts"], 5,
            "{}",
            run.record
        );
        assert!(run.record["exits_by_reason"]["hlt"].as_u64().unwrap() >= 1);
    }
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_fault_in_the_hypervisor_itself_is_diagnosed_by_its_exception_stubs() {
    let dir = scratch("selftest");
    let elf = dir.join("smc.elf");
    std::fs::write(&elf, self_modifying_guest()).unwrap();
    let out = avex()
        .args([
            "run",
            "--backend",
            "bochs",
            "--mode",
            "off",
            "--timeout",
            "120",
        ])
        .arg(&elf)
        .env("AVEX_VMX_OPTIONS", "selftest=ud2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hypervisor exception 6 (invalid opcode)"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn string_port_io_is_completed_by_the_hypervisor() {
    let dir = scratch("stringio");
    #[rustfmt::skip]
    let mut code = vec![
        0x48, 0x8d, 0x35, 0x39, 0x00, 0x00, 0x00, //  0: lea rsi, [rip + msg]
        0xb9, 0x06, 0x00, 0x00, 0x00,             //  7: mov ecx, 6
        0x66, 0xba, 0xf8, 0x03,                   // 12: mov dx, 0x3f8
        0xf3, 0x6e,                               // 16: rep outsb
        0x48, 0x8d, 0x3d, 0x37, 0x00, 0x00, 0x00, // 18: lea rdi, [rip + buf]
        0xb9, 0x02, 0x00, 0x00, 0x00,             // 25: mov ecx, 2
        0x66, 0xba, 0xfd, 0x03,                   // 30: mov dx, 0x3fd (LSR)
        0xf3, 0x6c,                               // 34: rep insb
        0x48, 0x8d, 0x35, 0x25, 0x00, 0x00, 0x00, // 36: lea rsi, [rip + buf]
        0xb9, 0x02, 0x00, 0x00, 0x00,             // 43: mov ecx, 2
        0x66, 0xba, 0xf8, 0x03,                   // 48: mov dx, 0x3f8
        0xf3, 0x6e,                               // 52: rep outsb
        0xb0, b'\n', 0xee,                        // 54: out '\n'
        0x31, 0xc0, 0xe6, 0xf4,                   // 57: exit 0
        0xf4,                                     // 61: hlt
    ];
    code.resize(96, 0);
    code[64..70].copy_from_slice(b"hello\n"); // msg; buf at 80
    let elf = dir.join("sio.elf");
    std::fs::write(&elf, elf64_at_1mib(&code)).unwrap();
    let pre = dir.join("sio.pre.elf");
    link(&elf, &pre);
    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = pre.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&pre, "aot+dynamic")),
    ];
    let r = parallel(jobs);
    // The LSR reads back THR-empty | transmitter-empty (0x60, a backquote) twice.
    assert_eq!(String::from_utf8_lossy(&r[0].console), "hello\n``\n");
    assert_eq!(r[1].console, r[0].console);
    assert_eq!(r[0].record["exits_by_reason"]["outs"], 2, "{}", r[0].record);
    assert_eq!(r[0].record["exits_by_reason"]["ins"], 1, "{}", r[0].record);
}

/// Every clustering mode.
const MODES: [&str; 4] = ["off", "dynamic", "aot", "aot+dynamic"];

/// A run, or why `avex` failed.
type Tried = Result<Run, String>;

/// Build shape guest `name`, pre-analyze it with `avex link`, and run it in each of
/// `modes`: the runs in `modes` order.
fn shape_runs(name: &str, modes: &[&'static str]) -> Vec<Tried> {
    let pre = scratch(name).join(format!("{name}.pre.elf"));
    link(&support::shapes::build(name), &pre);
    runs_in_modes(&pre, modes)
}

/// Run `image` in each of `modes` (two runs at a time): the runs in `modes` order.
fn runs_in_modes(image: &Path, modes: &[&'static str]) -> Vec<Tried> {
    let jobs: Vec<Job<Tried>> = modes
        .iter()
        .map(|&mode| {
            let image = image.to_path_buf();
            Box::new(move || try_run_bochs(&image, mode)) as Job<_>
        })
        .collect();
    parallel(jobs)
}

/// How each mode's run of a guest differs from mode `off`'s (console bytes and
/// status), one line per difference; `runs[0]` is `off`'s.
fn differences_from_off(name: &str, modes: &[&str], runs: &[Tried]) -> Vec<String> {
    let mut diffs = Vec::new();
    let off = match &runs[0] {
        Ok(r) => r,
        Err(e) => return vec![format!("{name} in off: {e}")],
    };
    for (mode, run) in modes.iter().zip(runs).skip(1) {
        match run {
            Err(e) => diffs.push(format!("{name} in {mode}: {e}")),
            Ok(r) if r.console != off.console || r.record["status"] != off.record["status"] => {
                diffs.push(format!(
                    "{name}: {mode} differs from off (status {} vs {}):\n--- off\n{}\n--- {mode}\n{}",
                    r.record["status"],
                    off.record["status"],
                    String::from_utf8_lossy(&off.console),
                    String::from_utf8_lossy(&r.console)
                ))
            }
            Ok(_) => {}
        }
    }
    diffs
}

/// Run shape `name` in every mode: every mode prints what `off` prints, with status
/// 0, and `off`'s console is `expected` (what the CPU does).
fn shape_prints_in_every_mode(name: &str, expected: &str) {
    let runs = shape_runs(name, &MODES);
    let diffs = differences_from_off(name, &MODES, &runs);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let off = runs[0].as_ref().unwrap();
    assert_eq!(off.record["status"], 0, "{}", off.record);
    assert_eq!(String::from_utf8_lossy(&off.console), expected);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn the_virtual_cpu_refuses_unknown_msrs_and_describes_itself_in_cpuid() {
    let sig = |s: &[u8]| u64::from(u32::from_le_bytes(s.try_into().unwrap()));
    let mut want = String::new();
    for (n, v) in [
        ("wrmsr_gp", 1),
        ("rdmsr_gp", 1),
        ("vmx", 0),
        ("x2apic", 0),
        ("tsc_deadline", 0),
        ("xsave", 0),
        ("hypervisor", 1),
        ("apic", 0),
        ("hv_max", 0x4000_0000),
        ("hv_sig", (sig(b"avex") << 32) | sig(b"avex")),
        ("hv_sig_hi", sig(b"avex")),
        ("tsc_ratio", (1 << 32) | 1),
        // Bochs' TSC counts instructions at the configured rate (src/bochs.rs).
        ("crystal_hz", 10_000_000),
    ] {
        want += &line(n, v);
    }
    shape_prints_in_every_mode("vmx_cpu_model", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn the_guests_x87_and_sse_state_survives_every_exit_in_every_mode() {
    let mut want = String::new();
    want += &line("xmm_qwords_kept", 32);
    want += &line("mxcsr", 0x1f80 | (3 << 13));
    want += &line("st0_one", 1.0f64.to_bits());
    want += &line("st1_pi", std::f64::consts::PI.to_bits());
    shape_prints_in_every_mode("vmx_fpu_sse_across_exits", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn gs_relative_rip_relative_access_after_rdtsc_in_every_mode() {
    let mut want = String::new();
    for i in 1..=5 {
        want += &line("seen", i);
    }
    want += &line("target", 5);
    want += &line("decoy", 0);
    shape_prints_in_every_mode("vmx_gs_rip_relative", &want);
}

/// `report(name, v)`'s line in a shape's console.
fn line(name: &str, v: u64) -> String {
    format!("{name}={v:#018x}\r\n")
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn addr32_string_io_zero_extends_rsi_rdi_rcx_in_every_mode() {
    // The message goes out raw (no "\r" added).
    let mut want = String::from("addr32 rep outsb\n");
    for (n, v) in [
        ("rsi_hi", 0),
        ("rsi_moved", 17),
        ("rcx", 0),
        ("rdi_hi", 0),
        ("rdi_moved", 2),
        ("rcx", 0),
        // The LSR reads THR-empty | transmitter-empty twice.
        ("lsr", 0x6060),
        ("rsi_hi", 0),
        ("rsi_moved", 1),
    ] {
        want += &line(n, v);
    }
    shape_prints_in_every_mode("vmx_string_io_addr32", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn cr8_written_in_a_cluster_is_the_cr8_native_code_reads() {
    let mut want = String::new();
    for i in 1..=6 {
        want += &line("in_cluster", i);
        want += &line("native", i);
        want += &line("after_native", 7 - i);
    }
    want += &line("ticks", 12);
    shape_prints_in_every_mode("vmx_cr8_in_cluster", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn wrmsr_of_a_non_canonical_address_raises_gp_in_every_mode() {
    let mut want = String::new();
    for msr in [
        msr::FS_BASE,
        msr::GS_BASE,
        msr::KERNEL_GS_BASE,
        msr::LSTAR,
        msr::SYSENTER_ESP,
        msr::SYSENTER_EIP,
    ] {
        want += &line("msr", msr.into());
        want += &line("gp", 1);
        want += &line("kept", 1);
    }
    want += &line("gp_total", 6);
    shape_prints_in_every_mode("vmx_wrmsr_noncanonical", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn mov_to_cr3_above_maxphyaddr_raises_gp_in_every_mode() {
    let mut want = String::new();
    for _ in 0..3 {
        want += &line("cr3_above_maxphyaddr_gp", 1);
        want += &line("cr3_kept", 1);
    }
    want += &line("gp_total", 3);
    shape_prints_in_every_mode("vmx_cr3_write_gp", &want);
}

/// Passes once the engine checks CR4 writes against the vCPU's CPUID (the engine
/// branch's CR-write checks): the VT-x backend completes MOV to CR4 through the
/// engine, so it raises the engine's #GP.
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn mov_to_cr4_with_unsupported_bits_raises_gp_in_every_mode() {
    let mut want = String::new();
    for n in ["cr4_vmxe_gp", "cr4_kept", "cr4_bit15_gp", "cr4_kept"] {
        want += &line(n, 1);
    }
    want += &line("gp_total", 2);
    shape_prints_in_every_mode("vmx_cr4_write_gp", &want);
}

/// With VPID the guest's TLB entries survive VM exits and entries: an INVLPG the
/// engine runs and a MOV CR3 the hypervisor completes must flush them (INVVPID).
/// Bochs flushes its TLB at every VM entry and exit whatever VPID says (the host's
/// CR3/CR4 loads), so here this guards the output rather than catching the miss.
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn pages_remapped_and_flushed_by_the_engine_read_right_in_every_mode() {
    shape_prints_in_every_mode("vmx_tlb_flush", "YYXXYYXXYYXXYYXX\r\n");
}

/// Assembles and links a 32-bit guest written in assembly (`source`) at 1 MiB, as
/// the boot ABI loads ELF32 guests; returns the ELF's path in `dir`.
fn assemble32(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    std::fs::write(&src, source).unwrap();
    let elf = dir.join(format!("{name}.elf"));
    let o = Command::new("gcc")
        .args(["-m32", "-nostdlib", "-static", "-no-pie"])
        .args([
            "-Wl,-Ttext-segment=0x100000",
            "-Wl,--build-id=none",
            "-Wl,-n",
        ])
        .args(["-Wl,--no-warn-rwx-segments", "-Wl,-e,_start", "-o"])
        .arg(&elf)
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    elf
}

/// A 32-bit guest that turns on PAE paging and reads through it (see its source).
const PAE_GUEST: &str = include_str!("shapes/vmx_pae32.S");

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_32_bit_pae_guest_runs_with_the_pdptes_of_its_last_cr3_write() {
    let dir = scratch("pae");
    let elf = assemble32(&dir, "pae", PAE_GUEST);
    let pre = dir.join("pae.pre.elf");
    link(&elf, &pre);
    let runs = runs_in_modes(&pre, &MODES);
    let diffs = differences_from_off("pae", &MODES, &runs);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let off = runs[0].as_ref().unwrap();
    assert_eq!(String::from_utf8_lossy(&off.console), "pae:ABAB\n");
    assert_eq!(off.record["status"], 0);
}

/// A 32-bit guest that prints a line, then halts with interrupts off.
const HALT_GUEST: &str = include_str!("shapes/vmx_halt.S");

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn hlt_with_interrupts_off_ends_the_run_with_status_0_halted() {
    let dir = scratch("halt");
    let elf = assemble32(&dir, "halt", HALT_GUEST);
    let r = try_run_bochs(&elf, "off").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(String::from_utf8_lossy(&r.console), "halting\n");
    assert_eq!(r.record["status"], 0, "{}", r.record);
    assert_eq!(r.record["backend_stats"]["halted"], 1, "{}", r.record);
}

/// Every shape guest (tests/shapes, whoever added it), pre-analyzed with `avex
/// link`, prints the same console bytes with the same status in every clustering
/// mode as in `off`. Shapes that need a fix from another branch fail here until it
/// is merged, as their own tests do.
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn every_shape_prints_the_same_bytes_in_every_mode() {
    let names = support::shapes::all();
    assert!(!names.is_empty());
    let dir = scratch("shapes");
    let mut jobs: Vec<Job<(String, usize, Tried)>> = Vec::new();
    for name in &names {
        let pre = dir.join(format!("{name}.pre.elf"));
        link(&support::shapes::build(name), &pre);
        for (k, &mode) in MODES.iter().enumerate() {
            let (pre, name) = (pre.clone(), name.clone());
            jobs.push(Box::new(move || (name, k, try_run_bochs(&pre, mode))));
        }
    }
    let mut results = parallel(jobs);
    let mut failures = Vec::new();
    for name in &names {
        let mut runs: Vec<(usize, Tried)> = Vec::new();
        results.retain_mut(|(n, k, r)| {
            if n == name {
                runs.push((*k, std::mem::replace(r, Err(String::new()))));
                false
            } else {
                true
            }
        });
        runs.sort_by_key(|(k, _)| *k);
        let runs: Vec<Tried> = runs.into_iter().map(|(_, r)| r).collect();
        failures.extend(differences_from_off(name, &MODES, &runs));
        if let Ok(off) = &runs[0] {
            eprintln!(
                "{name:<28} status {} exits {}",
                off.record["status"],
                MODES
                    .iter()
                    .zip(&runs)
                    .map(|(m, r)| format!(
                        "{m} {}",
                        r.as_ref().map_or("-".into(), |r| r.exits().to_string())
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The distance between exits from Bochs' TSC (which counts instructions): a guest
/// whose four gaps are 0, 5, 201 and 1 instructions reads exactly those in `off`;
/// in `aot+dynamic` the histogram is still one gap per exit after the first.
#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn exit_distance_counts_guest_instructions_from_the_tsc() {
    let dir = scratch("distance");
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0x80, 0x00,       // mov dx, 0x80
        0xee, 0xee,                   // out dx, al ; out dx, al: gap 0
        0x90, 0x90, 0x90, 0x90, 0x90, // 5 NOPs
        0xee,                         // out: gap 5
        0xb9, 100, 0, 0, 0,           // mov ecx, 100
        0xff, 0xc9, 0x75, 0xfc,       // 1: dec ecx ; jnz 1b
        0xee,                         // out: gap 1 + 200
        0x31, 0xc0, 0xe6, 0xf4,       // xor eax, eax ; out 0xf4, al: gap 1
        0xf4,                         // hlt
    ];
    let elf = dir.join("gaps.elf");
    std::fs::write(&elf, elf64_at_1mib(&code)).unwrap();
    let pre = dir.join("gaps.pre.elf");
    link(&elf, &pre);
    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = pre.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&pre, "aot+dynamic")),
    ];
    let runs = parallel(jobs);
    for r in &runs {
        let d = &r.record["exit_distance"];
        assert_eq!(d["source"], "bochs_tsc", "{}", r.record);
        let buckets: Vec<u64> = serde_json::from_value(d["log2_buckets"].clone()).unwrap();
        let gaps = d["gaps"].as_u64().unwrap();
        assert_eq!(buckets.iter().sum::<u64>(), gaps);
        assert_eq!(gaps, r.record["handled_exits"].as_u64().unwrap() - 1);
        assert_eq!(d["clamped"], 0, "{d}");
    }
    let off = &runs[0].record["exit_distance"];
    // Gaps 0, 5, 201, 1: buckets 0, 3 (4..=7), 8 (128..=255) and 1.
    assert_eq!(
        off["log2_buckets"],
        serde_json::json!([1, 1, 0, 1, 0, 0, 0, 0, 1])
    );
    assert_eq!(off["guest_insns"], 207);
}
