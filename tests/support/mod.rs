//! Helpers shared by the end-to-end tests (each test file includes this module
//! with `mod support;`; not every file uses every helper).
#![allow(dead_code)]

pub mod aot;
pub mod bochs;
pub mod cguests;
pub mod shapes;

use std::process::Command;

/// The `avex` command built for these tests.
pub fn avex() -> Command {
    Command::new(env!("CARGO_BIN_EXE_avex"))
}
