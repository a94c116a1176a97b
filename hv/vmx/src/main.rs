//! avex's bare-metal VT-x hypervisor.
//!
//! Booted by GRUB (multiboot1) from an ISO, it enters long mode, sets up its own
//! GDT/TSS/IDT, heap and serial ports, reports the ACPI processors and APICs, turns
//! VMX on and runs the guest given as a GRUB module through hv/core: the guest is
//! confined to its own RAM by EPT, its exiting instructions are handled by hv/core's
//! exit handler and device models, and clusters of them run through hv/core's engine.
//!
//! COM1 carries the guest's console bytes only; COM2 carries the hypervisor's log and
//! the final `AVEX-SUMMARY {...}` line (see `serial`).
#![no_std]
#![no_main]

extern crate alloc;

mod acpi_info;
mod boot;
mod cpu;
mod ept;
mod exit_reason;
mod heap;
#[path = "../../../build/freestanding_mem.rs"]
mod mem;
mod multiboot;
mod run;
mod serial;
mod vcpu;
mod vmx;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

use avex_core::distance::{DistanceMeter, ExitDistance};
use avex_core::exit::{ExitHandler, Mode};
use avex_core::format as tformat;
use avex_core::policy::ExitPolicy;
use avex_core::policy::ExitClass;
use avex_core::stats::{BackendExits, ExitStats, Summary};

/// The name of the section `avex link` writes the translations to.
const TRANSLATIONS_SECTION: &str = ".avex.translations";
/// Guest RAM when the command line does not say (`mem=<MiB>`).
const DEFAULT_GUEST_MIB: u64 = 16;
/// Bochs' TSC counts emulated instructions: its rate is the configured `ips`.
const DEFAULT_TSC_HZ: u64 = 10_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(DEFAULT_TSC_HZ);

fn clock_ns() -> u64 {
    // SAFETY: RDTSC has no memory effects.
    let t = unsafe { core::arch::x86_64::_rdtsc() };
    ((u128::from(t) * 1_000_000_000) / u128::from(TSC_HZ.load(Ordering::Relaxed).max(1))) as u64
}

/// The hypervisor's command line: `key=value` words (the first word may be the
/// image's path, as some loaders pass it).
struct Options {
    mode: Mode,
    guest_mib: u64,
    tsc_hz: u64,
    debug: bool,
    name: String,
    guest_cmdline: String,
}

fn parse_options(cmdline: &str) -> Result<Options, String> {
    let mut o = Options {
        mode: Mode::AotDynamic,
        guest_mib: DEFAULT_GUEST_MIB,
        tsc_hz: DEFAULT_TSC_HZ,
        debug: false,
        name: String::from("guest"),
        guest_cmdline: String::new(),
    };
    for word in cmdline.split_whitespace() {
        let (k, val) = word.split_once('=').unwrap_or((word, ""));
        match k {
            "mode" => {
                o.mode = Mode::parse(val).ok_or_else(|| {
                    format!("unknown mode {val:?} (off, dynamic, aot, aot+dynamic)")
                })?
            }
            "mem" => {
                o.guest_mib = val
                    .parse()
                    .map_err(|_| format!("mem={val}: not a number of MiB"))?;
                o.guest_mib = (o.guest_mib.clamp(2, 2048) + 1) & !1;
            }
            "tsc_hz" => {
                o.tsc_hz = val
                    .parse()
                    .map_err(|_| format!("tsc_hz={val}: not a number"))?
            }
            "debug" => o.debug = true,
            "guest" => o.name = val.to_string(),
            "cmdline" => o.guest_cmdline = val.replace(',', " "),
            _ => {}
        }
    }
    Ok(o)
}

/// Print the machine-readable summary line (hv/core's `stats::Summary` as JSON, read
/// back by the host into the same type) and end the run.
fn finish(
    status: u8,
    error: Option<&str>,
    opts: Option<&Options>,
    handler: Option<&ExitHandler>,
    distance: Option<ExitDistance>,
    details: BTreeMap<String, u64>,
) -> ! {
    let summary = Summary {
        status,
        mode: opts.map(|o| o.mode.name().to_string()),
        guest: opts.map(|o| o.name.clone()),
        error: error.map(str::to_string),
        stats: handler.map(|h| ExitStats {
            exit_distance: distance,
            ..h.stats().clone()
        }),
        details,
    };
    if let Some(s) = &summary.stats {
        for l in s.summary().lines() {
            logln!("avex-vmx: {l}");
        }
    }
    match serde_json::to_string(&summary) {
        Ok(json) => logln!("AVEX-SUMMARY {json}"),
        // Only a serialiser bug gets here: still end with a line the host can read.
        Err(_) => logln!("AVEX-SUMMARY {{\"status\":255,\"error\":\"summary not serialisable\"}}"),
    }
    cpu::shutdown()
}

