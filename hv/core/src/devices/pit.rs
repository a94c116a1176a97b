//! 8254 programmable interval timer (ports 0x40..=0x43) and system control
//! port B (0x61).
//!
//! Counters are not stepped: each channel remembers the virtual time its count
//! started, and counts and OUT levels are computed from the ticks of the 1.193182
//! MHz input clock elapsed since then (tick `n` is at `n * 10^9 / 1193182` ns of
//! virtual time, so the arithmetic never drifts). Modes 0 to 5, lobyte/hibyte/lohi
//! access, counter latch, read-back (count and status) and BCD counting are
//! modelled, as is when a new count takes effect: at once in modes 0 and 4 (and
//! when a mode was just set), at the end of the current period in modes 2 and 3,
//! at the next gate trigger in modes 1 and 5 (null count reads 1 until then).
//!
//! Port 0x61: bit 0 gates channel 2, bit 1 is the speaker data enable, bits 2..3
//! are stored, bit 4 toggles with each DRAM refresh (every 15.085 µs), bit 5 reads
//! channel 2's OUT, bits 6..7 (parity/IOCHK) read 0.

use alloc::borrow::Cow;

use super::device::{IrqOutput, PortDevice};

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;

/// Half-period of the port 0x61 refresh toggle (bit 4).
const REFRESH_NS: u64 = 15_085;

/// Input clock ticks from time 0 to `now_ns`.
pub fn ticks_at(now_ns: u64) -> u64 {
    (now_ns as u128 * PIT_HZ as u128 / 1_000_000_000) as u64
}

/// The first virtual time at which `ticks_at` reaches `ticks`.
pub fn ns_of_tick(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000_000)
        .div_ceil(PIT_HZ as u128)
        .min(u64::MAX as u128) as u64
}

const ACCESS_LATCH: u8 = 0;
const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;

#[derive(Clone, Debug)]
struct Channel {
    mode: u8,
    access: u8,
    bcd: bool,
    /// The count in use (reload value of the counting element), 1..=65536
    /// (1..=10000 in BCD).
    count: u32,
    /// The count register: the count last written, 1..=65536.
    cr: u32,
    /// Tick at which `cr` replaces `count` and counting restarts (a count written
    /// while modes 2 and 3 count takes effect at the end of the current period).
    pending_at: Option<u64>,
    /// OUT rising edges of earlier counts since the channel (re)started.
    edges_base: u64,
    /// A count was written since the mode was set.
    loaded: bool,
    /// LSB of a lohi write received, MSB pending.
    waiting_msb: bool,
    pending_lsb: u8,
    /// Next unlatched lohi read returns the MSB.
    read_msb: bool,
    latch: Option<u16>,
    latch_msb: bool,
    status_latch: Option<u8>,
    null_count: bool,
    gate: bool,
    /// Counting has been started (by the count write, or a gate edge in 1 and 5).
    triggered: bool,
    /// The counting element is decrementing now.
    running: bool,
    start_tick: u64,
    /// Ticks counted before the last pause.
    paused: u64,
    /// OUT rising edges already reported as interrupts.
    edges_seen: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: ACCESS_LOHI,
            bcd: false,
            count: 0x1_0000,
            cr: 0x1_0000,
            pending_at: None,
            edges_base: 0,
            loaded: false,
            waiting_msb: false,
            pending_lsb: 0,
            read_msb: false,
            latch: None,
            latch_msb: false,
            status_latch: None,
            null_count: true,
            gate,
            triggered: false,
            running: false,
            start_tick: 0,
            paused: 0,
            edges_seen: 0,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    fn elapsed(&self, now_ns: u64) -> u64 {
        let live = if self.running {
            ticks_at(now_ns).saturating_sub(self.start_tick)
        } else {
            0
        };
        self.paused.saturating_add(live)
    }

    fn set_mode(&mut self, cw: u8) {
        let mut mode = (cw >> 1) & 7;
        if mode >= 6 {
            mode -= 4;
        }
        self.mode = mode;
        self.access = (cw >> 4) & 3;
        self.bcd = cw & 1 != 0;
        self.loaded = false;
        self.triggered = false;
        self.running = false;
        self.paused = 0;
        self.edges_seen = 0;
        self.edges_base = 0;
        self.pending_at = None;
        self.waiting_msb = false;
        self.read_msb = false;
        self.latch = None;
        self.latch_msb = false;
        self.status_latch = None;
        self.null_count = true;
    }

    /// (Re)start counting from the count register at `now_ns`.
    fn start(&mut self, now_ns: u64) {
        self.count = self.cr;
        self.pending_at = None;
        self.null_count = false;
        self.triggered = true;
        self.running = true;
        self.paused = 0;
        self.edges_seen = 0;
        self.edges_base = 0;
        self.start_tick = ticks_at(now_ns);
    }

