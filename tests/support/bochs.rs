//! Running guests on the VT-x hypervisor in Bochs (`avex run --backend bochs`)
//! for the tests/bochs*.rs files: runs two at a time, shape guests in every mode,
//! and the small hand-made ELF guests.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::avex;

pub fn scratch(name: &str) -> PathBuf {
    super::scratch("bochs", name)
}

/// One `avex run --backend bochs` result: the JSON record and the console bytes.
#[derive(Debug, Clone)]
pub struct Run {
    pub record: Value,
    pub console: Vec<u8>,
}

impl Run {
    pub fn exits(&self) -> u64 {
        self.record["exits"].as_u64().unwrap()
    }
    pub fn rejected(&self) -> Option<String> {
        self.record["translations_rejected"]
            .as_str()
            .map(str::to_string)
    }
}

pub fn run_bochs(image: &Path, mode: &str) -> Run {
    let r = try_run_bochs(image, mode).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.record["status"],
        0,
        "{} in {mode}: guest status",
        image.display()
    );
    r
}

/// [`run_bochs`] without its assertions: the run, or why it failed.
pub fn try_run_bochs(image: &Path, mode: &str) -> Result<Run, String> {
    let json = image.with_extension(format!("{}.json", mode.replace('+', "_")));
    let out = avex()
        .arg("run")
        .arg("--backend")
        .arg("bochs")
        .arg("--mode")
        .arg(mode)
        .arg("--timeout")
        .arg("120")
        .arg("--json")
        .arg(&json)
        .arg(image)
        .output()
        .expect("run avex");
    if !out.status.success() {
        return Err(format!(
            "{} in {mode}: avex failed ({}):\n{}\n{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let record: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(record["backend"], "bochs");
    Ok(Run {
        record,
        console: out.stdout,
    })
}

pub fn link(elf: &Path, out: &Path) {
    super::run_ok(avex().arg("link").arg(elf).arg("-o").arg(out));
}

/// `image` run in mode `off` and in `aot+dynamic`, side by side: `[off, aot+dynamic]`.
pub fn off_and_aot_dynamic(image: &Path) -> Vec<Run> {
    let jobs: Vec<Job<Run>> = ["off", "aot+dynamic"]
        .into_iter()
        .map(|mode| {
            let p = image.to_path_buf();
            Box::new(move || run_bochs(&p, mode)) as Job<Run>
        })
        .collect();
    parallel(jobs)
}

/// A job for [`parallel`].
pub type Job<T> = Box<dyn FnOnce() -> T + Send>;

/// Run `jobs` two at a time (the machines this runs on have two cores).
pub fn parallel<T: Send>(jobs: Vec<Job<T>>) -> Vec<T> {
    let n = jobs.len();
    let jobs = std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let results = std::sync::Mutex::new((0..n).map(|_| None).collect::<Vec<Option<T>>>());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some((i, job)) = jobs.lock().unwrap().pop() else {
                    break;
                };
                let r = job();
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("job ran"))
        .collect()
}

/// A static ELF64 with `code` as one RWX segment at 1 MiB, entered at its start.
pub fn elf64_at_1mib(code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 0x1000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELF64
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    elf[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    elf[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    elf[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // memsz
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(code);
    elf
}

/// `avex run --backend bochs` for a guest the hypervisor must stop: it fails, and
/// its error carries the hypervisor's diagnosis.
pub fn run_bochs_failing(image: &Path) -> String {
    run_bochs_failing_with(image, &[])
}

/// [`run_bochs_failing`] with environment variables set (`AVEX_VMX_OPTIONS`).
pub fn run_bochs_failing_with(image: &Path, env: &[(&str, &str)]) -> String {
    let out = avex()
        .args([
            "run",
            "--backend",
            "bochs",
            "--mode",
            "off",
            "--timeout",
            "120",
        ])
        .arg(image)
        .envs(env.iter().copied())
        .output()
        .expect("run avex");
    assert!(
        !out.status.success(),
        "{} should have been stopped",
        image.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A static ELF32 with `code` as one RWX segment at 1 MiB (entered in 32-bit
/// protected mode with paging off, by the boot ABI's multiboot convention).
pub fn elf32_at_1mib(code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 0x1000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 1; // ELF32
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&3u16.to_le_bytes()); // i386
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..28].copy_from_slice(&0x10_0000u32.to_le_bytes()); // entry
    elf[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
    elf[40..42].copy_from_slice(&52u16.to_le_bytes());
    elf[42..44].copy_from_slice(&32u16.to_le_bytes());
    elf[44..46].copy_from_slice(&1u16.to_le_bytes());
    elf[46..48].copy_from_slice(&40u16.to_le_bytes());
    let ph = 52;
    for (i, v) in [
        1u32,
        0x1000,
        0x10_0000,
        0x10_0000,
        code.len() as u32,
        0x1000,
        7,
        0x1000,
    ]
    .into_iter()
    .enumerate()
    {
        elf[ph + 4 * i..ph + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Every clustering mode.
pub const MODES: [&str; 4] = ["off", "dynamic", "aot", "aot+dynamic"];

/// A run, or why `avex` failed.
pub type Tried = Result<Run, String>;

/// Build shape guest `name`, pre-analyze it with `avex link`, and run it in each of
/// `modes`: the runs in `modes` order.
pub fn shape_runs(name: &str, modes: &[&'static str]) -> Vec<Tried> {
    let pre = scratch(name).join(format!("{name}.pre.elf"));
    link(&super::shapes::build(name), &pre);
    runs_in_modes(&pre, modes)
}

/// Run `image` in each of `modes` (two runs at a time): the runs in `modes` order.
pub fn runs_in_modes(image: &Path, modes: &[&'static str]) -> Vec<Tried> {
    let jobs: Vec<Job<Tried>> = modes
        .iter()
        .map(|&mode| {
            let image = image.to_path_buf();
            Box::new(move || try_run_bochs(&image, mode)) as Job<_>
        })
        .collect();
    parallel(jobs)
}

/// How each mode's run of a guest differs from mode `off`'s (console bytes and
/// status), one line per difference; `runs[0]` is `off`'s.
pub fn differences_from_off(name: &str, modes: &[&str], runs: &[Tried]) -> Vec<String> {
    let mut diffs = Vec::new();
    let off = match &runs[0] {
        Ok(r) => r,
        Err(e) => return vec![format!("{name} in off: {e}")],
    };
    for (mode, run) in modes.iter().zip(runs).skip(1) {
        match run {
            Err(e) => diffs.push(format!("{name} in {mode}: {e}")),
            Ok(r) if r.console != off.console || r.record["status"] != off.record["status"] => {
                diffs.push(format!(
                    "{name}: {mode} differs from off (status {} vs {}):\n--- off\n{}\n--- {mode}\n{}",
                    r.record["status"],
                    off.record["status"],
                    String::from_utf8_lossy(&off.console),
                    String::from_utf8_lossy(&r.console)
                ))
            }
            Ok(_) => {}
        }
    }
    diffs
}

/// Run shape `name` in every mode: every mode prints what `off` prints, with status
/// 0, and `off`'s console is `expected` (what the CPU does).
pub fn shape_prints_in_every_mode(name: &str, expected: &str) {
    let runs = shape_runs(name, &MODES);
    let diffs = differences_from_off(name, &MODES, &runs);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let off = runs[0].as_ref().unwrap();
    assert_eq!(off.record["status"], 0, "{}", off.record);
    assert_eq!(String::from_utf8_lossy(&off.console), expected);
}

/// Assembles and links a 32-bit guest written in assembly (`source`) at 1 MiB, as
/// the boot ABI loads ELF32 guests; returns the ELF's path in `dir`.
pub fn assemble32(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    std::fs::write(&src, source).unwrap();
    let elf = dir.join(format!("{name}.elf"));
    let o = Command::new("gcc")
        .args(["-m32", "-nostdlib", "-static", "-no-pie"])
        .args([
            "-Wl,-Ttext-segment=0x100000",
            "-Wl,--build-id=none",
            "-Wl,-n",
        ])
        .args(["-Wl,--no-warn-rwx-segments", "-Wl,-e,_start", "-o"])
        .arg(&elf)
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    elf
}

/// A 64-bit guest that prints `[AA\n` with a cluster of OUTs, then increments the
/// immediate of the `mov al, 'A'` inside that cluster, three times over: the right
/// output is `[AA\n[BB\n[CC\n`.
pub fn self_modifying_guest() -> Vec<u8> {
    #[rustfmt::skip]
    let code: Vec<u8> = vec![
        0x48, 0xc7, 0xc4, 0x00, 0x00, 0x18, 0x00, //  0: mov rsp, 0x180000
        0xb9, 0x03, 0x00, 0x00, 0x00,             //  7: mov ecx, 3
        0xe8, 0x11, 0x00, 0x00, 0x00,             // 12: call print (34)
        0xfe, 0x05, 0x13, 0x00, 0x00, 0x00,       // 17: inc byte [rip + 19] (42)
        0xff, 0xc9,                               // 23: dec ecx
        0x75, 0xf1,                               // 25: jnz 12
        0x31, 0xc0,                               // 27: xor eax, eax
        0xe6, 0xf4,                               // 29: out 0xf4, al
        0xf4,                                     // 31: hlt
        0xeb, 0xfd,                               // 32: jmp 31
        0x66, 0xba, 0xf8, 0x03,                   // 34: print: mov dx, 0x3f8
        0xb0, b'[',                               // 38: mov al, '['
        0xee,                                     // 40: out dx, al
        0xb0, b'A',                               // 41: mov al, 'A' (patched)
        0xee,                                     // 43: out dx, al
        0xee,                                     // 44: out dx, al
        0xb0, b'\n',                              // 45: mov al, '\n'
        0xee,                                     // 47: out dx, al
        0xc3,                                     // 48: ret
    ];
    elf64_at_1mib(&code)
}
