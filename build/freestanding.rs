//! Shared build-script helper: build a freestanding crate (or a workspace of them)
//! on stable Rust with the `x86_64-unknown-linux-gnu` target, its own flags and its
//! own target directory, and return the path of the ELF(s) it produced.
//!
//! PLATFORM.md explains why: there is no `x86_64-unknown-none` target and no nightly,
//! so a freestanding binary is a Linux-target `#![no_std] #![no_main]` binary linked
//! with `-nostartfiles -nostdlib -static -no-pie` and a linker script. Such a crate
//! cannot be a member of the hosted workspace, so it is built by a nested `cargo`
//! invocation started from `build.rs`.
//!
//! Usage from a `build/*.rs` module (included by `build.rs` with `#[path]`):
//!
//! ```ignore
//! let elf = freestanding::build_crate(
//!     &root.join("hv/vmx"),
//!     &freestanding::target_dir("vmx"),
//!     &root.join("hv/vmx/link.ld"),
//!     &["-C", "code-model=kernel"],
//! );
//! println!("cargo:rustc-env=AVEX_VMX_ELF={}", elf.display());
//! ```
//!
//! The crate being built must set `panic = "abort"` in its own `[profile.release]`
//! (and `[profile.dev]`), define `rust_eh_personality` and provide `memcpy`,
//! `memmove`, `memset`, `memcmp` and `bcmp` (by including `build/freestanding_mem.rs`
//! with `#[path]`, as the guests and the hypervisor do). It is always built with
//! `--release`.
//! The helper prints `cargo:rerun-if-changed` for the crate directory and the linker
//! script, so the hosted build reruns only when they change; the nested cargo does
//! its own incremental work in `target_dir`.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The only target this machine's stable toolchain has; the freestanding crates are
/// Linux-target binaries with the C runtime stripped.
pub const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Nested-build warnings not repeated in the hosted build's output. The guest
/// kernels turn SSE off on purpose (KVM here cannot emulate SSE; see
/// guest-kernels/README.md), which rustc reports as a future-compatibility warning
/// about the target's float ABI; the guests use no floating point at all.
pub const QUIET_WARNINGS: &[&str] =
    &["must be enabled to ensure that the ABI of the current target"];

/// Full description of one nested build. `build_crate` and `build_bins` are the
/// short forms; use this when you need more control.
#[derive(Debug, Clone)]
pub struct Build<'a> {
    /// Directory holding the `Cargo.toml` to build (a package or a workspace).
    pub manifest_dir: &'a Path,
    /// The nested build's own target directory (see [`target_dir`]).
    pub target_dir: &'a Path,
    /// Linker script passed as `-T`; `None` to let the crate set its own link args.
    pub linker_script: Option<&'a Path>,
    /// Extra rustc flags, appended after the standard freestanding ones
    /// (e.g. `["-C", "code-model=kernel"]` or `["-C", "target-feature=-sse"]`).
    pub extra_rustflags: &'a [&'a str],
    /// Binaries to build and return, by name. Empty: build the package's default
    /// targets and return the single binary named after the package.
    pub bins: &'a [&'a str],
    /// Pass `--offline` to the nested cargo (no registry access at build time).
    pub offline: bool,
}

/// The standard flags for a freestanding, statically linked, non-PIE binary
/// linked at its physical address (PLATFORM.md, "Building freestanding code").
pub fn standard_rustflags(linker_script: Option<&Path>) -> Vec<String> {
    let mut f: Vec<String> = [
        "-C",
        "relocation-model=static",
        "-C",
        "no-redzone=yes",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
        "-C",
        "link-arg=-Wl,--build-id=none",
        "-C",
        "link-arg=-Wl,-n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(script) = linker_script {
        f.push("-C".into());
        f.push(format!("link-arg=-T{}", script.display()));
    }
    f
}

/// A target directory for the nested build of `name`, shared by every profile of
/// the hosted build (`target/freestanding/<name>`), so that `cargo build`,
/// `cargo test`, `cargo clippy` and `--release` reuse one nested build. Falls back
/// to `$OUT_DIR/<name>` if the hosted target directory cannot be found.
pub fn target_dir(name: &str) -> PathBuf {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set for build scripts"));
    // OUT_DIR = <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out
    let shared = out
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent())
        .and_then(|profile| profile.parent())
        .map(|target| target.join("freestanding").join(name));
    shared.unwrap_or_else(|| out.join(name))
}

/// Build the single-binary freestanding crate at `manifest_dir` into `target_dir`
/// and return the path of its ELF (`<target_dir>/x86_64-unknown-linux-gnu/release/<package name>`).
pub fn build_crate(
    manifest_dir: &Path,
    target_dir: &Path,
    linker_script: &Path,
    extra_rustflags: &[&str],
) -> PathBuf {
    build(&Build {
        manifest_dir,
        target_dir,
        linker_script: Some(linker_script),
        extra_rustflags,
        bins: &[],
        offline: false,
    })
    .pop()
    .expect("one binary")
}

/// Build the named binaries of the crate or workspace at `manifest_dir` in one cargo
/// invocation and return their ELF paths, in the order of `bins`.
pub fn build_bins(
    manifest_dir: &Path,
    target_dir: &Path,
    linker_script: &Path,
    extra_rustflags: &[&str],
    bins: &[&str],
) -> Vec<PathBuf> {
    build(&Build {
        manifest_dir,
        target_dir,
        linker_script: Some(linker_script),
        extra_rustflags,
        bins,
        offline: false,
    })
}