fn stop(error: &str) -> ! {
    logln!("avex-vmx: {error}");
    finish(255, Some(error), None, None, None, BTreeMap::new())
}

#[no_mangle]
extern "C" fn kmain(magic: u32, mbi: u32) -> ! {
    serial::init();
    cpu::mask_pic();
    cpu::init();
    logln!("avex-vmx: hypervisor up (long mode, GDT/TSS/IDT loaded)");
    if magic != multiboot::MAGIC {
        logln!("avex-vmx: not started by a multiboot loader (magic {magic:#x})");
        cpu::shutdown();
    }
    let info = multiboot::Info::new(u64::from(mbi));
    heap::init(&info);
    let cmdline = info.cmdline();
    logln!("avex-vmx: command line: {cmdline}");
    acpi_info::report();
    let opts = match parse_options(&cmdline) {
        Ok(o) => o,
        Err(e) => stop(&format!("bad command line: {e}")),
    };
    TSC_HZ.store(opts.tsc_hz, Ordering::Relaxed);
    if cmdline.split_whitespace().any(|w| w == "selftest=ud2") {
        // Check the exception path: the stub must print a diagnosis and end the run.
        logln!("avex-vmx: self-test: executing UD2 in the hypervisor");
        // SAFETY: raises #UD, which the IDT's stub reports before ending the run.
        unsafe { core::arch::asm!("ud2") };
    }
    let modules = info.modules();
    for m in &modules {
        logln!(
            "avex-vmx: module {:#x}..{:#x} {}",
            m.start,
            m.end,
            m.cmdline
        );
    }
    // Each module's line is `<role> [words...]` (GRUB 2 passes what follows the
    // path; some loaders keep the path first, skipped here). The guest is the
    // module whose role is `guest` (else the first); its further words are the
    // guest's command line. An `initrd` module goes to a PVH kernel as module 0.
    let words = |m: &multiboot::Module| -> alloc::vec::Vec<String> {
        let mut w = m.cmdline.split_whitespace().peekable();
        if w.peek().is_some_and(|first| first.starts_with('/')) {
            w.next();
        }
        w.map(str::to_string).collect()
    };
    let role = |m: &multiboot::Module| words(m).first().cloned();
    let Some(module) = modules
        .iter()
        .find(|m| role(m).as_deref() == Some("guest"))
        .or(modules.first())
    else {
        stop("no guest: GRUB passed no module (grub.cfg needs `module /boot/<guest>.elf`)");
    };
    let module_cmdline = words(module).get(1..).unwrap_or_default().join(" ");
    let guest_cmdline = if module_cmdline.is_empty() {
        opts.guest_cmdline.clone()
    } else {
        module_cmdline
    };
    // SAFETY: GRUB loaded the module at start..end in identity-mapped RAM that the
    // heap does not cover; it is only read.
    let elf = unsafe {
        core::slice::from_raw_parts(
            module.start as *const u8,
            (module.end - module.start) as usize,
        )
    };
    let initrd = modules
        .iter()
        .find(|m| role(m).as_deref() == Some("initrd"))
        .map(|m| {
            // SAFETY: as for the guest module.
            unsafe { core::slice::from_raw_parts(m.start as *const u8, (m.end - m.start) as usize) }
        });

    let caps = match vmx::enable() {
        Ok(c) => c,
        Err(e) => stop(&format!("VMX unavailable: {e}")),
    };
    logln!("vmx: VMXON done");

    let Some(mut ram) = ept::GuestRam::new(opts.guest_mib << 20) else {
        stop(&format!(
            "cannot allocate {} MiB of guest RAM",
            opts.guest_mib
        ));
    };
    let image = match avex_core::boot::load_kernel(elf, ram.as_mut_slice(), &guest_cmdline, initrd)
    {
        Ok(i) => i,
        Err(e) => stop(&format!(
            "guest image {:?} rejected by the loader: {e}",
            opts.name
        )),
    };
    logln!(
        "avex-vmx: guest {:?} loaded: {:?} entry {:#x}, image {:#x}..{:#x}, {} MiB RAM, mode {}",
        opts.name,
        image.mode,
        image.entry,
        image.image_start,
        image.image_end,
        opts.guest_mib,
        opts.mode
    );
    if let Some(rd) = initrd {
        logln!(
            "avex-vmx: initrd of {} bytes, command line: {guest_cmdline}",
            rd.len()
        );
    }

    let policy = ExitPolicy::default();
    let mut handler = ExitHandler::new(opts.mode, policy.clone()).with_clock(clock_ns);
    load_translations(elf, &opts, &mut handler);

    let mut vcpu = match vcpu::Vcpu::new(caps, ram, &image, &policy, opts.tsc_hz) {
        Ok(v) => v,
        Err(e) => stop(&format!("VMCS setup failed: {e}")),
    };
    vcpu.set_debug(opts.debug);
    // The classes that exit here: the policy's, less the CR3 moves the VMCS does
    // not intercept under EPT (they run natively, and in clusters are not avoided).
    let (cr3_load, cr3_store) = vcpu.cr3_exits();
    let exits = BackendExits::only(BackendExits::of_policy(&policy).classes().filter(|&c| {
        (c != ExitClass::MovToCr3 || cr3_load) && (c != ExitClass::MovFromCr3 || cr3_store)
    }));
    handler = handler.with_backend_exits(exits);
    let n = run::protect_translated_pages(&mut vcpu, &handler);
    if n > 0 {
        logln!("avex-vmx: {n} code page(s) with translations write-protected");
    }
    let t0 = clock_ns();
    logln!(
        "avex-vmx: entering the guest at {} ms of machine time",
        t0 / 1_000_000
    );
    let mut meter = DistanceMeter::new("bochs_tsc");
    let outcome = run::run(&mut vcpu, &mut handler, &mut meter);
    let distance = Some(meter.into_histogram());
    let mut extra = BTreeMap::new();
    let c = vcpu.counters();
    extra.insert("code_page_writes".into(), c.code_page_writes);
    extra.insert("interrupts".into(), c.interrupts);
    extra.insert("ticks_guest".into(), c.ticks_guest);
    extra.insert("ticks_handler".into(), c.ticks_handler);
    extra.insert("ticks_clusters".into(), c.ticks_clusters);
    let guest_ms = clock_ns().saturating_sub(t0) / 1_000_000;
    extra.insert("guest_ms".into(), guest_ms);
    logln!("avex-vmx: the guest ran for {guest_ms} ms of machine time");
    match outcome {
        run::Outcome::Exited(status) => {
            logln!("avex-vmx: guest exited with status {status}");
            finish(status, None, Some(&opts), Some(&handler), distance, extra)
        }
        run::Outcome::Halted { rip } => {
            logln!(
                "avex-vmx: the guest halted at {rip:#x} with interrupts off: nothing can wake \
                 it, so its run ends (status 0, halted)"
            );
            extra.insert("halted".into(), 1);
            finish(0, None, Some(&opts), Some(&handler), distance, extra)
        }
        run::Outcome::Stopped(why) => {
            logln!("avex-vmx: GUEST STOPPED: {why}");
            finish(
                255,
                Some(&why),
                Some(&opts),
                Some(&handler),
                distance,
                extra,
            )
        }
    }
}

