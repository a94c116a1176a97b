//! The `--backend bochs` runner: boot the bare-metal VT-x hypervisor (hv/vmx) with a
//! guest in Bochs, headless, and read back what happened.
//!
//! 1. The guest image (with its translations, if any) and the hypervisor go on a
//!    GRUB ISO (`avex_linker::iso`); the hypervisor's command line carries the mode.
//! 2. A bochsrc (PLATFORM.md's essentials) boots the ISO with COM1 and COM2 mapped to
//!    two files: COM1 carries exactly the guest's console bytes, COM2 the
//!    hypervisor's log, ending with one `AVEX-SUMMARY {json}` line.
//! 3. Bochs runs under an outer time limit; COM1 is streamed to the caller as it
//!    grows. Success is judged by the summary line, never by Bochs' exit status
//!    (the hypervisor ends the run through Bochs' shutdown port, status 1).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use avex_core::exit::Mode;
use avex_core::format;
use avex_core::stats::{ExitStats, Summary};

use crate::backend::{Backend, KernelBoot, RunRequest, RunResult};

/// The bare-metal VT-x hypervisor, booted in Bochs.
pub struct Bochs;

impl Backend for Bochs {
    fn name(&self) -> &'static str {
        "bochs"
    }
    fn run(
        &self,
        req: &RunRequest<'_>,
        console: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<RunResult> {
        run_with_console(req, console)
    }
    fn exits_counted(&self, _: &ExitStats) -> &'static str {
        "the VM exits the VT-x hypervisor's exit handler saw: every exit the exit \
         policy configures (port I/O, MSRs, CPUID, CR0/CR4 writes, RDTSC, HLT, ...) \
         but CR3 moves, which EPT leaves to the guest"
    }
}

/// The Debian packages the Bochs backend needs (Bochs itself and its ROMs).
pub const BOCHS_PACKAGES: &str = "bochs bochsbios vgabios";
/// Emulated instructions per second. Bochs' TSC counts instructions, so this is
/// also the TSC rate the hypervisor is told (`tsc_hz=`). With `clock: sync=none`
/// a lower rate boots faster (the BIOS's waits cost emulated instructions).
pub const DEFAULT_IPS: u64 = 10_000_000;
/// The guest clock a kernel with an initrd gets (`--cpu-mhz` aside): 1 GHz at one
/// instruction per cycle. Bochs still runs at [`DEFAULT_IPS`] (its own UARTs'
/// timing, the hypervisor's log and console, stay cheap); the hypervisor tells
/// the guest this rate and runs the guest's devices on it. At 10 MHz the timer
/// tick came 100 times as often per instruction: Linux's boot took 248,055 exits
/// in `off`, 2/3 of them the tick's, against 93,344 at 1 GHz.
pub const KERNEL_CPU_HZ: u64 = 1_000_000_000;
/// Bochs' RAM in MiB: the hypervisor (a few MiB with its heap use) and the guest's.
pub const DEFAULT_MEGS: u64 = 128;
/// Guest RAM in MiB given to the hypervisor (`mem=`).
pub const DEFAULT_GUEST_MIB: u64 = 16;

const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const VGABIOS: &str = "/usr/share/bochs/VGABIOS-lgpl-latest";

/// How many of the guest's last console lines a stopped guest's diagnosis shows.
const CONSOLE_TAIL_LINES: usize = 12;

/// The summary line's prefix on the hypervisor's log port (COM2).
pub const SUMMARY_PREFIX: &str = "AVEX-SUMMARY ";

/// The hypervisor's flat multiboot image: `$AVEX_VMX_IMAGE` at run time if set,
/// else the one build.rs made.
pub fn hypervisor_image() -> anyhow::Result<Vec<u8>> {
    let path = match std::env::var_os("AVEX_VMX_IMAGE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let built = env!("AVEX_VMX_IMAGE");
            if built.is_empty() {
                bail!(
                    "the VT-x hypervisor image was not built (hv/vmx failed to build: {}); \
                     rebuild avex to see the error",
                    env!("AVEX_VMX_BUILD_ERROR")
                );
            }
            PathBuf::from(built)
        }
    };
    std::fs::read(&path)
        .with_context(|| format!("cannot read the hypervisor image {}", path.display()))
}

/// The guest's clock rate (its TSC's, told to the hypervisor as `tsc_hz`): Bochs'
/// TSC counts instructions at [`DEFAULT_IPS`] a second of Bochs time, and the
/// hypervisor keeps the guest's time at this rate over the same count.
fn guest_cpu_hz(kernel: &KernelBoot) -> u64 {
    match kernel.cpu_mhz {
        Some(mhz) => mhz * 1_000_000,
        None if kernel.initrd.is_some() => KERNEL_CPU_HZ,
        None => DEFAULT_IPS,
    }
}

