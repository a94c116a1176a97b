//! The standard PC board: which devices sit at which ports (the set every backend
//! gives its guests), and typed access to them on a [`PortBus`].

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::bus::PortBus;
use super::debug_exit::{DebugExit, PostCode};
use super::device::{PortDevice, PortRange};
use super::pci::{PciBus, PciConfig};
use super::pic::Pic;
use super::pit::Pit;
use super::rtc::{Rtc, RtcConfig};
use super::uart::Uart;

/// The devices [`PortBus::standard`] builds.
#[derive(Clone, Debug)]
pub struct StandardConfig {
    /// COM1's base port (0x3f8) and IRQ (4).
    pub com1_base: u16,
    pub com1_irq: u8,
    /// The isa-debug-exit port (0xf4).
    pub debug_exit_port: u16,
    pub rtc: RtcConfig,
    pub pci: PciConfig,
}

impl Default for StandardConfig {
    fn default() -> Self {
        StandardConfig {
            com1_base: 0x3f8,
            com1_irq: 4,
            debug_exit_port: 0xf4,
            rtc: RtcConfig::default(),
            pci: PciConfig::standard(),
        }
    }
}

impl PortBus {
    /// The standard PC set: 8259 pair at 0x20/0xa0 (ELCR at 0x4d0), 8254 at 0x40
    /// and port 0x61, RTC/CMOS at 0x70, 16550 COM1, PCI mechanism #1 at 0xcf8, the
    /// debug exit, and the POST code port 0x80 (Linux's I/O delay port).
    pub fn standard(config: StandardConfig) -> Self {
        let mut bus = PortBus::new();
        let std_ranges: [(&[PortRange], Box<dyn PortDevice>); 7] = [
            (
                &[
                    PortRange::new(0x20, 2),
                    PortRange::new(0xa0, 2),
                    PortRange::new(0x4d0, 2),
                ],
                Box::new(Pic::new()),
            ),
            (
                &[PortRange::new(0x40, 4), PortRange::new(0x61, 1)],
                Box::new(Pit::new()),
            ),
            (&[PortRange::new(0x70, 2)], Box::new(Rtc::new(config.rtc))),
            (
                &[PortRange::new(config.com1_base, 8)],
                Box::new(Uart::new(config.com1_base, config.com1_irq)),
            ),
            (
                &[PortRange::new(0xcf8, 8)],
                Box::new(PciBus::new(config.pci)),
            ),
            (
                &[PortRange::new(config.debug_exit_port, 1)],
                Box::new(DebugExit::new(config.debug_exit_port)),
            ),
            (&[PortRange::new(0x80, 1)], Box::new(PostCode::new())),
        ];
        for (ranges, dev) in std_ranges {
            // A clash can only come from a configured COM1 or debug-exit port that
            // lands on another device; that device keeps its ports.
            let _ = bus.register_boxed(ranges, dev);
        }
        bus
    }

    pub fn uart(&self) -> Option<&Uart> {
        self.device()
    }
    pub fn uart_mut(&mut self) -> Option<&mut Uart> {
        self.device_mut()
    }
    pub fn pit(&self) -> Option<&Pit> {
        self.device()
    }
    pub fn pit_mut(&mut self) -> Option<&mut Pit> {
        self.device_mut()
    }
    pub fn pic(&self) -> Option<&Pic> {
        self.device()
    }
    pub fn pic_mut(&mut self) -> Option<&mut Pic> {
        self.device_mut()
    }
    pub fn rtc(&self) -> Option<&Rtc> {
        self.device()
    }
    pub fn rtc_mut(&mut self) -> Option<&mut Rtc> {
        self.device_mut()
    }
    pub fn pci(&self) -> Option<&PciBus> {
        self.device()
    }
    pub fn pci_mut(&mut self) -> Option<&mut PciBus> {
        self.device_mut()
    }
    pub fn debug_exit(&self) -> Option<&DebugExit> {
        self.device()
    }

