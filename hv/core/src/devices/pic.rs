//! The cascaded 8259A pair of a PC: master at 0x20/0x21 (IRQ 0..7), slave at
//! 0xa0/0xa1 (IRQ 8..15) on the master's IR2.
//!
//! Modelled: the ICW1..ICW4 initialisation sequence (vector base, single/cascade,
//! edge/level trigger, auto-EOI, special fully nested), IMR, OCW2 (non-specific,
//! specific and rotating EOI, set priority), OCW3 (read IRR/ISR, poll, special
//! mask), priority resolution with rotation, and the INTA cycle
//! ([`Pic::acknowledge`]). An edge-triggered request stays latched in IRR until it
//! is acknowledged even if its line drops first (devices here signal edges as
//! instantaneous pulses, e.g. the PIT's OUT0). The cascade is hard-wired as on a PC
//! whatever ICW3 says, and the slave's INT output drives the master's IR2 as a
//! level. The PIIX edge/level control registers (ELCR, 0x4d0/0x4d1) make single
//! IRQs level triggered.

use super::device::{InterruptController, PortDevice};

#[derive(Clone, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels as last driven (for edge detection).
    lines: u8,
    vector_base: u8,
    /// 0: operational; 2, 3, 4: expecting that ICW on the data port.
    init_step: u8,
    icw4_needed: bool,
    single: bool,
    level_triggered: bool,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    /// The IR with the highest priority.
    priority_add: u8,
    icw3: u8,
    /// Edge/level control register (0x4d0/0x4d1): a set bit makes that IR level
    /// triggered whatever ICW1 says.
    elcr: u8,
    /// ELCR bits that exist (IRQ 0, 1, 2, 8 and 13 are always edge triggered).
    elcr_mask: u8,
}

impl Chip {
    fn new(vector_base: u8, elcr_mask: u8) -> Self {
        Chip {
            vector_base,
            elcr_mask,
            ..Default::default()
        }
    }

    /// IRs that are level triggered.
    fn level_mask(&self) -> u8 {
        if self.level_triggered {
            0xff
        } else {
            self.elcr
        }
    }

    fn set_line(&mut self, ir: u8, level: bool) {
        let bit = 1u8 << (ir & 7);
        if self.level_mask() & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Priority (0 highest) of the highest-priority bit in `mask`.
    fn priority(&self, mask: u8) -> Option<u8> {
        (0..8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
    }

    /// The IR this chip would present now.
    fn highest_irq(&self, master: bool) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if master && self.special_fully_nested {
            in_service &= !(1 << 2);
        }
        match self.priority(in_service) {
            Some(cur) if cur <= p => None,
            _ => Some((p + self.priority_add) & 7),
        }
    }

    fn ack(&mut self, ir: u8) {
        let bit = 1u8 << ir;
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.priority_add = (ir + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.level_mask() & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1.
            self.icw4_needed = v & 0x01 != 0;
            self.single = v & 0x02 != 0;
            self.level_triggered = v & 0x08 != 0;
            self.init_step = 2;
            self.imr = 0;
            self.isr = 0;
            self.irr = self.lines & self.level_mask();
            self.auto_eoi = false;
            self.rotate_on_aeoi = false;
            self.special_fully_nested = false;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.priority_add = 0;
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2.
            let level = v & 7;
            match v >> 5 {
                0b000 => self.rotate_on_aeoi = false,
                0b100 => self.rotate_on_aeoi = true,
                op @ (0b001 | 0b101) => {
                    if let Some(p) = self.priority(self.isr) {
                        let ir = (p + self.priority_add) & 7;
                        self.isr &= !(1 << ir);
                        if op == 0b101 {
                            self.priority_add = (ir + 1) & 7;
                        }
                    }
                }
                0b011 => self.isr &= !(1 << level),
                0b111 => {
                    self.isr &= !(1 << level);
                    self.priority_add = (level + 1) & 7;
                }
                0b110 => self.priority_add = (level + 1) & 7,
                _ => {} // 0b010: no operation
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_step {
            2 => {
                self.vector_base = v & 0xf8;
                self.init_step = match (self.single, self.icw4_needed) {
                    (false, _) => 3,
                    (true, true) => 4,
                    (true, false) => 0,
                };
            }
            3 => {
                self.icw3 = v;
                self.init_step = if self.icw4_needed { 4 } else { 0 };
            }
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.special_fully_nested = v & 0x10 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }
}

/// The master/slave 8259A pair.
#[derive(Clone, Debug)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Power-on state: nothing masked, vectors 0x08 and 0x70 (the BIOS's), edge
    /// triggered; a guest re-initialises both chips anyway.
    pub fn new() -> Self {
        Pic {
            master: Chip::new(0x08, 0xf8),
            slave: Chip::new(0x70, 0xde),
        }
    }

    /// Propagate the slave's INT output to the master's IR2. IR2 follows the
    /// slave's output level (whatever the master's trigger mode), so a slave request
    /// is never lost to a missing edge nor delivered after it went away.
    fn update(&mut self) {
        let bit = 1u8 << 2;
        if self.slave.highest_irq(false).is_some() {
            self.master.irr |= bit;
            self.master.lines |= bit;
        } else {
            self.master.irr &= !bit;
            self.master.lines &= !bit;
        }
    }

    /// Drive interrupt line `irq` (0..=15; IRQ2 is the cascade, so a request on
    /// the bus's IRQ2 pin arrives as IRQ9 as on a PC/AT; others are ignored).
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            2 => self.slave.set_line(1, level),
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => return,
        }
        self.update();
    }

    pub fn raise_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
    }

