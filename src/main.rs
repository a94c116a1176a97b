//! The `avex` command.
use clap::Parser;

#[derive(Parser)]
#[command(name = "avex", version, about = "Fewer VM exits: analyze guest kernels, link pre-analyzed images, boot and compare")]
enum Cli {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli {}
}