    /// The status the guest wrote to the debug-exit port, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        self.debug_exit().and_then(|d| d.exit_status())
    }

    /// Drain the bytes the guest sent to the (first) UART.
    pub fn take_console_output(&mut self) -> Vec<u8> {
        self.uart_mut().map(|u| u.take_output()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_set_claims_the_pc_ports_and_exposes_devices() {
        let mut bus = PortBus::standard(StandardConfig::default());
        for port in [
            0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x3f8, 0x3ff, 0xcf8,
            0xcfc, 0xcff, 0xf4,
        ] {
            assert!(bus.owner_id(port).is_some(), "port {port:#x} unclaimed");
        }
        assert_eq!(bus.owner_id(0x81), None);
        // Linux's outb_p delay writes to port 0x80 are absorbed, not unclaimed.
        bus.write(0x80, 1, 0x55, 0);
        assert_eq!(bus.unclaimed_count(), 0);
        assert_eq!(bus.device::<PostCode>().unwrap().last(), Some(0x55));

        // Console: bytes written to COM1's THR come out in order.
        for &b in b"hi\n" {
            bus.write(0x3f8, 1, b as u32, 0);
        }
        assert_eq!(bus.take_console_output(), b"hi\n");
        assert!(bus.take_console_output().is_empty());

        // Debug exit.
        assert_eq!(bus.exit_status(), None);
        bus.write(0xf4, 1, 0x31, 0);
        assert_eq!(bus.exit_status(), Some(0x31));

        // PCI host bridge via the bus (dword access to a wide device).
        bus.write(0xcf8, 4, 0x8000_0000, 0);
        assert_eq!(bus.read(0xcfc, 4, 0), 0x1237_8086);
        assert_eq!(bus.read(0xcfe, 2, 0), 0x1237);

        // RTC seconds register through the bus (BCD 00 at the default start).
        bus.write(0x70, 1, 0x00, 0);
        assert_eq!(bus.read(0x71, 1, 0), 0x00);
        bus.write(0x70, 1, 0x04, 0);
        assert_eq!(bus.read(0x71, 1, 0), 0x12);
    }

    #[test]
    fn guest_workload_patterns_through_the_bus() {
        let mut bus = PortBus::standard(StandardConfig::default());
        // pci: every bus, device and function as the `pci` guest scans them.
        let mut found = 0;
        let mut bar_sizes = Vec::new();
        for b in 0..=255u32 {
            for d in 0..32u32 {
                for f in 0..8u32 {
                    let a = 0x8000_0000 | b << 16 | d << 11 | f << 8;
                    bus.write(0xcf8, 4, a, 0);
                    if bus.read(0xcfc, 4, 0) == 0xffff_ffff {
                        continue;
                    }
                    found += 1;
                    for bar in 0..6 {
                        bus.write(0xcf8, 4, a | (0x10 + 4 * bar), 0);
                        let orig = bus.read(0xcfc, 4, 0);
                        bus.write(0xcfc, 4, 0xffff_ffff, 0);
                        let mask = bus.read(0xcfc, 4, 0);
                        bus.write(0xcfc, 4, orig, 0);
                        if mask != 0 {
                            bar_sizes.push((d, bar, mask));
                        }
                    }
                }
            }
        }
        assert_eq!(found, 5);
        assert_eq!(
            bar_sizes,
            [
                (1, 4, 0xffff_fff1),
                (2, 0, 0xffff_ffe1),
                (2, 1, 0xffff_f000),
                (3, 0, 0xfff0_000c),
                (3, 1, 0xffff_ffff),
            ]
        );
        assert_eq!(bus.unclaimed_count(), 0);

        // rtc: wait out UIP, then read the date twice.
        let mut now = 3 * 1_000_000_000 - 200_000;
        let rd = |bus: &mut PortBus, reg: u8, now: u64| {
            bus.write(0x70, 1, reg as u32, now);
            bus.read(0x71, 1, now) as u8
        };
        while rd(&mut bus, 0x0a, now) & 0x80 != 0 {
            now += 1_000;
        }
        assert_eq!(now, 3 * 1_000_000_000);
        let date: Vec<u8> = [0x32, 0x09, 0x08, 0x07, 0x06, 0x04, 0x02, 0x00]
            .iter()
            .map(|&r| rd(&mut bus, r, now))
            .collect();
        assert_eq!(date, [0x20, 0x24, 0x01, 0x01, 0x02, 0x12, 0x00, 0x03]);

        // pit: Linux's calibration loop against port 0x61, 10 ms latch.
        let t0 = 5_000_000_000u64;
        let b = bus.read(0x61, 1, t0);
        bus.write(0x61, 1, (b & !0x02) | 0x01, t0);
        bus.write(0x43, 1, 0xb0, t0);
        bus.write(0x42, 1, 11931 & 0xff, t0);
        bus.write(0x42, 1, 11931 >> 8, t0);
        let mut t = t0;
        let mut polls = 0;
        while bus.read(0x61, 1, t) & 0x20 == 0 {
            t += 7_000; // one KVM port exit
            polls += 1;
        }
        assert!(
            (t - t0).abs_diff(10_000_000) <= 7_000,
            "OUT2 at {} ns",
            t - t0
        );
        assert_eq!(polls, (t - t0) / 7_000);
        assert_eq!(bus.unclaimed_count(), 0);
    }

    #[test]
    fn random_access_storm_never_panics() {
        // A deterministic LCG instead of a fuzzer: every port the standard set
        // claims (and a few it does not), every size including invalid ones, time
        // jumping forwards, backwards and to the extremes.
        let mut bus = PortBus::standard(StandardConfig::default());
        let ports: [u16; 24] = [
            0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x3f8,
            0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0xcf8, 0xcfc, 0xcfe, 0xcff, 0xffff,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            x >> 16
        };
        let mut now = 0u64;
        for _ in 0..200_000 {
            let r = next();
            let port = ports[(r % 24) as usize].wrapping_add(((r >> 8) % 3) as u16);
            let size = [1u8, 2, 4, 1, 1, 3, 0, 8][((r >> 12) & 7) as usize];
            now = match (r >> 16) % 64 {
                0 => now / 2,
                1 => u64::MAX - (r >> 20),
                2 => 0,
                _ => now.saturating_add((r >> 20) % 2_000_000),
            };
            if r >> 40 & 1 == 0 {
                let _ = bus.read(port, size, now);
            } else {
                bus.write(port, size, (next() as u32) ^ (r as u32), now);
            }
            if r % 97 == 0 {
                let _ = bus.acknowledge(now);
                let _ = bus.next_event_ns(now);
            }
        }
        let _ = bus.take_console_output();
    }

    #[test]
    fn irqs_route_from_devices_to_the_pic() {
        let mut bus = PortBus::standard(StandardConfig::default());
        assert_eq!(bus.next_event_ns(0), None, "no timer programmed");
        // Initialise the PICs as Linux does: vectors 0x30/0x38, all unmasked.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            bus.write(port, 1, v, 0);
        }
        assert_eq!(bus.pending_vector(0), None);
        // PIT channel 0, mode 2, count 1193 (about 1 ms).
        bus.write(0x43, 1, 0x34, 0);
        bus.write(0x40, 1, 1193 & 0xff, 0);
        bus.write(0x40, 1, 1193 >> 8, 0);
        assert_eq!(bus.pending_vector(500_000), None);
        let next = bus.next_event_ns(500_000).unwrap();
        assert_eq!(next, super::super::pit::ns_of_tick(1193));
        assert_eq!(bus.pending_vector(next - 1), None);
        assert_eq!(bus.acknowledge(1_000_500), Some(0x30));
        assert_eq!(bus.pending_vector(1_000_600), None);
        bus.write(0x20, 1, 0x20, 1_000_700); // EOI
        assert_eq!(bus.pending_vector(1_500_000), None);
        assert_eq!(bus.pending_vector(2_000_500), Some(0x30));

        // UART: enable THRE interrupts with OUT2 and see IRQ4 (behind IRQ0).
        bus.write(0x3fc, 1, 0x08, 2_000_600);
        bus.write(0x3f9, 1, 0x02, 2_000_600);
        assert_eq!(bus.acknowledge(2_000_700), Some(0x30));
        bus.write(0x20, 1, 0x20, 2_000_800);
        assert_eq!(bus.acknowledge(2_000_900), Some(0x34));
    }
}
