//! Shape guests: small C guests in `tests/shapes/`, written as drivers are and
//! compiled by gcc when a test first asks for one. Each is a regression case for a
//! code shape that once made a clustered run differ from mode `off`; every mode
//! on every backend must print the same bytes as `off`.
//!
//! They follow the boot ABI of guest-kernels/README.md: a static ELF64 linked at
//! 1 MiB, entered in 64-bit mode by `start.S`, console on COM1, status to port
//! 0xf4. Built with `-mgeneral-regs-only` (KVM here cannot emulate SSE).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The directory of the sources.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shapes")
}

/// Every shape, by name (the `.c` files of `tests/shapes/`), sorted.
pub fn all() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(source_dir())
        .expect("tests/shapes")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "c").then(|| p.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    names
}

/// The flags every shape is built with, `opt` being `-O2` or `-Os`.
fn gcc_args(opt: &str) -> Vec<&str> {
    vec![
        opt,
        "-ffreestanding",
        "-fno-pic",
        "-no-pie",
        "-nostdlib",
        "-static",
        "-mgeneral-regs-only",
        "-mno-red-zone",
        "-fno-stack-protector",
        "-fcf-protection=none",
        "-fno-asynchronous-unwind-tables",
        "-Wall",
        "-Werror",
        "-Wl,-Ttext-segment=0x100000",
        "-Wl,--build-id=none",
        "-Wl,-n",
        "-Wl,--no-warn-rwx-segments",
        "-Wl,-e,_start",
    ]
}

/// Build shape `name` with `-O2` (cached for the test process) and return the
/// path of its ELF. Panics with gcc's message if it does not build.
pub fn build(name: &str) -> PathBuf {
    build_with(name, "-O2")
}

/// [`build`] with another optimisation flag (`-Os`, `-O1`...).
pub fn build_with(name: &str, opt: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(String, String), PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let key = (name.to_owned(), opt.to_owned());
    if let Some(p) = built.get_or_insert_with(HashMap::new).get(&key) {
        return p.clone();
    }
    let dir = std::env::temp_dir().join(format!("avex-shapes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}{opt}.elf"));
    let src = source_dir();
    let o = Command::new("gcc")
        .args(gcc_args(opt))
        .arg("-o")
        .arg(&out)
        .arg(src.join("start.S"))
        .arg(src.join(format!("{name}.c")))
        .output()
        .unwrap_or_else(|e| panic!("cannot run gcc for shape {name}: {e}"));
    assert!(
        o.status.success(),
        "shape {name} did not build:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    built.as_mut().unwrap().insert(key, out.clone());
    out
}

/// The ELF bytes of shape `name` built with `-O2`.
pub fn elf(name: &str) -> Vec<u8> {
    std::fs::read(build(name)).expect("shape ELF")
}
