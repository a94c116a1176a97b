//! A stock Linux kernel on the bare-metal VT-x hypervisor in Bochs:
//! Debian's vmlinux booted by PVH entry with an initramfs made by
//! `avex initramfs` from Debian's busybox-static, whose init prints result lines
//! prefixed `avex-linux: ` and ends the run through the debug-exit port.
//!
//! The kernel and busybox are fetched once with `scripts/linux-fetch.sh`
//! (`apt-get download`, cached in target/linux-kernel). Needs Bochs and the GRUB
//! tools (`.ci/install-bochs.sh`), and apt for the first fetch. The kernel boots
//! twice at once, in `off` and (pre-analyzed by `avex link`) in `aot+dynamic`: a few
//! minutes of wall time in Bochs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::avex;

/// The vmlinux and busybox paths, fetched (or found in the cache) by the script.
fn fetch() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/linux-fetch.sh"))
        .arg(root.join("target/linux-kernel"))
        .output()
        .expect("run scripts/linux-fetch.sh");
    assert!(
        out.status.success(),
        "scripts/linux-fetch.sh could not fetch the kernel and busybox-static: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("linux-fetch.sh printed no {k}=: {text}"))
    };
    (get("vmlinux"), get("busybox"))
}

fn initramfs(busybox: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("initramfs.cpio");
    support::run_ok(
        avex()
            .arg("initramfs")
            .arg("--busybox")
            .arg(busybox)
            .arg("-o")
            .arg(&out),
    );
    out
}

fn scratch(name: &str) -> PathBuf {
    support::scratch("linux", name)
}

/// The workload's result lines (`avex-linux: ...`) of a console.
fn result_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("avex-linux: "))
        .collect()
}

/// The kernel command line words the tests add to avex's default: Bochs runs the
/// guest at about ten million instructions a second, so skip the W+X page-table
/// walks and the crypto self-tests (minutes of Bochs time between them), the
/// page-table switch at every system call, and the soft-lockup watchdog's noise.
const APPEND: &str = "rodata=off nowatchdog nopti cryptomgr.notests";

/// One boot of `image` in `mode`: the console, avex's own output (stderr) and
/// the run's JSON record.
fn boot(image: &Path, cpio: &Path, mode: &str, dir: &Path) -> (String, String, serde_json::Value) {
    let json = dir.join(format!("{}.json", mode.replace('+', "_")));
    let out = avex()
        .args(["run", "--backend", "bochs", "--mode", mode])
        .args(["--timeout", "1200"])
        .arg("--initrd")
        .arg(cpio)
        .args(["--append", APPEND])
        .arg("--json")
        .arg(&json)
        .arg(image)
        .output()
        .expect("run avex");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(dir.join(format!("{mode}.console.txt")), &console).unwrap();
    std::fs::write(dir.join(format!("{mode}.stderr.txt")), &stderr).unwrap();
    let tail: Vec<&str> = console.lines().rev().take(15).collect();
    assert!(
        out.status.success(),
        "avex run in {mode} failed ({}): {}\nlast console lines:\n{}",
        out.status,
        stderr,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let record = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (console, stderr, record)
}

/// What the workload must print in any mode.
fn check_workload(console: &str) {
    let lines = result_lines(console);
    assert_eq!(lines.first(), Some(&"avex-linux: start"), "{console}");
    assert!(
        lines.iter().any(|l| l.starts_with("avex-linux: kernel 6.")),
        "{lines:?}"
    );
    // The PIT and the 16550 interrupt through the 8259.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("avex-linux: irq 0 ") && l.ends_with("timer")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("avex-linux: irq 4 ") && l.ends_with("ttyS0")),
        "{lines:?}"
    );
    // Interrupt-driven tty output after boot: every line, in order.
    let tty: Vec<&&str> = lines.iter().filter(|l| l.contains(" tty line ")).collect();
    assert_eq!(tty.len(), 200, "{lines:?}");
    for (i, l) in tty.iter().enumerate() {
        assert_eq!(**l, format!("avex-linux: tty line {i} of 200"));
    }
    // `seq 1 20000` is 108894 bytes.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("avex-linux: tmpfs ") && l.ends_with(" 108894 bytes")),
        "{lines:?}"
    );
    assert_eq!(lines.last(), Some(&"avex-linux: done"));
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn stock_debian_kernel_runs_the_workload_in_every_mode_with_the_same_lines() {
    let (vmlinux, busybox) = fetch();
    let dir = scratch("modes");
    let cpio = initramfs(&busybox, &dir);
    // The pre-analyzed kernel: the stock ELF plus its translations section.
    let pre = dir.join("vmlinux.pre");
    support::run_ok(avex().arg("link").arg(&vmlinux).arg("-o").arg(&pre));
    // Every mode, side by side: the same result lines as `off` is the contract.
    let (off, ad, others) = std::thread::scope(|s| {
        let off = s.spawn(|| boot(&vmlinux, &cpio, "off", &dir));
        let ad = s.spawn(|| boot(&pre, &cpio, "aot+dynamic", &dir));
        let (pre, cpio, dir) = (&pre, &cpio, &dir);
        let others: Vec<_> = ["dynamic", "aot"]
            .map(|m| (m, s.spawn(move || boot(pre, cpio, m, dir))))
            .into_iter()
            .map(|(m, h)| (m, h.join().unwrap()))
            .collect();
        (off.join().unwrap(), ad.join().unwrap(), others)
    });
    let ((off, _, off_record), (ad, ad_stderr, ad_record)) = (off, ad);
    // The guest's clock: a kernel's default 1 GHz (`--cpu-mhz`), the TSC's rate
    // from CPUID leaf 0x15, and a TSC the kernel keeps as its clocksource (it
    // agrees with the PIT's ticks, which it does not when the hypervisor's work
    // is on the guest's clock).
    assert!(
        off.contains("tsc: Detected 1000.000 MHz processor"),
        "{off}"
    );
    assert!(
        off.contains("clocksource: Switched to clocksource tsc\n")
            || off.contains("clocksource: Switched to clocksource tsc\r\n"),
        "{off}"
    );
    check_workload(&off);
    assert_eq!(off_record["status"], 0);
    // The same result lines with clusters, and fewer exits.
    assert_eq!(result_lines(&ad), result_lines(&off));
    assert_eq!(ad_record["status"], 0);
    for (mode, (console, _, record)) in &others {
        assert_eq!(result_lines(console), result_lines(&off), "{mode}");
        assert_eq!(record["status"], 0, "{mode}");
    }
    let exits = |r: &serde_json::Value| r["exits"].as_u64().unwrap();
    eprintln!(
        "Linux boot and workload: {} exits in off, {} in aot+dynamic",
        exits(&off_record),
        exits(&ad_record)
    );
    // Issue 10's goal: at least half fewer exits with clusters.
    assert!(
        exits(&ad_record) * 2 <= exits(&off_record),
        "aot+dynamic {} exits, off {}: not half fewer",
        exits(&ad_record),
        exits(&off_record)
    );
    // Issue 9's goal: the 8250 console's port exits (0x3f8..0x3ff) fall by at
    // least 90% (clusters through io_serial_in/out and their callers).
    let console_ports = |r: &serde_json::Value| -> u64 {
        let ports = r["port_exits"].as_object().expect("port_exits");
        ports
            .iter()
            .filter(|(p, _)| p.parse::<u16>().is_ok_and(|p| (0x3f8..=0x3ff).contains(&p)))
            .map(|(_, n)| n.as_u64().unwrap())
            .sum()
    };
    let (con_off, con_ad) = (console_ports(&off_record), console_ports(&ad_record));
    eprintln!("console port exits: {con_off} in off, {con_ad} in aot+dynamic");
    assert!(
        con_off > 10_000 && con_ad * 10 <= con_off,
        "console port exits: off {con_off}, aot+dynamic {con_ad}: not 90% fewer"
    );
    // The stripped vmlinux names its hottest exit sites from the kernel's own
    // kallsyms tables: the 8250 console's port accesses are among them.
    let hot: Vec<&str> = ad_stderr
        .lines()
        .skip_while(|l| !l.starts_with("hottest exit sites"))
        .collect();
    assert!(
        hot.iter()
            .any(|l| l.contains("serial8250") || l.contains("io_serial")),
        "{ad_stderr}"
    );
}

