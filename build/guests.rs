//! Builds the guest kernels (guest-kernels/, its own cargo workspace) in one nested
//! cargo invocation through `freestanding`, copies the ELFs to `$OUT_DIR/guests/`
//! and tells the hosted crate where they are (`AVEX_GUEST_DIR`). Reruns only when
//! guest-kernels/ changes.
//!
//! Besides the guests it builds `mbloader`, a multiboot1 trampoline implementing
//! the guest boot ABI so a guest can be hand-checked under QEMU TCG
//! (`-kernel mbloader.bin -initrd <guest>`); it is written out as the flat binary
//! `mbloader.bin` that QEMU's `-kernel` accepts.

use std::path::{Path, PathBuf};

use crate::freestanding;

/// The bundled guests, in the order `src/guests.rs` lists them.
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
            let flat = flat_binary(elf);
            write_if_changed(&out.join("mbloader.bin"), &flat);
        } else {
            let bytes =
                std::fs::read(elf).unwrap_or_else(|e| panic!("read {}: {e}", elf.display()));
            write_if_changed(&out.join(name), &bytes);
        }
    }
    println!("cargo:rustc-env=AVEX_GUEST_DIR={}", out.display());
}

/// Write only when the content differs, so an unchanged guest does not make cargo
/// recompile the crates that `include_bytes!` it.
fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `objcopy -O binary` for a static ELF64: the PT_LOAD segments' file bytes laid
/// out from the lowest physical address (bss is not included; the multiboot
/// header's `bss_end_addr` tells the loader to zero it).
fn flat_binary(elf: &Path) -> Vec<u8> {
    let f = std::fs::read(elf).unwrap_or_else(|e| panic!("read {}: {e}", elf.display()));
    let u16_at = |o: usize| u16::from_le_bytes([f[o], f[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
    assert!(
        f.len() > 64 && f[..4] == *b"\x7fELF" && f[4] == 2,
        "{} is not ELF64",
        elf.display()
    );
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54), u16_at(56));
    let mut segs = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(f[ph..ph + 4].try_into().unwrap());
        let (off, paddr, filesz) = (u64_at(ph + 8), u64_at(ph + 24), u64_at(ph + 32));
        if p_type == 1 && filesz > 0 {
            segs.push((paddr, off as usize, filesz as usize));
        }
    }
    let base = segs.iter().map(|s| s.0).min().expect("a loadable segment");
    let end = segs.iter().map(|s| s.0 + s.2 as u64).max().unwrap();
    let mut flat = vec![0u8; (end - base) as usize];
    for (paddr, off, len) in segs {
        let at = (paddr - base) as usize;
        flat[at..at + len].copy_from_slice(&f[off..off + len]);
    }
    flat
}
