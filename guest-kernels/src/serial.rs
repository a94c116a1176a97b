//! The console: a 16550 UART at COM1, written one byte at a time after polling the
//! line status register's THRE bit (bit 5), as Linux's 8250 driver does; `\n` is
//! sent as `\r\n` (`uart_console_write`). Numbers are printed without `core::fmt`.
use crate::cpu::{inb, outb};

/// COM1's base port.
pub const COM1: u16 = 0x3f8;
/// Register offsets from the base port.
pub const THR: u16 = 0; // transmit holding (write), receive buffer (read), DLL with DLAB
pub const IER: u16 = 1; // interrupt enable, DLM with DLAB
pub const IIR: u16 = 2; // interrupt identification (read), FIFO control (write)
pub const FCR: u16 = 2;
pub const LCR: u16 = 3; // line control
pub const MCR: u16 = 4; // modem control
pub const LSR: u16 = 5; // line status
pub const MSR: u16 = 6; // modem status
pub const SCR: u16 = 7; // scratch
/// LSR: transmit holding register empty.
pub const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty (holding and shift registers).
pub const LSR_TEMT: u8 = 0x40;
/// Bound on the polls for one byte, as Linux's `wait_for_xmitr` bounds its wait
/// (10,000 rounds): a UART that never becomes ready must not hang the guest.
const MAX_POLLS: u32 = 10_000;

/// Wait until all of `bits` are set in LSR (or the bound runs out).
#[inline]
pub fn wait_lsr(base: u16, bits: u8) {
    let mut n = 0;
    while inb(base + LSR) & bits != bits && n < MAX_POLLS {
        n += 1;
    }
}

/// Send one byte: poll THRE, then write THR.
#[inline]
pub fn putc_raw(base: u16, b: u8) {
    wait_lsr(base, LSR_THRE);
    outb(base + THR, b);
}

/// Send one byte to COM1, `\n` as `\r\n`.
pub fn putc(b: u8) {
    if b == b'\n' {
        putc_raw(COM1, b'\r');
    }
    putc_raw(COM1, b);
}

pub fn print_bytes(s: &[u8]) {
    for &b in s {
        putc(b);
    }
}

pub fn print(s: &str) {
    print_bytes(s.as_bytes());
}

pub fn println(s: &str) {
    print(s);
    putc(b'\n');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Print `v` as `0x` followed by exactly `digits` hex digits (1..=16).
pub fn print_hex_n(v: u64, digits: u32) {
    print("0x");
    print_hex_digits(v, digits);
}

/// Print exactly `digits` hex digits of `v`, without a prefix.
pub fn print_hex_digits(v: u64, digits: u32) {
    let digits = digits.clamp(1, 16);
    let mut shift = digits * 4;
    while shift > 0 {
        shift -= 4;
        putc(HEX[((v >> shift) & 0xf) as usize]);
    }
}

/// Print `v` as `0x` and as many hex digits as it needs (at least one).
pub fn print_hex(v: u64) {
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
    print_hex_n(v, digits);
}

/// Print `v` in decimal.
pub fn print_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    print_bytes(&buf[i..]);
}

/// Print `v` in decimal, zero-padded to `width` digits.
pub fn print_dec_n(v: u64, width: u32) {
    let mut digits = 1;
    let mut t = v / 10;
    while t != 0 {
        digits += 1;
        t /= 10;
    }
    while digits < width {
        putc(b'0');
        digits += 1;
    }
    print_dec(v);
}
