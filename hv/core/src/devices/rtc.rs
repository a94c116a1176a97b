//! MC146818 real-time clock and CMOS RAM at 0x70 (index) / 0x71 (data).
//!
//! The clock starts at a configured date and time at virtual time 0 and advances
//! exactly at each second boundary of virtual time (boundaries are at `phase +
//! k * 10^9` ns; the phase is 0 until the guest resets the divider). Update in
//! progress (register A bit 7) reads 1 during the 244 µs before each boundary; the
//! update itself is instantaneous, so the time registers are valid whenever they
//! can be read. Register B's SET bit halts updates (the divider keeps running, so
//! updates resume at the old phase); DV = 11x in register A holds the divider in
//! reset and releasing it schedules the first update 500 ms later. Time and alarm
//! registers are in BCD or binary (register B DM bit) and 12- or 24-hour form;
//! the century is CMOS byte 0x32. Register C's flags (UF, AF, PF) are set by
//! updates, alarm matches and the periodic rate, IRQF summarises the enabled ones,
//! and reading C clears them. The other CMOS bytes (0x0e..=0x7f) are plain RAM.

use super::device::{IrqOutput, PortDevice};

const NS_PER_SEC: u64 = 1_000_000_000;
/// UIP is set this long before each update.
pub const UIP_WINDOW_NS: u64 = 244_000;

const REG_SEC: u8 = 0x00;
const REG_SEC_ALARM: u8 = 0x01;
const REG_MIN: u8 = 0x02;
const REG_MIN_ALARM: u8 = 0x03;
const REG_HOUR: u8 = 0x04;
const REG_HOUR_ALARM: u8 = 0x05;
const REG_DOW: u8 = 0x06;
const REG_DOM: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The conventional century byte (ACPI FADT's default).
pub const REG_CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

/// A calendar date and time of day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl DateTime {
    pub const fn new(year: u16, month: u8, day: u8, hour: u8, minute: u8, second: u8) -> Self {
        DateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
        }
    }

    /// Seconds since 1970-01-01 00:00:00 (fields clamped into range first).
    pub fn to_unix(&self) -> i64 {
        let month = self.month.clamp(1, 12);
        let day = self.day.clamp(1, days_in_month(month, self.year as i64));
        days_from_civil(self.year as i64, month, day) * 86_400
            + self.hour.min(23) as i64 * 3600
            + self.minute.min(59) as i64 * 60
            + self.second.min(59) as i64
    }

    /// The date and time `secs` seconds after 1970-01-01 00:00:00.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        DateTime {
            year: y.clamp(0, u16::MAX as i64) as u16,
            month: m,
            day: d,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// Day of the week, 1 = Sunday .. 7 = Saturday (the RTC's convention).
    pub fn day_of_week(&self) -> u8 {
        // 1970-01-01 was a Thursday (5).
        ((self.to_unix().div_euclid(86_400) + 4).rem_euclid(7) + 1) as u8
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(month: u8, year: i64) -> u8 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Howard Hinnant's days_from_civil.
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// RTC configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtcConfig {
    /// The time the clock shows at virtual time 0.
    pub start: DateTime,
}

impl Default for RtcConfig {
    /// 2024-01-01 12:00:00, so a guest's printed date is deterministic.
    fn default() -> Self {
        RtcConfig {
            start: DateTime::new(2024, 1, 1, 12, 0, 0),
        }
    }
}

/// The MC146818 and its CMOS RAM.
#[derive(Clone, Debug)]
pub struct Rtc {
    index: u8,
    nmi_disabled: bool,
    // The clock, binary, 24-hour.
    sec: u8,
    min: u8,
    hour: u8,
    dow: u8,
    dom: u8,
    month: u8,
    year: u8,
    century: u8,
    // Alarm registers as written (in the register format).
    alarm: [u8; 3],
    reg_a: u8,
    reg_b: u8,
    /// Register C flags (UF, AF, PF); IRQF is computed.
    flags: u8,
    cmos: [u8; 128],
    /// Virtual time up to which updates and periodic ticks are applied.
    synced_ns: u64,
    /// Second boundaries are at `phase_ns + k * 10^9`.
    phase_ns: u64,
}

