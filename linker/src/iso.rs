//! Bootable ISOs for the bare-metal VT-x hypervisor: GRUB (made by `grub-mkrescue`)
//! boots the hypervisor's multiboot image with the guest image as a module.
//!
//! The ISO holds `/boot/avex-vmx.bin` (the hypervisor), `/boot/guest.elf` (the
//! guest, usually a pre-analyzed image from `avex link`) and `/boot/grub/grub.cfg`
//! with `timeout=0` and one `multiboot` entry whose command line carries the
//! hypervisor's options (`mode=...`, `guest=<name>`, `tsc_hz=...`, `mem=<MiB>`).
//!
//! Tools: `grub-mkrescue` (Debian `grub-common`), the BIOS GRUB modules in
//! `/usr/lib/grub/i386-pc` (`grub-pc-bin`), `xorriso` (`xorriso`) and `mformat`
//! (`mtools`). A missing one is reported by name with the package to install.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The Debian packages the ISO maker needs.
pub const PACKAGES: &str = "grub-pc-bin grub-common xorriso mtools";

/// Where `grub-mkrescue` takes the BIOS (i386-pc) GRUB modules from.
pub const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("{tool} not found: install the Debian package `{package}` (the ISO maker needs: apt-get install {PACKAGES})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("invalid hypervisor option {0:?}: options are `key=value` words without spaces, quotes or semicolons")]
    BadOption(String),
    #[error("the hypervisor image is empty or has no multiboot header")]
    BadHypervisor,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("grub-mkrescue failed ({status}): {stderr}")]
    Mkrescue { status: String, stderr: String },
}

/// What goes on the ISO.
#[derive(Debug, Clone)]
pub struct IsoSpec<'a> {
    /// The hypervisor's flat multiboot image.
    pub hypervisor: &'a [u8],
    /// The guest image (ELF), passed to the hypervisor as a GRUB module.
    pub guest: &'a [u8],
    /// Hypervisor command-line words, e.g. `["mode=aot+dynamic", "guest=console"]`.
    pub options: Vec<String>,
    /// An initrd for a kernel guest: `/boot/initrd`, the module with role `initrd`.
    pub initrd: Option<&'a [u8]>,
    /// The guest's command line, words after the guest module's role (`guest`).
    pub guest_cmdline: Vec<String>,
}

