//! `avex run GUEST`: boot a guest on a backend and report its exits.
//!
//! GUEST is an ELF path, a pre-analyzed image (translations in its
//! `.avex.translations` section), or the name of a bundled guest. The guest's
//! console bytes go to stdout unchanged as they come; an exit summary goes to
//! stderr at the end. The process status is the guest's debug-exit status.
//!
//! Backends: `kvm` (hv/kvm, on /dev/kvm) and `bochs` (the VT-x hypervisor under
//! Bochs). The Bochs seam is `crate::bochs::run(&RunRequest) ->
//! anyhow::Result<RunResult>` in src/bochs.rs, owned by the VT-x hypervisor's
//! engineer; [`run_backend`] dispatches to it once that module exists.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use avex_core::exit::Mode;
use avex_core::format::{self, TranslationSet};
use avex_core::policy::ExitPolicy;
use avex_core::stats::ExitStats;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::guests;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The hosted backend on /dev/kvm.
    Kvm,
    /// The bare-metal VT-x hypervisor, booted in Bochs.
    Bochs,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kvm => "kvm",
            Backend::Bochs => "bochs",
        }
    }
}

/// `--mode` for `avex run` and `avex image`.
pub(crate) fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s)
        .ok_or_else(|| format!("unknown mode {s:?}: use off, dynamic, aot or aot+dynamic"))
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An ELF path, a pre-analyzed image, or a bundled guest's name (console, pci,
    /// rtc, pit, cpuid, ctxswitch).
    pub guest: String,
    #[arg(long, value_enum, default_value = "kvm")]
    pub backend: Backend,
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

/// What a backend is asked to run.
pub struct RunRequest<'a> {
    pub name: &'a str,
    pub elf: &'a [u8],
    pub mode: Mode,
    pub policy: ExitPolicy,
    pub translations: Option<Result<TranslationSet, String>>,
    pub timeout: Duration,
}

/// What a backend reports.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The guest's debug-exit status.
    pub status: u8,
    pub stats: ExitStats,
    pub console: Vec<u8>,
    pub seconds: f64,
    /// Backend-specific counters (KVM: its vCPU statistics' changes).
    pub details: BTreeMap<String, u64>,
    /// Backend notes (e.g. whether MSR exits reach the handler).
    pub notes: Vec<String>,
    /// Why the backend's exit statistic could not be read (KVM), if so: `exits`
    /// then counts only the exits that reached the handler.
    pub exit_statistics_unreadable: Option<String>,
}

/// Run a guest on a backend; `console` gets console bytes as they come.
pub fn run_backend(
    backend: Backend,
    req: RunRequest<'_>,
    console: &mut dyn FnMut(&[u8]),
) -> anyhow::Result<RunResult> {
    match backend {
        Backend::Kvm => {
            let config = avex_kvm::Config {
                mode: req.mode,
                policy: req.policy,
                timeout: Some(req.timeout),
                translations: req.translations,
                ..avex_kvm::Config::default()
            };
            let r = avex_kvm::run(req.elf, &config, console)
                .map_err(|e| anyhow::anyhow!("{}: {e}", req.name))?;
            let mut details = r.kvm_stats.clone();
            details.insert("user_exits".into(), r.user_exits);
            details.insert("completions".into(), r.completions);
            details.insert("unattributed_exits".into(), r.unattributed_exits);
            details.insert("tlb_flushes".into(), r.tlb_flushes);
            details.insert("reg_ioctls".into(), r.reg_ioctls);
            details.insert("kvm_run_ns".into(), r.time.kvm_run_ns);
            details.insert("completion_ns".into(), r.time.completion_ns);
            details.insert("cluster_ns".into(), r.time.cluster_ns);
            let mut notes = vec![match &r.msr_exits {
                avex_kvm::MsrExits::Enabled => "MSR exits: to user space (filter)".to_string(),
                avex_kvm::MsrExits::NotNeeded => "MSR exits: none intercepted".to_string(),
                avex_kvm::MsrExits::Unsupported(why) => {
                    format!("MSR exits: handled inside KVM ({why})")
                }
            }];
            notes.extend(r.exit_statistics_unreadable.clone());
            Ok(RunResult {
                status: r.status,
                stats: r.stats,
                console: r.console,
                seconds: r.seconds,
                details,
                notes,
                exit_statistics_unreadable: r.exit_statistics_unreadable,
            })
        }
        Backend::Bochs => crate::bochs::run_with_console(&req, console),
    }
}

