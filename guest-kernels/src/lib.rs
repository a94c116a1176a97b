//! The guest kernels' small runtime: entry stub, port I/O and other privileged
//! instructions, a COM1 console with line-status polling, number printing and the
//! isa-debug-exit port.
//!
//! The boot ABI is in `README.md`: the guest is entered at `e_entry` in 64-bit mode
//! with the first 4 GiB identity-mapped, interrupts off and no stack. The entry
//! stub made by [`entry!`] sets RSP to the top of a 64 KiB stack reserved by the
//! linker script and calls the guest's `main`, which returns the exit status.
//!
//! Everything here is general-purpose-register code: the guests are built with SSE
//! off because KVM's instruction emulator on the project's machines cannot run SSE
//! instructions (PLATFORM.md). There is no `core::fmt` in a guest.
#![no_std]

pub mod cpu;
#[path = "../../build/freestanding_mem.rs"]
pub mod mem;
pub mod serial;

pub use serial::{print, print_dec, print_hex, print_hex_n, println};

/// The isa-debug-exit port: a byte V written here ends the run with status V.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Exit status for success.
pub const EXIT_OK: u8 = 0;
/// Exit status when a guest's own check failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status after a panic.
pub const EXIT_PANIC: u8 = 2;

/// End the run with `status` through the debug-exit port. If no debug-exit device
/// is present, halt forever with interrupts off.
pub fn exit(status: u8) -> ! {
    cpu::outb(DEBUG_EXIT_PORT, status);
    loop {
        cpu::cli_hlt();
    }
}

/// Define the guest's entry point `_start`: set RSP to the linker script's
/// `__stack_top`, call `$main` (a `fn() -> u8`) and exit with the status it returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        core::arch::global_asm!(
            ".section .text._start, \"ax\"",
            ".global _start",
            ".type _start, @function",
            "_start:",
            "    cli",
            "    cld",
            "    mov rsp, offset __stack_top",
            "    xor ebp, ebp",
            "    call {rust_start}",
            "2:  hlt",
            "    jmp 2b",
            ".size _start, . - _start",
            ".section .text",
            rust_start = sym __rt_rust_start,
        );

        #[doc(hidden)]
        extern "C" fn __rt_rust_start() -> ! {
            let main: fn() -> u8 = $main;
            $crate::exit(main())
        }
    };
}

/// Print the panic message's location (no formatting machinery) and exit with
/// [`EXIT_PANIC`].
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    print("\npanic");
    if let Some(loc) = info.location() {
        print(" at ");
        print(loc.file());
        print(":");
        print_dec(u64::from(loc.line()));
    }
    print("\n");
    exit(EXIT_PANIC)
}

/// The prebuilt `liballoc`/`libcore` were built with unwinding; with `panic=abort`
/// the symbol is still referenced, never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// FNV-1a, 64-bit, over 32-bit words: the guests' deterministic checksum.
#[derive(Clone, Copy)]
pub struct Checksum(u64);

impl Checksum {
    pub const fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    /// Fold in the 4 bytes of `v`, low byte first.
    pub fn add_u32(&mut self, v: u32) {
        for b in v.to_le_bytes() {
            self.add_u8(b);
        }
    }

    /// Fold in the 8 bytes of `v`, low byte first.
    pub fn add_u64(&mut self, v: u64) {
        self.add_u32(v as u32);
        self.add_u32((v >> 32) as u32);
    }

    pub fn add_u8(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}
