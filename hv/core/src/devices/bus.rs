//! The port bus: dispatch of port I/O to devices by port range. It knows devices
//! only through [`PortDevice`]; the standard PC set is wired in `board`.
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

use super::device::{size_mask, valid_size, InterruptController, IrqOutput, PortDevice, PortRange};

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
    /// The interrupt controller (the first device that is one) that
    /// [`PortBus::update_irqs`] routes device interrupts to.
    controller: Option<usize>,
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
        let mut device = device;
        let is_controller = device.interrupt_controller().is_some();
        self.devices.push(device);
        if is_controller && self.controller.is_none() {
            self.controller = Some(id);
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

    /// Poll every device's interrupt output at `now_ns` and drive the interrupt
    /// controller's lines with it. Does nothing without a controller.
    pub fn update_irqs(&mut self, now_ns: u64) {
        let Some(at) = self.controller else { return };
        let (before, rest) = self.devices.split_at_mut(at);
        let Some((controller, after)) = rest.split_first_mut() else {
            return;
        };
        let Some(controller) = controller.interrupt_controller() else {
            return;
        };
        for d in before.iter_mut().chain(after.iter_mut()) {
            match d.irq(now_ns) {
                IrqOutput::None => {}
                IrqOutput::Level { irq, high } => controller.set_irq(irq, high),
                IrqOutput::Pulse { irq } => {
                    controller.set_irq(irq, true);
                    controller.set_irq(irq, false);
                }
            }
        }
    }

    fn controller(&mut self) -> Option<&mut dyn InterruptController> {
        let at = self.controller?;
        self.devices[at].interrupt_controller()
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
        self.controller().and_then(|c| c.pending_vector())
    }

    /// Interrupt acknowledge: the vector the CPU takes now, if any.
    pub fn acknowledge(&mut self, now_ns: u64) -> Option<u8> {
        self.update_irqs(now_ns);
        self.controller().and_then(|c| c.acknowledge())
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
}
