//! The port bus: dispatch of port I/O to devices by port range.
//!
//! Devices are registered for one or more port ranges. An access is routed by its
//! first port: if the owning device takes wide accesses ([`PortDevice::wide`]) it
//! gets the whole access; otherwise the access is split into byte accesses to
//! consecutive ports, each routed on its own (as an ISA bus does with a 16- or
//! 32-bit access to byte-wide registers). Bytes that reach no device read 0xff and
//! drop writes; such accesses are counted per port ([`PortBus::unclaimed`]).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::any::Any;

use super::debug_exit::{DebugExit, PostCode};
use super::pci::{PciBus, PciConfig};
use super::pic::Pic;
use super::pit::Pit;
use super::rtc::{Rtc, RtcConfig};
use super::uart::Uart;
use super::{size_mask, valid_size};

/// What a device drives on its interrupt line, as seen by the bus when it routes
/// interrupts to the PIC ([`PortBus::update_irqs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqOutput {
    /// The device has no interrupt line, or nothing to report.
    None,
    /// The line `irq` is at this level.
    Level { irq: u8, high: bool },
    /// The line `irq` had at least one rising edge since the last poll.
    Pulse { irq: u8 },
}

/// A device on the port bus.
pub trait PortDevice: Any + Send {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    /// Read `size` bytes (1, 2 or 4) at the absolute `port`; the low `size` bytes of
    /// the result are returned. Non-wide devices only ever see `size == 1`.
    fn read(&mut self, port: u16, size: u8, now_ns: u64) -> u32;
    /// Write the low `size` bytes of `value` at the absolute `port`.
    fn write(&mut self, port: u16, size: u8, value: u32, now_ns: u64);
    /// True if the device decodes 16- and 32-bit accesses itself; otherwise the bus
    /// splits them into byte accesses.
    fn wide(&self) -> bool {
        false
    }
    /// The device's interrupt output at `now_ns`.
    fn irq(&mut self, _now_ns: u64) -> IrqOutput {
        IrqOutput::None
    }
    /// The earliest virtual time at or after `now_ns` at which the device's
    /// interrupt output may change on its own (a timer expiring), if any; a backend
    /// halting the guest (HLT) can sleep until then.
    fn next_event_ns(&self, _now_ns: u64) -> Option<u64> {
        None
    }
}

/// A range of ports `base..base + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub base: u16,
    pub len: u16,
}

impl PortRange {
    pub const fn new(base: u16, len: u16) -> Self {
        PortRange { base, len }
    }
    /// One past the last port, as u32 so that ranges may end at 0x10000.
    fn end(&self) -> u32 {
        self.base as u32 + self.len as u32
    }
}

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or runs past port 0xffff.
    InvalidRange(PortRange),
    /// The range overlaps ports another device already owns.
    Overlap { range: PortRange, owner: DeviceId },
}

/// Index of a registered device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub usize);

/// Unclaimed accesses to one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unclaimed {
    pub reads: u64,
    pub writes: u64,
}

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

struct Mapping {
    base: u16,
    end: u32,
    device: usize,
}

/// Port I/O dispatch to registered devices.
#[derive(Default)]
pub struct PortBus {
    /// Sorted by base, non-overlapping.
    map: Vec<Mapping>,
    devices: Vec<Box<dyn PortDevice>>,
    /// The PIC that [`PortBus::update_irqs`] routes device interrupts to.
    pic: Option<usize>,
    unclaimed: BTreeMap<u16, Unclaimed>,
    unclaimed_total: u64,
    bad_size: u64,
}

impl core::fmt::Debug for PortBus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut l = f.debug_list();
        for m in &self.map {
            l.entry(&(m.base, m.end, self.devices[m.device].name()));
        }
        l.finish()
    }
}

impl PortBus {
    /// An empty bus: every port unclaimed.
    pub fn new() -> Self {
        Self::default()
    }

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

    /// Register `device` for `ranges`. Either every range is taken or none.
    pub fn register<D: PortDevice>(
        &mut self,
        ranges: &[PortRange],
        device: D,
    ) -> Result<DeviceId, BusError> {
        self.register_boxed(ranges, Box::new(device))
    }

