//! Helpers shared by the end-to-end tests (each test file includes this module
//! with `mod support;`; not every file uses every helper).
#![allow(dead_code)]

pub mod aot;
pub mod bochs;
pub mod cguests;
pub mod shapes;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The `avex` command built for these tests.
pub fn avex() -> Command {
    Command::new(env!("CARGO_BIN_EXE_avex"))
}

/// Whether `with` exits (aot+dynamic) are a large enough cut from `off` exits for
/// the bundled guest `name`: at least half fewer. Every bundled guest clusters far
/// better than that (README results); this catches a guest whose clusters stop
/// forming (c8250-retpoline once took 0.2% fewer: its retpolines ended every
/// region). `cpuid` is held to a third: its hashing between probes outgrows the
/// window, so its MSR accesses stay single (README).
pub fn clusters_cut_enough(name: &str, off: u64, with: u64) -> bool {
    let (num, den) = if name == "cpuid" { (2, 3) } else { (1, 2) };
    with * den <= off * num
}

/// Bundled guests whose exiting instructions the AOT pass reaches with every
/// destination known from the ELF: `aot` alone avoids at least 95% of the exits
/// `aot+dynamic` avoids. Not the C guests: their exits sit in small functions
/// reached through function pointers (c8250's `port->serial_in`, cpci's
/// `raw_pci_ops->read`) or called from more sites than a RET is given
/// destinations for (crtc's `rtc_cmos_read`), so only the run-time guard learns
/// where those go.
pub const AOT_SEES_ALL: [&str; 6] = ["console", "pci", "rtc", "pit", "cpuid", "ctxswitch"];

/// Run `cmd` and assert that it succeeded (its stderr in the message): its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh directory for one test's files, `avex-test-{suite}-{pid}-{n}-{name}` in
/// the system's temporary directory.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "avex-test-{suite}-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
