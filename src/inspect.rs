//! `avex inspect IMAGE`: list the clusters embedded in a pre-analyzed image (or in a
//! translation file written by `avex analyze -o`), with their disassembly.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use avex_core::format;
use avex_linker::inspect::{render, IdentityCheck};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A pre-analyzed image (`avex link`) or a translation set file (`avex analyze -o`).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let name = args.image.display().to_string();
    let bytes = std::fs::read(&args.image).with_context(|| format!("reading {name}"))?;
    let (set, check) = if bytes.starts_with(&format::MAGIC) {
        let set = format::decode(&bytes).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        (set, IdentityCheck::Unknown)
    } else {
        let set = avex_linker::read_translation_set(&bytes)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{name}: no {} section: not a pre-analyzed image (make one with `avex link`)",
                    avex_linker::SECTION_NAME
                )
            })?;
        let check = match avex_linker::identity(&bytes) {
            Ok(id) if id == set.guest.digest => IdentityCheck::Matches,
            Ok(id) => IdentityCheck::Differs(id),
            Err(_) => IdentityCheck::Unknown,
        };
        (set, check)
    };
    print!("{}", render(&set, check));
    Ok(ExitCode::SUCCESS)
}