/// Check that every tool the ISO maker runs is installed.
pub fn check_tools() -> Result<(), IsoError> {
    for (tool, package) in [
        ("grub-mkrescue", "grub-common"),
        ("xorriso", "xorriso"),
        ("mformat", "mtools"),
    ] {
        if find_in_path(tool).is_none() {
            return Err(IsoError::MissingTool { tool, package });
        }
    }
    if !Path::new(GRUB_I386_PC).join("multiboot.mod").is_file() {
        return Err(IsoError::MissingTool {
            tool: "GRUB BIOS modules (/usr/lib/grub/i386-pc)",
            package: "grub-pc-bin",
        });
    }
    Ok(())
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// True if `image` has a multiboot1 header (magic, flags, checksum) in its first 8 KiB.
pub fn has_multiboot_header(image: &[u8]) -> bool {
    let limit = image.len().min(8192);
    (0..limit.saturating_sub(11)).step_by(4).any(|o| {
        let w = |i: usize| u32::from_le_bytes(image[o + 4 * i..o + 4 * i + 4].try_into().unwrap());
        w(0) == 0x1BAD_B002 && w(0).wrapping_add(w(1)).wrapping_add(w(2)) == 0
    })
}

/// The `grub.cfg` for `options`.
pub fn grub_cfg(options: &[String]) -> Result<String, IsoError> {
    grub_cfg_with(options, &[], false)
}

/// The `grub.cfg` for `options`, with the guest's command line `guest_words` on
/// its module's line (`module /boot/guest.elf guest WORDS...`) and, if `initrd`,
/// a second module `/boot/initrd` with the role `initrd`. Every word is checked as
/// the options are (GRUB would otherwise interpret quotes, `$` or `;`).
pub fn grub_cfg_with(
    options: &[String],
    guest_words: &[String],
    initrd: bool,
) -> Result<String, IsoError> {
    for o in options.iter().chain(guest_words) {
        let ok = !o.is_empty()
            && o.chars().all(|c| {
                c.is_ascii_graphic() && !matches!(c, '"' | '\'' | ';' | '\\' | '$' | '{' | '}')
            });
        if !ok {
            return Err(IsoError::BadOption(o.clone()));
        }
    }
    let mut cfg = String::new();
    let _ = writeln!(cfg, "set timeout=0");
    let _ = writeln!(cfg, "set default=0");
    let _ = writeln!(cfg, "menuentry \"avex\" {{");
    let _ = writeln!(cfg, "  multiboot /boot/avex-vmx.bin {}", options.join(" "));
    let mut guest_line = String::from("  module /boot/guest.elf guest");
    for w in guest_words {
        guest_line.push(' ');
        guest_line.push_str(w);
    }
    let _ = writeln!(cfg, "{guest_line}");
    if initrd {
        let _ = writeln!(cfg, "  module /boot/initrd initrd");
    }
    let _ = writeln!(cfg, "  boot");
    let _ = writeln!(cfg, "}}");
    Ok(cfg)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IsoError {
    let what = what.into();
    move |source| IsoError::Io { what, source }
}

/// Make a bootable ISO at `out`.
pub fn make_iso(spec: &IsoSpec, out: &Path) -> Result<(), IsoError> {
    check_tools()?;
    if !has_multiboot_header(spec.hypervisor) {
        return Err(IsoError::BadHypervisor);
    }
    let cfg = grub_cfg_with(&spec.options, &spec.guest_cmdline, spec.initrd.is_some())?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let scratch =
        Scratch(std::env::temp_dir().join(format!("avex-iso-{}-{n}-{nanos}", std::process::id())));
    let root = scratch.0.join("iso");
    let grub = root.join("boot/grub");
    std::fs::create_dir_all(&grub).map_err(io(format!("create {}", grub.display())))?;
    let put = |name: &str, bytes: &[u8]| {
        let p = root.join(name);
        std::fs::write(&p, bytes).map_err(io(format!("write {}", p.display())))
    };
    put("boot/avex-vmx.bin", spec.hypervisor)?;
    put("boot/guest.elf", spec.guest)?;
    if let Some(initrd) = spec.initrd {
        put("boot/initrd", initrd)?;
    }
    put("boot/grub/grub.cfg", cfg.as_bytes())?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    // A small BIOS-only image: just the modules the entry needs, no fonts, locales or
    // themes (about 1 MiB instead of 10).
    let output = Command::new("grub-mkrescue")
        .arg("--locales=")
        .arg("--fonts=")
        .arg("--themes=")
        .arg("--install-modules=multiboot normal iso9660 biosdisk configfile")
        .arg("--modules=multiboot")
        .arg("-d")
        .arg(GRUB_I386_PC)
        .arg("-o")
        .arg(out)
        .arg(&root)
        .output()
        .map_err(io("run grub-mkrescue"))?;
    if !output.status.success() || !out.is_file() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        return Err(IsoError::Mkrescue {
            status: output.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut img = vec![0u8; 64];
        let flags = 0x0001_0003u32;
        let magic = 0x1BAD_B002u32;
        img[8..12].copy_from_slice(&magic.to_le_bytes());
        img[12..16].copy_from_slice(&flags.to_le_bytes());
        img[16..20].copy_from_slice(&(0u32.wrapping_sub(magic).wrapping_sub(flags)).to_le_bytes());
        img
    }

    #[test]
    fn finds_a_multiboot_header_only_with_a_valid_checksum() {
        let mut img = header();
        assert!(has_multiboot_header(&img));
        img[16] ^= 1;
        assert!(!has_multiboot_header(&img));
        assert!(!has_multiboot_header(&[]));
    }

    #[test]
    fn grub_cfg_boots_at_once_with_the_options_and_the_guest_module() {
        let cfg = grub_cfg(&["mode=aot+dynamic".into(), "guest=console".into()]).unwrap();
        assert!(cfg.contains("set timeout=0"));
        assert!(cfg.contains("multiboot /boot/avex-vmx.bin mode=aot+dynamic guest=console\n"));
        assert!(cfg.contains("module /boot/guest.elf guest"));
    }

    #[test]
    fn grub_cfg_refuses_options_that_could_break_the_script() {
        for bad in ["a b", "x;reboot", "\"q\"", "", "$x", "{"] {
            assert!(
                matches!(grub_cfg(&[bad.to_string()]), Err(IsoError::BadOption(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_tool_names_its_debian_package() {
        let e = IsoError::MissingTool {
            tool: "xorriso",
            package: "xorriso",
        };
        let msg = e.to_string();
        assert!(
            msg.contains("xorriso")
                && msg.contains("apt-get install")
                && msg.contains("grub-pc-bin")
        );
    }
}
