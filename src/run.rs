//! `avex run GUEST`: boot a guest on a backend and report its exits.
//!
//! GUEST is an ELF path, a pre-analyzed image (translations in its
//! `.avex.translations` section), or the name of a bundled guest. The guest's
//! console bytes go to stdout unchanged as they come; an exit summary goes to
//! stderr at the end. The process status is the guest's debug-exit status.
//!
//! Backends: `kvm` (hv/kvm, on /dev/kvm) and `bochs` (the VT-x hypervisor under
//! Bochs), both behind the [`Backend`](crate::backend::Backend) seam; the record
//! written by `--json` is [`RunRecord`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use avex_core::exit::Mode;
use avex_core::format::{self, TranslationSet};
use avex_core::policy::ExitPolicy;

use crate::backend::{KernelBoot, RunRequest};
use crate::backends::BackendKind;
use crate::guests;
use crate::record::RunRecord;

/// `--mode` for `avex run` and `avex image`.
pub(crate) fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s)
        .ok_or_else(|| format!("unknown mode {s:?}: use off, dynamic, aot or aot+dynamic"))
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An ELF path, a pre-analyzed image, or a bundled guest's name (console, pci,
    /// rtc, pit, cpuid, ctxswitch; in C: c8250, c8250-os, c8250-retpoline, cpci, crtc).
    pub guest: String,
    #[arg(long, value_enum, default_value = "kvm")]
    pub backend: BackendKind,
    /// off, dynamic, aot or aot+dynamic. Default: aot+dynamic when translations are
    /// given (in the image or with --clusters), dynamic otherwise.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// A translation set written by `avex analyze -o` (instead of the image's own).
    #[arg(long, value_name = "FILE")]
    pub clusters: Option<PathBuf>,
    /// Write one JSON record of the run to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Stop the guest (with an error) after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// A `System.map` to name exit sites by kernel function (default: the ELF's
    /// own symbols, else a `System.map` beside the ELF).
    #[arg(long, value_name = "FILE")]
    pub system_map: Option<PathBuf>,
    /// KVM: coalesce the port writes the guest cannot observe before its next exit
    /// (RTC index 0x70, PCI address 0xcf8, POST code 0x80) with KVM's coalesced
    /// PIO; they are applied to the devices in order at the next exit.
    #[arg(long)]
    pub coalesce: bool,
    /// List the hottest exit sites: RIP, exit reason, exits, how many were followed
    /// by a cluster, the exits those clusters absorbed, the function (from the
    /// ELF's symbols or --system-map), and where those clusters most often ended.
    /// Sites are known in clustering modes only (see `print_hot_sites`).
    #[arg(long)]
    pub profile: bool,
    /// KVM: measure the guest instructions between exits (`exit_distance` in the
    /// record) from KVM's `insn_emulation`, read at each exit (two reads of its
    /// statistics per exit, so not by default; implied by --profile). The VT-x
    /// hypervisor in Bochs always measures it.
    #[arg(long)]
    pub exit_distance: bool,
}

/// The kernel command line `avex run --initrd` starts from: the console on the
/// 16550 at 0x3f8 (ttyS0), and no ACPI, I/O APIC or local APIC (the hypervisor
/// emulates the 8259 pair, the 8254, the RTC and the 16550, not those); a panic
/// reboots at once, which ends the run with a diagnosis instead of a hang.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 acpi=off noapic nolapic panic=-1";
/// Guest RAM for a kernel with an initrd when `--mem` does not say.
pub const DEFAULT_KERNEL_MIB: u64 = 256;

/// How to boot a guest that is a kernel: the options `avex run` and `avex compare`
/// share.
#[derive(clap::Args, Debug)]
pub struct KernelArgs {
    /// An initrd (e.g. an initramfs cpio) for a PVH kernel such as a stock vmlinux;
    /// the guest then gets the default kernel command line
    /// (`console=ttyS0 acpi=off noapic nolapic panic=-1`) plus `--append`.
    /// `avex compare` then compares consoles by their result lines only (those
    /// starting `avex-linux: `: the rest carries timings).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Words added to the kernel command line.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// Guest RAM in MiB (default: 16 for small guests, 256 with --initrd).
    #[arg(long, value_name = "MIB")]
    pub mem: Option<u64>,
    /// Bochs: the guest CPU's clock in MHz, the rate of its TSC and so of its
    /// time (Bochs' TSC counts one tick per instruction; default: 10 for small
    /// guests, 1000 with --initrd). A kernel's timer interrupts come per second of
    /// guest time: at 10 MHz Linux takes 100 times the timer interrupts per
    /// instruction it takes at 1 GHz.
    #[arg(long, value_name = "MHZ", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub cpu_mhz: Option<u64>,
}

