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
            write_if_changed(&image, &flat);
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

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `objcopy -O binary` for the hypervisor's static ELF64: its PT_LOAD file bytes
/// laid out from the lowest physical address, padded to the length the multiboot
/// header's `load_end_addr - load_addr` declares.
fn flat_image(elf: &Path) -> Result<Vec<u8>, String> {
    let f = std::fs::read(elf).map_err(|e| format!("read {}: {e}", elf.display()))?;
    if f.len() < 64 || f[..4] != *b"\x7fELF" || f[4] != 2 {
        return Err(format!("{} is not ELF64", elf.display()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([f[o], f[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
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
    let base = segs
        .iter()
        .map(|s| s.0)
        .min()
        .ok_or("no loadable segment")?;
    let end = segs.iter().map(|s| s.0 + s.2 as u64).max().unwrap();
    let mut flat = vec![0u8; (end - base) as usize];
    for (paddr, off, len) in segs {
        let at = (paddr - base) as usize;
        flat[at..at + len].copy_from_slice(&f[off..off + len]);
    }
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