    /// [`PortBus::register`] for a boxed device.
    pub fn register_boxed(
        &mut self,
        ranges: &[PortRange],
        device: Box<dyn PortDevice>,
    ) -> Result<DeviceId, BusError> {
        for (i, r) in ranges.iter().enumerate() {
            if r.len == 0 || r.end() > 0x1_0000 {
                return Err(BusError::InvalidRange(*r));
            }
            if let Some(owner) = self.owner_of_range(r) {
                return Err(BusError::Overlap {
                    range: *r,
                    owner: DeviceId(owner),
                });
            }
            // Ranges of the same registration must not overlap each other either.
            for q in &ranges[..i] {
                if (r.base as u32) < q.end() && (q.base as u32) < r.end() {
                    return Err(BusError::Overlap {
                        range: *r,
                        owner: DeviceId(self.devices.len()),
                    });
                }
            }
        }
        let id = self.devices.len();
        for r in ranges {
            let at = self.map.partition_point(|m| m.base < r.base);
            self.map.insert(
                at,
                Mapping {
                    base: r.base,
                    end: r.end(),
                    device: id,
                },
            );
        }
        let is_pic = (device.as_ref() as &dyn Any).is::<Pic>();
        self.devices.push(device);
        if is_pic && self.pic.is_none() {
            self.pic = Some(id);
        }
        Ok(DeviceId(id))
    }

    fn owner_of_range(&self, r: &PortRange) -> Option<usize> {
        self.map
            .iter()
            .find(|m| (r.base as u32) < m.end && (m.base as u32) < r.end())
            .map(|m| m.device)
    }

    fn owner(&self, port: u16) -> Option<usize> {
        let at = self.map.partition_point(|m| m.base <= port);
        let m = self.map.get(at.checked_sub(1)?)?;
        ((port as u32) < m.end).then_some(m.device)
    }

    /// The device that owns `port`.
    pub fn owner_id(&self, port: u16) -> Option<DeviceId> {
        self.owner(port).map(DeviceId)
    }

    /// Port read of `size` bytes (1, 2 or 4). Other sizes read all-ones.
    pub fn read(&mut self, port: u16, size: u8, now_ns: u64) -> u32 {
        if !valid_size(size) {
            self.bad_size += 1;
            return 0xffff_ffff;
        }
        let mask = size_mask(size);
        if let Some(d) = self.owner(port) {
            if self.devices[d].wide() {
                return self.devices[d].read(port, size, now_ns) & mask;
            }
        }
        let mut value = 0u32;
        let mut unclaimed_at = None;
        for i in 0..size {
            let byte = match (port as u32 + i as u32)
                .try_into()
                .ok()
                .and_then(|p: u16| self.owner(p).map(|d| (p, d)))
            {
                Some((p, d)) => self.devices[d].read(p, 1, now_ns) & 0xff,
                None => {
                    unclaimed_at.get_or_insert(port.wrapping_add(i as u16));
                    0xff
                }
            };
            value |= byte << (8 * i);
        }
        if let Some(p) = unclaimed_at {
            self.unclaimed.entry(p).or_default().reads += 1;
            self.unclaimed_total += 1;
        }
        value
    }

    /// Port write of the low `size` bytes of `value` (1, 2 or 4). Other sizes are
    /// dropped.
    pub fn write(&mut self, port: u16, size: u8, value: u32, now_ns: u64) {
        if !valid_size(size) {
            self.bad_size += 1;
            return;
        }
        let value = value & size_mask(size);
        if let Some(d) = self.owner(port) {
            if self.devices[d].wide() {
                self.devices[d].write(port, size, value, now_ns);
                return;
            }
        }
        let mut unclaimed_at = None;
        for i in 0..size {
            let byte = (value >> (8 * i)) & 0xff;
            match (port as u32 + i as u32)
                .try_into()
                .ok()
                .and_then(|p: u16| self.owner(p).map(|d| (p, d)))
            {
                Some((p, d)) => self.devices[d].write(p, 1, byte, now_ns),
                None => {
                    unclaimed_at.get_or_insert(port.wrapping_add(i as u16));
                }
            }
        }
        if let Some(p) = unclaimed_at {
            self.unclaimed.entry(p).or_default().writes += 1;
            self.unclaimed_total += 1;
        }
    }

    /// Accesses that reached no device, by the first unclaimed port of the access.
    pub fn unclaimed(&self) -> &BTreeMap<u16, Unclaimed> {
        &self.unclaimed
    }

    /// Total accesses that (at least in part) reached no device.
    pub fn unclaimed_count(&self) -> u64 {
        self.unclaimed_total
    }

    /// Accesses refused because their size was not 1, 2 or 4.
    pub fn bad_size_count(&self) -> u64 {
        self.bad_size
    }