/// What `exits` counts on each backend (in the record, and in `avex compare`).
pub fn exits_counted(backend: Backend, stats: &ExitStats) -> &'static str {
    match backend {
        Backend::Kvm if stats.hardware_exits.is_some() => {
            "KVM's `exits` statistic (KVM_GET_STATS_FD): the exits to user space (port \
             I/O, filtered MSRs, HLT) plus the few KVM takes for itself (host interrupts, \
             preemption). On this software KVM, CPUID, CR moves and RDTSC are not exits: \
             KVM's emulator runs them with every other instruction (`insn_emulation`)"
        }
        Backend::Kvm => {
            "the exits to user space only (KVM's statistics could not be read): port I/O, \
             filtered MSRs, HLT"
        }
        Backend::Bochs => {
            "the VM exits the VT-x hypervisor's exit handler saw: every exit the exit \
             policy configures (port I/O, MSRs, CPUID, CR moves, RDTSC, HLT, ...)"
        }
    }
}

/// Where a KVM run's wall time went, apart: time in user space is time handling
/// exits (avex's handler, device models, clusters); time in KVM_RUN is KVM running
/// the guest, which on this host means its instruction emulator (about 0.5 us a
/// guest instruction), the exits it handles in the kernel and the kernel's side of
/// each exit to user space. The time ratio of
/// two modes mixes both, so it is never the benefit of avoided exits alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeSplit {
    /// Wall time of the run, boot to debug exit.
    pub total_ms: f64,
    /// Inside KVM_RUN calls that ran the guest.
    pub kvm_run_ms: f64,
    /// Outside the KVM_RUN calls that ran the guest: handling exits in user space
    /// (total minus `kvm_run_ms`).
    pub user_space_ms: f64,
    /// Of which: running clusters (avex's engine, device models, register sync).
    pub cluster_ms: f64,
    /// Of which: KVM_RUN calls that only completed an instruction before a cluster.
    pub completion_ms: f64,
    /// Instructions KVM's emulator ran (`insn_emulation`), if KVM reports it.
    pub kvm_emulated_insns: Option<u64>,
    /// Guest instructions avex's engine ran inside clusters.
    pub engine_insns: u64,
}

impl TimeSplit {
    /// The split of a KVM run from its backend details; `None` for other backends.
    pub fn of_kvm(r: &RunResult) -> Option<TimeSplit> {
        let ms = |k: &str| r.details.get(k).map(|&ns| ns as f64 / 1e6);
        let kvm_run_ms = ms("kvm_run_ns")?;
        let completion_ms = ms("completion_ns").unwrap_or(0.0);
        let total_ms = r.seconds * 1e3;
        Some(TimeSplit {
            total_ms,
            kvm_run_ms,
            user_space_ms: (total_ms - kvm_run_ms).max(0.0),
            cluster_ms: ms("cluster_ns").unwrap_or(0.0),
            completion_ms,
            kvm_emulated_insns: r.details.get("insn_emulation").copied(),
            engine_insns: r.stats.cluster_insns,
        })
    }
}

