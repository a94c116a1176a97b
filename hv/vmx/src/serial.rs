//! The two 16550 UARTs of the machine the hypervisor runs on.
//!
//! Framing (the host runner depends on it): COM1 carries only the guest's console
//! bytes, exactly as the guest wrote them to its own (modelled) COM1; COM2 carries the
//! hypervisor's log, including the final `AVEX-SUMMARY {...}` line. Bochs maps each
//! port to its own file, so the two streams never interleave.

use core::fmt;
use spin::Mutex;
use x86_64::instructions::port::Port;

pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;

pub struct Uart {
    base: u16,
}

impl Uart {
    pub const fn new(base: u16) -> Self {
        Uart { base }
    }

    pub fn init(&mut self) {
        let b = self.base;
        for (off, val) in [
            (1, 0x00u8),
            (3, 0x80),
            (0, 0x01),
            (1, 0x00),
            (3, 0x03),
            (2, 0xc7),
            (4, 0x0b),
        ] {
            // SAFETY: the UART's registers; programming them has no memory effects.
            unsafe { Port::<u8>::new(b + off).write(val) };
        }
    }

    pub fn write_byte(&mut self, byte: u8) {
        let mut lsr = Port::<u8>::new(self.base + 5);
        let mut thr = Port::<u8>::new(self.base);
        // SAFETY: reading the line status and writing the transmit register of the UART.
        unsafe {
            let mut spins = 0u32;
            while lsr.read() & 0x20 == 0 && spins < 1_000_000 {
                spins += 1;
                core::hint::spin_loop();
            }
            thr.write(byte);
        }
    }
}

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.write_byte(b);
        }
        Ok(())
    }
}

/// Wait until both UARTs have sent every byte (before ending the run).
pub fn flush() {
    for base in [COM1, COM2] {
        let mut lsr = Port::<u8>::new(base + 5);
        let mut spins = 0u32;
        // SAFETY: reading the line status register.
        while unsafe { lsr.read() } & 0x40 == 0 && spins < 10_000_000 {
            spins += 1;
            core::hint::spin_loop();
        }
    }
}

pub static LOG: Mutex<Uart> = Mutex::new(Uart::new(COM2));
pub static CONSOLE: Mutex<Uart> = Mutex::new(Uart::new(COM1));

pub fn init() {
    LOG.lock().init();
    CONSOLE.lock().init();
}

/// Forward guest console bytes, unchanged, to COM1.
pub fn console_write(bytes: &[u8]) {
    let mut c = CONSOLE.lock();
    for &b in bytes {
        c.write_byte(b);
    }
}

#[doc(hidden)]
pub fn _log(args: fmt::Arguments) {
    use fmt::Write;
    x86_64::instructions::interrupts::without_interrupts(|| {
        let _ = LOG.lock().write_fmt(args);
    });
}

/// Write to the exception path's UART without taking the lock (it may be held by
/// the code that faulted).
pub fn log_unlocked(args: fmt::Arguments) {
    use fmt::Write;
    let _ = Uart::new(COM2).write_fmt(args);
}

#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::serial::_log(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! logln {
    () => { $crate::log!("\n") };
    ($($arg:tt)*) => { $crate::serial::_log(format_args!("{}\n", format_args!($($arg)*))) };
}
