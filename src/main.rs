//! The `avex` command: analyze guest kernels, link pre-analyzed images, boot them
//! on a backend, and compare clustering modes. Each subcommand lives in its own
//! module with its own arguments.
use std::process::ExitCode;

use clap::Parser;

mod analyze;
mod backend;
mod backends;
mod bochs;
mod chart;
mod compare;
mod cost;
mod guests;
mod image;
mod initramfs;
mod inspect;
mod kvm;
mod link;
mod record;
mod run;
mod symbols;

#[derive(Parser)]
#[command(
    name = "avex",
    version,
    about = "Fewer VM exits: analyze guest kernels, link pre-analyzed images, boot and compare"
)]
enum Cli {
    /// Find exit-prone sites and clusters in guest ELFs and report them.
    Analyze(analyze::Args),
    /// Write a pre-analyzed image: the guest ELF with its translations in a section.
    Link(link::Args),
    /// List the clusters embedded in a pre-analyzed image, with disassembly.
    Inspect(inspect::Args),
    /// Make a GRUB ISO that boots the VT-x hypervisor with a guest.
    Image(image::Args),
    /// Boot a guest on a backend and report its exits.
    Run(run::Args),
    /// Write the initramfs avex boots Linux with (busybox and the workload's init).
    Initramfs(initramfs::Args),
    /// Run guests in every clustering mode and compare exits and time.
    Compare(compare::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Analyze(a) => analyze::main(a),
        Cli::Link(a) => link::main(a),
        Cli::Inspect(a) => inspect::main(a),
        Cli::Image(a) => image::main(a),
        Cli::Run(a) => run::main(a),
        Cli::Initramfs(a) => initramfs::main(a),
        Cli::Compare(a) => compare::main(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("avex: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
