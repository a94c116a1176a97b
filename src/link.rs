//! `avex link GUEST.elf [--clusters FILE] -o GUEST.pre.elf`: write a pre-analyzed
//! image, the guest ELF with its translation set in a section `.avex.translations`
//! (see the avex-linker crate). Without `--clusters`, the guest is analyzed first.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use avex_aot::{analyze_bytes, policy_all, ExitPolicy, TranslatorConfig};
use avex_core::format::{self, TranslationSet};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The guest kernel (a static ELF32/ELF64 executable).
    #[arg(value_name = "GUEST.elf")]
    pub guest: PathBuf,
    /// A translation set written by `avex analyze -o` for this guest. Without it,
    /// the guest is analyzed now.
    #[arg(long, value_name = "FILE")]
    pub clusters: Option<PathBuf>,
    /// Exit policy for the analysis (when --clusters is not given): `default` (what
    /// the hypervisor configures) or `all`.
    #[arg(long, default_value = "default", value_parser = ["default", "all"])]
    pub policy: String,
    /// Where to write the pre-analyzed image.
    #[arg(short = 'o', long = "output", value_name = "GUEST.pre.elf")]
    pub output: PathBuf,
}

/// Analyze `elf` with the AOT pass and make its translation set.
fn analyze(name: &str, elf: &[u8], policy: &ExitPolicy) -> anyhow::Result<TranslationSet> {
    let config = TranslatorConfig::default();
    let analysis = analyze_bytes(name, elf, policy, &config)
        .map_err(|e| anyhow::anyhow!("{name}: analysis failed: {e}"))?;
    Ok(analysis.translation_set(elf, policy, &config)?)
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let guest = args.guest.display().to_string();
    let elf = std::fs::read(&args.guest).with_context(|| format!("reading {guest}"))?;
    let set = match &args.clusters {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            format::decode(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: not a usable translation set: {e}", path.display())
            })?
        }
        None => {
            let policy = if args.policy == "all" {
                policy_all()
            } else {
                ExitPolicy::default()
            };
            let name = args
                .guest
                .file_name()
                .map_or_else(|| guest.clone(), |n| n.to_string_lossy().into_owned());
            analyze(&name, &elf, &policy)?
        }
    };
    let (image, written) =
        avex_linker::link(&elf, &set).map_err(|e| anyhow::anyhow!("{guest}: {e}"))?;
    std::fs::write(&args.output, &image)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let insns: usize = written.clusters.iter().map(|c| c.insns.len()).sum();
    println!(
        "{}: {} clusters ({} instructions) in {} ({} bytes), guest identity {}",
        args.output.display(),
        written.clusters.len(),
        insns,
        avex_linker::SECTION_NAME,
        format::encode(&written).len(),
        format::Hex(&written.guest.digest),
    );
    Ok(ExitCode::SUCCESS)
}