/// The JSON record of one run (`--json`, and each element of `avex compare --json`).
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub guest: String,
    pub mode: String,
    pub backend: String,
    pub status: u8,
    /// VM exits the hardware took; what that is on this backend: `exits_counted`.
    pub exits: u64,
    pub exits_counted: String,
    /// Exits plus instructions run inside clusters that exit on this backend.
    pub exit_prone: u64,
    pub avoided: u64,
    pub reduction: f64,
    /// Exits that reached avex's exit handler, by reason (KVM: exits to user space).
    pub exits_by_reason: BTreeMap<String, u64>,
    pub handled_exits: u64,
    /// The exit classes that exit on this backend, as configured.
    pub exit_set: Vec<String>,
    /// Instructions run inside clusters that exit on this backend (avoided exits).
    pub in_cluster_exiting: u64,
    pub in_cluster_exiting_by_class: BTreeMap<String, u64>,
    /// Instructions of an exit class run inside clusters that do not exit on this
    /// backend (KVM: CPUID, RDTSC, CR moves): never counted as avoided.
    pub in_cluster_not_exiting: u64,
    pub in_cluster_not_exiting_by_class: BTreeMap<String, u64>,
    /// KVM: wall time apart (time in KVM_RUN, time handling exits in user space).
    pub time_split: Option<TimeSplit>,
    pub clusters_run: u64,
    pub cluster_insns: u64,
    pub early_stops: BTreeMap<String, u64>,
    pub translations_loaded: u64,
    pub translations_invalid: u64,
    pub translations_rejected: Option<String>,
    pub translations_built: u64,
    pub translation_failures: BTreeMap<String, u64>,
    pub translate_ns: u64,
    pub translate_insns: u64,
    pub console_sha256: String,
    pub console_bytes: usize,
    pub seconds: f64,
    pub backend_stats: BTreeMap<String, u64>,
    pub notes: Vec<String>,
    /// Why the exit statistic (KVM's `exits`) could not be read; `exits` then
    /// counts only handled exits. `null` when it was read.
    pub exit_statistics_unreadable: Option<String>,
}

fn owned(m: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl RunRecord {
    pub fn new(guest: &str, mode: Mode, backend: Backend, r: &RunResult) -> RunRecord {
        let s = &r.stats;
        RunRecord {
            guest: guest.to_string(),
            mode: mode.name().to_string(),
            backend: backend.name().to_string(),
            status: r.status,
            exits: s.exits(),
            exits_counted: exits_counted(backend, s).to_string(),
            exit_prone: s.exit_prone(),
            avoided: s.avoided(),
            reduction: s.reduction(),
            exits_by_reason: owned(&s.by_reason),
            handled_exits: s.handled,
            exit_set: s.exit_set.iter().map(|c| c.to_string()).collect(),
            in_cluster_exiting: s.in_cluster_exiting,
            in_cluster_exiting_by_class: owned(&s.in_cluster_by_class),
            in_cluster_not_exiting: s.in_cluster_not_exiting(),
            in_cluster_not_exiting_by_class: owned(&s.in_cluster_not_exiting_by_class),
            time_split: match backend {
                Backend::Kvm => TimeSplit::of_kvm(r),
                Backend::Bochs => None,
            },
            clusters_run: s.clusters_run,
            cluster_insns: s.cluster_insns,
            early_stops: s.early_stops.clone(),
            translations_loaded: s.translations_loaded,
            translations_invalid: s.translations_invalid,
            translations_rejected: s.translations_rejected.clone(),
            translations_built: s.translations_built,
            translation_failures: s.translation_failures_by_reason.clone(),
            translate_ns: s.translate_ns,
            translate_insns: s.translate_insns,
            console_sha256: sha256_hex(&r.console),
            console_bytes: r.console.len(),
            seconds: r.seconds,
            backend_stats: r.details.clone(),
            notes: r.notes.clone(),
            exit_statistics_unreadable: r.exit_statistics_unreadable.clone(),
        }
    }
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
    let result = run_backend(args.backend, req, &mut console)?;
    let record = RunRecord::new(&guest.name, mode, args.backend, &result);
    eprintln!(
        "\navex: {} on {} in mode {}: status {}, {:.3} s",
        guest.name,
        args.backend.name(),
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