impl Rtc {
    pub fn new(config: RtcConfig) -> Self {
        let mut rtc = Rtc {
            index: 0,
            nmi_disabled: false,
            sec: 0,
            min: 0,
            hour: 0,
            dow: 1,
            dom: 1,
            month: 1,
            year: 0,
            century: 20,
            alarm: [0; 3],
            reg_a: 0x26,
            reg_b: B_24H,
            flags: 0,
            cmos: [0; 128],
            synced_ns: 0,
            phase_ns: 0,
        };
        rtc.set_time(config.start);
        rtc
    }

    /// Set the clock (as a backend would before boot).
    pub fn set_time(&mut self, t: DateTime) {
        let t = DateTime::from_unix(t.to_unix());
        self.sec = t.second;
        self.min = t.minute;
        self.hour = t.hour;
        self.dom = t.day;
        self.month = t.month;
        self.year = (t.year % 100) as u8;
        self.century = (t.year / 100).min(255) as u8;
        self.dow = t.day_of_week();
    }

    /// The clock's date and time at `now_ns`.
    pub fn time(&mut self, now_ns: u64) -> DateTime {
        self.sync(now_ns);
        self.current()
    }

    fn current(&self) -> DateTime {
        DateTime {
            year: self.century as u16 * 100 + self.year as u16,
            month: self.month,
            day: self.dom,
            hour: self.hour,
            minute: self.min,
            second: self.sec,
        }
    }

    /// The NMI-disable bit last written to port 0x70.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// The register index last selected.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// A CMOS RAM byte (0x0e..=0x7f; lower indices give the register file's RAM
    /// shadow, not the clock).
    pub fn cmos(&self, index: u8) -> u8 {
        self.cmos[(index & 0x7f) as usize]
    }

    /// Set a CMOS RAM byte (as firmware would, e.g. memory sizes at 0x15..0x18).
    pub fn set_cmos(&mut self, index: u8, value: u8) {
        self.cmos[(index & 0x7f) as usize] = value;
    }

    fn running(&self) -> bool {
        self.reg_b & B_SET == 0 && self.divider_running()
    }

    fn divider_running(&self) -> bool {
        (self.reg_a & 0x70) <= 0x20
    }

    /// Boundaries at or before `t` (counting from an arbitrary origin).
    fn boundaries(&self, t: u64) -> u64 {
        ((t as u128 + NS_PER_SEC as u128 - self.phase_ns as u128) / NS_PER_SEC as u128) as u64
    }

    /// True during the 244 µs before a second boundary while the clock runs.
    pub fn uip(&self, now_ns: u64) -> bool {
        if !self.running() {
            return false;
        }
        let into =
            (now_ns as u128 + NS_PER_SEC as u128 - self.phase_ns as u128) % NS_PER_SEC as u128;
        into as u64 >= NS_PER_SEC - UIP_WINDOW_NS
    }

    /// Periodic-interrupt periods elapsed at `t` (None when the rate is off).
    fn periods(&self, t: u64) -> Option<u128> {
        let rs = self.rate_select();
        if rs == 0 {
            return None;
        }
        // Period = 2^(rs-1) / 32768 s.
        let shifted = t as u128 + NS_PER_SEC as u128 - self.phase_ns as u128;
        Some(shifted * 32_768 / ((1u128 << (rs - 1)) * NS_PER_SEC as u128))
    }

    /// Register A's rate select, with 1 and 2 meaning 8 and 9 at 32.768 kHz.
    fn rate_select(&self) -> u8 {
        match self.reg_a & 0x0f {
            1 => 8,
            2 => 9,
            rs => rs,
        }
    }

    /// Apply updates and periodic ticks up to `now_ns`.
    fn sync(&mut self, now_ns: u64) {
        if now_ns <= self.synced_ns {
            return;
        }
        if self.divider_running() {
            if let (Some(a), Some(b)) = (self.periods(self.synced_ns), self.periods(now_ns)) {
                if b > a {
                    self.flags |= C_PF;
                }
            }
        }
        if self.running() {
            let n = self.boundaries(now_ns) - self.boundaries(self.synced_ns);
            if n > 0 {
                self.advance(n);
                self.flags |= C_UF;
            }
        }
        self.synced_ns = now_ns;
    }