    /// Apply a deferred count whose time has come.
    fn settle(&mut self, now_ns: u64) {
        let Some(at) = self.pending_at else { return };
        if ticks_at(now_ns) < at {
            return;
        }
        // Counting ran without a pause up to the switch (a falling gate drops the
        // deferral).
        let e_switch = at - self.start_tick + self.paused;
        self.edges_base += self.edges_at(e_switch);
        self.count = self.cr;
        self.start_tick = at;
        self.paused = 0;
        self.pending_at = None;
        self.null_count = false;
    }

    /// This channel as it is at `now_ns` (with a due deferred count applied).
    fn view(&self, now_ns: u64) -> Cow<'_, Channel> {
        match self.pending_at {
            Some(at) if ticks_at(now_ns) >= at => {
                let mut c = self.clone();
                c.settle(now_ns);
                Cow::Owned(c)
            }
            _ => Cow::Borrowed(self),
        }
    }

    fn load(&mut self, raw: u16, now_ns: u64) {
        let mut n = if self.bcd {
            let d = |s: u16| ((raw >> s) & 0xf).min(9) as u32;
            d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
        } else {
            raw as u32
        };
        if n == 0 {
            n = self.modulus() as u32;
        }
        self.settle(now_ns);
        self.cr = n;
        let was_loaded = self.loaded;
        self.loaded = true;
        match self.mode {
            1 | 5 if self.triggered => {
                // A one-shot in progress finishes with its count; the new one is
                // used at the next gate trigger.
                self.null_count = true;
            }
            1 | 5 => {
                // Hardware triggered: wait for a rising gate edge.
                self.count = n;
                self.null_count = true;
                self.running = false;
                self.paused = 0;
            }
            2 | 3 if was_loaded && self.running => {
                // Takes effect at the end of the current period.
                let e = self.elapsed(now_ns);
                let old = self.count as u64;
                let end = (e / old + 1) * old;
                self.pending_at = Some(self.start_tick + (end - self.paused));
                self.null_count = true;
            }
            _ => {
                self.start(now_ns);
                self.running = self.gate;
            }
        }
    }

    fn set_gate(&mut self, level: bool, now_ns: u64) {
        self.settle(now_ns);
        let rising = level && !self.gate;
        let falling = !level && self.gate;
        self.gate = level;
        match self.mode {
            0 | 4 => {
                if falling && self.running {
                    self.paused = self.elapsed(now_ns);
                    self.running = false;
                } else if rising && self.triggered && self.loaded {
                    self.start_tick = ticks_at(now_ns);
                    self.running = true;
                }
            }
            2 | 3 => {
                if falling && self.running {
                    self.paused = self.elapsed(now_ns);
                    self.running = false;
                    // The rising edge reloads from the count register anyway.
                    self.pending_at = None;
                } else if rising && self.loaded {
                    self.start(now_ns);
                }
            }
            _ => {
                if rising && self.loaded {
                    self.start(now_ns);
                }
            }
        }
    }

    /// The OUT pin.
    fn out(&self, now_ns: u64) -> bool {
        self.view(now_ns).out_settled(now_ns)
    }

    fn out_settled(&self, now_ns: u64) -> bool {
        if !self.loaded {
            return self.mode != 0;
        }
        let n = self.count as u64;
        let e = self.elapsed(now_ns);
        match self.mode {
            0 => e >= n,
            1 => !self.triggered || e >= n,
            2 => !self.running || e % n != n - 1,
            3 => !self.running || e % n < n.div_ceil(2),
            4 => e != n,
            _ => !self.triggered || e != n,
        }
    }

    /// The counting element, in binary (0..modulus).
    fn value(&self, now_ns: u64) -> u64 {
        self.view(now_ns).value_settled(now_ns)
    }

    fn value_settled(&self, now_ns: u64) -> u64 {
        let m = self.modulus();
        let n = self.count as u64;
        if !self.loaded {
            return n % m;
        }
        let e = self.elapsed(now_ns);
        let v = match self.mode {
            2 => n - e % n,
            3 => {
                let phase = e % n;
                let high = n.div_ceil(2);
                let within = if phase < high { phase } else { phase - high };
                (n & !1).saturating_sub(2 * within)
            }
            _ => n + m - e % m,
        };
        v % m
    }

    /// The count as the guest reads it (BCD-encoded in BCD mode).
    fn read_value(&self, now_ns: u64) -> u16 {
        let v = self.value(now_ns);
        if self.bcd {
            let v = v as u16;
            (v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)
        } else {
            v as u16
        }
    }

    /// OUT rising edges since the channel started counting.
    fn edges(&self, now_ns: u64) -> u64 {
        let c = self.view(now_ns);
        c.edges_base + c.edges_at(c.elapsed(now_ns))
    }

    /// OUT rising edges of the current count after `e` ticks of it.
    fn edges_at(&self, e: u64) -> u64 {
        if !self.loaded || !self.triggered {
            return 0;
        }
        let n = self.count as u64;
        match self.mode {
            0 | 1 => (e >= n) as u64,
            2 | 3 => e / n,
            _ => (e > n) as u64,
        }
    }

    /// The virtual time of the next OUT rising edge, if one is coming.
    fn next_edge_ns(&self, now_ns: u64) -> Option<u64> {
        self.view(now_ns).next_edge_settled(now_ns)
    }

    /// (A deferred count only takes effect at an edge of the current one, so the
    /// next edge is always the current count's.)
    fn next_edge_settled(&self, now_ns: u64) -> Option<u64> {
        if !self.loaded || !self.triggered || !self.running {
            return None;
        }
        let n = self.count as u64;
        let e = self.elapsed(now_ns);
        let target = match self.mode {
            0 | 1 if e < n => n,
            2 | 3 => (e / n + 1) * n,
            4 | 5 if e <= n => n + 1,
            _ => return None,
        };
        let tick = self.start_tick + (target - self.paused);
        Some(ns_of_tick(tick).max(now_ns))
    }

    fn status(&self, now_ns: u64) -> u8 {
        let c = self.view(now_ns);
        (c.out_settled(now_ns) as u8) << 7
            | (c.null_count as u8) << 6
            | self.access << 4
            | self.mode << 1
            | self.bcd as u8
    }

    fn latch_count(&mut self, now_ns: u64) {
        self.settle(now_ns);
        if self.latch.is_none() {
            self.latch = Some(self.read_value(now_ns));
            self.latch_msb = false;
        }
    }

    fn read_port(&mut self, now_ns: u64) -> u8 {
        self.settle(now_ns);
        if let Some(s) = self.status_latch.take() {
            return s;
        }
        if let Some(l) = self.latch {
            let [lo, hi] = l.to_le_bytes();
            return match self.access {
                ACCESS_LO => {
                    self.latch = None;
                    lo
                }
                ACCESS_HI => {
                    self.latch = None;
                    hi
                }
                _ if !self.latch_msb => {
                    self.latch_msb = true;
                    lo
                }
                _ => {
                    self.latch_msb = false;
                    self.latch = None;
                    hi
                }
            };
        }
        let [lo, hi] = self.read_value(now_ns).to_le_bytes();
        match self.access {
            ACCESS_LO => lo,
            ACCESS_HI => hi,
            _ => {
                self.read_msb = !self.read_msb;
                if self.read_msb {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write_port(&mut self, v: u8, now_ns: u64) {
        self.settle(now_ns);
        match self.access {
            ACCESS_LO => self.load(v as u16, now_ns),
            ACCESS_HI => self.load((v as u16) << 8, now_ns),
            _ if !self.waiting_msb => {
                self.pending_lsb = v;
                self.waiting_msb = true;
                if self.mode == 0 {
                    // Writing the first byte stops the count and drives OUT low.
                    self.paused = self.elapsed(now_ns);
                    self.running = false;
                    self.loaded = false;
                }
            }
            _ => {
                self.waiting_msb = false;
                self.load(u16::from_le_bytes([self.pending_lsb, v]), now_ns);
            }
        }
    }
}

/// The 8254 with its three channels and port 0x61.
#[derive(Clone, Debug)]
pub struct Pit {
    ch: [Channel; 3],
    speaker: bool,
    /// Port 0x61 bits 2..3.
    port_b_ctl: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Reset state: channels 0 and 1 gated on (tied high on a PC), channel 2's gate
    /// off (port 0x61 bit 0 clear); no counts loaded.
    pub fn new() -> Self {
        Pit {
            ch: [Channel::new(true), Channel::new(true), Channel::new(false)],
            speaker: false,
            port_b_ctl: 0,
        }
    }

    /// Channel `c`'s counting element now (binary, or BCD in BCD mode).
    pub fn count(&self, c: usize, now_ns: u64) -> u16 {
        self.ch.get(c).map_or(0, |ch| ch.read_value(now_ns))
    }

    /// Channel `c`'s OUT pin now.
    pub fn out(&self, c: usize, now_ns: u64) -> bool {
        self.ch.get(c).is_some_and(|ch| ch.out(now_ns))
    }

    /// Channel `c`'s mode (0..=5).
    pub fn mode(&self, c: usize) -> u8 {
        self.ch.get(c).map_or(0, |ch| ch.mode)
    }

    /// Channel `c`'s count register (1..=65536): the count last written, once one
    /// was.
    pub fn reload(&self, c: usize) -> Option<u32> {
        self.ch.get(c).filter(|ch| ch.loaded).map(|ch| ch.cr)
    }

    pub fn gate(&self, c: usize) -> bool {
        self.ch.get(c).is_some_and(|ch| ch.gate)
    }

    /// Drive channel `c`'s gate input.
    pub fn set_gate(&mut self, c: usize, level: bool, now_ns: u64) {
        if let Some(ch) = self.ch.get_mut(c) {
            ch.set_gate(level, now_ns);
        }
    }

    /// True if channel 0's OUT rose since the last [`Pit::take_irq0`].
    pub fn irq0_pending(&self, now_ns: u64) -> bool {
        self.ch[0].edges(now_ns) > self.ch[0].edges_seen
    }

    /// [`Pit::irq0_pending`], and mark the edges seen.
    pub fn take_irq0(&mut self, now_ns: u64) -> bool {
        self.ch[0].settle(now_ns);
        let e = self.ch[0].edges(now_ns);
        let pending = e > self.ch[0].edges_seen;
        self.ch[0].edges_seen = e;
        pending
    }

    /// When channel 0's OUT rises next (now, if an edge is already pending).
    pub fn next_irq0_ns(&self, now_ns: u64) -> Option<u64> {
        if self.irq0_pending(now_ns) {
            return Some(now_ns);
        }
        self.ch[0].next_edge_ns(now_ns)
    }

    /// Port 0x61 as read.
    pub fn port_b(&self, now_ns: u64) -> u8 {
        self.ch[2].gate as u8
            | (self.speaker as u8) << 1
            | self.port_b_ctl
            | (((now_ns / REFRESH_NS) & 1) as u8) << 4
            | (self.ch[2].out(now_ns) as u8) << 5
    }

    fn write_port_b(&mut self, v: u8, now_ns: u64) {
        self.ch[2].set_gate(v & 1 != 0, now_ns);
        self.speaker = v & 2 != 0;
        self.port_b_ctl = v & 0x0c;
    }

    fn write_control(&mut self, cw: u8, now_ns: u64) {
        let sel = (cw >> 6) as usize;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status,
            // bits 1..3 select channels 0..2.
            for (i, ch) in self.ch.iter_mut().enumerate() {
                if cw & (2 << i) == 0 {
                    continue;
                }
                if cw & 0x20 == 0 {
                    ch.latch_count(now_ns);
                }
                if cw & 0x10 == 0 && ch.status_latch.is_none() {
                    ch.status_latch = Some(ch.status(now_ns));
                }
            }
            return;
        }
        let ch = &mut self.ch[sel];
        if (cw >> 4) & 3 == ACCESS_LATCH {
            ch.latch_count(now_ns);
        } else {
            ch.set_mode(cw);
        }
    }

    /// Byte read of `port` (0x40..=0x43, 0x61).
    pub fn read_port(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].read_port(now_ns),
            0x61 => self.port_b(now_ns),
            _ => 0xff, // the control word register is write-only
        }
    }

    /// Byte write of `port` (0x40..=0x43, 0x61).
    pub fn write_port(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].write_port(value, now_ns),
            0x43 => self.write_control(value, now_ns),
            0x61 => self.write_port_b(value, now_ns),
            _ => {}
        }
    }
}