impl KernelArgs {
    /// The initrd's bytes, if one was named.
    pub fn read_initrd(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.initrd.as_deref().map(read_initrd).transpose()
    }

    /// The boot of a kernel with `initrd` (what [`Self::read_initrd`] read).
    pub fn boot<'a>(&self, initrd: Option<&'a [u8]>) -> KernelBoot<'a> {
        KernelBoot {
            initrd,
            cmdline: kernel_cmdline(initrd.is_some(), self.append.as_deref()),
            mem_mib: self.mem.or(initrd.is_some().then_some(DEFAULT_KERNEL_MIB)),
            cpu_mhz: self.cpu_mhz,
        }
    }
}

/// The kernel command line for `--initrd`/`--append`: the default (when there is
/// an initrd) followed by the appended words.
pub fn kernel_cmdline(initrd: bool, append: Option<&str>) -> String {
    let mut words: Vec<&str> = Vec::new();
    if initrd {
        words.push(DEFAULT_KERNEL_CMDLINE);
    }
    if let Some(a) = append.map(str::trim).filter(|a| !a.is_empty()) {
        words.push(a);
    }
    words.join(" ")
}

/// Read the initrd named by `--initrd`, saying which file and why when it cannot.
pub fn read_initrd(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("initrd {}: cannot read it", path.display()))?;
    if bytes.is_empty() {
        bail!("initrd {}: the file is empty", path.display());
    }
    Ok(bytes)
}

/// A guest ready to run: its ELF and whatever translations came with it.
#[derive(Clone, Debug)]
pub struct LoadedGuest {
    pub name: String,
    pub elf: Vec<u8>,
    /// Translations found (decoded), or why the ones found could not be used.
    pub translations: Option<Result<TranslationSet, String>>,
}

/// Resolve GUEST: an existing file, else a bundled guest's name.
pub fn load_guest(spec: &str) -> anyhow::Result<LoadedGuest> {
    let path = Path::new(spec);
    let (name, elf) = if path.exists() {
        let elf = std::fs::read(path).with_context(|| format!("cannot read {spec}"))?;
        let name = path
            .file_name()
            .map_or(spec.to_string(), |n| n.to_string_lossy().into_owned());
        (name, elf)
    } else if let Some(g) = guests::find(spec) {
        (g.name.to_string(), g.elf.to_vec())
    } else {
        let names: Vec<&str> = guests::bundled().iter().map(|g| g.name).collect();
        if guests::c_guest_names().any(|n| n == spec) {
            bail!(
                "{spec}: a C guest, not bundled in this build: {} (bundled: {})",
                guests::C_GUESTS_MISSING,
                names.join(", ")
            );
        }
        bail!(
            "{spec}: no such file, and not a bundled guest (bundled: {})",
            names.join(", ")
        );
    };
    let translations = match avex_linker::read_translations(&elf) {
        Ok(None) => None,
        Ok(Some(bytes)) => Some(
            format::decode(&bytes)
                .map_err(|e| format!("the image's .avex.translations section is unusable: {e}")),
        ),
        Err(e) => Some(Err(format!("cannot read the image's translations: {e}"))),
    };
    Ok(LoadedGuest {
        name,
        elf,
        translations,
    })
}