    /// Advance the clock by `n` seconds, checking the alarm at each second (only
    /// the last day of a long jump can matter: every alarm repeats within a day).
    fn advance(&mut self, mut n: u64) {
        const DAY: u64 = 86_400;
        if n > DAY {
            let skip = n - DAY;
            let days_before = self.current().to_unix().div_euclid(86_400);
            let t = DateTime::from_unix(self.current().to_unix().saturating_add(skip as i64));
            let days = t.to_unix().div_euclid(86_400) - days_before;
            self.dow = ((self.dow.clamp(1, 7) as i64 - 1 + days).rem_euclid(7) + 1) as u8;
            self.sec = t.second;
            self.min = t.minute;
            self.hour = t.hour;
            self.dom = t.day;
            self.month = t.month;
            self.year = (t.year % 100) as u8;
            self.century = (t.year / 100).min(255) as u8;
            n = DAY;
        }
        for _ in 0..n {
            self.tick();
            if self.alarm_matches() {
                self.flags |= C_AF;
            }
        }
    }

    /// One second of the MC146818's counting chain.
    fn tick(&mut self) {
        self.sec = self.sec.saturating_add(1);
        if self.sec < 60 {
            return;
        }
        self.sec = 0;
        self.min = self.min.saturating_add(1);
        if self.min < 60 {
            return;
        }
        self.min = 0;
        self.hour = self.hour.saturating_add(1);
        if self.hour < 24 {
            return;
        }
        self.hour = 0;
        self.dow = if self.dow >= 7 { 1 } else { self.dow + 1 };
        self.dom = self.dom.saturating_add(1);
        let full_year = self.century as i64 * 100 + self.year as i64;
        if self.dom <= days_in_month(self.month, full_year) {
            return;
        }
        self.dom = 1;
        self.month = self.month.saturating_add(1);
        if self.month <= 12 {
            return;
        }
        self.month = 1;
        self.year = self.year.saturating_add(1);
        if self.year <= 99 {
            return;
        }
        self.year = 0;
        self.century = self.century.wrapping_add(1);
    }

    fn alarm_matches(&self) -> bool {
        let now = [
            self.encode(self.sec),
            self.encode(self.min),
            self.encode_hour(),
        ];
        self.alarm
            .iter()
            .zip(now)
            .all(|(&a, v)| a & 0xc0 == 0xc0 || a == v)
    }

    fn binary(&self) -> bool {
        self.reg_b & B_DM_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10 % 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    }