/// The hypervisor's command-line words for a guest run; `tsc_hz` is the guest's
/// clock rate.
pub fn hypervisor_options(name: &str, mode: Mode, tsc_hz: u64, guest_mib: u64) -> Vec<String> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    vec![
        format!("mode={}", mode.name()),
        format!(
            "guest={}",
            if safe.is_empty() {
                "guest".into()
            } else {
                safe
            }
        ),
        format!("tsc_hz={tsc_hz}"),
        format!("mem={guest_mib}"),
    ]
}

/// Extra hypervisor command-line words from `$AVEX_VMX_OPTIONS` (e.g. `debug`, or
/// `selftest=ud2` to check the hypervisor's exception path).
fn extra_options() -> Vec<String> {
    std::env::var("AVEX_VMX_OPTIONS")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Make a bootable ISO for `elf` (a guest or pre-analyzed image) at `out`.
pub fn make_iso(elf: &[u8], name: &str, mode: Mode, out: &Path) -> anyhow::Result<()> {
    make_kernel_iso(elf, name, mode, &KernelBoot::default(), out)
}

/// [`make_iso`] for a kernel: with its initrd, command line and RAM.
pub fn make_kernel_iso(
    elf: &[u8],
    name: &str,
    mode: Mode,
    kernel: &KernelBoot,
    out: &Path,
) -> anyhow::Result<()> {
    let hv = hypervisor_image()?;
    let spec = avex_linker::iso::IsoSpec {
        hypervisor: &hv,
        guest: elf,
        options: [
            hypervisor_options(
                name,
                mode,
                guest_cpu_hz(kernel),
                kernel.mem_mib.unwrap_or(DEFAULT_GUEST_MIB),
            ),
            extra_options(),
        ]
        .concat(),
        initrd: kernel.initrd,
        guest_cmdline: kernel
            .cmdline
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    };
    avex_linker::iso::make_iso(&spec, out).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Check that Bochs and its ROM images are installed.
pub fn check_bochs() -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("bochs").is_file()))
        .unwrap_or(false);
    if !found {
        bail!("bochs not found: install the Debian packages {BOCHS_PACKAGES} (apt-get install {BOCHS_PACKAGES})");
    }
    for rom in [BIOS, VGABIOS] {
        if !Path::new(rom).is_file() {
            bail!("{rom} not found: install the Debian packages {BOCHS_PACKAGES}");
        }
    }
    Ok(())
}

/// Bochs' RAM in MiB for a run: the default, or for a larger guest its RAM, the
/// ISO's modules GRUB loads (`module_bytes`) and the hypervisor's own use.
pub fn megs_for(guest_mib: u64, module_bytes: u64) -> u64 {
    DEFAULT_MEGS.max(guest_mib + module_bytes.div_ceil(1 << 20) + 64)
}

/// The bochsrc for one run, with `megs` MiB of RAM ([`megs_for`]).
pub fn bochsrc(iso: &Path, com1: &Path, com2: &Path, log: &Path, ips: u64, megs: u64) -> String {
    format!(
        "megs: {megs}\n\
         romimage: file={BIOS}\n\
         vgaromimage: file={VGABIOS}\n\
         display_library: rfb, options=\"timeout=0\"\n\
         cpu: model=corei7_skylake_x, count=1, ips={ips}, reset_on_triple_fault=0\n\
         ata0-master: type=cdrom, path=\"{}\", status=inserted\n\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev=\"{}\"\n\
         com2: enabled=1, mode=file, dev=\"{}\"\n\
         magic_break: enabled=0\n\
         clock: sync=none\n\
         panic: action=fatal\n\
         speaker: enabled=0\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         log: \"{}\"\n",
        iso.display(),
        com1.display(),
        com2.display(),
        log.display()
    )
}

/// Parse the summary line (without its prefix): hv/core's [`Summary`], printed by
/// the hypervisor with the same type.
pub fn parse_summary(json: &str) -> anyhow::Result<Summary> {
    serde_json::from_str(json).context("the AVEX-SUMMARY line is not a summary")
}

