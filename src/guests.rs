//! The guest kernels bundled with avex: freestanding ELF64 workloads built from
//! guest-kernels/ by build.rs (build/guests.rs: the Rust guests; build/cguests.rs:
//! the C guests of guest-kernels/c/, built with gcc) and embedded in the binary.
//! Their boot ABI and expected output are in guest-kernels/README.md.
// Consumers (`avex run`, `avex compare`, tests) are being written alongside.
#![allow(dead_code)]

/// One bundled guest.
#[derive(Debug, Clone, Copy)]
pub struct BundledGuest {
    /// Short name, as given on the command line (`console`, `pci`, ...).
    pub name: &'static str,
    /// What it does, in one line.
    pub description: &'static str,
    /// The static ELF64 image.
    pub elf: &'static [u8],
}

macro_rules! guest {
    ($name:literal, $desc:literal) => {
        BundledGuest {
            name: $name,
            description: $desc,
            elf: include_bytes!(concat!(env!("AVEX_GUEST_DIR"), "/", $name)),
        }
    };
}

/// How many of [`BUNDLED`] are Rust guests; the C guests follow them.
const RUST_GUESTS: usize = 6;

static BUNDLED: [BundledGuest; 11] = [
    guest!(
        "console",
        "16550 UART probe and init, then a few KiB written with LSR (THRE) polling per byte"
    ),
    guest!(
        "pci",
        "PCI enumeration of every bus/device/function via 0xCF8/0xCFC, with BAR sizing"
    ),
    guest!(
        "rtc",
        "RTC date via 0x70/0x71 with the update-in-progress wait and stable re-read"
    ),
    guest!(
        "pit",
        "TSC calibration against PIT channel 2 (port 0x61 OUT2 polling), as Linux does"
    ),
    guest!(
        "cpuid",
        "CPUID leaves, XGETBV and architectural MSR probing, IA32_PAT write/read round trip"
    ),
    guest!(
        "ctxswitch",
        "2000 context switches: CR3 between two address spaces, FS/GS base MSRs, RDTSC"
    ),
    guest!(
        "c8250",
        "C, gcc -O2: Linux's 8250 console path (port ops through function pointers, \
         putchar callback, bounded LSR wait, IER saved/restored), 256 printk lines"
    ),
    guest!("c8250-os", "c8250 built with gcc -Os"),
    guest!(
        "c8250-retpoline",
        "c8250 built as distribution kernels are: indirect calls through retpolines, \
         returns through a return thunk"
    ),
    guest!(
        "cpci",
        "C, gcc -O2: Linux-shaped PCI probe (type 1 through raw_pci_ops, bus 0 scan, \
         BAR sizing, peer-bus probe of buses 1-255)"
    ),
    guest!(
        "crtc",
        "C, gcc -O2: Linux's mc146818_get_time through x86_platform.get_wallclock, 64 times"
    ),
];

/// Why the C guests are not bundled (gcc was missing when avex was built), or
/// empty if they are.
pub const C_GUESTS_MISSING: &str = env!("AVEX_C_GUESTS_MISSING");

/// Every bundled guest, in a fixed order: the Rust guests, then the C guests
/// (unless [`C_GUESTS_MISSING`]).
pub fn bundled() -> &'static [BundledGuest] {
    if C_GUESTS_MISSING.is_empty() {
        &BUNDLED
    } else {
        &BUNDLED[..RUST_GUESTS]
    }
}

/// The bundled guest called `name`.
pub fn find(name: &str) -> Option<&'static BundledGuest> {
    bundled().iter().find(|g| g.name == name)
}

/// The names of the C guests, bundled or not.
pub fn c_guest_names() -> impl Iterator<Item = &'static str> {
    BUNDLED[RUST_GUESTS..].iter().map(|g| g.name)
}

/// Where build.rs put the guest ELFs (and `mbloader.bin`) at build time.
pub const GUEST_DIR: &str = env!("AVEX_GUEST_DIR");

/// A multiboot1 trampoline (flat binary) implementing the guest boot ABI, for
/// running a guest under QEMU TCG: `qemu-system-x86_64 -kernel mbloader.bin
/// -initrd <guest ELF> -device isa-debug-exit,iobase=0xf4,iosize=0x04`.
pub static MBLOADER: &[u8] = include_bytes!(concat!(env!("AVEX_GUEST_DIR"), "/mbloader.bin"));
