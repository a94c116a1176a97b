//! Builds the bare-metal VT-x hypervisor (hv/vmx, its own cargo workspace) with a
//! nested cargo invocation through `freestanding`, turns the ELF into the flat
//! multiboot image GRUB loads (the "a.out kludge": the header's address fields say
//! where the bytes go), and tells the hosted crate where it is:
//!
//! - `AVEX_VMX_IMAGE`: the flat image (`avex-vmx.bin`), or empty if the build failed;
//! - `AVEX_VMX_ELF`: the ELF (symbols, for debugging);
//! - `AVEX_VMX_BUILD_ERROR`: why the build failed (empty on success).
//!
//! A failed hypervisor build does not fail the hosted build: the hosted crate still
//! builds (the KVM backend and the AOT tools do not need the hypervisor), and
//! `avex image` / `--backend bochs` report the recorded reason instead.

use std::path::{Path, PathBuf};

use crate::freestanding;

/// The multiboot1 magic, as it appears in the image's header.
const MB1_MAGIC: u32 = 0x1BAD_B002;

pub fn build() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("vmx");
    let dir = root.join("hv/vmx");
    let script = dir.join("link.ld");
    let target = freestanding::target_dir("vmx");
    // hv/vmx links hv/core: rebuild when it changes too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("hv/core/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("hv/core/Cargo.toml").display()
    );

    let built = std::panic::catch_unwind(|| {
        freestanding::build(&freestanding::Build {
            manifest_dir: &dir,
            target_dir: &target,
            linker_script: Some(&script),
            extra_rustflags: &["-C", "code-model=small"],
            bins: &["avex-vmx"],
            offline: false,
        })
    });
    std::fs::create_dir_all(&out).expect("create $OUT_DIR/vmx");
    let result = built
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into())
        })
        .and_then(|elfs| {
            let elf = elfs.into_iter().next().ok_or("no ELF")?;
            let flat = flat_image(&elf)?;
            let image = out.join("avex-vmx.bin");
            freestanding::write_if_changed(&image, &flat);
            Ok((elf, image))
        });
    match result {
        Ok((elf, image)) => {
            println!("cargo:rustc-env=AVEX_VMX_IMAGE={}", image.display());
            println!("cargo:rustc-env=AVEX_VMX_ELF={}", elf.display());
            println!("cargo:rustc-env=AVEX_VMX_BUILD_ERROR=");
        }
        Err(why) => {
            let first = why
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("see the build output")
                .to_string();
            println!("cargo:warning=the VT-x hypervisor (hv/vmx) did not build: {first}");
            let reason: String = why
                .chars()
                .filter(|&c| c != '\n' && c != '\r')
                .take(400)
                .collect();
            println!("cargo:rustc-env=AVEX_VMX_IMAGE=");
            println!("cargo:rustc-env=AVEX_VMX_ELF=");
            println!("cargo:rustc-env=AVEX_VMX_BUILD_ERROR={reason}");
        }
    }
}

/// `objcopy -O binary` for the hypervisor's static ELF64: its PT_LOAD file bytes
/// laid out from the lowest physical address, padded to the length the multiboot
/// header's `load_end_addr - load_addr` declares.
fn flat_image(elf: &Path) -> Result<Vec<u8>, String> {
    let (base, mut flat) = freestanding::flat_binary(elf)?;
    // The multiboot header must be in the first 8 KiB, 4-byte aligned.
    let hdr = (0..8192.min(flat.len().saturating_sub(32)))
        .step_by(4)
        .find(|&o| u32::from_le_bytes(flat[o..o + 4].try_into().unwrap()) == MB1_MAGIC)
        .ok_or("no multiboot header in the first 8 KiB of the image")?;
    let word =
        |i: usize| u32::from_le_bytes(flat[hdr + 4 * i..hdr + 4 * i + 4].try_into().unwrap());
    let (load_addr, load_end) = (word(4), word(5));
    if u64::from(load_addr) != base {
        return Err(format!(
            "multiboot load_addr {load_addr:#x} is not the image base {base:#x}"
        ));
    }
    let want = (load_end - load_addr) as usize;
    if want < flat.len() {
        return Err(format!(
            "multiboot load_end_addr {load_end:#x} cuts the image ({} bytes)",
            flat.len()
        ));
    }
    flat.resize(want, 0);
    Ok(flat)
}