/// The guest image to put on the ISO for `req`: its own bytes, or (when the caller
/// brought a translation set from elsewhere, e.g. `--clusters`) the image with that
/// set linked in, so the hypervisor finds it where it looks.
fn image_for(req: &RunRequest) -> Vec<u8> {
    let Some(Ok(set)) = &req.translations else {
        return req.elf.to_vec();
    };
    if let Ok(Some(own)) = avex_linker::read_translation_set(req.elf) {
        if &own == set {
            return req.elf.to_vec();
        }
    }
    match avex_linker::link(req.elf, set) {
        Ok((image, _)) => image,
        // Let the hypervisor judge (and report) a set the linker would not accept.
        Err(_) => {
            avex_linker::embed(req.elf, &format::encode(set)).unwrap_or_else(|_| req.elf.to_vec())
        }
    }
}

/// A scratch directory removed on drop unless `AVEX_KEEP_BOCHS` is set.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("AVEX_KEEP_BOCHS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("avex: Bochs run files kept in {}", self.0.display());
        }
    }
}

fn scratch_dir() -> anyhow::Result<Scratch> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("avex-bochs-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(Scratch(dir))
}

/// Bytes appended to `path` since `*pos`.
fn read_new(path: &Path, pos: &mut u64) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(*pos)).is_ok() && f.read_to_end(&mut out).is_ok() {
            *pos += out.len() as u64;
        }
    }
    out
}

/// The summary's JSON once its whole line has arrived. A line still being sent
/// (no newline yet) is no summary: a long one takes a while through Bochs' UART,
/// and reading it early would cut it short.
fn summary_line(log: &str) -> Option<&str> {
    log.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .find_map(|l| {
            l.trim_end_matches(['\r', '\n'])
                .strip_prefix(SUMMARY_PREFIX)
        })
}

/// Bochs' VNC display (the only one Debian's Bochs has) could not take a port:
/// two Bochs starting at the same moment may both bind 5900 before either
/// listens, and then the later one gives up on every port (its socket is
/// already bound). Nothing has run yet; a second start finds a free port.
#[derive(Debug)]
struct DisplayPortRace;

impl std::fmt::Display for DisplayPortRace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bochs' RFB display could not bind a port between 5900 and 5949")
    }
}

impl std::error::Error for DisplayPortRace {}

/// Whether a run that ended without a summary lost [`DisplayPortRace`]: Bochs
/// said so (in its log or output) before the guest wrote anything.
fn lost_display_port_race(bochs_log: &str, bochs_out: &str, console: &[u8]) -> bool {
    let said = |t: &str| t.contains("RFB could not bind any port");
    console.is_empty() && (said(bochs_log) || said(bochs_out))
}

/// Starts of one run when Bochs' display loses the port race ([`DisplayPortRace`]).
const DISPLAY_PORT_TRIES: u32 = 4;

/// Run `req` in Bochs; `console` gets the guest's console bytes as they come.
pub fn run_with_console(
    req: &RunRequest,
    console: &mut dyn FnMut(&[u8]),
) -> anyhow::Result<RunResult> {
    let mut tries = 1;
    loop {
        match run_once(req, console) {
            Err(e) if e.is::<DisplayPortRace>() && tries < DISPLAY_PORT_TRIES => {
                tries += 1;
                // Apart from the Bochs it raced (its start is a moment, not seconds).
                let pause = 50 + u64::from(std::process::id() % 8) * 40 * u64::from(tries);
                std::thread::sleep(Duration::from_millis(pause));
            }
            other => return other,
        }
    }
}