/// Find, decode and check the image's translations; a rejection is printed with
/// its reason and the guest runs on dynamic clustering (if the mode has it).
fn load_translations(elf: &[u8], opts: &Options, handler: &mut ExitHandler) {
    let section = avex_core::elf::ElfFile::parse(elf)
        .ok()
        .and_then(|f| f.section_named(TRANSLATIONS_SECTION));
    let Some(bytes) = section else {
        logln!("avex-vmx: no {TRANSLATIONS_SECTION} section in the guest image");
        return;
    };
    if !opts.mode.uses_aot() {
        logln!(
            "avex-vmx: {TRANSLATIONS_SECTION} present ({} bytes), not used in mode {}",
            bytes.len(),
            opts.mode
        );
        return;
    }
    let set = match tformat::decode_checked(bytes) {
        Ok(s) => s,
        Err(e) => {
            let why = format!("damaged translations: {e}");
            logln!("avex-vmx: translations rejected: {why}; continuing on dynamic clustering");
            handler.reject_translations(why);
            return;
        }
    };
    // The running guest's identity, computed as the linker and the KVM backend do.
    // Its cost is logged: it reads every loadable byte of the image (about 60 MB for
    // Linux), under Bochs' emulation.
    let t0 = clock_ns();
    let digest = avex_core::identity::of_elf(elf).unwrap_or([0; 32]);
    logln!(
        "avex-vmx: guest identity over the {} byte image in {} ms of guest clock",
        elf.len(),
        clock_ns().saturating_sub(t0) / 1_000_000
    );
    match handler.load_translations(set, &digest) {
        Ok(n) => logln!("avex-vmx: {n} translations loaded from {TRANSLATIONS_SECTION}"),
        Err(why) => {
            logln!("avex-vmx: translations rejected: {why}; continuing on dynamic clustering")
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    serial::log_unlocked(format_args!("\navex-vmx: PANIC: {info}\n"));
    serial::log_unlocked(format_args!(
        "AVEX-SUMMARY {{\"status\":255,\"error\":\"hypervisor panic\"}}\n"
    ));
    cpu::shutdown()
}

/// The prebuilt `liballoc` was compiled with unwinding; nothing here unwinds.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Referenced by the prebuilt `liballoc`'s landing pads; never reached with
/// `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    serial::log_unlocked(format_args!("\navex-vmx: _Unwind_Resume reached\n"));
    cpu::shutdown()
}