    fn encode_hour(&self) -> u8 {
        if self.reg_b & B_24H != 0 {
            self.encode(self.hour)
        } else {
            let pm = self.hour >= 12;
            let h = match self.hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h) | if pm { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b & B_24H != 0 {
            self.decode(v)
        } else {
            let h = self.decode(v & 0x7f) % 12;
            if v & 0x80 != 0 {
                h + 12
            } else {
                h
            }
        }
    }

    fn reg_c(&self) -> u8 {
        let mut c = self.flags;
        if c & self.reg_b & 0x70 != 0 {
            c |= C_IRQF;
        }
        c
    }

    /// The next virtual time after `now_ns` at which an enabled interrupt source
    /// (update-ended, alarm, periodic) may raise IRQF; `now_ns` if it is raised.
    pub fn next_event_ns(&self, now_ns: u64) -> Option<u64> {
        if self.reg_c() & C_IRQF != 0 {
            return Some(now_ns);
        }
        let mut next = None;
        // Updates or periods not applied yet (conservative for the alarm).
        let now_synced = now_ns.max(self.synced_ns);
        if (self.reg_b & (B_UIE | 0x20) != 0
            && self.running()
            && self.boundaries(now_synced) > self.boundaries(self.synced_ns))
            || (self.reg_b & 0x40 != 0
                && self.divider_running()
                && self.periods(now_synced) > self.periods(self.synced_ns))
        {
            return Some(now_ns);
        }
        if self.reg_b & (B_UIE | 0x20) != 0 && self.running() {
            let shifted = now_ns as u128 + NS_PER_SEC as u128 - self.phase_ns as u128;
            let boundary = (shifted / NS_PER_SEC as u128 + 1) * NS_PER_SEC as u128;
            next = Some(boundary + self.phase_ns as u128 - NS_PER_SEC as u128);
        }
        if self.reg_b & 0x40 != 0 && self.divider_running() {
            if let Some(p) = self.periods(now_ns) {
                let rs = self.rate_select();
                let per = (1u128 << (rs - 1)) * NS_PER_SEC as u128;
                let shifted = ((p + 1) * per).div_ceil(32_768);
                let t = shifted + self.phase_ns as u128 - NS_PER_SEC as u128;
                next = Some(next.map_or(t, |n: u128| n.min(t)));
            }
        }
        next.map(|t| t.min(u64::MAX as u128) as u64)
    }

    /// The IRQ8 line: register C's IRQF.
    pub fn irq_pending(&mut self, now_ns: u64) -> bool {
        self.sync(now_ns);
        self.reg_c() & C_IRQF != 0
    }

    /// Read register `index` (0..=0x7f) at `now_ns`.
    pub fn read_register(&mut self, index: u8, now_ns: u64) -> u8 {
        self.sync(now_ns);
        match index & 0x7f {
            REG_SEC => self.encode(self.sec),
            REG_MIN => self.encode(self.min),
            REG_HOUR => self.encode_hour(),
            REG_SEC_ALARM => self.alarm[0],
            REG_MIN_ALARM => self.alarm[1],
            REG_HOUR_ALARM => self.alarm[2],
            REG_DOW => self.encode(self.dow),
            REG_DOM => self.encode(self.dom),
            REG_MONTH => self.encode(self.month),
            REG_YEAR => self.encode(self.year),
            REG_A => self.reg_a | if self.uip(now_ns) { A_UIP } else { 0 },
            REG_B => self.reg_b,
            REG_C => {
                let c = self.reg_c();
                self.flags = 0;
                c
            }
            REG_D => 0x80, // VRT: valid RAM and time
            REG_CENTURY => self.encode(self.century),
            i => self.cmos[i as usize],
        }
    }

    /// Write register `index` (0..=0x7f) at `now_ns`.
    pub fn write_register(&mut self, index: u8, value: u8, now_ns: u64) {
        self.sync(now_ns);
        match index & 0x7f {
            REG_SEC => self.sec = self.decode(value & 0x7f),
            REG_MIN => self.min = self.decode(value & 0x7f),
            REG_HOUR => self.hour = self.decode_hour(value),
            REG_SEC_ALARM => self.alarm[0] = value,
            REG_MIN_ALARM => self.alarm[1] = value,
            REG_HOUR_ALARM => self.alarm[2] = value,
            REG_DOW => self.dow = self.decode(value),
            REG_DOM => self.dom = self.decode(value),
            REG_MONTH => self.month = self.decode(value),
            REG_YEAR => self.year = self.decode(value),
            REG_A => {
                let was_reset = !self.divider_running();
                self.reg_a = value & 0x7f;
                if was_reset && self.divider_running() {
                    // The first update comes half a second after the divider
                    // leaves reset.
                    self.phase_ns = (now_ns % NS_PER_SEC + NS_PER_SEC / 2) % NS_PER_SEC;
                }
            }
            REG_B => {
                let mut v = value;
                if v & B_SET != 0 {
                    v &= !B_UIE;
                }
                self.reg_b = v;
            }
            REG_C | REG_D => {}
            REG_CENTURY => self.century = self.decode(value),
            i => self.cmos[i as usize] = value,
        }
    }
}

impl PortDevice for Rtc {
    fn name(&self) -> &'static str {
        "rtc-mc146818"
    }
    fn read(&mut self, port: u16, _size: u8, now_ns: u64) -> u32 {
        match port & 1 {
            // The index register is write-only.
            0 => 0xff,
            _ => self.read_register(self.index, now_ns) as u32,
        }
    }
    fn write(&mut self, port: u16, _size: u8, value: u32, now_ns: u64) {
        let v = value as u8;
        match port & 1 {
            0 => {
                self.nmi_disabled = v & 0x80 != 0;
                self.index = v & 0x7f;
            }
            _ => self.write_register(self.index, v, now_ns),
        }
    }
    fn irq(&mut self, now_ns: u64) -> IrqOutput {
        IrqOutput::Level {
            irq: 8,
            high: self.irq_pending(now_ns),
        }
    }
    fn next_event_ns(&self, now_ns: u64) -> Option<u64> {
        Rtc::next_event_ns(self, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_SEC;
    const MS: u64 = 1_000_000;

    fn rtc() -> Rtc {
        Rtc::new(RtcConfig::default())
    }

    /// Read register `i` through the ports as a guest does.
    fn rd(r: &mut Rtc, i: u8, now: u64) -> u8 {
        r.write(0x70, 1, i as u32, now);
        r.read(0x71, 1, now) as u8
    }

    fn wr(r: &mut Rtc, i: u8, v: u8, now: u64) {
        r.write(0x70, 1, i as u32, now);
        r.write(0x71, 1, v as u32, now);
    }

    fn hms(r: &mut Rtc, now: u64) -> (u8, u8, u8) {
        (rd(r, 4, now), rd(r, 2, now), rd(r, 0, now))
    }

    #[test]
    fn default_start_in_bcd_24h() {
        let mut r = rtc();
        assert_eq!(hms(&mut r, 0), (0x12, 0x00, 0x00));
        assert_eq!(rd(&mut r, REG_DOM, 0), 0x01);
        assert_eq!(rd(&mut r, REG_MONTH, 0), 0x01);
        assert_eq!(rd(&mut r, REG_YEAR, 0), 0x24);
        assert_eq!(rd(&mut r, REG_CENTURY, 0), 0x20);
        assert_eq!(rd(&mut r, REG_DOW, 0), 2, "2024-01-01 was a Monday");
        assert_eq!(rd(&mut r, REG_A, 0), 0x26);
        assert_eq!(rd(&mut r, REG_B, 0), 0x02);
        assert_eq!(rd(&mut r, REG_D, 0), 0x80);
        assert_eq!(r.read(0x70, 1, 0), 0xff);
    }

    #[test]
    fn uip_is_set_exactly_in_the_window_before_each_second() {
        let mut r = rtc();
        for k in 1..=3u64 {
            let b = k * S;
            assert_eq!(rd(&mut r, REG_A, b - UIP_WINDOW_NS - 1) & A_UIP, 0);
            assert_eq!(rd(&mut r, 0, b - UIP_WINDOW_NS - 1), (k - 1) as u8);
            assert_eq!(rd(&mut r, REG_A, b - UIP_WINDOW_NS) & A_UIP, A_UIP);
            assert_eq!(rd(&mut r, REG_A, b - 1) & A_UIP, A_UIP);
            // Time registers stay valid and unchanged during UIP.
            assert_eq!(rd(&mut r, 0, b - 1), (k - 1) as u8);
            // At the boundary: updated, UIP clear.
            assert_eq!(rd(&mut r, REG_A, b) & A_UIP, 0);
            assert_eq!(rd(&mut r, 0, b), k as u8);
            assert_eq!(rd(&mut r, 0, b + S / 2), k as u8);
        }
    }

    #[test]
    fn stable_read_pattern_waits_out_uip() {
        // The classic driver loop: wait for UIP clear, read, re-read until equal.
        let mut r = rtc();
        let mut now = 59 * S + S - 100_000; // inside the window before 12:01:00
        let mut polls = 0;
        let read = |r: &mut Rtc, now: &mut u64, polls: &mut u32| loop {
            if rd(r, REG_A, *now) & A_UIP == 0 {
                let t = hms(r, *now);
                *now += 5_000;
                break t;
            }
            *polls += 1;
            *now += 10_000;
        };
        let a = read(&mut r, &mut now, &mut polls);
        let b = read(&mut r, &mut now, &mut polls);
        assert_eq!(a, b);
        assert_eq!(a, (0x12, 0x01, 0x00));
        assert_eq!(polls, 10, "polled UIP for the 100 µs left of the window");
    }

    #[test]
    fn time_advances_at_boundaries_across_minutes_hours_days() {
        let start = DateTime::new(2024, 2, 28, 23, 59, 58);
        let mut r = Rtc::new(RtcConfig { start });
        assert_eq!(r.time(S), DateTime::new(2024, 2, 28, 23, 59, 59));
        assert_eq!(
            r.time(2 * S),
            DateTime::new(2024, 2, 29, 0, 0, 0),
            "leap day"
        );
        assert_eq!(rd(&mut r, REG_DOW, 2 * S), 5, "Thursday");
        let mut r = Rtc::new(RtcConfig {
            start: DateTime::new(2099, 12, 31, 23, 59, 59),
        });
        assert_eq!(r.time(S), DateTime::new(2100, 1, 1, 0, 0, 0));
        assert_eq!(rd(&mut r, REG_CENTURY, S), 0x21);
        assert_eq!(rd(&mut r, REG_YEAR, S), 0x00);
        assert_eq!(
            rd(&mut r, REG_DOW, S),
            DateTime::new(2100, 1, 1, 0, 0, 0).day_of_week()
        );
        // Long idle periods: 400 days and 7 seconds later, checked against the
        // calendar arithmetic.
        let mut r = rtc();
        let later = 400 * 86_400 + 7;
        let t = r.time(later * S);
        let want = DateTime::from_unix(RtcConfig::default().start.to_unix() + later as i64);
        assert_eq!(t, want);
        assert_eq!(t, DateTime::new(2025, 2, 4, 12, 0, 7));
        assert_eq!(rd(&mut r, REG_DOW, later * S), want.day_of_week());
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut r = Rtc::new(RtcConfig {
            start: DateTime::new(2031, 11, 29, 23, 45, 59),
        });
        assert_eq!(hms(&mut r, 0), (0x23, 0x45, 0x59));
        wr(&mut r, REG_B, B_24H | B_DM_BINARY, 0);
        assert_eq!(hms(&mut r, 0), (23, 45, 59));
        assert_eq!(rd(&mut r, REG_YEAR, 0), 31);
        assert_eq!(rd(&mut r, REG_MONTH, 0), 11);
        wr(&mut r, REG_B, B_DM_BINARY, 0); // 12-hour binary
        assert_eq!(rd(&mut r, REG_HOUR, 0), 0x80 | 11);
        wr(&mut r, REG_B, 0, 0); // 12-hour BCD
        assert_eq!(rd(&mut r, REG_HOUR, 0), 0x91);
        // Writing in 12-hour BCD: 12 AM is hour 0.
        wr(&mut r, REG_B, B_SET, 0);
        wr(&mut r, REG_HOUR, 0x12, 0);
        wr(&mut r, REG_B, B_24H, 0);
        assert_eq!(rd(&mut r, REG_HOUR, 0), 0x00);
        wr(&mut r, REG_B, 0, 0);
        assert_eq!(rd(&mut r, REG_HOUR, 0), 0x12);
        // Writing in binary.
        wr(&mut r, REG_B, B_SET | B_24H | B_DM_BINARY, 0);
        wr(&mut r, REG_MIN, 7, 0);
        wr(&mut r, REG_B, B_24H, 0);
        assert_eq!(rd(&mut r, REG_MIN, 0), 0x07);
    }

    #[test]
    fn set_halts_updates_and_resumes_on_the_old_phase() {
        let mut r = rtc();
        wr(&mut r, REG_B, B_SET | B_24H, S / 2);
        assert_eq!(rd(&mut r, REG_A, S - 1000) & A_UIP, 0, "no UIP while SET");
        wr(&mut r, REG_HOUR, 0x08, S / 2);
        wr(&mut r, REG_MIN, 0x30, S / 2);
        wr(&mut r, REG_SEC, 0x15, S / 2);
        assert_eq!(hms(&mut r, 3 * S + 700 * MS), (0x08, 0x30, 0x15), "halted");
        wr(&mut r, REG_B, B_24H, 3 * S + 700 * MS);
        assert_eq!(hms(&mut r, 4 * S - 1), (0x08, 0x30, 0x15));
        assert_eq!(rd(&mut r, REG_A, 4 * S - 1) & A_UIP, A_UIP);
        assert_eq!(hms(&mut r, 4 * S), (0x08, 0x30, 0x16));
        // SET clears UIE.
        wr(&mut r, REG_B, B_SET | B_UIE | B_24H, 5 * S);
        assert_eq!(rd(&mut r, REG_B, 5 * S), B_SET | B_24H);
    }

    #[test]
    fn divider_reset_delays_the_first_update_by_half_a_second() {
        let mut r = rtc();
        wr(&mut r, REG_A, 0x70, 100 * MS);
        assert_eq!(rd(&mut r, 0, 5 * S), 0x00, "divider in reset: no updates");
        assert_eq!(rd(&mut r, REG_A, 5 * S) & A_UIP, 0);
        let release = 5 * S + 123 * MS;
        wr(&mut r, REG_A, 0x26, release);
        assert_eq!(rd(&mut r, 0, release + 500 * MS - 1), 0x00);
        assert_eq!(
            rd(&mut r, REG_A, release + 500 * MS - UIP_WINDOW_NS) & A_UIP,
            A_UIP
        );
        assert_eq!(rd(&mut r, 0, release + 500 * MS), 0x01);
        assert_eq!(rd(&mut r, 0, release + 1500 * MS - 1), 0x01);
        assert_eq!(rd(&mut r, 0, release + 1500 * MS), 0x02);
    }

    #[test]
    fn register_c_flags_and_irq() {
        let mut r = rtc();
        // The BIOS default rate (1024 Hz) sets PF all the time; turn it off to see
        // the other flags alone.
        wr(&mut r, REG_A, 0x20, 0);
        assert!(!r.irq_pending(0));
        assert_eq!(rd(&mut r, REG_C, S - 1), 0);
        assert_eq!(rd(&mut r, REG_C, S), C_UF, "update-ended flag without IRQF");
        assert_eq!(rd(&mut r, REG_C, S), 0, "read clears");
        wr(&mut r, REG_B, B_24H | B_UIE, S);
        assert!(!r.irq_pending(2 * S - 1));
        assert!(r.irq_pending(2 * S));
        assert_eq!(r.irq(2 * S), IrqOutput::Level { irq: 8, high: true });
        assert_eq!(rd(&mut r, REG_C, 2 * S), C_IRQF | C_UF);
        assert!(!r.irq_pending(2 * S));
        // Alarm at 12:00:05 (BCD).
        wr(&mut r, REG_B, B_24H | 0x20, 2 * S);
        wr(&mut r, REG_SEC_ALARM, 0x05, 2 * S);
        wr(&mut r, REG_MIN_ALARM, 0x00, 2 * S);
        wr(&mut r, REG_HOUR_ALARM, 0x12, 2 * S);
        assert_eq!(rd(&mut r, REG_C, 5 * S - 1) & C_AF, 0);
        assert_eq!(rd(&mut r, REG_C, 5 * S), C_IRQF | C_AF | C_UF);
        // Don't-care hours and minutes: every minute at :05.
        wr(&mut r, REG_MIN_ALARM, 0xc0, 5 * S);
        wr(&mut r, REG_HOUR_ALARM, 0xff, 5 * S);
        assert_eq!(rd(&mut r, REG_C, 64 * S) & C_AF, 0);
        assert_eq!(rd(&mut r, REG_C, 65 * S) & C_AF, C_AF);
        // A jump over days still reports the alarm.
        assert_eq!(rd(&mut r, REG_C, 3 * 86_400 * S) & C_AF, C_AF);
    }

    #[test]
    fn periodic_flag_at_the_selected_rate() {
        let mut r = rtc();
        wr(&mut r, REG_A, 0x26, 0); // 1024 Hz: 976.5625 µs
        rd(&mut r, REG_C, 0);
        assert_eq!(rd(&mut r, REG_C, 976_562) & C_PF, 0);
        assert_eq!(rd(&mut r, REG_C, 976_563) & C_PF, C_PF);
        assert_eq!(rd(&mut r, REG_C, 976_563 + 900_000) & C_PF, 0);
        wr(&mut r, REG_B, B_24H | 0x40, 2 * MS);
        assert!(r.irq_pending(3 * MS));
        // Rate 0: no periodic flag.
        wr(&mut r, REG_A, 0x20, 3 * MS);
        rd(&mut r, REG_C, 3 * MS);
        assert_eq!(rd(&mut r, REG_C, 900 * MS) & C_PF, 0);
    }

    #[test]
    fn next_event_for_enabled_sources() {
        let mut r = rtc();
        assert_eq!(r.next_event_ns(123), None, "no interrupt enabled");
        wr(&mut r, REG_B, B_24H | B_UIE, 0);
        assert_eq!(r.next_event_ns(123), Some(S));
        assert_eq!(r.next_event_ns(S - 1), Some(S));
        // At S the update is due even before anything synced the clock.
        assert_eq!(r.next_event_ns(S), Some(S));
        assert!(r.irq_pending(S));
        assert_eq!(r.next_event_ns(S), Some(S), "already raised");
        rd(&mut r, REG_C, S);
        assert_eq!(r.next_event_ns(S), Some(2 * S));
        // Periodic at 1024 Hz as well: the next period comes first.
        wr(&mut r, REG_B, B_24H | B_UIE | 0x40, S);
        assert_eq!(r.next_event_ns(S + 10), Some(S + 976_563));
        assert!(!r.irq_pending(S + 976_562));
        assert!(r.irq_pending(S + 976_563));
    }

    #[test]
    fn cmos_ram_index_and_nmi_bit() {
        let mut r = rtc();
        for i in 0x0e..=0x7fu8 {
            if i != REG_CENTURY {
                wr(&mut r, i, i ^ 0x5a, 0);
            }
        }
        for i in 0x0e..=0x7fu8 {
            if i != REG_CENTURY {
                assert_eq!(rd(&mut r, i, 0), i ^ 0x5a);
            }
        }
        // Bit 7 of the index is NMI disable, not part of the index.
        r.write(0x70, 1, 0x80 | 0x10, 0);
        assert!(r.nmi_disabled());
        assert_eq!(r.index(), 0x10);
        assert_eq!(r.read(0x71, 1, 0), 0x10 ^ 0x5a);
        r.write(0x70, 1, 0x00, 0);
        assert!(!r.nmi_disabled());
        assert_eq!(r.cmos(0x20), 0x20 ^ 0x5a);
        r.set_cmos(0x15, 0x80);
        assert_eq!(rd(&mut r, 0x15, 0), 0x80);
        // Registers C and D are read-only.
        wr(&mut r, REG_D, 0, 0);
        assert_eq!(rd(&mut r, REG_D, 0), 0x80);
        // Century register is writable and part of the year.
        wr(&mut r, REG_CENTURY, 0x19, 0);
        assert_eq!(r.time(0).year, 1924);
    }

    #[test]
    fn garbage_and_time_going_back_never_panic() {
        let mut r = rtc();
        let mut now = 0u64;
        for i in 0..=255u8 {
            for j in [0u8, 0x7f, 0x80, 0xff, i] {
                wr(&mut r, i, j, now);
                let _ = rd(&mut r, i, now / 3);
            }
            now += 37 * MS;
            let _ = r.time(now);
        }
        // Nonsense time values still tick without panicking.
        wr(&mut r, REG_A, 0x26, now);
        wr(&mut r, REG_B, B_DM_BINARY | B_24H, now);
        for reg in [
            REG_SEC, REG_MIN, REG_HOUR, REG_DOW, REG_DOM, REG_MONTH, REG_YEAR,
        ] {
            wr(&mut r, reg, 0xff, now);
        }
        let _ = r.time(now + 10 * S);
        let _ = r.time(now + 1000 * 86_400 * S);
        let _ = r.time(u64::MAX);
        assert_eq!(rd(&mut r, REG_D, u64::MAX), 0x80);
    }
}
