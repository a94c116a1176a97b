//! Which tools and devices the end-to-end tests can reach, as `cfg`s for the
//! tests of this package:
//!
//! | cfg | what it needs |
//! |---|---|
//! | `avex_kvm` | `/dev/kvm` that opens read-write |
//! | `avex_bochs` | `bochs` with its BIOS, `grub-mkrescue`, `xorriso`, `mformat` |
//! | `avex_qemu` | `qemu-system-x86_64` |
//! | `avex_gcc` | `gcc` that builds 32- and 64-bit code, and `objdump` |
//!
//! A test that needs one is marked
//! `#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]`, so where the tool is
//! missing cargo reports it as ignored (a skip), never as passed. Under CI (`CI`
//! set to `true`, as `.ci/run` runs) or with `AVEX_REQUIRE_TOOLS=1`, every cfg is
//! set whatever is found: a missing tool then fails its tests instead of
//! skipping them.

use std::path::Path;
use std::process::Command;

const CFGS: [&str; 4] = ["avex_kvm", "avex_bochs", "avex_qemu", "avex_gcc"];

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            let p = d.join(tool);
            // Rerun when the tool appears or goes.
            println!("cargo:rerun-if-changed={}", d.display());
            p.is_file()
        })
    })
}

fn kvm() -> bool {
    println!("cargo:rerun-if-changed=/dev/kvm");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn bochs() -> bool {
    println!("cargo:rerun-if-changed=/usr/share/bochs");
    on_path("bochs")
        && Path::new("/usr/share/bochs/BIOS-bochs-latest").is_file()
        && on_path("grub-mkrescue")
        && on_path("xorriso")
        && on_path("mformat")
}

fn gcc() -> bool {
    if !(on_path("gcc") && on_path("objdump")) {
        return false;
    }
    // 32-bit test ELFs need gcc-multilib.
    let dir = std::env::var_os("OUT_DIR").expect("OUT_DIR");
    let src = Path::new(&dir).join("probe32.c");
    let obj = Path::new(&dir).join("probe32.o");
    std::fs::write(&src, "int f(int x) { return x + 1; }\n").is_ok()
        && Command::new("gcc")
            .args(["-m32", "-c", "-o"])
            .arg(&obj)
            .arg(&src)
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Under CI (`CI=true`) or with `AVEX_REQUIRE_TOOLS` set (not `0`), a missing
/// tool is an error, never a skip.
pub fn required() -> bool {
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=AVEX_REQUIRE_TOOLS");
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var_os("AVEX_REQUIRE_TOOLS").is_some_and(|v| v != "0")
}

pub fn detect() {
    println!("cargo::rustc-check-cfg=cfg({})", CFGS.join(", "));
    let required = required();
    let found = [kvm(), bochs(), on_path("qemu-system-x86_64"), gcc()];
    for (cfg, found) in CFGS.into_iter().zip(found) {
        if found || required {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
}