    pub fn lower_irq(&mut self, irq: u8) {
        self.set_irq(irq, false);
    }

    /// The vector the CPU would receive if it acknowledged now.
    pub fn pending_vector(&self) -> Option<u8> {
        let ir = self.master.highest_irq(true)?;
        if ir == 2 {
            Some(match self.slave.highest_irq(false) {
                Some(s) => self.slave.vector_base | s,
                None => self.slave.vector_base | 7,
            })
        } else {
            Some(self.master.vector_base | ir)
        }
    }

    /// True when the master's INT output is asserted.
    pub fn interrupt_pending(&self) -> bool {
        self.master.highest_irq(true).is_some()
    }

    /// The INTA cycle: mark the highest-priority request in service (unless in
    /// auto-EOI mode) and return its vector.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let ir = self.master.highest_irq(true)?;
        self.master.ack(ir);
        let vector = if ir == 2 {
            match self.slave.highest_irq(false) {
                Some(s) => {
                    self.slave.ack(s);
                    self.slave.vector_base | s
                }
                None => self.slave.vector_base | 7,
            }
        } else {
            self.master.vector_base | ir
        };
        self.update();
        Some(vector)
    }

    /// IRR of the pair (slave in bits 8..15).
    pub fn irr(&self) -> u16 {
        u16::from_le_bytes([self.master.irr, self.slave.irr])
    }
    /// ISR of the pair (slave in bits 8..15).
    pub fn isr(&self) -> u16 {
        u16::from_le_bytes([self.master.isr, self.slave.isr])
    }
    /// IMR of the pair (slave in bits 8..15).
    pub fn imr(&self) -> u16 {
        u16::from_le_bytes([self.master.imr, self.slave.imr])
    }
    /// Vector bases programmed by ICW2 (master, slave).
    pub fn vector_bases(&self) -> (u8, u8) {
        (self.master.vector_base, self.slave.vector_base)
    }

    fn chip(&mut self, port: u16) -> Option<(&mut Chip, bool)> {
        match port {
            0x20 | 0x21 => Some((&mut self.master, true)),
            0xa0 | 0xa1 => Some((&mut self.slave, false)),
            _ => None,
        }
    }

    /// The edge/level control registers (slave in bits 8..15).
    pub fn elcr(&self) -> u16 {
        u16::from_le_bytes([self.master.elcr, self.slave.elcr])
    }

    /// Byte read of 0x20, 0x21, 0xa0, 0xa1 (the chips) or 0x4d0, 0x4d1 (ELCR).
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x4d0 => return self.master.elcr,
            0x4d1 => return self.slave.elcr,
            _ => {}
        }
        let Some((chip, master)) = self.chip(port) else {
            return 0xff;
        };
        if chip.poll {
            // Poll: the read is an interrupt acknowledge for this chip.
            chip.poll = false;
            let v = match chip.highest_irq(master) {
                Some(ir) => {
                    chip.ack(ir);
                    0x80 | ir
                }
                None => 0,
            };
            if !master && v != 0 {
                self.master.isr &= !(1 << 2);
                self.master.irr &= !(1 << 2);
            }
            self.update();
            return v;
        }
        if port & 1 == 1 {
            chip.imr
        } else if chip.read_isr {
            chip.isr
        } else {
            chip.irr
        }
    }

    /// Byte write of 0x20, 0x21, 0xa0, 0xa1 (the chips) or 0x4d0, 0x4d1 (ELCR).
    pub fn write_port(&mut self, port: u16, value: u8) {
        let chip = match port {
            0x4d0 | 0x4d1 => {
                let chip = if port == 0x4d0 {
                    &mut self.master
                } else {
                    &mut self.slave
                };
                chip.elcr = value & chip.elcr_mask;
                // Lines now level triggered show their level in IRR.
                chip.irr = (chip.irr & !chip.elcr) | (chip.lines & chip.elcr);
                self.update();
                return;
            }
            _ => self.chip(port),
        };
        let Some((chip, _)) = chip else {
            return;
        };
        if port & 1 == 0 {
            chip.write_command(value);
        } else {
            chip.write_data(value);
        }
        self.update();
    }
}