/// Read a translation set file (`avex analyze -o`).
pub fn load_clusters(path: &Path) -> Result<TranslationSet, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    format::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Analyze a guest ahead of time with the AOT pass and make its translation set
/// (as `avex analyze -o` does).
pub fn analyze_guest(
    name: &str,
    elf: &[u8],
    policy: &ExitPolicy,
) -> anyhow::Result<TranslationSet> {
    let config = avex_aot::TranslatorConfig::default();
    let analysis = avex_aot::analyze_bytes(name, elf, policy, &config)
        .map_err(|e| anyhow::anyhow!("{name}: analysis failed: {e}"))?;
    Ok(analysis.translation_set(elf, policy, &config)?)
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let mut guest = load_guest(&args.guest)?;
    if let Some(path) = &args.clusters {
        guest.translations = Some(load_clusters(path));
    }
    let mode = args.mode.unwrap_or(if guest.translations.is_some() {
        Mode::AotDynamic
    } else {
        Mode::Dynamic
    });
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let initrd = args.kernel.read_initrd()?;
    if initrd.is_some() {
        // An initrd needs a PVH kernel: say so before booting anything.
        match avex_core::boot::parse_elf(&guest.elf) {
            Ok(img) if img.pvh_entry.is_none() => {
                bail!("{}: {}", args.guest, avex_core::boot::BootError::NoPvhNote)
            }
            Err(e) => bail!("{}: {e}", args.guest),
            Ok(_) => {}
        }
    }
    let req = RunRequest {
        name: &guest.name,
        elf: &guest.elf,
        mode,
        policy: ExitPolicy::default(),
        translations: guest.translations.clone(),
        timeout: Duration::from_secs_f64(args.timeout),
        kernel: args.kernel.boot(initrd.as_deref()),
        coalesce: args.coalesce,
        exit_distance: args.exit_distance || args.profile,
    };
    let stdout = std::io::stdout();
    let mut console = |b: &[u8]| {
        let mut out = stdout.lock();
        let _ = out.write_all(b);
        let _ = out.flush();
    };
    let backend = args.backend.get();
    let result = backend.run(&req, &mut console)?;
    let record = RunRecord::new(&guest.name, mode, backend, &result);
    eprintln!(
        "\navex: {} on {} in mode {}: status {}, {:.3} s",
        guest.name,
        backend.name(),
        crate::backend::variant_name(mode, result.coalesced),
        result.status,
        result.seconds
    );
    eprint!("{}", result.stats.summary());
    print_hot_sites(&args, &guest.elf, mode, &result.stats)?;
    eprintln!("exits counted:          {}", record.exits_counted);
    if let Some(t) = &record.time_split {
        eprintln!(
            "time apart:             {:.1} ms in KVM_RUN (KVM running the guest: its \
             emulator, {} instructions, the exits it handles itself and its side of the \
             exits to user space), {:.1} ms in user space handling exits ({:.1} ms of it in \
             clusters, {} instructions)",
            t.kvm_run_ms,
            t.kvm_emulated_insns
                .map_or("count unknown".to_string(), |n| n.to_string()),
            t.user_space_ms,
            t.cluster_ms,
            t.engine_insns
        );
    }
    for n in &result.notes {
        eprintln!("{n}");
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&record)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::from(result.status))
}

/// The hottest exit sites (`stats.by_rip`): RIP, reason, exits, how many a cluster
/// followed, what those clusters absorbed, the function each is in, and where its
/// clusters most often ended (where clustering stops short: where to look next). Printed when the guest has names, and
/// always with `--profile`.
///
/// Sites are recorded in clustering modes only: there the backend finds the
/// exiting instruction exactly to look for a cluster after it. In `off` it does
/// not (on KVM an OUT has already completed when it reaches user space, and
/// finding it costs a completion KVM_RUN per exit, which would change what `off`
/// measures), so `--profile` in `off` says to use another mode.
fn print_hot_sites(
    args: &Args,
    elf: &[u8],
    mode: Mode,
    stats: &avex_core::stats::ExitStats,
) -> anyhow::Result<()> {
    if stats.by_rip.is_empty() {
        if args.profile {
            eprintln!(
                "exit sites: none recorded{}",
                if mode == Mode::Off {
                    " (mode off does not locate exiting instructions: run with --mode \
                     dynamic or aot+dynamic to see where the exits are)"
                } else {
                    ""
                }
            );
        }
        return Ok(());
    }
    let path = Path::new(&args.guest);
    let symbols = crate::symbols::Symbols::for_guest(
        path.is_file().then_some(path),
        elf,
        args.system_map.as_deref(),
    )?;
    if symbols.is_empty() && !args.profile {
        return Ok(());
    }
    eprint!(
        "{}",
        hot_sites(stats, &symbols, if args.profile { 20 } else { 12 })
    );
    Ok(())
}

/// The `top` hottest exit sites as lines (see [`print_hot_sites`]).
pub fn hot_sites(
    stats: &avex_core::stats::ExitStats,
    symbols: &crate::symbols::Symbols,
    top: usize,
) -> String {
    let mut hot: Vec<(u64, u64)> = stats.by_rip.iter().map(|(r, n)| (*r, *n)).collect();
    hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut s = format!(
        "hottest exit sites ({} of {}; exits that reached avex; clustered: how many \
         of them a cluster ran after; absorbed: exits those clusters ran; ends at: \
         where they most often left the guest, and how often):\n  {:<18} {:<10} {:>9} \
         {:>10} {:>9}  {:<40} ends at\n",
        hot.len().min(top),
        hot.len(),
        "rip",
        "reason",
        "exits",
        "clustered",
        "absorbed",
        "function"
    );
    for (rip, n) in hot.into_iter().take(top) {
        let site = stats.exit_sites.get(&rip).cloned().unwrap_or_default();
        let name = symbols.name(rip).unwrap_or_else(|| "?".into());
        let reason = site.reason.map_or("?", |r| r.name());
        let ends = match site.top_end() {
            Some((end, k)) => format!(
                "{end:#x} {} ({k})",
                symbols.name(end).unwrap_or_else(|| "?".into())
            ),
            None => "-".into(),
        };
        s += &format!(
            "  {rip:#018x} {reason:<10} {n:>9} {:>10} {:>9}  {name:<40} {ends}\n",
            site.clustered, site.absorbed
        );
    }
    s
}
