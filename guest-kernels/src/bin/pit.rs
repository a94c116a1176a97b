//! `pit`: TSC calibration against PIT channel 2, as Linux's `pit_calibrate_tsc`:
//! gate channel 2 on and the speaker off through port 0x61, program channel 2 in
//! mode 0 (interrupt on terminal count) with a 10 ms count, then poll port 0x61
//! bit 5 (OUT2) until it goes high, reading the TSC each time round. Done three
//! times, as `native_calibrate_tsc` retries. Prints only facts that do not depend
//! on speed: that OUT2 went high, that the loop ran, that the TSC advanced.
#![no_std]
#![no_main]

use rt::cpu::{inb, outb, rdtsc};
use rt::{print, print_dec, println};

rt::entry!(main);

const PIT_CH2: u16 = 0x42;
const PIT_MODE: u16 = 0x43;
const NMI_SC: u16 = 0x61;
/// Port 0x61: channel 2 gate, speaker data, OUT2.
const SC_GATE2: u8 = 0x01;
const SC_SPEAKER: u8 = 0x02;
const SC_OUT2: u8 = 0x20;

const PIT_TICK_RATE: u32 = 1_193_182;
/// `pit_calibrate_tsc(latch, ms = 10, loopmin)`.
const CAL_MS: u32 = 10;
const CAL_LATCH: u32 = PIT_TICK_RATE / (1000 / CAL_MS);
/// Bound on the polls, far above what 10 ms takes on any backend: no PIT must not
/// mean no end.
const MAX_POLLS: u64 = 5_000_000;

struct Result {
    out_high: bool,
    polls: u64,
    tsc_advanced: bool,
    tsc_monotonic: bool,
}

fn calibrate(latch: u32) -> Result {
    // Set the gate high, disable the speaker.
    outb(NMI_SC, (inb(NMI_SC) & !SC_SPEAKER) | SC_GATE2);
    // Channel 2, lobyte/hibyte, mode 0, binary.
    outb(PIT_MODE, 0xb0);
    outb(PIT_CH2, (latch & 0xff) as u8);
    outb(PIT_CH2, (latch >> 8) as u8);

    let start = rdtsc();
    let mut tsc = start;
    let (mut tscmin, mut tscmax) = (u64::MAX, 0u64);
    let mut polls = 0u64;
    let mut monotonic = true;
    let mut out_high = true;
    while inb(NMI_SC) & SC_OUT2 == 0 {
        let t2 = rdtsc();
        monotonic &= t2 >= tsc;
        let delta = t2.wrapping_sub(tsc);
        tsc = t2;
        tscmin = tscmin.min(delta);
        tscmax = tscmax.max(delta);
        polls += 1;
        if polls == MAX_POLLS {
            out_high = false;
            break;
        }
    }
    let end = rdtsc();
    let _ = (tscmin, tscmax);
    Result {
        out_high,
        polls,
        tsc_advanced: end > start,
        tsc_monotonic: monotonic && end >= tsc,
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn main() -> u8 {
    let mut ok = true;
    for i in 0..3u64 {
        let r = calibrate(CAL_LATCH);
        print("pit: run ");
        print_dec(i);
        print(": latch ");
        print_dec(u64::from(CAL_LATCH));
        print(", out2 went high: ");
        print(yes(r.out_high));
        print(", polled at least once: ");
        print(yes(r.polls >= 1));
        print(", tsc advanced: ");
        print(yes(r.tsc_advanced));
        print(", tsc monotonic: ");
        println(yes(r.tsc_monotonic));
        ok &= r.out_high && r.polls >= 1 && r.tsc_advanced && r.tsc_monotonic;
    }
    // Leave the gate low and the speaker off, as the kernel does afterwards.
    outb(NMI_SC, inb(NMI_SC) & !(SC_SPEAKER | SC_GATE2));
    if ok {
        println("pit: ok");
        rt::EXIT_OK
    } else {
        println("pit: failed");
        rt::EXIT_FAILED
    }
}
