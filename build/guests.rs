//! Builds the guest kernels (guest-kernels/, its own cargo workspace) in one nested
//! cargo invocation through `freestanding`, copies the ELFs to `$OUT_DIR/guests/`
//! and tells the hosted crate where they are (`AVEX_GUEST_DIR`). Reruns only when
//! guest-kernels/ changes. The C guests (guest-kernels/c/) are built with gcc by
//! `cguests` into the same directory.
//!
//! Besides the guests it builds `mbloader`, a multiboot1 trampoline implementing
//! the guest boot ABI so a guest can be hand-checked under QEMU TCG
//! (`-kernel mbloader.bin -initrd <guest>`); it is written out as the flat binary
//! `mbloader.bin` that QEMU's `-kernel` accepts.

use std::path::PathBuf;

use crate::{cguests, freestanding};

/// The bundled Rust guests, in the order `src/guests.rs` lists them (the C guests,
/// listed after them, are `cguests::C_GUESTS`).
pub const GUESTS: [&str; 6] = ["console", "pci", "rtc", "pit", "cpuid", "ctxswitch"];

/// SSE off for every guest: KVM's instruction emulator here stops on SSE
/// instructions (PLATFORM.md). With fat LTO this also recompiles the parts of
/// `core` the guests use, so no prebuilt SSE code is linked in.
const GUEST_RUSTFLAGS: [&str; 2] = ["-C", "target-feature=-sse,-sse2"];

pub fn build() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("guests");
    let dir = root.join("guest-kernels");
    let target = freestanding::target_dir("guest-kernels");

    let mut bins: Vec<&str> = GUESTS.to_vec();
    bins.push("mbloader");
    // The linker scripts are per binary, set by guest-kernels/build.rs.
    let elfs = freestanding::build(&freestanding::Build {
        manifest_dir: &dir,
        target_dir: &target,
        linker_script: None,
        extra_rustflags: &GUEST_RUSTFLAGS,
        bins: &bins,
        offline: true,
    });

    std::fs::create_dir_all(&out).expect("create $OUT_DIR/guests");
    for (name, elf) in bins.iter().zip(&elfs) {
        if *name == "mbloader" {
            let (_, flat) = freestanding::flat_binary(elf).unwrap_or_else(|e| panic!("{e}"));
            freestanding::write_if_changed(&out.join("mbloader.bin"), &flat);
        } else {
            let bytes =
                std::fs::read(elf).unwrap_or_else(|e| panic!("read {}: {e}", elf.display()));
            freestanding::write_if_changed(&out.join(name), &bytes);
        }
    }
    let c_missing = cguests::build(&root, &out);
    println!("cargo:rustc-env=AVEX_GUEST_DIR={}", out.display());
    println!("cargo:rustc-env=AVEX_C_GUESTS_MISSING={c_missing}");
}
