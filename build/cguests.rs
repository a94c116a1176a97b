//! Builds the C guests (guest-kernels/c/) with gcc: freestanding, general-purpose
//! registers only (KVM's emulator here cannot run SSE; PLATFORM.md), linked with
//! the Rust guests' linker script at 1 MiB. Each guest is its own sources plus the
//! runtime (start.S, printk, string functions, the 8250 console), compiled as
//! separate translation units as a kernel is, so calls between them stay calls.
//!
//! Without gcc the C guests are not built: outside CI that is a warning and avex
//! offers only the Rust guests (`AVEX_C_GUESTS_MISSING` says why); under CI
//! (`tools::required()`) it fails the build.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{freestanding, tools};

/// One C guest: its name, gcc's optimisation level and its own sources (paths
/// under guest-kernels/c/), linked after [`RUNTIME`].
pub struct CGuest {
    pub name: &'static str,
    pub opt: &'static str,
    pub sources: &'static [&'static str],
    /// gcc flags this guest adds to [`CFLAGS`].
    pub flags: &'static [&'static str],
}

/// The C guests, in the order `src/guests.rs` lists them.
pub const C_GUESTS: [CGuest; 5] = [
    CGuest {
        name: "c8250",
        opt: "-O2",
        sources: &["c8250.c"],
        flags: &[],
    },
    CGuest {
        name: "c8250-os",
        opt: "-Os",
        sources: &["c8250.c"],
        flags: &[],
    },
    // As a distribution kernel runs: every indirect call through a retpoline,
    // every return through a return thunk.
    CGuest {
        name: "c8250-retpoline",
        opt: "-O2",
        sources: &["c8250.c", "lib/thunks.S"],
        flags: &[
            "-mindirect-branch=thunk-extern",
            "-mfunction-return=thunk-extern",
            "-mindirect-branch-register",
        ],
    },
    CGuest {
        name: "cpci",
        opt: "-O2",
        sources: &["cpci.c", "drivers/pci_direct.c", "drivers/pci_access.c"],
        flags: &[],
    },
    CGuest {
        name: "crtc",
        opt: "-O2",
        sources: &["crtc.c", "drivers/rtc_cmos.c", "drivers/mc146818.c"],
        flags: &[],
    },
];

/// What every C guest links: the entry stub, start_kernel, printk and the 8250
/// console driver.
const RUNTIME: [&str; 7] = [
    "lib/start.S",
    "lib/init.c",
    "lib/printk.c",
    "lib/string.c",
    "drivers/serial_core.c",
    "drivers/8250_port.c",
    "drivers/8250_core.c",
];

/// gcc's flags besides the optimisation level: a freestanding static image with
/// no SSE/x87 (`-mgeneral-regs-only`), no PIC, no stack protector, no red zone
/// (as a kernel), no unwind tables and no CET end-branch markers.
const CFLAGS: [&str; 18] = [
    "-std=gnu11",
    "-ffreestanding",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Wno-sign-compare",
    "-Iinclude",
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-n,--no-warn-rwx-segments",
];

/// Build every C guest into `out/<name>`. Returns why they were not built, or an
/// empty string if they were; the files exist (empty) either way, so that
/// `include_bytes!` finds them.
pub fn build(root: &Path, out: &Path) -> String {
    let dir = root.join("guest-kernels/c");
    let script = root.join("guest-kernels/guest.ld");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed={}", script.display());

    if !tools::on_path("gcc") {
        let why = "gcc was not found when avex was built";
        if tools::required() {
            panic!(
                "{why}: the C guests (guest-kernels/c/) need it (CI=true or AVEX_REQUIRE_TOOLS)"
            );
        }
        println!(
            "cargo:warning=the C guests ({}) are not built: {why}; install gcc to build them",
            C_GUESTS.map(|g| g.name).join(", ")
        );
        for g in &C_GUESTS {
            freestanding::write_if_changed(&out.join(g.name), &[]);
        }
        return why.to_string();
    }

    let work = freestanding::target_dir("c-guests");
    std::fs::create_dir_all(&work).expect("create the C guests' build directory");
    // All guests at once: each gcc runs its own compilers and linker.
    let jobs: Vec<_> = C_GUESTS
        .iter()
        .map(|g| {
            let elf = work.join(g.name);
            let child = Command::new("gcc")
                .current_dir(&dir)
                .arg(g.opt)
                .args(CFLAGS)
                .args(g.flags)
                .arg(format!("-T{}", script.display()))
                .arg("-o")
                .arg(&elf)
                .args(RUNTIME)
                .args(g.sources)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run gcc for the C guest {}: {e}", g.name));
            (g, elf, child)
        })
        .collect();
    for (g, elf, child) in jobs {
        let o = child.wait_with_output().expect("wait for gcc");
        let stderr = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() {
            panic!(
                "gcc failed on the C guest {} ({}):\n{stderr}",
                g.name, o.status
            );
        }
        for line in stderr.lines().filter(|l| l.contains("warning")) {
            println!("cargo:warning=[c guest {}] {line}", g.name);
        }
        let bytes = std::fs::read(&elf).unwrap_or_else(|e| panic!("read {}: {e}", elf.display()));
        freestanding::write_if_changed(&out.join(g.name), &bytes);
    }
    String::new()
}
