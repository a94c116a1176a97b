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

use crate::backend::RunRequest;
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
    /// rtc, pit, cpuid, ctxswitch; in C: c8250, c8250-os, cpci, crtc).
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
    Ok(analysis.translation_set(policy, &config))
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
    let req = RunRequest {
        name: &guest.name,
        elf: &guest.elf,
        mode,
        policy: ExitPolicy::default(),
        translations: guest.translations.clone(),
        timeout: Duration::from_secs_f64(args.timeout),
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
        mode,
        result.status,
        result.seconds
    );
    eprint!("{}", result.stats.summary());
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