    /// The registered device `id` as a `D`.
    pub fn get<D: PortDevice>(&self, id: DeviceId) -> Option<&D> {
        let d: &dyn Any = self.devices.get(id.0)?.as_ref();
        d.downcast_ref()
    }

    /// The registered device `id` as a mutable `D`.
    pub fn get_mut<D: PortDevice>(&mut self, id: DeviceId) -> Option<&mut D> {
        let d: &mut dyn Any = self.devices.get_mut(id.0)?.as_mut();
        d.downcast_mut()
    }

    /// The first registered device of type `D`.
    pub fn device<D: PortDevice>(&self) -> Option<&D> {
        self.devices
            .iter()
            .find_map(|d| (d.as_ref() as &dyn Any).downcast_ref())
    }

    /// The first registered device of type `D`, mutably.
    pub fn device_mut<D: PortDevice>(&mut self) -> Option<&mut D> {
        self.devices
            .iter_mut()
            .find_map(|d| (d.as_mut() as &mut dyn Any).downcast_mut())
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

    /// Poll every device's interrupt output at `now_ns` and drive the PIC's lines
    /// with it. Does nothing without a PIC.
    pub fn update_irqs(&mut self, now_ns: u64) {
        let Some(pic) = self.pic else { return };
        let (before, rest) = self.devices.split_at_mut(pic);
        let Some((pic, after)) = rest.split_first_mut() else {
            return;
        };
        let pic: &mut dyn Any = pic.as_mut();
        let Some(pic) = pic.downcast_mut::<Pic>() else {
            return;
        };
        for d in before.iter_mut().chain(after.iter_mut()) {
            match d.irq(now_ns) {
                IrqOutput::None => {}
                IrqOutput::Level { irq, high } => pic.set_irq(irq, high),
                IrqOutput::Pulse { irq } => {
                    pic.set_irq(irq, true);
                    pic.set_irq(irq, false);
                }
            }
        }
    }

    /// The earliest [`PortDevice::next_event_ns`] of all devices.
    pub fn next_event_ns(&self, now_ns: u64) -> Option<u64> {
        self.devices
            .iter()
            .filter_map(|d| d.next_event_ns(now_ns))
            .min()
    }

    /// Route device interrupts ([`PortBus::update_irqs`]) and return the vector the
    /// PIC would deliver now, if any (without acknowledging it).
    pub fn pending_vector(&mut self, now_ns: u64) -> Option<u8> {
        self.update_irqs(now_ns);
        self.pic().and_then(|p| p.pending_vector())
    }

    /// Interrupt acknowledge: the vector the CPU takes now, if any.
    pub fn acknowledge(&mut self, now_ns: u64) -> Option<u8> {
        self.update_irqs(now_ns);
        self.pic_mut().and_then(|p| p.acknowledge())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wide device that records its accesses.
    #[derive(Default)]
    struct Recorder {
        wide: bool,
        writes: Vec<(u16, u8, u32)>,
        reads: Vec<(u16, u8)>,
    }

    impl PortDevice for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn read(&mut self, port: u16, size: u8, _now: u64) -> u32 {
            self.reads.push((port, size));
            // Distinguishable per port.
            0x1122_3300 | (port as u32 & 0xff)
        }
        fn write(&mut self, port: u16, size: u8, value: u32, _now: u64) {
            self.writes.push((port, size, value));
        }
        fn wide(&self) -> bool {
            self.wide
        }
    }

    #[test]
    fn dispatch_by_range_and_unclaimed_counting() {
        let mut bus = PortBus::new();
        let a = bus
            .register(&[PortRange::new(0x100, 4)], Recorder::default())
            .unwrap();
        let b = bus
            .register(
                &[PortRange::new(0x200, 2), PortRange::new(0x300, 1)],
                Recorder::default(),
            )
            .unwrap();
        bus.write(0x102, 1, 0xab, 0);
        bus.write(0x300, 1, 0xcd, 0);
        assert_eq!(bus.read(0x201, 1, 0), 0x01);
        assert_eq!(bus.get::<Recorder>(a).unwrap().writes, [(0x102, 1, 0xab)]);
        let rb = bus.get::<Recorder>(b).unwrap();
        assert_eq!(rb.writes, [(0x300, 1, 0xcd)]);
        assert_eq!(rb.reads, [(0x201, 1)]);
        assert_eq!(bus.owner_id(0x103), Some(a));
        assert_eq!(bus.owner_id(0x104), None);
        assert_eq!(bus.owner_id(0x0ff), None);

        // Unclaimed: all-ones of the access size, writes dropped, counted.
        assert_eq!(bus.unclaimed_count(), 0);
        assert_eq!(bus.read(0x104, 1, 0), 0xff);
        assert_eq!(bus.read(0x500, 2, 0), 0xffff);
        assert_eq!(bus.read(0x500, 4, 0), 0xffff_ffff);
        bus.write(0x500, 4, 0x1234_5678, 0);
        assert_eq!(bus.unclaimed_count(), 4);
        assert_eq!(
            bus.unclaimed().get(&0x500),
            Some(&Unclaimed {
                reads: 2,
                writes: 1
            })
        );
        assert_eq!(bus.unclaimed().get(&0x104).unwrap().reads, 1);
        assert!(bus.get::<Recorder>(a).unwrap().writes.len() == 1);
    }

    #[test]
    fn narrow_devices_see_byte_accesses_wide_devices_whole_ones() {
        let mut bus = PortBus::new();
        let n = bus
            .register(&[PortRange::new(0x10, 4)], Recorder::default())
            .unwrap();
        let w = bus
            .register(
                &[PortRange::new(0x20, 4)],
                Recorder {
                    wide: true,
                    ..Default::default()
                },
            )
            .unwrap();
        bus.write(0x10, 4, 0x4433_2211, 0);
        assert_eq!(
            bus.get::<Recorder>(n).unwrap().writes,
            [
                (0x10, 1, 0x11),
                (0x11, 1, 0x22),
                (0x12, 1, 0x33),
                (0x13, 1, 0x44)
            ]
        );
        // A 16-bit read of two byte registers: little-endian assembly.
        assert_eq!(bus.read(0x12, 2, 0), 0x1312);
        // Straddling the end of a narrow device: the missing byte reads 0xff.
        assert_eq!(bus.read(0x13, 2, 0), 0xff13);
        assert_eq!(bus.unclaimed().get(&0x14).unwrap().reads, 1);

        bus.write(0x20, 2, 0xdead_beef, 0);
        assert_eq!(bus.get::<Recorder>(w).unwrap().writes, [(0x20, 2, 0xbeef)]);
        assert_eq!(bus.read(0x21, 2, 0), 0x3321);
        assert_eq!(bus.get::<Recorder>(w).unwrap().reads, [(0x21, 2)]);
    }

    #[test]
    fn odd_sizes_and_port_wrap_never_panic() {
        let mut bus = PortBus::new();
        bus.register(&[PortRange::new(0xfffe, 2)], Recorder::default())
            .unwrap();
        for size in [0u8, 3, 5, 8, 255] {
            assert_eq!(bus.read(0x10, size, 0), 0xffff_ffff);
            bus.write(0x10, size, 1, 0);
        }
        assert_eq!(bus.bad_size_count(), 10);
        // Runs past port 0xffff: the bytes beyond read 0xff.
        assert_eq!(bus.read(0xffff, 4, 0), 0xffff_ffff);
        assert_eq!(bus.read(0xfffe, 4, 0), 0xffff_fffe);
        bus.write(0xffff, 4, 0, 0);
    }

    #[test]
    fn registration_refuses_overlaps_and_bad_ranges() {
        let mut bus = PortBus::new();
        let a = bus
            .register(&[PortRange::new(0x40, 4)], Recorder::default())
            .unwrap();
        assert_eq!(
            bus.register(&[PortRange::new(0x43, 2)], Recorder::default()),
            Err(BusError::Overlap {
                range: PortRange::new(0x43, 2),
                owner: a
            })
        );
        assert!(matches!(
            bus.register(&[PortRange::new(0x50, 0)], Recorder::default()),
            Err(BusError::InvalidRange(_))
        ));
        assert!(matches!(
            bus.register(&[PortRange::new(0xfff0, 0x20)], Recorder::default()),
            Err(BusError::InvalidRange(_))
        ));
        assert!(matches!(
            bus.register(
                &[PortRange::new(0x60, 4), PortRange::new(0x62, 1)],
                Recorder::default()
            ),
            Err(BusError::Overlap { .. })
        ));
        // A refused registration claims nothing.
        assert_eq!(bus.owner_id(0x60), None);
        let b = bus
            .register(
                &[PortRange::new(0x3c, 4), PortRange::new(0x44, 1)],
                Recorder::default(),
            )
            .unwrap();
        assert_eq!(bus.owner_id(0x3f), Some(b));
        assert_eq!(bus.owner_id(0x40), Some(a));
        assert_eq!(bus.owner_id(0x44), Some(b));
        assert_eq!(bus.owner_id(0x45), None);
    }

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
