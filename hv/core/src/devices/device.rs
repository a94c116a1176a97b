//! What a device is to the port bus: the [`PortDevice`] trait, its port ranges,
//! its interrupt output, and the [`InterruptController`] role the 8259 pair plays.
//! Devices depend on this module only; the bus dispatches to it without knowing
//! any concrete device.

use core::any::Any;

/// What a device drives on its interrupt line, as seen by the bus when it routes
/// interrupts to the interrupt controller (`PortBus::update_irqs`).
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
    /// The device as the bus's interrupt controller, if it is one (the 8259 pair):
    /// the bus routes every other device's [`IrqOutput`] to it.
    fn interrupt_controller(&mut self) -> Option<&mut dyn InterruptController> {
        None
    }
}

/// An interrupt controller on the bus: takes device lines, gives the CPU vectors.
pub trait InterruptController {
    /// Drive input line `irq` to `level`.
    fn set_irq(&mut self, irq: u8, level: bool);
    /// The vector the CPU would take now, without acknowledging it.
    fn pending_vector(&self) -> Option<u8>;
    /// Interrupt acknowledge: the vector the CPU takes now, if any.
    fn acknowledge(&mut self) -> Option<u8>;
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
    pub(crate) fn end(&self) -> u32 {
        self.base as u32 + self.len as u32
    }
}

/// Mask of the low `size` bytes of a port access (`size` 1, 2 or 4; anything else
/// is treated as 4).
pub(crate) fn size_mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// True for the access sizes port I/O can have.
pub(crate) fn valid_size(size: u8) -> bool {
    matches!(size, 1 | 2 | 4)
}