/// Run the nested build described by `b`; panics (failing the hosted build with the
/// nested cargo's output) if it fails.
pub fn build(b: &Build) -> Vec<PathBuf> {
    let manifest = b.manifest_dir.join("Cargo.toml");
    println!("cargo:rerun-if-changed={}", b.manifest_dir.display());
    // The memory functions every freestanding crate includes from here.
    println!(
        "cargo:rerun-if-changed={}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("build/freestanding_mem.rs")
            .display()
    );
    if let Some(script) = b.linker_script {
        println!("cargo:rerun-if-changed={}", script.display());
    }

    let mut flags = standard_rustflags(b.linker_script);
    flags.extend(b.extra_rustflags.iter().map(|s| s.to_string()));
    // CARGO_ENCODED_RUSTFLAGS: flags separated by 0x1f, so paths may hold spaces.
    let encoded = flags.join("\u{1f}");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    // Run from the crate's directory so its own `.cargo/config.toml`, if any, applies.
    cmd.current_dir(b.manifest_dir)
        .arg("build")
        .arg("--release")
        // An explicit --target keeps the rustflags off the crate's build scripts
        // and proc macros, which run on the host as ordinary programs.
        .arg("--target")
        .arg(TRIPLE)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(b.target_dir);
    if b.offline {
        cmd.arg("--offline");
    }
    for bin in b.bins {
        cmd.arg("--bin").arg(bin);
    }
    // The hosted build's environment must not leak into the nested one: its
    // rustflags (coverage, sanitizers), target dir, target triple, wrappers and
    // per-profile overrides are all for the hosted code.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = matches!(
            key,
            "RUSTFLAGS"
                | "CARGO_ENCODED_RUSTFLAGS"
                | "CARGO_BUILD_RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "CARGO_TARGET_DIR"
                | "CARGO_BUILD_TARGET_DIR"
                | "CARGO_BUILD_TARGET"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "CARGO_BUILD_RUSTC_WRAPPER"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_PKG_NAME"
                | "TARGET"
                | "HOST"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "RUSTC_LINKER"
        ) || key.starts_with("CARGO_PROFILE_")
            || (key.starts_with("CARGO_TARGET_") && key.ends_with("_RUSTFLAGS"))
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("__CARGO_FIX");
        if leaks {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", encoded);

    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo for {}: {e}", manifest.display()));
    if !out.status.success() {
        panic!(
            "freestanding build of {} failed ({}):\n{}\n{}",
            manifest.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Surface the nested build's warnings in the hosted build's output, once each,
    // without cargo's per-target summaries and without the warnings listed in
    // `QUIET_WARNINGS` (deliberate choices, documented where they are made).
    let mut seen: Vec<&str> = Vec::new();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        let summary = line.contains(" generated ") && line.contains(" warning");
        let quiet = QUIET_WARNINGS.iter().any(|q| line.contains(q));
        if line.starts_with("warning") && !summary && !quiet && !seen.contains(&line) {
            println!("cargo:warning=[{}] {line}", b.manifest_dir.display());
            seen.push(line);
        }
    }

    let release = b.target_dir.join(TRIPLE).join("release");
    let names: Vec<String> = if b.bins.is_empty() {
        vec![package_name(&manifest)]
    } else {
        b.bins.iter().map(|s| s.to_string()).collect()
    };
    names
        .iter()
        .map(|n| {
            let p = release.join(n);
            assert!(p.is_file(), "nested build produced no {}", p.display());
            p
        })
        .collect()
}

/// The `name` in the `[package]` table of `manifest` (a minimal reader: build
/// scripts of this workspace have no TOML parser).
fn package_name(manifest: &Path) -> String {
    let text = std::fs::read_to_string(manifest)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", manifest.display()));
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(rest) = line.strip_prefix("name") {
                if let Some(v) = rest.trim_start().strip_prefix('=') {
                    return v.trim().trim_matches('"').to_string();
                }
            }
        }
    }
    panic!("no [package] name in {}", manifest.display())
}

/// Write only when the content differs, so an unchanged image does not make cargo
/// recompile the crates that `include_bytes!` it.
pub fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `objcopy -O binary` for a static ELF64 this build linked: the PT_LOAD segments'
/// file bytes laid out from the lowest physical address (bss is not included; a
/// multiboot header's `bss_end_addr` tells the loader to zero it). Returns that
/// address and the bytes.
pub fn flat_binary(elf: &Path) -> Result<(u64, Vec<u8>), String> {
    let f = std::fs::read(elf).map_err(|e| format!("read {}: {e}", elf.display()))?;
    if f.len() < 64 || f[..4] != *b"\x7fELF" || f[4] != 2 {
        return Err(format!("{} is not ELF64", elf.display()));
    }
    let short = || format!("{}: program header past the end of the file", elf.display());
    let bytes = |o: usize, n: usize| f.get(o..o + n).ok_or_else(short);
    let u16_at = |o: usize| bytes(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| bytes(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let (phoff, phentsize, phnum) = (u64_at(32)? as usize, u16_at(54)?, u16_at(56)?);
    let mut segs = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(bytes(ph, 4)?.try_into().unwrap());
        let (off, paddr, filesz) = (u64_at(ph + 8)?, u64_at(ph + 24)?, u64_at(ph + 32)?);
        if p_type == 1 && filesz > 0 {
            segs.push((paddr, off as usize, filesz as usize));
        }
    }
    let base = segs
        .iter()
        .map(|s| s.0)
        .min()
        .ok_or_else(|| format!("{}: no loadable segment", elf.display()))?;
    let end = segs.iter().map(|s| s.0 + s.2 as u64).max().unwrap_or(base);
    let mut flat = vec![0u8; (end - base) as usize];
    for (paddr, off, len) in segs {
        let at = (paddr - base) as usize;
        flat[at..at + len].copy_from_slice(bytes(off, len)?);
    }
    Ok((base, flat))
}