fn run_once(req: &RunRequest, console: &mut dyn FnMut(&[u8])) -> anyhow::Result<RunResult> {
    if req.coalesce {
        bail!(
            "{}: --coalesce is KVM's coalesced PIO, for --backend kvm (the VT-x \
             hypervisor has no such ring)",
            req.name
        );
    }
    check_bochs()?;
    let dir = scratch_dir()?;
    let d = &dir.0;
    let (iso, com1, com2, log, rc, dbg, out) = (
        d.join("boot.iso"),
        d.join("com1.txt"),
        d.join("com2.txt"),
        d.join("bochs.log"),
        d.join("bochsrc"),
        d.join("debugger.rc"),
        d.join("bochs.out"),
    );
    let image = image_for(req);
    make_kernel_iso(&image, req.name, req.mode, &req.kernel, &iso)
        .with_context(|| format!("{}: cannot make the boot ISO", req.name))?;
    let megs = megs_for(
        req.kernel.mem_mib.unwrap_or(DEFAULT_GUEST_MIB),
        (image.len() + req.kernel.initrd.map_or(0, <[u8]>::len)) as u64,
    );
    std::fs::write(&rc, bochsrc(&iso, &com1, &com2, &log, DEFAULT_IPS, megs))?;
    // Bochs' debugger is always compiled in: continue, and quit when the run ends.
    std::fs::write(&dbg, "c\nquit\n")?;
    let out_file = std::fs::File::create(&out)?;

    let start = Instant::now();
    let mut child = Command::new("bochs")
        .arg("-q")
        .arg("-f")
        .arg(&rc)
        .arg("-rc")
        .arg(&dbg)
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(out_file.try_clone()?)
        .stderr(out_file)
        .spawn()
        .context("cannot start bochs")?;

    let mut console_bytes = Vec::new();
    let mut log_text = String::new();
    let (mut pos1, mut pos2) = (0u64, 0u64);
    let mut timed_out = false;
    loop {
        let exited = child.try_wait()?.is_some();
        let new = read_new(&com1, &mut pos1);
        if !new.is_empty() {
            console(&new);
            console_bytes.extend_from_slice(&new);
        }
        log_text.push_str(&String::from_utf8_lossy(&read_new(&com2, &mut pos2)));
        if exited {
            break;
        }
        if summary_line(&log_text).is_some() {
            // The hypervisor shuts Bochs down right after the summary; give it a
            // moment, then end it ourselves.
            let grace = Instant::now();
            while child.try_wait()?.is_none() && grace.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            let new = read_new(&com1, &mut pos1);
            console(&new);
            console_bytes.extend_from_slice(&new);
            break;
        }
        if start.elapsed() > req.timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = start.elapsed().as_secs_f64();
    log_text.push_str(&String::from_utf8_lossy(&read_new(&com2, &mut pos2)));

    let Some(line) = summary_line(&log_text) else {
        let tail: Vec<&str> = log_text.lines().rev().take(8).collect();
        let bochs_log = std::fs::read_to_string(&log).unwrap_or_default();
        let bochs_out = std::fs::read_to_string(&out).unwrap_or_default();
        if lost_display_port_race(&bochs_log, &bochs_out, &console_bytes) {
            return Err(DisplayPortRace.into());
        }
        let panics: Vec<&str> = bochs_log
            .lines()
            .filter(|l| l.contains("PANIC") || l.contains(">>"))
            .take(4)
            .collect();
        bail!(
            "{}: {} without a summary from the hypervisor.\nhypervisor log (last lines):\n  {}\nBochs: {}",
            req.name,
            if timed_out { format!("Bochs timed out after {:.0} s", req.timeout.as_secs_f64()) } else { "Bochs ended".into() },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n  "),
            if panics.is_empty() { "no panic in its log".to_string() } else { panics.join(" | ") }
        );
    };
    let summary = parse_summary(line)?;
    if let Some(e) = &summary.error {
        let text = String::from_utf8_lossy(&console_bytes);
        let last: Vec<&str> = text.lines().rev().take(CONSOLE_TAIL_LINES).collect();
        bail!(
            "{}: the hypervisor stopped the guest: {e}\nthe guest's last console lines:\n  {}",
            req.name,
            last.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        );
    }
    let Some(stats) = summary.stats else {
        bail!("{}: the hypervisor's summary has no statistics", req.name);
    };
    let mut notes = Vec::new();
    if summary.details.get("halted") == Some(&1) {
        notes.push(
            "the run ended with the guest halted (HLT with interrupts off: nothing can \
             wake it), status 0"
                .to_string(),
        );
    }
    if let Some(r) = &stats.translations_rejected {
        notes.push(format!("translations rejected: {r}"));
    }
    for l in log_text
        .lines()
        .filter(|l| l.contains("forces on") || l.contains("cannot set"))
    {
        notes.push(l.trim().to_string());
    }
    Ok(RunResult {
        status: summary.status,
        stats,
        console: console_bytes,
        seconds,
        details: summary.details,
        notes,
        exit_statistics_unreadable: None,
        time_split: None,
        coalesced: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_the_hypervisor_prints() {
        use avex_core::policy::ExitClass;
        use avex_core::stats::{EarlyStop, ExitReason};
        let line = r#"{"status":0,"mode":"aot+dynamic","guest":"console","stats":{"exits_by_reason":{"io_in":4,"io_out":6},"handled_exits":10,"in_cluster_exiting":15,"in_cluster_exiting_by_class":{"OUT":14,"CPUID":1},"in_cluster_not_exiting_by_class":{"XGETBV":4},"exit_set":["OUT","CPUID"],"early_stops":{"BUDGET":2},"translations_built":1},"details":{"guest_ms":7}}"#;
        let s = parse_summary(line).unwrap();
        assert_eq!(s.status, 0);
        assert_eq!(s.details["guest_ms"], 7);
        assert!(s.error.is_none());
        let st = s.stats.unwrap();
        assert_eq!(st.exits(), 10);
        assert_eq!(st.exit_prone(), 25);
        assert_eq!(st.by_reason[&ExitReason::IoOut], 6);
        assert_eq!(st.in_cluster_by_class[&ExitClass::Cpuid], 1);
        assert_eq!(st.in_cluster_not_exiting(), 4);
        assert_eq!(st.exit_set, [ExitClass::Out, ExitClass::Cpuid]);
        assert_eq!(st.early_stops[&EarlyStop::Budget], 2);
        assert_eq!(st.translations_built, 1);
    }

    #[test]
    fn an_unknown_name_is_an_error_not_a_guess() {
        let line = r#"{"status":0,"stats":{"exits_by_reason":{"io_sideways":1}}}"#;
        assert!(parse_summary(line).is_err());
    }

    #[test]
    fn a_stopped_guest_carries_its_diagnosis() {
        let line =
            r#"{"status":255,"error":"EPT violation: guest write of guest-physical 0x40000000"}"#;
        let s = parse_summary(line).unwrap();
        assert_eq!(s.status, 255);
        assert!(s.error.unwrap().contains("EPT violation"));
    }

    #[test]
    fn finds_the_summary_line_among_log_lines() {
        let log = "avex-vmx: hello\r\nAVEX-SUMMARY {\"status\":3}\r\n";
        assert_eq!(summary_line(log), Some("{\"status\":3}"));
        assert_eq!(summary_line("nothing"), None);
    }

    #[test]
    fn a_summary_line_still_being_sent_is_not_read() {
        let log = "avex-vmx: hello\r\nAVEX-SUMMARY {\"status\":0,\"stats\":{\"exits";
        assert_eq!(summary_line(log), None);
        let whole = format!("{log}_by_reason\":{{}}}}}}\r\n");
        assert!(summary_line(&whole).is_some());
    }

    #[test]
    fn a_kernel_gets_a_gigahertz_clock_and_small_guests_bochs_own_rate() {
        let small = KernelBoot::default();
        assert_eq!(guest_cpu_hz(&small), DEFAULT_IPS);
        let kernel = KernelBoot {
            initrd: Some(b"cpio"),
            ..KernelBoot::default()
        };
        assert_eq!(guest_cpu_hz(&kernel), 1_000_000_000);
        let told = KernelBoot {
            cpu_mhz: Some(250),
            ..kernel
        };
        assert_eq!(guest_cpu_hz(&told), 250_000_000);
        let o = hypervisor_options("vmlinux", Mode::Off, guest_cpu_hz(&told), 256);
        assert!(o.contains(&"tsc_hz=250000000".to_string()), "{o:?}");
    }

    #[test]
    fn options_name_the_mode_and_sanitize_the_guest_name() {
        let o = hypervisor_options("my guest;x", Mode::AotDynamic, 10_000_000, 16);
        assert_eq!(o[0], "mode=aot+dynamic");
        assert_eq!(o[1], "guest=my_guest_x");
        assert!(avex_linker::iso::grub_cfg(&o).is_ok());
    }

    #[test]
    fn a_run_is_started_again_only_when_the_display_lost_the_port_race_before_any_output() {
        // What Bochs 2.7 logged when two runs started together.
        let log =
            "00000264778p[RFB   ] >>PANIC<< RFB could not bind any port between 5900 and 5949";
        assert!(lost_display_port_race(log, "", b""));
        assert!(lost_display_port_race("", log, b""));
        // The guest had written to its console: a second run would repeat it.
        assert!(!lost_display_port_race(log, "", b"avex-linux: start"));
        // Any other end without a summary is reported, not retried.
        assert!(!lost_display_port_race(
            "00000001p[CPU0 ] >>PANIC<< triple fault",
            "",
            b""
        ));
    }

    #[test]
    fn bochsrc_has_the_essentials() {
        let rc = bochsrc(
            Path::new("/t/b.iso"),
            Path::new("/t/1"),
            Path::new("/t/2"),
            Path::new("/t/l"),
            10_000_000,
            DEFAULT_MEGS,
        );
        for k in [
            "rfb",
            "reset_on_triple_fault=0",
            "boot: cdrom",
            "com2: enabled=1",
            "clock: sync=none",
            "ips=10000000",
        ] {
            assert!(rc.contains(k), "{k}");
        }
    }
}
