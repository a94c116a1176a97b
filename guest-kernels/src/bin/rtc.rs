//! `rtc`: read the MC146818 RTC through 0x70 (index) / 0x71 (data) as Linux's
//! `mc146818_get_time` does: wait while register A's update-in-progress bit is
//! set, read every time field, and read them all again until two reads agree;
//! decode BCD or binary and 12/24-hour mode per register B. It reads the clock
//! `READS` times (a kernel reads it at boot, at each resume and for hwclock), so
//! that its exits are RTC accesses rather than console output, and prints the date
//! of the last read only (the device model starts at a fixed date; seconds would
//! depend on speed).
#![no_std]
#![no_main]

use rt::cpu::{inb, outb};
use rt::serial::print_dec_n;
use rt::{print, print_hex_n, println};

rt::entry!(main);

const RTC_INDEX: u16 = 0x70;
const RTC_DATA: u16 = 0x71;

const RTC_SECONDS: u8 = 0x00;
const RTC_MINUTES: u8 = 0x02;
const RTC_HOURS: u8 = 0x04;
const RTC_DAY_OF_WEEK: u8 = 0x06;
const RTC_DAY_OF_MONTH: u8 = 0x07;
const RTC_MONTH: u8 = 0x08;
const RTC_YEAR: u8 = 0x09;
const RTC_REG_A: u8 = 0x0a;
const RTC_REG_B: u8 = 0x0b;
const RTC_REG_D: u8 = 0x0d;
/// The ACPI FADT's usual century register.
const RTC_CENTURY: u8 = 0x32;

const RTC_UIP: u8 = 0x80;
const RTC_DM_BINARY: u8 = 0x04;
const RTC_24H: u8 = 0x02;
const RTC_VRT: u8 = 0x80;

/// Bound on the update-in-progress wait (an update takes under 2 ms).
const MAX_UIP_POLLS: u32 = 1_000_000;
const MAX_ATTEMPTS: u32 = 100;
/// Times the whole clock is read.
const READS: u32 = 16;

fn cmos_read(reg: u8) -> u8 {
    outb(RTC_INDEX, reg);
    inb(RTC_DATA)
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Raw {
    sec: u8,
    min: u8,
    hour: u8,
    wday: u8,
    mday: u8,
    mon: u8,
    year: u8,
    century: u8,
    reg_b: u8,
}

fn read_raw() -> Raw {
    Raw {
        sec: cmos_read(RTC_SECONDS),
        min: cmos_read(RTC_MINUTES),
        hour: cmos_read(RTC_HOURS),
        wday: cmos_read(RTC_DAY_OF_WEEK),
        mday: cmos_read(RTC_DAY_OF_MONTH),
        mon: cmos_read(RTC_MONTH),
        year: cmos_read(RTC_YEAR),
        century: cmos_read(RTC_CENTURY),
        reg_b: cmos_read(RTC_REG_B),
    }
}

/// Wait until no update is in progress; false if it never ends.
fn wait_uip() -> bool {
    let mut n = 0;
    while cmos_read(RTC_REG_A) & RTC_UIP != 0 {
        n += 1;
        if n == MAX_UIP_POLLS {
            return false;
        }
    }
    true
}

fn bcd2bin(v: u8) -> u8 {
    (v & 0x0f) + (v >> 4) * 10
}

/// One read of the clock as `mc146818_get_time` does it: `None` (said on the
/// console) if UIP never cleared or no two reads agreed.
fn read_agreed() -> Option<Raw> {
    for _ in 0..MAX_ATTEMPTS {
        if !wait_uip() {
            println("rtc: update-in-progress never cleared");
            return None;
        }
        let first = read_raw();
        if !wait_uip() {
            println("rtc: update-in-progress never cleared");
            return None;
        }
        let second = read_raw();
        if first == second {
            return Some(second);
        }
    }
    println("rtc: no two reads agreed");
    None
}

fn main() -> u8 {
    let valid = cmos_read(RTC_REG_D) & RTC_VRT != 0;
    // Each read: until two consecutive reads, each outside an update, agree.
    let mut raw = None;
    for _ in 0..READS {
        raw = read_agreed();
        if raw.is_none() {
            break;
        }
    }
    let Some(r) = raw else {
        return rt::EXIT_FAILED;
    };

    let bcd = r.reg_b & RTC_DM_BINARY == 0;
    let conv = |v: u8| if bcd { bcd2bin(v) } else { v };
    let (mut hour, pm) = if r.reg_b & RTC_24H == 0 {
        (r.hour & 0x7f, r.hour & 0x80 != 0)
    } else {
        (r.hour, false)
    };
    hour = conv(hour);
    if r.reg_b & RTC_24H == 0 {
        hour = (hour % 12) + if pm { 12 } else { 0 };
    }
    let century = conv(r.century);
    let yy = u64::from(conv(r.year));
    let year = if (19..=21).contains(&century) {
        u64::from(century) * 100 + yy
    } else if yy < 70 {
        2000 + yy
    } else {
        1900 + yy
    };
    let (mon, mday, wday) = (conv(r.mon), conv(r.mday), conv(r.wday));
    let _ = (conv(r.sec), conv(r.min), hour);

    print("rtc: register b ");
    print_hex_n(u64::from(r.reg_b), 2);
    print(if bcd { " (bcd, " } else { " (binary, " });
    print(if r.reg_b & RTC_24H != 0 {
        "24h)"
    } else {
        "12h)"
    });
    println(if valid {
        ", battery valid"
    } else {
        ", battery not valid"
    });
    print("rtc: date ");
    print_dec_n(year, 4);
    print("-");
    print_dec_n(u64::from(mon), 2);
    print("-");
    print_dec_n(u64::from(mday), 2);
    print(" weekday ");
    print_dec_n(u64::from(wday), 1);
    println("");
    if !(1..=12).contains(&mon) || !(1..=31).contains(&mday) {
        println("rtc: date out of range");
        return rt::EXIT_FAILED;
    }
    println("rtc: ok");
    rt::EXIT_OK
}
