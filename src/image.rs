//! `avex image GUEST -o boot.iso [--mode MODE]`: a GRUB ISO that boots the bare-metal
//! VT-x hypervisor with GUEST (a guest ELF, a pre-analyzed image from `avex link`, or
//! a bundled guest's name) as its module. Boot it in Bochs (`avex run --backend
//! bochs` does all of this itself) or on a machine with VT-x and EPT; the guest's
//! console is on COM1 and the hypervisor's log, ending with an `AVEX-SUMMARY {json}`
//! line, on COM2.

use std::path::PathBuf;
use std::process::ExitCode;

use avex_core::exit::Mode;

use crate::bochs;

use crate::run::parse_mode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A guest ELF, a pre-analyzed image, or a bundled guest's name.
    pub guest: String,
    /// Where to write the ISO.
    #[arg(short, long, value_name = "ISO")]
    pub output: PathBuf,
    /// Clustering mode the hypervisor runs the guest in. Default: aot+dynamic when
    /// the image carries translations, dynamic otherwise.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let guest = crate::run::load_guest(&args.guest)?;
    let mode = args.mode.unwrap_or(if guest.translations.is_some() {
        Mode::AotDynamic
    } else {
        Mode::Dynamic
    });
    if let Some(Err(why)) = &guest.translations {
        eprintln!("avex: warning: {why}; the hypervisor will reject them and cluster dynamically");
    }
    bochs::make_iso(&guest.elf, &guest.name, mode, &args.output)?;
    eprintln!(
        "avex: wrote {} (hypervisor + {} in mode {mode}); guest console on COM1, hypervisor log on COM2",
        args.output.display(),
        guest.name
    );
    Ok(ExitCode::SUCCESS)
}