impl PortDevice for Pit {
    fn name(&self) -> &'static str {
        "pit8254"
    }
    fn read(&mut self, port: u16, _size: u8, now_ns: u64) -> u32 {
        self.read_port(port, now_ns) as u32
    }
    fn write(&mut self, port: u16, _size: u8, value: u32, now_ns: u64) {
        self.write_port(port, value as u8, now_ns)
    }
    fn irq(&mut self, now_ns: u64) -> IrqOutput {
        if self.take_irq0(now_ns) {
            IrqOutput::Pulse { irq: 0 }
        } else {
            IrqOutput::None
        }
    }
    fn next_event_ns(&self, now_ns: u64) -> Option<u64> {
        self.next_irq0_ns(now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn program(p: &mut Pit, ch: u16, cw: u8, count: u16, now: u64) {
        p.write_port(0x43, cw, now);
        p.write_port(0x40 + ch, count as u8, now);
        p.write_port(0x40 + ch, (count >> 8) as u8, now);
    }

    /// Latched lohi read of channel `ch`.
    fn latched(p: &mut Pit, ch: u16, now: u64) -> u16 {
        p.write_port(0x43, (ch as u8) << 6, now);
        let lo = p.read_port(0x40 + ch, now + 1000);
        let hi = p.read_port(0x40 + ch, now + 2000);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn tick_conversion_round_trips() {
        assert_eq!(ticks_at(1_000_000_000), PIT_HZ);
        assert_eq!(ticks_at(0), 0);
        for t in [1u64, 2, 59_659, 1_193_181, 1 << 40] {
            let ns = ns_of_tick(t);
            assert_eq!(ticks_at(ns), t);
            assert_eq!(ticks_at(ns - 1), t - 1);
        }
        // No overflow at the end of time.
        let _ = ticks_at(u64::MAX);
    }

    #[test]
    fn linux_pit_calibrate_tsc_pattern() {
        let mut p = Pit::new();
        let t0 = 3 * MS + 123;
        // Gate high, speaker off: read-modify-write of port 0x61.
        let b = p.read_port(0x61, t0);
        assert_eq!(b & 0x03, 0);
        p.write_port(0x61, (b & !0x02) | 0x01, t0);
        assert!(p.gate(2));
        // Channel 2, lohi, mode 0, binary; 50 ms latch.
        let latch = (PIT_HZ / 20) as u16;
        program(&mut p, 2, 0xb0, latch, t0);
        assert_eq!(p.mode(2), 0);
        let start = ticks_at(t0);
        let high_at = ns_of_tick(start + latch as u64);
        assert_eq!(p.read_port(0x61, t0) & 0x20, 0);
        assert_eq!(
            p.read_port(0x61, high_at - 1) & 0x20,
            0,
            "just before terminal count"
        );
        assert_eq!(p.read_port(0x61, high_at) & 0x20, 0x20, "at terminal count");
        assert_eq!(
            p.read_port(0x61, high_at + 10 * MS) & 0x20,
            0x20,
            "stays high"
        );
        assert!((high_at - t0).abs_diff(50 * MS) < 2_000);
        // The gate bit reads back, bits 6..7 read 0.
        assert_eq!(p.read_port(0x61, high_at) & 0xc1, 0x01);
    }

    #[test]
    fn channel2_does_not_count_while_gated_off() {
        let mut p = Pit::new();
        program(&mut p, 2, 0xb0, 1000, 0);
        // Gate is low at reset: the count holds and OUT stays low.
        assert_eq!(p.count(2, 10 * MS), 1000);
        assert_eq!(p.read_port(0x61, 10 * MS) & 0x20, 0);
        p.write_port(0x61, 0x01, 10 * MS);
        let s = ticks_at(10 * MS);
        assert_eq!(p.count(2, ns_of_tick(s + 400)), 600);
        // Gate low pauses mode 0, gate high resumes where it stopped.
        p.write_port(0x61, 0x00, ns_of_tick(s + 400));
        assert_eq!(p.count(2, 50 * MS), 600);
        let s2 = ticks_at(60 * MS);
        p.write_port(0x61, 0x01, 60 * MS);
        assert_eq!(p.count(2, ns_of_tick(s2 + 599)), 1);
        assert!(!p.out(2, ns_of_tick(s2 + 599)));
        assert!(p.out(2, ns_of_tick(s2 + 600)));
        // After terminal count mode 0 keeps counting down through 0xffff.
        assert_eq!(p.count(2, ns_of_tick(s2 + 601)), 0xffff);
    }

    #[test]
    fn quick_pit_calibrate_live_msb_reads() {
        let mut p = Pit::new();
        p.write_port(0x61, 0x01, 0);
        program(&mut p, 2, 0xb0, 0xffff, 0);
        // Unlatched lohi reads alternate LSB, MSB of the live count.
        for k in 1..=200u64 {
            let t = ns_of_tick(k * 256 + 10);
            let _lsb = p.read_port(0x42, t);
            let msb = p.read_port(0x42, t);
            assert_eq!(msb as u64, (0xffff - (k * 256 + 10)) >> 8);
        }
    }

    #[test]
    fn count_read_back_follows_elapsed_virtual_time() {
        let mut p = Pit::new();
        program(&mut p, 0, 0x30, 50_000, 0); // mode 0
        for ns in [0u64, 1_000, 838, 839, MS, 20 * MS, 41 * MS] {
            let want = ((50_000u64 + 0x1_0000 - ticks_at(ns) % 0x1_0000) % 0x1_0000) as u16;
            assert_eq!(latched(&mut p, 0, ns), want, "at {ns} ns");
        }
        // Latching freezes the value until it is read.
        p.write_port(0x43, 0x00, 5 * MS);
        let frozen = p.count(0, 5 * MS);
        assert_eq!(p.read_port(0x40, 30 * MS), frozen as u8);
        // A second latch command before the read completes is ignored.
        p.write_port(0x43, 0x00, 31 * MS);
        assert_eq!(p.read_port(0x40, 32 * MS), (frozen >> 8) as u8);
        // Then live again.
        let live = p.count(0, 33 * MS);
        assert_ne!(live, frozen);
        assert_eq!(p.read_port(0x40, 33 * MS), live as u8);
    }

    #[test]
    fn mode2_rate_generator_and_irq0_edges() {
        let mut p = Pit::new();
        program(&mut p, 0, 0x34, 1000, 0);
        assert!(p.out(0, 0));
        assert_eq!(p.count(0, 0), 1000);
        assert_eq!(p.count(0, ns_of_tick(1)), 999);
        assert_eq!(p.count(0, ns_of_tick(998)), 2);
        assert_eq!(p.count(0, ns_of_tick(999)), 1);
        assert!(!p.out(0, ns_of_tick(999)), "OUT low for the last tick");
        assert!(p.out(0, ns_of_tick(1000)));
        assert_eq!(p.count(0, ns_of_tick(1000)), 1000, "reloaded");
        assert!(!p.irq0_pending(ns_of_tick(999)));
        assert!(p.irq0_pending(ns_of_tick(1000)));
        assert!(p.take_irq0(ns_of_tick(1000)));
        assert!(!p.take_irq0(ns_of_tick(1999)));
        // Several periods missed collapse into one pending interrupt.
        assert!(p.take_irq0(ns_of_tick(10_500)));
        assert!(!p.take_irq0(ns_of_tick(10_999)));
        assert!(p.take_irq0(ns_of_tick(11_000)));
        assert_eq!(p.irq(ns_of_tick(12_000)), IrqOutput::Pulse { irq: 0 });
        assert_eq!(p.irq(ns_of_tick(12_001)), IrqOutput::None);
    }

    #[test]
    fn next_irq0_time() {
        let mut p = Pit::new();
        assert_eq!(p.next_irq0_ns(0), None);
        program(&mut p, 0, 0x34, 1000, 5 * MS);
        let s = ticks_at(5 * MS);
        assert_eq!(p.next_irq0_ns(5 * MS), Some(ns_of_tick(s + 1000)));
        let t = ns_of_tick(s + 2500);
        assert_eq!(p.next_irq0_ns(t), Some(t), "edges not yet taken");
        assert!(p.take_irq0(t));
        assert_eq!(p.next_irq0_ns(t), Some(ns_of_tick(s + 3000)));
        // Mode 0: one edge, then nothing.
        program(&mut p, 0, 0x30, 50, t);
        let s = ticks_at(t);
        assert_eq!(p.next_irq0_ns(t), Some(ns_of_tick(s + 50)));
        assert!(p.take_irq0(ns_of_tick(s + 50)));
        assert_eq!(p.next_irq0_ns(ns_of_tick(s + 50)), None);
    }

    #[test]
    fn mode3_square_wave_counts_by_two() {
        let mut p = Pit::new();
        program(&mut p, 0, 0x36, 100, 0);
        assert_eq!(p.mode(0), 3);
        assert!(p.out(0, ns_of_tick(49)));
        assert!(!p.out(0, ns_of_tick(50)));
        assert!(!p.out(0, ns_of_tick(99)));
        assert!(p.out(0, ns_of_tick(100)));
        assert_eq!(p.count(0, ns_of_tick(0)), 100);
        assert_eq!(p.count(0, ns_of_tick(1)), 98);
        assert_eq!(p.count(0, ns_of_tick(49)), 2);
        assert_eq!(p.count(0, ns_of_tick(50)), 100);
        assert!(p.take_irq0(ns_of_tick(100)));
        // Odd count: high one tick longer than low.
        program(&mut p, 1, 0x76, 5, 0);
        let outs: [bool; 5] = core::array::from_fn(|t| p.out(1, ns_of_tick(t as u64)));
        assert_eq!(outs, [true, true, true, false, false]);
        // Mode 6 is mode 2 and mode 7 is mode 3.
        p.write_port(0x43, 0x1c, 0);
        assert_eq!(p.mode(0), 2);
        p.write_port(0x43, 0x1e, 0);
        assert_eq!(p.mode(0), 3);
    }

    #[test]
    fn new_count_in_mode2_waits_for_the_end_of_the_period() {
        let mut p = Pit::new();
        program(&mut p, 0, 0x34, 1000, 0);
        assert!(p.take_irq0(ns_of_tick(2500)));
        // Rewrite the count without a control word at tick 2500.
        p.write_port(0x40, 300u16 as u8, ns_of_tick(2500));
        p.write_port(0x40, (300u16 >> 8) as u8, ns_of_tick(2500));
        assert_eq!(p.reload(0), Some(300));
        // Status: null count until the new count is in the counting element.
        p.write_port(0x43, 0xe2, ns_of_tick(2600));
        assert_eq!(p.read_port(0x40, ns_of_tick(2600)), 0xc0 | 0x34);
        assert_eq!(p.count(0, ns_of_tick(2999)), 1, "old period runs out");
        assert!(!p.out(0, ns_of_tick(2999)));
        assert_eq!(p.next_irq0_ns(ns_of_tick(2600)), Some(ns_of_tick(3000)));
        assert_eq!(
            p.count(0, ns_of_tick(3000)),
            300,
            "new count from the edge on"
        );
        assert_eq!(p.count(0, ns_of_tick(3001)), 299);
        assert!(!p.out(0, ns_of_tick(3299)));
        // The edge at the switch raises its interrupt, then the new period's.
        assert!(p.take_irq0(ns_of_tick(3000)));
        assert_eq!(p.next_irq0_ns(ns_of_tick(3001)), Some(ns_of_tick(3300)));
        p.write_port(0x43, 0xe2, ns_of_tick(3100));
        assert_eq!(p.read_port(0x40, ns_of_tick(3100)), 0x80 | 0x34);
        assert!(!p.take_irq0(ns_of_tick(3299)));
        assert!(p.take_irq0(ns_of_tick(3300)));
        assert!(!p.take_irq0(ns_of_tick(3599)));
        assert!(p.take_irq0(ns_of_tick(3600)));
        // A control word resets the channel: the next count applies at once.
        program(&mut p, 0, 0x34, 50, ns_of_tick(3650));
        assert_eq!(p.count(0, ns_of_tick(3660)), 40);
    }

    #[test]
    fn new_count_in_mode1_waits_for_the_next_trigger() {
        let mut p = Pit::new();
        program(&mut p, 2, 0xb2, 100, 0); // channel 2, mode 1
        assert!(p.out(2, ns_of_tick(10)), "OUT high until triggered");
        assert_eq!(p.count(2, ns_of_tick(10)), 100);
        p.set_gate(2, true, ns_of_tick(20));
        assert!(!p.out(2, ns_of_tick(20)));
        assert!(p.out(2, ns_of_tick(120)));
        p.set_gate(2, false, ns_of_tick(25));
        p.set_gate(2, true, ns_of_tick(30)); // trigger: 100 ticks low
        p.write_port(0x42, 10, ns_of_tick(50));
        p.write_port(0x42, 0, ns_of_tick(50));
        assert!(
            !p.out(2, ns_of_tick(129)),
            "the running one-shot keeps its count"
        );
        assert!(p.out(2, ns_of_tick(130)));
        p.set_gate(2, false, ns_of_tick(200));
        p.set_gate(2, true, ns_of_tick(200));
        assert!(!p.out(2, ns_of_tick(209)));
        assert!(p.out(2, ns_of_tick(210)), "retriggered with the new count");
    }

    #[test]
    fn mode2_gate_stops_and_restarts_channel2() {
        let mut p = Pit::new();
        p.write_port(0x61, 1, 0);
        program(&mut p, 2, 0xb4, 300, 0);
        assert_eq!(p.count(2, ns_of_tick(100)), 200);
        p.write_port(0x61, 0, ns_of_tick(100));
        assert!(p.out(2, ns_of_tick(299)), "gate low forces OUT high");
        assert_eq!(p.count(2, ns_of_tick(500)), 200);
        p.write_port(0x61, 1, ns_of_tick(1000));
        assert_eq!(p.count(2, ns_of_tick(1000)), 300, "rising gate reloads");
        assert_eq!(p.count(2, ns_of_tick(1010)), 290);
    }

    #[test]
    fn access_modes_lobyte_hibyte() {
        let mut p = Pit::new();
        p.write_port(0x43, 0x10, 0); // ch0 lobyte, mode 0
        p.write_port(0x40, 0x80, 0);
        assert_eq!(p.reload(0), Some(0x80));
        assert_eq!(p.read_port(0x40, ns_of_tick(0x10)), 0x70);
        assert_eq!(p.read_port(0x40, ns_of_tick(0x10)), 0x70, "no flip-flop");
        p.write_port(0x43, 0x20, 0); // ch0 hibyte, mode 0
        p.write_port(0x40, 0x12, 0);
        assert_eq!(p.reload(0), Some(0x1200));
        assert_eq!(p.read_port(0x40, ns_of_tick(0x100)), 0x11);
        // Count 0 means 65536.
        program(&mut p, 1, 0x74, 0, 0);
        assert_eq!(p.reload(1), Some(0x1_0000));
        assert_eq!(p.count(1, ns_of_tick(1)), 0xffff);
    }

    #[test]
    fn lohi_first_byte_stops_mode0_and_drives_out_low() {
        let mut p = Pit::new();
        program(&mut p, 0, 0x30, 10, 0);
        assert!(p.out(0, ns_of_tick(20)));
        p.write_port(0x40, 0x05, ns_of_tick(20));
        assert!(!p.out(0, ns_of_tick(30)));
        p.write_port(0x40, 0x00, ns_of_tick(30));
        assert!(!p.out(0, ns_of_tick(34)));
        assert!(p.out(0, ns_of_tick(35)));
    }

    #[test]
    fn read_back_command_latches_status_and_counts() {
        let mut p = Pit::new();
        p.write_port(0x43, 0xb0, 0); // ch2 lohi mode 0
                                     // Read-back status of channel 2 before a count: null count set, OUT low.
        p.write_port(0x43, 0xe8, 0);
        assert_eq!(p.read_port(0x42, 0), 0x40 | 0x30);
        program(&mut p, 0, 0x34, 5000, 0);
        p.write_port(0x61, 1, 0);
        program(&mut p, 2, 0xb0, 100, 0);
        // Count and status of channels 0 and 2 at tick 150: status first.
        let t = ns_of_tick(150);
        p.write_port(0x43, 0xca, t);
        assert_eq!(
            p.read_port(0x40, t + MS),
            0xb4,
            "ch0: OUT high, mode 2, lohi"
        );
        assert_eq!(p.read_port(0x40, t + MS), (5000 - 150u16) as u8);
        assert_eq!(p.read_port(0x40, t + MS), ((5000 - 150u16) >> 8) as u8);
        assert_eq!(
            p.read_port(0x42, t + MS),
            0xb0,
            "ch2: OUT high, mode 0, lohi"
        );
        assert_eq!(p.read_port(0x42, t + MS), (0x1_0000u32 + 100 - 150) as u8);
        // Status only.
        p.write_port(0x43, 0xe2, t);
        assert_eq!(p.read_port(0x40, t), 0xb4);
        // Then the live count again (nothing else was latched).
        assert_eq!(p.read_port(0x40, ns_of_tick(160)), (5000 - 160u16) as u8);
    }

    #[test]
    fn bcd_counting() {
        let mut p = Pit::new();
        program(&mut p, 0, 0x31, 0x1000, 0); // mode 0 BCD, count 1000 decimal
        assert_eq!(p.reload(0), Some(1000));
        assert_eq!(latched(&mut p, 0, ns_of_tick(1)), 0x0999);
        assert_eq!(latched(&mut p, 0, ns_of_tick(1001)), 0x9999);
        program(&mut p, 1, 0x71, 0, 0); // count 0 in BCD is 10000
        assert_eq!(p.reload(1), Some(10_000));
        // Invalid BCD digits do not panic.
        program(&mut p, 1, 0x71, 0xffff, 0);
        assert_eq!(p.reload(1), Some(9999));
    }

    #[test]
    fn port_b_bits() {
        let mut p = Pit::new();
        assert_eq!(p.read_port(0x61, 0) & 0x0f, 0);
        p.write_port(0x61, 0xff, 0);
        assert_eq!(p.read_port(0x61, 0) & 0xcf, 0x0f);
        // Refresh toggle on bit 4.
        assert_eq!(p.read_port(0x61, 0) & 0x10, 0);
        assert_eq!(p.read_port(0x61, REFRESH_NS) & 0x10, 0x10);
        assert_eq!(p.read_port(0x61, 2 * REFRESH_NS) & 0x10, 0);
        // The speaker bit is plain state.
        p.write_port(0x61, 0x01, 0);
        assert_eq!(p.read_port(0x61, 0) & 0x03, 0x01);
    }

    #[test]
    fn garbage_never_panics_and_time_may_go_back() {
        let mut p = Pit::new();
        let mut now = 0u64;
        for cw in 0..=255u8 {
            now += 997;
            p.write_port(0x43, cw, now);
            for port in [0x40, 0x41, 0x42, 0x43, 0x61] {
                p.write_port(port, cw.wrapping_mul(37), now);
                let _ = p.read_port(port, now / 2);
                let _ = p.read_port(port, now);
            }
            for c in 0..3 {
                let _ = p.out(c, now);
                let _ = p.count(c, 0);
            }
            let _ = p.take_irq0(u64::MAX);
        }
        assert_eq!(p.count(7, 0), 0);
        assert!(!p.out(7, 0));
        p.set_gate(9, true, 0);
    }
}