impl PortDevice for Pic {
    fn name(&self) -> &'static str {
        "pic8259"
    }
    fn read(&mut self, port: u16, _size: u8, _now_ns: u64) -> u32 {
        self.read_port(port) as u32
    }
    fn write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64) {
        self.write_port(port, value as u8)
    }
    fn interrupt_controller(&mut self) -> Option<&mut dyn InterruptController> {
        Some(self)
    }
}

impl InterruptController for Pic {
    fn set_irq(&mut self, irq: u8, level: bool) {
        Pic::set_irq(self, irq, level)
    }
    fn pending_vector(&self) -> Option<u8> {
        Pic::pending_vector(self)
    }
    fn acknowledge(&mut self) -> Option<u8> {
        Pic::acknowledge(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A (without auto-EOI): vectors 0x30 and 0x38, then `mask`.
    fn linux_init(icw4: u8, mask: u16) -> Pic {
        let mut p = Pic::new();
        p.write_port(0x21, 0xff);
        p.write_port(0xa1, 0xff);
        p.write_port(0x20, 0x11);
        p.write_port(0x21, 0x30);
        p.write_port(0x21, 0x04);
        p.write_port(0x21, icw4);
        p.write_port(0xa0, 0x11);
        p.write_port(0xa1, 0x38);
        p.write_port(0xa1, 0x02);
        p.write_port(0xa1, 0x01);
        p.write_port(0x21, mask as u8);
        p.write_port(0xa1, (mask >> 8) as u8);
        p
    }

    #[test]
    fn init_sequence_programs_vectors_and_imr() {
        let mut p = linux_init(0x01, 0xfffb);
        assert_eq!(p.vector_bases(), (0x30, 0x38));
        assert_eq!(p.imr(), 0xfffb);
        assert_eq!(p.read_port(0x21), 0xfb);
        assert_eq!(p.read_port(0xa1), 0xff);
        // Linux's probe: IMR reads back what was written.
        p.write_port(0x21, 0xa5);
        assert_eq!(p.read_port(0x21), 0xa5);
        // The ICW2 low bits are ignored.
        p.write_port(0x20, 0x11);
        p.write_port(0x21, 0x47);
        p.write_port(0x21, 0x04);
        p.write_port(0x21, 0x01);
        assert_eq!(p.vector_bases().0, 0x40);
        assert_eq!(p.imr() & 0xff, 0, "ICW1 clears IMR");
        // Single mode without ICW4: ICW2 ends the sequence.
        p.write_port(0x20, 0x12);
        p.write_port(0x21, 0x50);
        p.write_port(0x21, 0x3c);
        assert_eq!(p.vector_bases().0, 0x50);
        assert_eq!(p.imr() & 0xff, 0x3c);
    }

    #[test]
    fn raise_ack_eoi_and_masking() {
        let mut p = linux_init(0x01, 0x0000);
        assert_eq!(p.pending_vector(), None);
        p.raise_irq(1);
        assert_eq!(p.pending_vector(), Some(0x31));
        assert_eq!(p.acknowledge(), Some(0x31));
        assert_eq!(p.isr(), 0x0002);
        assert_eq!(p.irr(), 0);
        assert_eq!(p.pending_vector(), None);
        p.lower_irq(1);
        // Lower priority waits behind the one in service, higher preempts.
        p.raise_irq(4);
        assert_eq!(p.pending_vector(), None);
        p.raise_irq(0);
        assert_eq!(p.acknowledge(), Some(0x30));
        assert_eq!(p.isr(), 0x0003);
        p.write_port(0x20, 0x20); // non-specific EOI: IRQ0 (highest in service)
        assert_eq!(p.isr(), 0x0002);
        assert_eq!(p.pending_vector(), None);
        p.write_port(0x20, 0x20);
        assert_eq!(p.isr(), 0);
        assert_eq!(p.pending_vector(), Some(0x34));
        // Masked: stays in IRR, not delivered; unmasking delivers it.
        p.write_port(0x21, 0x10);
        assert_eq!(p.pending_vector(), None);
        assert_eq!(p.irr(), 0x0010);
        p.write_port(0x21, 0x00);
        assert_eq!(p.acknowledge(), Some(0x34));
        // Specific EOI for IRQ4 (OCW2 0x64).
        p.write_port(0x20, 0x62);
        assert_eq!(p.isr(), 0x0010, "specific EOI of another level leaves IRQ4");
        p.write_port(0x20, 0x64);
        assert_eq!(p.isr(), 0);
        // Every request was acknowledged: nothing is left.
        assert_eq!(p.acknowledge(), None);
        assert_eq!(p.isr(), 0);
    }

    #[test]
    fn edge_triggering_needs_a_new_rising_edge() {
        let mut p = linux_init(0x01, 0);
        p.raise_irq(3);
        p.lower_irq(3);
        assert_eq!(p.pending_vector(), Some(0x33), "edge latched in IRR");
        assert_eq!(p.acknowledge(), Some(0x33));
        p.write_port(0x20, 0x20);
        p.raise_irq(3);
        assert_eq!(p.acknowledge(), Some(0x33));
        p.write_port(0x20, 0x20);
        p.raise_irq(3); // still high: no new edge
        assert_eq!(p.pending_vector(), None);
        p.lower_irq(3);
        p.raise_irq(3);
        assert_eq!(p.pending_vector(), Some(0x33));
    }

    #[test]
    fn level_triggering_follows_the_line() {
        let mut p = Pic::new();
        p.write_port(0x20, 0x19); // ICW1 with LTIM
        p.write_port(0x21, 0x20);
        p.write_port(0x21, 0x04);
        p.write_port(0x21, 0x01);
        p.raise_irq(5);
        assert_eq!(p.acknowledge(), Some(0x25));
        p.write_port(0x20, 0x20);
        assert_eq!(p.pending_vector(), Some(0x25), "line still high");
        p.lower_irq(5);
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn cascade_through_ir2() {
        let mut p = linux_init(0x01, 0);
        p.raise_irq(10);
        assert_eq!(p.irr() & 0x0404, 0x0404);
        assert_eq!(p.pending_vector(), Some(0x3a));
        assert_eq!(p.acknowledge(), Some(0x3a));
        assert_eq!(p.isr(), 0x0404);
        // IRQ 8 has higher priority on the slave, but the master's IR2 is in
        // service: nothing until the master gets its EOI.
        p.raise_irq(8);
        assert_eq!(p.pending_vector(), None);
        // IRQ 1 beats the cascade on the master.
        p.raise_irq(1);
        assert_eq!(p.acknowledge(), Some(0x31));
        p.write_port(0x20, 0x20);
        // Linux's EOI for a slave IRQ: slave specific EOI, then the master's IR2.
        p.write_port(0xa0, 0x62);
        p.write_port(0x20, 0x62);
        assert_eq!(p.isr(), 0);
        assert_eq!(p.acknowledge(), Some(0x38));
        // Slave masking.
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        p.write_port(0xa1, 0x80);
        p.raise_irq(15);
        assert_eq!(p.pending_vector(), None);
        // The PC bus IRQ2 pin is IRQ9.
        p.raise_irq(2);
        assert_eq!(p.acknowledge(), Some(0x39));
    }

    #[test]
    fn ocw3_reads_irr_and_isr() {
        let mut p = linux_init(0x01, 0);
        p.raise_irq(6);
        p.raise_irq(7);
        assert_eq!(p.acknowledge(), Some(0x36));
        p.write_port(0x20, 0x0a);
        assert_eq!(p.read_port(0x20), 0x80);
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0x40);
        // Still ISR on the next read (the selection sticks).
        assert_eq!(p.read_port(0x20), 0x40);
        p.write_port(0x20, 0x08); // OCW3 with RR clear: no change
        assert_eq!(p.read_port(0x20), 0x40);
        p.write_port(0x20, 0x0a);
        assert_eq!(p.read_port(0x20), 0x80);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut p = linux_init(0x03, 0);
        p.raise_irq(4);
        assert_eq!(p.acknowledge(), Some(0x34));
        assert_eq!(p.isr(), 0);
        p.raise_irq(5);
        assert_eq!(p.acknowledge(), Some(0x35));
    }

    #[test]
    fn poll_mode_and_rotation() {
        let mut p = linux_init(0x01, 0);
        p.raise_irq(3);
        p.write_port(0x20, 0x0c); // OCW3 poll
        assert_eq!(p.read_port(0x20), 0x83);
        assert_eq!(p.isr(), 0x0008);
        p.write_port(0x20, 0x0c);
        assert_eq!(p.read_port(0x20), 0x00, "nothing else requested");
        p.write_port(0x20, 0x20);
        // Set priority: IRQ5 lowest, so IRQ6 is highest.
        p.write_port(0x20, 0xc5);
        p.raise_irq(1);
        p.raise_irq(6);
        assert_eq!(p.acknowledge(), Some(0x36));
        // Rotate on non-specific EOI: IRQ6 becomes lowest, IRQ7 highest.
        p.write_port(0x20, 0xa0);
        p.raise_irq(7);
        assert_eq!(p.acknowledge(), Some(0x37));
        p.write_port(0x20, 0x20);
        assert_eq!(p.acknowledge(), Some(0x31));
    }

    #[test]
    fn elcr_makes_single_lines_level_triggered() {
        let mut p = linux_init(0x01, 0);
        p.write_port(0x4d0, 0xff);
        p.write_port(0x4d1, 0xff);
        assert_eq!(p.read_port(0x4d0), 0xf8, "IRQ 0..2 stay edge");
        assert_eq!(p.read_port(0x4d1), 0xde, "IRQ 8 and 13 stay edge");
        assert_eq!(p.elcr(), 0xdef8);
        p.write_port(0x4d1, 0x08); // IRQ 11 level
        p.write_port(0x4d0, 0x00);
        p.raise_irq(11);
        assert_eq!(p.acknowledge(), Some(0x3b));
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        assert_eq!(p.pending_vector(), Some(0x3b), "level: still asserted");
        p.lower_irq(11);
        assert_eq!(p.pending_vector(), None);
        // IRQ 3 stays edge triggered.
        p.raise_irq(3);
        assert_eq!(p.acknowledge(), Some(0x33));
        p.write_port(0x20, 0x20);
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn garbage_never_panics() {
        let mut p = Pic::new();
        for i in 0..=255u8 {
            for port in [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22, 0x0] {
                p.write_port(port, i.wrapping_mul(73));
                let _ = p.read_port(port);
            }
            p.set_irq(i, i & 1 == 0);
            let _ = p.pending_vector();
            let _ = p.acknowledge();
        }
        assert_eq!(p.read_port(0x22), 0xff);
    }
}
