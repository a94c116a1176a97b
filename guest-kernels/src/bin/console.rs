//! `console`: a 16550 driver at the port level, as Linux's 8250 driver does it:
//! probe (scratch register, IER, FIFO), program the divisor latch, line control,
//! FIFO control and modem control, then write a few KiB of text through the
//! console-write path (save IER and mask it, poll THRE before every byte, wait for
//! the transmitter to drain, restore IER). Prints a checksum of the bytes sent.
#![no_std]
#![no_main]

use rt::cpu::{inb, outb};
use rt::serial::{self, COM1, FCR, IER, IIR, LCR, LSR, LSR_TEMT, LSR_THRE, MCR, MSR, SCR, THR};
use rt::{print, print_dec, print_hex_n, println, Checksum};

rt::entry!(main);

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
/// FCR: enable FIFOs, clear both, 14-byte receive trigger.
const FCR_ENABLE_CLEAR_14: u8 = 0xc7;
/// MCR: DTR, RTS, OUT2.
const MCR_DTR_RTS_OUT2: u8 = 0x0b;
/// 115200 baud from the 1.8432 MHz clock.
const DIVISOR: u16 = 1;

/// What the probe found, as Linux's `autoconfig` names it.
fn probe(base: u16) -> &'static str {
    // Scratch register test.
    let saved = inb(base + SCR);
    outb(base + SCR, 0xa5);
    let a5 = inb(base + SCR);
    outb(base + SCR, 0x5a);
    let x5a = inb(base + SCR);
    outb(base + SCR, saved);
    // IER test: the upper nibble must read back zero.
    let saved_ier = inb(base + IER);
    outb(base + IER, 0);
    let ier0 = inb(base + IER);
    outb(base + IER, 0x0f);
    let ier_f = inb(base + IER);
    outb(base + IER, saved_ier);
    if ier0 & 0x0f != 0 || ier_f & 0x0f != 0x0f {
        return "none";
    }
    // FIFO test.
    outb(base + FCR, 0x01);
    let iir = inb(base + IIR);
    outb(base + FCR, 0x00);
    let scratch = a5 == 0xa5 && x5a == 0x5a;
    match (iir >> 6, scratch) {
        (3, _) => "16550A",
        (2, _) => "16550",
        (_, true) => "16450",
        _ => "8250",
    }
}

/// `serial8250_do_startup`/`set_termios`: divisor, line, FIFO and modem control,
/// then clear pending status by reading LSR, RBR, IIR and MSR.
fn init(base: u16) {
    outb(base + IER, 0x00);
    outb(base + LCR, LCR_DLAB);
    outb(base + THR, DIVISOR as u8);
    outb(base + IER, (DIVISOR >> 8) as u8);
    outb(base + LCR, LCR_8N1);
    outb(base + FCR, FCR_ENABLE_CLEAR_14);
    outb(base + MCR, MCR_DTR_RTS_OUT2);
    let _ = inb(base + LSR);
    let _ = inb(base + THR);
    let _ = inb(base + IIR);
    let _ = inb(base + MSR);
}

/// `serial8250_console_write`: mask IER, send each byte after THRE (`\n` as
/// `\r\n`), wait for both THRE and TEMT, restore IER. Returns the bytes sent.
fn console_write(base: u16, s: &[u8], sum: &mut Checksum) -> u64 {
    let ier = inb(base + IER);
    outb(base + IER, 0);
    let mut sent = 0;
    for &b in s {
        if b == b'\n' {
            serial::putc_raw(base, b'\r');
            sum.add_u8(b'\r');
            sent += 1;
        }
        serial::putc_raw(base, b);
        sum.add_u8(b);
        sent += 1;
    }
    serial::wait_lsr(base, LSR_THRE | LSR_TEMT);
    outb(base + IER, ier);
    sent
}

const WORDS: [&[u8]; 9] = [
    b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"the", b"lazy", b"dog",
];

fn main() -> u8 {
    let kind = probe(COM1);
    init(COM1);
    print("console: uart ");
    println(kind);

    let mut sum = Checksum::new();
    let mut total = 0u64;
    let mut line = [0u8; 96];
    for n in 0..64u32 {
        // "NNN: " then the pangram, rotated by n words, then a newline.
        let mut len = 0;
        for d in [n / 100, (n / 10) % 10, n % 10] {
            line[len] = b'0' + d as u8;
            len += 1;
        }
        line[len] = b':';
        line[len + 1] = b' ';
        len += 2;
        for k in 0..WORDS.len() {
            if k > 0 {
                line[len] = b' ';
                len += 1;
            }
            for &b in WORDS[(k + n as usize) % WORDS.len()] {
                line[len] = b;
                len += 1;
            }
        }
        line[len] = b'\n';
        len += 1;
        total += console_write(COM1, &line[..len], &mut sum);
    }
    print("console: wrote ");
    print_dec(total);
    print(" bytes, checksum ");
    print_hex_n(sum.value(), 16);
    println("");
    println("console: ok");
    rt::EXIT_OK
}