/// `avex link` on the stock kernel translates no byte the kernel rewrites at boot
/// (its alternatives, paravirt calls, retpoline and return-thunk sites, SMP lock
/// prefixes): such a translation would be dropped as stale before its first run.
/// Before regions stopped at them, 156 of the 249 translations held such bytes.
#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs the kernel scripts/linux-fetch.sh fetches with the Bochs tools (.ci/install-bochs.sh)"
)]
fn no_aot_translation_of_the_stock_kernel_holds_bytes_it_patches_at_boot() {
    let (vmlinux, _) = fetch();
    let dir = scratch("patch");
    let pre = dir.join("vmlinux.pre");
    support::run_ok(avex().arg("link").arg(&vmlinux).arg("-o").arg(&pre));
    let raw = std::fs::read(&vmlinux).unwrap();
    let elf = avex_aot::elf::parse(&raw).unwrap();
    let patches = avex_aot::patch::PatchSites::of_elf(&elf);
    let count = |k| {
        patches
            .by_kind
            .iter()
            .find(|(kind, _)| *kind == k)
            .map_or(0, |(_, n)| *n)
    };
    use avex_aot::patch::PatchKind;
    // Every function returns through a return-thunk site; the tables all read.
    assert!(count(PatchKind::Return) > 10_000, "{:?}", patches.by_kind);
    for k in [
        PatchKind::Alternative,
        PatchKind::Paravirt,
        PatchKind::Retpoline,
        PatchKind::SmpLock,
    ] {
        assert!(count(k) > 100, "{k:?}: {:?}", patches.by_kind);
    }
    let set = avex_linker::read_translation_set(&std::fs::read(&pre).unwrap())
        .unwrap()
        .expect("translations");
    assert!(!set.clusters.is_empty());
    for c in &set.clusters {
        for r in &c.code {
            let end = r.start + r.bytes.len() as u64;
            assert!(
                !patches.overlaps(r.start, end),
                "translation at {:#x} holds patched bytes in {:#x}..{end:#x}: {:?}",
                c.entry_rip().unwrap_or(0),
                r.start,
                patches.kinds_in(r.start, end)
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_initrd_needs_a_readable_file_and_a_pvh_kernel() {
    let dir = scratch("errors");
    let missing = dir.join("no-such-initrd");
    let o = avex()
        .args(["run", "console", "--backend", "bochs", "--initrd"])
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("initrd {}: cannot read it", missing.display())),
        "{err}"
    );
    // A bundled guest is a plain ELF64, not a PVH kernel.
    let cpio = dir.join("initrd");
    std::fs::write(&cpio, b"070701").unwrap();
    let o = avex()
        .args(["run", "console", "--backend", "bochs", "--initrd"])
        .arg(&cpio)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("console: not a PVH kernel") && err.contains("distribution kernels"),
        "{err}"
    );
}
