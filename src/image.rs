//! `avex image` (in progress).

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("avex image is not built yet")
}
